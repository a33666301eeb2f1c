"""Which number format a model runs in: native bf16 where the hardware has it and the export allowed it.

bf16 autocast roughly triples a CPU's throughput where the CPU has AMX/AVX512-BF16, but rounds every
activation; the export stage checks the answers agree with fp32 on the val split and records its choice
in ``metadata.json["serve_precision"]``. Training asks the same question (``native_bf16``) when it picks
its autocast dtype, so the two never disagree about a machine.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

BF16_MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 on the val split that lets a model serve in bf16


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: AVX512-BF16/AMX on the CPU, bf16 tensor cores on the GPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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
