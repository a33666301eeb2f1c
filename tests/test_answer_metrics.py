"""The answers' metrics without a server (handler/answer_metrics.py): the counting, what TorchServe's frontend
would read of the worker's metric lines, metrics.yaml declaring them, the export's expected abstain rate, and
deploy/monitoring's alert rules and dashboard naming only series the servers expose (tests/test_served_answers.py
scrapes the real pages)."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from prometheus_client import CollectorRegistry, generate_latest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.answer_metrics import (
    COUNTERS,
    EXPECTED_ABSTAIN_RATE,
    HISTOGRAMS,
    MODEL_LABELS,
    PrometheusAnswerMetrics,
    TorchServeAnswerMetrics,
    cumulative_buckets,
    exposed_names,
    tally,
)
from handler.trust import UNLIKE_TRAINING, expected_abstain_rate

METRICS_YAML = REPO / "handler" / "metrics.yaml"
MONITORING = REPO / "deploy" / "monitoring"
# TorchServe 0.12's frontend (org.pytorch.serve.metrics.Metric.parse): a worker line it cannot match is dropped.
FRONTEND_LINE = re.compile(r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?\|#hostname:([^,]+),"
                           r"([^,]+)(,(.*))?")


def answer(label: str, probability: float, ood: float, reason: str | None = None) -> dict:
    return {"predictions": [{"label": label, "index": 0, "probability": probability}], "ood_score": ood,
            "abstain": reason is not None, "abstain_reason": reason}


ANSWERS = [answer("ants", 0.95, 0.31), answer("bees", 0.55, 1.42, UNLIKE_TRAINING), answer("ants", 0.99, 0.05)]


def test_a_batch_is_counted_by_class_reason_and_histogram():
    counted = tally(ANSWERS)
    assert counted.answers == {"ants": 2, "bees": 1} and counted.abstentions == {UNLIKE_TRAINING: 1}
    assert dict(cumulative_buckets([0.31, 1.42, 0.05], (0.1, 0.5, 1.5))) == {"0.1": 1, "0.5": 2, "1.5": 3, "+Inf": 3}


def torchserve_lines(record: list[dict], classes: list[str]) -> list[re.Match]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        cache = MetricsCacheYamlImpl(str(METRICS_YAML))
        cache.initialize_cache()
        metrics = TorchServeAnswerMetrics(cache, "clf", "1.0", classes, [UNLIKE_TRAINING], 0.06)
        buf.truncate(0)
        buf.seek(0)
        metrics.record(record)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    # the frontend matches what follows "[METRICS]" (WorkerLifeCycle: ^(INFO > )?(\[METRICS])(.*))
    return [FRONTEND_LINE.fullmatch(line.split("[METRICS]", 1)[1]) for line in buf.getvalue().splitlines()
            if "[METRICS]" in line]


def test_torchserve_metric_lines_are_ones_its_frontend_reads_with_the_yaml_dimensions():
    sections = yaml.safe_load(METRICS_YAML.read_text())["model_metrics"]
    declared = {m["name"]: m["dimensions"] for kind in sections.values() for m in kind}
    lines = torchserve_lines([*ANSWERS, answer("odd, name: x|y", 0.5, 0.2)], ["ants", "bees", "odd, name: x|y"])
    assert lines and all(lines), "a line TorchServe's frontend would drop"
    sent: dict[tuple, float] = {}
    for m in lines:
        name = m.group(1)
        dims = [d.split(":", 1) for d in m.group(4).split(",")]
        assert [k for k, _ in dims] == declared[name], name  # the frontend labels values by the yaml's order
        assert all(len(d) == 2 and ":" not in d[1] for d in dims)
        key = (name, *(v for k, v in dims if k not in MODEL_LABELS))
        sent[key] = sent.get(key, 0) + float(m.group(3))
    assert sent[("classifier_answers_total", "ants")] == 2 and sent[("classifier_answers_total", "odd_ name_ x_y")] == 1
    assert sent[("classifier_abstentions_total", UNLIKE_TRAINING)] == 1
    assert sent[("classifier_ood_score_bucket", "0.5")] == 3 and sent[("classifier_ood_score_count",)] == 4
    assert sent[("classifier_top_probability_bucket", "+Inf")] == 4


def test_metrics_yaml_declares_every_metric_the_handler_sends():
    sections = yaml.safe_load(METRICS_YAML.read_text())["model_metrics"]
    counters = {m["name"]: m["dimensions"] for m in sections["counter"]}
    for name, label in COUNTERS.items():
        assert counters[name] == [*MODEL_LABELS, label]
    for name in HISTOGRAMS:
        assert counters[f"{name}_bucket"] == [*MODEL_LABELS, "le"]
        assert counters[f"{name}_sum"] == counters[f"{name}_count"] == list(MODEL_LABELS)
    assert {m["name"]: m["dimensions"] for m in sections["gauge"]}[EXPECTED_ABSTAIN_RATE] == list(MODEL_LABELS)


def test_prometheus_client_metrics_expose_the_same_series():
    registry = CollectorRegistry()
    metrics = PrometheusAnswerMetrics("clf", "1.0", ["ants", "bees"], [UNLIKE_TRAINING], 0.06, registry=registry)
    metrics.counting_drops(["queue full"])
    metrics.record(ANSWERS)
    text = generate_latest(registry).decode()
    names = {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert exposed_names() <= names
    assert 'classifier_answers_total{label="ants",model_name="clf",model_version="1.0"} 2.0' in text
    assert 'classifier_ood_score_bucket{le="0.5",model_name="clf",model_version="1.0"} 2.0' in text


def test_a_failing_sink_never_fails_the_answer(caplog):
    class Broken(PrometheusAnswerMetrics):
        def _count(self, name: str, label: str, amount: float) -> None:
            if amount:
                raise RuntimeError("boom")

    Broken("clf", "1.0", ["ants"], registry=CollectorRegistry()).record(ANSWERS)
    assert "counting a batch's answers failed" in caplog.text


@pytest.mark.parametrize("n, keep", [(50, 0.95), (99, 0.95), (20, 0.5)])
def test_the_expected_abstain_rate_is_the_chance_a_new_image_exceeds_the_threshold(n: int, keep: float):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    threshold = float(scores.sort().values[math.ceil(keep * n) - 1])
    rate = expected_abstain_rate(scores, torch.ones(n), threshold, keep)
    assert rate == pytest.approx((n + 1 - math.ceil(keep * n)) / (n + 1), abs=1e-4)
    # the same experiment many times: a new score from the same distribution exceeds the threshold that often
    trials = torch.rand(4000, n + 1, generator=torch.Generator().manual_seed(1))
    thresholds = trials[:, :n].sort(1).values[:, math.ceil(keep * n) - 1]
    assert float((trials[:, n] > thresholds).double().mean()) == pytest.approx(rate, abs=0.02)
    low = expected_abstain_rate(scores, torch.where(scores < 0.2, 0.3, 0.9), threshold, keep, min_confidence=0.5)
    assert low == pytest.approx(rate + float(((scores <= threshold) & (scores < 0.2)).double().mean()), abs=1e-4)


def referenced_series(text: str) -> set[str]:
    return set(re.findall(r"\b(classifier_[a-z_]+)\b", text))


def test_alert_rules_and_dashboard_parse_and_use_only_series_the_servers_expose():
    rules = yaml.safe_load((MONITORING / "classifier.rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert "ClassifierAbstainsFarMoreThanExpected" in alerts
    abstain = alerts["ClassifierAbstainsFarMoreThanExpected"]["expr"]
    assert "3 * on" in abstain and EXPECTED_ABSTAIN_RATE in abstain and "[15m]" in "".join(exprs)
    dashboard = json.loads((MONITORING / "classifier-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(referenced_series(e) for e in exprs))
    assert used and used <= exposed_names(), used - exposed_names()
    assert all(e.count("(") == e.count(")") and e.count("[") == e.count("]") and e.count("{") == e.count("}")
               for e in exprs)
    assert recorded == {"classifier:abstain_rate:15m"}
    assert {"classifier_answers_total", "classifier_abstentions_total", "classifier_ood_score_bucket",
            "classifier_top_probability_bucket", EXPECTED_ABSTAIN_RATE} <= used


def test_monitoring_files_are_not_taken_for_kubernetes_manifests():
    assert not list(MONITORING.glob("*.yaml")), "tests/test_deploy.py reads every deploy/**/*.yaml as a manifest"
    assert Path(MONITORING / "classifier.rules.yml").is_file()
