"""Captured images (``jobs serve --capture DIR``): group them for review, and bring the labelled ones into a run.

A capture folder holds, per kept image, the bytes as received (``<stem>.<ext>``) and a JSON record beside it
(``<stem>.json``: the answer, model name and version, time, request id; ``handler/capture.py``). A capture is
named by its image's path relative to that folder, and in decisions.json as ``captured:<path>``
(``jobs.decisions``). The capture folder is only ever read: the server may be trimming it meanwhile, so a
capture that vanishes between listing and reading is simply not there.

- ``review_document``: the captures grouped by likeness in the run's own backbone features (as the audit
  measures them), groups least like the training images first; ``jobs review --captured`` shows it.
- ``bring_in``: copies the captures decisions.json relabels into ``<run>/captured/<class>/``, with
  ``<run>/captured/provenance.json`` saying where each came from; clean then reads them beside ``--data``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.config import RunPaths
from jobs.decisions import Decisions, captured_source, is_captured
from jobs.errors import JobError
from jobs.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes

PROVENANCE_FILE = "provenance.json"
REVIEW_FILE = "captured_review.json"  # in report/: what the review page shows of the captures
# What a brought-in image keeps of its capture record: when, by which model, for which request, and why.
PROVENANCE_KEYS = ("answered_at", "model_name", "model_version", "request_id", "why")


@dataclass(frozen=True)
class Capture:
    path: str  # relative to the capture folder: its name everywhere
    image: Path
    record: dict[str, Any]

    @property
    def source(self) -> str:
        return captured_source(self.path)


def _top(record: dict[str, Any]) -> dict[str, Any]:
    """The top prediction of a capture record's answer ({} when it has none)."""
    return ((record.get("answer") or {}).get("predictions") or [{}])[0]


def _record_of(image: Path) -> Path:
    return image.with_suffix(".json")


def capture_at(folder: Path, path: str) -> Capture | None:
    """The capture whose image is ``folder/path``, with its record; None when either is missing or unreadable."""
    image = folder / path
    if image.suffix == ".json" or not image.is_file():
        return None
    try:
        record = json.loads(_record_of(image).read_text())
    except (OSError, ValueError):
        return None
    return Capture(path, image, record) if isinstance(record, dict) else None


def read_captures(folder: Path) -> list[Capture]:
    """Every capture in ``folder`` (sub-folders too), oldest first: an image with its JSON record beside it."""
    if not folder.is_dir():
        raise JobError(f"--captured {folder} is not a folder; name the folder `jobs serve --capture` wrote")
    captures = []
    try:
        records = sorted(folder.rglob("*.json"))
    except PermissionError as e:
        raise JobError(f"--captured {folder}: cannot read {e.filename} (owner-only); run as the user that served, "
                       "or copy the folder") from None
    for record_file in records:
        relative = record_file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # the capture writer's state and partial files
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue  # trimmed meanwhile, or not a capture record
        name = record.get("image") if isinstance(record, dict) else None
        if isinstance(name, str) and "/" not in name and (record_file.parent / name).is_file():
            captures.append(Capture(str(relative.with_name(name)), record_file.parent / name, record))
    return captures


# ----------------------------------------------------------------------------------------------
# bring the labelled captures into the run


@dataclass(frozen=True)
class BroughtIn:
    file: Path  # the copy in <run>/captured/<class>/
    label: str
    source: str  # captured:<path>


def captured_area(paths: RunPaths) -> Path:
    return paths.out / "captured"


