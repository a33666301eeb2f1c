"""Calibration and "none of these" on real features: which OOD score to serve, and what it costs.

    python -m bench.trust [--arch tf_efficientnet_lite0 --weights FILE] [--seeds 5] [--finetune-epochs 5]

Two directions, as a new user would meet them: cats/dogs (pets-sample) are the classes and
hymenoptera photos + generated pictures are none of them; then ants/bees are the classes and pets +
generated pictures are none of them. The generated pictures (``generated_image``): noise, blobs,
gradients, flat colours, stripes, checkerboards, shapes and rendered text, 64-512 px a side.

Each seed cuts the classes' photos into four stratified folds; rotation r trains a linear head (L2
logistic regression, LBFGS) on two folds' features (the timm backbone's pooled penultimate features,
its own data config), fits the temperature and each score's threshold (keeping 95 %) on fold r+1
and judges on fold r and on the OOD images. The test sets are small (50 or 100 photos): figures are
the mean over all splits with the worst split, and ECE also on the four rotations' pooled test
predictions (every photo once). Also measured: an unpenalised (overconfident) head; features
computed under bf16 autocast, as a bf16 server computes them, against a bank and thresholds fit on
float32 ones; the kNN bank size and k.

Class-specialized backbones (no goal; how much weaker): the backbone fine-tuned on the first
split's train photos with the job's fine-tune recipe (head first, then every layer with AdamW, head
lr 2e-3, backbone lr 2e-4, a cosine to 0, BatchNorm statistics frozen, RandomResizedCrop + flip),
judged on that split only; and the tests' ResNet-18 whose BatchNorm layers alone were trained on
hymenoptera train/ (ants/bees from val/ only).

Per-image cost: CPU time of ResNet-18 and the backbone's forward at batch 1 and 8 against each score
at several bank sizes. Results: bench/results/trust.json; figures in bench/README.md ("trust").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import nn
from torch.nn import functional as F

from bench.common import HYMENOPTERA, PETS, REPO, RESULTS, machine
from handler import trust
from jobs.evaluate import calibration
from jobs.fileio import atomic_torch_save, atomic_write_json

DEFAULT_WEIGHTS = REPO.parent / "weights" / "tf_efficientnet_lite0.pth"
CACHE = REPO / ".cache" / "bench-trust"
BN_FIXTURE = REPO / "tests" / "fixtures" / "resnet18_bn_hymenoptera.statedict"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
FOLDS = 4  # train on two, val on one, test on one: 50/25/25 %
# The calibration pooled over a seed's rotations: unscaled, scaled (the default fit), scaled (NLL alone).
CALIBRATION_PARTS = ("before", "after", "after_nll_only")
GOALS = {"auroc": 0.97, "fpr_at_95_tpr": 0.1, "abstain_in": 0.06, "abstain_out": 0.9, "ece_after": 0.03}

# ----------------------------------------------------------------------------------------------
# generated images: none of any user's classes


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")


def _noise(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    mean, spread = rng.uniform(40, 215, 3), rng.uniform(20, 90)
    return Image.fromarray(np.clip(rng.normal(mean, spread, (h, w, 3)), 0, 255).astype(np.uint8))


def _blobs(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    cells = int(rng.integers(2, 12))
    small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


def _linear_gradient(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    y, x = _grid(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    t = ((math.cos(angle) * x + math.sin(angle) * y) / 2 + 0.5)[..., None]
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def _radial_gradient(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    y, x = _grid(h, w)
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    t = np.clip(np.hypot(x - cx, y - cy) / rng.uniform(0.5, 1.5), 0, 1)[..., None]
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def _flat(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.new("RGB", (w, h), _colour(rng))


def _stripes(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    y, x = _grid(h, w)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 40)
    wave = np.sin(freq * (math.cos(angle) * x + math.sin(angle) * y))
    t = (wave > 0 if rng.random() < 0.5 else (wave + 1) / 2).astype(np.float64)[..., None]
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def _checkerboard(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    cell = int(rng.integers(4, max(5, min(h, w) // 3)))
    yy, xx = np.indices((h, w)) // cell
    t = ((yy + xx) % 2).astype(np.float64)[..., None]
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def _shapes(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    image = _flat(rng, h, w) if rng.random() < 0.5 else _linear_gradient(rng, h, w)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 12))):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        box = (x0, y0, max(x1, x0 + 4), max(y1, y0 + 4))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse(box, fill=_colour(rng))
        elif kind == 1:
            draw.rectangle(box, fill=_colour(rng))
        elif kind == 2:
            points = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(points, fill=_colour(rng))
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(1, 12)))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))


def _text(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    image = _flat(rng, h, w)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 8))):
        word = "".join(rng.choice(list(string.ascii_letters + string.digits + " "), int(rng.integers(3, 14))))
        font = ImageFont.load_default(size=int(rng.integers(10, max(12, h // 3))))
        draw.text((int(rng.integers(0, w // 2)), int(rng.integers(0, h * 3 // 4))), word, fill=_colour(rng), font=font)
    return image


GENERATORS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "noise": _noise, "blobs": _blobs, "linear_gradient": _linear_gradient, "radial_gradient": _radial_gradient,
    "flat": _flat, "stripes": _stripes, "checkerboard": _checkerboard, "shapes": _shapes, "text": _text,
}


def generated_image(i: int, seed: int = 0) -> tuple[str, Image.Image]:
    """The i-th generated picture (its kind, an RGB image 64-512 px a side); the same on every machine."""
    kind = list(GENERATORS)[i % len(GENERATORS)]
    rng = np.random.default_rng([seed, i])
    h, w = (int(v) for v in rng.integers(64, 513, 2))
    return kind, GENERATORS[kind](rng, h, w)


# ----------------------------------------------------------------------------------------------
# images and features


@dataclass(frozen=True)
class Item:
    source: str  # "pets" | "hymenoptera" | "generated"
    label: str  # the class folder, or the generated kind
    path: Path | None = None  # a photo, or None for generated picture number ``index``
    index: int = 0

    def image(self, seed: int) -> Image.Image:
        if self.path is None:
            return generated_image(self.index, seed)[1]
        with Image.open(self.path) as im:
            return im.convert("RGB")


def photo_items(source: str, root: Path) -> list[Item]:
    """Every photo under ``root`` as (source, its class folder); hymenoptera's train/val are pooled."""
    return [Item(source, p.parent.name, p) for p in sorted(root.rglob("*"))
            if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()]


