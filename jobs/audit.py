"""The audit's algorithms, as pure functions over arrays: near-duplicates, label issues, outliers.

Inputs are what clean and the shared feature cache already hold, one row per cleaned image:
``hashes`` (uint64 pHashes from ``jobs.imagestats``), ``features`` (view-0 backbone features,
(n, d) float), ``labels`` (class indices). ``audit_document`` turns them into the dict written
as ``<out>/audit.json``; the other functions are its parts.

- Near-duplicates: two signals, each giving pairs; groups are the connected components of
  their union (scipy.sparse.csgraph).
  * pHash within a Hamming radius, found by multi-index hashing: the 64 bits are cut into
    radius + 1 chunks; two hashes within the radius agree exactly on at least one chunk
    (pigeonhole), so only items sharing a chunk value are compared.
  * cosine similarity of centred, L2-normalised features over a threshold, by a blocked
    matrix product over the upper triangle.
- Label issues: out-of-fold predicted probabilities from a K-fold logistic-regression head on
  the features, handed to ``cleanlab.filter.find_label_issues`` and
  ``cleanlab.rank.get_label_quality_scores``; per-class noise from cleanlab's confident joint.
- Outliers: mean cosine distance to the k nearest neighbours, scored as cleanlab's
  ``OutOfDistribution`` does (``1 - exp(-d / median(d))``, here "higher = more outlying").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from jobs import features
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_json, read_run_file
from jobs.imagestats import phash_array
from jobs.model import build_model, head_path, split_backbone_head
from jobs.review import render_review
from jobs.runtime import Runtime, seed_everything

# Chosen by bench/audit.py on the 396 hymenoptera .jpg photos and 600 copies of 60 of them.
# pHash distances are even (32 of 64 bits lie above the median) and the closest two distinct
# photos are 14 apart: radius 10 keeps 0 false pairs among the 78,210 distinct pairs and finds
# 95% of the copies (every resized, re-encoded, brightened and overlaid one; 52% of 90% crops).
# Cosine: the two distinct photos closest in feature space reach 0.964 on the random-weight
# stand-in backbones, so 0.97; both signals together: 95-96% recall, 0 false pairs.
DEFAULT_HASH_RADIUS = 10
DEFAULT_COSINE_THRESHOLD = 0.97
DEFAULT_FOLDS = 5
DEFAULT_KNN = 10
HASH_BITS = 64


@dataclass(frozen=True)
class Pairs:
    """Unordered index pairs (i < j) with a per-pair value (Hamming distance or cosine)."""

    i: np.ndarray
    j: np.ndarray
    value: np.ndarray

    @staticmethod
    def empty(dtype: type) -> Pairs:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype))


def hash_pairs(hashes: np.ndarray, radius: int) -> Pairs:
    """Every pair of 64-bit hashes within Hamming distance ``radius`` (value = the distance).

    Multi-index hashing: per chunk, items are sorted by the chunk's value; within each run of
    equal values, item p is compared with the item d places after it, for d = 1, 2, ... up to
    the longest run, all runs at once. The work is the number of same-chunk pairs, not n^2.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if not 0 <= radius < HASH_BITS:
        raise ValueError(f"hash radius {radius} must be in [0, {HASH_BITS - 1}]")
    if n < 2:
        return Pairs.empty(np.int64)
    bounds = np.linspace(0, HASH_BITS, radius + 2).round().astype(int)
    found_i, found_j, found_d = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        sorted_h, sorted_key = h[order], key[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        run_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
        after = np.r_[starts[1:], n][run_of] - np.arange(n) - 1  # run members after position p
        by_after = np.argsort(-after, kind="stable")
        neg_after = -after[by_after]
        for d in range(1, int(after.max()) + 1):
            p = by_after[:np.searchsorted(neg_after, -d, side="right")]  # positions with >= d after them
            dist = np.bitwise_count(sorted_h[p] ^ sorted_h[p + d])
            close = dist <= radius
            if close.any():
                a, b = order[p[close]], order[p[close] + d]
                found_i.append(np.minimum(a, b))
                found_j.append(np.maximum(a, b))
                found_d.append(dist[close].astype(np.int64))
    if not found_i:
        return Pairs.empty(np.int64)
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    _, first = np.unique(i * n + j, return_index=True)  # a pair may share several chunks
    return Pairs(i[first], j[first], d[first])


def unit_features(features: np.ndarray) -> np.ndarray:
    """Centred, L2-normalised float32 rows.

    Centring first matters: a backbone's features share a large common component (all ReLU
    outputs are positive), which puts the raw cosine of any two photos near 1.
    """
    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def cosine_pairs(unit: np.ndarray, threshold: float, block: int = 1024, dims: int = 128) -> Pairs:
    """Every pair of rows of ``unit`` (unit vectors) whose cosine is >= ``threshold`` (value = the cosine).

    Two exact steps. Candidates: the rows are projected on their top ``dims`` principal axes;
    a projection never lengthens a difference, so a pair with |x - y|^2 = 2 - 2 cos <= 2 - 2t
    also has |Px - Py|^2 <= 2 - 2t. That is tested by a blocked product over the upper
    triangle (block rows [b0, b1) x columns [b0, n): each product once, memory block x n) at
    dims/d of the full cost. Rows with a candidate then get their true cosines.
    """
    n, d = unit.shape
    if n < 2:
        return Pairs.empty(np.float32)
    projected = unit
    if d > dims:
        _, axes = np.linalg.eigh(unit.T @ unit)  # ascending eigenvalues: the last columns are the top axes
        projected = np.ascontiguousarray(unit @ axes[:, -dims:])
    half_sq = 0.5 * np.einsum("ij,ij->i", projected, projected)
    slack = 2.0 - 2.0 * threshold
    # |Px - Py|^2 <= slack  <=>  Px.Py - |Py|^2/2 >= |Px|^2/2 - slack/2; the left side is one
    # product of [Px, 1] and [Py, -|Py|^2/2], so the block needs no elementwise pass but its max.
    left = np.ascontiguousarray(np.c_[projected, np.ones(n, np.float32)])
    right = np.ascontiguousarray(np.c_[projected, -half_sq].T)
    bar_all = half_sq - 0.5 * slack - 1e-5  # float32 rounding must not lose a pair on the boundary
    found_i, found_j, found_s = [], [], []
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        score = left[b0:b1] @ right[:, b0:]
        np.fill_diagonal(score[:, :b1 - b0], -np.inf)  # never one's own duplicate
        rows = np.flatnonzero(score.max(axis=1) >= bar_all[b0:b1])
        if not len(rows):
            continue
        exact = unit[b0 + rows] @ unit[b0:].T  # the true cosines, for the few rows with a candidate
        exact[np.arange(len(rows)), rows] = -np.inf
        hit_r, hit_c = np.nonzero(exact >= threshold)
        upper = hit_c > rows[hit_r]  # the block's diagonal square holds each pair twice
        found_i.append(rows[hit_r[upper]] + b0)
        found_j.append(hit_c[upper] + b0)
        found_s.append(exact[hit_r[upper], hit_c[upper]])
    if not found_i:
        return Pairs.empty(np.float32)
    return Pairs(np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64),
                 np.concatenate(found_s))


