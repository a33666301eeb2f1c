"""The command line: one command per stage, and ``run`` for all of them in order.

Thin on purpose: each command loads the config, calls one stage function, and turns a
``JobError`` into one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from handler.cpus import CpusSettingError
from jobs import runlock
from jobs.config import (
    ARCHIVE,
    RUN_DEFINING,
    Config,
    RunPaths,
    key_type,
    keys_for,
    load_config,
    record_keys,
    saved_yaml,
)
from jobs.errors import JobError
from jobs.fileio import atomic_write_text, sweep_partials


def config_options(command: str) -> Callable:
    """Add ``--config``, ``--out`` and one option per config key the command takes (default None = not given)."""
    defaults, keys = Config(), keys_for(command)

    def decorate(fn: Callable) -> Callable:
        for f in reversed([f for f in fields(Config) if f.name in keys]):
            dashed, default = f.name.replace("_", "-"), getattr(defaults, f.name)
            shown = ",".join(default) if isinstance(default, list) else default
            help_text = f"{f.metadata['help']} [config key {f.name}; default {shown}]"
            if key_type(f.name) is bool:
                fn = click.option(f"--{dashed}/--no-{dashed}", f.name, default=None, help=help_text)(fn)
            else:
                fn = click.option(f"--{dashed}", f.name, default=None, metavar=_metavar(f.name),
                                  help=help_text)(fn)
        fn = click.option("--wait", is_flag=True,
                          help="If another job is writing OUT, wait for it to end (default: exit 2 at once).")(fn)
        fn = click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
                          help="Run folder: every stage reads and writes here.")(fn)
        return click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
                            help="YAML file of config keys; command-line options override it.")(fn)

    return decorate


def _metavar(name: str) -> str:
    kind = key_type(name)
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(kind, "A,B,...")


def _setup(command: str, config_file: Path | None, out: Path, overrides: dict[str, Any]) -> tuple[Config, RunPaths]:
    """The run's config with this command's options on top.

    A run folder remembers its config, so re-running one stage uses the settings of the run. Only
    the commands that define a run save it; archive and export-kserve record their own keys (later
    commands look for the archive they made); every other command leaves config.yaml as it is, so
    an option given to one command applies to that command alone.

    Every command that gets here writes the run folder, so first it takes the folder's lock
    (jobs/runlock.py; ``--wait`` from ``overrides``), held until the command ends; the config is
    read after that, as the job before may have changed it. Under torchrun only rank 0 locks and
    writes config.yaml.
    """
    wait = overrides.pop("wait", False)
    writer = click.get_current_context().with_resource(runlock.job_lock(out, wait))
    cfg = load_config(config_file, overrides, saved=RunPaths(Path(out)).config)
    paths = RunPaths.for_config(out, cfg)
    if writer and command in RUN_DEFINING + ARCHIVE:
        sweep_partials(paths.config)
    if writer and command in RUN_DEFINING:
        atomic_write_text(paths.config, saved_yaml(cfg.to_dict()))
    elif writer and command in ARCHIVE:
        atomic_write_text(paths.config, saved_yaml(record_keys(paths, cfg, keys_for(command))))
    return cfg, paths


def _collect(cfg: Config, paths: RunPaths, retry_all: bool) -> None:
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


def _print_config(cfg: Config, paths: RunPaths) -> None:
    click.echo(f"config (saved to {paths.config}):")
    for line in cfg.to_yaml().splitlines():
        click.echo(f"  {line}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def cli() -> None:
    """Search terms or an image folder in, a served image classifier out.

    \b
    python -m jobs run --data path/to/images --out runs/pets     # a folder of <class>/ sub-folders
    python -m jobs run --terms puppies,kittens --out runs/pets   # collect from an image search first
    Each stage is also its own command, reading and writing the same --out folder.
    """


DECISIONS_OPTION = click.option(
    "--decisions", "decisions_file", type=click.Path(path_type=Path), default=None,
    help="A decisions.json exported from the review page (exclude / relabel / keep); copied into OUT.")


def _copy_decisions(decisions_file: Path | None, paths: RunPaths) -> None:
    if decisions_file is not None:
        from jobs.decisions import copy_into_run

        copy_into_run(decisions_file, paths)


def _audit(cfg: Config, paths: RunPaths, rt: Any) -> None:
    """The audit runs in one process, also under torchrun (the other ranks wait at a barrier)."""
    import dataclasses

    from jobs.audit import audit

    audit(cfg, paths, dataclasses.replace(rt, rank=0, world_size=1))


RETRY_ALL = click.option("--retry-all", is_flag=True,
                         help="Collect: also fetch again the URLs that failed permanently (404, not an image) before.")


@cli.command()
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with one sub-folder per class. Without it, images are collected for --terms.")
@click.option("--resume", "resume", flag_value="require", default=None, help="Require resuming checkpoints/last.pt.")
@click.option("--fresh", "resume", flag_value="fresh", help="Start training over (old checkpoints are kept aside).")
@DECISIONS_OPTION
@RETRY_ALL
@config_options("run")
def run(config_file: Path | None, out: Path, data: Path | None, resume: str | None, decisions_file: Path | None,
        retry_all: bool, **overrides: Any) -> None:
    """The whole job: [collect] -> clean -> audit -> split -> train -> evaluate -> export -> archive."""
    from jobs import archive, clean, evaluate, export, split, train
    from jobs.runtime import barrier, setup, teardown

    cfg, paths = _setup("run", config_file, out, overrides)
    rt = setup(cfg)
    try:
        if rt.is_main:
            _print_config(cfg, paths)
            _copy_decisions(decisions_file, paths)
            if data is None:
                _collect(cfg, paths, retry_all)
            clean.clean(cfg, paths, data or paths.raw)
            _audit(cfg, paths, rt)
            split.split(cfg, paths)
        barrier(rt)
        train.train(cfg, paths, rt, resume or "auto")
        if rt.is_main:
            evaluate.evaluate(cfg, paths, rt)
            export.export(cfg, paths)
            mar = archive.archive(cfg, paths)
            click.echo(f"done: {mar}\nserve it: python -m jobs serve --model-store {mar.parent}")
    finally:
        teardown()


@cli.command()
@RETRY_ALL
@config_options("collect")
def collect(config_file: Path | None, out: Path, retry_all: bool, **overrides: Any) -> None:
    """Download images for each search term into OUT/raw/<term>/ with a manifest and attribution."""
    cfg, paths = _setup("collect", config_file, out, overrides)
    _collect(cfg, paths, retry_all)


@cli.command()
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with one sub-folder per class (default: OUT/raw from collect).")
@DECISIONS_OPTION
@config_options("clean")
def clean(config_file: Path | None, out: Path, data: Path | None, decisions_file: Path | None,
          **overrides: Any) -> None:
    """Decode every image; keep, convert to RGB, or quarantine it; apply decisions; write clean_report.json."""
    from jobs.clean import clean as clean_stage

    cfg, paths = _setup("clean", config_file, out, overrides)
    _copy_decisions(decisions_file, paths)
    clean_stage(cfg, paths, data or paths.raw)


@cli.command()
@config_options("audit")
def audit(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Near-duplicates, label conflicts, label issues, outliers, quality flags: audit.json + report/review.html."""
    from jobs.runtime import setup

    cfg, paths = _setup("audit", config_file, out, overrides)
    _audit(cfg, paths, setup(cfg))


