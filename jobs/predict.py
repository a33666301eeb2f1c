"""Offline prediction from an exported model folder: what the server answers, without a server."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from jobs.errors import JobError
from jobs.fileio import read_json
from jobs.presets import decode_rgb, eval_transform


def load_exported(model_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model from ``metadata.json`` alone, as the handler does, and load ``model.pt``."""
    meta_file, weights = model_dir / "metadata.json", model_dir / "model.pt"
    if not meta_file.exists() or not weights.exists():
        raise JobError(f"{model_dir} lacks metadata.json or model.pt; pass the model/ folder of a finished run")
    meta = read_json(meta_file)
    model = models.get_model(meta["arch"], weights=None, num_classes=meta["num_classes"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), meta


@torch.no_grad()
def predict_files(model_dir: Path, files: list[Path], topk: int | None = None) -> list[dict]:
    model, meta = load_exported(Path(model_dir))
    transform = eval_transform(**meta["preprocess"])
    k = min(topk or meta["topk"], meta["num_classes"])
    results = []
    for f in files:
        try:
            x = transform(decode_rgb(Path(f).read_bytes(), meta["preprocess"]["resize_size"]))
        except (OSError, ValueError) as e:
            results.append({"file": str(f), "error": str(e)})
            continue
        probs = torch.softmax(model(x.unsqueeze(0)).float(), dim=1)[0]
        top = torch.topk(probs, k)
        results.append({"file": str(f), "probabilities": probs.tolist(), "predictions": [
            {"label": meta["classes"][i], "index": i, "probability": p}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ]})
    return results
