"""handler/trust.py on real features: temperature scaling, the OOD scores, thresholds, the abstain decision.

In-distribution: the fixture ant/bee photos through the real EfficientNet-Lite0 ImageNet backbone;
none of them: generated pictures (noise, gradients, flat colours, shapes, text ...), so it runs on a
fresh clone without ../shared.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from bench.trust import GENERATORS, Item, load_backbone, logistic_head, pooled_features
from handler import files, trust

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 3  # of 16 fixture photos per class; the other 3 are test


@dataclass
class Real:
    features: torch.Tensor  # every image: photos first, then the generated pictures
    labels: torch.Tensor  # class of each photo, -1 for generated
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    generated: torch.Tensor


@pytest.fixture(scope="module")
def real(real_weights: Path, fixture_images: Path) -> Real:
    photos, labels, parts = [], [], {"train": [], "val": [], "test": []}
    for label, folder in enumerate(("ants", "bees")):
        for j, path in enumerate(sorted((fixture_images / folder).glob("*.jpg"))):
            part = "train" if j < TRAIN_PER_CLASS else "val" if j < TRAIN_PER_CLASS + VAL_PER_CLASS else "test"
            parts[part].append(len(photos))
            photos.append(Item("fixture", folder, path))
            labels.append(label)
    generated = [Item("generated", "", None, i) for i in range(2 * len(GENERATORS))]
    torch.manual_seed(0)
    features = pooled_features(load_backbone("tf_efficientnet_lite0", real_weights), photos + generated, seed=0)
    return Real(features, torch.tensor(labels + [-1] * len(generated)),
                *(torch.tensor(parts[k]) for k in ("train", "val", "test")),
                torch.arange(len(photos), len(photos) + len(generated)))


# ----------------------------------------------------------------------------------------------
# temperature


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_the_fit_recovers_the_temperature_that_drew_the_labels(true_t: float):
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20_000, 5, generator=g)
    labels = torch.multinomial((logits / true_t).softmax(1), 1, generator=g).squeeze(1)
    assert trust.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)
    assert trust.fit_temperature(logits, labels, prior_sigma=None) == pytest.approx(true_t, rel=0.05)


def test_the_fit_lowers_the_nll_of_real_val_logits(real: Real):
    # No L2: a head on 20 photos in 1280 dimensions separates them and grows overconfident.
    head = logistic_head(real.features[real.train], real.labels[real.train], 2, l2=0.0)
    with torch.no_grad():
        logits = head(real.features[real.val])
    t = trust.fit_temperature(logits, real.labels[real.val])
    before = F.cross_entropy(logits, real.labels[real.val])
    after = F.cross_entropy(trust.calibrated_logits(logits, t), real.labels[real.val])
    assert t != 1.0 and after < 0.9 * before


def test_a_val_split_without_errors_does_not_drive_the_temperature_to_zero():
    logits = torch.tensor([[4.0, 0.0], [0.0, 3.0], [5.0, 1.0], [0.5, 2.5]] * 5)
    labels = logits.argmax(1)
    assert trust.fit_temperature(logits, labels, prior_sigma=None) < 0.15  # every answer near 1.000
    assert trust.fit_temperature(logits, labels) > 0.5  # the prior holds it


# ----------------------------------------------------------------------------------------------
# OOD scores


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_generated_pictures_score_above_held_out_photos(real: Real, name: str):
    score = trust.fit_score(name, real.features[real.train], real.labels[real.train])
    values = score(real.features, torch.zeros(len(real.features), 2))
    held_out = torch.cat([real.val, real.test])
    assert trust.auroc(values[held_out], values[real.generated]) >= 0.95


def test_the_confidence_baselines_score_from_the_logits():
    logits = torch.tensor([[6.0, -6.0], [0.1, 0.0]])
    assert trust.MaxSoftmax()(None, logits).tolist() == pytest.approx([-1 / (1 + math.exp(-12)), -0.525], abs=1e-3)
    energy = trust.Energy()(None, logits)
    assert energy[0] < energy[1]  # the confident answer is the more familiar one


def test_a_bounded_bank_keeps_every_class():
    labels = torch.tensor([0] * 90 + [1] * 10)
    kept = trust.stratified_subsample(labels, 20, seed=1)
    assert len(kept) == 20 and (labels[kept] == 1).sum() == 2
    assert trust.stratified_subsample(labels, 200).tolist() == list(range(100))
    knn = trust.KNNDistance.fit(torch.randn(100, 8), labels, k=5, max_bank=20)
    assert knn.bank.shape == (20, 8)


def test_the_shrunk_covariance_is_scikit_learns_ledoit_wolf():
    from sklearn.covariance import ledoit_wolf

    x = torch.randn(40, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, :5] *= 4  # a few directions of larger variance: the shrinkage is neither 0 nor 1
    expected, shrinkage = ledoit_wolf(x.numpy(), assume_centered=True)
    assert 0.05 < shrinkage < 0.95
    torch.testing.assert_close(trust.ledoit_wolf(x), torch.from_numpy(expected))


# ----------------------------------------------------------------------------------------------
# thresholds, files, the decision


@pytest.mark.parametrize("n", [7, 20, 1000])
@pytest.mark.parametrize("keep", [0.5, 0.95, 1.0])
def test_the_threshold_keeps_the_asked_fraction_and_no_more_than_it_must(n: int, keep: float):
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n))
    threshold = trust.fit_threshold(scores, keep)
    kept = (scores <= threshold).float().mean()
    assert kept >= keep
    assert (scores < threshold).float().mean() < keep  # the next lower score would keep too few


def test_a_threshold_needs_a_sane_fraction_and_scores():
    with pytest.raises(ValueError, match="keep"):
        trust.fit_threshold(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="no scores"):
        trust.fit_threshold(torch.ones(0))


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "energy", "max_softmax"])
def test_a_saved_score_loads_with_weights_only_and_scores_the_same(real: Real, name: str, tmp_path: Path):
    score = trust.fit_score(name, real.features[real.train], real.labels[real.train])
    logits = torch.randn(len(real.features), 2)
    path = trust.save_score(tmp_path / "ood.pt", score)
    torch.load(path, weights_only=True)  # plain tensors and a small dict
    loaded = trust.load_score(path)
    assert loaded.name == name
    torch.testing.assert_close(loaded(real.features, logits), score(real.features, logits))


def test_what_export_fits_and_records_is_what_the_server_loads(real: Real, tmp_path: Path):
    head = logistic_head(real.features[real.train], real.labels[real.train], 2)
    with torch.no_grad():
        logits = head(real.features)
    fitted = trust.Trust.fit(real.features[real.train], real.labels[real.train], real.features[real.val],
                             logits[real.val], real.labels[real.val], keep=0.9, min_confidence=0.7)
    entry = json.loads(json.dumps(fitted.save(tmp_path)))  # as metadata.json holds it
    assert entry["file"] == files.SCORES and (tmp_path / entry["file"]).stat().st_size == entry["file_bytes"]
    assert entry["state"] == {"bank": [2 * TRAIN_PER_CLASS, 1280], "k": trust.DEFAULT_K}
    loaded = trust.Trust.from_metadata(tmp_path, entry)
    assert (loaded.temperature, loaded.threshold, loaded.keep, loaded.min_confidence) == (
        fitted.temperature, fitted.threshold, 0.9, 0.7)
    n = int(real.val.sum()) if real.val.dtype == torch.bool else len(real.val)
    unlike = (n + 1 - math.ceil(0.9 * n)) / (n + 1)  # a new image above the threshold; low confidence adds to it
    assert unlike - 1e-4 <= entry["expected_abstain_rate"] == loaded.expected_abstain_rate <= 1
    probabilities, answers = loaded.assess(real.features, logits)
    expected_probabilities, expected = fitted.assess(real.features, logits)
    torch.testing.assert_close(probabilities, expected_probabilities)
    assert answers == expected
    with pytest.raises(ValueError, match="metadata.json says mahalanobis"):
        trust.Trust.from_metadata(tmp_path, {**entry, "score": "mahalanobis"})


def test_a_foreign_file_is_not_taken_for_a_score(tmp_path: Path):
    torch.save({"format": 99, "score": "knn"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an OOD score file"):
        trust.load_score(tmp_path / "x.pt")


def test_the_answer_abstains_for_unlike_images_first_then_for_low_confidence(real: Real):
    head = logistic_head(real.features[real.train], real.labels[real.train], 2)
    with torch.no_grad():
        logits = head(real.features)
    t = trust.fit_temperature(logits[real.val], real.labels[real.val])
    score = trust.fit_score(trust.CHOSEN, real.features[real.train], real.labels[real.train])
    held_out = torch.cat([real.val, real.test])
    threshold = trust.fit_threshold(score(real.features[held_out], logits[held_out]), keep=1.0)
    answers = {}
    for floor in (None, 1.01):  # 1.01: no answer is ever that confident
        judge = trust.Trust(t, score, threshold, min_confidence=floor)
        probabilities, answers[floor] = judge.assess(real.features, logits)
        torch.testing.assert_close(probabilities, (logits / t).softmax(1))
    for i in held_out.tolist():
        assert answers[None][i] == {"ood_score": answers[None][i]["ood_score"], "abstain": False,
                                    "abstain_reason": None}
        assert answers[1.01][i]["abstain_reason"] == trust.LOW_CONFIDENCE
    unlike = [i for i in real.generated.tolist() if answers[None][i]["abstain"]]
    assert len(unlike) >= 0.9 * len(real.generated)
    for i in unlike:
        assert answers[None][i]["abstain_reason"] == answers[1.01][i]["abstain_reason"] == trust.UNLIKE_TRAINING
        assert answers[None][i]["ood_score"] > threshold


def test_the_module_imports_only_torch_numpy_and_the_standard_library():
    code = ("import sys, handler.trust; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'jobs', 'sklearn', 'scipy', 'timm', 'ts', 'PIL'}); print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------
# a new class like the known ones


def test_leaving_each_class_out_flags_a_class_far_from_the_rest_and_not_a_look_alike():
    # Class 0 sits apart; classes 1 and 2 are look-alikes (class 1's val images are class 2's, exactly), so a model
    # without one of them takes its images for the other; the logits are sure of the true class, so with that
    # class's column gone the others tie at 0.5, under any capture_below above it.
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[[0, 1, 1]]
    bank_labels = torch.arange(3).repeat_interleave(20)
    bank = centres[bank_labels] + 0.01 * torch.randn(60, 8, generator=g)
    val_labels = torch.arange(3).repeat_interleave(10)
    val = centres[val_labels] + 0.01 * torch.randn(30, 8, generator=g)
    val[10:20] = val[20:30]
    logits = 10.0 * F.one_hot(val_labels, 3).float()
    figures = trust.leave_one_class_out(bank, bank_labels, val, logits, val_labels, capture_below=0.85, keep=1.0)
    assert [figures["per_class"][c]["flagged"] for c in range(3)] == [1.0, 0.0, 0.0]
    assert figures["left_one_out"] == {"flagged": pytest.approx(1 / 3, abs=1e-4), "captured": 1.0}
    assert figures["capture_below"] == 0.85
    assert figures["known_flagged"] == figures["known_captured"] == 0.0
    assert {p["val_images"] for p in figures["per_class"].values()} == {10}
    # Two left out: without 0 and 1 (or 0 and 2), class 0 is flagged and the look-alike is not (1/2); without 1
    # and 2, both are far from class 0 (1): 2/3. The figures go one class on at the rate 1/3 over 2/3.
    assert figures["left_two_out"]["flagged"] == pytest.approx(2 / 3, abs=1e-4) and figures["extrapolated"]
    assert figures["flagged"] == pytest.approx(1 / 6, abs=1e-4)
    assert figures["captured"] == pytest.approx(1 / 2, abs=1e-4)
    # the capture rule alone: nothing is under a top probability of 0.4, so only the abstained are kept
    assert trust.leave_one_class_out(bank, bank_labels, val, logits, val_labels, capture_below=0.4,
                                     keep=1.0)["left_one_out"]["captured"] == pytest.approx(1 / 3, abs=1e-4)


def test_with_two_classes_the_figure_is_the_leave_one_out_one_and_says_it_is_not_extrapolated():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(10)
    bank = torch.eye(8)[labels] + 0.01 * torch.randn(20, 8, generator=g)
    val = torch.eye(8)[labels] + 0.01 * torch.randn(20, 8, generator=g)
    figures = trust.leave_one_class_out(bank, labels, val, 10.0 * F.one_hot(labels, 2).float(), labels,
                                        capture_below=0.85, keep=1.0)
    assert not figures["extrapolated"] and "left_two_out" not in figures
    assert figures["flagged"] == figures["left_one_out"]["flagged"] == 1.0  # each class far from the other


def test_one_class_with_val_images_has_no_class_to_leave_out():
    labels = torch.zeros(4, dtype=torch.long)
    assert trust.leave_one_class_out(torch.randn(4, 8), labels, torch.randn(4, 8), torch.randn(4, 2), labels,
                                     capture_below=0.85) is None
