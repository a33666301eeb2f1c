"""Issue 27: what the job needs at 1 M and 10 M photos, carried from what each of its parts costs as the photos grow.

Photos at those counts are not at hand, nor the days a 2-core backbone would take over them, so every part of the
job whose cost grows with the photo count is measured on its own, on simulated inputs at growing sizes, its growth
fitted as a power of n between the two largest sizes, and carried to 1 M and 10 M photos:

- **the run's file list**: ``clean_report.json`` of n entries shaped as a real one, written as clean writes it and
  read as every later stage reads it: seconds, file size, and the Python heap the read takes (tracemalloc);
- **the pHash pair search** (``jobs.audit.hash_pairs``, radius 8) on n uniform random pHashes, and once on the real
  pHashes of the 100,000-photo scale run (``--phashes``, its clean_report.json) to see how much more real ones cost;
- **the label check** (``jobs.audit.out_of_fold_probabilities``: 5 folds of the written-out logistic head) on n x
  1,280 float32 features of 8 separable classes: seconds and peak heap;
- **the neighbour search**, exact and HNSW, from ``bench/results/audit_index-cpu.json`` (5,000 to 100,000 photos);
- **the job's stages** from ``bench.scale``'s results on the same machine (``--scale-results``; by default the AMX
  Xeon's 5,000, 25,000 and 100,000-photo runs): each stage's wall time and peak RSS.

Prints the measurements, then per part the fitted growth and the projection, and writes
``bench/results/sizing-cpu.json``. docs/sizing.md turns them into the sizing table.

    python -m bench.sizing [--sizes 25000 50000 100000 200000] [--phashes RUN/clean_report.json]
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import RESULTS, save_result
from jobs import audit
from jobs.fileio import atomic_write_json, read_json

TARGETS = (1_000_000, 10_000_000)
FEATURE_DIM = 1280  # EfficientNet-Lite0's pooled features, the scale runs' backbone


def _measured(fn: Callable, *args) -> tuple[object, float, float]:
    """(result, wall seconds, peak MiB of Python heap above the start) of ``fn(*args)``."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, round(wall, 2), round(peak / 2**20, 1)


def report_entry(i: int) -> dict:
    """One clean_report.json file entry with a real one's fields and sizes (its own names and hashes)."""
    digest = f"{i:064x}"
    name = f"class{i % 8}/photo_{i:09d}.jpg"
    return {"source": name, "label": f"class{i % 8}", "sha256": digest, "status": "kept", "reason": "", "detail": "",
            "output": f"dataset/{name}", "width": 500, "height": 375, "format": "JPEG", "mode": "RGB",
            "pixel_hash": digest[::-1], "stats": {
                "width": 500, "height": 375, "phash": f"{i * 2654435761 % 2**64:016x}", "brightness_p5": 0.0295,
                "brightness_p99": 1.0, "blurriness": 76.238, "gray_hist_std": 62.638, "entropy": 6.8436,
                "channel_spread_p99": 59.0, "aspect_ratio": 1.3333, "short_side": 375, "issues": []}}


def file_list(n: int, work: Path) -> dict:
    """Writing and reading a clean_report.json of ``n`` entries as the stages do."""
    path = work / f"clean_report-{n}.json"
    report = {"data": "/data", "data_hash": "0" * 64, "classes": {}, "files": [report_entry(i) for i in range(n)]}
    _, write_s, write_mib = _measured(atomic_write_json, path, report)
    del report
    _, read_s, read_mib = _measured(read_json, path)
    size = path.stat().st_size
    path.unlink()
    return {"write_s": write_s, "write_heap_mib": write_mib, "read_s": read_s, "read_heap_mib": read_mib,
            "file_mib": round(size / 2**20, 1)}


def phash_search(hashes: np.ndarray) -> dict:
    pairs, wall, heap = _measured(audit.hash_pairs, hashes, audit.DEFAULT_HASH_RADIUS)
    return {"seconds": wall, "heap_mib": heap, "pairs": len(pairs.i)}


