"""The handler in-process, driven the way TorchServe's worker drives it (its real Context and
RequestProcessor classes), plus the archive stage and the server config it ships with."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIXTURE_IMAGES, REPO
from PIL import Image
from torchserve_fixture import bad_images, export_random_model, handle_batch, handler_context, png_header
from ts.context import Context, RequestProcessor
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

from handler import classifier_handler, files, precision, scheduler
from handler import model as models
from handler.classifier_handler import ClassifierHandler
from handler.preprocess import Preprocessor, image_header
from handler.protocol import BadRequest, parse_request
from jobs.archive import archive, handler_dir
from jobs.config import RunPaths, load_config
from jobs.errors import JobError
from jobs.predict import predict
from jobs.serve import Ports, parse_properties, render_config

CLASSES = ["ants", "bees", "wasps"]
PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An exported 3-class run folder: random resnet18 weights (the pixel budgets and trust banks below are sized
    for its 224-px input and 512 features), metadata from the real export code."""
    return export_random_model(tmp_path_factory.mktemp("run"), CLASSES, arch="resnet18").out


def make_context(model_dir: Path, handler_options: dict | None = None) -> Context:
    # torch_threads 0: keep torch's default, or the handler would change this pytest process's thread count.
    return handler_context(model_dir, {"torch_threads": 0, **(handler_options or {})})


def load_handler(run_dir: Path, **options) -> tuple[ClassifierHandler, Context]:
    ctx = make_context(run_dir / "model", options)
    h = ClassifierHandler()
    h.initialize(ctx)
    return h, ctx


@pytest.fixture(scope="module")
def loaded(run_dir: Path) -> tuple[ClassifierHandler, Context]:
    return load_handler(run_dir)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def probs_by_index(predictions: list[dict]) -> dict[int, float]:
    return {p["index"]: p["probability"] for p in predictions}


def test_predictions_equal_offline_predict(run_dir: Path, loaded):
    h, ctx = loaded
    files = PHOTOS[::5]
    out = handle_batch(h, ctx, [{"body": bytearray(f.read_bytes())} for f in files])
    offline = list(predict(run_dir / "model", files))
    assert len(out) == len(files)
    for got, ref in zip(out, offline, strict=True):
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in ref["predictions"]]
        for i, p in probs_by_index(got["predictions"]).items():
            assert p == pytest.approx(ref["probabilities"][i], abs=1e-4)
        probs = [p["probability"] for p in got["predictions"]]
        assert probs == sorted(probs, reverse=True)


def test_every_body_shape_yields_the_same_answer(loaded):
    h, ctx = loaded
    img = PHOTOS[0].read_bytes()
    rows = [
        {"body": bytearray(img)},                                         # curl -T / --data-binary
        {"data": bytearray(img)},                                         # curl -F data=@img.jpg
        {"file": bytearray(img), "note": bytearray(b"x")},                # another multipart field name
        {"body": {"data": b64(img)}},                                     # application/json, parsed by TorchServe
        {"body": bytearray(json.dumps({"b64": b64(img)}).encode())},      # JSON TorchServe could not parse
        {"body": "data:image/jpeg;base64," + b64(img)},                   # text/plain data URL
        {"body": {"image_bytes": {"b64": b64(img)}}},                     # TF-serving style
    ]
    out = handle_batch(h, ctx, rows)
    assert all(ctx.get_response_status(i)[0] == 200 for i in range(len(rows)))
    assert all(o == out[0] for o in out), out


