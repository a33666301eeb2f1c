"""Fetch one image URL safely: address checks per redirect hop, retries, a byte cap, a deadline, a content check.

``Downloader.fetch`` does the network part (in a download thread); ``inspect_image`` decides whether
the bytes are an image (in a verification thread, so a download never waits for a decode).
Whether a body is an image is decided by its bytes (Pillow identifies, verifies and fully
decodes it), never by the URL's suffix or the Content-Type; only clearly non-image
Content-Types (HTML, JSON, video ...) are refused before the body is read, and so are responses
whose ``X-Robots-Tag`` opts out (``disallowed_header_directives``). The file extension comes from
the detected format.

``download_timeout`` bounds a whole download, redirects and retries included, at the socket level
(see ``deadline``): a server that trickles bytes cannot hold a download thread past it.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

import urllib3
from PIL import Image, UnidentifiedImageError
from urllib3.exceptions import HTTPError
from urllib3.exceptions import TimeoutError as UrllibTimeout

from jobs.config import Config
from jobs.fileio import sha256_bytes

from .deadline import DeadlineWatch, Guard
from .netsafety import AddressPolicy, UnsafeURL, make_pool_manager
from .sources import retry_after_seconds

# Formats the later stages can decode, with the extension each is saved under. Pillow is told to
# try only these, so exotic decoders (EPS through Ghostscript, ...) never see downloaded bytes.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
NON_IMAGE_TYPES = ("text/", "audio/", "video/", "font/", "application/json", "application/xml",
                   "application/xhtml", "application/javascript", "application/pdf", "application/zip")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# X-Robots-Tag directives that carry a value after a colon; any other "word:" prefix names a crawler
VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
READ_SIZE = 64 * 1024


class DownloadError(Exception):
    """A failed download: ``reason`` is a short category for the summary, ``detail`` the specifics.

    ``retryable`` failures (timeouts, 5xx, 429, connection errors) are retried with backoff now.
    ``permanent`` ones are the URL's own fault (404, not an image, a redirect loop) and a re-run
    skips them; the rest (transient, or refused under this run's settings) are tried again next run.
    """

    def __init__(self, reason: str, detail: str, retryable: bool = False, retry_after: float | None = None,
                 permanent: bool | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after
        self.permanent = not retryable if permanent is None else permanent


class Unfinished(DownloadError):
    """Cut short by the whole run's deadline (``collect_deadline_minutes``): not the URL's fault, not recorded."""

    def __init__(self) -> None:
        super().__init__("unfinished", "collect_deadline_minutes passed", permanent=False)


@dataclass(frozen=True)
class DownloadSettings:
    max_bytes: int
    max_pixels: int = 89_478_485
    download_timeout: float = 30.0  # a whole download, redirects and retries included
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retries: int = 2  # extra attempts after a retryable failure
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_retry_after: float = 60.0
    max_redirects: int = 5
    per_host: int = 4  # concurrent requests to one host, whatever download_workers is
    disallowed_directives: frozenset[str] = frozenset()
    robots_name: str = ""  # our crawler name in "X-Robots-Tag: <name>: noai" (the User-Agent's first word)

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> DownloadSettings:
        values = {"max_bytes": int(cfg.max_download_mb * 1024 * 1024), "max_pixels": cfg.max_image_pixels,
                  "download_timeout": cfg.download_timeout,
                  "disallowed_directives": frozenset(d.lower() for d in cfg.disallowed_header_directives),
                  "robots_name": cfg.user_agent.split("/", 1)[0].split()[0].lower() if cfg.user_agent.strip() else ""}
        return cls(**{**values, **overrides})


def opt_out_directive(values: list[str], robots_name: str, disallowed: frozenset[str]) -> str | None:
    """The first disallowed directive in these X-Robots-Tag header values that applies to us, or None.

    ``noai, noindex`` applies to every crawler; ``googlebot: noindex`` only to googlebot.
    """
    for value in values:
        head, sep, rest = value.partition(":")
        name = head.strip().lower()
        if sep and "," not in head and name not in VALUED_DIRECTIVES:
            if name != robots_name:
                continue
            value = rest
        for directive in value.split(","):
            if directive.strip().lower() in disallowed:
                return directive.strip().lower()
    return None


@dataclass(frozen=True)
class ImageInfo:
    format: str
    ext: str
    width: int
    height: int


@dataclass(frozen=True)
class Body:
    final_url: str
    data: bytes
    sha256: str


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Identify, verify and fully decode ``data``; DownloadError (permanent) when it is not a usable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF and the like: judged by whether it decodes
            with Image.open(io.BytesIO(data), formats=list(EXTENSIONS)) as img:
                fmt, (width, height) = img.format or "", img.size
                if width * height > max_pixels:
                    raise DownloadError("too many pixels", f"{width}x{height} exceeds max_image_pixels={max_pixels}",
                                        permanent=False)
                img.verify()
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                img.load()  # verify() misses truncated pixel data; a full decode does not
    except UnidentifiedImageError:
        raise DownloadError("not an image", f"{len(data)} bytes Pillow cannot identify as "
                                            f"{'/'.join(EXTENSIONS)}") from None
    except Image.DecompressionBombError as e:
        raise DownloadError("too many pixels", str(e), permanent=False) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DownloadError("corrupt image", f"{type(e).__name__}: {e}") from None
    return ImageInfo(fmt, EXTENSIONS[fmt], width, height)


class Downloader:
    """Thread-safe: one urllib3 pool manager (per proxy) shared by the download threads, a limit per host."""

    def __init__(self, settings: DownloadSettings, policy: AddressPolicy, user_agent: str) -> None:
        self.settings, self.policy, self.user_agent = settings, policy, user_agent
        self._managers: dict[str | None, urllib3.PoolManager] = {}
        self._proxies = getproxies()
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._watch = DeadlineWatch()

    def close(self) -> None:
        self._watch.close()
        for manager in self._managers.values():
            manager.clear()  # close the kept-alive connections now, not when the garbage collector gets to them

    def fetch(self, url: str, stop_at: float | None = None) -> Body:
        """Download ``url`` following at most ``max_redirects`` checked hops; DownloadError on failure.

        ``stop_at`` (time.monotonic()) is the whole run's deadline: a download still running then
        raises Unfinished.
        """
        own = time.monotonic() + self.settings.download_timeout
        deadline = own if stop_at is None else min(own, stop_at)
        try:
            with self._watch.guard(deadline) as guard:
                return self._follow(url, guard)
        except DownloadError:
            if stop_at is not None and time.monotonic() >= stop_at and deadline < own:
                raise Unfinished() from None
            raise

    def _follow(self, url: str, guard: Guard) -> Body:
        current, seen = url, {url}
        for _ in range(self.settings.max_redirects + 1):
            location, data = self._hop(current, guard)
            if location is None:
                return Body(current, data, sha256_bytes(data))
            current = urljoin(current, location)
            if current in seen:
                raise DownloadError("redirect loop", f"redirected back to {current}")
            seen.add(current)
        raise DownloadError("too many redirects", f"more than {self.settings.max_redirects} redirects")

    def _hop(self, url: str, guard: Guard) -> tuple[str | None, bytes]:
        """One URL with retries: (redirect Location, b"") or (None, body)."""
        for attempt in range(self.settings.retries + 1):
            try:
                return self._attempt(url, guard)
            except DownloadError as e:
                wait = min(e.retry_after if e.retry_after is not None else self.settings.backoff * 2 ** attempt,
                           self.settings.max_retry_after)
                if not e.retryable or attempt == self.settings.retries or wait >= guard.remaining():
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _timed_out(self) -> DownloadError:
        return DownloadError("timeout", f"not downloaded within download_timeout={self.settings.download_timeout:g} s",
                             True)

    def _attempt(self, url: str, guard: Guard) -> tuple[str | None, bytes]:
        try:
            self.policy.check_url(url)  # before every hop: a refused address is never connected to
        except UnsafeURL as e:
            raise DownloadError("refused", str(e), permanent=False) from None
        left = guard.remaining()
        if left <= 0:
            raise self._timed_out()
        timeout = urllib3.Timeout(connect=min(self.settings.connect_timeout, left),
                                  read=min(self.settings.read_timeout, left))
        with self._host_slot(url):
            try:
                resp = self._manager(url).request("GET", url, preload_content=False, redirect=False, retries=False,
                                                  timeout=timeout)
            except UnsafeURL as e:  # the connect-time check: DNS changed its answer since check_url
                raise DownloadError("refused", str(e), permanent=False) from None
            except (HTTPError, OSError) as e:
                raise self._network_error(e, guard, timeout) from None
            try:
                if resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                    return resp.headers["Location"], b""
                self._check_response(resp)
                data = self._read_capped(resp, guard)
            except (HTTPError, OSError) as e:
                raise self._network_error(e, guard, timeout) from None
            finally:
                if resp.isclosed():  # read to the end: the connection can serve the next request
                    resp.release_conn()
                else:
                    resp.close()  # half-read (a redirect's body, a refusal, a timeout): drop the connection
        if guard.fired:  # a shut socket reads as end of body: that body is short, not complete
            raise self._timed_out()
        return None, data

    def _network_error(self, error: BaseException, guard: Guard, timeout: urllib3.Timeout) -> DownloadError:
        if guard.fired or guard.remaining() <= 0:  # the watcher shut the socket: whatever urllib3 made of it
            return self._timed_out()
        if isinstance(error, UrllibTimeout):
            return DownloadError("timeout", f"no answer within {timeout.connect_timeout:g} s (connect) / "
                                            f"{timeout.read_timeout:g} s (read)", True)
        if isinstance(error, urllib3.exceptions.LocationParseError):
            return DownloadError("bad request", _first_line(error))
        return DownloadError("connection error", _first_line(error), True)

    def _check_response(self, resp: urllib3.BaseHTTPResponse) -> None:
        status = resp.status
        if status == 429 or status >= 500:
            raise DownloadError(f"http {status}", resp.reason or "server error", True,
                                retry_after_seconds(resp.headers.get("Retry-After")))
        if status != 200:
            raise DownloadError(f"http {status}", resp.reason or "unexpected status")
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype.startswith(NON_IMAGE_TYPES):
            raise DownloadError("not an image", f"Content-Type {ctype}")
        directive = opt_out_directive(resp.headers.getlist("X-Robots-Tag"), self.settings.robots_name,
                                      self.settings.disallowed_directives)
        if directive:  # refused under this run's disallowed_header_directives: a re-run asks again
            raise DownloadError("opted out", f"X-Robots-Tag {directive} (config key disallowed_header_directives)",
                                permanent=False)
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.settings.max_bytes:
            raise DownloadError("too large", f"Content-Length {length} exceeds {self._cap_text()}", permanent=False)

    def _read_capped(self, resp: urllib3.BaseHTTPResponse, guard: Guard) -> bytes:
        buf = bytearray()
        for chunk in resp.stream(READ_SIZE, decode_content=True):
            buf += chunk
            if len(buf) > self.settings.max_bytes:
                raise DownloadError("too large", f"body exceeds {self._cap_text()}; aborted", permanent=False)
            if guard.remaining() <= 0:
                raise self._timed_out()
        return bytes(buf)

    def _cap_text(self) -> str:
        return f"max_download_mb={self.settings.max_bytes / 2**20:g}"

    def _manager(self, url: str) -> urllib3.PoolManager:
        """The pool manager for ``url``: direct, or through the proxy HTTP(S)_PROXY names (unless NO_PROXY)."""
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if proxy and proxy_bypass(parts.hostname or ""):
            proxy = None
        with self._lock:
            if proxy not in self._managers:
                self._managers[proxy] = make_pool_manager(self.policy, self.user_agent, self.settings.per_host, proxy)
            return self._managers[proxy]

    @contextlib.contextmanager
    def _host_slot(self, url: str) -> Iterator[None]:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc.lower()}"
        with self._lock:
            slot = self._host_slots.setdefault(key, threading.BoundedSemaphore(self.settings.per_host))
        with slot:
            yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