def knn_cosines(unit: np.ndarray, k: int = DEFAULT_KNN, reference_size: int = 5000, seed: int = 0,
                block: int = 1024) -> np.ndarray:
    """(n, k) cosines of each row's k nearest neighbours (unordered), itself excluded.

    Neighbours are searched among all rows up to ``reference_size`` of them, else among a
    seeded random sample of that many: an outlier score needs the density around an image,
    which a 5000-image sample measures well, at a fraction of the n x n product.
    """
    n = len(unit)
    reference = np.arange(n) if n <= reference_size else np.sort(
        np.random.default_rng(seed).choice(n, reference_size, replace=False))
    k = max(0, min(k, len(reference) - 1))
    position = np.full(n, -1)
    position[reference] = np.arange(len(reference))
    ref_t = np.ascontiguousarray(unit[reference].T)
    best = np.empty((n, k), dtype=np.float32)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        sims = unit[b0:b1] @ ref_t
        own = np.flatnonzero(position[b0:b1] >= 0)
        sims[own, position[b0:b1][own]] = -np.inf
        best[b0:b1] = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:] if k else sims[:, :0]
    return best


def near_duplicate_groups(n: int, pair_sets: Sequence[Pairs], unit: np.ndarray | None = None,
                          hashes: np.ndarray | None = None) -> list[dict]:
    """Connected components (size >= 2) of the union of ``pair_sets`` over items 0..n-1.

    Each group: ``members`` (sorted indices), ``similarity`` (the lowest cosine between any two
    members, when ``unit`` is given; pairs joined only through a chain count too) and
    ``max_hamming`` (the largest pHash distance between any two members, when ``hashes`` is
    given). Sorted by the first member.
    """
    rows = np.concatenate([p.i for p in pair_sets]) if pair_sets else np.zeros(0, np.int64)
    cols = np.concatenate([p.j for p in pair_sets]) if pair_sets else np.zeros(0, np.int64)
    if not len(rows):
        return []
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    grouped = np.flatnonzero(sizes[component] >= 2)
    grouped = grouped[np.argsort(component[grouped], kind="stable")]
    splits = np.flatnonzero(np.diff(component[grouped])) + 1
    groups = []
    for members in np.split(grouped, splits):  # one iteration per group, each over its few members
        group: dict = {"members": members.tolist()}
        if unit is not None:
            sims = unit[members] @ unit[members].T
            group["similarity"] = round(float(sims.min()), 4)
        if hashes is not None:
            h = np.asarray(hashes, dtype=np.uint64)[members]
            group["max_hamming"] = int(np.bitwise_count(h[:, None] ^ h[None, :]).max())
        groups.append(group)
    groups.sort(key=lambda g: g["members"][0])
    return groups


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = DEFAULT_FOLDS,
                              seed: int = 0, c: float = 0.1) -> np.ndarray:
    """(n, classes) predicted probabilities, each row from the fold model that did not see it.

    Stratified K-fold, seeded; the head is a standardised multinomial logistic regression
    (L2, inverse strength ``c``). Fewer folds are used when the smallest class has fewer
    images than ``folds`` (at least 2; below that there is nothing held out to learn from).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    smallest = int(np.bincount(labels).min())
    folds = min(folds, smallest)
    if folds < 2:
        raise ValueError(f"a class has {smallest} image(s); out-of-fold probabilities need at least 2 per class")
    head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=200, tol=1e-3))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(head, np.asarray(features, dtype=np.float32), labels, cv=cv, method="predict_proba")


@dataclass(frozen=True)
class LabelIssues:
    ranked: np.ndarray  # indices flagged by cleanlab, worst first
    quality: np.ndarray  # (n,) cleanlab label-quality score, 0 = surely wrong, 1 = surely right
    suggested: np.ndarray  # (n,) argmax of the out-of-fold probabilities
    noise_rate: np.ndarray  # (classes,) estimated share of images given class c that belong elsewhere


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> LabelIssues:
    """Confident learning by cleanlab on out-of-fold ``pred_probs``."""
    from cleanlab.count import compute_confident_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels)
    ranked = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    joint = compute_confident_joint(labels, pred_probs).astype(np.float64)  # rows: given, cols: true
    per_given = joint.sum(axis=1)
    noise = 1.0 - np.divide(np.diag(joint), per_given, out=np.ones(len(joint)), where=per_given > 0)
    return LabelIssues(np.asarray(ranked, dtype=np.int64), quality, pred_probs.argmax(axis=1), noise)


def outlier_scores(knn_cosines: np.ndarray) -> np.ndarray:
    """(n,) in [0, 1), higher = farther from its k nearest neighbours than the typical image."""
    if knn_cosines.shape[1] == 0:
        return np.zeros(len(knn_cosines))
    distance = 1.0 - knn_cosines.astype(np.float64).mean(axis=1)
    scale = max(float(np.median(distance)), 1e-12)
    return 1.0 - np.exp(-distance / scale)


def outlier_indices(scores: np.ndarray) -> np.ndarray:
    """Images above the upper Tukey fence (Q3 + 1.5 IQR) of the scores, worst first."""
    if not len(scores):
        return np.zeros(0, np.int64)
    q1, q3 = np.percentile(scores, [25, 75])
    flagged = np.flatnonzero(scores > q3 + 1.5 * (q3 - q1))
    return flagged[np.argsort(-scores[flagged], kind="stable")]


def odd_size(widths: np.ndarray, heights: np.ndarray, iqr_factor: float = 3.0) -> np.ndarray:
    """CleanVision's ``odd_size``: sqrt(w*h) outside [Q1 - f*IQR, Q3 + f*IQR] of the dataset."""
    size = np.sqrt(np.asarray(widths, np.float64) * np.asarray(heights, np.float64))
    if not len(size):
        return np.zeros(0, bool)
    q1, q3 = np.percentile(size, [25, 75])
    return (size < q1 - iqr_factor * (q3 - q1)) | (size > q3 + iqr_factor * (q3 - q1))


