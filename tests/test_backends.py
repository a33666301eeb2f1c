"""The portable graph and the engines behind one interface (issue 28): export writes ``model.onnx`` and admits
each engine by its answers on val; ``ImageClassifier`` serves on the one ``serve_backend`` names, or the fastest
admitted one (``auto``), and on torch with one line saying why wherever another cannot be had."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_IMAGES, copy_run, run_job

from handler import engines, files
from handler import model as models
from handler.model import create
from handler.service import ImageClassifier
from jobs import backends, checkpoints
from jobs.archive import archive, model_config
from jobs.config import SERVE_BACKENDS, RunPaths, load_config
from jobs.data import load_splits
from jobs.export import export
from jobs.parity import bf16_parity

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

CPU = torch.device("cpu")
PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))[:12]


def meta_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "metadata.json").read_text())


def answers(model_dir: Path, **options) -> tuple[ImageClassifier, torch.Tensor, list[bool]]:
    """The classifier ``options`` make, its calibrated probabilities and abstain decisions on ``PHOTOS``."""
    classifier = ImageClassifier(model_dir, CPU, options=options)
    outputs = classifier.forward(torch.stack(classifier.decode([p.read_bytes() for p in PHOTOS])))
    return classifier, outputs.probs, [t.get("abstain") for t in outputs.trust]


@pytest.fixture(scope="module")
def exported_run(prepared_template: Path, tmp_path_factory) -> Path:
    """A run folder as `jobs export` and `jobs archive` leave it (model.onnx, the engines' record, the .mar): a
    checkpoint of seeded random resnet18 weights over the cleaned and split fixture photos, without training
    (seconds where a whole run takes a minute; the export is the real one)."""
    paths = RunPaths(copy_run(prepared_template, tmp_path_factory.mktemp("backends") / "run"))
    classes = load_splits(paths)["classes"]
    torch.manual_seed(0)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save({"format": checkpoints.FORMAT, "model": create("resnet18", len(classes)).state_dict(), "progress": {},
                "config": {"arch": "resnet18", "weights": "none"}, "classes": classes},
               paths.checkpoints / checkpoints.BEST)
    cfg = load_config(None, {"weights": "none"})
    export(cfg, paths)
    archive(cfg, paths)
    return paths.out


@pytest.fixture(scope="module")
def state_dict_answers(exported_run: Path) -> tuple[torch.Tensor, list[bool]]:
    """The exported state_dict's probabilities and abstain decisions on ``PHOTOS``, in fp32: what every engine
    is compared with."""
    _, probs, abstain = answers(exported_run / "model", backend="torch", precision="fp32")
    return probs, abstain


def test_export_writes_onnx_admits_each_engine_and_the_archive_packs_it(exported_run: Path):
    model = exported_run / "model"
    record = meta_of(model)["backends"]
    assert (model / files.ONNX).is_file() and record["onnx"] == files.ONNX
    assert record["gates"] == backends.GATES and record["val_images"] > 0
    for name in engines.ONNX_ENGINES:
        checked = record[name]
        assert checked["passed"] and backends.passes(checked, backends.GATES[checked["precision"]]), checked
    assert record[engines.ONNXRUNTIME]["precision"] == "fp32"
    with zipfile.ZipFile(exported_run / "model-store" / "classifier.mar") as mar:
        assert files.ONNX in mar.namelist()


def test_an_export_for_torch_writes_no_graph_checks_no_engine_and_serves_torch(exported_run: Path, tmp_path: Path,
                                                                              capsys, monkeypatch):
    """... and the state_dict sees each val image once per precision (the bf16 check's pass is the trust fit's)."""
    paths = RunPaths(copy_run(exported_run, tmp_path / "run"))
    cfg = load_config(None, {"weights": "none", "serve_backend": "torch"})
    images: dict[torch.dtype | None, int] = {None: 0, torch.bfloat16: 0}
    forward = models.forward

    def counted(model, batch, device, dtype, **kw):
        images[dtype] += len(batch)
        return forward(model, batch, device, dtype, **kw)

    monkeypatch.setattr(models, "forward", counted)
    export(cfg, paths)
    meta = meta_of(paths.model)
    assert sum(images.values()) == 2 * meta["serve_precision"]["val_images"] + meta["trust"]["fit_on"]["train_images"]
    reason = "exported with serve_backend torch: no graph written, no engine checked"
    assert f"export: {reason}\n" in capsys.readouterr().out
    assert not (paths.model / files.ONNX).exists()  # the earlier export's graph went with its record
    assert meta_of(paths.model)["backends"] == {"onnx": None, "reason": reason}
    archive(load_config(None, {"weights": "none"}), paths)  # a later archive asking for auto gets torch
    with zipfile.ZipFile(paths.out / "model-store" / "classifier.mar") as mar:
        assert files.ONNX not in mar.namelist()
    assert ImageClassifier(paths.model, CPU).backend["backend"] == "torch"


@pytest.mark.parametrize("backend", engines.ONNX_ENGINES)
def test_each_engine_answers_as_the_state_dict_does(exported_run: Path, state_dict_answers, backend: str):
    reference, ref_abstain = state_dict_answers
    classifier, probs, abstain = answers(exported_run / "model", backend=backend)
    assert classifier.backend["backend"] == backend and classifier.backend["why"] == f"serve_backend {backend}"
    assert torch.equal(probs.argmax(1), reference.argmax(1))
    assert (probs - reference).abs().max() <= 0.01
    assert abstain == ref_abstain


def test_auto_times_the_admitted_engines_and_says_why(exported_run: Path, tmp_path: Path):
    classifier = ImageClassifier(exported_run / "model", CPU)
    why = classifier.backend["why"]
    assert why.startswith("auto: the fastest of "), why
    assert all(name in why for name in (engines.TORCH, *engines.ONNX_ENGINES)), why
    assert classifier.backend["backend"] in why.split(" of ")[1].split(" img/s")[0]
    # int8 is measured only where the export was asked for it: not even named otherwise
    assert engines.OPENVINO_INT8 not in meta_of(exported_run / "model")["backends"] and "int8" not in why
    # An export from before the engines (no record, no graph): torch alone, and the line says why.
    older = Path(shutil.copytree(exported_run / "model", tmp_path / "model"))
    (older / files.ONNX).unlink()
    meta = meta_of(older)
    del meta["backends"]
    (older / "metadata.json").write_text(json.dumps(meta))
    classifier = ImageClassifier(older, CPU)
    assert classifier.backend["backend"] == "torch"
    assert classifier.backend["why"].startswith("auto: torch is the only candidate (onnxruntime: ")


def test_an_engine_that_is_not_installed_is_no_candidate(exported_run: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an absent package looks like to import
    classifier = ImageClassifier(exported_run / "model", CPU)
    assert classifier.backend["backend"] != "openvino"
    assert classifier.backend["why"].endswith("; not candidates: openvino: it did not load (ModuleNotFoundError: "
                                              "import of openvino halted; None in sys.modules)"), classifier.backend



def test_a_broken_or_missing_graph_serves_on_torch_with_one_line(exported_run: Path, tmp_path: Path, caplog):
    model = Path(shutil.copytree(exported_run / "model", tmp_path / "model"))
    (model / files.ONNX).write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="handler.engines"):
        classifier = ImageClassifier(model, CPU, options={"backend": "onnxruntime"})
    assert classifier.backend["backend"] == "torch" and "did not load" in classifier.backend["why"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("serve_backend onnxruntime: it did not load") and line.endswith("serving torch")
    (model / files.ONNX).unlink()
    classifier = ImageClassifier(model, CPU, options={"backend": "openvino"})
    assert classifier.backend["backend"] == "torch" and f"{files.ONNX} is missing" in classifier.backend["why"]


def test_an_arch_that_does_not_export_or_an_engine_that_fails_the_gate_is_not_admitted(
        exported_run: Path, tmp_path: Path, monkeypatch, capsys):
    paths = RunPaths(copy_run(exported_run, tmp_path / "run"))
    meta = meta_of(paths.model)
    state = torch.load(paths.model / "model.pt", weights_only=True)
    val_fp32 = bf16_parity(paths, meta, state)[1].fp32
    capsys.readouterr()  # the bf16 check's own line

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported\nmore")

    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", unsupported)
        record = backends.backends_record(paths, meta, state, val_fp32)
    assert record["onnx"] is None and not (paths.model / files.ONNX).exists()
    (line,) = capsys.readouterr().out.splitlines()
    assert line == ("export: resnet18 does not export to ONNX (RuntimeError: Exporting the operator 'aten::fancy' "
                    "to ONNX opset version 17 is not supported); it serves on torch only")
    for gate in backends.GATES.values():
        monkeypatch.setitem(gate, "min_top1_agreement", 1.1)  # no engine can pass it
    record = backends.backends_record(paths, meta, state, val_fp32)
    assert not any(record[name]["passed"] for name in engines.ONNX_ENGINES)
    assert "not admitted" in capsys.readouterr().out
    assert all(engines.refusal(name, {**meta, "backends": record}, paths.model) for name in engines.ONNX_ENGINES)


def test_the_engines_are_checked_on_an_even_spread_of_a_large_val_split(exported_run: Path, tmp_path: Path,
                                                                         monkeypatch):
    """Past ``ENGINE_CHECK_IMAGES`` val images the engines run an even spread of them, each compared with its own
    row of the state_dict's outputs."""
    paths = RunPaths(copy_run(exported_run, tmp_path / "run"))
    meta = meta_of(paths.model)
    state = torch.load(paths.model / "model.pt", weights_only=True)
    features, logits = (t.clone() for t in bf16_parity(paths, meta, state)[1].fp32)
    n = len(logits)
    assert n >= 3
    monkeypatch.setattr(backends, "ENGINE_CHECK_IMAGES", 2)
    assert backends.evenly_spread(n, 2).tolist() == [0, n - 1] and backends.evenly_spread(2, 5).tolist() == [0, 1]
    logits[1:-1] = -logits[1:-1]  # rows the check must not read: answers no engine gives
    record = backends.backends_record(paths, meta, state, (features, logits))
    assert record["val_images"] == 2
    assert all(record[name]["passed"] for name in engines.ONNX_ENGINES), record


@pytest.fixture(scope="module")
def int8_run(exported_run: Path, tmp_path_factory) -> dict:
    """``exported_run`` exported again with ``serve_precision: int8`` and archived, NNCF's graph admitted (the
    gate opened, since random weights' answers are any): once, for the tests that read it or serve it. The run
    folder, and what the export printed."""
    pytest.importorskip("nncf")
    paths = RunPaths(copy_run(exported_run, tmp_path_factory.mktemp("int8") / "run"))
    cfg = load_config(None, {"weights": "none", "serve_precision": "int8"})
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setitem(backends.GATES["int8"], "min_top1_agreement", 0.0)
        export(cfg, paths)
    archive(cfg, paths)
    return {"run": paths.out, "stdout": printed.getvalue()}


@pytest.mark.e2e  # an export with every check: half a minute
def test_an_export_asked_for_int8_quantizes_the_graph_and_openvino_int8_serves_behind_the_gate(
        int8_run: dict, state_dict_answers, tmp_path: Path, monkeypatch):
    """serve_precision int8: NNCF quantizes model.onnx (OpenVINO's IR, calibrated on training images), the
    export checks it in int8's gate, the archive packs it, and auto measures it beside the others; a graph
    that fails the gate is neither kept nor packed."""
    model = int8_run["run"] / "model"
    assert "openvino-int8 admitted in int8" in int8_run["stdout"], int8_run["stdout"]
    record = meta_of(model)["backends"][engines.OPENVINO_INT8]
    assert record["passed"] and record["precision"] == "int8" and record["calibration_images"] > 0, record
    assert set(record["checked"]) == {"int8"} and 0 <= record["top1_agreement"] <= 1
    with zipfile.ZipFile(int8_run["run"] / "model-store" / "classifier.mar") as mar:
        assert set(files.INT8_GRAPH_FILES) <= set(mar.namelist())
    reference, _ = state_dict_answers
    classifier, probs, _ = answers(model, backend=engines.OPENVINO_INT8)
    assert (classifier.engine.name, classifier.precision) == (engines.OPENVINO_INT8, "int8")
    assert probs.shape == reference.shape and torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-4)
    assert f"{engines.OPENVINO_INT8} int8 " in ImageClassifier(model, CPU).backend["why"]  # auto timed it
    # A person who asks the handler for fp32 gets no int8 engine.
    assert answers(model, backend=engines.OPENVINO_INT8, precision="fp32")[0].backend["backend"] == "torch"
    paths = RunPaths(copy_run(int8_run["run"], tmp_path / "run"))
    monkeypatch.setitem(backends.GATES["int8"], "min_top1_agreement", 1.1)  # no graph can pass it
    meta = meta_of(paths.model)
    state = torch.load(paths.model / "model.pt", weights_only=True)
    record = backends.backends_record(paths, meta, state, bf16_parity(paths, meta, state)[1].fp32, int8=True)
    assert not record[engines.OPENVINO_INT8]["passed"]
    assert record[engines.OPENVINO_INT8]["reason"] == "answers differ from the state_dict's beyond the gate"
    assert not any((paths.model / name).exists() for name in files.INT8_GRAPH_FILES)