def test_kserve_shapes_answer_per_instance(loaded):
    h, ctx = loaded
    a, b = PHOTOS[0].read_bytes(), PHOTOS[-1].read_bytes()
    v1 = {"instances": [{"data": b64(a)}, {"data": b64(b)}]}
    v2 = {"id": "r1", "inputs": [{"name": "img", "shape": [2], "datatype": "BYTES", "data": [b64(a), b64(b)]}]}
    single = handle_batch(h, ctx, [{"body": bytearray(a)}, {"body": bytearray(b)}])
    got_v1, got_v2 = handle_batch(h, ctx, [{"body": v1}, {"body": v2}])
    assert got_v1 == {"predictions": [single[0]["predictions"], single[1]["predictions"]]}
    assert got_v2["id"] == "r1" and got_v2["model_name"] == "clf"
    (output,) = got_v2["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2]
    assert [json.loads(d) for d in output["data"]] == got_v1["predictions"]


@pytest.mark.parametrize("envelope", [KServeEnvelope, KServev2Envelope])
def test_torchserve_service_envelopes_unwrap_into_our_handler(loaded, envelope):
    """With ``service_envelope=kserve|kservev2`` TorchServe wraps the entry point in these classes."""
    h, ctx = loaded
    img = b64(PHOTOS[0].read_bytes())
    expected = handle_batch(h, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])[0]["predictions"]
    body = ({"instances": [{"data": img}]} if envelope is KServeEnvelope
            else {"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": [img]}]})
    wrapped = envelope(lambda data, context: handle_batch(h, context, data))
    ctx.request_processor = [RequestProcessor({})]
    ctx.request_ids = {0: "req-0"}
    (response,) = wrapped.handle([{"body": body}], ctx)
    found = response["predictions"][0] if envelope is KServeEnvelope else response["outputs"][0]["data"][0]
    assert found["predictions"] == expected


def test_a_bad_request_fails_alone_in_its_batch(loaded):
    h, ctx = loaded
    good = PHOTOS[3].read_bytes()
    bad = bad_images(good)
    rows = [{"body": bytearray(good)}] + [{"body": bytearray(v)} for v in bad.values()] + [{"data": bytearray(good)}]
    out = handle_batch(h, ctx, rows)
    statuses = dict(zip(["good", *bad, "good-again"], [ctx.get_response_status(i)[0] for i in range(len(rows))],
                        strict=True))
    assert statuses == {"good": 200, **{kind: 400 for kind in bad}, "bomb": 413, "good-again": 200}
    assert out[0] == out[-1] and len(out[0]["predictions"]) == len(CLASSES)
    for kind, answer in zip(bad, out[1:-1], strict=True):
        assert set(answer) == {"error"}, kind
    by_kind = dict(zip(bad, out[1:-1], strict=True))
    assert "empty" in by_kind["empty"]["error"]
    assert "more than 89478485 pixels (max_image_pixels)" in by_kind["bomb"]["error"]
    assert "aspect ratio" in by_kind["too-thin"]["error"]
    phrase = ctx.get_response_status(1)[1]
    assert phrase and phrase.isprintable() and phrase.isascii()


def test_image_pixel_limit_comes_from_the_model_config(run_dir: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the handler sets it process-wide
    h, ctx = load_handler(run_dir, max_image_pixels=50_000)
    small = io.BytesIO()
    Image.new("RGB", (200, 200), "blue").save(small, format="PNG")
    out = handle_batch(h, ctx, [{"body": bytearray(png_header(300, 300))}, {"body": bytearray(small.getvalue())}])
    assert ctx.get_response_status(0)[0] == 413 and "more than 50000 pixels" in out[0]["error"]
    assert ctx.get_response_status(1)[0] == 200


TOPK_REQUESTS = {
    "default 5, capped at 3 classes": (lambda img: {"body": bytearray(img)}, {}, 3),
    "header": (lambda img: {"body": bytearray(img)}, {"X-TopK": "1"}, 1),
    "multipart field": (lambda img: {"data": bytearray(img), "topk": bytearray(b"2")}, {}, 2),
    "JSON beats the header": (lambda img: {"body": {"data": b64(img), "topk": 2}}, {"X-TopK": "1"}, 2),
    "JSON above the class count": (lambda img: {"body": {"data": b64(img), "topk": 50}}, {}, 3),
}


@pytest.mark.parametrize("case", TOPK_REQUESTS)
def test_topk_sources_and_cap(loaded, case):
    h, ctx = loaded
    make_row, headers, expected = TOPK_REQUESTS[case]
    (out,) = handle_batch(h, ctx, [make_row(PHOTOS[1].read_bytes())], [headers])
    assert len(out["predictions"]) == expected


def test_topk_option_in_model_config(run_dir: Path):
    h, ctx = load_handler(run_dir, topk=2)
    (out,) = handle_batch(h, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])
    assert len(out["predictions"]) == 2


@pytest.mark.parametrize("topk", ["0", "-1", "many"])
def test_invalid_topk_is_a_400(loaded, topk):
    h, ctx = loaded
    (out,) = handle_batch(h, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}], [{"x-topk": topk}])
    assert ctx.get_response_status(0)[0] == 400 and "topk" in out["error"]