def all_items(generated: int, seed: int) -> list[Item]:
    return (photo_items("pets", PETS) + photo_items("hymenoptera", HYMENOPTERA)
            + [Item("generated", generated_image(i, seed)[0], None, i) for i in range(generated)])


def load_backbone(arch: str, weights: Path, num_classes: int = 0) -> nn.Module:
    """A timm model with ``weights`` (its ImageNet head dropped) and a new head of ``num_classes`` (0 = none)."""
    import timm

    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.reset_classifier(num_classes)
    return model.eval()


def eval_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model))


def train_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The job's augmentation (RandomResizedCrop + flip) with the backbone's own resampling and normalisation."""
    from torchvision.transforms import v2

    cfg = _data_config(model)
    return v2.Compose([v2.PILToTensor(),
                       v2.RandomResizedCrop(cfg["input_size"][-1], interpolation=v2.InterpolationMode.BICUBIC,
                                            antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"]))])


def _data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)


def _batches(items: list[Item], transform: Callable, seed: int, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(items), size):
        yield torch.stack([transform(it.image(seed)) for it in items[i:i + size]])


@torch.inference_mode()
def pooled_features(backbone: nn.Module, items: list[Item], seed: int, batch_size: int = 16,
                    autocast: torch.dtype | None = None) -> torch.Tensor:
    """(N, D) float32 penultimate features: the head's input, as ``handler.model.Classifier`` gives it.

    ``autocast``: run the backbone under CPU autocast in this dtype (how a bf16 server computes them).
    """
    backbone.eval()
    transform = eval_transform(backbone)
    out = []
    for x in _batches(items, transform, seed, batch_size):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out.append(backbone.forward_head(backbone.forward_features(x), pre_logits=True).float())
    return torch.cat(out)


@torch.inference_mode()
def bn_fixture_features(items: list[Item]) -> torch.Tensor:
    """(N, 512) features of the tests' fixture backbone (random ResNet-18 convolutions, BatchNorm layers
    trained on hymenoptera train/ alone), preprocessed as the job does (handler/preprocess.py)."""
    from torchvision import models
    from torchvision.transforms import v2

    from bench.common import bn_backbone
    from handler.model import preprocess_spec
    from handler.preprocess import eval_transform as job_eval_transform

    model = models.resnet18()
    model.load_state_dict(torch.load(bn_backbone(BN_FIXTURE, CACHE / "resnet18_bn.pt"), weights_only=True))
    model.fc = nn.Identity()
    model.eval()
    transform = v2.Compose([v2.PILToTensor(), job_eval_transform(preprocess_spec("resnet18"))])
    return torch.cat([model(x) for x in _batches(items, transform, 0, 16)])


def cached_features(key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once per ``key`` (backbone, weights, image list), kept under .cache/bench-trust."""
    path = CACHE / f"features-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    features = compute()
    atomic_torch_save(path, features)
    return features


