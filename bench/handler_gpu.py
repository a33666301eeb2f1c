"""The handler's own path on a GPU (no TorchServe: the GPU machine has no Java), against the bare model.

    python -m bench.handler_gpu [--images DIR] [--batch 32] [--duration 20] [--device cuda]

``ClassifierHandler`` is driven in-process with TorchServe's real Context (gpu_id 0),
batch after batch of real JPEG request bodies: parse, header checks, decode + preprocess on the
worker's thread pool, forward in the precision the handler picks, top-k. The bare-model limit is the
forward pass alone on already preprocessed batches on the device, best of fp32 and bf16 autocast.
Prints handler img/s, the share of preprocess in preprocess + forward time, and handler/limit. Results:
bench/results/handler_gpu-<device>.json. Random resnet18 weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from handler import model as models
from handler import precision
from handler.classifier_handler import ClassifierHandler
from jobs.fileio import atomic_write_json
from tests.torchserve_fixture import batch_context, export_random_model, handler_context

REPO = Path(__file__).resolve().parents[1]

SHARED_VAL = REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"
FIXTURES = REPO / "tests" / "fixtures" / "hymenoptera_small"


def timed(step, duration: float) -> tuple[int, float]:
    """Call ``step()`` (returns images done) until ``duration`` s have passed; (images, seconds)."""
    step()  # warm-up
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        images += step()
    return images, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=SHARED_VAL if SHARED_VAL.is_dir() else FIXTURES)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    photos = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_random_model(Path(tmp), ["ants", "bees"], arch="resnet18").model
        ctx = handler_context(model_dir, {"precision": "bf16" if precision.native_bf16(device) else "fp32"},
                              gpu_id=0 if device.type == "cuda" else None)
        handler = ClassifierHandler()
        handler.initialize(ctx)
        batches = [photos[i:i + args.batch] for i in range(0, len(photos) - args.batch + 1, args.batch)]
        cursor = iter(range(10**9))
        split = {"preprocess_s": 0.0, "forward_s": 0.0}

        def handler_step() -> int:
            """handle() stage by stage, timed the way it reports PreprocessTime and ForwardTime."""
            rows = [{"body": bytearray(b)} for b in batches[next(cursor) % len(batches)]]
            handler.context = batch_context(ctx, [{} for _ in rows])
            t0 = time.perf_counter()
            batch = handler.preprocess(rows)
            t1 = time.perf_counter()
            handler.inference(batch)  # its probabilities come back to the CPU: synchronized
            t2 = time.perf_counter()
            out = handler.postprocess(batch)
            assert all("predictions" in o for o in out), out[:1]
            split["preprocess_s"] += t1 - t0
            split["forward_s"] += t2 - t1
            return len(rows)

        served, served_s = timed(handler_step, args.duration)
        inputs = torch.stack([handler.preprocessor(b) for b in batches[0]])
        limits = {}
        for name, dtype in {"fp32": None, "bf16": torch.bfloat16}.items():
            if dtype is not None and not precision.native_bf16(device):
                continue

            def forward_step(dtype: torch.dtype | None = dtype) -> int:
                models.forward(handler.classifier.engine.model, inputs, device, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return len(inputs)

            done, seconds = timed(forward_step, args.duration / 2)
            limits[name] = round(done / seconds, 1)
    rate = round(served / served_s, 1)
    result = {"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "batch": args.batch, "photos": len(photos), "handler_images_per_s": rate,
              "handler_precision": handler.classifier.precision, "bare_forward_images_per_s": limits,
              "preprocess_share_of_handler": round(split["preprocess_s"] / sum(split.values()), 3),
              "handler_over_limit": round(rate / max(limits.values()), 3)}
    print(json.dumps(result))
    atomic_write_json(REPO / "bench" / "results" / f"handler_gpu-{device.type}.json", result)


if __name__ == "__main__":
    main()
