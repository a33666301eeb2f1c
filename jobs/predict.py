"""Offline prediction from an exported model folder: what the server answers, without a server.

The model, preprocessing, precision and top-k come from ``jobs/contract.py``, the module the
TorchServe handler uses, so the probabilities match the server's (tests/test_handler.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from jobs import contract
from jobs.errors import JobError
from jobs.fileio import read_json

CPU = torch.device("cpu")


def load_exported(model_dir: Path) -> tuple[nn.Module, torch.dtype | None, dict]:
    """(model, autocast dtype, metadata) from ``metadata.json`` and the weights, as the handler loads them."""
    meta_file, weights = model_dir / "metadata.json", model_dir / "model.pt"
    if not meta_file.exists() or not weights.exists():
        raise JobError(f"{model_dir} lacks metadata.json or model.pt; pass the model/ folder of a finished run")
    meta = read_json(meta_file)
    model, dtype, _ = contract.load_serving_model(meta, model_dir, weights, CPU)
    return model, dtype, meta


def predict_files(model_dir: Path, files: list[Path], topk: int | None = None) -> list[dict]:
    """One result per file: all probabilities and the top-k, or the reason the file is not an image.

    Runs in the precision ``metadata.json`` records for serving (int8 where offered; bf16 only on a CPU
    with native bf16).
    """
    model, dtype, meta = load_exported(Path(model_dir))
    preprocess = contract.Preprocessor(meta)
    k = topk or meta["topk"]
    results = []
    for f in files:
        try:
            x = preprocess(Path(f).read_bytes())
        except (OSError, ValueError) as e:
            results.append({"file": str(f), "error": str(e)})
            continue
        probs = contract.probabilities(model, x.unsqueeze(0), CPU, dtype)
        results.append({"file": str(f), "probabilities": probs[0].tolist(),
                        "predictions": contract.top_k(probs, k, meta["classes"])[0]})
    return results
