"""Calibrated probabilities and "none of these", end to end: export fits them, evaluate reports them, the
served answer (here `jobs predict`; tests/test_torchserve.py over HTTP) carries them. On the real
EfficientNet-Lite0 features: ant/bee fixture photos as the classes, generated pictures as none of them."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import SMALL_RUN, run_job

from bench.trust import generated_image
from jobs.predict import predict

pytestmark = pytest.mark.e2e  # whole jobs, servers or torchrun: not in scripts/test.sh --fast

ARCH = "timm/tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fixture_images: Path, real_weights: Path) -> dict:
    root = tmp_path_factory.mktemp("unknown")
    shutil.copytree(fixture_images, root / "data")
    ood = root / "none-of-these"
    ood.mkdir()
    for i in range(18):
        kind, image = generated_image(i)
        image.save(ood / f"{i:02d}-{kind}.png")
    (ood / "broken.jpg").write_bytes(b"not an image")
    overrides = dict(zip(SMALL_RUN[::2], SMALL_RUN[1::2]))
    # A fine-tune epoch and int8 too: every stage takes a timm model, or says in one line why not.
    overrides.update({"--arch": ARCH, "--weights": str(real_weights), "--epochs": "4", "--finetune-epochs": "1",
                      "--serve-precision": "int8"})
    proc = run_job("run", "--data", str(root / "data"), "--out", str(root / "run"), "--ood-data", str(ood),
                   *[x for kv in overrides.items() for x in kv], timeout=1800)
    return {"run": root / "run", "ood": ood, "stdout": proc.stdout}


def test_a_timm_model_fine_tunes_and_int8_says_in_one_line_whether_it_is_offered(finished):
    epochs = json.loads((finished["run"] / "metrics.json").read_text())["epochs"]
    assert [e["stage"] for e in epochs] == ["head"] * 4 + ["finetune"]
    assert re.search(r"^export: int8 (not offered for timm/tf_efficientnet_lite0: |loses )", finished["stdout"], re.M)


def test_export_records_the_temperature_the_bank_and_the_threshold_and_the_archive_carries_them(finished):
    run = finished["run"]
    meta = json.loads((run / "model" / "metadata.json").read_text())
    entry = meta["trust"]
    assert entry["score"] == "knn" and entry["keep"] == 0.95 and entry["temperature"] > 0
    assert entry["fit_on"]["train_images"] > 0 and entry["fit_on"]["val_images"] > 0
    new_class = entry["new_class"]  # ants left out against a model of bees, and bees against ants
    assert set(new_class["per_class"]) == {"ants", "bees"} and new_class["capture_below"] == 0.85
    assert 0.0 <= new_class["flagged"] <= new_class["captured"] <= 1.0
    assert re.search(r"^export: a new class like one of yours: about \d+% flagged", finished["stdout"], re.M)
    with zipfile.ZipFile(run / "model-store" / "classifier.mar") as z:
        assert z.read(entry["file"]) == (run / "model" / entry["file"]).read_bytes()
        assert "handler/trust.py" in z.namelist()


def test_the_report_measures_unknown_inputs(finished):
    run = finished["run"]
    served = json.loads((run / "report" / "metrics.json").read_text())["trust"]
    ood = served["ood_data"]
    assert ood["images"] == 18 and ood["unreadable"] == 1
    assert ood["abstain_rate"] >= 0.9 and ood["auroc"] >= 0.9, ood
    assert served["test"]["images"] > 0 and served["calibration"]["ece"] is not None
    page = (run / "report" / "index.html").read_text()
    assert "Unknown inputs" in page and 'id="unknown-inputs"' in page and 'id="ece-served"' in page
    flagged = round(100 * served["new_class"]["flagged"])
    assert f"A new class like one of yours: about {flagged}% flagged" in page
    assert "an optimistic figure: a model of fewer classes notices more" in page  # two classes: not carried on
    assert f"Far from the classes (<code>--ood-data</code>): {100 * ood['abstain_rate']:.1f}% flagged" in page
    assert (run / "report" / "reliability.png").is_file() and (run / "report" / "unknown_ood_abstained.png").is_file()
    review = (run / "report" / "review.html").read_text()  # the abstained test images, one card each
    abstained_cards = review.split('<section id="abstained">')[1:]
    assert [s.split("</section>")[0].count('<div class="card"') for s in abstained_cards] == \
        ([served["test"]["abstained"]] if served["test"]["abstained"] else [])


def test_answers_carry_calibrated_probabilities_an_ood_score_and_abstain_with_its_reason(finished, fixture_images):
    model = finished["run"] / "model"
    before = sorted(p.name for p in model.iterdir())
    photos = sorted(fixture_images.glob("*/*.jpg"))[:4]
    generated = sorted(finished["ood"].glob("*.png"))[:6]
    answers = list(predict(model, photos + generated))
    assert sorted(p.name for p in model.iterdir()) == before  # read-only
    for a in answers:
        assert set(a) >= {"predictions", "ood_score", "abstain", "abstain_reason"}
        assert sum(a["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert a["abstain"] == (a["abstain_reason"] is not None)
    unlike = [a for a in answers[len(photos):] if a["abstain_reason"] == "unlike the training images"]
    assert len(unlike) >= 5
    assert max(a["ood_score"] for a in answers[:len(photos)]) < min(a["ood_score"] for a in unlike)
