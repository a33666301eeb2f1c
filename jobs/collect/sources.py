"""Image search sources: ``search(term, n)`` yields up to ``n`` ``SearchResult`` s, fetching pages lazily.

- ``openverse`` (default, no key): openly licensed images, https://api.openverse.org/v1/images/.
- ``wikimedia``: Wikimedia Commons files via the MediaWiki API (960 px thumbnails, a standard size).
- ``bing``: a Bing-Image-Search-v7-compatible endpoint. Microsoft retired Bing Search v7 in
  August 2025; this is for compatible endpoints users may still have (``endpoint`` is required).
- ``urls``: a ``class,url`` file or a folder of ``<class>.txt`` files, one URL per line.

Search APIs are trusted configuration (``endpoint``); the image URLs they return are not, and go
through the downloader's address checks. API requests are paced (``requests_per_minute``) and a
429 answer's Retry-After is honoured.
"""

from __future__ import annotations

import html
import itertools
import os
import re
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from jobs.config import Config
from jobs.errors import JobError

OPENVERSE_URL = "https://api.openverse.org/v1/images/"
WIKIMEDIA_URL = "https://commons.wikimedia.org/w/api.php"
BING_PATH = "/v7.0/images/search"
OPENVERSE_LICENSE_TYPES = {"commercial", "modification", "all", "all-cc"}
OPENVERSE_LICENSES = {"by", "by-sa", "by-nd", "by-nc", "by-nc-sa", "by-nc-nd", "cc0", "pdm"}
WIKIMEDIA_THUMB_WIDTH = 960  # one of Wikimedia's standard thumbnail steps; other widths get throttled
API_ATTEMPTS = 4
MAX_API_RETRY_AFTER_S = 300.0


class CollectError(JobError):
    """The collect stage cannot work as configured; the message names the config key and the fix."""


@dataclass(frozen=True)
class SearchResult:
    url: str
    source: str
    license: str = "unknown"
    license_url: str | None = None
    creator: str | None = None
    title: str | None = None
    landing_url: str | None = None


class SearchError(RuntimeError):
    """A failed search request; ``status`` is the HTTP status when there was one.

    ``retryable`` errors (429, 5xx, network) are retried after ``retry_after`` seconds or a backoff.
    """

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retryable, self.retry_after = status, retryable, retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class RateLimiter:
    """At most ``per_minute`` calls a minute, evenly spaced (never a burst)."""

    def __init__(self, per_minute: int) -> None:
        self.interval = 60.0 / per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(start - now)


