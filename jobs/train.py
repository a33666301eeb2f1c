"""Train: a plan of stages, one epoch loop, the learning rate computed per step.

Read top to bottom, as in torchvision's ``references/classification/train.py`` and nanoGPT:

- ``plan`` turns the config into stages, plain data: the head stage (on cached backbone features
  when the backbone is frozen and the architecture allows it), then an optional fine-tune.
- ``train`` builds the model, puts it on its device, resumes ``checkpoints/last.pt`` when it
  belongs to the same trajectory, and runs each stage epoch by epoch: ``train_one_epoch``, then
  ``validate``, then a checkpoint.
- ``lr_factor`` is nanoGPT's ``get_lr``: the lr of every step follows from (stage, epoch, step),
  so a resume sets no scheduler internals, and a resume with another number of processes keeps
  the cosine on course.
- A checkpoint is also written every ``checkpoint_minutes`` inside an epoch, and on SIGTERM
  (Kubernetes' eviction notice) after the current step, before exiting with 143. The data order
  of an epoch is a function of (seed, epoch) and each image's augmentation of (seed, epoch,
  image), so a mid-epoch resume sees exactly the batches the interrupted run would have.

The test split is not scored here: ``jobs.evaluate`` scores it once.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from handler.model import preprocess_spec
from handler.preprocess import Preprocessor
from jobs import checkpoints, features
from jobs.config import TRAJECTORY_KEYS, Config, RunPaths
from jobs.data import EpochSampler, ImageFiles, SeededAugment, ShardSampler, load_splits, make_loader, split_items
from jobs.errors import JobError
from jobs.fileio import atomic_write_json, sweep_partials
from jobs.model import build_model, freeze_backbone, head_module, head_path, split_backbone_head, weights_tag
from jobs.progress import Bar, begin_stage
from jobs.runtime import Runtime, barrier, default_num_workers, rng_state, seed_everything, set_rng_state

PREEMPTED_EXIT = 143  # 128 + SIGTERM, what Kubernetes and Docker expect of a process that stopped on SIGTERM


class TrainError(JobError):
    pass


@dataclass(frozen=True)
class Stage:
    """One stage of training, as data."""

    name: str  # "head" | "finetune"
    epochs: int
    train_all: bool  # every parameter trains; otherwise only the head
    on_features: bool  # the head trains on cached backbone features, not on images
    backbone_lr_div: float = 1.0  # backbone lr = lr / this
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    patience: int | None = None  # early stopping on val loss


def stage_titles(cfg: Config) -> list[str]:
    """The names ``plan`` gives its stages in the run's stage counter (``jobs.progress``)."""
    return ["train head"] + (["train finetune"] if cfg.finetune_epochs > 0 else [])


def plan(cfg: Config) -> list[Stage]:
    cached = cfg.freeze_backbone and cfg.cache_features
    stages = [Stage("head", cfg.epochs, train_all=not cfg.freeze_backbone, on_features=cached)]
    if cfg.finetune_epochs > 0:
        stages.append(Stage("finetune", cfg.finetune_epochs, train_all=True, on_features=False,
                            backbone_lr_div=cfg.backbone_lr_div, warmup_epochs=cfg.warmup_epochs,
                            grad_clip=cfg.grad_clip, patience=cfg.patience))
    return stages


