"""A person's review decisions, ``<out>/decisions.json``, as clean and split honour them.

    {"exclude": ["cats/x.jpg"], "relabel": {"dogs/y.jpg": "cats"}, "keep": ["cats/z.jpg"]}

Every path is a source path relative to the data folder, class folder included, exactly as in
``clean_report.json``'s ``source`` and in ``audit.json``. ``exclude`` leaves every split,
``relabel`` trains a file as another class, ``keep`` overrides a conflict exclusion for that one
file (it is trained in its own folder's class).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jobs.config import RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_json

KINDS = ("exclude", "relabel", "keep")


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


def parse(doc: object, where: str, classes: list[str] | None = None) -> Decisions:
    """Validate a decisions document; one line naming ``where`` and what is wrong."""
    def bad(why: str) -> DecisionsError:
        return DecisionsError(f"{where} is not a valid decisions file: {why}; expected "
                              '{"exclude": [paths], "relabel": {path: class}, "keep": [paths]}')

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    unknown = sorted(set(doc) - set(KINDS))
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}")
    exclude, relabel, keep = doc.get("exclude", []), doc.get("relabel", {}), doc.get("keep", [])
    for name, value in (("exclude", exclude), ("keep", keep)):
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise bad(f"'{name}' must be a list of paths")
    if not isinstance(relabel, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in relabel.items()):
        raise bad("'relabel' must map paths to class names")
    if classes is not None:
        for path, label in relabel.items():
            if label not in classes:
                raise DecisionsError(f"{where}: relabel of {path} names class {label!r}, which is not one of "
                                     f"{classes}; fix the class name")
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
    return parse(doc, str(paths.decisions), classes)


def copy_into_run(source: Path, paths: RunPaths) -> None:
    """``--decisions FILE``: validated (its classes are checked by clean), then copied into the run."""
    try:
        doc = json.loads(Path(source).read_text())
    except (OSError, ValueError) as e:
        raise DecisionsError(f"--decisions {source} cannot be read as JSON ({type(e).__name__}); pass the "
                             "decisions.json the review page exported") from None
    parse(doc, f"--decisions {source}")
    atomic_write_json(paths.decisions, doc)
