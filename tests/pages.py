"""Helpers for tests of the report and review pages.

Headless Chromium is the system browser through Playwright (never a downloaded one): ``launch(p)``
inside ``with sync_api.sync_playwright() as p``, then ``open_page``; ``horizontal_overflow`` and
``per_row`` measure what a person sees at the window's width. ``split_counts_from_file`` is what
the pages must show, counted straight from splits.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDTH = 1280

try:
    from playwright import sync_api
except ImportError:  # the tests that need it skip; the rest of this module still serves
    sync_api = None
needs_chromium = pytest.mark.skipif(sync_api is None or not Path(CHROMIUM).exists(),
                                    reason="needs playwright (pip) and Chromium (apt-get install -y chromium)")


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


def open_page(browser, url: str, width: int = WIDTH, **kwargs):
    page = browser.new_page(viewport={"width": width, "height": 900}, **kwargs)
    page.goto(url)
    return page


def exported_decisions(page, folder: Path) -> dict:
    """Click the page's export button and read the decisions.json it downloads (saved into ``folder``)."""
    with page.expect_download() as download:
        page.click("#export")
    assert download.value.suggested_filename == "decisions.json"
    saved = folder / "decisions.json"
    download.value.save_as(saved)
    return json.loads(saved.read_text())


def horizontal_overflow(page) -> int:
    """Pixels the page is wider than its window (0: nothing to scroll sideways)."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def per_row(page, selector: str) -> list[int]:
    """How many of the elements matching ``selector`` sit on each visual row, top to bottom."""
    tops = page.eval_on_selector_all(selector, "els => els.map(e => Math.round(e.getBoundingClientRect().top))")
    rows: dict[int, int] = {}
    for top in tops:
        rows[top] = rows.get(top, 0) + 1
    return [rows[t] for t in sorted(rows)]


def split_counts_from_file(splits_file: Path) -> dict[str, dict[str, int]]:
    """Class -> images per split, from splits.json's ``files`` (``dataset/<class>/<name>: split``)."""
    counts: dict[str, dict[str, int]] = {}
    for path, which in json.loads(splits_file.read_text())["files"].items():
        counts.setdefault(Path(path).parts[1], {"train": 0, "val": 0, "test": 0})[which] += 1
    return counts
