"""The serving contract: model from ``metadata.json``, preprocessing, precision, top-k, serving plan.

The TorchServe handler and ``jobs predict`` both import this module, so what the server answers is
what ``jobs predict`` prints. ``jobs archive`` packs this file into the .mar beside ``presets.py`` and
``cpus.py``; like them, it imports nothing else from ``jobs`` (only torch, torchvision and Pillow).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

try:  # inside the .mar: TorchServe puts the extracted model folder on sys.path
    import cpus
    import presets
except ImportError:  # from the repository
    from jobs import cpus, presets

logger = logging.getLogger(__name__)

BF16_MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 on the val split that lets a model serve in bf16
INT8_MAX_ACCURACY_LOSS = 0.005  # val accuracy int8 may lose against fp32 (0.5 points) and still be offered
INT8_WEIGHTS = "model-int8.pt"  # beside model.pt when the export offered int8
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers carry the size


def build_model(meta: dict, weights: Path | dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """``meta["arch"]`` with ``meta["num_classes"]`` outputs, ``weights`` (a bare state_dict or its file) loaded,
    channels_last, in eval mode."""
    model = models.get_model(meta["arch"], weights=None, num_classes=meta["num_classes"])
    state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return fold_batchnorm(model).to(device, memory_format=torch.channels_last)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with every BatchNorm folded into the convolution before it.

    The same function up to float rounding (7e-7 on ResNet-18 logits), minus one memory-bound op per
    convolution: 8 % off a served image's forward pass and 10-15 % off frozen feature extraction on
    the CPU (ResNet-18, 2 cores). Inference only: the copy has no BatchNorm statistics to train. An
    architecture torch.fx cannot trace is returned unfolded (in eval mode), with a log line.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(module).eval(), inplace=True)
    except Exception as e:  # torch.fx raises many kinds for an untraceable forward
        logger.info("BatchNorm not folded (%s: %s); running %s unfolded", type(e).__name__, e, type(module).__name__)
        return module.eval()


def _int8_prepared(meta: dict, model: nn.Module) -> nn.Module:
    """FX graph-mode static quantization for x86 (FBGEMM/oneDNN kernels; no compiler needed at start-up)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = "x86"
    return prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (torch.zeros(1, *meta["input_size"]),))


