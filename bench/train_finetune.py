"""Train-step throughput of the fine-tune stage's settings vs plain fp32 eager NCHW.

Every variant runs the job's own step (``jobs.train.train_one_epoch``: forward, loss,
backward, optional clipping, AdamW step) on the same ResNet-18 and the same batch of random
images, so only the settings differ:

- plain: fp32, NCHW, BatchNorm in training mode, no clipping (a textbook loop);
- each setting of ``_full_stage("finetune")`` alone: channels_last, frozen BN, autocast;
- ours: all of them as the stage configures them (``precision: auto``, ``grad_clip: 1.0``);
- ours + bf16 autocast forced, ours + ``torch.compile`` (``--compile``).

    python -m bench.train_finetune                 # CPU
    python -m bench.train_finetune --device cuda --compile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics

import torch

from bench.common import resolve_device, save_result
from jobs.config import load_config
from jobs.model import build_model
from jobs.runtime import setup
from jobs.train import Progress, Stage, make_optimizer, set_train_modes, train_one_epoch


def _variants(with_compile: bool) -> list[tuple[str, dict]]:
    ours = {"channels_last": True, "precision": "auto", "freeze_bn": True, "grad_clip": 1.0}
    plain = {"channels_last": False, "precision": "fp32", "freeze_bn": False, "grad_clip": 0.0}
    variants = [
        ("plain fp32 eager NCHW", plain),
        ("plain + channels_last", {**plain, "channels_last": True}),
        ("plain + frozen BN", {**plain, "freeze_bn": True}),
        ("plain + bf16 autocast", {**plain, "precision": "bf16"}),
        ("plain + channels_last + frozen BN", {**plain, "channels_last": True, "freeze_bn": True}),
        ("ours (finetune stage defaults)", ours),
        ("ours + bf16 autocast forced", {**ours, "precision": "bf16"}),
    ]
    if with_compile:
        variants.append(("ours + torch.compile", {**ours, "compile": True}))
    return variants


class RepeatedBatch:
    """One batch ``steps`` times, in the form ``train_one_epoch`` takes its batches."""

    on_images = True

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int, rt):
        self.batch, self.steps_per_epoch, self.samples_per_step = batch, steps, len(batch[1])
        self.rt = rt

    def epoch(self, epoch: int, skip_samples: int):
        images, labels = self.batch
        for _ in range(self.steps_per_epoch):
            yield images.to(self.rt.device, memory_format=self.rt.memory_format()), labels.to(self.rt.device)


class Variant:
    """One configuration's model, optimizer and runtime, ready to run timed steps."""

    def __init__(self, settings: dict, device: str, batch: tuple[torch.Tensor, torch.Tensor]):
        cfg = load_config(overrides={"device": device, "precision": settings["precision"],
                                     "channels_last": settings["channels_last"]})
        self.settings, self.batch, self.rt = settings, batch, setup(cfg)
        torch.manual_seed(0)
        self.model = build_model("resnet18", 2, "none").to(self.rt.device, memory_format=self.rt.memory_format())
        set_train_modes(self.model, train_all=True, freeze_bn=settings["freeze_bn"])
        self.trained = torch.compile(self.model) if settings.get("compile") else self.model
        self.optimizer = make_optimizer(self.model, cfg, cfg.backbone_lr_div)
        self.scaler = torch.amp.GradScaler(self.rt.device.type) if self.rt.amp_dtype == torch.float16 else None

    def run(self, steps: int) -> float:
        """images/s over ``steps`` train steps (.item() on the loss each step synchronises CUDA)."""
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()
        with contextlib.redirect_stderr(io.StringIO()):  # the stage's progress bar
            stage = Stage("finetune", 1, train_all=True, on_features=False, grad_clip=self.settings["grad_clip"])
            record = train_one_epoch(self.trained, RepeatedBatch(self.batch, steps, self.rt), self.optimizer, stage,
                                     0, Progress(), self.rt, scaler=self.scaler)
        return record["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32, help="the job's default batch_size")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant and round (2 CPU, 10 CUDA)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all variants; the median round is reported")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 CUDA)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile on CPU)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    steps, warmup = args.steps or (10 if cuda else 2), args.warmup or (5 if cuda else 1)
    torch.manual_seed(0)
    batch = (torch.randn(args.batch_size, 3, 224, 224), torch.randint(0, 2, (args.batch_size,)))
    variants = {name: Variant(settings, device, batch) for name, settings in _variants(args.compile)}
    for v in variants.values():
        v.run(warmup + ((10 if cuda else 2) if v.settings.get("compile") else 0))  # compiling happens here
    # Rounds interleave the variants, so load from other processes on a shared machine hits all of them alike.
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, v in variants.items():
            rates[name].append(v.run(steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(' (')[0]} {x[-1]:.1f}" for n, x in rates.items()),
              flush=True)
    base = statistics.median(rates["plain fp32 eager NCHW"])
    results = {}
    print(f"\nmedian of {args.rounds} rounds x {steps} steps, batch {args.batch_size}; speed-up over plain fp32 eager:")
    for name, v in variants.items():
        ips = statistics.median(rates[name])
        results[name] = {**v.settings, "images_per_s": ips, "rounds": rates[name], "speedup": ips / base,
                         "runtime": v.rt.describe()}
        print(f"  {name:<34} {ips:8.1f} img/s  {ips / base:5.2f}x   [{v.rt.describe()}, "
              f"freeze_bn={v.settings['freeze_bn']}, grad_clip={v.settings['grad_clip']}]")
    save_result("train_finetune", device, {"batch_size": args.batch_size, "steps": steps, "rounds": args.rounds,
                                           "warmup": warmup, "variants": results})


if __name__ == "__main__":
    main()
