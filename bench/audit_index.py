"""Issue 27: the audit's neighbour search, exact against the faiss HNSW index, as the photos grow.

100,000 real photos are not at hand, so the features are synthetic, built from real ones:

- **unrelated photos**: Gaussian draws with the covariance of real features, the EfficientNet-Lite0
  ImageNet features of the scenes sample's 2,400 photos (their 1,280 eigenvalues and directions).
  Such draws have the real features' spread over dimensions but no clusters (real photos gather by
  scene and class), which makes a neighbour search harder than real photos would: a pessimistic model.
- **near-copies**: 1 % of the photos get one copy each, of five kinds in turn, at a cosine to their
  original drawn uniformly between the lowest cosine that kind of copy reached on real photos (half
  size, JPEG q50, 10 % crop, brightness, 5-degree rotation; ``bench/results/audit.json``, Lite0 on
  hymenoptera: 0.52 to 0.87) and 0.97. Their pHash differs from the original's in 10 to 22 random
  bits, beyond ``audit_hash_radius``, so pHash alone never finds them: every near-duplicate pair must
  come through the neighbour search, as crops and rotations do. Other pHashes are random.

For each size it times the exact search and the index (build + search, on the same unit features), and
measures the index against exact search: recall of the 10 nearest, and recall of the near-duplicate pairs
the audit's rule finds with exact neighbours (``duplicate_pairs``, the same rule run on each search's
neighbours), plus the injected copies each finds. At the smallest size it also checks that two builds
give the same neighbours. Prints them side by side and writes ``bench/results/audit_index-cpu.json``.

    python -m bench.audit_index [--photos 5000 25000 100000] [--cache /tmp/audit-index]
    python -m bench.audit_index --scan 25000    # the index's parameters: M, efConstruction, efSearch
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.audit import REAL_ARCH, _timed, features
from bench.common import REPO, RESULTS, SCENES, save_result
from jobs import audit

COPY_SHARE = 0.01
COPY_BITS = (10, 22)  # pHash bits a copy differs in: beyond the pHash radius (8), within the mutual test's 16 or
# the feature test's 24, as 10 % crops (up to 18-20 bits) and 5-degree rotations (up to 22) reached on real photos
HIGHEST_COPY_COSINE = 0.97
KINDS = ("resize_0.5", "jpeg_q50", "crop_10pct", "brightness_20", "rotate_5")


def real_spectrum(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, eigenvectors as columns) of the covariance of the scenes sample's Lite0 features."""
    from scripts.offline_weights import build

    weights = build(REPO / ".cache" / "weights" / "tf_efficientnet_lite0.pth")
    blobs = [path.read_bytes() for path in sorted(SCENES.glob("*/*.jpg"))]
    cache.mkdir(parents=True, exist_ok=True)
    feats = features(REAL_ARCH, weights, blobs, cache).astype(np.float64)
    values, vectors = np.linalg.eigh(np.cov(feats, rowvar=False))
    return np.maximum(values, 0.0), vectors


def lowest_copy_cosines() -> dict[str, float]:
    """Per kind of copy, the lowest cosine to its original measured on real photos (Lite0, hymenoptera)."""
    figures = json.loads((RESULTS / "audit.json").read_text())["near_duplicates"][f"hymenoptera/real:{REAL_ARCH}"]
    copies = figures["separations"]["copies_to_their_original"]
    return {kind: copies[kind]["lowest_cosine"] for kind in KINDS}


