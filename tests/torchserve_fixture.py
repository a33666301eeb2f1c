"""Building blocks for the handler and TorchServe tests (and bench/serve.py): tiny trained models,
a 7-class data set made from the fixture photos, archives, and the requests TorchServe would pass."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import ts
from PIL import Image, ImageOps
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.model import create
from handler.service import ImageClassifier
from handler.trust import Trust
from jobs.archive import archive
from jobs.clean import clean
from jobs.config import AUTO_VERSION, Config, RunPaths, load_config
from jobs.export import build_metadata, export
from jobs.runtime import setup
from jobs.serve import Ports, TorchServe, free_ports, launch
from jobs.split import split
from jobs.train import train
from jobs.versions import begin_export, weights_digest

# Where a test proves the job's logic, not its judgments: timm's 0.47M-parameter test ResNet (160 px), random
# weights. A run on it costs a fraction of ResNet-18's compute and a fifteenth of its disk (17 MB against 250 MB
# with the .mar); the default ResNet-18 runs whole in the preflight test, and real features (EfficientNet-Lite0)
# wherever quality is judged (the quick start among them).
TINY_ARCH = "timm/test_resnet"
# serve_backend torch: these tests serve and predict on torch, so export writes no model.onnx and checks no engine
# (tests/test_backends.py does, once).
TINY_TRAINING = {"arch": TINY_ARCH, "weights": "none", "epochs": 1, "batch_size": 8, "min_images_per_class": 3,
                 "num_workers": 0, "feature_views": 1, "serve_backend": "torch"}

# Seven visibly different versions of a photo, one per class, so no two class folders share a file.
SEVEN_VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "original": lambda im: im,
    "mirrored": ImageOps.mirror,
    "flipped": ImageOps.flip,
    "rotated": lambda im: im.rotate(90, expand=True),
    "cropped": lambda im: im.crop((im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)),
    "gray": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "inverted": ImageOps.invert,
}


def export_tiny_model(out: Path, data: Path, **overrides) -> tuple[Config, RunPaths]:
    """clean -> split -> train (random backbone, one epoch) -> export, in this process."""
    cfg = load_config(None, {**TINY_TRAINING, **overrides})
    paths = RunPaths.for_config(out, cfg)
    rt = setup(cfg)
    clean(cfg, paths, data)
    split(cfg, paths)
    train(cfg, paths, rt, "auto")
    export(cfg, paths)
    return cfg, paths


def export_random_model(out: Path, classes: list[str], arch: str = TINY_ARCH, seed: int = 0,
                        version: str = AUTO_VERSION) -> RunPaths:
    """``out/model/`` as the export stage writes it, with random weights: for tests and benchmarks
    that need the contract (state_dict + metadata.json), not a trained model. Over an earlier one with other
    weights it is the next version, the earlier kept in ``out/versions/`` (``jobs.versions.begin_export``)."""
    torch.manual_seed(seed)
    model_dir = Path(out) / "model"
    state = create(arch, len(classes)).state_dict()
    version = begin_export(RunPaths(Path(out)), version, weights_digest(state))
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, model_dir / "model.pt")
    cfg = load_config(None, {"weights": "none", "arch": arch, "model_version": version})
    meta = {**build_metadata(cfg, {"classes": classes, "data_hash": "random", "split_hash": "random"}, {}),
            "weights_sha256": weights_digest(state)}
    (model_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    (model_dir / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(classes)}))
    return RunPaths(Path(out))


def add_trust(model_dir: Path, photos: list[Path], keep: float = 0.5) -> dict:
    """Fit the trust fields on ``photos`` (bank, temperature and threshold alike; labels by turns) into an exported
    ``model_dir``, as the export would on a real split: a random model that abstains on some images."""
    classifier = ImageClassifier(model_dir, torch.device("cpu"))
    inputs = torch.stack(classifier.decode([p.read_bytes() for p in photos]))
    features, logits = classifier.engine.run(inputs)
    labels = torch.arange(len(photos)) % len(classifier.classes)
    fitted = Trust.fit(features, labels, features, logits, labels, keep=keep)
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta["trust"] = fitted.save(model_dir)
    (model_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    return meta["trust"]


def make_seven_class_data(source: Path, dest: Path, per_class: int = 6) -> Path:
    """dest/<view>/*.jpg: the first ``per_class`` fixture photos, each class a different transformation."""
    photos = sorted(source.glob("*/*.jpg"))[:per_class]
    for name, view in SEVEN_VIEWS.items():
        (dest / name).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            with Image.open(photo) as im:
                view(im.convert("RGB")).save(dest / name / photo.name, quality=90)
    return dest


