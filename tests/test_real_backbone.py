"""The job on real ImageNet features (EfficientNet-Lite0 from timm): its judgments are the ones a user gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from conftest import run_job
from torchserve_fixture import unused_ports

from jobs.predict import predict
from jobs.serve import start
from jobs.train import is_better

ARCH = "timm/tf_efficientnet_lite0"


def test_the_kept_epoch_has_the_lowest_val_loss_and_ties_go_to_accuracy():
    first = {"val_loss": 0.60, "val_accuracy": 0.9375}
    assert is_better({"val_loss": 0.30, "val_accuracy": 0.9375}, first)  # the same accuracy, a lower loss
    assert not is_better({"val_loss": 0.61, "val_accuracy": 1.0}, first)
    assert is_better({"val_loss": 0.60, "val_accuracy": 1.0}, first)  # a tie on loss: accuracy decides
    assert not is_better({"val_loss": None, "val_accuracy": None}, {})  # no val images: never "best"
    assert is_better(first, {})


def dominated(best: dict, epochs: list[dict]) -> list[dict]:
    """The epochs that beat ``best`` on both val accuracy and val loss."""
    return [e for e in epochs if e["val_accuracy"] > best["val_accuracy"] and e["val_loss"] < best["val_loss"]]


@pytest.mark.slow
def test_the_whole_job_on_hymenoptera_is_accurate_keeps_a_good_epoch_and_serves_what_predict_says(
        shared_hymenoptera: Path, real_weights: Path, tmp_path: Path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for class_dir in (shared_hymenoptera / split).iterdir():
            (data / class_dir.name).mkdir(parents=True, exist_ok=True)
            for f in class_dir.iterdir():
                shutil.copy(f, data / class_dir.name / f"{split}_{f.name}")
    out = tmp_path / "run"
    run_job("run", "--data", str(data), "--out", str(out), "--arch", ARCH, "--weights", str(real_weights),
            "--epochs", "10", timeout=3600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.92, metrics["test_accuracy"]
    assert not dominated(metrics["best"], metrics["epochs"])
    assert metrics["selection"].startswith("lowest val loss")

    photos = sorted(data.glob("*/*.jpg"))[::25]
    offline = list(predict(out / "model", photos))
    server = start(out / "model-store", tmp_path / "state", ports=unused_ports())
    try:
        server.wait_ready(["classifier"], timeout=300)
        for photo, reference in zip(photos, offline, strict=True):
            r = requests.post(f"{server.inference_url}/predictions/classifier", data=photo.read_bytes(),
                              headers=server.auth(), timeout=60)
            assert r.status_code == 200, r.text
            for p in r.json()["predictions"]:
                assert p["probability"] == pytest.approx(reference["probabilities"][p["index"]], abs=1e-4)
    finally:
        server.stop()
