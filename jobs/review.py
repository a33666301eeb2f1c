"""The review page: every flagged image of ``audit.json``, with keep / exclude / relabel controls.

``render_review`` writes one self-contained HTML file (thumbnails embedded as ``data:`` URIs, no
external script or style), so it works from ``file://``. A person's choices are kept in the
browser's localStorage under a key naming the run, survive a reload, and are exported as
``decisions.json``::

    {"exclude": ["cats/x.jpg"], "relabel": {"dogs/y.jpg": "cats"}, "keep": ["cats/z.jpg"]}

Every path is a source path relative to the data folder, as in audit.json. One choice per
file: a file shown in several sections (a label issue that is also an outlier) shows the same
choice everywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageOps

from jobs.fileio import atomic_write_text

THUMB_SIZE = 160
MAX_PER_KIND = 500  # cards per section; the rest stay in audit.json
_MISSING = ("data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120"><rect width="160" height="120" '
    b'fill="#ddd"/><text x="80" y="64" font-size="14" text-anchor="middle" fill="#555">no image</text></svg>'
).decode())


def thumbnail_uri(path: Path | None, size: int = THUMB_SIZE) -> str:
    """A JPEG ``data:`` URI of ``path`` fitted in size x size, or a grey placeholder if it cannot be read."""
    if path is None:
        return _MISSING
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            thumb = ImageOps.exif_transpose(img).convert("RGB")
            thumb.thumbnail((size, size))
    except (OSError, ValueError, Image.DecompressionBombError):
        return _MISSING
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _given(file: str) -> str:
    return Path(file).parts[0]


def review_sections(audit: dict) -> list[dict]:
    """The page's sections in order: each a title, a kind and its items (cards grouped per item)."""
    groups = audit.get("near_duplicates", [])

    def group_item(g: dict) -> dict:
        note = f"{len(g['files'])} images, classes {', '.join(g['classes'])}"
        if g.get("similarity") is not None:
            note += f", lowest similarity {g['similarity']:.3f}"
        return {"note": note, "cards": [{"file": f, "given": _given(f)} for f in g["files"]]}

    return [
        {"kind": "conflicts", "title": "Label conflicts: the same image under several classes",
         "items": [group_item(g) for g in groups if g.get("cross_class")]},
        {"kind": "near_duplicates", "title": "Near-duplicates within one class (kept, and split together)",
         "items": [group_item(g) for g in groups if not g.get("cross_class")]},
        {"kind": "label_issues", "title": "Label issues, most likely wrong first",
         "items": [{"cards": [{"file": e["file"], "given": e["given"], "suggested": e.get("suggested"),
                               "score": e.get("score")}]} for e in audit.get("label_issues", [])]},
        {"kind": "outliers", "title": "Outliers: far from every other image",
         "items": [{"cards": [{"file": e["file"], "given": _given(e["file"]), "score": e.get("score")}]}
                   for e in audit.get("outliers", [])]},
        {"kind": "quality", "title": "Image quality",
         "items": [{"cards": [{"file": e["file"], "given": _given(e["file"]), "issues": e.get("issues", [])}]}
                   for e in audit.get("image_issues", [])]},
    ]


def render_review(audit: dict, image_file: Callable[[str], Path | None], class_names: Sequence[str], out: Path,
                  storage_key: str, max_per_kind: int = MAX_PER_KIND) -> Path:
    """Write ``out`` (e.g. ``<run>/report/review.html``) for ``audit``; returns ``out``.

    ``image_file`` maps a source path to a readable image file (or None); ``class_names`` are the
    relabel targets; ``storage_key`` names the run in localStorage (use the run folder's path, so
    two runs' choices never mix).
    """
    thumbs: dict[str, str] = {}
    sections = review_sections(audit)
    parts = []
    for section in sections:
        shown = section["items"][:max_per_kind]
        cards_html = []
        for item in shown:
            cards = []
            for card in item["cards"]:
                if card["file"] not in thumbs:
                    thumbs[card["file"]] = thumbnail_uri(image_file(card["file"]))
                cards.append(_card_html(card, thumbs[card["file"]], class_names))
            note = f'<p class="note">{html.escape(item["note"])}</p>' if "note" in item else ""
            cards_html.append(f'<div class="item">{note}<div class="cards">{"".join(cards)}</div></div>')
        more = len(section["items"]) - len(shown)
        tail = f'<p class="note">{more} more not shown; see audit.json.</p>' if more > 0 else ""
        body = "".join(cards_html) or '<p class="note">None found.</p>'
        parts.append(f'<section id="{section["kind"]}"><h2>{html.escape(section["title"])} '
                     f'({len(section["items"])})</h2>{body}{tail}</section>')
    noise = audit.get("estimated_noise", {})
    noise_line = ", ".join(f"{html.escape(c)} {100 * r:.1f}%" for c, r in noise.items())
    key = json.dumps(storage_key).replace("<", "\\u003c")  # a JS string literal that cannot close the script
    page = (_PAGE.replace("__KEY__", key).replace("__NOISE__", noise_line or "not estimated")
            .replace("__SECTIONS__", "".join(parts)))  # last: file names are data, never placeholders
    return atomic_write_text(out, page)


