"""Export-triton: the exported model as a Triton Inference Server model repository (default ``OUT/triton/``).

Four models, one folder each, each with its ``config.pbtxt`` and version ``1/``:
  * ``<name>``: the ensemble clients call. Input ``image`` (TYPE_STRING, one encoded image per row); outputs
    the answers (``handler.triton_backend.answer_outputs``): ``predictions`` (top-k JSON, as KServe V2's),
    ``label``, ``probabilities`` and, for a model exported with them, ``ood_score``, ``abstain``,
    ``abstain_reason``;
  * ``<name>_preprocess`` (Python backend): image bytes -> the model's input tensors;
  * ``<name>_onnx`` (ONNX Runtime backend): ``model/model.onnx``, its tensors' names, types and dims read from
    the graph;
  * ``<name>_postprocess`` (Python backend): features and logits -> the answers.
The two Python steps are ``handler/triton_backend.py``, run from a copy of the serving package beside each
step's ``model.py`` (as the .mar carries it), with ``metadata.json`` and the trust fields' file, so Triton
decodes, calibrates and abstains as TorchServe, KServe and ``jobs predict`` do.

Only an ONNX graph that the export's check admitted for ONNX Runtime (the state_dict's answers on the val
split: ``jobs.backends``) is exported: Triton's onnxruntime backend is the same library. Every model runs
on the CPU (``KIND_CPU``), where that check ran. Triton cannot run here: tests/test_triton.py checks each
config against Triton's ModelConfig schema (tritonclient's ``model_config_pb2``) and runs the ensemble's
steps with a stand-in for ``triton_python_backend_utils``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handler import files
from handler.engines import ONNX_OUTPUTS, ONNXRUNTIME
from handler.triton_backend import IMAGE, answer_outputs
from jobs.archive import MODEL_NAME, serving_package
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_folder, atomic_write_text, link_or_copy, read_run_file
from jobs.versions import FIRST_VERSION

VERSION = "1"  # Triton's versions are whole numbers; the model's own version is the ensemble's parameter
# ONNX element types (onnx.TensorProto) -> Triton's data types, for the types a classifier's graph can carry.
ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
                  "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8",
                  "BOOL": "TYPE_BOOL"}
STEP_MODEL = '''"""Triton loads this file (Python backend): the {role} step of {name}.

Written by `python -m jobs export-triton`; the step itself is handler/triton_backend.py, in the copy of
the serving package beside this file.
"""

import sys
from pathlib import Path

FILES = Path(__file__).resolve().parent
# Triton's stub appends this folder to sys.path; first, so the package copied here is the `handler` imported
# even where another one is installed.
sys.path.insert(0, str(FILES))

from handler.triton_backend import {step}  # noqa: E402


class TritonPythonModel({step}):
    files = FILES
'''


class Enum(str):
    """A protobuf enum value (TYPE_FP32, KIND_CPU): written bare in text format, where a str is quoted."""


def pbtxt(message: dict[str, Any], indent: str = "") -> str:
    """``message`` in protobuf text format: a dict is a message, a list of dicts a repeated message (a map is
    a list of ``{"key", "value"}``), a list of numbers a repeated scalar."""
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            for item in value:
                lines += [f"{indent}{key} {{", pbtxt(item, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: [{', '.join(map(str, value))}]")
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def tensor(name: str, data_type: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": Enum(data_type), "dims": dims}


def parameters(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Model-config parameters: the Python steps read them as ``args["model_config"]["parameters"]``."""
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]


