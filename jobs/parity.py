"""Export-time precision checks: may this model serve in bf16, or int8?

bf16 autocast roughly triples a CPU's throughput where the CPU has AMX/AVX512-BF16, but it rounds
every activation. The export stage runs the val split through the model twice, fp32 and bf16
autocast, and records in ``metadata.json["serve_precision"]`` whether their top-1 answers agree on
at least ``handler.precision.BF16_MIN_AGREEMENT`` of the images. The handler and ``jobs predict`` serve bf16
only where it is recorded here *and* native on the machine (``handler.precision.serve_dtype``).

With ``serve_precision: int8`` the export also quantizes the model (FX static quantization, x86
kernels, calibrated on training images) and offers it -- writes ``model-int8.pt`` and records
``choice: int8`` -- only when it loses at most 0.5 points of val accuracy against fp32 *and* its
forward pass beats the best of fp32 and native bf16 on this machine.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from handler import files, precision
from handler import model as models
from handler.preprocess import Preprocessor
from jobs.config import Config, RunPaths
from jobs.data import ImageFiles, load_splits, make_loader, split_items
from jobs.fileio import atomic_torch_save

INT8_CALIBRATION_IMAGES = 64
CPU = torch.device("cpu")


Outputs = tuple[torch.Tensor, torch.Tensor]  # (features, logits) of the val split, in order, fp32 on the CPU


class Rows:
    """Per-batch outputs written, in order, into one tensor per output, allocated at the first batch.

    Not a list of the batches joined at the end: kept alive between the buffers of the images decoded after
    them, the batches left holes in glibc's heap that the next batch could not reuse. Export's peak RSS grew
    0.37 MB per val image that way: 2.57 GiB at 2,500 val images, 1.29 GiB once each output was one tensor.
    """

    def __init__(self, n: int) -> None:
        self.n, self.done, self.columns = n, 0, None

    def add(self, *parts: torch.Tensor) -> None:
        if self.columns is None:
            self.columns = [torch.empty(self.n, *part.shape[1:], dtype=part.dtype) for part in parts]
        for column, part in zip(self.columns, parts, strict=True):
            column[self.done:self.done + len(part)] = part
        self.done += len(parts[0])

    def result(self) -> tuple[torch.Tensor, ...]:
        if self.columns is None:
            raise ValueError("no batch was added")
        return tuple(column[:self.done] for column in self.columns)


class ValOutputs(NamedTuple):
    """The val split through the exported model, once in each precision it may serve in: the bf16 check compares
    them, the trust fit takes those of the serving precision, the engines are compared with fp32's."""

    fp32: Outputs
    bf16: Outputs
    labels: torch.Tensor


def precision_record(cfg: Config, paths: RunPaths, meta: dict, state: dict[str, torch.Tensor]
                     ) -> tuple[dict, ValOutputs | None]:
    """(``metadata.json["serve_precision"]``: the bf16 check, and the int8 one when ``serve_precision: int8``;
    the state_dict's outputs on val: None without val images)."""
    record, outputs = bf16_parity(paths, meta, state)
    int8_file = paths.model / files.INT8_WEIGHTS
    int8_file.unlink(missing_ok=True)  # a previous export's int8 model no longer matches model.pt
    if cfg.serve_precision == "int8":
        record["int8"] = int8_check(paths, meta, state, record["choice"])
        if record["int8"]["offered"]:
            record["choice"] = "int8"
    return record, outputs


