"""Where and how the job runs: device, autocast dtype, memory format, torchrun ranks.

All chosen at run time, so one code path serves a laptop CPU, one GPU and a torchrun cluster.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from handler.cpus import usable_cpus
from handler.precision import native_bf16
from jobs.config import Config
from jobs.errors import JobError
from jobs.runlock import torchrun_rank


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = plain fp32
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        where = f" rank {self.rank}/{self.world_size}" if self.distributed else ""
        return f"device={self.device} precision={amp} channels_last={self.channels_last}{where}"


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def _pick_amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision in {"bf16", "fp16"}:
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 autocast only pays on CPUs with bf16 instructions; elsewhere it is emulated and slower.
    return torch.bfloat16 if native_bf16(device) else None


def setup(cfg: Config) -> Runtime:
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set) and pick devices."""
    # torchrun sets LOCAL_RANK; a bare RANK/WORLD_SIZE (e.g. set pod-wide by the Kubeflow operator)
    # does not make a plain `python -m jobs evaluate` wait for peers that never come.
    launched = "LOCAL_RANK" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = torchrun_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if world_size > 1 and not dist.is_initialized():
        # Generous: under `jobs run`, rank 0 collects and cleans while the others wait at a barrier.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=6))
    if world_size > 1:
        _print_on_rank0_only(rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return Runtime(device, _pick_amp_dtype(device, cfg.precision), cfg.channels_last, rank, world_size, local_rank)


def _print_on_rank0_only(rank: int) -> None:
    """Only rank 0 talks (as torchvision's references do); ``print(..., force=True)`` speaks on any rank."""
    builtin_print = builtins.print

    def rank_aware_print(*args, force: bool = False, **kwargs) -> None:
        if rank == 0 or force:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    # Plain lists and tensors only, so checkpoints load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_num_workers(cfg: Config, rt: Runtime) -> int:
    if cfg.deterministic:
        return 0
    if cfg.num_workers >= 0:
        return cfg.num_workers
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    return max(1, min(8, usable_cpus() // ranks_here - 1))
