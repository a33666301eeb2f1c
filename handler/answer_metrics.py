"""What the served model answered, as Prometheus metrics, the same in every runtime.

Per model name and version:

- ``classifier_answers_total{label}``: every image answered (200), by its predicted (top-1) class, abstained or not;
- ``classifier_abstentions_total{reason}``: the answers that abstained, by ``abstain_reason``;
- ``classifier_ood_score`` and ``classifier_top_probability``: histograms (``_bucket{le}``, ``_sum``, ``_count``)
  of the ``ood_score`` and of the calibrated top probability of those answers;
- ``classifier_expected_abstain_rate``: the share of in-distribution images the export expects to be abstained on
  (``metadata.json["trust"]["expected_abstain_rate"]``), for the alert "abstaining well above that";
- ``classifier_capture_dropped_total{reason}``: images capture wanted to keep but did not (``handler.capture``).

The counting is here, once (``AnswerMetrics.record``); a runtime only says how a count reaches its Prometheus:

- ``TorchServeAnswerMetrics``: TorchServe's metrics API (``context.metrics``), declared in ``metrics.yaml`` so that
  its frontend exposes them on the metrics port. TorchServe 0.12 does have a histogram type, but its frontend builds
  it with the Java client's default buckets (0.005 ... 10; not configurable), which put every probability in
  (0.5, 1] into two buckets. So the histograms are sent as what a Prometheus histogram is made of: cumulative
  ``_bucket`` counters with an ``le`` label (the buckets below), ``_sum`` and ``_count``. ``histogram_quantile``
  and every query read them as a histogram; only the exposition's ``# TYPE`` line says counter.
- ``PrometheusAnswerMetrics``: ``prometheus_client`` (KServe's model server serves its registry on ``/metrics``),
  with real histograms of the same buckets, so the series and the queries are the same in both runtimes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ANSWERS = "classifier_answers_total"
ABSTENTIONS = "classifier_abstentions_total"
OOD_SCORE = "classifier_ood_score"
TOP_PROBABILITY = "classifier_top_probability"
EXPECTED_ABSTAIN_RATE = "classifier_expected_abstain_rate"
CAPTURE_DROPPED = "classifier_capture_dropped_total"
MODEL_LABELS = ("model_name", "model_version")

# ood_score lies in [0, 2] (distances between unit vectors); a model's threshold is usually in (0.3, 1.5).
OOD_SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 21))
# The calibrated top probability lies in [1/classes, 1]; the capture and confidence thresholds live above 0.5.
TOP_PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
HISTOGRAMS = {OOD_SCORE: OOD_SCORE_BUCKETS, TOP_PROBABILITY: TOP_PROBABILITY_BUCKETS}
COUNTERS = {ANSWERS: "label", ABSTENTIONS: "reason", CAPTURE_DROPPED: "reason"}
HELP = {
    ANSWERS: "Images answered, by predicted (top-1) class, abstained or not.",
    ABSTENTIONS: "Answers that abstained, by abstain_reason.",
    OOD_SCORE: "ood_score of the answers (higher = less like the training images).",
    TOP_PROBABILITY: "Calibrated top probability of the answers.",
    EXPECTED_ABSTAIN_RATE: "Share of in-distribution images the export expects to be abstained on.",
    CAPTURE_DROPPED: "Images capture would have kept but dropped (queue full, over the cap, write failed).",
}


def exposed_names() -> set[str]:
    """Every series name these metrics put on a /metrics page (what dashboards and alert rules may use)."""
    names = {ANSWERS, ABSTENTIONS, CAPTURE_DROPPED, EXPECTED_ABSTAIN_RATE}
    return names | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}


def label_value(text: Any) -> str:
    """A class name or reason as a label value: TorchServe's metric line separates dimensions with ``,``, ``:`` and
    ``|``, so those (and line breaks) become ``_`` -- in both runtimes, so their series stay the same."""
    return "".join("_" if c in ",:|\r\n" else c for c in str(text))


def bound(value: float) -> str:
    """A bucket's ``le`` as prometheus_client writes it (``0.1``, ``1.0``, ``+Inf``)."""
    return "+Inf" if value == float("inf") else repr(float(value))