@pytest.mark.e2e  # export, evaluate and predict in a process of their own: half a minute
def test_the_jobs_process_never_loads_an_engine_so_its_forked_workers_live(exported_run: Path, tmp_path: Path):
    """Export admits the engines from a process of its own, and predict forks its decoding workers before its
    model loads: ONNX Runtime's and OpenVINO's thread pools do not survive a fork (a whole `jobs run`
    segfaulted in evaluate's DataLoader workers, one run in two, when export had loaded them in-process)."""
    paths = RunPaths(copy_run(exported_run, tmp_path / "run"))
    script = f"""
import sys
from jobs import api
from jobs.predict import predict
api.export(out={str(paths.out)!r}, weights="none")
loaded = [m for m in ("onnxruntime", "openvino") if m in sys.modules]
api.evaluate(out={str(paths.out)!r}, weights="none", num_workers=1)
answers = list(predict({str(paths.model)!r}, [{str(FIXTURE_IMAGES)!r}], decode_threads=2, backend="onnxruntime"))
print("loaded by export:", loaded, "answered:", sum("predictions" in a for a in answers), "of", len(answers))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "admitted in fp32" in done.stdout  # the engines were checked, elsewhere
    photos = len(sorted(FIXTURE_IMAGES.glob("*/*.jpg")))
    assert f"loaded by export: [] answered: {photos} of {photos}" in done.stdout, done.stdout[-2000:]


def test_predict_takes_backend(exported_run: Path):
    proc = run_job("predict", "--model-dir", str(exported_run / "model"), "--backend", "onnxruntime",
                   "--topk", "1", *map(str, PHOTOS[:3]))
    assert "predict: on onnxruntime (fp32): serve_backend onnxruntime" in proc.stderr
    assert len(proc.stdout.splitlines()) == 3 and "3 images classified" in proc.stderr


def test_serve_backend_travels_in_the_archive_and_its_choices_are_the_engines():
    assert SERVE_BACKENDS == engines.BACKENDS
    cfg = load_config(None, {"serve_backend": "openvino"})
    assert model_config(cfg)["handler"]["backend"] == "openvino"


def test_the_serve_image_and_the_tests_install_the_engines_pinned():
    """The serve image installs the `serve` extra, CI the `test` one (scripts/setup.sh): both carry the engines of
    `backends`; the train image and CI also carry what quantizes at export (nncf), which serving never imports."""
    import tomllib
    from conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all("==" in pin for pin in extras["backends"])
    engines_only = {pin for pin in extras["backends"] if not pin.startswith("nncf")}
    assert engines_only <= set(extras["serve"]) and set(extras["backends"]) <= set(extras["test"])
    assert not any(pin.startswith("nncf") for pin in extras["serve"])


def test_the_torchserve_handler_serves_on_the_archives_backend_and_describes_it(exported_run: Path,
                                                                              state_dict_answers):
    from torchserve_fixture import batch_context, handle_batch, handler_context

    from handler.classifier_handler import ClassifierHandler

    ctx = handler_context(exported_run / "model", {"backend": "openvino", "torch_threads": 0})
    handler = ClassifierHandler()
    handler.initialize(ctx)
    (answer,) = handle_batch(handler, ctx, [{"body": bytearray(PHOTOS[0].read_bytes())}])
    reference, _ = state_dict_answers
    assert abs(answer["predictions"][0]["probability"] - float(reference[0].max())) <= 0.01
    (described,) = handler.handle([{"body": b""}], batch_context(ctx, [{"describe": "True"}]))
    assert json.loads(described) == {"arch": "resnet18", "backend": "openvino", "why": "serve_backend openvino",
                                     "precision": handler.classifier.precision}


@pytest.mark.e2e
def test_both_runtimes_serve_one_export_on_onnxruntime_and_on_openvino_int8(int8_run: dict, state_dict_answers,
                                                                           tmp_path: Path):
    """A real TorchServe and the KServe runtime, each serving the int8 export twice: archived with
    ``serve_backend: onnxruntime`` (the state_dict's answers) and with ``openvino-int8`` (the answers that engine
    gives in-process)."""
    import requests
    from torchserve_fixture import archive_as, unused_ports

    from jobs.serve import free_ports, machine_models, start, start_kserve

    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    pytest.importorskip("kserve", reason="the kserve extra is not installed")
    paths = RunPaths(copy_run(int8_run["run"], tmp_path / "run"))
    store = tmp_path / "store"
    cfg = load_config(None, {})
    expected = {"clf": ("onnxruntime", state_dict_answers[0]),
                "clf8": (engines.OPENVINO_INT8, answers(paths.model, backend=engines.OPENVINO_INT8)[1])}
    for name, (backend, _) in expected.items():
        archive_as(cfg, paths, store, name, serve_backend=backend)
    torchserve = start(store, tmp_path / "ts", ports=unused_ports(), models=machine_models(store))
    kserve = start_kserve(store, tmp_path / "ks", port=free_ports(1)[0])
    try:
        torchserve.wait_ready(list(expected), timeout=240)
        kserve.wait_ready(list(expected), timeout=240)
        pinged = requests.get(f"{kserve.inference_url}/ping", timeout=10).json()
        for name, (backend, reference) in expected.items():
            for server in (torchserve, kserve):
                r = requests.post(f"{server.inference_url}/predictions/{name}", data=PHOTOS[0].read_bytes(),
                                  headers={**server.auth(), "Content-Type": "image/jpeg"}, timeout=60)
                top = r.json()["predictions"][0]
                assert top["index"] == int(reference[0].argmax()), (name, server)
                assert abs(top["probability"] - float(reference[0].max())) <= 0.01, (name, server)
            described = requests.get(f"{torchserve.management_url}/models/{name}?customized=true",
                                     headers=torchserve.auth("management"), timeout=30).json()[0]
            assert described["customizedMetadata"]["backend"] == backend  # TorchServe parses the JSON
            assert pinged["models"][name]["backend"] == backend
    finally:
        torchserve.stop()
        kserve.stop()
