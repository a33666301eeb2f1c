"""Atomic file writes and content hashing, shared by every stage.

A stage killed at any instant leaves either the old file or the new one, never half of one:
write to a temporary file in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from jobs.errors import JobError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on clean exit fsync it and rename it over ``path``."""
    path = Path(path)
    with _disk_full_is_one_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide outputs from other users (e.g. the server)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise JobError(f"no space left on the device writing {path}; free some space (or pick another --out) "
                           "and re-run the same command: it continues where it stopped") from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with _disk_full_is_one_line(Path(path)), atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, streamed into the temp file a few thousand pieces at a time. ``json.dumps`` held
    the pieces, the whole text and its bytes at once: 473 MiB for a clean_report.json of 100,000 photos (80 MiB),
    where this holds 0.4 MiB, in the same time (``json.dump``'s one write per piece was a quarter slower)."""
    pieces = json.JSONEncoder(indent=2).iterencode(obj)
    with _disk_full_is_one_line(Path(path)), atomic_open(path, "w") as f:
        while block := "".join(itertools.islice(pieces, 8192)):
            f.write(block)
        f.write("\n")
    return Path(path)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` straight into the temp file: serialised in memory first, a feature chunk was held twice more.

    torch's writer turns a failed write into its own RuntimeError; the OSError under it (a full disk) is the
    one raised, so it reads as the one line ``_disk_full_is_one_line`` makes of it.
    """
    import torch

    with _disk_full_is_one_line(Path(path)), atomic_open(path, "wb") as f:
        sink = _KeepsWriteError(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
    return Path(path)


class _KeepsWriteError:
    """A binary file whose failed write is kept for the caller."""

    def __init__(self, f: IO[bytes]):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_run_file(path: str | os.PathLike, rebuild: str, required: tuple[str, ...] = ()) -> dict:
    """A JSON object an earlier stage wrote, or one line naming the file and the command that rebuilds it."""
    try:
        doc = read_json(path)
    except OSError as e:
        raise JobError(f"cannot read {path} ({e.strerror}); {rebuild}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JobError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}); {rebuild} to rebuild it") from None
    missing = [k for k in required if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise JobError(f"{path} is damaged (missing {', '.join(missing)}); {rebuild} to rebuild it")
    return doc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Hard-link ``src`` to ``dst`` (copy across filesystems); replaces ``dst`` atomically."""
    dst = Path(dst)
    with contextlib.suppress(OSError):
        if os.path.samefile(src, dst):
            return dst  # already this file: os.replace onto the same inode would leave the temp link behind
    tmp = dst.with_name(f".{dst.name}.link.part")
    with _disk_full_is_one_line(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            try:
                shutil.copyfile(src, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, dst)
    return dst


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside ``dest`` to fill; on clean exit it takes ``dest``'s place, else it is deleted.

    A folder cannot be renamed over a full one, so it takes two renames: the old ``dest`` aside, the new one
    in; then the old one is deleted. A reader sees the old folder or the new one, whole. A process killed
    between the two renames leaves no ``dest`` (the old one waits as ``.NAME.*.part``): the same command
    writes it again, and sweeps what a killed one left.
    """
    dest = Path(dest)
    with _disk_full_is_one_line(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        for leftover in dest.parent.glob(f".{dest.name}.*.part"):
            shutil.rmtree(leftover, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        stage.chmod(0o777 & ~_UMASK)  # mkdtemp's 0700 would hide the folder from other users (e.g. the server)
        with _disk_full_is_one_line(dest):
            yield stage
        old = dest.with_name(f"{stage.name.removesuffix('.part')}.old.part")
        if dest.exists():
            os.rename(dest, old)
        os.rename(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sweep_partials(*targets: str | os.PathLike) -> None:
    """Delete the temp files (``.NAME.*.part``) a killed process left behind.

    A folder is swept recursively; a file's own temp siblings (``.metrics.json.*.part``) are swept
    beside it. Called at the start of each stage for what that stage writes: no other process
    writes there then, so every ``.part`` file is a leftover.
    """
    for target in map(Path, targets):
        leftovers = target.rglob(".*.part") if target.is_dir() else target.parent.glob(f".{target.name}.*part")
        for leftover in list(leftovers):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                leftover.unlink()


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` and prove it is writable, or raise one clear line naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise JobError(f"output folder {path} is not writable ({e.strerror}); choose another --out") from None
    return path
