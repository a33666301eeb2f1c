"""Split: a stratified, seeded, stable train/val/test assignment of the cleaned images.

Each file's place in the order is a hash of (seed, content hash), so the split does not depend
on file names or discovery order, and a re-run gives the identical split. Files already in
``splits.json`` keep their assignment; new files fill the splits toward the target fractions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from jobs import decisions
from jobs.config import Config, RunPaths
from jobs.errors import JobError
from jobs.fileio import atomic_write_json, read_run_file, sweep_partials

SPLITS = ("train", "val", "test")


class SplitError(JobError):
    pass


def target_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Per-class counts; at least one train and one val image whenever n >= 2."""
    n_val = max(1, round(n * val_fraction)) if n >= 2 and val_fraction > 0 else 0
    n_test = round(n * test_fraction) if test_fraction > 0 else 0
    if n >= 3 and test_fraction > 0:
        n_test = max(1, n_test)
    n_test = min(n_test, max(0, n - n_val - 1))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _order_key(seed: int, sha256: str) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def assign(files: list[tuple[str, str]], previous: dict[str, str], seed: int, val_fraction: float,
           test_fraction: float, group_of: dict[str, int] | None = None) -> dict[str, str]:
    """files: (path, sha256) of one class -> {path: split}.

    ``group_of`` maps paths to near-duplicate group ids: a group goes to one split as a whole.
    A group (or a lone file) keeps its earlier split when its members had exactly one; a group
    whose members were split apart (they were not known to be copies then) is placed anew.
    """
    group_of = group_of or {}
    units: dict[object, list[tuple[str, str]]] = {}
    for path, sha in files:
        units.setdefault(group_of.get(path, ("file", path)), []).append((path, sha))
    target = target_counts(len(files), val_fraction, test_fraction)
    result: dict[str, str] = {}
    new = []
    for members in units.values():
        earlier = {previous[p] for p, _ in members if previous.get(p) in SPLITS}
        if len(earlier) == 1:
            result.update(dict.fromkeys((p for p, _ in members), earlier.pop()))
        else:
            new.append(members)
    counts = {s: sum(1 for v in result.values() if v == s) for s in SPLITS}
    for members in sorted(new, key=lambda m: min(_order_key(seed, sha) for _, sha in m)):
        # Fill the rarest splits first (test, then val) so small classes still get held-out images.
        split = max(reversed(SPLITS), key=lambda s: target[s] - counts[s])
        result.update(dict.fromkeys((p for p, _ in members), split))
        counts[split] += len(members)
    return result


def split(cfg: Config, paths: RunPaths) -> Path:
    """Write ``splits.json`` from ``clean_report.json``; returns its path."""
    rebuild = f"run `python -m jobs clean --out {paths.out} --data DATA`"
    if not paths.clean_report.exists():
        raise SplitError(f"{paths.clean_report} not found; {rebuild} first")
    report = read_run_file(paths.clean_report, rebuild, ("files", "classes", "data_hash"))
    sweep_partials(paths.splits)
    group_of, excluded, why = audit_constraints(paths, report, cfg)
    by_class: dict[str, list[tuple[str, str]]] = {}
    for f in report["files"]:
        if f["status"] != "excluded" and f["output"] not in excluded:
            by_class.setdefault(f["label"], []).append((f["output"], f["sha256"]))
    previous = _previous_assignment(paths, cfg)
    files: dict[str, str] = {}
    for label in sorted(by_class):
        assigned = assign(by_class[label], previous, cfg.seed, cfg.val_fraction, cfg.test_fraction, group_of)
        counts = {s: sum(1 for v in assigned.values() if v == s) for s in SPLITS}
        if cfg.test_fraction > 0 and counts["test"] == 0:
            print(f"split: WARNING class '{label}' has only {len(assigned)} images: no test image for it")
        print(f"split: {label:<16} train={counts['train']} val={counts['val']} test={counts['test']}")
        files.update(sorted(assigned.items()))
    doc = splits_document(files, sorted(by_class), report["data_hash"], cfg.seed, cfg.val_fraction, cfg.test_fraction)
    doc["excluded"] = dict(sorted(excluded.items()))
    doc["excluded_why"] = dict(sorted(why.items()))
    atomic_write_json(paths.splits, doc)
    return paths.splits


