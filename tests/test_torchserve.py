"""A real TorchServe serving real archives over real HTTP on loopback ports.

One server for the module, two models: "two" (ants/bees on the real EfficientNet-Lite0 backbone from timm,
batchSize 8, maxBatchDelay 200 ms packed into the .mar so concurrent requests share a batch) and "seven"
(7 classes, more than the stock handler's top-5; workers and batching chosen for this machine, as
`jobs serve` does).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import FIXTURE_IMAGES, poll
from torchserve_fixture import (
    archive_as,
    bad_images,
    blank_png,
    export_tiny_model,
    make_seven_class_data,
    serve_detached,
    unused_ports,
)

from bench.trust import generated_image
from handler import scheduler
from jobs.archive import handler_dir
from jobs.config import load_config
from jobs.predict import predict
from jobs.serve import (
    UNIX_SOCKET_NAME_MAX,
    TorchServe,
    machine_config,
    machine_models,
    parse_properties,
    render_config,
    serve,
    server_tmp,
    start,
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")]

PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))
BACKEND = "torch"  # the engine the server and `jobs predict` both run here (see served)


@dataclass
class Served:
    server: TorchServe
    model_dirs: dict[str, Path]
    store: Path

    def predict(self, model: str, timeout: float = 60, **kw) -> requests.Response:
        headers = {**self.server.auth(), **kw.pop("headers", {})}
        return requests.post(f"{self.server.inference_url}/predictions/{model}", headers=headers, timeout=timeout,
                             **kw)

    def worker_pids(self, model: str) -> list[int]:
        r = requests.get(f"{self.server.management_url}/models/{model}", headers=self.server.auth("management"),
                         timeout=10)
        r.raise_for_status()
        return [w["pid"] for w in r.json()[0]["workers"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory, real_weights: Path) -> Served:
    root = tmp_path_factory.mktemp("torchserve")
    store = root / "model-store"
    two_cfg, two = export_tiny_model(root / "two", FIXTURE_IMAGES, arch="timm/tf_efficientnet_lite0",
                                     weights=str(real_weights))
    seven_data = make_seven_class_data(FIXTURE_IMAGES, root / "seven-data")
    seven_cfg, seven = export_tiny_model(root / "seven", seven_data, serve_precision="int8")
    # torch in the server and in `jobs predict` (BACKEND): the answers are compared to 1e-4, and auto may pick
    # another admitted engine in each process (the engines' answers: tests/test_backends.py).
    archive_as(two_cfg, two, store, "two", max_batch_delay_ms=200, serve_tuning="archive", serve_backend=BACKEND)
    archive_as(seven_cfg, seven, store, "seven", serve_backend=BACKEND)
    server = start(store, root / "state", ports=unused_ports(), models=machine_models(store))  # "seven" only
    try:
        server.wait_ready(["two", "seven"], timeout=240)
        yield Served(server, {"two": two.model, "seven": seven.model}, store)
    finally:
        server.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_matches_offline(predictions: list[dict], reference: dict, k: int) -> None:
    assert len(predictions) == k
    assert [p["label"] for p in predictions] == [p["label"] for p in reference["predictions"][:k]]
    for p in predictions:
        assert p["probability"] == pytest.approx(reference["probabilities"][p["index"]], abs=1e-4)


def assert_same_trust(answer: dict, reference: dict) -> None:
    """ood_score, abstain and abstain_reason as `jobs predict` gives them."""
    assert answer["ood_score"] == pytest.approx(reference["ood_score"], abs=1e-4)
    assert (answer["abstain"], answer["abstain_reason"]) == (reference["abstain"], reference["abstain_reason"])


@pytest.mark.parametrize("model, k", [("two", 2), ("seven", 5)])
def test_http_probabilities_equal_offline_predict(served: Served, model: str, k: int):
    files = PHOTOS[::4]
    offline = list(predict(served.model_dirs[model], files, backend=BACKEND))
    for f, ref in zip(files, offline, strict=True):
        r = served.predict(model, data=f.read_bytes())
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert_matches_offline(r.json()["predictions"], ref, k)
        assert_same_trust(r.json(), ref)


def test_an_image_of_none_of_the_classes_is_abstained_on_in_every_body_shape(served: Served, tmp_path: Path):
    """Calibrated probabilities, ood_score and abstain come back from TorchServe as from `jobs predict`."""
    image = tmp_path / "stripes.png"
    generated_image(5)[1].save(image)
    (ref,) = predict(served.model_dirs["two"], [image], backend=BACKEND)
    assert ref["abstain"] and ref["abstain_reason"] == "unlike the training images"
    single = served.predict("two", data=image.read_bytes()).json()
    assert_matches_offline(single["predictions"], ref, 2)
    assert_same_trust(single, ref)
    v1 = served.predict("two", json={"instances": [{"data": b64(image.read_bytes())}] * 2}).json()
    assert v1["abstain"] == [True, True] and v1["abstain_reason"] == ["unlike the training images"] * 2
    assert v1["ood_score"] == pytest.approx([ref["ood_score"]] * 2, abs=1e-4)
    v2 = served.predict("two", json={"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES",
                                                  "data": [b64(image.read_bytes())]}]}).json()
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert outputs["abstain"]["datatype"] == "BOOL" and outputs["abstain"]["data"] == [True]
    assert outputs["ood_score"]["data"] == pytest.approx([ref["ood_score"]], abs=1e-4)


def test_every_input_form_over_http(served: Served):
    photo = PHOTOS[5]
    img = photo.read_bytes()
    ref = list(predict(served.model_dirs["seven"], [photo], backend=BACKEND))[0]
    single = [
        served.predict("seven", data=img),                                                    # curl -T
        served.predict("seven", files={"data": (photo.name, img, "image/jpeg")}),              # curl -F data=@
        served.predict("seven", files={"image": (photo.name, img, "image/jpeg")}),             # another field name
        served.predict("seven", json={"data": b64(img)}),                                     # JSON base64
        served.predict("seven", json={"b64": b64(img)}),
    ]
    for r in single:
        assert r.status_code == 200, r.text
        assert_matches_offline(r.json()["predictions"], ref, 5)
    v1 = served.predict("seven", json={"instances": [{"data": b64(img)}, {"data": b64(img)}]})
    assert v1.status_code == 200, v1.text
    for preds in v1.json()["predictions"]:
        assert_matches_offline(preds, ref, 5)
    v2 = served.predict("seven", json={"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES",
                                                    "data": [b64(img)]}]})
    assert v2.status_code == 200, v2.text
    assert v2.json()["model_name"] == "seven" and v2.json()["outputs"][0]["shape"] == [1]


def test_topk_is_capped_at_the_class_count_and_selectable(served: Served):
    img = PHOTOS[0].read_bytes()
    assert len(served.predict("two", data=img).json()["predictions"]) == 2  # the stock handler crashes here
    assert len(served.predict("seven", data=img, headers={"X-TopK": "7"}).json()["predictions"]) == 7
    assert len(served.predict("seven", json={"data": b64(img), "topk": 1}).json()["predictions"]) == 1
    assert len(served.predict("seven", files={"data": img, "topk": "3"}).json()["predictions"]) == 3
    r = served.predict("seven", data=img, headers={"X-TopK": "zero"})
    assert r.status_code == 400 and "topk" in r.json()["error"]


def test_good_and_bad_requests_in_one_batch_each_get_their_answer(served: Served):
    good = [p.read_bytes() for p in PHOTOS[:3]]
    bad = bad_images(good[0])
    bodies = [("good", g) for g in good] + list(bad.items())[:5]  # 8 = batchSize
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: served.predict("two", data=body[1]), bodies))
    for (kind, _), r in zip(bodies, answers, strict=True):
        if kind == "good":
            assert r.status_code == 200, r.text
            assert [p["label"] for p in r.json()["predictions"]] and "error" not in r.json()
        else:
            assert 400 <= r.status_code < 500, (kind, r.status_code, r.text)
            assert set(r.json()) == {"error"} and r.json()["error"], kind
    ids = {r.headers["x-request-id"]: kind for (kind, _), r in zip(bodies, answers, strict=True)}
    batches = handled_batches(served.server, ids)
    mixed = [b for b in batches if {ids.get(i) == "good" for i in b if i in ids} == {True, False}]
    assert mixed, f"no batch mixed good and bad requests: {[[ids.get(i) for i in b] for b in batches]}"


def handled_batches(server: TorchServe, wanted: Collection[str], timeout_s: float = 30) -> list[list[str]]:
    """Request ids per handler call, from the HandlerTime metric TorchServe logs for each batch.

    The frontend logs a worker's metric lines from its own reader thread, so a client can hold its
    answer before the line is written: wait until every wanted id is in the log."""
    def logged() -> list[list[str]]:
        text = "\n".join(p.read_text(errors="replace") for p in (server.workdir / "logs").glob("*.log"))
        return [m.split(",") for m in re.findall(r"\[METRICS\]HandlerTime\.Milliseconds:[^\n]*?#hostname:[^,]+,"
                                                 r"\d+,([0-9a-f,-]+)", text)]

    def missing(batches: list[list[str]]) -> set[str]:
        return set(wanted) - {i for b in batches for i in b}

    batches = poll(logged, lambda found: not missing(found), timeout_s)
    assert not missing(batches), f"no batch metric line in {timeout_s} s for request ids {sorted(missing(batches))}"
    return batches


def test_two_hundred_malformed_requests_leave_the_worker_alive(served: Served):
    pids = served.worker_pids("seven")
    good = PHOTOS[0].read_bytes()
    variants = [*bad_images(good).values(), b"\x00" * 1000, b"GIF89a" + b"\xff" * 50, b'{"data": "%%%"}',
                b'{"instances": 5}']
    bodies = [variants[i % len(variants)] for i in range(200)]
    json_bodies = {b'{"data": "%%%"}', b'{"instances": 5}'}

    def send(body: bytes) -> int:
        headers = {"Content-Type": "application/json"} if body in json_bodies else {}
        return served.predict("seven", data=body, headers=headers).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, bodies))
    assert all(400 <= c < 500 for c in codes), sorted(set(codes))
    assert served.worker_pids("seven") == pids
    ping = requests.get(f"{served.server.inference_url}/ping", headers=served.server.auth(), timeout=10)
    assert ping.json()["status"] == "Healthy"
    assert served.predict("seven", data=good).status_code == 200


def test_requests_without_the_token_are_refused(served: Served):
    url = f"{served.server.inference_url}/predictions/two"
    img = PHOTOS[0].read_bytes()
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
    for headers in ({}, {"Authorization": "Bearer wrong"}, served.server.auth("management")):
        r = requests.post(url, data=img, headers=headers, timeout=30)
        assert r.status_code in (400, 401) and "Token Authorization failed" in r.text, r.text
    r = requests.get(f"{served.server.management_url}/models", headers=served.server.auth(), timeout=10)
    assert r.status_code in (400, 401), "the inference key must not open the management API"
    assert served.predict("two", data=img).status_code == 200


def listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, from the kernel's socket tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_management_api_listens_on_loopback_only(served: Served):
    for port in (served.server.ports.management, served.server.ports.grpc_management):
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on {port}"
        assert addresses <= LOOPBACK, f"port {port} bound to {addresses}"
    r = requests.get(f"{served.server.management_url}/models", headers=served.server.auth("management"), timeout=10)
    assert {m["modelName"] for m in r.json()["models"]} == {"two", "seven"}


def test_metrics_count_inference_requests(served: Served):
    before = inference_count(served, "seven")
    for _ in range(3):
        assert served.predict("seven", data=PHOTOS[1].read_bytes()).status_code == 200
    assert inference_count(served, "seven") >= before + 3


def inference_count(served: Served, model: str) -> float:
    text = requests.get(f"{served.server.metrics_url}/metrics", timeout=10).text
    m = re.search(rf'^ts_inference_requests_total\{{model_name="{re.escape(model)}",[^}}]*\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_serve_in_background_then_stop(served: Served, tmp_path: Path, capsys):
    """What `python -m jobs serve --model-store DIR` starts, tuned for this machine, then `--stop` through
    TorchServe's own pid file. In a run folder too deep for TorchServe's worker sockets under it (their names
    hold 107 bytes): they go to a short folder of the system's, and --stop finds the pid file there."""
    deep = tmp_path / ("a-deep-run-folder-" * 4)
    store, workdir = deep / "store", deep / "serve-state"
    assert len(str(workdir / "tmp" / ".ts.sock.9000")) > UNIX_SOCKET_NAME_MAX
    store.mkdir(parents=True)
    shutil.copy(served.store / "seven.mar", store)
    cfg = load_config(None, {"model_name": "seven"})
    server = serve_detached(cfg, store, workdir)
    out = capsys.readouterr().out
    assert f"{server.inference_url}/predictions/seven" in out and "Authorization: Bearer" in out
    plan = scheduler.serving_plan()
    assert f"{plan.workers} workers x {plan.threads} threads" in out
    r = requests.get(f"{server.management_url}/models/seven", headers=server.auth("management"), timeout=10).json()[0]
    assert (len(r["workers"]), r["batchSize"], r["maxBatchDelay"]) == (plan.workers, plan.batch_size,
                                                                       plan.max_batch_delay_ms)
    r = requests.post(f"{server.inference_url}/predictions/seven", data=PHOTOS[0].read_bytes(), timeout=60,
                      headers=server.auth())
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5
    pid_file = server_tmp(workdir) / ".model_server.pid"
    assert pid_file.is_file() and not pid_file.is_relative_to(tmp_path)
    assert serve(cfg, store, stop=True) == 0
    assert not pid_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.inference_url}/ping", timeout=5)


