"""The command line: one command per stage, and ``run`` for all of them in order.

Thin on purpose: each command loads the config, calls one stage function, and turns a
``JobError`` into one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from jobs.config import Config, RunPaths, load_config
from jobs.errors import JobError
from jobs.fileio import atomic_write_text, ensure_writable_dir

COLLECT_KEYS = ("terms", "images_per_term", "source", "endpoint", "licenses", "urls_file", "user_agent", "api_key_env",
                "download_workers", "requests_per_minute", "max_download_mb", "allow_private_addresses")
CLEAN_KEYS = ("min_image_size", "min_images_per_class", "max_image_pixels")
SPLIT_KEYS = ("val_fraction", "test_fraction", "seed")
TRAIN_KEYS = ("arch", "weights", "freeze_backbone", "epochs", "batch_size", "lr", "weight_decay", "feature_views",
              "cache_features", "finetune_epochs", "backbone_lr_div", "warmup_epochs", "patience", "grad_clip",
              "freeze_bn", "sync_bn", "device", "precision", "channels_last", "compile", "num_workers",
              "deterministic", "seed")
ARCHIVE_KEYS = ("model_name", "model_version", "model_store", "topk", "serve_batch_size", "max_batch_delay_ms",
                "min_workers", "max_workers", "response_timeout", "startup_timeout", "max_batch_pixels",
                "serve_precision", "serve_tuning")
ALL_KEYS = tuple(dict.fromkeys(COLLECT_KEYS + CLEAN_KEYS + SPLIT_KEYS + TRAIN_KEYS + ARCHIVE_KEYS))


def config_options(keys: tuple[str, ...]) -> Callable:
    """Add ``--config``, ``--out`` and one option per config key (default None = not given)."""
    defaults = Config()

    def decorate(fn: Callable) -> Callable:
        for f in reversed([f for f in fields(Config) if f.name in keys]):
            dashed, default = f.name.replace("_", "-"), getattr(defaults, f.name)
            shown = ",".join(default) if isinstance(default, list) else default
            help_text = f"{f.metadata['help']} [config key {f.name}; default {shown}]"
            if f.type == "bool":
                fn = click.option(f"--{dashed}/--no-{dashed}", f.name, default=None, help=help_text)(fn)
            else:
                fn = click.option(f"--{dashed}", f.name, default=None, metavar=_metavar(str(f.type)),
                                  help=help_text)(fn)
        fn = click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
                          help="Run folder: every stage reads and writes here.")(fn)
        return click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
                            help="YAML file of config keys; command-line options override it.")(fn)

    return decorate


def _metavar(kind: str) -> str:
    return {"int": "INT", "float": "FLOAT", "list[str]": "A,B,..."}.get(kind, "TEXT")


def _setup(config_file: Path | None, out: Path, overrides: dict[str, Any]) -> tuple[Config, RunPaths]:
    # A run folder remembers its config: re-running one stage uses the settings of the run.
    cfg = load_config(config_file, overrides, saved=RunPaths(Path(out)).config)
    ensure_writable_dir(out)
    paths = RunPaths.for_config(out, cfg)
    atomic_write_text(paths.config, cfg.to_yaml())
    return cfg, paths


def _collect(cfg: Config, paths: RunPaths) -> None:
    from jobs.collect import collect as collect_stage

    summary = collect_stage(cfg, paths)
    if not any(term["kept"] for term in summary["terms"].values()):
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


@cli.command()
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with one sub-folder per class. Without it, images are collected for --terms.")
@click.option("--resume", "resume", flag_value="require", default=None, help="Require resuming checkpoints/last.pt.")
@click.option("--fresh", "resume", flag_value="fresh", help="Start training over (old checkpoints are kept aside).")
@config_options(ALL_KEYS)
def run(config_file: Path | None, out: Path, data: Path | None, resume: str | None, **overrides: Any) -> None:
    """The whole job: [collect] -> clean -> split -> train -> evaluate -> export -> archive."""
    from jobs import archive, clean, evaluate, export, split, train
    from jobs.runtime import barrier, setup, teardown

    cfg, paths = _setup(config_file, out, overrides)
    rt = setup(cfg)
    try:
        if rt.is_main:
            _print_config(cfg, paths)
            if data is None:
                _collect(cfg, paths)
            clean.clean(cfg, paths, data or paths.raw)
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
@config_options(COLLECT_KEYS + ("seed",))
def collect(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Download images for each search term into OUT/raw/<term>/ with a manifest and attribution."""
    cfg, paths = _setup(config_file, out, overrides)
    _collect(cfg, paths)


