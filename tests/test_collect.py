"""The collect stage against a real HTTP server on 127.0.0.1 (tests/fake_image_api.py): no mocked HTTP.

Covers the three search API shapes, the downloader's hostile cases, SSRF refusals (a redirect to
10.0.0.1 is refused before any connection: an audit hook watches every socket.connect), pacing of
API requests, dedupe by content, resume after SIGKILL of a real ``python -m jobs collect``, and the
attribution/preview files.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_IMAGES, REPO, TINY_ARCH, run_job
from fake_image_api import DRIP, DRIP_SECONDS, HOSTILE, OPT_OUT, PRIVATE_TARGET, FakeImageAPI
from PIL import Image

from jobs.collect import collect, contact_sheet
from jobs.collect.download import DownloadSettings
from jobs.collect.netsafety import AddressPolicy, UnsafeURL, make_pool_manager
from jobs.collect.preview import CELL, GAP, PANELS_PER_ROW, TITLE_H
from jobs.collect.sources import CollectError
from jobs.collect.store import Manifest, term_folder_name
from jobs.config import RunPaths, load_config

LOOPBACK_ONLY = AddressPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
MANIFEST_FIELDS = {"url", "final_url", "sha256", "size", "width", "height", "format", "source", "license",
                   "license_url", "creator", "title", "landing_url", "fetched_at", "status", "error"}
IMAGE_SUFFIXES = {".jpg", ".png", ".gif", ".webp", ".bmp", ".tif"}


class ConnectWatch:
    """Records the address of every socket.connect in this process while active (sys audit hook)."""

    def __init__(self) -> None:
        self.active = False
        self.addresses: list[object] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event == "socket.connect":
            self.addresses.append(args[1])


CONNECTS = ConnectWatch()


@pytest.fixture
def server():
    with FakeImageAPI(FIXTURE_IMAGES) as srv:
        yield srv


def make_cfg(server: FakeImageAPI, **overrides):
    values = {"terms": "ants,bees", "endpoint": server.url, "allow_private_addresses": True,
              "requests_per_minute": 600, "images_per_term": 5, **overrides}
    return load_config(None, values)


def fast(cfg, **overrides) -> DownloadSettings:
    """Short timeouts and backoff so the hostile cases take seconds, not minutes."""
    return DownloadSettings.from_config(cfg, **{"read_timeout": 0.5, "connect_timeout": 2.0, "backoff": 0.05,
                                                "download_timeout": 10.0, **overrides})


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)


def latest(raw: Path, term: str) -> dict[str, dict]:
    """The last manifest entry per URL (the manifest must parse line by line)."""
    lines = (raw / term / "manifest.jsonl").read_text().splitlines()
    return {e["url"]: e for e in map(json.loads, lines)}


def leftovers(raw: Path) -> list[Path]:
    return [p for p in raw.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]


# -- the happy path ------------------------------------------------------------------------------

def test_openverse_collect_writes_images_manifest_attribution_preview(server, tmp_path):
    cfg = make_cfg(server, images_per_term=6)
    summary = collect(cfg, RunPaths(tmp_path))
    raw = tmp_path / "raw"

    for term in ("ants", "bees"):
        files = images(raw / term)
        assert len(files) == 6
        entries = latest(raw, term)
        assert [e["status"] for e in entries.values()] == ["ok"] * 6
        for path in files:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert path.name == f"{digest[:16]}.jpg"
            entry = next(e for e in entries.values() if e["file"] == path.name)
            assert MANIFEST_FIELDS <= set(entry)
            with Image.open(path) as img:
                assert (entry["width"], entry["height"], entry["format"]) == (*img.size, "JPEG")
            assert entry["sha256"] == digest and entry["size"] == path.stat().st_size
            assert entry["license"] == "CC BY 2.0" and entry["creator"].startswith("Photographer")
            assert entry["landing_url"].startswith(server.url) and entry["error"] is None
            assert entry["url"] == entry["final_url"] and entry["fetched_at"]
        counts = {k: summary["terms"][term][k] for k in ("downloaded", "kept", "duplicate", "failed")}
        assert counts == {"downloaded": 6, "kept": 6, "duplicate": 0, "failed": {}}

    api = server.api_requests()
    assert {r.query["q"] for r in api} == {"ants", "bees"}
    assert all(r.query["license_type"] == "commercial,modification" and int(r.query["page_size"]) <= 20 for r in api)

    rows = json.loads((raw / "attribution.json").read_text())
    assert len(rows) == 12 and {r["term"] for r in rows} == {"ants", "bees"}
    assert all((raw / r["file"]).is_file() and r["license"] == "CC BY 2.0" and r["creator"] for r in rows)
    assert set(rows[0]) == {"term", "file", "creator", "license", "license_url", "source", "landing_url", "title"}
    md = (raw / "ATTRIBUTION.md").read_text()
    assert "## ants (6 images)" in md and "## bees (6 images)" in md and rows[0]["file"] in md
    with Image.open(raw / "collect_preview.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > sheet.height  # two class panels side by side
    assert not leftovers(raw)
    assert Path(summary["preview"]).is_file() and Path(summary["attribution_json"]).is_file()


def test_rerun_downloads_nothing_new_and_removes_crash_leftovers(server, tmp_path):
    cfg = make_cfg(server, terms="ants")
    collect(cfg, RunPaths(tmp_path))
    ants = tmp_path / "raw" / "ants"
    before = images(ants)
    (ants / ".0123456789abcdef.jpg.x.part").write_bytes(b"half a download")
    (ants / "0123456789abcdef.jpg").write_bytes(before[0].read_bytes())  # renamed, but no manifest line yet
    n_api, n_img = len(server.api_requests()), len(server.requests_to("/img/"))

    summary = collect(cfg, RunPaths(tmp_path))
    assert images(ants) == before and not leftovers(tmp_path / "raw")
    assert len(server.api_requests()) == n_api and len(server.requests_to("/img/")) == n_img
    assert summary["terms"]["ants"]["already_had"] == 5 and summary["terms"]["ants"]["downloaded"] == 0

    more = collect(make_cfg(server, terms="ants", images_per_term=8), RunPaths(tmp_path))
    assert more["terms"]["ants"]["downloaded"] == 3 and len(images(ants)) == 8
    assert len(server.requests_to("/img/")) == n_img + 3


def test_rerun_retries_only_what_failed_and_retry_all_the_permanent_ones(server, tmp_path):
    """A URL failing all through one run (6 times) is kept by the next; nothing kept is downloaded again."""
    good = [f"/img/ants/{k}.jpg" for k in range(4)]
    flaky = "/h/fails/6/5.jpg"
    server.catalog = {"ants": [*good, flaky, "/h/404.jpg"]}
    cfg = make_cfg(server, terms="ants", images_per_term=6)
    first = collect(cfg, RunPaths(tmp_path), settings=fast(cfg, retries=5))
    assert first["terms"]["ants"]["kept"] == 4 and first["terms"]["ants"]["failed"] == {"http 503": 1, "http 404": 1}
    assert len(server.requests_to(flaky)) == 6
    entry = latest(tmp_path / "raw", "ants")[server.url + flaky]
    assert entry["status"] == "failed" and entry["retryable"] and not entry["permanent"]
    counts = {path: len(server.requests_to(path)) for path in [*good, "/h/404.jpg"]}

    second = collect(cfg, RunPaths(tmp_path), settings=fast(cfg, retries=5))
    assert len(server.requests_to(flaky)) == 7
    assert latest(tmp_path / "raw", "ants")[server.url + flaky]["status"] == "ok"
    assert {path: len(server.requests_to(path)) for path in counts} == counts  # nothing else fetched again
    ants = second["terms"]["ants"]
    assert (ants["kept"], ants["downloaded"], ants["retried"], ants["retried_kept"], ants["skipped_failed"]) == (
        5, 1, 1, 1, 1)
    report = json.loads((tmp_path / "raw" / "collect_report.json").read_text())
    assert report["terms"]["ants"]["retried_kept"] == 1 and report["sources"]["openverse:flickr"]["tried"] == 1

    proc = run_job("collect", "--out", str(tmp_path), "--terms", "ants", "--images-per-term", "6", "--endpoint",
                   server.url, "--allow-private-addresses", "--requests-per-minute", "600", "--retry-all")
    assert len(server.requests_to("/h/404.jpg")) == counts["/h/404.jpg"] + 1  # --retry-all: the permanent one too
    assert {path: len(server.requests_to(path)) for path in good} == {p: counts[p] for p in good}
    assert "retried 1 earlier failures (0 kept), skipped 0 permanent ones" in proc.stdout
    assert "failed by reason: http 404: 1 (of 1 tried)" in proc.stdout


def test_collect_report_counts_failures_by_reason_and_source(server, tmp_path):
    server.catalog = {"ants": ["/img/ants/0.jpg", "/h/404.jpg", "/h/fails/9/1.jpg", "/h/page.html"],
                      "bees": ["/img/bees/0.jpg", "/h/404.jpg?b"]}
    cfg = make_cfg(server, images_per_term=4)
    summary = collect(cfg, RunPaths(tmp_path), settings=fast(cfg, retries=0))
    report = json.loads((tmp_path / "raw" / "collect_report.json").read_text())
    assert report["failed_by_reason"] == {"http 404": 2, "http 503": 1, "not an image": 1}
    assert report["sources"] == {"openverse:flickr": {"tried": 6, "kept": 2, "duplicate": 0, "failed": {
        "http 404": 2, "http 503": 1, "not an image": 1}}}
    assert report["terms"]["bees"]["failed"] == {"http 404": 1} and report["kept"] == {"ants": 1, "bees": 1}
    assert summary["report"] == str(tmp_path / "raw" / "collect_report.json")


@pytest.mark.parametrize(("licenses", "expected"), [
    ("by,cc0", {"license": "by,cc0"}),
    ("commercial", {"license_type": "commercial"}),
    ("", {}),
])
def test_openverse_license_filter(server, tmp_path, licenses, expected):
    collect(make_cfg(server, terms="ants", images_per_term=1, licenses=licenses), RunPaths(tmp_path))
    query = server.api_requests()[0].query
    assert {k: v for k, v in query.items() if k in ("license", "license_type")} == expected


def test_mixed_license_filter_is_one_clear_error(server, tmp_path):
    with pytest.raises(CollectError, match="licenses"):
        collect(make_cfg(server, licenses="by,commercial"), RunPaths(tmp_path))


def test_same_image_under_two_urls_and_two_terms_is_stored_once(server, tmp_path):
    server.catalog = {"ants": ["/img/ants/0.jpg", "/h/dup.jpg", "/img/ants/1.jpg"],
                      "bees": ["/img/ants/0.jpg", "/img/bees/0.jpg"]}
    summary = collect(make_cfg(server, images_per_term=3), RunPaths(tmp_path))
    raw = tmp_path / "raw"

    ants0 = hashlib.sha256(server.photo("ants", 0)).hexdigest()
    everywhere = [p for p in raw.glob("*/*") if p.suffix in IMAGE_SUFFIXES]
    assert len(everywhere) == 3 and sum(p.name.startswith(ants0[:16]) for p in everywhere) == 1
    ants, bees = latest(raw, "ants"), latest(raw, "bees")
    copies = [ants[f"{server.url}{path}"] for path in ("/img/ants/0.jpg", "/h/dup.jpg")]
    assert sorted(e["status"] for e in copies) == ["duplicate", "ok"]  # whichever verified first is kept
    assert {e["sha256"] for e in copies} == {ants0}
    assert bees[f"{server.url}/img/ants/0.jpg"]["status"] == "duplicate"
    assert bees[f"{server.url}/img/ants/0.jpg"]["file"] == f"../ants/{ants0[:16]}.jpg"
    assert summary["terms"]["ants"]["kept"] == 2 and summary["terms"]["bees"]["kept"] == 1
    assert summary["terms"]["bees"]["duplicate"] == 1
    assert {r["file"] for r in json.loads((raw / "attribution.json").read_text())} == {
        f"{p.parent.name}/{p.name}" for p in everywhere}


# -- hostile servers -----------------------------------------------------------------------------

MALFORMED = ["http://[::1/x.jpg", f"http://{'a' * 70}.example/x.jpg", "javascript:alert(1)"]


def test_hostile_responses_are_failed_with_a_reason_and_transient_ones_retried_on_rerun(server, tmp_path):
    server.catalog = {"hostile": list(HOSTILE.values()) + MALFORMED}
    server.slow_seconds = 2.0
    cfg = make_cfg(server, terms="hostile", images_per_term=len(server.catalog["hostile"]), max_download_mb=1)
    CONNECTS.active = True
    try:
        collect(cfg, RunPaths(tmp_path), settings=fast(cfg), policy=LOOPBACK_ONLY)
    finally:
        CONNECTS.active = False
    raw = tmp_path / "raw"
    entries = latest(raw, "hostile")
    by_case = {case: entries[server.url + path] for case, path in HOSTILE.items()}

    def failed(case: str) -> tuple[str, bool]:
        entry = by_case[case]
        assert entry["status"] == "failed" and "\n" not in entry["error"]
        return entry["error"].split(":", 1)[0], entry["retryable"]

    assert failed("404") == ("http 404", False)
    assert failed("slow") == ("timeout", True)
    assert failed("endless") == ("too large", False)
    assert failed("to_file") == ("refused", False) and "file:" in by_case["to_file"]["error"]
    assert all(entries[url]["status"] == "failed" and entries[url]["error"].startswith("refused")
               for url in MALFORMED)
    assert failed("html_as_jpeg") == ("not an image", False)
    assert failed("html") == ("not an image", False) and "text/html" in by_case["html"]["error"]
    assert failed("loop") == ("redirect loop", False)
    assert failed("long_chain") == ("too many redirects", False)
    assert failed("truncated") == ("corrupt image", False)
    assert failed("to_private") == ("refused", False) and "10.0.0.1" in by_case["to_private"]["error"]
    private_host = ipaddress.ip_address(PRIVATE_TARGET.split("/")[2])
    assert CONNECTS.addresses and not [a for a in CONNECTS.addresses
                                       if isinstance(a, tuple) and a[0] == str(private_host)]

    # retried within the run: 500 then 200, and 429 + Retry-After: 1 then 200 (waiting at least 1 s)
    assert by_case["flaky"]["status"] == "ok" and len(server.requests_to("/h/flaky.jpg")) == 2
    first, second = server.requests_to("/h/429.jpg")
    assert by_case["429"]["status"] == "ok" and second.time - first.time >= 0.9
    # decided by content, not by the name: a PNG served as .jpg is kept as .png
    assert by_case["png_named_jpg"]["format"] == "PNG" and by_case["png_named_jpg"]["file"].endswith(".png")
    # the same photo behind a 2-hop redirect and under another URL: one kept, one duplicate
    assert sorted([by_case["short_chain"]["status"], by_case["dup"]["status"]]) == ["duplicate", "ok"]
    assert by_case["short_chain"]["final_url"].endswith("/h/chain/0")
    assert len(images(raw / "hostile")) == 4 and not leftovers(raw)

    server.slow_seconds = 0.0  # the transient failure goes away; permanent ones are not fetched again
    counts = {path: len(server.requests_to(path)) for path in HOSTILE.values()}
    collect(cfg, RunPaths(tmp_path), settings=fast(cfg), policy=LOOPBACK_ONLY)
    assert latest(raw, "hostile")[server.url + HOSTILE["slow"]]["status"] in ("ok", "duplicate")
    for case in ("404", "truncated", "html", "loop"):  # permanent: not fetched again
        assert len(server.requests_to(HOSTILE[case])) == counts[HOSTILE[case]]
    assert len(server.requests_to(HOSTILE["to_private"])) > counts[HOSTILE["to_private"]]  # refusal depends on config


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_one_byte_drip_is_abandoned_at_download_timeout(server, tmp_path, where):
    """1 byte every 2 s never trips a per-read timeout; the whole-download deadline still holds."""
    server.catalog = {"ants": [DRIP[where], "/img/ants/0.jpg"]}
    cfg = make_cfg(server, terms="ants", images_per_term=2, download_timeout=4)
    started = time.monotonic()
    summary = collect(cfg, RunPaths(tmp_path))
    elapsed = time.monotonic() - started
    assert DownloadSettings.from_config(cfg).read_timeout > DRIP_SECONDS  # so only the deadline can end it
    entry = latest(tmp_path / "raw", "ants")[server.url + DRIP[where]]
    assert entry["status"] == "failed" and entry["retryable"] and "download_timeout=4 s" in entry["error"]
    assert summary["terms"]["ants"]["kept"] == 1 and summary["terms"]["ants"]["failed"] == {"timeout": 1}
    assert len(server.requests_to(DRIP[where])) == 1  # the deadline covers retries: no second attempt
    assert elapsed < cfg.download_timeout + 4.0, f"collect took {elapsed:.1f} s"


def test_x_robots_tag_opt_outs_are_not_kept(server, tmp_path):
    server.catalog = {"ants": list(OPT_OUT)}
    summary = collect(make_cfg(server, terms="ants", images_per_term=len(OPT_OUT)), RunPaths(tmp_path / "a"))
    entries = latest(tmp_path / "a" / "raw", "ants")
    status = {path: entries[server.url + path]["status"] for path in OPT_OUT}
    opted_out = {p for p, s in status.items() if s == "failed"}
    assert opted_out == {"/h/robots/noai.jpg", "/h/robots/two-lines.jpg", "/h/robots/noindex-nofollow.jpg",
                         "/h/robots/our-bot.jpg"}
    assert "X-Robots-Tag noai" in entries[server.url + "/h/robots/noai.jpg"]["error"]
    assert "noimageai" in entries[server.url + "/h/robots/two-lines.jpg"]["error"]
    assert summary["terms"]["ants"]["failed"] == {"opted out": 4} and summary["failed_by_reason"] == {"opted out": 4}
    assert len(images(tmp_path / "a" / "raw" / "ants")) == 1  # other-bot and harmless: the same photo, kept once
    # the key sets the list; empty turns the check off
    only_noai = collect(make_cfg(server, terms="ants", images_per_term=len(OPT_OUT),
                                 disallowed_header_directives="noai"), RunPaths(tmp_path / "b"))
    assert only_noai["terms"]["ants"]["failed"] == {"opted out": 2}  # noai.jpg and our-bot.jpg
    off = collect(make_cfg(server, terms="ants", images_per_term=len(OPT_OUT), disallowed_header_directives=""),
                  RunPaths(tmp_path / "c"))
    assert off["terms"]["ants"]["failed"] == {} and off["kept"] == {"ants": 1}


def test_default_policy_refuses_loopback_image_urls_without_requesting_them(server, tmp_path):
    cfg = make_cfg(server, terms="ants", images_per_term=3, allow_private_addresses=False)
    summary = collect(cfg, RunPaths(tmp_path))
    assert summary["terms"]["ants"]["kept"] == 0 and summary["terms"]["ants"]["failed"]["refused"] >= 3
    assert server.requests_to("/img/") == []
    entry = next(iter(latest(tmp_path / "raw", "ants").values()))
    assert "loopback" in entry["error"] and "allow_private_addresses" in entry["error"]
    assert summary["preview"] is None and not (tmp_path / "raw" / "collect_preview.png").exists()  # nothing to show


@pytest.mark.parametrize("url", [
    "http://localhost/x.jpg", "http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0x7f000001/",
    "http://[::1]/", "http://[::ffff:10.0.0.1]/", "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/", "http://0.0.0.0/", "http://224.0.0.1/",
    "http://[fe80::1]/", "file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/", "http:///nohost",
])
def test_check_url_refuses_non_public_addresses_and_schemes(url):
    with pytest.raises(UnsafeURL, match="refused"):
        AddressPolicy().check_url(url)


def test_check_url_allows_public_addresses_and_the_allow_switch():
    AddressPolicy().check_url("https://93.184.216.34/photo.jpg")  # a literal: nothing is resolved or connected
    AddressPolicy(allow_private=True).check_url("http://10.0.0.1/x")
    LOOPBACK_ONLY.check_url("http://127.0.0.1:8080/x")
    with pytest.raises(UnsafeURL):
        LOOPBACK_ONLY.check_url(PRIVATE_TARGET)


def test_session_checks_the_address_again_at_connect_time(server):
    """What a DNS answer that changed after check_url would meet: the connection itself refuses."""
    with pytest.raises(UnsafeURL, match="loopback"):
        make_pool_manager(AddressPolicy(), "test", 1).request("GET", f"{server.url}/img/ants/0.jpg", timeout=5)
    assert server.requests_to("/img/") == []
    assert make_pool_manager(LOOPBACK_ONLY, "test", 1).request(
        "GET", f"{server.url}/img/ants/0.jpg", timeout=5).status == 200


def test_concurrent_requests_per_host_are_limited(server, tmp_path):
    server.image_delay = 0.3
    cfg = make_cfg(server, terms="ants", images_per_term=8, download_workers=8)
    collect(cfg, RunPaths(tmp_path / "a"), settings=fast(cfg, per_host=2))
    assert 1 <= server.max_in_flight <= 2
    server.max_in_flight = 0
    collect(cfg, RunPaths(tmp_path / "b"), settings=fast(cfg, per_host=8))
    assert server.max_in_flight > 2  # the server does see parallel downloads when allowed


# -- search APIs ---------------------------------------------------------------------------------

def test_api_requests_are_paced(server, tmp_path):
    server.page_limit = 2  # 8 images take 4 API pages
    collect(make_cfg(server, terms="ants", images_per_term=8, requests_per_minute=120), RunPaths(tmp_path))
    times = [r.time for r in server.api_requests()]
    assert len(times) >= 4
    # 120/min = one every 0.5 s: any 1 s window holds at most 3 (an unpaced client sends all 4 at once)
    assert max(sum(t <= u < t + 1.0 for u in times) for t in times) <= 3


def test_api_429_retry_after_is_honoured(server, tmp_path):
    server.api_429_first = True
    summary = collect(make_cfg(server, terms="ants", images_per_term=3), RunPaths(tmp_path))
    first, second = server.api_requests()[:2]
    assert second.time - first.time >= 0.9 and summary["terms"]["ants"]["kept"] == 3


def test_wikimedia_source(server, tmp_path):
    cfg = make_cfg(server, source="wikimedia", terms="ants", images_per_term=4)
    collect(cfg, RunPaths(tmp_path))
    query = server.api_requests()[0].query
    assert query["action"] == "query" and query["generator"] == "search" and query["gsrnamespace"] == "6"
    assert query["prop"] == "imageinfo" and "extmetadata" in query["iiprop"] and "ants" in query["gsrsearch"]
    assert all(r.headers["User-Agent"] == cfg.user_agent for r in server.requests)
    rows = json.loads((tmp_path / "raw" / "attribution.json").read_text())
    assert len(rows) == 4 and all(r["license"] == "CC BY-SA 4.0" and r["source"] == "wikimedia" for r in rows)
    assert all(r["creator"].startswith("Jane & Doe") and "<" not in r["creator"] for r in rows)
    assert server.requests_to("/h/404.jpg") == []  # the SVG result was skipped


def test_bing_compatible_source(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_BING_KEY", server.api_key)
    cfg = make_cfg(server, source="bing", terms="bees", images_per_term=3, api_key_env="TEST_BING_KEY")
    summary = collect(cfg, RunPaths(tmp_path))
    request = server.api_requests()[0]
    assert request.path == "/v7.0/images/search" and request.headers["Ocp-Apim-Subscription-Key"] == server.api_key
    assert request.query["license"] == "ModifyCommercially" and request.query["imageType"] == "Photo"
    assert summary["terms"]["bees"]["kept"] == 3

    monkeypatch.setenv("TEST_BING_KEY", "wrong")
    refused = collect(make_cfg(server, source="bing", terms="ants", api_key_env="TEST_BING_KEY"),
                      RunPaths(tmp_path / "wrong"))
    assert "HTTP 401" in refused["terms"]["ants"]["search_error"] and refused["terms"]["ants"]["kept"] == 0

    monkeypatch.delenv("TEST_BING_KEY")
    with pytest.raises(CollectError, match="TEST_BING_KEY"):
        collect(cfg, RunPaths(tmp_path))
    with pytest.raises(CollectError, match="endpoint"):
        collect(load_config(None, {"source": "bing"}), RunPaths(tmp_path))


def test_an_endpoint_that_is_not_the_api_is_reported_not_a_crash(server, tmp_path):
    cfg = make_cfg(server, terms="ants", endpoint=f"{server.url}/img/ants/0.jpg")
    summary = collect(cfg, RunPaths(tmp_path))
    assert "did not return JSON" in summary["terms"]["ants"]["search_error"]
    assert summary["terms"]["ants"]["kept"] == 0 and (tmp_path / "raw" / "attribution.json").is_file()
    # The command, unlike the function, fails when nothing at all was collected.
    proc = subprocess.run([sys.executable, "-m", "jobs", "collect", "--out", str(tmp_path / "cli"), "--terms", "ants",
                           "--endpoint", cfg.endpoint, "--allow-private-addresses"], capture_output=True, text=True)
    assert proc.returncode == 2 and "did not return JSON" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no images collected for any of ['ants']")


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_urls_source(server, tmp_path, layout):
    urls = {"ants": [f"{server.url}/img/ants/{k}.jpg" for k in range(3)], "bees": [f"{server.url}/img/bees/0.jpg"]}
    if layout == "file":  # classes interleaved, one URL listed twice, a header and a comment
        listing = tmp_path / "urls.csv"
        rows = [("ants", urls["ants"][0]), ("bees", urls["bees"][0]), *(("ants", u) for u in urls["ants"])]
        listing.write_text("class,url\n# a comment\n" + "".join(f"{c},{u}\n" for c, u in rows))
    else:
        listing = tmp_path / "lists"
        listing.mkdir()
        for c, us in urls.items():
            (listing / f"{c}.txt").write_text("\n".join(us) + "\n")
    cfg = make_cfg(server, source="urls", urls_file=str(listing), terms="ignored")
    summary = collect(cfg, RunPaths(tmp_path / "out"))
    assert {t: s["kept"] for t, s in summary["terms"].items()} == {"ants": 3, "bees": 1}
    assert server.api_requests() == []
    assert {t: s["wanted"] for t, s in summary["terms"].items()} == {"ants": 3, "bees": 1}  # distinct URLs
    with pytest.raises(CollectError, match="urls_file"):
        collect(make_cfg(server, source="urls", urls_file=str(tmp_path / "missing.csv")), RunPaths(tmp_path))
    bad = tmp_path / "bad.csv"
    bad.write_text(f"ants,{urls['ants'][0]}\nno comma here\n")
    with pytest.raises(CollectError, match=r"bad.csv:2: expected 'class,url'"):
        collect(make_cfg(server, source="urls", urls_file=str(bad)), RunPaths(tmp_path))


# -- small parts ---------------------------------------------------------------------------------

def test_manifest_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"url": "http://a/1", "status": "ok"}\n{"url": "http://a/2", "sta')
    manifest = Manifest(path)
    assert list(manifest.latest) == ["http://a/1"]
    manifest.append({"url": "http://a/3", "status": "failed"})
    assert list(Manifest(path).latest) == ["http://a/1", "http://a/3"]


def test_term_folder_names():
    assert term_folder_name("golden retriever") == "golden retriever"
    assert term_folder_name("cats/dogs") == "cats_dogs"
    with pytest.raises(CollectError, match="terms"):
        term_folder_name("..")


def test_contact_sheet_layout_and_broken_files(tmp_path):
    photos = sorted((FIXTURE_IMAGES / "ants").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = contact_sheet({"many": photos + photos, "broken": [broken], "empty": []}, tmp_path / "sheet.png")
    panel_w = 4 * (CELL + GAP) + GAP
    panel_h = TITLE_H + 4 * (CELL + GAP) + GAP
    with Image.open(out) as sheet:
        assert sheet.size == (3 * (panel_w + GAP) + GAP, panel_h + 2 * GAP)
        assert PANELS_PER_ROW >= 3
        x0, y0 = GAP + panel_w + GAP + GAP, GAP + TITLE_H + GAP  # first cell of the "broken" panel
        red, green, blue = sheet.convert("RGB").getpixel((x0 + CELL // 2, y0 + CELL // 2))
        assert red > 150 and green < 100 and blue < 100  # drawn as a red cross, not a crash
    assert io.BytesIO(out.read_bytes()).read(8) == b"\x89PNG\r\n\x1a\n"


# -- the real command line -----------------------------------------------------------------------

def _collect_cmd(server: FakeImageAPI, out: Path) -> list[str]:
    return ["collect", "--terms", "ants,bees", "--out", str(out), "--endpoint", server.url,
            "--allow-private-addresses", "--images-per-term", "12", "--requests-per-minute", "600",
            "--download-workers", "2"]


def _image_sets(raw: Path) -> dict[str, list[str]]:
    return {term: [p.name for p in images(raw / term)] for term in ("ants", "bees")}


def test_collect_killed_with_sigkill_then_rerun_matches_an_uninterrupted_run(server, tmp_path):
    server.image_delay = 0.15
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", *_collect_cmd(server, killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "raw" / "ants" / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    folders = [killed / "raw" / term for term in ("ants", "bees")]
    assert sum(len(images(f)) for f in folders if f.exists()) < 24  # killed mid-run
    # what a kill can leave besides: an image mid-write, the attribution or report mid-write
    (killed / "raw" / "ants" / ".0123456789abcdef.jpg.4242.part").write_bytes(b"half an image")
    (killed / "raw" / ".attribution.json.x1y2.part").write_text("[")
    (killed / "raw" / ".collect_report.json.x3y4.part").write_text("{")

    run_job(*_collect_cmd(server, killed))
    run_job(*_collect_cmd(server, tmp_path / "straight"))
    assert _image_sets(killed / "raw") == _image_sets(tmp_path / "straight" / "raw")
    assert all(len(names) == 12 for names in _image_sets(killed / "raw").values())
    assert not leftovers(killed / "raw")
    for term in ("ants", "bees"):
        lines = (killed / "raw" / term / "manifest.jsonl").read_text().splitlines()
        assert all(json.loads(line)["url"] for line in lines)


def test_collect_deadline_stops_cleanly_and_the_same_command_finishes(server, tmp_path):
    out = tmp_path / "run"
    cmd = [*_collect_cmd(server, out), "--collect-deadline-minutes", "0.05"]  # 3 s
    server.image_delay = 1.0  # 24 images, 2 at a time: about 12 s, far past the deadline
    started = time.monotonic()
    stopped = run_job(*cmd, check=False)
    elapsed = time.monotonic() - started
    assert stopped.returncode == 2 and elapsed < 3 + 6, (elapsed, stopped.stdout, stopped.stderr)
    assert "collect stopped: collect_deadline_minutes=0.05 passed; still short: ants " in stopped.stdout
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("error: collect_deadline_minutes=0.05 passed with ") and "bees (0)" in last
    assert "short of min_images_per_class=5; run the same command again" in last
    kept_first = _image_sets(out / "raw")
    assert 0 < len(kept_first["ants"]) < 12 and kept_first["bees"] == []
    assert "unfinished" not in (out / "raw" / "ants" / "manifest.jsonl").read_text()  # cut short = not recorded
    assert not leftovers(out / "raw")

    server.image_delay = 0.0
    run_job(*cmd)
    assert {t: len(n) for t, n in _image_sets(out / "raw").items()} == {"ants": 12, "bees": 12}
    assert set(kept_first["ants"]) <= set(_image_sets(out / "raw")["ants"])
    report = json.loads((out / "raw" / "collect_report.json").read_text())
    assert report["deadline_passed"] is False and report["terms"]["ants"]["already_had"] == len(kept_first["ants"])


def test_a_kept_image_whose_bytes_were_lost_is_fetched_again(server, tmp_path):
    """No fsync per image: what a power loss can do to a renamed file, the next run's re-hash undoes."""
    cfg = make_cfg(server, terms="ants", images_per_term=3)
    collect(cfg, RunPaths(tmp_path))
    ants = tmp_path / "raw" / "ants"
    victim, intact = images(ants)[0], images(ants)[1]
    good = victim.read_bytes()
    victim.write_bytes(b"")  # the rename reached the disk, the data did not
    before = len(server.requests_to("/img/"))
    summary = collect(cfg, RunPaths(tmp_path))
    assert victim.read_bytes() == good and intact.is_file()
    assert len(server.requests_to("/img/")) == before + 1 and summary["terms"]["ants"]["downloaded"] == 1


@pytest.mark.e2e
def test_run_end_to_end_from_fake_openverse(server, tmp_path):
    out = tmp_path / "run"
    log = run_job("run", "--terms", "ants,bees", "--endpoint", server.url, "--allow-private-addresses",
                  "--arch", TINY_ARCH, "--weights", "none", "--epochs", "1", "--images-per-term", "12",
                  "--min-images-per-class", "3", "--num-workers", "0", "--requests-per-minute", "600",
                  "--out", str(out)).stdout
    assert (out / "model" / "model.pt").is_file()
    assert len(json.loads((out / "raw" / "attribution.json").read_text())) == 24
    assert re.findall(r"^\[(\d)/8\] ([a-z ]+)$", log, re.M)[:2] == [("1", "collect"), ("2", "clean")]
    page = (out / "report" / "index.html").read_text()  # the report names the search, and shows what it found
    assert '<b id="collect-source">openverse</b>' in page and '<span id="terms">ants, bees</span>' in page
    assert 'alt="collected images per search term (raw/collect_preview.png)"' in page
