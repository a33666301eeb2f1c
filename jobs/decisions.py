"""A person's review decisions, ``<out>/decisions.json``, as clean and split honour them.

    {"exclude": ["cats/x.jpg"], "relabel": {"dogs/y.jpg": "cats"}, "keep": ["cats/z.jpg"]}

Every path is a source path relative to the data folder, class folder included, exactly as in
``clean_report.json``'s ``source`` and in ``audit.json``. ``exclude`` leaves every split,
``relabel`` trains a file as another class, ``keep`` overrides a conflict exclusion for that one
file (it is trained in its own folder's class).

A captured image (what the served model met, ``jobs serve --capture DIR``) is named by its path relative to
the capture folder behind ``captured:``, in the same three keys:

    {"relabel": {"captured:20261204T101500.000000Z-req-0.jpg": "tulip"},
     "exclude": ["captured:20261204T101501.000000Z-req-0.jpg"]}

A data path always begins with a class folder, and clean refuses a class folder named ``captured:...``, so
the two never meet. Only a captured image may be relabelled to a new class (it becomes one); ``jobs run
--captured DIR`` brings in the captured images relabelled here (``jobs.captured``), and no other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jobs.config import RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_json

KINDS = ("exclude", "relabel", "keep")
CAPTURED_PREFIX = "captured:"


def is_captured(source: str) -> bool:
    return source.startswith(CAPTURED_PREFIX)


def captured_source(capture_path: str) -> str:
    """How decisions.json, clean_report.json and the review page name the capture at ``capture_path``."""
    return CAPTURED_PREFIX + capture_path


def capture_path(source: str) -> str:
    """The path relative to the capture folder of a ``captured:`` source."""
    return source.removeprefix(CAPTURED_PREFIX)


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class (it becomes a folder name under dataset/), or None."""
    if not name.strip() or name != name.strip():
        return "is empty or begins or ends with a space"
    if "/" in name or "\\" in name or name.startswith(".") or is_captured(name):
        return "cannot hold a slash, begin with a dot or with 'captured:' (it names a folder)"
    return None


def _capture_path_problem(source: str) -> str | None:
    """Why a ``captured:`` source cannot name a file inside the capture folder, or None."""
    path = capture_path(source)
    if not path or path.startswith("/") or ".." in path.split("/") or path.startswith("."):
        return "must be captured:<path relative to the capture folder>"
    return None


class DecisionsError(JobError):
    pass


@dataclass(frozen=True)
class Decisions:
    exclude: frozenset[str] = frozenset()
    relabel: dict[str, str] = field(default_factory=dict)
    keep: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.exclude) + len(self.relabel) + len(self.keep)

    def sources(self) -> set[str]:
        return set(self.exclude) | set(self.relabel) | set(self.keep)

    def captured_labels(self) -> dict[str, str]:
        """Capture path (relative to the capture folder) -> the class a person gave it."""
        return {capture_path(s): c for s, c in self.relabel.items() if is_captured(s)}

    def document(self) -> dict:
        """As decisions.json holds it: all three keys, sorted."""
        return {"exclude": sorted(self.exclude), "relabel": dict(sorted(self.relabel.items())),
                "keep": sorted(self.keep)}


def parse(doc: object, where: str, classes: Sequence[str] | None = None) -> Decisions:
    """Validate a decisions document; one line, starting with ``where``, says what is wrong."""
    def bad(why: str) -> DecisionsError:
        return DecisionsError(f"{where}: {why}")

    if not isinstance(doc, dict):
        raise bad('decisions must be a JSON object: {"exclude": [...], "relabel": {...}, "keep": [...]}')
    unknown = sorted(set(doc) - set(KINDS))
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} in decisions; the keys are exclude, relabel, keep")
    exclude, relabel, keep = doc.get("exclude", []), doc.get("relabel", {}), doc.get("keep", [])
    for name, files in (("exclude", exclude), ("keep", keep)):
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise bad(f"{name} must be a list of file paths (strings)")
    if not isinstance(relabel, dict) or not all(isinstance(c, str) for c in relabel.values()) or "" in relabel:
        raise bad('relabel must map file paths to class names: {"dogs/x.jpg": "cats"}')
    for f in [*exclude, *relabel, *keep]:
        if is_captured(f) and (problem := _capture_path_problem(f)):
            raise bad(f"{f!r} {problem}")
    for f in keep:
        if is_captured(f):
            raise bad(f"keep {f!r}: a captured image is relabelled to a class or excluded, never kept as it is")
    for f, name in relabel.items():
        if is_captured(f) and (problem := class_name_problem(name)):
            raise bad(f"relabel {f!r}: class {name!r} {problem}")
    if classes is not None:
        # A captured image may start a new class; a data file may then be relabelled to it too.
        known = set(classes) | {c for f, c in relabel.items() if is_captured(f)}
        unknown_classes = sorted(set(relabel.values()) - known)
        if unknown_classes:
            raise bad(f"unknown class {unknown_classes[0]!r} in relabel; the run's classes are {', '.join(classes)} "
                      "(only a captured: image may be given a new class)")
    chosen: dict[str, str] = {}
    for kind, files in (("exclude", exclude), ("relabel", list(relabel)), ("keep", keep)):
        for f in files:
            if chosen.setdefault(f, kind) != kind:
                raise bad(f"{f!r} is in both {chosen[f]} and {kind}; choose one")
    return Decisions(frozenset(exclude), dict(relabel), frozenset(keep))


def load(paths: RunPaths, classes: list[str]) -> Decisions:
    """The run's decisions (none when there is no decisions.json)."""
    if not paths.decisions.exists():
        return Decisions()
    try:
        doc = json.loads(paths.decisions.read_text())
    except (OSError, ValueError) as e:
        raise DecisionsError(f"{paths.decisions} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); fix it or "
                             "export it again from the review page") from None
    except RecursionError:
        raise DecisionsError(f"{paths.decisions} is nested too deeply to be a decisions file") from None
    return parse(doc, str(paths.decisions), classes)


def copy_into_run(source: Path, paths: RunPaths) -> None:
    """``--decisions FILE``: validated (its classes are checked by clean), then copied into the run."""
    try:
        doc = json.loads(Path(source).read_text())
    except (OSError, ValueError) as e:
        raise DecisionsError(f"--decisions {source} cannot be read as JSON ({type(e).__name__}); pass the "
                             "decisions.json the review page exported") from None
    atomic_write_json(paths.decisions, parse(doc, f"--decisions {source}").document())
