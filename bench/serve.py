"""Serving benchmark: served throughput against the machine's own in-process limit, per photo size, for
TorchServe (our handler and a stock-style one) and KServe's model server (and, for the choice between them,
Seldon's MLServer), same model, same photos, real HTTP; with where each request's time goes.

    .venv/bin/python -m bench.serve [--duration 20] [--concurrency 1,8] [--variants ours,stock,kserve]
                                    [--photos pets,hymenoptera,12mp] [--model-dir RUN/model]
                                    [--kserve-python PY] [--mlserver-python PY]

**Photo sets**: ``pets`` (180 px, shared/datasets/pets-sample), ``hymenoptera`` (its val split at full size,
mostly 500x375) and ``12mp`` (4032x3024 JPEGs of about 3 MB made here from hymenoptera photos with sensor-like
noise, half of them with an EXIF rotation, as phones send them). Without shared/ the fixture photos stand in.

**The limit** is measured without any server, per photo set, before and after the served cells: the same model
and photos, decode + preprocess + forward (handler/service.py, what every runtime runs), batch 8, every core,
in the best precision and engine the machine has (PyTorch fp32, bf16 autocast where it is native, and each ONNX
engine the export admitted: ONNX Runtime, OpenVINO in its own bf16 where native), and the better of two
layouts: one process with torch threads = cores, or one single-threaded process per core side by side.
``served/limit`` = served images/s over that.

**The served cells**: each (variant, concurrency) sends the set's photos from ``concurrency`` closed-loop client
threads; its time is split into rounds that alternate the variants, so other load on the machine hits them alike.
Variants:
  * ours: TorchServe, workers and batching chosen by ``jobs serve`` (handler.scheduler.serving_plan), the engine
    by ``serve_backend: auto``; ours-torch: the same on PyTorch alone (``serve_backend: torch``);
  * ours-archived / ours-1worker-allthreads: TorchServe with the archive's old fixed values / one worker on
    every core;
  * stock: bench/stock_handler.py (PIL + torchvision.transforms per image, fp32, batchSize 1), the baseline;
  * kserve: handler/kserve_runtime.py on the same archive, same plan, raw bodies to its /predictions path;
  * kserve-v2 / mlserver-v2: Open Inference Protocol bodies (base64 in JSON) to KServe / MLServer
    (bench/mlserver_runtime.py; MLServer has no V1 and no raw bodies). ``--kserve-python`` /
    ``--mlserver-python`` run a runtime from another venv (their FastAPI pins clash).
The load generator runs on the same machine: its CPU seconds per request are recorded (``client_cpu_ms``).

**Where the time goes** (``stages``, ms per request, means over the cell): TorchServe's frontend latency and
queue time (its Prometheus counters), the handler's PreprocessTime (parse + decode + preprocess), ForwardTime
and HandlerTime per batch (its metrics log); KServe's request_preprocess/predict/postprocess histograms.
Results: bench/results/serve.json. Without --model-dir the model is a random-weight resnet18 recorded as
passing the bf16 check where the CPU has native bf16 (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import yaml
from PIL import Image

from handler import engines, precision, scheduler, trust
from handler import model as models
from handler.answer_metrics import CAPTURE_DROPPED
from handler.capture import CaptureSettings
from handler.cpus import usable_cpus
from handler.preprocess import Preprocessor
from jobs.config import RunPaths, load_config
from jobs.fileio import atomic_write_json, link_or_copy, read_json
from jobs.serve import KServeRuntime, Server, TorchServe, free_ports, machine_models, start, start_kserve
from tests.torchserve_fixture import archive_as, export_random_model, unused_ports

REPO = Path(__file__).resolve().parents[1]

SHARED = REPO.parent / "shared" / "datasets"
FIXTURES = REPO / "tests" / "fixtures" / "hymenoptera_small"
PHOTO_SETS = {"pets": SHARED / "pets-sample", "hymenoptera": SHARED / "hymenoptera" / "val"}
PHONE_SIZE, PHONE_PHOTOS = (4032, 3024), 8
STOCK = REPO / "bench" / "stock_handler.py"
# name -> (handler file, model-config handler options, job-config overrides); "stock" is the baseline.
# The -Nthread/-2workers variants separate the effect of thread count from batching and preprocessing.
ARCHIVED = {"serve_tuning": "archive"}
VARIANTS: dict[str, tuple[Path | None, dict, dict]] = {
    "ours": (None, {}, {}),
    # ours with serve_backend torch: what the engines auto chooses from are worth (ours is auto, the default)
    "ours-torch": (None, {}, {"serve_backend": "torch"}),
    "ours-archived": (None, {}, {**ARCHIVED, "min_workers": 1, "max_workers": 1, "serve_batch_size": 8,
                                 "max_batch_delay_ms": 20}),
    "ours-1worker-allthreads": (None, {"torch_threads": os.cpu_count()}, {
        **ARCHIVED, "min_workers": 1, "max_workers": 1, "serve_batch_size": 8, "max_batch_delay_ms": 1}),
    "stock": (STOCK, {}, {**ARCHIVED, "serve_batch_size": 1, "max_batch_delay_ms": 0}),
    "stock-1thread": (STOCK, {"torch_threads": 1}, {**ARCHIVED, "serve_batch_size": 1, "max_batch_delay_ms": 0}),
    # ours with the plan's workers and threads, other batching (what serving_plan's batching was chosen from)
    **{f"ours-batch{b}-delay{d}": (None, {}, {**ARCHIVED, "min_workers": scheduler.serving_plan().workers,
                                              "max_workers": scheduler.serving_plan().workers,
                                              "serve_batch_size": b, "max_batch_delay_ms": d})
       for b, d in ((4, 1), (4, 5), (8, 5), (4, 20))},
}
# Ours archived from the same export without calibration and the OOD score (the cost of the trust fields).
TRUSTLESS = "ours-notrust"
VARIANTS[TRUSTLESS] = VARIANTS["ours"]
# Variants served by another runtime from the "ours" archive: runtime, request body. ours-capture: a second
# TorchServe with capture on, keeping every image (sample 1.0: the most writing capture can do) in a tiny
# folder, so the cap trims it all the time: what capture costs the request path, against "ours" without it.
RUNTIME_VARIANTS = {"kserve": ("kserve", "raw"), "kserve-v2": ("kserve", "v2"), "mlserver-v2": ("mlserver", "v2"),
                    "ours-capture": ("torchserve-capture", "raw")}
CAPTURE_CAP = {"max_mb": 2.0, "max_files": 40}
LIMIT_BATCH = 8
SERVED_MODEL = "ours"  # the archive every runtime serves


def load_photos(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise SystemExit(f"no photos under {folder}")
    return [f.read_bytes() for f in files]


def phone_photos(sources: list[bytes], count: int = PHONE_PHOTOS, seed: int = 0) -> list[bytes]:
    """12 MP JPEGs of about 3 MB, as a phone sends them: upscaled photos with sensor-like noise (a smooth
    upscale alone would compress to a fraction of a phone photo's size), every other one EXIF-rotated."""
    rng = np.random.default_rng(seed)
    out = []
    for i, data in enumerate(sources[:count]):
        with Image.open(io.BytesIO(data)) as im:
            big = np.asarray(im.convert("RGB").resize(PHONE_SIZE, Image.BICUBIC), dtype=np.int16)
        noisy = (big + rng.normal(0, 6, big.shape).astype(np.int16)).clip(0, 255).astype(np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 1  # orientation: rotate 90 degrees on display
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=92, exif=exif)
        out.append(buf.getvalue())
    return out


def photo_sets(names: list[str]) -> dict[str, list[bytes]]:
    found = {name: folder for name, folder in PHOTO_SETS.items() if folder.is_dir()}
    hymenoptera = load_photos(found.get("hymenoptera", FIXTURES))
    sets = {}
    for name in names:
        if name == "12mp":
            sets[name] = phone_photos(hymenoptera)
        elif name in PHOTO_SETS:
            sets[name] = load_photos(found.get(name, FIXTURES))
        else:
            raise SystemExit(f"unknown photo set {name!r}; choose from {', '.join([*PHOTO_SETS, '12mp'])}")
    return sets


@dataclass
class Cell:
    """Accumulated measurements of one (variant, concurrency) over its rounds."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    client_cpu: float = 0.0
    server_cpu: dict[str, float] = field(default_factory=dict)
    stages: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.array(self.latencies) * 1000
        n = len(lat)
        totals = {k: sum(s.get(k, 0) for s in self.stages) for k in dict.fromkeys(k for s in self.stages for k in s)}
        batches = totals.pop("batches", 0)
        stages = {k: round(v / n, 2) for k, v in totals.items()} if n else {}
        return {"duration_s": round(self.wall, 2), "requests": n, "errors": self.errors,
                "requests_per_s": round(n / self.wall, 2) if self.wall else None,
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if n else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if n else None,
                "mean_ms": round(float(lat.mean()), 1) if n else None,
                "client_cpu_ms": round(self.client_cpu * 1000 / n, 2) if n else None,
                "server_cpu_ms": round(sum(self.server_cpu.values()) * 1000 / n, 2) if n else None,
                "server_cpu_ms_by_program": {k: round(v * 1000 / n, 2) for k, v in self.server_cpu.items() if n},
                "stages_ms_per_request": stages,
                **({"mean_batch": round(n / batches, 2)} if batches else {})}


@dataclass
class Target:
    """Where a variant's requests go, and how a photo becomes its body; ``probe`` reads the server's own times,
    ``group`` is the server's process group (its CPU seconds are counted per cell)."""

    url: str
    headers: dict[str, str]
    body: Callable[[bytes], bytes]
    probe: Callable[[], dict[str, float]]
    group: int


def group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the live processes in process group ``pgid``, by program (java: TorchServe's
    frontend; python: its workers, or a Python server's processes)."""
    ticks: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm, fields = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # after the command: state, ppid, pgrp, ...; utime, stime at 11, 12
                program = "java" if comm == "java" else "python"
                ticks[program] = ticks.get(program, 0) + int(fields[11]) + int(fields[12])
    return {k: v / os.sysconf("SC_CLK_TCK") for k, v in ticks.items()}


def raw(photo: bytes) -> bytes:
    return photo


def v2_body(photo: bytes) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(photo).decode()]}]}).encode()