def audit_document(files: Sequence[str], labels: np.ndarray, class_names: Sequence[str], hashes: np.ndarray,
                   features: np.ndarray, stats: Sequence[dict], *, hash_radius: int = DEFAULT_HASH_RADIUS,
                   cosine_threshold: float = DEFAULT_COSINE_THRESHOLD, folds: int = DEFAULT_FOLDS, seed: int = 0,
                   knn: int = DEFAULT_KNN) -> dict:
    """The ``audit.json`` document for ``files`` (source paths, as in clean_report.json).

    ``labels`` are indices into ``class_names``; ``hashes`` uint64 pHashes; ``features`` (n, d);
    ``stats`` the ``jobs.imagestats.image_stats`` dicts (their ``issues``, plus ``odd_size``
    computed here over all images; ``width``/``height`` keys are used when present).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(files)
    if not (len(labels) == len(hashes) == len(features) == len(stats) == n):
        raise ValueError("files, labels, hashes, features and stats must have one entry per image")
    unit = unit_features(features)
    pairs = [hash_pairs(hashes, hash_radius), cosine_pairs(unit, cosine_threshold)]
    groups = near_duplicate_groups(n, pairs, unit, hashes)
    near_duplicates = []
    for g in groups:
        classes = sorted({class_names[labels[m]] for m in g["members"]})
        near_duplicates.append({"files": [files[m] for m in g["members"]], "classes": classes,
                                "cross_class": len(classes) > 1, "similarity": g["similarity"],
                                "max_hamming": g["max_hamming"]})

    present = np.unique(labels)
    label_list: list[dict] = []
    noise: dict[str, float] = {name: 0.0 for name in class_names}
    if len(present) >= 2 and np.bincount(labels)[present].min() >= 2:
        # cleanlab wants contiguous class indices; classes without images simply drop out
        dense = np.searchsorted(present, labels)
        probs = out_of_fold_probabilities(features, dense, folds, seed)
        found = label_issues(dense, probs)
        label_list = [{"file": files[i], "given": class_names[labels[i]],
                       "suggested": class_names[present[found.suggested[i]]],
                       "score": round(1.0 - float(found.quality[i]), 4),
                       "label_quality": round(float(found.quality[i]), 4)} for i in found.ranked]
        noise.update({class_names[c]: round(float(r), 4) for c, r in zip(present, found.noise_rate)})

    scores = outlier_scores(knn_cosines(unit, knn, seed=seed))
    outliers = [{"file": files[i], "score": round(float(scores[i]), 4)} for i in outlier_indices(scores)]

    sizes = [(s.get("width"), s.get("height")) for s in stats]
    odd = (odd_size(*np.array(sizes, dtype=np.float64).T) if n and all(w and h for w, h in sizes)
           else np.zeros(n, bool))
    image_issues = [{"file": files[i], "issues": list(s["issues"]) + (["odd_size"] if odd[i] else [])}
                    for i, s in enumerate(stats) if s["issues"] or odd[i]]
    return {
        "near_duplicates": near_duplicates,
        "label_issues": label_list,
        "outliers": outliers,
        "image_issues": image_issues,
        "estimated_noise": noise,
        "settings": {"hash_radius": hash_radius, "cosine_threshold": cosine_threshold, "folds": folds,
                     "seed": seed, "knn": knn, "images": n},
    }



# ----------------------------------------------------------------------------------------------
# the stage


def audit(cfg: Config, paths: RunPaths, rt: Runtime) -> Path:
    """Write ``<out>/audit.json`` and ``<out>/report/review.html`` from clean's report.

    Hashes and quality measurements come from clean's one decode; features are the view-0
    backbone features of every usable image, from the per-image cache that training shares.
    """
    report = read_run_file(paths.clean_report, f"run `python -m jobs clean --out {paths.out} --data DATA`",
                           ("files", "classes", "data_hash"))
    classes = sorted(report["classes"])
    usable = [f for f in report["files"] if f["status"] != "excluded"]
    if not usable:
        raise JobError(f"{paths.clean_report} lists no usable image; nothing to audit")
    index = {name: i for i, name in enumerate(classes)}
    seed_everything(cfg.seed)  # the same seeded backbone training builds (weights: none)
    model = build_model(cfg.arch, len(classes), cfg.weights).eval()
    parts = split_backbone_head(model)
    if parts is not None:
        backbone = parts[0]
    else:  # pooled features, as the head sees them (dropout is off in eval mode)
        model.set_submodule(head_path(model), nn.Identity())
        backbone = model
    backbone.to(rt.device, memory_format=rt.memory_format())
    items = [(f["output"], f["sha256"]) for f in usable]
    feats = features.view_features(cfg, paths, rt, backbone, len(classes), items, 1, "audit")[:, 0].numpy()
    doc = audit_document([f["source"] for f in usable], np.array([index[f["label"]] for f in usable]), classes,
                         phash_array([f["stats"]["phash"] for f in usable]), feats, [f["stats"] for f in usable],
                         hash_radius=cfg.audit_hash_radius, cosine_threshold=cfg.audit_cosine_threshold,
                         folds=cfg.audit_folds, seed=cfg.seed)
    doc["near_duplicates"] = exact_conflicts(report["files"]) + doc["near_duplicates"]
    doc.update(classes=classes, data_hash=report["data_hash"], label_issues_mode=cfg.label_issues)
    atomic_write_json(paths.audit, doc)
    outputs = {f["source"]: paths.out / f["output"] for f in report["files"] if f["output"]}
    render_review(doc, outputs.get, classes, paths.report / "review.html", str(paths.out.resolve()))
    groups = doc["near_duplicates"]
    print(f"audit: {len(groups)} near-duplicate groups ({sum(g['cross_class'] for g in groups)} across classes), "
          f"{len(doc['label_issues'])} label issues, {len(doc['outliers'])} outliers, "
          f"{len(doc['image_issues'])} images with quality flags; review: {paths.report / 'review.html'}")
    return paths.audit


def exact_conflicts(files: Sequence[dict]) -> list[dict]:
    """Groups of pixel-identical images in more than one class, which clean excluded as label_conflict
    (or kept, where a decision said so): the audit lists them first, for review."""
    by_pixels: dict[str, list[dict]] = {}
    for f in files:
        if f.get("pixel_hash") and (f["status"] != "excluded" or f["reason"] == "label_conflict"):
            by_pixels.setdefault(f["pixel_hash"], []).append(f)
    groups = []
    for members in by_pixels.values():
        classes = sorted({f["label"] for f in members})
        if len(classes) > 1 and any(f["reason"] == "label_conflict" for f in members):
            groups.append({"files": sorted(f["source"] for f in members), "classes": classes, "cross_class": True,
                           "similarity": 1.0, "max_hamming": 0, "exact": True})
    return sorted(groups, key=lambda g: g["files"])
