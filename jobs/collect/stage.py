"""The collect stage: search each term, download up to ``images_per_term`` images into ``raw/<term>/``.

Candidates are taken in search-result order, and never more are in flight than are still missing,
so the kept images are the first ``images_per_term`` that download and decode. That makes the folder
a function of the search results: a run killed at any point and run again ends with the same
files as an uninterrupted run (transient failures aside, which a re-run retries).

Three kinds of workers: download threads (network and hashing), verification threads (Pillow
decodes every image fully, then the file is written) and this thread, which only decides what is
kept and appends manifest lines. Downloads never wait for a decode, and this thread makes one
syscall per image: each syscall releases the GIL, and under busy download threads getting it
back is what made a main thread that wrote files the bottleneck. Verification runs in threads,
not processes: Pillow releases the GIL while it decodes, and on the 2-core development machine a
process pool made the whole command 1.37x slower on small photos (spawning it, copying every body
to it) and was within noise on full-size ones (bench/collect.py, README).
Search results are read lazily (a 100k-line URL list is streamed), and at most a window of them
is in flight at once.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from handler.cpus import usable_cpus
from jobs.config import Config, RunPaths
from jobs.fileio import atomic_write_json
from jobs.progress import Bar

from .attribution import write_attribution
from .download import Body, Downloader, DownloadError, DownloadSettings, ImageInfo, Unfinished, inspect_image
from .netsafety import AddressPolicy
from .preview import contact_sheet
from .sources import CollectError, SearchError, SearchResult, Source, make_source
from .store import RawStore, image_name, term_folder_name, write_image

SEARCH_FACTOR = 3  # look at up to this many results per wanted image before giving up on a term
MIN_SEARCH_SLACK = 20
IN_FLIGHT_PER_WORKER = 4  # candidates in flight per download thread: keeps threads and processes busy
REPORT = "collect_report.json"


@dataclass
class TermSummary:
    wanted: int
    already_had: int = 0
    found: int = 0
    downloaded: int = 0
    duplicate: int = 0
    failed: Counter = field(default_factory=Counter)
    retried: int = 0  # fetched again after failing in an earlier run
    retried_kept: int = 0
    skipped_failed: int = 0  # earlier permanent failures not fetched again (--retry-all fetches them)
    kept: int = 0
    search_error: str | None = None

    def line(self, term: str) -> str:
        failed = sum(self.failed.values())
        text = (f"  {term}: kept {self.kept}/{self.wanted} (found {self.found}, downloaded {self.downloaded}, "
                f"already had {self.already_had}, duplicate {self.duplicate}, failed {failed}"
                f"{f' - {_reasons(self.failed)}' if failed else ''})")
        if self.retried or self.skipped_failed:
            text += (f"; retried {self.retried} earlier failures ({self.retried_kept} kept), skipped "
                     f"{self.skipped_failed} permanent ones")
        return text + (f"; search failed: {self.search_error}" if self.search_error else "")


@dataclass
class SourceSummary:
    """This run's downloads from one source (``openverse:flickr``, ``urls:list.csv``, ...)."""

    tried: int = 0
    kept: int = 0
    duplicate: int = 0
    failed: Counter = field(default_factory=Counter)

    def line(self, name: str) -> str:
        failed = sum(self.failed.values())
        share = f" ({100 * failed / self.tried:.0f}%: {_reasons(self.failed)})" if failed else ""
        return f"  {name}: tried {self.tried}, kept {self.kept}, duplicate {self.duplicate}, failed {failed}{share}"


def _reasons(failed: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in failed.most_common())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry(result: SearchResult, status: str, body: Body | None = None, info: ImageInfo | None = None,
           file: str | None = None, error: DownloadError | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "url": result.url, "final_url": body.final_url if body else None,
        "sha256": body.sha256 if body else None, "size": len(body.data) if body else None,
        "width": info.width if info else None, "height": info.height if info else None,
        "format": info.format if info else None, "file": file,
        "source": result.source, "license": result.license, "license_url": result.license_url,
        "creator": result.creator, "title": result.title, "landing_url": result.landing_url,
        "fetched_at": _now(), "status": status, "error": str(error) if error else None,
    }
    if error:
        entry["retryable"], entry["permanent"] = error.retryable, error.permanent
    return entry


def verify_and_write(data: bytes, sha256: str, max_pixels: int, folder: Path) -> ImageInfo:
    """In a verification thread: decode ``data`` fully and, when it is an image, write it into ``folder``."""
    info = inspect_image(data, max_pixels)
    write_image(folder, sha256, info.ext, data)
    return info


@dataclass
class _Job:
    term: str
    result: SearchResult
    retry: bool  # failed in an earlier run
    body: Body | None = None  # set once downloaded; the job then waits for verification


