"""What a person sees of one real `jobs run --data`: its log through a pipe, and its two pages in Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, SMALL_RUN
from pages import horizontal_overflow, launch, needs_chromium, open_page, split_counts_from_file, sync_api

from jobs.evaluate import wilson_interval

pytestmark = pytest.mark.e2e  # whole jobs, servers or torchrun: not in scripts/test.sh --fast

STAGES = ["clean", "audit", "split", "train head", "train finetune", "export", "evaluate", "archive"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> dict:
    """One tiny real run with stdout and stderr to pipes (a log, not a terminal), output kept as bytes."""
    tmp = tmp_path_factory.mktemp("run-output")
    data = tmp / "data"
    subprocess.run(["cp", "-r", str(REPO / "tests" / "fixtures" / "hymenoptera_small"), str(data)], check=True)
    out = tmp / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("JOBS_PROGRESS_INTERVAL_S", None)
    proc = subprocess.run([sys.executable, "-m", "jobs", "run", "--data", str(data), "--out", str(out), *SMALL_RUN,
                           "--finetune-epochs", "1", "--feature-views", "2"],
                          cwd=REPO, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")[-3000:]
    return {"data": data, "out": out, "stdout": proc.stdout.decode(), "stderr": proc.stderr.decode()}


def test_the_log_has_no_bars_and_counts_the_stages_in_order(data_run):
    log = data_run["stdout"]
    assert "\r" not in log + data_run["stderr"]  # no carriage-return bars in a log
    begun = re.findall(r"^\[(\d)/(\d)\] ([a-z ]+)$", log, re.M)
    assert [(int(i), int(n), name) for i, n, name in begun] == [(i + 1, 8, s) for i, s in enumerate(STAGES)]
    done = re.findall(r"^\[\d/8\] ([a-z ]+) done in [\d.]+ s", log, re.M)
    assert done == STAGES
    order = [log.index(f"] {name}\n") for name in STAGES]
    assert order == sorted(order)
    assert re.search(r"^\[8/8\] archive done in .*\(the whole run: .+\)$", log, re.M)


def test_epoch_lines_say_where_the_run_is_and_what_the_speed_measures(data_run):
    log = data_run["stdout"]
    head = re.findall(r"^\[4/8\] train head: epoch (\d)/2: train loss [\d.]+, val loss [\d.]+, val accuracy [\d.]+%"
                      r"(?: \(best so far\))?; [\d,]+ feature rows/s through the head alone; ([^\n]*)$", log, re.M)
    assert [epoch for epoch, _ in head] == ["1", "2"]
    assert re.fullmatch(r"[\d.]+ s elapsed, ETA [\d.]+ s", head[0][1]) and re.fullmatch(r"[\d.]+ s elapsed", head[1][1])
    assert re.search(r"^\[5/8\] train finetune: epoch 1/1: .*; [\d,.]+ img/s through backbone and head; ", log, re.M)
    assert re.search(r"^features: train: \d+ images x 2 views, \d+ backbone passes in [\d.]+ s "
                     r"\(\d+ images not in the cache; [\d.]+ img/s through the backbone\)$", log, re.M)


def test_the_best_epoch_is_a_sentence(data_run):
    best = [x for x in data_run["stdout"].splitlines() if re.match(r"train: (best|kept)", x)]
    assert len(best) == 1 and "{" not in best[0]  # was `train: best {'stage': 'head', ...}`
    assert re.fullmatch(r"train: kept epoch [12] of the (head|finetune) stage, chosen by lowest val loss; ties broken "
                        r"by higher val accuracy \(val loss [\d.]+, val accuracy [\d.]+%\); its weights are "
                        r".*best\.pt, which evaluate and export use", best[0])


def test_the_test_accuracy_comes_with_its_interval(data_run):
    metrics = json.loads((data_run["out"] / "metrics.json").read_text())
    n, acc = metrics["test_count"], metrics["test_accuracy"]
    assert metrics["test_accuracy_ci95"] == pytest.approx(list(wilson_interval(round(acc * n), n)))
    assert re.search(rf"^evaluate: WARNING the test split has only {n} images \(under 50\)", data_run["stdout"], re.M)


@needs_chromium
def test_both_pages_at_1280_px(data_run, tmp_path):
    out, report = data_run["out"], data_run["out"] / "report"
    counts = split_counts_from_file(out / "splits.json")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_page(browser, (report / "index.html").as_uri())
            page.wait_for_function("document.body.dataset.loaded !== undefined")
            assert page.evaluate("document.body.dataset.loaded") == "true"  # every embedded image decoded
            assert horizontal_overflow(page) == 0
            # the source is the --data folder; nothing of collect applies
            assert page.locator("#data-folder").text_content() == str(data_run["data"].resolve())
            assert page.locator("#terms").count() == 0 and page.locator("#collect-source").count() == 0
            config = page.locator("#config").text_content()
            assert not re.search(r"^(terms|source|images_per_term):", config, re.M)
            assert page.locator("img[alt*='collected']").count() == 0
            assert not (report / "collect_preview.png").exists() and not (out / "raw").exists()
            # the counts shown are splits.json's
            rows = page.eval_on_selector_all("#data tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
            shown = {r[0]: {"train": int(r[4]), "val": int(r[5]), "test": int(r[6])} for r in rows[1:-1]}
            assert shown == counts
            for name, c in counts.items():
                sampled = page.locator(f'.sampled[data-class="{name}"]').text_content()
                assert sampled == f"{min(16, c['train'])} of {c['train']}"
            assert page.locator("#test-count").text_content() == str(sum(c["test"] for c in counts.values()))
            assert re.fullmatch(r"[\d.]+% to [\d.]+%", page.locator("#accuracy-ci").text_content())
            assert "the test split has only" in page.locator(".warn").first.text_content()
            page.screenshot(path=str(tmp_path / "index-1280.png"), full_page=True)

            review = open_page(browser, (report / "review.html").as_uri())
            assert horizontal_overflow(review) == 0
            review.screenshot(path=str(tmp_path / "review-1280.png"), full_page=True)
        finally:
            browser.close()
