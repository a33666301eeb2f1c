"""Calibrated probabilities and "none of these": what makes a served answer one a person can trust.

Part of the serving package: imports torch, the standard library and ``handler.files`` only (never ``jobs``),
so the .mar carries it whole and training imports the same functions.

- **Temperature scaling** (Guo et al., ICML 2017): one scalar T fit on the val split's logits by
  minimising the NLL (with a weak prior on log T for tiny val splits); the served probabilities are
  ``softmax(logits / T)``. T changes no argmax.
- **OOD scores**, each "higher = less like the training images", all computed from what one
  forward pass already gives: the head's input (penultimate features) and the calibrated logits.
  ``knn`` (Sun et al., ICML 2022) needs a bank of L2-normalised training features;
  ``mahalanobis`` class means and a shared precision matrix; ``energy`` and ``max_softmax`` nothing.
- **Abstaining**: a threshold fit on in-distribution val scores (keeping ``keep`` of them), and an
  optional floor on the calibrated top probability.

A fitted score is a small file of plain tensors (``save_score``/``load_score``, loadable with
``torch.load(weights_only=True)``); the temperature and threshold are numbers for metadata.json.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch.nn import functional as F

from handler import files

FORMAT = 1
DEFAULT_KEEP = 0.95
DEFAULT_K = 5
# The kNN bank is subsampled (stratified by class) to at most this many rows. At 1280 features
# (EfficientNet-Lite0) that is 2.6 MB in float16 and 0.14 ms of CPU per image, 0.6 % of the batch-1
# forward pass; 4096 rows cost 1.4 ms (6 %: the bank no longer fits the cache) and 16384 rows 25 %.
# 32 rows per class already separated as well as the whole train split (bench/README.md, "trust").
DEFAULT_MAX_BANK = 1024
# The temperature fit's prior on log T (see fit_temperature) and the range T is clamped to.
PRIOR_SIGMA = 1.0
TEMPERATURE_RANGE = (0.05, 20.0)

UNLIKE_TRAINING = "unlike the training images"
LOW_CONFIDENCE = "low confidence"


# ----------------------------------------------------------------------------------------------
# temperature scaling


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, prior_sigma: float | None = PRIOR_SIGMA,
                    max_iter: int = 100) -> float:
    """The T in ``softmax(logits / T)`` that minimises the NLL of ``labels`` (LBFGS on log T).

    ``prior_sigma``: a Gaussian prior on log T (mean 0, this spread) added to the summed NLL. With a
    small val split the model gets (almost) all right, the NLL alone keeps falling as T -> 0 and
    the served probabilities become 1.000 for everything (measured: T down to 0.05 on 50 val photos,
    test NLL 4.5x that of no scaling). A few dozen errors outweigh the prior. None = the plain NLL.
    The result is clamped to ``TEMPERATURE_RANGE``.
    """
    logits = logits.detach().to(torch.float64)
    labels = labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels, reduction="sum")
        if prior_sigma is not None:
            loss = loss + 0.5 * (log_t / prior_sigma) ** 2
        loss.backward()
        return loss

    optimizer.step(closure)
    lo, hi = TEMPERATURE_RANGE
    t = float(log_t.detach().exp())
    return min(max(t, lo), hi) if math.isfinite(t) else 1.0


def calibrated_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in float32; their softmax is the calibrated probabilities."""
    return logits.float() / temperature


# ----------------------------------------------------------------------------------------------
# OOD scores


