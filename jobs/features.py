"""Backbone features computed once per image and cached, shared by the audit and the head stage.

With a frozen backbone the original loop paid a full forward per image per epoch. Here each
training image is seen through ``feature_views`` fixed views (view 0 = the eval transform,
the rest = the train augmentation), each pushed through the backbone once; every epoch then
draws one view per image. Val/test and the audit use the eval view only.

The cache is per image: ``<out>/cache/features/<backbone key>/chunk-*.pt``, where the backbone key
names the architecture, weights, preprocessing, precision and memory format, and each entry is
keyed by the image's content hash (the augmented views also by seed and count). A new split, a
relabelled or excluded image, or an audit before the split: no image is ever run twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from handler.model import fold_batchnorm, preprocess_spec
from handler.preprocess import Preprocessor, decode_rgb, eval_transform, train_transform
from jobs.config import FEATURE_CACHE_KEYS, Config, RunPaths
from jobs.data import ImageFiles, ShardSampler, make_loader, split_items
from jobs.fileio import atomic_torch_save, read_run_file
from jobs.model import ModelError, weights_tag
from jobs.progress import Bar
from jobs.runtime import Runtime, barrier, default_num_workers


def backbone_key(cfg: Config, rt: Runtime, num_classes: int) -> str:
    """What makes two backbone passes over the same image give the same features.

    ``num_classes`` too: with ``weights: none`` the seeded random backbone depends on how much of
    the RNG the head's initialisation drew before the convolutions were initialised.
    """
    parts = {k: getattr(cfg, k) for k in FEATURE_CACHE_KEYS if k not in {"seed", "feature_views"}}
    parts.update(weights=weights_tag(cfg.weights), preprocess=preprocess_spec(cfg.arch), amp=str(rt.amp_dtype),
                 channels_last=rt.channels_last, num_classes=num_classes)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class FeatureStore:
    """Per-image feature tensors in chunk files; each extraction adds one chunk atomically.

    A chunk that cannot be read (a damaged disk, a foreign file) is named and ignored: its images
    are simply computed again.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, torch.Tensor] = {}
        for chunk in sorted(folder.glob("chunk-*.pt")):
            try:
                self.entries.update(torch.load(chunk, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - a bad cache file is recomputed, never fatal
                print(f"features: cache {chunk} unreadable ({type(e).__name__}); its images are computed again")

    def add(self, entries: dict[str, torch.Tensor]) -> None:
        if entries:
            name = hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()[:16]
            atomic_torch_save(self.folder / f"chunk-{time.time_ns()}-{name}.pt", entries)
            self.entries.update(entries)


def _eval_key(sha: str) -> str:
    return f"{sha}:eval"


def _augmented_key(sha: str, seed: int, count: int) -> str:
    return f"{sha}:aug:{seed}:{count}"


class ViewsDataset(ImageFiles):
    """Image i -> (views, C, H, W): the eval view (``with_eval``) and ``augmented`` train views.

    Each image is decoded once for all its views, and its augmentations are drawn from a
    generator seeded by (seed, content hash), so the views do not depend on the number of ranks,
    workers, on the split, or on how much random state earlier code used.
    """

    def __init__(self, root: Path, items: list[tuple[str, str]], spec: dict, with_eval: bool, augmented: int,
                 seed: int):
        super().__init__(root, [(path, 0) for path, _ in items], Preprocessor(spec))
        self.shas, self.with_eval, self.augmented, self.seed = [sha for _, sha in items], with_eval, augmented, seed
        self.eval, self.augment = eval_transform(spec), train_transform(spec)
        self.resize_size = spec["resize_size"]
        self.views = int(with_eval) + augmented

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, _ = self.items[i]
        image = decode_rgb((self.root / path).read_bytes(), self.resize_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + int(self.shas[i][:15], 16))
            views = [self.eval(image)] if self.with_eval else []
            views += [self.augment(image) for _ in range(self.augmented)]
        return torch.stack(views), 0


@torch.no_grad()
def _extract(backbone: nn.Module, dataset: ViewsDataset, cfg: Config, rt: Runtime, what: str) -> torch.Tensor:
    """This rank's share of the dataset through the backbone -> full (N, V, D) tensor on every rank."""
    sampler = ShardSampler(len(dataset), rt.rank, rt.world_size)
    # About batch_size images per forward pass in all: on CPUs a batch of 32 x 5 views runs at
    # half the per-image speed of a batch of 32 (measured: 15.8 vs 24.8 img/s, ResNet-18, 2 cores).
    images_per_batch = max(1, cfg.batch_size // dataset.views)
    loader = make_loader(dataset, images_per_batch, default_num_workers(cfg, rt), sampler=sampler,
                         pin_memory=rt.device.type == "cuda")
    # Each batch goes straight into one matrix: a list of batches and its concatenation held it twice.
    mine, done = torch.zeros(0), 0
    with Bar(len(sampler), f"features: {what}", unit="img", disable=not rt.is_main) as bar:
        for images, _ in loader:
            n, v = images.shape[:2]
            images = images.flatten(0, 1).to(rt.device, non_blocking=True, memory_format=rt.memory_format())
            with rt.autocast():
                batch = backbone(images)
            if not done:  # the width is known from the first batch
                mine = torch.empty(len(sampler), v, batch.shape[1])
            mine[done:done + n] = batch.unflatten(0, (n, v))
            done += n
            bar.update(n)
    if not rt.distributed:
        return mine
    # Rank r holds indices r, r+W, r+2W, ...: gather every shard, then interleave back to dataset order.
    gathered: list = [None] * rt.world_size
    dist.all_gather_object(gathered, mine)
    out = torch.empty(len(dataset), *next(g for g in gathered if g.numel()).shape[1:])
    for r, part in enumerate(gathered):
        if part.numel():  # a rank with no image of its own (fewer images than ranks)
            out[r::rt.world_size] = part
    return out


def view_features(cfg: Config, paths: RunPaths, rt: Runtime, backbone: nn.Module, num_classes: int,
                  items: list[tuple[str, str]], views: int, what: str) -> torch.Tensor:
    """(N, views, D) features of ``items`` ((path in the run folder, content hash)); view 0 = eval.

    Only the images (and views) the cache lacks go through the backbone; ``what`` names them in
    the one line that says how many were computed.
    """
    store = FeatureStore(paths.cache / "features" / backbone_key(cfg, rt, num_classes))
    augmented = views - 1
    unique = list(dict.fromkeys(items))  # an image listed twice is computed once
    need_eval = {sha for _, sha in unique if _eval_key(sha) not in store.entries}
    need_aug = {sha for _, sha in unique if augmented and _augmented_key(sha, cfg.seed, augmented) not in store.entries}
    passes, started = 0, time.perf_counter()
    new: dict[str, torch.Tensor] = {}
    folded = None
    for with_eval, count, wanted in ((True, augmented, need_eval & need_aug), (True, 0, need_eval - need_aug),
                                     (False, augmented, need_aug - need_eval)):
        todo = [(p, sha) for p, sha in unique if sha in wanted]
        if not todo:
            continue
        if folded is None:
            folded = fold_batchnorm(backbone).to(rt.device, memory_format=rt.memory_format())
        views_of = ViewsDataset(paths.out, todo, preprocess_spec(cfg.arch), with_eval, count, cfg.seed)
        computed = _extract(folded, views_of, cfg, rt, what)
        # Views into the computed matrix, not copies: they cover it whole, so the chunk file holds it once too.
        for i, (_, sha) in enumerate(todo):
            if with_eval:
                new[_eval_key(sha)] = computed[i, 0]
            if count:
                new[_augmented_key(sha, cfg.seed, count)] = computed[i, int(with_eval):]
        passes += computed.shape[0] * computed.shape[1]
    if new:
        if rt.is_main:
            store.add(new)
        else:
            store.entries.update(new)
        barrier(rt)
    seconds = time.perf_counter() - started
    rate = f"; {passes / seconds:.1f} img/s through the backbone" if passes else ""
    ranks = f"; shared by {rt.world_size} ranks" if passes and rt.distributed else ""
    print(f"features: {what}: {len(items)} images x {views} views, {passes} backbone passes in "
          f"{seconds:.1f} s ({len(need_eval | need_aug)} images not in the cache{rate}{ranks})")
    if not items:
        return torch.zeros(0, views, 0)
    first = store.entries[_eval_key(items[0][1])]
    out = torch.empty(len(items), views, *first.shape, dtype=first.dtype)  # filled in place: one copy, not two
    for j, (_, sha) in enumerate(items):
        out[j, 0] = store.entries[_eval_key(sha)]
        if augmented:
            out[j, 1:] = store.entries[_augmented_key(sha, cfg.seed, augmented)]
    return out


def cached_eval_features(cfg: Config, paths: RunPaths, rt: Runtime, num_classes: int,
                         hashes: list[str]) -> torch.Tensor | None:
    """(N, D) view-0 features of the images with these content hashes when the cache holds every one, else None;
    it computes nothing. None too where ``cfg.weights`` names a file no longer there, or another one now: the key
    then names other weights than those the features came from."""
    try:
        key = backbone_key(cfg, rt, num_classes)
    except ModelError:
        return None
    wanted = [_eval_key(sha) for sha in hashes]
    store = FeatureStore(paths.cache / "features" / key)
    if not wanted or not all(k in store.entries for k in wanted):
        return None
    return torch.stack([store.entries[k] for k in wanted])


def content_hashes(paths: RunPaths) -> dict[str, str]:
    """Path in the run folder -> content hash of its source, from clean_report.json (never re-hashed)."""
    report = read_run_file(paths.clean_report, f"run `python -m jobs clean --out {paths.out} --data DATA`",
                           ("files",))
    return {f["output"]: f["sha256"] for f in report["files"] if f["status"] != "excluded"}


def load_or_extract(cfg: Config, paths: RunPaths, rt: Runtime, backbone: nn.Module, splits: dict,
                    split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, V, D), labels (N,)) for ``split``, computing only what the cache lacks."""
    items = split_items(splits, split)
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    shas = content_hashes(paths)
    views = cfg.feature_views if split == "train" else 1
    items_with_hashes = [(p, shas[p]) for p, _ in items]
    return view_features(cfg, paths, rt, backbone, len(splits["classes"]), items_with_hashes, views, split), labels