def run_load(target: Target, photos: list[bytes], concurrency: int, duration: float, cell: Cell) -> None:
    """``concurrency`` closed-loop clients for ``duration`` s, each sending the next photo."""
    bodies = [target.body(p) for p in photos]  # encoded once: the clients' CPU is spent on HTTP alone
    headers = {"Content-Type": "application/json" if target.body is v2_body else "application/octet-stream",
               **target.headers}
    counter = itertools.count()
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                body = bodies[next(counter) % len(bodies)]
                t0 = time.perf_counter()
                ok = session.post(target.url, data=body, headers=headers, timeout=120).status_code == 200
                elapsed = time.perf_counter() - t0
                with lock:
                    if ok:
                        cell.latencies.append(elapsed)
                    else:
                        cell.errors += 1

    before, cpu, server_cpu = target.probe(), time.process_time(), group_cpu(target.group)
    start_time = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    cell.wall += time.perf_counter() - start_time
    cell.client_cpu += time.process_time() - cpu
    for program, seconds in group_cpu(target.group).items():
        cell.server_cpu[program] = cell.server_cpu.get(program, 0) + seconds - server_cpu.get(program, 0)
    after = target.probe()
    cell.stages.append({k: after[k] - before.get(k, 0) for k in after})


PROM_LINE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$', re.M)
TS_LOG_METRIC = re.compile(r"\[METRICS\](PreprocessTime|ForwardTime|HandlerTime)\.\w+:([\d.]+)\|#([^|]*)\|.*")


