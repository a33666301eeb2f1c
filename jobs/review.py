"""The review page: every flagged image of ``audit.json``, with keep / exclude / relabel controls.

``render_review`` writes one self-contained HTML file (thumbnails embedded as ``data:`` URIs, no
external script or style), so it works from ``file://``. A person's choices are kept in the
browser's localStorage under a key naming the run, survive a reload, and are exported as
``decisions.json``::

    {"exclude": ["cats/x.jpg"], "relabel": {"dogs/y.jpg": "cats"}, "keep": ["cats/z.jpg"]}

Every path is a source path relative to the data folder, as in audit.json; a captured image is
``captured:<path relative to the capture folder>`` (``jobs.decisions``). One choice per file: a file
shown in several sections (a label issue that is also an outlier) shows the same choice everywhere.

With ``jobs review --captured DIR`` the page begins with the captured images, grouped by likeness
(``jobs.captured``, kept in ``report/captured_review.json``): each can be relabelled to a class of the
run or to a new class typed in, or excluded (discarded).

``serve_review`` serves the run's report folder on loopback and saves the page's choices straight
into ``<run>/decisions.json`` (``POST /decisions``; 409 while a job holds the run folder's lock); the
page shows a "Save to run" button only when this server answers ``GET /decisions``.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import ipaddress
import json
import mimetypes
import re
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from PIL import Image, ImageOps

from jobs import runlock
from jobs.captured import saved_review_document
from jobs.config import RunPaths
from jobs.decisions import DecisionsError, capture_path, is_captured
from jobs.decisions import parse as parse_decisions
from jobs.errors import JobError
from jobs.fileio import atomic_write_json, atomic_write_text, read_json, read_run_file

THUMB_SIZE = 160
MAX_PER_KIND = 500  # items per page of a section; the rest on the section's further pages
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


def captured_section(doc: dict) -> dict:
    """The page's section of captured images (``jobs.captured.review_document``): one item per group."""
    def cards(entries: list[dict]) -> list[dict]:
        return [{**e, "captured": True, "score": e["distance"], "issues": [e["why"]] if e.get("why") else []}
                for e in entries]

    def answers(entries: list[dict]) -> str:
        counts: dict[str, int] = {}
        for e in entries:
            said = "abstained" if e.get("abstain_reason") else f"answered {e.get('answered')}"
            counts[said] = counts.get(said, 0) + 1
        return ", ".join(f"{said} {n}" for said, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    items = [{"note": f"{len(g['cards'])} images ({answers(g['cards'])}); mean distance to the nearest training "
                      f"image {g['mean_distance']:.3f}", "cards": cards(g["cards"])} for g in doc["groups"]]
    if doc["unreadable"]:
        items.append({"note": f"{len(doc['unreadable'])} images that cannot be decoded",
                      "cards": cards(doc["unreadable"])})
    title = (f"Captured by the served model in {doc['folder']}: grouped by likeness, least like the training images "
             "first (label each with a class, or a new one, or exclude it)")
    return {"kind": "captured", "title": title, "items": items}


def review_sections(audit: dict, abstained: Sequence[dict] = (), captured: dict | None = None,
                    labels: dict[str, str] | None = None) -> list[dict]:
    """The page's sections in order: each a title, a kind and its items (cards grouped per item).

    ``abstained``: the test images the served model abstained on (evaluate's, each ``{"file": source
    path, "ood_score", "abstain_reason"}``): often off-topic photos the audit let through. ``captured``:
    the captured images' groups (``jobs.captured.review_document``), shown first. ``labels``: source ->
    class where the path does not say it (a captured image brought into the run).
    """
    def _given(file: str) -> str:
        return (labels or {}).get(file) or Path(file).parts[0]

    groups = audit.get("near_duplicates", [])

    def group_item(g: dict) -> dict:
        note = f"{len(g['files'])} images, classes {', '.join(g['classes'])}"
        if g.get("similarity") is not None:
            note += f", lowest similarity {g['similarity']:.3f}"
        return {"note": note, "cards": [{"file": f, "given": _given(f)} for f in g["files"]]}

    return [
        *([captured_section(captured)] if captured else []),
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
        *([{"kind": "abstained", "title": "Test images the served model abstained on (unlike the training "
                                          "images, or low confidence), least like them first",
            "items": [{"cards": [{"file": e["file"], "given": _given(e["file"]), "score": e["ood_score"],
                                  "issues": [e["abstain_reason"]]}]}
                      for e in sorted(abstained, key=lambda e: -e["ood_score"])]}] if abstained else []),
    ]


ABSTAINED_FILE = "review_abstained.json"  # in report/: evaluate's abstained test images, for every later page


def write_run_review(paths: RunPaths, audit: dict, abstained: Sequence[dict] | None = None) -> Path:
    """Write ``<run>/report/review.html`` for the run's audit, evaluate's abstained test images (``file``: their
    path in the run folder; None: those evaluate gave last) and the captured images ``jobs review --captured``
    grouped: thumbnails from the run's cleaned copies (a capture not brought in: from the capture folder)."""
    saved_abstained = paths.report / ABSTAINED_FILE
    if abstained is not None:
        atomic_write_json(saved_abstained, list(abstained))
    elif saved_abstained.is_file():
        abstained = read_json(saved_abstained)
    files = read_run_file(paths.clean_report, f"run `python -m jobs clean --out {paths.out}`", ("files",))["files"]
    outputs = {f["source"]: paths.out / f["output"] for f in files if f["output"]}
    sources = {f["output"]: f["source"] for f in files if f["output"]}
    shown = [{**e, "file": sources[e["file"]]} for e in abstained or () if e["file"] in sources]
    captured = saved_review_document(paths)

    def image_file(source: str) -> Path | None:
        """The run's cleaned copy; a captured image not brought in is read (only read) in the capture folder."""
        if source in outputs or not (captured and is_captured(source)):
            return outputs.get(source)
        return Path(captured["folder"]) / capture_path(source)

    return render_review(audit, image_file, audit["classes"], paths.report / "review.html",
                         str(paths.out.resolve()), abstained=shown, captured=captured,
                         labels={f["source"]: f["label"] for f in files if is_captured(f["source"])})


def render_review(audit: dict, image_file: Callable[[str], Path | None], class_names: Sequence[str], out: Path,
                  storage_key: str, max_per_kind: int = MAX_PER_KIND, abstained: Sequence[dict] = (),
                  captured: dict | None = None, labels: dict[str, str] | None = None) -> Path:
    """Write ``out`` (e.g. ``<run>/report/review.html``) for ``audit``; returns ``out``.

    ``image_file`` maps a source path to a readable image file (or None); ``class_names`` are the
    relabel targets; ``storage_key`` names the run in localStorage (use the run folder's path, so
    two runs' choices never mix); ``abstained``, ``captured`` and ``labels`` as for ``review_sections``.

    A section of more than ``max_per_kind`` items goes on over pages of its own beside ``out``
    (``review-<kind>-2.html``, ...), linked from its pager: each page embeds the thumbnails of what it shows
    only, so it opens in seconds whatever the photo count, and every page shares the one set of choices
    (the same localStorage key). Pages an earlier, longer review left are removed.
    """
    noise = audit.get("estimated_noise", {})
    noise_line = ("; ".join([", ".join(f"{html.escape(c)} {100 * r:.1f}%" for c, r in noise.items()),
                             *_unjudged_pairs(audit)]) if noise else _not_estimated(audit))
    key = json.dumps(storage_key).replace("<", "\\u003c")  # a JS string literal that cannot close the script
    class_list = "".join(f'<option value="{html.escape(c)}">' for c in class_names)
    page = (_PAGE.replace("__KEY__", key).replace("__NOISE__", noise_line).replace("__CLASSES__", class_list))
    first, written = [], set()
    for section in review_sections(audit, abstained, captured, labels):
        items = section["items"]
        chunks = [items[i:i + max_per_kind] for i in range(0, len(items), max_per_kind)] or [[]]
        names = [out.name, *(f"{out.stem}-{section['kind']}-{n}.html" for n in range(2, len(chunks) + 1))]
        for n, chunk in enumerate(chunks):
            body = _section_html(section, chunk, _pager(section["kind"], names, n), image_file, class_names)
            if n:  # written at once: the further pages' thumbnails are never all held together
                # __SECTIONS__ is replaced last: file names are data, never placeholders
                atomic_write_text(out.with_name(names[n]), page.replace("__SECTIONS__", body))
                written.add(names[n])
            else:
                first.append(body)
    stale = re.compile(rf"{re.escape(out.stem)}-[a-z_]+-\d+\.html")
    for left in out.parent.glob(f"{out.stem}-*.html"):
        if stale.fullmatch(left.name) and left.name not in written:
            left.unlink()
    return atomic_write_text(out, page.replace("__SECTIONS__", "".join(first)))


def _section_html(section: dict, shown: Sequence[dict], pager: str, image_file: Callable[[str], Path | None],
                  class_names: Sequence[str]) -> str:
    """One page of a section: its ``shown`` items as cards (groups together, under what they share)."""
    thumbs: dict[str, str] = {}
    items_html = []
    for item in shown:
        cards = []
        for card in item["cards"]:
            if card["file"] not in thumbs:
                thumbs[card["file"]] = thumbnail_uri(image_file(card["file"]))
            cards.append(_card_html(card, thumbs[card["file"]], class_names))
        if "note" in item:  # a group: its cards together, under what they share
            items_html.append(f'<div class="item"><p class="note">{html.escape(item["note"])}</p>'
                              f'<div class="cards">{"".join(cards)}</div></div>')
        else:
            items_html += cards
    # Single images fill a grid of equal columns; groups (of any size) wrap side by side.
    layout = "groups" if any("note" in item for item in shown) else "grid"
    body = f'<div class="{layout}">{"".join(items_html)}</div>' if items_html else '<p class="note">None found.</p>'
    return (f'<section id="{section["kind"]}"><h2>{html.escape(section["title"])} ({len(section["items"])})</h2>'
            f"{pager}{body}{pager}</section>")


def _pager(kind: str, names: Sequence[str], n: int) -> str:
    """Links to the section's pages before and after page ``n`` (0-based) of ``names``; nothing for one page."""
    if len(names) < 2:
        return ""

    def link(i: int, text: str, rel: str) -> str:
        href = html.escape(quote(names[i]) + (f"#{kind}" if i == 0 else ""))
        return f'<a href="{href}" rel="{rel}">{text}</a>'

    parts = [*([link(n - 1, "previous", "prev")] if n else []), f"page {n + 1} of {len(names)}",
             *([link(n + 1, "next", "next")] if n + 1 < len(names) else [])]
    return f'<nav class="pager note">{" · ".join(parts)}</nav>'


def _unjudged_pairs(audit: dict) -> list[str]:
    """The classes whose labels were not judged against each other (their noise left out), in words."""
    return [f"{html.escape(a)} and {html.escape(b)} not estimated (the features cannot tell them apart, skill "
            f"{pair['skill']:.2f}: {pair['issues_withheld']} issues withheld)"
            for pair in audit.get("label_check", {}).get("pairs_not_judged", []) for a, b in [pair["classes"]]]


def _not_estimated(audit: dict) -> str:
    """Why there is no noise estimate: the audit's own words when it declined to judge the labels."""
    reason = audit.get("label_check", {}).get("reason")
    return f"not estimated ({html.escape(reason)})" if reason else "not estimated"


def data_quality_html(audit: dict, excluded: dict[str, int], review_href: str = "review.html") -> str:
    """The report's data-quality fragment (no heading: the report wraps it in its own section).

    Counts per kind, the estimated label noise per class and a link to the review page, from
    ``audit`` (an audit.json document); what clean and split left out of every split, after the
    decisions, from ``excluded`` (reason -> images: label_conflict, label_issue, decision).
    """
    groups = audit.get("near_duplicates", [])
    conflicts = [g for g in groups if g.get("cross_class")]
    conflict_images = sum(len(g["files"]) for g in conflicts)
    issue_counts: dict[str, int] = {}
    for entry in audit.get("image_issues", []):
        for issue in entry.get("issues", []):
            issue_counts[issue] = issue_counts.get(issue, 0) + 1
    by_issue = ", ".join(f"{issue} {n}" for issue, n in sorted(issue_counts.items()))
    rows = [
        ("cross-class conflicts (groups of one image under several classes)", len(conflicts),
         f"{conflict_images} images"),
        ("near-duplicate groups within one class", len(groups) - len(conflicts),
         f"{sum(len(g['files']) for g in groups if not g.get('cross_class'))} images"),
        ("label issues", len(audit.get("label_issues", [])), ""),
        ("outliers", len(audit.get("outliers", [])), ""),
        ("image-quality flags (images)", len(audit.get("image_issues", [])), by_issue),
    ]
    table = "".join(f"<tr><td>{html.escape(kind)}</td><td>{n}</td><td>{html.escape(detail)}</td></tr>"
                    for kind, n, detail in rows)
    noise = audit.get("estimated_noise", {})
    noise_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{100 * r:.1f}%</td></tr>" for c, r in noise.items())
    noise_html = (f"<table><tr><th>class</th><th>estimated label noise</th></tr>{noise_rows}</table>"
                  + "".join(f"<p>{line}.</p>" for line in _unjudged_pairs(audit)) if noise
                  else f"<p>Estimated label noise: {_not_estimated(audit)}.</p>")
    left_out = {"label_conflict": "in cross-class conflicts", "label_issue": "as label issues",
                "decision": "by a review decision"}
    leakage = ("test accuracy on a leakage-free split: near-duplicate groups are kept within one split; "
               + (", ".join(f"{n} image{'' if n == 1 else 's'} excluded {left_out.get(reason, reason)}"
                            for reason, n in sorted(excluded.items()) if n) or "no image excluded"))
    return (f'<div id="data-quality"><table><tr><th>found</th><th>count</th><th>details</th></tr>{table}</table>'
            f"{noise_html}<p>{html.escape(leakage)}</p>"
            f'<p><a href="{html.escape(review_href)}">Review the flagged images</a> '
            "(keep / exclude / relabel; then re-run the same job)</p></div>")


def _captured_card_html(card: dict, thumb: str) -> str:
    """A captured image: what the model answered, how far it is from the training images, why it was kept;
    excluded (discarded), or relabelled to a class typed in (the page's class list suggests the run's)."""
    file = card["file"]
    said = (f'abstained ({html.escape(card["abstain_reason"])})' if card.get("abstain_reason") else
            f'answered <b>{html.escape(str(card.get("answered")))}</b>'
            + (f' {card["probability"]:.2f}' if card.get("probability") is not None else ""))
    facts = [said, *([f'distance {card["score"]:.3f}'] if card.get("score") is not None else []),
             *(html.escape(i) for i in card.get("issues", [])),
             *([f'model {html.escape(str(card["model_version"]))}'] if card.get("model_version") else [])]
    return (f'<div class="card captured" data-file="{html.escape(file)}">'
            f'<img src="{thumb}" alt="{html.escape(file)}">'
            f'<div class="file">{html.escape(capture_path(file))}</div><div class="facts">{" · ".join(facts)}</div>'
            '<div class="controls"><button data-action="exclude">exclude</button>'
            '<button data-action="relabel">label as</button>'
            '<input class="class-name" list="class-names" placeholder="class, or a new one" size="14"></div></div>')


def _card_html(card: dict, thumb: str, class_names: Sequence[str]) -> str:
    file = card["file"]
    if card.get("captured"):
        return _captured_card_html(card, thumb)
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


MAX_BODY = 16 << 20  # decisions for ~100k files; anything larger is not from the page


def run_class_names(run_folder: Path) -> list[str]:
    """The relabel targets: the classes clean found (``clean_report.json``), else ``splits.json``'s.

    clean_report.json is written before the audit, so it exists whenever review.html does;
    splits.json (same classes) covers a run folder that kept only the later stages' files.
    """
    clean_report, splits = run_folder / "clean_report.json", run_folder / "splits.json"
    if clean_report.exists() or not splits.exists():
        rebuild = f"run `python -m jobs clean --out {run_folder}`"
        return list(read_run_file(clean_report, rebuild, ("classes",))["classes"])
    return list(read_run_file(splits, f"run `python -m jobs split --out {run_folder}`", ("classes",))["classes"])


class ReviewServer(ThreadingHTTPServer):
    """Serves ``<run>/report/`` and takes ``POST /decisions`` into ``<run>/decisions.json``."""

    daemon_threads = True

    def __init__(self, run_folder: Path, host: str, port: int) -> None:
        self.run_folder = run_folder
        self.report = (run_folder / "report").resolve()
        super().__init__((host, port), _ReviewHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/review.html"


def review_server(run_folder: Path, host: str = "127.0.0.1", port: int = 8765) -> ReviewServer:
    """A bound (not yet serving) ReviewServer for ``run_folder``, or one line saying why it cannot start.

    Loopback only: the server writes into the run folder and asks nobody for a password.
    Port 0 picks a free port (see ``.url``).
    """
    try:
        loopback = ipaddress.ip_address(host).version == 4 and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise JobError(f"--host {host} is not a loopback address; the review server writes into the run folder "
                       "and has no login, so it listens on 127.0.0.1 (or another 127.x address) only")
    page = run_folder / "report" / "review.html"
    if not page.is_file():
        raise JobError(f"no review page at {page}; run `python -m jobs audit --out {run_folder}` first")
    run_class_names(run_folder)  # fail now, not at the first save
    try:
        return ReviewServer(run_folder, host, port)
    except OSError as e:
        why = "is in use; pass another --port" if e.errno == errno.EADDRINUSE else f"cannot be opened ({e.strerror})"
        raise JobError(f"port {port} on {host} {why}") from None


def serve_review(run_folder: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the review page until Ctrl-C; "Save to run" writes ``<run_folder>/decisions.json``."""
    server = review_server(run_folder, host, port)
    print(f"review: open {server.url} ; Save to run writes {run_folder / 'decisions.json'} ; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("review: stopped")
    finally:
        server.server_close()


class _ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "jobs-review"

    def do_GET(self) -> None:
        if not self._from_this_host():
            return
        path = unquote(urlsplit(self.path).path)
        if path == "/decisions":  # the page asks this to learn it may offer "Save to run"
            saved = (self.server.run_folder / "decisions.json").exists()
            self._reply(200, json.dumps({"run": str(self.server.run_folder), "saved": saved}), "application/json")
            return
        try:
            target = (self.server.report / (path.lstrip("/") or "review.html")).resolve()
        except (OSError, ValueError):  # e.g. a NUL byte in the path
            target = None
        if target is None or not target.is_relative_to(self.server.report) or not target.is_file():
            self._reply(404, f"not found: {path} (this server serves only the run's report folder)")
            return
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"  # the report's pages are written as UTF-8
        self._reply(200, target.read_bytes(), content_type)

    def do_POST(self) -> None:
        if not self._from_this_host():
            return
        if urlsplit(self.path).path != "/decisions":
            self._reply(404, f"not found: POST {self.path} (POST /decisions saves decisions.json)")
            return
        if self.headers.get_content_type() != "application/json":
            self._reply(415, "send decisions.json with Content-Type: application/json")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._reply(411, "send a Content-Length header with the decisions.json body")
            return
        length = int(length)
        if length > MAX_BODY:
            self._reply(413, f"a decisions.json body must be at most {MAX_BODY} bytes")
            return
        try:
            doc = json.loads(self.rfile.read(length))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
            self._reply(400, f"the body is not JSON ({str(e).splitlines()[0][:120]})")
            return
        try:
            decisions = parse_decisions(doc, "the body", run_class_names(self.server.run_folder)).document()
        except DecisionsError as e:
            self._reply(400, str(e))
            return
        except JobError as e:  # the run folder lost clean_report.json while we served: not the client's fault
            self._reply(500, str(e))
            return
        target = self.server.run_folder / "decisions.json"
        try:  # briefly, as a job does: a running clean never sees decisions.json change under it
            with runlock.hold(self.server.run_folder, busy_hint="save again when it has ended"):
                atomic_write_json(target, decisions)
        except runlock.FolderBusy as e:
            self._reply(409, str(e))
            return
        except (OSError, JobError) as e:
            self._reply(500, f"cannot write {target}: {e}")
            return
        count = len(decisions["exclude"]) + len(decisions["relabel"]) + len(decisions["keep"])
        self._reply(200, f"saved {count} decision{'' if count == 1 else 's'} to {target}")

    def _from_this_host(self) -> bool:
        """Refuse requests addressed to another name (DNS rebinding) or sent by another site's page."""
        port = self.server.server_address[1]
        origins = {f"{self.server.server_address[0]}:{port}", f"localhost:{port}"}
        origin = self.headers.get("Origin")
        if self.headers.get("Host") in origins and (origin is None or urlsplit(origin).netloc in origins):
            return True
        self._reply(403, f"only the review page at {self.server.url} may use this server")
        return False

    def _reply(self, status: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review flagged images</title>
<style>
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 1.5em 2em;max-width:1800px;color:#222}
header{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:1}
section{margin-top:1.5em} h2{font-size:1.1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.8em}
.groups{display:flex;flex-wrap:wrap;gap:.8em;align-items:flex-start}
.item{border:1px solid #ddd;border-left:4px solid #999;border-radius:6px;padding:.4em .5em;max-width:100%;
  box-sizing:border-box}
.item .cards{display:flex;flex-wrap:wrap;gap:.6em}
.item .card{width:220px}
.card{border:1px solid #ccc;border-radius:6px;padding:.5em;font-size:.8em;box-sizing:border-box;min-width:0;
  display:flex;flex-direction:column}
.card img{display:block;width:100%;height:160px;object-fit:contain;margin:0 0 .3em}
.file{word-break:break-all;font-family:monospace}
.facts{margin:.2em 0 .4em}
.note{color:#555;font-size:.85em;margin:.2em 0}
.controls{margin-top:auto;display:flex;flex-wrap:wrap;gap:.25em;align-items:center}
.controls button{font-size:.95em} .controls select{max-width:100%;min-width:0}
.card.keep{border-color:#2a2;background:#efe} .card.exclude{border-color:#c22;background:#fee}
.card.relabel{border-color:#27c;background:#eef6ff}
button.on{font-weight:bold;outline:2px solid #333}
</style></head><body>
<datalist id="class-names">__CLASSES__</datalist>
<header><b>Review</b> · estimated label noise: __NOISE__ ·
<span id="count">0 decisions</span>
<button id="export">Export decisions.json</button> <button id="clear">Clear all</button>
<button id="save" hidden>Save to run</button> <span id="save-status"></span>
<div class="note">Choices are saved in this browser as you click. Click a chosen button again to undo it.
Export decisions.json into the run folder or pass it with <code>--decisions FILE</code> (or, when this
page is served by <code>python -m jobs review --out RUN</code>, Save to run), then re-run the same job.</div></header>
__SECTIONS__
<script>
"use strict";
const KEY = "jobs-review:" + __KEY__;
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
    if (choice.action === "relabel") card.querySelector("select, input.class-name").value = choice.to;
  }
  const n = Object.keys(state).length;
  document.getElementById("count").textContent = n + (n === 1 ? " decision" : " decisions");
}
for (const card of cards) {
  // a captured image's class is typed in (it may be a new class); the others pick one of the run's
  const file = card.dataset.file, select = card.querySelector("select, input.class-name");
  if (select.tagName === "SELECT" && !select.options.length) {
    card.querySelector('button[data-action="relabel"]').disabled = true;
  }
  for (const button of card.querySelectorAll("button")) {
    button.addEventListener("click", () => {
      const action = button.dataset.action, old = state[file];
      if (action === "relabel" && !select.value.trim()) { select.focus(); return; }
      const choice = action === "relabel" ? {action, to: select.value.trim()} : {action};
      if (old && old.action === choice.action && old.to === choice.to) delete state[file];
      else state[file] = choice;
      save(); paint();
    });
  }
  select.addEventListener("change", () => {
    const to = select.value.trim();
    if (to && state[file] && state[file].action === "relabel") { state[file].to = to; save(); paint(); }
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
  if (confirm("Clear every choice, on every page of this review?")) { state = {}; save(); paint(); }
});
const saveButton = document.getElementById("save"), saveStatus = document.getElementById("save-status");
if (location.protocol === "http:" || location.protocol === "https:") {
  // only `python -m jobs review` answers this; any other web server leaves the button hidden
  fetch("/decisions").then(r => r.ok ? r.json() : null).then(info => {
    if (info && typeof info.run === "string") {
      saveButton.hidden = false; saveButton.title = "write decisions.json into " + info.run;
    }
  }).catch(() => {});
}
saveButton.addEventListener("click", async () => {
  saveStatus.textContent = "saving...";
  try {
    const r = await fetch("/decisions", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify(decisions())});
    saveStatus.textContent = (r.ok ? "" : "not saved: ") + await r.text();
  } catch (e) { saveStatus.textContent = "not saved: " + e; }
});
window.addEventListener("storage", e => { if (e.key === KEY) { state = JSON.parse(e.newValue || "{}"); paint(); } });
paint();
</script></body></html>
"""