ENTRY_POINT = handler_dir() / "start_torchserve.sh"


def test_the_serve_images_entry_point_tunes_for_the_cpus_it_is_given(served: Served, tmp_path: Path):
    """handler/start_torchserve.sh as Dockerfile.serve runs it, with a config of its own (TS_CONFIG_FILE) and
    JOBS_CPUS=1, as a pod requesting one CPU would have: the archive that leaves batching open gets the
    one-CPU plan, the one that packs its own keeps it, and the handler's metrics reach Prometheus."""
    ports = unused_ports()
    base = tmp_path / "mounted.properties"
    base.write_text(render_config((handler_dir() / "config.properties").read_text(), host="127.0.0.1", ports=ports,
                                  model_store=served.store))
    mounted = base.read_text()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TS_CONFIG_FILE": str(base), "TEMP": str(tmp), "TMPDIR": str(tmp), "JOBS_CPUS": "1",
           "MODEL_STORE": str(served.store), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / "console.out", "wb") as console:
        proc = subprocess.Popen(["sh", str(ENTRY_POINT)], cwd=tmp_path, env=env, stdout=console,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = TorchServe(proc, tmp_path, "127.0.0.1", ports)
    try:
        server.wait_ready(["two", "seven"], timeout=240)
        plan = scheduler.serving_plan(cores=1)

        def settings(model: str) -> dict:
            return requests.get(f"{server.management_url}/models/{model}", headers=server.auth("management"),
                                timeout=10).json()[0]

        seven, two = settings("seven"), settings("two")
        assert (len(seven["workers"]), seven["batchSize"], seven["maxBatchDelay"]) == \
            (plan.workers, plan.batch_size, plan.max_batch_delay_ms)
        assert two["maxBatchDelay"] == 200  # packed into its archive (serve_tuning: archive)
        r = requests.post(f"{server.inference_url}/predictions/seven", data=PHOTOS[0].read_bytes(),
                          headers=server.auth(), timeout=60)
        assert r.status_code == 200, r.text
        text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
        assert re.search(r'^PreprocessTime\{.*ModelName="seven".*\} \S+$', text, re.M), text[:3000]
        assert "serve-config:" in (tmp_path / "console.out").read_text()
        assert base.read_text() == mounted  # the mounted config is only read
        assert "seven" in json.loads(parse_properties((tmp / "config.properties").read_text())["models"])
    finally:
        server.stop()


def test_a_models_line_of_the_operators_own_wins_over_the_machines(served: Served):
    own = '{"seven":{"1.0":{"marName":"seven.mar","minWorkers":3,"maxWorkers":3,"batchSize":2}}}'
    base = f"models={own}\nmetrics_config=/etc/ts/metrics.yaml\n"
    text, models = machine_config(base, served.store, scheduler.serving_plan())
    assert models == {} and parse_properties(text) == {"models": own, "metrics_config": "/etc/ts/metrics.yaml"}
    text, models = machine_config("job_queue_size=7\n", served.store, scheduler.serving_plan(cores=4))
    settings = parse_properties(text)
    assert settings["job_queue_size"] == "7" and set(models) == {"seven"}
    assert settings["metrics_config"] == str(handler_dir() / "metrics.yaml")


INTERNALS = re.compile(r"0x[0-9a-fA-F]{4,}|<[^>]*object[^>]*>|/(?:tmp|work|home|usr|opt)/")


def abusive_requests() -> dict[str, dict]:
    """The hostile probe of issue 13, as requests.post keyword arguments."""
    huge = b64(blank_png(9400, 9400))  # decodable, just under Pillow's 89M-pixel limit
    return {
        "32 decodable 9400x9400 PNGs": {"json": {"instances": [{"data": huge}] * 32}},
        "100k-deep {": {"data": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                        "headers": {"Content-Type": "application/json"}},
        "100k-deep [": {"data": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}},
        "topk Infinity": {"data": b'{"data": "%s", "topk": Infinity}' % b64(PHOTOS[0].read_bytes()).encode(),
                          "headers": {"Content-Type": "application/json"}},
        "JSON with a refused field": {"data": b'{"instances": 5}'},
        "text": {"data": b"not an image at all", "headers": {"Content-Type": "text/plain"}},
    }


