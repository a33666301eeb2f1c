"""A fake image-search API and image host on loopback, for tests (no mocks of the HTTP client).

Speaks the response shapes of Openverse (``/v1/images/``), the Wikimedia Commons API
(``/w/api.php``) and Bing Image Search v7 (``/v7.0/images/search``), and serves real photos:
``/img/<class>/<k>.jpg`` is photo ``k % n`` of ``<images>/<class>/`` (variant ``k // n`` is a
distinct crop/mirror of it, so any number of different images can be served from a few).
Result URLs are built from the request's Host header, so a client in a container gets URLs it can reach.

Hostile routes under ``/h/``: 404, 500-then-200, 429-then-200 with Retry-After, 503 n times then
200 (``/h/fails/<n>/<k>.jpg``), a slow answer,
an endless body, 1-byte-every-2-s drips (in the body and in the status line), photos behind
``X-Robots-Tag`` opt-outs, HTML (as text/html and as image/jpeg), redirect loops and chains, redirects to a
private address and to file:// (never followed by a correct client), a truncated JPEG, a PNG named .jpg, and a
copy of ``/img/ants/0.jpg`` under another URL.

Every request is recorded with a timestamp (``server.requests``) so tests can assert pacing.
In tests: ``with FakeImageAPI(images_dir) as server: server.url ...``.
Standalone: ``python tests/fake_image_api.py --port 8080 --images tests/fixtures/hymenoptera_small``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageOps

API_PATHS = ("/v1/images/", "/w/api.php", "/v7.0/images/search")
PRIVATE_TARGET = "http://10.0.0.1/x"  # a correct client refuses this redirect before connecting
HOSTILE = {
    "404": "/h/404.jpg",
    "flaky": "/h/flaky.jpg",
    "429": "/h/429.jpg",
    "slow": "/h/slow.jpg",
    "endless": "/h/endless.jpg",
    "html_as_jpeg": "/h/html-as-jpeg.jpg",
    "html": "/h/page.html",
    "loop": "/h/loop/a",
    "long_chain": "/h/chain/6",
    "short_chain": "/h/chain/2",
    "to_private": "/h/to-private.jpg",
    "to_file": "/h/to-file.jpg",
    "truncated": "/h/truncated.jpg",
    "png_named_jpg": "/h/png-named.jpg",
    "dup": "/h/dup.jpg",
}
# Slow drips: 1 byte every DRIP_SECONDS, behind a 1 MB Content-Length (body) or inside the status line (headers)
DRIP = {"body": "/h/drip-body.jpg", "headers": "/h/drip-headers.jpg"}
DRIP_SECONDS = 2.0
# A real photo behind X-Robots-Tag header lines (each tuple: the lines sent, in order)
OPT_OUT = {
    "/h/robots/noai.jpg": ("noai",),
    "/h/robots/two-lines.jpg": ("nofollow", "noimageai"),
    "/h/robots/noindex-nofollow.jpg": ("noindex, nofollow",),
    "/h/robots/other-bot.jpg": ("otherbot: noai",),
    "/h/robots/our-bot.jpg": ("jobs: noai, noindex",),
    "/h/robots/harmless.jpg": ("nofollow, unavailable_after: 25 Jun 2030 15:00:00 PST",),
}


@dataclass(frozen=True)
class Recorded:
    time: float  # time.monotonic() on arrival
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeImageAPI:
    images_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    per_term: int = 40  # results per known class
    page_limit: int | None = None  # at most this many results per API page (forces pagination)
    image_delay: float = 0.0  # seconds before each /img/ answer
    slow_seconds: float = 3.0
    api_key: str = "test-key"  # the Bing route wants it in Ocp-Apim-Subscription-Key
    api_429_first: bool = False  # answer the first API request with 429 + Retry-After: 1
    catalog: dict[str, list[str]] = field(default_factory=dict)  # term -> result URLs (paths or absolute)
    requests: list[Recorded] = field(default_factory=list)
    max_in_flight: int = 0  # most concurrent /img/ and /h/ requests seen

    def __post_init__(self) -> None:
        self.photos = {d.name: sorted(d.glob("*.jpg")) for d in sorted(Path(self.images_dir).iterdir()) if d.is_dir()}
        self._variants: dict[tuple[str, int], bytes] = {}
        self._hits: Counter = Counter()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeImageAPI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _QuietServer((self.host, self.port), handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-image-api", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeImageAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- what tests look at ----------------------------------------------------------------------
    def requests_to(self, prefix: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def api_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path in API_PATHS]

    # -- content ---------------------------------------------------------------------------------
    def items(self, term: str) -> list[str]:
        if term in self.catalog:
            return self.catalog[term]
        return [f"/img/{term}/{k}.jpg" for k in range(self.per_term)] if self.photos.get(term) else []

    def photo(self, cls: str, k: int) -> bytes:
        """Photo ``k`` of a class: the file itself, or for k >= n a distinct crop (mirrored every other time)."""
        files = self.photos[cls]
        path, variant = files[k % len(files)], k // len(files)
        if variant == 0:
            return path.read_bytes()
        with self._lock:
            if (cls, k) not in self._variants:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    w, h = img.size
                    inset = 0.04 * variant
                    img = img.crop((int(w * inset), int(h * inset / 2), w - int(w * inset / 2), h - int(h * inset)))
                    if variant % 2:
                        img = ImageOps.mirror(img)
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                self._variants[(cls, k)] = buf.getvalue()
            return self._variants[(cls, k)]

    def first_hit(self, key: str) -> bool:
        return self.hit(key) == 1

    def hit(self, key: str) -> int:
        """How many times ``key`` was asked for, this time included."""
        with self._lock:
            self._hits[key] += 1
            return self._hits[key]

    def record(self, path: str, query: dict[str, str], headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append(Recorded(time.monotonic(), path, query, headers))

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up is what /h/ routes cause
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    api: FakeImageAPI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain", {"Location": location})

    def _base(self) -> str:
        return f"http://{self.headers.get('Host', f'{self.api.host}:{self.api.port}')}"

    def _absolute(self, url: str) -> str:
        return self._base() + url if url.startswith("/") else url

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.api.record(parts.path, query, dict(self.headers.items()))
        try:
            self._route(parts.path, query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up (a timeout or a byte cap): expected for the hostile routes

    def _route(self, path: str, query: dict[str, str]) -> None:
        if path in API_PATHS:
            if self.api.api_429_first and self.api.first_hit("api"):
                return self._send(429, b'{"detail": "Request was throttled."}', headers={"Retry-After": "1"})
            return {"/v1/images/": self._openverse, "/w/api.php": self._wikimedia,
                    "/v7.0/images/search": self._bing}[path](query)
        if path.startswith("/img/"):
            return self._image(path)
        if path.startswith("/h/"):
            self.api.enter()
            try:
                return self._hostile(path)
            finally:
                self.api.leave()
        self._send(404, b"not found", "text/plain")

    # -- search APIs -----------------------------------------------------------------------------
    def _page(self, term: str, offset: int, size: int) -> list[tuple[int, str]]:
        size = min(size, self.api.page_limit or size)
        items = self.api.items(term)
        return [(i, self._absolute(items[i])) for i in range(offset, min(offset + size, len(items)))]

    def _openverse(self, q: dict[str, str]) -> None:
        size, page = int(q.get("page_size", 20)), int(q.get("page", 1))
        if size > 20 and "Authorization" not in self.headers:
            return self._json({"detail": "page_size above 20 needs authentication"}, 401)
        term = q.get("q", "")
        step = min(size, self.api.page_limit or size)
        results = [{
            "id": f"{term}-{i}", "title": f"{term} photo {i}", "url": url,
            "foreign_landing_url": f"{self._base()}/landing/{term}/{i}", "creator": f"Photographer {i}",
            "creator_url": None, "license": "by", "license_version": "2.0",
            "license_url": "https://creativecommons.org/licenses/by/2.0/", "provider": "flickr", "source": "flickr",
            "category": "photograph", "filetype": "jpg", "mature": False, "width": 500, "height": 375,
            "thumbnail": f"{self._base()}/v1/images/{term}-{i}/thumb/", "tags": [],
        } for i, url in self._page(term, (page - 1) * step, size)]
        total = len(self.api.items(term))
        self._json({"result_count": total, "page_count": max(1, -(-total // step)), "page_size": size,
                    "page": page, "results": results})

    def _wikimedia(self, q: dict[str, str]) -> None:
        term = q.get("gsrsearch", "").replace("filetype:bitmap", "").strip()
        offset, limit = int(q.get("gsroffset", 0)), int(q.get("gsrlimit", 10))
        hits = self._page(term, offset, limit)
        pages = {str(1000 + i): {
            "pageid": 1000 + i, "ns": 6, "title": f"File:{term.title()} {i}.jpg", "index": i + 1,
            "imageinfo": [{
                "url": url, "thumburl": url, "thumbwidth": 500, "thumbheight": 375, "width": 2000, "height": 1500,
                "mime": "image/jpeg", "size": 123456, "descriptionurl": f"{self._base()}/wiki/File:{term}_{i}.jpg",
                "extmetadata": {
                    "LicenseShortName": {"value": "CC BY-SA 4.0"},
                    "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0"},
                    "Artist": {"value": f'<a href="//commons.wikimedia.org/wiki/User:P{i}">Jane &amp; Doe {i}</a>'},
                    "ObjectName": {"value": f"{term} {i}"},
                },
            }],
        } for i, url in hits}
        pages["-1"] = {"ns": 6, "title": "File:Diagram.svg", "index": 0,  # an SVG: a client should skip it
                       "imageinfo": [{"url": self._base() + "/h/404.jpg", "mime": "image/svg+xml"}]}
        data: dict[str, Any] = {"batchcomplete": "", "query": {"pages": pages}}
        if hits and hits[-1][0] + 1 < len(self.api.items(term)):
            data["continue"] = {"gsroffset": hits[-1][0] + 1, "continue": "gsroffset||"}
        self._json(data)

    def _bing(self, q: dict[str, str]) -> None:
        if self.headers.get("Ocp-Apim-Subscription-Key") != self.api.api_key:
            return self._json({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}},
                              401)
        term, offset, count = q.get("q", ""), int(q.get("offset", 0)), int(q.get("count", 35))
        hits = self._page(term, offset, count)
        self._json({"_type": "Images", "totalEstimatedMatches": len(self.api.items(term)),
                    "nextOffset": offset + len(hits),
                    "value": [{"contentUrl": url, "thumbnailUrl": url, "width": 500, "height": 375,
                               "hostPageUrl": f"{self._base()}/page/{term}/{i}", "name": f"{term} {i}"}
                              for i, url in hits]})

    # -- images ----------------------------------------------------------------------------------
    def _image(self, path: str) -> None:
        try:
            _, _, cls, name = path.split("/")
            data = self.api.photo(cls, int(name.split(".")[0]))
        except (ValueError, KeyError):
            return self._send(404, b"no such image", "text/plain")
        self.api.enter()
        try:
            time.sleep(self.api.image_delay)
            self._send(200, data, "image/jpeg")
        finally:
            self.api.leave()

    def _hostile(self, path: str) -> None:
        first = sorted(self.api.photos)[0]
        ants0 = self.api.photo(first, 0)
        if path == "/h/404.jpg":
            return self._send(404, b"<html>Not Found</html>", "text/html")
        if path in ("/h/flaky.jpg", "/h/429.jpg"):
            if self.api.first_hit(path):
                status, headers = (500, {}) if path == "/h/flaky.jpg" else (429, {"Retry-After": "1"})
                return self._send(status, b"try again", "text/plain", headers)
            return self._send(200, self.api.photo(first, 1 if path == "/h/flaky.jpg" else 2), "image/jpeg")
        if path == "/h/slow.jpg":
            time.sleep(self.api.slow_seconds)
            return self._send(200, ants0, "image/jpeg")
        if path == "/h/endless.jpg":
            return self._endless()
        if path == "/h/html-as-jpeg.jpg":
            return self._send(200, b"<!DOCTYPE html><html><body>Sign in to view</body></html>", "image/jpeg")
        if path == "/h/page.html":
            return self._send(200, b"<!DOCTYPE html><html><body>a gallery</body></html>", "text/html")
        if path.startswith("/h/loop/"):
            return self._redirect("/h/loop/b" if path.endswith("/a") else "/h/loop/a")
        if path.startswith("/h/chain/"):
            left = int(path.rsplit("/", 1)[1])
            return self._redirect(f"/h/chain/{left - 1}") if left > 0 else self._send(200, ants0, "image/jpeg")
        if path == "/h/to-private.jpg":
            return self._redirect(PRIVATE_TARGET)
        if path == "/h/to-file.jpg":
            return self._redirect("file:///etc/passwd")
        if path == "/h/truncated.jpg":
            return self._send(200, ants0[: len(ants0) // 2], "image/jpeg")
        if path == "/h/png-named.jpg":
            buf = io.BytesIO()
            Image.open(io.BytesIO(ants0)).convert("RGB").resize((160, 120)).save(buf, format="PNG")
            return self._send(200, buf.getvalue(), "image/jpeg")
        if path == "/h/dup.jpg":
            return self._send(200, ants0, "image/jpeg")
        if path.startswith("/h/fails/"):  # /h/fails/<n>/<k>.jpg: 503 for the first n requests, then photo k
            _, _, _, n, name = path.split("/")
            if self.api.hit(path) <= int(n):
                return self._send(503, b"busy", "text/plain")
            return self._send(200, self.api.photo(first, int(name.split(".")[0])), "image/jpeg")
        if path in DRIP.values():
            return self._drip(headers_too=path == DRIP["headers"])
        if path in OPT_OUT:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(ants0)))
            for value in OPT_OUT[path]:
                self.send_header("X-Robots-Tag", value)
            self.end_headers()
            self.wfile.write(ants0)
            return None
        self._send(404, b"no such route", "text/plain")

    def _drip(self, headers_too: bool) -> None:
        """One byte every DRIP_SECONDS, until the client hangs up (or 10 minutes)."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1048576\r\n\r\n"
        if not headers_too:
            self.wfile.write(head)
            head = b""
        body = self.api.photo(sorted(self.api.photos)[0], 0)
        for byte in (head + body)[: int(600 / DRIP_SECONDS)]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(DRIP_SECONDS)
        self.close_connection = True

    def _endless(self) -> None:
        """An image/jpeg body that never ends (until 1 GiB): the client's byte cap must stop it."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\xff" * 65536
        for _ in range(16384):
            self.wfile.write(chunk)
        self.close_connection = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--images", type=Path, required=True, help="a folder of <class>/*.jpg")
    parser.add_argument("--per-term", type=int, default=40)
    args = parser.parse_args()
    server = FakeImageAPI(args.images, host=args.host, port=args.port, per_term=args.per_term).start()
    print(f"fake image API on {server.url} serving {', '.join(server.photos)}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
