"""Capture: keep what the served model met, to look at and to learn from. Opt-in, off unless a folder is named.

Every image the model abstained on, the answers under a calibrated top probability (``below``, separate from
``min_confidence``), and a sample (``sample``) of the rest, each as the bytes received (``<stem>.<jpg|png|...>``)
with a JSON record beside it (``<stem>.json``: the answer, model name and version, the UTC time, the request id,
why it was kept). Stems begin with the UTC time, so names sort oldest first.

- Never on the request path: ``CaptureSink.offer`` decides and puts the bytes on a bounded queue; a thread writes
  them. A full queue drops the image and counts it (``take_dropped``; ``classifier_capture_dropped_total``).
- The folder is capped in bytes and files (images and records together), oldest dropped first. Several worker
  processes share it: each write and trim holds an exclusive lock on ``.capture-state``, which also keeps the
  running totals, so the cap holds for all of them together.
- Atomic writes (a dot-named temp file, then ``os.replace``), the folder 0700, the files 0600.
- Only answered images are offered: a refused request (4xx/5xx) leaves nothing.

The settings reach the server as environment variables (``CaptureSettings.ENV``), read once when a worker loads the
model: ``jobs serve --capture DIR`` sets them, and so can the serve image and its Kubernetes manifests, for an
archive as it is. Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

DEFAULT_BELOW = 0.85  # issue 26: "abstained, or top probability under 0.85" kept 45 % of a new class's photos
DEFAULT_SAMPLE = 0.01
DEFAULT_MAX_MB = 1024.0
DEFAULT_MAX_FILES = 20_000  # 10,000 images and their records
QUEUE_SIZE = 64
STATE_FILE = ".capture-state"
ABSTAINED, LOW_CONFIDENCE, SAMPLED = "abstained", "low confidence", "sampled"
QUEUE_FULL, OVER_THE_CAP, WRITE_FAILED = "queue full", "over the cap", "write failed"
DROP_REASONS = (QUEUE_FULL, OVER_THE_CAP, WRITE_FAILED)
EXTENSIONS = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
              (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


class CaptureSettingError(ValueError):
    """A capture environment variable the operator must fix; the message names it."""


@dataclass(frozen=True)
class CaptureSettings:
    folder: Path
    below: float = DEFAULT_BELOW
    sample: float = DEFAULT_SAMPLE
    max_mb: float = DEFAULT_MAX_MB
    max_files: int = DEFAULT_MAX_FILES

    ENV: ClassVar[dict[str, str]] = {"folder": "JOBS_CAPTURE_DIR", "below": "JOBS_CAPTURE_BELOW",
                                     "sample": "JOBS_CAPTURE_SAMPLE", "max_mb": "JOBS_CAPTURE_MAX_MB",
                                     "max_files": "JOBS_CAPTURE_MAX_FILES"}

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> CaptureSettings | None:
        """The settings in ``environ``; None (capture off) when ``JOBS_CAPTURE_DIR`` is unset or empty."""
        folder = environ.get(cls.ENV["folder"], "").strip()
        if not folder:
            return None

        def number(field: str, kind: type, lo: float, hi: float, default: float) -> Any:
            name, text = cls.ENV[field], environ.get(cls.ENV[field], "").strip()
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not lo <= value <= hi:
                raise CaptureSettingError(f"{name}={text!r}: expected a {kind.__name__} in [{lo}, {hi}]; fix or "
                                          "unset it")
            return value

        return cls(Path(folder), number("below", float, 0.0, 1.0, DEFAULT_BELOW),
                   number("sample", float, 0.0, 1.0, DEFAULT_SAMPLE),
                   number("max_mb", float, 0.0, 1e9, DEFAULT_MAX_MB),
                   number("max_files", int, 2, 10**9, DEFAULT_MAX_FILES))

    def environ(self) -> dict[str, str]:
        """These settings as the environment variables ``from_environ`` reads."""
        return {self.ENV[k]: str(getattr(self, k)) for k in self.ENV}


def off_environ() -> dict[str, str]:
    """The environment that turns capture off (an inherited ``JOBS_CAPTURE_DIR`` does not turn it on)."""
    return {CaptureSettings.ENV["folder"]: ""}


def image_extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in EXTENSIONS if data.startswith(magic)), "bin")


def _safe(text: str, limit: int = 64) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:limit] or "request"


class CaptureFolder:
    """The capped folder; every method but ``__init__`` runs on the writer thread."""

    def __init__(self, folder: Path, max_bytes: int, max_files: int):
        self.folder, self.max_bytes, self.max_files = Path(folder), max_bytes, max_files
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
        except OSError as e:
            raise CaptureSettingError(f"{CaptureSettings.ENV['folder']}={self.folder}: cannot make it an owner-only "
                                      f"folder ({e.strerror}); name a folder this server's user owns") from None
        self.scanned = False  # this process rescans once, to see what others (or a person) did meanwhile

    def write(self, stem: str, image: bytes, record: dict[str, Any]) -> str | None:
        """Store one capture; None when stored, else why it was not (it alone is over the cap)."""
        name = f"{stem}.{image_extension(image)}"
        record = {**record, "image": name, "bytes": len(image)}
        text = json.dumps(record, indent=1).encode()
        size = len(image) + len(text)
        if size > self.max_bytes:
            return OVER_THE_CAP
        with self._state() as usage:
            if not self.scanned or usage["files"] + 2 > self.max_files or usage["bytes"] + size > self.max_bytes:
                usage.update(self._trim(size))
                self.scanned = True
            self._atomic(name, image)
            self._atomic(f"{stem}.json", text)
            usage["files"] += 2
            usage["bytes"] += size
        return None

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, int]]:
        """The running totals in ``.capture-state``, under its exclusive lock (every process's writer takes it)."""
        fd = os.open(self.folder / STATE_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                usage = json.loads(f.read() or "null")
                valid = isinstance(usage, dict) and all(isinstance(usage.get(k), int) for k in ("files", "bytes"))
            except ValueError:
                valid = False
            if not valid:
                usage, self.scanned = {"files": 0, "bytes": 0}, False
            yield usage
            f.seek(0)
            f.truncate()
            f.write(json.dumps(usage))
            f.flush()

    def _trim(self, incoming: int) -> dict[str, int]:
        """Delete the oldest captures until ``incoming`` bytes and two files fit with a tenth of the cap to spare
        (so the next writes need no scan); returns the totals left."""
        groups: dict[str, list[os.DirEntry]] = {}
        for entry in os.scandir(self.folder):
            if entry.name.startswith("."):
                if entry.name.endswith(".part"):  # a writer that died mid-write; none is writing now (the lock)
                    Path(entry.path).unlink(missing_ok=True)
                continue
            groups.setdefault(entry.name.rsplit(".", 1)[0], []).append(entry)
        sizes = {stem: sum(e.stat().st_size for e in entries) for stem, entries in groups.items()}
        files, total = sum(len(g) for g in groups.values()), sum(sizes.values())
        keep_files = self.max_files - 2 - self.max_files // 10
        keep_bytes = self.max_bytes - incoming - self.max_bytes // 10
        for stem in sorted(groups):  # the stems begin with the UTC time: oldest first
            if files <= keep_files and total <= keep_bytes:
                break
            for entry in groups[stem]:
                Path(entry.path).unlink(missing_ok=True)
            files -= len(groups[stem])
            total -= sizes[stem]
        return {"files": files, "bytes": total}

    def _atomic(self, name: str, data: bytes) -> None:
        tmp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.folder / name)
        finally:
            tmp.unlink(missing_ok=True)


class CaptureSink:
    """Decides what to keep of each answered image and hands it to a writer thread through a bounded queue."""

    def __init__(self, settings: CaptureSettings, model_name: str, model_version: str, queue_size: int = QUEUE_SIZE,
                 seed: int | None = None):
        self.settings, self.model = settings, {"model_name": model_name, "model_version": model_version}
        self.folder = CaptureFolder(settings.folder, settings.max_bytes, settings.max_files)
        self.queue: queue.Queue = queue.Queue(queue_size)
        self.random = random.Random(seed)
        self._dropped: Counter = Counter()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self.thread.start()

    def why(self, answer: dict[str, Any]) -> str | None:
        """Why this answer's image is kept, or None."""
        if answer.get("abstain"):
            return ABSTAINED
        predictions = answer.get("predictions") or [{"probability": 0.0}]
        if predictions[0]["probability"] < self.settings.below:
            return LOW_CONFIDENCE
        return SAMPLED if self.random.random() < self.settings.sample else None

    def offer(self, images: list[bytes], answers: list[dict[str, Any]], request_id: str | None) -> None:
        """One answered request's images and answers; returns at once (a full queue drops, counted)."""
        now = dt.datetime.now(dt.timezone.utc)
        request_id = request_id or uuid.uuid4().hex
        for n, (image, answer) in enumerate(zip(images, answers, strict=True)):
            why = self.why(answer)
            if why is None:
                continue
            stem = f"{now:%Y%m%dT%H%M%S.%fZ}-{_safe(request_id)}-{n}"
            record = {"why": why, "answer": answer, **self.model, "answered_at": now.isoformat(timespec="microseconds"),
                      "request_id": request_id, "image_index": n, "images_in_request": len(images)}
            try:
                self.queue.put_nowait((stem, image, record))
            except queue.Full:
                self._drop(QUEUE_FULL)

    def take_dropped(self) -> dict[str, int]:
        """Images dropped since the last call, by reason."""
        with self._lock:
            dropped, self._dropped = dict(self._dropped), Counter()
        return dropped

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self.queue.put(None)
        self.thread.join(timeout)

    def _drop(self, reason: str) -> None:
        with self._lock:
            self._dropped[reason] += 1

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                refused = self.folder.write(*item)
            except OSError as e:  # a full disk or a folder taken away: count it, keep serving
                logger.warning("capture: cannot write into %s (%s)", self.folder.folder, e.strerror or e)
                refused = WRITE_FAILED
            if refused:
                self._drop(refused)