class Score(Protocol):
    """``score(features, logits)`` -> one float per image, higher = less like the training images.

    ``logits`` are the calibrated ones (``calibrated_logits``); ``state()`` is what ``save_score``
    writes: plain tensors, ints, floats and strings.
    """

    name: ClassVar[str]

    def __call__(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...

    def state(self) -> dict[str, Any]: ...


class KNNDistance:
    """Distance to the k-th nearest L2-normalised training feature (Sun et al., ICML 2022).

    Distances are Euclidean between unit vectors, so in [0, 2]. The bank is kept in float16 (half
    the bytes in the .mar; fitting rounds it too, so export and server score alike) and multiplied
    in float32 (CPUs without float16 matmul units).
    """

    name: ClassVar[str] = "knn"

    def __init__(self, bank: torch.Tensor, k: int = DEFAULT_K):
        """``bank``: (N, D) L2-normalised training features."""
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"a kNN bank is a non-empty (N, D) tensor, got shape {tuple(bank.shape)}")
        self.bank = bank.half().float()
        self.k = max(1, min(int(k), len(bank)))

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, k: int = DEFAULT_K,
            max_bank: int | None = DEFAULT_MAX_BANK, seed: int = 0) -> KNNDistance:
        keep = stratified_subsample(labels, max_bank, seed)
        return cls(F.normalize(features[keep].float(), dim=1), k)

    def __call__(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        similarity = F.normalize(features.float(), dim=1) @ self.bank.T
        kth = similarity.topk(self.k, dim=1).values[:, -1]
        return (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()

    def state(self) -> dict[str, Any]:
        return {"bank": self.bank.half(), "k": self.k}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KNNDistance:
        return cls(state["bank"], state["k"])


class Mahalanobis:
    """Smallest Mahalanobis distance to a class mean, one covariance shared by the classes (Lee et al., 2018).

    Fit on L2-normalised features, as the kNN score (on raw ones the bench's AUROC fell from 1.000 and
    0.999 to 0.96 and 0.94). The pooled within-class covariance is shrunk toward a scaled identity by
    the Ledoit-Wolf estimate: with fewer images than feature dimensions the plain one has no inverse.
    """

    name: ClassVar[str] = "mahalanobis"

    def __init__(self, means: torch.Tensor, precision: torch.Tensor):
        self.means = means.float()
        self.precision = precision.float()
        # (z - m)' P (z - m) = z'Pz - 2 z'Pm + m'Pm: one (B, D) x (D, D) product per batch.
        self._pm = self.means @ self.precision  # (C, D)
        self._mpm = (self._pm * self.means).sum(1)  # (C,)

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor) -> Mahalanobis:
        z = F.normalize(features.double(), dim=1)
        classes = labels.unique()
        means = torch.stack([z[labels == c].mean(0) for c in classes])
        lookup = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
        lookup[classes] = torch.arange(len(classes))
        cov = ledoit_wolf(z - means[lookup[labels]])
        return cls(means, torch.linalg.inv(cov))

    def __call__(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        z = F.normalize(features.float(), dim=1)
        zpz = ((z @ self.precision) * z).sum(1, keepdim=True)
        d2 = zpz - 2.0 * z @ self._pm.T + self._mpm
        return d2.min(1).values.clamp_min(0.0).sqrt()

    def state(self) -> dict[str, Any]:
        # float32: the precision's entries span several orders of magnitude (float16 loses them).
        return {"means": self.means, "precision": self.precision}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Mahalanobis:
        return cls(state["means"], state["precision"])


class Energy:
    """Energy ``-logsumexp(logits)`` of the calibrated logits (Liu et al., NeurIPS 2020, with T = the fit one)."""

    name: ClassVar[str] = "energy"

    def __call__(self, features: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(logits.float(), dim=1)

    def state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Energy:
        return cls()


class MaxSoftmax:
    """The baseline (Hendrycks & Gimpel, ICLR 2017): minus the calibrated top probability."""

    name: ClassVar[str] = "max_softmax"

    def __call__(self, features: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        return -logits.float().softmax(1).max(1).values

    def state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MaxSoftmax:
        return cls()


SCORES: dict[str, type] = {cls.name: cls for cls in (KNNDistance, Mahalanobis, Energy, MaxSoftmax)}
CHOSEN = KNNDistance.name


def fit_score(name: str, features: torch.Tensor, labels: torch.Tensor, **options: Any) -> Score:
    """The score ``name`` fit on the training split's features and labels (``options``: k, max_bank, seed)."""
    if name not in SCORES:
        raise ValueError(f"unknown OOD score '{name}'; one of {', '.join(SCORES)}")
    cls = SCORES[name]
    return cls.fit(features, labels, **options) if hasattr(cls, "fit") else cls()


def save_score(path: Path, score: Score) -> Path:
    """Write ``score``'s state (plain tensors and a small dict) to ``path`` with torch.save, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "score": score.name, **score.state()}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a container's non-root user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_score(path: Path) -> Score:
    """The score ``save_score`` wrote, read with ``weights_only=True``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("score") not in SCORES:
        raise ValueError(f"{path} is not an OOD score file of format {FORMAT}")
    return SCORES[state["score"]].from_state(state)


def stratified_subsample(labels: torch.Tensor, limit: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``limit`` rows, each class keeping its share (at least one row), sorted."""
    n = len(labels)
    if limit is None or n <= limit:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        take = max(1, round(limit * len(rows) / n))
        picked.append(rows[torch.randperm(len(rows), generator=generator)[:take]])
    return torch.cat(picked).sort().values


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of the centred rows ``x`` (N, D) (the estimate scikit-learn uses)."""
    n, d = x.shape
    emp = x.T @ x / n
    mu = torch.trace(emp) / d
    x2 = x * x
    beta_sum = (x2.T @ x2).sum()
    delta_sum = (emp * emp).sum()
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2.0 * mu * torch.trace(emp) + d * mu * mu) / d
    shrinkage = 0.0 if float(delta) == 0.0 else float(min(beta, delta) / delta)
    eye = torch.eye(d, dtype=x.dtype)
    return (1.0 - shrinkage) * emp + shrinkage * mu * eye


# ----------------------------------------------------------------------------------------------
# thresholds and the decision


def fit_threshold(scores: torch.Tensor, keep: float = DEFAULT_KEEP) -> float:
    """The smallest score that at least ``keep`` of ``scores`` (in-distribution val images) do not exceed."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if len(scores) == 0:
        raise ValueError("no scores to fit a threshold on")
    ordered = scores.detach().double().flatten().sort().values
    return float(ordered[math.ceil(keep * len(ordered)) - 1])


def expected_abstain_rate(val_scores: torch.Tensor, val_top: torch.Tensor, threshold: float, keep: float,
                          min_confidence: float | None = None) -> float:
    """The share of new in-distribution images expected to be abstained on, from the val split the threshold was
    fit on: "unlike the training images" with probability ``(n + 1 - ceil(keep * n)) / (n + 1)`` (a new image's
    score exceeds the ``ceil(keep * n)``-th of ``n`` exchangeable val scores), plus the share of val images
    within the threshold whose calibrated top probability is under ``min_confidence``."""
    n = len(val_scores)
    if n == 0:
        raise ValueError("no val scores to expect an abstain rate from")
    unlike = (n + 1 - math.ceil(keep * n)) / (n + 1)
    low = 0.0
    if min_confidence is not None:
        low = float(((val_scores <= threshold) & (val_top < min_confidence)).double().mean())
    return round(min(1.0, unlike + low), 4)


def abstain_reasons(ood_scores: torch.Tensor, top_probabilities: torch.Tensor, threshold: float,
                    min_confidence: float | None = None) -> list[str | None]:
    """Per image: why the answer abstains, or None. Being unlike the training images outranks low confidence."""
    reasons: list[str | None] = []
    for score, top in zip(ood_scores.tolist(), top_probabilities.tolist()):
        if score > threshold:
            reasons.append(UNLIKE_TRAINING)
        elif min_confidence is not None and top < min_confidence:
            reasons.append(LOW_CONFIDENCE)
        else:
            reasons.append(None)
    return reasons


@dataclass
class Trust:
    """Everything the server needs: the temperature, the fitted score, its threshold, the confidence floor.

    Export runs ``fit`` and ``save`` (the score file, and the entry for ``metadata.json["trust"]``);
    the handler and ``jobs predict`` run ``from_metadata`` once and ``assess`` on every batch.
    """

    temperature: float
    score: Score
    threshold: float
    keep: float = DEFAULT_KEEP
    min_confidence: float | None = None
    expected_abstain_rate: float | None = None  # on new in-distribution images; None for an entry from before it

    @classmethod
    def fit(cls, train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
            val_logits: torch.Tensor, val_labels: torch.Tensor, score: str = CHOSEN, keep: float = DEFAULT_KEEP,
            min_confidence: float | None = None, **options: Any) -> Trust:
        """T on val; the score on train (``options``: k, max_bank, seed); its threshold on val, keeping ``keep``."""
        temperature = fit_temperature(val_logits, val_labels)
        fitted = fit_score(score, train_features, train_labels, **options)
        calibrated = calibrated_logits(val_logits, temperature)
        val_scores = fitted(val_features, calibrated)
        threshold = fit_threshold(val_scores, keep)
        expected = expected_abstain_rate(val_scores, calibrated.softmax(1).max(1).values, threshold, keep,
                                         min_confidence)
        return cls(temperature, fitted, threshold, keep, min_confidence, expected)

    def save(self, model_dir: Path, file_name: str = files.SCORES) -> dict[str, Any]:
        """Write the score file into ``model_dir``; returns the ``metadata.json`` entry that names it."""
        path = save_score(Path(model_dir) / file_name, self.score)
        state = self.score.state()
        return {"temperature": self.temperature, "score": self.score.name, "file": file_name,
                "threshold": self.threshold, "keep": self.keep, "min_confidence": self.min_confidence,
                "expected_abstain_rate": self.expected_abstain_rate,
                # file_bytes and state (the tensors' shapes) are for people; nothing reads them back
                "file_bytes": path.stat().st_size,
                "state": {k: list(v.shape) if isinstance(v, torch.Tensor) else v for k, v in state.items()}}

    @classmethod
    def from_metadata(cls, model_dir: Path, entry: dict[str, Any]) -> Trust:
        """The ``Trust`` that ``save`` described in ``entry`` (``metadata.json["trust"]``)."""
        score = load_score(Path(model_dir) / entry["file"])
        if score.name != entry["score"]:
            raise ValueError(f"{entry['file']} holds a {score.name} score, metadata.json says {entry['score']}")
        return cls(float(entry["temperature"]), score, float(entry["threshold"]), float(entry["keep"]),
                   entry.get("min_confidence"), entry.get("expected_abstain_rate"))

    def assess(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """(calibrated probabilities (B, C), per image ``{"ood_score", "abstain", "abstain_reason"}``).

        On the CPU whatever the model ran on (the score's state lives there; B x D floats move).
        """
        calibrated = calibrated_logits(logits.detach().cpu(), self.temperature)
        features = features.detach().cpu()
        probabilities = calibrated.softmax(1)
        scores = self.score(features, calibrated)
        reasons = abstain_reasons(scores, probabilities.max(1).values, self.threshold, self.min_confidence)
        return probabilities, [{"ood_score": round(float(s), 6), "abstain": r is not None, "abstain_reason": r}
                               for s, r in zip(scores.tolist(), reasons)]


# ----------------------------------------------------------------------------------------------
# how well a score separates (the bench and the report)


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """P(an OOD image scores above an in-distribution one), ties counting half (Mann-Whitney U)."""
    ordered = in_scores.detach().double().flatten().sort().values
    out = out_scores.detach().double().flatten()
    below = torch.searchsorted(ordered, out, right=False).double()
    at_most = torch.searchsorted(ordered, out, right=True).double()
    return float((below + 0.5 * (at_most - below)).sum() / (len(ordered) * len(out)))


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = DEFAULT_KEEP) -> float:
    """Share of OOD images that pass when the threshold keeps ``tpr`` of the in-distribution ones."""
    threshold = fit_threshold(in_scores, tpr)
    return float((out_scores.detach().double() <= threshold).double().mean())


# ----------------------------------------------------------------------------------------------
# a new class like the known ones (export, from the features it already has)


MAX_PAIRS = 64  # leaving two classes out: enough pairs for a stable mean; C(C, 2) grows fast with many classes


def leave_one_class_out(bank_features: torch.Tensor, bank_labels: torch.Tensor, val_features: torch.Tensor,
                        val_logits: torch.Tensor, val_labels: torch.Tensor, capture_below: float,
                        keep: float = DEFAULT_KEEP, min_confidence: float | None = None, k: int = DEFAULT_K
                        ) -> dict[str, Any] | None:
    """How often a class the model never saw, but like its own, would be flagged: for each class c, the kNN score
    on the bank without c, its threshold and the temperature on the other classes' val images (c's logit dropped),
    then the share of c's val images abstained on (``flagged``) and abstained on or answered under a calibrated
    top probability of ``capture_below`` (``captured``, the capture rule of ``handler.capture``).

    Leaving one of C classes out measures a model of C - 1 classes, and the fewer classes a model has, the more a
    new one stands out: measured over 300 tasks (bench/new_class.py), that figure is what a model of C - 1
    classes gets, above what the model of C gets. So with three classes or more, pairs are left out too (a model
    of C - 2) and the figures are carried one class on at the rate the flagged share fell from C - 2 to C - 1:
    ``flagged = f1 * f1 / f2``, ``captured = c1 * f1 / f2`` (``left_one_out``, ``left_two_out``: the raw means).
    With two classes they stay the leave-one-out figures, optimistic (``extrapolated: false``).

    ``known_flagged``/``known_captured``: the same shares of the other classes' val images (c left out).
    The figures are means over the classes with val images; None with fewer than two such classes.
    Optimistic where the backbone was fine-tuned on c (its features already separate c): see docs/trust.md.
    """
    classes = [int(c) for c in val_labels.unique() if (bank_labels != c).any()]
    if len(classes) < 2:
        return None
    bank_features = F.normalize(bank_features.float(), dim=1)

    def left_out(held: tuple[int, ...]) -> dict[str, float | int]:
        return _left_out_shares(bank_features, bank_labels, val_features, val_logits, val_labels, held,
                                capture_below, keep, min_confidence, k)

    per_class = {c: left_out((c,)) for c in classes}
    one = _mean_shares(per_class.values())
    figures: dict[str, Any] = {**one, "left_one_out": {key: one[key] for key in ("flagged", "captured")}}
    pairs = list(itertools.combinations(classes, 2))
    if len(classes) >= 3:
        if len(pairs) > MAX_PAIRS:
            pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
                     [:MAX_PAIRS].tolist()]
        two = _mean_shares(left_out(pair) for pair in pairs)
        figures["left_two_out"] = {key: two[key] for key in ("flagged", "captured")}
        # Both figures carried on at the flagged share's rate: a model of C - 2 = 1 class cannot answer with low
        # confidence, so the captured share's own rate is not measurable at three classes (and, measured at
        # four, it left the estimate +0.16 high against +0.02 this way).
        rate = one["flagged"] / two["flagged"] if two["flagged"] > 0 else 1.0
        for key in ("flagged", "captured"):
            figures[key] = round(min(1.0, one[key] * rate), 4)
    figures["extrapolated"] = len(classes) >= 3
    return {**figures, "capture_below": capture_below, "per_class": per_class}


def _left_out_shares(bank_features: torch.Tensor, bank_labels: torch.Tensor, val_features: torch.Tensor,
                     val_logits: torch.Tensor, val_labels: torch.Tensor, held: tuple[int, ...], capture_below: float,
                     keep: float, min_confidence: float | None, k: int) -> dict[str, float | int]:
    """A model without the ``held`` classes (their bank rows and logits dropped; the temperature and the threshold
    fitted on the other classes' val images) meeting the held classes' val images."""
    new = torch.isin(val_labels, torch.tensor(held))
    known = ~new
    others = [j for j in range(val_logits.shape[1]) if j not in held]
    remap = torch.full((val_logits.shape[1],), -1, dtype=torch.long)
    remap[others] = torch.arange(len(others))
    logits = val_logits[:, others]
    temperature = fit_temperature(logits[known], remap[val_labels[known]])
    top = calibrated_logits(logits, temperature).softmax(1).max(1).values
    score = KNNDistance(bank_features[~torch.isin(bank_labels, torch.tensor(held))], k)(val_features)
    threshold = fit_threshold(score[known], keep)
    flagged = score > threshold
    if min_confidence is not None:
        flagged |= top < min_confidence
    captured = flagged | (top < capture_below)
    return {"val_images": int(new.sum()), "flagged": float(flagged[new].double().mean()),
            "captured": float(captured[new].double().mean()),
            "known_flagged": float(flagged[known].double().mean()),
            "known_captured": float(captured[known].double().mean())}


def _mean_shares(shares: Iterable[dict[str, float | int]]) -> dict[str, float]:
    shares = list(shares)
    return {key: round(sum(s[key] for s in shares) / len(shares), 4)
            for key in ("flagged", "captured", "known_flagged", "known_captured")}
