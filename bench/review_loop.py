"""The review loop: a whole `jobs run`, then a person's decisions, then the same `jobs run` again.

    .venv/bin/python -m bench.review_loop [--data DIR] [--arch ARCH --weights none|PATH]

The first run audits, trains, evaluates and archives. The decisions exclude the three worst
label issues and relabel the next one to its suggested class. The second run is the same command:
decode results and backbone features are cached per image, so it should cost a fraction of the
first. Prints both wall times, their ratio, and the backbone passes each run made (parsed from the
job's own "features:" lines). Results: bench/results/review_loop.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import HYMENOPTERA, REPO, RESULTS, machine
from jobs.fileio import atomic_write_json
from scripts.offline_weights import ARCH as REAL_ARCH
from scripts.offline_weights import build

FIXTURES = REPO / "tests" / "fixtures" / "hymenoptera_small"


def _copy_data(source: Path, dest: Path) -> Path:
    """One folder per class from train/ and val/ (hymenoptera), or the fixture photos as they are."""
    for split_dir in [source / "train", source / "val"] if (source / "train").is_dir() else [source]:
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
            for f in class_dir.iterdir():
                shutil.copy(f, dest / class_dir.name / f"{split_dir.name}_{f.name}")
    return dest


def _run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, proc.stdout


def _passes(output: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) backbone passes", output))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HYMENOPTERA if HYMENOPTERA.is_dir() else FIXTURES)
    ap.add_argument("--arch", default=REAL_ARCH)
    ap.add_argument("--weights", default=None, help="default: the offline real ImageNet weights for --arch "
                    f"{REAL_ARCH} (scripts/offline_weights.py)")
    args = ap.parse_args()
    weights = args.weights or str(build(REPO / ".cache" / "weights" / "tf_efficientnet_lite0.pth"))
    with tempfile.TemporaryDirectory() as tmp:
        data, out = _copy_data(args.data, Path(tmp) / "data"), Path(tmp) / "run"
        cmd = [sys.executable, "-m", "jobs", "run", "--data", str(data), "--out", str(out), "--arch", args.arch,
               "--weights", weights, "--min-images-per-class", "3"]
        first_s, first_log = _run(cmd)
        audit = json.loads((out / "audit.json").read_text())
        # What a reviewer acts on: the flagged photos, label issues first (real features on clean data flag few).
        flagged = list(dict.fromkeys([i["file"] for i in audit["label_issues"]] + [o["file"] for o in audit["outliers"]]
                                     + [q["file"] for q in audit["image_issues"]]))
        classes = audit["classes"]
        relabel = flagged[3:4]
        decisions = {"exclude": flagged[:3], "keep": [],
                     "relabel": {f: next(c for c in classes if c != Path(f).parts[0]) for f in relabel}}
        (out / "decisions.json").write_text(json.dumps(decisions))
        second_s, second_log = _run(cmd)
    result = {"first_run_s": round(first_s, 1), "rerun_s": round(second_s, 1),
              "rerun_over_first": round(second_s / first_s, 3), "backbone_passes_first": _passes(first_log),
              "backbone_passes_rerun": _passes(second_log), "decisions": {k: len(v) for k, v in decisions.items()},
              "data": str(args.data), "arch": args.arch, "weights": weights}
    print(f"first run {first_s:.1f} s ({result['backbone_passes_first']} backbone passes); after "
          f"{sum(result['decisions'].values())} decisions the same command {second_s:.1f} s "
          f"({result['backbone_passes_rerun']} backbone passes): {second_s / first_s:.2f}x the first run's time")
    saved = atomic_write_json(RESULTS / "review_loop.json", {"benchmark": "review_loop", "machine": machine("cpu"),
                                                             "date": time.strftime("%Y-%m-%d %H:%M:%S"), **result})
    print(f"saved {saved.relative_to(REPO)}")


if __name__ == "__main__":
    main()