def prometheus(url: str, headers: dict[str, str] | None = None) -> list[tuple[str, str, float]]:
    try:
        text = requests.get(url, headers=headers or {}, timeout=10).text
    except requests.RequestException:
        return []
    return [(m[1], m[2], float(m[3])) for m in PROM_LINE.finditer(text)]


def torchserve_probe(server: TorchServe, model: str) -> Callable[[], dict[str, float]]:
    """Cumulative ms for ``model``: the frontend's inference and queue latency (Prometheus), and the handler's
    per-batch times summed from its metric log lines (a batch's time counts once, shared by its requests)."""
    logs = server.workdir / "logs"

    def probe() -> dict[str, float]:
        out = {"frontend": 0.0, "queue": 0.0}
        for name, labels, value in prometheus(f"{server.metrics_url}/metrics"):
            if f'model_name="{model}"' in labels and name in ("ts_inference_latency_microseconds",
                                                              "ts_queue_latency_microseconds"):
                out["frontend" if "inference" in name else "queue"] += value / 1000
        # A worker's metric line may reach more than one log file: count each line once.
        texts = [path.read_text(errors="replace") for path in logs.glob("*.log")]
        lines = {m[0]: m for text in texts for m in TS_LOG_METRIC.finditer(text) if f"ModelName:{model}," in m[3] + ","}
        for m in lines.values():
            key = {"PreprocessTime": "decode", "ForwardTime": "forward", "HandlerTime": "handler"}[m[1]]
            out[key] = out.get(key, 0.0) + float(m[2])
            out["batches"] = out.get("batches", 0) + (m[1] == "HandlerTime")
        return out

    return probe


