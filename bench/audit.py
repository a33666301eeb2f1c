"""The data audit measured on real photos, and its cost at 50k items.

(a) Near-duplicates: copies of hymenoptera photos (resized to 0.5-0.7, JPEG q40-60, cropped to
    90%, brightened +-20%, a small text overlay) must group with their original (recall), and
    distinct photos must not (false pairs among the 397 originals). Per signal over a grid of
    thresholds, for both stand-in backbones (bench/common.py), and the chosen thresholds
    combined, against CleanVision-style exact pHash equality and clean's pixel-hash dedupe.
(b) Label issues: 10% of the labels flipped; precision and recall at k = number of flips for
    out-of-fold confident learning (ours), fastai-style in-sample loss ranking, and random; on
    the real photos' features (random-weight backbones: weak) and on features that separate.
(c) Cost of what the audit adds beyond the backbone passes: per-image stats on real photos, and
    ``audit_document`` on 50k synthetic items (hashes + 512-d features), wall and CPU seconds.

    python -m bench.audit [--copies 60] [--cache /tmp/audit-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from bench.common import (
    HYMENOPTERA,
    REPO,
    RESULTS,
    atomic_write_json,
    bn_backbone,
    calibrated_random_backbone,
    decode_rgb,
    eval_transform,
    machine,
    seeded_resnet18,
)
from jobs import audit
from jobs.imagestats import image_stats, phash_array

BN_FILE = REPO / "tests" / "fixtures" / "resnet18_bn_hymenoptera.statedict"
RADII = list(range(0, 17))
COSINES = [0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _overlay(img: Image.Image) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    size = max(10, img.height // 18)
    draw.text((img.width // 30, img.height - 2 * size), "(c) stock-photos.example 2026", fill=(255, 255, 255),
              font_size=size)
    return out


def _crop90(img: Image.Image) -> Image.Image:
    w, h = img.size
    dw, dh = round(w * 0.05), round(h * 0.05)
    return img.crop((dw, dh, w - dw, h - dh))


def _resized(img: Image.Image, f: float) -> Image.Image:
    return img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)


COPIES = {
    "resize_0.5": lambda im: _png(_resized(im, 0.5)),
    "resize_0.6": lambda im: _png(_resized(im, 0.6)),
    "resize_0.7": lambda im: _png(_resized(im, 0.7)),
    "jpeg_q40": lambda im: _jpeg(im, 40),
    "jpeg_q50": lambda im: _jpeg(im, 50),
    "jpeg_q60": lambda im: _jpeg(im, 60),
    "crop_90": lambda im: _png(_crop90(im)),
    "bright_+20": lambda im: _png(ImageEnhance.Brightness(im).enhance(1.2)),
    "bright_-20": lambda im: _png(ImageEnhance.Brightness(im).enhance(0.8)),
    "text_overlay": lambda im: _png(_overlay(im)),
}


def _decode_for_clean(data: bytes) -> Image.Image:
    """What clean holds after its one decode: upright RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def _pixel_hash(rgb: Image.Image) -> str:
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


@torch.no_grad()
def _features(state_file: Path, blobs: list[bytes], batch: int = 32) -> np.ndarray:
    model = seeded_resnet18(0)
    model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    transform = eval_transform()
    out = []
    for i in range(0, len(blobs), batch):
        out.append(model(torch.stack([transform(decode_rgb(b)) for b in blobs[i:i + batch]])).numpy())
    return np.concatenate(out)


