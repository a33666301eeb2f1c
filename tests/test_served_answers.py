"""What the servers met, seen from outside: the answers' metrics scraped from the real /metrics pages of TorchServe
and KServe's model server after known traffic, and what capture kept on disk (handler/answer_metrics.py,
handler/capture.py), on a random model whose trust fields abstain on about half of what it did not see."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import FIXTURE_IMAGES, poll
from torchserve_fixture import add_trust, archive_as, bad_images, export_random_model, unused_ports

from bench.trust import generated_image
from handler.answer_metrics import (
    HISTOGRAMS,
    OOD_SCORE,
    TOP_PROBABILITY,
    bound,
    cumulative_buckets,
    exposed_names,
    label_value,
)
from handler.capture import CaptureSettings
from jobs.config import Config, load_config
from jobs.predict import predict
from jobs.serve import Server, capture_environ, free_ports, launch, launch_kserve

pytest.importorskip("kserve", reason="the kserve extra is not installed")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")]

MODEL = "clf"
PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))
FIT, UNSEEN = PHOTOS[::2], PHOTOS[1::2]
KSERVE_MAX_FILES = 6  # three captures: a tiny cap, so the traffic below overflows it


@dataclass
class Served:
    servers: dict[str, Server]
    captures: dict[str, Path]
    traffic: list[bytes]
    below: float
    expected_abstain_rate: float

    def post(self, runtime: str, body: bytes, **headers: str) -> requests.Response:
        server = self.servers[runtime]
        return requests.post(f"{server.inference_url}/predictions/{MODEL}", data=body, timeout=120,
                             headers={**server.auth(), **headers})

    def scrape(self, runtime: str) -> str:
        return requests.get(f"{self.servers[runtime].metrics_url}/metrics", timeout=30).text


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for i in range(4):
        _, image = generated_image(i)
        image.save(folder / f"generated-{i}.jpg")
        files.append(folder / f"generated-{i}.jpg")
    return files


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("answers")
    paths = export_random_model(root / "run", ["ants", "bees", "wasps"])
    trust = add_trust(paths.model, FIT, keep=0.5)
    store = root / "store"
    archive_as(load_config(None, {}), paths, store, MODEL)
    files = UNSEEN + FIT[:6] + write_images(root / "generated")
    # A capture threshold between the top probabilities of the answers that do not abstain, so some are kept
    # for it and some are not; no sample, so what is kept is known exactly.
    tops = sorted(r["predictions"][0]["probability"] for r in predict(paths.model, files) if not r["abstain"])
    below = round(tops[len(tops) // 2], 3)
    captures = {"torchserve": root / "captured-ts", "kserve": root / "captured-ks"}

    def config(runtime: str, **keys) -> Config:  # what `jobs serve --capture DIR --capture-below ...` passes on
        return load_config(None, {"capture": str(captures[runtime]), "capture_below": below, "capture_sample": 0,
                                  "model_name": MODEL, **keys})

    ports = unused_ports()
    torchserve = launch(config("torchserve"), store, root / "ts", host="127.0.0.1", port=ports.inference,
                        management_port=ports.management, metrics_port=ports.metrics, disable_token_auth=False)
    try:
        kserve = launch_kserve(config("kserve", capture_max_files=KSERVE_MAX_FILES), store, root / "ks",
                               host="127.0.0.1", port=free_ports(1)[0], disable_token_auth=False)
    except BaseException:
        torchserve.stop()
        raise
    try:
        yield Served({"torchserve": torchserve, "kserve": kserve}, captures, [f.read_bytes() for f in files], below,
                     trust["expected_abstain_rate"])
    finally:
        torchserve.stop()
        kserve.stop()


# ----------------------------------------------------------------------------------------------
# reading a Prometheus page

SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def series(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (TorchServe adds Hostname)."""
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name and labels.items() <= dict(LABEL.findall(m.group(2) or "")).items():
            total += float(m.group(3))
    return total


def model_series(text: str, name: str, **labels: str) -> float:
    return series(text, name, model_name=MODEL, model_version="1.0", **labels)


def expected_metrics(answers: list[dict]) -> dict[tuple, float]:
    """What the metrics must have grown by after ``answers``, counted here from the answers themselves."""
    expected: dict[tuple, float] = {}
    for a in answers:
        key = ("classifier_answers_total", ("label", label_value(a["predictions"][0]["label"])))
        expected[key] = expected.get(key, 0) + 1
        if a["abstain"]:
            key = ("classifier_abstentions_total", ("reason", a["abstain_reason"]))
            expected[key] = expected.get(key, 0) + 1
    values = {OOD_SCORE: [a["ood_score"] for a in answers],
              TOP_PROBABILITY: [a["predictions"][0]["probability"] for a in answers]}
    for name, bounds in HISTOGRAMS.items():
        for le, n in cumulative_buckets(values[name], bounds):
            expected[(f"{name}_bucket", ("le", le))] = n
        expected[(f"{name}_count", ())] = len(values[name])
    return expected


