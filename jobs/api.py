"""The job as Python functions, for notebooks and scripts: one per stage, and ``run`` for all of them in
order. The command line calls exactly these (``jobs run`` is ``run``), so both behave the same.

    from jobs import api
    mar = api.run(data="photos", out="runs/pets", epochs=5)   # photos/<class>/*.jpg -> runs/pets/...
    api.evaluate("runs/pets", batch_size=64)

Keyword arguments beyond the named ones are config keys (docs/configuration.md), as on the command
line; ``config`` names a YAML file of them. Each function checks first what it will need from the network
(``jobs.preflight``), holds the run folder's lock while it runs (``jobs.runlock``; ``wait=True``
waits for another job to let go of it), loads the run's settings (defaults < ``OUT/config.yaml`` <
``config`` < keywords), and returns what its stage wrote. A problem the user can fix raises
``jobs.errors.JobError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs import preflight, runlock
from jobs.config import ARCHIVE, RUN_DEFINING, Config, RunPaths, keys_for, load_config, record_keys, saved_yaml
from jobs.errors import JobError
from jobs.fileio import atomic_write_text, sweep_partials

PathLike = str | os.PathLike
DEFAULT_OUT = Path("runs/latest")
# The stages of ``run`` in order: the CLI lists its commands and groups run's options this way.
# export before evaluate: the report measures the answers as served (calibrated, with the trust fields).
PIPELINE = ("collect", "clean", "audit", "split", "train", "export", "evaluate", "archive")


@contextlib.contextmanager
def _session(command: str, config_file: PathLike | None, out: PathLike, overrides: dict[str, Any],
             wait: bool = False, data: PathLike | None = None) -> Iterator[tuple[Config, RunPaths]]:
    """The run's config with this command's options on top, for as long as the command runs.

    A command that cannot work offline stops first (``jobs.preflight``), before it prints or writes
    anything. Then it takes the run folder's lock (``jobs.runlock``; ``wait``: wait for another job
    to let go of it), held until the ``with`` body ends, and reads the config after that, as the job
    before may have changed it. A run folder remembers its config, so re-running one stage uses the
    settings of the run. Only the commands that define a run save it; archive and export-kserve
    record their own keys (later commands look for the archive they made); every other command
    leaves config.yaml as it is, so an option given to one command applies to that command alone.
    Under torchrun only rank 0 locks and writes config.yaml.
    """
    out = Path(out)
    preflight.check(command, load_config(config_file, overrides, saved=RunPaths(out).config), RunPaths(out), data)
    with runlock.job_lock(out, wait) as writer:
        cfg = load_config(config_file, overrides, saved=RunPaths(out).config)
        paths = RunPaths.for_config(out, cfg)
        if writer and command in RUN_DEFINING + ARCHIVE:
            sweep_partials(paths.config)
        if writer and command in RUN_DEFINING:
            atomic_write_text(paths.config, saved_yaml(cfg.to_dict()))
        elif writer and command in ARCHIVE:
            atomic_write_text(paths.config, saved_yaml(record_keys(paths, cfg, keys_for(command))))
        yield cfg, paths


def _collect(cfg: Config, paths: RunPaths, retry_all: bool) -> dict[str, Any]:
    from jobs.collect import collect as collect_stage

    summary = collect_stage(cfg, paths, retry_all=retry_all)
    short = {t: n for t, n in summary["kept"].items() if n < cfg.min_images_per_class}
    if summary["deadline_passed"] and short:
        raise JobError(f"collect_deadline_minutes={cfg.collect_deadline_minutes:g} passed with "
                       f"{', '.join(f'{t} ({n})' for t, n in short.items())} short of min_images_per_class="
                       f"{cfg.min_images_per_class}; run the same command again to continue collecting")
    if not any(summary["kept"].values()):
        raise JobError(f"no images collected for any of {list(summary['terms'])} from {summary['source']}; see the "
                       "summary above (network, --endpoint, --licenses, the search terms)")
    return summary


def _copy_decisions(decisions: PathLike | None, paths: RunPaths) -> None:
    if decisions is not None:
        from jobs.decisions import copy_into_run

        copy_into_run(Path(decisions), paths)


def _audit(cfg: Config, paths: RunPaths, rt: Any) -> Path:
    """Under torchrun every rank takes a share of the audit's backbone pass; rank 0 writes audit.json."""
    from jobs.audit import audit as audit_stage

    return audit_stage(cfg, paths, rt)


def _check_resume(resume: str) -> str:
    if resume not in ("auto", "require", "fresh"):
        raise JobError(f"resume must be auto, require or fresh (got {resume!r})")
    return resume


