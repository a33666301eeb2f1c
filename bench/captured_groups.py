"""Does ``jobs review --captured`` show a new kind of input as one group, and early? ``jobs.captured.group_by_likeness``
on real captures-like mixes.

    python -m bench.captured_groups --weights /tmp/lite0.pth

Real EfficientNet-Lite0 ImageNet features (the job's frozen backbone) of scenes-sample (six scene classes) and
pets-sample (cats, dogs: another domain). Each task: three scene classes are the run's training images
(``--train`` photos each); the "captures" are ``--captured`` other photos of each of them, as many of a fourth
scene class (a new class of the same domain), and as many cats and as many dogs (another domain). Every choice of
three known classes and a new one among the six.

Per task and threshold (the default: ``class_spread``, the typical within-class distance of the training
images; and that times 0.8 and 1.2, to see the choice):

- **gathered**: the share of the new class's captures in its largest group, and that group's **purity** (its
  share of the group); **rank**: where that group comes in the page's order (0 = first), and **top 3**: the
  share of tasks where it is among the first three; **plain rank** / **plain top 3**: the same were groups
  ordered by their mean distance to the nearest training image alone;
- the same for the pets (cats and dogs together: one other domain); how many groups the page shows in all.

Results: bench/results/captured_groups.json; figures in bench/README.md ("Captured images, grouped").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.common import PETS, SCENES, save_result
from bench.trust import _file_tag, cached_features, load_backbone, photo_items, pooled_features
from jobs.captured import group_by_likeness

ARCH = "tf_efficientnet_lite0"
SCALES = (0.8, 1.0, 1.2)


def kind_figures(groups: list[list[int]], distance: np.ndarray, kinds: list[str], kind: str) -> dict[str, float]:
    """For captures of ``kind``: the share in its largest group, that group's purity and its rank on the page (and
    were the groups ordered by mean distance alone)."""
    mine = [sum(kinds[i] == kind for i in g) for g in groups]
    best = int(np.argmax(mine))
    plain = sorted(range(len(groups)), key=lambda g: -float(np.mean(distance[groups[g]]))).index(best)
    return {"gathered": mine[best] / sum(mine), "purity": mine[best] / len(groups[best]), "rank": best,
            "top_3": float(best < 3), "plain_rank": plain, "plain_top_3": float(plain < 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="scripts/offline_weights.py's EfficientNet-Lite0")
    parser.add_argument("--train", type=int, default=40, help="training photos per known class")
    parser.add_argument("--captured", type=int, default=20, help="captured photos per kind")
    args = parser.parse_args()

    per_class = args.train + args.captured
    scenes = [it for c in sorted(p.name for p in SCENES.iterdir())
              for it in photo_items("scenes", SCENES / c)[:per_class]]
    pets = [it for c in ("cats", "dogs") for it in photo_items("pets", PETS / c)[:args.captured]]
    items = scenes + pets
    backbone = load_backbone(ARCH, args.weights)
    key = {"arch": ARCH, "weights": _file_tag(args.weights), "items": [str(it.path) for it in items]}
    features = cached_features(key, lambda: pooled_features(backbone, items, 0)).numpy()
    labels = [it.label for it in items]
    classes = sorted(set(it.label for it in scenes))

    rows = []
    for known in itertools.combinations(classes, 3):
        for new in (c for c in classes if c not in known):
            train, captured = [], []
            for c in known:
                rows_of = [i for i, lab in enumerate(labels) if lab == c]
                train += rows_of[:args.train]
                captured += rows_of[args.train:]
            captured += [i for i, lab in enumerate(labels) if lab == new][:args.captured]
            captured += [i for i, lab in enumerate(labels) if lab in ("cats", "dogs")]
            kinds = ["pets" if labels[i] in ("cats", "dogs") else "new" if labels[i] == new else "known"
                     for i in captured]
            train_labels = np.array([known.index(labels[i]) for i in train])
            for scale in SCALES:
                groups, distance, threshold = group_by_likeness(features[captured], features[train], train_labels,
                                                                threshold_scale=scale)
                figures = {f"{kind}_{k}": v for kind in ("new", "pets")
                           for k, v in kind_figures(groups, distance, kinds, kind).items()}
                rows.append({"known": known, "new": new, "scale": scale, "threshold": threshold, "groups": len(groups),
                             **figures})
    summary = {}
    for scale in SCALES:
        mine = [r for r in rows if r["scale"] == scale]
        summary[str(scale)] = {k: statistics.mean(r[k] for r in mine) for k in mine[0]
                               if isinstance(mine[0][k], (int, float)) and k != "scale"}
        summary[str(scale)]["tasks"] = len(mine)
        print(f"threshold x{scale}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary[str(scale)].items()))
    print("captures per task:", dict(Counter(kinds)))
    save_result("captured_groups", "cpu", {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                           "tasks": rows})


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
