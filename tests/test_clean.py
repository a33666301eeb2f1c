from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from conftest import FIXTURE_IMAGES, run_job
from hostile import make_hostile_files
from PIL import Image

from jobs.clean import CleanError, clean
from jobs.config import RunPaths, load_config


def _tree_snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:64])
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hostile_data(tmp_path: Path) -> tuple[Path, dict]:
    data = tmp_path / "data"
    photo = next(iter(sorted((FIXTURE_IMAGES / "ants").glob("*.jpg"))))
    expected = make_hostile_files(data / "ants", photo)
    shutil.copytree(FIXTURE_IMAGES / "bees", data / "bees")
    (data / "bees" / "nested" / "deeper").mkdir(parents=True)
    first_bee = sorted((data / "bees").glob("*.jpg"))[0]
    first_bee.rename(data / "bees" / "nested" / "deeper" / "x.jpg")
    return data, expected


def test_hostile_files_are_kept_converted_or_quarantined_with_reasons(hostile_data, tmp_path):
    data, expected = hostile_data
    before = _tree_snapshot(data)
    paths = RunPaths(tmp_path / "out")
    clean(load_config(overrides={"min_images_per_class": 3}), paths, data)

    report = json.loads(paths.clean_report.read_text())
    by_name = {Path(f["source"]).name: f for f in report["files"] if f["label"] == "ants"}
    for name, (status, reason) in expected.items():
        assert (by_name[name]["status"], by_name[name]["reason"]) == (status, reason), (name, by_name[name])
        output = paths.out / by_name[name]["output"]
        assert output.is_file(), name
        if status == "excluded":
            assert output.is_relative_to(paths.quarantine / reason)
        else:
            with Image.open(output) as img:
                assert img.mode == "RGB", name
    assert "MAX_IMAGE_PIXELS" in by_name["bomb.png"]["detail"]
    # EXIF-rotated: stored upright, so a landscape photo with orientation 6 becomes portrait.
    with Image.open(paths.out / by_name["rotated.jpg"]["output"]) as img:
        rotated_size = img.size
    with Image.open(data / "ants" / "original.jpg") as original:
        assert rotated_size == (original.height, original.width)
    # Kept files are hard links (same inode), not copies; the input is untouched.
    kept = paths.out / by_name["original.jpg"]["output"]
    assert os.stat(kept).st_ino == os.stat(data / "ants" / "original.jpg").st_ino
    assert _tree_snapshot(data) == before
    # Nested files count for their top-level class.
    assert (paths.dataset / "bees" / "nested__deeper__x.jpg").is_file()


def test_rerun_on_unchanged_folder_decodes_nothing(hostile_data, tmp_path, monkeypatch):
    data, _ = hostile_data
    paths = RunPaths(tmp_path / "out")
    cfg = load_config(overrides={"min_images_per_class": 3})
    clean(cfg, paths, data)
    first = paths.clean_report.read_text()

    import jobs.clean as clean_module

    def refuse(*a, **k):
        raise AssertionError("re-run decoded a file although nothing changed")

    monkeypatch.setattr(clean_module, "inspect_image", refuse)
    clean(cfg, paths, data)
    assert json.loads(paths.clean_report.read_text())["files"] == json.loads(first)["files"]


def test_many_files_are_decoded_in_processes_with_the_same_report(hostile_data, tmp_path, monkeypatch):
    """At PROCESS_POOL_MIN files to decode and more, the workers are processes: every kind of file (hostile ones
    too) comes back from them as it does from the threads."""
    import jobs.clean as clean_module

    data, _ = hostile_data
    cfg = load_config(overrides={"min_images_per_class": 3})
    by_threads, by_processes = RunPaths(tmp_path / "threads"), RunPaths(tmp_path / "processes")
    clean(cfg, by_threads, data)
    pools = []

    def process_pool(*args, **kwargs) -> ProcessPoolExecutor:
        pools.append(kwargs["mp_context"].get_start_method())
        return ProcessPoolExecutor(*args, **kwargs)

    monkeypatch.setattr(clean_module, "PROCESS_POOL_MIN", 1)
    monkeypatch.setattr(clean_module, "usable_cpus", lambda: 2)
    monkeypatch.setattr(clean_module, "ProcessPoolExecutor", process_pool)
    clean(cfg, by_processes, data)
    assert pools == ["forkserver"]
    reports = [json.loads(paths.clean_report.read_text())["files"] for paths in (by_threads, by_processes)]
    assert reports[0] == reports[1] and len(reports[0]) > 10


def test_real_dataset_gif_placeholder_is_quarantined(shared_hymenoptera, tmp_path):
    paths = RunPaths(tmp_path / "out")
    clean(load_config(), paths, shared_hymenoptera / "train")
    report = json.loads(paths.clean_report.read_text())
    gif = [f for f in report["files"] if f["source"].endswith("imageNotFound.gif")]
    assert gif and gif[0]["status"] == "excluded", gif
    assert report["classes"]["ants"]["usable"] + report["classes"]["bees"]["usable"] >= 240