def label_check(n: int, classes: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    feats = (rng.normal(size=(classes, FEATURE_DIM))[labels] * 0.3
             + rng.normal(size=(n, FEATURE_DIM))).astype(np.float32)
    _, wall, heap = _measured(audit.out_of_fold_probabilities, feats, labels)
    return {"seconds": wall, "heap_mib": heap, "features_mib": round(feats.nbytes / 2**20, 1)}


def growth(sizes: list[int], values: list[float]) -> float:
    """The exponent b of value ~ n^b between the two largest sizes (1 = linear, 2 = quadratic)."""
    (n0, v0), (n1, v1) = sorted(zip(sizes, values))[-2:]
    return math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(n1 / n0)


def projected(sizes: list[int], values: list[float], at: int) -> float:
    """``values`` carried from the largest size to ``at`` along the fitted power. A whole stage's fixed costs pull
    its power below 1, so docs/sizing.md carries each stage by its parts instead."""
    n1, v1 = max(zip(sizes, values))
    return v1 * (at / n1) ** growth(sizes, values)


def from_results(scale_results: list[Path]) -> dict:
    """What the other benchmarks measured: the neighbour search (audit_index) and the job's stages (scale)."""
    index = read_json(RESULTS / "audit_index-cpu.json")["runs"]
    scale_runs = [run for name in scale_results for run in read_json(name)["runs"]]
    per_photo = {}
    for run in scale_runs:
        n = run["photos"]
        for stage, figures in run["stages"].items():
            per_photo.setdefault(stage, {})[n] = {"wall_s": figures["wall_s"], "peak_rss_gib": figures["peak_rss_gib"],
                                                  "passes": figures.get("passes", 0),
                                                  "backbone_s": figures.get("backbone_s")}
    return {"neighbour_search": [{"photos": r["photos"], "exact_s": r["exact_wall_s"],
                                  "hnsw_s": r["approximate_wall_s"], "hnsw_mib": r["approximate_search"]["index_mib"]}
                                 for r in index],
            "stages": per_photo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--label-sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--phashes", type=Path, help="a clean_report.json whose real pHashes to search once")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-sizing"))
    parser.add_argument("--scale-results", type=Path, nargs="+",
                        default=[RESULTS / "scale-amx-cpu.json", RESULTS / "scale-100k-amx-cpu.json"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    measured: dict = {"file_list": {}, "phash_search_uniform": {}, "label_check": {}}
    for n in args.sizes:
        measured["file_list"][n] = file_list(n, args.work)
        measured["phash_search_uniform"][n] = phash_search(rng.integers(0, 2**64 - 1, n, dtype=np.uint64,
                                                                        endpoint=True))
        print(f"{n:>9,} photos: file list {measured['file_list'][n]}; pHash pairs (uniform) "
              f"{measured['phash_search_uniform'][n]}", flush=True)
    for n in args.label_sizes:
        measured["label_check"][n] = label_check(n)
        print(f"{n:>9,} photos: label check {measured['label_check'][n]}", flush=True)
    if args.phashes:
        files = read_json(args.phashes)["files"]
        real = audit.phash_array([f["stats"]["phash"] for f in files if f.get("stats")])
        uniform = rng.integers(0, 2**64 - 1, len(real), dtype=np.uint64, endpoint=True)
        measured["phash_search_real"] = {"photos": len(real), "real": phash_search(real),
                                         "uniform": phash_search(uniform)}
        print(f"real pHashes of {len(real):,} photos: {measured['phash_search_real']}", flush=True)
    earlier = from_results(args.scale_results)

    lines: dict[str, tuple[list[int], list[float], str]] = {}
    sizes = sorted(measured["file_list"])
    for key, unit in (("read_s", "s"), ("read_heap_mib", "MiB"), ("write_s", "s"), ("write_heap_mib", "MiB"),
                      ("file_mib", "MiB")):
        lines[f"file list {key}"] = sizes, [measured["file_list"][n][key] for n in sizes], unit
    lines["pHash pairs s (uniform)"] = sizes, [measured["phash_search_uniform"][n]["seconds"] for n in sizes], "s"
    label_sizes = sorted(measured["label_check"])
    lines["label check s"] = label_sizes, [measured["label_check"][n]["seconds"] for n in label_sizes], "s"
    lines["label check heap MiB"] = label_sizes, [measured["label_check"][n]["heap_mib"] for n in label_sizes], "MiB"
    search = earlier["neighbour_search"]
    for key in ("exact_s", "hnsw_s", "hnsw_mib"):
        lines[f"neighbours {key}"] = [r["photos"] for r in search], [r[key] for r in search], key.rpartition("_")[2]
    for stage, by_n in earlier["stages"].items():
        ns = sorted(by_n)
        if len(ns) >= 2:
            lines[f"{stage} wall s"] = ns, [by_n[n]["wall_s"] for n in ns], "s"
            lines[f"{stage} peak GiB"] = ns, [by_n[n]["peak_rss_gib"] for n in ns], "GiB"
    projections = {}
    print(f"{'part':<34}{'measured (photos: value)':<52}{'growth':>8}" + "".join(f"{f'at {t:,}':>16}" for t in TARGETS))
    for name, (ns, values, unit) in lines.items():
        b = growth(ns, values)
        at = {t: projected(ns, values, t) for t in TARGETS}
        projections[name] = {"measured": dict(zip(ns, values)), "unit": unit, "growth": round(b, 2),
                             **{str(t): round(v, 1) for t, v in at.items()}}
        shown = ", ".join(f"{n // 1000}k: {v:g}" for n, v in zip(ns, values))
        print(f"{name:<34}{shown:<52}{f'n^{b:.2f}':>8}" + "".join(f"{f'{v:,.0f} {unit}':>16}" for v in at.values()))
    save_result("sizing", "cpu", {"measured": measured, "from_other_benchmarks": earlier, "projections": projections})


if __name__ == "__main__":
    main()