def bf16_parity(paths: RunPaths, meta: dict, state: dict[str, torch.Tensor], batch_size: int = 32
                ) -> tuple[dict, ValOutputs | None]:
    """(``{"choice": "bf16"|"fp32", "bf16_top1_agreement", "val_images", "checked_on", "native_bf16"}``, the val
    outputs it compared).

    Where bf16 is not native the check is emulated: slower, the same rounding, the same answer.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    items = split_items(load_splits(paths), "val")
    record = {"checked_on": device.type, "native_bf16": precision.native_bf16(device), "val_images": len(items),
              "min_agreement": precision.BF16_MIN_AGREEMENT}
    if not items:
        return {"choice": "fp32", "bf16_top1_agreement": None, **record}, None
    model = models.build_model(meta, state, device)
    loader = make_loader(ImageFiles(paths.out, items, Preprocessor(meta["preprocess"])), batch_size, 0)
    start, agree, fp32, bf16, labels = time.perf_counter(), 0, Rows(len(items)), Rows(len(items)), Rows(len(items))
    for x, y in loader:
        full, half = models.forward(model, x, device, None), models.forward(model, x, device, torch.bfloat16)
        fp32.add(*full)
        bf16.add(*half)
        labels.add(y)
        agree += int((full[1].argmax(1) == half[1].argmax(1)).sum())
    rate = agree / len(items)
    choice = "bf16" if rate >= precision.BF16_MIN_AGREEMENT else "fp32"
    print(f"export: bf16 top-1 agreement with fp32 {rate:.4f} on {len(items)} val images -> serve {choice} "
          f"({time.perf_counter() - start:.1f}s on {device.type}{'' if record['native_bf16'] else ', emulated bf16'})")
    outputs = ValOutputs(fp32.result(), bf16.result(), labels.result()[0])
    return {"choice": choice, "bf16_top1_agreement": round(rate, 4), **record}, outputs


def int8_check(paths: RunPaths, meta: dict, state: dict[str, torch.Tensor], other: str) -> dict:
    """Quantize, compare val accuracy and forward speed with fp32 (and ``other`` = bf16 where chosen and native);
    writes ``model-int8.pt`` when int8 is offered."""
    splits = load_splits(paths)
    preprocess = Preprocessor(meta["preprocess"])
    fp32 = models.build_model(meta, state, CPU)
    train = split_items(splits, "train")[:INT8_CALIBRATION_IMAGES]
    calibration = [x for x, _ in make_loader(ImageFiles(paths.out, train, preprocess), 16, 0)]
    try:
        int8 = models.quantize_int8(meta, fp32, calibration)
    except Exception as e:  # torch.fx cannot trace every architecture (timm's TF-'same' padding, say)
        print(f"export: int8 not offered for {meta['arch']}: it cannot be quantized ({type(e).__name__})")
        return {"offered": False, "reason": f"cannot be quantized ({type(e).__name__})",
                "calibration_images": len(train)}
    # One pass over val, a batch decoded at a time for both models: the decoded split is never held whole (at
    # 100,000 photos its 15,000 val images would take 9 GB).
    right, n, batch = {"fp32": 0, "int8": 0}, 0, None
    for x, y in make_loader(ImageFiles(paths.out, split_items(splits, "val"), preprocess), 32, 0):
        for name, model in (("fp32", fp32), ("int8", int8)):
            right[name] += int((_logits(model, x, CPU, None).argmax(1) == y).sum())
        n, batch = n + len(y), x[:8] if batch is None else batch
    batch = batch if batch is not None else torch.cat(calibration)[:8]
    speeds = {"fp32": _images_per_s(fp32, batch, None), "int8": _images_per_s(int8, batch, None)}
    if other == "bf16" and precision.native_bf16(CPU):
        speeds["bf16"] = _images_per_s(fp32, batch, torch.bfloat16)
    loss = (right["fp32"] - right["int8"]) / (n or 1)
    offered = loss <= models.INT8_MAX_ACCURACY_LOSS and speeds["int8"] > max(v for k, v in speeds.items()
                                                                                 if k != "int8")
    if offered:
        atomic_torch_save(paths.model / files.INT8_WEIGHTS, int8.state_dict())
    print(f"export: int8 loses {loss * 100:.2f} points of val accuracy; img/s {speeds} -> "
          f"{'offered' if offered else 'not offered'}")
    return {"offered": offered, "val_accuracy_loss": round(loss, 4), "images_per_s": speeds,
            "calibration_images": len(train)}


def _images_per_s(model: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best of ``repeats`` timed forward passes after a warm-up (the best is the least disturbed by other load)."""
    _logits(model, batch, CPU, dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _logits(model, batch, CPU, dtype)
        best = min(best, time.perf_counter() - start)
    return round(len(batch) / best, 1)


def _logits(model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return models.forward(model, x, device, dtype)[1]
