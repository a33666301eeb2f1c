"""One job per run folder: an exclusive lock on ``<run>/.job.lock`` for as long as a job writes there.

Two jobs on one ``--out`` interleave checkpoints, ``splits.json`` and the feature cache, and one's
archive sweeps away the other's work folder. So every command that writes a run folder takes this
lock before its first write (config.yaml included) and keeps it until it ends; a second job is
refused at once with one line naming the holder, or, with ``--wait``, waits for it.

Why ``fcntl`` record locks (``lockf``): the kernel drops them when the process dies, by SIGKILL or
the OOM killer too, so no stale lock is ever left to clean up; forked children (DataLoader workers)
do not inherit them, so the folder is free the moment the job itself is gone; and NFS hands them to
its lock manager, so two pods on two nodes sharing one volume see each other's lock. Their one trap:
closing *any* descriptor of the file drops every lock this process has on it. So a process never
opens the lock file while it holds it (``_HELD``, checked under ``_GUARD``), and a second ``hold`` in
the same process is refused like another process's would be.

The holder writes who it is (pid, host, command, start time) into the lock file itself, for the
refused job's message; it empties the file when it lets go.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from jobs.errors import JobError
from jobs.fileio import ensure_writable_dir

LOCK_NAME = ".job.lock"
CLI_HINT = "wait for it to end (or stop it), pass --wait to start when it ends, or use another --out"
POLL_S = 0.5  # how often a waiting job tries again
PROGRESS_S = 60.0  # how often a waiting job says it is still waiting
_HOLDER_TRIES = 5  # reads of a holder record that is not there yet (it writes it just after locking)

_GUARD = threading.Lock()  # this process's opens of lock files, and _HELD
_HELD: dict[tuple[int, int], dict] = {}  # (st_dev, st_ino) of each lock file this process holds -> its record
_warned_no_locks = False


class FolderBusy(JobError):
    """Another job holds the run folder's lock."""


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


def torchrun_rank() -> int:
    """The global rank torchrun gave this process, else 0 (``runtime.setup`` reads it here too): only with
    LOCAL_RANK set, so a pod-wide RANK (the Kubeflow operator's) does not count."""
    return int(os.environ.get("RANK", "0")) if "LOCAL_RANK" in os.environ else 0


@contextlib.contextmanager
def job_lock(folder: str | os.PathLike, wait: bool = False) -> Iterator[bool]:
    """The lock a command holds on its run folder while it runs; yields whether this process writes the
    run's own files (config.yaml). Under torchrun rank 0 holds it for the whole job, and the other
    ranks take no lock and write no config: they reach the job through rank 0, which got the folder
    first (while rank 0 waits or is refused, they wait in the process group's rendezvous, and
    torchrun stops them when rank 0 exits)."""
    if torchrun_rank() != 0:
        yield False
        return
    with hold(folder, wait=wait):
        yield True


@contextlib.contextmanager
def hold(folder: str | os.PathLike, wait: bool = False, busy_hint: str = CLI_HINT) -> Iterator[None]:
    """Hold ``folder``'s lock for the ``with`` body (creating the folder if needed).

    Held by another job (or already by this process): raise ``FolderBusy``, one line naming the
    holder and ending in ``busy_hint``; with ``wait``, wait for it, with a progress line now and
    every minute. On a filesystem without working locks, say so once per process and go on unlocked.
    """
    folder = ensure_writable_dir(folder)
    path = lock_path(folder)
    fd = _acquire(path, wait, busy_hint)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd)


def _acquire(path: Path, wait: bool, busy_hint: str) -> int | None:
    """The locked descriptor of ``path``, or None where the filesystem cannot lock."""
    started = time.monotonic()
    said = None  # when the last progress line was printed
    while True:
        with _GUARD:
            fd, holder = _try_lock(path)
        if fd is not None or holder is None:
            if said is not None:
                print(f"{path.parent} is free after {_duration(time.monotonic() - started)}: starting", flush=True)
            return fd
        who = _describe(holder)
        if not wait:
            raise FolderBusy(f"{path.parent} is in use by another job: {who}; {busy_hint}")
        now = time.monotonic()
        if said is None:
            print(f"waiting for {path.parent}, in use by another job: {who}; starting when it ends "
                  "(Ctrl-C stops waiting)", flush=True)
            said = now
        elif now - said >= PROGRESS_S:
            print(f"still waiting for {path.parent} ({_duration(now - started)}): in use by {who}", flush=True)
            said = now
        time.sleep(POLL_S)


def _try_lock(path: Path) -> tuple[int | None, dict | None]:
    """(locked fd, None), (None, the holder's record; {} if unknown) or (None, None): no working locks.
    Called under _GUARD."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in _HELD:  # opening it again here would drop our own lock when closed
            return None, _HELD[(st.st_dev, st.st_ino)]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise JobError(f"cannot open the run folder's lock file {path} ({e.strerror}); run the job as the user "
                       "who owns the run folder, or use another --out") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read_holder(fd)
            os.close(fd)
            return None, holder
        os.close(fd)
        _say_no_locks(path, e)
        return None, None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(), "since": time.time()}
    data = json.dumps(record).encode() + b"\n"
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    st = os.fstat(fd)
    _HELD[(st.st_dev, st.st_ino)] = record
    return fd, None


def _release(fd: int) -> None:
    with _GUARD:
        st = os.fstat(fd)
        _HELD.pop((st.st_dev, st.st_ino), None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a job refused from now on sees nobody named, not us
        os.close(fd)  # drops the lock


def _read_holder(fd: int) -> dict:
    """The holder's record; {} if it wrote none. A record naming a process that no longer runs on
    this host is one a killed job left: the new holder is about to replace it, so read again."""
    record: dict = {}
    for attempt in range(_HOLDER_TRIES):
        if attempt:
            time.sleep(0.1)
        try:
            record = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            record = {}
        if isinstance(record, dict) and record.get("pid") and not _gone_here(record):
            return record
    return record if isinstance(record, dict) else {}


def _gone_here(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that has not said which"
    since = holder.get("since")
    when = ""
    if isinstance(since, int | float):
        started = datetime.datetime.fromtimestamp(since).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        when = f" since {started} ({_duration(time.time() - since)} ago)"
    return f"pid {holder['pid']} on {holder.get('host', '?')}{when}, `{holder.get('command', '?')}`"


def _command_line() -> str:
    """How this process was started, e.g. ``python -m jobs run --out runs/x``, on one line."""
    words = [Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]] if sys.orig_argv else sys.argv
    line = shlex.join(words).replace("\n", " ")
    return line if len(line) <= 300 else line[:297] + "..."


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _say_no_locks(path: Path, e: OSError) -> None:
    global _warned_no_locks
    if not _warned_no_locks:
        _warned_no_locks = True
        print(f"warning: {path.parent} is on a filesystem without working file locks ({e.strerror}); nothing "
              "stops a second job from writing it at the same time: start one job per folder at a time",
              file=sys.stderr, flush=True)
