"""The second serving runtime: KServe's Python model server (``kserve.ModelServer``) on the same serving package.

    python -m handler.kserve_runtime --model-store DIR [--host 127.0.0.1] [--port 8080] [--workdir DIR]
                                     [--key-file FILE] [--disable-token-auth]

It serves every ``.mar`` in the model store -- the archives TorchServe serves, unpacked into the work folder --
under the model name the archive carries, with the options packed into its ``model-config.yaml`` (pixel limits,
topk, precision). Endpoints, all answered through ``ImageClassifier`` and ``handler.protocol.answer_body``, so
the bodies and the 4xx rules are TorchServe's:
  * ``POST /predictions/<name>``          TorchServe's own path: raw, multipart or JSON bodies
  * ``POST /v1/models/<name>:predict``    KServe V1 (``{"instances": [...]}``; a non-JSON body is the raw image)
  * ``POST /v2/models/<name>/infer``      Open Inference Protocol: BYTES inputs holding base64 images
    (JSON ``data``, or the binary extension carrying the base64 text: KServe 0.21 decodes binary BYTES as UTF-8,
    so raw image bytes there are refused with a 400 that says so)
  * ``GET /ping``, ``/v2/health/live|ready``, ``/v1/models/<name>``, ``/metrics``: the answers' metrics
    (``handler.answer_metrics``) and KServe's Prometheus histograms of each stage (``request_preprocess_seconds`` =
    parse + admit + decode, ``request_predict_seconds`` = batch queue + forward + answers,
    ``request_postprocess_seconds`` = the body), summed over the worker processes; the same three times per request
    are logged (KServe's latency log, ``preprocess_ms: ...``)

Token authorization like TorchServe's: ``key_file.json`` in the work folder (or ``--key-file``) holds
``{"inference": {"key": ...}}`` -- kept when it exists (a Kubernetes Secret mounted there keeps every replica's
key the same), made otherwise -- and every request but the health checks and /metrics must send
``Authorization: Bearer <key>``. Bodies over 20 MiB are refused with 413 before they are read, as TorchServe's
``max_request_size`` does.

Switching versions is a reload: every serving process watches the store's ``<name>.mar``; when ``jobs serve
--switch-to`` links another version there, it loads that one off the request path and swaps
(``ClassifierModel.watch``).

Workers and threads follow ``handler.scheduler.serving_plan`` (processes sharing the port, each with its own
copy of the model, batching concurrent requests up to the plan's batch size, a lone image on the idle cores).
This module imports nothing from ``jobs``; ``jobs serve --runtime kserve`` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, ORJSONResponse
from kserve import Model, ModelServer
from kserve.errors import InferenceError
from kserve.model_server import app as kserve_app
from kserve.protocol.infer_type import InferRequest

from handler import scheduler
from handler.answer_metrics import PrometheusAnswerMetrics
from handler.model import FX_TRACE
from handler.observe import Observer
from handler.preprocess import plain
from handler.protocol import BadRequest, answer_body, parse_request
from handler.protocol import Request as Parsed
from handler.service import ImageClassifier
from handler.status import STATUS_DIR, process_start

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 20 * 1024 * 1024  # TorchServe's max_request_size in handler/config.properties
OPEN_PATHS = frozenset({"/", "/ping", "/v2/health/live", "/v2/health/ready", "/metrics"})


@dataclass(frozen=True)
class Archive:
    """One unpacked .mar: where its files are and what its model-config.yaml set."""

    name: str
    version: str
    model_dir: Path
    weights: Path
    options: dict[str, Any]
    batch_size: int | None
    max_batch_delay_ms: int | None
    source: Path | None = None  # the model store's .mar it was unpacked from
    identity: tuple[int, ...] = ()  # that file's ``archive_identity`` when it was unpacked


def archive_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one archive file from another at a path: a switch links another file there (another inode),
    an archive written over it changes its size or mtime."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def unpack(mar: Path, dest: Path) -> Archive:
    """``mar`` extracted into ``dest/<stem>`` (replaced when the archive is newer); its manifest and settings."""
    folder = dest / mar.stem
    stamp = folder / ".unpacked-from"
    identity = archive_identity(mar.stat())
    key = f"{mar.resolve()} {mar.stat().st_mtime_ns} {mar.stat().st_size}"
    if not (stamp.is_file() and stamp.read_text() == key):
        with zipfile.ZipFile(mar) as z:
            z.extractall(folder)  # zipfile drops absolute paths and '..' from member names
        stamp.write_text(key)
    return _read_archive(folder, mar, identity)


RELOADS = ".reloads"


def unpack_reload(mar: Path, dest: Path) -> Archive:
    """``mar`` as it is now, extracted into a folder of its own (``dest/.reloads/<stem>-<identity>``): the running
    version's files stay as they are, and the worker processes that all unpack it at once do not meet -- each
    extracts into a temp folder and renames it; the first rename wins, the others use the winner's folder."""
    with open(mar, "rb") as f:  # identity and contents of the same file, whatever is linked there meanwhile
        identity = archive_identity(os.fstat(f.fileno()))
        folder = dest / RELOADS / f"{mar.stem}-{'-'.join(map(str, identity[1:]))}"
        if (folder / "MAR-INF" / "MANIFEST.json").is_file():
            os.utime(folder)  # in use again (a rollback): no other process's sweep takes it now
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                with zipfile.ZipFile(f) as z:
                    z.extractall(tmp)
                try:
                    os.rename(tmp, folder)
                except OSError:
                    if not folder.is_dir():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return _read_archive(folder, mar, identity)