def lr_factor(stage: Stage, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warmup, then a cosine that reaches 0 on the stage's last step (``epoch`` 0-based).

    Both stages decay: with a constant lr the head kept swinging by several val points from
    epoch to epoch, so which epoch "best" picked was mostly noise.
    """
    it = epoch * steps_per_epoch + step
    warmup = int(stage.warmup_epochs * steps_per_epoch)
    if it < warmup:
        return (it + 1) / warmup
    total = stage.epochs * steps_per_epoch
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))


@dataclass
class Progress:
    """Everything besides tensors that a checkpoint must carry to resume exactly."""

    stage: str = "head"
    epoch: int = 0  # epochs completed in ``stage``
    samples: int = 0  # samples of the current epoch already trained on (a mid-epoch checkpoint)
    partial: dict = field(default_factory=dict)  # the current epoch's running sums
    history: list[dict] = field(default_factory=list)
    best_epoch: dict = field(default_factory=dict)
    best_val_loss: float = math.inf  # fine-tune early stopping
    bad_epochs: int = 0
    stopped_early: bool = False

    @classmethod
    def restore(cls, saved: dict) -> Progress:
        """From a checkpoint; keys an older version wrote and this one no longer has are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


# Val loss moves with every epoch's confidence while accuracy on a small val split often does not (16
# images: 0.9375 in all 10 epochs, while val loss fell from 0.60 to 0.30, and ">" on accuracy kept epoch 1).
SELECTION_RULE = "lowest val loss; ties broken by higher val accuracy"


def is_better(record: dict, best: dict) -> bool:
    """Whether epoch ``record`` beats the kept ``best`` under ``SELECTION_RULE`` (never without val images)."""
    if record["val_loss"] is None:
        return False
    return not best or (record["val_loss"], -record["val_accuracy"]) < (best["val_loss"], -best["val_accuracy"])


def fingerprint(cfg: Config, splits: dict) -> str:
    keys = {k: getattr(cfg, k) for k in TRAJECTORY_KEYS}
    keys["weights"] = weights_tag(cfg.weights)
    keys["split_hash"] = splits["split_hash"]
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# stopping and checkpointing inside an epoch


class Interruptions:
    """When a step should end with a checkpoint: SIGTERM arrived, or ``checkpoint_minutes`` passed.

    Outside the step loop SIGTERM ends the process at once, as it would without this class (the
    last checkpoint stays valid); inside it, it is noted and the loop checkpoints after the step.
    Under torchrun every rank must agree, so the decision is reduced across ranks.
    """

    def __init__(self, minutes: float, rt: Runtime):
        self.every, self.rt = minutes * 60, rt
        self.last = time.monotonic()
        self.sigterm = self.in_loop = False

    def __enter__(self) -> Interruptions:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.previous)

    def _on_sigterm(self, signum, frame) -> None:
        if not self.in_loop:
            raise SystemExit(PREEMPTED_EXIT)
        self.sigterm = True

    def check(self) -> tuple[bool, bool]:
        """(checkpoint now, then stop)."""
        due = self.every > 0 and time.monotonic() - self.last >= self.every
        stop, due = _all_max(self.rt, float(self.sigterm), float(due))
        return bool(stop or due), bool(stop)

    def saved(self) -> None:
        self.last = time.monotonic()


def _all_reduce(rt: Runtime, values: tuple[float, ...], op: dist.ReduceOp.RedOpType) -> list[float]:
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def _all_max(rt: Runtime, *values: float) -> list[float]:
    return _all_reduce(rt, values, dist.ReduceOp.MAX)


def _all_sum(rt: Runtime, *values: float) -> list[float]:
    return _all_reduce(rt, values, dist.ReduceOp.SUM)


# ----------------------------------------------------------------------------------------------
# what a stage trains on: batches of cached features, or of images


class FeatureBatches:
    """The cached head stage's data: each epoch, one random view per image, in a random order.

    Views and order come from a generator seeded by (seed, epoch), and every rank draws the
    same ones, so the replicated heads stay equal without any gradient all-reduce.
    """

    on_images = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.steps_per_epoch = math.ceil(len(y) / batch_size)  # = the full loop's, in one process
        self.samples_per_step = batch_size

    def epoch(self, epoch: int, skip_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.y)
        view, order = torch.randint(self.x.shape[1], (n,), generator=g), torch.randperm(n, generator=g)
        view, order = view.to(self.x.device), order.to(self.x.device)
        for idx in order[skip_samples:].split(self.batch_size):
            yield self.x[idx, view[idx]], self.y[idx]