def build_corpus(copies_per_kind: int, cache: Path) -> dict:
    """Originals + copies: bytes-derived hashes, pixel hashes, features from both stand-ins (cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    originals = sorted(p for p in HYMENOPTERA.rglob("*.jpg"))
    labels = np.array([0 if p.parent.name == "ants" else 1 for p in originals])
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(originals), copies_per_kind, replace=False))
    blobs = [p.read_bytes() for p in originals]
    source, kind = list(range(len(originals))), ["original"] * len(originals)
    for i in chosen:
        img = _decode_for_clean(blobs[i])
        for name, make in COPIES.items():
            blobs.append(make(img))
            source.append(int(i))
            kind.append(name)
    decoded = [_decode_for_clean(b) for b in blobs]
    t = time.perf_counter()
    stats = [image_stats(im) for im in decoded]
    stats_ms = (time.perf_counter() - t) / len(decoded) * 1000
    corpus = {"originals": originals, "labels": labels, "source": np.array(source), "kind": np.array(kind),
              "hashes": phash_array([s["phash"] for s in stats]), "stats": stats, "stats_ms": stats_ms,
              "pixel_hash": [_pixel_hash(im) for im in decoded]}
    key = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blobs)).hexdigest()[:16]
    for name, make_backbone in (("bn_backbone", lambda out: bn_backbone(BN_FILE, out)),
                                ("calibrated_random", lambda out: calibrated_random_backbone(originals, out))):
        feature_file = cache / f"features-{name}-{key}.npy"
        if not feature_file.exists():
            state = make_backbone(cache / f"{name}.statedict")
            t = time.perf_counter()
            np.save(feature_file, _features(state, blobs))
            print(f"{name}: {len(blobs)} images in {time.perf_counter() - t:.0f} s")
        corpus[name] = np.load(feature_file)
    return corpus


def _pair_values(corpus: dict, unit: np.ndarray) -> dict:
    """For each copy: its Hamming distance and cosine to its original; all pairs of distinct originals."""
    n_orig = len(corpus["originals"])
    copy_idx = np.flatnonzero(corpus["kind"] != "original")
    orig = corpus["source"][copy_idx]
    h = corpus["hashes"]
    iu, ju = np.triu_indices(n_orig, 1)
    cos_orig = unit[:n_orig] @ unit[:n_orig].T
    return {"copy_kind": corpus["kind"][copy_idx],
            "copy_ham": np.bitwise_count(h[copy_idx] ^ h[orig]),
            "copy_cos": np.einsum("ij,ij->i", unit[copy_idx], unit[orig]),
            "orig_ham": np.bitwise_count(h[iu] ^ h[ju]),
            "orig_cos": cos_orig[iu, ju], "orig_pairs": (iu, ju)}


def _recall(hit: np.ndarray, kinds: np.ndarray) -> dict:
    out = {k: round(float(hit[kinds == k].mean()), 3) for k in COPIES}
    out["all"] = round(float(hit.mean()), 3)
    return out


def near_duplicates(corpus: dict, radius: int, cosine: float) -> dict:
    result: dict = {"copies": int((corpus["kind"] != "original").sum()), "originals": len(corpus["originals"]),
                    "original_pairs": math.comb(len(corpus["originals"]), 2)}
    kinds = corpus["kind"][corpus["kind"] != "original"]
    v0 = None
    for name in ("bn_backbone", "calibrated_random"):
        v = _pair_values(corpus, audit.unit_features(corpus[name]))
        v0 = v
        unit_originals = audit.unit_features(corpus[name][:len(corpus["originals"])])
        originals_only, (iu, ju) = unit_originals @ unit_originals.T, v["orig_pairs"]
        result[name] = {
            "cosine_grid": {f"{t:.2f}": {"recall": _recall(v["copy_cos"] >= t, kinds)["all"],
                                         "false_pairs": int((v["orig_cos"] >= t).sum())} for t in COSINES},
            "chosen_cosine": {"threshold": cosine, "recall": _recall(v["copy_cos"] >= cosine, kinds),
                              "false_pairs": int((v["orig_cos"] >= cosine).sum()),
                              # the audit centres on the data it is given: without the copies, too
                              "false_pairs_centred_on_originals": int((originals_only[iu, ju] >= cosine).sum())},
            "combined": {"recall": _recall((v["copy_cos"] >= cosine) | (v["copy_ham"] <= radius), kinds),
                         "false_pairs": int(((v["orig_cos"] >= cosine) | (v["orig_ham"] <= radius)).sum())},
            "copy_cosine_percentiles": np.percentile(v["copy_cos"], [0, 5, 50]).round(4).tolist(),
            "original_cosine_max": round(float(v["orig_cos"].max()), 4),
            "original_cosine_max_centred_on_originals": round(float(originals_only[iu, ju].max()), 4),
        }
    v = v0
    result["phash_grid"] = {str(r): {"recall": _recall(v["copy_ham"] <= r, kinds)["all"],
                                     "false_pairs": int((v["orig_ham"] <= r).sum())} for r in RADII}
    result["phash_chosen"] = {"radius": radius, "recall": _recall(v["copy_ham"] <= radius, kinds),
                              "false_pairs": int((v["orig_ham"] <= radius).sum())}
    result["cleanvision_exact_phash"] = {"recall": _recall(v["copy_ham"] == 0, kinds),
                                         "false_pairs": int((v["orig_ham"] == 0).sum())}
    px = np.array(corpus["pixel_hash"])
    copy_idx = np.flatnonzero(corpus["kind"] != "original")
    result["pixel_hash_dedupe"] = {"recall": _recall(px[copy_idx] == px[corpus["source"][copy_idx]], kinds),
                                   "false_pairs": int(len(px[:len(corpus["originals"])])
                                                      - len(set(px[:len(corpus["originals"])])))}
    iu, ju = v["orig_pairs"]
    closest = np.argsort(v["orig_ham"])[:3]
    result["closest_distinct_by_phash"] = [
        {"a": str(corpus["originals"][iu[c]].relative_to(HYMENOPTERA)),
         "b": str(corpus["originals"][ju[c]].relative_to(HYMENOPTERA)), "hamming": int(v["orig_ham"][c])}
        for c in closest]
    return result


def _precision_at_k(ranking: np.ndarray, flipped: np.ndarray) -> float:
    k = len(flipped)
    return len(set(ranking[:k].tolist()) & set(flipped.tolist())) / k


def _in_sample_loss_ranking(features: np.ndarray, labels: np.ndarray, c: float) -> np.ndarray:
    """fastai's ImageClassifierCleaner order: the model trained on everything, highest loss first."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500, tol=1e-3)).fit(features, labels)
    given = model.predict_proba(features)[np.arange(len(labels)), labels]
    return np.argsort(given, kind="stable")  # lowest probability of the given label = highest loss