def sweep_reloads(dest: Path, serving: Path, idle_s: float) -> list[Path]:
    """Remove the folders earlier switches unpacked into ``dest/.reloads`` (each the size of its archive, one per
    switch): all but ``serving`` that no process has unpacked or reused for ``idle_s`` seconds. A loaded version
    reads nothing from its folder again, and a folder made or reused within ``idle_s`` may be what another
    worker process is loading now. Returns what it removed."""
    removed = []
    for folder in (dest / RELOADS).iterdir() if (dest / RELOADS).is_dir() else ():
        try:
            idle = time.time() - folder.stat().st_mtime
        except OSError:  # another process's sweep took it
            continue
        if folder != serving and idle > idle_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _read_archive(folder: Path, mar: Path, identity: tuple[int, ...]) -> Archive:
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    config = folder / manifest.get("configFile", "model-config.yaml")
    settings = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    return Archive(manifest["modelName"], str(manifest.get("modelVersion", "1.0")), folder,
                   folder / manifest["serializedFile"], settings.get("handler") or {},
                   settings.get("batchSize"), settings.get("maxBatchDelay"), mar.absolute(), identity)


class PixelBudget:
    """Pixels being decoded at once in this process, at most ``limit`` (``max_batch_pixels``, the budget a
    TorchServe batch decodes within): a request waits for room instead of decoding beside too many others."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.room = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        async with self.room:
            await self.room.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            async with self.room:
                self.used -= pixels
                self.room.notify_all()


class Batcher:
    """Concurrent requests' images forwarded together, up to ``size`` images per forward pass, on one thread.

    Like a TorchServe worker: a batch is what queued while the previous one ran, topped up for at most
    ``delay`` seconds; the answers are computed for the whole batch and handed back per request.
    """

    def __init__(self, classifier: ImageClassifier, threads: scheduler.WorkerThreads, size: int, delay: float):
        self.classifier, self.threads, self.size, self.delay = classifier, threads, size, delay
        self.pending: list[tuple[Parsed, asyncio.Future]] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.task: asyncio.Task | None = None

    async def answers(self, req: Parsed) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((req, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            if self._images(self.pending) < self.size:
                await asyncio.sleep(self.delay)
            batch, n = [], 0
            while self.pending and (not batch or n + len(self.pending[0][0].tensors) <= self.size):
                batch.append(self.pending.pop(0))
                n += len(batch[-1][0].tensors)
            try:
                per_request = await loop.run_in_executor(self.pool, self._forward, [r for r, _ in batch])
            except Exception as e:  # noqa: BLE001 -- every request of the batch gets the failure (a 500)
                logger.exception("batch of %d requests failed", len(batch))
                per_request = [e] * len(batch)
            for (_, future), answer in zip(batch, per_request, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

    @staticmethod
    def _images(pending: list[tuple[Parsed, asyncio.Future]]) -> int:
        return sum(len(r.tensors) for r, _ in pending)

    def _forward(self, requests: list[Parsed]) -> list[list[dict[str, Any]]]:
        inputs = torch.stack([t for r in requests for t in r.tensors])
        with self.threads.running(len(inputs)), FX_TRACE.shared():
            outputs = self.classifier.forward(inputs)
        per_image = self.classifier.answers(outputs, [r.topk for r in requests for _ in r.tensors])
        out, offset = [], 0
        for r in requests:
            out.append(per_image[offset:offset + len(r.tensors)])
            offset += len(r.tensors)
        return out


@dataclass
class Served:
    """One loaded version of a model in this process: everything a request uses from preprocess to postprocess,
    so that a request begun on one version ends on it when the model switches meanwhile."""

    archive: Archive
    classifier: ImageClassifier
    decoders: ThreadPoolExecutor
    batcher: Batcher
    observer: Observer
    budget: PixelBudget | None = None  # made on first use, inside the server's event loop

    def close(self) -> None:
        """Once no request can still be using it (``RETIRE_S`` after the switch)."""
        self.decoders.shutdown(wait=False)
        self.batcher.pool.shutdown(wait=False)
        if self.observer.capture is not None:
            self.observer.capture.close()


@dataclass
class Job:
    """A request between the stages: parsed and decoded, and the version that answers it."""

    req: Parsed
    served: Served


RELOAD_CHECK_S = 0.5  # how often a serving process looks at the store's archive (a stat)
RETIRE_S = 60.0  # a switched-from version's threads stop this long after the switch: its requests have ended


class ClassifierModel(Model):
    """One archive's model in KServe's dataplane: preprocess = parse + admit + decode, predict = the batched
    forward pass and the answers, postprocess = the answer body in the request's own shape.

    KServe's multi-process server pickles the registered models into each worker process: the pickle carries
    the archive, not the loaded model, and each process loads its own copy when it is unpickled.

    Switching versions (``jobs serve --switch-to``, which links another archive to the store's ``<name>.mar``):
    each serving process looks at that file every ``RELOAD_CHECK_S`` (``watch``), loads and warms the archive now
    there on a thread of its own, off the request path, then swaps ``served`` at once. Requests already begun
    finish on the version they began on; a broken archive leaves the old version serving and says why in the log
    and in the process's status file (``workdir/serving/<name>.<pid>.json``, which ``jobs serve`` reads).
    """

    def __init__(self, archive: Archive, plan: scheduler.ServingPlan, workdir: Path | None = None):
        super().__init__(archive.name)
        self.archive, self.plan, self.workdir = archive, plan, workdir
        self.served: Served | None = None
        self.loading: threading.Thread | None = None
        self.watcher: threading.Thread | None = None

    @property
    def classifier(self) -> ImageClassifier | None:
        served = self.served
        return served.classifier if served is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"archive": self.archive, "plan": self.plan, "workdir": self.workdir,
                "latency_log": self.enable_latency_logging}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["archive"], state["plan"], state.get("workdir"))
        self.enable_latency_logging = state["latency_log"]
        install(kserve_app)  # a worker process imports a fresh kserve.model_server.app
        _log_in_worker_process()
        # KServe kills a worker process that does not answer its ping within 5 s, and the ping thread starts only
        # after unpickling: load beside it. Requests that arrive meanwhile wait for the load (``loaded``).
        self.ready = True
        MODELS[self.name] = self
        self.loading = threading.Thread(target=self._load_and_watch, name=f"load-{self.name}", daemon=True)
        self.loading.start()

    def _load_and_watch(self) -> None:
        self.load()
        self.watch()

    def load(self) -> bool:
        self.served = self._loaded(self.archive)
        MODELS[self.name] = self
        self.ready = True
        return self.ready

    def _loaded(self, a: Archive) -> Served:
        """``a`` loaded, warmed up and ready to answer (nothing of this process's serving changes)."""
        plan = self.plan
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        threads, solo = scheduler.torch_threads(a.options.get("torch_threads", "auto"), device)
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        classifier = ImageClassifier(a.model_dir, device, a.weights, a.options)
        with FX_TRACE.shared():
            classifier.forward(torch.zeros(1, *classifier.meta["input_size"]))  # warm up the kernels
        # Decoding releases the GIL: it runs on its own threads while the forward thread computes.
        decoders = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        delay = a.max_batch_delay_ms if a.max_batch_delay_ms is not None else plan.max_batch_delay_ms
        batcher = Batcher(classifier, scheduler.WorkerThreads(a.model_dir, threads, solo, device.type == "cpu"),
                          a.batch_size or plan.batch_size, delay / 1000)
        observer = Observer.start(PrometheusAnswerMetrics(a.name, a.version, **classifier.answer_kinds()),
                                  a.name, a.version)
        logger.info("loaded %s %s (%s, %s %s, %d torch threads) in process %d", a.name, a.version,
                    classifier.meta["arch"], classifier.engine.name, classifier.precision, torch.get_num_threads(),
                    os.getpid())
        return Served(a, classifier, decoders, batcher, observer)

    def watch(self) -> None:
        """Follow the store's archive from now on (a serving process, once it has loaded the model)."""
        if self.workdir is None or self.archive.source is None or self.served is None:
            return
        self.report()
        self.watcher = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        source, failed = self.archive.source, None
        while True:
            time.sleep(RELOAD_CHECK_S)
            try:
                identity = archive_identity(source.stat())
            except OSError:  # being replaced, or gone: the running version stays
                continue
            if identity in (self.archive.identity, failed):
                continue
            try:
                self.switch()
                failed = None
            except Exception as e:  # noqa: BLE001 -- a broken archive must not stop the version that serves
                failed = identity
                error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                logger.exception("could not load %s as %s's next version (%s); still serving %s %s in process %d",
                                 source, self.name, error, self.name, self.archive.version, os.getpid())
                self.report(failed=identity, error=error)

    def switch(self) -> None:
        """Load the store's archive as it is now beside the version serving, then answer with it."""
        archive = unpack_reload(self.archive.source, self.workdir / "models")
        if archive.name != self.name:
            raise ValueError(f"the archive's model is named {archive.name!r}, not {self.name!r}")
        served = self._loaded(archive)
        old, self.served, self.archive = self.served, served, archive
        logger.info("now serving %s %s (was %s) in process %d", self.name, archive.version,
                    old.archive.version if old else None, os.getpid())
        self.report()
        sweep_reloads(self.workdir / "models", archive.model_dir, RETIRE_S)
        if old is not None:
            retire = threading.Timer(RETIRE_S, old.close)
            retire.daemon = True  # never holds the process up when it stops
            retire.start()

    def report(self, failed: tuple[int, ...] | None = None, error: str | None = None) -> None:
        """This process's status file: the version and archive it serves, and the archive it could not load."""
        folder = self.workdir / STATUS_DIR
        doc = {"pid": os.getpid(), "started": process_start(os.getpid()), "model": self.name,
               "version": self.archive.version,
               "archive": list(self.archive.identity), "workers": self.plan.workers,
               "failed_archive": list(failed) if failed else None, "error": error}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.name}.{os.getpid()}.json"
            tmp = path.with_name(f".{path.name}.part")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("could not write the status file in %s (%s)", folder, e.strerror)

    async def loaded(self) -> Served:
        if self.served is None and self.loading is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.loading.join)
        served = self.served
        if served is None:
            raise RuntimeError(f"model {self.name} failed to load; see the log")
        return served

    def validate(self, payload: Any) -> Any:
        return payload  # handler.protocol validates every body itself

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Job:
        headers = headers or {}
        served = await self.loaded()
        clf = served.classifier
        req = parse_request(payload_row(payload), headers)
        req.topk = clf.topk(req.topk)
        req.request_id = req.request_id or headers.get("x-request-id") or uuid.uuid4().hex
        req.pixels = clf.admit(req.images)
        if served.budget is None:
            served.budget = PixelBudget(clf.max_batch_pixels)
        async with served.budget.hold(req.pixels):
            req.tensors = await asyncio.get_running_loop().run_in_executor(served.decoders, _decode, clf,
                                                                           req.images)
        return Job(req, served)

    async def predict(self, job: Job, headers: dict[str, str] | None = None) -> tuple[Job, list[dict]]:
        per_image = await job.served.batcher.answers(job.req)
        job.served.observer.answered([(job.req, per_image)])
        return job, per_image

    def postprocess(self, result: tuple[Job, list[dict]], headers: dict[str, str] | None = None) -> dict:
        job, per_image = result
        return answer_body(job.req, per_image, self.name, job.served.archive.version)


