"""A stand-in for Triton's ``triton_python_backend_utils``, which exists only inside Triton's Python backend.

The subset of its documented API that a Python model calls (python_backend's README and
``src/resources/triton_python_backend_utils.py``): ``Tensor``, ``InferenceRequest``, ``InferenceResponse``,
``TritonError`` with its codes, ``TritonModelException``, ``get_input_tensor_by_name``,
``get_input_config_by_name``, ``get_output_config_by_name`` and ``triton_string_to_numpy``. Written here,
not copied; each does what the real one does for the calls made, and refuses what the real one refuses
(a numpy ``str_`` tensor, an output list that is not a list). tests/triton_ensemble.py runs models with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


class TritonModelException(Exception):
    """What the real module raises for a call it cannot serve."""


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, numpy_array: np.ndarray):
        if not isinstance(numpy_array, np.ndarray) or numpy_array.dtype.type == np.str_:
            raise TritonModelException("Tensor takes a numpy array; strings as np.object_ (bytes), never np.str_")
        self._name, self._array = name, numpy_array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceRequest:
    def __init__(self, inputs: list[Tensor], requested_output_names: list[str], request_id: str = ""):
        self._inputs, self._requested, self._id = inputs, requested_output_names, request_id

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def request_id(self) -> str:
        return self._id


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None):
        if output_tensors is not None and not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        self._outputs, self._error = output_tensors or [], error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("input", []) if t["name"] == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("output", []) if t["name"] == name), None)


def triton_string_to_numpy(triton_type: str) -> Any:
    return TRITON_STRING_TO_NUMPY[triton_type]
