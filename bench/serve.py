"""Serving benchmark: served throughput against the machine's own in-process limit, and our handler
against a stock-style handler, same model, same photos, one TorchServe, real HTTP.

    .venv/bin/python -m bench.serve [--duration 30] [--concurrency 1,8] [--variants ours,stock]
                                    [--images DIR] [--model-dir RUN/model]

**The limit** is measured without TorchServe, before and after the served cells: the same model and
photos, decode + preprocess + forward (handler/service.py, what the handler runs), batch 8, every core,
in the best precision the machine has (fp32, and bf16 autocast where it is native), and the better
of two layouts: one process with torch threads = cores, or one single-threaded process per core side
by side. ``served/limit`` = served images/s over that.

**The served cells**: every variant is the same model archived with a different handler /
model-config, all in one model store and one TorchServe (only the variant under test receives
traffic). Each (variant, concurrency) cell sends real photos as raw request bodies from
``concurrency`` closed-loop client threads; its time is split into rounds that alternate the
variants, so other load on the machine hits them alike. Variants:
  * ours: workers and batching chosen by ``jobs serve`` for this machine (handler.scheduler.serving_plan);
  * ours-archived: the archive's old fixed values (1 worker, batchSize 8, maxBatchDelay 20 ms);
  * ours-1worker-allthreads: one worker on every core (latency at c=1 against throughput at c=8);
  * stock: bench/stock_handler.py (PIL + torchvision.transforms per image, fp32, batchSize 1,
    torch's default threads), the baseline of every ratio; stock-1thread: the same on 1 thread.
Results: bench/results/serve.json. Without --model-dir the model is a random-weight resnet18 (speed
does not depend on the weights). The load generator runs on the same machine as the server.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import yaml

from handler import model as models
from handler import precision, scheduler
from handler.cpus import usable_cpus
from handler.preprocess import Preprocessor
from jobs.config import RunPaths, load_config
from jobs.fileio import atomic_write_json, read_json
from jobs.serve import TorchServe, machine_models, start
from tests.torchserve_fixture import archive_as, export_random_model, unused_ports

REPO = Path(__file__).resolve().parents[1]

SHARED_VAL = REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"
FIXTURES = REPO / "tests" / "fixtures" / "hymenoptera_small"
STOCK = REPO / "bench" / "stock_handler.py"
# name -> (handler file, model-config handler options, job-config overrides); "stock" is the baseline.
# The -Nthread/-2workers variants separate the effect of thread count from batching and preprocessing.
ARCHIVED = {"serve_tuning": "archive"}
VARIANTS: dict[str, tuple[Path | None, dict, dict]] = {
    "ours": (None, {}, {}),
    "ours-archived": (None, {}, {**ARCHIVED, "min_workers": 1, "max_workers": 1, "serve_batch_size": 8,
                                 "max_batch_delay_ms": 20}),
    "ours-1worker-allthreads": (None, {"torch_threads": os.cpu_count()}, {
        **ARCHIVED, "min_workers": 1, "max_workers": 1, "serve_batch_size": 8, "max_batch_delay_ms": 1}),
    "stock": (STOCK, {}, {**ARCHIVED, "serve_batch_size": 1, "max_batch_delay_ms": 0}),
    "stock-1thread": (STOCK, {"torch_threads": 1}, {**ARCHIVED, "serve_batch_size": 1, "max_batch_delay_ms": 0}),
}
LIMIT_BATCH = 8


def load_photos(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise SystemExit(f"no photos under {folder}")
    return [f.read_bytes() for f in files]


@dataclass
class Cell:
    """Accumulated measurements of one (variant, concurrency) over its rounds."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0

    def summary(self) -> dict:
        lat = np.array(self.latencies) * 1000
        return {"duration_s": round(self.wall, 2), "requests": len(lat), "errors": self.errors,
                "requests_per_s": round(len(lat) / self.wall, 2) if self.wall else None,
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


def run_load(server: TorchServe, model: str, photos: list[bytes], concurrency: int, duration: float,
             cell: Cell) -> None:
    """``concurrency`` closed-loop clients for ``duration`` s, each sending the next photo as a raw body."""
    url = f"{server.inference_url}/predictions/{model}"
    headers = server.auth()
    counter = itertools.count()
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                body = photos[next(counter) % len(photos)]
                t0 = time.perf_counter()
                ok = session.post(url, data=body, headers=headers, timeout=120).status_code == 200
                elapsed = time.perf_counter() - t0
                with lock:
                    if ok:
                        cell.latencies.append(elapsed)
                    else:
                        cell.errors += 1

    start_time = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    cell.wall += time.perf_counter() - start_time


def in_process_limit(model_dir: Path, photos: list[bytes], duration: float) -> dict:
    """Images/s of decode + preprocess + forward, batch 8, in fp32, native bf16 and int8, laid out two ways:
    one process on every core (torch threads = cores, decoding on a thread pool of that size), and one
    single-threaded process per core running side by side (their images/s summed; on small CPUs that beats
    one process, whose threads wait on each other at every layer). ``best`` (the limit) is the best of
    fp32 and bf16 over both layouts, as the issue defines it; int8 is printed beside, since it is served
    only where the export offered it."""
    cores = usable_cpus()
    one_process = _limit_rates(model_dir, photos, duration, cores)
    ctx = multiprocessing.get_context("spawn")  # a fresh torch per process; fork would copy this one's threads
    with ctx.Manager() as manager, ProcessPoolExecutor(cores, mp_context=ctx) as pool:
        start_together = manager.Barrier(cores)
        parts = list(pool.map(_limit_rates, *zip(*[(model_dir, photos, duration, 1, start_together)] * cores)))
    per_core = {name: round(sum(part[name] for part in parts), 2) for name in one_process}
    best = max(rate for layout in (one_process, per_core) for name, rate in layout.items() if name != "int8")
    return {"images_per_s": {"one_process": one_process, "process_per_core": per_core}, "best": best,
            "cores": cores, "batch": LIMIT_BATCH}


def _limit_rates(model_dir: Path, photos: list[bytes], duration: float, threads: int,
                 start_together: Any = None) -> dict[str, float]:
    """In this process with ``threads`` torch threads: images/s per precision (see ``in_process_limit``)."""
    torch.set_num_threads(threads)
    meta = read_json(model_dir / "metadata.json")
    cpu = torch.device("cpu")
    model = models.build_model(meta, model_dir / "model.pt", cpu)
    preprocess = Preprocessor(meta["preprocess"])
    calibration = [torch.stack([preprocess(b) for b in photos[:32]])]
    variants = {"fp32": (model, None), **({"bf16": (model, torch.bfloat16)} if precision.native_bf16(cpu) else {}),
                "int8": (models.quantize_int8(meta, model, calibration), None)}
    rates = {}
    with ThreadPoolExecutor(threads) as decoders:
        for name, (net, dtype) in variants.items():
            batches = itertools.cycle(range(0, len(photos) - LIMIT_BATCH + 1, LIMIT_BATCH))
            models.forward(net, torch.stack(list(decoders.map(preprocess, photos[:LIMIT_BATCH]))), cpu,
                                   dtype)  # warm-up
            if start_together is not None:
                start_together.wait()
            images, start_time = 0, time.perf_counter()
            while time.perf_counter() - start_time < duration:
                i = next(batches)
                x = torch.stack(list(decoders.map(preprocess, photos[i:i + LIMIT_BATCH])))
                models.forward(net, x, cpu, dtype)
                images += len(x)
            rates[name] = round(images / (time.perf_counter() - start_time), 2)
    return rates


def build_store(work: Path, model_dir: Path | None, variants: list[str]) -> tuple[Path, Path]:
    """The same model archived once per variant (handler file and model-config differ); (store, model dir)."""
    paths = RunPaths(model_dir.parent) if model_dir else export_random_model(work / "run", ["ants", "bees"])
    store = work / "model-store"
    for name in variants:
        handler, options, overrides = VARIANTS[name]
        archive_as(load_config(None, overrides), paths, store, name, handler=handler, handler_options=options)
    return store, paths.model


def archive_settings(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def measure(server: TorchServe, variants: list[str], levels: list[int], photos: list[bytes], duration: float,
            warmup: float, rounds: int) -> dict[str, dict]:
    """Rounds alternate the variants, so load from anything else on the machine hits all of them alike."""
    cells: dict[str, dict] = {}
    for c in levels:
        acc = {name: Cell() for name in variants}
        for name in variants:
            run_load(server, name, photos, c, warmup, Cell())
        for _ in range(rounds):
            for name in variants:
                run_load(server, name, photos, c, duration / rounds, acc[name])
        for name in variants:
            cells[f"{name}@{c}"] = {"variant": name, "concurrency": c, **acc[name].summary()}
            print(json.dumps(cells[f"{name}@{c}"]), flush=True)
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per (variant, concurrency) cell")
    ap.add_argument("--rounds", type=int, default=3, help="each cell's duration is split into this many rounds")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed load per variant and concurrency")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    ap.add_argument("--variants", default="ours,stock", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--images", type=Path, default=SHARED_VAL if SHARED_VAL.is_dir() else FIXTURES)
    ap.add_argument("--model-dir", type=Path, default=None, help="an exported model/ folder (default: random)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = ap.parse_args()
    photos = load_photos(args.images)
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = list(dict.fromkeys(args.variants.split(",") + ["stock"]))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        store, model_dir = build_store(Path(tmp), args.model_dir, variants)
        settings = {name: archive_settings(store / f"{name}.mar") for name in variants}
        limits = [in_process_limit(model_dir, photos, args.duration / 2)]
        print(f"in-process limit (before): {json.dumps(limits[0])}", flush=True)
        models = machine_models(store)  # what `jobs serve` sets for the archives that leave it open
        server = start(store, Path(tmp) / "state", ports=unused_ports(), models=models)
        try:
            server.wait_ready(variants)
            cells = measure(server, variants, levels, photos, args.duration, args.warmup, args.rounds)
        finally:
            server.stop()
        limits.append(in_process_limit(model_dir, photos, args.duration / 2))
        print(f"in-process limit (after): {json.dumps(limits[1])}", flush=True)
    limit = round(sum(li["best"] for li in limits) / len(limits), 2)
    for cell in cells.values():
        cell["served_over_limit"] = round(cell["requests_per_s"] / limit, 3) if cell["requests_per_s"] else None
        cell["p99_over_p50"] = round(cell["p99_ms"] / cell["p50_ms"], 2) if cell["p50_ms"] else None
    ratios = {f"{name}@{c}": ratio(cells[f"{name}@{c}"], cells[f"stock@{c}"])
              for name in variants if name != "stock" for c in levels}
    result = {"images": str(args.images), "photos": len(photos), "duration_s": args.duration, "rounds": args.rounds,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "cpu_flags": cpu_flags(), "torch": torch.__version__,
                          "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
              "serving_plan": scheduler.serving_plan().__dict__, "limit_images_per_s": limit, "limits": limits,
              "model_config": settings, "cells": cells, "vs_stock": ratios}
    atomic_write_json(args.out, result)
    print(f"limit {limit} img/s (fp32/bf16 best of 1 process x {usable_cpus()} threads and {usable_cpus()} "
          f"processes x 1 thread); flags: {cpu_flags() or 'none'}; "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    for key, cell in cells.items():
        print(f"{key}: {cell['requests_per_s']} img/s = {cell['served_over_limit']} of the limit, "
              f"p50 {cell['p50_ms']} ms, p99/p50 {cell['p99_over_p50']}")
    for cell, r in ratios.items():
        print(f"{cell} vs stock: throughput x{r['throughput']}, p50 x{r['p50']}, p99 x{r['p99']}")
    print(f"saved {args.out}")


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
