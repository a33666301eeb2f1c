"""The model laid out for KServe's TorchServe runtime: ``config/config.properties`` + ``model-store/<name>.mar``.

KServe mounts the InferenceService's ``storageUri`` at /mnt/models and starts
``torchserve --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``
behind its own KServe server on port 8080, which forwards every request to TorchServe's
inference address and learns the model names from ``model_snapshot``.

Three choices here differ from KServe's generic TorchServe sample, each checked against a real
TorchServe 0.12 (tests/test_deploy.py):
  * no ``service_envelope``: TorchServe's kserve/kservev2 envelopes unwrap only the first request
    of a server-side batch, so two concurrent requests fail with "number of batch response
    mismatched". Our handler reads KServe v1 and v2 bodies itself, batching included.
  * ``enable_envvars_config=false``, so the runtime's TS_SERVICE_ENVELOPE cannot switch an envelope on.
  * token authorization off, with inference and management bound to 127.0.0.1: KServe's server
    sends no TorchServe token, and only it, in the same container, can reach TorchServe.
"""

from __future__ import annotations

import json
from pathlib import Path

from handler import scheduler
from jobs.archive import model_config, packed_settings
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_text, link_or_copy
from jobs.serve import HANDLER_METRICS, SERVER_CONFIG, Ports, parse_properties, render_config

MOUNT = Path("/mnt/models")  # where KServe puts storageUri
PORTS = Ports(inference=8085, management=8081, metrics=8082, grpc_inference=7070, grpc_management=7071)
# Per-model TorchServe settings copied from the archive's packed model-config.yaml into the snapshot.
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")
HEADER = """\
# TorchServe settings for KServe's TorchServe runtime, written by `python -m jobs export-kserve`
# from handler/config.properties; jobs/kserve.py says why each KServe-specific value is what it is.
# Token authorization is off on purpose: TorchServe listens on 127.0.0.1 only, and its one client
# is KServe's own server in the same container (authenticate at the cluster's ingress instead).
# No service_envelope: the handler reads KServe v1/v2 bodies itself, server-side batching included."""


def archive_settings(mar: Path, cfg: Config, plan: scheduler.ServingPlan) -> dict:
    """Name, version, workers and batching of ``mar``: what ``jobs archive`` packed; for what it left open,
    ``plan`` (the serving plan of one KServe pod) for workers and batching, ``cfg`` for the rest."""
    manifest, packed = packed_settings(mar)
    defaults = {**plan.model_settings(), **model_config(cfg)}
    return {"name": manifest["modelName"], "version": manifest.get("modelVersion", cfg.model_version),
            **{key: packed.get(key, defaults[key]) for key in SNAPSHOT_KEYS}}


def model_snapshot(settings: dict, mar_name: str) -> dict:
    """TorchServe's startup snapshot: the models to load, and the names KServe's server will expose."""
    version = {"defaultVersion": True, "marName": mar_name, **{k: settings[k] for k in SNAPSHOT_KEYS}}
    return {"name": "startup.cfg", "modelCount": 1, "models": {settings["name"]: {settings["version"]: version}}}


def kserve_properties(snapshot: dict) -> str:
    """``handler/config.properties`` (the hardened server settings) adapted to the KServe container."""
    text = render_config(SERVER_CONFIG.read_text(), host="127.0.0.1", ports=PORTS,
                         model_store=MOUNT / "model-store", disable_token_auth=True)
    # The base file's comments describe the standalone server; here they would mislead.
    settings = parse_properties(text)
    settings.update({"metrics_address": f"http://0.0.0.0:{PORTS.metrics}",  # Prometheus scrapes it
                     "enable_envvars_config": "false",
                     "metrics_config": str(MOUNT / "config" / HANDLER_METRICS.name),  # the handler's own metrics too
                     "model_snapshot": json.dumps(snapshot, separators=(",", ":"))})
    return "\n".join([HEADER, *(f"{key}={value}" for key, value in settings.items())]) + "\n"


def export_kserve(cfg: Config, paths: RunPaths, dest: Path | None = None, pod_cpus: int = 2, pod_gpus: int = 0) -> Path:
    """Write ``<dest>/config/{config.properties,metrics.yaml}`` and ``<dest>/model-store/<model_name>.mar``;
    returns ``dest``. KServe starts a stock TorchServe, which runs nothing of ours before loading the
    model, so workers and batching are chosen here, for a pod of ``pod_cpus`` CPUs and ``pod_gpus`` GPUs
    (deploy/kserve/inferenceservice.yaml requests 2 CPUs), unless the archive packed its own."""
    mar = paths.model_store / f"{cfg.model_name}.mar"
    if not mar.is_file():
        raise JobError(f"{mar} not found; run `python -m jobs archive --out {paths.out}` first "
                       "(or pass the --model-name / --model-store it was archived with)")
    dest = Path(dest) if dest is not None else paths.out / "kserve"
    settings = archive_settings(mar, cfg, scheduler.serving_plan(cores=pod_cpus, gpus=pod_gpus))
    link_or_copy(mar, dest / "model-store" / mar.name)
    link_or_copy(HANDLER_METRICS, dest / "config" / HANDLER_METRICS.name)
    atomic_write_text(dest / "config" / "config.properties", kserve_properties(model_snapshot(settings, mar.name)))
    print(f"export-kserve: {dest} (model {settings['name']} {settings['version']}, {settings['maxWorkers']} workers, "
          f"batchSize {settings['batchSize']}, maxBatchDelay {settings['maxBatchDelay']} ms); copy it to the volume "
          "behind the InferenceService's storageUri")
    return dest
