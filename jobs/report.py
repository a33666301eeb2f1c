"""The evaluation report a person can check: PNGs and one self-contained ``index.html``.

Figures use matplotlib's object API (``Figure`` + the Agg canvas), never pyplot: no global
figure state, no display needed, nothing left open between calls. Every image is embedded in
the page as a base64 data URI, so ``index.html`` can be mailed or opened from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import fields
from pathlib import Path

import matplotlib
import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from jobs.captured import brought_in_counts
from jobs.collect.preview import contact_sheet
from jobs.collect.stage import REPORT as COLLECT_REPORT
from jobs.config import COLLECT, Config, RunPaths
from jobs.data import split_items
from jobs.fileio import atomic_write_bytes, atomic_write_text, read_json, read_run_file
from jobs.review import data_quality_html
from jobs.versions import PREVIOUS_TEST_SPLIT

MAX_PREDICTIONS_SHOWN = 24
GRID_COLUMNS = 6
THUMB = 224
SAMPLE_PER_CLASS = 16  # training images per class on the sheet
# Under this many val images in a class, its left-out share moves in steps of more than 10 points.
ROUGH_BELOW_VAL_IMAGES = 10
# Keys that only collect reads: a run on a --data folder shows none of them.
COLLECT_ONLY_KEYS = frozenset(f.name for f in fields(Config) if f.metadata["commands"] == COLLECT)
WRONG, RIGHT = "#d62728", "#2ca02c"
FINETUNE_SHADE = "#fff2cc"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# figures


def plot_curves(history: list[dict], best: dict, out_png: Path) -> Path:
    """Loss and accuracy per epoch over both stages; the fine-tune epochs are shaded."""
    x = np.arange(1, len(history) + 1)
    values = {k: [np.nan if e.get(k) is None else e[k] for e in history]
              for k in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")}
    fig = Figure(figsize=(11, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(x, values["train_loss"], "o-", label="train loss")
    loss_ax.plot(x, values["val_loss"], "s-", label="val loss")
    acc_ax.plot(x, values["train_accuracy"], "o--", alpha=0.6, label="train accuracy")
    acc_ax.plot(x, values["val_accuracy"], "s-", label="val accuracy")
    best_key = (best.get("stage"), best.get("epoch"))
    best_at = [i + 1 for i, e in enumerate(history) if (e["stage"], e["epoch"]) == best_key]
    if best_at:
        acc_ax.plot(best_at, [best["val_accuracy"]], "*", ms=16, color="gold", mec="black", label="best (kept)")
    finetune = [i + 1 for i, e in enumerate(history) if e["stage"] == "finetune"]
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        if finetune:
            ax.axvspan(finetune[0] - 0.5, finetune[-1] + 0.5, color=FINETUNE_SHADE, label="fine-tune stage")
        ax.set_xlabel("epoch (head stage, then fine-tune)" if finetune else "epoch (head stage)")
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc_ax.set_ylim(-0.02, 1.02)
    return _save(fig, out_png)


def plot_confusion(counts: np.ndarray, classes: list[str], out_png: Path) -> Path:
    """Row-normalized (recall per true class) colours, with the raw counts written in each cell."""
    rows = counts.sum(1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for t in range(n):
            for p in range(n):
                ax.text(p, t, f"{counts[t, p]}\n{normalized[t, p]:.0%}", ha="center", va="center", fontsize=9,
                        color="white" if normalized[t, p] > 0.5 else "black")
    ax.set_title("confusion matrix (rows: true class)")
    return _save(fig, out_png)


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a reduced scale
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((THUMB, THUMB))
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def worst_first(predictions: list[dict], limit: int = MAX_PREDICTIONS_SHOWN) -> list[dict]:
    """Wrong ones by confidence (most confidently wrong first), then right ones, least confident first."""
    wrong = sorted((p for p in predictions if not p["correct"]), key=lambda p: -p["probability"])
    right = sorted((p for p in predictions if p["correct"]), key=lambda p: p["probability"])
    return (wrong + right)[:limit]


def plot_grid(entries: list[tuple[Path, str, bool]], title: str, out_png: Path) -> Path:
    """Thumbnails titled ``(image, caption, good)``: a bad one in bold with a thick red frame."""
    cols = min(GRID_COLUMNS, len(entries))
    rows = -(-len(entries) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (image, caption, good) in zip(axes, entries):
        pixels = _thumbnail(image)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        if pixels is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(pixels)
        color = RIGHT if good else WRONG
        ax.set_title(caption, fontsize=9, color=color, fontweight="normal" if good else "bold")
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(1 if good else 5)
    fig.suptitle(title, fontsize=11)
    return _save(fig, out_png)


def plot_predictions(run_dir: Path, predictions: list[dict], out_png: Path) -> Path:
    """The human sanity test: each image titled 'true -> predicted (p)', mistakes framed in red."""
    shown = worst_first(predictions)
    wrong = sum(not p["correct"] for p in predictions)
    return plot_grid([(run_dir / p["file"], f"{p['true']} -> {p['predicted']} ({p['probability']:.2f})",
                       p["correct"]) for p in shown],
                     f"test images: {wrong} of {len(predictions)} misclassified (red frame); "
                     f"showing {len(shown)}, most confidently wrong first", out_png)


def plot_unknown(root: Path, examples: list[dict], title: str, out_png: Path) -> Path:
    """Images the served model answered on: the predicted class and its OOD score; answered ones framed red
    (for images of none of the classes an answer is a mistake), abstained ones green."""
    return plot_grid([(root / e["file"], f"{e['predicted']} {e['probability']:.2f}, ood {e['ood_score']:.2f}"
                       + (" (abstained)" if e["abstain"] else ""), e["abstain"]) for e in examples], title, out_png)


def plot_reliability(before: dict, after: dict, out_png: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    for curve, style, name in ((before, "o-", "softmax"), (after, "s-", "calibrated (served)")):
        bins = [b for b in curve["table"] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                label=f"{name}: ECE {curve['ece']:.3f}" if curve["ece"] is not None else name)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("reliability on the test split")
    return _save(fig, out_png)


def training_images_by_class(paths: RunPaths, splits: dict) -> dict[str, list[Path]]:
    """Every training image of each class (splits.json, sorted); the sheet shows a spread of them and
    counts them all."""
    by_class: dict[str, list[Path]] = {name: [] for name in splits["classes"]}
    for path, label in split_items(splits, "train"):
        by_class[splits["classes"][label]].append(paths.out / path)
    return by_class


def split_counts(splits: dict) -> dict[str, dict[str, int]]:
    """Class -> images in train, val and test, from splits.json: the one account of what was trained on."""
    counts = {name: {"train": 0, "val": 0, "test": 0} for name in splits["classes"]}
    for split in ("train", "val", "test"):
        for _, label in split_items(splits, split):
            counts[splits["classes"][label]][split] += 1
    return counts


def run_source(paths: RunPaths) -> dict:
    """Where the run's images came from, as clean last read them.

    ``{"kind": "collected", "folder", "collect": collect_report.json}`` when clean read this run's
    raw/ folder that collect filled; ``{"kind": "folder", "folder"}`` for a --data folder
    (``folder`` None when clean_report.json is missing).
    """
    clean = f"re-run `python -m jobs clean --out {paths.out}` with the same --data"
    folder = read_run_file(paths.clean_report, clean, ("data",))["data"] if paths.clean_report.exists() else None
    collect_report = paths.raw / COLLECT_REPORT
    if folder is not None and Path(folder).resolve() == paths.raw.resolve() and collect_report.exists():
        collected = read_run_file(collect_report, f"re-run `python -m jobs collect --out {paths.out}`",
                                  ("source", "kept"))
        return {"kind": "collected", "folder": folder, "collect": collected}
    return {"kind": "folder", "folder": folder}


# ----------------------------------------------------------------------------------------------
# the page

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }}
.headline {{ display: flex; gap: 2em; align-items: baseline; flex-wrap: wrap; }}
#accuracy {{ font-size: 4em; font-weight: bold; color: #1f5fa8; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36a; padding: 0.6em 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; max-width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; overflow-wrap: anywhere; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
</style></head>
<body>
<h1>Evaluation report: {title}</h1>
<p id="source">{source}</p>
<div class="headline"><div><div id="accuracy">{accuracy}</div><div>test accuracy on <b id="test-count">{count}</b>
images{interval}</div></div>
<div>macro F1 <b id="macro-f1">{macro_f1}</b><br>calibration error (ECE, {bins} bins) <b id="ece">{ece}</b><br>
weights from <code>checkpoints/{checkpoint}</code>{best}</div></div>
{notes}
{sections}
<script>
// For headless checks: data-loaded="true" once every embedded image has decoded.
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var ok = images.every(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-loaded", ok ? "true" : "false");
}});
</script>
</body></html>
"""


