"""Captured images back into the job (issue 26, goal 3): decisions name them ``captured:<path>`` and only they may
start a class; ``jobs review --captured`` groups them by likeness, least like the training images first;
``jobs run --captured`` copies the labelled ones into the run with their provenance, trains them as part of the
data (a new class becomes one), compares the new version with the old, and writes neither the data nor the
capture folder.

The capture folders are written by the serving side's own writer (``handler.capture.CaptureSink``): new-class
images are drawn stripes, existing-class ones mirrored fixture ants (no pixel-identical copy of a training photo,
which clean would rightly call a label conflict).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_IMAGES, SMALL_RUN, run_job
from PIL import Image, ImageOps

from handler.capture import CaptureSettings, CaptureSink
from jobs import api
from jobs.captured import PROVENANCE_FILE, group_by_likeness
from jobs.config import RunPaths
from jobs.decisions import DecisionsError, parse
from jobs.errors import JobError
from jobs.versions import LABELLED_CAPTURES, PREVIOUS_TEST_SPLIT, compare_answers

NEW_CLASS = "stripes"


def stripes_jpeg(seed: int) -> bytes:
    """A photo-sized picture of stripes at a random angle and colours: a kind of input the fixture never shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:160, 0:160]
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 20)
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    colours = rng.uniform(0, 255, (2, 3))
    pixels = np.where(wave[..., None] > 0, colours[0], colours[1]) + rng.normal(0, 12, (160, 160, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def mirrored_jpeg(photo: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(photo) as img:
        ImageOps.mirror(img.convert("RGB")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def capture_folder(folder: Path, stripes: int = 8, ants: int = 4) -> dict[str, list[str]]:
    """Serve-side captures of ``stripes`` new-kind images (abstained on) and ``ants`` mirrored ants (answered
    ants); returns the capture paths of each kind, oldest first."""
    sink = CaptureSink(CaptureSettings(folder, below=1.0), "classifier", "1.0", seed=0)
    images = [("stripes", stripes_jpeg(i)) for i in range(stripes)]
    images += [("ants", mirrored_jpeg(p)) for p in sorted((FIXTURE_IMAGES / "ants").glob("*.jpg"))[:ants]]
    for n, (kind, data) in enumerate(images):
        new = kind == "stripes"
        answer = {"predictions": [{"label": "ants", "probability": 0.55}, {"label": "bees", "probability": 0.45}],
                  "ood_score": 0.9 if new else 0.1, "abstain": new,
                  "abstain_reason": "unlike the training images" if new else None}
        sink.offer([data], [answer], f"req{n:02d}-{kind}")
    sink.close()
    kinds: dict[str, list[str]] = {"stripes": [], "ants": []}
    for image in sorted(p for p in folder.iterdir() if p.suffix == ".jpg"):
        kinds["stripes" if "stripes" in image.name else "ants"].append(image.name)
    assert len(kinds["stripes"]) == stripes and len(kinds["ants"]) == ants, "the capture writer dropped an image"
    return kinds


def labelling(kinds: dict[str, list[str]]) -> dict:
    """Six stripes as a new class, two ants as ants, two stripes and one ant discarded, one ant left unlabelled."""
    return {"relabel": {**{f"captured:{c}": NEW_CLASS for c in kinds["stripes"][:6]},
                        **{f"captured:{c}": "ants" for c in kinds["ants"][:2]}},
            "exclude": [f"captured:{c}" for c in kinds["stripes"][6:] + kinds["ants"][3:]]}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# decisions and grouping: no model


def test_only_a_captured_image_may_start_a_class_and_its_path_stays_inside_the_capture_folder():
    doc = {"relabel": {"captured:a.jpg": "tulip", "ants/x.jpg": "tulip"}, "exclude": ["captured:sub/b.jpg"]}
    decisions = parse(doc, "decisions.json", ["ants", "bees"])
    assert decisions.captured_labels() == {"a.jpg": "tulip"}  # and a data file may then join the new class
    for bad, said in [({"relabel": {"ants/x.jpg": "tulip"}}, "unknown class 'tulip'"),
                      ({"relabel": {"captured:../a.jpg": "tulip"}}, "'captured:../a.jpg' must be captured:<path"),
                      ({"exclude": ["captured:"]}, "'captured:' must be captured:<path"),
                      ({"relabel": {"captured:a.jpg": "a/b"}}, "class 'a/b' cannot hold a slash"),
                      ({"keep": ["captured:a.jpg"]}, "never kept as it is")]:
        with pytest.raises(DecisionsError) as e:
            parse(bad, "RUN/decisions.json", ["ants", "bees"])
        assert str(e.value).startswith("RUN/decisions.json: ") and said in str(e.value) and "\n" not in str(e.value)


def test_a_new_kind_of_input_is_one_group_and_the_least_like_the_training_images_comes_first():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(3, 64))  # two training classes and one kind of input never trained on
    train = np.concatenate([directions[c] + 0.6 * rng.normal(size=(20, 64)) for c in (0, 1)])
    labels = np.repeat([0, 1], 20)
    captures = np.concatenate([directions[2] + 0.6 * rng.normal(size=(5, 64)),
                               directions[0] + 0.6 * rng.normal(size=(3, 64))])
    groups, distance, threshold = group_by_likeness(captures, train, labels)
    assert 0 < threshold < 1
    assert sorted(groups[0]) == [0, 1, 2, 3, 4]  # the new kind: one group, shown first
    assert all(i >= 5 for g in groups[1:] for i in g)
    assert distance[:5].min() > distance[5:].max()
    assert all(distance[g[0]] >= distance[g[-1]] for g in groups)  # least like first within a group too


def test_a_new_class_given_to_an_old_image_counts_as_wrong():
    paired = compare_answers(["ants", "bees", "ants"], ["ants", "bees", "bees"], [NEW_CLASS, "bees", "ants"])
    assert (paired["only_old_right"], paired["only_new_right"], paired["both_right"]) == (1, 1, 1)
    assert set(paired["per_class"]) == {"ants", "bees"}


# ----------------------------------------------------------------------------------------------
# bringing captures in: clean alone (no model)


def test_clean_brings_in_only_the_labelled_captures_with_provenance_and_writes_neither_folder(prepared_run, small_data,
                                                                                           tmp_path):
    run = prepared_run("run")
    kinds = capture_folder(tmp_path / "capture")
    (run / "decisions.json").write_text(json.dumps(labelling(kinds)))
    before = tree_hashes(tmp_path / "capture"), tree_hashes(small_data)
    api.clean(run, small_data, captured=tmp_path / "capture", min_images_per_class=3)
    assert (tree_hashes(tmp_path / "capture"), tree_hashes(small_data)) == before

    report = json.loads((run / "clean_report.json").read_text())
    assert sorted(report["classes"]) == ["ants", "bees", NEW_CLASS]
    captured = {f["source"]: f for f in report["files"] if f["source"].startswith("captured:")}
    labelled = labelling(kinds)["relabel"]
    assert set(captured) == set(labelled)  # the discarded and the unlabelled stay out
    assert all(f["label"] == labelled[s] and f["output"].startswith(f"dataset/{f['label']}/")
               for s, f in captured.items())
    provenance = json.loads((run / "captured" / PROVENANCE_FILE).read_text())["images"]
    assert {e["source"] for e in provenance} == set(labelled)
    first = next(e for e in provenance if e["source"] == f"captured:{kinds['stripes'][0]}")
    assert first["model_version"] == "1.0" and first["request_id"] == "req00-stripes" and first["why"] == "abstained"
    assert first["answered_at"].startswith("20") and first["file"] == f"captured/{NEW_CLASS}/{kinds['stripes'][0]}"
    assert (run / first["file"]).read_bytes() == (tmp_path / "capture" / kinds["stripes"][0]).read_bytes()

    # Again: nothing copied anew. The capture folder trimmed meanwhile: the run's copies still serve.
    copies = {p: p.stat().st_mtime_ns for p in (run / "captured").rglob("*.jpg")}
    (tmp_path / "capture" / kinds["stripes"][0]).unlink()
    api.clean(run, small_data, captured=tmp_path / "capture", min_images_per_class=3)
    assert {p: p.stat().st_mtime_ns for p in (run / "captured").rglob("*.jpg")} == copies

    # A decision changed: the copy follows it; a decision withdrawn: its copy goes.
    changed = labelling(kinds)
    changed["relabel"][f"captured:{kinds['ants'][0]}"] = "bees"
    del changed["relabel"][f"captured:{kinds['ants'][1]}"]
    (run / "decisions.json").write_text(json.dumps(changed))
    api.clean(run, small_data, captured=tmp_path / "capture", min_images_per_class=3)
    assert (run / "captured" / "bees" / kinds["ants"][0]).is_file()
    assert not list((run / "captured" / "ants").glob("*.jpg"))
    api.split(run)
    assert json.loads((run / "splits.json").read_text())["classes"] == ["ants", "bees", NEW_CLASS]


def test_a_label_for_a_capture_that_is_not_there_is_one_line_naming_the_file_and_key(prepared_run, small_data,
                                                                                     tmp_path):
    run = prepared_run("run")
    kinds = capture_folder(tmp_path / "capture", stripes=1, ants=0)
    (run / "decisions.json").write_text(json.dumps({"relabel": {f"captured:{kinds['stripes'][0]}": NEW_CLASS,
                                                                "captured:gone.jpg": NEW_CLASS}}))
    with pytest.raises(JobError) as e:
        api.clean(run, small_data, captured=tmp_path / "capture", min_images_per_class=3)
    said = str(e.value)
    assert said.startswith(f"{run / 'decisions.json'}: relabel 'captured:gone.jpg' names no capture in ")
    assert "\n" not in said and not (run / "captured").exists()

    proc = run_job("clean", "--out", str(run), "--data", str(small_data), "--captured", str(tmp_path / "nowhere"),
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert f"--captured {tmp_path / 'nowhere'} is not a folder" in proc.stderr


def test_a_class_folder_named_like_a_capture_is_refused(prepared_run, tmp_path):
    data = tmp_path / "data"
    for name in ("ants", "captured:x"):
        (data / name).mkdir(parents=True)
    with pytest.raises(JobError, match="class folder 'captured:x'; rename it"):
        api.clean(prepared_run("run"), data)


# ----------------------------------------------------------------------------------------------
# the review page and the whole job, on a finished run


@pytest.mark.e2e
def test_review_captured_groups_them_on_the_page_and_only_reads_the_capture_folder(finished_run, tmp_path):
    kinds = capture_folder(tmp_path / "capture")
    broken = CaptureSink(CaptureSettings(tmp_path / "capture", below=1.0), "classifier", "1.0")
    broken.offer([b"\xff\xd8\xff not a whole JPEG"], [{"predictions": [], "abstain": True}], "req99-broken")
    broken.close()
    before = tree_hashes(tmp_path / "capture")
    page = api.review(finished_run, captured=tmp_path / "capture").read_text()
    assert tree_hashes(tmp_path / "capture") == before

    doc = json.loads((finished_run / "report" / "captured_review.json").read_text())
    shown = [c["file"] for g in doc["groups"] for c in g["cards"]]
    assert sorted(shown) == sorted(f"captured:{c}" for c in kinds["stripes"] + kinds["ants"])
    weights = [g["mean_distance"] * np.log1p(len(g["cards"])) for g in doc["groups"]]
    assert weights == sorted(weights, reverse=True)  # the most unlike the training images first

    assert page.index('<section id="captured">') < page.index('<section id="conflicts">')  # first on the page
    section = page[page.index('<section id="captured">'):page.index('<section id="conflicts">')]
    assert section.count('<div class="item">') == len(doc["groups"]) + 1  # and the one that cannot be decoded
    assert section.count('class="card captured"') == len(shown) + 1
    assert section.count('list="class-names"') == len(shown) + 1  # a class typed in: an existing one or a new one
    assert '<datalist id="class-names"><option value="ants"><option value="bees"></datalist>' in page
    assert "abstained (unlike the training images)" in section and "model 1.0" in section
    assert 'data-action="keep"' not in section  # a capture is labelled or excluded, never kept as it is
    assert [c["file"].split("-", 1)[1] for c in doc["unreadable"]] == ["req99-broken-0.jpg"]
    assert "1 images that cannot be decoded" in section  # shown to exclude, never fed to the backbone


@pytest.mark.e2e
def test_run_captured_trains_a_new_class_and_compares_the_new_version_with_the_old(finished_run, small_data,
                                                                                   tmp_path):
    kinds = capture_folder(tmp_path / "capture")
    (finished_run / "decisions.json").write_text(json.dumps(labelling(kinds)))
    before = tree_hashes(tmp_path / "capture"), tree_hashes(small_data)
    proc = run_job("run", "--out", str(finished_run), "--data", str(small_data), "--captured",
                   str(tmp_path / "capture"), *SMALL_RUN)
    assert (tree_hashes(tmp_path / "capture"), tree_hashes(small_data)) == before
    assert f"brought in from {tmp_path / 'capture'} (ants 2, {NEW_CLASS} 6)" in proc.stdout

    paths = RunPaths(finished_run)
    meta = json.loads((paths.model / "metadata.json").read_text())
    assert meta["model_version"] == "2.0"
    assert json.loads((paths.model / "index_to_name.json").read_text()) == {"0": "ants", "1": "bees", "2": NEW_CLASS}
    comparison = json.loads((paths.report / "metrics.json").read_text())["versus_previous"]
    old_test = json.loads((paths.versions / "1.0" / "model" / "test_split.json").read_text())["images"]
    assert comparison["sets"][PREVIOUS_TEST_SPLIT]["images"] == len(old_test)  # the old classes' images, all
    captures_tested = comparison["sets"][LABELLED_CAPTURES]
    assert captures_tested["images"] >= 1 and NEW_CLASS in captures_tested["per_class"]
    index = (paths.report / "index.html").read_text()
    assert f"brought in: 8 (ants 2, {NEW_CLASS} 6)" in index and LABELLED_CAPTURES in index
