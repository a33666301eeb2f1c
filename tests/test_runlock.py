"""One job per run folder (jobs/runlock.py), with real processes: the CLI, torchrun and the review server.

Where a test needs "a job that holds the folder" for as long as it likes, the test process itself
holds the lock through jobs.runlock, and the jobs it starts are real `python -m jobs` processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import FIXTURE_IMAGES, REPO, TINY_ARCH, run_job

from jobs import runlock
from jobs.fileio import atomic_write_json

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not FIXTURE_IMAGES.is_dir(), reason=f"{FIXTURE_IMAGES} is missing")]

CLEAN = ("--min-images-per-class", "3")
TRAIN = ("--arch", TINY_ARCH, "--weights", "none", "--epochs", "1", "--batch-size", "8", "--num-workers", "0")
RUN = (*TRAIN, *CLEAN)
TIMEOUT = 300


def _env() -> dict[str, str]:
    """No torchrun variables from outside; one thread per process (two ranks share two cores)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return env


class _Started:
    """A process whose merged stdout/stderr is collected line by line as it runs."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before {what}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the job and whatever it started
        self.proc.wait()


@pytest.fixture
def started():
    procs: list[_Started] = []

    def start(*args: str) -> _Started:
        procs.append(_Started([sys.executable, *args]))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()


def _holder(run: Path) -> dict:
    """The record in the run folder's lock file ({} when nobody holds it, or before the holder wrote it)."""
    try:
        return json.loads(runlock.lock_path(run).read_text())
    except (OSError, ValueError):
        return {}


def _prepared(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run_job("clean", "--data", str(FIXTURE_IMAGES), "--out", str(run), *CLEAN, env=_env())
    return run


def test_second_job_is_refused_naming_the_holder_and_wait_starts_it_when_the_first_ends(tmp_path, started):
    run = _prepared(tmp_path)
    config = (run / "config.yaml").read_bytes()
    with runlock.hold(run):
        with pytest.raises(runlock.FolderBusy):  # a second hold in this process is refused too ...
            with runlock.hold(run):
                pass
        refused = run_job("split", "--out", str(run), "--seed", "7", check=False, env=_env())  # ... and kept ours
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stdout == ""
        (line,) = refused.stderr.splitlines()
        assert line.startswith(f"error: {run} is in use by another job: pid {os.getpid()} on {socket.gethostname()}")
        assert "pytest" in line and "since" in line and "--wait" in line
        assert not (run / "splits.json").exists() and (run / "config.yaml").read_bytes() == config

        waiting = started("-m", "jobs", "split", "--out", str(run), "--seed", "7", "--wait")
        waiting.wait_for(lambda: "waiting for" in waiting.output, "the waiting line")
        time.sleep(1)
        assert waiting.proc.poll() is None and not (run / "splits.json").exists()
    assert waiting.finish() == 0, waiting.output
    assert f"pid {os.getpid()}" in waiting.lines[0] and "starting when it ends" in waiting.lines[0]
    assert f"{run} is free after" in waiting.output
    assert (run / "splits.json").is_file() and "seed: 7" in (run / "config.yaml").read_text()
    assert _holder(run) == {}  # it let go, and the file names nobody


def test_two_runs_on_one_folder_end_with_one_finished_run_and_one_refusal(tmp_path, small_data, started):
    """The report's reproduction: before, the second swept the first's archive work folder."""
    run = tmp_path / "run"
    args = ("-m", "jobs", "run", "--data", str(small_data), "--out", str(run), *RUN)
    first = started(*args)
    first.wait_for(lambda: _holder(run).get("pid") == first.proc.pid, "the first run to hold the folder")
    second = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert second.returncode == 2 and second.stdout == "", second.stdout + second.stderr
    (line,) = second.stderr.splitlines()
    assert f"is in use by another job: pid {first.proc.pid} on " in line and "jobs run --data" in line
    assert first.finish() == 0, first.output[-3000:]
    assert (run / "model-store" / "classifier.mar").is_file()
    assert not list((run / "model-store").glob(".archive-*"))


def test_archives_into_a_store_outside_the_run_folder_take_turns(finished_run, tmp_path, started):
    """A --model-store that several runs share is locked while one archives into it: the next waits
    instead of sweeping the other's work folder as a killed run's leftover."""
    run, store = finished_run, tmp_path / "store"
    run_job("archive", "--out", str(run), "--model-store", str(store), env=_env())
    assert (store / "classifier.mar").is_file() and _holder(store) == {}
    with runlock.hold(store):  # another run archiving into the store now
        (store / ".archive-live").mkdir()
        waiting = started("-m", "jobs", "archive", "--out", str(run), "--model-store", str(store))
        waiting.wait_for(lambda: f"waiting for {store}" in waiting.output, "the waiting line")
        time.sleep(1)
        assert waiting.proc.poll() is None and (store / ".archive-live").is_dir()
    assert waiting.finish() == 0, waiting.output[-3000:]
    assert f"{store} is free after" in waiting.output and "archive: " in waiting.output
    assert not list(store.glob(".archive-*")) and _holder(store) == {}


def test_a_sigkilled_job_leaves_a_folder_the_next_job_opens_at_once(tmp_path, small_data, started):
    run = tmp_path / "run"
    job = started("-m", "jobs", "run", "--data", str(small_data), "--out", str(run), *RUN)
    job.wait_for(lambda: _holder(run).get("pid") == job.proc.pid, "the job to hold the folder")
    os.kill(job.proc.pid, signal.SIGKILL)  # the job alone: no cleanup runs in it
    job.finish()
    assert _holder(run)["pid"] == job.proc.pid  # its record is still there; the kernel dropped the lock itself
    again = run_job("clean", "--data", str(small_data), "--out", str(run), *CLEAN, env=_env())  # no --wait
    assert "in use" not in again.stdout + again.stderr and "waiting" not in again.stdout
    assert _holder(run) == {}


def _torchrun(*args: str) -> tuple[str, ...]:
    # `python -m torch.distributed.run` is torchrun bound to this interpreter; --standalone: a private rendezvous.
    return ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "jobs", *args)


