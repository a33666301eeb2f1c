"""The review page in a real headless Chromium: choices persist across a reload, export as decisions.json,
and `jobs review`'s loopback server saves them into the run folder; its refusals over plain HTTP."""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pages import exported_decisions, horizontal_overflow, launch, needs_chromium, open_page, per_row, sync_api

from jobs.config import RunPaths
from jobs.decisions import parse as parse_decisions
from jobs.errors import JobError
from jobs.fileio import atomic_write_json
from jobs.review import ReviewServer, data_quality_html, render_review, review_server, write_run_review

FIXTURE = Path(__file__).parent / "fixtures" / "hymenoptera_small"
pytestmark = needs_chromium


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
        browser = launch(p)
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(out.as_uri())
            assert page.locator("#save").is_hidden()  # from file:// there is no server to save to
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

            doc = exported_decisions(page, tmp_path)

            # another run's page does not see these choices
            other = render_review(_audit(), lambda f: None, ["ants", "bees"], tmp_path / "other" / "review.html",
                                  storage_key=str(tmp_path / "other"))
            page.goto(other.as_uri())
            assert page.locator("#count").text_content() == "0 decisions"
        finally:
            browser.close()

    assert doc == {"exclude": [ants[0]], "relabel": {bees[1]: "ants"}, "keep": [bees[0]]}


def test_a_long_section_goes_on_over_pages_that_share_the_choices_and_show_only_their_own_thumbnails(tmp_path):
    ants, bees = _files()
    out = tmp_path / "run" / "report" / "review.html"

    def render(max_per_kind: int) -> Path:
        return render_review(_audit(), lambda f: (FIXTURE / f) if (FIXTURE / f).exists() else None,
                             ["ants", "bees"], out, storage_key=str(tmp_path / "run"), max_per_kind=max_per_kind)

    render(1)  # outliers and quality hold two items each: one more page each
    more = sorted(p.name for p in out.parent.glob("review-*.html"))
    assert more == ["review-outliers-2.html", "review-quality-2.html"]
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(out.as_uri())
            shown = page.eval_on_selector_all("#outliers .card", "cs => cs.map(c => c.dataset.file)")
            assert shown == [ants[3]] and page.locator("img").count() == 7  # 2 + 2 + 1 + 1 + 1 cards
            page.locator('#outliers nav a[rel="next"]').first.click()
            page.wait_for_url("**/review-outliers-2.html")
            assert page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.file)") == [bees[1]]
            assert page.locator("#outliers nav").first.text_content() == "previous · page 2 of 2"
            page.locator(f'.card[data-file="{bees[1]}"] button[data-action="exclude"]').click()
            page.locator('nav a[rel="prev"]').first.click()
            page.wait_for_url("**/review.html#outliers")
            assert page.locator("#count").text_content() == "1 decision"  # made on the other page
            assert "exclude" in page.locator(f'#label_issues .card[data-file="{bees[1]}"]').get_attribute("class")
            doc = exported_decisions(page, tmp_path)
        finally:
            browser.close()
    assert doc == {"exclude": [bees[1]], "relabel": {}, "keep": []}
    render(500)  # one page each now: the earlier pages go
    assert not list(out.parent.glob("review-*.html"))


def test_test_images_the_model_abstained_on_join_the_review_by_their_source_path(tmp_path):
    """Evaluate's abstained test images (paths in the run folder) become cards named by source path, most unlike
    the training images first, whose choices export like any other; a run with none has no such section."""
    ants, bees = _files()
    run = tmp_path / "run"
    atomic_write_json(run / "clean_report.json", {"files": [
        {"source": f, "output": f"dataset/{f.replace('.jpg', '-x.jpg')}"} for f in ants + bees]})
    abstained = [{"file": f"dataset/{bees[2].replace('.jpg', '-x.jpg')}", "ood_score": 0.8,
                  "abstain_reason": "low confidence"},
                 {"file": f"dataset/{ants[6].replace('.jpg', '-x.jpg')}", "ood_score": 1.7,
                  "abstain_reason": "unlike the training images"}]
    audit = {**_audit(), "classes": ["ants", "bees"]}
    out = write_run_review(RunPaths(run), audit, abstained)
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_page(browser, out.as_uri())
            assert page.eval_on_selector_all("section", "s => s.map(x => x.id)")[-1] == "abstained"
            cards = page.locator("#abstained .card")
            assert [cards.nth(i).get_attribute("data-file") for i in range(2)] == [ants[6], bees[2]]
            assert "unlike the training images" in cards.nth(0).text_content()
            assert "score 1.700" in cards.nth(0).text_content()
            cards.nth(0).locator('button[data-action="exclude"]').click()
            assert "exclude" in cards.nth(0).get_attribute("class")
            doc = exported_decisions(page, tmp_path)
        finally:
            browser.close()
    assert doc["exclude"] == [ants[6]]
    assert 'id="abstained"' in write_run_review(RunPaths(run), audit).read_text()  # an audit again: evaluate's stay
    assert 'id="abstained"' not in write_run_review(RunPaths(run), audit, []).read_text()


