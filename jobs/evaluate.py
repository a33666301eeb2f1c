"""Evaluate: score the best checkpoint on the test split and write the ``report/`` folder.

Per-image probabilities are collected once; every number in ``report/metrics.json`` (accuracy,
per-class precision/recall/F1, confusion matrix, calibration) is derived from them, so the
numbers agree with each other by construction. When the model is exported, the served answers
(calibrated probabilities, ``ood_score``, ``abstain``) are measured too, on the test split and on
images of none of the classes (``ood_data``). ``jobs.report`` turns them into pictures and one
self-contained ``index.html``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from handler import files, trust
from handler.model import preprocess_spec
from handler.preprocess import Preprocessor
from jobs import checkpoints, features, report, versions
from jobs.config import Config, RunPaths, key_names
from jobs.data import ImageFiles, load_splits, make_loader, split_items
from jobs.errors import JobError
from jobs.fileio import atomic_write_json, read_json, read_run_file, sweep_partials
from jobs.model import build_model, split_backbone_head
from jobs.predict import predict
from jobs.review import write_run_review
from jobs.runtime import Runtime, default_num_workers
from jobs.train import SELECTION_RULE, plan, predict_logits

ECE_BINS = 15
MAX_EXAMPLES = 12  # images shown per kind in the report's "Unknown inputs"
TOP_CONFUSED = 5
MIN_TEST_IMAGES = 50  # below this the 95 % interval of the accuracy is wider than about +-14 points
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


class EvaluateError(JobError):
    pass


def load_trained_model(paths: RunPaths, classes: list[str]) -> tuple[torch.nn.Module, dict, Config]:
    """The best checkpoint, built from the architecture and label order recorded in it; what it is
    (``metrics.json["checkpoint"]``; ``backbone_trained``: whether any of its backbone's weights trained); the
    config it was trained with."""
    path, state = checkpoints.for_inference(paths)
    arch = state["config"]["arch"]
    if state["classes"] != classes:
        raise EvaluateError(f"checkpoint {path} was trained on classes {state['classes']}, but {paths.splits} has "
                            f"{classes}; re-run `python -m jobs train --out {paths.out}`")
    model = build_model(arch, len(classes), "none")  # every weight comes from the checkpoint
    model.load_state_dict(state["model"])
    progress = state["progress"]
    best = progress.get("best_epoch") or {}
    # The cached head stage leaves the backbone exactly the configured weights (train's fingerprint holds them).
    trained = Config(**{k: v for k, v in state["config"].items() if k in key_names()})
    head_stage = plan(trained)[0]
    frozen = best.get("stage") == head_stage.name and head_stage.on_features
    return model, {"file": path.name, "arch": arch, "stage": progress.get("stage"),
                   "best_epoch": progress.get("best_epoch"), "selection": SELECTION_RULE,
                   "backbone_trained": not frozen}, trained


def probabilities_on_test(model: torch.nn.Module, checkpoint: dict, trained: Config, paths: RunPaths, splits: dict,
                          rt: Runtime, cfg: Config) -> np.ndarray:
    """Softmax probabilities (N, C) of the test split, in its order, computed as train's validation computes val's.

    A backbone that never trained is the one whose features the audit cached for every image (``jobs.features``):
    where the cache holds the whole test split, under the training config's key, the head scores those features
    and no image goes through the backbone again (at 100,000 photos that pass took over a minute and a half).
    Otherwise every image goes through the whole model.
    """
    items = split_items(splits, "test")
    cached = None
    if not checkpoint["backbone_trained"]:
        shas = features.content_hashes(paths)
        cached = features.cached_eval_features(trained, paths, rt, len(splits["classes"]), [shas[p] for p, _ in items])
    if cached is not None:
        print(f"evaluate: the test split's {len(items)} images scored on their cached backbone features (the "
              "backbone never trained); none went through the backbone again")
        _, head = split_backbone_head(model)
        head.to(rt.device)
        logits, _ = predict_logits(head, [(cached.to(rt.device), torch.zeros(len(cached)))], rt, on_images=False)
        return logits.softmax(1).numpy()
    model.to(rt.device, memory_format=rt.memory_format())
    loader = make_loader(ImageFiles(paths.out, items, Preprocessor(preprocess_spec(checkpoint["arch"]))),
                         cfg.batch_size, default_num_workers(cfg, rt), pin_memory=rt.device.type == "cuda")
    logits, _ = predict_logits(model, loader, rt)
    return logits.softmax(1).numpy()


# ----------------------------------------------------------------------------------------------
# metrics: pure functions of (true labels, probabilities)


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Precision/recall/F1 per class (scikit-learn; 0.0 where undefined)."""
    if not len(y_true):
        return {name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for name in classes}
    labels = list(range(len(classes)))
    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)}


