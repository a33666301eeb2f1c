"""torchrun on this CPU machine: real subprocesses, real ranks talking gloo over loopback.

Each run trains on the small real fixture (16 photos per class) with random weights, so the
checks are about the machinery (one set of artifacts, ranks agreeing with a single process,
a killed rank failing the job and a resume on another world size), not about accuracy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_IMAGES, REPO, TINY_ARCH

# fp32 and no loader workers: the same numbers on every CPU, and two ranks fit two cores.
MODEL = ("--arch", TINY_ARCH, "--weights", "none", "--seed", "42", "--num-workers", "0", "--device", "cpu",
         "--precision", "fp32")  # what the audit takes too
TRAIN = (*MODEL, "--batch-size", "8")
CLEAN = ("--min-images-per-class", "3")
RUN_TIMEOUT = 300

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not FIXTURE_IMAGES.is_dir(), reason=f"{FIXTURE_IMAGES} is missing")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    # One thread per rank keeps two ranks on two cores; gloo stays on loopback.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return env


def _single(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs", *args]


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    # `python -m torch.distributed.run` is the torchrun console script, bound to this interpreter.
    # --standalone: a private rendezvous on a free localhost port, so runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "jobs", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, \
        f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    """The fixture cleaned and split once; every test trains in its own copy."""
    out = tmp_path_factory.mktemp("split")
    _run(_single("clean", "--data", str(FIXTURE_IMAGES), "--out", str(out), *CLEAN))
    _run(_single("split", "--out", str(out)))
    return out


@pytest.fixture
def fresh_run(split_dir, tmp_path):
    def make(name: str) -> Path:
        return Path(shutil.copytree(split_dir, tmp_path / name))

    return make


@pytest.fixture(scope="module")
def cached_single(split_dir, tmp_path_factory) -> dict:
    """The single-process reference for the cached-feature head stage (shared by two tests)."""
    out = Path(shutil.copytree(split_dir, tmp_path_factory.mktemp("cached") / "single"))
    _run(_single("train", "--out", str(out), *TRAIN, *CACHED))
    _run(_single("evaluate", "--out", str(out), "--num-workers", "0"))  # the one place the test split is scored
    return _metrics(out)


# One augmented view: the views are drawn per rank shard, so only view 0 (the eval transform)
# is the same under every world size (see the lead's report on features.Views).
CACHED = ("--epochs", "2", "--feature-views", "1")


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _stray_files(out: Path) -> list[str]:
    """Leftovers of interrupted or duplicated atomic writes: temp parts and moved-aside folders."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.endswith(".part") or p.name.startswith("checkpoints.old-"))


def _assert_one_set_of_artifacts(out: Path, expected_epochs: list[tuple[str, int]]) -> dict:
    metrics = _metrics(out)
    assert [(e["stage"], e["epoch"]) for e in metrics["epochs"]] == expected_epochs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert _stray_files(out) == []
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["progress"]["history"] == metrics["epochs"]
    # The checkpoint holds the bare model, not the DDP wrapper ("module." keys would not load in serving).
    assert not any(k.startswith("module.") for k in last["model"])
    return metrics


def _assert_both_ranks_ran(output: str) -> None:
    assert "rank 0/2" in output and "rank 1/2" in output, output[-2000:]


