"""Model versions of one run folder: numbering, the previous model kept as evidence, and the comparison
that decides whether a new version may replace the old one (docs/run-folder.md, "Model versions").

An export whose weights differ from the model already in ``model/`` moves that folder whole to
``versions/<old version>/model`` (one rename: atomic, nothing copied or deleted) and writes the new one
as the next version. Every export records its test split (``model/test_split.json``), so the next
version can be compared with it on the images it was judged by, even after ``split`` added new ones.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler import files
from jobs.config import AUTO_VERSION, RunPaths
from jobs.data import split_items
from jobs.errors import JobError
from jobs.fileio import read_json

FIRST_VERSION = "1.0"
TEST_SPLIT_FILE = "test_split.json"  # in model/; not packed into the .mar (archive packs named files only)
NUMBERED = re.compile(r"^(\d+)(\.\d+)*$")
SIGNIFICANCE = 0.05
PREVIOUS_TEST_SPLIT = "previous test split"
LABELLED_CAPTURES = "labelled captures in this test split"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names and tensor bytes: the same weights give the same digest, in any file."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def version_key(version: str) -> tuple:
    """Sorts "2.0" after "1.0" and "10.0" after "9.0"; versions that are not numbers sort first, by name."""
    return (1, tuple(int(p) for p in version.split("."))) if NUMBERED.match(version) else (0, version)


def next_version(previous: str) -> str:
    match = NUMBERED.match(previous)
    if not match:
        raise JobError(f"the exported model's model_version {previous!r} is not a number to count on from; "
                       "pass --model-version for the new one")
    return f"{int(match.group(1)) + 1}.0"


def kept_versions(paths: RunPaths) -> list[str]:
    """The versions kept in ``versions/``, oldest first."""
    found = [d.name for d in paths.versions.glob("*") if (d / "model" / files.METADATA).is_file()]
    return sorted(found, key=version_key)


def _exported(model_dir: Path) -> dict | None:
    meta_file = model_dir / files.METADATA
    return read_json(meta_file) if meta_file.is_file() else None


def _digest_of(meta: dict, model_dir: Path) -> str | None:
    """The weights' digest of an exported model: recorded since versions exist, computed for an older export."""
    if meta.get("weights_sha256"):
        return meta["weights_sha256"]
    weights = model_dir / files.WEIGHTS
    return weights_digest(torch.load(weights, map_location="cpu", weights_only=True)) if weights.is_file() else None


