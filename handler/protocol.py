"""The request protocol every runtime speaks: request bodies in, answer bodies out.

Accepted request bodies (one image per request unless the envelope carries several):
  * raw image bytes                       curl -T img.jpg / --data-binary @img.jpg
  * multipart form, any field name        curl -F data=@img.jpg [-F topk=3]
  * JSON with base64                      {"data": "<b64>", "topk": 3}  (also "b64", "image", "image_bytes")
  * KServe v1                             {"instances": [{"data": "<b64>"}, ...]}
  * KServe v2 (Open Inference Protocol)   {"inputs": [{"name": "x", "datatype": "BYTES", "data": ["<b64>"]}]}
and the rows TorchServe's own ``service_envelope=kserve|kservev2`` hands over after unwrapping.

Every answer carries, per image, ``predictions`` (the calibrated top-k) and, for a model exported with
them, ``ood_score``, ``abstain`` and ``abstain_reason`` (``handler.trust``). A client that reads only
``predictions`` keeps working.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from handler.preprocess import plain

MAX_IMAGES_PER_REQUEST = 32  # a KServe envelope may carry several images; bound the worker's memory
IMAGE_KEYS = ("data", "body", "b64", "image", "image_bytes", "file")
TOPK_HEADERS = ("x-topk", "topk")
TRUST_FIELDS = ("ood_score", "abstain", "abstain_reason")
V2_DATATYPES = {"ood_score": "FP32", "abstain": "BOOL", "abstain_reason": "BYTES"}


class BadRequest(ValueError):
    """The client's fault: answered with ``status`` and ``{"error": message}`` for that request only."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One HTTP request of a batch, parsed: its images and how to shape the answer."""

    images: list[bytes]
    shape: str = "single"  # single | kserve_v1 | kserve_v2
    topk: Any = None
    request_id: str | None = None
    pixels: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Refused:
    """A request answered with an error status; the rest of its batch is unaffected."""

    status: int
    message: str


def answer_body(req: Request, per_image: list[dict[str, Any]], model_name: str | None = None,
                model_version: str | None = None) -> dict[str, Any]:
    """The answer in the request's own shape. ``per_image``: one dict per image with ``predictions`` and
    the trust fields when the model has them."""
    trust = [k for k in TRUST_FIELDS if per_image and k in per_image[0]]
    if req.shape == "kserve_v1":  # parallel lists beside the unchanged predictions
        return {"predictions": [p["predictions"] for p in per_image], **{k: [p[k] for p in per_image] for k in trust}}
    if req.shape == "kserve_v2":
        n = len(per_image)
        outputs = [{"name": "predictions", "shape": [n], "datatype": "BYTES",
                    "data": [json.dumps(p["predictions"]) for p in per_image]}]
        outputs += [{"name": k, "shape": [n], "datatype": V2_DATATYPES[k],
                     "data": [p[k] if p[k] is not None else "" for p in per_image]} for k in trust]
        return {"id": req.request_id, "model_name": model_name, "model_version": model_version, "outputs": outputs}
    return per_image[0]


def parse_topk(requested: Any, default: int, classes: int) -> int:
    """The request's ``topk`` (a JSON number, a form field's bytes or a header string), capped at ``classes``."""
    if requested is None:
        return min(default, classes)
    value = requested.decode("utf-8", "replace") if isinstance(requested, (bytes, bytearray)) else requested
    k = None
    if isinstance(value, str) and value.strip().isdigit():
        k = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        k = int(value)
    if k is None or k < 1:
        shown = repr(value)[:40] if isinstance(value, (str, int, float)) else f"a JSON {type(value).__name__}"
        raise BadRequest(f"topk must be a positive integer, got {shown}")
    return min(k, classes)


def parse_request(row: Any, headers: dict[str, Any] | None = None) -> Request:
    """One TorchServe request row -> its image bytes, answer shape and requested topk.

    TorchServe hands each request as a dict: ``{"body": bytearray}`` for a raw body, the parsed
    JSON (dict/list) under "body" for application/json, one key per multipart/form field. Under
    ``service_envelope`` the rows are the envelope's instances/inputs instead.
    """
    topk = _header(headers or {}, TOPK_HEADERS)
    if isinstance(row, dict) and not _is_json_request(row):
        if "topk" in row:  # a multipart/form field
            topk = row["topk"]
        row = _payload_field(row)
    req = _parse_body(row)
    if req.topk is None:
        req.topk = topk
    if not req.images:
        raise BadRequest("the request carries no image")
    if len(req.images) > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(f"{len(req.images)} images in one request; send at most {MAX_IMAGES_PER_REQUEST}")
    return req