@dataclass
class Tally:
    """One batch's answers, counted."""

    answers: Counter = field(default_factory=Counter)  # by predicted class
    abstentions: Counter = field(default_factory=Counter)  # by reason
    observed: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in HISTOGRAMS})


def tally(per_image: Iterable[dict[str, Any]]) -> Tally:
    """Count answers as ``ImageClassifier.answers`` writes them (``predictions`` first = top-1, the trust fields)."""
    counted = Tally()
    for answer in per_image:
        predictions = answer.get("predictions") or []
        if not predictions:
            continue
        top = predictions[0]
        counted.answers[label_value(top["label"])] += 1
        counted.observed[TOP_PROBABILITY].append(float(top["probability"]))
        if answer.get("ood_score") is not None:
            counted.observed[OOD_SCORE].append(float(answer["ood_score"]))
        if answer.get("abstain"):
            counted.abstentions[label_value(answer.get("abstain_reason") or "unknown")] += 1
    return counted


def cumulative_buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """(``le``, how many of ``values`` are <= it) for each bound and +Inf: a histogram's ``_bucket`` increments."""
    return [(bound(b), sum(v <= b for v in values)) for b in (*bounds, float("inf"))]


class AnswerMetrics:
    """Counts answers into Prometheus metrics for one served model; subclasses say how a count is sent.

    ``classes`` and ``reasons`` are made zero at start, so a rate exists before the first such answer.
    """

    def __init__(self, model_name: str, model_version: str, classes: list[str], reasons: Iterable[str] = (),
                 expected_abstain_rate: float | None = None):
        self.model = (str(model_name), str(model_version))
        for label in classes:
            self._count(ANSWERS, label_value(label), 0)
        for reason in reasons:
            self._count(ABSTENTIONS, label_value(reason), 0)
        for name, bounds in HISTOGRAMS.items():
            self._histogram(name, bounds, [])
        if expected_abstain_rate is not None:
            self._gauge(EXPECTED_ABSTAIN_RATE, float(expected_abstain_rate))

    def record(self, per_image: list[dict[str, Any]]) -> None:
        """Count a batch's answers (only answered images: a refused request never reaches here)."""
        if not per_image:
            return
        try:
            counted = tally(per_image)
            for label, n in counted.answers.items():
                self._count(ANSWERS, label, n)
            for reason, n in counted.abstentions.items():
                self._count(ABSTENTIONS, reason, n)
            for name, values in counted.observed.items():
                if values:
                    self._histogram(name, HISTOGRAMS[name], values)
        except Exception:  # noqa: BLE001 -- a metric must never cost a client its answer
            logger.exception("counting a batch's answers failed")

    def counting_drops(self, reasons: Iterable[str]) -> None:
        """Capture is on: its drop counters start at zero."""
        for reason in reasons:
            self._count(CAPTURE_DROPPED, label_value(reason), 0)

    def dropped(self, by_reason: dict[str, int]) -> None:
        """Count images capture dropped since the last call."""
        for reason, n in by_reason.items():
            if n:
                self._count(CAPTURE_DROPPED, label_value(reason), n)

    def _count(self, name: str, label: str, amount: float) -> None:
        raise NotImplementedError

    def _histogram(self, name: str, bounds: tuple[float, ...], values: list[float]) -> None:
        raise NotImplementedError

    def _gauge(self, name: str, value: float) -> None:
        raise NotImplementedError