class ApiClient:
    """Paced JSON GETs with retries on 429 (honouring Retry-After), 5xx and connection errors."""

    def __init__(self, user_agent: str, per_minute: int, timeout: tuple[float, float] = (10.0, 30.0)) -> None:
        self.session = requests.Session()
        self.session.headers["User-Agent"] = user_agent
        self.limiter = RateLimiter(per_minute)
        self.timeout = timeout

    def get_json(self, url: str, params: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        for attempt in range(API_ATTEMPTS):
            self.limiter.wait()
            try:
                return self._get_once(url, params, headers)
            except SearchError as e:
                if not e.retryable or attempt == API_ATTEMPTS - 1:
                    raise
                time.sleep(min(e.retry_after if e.retry_after is not None else 2.0 ** attempt, MAX_API_RETRY_AFTER_S))
        raise AssertionError("unreachable")

    def _get_once(self, url: str, params: dict[str, Any], headers: dict[str, str] | None) -> Any:
        try:
            resp = self.session.get(url, params=params, headers=headers, timeout=self.timeout)
        except requests.RequestException as e:
            raise SearchError(f"cannot reach {url} ({type(e).__name__}); check the network or --endpoint",
                              retryable=True) from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise SearchError(f"{url} answered HTTP {resp.status_code} {API_ATTEMPTS} times; try again later",
                              resp.status_code, True, retry_after_seconds(resp.headers.get("Retry-After")))
        if resp.status_code >= 400:
            raise SearchError(f"{url} answered HTTP {resp.status_code}: {_snippet(resp.text)}", resp.status_code)
        try:
            data = resp.json()
        except ValueError:
            kind = resp.headers.get("Content-Type", "no Content-Type")
            raise SearchError(f"{url} did not return JSON ({kind}); is --endpoint the right API?") from None
        if not isinstance(data, dict):
            raise SearchError(f"{url} returned JSON that is not an object; is --endpoint the right API?")
        return data


def _snippet(text: str, limit: int = 160) -> str:
    return " ".join(text.split())[:limit] or "(empty body)"


def _base_url(endpoint: str | None, default: str, default_path: str) -> str:
    """``endpoint`` replaces the default base URL; one without a path gets the source's usual path."""
    if not endpoint:
        return default
    if urlsplit(endpoint).path.strip("/"):
        return endpoint
    return endpoint.rstrip("/") + default_path


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def strip_html(text: str | None) -> str | None:
    """Wikimedia's Artist field is HTML (links, spans); keep the readable text."""
    if not text:
        return None
    plain = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    return plain or None


class Source:
    name = "source"

    def classes(self) -> list[str] | None:
        """The classes a source defines itself (``urls``); None = one per search term."""
        return None

    def target(self, term: str, images_per_term: int) -> int:
        return images_per_term

    def search(self, term: str, n: int) -> Iterator[SearchResult]:
        raise NotImplementedError


class OpenverseSource(Source):
    name = "openverse"

    def __init__(self, api: ApiClient, base_url: str, licenses: str, token: str | None) -> None:
        self.api, self.url, self.token = api, base_url, token
        self.license_params = openverse_license_params(licenses)
        # Anonymous clients get at most 20 per page (more is a 401) and a limited page depth.
        self.page_size = 50 if token else 20

    def search(self, term: str, n: int) -> Iterator[SearchResult]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        seen, page = 0, 1
        while seen < n:
            params = {"q": term, "page": page, "page_size": self.page_size, **self.license_params}
            try:
                data = self.api.get_json(self.url, params, headers)
            except SearchError as e:
                if page > 1 and e.status is not None and e.status < 500:
                    return  # past the page depth this client may read: the results end here
                raise
            results = data.get("results") or []
            for item in results[: n - seen]:
                if item.get("url"):
                    seen += 1
                    yield self._result(item)
            if not results or page >= (_int(data.get("page_count")) or page):
                return
            page += 1

    def _result(self, item: dict[str, Any]) -> SearchResult:
        return SearchResult(
            url=item["url"], source=f"openverse:{item.get('source') or item.get('provider') or '?'}",
            license=openverse_license_name(item.get("license"), item.get("license_version")),
            license_url=item.get("license_url"), creator=item.get("creator"), title=item.get("title"),
            landing_url=item.get("foreign_landing_url"),
        )


def openverse_license_params(licenses: str) -> dict[str, str]:
    """'commercial,modification' -> license_type=...; 'by,cc0' -> license=...; '' -> no filter."""
    codes = [c.strip().lower() for c in licenses.split(",") if c.strip()]
    if not codes:
        return {}
    if set(codes) <= OPENVERSE_LICENSE_TYPES:
        return {"license_type": ",".join(codes)}
    if set(codes) <= OPENVERSE_LICENSES:
        return {"license": ",".join(codes)}
    raise CollectError(
        f"config key 'licenses' has {licenses!r}; use license types ({', '.join(sorted(OPENVERSE_LICENSE_TYPES))}) "
        f"or license codes ({', '.join(sorted(OPENVERSE_LICENSES))}), not a mix")


def openverse_license_name(code: str | None, version: str | None) -> str:
    if not code:
        return "unknown"
    name = {"cc0": "CC0", "pdm": "Public Domain Mark"}.get(code.lower(), f"CC {code.upper()}")
    return f"{name} {version}" if version else name


class WikimediaSource(Source):
    name = "wikimedia"

    def __init__(self, api: ApiClient, base_url: str) -> None:
        self.api, self.url = api, base_url

    def search(self, term: str, n: int) -> Iterator[SearchResult]:
        seen, offset = 0, 0
        while seen < n:
            params = {
                "action": "query", "format": "json", "generator": "search",
                "gsrsearch": f"{term} filetype:bitmap", "gsrnamespace": 6,
                "gsrlimit": min(50, max(10, n - seen)), "gsroffset": offset,
                "prop": "imageinfo", "iiprop": "url|mime|size|extmetadata", "iiurlwidth": WIKIMEDIA_THUMB_WIDTH,
                "iiextmetadatafilter": "LicenseShortName|LicenseUrl|Artist|ObjectName",
            }
            data = self.api.get_json(self.url, params)
            if "error" in data:
                raise SearchError(f"{self.url} answered error {data['error'].get('code')}: {data['error'].get('info')}")
            pages = (data.get("query") or {}).get("pages") or {}
            pages = sorted(pages.values() if isinstance(pages, dict) else pages, key=lambda p: p.get("index", 0))
            for page in pages:
                result = self._result(page)
                if result and seen < n:
                    seen += 1
                    yield result
            offset = _int((data.get("continue") or {}).get("gsroffset"))
            if not pages or offset is None:
                return

    def _result(self, page: dict[str, Any]) -> SearchResult | None:
        info = (page.get("imageinfo") or [None])[0]
        if not info or not str(info.get("mime", "")).startswith("image/") or info.get("mime") == "image/svg+xml":
            return None
        meta = {k: (v or {}).get("value") for k, v in (info.get("extmetadata") or {}).items()}
        url = info.get("thumburl") or info.get("url")
        if not url:
            return None
        return SearchResult(
            url=url, source="wikimedia",
            license=strip_html(meta.get("LicenseShortName")) or "unknown", license_url=meta.get("LicenseUrl"),
            creator=strip_html(meta.get("Artist")),
            title=strip_html(meta.get("ObjectName")) or str(page.get("title", "")).removeprefix("File:") or None,
            landing_url=info.get("descriptionurl"),
        )


def bing_license(licenses: str) -> str | None:
    """Map the Openverse-style filter onto Bing's single ``license`` value."""
    codes = {c.strip().lower() for c in licenses.split(",") if c.strip()}
    if not codes:
        return None
    if codes <= {"cc0", "pdm"}:
        return "Public"
    if codes & {"commercial", "modification"}:
        return {frozenset({"commercial"}): "ShareCommercially", frozenset({"modification"}): "Modify"}.get(
            frozenset(codes & {"commercial", "modification"}), "ModifyCommercially")
    return "Any"


class BingSource(Source):
    name = "bing"
    max_count = 150

    def __init__(self, api: ApiClient, base_url: str, key: str, licenses: str) -> None:
        self.api, self.url, self.key = api, base_url, key
        self.license = bing_license(licenses)

    def search(self, term: str, n: int) -> Iterator[SearchResult]:
        seen, offset = 0, 0
        while seen < n:
            params: dict[str, Any] = {"q": term, "imageType": "Photo", "offset": offset,
                                      "count": min(self.max_count, n - seen)}
            if self.license:
                params["license"] = self.license
            data = self.api.get_json(self.url, params, {"Ocp-Apim-Subscription-Key": self.key})
            values = data.get("value") or []
            for item in values:
                if item.get("contentUrl") and seen < n:
                    seen += 1
                    yield self._result(item)
            total = _int(data.get("totalEstimatedMatches"))
            offset = _int(data.get("nextOffset")) or offset + len(values)
            if not values or (total is not None and offset >= total):
                return

    def _result(self, item: dict[str, Any]) -> SearchResult:
        return SearchResult(
            url=item["contentUrl"], source="bing",
            # Bing reports no per-image license; record the filter the results were searched with.
            license=f"unknown (searched with Bing license={self.license or 'All'})",
            creator=None, title=item.get("name"), landing_url=item.get("hostPageUrl"),
        )


class UrlsSource(Source):
    """URLs listed by the user; every listed URL of a class is fetched (``images_per_term`` does not apply).

    The list is streamed, never held as rows: one pass here counts each class's distinct URLs (a
    set of the URL strings lives only during that pass) and, for a CSV, notes where each class's
    lines start (8 bytes a line); each class's URLs are then read back as the downloads need them.
    """

    name = "urls"

    def __init__(self, location: Path) -> None:
        self.location = location
        if not location.exists():
            raise CollectError(f"config key 'urls_file' names {location}, which does not exist; "
                               "pass a class,url file or a folder of <class>.txt files")
        self._offsets: dict[str, array] = {}
        distinct: dict[str, set[str]] = {}
        if location.is_dir():
            for txt in sorted(location.glob("*.txt")):
                distinct.setdefault(txt.stem, set()).update(_url_lines(txt))
        else:
            for offset, cls, url in self._csv_rows():
                distinct.setdefault(cls, set()).add(url)
                self._offsets.setdefault(cls, array("q")).append(offset)
        self.counts = {cls: len(urls) for cls, urls in distinct.items() if urls}
        if not self.counts:
            raise CollectError(f"config key 'urls_file': {location} lists no URLs; write 'class,url' lines")

    def classes(self) -> list[str]:
        return list(self.counts)

    def target(self, term: str, images_per_term: int) -> int:
        return self.counts.get(term, 0)

    def search(self, term: str, n: int) -> Iterator[SearchResult]:
        for url in itertools.islice(self._class_urls(term), n):
            yield SearchResult(url=url, source=f"urls:{self.location.name}", landing_url=url)

    def _class_urls(self, term: str) -> Iterator[str]:
        if self.location.is_dir():
            yield from _url_lines(self.location / f"{term}.txt")
            return
        with self.location.open("rb") as f:
            for offset in self._offsets.get(term, ()):
                f.seek(offset)
                row = _csv_row(f.readline().decode(errors="replace"))
                if row:  # None only when the file changed since __init__ read it
                    yield row[1]

    def _csv_rows(self) -> Iterator[tuple[int, str, str]]:
        """(byte offset, class, url) of every ``class,url`` line; CollectError names a malformed one."""
        offset = 0
        with self.location.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode(errors="replace")
                try:
                    row = _csv_row(line)
                except ValueError:
                    raise CollectError(f"{self.location}:{lineno}: expected 'class,url', got "
                                       f"{line.strip()[:80]!r}") from None
                if row is not None:
                    yield offset, *row
                offset += len(raw)


def _csv_row(line: str) -> tuple[str, str] | None:
    """(class, url) of one line; None for a blank line, a '#' comment or a header; ValueError when malformed."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    cls, sep, url = (part.strip().strip('"') for part in line.partition(","))
    if not sep or not cls or not url:
        raise ValueError(line)
    return None if (cls.lower(), url.lower()) == ("class", "url") else (cls, url)


def _url_lines(txt: Path) -> Iterator[str]:
    with txt.open(errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def make_source(cfg: Config) -> Source:
    """The source ``cfg.source`` names; CollectError (one line naming the key) when it cannot work."""
    api = ApiClient(cfg.user_agent, cfg.requests_per_minute)
    token = os.environ.get(cfg.api_key_env, "").strip() or None
    if cfg.source == "openverse":
        return OpenverseSource(api, _base_url(cfg.endpoint, OPENVERSE_URL, "/v1/images/"), cfg.licenses, token)
    if cfg.source == "wikimedia":
        return WikimediaSource(api, _base_url(cfg.endpoint, WIKIMEDIA_URL, "/w/api.php"))
    if cfg.source == "bing":
        if not cfg.endpoint:
            raise CollectError("source 'bing' needs config key 'endpoint' (a Bing-v7-compatible URL; "
                              "Microsoft retired Bing Image Search v7 in August 2025)")
        if not token:
            raise CollectError(f"source 'bing' needs its API key in the environment variable {cfg.api_key_env} "
                              "(config key 'api_key_env')")
        return BingSource(api, _base_url(cfg.endpoint, cfg.endpoint, BING_PATH), token, cfg.licenses)
    if cfg.source == "urls":
        if not cfg.urls_file:
            raise CollectError("source 'urls' needs config key 'urls_file' "
                              "(a class,url file or a folder of <class>.txt files)")
        return UrlsSource(Path(cfg.urls_file))
    raise CollectError(f"config key 'source' must be openverse, wikimedia, bing or urls (got {cfg.source!r})")