def label_issue_ranking(features: np.ndarray, labels: np.ndarray, seeds: int = 5, rate: float = 0.10) -> dict:
    classes = int(labels.max()) + 1
    scores: dict[str, list] = {"oof_confident_learning": [], "in_sample_loss": [], "in_sample_loss_fitted": [],
                               "random": [],
                               "cleanlab_flagged_precision": [], "cleanlab_flagged_recall": []}
    for seed in range(seeds):
        rng = np.random.default_rng(100 + seed)
        flipped = np.sort(rng.choice(len(labels), round(rate * len(labels)), replace=False))
        noisy = labels.copy()
        noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
        probs = audit.out_of_fold_probabilities(features, noisy, seed=seed)
        found = audit.label_issues(noisy, probs)
        scores["oof_confident_learning"].append(_precision_at_k(np.argsort(found.quality, kind="stable"), flipped))
        # the same head as ours (C=0.1), and one trained to fit its labels (C=100), as a fine-tuned net is
        scores["in_sample_loss"].append(_precision_at_k(_in_sample_loss_ranking(features, noisy, 0.1), flipped))
        scores["in_sample_loss_fitted"].append(_precision_at_k(_in_sample_loss_ranking(features, noisy, 100.0),
                                                               flipped))
        scores["random"].append(_precision_at_k(rng.permutation(len(labels)), flipped))
        hits = len(set(found.ranked.tolist()) & set(flipped.tolist()))
        scores["cleanlab_flagged_precision"].append(hits / max(1, len(found.ranked)))
        scores["cleanlab_flagged_recall"].append(hits / len(flipped))
    return {"images": len(labels), "flips": round(rate * len(labels)), "seeds": seeds,
            "precision_at_k_equals_recall_at_k": {k: round(float(np.mean(v)), 3) for k, v in scores.items()
                                                  if not k.startswith("cleanlab_")},
            "cleanlab_flagged_set": {"precision": round(float(np.mean(scores["cleanlab_flagged_precision"])), 3),
                                     "recall": round(float(np.mean(scores["cleanlab_flagged_recall"])), 3)}}


