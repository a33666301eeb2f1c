"""Runs a Triton model repository's ensemble as Triton would, without Triton (for tests/test_triton.py).

    python tests/triton_ensemble.py REPOSITORY ENSEMBLE REQUESTS.json  ->  JSON on stdout

REQUESTS.json: a list of requests, each a list of image files. Every config is read with Triton's own
schema (tritonclient's ``model_config_pb2.ModelConfig``; an unknown field fails). The ensemble's steps run in
order, as its ``ensemble_scheduling`` maps the tensors: a Python-backend model is loaded from its ``model.py``
the way Triton's stub loads it (its folders appended to sys.path, ``initialize`` with the model config as
JSON), with tests/triton_python_backend_utils.py as ``triton_python_backend_utils``, and gets all the
requests in one ``execute`` (as under dynamic batching); the ONNX model runs in ONNX Runtime on the requests
concatenated (as the dynamic batcher does). Every tensor that passes between steps must have the data type
and dims that the producing and the consuming model's configs name. A request a step refuses ends there.
A separate process: the models import the serving package copied into the repository, not the source tree's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from google.protobuf import json_format, text_format


def _model_config_pb2() -> Any:
    """tritonclient's ``model_config_pb2`` (Triton's ModelConfig schema), loaded from its file alone: importing
    ``tritonclient.grpc`` would also register Triton's service protos, whose ``inference.*`` names KServe's own
    protos already hold in the process-wide descriptor pool wherever kserve was imported first (as in a test
    worker that ran the KServe tests): "duplicate symbol 'inference.ServerLiveRequest'"."""
    package = importlib.util.find_spec("tritonclient")
    if package is None or not package.submodule_search_locations:
        raise ImportError("tritonclient is not installed (the test extra pins it)")
    path = Path(next(iter(package.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_pb2()
VERSION = "1"


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    """``folder/config.pbtxt`` parsed with Triton's schema; ParseError on any field it does not define."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def type_name(data_type: int) -> str:
    return model_config_pb2.DataType.Name(data_type)


def check(array: np.ndarray, tensor: Any, config: model_config_pb2.ModelConfig, where: str) -> np.ndarray:
    """``array`` as ``tensor`` (an input or output of ``config``) declares it: data type, batch, dims (-1: any)."""
    wanted = pb_utils.triton_string_to_numpy(type_name(tensor.data_type))
    assert array.dtype == np.dtype(wanted), f"{where}: {tensor.name} is {array.dtype}, config says {wanted}"
    shape = list(array.shape)
    assert 1 <= shape[0] <= config.max_batch_size, f"{where}: {tensor.name} batch {shape[0]}"
    dims = list(tensor.dims)
    assert len(shape) - 1 == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape[1:])), \
        f"{where}: {tensor.name} has shape {shape}, config says [batch] + {dims}"
    return array


def load_python_model(folder: Path, config: model_config_pb2.ModelConfig) -> Any:
    """``folder/1/model.py``'s TritonPythonModel, initialized with the args Triton's Python backend passes."""
    version = folder / VERSION
    sys.path += [str(version), str(folder)]  # what Triton's stub appends before it imports model.py
    spec = importlib.util.spec_from_file_location(f"{folder.name}_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_instance_kind": "CPU", "model_instance_name": f"{folder.name}_0",
                      "model_instance_device_id": "0", "model_repository": str(folder), "model_version": VERSION,
                      "model_name": folder.name})
    return model


class Repository:
    def __init__(self, root: Path):
        self.root = root
        self.configs = {p.name: read_config(p) for p in sorted(root.iterdir()) if (p / "config.pbtxt").is_file()}
        self.loaded: dict[str, Any] = {}

    def run(self, name: str, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | dict[str, Any]]:
        """Model ``name`` on ``requests`` (its inputs by name): per request its outputs, or {"error", "code"}."""
        config = self.configs[name]
        for inputs in requests:
            assert set(inputs) == {t.name for t in config.input}, f"{name}: inputs {sorted(inputs)}"
            for t in config.input:
                check(inputs[t.name], t, config, f"into {name}")
        if config.backend == "python":
            results = self._python(name, config, requests)
        elif config.platform == "onnxruntime_onnx":
            results = self._onnx(name, config, requests)
        else:
            raise AssertionError(f"{name}: no step runs platform {config.platform!r} backend {config.backend!r}")
        for result in results:
            if "error" not in result:
                assert set(result) == {t.name for t in config.output}, f"{name}: outputs {sorted(result)}"
                for t in config.output:
                    check(result[t.name], t, config, f"out of {name}")
        return results

    def _python(self, name: str, config: model_config_pb2.ModelConfig,
                requests: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        if name not in self.loaded:
            self.loaded[name] = load_python_model(self.root / name, config)
        wanted = [t.name for t in config.output]
        batch = [pb_utils.InferenceRequest([pb_utils.Tensor(k, v) for k, v in inputs.items()], wanted)
                 for inputs in requests]
        responses = self.loaded[name].execute(batch)
        assert len(responses) == len(batch), f"{name}: {len(responses)} responses to {len(batch)} requests"
        return [{"error": r.error().message(), "code": r.error().code()} if r.has_error() else
                {t.name(): t.as_numpy() for t in r.output_tensors()} for r in responses]

    def _onnx(self, name: str, config: model_config_pb2.ModelConfig,
              requests: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(self.root / name / VERSION / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        sizes = [len(next(iter(inputs.values()))) for inputs in requests]
        assert sum(sizes) <= config.max_batch_size, "the dynamic batcher never exceeds max_batch_size"
        joined = {t.name: np.concatenate([inputs[t.name] for inputs in requests]) for t in config.input}
        outputs = dict(zip([t.name for t in config.output], session.run([t.name for t in config.output], joined)))
        bounds = np.cumsum([0, *sizes])
        return [{k: v[a:b] for k, v in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]

    def run_ensemble(self, name: str, requests: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        """The ensemble's steps in order, each on the requests still standing; per request its outputs or error."""
        config = self.configs[name]
        assert config.platform == "ensemble"
        tensors: list[dict[str, Any]] = [dict(inputs) for inputs in requests]
        for inputs, t in ((inputs, t) for inputs in requests for t in config.input):
            check(inputs[t.name], t, config, f"into {name}")
        for step in config.ensemble_scheduling.step:
            standing = [i for i, t in enumerate(tensors) if "error" not in t]
            results = self.run(step.model_name, [{model_input: tensors[i][ensemble_tensor]
                                                  for model_input, ensemble_tensor in step.input_map.items()}
                                                 for i in standing])
            for i, result in zip(standing, results):
                if "error" in result:
                    tensors[i] = result
                else:
                    tensors[i].update({step.output_map[k]: v for k, v in result.items()})
        answers = []
        for t in tensors:
            if "error" not in t:
                t = {o.name: check(t[o.name], o, config, f"out of {name}") for o in config.output}
            answers.append(t)
        return answers


def as_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [as_json(v) for v in value]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(root: str, ensemble: str, requests_file: str) -> None:
    repository = Repository(Path(root))
    (image,) = (t.name for t in repository.configs[ensemble].input)
    requests = [{image: np.array([[Path(f).read_bytes()] for f in files], dtype=np.object_)}
                for files in json.loads(Path(requests_file).read_text())]
    answers = repository.run_ensemble(ensemble, requests)
    handler = sys.modules["handler"].__file__  # where the steps' serving package came from
    print(json.dumps({"handler": handler, "answers": [{k: as_json(v) for k, v in a.items()} for a in answers]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