def summary(cfg: Config, paths: RunPaths, data: PathLike | None) -> str:
    """What ``run`` is about to do, in two lines (every setting is in ``OUT/config.yaml``)."""
    source = (f"images from {data}" if data is not None else
              f"up to {cfg.images_per_term} images each of {', '.join(cfg.terms)} from {cfg.source}")
    weights = {"imagenet": "ImageNet weights", "none": "random weights"}.get(cfg.weights, f"weights from {cfg.weights}")
    finetune = f" + {cfg.finetune_epochs} fine-tune epochs" if cfg.finetune_epochs else ""
    stages = PIPELINE[1:] if data is not None else PIPELINE
    return (f"run: {' -> '.join(stages)}: {source} into {paths.out} (all settings: {paths.config})\n"
            f"run: {cfg.arch} with {weights}, {cfg.epochs} head epochs{finetune}, batch {cfg.batch_size}, "
            f"device {cfg.device}; serves as /predictions/{cfg.model_name}")


def run(data: PathLike | None = None, out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None,
        resume: str = "auto", decisions: PathLike | None = None, retry_all: bool = False, wait: bool = False,
        **keys: Any) -> Path:
    """The whole job: [collect] -> clean -> audit -> split -> train -> export -> evaluate -> archive.

    ``data``: a folder with one sub-folder of images per class; without it, images are collected for
    the ``terms`` key. ``resume``: auto (resume a matching checkpoint), require, or fresh. ``wait``:
    wait for another job that holds the run folder. Returns the model archive
    (``<model_store>/<model_name>.mar``). Works under torchrun: rank 0 collects, cleans, splits and finishes
    the job while the other ranks wait; every rank takes a share of the audit's backbone pass, and trains.
    """
    resume = _check_resume(resume)
    with _session("run", config, out, keys, wait, data) as (cfg, paths):
        # Stage modules are imported once the session holds: a bad option or a busy folder is answered
        # before torch is (its import takes seconds). The single-stage commands below do the same.
        from jobs.archive import archive as archive_stage
        from jobs.clean import clean as clean_stage
        from jobs.evaluate import evaluate as evaluate_stage
        from jobs.export import export as export_stage
        from jobs.progress import Stages
        from jobs.runtime import barrier, setup, teardown
        from jobs.split import split as split_stage
        from jobs.train import stage_titles
        from jobs.train import train as train_stage

        rt = setup(cfg)
        # The stage counter: [3/9] split ... train begins its own stages (head, finetune) in it.
        stages = Stages([*(["collect"] if data is None else []), "clean", "audit", "split", *stage_titles(cfg),
                         "export", "evaluate", "archive"])
        try:
            with stages:
                if rt.is_main:
                    print(summary(cfg, paths, data), flush=True)
                    _copy_decisions(decisions, paths)
                    if data is None:
                        stages.begin("collect")
                        _collect(cfg, paths, retry_all)
                    stages.begin("clean")
                    clean_stage(cfg, paths, Path(data) if data is not None else paths.raw)
                    stages.begin("audit")
                barrier(rt)
                _audit(cfg, paths, rt)
                if rt.is_main:
                    stages.begin("split")
                    split_stage(cfg, paths)
                barrier(rt)
                train_stage(cfg, paths, rt, resume)
                if rt.is_main:
                    stages.begin("export")
                    export_stage(cfg, paths)
                    stages.begin("evaluate")
                    evaluate_stage(cfg, paths, rt)
                    stages.begin("archive")
                    mar = archive_stage(cfg, paths)
            return mar if rt.is_main else paths.model_store / f"{cfg.model_name}.mar"
        finally:
            teardown()


def collect(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, retry_all: bool = False,
            wait: bool = False, **keys: Any) -> dict[str, Any]:
    """Download images for each search term into OUT/raw/<term>/; returns the summary (counts per term)."""
    with _session("collect", config, out, keys, wait) as (cfg, paths):
        return _collect(cfg, paths, retry_all)


def clean(out: PathLike = DEFAULT_OUT, data: PathLike | None = None, *, config: PathLike | None = None,
          decisions: PathLike | None = None, wait: bool = False, **keys: Any) -> Path:
    """Decode, convert or quarantine every image of ``data`` (default OUT/raw); returns clean_report.json."""
    from jobs.clean import clean as clean_stage

    with _session("clean", config, out, keys, wait) as (cfg, paths):
        _copy_decisions(decisions, paths)
        return clean_stage(cfg, paths, Path(data) if data is not None else paths.raw)