def begin_export(paths: RunPaths, requested: str, digest: str) -> str:
    """The version the export about to write gets; when ``model/`` holds other weights, it is moved to
    ``versions/<its version>/model`` first. ``requested``: the model_version key (``auto``: the next one)."""
    current = _exported(paths.model)
    if current is not None and _digest_of(current, paths.model) == digest:
        return current["model_version"] if requested == AUTO_VERSION else requested  # the same weights again
    kept = kept_versions(paths)
    previous = current["model_version"] if current is not None else (kept[-1] if kept else None)
    taken = set(kept) | ({previous} if previous else set())
    version = requested
    if requested == AUTO_VERSION or requested in taken:
        # A version names one set of weights. A taken one most often comes from a run folder's config.yaml
        # (archive recorded the version it packed): count on from it, and say so, rather than stop the run.
        version = next_version(previous) if previous else FIRST_VERSION
        while version in taken:
            version = next_version(version)
        if requested != AUTO_VERSION:
            print(f"export: model_version {requested} already names other weights in {paths.out}; "
                  f"this export is version {version}")
    if current is not None:
        dest = paths.versions / current["model_version"] / "model"
        if dest.exists():
            raise JobError(f"{dest} already exists; move it away to keep {paths.model} as version "
                           f"{current['model_version']}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(paths.model, dest)  # one rename: the old model is whole in one place or the other
        paths.model.mkdir()
        print(f"export: model {current['model_version']} kept in {dest}; this export is version {version}")
    return version


def test_split_record(splits: dict) -> dict:
    """What ``model/test_split.json`` holds: the test images (relative to the run folder) and their classes."""
    classes = splits["classes"]
    return {"split_hash": splits["split_hash"],
            "images": [{"file": f, "class": classes[label]} for f, label in split_items(splits, "test")]}




# ----------------------------------------------------------------------------------------------
# paired comparison: pure functions of which images each model got right


def mcnemar_p(only_old_right: int, only_new_right: int) -> float:
    """McNemar's exact test: two-sided binomial p of the discordant pairs (1.0 when there are none)."""
    discordant = only_old_right + only_new_right
    # Imported here: the serve image (no scipy) imports this module through jobs.archive for serve-config.
    from scipy.stats import binomtest

    return float(binomtest(only_new_right, discordant, 0.5).pvalue) if discordant else 1.0


def paired_counts(old_right: np.ndarray, new_right: np.ndarray) -> dict[str, Any]:
    """Both right, only old right, only new right, both wrong, and McNemar's exact p on the discordant pairs."""
    old_right, new_right = np.asarray(old_right, bool), np.asarray(new_right, bool)
    counts = {"images": int(len(old_right)),
              "both_right": int((old_right & new_right).sum()),
              "only_old_right": int((old_right & ~new_right).sum()),
              "only_new_right": int((~old_right & new_right).sum()),
              "both_wrong": int((~old_right & ~new_right).sum())}
    counts["p_value"] = mcnemar_p(counts["only_old_right"], counts["only_new_right"])
    counts["significantly_worse"] = bool(counts["p_value"] < SIGNIFICANCE
                                         and counts["only_old_right"] > counts["only_new_right"])
    return counts


def compare_answers(truth: list[str], old_labels: list[str], new_labels: list[str]) -> dict[str, Any]:
    """Paired counts over all images and per true class; labels are class names (the new model may have more)."""
    truth_a, old_right, new_right = np.array(truth), np.array(old_labels) == truth, np.array(new_labels) == truth
    return {**paired_counts(old_right, new_right),
            "per_class": {c: paired_counts(old_right[truth_a == c], new_right[truth_a == c])
                          for c in sorted(set(truth))}}


# ----------------------------------------------------------------------------------------------
# the comparison the report shows and the archive decides by


def previous_version(paths: RunPaths, version: str) -> str | None:
    """The newest kept version other than ``version``: the model this one would replace."""
    older = [v for v in kept_versions(paths) if v != version]
    return older[-1] if older else None


def comparison_sets(paths: RunPaths, previous_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """The labelled images both models answer, by set name: (file relative to the run folder, true class).

    The previous model's test split (the images still in the run folder), and the captured images brought
    into the run (``jobs.captured``) that are in this run's test split: neither model trained on them (a
    file keeps its split). The report and ``compare`` show every set; the archive decides by
    ``PREVIOUS_TEST_SPLIT`` alone. Classes are compared by name, so a new model with more classes is
    judged on the old images as it answers them: a new class given to an old image is wrong.
    """
    from jobs.captured import captured_test_items

    record = read_json(previous_dir / TEST_SPLIT_FILE)
    sets = {PREVIOUS_TEST_SPLIT: [(i["file"], i["class"]) for i in record["images"]]}
    captures = captured_test_items(paths, read_json(paths.splits)) if paths.splits.is_file() else []
    if captures:
        sets[LABELLED_CAPTURES] = captures
    return sets


def compare(paths: RunPaths, meta: dict, batch_size: int, device: torch.device | None = None) -> dict | None:
    """The exported model against the version before it, as served (``jobs.predict``), on ``comparison_sets``;
    None when there is no earlier version, ``{"note": why not}`` when it cannot be compared."""
    from jobs.predict import predict

    version = meta["model_version"]
    previous = previous_version(paths, version)
    if previous is None:
        return None
    previous_dir = paths.versions / previous / "model"
    base = {"version": version, "previous_version": previous, "weights_sha256": meta.get("weights_sha256")}
    if not (previous_dir / TEST_SPLIT_FILE).is_file():
        return {**base, "note": f"{previous_dir} has no {TEST_SPLIT_FILE} (exported before versions were compared): "
                                "not compared"}
    sets = {}
    for name, items in comparison_sets(paths, previous_dir).items():
        present = [(f, c) for f, c in items if (paths.out / f).is_file()]
        files = [paths.out / f for f, _ in present]
        answers = {d: [r["predictions"][0]["label"] if "error" not in r else None
                       for r in predict(d, files, batch_size=batch_size, device=device, backend="torch")]
                   for d in (previous_dir, paths.model)}
        sets[name] = {**compare_answers([c for _, c in present], answers[previous_dir], answers[paths.model]),
                      "missing": len(items) - len(present)}
    return {**base, "sets": sets}


def compared(comparison: dict | None, meta: dict) -> bool:
    """Whether ``comparison`` (report/metrics.json's ``versus_previous``) measured the model of ``meta``."""
    return bool(comparison) and "sets" in comparison and comparison.get("weights_sha256") == meta.get("weights_sha256")


def refusal(comparison: dict | None, meta: dict) -> str | None:
    """Why the exported model must not become the default, or None: significantly worse than the previous
    version on its test split (McNemar p < 0.05, and more images only the old one got right)."""
    if not compared(comparison, meta):
        return None
    paired = comparison["sets"][PREVIOUS_TEST_SPLIT]
    if not paired["significantly_worse"]:
        return None
    new, old = comparison["version"], comparison["previous_version"]
    return (f"version {new} is significantly worse than {old} on {old}'s test split (only {old} right on "
            f"{paired['only_old_right']} images, only {new} right on {paired['only_new_right']}; McNemar p = "
            f"{paired['p_value']:.3g})")