def separating_features(n: int = 600, classes: int = 5, dim: int = 256, seed: int = 0) -> tuple:
    """Gaussian class clusters a linear head separates (~98% held out), few images per dimension."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * 0.5
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def synthetic_items(n: int, dim: int = 512, classes: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = (rng.normal(size=(classes, dim))[labels] * 0.5 + rng.normal(size=(n, dim))).astype(np.float32)
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    copies, targets = rng.choice(n, 2 * (n // 100), replace=False).reshape(2, -1)  # 1%: a near-copy of another
    flips = np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
    hashes[targets] = hashes[copies] ^ flips
    features[targets] = features[copies] + 0.05 * rng.normal(size=(len(copies), dim)).astype(np.float32)
    stats = [{"issues": [], "width": 640, "height": 480}] * n
    return {"files": [f"c{labels[i]}/{i}.jpg" for i in range(n)], "labels": labels, "features": features,
            "hashes": hashes, "stats": stats, "class_names": [f"c{c}" for c in range(classes)]}


def _timed(fn, *args, **kwargs) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def audit_cost(n: int) -> dict:
    items = synthetic_items(n)
    unit, w_unit, c_unit = _timed(audit.unit_features, items["features"])
    parts = {}
    hp, parts["hash_pairs_wall_s"], parts["hash_pairs_cpu_s"] = _timed(audit.hash_pairs, items["hashes"],
                                                                         audit.DEFAULT_HASH_RADIUS)
    cp, parts["cosine_pairs_wall_s"], parts["cosine_pairs_cpu_s"] = _timed(audit.cosine_pairs, unit,
                                                                           audit.DEFAULT_COSINE_THRESHOLD)
    groups, parts["groups_wall_s"], parts["groups_cpu_s"] = _timed(audit.near_duplicate_groups, n, [hp, cp], unit,
                                                                   items["hashes"])
    knn, parts["knn_wall_s"], parts["knn_cpu_s"] = _timed(audit.knn_cosines, unit)
    probs, parts["oof_folds_wall_s"], parts["oof_folds_cpu_s"] = _timed(audit.out_of_fold_probabilities,
                                                                        items["features"], items["labels"])
    _, parts["cleanlab_wall_s"], parts["cleanlab_cpu_s"] = _timed(audit.label_issues, items["labels"], probs)
    doc, wall, cpu = _timed(audit.audit_document, items["files"], items["labels"], items["class_names"],
                            items["hashes"], items["features"], items["stats"])
    chance = math.comb(n, 2) * sum(math.comb(64, k) for k in range(audit.DEFAULT_HASH_RADIUS + 1)) / 2**64
    return {"items": n, "dim": items["features"].shape[1], "injected_copies": n // 100,
            "groups_found": len(doc["near_duplicates"]),
            "expected_chance_hash_pairs": round(chance, 1),  # uniformly random 64-bit hashes within the radius
            "parts": parts,
            "audit_document_wall_s": wall, "audit_document_cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=60, help="photos that get each kind of copy")
    parser.add_argument("--items", type=int, default=50_000, help="synthetic items for the cost run")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/audit-bench"), help="feature cache folder")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    corpus = build_corpus(args.copies, args.cache)
    dup = near_duplicates(corpus, audit.DEFAULT_HASH_RADIUS, audit.DEFAULT_COSINE_THRESHOLD)
    print("near-duplicates:", {k: dup[k] for k in ("phash_chosen", "cleanvision_exact_phash", "pixel_hash_dedupe")})
    for name in ("bn_backbone", "calibrated_random"):
        print(f"  {name}: cosine {dup[name]['chosen_cosine']}, combined {dup[name]['combined']}")

    n_orig = len(corpus["originals"])
    labels = {"bn_backbone_real_photos": label_issue_ranking(corpus["bn_backbone"][:n_orig], corpus["labels"]),
              "calibrated_random_real_photos": label_issue_ranking(corpus["calibrated_random"][:n_orig],
                                                                   corpus["labels"]),
              "separating_synthetic": label_issue_ranking(*separating_features())}
    for name, r in labels.items():
        print(f"label issues, {name}: {r['precision_at_k_equals_recall_at_k']} flagged {r['cleanlab_flagged_set']}")

    originals = corpus["originals"]
    real_stats = corpus["stats"][:n_orig]
    real_doc, real_wall, real_cpu = _timed(audit.audit_document, [str(p.relative_to(HYMENOPTERA)) for p in originals],
                                    corpus["labels"], ["ants", "bees"], corpus["hashes"][:n_orig],
                                    corpus["bn_backbone"][:n_orig], real_stats)
    cost = {"image_stats_ms_per_image": round(corpus["stats_ms"], 2),
            "real_photos": {"images": n_orig, "audit_document_wall_s": real_wall, "audit_document_cpu_s": real_cpu,
                            "found": {k: len(v) for k, v in real_doc.items() if isinstance(v, list)},
                            "near_duplicates": real_doc["near_duplicates"],
                            "estimated_noise": real_doc["estimated_noise"]},
            "synthetic": audit_cost(args.items)}
    print("cost:", cost)
    out = atomic_write_json(RESULTS / "audit.json", {
        "benchmark": "audit", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine("cpu"),
        "note": "2 cores shared with other engineers' jobs: wall times are under load; CPU seconds are steadier",
        "near_duplicates": dup, "label_issues": labels, "cost": cost})
    print(f"saved {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
