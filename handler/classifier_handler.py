"""TorchServe handler for any torchvision classifier the job exports: batched, errors per request.

``jobs archive`` packs this file into the .mar next to ``model.pt`` (a bare state_dict),
``metadata.json``, ``contract.py`` and ``presets.py``. The model, its preprocessing, precision and
top-k come from ``contract.py`` (shared with ``jobs predict``), which reads ``metadata.json``, so
this one file serves any architecture with any number of classes.

Accepted request bodies (one image per request unless the envelope carries several):
  * raw image bytes                       curl -T img.jpg / --data-binary @img.jpg
  * multipart form, any field name        curl -F data=@img.jpg [-F topk=3]
  * JSON with base64                      {"data": "<b64>", "topk": 3}  (also "b64", "image", "image_bytes")
  * KServe v1                             {"instances": [{"data": "<b64>"}, ...]}
  * KServe v2                             {"inputs": [{"name": "x", "datatype": "BYTES", "data": ["<b64>"]}]}
and the rows TorchServe's own ``service_envelope=kserve|kservev2`` hands over after unwrapping.
A raw body must not be sent as ``application/x-www-form-urlencoded`` (curl -d's default): TorchServe's
frontend tries to parse it as a form and answers 500 before the handler sees it. Use ``-T``,
``--data-binary`` with ``-H "Content-Type: image/jpeg"``, or a multipart upload.

``topk`` per request: a JSON or multipart field ``topk``, or the header ``X-TopK``. A ``?topk=N``
query parameter cannot work: TorchServe 0.12's inference frontend drops the query string before
the request reaches the worker (verified against the real server; only the body, multipart/form
fields and headers arrive).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the .mar: TorchServe puts the extracted model folder on sys.path
    import contract
    import presets
except ImportError:  # from the repository (tests, bench)
    from jobs import contract, presets

logger = logging.getLogger(__name__)

DEFAULT_TOPK = 5
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default
# Pixels decoded per batch: bounds a batch's decode time far below responseTimeout on a slow CPU.
DEFAULT_MAX_BATCH_PIXELS = 200_000_000
MAX_ASPECT_RATIO = 16  # beyond this, Resize(short side) would blow a thin strip up into a huge tensor
MAX_IMAGES_PER_REQUEST = 32  # a KServe envelope may carry several images; bound the worker's memory
IMAGE_KEYS = ("data", "body", "b64", "image", "image_bytes", "file")
TOPK_HEADERS = ("x-topk", "topk")
INTERNAL_ERROR = "internal error; the traceback is in the server's model_log.log"


class BadRequest(ValueError):
    """The client's fault: answered with ``status`` and ``{"error": message}`` for that request only."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One HTTP request of the batch, parsed: its images and how to shape the answer."""

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


@dataclass
class Batch:
    """What TorchServe handed over, as it moves through preprocess -> inference -> postprocess."""

    requests: list[Request | Refused]
    inputs: torch.Tensor
    probs: torch.Tensor | None = None


class BusyBoard:
    """Which workers of one model are running a batch right now, across their processes.

    One small file per model folder in the temp directory, shared by the model's workers: each worker
    claims a slot for its life (an fcntl lock on byte ``SLOTS + i``) and holds a lock on byte ``i``
    while it runs a batch. A dead worker's locks vanish with it. A worker handed a lone image uses
    the idle cores only when no other worker is busy, so two lone images never oversubscribe them.
    """

    SLOTS = 64

    def __init__(self, model_dir: Path):
        key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
        try:
            self.fd = os.open(Path(tempfile.gettempdir()) / f".busy-{key}", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:  # no writable temp dir: every batch keeps to the worker's share
            logger.warning("no busy board (%s): lone images run on the worker's share of the cores", e.strerror)
            self.fd, self.slot = None, None
            return
        self.slot = next((i for i in range(self.SLOTS) if self._try_lock(self.SLOTS + i)), None)

    def _try_lock(self, byte: int) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            return True
        except OSError:
            return False

    def others_busy(self) -> bool:
        """True when another worker of this model is running a batch (or none could be told apart)."""
        if self.slot is None:
            return True
        return any(i != self.slot and not self._is_free(self.SLOTS + i) and not self._is_free(i)
                   for i in range(self.SLOTS))

    def _is_free(self, byte: int) -> bool:
        """No other process holds ``byte`` (fcntl locks are per process: this one's own never conflict)."""
        if not self._try_lock(byte):
            return False
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte)
        return True

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        if self.slot is None:
            yield
            return
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.slot)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.slot)