def _ece_html(metrics: dict) -> str:
    """The softmax's ECE, and the served (temperature-scaled) one where the export fit a temperature."""
    before = metrics["calibration"]["ece"]
    after = ((metrics.get("trust") or {}).get("calibration") or {}).get("ece")
    shown = "n/a" if before is None else f"{before:.3f}"
    return shown if after is None else f"{shown}</b>, served (calibrated) <b id=\"ece-served\">{after:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list], row_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' id="{row_id}"' if row_id else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _results_sections(metrics: dict, figures: dict[str, Path]) -> list[str]:
    sections = []
    if "predictions" in figures:
        sections.append(_section("Test images: true -> predicted (probability)", _img(figures["predictions"],
                                                                                     "test predictions")))
    if "curves" in figures:
        sections.append(_section("Training curves", _img(figures["curves"], "training curves")))
    if "confusion" in figures:
        per_class = [[name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", s["support"]]
                     for name, s in metrics["per_class"].items()]
        confused = [[c["true"], c["predicted"], c["count"]] for c in metrics["most_confused"]]
        body = (_img(figures["confusion"], "confusion matrix")
                + _table(["class", "precision", "recall", "F1", "support"], per_class, "per-class")
                + "<h3>Most confused pairs</h3>"
                + (_table(["true", "predicted as", "images"], confused) if confused else "<p>none</p>"))
        sections.append(_section("Per class", body))
    wrong = [p for p in metrics["predictions"] if not p["correct"]]
    if wrong:
        rows = [[p["file"], p["true"], p["predicted"], f"{p['probability']:.3f}"] for p in worst_first(wrong, 10**6)]
        sections.append(_section(f"All misclassified test images ({len(wrong)})",
                                 _table(["file", "true", "predicted", "probability"], rows, "misclassified")))
    return sections


def _unknown_section(metrics: dict, figures: dict[str, Path], audited: bool) -> str:
    """How the served model answers images unlike its training images: abstain rates, separation, examples
    (``audited``: the run has a review page, which lists the abstained test images too)."""
    served = metrics.get("trust") or {}
    if "note" in served or not served:
        return _section("Unknown inputs", f"<p>{html.escape(served.get('note', 'not measured'))}</p>")
    test, ood = served["test"], served.get("ood_data")
    reasons = ", ".join(f"{n} {html.escape(r)}" for r, n in test["reasons"].items()) or "none"
    rows = [["test split (the classes)", test["images"], f'{test["abstained"]} ({_pct(test["abstain_rate"])})',
             reasons, _pct(test["answered_accuracy"]), ""]]
    if ood:
        rows.append([f"--ood-data {html.escape(ood['folder'])}", ood["images"], _pct(ood["abstain_rate"]),
                     "", "", "n/a" if ood["auroc"] is None else f"{ood['auroc']:.3f}"])
    body = (f"<p>Every answer carries <code>ood_score</code> ({html.escape(served['score'])} distance to the "
            f"training images' features; higher = less like them) and <code>abstain</code>: true above "
            f"{served['threshold']:.4f}, the score that keeps {_pct(served['keep'])} of the val images"
            + (f", or below a calibrated top probability of {served['min_confidence']}" if served["min_confidence"]
               else "")
            + f". Probabilities are calibrated by temperature {served['temperature']:.3f} (fit on the val split).</p>"
            + _table(["images", "count", "abstained", "why", "accuracy of the answers given",
                      "AUROC (test split vs these)"], rows, "unknown-inputs"))
    body += _new_class_html(served.get("new_class"), ood)
    if not ood:
        body += ("<p>Pass <code>--ood-data DIR</code> (images of none of the classes) to evaluate to measure how "
                 "well the model tells them apart.</p>")
    if test["abstained"] and audited:
        body += ('<p>The test images it abstained on are also on the <a href="review.html#abstained">review '
                 "page</a>, to keep, exclude or relabel.</p>")
    for key, alt in (("reliability", "reliability diagram"), ("ood_passed", "unknown images answered as a class"),
                     ("ood_abstained", "unknown images abstained on"), ("test_abstained", "test images abstained on")):
        if key in figures:
            body += _img(figures[key], alt)
    return _section("Unknown inputs", body)


def _versions_section(comparison: dict) -> str:
    """The new version against the previous one, paired image by image (``jobs.versions.compare``)."""
    new, old = comparison["version"], comparison["previous_version"]
    if "sets" not in comparison:
        return _section(f"Version {new} against {old}", f"<p>{html.escape(comparison['note'])}</p>")
    header = ["images", "both right", f"only {old} right", f"only {new} right", "both wrong", "McNemar exact p"]

    def row(name: str, c: dict) -> list:
        return [name, c["both_right"], c["only_old_right"], c["only_new_right"], c["both_wrong"], f"{c['p_value']:.3g}"]

    body = ""
    for set_name, paired in comparison["sets"].items():
        worse = (f"{new} is significantly worse (p &lt; 0.05): archive will not make it the default without --force"
                 if set_name == PREVIOUS_TEST_SPLIT else f"{new} is significantly worse (p &lt; 0.05)")
        verdict = worse if paired["significantly_worse"] else "not significantly worse"
        missing = f"; {paired['missing']} of its images are no longer in the run folder" if paired["missing"] else ""
        title = f"{set_name} of {old}" if set_name == PREVIOUS_TEST_SPLIT else set_name
        body += (f"<h3>{html.escape(title)} ({paired['images']} images{missing})</h3>"
                 f"<p>{verdict}</p>"
                 + _table(header, [row("all", paired)] + [row(c, v) for c, v in paired["per_class"].items()],
                          "versions"))
    return _section(f"Version {new} against {old}", body)


def _new_class_html(new_class: dict | None, ood: dict | None) -> str:
    """The leave-one-class-out figure beside the far-from-the-classes one, in words a person acts on."""
    if not new_class:
        return ""
    low, high = (f(new_class["per_class"].items(), key=lambda kv: kv[1]["flagged"]) for f in (min, max))
    fewest = min(p["val_images"] for p in new_class["per_class"].values())
    rough = f", on as few as {fewest} val images per class: a rough figure" if fewest < ROUGH_BELOW_VAL_IMAGES else ""
    # Leaving one of C out measures a model of C - 1, which notices more; export carries it one class on.
    carried = (", and carried one class on from leaving two out (a model of fewer classes notices more)"
               if new_class.get("extrapolated") else ", an optimistic figure: a model of fewer classes notices more")
    far = (f"Far from the classes (<code>--ood-data</code>): {_pct(ood['abstain_rate'])} flagged. " if ood else "")
    return (f'<p id="new-class"><b>A new class like one of yours: about {round(100 * new_class["flagged"])}% '
            f"flagged</b> (abstained on; per class left out from {_pct(low[1]['flagged'])} for one like "
            f"{html.escape(low[0])} to {_pct(high[1]['flagged'])} for one like {html.escape(high[0])}); "
            f"{_pct(new_class['captured'])} would be kept by <code>--capture</code> "
            f"(abstained on, or answered under a calibrated top probability of {new_class['capture_below']}), "
            f"against {_pct(new_class['known_captured'])} of the known classes' images. {far}Measured at export by "
            f"leaving each class out in turn (its val images against a model of the others){carried}{rough}. The rest "
            "of such a class is answered as one of yours: if one may appear, serve with <code>--capture DIR</code> "
            "and review what it keeps.</p>")


def _source_html(source: dict) -> str:
    """One sentence: the --data folder, or what collect searched for where."""
    folder = source["folder"]
    if folder is None:
        return "Images: unknown (clean_report.json not found)."
    if source["kind"] == "folder":
        return f'Images from the folder <code id="data-folder">{html.escape(folder)}</code> (<code>--data</code>).'
    collected = source["collect"]
    kept = ", ".join(f"{html.escape(t)} {n}" for t, n in collected["kept"].items())
    return (f'Images collected from <b id="collect-source">{html.escape(str(collected["source"]))}</b> for the '
            f'terms <span id="terms">{html.escape(", ".join(collected["kept"]))}</span> (kept: {kept}) into '
            f"<code>{html.escape(folder)}</code>; licenses and creators in its ATTRIBUTION.md.")


def _config_html(paths: RunPaths, source: dict) -> str:
    """config.yaml as saved; for a run on a --data folder without the keys only collect reads."""
    if not paths.config.exists():
        return f"({html.escape(str(paths.config))} not found)"
    text = paths.config.read_text()
    if source["kind"] == "folder":
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError:
            values = None
        if isinstance(values, dict):
            text = (f"# images from --data {source['folder']}; the collect keys ({len(COLLECT_ONLY_KEYS)}) do not "
                    "apply and are left out\n" + yaml.safe_dump({k: v for k, v in values.items()
                                                                if k not in COLLECT_ONLY_KEYS}, sort_keys=False))
    return html.escape(text)


def _data_section(paths: RunPaths, splits: dict, figures: dict[str, Path], source: dict) -> str:
    counts = split_counts(splits)
    clean = read_json(paths.clean_report)["classes"] if paths.clean_report.exists() else {}
    rows = []
    for name in splits["classes"]:
        c = clean.get(name, {})
        rows.append([name, c.get("kept", "?"), c.get("converted", "?"), c.get("excluded", "?"),
                     counts[name]["train"], counts[name]["val"], counts[name]["test"]])
    totals = ["total"] + [sum(r[i] for r in rows) if all(isinstance(r[i], int) for r in rows) else "?"
                          for i in range(1, 7)]
    body = _table(["class", "kept", "converted", "excluded", "train", "val", "test"], rows + [totals], "data")
    if not clean:
        body += f"<p>{html.escape(str(paths.clean_report))} not found: clean counts unknown.</p>"
    brought_in = brought_in_counts(paths)
    if brought_in:
        per_class = ", ".join(f"{html.escape(c)} {n}" for c, n in brought_in.items())
        body += (f'<p id="captured">Captured images labelled in review and brought in: {sum(brought_in.values())} '
                 f"({per_class}); where each came from: <code>captured/provenance.json</code>.</p>")
    if "training_images" in figures:
        sample = ", ".join(f'{html.escape(name)} <span class="sampled" data-class="{html.escape(name)}">'
                           f'{min(c["train"], SAMPLE_PER_CLASS)} of {c["train"]}</span>' for name, c in counts.items())
        body += ("<h3>Training images per class</h3>" + _img(figures["training_images"], "training images per class")
                 + f'<p id="training-sample">Shown: {sample} training images (spread over each class of '
                 "splits.json).</p>")
    preview = paths.raw / "collect_preview.png"
    if source["kind"] == "collected" and preview.exists():
        body += ("<h3>Collected images, before cleaning</h3>"
                 + _img(preview, "collected images per search term (raw/collect_preview.png)"))
    return _section("Data", body)


def _quality_section(paths: RunPaths, splits: dict) -> list[str]:
    """The audit's counts and the review page's link, when the run was audited."""
    if not paths.audit.exists():
        return []
    excluded: dict[str, int] = {}
    for reason in splits.get("excluded", {}).values():
        excluded[reason] = excluded.get(reason, 0) + 1
    if paths.clean_report.exists():
        for f in read_json(paths.clean_report)["files"]:
            if f["reason"] in {"label_conflict", "decision"}:
                excluded[f["reason"]] = excluded.get(f["reason"], 0) + 1
    return [_section("Data quality", data_quality_html(read_json(paths.audit), excluded))]


def render_html(paths: RunPaths, metrics: dict, splits: dict, figures: dict[str, Path], notes: list[str]) -> str:
    checkpoint = metrics["checkpoint"]
    best = checkpoint.get("best_epoch") or {}
    source = run_source(paths)
    sections = _results_sections(metrics, figures) + [_unknown_section(metrics, figures, paths.audit.exists())] + \
        ([_versions_section(metrics["versus_previous"])] if metrics.get("versus_previous") else []) + \
        _quality_section(paths, splits) + [
        _data_section(paths, splits, figures, source),
        _section("Run configuration", f"<pre id=\"config\">{_config_html(paths, source)}</pre>"),
    ]
    interval = metrics.get("accuracy_ci95")
    return PAGE.format(
        title=html.escape(paths.out.resolve().name),
        source=_source_html(source),
        accuracy=_pct(metrics["accuracy"]),
        count=metrics["count"],
        interval=(f'<br>95% interval <b id="accuracy-ci">{_pct(interval[0])} to {_pct(interval[1])}</b> (Wilson)'
                  if interval else ""),
        macro_f1="n/a" if metrics["macro_f1"] is None else f"{metrics['macro_f1']:.3f}",
        bins=metrics["calibration"]["bins"],
        ece=_ece_html(metrics),
        checkpoint=html.escape(checkpoint["file"]),
        best=f" ({html.escape(str(best.get('stage')))} epoch {best.get('epoch')}, val loss {best.get('val_loss'):.4f}, "
             f"val accuracy {_pct(best.get('val_accuracy'))}; chosen by {html.escape(checkpoint.get('selection', ''))})"
             if best else "",
        notes="".join(f'<p class="warn">{html.escape(n)}</p>' for n in notes),
        sections="\n".join(sections),
    )


def write_report(paths: RunPaths, metrics: dict) -> Path:
    """Write the PNGs that the data allows and ``index.html``; returns the page's path."""
    # Class names are plain text: a folder named "math$\\x{$" is a label, not TeX for mathtext to parse.
    with matplotlib.rc_context({"text.parse_math": False}):
        return _write_report(paths, metrics)


def _write_report(paths: RunPaths, metrics: dict) -> Path:
    report = paths.report
    splits = read_json(paths.splits)
    figures: dict[str, Path] = {}
    notes = [metrics["note"]] if metrics.get("note") else []
    training = read_json(paths.metrics) if paths.metrics.exists() else {}
    if training.get("epochs"):
        figures["curves"] = plot_curves(training["epochs"], training.get("best", {}), report / "curves.png")
    else:
        notes.append(f"{paths.metrics} has no epochs: no training curves.")
    if metrics["count"]:
        counts = np.array(metrics["confusion_matrix"]["counts"])
        figures["confusion"] = plot_confusion(counts, metrics["classes"], report / "confusion_matrix.png")
        figures["predictions"] = plot_predictions(paths.out, metrics["predictions"], report / "predictions.png")
    else:
        for stale in ("confusion_matrix.png", "predictions.png"):  # from an earlier run with test images
            (report / stale).unlink(missing_ok=True)
    figures.update(_unknown_figures(paths, metrics))
    (report / "collect_preview.png").unlink(missing_ok=True)  # earlier versions' name for training_images.png
    figures["training_images"] = contact_sheet(training_images_by_class(paths, splits),
                                               report / "training_images.png", SAMPLE_PER_CLASS)
    return atomic_write_text(report / "index.html", render_html(paths, metrics, splits, figures, notes))


def _unknown_figures(paths: RunPaths, metrics: dict) -> dict[str, Path]:
    """The reliability diagram and example grids of "Unknown inputs"; stale ones from an earlier run removed."""
    report, served = paths.report, metrics.get("trust") or {}
    wanted: dict[str, tuple] = {}
    if served.get("test", {}).get("images"):
        wanted["reliability"] = (plot_reliability, metrics["calibration"], served["calibration"])
        examples = served["test"]["abstained_examples"]
        if examples:
            wanted["test_abstained"] = (plot_unknown, paths.out, examples, "test images the model abstained on")
    ood = served.get("ood_data") or {}
    for key, what in (("passed", "answered as one of the classes (red: a mistake)"), ("abstained", "abstained on")):
        if ood.get(f"{key}_examples"):
            wanted[f"ood_{key}"] = (plot_unknown, Path(ood["folder"]), ood[f"{key}_examples"],
                                    f"images of none of the classes {what}")
    figures = {}
    for key in ("reliability", "test_abstained", "ood_passed", "ood_abstained"):
        png = report / f"unknown_{key}.png" if key != "reliability" else report / "reliability.png"
        if key in wanted:
            plot, *args = wanted[key]
            figures[key] = plot(*args, png)
        else:
            png.unlink(missing_ok=True)
    return figures