@pytest.mark.parametrize("row, message", [
    ({}, "empty request"),
    ({"body": []}, "JSON list"),
    ({"body": {"instances": "abc"}}, "'instances' must be a list"),
    ({"body": {"instances": []}}, "no image"),
    ({"body": {"instances": [{"nope": 1}]}}, "instances[0] needs a base64 image"),
    ({"body": {"data": "***not base64***"}}, "body.data is not valid base64"),
    ({"body": {"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]}}, "datatype BYTES"),
    ({"body": {"something": "else"}}, "needs a base64 image"),
    ({"body": "{not json"}, "not valid JSON"),
    ({"body": {"instances": ["aGk="] * 33}}, "at most 32"),
])
def test_malformed_bodies_are_named(row, message):
    with pytest.raises(BadRequest) as e:
        parse_request(row)
    assert message in str(e.value)


def test_module_entry_point_initializes_once(run_dir: Path):
    """TorchServe calls handle(None, ctx) to load, then handle(batch, ctx); the module has one entry point."""
    ctx = make_context(run_dir / "model")
    classifier_handler._service = ClassifierHandler()
    assert classifier_handler.handle(None, ctx) is None
    model = classifier_handler._service.classifier.engine
    ctx.request_processor, ctx.request_ids = [RequestProcessor({})], {0: "r"}
    ctx.metrics.request_ids = ctx.request_ids
    (out,) = classifier_handler.handle([{"body": bytearray(PHOTOS[0].read_bytes())}], ctx)
    assert classifier_handler._service.classifier.engine is model and len(out["predictions"]) == 3


def test_serving_plan_follows_the_machine():
    assert scheduler.serving_plan(cores=2, gpus=0) == scheduler.ServingPlan(2, 1, 4, 5, solo_threads=2)
    assert scheduler.serving_plan(cores=16, gpus=0) == scheduler.ServingPlan(4, 4, 4, 5, solo_threads=4)
    assert scheduler.serving_plan(cores=8, gpus=0).solo_threads == 4
    assert scheduler.serving_plan(cores=64, gpus=0).threads == 4
    assert scheduler.serving_plan(cores=16, gpus=2) == scheduler.ServingPlan(2, 8, 32, 5, solo_threads=8)
    assert scheduler.torch_threads(3, torch.device("cpu")) == (3, 3)


BUSY_WORKER = """
import sys
from pathlib import Path
from handler.scheduler import BusyBoard
board = BusyBoard(Path(sys.argv[1]))
with board.busy():
    print("busy", flush=True)
    sys.stdin.read()
"""


def test_a_lone_image_runs_on_more_threads_than_a_batch(run_dir: Path, monkeypatch):
    """A one-image batch while no other worker of the model is busy gets the idle cores; a bigger batch, or
    one while another worker runs, the worker's share (JOBS_CPUS=4: 4 workers of 1 thread, a lone image on 4)."""
    monkeypatch.setenv("JOBS_CPUS", "4")
    before = torch.get_num_threads()
    try:
        ctx = handler_context(run_dir / "model")  # torch_threads: auto
        handler = ClassifierHandler()
        handler.initialize(ctx)
        plan = scheduler.serving_plan()
        assert (handler.threads, handler.solo_threads) == (plan.threads, plan.solo_threads) == (1, 4)
        photo = bytearray(PHOTOS[0].read_bytes())
        (lone,) = handle_batch(handler, ctx, [{"body": photo}])
        assert torch.get_num_threads() == 4
        batch = handle_batch(handler, ctx, [{"body": photo}] * 3)
        assert torch.get_num_threads() == 1
        for b in batch:
            assert [p["index"] for p in b["predictions"]] == [p["index"] for p in lone["predictions"]]
            for p, q in zip(b["predictions"], lone["predictions"], strict=True):
                assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)
        # Another worker of the model (another process) busy with a batch: a lone image keeps to its share.
        other = subprocess.Popen([sys.executable, "-c", BUSY_WORKER, str(run_dir / "model")], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert other.stdout.readline() == "busy\n"
            handle_batch(handler, ctx, [{"body": photo}])
            assert torch.get_num_threads() == 1
        finally:
            other.communicate("", timeout=60)
        handle_batch(handler, ctx, [{"body": photo}])
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_without_a_writable_temp_dir_a_lone_image_keeps_to_the_workers_share(run_dir: Path, monkeypatch, tmp_path):
    monkeypatch.setenv("JOBS_CPUS", "4")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    before = torch.get_num_threads()
    try:
        ctx = handler_context(run_dir / "model")
        handler = ClassifierHandler()
        handler.initialize(ctx)
        (out,) = handle_batch(handler, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])
        assert out["predictions"] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_handler_never_imports_captum():
    code = "import sys, handler.classifier_handler; print('captum' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    assert "captum" not in (handler_dir() / "classifier_handler.py").read_text()


def test_archive_packs_the_serving_package_metadata_and_model_config(run_dir: Path, tmp_path: Path):
    # torch-model-archiver wipes $TMPDIR/<model_name>; prove ours runs in a private TMPDIR.
    name = f"unit-{uuid.uuid4().hex[:8]}"
    sentinel = Path(os.environ.get("TMPDIR", "/tmp")) / name / "keep"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_text("x")
    try:
        cfg = load_config(None, {"model_name": name, "serve_batch_size": 4, "max_batch_delay_ms": 50, "topk": 2,
                                 "serve_tuning": "archive"})
        mar = archive(cfg, RunPaths(run_dir, tmp_path / "store"))
        assert sentinel.exists()
    finally:
        sentinel.unlink()
        sentinel.parent.rmdir()
    assert mar == tmp_path / "store" / f"{name}.mar"
    # no temp leftovers; a store outside the run folder keeps its (hidden, released) lock file, and every
    # version's archive in .versions/
    assert sorted(p.name for p in mar.parent.iterdir()) == [".job.lock", ".versions", mar.name]
    assert (mar.parent / ".job.lock").read_text() == ""
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        assert {"model.pt", "metadata.json", "index_to_name.json", "classifier_handler.py", "model-config.yaml",
                "MAR-INF/MANIFEST.json"} <= names
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        model_config = yaml.safe_load(z.read("model-config.yaml"))
        package = sorted(handler_dir().glob("*.py"))
        assert {f"handler/{f.name}" for f in package} <= names  # the serving package, whole
        for f in package:
            assert z.read(f"handler/{f.name}") == f.read_bytes()
    assert manifest["handler"] == "classifier_handler.py" and manifest["modelName"] == name
    assert model_config["batchSize"] == 4 and model_config["maxBatchDelay"] == 50
    assert model_config["handler"]["topk"] == 2
    assert {"minWorkers", "maxWorkers", "responseTimeout", "startupTimeout"} <= set(model_config)
    machine = archive(load_config(None, {"model_name": "m"}), RunPaths(run_dir, tmp_path / "store"))
    with zipfile.ZipFile(machine) as z:  # by default the server chooses workers and batching
        assert not {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay"} & set(yaml.safe_load(
            z.read("model-config.yaml")))


def test_archive_names_what_is_missing(tmp_path: Path):
    with pytest.raises(JobError, match="lacks model.pt, index_to_name.json, metadata.json; run `python -m jobs export"):
        archive(load_config(None, {}), RunPaths(tmp_path))


def test_archive_refuses_a_name_torchserve_cannot_serve(run_dir: Path, tmp_path: Path):
    with pytest.raises(JobError, match="config key 'model_name'"):
        archive(load_config(None, {"model_name": "my model/1"}), RunPaths(run_dir, tmp_path))


def test_rendered_config_keeps_management_on_loopback(tmp_path: Path):
    base = (handler_dir() / "config.properties").read_text()
    props = parse_properties(base)
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    assert props["metrics_mode"] == "prometheus" and props["install_py_dep_per_model"] == "false"
    text = render_config(base, host="0.0.0.0", ports=Ports(1, 2, 3, 4, 5), model_store=tmp_path)
    rendered = parse_properties(text)
    assert rendered["inference_address"] == "http://0.0.0.0:1"
    assert rendered["management_address"] == "http://127.0.0.1:2"
    assert rendered["grpc_management_address"] == "127.0.0.1" and rendered["grpc_management_port"] == "5"
    assert rendered["model_store"] == str(tmp_path.resolve())
    assert rendered["allowed_urls"].startswith("file://")
    assert "disable_token_authorization=true" in render_config(base, host="127.0.0.1", ports=Ports(),
                                                               model_store=tmp_path, disable_token_auth=True)


ABUSIVE_BODIES = {
    "100k-deep {": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    "100k-deep [": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "topk Infinity": (b'{"data": "aGk=", "topk": Infinity}', "topk must be a positive integer, got inf"),
    "topk true": (b'{"data": "aGk=", "topk": true}', "topk must be a positive integer"),
    "topk 2.5": (b'{"data": "aGk=", "topk": 2.5}', "topk must be a positive integer, got 2.5"),
    "topk object": (b'{"data": "aGk=", "topk": {"a": 1}}', "got a JSON dict"),
    "instances not a list": (b'{"instances": 5}', "'instances' must be a list"),
    "v2 id not a string": (b'{"id": {"x": 1}, "inputs": []}', "'id' must be a string"),
    "text": (b"this is not an image", "unrecognised format"),
    "garbage PNG": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"),
}


@pytest.mark.parametrize("kind", ABUSIVE_BODIES)
def test_abusive_bodies_are_400s_that_say_why_without_internals(loaded, kind):
    """As TorchServe hands them over when its own JSON parse failed: raw bytes."""
    h, ctx = loaded
    body, reason = ABUSIVE_BODIES[kind]
    (out,) = handle_batch(h, ctx, [{"body": bytearray(body)}])
    assert ctx.get_response_status(0)[0] == 400, out
    assert reason in out["error"]
    assert not re.search(r"0x[0-9a-f]+|<[^>]*>|/\w+/", out["error"]), out["error"]


def test_pixel_budget_is_checked_from_headers_before_decoding(run_dir: Path):
    """32 PNGs each just under Pillow's limit: refused from their headers, with the limit named."""
    h, ctx = load_handler(run_dir, max_batch_pixels=1_000_000)
    huge = {"instances": [{"data": b64(png_header(9400, 9400))}] * 32}
    (out,) = handle_batch(h, ctx, [{"body": huge}])
    assert ctx.get_response_status(0)[0] == 413
    assert "2827520000 pixels; the limit per request is 1000000 (max_batch_pixels)" in out["error"]


def test_a_batch_over_its_pixel_budget_refuses_the_later_requests(run_dir: Path):
    h, ctx = load_handler(run_dir, max_batch_pixels=300_000)
    photo = PHOTOS[0].read_bytes()
    w, h_ = Image.open(io.BytesIO(photo)).size
    assert w * h_ <= 300_000 < 2 * w * h_
    out = handle_batch(h, ctx, [{"body": bytearray(photo)}, {"body": bytearray(photo)}])
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 503]
    assert "server busy" in out[1]["error"] and "predictions" in out[0]


