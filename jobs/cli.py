"""The command line: one command per stage, and ``run`` for all of them in order.

Thin on purpose: each command passes its options to the function of the same name in ``jobs.api``
(which the notebook user calls too) and turns a ``JobError`` into one line on stderr with exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import click

from handler.cpus import CpusSettingError
from jobs import api
from jobs.config import SERVE_BACKENDS, Config, key_names, key_type, keys_for, load_config
from jobs.errors import JobError, jobs_command, with_real_command
from jobs.process import exit_process

KEYS_DOC = "docs/configuration.md"


def key_section(name: str) -> str:
    """The stage a config key's option is listed under in --help: train for everything training uses
    (also the runtime keys that audit and evaluate share), else the first command that takes it."""
    commands = next(f for f in fields(Config) if f.name == name).metadata["commands"]
    return "train" if "train" in commands else commands[0]


class PipelineGroup(click.Group):
    """Lists its commands in the order they are defined: the pipeline's."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class StagedCommand(click.Command):
    """--help shows the command's own options first, then the config-key options by stage."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        keys, sections = set(key_names()), {"Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            title = f"{key_section(param.name).capitalize()} options" if param.name in keys else "Options"
            sections.setdefault(title, []).append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def config_options(command: str) -> Callable:
    """Add ``--config``, ``--out`` and one option per config key the command takes (default None = not given),
    ordered by stage for --help."""
    keys = keys_for(command)
    order = {stage: i for i, stage in enumerate((*api.PIPELINE, "serve"))}
    ordered = sorted((f for f in fields(Config) if f.name in keys), key=lambda f: order.get(key_section(f.name), 0))

    def decorate(fn: Callable) -> Callable:
        fn = key_options(f.name for f in ordered)(fn)
        fn = click.option("--wait", is_flag=True,
                          help="If another job is writing OUT, wait for it to end (default: exit 2 at once).")(fn)
        fn = click.option("--out", type=click.Path(path_type=Path), default=api.DEFAULT_OUT, show_default=True,
                          help="Run folder: every stage reads and writes here.")(fn)
        return click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
                            help="YAML file of config keys; command-line options override it.")(fn)

    return decorate


def key_options(names: Any) -> Callable:
    """One option per config key in ``names``, in that order (default None = not given)."""
    defaults, names = Config(), list(names)

    def decorate(fn: Callable) -> Callable:
        for name in reversed(names):
            dashed, default = name.replace("_", "-"), getattr(defaults, name)
            shown = ",".join(default) if isinstance(default, list) else default
            help_text = f"{next(f for f in fields(Config) if f.name == name).metadata['help']} [default: {shown}]"
            if key_type(name) is bool:
                fn = click.option(f"--{dashed}/--no-{dashed}", name, default=None, help=help_text)(fn)
            else:
                fn = click.option(f"--{dashed}", name, default=None, metavar=_metavar(name), help=help_text)(fn)
        return fn

    return decorate


def _metavar(name: str) -> str:
    kind = key_type(name)
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(kind, "A,B,...")


def stage_command(name: str | None = None, **kwargs: Any) -> Callable:
    """A command whose config-key options --help groups by stage, with a pointer to the key table."""
    epilog = (f"Each config-key option is also a YAML key for --config (--batch-size <-> batch_size); "
              f"all keys, ranges and defaults: {KEYS_DOC}.")
    return cli.command(name, cls=StagedCommand, epilog=epilog, **kwargs)


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def cli() -> None:
    """Search terms or an image folder in, a served image classifier out.

    \b
    jobs run --data path/to/images --out runs/pets     # a folder of <class>/ sub-folders
    jobs run --terms puppies,kittens --out runs/pets   # collect from an image search first
    Each stage is also its own command, reading and writing the same --out folder (listed in pipeline
    order); `python -m jobs` is the same program.
    """


DECISIONS_OPTION = click.option(
    "--decisions", "decisions_file", type=click.Path(path_type=Path), default=None,
    help="A decisions.json exported from the review page (exclude / relabel / keep); copied into OUT.")
RETRY_ALL = click.option("--retry-all", is_flag=True,
                         help="Collect: also fetch again the URLs that failed permanently (404, not an image) before.")


@stage_command(short_help="The whole job, from collect (or --data) to archive.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with one sub-folder per class. Without it, images are collected for --terms.")
@click.option("--resume", "resume", flag_value="require", default=None, help="Require resuming checkpoints/last.pt.")
@click.option("--fresh", "resume", flag_value="fresh", help="Start training over (old checkpoints are kept aside).")
@DECISIONS_OPTION
@RETRY_ALL
@config_options("run")
def run(config_file: Path | None, out: Path, data: Path | None, resume: str | None, decisions_file: Path | None,
        retry_all: bool, **overrides: Any) -> None:
    """The whole job: [collect] -> clean -> audit -> split -> train -> export -> evaluate -> archive."""
    mar = api.run(data, out, config=config_file, resume=resume or "auto", decisions=decisions_file,
                  retry_all=retry_all, **overrides)
    click.echo(f"done: {mar}\nserve it: {jobs_command()} serve --model-store {mar.parent}")


@stage_command(short_help="Search and download images for --terms: raw/.")
@RETRY_ALL
@config_options("collect")
def collect(config_file: Path | None, out: Path, retry_all: bool, **overrides: Any) -> None:
    """Download images for each search term into OUT/raw/<term>/ with a manifest and attribution."""
    api.collect(out, config=config_file, retry_all=retry_all, **overrides)


@stage_command(short_help="Check, convert or quarantine each image: dataset/.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder with one sub-folder per class (default: OUT/raw from collect).")
@DECISIONS_OPTION
@config_options("clean")
def clean(config_file: Path | None, out: Path, data: Path | None, decisions_file: Path | None,
          **overrides: Any) -> None:
    """Decode every image; keep, convert to RGB, or quarantine it; apply decisions; write clean_report.json."""
    api.clean(out, data, config=config_file, decisions=decisions_file, **overrides)


@stage_command(short_help="Near-duplicates, label issues, outliers: audit.json.")
@config_options("audit")
def audit(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Near-duplicates, label conflicts, label issues, outliers, quality flags: audit.json + report/review.html."""
    api.audit(out, config=config_file, **overrides)