def graph_tensors(onnx_file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of ``onnx_file`` as Triton tensors: names, data types and the dims after the batch
    dimension (a named dimension is -1, variable). The batch dimension must be a named one."""
    try:
        import onnx
    except ImportError:
        raise JobError("export-triton reads model.onnx with the onnx package; install the backends extra "
                       "(pip install -e '.[backends]')") from None
    try:
        graph = onnx.load(str(onnx_file)).graph
    except Exception as e:  # noqa: BLE001 -- protobuf and onnx raise several kinds for one damaged file
        raise JobError(f"{onnx_file} is not a readable ONNX graph ({type(e).__name__}); re-run `python -m jobs "
                       "export`") from None
    weights = {init.name for init in graph.initializer}  # an older exporter listed them as inputs too

    def as_triton(value: Any) -> dict[str, Any]:
        kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        dims = value.type.tensor_type.shape.dim
        if kind not in ONNX_TO_TRITON or not dims or not dims[0].dim_param:
            raise JobError(f"{onnx_file}: tensor {value.name!r} ({kind}, {len(dims)} dims) is not a batch of a "
                           "Triton data type; re-run `python -m jobs export` to write the graph again")
        return tensor(value.name, ONNX_TO_TRITON[kind], [d.dim_value if d.HasField("dim_value") else -1
                                                         for d in dims[1:]])

    return ([as_triton(v) for v in graph.input if v.name not in weights], [as_triton(v) for v in graph.output])


def check_exportable(cfg: Config, paths: RunPaths, meta: dict) -> Path:
    """``model.onnx``, when the export wrote it and its check admitted ONNX Runtime; else one line why and what
    to do."""
    onnx_file = paths.model / files.ONNX
    record = meta.get("backends") or {}
    if not onnx_file.is_file():
        why = record.get("reason") or "no backends record in metadata.json: exported before model.onnx existed"
        raise JobError(f"{onnx_file} not found ({why}); Triton serves the ONNX graph: re-export with an arch that "
                       f"exports to ONNX and serve_backend auto (`python -m jobs export --out {paths.out} "
                       "--serve-backend auto`)")
    admitted = record.get(ONNXRUNTIME) or {}
    if not admitted.get("passed"):
        raise JobError(f"{paths.model / 'metadata.json'}: the export's check did not admit ONNX Runtime on "
                       f"{onnx_file.name} ({admitted.get('reason') or 'not checked'}), so Triton's onnxruntime "
                       f"backend would not answer as the model does; re-run `python -m jobs export --out {paths.out}`")
    if not MODEL_NAME.match(cfg.model_name):
        raise JobError(f"config key 'model_name' must match {MODEL_NAME.pattern} to name Triton's models "
                       f"(got {cfg.model_name!r})")
    return onnx_file


def model_configs(cfg: Config, meta: dict, onnx_file: Path) -> dict[str, dict[str, Any]]:
    """Each model's config, by model (folder) name: the ensemble first, then its steps in order."""
    name = cfg.model_name
    pre, graph, post = f"{name}_preprocess", f"{name}_onnx", f"{name}_postprocess"
    graph_in, graph_out = graph_tensors(onnx_file)
    if len(graph_in) != 1 or [t["name"] for t in graph_out] != list(ONNX_OUTPUTS):
        raise JobError(f"{onnx_file} takes {[t['name'] for t in graph_in]} and gives {[t['name'] for t in graph_out]}"
                       f", not one image batch and {', '.join(ONNX_OUTPUTS)}; re-run `python -m jobs export`")
    (logits,) = (t for t in graph_out if t["name"] == "logits")
    answers = [tensor(n, kind, dims) for n, (kind, dims) in
               answer_outputs(logits["dims"][0], bool(meta.get("trust"))).items()]
    image = tensor(IMAGE, "TYPE_STRING", [1])
    # Every model batches, up to serve_batch_size images; a batch waits max_batch_delay_ms to fill.
    batching = {"max_batch_size": cfg.serve_batch_size}
    queue = {"dynamic_batching": {"max_queue_delay_microseconds": cfg.max_batch_delay_ms * 1000},
             "instance_group": [{"kind": Enum("KIND_CPU"), "count": 1}]}

    def step(model: str, inputs: list[dict], outputs: list[dict]) -> dict[str, Any]:
        """The ensemble's step that runs ``model``: each tensor keeps its name across the ensemble."""
        return {"model_name": model, "model_version": -1,
                "input_map": [{"key": t["name"], "value": t["name"]} for t in inputs],
                "output_map": [{"key": t["name"], "value": t["name"]} for t in outputs]}

    return {
        name: {"name": name, "platform": "ensemble", **batching, "input": [image], "output": answers,
               "ensemble_scheduling": {"step": [step(pre, [image], graph_in), step(graph, graph_in, graph_out),
                                                step(post, graph_out, answers)]},
               "parameters": parameters({"model_version": meta.get("model_version", FIRST_VERSION)})},
        pre: {"name": pre, "backend": "python", **batching, "input": [image], "output": graph_in, **queue,
              "parameters": parameters({"max_image_pixels": cfg.max_image_pixels,
                                        "max_batch_pixels": cfg.max_batch_pixels})},
        graph: {"name": graph, "platform": "onnxruntime_onnx", **batching, "input": graph_in, "output": graph_out,
                **queue},
        post: {"name": post, "backend": "python", **batching, "input": graph_out, "output": answers, **queue,
               "parameters": parameters({"topk": cfg.topk})},
    }


def write_repository(root: Path, configs: dict[str, dict[str, Any]], paths: RunPaths, meta: dict) -> None:
    """Each model's folder under ``root``: its config.pbtxt and version folder with what the model runs."""
    ensemble, pre, graph, post = configs
    for model, config in configs.items():
        atomic_write_text(root / model / "config.pbtxt", pbtxt(config) + "\n")
        (root / model / VERSION).mkdir(parents=True, exist_ok=True)  # the ensemble's stays empty
    link_or_copy(paths.model / files.ONNX, root / graph / VERSION / files.ONNX)
    trust_file = [paths.model / meta["trust"]["file"]] if meta.get("trust") else []
    for model, step, extra in ((pre, "Preprocess", []), (post, "Postprocess", trust_file)):
        folder = root / model / VERSION
        atomic_write_text(folder / "model.py", STEP_MODEL.format(role=step.lower(), name=ensemble, step=step))
        for src in (paths.model / files.METADATA, *extra):
            link_or_copy(src, folder / src.name)
        for src in serving_package():
            link_or_copy(src, folder / "handler" / src.name)


def export_triton(cfg: Config, paths: RunPaths, dest: Path | None = None) -> Path:
    """Write the Triton model repository for ``paths.model`` into ``dest`` (default ``OUT/triton``), replacing
    what was there at once (``jobs.fileio.atomic_folder``); returns ``dest``."""
    metadata = paths.model / files.METADATA
    meta = read_run_file(metadata, f"run `python -m jobs export --out {paths.out}`", ("classes", "preprocess"))
    onnx_file = check_exportable(cfg, paths, meta)
    configs = model_configs(cfg, meta, onnx_file)
    dest = Path(dest) if dest is not None else paths.out / "triton"
    with atomic_folder(dest) as stage:
        write_repository(stage, configs, paths, meta)
    ensemble, *steps = configs
    print(f"export-triton: {dest} (ensemble {ensemble}: {' -> '.join(steps)}; model version "
          f"{meta.get('model_version', FIRST_VERSION)}, max_batch_size {cfg.serve_batch_size}); serve it with "
          f"`tritonserver --model-repository {dest}`")
    return dest
