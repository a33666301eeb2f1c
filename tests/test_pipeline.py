"""The whole job as a user runs it, and the resume guarantee, with real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO, SMALL_RUN, TINY_ARCH, copy_run, run_job

from handler.model import preprocess_spec
from jobs.data import split_items
from jobs.predict import predict

pytestmark = pytest.mark.e2e  # whole jobs, servers or torchrun: not in scripts/test.sh --fast


def test_run_writes_every_artifact(finished_template: Path):
    out = finished_template
    for rel in ("clean_report.json", "splits.json", "config.yaml", "metrics.json", "checkpoints/last.pt",
                "checkpoints/best.pt", "model/model.pt", "model/index_to_name.json", "model/metadata.json"):
        assert (out / rel).is_file(), rel
    assert sorted(p.name for p in (out / "dataset").iterdir()) == ["ants", "bees"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(e["stage"], e["epoch"]) for e in metrics["epochs"]] == [("head", 1), ("head", 2)]
    for e in metrics["epochs"]:
        assert {"train_loss", "val_loss", "val_accuracy"} <= set(e)
    assert isinstance(metrics["test_accuracy"], float)
    meta = json.loads((out / "model/metadata.json").read_text())
    assert meta["arch"] == TINY_ARCH and meta["classes"] == ["ants", "bees"] and meta["num_classes"] == 2
    assert meta["preprocess"] == preprocess_spec(TINY_ARCH) and meta["preprocess"]["crop_size"] == 160
    assert meta["data_hash"] and meta["split_hash"] and meta["torch_version"] == torch.__version__
    assert json.loads((out / "model/index_to_name.json").read_text()) == {"0": "ants", "1": "bees"}


def test_exported_state_dict_reloads_and_reproduces_test_accuracy(finished_template: Path):
    finished_run = finished_template
    state = torch.load(finished_run / "model/model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    timm.create_model(TINY_ARCH.removeprefix("timm/"), num_classes=2).load_state_dict(state)  # strict: that one
    splits = json.loads((finished_run / "splits.json").read_text())
    items = split_items(splits, "test")
    results = list(predict(finished_run / "model", [finished_run / p for p, _ in items], backend="torch"))
    correct = sum(r["predictions"][0]["index"] == label for r, (_, label) in zip(results, items))
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert correct / len(items) == pytest.approx(metrics["test_accuracy"])


def test_read_only_commands_leave_the_run_as_it_was(finished_run: Path):
    """evaluate with its own --batch-size, export with its own --topk: config.yaml and the checkpoints
    are untouched, and the next train resumes (before, the saved batch_size changed the fingerprint
    and train started over)."""
    files = ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt")
    before = {f: (finished_run / f).read_bytes() for f in files}
    run_job("evaluate", "--out", str(finished_run), "--batch-size", "7", "--num-workers", "0")
    run_job("export", "--out", str(finished_run), "--topk", "1")
    assert {f: (finished_run / f).read_bytes() for f in files} == before
    assert json.loads((finished_run / "model/metadata.json").read_text())["topk"] == 1
    run_job("export", "--out", str(finished_run))
    model_before = (finished_run / "model/model.pt").read_bytes()

    proc = run_job("train", "--out", str(finished_run))
    assert "resuming head stage after epoch 2" in proc.stdout and "starting over" not in proc.stdout
    assert (finished_run / "config.yaml").read_bytes() == before["config.yaml"]
    run_job("export", "--out", str(finished_run))
    assert (finished_run / "model/model.pt").read_bytes() == model_before  # the same weights, byte for byte


def _epochs(metrics: Path) -> list[dict]:
    """metrics.json's epoch records without the timings, which differ between any two runs."""
    return [{k: v for k, v in e.items() if k not in {"seconds", "images_per_s"}}
            for e in json.loads(metrics.read_text())["epochs"]]


