"""TorchServe handler for the exported classifier: one forward pass per batch, errors per request.

``jobs archive`` packs this file into the .mar next to ``model.pt`` (a bare state_dict),
``metadata.json`` and ``presets.py``. Everything the handler needs -- architecture, class
count, labels, preprocessing -- comes from ``metadata.json``, so this one file serves any
torchvision classifier the job trains, with any number of classes.

Accepted request bodies (one image per request unless the envelope carries several):
  * raw image bytes                       curl -T img.jpg / --data-binary @img.jpg
  * multipart form, any field name        curl -F data=@img.jpg [-F topk=3]
  * JSON with base64                      {"data": "<b64>", "topk": 3}  (also "b64", "image", "image_bytes")
  * KServe v1                             {"instances": [{"data": "<b64>"}, ...]}
  * KServe v2                             {"inputs": [{"name": "x", "datatype": "BYTES", "data": ["<b64>"]}]}
and the rows TorchServe's own ``service_envelope=kserve|kservev2`` hands over after unwrapping.

``topk`` per request: a JSON or multipart field ``topk``, or the header ``X-TopK``. A ``?topk=N``
query parameter cannot work: TorchServe 0.12's inference frontend drops the query string before
the request reaches the worker (verified against the real server; only the body, multipart/form
fields and headers arrive).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import models
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the .mar: TorchServe puts the extracted model folder on sys.path
    import presets
except ImportError:  # from the repository (tests, bench)
    from jobs import presets

logger = logging.getLogger(__name__)

DEFAULT_TOPK = 5
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default
MAX_ASPECT_RATIO = 16  # beyond this, Resize(short side) would blow a thin strip up into a huge tensor
MAX_IMAGES_PER_REQUEST = 32  # a KServe envelope may carry several images; bound the worker's memory
FORWARD_CHUNK = 64  # images per forward pass when envelopes make a batch bigger than usual
IMAGE_KEYS = ("data", "body", "b64", "image", "image_bytes", "file")
TOPK_HEADERS = ("x-topk", "topk")


class BadRequest(ValueError):
    """The client's fault: answered with HTTP 400 and ``{"error": message}`` for that request only."""


@dataclass
class Request:
    """One HTTP request of the batch, parsed: its images and how to shape the answer."""

    images: list[bytes]
    shape: str = "single"  # single | kserve_v1 | kserve_v2
    topk: Any = None
    request_id: str | None = None
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Refused:
    """A request answered with an error status; the rest of its batch is unaffected."""

    status: int
    message: str