def synthetic_set(n: int, spectrum: tuple[np.ndarray, np.ndarray], lowest: dict[str, float],
                  seed: int = 0) -> dict:
    """``n`` photos' float32 features and uint64 pHashes; ``copies`` (m, 2): (original, copy) rows."""
    rng = np.random.default_rng(seed)
    values, vectors = spectrum
    mix = (vectors * np.sqrt(values)).T.astype(np.float32)  # z @ mix ~ N(0, covariance)
    feats = np.empty((n, len(values)), np.float32)
    for start in range(0, n, 10_000):  # drawn in blocks: the float64 normals of all 100,000 would be 1 GB
        rows = min(n, start + 10_000) - start
        feats[start:start + rows] = rng.standard_normal((rows, len(values)), dtype=np.float32) @ mix
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    m = int(n * COPY_SHARE)
    originals, copies = rng.choice(n, 2 * m, replace=False).reshape(2, m)
    # a copy keeps a share a of its original plus independent noise of the same law: cosine ~ a / sqrt(a^2 + 1)
    floor = np.array([lowest[KINDS[c % len(KINDS)]] for c in range(m)])
    target = rng.uniform(floor, HIGHEST_COPY_COSINE)
    share = (target / np.sqrt(1.0 - target**2)).astype(np.float32)[:, None]
    noise = rng.standard_normal((m, len(values)), dtype=np.float32) @ mix
    feats[copies] = (share * feats[originals] + noise) / np.sqrt(share**2 + 1.0)
    bits = rng.integers(COPY_BITS[0], COPY_BITS[1] + 1, m)
    flipped = np.argsort(rng.random((m, 64)), axis=1) < bits[:, None]  # bits[c] distinct random positions
    masks = (flipped.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    hashes[copies] = hashes[originals] ^ masks
    return {"features": feats, "hashes": hashes, "copies": np.stack([originals, copies], axis=1),
            "target_cosine": target}


def _pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> set[int]:
    return set((np.minimum(i, j) * n + np.maximum(i, j)).tolist())


def measure(n: int, spectrum: tuple[np.ndarray, np.ndarray], lowest: dict[str, float], k: int = audit.DEFAULT_KNN,
            repeat: bool = False) -> dict:
    """Exact search against the index on one synthetic set of ``n`` photos."""
    items = synthetic_set(n, spectrum, lowest)
    unit = audit.unit_features(items["features"])
    del items["features"]
    exact, exact_wall, exact_cpu = _timed(audit.nearest_neighbours, unit, k, exact_max=n)
    approx, approx_wall, approx_cpu = _timed(audit.nearest_neighbours, unit, k, exact_max=0)
    knn_recall = float(np.mean((approx.index[:, :, None] == exact.index[:, None, :]).any(axis=2)))
    rule = audit.DuplicateRule().judged_by(unit, items["hashes"])
    found = {}
    for name, neighbours in (("exact", exact), ("approximate", approx)):
        pairs = audit.duplicate_pairs(audit.Geometry.of(items["hashes"], unit, neighbours), neighbours, rule)
        found[name] = _pair_keys(pairs.i, pairs.j, n)
    injected = _pair_keys(items["copies"][:, 0], items["copies"][:, 1], n)
    copy_cosines = audit.pair_cosines(unit, items["copies"][:, 0], items["copies"][:, 1])
    result = {
        "photos": n, "dim": unit.shape[1], "k": k, "injected_copies": len(injected),
        "copy_cosine_range": [round(float(copy_cosines.min()), 3), round(float(copy_cosines.max()), 3)],
        "median_neighbour_scale": round(float(np.median(exact.scale())), 4),
        "exact_wall_s": exact_wall, "exact_cpu_s": exact_cpu,
        "approximate_wall_s": approx_wall, "approximate_cpu_s": approx_cpu, "approximate_search": approx.search,
        "knn_recall": round(knn_recall, 4),
        "duplicate_pairs_exact": len(found["exact"]),
        "duplicate_pairs_recall": round(len(found["exact"] & found["approximate"]) / max(len(found["exact"]), 1), 4),
        "duplicate_pairs_only_approximate": len(found["approximate"] - found["exact"]),
        "injected_found_exact": len(injected & found["exact"]),
        "injected_found_approximate": len(injected & found["approximate"]),
    }
    if repeat:  # an interrupted audit reruns: the index must list the same neighbours again
        again = audit.nearest_neighbours(unit, k, exact_max=0)
        result["approximate_repeats_identically"] = bool((again.index == approx.index).all()
                                                         and (again.cosine == approx.cosine).all())
    return result


MODEL = "\n\n".join(__doc__.split("\n\n")[1:3])  # what the features are, as the results file says it
SCAN = ((32, 80, 128), (32, 160, 128), (32, 320, 128), (16, 320, 128), (32, 640, 128), (32, 640, 64))


def scan(n: int, spectrum: tuple[np.ndarray, np.ndarray], lowest: dict[str, float], k: int = audit.DEFAULT_KNN,
         settings: tuple[tuple[int, int, int], ...] = SCAN) -> list[dict]:
    """The index's (M, efConstruction, efSearch) ``settings`` on one synthetic set: time and recalls against exact."""
    items = synthetic_set(n, spectrum, lowest)
    unit = audit.unit_features(items["features"])
    exact = audit.nearest_neighbours(unit, k, exact_max=n)
    rule = audit.DuplicateRule().judged_by(unit, items["hashes"])
    exact_pairs = audit.duplicate_pairs(audit.Geometry.of(items["hashes"], unit, exact), exact, rule)
    wanted = _pair_keys(exact_pairs.i, exact_pairs.j, n)
    found = []
    for m, ef_construction, ef_search in settings:
        approx, wall, cpu = _timed(audit.hnsw_neighbours, unit, k, m=m, ef_construction=ef_construction,
                                   ef_search=ef_search)
        pairs = audit.duplicate_pairs(audit.Geometry.of(items["hashes"], unit, approx), approx, rule)
        got = _pair_keys(pairs.i, pairs.j, n)
        found.append({"photos": n, "M": m, "ef_construction": ef_construction, "ef_search": ef_search,
                      "wall_s": wall, "cpu_s": cpu,
                      "knn_recall": round(float(np.mean((approx.index[:, :, None] == exact.index[:, None, :])
                                                        .any(axis=2))), 4),
                      "duplicate_pairs_recall": round(len(wanted & got) / max(len(wanted), 1), 4)})
        print(json.dumps(found[-1]), flush=True)
    return found


def run(photos: list[int], cache: Path) -> list[dict]:
    """``measure`` at each size (the first also checks that a rerun gives the same neighbours), printed as it goes."""
    spectrum, lowest = real_spectrum(cache), lowest_copy_cosines()
    runs = []
    for number, n in enumerate(photos):
        runs.append(measure(n, spectrum, lowest, repeat=number == 0))
        print(json.dumps(runs[-1]), flush=True)
    return runs


def print_table(runs: list[dict]) -> None:
    rows = [("exact: wall s (CPU s)", lambda r: f"{r['exact_wall_s']} ({r['exact_cpu_s']})"),
            ("HNSW build+search: wall s (CPU s)", lambda r: f"{r['approximate_wall_s']} ({r['approximate_cpu_s']})"),
            ("recall of the 10 nearest", lambda r: f"{r['knn_recall']:.4f}"),
            ("exact near-duplicate pairs", lambda r: str(r["duplicate_pairs_exact"])),
            ("recall of those pairs", lambda r: f"{r['duplicate_pairs_recall']:.4f}"),
            ("pairs only the index found", lambda r: str(r["duplicate_pairs_only_approximate"])),
            ("injected copies found (exact / HNSW)",
             lambda r: f"{r['injected_found_exact']}/{r['injected_found_approximate']} of {r['injected_copies']}"),
            ("index memory (MiB)", lambda r: str(r["approximate_search"]["index_mib"]))]
    print(f"{'':<38}" + "".join(f"{r['photos']:>13,} photos" for r in runs))
    for title, cell in rows:
        print(f"{title:<38}" + "".join(f"{cell(r):>20}" for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, nargs="+", default=[5000, 25000, 100000])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/audit-index"))
    parser.add_argument("--scan", type=int, default=0, metavar="N",
                        help="instead: the index's parameters (SCAN) against exact search on N photos")
    opts = parser.parse_args()
    if opts.scan:
        found = scan(opts.scan, real_spectrum(opts.cache), lowest_copy_cosines())
        save_result("audit_index_scan", "cpu", {"model": MODEL, "settings": found})
        return
    runs = run(opts.photos, opts.cache)
    print_table(runs)
    save_result("audit_index", "cpu", {"model": MODEL, "runs": runs})


if __name__ == "__main__":
    main()
