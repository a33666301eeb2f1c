"""The one source of truth for image decoding and preprocessing.

Training (``jobs.data``), offline prediction (``jobs predict``) and the TorchServe handler all
use these functions. ``jobs archive`` packs this very file into the model archive, so it must
import nothing from ``jobs`` -- only torch, torchvision and Pillow.

The eval transform is defined by four numbers and a resampling mode, written into
``metadata.json["preprocess"]`` by the export stage; the handler rebuilds it from there.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224


def preprocess_spec(resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE) -> dict[str, Any]:
    """What ``metadata.json`` records; ``eval_transform(**spec)`` rebuilds the transform."""
    return {
        "resize_size": resize_size,
        "crop_size": crop_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "interpolation": "bilinear",
        "antialias": True,
        "decode": "jpeg_draft_then_rgb_uint8",
    }


def eval_transform(resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE,
                   mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
                   std: tuple[float, ...] | list[float] = IMAGENET_STD, **_: Any) -> v2.Compose:
    """uint8 CHW tensor -> normalized float CHW tensor (Resize(256) + CenterCrop(224))."""
    return v2.Compose([
        v2.Resize(resize_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def train_transform(crop_size: int = CROP_SIZE, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> v2.Compose:
    """The original write-up's augmentation: RandomResizedCrop + horizontal flip."""
    return v2.Compose([
        v2.RandomResizedCrop(crop_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def decode_rgb(data: bytes, target_short_side: int = RESIZE_SIZE) -> torch.Tensor:
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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    if img.mode in {"I;16", "I;16B", "I;16L", "I"}:
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * 255.0 / peak).clip(0, 255).astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