class TorchServeAnswerMetrics(AnswerMetrics):
    """Through TorchServe's metrics API: each count is a ``[METRICS]`` line its frontend adds to the Prometheus
    counter of that name, which ``metrics.yaml`` declares with the same dimensions in the same order."""

    def __init__(self, metrics_cache: Any, model_name: str, model_version: str, classes: list[str],
                 reasons: Iterable[str] = (), expected_abstain_rate: float | None = None):
        from ts.metrics.metric_type_enum import MetricTypes

        self.cache, self.types = metrics_cache, MetricTypes
        for name, label in COUNTERS.items():
            self._declare(name, [*MODEL_LABELS, label], MetricTypes.COUNTER)
        for name in HISTOGRAMS:
            self._declare(f"{name}_bucket", [*MODEL_LABELS, "le"], MetricTypes.COUNTER)
            self._declare(f"{name}_sum", list(MODEL_LABELS), MetricTypes.COUNTER)
            self._declare(f"{name}_count", list(MODEL_LABELS), MetricTypes.COUNTER)
        self._declare(EXPECTED_ABSTAIN_RATE, list(MODEL_LABELS), MetricTypes.GAUGE)
        super().__init__(model_name, model_version, classes, reasons, expected_abstain_rate)

    def _declare(self, name: str, dimensions: list[str], kind: Any) -> None:
        # metrics.yaml declares them for the worker too; an operator's own metrics.yaml may not, and then the
        # worker still sends them (the frontend logs a line per metric it has no Prometheus series for).
        from ts.metrics.metric_cache_errors import MetricsCacheKeyError

        try:
            self.cache.get_metric(name, kind)
        except MetricsCacheKeyError:
            self.cache.add_metric_to_cache(name, "Count", dimensions, kind)

    def _send(self, name: str, labels: list[str], value: float, kind: Any) -> None:
        self.cache.get_metric(name, kind).add_or_update(value, [*self.model, *labels])

    def _count(self, name: str, label: str, amount: float) -> None:
        self._send(name, [label], amount, self.types.COUNTER)

    def _histogram(self, name: str, bounds: tuple[float, ...], values: list[float]) -> None:
        for le, n in cumulative_buckets(values, bounds):
            if n or not values:  # a zero increment only to make the series at start: each line costs ~13 us
                self._send(f"{name}_bucket", [le], n, self.types.COUNTER)
        self._send(f"{name}_sum", [], round(sum(values), 6), self.types.COUNTER)
        self._send(f"{name}_count", [], len(values), self.types.COUNTER)

    def _gauge(self, name: str, value: float) -> None:
        self._send(name, [], value, self.types.GAUGE)


class PrometheusAnswerMetrics(AnswerMetrics):
    """``prometheus_client`` metrics in ``registry`` (default: the process's, which KServe serves on /metrics).

    Several models in one process share the metrics (one series per model name and version): they are made once
    per registry.
    """

    _made: dict[int, dict[str, Any]] = {}

    def __init__(self, model_name: str, model_version: str, classes: list[str], reasons: Iterable[str] = (),
                 expected_abstain_rate: float | None = None, registry: Any = None):
        import prometheus_client

        registry = registry or prometheus_client.REGISTRY
        made = self._made.setdefault(id(registry), {})
        if not made:
            for name, label in COUNTERS.items():
                made[name] = prometheus_client.Counter(name, HELP[name], [*MODEL_LABELS, label], registry=registry)
            for name, bounds in HISTOGRAMS.items():
                made[name] = prometheus_client.Histogram(name, HELP[name], MODEL_LABELS, buckets=bounds,
                                                         registry=registry)
            # "max" across worker processes: they all load the same metadata.json (multiprocess mode only)
            made[EXPECTED_ABSTAIN_RATE] = prometheus_client.Gauge(
                EXPECTED_ABSTAIN_RATE, HELP[EXPECTED_ABSTAIN_RATE], MODEL_LABELS, registry=registry,
                multiprocess_mode="max")
        self.made = made
        super().__init__(model_name, model_version, classes, reasons, expected_abstain_rate)

    def _count(self, name: str, label: str, amount: float) -> None:
        self.made[name].labels(*self.model, label).inc(amount)

    def _histogram(self, name: str, bounds: tuple[float, ...], values: list[float]) -> None:
        child = self.made[name].labels(*self.model)
        for v in values:
            child.observe(v)

    def _gauge(self, name: str, value: float) -> None:
        self.made[name].labels(*self.model).set(value)
