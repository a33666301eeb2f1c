from __future__ import annotations

import json
import shutil

from conftest import FIXTURE_IMAGES

from jobs.clean import clean
from jobs.config import RunPaths, load_config
from jobs.split import assign, split, target_counts


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
