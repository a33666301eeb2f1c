"""Caching backbone features must not cost accuracy: the cached head stage vs the full loop.

The exact checks, here: the cached features ARE the full model's features, image by image and label by
label, so a head on them computes exactly what the full model computes; both paths step the same lr
schedule; and each cached row is one of its own image's views with its label, drawn afresh every epoch. The
only thing left that differs between the paths is augmentation sampling (``feature_views`` fixed views per
image vs a fresh one every epoch).

Whether that sampling costs accuracy is a statistical claim, so it is measured, not tested:
``bench/parity_sweep.py`` trains both paths on real photos (hymenoptera) with the same backbone, split and
seed, over seeds (bench/results/parity_sweep-cpu.json, 6 seeds: cached - full was 0.0 points on val and +2.9
on test on average, standard errors 1.2 and 1.4). A single run cannot resolve it: runs differed by -4..+2 of
77 val images and -1..+5 of 76 test images, as a head on ~75%-accurate features changes several borderline
images with any change of sampling. (It was a 100-second test here until the exact checks above covered
what a broken cached path would get wrong.)

The backbone. ImageNet weights cannot be downloaded here. A seeded random ResNet-18 whose BatchNorm layers
alone were trained on hymenoptera ``train/`` (``bench.common.train_batchnorm_only``, 300 epochs on a GPU) is
the fixed backbone: the fixture holds only the BN layers (~100 KB) and the seed; the convolutions are
regenerated from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_IMAGES

from bench.common import bn_backbone, conv_fingerprint
from bench.parity_sweep import BN_BACKBONE, train_both
from handler.model import preprocess_spec
from handler.preprocess import Preprocessor
from jobs import features
from jobs.clean import clean
from jobs.config import RunPaths, load_config
from jobs.data import split_items
from jobs.model import build_model, split_backbone_head
from jobs.runtime import setup
from jobs.split import split
from jobs.train import FeatureBatches, Stage, lr_factor

pytestmark = pytest.mark.e2e  # whole jobs, servers or torchrun: not in scripts/test.sh --fast

SEED = 42


def test_bn_fixture_fits_this_torch():
    saved = torch.load(BN_BACKBONE, weights_only=True)
    assert conv_fingerprint(saved["seed"]) == pytest.approx(saved["conv_fingerprint"], rel=1e-9), (
        "torch.manual_seed + torchvision.models.resnet18() no longer give the convolutions the BN layers in "
        f"{BN_BACKBONE.name} were trained with; regenerate it with bench.common.train_batchnorm_only")


# How far cached features may be from an fp32 forward of the unfolded model, by the precision the
# extraction ran in. fp32: rounding of the BatchNorm folding only. bf16 (8-bit mantissa): about 2^-8
# relative per op, so the tolerance is relative to the features' scale; measured on the fixture
# (emulated bf16 on an AMD EPYC without AVX512-BF16, and native on a Xeon with AMX: the max
# difference was 0.05 on features of magnitude ~1-3).
TOLERANCES = {"fp32": {"rtol": 1e-4, "atol": 1e-4}, "bf16": {"rtol": 5e-2, "atol": 1e-1}}


@pytest.mark.parametrize("arch,precision", [("resnet18", "fp32"), ("resnet18", "bf16"),
                                            ("timm/tf_efficientnet_lite0", "fp32")])
def test_cached_features_are_the_full_models_features(tmp_path: Path, arch: str, precision: str, real_weights: Path):
    """Both precisions run on every machine: bf16 autocast is emulated where the CPU lacks it."""
    weights = real_weights if arch.startswith("timm/") else bn_backbone(BN_BACKBONE, tmp_path / "backbone.pt")
    cfg = load_config(overrides={"arch": arch, "weights": str(weights), "min_images_per_class": 3,
                                 "feature_views": 2, "num_workers": 0, "seed": SEED, "precision": precision})
    paths = RunPaths(tmp_path / "run")
    clean(cfg, paths, FIXTURE_IMAGES)
    splits = json.loads(split(cfg, paths).read_text())
    rt = setup(cfg)
    assert rt.amp_dtype == {"fp32": None, "bf16": torch.bfloat16}[precision]
    model = build_model(cfg.arch, 2, cfg.weights).eval()
    backbone, head = split_backbone_head(model)
    feats, labels = features.load_or_extract(cfg, paths, rt, backbone, splits, "train")
    items = split_items(splits, "train")
    assert feats.shape == (len(items), 2, head.in_features) and labels.tolist() == [label for _, label in items]
    preprocess = Preprocessor(preprocess_spec(arch))
    with torch.no_grad():
        images = torch.stack([preprocess((paths.out / p).read_bytes()) for p, _ in items])
        images = images.to(memory_format=rt.memory_format())
        reference = backbone(images)
        print(f"{precision}: max |cached - fp32| = {(feats[:, 0] - reference).abs().max():.4g}, "
              f"max |fp32| = {reference.abs().max():.3g}")
        torch.testing.assert_close(feats[:, 0], reference, **TOLERANCES[precision])  # view 0, in order
        torch.testing.assert_close(head(feats[:, 0]), model(images), **TOLERANCES[precision])  # head(f) == model(x)
    assert not torch.allclose(feats[:, 1], feats[:, 0], atol=1e-3)  # view 1 is an augmented view, not a copy


def test_both_paths_step_the_same_lr_schedule(tmp_path: Path):
    """Same optimizer steps, same cosine decay to zero: the paths differ only in where features come from."""
    base = {"weights": "none", "epochs": 2, "batch_size": 8, "min_images_per_class": 3, "num_workers": 0,
            "feature_views": 2, "lr": 0.01}
    paths = RunPaths(tmp_path / "cached")
    clean(load_config(overrides=base), paths, FIXTURE_IMAGES)
    split(load_config(overrides=base), paths)
    results = train_both(base, paths, SEED)
    steps = {}
    for cache, sub in ((True, "cached"), (False, "full")):
        state = torch.load(tmp_path / sub / "checkpoints" / "last.pt", weights_only=True)
        steps[cache] = {int(v["step"]) for v in state["optimizer"]["state"].values()}
        assert [e["stage"] for e in results[cache]["epochs"]] == ["head", "head"]
    n_train = sum(s == "train" for s in json.loads(paths.splits.read_text())["files"].values())
    per_epoch = -(-n_train // 8)
    assert steps[True] == steps[False] == {2 * per_epoch}  # every step of both epochs, one per batch
    stage = Stage("head", epochs=2, train_all=False, on_features=True)
    last_lr = 0.01 * lr_factor(stage, 1, per_epoch - 1, per_epoch)
    assert [e["lr"] for e in results[True]["epochs"]] == [e["lr"] for e in results[False]["epochs"]]
    assert results[True]["epochs"][-1]["lr"] == pytest.approx(last_lr) and last_lr < 0.01 * 0.1  # decayed


def test_each_cached_row_is_a_view_of_the_image_it_labels_and_each_epoch_draws_afresh():
    """Exactly what the two paths' equal accuracy rests on, beside the features being the model's (above): each
    row the head trains on is one of its own image's views with that image's label; an epoch visits every image
    once; epochs differ in order and views, every view is drawn; a resume inside an epoch continues its draw."""
    n, views, dim = 37, 5, 3
    x = torch.arange(n * views * dim, dtype=torch.float).reshape(n, views, dim)  # every value names its place
    y = torch.arange(n) % 4
    batches = FeatureBatches(x, y, batch_size=8, seed=SEED)
    drawn = []
    for epoch in range(3):
        rows, labels = (torch.cat(parts) for parts in zip(*batches.epoch(epoch, 0), strict=True))
        image, view = rows[:, 0].long() // (views * dim), rows[:, 0].long() % (views * dim) // dim
        assert torch.equal(rows, x[image, view]) and torch.equal(labels, y[image])
        assert sorted(image.tolist()) == list(range(n)) and batches.steps_per_epoch == -(-n // 8)
        assert torch.equal(torch.cat([r for r, _ in batches.epoch(epoch, 16)]), rows[16:])
        drawn.append((image, view))
    assert not torch.equal(drawn[0][0], drawn[1][0]) and not torch.equal(drawn[0][1], drawn[1][1])
    assert set(torch.cat([v for _, v in drawn]).tolist()) == set(range(views))
