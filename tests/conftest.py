from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = REPO / "tests" / "fixtures" / "hymenoptera_small"
SHARED_HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"


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


SMALL_RUN = ("--weights", "none", "--epochs", "2", "--batch-size", "8", "--min-images-per-class", "3",
             "--num-workers", "0")


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """Real ImageNet EfficientNet-Lite0 weights for ``--arch timm/tf_efficientnet_lite0`` (built offline once)."""
    from scripts.offline_weights import build

    return build(REPO / ".cache" / "weights" / "tf_efficientnet_lite0.pth")
