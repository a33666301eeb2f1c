"""`jobs predict` on real batches: files, folders (recursive) and globs in; CSV or JSON lines out; failures named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_IMAGES, run_job
from torchserve_fixture import export_random_model

from jobs.predict import expand_inputs, predict

CLASSES = ["ants", "bees"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("run"), CLASSES).model


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """photos/{ants,bees}/*.jpg, photos/nested/deeper/x.JPG, a broken .jpg and a text file."""
    root = tmp_path / "photos"
    shutil.copytree(FIXTURE_IMAGES, root)
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(next(FIXTURE_IMAGES.glob("ants/*.jpg")), root / "nested" / "deeper" / "x.JPG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_are_searched_recursively_and_globs_expanded(photos: Path):
    found = expand_inputs([photos])
    assert photos / "nested" / "deeper" / "x.JPG" in found and photos / "broken.jpg" in found
    assert photos / "notes.txt" not in found and len(found) == len(set(found))
    assert expand_inputs([str(photos / "ants" / "*.jpg")]) == sorted((photos / "ants").glob("*.jpg"))
    assert expand_inputs([str(photos / "none-*.jpg")]) == [photos / "none-*.jpg"]  # reported, not dropped


def test_batched_answers_equal_one_image_at_a_time(model_dir: Path, photos: Path):
    files = sorted(photos.glob("*/*.jpg"))[:10]
    batched = list(predict(model_dir, files, batch_size=4))
    # decoded on threads, batches ahead of the model: the same answers in the same order, a bad file one row
    threaded = list(predict(model_dir, [*files, photos / "broken.jpg"], batch_size=4, decode_threads=2))
    assert threaded[:-1] == batched and "error" in threaded[-1]
    for f, answer in zip(files, batched, strict=True):
        (alone,) = predict(model_dir, [f], batch_size=1)
        assert answer["file"] == str(f) and answer["predictions"][0]["label"] == alone["predictions"][0]["label"]
        assert answer["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)


@pytest.mark.e2e
def test_cli_writes_a_csv_names_failures_and_exits_1(model_dir: Path, photos: Path, tmp_path: Path):
    out = tmp_path / "preds.csv"
    proc = run_job("predict", "--model-dir", str(model_dir), "--output", str(out), str(photos),
                   str(photos / "missing.jpg"), check=False)
    assert proc.returncode == 1, proc.stderr
    rows = list(csv.DictReader(out.open()))
    n_images = len(list(photos.rglob("*.jpg"))) + len(list(photos.rglob("*.JPG")))
    assert len(rows) == n_images + 1  # every image, the broken one, and the missing file
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.jpg", "missing.jpg"} and "No such file" in errors["missing.jpg"]
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in CLASSES and 0 < float(r["probability"]) <= 1 for r in good)
    assert all(len(json.loads(r["topk"])) == 2 for r in good)
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"predict: {len(good)} images classified") and "2 failed" in summary


@pytest.mark.e2e
def test_cli_json_lines_on_stdout_and_exit_0_when_all_succeed(model_dir: Path, photos: Path, tmp_path: Path):
    proc = run_job("predict", "--model-dir", str(model_dir), "--topk", "1", str(photos / "bees"))
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(list((photos / "bees").glob("*.jpg")))
    assert all(len(line["predictions"]) == 1 and "probabilities" not in line for line in lines)
    jsonl = tmp_path / "preds.jsonl"
    run_job("predict", "--model-dir", str(model_dir), "--output", str(jsonl), str(photos / "bees"))
    assert [json.loads(line)["file"] for line in jsonl.read_text().splitlines()] == [line["file"] for line in lines]


@pytest.mark.e2e
def test_a_folder_without_images_and_a_bad_output_name_are_one_line_each(model_dir: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    proc = run_job("predict", "--model-dir", str(model_dir), str(tmp_path / "empty"), check=False)
    assert proc.returncode == 1 and "is a folder with no images" in proc.stdout
    proc = run_job("predict", "--model-dir", str(model_dir), "--output", str(tmp_path / "p.txt"), str(tmp_path),
                   check=False)
    expected = f"error: --output {tmp_path / 'p.txt'}: name a .csv or .jsonl file"
    assert proc.returncode == 2 and proc.stderr.strip() == expected