class TorchvisionClassifierHandler(BaseHandler):
    """Serves ``metadata.json["arch"]`` (any torchvision classifier) with ``model.pt``'s weights."""

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
        self.max_batch_pixels = int(options.get("max_batch_pixels") or DEFAULT_MAX_BATCH_PIXELS)
        # Pillow's own bomb check is the backstop for formats whose size only Pillow can read: it
        # raises at twice this, and our header check refuses everything above it first.
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        Image.init()  # register every Pillow format now, not during the first request
        self.preprocessor = contract.Preprocessor(self.meta)
        self.device = _device(props.get("gpu_id"))
        # 0 threads: leave torch's own number. On the CPU a batch of one image gets solo_threads, a
        # bigger one threads (contract.serving_plan); inference switches between them.
        self.threads, self.solo_threads = _torch_threads(options.get("torch_threads", "auto"), self.device)
        on_cpu = self.device.type == "cpu"
        if self.threads and on_cpu:
            torch.set_num_threads(self.threads)
        self.board = BusyBoard(model_dir) if on_cpu and self.solo_threads > self.threads else None
        # Decoding releases the GIL: a worker with several threads decodes its requests side by side.
        self.decoders = ThreadPoolExecutor(self.threads, thread_name_prefix="decode") if self.threads > 1 else None
        self.model, self.amp_dtype, self.precision = contract.load_serving_model(
            self.meta, model_dir, model_dir / self.manifest["model"]["serializedFile"], self.device,
            str(options.get("precision", "auto")))
        self.inference(Batch([], torch.zeros(1, *self.meta["input_size"])))  # warm up kernels before the first request
        self.initialized = True
        logger.info("loaded %s with %d classes on %s (%s, %d torch threads)", self.meta["arch"], len(self.classes),
                    self.device, self.precision, torch.get_num_threads())

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """preprocess -> inference -> postprocess, with per-request errors and per-stage time metrics."""
        start = time.perf_counter()
        self.context = context
        try:
            batch = self.preprocess(data)
            decoded = time.perf_counter()
            self.inference(batch)
            forwarded = time.perf_counter()
            out = self.postprocess(batch)
        except Exception:  # a bug or a resource failure: the batch fails, the worker lives on
            logger.exception("batch of %d requests failed", len(data))
            return [self._reply(i, Refused(500, INTERNAL_ERROR)) for i in range(len(data))]
        metrics = context.metrics
        metrics.add_time("PreprocessTime", round((decoded - start) * 1000, 2), None, "ms")
        metrics.add_time("ForwardTime", round((forwarded - decoded) * 1000, 2), None, "ms")
        metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return out

    def preprocess(self, data: list[Any]) -> Batch:
        """Parse every request, admit them within the batch's pixel budget, then decode the admitted ones."""
        requests = [self._parse(i, row) for i, row in enumerate(data)]
        budget = self.max_batch_pixels
        for i, r in enumerate(requests):
            if isinstance(r, Request):
                if r.pixels > budget:  # only when earlier requests of this batch used part of it
                    used = self.max_batch_pixels - budget
                    requests[i] = Refused(503, f"server busy: this batch already decodes {used} pixels; retry")
                else:
                    budget -= r.pixels
        work = [(i, r) for i, r in enumerate(requests) if isinstance(r, Request)]
        # One image decodes in this thread: a hand-off to the pool costs a lone request more than it saves.
        run = self.decoders.map if self.decoders and len(work) > 1 else map
        for (i, _), decoded in zip(work, run(lambda job: self._decode(*job), work), strict=True):
            requests[i] = decoded
        tensors = [t for r in requests if isinstance(r, Request) for t in r.tensors]
        return Batch(requests, torch.stack(tensors) if tensors else torch.empty(0))

    def inference(self, batch: Batch) -> Batch:
        if self.board is None:
            batch.probs = contract.probabilities(self.model, batch.inputs, self.device, self.amp_dtype)
            return batch
        with self.board.busy():
            alone = len(batch.inputs) == 1 and not self.board.others_busy()
            threads = self.solo_threads if alone else self.threads
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            batch.probs = contract.probabilities(self.model, batch.inputs, self.device, self.amp_dtype)
        return batch

    def postprocess(self, batch: Batch) -> list[Any]:
        out, offset = [], 0
        for i, r in enumerate(batch.requests):
            if isinstance(r, Request):
                n = len(r.tensors)
                r = self._answer(r, contract.top_k(batch.probs[offset:offset + n], r.topk, self.classes))
                offset += n
            out.append(self._reply(i, r))
        return out

    def _reply(self, idx: int, answer: dict | Refused) -> dict:
        self.context.set_response_content_type(idx, "application/json")
        if isinstance(answer, Refused):
            self.context.set_response_status(answer.status, _status_phrase(answer.message), idx=idx)
            return {"error": answer.message}
        return answer

    def _parse(self, idx: int, row: Any) -> Request | Refused:
        """Parse one request and size its images from their headers; a problem becomes its answer."""
        try:
            req = parse_request(row, _request_headers(self.context, idx))
            req.topk = self._topk(req.topk)
            req.request_id = req.request_id or _request_id(self.context, idx)
            req.pixels = sum(self._pixels(b, _where(n, len(req.images))) for n, b in enumerate(req.images))
            if req.pixels > self.max_batch_pixels:
                raise BadRequest(f"the request's images decode to {req.pixels} pixels; the limit per request is "
                                 f"{self.max_batch_pixels} (max_batch_pixels)", 413)
            return req
        except BadRequest as e:
            return self._refuse(idx, e)
        except Exception:  # a bug on one request must not fail the whole batch
            logger.exception("request %s failed while parsing", _request_id(self.context, idx))
            return Refused(500, INTERNAL_ERROR)

    def _decode(self, idx: int, req: Request) -> Request | Refused:
        try:
            for n, data in enumerate(req.images):
                try:
                    req.tensors.append(self.preprocessor(data))
                except ValueError as e:
                    raise BadRequest(f"{_where(n, len(req.images))}{e}") from None
            return req
        except BadRequest as e:
            return self._refuse(idx, e)
        except Exception:
            logger.exception("request %s failed in preprocessing", req.request_id)
            return Refused(500, INTERNAL_ERROR)

    def _refuse(self, idx: int, e: BadRequest) -> Refused:
        logger.warning("request %s refused (%d): %s", _request_id(self.context, idx), e.status, e)
        return Refused(e.status, str(e))

    def _pixels(self, data: bytes, where: str) -> int:
        """Pixels this image will decode to, from its header alone; refuses bombs and thin strips."""
        if not data:
            raise BadRequest(f"{where}empty body (0 bytes)")
        header = contract.image_header(data)
        if header is not None:
            size = header[1]
            decoded = self.preprocessor.decoded_pixels(*header)
        else:  # not PNG/JPEG: Pillow parses the header (and itself refuses twice the pixel limit)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    size = img.size
            except Image.DecompressionBombError:
                raise BadRequest(f"{where}image too large: more than {self.max_image_pixels} pixels "
                                 "(max_image_pixels)", 413) from None
            except Exception:  # noqa: BLE001 -- whatever Pillow cannot parse is the client's broken file
                raise BadRequest(f"{where}not a decodable image (unrecognised format or corrupt header; "
                                 "send JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
            decoded = size[0] * size[1]
        w, h = size
        if w * h > self.max_image_pixels:
            raise BadRequest(f"{where}image too large: {w}x{h} is more than {self.max_image_pixels} pixels "
                             "(max_image_pixels)", 413)
        if min(w, h) == 0 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise BadRequest(f"{where}aspect ratio of {w}x{h} is beyond {MAX_ASPECT_RATIO}:1")
        return decoded

    def _topk(self, requested: Any) -> int:
        if requested is None:
            return min(self.default_topk, len(self.classes))
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
        return min(k, len(self.classes))

    def _answer(self, req: Request, per_image: list[list[dict]]) -> dict[str, Any]:
        if req.shape == "kserve_v1":
            return {"predictions": per_image}
        if req.shape == "kserve_v2":
            model = self.manifest.get("model", {})
            return {"id": req.request_id, "model_name": model.get("modelName"),
                    "model_version": model.get("modelVersion"),
                    "outputs": [{"name": "predictions", "shape": [len(per_image)], "datatype": "BYTES",
                                 "data": [json.dumps(p) for p in per_image]}]}
        return {"predictions": per_image[0]}


_service = TorchvisionClassifierHandler()


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
        raise BadRequest(f"body is not valid JSON ({presets.plain(str(e))})") from None


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


def _torch_threads(option: Any, device: torch.device) -> tuple[int, int]:
    """(torch and decode threads per worker, torch threads for a one-image batch): "auto" follows
    contract.serving_plan for this machine; a number is used for both."""
    if option != "auto":
        return (max(0, int(option)),) * 2
    plan = contract.serving_plan(gpus=1 if device.type == "cuda" else 0)
    return plan.threads, plan.solo_threads


def _device(gpu_id: Any) -> torch.device:
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def _where(n: int, total: int) -> str:
    return f"image {n + 1} of {total}: " if total > 1 else ""
