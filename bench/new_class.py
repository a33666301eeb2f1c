"""How well the served model notices a new class like its own: export's leave-one-class-out estimate against what a
class it truly never saw got, and which OOD score notices more without hurting the rest.

    python -m bench.new_class --weights /tmp/lite0.pth [--per-class 100] [--seeds 2]

Real EfficientNet-Lite0 ImageNet features (frozen backbone, the job's default head stage) of the scenes-sample
photos (six scene classes) and the pets-sample photos (cats and dogs: another domain). Each task: three scene
classes (``--known``) are the classes (``--per-class`` photos each: half train, a fifth val, the rest test), a
fourth is the new class of the same domain (all its photos), the pets are another domain; every choice of the
known classes and the new one among the six, each seed a new split. A linear head (L2 logistic regression) on
the train features, the temperature and the threshold (keeping 95 %) on val, as ``Trust.fit`` does at export.

Per task:

- **estimate**: ``trust.leave_one_class_out`` on the train (bank) and val features alone, as export computes it;
- **actual**: the share of the new class's photos the served model abstains on (``flagged``) and abstains on or
  answers under a calibrated top probability of 0.85 (``captured``, the capture rule);
- the known classes' test photos abstained on and captured, the pets abstained on;
- the same for the other scores (``SCORES``), each with its own threshold keeping 95 % of val.

Results: bench/results/new_class.json; figures in bench/README.md ("A new class like one of yours").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import SCENES, save_result
from bench.trust import (
    DEFAULT_WEIGHTS,
    PETS,
    Item,
    _file_tag,
    cached_features,
    finetune,
    load_backbone,
    logistic_head,
    photo_items,
    pooled_features,
)
from handler import trust
from handler.capture import DEFAULT_BELOW

KEEP = trust.DEFAULT_KEEP
TRAIN_SHARE, VAL_SHARE = 0.5, 0.2
GOALS = {"known_abstained": 0.06, "other_domain_flagged": 0.9}

# A fitted score: (features, calibrated logits) of every image -> one float each, higher = less like the classes.
Fitted = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _knn(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_z: torch.Tensor) -> Fitted:
    return trust.KNNDistance.fit(train_f, train_y)


def _class_knn(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_z: torch.Tensor) -> Fitted:
    """The k-th nearest distance among the training images of the class the model answers (class-conditional)."""
    banks = [trust.KNNDistance.fit(train_f[train_y == c], train_y[train_y == c]) for c in train_y.unique().tolist()]

    def score(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        per_class = torch.stack([bank(features) for bank in banks], 1)
        return per_class.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)

    return score


def _sum_of_standardised(*parts: Callable[..., Fitted]) -> Callable[..., Fitted]:
    """Scores added after standardising each on the val images (mean 0, spread 1 there): a combined score."""

    def fit(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_z: torch.Tensor) -> Fitted:
        fitted = [p(train_f, train_y, val_f, val_z) for p in parts]
        on_val = [f(val_f, val_z) for f in fitted]
        scale = [(v.mean(), v.std().clamp_min(1e-6)) for v in on_val]
        return lambda x, z: sum((f(x, z) - m) / s for f, (m, s) in zip(fitted, scale))

    return fit


def _named(name: str) -> Callable[..., Fitted]:
    return lambda train_f, train_y, val_f, val_z: trust.fit_score(name, train_f, train_y)


SCORES: dict[str, Callable[..., Fitted]] = {
    "knn (served)": _knn,
    "knn, class-conditional": _class_knn,
    "knn + max-softmax": _sum_of_standardised(_knn, _named("max_softmax")),
    "knn + energy": _sum_of_standardised(_knn, _named("energy")),
    "class-conditional knn + max-softmax": _sum_of_standardised(_class_knn, _named("max_softmax")),
    "mahalanobis": _named("mahalanobis"),
    "max-softmax": _named("max_softmax"),
}


def split_rows(labels: list[str], classes: list[str], per_class: int, seed: int) -> dict[str, dict[str, list[int]]]:
    """Per class, ``per_class`` of its rows at random: train, val and test by TRAIN_SHARE and VAL_SHARE."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes:
        rows = [i for i, lab in enumerate(labels) if lab == c]
        rows = [rows[j] for j in torch.randperm(len(rows), generator=generator)[:per_class].tolist()]
        n_train, n_val = round(TRAIN_SHARE * len(rows)), round(VAL_SHARE * len(rows))
        out[c] = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    return out