def audit(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, wait: bool = False, **keys: Any) -> Path:
    """Near-duplicates, label conflicts, label issues, outliers, quality flags; returns audit.json."""
    with _session("audit", config, out, keys, wait) as (cfg, paths):
        from jobs.runtime import setup

        return _audit(cfg, paths, setup(cfg))


def review(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, wait: bool = False,
           **keys: Any) -> Path:
    """Write the review page (report/review.html) again; with ``captured`` (a capture folder) it begins with the
    captured images, grouped by likeness in the run's backbone features, least like the training images first.
    Returns the page. The capture folder is only read."""
    with _session("review", config, out, keys, wait) as (cfg, paths):
        from jobs.fileio import read_run_file
        from jobs.review import write_run_review

        audit_doc = read_run_file(paths.audit, f"run `python -m jobs audit --out {paths.out}` first", ("classes",))
        if cfg.captured:
            from jobs.captured import review_document, write_review_document
            from jobs.runtime import setup

            doc = review_document(cfg, paths, setup(cfg), Path(cfg.captured))
            write_review_document(paths, doc)
            unreadable = f", {len(doc['unreadable'])} that cannot be decoded" if doc["unreadable"] else ""
            print(f"review: {doc['captures']} captured images in {cfg.captured}: {len(doc['groups'])} groups"
                  f"{unreadable}")
        return write_run_review(paths, audit_doc)


def split(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, wait: bool = False, **keys: Any) -> Path:
    """Assign the cleaned images to train/val/test; returns splits.json."""
    from jobs.split import split as split_stage

    with _session("split", config, out, keys, wait) as (cfg, paths):
        return split_stage(cfg, paths)


def train(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, resume: str = "auto",
          wait: bool = False, **keys: Any) -> Path:
    """Train (or resume) from splits.json; returns metrics.json. Works under torchrun."""
    resume = _check_resume(resume)
    with _session("train", config, out, keys, wait) as (cfg, paths):
        from jobs.runtime import setup, teardown
        from jobs.train import train as train_stage

        rt = setup(cfg)
        try:
            return train_stage(cfg, paths, rt, resume)
        finally:
            teardown()


def evaluate(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, wait: bool = False,
             **keys: Any) -> Path:
    """Score the best checkpoint on the test split; returns report/index.html."""
    with _session("evaluate", config, out, keys, wait) as (cfg, paths):
        from jobs.evaluate import evaluate as evaluate_stage
        from jobs.runtime import setup

        return evaluate_stage(cfg, paths, setup(cfg))


def export(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, wait: bool = False, **keys: Any) -> Path:
    """Write model/{model.pt,index_to_name.json,metadata.json}; returns the model folder."""
    with _session("export", config, out, keys, wait) as (cfg, paths):
        from jobs.export import export as export_stage

        return export_stage(cfg, paths)


def archive(out: PathLike = DEFAULT_OUT, *, config: PathLike | None = None, force: bool = False, wait: bool = False,
            **keys: Any) -> Path:
    """Pack model/ with the handler into <model_store>/<model_name>.mar (every version stays in
    <model_store>/.versions/); returns it. ``force``: make it the default even when it is significantly worse
    than the version before it."""
    with _session("archive", config, out, keys, wait) as (cfg, paths):
        from jobs.archive import archive as archive_stage

        return archive_stage(cfg, paths, force=force)


def export_kserve(out: PathLike = DEFAULT_OUT, *, dest: PathLike | None = None, pod_cpus: int = 2, pod_gpus: int = 0,
                  config: PathLike | None = None, wait: bool = False, **keys: Any) -> Path:
    """Lay out the KServe storage folder (default OUT/kserve) for pods of ``pod_cpus`` CPUs; returns it."""
    from jobs.kserve import export_kserve as export_kserve_stage

    with _session("export-kserve", config, out, keys, wait) as (cfg, paths):
        return export_kserve_stage(cfg, paths, Path(dest) if dest is not None else None, pod_cpus, pod_gpus)


def export_triton(out: PathLike = DEFAULT_OUT, *, dest: PathLike | None = None, config: PathLike | None = None,
                  wait: bool = False, **keys: Any) -> Path:
    """Write the Triton model repository (default OUT/triton): the ONNX model between Python pre- and
    post-processing steps, as one ensemble; returns it."""
    from jobs.triton import export_triton as export_triton_stage

    with _session("export-triton", config, out, keys, wait) as (cfg, paths):
        return export_triton_stage(cfg, paths, Path(dest) if dest is not None else None)
