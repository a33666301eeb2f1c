"""The audit stage in the job: copies of real photos are grouped and never straddle splits,
cross-class copies are excluded, and a person's decisions are honoured by the next `jobs run`."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_IMAGES, TINY_ARCH, run_job
from PIL import Image, ImageEnhance, ImageOps

from jobs import features
from jobs.config import RunPaths, load_config
from jobs.data import load_splits
from jobs.evaluate import load_trained_model, probabilities_on_test
from jobs.runtime import setup
from jobs.split import assign

pytestmark = pytest.mark.e2e  # whole jobs, servers or torchrun: not in scripts/test.sh --fast

RUN = ("--arch", TINY_ARCH, "--weights", "none", "--epochs", "1", "--batch-size", "8", "--min-images-per-class", "3",
       "--num-workers", "0", "--feature-views", "2")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _save(img: Image.Image, path: Path, **kw) -> str:
    img.save(path, **kw)
    return f"{path.parent.name}/{path.name}"


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> dict:
    """The fixture photos plus injected copies, a cross-class copy and a dark photo, through `jobs run`."""
    root = tmp_path_factory.mktemp("audit")
    data = Path(shutil.copytree(FIXTURE_IMAGES, root / "data"))
    ants, bees = sorted((data / "ants").glob("*.jpg")), sorted((data / "bees").glob("*.jpg"))
    photo = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in ants[:4]]
    copies = {
        f"ants/{ants[0].name}": _save(photo[0].resize((photo[0].width * 6 // 10, photo[0].height * 6 // 10)),
                                      data / "ants" / "copy_resized.jpg"),
        f"ants/{ants[1].name}": _save(photo[1], data / "ants" / "copy_q50.jpg", quality=50),
        f"ants/{ants[2].name}": _save(ImageEnhance.Brightness(photo[2]).enhance(1.2),
                                      data / "ants" / "copy_bright.jpg"),
    }
    dark = _save(ImageEnhance.Brightness(photo[3]).enhance(0.08), data / "ants" / "dark.jpg")
    exact_conflict = (f"ants/{ants[3].name}", "bees/" + shutil.copy(ants[3], data / "bees" / "same_bytes.jpg").name)
    bee = ImageOps.exif_transpose(Image.open(bees[0])).convert("RGB")
    near_conflict = (f"bees/{bees[0].name}", _save(bee.resize((bee.width * 6 // 10, bee.height * 6 // 10)),
                                                   data / "ants" / "bee_in_ants.jpg"))
    before = _snapshot(data)
    out = root / "run"
    first = run_job("run", "--data", str(data), "--out", str(out), *RUN)
    return {"data": data, "out": out, "copies": copies, "dark": dark, "exact_conflict": exact_conflict,
            "near_conflict": near_conflict, "before": before, "first": first}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _split_of(out: Path) -> dict[str, str]:
    """Source path -> split (or why it is in none)."""
    report, splits = _json(out / "clean_report.json"), _json(out / "splits.json")
    return {f["source"]: splits["files"].get(f["output"]) or splits.get("excluded", {}).get(f["output"])
            or f["reason"] for f in report["files"]}


def test_injected_copies_are_grouped_and_kept_within_one_split(audited):
    audit, where = _json(audited["out"] / "audit.json"), _split_of(audited["out"])
    groups = [set(g["files"]) for g in audit["near_duplicates"] if not g["cross_class"]]
    for original, copy in audited["copies"].items():
        assert any({original, copy} <= g for g in groups), (original, copy, groups)
        assert where[original] == where[copy] and where[copy] in {"train", "val", "test"}
    assert (audited["out"] / "report" / "review.html").is_file()


def test_cross_class_copies_are_conflicts_excluded_from_every_split(audited):
    audit, where = _json(audited["out"] / "audit.json"), _split_of(audited["out"])
    cross = [set(g["files"]) for g in audit["near_duplicates"] if g["cross_class"]]
    for pair in (audited["exact_conflict"], audited["near_conflict"]):
        assert any(set(pair) <= g for g in cross), (pair, cross)
        assert {where[f] for f in pair} == {"label_conflict"}
    reasons = {f["source"]: f["reason"] for f in _json(audited["out"] / "clean_report.json")["files"]}
    assert {reasons[f] for f in audited["exact_conflict"]} == {"label_conflict"}  # not kept in the first class
    # split left out only the near conflict's two photos (clean already left out the exact one), each with
    # the photo under the other class that justifies it, and said so
    splits, report = _json(audited["out"] / "splits.json"), _json(audited["out"] / "clean_report.json")
    source_of = {f["output"]: f["source"] for f in report["files"] if f["output"]}
    original, copy = audited["near_conflict"]
    assert {source_of[p]: w["near_duplicate_of"] for p, w in splits["excluded_why"].items()} == {
        original: copy, copy: original}
    assert all(w["agreed"].endswith(" alone (features too weak to judge)") for w in splits["excluded_why"].values())
    assert "2 files excluded: 2 in cross-class conflicts (2 by phash), 0 label issues" in audited["first"].stdout


def test_random_weights_flag_no_label_issues_and_say_why(audited):
    audit = _json(audited["out"] / "audit.json")
    assert audit["label_issues"] == [] and audit["estimated_noise"] == {}
    assert not audit["label_check"]["judged"] and audit["label_check"]["skill"] < audit["settings"]["min_label_skill"]
    assert f"audit: {audit['label_check']['reason']}" in audited["first"].stdout
    assert "too weak to tell a wrong label from a hard photo" in audit["label_check"]["reason"]
    page = (audited["out"] / "report" / "review.html").read_text()
    assert "estimated label noise: not estimated (labels not judged: the out-of-fold head reaches" in page
    # nor are such features evidence that two photos are one: the copies above were found by pHash alone
    assert not audit["settings"]["near_duplicates_by_features"]
    assert all(p["by"] in (["phash"], ["pixels"]) for g in audit["near_duplicates"] for p in g["pairs"])


def test_darkened_photos_are_flagged(audited):
    issues = {i["file"]: i["issues"] for i in _json(audited["out"] / "audit.json")["image_issues"]}
    assert "dark" in issues[audited["dark"]]


def test_evaluate_scores_the_head_on_the_test_features_the_audit_cached(audited):
    """The head stage leaves the backbone as the audit ran it: evaluate sends no test image through it again, and
    its numbers are those of the whole model on the images."""
    out = audited["out"]
    assert re.search(r"^evaluate: the test split's \d+ images scored on their cached backbone features \(the "
                     r"backbone never trained\); none went through the backbone again$", audited["first"].stdout, re.M)
    assert "features: test:" not in audited["first"].stdout
    metrics = _json(out / "report" / "metrics.json")
    assert metrics["checkpoint"]["backbone_trained"] is False
    paths = RunPaths(out)
    cfg, splits = load_config(paths.config), load_splits(paths)
    model, checkpoint, trained = load_trained_model(paths, splits["classes"])
    on_images = probabilities_on_test(model, {**checkpoint, "backbone_trained": True}, trained, paths, splits,
                                      setup(cfg), cfg)
    given = metrics["predictions"]
    assert len(given) == len(on_images) > 0
    assert [p["predicted"] for p in given] == [splits["classes"][i] for i in on_images.argmax(1)]
    assert np.abs(np.array([p["probability"] for p in given]) - on_images.max(1)).max() < 0.01
    # Trained from a weights file that is gone: no key names those features, so evaluate reads the images.
    gone = dataclasses.replace(cfg, weights=str(out / "gone.pth"))
    hashes = list(features.content_hashes(paths).values())
    assert features.cached_eval_features(cfg, paths, setup(cfg), 2, hashes) is not None
    assert features.cached_eval_features(gone, paths, setup(cfg), 2, hashes) is None


@pytest.mark.parametrize("seed", range(40))
def test_no_near_duplicate_group_ever_straddles_splits(seed: int):
    """Property: random groups, fractions, earlier assignments and added images, over many seeds."""
    rng = random.Random(seed)
    files = [(f"dataset/c/{i}.jpg", f"{rng.getrandbits(64):016x}") for i in range(rng.randint(3, 80))]
    group_of = {path: rng.randrange(len(files) // 2 + 1) for path, _ in files if rng.random() < 0.6}
    val, test = rng.choice([0.1, 0.2, 0.3]), rng.choice([0.0, 0.1, 0.2])
    previous = {path: rng.choice(["train", "val", "test"]) for path, _ in files if rng.random() < 0.5}
    for assigned in (assign(files, {}, seed, val, test, group_of), assign(files, previous, seed, val, test, group_of)):
        for gid in set(group_of.values()):
            assert len({assigned[p] for p, g in group_of.items() if g == gid}) == 1
    kept = assign(files, previous, seed, val, test, group_of)
    for path, split in previous.items():  # earlier assignments carry over where they break no group
        members = [p for p, g in group_of.items() if g == group_of.get(path)] if path in group_of else [path]
        if len({previous.get(p) for p in members if p in previous}) == 1:
            assert kept[path] == split


def _passes(output: str, what: str) -> tuple[int, int]:
    m = re.search(rf"features: {what}: \d+ images x \d+ views, (\d+) backbone passes in [\d.]+ s "
                  r"\((\d+) images not", output)
    assert m, output[-3000:]
    return int(m.group(1)), int(m.group(2))


def test_above_audit_exact_max_the_stage_searches_the_index_and_finds_the_same_groups(audited, tmp_path):
    """The audit alone, rerun on a copy of the run's cleaned photos and cached features with the threshold at 0."""
    out = tmp_path / "run"
    for name in ("dataset", "cache"):
        shutil.copytree(audited["out"] / name, out / name)
    for name in ("clean_report.json", "config.yaml"):
        shutil.copy(audited["out"] / name, out / name)
    proc = run_job("audit", "--out", str(out), "--audit-exact-max", "0")
    exact, approximate = _json(audited["out"] / "audit.json"), _json(out / "audit.json")
    assert exact["settings"]["neighbour_search"]["method"] == "exact"
    assert approximate["settings"]["neighbour_search"]["method"] == "faiss IndexHNSWFlat, inner product"
    assert "audit_exact_max 0: nearest neighbours from a faiss IndexHNSWFlat, inner product index" in proc.stdout
    assert approximate["near_duplicates"] == exact["near_duplicates"]
    assert approximate["outliers"] == exact["outliers"]