def audit_constraints(paths: RunPaths, report: dict, cfg: Config) -> tuple[dict[str, int], dict[str, str], dict]:
    """From audit.json and decisions.json: (run path -> near-duplicate group id, run path -> why excluded,
    run path -> the evidence for it).

    A group within one class stays whole; a group across classes is a label conflict and leaves
    every split, except the files a decision keeps; with ``label_issues: exclude`` so do the
    label issues the audit found. Excluding is the most destructive thing the job does, so each
    conflict exclusion names a photo under another class, the pair's measurements from audit.json
    and the signals that agreed (``agreed``; where the features could judge, they confirmed the
    pair): every two photos of a group are near-duplicates themselves
    (``jobs.audit.clique_groups``).
    """
    if not paths.audit.exists():
        print(f"split: WARNING no {paths.audit}: near-duplicates may straddle splits; run "
              f"`python -m jobs audit --out {paths.out}` before split")
        return {}, {}, {}
    rerun = f"run `python -m jobs audit --out {paths.out}`"
    audit = read_run_file(paths.audit, rerun, ("near_duplicates", "label_issues", "data_hash"))
    if audit["data_hash"] != report["data_hash"]:
        raise SplitError(f"{paths.audit} describes other data than {paths.clean_report} (clean ran since); "
                         f"{rerun} first")
    keep = decisions.load(paths, sorted(report["classes"])).keep
    output_of = {f["source"]: f["output"] for f in report["files"] if f["status"] != "excluded"}
    label_of = {f["source"]: f["label"] for f in report["files"]}
    group_of: dict[str, int] = {}
    excluded: dict[str, str] = {}
    why: dict[str, dict] = {}
    for gid, group in enumerate(audit["near_duplicates"]):
        if not group["cross_class"]:
            group_of.update({output_of[src]: gid for src in group["files"] if src in output_of})
            continue
        if "pairs" not in group or not all("agreed" in p for p in group["pairs"]):
            raise SplitError(f"{paths.audit} lists a cross-class group without the pairs that justify it and the "
                             f"signals that agreed (an older audit); {rerun} again before split")
        for src in group["files"]:
            if src in output_of and src not in keep:
                excluded[output_of[src]] = "label_conflict"
                why[output_of[src]] = _conflict_evidence(group, src, label_of)
    if cfg.label_issues == "exclude":
        for issue in audit["label_issues"]:
            if issue["file"] in output_of and issue["file"] not in keep and output_of[issue["file"]] not in excluded:
                excluded[output_of[issue["file"]]] = "label_issue"
                why[output_of[issue["file"]]] = {"given": issue["given"], "suggested": issue["suggested"],
                                                 "score": issue["score"]}
    _print_exclusions(group_of, excluded, why, audit.get("label_check", {}), cfg.label_issues)
    return group_of, excluded, why


def _conflict_evidence(group: dict, src: str, label_of: dict[str, str]) -> dict:
    """The closest photo of ``src``'s group under another class, and that pair's measurements."""
    files = group["files"]
    classes = [label_of.get(f) for f in files]
    me = files.index(src)
    others = [p for p in group["pairs"] if me in (p["a"], p["b"]) and
              classes[p["b"] if p["a"] == me else p["a"]] != classes[me]]
    if not others:
        raise SplitError(f"audit.json's cross-class group with {src} holds no pair with a photo of another class; "
                         "re-run the audit")
    best = min(others, key=lambda p: (p.get("ratio", 0.0), p["hamming"]))
    other = best["b"] if best["a"] == me else best["a"]
    return {"near_duplicate_of": files[other], "agreed": best["agreed"], "by": best["by"],
            "hamming": best["hamming"], "cosine": best["cosine"], "ratio": best.get("ratio")}


def _print_exclusions(group_of: dict[str, int], excluded: dict[str, str], why: dict[str, dict], label_check: dict,
                      label_issues: str, shown: int = 5) -> None:
    """How many files leave every split and why, with the first few conflicts' evidence."""
    conflicts = [p for p, r in excluded.items() if r == "label_conflict"]
    by: dict[str, int] = {}
    for p in conflicts:
        key = "+".join(why[p]["by"])
        by[key] = by.get(key, 0) + 1
    evidence = ", ".join(f"{n} by {k}" for k, n in sorted(by.items()))
    issues = sum(r == "label_issue" for r in excluded.values())
    print(f"split: {len(set(group_of.values()))} near-duplicate groups kept within one split; {len(excluded)} files "
          f"excluded: {len(conflicts)} in cross-class conflicts{f' ({evidence})' if evidence else ''}, "
          f"{issues} label issues")
    for p in sorted(conflicts)[:shown]:
        w = why[p]
        print(f"split:   {p}: near-duplicate of {w['near_duplicate_of']} under another class "
              f"({w['agreed']}; {'+'.join(w['by'])})")
    if len(conflicts) > shown:
        print(f"split:   ... {len(conflicts) - shown} more; splits.json's excluded_why has each one's evidence")
    if label_issues == "exclude" and label_check and not label_check.get("judged", True):
        print(f"split: label_issues is 'exclude', but {label_check['reason']}")


def splits_document(files: dict[str, str], classes: list[str], data_hash: str, seed: int | None = None,
                    val_fraction: float | None = None, test_fraction: float | None = None) -> dict:
    """What ``splits.json`` holds; ``split_hash`` names exactly this assignment of files."""
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "classes": classes,
        "data_hash": data_hash,
        "split_hash": hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest(),
        "files": files,
    }


def _previous_assignment(paths: RunPaths, cfg: Config) -> dict[str, str]:
    """Keep earlier assignments only when they were made with the same seed and fractions."""
    if not paths.splits.exists():
        return {}
    try:
        old = read_run_file(paths.splits, "", ("files",))
    except JobError:
        print(f"split: {paths.splits} is damaged; assigning every file afresh")
        return {}
    same = (old.get("seed"), old.get("val_fraction"), old.get("test_fraction")) == (
        cfg.seed, cfg.val_fraction, cfg.test_fraction)
    return old.get("files", {}) if same else {}
