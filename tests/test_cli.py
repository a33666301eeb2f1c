"""The command line a newcomer meets: --help in pipeline order and grouped by stage, hints that can be
pasted as printed, relative paths that work from any directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_job
from torchserve_fixture import export_random_model

from jobs.cli import key_section
from jobs.config import key_names
from jobs.errors import jobs_command, with_real_command

PIPELINE_ORDER = ["run", "collect", "clean", "audit", "review", "split", "train", "export", "evaluate", "archive",
                  "serve", "predict", "export-kserve", "export-triton", "serve-config"]


def test_commands_are_listed_in_pipeline_order():
    listed = run_job("--help").stdout.split("Commands:", 1)[1]
    assert re.findall(r"^  (\S+)", listed, re.M) == PIPELINE_ORDER


def test_run_help_groups_the_config_keys_by_stage():
    text = run_job("run", "--help").stdout
    titles = re.findall(r"^(\w+) options:$", text, re.M)
    assert titles == ["Collect", "Clean", "Audit", "Split", "Train", "Export", "Evaluate", "Archive", "Serve"]
    sections = dict(zip(titles, re.split(r"^\w+ options:$", text, flags=re.M)[1:]))
    for key in key_names():
        option = f"--{key.replace('_', '-')}"
        home = key_section(key).capitalize()
        assert re.search(rf"^\s+{option}[ /=]", sections[home], re.M), (key, home)
    assert re.search(r"^\s+--data PATH", text.split("Collect options:")[0], re.M)  # run's own options come first
    assert "docs/configuration.md" in text
    assert (key_section("terms"), key_section("seed"), key_section("device"), key_section("model_name")) == (
        "collect", "train", "train", "export")


def test_hints_name_the_interpreter_that_runs(tmp_path: Path, monkeypatch):
    """From the repository root with the venv not activated: `.venv/bin/python -m jobs`; activated:
    `python -m jobs`; the console script: `jobs`; elsewhere: the absolute path."""
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch(mode=0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setattr(sys, "argv", [str(REPO / "jobs" / "__main__.py")])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert jobs_command() == ".venv/bin/python -m jobs"
    assert with_real_command("run `python -m jobs export --out r` first") == \
        "run `.venv/bin/python -m jobs export --out r` first"
    monkeypatch.setenv("PATH", f"{python.parent}:/usr/bin:/bin")
    assert jobs_command() == "python -m jobs"
    script = python.parent / "jobs"
    script.touch(mode=0o755)
    monkeypatch.setattr(sys, "argv", [str(script)])
    assert jobs_command() == "jobs"
    monkeypatch.setattr(sys, "argv", [str(REPO / "jobs" / "__main__.py")])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(REPO)
    assert jobs_command() == f"{python} -m jobs"


def test_errors_show_the_command_that_runs(tmp_path: Path):
    """Stages raise with `python -m jobs ...` hints; the CLI shows them with the program that runs."""
    proc = run_job("archive", "--out", "nothing-here", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 2
    assert f"run `{sys.executable} -m jobs export --out nothing-here` first" in proc.stderr, proc.stderr


@pytest.mark.e2e
def test_archive_with_a_relative_out_from_another_directory(tmp_path: Path):
    """`jobs archive --out runs/pets` from the folder that holds runs/: the archiver works in another
    directory and used to get paths relative to this one."""
    export_random_model(tmp_path / "runs" / "pets", ["ants", "bees"])
    proc = run_job("archive", "--out", "runs/pets", cwd=tmp_path)
    assert proc.stdout.strip().endswith("runs/pets/model-store/classifier.mar")
    assert (tmp_path / "runs/pets/model-store/classifier.mar").stat().st_size > 1_000_000
    assert not list((tmp_path / "runs/pets/model-store").glob(".archive-*"))


@pytest.mark.e2e
def test_serve_stop_says_what_it_did(tmp_path: Path):
    proc = run_job("serve", "--model-store", "store", "--stop", cwd=tmp_path)
    assert proc.stdout.strip() == "serve: no TorchServe state in serve-state; nothing to stop"
    (tmp_path / "serve-state" / "tmp").mkdir(parents=True)
    proc = run_job("serve", "--model-store", "store", "--stop", cwd=tmp_path)
    assert proc.stdout.strip() == "serve: store: TorchServe is not currently running."


def test_one_name_for_the_package_the_script_and_the_docs():
    """The distribution, its console script and the module are all `jobs`; the names it had before
    (a distribution, an unused console script, container and cluster names) appear nowhere."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "jobs" and project["scripts"] == {"jobs": "jobs.cli:run_and_exit"}
    retired = ("image-" + "classifier", "image-" + "job")  # spelled apart: this file must not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = [f"{path}: {name}" for path in tracked if (REPO / path).suffix not in {".jpg", ".png", ".statedict"}
             and (REPO / path).is_file() for name in retired
             if name in (REPO / path).read_text(errors="replace").lower()]
    assert not found, found


@pytest.mark.parametrize("code, status", [(None, 0), (3, 3), ("a message", 1)])
def test_a_jobs_process_ends_as_a_normal_exit_would(tmp_path: Path, code, status: int):
    """``jobs.process.exit_process`` skips the interpreter's teardown, not what a normal exit does before it: a
    thread still writing is waited for, atexit handlers run, output still buffered is flushed, the status is
    sys.exit's."""
    script = f"""
import atexit, threading, time, sys
from pathlib import Path
from jobs.process import exit_process
def slow_write():
    time.sleep(0.5)
    Path({str(tmp_path / "thread.txt")!r}).write_text("done")
threading.Thread(target=slow_write).start()
atexit.register(lambda: Path({str(tmp_path / "atexit.txt")!r}).write_text("ran"))
sys.stdout.write("buffered, no newline")
exit_process({code!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered, no newline"
    assert done.stderr == ("a message\n" if status == 1 else "")
    assert (tmp_path / "thread.txt").read_text() == "done" and (tmp_path / "atexit.txt").read_text() == "ran"