@cli.command()
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with one sub-folder per class (default: OUT/raw from collect).")
@config_options(CLEAN_KEYS)
def clean(config_file: Path | None, out: Path, data: Path | None, **overrides: Any) -> None:
    """Decode every image; keep, convert to RGB, or quarantine it; write clean_report.json."""
    from jobs.clean import clean as clean_stage

    cfg, paths = _setup(config_file, out, overrides)
    clean_stage(cfg, paths, data or paths.raw)


@cli.command()
@config_options(SPLIT_KEYS)
def split(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Assign the cleaned images to train/val/test (stratified, seeded, stable): splits.json."""
    from jobs.split import split as split_stage

    cfg, paths = _setup(config_file, out, overrides)
    split_stage(cfg, paths)


@cli.command()
@click.option("--resume", "resume", flag_value="require", default=None, help="Require resuming checkpoints/last.pt.")
@click.option("--fresh", "resume", flag_value="fresh", help="Start over (old checkpoints are kept aside).")
@config_options(TRAIN_KEYS)
def train(config_file: Path | None, out: Path, resume: str | None, **overrides: Any) -> None:
    """Train (or resume) from splits.json: checkpoints/{last,best}.pt and metrics.json. Works under torchrun."""
    from jobs.runtime import setup, teardown
    from jobs.train import train as train_stage

    cfg, paths = _setup(config_file, out, overrides)
    rt = setup(cfg)
    try:
        train_stage(cfg, paths, rt, resume or "auto")
    finally:
        teardown()


@cli.command()
@config_options(TRAIN_KEYS)
def evaluate(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Score the best checkpoint on the test split and write the report/ folder."""
    from jobs.evaluate import evaluate as evaluate_stage
    from jobs.runtime import setup

    cfg, paths = _setup(config_file, out, overrides)
    evaluate_stage(cfg, paths, setup(cfg))


@cli.command()
@config_options(("arch", "model_name", "model_version", "topk", "serve_precision"))
def export(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Write model/model.pt (a bare state_dict), index_to_name.json and metadata.json."""
    from jobs.export import export as export_stage

    cfg, paths = _setup(config_file, out, overrides)
    export_stage(cfg, paths)


@cli.command()
@config_options(ARCHIVE_KEYS)
def archive(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Pack model/ with torch-model-archiver and our handler into MODEL_STORE/<model_name>.mar."""
    from jobs.archive import archive as archive_stage

    cfg, paths = _setup(config_file, out, overrides)
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
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML config file.")
def serve(model_store: Path, stop: bool, host: str, port: int, management_port: int, metrics_port: int,
          workdir: Path | None, disable_token_auth: bool, config_file: Path | None) -> None:
    """Run TorchServe in the foreground on MODEL_STORE with handler/config.properties (Ctrl-C stops it)."""
    from jobs.serve import serve as serve_models

    code = serve_models(load_config(config_file), model_store, stop=stop, workdir=workdir, host=host, port=port,
                        management_port=management_port, metrics_port=metrics_port,
                        disable_token_auth=disable_token_auth)
    sys.exit(code)


@cli.command("export-kserve")
@click.option("--dest", type=click.Path(path_type=Path), default=None, help="Target folder (default OUT/kserve).")
@config_options(ARCHIVE_KEYS)
def export_kserve(config_file: Path | None, out: Path, dest: Path | None, **overrides: Any) -> None:
    """Lay out OUT/kserve/{config/config.properties, model-store/<name>.mar} for a KServe InferenceService."""
    from jobs.kserve import export_kserve as export_kserve_stage

    cfg, paths = _setup(config_file, out, overrides)
    click.echo(export_kserve_stage(cfg, paths, dest))


@cli.command()
@click.option("--model-dir", type=click.Path(path_type=Path), required=True, help="An exported model/ folder.")
@click.option("--topk", type=int, default=None, help="Predictions per image (default from metadata.json).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def predict(model_dir: Path, topk: int | None, images: tuple[Path, ...]) -> None:
    """Classify image files offline with an exported model; one JSON object per line."""
    from jobs.predict import predict_files

    for result in predict_files(model_dir, list(images), topk):
        result.pop("probabilities", None)
        click.echo(json.dumps(result))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except JobError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
