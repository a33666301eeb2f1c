"""The engines a served model runs on, behind one interface: a batch in, (features, logits) out.

- ``TorchEngine``: PyTorch eager on the exported state_dict, in the precision the export chose (fp32, bf16
  autocast where native, int8 where offered: ``handler.model.load_serving_model``).
- ``OnnxRuntimeEngine`` and ``OpenVinoEngine``: the exported ``model.onnx`` (the same ``Classifier``, its
  BatchNorm folded), fp32; OpenVINO in its own bf16 where the export's check passed in bf16 and the CPU has it.
- ``OpenVinoEngine`` on ``model-int8.xml`` (``openvino-int8``): that graph quantized to int8 by NNCF,
  calibrated on training images, where the export was asked for int8 (``serve_precision: int8``).

Only an engine the export admitted (``metadata.json["backends"][name]["passed"]``: the same answers as the
state_dict on the val split) is a candidate, and only one whose library imports. ``serve_backend``
names one, or ``auto``: each candidate runs a few small batches when the worker starts, with the
worker's threads, and the fastest serves. Anything that stops an engine from loading leaves torch
serving, with one line saying why. PyTorch alone serves on a GPU (the ONNX engines here are CPU builds).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handler import files, precision
from handler import model as models

logger = logging.getLogger(__name__)

ONNX_INPUT, ONNX_OUTPUTS = "images", ("features", "logits")  # Classifier.forward's order
TORCH, ONNXRUNTIME, OPENVINO, OPENVINO_INT8 = "torch", "onnxruntime", "openvino", "openvino-int8"
ONNX_ENGINES = (ONNXRUNTIME, OPENVINO)  # the engines of model.onnx as written
GRAPH_ENGINES = (*ONNX_ENGINES, OPENVINO_INT8)  # every engine of a graph file the export writes
GRAPH_FILES = {ONNXRUNTIME: files.ONNX, OPENVINO: files.ONNX, OPENVINO_INT8: files.INT8_GRAPH}
BACKENDS = ("auto", TORCH, *GRAPH_ENGINES)
# auto: a warm-up and TIMED_RUNS timed runs of a TIMED_BATCH-image batch per candidate. ResNet-18 fp32 runs
# 4 images in about 80 ms on 2 cores: the three candidates together stay well under a second.
TIMED_BATCH, TIMED_RUNS = 4, 2
CHUNK = 64  # images per forward pass: bounds the activations' memory for a large batch


class Engine(ABC):
    """One way to run the served ``Classifier``. ``name``: torch, onnxruntime or openvino; ``precision``: the
    number format it computes in (fp32, bf16, fp16, int8)."""

    name: str
    precision: str

    def run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of a batch of input tensors, fp32 on the CPU; one forward pass per ``CHUNK`` images."""
        if not len(batch):
            return torch.empty(0, 0), torch.empty(0, 0)
        parts = [self._forward(part) for part in batch.split(CHUNK)]
        return torch.cat([f for f, _ in parts]), torch.cat([z for _, z in parts])

    @abstractmethod
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchEngine(Engine):
    name = TORCH

    def __init__(self, meta: dict, model_dir: Path, weights: Path, device: torch.device, requested: str = "auto"):
        self.device = device
        self.model, self.amp_dtype, self.precision = models.load_serving_model(meta, model_dir, weights, device,
                                                                               requested)

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return models.forward(self.model, batch, self.device, self.amp_dtype, CHUNK)


class OnnxRuntimeEngine(Engine):
    name, precision = ONNXRUNTIME, "fp32"

    def __init__(self, onnx_file: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
        self.session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: batch.float().contiguous().numpy()})
        return torch.from_numpy(features), torch.from_numpy(logits)


class OpenVinoEngine(Engine):
    """``graph``: ``model.onnx``, or its int8 IR (``int8``: the layers NNCF left in float run in bf16 where
    ``bf16``)."""

    def __init__(self, graph: Path, threads: int, bf16: bool, int8: bool = False):
        import openvino

        self.name = OPENVINO_INT8 if int8 else OPENVINO
        self.precision = "int8" if int8 else "bf16" if bf16 else "fp32"
        # OpenVINO picks bf16 by itself on a CPU that has it: the hint makes the checked precision the served one.
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = openvino.Core().compile_model(str(graph), "CPU", config)
        self.outputs = [self.compiled.output(name) for name in ONNX_OUTPUTS]
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: runtimes may call from more than one thread

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            results = self.request.infer({ONNX_INPUT: batch.float().contiguous().numpy()})
            # The request reuses its output buffers on the next call: copy them out.
            features, logits = (torch.from_numpy(results[output].copy()) for output in self.outputs)
        return features, logits