def macro_f1(cm: np.ndarray, scores: dict[str, dict]) -> float | None:
    """Mean F1 over the classes that occur in the truth or the predictions."""
    present = [s["f1"] for s, seen in zip(scores.values(), cm.sum(0) + cm.sum(1)) if seen]
    return float(np.mean(present)) if present else None


def most_confused(cm: np.ndarray, classes: list[str], top: int = TOP_CONFUSED) -> list[dict]:
    pairs = [(int(cm[t, p]), t, p) for t in range(len(classes)) for p in range(len(classes)) if t != p and cm[t, p]]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [{"true": classes[t], "predicted": classes[p], "count": c} for c, t, p in pairs[:top]]


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error over equal-width confidence bins, and the bins themselves."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else None
        conf = float(confidence[mask].mean()) if n else None
        if n:
            ece += abs(acc - conf) * n / len(confidence)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n, "accuracy": acc,
                      "confidence": conf})
    return {"ece": float(ece) if len(confidence) else None, "bins": bins, "table": table}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95 % by default); None for n = 0.

    Unlike the normal approximation p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    collapse to a single point at 0 or n successes: 4 of 4 right gives [0.51, 1], not [1, 1].
    """
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def small_test_note(count: int, interval: tuple[float, float] | None, splits_file: Path) -> str | None:
    """The warning for a test split too small to judge by, or None."""
    if not count or count >= MIN_TEST_IMAGES:
        return None
    lo, hi = interval
    return (f"the test split has only {count} images (under {MIN_TEST_IMAGES}): the test accuracy could be "
            f"anywhere from {100 * lo:.1f}% to {100 * hi:.1f}% (95% Wilson interval); add images or raise "
            f"--test-fraction and re-run split for a number to rely on ({splits_file})")


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], files: list[str]) -> dict:
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    confidence = probs.max(1) if len(probs) else np.zeros(0)
    n = len(classes)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(n))) if len(y_true) else np.zeros((n, n), dtype=np.int64)
    scores = per_class_scores(y_true, y_pred, classes)
    correct = y_pred == y_true
    interval = wilson_interval(int(np.trace(cm)), int(cm.sum()))
    return {
        "count": len(y_true),
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else None,
        "accuracy_ci95": list(interval) if interval else None,
        "macro_f1": macro_f1(cm, scores),
        "per_class": scores,
        "confusion_matrix": {"labels": classes, "rows": "true", "columns": "predicted", "counts": cm.tolist()},
        "most_confused": most_confused(cm, classes),
        "calibration": calibration(confidence, correct),
        "predictions": [
            {"file": f, "true": classes[t], "predicted": classes[p], "probability": float(c), "correct": bool(ok)}
            for f, t, p, c, ok in zip(files, y_true.tolist(), y_pred.tolist(), confidence.tolist(), correct.tolist())
        ],
    }


# ----------------------------------------------------------------------------------------------
# the stage


def evaluate(cfg: Config, paths: RunPaths, rt: Runtime) -> Path:
    """Write ``<out>/report/`` (metrics.json, the PNGs and index.html); returns the index.html path."""
    sweep_partials(paths.report, paths.metrics)
    splits = load_splits(paths)
    classes = splits["classes"]
    items = split_items(splits, "test")
    model, checkpoint, trained = load_trained_model(paths, classes)
    probs = probabilities_on_test(model, checkpoint, trained, paths, splits, rt, cfg)
    metrics = compute_metrics(np.array([label for _, label in items], dtype=np.int64), probs, classes,
                              [path for path, _ in items])
    metrics["classes"] = classes
    metrics["checkpoint"] = checkpoint
    metrics["trust"] = served_trust(cfg, paths, splits, checkpoint, items, rt)
    comparison = versus_previous(cfg, paths, splits, checkpoint, rt)
    if comparison:
        metrics["versus_previous"] = comparison
    note = (small_test_note(len(items), metrics["accuracy_ci95"], paths.splits) if items else
            f"the test split in {paths.splits} is empty: no accuracy to report; "
            "collect more images or raise --test-fraction and re-run split")
    if note:
        metrics["note"] = note
        print(f"evaluate: WARNING {note}")
    atomic_write_json(paths.report / "metrics.json", metrics)
    _record_test_score(paths, metrics, probs, items)
    index = report.write_report(paths, metrics)
    acc, ci = metrics["accuracy"], metrics["accuracy_ci95"]
    shown = "n/a" if acc is None else f"{100 * acc:.1f}% (95% interval {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)"
    print(f"evaluate: test accuracy {shown} on {len(items)} images ({checkpoint['file']}); report: {index}")
    return index


def versus_previous(cfg: Config, paths: RunPaths, splits: dict, checkpoint: dict, rt: Runtime) -> dict | None:
    """The exported model (when it is this checkpoint's) against the version before it (``jobs.versions.compare``)."""
    meta_file = paths.model / files.METADATA
    meta = read_json(meta_file) if meta_file.exists() else {}
    if not meta or (meta.get("split_hash"), meta.get("best_epoch")) != (splits["split_hash"], checkpoint["best_epoch"]):
        return None
    comparison = versions.compare(paths, meta, cfg.batch_size, rt.device)
    if comparison and "sets" in comparison:
        paired = comparison["sets"][versions.PREVIOUS_TEST_SPLIT]
        print(f"evaluate: version {comparison['version']} against {comparison['previous_version']} on "
              f"{comparison['previous_version']}'s test split: {paired['only_new_right']} images only the new one "
              f"got right, {paired['only_old_right']} only the old one (McNemar p = {paired['p_value']:.3g})")
        captures = comparison["sets"].get(versions.LABELLED_CAPTURES)
        if captures:
            print(f"evaluate: on the {captures['images']} labelled captures in this test split: version "
                  f"{comparison['version']} right on {captures['both_right'] + captures['only_new_right']}, "
                  f"{comparison['previous_version']} on {captures['both_right'] + captures['only_old_right']}")
    return comparison


def served_trust(cfg: Config, paths: RunPaths, splits: dict, checkpoint: dict, items: list[tuple[str, int]],
                 rt: Runtime) -> dict:
    """What the exported model answers, as served (``jobs.predict``: calibration and the OOD threshold the
    export fit): on the test split, and on ``cfg.ood_data`` (images of none of the classes) when given.

    ``{"note": why not}`` when model/ is missing, was exported from other weights, or fit no trust fields.
    An audited run's review page gains the test images the model abstained on.
    """
    meta_file = paths.model / files.METADATA
    meta = read_json(meta_file) if meta_file.exists() else {}
    if not meta:
        return {"note": f"{paths.model} not exported yet: run `python -m jobs export --out {paths.out}`, then "
                        "evaluate, to see calibrated probabilities and how the model treats unknown inputs"}
    if (meta.get("split_hash"), meta.get("best_epoch")) != (splits["split_hash"], checkpoint["best_epoch"]):
        return {"note": f"{paths.model} was exported from other weights than {checkpoint['file']}; re-run export"}
    if not meta.get("trust"):
        return {"note": "the export fit no calibration or OOD threshold (no val images)"}
    entry = meta["trust"]
    # On torch: every engine a server may choose was admitted for giving its answers (jobs/backends.py), and torch
    # keeps the figures reproducible from machine to machine (auto measures which engine is fastest here).
    test = list(predict(paths.model, [paths.out / p for p, _ in items], batch_size=cfg.batch_size, device=rt.device,
                        backend="torch"))
    y_true = np.array([label for _, label in items], dtype=np.int64)
    probs = np.array([r["probabilities"] for r in test]).reshape(len(test), len(splits["classes"]))
    correct = probs.argmax(1) == y_true if len(test) else np.zeros(0, bool)
    abstained = np.array([r["abstain"] for r in test], dtype=bool)
    abstained_on = [_example(r, paths.out) for r in test if r["abstain"]]
    if paths.audit.exists():  # the review page shows them beside the audit's findings, to keep, exclude or relabel
        write_run_review(paths, read_json(paths.audit), abstained_on)
    doc = {"score": entry["score"], "threshold": entry["threshold"], "keep": entry["keep"],
           "temperature": entry["temperature"], "min_confidence": entry.get("min_confidence"),
           "new_class": entry.get("new_class"),  # None for an export from before it, or of one class with val
           "calibration": calibration(probs.max(1) if len(test) else np.zeros(0), correct),
           "test": {"images": len(test), "abstained": int(abstained.sum()),
                    "abstain_rate": float(abstained.mean()) if len(test) else None,
                    "answered_accuracy": float(correct[~abstained].mean()) if (~abstained).any() else None,
                    "reasons": dict(Counter(r["abstain_reason"] for r in test if r["abstain"])),
                    "abstained_examples": abstained_on[:MAX_EXAMPLES]}}
    if cfg.ood_data:
        doc["ood_data"] = _ood_data(Path(cfg.ood_data), paths, rt, cfg.batch_size, [r["ood_score"] for r in test])
    return doc


def _ood_data(folder: Path, paths: RunPaths, rt: Runtime, batch_size: int, test_scores: list[float]) -> dict:
    """How the served model treats images of none of the classes: separation from the test split, abstain rate."""
    if not folder.is_dir():
        raise EvaluateError(f"ood_data {folder} is not a folder; pass a folder of images of none of the classes")
    answers = list(predict(paths.model, [folder], batch_size=batch_size, device=rt.device, backend="torch"))
    good = [r for r in answers if "error" not in r]
    scores = torch.tensor([r["ood_score"] for r in good], dtype=torch.float64)
    in_scores = torch.tensor(test_scores, dtype=torch.float64)
    separable = len(good) > 0 and len(test_scores) > 0
    passed = sorted((r for r in good if not r["abstain"]), key=lambda r: r["ood_score"])
    return {"folder": str(folder), "images": len(good), "unreadable": len(answers) - len(good),
            "abstain_rate": float(np.mean([r["abstain"] for r in good])) if good else None,
            "auroc": trust.auroc(in_scores, scores) if separable else None,
            "fpr_at_tpr": trust.fpr_at_tpr(in_scores, scores) if separable else None,
            "passed_examples": [_example(r, folder) for r in passed][:MAX_EXAMPLES],
            "abstained_examples": [_example(r, folder) for r in good if r["abstain"]][:MAX_EXAMPLES]}


def _example(answer: dict, root: Path) -> dict:
    top = answer["predictions"][0]
    return {"file": str(Path(answer["file"]).relative_to(root)), "predicted": top["label"],
            "probability": top["probability"], "ood_score": answer["ood_score"], "abstain": answer["abstain"],
            "abstain_reason": answer["abstain_reason"]}


def _record_test_score(paths: RunPaths, metrics: dict, probs: np.ndarray, items: list[tuple[str, int]]) -> None:
    """The run's metrics.json gets its top-level test numbers from here, the one place the test split is scored."""
    training = read_run_file(paths.metrics, f"re-run `python -m jobs train --out {paths.out}`", ("epochs",)) \
        if paths.metrics.exists() else {}
    true_p = probs[np.arange(len(items)), [label for _, label in items]] if items else np.zeros(0)
    loss = float(-np.log(np.clip(true_p, 1e-12, 1)).mean()) if items else None
    atomic_write_json(paths.metrics, {**training, "test_accuracy": metrics["accuracy"],
                                      "test_accuracy_ci95": metrics["accuracy_ci95"], "test_loss": loss,
                                      "test_count": metrics["count"], "classes": metrics["classes"]})