KSERVE_LATENCY = re.compile(r"preprocess_ms: ([\d.]+), explain_ms: [\d.]+, predict_ms: ([\d.]+), "
                            r"postprocess_ms: ([\d.]+)")


def kserve_probe(server: KServeRuntime) -> Callable[[], dict[str, float]]:
    """Cumulative ms per stage from KServe's latency log (every worker process writes it; its /metrics
    histograms are per process, and a scrape reaches one)."""
    log = server.workdir / "kserve.out"

    def probe() -> dict[str, float]:
        out = {"decode": 0.0, "queue+forward": 0.0, "answer": 0.0}
        for pre, pred, post in KSERVE_LATENCY.findall(log.read_text(errors="replace") if log.exists() else ""):
            out["decode"] += float(pre)
            out["queue+forward"] += float(pred)
            out["answer"] += float(post)
        return out

    return probe


def no_probe() -> dict[str, float]:
    return {}


def in_process_limit(model_dir: Path, photos: list[bytes], duration: float) -> dict:
    """Images/s of decode + preprocess + forward, batch 8, on PyTorch in fp32, native bf16 and int8 and on
    each ONNX engine the export admitted (``admitted_engines``), laid out two ways:
    one process on every core (torch threads = cores, decoding on a thread pool of that size), and one
    single-threaded process per core running side by side (their images/s summed; on small CPUs that beats
    one process, whose threads wait on each other at every layer). ``best`` (the limit) is the best engine
    and precision over both layouts, int8 aside; int8 is printed beside, since it is served
    only where the export offered it."""
    cores = usable_cpus()
    one_process = _limit_rates(model_dir, photos, duration, cores)
    ctx = multiprocessing.get_context("spawn")  # a fresh torch per process; fork would copy this one's threads
    with ctx.Manager() as manager, ProcessPoolExecutor(cores, mp_context=ctx) as pool:
        start_together = manager.Barrier(cores)
        parts = list(pool.map(_limit_rates, *zip(*[(model_dir, photos, duration, 1, start_together)] * cores)))
    rates = {name: round(sum(part[name][0] for part in parts), 2) for name in one_process}
    layouts = {"one_process": {name: rate for name, (rate, _) in one_process.items()}, "process_per_core": rates}
    best_name, best = max(((name, rate) for layout in layouts.values() for name, rate in layout.items()
                           if name != "int8"), key=lambda item: item[1])
    # CPU time per image of a single-threaded process: what an image costs whatever share of the cores the
    # process got, so it holds on a shared machine where images/s does not.
    cpu_ms = {name: round(sum(part[name][1] for part in parts) / len(parts), 2) for name in one_process}
    return {"images_per_s": layouts, "best": best, "best_precision": best_name,
            "cpu_ms_per_image": cpu_ms, "cores": cores, "batch": LIMIT_BATCH}