class TermCollector:
    """Downloads for one run: shared store, downloader, download and verification pools; one term at a time."""

    def __init__(self, store: RawStore, downloader: Downloader, network: Executor, verify: Executor, window: int,
                 stop_at: float | None, retry_all: bool) -> None:
        self.store, self.downloader, self.network, self.verify = store, downloader, network, verify
        self.window, self.stop_at, self.retry_all = window, stop_at, retry_all
        self.sources: dict[str, SourceSummary] = {}
        self.stopped = False  # the run's deadline passed

    def deadline_passed(self) -> bool:
        self.stopped = self.stopped or (self.stop_at is not None and time.monotonic() >= self.stop_at)
        return self.stopped

    def collect_term(self, term: str, source: Source, wanted: int) -> TermSummary:
        summary = TermSummary(wanted=wanted, already_had=len(self.store.kept_entries(term)))
        if summary.already_had < wanted and not self.deadline_passed():
            results = source.search(term, max(wanted * SEARCH_FACTOR, wanted + MIN_SEARCH_SLACK))
            candidates = self._candidates(term, results, summary)
            with Bar(wanted, f"collect: {term}", unit="img", initial=summary.already_had) as bar:
                self._download_until(term, wanted, candidates, summary, bar)
            if summary.search_error:
                print(f"search for {term!r} on {source.name} failed: {summary.search_error}", file=sys.stderr)
        summary.kept = len(self.store.kept_entries(term))
        return summary

    def _candidates(self, term: str, results: Iterator[SearchResult], summary: TermSummary) -> Iterator[_Job]:
        """Results not settled by an earlier run, each URL once; counts every result as found."""
        settled, failed_before = self.store.settled_urls(term, self.retry_all), self.store.failed_urls(term)
        seen: set[str] = set()
        while True:
            try:
                result = next(results)
            except StopIteration:
                return
            except (AttributeError, KeyError, TypeError) as e:  # JSON of another shape than the source expects
                raise SearchError(f"unexpected response ({type(e).__name__}: {e}); is --endpoint that API?") from e
            summary.found += 1
            if result.url in seen:
                continue
            seen.add(result.url)
            if result.url in settled:
                summary.skipped_failed += result.url in failed_before
                continue
            yield _Job(term, result, retry=result.url in failed_before)

    def _download_until(self, term: str, wanted: int, candidates: Iterator[_Job], summary: TermSummary,
                        bar: Bar) -> None:
        """Keep at most ``window`` candidates in flight, and never more than are still missing."""
        have, exhausted = summary.already_had, False
        pending: dict[Future, _Job] = {}
        while True:
            while not exhausted and len(pending) < min(self.window, wanted - have) and not self.deadline_passed():
                try:
                    job = next(candidates, None)
                except SearchError as e:
                    job, summary.search_error = None, str(e)
                if job is None:
                    exhausted = True
                    break
                pending[self.network.submit(self._download, job)] = job
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                step = self._advance(job, future)
                if isinstance(step, Future):
                    pending[step] = job
                elif step is not None:
                    have += self._count(job, step, summary, bar)

    def _download(self, job: _Job) -> Future:
        """In a download thread: fetch, then hand the body to a verification thread."""
        job.body = self.downloader.fetch(job.result.url, self.stop_at)
        return self.verify.submit(verify_and_write, job.body.data, job.body.sha256,
                                  self.downloader.settings.max_pixels, self.store.raw / job.term)

    def _advance(self, job: _Job, future: Future) -> Future | dict[str, Any] | None:
        """A finished download is a verification in flight; a finished verification (or a failure) an entry."""
        try:
            value = future.result()
        except Unfinished:
            return None  # cut short by the run's deadline: as if never tried
        except DownloadError as e:
            entry = _entry(job.result, "failed", job.body, error=e)
        except OSError:
            raise  # writing an image failed (disk full, permissions): not the URL's fault
        except Exception as e:  # whatever a hostile server manages to provoke, one URL must not end the run
            entry = _entry(job.result, "failed", job.body, error=DownloadError(
                "unexpected error", f"{type(e).__name__}: {e}", permanent=False))
        else:
            if isinstance(value, Future):
                return value
            entry = self._keep(job, value)
        self.store.manifests[job.term].append(entry)
        return entry

    def _keep(self, job: _Job, info: ImageInfo) -> dict[str, Any]:
        """The verified file is on disk: keep it, or record a duplicate (and drop a copy in another folder)."""
        assert job.body is not None
        name = image_name(job.body.sha256, info.ext)
        existing = self.store.claim(job.term, job.body.sha256, info.ext)
        if existing is None:
            return _entry(job.result, "ok", job.body, info, file=name)
        if existing != f"{job.term}/{name}":
            (self.store.raw / job.term / name).unlink(missing_ok=True)
        return _entry(job.result, "duplicate", job.body, info, file=f"../{existing}")

    def _count(self, job: _Job, entry: dict[str, Any], summary: TermSummary, bar: Bar) -> int:
        """Tally one manifest entry; 1 when it kept an image."""
        source = self.sources.setdefault(job.result.source, SourceSummary())
        source.tried += 1
        summary.retried += job.retry
        if entry["status"] == "ok":
            summary.downloaded += 1
            summary.retried_kept += job.retry
            source.kept += 1
            bar.update(1)
            return 1
        if entry["status"] == "duplicate":
            summary.duplicate += 1
            source.duplicate += 1
        else:
            reason = entry["error"].split(":", 1)[0]
            summary.failed[reason] += 1
            source.failed[reason] += 1
            bar.write(f"  skip {entry['url']}: {entry['error']}", file=sys.stderr)
        return 0


