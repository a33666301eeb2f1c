from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from torchserve_fixture import TINY_ARCH

pytest_plugins = ["suite_time"]  # the warning line when the suite runs long (tests/suite_time.py)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = REPO / "tests" / "fixtures" / "hymenoptera_small"
SHARED_HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"


T = TypeVar("T")


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float, every_s: float = 0.2) -> T:
    """``read()`` again every ``every_s`` until ``done`` holds for what it read or ``timeout_s`` has passed; returns
    the last reading, which the caller asserts on. For what a server writes a moment after its answer: a metric, a
    log line, a capture."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return value


def run_job(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m jobs ARGS`` as a real subprocess; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"jobs {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def fixture_images() -> Path:
    return FIXTURE_IMAGES


@pytest.fixture(scope="session")
def shared_hymenoptera() -> Path:
    if not SHARED_HYMENOPTERA.is_dir():
        pytest.skip(f"{SHARED_HYMENOPTERA} not present (real-data test)")
    return SHARED_HYMENOPTERA


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """A private, writable copy of the fixture photos: data/<class>/*.jpg."""
    dest = tmp_path / "data"
    shutil.copytree(FIXTURE_IMAGES, dest)
    return dest


SMALL_RUN = ("--arch", TINY_ARCH, "--weights", "none", "--epochs", "2", "--batch-size", "8",
             "--min-images-per-class", "3", "--num-workers", "0")


def copy_run(template: Path, dest: Path) -> Path:
    """A private, writable copy of a run folder that a session fixture made once."""
    return Path(shutil.copytree(template, dest, symlinks=True))


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory) -> Path:
    """The fixture photos through `jobs clean` and `jobs split`, once a session; tests write only into copies
    (``prepared_run``). Clean and split read nothing but ``--data`` and the run folder, so a copy is what the
    same two commands would leave in a folder of its own."""
    out = tmp_path_factory.mktemp("prepared") / "run"
    run_job("clean", "--data", str(FIXTURE_IMAGES), "--out", str(out), "--min-images-per-class", "3")
    run_job("split", "--out", str(out))
    return out


@pytest.fixture
def prepared_run(prepared_template: Path, tmp_path: Path):
    """``prepared_run(name)``: a fresh copy of the cleaned and split fixture under this test's tmp_path."""
    return lambda name: copy_run(prepared_template, tmp_path / name)


@pytest.fixture(scope="session")
def finished_template(tmp_path_factory) -> Path:
    """One whole `jobs run` over the fixture photos (SMALL_RUN), once a session; tests that write into a
    finished run take a copy (``finished_run``)."""
    root = tmp_path_factory.mktemp("finished")
    data = Path(shutil.copytree(FIXTURE_IMAGES, root / "data"))
    proc = run_job("run", "--data", str(data), "--out", str(root / "run"), *SMALL_RUN)
    assert "done:" in proc.stdout
    return root / "run"


@pytest.fixture
def finished_run(finished_template: Path, tmp_path: Path) -> Path:
    return copy_run(finished_template, tmp_path / "run")


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """Real ImageNet EfficientNet-Lite0 weights for ``--arch timm/tf_efficientnet_lite0`` (built offline once)."""
    from scripts.offline_weights import build

    return build(REPO / ".cache" / "weights" / "tf_efficientnet_lite0.pth")



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with long tests first (slow, then e2e), each file kept whole (its module fixtures are made once):
    under scripts/test.sh's two workers the last files handed out are short ones, so neither waits long for the
    other at the end."""
    def weight(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2

    file_weight: dict[Path, int] = {}
    for item in items:
        file_weight[item.path] = min(weight(item), file_weight.get(item.path, 2))
    items.sort(key=lambda item: file_weight[item.path])
