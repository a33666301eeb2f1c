"""The review page in a real headless Chromium: choices persist across a reload and export as decisions.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.review import render_review

FIXTURE = Path(__file__).parent / "fixtures" / "hymenoptera_small"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the system Chromium is used)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium: apt-get install -y chromium")


def _files() -> tuple[list[str], list[str]]:
    ants = sorted(f"ants/{p.name}" for p in (FIXTURE / "ants").iterdir())
    bees = sorted(f"bees/{p.name}" for p in (FIXTURE / "bees").iterdir())
    return ants, bees


def _audit() -> dict:
    ants, bees = _files()
    return {
        "near_duplicates": [
            {"files": [ants[0], bees[0]], "classes": ["ants", "bees"], "cross_class": True, "similarity": 0.97},
            {"files": [ants[1], ants[2]], "classes": ["ants"], "cross_class": False, "similarity": 0.99},
        ],
        "label_issues": [{"file": bees[1], "given": "bees", "suggested": "ants", "score": 0.93}],
        "outliers": [{"file": ants[3], "score": 0.88}, {"file": bees[1], "score": 0.7}],
        "image_issues": [{"file": ants[4], "issues": ["dark", "blurry"]},
                         {"file": "ants/gone.jpg", "issues": ["dark"]}],  # no longer in the data: a placeholder
        "estimated_noise": {"ants": 0.08, "bees": 0.05},
    }


def test_review_page_persists_choices_and_exports_decisions(tmp_path):
    ants, bees = _files()
    out = render_review(_audit(), lambda f: (FIXTURE / f) if (FIXTURE / f).exists() else None, ["ants", "bees"],
                        tmp_path / "run" / "report" / "review.html", storage_key=str(tmp_path / "run"))
    page_text = out.read_text()
    assert "http://" not in page_text and "https://" not in page_text and "<script src" not in page_text

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(out.as_uri())
            sections = page.eval_on_selector_all("section", "s => s.map(x => x.id)")
            assert sections == ["conflicts", "near_duplicates", "label_issues", "outliers", "quality"]
            # every thumbnail is an <img> that decoded (data: URIs, nothing fetched)
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.src.slice(0, 5), i.naturalWidth])")
            assert len(widths) == 9 and all(src == "data:" and w > 0 for src, w in widths)

            def card(file: str, section: str = "") -> sync_api.Locator:
                return page.locator(f'{"#" + section + " " if section else ""}.card[data-file="{file}"]')

            card(ants[0], "conflicts").locator('button[data-action="exclude"]').click()
            card(bees[0], "conflicts").locator('button[data-action="keep"]').click()
            label_card = card(bees[1], "label_issues")
            assert label_card.locator("select").input_value() == "ants"  # the suggestion is preselected
            label_card.locator('button[data-action="relabel"]').click()
            # one choice per file: the same image in the outliers section shows it too
            assert "relabel" in card(bees[1], "outliers").get_attribute("class")
            card(ants[3], "outliers").locator('button[data-action="exclude"]').click()
            card(ants[3], "outliers").locator('button[data-action="exclude"]').click()  # again = undo

            page.reload()
            assert "exclude" in card(ants[0]).get_attribute("class")
            assert "keep" in card(bees[0]).get_attribute("class")
            assert "relabel" in card(bees[1], "label_issues").get_attribute("class")
            assert card(ants[3]).get_attribute("class") == "card"
            assert page.locator("#count").text_content() == "3 decisions"

            with page.expect_download() as download:
                page.click("#export")
            assert download.value.suggested_filename == "decisions.json"
            saved = tmp_path / "decisions.json"
            download.value.save_as(saved)

            # another run's page does not see these choices
            other = render_review(_audit(), lambda f: None, ["ants", "bees"], tmp_path / "other" / "review.html",
                                  storage_key=str(tmp_path / "other"))
            page.goto(other.as_uri())
            assert page.locator("#count").text_content() == "0 decisions"
        finally:
            browser.close()

    assert json.loads(saved.read_text()) == {"exclude": [ants[0]], "relabel": {bees[1]: "ants"}, "keep": [bees[0]]}