class ResNetHandler(BaseHandler):
    """Rebuilds ``metadata.json["arch"]`` with ``num_classes`` classes and loads ``model.pt``."""

    def initialize(self, context: Any) -> None:
        # BaseHandler.initialize would torch.jit.load model.pt; ours is a bare state_dict.
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = context.manifest
        self.meta = json.loads((model_dir / "metadata.json").read_text())
        options = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        self.classes: list[str] = list(self.meta["classes"])
        self.default_topk = int(options.get("topk") or self.meta.get("topk") or DEFAULT_TOPK)
        self.max_image_pixels = int(options.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)
        self.resize_size = int(self.meta["preprocess"]["resize_size"])
        self.transform = presets.eval_transform(**self.meta["preprocess"])
        self.device = _device(props.get("gpu_id"))
        threads = _torch_threads(options.get("torch_threads", "auto"), context.model_yaml_config, self.device)
        if threads:
            torch.set_num_threads(threads)
        self.amp_dtype = _amp_dtype(self.device, str(options.get("precision", "auto")))
        self.model = self._load_model(model_dir / self.manifest["model"]["serializedFile"])
        Image.init()  # register every Pillow format now, not during the first request
        self._forward(torch.zeros(1, *self.meta["input_size"]))  # warm up kernels before the first request
        self.initialized = True
        logger.info("loaded %s with %d classes on %s (amp %s)", self.meta["arch"], len(self.classes),
                    self.device, self.amp_dtype)

    def _load_model(self, weights: Path) -> torch.nn.Module:
        model = models.get_model(self.meta["arch"], weights=None, num_classes=self.meta["num_classes"])
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return model.to(self.device, memory_format=torch.channels_last).eval()

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        start = time.perf_counter()
        self.context = context
        requests = [self._prepare(i, row) for i, row in enumerate(data)]
        tensors = [t for r in requests if isinstance(r, Request) for t in r.tensors]
        probs = self._forward(torch.stack(tensors)) if tensors else torch.empty(0)
        out, offset = [], 0
        for i, r in enumerate(requests):
            context.set_response_content_type(i, "application/json")
            if isinstance(r, Refused):
                context.set_response_status(r.status, _status_phrase(r.message), idx=i)
                out.append({"error": r.message})
                continue
            out.append(self._answer(r, probs[offset:offset + len(r.tensors)]))
            offset += len(r.tensors)
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return out

    def _prepare(self, idx: int, row: Any) -> Request | Refused:
        """Parse and preprocess one request; a problem becomes its error message, never an exception."""
        try:
            req = parse_request(row, _request_headers(self.context, idx))
            req.topk = self._topk(req.topk)
            req.request_id = req.request_id or _request_id(self.context, idx)
            req.tensors = [self._preprocess_image(b, n, len(req.images)) for n, b in enumerate(req.images)]
            return req
        except BadRequest as e:
            logger.warning("request %s refused: %s", _request_id(self.context, idx), e)
            return Refused(400, str(e))
        except Exception:  # a bug or resource failure on one request must not fail the whole batch
            logger.exception("request %s failed in preprocessing", _request_id(self.context, idx))
            return Refused(500, "internal error while preprocessing this request; see the server's model_log.log")

    def _preprocess_image(self, data: bytes, n: int, total: int) -> torch.Tensor:
        where = f"image {n + 1} of {total}: " if total > 1 else ""
        try:
            with warnings.catch_warnings():
                # Pillow's bomb check runs at open time, before any pixel is decoded. Between
                # MAX_IMAGE_PIXELS and twice that it only warns; here that is a refusal too.
                Image.MAX_IMAGE_PIXELS = self.max_image_pixels
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = presets.decode_rgb(data, self.resize_size)
        except Image.DecompressionBombWarning:
            raise BadRequest(f"{where}image too large (more than {self.max_image_pixels} pixels)") from None
        except ValueError as e:
            raise BadRequest(f"{where}{e}") from None
        h, w = img.shape[-2:]
        if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
            raise BadRequest(f"{where}aspect ratio of {w}x{h} is beyond {MAX_ASPECT_RATIO}:1")
        return self.transform(img)

    def _topk(self, requested: Any) -> int:
        if requested is None:
            k = self.default_topk
        else:
            try:
                k = int(requested.decode() if isinstance(requested, (bytes, bytearray)) else requested)
            except (TypeError, ValueError, UnicodeDecodeError):
                raise BadRequest(f"topk must be a positive integer, got {str(requested)[:40]!r}") from None
            if k < 1:
                raise BadRequest(f"topk must be a positive integer, got {k}")
        return min(k, len(self.classes))

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (n, classes) as fp32 on the CPU; one forward pass per chunk."""
        chunks = []
        for part in batch.split(FORWARD_CHUNK):
            x = part.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.model(x)
            chunks.append(torch.softmax(logits.float(), dim=1).cpu())
        return torch.cat(chunks)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _predictions(self, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        top = torch.topk(probs, k)
        return [{"label": self.classes[i], "index": i, "probability": p}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]

    def _answer(self, req: Request, probs: torch.Tensor) -> dict[str, Any]:
        per_image = [self._predictions(p, req.topk) for p in probs]
        if req.shape == "kserve_v1":
            return {"predictions": per_image}
        if req.shape == "kserve_v2":
            model = self.manifest.get("model", {})
            return {"id": req.request_id, "model_name": model.get("modelName"),
                    "model_version": model.get("modelVersion"),
                    "outputs": [{"name": "predictions", "shape": [len(per_image)], "datatype": "BYTES",
                                 "data": [json.dumps(p) for p in per_image]}]}
        return {"predictions": per_image[0]}


_service = ResNetHandler()


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point. A module-level ``handle`` is needed because TorchServe refuses a
    handler module that defines more than one class; it calls ``handle(None, context)`` once to load."""
    if not _service.initialized:
        _service.initialize(context)
    return None if data is None else _service.handle(data, context)


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
        if body[:64].lstrip()[:1] == b"{":
            try:
                return _parse_json(json.loads(body))
            except (ValueError, UnicodeDecodeError):
                pass  # not JSON after all: let the image decoder say what it is
        return Request([bytes(body)])
    if isinstance(body, str):
        return _parse_json(_json_text(body)) if body.lstrip().startswith("{") else Request([_b64(body, "body")])
    if isinstance(body, dict):
        return _parse_json(body)
    if isinstance(body, list):
        raise BadRequest('a JSON list is not accepted; send {"instances": [...]} (KServe v1) or {"data": "<base64>"}')
    raise BadRequest(f"unsupported request body of type {type(body).__name__}")


def _json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadRequest(f"body is not valid JSON ({e})") from None


def _parse_json(doc: Any) -> Request:
    if not isinstance(doc, dict):
        raise BadRequest("JSON body must be an object")
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise BadRequest("'instances' must be a list")
        return Request([_instance_image(x, f"instances[{i}]") for i, x in enumerate(instances)], "kserve_v1",
                       doc.get("topk"))
    if "inputs" in doc:
        return Request(_v2_images(doc["inputs"]), "kserve_v2", doc.get("topk"), doc.get("id"))
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


def _request_headers(context: Any, idx: int) -> dict[str, Any]:
    try:
        return context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, TypeError):
        return {}


def _request_id(context: Any, idx: int) -> str:
    return str(context.get_request_id(idx)) if hasattr(context, "get_request_id") else str(idx)


def _status_phrase(message: str) -> str:
    """The HTTP reason phrase: one printable ASCII line (the JSON body keeps the full message)."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in message)[:200]


def _torch_threads(option: Any, model_config: dict | None, device: torch.device) -> int:
    """Intra-op threads for a CPU worker; 0 keeps torch's default (one per core).

    "auto" leaves one core to the TorchServe frontend and spreads the rest over the model's workers:
    with every core in the forward pass, the threads stall on each other's barriers whenever the frontend
    or another worker takes a core (bench/serve.py measured 1 thread beating 2 by ~1.6x on 2 cores).
    """
    if option != "auto":
        return max(0, int(option))
    if device.type != "cpu":
        return 0
    workers = int((model_config or {}).get("maxWorkers") or 1)
    return max(1, (len(os.sched_getaffinity(0)) - 1) // max(1, workers))


def _device(gpu_id: Any) -> torch.device:
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Autocast on the GPU only: on the CPU fp32 keeps answers identical to ``jobs predict``."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
