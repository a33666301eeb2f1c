"""The raw image folder: ``raw/<term>/<sha256[:16]>.<ext>`` plus an append-only ``manifest.jsonl`` per term.

The manifest is the record of what happened to every URL; the folder holds exactly the images
whose latest manifest line says ``ok``. Files are named by content, so the same image found
twice (under two URLs or two terms, in this run or an earlier one) is stored once.

Crash safety: an image is written to a dot-named ``.part`` file, fsync'd and renamed, and only then
is its ``ok`` line appended (and fsync'd). A run killed in between leaves a ``.part`` file or an
image without an ``ok`` line; opening the store removes both, so a re-run ends where an uninterrupted
run would.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from jobs.fileio import atomic_write_bytes

from .sources import CollectError

MANIFEST = "manifest.jsonl"
IMAGE_NAME = re.compile(r"^[0-9a-f]{16}\.[a-z]{3,4}$")


def term_folder_name(term: str) -> str:
    """The folder (= class label) for a search term: path separators and control characters become '_'."""
    name = re.sub(r"[\x00-\x1f\x7f/\\]+", "_", term).strip()
    if not name.strip("._ "):
        raise CollectError(f"config key 'terms' has {term!r}, which cannot name a class folder; use words")
    return name


class Manifest:
    """``manifest.jsonl``: one JSON object a line, appended and fsync'd under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        raw = path.read_bytes() if path.exists() else b""
        self.entries = self._parse(raw)
        # a crash can leave a last line without its newline: never glue the next line onto it
        self._torn = bool(raw) and not raw.endswith(b"\n")

    @staticmethod
    def _parse(raw: bytes) -> list[dict[str, Any]]:
        entries = []
        for line in raw.decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash: that URL is simply fetched again
            if isinstance(entry, dict) and entry.get("url"):
                entries.append(entry)
        return entries

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._torn:
                line, self._torn = b"\n" + line, False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries.append(entry)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last entry for each URL."""
        return {e["url"]: e for e in self.entries}


class RawStore:
    """Content-addressed image files under ``raw/<term>/`` with one sha256 index across all terms."""

    def __init__(self, raw: Path, terms: list[str]) -> None:
        self.raw = raw
        self.manifests: dict[str, Manifest] = {}
        self._by_sha: dict[str, str] = {}  # sha256 -> "term/file", the one kept copy
        self._lock = threading.Lock()
        for term in terms:
            self._open(term)

    def _open(self, term: str) -> None:
        folder = self.raw / term
        folder.mkdir(parents=True, exist_ok=True)
        self.manifests[term] = Manifest(folder / MANIFEST)
        kept = self.kept_entries(term)
        kept_files = {e["file"] for e in kept}
        for leftover in folder.iterdir():
            stale_part = leftover.name.endswith(".part")
            orphan = IMAGE_NAME.match(leftover.name) and leftover.name not in kept_files
            if leftover.is_file() and (stale_part or orphan):
                leftover.unlink()
        for entry in kept:
            self._by_sha.setdefault(entry["sha256"], f"{term}/{entry['file']}")

    def kept_entries(self, term: str) -> list[dict[str, Any]]:
        """Latest ``ok`` entries whose file is on disk, in manifest order."""
        folder = self.raw / term
        return [e for e in self.manifests[term].latest().values()
                if e.get("status") == "ok" and e.get("file") and (folder / e["file"]).is_file()]

    def settled_urls(self, term: str) -> set[str]:
        """URLs a re-run skips: kept, duplicate, or failed permanently (the others are tried again)."""
        kept = {e["url"] for e in self.kept_entries(term)}
        return kept | {url for url, e in self.manifests[term].latest().items()
                       if e.get("status") == "duplicate" or (e.get("status") == "failed" and e.get("permanent"))}

    def claim(self, term: str, sha256: str, ext: str) -> str | None:
        """Reserve the file for this content; returns the existing "term/file" when it is already kept."""
        with self._lock:
            existing = self._by_sha.get(sha256)
            if existing is None:
                self._by_sha[sha256] = f"{term}/{sha256[:16]}.{ext}"
            return existing

    def release(self, sha256: str) -> None:
        with self._lock:
            self._by_sha.pop(sha256, None)

    def write(self, term: str, sha256: str, ext: str, data: bytes) -> str:
        name = f"{sha256[:16]}.{ext}"
        atomic_write_bytes(self.raw / term / name, data)
        return name