def test_review_page_is_a_grid_that_uses_the_width(tmp_path):
    ants, bees = _files()
    long_name = "ants/" + "a-very-long-file-name-" * 8 + ".jpg"  # no image: a placeholder, and a name to wrap
    audit = {
        "near_duplicates": [{"files": ants[:2], "classes": ["ants"], "cross_class": False, "similarity": 0.99},
                            {"files": ants[2:5], "classes": ["ants"], "cross_class": False, "similarity": 0.98},
                            {"files": bees[:2], "classes": ["bees"], "cross_class": False, "similarity": 0.98}],
        "label_issues": [{"file": f, "given": f.split("/")[0], "suggested": "bees" if f.startswith("ants") else "ants",
                          "score": 0.99 - i / 100} for i, f in enumerate(ants[5:11] + bees[5:11])],
        "outliers": [], "image_issues": [{"file": long_name, "issues": ["dark"]}], "estimated_noise": {},
    }
    out = render_review(audit, lambda f: (FIXTURE / f) if (FIXTURE / f).exists() else None, ["ants", "bees"],
                        tmp_path / "review.html", storage_key=str(tmp_path))
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_page(browser, out.as_uri())
            rows = per_row(page, "#label_issues .card")
            assert sum(rows) == 12 and rows[0] >= 4, rows  # several cards a row at 1280 px, not one column
            assert per_row(page, "#near_duplicates .item")[0] >= 2  # groups side by side
            assert horizontal_overflow(page) == 0
            page.screenshot(path=str(tmp_path / "review-1280.png"), full_page=True)
            narrow = open_page(browser, out.as_uri(), width=420)  # a phone: one column, still no sideways scroll
            assert max(per_row(narrow, "#label_issues .card")) == 1 and horizontal_overflow(narrow) == 0
        finally:
            browser.close()


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    render_review(_audit(), lambda f: FIXTURE / f, ["ants", "bees"], run / "report" / "review.html",
                  storage_key=str(run))
    atomic_write_json(run / "clean_report.json", {"classes": {"ants": {"usable": 5}, "bees": {"usable": 5}},
                                                  "files": []})
    return run


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ReviewServer]:
    server = review_server(_run_folder(tmp_path), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_save_to_run_writes_decisions_json_from_the_browser(served):
    ants, bees = _files()
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto(served.url)
            save = page.locator("#save")
            save.wait_for(state="visible", timeout=10_000)  # shown once this server answered GET /decisions
            page.locator(f'#conflicts .card[data-file="{ants[0]}"] button[data-action="exclude"]').click()
            page.locator(f'#conflicts .card[data-file="{bees[0]}"] button[data-action="keep"]').click()
            label_card = page.locator(f'#label_issues .card[data-file="{bees[1]}"]')
            label_card.locator("select").select_option("ants")
            label_card.locator('button[data-action="relabel"]').click()
            save.click()
            status = page.locator("#save-status")
            status.filter(has_text="saved").wait_for(timeout=10_000)
            assert status.text_content() == f"saved 3 decisions to {served.run_folder / 'decisions.json'}"
            on_disk = json.loads((served.run_folder / "decisions.json").read_text())
            assert on_disk == {"exclude": [ants[0]], "relabel": {bees[1]: "ants"}, "keep": [bees[0]]}

            # a second save replaces the file: undoing the keep drops it
            page.locator(f'#conflicts .card[data-file="{bees[0]}"] button[data-action="keep"]').click()
            save.click()
            status.filter(has_text="saved 2 decisions").wait_for(timeout=10_000)
            on_disk = json.loads((served.run_folder / "decisions.json").read_text())
            assert on_disk == {"exclude": [ants[0]], "relabel": {bees[1]: "ants"}, "keep": []}
        finally:
            browser.close()


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the body is not JSON"),
    (b"\xff\xfe", "the body is not JSON"),
    (b"[" * 100_000, "the body is not JSON"),
    (b"[]", "decisions must be a JSON object"),
    (b'{"exclude": "ants/a.jpg"}', "exclude must be a list of file paths"),
    (b'{"keep": [1]}', "keep must be a list of file paths"),
    (b'{"relabel": ["ants/a.jpg"]}', "relabel must map file paths to class names"),
    (b'{"exclude": [], "delete": []}', "unknown key 'delete'"),
    (b'{"relabel": {"ants/a.jpg": "wasps"}}', "unknown class 'wasps' in relabel; the run's classes are ants, bees"),
    (b'{"exclude": ["ants/a.jpg"], "keep": ["ants/a.jpg"]}', "'ants/a.jpg' is in both exclude and keep"),
])
def test_bad_decisions_get_400_and_leave_the_file_alone(served, body, message):
    before = {"exclude": ["ants/old.jpg"], "relabel": {}, "keep": []}
    atomic_write_json(served.run_folder / "decisions.json", before)
    url = served.url.replace("/review.html", "/decisions")
    r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert message in r.text and "\n" not in r.text
    assert json.loads((served.run_folder / "decisions.json").read_text()) == before