def one_task(features: torch.Tensor, rows: dict[str, dict[str, list[int]]], known: tuple[str, ...], new: str,
             pets: list[int]) -> dict[str, Any]:
    """The estimate export would record for a model of ``known``, and what it actually met: ``new``, the pets."""
    part = {p: torch.tensor([r for c in known for r in rows[c][p]]) for p in ("train", "val", "test")}
    y = {p: torch.tensor([i for i, c in enumerate(known) for _ in rows[c][p]]) for p in ("train", "val", "test")}
    head = logistic_head(features[part["train"]], y["train"], len(known))
    with torch.no_grad():
        logits = head(features)
    new_rows = torch.tensor([r for p in ("train", "val", "test") for r in rows[new][p]])
    start = time.perf_counter()
    estimate = trust.leave_one_class_out(features[part["train"]], y["train"], features[part["val"]],
                                         logits[part["val"]], y["val"], DEFAULT_BELOW, keep=KEEP)
    seconds = time.perf_counter() - start
    temperature = trust.fit_temperature(logits[part["val"]], y["val"])
    calibrated = trust.calibrated_logits(logits, temperature)
    top = calibrated.softmax(1).max(1).values
    result: dict[str, Any] = {"known": list(known), "new": new, "loco_seconds": round(seconds, 4),
                              "estimate": {k: estimate[k] for k in ("flagged", "captured", "known_captured")},
                              "left_one_out": estimate["left_one_out"],
                              "left_two_out": estimate.get("left_two_out"),
                              "accuracy": float((logits[part["test"]].argmax(1) == y["test"]).float().mean()),
                              "scores": {}}
    for name, fit in SCORES.items():
        score = fit(features[part["train"]], y["train"], features[part["val"]], calibrated[part["val"]])
        values = score(features, calibrated)
        flagged = values > trust.fit_threshold(values[part["val"]], KEEP)
        captured = flagged | (top < DEFAULT_BELOW)
        result["scores"][name] = {k: round(v, 4) for k, v in {
            "new_flagged": float(flagged[new_rows].float().mean()),
            "new_captured": float(captured[new_rows].float().mean()),
            "new_auroc": trust.auroc(values[part["test"]], values[new_rows]),
            "known_abstained": float(flagged[part["test"]].float().mean()),
            "known_captured": float(captured[part["test"]].float().mean()),
            "other_domain_flagged": float(flagged[pets].float().mean())}.items()}
    return result


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 4)


def _gap(values: list[float]) -> dict[str, float]:
    return {"mean": _mean(values), "mean_abs": _mean([abs(x) for x in values]),
            "within_0.1": _mean([abs(x) <= 0.1 for x in values])}