def test_image_size_from_headers_matches_pillow():
    for photo in PHOTOS[:5]:
        assert image_header(photo.read_bytes()) == ("JPEG", Image.open(photo).size)
    buf = io.BytesIO()
    Image.new("RGB", (123, 45)).save(buf, format="PNG")
    assert image_header(buf.getvalue()) == ("PNG", (123, 45))
    assert image_header(b"GIF89a") is None
    preprocessor = Preprocessor(models.preprocess_spec("resnet18"))
    assert preprocessor.decoded_pixels("PNG", (4000, 3000)) == 12_000_000
    assert preprocessor.decoded_pixels("JPEG", (4000, 3000)) == 500 * 375  # decoded at 1/8 scale


def test_an_unexpected_failure_is_a_500_pointing_at_the_log(run_dir: Path, caplog):
    h, ctx = load_handler(run_dir)
    h.classifier.engine.model = None  # a bug: the forward pass raises TypeError
    (out,) = handle_batch(h, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])
    assert ctx.get_response_status(0)[0] == 500 and "model_log.log" in out["error"]
    assert "Traceback" in caplog.text and "TypeError" in caplog.text


def test_preprocess_and_forward_time_are_metrics(loaded):
    h, ctx = loaded
    handle_batch(h, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])
    names = {name for by_name in ctx.metrics.cache.values() for name in by_name}
    assert {"PreprocessTime", "ForwardTime", "HandlerTime"} <= names