def test_small_class_is_refused_naming_class_and_count(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURE_IMAGES / "ants", data / "ants")
    (data / "bees").mkdir()
    for f in sorted((FIXTURE_IMAGES / "bees").glob("*.jpg"))[:2]:
        shutil.copy(f, data / "bees")
    (data / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(CleanError, match=r"class 'bees' has 2 usable images \(min_images_per_class=5\)"):
        clean(load_config(), RunPaths(tmp_path / "out"), data)


@pytest.mark.parametrize("layout, message", [
    ("missing", "is not a folder"),
    ("empty", "has no class sub-folders"),
    ("one_class", "has one class (ants)"),
])
def test_bad_data_folders_give_one_clear_line(tmp_path, layout, message):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "one_class":
        shutil.copytree(FIXTURE_IMAGES / "ants", data / "ants")
    proc = run_job("clean", "--data", str(data), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_class_with_only_broken_files_is_refused(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURE_IMAGES / "ants", data / "ants")
    (data / "bees").mkdir()
    for i in range(6):
        (data / "bees" / f"b{i}.jpg").write_bytes(b"<html>nope</html>" * (i + 1))
    proc = run_job("clean", "--data", str(data), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "class 'bees' has 0 usable images" in proc.stderr


def test_unwritable_out_is_refused(tmp_path, small_data):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            # root ignores mode bits; a path under a regular file is unwritable for everyone
            out = tmp_path / "file"
            out.write_text("x")
            out = out / "sub"
        proc = run_job("clean", "--data", str(small_data), "--out", str(out), check=False)
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert proc.returncode == 2 and "not writable" in proc.stderr and str(out) in proc.stderr


def test_links_fifos_and_outside_paths_each_get_a_report_line(tmp_path: Path, small_data: Path):
    """Nothing under --data is skipped without a word, and nothing outside it is read unless asked."""
    photo = Image.open(sorted((small_data / "ants").glob("*.jpg"))[0]).convert("RGB")
    stranger, other_class = tmp_path / "elsewhere" / "stranger.jpg", tmp_path / "other_class"
    stranger.parent.mkdir()
    other_class.mkdir()
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(stranger)  # photos no file under --data has
    photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(other_class / "x.jpg")
    (small_data / "ants" / "outside.jpg").symlink_to(stranger)
    (small_data / "ants" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(small_data / "bees" / "pipe.jpg")
    (small_data / "linked_class").symlink_to(other_class, target_is_directory=True)
    inside = sorted((small_data / "bees").glob("*.jpg"))[0]
    (small_data / "ants" / "inside.jpg").symlink_to(inside)
    paths = RunPaths(tmp_path / "out")
    clean(load_config(overrides={"min_images_per_class": 3}), paths, small_data)
    report = json.loads(paths.clean_report.read_text())
    by_source = {f["source"]: f for f in report["files"]}
    assert {k: (by_source[k]["reason"], by_source[k]["sha256"]) for k in
            ("ants/outside.jpg", "ants/broken.jpg", "bees/pipe.jpg", "linked_class")} == {
        "ants/outside.jpg": ("outside_data", ""), "ants/broken.jpg": ("broken_link", ""),
        "bees/pipe.jpg": ("not_a_regular_file", ""), "linked_class": ("outside_data", "")}
    assert set(report["classes"]) == {"ants", "bees"}  # a refused class folder is no class
    # A link inside --data is read like any file (here: the same photo as its target).
    assert by_source["ants/inside.jpg"]["sha256"] == by_source[f"bees/{inside.name}"]["sha256"] != ""

    followed = RunPaths(tmp_path / "followed")
    clean(load_config(overrides={"min_images_per_class": 1, "follow_symlinks": True}), followed, small_data)
    report = json.loads(followed.clean_report.read_text())
    assert {f["source"]: f["status"] for f in report["files"]}["ants/outside.jpg"] == "kept"
    assert "linked_class" in report["classes"]


def test_leftover_part_files_are_swept_and_reruns_leave_none(tmp_path: Path, small_data: Path):
    """A killed run's temp files go at the next start; a rerun over hard links leaves no .link.part."""
    paths = RunPaths(tmp_path / "out")
    cfg = load_config(overrides={"min_images_per_class": 3})
    (small_data / "ants" / "broken.jpg").write_bytes(b"not an image")
    clean(cfg, paths, small_data)
    for leftover in (paths.dataset / "ants" / ".x.jpg.link.part", paths.quarantine / "not_an_image" / ".y.part",
                     paths.cache / ".clean_cache.json.123.part"):
        leftover.write_bytes(b"half")
    clean(cfg, paths, small_data)
    assert list(paths.out.rglob("*.part")) == []
