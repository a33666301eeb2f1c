"""`jobs predict` on a folder of photos against the per-file loop it replaced, side by side in one run.

    .venv/bin/python -m bench.predict [--images 1000] [--arch timm/tf_efficientnet_lite0 --weights PATH]

The photos are hymenoptera's and the pets sample's (../shared/datasets), cycled to ``--images`` files
in a temporary folder. Both methods load the same exported model (random head on the given backbone:
speed does not depend on the weights) and answer every photo:

- per-file loop (the old `jobs predict`): read, decode, one forward pass per image, in one process;
- `jobs predict DIR --output preds.csv`: the real command, end to end (process start and model load
  included), decoding in DataLoader workers and one forward pass per batch.

Prints img/s of each and the ratio; results in bench/results/predict.json.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import HYMENOPTERA, PETS, REPO, save_result
from jobs.predict import load_classifier
from tests.torchserve_fixture import export_random_model


def photo_folder(dest: Path, count: int) -> list[Path]:
    sources = sorted(HYMENOPTERA.rglob("*.jpg")) + sorted(PETS.rglob("*.jpg"))
    if not sources:
        sys.exit(f"no photos under {HYMENOPTERA} or {PETS}")
    dest.mkdir(parents=True)
    files = []
    for i in range(count):
        src = sources[i % len(sources)]
        files.append(Path(shutil.copy(src, dest / f"{i:05d}{src.suffix}")))
    return files


def per_file_loop(model_dir: Path, files: list[Path]) -> float:
    """img/s of the old loop: decode and forward one file at a time (model load not counted)."""
    classifier = load_classifier(model_dir)
    start = time.perf_counter()
    for f in files:
        x = classifier.decode([f.read_bytes()])[0]
        classifier.answers(classifier.forward(x.unsqueeze(0)), [classifier.default_topk])
    return len(files) / (time.perf_counter() - start)


def command(model_dir: Path, folder: Path, out: Path) -> tuple[float, float, int]:
    """img/s of the real command end to end (process start included), img/s from its own summary line (model
    load and the images), and the rows its CSV holds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs", "predict", "--model-dir", str(model_dir), "--output",
                           str(out), str(folder)], check=True, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    rows = sum(1 for _ in csv.DictReader(out.open()))
    said = float(re.search(r"\(([\d.]+) img/s\)", done.stderr).group(1))
    print(done.stderr.strip().splitlines()[-1], flush=True)
    return rows / seconds, said, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = photo_folder(tmp / "photos", args.images)
        model_dir = export_random_model(tmp / "run", ["a", "b"], arch=args.arch).model
        print(f"{len(files)} photos, {args.arch}, {torch.get_num_threads()} torch threads", flush=True)
        loop = per_file_loop(model_dir, files)
        print(f"per-file loop: {loop:.1f} img/s", flush=True)
        end_to_end, own, rows = command(model_dir, tmp / "photos", tmp / "preds.csv")
        print(f"jobs predict: {own:.1f} img/s after start-up ({own / loop:.2f}x the per-file loop), {end_to_end:.1f} "
              f"img/s end to end with the process start ({end_to_end / loop:.2f}x); {rows} rows in the CSV", flush=True)
    save_result("predict", "cpu", {"images": args.images, "arch": args.arch, "per_file_images_per_s": round(loop, 1),
                                   "predict_images_per_s": round(own, 1), "ratio": round(own / loop, 2),
                                   "end_to_end_images_per_s": round(end_to_end, 1),
                                   "end_to_end_ratio": round(end_to_end / loop, 2), "csv_rows": rows})


if __name__ == "__main__":
    main()