def test_abuse_gets_4xx_while_the_same_worker_answers_good_requests(served: Served):
    pids = served.worker_pids("seven")
    cases = abusive_requests()
    good = PHOTOS[2].read_bytes()
    with ThreadPoolExecutor(12) as pool:
        # 8 at once of the heaviest, as in the probe that once made TorchServe kill the worker
        heavy = [pool.submit(served.predict, "seven", timeout=120, **cases["32 decodable 9400x9400 PNGs"])
                 for _ in range(8)]
        others = {kind: pool.submit(served.predict, "seven", timeout=120, **kw) for kind, kw in cases.items()}
        t0 = time.monotonic()
        meanwhile = served.predict("seven", data=good, timeout=60)
        good_latency = time.monotonic() - t0
        answers = {**{f"heavy {i}": f.result() for i, f in enumerate(heavy)},
                   **{kind: f.result() for kind, f in others.items()}}
    assert meanwhile.status_code == 200 and good_latency < 15, (meanwhile.status_code, good_latency)
    for kind, r in answers.items():
        assert 400 <= r.status_code < 500, (kind, r.status_code, r.text[:300])
        assert set(r.json()) == {"error"} and not INTERNALS.search(r.text), (kind, r.text[:300])
    assert "max_batch_pixels" in answers["heavy 0"].json()["error"] and answers["heavy 0"].status_code == 413
    assert "nested too deeply" in answers["100k-deep {"].json()["error"]
    assert "topk" in answers["topk Infinity"].json()["error"]
    assert "'instances' must be a list" in answers["JSON with a refused field"].json()["error"]
    assert served.worker_pids("seven") == pids