def test_server_refuses_what_is_not_the_page(served):
    base = served.url.removesuffix("/review.html")
    ok = {"exclude": [], "relabel": {"bees/x.jpg": "ants"}, "keep": []}
    assert requests.post(base + "/decisions", data=json.dumps(ok), timeout=10).status_code == 415  # form-encoded
    other_site = {"Origin": "http://example.test", "Content-Type": "application/json"}
    assert requests.post(base + "/decisions", data=json.dumps(ok), headers=other_site, timeout=10).status_code == 403
    assert requests.get(base + "/review.html", headers={"Host": "attacker.test"}, timeout=10).status_code == 403
    assert not (served.run_folder / "decisions.json").exists()
    assert requests.post(base + "/decisions", json=ok, timeout=10).status_code == 200
    assert json.loads((served.run_folder / "decisions.json").read_text()) == ok

    # nothing outside report/ is served: not by "..", not through a symlink
    (served.report / "escape.json").symlink_to(served.run_folder / "clean_report.json")
    host, port = served.server_address[:2]
    for path in ("/../clean_report.json", "/%2e%2e/clean_report.json", "/escape.json", "/nope.html"):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 404, path
        assert b"usable" not in response.read()
        conn.close()
    assert requests.get(base + "/", timeout=10).text == (served.report / "review.html").read_text()


def test_review_server_refuses_to_start_without_a_page_or_off_loopback(tmp_path):
    run = _run_folder(tmp_path)
    with pytest.raises(JobError, match="not a loopback address"):
        review_server(run, host="0.0.0.0", port=0)
    with pytest.raises(JobError, match="run `python -m jobs audit --out"):
        review_server(tmp_path / "empty", port=0)
    taken = review_server(run, port=0)
    try:
        with pytest.raises(JobError, match="is in use; pass another --port"):
            review_server(run, port=taken.server_address[1])
    finally:
        taken.server_close()


