"""Hostile image files, made on demand: what real scraped folders contain.

``make_hostile_files(folder, photo)`` writes one file per case and returns
``{file name: (expected status, expected reason)}`` for the clean stage.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_hostile_files(folder: Path, photo: Path) -> dict[str, tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    real = Image.open(photo).convert("RGB")
    real_bytes = photo.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    animated = io.BytesIO()
    frames = [real.resize((64, 48)).quantize(), real.resize((64, 48)).rotate(180).quantize()]
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen = Image.frombytes("I;16", (80, 60), bytes(range(256)) * 37 + bytes(128))
    cases: dict[str, tuple[bytes, str, str]] = {
        "zero_bytes.jpg": (b"", "excluded", "not_an_image"),
        "truncated.jpg": (real_bytes[: len(real_bytes) * 6 // 10], "excluded", "corrupt"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "excluded", "not_an_image"),
        "notes.txt": (b"just some text\n", "excluded", "not_an_image"),
        "cmyk.jpg": (_save(real.resize((300, 200)).convert("CMYK"), "JPEG"), "converted", ""),
        "rgba.png": (_save(real.resize((310, 200)).convert("RGBA"), "PNG"), "converted", ""),
        "gray.jpg": (_save(real.resize((320, 200)).convert("L"), "JPEG"), "converted", ""),
        "sixteen_bit.png": (_save(sixteen, "PNG"), "converted", ""),
        "palette.png": (_save(real.resize((120, 90)).quantize(), "PNG"), "converted", ""),
        "placeholder.gif": (_save(real.resize((130, 90)).quantize(), "GIF"), "excluded", "unsupported"),
        "animated.gif": (animated.getvalue(), "excluded", "unsupported"),
        "one_pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "excluded", "too_small"),
        "bomb.png": (bomb_png(), "excluded", "decompression_bomb"),
        "rotated.jpg": (_save(real, "JPEG", exif=exif.tobytes()), "converted", ""),
        "png_named.jpg": (_save(real.resize((100, 80)), "PNG"), "kept", ""),
        "original.jpg": (real_bytes, "kept", ""),
        "zz_duplicate_copy.jpg": (real_bytes, "excluded", "duplicate"),
        "huge.jpg": (_save(Image.new("RGB", (6000, 4000), (30, 90, 160)), "JPEG", quality=50), "kept", ""),
    }
    for name, (data, _, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: (status, reason) for name, (_, status, reason) in cases.items()}