def _card_html(card: dict, thumb: str, class_names: Sequence[str]) -> str:
    file = card["file"]
    facts = [f'given <b>{html.escape(card["given"])}</b>']
    if card.get("suggested"):
        facts.append(f'suggested <b>{html.escape(card["suggested"])}</b>')
    if card.get("score") is not None:
        facts.append(f'score {card["score"]:.3f}')
    if card.get("issues"):
        facts.append(html.escape(", ".join(card["issues"])))
    options = "".join(f'<option value="{html.escape(c)}"{" selected" if c == card.get("suggested") else ""}>'
                      f'{html.escape(c)}</option>' for c in class_names if c != card["given"])
    return (f'<div class="card" data-file="{html.escape(file)}">'
            f'<img src="{thumb}" alt="{html.escape(file)}">'
            f'<div class="file">{html.escape(file)}</div><div class="facts">{" · ".join(facts)}</div>'
            '<div class="controls"><button data-action="keep">keep</button>'
            '<button data-action="exclude">exclude</button>'
            f'<button data-action="relabel">relabel to</button><select>{options}</select></div></div>')


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review flagged images</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
header{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:1}
section{margin-top:1.5em} h2{font-size:1.1em}
.item{border-left:3px solid #ccc;padding-left:.6em;margin:.6em 0}
.cards{display:flex;flex-wrap:wrap;gap:.6em}
.card{width:190px;border:1px solid #ccc;border-radius:6px;padding:.4em;font-size:.8em}
.card img{display:block;max-width:160px;max-height:160px;margin:0 auto .3em}
.file{word-break:break-all;font-family:monospace}
.note{color:#555;font-size:.85em;margin:.2em 0}
.controls button{margin:.15em .1em;font-size:.95em}
.card.keep{border-color:#2a2;background:#efe} .card.exclude{border-color:#c22;background:#fee}
.card.relabel{border-color:#27c;background:#eef6ff}
button.on{font-weight:bold;outline:2px solid #333}
</style></head><body>
<header><b>Review</b> · estimated label noise: __NOISE__ ·
<span id="count">0 decisions</span>
<button id="export">Export decisions.json</button> <button id="clear">Clear all</button>
<div class="note">Choices are saved in this browser as you click. Click a chosen button again to undo it.
Export, then put decisions.json in the run folder (or pass --decisions) and re-run the job.</div></header>
__SECTIONS__
<script>
"use strict";
const KEY = "image-job-review:" + __KEY__;
let state = {};
try { state = JSON.parse(localStorage.getItem(KEY) || "{}") || {}; } catch (e) { state = {}; }
const cards = Array.from(document.querySelectorAll(".card"));
function save() { localStorage.setItem(KEY, JSON.stringify(state)); }
function paint() {
  for (const card of cards) {
    const choice = state[card.dataset.file];
    card.classList.remove("keep", "exclude", "relabel");
    for (const b of card.querySelectorAll("button")) b.classList.remove("on");
    if (!choice) continue;
    card.classList.add(choice.action);
    card.querySelector('button[data-action="' + choice.action + '"]').classList.add("on");
    if (choice.action === "relabel") card.querySelector("select").value = choice.to;
  }
  const n = Object.keys(state).length;
  document.getElementById("count").textContent = n + (n === 1 ? " decision" : " decisions");
}
for (const card of cards) {
  const file = card.dataset.file, select = card.querySelector("select");
  if (!select.options.length) card.querySelector('button[data-action="relabel"]').disabled = true;
  for (const button of card.querySelectorAll("button")) {
    button.addEventListener("click", () => {
      const action = button.dataset.action, old = state[file];
      const choice = action === "relabel" ? {action, to: select.value} : {action};
      if (old && old.action === choice.action && old.to === choice.to) delete state[file];
      else state[file] = choice;
      save(); paint();
    });
  }
  select.addEventListener("change", () => {
    if (state[file] && state[file].action === "relabel") { state[file].to = select.value; save(); paint(); }
  });
}
function decisions() {
  const out = {exclude: [], relabel: {}, keep: []};
  for (const file of Object.keys(state).sort()) {
    const c = state[file];
    if (c.action === "exclude") out.exclude.push(file);
    else if (c.action === "keep") out.keep.push(file);
    else if (c.action === "relabel") out.relabel[file] = c.to;
  }
  return out;
}
document.getElementById("export").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(decisions(), null, 2) + "\\n"], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "decisions.json";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});
document.getElementById("clear").addEventListener("click", () => {
  if (confirm("Clear every choice on this page?")) { state = {}; save(); paint(); }
});
window.addEventListener("storage", e => { if (e.key === KEY) { state = JSON.parse(e.newValue || "{}"); paint(); } });
paint();
</script></body></html>
"""