def test_data_quality_fragment_counts_each_kind_and_escapes():
    audit = _audit()
    audit["near_duplicates"].append({"files": ["bees/a.jpg", "<b>x</b>/a.jpg", "bees/c.jpg"],
                                     "classes": ["<b>x</b>", "bees"], "cross_class": True})
    audit["estimated_noise"]["<b>x</b>"] = 0.5
    fragment = data_quality_html(audit, {"label_conflict": 5, "label_issue": 1, "decision": 0},
                                 review_href='review.html?a="1"')
    rows = re.findall(r"<tr><td>([^<]*)</td><td>(\d+)</td><td>([^<]*)</td></tr>", fragment)
    assert rows == [("cross-class conflicts (groups of one image under several classes)", "2", "5 images"),
                    ("near-duplicate groups within one class", "1", "2 images"),
                    ("label issues", "1", ""), ("outliers", "2", ""),
                    ("image-quality flags (images)", "2", "blurry 1, dark 2")]
    assert "<tr><td>ants</td><td>8.0%</td></tr>" in fragment
    assert "<tr><td>&lt;b&gt;x&lt;/b&gt;</td><td>50.0%</td></tr>" in fragment and "<b>x" not in fragment
    assert ("<p>test accuracy on a leakage-free split: near-duplicate groups are kept within one split; "
            "5 images excluded in cross-class conflicts, 1 image excluded as label issues</p>") in fragment
    assert '<a href="review.html?a=&quot;1&quot;">' in fragment


def test_data_quality_fragment_of_a_clean_audit():
    fragment = data_quality_html({"near_duplicates": [], "label_issues": [], "outliers": [], "image_issues": [],
                                  "estimated_noise": {}}, {})
    assert "kept within one split; no image excluded</p>" in fragment
    assert "not estimated" in fragment and '<a href="review.html">' in fragment


def test_data_quality_fragment_says_which_classes_were_not_judged_against_each_other():
    audit = _audit()
    audit["label_check"] = {"judged": True, "pairs_not_judged": [
        {"classes": ["rings", "<i>t</i>"], "skill": 0.1, "issues_withheld": 15927}]}
    fragment = data_quality_html(audit, {})
    assert "<tr><td>ants</td><td>8.0%</td></tr>" in fragment
    assert ("<p>rings and &lt;i&gt;t&lt;/i&gt; not estimated (the features cannot tell them apart, skill 0.10: "
            "15927 issues withheld).</p>") in fragment


def test_captured_images_are_labelled_with_a_class_typed_in_or_excluded(tmp_path):
    """A captured group (``jobs review --captured``): a card is labelled with an existing class or a new one typed
    in, or excluded; the export names it captured:<path>, which the server's check accepts with the new class."""
    ants, _ = _files()
    cards = [{"file": f"captured:{name}", "distance": 0.4 - i / 10, "why": "abstained", "answered": "ants",
              "probability": 0.5, "abstain_reason": "unlike the training images", "ood_score": 1.2,
              "answered_at": "2026-12-04T10:15:00+00:00", "model_version": "1.0"}
             for i, name in enumerate(["a-0.jpg", "b-0.jpg", "c-0.jpg"])]
    captured = {"folder": str(FIXTURE / "ants"), "captures": 3, "unreadable": [],
                "groups": [{"mean_distance": 0.3, "cards": cards}]}
    out = render_review(_audit(), lambda f: FIXTURE / "ants" / Path(ants[0]).name, ["ants", "bees"],
                        tmp_path / "review.html", storage_key=str(tmp_path), captured=captured)
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_page(browser, out.as_uri())
            assert page.eval_on_selector_all("section", "s => s.map(x => x.id)")[0] == "captured"

            def card(name: str) -> sync_api.Locator:
                return page.locator(f'#captured .card[data-file="captured:{name}"]')

            card("a-0.jpg").locator('button[data-action="relabel"]').click()  # no class typed: no choice yet
            assert page.locator("#count").text_content() == "0 decisions"
            card("a-0.jpg").locator("input.class-name").fill("tulips")
            card("a-0.jpg").locator('button[data-action="relabel"]').click()
            card("b-0.jpg").locator("input.class-name").fill("bees")
            card("b-0.jpg").locator('button[data-action="relabel"]').click()
            card("c-0.jpg").locator('button[data-action="exclude"]').click()
            page.reload()
            assert card("a-0.jpg").locator("input.class-name").input_value() == "tulips"
            doc = exported_decisions(page, tmp_path)
        finally:
            browser.close()
    assert doc == {"exclude": ["captured:c-0.jpg"], "relabel": {"captured:a-0.jpg": "tulips",
                                                                "captured:b-0.jpg": "bees"}, "keep": []}
    assert parse_decisions(doc, "the body", ["ants", "bees"]).captured_labels() == {"a-0.jpg": "tulips",
                                                                                    "b-0.jpg": "bees"}
