"""Issue 27: the job's wall time and peak RSS per stage as the photo count grows.

Builds an N-photo set under ``--work`` (the scene sample's 2,400 real photos first, then distinct
procedural 400 px JPEGs, ``bench.audit.procedural``, in two more classes) and runs each stage as its own
command (``python -m jobs clean|audit|split|train|export|evaluate``) with the real backbone:
``--arch timm/tf_efficientnet_lite0`` and the offline ImageNet weights, ``--feature-views 1 --epochs 1``.
A stage's peak RSS is the high-water mark (``VmHWM``) of its largest process, dataloader workers included,
polled from ``/proc``: a child's rusage would start from this script's own RSS, which it inherits at fork.
Prints the stages side by side for every N and writes ``bench/results/scale.json``. Then the audit's
neighbour search on synthetic features at ``--index-photos`` (``bench.audit_index``: exact time against the
faiss HNSW index's build + search, and the index's recall of the 10 nearest and of the exact near-duplicate
pairs; none with ``--index-photos`` and no number).

    python -m bench.scale [--photos 2400 5000] [--work /tmp/bench-scale] [--index-photos 5000 25000 100000]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import audit_index
from bench.audit import REAL_ARCH, SYNTHETIC_CLASSES, _jpeg, procedural
from bench.common import REPO, SCENES, save_result

STAGES = ("clean", "audit", "split", "train", "export", "evaluate")
DRAWN_SIZE = 400  # px: larger than the scene photos (150 px), as photos from a camera or the web are


def build_set(root: Path, photos: int) -> Path:
    """``photos`` images under ``root/<class>/``: real scene photos first (taken from each class in turn),
    then distinct drawn ones."""
    by_class = [sorted(folder.glob("*.jpg")) for folder in sorted(SCENES.iterdir()) if folder.is_dir()]
    real = [path for row in itertools.zip_longest(*by_class) for path in row if path][:photos]
    for path in real:
        target = root / path.parent.name / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    for s in range(photos - len(real)):
        target = root / SYNTHETIC_CLASSES[s % 2] / f"p{s:06d}.jpg"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_jpeg(procedural(1000 + s, s % 2, size=DRAWN_SIZE), 92))
    return root


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/*/children``."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in task.read_text().split()]
    return found


def _high_water_kib(pid: int) -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    return 0


def run_stage(stage: str, args: list[str], log: Path, poll_s: float = 0.1) -> dict:
    """One stage as its own process: its wall time and the peak RSS of its largest process."""
    started = time.perf_counter()
    peak: dict[int, int] = {}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs", stage, *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while proc.poll() is None:
            for pid in _family(proc.pid):
                peak[pid] = max(peak.get(pid, 0), _high_water_kib(pid))
            time.sleep(poll_s)
    if proc.returncode:
        raise RuntimeError(f"jobs {stage} failed ({proc.returncode}); its output: {log}")
    return {"wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(max(peak.values(), default=0) / 2**20, 3)}


FEATURES_LINE = re.compile(r"^features: .*?(\d+) backbone passes in ([\d.]+) s", re.M)


def backbone_passes(stage: str, log: Path, out: Path) -> dict:
    """Images through the backbone in ``stage`` (a view or a precision counts once each): the feature store's
    own lines where it printed them (audit, train, evaluate), plus what export and evaluate record of the passes
    they make without it."""
    found = FEATURES_LINE.findall(log.read_text())
    passes = sum(int(n) for n, _ in found)
    if stage == "export":
        meta = json.loads((out / "model" / "metadata.json").read_text())
        engines = meta["backends"]
        checked = sum(len(v.get("checked", ())) for v in engines.values() if isinstance(v, dict))
        # fp32 and bf16 over val (the trust fit reuses them), the trust bank, each engine over the images it checks
        passes += (2 * meta["serve_precision"]["val_images"] + meta["trust"]["fit_on"]["train_images"]
                   + checked * engines.get("val_images", 0))
    if stage == "evaluate":  # the served answers on the test split
        passes += json.loads((out / "report" / "metrics.json").read_text())["trust"].get("test", {}).get("images", 0)
    timed = {"backbone_s": round(sum(float(t) for _, t in found), 1)} if found else {}
    return {"passes": passes, **timed}


def outcome(out: Path) -> dict:
    """The audit's near-duplicate groups (and how many span classes) and the photos the split excluded."""
    audit = json.loads((out / "audit.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    return {"near_duplicate_groups": len(audit["near_duplicates"]),
            "excluded": len(splits["excluded"]),
            "excluded_by_reason": dict(collections.Counter(splits["excluded"].values()))}


def measure(photos: int, work: Path, weights: Path) -> dict:
    """Every stage at ``photos`` photos, from a fresh run folder (nothing cached)."""
    data = build_set(work / f"data-{photos}", photos)
    out = work / f"run-{photos}"
    shutil.rmtree(out, ignore_errors=True)
    model = ["--arch", REAL_ARCH, "--weights", str(weights)]
    args = {"clean": ["--data", str(data)], "audit": model, "train": [*model, "--feature-views", "1", "--epochs", "1"]}
    stages = {}
    for stage in STAGES:
        log = work / f"{photos}-{stage}.log"
        stages[stage] = run_stage(stage, ["--out", str(out), *args.get(stage, [])], log)
        stages[stage].update(backbone_passes(stage, log, out))
        print(f"  {photos} photos, {stage}: {stages[stage]['wall_s']} s, {stages[stage]['peak_rss_gib']} GiB, "
              f"{stages[stage]['passes']} backbone passes", flush=True)
    return {"photos": photos, "stages": stages, **outcome(out)}


def main() -> None:
    from scripts.offline_weights import build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, nargs="+", default=[2400, 5000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--index-photos", type=int, nargs="*", default=[5000, 25000, 100000])
    opts = parser.parse_args()
    weights = build(REPO / ".cache" / "weights" / "tf_efficientnet_lite0.pth")
    runs = [measure(n, opts.work, weights) for n in opts.photos]
    print("wall time, peak RSS and images through the backbone per stage:")
    print(f"{'stage':<10}" + "".join(f"{f'{n:,} photos':>34}" for n in opts.photos))
    for stage in STAGES:
        cells = (f"{r['stages'][stage]['wall_s']:.1f} s, {r['stages'][stage]['peak_rss_gib']:.2f} GiB, "
                 f"{r['stages'][stage]['passes']:,} passes" for r in runs)
        print(f"{stage:<10}" + "".join(f"{cell:>34}" for cell in cells))
    for label, cells in (("whole job", (f"{sum(st['wall_s'] for st in r['stages'].values()):.0f} s" for r in runs)),
                         ("dup groups", (str(r["near_duplicate_groups"]) for r in runs)),
                         ("excluded", (f"{r['excluded']} {r['excluded_by_reason']}" for r in runs))):
        print(f"{label:<10}" + "".join(f"{cell:>34}" for cell in cells))
    index_runs = audit_index.run(opts.index_photos, opts.work / "audit-index") if opts.index_photos else []
    if index_runs:
        print("the audit's neighbour search, exact against the HNSW index (synthetic features, bench.audit_index):")
        audit_index.print_table(index_runs)
    save_result("scale", "cpu", {"runs": runs, "neighbour_search": index_runs})


if __name__ == "__main__":
    main()
