"""The raw image folder: ``raw/<term>/<sha256[:16]>.<ext>`` plus an append-only ``manifest.jsonl`` per term.

The manifest is the record of what happened to every URL; the folder holds exactly the images
whose latest manifest line says ``ok``. Files are named by content, so the same image found
twice (under two URLs or two terms, in this run or an earlier one) is stored once.

Crash safety without an fsync per image: an image is written to a dot-named ``.part`` file and
renamed (by the verification thread that decoded it), and only then is its ``ok`` line
appended. Opening the store removes ``.part`` files and images without an ``ok`` line, and
re-hashes every kept image against its manifest line: after a power loss, an image whose bytes
did not reach the disk fails that check and is fetched again, and a manifest line that was lost
makes its image an orphan that is removed and fetched again. So a re-run ends where an
uninterrupted run would; what a crash costs is re-downloads, never a bad image counted as kept.
(bench/collect.py: with an fsync per image and per manifest line, writing took about 9.5 ms per
image on the development machine's ext4, against 2.4-2.8 ms without; re-hashing on open 0.2-0.7 ms.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from jobs.fileio import sha256_file

from .sources import CollectError

MANIFEST = "manifest.jsonl"
IMAGE_NAME = re.compile(r"^[0-9a-f]{16}\.[a-z]{3,4}$")
# what a re-run needs of a URL's latest line that is not "ok" (an "ok" line is kept whole: attribution reads it)
DECISION_FIELDS = ("url", "status", "permanent", "file")


def term_folder_name(term: str) -> str:
    """The folder (= class label) for a search term: path separators and control characters become '_'."""
    name = re.sub(r"[\x00-\x1f\x7f/\\]+", "_", term).strip()
    if not name.strip("._ "):
        raise CollectError(f"config key 'terms' has {term!r}, which cannot name a class folder; use words")
    return name


class Manifest:
    """``manifest.jsonl``: one JSON object a line, appended under a lock; the latest line per URL in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        raw = path.read_bytes() if path.exists() else b""
        self.latest: dict[str, dict[str, Any]] = {}
        for entry in self._parse(raw):
            self._remember(entry)
        # a crash can leave a last line without its newline: never glue the next line onto it
        self._torn = bool(raw) and not raw.endswith(b"\n")
        self._fd: int | None = None

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

    def _remember(self, entry: dict[str, Any]) -> None:
        self.latest.pop(entry["url"], None)  # re-inserted last: dict order is the order of latest lines
        self.latest[entry["url"]] = entry if entry.get("status") == "ok" else {
            k: entry.get(k) for k in DECISION_FIELDS}

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._torn:
                line, self._torn = b"\n" + line, False
            if self._fd is None:  # kept open: one write per line, no open/close
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, line)
            self._remember(entry)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class RawStore:
    """Content-addressed image files under ``raw/<term>/`` with one sha256 index across all terms."""

    def __init__(self, raw: Path, terms: list[str]) -> None:
        self.raw = raw
        self.manifests: dict[str, Manifest] = {}
        self._by_sha: dict[str, str] = {}  # sha256 -> "term/file", the one kept copy
        self._lock = threading.Lock()
        raw.mkdir(parents=True, exist_ok=True)
        _remove_parts(raw)  # attribution, preview and report files killed mid-write
        for term in terms:
            self._open(term)

    def _open(self, term: str) -> None:
        folder = self.raw / term
        folder.mkdir(parents=True, exist_ok=True)
        self.manifests[term] = Manifest(folder / MANIFEST)
        _remove_parts(folder)
        kept = self.kept_entries(term)
        for entry in kept:
            path = folder / entry["file"]
            if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
                path.unlink()  # bytes lost in a crash: the URL is no longer settled and is fetched again
        kept_files = {e["file"] for e in self.kept_entries(term)}
        for leftover in folder.iterdir():
            if IMAGE_NAME.match(leftover.name) and leftover.name not in kept_files and leftover.is_file():
                leftover.unlink()
        for entry in self.kept_entries(term):
            self._by_sha.setdefault(entry["sha256"], f"{term}/{entry['file']}")

    def kept_entries(self, term: str) -> list[dict[str, Any]]:
        """Latest ``ok`` entries whose file is on disk, in manifest order."""
        folder = self.raw / term
        return [e for e in self.manifests[term].latest.values()
                if e.get("status") == "ok" and e.get("file") and (folder / e["file"]).is_file()]

    def settled_urls(self, term: str, retry_all: bool = False) -> set[str]:
        """URLs a re-run skips: kept, duplicate, or failed permanently (unless ``retry_all``)."""
        kept = {e["url"] for e in self.kept_entries(term)}
        return kept | {url for url, e in self.manifests[term].latest.items()
                       if e.get("status") == "duplicate"
                       or (not retry_all and e.get("status") == "failed" and e.get("permanent"))}

    def failed_urls(self, term: str) -> set[str]:
        """URLs whose latest line is a failure: what a re-run counts as retried."""
        return {url for url, e in self.manifests[term].latest.items() if e.get("status") == "failed"}

    def claim(self, term: str, sha256: str, ext: str) -> str | None:
        """Make ``term``'s copy of this content the kept one; returns the existing "term/file" when there is one."""
        with self._lock:
            existing = self._by_sha.get(sha256)
            if existing is None:
                self._by_sha[sha256] = f"{term}/{image_name(sha256, ext)}"
            return existing

    def close(self) -> None:
        for manifest in self.manifests.values():
            manifest.close()


def image_name(sha256: str, ext: str) -> str:
    return f"{sha256[:16]}.{ext}"


def write_image(folder: Path, sha256: str, ext: str, data: bytes) -> str:
    """Write-and-rename without fsync (the module docstring says why that is safe here); returns the name.

    Runs in the verification threads. Two writers of one name write the same bytes (the name is
    the content's hash), so whichever rename lands last changes nothing.
    """
    name = image_name(sha256, ext)
    part = folder / f".{name}.{threading.get_ident()}.part"
    try:
        part.write_bytes(data)
        os.replace(part, folder / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return name


def _remove_parts(folder: Path) -> None:
    for part in folder.glob(".*.part"):
        if part.is_file():
            part.unlink()