def _limit_rates(model_dir: Path, photos: list[bytes], duration: float, threads: int,
                 start_together: Any = None) -> dict[str, tuple[float, float]]:
    """In this process with ``threads`` torch threads: (images/s, CPU ms per image) per precision
    (see ``in_process_limit``)."""
    torch.set_num_threads(threads)
    meta = read_json(model_dir / "metadata.json")
    cpu = torch.device("cpu")
    model = models.build_model(meta, model_dir / "model.pt", cpu)
    preprocess = Preprocessor(meta["preprocess"])
    calibration = [torch.stack([preprocess(b) for b in photos[:32]])]
    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "fp32": lambda x: models.forward(model, x, cpu, None),
        **({"bf16": lambda x: models.forward(model, x, cpu, torch.bfloat16)} if precision.native_bf16(cpu) else {}),
        **{f"{engine.name} {engine.precision}": engine.run for engine in admitted_engines(meta, model_dir)}}
    try:
        int8 = models.quantize_int8(meta, model, calibration)
        variants["int8"] = lambda x: models.forward(int8, x, cpu, None)
    except Exception as e:  # noqa: BLE001 -- fx cannot trace every arch (timm's same-padding convs): no int8
        print(f"in-process limit: no int8 for {meta['arch']} ({type(e).__name__})", flush=True)
    rates = {}
    with ThreadPoolExecutor(threads) as decoders:
        for name, forward in variants.items():
            batches = itertools.cycle(range(0, len(photos) - LIMIT_BATCH + 1, LIMIT_BATCH))
            forward(torch.stack(list(decoders.map(preprocess, photos[:LIMIT_BATCH]))))  # warm-up
            if start_together is not None:
                start_together.wait()
            images, start_time, start_cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start_time < duration:
                i = next(batches)
                x = torch.stack(list(decoders.map(preprocess, photos[i:i + LIMIT_BATCH])))
                forward(x)
                images += len(x)
            rates[name] = (round(images / (time.perf_counter() - start_time), 2),
                           round((time.process_time() - start_cpu) * 1000 / images, 2))
    return rates


def admitted_engines(meta: dict, model_dir: Path) -> list[engines.Engine]:
    """The graph engines the export admitted for this model (in the precision a worker would choose), with this
    process's torch threads: a model without ``model.onnx`` (the random one) has none."""
    admitted = [name for name in engines.GRAPH_ENGINES if engines.refusal(name, meta, model_dir) is None]
    chosen = [engines.choose(meta, model_dir, model_dir / "model.pt", torch.device("cpu"), name).engine
              for name in admitted]
    return [engine for engine in chosen if engine.name != engines.TORCH]  # torch: the engine did not load


def build_store(work: Path, model_dir: Path | None, variants: list[str]) -> tuple[Path, Path]:
    """The same model archived once per TorchServe variant (handler file and model-config differ); the
    runtime variants serve the "ours" archive. (store, model dir)."""
    if model_dir:
        paths = RunPaths(model_dir.parent)
    else:
        paths = export_random_model(work / "run", ["ants", "bees"], arch="resnet18")
        meta = read_json(paths.model / "metadata.json")
        if precision.native_bf16(torch.device("cpu")):  # what the export records for a model whose bf16 answers hold
            meta["serve_precision"] = {"choice": "bf16", "note": "bench/serve.py: random weights, bf16 assumed"}
        meta["trust"] = random_trust(paths.model, meta)
        atomic_write_json(paths.model / "metadata.json", meta)
    store = work / "model-store"
    for name in dict.fromkeys([SERVED_MODEL if name in RUNTIME_VARIANTS else name for name in variants]):
        handler, options, overrides = VARIANTS[name]
        source = without_trust(paths, work / "run-notrust") if name == TRUSTLESS else paths
        archive_as(load_config(None, overrides), source, store, name, handler=handler, handler_options=options)
    return store, paths.model


def random_trust(model_dir: Path, meta: dict) -> dict:
    """Calibration and a kNN bank of the largest size the export writes (trust.DEFAULT_MAX_BANK rows): what
    scoring costs does not depend on the features' values, so random ones of the model's width do."""
    width = models.head_module(models.create(meta["arch"], meta["num_classes"])).in_features
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(trust.DEFAULT_MAX_BANK) % meta["num_classes"]
    fitted = trust.Trust.fit(torch.randn(len(labels), width, generator=g), labels,
                             torch.randn(64, width, generator=g), torch.randn(64, meta["num_classes"], generator=g),
                             labels[:64])
    return fitted.save(model_dir)


def without_trust(paths: RunPaths, dest: Path) -> RunPaths:
    """A copy of the exported run whose metadata.json has no trust fields."""
    (dest / "model").mkdir(parents=True, exist_ok=True)
    for f in paths.model.iterdir():
        if f.name != "metadata.json":
            link_or_copy(f, dest / "model" / f.name)
    meta = read_json(paths.model / "metadata.json")
    meta.pop("trust", None)
    atomic_write_json(dest / "model" / "metadata.json", meta)
    return RunPaths(dest)


