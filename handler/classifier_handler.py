"""TorchServe's entry point: BaseHandler's initialize -> preprocess -> inference -> postprocess around
``handler.service.ImageClassifier``, batched, with errors per request.

``jobs archive`` packs this file as the .mar's handler and the whole ``handler`` package beside it, so
one archive serves any architecture the job exports. Request bodies and answers: ``handler.protocol``.
A raw body must not be sent as ``application/x-www-form-urlencoded`` (curl -d's default): TorchServe's
frontend tries to parse it as a form and answers 500 before the handler sees it. Use ``-T``,
``--data-binary`` with ``-H "Content-Type: image/jpeg"``, or a multipart upload.

``topk`` per request: a JSON or multipart field ``topk``, or the header ``X-TopK``. A ``?topk=N`` query
parameter cannot work: TorchServe 0.12's inference frontend drops the query string before the request
reaches the worker (only the body, multipart/form fields and headers arrive).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# TorchServe appends the extracted archive to sys.path; put it first, so that the serving package this
# archive carries is the one that runs, not one installed in the image from another version.
_ARCHIVE = Path(__file__).resolve().parent
if (_ARCHIVE / "handler" / "__init__.py").is_file() and str(_ARCHIVE) not in sys.path[:1]:
    sys.path.insert(0, str(_ARCHIVE))

import torch  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

import handler  # noqa: E402
from handler import scheduler  # noqa: E402
from handler.answer_metrics import TorchServeAnswerMetrics  # noqa: E402
from handler.observe import Observer  # noqa: E402
from handler.protocol import BadRequest, Refused, Request, answer_body, parse_request, status_phrase  # noqa: E402
from handler.service import ImageClassifier, Outputs  # noqa: E402

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error; the traceback is in the server's model_log.log"


@dataclass
class Batch:
    """What TorchServe handed over, as it moves through preprocess -> inference -> postprocess."""

    requests: list[Request | Refused]
    inputs: torch.Tensor
    outputs: Outputs | None = None


class ClassifierHandler(BaseHandler):
    """Serves the exported model in the archive (``metadata.json`` + ``model.pt``)."""

    def initialize(self, context: Any) -> None:
        # BaseHandler.initialize would torch.jit.load model.pt; ours is a bare state_dict.
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = context.manifest
        options = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        device = _device(props.get("gpu_id"))
        # 0 threads: leave torch's own number. On the CPU a batch of one image gets solo_threads, a bigger
        # one threads (scheduler.serving_plan); inference switches between them.
        self.threads, self.solo_threads = scheduler.torch_threads(options.get("torch_threads", "auto"), device)
        on_cpu = device.type == "cpu"
        if self.threads and on_cpu:
            torch.set_num_threads(self.threads)
        self.worker_threads = scheduler.WorkerThreads(model_dir, self.threads, self.solo_threads, on_cpu)
        # Decoding releases the GIL: a worker with several threads decodes its requests side by side.
        self.decoders = ThreadPoolExecutor(self.threads, thread_name_prefix="decode") if self.threads > 1 else None
        self.classifier = ImageClassifier(model_dir, device, model_dir / self.manifest["model"]["serializedFile"],
                                          options)
        self.inference(Batch([], torch.zeros(1, *self.classifier.meta["input_size"])))  # warm up the kernels
        model = self.manifest.get("model", {})
        self.model_name, self.model_version = model.get("modelName"), model.get("modelVersion")
        metrics = TorchServeAnswerMetrics(context.metrics, self.model_name, self.model_version,
                                          **self.classifier.answer_kinds())
        self.observer = Observer.start(metrics, self.model_name, self.model_version)
        self.initialized = True
        meta = self.classifier.meta
        logger.info("loaded %s with %d classes on %s (%s %s, %d torch threads; serving package %s)", meta["arch"],
                    len(meta["classes"]), device, self.classifier.engine.name, self.classifier.precision,
                    torch.get_num_threads(),
                    Path(handler.__file__).parent)

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """preprocess -> inference -> postprocess, with per-request errors and per-stage time metrics."""
        start = time.perf_counter()
        self.context = context
        if self._is_describe():  # the management API's GET /models/<name>?customized=true
            return [json.dumps(self.describe_handle())]
        try:
            batch = self.preprocess(data)
            decoded = time.perf_counter()
            batch = self.inference(batch)
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

    def describe_handle(self) -> dict[str, Any]:
        """The model's ``customizedMetadata``: which engine serves it, in which precision, and why."""
        return {"arch": self.classifier.meta["arch"], **self.classifier.backend}

    def preprocess(self, data: list[Any]) -> Batch:
        """Parse every request, admit them within the batch's pixel budget, then decode the admitted ones."""
        requests = [self._parse(i, row) for i, row in enumerate(data)]
        limit = self.classifier.max_batch_pixels
        budget = limit
        for i, r in enumerate(requests):
            if isinstance(r, Request):
                if r.pixels > budget:  # only when earlier requests of this batch used part of it
                    requests[i] = Refused(503, f"server busy: this batch already decodes {limit - budget} pixels; "
                                               "retry")
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
        with self.worker_threads.running(len(batch.inputs)):
            batch.outputs = self.classifier.forward(batch.inputs)
        return batch

    def postprocess(self, batch: Batch) -> list[Any]:
        requests = [r for r in batch.requests if isinstance(r, Request)]
        per_image = self.classifier.answers(batch.outputs, [r.topk for r in requests for _ in r.tensors]) \
            if requests else []
        out, answered, offset = [], [], 0
        for i, r in enumerate(batch.requests):
            if isinstance(r, Request):
                n = len(r.tensors)
                answered.append((r, per_image[offset:offset + n]))
                r = answer_body(r, per_image[offset:offset + n], self.model_name, self.model_version)
                offset += n
            out.append(self._reply(i, r))
        self.observer.answered(answered)
        return out

    def _reply(self, idx: int, answer: dict | Refused) -> dict:
        self.context.set_response_content_type(idx, "application/json")
        if isinstance(answer, Refused):
            self.context.set_response_status(answer.status, status_phrase(answer.message), idx=idx)
            return {"error": answer.message}
        return answer

    def _parse(self, idx: int, row: Any) -> Request | Refused:
        """Parse one request and size its images from their headers; a problem becomes its answer."""
        try:
            req = parse_request(row, _request_headers(self.context, idx))
            req.topk = self.classifier.topk(req.topk)
            req.request_id = req.request_id or _request_id(self.context, idx)
            req.pixels = self.classifier.admit(req.images)
            return req
        except BadRequest as e:
            return self._refuse(idx, e)
        except Exception:  # a bug on one request must not fail the whole batch
            logger.exception("request %s failed while parsing", _request_id(self.context, idx))
            return Refused(500, INTERNAL_ERROR)

    def _decode(self, idx: int, req: Request) -> Request | Refused:
        try:
            req.tensors = self.classifier.decode(req.images)
            return req
        except BadRequest as e:
            return self._refuse(idx, e)
        except Exception:
            logger.exception("request %s failed in preprocessing", req.request_id)
            return Refused(500, INTERNAL_ERROR)

    def _refuse(self, idx: int, e: BadRequest) -> Refused:
        logger.warning("request %s refused (%d): %s", _request_id(self.context, idx), e.status, e)
        return Refused(e.status, str(e))


_service = ClassifierHandler()


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point. A module-level ``handle`` is needed because TorchServe refuses a
    handler module that defines more than one class; it calls ``handle(None, context)`` once to load."""
    if not _service.initialized:
        _service.initialize(context)
    return None if data is None else _service.handle(data, context)


def _request_headers(context: Any, idx: int) -> dict[str, Any]:
    try:
        return context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, TypeError):
        return {}


def _request_id(context: Any, idx: int) -> str:
    return str(context.get_request_id(idx)) if hasattr(context, "get_request_id") else str(idx)


def _device(gpu_id: Any) -> torch.device:
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")