def test_cached_head_stage_resumes_from_its_head_only_checkpoint(prepared_run, monkeypatch, capsys):
    """The cached head stage checkpoints only the head each epoch; a crash there resumes exactly.

    Its epochs take milliseconds, too short to SIGKILL inside one reliably, so the crash is an
    exception raised right after epoch 2's checkpoint is on disk: the files are what a kill leaves.
    """
    from jobs import train as train_module
    from jobs.config import RunPaths, load_config
    from jobs.runtime import setup

    cfg = load_config(overrides={"arch": TINY_ARCH, "weights": "none", "epochs": 4, "batch_size": 4,
                                 "feature_views": 2, "deterministic": True})
    reference = RunPaths(prepared_run("reference"))
    train_module.train(cfg, reference, setup(cfg))
    crashed = RunPaths(prepared_run("crashed"))
    real_save = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        progress = next(a for a in args if isinstance(a, train_module.Progress))  # the Progress just written
        if progress.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, crashed, setup(cfg))
    monkeypatch.undo()
    last = torch.load(crashed.checkpoints / "last.pt", weights_only=True)
    assert last["head_only"] and sorted(last["model"]) == ["fc.bias", "fc.weight"]
    assert (crashed.checkpoints / "last.pt").stat().st_size < 100_000
    whole = torch.load(reference.checkpoints / "last.pt", weights_only=True)["model"].keys()
    assert torch.load(crashed.checkpoints / "best.pt", weights_only=True)["model"].keys() == whole  # always whole

    capsys.readouterr()
    train_module.train(cfg, crashed, setup(cfg))
    assert "resuming head stage after epoch 2" in capsys.readouterr().out

    assert _epochs(crashed.metrics) == _epochs(reference.metrics)
    a = torch.load(crashed.checkpoints / "last.pt", weights_only=True)
    b = torch.load(reference.checkpoints / "last.pt", weights_only=True)
    assert not a["head_only"] and a["model"].keys() == b["model"].keys()  # the stage's end wrote the whole model
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_corrupt_checkpoint_is_reported_not_overwritten(tmp_path: Path, prepared_run):
    out = prepared_run("corrupt")
    (out / "checkpoints").mkdir()
    (out / "checkpoints/last.pt").write_bytes(b"not a checkpoint")
    proc = run_job("train", "--out", str(out), "--arch", TINY_ARCH, "--weights", "none", "--epochs", "1", check=False)
    assert proc.returncode == 2
    assert "checkpoint" in proc.stderr and "corrupt" in proc.stderr and "--fresh" in proc.stderr
    assert (out / "checkpoints/last.pt").read_bytes() == b"not a checkpoint"
    run_job("train", "--out", str(out), "--arch", TINY_ARCH, "--weights", "none", "--epochs", "1", "--fresh")
    kept = list(tmp_path.glob("corrupt/checkpoints.old-*/last.pt"))
    assert kept and kept[0].read_bytes() == b"not a checkpoint"


def _run_until(cmd: list[str], env: dict, marker: bytes, steps_after: int) -> tuple[subprocess.Popen, bytes]:
    """Start ``cmd`` and read its output until ``steps_after`` training steps were logged after ``marker``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen, deadline = b"", time.monotonic() + 400
    while marker not in seen or seen.split(marker, 1)[1].count(b"loss=") < steps_after:
        chunk = proc.stdout.read1(4096)
        assert chunk and time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
        seen += chunk
    return proc, seen


PREEMPTIBLE = {
    # Fine-tune: 6 steps per epoch, a checkpoint after every step (checkpoint_minutes ~ 6 ms).
    "finetune": (["--epochs", "1", "--feature-views", "1", "--finetune-epochs", "2", "--checkpoint-minutes", "0.0001"],
                 b"train finetune: epoch 2/2:", "finetune"),
    # The full loop (the head stage without cached features): only SIGTERM checkpoints inside an epoch.
    "full loop": (["--epochs", "2", "--no-cache-features"], b"train head: epoch 2/2:", "head"),
}


def _preemptible_command(out: Path, kind: str) -> list[str]:
    return [sys.executable, "-m", "jobs", "train", "--out", str(out), "--arch", TINY_ARCH, "--weights", "none",
            "--batch-size", "4", "--deterministic", *PREEMPTIBLE[kind][0]]


def _preemption_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "JOBS_PROGRESS_INTERVAL_S": "0"}  # a log line per step here
    env.pop("PYTHONUNBUFFERED", None)  # the job itself must flush its progress lines
    return env


@pytest.fixture(scope="module")
def uninterrupted(prepared_template: Path, tmp_path_factory):
    """``uninterrupted(kind)``: the run folder of that kind's uninterrupted training, made once for the module
    (every signal of a kind is compared with the same reference)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            out = copy_run(prepared_template, tmp_path_factory.mktemp("uninterrupted") / "run")
            subprocess.run(_preemptible_command(out, kind), cwd=REPO, env=_preemption_env(), check=True,
                           capture_output=True)
            made[kind] = out
        return made[kind]

    return get


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / name, weights_only=True)["model"]


# SIGTERM (Kubernetes' preemption) always checkpoints the step under way; a SIGKILL keeps what the last
# checkpoint holds: every step's in the fine-tune above, the end of epoch 1 in the full loop.
@pytest.mark.parametrize("kind, sig, resumes", [("finetune", signal.SIGTERM, "in epoch 2"),
                                                ("finetune", signal.SIGKILL, "in epoch 2"),
                                                ("full loop", signal.SIGTERM, "in epoch 2"),
                                                ("full loop", signal.SIGKILL, "after epoch 1")])
