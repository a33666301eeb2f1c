"""The two Python steps of the Triton model repository that ``jobs export-triton`` writes, around its ONNX model:
``Preprocess`` (encoded images -> the model's input tensors) and ``Postprocess`` (its features and logits -> the
answers: calibrated probabilities, the top class, the top-k predictions and the trust fields).

Each runs in Triton's Python backend from the copy of this package that the export puts beside the step's
``model.py``, with the model's ``metadata.json`` (and, for ``Postprocess``, the trust fields' file). They call
the same ``ImageDecoder`` and ``ModelAnswers`` as TorchServe, KServe and ``jobs predict`` (``handler.service``),
so Triton decodes, calibrates and abstains as they do. ``triton_python_backend_utils`` exists only inside
Triton's Python backend: it is imported when Triton loads a step, never with this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from handler import files
from handler.engines import ONNX_OUTPUTS
from handler.protocol import TRUST_FIELDS, V2_DATATYPES, BadRequest
from handler.service import ImageDecoder, ModelAnswers

IMAGE = "image"  # the ensemble's input: one encoded image (JPEG, PNG, ...) per batch row
# The ensemble's outputs beside the trust fields, per image: name -> (Triton data type, dims).
# predictions is KServe V2's output of the same name (the top-k as one JSON list); probabilities has one
# column per class, in metadata.json's order.
ANSWER_OUTPUTS = {"predictions": "TYPE_STRING", "label": "TYPE_STRING", "probabilities": "TYPE_FP32"}


def triton_type(v2_datatype: str) -> str:
    """Triton's model-config data type of an Open Inference Protocol V2 datatype (BYTES -> TYPE_STRING)."""
    return "TYPE_STRING" if v2_datatype == "BYTES" else f"TYPE_{v2_datatype}"


def answer_outputs(classes: int, trust: bool) -> dict[str, tuple[str, list[int]]]:
    """The answers as named tensors: name -> (Triton data type, dims of one image's row). The trust fields
    only for a model exported with them, as in KServe V2's answer (``handler.protocol.answer_body``)."""
    outputs = {name: (kind, [classes] if name == "probabilities" else [1]) for name, kind in ANSWER_OUTPUTS.items()}
    if trust:
        outputs.update({name: (triton_type(V2_DATATYPES[name]), [1]) for name in TRUST_FIELDS})
    return outputs


class Step:
    """What both steps share: Triton's model config and parameters, the module ``triton_python_backend_utils``,
    and responses in the data types the config names. ``files``: the folder with ``metadata.json``, set by the
    step's ``model.py`` (its own folder)."""

    files: ClassVar[Path]

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils  # only inside Triton's Python backend (or a test's stand-in for it)

        self.pb = triton_python_backend_utils
        self.config: dict[str, Any] = json.loads(args["model_config"])
        # The export's settings for this step, as model-config parameters (string values).
        self.options = {key: value["string_value"] for key, value in self.config.get("parameters", {}).items()}

    def finalize(self) -> None:
        """Nothing to release: the decoder and the answers are plain Python objects."""

    def respond(self, arrays: dict[str, np.ndarray]) -> Any:
        """An inference response with ``arrays`` as the output tensors, each in the data type its config names."""
        tensors = []
        for name, array in arrays.items():
            kind = self.pb.triton_string_to_numpy(self.pb.get_output_config_by_name(self.config, name)["data_type"])
            tensors.append(self.pb.Tensor(name, np.asarray(array).astype(kind, copy=False)))
        return self.pb.InferenceResponse(output_tensors=tensors)

    def refuse(self, error: BadRequest) -> Any:
        """The request's error response: its image is at fault, so INVALID_ARG (HTTP 400); the rest of the batch
        is answered."""
        return self.pb.InferenceResponse(output_tensors=[],
                                         error=self.pb.TritonError(str(error), self.pb.TritonError.INVALID_ARG))


class Preprocess(Step):
    """Encoded images (``IMAGE``, TYPE_STRING) -> the model's input tensors: admitted by their headers against the
    pixel limits, decoded and transformed as training did (``handler.service.ImageDecoder``)."""

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        meta = json.loads((self.files / files.METADATA).read_text())
        self.decoder = ImageDecoder(meta["preprocess"], self.options)
        (self.output,) = (output["name"] for output in self.config["output"])  # the ONNX model's input

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:  # one Python list of requests per dynamic batch: each answered on its own
            images = [bytes(row) for row in self.pb.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)]
            try:
                self.decoder.admit(images)
                batch = torch.stack(self.decoder.decode(images))
            except BadRequest as e:
                responses.append(self.refuse(e))
                continue
            responses.append(self.respond({self.output: batch.numpy()}))
        return responses


class Postprocess(Step):
    """The ONNX model's ``features`` and ``logits`` -> ``answer_outputs``: calibrated (the export's temperature),
    with the out-of-distribution score and the abstain decision (``handler.service.ModelAnswers``)."""

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        self.answers = ModelAnswers(self.files, self.options)
        self.topk = self.answers.topk(None)  # the export's topk, capped at the number of classes

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            features, logits = (torch.from_numpy(self.pb.get_input_tensor_by_name(request, name).as_numpy())
                                for name in ONNX_OUTPUTS)
            outputs = self.answers.outputs(features, logits)
            per_image = self.answers.answers(outputs, [self.topk] * len(logits))
            responses.append(self.respond(self.columns(outputs.probs, per_image)))
        return responses

    def columns(self, probs: torch.Tensor, per_image: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """One row per image of each output; strings as UTF-8 bytes, no abstain reason as b"" (as in KServe V2)."""

        def strings(values: list[str | None]) -> np.ndarray:
            return np.array([[(value or "").encode()] for value in values], dtype=np.object_)

        arrays = {"predictions": strings([json.dumps(answer["predictions"]) for answer in per_image]),
                  "label": strings([answer["predictions"][0]["label"] for answer in per_image]),
                  "probabilities": probs.numpy()}
        for name in TRUST_FIELDS if self.answers.trust is not None else ():
            values = [answer[name] for answer in per_image]
            arrays[name] = strings(values) if V2_DATATYPES[name] == "BYTES" else np.array([[v] for v in values])
        return arrays