@cli.command()
@config_options("split")
def split(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Assign the cleaned images to train/val/test (stratified, seeded, stable): splits.json."""
    from jobs.split import split as split_stage

    cfg, paths = _setup("split", config_file, out, overrides)
    split_stage(cfg, paths)


@cli.command()
@click.option("--resume", "resume", flag_value="require", default=None, help="Require resuming checkpoints/last.pt.")
@click.option("--fresh", "resume", flag_value="fresh", help="Start over (old checkpoints are kept aside).")
@config_options("train")
def train(config_file: Path | None, out: Path, resume: str | None, **overrides: Any) -> None:
    """Train (or resume) from splits.json: checkpoints/{last,best}.pt and metrics.json. Works under torchrun."""
    from jobs.runtime import setup, teardown
    from jobs.train import train as train_stage

    cfg, paths = _setup("train", config_file, out, overrides)
    rt = setup(cfg)
    try:
        train_stage(cfg, paths, rt, resume or "auto")
    finally:
        teardown()


@cli.command()
@config_options("evaluate")
def evaluate(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Score the best checkpoint on the test split and write the report/ folder."""
    from jobs.evaluate import evaluate as evaluate_stage
    from jobs.runtime import setup

    cfg, paths = _setup("evaluate", config_file, out, overrides)
    evaluate_stage(cfg, paths, setup(cfg))


@cli.command()
@config_options("export")
def export(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Write model/model.pt (a bare state_dict), index_to_name.json and metadata.json."""
    from jobs.export import export as export_stage

    cfg, paths = _setup("export", config_file, out, overrides)
    export_stage(cfg, paths)


@cli.command()
@config_options("archive")
def archive(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Pack model/ with torch-model-archiver and our handler into MODEL_STORE/<model_name>.mar."""
    from jobs.archive import archive as archive_stage

    cfg, paths = _setup("archive", config_file, out, overrides)
    click.echo(archive_stage(cfg, paths))


@cli.command()
@click.option("--model-store", type=click.Path(path_type=Path), default=Path("runs/latest/model-store"),
              show_default=True, help="Folder of .mar files to serve (all of them).")
@click.option("--stop", is_flag=True, help="Stop the TorchServe started for this model store.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the inference API binds to.")
@click.option("--port", type=int, default=8080, show_default=True, help="Inference API port.")
@click.option("--management-port", type=int, default=8081, show_default=True, help="Management API port (loopback).")
@click.option("--metrics-port", type=int, default=8082, show_default=True, help="Prometheus metrics port.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="TorchServe state, logs and key_file.json (default: next to the model store, serve-state/).")
@click.option("--disable-token-auth", is_flag=True, help="No token needed (local demos only).")
@click.option("--runtime", type=click.Choice(["torchserve", "kserve"]), default="torchserve", show_default=True,
              help="The model server (docs/serving-runtimes.md); kserve needs the kserve extra.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML config file.")
def serve(model_store: Path, stop: bool, host: str, port: int, management_port: int, metrics_port: int,
          workdir: Path | None, disable_token_auth: bool, runtime: str, config_file: Path | None) -> None:
    """Run TorchServe (or --runtime kserve) in the foreground on MODEL_STORE (Ctrl-C stops it)."""
    from jobs.serve import serve as serve_models

    code = serve_models(load_config(config_file), model_store, stop=stop, workdir=workdir, host=host, port=port,
                        management_port=management_port, metrics_port=metrics_port,
                        disable_token_auth=disable_token_auth, runtime=runtime)
    sys.exit(code)


@cli.command("serve-config")
@click.option("--model-store", type=click.Path(path_type=Path), required=True, help="Folder of the .mar files.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The TorchServe config.properties to start from (default handler/config.properties).")
@click.option("--dest", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
def serve_config(model_store: Path, base: Path | None, dest: Path) -> None:
    """Write a TorchServe config for THIS machine: BASE plus workers and batching (for the archives that leave
    them open) and the handler's metrics. The serve container runs it at every start."""
    from jobs.serve import write_machine_config

    write_machine_config(base, model_store, dest)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
              help="The run folder whose report/review.html to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option("--port", type=int, default=8765, show_default=True, help="Port (0 = any free one).")
def review(out: Path, host: str, port: int) -> None:
    """Serve OUT/report/review.html on loopback; its "Save to run" writes OUT/decisions.json."""
    from jobs.review import serve_review

    serve_review(out, host, port)


@cli.command("export-kserve")
@click.option("--dest", type=click.Path(path_type=Path), default=None, help="Target folder (default OUT/kserve).")
@click.option("--pod-cpus", type=click.IntRange(1), default=2, show_default=True,
              help="CPUs each KServe pod requests (deploy/kserve/inferenceservice.yaml): sets workers and batching.")
@click.option("--pod-gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs each KServe pod gets.")
@config_options("export-kserve")
def export_kserve(config_file: Path | None, out: Path, dest: Path | None, pod_cpus: int, pod_gpus: int,
                  **overrides: Any) -> None:
    """Lay out OUT/kserve/{config/{config.properties,metrics.yaml}, model-store/<name>.mar} for KServe."""
    from jobs.kserve import export_kserve as export_kserve_stage

    cfg, paths = _setup("export-kserve", config_file, out, overrides)
    click.echo(export_kserve_stage(cfg, paths, dest, pod_cpus, pod_gpus))


@cli.command()
@click.option("--model-dir", type=click.Path(path_type=Path), required=True, help="An exported model/ folder.")
@click.option("--topk", type=click.IntRange(1), default=None, help="Predictions per image (default: metadata.json).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the results to a .csv (file, label, probability, top-k, trust fields) or .jsonl file "
                   "instead of JSON lines on stdout.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.argument("inputs", nargs=-1, required=True)
def predict(model_dir: Path, topk: int | None, output: Path | None, batch_size: int, device: str,
            inputs: tuple[str, ...]) -> None:
    """Classify image files, folders (recursively) and glob patterns offline, as the server would answer.

    Exits 1 when any input could not be classified (each is named in the output, with the reason).
    """
    from handler.cpus import usable_cpus
    from jobs import predict as predicting
    from jobs.runtime import pick_device

    predicting.check_output(output)
    results = predicting.predict(model_dir, inputs, topk, batch_size, max(0, min(4, usable_cpus() - 1)),
                                 pick_device(device, 0), progress=sys.stderr.isatty())
    summary = predicting.write_results(results, output)
    where = f"; results in {output}" if output else ""
    first = summary.first_error
    failed = f", {summary.failed} failed (first: {first['file']}: {first['error']})" if first else ""
    rate = summary.classified / summary.seconds if summary.seconds else 0.0
    click.echo(f"predict: {summary.classified} images classified in {summary.seconds:.1f} s ({rate:.1f} img/s)"
               f"{failed}{where}", err=True)
    if summary.failed:
        sys.exit(1)


def main() -> None:
    # Progress lines reach a pipe, a log file or `kubectl logs` as they happen, not at exit.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (JobError, CpusSettingError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
