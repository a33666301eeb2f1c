"""Forward-pass rate of each engine (``handler.engines``) side by side: the in-process limit per backend.

    python -m bench.backends [--batch 8] [--threads 2] [--duration 3]

For ResNet-18 (seeded random weights: speed does not depend on them) and timm/tf_efficientnet_lite0 (the
real ImageNet weights, built offline by scripts/offline_weights.py), exported as ``jobs export`` does
(``jobs.backends.write_onnx``): torch fp32, torch bf16 autocast (where native), ONNX Runtime fp32,
OpenVINO in its bf16 (where native) and fp32, and OpenVINO on the graph quantized to int8 as
``serve_precision: int8`` exports it (``jobs.backends.write_int8_graph``, calibrated on the test fixture's
photos). Prints img/s per engine, each engine's ratio to the best torch, and the CPU flags; saves
bench/results/backends-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, save_result, seeded_resnet18
from handler import engines, files, precision
from handler import model as models
from jobs.backends import write_int8_graph, write_onnx

CPU = torch.device("cpu")
PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hymenoptera_small"
ARCHES = ("resnet18", "timm/tf_efficientnet_lite0")


def weights_of(arch: str, folder: Path) -> Path:
    """The state_dict file the benchmark serves for ``arch`` (1000 ImageNet classes)."""
    if arch == "resnet18":
        path = folder / "resnet18.pt"
        torch.save(seeded_resnet18(0).state_dict(), path)
        return path
    from scripts.offline_weights import build

    return build(Path(__file__).resolve().parents[1] / ".cache" / "weights" / "tf_efficientnet_lite0.pth")


def engines_of(arch: str, folder: Path, threads: int) -> dict[str, engines.Engine]:
    """Every engine and precision this CPU offers for ``arch``, by label."""
    meta = {"arch": arch, "num_classes": 1000, "input_size": [3, *[models.preprocess_spec(arch)["crop_size"]] * 2]}
    weights = weights_of(arch, folder)
    onnx_file = write_onnx(models.build_model(meta, weights, CPU), meta["input_size"], folder / files.ONNX)
    native = precision.native_bf16(CPU)
    found: dict[str, engines.Engine] = {"torch fp32": engines.TorchEngine(meta, folder, weights, CPU, "fp32")}
    if native:
        found["torch bf16"] = engines.TorchEngine(meta, folder, weights, CPU, "bf16")
    found["onnxruntime fp32"] = engines.graph_engine(engines.ONNXRUNTIME, onnx_file, threads)
    if native:
        found["openvino bf16"] = engines.graph_engine(engines.OPENVINO, onnx_file, threads, bf16=True)
    found["openvino fp32"] = engines.graph_engine(engines.OPENVINO, onnx_file, threads)
    calibration = [(str(p.relative_to(PHOTOS)), 0) for p in sorted(PHOTOS.glob("*/*.jpg"))]
    int8_graph = write_int8_graph(onnx_file, PHOTOS, calibration, models.preprocess_spec(arch))
    found["openvino int8"] = engines.graph_engine(engines.OPENVINO_INT8, int8_graph, threads, bf16=native)
    return found


def rate(engine: engines.Engine, batch: torch.Tensor, duration: float) -> float:
    """Median img/s of the batches run in ``duration`` seconds, after two warm-up batches."""
    for _ in range(2):
        engine.run(batch)
    times, end = [], time.perf_counter() + duration
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        engine.run(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of timed batches per engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine("cpu")
    print(f"{info['cpu']}; flags {' '.join(info['cpu_flags'])}; batch {args.batch}, {args.threads} threads")
    results = {}
    for arch in ARCHES:
        with tempfile.TemporaryDirectory() as tmp:
            found = engines_of(arch, Path(tmp), args.threads)
            batch = torch.randn(args.batch, 3, *[models.preprocess_spec(arch)["crop_size"]] * 2)
            rates = {label: round(rate(engine, batch, args.duration), 1) for label, engine in found.items()}
        best_torch = max(r for label, r in rates.items() if label.startswith("torch"))
        ratios = {label: round(r / best_torch, 2) for label, r in rates.items()}
        results[arch] = {"images_per_s": rates, "vs_best_torch": ratios}
        print(f"{arch}: " + ", ".join(f"{label} {r:.1f} img/s ({ratios[label]:.2f}x)" for label, r in rates.items()))
    save_result("backends", "cpu", {"batch": args.batch, "threads": args.threads, "duration_s": args.duration,
                                    "arches": results})


if __name__ == "__main__":
    main()
