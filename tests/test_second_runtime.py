"""KServe's model server (handler/kserve_runtime.py) and TorchServe serving the same archive over real HTTP on
loopback: the same photos get the same probabilities through every body shape and through a V2 client nobody
here wrote (tritonclient), the same abuse gets a 4xx from both, and the KServe side wants its token."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import FIXTURE_IMAGES
from torchserve_fixture import archive_as, blank_png, export_random_model, png_header, unused_ports

from jobs.config import load_config
from jobs.predict import predict
from jobs.serve import KServeRuntime, TorchServe, free_ports, launch_kserve, machine_models, serve, start, start_kserve

pytestmark = pytest.mark.e2e  # whole jobs, servers or torchrun: not in scripts/test.sh --fast

pytest.importorskip("kserve", reason="the kserve extra is not installed")

PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))[::6]
MODEL = "clf"


@dataclass
class Servers:
    torchserve: TorchServe
    kserve: KServeRuntime
    model_dir: Path
    store: Path

    def post(self, runtime: str, path: str, **kw) -> requests.Response:
        server = self.torchserve if runtime == "torchserve" else self.kserve
        headers = {**server.auth(), **kw.pop("headers", {})}
        return requests.post(f"{server.inference_url}{path}", headers=headers, timeout=120, **kw)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Servers:
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    root = tmp_path_factory.mktemp("runtimes")
    paths = export_random_model(root / "run", ["ants", "bees", "wasps"])
    store = root / "store"
    archive_as(load_config(None, {}), paths, store, MODEL)
    torchserve = start(store, root / "ts", ports=unused_ports(), models=machine_models(store))
    kserve = start_kserve(store, root / "ks", port=free_ports(1)[0])
    try:
        torchserve.wait_ready([MODEL], timeout=240)
        kserve.wait_ready([MODEL], timeout=240)
        yield Servers(torchserve, kserve, paths.model, store)
    finally:
        torchserve.stop()
        kserve.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2(*images: bytes) -> dict:
    data = [b64(i) for i in images]
    return {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}


def assert_same(predictions: list[dict], reference: dict) -> None:
    assert [p["label"] for p in predictions] == [p["label"] for p in reference["predictions"][:len(predictions)]]
    for p in predictions:
        assert p["probability"] == pytest.approx(reference["probabilities"][p["index"]], abs=1e-4)


def test_every_body_shape_gets_jobs_predicts_probabilities_from_both_runtimes(servers: Servers):
    offline = list(predict(servers.model_dir, PHOTOS))
    for photo, ref in zip(PHOTOS, offline, strict=True):
        img = photo.read_bytes()
        for runtime in ("torchserve", "kserve"):
            raw = servers.post(runtime, f"/predictions/{MODEL}", data=img)
            assert raw.status_code == 200, (runtime, raw.text)
            assert len(raw.json()["predictions"]) == 3
            assert_same(raw.json()["predictions"], ref)
            v1 = servers.post(runtime, f"/predictions/{MODEL}", json={"instances": [{"data": b64(img)}] * 2})
            assert v1.status_code == 200, (runtime, v1.text)
            for preds in v1.json()["predictions"]:
                assert_same(preds, ref)
            answer = servers.post(runtime, f"/predictions/{MODEL}", json=v2(img)).json()
            assert_same(json.loads(answer["outputs"][0]["data"][0]), ref)
        # KServe's own endpoints: V1 JSON, V1 with the raw image as the body, V2
        v1 = servers.post("kserve", f"/v1/models/{MODEL}:predict", json={"instances": [{"data": b64(img)}]})
        assert v1.status_code == 200, v1.text
        assert_same(v1.json()["predictions"][0], ref)
        raw = servers.post("kserve", f"/v1/models/{MODEL}:predict", data=img, headers={"Content-Type": "image/jpeg"})
        assert_same(raw.json()["predictions"], ref)
        infer = servers.post("kserve", f"/v2/models/{MODEL}/infer", json={**v2(img, img), "id": "r1"})
        assert infer.status_code == 200, infer.text
        body = infer.json()
        assert (body["id"], body["model_name"], body["outputs"][0]["shape"]) == ("r1", MODEL, [2])
        for item in body["outputs"][0]["data"]:
            assert_same(json.loads(item), ref)


def test_topk_and_multipart_behave_alike(servers: Servers):
    img = PHOTOS[0].read_bytes()
    for runtime in ("torchserve", "kserve"):
        assert len(servers.post(runtime, f"/predictions/{MODEL}", data=img, headers={"X-TopK": "1"})
                   .json()["predictions"]) == 1
        form = servers.post(runtime, f"/predictions/{MODEL}", files={"data": ("a.jpg", img, "image/jpeg"),
                                                                      "topk": (None, "2")})
        assert form.status_code == 200 and len(form.json()["predictions"]) == 2, (runtime, form.text)
    infer = servers.post("kserve", f"/v2/models/{MODEL}/infer", json={**v2(img), "parameters": {"topk": 1}})
    assert len(json.loads(infer.json()["outputs"][0]["data"][0])) == 1


def test_tritonclients_v2_client_gets_the_same_probabilities(servers: Servers):
    httpclient = pytest.importorskip("tritonclient.http")
    url = servers.kserve.inference_url.removeprefix("http://")
    headers = servers.kserve.auth()
    offline = list(predict(servers.model_dir, PHOTOS[:2]))
    images = np.array([b64(p.read_bytes()) for p in PHOTOS[:2]], dtype=object)
    with httpclient.InferenceServerClient(url) as client:
        assert client.is_server_live(headers=headers) and client.is_model_ready(MODEL, headers=headers)
        # JSON data (tritonclient sends no Content-Type then, and KServe 0.21 reads an untyped body as binary),
        # and the binary extension carrying the base64 text
        for binary, extra in ((False, {"Content-Type": "application/json"}), (True, {})):
            inp = httpclient.InferInput("image", [len(images)], "BYTES")
            inp.set_data_from_numpy(images, binary_data=binary)
            result = client.infer(MODEL, [inp], headers={**headers, **extra})
            answers = [json.loads(x) for x in result.as_numpy("predictions")]
            for preds, ref in zip(answers, offline, strict=True):
                assert_same(preds, ref)
        with pytest.raises(Exception, match="Token Authorization failed"):
            client.infer(MODEL, [inp])
        raw = httpclient.InferInput("image", [1], "BYTES")  # the JPEG itself as binary BYTES: a 400 that says why
        raw.set_data_from_numpy(np.array([PHOTOS[0].read_bytes()], dtype=object), binary_data=True)
        with pytest.raises(Exception, match=r"\[400\].*base64"):
            client.infer(MODEL, [raw], headers=headers)


def abuse(photo: bytes) -> dict[str, dict]:
    """requests.post keyword arguments for bodies both runtimes must refuse with a 4xx."""
    return {
        "bad base64 (JSON)": {"json": {"data": "%%% not base64"}},
        "bad base64 (V1)": {"json": {"instances": [{"data": "%%%"}]}},
        "bad base64 (V2)": {"json": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}},
        "not an image": {"data": b"this is not an image", "headers": {"Content-Type": "application/octet-stream"}},
        "truncated JPEG": {"data": photo[: len(photo) // 2]},
        "decompression bomb": {"data": png_header(100_000, 100_000)},
        "too many pixels in one request": {"json": {"instances": [{"data": b64(blank_png(9400, 9400))}] * 32}},
        "over 20 MiB": {"data": b"\xff\xd8" + b"\0" * (21 * 1024 * 1024)},
        "JSON with a refused field": {"json": {"instances": 5}},
        "deep JSON": {"data": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}},
    }


def test_abuse_gets_4xx_from_both_runtimes_and_good_requests_still_answer(servers: Servers):
    photo = PHOTOS[0].read_bytes()
    for runtime in ("torchserve", "kserve"):
        for kind, kw in abuse(photo).items():
            r = servers.post(runtime, f"/predictions/{MODEL}", **kw)
            assert 400 <= r.status_code < 500, (runtime, kind, r.status_code, r.text[:300])
        assert servers.post(runtime, f"/predictions/{MODEL}", data=photo).status_code == 200
    codes = {kind: servers.post("kserve", f"/v1/models/{MODEL}:predict", **kw).status_code
             for kind, kw in abuse(photo).items() if "json" in kw}
    assert all(400 <= c < 500 for c in codes.values()), codes
    r = servers.post("kserve", f"/predictions/{MODEL}", **abuse(photo)["too many pixels in one request"])
    assert r.status_code == 413 and "max_batch_pixels" in r.json()["error"]
    r = servers.post("kserve", f"/v2/models/{MODEL}/infer", **abuse(photo)["bad base64 (V2)"])
    assert r.status_code == 400 and "not valid base64" in r.json()["error"]


def test_kserve_runtime_wants_the_inference_key_except_for_health_checks(servers: Servers):
    url = f"{servers.kserve.inference_url}/predictions/{MODEL}"
    img = PHOTOS[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.post(url, data=img, headers=headers, timeout=30)
        assert r.status_code == 401 and "Token Authorization failed" in r.json()["error"]
        assert requests.post(f"{servers.kserve.inference_url}/v2/models/{MODEL}/infer", json=v2(img),
                             headers=headers, timeout=30).status_code == 401
    for path in ("/v2/health/ready", "/ping"):
        assert requests.get(f"{servers.kserve.inference_url}{path}", timeout=10).status_code == 200
    assert requests.post(url, data=img, headers=servers.kserve.auth(), timeout=30).status_code == 200


def test_jobs_serve_runtime_kserve_starts_ready_and_stops(servers: Servers, tmp_path: Path, capsys):
    cfg = load_config(None, {"model_name": MODEL})
    server = launch_kserve(cfg, servers.store, tmp_path / "state", host="127.0.0.1", port=free_ports(1)[0],
                           disable_token_auth=False)
    try:
        out = capsys.readouterr().out
        assert f"{server.inference_url}/predictions/{MODEL}" in out and "Authorization: Bearer" in out
        r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=PHOTOS[0].read_bytes(),
                          headers=server.auth(), timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3
        assert serve(cfg, servers.store, stop=True, workdir=tmp_path / "state") == 0
        server.process.wait(30)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.inference_url}/ping", timeout=5)
    finally:
        server.stop(timeout=10)
