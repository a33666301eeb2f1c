"""Checkpoints: the one place that writes, reads, validates and moves aside training state.

``last.pt`` is what a resume needs (weights, optimizer, progress, RNG, the training config);
``best.pt`` is the whole model at the best val epoch, with the training config and the label
order, which is all that evaluate and export read: they never look at the options they were
given for the architecture or the classes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from jobs.config import RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_torch_save

FORMAT = 2
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(JobError):
    pass


def write(paths: RunPaths, name: str, state: dict) -> Path:
    return atomic_torch_save(paths.checkpoints / name, {"format": FORMAT, **state})


def read(path: Path, fix: str) -> dict:
    """A checkpoint this code wrote, or one line naming the file and ``fix``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); {fix}") from None
    expected = {"model", "progress", "config", "classes"}
    if not isinstance(state, dict) or state.get("format") != FORMAT or not expected <= set(state):
        raise CheckpointError(f"checkpoint {path} was not written by this version of the job; {fix}")
    return state


def move_aside(paths: RunPaths) -> Path:
    """Old checkpoints are never deleted: they move to a uniquely named sibling folder."""
    target = paths.out / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
    paths.checkpoints.rename(target)
    return target


def for_inference(paths: RunPaths) -> tuple[Path, dict]:
    """``best.pt``, else ``last.pt`` (a run killed before any epoch had a val score): a whole model."""
    fresh = f"re-run `python -m jobs train --out {paths.out} --fresh`"
    for name in (BEST, LAST):
        path = paths.checkpoints / name
        if path.exists():
            state = read(path, fresh)
            if state.get("head_only"):
                raise CheckpointError(f"checkpoint {path} holds only the head (training stopped inside the head "
                                      f"stage); finish it with `python -m jobs train --out {paths.out}`")
            return path, state
    raise CheckpointError(f"no checkpoint in {paths.checkpoints}; run `python -m jobs train --out {paths.out}` first")
