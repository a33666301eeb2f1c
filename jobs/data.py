"""Datasets over ``splits.json`` (never a second directory scan) and their loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from jobs.config import RunPaths
from jobs.errors import JobError
from jobs.fileio import read_run_file


class SplitDataError(JobError):
    pass


def load_splits(paths: RunPaths) -> dict:
    rebuild = f"run `python -m jobs split --out {paths.out}`"
    if not paths.splits.exists():
        raise SplitDataError(f"{paths.splits} not found; {rebuild} first")
    return read_run_file(paths.splits, rebuild, ("classes", "files", "split_hash", "data_hash"))


def split_items(splits: dict, split: str) -> list[tuple[str, int]]:
    """(path relative to the run folder, class index) for one split, in a stable order."""
    index = {name: i for i, name in enumerate(splits["classes"])}
    return [(path, index[Path(path).parts[1]]) for path, s in sorted(splits["files"].items()) if s == split]


class ImageFiles(Dataset):
    """Image files through ``to_tensor``: a ``handler.preprocess.Preprocessor``, the path the server decodes by."""

    def __init__(self, root: Path, items: Sequence[tuple[str, int]], to_tensor: Callable[[bytes], torch.Tensor]):
        self.root, self.items, self.to_tensor = Path(root), list(items), to_tensor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.to_tensor((self.root / path).read_bytes()), label


class SeededAugment(Dataset):
    """``dataset[(i, seed)]`` draws image i's random augmentation from a generator seeded by ``seed``.

    The draws then do not depend on the number of workers or ranks, nor on where in an epoch a
    run was resumed: ``EpochSampler`` hands out the seeds.
    """

    def __init__(self, dataset: ImageFiles):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[i]


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's (index, augmentation seed) pairs for one epoch, in an order fixed by (seed, epoch).

    The permutation is padded to a multiple of ``world_size`` (every rank takes the same number of
    steps, as DDP needs) and dealt out round-robin. ``set_epoch(epoch, skip)`` skips the first
    ``skip`` samples of all ranks together, which is exactly where a mid-epoch checkpoint stopped.
    """

    def __init__(self, length: int, seed: int, rank: int, world_size: int):
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _padded(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        return order + order[: (-self.length) % self.world_size]

    def shard_length(self, skip: int) -> int:
        return len(range(self.rank, len(self._padded()) - skip, self.world_size))

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for i in self._padded()[self.skip:][self.rank::self.world_size]:
            yield i, (base + i) % 2**63

    def __len__(self) -> int:
        return self.shard_length(self.skip)


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
                sampler: Sampler | None = None, pin_memory: bool = False, drop_last: bool = False,
                generator: torch.Generator | None = None) -> DataLoader:
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
        generator=generator,  # the loader's own seed draws then leave the global RNG alone
    )