@cli.command(short_help="Serve the review page; it saves decisions.json.")
@click.option("--out", type=click.Path(path_type=Path), default=api.DEFAULT_OUT, show_default=True,
              help="The run folder whose report/review.html to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option("--port", type=int, default=8765, show_default=True, help="Port (0 = any free one).")
@key_options(keys_for("review"))
def review(out: Path, host: str, port: int, **overrides: Any) -> None:
    """Serve OUT/report/review.html on loopback; its "Save to run" writes OUT/decisions.json. --captured DIR first
    adds that capture folder's images, grouped by likeness, to the page (docs/audit.md, "Reviewing captured images")."""
    from jobs.review import serve_review

    if overrides["captured"] is not None:  # without it the page is served as it is, even while a job runs
        api.review(out, **overrides)
    serve_review(out, host, port)


@stage_command(short_help="Assign train/val/test: splits.json.")
@config_options("split")
def split(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Assign the cleaned images to train/val/test (stratified, seeded, stable): splits.json."""
    api.split(out, config=config_file, **overrides)


@stage_command(short_help="Train or resume: checkpoints/, metrics.json.")
@click.option("--resume", "resume", flag_value="require", default=None, help="Require resuming checkpoints/last.pt.")
@click.option("--fresh", "resume", flag_value="fresh", help="Start over (old checkpoints are kept aside).")
@config_options("train")
def train(config_file: Path | None, out: Path, resume: str | None, **overrides: Any) -> None:
    """Train (or resume) from splits.json: checkpoints/{last,best}.pt and metrics.json. Works under torchrun."""
    api.train(out, config=config_file, resume=resume or "auto", **overrides)


@stage_command(short_help="Write model/: state_dict, labels, metadata.")
@config_options("export")
def export(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Write model/model.pt (a bare state_dict), index_to_name.json and metadata.json."""
    api.export(out, config=config_file, **overrides)


@stage_command(short_help="Score the test split, and the answers as served: report/.")
@config_options("evaluate")
def evaluate(config_file: Path | None, out: Path, **overrides: Any) -> None:
    """Score the best checkpoint on the test split (and the exported model's answers as served) into report/."""
    api.evaluate(out, config=config_file, **overrides)


@stage_command(short_help="Pack model/ into MODEL_STORE/<model_name>.mar.")
@click.option("--force", is_flag=True,
              help="Make this version the default even when it is significantly worse than the previous one.")
@config_options("archive")
def archive(config_file: Path | None, out: Path, force: bool, **overrides: Any) -> None:
    """Pack model/ with torch-model-archiver and our handler into MODEL_STORE/<model_name>.mar (every version
    stays in MODEL_STORE/.versions/)."""
    click.echo(api.archive(out, config=config_file, force=force, **overrides))


@cli.command(short_help="Serve a model store with TorchServe (or KServe's model server).")
@click.option("--model-store", type=click.Path(path_type=Path), default=api.DEFAULT_OUT / "model-store",
              show_default=True, help="Folder of .mar files to serve (all of them).")
@click.option("--detach", is_flag=True,
              help="Return once the models answer, leaving TorchServe running (stop it with --stop).")
@click.option("--stop", is_flag=True, help="Stop the TorchServe started for this model store.")
@click.option("--switch-to", "switch_to", metavar="VERSION", default=None,
              help="Make VERSION (archived in MODEL_STORE/.versions/) the served default of the running TorchServe or "
                   "KServe model server, with no failed request; an older VERSION rolls back.")
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
@key_options(keys_for("serve"))
def serve(model_store: Path, detach: bool, stop: bool, switch_to: str | None, host: str, port: int,
          management_port: int, metrics_port: int, workdir: Path | None, disable_token_auth: bool, runtime: str,
          config_file: Path | None, **overrides: Any) -> None:
    """Run TorchServe (or --runtime kserve) on MODEL_STORE: in the foreground (Ctrl-C stops it), or in the
    background with --detach. --capture DIR keeps what the model met (docs/serving.md, "Capture")."""
    from jobs.serve import default_workdir
    from jobs.serve import serve as serve_models
    from jobs.switch import switch_to as switch_version

    if switch_to is not None:
        sys.exit(switch_version(load_config(config_file, overrides), model_store,
                                Path(workdir) if workdir else default_workdir(model_store), switch_to))
    code = serve_models(load_config(config_file, overrides), model_store, stop=stop, detach=detach, workdir=workdir,
                        host=host, port=port, management_port=management_port, metrics_port=metrics_port,
                        disable_token_auth=disable_token_auth, runtime=runtime)
    sys.exit(code)


@cli.command(short_help="Classify images, folders, globs with an exported model/.")
@click.option("--model-dir", type=click.Path(path_type=Path), required=True, help="An exported model/ folder.")
@click.option("--topk", type=click.IntRange(1), default=None, help="Predictions per image (default: metadata.json).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the results to a .csv (file, label, probability, top-k, trust fields) or .jsonl file "
                   "instead of JSON lines on stdout.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--backend", type=click.Choice(SERVE_BACKENDS), default="auto", show_default=True,
              help="The engine: auto (the fastest the export admitted, measured here), torch, onnxruntime or openvino.")
@click.argument("inputs", nargs=-1, required=True)
def predict(model_dir: Path, topk: int | None, output: Path | None, batch_size: int, device: str, backend: str,
            inputs: tuple[str, ...]) -> None:
    """Classify image files, folders (recursively) and glob patterns offline, as the server would answer.

    Exits 1 when any input could not be classified (each is named in the output, with the reason).
    """
    from handler.cpus import usable_cpus
    from jobs import predict as predicting
    from jobs.runtime import pick_device

    predicting.check_output(output)
    # One decoding thread per core beside the forward pass (bench/README.md, "Engines": jobs predict).
    results = predicting.predict(model_dir, inputs, topk, batch_size, usable_cpus(),
                                 pick_device(device, 0), progress=sys.stderr.isatty(), backend=backend,
                                 say_backend=True)
    summary = predicting.write_results(results, output)
    where = f"; results in {output}" if output else ""
    first = summary.first_error
    failed = f", {summary.failed} failed (first: {first['file']}: {first['error']})" if first else ""
    rate = summary.classified / summary.seconds if summary.seconds else 0.0
    click.echo(f"predict: {summary.classified} images classified in {summary.seconds:.1f} s ({rate:.1f} img/s)"
               f"{failed}{where}", err=True)
    if summary.failed:
        sys.exit(1)


@stage_command("export-kserve", short_help="Lay out OUT/kserve for a KServe InferenceService.")
@click.option("--dest", type=click.Path(path_type=Path), default=None, help="Target folder (default OUT/kserve).")
@click.option("--pod-cpus", type=click.IntRange(1), default=2, show_default=True,
              help="CPUs each KServe pod requests (deploy/kserve/inferenceservice.yaml): sets workers and batching.")
@click.option("--pod-gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs each KServe pod gets.")
@config_options("export-kserve")
def export_kserve(config_file: Path | None, out: Path, dest: Path | None, pod_cpus: int, pod_gpus: int,
                  **overrides: Any) -> None:
    """Lay out OUT/kserve/{config/{config.properties,metrics.yaml}, model-store/<name>.mar} for KServe."""
    click.echo(api.export_kserve(out, dest=dest, pod_cpus=pod_cpus, pod_gpus=pod_gpus, config=config_file,
                                 **overrides))


@stage_command("export-triton", short_help="Lay out OUT/triton, a Triton Inference Server model repository.")
@click.option("--dest", type=click.Path(path_type=Path), default=None, help="Target folder (default OUT/triton).")
@config_options("export-triton")
def export_triton(config_file: Path | None, out: Path, dest: Path | None, **overrides: Any) -> None:
    """Lay out OUT/triton/{<name>, <name>_preprocess, <name>_onnx, <name>_postprocess}: model.onnx between Python
    pre- and post-processing steps, as one ensemble (docs/serving-runtimes.md, "Triton")."""
    click.echo(api.export_triton(out, dest=dest, config=config_file, **overrides))


@cli.command("serve-config", short_help="Write a TorchServe config for this machine.")
@click.option("--model-store", type=click.Path(path_type=Path), required=True, help="Folder of the .mar files.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The TorchServe config.properties to start from (default handler/config.properties).")
@click.option("--dest", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
def serve_config(model_store: Path, base: Path | None, dest: Path) -> None:
    """Write a TorchServe config for THIS machine: BASE plus workers and batching (for the archives that leave
    them open) and the handler's metrics. The serve container runs it at every start."""
    from jobs.serve import write_machine_config

    write_machine_config(base, model_store, dest)


def main() -> None:
    """``jobs`` as a click app: returns when the command succeeded, else raises SystemExit with the exit code (what a
    caller in this process catches)."""
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
        click.echo(f"error: {with_real_command(str(e))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)


def run_and_exit() -> NoReturn:
    """The ``jobs`` command (console script and ``python -m jobs``): ``main``, then ``jobs.process.exit_process``."""
    try:
        main()
    except SystemExit as e:
        exit_process(e.code)
    exit_process(0)