def test_forced_bf16_is_emulated_where_not_native_and_close_to_fp32(run_dir: Path, loaded):
    h, ctx = loaded
    bf16, bctx = load_handler(run_dir, precision="bf16")
    assert bf16.classifier.engine.amp_dtype is torch.bfloat16
    rows = [{"body": bytearray(p.read_bytes())} for p in PHOTOS[:4]]
    for ref, got in zip(handle_batch(h, ctx, rows), handle_batch(bf16, bctx, rows), strict=True):
        for p, q in zip(ref["predictions"], got["predictions"], strict=True):
            assert q["probability"] == pytest.approx(p["probability"], abs=0.05)


def test_recorded_bf16_serves_bf16_only_where_native(monkeypatch, caplog):
    meta = {"serve_precision": {"choice": "bf16"}}
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.serve_dtype(meta, cpu) is torch.bfloat16
    assert precision.serve_dtype({"serve_precision": {"choice": "fp32"}}, cpu) is None
    assert precision.serve_dtype({}, cpu) is None  # exported before the parity check: fp32
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.serve_dtype(meta, cpu) is None
    assert "no native bf16: serving fp32" in caplog.text


def test_int8_model_serves_as_predict_does_and_near_fp32(run_dir: Path, loaded, tmp_path: Path):
    """An export that offered int8: the handler and `jobs predict` load model-int8.pt alike."""
    shutil.copytree(run_dir / "model", tmp_path / "model")
    model_dir = tmp_path / "model"
    meta = json.loads((model_dir / "metadata.json").read_text())
    preprocess = Preprocessor(meta["preprocess"])
    fp32 = models.build_model(meta, model_dir / "model.pt", torch.device("cpu"))
    calibration = [torch.stack([preprocess(p.read_bytes()) for p in PHOTOS[:16]])]
    torch.save(models.quantize_int8(meta, fp32, calibration).state_dict(), model_dir / files.INT8_WEIGHTS)
    meta["serve_precision"] = {"choice": "int8"}
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    h, ctx = load_handler(tmp_path)
    assert h.classifier.precision == "int8"
    sent = PHOTOS[::6]
    got = handle_batch(h, ctx, [{"body": bytearray(f.read_bytes())} for f in sent])
    offline = list(predict(model_dir, sent))
    reference = handle_batch(*loaded, [{"body": bytearray(f.read_bytes())} for f in sent])
    for answer, ref, fp in zip(got, offline, reference, strict=True):
        for i, p in probs_by_index(answer["predictions"]).items():
            assert p == pytest.approx(ref["probabilities"][i], abs=1e-4)
            assert p == pytest.approx(probs_by_index(fp["predictions"])[i], abs=0.1)