def _log_in_worker_process() -> None:
    """A spawned worker process has KServe's logging set up, not ours (``main``'s basicConfig): without this its
    INFO lines -- the model it loaded, the version it switched to -- never reach the log."""
    ours = logger  # named __mp_main__ there: the process started as python -m handler.kserve_runtime
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _decode(classifier: ImageClassifier, images: list[bytes]) -> list[torch.Tensor]:
    with FX_TRACE.shared():  # the transforms are torch modules: not while another model is being traced
        return classifier.decode(images)


MODELS: dict[str, ClassifierModel] = {}  # this process's loaded models, for /predictions/<name>


def payload_row(payload: Any) -> Any:
    """What KServe hands over -> what ``parse_request`` reads: a V2 ``InferRequest`` becomes its JSON form
    (BYTES data as sent; ``parameters.topk`` as the body's topk); V1 dicts and raw bytes pass unchanged."""
    if not isinstance(payload, InferRequest):
        return payload
    inputs = [{"name": i.name, "datatype": i.datatype, "data": _bytes_data(i.data)} for i in payload.inputs]
    params = payload.parameters or {}
    return {"id": payload.id, "inputs": inputs, **({"topk": params["topk"]} if "topk" in params else {})}


def _bytes_data(data: Any) -> Any:
    """A V2 input's elements, flattened (a [1, 1]-shaped input nests its list)."""
    if isinstance(data, list) and any(isinstance(d, list) for d in data):
        return [x for d in data for x in (d if isinstance(d, list) else [d])]
    return data.tolist() if hasattr(data, "tolist") else data


