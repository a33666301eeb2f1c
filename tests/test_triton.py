"""`jobs export-triton` (issue 28, goal 4): the exported model as a Triton Inference Server model repository.

Triton cannot run here. So every config.pbtxt is read with Triton's own schema (tritonclient 2.73.0's
``model_config_pb2.ModelConfig``: an unknown field fails), the ensemble's wiring is checked tensor by tensor,
and the ensemble runs without Triton (tests/triton_ensemble.py): the Python steps' ``model.py`` with a
stand-in for ``triton_python_backend_utils``, the ONNX step in ONNX Runtime. Its answers must be the
classifier's (``handler.service.ImageClassifier`` on ONNX Runtime) on the fixture photos.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_IMAGES, REPO, run_job
from torchserve_fixture import add_trust, export_random_model
from triton_ensemble import read_config, type_name

from handler import engines, files
from handler.model import build_model
from handler.service import ImageClassifier
from jobs import triton
from jobs.archive import serving_package
from jobs.backends import write_onnx
from jobs.config import RunPaths, load_config

onnxruntime = pytest.importorskip("onnxruntime")

CPU = torch.device("cpu")
PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))[:8]
CLASSES = ["ants", "bees", "wasps"]
NAME, TOPK = "insects", 2
STEPS = [f"{NAME}_preprocess", f"{NAME}_onnx", f"{NAME}_postprocess"]


def settings(**keys) -> dict:
    return {"weights": "none", "model_name": NAME, "topk": TOPK, **keys}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A run folder with ``model/`` as `jobs export` leaves it for an arch that exports: seeded random weights of
    the tiny test arch, the trust fields fit on the fixture photos (some abstain), ``model.onnx`` written by the
    export's own writer, and the record the export's check writes when it admits ONNX Runtime."""
    out = tmp_path_factory.mktemp("triton") / "run"
    model_dir = export_random_model(out, CLASSES).model
    add_trust(model_dir, PHOTOS)
    meta = json.loads((model_dir / "metadata.json").read_text())
    write_onnx(build_model(meta, torch.load(model_dir / "model.pt"), CPU), meta["input_size"],
               model_dir / files.ONNX)
    meta["backends"] = {"onnx": files.ONNX, engines.ONNXRUNTIME: {"passed": True, "precision": "fp32"}}
    (model_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    return out


@pytest.fixture(scope="module")
def repository(exported: Path) -> Path:
    return triton.export_triton(load_config(None, settings()), RunPaths(exported))


def private_copy(exported: Path, dest: Path) -> Path:
    """A writable copy of the exported run, without the repository another test wrote into it."""
    return Path(shutil.copytree(exported, dest, ignore=shutil.ignore_patterns("triton")))


def configs(root: Path) -> dict:
    return {folder.name: read_config(folder) for folder in sorted(root.iterdir())}


def test_every_config_is_tritons_model_config_and_the_onnx_step_is_the_graphs(repository: Path, exported: Path):
    assert repository == exported / "triton"
    found = configs(repository)  # read_config: Triton's ModelConfig, where an unknown field fails
    assert sorted(found) == sorted([NAME, *STEPS])
    for folder, config in found.items():
        assert config.name == folder and (repository / folder / "1").is_dir()
        assert config.max_batch_size == 8  # serve_batch_size
    assert found[NAME].platform == "ensemble" and not any((repository / NAME / "1").iterdir())
    onnx_step = found[f"{NAME}_onnx"]
    assert onnx_step.platform == "onnxruntime_onnx"
    assert onnx_step.dynamic_batching.max_queue_delay_microseconds == 20_000  # max_batch_delay_ms
    assert (repository / f"{NAME}_onnx" / "1" / "model.onnx").read_bytes() == \
        (exported / "model" / "model.onnx").read_bytes()
    # The ONNX step's tensors as ONNX Runtime reads them from the graph: names, float, [batch, ...dims].
    session = onnxruntime.InferenceSession(str(exported / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((onnx_step.input, session.get_inputs()), (onnx_step.output, session.get_outputs())):
        assert [(t.name, type_name(t.data_type), list(t.dims)) for t in declared] == \
            [(t.name, "TYPE_FP32", t.shape[1:]) for t in actual]
        assert all(isinstance(t.shape[0], str) for t in actual)  # the batch dimension is the dynamic one
    for step in (f"{NAME}_preprocess", f"{NAME}_postprocess"):
        config, version = found[step], repository / step / "1"
        assert config.backend == "python" and config.dynamic_batching.max_queue_delay_microseconds == 20_000
        assert "class TritonPythonModel(" in (version / "model.py").read_text()
        for src in serving_package():  # the serving package, whole, as the .mar carries it
            assert (version / "handler" / src.name).read_bytes() == src.read_bytes()
        assert (version / "metadata.json").read_bytes() == (exported / "model" / "metadata.json").read_bytes()
    assert (repository / f"{NAME}_postprocess" / "1" / "ood.pt").is_file()
    params = {k: v.string_value for k, v in found[f"{NAME}_postprocess"].parameters.items()}
    assert params == {"topk": str(TOPK)}


def test_the_ensemble_maps_every_tensor_to_one_that_exists_with_its_type_and_dims(repository: Path):
    found = configs(repository)
    ensemble = found[NAME]
    assert [(t.name, type_name(t.data_type), list(t.dims)) for t in ensemble.input] == [("image", "TYPE_STRING", [1])]
    assert [(t.name, type_name(t.data_type), list(t.dims)) for t in ensemble.output] == [
        ("predictions", "TYPE_STRING", [1]), ("label", "TYPE_STRING", [1]), ("probabilities", "TYPE_FP32", [3]),
        ("ood_score", "TYPE_FP32", [1]), ("abstain", "TYPE_BOOL", [1]), ("abstain_reason", "TYPE_STRING", [1])]

    def signature(t) -> tuple:
        return type_name(t.data_type), list(t.dims)

    tensors = {t.name: signature(t) for t in ensemble.input}  # the ensemble's tensors so far, by name
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == STEPS
    for step in ensemble.ensemble_scheduling.step:
        model = found[step.model_name]
        assert model.max_batch_size >= ensemble.max_batch_size
        assert set(step.input_map) == {t.name for t in model.input}  # every input of the model is fed
        for t in model.input:
            assert tensors[step.input_map[t.name]] == signature(t), (step.model_name, t.name)
        assert set(step.output_map) <= {t.name for t in model.output}
        for t in model.output:
            if t.name in step.output_map:
                tensors[step.output_map[t.name]] = signature(t)
    assert all(tensors[t.name] == signature(t) for t in ensemble.output)


def test_the_ensemble_answers_as_the_classifier_does(repository: Path, exported: Path, tmp_path: Path):
    """Two requests of photos and one with a file that is no image, through the ensemble without Triton."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not an image")
    requests = [[str(p) for p in PHOTOS[:5]], [str(broken)], [str(p) for p in PHOTOS[5:]]]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    run = subprocess.run([sys.executable, str(REPO / "tests" / "triton_ensemble.py"), str(repository), NAME,
                          str(tmp_path / "requests.json")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert Path(got["handler"]).is_relative_to(repository)  # the steps ran on the package copied into it
    first, refused, last = got["answers"]
    assert refused["code"] == 3 and "not a decodable image" in refused["error"]  # INVALID_ARG: HTTP 400

    classifier = ImageClassifier(exported / "model", CPU, options={"backend": "onnxruntime", "topk": TOPK})
    assert classifier.backend["backend"] == "onnxruntime"
    outputs = classifier.forward(torch.stack(classifier.decode([p.read_bytes() for p in PHOTOS])))
    expected = classifier.answers(outputs, [TOPK] * len(PHOTOS))
    answers = [{k: v[i] for k, v in a.items()} for a in (first, last) for i in range(len(a["label"]))]
    assert len(answers) == len(PHOTOS)
    assert any(e["abstain"] for e in expected) and not all(e["abstain"] for e in expected)  # both kinds compared
    for answer, want, probs in zip(answers, expected, outputs.probs.tolist()):
        assert answer["probabilities"] == pytest.approx(probs, abs=1e-4)
        predictions = json.loads(answer["predictions"][0])
        assert [p["label"] for p in predictions] == [p["label"] for p in want["predictions"]]
        assert [p["probability"] for p in predictions] == pytest.approx([p["probability"] for p in want["predictions"]],
                                                                        abs=1e-4)
        assert answer["label"] == [want["predictions"][0]["label"]]
        assert answer["ood_score"][0] == pytest.approx(want["ood_score"], abs=1e-4)
        assert answer["abstain"] == [want["abstain"]] and answer["abstain_reason"] == [want["abstain_reason"] or ""]


def test_a_model_without_trust_fields_answers_without_them(exported: Path, tmp_path: Path):
    paths = RunPaths(private_copy(exported, tmp_path / "run"))
    meta = json.loads((paths.model / "metadata.json").read_text())
    del meta["trust"]
    (paths.model / "metadata.json").write_text(json.dumps(meta))
    root = triton.export_triton(load_config(None, settings()), paths, tmp_path / "repo")
    found = configs(root)
    assert [t.name for t in found[NAME].output] == ["predictions", "label", "probabilities"]
    assert [t.name for t in found[f"{NAME}_postprocess"].output] == ["predictions", "label", "probabilities"]
    assert not (root / f"{NAME}_postprocess" / "1" / "ood.pt").exists()


def test_no_admitted_graph_is_one_line_naming_the_file_and_the_fix(exported: Path, tmp_path: Path):
    paths = RunPaths(private_copy(exported, tmp_path / "run"))
    meta = json.loads((paths.model / "metadata.json").read_text())
    meta["backends"] = {engines.ONNXRUNTIME: {"passed": False, "reason": "answers differ"}}
    (paths.model / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(triton.JobError, match=r"did not admit ONNX Runtime on model.onnx \(answers differ\)"):
        triton.export_triton(load_config(None, settings()), paths)
    (paths.model / files.ONNX).unlink()  # as `jobs export --serve-backend torch` leaves it
    meta["backends"] = {"onnx": None, "reason": "exported with serve_backend torch: no graph written"}
    (paths.model / "metadata.json").write_text(json.dumps(meta))
    proc = run_job("export-triton", "--out", str(paths.out), check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{paths.model / 'model.onnx'} not found (exported with serve_backend torch" in proc.stderr
    assert "--serve-backend auto" in proc.stderr
    assert not (paths.out / "triton").exists()


def test_a_failed_export_leaves_the_repository_as_it_was(exported: Path, tmp_path: Path, monkeypatch):
    paths = RunPaths(private_copy(exported, tmp_path / "run"))
    root = triton.export_triton(load_config(None, settings()), paths)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def disk_full() -> list:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton, "serving_package", disk_full)
    with pytest.raises(triton.JobError, match="no space left on the device writing .*triton"):
        triton.export_triton(load_config(None, settings(topk=1)), paths)
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert [p.name for p in paths.out.iterdir() if p.name.startswith(".triton")] == []  # no half-built folder left
    monkeypatch.undo()
    triton.export_triton(load_config(None, settings(topk=1)), paths)  # a second export replaces the first whole
    assert 'string_value: "1"' in (root / f"{NAME}_postprocess" / "config.pbtxt").read_text()
    assert [p.name for p in paths.out.iterdir() if p.name.startswith(".triton")] == []


def test_export_triton_holds_the_run_folders_lock(exported: Path, tmp_path: Path):
    from jobs import api, runlock

    out = private_copy(exported, tmp_path / "run")
    with runlock.hold(out), pytest.raises(runlock.FolderBusy):
        api.export_triton(out, **settings())
    assert not (out / "triton").exists()
