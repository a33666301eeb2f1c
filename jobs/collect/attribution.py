"""Who made each kept image and under which license: ``raw/ATTRIBUTION.md`` and ``raw/attribution.json``.

Openly licensed images (CC BY and friends) require attribution wherever they are redistributed;
the export stage copies a license summary from attribution.json into the model's metadata.json.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from jobs.fileio import atomic_write_json, atomic_write_text

FIELDS = ("creator", "license", "license_url", "source", "landing_url", "title")


def attribution_rows(kept: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per kept image, grouped by term, sorted by file name (stable across runs)."""
    rows = []
    for term, entries in kept.items():
        for entry in sorted(entries, key=lambda e: e["file"]):
            rows.append({"term": term, "file": f"{term}/{entry['file']}", **{k: entry.get(k) for k in FIELDS}})
    return rows


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") if text else ""


def _link(text: Any, url: Any) -> str:
    label = _cell(text) or "link"
    return f"[{label}]({url})" if url else _cell(text)


def render_markdown(rows: list[dict[str, Any]], terms: list[str]) -> str:
    lines = [
        "# Image attribution",
        "",
        "Images collected by `python -m jobs collect`. Each keeps its own license; credit the creator "
        "and link the license when you redistribute the images or anything that contains them.",
        "",
        "Licenses: " + (", ".join(f"{name} ({n})" for name, n in Counter(r["license"] for r in rows).most_common())
                        or "none"),
    ]
    for term in terms:
        own = [r for r in rows if r["term"] == term]
        lines += ["", f"## {term} ({len(own)} images)", ""]
        if not own:
            lines.append("No images kept.")
            continue
        lines += ["| File | Title | Creator | License | Source |", "|---|---|---|---|---|"]
        lines += [f"| {r['file']} | {_link(r['title'], r['landing_url'])} | {_cell(r['creator']) or 'unknown'} "
                  f"| {_link(r['license'], r['license_url'])} | {_cell(r['source'])} |" for r in own]
    return "\n".join(lines) + "\n"


def write_attribution(raw: Path, kept: dict[str, list[dict[str, Any]]]) -> tuple[Path, Path]:
    rows = attribution_rows(kept)
    md = atomic_write_text(raw / "ATTRIBUTION.md", render_markdown(rows, list(kept)))
    js = atomic_write_json(raw / "attribution.json", rows)
    return md, js
