"""The suite's time warning (tests/suite_time.py), in a real pytest session of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# Six tests that take 0, 0.05, ..., 0.25 s: the five slowest are all but test_0, slowest first.
SLEEPY = "import time\n\n" + "".join(f"def test_{i}():\n    time.sleep({i * 0.05})\n\n\n" for i in range(6))


def _session(tmp_path: Path, warn_minutes: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["suite_time"]\n')
    (tmp_path / "test_sleepy.py").write_text(SLEEPY)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    env.pop("JOBS_SUITE_WARN_MINUTES", None)
    if warn_minutes is not None:
        env["JOBS_SUITE_WARN_MINUTES"] = warn_minutes
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_session_over_the_limit_names_its_five_slowest_tests_and_still_passes(tmp_path: Path):
    proc = _session(tmp_path, "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("warning: the suite took")]
    assert "over 0;" in line
    named = line.split("the five slowest tests: ", 1)[1].split(", ")
    assert [n.split(" (")[0].rsplit("::", 1)[1] for n in named] == ["test_5", "test_4", "test_3", "test_2", "test_1"]


def test_a_session_within_the_limit_or_without_one_prints_no_warning(tmp_path: Path):
    for limit in ("60", None):
        proc = _session(tmp_path, limit)
        assert proc.returncode == 0 and "6 passed" in proc.stdout, proc.stdout + proc.stderr
        assert "warning: the suite took" not in proc.stdout