def measured(text: str, keys: list[tuple]) -> dict[tuple, float]:
    return {(name, label): model_series(text, name, **dict([label] if label else [])) for name, label in keys}


@pytest.mark.parametrize("runtime", ["torchserve", "kserve"])
def test_metrics_count_the_answers_given_by_class_reason_and_score(served: Served, runtime: str):
    photo = served.traffic[0]
    page = served.scrape(runtime)
    answers = []
    for body in served.traffic:
        r = served.post(runtime, body)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    for body in bad_images(photo).values():  # refused: counted nowhere
        assert 400 <= served.post(runtime, body).status_code < 500
    expected = expected_metrics(answers)
    before, before_sum = measured(page, list(expected)), model_series(page, f"{OOD_SCORE}_sum")
    assert 0 < sum(a["abstain"] for a in answers) < len(answers)
    def grown(text: str) -> dict:
        return {k: v - before.get(k, 0.0) for k, v in measured(text, list(expected)).items()}

    # TorchServe's frontend reads the worker's metric lines a moment later
    text = poll(lambda: served.scrape(runtime), lambda page: grown(page) == expected, timeout_s=30, every_s=0.5)
    assert grown(text) == expected
    ood_sum = model_series(text, f"{OOD_SCORE}_sum") - before_sum
    assert ood_sum == pytest.approx(sum(a["ood_score"] for a in answers), abs=1e-4)
    assert model_series(text, "classifier_expected_abstain_rate") == pytest.approx(served.expected_abstain_rate)
    assert f'le="{bound(0.5)}"' in text and 'le="+Inf"' in text
    on_page = {m.group(1) for m in map(SAMPLE.match, text.splitlines()) if m}
    assert exposed_names() <= on_page, exposed_names() - on_page  # what deploy/monitoring may query


# ----------------------------------------------------------------------------------------------
# capture


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def captured(folder: Path) -> dict[str, dict]:
    """sha256 of each kept image -> its record; every image has its record and the reverse."""
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    images = {p.stem: p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".json"}
    assert set(records) == set(images), (sorted(records), sorted(images))
    return {sha(images[stem].read_bytes()): records[stem] for stem in records}


def owner_only(folder: Path) -> None:
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert not p.name.endswith(".part"), p


def test_capture_keeps_the_abstained_and_low_confidence_images_with_their_records(served: Served):
    folder = served.captures["torchserve"]
    answers = {}
    for body in served.traffic:
        r = served.post("torchserve", body)
        assert r.status_code == 200
        answers[sha(body)] = r.json()
    for body in bad_images(served.traffic[0]).values():
        assert served.post("torchserve", body).status_code >= 400
    wanted = {h for h, a in answers.items() if a["abstain"] or a["predictions"][0]["probability"] < served.below}
    assert 0 < len(wanted) < len(answers)
    kept = poll(lambda: captured(folder), lambda found: len(found) >= len(wanted), timeout_s=20)
    assert set(kept) >= wanted  # other tests' traffic may add more of the same images
    refused = {sha(b) for b in bad_images(served.traffic[0]).values()}
    assert not set(kept) & refused
    for h in wanted:
        record = kept[h]
        assert record["answer"] == answers[h]
        assert record["why"] == ("abstained" if answers[h]["abstain"] else "low confidence")
        assert (record["model_name"], record["model_version"]) == (MODEL, "1.0")
        assert record["request_id"] and record["answered_at"].endswith("+00:00")
    owner_only(folder)


def test_capture_on_kserve_holds_its_tiny_cap_keeping_the_newest(served: Served):
    folder = served.captures["kserve"]
    keeps = []
    for i, body in enumerate(served.traffic * 2):
        r = served.post("kserve", body, **{"X-Request-Id": f"req-{i}"})
        assert r.status_code == 200
        a = r.json()
        if a["abstain"] or a["predictions"][0]["probability"] < served.below:
            keeps.append(f"req-{i}")
    for body in bad_images(served.traffic[0]).values():
        assert served.post("kserve", body, **{"X-Request-Id": "refused"}).status_code >= 400
    assert len(keeps) > KSERVE_MAX_FILES
    ids = poll(lambda: {r["request_id"] for r in captured(folder).values()}, lambda found: keeps[-1] in found,
               timeout_s=20)
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    assert len(files) <= KSERVE_MAX_FILES
    assert keeps[-1] in ids and keeps[0] not in ids and "refused" not in ids
    owner_only(folder)


def test_capture_settings_reach_the_server_through_the_environment(served: Served):
    settings = CaptureSettings.from_environ(capture_environ(load_config(None, {"capture": str(served.captures[
        "kserve"]), "capture_max_files": KSERVE_MAX_FILES})))
    assert settings is not None and settings.max_files == KSERVE_MAX_FILES
    assert CaptureSettings.from_environ(capture_environ(load_config(None, {}))) is None
