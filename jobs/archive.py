"""Archive: ``model/`` + the serving package ``handler/`` -> ``<model-store>/<model_name>.mar``.

torch-model-archiver stages its files in ``$TMPDIR/<model_name>`` and deletes that folder
first, so with the default name it would wipe an unrelated ``/tmp/classifier``. It therefore
runs with TMPDIR and its export path inside a private temp folder next to the model store, and
the finished archive is renamed into place: a reader of the store never sees half a .mar.

A store outside the run folder may be shared by several runs, which the run folder's lock does not
cover: there the archive also holds the store's own lock (``<store>/.job.lock``) while it works,
waiting for another run's archive to end, so none sweeps another's work folder or .mar.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from handler import files
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_text, ensure_writable_dir, link_or_copy, read_json
from jobs.runlock import hold
from jobs.versions import FIRST_VERSION, compared, previous_version, refusal

MODEL_FILES = (files.WEIGHTS, files.INDEX_TO_NAME, files.METADATA)
# TorchServe's rule for model names (they become URL path segments and file names).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
HANDLER_FILE = "classifier_handler.py"
VERSIONS_DIR = ".versions"  # in the model store: every version archived, <model_name>-<version>.mar


def handler_dir() -> Path:
    """The installed ``handler`` package's folder (``__path__`` works for a package and a namespace alike)."""
    import handler

    return Path(next(iter(handler.__path__))).resolve()


def serving_package() -> list[Path]:
    """The files of the serving package that a model carries to its server: ``handler/*.py``, whole."""
    return sorted(handler_dir().glob("*.py"))


def tuning_settings(cfg: Config) -> dict:
    """Workers and batching from the config keys (TorchServe's names)."""
    return {"minWorkers": cfg.min_workers, "maxWorkers": cfg.max_workers, "batchSize": cfg.serve_batch_size,
            "maxBatchDelay": cfg.max_batch_delay_ms}


def model_config(cfg: Config) -> dict:
    """The per-model TorchServe settings packed into the .mar (``--config-file``).

    Workers and batching are packed only with ``serve_tuning: archive``. TorchServe lets a packed
    value beat config.properties' ``models`` setting, so by default the .mar carries none, and the
    server that loads it chooses them for its own machine (``jobs serve``: ``handler.scheduler.serving_plan``).
    """
    return {
        **(tuning_settings(cfg) if cfg.serve_tuning == "archive" else {}),
        "responseTimeout": cfg.response_timeout,
        "startupTimeout": cfg.startup_timeout,
        # Read by handler/classifier_handler.py from context.model_yaml_config["handler"].
        "handler": {
            "topk": cfg.topk,
            "max_image_pixels": cfg.max_image_pixels,
            "max_batch_pixels": cfg.max_batch_pixels,
            "precision": cfg.precision,
            "backend": cfg.serve_backend,
        },
    }


def archive(cfg: Config, paths: RunPaths, handler: Path | None = None, handler_options: dict | None = None,
            force: bool = False) -> Path:
    """Write ``<model-store>/.versions/<model_name>-<version>.mar`` and make it the default,
    ``<model-store>/<model_name>.mar``, unless the model is significantly worse than the version before it
    (``jobs.versions.refusal``; ``force``: make it the default anyway).

    ``handler`` swaps in another handler file and ``handler_options`` adds to model-config's handler
    section (the benchmark and tests use them; the job uses neither).
    """
    missing = [n for n in MODEL_FILES if not (paths.model / n).exists()]
    if missing:
        raise JobError(f"{paths.model} lacks {', '.join(missing)}; run `python -m jobs export --out {paths.out}` first")
    if not MODEL_NAME.match(cfg.model_name):
        raise JobError(f"config key 'model_name' must match {MODEL_NAME.pattern} for TorchServe "
                       f"(got {cfg.model_name!r})")
    meta = read_json(paths.model / files.METADATA)
    # when the export offered int8 (PyTorch's, OpenVINO's); wrote ONNX
    optional = [paths.model / name for name in (files.INT8_WEIGHTS, files.ONNX, *files.INT8_GRAPH_FILES)]
    if meta.get("trust"):
        optional.append(paths.model / meta["trust"]["file"])  # the OOD score's state
    optional = [p for p in optional if p.is_file()]
    version = meta.get("model_version", FIRST_VERSION)  # the export numbered it (jobs.versions)
    store = ensure_writable_dir(paths.model_store)
    target = store / f"{cfg.model_name}.mar"
    kept = versioned_mar(store, cfg.model_name, version)
    shared = not store.resolve().is_relative_to(paths.out.resolve())
    with hold(store, wait=True) if shared else contextlib.nullcontext():
        _sweep_leftover_work(store)
        _build(cfg, paths, store, version, kept, optional, handler, handler_options)
        _make_default(paths, meta, kept, target, force)
    size_mb = target.stat().st_size / 1e6
    tuning = (f"batchSize {cfg.serve_batch_size}, maxBatchDelay {cfg.max_batch_delay_ms} ms"
              if cfg.serve_tuning == "archive" else "workers and batching chosen where it is served")
    print(f"archive: {target} ({size_mb:.1f} MB; {meta['arch']}, {meta['num_classes']} classes, {tuning})")
    return target