def _rank_of(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"RANK="):
                return entry[5:].decode()
    return None


def test_under_torchrun_rank_0_holds_the_folder_and_no_rank_hangs(prepared_run, started):
    run = prepared_run("run")
    train = ("train", "--out", str(run), *TRAIN, "--device", "cpu", "--precision", "fp32", "--feature-views", "1")
    with runlock.hold(run):
        # Refused: rank 0 exits 2 at once, and torchrun stops rank 1, which was waiting for it to rendezvous.
        refused = subprocess.run([sys.executable, *_torchrun(*train)], cwd=REPO, env=_env(), capture_output=True,
                                 text=True, timeout=120)
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0, output[-3000:]
        assert output.count(f"is in use by another job: pid {os.getpid()}") == 1, output[-3000:]  # rank 0 only
        assert not (run / "checkpoints").exists()

        waiting = started(*_torchrun(*train, "--wait"))
        waiting.wait_for(lambda: "waiting for" in waiting.output, "rank 0's waiting line")
        time.sleep(1)
        assert waiting.proc.poll() is None
    waiting.wait_for(lambda: _holder(run).get("pid") not in (None, os.getpid()), "a rank to take the folder")
    assert _rank_of(_holder(run)["pid"]) == "0"
    assert waiting.finish() == 0, waiting.output[-3000:]
    assert output.count("waiting for") == 0 and waiting.output.count("waiting for") == 1
    assert (run / "metrics.json").is_file() and _holder(run) == {}


def test_review_save_is_refused_while_a_job_holds_the_folder(tmp_path, started):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "review.html").write_text("<!doctype html><title>review</title>")
    atomic_write_json(run / "clean_report.json", {"classes": {"ants": {"usable": 5}, "bees": {"usable": 5}}})
    server = started("-m", "jobs", "review", "--out", str(run), "--port", "0")
    server.wait_for(lambda: server.lines and "review: open http://" in server.lines[0], "the review server")
    url = server.lines[0].split()[2].replace("/review.html", "/decisions")
    decisions = {"exclude": ["ants/a.jpg"], "relabel": {"bees/b.jpg": "ants"}, "keep": []}
    with runlock.hold(run):
        busy = requests.post(url, json=decisions, timeout=30)
        assert busy.status_code == 409, busy.text
        assert f"{run} is in use by another job: pid {os.getpid()}" in busy.text
        assert busy.text.endswith("save again when it has ended") and "\n" not in busy.text
        assert not (run / "decisions.json").exists()
    saved = requests.post(url, json=decisions, timeout=30)
    assert saved.status_code == 200, saved.text
    assert json.loads((run / "decisions.json").read_text()) == decisions


def test_without_working_locks_it_says_so_once_and_goes_on(tmp_path, monkeypatch, capsys):
    """Some network filesystems answer every lock with ENOLCK; no second process can show that here."""
    def no_locks(fd: int, cmd: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    monkeypatch.setattr(runlock, "_warned_no_locks", False)
    ran = []
    with runlock.hold(tmp_path / "a"), runlock.hold(tmp_path / "a"), runlock.hold(tmp_path / "b"):
        ran.append(True)
    assert ran == [True]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "without working file locks (No locks available)" in err
