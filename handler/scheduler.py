"""How a server spends the machine: workers, threads and batching per model, and the cross-process
board that lets a lone request use the idle cores.

Every runtime plans with ``serving_plan``; ``jobs serve``, the serve container's entry point and the
KServe export write TorchServe's settings from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handler import cpus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingPlan:
    """Workers, torch threads per worker and TorchServe batching for the machine that serves."""

    workers: int
    threads: int
    batch_size: int
    max_batch_delay_ms: int
    solo_threads: int  # torch threads for a batch of one image (see serving_plan)

    def model_settings(self) -> dict[str, int]:
        """The per-model keys of TorchServe's ``models`` setting in config.properties."""
        return {"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms}


def serving_plan(cores: int | None = None, gpus: int | None = None) -> ServingPlan:
    """Choose from the machine, not from constants tuned on one CPU.

    GPU: one worker per GPU, big batches, a short batch delay (the GPU is idle while it waits).
    CPU: several single-digit-thread workers rather than one worker on every core. Intra-op threads
    wait on each other at every layer, so one thread preempted by the TorchServe frontend, the
    load or a neighbour stalls the whole forward pass; separate workers also decode in parallel
    (bench/serve.py on 2 cores: two 1-thread processes 34-36 img/s, one 2-thread process 24-27).
    Threads grow to 4 per worker on big machines, where that many workers' model copies would cost
    more memory than they win. But a lone request on one thread is slow (85 ms p50 over HTTP against
    58 on both cores), so a batch of one image -- TorchServe found nothing else queued: low load --
    runs on ``solo_threads`` (up to 4 cores), and batches of several go back to ``threads``. A 5 ms
    batch delay on the CPU: long enough for the clients a batch just answered to send their next
    request into the next batch, so concurrent load forms full batches instead of lone images (with
    1 ms, 8 clients on 2 cores made batches of 2.6 on average and cost 31 CPU ms a 180 px photo against
    19 with 5 ms: bench/README.md); a lone request waits at most those 5 ms.
    """
    cores = cores or cpus.usable_cpus()
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus:
        threads = max(1, cores // gpus)
        return ServingPlan(workers=gpus, threads=threads, batch_size=32, max_batch_delay_ms=5, solo_threads=threads)
    threads = max(1, min(4, cores // 4))
    return ServingPlan(workers=max(1, cores // threads), threads=threads, batch_size=4, max_batch_delay_ms=5,
                       solo_threads=min(cores, max(threads, 4)))


def torch_threads(option: Any, device: torch.device) -> tuple[int, int]:
    """(torch and decode threads per worker, torch threads for a one-image batch): "auto" follows
    ``serving_plan`` for this machine; a number is used for both."""
    if option != "auto":
        return (max(0, int(option)),) * 2
    plan = serving_plan(gpus=1 if device.type == "cuda" else 0)
    return plan.threads, plan.solo_threads


class BusyBoard:
    """Which workers of one model are running a batch right now, across their processes.

    One small file per model folder in the temp directory, shared by the model's workers: each worker
    claims a slot for its life (an fcntl lock on byte ``SLOTS + i``) and holds a lock on byte ``i``
    while it runs a batch. A dead worker's locks vanish with it. A worker handed a lone image uses
    the idle cores only when no other worker is busy, so two lone images never oversubscribe them.
    """

    SLOTS = 64

    def __init__(self, model_dir: Path):
        key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
        try:
            self.fd = os.open(Path(tempfile.gettempdir()) / f".busy-{key}", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:  # no writable temp dir: every batch keeps to the worker's share
            logger.warning("no busy board (%s): lone images run on the worker's share of the cores", e.strerror)
            self.fd, self.slot = None, None
            return
        self.slot = next((i for i in range(self.SLOTS) if self._try_lock(self.SLOTS + i)), None)

    def _try_lock(self, byte: int) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            return True
        except OSError:
            return False

    def others_busy(self) -> bool:
        """True when another worker of this model is running a batch (or none could be told apart)."""
        if self.slot is None:
            return True
        return any(i != self.slot and not self._is_free(self.SLOTS + i) and not self._is_free(i)
                   for i in range(self.SLOTS))

    def _is_free(self, byte: int) -> bool:
        """No other process holds ``byte`` (fcntl locks are per process: this one's own never conflict)."""
        if not self._try_lock(byte):
            return False
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte)
        return True

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        if self.slot is None:
            yield
            return
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.slot)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.slot)


class WorkerThreads:
    """One worker's torch threads around each forward pass: ``threads`` for a batch, ``solo`` for a lone image
    while no other worker of the model is busy (``BusyBoard``). Every runtime's worker runs its batches in it."""

    def __init__(self, model_dir: Path, threads: int, solo: int, on_cpu: bool):
        self.threads, self.solo = threads, solo
        self.board = BusyBoard(model_dir) if on_cpu and solo > threads else None

    @contextlib.contextmanager
    def running(self, images: int) -> Iterator[None]:
        if self.board is None:
            yield
            return
        with self.board.busy():
            threads = self.solo if images == 1 and not self.board.others_busy() else self.threads
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            yield
