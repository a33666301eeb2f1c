"""Offline is one clear line, before any work: weights that cannot be fetched and an image source that
cannot be reached stop a command at its start (exit 2, one line naming the offline way, nothing printed
or written before it); what is already cached, or already collected, goes ahead without the network.

"Offline" here is real: every download goes through a proxy on a loopback port that nothing listens on
(urllib, requests and huggingface_hub all honour *_proxy), with fresh weight caches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_IMAGES, REPO, run_job
from fake_image_api import FakeImageAPI
from torchvision import models

from jobs import api, preflight
from jobs.config import load_config


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline(tmp_path: Path) -> dict[str, str]:
    """Environment of a machine without internet: downloads refused, empty TORCH_HOME and HF cache."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    return {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "no_proxy": "",
            "NO_PROXY": "", "TORCH_HOME": str(tmp_path / "torch-home"), "HF_HOME": str(tmp_path / "hf-home")}


def assert_one_line_before_any_work(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout == "", f"printed before the check: {proc.stdout[:500]}"
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert not out.exists(), "the run folder was written before the check"


def test_default_imagenet_weights_offline(tmp_path: Path, offline: dict[str, str]):
    out = tmp_path / "run"
    proc = run_job("run", "--data", str(FIXTURE_IMAGES), "--out", str(out), env=offline, check=False)
    assert_one_line_before_any_work(
        proc, out, "cannot download the ImageNet weights for resnet18", "refused through the proxy",
        "https://download.pytorch.org/models/resnet18-", "--weights none", "offline_weights.py",
        "--arch timm/tf_efficientnet_lite0 --weights weights/tf_efficientnet_lite0.pth")


def test_timm_weights_from_the_hub_offline(tmp_path: Path, offline: dict[str, str]):
    out = tmp_path / "run"
    proc = run_job("train", "--out", str(out), "--arch", "timm/tf_efficientnet_lite0", env=offline, check=False)
    assert_one_line_before_any_work(proc, out, "ImageNet weights for timm/tf_efficientnet_lite0",
                                    "https://huggingface.co/timm/tf_efficientnet_lite0", "--weights none")


def test_hf_hub_offline_is_named(tmp_path: Path, offline: dict[str, str]):
    out = tmp_path / "run"
    proc = run_job("audit", "--out", str(out), "--arch", "timm/tf_efficientnet_lite0",
                   env={**offline, "HF_HUB_OFFLINE": "1"}, check=False)
    assert_one_line_before_any_work(proc, out, "HF_HUB_OFFLINE is set", "offline_weights.py")


def test_a_missing_weights_file_is_named_before_clean(tmp_path: Path):
    out = tmp_path / "run"
    proc = run_job("run", "--data", str(FIXTURE_IMAGES), "--out", str(out), "--weights", str(tmp_path / "no.pth"),
                   check=False)
    assert_one_line_before_any_work(proc, out, f"weights file {tmp_path / 'no.pth'} not found")


@pytest.mark.e2e
def test_torchvision_weights_in_torch_home_need_no_network(tmp_path: Path, offline: dict[str, str], small_data: Path):
    """The file the check looks for is the one torchvision loads: with it in TORCH_HOME the whole job runs
    offline with --weights imagenet (a download attempt would fail on the closed proxy)."""
    url = models.get_model_weights("resnet18").DEFAULT.url
    cached = Path(offline["TORCH_HOME"]) / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.resnet18().state_dict(), cached)
    # Served on torch: the ONNX export and the engines' check are test_backends.py's subject, not this test's.
    proc = run_job("run", "--data", str(small_data), "--out", str(tmp_path / "run"), "--weights", "imagenet",
                   "--epochs", "1", "--batch-size", "8", "--min-images-per-class", "3", "--num-workers", "0",
                   "--feature-views", "1", "--serve-backend", "torch", env=offline)
    assert "done:" in proc.stdout and "resnet18 with ImageNet weights" in proc.stdout


def test_timm_weights_in_the_hf_cache_need_no_network(tmp_path: Path, offline: dict[str, str], real_weights: Path):
    """A Hugging Face cache that holds the weights passes the check, and timm then loads them from that
    very cache with the network closed."""
    code = f"""
import safetensors.torch, timm, torch
from huggingface_hub import constants
from pathlib import Path
repo = timm.models.get_pretrained_cfg("tf_efficientnet_lite0").hf_hub_id
snapshot = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
snapshot.mkdir(parents=True)
(snapshot.parents[1] / "refs").mkdir()
(snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
safetensors.torch.save_file(torch.load({str(real_weights)!r}, weights_only=True), str(snapshot / "model.safetensors"))
from jobs import preflight
preflight.check_weights("timm/tf_efficientnet_lite0", "imagenet")
model = timm.create_model("tf_efficientnet_lite0", pretrained=True)
print("loaded", float(model.conv_stem.weight.abs().sum()) > 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **offline},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded True" in proc.stdout, proc.stderr[-3000:]


def test_an_unreachable_image_source_stops_collect_and_run(tmp_path: Path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for command in (["collect"], ["run", "--weights", "none"]):
        out = tmp_path / command[0]
        proc = run_job(*command, "--out", str(out), "--terms", "ants,bees", "--endpoint", endpoint, check=False)
        assert_one_line_before_any_work(proc, out, "cannot reach the image source openverse", "refused",
                                        f"{endpoint}/v1/images/", "--data DIR")


def test_a_finished_collect_is_rerun_offline_and_a_short_one_is_not(tmp_path: Path):
    """A re-run whose terms already have their images searches nothing, so it needs no network."""
    keys = {"terms": "ants,bees", "images_per_term": 3, "allow_private_addresses": True, "requests_per_minute": 600}
    with FakeImageAPI(FIXTURE_IMAGES) as server:
        endpoint = server.url
        assert api.collect(tmp_path, endpoint=endpoint, **keys)["kept"] == {"ants": 3, "bees": 3}
    again = api.collect(tmp_path, endpoint=endpoint, **keys)  # the server is gone
    assert again["kept"] == {"ants": 3, "bees": 3}
    with pytest.raises(preflight.OfflineError, match="cannot reach the image source openverse"):
        api.collect(tmp_path, endpoint=endpoint, **{**keys, "images_per_term": 4})


def test_the_check_is_quick_and_downloads_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port()}")
    cfg = load_config(None, {"weights": "imagenet"})
    started = time.monotonic()
    with pytest.raises(preflight.OfflineError):
        preflight.check_weights(cfg.arch, cfg.weights)
    assert time.monotonic() - started < preflight.CONNECT_TIMEOUT_S
    assert not any(tmp_path.rglob("*")), "the check wrote into TORCH_HOME"