async def predictions(model_name: str, request: Request) -> Any:
    """TorchServe's ``/predictions/<name>``: the same bodies, the same answers."""
    model = MODELS.get(model_name)
    if model is None:
        return JSONResponse({"error": f"model {model_name!r} not found; served: {', '.join(sorted(MODELS))}"}, 404)
    headers = {k.lower(): v for k, v in request.headers.items()}
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in {"multipart/form-data", "application/x-www-form-urlencoded"}:
        async with request.form() as form:  # one key per field, files as their bytes (TorchServe's rows)
            row = {k: (await v.read() if hasattr(v, "read") else v) for k, v in form.items()}
    else:
        body = await request.body()
        row = _json(body) if kind == "application/json" else body
    response, _ = await model(row, headers=headers)
    return ORJSONResponse(response)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"body is not valid JSON ({e})") from None


async def ping(request: Request) -> JSONResponse:
    """TorchServe's health check: Healthy once this worker process has loaded every model; then also which engine
    serves each model and why (``ImageClassifier.backend``)."""
    loaded = MODELS and all(m.classifier is not None for m in MODELS.values())
    if not loaded:
        return JSONResponse({"status": "Unhealthy"}, 503)
    return JSONResponse({"status": "Healthy", "models": {name: m.classifier.backend for name, m in MODELS.items()}})


