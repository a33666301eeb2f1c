"""Fetch one image URL safely: address checks per redirect hop, retries, a byte cap, a content check.

Whether a body is an image is decided by its bytes (Pillow identifies, verifies and fully decodes
it), never by the URL's suffix or the Content-Type; only clearly non-image Content-Types (HTML,
JSON, video ...) are refused before the body is read. The file extension comes from the detected format.
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

import requests
from PIL import Image, UnidentifiedImageError

from jobs.config import Config
from jobs.fileio import sha256_bytes

from .netsafety import AddressPolicy, UnsafeURL, make_session
from .sources import retry_after_seconds

# Formats the later stages can decode, with the extension each is saved under. Pillow is told to
# try only these, so exotic decoders (EPS through Ghostscript, ...) never see downloaded bytes.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
NON_IMAGE_TYPES = ("text/", "audio/", "video/", "font/", "application/json", "application/xml",
                   "application/xhtml", "application/javascript", "application/pdf", "application/zip")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


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


@dataclass(frozen=True)
class DownloadSettings:
    max_bytes: int
    max_pixels: int = 89_478_485
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    total_timeout: float = 120.0  # a whole download, retries included: a trickling server cannot stall a worker
    retries: int = 2  # extra attempts after a retryable failure
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_retry_after: float = 60.0
    max_redirects: int = 5
    per_host: int = 4  # concurrent requests to one host, whatever download_workers is

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> DownloadSettings:
        values = {"max_bytes": int(cfg.max_download_mb * 1024 * 1024), "max_pixels": cfg.max_image_pixels}
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class ImageInfo:
    format: str
    ext: str
    width: int
    height: int


@dataclass(frozen=True)
class Fetched:
    final_url: str
    data: bytes
    sha256: str
    info: ImageInfo


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
    """Thread-safe: one requests.Session per worker thread, a concurrency limit per host."""

    def __init__(self, settings: DownloadSettings, policy: AddressPolicy, user_agent: str) -> None:
        self.settings, self.policy, self.user_agent = settings, policy, user_agent
        self._local = threading.local()
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def fetch(self, url: str) -> Fetched:
        """Download ``url`` following at most ``max_redirects`` checked hops; DownloadError on failure."""
        deadline = time.monotonic() + self.settings.total_timeout
        current, seen = url, {url}
        for _ in range(self.settings.max_redirects + 1):
            location, data = self._hop(current, deadline)
            if location is None:
                info = inspect_image(data, self.settings.max_pixels)
                return Fetched(current, data, sha256_bytes(data), info)
            current = urljoin(current, location)
            if current in seen:
                raise DownloadError("redirect loop", f"redirected back to {current}")
            seen.add(current)
        raise DownloadError("too many redirects", f"more than {self.settings.max_redirects} redirects")

    def _hop(self, url: str, deadline: float) -> tuple[str | None, bytes]:
        """One URL with retries: (redirect Location, b"") or (None, body)."""
        for attempt in range(self.settings.retries + 1):
            try:
                return self._attempt(url, deadline)
            except DownloadError as e:
                wait = min(e.retry_after if e.retry_after is not None else self.settings.backoff * 2 ** attempt,
                           self.settings.max_retry_after)
                if not e.retryable or attempt == self.settings.retries or time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _attempt(self, url: str, deadline: float) -> tuple[str | None, bytes]:
        try:
            self.policy.check_url(url)  # before every hop: a refused address is never connected to
        except UnsafeURL as e:
            raise DownloadError("refused", str(e), permanent=False) from None
        timeout = (self.settings.connect_timeout, self.settings.read_timeout)
        with self._host_slot(url):
            try:
                with self._session().get(url, stream=True, allow_redirects=False, timeout=timeout) as resp:
                    if resp.status_code in REDIRECT_STATUSES and resp.headers.get("Location"):
                        return resp.headers["Location"], b""
                    self._check_response(resp)
                    return None, self._read_capped(resp, deadline)
            except UnsafeURL as e:  # the connect-time check: DNS changed its answer since check_url
                raise DownloadError("refused", str(e), permanent=False) from None
            except requests.Timeout:
                raise DownloadError("timeout", f"no answer within {timeout[0]:g} s (connect) / {timeout[1]:g} s (read)",
                                    True) from None
            except requests.ConnectionError as e:
                raise DownloadError("connection error", _first_line(e), True) from None
            except requests.RequestException as e:
                raise DownloadError("bad request", _first_line(e)) from None

    def _check_response(self, resp: requests.Response) -> None:
        status = resp.status_code
        if status == 429 or status >= 500:
            raise DownloadError(f"http {status}", resp.reason or "server error", True,
                                retry_after_seconds(resp.headers.get("Retry-After")))
        if status != 200:
            raise DownloadError(f"http {status}", resp.reason or "unexpected status")
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype.startswith(NON_IMAGE_TYPES):
            raise DownloadError("not an image", f"Content-Type {ctype}")
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.settings.max_bytes:
            raise DownloadError("too large", f"Content-Length {length} exceeds {self._cap_text()}", permanent=False)

    def _read_capped(self, resp: requests.Response, deadline: float) -> bytes:
        buf = bytearray()
        for chunk in resp.iter_content(64 * 1024):
            buf += chunk
            if len(buf) > self.settings.max_bytes:
                raise DownloadError("too large", f"body exceeds {self._cap_text()}; aborted", permanent=False)
            if time.monotonic() > deadline:
                raise DownloadError("timeout", f"download took longer than {self.settings.total_timeout:g} s", True)
        return bytes(buf)

    def _cap_text(self) -> str:
        return f"max_download_mb={self.settings.max_bytes / 2**20:g}"

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = make_session(self.policy, self.user_agent)
        return session

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
