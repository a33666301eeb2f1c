"""Image bytes -> the tensor a model was evaluated on: decoding and the transforms, from one spec.

Training (``jobs.data``, ``jobs.features``), offline prediction and every serving runtime use these
functions; the archive carries this package whole. The eval transform is defined by a small spec --
resize and crop sizes, resampling, mean and std, the model's own data config -- that the export stage
writes into ``metadata.json["preprocess"]`` (``handler.model.preprocess_spec`` makes it); the server
rebuilds the transform from there.
"""

from __future__ import annotations

import io
import math
import re
import struct
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from handler.images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers carry the size
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


def spec(resize_size: int = 256, crop_size: int = 224, mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
         std: tuple[float, ...] | list[float] = IMAGENET_STD, interpolation: str = "bilinear") -> dict[str, Any]:
    """What ``metadata.json["preprocess"]`` records; ``eval_transform(spec)`` rebuilds the transform."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    return {"resize_size": int(resize_size), "crop_size": int(crop_size), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "interpolation": interpolation, "antialias": True,
            "decode": "jpeg_draft_then_rgb_uint8"}


def _normalize(spec: dict[str, Any]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(spec["mean"]), std=list(spec["std"]))]


def eval_transform(spec: dict[str, Any]) -> v2.Compose:
    """uint8 CHW tensor -> normalized float CHW tensor: Resize(short side) + CenterCrop."""
    mode = INTERPOLATIONS[spec.get("interpolation", "bilinear")]
    return v2.Compose([v2.Resize(int(spec["resize_size"]), interpolation=mode, antialias=True),
                       v2.CenterCrop(int(spec["crop_size"])), *_normalize(spec)])


def train_transform(spec: dict[str, Any]) -> v2.Compose:
    """The training augmentation at the model's own crop size and resampling: RandomResizedCrop + flip."""
    mode = INTERPOLATIONS[spec.get("interpolation", "bilinear")]
    return v2.Compose([v2.RandomResizedCrop(int(spec["crop_size"]), interpolation=mode, antialias=True),
                       v2.RandomHorizontalFlip(), *_normalize(spec)])


class Preprocessor:
    """Image bytes -> the normalized tensor the model was evaluated on (``spec``: ``metadata.json["preprocess"]``);
    with ``augment``, the training augmentation instead, from the same decode."""

    def __init__(self, spec: dict[str, Any], augment: bool = False):
        self.spec = spec
        self.resize_size = int(spec["resize_size"])
        self.transform = train_transform(spec) if augment else eval_transform(spec)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_rgb(data, self.resize_size))

    def decoded_pixels(self, fmt: str, size: tuple[int, int]) -> int:
        """Pixels ``decode_rgb`` decodes for an image of ``size``: large JPEGs decode at a reduced DCT scale."""
        w, h = size
        scale = 1
        while fmt == "JPEG" and scale < 8 and min(w, h) // (scale * 2) >= self.resize_size:
            scale *= 2
        return math.ceil(w / scale) * math.ceil(h / scale)


def image_header(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """("PNG"|"JPEG", (width, height)) from a PNG's IHDR or a JPEG's frame header, without decoding;
    None for other formats or a header cut short."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return "PNG", struct.unpack(">II", data[16:24])
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in JPEG_SOF_MARKERS and i + 9 <= len(data):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return "JPEG", (w, h)
        i += 2 + length
    return None


def decode_rgb(data: bytes, target_short_side: int = 256) -> torch.Tensor:
    """Image bytes -> upright RGB uint8 tensor (3, H, W).

    Large JPEGs are decoded by Pillow's ``draft`` at a reduced DCT scale that still keeps the
    short side >= ``target_short_side`` (the later Resize sees enough pixels; decoding costs a
    fraction). Other JPEGs and PNGs go through torchvision.io (libjpeg-turbo/libpng, no PIL
    round trip); everything else Pillow can read is converted by Pillow.
    Raises ``ValueError`` with a one-line reason for anything that is not a usable image.
    """
    if not data:
        raise ValueError("empty body (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        fmt, (w, h) = img.format, img.size
        if fmt == "JPEG" and min(w, h) >= 2 * target_short_side:
            scale = min(w, h) // target_short_side
            img.draft("RGB", (w // scale, h // scale))
            return _pil_to_tensor(img)
        if fmt in {"JPEG", "PNG"} and img.mode in {"RGB", "L", "RGBA", "LA", "P"}:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                mode=ImageReadMode.RGB, apply_exif_orientation=True)
        return _pil_to_tensor(img)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large, refused as a decompression bomb ({plain(str(e))})") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not a decodable image (unrecognised format; send JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
    except (OSError, RuntimeError, SyntaxError) as e:
        raise ValueError(f"not a decodable image ({type(e).__name__}: {plain(str(e))})") from None


# Object reprs, memory addresses and file paths: what a library's error text may hold and a client must not see.
_INTERNALS = re.compile(r"<[^<>]*>|0x[0-9a-fA-F]+|(?:[A-Za-z]:)?(?:[\\/][\w.+-]+){2,}(?::\d+)?")


def plain(message: str, limit: int = 120) -> str:
    """A library's error text fit for a client: first line, internals replaced by '...', at most ``limit`` chars."""
    first = (message.strip().splitlines() or [""])[0]
    return _INTERNALS.sub("...", first)[:limit]


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = to_rgb(img)
    return v2.functional.pil_to_tensor(img)
