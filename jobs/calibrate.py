"""Export-time fits that make a served answer one a person can trust (``handler.trust``).

On the model as it is served (BatchNorm folded, the serving precision of this machine's kind):

- a temperature for calibrated probabilities, fit on the val split's logits;
- the out-of-distribution score's state: a bank of training images' penultimate features, at most
  ``trust.DEFAULT_MAX_BANK`` of them, drawn per class (only those images go through the model);
- the threshold above which an image is "unlike the training images", keeping ``ood_keep`` of val;
- how well it would notice a new class like the known ones: each class left out in turn, on the features
  above (``trust.leave_one_class_out``; no further forward pass).

``export`` records the result in ``metadata.json["trust"]`` beside the score file; the handler, every
runtime and ``jobs predict`` load it with ``Trust.from_metadata``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from handler import model as models
from handler import precision, trust
from handler.preprocess import Preprocessor
from jobs.config import Config, RunPaths
from jobs.data import ImageFiles, load_splits, make_loader, split_items
from jobs.parity import Rows, ValOutputs


def outputs_of(model: torch.nn.Module, root: Path, items: list[tuple[str, int]], spec: dict, device: torch.device,
               dtype: torch.dtype | None, batch_size: int = 32, num_workers: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, logits, labels) of ``items`` through a ``handler.model.Classifier``, in order, fp32 on the CPU."""
    if not items:
        return torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    rows = Rows(len(items))
    for x, y in make_loader(ImageFiles(root, items, Preprocessor(spec)), batch_size, num_workers):
        rows.add(*models.forward(model, x, device, dtype), y)
    features, logits, labels = rows.result()
    return features, logits, labels


def fit_trust(cfg: Config, paths: RunPaths, meta: dict, state: dict[str, torch.Tensor], val: ValOutputs | None
              ) -> dict | None:
    """Fit and save what ``metadata.json["trust"]`` names, on ``val`` (the bf16 check's outputs; None, with a line
    saying why, without val images) and a bank of training images."""
    splits = load_splits(paths)
    train = split_items(splits, "train")
    if val is None:
        print("export: no val images: the answers carry uncalibrated probabilities and no ood_score")
        return None
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision.serve_dtype(meta, device)
    model = models.build_model(meta, state, device)
    labels = torch.tensor([label for _, label in train])
    bank = [train[i] for i in trust.stratified_subsample(labels, trust.DEFAULT_MAX_BANK, cfg.seed).tolist()]
    train_f, _, train_y = outputs_of(model, paths.out, bank, meta["preprocess"], device, dtype)
    (val_f, val_z), val_y = val.bf16 if dtype == torch.bfloat16 else val.fp32, val.labels
    fitted = trust.Trust.fit(train_f, train_y, val_f, val_z, val_y, keep=cfg.ood_keep,
                             min_confidence=cfg.min_confidence or None, seed=cfg.seed)
    entry = {**fitted.save(paths.model), "fit_on": {"train_images": len(bank), "val_images": len(val_y)}}
    new_class = _new_class(cfg, splits["classes"], train_f, train_y, val_f, val_z, val_y)
    if new_class is not None:
        entry["new_class"] = new_class
    print(f"export: temperature {fitted.temperature:.3f} (val NLL {_nll(val_z, val_y, 1.0):.4f} -> "
          f"{_nll(val_z, val_y, fitted.temperature):.4f}); \"unlike the training images\" above {entry['score']} "
          f"score {fitted.threshold:.4f} ({len(bank)} training images in the bank, keeps {cfg.ood_keep:.0%} of "
          f"{len(val_y)} val images; expect {fitted.expected_abstain_rate:.1%} of new images like them abstained on); "
          f"{time.perf_counter() - start:.1f} s")
    return entry


def _new_class(cfg: Config, classes: list[str], bank_f: torch.Tensor, bank_y: torch.Tensor, val_f: torch.Tensor,
               val_z: torch.Tensor, val_y: torch.Tensor) -> dict | None:
    """``trust.leave_one_class_out`` on the features just computed (no further forward pass), per class by name."""
    start = time.perf_counter()
    figures = trust.leave_one_class_out(bank_f, bank_y, val_f, val_z, val_y, cfg.capture_below, keep=cfg.ood_keep,
                                        min_confidence=cfg.min_confidence or None)
    if figures is None:
        print("export: a new class like one of yours: not measured (it needs val images of two classes or more)")
        return None
    figures["per_class"] = {classes[c]: v for c, v in figures["per_class"].items()}
    print(f"export: a new class like one of yours: about {figures['flagged']:.0%} flagged (abstained on), "
          f"{figures['captured']:.0%} captured (abstained on or under {cfg.capture_below} calibrated top probability; "
          f"{figures['known_captured']:.0%} of the known classes' val images), leaving each of "
          f"{len(figures['per_class'])} classes out in turn"
          f"{', carried one class on from leaving two out' if figures['extrapolated'] else ' (optimistic)'}; "
          f"{time.perf_counter() - start:.2f} s")
    return figures


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(trust.calibrated_logits(logits, temperature), labels))
