"""Contact sheets: a grid of thumbnails per class in one PNG, to eyeball what a folder really holds.

Used for the collected images (``raw/collect_preview.png``) and by the report stage for the
training images. Pillow only; an unreadable file shows as a crossed-out cell instead of failing.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from jobs.fileio import atomic_write_bytes

CELL = 112  # thumbnail box in pixels
GAP = 4
TITLE_H = 24
PANELS_PER_ROW = 4
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (235, 235, 235)
BROKEN = (200, 40, 40)


def _thumbnail(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (CELL, CELL))  # JPEG: decode at a reduced scale, much faster
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((CELL, CELL))
            return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def spread(paths: list[Path], count: int) -> list[Path]:
    """Up to ``count`` of ``paths``, evenly spaced over the whole list (the first ``count`` of a sorted
    folder would all be from one corner of it)."""
    return paths[:: max(1, len(paths) // count)][:count]


def _panel(name: str, paths: list[Path], per_class: int) -> Image.Image:
    cols = max(1, math.ceil(math.sqrt(per_class)))
    rows = max(1, math.ceil(per_class / cols))
    width, height = cols * (CELL + GAP) + GAP, TITLE_H + rows * (CELL + GAP) + GAP
    panel = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    shown = spread(paths, per_class)
    draw.text((GAP, 4), f"{name} ({len(shown)} of {len(paths)})" if paths else f"{name}: no images",
              fill=(0, 0, 0), font=_font(14))
    for i in range(cols * rows):
        x, y = GAP + (i % cols) * (CELL + GAP), TITLE_H + GAP + (i // cols) * (CELL + GAP)
        draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=EMPTY_CELL)
        if i >= len(shown):
            continue
        thumb = _thumbnail(shown[i])
        if thumb is None:
            draw.line((x, y, x + CELL - 1, y + CELL - 1), fill=BROKEN, width=3)
            draw.line((x, y + CELL - 1, x + CELL - 1, y), fill=BROKEN, width=3)
        else:
            panel.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
    return panel


def contact_sheet(images_by_class: dict[str, list[Path]], out_png: Path, per_class: int = 16) -> Path:
    """Write a PNG with one panel per class: a near-square grid of ``per_class`` of its images, spread evenly
    over the list, titled with how many of how many it shows."""
    panels = [_panel(name, [Path(p) for p in paths], per_class) for name, paths in images_by_class.items()]
    if not panels:
        panels = [_panel("no classes", [], per_class)]
    per_row = min(PANELS_PER_ROW, len(panels))
    pw, ph = panels[0].size
    n_rows = math.ceil(len(panels) / per_row)
    sheet = Image.new("RGB", (per_row * (pw + GAP) + GAP, n_rows * (ph + GAP) + GAP), BACKGROUND)
    for i, panel in enumerate(panels):
        sheet.paste(panel, (GAP + (i % per_row) * (pw + GAP), GAP + (i // per_row) * (ph + GAP)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(out_png, buf.getvalue())
