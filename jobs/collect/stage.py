"""The collect stage: search each term, download up to ``images_per_term`` images into ``raw/<term>/``.

Candidates are taken in search-result order, in batches of exactly as many as are still missing,
so the kept images are the first ``images_per_term`` that download and decode. That makes the folder
a function of the search results: a run killed at any point and run again ends with the same
files as an uninterrupted run (transient failures aside, which a re-run retries).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from jobs.config import Config, RunPaths

from .attribution import write_attribution
from .download import Downloader, DownloadError, DownloadSettings, Fetched
from .netsafety import AddressPolicy
from .preview import contact_sheet
from .sources import CollectError, SearchError, SearchResult, Source, make_source
from .store import RawStore, term_folder_name

SEARCH_FACTOR = 3  # look at up to this many results per wanted image before giving up on a term
MIN_SEARCH_SLACK = 20


@dataclass
class TermSummary:
    wanted: int
    already_had: int = 0
    found: int = 0
    downloaded: int = 0
    duplicate: int = 0
    failed: Counter = field(default_factory=Counter)
    kept: int = 0
    search_error: str | None = None

    def line(self, term: str) -> str:
        failed = sum(self.failed.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in self.failed.most_common())
        text = (f"  {term}: kept {self.kept}/{self.wanted} (found {self.found}, downloaded {self.downloaded}, "
                f"already had {self.already_had}, duplicate {self.duplicate}, failed {failed}"
                f"{f' - {reasons}' if reasons else ''})")
        return text + (f"; search failed: {self.search_error}" if self.search_error else "")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry(result: SearchResult, status: str, fetched: Fetched | None = None, file: str | None = None,
           error: DownloadError | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "url": result.url, "final_url": fetched.final_url if fetched else None,
        "sha256": fetched.sha256 if fetched else None, "size": len(fetched.data) if fetched else None,
        "width": fetched.info.width if fetched else None, "height": fetched.info.height if fetched else None,
        "format": fetched.info.format if fetched else None, "file": file,
        "source": result.source, "license": result.license, "license_url": result.license_url,
        "creator": result.creator, "title": result.title, "landing_url": result.landing_url,
        "fetched_at": _now(), "status": status, "error": str(error) if error else None,
    }
    if error:
        entry["retryable"], entry["permanent"] = error.retryable, error.permanent
    return entry


class TermCollector:
    """Downloads for one run: shared store, downloader and thread pool; one term at a time."""

    def __init__(self, store: RawStore, downloader: Downloader, pool: ThreadPoolExecutor) -> None:
        self.store, self.downloader, self.pool = store, downloader, pool

    def fetch_one(self, term: str, result: SearchResult) -> dict[str, Any]:
        """Download, dedupe and store one result; returns the manifest entry it appended."""
        try:
            fetched = self.downloader.fetch(result.url)
        except DownloadError as e:
            entry = _entry(result, "failed", error=e)
        except Exception as e:  # whatever a hostile server manages to provoke, one URL must not end the run
            entry = _entry(result, "failed", error=DownloadError("unexpected error", f"{type(e).__name__}: {e}",
                                                                 permanent=False))
        else:
            entry = self._store(term, result, fetched)
        self.store.manifests[term].append(entry)
        return entry

    def _store(self, term: str, result: SearchResult, fetched: Fetched) -> dict[str, Any]:
        existing = self.store.claim(term, fetched.sha256, fetched.info.ext)
        if existing:
            return _entry(result, "duplicate", fetched, file=f"../{existing}")
        try:
            name = self.store.write(term, fetched.sha256, fetched.info.ext, fetched.data)
        except BaseException:
            self.store.release(fetched.sha256)
            raise
        return _entry(result, "ok", fetched, file=name)

    def collect_term(self, term: str, source: Source, wanted: int) -> TermSummary:
        summary = TermSummary(wanted=wanted, already_had=len(self.store.kept_entries(term)))
        have = summary.already_had
        if have < wanted:
            settled = self.store.settled_urls(term)
            results = source.search(term, max(wanted * SEARCH_FACTOR, wanted + MIN_SEARCH_SLACK))
            candidates = self._candidates(results, settled, summary)
            with tqdm(total=wanted, initial=have, desc=term, unit="img", file=sys.stderr) as bar:
                try:
                    self._download_until(term, wanted, candidates, summary, bar)
                except SearchError as e:
                    summary.search_error = str(e)
                    tqdm.write(f"search for {term!r} on {source.name} failed: {e}", file=sys.stderr)
        summary.kept = len(self.store.kept_entries(term))
        return summary

    @staticmethod
    def _candidates(results: Iterator[SearchResult], settled: set[str], summary: TermSummary) -> Iterator[SearchResult]:
        """Results not settled by an earlier run, each URL once; counts every result as found."""
        seen: set[str] = set()
        while True:
            try:
                result = next(results)
            except StopIteration:
                return
            except (AttributeError, KeyError, TypeError) as e:  # JSON of another shape than the source expects
                raise SearchError(f"unexpected response ({type(e).__name__}: {e}); is --endpoint that API?") from e
            summary.found += 1
            if result.url not in seen and result.url not in settled:
                seen.add(result.url)
                yield result

    def _download_until(self, term: str, wanted: int, candidates: Iterator[SearchResult],
                        summary: TermSummary, bar: tqdm) -> None:
        have = summary.already_had
        while have < wanted:
            batch = [r for _, r in zip(range(wanted - have), candidates, strict=False)]
            if not batch:
                return
            for future in as_completed([self.pool.submit(self.fetch_one, term, r) for r in batch]):
                entry = future.result()
                if entry["status"] == "ok":
                    have += 1
                    summary.downloaded += 1
                    bar.update(1)
                elif entry["status"] == "duplicate":
                    summary.duplicate += 1
                else:
                    summary.failed[entry["error"].split(":", 1)[0]] += 1
                    tqdm.write(f"  skip {entry['url']}: {entry['error']}", file=sys.stderr)


def collect(cfg: Config, paths: RunPaths, *, settings: DownloadSettings | None = None,
            policy: AddressPolicy | None = None) -> dict[str, Any]:
    """Fill ``paths.raw`` from ``cfg.source``; returns a summary (per term counts and the files written).

    ``settings`` and ``policy`` default from ``cfg``; tests pass shorter timeouts or a narrower policy.
    Raises CollectError for a source that cannot work as configured; failed searches and downloads
    are reported and skipped.
    """
    started = time.monotonic()
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
    pool = ThreadPoolExecutor(cfg.download_workers, thread_name_prefix="download")
    try:
        collector = TermCollector(store, downloader, pool)
        for term in terms:
            summaries[term] = collector.collect_term(term, source, source.target(term, cfg.images_per_term))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: finish what runs, start nothing new
    kept = {term: store.kept_entries(term) for term in terms}
    attribution_md, attribution_json = write_attribution(paths.raw, kept)
    preview = contact_sheet({t: [paths.raw / t / e["file"] for e in sorted(es, key=lambda e: e["file"])]
                             for t, es in kept.items()}, paths.raw / "collect_preview.png")
    print("collect summary:\n" + "\n".join(s.line(t) for t, s in summaries.items()), flush=True)
    return {
        "source": source.name,
        "raw": str(paths.raw),
        "terms": {t: {**asdict(s), "failed": dict(s.failed), "folder": str(paths.raw / t)}
                  for t, s in summaries.items()},
        "manifests": [str(store.manifests[t].path) for t in terms],
        "attribution_md": str(attribution_md),
        "attribution_json": str(attribution_json),
        "preview": str(preview),
        "seconds": round(time.monotonic() - started, 1),
    }