def bring_in(paths: RunPaths, folder: Path, choices: Decisions) -> list[BroughtIn]:
    """Copy the captures ``choices`` relabels into ``<run>/captured/<class>/`` and record their provenance.

    A copy made before is kept (the capture folder may have trimmed the original since); one whose decision
    is gone is removed, as clean removes its own stale outputs. A relabel naming no capture in ``folder`` and
    no earlier copy is one line naming decisions.json and the key.
    """
    area = captured_area(paths)
    provenance_file = area / PROVENANCE_FILE
    before = {e["source"]: e for e in read_json(provenance_file)["images"]} if provenance_file.is_file() else {}
    # Every label is checked before anything is copied: a bad one leaves the run as it was.
    found: dict[str, tuple[str, dict | Capture]] = {}
    for path, label in sorted(choices.captured_labels().items()):
        source = captured_source(path)
        earlier = before.get(source)
        capture = None if earlier and (paths.out / earlier["file"]).is_file() else capture_at(folder, path)
        if earlier is None and capture is None and not folder.is_dir():
            raise JobError(f"--captured {folder} is not a folder, and {paths.decisions} labels {source!r} from it; "
                           "name the folder `jobs serve --capture` wrote")
        if earlier is None and capture is None:
            raise JobError(f"{paths.decisions}: relabel {source!r} names no capture in {folder} (no such image, "
                           "or no record beside it); remove it from decisions.json, or pass the --captured folder "
                           "it came from")
        found[path] = (label, capture or earlier)
    entries, brought = [], []
    for path, (label, origin) in found.items():
        target = area / label / path.replace("/", "__")
        if isinstance(origin, Capture):
            data = origin.image.read_bytes()
            atomic_write_bytes(target, data)
            entry = {"source": origin.source, "class": label, "sha256": sha256_bytes(data),
                     "capture_folder": str(folder.absolute()), **{k: origin.record.get(k) for k in PROVENANCE_KEYS},
                     "answer": _top(origin.record).get("label")}
        else:  # copied before (the capture folder may have trimmed the original since)
            if paths.out / origin["file"] != target:  # relabelled since: the same bytes move to the new class
                target.parent.mkdir(parents=True, exist_ok=True)
                (paths.out / origin["file"]).replace(target)
            entry = {**origin, "class": label}
        entries.append({**entry, "file": str(target.relative_to(paths.out))})
        brought.append(BroughtIn(target, label, entry["source"]))
    wanted = {b.file for b in brought} | {provenance_file}
    stale = [p for p in area.rglob("*") if p.is_file() and p not in wanted] if area.is_dir() else []
    for p in stale:
        p.unlink()
    if stale:
        print(f"captured: {len(stale)} earlier copies no longer labelled in {paths.decisions} removed from {area}")
    if entries or before:
        atomic_write_json(provenance_file, {"images": entries})
    return brought


def brought_in_counts(paths: RunPaths) -> dict[str, int]:
    """Class -> captured images brought into the run (``provenance.json``); empty when none."""
    provenance_file = captured_area(paths) / PROVENANCE_FILE
    if not provenance_file.is_file():
        return {}
    return dict(sorted(Counter(e["class"] for e in read_json(provenance_file)["images"]).items()))


def captured_test_items(paths: RunPaths, splits: dict) -> list[tuple[str, str]]:
    """(file in the run folder, class) of the brought-in captures that are in ``splits``' test split."""
    provenance_file = captured_area(paths) / PROVENANCE_FILE
    if not provenance_file.is_file():
        return []
    report = read_json(paths.clean_report)
    output_of = {f["source"]: f["output"] for f in report["files"] if is_captured(f["source"]) and f["output"]}
    test = {f for f, s in splits["files"].items() if s == "test"}
    return [(output_of[e["source"]], e["class"]) for e in read_json(provenance_file)["images"]
            if output_of.get(e["source"]) in test]


# ----------------------------------------------------------------------------------------------
# group the captures for review


def _unit_rows(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64) - centre
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_spread(train_unit: np.ndarray, labels: np.ndarray) -> float:
    """The median over classes of the mean cosine distance between two training images of one class.

    The mean pairwise cosine of n unit rows is (|sum|^2 - n) / (n (n - 1)): no n x n matrix is needed.
    """
    spreads = []
    for label in np.unique(labels):
        rows = train_unit[labels == label]
        n = len(rows)
        if n >= 2:
            total = rows.sum(axis=0)
            spreads.append(1.0 - (float(total @ total) - n) / (n * (n - 1)))
    return float(np.median(spreads)) if spreads else 0.5


