"""handler/cpus.py: the CPUs a process may use, from JOBS_CPUS, the affinity mask and the cgroup's CPU quota."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from handler.cpus import ENV, CpusSettingError, cgroup_cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota: int, period: int) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


def test_docker_cpus_limit_caps_the_affinity_mask(tmp_path):
    root = cgroup_v2(tmp_path, "150000 100000")  # docker run --cpus 1.5
    assert cgroup_cpu_quota(root) == 1.5
    assert usable_cpus(root) == min(AFFINITY, 2)
    assert usable_cpus(cgroup_v2(tmp_path, "50000 100000")) == 1  # half a CPU still gets one worker


def test_no_quota_leaves_the_affinity_mask(tmp_path):
    assert cgroup_cpu_quota(cgroup_v2(tmp_path / "v2", "max 100000")) is None
    assert cgroup_cpu_quota(cgroup_v1(tmp_path / "v1", -1, 100000)) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None
    assert usable_cpus(tmp_path / "v2") == usable_cpus(tmp_path / "none") == AFFINITY


def test_cgroup_v1_quota(tmp_path):
    root = cgroup_v1(tmp_path, 100000, 100000)
    assert cgroup_cpu_quota(root) == 1.0 and usable_cpus(root) == 1


def test_jobs_cpus_wins_and_rounds_up(tmp_path, monkeypatch):
    root = cgroup_v2(tmp_path, "100000 100000")
    monkeypatch.setenv(ENV, "3")
    assert usable_cpus(root) == 3
    monkeypatch.setenv(ENV, "0.5")
    assert usable_cpus(root) == 1


@pytest.mark.parametrize("value", ["two", "0", "-1", "nan", "inf"])
def test_a_bad_jobs_cpus_is_refused(value, monkeypatch):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(CpusSettingError, match=ENV):
        usable_cpus()


def test_the_cli_says_a_bad_jobs_cpus_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs", "serve-config", "--model-store", str(tmp_path),
                        "--dest", str(tmp_path / "out.properties")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, ENV: "two"})
    assert r.returncode == 2 and r.stderr.startswith(f"error: {ENV}=") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.properties").exists()