async def bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadRequest)
    logger.warning("request refused (%d): %s", exc.status, exc)
    return JSONResponse({"error": str(exc)}, exc.status)


async def undecodable(request: Request, exc: Exception) -> JSONResponse:
    """KServe's InferenceError here only comes from decoding the client's V2 body (our model raises BadRequest):
    a 400, not KServe's 500. The usual case: raw image bytes as binary BYTES, which KServe decodes as UTF-8."""
    message = str(exc)
    if "UTF-8" in message:
        message = "a binary BYTES input is not UTF-8 text: send each image as base64 (KServe reads them as text)"
    logger.warning("request refused (400): %s", plain(message))
    return JSONResponse({"error": plain(message, 200)}, 400)


class Guard:
    """ASGI middleware: the bearer token (unless ``key`` is empty) and TorchServe's request size limit."""

    def __init__(self, app: Any, key: str = "", max_bytes: int = MAX_REQUEST_BYTES):
        self.app, self.key, self.max_bytes = app, key.encode(), max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"] == "/metrics" and os.environ.get(MULTIPROCESS_ENV):
            return await _all_processes_metrics(send)
        if self.key and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                return await _refuse(send, 401, "Token Authorization failed: send 'Authorization: Bearer <key>' "
                                                "with the inference key from key_file.json")
        if int(headers.get(b"content-length", b"0") or 0) > self.max_bytes:
            return await _refuse(send, 413, f"request body over {self.max_bytes} bytes")
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body without Content-Length
                raise BadRequest(f"request body over {self.max_bytes} bytes", 413)
            return message

        return await self.app(scope, counted, send)


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode: one file per process


