"""Clean: decode every file fully, keep the good, convert the odd, quarantine the rest.

Input: ``data/<class>/**/<file>`` (never modified), and with the ``captured`` key the captured images
decisions.json labels (copied into ``<out>/captured/`` first: ``jobs.captured``; sources ``captured:<path>``).
Output: ``<out>/dataset/<class>/<file>``
(hard links of good files, RGB re-encodes of odd ones), ``<out>/quarantine/<reason>/...`` and
``clean_report.json``. Decisions are cached by content hash, so a re-run on an unchanged
folder decodes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import multiprocessing
import os
import warnings
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from handler.cpus import usable_cpus
from handler.images import to_rgb
from jobs import captured, decisions
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_bytes, atomic_write_json, link_or_copy, read_json, sha256_file, sweep_partials
from jobs.imagestats import image_stats
from jobs.progress import track

# Sidecar files other stages keep next to images (collect's manifest, partial downloads).
IGNORED_NAMES = {"manifest.jsonl", "ATTRIBUTION.md", "attribution.json", "Thumbs.db", "desc.txt"}
TRAINABLE_AS_IS = {"JPEG", "PNG", "WEBP", "BMP"}
# Scraped GIFs are animations, placeholders ("image not found") and logos far more often than
# photos; 256 colours also make poor training data. They are quarantined for a person to check.
EXCLUDED_FORMATS = {"GIF"}
CACHE_VERSION = 3
# Decoding holds the GIL part of the time (numpy's measurements, the Python between calls): on 2 cores four
# threads decoded 276 img/s and two processes 408 (400 px JPEGs of the scale benchmark). A process pool takes
# about a second to start, so it decodes only where at least this many files are to be decoded; fewer go to threads.
PROCESS_POOL_MIN = 1000


class CleanError(JobError):
    """The input folder cannot produce a training set; the message says what to fix."""


@dataclass
class FileResult:
    source: str  # path relative to the data folder
    label: str
    sha256: str
    status: str  # kept | converted | excluded
    # for excluded: not_an_image, corrupt, decompression_bomb, unsupported, too_small, duplicate;
    # paths not read at all: outside_data, broken_link, not_a_regular_file (these have no sha256)
    reason: str = ""
    detail: str = ""
    output: str = ""  # path relative to <out>
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""
    pixel_hash: str = ""
    # jobs.imagestats: pHash and quality measurements, for the audit; never changed once made (record() shares it)
    stats: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The fields as a dict, for JSON. A shallow copy: ``dataclasses.asdict`` deep-copies ``stats``, which is
        never changed once made, and cost the parent 0.3 ms a file, twice (issue 27)."""
        return dict(vars(self))


@dataclass
class Found:
    """What ``discover`` saw: files to decode per class, and paths it will not read (with the reason)."""

    files: dict[str, list[Path]]
    unreadable: list[FileResult]


def discover(data: Path, follow_symlinks: bool = False) -> Found:
    """Class name -> files under ``data/<class>/`` (recursively), sorted, sidecars skipped.

    Every other path gets a report line: a symbolic link that leads outside ``data`` (unless
    ``follow_symlinks``), a broken link, and anything that is not a regular file (a FIFO would block
    a reader forever).
    """
    if not data.is_dir():
        raise CleanError(f"--data {data} is not a folder; point it at a folder with one sub-folder per class")
    root = data.resolve()
    found = Found({}, [])

    def refuse(path: Path, label: str, reason: str, detail: str) -> None:
        found.unreadable.append(FileResult(source=str(path.relative_to(data)), label=label, sha256="",
                                           status="excluded", reason=reason, detail=detail))

    def usable(path: Path, label: str) -> bool:
        """Whether to read ``path`` (a file, or a folder to walk); refuse it otherwise."""
        if path.is_symlink():
            if not path.exists():
                refuse(path, label, "broken_link", f"link to {os.readlink(path)}, which does not exist")
                return False
            target = path.resolve()
            if not follow_symlinks and not target.is_relative_to(root):
                refuse(path, label, "outside_data", f"link to {target}, outside --data; set follow_symlinks: true "
                       "to read it")
                return False
        if path.is_dir() or path.is_file():
            return True
        refuse(path, label, "not_a_regular_file", "a FIFO, socket or device; not read")
        return False

    def walk(folder: Path, label: str, seen: set[Path]) -> list[Path]:
        files = []
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or entry.name in IGNORED_NAMES or entry.name.endswith(".part"):
                continue
            if not usable(entry, label):
                continue
            if entry.is_dir():
                if entry.resolve() not in seen:  # a link back up the tree would loop forever
                    files += walk(entry, label, seen | {entry.resolve()})
            else:
                files.append(entry)
        return files

    for class_dir in sorted(p for p in data.iterdir() if not p.name.startswith(".")):
        if decisions.is_captured(class_dir.name):
            raise CleanError(f"--data {data} has a class folder {class_dir.name!r}; rename it: 'captured:' names the "
                             "captured images in decisions.json")
        if usable(class_dir, class_dir.name) and class_dir.is_dir():
            found.files[class_dir.name] = walk(class_dir, class_dir.name, {class_dir.resolve()})
    if not found.files:
        raise CleanError(f"--data {data} has no class sub-folders; expected {data}/<class>/<images>")
    if len(found.files) < 2:
        raise CleanError(f"--data {data} has one class ({next(iter(found.files))}); a classifier needs at least two "
                         "sub-folders")
    return found


