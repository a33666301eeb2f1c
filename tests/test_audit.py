"""The audit's algorithms on real photos and injected problems: copies, label flips, outliers, dark images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from jobs import audit
from jobs.imagestats import image_stats, phash_array

FIXTURE = Path(__file__).parent / "fixtures" / "hymenoptera_small"


def _photos() -> list[tuple[str, Image.Image]]:
    out = []
    for path in sorted(FIXTURE.glob("*/*.jpg")):
        with Image.open(path) as img:
            out.append((str(path.relative_to(FIXTURE)), ImageOps.exif_transpose(img).convert("RGB")))
    return out


def _reencoded(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _overlaid(img: Image.Image) -> Image.Image:
    out = img.copy()
    ImageDraw.Draw(out).text((5, img.height - 20), "(c) example.com", fill=(255, 255, 255), font_size=14)
    return out


COPIES = {
    "resized_0.6": lambda im: im.resize((round(im.width * 0.6), round(im.height * 0.6)), Image.Resampling.LANCZOS),
    "jpeg_q50": lambda im: _reencoded(im, 50),
    "brighter_20": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "darker_20": lambda im: ImageEnhance.Brightness(im).enhance(0.8),
    "text_overlay": _overlaid,
}


def test_injected_copies_are_grouped_with_their_original_and_distinct_photos_are_not():
    photos = _photos()
    files = [name for name, _ in photos]
    hashes = [image_stats(img)["phash"] for _, img in photos]
    originals = len(files)
    for name, img in photos[:4]:
        for kind, make in COPIES.items():
            files.append(f"{name}#{kind}")
            hashes.append(image_stats(make(img))["phash"])
    h = phash_array(hashes)
    groups = audit.near_duplicate_groups(len(files), [audit.hash_pairs(h, audit.DEFAULT_HASH_RADIUS)], hashes=h)
    as_files = sorted(sorted(files[m] for m in g["members"]) for g in groups)
    expected = sorted(sorted([name] + [f"{name}#{kind}" for kind in COPIES]) for name, _ in photos[:4])
    assert as_files == expected
    assert all(g["max_hamming"] <= audit.DEFAULT_HASH_RADIUS * 2 for g in groups)
    assert not any(m < originals and n < originals for g in groups for m in g["members"] for n in g["members"]
                   if m != n)


@pytest.mark.parametrize("radius", [0, 3, 10, 15])
def test_hash_pairs_equal_brute_force(radius):
    rng = np.random.default_rng(radius)
    h = rng.integers(0, 2**64 - 1, 1500, dtype=np.uint64, endpoint=True)
    for src, dst in rng.integers(0, len(h), (80, 2)):  # near copies: a few bits flipped
        h[dst] = h[src] ^ np.bitwise_or.reduce(np.uint64(1) << rng.integers(0, 64, rng.integers(1, 12)).astype(
            np.uint64))
    pairs = audit.hash_pairs(h, radius)
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    want_i, want_j = np.nonzero(np.triu(dist <= radius, 1))
    assert set(zip(pairs.i.tolist(), pairs.j.tolist())) == set(zip(want_i.tolist(), want_j.tolist()))
    assert (pairs.value == dist[pairs.i, pairs.j]).all()


def test_cosine_pairs_and_knn_equal_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1300, 32)).astype(np.float32)
    x[700:720] = x[:20] + 0.05 * rng.normal(size=(20, 32))
    unit = audit.unit_features(x)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    pairs = audit.cosine_pairs(unit, 0.6, block=97)  # blocks that do not divide n
    want_i, want_j = np.nonzero(np.triu(sims >= 0.6, 1))
    assert set(zip(pairs.i.tolist(), pairs.j.tolist())) == set(zip(want_i.tolist(), want_j.tolist()))
    assert {(i, i + 700) for i in range(20)} <= set(zip(pairs.i.tolist(), pairs.j.tolist()))
    knn = audit.knn_cosines(unit, 5, block=97)
    assert np.allclose(np.sort(knn, axis=1), np.sort(np.partition(sims, -5, axis=1)[:, -5:], axis=1), atol=1e-5)


def _separating(n: int = 600, classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim)) * 3.0
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _document(features, labels, class_names, stats=None, hashes=None):
    n = len(labels)
    files = [f"{class_names[y]}/img{i:04d}.jpg" for i, y in enumerate(labels)]
    hashes = np.random.default_rng(9).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True) \
        if hashes is None else hashes
    stats = stats or [{"issues": [], "width": 640, "height": 480}] * n
    return files, audit.audit_document(files, labels, class_names, hashes, features, stats)


def test_injected_label_flips_rank_on_top_on_separating_features():
    features, true = _separating()
    rng = np.random.default_rng(3)
    flipped = rng.choice(len(true), 60, replace=False)
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, 4, len(flipped))) % 4
    names = ["ants", "bees", "cats", "dogs"]
    files, doc = _document(features, given, names)
    top = doc["label_issues"][:len(flipped)]
    flipped_files = {files[i] for i in flipped}
    assert sum(e["file"] in flipped_files for e in top) >= 0.9 * len(flipped)
    for e in top:
        if e["file"] in flipped_files:
            i = files.index(e["file"])
            assert e["given"] == names[given[i]] and e["suggested"] == names[true[i]]
    scores = [e["score"] for e in doc["label_issues"]]
    assert scores == sorted(scores, reverse=True)
    # 10% flipped overall, spread over the classes: each class's estimated noise is near it
    assert all(0.03 < rate < 0.25 for rate in doc["estimated_noise"].values())


def test_clean_labels_give_few_issues_and_the_ranking_is_out_of_fold():
    features, labels = _separating(seed=5)
    probs = audit.out_of_fold_probabilities(features, labels, folds=5, seed=0)
    assert probs.shape == (len(labels), 4) and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == labels).mean() > 0.95
    _, doc = _document(features, labels, ["a", "b", "c", "d"])
    assert len(doc["label_issues"]) < 0.03 * len(labels)


def test_off_topic_images_are_the_top_outliers():
    features, labels = _separating(n=400, classes=2)
    rng = np.random.default_rng(4)
    far = [10, 200, 333]
    features[far] = rng.normal(size=(3, features.shape[1])).astype(np.float32) * 12.0
    files, doc = _document(features, labels, ["ants", "bees"])
    assert {e["file"] for e in doc["outliers"][:3]} == {files[i] for i in far}
    scores = [e["score"] for e in doc["outliers"]]
    assert scores == sorted(scores, reverse=True) and len(scores) < 40


def test_darkened_photos_are_flagged_and_the_originals_are_not():
    photos = _photos()
    for _, img in photos:
        assert "dark" not in image_stats(img)["issues"]
        dark = image_stats(ImageEnhance.Brightness(img).enhance(0.25))
        assert "dark" in dark["issues"]
    gray = image_stats(ImageOps.grayscale(photos[0][1]).convert("RGB"))
    assert "grayscale" in gray["issues"] and "dark" not in gray["issues"]
    assert "tiny" in image_stats(photos[0][1].resize((100, 80)))["issues"]
    assert "odd_aspect_ratio" in image_stats(photos[0][1].resize((600, 100)))["issues"]
    flat = image_stats(Image.new("RGB", (300, 300), (120, 130, 140)))
    assert "low_information" in flat["issues"]


def test_image_stats_are_small_json_and_the_hash_survives_a_resize():
    _, img = _photos()[0]
    stats = image_stats(img)
    assert len(stats["phash"]) == 16 and set(stats) >= {"phash", "issues", "width", "height"}
    smaller = image_stats(img.resize((img.width // 2, img.height // 2)))
    assert bin(int(stats["phash"], 16) ^ int(smaller["phash"], 16)).count("1") <= 4


def test_document_format_cross_class_copies_and_small_inputs():
    features, labels = _separating(n=40, classes=2)
    hashes = np.random.default_rng(2).integers(0, 2**64 - 1, 40, dtype=np.uint64, endpoint=True)
    hashes[1] = hashes[0]  # img0000 (class 0) and img0001 (class 1): the same picture under two labels
    features[1] = features[0]
    files, doc = _document(features, labels, ["ants", "bees"], hashes=hashes)
    assert set(doc) >= {"near_duplicates", "label_issues", "outliers", "image_issues", "estimated_noise"}
    conflict = doc["near_duplicates"][0]
    assert conflict["files"] == [files[0], files[1]] and conflict["cross_class"] and conflict["classes"] == [
        "ants", "bees"]
    assert conflict["similarity"] == pytest.approx(1.0, abs=1e-4)
    # a class with a single image: no folds possible, label issues are skipped, nothing crashes
    _, tiny = _document(features[:3], np.array([0, 0, 1]), ["ants", "bees"])
    assert tiny["label_issues"] == [] and set(tiny["estimated_noise"]) == {"ants", "bees"}
    _, one = _document(features[:1], np.array([0]), ["ants", "bees"])
    assert one["near_duplicates"] == [] and one["outliers"] == []


def test_odd_size_uses_the_datasets_iqr_fences():
    widths = np.r_[np.linspace(580, 620, 50), 4000, 30]
    assert audit.odd_size(widths, widths * 0.75).tolist() == [False] * 50 + [True, True]