def test_preempted_mid_epoch_then_resume_is_byte_identical(prepared_run, uninterrupted, kind: str, sig: int,
                                                           resumes: str):
    """SIGTERM: the current step finishes, a checkpoint is written, exit 143 within seconds. A SIGKILL loses
    at most the steps since the last checkpoint. Either way the same command then trains to the weights an
    uninterrupted run ends with, bit for bit (best and last), and the epoch lines reach the pipe as they
    happen."""
    _, marker, stage = PREEMPTIBLE[kind]
    reference = uninterrupted(kind)
    stopped = prepared_run("stopped")
    proc, seen = _run_until(_preemptible_command(stopped, kind), _preemption_env(), marker, steps_after=4)
    assert f"train {stage}: epoch 1/2: train loss".encode() in seen  # the first epoch's line arrived while it ran
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    rest = proc.communicate(timeout=120)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and time.monotonic() - sent < 60, rest.decode(errors="replace")[-1500:]
        assert b"SIGTERM: checkpointed" in rest
    else:
        assert proc.returncode == -signal.SIGKILL
    progress = torch.load(stopped / "checkpoints/last.pt", weights_only=True)["progress"]
    assert (progress["stage"], progress["epoch"]) == (stage, 1)
    assert (progress["samples"] > 0) == (resumes == "in epoch 2")  # a checkpoint from inside epoch 2, or its start

    resumed = subprocess.run(_preemptible_command(stopped, kind), cwd=REPO, env=_preemption_env(),
                             capture_output=True, text=True, check=True)
    assert f"resuming {stage} stage {resumes}" in resumed.stdout
    assert _epochs(stopped / "metrics.json") == _epochs(reference / "metrics.json")
    for name in ("best.pt", "last.pt"):
        ours, theirs = _weights(stopped, name), _weights(reference, name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert not list(stopped.rglob("*.part"))  # the killed run's temp files were swept


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_damaged_run_files_name_themselves_and_the_fix(prepared_run, small_data: Path):
    out = prepared_run("run")
    splits = (out / "splits.json").read_bytes()
    (out / "splits.json").write_bytes(splits[: len(splits) // 2])
    for command in (("train", "--weights", "none"), ("evaluate",)):
        _one_line_error(run_job(*command, "--out", str(out), check=False),
                        "splits.json is damaged", "python -m jobs split --out")
    report = (out / "clean_report.json").read_bytes()
    (out / "clean_report.json").write_bytes(report[:100])
    _one_line_error(run_job("split", "--out", str(out), check=False), "clean_report.json is damaged",
                    "python -m jobs clean --out")
    # `run` rebuilds both from the data folder and goes on.
    proc = run_job("run", "--data", str(small_data), "--out", str(out), *SMALL_RUN)
    assert "splits.json is damaged; assigning every file afresh" in proc.stdout and "done:" in proc.stdout


def test_class_names_and_paths_are_plain_text(tmp_path: Path, small_data: Path):
    """A class folder named like TeX, and an --out with a comma, go through evaluate and archive."""
    (small_data / "ants").rename(small_data / "math$\\undefinedmacro{$")
    out = tmp_path / "C,x"
    proc = run_job("run", "--data", str(small_data), "--out", str(out), *SMALL_RUN)
    assert "done:" in proc.stdout
    assert (out / "report" / "confusion_matrix.png").is_file() and (out / "model-store" / "classifier.mar").is_file()
    assert json.loads((out / "model" / "metadata.json").read_text())["classes"][1] == "math$\\undefinedmacro{$"


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 600 KiB tmpfs: a disk that fills up."""
    out = tmp_path / "tiny"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield out
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_a_full_disk_is_one_line(tiny_disk: Path, small_data: Path):
    proc = run_job("clean", "--data", str(small_data), "--out", str(tiny_disk), "--min-images-per-class", "3",
                   check=False)
    _one_line_error(proc, "no space left on the device writing", "re-run the same command")
    assert not list(tiny_disk.rglob("*.part"))


def test_a_full_disk_under_torch_save_is_the_same_line(tiny_disk: Path):
    """torch.save's writer turns the failed write into a RuntimeError of its own; the line still says why."""
    from jobs.errors import JobError
    from jobs.fileio import atomic_torch_save

    with pytest.raises(JobError, match=r"^no space left on the device writing .*/chunk\.pt; free some space"):
        atomic_torch_save(tiny_disk / "chunk.pt", {"features": torch.zeros(1_000_000)})
    assert not list(tiny_disk.iterdir())  # no part file left behind


def test_a_json_file_streamed_onto_a_full_disk_is_one_line_and_the_old_file_stays_whole(tiny_disk: Path):
    """atomic_write_json writes as it encodes (a file list of 100,000 photos is 80 MiB): the disk fills mid-way,
    the error is the one line, and the file it was replacing is still the old one."""
    from jobs.errors import JobError
    from jobs.fileio import atomic_write_json, read_json

    old = {"files": [{"source": f"ants/{i}.jpg"} for i in range(10)]}
    atomic_write_json(tiny_disk / "clean_report.json", old)
    big = {"files": [{"source": f"ants/{i:08d}.jpg", "sha256": f"{i:064x}"} for i in range(20_000)]}  # ~2.5 MB
    with pytest.raises(JobError, match=r"^no space left on the device writing .*/clean_report\.json; free some"):
        atomic_write_json(tiny_disk / "clean_report.json", big)
    assert read_json(tiny_disk / "clean_report.json") == old
    assert [p.name for p in tiny_disk.iterdir()] == ["clean_report.json"]  # no part file left behind


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # bench/gpu_check.sh runs the cuda one


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_resumes_with_the_optimizer_state_on_the_models_device(prepared_run, monkeypatch, device: str):
    """Optimizer.load_state_dict casts the state to each parameter's device at load time: the model
    must be on its device before the optimizer is restored, or AdamW's moments stay on the CPU."""
    from jobs import train as train_module
    from jobs.config import RunPaths, load_config
    from jobs.runtime import setup

    cfg = load_config(overrides={"arch": TINY_ARCH, "weights": "none", "epochs": 1, "feature_views": 1,
                                 "finetune_epochs": 2, "batch_size": 8, "num_workers": 0, "device": device})
    paths = RunPaths(prepared_run("run"))
    real_save, real_epoch = train_module.save_checkpoint, train_module.train_one_epoch

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        progress = next(a for a in args if isinstance(a, train_module.Progress))
        if (progress.stage, progress.epoch) == ("finetune", 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, paths, setup(cfg))
    monkeypatch.undo()

    placements = []

    def checked_epoch(model, batches, optimizer, *args, **kwargs):
        placements.extend((state["exp_avg"].device, p.device) for p, state in optimizer.state.items())
        return real_epoch(model, batches, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", checked_epoch)
    train_module.train(cfg, paths, setup(cfg))
    assert placements and all(state == param for state, param in placements), placements
    assert [(e["stage"], e["epoch"]) for e in json.loads(paths.metrics.read_text())["epochs"]] == [
        ("head", 1), ("finetune", 1), ("finetune", 2)]


def test_a_non_finite_loss_stops_training_and_nothing_nan_is_exported(prepared_run):
    from jobs import checkpoints
    from jobs.config import RunPaths, load_config
    from jobs.model import build_model, freeze_backbone
    from jobs.runtime import setup
    from jobs.train import FeatureBatches, Progress, Stage, TrainError, make_optimizer, train_one_epoch

    cfg = load_config(overrides={"weights": "none"})
    model = build_model("resnet18", 2, "none")
    freeze_backbone(model)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))  # what a diverged step leaves behind
    batches = FeatureBatches(torch.randn(8, 1, 512), torch.randint(0, 2, (8,)), batch_size=4, seed=0)
    stage = Stage("head", 3, train_all=False, on_features=True)
    with pytest.raises(TrainError, match=r"training loss became nan in head epoch 2 step 1 \(lr .*\); lower --lr"):
        train_one_epoch(model.fc, batches, make_optimizer(model, cfg, 1.0), stage, 1, Progress(), setup(cfg))

    out = prepared_run("run")
    run_job("train", "--out", str(out), "--arch", TINY_ARCH, "--weights", "none", "--epochs", "1",
            "--num-workers", "0")
    paths = RunPaths(out)
    state = checkpoints.read(paths.checkpoints / checkpoints.BEST, "")
    state["model"]["fc.bias"] = torch.full_like(state["model"]["fc.bias"], float("inf"))
    checkpoints.write(paths, checkpoints.BEST, {k: v for k, v in state.items() if k != "format"})
    _one_line_error(run_job("export", "--out", str(out), check=False), "non-finite weights (fc.bias", "lower --lr")
    assert not (out / "model" / "model.pt").exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_archive_leaves_no_archiver_and_its_work_folder_is_swept(finished_run: Path):
    store = finished_run / "model-store"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "archive", "--out", str(finished_run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (_children(proc.pid) and list(store.glob(".archive-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the archiver never started"
        time.sleep(0.05)
    archiver = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the job alone, not its process group
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in archiver):
        assert time.monotonic() < deadline, f"torch-model-archiver {archiver} outlived the killed job"
        time.sleep(0.1)
    assert list(store.glob(".archive-*"))  # what the kill left behind ...
    run_job("archive", "--out", str(finished_run))
    assert not list(store.glob(".archive-*")) and (store / "classifier.mar").is_file()  # ... is swept next time