def summarise(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    served = [t["scores"]["knn (served)"] for t in tasks]
    gap = {k: [t["estimate"][k] - s[f"new_{k}"] for t, s in zip(tasks, served)] for k in ("flagged", "captured")}
    one_gap = {k: [t["left_one_out"][k] - s[f"new_{k}"] for t, s in zip(tasks, served)]
               for k in ("flagged", "captured")}
    return {
        "tasks": len(tasks),
        "known": len(tasks[0]["known"]),
        "accuracy": _mean([t["accuracy"] for t in tasks]),
        "estimate": {k: _mean([t["estimate"][k] for t in tasks]) for k in ("flagged", "captured", "known_captured")},
        "actual": {k: _mean([s[f"new_{k}"] for s in served]) for k in ("flagged", "captured")},
        "estimate_minus_actual": {k: _gap(v) for k, v in gap.items()},
        "left_one_out": {k: _mean([t["left_one_out"][k] for t in tasks]) for k in ("flagged", "captured")},
        "left_one_out_minus_actual": {k: _gap(v) for k, v in one_gap.items()},
        "loco_seconds": {"mean": _mean([t["loco_seconds"] for t in tasks]),
                         "max": round(max(t["loco_seconds"] for t in tasks), 4)},
        "scores": {name: {k: _mean([t["scores"][name][k] for t in tasks]) for k in served[0]} for name in SCORES},
    }


def print_summary(summary: dict[str, Any]) -> None:
    est, act, gap = summary["estimate"], summary["actual"], summary["estimate_minus_actual"]
    print(f"\n{summary['tasks']} tasks ({summary['known']} scene classes known, another one new, pets the other "
          f"domain); test accuracy {summary['accuracy']:.1%}")
    print("new class, served knn    | estimate | actual | estimate - actual: mean, mean |.|, share within 0.1")
    for name, figures, gaps in (("LOCO, extrapolated", est, gap),
                                ("left one out (raw)", summary["left_one_out"], summary["left_one_out_minus_actual"])):
        for k in ("flagged", "captured"):
            print(f"  {name + ' ' + k:<34} | {figures[k]:8.1%} | {act[k]:6.1%} | {gaps[k]['mean']:+.3f}, "
                  f"{gaps[k]['mean_abs']:.3f}, {gaps[k]['within_0.1']:.0%}")
    print(f"LOCO cost per task: {summary['loco_seconds']['mean'] * 1000:.1f} ms "
          f"(max {summary['loco_seconds']['max'] * 1000:.1f} ms)")
    print(f"\n{'score':<36} | new: flagged captured AUROC | known: abstained captured | pets flagged")
    for name, s in summary["scores"].items():
        ok = s["known_abstained"] <= GOALS["known_abstained"] and s["other_domain_flagged"] >= GOALS[
            "other_domain_flagged"]
        print(f"{name:<36} | {s['new_flagged']:12.1%} {s['new_captured']:8.1%} {s['new_auroc']:5.3f} | "
              f"{s['known_abstained']:16.1%} {s['known_captured']:8.1%} | {s['other_domain_flagged']:6.1%}"
              f"{'' if ok else '  (misses a goal)'}")


def fine_tuned(items: list[Item], features: torch.Tensor, labels: list[str], scene_classes: list[str],
               pets: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """The first known set (seed 0) against each other scene class: frozen features, then the backbone fine-tuned
    on its train photos with the job's recipe (``bench.trust.finetune``) and a new head on the tuned features."""
    known = tuple(scene_classes[:args.known])
    rows = split_rows(labels, scene_classes, args.per_class, 0)
    train = [r for c in known for r in rows[c]["train"]]
    y = torch.tensor([i for i, c in enumerate(known) for _ in rows[c]["train"]])
    key = {"bench": "new_class", "weights": _file_tag(args.weights), "finetune": args.finetune_epochs,
           "train": train, "items": [str(it.path) for it in items]}

    def compute() -> torch.Tensor:
        head = logistic_head(features[train], y, len(known))
        model = finetune("tf_efficientnet_lite0", args.weights, [items[i] for i in train], y, head,
                         args.finetune_epochs, seed=0)
        return pooled_features(model, items, seed=0)

    tuned = cached_features(key, compute)
    out: dict[str, Any] = {"known": list(known), "epochs": args.finetune_epochs}
    for name, f in (("frozen", features), ("fine-tuned", tuned)):
        tasks = [one_task(f, rows, known, new, pets) for new in scene_classes if new not in known]
        out[name] = {"estimate": {k: _mean([t["estimate"][k] for t in tasks]) for k in ("flagged", "captured")},
                     "accuracy": _mean([t["accuracy"] for t in tasks]),
                     "per_new_class": {t["new"]: t["scores"]["knn (served)"] for t in tasks}}
        served = out[name]["per_new_class"].values()
        print(f"{name:>10} features, known {', '.join(known)}: accuracy {out[name]['accuracy']:.1%}; LOCO estimate "
              f"{out[name]['estimate']['flagged']:.1%} flagged; actual flagged "
              + ", ".join(f"{new} {s['new_flagged']:.1%}" for new, s in out[name]["per_new_class"].items())
              + f"; known abstained {_mean([s['known_abstained'] for s in served]):.1%}; pets flagged "
              f"{_mean([s['other_domain_flagged'] for s in served]):.1%}")
    return out


def _served_only(task: dict[str, Any]) -> dict[str, Any]:
    """A task as saved: the other scores' figures are in the summary's means (the file stays small)."""
    return {**{k: v for k, v in task.items() if k != "scores"}, "served": task["scores"]["knn (served)"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="EfficientNet-Lite0 ImageNet state_dict (scripts/offline_weights.py)")
    parser.add_argument("--per-class", type=int, default=100, help="scene photos per class taking part")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--known", type=int, default=3, help="scene classes the model knows (2-5)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="also: fine-tune the backbone on the first known set's train photos (seed 0) and "
                             "compare its features with the frozen ones on that set (0 = skip)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    scenes = photo_items("scenes", SCENES)
    scene_classes = sorted({it.label for it in scenes})
    scenes = [it for c in scene_classes for it in [s for s in scenes if s.label == c][:args.per_class]]
    items: list[Item] = scenes + photo_items("pets", PETS)
    key = {"bench": "new_class", "weights": _file_tag(args.weights), "items": [str(it.path) for it in items]}
    start = time.perf_counter()
    features = cached_features(key, lambda: pooled_features(load_backbone("tf_efficientnet_lite0", args.weights),
                                                             items, seed=0))
    print(f"features of {len(items)} photos: {time.perf_counter() - start:.0f} s")
    labels = [it.label for it in scenes]
    pets = list(range(len(scenes), len(items)))
    tasks = []
    for seed in range(args.seeds):
        rows = split_rows(labels, scene_classes, args.per_class, seed)
        for known in itertools.combinations(scene_classes, args.known):
            for new in (c for c in scene_classes if c not in known):
                tasks.append(one_task(features, rows, known, new, pets))
    summary = summarise(tasks)
    print_summary(summary)
    if args.finetune_epochs:
        summary["finetuned"] = fine_tuned(items, features, labels, scene_classes, pets, args)
    n = split_rows(labels, scene_classes, args.per_class, 0)[scene_classes[0]]
    name = ("new_class" + ("" if args.known == 3 else f"-known{args.known}")
            + ("-finetune" if args.finetune_epochs else ""))
    save_result(name, "cpu", {"per_class": {k: len(v) for k, v in n.items()}, "seeds": args.seeds,
                                     "summary": summary, "tasks": [_served_only(t) for t in tasks]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
