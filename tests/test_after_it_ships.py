"""After it ships, on real features and real photos of three domains: a scene classifier meets a scene class it
never saw and photos of another domain; the metrics show the abstentions rise, capture keeps what it should,
a person's decisions label the new class, the next run learns it, and the served version switches to it while
a client keeps sending requests.

EfficientNet-Lite0 ImageNet weights (``scripts/offline_weights.py``), frozen, as ``jobs run`` trains by default.
Known: buildings, glacier and sea (40 photos each of ``../shared/datasets/scenes-sample``); new: forest; the
other domain: pets-sample. Needs ``../shared`` (skipped without it) and Java (TorchServe).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, poll, run_job
from torchserve_fixture import serve_detached

from jobs.archive import packed_settings
from jobs.captured import read_captures
from jobs.config import load_config
from jobs.predict import predict
from jobs.serve import serve
from jobs.switch import switch_to
from jobs.versions import PREVIOUS_TEST_SPLIT

DATASETS = REPO.parent / "shared" / "datasets"
SCENES, PETS = DATASETS / "scenes-sample", DATASETS / "pets-sample"
KNOWN, NEW = ["buildings", "glacier", "sea"], "forest"

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
    pytest.mark.skipif(not (SCENES.is_dir() and PETS.is_dir()), reason=f"{DATASETS} not present (real-data test)"),
]


def photos(folder: Path, start: int, stop: int) -> list[Path]:
    return sorted(folder.iterdir())[start:stop]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def abstentions(server) -> float:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(r'^classifier_abstentions_total\{[^}]*\} (\S+)$', text, re.M))


def test_a_new_class_is_noticed_captured_labelled_learned_and_switched_to(tmp_path: Path, real_weights: Path):
    data, run, captured = tmp_path / "data", tmp_path / "run", tmp_path / "captured"
    for name in KNOWN:
        (data / name).mkdir(parents=True)
        for photo in photos(SCENES / name, 0, 40):
            shutil.copyfile(photo, data / name / photo.name)
    # Served on torch: the engines are test_backends.py's subject, and their export, check and measurement at
    # each worker's start cost this test 6 of its 75 s alone (the run folder keeps the key for the second run).
    run_job("run", "--data", str(data), "--out", str(run), "--arch", "timm/tf_efficientnet_lite0",
            "--weights", str(real_weights), "--serve-backend", "torch")
    estimate = json.loads((run / "model" / "metadata.json").read_text())["trust"]["new_class"]

    sent = {"known": [p for name in KNOWN for p in photos(SCENES / name, 300, 330)],
            "new": photos(SCENES / NEW, 0, 40),
            "other domain": photos(PETS / "cats", 0, 20) + photos(PETS / "dogs", 0, 20)}
    store, workdir = run / "model-store", tmp_path / "state"
    cfg = load_config(None, {"capture": str(captured)})
    server = serve_detached(cfg, store, workdir)
    try:
        url = f"{server.inference_url}/predictions/classifier"

        def post(body: bytes) -> requests.Response:
            return requests.post(url, data=body, headers=server.auth(), timeout=120)

        # The refused request goes first: capture writes in the order it is offered, so once the captures owed
        # below are on disk, a capture of it (which must not be) would be there too.
        refused = post(b"not an image at all")
        assert 400 <= refused.status_code < 500, refused.text
        answers: dict[str, list[dict]] = {}
        abstained_before = abstentions(server)
        answers["known"] = [post(p.read_bytes()).json() for p in sent["known"]]
        after_known = abstentions(server)
        for group in ("new", "other domain"):
            answers[group] = [post(p.read_bytes()).json() for p in sent[group]]
        after_all = abstentions(server)

        # The metrics: the abstain rate rises from the known classes to what the model never saw.
        known_rate = (after_known - abstained_before) / len(sent["known"])
        unknown_rate = (after_all - after_known) / (len(sent["new"]) + len(sent["other domain"]))
        assert known_rate == sum(a["abstain"] for a in answers["known"]) / len(sent["known"])
        assert unknown_rate > known_rate + 0.5, (known_rate, unknown_rate)

        # Capture: kept by the bytes received; nothing of the refused request. The writer works off a queue: wait
        # for what the answers say it must keep (abstained, or under capture_below), not a fixed time.
        owed = {digest(p.read_bytes()) for group, files in sent.items() for p, a in zip(files, answers[group])
                if a["abstain"] or a["predictions"][0]["probability"] < cfg.capture_below}
        captures = poll(lambda: read_captures(captured) if captured.is_dir() else [],
                        lambda found: owed <= {digest(c.image.read_bytes()) for c in found}, timeout_s=30)
        kept = {digest(c.image.read_bytes()) for c in captures}
        assert len(kept) == len(captures)  # each photo was sent once
        assert owed <= kept, f"{len(owed - kept)} abstained or low-confidence answers not kept"
        share = {group: sum(digest(p.read_bytes()) in kept for p in files) / len(files)
                 for group, files in sent.items()}
        print(f"captured: {share}; new-class estimate at export: {estimate['captured']:.2f} captured, "
              f"{estimate['flagged']:.2f} flagged; the new class got "
              f"{sum(a['abstain'] for a in answers['new']) / len(sent['new']):.2f} flagged")
        assert share["other domain"] >= 0.9 and share["new"] >= 0.5 and share["known"] <= 0.25, share
        assert digest(b"not an image at all") not in kept

        # A person's decisions: the forest photos are a new class, the rest is discarded.
        # (A script writes decisions.json as the review page would: a captured image is named by its path in the
        # capture folder behind "captured:".)
        forest = {digest(p.read_bytes()) for p in sent["new"]}
        relabel = {c.source: NEW for c in captures if digest(c.image.read_bytes()) in forest}
        exclude = [c.source for c in captures if c.source not in relabel]
        (run / "decisions.json").write_text(json.dumps({"relabel": relabel, "exclude": exclude}))
        run_job("run", "--data", str(data), "--out", str(run), "--captured", str(captured))
        meta = json.loads((run / "model" / "metadata.json").read_text())
        assert meta["classes"] == sorted([*KNOWN, NEW]) and meta["model_version"] == "2.0"
        held_out = photos(SCENES / NEW, 200, 240)
        learned = sum(a["predictions"][0]["label"] == NEW for a in predict(run / "model", held_out)) / len(held_out)
        paired = json.loads((run / "report" / "metrics.json").read_text())["versus_previous"]["sets"][
            PREVIOUS_TEST_SPLIT]
        print(f"2.0: {learned:.0%} of {len(held_out)} unseen {NEW} photos right; on 1.0's test split "
              f"{paired['only_old_right']} only 1.0 right, {paired['only_new_right']} only 2.0 right, "
              f"p = {paired['p_value']:.3g}")
        assert learned >= 0.75, learned
        assert not paired["significantly_worse"], paired

        # The switch, with a client sending requests throughout.
        statuses: list[int] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                statuses.append(post(held_out[0].read_bytes()).status_code)

        loop = threading.Thread(target=client)
        loop.start()
        try:
            time.sleep(0.5)
            assert switch_to(cfg, store, workdir, "2.0") == 0
            time.sleep(0.5)
        finally:
            stop.set()
            loop.join(60)
        assert len(statuses) > 3 and set(statuses) == {200}, statuses
        assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "2.0"
        assert post(held_out[1].read_bytes()).json()["predictions"][0]["label"] == NEW
    finally:
        serve(cfg, store, stop=True, workdir=workdir)