class ImageBatches:
    """The full loop's data: augmented images through a DataLoader, sharded across ranks."""

    on_images = True

    def __init__(self, paths: RunPaths, splits: dict, cfg: Config, rt: Runtime):
        dataset = SeededAugment(ImageFiles(paths.out, split_items(splits, "train"),
                                           Preprocessor(preprocess_spec(cfg.arch), augment=True)))
        per_rank = max(1, cfg.batch_size // rt.world_size)
        self.sampler = EpochSampler(len(dataset), cfg.seed, rt.rank, rt.world_size)
        self.loader = make_loader(dataset, per_rank, default_num_workers(cfg, rt), sampler=self.sampler,
                                  pin_memory=rt.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(cfg.seed))
        self.samples_per_step = per_rank * rt.world_size
        self.steps_per_epoch = math.ceil(self.sampler.shard_length(0) / per_rank)
        self.rt = rt

    def epoch(self, epoch: int, skip_samples: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch, skip_samples)
        for images, labels in self.loader:
            yield (images.to(self.rt.device, non_blocking=True, memory_format=self.rt.memory_format()),
                   labels.to(self.rt.device, non_blocking=True))


# ----------------------------------------------------------------------------------------------
# one epoch, and the evaluation loop shared with jobs.evaluate


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer, stage: Stage, epoch: int,
                    progress: Progress, rt: Runtime, interruptions: Interruptions | None = None,
                    save=None, scaler: torch.amp.GradScaler | None = None, label: str = "") -> dict:
    """One pass over ``batches`` (epoch 0-based), resuming ``progress.samples`` into it; ``label`` names
    the stage in progress lines."""
    loss_fn = nn.CrossEntropyLoss()
    # A mid-epoch checkpoint holds the epoch's sums reduced over ranks: rank 0 carries them on.
    sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0, **(progress.partial if rt.is_main else {})}
    first_step = progress.samples // batches.samples_per_step
    seen_here, start = 0, time.perf_counter()
    bar = Bar(batches.steps_per_epoch, f"{label or stage.name}: epoch {epoch + 1}/{stage.epochs}", unit="batch",
              initial=first_step, disable=not rt.is_main)
    lr = optimizer.param_groups[0]["lr"]
    for step, (x, y) in enumerate(batches.epoch(epoch, progress.samples), start=first_step):
        factor = lr_factor(stage, epoch, step, batches.steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        lr = optimizer.param_groups[0]["lr"]
        with rt.autocast() if batches.on_images else torch.autocast(rt.device.type, enabled=False):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainError(f"the training loss became {loss.item()} in {stage.name} epoch {epoch + 1} step "
                             f"{step + 1} (lr {lr:.3g}); lower --lr and re-run with --fresh")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if stage.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], stage.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = y.numel()
        sums["loss"] += loss.item() * n
        sums["correct"] += (logits.argmax(1) == y).sum().item()
        sums["seen"] += n
        seen_here += n
        bar.set_postfix(f"loss={sums['loss'] / sums['seen']:.4f}")
        bar.update()
        if interruptions is not None and step + 1 < batches.steps_per_epoch:
            checkpoint_now, stop = interruptions.check()
            if checkpoint_now:
                reduced = dict(zip(sums, _all_sum(rt, *sums.values())))
                sums = reduced if rt.is_main else dict.fromkeys(sums, 0.0)
                progress.samples, progress.partial = (step + 1) * batches.samples_per_step, reduced
                save(False)
                interruptions.saved()
                if stop:
                    print(f"train: SIGTERM: checkpointed {stage.name} epoch {epoch + 1} after step {step + 1}; "
                          "re-run the same command to resume")
                    raise SystemExit(PREEMPTED_EXIT)
    bar.close()
    loss_sum, correct, seen = _all_sum(rt, sums["loss"], sums["correct"], sums["seen"])
    seen_here = _all_sum(rt, seen_here)[0]
    progress.samples, progress.partial = 0, {}
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1), "lr": lr,
            "images_per_s": seen_here / (time.perf_counter() - start)}


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, rt: Runtime, on_images: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) as float32 on the CPU, labels (N,)) for what ``batches`` yields, in order."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        if on_images:
            x = x.to(rt.device, non_blocking=True, memory_format=rt.memory_format())
        with rt.autocast() if on_images else torch.autocast(rt.device.type, enabled=False):
            logits.append(model(x).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not logits:
        head = model if isinstance(model, nn.Linear) else head_module(model)
        return torch.zeros(0, head.out_features), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def validate(model: nn.Module, batches: Iterable, rt: Runtime, on_images: bool) -> dict:
    """Loss and accuracy over a (rank-sharded) set of batches, summed across ranks."""
    logits, labels = predict_logits(model, batches, rt, on_images)
    loss = correct = 0.0
    if len(labels):
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct = (logits.argmax(1) == labels).sum().item()
    loss, correct, seen = _all_sum(rt, loss, correct, len(labels))
    return {"loss": loss / seen if seen else None, "accuracy": correct / seen if seen else None}


def set_train_modes(model: nn.Module, train_all: bool, freeze_bn: bool) -> None:
    """Frozen parts (and frozen BatchNorm statistics) stay in eval mode while the rest trains."""
    if train_all:
        model.train()
        if freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return
    model.eval()
    container = model.get_submodule(head_path(model).split(".")[0])
    container.train()  # the head and the dropout right before it (efficientnet/mobilenet classifiers)


def make_optimizer(model: nn.Module, cfg: Config, backbone_lr_div: float) -> torch.optim.AdamW:
    """AdamW on the trainable parameters: head at ``lr``, backbone at ``lr / backbone_lr_div``.

    Each group keeps its ``peak_lr``; the loop sets ``lr = peak_lr * lr_factor(...)`` every step.
    """
    head_params = list(head_module(model).parameters())
    head_ids = {id(p) for p in head_params}
    backbone_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "peak_lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "peak_lr": cfg.lr / backbone_lr_div})
    for group in groups:
        group["lr"] = group["peak_lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------
# the job


def train(cfg: Config, paths: RunPaths, rt: Runtime, resume_mode: str = "auto") -> Path:
    """Train (or resume) and write checkpoints + ``metrics.json``; returns the metrics path."""
    begin_stage(stage_titles(cfg)[0])  # the setup below is the first stage's time
    weights_tag(cfg.weights)  # a --weights file that is not there fails before any work
    if rt.is_main:
        sweep_partials(paths.checkpoints, paths.cache, paths.metrics)
    splits = load_splits(paths)
    classes = splits["classes"]
    if not split_items(splits, "train"):
        raise TrainError(f"{paths.splits} has no training images; check the clean and split stages")
    fp = fingerprint(cfg, splits)
    resume = load_resume_state(paths, fp, resume_mode, rt)

    seed_everything(cfg.seed)
    model = build_model(cfg.arch, len(classes), cfg.weights)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    progress = Progress()
    if resume is not None:
        model.load_state_dict(resume["model"], strict=not resume["head_only"])
        progress = Progress.restore(resume["progress"])
        where = f"in epoch {progress.epoch + 1}" if progress.samples else f"after epoch {progress.epoch}"
        print(f"train: resuming {progress.stage} stage {where} from {paths.checkpoints}/last.pt")
    # On its device before any optimizer exists: Optimizer.load_state_dict casts the restored
    # state to each parameter's device, so restoring before .to(cuda) left AdamW's moments on the CPU.
    model.to(rt.device, memory_format=rt.memory_format())
    print(f"train: {cfg.arch} ({cfg.weights}) on {len(classes)} classes {classes}; {rt.describe()}",
          **({"force": True} if rt.distributed else {}))  # each rank says where it runs

    stages = plan(cfg)
    names = [s.name for s in stages]
    reached = names.index(progress.stage) if progress.stage in names else len(names)
    with Interruptions(cfg.checkpoint_minutes, rt) as interruptions:
        for index, stage in enumerate(stages):
            if index < reached:
                continue  # resumed into a later stage
            if progress.stage != stage.name:
                model.load_state_dict(_best_or_current(paths, model))  # fine-tune starts from the best head
                progress.stage, progress.epoch, resume = stage.name, 0, None
            run_stage(stage, cfg, paths, rt, model, splits, progress, resume, fp, interruptions)
            resume = None
    if rt.is_main:
        write_metrics(paths, progress)
    print(f"train: {_best_sentence(progress.best_epoch, paths)}")
    barrier(rt)
    return paths.metrics


def run_stage(stage: Stage, cfg: Config, paths: RunPaths, rt: Runtime, model: nn.Module, splits: dict,
              progress: Progress, resume: dict | None, fp: str, interruptions: Interruptions) -> None:
    """The epoch loop of one stage: train, validate, log, select on val accuracy, checkpoint."""
    clock = begin_stage(f"train {stage.name}")  # [5/9] train head, when a run counts its stages
    if stage.train_all:
        for p in model.parameters():
            p.requires_grad_(True)
    if stage.on_features:
        backbone, head = split_backbone_head(model)
        train_x, train_y = features.load_or_extract(cfg, paths, rt, backbone, splits, "train")
        val_x, val_y = features.load_or_extract(cfg, paths, rt, backbone, splits, "val")
        batches = FeatureBatches(train_x.to(rt.device), train_y.to(rt.device), cfg.batch_size, cfg.seed)
        val_batches = [(val_x[:, 0].to(rt.device), val_y)] if len(val_y) else []
        trained, scored = head, head
    else:
        batches = ImageBatches(paths, splits, cfg, rt)
        val_data = ImageFiles(paths.out, split_items(splits, "val"), Preprocessor(preprocess_spec(cfg.arch)))
        val_batches = make_loader(val_data, cfg.batch_size, default_num_workers(cfg, rt),
                                  sampler=ShardSampler(len(val_data), rt.rank, rt.world_size),
                                  pin_memory=rt.device.type == "cuda")
        trained, scored = _wrap(model, stage, cfg, rt), model
    optimizer = make_optimizer(model, cfg, stage.backbone_lr_div)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
    elif not stage.on_features:
        torch.manual_seed(cfg.seed + 1)  # dropout draws are the same whether or not features were cached
    scaler = torch.amp.GradScaler(rt.device.type) if batches.on_images and rt.amp_dtype == torch.float16 else None

    def save(is_best: bool, head_only: bool = stage.on_features) -> None:
        save_checkpoint(paths, rt, fp, cfg, splits["classes"], model, optimizer, progress, is_best, head_only)

    loop_started, first_epoch = time.monotonic(), progress.epoch
    while progress.epoch < stage.epochs and not progress.stopped_early:
        started = time.perf_counter()
        set_train_modes(model, stage.train_all, cfg.freeze_bn)
        interruptions.in_loop = True
        record = train_one_epoch(trained, batches, optimizer, stage, progress.epoch, progress, rt,
                                 interruptions, save, scaler, clock.label)
        interruptions.in_loop = False
        val = validate(scored, val_batches, rt, batches.on_images)
        progress.epoch += 1
        record = {"stage": stage.name, "epoch": progress.epoch, **record, "val_loss": val["loss"],
                  "val_accuracy": val["accuracy"], "seconds": round(time.perf_counter() - started, 3)}
        progress.history.append(record)
        is_best = is_better(record, progress.best_epoch)
        if is_best:
            progress.best_epoch = {"stage": stage.name, "epoch": progress.epoch,
                                   "val_accuracy": record["val_accuracy"], "val_loss": record["val_loss"]}
        if stage.patience is not None and record["val_loss"] is not None:
            if record["val_loss"] < progress.best_val_loss:
                progress.best_val_loss, progress.bad_epochs = record["val_loss"], 0
            else:
                progress.bad_epochs += 1
                progress.stopped_early = progress.bad_epochs >= stage.patience
        print(f"{clock.label}: epoch {progress.epoch}/{stage.epochs}: {_epoch_summary(stage, record, is_best)}; "
              f"{clock.timing(progress.epoch, stage.epochs, since=loop_started, done_before=first_epoch)}"
              f"{f'; early stop: val loss not better for {stage.patience} epochs' if progress.stopped_early else ''}")
        save(is_best)
        interruptions.saved()
    if stage.on_features:
        save(False, head_only=False)  # the whole model once, for evaluate/export and the fine-tune stage


def _wrap(model: nn.Module, stage: Stage, cfg: Config, rt: Runtime) -> nn.Module:
    """What the full loop calls: the model, under SyncBatchNorm / DDP / torch.compile as configured."""
    trained = model
    if stage.name == "finetune" and cfg.sync_bn and rt.distributed:
        if rt.device.type == "cuda":
            trained = nn.SyncBatchNorm.convert_sync_batchnorm(trained)
        elif rt.is_main:
            print("train: sync_bn needs CUDA (SyncBatchNorm has no CPU kernels); keeping per-rank BatchNorm")
    if rt.distributed:
        trained = DistributedDataParallel(trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        trained = torch.compile(trained)
    return trained


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _best_sentence(best: dict, paths: RunPaths) -> str:
    if not best:
        return (f"no epoch had a val score (no val images), so none was chosen; evaluate and export use the last "
                f"weights ({paths.checkpoints / checkpoints.LAST})")
    accuracy = "n/a" if best["val_accuracy"] is None else f"{100 * best['val_accuracy']:.1f}%"
    return (f"kept epoch {best['epoch']} of the {best['stage']} stage, chosen by {SELECTION_RULE} (val loss "
            f"{_fmt(best['val_loss'])}, val accuracy {accuracy}); its weights are "
            f"{paths.checkpoints / checkpoints.BEST}, which evaluate and export use")


def _epoch_summary(stage: Stage, record: dict, is_best: bool) -> str:
    """Losses, val accuracy, and a speed that says what it counts.

    A cached-feature epoch pushes feature rows through the head alone, thousands a second; an
    image epoch pushes images through the backbone too: one "img/s" for both swung 40x between
    epochs and measured nothing a person could compare (the backbone's speed on the cached stage
    is on the ``features:`` line).
    """
    accuracy = "n/a" if record["val_accuracy"] is None else f"{100 * record['val_accuracy']:.1f}%"
    speed = (f"{record['images_per_s']:,.0f} feature rows/s through the head alone" if stage.on_features
             else f"{record['images_per_s']:,.1f} img/s through backbone and head")
    return (f"train loss {record['train_loss']:.4f}, val loss {_fmt(record['val_loss'])}, val accuracy {accuracy}"
            f"{' (best so far)' if is_best else ''}; {speed}")


# ----------------------------------------------------------------------------------------------
# checkpoints and metrics


def load_resume_state(paths: RunPaths, fp: str, mode: str, rt: Runtime) -> dict | None:
    """mode: 'auto' (resume a matching checkpoint), 'require' (--resume), 'fresh' (--fresh).

    Every rank reads and decides the same way; only rank 0 moves old checkpoints aside, and only
    after every rank has read them.
    """
    last = paths.checkpoints / checkpoints.LAST
    fresh = "re-run with --fresh to start over (the old checkpoints are kept beside it)"
    state = checkpoints.read(last, fresh) if mode != "fresh" and last.exists() else None
    if mode == "require" and state is None:
        raise TrainError(f"--resume given but {last} does not exist; drop --resume to start a new run")
    if mode == "require" and state["fingerprint"] != fp:
        raise TrainError(f"--resume given but {last} was made with a different config or split; "
                         "use the same config, or --fresh to start over")
    if state is not None and state["fingerprint"] == fp:
        return state
    barrier(rt)
    if rt.is_main and paths.checkpoints.exists() and any(paths.checkpoints.iterdir()):
        why = "--fresh" if mode == "fresh" else f"{last} belongs to another config; starting over"
        print(f"train: {why} (earlier checkpoints kept in {checkpoints.move_aside(paths)})")
    barrier(rt)
    return None


def save_checkpoint(paths: RunPaths, rt: Runtime, fp: str, cfg: Config, classes: list[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer, progress: Progress, is_best: bool, head_only: bool) -> None:
    """``last.pt`` every call, ``best.pt`` (always the whole model) when ``is_best``.

    ``head_only``: ``last.pt`` holds just the head's tensors. For the cached head stage, where the
    backbone is still exactly ``cfg.weights`` (part of the fingerprint): a whole ResNet-18 per
    epoch took longer to write than the epoch took to train.
    """
    if rt.is_main:
        model_state = model.state_dict()
        prefix = head_path(model) + "."
        common = {"config": cfg.to_dict(), "classes": classes, "progress": asdict(progress)}
        if is_best:
            checkpoints.write(paths, checkpoints.BEST, {**common, "model": model_state})
        checkpoints.write(paths, checkpoints.LAST, {
            **common,
            "fingerprint": fp,
            "model": {k: v for k, v in model_state.items() if k.startswith(prefix)} if head_only else model_state,
            "head_only": head_only,
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
        })
        write_metrics(paths, progress)
    barrier(rt)


def write_metrics(paths: RunPaths, progress: Progress) -> None:
    """Training's part of metrics.json; evaluate adds the test split's numbers (from these weights)."""
    atomic_write_json(paths.metrics, {"epochs": progress.history, "best": progress.best_epoch,
                                      "selection": SELECTION_RULE})


def _best_or_current(paths: RunPaths, model: nn.Module) -> dict:
    best = paths.checkpoints / checkpoints.BEST
    if best.exists():
        return checkpoints.read(best, "re-run with --fresh")["model"]
    return model.state_dict()  # no epoch had a val score (no val images): keep the last weights
