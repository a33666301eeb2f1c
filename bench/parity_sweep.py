"""Does caching features cost accuracy? The cached head stage vs the full loop, over several seeds.

Both paths train a head on the same real photos, split and fixed local backbone (the parity
test's: ``tests/fixtures/resnet18_bn_hymenoptera.statedict``, a seeded random ResNet-18 whose
BatchNorm layers alone were trained on hymenoptera ``train/``, ~75% on val): train = ``train/``
(244), val and test = halves of ``val/`` (77 + 76). A seed changes the cached path's views and
both paths' augmentation and order. One run of each path is noisy on 77 images (single runs
differ by up to 5 images); the mean difference over seeds is what says whether caching costs
accuracy. ``tests/test_training_parity.py`` checks exactly what the claim rests on, with these helpers.

    python -m bench.parity_sweep                     # 6 seeds on the CPU (about 15 minutes)
    python -m bench.parity_sweep --device cuda --seeds 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import (
    HYMENOPTERA,
    REPO,
    bn_backbone,
    link_split_folders,
    resolve_device,
    save_result,
    splits_from_folders,
)
from jobs.clean import clean
from jobs.config import RunPaths, load_config
from jobs.evaluate import evaluate
from jobs.runtime import setup
from jobs.train import train

# A torch.save file; named .statedict so it is not mistaken for a run's checkpoint.
BN_BACKBONE = REPO / "tests" / "fixtures" / "resnet18_bn_hymenoptera.statedict"
# The head stage's defaults but 4 epochs (and lr 0.01 to converge in them): the full loop pays a
# backbone forward per image per epoch, and the parity test runs this on two CPU cores.
COMMON = {"epochs": 4, "lr": 0.01}


def prepare(data: Path, work: Path, device: str = "auto") -> tuple[dict, RunPaths]:
    """clean ``data`` (train/ and val/ folders) once; train = train/, val/test = halves of val/."""
    cfg = load_config(overrides={"weights": "none", "device": device})
    paths = RunPaths(work / "cached")
    clean(cfg, paths, link_split_folders(data, work / "data"))
    splits_from_folders(paths, test_every=2)
    weights = bn_backbone(BN_BACKBONE, work / "backbone.pt")
    return {**COMMON, "device": device, "weights": str(weights)}, paths


def train_both(overrides: dict, cached_paths: RunPaths, seed: int) -> dict[bool, dict]:
    """metrics.json of the cached run and of the full-loop run (same data, split, backbone, seed), each
    with the test split scored by evaluate."""
    full_paths = RunPaths(cached_paths.out.parent / "full")
    full_paths.out.mkdir(exist_ok=True)
    for name in ("dataset", "splits.json", "clean_report.json"):
        (full_paths.out / name).unlink(missing_ok=True)
        (full_paths.out / name).symlink_to(cached_paths.out / name)
    results = {}
    for cache, paths in ((True, cached_paths), (False, full_paths)):
        cfg = load_config(overrides={**overrides, "seed": seed, "cache_features": cache})
        train(cfg, paths, setup(cfg), resume_mode="fresh")
        evaluate(cfg, paths, setup(cfg))  # the one place the test split is scored
        results[cache] = json.loads(paths.metrics.read_text())
    return results


def summarize(runs: list[dict]) -> dict:
    """Cached - full accuracy in points, per split: mean, standard error, extremes."""
    summary = {}
    for split in ("val", "test"):
        diffs = [100 * (r["cached"][split] - r["full"][split]) for r in runs]
        sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        summary[split] = {"mean_points": statistics.mean(diffs), "sem_points": sem,
                          "min_points": min(diffs), "max_points": max(diffs)}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HYMENOPTERA, help="folder with train/<class>/ and val/<class>/")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", type=int, default=6, help="seeds 42, 0, 1, ... (42 is the parity test's)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-parity-") as tmp:
        overrides, paths = prepare(args.data, Path(tmp), device)
        for seed in [42, *range(args.seeds - 1)]:
            both = train_both(overrides, paths, seed)
            cached, full = both[True], both[False]
            run = {"seed": seed,
                   "cached": {"val": cached["best"]["val_accuracy"], "test": cached["test_accuracy"]},
                   "full": {"val": full["best"]["val_accuracy"], "test": full["test_accuracy"]}}
            runs.append(run)
            print(f"seed {seed}: cached val {run['cached']['val']:.3f} test {run['cached']['test']:.3f} | "
                  f"full val {run['full']['val']:.3f} test {run['full']['test']:.3f}", flush=True)
            # Saved after every seed: a run cut short by a time limit still leaves its results.
            save_result("parity_sweep", device, {"config": COMMON, "backbone": BN_BACKBONE.name,
                                                 "split": "train/ 244; val/ halved into val 77 + test 76",
                                                 "runs": runs, "cached_minus_full": summarize(runs)})
    for split, s in summarize(runs).items():
        print(f"{split}: cached - full = {s['mean_points']:+.1f} points on average (± {s['sem_points']:.1f} "
              f"standard error; single runs {s['min_points']:+.1f} .. {s['max_points']:+.1f})")


if __name__ == "__main__":
    main()