def _file_tag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# splits, the head, the fine-tune


def rotations(labels: list[str], seed: int) -> list[dict[str, list[int]]]:
    """Four stratified folds of ``labels``' positions; rotation r tests on fold r, fits T and thresholds on
    fold r+1 and trains on the other two (50/25/25 %). Over the four, every photo is a test photo once."""
    generator = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(FOLDS)]
    for c in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == c]
        for j, r in enumerate(torch.randperm(len(rows), generator=generator).tolist()):
            folds[j % FOLDS].append(rows[r])
    return [{"train": sorted(i for f in range(FOLDS) if f not in (r, (r + 1) % FOLDS) for i in folds[f]),
             "val": sorted(folds[(r + 1) % FOLDS]), "test": sorted(folds[r])} for r in range(FOLDS)]


def logistic_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty (full-batch LBFGS): the bench's linear head."""
    head = nn.Linear(features.shape[1], num_classes).double()
    x = features.double()
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.float()


def finetune(arch: str, weights: Path, items: list[Item], labels: torch.Tensor, head: nn.Linear, epochs: int,
             seed: int, batch_size: int = 16, lr: float = 2e-3, backbone_lr_div: float = 10.0) -> nn.Module:
    """The job's fine-tune stage on ``items``: every layer, AdamW, a cosine to 0, BatchNorm statistics frozen."""
    torch.manual_seed(seed)
    model = load_backbone(arch, weights, head.out_features)
    model.get_classifier().load_state_dict(head.state_dict())
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": list(model.get_classifier().parameters()), "lr": lr},
                                   {"params": backbone, "lr": lr / backbone_lr_div}], weight_decay=0.0)
    steps = epochs * math.ceil(len(items) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    transform = train_transform(model)
    for epoch in range(epochs):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        order = torch.randperm(len(items)).tolist()
        total = correct = 0.0
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            x = torch.stack([transform(items[r].image(seed)) for r in rows])
            y = labels[rows]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(rows)
            correct += float((logits.argmax(1) == y).sum())
        print(f"  fine-tune epoch {epoch + 1}/{epochs}: loss {total / len(items):.3f} "
              f"train acc {correct / len(items):.3f}", flush=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# one evaluation


@dataclass
class Direction:
    name: str
    classes_from: str  # the source whose folders are the classes
    ood_from: tuple[str, ...]


DIRECTIONS = (Direction("pets", "pets", ("hymenoptera", "generated")),
              Direction("hymenoptera", "hymenoptera", ("pets", "generated")))


@dataclass
class Task:
    """One direction over the item list: each item's class (-1 = none of them) and the OOD rows by source."""

    classes: list[str]
    labels: torch.Tensor
    in_rows: list[int]
    ood: dict[str, list[int]]

    @classmethod
    def of(cls, direction: Direction, items: list[Item], only: Callable[[Item], bool] = lambda it: True) -> Task:
        """``only``: which of the classes' photos take part (the others are neither classes nor OOD)."""
        in_rows = [i for i, it in enumerate(items) if it.source == direction.classes_from and only(it)]
        classes = sorted({items[i].label for i in in_rows})
        labels = torch.full((len(items),), -1, dtype=torch.long)
        labels[in_rows] = torch.tensor([classes.index(items[i].label) for i in in_rows])
        ood = {s: [i for i, it in enumerate(items) if it.source == s] for s in direction.ood_from}
        return cls(classes, labels, in_rows, ood)

    def splits(self, seed: int) -> list[dict[str, list[int]]]:
        local = rotations([str(int(self.labels[i])) for i in self.in_rows], seed)
        return [{k: [self.in_rows[j] for j in v] for k, v in split.items()} for split in local]


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ECE (15 equal-width bins, jobs.evaluate.calibration), NLL and accuracy."""
    confidence, predicted = logits.float().softmax(1).max(1)
    return {"ece": calibration(confidence.numpy(), (predicted == labels).numpy())["ece"],
            "nll": float(F.cross_entropy(logits.float(), labels)),
            "accuracy": float((predicted == labels).float().mean())}


def evaluate(task: Task, features: torch.Tensor, logits: torch.Tensor, split: dict[str, list[int]],
             configs: dict[str, tuple[str, dict]], keep: float,
             served: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One split: the temperature, calibration on test, and each configured score's separation.

    ``served``: (features, logits) of every image as the server computes them (another precision): the
    scores and thresholds are fit on ``features``/``logits`` (train, val) and judged on these (test, OOD).
    Returns the figures and the test logits before/after scaling (for calibration pooled over splits).
    """
    train, val, test = (torch.tensor(split[k]) for k in ("train", "val", "test"))
    labels = task.labels
    out_rows = torch.tensor(sorted(r for rows in task.ood.values() for r in rows))
    temperature = trust.fit_temperature(logits[val], labels[val])
    calibrated = trust.calibrated_logits(logits, temperature)
    temperature_nll_only = trust.fit_temperature(logits[val], labels[val], prior_sigma=None)
    nll_only = trust.calibrated_logits(logits[test], temperature_nll_only)
    result: dict[str, Any] = {
        "n": {"train": len(train), "val": len(val), "test": len(test),
              **{f"ood_{k}": len(v) for k, v in task.ood.items()}},
        "temperature": temperature,
        "temperature_nll_only": temperature_nll_only,
        "test_before": calibration_figures(logits[test], labels[test]),
        "test_after": calibration_figures(calibrated[test], labels[test]),
        "test_after_nll_only": calibration_figures(nll_only, labels[test]),
        "scores": {},
    }
    for label, (name, options) in configs.items():
        score = trust.fit_score(name, features[train], labels[train], **options)
        values = score(features, calibrated)
        threshold = trust.fit_threshold(values[val], keep)
        if served is not None:
            values = score(served[0], trust.calibrated_logits(served[1], temperature))
        figures = {"auroc": trust.auroc(values[test], values[out_rows]),
                   "fpr_at_95_tpr": trust.fpr_at_tpr(values[test], values[out_rows]),
                   "abstain_in": float((values[test] > threshold).float().mean()),
                   "abstain_out": float((values[out_rows] > threshold).float().mean())}
        for source, rows in task.ood.items():
            figures[f"abstain_{source}"] = float((values[torch.tensor(rows)] > threshold).float().mean())
        result["scores"][label] = figures
    tensors = {"before": logits[test].float(), "after": calibrated[test], "after_nll_only": nll_only,
               "labels": labels[test]}
    return result, tensors


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run(task: Task, features: torch.Tensor, seeds: list[int], configs: dict[str, tuple[str, dict]], keep: float,
        logits_for: Callable[[dict], torch.Tensor] | None = None, rotations_per_seed: int = FOLDS,
        l2: float = 1e-3, served_features: torch.Tensor | None = None) -> dict[str, Any]:
    """Every rotation of every seed: per-split figures (mean, min, max) and calibration pooled per seed.

    Without ``logits_for`` each split trains its own linear head on its train features.
    ``served_features``: see ``evaluate`` (the head's logits on them are the served logits).
    """
    runs, pooled = [], []
    for seed in seeds:
        kept: dict[str, list[torch.Tensor]] = {"before": [], "after": [], "after_nll_only": [], "labels": []}
        for split in task.splits(seed)[:rotations_per_seed]:
            if logits_for is None:
                head = logistic_head(features[split["train"]], task.labels[split["train"]], len(task.classes), l2)
                with torch.no_grad():
                    logits = head(features)
            else:
                logits = logits_for(split)
            served = None
            if served_features is not None:
                with torch.no_grad():
                    served = (served_features, head(served_features))
            result, tensors = evaluate(task, features, logits, split, configs, keep, served)
            runs.append(result)
            for k, v in tensors.items():
                kept[k].append(v)
        labels = torch.cat(kept["labels"])
        pooled.append({"n": len(labels), **{part: calibration_figures(torch.cat(kept[part]), labels)
                                            for part in CALIBRATION_PARTS}})
    out: dict[str, Any] = {"n": runs[0]["n"], "splits": len(runs),
                           "temperature": _stats([r["temperature"] for r in runs]),
                           "temperature_nll_only": _stats([r["temperature_nll_only"] for r in runs])}
    for part in ("test_before", "test_after", "test_after_nll_only"):
        out[part] = {k: _stats([r[part][k] for r in runs]) for k in runs[0][part]}
    out["pooled"] = {"n": pooled[0]["n"], "seeds": len(pooled),
                     **{part: {k: _stats([p[part][k] for p in pooled]) for k in pooled[0][part]}
                        for part in CALIBRATION_PARTS}}
    out["scores"] = {label: {k: _stats([r["scores"][label][k] for r in runs]) for k in figures}
                     for label, figures in runs[0]["scores"].items()}
    return out


# ----------------------------------------------------------------------------------------------
# cost


def _cpu_ms(fn: Callable[[], Any], inner: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of ``fn``, averaged over ``inner`` calls."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(inner):
        fn()
    return 1000 * (time.process_time() - cpu) / inner, 1000 * (time.perf_counter() - wall) / inner


@torch.inference_mode()
def costs(arch: str, dims: int, bank_sizes: list[int], reps: int, num_classes: int = 2) -> dict[str, Any]:
    """Per batch: the forward pass (fp32, eval) of resnet18 and ``arch`` against each score and ``Trust.assess``.

    One torch thread, and CPU time (process_time), not wall time: on a machine other jobs share, a
    process waiting for a core is not charged for it, so the ratio stays the ratio of the work. Timed
    interleaved (forward, then every score, ``reps`` times); the minimum over reps is reported (the
    least disturbed: caches), with the wall-clock minimum beside it.
    """
    import timm
    from torchvision import models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    forwards = {"resnet18": (models.resnet18().eval(), 512), arch: (timm.create_model(arch).eval(), dims)}
    cells: dict[str, Any] = {}
    try:
        for name, (model, d) in forwards.items():
            knn = {n: trust.KNNDistance(torch.randn(n, d, generator=g).half()) for n in bank_sizes}
            scorers: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
                **{f"knn/n{n}": s for n, s in knn.items()},
                "mahalanobis": trust.Mahalanobis(torch.randn(num_classes, d, generator=g),
                                                 torch.randn(d, d, generator=g)),
                "energy": trust.Energy(),
                f"assess(knn/n{bank_sizes[0]})": trust.Trust(1.3, knn[bank_sizes[0]], 0.5).assess,
            }
            for b in (1, 8):
                x = torch.randn(b, 3, 224, 224, generator=g)
                feats, logits = torch.randn(b, d, generator=g), torch.randn(b, num_classes, generator=g)
                times: dict[str, list[tuple[float, float]]] = {"forward": [], **{k: [] for k in scorers}}
                model(x)
                for _ in range(reps):
                    times["forward"].append(_cpu_ms(lambda: model(x), 1))  # noqa: B023 - called at once
                    for k, fn in scorers.items():
                        times[k].append(_cpu_ms(lambda: fn(feats, logits), 20))  # noqa: B023 - called at once
                best = {k: (min(c for c, _ in v), min(w for _, w in v)) for k, v in times.items()}
                forward = best.pop("forward")
                cells[f"{name}/b{b}"] = {
                    "features": d, "forward_ms": {"cpu": forward[0], "wall": forward[1]},
                    "score_ms": {k: {"cpu": c, "wall": w, "share_of_forward": c / forward[0]}
                                 for k, (c, w) in best.items()}}
    finally:
        torch.set_num_threads(threads)
    return {"threads": 1, "reps": reps, "cells": cells,
            "state_bytes": {f"knn/n{n}/d{d}": n * d * 2 for n in bank_sizes for d in sorted({512, dims})}
            | {f"mahalanobis/d{d}": (num_classes * d + d * d) * 4 for d in sorted({512, dims})}}


def print_costs(cost: dict[str, Any]) -> None:
    print(f"\nper-batch CPU time, ms (min of {cost['reps']} interleaved reps, {cost['threads']} torch thread); "
          "share of the forward pass")
    for cell, c in cost["cells"].items():
        print(f"  {cell:<26} forward {c['forward_ms']['cpu']:7.2f}  " + "  ".join(
            f"{k} {v['cpu']:.3f} ({100 * v['share_of_forward']:.2f}%)" for k, v in c["score_ms"].items()))


# ----------------------------------------------------------------------------------------------
# the bench


def main_configs(k: int) -> dict[str, tuple[str, dict]]:
    return {"knn": ("knn", {"k": k}), "mahalanobis": ("mahalanobis", {}), "energy": ("energy", {}),
            "max_softmax": ("max_softmax", {})}


def bank_configs(k: int, train_size: int) -> dict[str, tuple[str, dict]]:
    """The kNN score as its bank shrinks (class-stratified subsamples) and as k changes."""
    return {f"knn/bank{n}/k{kk}": ("knn", {"k": kk, "max_bank": n})
            for n in sorted({16, 32, 64, train_size}) for kk in sorted({1, k, 10}) if kk <= n}


def print_summary(title: str, summary: dict, labels: list[str]) -> None:
    pooled, t, t_nll = summary["pooled"], summary["temperature"], summary["temperature_nll_only"]
    ece = {part: pooled[part]["ece"]["mean"] for part in CALIBRATION_PARTS}
    print(f"\n{title}\n  n={summary['n']}, {summary['splits']} splits; accuracy "
          f"{summary['test_after']['accuracy']['mean']:.3f}; T {t['mean']:.2f} [{t['min']:.2f}, {t['max']:.2f}] "
          f"(NLL alone: [{t_nll['min']:.2f}, {t_nll['max']:.2f}])\n"
          f"  ECE on the pooled test predictions (n={pooled['n']}, mean of {pooled['seeds']} seed(s)): "
          f"{ece['before']:.3f} before -> {ece['after']:.3f} after (NLL alone: {ece['after_nll_only']:.3f}); "
          f"NLL {pooled['before']['nll']['mean']:.3f} -> {pooled['after']['nll']['mean']:.3f} "
          f"({pooled['after_nll_only']['nll']['mean']:.3f}); per split (n={summary['n']['test']}) "
          f"{summary['test_before']['ece']['mean']:.3f} -> {summary['test_after']['ece']['mean']:.3f} "
          f"[{summary['test_after']['ece']['min']:.3f}, {summary['test_after']['ece']['max']:.3f}]")
    print(f"  {'score':<22} AUROC (min)     FPR95 (max)     abstain-in (max)  abstain-out (min)")
    for label in labels:
        s = summary["scores"][label]
        print(f"  {label:<22} {s['auroc']['mean']:.3f} ({s['auroc']['min']:.3f})   "
              f"{s['fpr_at_95_tpr']['mean']:.3f} ({s['fpr_at_95_tpr']['max']:.3f})   "
              f"{s['abstain_in']['mean']:.3f} ({s['abstain_in']['max']:.3f})     "
              f"{s['abstain_out']['mean']:.3f} ({s['abstain_out']['min']:.3f})")


def specialized(task: Task, items: list[Item], features: torch.Tensor, args: argparse.Namespace,
                configs: dict[str, tuple[str, dict]]) -> dict[str, Any]:
    """Fine-tune the backbone on the first split's train photos, then the same evaluation on that split."""
    split = task.splits(0)[0]
    train = split["train"]
    head = logistic_head(features[train], task.labels[train], len(task.classes), args.l2)
    key = {"arch": args.arch, "weights": _file_tag(args.weights), "finetune": args.finetune_epochs, "l2": args.l2,
           "train": train,
           "items": [(it.source, str(it.path), it.index) for it in items]}

    def compute() -> torch.Tensor:
        print(f"fine-tuning {args.arch} on {len(train)} photos, {args.finetune_epochs} epochs", flush=True)
        model = finetune(args.arch, args.weights, [items[i] for i in train], task.labels[train], head,
                         args.finetune_epochs, seed=0)
        with torch.inference_mode():
            feats = pooled_features(model, items, seed=0)
            return torch.cat([feats, model.get_classifier()(feats)], dim=1)

    both = cached_features(key, compute)
    tuned, logits = both[:, :-len(task.classes)], both[:, -len(task.classes):]
    return run(task, tuned, [0], configs, args.keep, logits_for=lambda _split: logits, rotations_per_seed=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tf_efficientnet_lite0", help="a timm architecture")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="its state_dict (timm layout)")
    ap.add_argument("--generated", type=int, default=300, help="generated pictures among the OOD images")
    ap.add_argument("--seeds", type=int, default=5, help="random 4-fold rotations to average over")
    ap.add_argument("--l2", type=float, default=1e-3, help="the linear head's L2 penalty (0 = none)")
    ap.add_argument("--keep", type=float, default=trust.DEFAULT_KEEP, help="share of val images each threshold keeps")
    ap.add_argument("--k", type=int, default=trust.DEFAULT_K, help="the kNN score's k")
    ap.add_argument("--finetune-epochs", type=int, default=5, help="the class-specialized backbone (0 = skip)")
    ap.add_argument("--no-bn-fixture", dest="bn_fixture", action="store_false",
                    help="skip the ants/bees backbone of the tests (ResNet-18, BatchNorm trained on hymenoptera)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip judging on features computed under bf16 autocast (fit on float32 ones)")
    ap.add_argument("--cost-reps", type=int, default=15, help="interleaved timing repetitions per cost cell")
    ap.add_argument("--out", type=Path, default=RESULTS / "trust.json")
    args = ap.parse_args(argv)
    if not (PETS.is_dir() and HYMENOPTERA.is_dir()):
        print(f"needs {PETS} and {HYMENOPTERA}")
        return 2
    torch.manual_seed(0)
    items = all_items(args.generated, seed=0)
    key = {"arch": args.arch, "weights": _file_tag(args.weights),
           "items": [(it.source, str(it.path), it.index) for it in items]}
    start = time.perf_counter()
    features = cached_features(key, lambda: pooled_features(load_backbone(args.arch, args.weights), items, seed=0))

    def bf16_features() -> torch.Tensor:
        return cached_features({**key, "autocast": "bfloat16"}, lambda: pooled_features(
            load_backbone(args.arch, args.weights), items, seed=0, autocast=torch.bfloat16))
    print(f"{len(items)} images, features {tuple(features.shape)} ({time.perf_counter() - start:.0f} s)")
    result: dict[str, Any] = {"benchmark": "trust", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine": machine("cpu"), "arch": args.arch, "weights": str(args.weights),
                              "keep": args.keep, "k": args.k, "l2": args.l2, "folds": FOLDS, "seeds": args.seeds,
                              "goals": GOALS, "directions": {}}
    main_scores = main_configs(args.k)
    for direction in DIRECTIONS:
        task = Task.of(direction, items)
        train_size = len(task.splits(0)[0]["train"])
        configs = main_scores | bank_configs(args.k, train_size)
        summary = run(task, features, list(range(args.seeds)), configs, args.keep, l2=args.l2)
        title = f"[{args.arch} ImageNet] classes {task.classes}; OOD {' + '.join(direction.ood_from)}"
        print_summary(title, summary, list(main_scores))
        print_summary("  kNN bank size (rows kept) and k", summary, list(configs)[len(main_scores):])
        entry: dict[str, Any] = {"classes": task.classes, "imagenet": summary}
        if args.l2:
            # A head without the penalty separates its train photos and grows overconfident, as a head
            # trained to convergence does: what the temperature has to repair.
            entry["imagenet_no_l2"] = run(task, features, list(range(args.seeds)), main_scores, args.keep, l2=0.0)
            print_summary("  the same with an unpenalised (overconfident) head", entry["imagenet_no_l2"],
                          list(main_scores))
        if args.bf16:
            entry["served_bf16"] = run(task, features, list(range(args.seeds)), main_scores, args.keep, l2=args.l2,
                                       served_features=bf16_features())
            print_summary("  fit on float32 features, judged on bf16-autocast ones (a bf16 server)",
                          entry["served_bf16"], list(main_scores))
        if args.finetune_epochs:
            entry["specialized"] = specialized(task, items, features, args, main_scores)
            print_summary(f"[{args.arch} fine-tuned {args.finetune_epochs} epochs on {task.classes}, first split]",
                          entry["specialized"], list(main_scores))
        if args.bn_fixture and direction.classes_from == "hymenoptera":
            # Its BatchNorm layers learnt from hymenoptera train/: only val/ photos are the classes here.
            fixture_task = Task.of(direction, items, only=lambda it: it.path is not None
                                   and it.path.parent.parent.name == "val")
            fixture_features = cached_features({"bn_fixture": _file_tag(BN_FIXTURE), "items": key["items"]},
                                               lambda: bn_fixture_features(items))
            entry["bn_fixture"] = run(fixture_task, fixture_features, list(range(args.seeds)), main_scores, args.keep,
                                      l2=args.l2)
            print_summary(f"[resnet18, BatchNorm alone trained on hymenoptera train/ (tests/fixtures), no ImageNet] "
                          f"classes {fixture_task.classes} from val/ only", entry["bn_fixture"], list(main_scores))
        result["directions"][direction.name] = entry
    result["cost"] = costs(args.arch, features.shape[1], [1024, 4096, 16384], args.cost_reps)
    print_costs(result["cost"])
    atomic_write_json(args.out, result)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