def archive_settings(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


@dataclass
class MLServer(Server):
    """bench/mlserver_runtime.py under ``mlserver start`` (measured for the runtime choice only)."""

    port: int

    NAME = "MLServer"
    LOGS = ("mlserver.out",)

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self, models: list[str]) -> bool:
        try:
            return all(requests.get(f"{self.inference_url}/v2/models/{m}/ready", timeout=5).status_code == 200
                       for m in models)
        except requests.RequestException:
            return False


def mlserver_settings(folder: Path, model_dir: Path, name: str, ports: list[int], plan: scheduler.ServingPlan) -> Path:
    """MLServer's settings for ``model_dir`` served as ``name`` (``ports``: HTTP, gRPC, metrics)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "http_port": ports[0], "grpc_port": ports[1], "metrics_port": ports[2], "host": "127.0.0.1",
        "parallel_workers": plan.workers, "debug": False}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": "bench.mlserver_runtime.ClassifierRuntime",
        "max_batch_size": plan.batch_size, "max_batch_time": plan.max_batch_delay_ms / 1000,
        "parameters": {"uri": str(model_dir), "version": "1.0"}}))
    return folder


def start_mlserver(python: str, model_dir: Path, workdir: Path) -> MLServer:
    workdir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3)
    mlserver_settings(workdir / "settings", model_dir, SERVED_MODEL, ports, scheduler.serving_plan())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    mlserver = str(Path(python).parent / "mlserver")
    with open(workdir / "mlserver.out", "ab") as out:
        proc = subprocess.Popen([mlserver, "start", str(workdir / "settings")], cwd=workdir, env=env, stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    return MLServer(proc, workdir, "127.0.0.1", ports[0])


def started(servers: dict[str, Server], name: str, start_server: Callable[[], Server], models: list[str],
            startup: dict[str, float]) -> None:
    """Start a server, wait until its models answer, record how long that took."""
    t0 = time.perf_counter()
    servers[name] = start_server()
    servers[name].wait_ready(models, timeout=300)
    startup[name] = round(time.perf_counter() - t0, 1)
    print(f"{name} ready in {startup[name]} s", flush=True)


def targets(servers: dict[str, Server], variants: list[str]) -> dict[str, Target]:
    out = {}
    for name in variants:
        if name in RUNTIME_VARIANTS:
            runtime, body = RUNTIME_VARIANTS[name]
            server = servers[runtime]
            path = f"/v2/models/{SERVED_MODEL}/infer" if body == "v2" else f"/predictions/{SERVED_MODEL}"
            probe = (kserve_probe(server) if isinstance(server, KServeRuntime) else
                     torchserve_probe(server, SERVED_MODEL) if isinstance(server, TorchServe) else no_probe)
            out[name] = Target(server.inference_url + path, server.auth(), v2_body if body == "v2" else raw, probe,
                               server.process.pid)
        else:
            ts = servers["torchserve"]
            assert isinstance(ts, TorchServe)
            out[name] = Target(f"{ts.inference_url}/predictions/{name}", ts.auth(), raw, torchserve_probe(ts, name),
                               ts.process.pid)
    return out


def measure(targets: dict[str, Target], levels: list[int], photos: list[bytes], duration: float,
            warmup: float, rounds: int) -> dict[str, dict]:
    """Rounds alternate the variants, so load from anything else on the machine hits all of them alike."""
    cells: dict[str, dict] = {}
    for c in levels:
        acc = {name: Cell() for name in targets}
        for target in targets.values():
            run_load(target, photos, c, warmup, Cell())
        for _ in range(rounds):
            for name, target in targets.items():
                run_load(target, photos, c, duration / rounds, acc[name])
        for name in targets:
            cells[f"{name}@{c}"] = {"variant": name, "concurrency": c, **acc[name].summary()}
            print(json.dumps(cells[f"{name}@{c}"]), flush=True)
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per (variant, concurrency) cell")
    ap.add_argument("--limit-duration", type=float, default=None, help="seconds per limit measurement "
                    "(default: half of --duration)")
    ap.add_argument("--rounds", type=int, default=3, help="each cell's duration is split into this many rounds")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed load per variant and concurrency")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    ap.add_argument("--variants", default="ours,stock,kserve",
                    help=f"comma-separated, from {', '.join([*VARIANTS, *RUNTIME_VARIANTS])}")
    ap.add_argument("--photos", default="pets,hymenoptera,12mp", help="comma-separated photo sets")
    ap.add_argument("--model-dir", type=Path, default=None, help="an exported model/ folder (default: random)")
    ap.add_argument("--kserve-python", default=sys.executable, help="interpreter with kserve installed")
    ap.add_argument("--mlserver-python", default=None, help="interpreter with mlserver installed (mlserver-v2)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = ap.parse_args()
    sets = photo_sets(args.photos.split(","))
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = list(dict.fromkeys(args.variants.split(",") + ["stock"]))
    limit_duration = args.limit_duration or args.duration / 2
    load_before = os.getloadavg()[0]
    servers: dict[str, Server] = {}
    startup: dict[str, float] = {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, contextlib.ExitStack() as stop_all:
        store, model_dir = build_store(Path(tmp), args.model_dir, variants)
        ts_names = [n for n in variants if n not in RUNTIME_VARIANTS]
        settings = {name: archive_settings(store / f"{name}.mar") for name in ts_names}
        limits = {name: [in_process_limit(model_dir, photos, limit_duration)] for name, photos in sets.items()}
        stop_all.callback(lambda: [s.stop(timeout=15) for s in servers.values()])
        started(servers, "torchserve", lambda: start(store, Path(tmp) / "ts", ports=unused_ports(),
                                                     models=machine_models(store)), ts_names, startup)
        runtimes = {RUNTIME_VARIANTS[n][0] for n in variants if n in RUNTIME_VARIANTS}
        single = Path(tmp) / "single-store"  # the "ours" archive alone, for the other runtimes
        single.mkdir()
        (single / f"{SERVED_MODEL}.mar").symlink_to(store / f"{SERVED_MODEL}.mar")
        if "kserve" in runtimes:
            started(servers, "kserve", lambda: start_kserve(single, Path(tmp) / "ks", port=free_ports(1)[0],
                                                            python=args.kserve_python), [SERVED_MODEL], startup)
        captured = CaptureSettings(Path(tmp) / "captured", sample=1.0, **CAPTURE_CAP)
        if "torchserve-capture" in runtimes:
            started(servers, "torchserve-capture",
                    lambda: start(single, Path(tmp) / "ts-capture", ports=unused_ports(), models=machine_models(single),
                                  environ=captured.environ()), [SERVED_MODEL], startup)
        if "mlserver" in runtimes:
            if not args.mlserver_python:
                raise SystemExit("mlserver-v2 needs --mlserver-python (a venv with mlserver==1.7.1 and uvloop<0.22)")
            started(servers, "mlserver", lambda: start_mlserver(args.mlserver_python, model_dir, Path(tmp) / "ml"),
                    [SERVED_MODEL], startup)
        for name, photos in sets.items():
            print(f"--- {name}: {len(photos)} photos, {sum(map(len, photos)) // len(photos) // 1024} KiB on average",
                  flush=True)
            cells = measure(targets(servers, variants), levels, photos, args.duration, args.warmup, args.rounds)
            results[name] = {"photos": len(photos), "mean_bytes": sum(map(len, photos)) // len(photos),
                             "cells": cells}
            if "torchserve-capture" in servers:
                results[name]["capture_folder"] = capture_folder(captured, servers["torchserve-capture"])
        stop_all.close()
        for name, photos in sets.items():
            limits[name].append(in_process_limit(model_dir, photos, limit_duration))
    for name, result in results.items():
        limit = round(sum(li["best"] for li in limits[name]) / len(limits[name]), 2)
        result.update(limit_images_per_s=limit, limits=limits[name])
        limit_cpu = sum(li["cpu_ms_per_image"][li["best_precision"]] for li in limits[name]) / len(limits[name])
        result["limit_cpu_ms_per_image"] = round(limit_cpu, 2)
        for cell in result["cells"].values():
            cell["served_over_limit"] = round(cell["requests_per_s"] / limit, 3) if cell["requests_per_s"] else None
            # The same ratio in CPU time (server + load generator per request against the limit's per image):
            # what served/limit would be on a machine of our own, where the shares of the cores do not move.
            spent = (cell["server_cpu_ms"] or 0) + (cell["client_cpu_ms"] or 0)
            cell["cpu_over_limit"] = round(limit_cpu / spent, 3) if spent else None
            cell["p99_over_p50"] = round(cell["p99_ms"] / cell["p50_ms"], 2) if cell["p50_ms"] else None
        result["vs_stock"] = {f"{v}@{c}": ratio(result["cells"][f"{v}@{c}"], result["cells"][f"stock@{c}"])
                              for v in variants if v != "stock" for c in levels}
    result_doc = {"duration_s": args.duration, "rounds": args.rounds,
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                              "cpu_flags": cpu_flags(), "torch": torch.__version__,
                              "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
                  "serving_plan": scheduler.serving_plan().__dict__, "startup_s": startup,
                  "model_config": settings, "photo_sets": results}
    atomic_write_json(args.out, result_doc)
    print(f"flags: {cpu_flags() or 'none'}; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"startup (s): {startup}")
    for name, result in results.items():
        print(f"{name}: limit {result['limit_images_per_s']} img/s, {result['limit_cpu_ms_per_image']} CPU ms/img "
              f"({result['limits'][0]['best_precision']}: the best engine and precision, best of 1 process x "
              f"{usable_cpus()} threads and {usable_cpus()} processes x 1 thread)")
        for key, cell in result["cells"].items():
            print(f"  {key}: {cell['requests_per_s']} img/s = {cell['served_over_limit']} of the limit "
                  f"({cell['cpu_over_limit']} in CPU time), p50 {cell['p50_ms']} ms, p99 {cell['p99_ms']} ms, CPU "
                  f"ms/req server {cell['server_cpu_ms_by_program']} client {cell['client_cpu_ms']}, "
                  f"stages {cell['stages_ms_per_request']}")
        for cell, r in result["vs_stock"].items():
            print(f"  {cell} vs stock: throughput x{r['throughput']}, p50 x{r['p50']}, p99 x{r['p99']}")
        for c in (c for c in levels if f"ours-torch@{c}" in result["cells"] and f"ours@{c}" in result["cells"]):
            auto, on_torch = (result["cells"][f"{v}@{c}"]["requests_per_s"] for v in ("ours", "ours-torch"))
            print(f"  serve_backend auto / torch @{c}: {auto} / {on_torch} img/s = "
                  f"{round(auto / on_torch, 3) if auto and on_torch else None}")
        if "capture_folder" in result:
            for c in (c for c in levels if f"ours@{c}" in result["cells"]):
                on, off = (result["cells"][f"{v}@{c}"]["requests_per_s"] for v in ("ours-capture", "ours"))
                print(f"  capture on / off @{c}: {on} / {off} img/s = {round(on / off, 3) if on and off else None}")
            print(f"  capture folder after the load: {result['capture_folder']}")
    print(f"saved {args.out}")


def capture_folder(settings: CaptureSettings, server: Server) -> dict[str, Any]:
    """The capture folder after the load, against its cap, and what the server says it dropped."""
    files = [f for f in settings.folder.rglob("*") if f.is_file() and not f.name.startswith(".")]
    dropped = {labels.split('reason="')[1].split('"')[0]: value
               for name, labels, value in prometheus(f"{server.metrics_url}/metrics")
               if name == CAPTURE_DROPPED and 'reason="' in labels}
    doc = {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "max_files": settings.max_files,
           "max_bytes": settings.max_bytes, "dropped": dropped}
    doc["within_cap"] = doc["files"] <= settings.max_files and doc["bytes"] <= settings.max_bytes
    return doc


def cpu_flags() -> list[str]:
    """The CPU's bf16/AMX flags, the ones that decide the best precision."""
    flags = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= {f for f in line.split(":", 1)[1].split() if f.startswith("amx") or f == "avx512_bf16"}
    return sorted(flags)


def ratio(ours: dict, stock: dict) -> dict:
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {"throughput": div(ours["requests_per_s"], stock["requests_per_s"]),
            "p50": div(ours["p50_ms"], stock["p50_ms"]), "p99": div(ours["p99_ms"], stock["p99_ms"])}


if __name__ == "__main__":
    main()
