from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import FIXTURE_IMAGES

from jobs.clean import clean
from jobs.config import RunPaths, load_config
from jobs.split import SplitError, assign, split, target_counts


def _files(n: int, prefix: str = "f") -> list[tuple[str, str]]:
    return [(f"dataset/c/{prefix}{i}.jpg", f"{prefix}{i:04d}sha") for i in range(n)]


def test_counts_are_stratified_and_small_classes_keep_train_and_val():
    assert target_counts(100, 0.1, 0.1) == {"train": 80, "val": 10, "test": 10}
    assert target_counts(2, 0.1, 0.1) == {"train": 1, "val": 1, "test": 0}
    assert target_counts(3, 0.1, 0.1) == {"train": 1, "val": 1, "test": 1}


def test_same_inputs_same_split_and_seed_matters():
    files = _files(50)
    a = assign(files, {}, 42, 0.1, 0.1)
    assert a == assign(list(reversed(files)), {}, 42, 0.1, 0.1)
    assert a != assign(files, {}, 7, 0.1, 0.1)


def test_adding_images_keeps_existing_assignments():
    first = assign(_files(40), {}, 42, 0.1, 0.1)
    second = assign(_files(40) + _files(10, "new"), first, 42, 0.1, 0.1)
    assert all(second[k] == v for k, v in first.items())
    assert sorted(second.values()).count("test") == 5


def test_split_stage_writes_stable_splits_json(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURE_IMAGES, data)
    cfg = load_config(overrides={"min_images_per_class": 3})
    paths = RunPaths(tmp_path / "out")
    clean(cfg, paths, data)
    split(cfg, paths)
    doc = json.loads(paths.splits.read_text())
    assert doc["classes"] == ["ants", "bees"]
    for label in ("ants", "bees"):
        mine = [s for p, s in doc["files"].items() if p.startswith(f"dataset/{label}/")]
        assert sorted(set(mine)) == ["test", "train", "val"]
    before = paths.splits.read_bytes()
    split(cfg, paths)
    assert paths.splits.read_bytes() == before


def _cleaned(tmp_path) -> tuple:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE_IMAGES, data)
    cfg = load_config(overrides={"min_images_per_class": 3})
    paths = RunPaths(tmp_path / "out")
    clean(cfg, paths, data)
    report = json.loads(paths.clean_report.read_text())
    sources = sorted(f["source"] for f in report["files"] if f["status"] != "excluded")
    return cfg, paths, report, sources


def _pair(a: int, b: int, hamming: int, by: list[str]) -> dict:
    return {"a": a, "b": b, "hamming": hamming, "cosine": 0.9, "ratio": 0.2, "by": by,
            "agreed": f"pHash {hamming} bits + cosine 0.90"}


def _write_audit(paths: RunPaths, report: dict, groups: list[dict], label_issues: list | None = None,
                 label_check: dict | None = None) -> None:
    paths.audit.write_text(json.dumps({"near_duplicates": groups, "label_issues": label_issues or [],
                                       "label_check": label_check or {"judged": True},
                                       "data_hash": report["data_hash"]}))


def test_split_excludes_only_cross_class_groups_and_says_why(tmp_path, capsys):
    cfg, paths, report, sources = _cleaned(tmp_path)
    ants = [s for s in sources if s.startswith("ants/")]
    bees = [s for s in sources if s.startswith("bees/")]
    output_of = {f["source"]: f["output"] for f in report["files"]}
    conflict = {"files": [ants[0], ants[1], bees[0]], "classes": ["ants", "bees"], "cross_class": True,
                "pairs": [_pair(0, 1, 2, ["phash"]), _pair(0, 2, 14, ["features"]), _pair(1, 2, 20, ["group_bound"])]}
    within = {"files": [bees[1], bees[2]], "classes": ["bees"], "cross_class": False,
              "pairs": [_pair(0, 1, 4, ["phash"])]}
    _write_audit(paths, report, [conflict, within])
    split(cfg, paths)
    doc = json.loads(paths.splits.read_text())
    assert doc["excluded"] == {output_of[s]: "label_conflict" for s in conflict["files"]}
    why = doc["excluded_why"]
    # each excluded photo names its nearest photo under another class and that pair's measurements
    assert why[output_of[ants[0]]]["near_duplicate_of"] == bees[0] and why[output_of[ants[0]]]["by"] == ["features"]
    assert why[output_of[ants[1]]] == {"near_duplicate_of": bees[0], "agreed": "pHash 20 bits + cosine 0.90",
                                       "by": ["group_bound"], "hamming": 20, "cosine": 0.9, "ratio": 0.2}
    assert why[output_of[bees[0]]]["near_duplicate_of"] in {ants[0], ants[1]}
    assert doc["files"][output_of[bees[1]]] == doc["files"][output_of[bees[2]]]
    assert all(output_of[s] in doc["files"] for s in sources if s not in conflict["files"])
    out = capsys.readouterr().out
    assert ("split: 1 near-duplicate groups kept within one split; 3 files excluded: 3 in cross-class conflicts "
            "(2 by features, 1 by group_bound), 0 label issues") in out, out
    assert (f"split:   {output_of[ants[0]]}: near-duplicate of {bees[0]} under another class "
            "(pHash 14 bits + cosine 0.90; features)") in out


def test_an_audit_without_pairwise_evidence_is_refused(tmp_path):
    cfg, paths, report, sources = _cleaned(tmp_path)
    old = {"files": [sources[0], sources[-1]], "classes": ["ants", "bees"], "cross_class": True, "similarity": 0.98}
    # pairs without the signals that agreed: written before features could veto a pHash-only pair
    unvetted = {**old, "pairs": [{k: v for k, v in _pair(0, 1, 8, ["phash"]).items() if k != "agreed"}]}
    for group in (old, unvetted):
        _write_audit(paths, report, [group])
        with pytest.raises(SplitError, match="without the pairs that justify it .* run `python -m jobs audit"):
            split(cfg, paths)
        assert not paths.splits.exists()


def test_label_issues_are_excluded_only_when_asked_and_judged(tmp_path, capsys):
    cfg, paths, report, sources = _cleaned(tmp_path)
    output_of = {f["source"]: f["output"] for f in report["files"]}
    issue = {"file": sources[0], "given": "ants", "suggested": "bees", "score": 0.97}
    _write_audit(paths, report, [], [issue])
    split(cfg, paths)
    assert json.loads(paths.splits.read_text())["excluded"] == {}  # label_issues: flag
    split(dataclasses.replace(cfg, label_issues="exclude"), paths)
    doc = json.loads(paths.splits.read_text())
    assert doc["excluded"] == {output_of[sources[0]]: "label_issue"}
    assert doc["excluded_why"][output_of[sources[0]]] == {"given": "ants", "suggested": "bees", "score": 0.97}
    reason = "labels not judged: the out-of-fold head reaches 55.0% balanced accuracy"
    _write_audit(paths, report, [], [], {"judged": False, "reason": reason})
    capsys.readouterr()
    split(dataclasses.replace(cfg, label_issues="exclude"), paths)
    assert json.loads(paths.splits.read_text())["excluded"] == {}
    assert f"split: label_issues is 'exclude', but {reason}" in capsys.readouterr().out