def test_preprocess_and_forward_time_reach_prometheus(served: Served):
    assert served.predict("seven", data=PHOTOS[1].read_bytes()).status_code == 200
    text = requests.get(f"{served.server.metrics_url}/metrics", timeout=10).text
    for name in ("PreprocessTime", "ForwardTime"):
        assert re.search(rf'^{name}\{{.*ModelName="seven".*\}} \S+$', text, re.M), f"{name} missing:\n{text[:3000]}"


def test_precision_checks_are_recorded_in_metadata(served: Served):
    record = json.loads((served.model_dirs["two"] / "metadata.json").read_text())["serve_precision"]
    assert record["choice"] in {"bf16", "fp32"} and record["val_images"] > 0 and "int8" not in record
    assert 0 <= record["bf16_top1_agreement"] <= 1
    assert record["choice"] == ("bf16" if record["bf16_top1_agreement"] >= 0.99 else "fp32")
    trust = json.loads((served.model_dirs["two"] / "metadata.json").read_text())["trust"]
    n = trust["fit_on"]["val_images"]  # the export's expected abstain rate, from the val split it fit on
    assert trust["expected_abstain_rate"] == pytest.approx((n + 1 - math.ceil(trust["keep"] * n)) / (n + 1), abs=1e-4)
    seven = json.loads((served.model_dirs["seven"] / "metadata.json").read_text())["serve_precision"]
    int8 = seven["int8"]  # serve_precision: int8 asked for the check; the numbers decide
    assert set(int8["images_per_s"]) >= {"fp32", "int8"} and int8["calibration_images"] > 0
    assert (seven["choice"] == "int8") == int8["offered"]
    assert int8["offered"] == (served.model_dirs["seven"] / "model-int8.pt").is_file()


def test_workers_run_the_serving_package_their_archive_carries(served: Served):
    """Not a `handler` package installed beside TorchServe: the archive is the whole contract."""
    served.predict("two", data=PHOTOS[0].read_bytes()).raise_for_status()
    log = (served.server.workdir / "logs" / "model_log.log").read_text()
    packages = set(re.findall(r"serving package (\S+)", log))
    assert packages and all(Path(p).parent != handler_dir().parent for p in packages), packages