def quantize_int8(meta: dict, model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of ``model`` (CPU), its activation ranges observed on the ``calibration`` batches."""
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _int8_prepared(meta, copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format))
    with torch.inference_mode():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def build_int8_model(meta: dict, weights: Path) -> nn.Module:
    """The int8 model the export wrote (``INT8_WEIGHTS``), rebuilt as ``quantize_int8`` built it."""
    from torch.ao.quantization.quantize_fx import convert_fx

    model = fold_batchnorm(models.get_model(meta["arch"], weights=None, num_classes=meta["num_classes"]))
    with warnings.catch_warnings():  # the observers are empty on purpose: the scales come from the file
        warnings.filterwarnings("ignore", "must run observer", UserWarning)
        quantized = convert_fx(_int8_prepared(meta, model))
    quantized.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return quantized.eval()


def load_serving_model(meta: dict, model_dir: Path, weights: Path, device: torch.device,
                       requested: str = "auto") -> tuple[nn.Module, torch.dtype | None, str]:
    """(model, autocast dtype, precision name) as the handler and ``jobs predict`` serve it.

    int8 where the export offered it (``serve_precision.choice``), on the CPU, unless fp32/bf16/fp16
    is requested; otherwise ``build_model`` with ``serve_dtype``.
    """
    if (requested == "auto" and device.type == "cpu" and (meta.get("serve_precision") or {}).get("choice") == "int8"
            and (model_dir / INT8_WEIGHTS).is_file()):
        return build_int8_model(meta, model_dir / INT8_WEIGHTS), None, "int8"
    dtype = serve_dtype(meta, device, requested)
    return build_model(meta, weights, device), dtype, {None: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp16")


class Preprocessor:
    """Image bytes -> the normalized tensor the model was evaluated on, rebuilt from ``meta["preprocess"]``."""

    def __init__(self, meta: dict):
        self.spec = meta["preprocess"]
        self.resize_size = int(self.spec["resize_size"])
        self.transform = presets.eval_transform(**self.spec)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(presets.decode_rgb(data, self.resize_size))

    def decoded_pixels(self, fmt: str, size: tuple[int, int]) -> int:
        """Pixels ``decode_rgb`` decodes for an image of ``size``: large JPEGs decode at a reduced DCT scale."""
        w, h = size
        scale = 1
        while fmt == "JPEG" and scale < 8 and min(w, h) // (scale * 2) >= self.resize_size:
            scale *= 2
        return math.ceil(w / scale) * math.ceil(h / scale)


def image_header(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """("PNG"|"JPEG", (width, height)) from a PNG's IHDR or a JPEG's frame header, without decoding;
    None for other formats or a header cut short."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return "PNG", struct.unpack(">II", data[16:24])
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in JPEG_SOF_MARKERS and i + 9 <= len(data):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return "JPEG", (w, h)
        i += 2 + length
    return None


# -- precision -------------------------------------------------------------------------------------

def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: AVX512-BF16/AMX on the CPU, bf16 tensor cores on the GPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def serve_dtype(meta: dict, device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype to serve with (None = fp32).

    ``auto`` serves bf16 only where it is native *and* the export-time parity check chose it
    (``meta["serve_precision"]``); ``bf16``/``fp16`` force autocast even where it is emulated.
    """
    if requested == "fp32":
        return None
    if requested in {"bf16", "fp16"}:
        if requested == "bf16" and not native_bf16(device):
            logger.warning("bf16 forced on %s without native bf16: emulated, slower than fp32", device)
        return torch.bfloat16 if requested == "bf16" else torch.float16
    recorded = (meta.get("serve_precision") or {}).get("choice", "fp32")
    if recorded == "int8":  # on a device int8 does not serve on: bf16 where its own check passed
        recorded = "bf16" if (meta["serve_precision"].get("bf16_top1_agreement") or 0) >= BF16_MIN_AGREEMENT else ""
    if recorded != "bf16":
        return None
    if not native_bf16(device):
        logger.warning("model exported for bf16, but %s has no native bf16: serving fp32", device)
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def probabilities(model: nn.Module, batch: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
                  chunk: int = 64) -> torch.Tensor:
    """Softmax probabilities (n, classes) as fp32 on the CPU; one forward pass per ``chunk`` images."""
    if not len(batch):
        return torch.empty(0)
    out = []
    for part in batch.split(chunk):
        x = part.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out)


def top_k(probs: torch.Tensor, k: int, classes: list[str]) -> list[list[dict[str, Any]]]:
    """Per row of ``probs``: the ``k`` most likely classes, most likely first."""
    top = torch.topk(probs, min(k, len(classes)), dim=1)
    return [[{"label": classes[i], "index": i, "probability": p} for p, i in zip(ps, idx, strict=True)]
            for ps, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


# -- serving plan ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServingPlan:
    """Workers, torch threads per worker and TorchServe batching for the machine that serves."""

    workers: int
    threads: int
    batch_size: int
    max_batch_delay_ms: int
    solo_threads: int  # torch threads for a batch of one image (see serving_plan)

    def model_settings(self) -> dict[str, int]:
        """The per-model keys of TorchServe's ``models`` setting in config.properties."""
        return {"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms}


def serving_plan(cores: int | None = None, gpus: int | None = None) -> ServingPlan:
    """Choose from the machine, not from constants tuned on one CPU.

    GPU: one worker per GPU, big batches, a short batch delay (the GPU is idle while it waits).
    CPU: several single-digit-thread workers rather than one worker on every core. Intra-op threads
    wait on each other at every layer, so one thread preempted by the TorchServe frontend, the
    load or a neighbour stalls the whole forward pass; separate workers also decode in parallel
    (bench/serve.py on 2 cores: two 1-thread processes 34-36 img/s, one 2-thread process 24-27).
    Threads grow to 4 per worker on big machines, where that many workers' model copies would cost
    more memory than they win. But a lone request on one thread is slow (85 ms p50 over HTTP against
    58 on both cores), so a batch of one image -- TorchServe found nothing else queued: low load --
    runs on ``solo_threads`` (up to 4 cores), and batches of several go back to ``threads``. A 1 ms
    batch delay on the CPU: a batch is whatever queued while the worker was busy, and a lone request
    waits at most 1 ms (0 would make TorchServe stop collecting after the second request).
    """
    cores = cores or cpus.usable_cpus()
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus:
        threads = max(1, cores // gpus)
        return ServingPlan(workers=gpus, threads=threads, batch_size=32, max_batch_delay_ms=5, solo_threads=threads)
    threads = max(1, min(4, cores // 4))
    return ServingPlan(workers=max(1, cores // threads), threads=threads, batch_size=4, max_batch_delay_ms=1,
                       solo_threads=min(cores, max(threads, 4)))