def graph_engine(name: str, graph: Path, threads: int, bf16: bool = False) -> Engine:
    """``name``'s engine on ``graph`` (its ``GRAPH_FILES`` file; ``bf16``: OpenVINO's own); ImportError where its
    library is not installed."""
    if name == ONNXRUNTIME:
        return OnnxRuntimeEngine(graph, threads)
    return OpenVinoEngine(graph, threads, bf16, int8=name == OPENVINO_INT8)


def refusal(name: str, meta: dict, model_dir: Path) -> str | None:
    """Why the export did not admit ``name`` (None: it did)."""
    record = (meta.get("backends") or {}).get(name) or {}
    if name == OPENVINO_INT8 and not record:
        return "not asked for (export with serve_precision int8 quantizes model.onnx)"
    if not (model_dir / GRAPH_FILES[name]).is_file():
        return f"{model_dir / GRAPH_FILES[name]} is missing (`jobs export` writes it)"
    if not record.get("passed"):
        return f"the export's check did not admit it ({record.get('reason') or 'not checked'})"
    return None


@dataclass
class Choice:
    """The engine that serves and why, in one line (the worker's log, ``ImageClassifier.backend``)."""

    engine: Engine
    why: str


def choose(meta: dict, model_dir: Path, weights: Path, device: torch.device, backend: str = "auto",
           requested_precision: str = "auto") -> Choice:
    """The engine ``serve_backend`` = ``backend`` asks for on this machine; torch where it cannot be had."""
    if backend not in BACKENDS:
        raise ValueError(f"serve_backend {backend!r} is not one of {', '.join(BACKENDS)}; fix the archive's "
                         "model-config.yaml (handler: backend) or the --backend option")

    def on_torch() -> TorchEngine:
        return TorchEngine(meta, model_dir, weights, device, requested_precision)

    if backend == TORCH:
        return Choice(on_torch(), "serve_backend torch")
    if device.type != "cpu":
        return Choice(on_torch(), f"only torch serves on {device.type}")
    loaded, refused = [], []
    # auto: the int8 graph only where the export was asked for it (the others are recorded by every export)
    auto = [*ONNX_ENGINES, *([OPENVINO_INT8] if OPENVINO_INT8 in (meta.get("backends") or {}) else [])]
    for name in [backend] if backend != "auto" else auto:
        why_not = refusal(name, meta, model_dir)
        if why_not is None:
            try:
                loaded.append(_load_graph(name, meta, model_dir, device, requested_precision))
                continue
            except Exception as e:  # noqa: BLE001 -- not installed, or a file it cannot read: torch serves
                why_not = f"it did not load ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        refused.append(f"{name}: {why_not}")
    if backend != "auto":
        if loaded:
            return Choice(loaded[0], f"serve_backend {backend}")
        logger.warning("serve_backend %s; serving torch", refused[0])
        return Choice(on_torch(), f"serve_backend {backend} unavailable ({refused[0]}); torch")
    candidates = [on_torch(), *loaded]
    if len(candidates) == 1:
        return Choice(candidates[0], f"auto: torch is the only candidate ({'; '.join(refused)})")
    start = time.perf_counter()
    rates = {engine: images_per_s(engine, meta["input_size"]) for engine in candidates}
    fastest = max(rates, key=rates.get)
    measured = ", ".join(f"{e.name} {e.precision} {r:.0f}" for e, r in rates.items())
    left_out = f"; not candidates: {'; '.join(refused)}" if refused else ""
    return Choice(fastest, f"auto: the fastest of {measured} img/s ({TIMED_BATCH}-image batches, "
                           f"{torch.get_num_threads()} threads, measured in {time.perf_counter() - start:.1f} s)"
                           f"{left_out}")


def _load_graph(name: str, meta: dict, model_dir: Path, device: torch.device, requested_precision: str) -> Engine:
    """``name``'s engine on its graph file, with the worker's threads; ImportError where it is not installed."""
    checked = meta["backends"][name].get("precision")
    if checked == "int8" and requested_precision != "auto":  # a person asked for this precision, not int8
        raise ValueError(f"the handler asks for precision {requested_precision}")
    bf16 = checked in ("bf16", "int8") and requested_precision != "fp32" and precision.native_bf16(device)
    return graph_engine(name, model_dir / GRAPH_FILES[name], torch.get_num_threads(), bf16)


def images_per_s(engine: Engine, input_size: list[int]) -> float:
    """The best of ``TIMED_RUNS`` timed runs of a ``TIMED_BATCH``-image batch, after a warm-up."""
    batch = torch.zeros(TIMED_BATCH, *input_size)
    engine.run(batch)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        engine.run(batch)
        best = min(best, time.perf_counter() - start)
    return TIMED_BATCH / best


def describe(choice: Choice) -> dict[str, Any]:
    """What a runtime shows of the choice: engine name, precision and why."""
    return {"backend": choice.engine.name, "precision": choice.engine.precision, "why": choice.why}
