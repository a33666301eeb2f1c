"""Export-time precision check: may this model serve in bf16?

bf16 autocast roughly triples a CPU's throughput where the CPU has AMX/AVX512-BF16, but it rounds
every activation. The export stage runs the val split through the model twice, fp32 and bf16
autocast, and records in ``metadata.json["serve_precision"]`` whether their top-1 answers agree on
at least ``contract.BF16_MIN_AGREEMENT`` of the images. The handler and ``jobs predict`` serve bf16
only where it is recorded here *and* native on the machine (``contract.serve_dtype``).
"""

from __future__ import annotations

import time

import torch

from jobs import contract
from jobs.config import RunPaths
from jobs.data import ImageFiles, load_splits, make_loader, split_items


def bf16_parity(paths: RunPaths, meta: dict, state: dict[str, torch.Tensor], batch_size: int = 32) -> dict:
    """``{"choice": "bf16"|"fp32", "bf16_top1_agreement", "val_images", "checked_on", "native_bf16"}``.

    Where bf16 is not native the check is emulated: slower, the same rounding, the same answer.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    items = split_items(load_splits(paths), "val")
    record = {"checked_on": device.type, "native_bf16": contract.native_bf16(device), "val_images": len(items),
              "min_agreement": contract.BF16_MIN_AGREEMENT}
    if not items:
        return {"choice": "fp32", "bf16_top1_agreement": None, **record}
    model = contract.build_model(meta, state, device)
    loader = make_loader(ImageFiles(paths.out, items, contract.Preprocessor(meta).transform), batch_size, 0)
    start, agree = time.perf_counter(), 0
    for x, _ in loader:
        fp32 = contract.probabilities(model, x, device, None).argmax(1)
        bf16 = contract.probabilities(model, x, device, torch.bfloat16).argmax(1)
        agree += int((fp32 == bf16).sum())
    rate = agree / len(items)
    choice = "bf16" if rate >= contract.BF16_MIN_AGREEMENT else "fp32"
    print(f"export: bf16 top-1 agreement with fp32 {rate:.4f} on {len(items)} val images -> serve {choice} "
          f"({time.perf_counter() - start:.1f}s on {device.type}{'' if record['native_bf16'] else ', emulated bf16'})")
    return {"choice": choice, "bf16_top1_agreement": round(rate, 4), **record}
