"""Datasets over ``splits.json`` (never a second directory scan) and their loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from jobs.config import RunPaths
from jobs.errors import JobError
from jobs.fileio import read_json
from jobs.presets import decode_rgb


class SplitDataError(JobError):
    pass


def load_splits(paths: RunPaths) -> dict:
    if not paths.splits.exists():
        raise SplitDataError(f"{paths.splits} not found; run `python -m jobs split --out {paths.out}` first")
    return read_json(paths.splits)


def split_items(splits: dict, split: str) -> list[tuple[str, int]]:
    """(path relative to the run folder, class index) for one split, in a stable order."""
    index = {name: i for i, name in enumerate(splits["classes"])}
    return [(path, index[Path(path).parts[1]]) for path, s in sorted(splits["files"].items()) if s == split]


class ImageFiles(Dataset):
    """Decodes files with ``presets.decode_rgb`` (the same path the server uses) then transforms."""

    def __init__(self, root: Path, items: Sequence[tuple[str, int]], transform: Callable[[torch.Tensor], torch.Tensor]):
        self.root, self.items, self.transform = Path(root), list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(decode_rgb((self.root / path).read_bytes())), label


class ShardSampler(Sampler[int]):
    """Rank ``rank`` of ``world_size`` takes every world_size-th index: no padding, no overlap.

    Used for evaluation and feature extraction, where DistributedSampler's padding would count
    some images twice.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, *, shuffle: bool = False,
                sampler: Sampler | None = None, pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
