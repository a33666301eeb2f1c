"""Serving benchmark: our handler vs a stock-style handler, same model, same TorchServe, real HTTP.

    .venv/bin/python bench/serve.py [--duration 30] [--concurrency 1,8] [--variants ours,stock]
                                    [--images DIR] [--model-dir RUN/model]

Every variant is the same model archived with a different handler / model-config, all in one model
store and one TorchServe (only the variant under test receives traffic). Each (variant, concurrency)
cell sends real photos as raw request bodies from ``concurrency`` closed-loop client threads; the
cell's time is split into rounds that alternate the variants, so other load on the machine hits them
alike. Reported: requests/s, p50/p99 latency, and ratios against "stock" (bench/stock_handler.py:
PIL + torchvision.transforms per image, fp32, batchSize 1, torch's default threads). The ablation
variants (ours-allthreads, ours-2workers, stock-1thread) separate thread count from batching.
Results: bench/results/serve.json. Without --model-dir the model is a random-weight resnet18 (speed
does not depend on the weights). The load generator runs on the same machine as the server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared test helpers build models and archives

from torchserve_fixture import archive_as, export_random_model  # noqa: E402

from jobs.config import RunPaths, load_config  # noqa: E402
from jobs.fileio import atomic_write_json  # noqa: E402
from jobs.serve import Ports, TorchServe, start  # noqa: E402

SHARED_VAL = REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"
FIXTURES = REPO / "tests" / "fixtures" / "hymenoptera_small"
STOCK = REPO / "bench" / "stock_handler.py"
# name -> (handler file, model-config handler options, job-config overrides); "stock" is the baseline.
# The -Nthread/-2workers variants separate the effect of thread count from batching and preprocessing.
VARIANTS: dict[str, tuple[Path | None, dict, dict]] = {
    "ours": (None, {}, {}),
    "ours-allthreads": (None, {"torch_threads": 0}, {}),
    "ours-2workers": (None, {}, {"min_workers": 2, "max_workers": 2}),
    "stock": (STOCK, {}, {"serve_batch_size": 1, "max_batch_delay_ms": 0}),
    "stock-1thread": (STOCK, {"torch_threads": 1}, {"serve_batch_size": 1, "max_batch_delay_ms": 0}),
}


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


def build_store(work: Path, model_dir: Path | None, variants: list[str]) -> Path:
    """The same model archived once per variant (handler file and model-config differ)."""
    paths = RunPaths(model_dir.parent) if model_dir else export_random_model(work / "run", ["ants", "bees"])
    store = work / "model-store"
    for name in variants:
        handler, options, overrides = VARIANTS[name]
        archive_as(load_config(None, overrides), paths, store, name, handler=handler, handler_options=options)
    return store


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
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        store = build_store(Path(tmp), args.model_dir, variants)
        settings = {name: archive_settings(store / f"{name}.mar") for name in variants}
        server = start(store, Path(tmp) / "state", ports=Ports.free())
        try:
            server.wait_ready(variants)
            cells = measure(server, variants, levels, photos, args.duration, args.warmup, args.rounds)
        finally:
            server.stop()
    ratios = {f"{name}@{c}": ratio(cells[f"{name}@{c}"], cells[f"stock@{c}"])
              for name in variants if name != "stock" for c in levels}
    result = {"images": str(args.images), "photos": len(photos), "duration_s": args.duration, "rounds": args.rounds,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__},
              "model_config": settings, "cells": cells, "vs_stock": ratios}
    atomic_write_json(args.out, result)
    for cell, r in ratios.items():
        print(f"{cell} vs stock: throughput x{r['throughput']}, p50 x{r['p50']}, p99 x{r['p99']}")
    print(f"saved {args.out}")


def ratio(ours: dict, stock: dict) -> dict:
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {"throughput": div(ours["requests_per_s"], stock["requests_per_s"]),
            "p50": div(ours["p50_ms"], stock["p50_ms"]), "p99": div(ours["p99_ms"], stock["p99_ms"])}


if __name__ == "__main__":
    main()