def _is_json_request(row: dict) -> bool:
    """A row that is itself a JSON request (an envelope's instance or input) rather than TorchServe's form map."""
    return "instances" in row or "inputs" in row or isinstance(row.get("datatype"), str)


def _payload_field(row: dict) -> Any:
    for key in IMAGE_KEYS:
        if key in row:
            return row[key]
    others = [k for k in row if k != "topk"]
    if not others:
        raise BadRequest("empty request: send image bytes, a multipart file or JSON with base64 'data'")
    return row[others[0]]  # a multipart upload under another field name


def _parse_body(body: Any) -> Request:
    if isinstance(body, (bytes, bytearray)):
        if body[:64].lstrip()[:1] in (b"{", b"["):  # JSON TorchServe could not parse (or was not told was JSON)
            return _parse_json(_json_text(bytes(body)))
        return Request([bytes(body)])
    if isinstance(body, str):
        return _parse_json(_json_text(body)) if body.lstrip()[:1] in ("{", "[") else Request([_b64(body, "body")])
    if isinstance(body, (dict, list)):
        return _parse_json(body)
    raise BadRequest(f"unsupported request body of type {type(body).__name__}")


def _json_text(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("body is JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise BadRequest("body is not valid JSON (not UTF-8)") from None
    except ValueError as e:
        raise BadRequest(f"body is not valid JSON ({plain(str(e))})") from None


def _parse_json(doc: Any) -> Request:
    if isinstance(doc, list):
        raise BadRequest('a JSON list is not accepted; send {"instances": [...]} (KServe v1) or {"data": "<base64>"}')
    if not isinstance(doc, dict):
        raise BadRequest("JSON body must be an object")
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise BadRequest("'instances' must be a list")
        return Request([_instance_image(x, f"instances[{i}]") for i, x in enumerate(instances)], "kserve_v1",
                       doc.get("topk"))
    if "inputs" in doc:
        request_id = doc.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise BadRequest("'id' must be a string")
        return Request(_v2_images(doc["inputs"]), "kserve_v2", doc.get("topk"), request_id)
    if isinstance(doc.get("datatype"), str):  # one KServe v2 input, as TorchServe's kservev2 envelope passes it
        return Request(_v2_images([doc]), topk=doc.get("topk"))
    return Request([_instance_image(doc, "body")], topk=doc.get("topk"))


def _instance_image(item: Any, where: str) -> bytes:
    if isinstance(item, str):
        return _b64(item, where)
    if isinstance(item, dict):
        for key in IMAGE_KEYS:
            if key in item:
                return _b64(item[key], f"{where}.{key}")
    raise BadRequest(f"{where} needs a base64 image under one of {', '.join(IMAGE_KEYS)}")


def _v2_images(inputs: Any) -> list[bytes]:
    if not isinstance(inputs, list):
        raise BadRequest("'inputs' must be a list")
    images = []
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or item.get("datatype", "BYTES") != "BYTES":
            raise BadRequest(f"inputs[{i}] must have datatype BYTES with base64 images in 'data'")
        data = item.get("data")
        values = data if isinstance(data, list) else [data]
        images += [_b64(v, f"inputs[{i}].data[{j}]") for j, v in enumerate(values)]
    return images


def _b64(value: Any, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and "b64" in value:  # {"image_bytes": {"b64": ...}} (TF-serving style)
        value = value["b64"]
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string")
    if value.startswith("data:") and "," in value:  # a data: URL
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


def _header(headers: dict[str, Any], names: tuple[str, ...]) -> Any:
    lowered = {str(k).lower(): v for k, v in headers.items() if isinstance(v, (str, bytes))}
    return next((lowered[n] for n in names if n in lowered), None)


def status_phrase(message: str) -> str:
    """The HTTP reason phrase: one printable ASCII line (the JSON body keeps the full message)."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in message)[:200]


def where(n: int, total: int) -> str:
    """The prefix naming image ``n`` of a request's ``total`` in an error message."""
    return f"image {n + 1} of {total}: " if total > 1 else ""