def test_decisions_are_honoured_by_the_next_run_and_the_input_is_untouched(audited, tmp_path):
    out, data = audited["out"], audited["data"]
    ants, bees = sorted((data / "ants").glob("[0-9]*.jpg")), sorted((data / "bees").glob("[0-9]*.jpg"))
    excluded, relabelled, kept = f"ants/{ants[5].name}", f"bees/{bees[5].name}", audited["exact_conflict"][0]
    first_splits, first_report = _json(out / "splits.json"), _json(out / "clean_report.json")
    decisions = tmp_path / "decisions.json"
    decisions.write_text(json.dumps({"exclude": [excluded], "relabel": {relabelled: "ants"}, "keep": [kept]}))
    proc = run_job("run", "--data", str(data), "--out", str(out), "--decisions", str(decisions), *RUN)
    assert "clean: decisions: 1 excluded, 1 relabelled, 1 kept" in proc.stdout
    assert _snapshot(data) == audited["before"]  # the input folder is never touched

    report = {f["source"]: f for f in _json(out / "clean_report.json")["files"]}
    splits = _json(out / "splits.json")
    assert (report[excluded]["status"], report[excluded]["reason"]) == ("excluded", "decision")
    assert report[relabelled]["label"] == "ants" and report[relabelled]["output"].startswith("dataset/ants/")
    assert report[relabelled]["output"] in splits["files"]
    assert report[kept]["status"] == "kept" and splits["files"].get(report[kept]["output"]) in {"train", "val", "test"}
    assert report[audited["exact_conflict"][1]]["reason"] == "label_conflict"  # the other copy stays out
    # Everything else keeps its split.
    old_output = {f["source"]: f["output"] for f in first_report["files"]}
    moved = {s for s, f in report.items() if f["output"] in splits["files"] and old_output.get(s) in
             first_splits["files"] and splits["files"][f["output"]] != first_splits["files"][old_output[s]]}
    assert moved <= {relabelled}

    # The review loop is fast: no image the first run already ran through the backbone runs again.
    assert _passes(proc.stdout, "audit") == (1, 1)  # only the copy that was excluded before and is now kept
    old_train = {f["sha256"] for f in first_report["files"] if first_splits["files"].get(f["output"]) == "train"}
    new_train = {f["sha256"] for f in report.values() if splits["files"].get(f["output"]) == "train"}
    assert _passes(proc.stdout, "train")[1] == len(new_train - old_train)
    assert _passes(proc.stdout, "val")[1] == 0


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"exclude": "ants/a.jpg"}', "exclude must be a list of file paths"),
    ('{"relabel": {"ants/a.jpg": "wasps"}}', "unknown class 'wasps' in relabel; the run's classes are ants, bees"),
    ('{"remove": []}', "unknown key 'remove'"),
])
def test_bad_decisions_are_one_line_and_change_nothing(prepared_run, content: str, message: str):
    out = prepared_run("run")
    report = (out / "clean_report.json").read_bytes()
    (out / "decisions.json").write_text(content)
    proc = run_job("clean", "--data", str(FIXTURE_IMAGES), "--out", str(out), "--min-images-per-class", "3",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert (out / "clean_report.json").read_bytes() == report


def test_a_decision_for_a_file_no_longer_there_is_reported_and_skipped(tmp_path: Path, small_data: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "decisions.json").write_text(json.dumps({"exclude": ["ants/gone.jpg"]}))
    proc = run_job("clean", "--data", str(small_data), "--out", str(out), "--min-images-per-class", "3")
    assert "clean: decisions: 1 for files no longer in the data, skipped: ants/gone.jpg" in proc.stdout