def archive_as(cfg: Config, paths: RunPaths, store: Path, name: str, handler: Path | None = None,
               handler_options: dict | None = None, **overrides) -> Path:
    """Archive an exported run under another model name / model-config into ``store``."""
    cfg = dataclasses.replace(cfg, model_name=name, **overrides)
    return archive(cfg, RunPaths(paths.out, store), handler, handler_options)


def unused_ports(host: str = "127.0.0.1") -> Ports:
    """Five ports unused right now on ``host``: servers in tests and benchmarks never collide."""
    return Ports(*free_ports(5, host))


def serve_detached(cfg: Config, model_store: Path, workdir: Path) -> TorchServe:
    """What `python -m jobs serve` starts, on unused ports, left running: stop it with `jobs serve --stop`."""
    ports = unused_ports()
    return launch(cfg, model_store, workdir, host="127.0.0.1", port=ports.inference,
                  management_port=ports.management, metrics_port=ports.metrics, disable_token_auth=False)


def handler_context(model_dir: Path, handler_options: dict | None = None, gpu_id: int | None = None) -> Context:
    """TorchServe's own Context as a worker builds it for a model in ``model_dir``."""
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    manifest = {"model": {"modelName": "clf", "modelVersion": "1.0", "serializedFile": "model.pt"}}
    return Context("clf", str(model_dir), manifest, 8, gpu_id, "0.12.0", metrics=metrics,
                   model_yaml_config={"handler": handler_options or {}})


def batch_context(ctx: Context, headers: list[dict]) -> Context:
    """``ctx`` set up as TorchServe's Service.predict does for a batch: per-request headers and ids."""
    ctx.request_processor = [RequestProcessor(hd) for hd in headers]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(headers))}
    ctx.metrics.request_ids = ctx.request_ids
    return ctx


def handle_batch(handler: Any, ctx: Context, rows: list, headers: list[dict] | None = None) -> list:
    """One batch, as TorchServe's Service.predict hands it over: rows + per-request header processors."""
    return handler.handle(rows, batch_context(ctx, headers or [{} for _ in rows]))


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR that claims ``width`` x ``height`` pixels, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@functools.cache
def blank_png(width: int, height: int) -> bytes:
    """A real, decodable ``width`` x ``height`` black PNG, compressed row by row (no full-size buffer)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, rows = zlib.compressobj(6), b"\0" * (1 + 3 * width) * 256  # filter byte + pixels, 256 rows a time
    full, rest = divmod(height, 256)
    data = b"".join(packer.compress(rows) for _ in range(full)) + packer.compress(rows[:rest * (1 + 3 * width)])
    data += packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def bad_images(good_jpeg: bytes) -> dict[str, bytes]:
    """Bodies that are not usable images, by kind: each must be refused with a 4xx, never crash a worker."""
    return {
        "empty": b"",
        "text": b"this is not an image",
        "truncated": good_jpeg[: len(good_jpeg) // 2],
        "header-only": good_jpeg[:64],
        "bomb": png_header(100_000, 100_000),
        "too-thin": _png_bytes(Image.new("RGB", (1, 300), "red")),
    }


def _png_bytes(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
