"""The evaluation report: numbers that agree with each other and with training, and a page that renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_IMAGES, TINY_ARCH
from pages import split_counts_from_file
from PIL import Image

from jobs import report
from jobs.clean import clean
from jobs.config import RunPaths, load_config
from jobs.errors import JobError
from jobs.evaluate import MIN_TEST_IMAGES, calibration, compute_metrics, evaluate, wilson_interval
from jobs.fileio import atomic_write_text
from jobs.runtime import setup
from jobs.split import split
from jobs.train import train

CHROMIUM = Path("/usr/bin/chromium")
PNGS = ("curves.png", "confusion_matrix.png", "predictions.png", "training_images.png")
SMALL = {"arch": TINY_ARCH, "weights": "none", "epochs": 2, "finetune_epochs": 1, "feature_views": 2, "batch_size": 8,
         "min_images_per_class": 3, "num_workers": 0}


def _run_all(out: Path, **overrides) -> tuple:
    cfg = load_config(overrides={**SMALL, **overrides})
    paths = RunPaths.for_config(out, cfg)
    atomic_write_text(paths.config, cfg.to_yaml())  # as the CLI does
    rt = setup(cfg)
    clean(cfg, paths, FIXTURE_IMAGES)
    split(cfg, paths)
    train(cfg, paths, rt)
    return cfg, paths, rt


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple:
    cfg, paths, rt = _run_all(tmp_path_factory.mktemp("report") / "run")
    index = evaluate(cfg, paths, rt)
    return cfg, paths, rt, index


def _copy_run(paths: RunPaths, dest: Path) -> RunPaths:
    shutil.copytree(paths.out, dest, symlinks=True)
    shutil.rmtree(dest / "report")
    return RunPaths(dest)


def _metrics(paths: RunPaths) -> dict:
    return json.loads((paths.report / "metrics.json").read_text())


def test_every_report_file_is_written(run):
    _, paths, _, index = run
    assert index == paths.report / "index.html" and index.stat().st_size > 0
    for name in PNGS:
        with Image.open(paths.report / name) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) >= 200, name
    assert set(_metrics(paths)) >= {"accuracy", "per_class", "macro_f1", "confusion_matrix", "most_confused",
                                    "calibration", "predictions", "checkpoint", "count"}


def test_metrics_agree_with_each_other_and_with_training(run):
    _, paths, _, _ = run
    m = _metrics(paths)
    training = json.loads(paths.metrics.read_text())
    cm = np.array(m["confusion_matrix"]["counts"])
    assert m["confusion_matrix"]["labels"] == training["classes"] == ["ants", "bees"]
    assert cm.sum() == m["count"] == training["test_count"] == len(m["predictions"]) == 4
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert m["accuracy"] == pytest.approx(training["test_accuracy"])
    assert m["accuracy"] == pytest.approx(np.mean([p["correct"] for p in m["predictions"]]))
    for i, name in enumerate(m["classes"]):
        s = m["per_class"][name]
        assert s["support"] == cm[i].sum() == sum(p["true"] == name for p in m["predictions"])
        assert s["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
    for p in m["predictions"]:
        assert Path(paths.out / p["file"]).is_file() and 0.5 <= p["probability"] <= 1.0  # argmax of 2 classes
        assert p["correct"] == (p["true"] == p["predicted"])
    assert 0.0 <= m["calibration"]["ece"] <= 1.0 and sum(b["count"] for b in m["calibration"]["table"]) == 4
    assert m["checkpoint"]["file"] == "best.pt" and m["checkpoint"]["best_epoch"] == training["best"]
    right = int(np.trace(cm))
    assert m["accuracy_ci95"] == pytest.approx(list(wilson_interval(right, 4))) == training["test_accuracy_ci95"]
    assert m["accuracy_ci95"][0] < m["accuracy"] < m["accuracy_ci95"][1] or m["accuracy"] in (0.0, 1.0)
    assert f"only 4 images (under {MIN_TEST_IMAGES})" in m["note"]  # 4 test images: a warning, not a verdict


@pytest.mark.parametrize("right, n", [(0, 10), (2, 4), (4, 4), (45, 50), (81, 263), (999, 1000)])
def test_wilson_interval_matches_scipy(right, n):
    from scipy.stats import binomtest

    expected = binomtest(right, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(right, n) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert wilson_interval(0, 0) is None


def test_metric_functions_on_a_worked_example():
    # 3 classes; truth a,a,b,b,c; predictions a,b,b,b,a with known confidences
    probs = np.array([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])
    m = compute_metrics(np.array([0, 0, 1, 1, 2]), probs, ["a", "b", "c"], [f"f{i}" for i in range(5)])
    assert m["confusion_matrix"]["counts"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["most_confused"] == [{"true": "a", "predicted": "b", "count": 1},
                                  {"true": "c", "predicted": "a", "count": 1}]
    # confidences 0.9(right) 0.6(wrong) 0.8(right) 0.7(right) 0.5(wrong), each in its own 1/15-wide bin
    assert m["calibration"]["ece"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3 + 0.5) / 5)


def test_calibration_of_a_perfectly_calibrated_model_is_zero():
    confidence = np.array([0.75] * 4 + [1.0] * 3)
    correct = np.array([1, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert calibration(confidence, correct)["ece"] == pytest.approx(0.0)


def test_curves_mark_the_finetune_stage(run):
    _, paths, _, _ = run
    stages = [e["stage"] for e in json.loads(paths.metrics.read_text())["epochs"]]
    assert stages == ["head", "head", "finetune"]
    pixels = np.asarray(Image.open(paths.report / "curves.png").convert("RGB"))
    shade = tuple(int(report.FINETUNE_SHADE[i:i + 2], 16) for i in (1, 3, 5))
    assert (pixels == shade).all(-1).sum() > 500  # the shaded fine-tune span is drawn


def test_prediction_grid_frames_mistakes_in_red_and_puts_the_worst_first(tmp_path):
    files = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))[:5]
    preds = [{"file": str(f.relative_to(FIXTURE_IMAGES)), "true": f.parent.name, "predicted": f.parent.name,
              "probability": p, "correct": True} for f, p in zip(files, (0.9, 0.6, 0.99, 0.7, 0.8))]
    preds[3].update(predicted="bees", correct=False)
    preds[4].update(predicted="bees", correct=False, probability=0.95)
    assert [p["probability"] for p in report.worst_first(preds)] == [0.95, 0.7, 0.6, 0.9, 0.99]
    png = report.plot_predictions(FIXTURE_IMAGES, preds, tmp_path / "p.png")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (np.abs(pixels - (0xD6, 0x27, 0x28)).sum(-1) < 30).sum()
    assert red > 2000  # two thick red frames


def _chromium(index: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", *args, index.as_uri()],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")
def test_page_renders_in_a_real_browser(run, tmp_path):
    _, paths, _, index = run
    dom = _chromium(index, tmp_path, "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-loaded="true"' in body, body  # every embedded image decoded
    assert f'data-images="{len(PNGS)}"' in body
    accuracy = re.search(r'id="accuracy">([^<]*)<', dom).group(1)
    assert accuracy == f"{100 * _metrics(paths)['accuracy']:.1f}%"
    assert "feature_views: 2" in dom and "ants" in dom  # the run's config and data summary
    shot = tmp_path / "page.png"
    _chromium(index, tmp_path, "--window-size=1280,2000", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20  # not a blank page


def test_empty_test_split_is_reported_not_fatal(run, tmp_path):
    cfg, paths, rt, _ = run
    empty = _copy_run(paths, tmp_path / "run")
    splits = json.loads(empty.splits.read_text())
    splits["files"] = {f: s for f, s in splits["files"].items() if s != "test"}
    empty.splits.write_text(json.dumps(splits))
    index = evaluate(cfg, empty, rt)
    m = _metrics(empty)
    assert m["count"] == 0 and m["accuracy"] is None and "test split" in m["note"]
    assert not (empty.report / "predictions.png").exists()
    assert (empty.report / "curves.png").exists() and (empty.report / "training_images.png").exists()
    page = index.read_text()
    assert 'id="accuracy">n/a<' in page and "test split" in page


def test_falls_back_to_last_checkpoint_and_names_a_missing_one(run, tmp_path):
    cfg, paths, rt, _ = run
    copy = _copy_run(paths, tmp_path / "run")
    (copy.checkpoints / "best.pt").unlink()
    evaluate(cfg, copy, rt)
    assert _metrics(copy)["checkpoint"]["file"] == "last.pt"
    (copy.checkpoints / "last.pt").unlink()
    with pytest.raises(JobError, match="no checkpoint in .*run `python -m jobs train"):
        evaluate(cfg, copy, rt)


def test_training_image_counts_come_from_splits_json(run, tmp_path):
    """More training images than the sheet shows: the page says '16 of 42', not '16 of 16'."""
    _, paths, _, _ = run
    copy = _copy_run(paths, tmp_path / "run")
    splits = json.loads(copy.splits.read_text())
    for i in range(30):  # files the sheet cannot read show as crossed cells; they still count
        splits["files"][f"dataset/ants/extra_{i:02d}.jpg"] = "train"
    copy.splits.write_text(json.dumps(splits))
    page = report.write_report(copy, _metrics(paths)).read_text()
    counts = split_counts_from_file(copy.splits)
    data_table = re.search(r'<table id="data">.*?</table>', page).group(0)
    assert counts["ants"]["train"] == 42
    for name, c in counts.items():
        assert f'<span class="sampled" data-class="{name}">{min(16, c["train"])} of {c["train"]}</span>' in page
        row = re.search(rf"<tr><td>{name}</td>((?:<td>[^<]*</td>)+)</tr>", data_table).group(1)
        assert re.findall(r"<td>([^<]*)</td>", row)[-3:] == [str(c["train"]), str(c["val"]), str(c["test"])]
    assert not (copy.report / "collect_preview.png").exists()


def test_a_data_folder_run_shows_its_folder_and_no_collect_keys(run):
    _, paths, _, index = run
    page = index.read_text()
    assert f'<code id="data-folder">{FIXTURE_IMAGES.resolve()}</code>' in page
    config = re.search(r'<pre id="config">(.*?)</pre>', page, re.S).group(1)
    assert not re.search(r"^(terms|source|images_per_term|licenses|endpoint):", config, re.M)
    assert re.search(r"^epochs: 2$", config, re.M) and 'id="terms"' not in page
    assert "collect_preview" not in page and not (paths.report / "collect_preview.png").exists()


def test_a_collected_run_shows_its_terms_source_and_preview(run, tmp_path):
    _, paths, _, _ = run
    copy = _copy_run(paths, tmp_path / "run")
    raw = copy.raw
    shutil.copytree(FIXTURE_IMAGES, raw)
    report.contact_sheet({c: sorted((raw / c).iterdir()) for c in ("ants", "bees")}, raw / "collect_preview.png")
    (raw / "collect_report.json").write_text(json.dumps({"source": "openverse", "kept": {"ants": 16, "bees": 16}}))
    clean_report = json.loads(copy.clean_report.read_text())
    copy.clean_report.write_text(json.dumps({**clean_report, "data": str(raw.resolve())}))
    page = report.write_report(copy, _metrics(paths)).read_text()
    assert '<b id="collect-source">openverse</b>' in page and '<span id="terms">ants, bees</span>' in page
    assert 'alt="collected images per search term (raw/collect_preview.png)"' in page
    config = re.search(r'<pre id="config">(.*?)</pre>', page, re.S).group(1)
    assert re.search(r"^terms:$", config, re.M)  # a collected run keeps its collect keys


def test_the_new_class_figure_is_said_in_words_with_its_spread_and_whether_it_is_rough():
    new_class = {"flagged": 0.604, "captured": 0.72, "known_flagged": 0.05, "known_captured": 0.12,
                 "capture_below": 0.85,
                 "per_class": {"forest": {"val_images": 20, "flagged": 0.95}, "glacier": {"val_images": 20,
                               "flagged": 0.1}, "street": {"val_images": 20, "flagged": 0.762}}}
    text = re.sub(r"<[^>]+>", "", report._new_class_html(new_class, {"abstain_rate": 0.99}))
    assert text.startswith("A new class like one of yours: about 60% flagged (abstained on; per class left out from "
                           "10.0% for one like glacier to 95.0% for one like forest); 72.0% would be kept by --capture")
    assert "against 12.0% of the known classes' images. Far from the classes (--ood-data): 99.0% flagged." in text
    assert "rough" not in text
    new_class["per_class"]["glacier"]["val_images"] = 3
    assert "on as few as 3 val images per class: a rough figure" in report._new_class_html(new_class, None)
    assert report._new_class_html(None, None) == ""