def verification_pool() -> ThreadPoolExecutor:
    """Two threads per usable core: decoding releases the GIL, and a write waits on the disk."""
    return ThreadPoolExecutor(2 * usable_cpus(), thread_name_prefix="verify")


def collect(cfg: Config, paths: RunPaths, *, retry_all: bool = False, settings: DownloadSettings | None = None,
            policy: AddressPolicy | None = None) -> dict[str, Any]:
    """Fill ``paths.raw`` from ``cfg.source``; returns a summary (per term counts and the files written).

    ``retry_all`` also fetches URLs that failed permanently in an earlier run. ``settings`` and
    ``policy`` default from ``cfg``; tests pass shorter timeouts or a narrower policy. Raises
    CollectError for a source that cannot work as configured; failed searches and downloads are
    reported and skipped. When ``collect_deadline_minutes`` passes, the run stops and keeps what it
    has (``deadline_passed`` in the summary); the same call again continues.
    """
    started = time.monotonic()
    stop_at = started + cfg.collect_deadline_minutes * 60 if cfg.collect_deadline_minutes else None
    source = make_source(cfg)
    terms = list(dict.fromkeys(term_folder_name(t) for t in (source.classes() or cfg.terms)))
    if not terms:
        raise CollectError("config key 'terms' is empty; pass search terms, e.g. --terms puppies,kittens")
    settings = settings or DownloadSettings.from_config(cfg)
    policy = policy or AddressPolicy(allow_private=cfg.allow_private_addresses)
    store = RawStore(paths.raw, terms)
    downloader = Downloader(settings, policy, cfg.user_agent)
    print(f"collect: {len(terms)} terms from {source.name} into {paths.raw}", flush=True)
    summaries: dict[str, TermSummary] = {}
    network = ThreadPoolExecutor(cfg.download_workers, thread_name_prefix="download")
    verify = verification_pool()
    collector = TermCollector(store, downloader, network, verify, cfg.download_workers * IN_FLIGHT_PER_WORKER,
                              stop_at, retry_all)
    try:
        for term in terms:
            summaries[term] = collector.collect_term(term, source, source.target(term, cfg.images_per_term))
    finally:
        network.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: finish what runs, start nothing new
        verify.shutdown(wait=True, cancel_futures=True)
        downloader.close()
        store.close()
    kept = {term: store.kept_entries(term) for term in terms}
    attribution_md, attribution_json = write_attribution(paths.raw, kept)
    preview: Path | None = paths.raw / "collect_preview.png"
    if any(kept.values()):
        contact_sheet({t: [paths.raw / t / e["file"] for e in sorted(es, key=lambda e: e["file"])]
                       for t, es in kept.items()}, preview)
    else:  # a sheet of empty panels previews nothing (and an old one shows images no longer here)
        preview.unlink(missing_ok=True)
        preview = None
    failed = sum((s.failed for s in summaries.values()), Counter())
    tried = sum(s.tried for s in collector.sources.values())
    lines = ["collect summary:", *(s.line(t) for t, s in summaries.items())]
    if collector.sources:
        lines += ["by source:", *(s.line(name) for name, s in collector.sources.items())]
    if failed:
        lines.append(f"failed by reason: {_reasons(failed)} (of {tried} tried)")
    short = {t: f"{len(kept[t])}/{s.wanted}" for t, s in summaries.items() if len(kept[t]) < s.wanted}
    short.update({t: f"{len(kept[t])}/not reached" for t in terms if t not in summaries})
    if collector.stopped:
        lines.append(f"collect stopped: collect_deadline_minutes={cfg.collect_deadline_minutes:g} passed; still short: "
                     + (", ".join(f"{t} {n}" for t, n in short.items()) or "none")
                     + "; run the same command again to continue")
    print("\n".join(lines), flush=True)
    summary = {
        "source": source.name,
        "raw": str(paths.raw),
        "terms": {t: {**asdict(s), "failed": dict(s.failed), "folder": str(paths.raw / t)}
                  for t, s in summaries.items()},
        "kept": {t: len(es) for t, es in kept.items()},
        "failed_by_reason": dict(failed.most_common()),
        "sources": {name: {**asdict(s), "failed": dict(s.failed)} for name, s in collector.sources.items()},
        "retry_all": retry_all,
        "deadline_passed": collector.stopped,
        "manifests": [str(store.manifests[t].path) for t in terms],
        "attribution_md": str(attribution_md),
        "attribution_json": str(attribution_json),
        "preview": str(preview) if preview else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    summary["report"] = str(atomic_write_json(paths.raw / REPORT, summary))
    return summary
