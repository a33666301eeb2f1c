"""The audit's algorithms, as pure functions over arrays: near-duplicates, label issues, outliers.

Inputs are what clean and the shared feature cache already hold, one row per cleaned image:
``hashes`` (uint64 pHashes from ``jobs.imagestats``), ``features`` (view-0 backbone features,
(n, d) float), ``labels`` (class indices). ``audit_document`` turns them into the dict written
as ``<out>/audit.json``; the other functions are its parts. docs/audit.md explains the decisions.

- Near-duplicates: a pair of photos is a near-duplicate when their pHash and their backbone
  features agree (``DuplicateRule``); feature distances are measured against each photo's own
  neighbourhood (the distance to its k-th nearest neighbour), never against one absolute cosine,
  because how close two different photos come depends on the backbone. Groups are cliques of
  such pairs (``clique_groups``): every two photos in a group are near-duplicates themselves.
  * pHash pairs within a Hamming radius, found by multi-index hashing: the 64 bits are cut into
    radius + 1 chunks; two hashes within the radius agree exactly on at least one chunk
    (pigeonhole), so only items sharing a chunk value are compared.
  * k nearest neighbours of centred, L2-normalised features: exact, by a blocked matrix product (where
    the CPU has native bf16, a bf16 product picks candidates that are rescored in fp32), up to
    ``audit_exact_max`` photos; above it from a faiss HNSW graph (O(n log n) instead of O(n^2)), whose
    returned pairs' cosines are recomputed exactly.
- Label issues: out-of-fold predicted probabilities from a K-fold logistic-regression head on
  the features, handed to ``cleanlab.filter.find_label_issues`` and
  ``cleanlab.rank.get_label_quality_scores``; per-class noise from cleanlab's confident joint.
  Only when that head separates the classes (``label_skill``): on weak features every
  disagreement is the head's own error, and the audit says so instead of flagging.
- Outliers: mean cosine distance to the k nearest neighbours, scored as cleanlab's
  ``OutOfDistribution`` does (``1 - exp(-d / median(d))``, here "higher = more outlying").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from handler import precision
from jobs import features
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_json, read_run_file
from jobs.imagestats import phash_array
from jobs.model import build_model, split_backbone_head
from jobs.review import write_run_review
from jobs.runtime import Runtime, seed_everything

# The config keys' defaults (jobs/config.py says what they were chosen on) are the functions' defaults.
DEFAULT_HASH_RADIUS: int = Config.audit_hash_radius
DEFAULT_AGREE_RADIUS: int = Config.audit_agree_radius
DEFAULT_FEATURE_RATIO: float = Config.audit_feature_ratio
DEFAULT_MIN_LABEL_SKILL: float = Config.audit_label_min_skill
DEFAULT_FOLDS: int = Config.audit_folds
DEFAULT_MUTUAL_RADIUS: int = Config.audit_mutual_radius
DEFAULT_VETO_QUANTILE: float = Config.audit_veto_quantile
DEFAULT_CONFIRM_QUANTILE: float = Config.audit_confirm_quantile
DEFAULT_EXACT_MAX: int = Config.audit_exact_max
# The group bound's ratio: 1 is "closer than the photos around them". On the fine-tuned resnet18 0.6
# and 0.8 kept fewer copies with their original (recall 0.91, 0.94 against 0.95); 1.2 and 1.5 no more.
DEFAULT_GROUP_RATIO = 1.0
DEFAULT_KNN = 10
HASH_BITS = 64
# Photos drawn (seeded) to measure how close unrelated photos come: all pairs among 1,000 photos are
# ~500,000 cosines, enough for a steady 95th percentile, and one 1,000 x 1,000 product costs nothing.
UNRELATED_SAMPLE = 1000
# Floats one step of a blocked computation may hold (16 MB of float32; argpartition's indices and copy
# make a neighbour block's step about 4x that): the work is cut into blocks of rows so that memory stays
# fixed as the photos grow (issue 27: gathering every candidate pair's features at once took 185 MB at
# 2,400 photos and grew with n; the neighbour search's 1,024 x n block would take 1.2 GB at 100,000).
BLOCK_FLOATS = 1 << 22

# The exact neighbour search's bf16 product (``_rescored_rows``): candidates kept per row beyond the k asked for,
# and how far a bf16 cosine of two unit rows can be from the fp32 one. With u = 2^-8, bf16's unit roundoff: both
# inputs rounded (at most 2u + u^2 on unit rows, by Cauchy-Schwarz), the fp32 sum of a few thousand products
# (under 2^-13) and the result, at most 1 + 2u + u^2, rounded once more: 3u + 3u^2 + 2^-13 = 0.0119 in all.
CANDIDATE_MARGIN = 32
BF16_COSINE_ERROR = 3 * 2.0**-8 + 3 * 2.0**-16 + 2.0**-13


def rows_per_block(width: int) -> int:
    """How many rows ``width`` wide fit in one block of ``BLOCK_FLOATS``."""
    return max(1, BLOCK_FLOATS // max(width, 1))


# The approximate index (faiss IndexHNSWFlat on inner product), chosen with `python -m bench.audit_index` on
# 25,000 synthetic photos with real features' spectrum (bench/README.md "Issue 27: the audit's neighbour search").
# efConstruction decides whether a near-copy finds its original when it joins the graph: a pair that misses then
# stays unlinked and no later search finds it. The exact near-duplicate pairs found at efConstruction 80 / 160 /
# 320 / 640 were 0.956 / 0.974 / 0.996 / 1.000 (M 32, efSearch 128); M 16 at 320 found 0.991.
# efSearch 128 over 64: recall of the 10 nearest 0.999 against 0.992 for a tenth more time; the build dominates.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 640
HNSW_EF_SEARCH = 128


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


@dataclass(frozen=True)
class Neighbours:
    """Each row's ``k`` nearest other rows, nearest first: ``index`` (n, k) and ``cosine`` (n, k);
    ``search`` says how they were found (audit.json's ``settings.neighbour_search``)."""

    index: np.ndarray
    cosine: np.ndarray
    search: dict = dataclasses.field(default_factory=lambda: {"method": "exact"})

    def scale(self) -> np.ndarray:
        """(n,) cosine distance to the k-th nearest neighbour: how far apart photos are around each one."""
        if not self.cosine.shape[1]:
            return np.ones(len(self.cosine))
        return np.maximum(1.0 - self.cosine[:, -1].astype(np.float64), 0.0)


def nearest_neighbours(unit: np.ndarray, k: int = DEFAULT_KNN, block: int | None = None,
                       exact_max: int = DEFAULT_EXACT_MAX) -> Neighbours:
    """The k nearest neighbours by cosine among all rows of ``unit`` (unit vectors), itself excluded.

    Exact up to ``exact_max`` rows: a blocked product (block x n at a time, by default as many rows as
    keep a block within ``BLOCK_FLOATS``), each block keeping its top k; its time grows as n^2. Where the CPU
    multiplies bf16 natively the product is bf16 and only picks candidates (``_rescored_rows``). Above
    ``exact_max``, approximate: ``hnsw_neighbours``.
    """
    n = len(unit)
    k = max(0, min(k, n - 1))
    if n <= exact_max or not k:
        index, cosine, product = _exact_rows(unit, np.arange(n), k, block)
        return Neighbours(index, cosine, {"method": "exact", "exact_max": exact_max, **product})
    return hnsw_neighbours(unit, k, block, exact_max)


def _exact_rows(unit: np.ndarray, rows: np.ndarray, k: int, block: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(index, cosine), each (len(rows), k): the exact k nearest other rows of ``unit`` to each of ``rows``; and
    how the product was taken (audit.json's ``settings.neighbour_search``)."""
    if k and len(unit) - 1 > k + CANDIDATE_MARGIN and precision.native_bf16(torch.device("cpu")):
        index, cosine, unproven = _rescored_rows(unit, rows, k, block)
        if len(unproven):
            index[unproven], cosine[unproven] = _fp32_rows(unit, rows[unproven], k, block)
        return index, cosine, {"product": f"bf16 candidates (top k + {CANDIDATE_MARGIN}) rescored in fp32",
                               "rows_searched_in_fp32": int(len(unproven))}
    return *_fp32_rows(unit, rows, k, block), {"product": "fp32"}


def _fp32_rows(unit: np.ndarray, rows: np.ndarray, k: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``_exact_rows`` by the fp32 product."""
    n = len(unit)
    block = block or min(1024, rows_per_block(n))
    index = np.zeros((len(rows), k), np.int64)
    cosine = np.zeros((len(rows), k), np.float32)
    if not k:
        return index, cosine
    every = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    for at, _, sims in _similarity_blocks(every, rows, block, torch.float32):
        top = torch.topk(sims, k, dim=1)  # sorted, nearest first
        index[at], cosine[at] = top.indices.numpy(), top.values.numpy()
    return index, cosine


def _rescored_rows(unit: np.ndarray, rows: np.ndarray, k: int, block: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_exact_rows`` by a bf16 product that picks the top k + ``CANDIDATE_MARGIN`` candidates of each row, whose
    cosines are then computed exactly in fp32; and the positions in ``rows`` where that is not proven exact.

    A row is proven when its k-th best rescored cosine beats the last candidate's bf16 cosine by more than
    ``BF16_COSINE_ERROR``: no row left out can then be nearer. On 100,000 photos (the scale benchmark's Lite0
    features, 4,096 rows drawn) every row was proven with a margin of 32, and a third of them with 8. The bf16
    product is 4x as fast as fp32's where bf16 is native (AMX: 48 s against 187 s at 100,000 photos), and a bf16
    block of twice the rows holds the same bytes.
    """
    n = len(unit)
    block = block or min(1024, 2 * rows_per_block(n))
    every = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    index = np.zeros((len(rows), k), np.int64)
    cosine = np.zeros((len(rows), k), np.float32)
    proven = np.zeros(len(rows), bool)
    for at, mine, sims in _similarity_blocks(every, rows, block, torch.bfloat16):
        rough = torch.topk(sims, k + CANDIDATE_MARGIN, dim=1)
        exact = torch.einsum("bd,bcd->bc", every[mine], every[rough.indices])
        best = torch.topk(exact, k, dim=1)
        index[at], cosine[at] = torch.gather(rough.indices, 1, best.indices).numpy(), best.values.numpy()
        proven[at] = (best.values[:, -1] > rough.values[:, -1].float() + BF16_COSINE_ERROR).numpy()
    return index, cosine, np.flatnonzero(~proven)


def _similarity_blocks(every: torch.Tensor, rows: np.ndarray, block: int, dtype: torch.dtype
                       ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per ``block`` of ``rows``: (its positions in ``rows``, its row indices, its rows' products with every row of
    ``every`` taken in ``dtype``, each row's own product -inf)."""
    every_t = every.to(dtype).T.contiguous()
    for b0 in range(0, len(rows), block):
        mine = torch.from_numpy(rows[b0:b0 + block])
        sims = every[mine].to(dtype) @ every_t
        sims[torch.arange(len(mine)), mine] = -torch.inf  # never one's own neighbour
        yield slice(b0, b0 + len(mine)), mine, sims


def hnsw_neighbours(unit: np.ndarray, k: int, block: int | None = None, exact_max: int = 0, *, m: int = HNSW_M,
                    ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH) -> Neighbours:
    """Approximate k nearest neighbours from a faiss HNSW graph on inner product (= cosine on unit rows).

    The graph is built on one thread: faiss adds HNSW nodes in parallel in an unspecified order (its wiki,
    "Threads and asynchronous calls": multi-threaded HNSW add is not reproducible; search is), so with more
    threads a node's links depend on which neighbours happened to be in the graph already, and an interrupted
    audit and its rerun could list different neighbours. On one thread the graph is the same every run (the
    level of each node comes from faiss's fixed seed). Searching runs on all threads. The returned pairs'
    cosines are recomputed exactly (``pair_cosines``) and each row re-sorted by them; a row the graph gives
    fewer than k others (an unreachable node) is searched exactly. The index holds a copy of the features
    (n x d x 4 bytes) plus the graph (about n x 2M x 4 bytes at level 0) and is dropped before this returns.
    """
    import faiss  # only data sets above audit_exact_max need it

    n, d = unit.shape
    graph = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = ef_construction
    ef_search = max(ef_search, k + 1)  # the search keeps ef candidates: at least the k + 1 asked for
    graph.hnsw.efSearch = ef_search
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        graph.add(np.ascontiguousarray(unit, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    _, found = graph.search(np.ascontiguousarray(unit, dtype=np.float32), k + 1)
    index_mib = (graph.ntotal * d * 4 + graph.hnsw.neighbors.size() * 4) / 2**20  # the vectors and the links
    del graph
    rows = np.arange(n)
    # itself (a row usually finds itself first, but an exact copy may come before it) and -1 (no result) drop out
    other = (found != rows[:, None]) & (found >= 0)
    index = np.take_along_axis(found, np.argsort(~other, axis=1, kind="stable")[:, :k], axis=1)
    cosine = pair_cosines(unit, np.repeat(rows, k), index.ravel()).reshape(n, k).astype(np.float32)
    order = np.argsort(-cosine, axis=1, kind="stable")
    index, cosine = np.take_along_axis(index, order, axis=1), np.take_along_axis(cosine, order, axis=1)
    short = np.flatnonzero(other.sum(axis=1) < k)
    if len(short):
        index[short], cosine[short], _ = _exact_rows(unit, short, k, block)
    return Neighbours(index, cosine, {"method": "faiss IndexHNSWFlat, inner product", "faiss": faiss.__version__,
                                      "M": m, "ef_construction": ef_construction,
                                      "ef_search": ef_search, "build_threads": 1,
                                      "exact_max": exact_max, "rows_searched_exactly": int(len(short)),
                                      "index_mib": round(index_mib, 1)})


def unrelated_cosines(unit: np.ndarray, hashes: np.ndarray, radius: int, quantiles: Sequence[float],
                      sample: int = UNRELATED_SAMPLE, seed: int = 0) -> list[float]:
    """The ``quantiles`` of the cosines between two different photos drawn at random (all pairs among a
    seeded sample of at most ``sample`` photos whose pHashes differ in more than ``radius`` bits; all pairs
    of the sample if none does): how close unrelated photos come on these features.

    A quantile of this data set's own pairs, not one fixed cosine, because how close different photos
    come depends on the backbone and the photos (the 95th percentile was 0.28 on hymenoptera and 0.40 on
    the scenes sample with the same ImageNet features); unlike the ratio, it does not shrink as the data
    set grows denser.
    """
    n = len(unit)
    if n < 2:
        return [-np.inf] * len(quantiles)
    drawn = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))
    i, j = np.triu_indices(len(drawn), 1)
    cosines = (unit[drawn] @ unit[drawn].T)[i, j]
    apart = np.bitwise_count(hashes[drawn][i] ^ hashes[drawn][j]) > radius
    return [float(q) for q in np.quantile(cosines[apart] if apart.any() else cosines, quantiles)]


def pair_cosines(unit: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(pairs,) float64 cosines of the rows (i[p], j[p]) of ``unit``, gathered a block of pairs at a time."""
    cosine = np.empty(len(i), np.float64)
    step = rows_per_block(2 * unit.shape[1])  # the pairs' rows of both photos
    for start in range(0, len(i), step):
        end = start + step
        cosine[start:end] = np.einsum("ij,ij->i", unit[i[start:end]], unit[j[start:end]])
    return cosine


EVIDENCE = ("phash", "features", "mutual")
GROUP_BOUND = "group_bound"  # a pair of one group that is no near-duplicate pair itself, yet within the group bound


@dataclass(frozen=True)
class DuplicateRule:
    """When two photos are near-duplicates: their pixels (pHash) and their features agree.

    ``ratio`` is a pair's feature distance (1 - cosine) over its local scale, the geometric mean
    of the two photos' distances to their k-th nearest neighbour: it means the same on any
    backbone, whereas how close two different photos come in cosine depends on the backbone
    (a fine-tuned one puts a whole class above any fixed cosine). A near-duplicate pair passes
    any one of:

    - ``phash``: Hamming distance <= ``hash_radius``, and the features confirm it (``confirmed``).
    - ``features``: ratio <= ``feature_ratio`` and Hamming distance <= ``agree_radius``.
    - ``mutual``: each is the other's nearest neighbour in features and Hamming distance <=
      ``mutual_radius`` (crops and rotations on a backbone too weak for the ratio alone).

    A group is joined through near-duplicate pairs, and every two photos in it must be within the
    group bound, that is close in one signal or fairly close in both: ratio <= ``feature_ratio``, or
    Hamming distance <= ``agree_radius`` with features that confirm it. Two copies of one photo (a
    crop and a rotation) may be no near-duplicate pair themselves, yet they belong together; two
    photos outside the bound never share a group, however many pairs lead from one to the other.

    The evidence must agree wherever the features can judge, in the tests and in the group bound alike.
    pHash collisions grow with the number of pairs (n^2): on 25,000 cat and dog photos twelve pairs of a
    cat and a different dog sat within 8 bits at cosine -0.12 to 0.12, and on 25,000 photos with drawn
    pictures three pairs of different pictures at cosine 0.37-0.63, neither among the other's neighbours.
    So a pHash pair also needs its features to confirm it (``confirmed``): closer than the photos around
    them (ratio <= ``group_ratio``), or a cosine of at least ``confirm_above``, which ``judged_by`` sets
    to the ``confirm_quantile`` of the cosines of unrelated photos (closer than all but one unrelated pair
    in a thousand, by default). The second is for near-identical shots of one scene: a burst of 16 makes
    each shot's neighbours its own twins, so a third of its pairs sit at ratio > 1, yet at cosines no
    unrelated pair reaches. And features that clearly disagree, a cosine below ``disagree_below`` (the
    ``veto_quantile`` of unrelated pairs: no closer than one pair in twenty drawn at random), veto any
    pair, whatever its ratio. Features that cannot judge (``use_features`` False) neither confirm nor
    veto: the pHash alone decides.
    """

    hash_radius: int = DEFAULT_HASH_RADIUS
    feature_ratio: float = DEFAULT_FEATURE_RATIO
    agree_radius: int = DEFAULT_AGREE_RADIUS
    mutual_radius: int = DEFAULT_MUTUAL_RADIUS
    group_ratio: float = DEFAULT_GROUP_RATIO
    use_features: bool = True  # False: pHash alone (features that cannot tell the classes apart prove nothing)
    veto_quantile: float = DEFAULT_VETO_QUANTILE
    confirm_quantile: float = DEFAULT_CONFIRM_QUANTILE
    # cosines set from the features by ``judged_by``; the defaults veto nothing and confirm by ratio alone
    disagree_below: float = -np.inf
    confirm_above: float = np.inf

    @classmethod
    def from_settings(cls, settings: dict) -> DuplicateRule:
        """The rule an audit.json's ``settings`` record, its measured cosine bars included."""
        by_features = settings["near_duplicates_by_features"]
        return cls(settings["hash_radius"], settings["feature_ratio"], settings["agree_radius"],
                   settings["mutual_radius"], settings["group_ratio"], by_features, settings["veto_quantile"],
                   settings["confirm_quantile"], settings["disagree_below_cosine"] if by_features else -np.inf,
                   settings["confirm_above_cosine"] if by_features else np.inf)

    def judged_by(self, unit: np.ndarray, hashes: np.ndarray) -> DuplicateRule:
        """This rule with its cosine bars measured on the photos' unit features and pHashes, where features may
        judge. Unrelated photos are pairs whose pHashes are farther apart than ``agree_radius``, where no test
        looks: the data set's own copies and bursts must not set the bar they are measured against (with them, the
        audit benchmark's 99.9 % quantile on hymenoptera was 0.95, above half its burst pairs; without, 0.54)."""
        if not self.use_features:
            return dataclasses.replace(self, disagree_below=-np.inf, confirm_above=np.inf)
        disagree_below, confirm_above = unrelated_cosines(unit, hashes, self.agree_radius,
                                                          (self.veto_quantile, self.confirm_quantile))
        return dataclasses.replace(self, disagree_below=disagree_below, confirm_above=confirm_above)

    def disagree(self, cosine: np.ndarray) -> np.ndarray:
        """Whether the features clearly say two photos are different: no closer than unrelated photos."""
        return cosine < self.disagree_below

    def confirmed(self, cosine: np.ndarray, ratio: np.ndarray) -> np.ndarray:
        """Whether the features say two photos are one: not disagreeing, and closer than the photos around
        them or than (almost) any two unrelated photos. Always, where the features cannot judge."""
        if not self.use_features:
            return np.ones(len(cosine), bool)
        return ~self.disagree(cosine) & ((ratio <= self.group_ratio) | (cosine >= self.confirm_above))

    def evidence(self, hamming: np.ndarray, cosine: np.ndarray, ratio: np.ndarray, mutual: np.ndarray) -> np.ndarray:
        """(pairs, len(EVIDENCE)) booleans: which of the three tests each pair passes."""
        judged = ~self.disagree(cosine) & self.use_features
        return np.stack([(hamming <= self.hash_radius) & self.confirmed(cosine, ratio),
                         (ratio <= self.feature_ratio) & (hamming <= self.agree_radius) & judged,
                         mutual & (hamming <= self.mutual_radius) & judged], axis=1)

    def unconfirmed(self, hamming: np.ndarray, cosine: np.ndarray, ratio: np.ndarray) -> np.ndarray:
        """pHash pairs within ``hash_radius`` that the features do not confirm: audit.json's ``vetoed_pairs``."""
        return (hamming <= self.hash_radius) & ~self.confirmed(cosine, ratio)

    def within_group_bound(self, hamming: np.ndarray, cosine: np.ndarray, ratio: np.ndarray) -> np.ndarray:
        if not self.use_features:
            return hamming <= self.hash_radius
        return ((hamming <= self.agree_radius) & self.confirmed(cosine, ratio)
                | ~self.disagree(cosine) & (ratio <= self.feature_ratio))

    def agreed(self, hamming: int, cosine: float, ratio: float) -> str:
        """The signals a pair of one group agrees in, as audit.json and split's excluded_why state them."""
        if not self.use_features:
            return f"pHash {hamming} bits alone (features too weak to judge)"
        if ratio <= self.group_ratio:
            return f"pHash {hamming} bits + cosine {cosine:.2f}, closer than their neighbours (ratio {ratio:.2f})"
        return (f"pHash {hamming} bits + cosine {cosine:.2f}, closer than {self.confirm_quantile:.1%} of "
                f"unrelated pairs")

    def refuted(self, cosine: float, ratio: float) -> str:
        """Why the features do not confirm a pHash pair, as audit.json's ``vetoed_pairs`` state it."""
        if self.disagree(np.array([cosine]))[0]:
            return (f"features disagree: cosine {cosine:.2f} is below {self.disagree_below:.2f}, the "
                    f"{self.veto_quantile:.0%} quantile of unrelated pairs")
        return (f"features do not confirm: no closer than their neighbours (ratio {ratio:.2f} > {self.group_ratio:g}), "
                f"cosine {cosine:.2f} below {self.confirm_above:.2f}, the {self.confirm_quantile:.1%} quantile of "
                "unrelated pairs")


@dataclass(frozen=True)
class Geometry:
    """What the rule measures between any two photos: pHashes, unit features and each photo's local scale."""

    hashes: np.ndarray
    unit: np.ndarray
    scale: np.ndarray

    @staticmethod
    def of(hashes: np.ndarray, unit: np.ndarray, neighbours: Neighbours) -> Geometry:
        return Geometry(np.ascontiguousarray(hashes, dtype=np.uint64), unit, neighbours.scale())

    def measure(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Hamming distance, cosine, ratio) of the pairs (i[p], j[p])."""
        hamming = np.bitwise_count(self.hashes[i] ^ self.hashes[j]).astype(np.int64)
        cosine = pair_cosines(self.unit, i, j)
        scale = np.sqrt(self.scale[i] * self.scale[j])
        distance = np.maximum(1.0 - cosine, 0.0)
        # identical features (a photo whose k nearest are all exact copies has scale 0) are surely close
        ratio = np.divide(distance, scale, out=np.where(distance > 1e-6, np.inf, 0.0), where=scale > 1e-9)
        return hamming, cosine, ratio


@dataclass(frozen=True)
class DuplicatePairs:
    """Pairs (i < j) that the rule calls near-duplicates, with the measurements that justify each."""

    i: np.ndarray
    j: np.ndarray
    hamming: np.ndarray
    cosine: np.ndarray
    ratio: np.ndarray
    by: np.ndarray  # (pairs, len(EVIDENCE)) booleans
    vetoed: Pairs  # pHash pairs within hash_radius that the features do not confirm (value: Hamming distance)

    def closeness(self) -> np.ndarray:
        """Sort key, smaller = closer: the feature ratio plus the share of pHash bits that differ."""
        return self.ratio + self.hamming / HASH_BITS


def duplicate_pairs(geometry: Geometry, neighbours: Neighbours, rule: DuplicateRule) -> DuplicatePairs:
    """Every pair the ``rule`` calls near-duplicates.

    Candidates are each photo's k nearest neighbours and the pHash pairs within ``hash_radius``.
    That misses no feature pair: with ``feature_ratio`` <= 1 a pair's distance is at most the
    larger of its two photos' k-th-neighbour distances, so one is among the other's k nearest.
    """
    n, k = neighbours.index.shape
    near = hash_pairs(geometry.hashes, rule.hash_radius)
    a = np.r_[np.repeat(np.arange(n), k), near.i]
    b = np.r_[neighbours.index.ravel(), near.j]
    keys = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    i, j = keys // n, keys % n
    hamming, cosine, ratio = geometry.measure(i, j)
    mutual = (neighbours.index[i, 0] == j) & (neighbours.index[j, 0] == i) if k else np.zeros(len(i), bool)
    by = rule.evidence(hamming, cosine, ratio, mutual)
    keep = by.any(axis=1)
    vetoed = rule.unconfirmed(hamming, cosine, ratio)
    return DuplicatePairs(i[keep], j[keep], hamming[keep], cosine[keep], ratio[keep], by[keep],
                          Pairs(i[vetoed], j[vetoed], hamming[vetoed]))


def clique_groups(pairs: DuplicatePairs, geometry: Geometry, rule: DuplicateRule) -> list[np.ndarray]:
    """Groups (sorted member indices, size >= 2): joined through ``pairs``, every two members within the group bound.

    Complete linkage: pairs are taken closest first, and two groups merge only when every photo
    of one is within the bound of every photo of the other. So A~B and B~C never put A with C
    when A and C are far apart: one loose pair cannot chain unrelated photos. A photo belongs to
    one group at most; a pair whose photos ended in different groups stays out.
    """
    group_of = np.arange(len(geometry.hashes))
    members: dict[int, list[int]] = {}
    for p in np.argsort(pairs.closeness(), kind="stable"):
        ga, gb = int(group_of[pairs.i[p]]), int(group_of[pairs.j[p]])
        if ga == gb:
            continue
        left, right = members.get(ga, [ga]), members.get(gb, [gb])
        x, y = np.repeat(left, len(right)), np.tile(right, len(left))
        if rule.within_group_bound(*geometry.measure(x, y)).all():
            if len(left) < len(right):
                ga, gb, left, right = gb, ga, right, left
            members[ga] = left + right
            members.pop(gb, None)
            group_of[right] = ga
    return sorted((np.array(sorted(m)) for m in members.values()), key=lambda m: m[0])


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = DEFAULT_FOLDS,
                              seed: int = 0, c: float = 0.1) -> np.ndarray:
    """(n, classes) predicted probabilities, each row from the fold model that did not see it.

    Stratified K-fold, seeded; the head is a standardised multinomial logistic regression
    (L2, inverse strength ``c``). Fewer folds are used when the smallest class has fewer
    images than ``folds`` (at least 2; below that there is nothing held out to learn from).
    """
    from scipy.special import softmax
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    smallest = int(np.bincount(labels).min())
    folds = min(folds, smallest)
    if folds < 2:
        raise ValueError(f"a class has {smallest} image(s); out-of-fold probabilities need at least 2 per class")
    x = np.asarray(features, dtype=np.float32)
    probs = np.empty((len(x), int(labels.max()) + 1), np.float32)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    step = rows_per_block(x.shape[1])
    for train, held in cv.split(np.zeros((len(x), 1)), labels):
        weight = np.zeros(len(x), np.float32)
        weight[train] = 1.0
        coef, intercept = _fit_logistic(x, labels, weight, c)
        for start in range(0, len(held), step):
            rows = held[start:start + step]
            probs[rows] = softmax(x[rows] @ coef + intercept, axis=1)
    return probs


def _fit_logistic(x: np.ndarray, labels: np.ndarray, weight: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=200, tol=1e-3))`` fitted
    on the rows of ``x`` where ``weight`` is 1, as (coef, intercept) acting on the raw features.

    The same objective (mean log loss of the multinomial softmax over the rows, plus ||W||^2 / (2 c m) on the
    standardised features' weights, the intercept free), solver (L-BFGS-B from zero, gtol 1e-3, 200 iterations)
    and standardisation (the rows' mean and population std, a constant column left unscaled). Written out
    because the pipeline holds about 3.5 copies of the matrix while it fits (the fold's rows, their standardised
    copy, a float64 copy for lbfgs): 1.7 GB at 100,000 photos of 1,280 features (issue 27). Here the
    standardisation is folded into the weights, held-out rows weigh 0, and nothing of x's size is copied.
    """
    from scipy.optimize import minimize

    m = float(weight.sum())
    d, k = x.shape[1], int(labels.max()) + 1
    mean = (weight @ x) / m
    var = np.zeros(d, np.float64)
    step = rows_per_block(d)
    for start in range(0, len(x), step):
        centred = x[start:start + step] - mean
        var += weight[start:start + step] @ (centred * centred)
    scale = np.sqrt(var / m)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # StandardScaler leaves a constant column as it is
    scale = scale.astype(np.float32)
    onehot = np.zeros((len(x), k), np.float32)
    onehot[np.arange(len(x)), labels] = 1.0
    l2 = 1.0 / (c * m)

    def raw(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = params[:d * k].reshape(d, k)
        coef = (w / scale[:, None]).astype(np.float32)
        return w, coef, (params[d * k:] - (mean / scale) @ w).astype(np.float32)

    def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, coef, intercept = raw(params)
        logits = x @ coef + intercept
        top = logits.max(1, keepdims=True)
        e = np.exp(logits - top)
        total = e.sum(1, keepdims=True)
        log_loss = (np.log(total[:, 0]) + top[:, 0] - (logits * onehot).sum(1)) @ weight / m
        residual = (e / total - onehot) * (weight[:, None] / m)
        column = residual.sum(0)
        grad_w = (x.T @ residual - np.outer(mean, column)) / scale[:, None] + l2 * w
        loss = float(log_loss) + 0.5 * l2 * float((w * w).sum())
        return loss, np.concatenate([grad_w.ravel(), column]).astype(np.float64)

    fitted = minimize(loss_and_grad, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                      options={"maxiter": 200, "maxls": 50, "gtol": 1e-3, "ftol": 64 * np.finfo(float).eps})
    _, coef, intercept = raw(fitted.x)
    return coef, intercept


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


def label_skill(labels: np.ndarray, pred_probs: np.ndarray) -> dict:
    """How well out-of-fold predictions separate the classes, against the given labels.

    ``skill`` is balanced accuracy rescaled so that chance (1 / classes) is 0 and perfect is 1;
    balanced, so that always answering the biggest class scores 0 however unequal the classes.
    """
    classes = pred_probs.shape[1]
    predicted = pred_probs.argmax(axis=1)
    recalls = [float((predicted[labels == c] == c).mean()) for c in range(classes) if (labels == c).any()]
    balanced = float(np.mean(recalls))
    chance = 1.0 / classes
    return {"accuracy": round(float((predicted == labels).mean()), 4), "balanced_accuracy": round(balanced, 4),
            "chance": round(chance, 4), "skill": round((balanced - chance) / (1.0 - chance), 4)}


def pair_skill(labels: np.ndarray, pred_probs: np.ndarray, a: int, b: int) -> float:
    """How well the predictions tell class ``a`` from class ``b``: the balanced accuracy of "a where its
    probability beats b's" over the photos given a or b, rescaled so that chance (0.5) is 0 and perfect is 1."""
    says_a = pred_probs[:, a] > pred_probs[:, b]
    balanced = (float(says_a[labels == a].mean()) + float((~says_a[labels == b]).mean())) / 2
    return (balanced - 0.5) / 0.5


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
                   features: np.ndarray, stats: Sequence[dict], *, rule: DuplicateRule = DuplicateRule(),
                   folds: int = DEFAULT_FOLDS, seed: int = 0, knn: int = DEFAULT_KNN,
                   min_label_skill: float = DEFAULT_MIN_LABEL_SKILL, exact_max: int = DEFAULT_EXACT_MAX) -> dict:
    """The ``audit.json`` document for ``files`` (source paths, as in clean_report.json).

    ``labels`` are indices into ``class_names``; ``hashes`` uint64 pHashes; ``features`` (n, d);
    ``stats`` the ``jobs.imagestats.image_stats`` dicts (their ``issues``, plus ``odd_size``
    computed here over all images; ``width``/``height`` keys are used when present).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(files)
    if not (len(labels) == len(hashes) == len(features) == len(stats) == n):
        raise ValueError("files, labels, hashes, features and stats must have one entry per image")
    label_list, noise, label_check = label_review(files, labels, class_names, features, folds, seed,
                                                 min_label_skill)
    # Features that cannot tell the classes apart are no evidence that two photos are one either
    # (random weights put different photos of similar layout side by side): pHash alone decides.
    weak = label_check.get("skill", 1.0) < min_label_skill
    unit = unit_features(features)
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    rule = dataclasses.replace(rule, use_features=rule.use_features and not weak).judged_by(unit, hashes)
    neighbours = nearest_neighbours(unit, knn, exact_max=exact_max)
    geometry = Geometry.of(hashes, unit, neighbours)
    pairs = duplicate_pairs(geometry, neighbours, rule)
    groups = clique_groups(pairs, geometry, rule)
    evidence = {(int(i), int(j)): [name for name, hit in zip(EVIDENCE, by) if hit]
                for i, j, by in zip(pairs.i, pairs.j, pairs.by)}
    near_duplicates = [_group_entry(members, evidence, geometry, rule, files, labels, class_names)
                       for members in groups]
    vetoed_hamming, vetoed_cosine, vetoed_ratio = geometry.measure(pairs.vetoed.i, pairs.vetoed.j)
    vetoed = [{"files": [files[i], files[j]], "hamming": int(h), "cosine": round(float(c), 4),
               "ratio": round(float(r), 4), "why": rule.refuted(float(c), float(r))}
              for i, j, h, c, r in zip(pairs.vetoed.i, pairs.vetoed.j, vetoed_hamming, vetoed_cosine, vetoed_ratio)]
    grouped = np.full(n, -1)
    for g, members in enumerate(groups):
        grouped[members] = g
    outside = int(((grouped[pairs.i] < 0) | (grouped[pairs.i] != grouped[pairs.j])).sum())

    scores = outlier_scores(neighbours.cosine)
    outliers = [{"file": files[i], "score": round(float(scores[i]), 4)} for i in outlier_indices(scores)]

    sizes = [(s.get("width"), s.get("height")) for s in stats]
    odd = (odd_size(*np.array(sizes, dtype=np.float64).T) if n and all(w and h for w, h in sizes)
           else np.zeros(n, bool))
    image_issues = [{"file": files[i], "issues": list(s["issues"]) + (["odd_size"] if odd[i] else [])}
                    for i, s in enumerate(stats) if s["issues"] or odd[i]]
    return {
        "near_duplicates": near_duplicates,
        "vetoed_pairs": vetoed,
        "label_issues": label_list,
        "label_check": label_check,
        "outliers": outliers,
        "image_issues": image_issues,
        "estimated_noise": noise,
        "settings": {"hash_radius": rule.hash_radius, "feature_ratio": rule.feature_ratio,
                     "agree_radius": rule.agree_radius, "mutual_radius": rule.mutual_radius,
                     "group_ratio": rule.group_ratio, "near_duplicates_by_features": rule.use_features,
                     "veto_quantile": rule.veto_quantile, "confirm_quantile": rule.confirm_quantile,
                     "disagree_below_cosine": round(rule.disagree_below, 4) if rule.use_features and n > 1 else None,
                     "confirm_above_cosine": round(rule.confirm_above, 4) if rule.use_features and n > 1 else None,
                     "folds": folds,
                     "seed": seed, "knn": knn, "min_label_skill": min_label_skill, "images": n,
                     "median_neighbour_scale": round(float(np.median(neighbours.scale())), 4) if n > 1 else None,
                     "duplicate_pairs": len(pairs.i), "duplicate_pairs_outside_groups": outside,
                     "neighbour_search": neighbours.search},
    }


def _group_entry(members: np.ndarray, evidence: dict[tuple[int, int], list[str]], geometry: Geometry,
                 rule: DuplicateRule, files: Sequence[str], labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """One near-duplicate group as audit.json lists it, with the measurements of every two of its
    photos (``a``/``b`` index ``files``), what made them near-duplicates (``by``, from ``evidence``:
    (i, j) -> the tests a near-duplicate pair passed) and the signals that agreed (``agreed``)."""
    a, b = np.triu_indices(len(members), 1)
    hamming, cosine, ratio = geometry.measure(members[a], members[b])
    listed = [{"a": int(x), "b": int(y), "hamming": int(h), "cosine": round(float(c), 4),
               "ratio": round(float(r), 4), "by": evidence.get((int(members[x]), int(members[y])), [GROUP_BOUND]),
               "agreed": rule.agreed(int(h), float(c), float(r))}
              for x, y, h, c, r in zip(a, b, hamming, cosine, ratio)]
    classes = sorted({class_names[labels[m]] for m in members})
    return {"files": [files[m] for m in members], "classes": classes, "cross_class": len(classes) > 1,
            "similarity": round(float(cosine.min()), 4), "max_hamming": int(hamming.max()),
            "max_ratio": round(float(ratio.max()), 4), "pairs": listed}


def label_review(files: Sequence[str], labels: np.ndarray, class_names: Sequence[str], features: np.ndarray,
                 folds: int = DEFAULT_FOLDS, seed: int = 0, min_label_skill: float = DEFAULT_MIN_LABEL_SKILL,
                 ) -> tuple[list[dict], dict[str, float], dict]:
    """(label issues, estimated noise per class, label_check): issues and noise only where the
    out-of-fold head separates the classes well enough that its disagreement with a label means something."""
    present = np.unique(labels)
    if len(present) < 2 or np.bincount(labels)[present].min() < 2:
        return [], {}, {"judged": False, "reason": "labels not judged: it takes two classes with at least 2 "
                                                   "images each to hold images out"}
    # cleanlab wants contiguous class indices; classes without images simply drop out
    dense = np.searchsorted(present, labels)
    probs = out_of_fold_probabilities(features, dense, folds, seed)
    check = {**label_skill(dense, probs), "min_skill": min_label_skill}
    if check["skill"] < min_label_skill:
        return [], {}, {**check, "judged": False, "reason": (
            f"labels not judged: the out-of-fold head reaches {check['balanced_accuracy']:.1%} balanced accuracy "
            f"(chance {check['chance']:.0%}, skill {check['skill']:.2f} < {min_label_skill}); the features are too "
            "weak to tell a wrong label from a hard photo, so no label issue is flagged and no noise estimated")}
    found = label_issues(dense, probs)
    # The gate above is over all classes: easy ones can carry it while two the features cannot tell apart sit at
    # chance. So an issue also needs the head to tell its given class from the suggested one. (On 100,000 photos
    # of scenes and drawn rings and triangles, rings against triangles measured 0.508, just above, and stayed.)
    pair_of = {int(i): (min(int(dense[i]), int(found.suggested[i])), max(int(dense[i]), int(found.suggested[i])))
               for i in found.ranked}
    weak_pairs = {pair: skill for pair in sorted(set(pair_of.values())) if pair[0] != pair[1]
                  and (skill := pair_skill(dense, probs, *pair)) < min_label_skill}
    kept = [i for i in found.ranked if pair_of[int(i)] not in weak_pairs]
    issues = [{"file": files[i], "given": class_names[labels[i]], "suggested": class_names[present[found.suggested[i]]],
               "score": round(1.0 - float(found.quality[i]), 4), "label_quality": round(float(found.quality[i]), 4)}
              for i in kept]
    unjudged = {c for pair in weak_pairs for c in pair}
    noise = {class_names[c]: round(float(r), 4) for d, (c, r) in enumerate(zip(present, found.noise_rate))
             if d not in unjudged}
    withheld = [{"classes": [class_names[present[a]], class_names[present[b]]], "skill": round(skill, 4),
                 "issues_withheld": sum(pair == (a, b) for pair in pair_of.values())}
                for (a, b), skill in weak_pairs.items()]
    reason = (f"labels judged: the out-of-fold head reaches {check['balanced_accuracy']:.1%} balanced accuracy "
              f"(chance {check['chance']:.0%}, skill {check['skill']:.2f} >= {min_label_skill})")
    if withheld:
        reason += "; but not between " + ", ".join(
            f"{w['classes'][0]} and {w['classes'][1]} (skill {w['skill']:.2f}: {w['issues_withheld']} issues withheld)"
            for w in withheld) + ", which the features cannot tell apart; their noise is not estimated"
    return issues, noise, {**check, "judged": True, "pairs_not_judged": withheld, "reason": reason}


# ----------------------------------------------------------------------------------------------
# the stage


def audit_backbone(cfg: Config, rt: Runtime, num_classes: int) -> nn.Module:
    """The backbone whose pooled features (as the head sees them) the audit measures, on ``rt``'s device."""
    seed_everything(cfg.seed)  # the same seeded backbone training builds (weights: none)
    backbone, _ = split_backbone_head(build_model(cfg.arch, num_classes, cfg.weights).eval())
    return backbone.to(rt.device, memory_format=rt.memory_format())


def audit(cfg: Config, paths: RunPaths, rt: Runtime) -> Path:
    """Write ``<out>/audit.json`` and ``<out>/report/review.html`` from clean's report.

    Hashes and quality measurements come from clean's one decode; features are the view-0
    backbone features of every usable image, from the per-image cache that training shares.
    Under torchrun every rank calls this: the backbone pass is shared among the ranks as training's
    is, and rank 0 alone measures and writes.
    """
    report = read_run_file(paths.clean_report, f"run `python -m jobs clean --out {paths.out} --data DATA`",
                           ("files", "classes", "data_hash"))
    classes = sorted(report["classes"])
    usable = [f for f in report["files"] if f["status"] != "excluded"]
    if not usable:
        raise JobError(f"{paths.clean_report} lists no usable image; nothing to audit")
    index = {name: i for i, name in enumerate(classes)}
    backbone = audit_backbone(cfg, rt, len(classes))
    items = [(f["output"], f["sha256"]) for f in usable]
    feats = features.view_features(cfg, paths, rt, backbone, len(classes), items, 1, "audit")[:, 0].numpy()
    if not rt.is_main:
        return paths.audit
    doc = audit_document([f["source"] for f in usable], np.array([index[f["label"]] for f in usable]), classes,
                         phash_array([f["stats"]["phash"] for f in usable]), feats, [f["stats"] for f in usable],
                         rule=DuplicateRule(cfg.audit_hash_radius, cfg.audit_feature_ratio, cfg.audit_agree_radius,
                                            cfg.audit_mutual_radius, veto_quantile=cfg.audit_veto_quantile,
                                            confirm_quantile=cfg.audit_confirm_quantile),
                         folds=cfg.audit_folds, seed=cfg.seed, min_label_skill=cfg.audit_label_min_skill,
                         exact_max=cfg.audit_exact_max)
    doc["near_duplicates"] = exact_conflicts(report["files"]) + doc["near_duplicates"]
    doc.update(classes=classes, data_hash=report["data_hash"], label_issues_mode=cfg.label_issues)
    atomic_write_json(paths.audit, doc)
    write_run_review(paths, doc)
    groups = doc["near_duplicates"]
    print(f"audit: {len(groups)} near-duplicate groups ({sum(g['cross_class'] for g in groups)} across classes), "
          f"{len(doc['label_issues'])} label issues, {len(doc['outliers'])} outliers, "
          f"{len(doc['image_issues'])} images with quality flags; review: {paths.report / 'review.html'}")
    search = doc["settings"]["neighbour_search"]
    if search["method"] != "exact":
        print(f"audit: {len(usable):,} photos > audit_exact_max {cfg.audit_exact_max:,}: nearest neighbours from a "
              f"{search['method']} index (approximate; M {search['M']}, efConstruction {search['ef_construction']}, "
              f"efSearch {search['ef_search']})")
    if not doc["label_check"]["judged"]:
        print(f"audit: {doc['label_check']['reason']}")
    if not doc["settings"]["near_duplicates_by_features"]:
        print("audit: near-duplicates by pHash alone: features that cannot tell the classes apart do not show "
              "that two photos are one either")
    elif doc["vetoed_pairs"]:
        vetoed = len(doc["vetoed_pairs"])
        settings = doc["settings"]
        print(f"audit: {vetoed} pair{'s' if vetoed > 1 else ''} within {cfg.audit_hash_radius} pHash bits "
              f"{'are' if vetoed > 1 else 'is'} no near-duplicate: the features do not confirm "
              f"{'them' if vetoed > 1 else 'it'} (neither closer than the photos around them nor at cosine "
              f">= {settings['confirm_above_cosine']}, the {cfg.audit_confirm_quantile:.1%} quantile of unrelated "
              f"photos) or disagree (cosine < {settings['disagree_below_cosine']}, their "
              f"{cfg.audit_veto_quantile:.0%} quantile); audit.json's vetoed_pairs lists each with why")
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
            pairs = [{"a": a, "b": b, "hamming": 0, "cosine": 1.0, "ratio": 0.0, "by": ["pixels"],
                      "agreed": "pixels identical"}
                     for a in range(len(members)) for b in range(a + 1, len(members))]
            groups.append({"files": sorted(f["source"] for f in members), "classes": classes, "cross_class": True,
                           "similarity": 1.0, "max_hamming": 0, "max_ratio": 0.0, "exact": True, "pairs": pairs})
    return sorted(groups, key=lambda g: g["files"])