async def _all_processes_metrics(send: Any) -> None:
    """/metrics summed over every worker process (prometheus_client's multiprocess collector), instead of KServe's
    page of whichever process the request reached: counters that jump between processes make no rate."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    body = generate_latest(registry)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def share_metrics_across_processes(workdir: Path) -> None:
    """Worker processes (spawned: they import prometheus_client afresh) keep their metrics in files of a fresh
    ``workdir/prometheus`` folder, which /metrics sums; the folder of a previous start is emptied."""
    folder = workdir / "prometheus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[MULTIPROCESS_ENV] = str(folder)


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *([(b"www-authenticate", b"Bearer")] if status == 401 else [])]})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    """Our routes, error bodies and guard on KServe's app, once per process (the key comes from the
    environment, so every worker process has it)."""
    from kserve.protocol.rest import server as rest

    if getattr(app.state, "classifier_runtime", False):
        return
    app.state.classifier_runtime = True
    app.add_api_route("/predictions/{model_name}", predictions, methods=["POST", "PUT"])
    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_middleware(Guard, key=os.environ.get(KEY_ENV, ""))
    # KServe registers its own handlers when its REST server starts, InferenceError's among them: ours go after.
    kserve_handlers = rest.RESTServer._add_exception_handlers

    def add_handlers(self: Any, app: FastAPI) -> None:
        kserve_handlers(self, app)
        app.add_exception_handler(BadRequest, bad_request)
        app.add_exception_handler(InferenceError, undecodable)

    rest.RESTServer._add_exception_handlers = add_handlers


PING_TIMEOUT_S = 30
KEY_ENV = "CLASSIFIER_INFERENCE_KEY"  # how the key reaches the worker processes; never logged


def inference_key(key_file: Path) -> str:
    """The inference key in ``key_file`` (TorchServe's key_file.json layout), made and written when absent."""
    if key_file.is_file():
        try:
            return str(json.loads(key_file.read_text())["inference"]["key"])
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"{key_file}: expected {{\"inference\": {{\"key\": ...}}}}; fix or delete it") from None
    key = secrets.token_urlsafe(24)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"inference": {"key": key}}, f)
    return key


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m handler.kserve_runtime", description=__doc__.splitlines()[0])
    ap.add_argument("--model-store", type=Path, required=True, help="Folder of .mar archives (all are served).")
    ap.add_argument("--host", default="127.0.0.1", help="Address to bind (the container: 0.0.0.0).")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--workdir", type=Path, default=Path.cwd(), help="Unpacked archives and key_file.json.")
    ap.add_argument("--key-file", type=Path, default=None, help="Default: WORKDIR/key_file.json.")
    ap.add_argument("--disable-token-auth", action="store_true", help="No token needed (local demos only).")
    args = ap.parse_args(argv)
    mars = sorted(args.model_store.glob("*.mar"))
    if not mars:
        raise SystemExit(f"no .mar archive in {args.model_store}; run `python -m jobs archive --out RUN` first")
    os.environ[KEY_ENV] = "" if args.disable_token_auth else inference_key(args.key_file or
                                                                            args.workdir / "key_file.json")
    plan = scheduler.serving_plan(gpus=1 if torch.cuda.is_available() else 0)
    workdir = args.workdir.absolute()
    for stale in (workdir / STATUS_DIR, workdir / "models" / RELOADS):  # a previous start's
        shutil.rmtree(stale, ignore_errors=True)
    archives = [unpack(m, workdir / "models") for m in mars]
    models = [ClassifierModel(a, plan, workdir) for a in archives]
    install(kserve_app)
    for m in models:
        m.load()  # here too: a model that cannot load stops the server before it listens
    if plan.workers > 1:  # the worker processes load their own copies and watch the store; this one supervises
        share_metrics_across_processes(workdir)
        MODELS.clear()
        for m in models:
            m.served = None
    else:
        for m in models:
            m.watch()
    logger.info("serving %s on %s:%d: %d workers x %d threads (%d for a lone image), batch %d, delay %d ms",
                ", ".join(a.name for a in archives), args.host, args.port, plan.workers, plan.threads,
                plan.solo_threads, plan.batch_size, plan.max_batch_delay_ms)
    server = ModelServer(http_port=args.port, workers=plan.workers, enable_grpc=False)
    _adapt_kserve(args.host)
    server.start(models)


def _adapt_kserve(host: str) -> None:
    """Two settings KServe 0.21's ModelServer does not expose.

    Its REST server always binds 0.0.0.0: bind ``host`` instead (loopback unless asked). And its supervisor
    kills a worker process that does not answer a ping within 5 s -- counted from the process's start, which
    includes importing torch: on a loaded 2-core machine that alone takes longer, and every worker was killed
    and restarted forever. 30 s still finds a hung worker.
    """
    from kserve.protocol.rest import server as rest
    from kserve.protocol.rest.multiprocess.server import RESTServerProcess

    RESTServerProcess.is_alive.__defaults__ = (PING_TIMEOUT_S,)

    original = rest.RESTServer.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        original(self, *a, **kw)
        self.config.host = host

    rest.RESTServer.__init__ = init


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    main()