def versioned_mar(store: Path, model_name: str, version: str) -> Path:
    """Where every archived version stays: a hidden folder, which TorchServe's ``load_models=all`` skips, so a
    server starts with the default alone (``jobs serve --switch-to`` registers the others)."""
    return store / VERSIONS_DIR / f"{model_name}-{version}.mar"


def _make_default(paths: RunPaths, meta: dict, kept: Path, target: Path, force: bool) -> None:
    """``target`` becomes (a hard link of) ``kept``, atomically; refused when the model is significantly worse
    than the version before it, unless ``force``."""
    report = paths.report / "metrics.json"
    comparison = read_json(report).get("versus_previous") if report.is_file() else None
    why = refusal(comparison, meta)
    if why and not force:
        raise JobError(f"archive: {why}: not made the default (kept as {kept}); pass --force to make it the default "
                       f"anyway: `python -m jobs archive --out {paths.out} --force`")
    if why:
        print(f"archive: {why}; made the default anyway (--force)")
    previous = previous_version(paths, meta.get("model_version", FIRST_VERSION))
    if previous and not compared(comparison, meta):
        print(f"archive: WARNING version {meta.get('model_version')} was not compared with {previous}; made the "
              f"default (`python -m jobs evaluate --out {paths.out}` compares them)")
    link_or_copy(kept, target)


def _build(cfg: Config, paths: RunPaths, store: Path, version: str, target: Path, optional: list[Path],
           handler: Path | None, handler_options: dict | None) -> None:
    """Run torch-model-archiver in a private work folder in ``store`` and rename its .mar to ``target``."""
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=store) as tmp:
        work = Path(tmp).resolve()  # the archiver runs in another folder: every path it gets is absolute
        (work / "stage").mkdir()
        settings = model_config(cfg)
        settings["handler"].update(handler_options or {})
        config_file = atomic_write_text(work / "model-config.yaml", yaml.safe_dump(settings, sort_keys=False))
        # --extra-files is split on commas: pass one plain name, a folder of links the archiver copies
        # entry by entry into the archive's root, so a comma in the user's paths cannot split a file.
        extras = work / "extra"
        (extras / "handler").mkdir(parents=True)
        for src in (paths.model / files.INDEX_TO_NAME, paths.model / files.METADATA, *optional):
            link_or_copy(src, extras / src.name)
        for src in serving_package():
            link_or_copy(src, extras / "handler" / src.name)
        cmd = [sys.executable, "-m", "model_archiver.model_packaging",
               "--model-name", cfg.model_name, "--version", version,
               "--handler", str(Path(handler or handler_dir() / HANDLER_FILE).resolve()),
               "--serialized-file", str((paths.model / files.WEIGHTS).resolve()),
               "--extra-files", extras.name,
               "--config-file", str(config_file), "--export-path", str(work), "--force"]
        run = subprocess.run(cmd, cwd=work, env={**os.environ, "TMPDIR": str(work / "stage")}, capture_output=True,
                             text=True, check=False, preexec_fn=_die_with_parent)
        built = work / f"{cfg.model_name}.mar"
        if run.returncode != 0 or not built.exists():
            last = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
            raise JobError(f"torch-model-archiver failed for {paths.model}: {last}")
        target.parent.mkdir(exist_ok=True)
        os.replace(built, target)


def _die_with_parent() -> None:
    """In the archiver's child process: the kernel kills it when the job dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _sweep_leftover_work(store: Path) -> None:
    """A killed archive left its private ``.archive-*`` folder (40 MB and more) in the store.

    No live archive's folder is among them: the job holds the run folder's lock (jobs/runlock.py),
    and the store's own when the store is outside the run folder, so no other job archives there now.
    """
    for leftover in store.glob(".archive-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def packed_settings(mar: Path) -> tuple[dict, dict]:
    """(MANIFEST.json's "model", the packed model-config.yaml) of an archive; JobError if unreadable."""
    try:
        with zipfile.ZipFile(mar) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
            packed = yaml.safe_load(z.read(manifest["configFile"])) if manifest.get("configFile") else {}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, yaml.YAMLError) as e:
        raise JobError(f"{mar} is not a readable model archive ({type(e).__name__}); "
                       "re-run `python -m jobs archive`") from None
    return manifest, packed or {}
