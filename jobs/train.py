"""Train: the frozen head stage (on cached features when possible), then an optional fine-tune.

Read top to bottom: ``train`` builds the model, resumes from ``checkpoints/last.pt`` when it
belongs to the same config, runs ``head`` then ``finetune`` epoch by epoch (checkpointing
after every epoch), and finally scores the best weights on the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from jobs import features
from jobs.config import Config, RunPaths
from jobs.data import ImageFiles, ShardSampler, load_splits, make_loader, split_items
from jobs.errors import JobError
from jobs.fileio import atomic_torch_save, atomic_write_json
from jobs.model import build_model, freeze_backbone, head_module, head_path, split_backbone_head, weights_tag
from jobs.presets import eval_transform, train_transform
from jobs.runtime import Runtime, barrier, default_num_workers, rng_state, seed_everything, set_rng_state

# Keys that change the training trajectory: a checkpoint made with other values is not resumed.
# (epochs/finetune_epochs/patience are left out on purpose: raising them continues a run.)
TRAJECTORY_KEYS = ("arch", "lr", "batch_size", "seed", "freeze_backbone", "feature_views", "cache_features",
                   "weight_decay", "backbone_lr_div", "warmup_epochs", "grad_clip", "freeze_bn")


class TrainError(JobError):
    pass


@dataclass
class Progress:
    """Everything besides tensors that a checkpoint must carry to resume exactly."""

    stage: str = "head"
    epoch: int = 0  # epochs completed in ``stage``
    history: list[dict] = field(default_factory=list)
    best_val_accuracy: float = -1.0
    best_epoch: dict = field(default_factory=dict)
    best_val_loss: float = math.inf  # fine-tune early stopping
    bad_epochs: int = 0
    stopped_early: bool = False


def fingerprint(cfg: Config, splits: dict) -> str:
    keys = {k: getattr(cfg, k) for k in TRAJECTORY_KEYS}
    keys["weights"] = weights_tag(cfg.weights)
    keys["split_hash"] = splits["split_hash"]
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# checkpoints


def _move_aside(ckpt_dir: Path) -> Path:
    target = ckpt_dir.parent / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
    ckpt_dir.rename(target)
    return target


def _read_checkpoint(last: Path) -> dict:
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        state["progress"]["stage"]  # noqa: B018 - a structural check, KeyError = not our checkpoint
        return state
    except Exception as e:  # noqa: BLE001 - any failure to read means the same to the user
        raise TrainError(f"checkpoint {last} is corrupt or unreadable ({type(e).__name__}); re-run with --fresh to "
                         "start over (the old checkpoints are kept beside it)") from None


def load_resume_state(paths: RunPaths, fp: str, mode: str, rt: Runtime) -> dict | None:
    """mode: 'auto' (resume a matching checkpoint), 'require' (--resume), 'fresh' (--fresh).

    Every rank reads and decides the same way; only rank 0 moves old checkpoints aside, and only
    after every rank has read them.
    """
    last = paths.checkpoints / "last.pt"
    state = _read_checkpoint(last) if mode != "fresh" and last.exists() else None
    if mode == "require" and state is None:
        raise TrainError(f"--resume given but {last} does not exist; drop --resume to start a new run")
    if mode == "require" and state["fingerprint"] != fp:
        raise TrainError(f"--resume given but {last} was made with a different config or split; "
                         "use the same config, or --fresh to start over")
    if state is not None and state["fingerprint"] == fp:
        return state
    barrier(rt)
    if rt.is_main and last.exists():
        why = "--fresh" if mode == "fresh" else f"{last} belongs to another config; starting over"
        print(f"train: {why} (earlier checkpoints kept in {_move_aside(paths.checkpoints)})")
    barrier(rt)
    return None


def save_checkpoint(paths: RunPaths, rt: Runtime, fp: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, is_best: bool,
                    head_only: bool = False) -> None:
    """``last.pt`` every call, ``best.pt`` (always the whole model) when ``is_best``.

    ``head_only``: ``last.pt`` holds just the head's tensors. For the cached head stage, where the
    backbone is still exactly ``cfg.weights`` (part of the fingerprint): a whole ResNet-18 per
    epoch took longer to write than the epoch took to train.
    """
    if rt.is_main:
        model_state = model.state_dict()
        prefix = head_path(model) + "."
        state = {
            "fingerprint": fp,
            "model": {k: v for k, v in model_state.items() if k.startswith(prefix)} if head_only else model_state,
            "head_only": head_only,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": progress.__dict__,
            "rng": rng_state(),
        }
        if is_best:
            atomic_torch_save(paths.checkpoints / "best.pt", {"model": model_state, "progress": progress.__dict__})
        atomic_torch_save(paths.checkpoints / "last.pt", state)
        write_metrics(paths, progress)
    barrier(rt)


def write_metrics(paths: RunPaths, progress: Progress, test: dict | None = None) -> None:
    doc = {"epochs": progress.history, "best": progress.best_epoch}
    if test is not None:
        doc.update(test)
    atomic_write_json(paths.metrics, doc)


# ----------------------------------------------------------------------------------------------
# one epoch


def _all_sum(rt: Runtime, *values: float) -> list[float]:
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, rt: Runtime, grad_clip: float,
                    desc: str, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One pass of images through ``model`` (already in the right train/eval modes)."""
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = correct = seen = 0.0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not rt.is_main, dynamic_ncols=True)
    for images, labels in bar:
        images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format())
        labels = labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = labels.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        rate = seen * rt.world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{rate:.1f}")
    loss_sum, correct, seen = _all_sum(rt, loss_sum, correct, seen)
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_s": seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime) -> dict:
    """Loss and accuracy over a (rank-sharded) loader, summed across ranks."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = correct = seen = 0.0
    for images, labels in loader:
        images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format())
        labels = labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(images).float()
        loss_sum += loss_fn(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
    loss_sum, correct, seen = _all_sum(rt, loss_sum, correct, seen)
    return {"loss": loss_sum / seen if seen else None, "accuracy": correct / seen if seen else None, "count": int(seen)}


# ----------------------------------------------------------------------------------------------
# the stages


def _eval_loader(paths: RunPaths, splits: dict, split: str, cfg: Config, rt: Runtime):
    dataset = ImageFiles(paths.out, split_items(splits, split), eval_transform())
    return make_loader(dataset, cfg.batch_size, default_num_workers(cfg, rt), pin_memory=rt.device.type == "cuda",
                       sampler=ShardSampler(len(dataset), rt.rank, rt.world_size))


def _train_loader(paths: RunPaths, splits: dict, cfg: Config, rt: Runtime):
    dataset = ImageFiles(paths.out, split_items(splits, "train"), train_transform())
    sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed) if rt.distributed else None
    return make_loader(dataset, max(1, cfg.batch_size // rt.world_size), default_num_workers(cfg, rt),
                       shuffle=True, sampler=sampler, pin_memory=rt.device.type == "cuda")


def _run_epochs(stage: str, total: int, progress: Progress, one_epoch: Callable[[int], dict],
                save: Callable[[bool], None], patience: int | None = None) -> None:
    """The shared epoch loop: train, validate, log, select on val accuracy, checkpoint."""
    while progress.stage == stage and progress.epoch < total and not progress.stopped_early:
        epoch = progress.epoch + 1
        started = time.perf_counter()
        record = {"stage": stage, "epoch": epoch, **one_epoch(epoch)}
        record["seconds"] = round(time.perf_counter() - started, 3)
        progress.history.append(record)
        progress.epoch = epoch
        is_best = record["val_accuracy"] is not None and record["val_accuracy"] > progress.best_val_accuracy
        if is_best:
            progress.best_val_accuracy = record["val_accuracy"]
            progress.best_epoch = {"stage": stage, "epoch": epoch, "val_accuracy": record["val_accuracy"],
                                   "val_loss": record["val_loss"]}
        if patience is not None and record["val_loss"] is not None:
            if record["val_loss"] < progress.best_val_loss:
                progress.best_val_loss, progress.bad_epochs = record["val_loss"], 0
            else:
                progress.bad_epochs += 1
                progress.stopped_early = progress.bad_epochs >= patience
        print(f"{stage} epoch {epoch}/{total}: train_loss={record['train_loss']:.4f} "
              f"val_loss={_fmt(record['val_loss'])} val_acc={_fmt(record['val_accuracy'])} "
              f"({record['images_per_s']:.1f} img/s, {record['seconds']:.1f}s){' *best*' if is_best else ''}"
              f"{' early stop' if progress.stopped_early else ''}")
        save(is_best)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warmup, then a cosine decay that reaches 0 at ``total_steps``.

    Both stages decay: with a constant lr the head kept swinging by several val points from
    epoch to epoch, so which epoch "best" picked was mostly noise.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return factor


def restore_optimization(resume: dict, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         steps_per_epoch: int) -> None:
    """Optimizer, schedule and RNG from a checkpoint, with the schedule re-counted in this run's steps.

    Checkpoints sit on epoch boundaries, but a run may resume with another number of processes,
    hence another number of steps per epoch: counted in the old steps, the cosine would reach 0
    early (and stay there) or never.
    """
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    scheduler.last_epoch = resume["progress"]["epoch"] * steps_per_epoch
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    set_rng_state(resume["rng"])


def _head_on_features(cfg: Config, paths: RunPaths, rt: Runtime, model: nn.Module, splits: dict,
                      progress: Progress, resume: dict | None, save_ckpt: Callable) -> None:
    backbone, head = split_backbone_head(model)
    train_x, train_y = features.load_or_extract(cfg, paths, rt, backbone, splits, "train")
    val_x, val_y = features.load_or_extract(cfg, paths, rt, backbone, splits, "val")
    device = rt.device
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train_y) / cfg.batch_size)  # = len(loader) of the full loop in one process
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, cfg.epochs * steps))
    if resume is not None and resume["progress"]["stage"] == "head":
        restore_optimization(resume, optimizer, scheduler, steps)
    else:
        torch.manual_seed(cfg.seed + 1)  # identical epochs whether features were extracted or loaded
    loss_fn = nn.CrossEntropyLoss()

    def one_epoch(epoch: int) -> dict:
        # Every rank draws the same views and order (same RNG), so the replicated heads stay equal.
        start = time.perf_counter()
        n = len(train_y)
        view = torch.randint(train_x.shape[1], (n,)).to(device)
        order = torch.randperm(n).to(device)
        loss_sum = correct = 0.0
        head.train()
        for idx in order.split(cfg.batch_size):
            logits = head(train_x[idx, view[idx]])
            loss = loss_fn(logits, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == train_y[idx]).sum().item()
        head.eval()
        with torch.no_grad():
            val_logits = head(val_x[:, 0]) if len(val_y) else None
        return {
            "train_loss": loss_sum / n, "train_accuracy": correct / n,
            "val_loss": loss_fn(val_logits, val_y).item() if val_logits is not None else None,
            "val_accuracy": (val_logits.argmax(1) == val_y).float().mean().item() if val_logits is not None else None,
            "images_per_s": n / (time.perf_counter() - start),
        }

    _run_epochs("head", cfg.epochs, progress, one_epoch, lambda best: save_ckpt(optimizer, scheduler, best, True))
    save_ckpt(optimizer, scheduler, False)  # the whole model once, for evaluate/export and the fine-tune stage


def _set_train_modes(model: nn.Module, trainable_all: bool, freeze_bn: bool) -> None:
    """Frozen parts (and frozen BatchNorm statistics) stay in eval mode while the rest trains."""
    if trainable_all:
        model.train()
        if freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return
    model.eval()
    container = model.get_submodule(head_path(model).split(".")[0])
    container.train()  # the head and the dropout right before it (efficientnet/mobilenet classifiers)


def make_optimizer(model: nn.Module, cfg: Config, finetune: bool) -> torch.optim.AdamW:
    """AdamW on the trainable parameters: head at ``lr``, backbone at ``lr / backbone_lr_div`` when fine-tuning."""
    head_params = list(head_module(model).parameters())
    head_ids = {id(p) for p in head_params}
    backbone_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr / (cfg.backbone_lr_div if finetune else 1.0)})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _full_stage(stage: str, cfg: Config, paths: RunPaths, rt: Runtime, model: nn.Module, splits: dict,
                progress: Progress, resume: dict | None, save_ckpt: Callable) -> None:
    """Images through the whole network: the head stage when features cannot be cached, or fine-tune."""
    finetune = stage == "finetune"
    total = cfg.finetune_epochs if finetune else cfg.epochs
    if finetune:
        for p in model.parameters():
            p.requires_grad_(True)
    optimizer = make_optimizer(model, cfg, finetune)
    train_loader = _train_loader(paths, splits, cfg, rt)
    val_loader = _eval_loader(paths, splits, "val", cfg, rt)
    steps = len(train_loader)
    warmup = int(cfg.warmup_epochs * steps) if finetune else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total * steps))
    if resume is not None and resume["progress"]["stage"] == stage:
        restore_optimization(resume, optimizer, scheduler, steps)
    model.to(rt.device, memory_format=rt.memory_format())
    trained = model
    if finetune and cfg.sync_bn and rt.distributed:
        if rt.device.type == "cuda":
            trained = nn.SyncBatchNorm.convert_sync_batchnorm(trained)
        elif rt.is_main:
            print("train: sync_bn needs CUDA (SyncBatchNorm has no CPU kernels); keeping per-rank BatchNorm")
    if rt.distributed:
        trained = DistributedDataParallel(trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        trained = torch.compile(trained)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None

    def one_epoch(epoch: int) -> dict:
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        _set_train_modes(model, finetune or not cfg.freeze_backbone, cfg.freeze_bn)
        record = train_one_epoch(trained, train_loader, optimizer, scheduler, rt,
                                 cfg.grad_clip if finetune else 0.0, f"{stage} {epoch}/{total}", scaler)
        val = evaluate(model, val_loader, rt)
        return {**record, "val_loss": val["loss"], "val_accuracy": val["accuracy"]}

    _run_epochs(stage, total, progress, one_epoch, lambda best: save_ckpt(optimizer, scheduler, best),
                patience=cfg.patience if finetune else None)


def train(cfg: Config, paths: RunPaths, rt: Runtime, resume_mode: str = "auto") -> Path:
    """Train (or resume) and write checkpoints + ``metrics.json``; returns the metrics path."""
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
        model.load_state_dict(resume["model"], strict=not resume.get("head_only", False))
        progress = Progress(**resume["progress"])
        print(f"train: resuming {progress.stage} stage after epoch {progress.epoch} from {paths.checkpoints}/last.pt")
    where = {"force": True} if rt.distributed else {}  # each rank says where it runs
    print(f"train: {cfg.arch} ({cfg.weights}) on {len(classes)} classes {classes}; {rt.describe()}", **where)

    def save_ckpt(optimizer, scheduler, is_best: bool, head_only: bool = False) -> None:
        save_checkpoint(paths, rt, fp, model, optimizer, scheduler, progress, is_best, head_only)

    if progress.stage == "head":
        cached = cfg.freeze_backbone and cfg.cache_features and split_backbone_head(model) is not None
        if cfg.freeze_backbone and cfg.cache_features and not cached:
            print(f"train: {cfg.arch} is not a plain feature extractor + linear head; using the full loop")
        stage_fn = _head_on_features if cached else _full_stage
        args = () if cached else ("head",)
        stage_fn(*args, cfg, paths, rt, model, splits, progress, resume, save_ckpt)
        resume = None
        if cfg.finetune_epochs > 0:
            model.load_state_dict(_best_state(paths, model))
            progress.stage, progress.epoch = "finetune", 0
    if progress.stage == "finetune" and cfg.finetune_epochs > 0:
        _full_stage("finetune", cfg, paths, rt, model, splits, progress, resume, save_ckpt)

    model.load_state_dict(_best_state(paths, model))
    model.to(rt.device, memory_format=rt.memory_format())
    test = evaluate(model, _eval_loader(paths, splits, "test", cfg, rt), rt)
    if rt.is_main:
        write_metrics(paths, progress, {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                                        "test_count": test["count"], "classes": classes})
        print(f"train: best {progress.best_epoch}; test_accuracy={_fmt(test['accuracy'])} on {test['count']} images")
    barrier(rt)
    return paths.metrics


def _best_state(paths: RunPaths, model: nn.Module) -> dict:
    best = paths.checkpoints / "best.pt"
    if best.exists():
        return torch.load(best, map_location="cpu", weights_only=True)["model"]
    return model.state_dict()  # no epoch had a val score (no val images): keep the last weights