def inspect_image(path: Path, min_size: int, max_pixels: int) -> tuple[dict, Image.Image | None]:
    """Decode ``path`` fully. Returns (facts, RGB image or None when excluded)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    if path.stat().st_size == 0:
        return {"status": "excluded", "reason": "not_an_image", "detail": "zero bytes"}, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                facts = {"format": img.format or "", "mode": img.mode, "width": img.width, "height": img.height}
                frames = getattr(img, "n_frames", 1)
                if img.format in EXCLUDED_FORMATS or frames > 1:
                    return {**facts, "status": "excluded", "reason": "unsupported",
                            "detail": f"{img.format} ({frames} frame{'s' if frames > 1 else ''}); not trained on"}, None
                img.load()
                rotated = _exif_orientation(img) not in (0, 1)
                upright = ImageOps.exif_transpose(img)  # a new image, rotated or not: no copy of it is needed
                rgb = to_rgb(upright) if upright.mode != "RGB" else upright
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return {"status": "excluded", "reason": "decompression_bomb",
                "detail": f"{e} (limit Image.MAX_IMAGE_PIXELS = max_image_pixels = {max_pixels})"}, None
    except Image.UnidentifiedImageError:
        return {"status": "excluded", "reason": "not_an_image", "detail": "Pillow cannot identify it"}, None
    except (OSError, SyntaxError, ValueError) as e:
        return {"status": "excluded", "reason": "corrupt", "detail": f"{type(e).__name__}: {e}"[:200]}, None
    if min(rgb.size) < min_size:
        return {**facts, "status": "excluded", "reason": "too_small",
                "detail": f"{rgb.width}x{rgb.height} is below min_image_size={min_size}"}, None
    as_is = facts["format"] in TRAINABLE_AS_IS and facts["mode"] == "RGB" and not rotated
    detail = "" if as_is else f"{facts['format']} {facts['mode']}{' EXIF-rotated' if rotated else ''} -> RGB"
    return {**facts, "status": "kept" if as_is else "converted", "detail": detail}, rgb


def _exif_orientation(img: Image.Image) -> int:
    with contextlib.suppress(Exception):
        return int(img.getexif().get(0x0112, 1))
    return 1


def pixel_hash(rgb: Image.Image) -> str:
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _output_name(source: Path, class_dir: Path, converted: bool) -> str:
    flat = "__".join(source.relative_to(class_dir).parts)
    return flat + ".png" if converted and not flat.lower().endswith(".png") else flat


def _check_one(job: tuple[Path, str, str, str, dict | None], cfg: Config) -> tuple[FileResult, bool]:
    """(what the file ``job`` = (path, label, path relative to the data, content hash, what the cache holds for
    it) is, whether it was decoded now rather than taken from the cache).

    The decoded image is dropped here: holding every one until the files are placed made clean's
    memory grow with the data (2.0 GB at 5,000 photos of 400 px, issue 27). A file to convert is
    decoded again when it is written, which costs only the few that are not trainable as they are.
    """
    path, label, rel, sha, cached = job
    if cached is not None:
        return FileResult(**{**cached, "source": rel, "label": label}), False
    facts, rgb = inspect_image(path, cfg.min_image_size, cfg.max_image_pixels)
    result = FileResult(source=rel, label=label, sha256=sha, **facts)
    if rgb is not None:
        result.pixel_hash = pixel_hash(rgb)
        result.stats = image_stats(rgb)  # in the same decode: a rerun decodes nothing
    return result, True


def _decoders(count: int) -> Executor:
    """The pool that decodes ``count`` files: processes for many, threads for a few."""
    cpus = usable_cpus()
    if count >= PROCESS_POOL_MIN and cpus > 1:
        # forkserver: the workers are forked from a fresh process, never from this one, which may hold torch's
        # threads or a torchrun process group's.
        return ProcessPoolExecutor(cpus, mp_context=multiprocessing.get_context("forkserver"))
    return ThreadPoolExecutor(max_workers=min(4, cpus))


def clean(cfg: Config, paths: RunPaths, data: Path) -> Path:
    """Build ``<out>/dataset`` from ``data``; returns the path of ``clean_report.json``."""
    data = Path(data).absolute()
    sweep_partials(paths.dataset, paths.quarantine, paths.cache, paths.clean_report)
    found = discover(data, cfg.follow_symlinks)
    classes = found.files
    cache_file = paths.cache / "clean_cache.json"
    cache = _load_cache(cache_file, cfg)
    stat_cache: dict = cache.setdefault("stat", {})
    by_content: dict = cache.setdefault("results", {})
    choices = decisions.load(paths, list(classes))
    brought = _captured(cfg, paths, choices)

    inputs = [(f, label, str(f.relative_to(data))) for label, files in classes.items() for f in files]
    inputs += [(b.file, b.label, b.source) for b in brought]
    jobs = []
    for f, label, source in inputs:
        st = f.stat()
        stat_key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        sha = stat_cache.get(stat_key) or sha256_file(f)
        stat_cache[stat_key] = sha
        jobs.append((f, label, source, sha, by_content.get(sha)))

    with _decoders(sum(job[-1] is None for job in jobs)) as pool:
        checked = list(track(pool.map(functools.partial(_check_one, cfg=cfg), jobs, chunksize=64), len(jobs),
                             "clean: decoding", unit="img"))
    for result, _ in checked:  # what decoding found, before duplicates and decisions re-classify it
        by_content[result.sha256] = {k: v for k, v in result.record().items() if k not in {"source", "label"}}

    results = _place_files(checked, jobs, data, paths, choices) + found.unreadable
    atomic_write_json(cache_file, cache)
    new_classes = sorted({r.label for r in results if r.status != "excluded"} - set(classes))  # captures started it
    report = _summarize(results, data, [*classes, *new_classes])
    atomic_write_json(paths.clean_report, report)
    _print_summary(report)
    _refuse_small_classes(report, cfg)
    return paths.clean_report


def _captured(cfg: Config, paths: RunPaths, choices: decisions.Decisions) -> list[captured.BroughtIn]:
    """The captured images decisions.json labels, copied into the run (``cfg.captured``), to clean beside the data."""
    labelled = choices.captured_labels()
    if not cfg.captured:
        if labelled:
            print(f"clean: {paths.decisions} labels {len(labelled)} captured images; pass --captured DIR (the capture "
                  "folder) to bring them in")
        return []
    brought = captured.bring_in(paths, Path(cfg.captured), choices)
    by_class = ", ".join(f"{c} {n}" for c, n in sorted(Counter(b.label for b in brought).items()))
    print(f"clean: captured: {len(brought)} images labelled in {paths.decisions} brought in from {cfg.captured}"
          f"{f' ({by_class})' if by_class else ''}")
    return brought


def _place_files(checked: list[tuple[FileResult, bool]], jobs: list[tuple], data: Path,
                 paths: RunPaths, choices: decisions.Decisions) -> list[FileResult]:
    """Apply decisions and duplicates, then link or write each usable file into dataset/ and the rest
    into quarantine/; drop stale outputs.

    The same pixels within one class: one copy is kept, the rest are duplicates. The same pixels
    in two classes: a label conflict, every copy excluded (not silently kept in the first class)
    until a decision keeps one.
    """
    results = [result for result, _ in checked]
    decoded_now = {id(result): fresh for result, fresh in checked}
    sources = {id(result): src for result, (src, *_rest) in zip(results, jobs)}
    applied = _apply_decisions(results, choices)
    by_pixels: dict[str, list[FileResult]] = {}
    for r in results:
        if r.status != "excluded":
            by_pixels.setdefault(r.pixel_hash, []).append(r)
    for copies in by_pixels.values():
        first_in_class: dict[str, FileResult] = {}
        for r in copies:
            if r.label in first_in_class:
                r.status, r.reason = "excluded", "duplicate"
                r.detail = f"same pixels as {first_in_class[r.label].source}"
            else:
                first_in_class[r.label] = r
        if len(first_in_class) > 1:
            for r in first_in_class.values():
                if r.source not in choices.keep:
                    others = [o.source for o in first_in_class.values() if o is not r]
                    r.status, r.reason = "excluded", "label_conflict"
                    r.detail = f"same pixels as {', '.join(others)} in another class; keep one in review"

    wanted: set[Path] = set()
    for r in results:
        src = sources[id(r)]
        # A captured image's copy sits flat in <out>/captured/<class>/; a data file under its class folder.
        class_dir = src.parent if decisions.is_captured(r.source) else data / Path(r.source).parts[0]
        name = _output_name(src, class_dir, r.status == "converted")
        if r.status == "excluded":
            target = paths.quarantine / r.reason / r.label / name
            link_or_copy(src, target)
        else:
            target = paths.dataset / r.label / name
            if target in wanted:  # a relabelled file whose name the class already has
                target = target.with_name(f"{Path(name).stem}__{r.sha256[:10]}{Path(name).suffix}")
            if r.status == "kept":
                link_or_copy(src, target)
            elif decoded_now[id(r)] or not target.exists():
                atomic_write_bytes(target, _png_bytes(_reconvert(src)))
        r.output = str(target.relative_to(paths.out))
        wanted.add(target)
    for folder in (paths.dataset, paths.quarantine):
        if folder.exists():
            for stale in (p for p in folder.rglob("*") if p.is_file() and p not in wanted):
                stale.unlink()  # our own output from an earlier run whose source is gone or moved
    if len(choices):
        print(f"clean: decisions: {applied['exclude']} excluded, {applied['relabel']} relabelled, "
              f"{applied['keep']} kept ({paths.decisions})")
    return results


def _apply_decisions(results: list[FileResult], choices: decisions.Decisions) -> dict[str, int]:
    """Exclusions and relabels, before duplicates and the minimum-images check; returns what applied."""
    present = {r.source for r in results}
    # A captured image is here only when labelled (jobs.captured); its other decisions keep it out, as meant.
    missing = sorted(s for s in choices.sources() - present if not decisions.is_captured(s))
    if missing:
        print(f"clean: decisions: {len(missing)} for files no longer in the data, skipped: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for r in results:
        if r.source in choices.exclude:
            r.status, r.reason, r.detail = "excluded", "decision", "excluded in review"
        elif r.source in choices.relabel and r.status != "excluded" and r.label != choices.relabel[r.source]:
            r.detail = f"relabelled from {r.label} in review"
            r.label = choices.relabel[r.source]
    return {"exclude": len(choices.exclude & present), "relabel": len(set(choices.relabel) & present),
            "keep": len(choices.keep & present)}


def _reconvert(src: Path) -> Image.Image:
    with Image.open(src) as img:
        return to_rgb(ImageOps.exif_transpose(img))


def _png_bytes(rgb: Image.Image) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _load_cache(cache_file: Path, cfg: Config) -> dict:
    key = {"version": CACHE_VERSION, "min_image_size": cfg.min_image_size, "max_image_pixels": cfg.max_image_pixels}
    try:
        cache = read_json(cache_file)
        if cache.get("key") == key:
            return cache
    except (OSError, ValueError):
        pass
    return {"key": key}


def _summarize(results: list[FileResult], data: Path, labels: list[str]) -> dict:
    """Counts per class (a refused class folder is no class); every path looked at is in ``files``."""
    summary: dict[str, dict[str, int]] = {label: {"kept": 0, "converted": 0, "excluded": 0, "usable": 0}
                                          for label in labels}
    for r in results:
        if r.label not in summary:
            continue
        counts = summary[r.label]
        counts[r.status] += 1
        counts["usable"] += r.status != "excluded"
    usable = sorted((r.output, r.sha256) for r in results if r.status != "excluded")
    return {
        "data": str(data),
        "data_hash": hashlib.sha256(repr(usable).encode()).hexdigest(),
        "classes": summary,
        "files": [r.record() for r in results],
    }


def _print_summary(report: dict) -> None:
    print("clean: class            kept  converted  excluded")
    for label, c in report["classes"].items():
        print(f"clean: {label:<16} {c['kept']:>5} {c['converted']:>10} {c['excluded']:>9}")
    reasons: dict[str, int] = {}
    for f in report["files"]:
        if f["status"] == "excluded":
            reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    if reasons:
        print("clean: excluded by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    usable = {k: v["usable"] for k, v in report["classes"].items()}
    if usable and min(usable.values()) > 0 and max(usable.values()) > 3 * min(usable.values()):
        print(f"clean: WARNING class imbalance over 3:1 ({usable}); consider more images for the small classes")


def _refuse_small_classes(report: dict, cfg: Config) -> None:
    for label, counts in report["classes"].items():
        if counts["usable"] < cfg.min_images_per_class:
            raise CleanError(
                f"class '{label}' has {counts['usable']} usable images (min_images_per_class="
                f"{cfg.min_images_per_class}); add images, or lower --min-images-per-class"
                + (" (see clean_report.json for why files were excluded)" if counts["excluded"] else "")
            )