def test_cached_head_stage_under_torchrun_matches_one_process(cached_single, fresh_run):
    out = fresh_run("ddp")
    result = _run(_torchrun("train", "--out", str(out), *TRAIN, *CACHED))
    _assert_both_ranks_ran(result.stdout)
    _run(_single("evaluate", "--out", str(out), "--num-workers", "0"))
    ddp = _assert_one_set_of_artifacts(out, [("head", 1), ("head", 2)])
    assert len(list((out / "cache" / "features").glob("*/chunk-*.pt"))) == 2  # train + val, written once by rank 0
    # Features are extracted in rank shards and gathered; the head then trains identically
    # everywhere, so two ranks reproduce one process up to float summation order.
    for mine, ref in zip(ddp["epochs"], cached_single["epochs"], strict=True):
        assert mine["val_accuracy"] == ref["val_accuracy"]
        assert mine["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)
    assert ddp["test_accuracy"] == cached_single["test_accuracy"]
    assert ddp["test_count"] == cached_single["test_count"]


def test_full_loop_and_finetune_under_torchrun_close_to_one_process(fresh_run):
    # The head stage through the whole network (no feature cache), then the unfrozen fine-tune:
    # both wrapped in DistributedDataParallel, each rank on half of every global batch of 8.
    args = ("--no-cache-features", "--epochs", "1", "--finetune-epochs", "1", *TRAIN)
    single_out, ddp_out = fresh_run("single"), fresh_run("ddp")
    _run(_single("train", "--out", str(single_out), *args))
    result = _run(_torchrun("train", "--out", str(ddp_out), *args))
    _assert_both_ranks_ran(result.stdout)
    _run(_single("evaluate", "--out", str(ddp_out), "--num-workers", "0"))  # the DDP checkpoint scores the test split
    expected = [("head", 1), ("finetune", 1)]
    single = _assert_one_set_of_artifacts(single_out, expected)
    ddp = _assert_one_set_of_artifacts(ddp_out, expected)
    assert ddp["test_count"] > 0
    # Augmentation draws differ per rank, so the trajectories are close, not equal: allow one val image.
    one_image = 1 / sum(1 for split in json.loads((ddp_out / "splits.json").read_text())["files"].values()
                        if split == "val")
    for mine, ref in zip(ddp["epochs"], single["epochs"], strict=True):
        assert abs(mine["val_accuracy"] - ref["val_accuracy"]) <= one_image + 1e-9
    assert torch.load(ddp_out / "checkpoints" / "last.pt", weights_only=True)["progress"]["stage"] == "finetune"


def test_a_timm_model_trains_its_head_and_fine_tunes_under_torchrun(fresh_run, real_weights: Path):
    """timm's EfficientNet-Lite0 (real weights) through both stages under DistributedDataParallel."""
    out = fresh_run("timm")
    args = (*TRAIN, "--arch", "timm/tf_efficientnet_lite0", "--weights", str(real_weights), *CACHED,
            "--finetune-epochs", "1")
    result = _run(_torchrun("train", "--out", str(out), *args))
    _assert_both_ranks_ran(result.stdout)
    metrics = _assert_one_set_of_artifacts(out, [("head", 1), ("head", 2), ("finetune", 1)])
    assert all(math.isfinite(e["val_loss"]) for e in metrics["epochs"])
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert "conv_stem.weight" in state and state["classifier.weight"].shape[0] == 2


# ----------------------------------------------------------------------------------------------
# a rank dies


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The worker process torchrun started for ``rank`` (found by the RANK it was given)."""
    for pid in _children(torchrun_pid):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    return None


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"torchrun ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _gone(pid: int, timeout: float = 30) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_killed_rank_fails_the_job_and_resumes_on_one_process(fresh_run, tmp_path):
    out = fresh_run("killed")
    args = ("train", "--out", str(out), "--no-cache-features", "--epochs", "4", *TRAIN)
    log = tmp_path / "torchrun.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(_torchrun(*args), cwd=REPO, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # Epoch 1 is checkpointed (last.pt is renamed into place last), so epoch 2 is under way.
        _wait_for(lambda: "epoch 1/4" in log.read_text() and (out / "checkpoints" / "last.pt").exists(),
                  RUN_TIMEOUT, proc, log)
        victim, survivor = _rank_pid(proc.pid, 1), _rank_pid(proc.pid, 0)
        assert victim and survivor, f"no rank processes under torchrun {proc.pid}"
        os.kill(victim, signal.SIGKILL)
        returncode = proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only our own session: torchrun and its ranks
    output = log.read_text()
    assert returncode != 0, output[-3000:]
    assert "epoch 4/4" not in output
    assert _gone(survivor), f"rank 0 (pid {survivor}) outlived the failed job"
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    done = last["progress"]["epoch"]
    assert 1 <= done < 4 and last["progress"]["stage"] == "head"

    # The same command on one process (world size 2 -> 1) picks the checkpoint up.
    result = _run(_single(*args))
    assert f"resuming head stage after epoch {done}" in result.stdout
    _assert_one_set_of_artifacts(out, [("head", e) for e in range(1, 5)])


# ----------------------------------------------------------------------------------------------
# the whole job


def test_run_under_torchrun_writes_one_set_of_artifacts(cached_single, split_dir, tmp_path):
    out = tmp_path / "run"
    result = _run(_torchrun("run", "--data", str(FIXTURE_IMAGES), "--out", str(out), *CLEAN, *TRAIN, *CACHED))
    _assert_both_ranks_ran(result.stdout)
    # Rank 0 alone cleaned and split: the same split as the one-process reference.
    assert json.loads((out / "splits.json").read_text())["files"] == \
        json.loads((split_dir / "splits.json").read_text())["files"]
    # The audit's backbone pass was shared by the ranks, and found what one process finds.
    assert re.search(r"^features: audit: \d+ images x 1 views, \d+ backbone passes .*; shared by 2 ranks\)$",
                     result.stdout, re.M), result.stdout[-3000:]
    alone = Path(shutil.copytree(split_dir, tmp_path / "alone"))
    _run(_single("audit", "--out", str(alone), *MODEL))
    found, expected = (json.loads((run / "audit.json").read_text()) for run in (out, alone))
    for kind in ("near_duplicates", "label_issues", "outliers", "image_issues"):
        assert [e.get("files", e.get("file")) for e in found[kind]] == \
            [e.get("files", e.get("file")) for e in expected[kind]], kind
    assert found["label_check"]["judged"] == expected["label_check"]["judged"]
    metrics = _assert_one_set_of_artifacts(out, [("head", 1), ("head", 2)])
    assert [e["val_accuracy"] for e in metrics["epochs"]] == [e["val_accuracy"] for e in cached_single["epochs"]]
    assert metrics["test_accuracy"] == cached_single["test_accuracy"]
    assert sorted(p.name for p in (out / "model-store").iterdir()) == [".versions", "classifier.mar"]
    assert {"model.pt", "index_to_name.json", "metadata.json"} <= {p.name for p in (out / "model").iterdir()}


def test_resuming_with_other_steps_per_epoch_keeps_the_cosine_on_course():
    """The lr of a step is a function of (stage, epoch, step): a run checkpointed after 2 of 4 epochs
    at 8 steps each and resumed with 4 steps per epoch (twice the processes) continues from the
    half-way point, decays every step, and reaches 0 at the stage's end."""
    from jobs.train import Stage, lr_factor

    stage = Stage("head", epochs=4, train_all=False, on_features=False)
    assert lr_factor(stage, 2, 0, 8) == pytest.approx(0.5) == lr_factor(stage, 2, 0, 4)  # cos(pi/2)
    resumed = [lr_factor(stage, epoch, step, 4) for epoch in (2, 3) for step in range(4)]
    assert all(a > b for a, b in zip(resumed, resumed[1:]))
    assert lr_factor(stage, 4, 0, 4) == 0.0  # one step past the last one
    warm = Stage("finetune", epochs=2, train_all=True, on_features=False, warmup_epochs=0.5)
    assert [lr_factor(warm, 0, s, 4) for s in range(2)] == [0.5, 1.0]  # linear warmup over half an epoch
