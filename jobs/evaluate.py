"""Evaluate: score the best checkpoint on the test split and write the ``report/`` folder.

Per-image probabilities are collected once; every number in ``report/metrics.json`` (accuracy,
per-class precision/recall/F1, confusion matrix, calibration) is derived from them, so the
numbers agree with each other by construction. ``jobs.report`` turns them into pictures and
one self-contained ``index.html``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs import report
from jobs.config import Config, RunPaths
from jobs.data import ImageFiles, load_splits, make_loader, split_items
from jobs.errors import JobError
from jobs.fileio import atomic_write_json
from jobs.model import build_model, head_module
from jobs.presets import eval_transform
from jobs.runtime import Runtime, default_num_workers

ECE_BINS = 15
TOP_CONFUSED = 5


class EvaluateError(JobError):
    pass


def load_checkpoint(paths: RunPaths) -> tuple[Path, dict]:
    """``best.pt``, else ``last.pt`` (a run killed before any epoch had a val score)."""
    for name in ("best.pt", "last.pt"):
        path = paths.checkpoints / name
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure to read means the same to the user
                raise EvaluateError(f"checkpoint {path} is unreadable ({type(e).__name__}); re-run "
                                    f"`python -m jobs train --out {paths.out} --fresh`") from None
            if state.get("head_only"):
                raise EvaluateError(f"checkpoint {path} holds only the head (training stopped inside the head stage); "
                                    f"finish it with `python -m jobs train --out {paths.out}`")
            return path, state
    raise EvaluateError(f"no checkpoint in {paths.checkpoints}; run `python -m jobs train --out {paths.out}` first")


def _load_model(cfg: Config, paths: RunPaths, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    path, state = load_checkpoint(paths)
    model = build_model(cfg.arch, len(classes), "none")  # every weight comes from the checkpoint
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError):
        raise EvaluateError(f"checkpoint {path} does not fit arch '{cfg.arch}' with {len(classes)} classes; "
                            "pass the --arch the run was trained with") from None
    progress = state.get("progress", {})
    return model, {"file": path.name, "stage": progress.get("stage"), "best_epoch": progress.get("best_epoch")}


@torch.no_grad()
def predict_split(model: torch.nn.Module, paths: RunPaths, items: list[tuple[str, int]], cfg: Config,
                  rt: Runtime) -> np.ndarray:
    """Softmax probabilities (N, C) for ``items``, in their order."""
    model.eval().to(rt.device, memory_format=rt.memory_format())
    loader = make_loader(ImageFiles(paths.out, items, eval_transform()), cfg.batch_size,
                         default_num_workers(cfg, rt), pin_memory=rt.device.type == "cuda")
    chunks = []
    for images, _ in loader:
        images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format())
        with rt.autocast():
            logits = model(images)
        chunks.append(logits.float().softmax(1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, head_module(model).out_features))


# ----------------------------------------------------------------------------------------------
# metrics: pure functions of (true labels, probabilities)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Counts; rows = true class, columns = predicted class."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_scores(cm: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Precision/recall/F1 per class; 0.0 where undefined (no predictions or no support), as sklearn does."""
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    scores = {}
    for i, name in enumerate(classes):
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        scores[name] = {"precision": float(p), "recall": float(r), "f1": float(f1), "support": int(support[i])}
    return scores


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


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], files: list[str]) -> dict:
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    confidence = probs.max(1) if len(probs) else np.zeros(0)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    scores = per_class_scores(cm, classes)
    correct = y_pred == y_true
    return {
        "count": len(y_true),
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else None,
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
    splits = load_splits(paths)
    classes = splits["classes"]
    items = split_items(splits, "test")
    model, checkpoint = _load_model(cfg, paths, classes)
    probs = predict_split(model, paths, items, cfg, rt)
    metrics = compute_metrics(np.array([label for _, label in items], dtype=np.int64), probs, classes,
                              [path for path, _ in items])
    metrics["classes"] = classes
    metrics["checkpoint"] = checkpoint
    if not items:
        metrics["note"] = (f"the test split in {paths.splits} is empty: no accuracy to report; "
                           "collect more images or raise --test-fraction and re-run split")
        print(f"evaluate: WARNING {metrics['note']}")
    atomic_write_json(paths.report / "metrics.json", metrics)
    index = report.write_report(paths, metrics)
    acc = metrics["accuracy"]
    print(f"evaluate: test accuracy {'n/a' if acc is None else f'{acc:.4f}'} on {len(items)} images "
          f"({checkpoint['file']}); report: {index}")
    return index