def group_by_likeness(capture_features: np.ndarray, train_features: np.ndarray, train_labels: np.ndarray,
                      threshold_scale: float = 1.0) -> tuple[list[list[int]], np.ndarray, float]:
    """Groups of captures (indices), most unlike the training images first, and within each group the least
    like first; also each capture's cosine distance to its nearest training image, and the threshold.

    Features are centred on the training images' mean (a backbone's features share a large common component)
    and compared by cosine. Captures join by average linkage while a group stays as tight as a typical
    training class (``class_spread``, times ``threshold_scale``): a new kind of input, like one class of its own,
    becomes one group. A group's place is its mean distance times log(1 + its size): how much of the unlike
    lies in it. By the mean distance alone, a new class of the same domain came after the few odd photos of
    the known classes (top three in 20 % of the tasks of ``bench/captured_groups.py``; so weighted, in all).
    """
    from sklearn.cluster import AgglomerativeClustering

    centre = np.asarray(train_features, dtype=np.float64).mean(axis=0)
    unit, train_unit = _unit_rows(capture_features, centre), _unit_rows(train_features, centre)
    distance = 1.0 - (unit @ train_unit.T).max(axis=1)
    threshold = class_spread(train_unit, np.asarray(train_labels)) * threshold_scale
    if len(unit) < 2:
        assignment = np.zeros(len(unit), dtype=int)
    else:
        assignment = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                             distance_threshold=threshold).fit(unit).labels_
    groups = [sorted(np.flatnonzero(assignment == g).tolist(), key=lambda i: -distance[i])
              for g in np.unique(assignment)]
    groups.sort(key=lambda members: -float(np.mean(distance[members])) * np.log1p(len(members)))
    return groups, distance, threshold


def _card(capture: Capture, distance: float | None) -> dict[str, Any]:
    answer, top = capture.record.get("answer") or {}, _top(capture.record)
    return {"file": capture.source, "distance": distance, "why": capture.record.get("why"),
            "answered": top.get("label"), "probability": top.get("probability"),
            "abstain_reason": answer.get("abstain_reason") if answer.get("abstain") else None,
            "ood_score": answer.get("ood_score"),
            **{k: capture.record.get(k) for k in ("answered_at", "model_version")}}


def review_document(cfg: Any, paths: RunPaths, rt: Any, folder: Path) -> dict[str, Any]:
    """What the review page shows of ``folder``'s captures (``report/captured_review.json``): groups by likeness in
    the run's backbone features, least like its training images first, and the captures that cannot be decoded."""
    from PIL import Image

    from jobs import features
    from jobs.audit import audit_backbone
    from jobs.data import load_splits, split_items
    from jobs.fileio import read_run_file

    captures = read_captures(folder)
    readable, unreadable = [], []
    for capture in captures:
        try:
            with Image.open(capture.image) as img:
                img.load()
            readable.append(capture)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            unreadable.append(capture)
    doc: dict[str, Any] = {"folder": str(folder.resolve()), "captures": len(captures), "groups": [],
                           "unreadable": [_card(c, None) for c in unreadable]}
    if not readable:
        return doc
    report = read_run_file(paths.clean_report, f"run `python -m jobs clean --out {paths.out} --data DATA`",
                           ("files", "classes"))
    splits = load_splits(paths)
    backbone = audit_backbone(cfg, rt, len(report["classes"]))
    train = split_items(splits, "train")
    shas = features.content_hashes(paths)
    num_classes = len(report["classes"])  # as the audit builds the backbone: its cached features are reused
    train_features = features.view_features(cfg, paths, rt, backbone, num_classes, [(p, shas[p]) for p, _ in train],
                                            1, "training images")[:, 0].numpy()
    # An absolute path: the feature loader reads run-folder paths, and the capture folder is elsewhere.
    capture_features = features.view_features(
        cfg, paths, rt, backbone, num_classes,
        [(str(c.image.resolve()), sha256_bytes(c.image.read_bytes())) for c in readable], 1, "captured")[:, 0].numpy()
    groups, distance, threshold = group_by_likeness(capture_features, train_features,
                                                    np.array([label for _, label in train]))
    doc["threshold"] = threshold
    doc["groups"] = [{"mean_distance": float(np.mean(distance[members])),
                      "cards": [_card(readable[i], float(distance[i])) for i in members]} for members in groups]
    return doc


def write_review_document(paths: RunPaths, doc: dict[str, Any]) -> Path:
    return atomic_write_json(paths.report / REVIEW_FILE, doc)


def saved_review_document(paths: RunPaths) -> dict[str, Any] | None:
    """The captures the review page shows (``jobs review --captured`` wrote it), or None."""
    saved = paths.report / REVIEW_FILE
    return read_json(saved) if saved.is_file() else None