def test_the_serving_package_never_imports_jobs():
    """Statically (no `jobs` import anywhere in handler/) and at run time (importing every module loads no `jobs`)."""
    import ast

    for source in sorted(handler_dir().glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n == "jobs" or n.startswith("jobs.")], f"{source.name} imports {names}"
    modules = ", ".join(f"handler.{p.stem}" for p in sorted(handler_dir().glob("*.py")) if p.stem != "__init__")
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m == 'jobs' or m.startswith('jobs.')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout == "[]\n"


def test_the_serve_images_command_imports_nothing_the_serve_extra_leaves_out():
    """The serve image installs the `serve` extra, not the job's data libraries: `jobs serve-config` (its entry
    point) must start without them (an import of scipy there once left every serve container restarting)."""
    left_out = ("scipy", "sklearn", "cleanlab", "matplotlib")
    code = ("import sys\n"
            f"for name in {left_out!r}: sys.modules[name] = None  # what an absent package looks like to import\n"
            "from jobs.serve import write_machine_config  # what the serve-config command imports\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]


def test_a_batch_of_only_refused_requests_is_answered_by_a_model_with_trust_fields(run_dir: Path, tmp_path: Path):
    """No image reaches the model: the trust fields' score must not be asked about an empty batch."""
    from handler import trust

    shutil.copytree(run_dir / "model", tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(30, 512, generator=g), torch.arange(30) % len(CLASSES)
    fitted = trust.Trust.fit(features, labels, features[:9], torch.randn(9, len(CLASSES), generator=g), labels[:9])
    meta = json.loads((tmp_path / "model" / "metadata.json").read_text())
    meta["trust"] = fitted.save(tmp_path / "model")
    (tmp_path / "model" / "metadata.json").write_text(json.dumps(meta))
    h, ctx = load_handler(tmp_path)
    out = handle_batch(h, ctx, [{"body": bytearray(b"not an image")}, {"body": bytearray(b"")}])
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [400, 400] and all("error" in o for o in out)
    (good,) = handle_batch(h, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])
    assert {"predictions", "ood_score", "abstain", "abstain_reason"} <= set(good)
