"""Model versions: the next version at export, the paired comparison with the previous one, the archive that
refuses a significantly worse model as the default (and --force), and the switch of a real TorchServe's
default version under a client loop, then the rollback."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import FIXTURE_IMAGES
from torchserve_fixture import export_random_model, export_tiny_model, serve_detached

from handler.status import STATUS_DIR, process_start
from jobs.archive import VERSIONS_DIR, archive, packed_settings, versioned_mar
from jobs.cli import main
from jobs.config import RunPaths, load_config
from jobs.errors import JobError
from jobs.evaluate import evaluate
from jobs.export import export
from jobs.fileio import atomic_write_json, link_or_copy
from jobs.predict import predict
from jobs.report import _versions_section
from jobs.runtime import setup
from jobs.serve import free_ports, launch_kserve, serve
from jobs.switch import serving_processes, switch_to
from jobs.train import train
from jobs.versions import (
    PREVIOUS_TEST_SPLIT,
    TEST_SPLIT_FILE,
    begin_export,
    compare,
    compare_answers,
    mcnemar_p,
    next_version,
    paired_counts,
    version_key,
)

CLASSES = [f"class{i}" for i in range(7)]
PHOTOS = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))


def test_mcnemar_on_a_known_table():
    """9 images only the old model got right, 1 only the new one: exact two-sided p = 2 * (1 + 10) / 2**10."""
    old = np.array([1] * 5 + [1] * 9 + [0] * 1 + [0] * 3, bool)
    new = np.array([1] * 5 + [0] * 9 + [1] * 1 + [0] * 3, bool)
    counts = paired_counts(old, new)
    assert {k: counts[k] for k in ("images", "both_right", "only_old_right", "only_new_right", "both_wrong")} == \
        {"images": 18, "both_right": 5, "only_old_right": 9, "only_new_right": 1, "both_wrong": 3}
    assert counts["p_value"] == pytest.approx(22 / 1024)
    assert counts["significantly_worse"]
    assert not paired_counts(new, old)["significantly_worse"]  # significantly better is no reason to refuse
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0


def test_per_class_counts_by_class_name():
    """The new model may know a class the old one did not: labels are compared by name."""
    doc = compare_answers(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "a", "new", "b"])
    assert doc["per_class"]["a"]["only_new_right"] == 1 and doc["per_class"]["b"]["only_old_right"] == 1
    assert doc["both_right"] == 2


def test_version_numbers():
    assert next_version("1.0") == "2.0" and next_version("2.1") == "3.0" and next_version("9") == "10.0"
    assert sorted(["10.0", "9.0", "1.0"], key=version_key) == ["1.0", "9.0", "10.0"]
    with pytest.raises(JobError, match="--model-version"):
        next_version("beta")


def test_the_same_weights_keep_their_version_and_a_taken_version_counts_on(tmp_path: Path, capsys):
    paths = export_random_model(tmp_path, CLASSES[:2], seed=0)
    digest = json.loads((paths.model / "metadata.json").read_text())["weights_sha256"]
    assert begin_export(paths, "auto", digest) == "1.0" and not paths.versions.exists()  # a re-export
    # a run folder's config.yaml says 1.0 (archive recorded it): other weights still get the next version
    assert begin_export(paths, "1.0", "other weights") == "2.0"
    assert "model_version 1.0 already names other weights" in capsys.readouterr().out
    assert json.loads((paths.versions / "1.0" / "model" / "metadata.json").read_text())["model_version"] == "1.0"


@pytest.mark.e2e
def test_a_retrained_run_is_version_2_and_its_report_compares_it_with_1(tmp_path: Path):
    """The stages themselves: train, export, retrain with another seed, export, evaluate."""
    cfg, paths = export_tiny_model(tmp_path / "run", FIXTURE_IMAGES)
    rt = setup(cfg)
    retrained = dataclasses.replace(cfg, seed=cfg.seed + 1)
    train(retrained, paths, rt, "fresh")
    export(retrained, paths)
    evaluate(retrained, paths, rt)
    comparison = json.loads((paths.report / "metrics.json").read_text())["versus_previous"]
    assert (comparison["version"], comparison["previous_version"]) == ("2.0", "1.0")
    old_test = json.loads((paths.versions / "1.0" / "model" / TEST_SPLIT_FILE).read_text())["images"]
    paired = comparison["sets"][PREVIOUS_TEST_SPLIT]
    assert paired["images"] == len(old_test) > 0 and paired["missing"] == 0
    assert sum(paired[k] for k in ("both_right", "only_old_right", "only_new_right", "both_wrong")) == len(old_test)
    assert "Version 2.0 against 1.0" in (paths.report / "index.html").read_text()


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> RunPaths:
    """A run folder whose model 1.0 is archived as the default, then a worse 2.0 exported, compared and archived.

    1.0's test split is labelled with 1.0's own answers, so 1.0 gets every image right and 2.0 (other random
    weights, 7 classes) gets most of them wrong: significantly worse, deliberately.
    """
    root = tmp_path_factory.mktemp("versions")
    paths = export_random_model(root / "run", CLASSES, seed=0)
    cfg = load_config(None, {"weights": "none"})
    archive(cfg, paths)
    files = []
    for photo in PHOTOS:
        dest = paths.out / "dataset" / "mixed" / f"{photo.parent.name}-{photo.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, dest)
        files.append(dest)
    answers = [r["predictions"][0]["label"] for r in predict(paths.model, files)]
    atomic_write_json(paths.model / TEST_SPLIT_FILE, {"split_hash": "random", "images": [
        {"file": str(f.relative_to(paths.out)), "class": label} for f, label in zip(files, answers)]})
    export_random_model(paths.out, CLASSES, seed=1)
    meta = json.loads((paths.model / "metadata.json").read_text())
    atomic_write_json(paths.report / "metrics.json", {"versus_previous": compare(paths, meta, 8)})
    with contextlib.suppress(JobError):  # refused as the default (the next test shows it): 2.0 kept in .versions/
        archive(cfg, paths)
    return paths


@pytest.mark.e2e
def test_the_next_export_is_version_2_and_keeps_1(two_versions: RunPaths):
    assert json.loads((two_versions.model / "metadata.json").read_text())["model_version"] == "2.0"
    kept = two_versions.versions / "1.0" / "model"
    assert json.loads((kept / "metadata.json").read_text())["model_version"] == "1.0"
    assert (kept / "model.pt").is_file() and (kept / TEST_SPLIT_FILE).is_file()


@pytest.mark.e2e
def test_the_report_compares_2_with_1_on_1s_test_split(two_versions: RunPaths):
    comparison = json.loads((two_versions.report / "metrics.json").read_text())["versus_previous"]
    paired = comparison["sets"][PREVIOUS_TEST_SPLIT]
    assert (comparison["version"], comparison["previous_version"]) == ("2.0", "1.0")
    assert paired["images"] == len(PHOTOS) and paired["only_new_right"] == 0 and paired["both_wrong"] == 0
    assert paired["only_old_right"] >= 6 and paired["p_value"] < 0.05 and paired["significantly_worse"]
    assert sum(c["images"] for c in paired["per_class"].values()) == len(PHOTOS)
    page = _versions_section(comparison)
    assert "only 1.0 right" in page and "significantly worse" in page


@dataclass
class Exit:
    code: int
    out: str
    err: str


def jobs_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> Exit:
    """``jobs ARGS`` in this process, as the console script runs it."""
    monkeypatch.setattr(sys, "argv", ["jobs", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    said = capsys.readouterr()
    return Exit(code, said.out, said.err)


@pytest.mark.e2e
def test_archive_refuses_a_significantly_worse_default_and_force_overrides(two_versions: RunPaths, tmp_path: Path,
                                                                          monkeypatch, capsys):
    paths = RunPaths(tmp_path / "run")
    shutil.copytree(two_versions.out, paths.out)
    store = paths.model_store
    refused = jobs_cli(monkeypatch, capsys, "archive", "--out", str(paths.out))
    assert refused.code == 2 and len(refused.err.splitlines()) == 1, refused.err
    assert refused.err.startswith("error: archive: version 2.0 is significantly worse than 1.0 on 1.0's test split")
    assert "--force" in refused.err
    assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "1.0"  # the default is unchanged
    assert versioned_mar(store, "classifier", "2.0").is_file()  # and 2.0 is kept, to serve when wanted
    forced = jobs_cli(monkeypatch, capsys, "archive", "--out", str(paths.out), "--force")
    assert forced.code == 0 and "made the default anyway (--force)" in forced.out
    assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "2.0"
    assert sorted(p.name for p in (store / VERSIONS_DIR).glob("*.mar")) == ["classifier-1.0.mar",
                                                                           "classifier-2.0.mar"]


@pytest.mark.e2e
def test_switch_and_rollback_under_load_answer_every_request(two_versions: RunPaths, tmp_path: Path):
    """A real TorchServe serves 1.0; a client loop sends requests while it switches to 2.0 and back."""
    store, workdir = two_versions.model_store, tmp_path / "state"
    cfg = load_config(None, {})
    server = serve_detached(cfg, store, workdir)
    statuses: list[int] = []
    stop = threading.Event()
    body = PHOTOS[0].read_bytes()

    def client() -> None:
        while not stop.is_set():
            r = requests.post(f"{server.inference_url}/predictions/classifier", data=body, headers=server.auth(),
                              timeout=60)
            statuses.append(r.status_code)

    def served_version() -> str:
        r = requests.get(f"{server.management_url}/models/classifier", headers=server.auth("management"), timeout=10)
        return r.json()[0]["modelVersion"]

    loop = threading.Thread(target=client)
    try:
        assert served_version() == "1.0"
        loop.start()
        time.sleep(0.5)
        assert switch_to(cfg, store, workdir, "2.0") == 0
        assert served_version() == "2.0"
        assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "2.0"  # what a restart serves
        time.sleep(0.5)
        assert switch_to(cfg, store, workdir, "1.0") == 0  # the rollback
        assert served_version() == "1.0"
        time.sleep(0.5)
    finally:
        stop.set()
        if loop.is_alive():
            loop.join(60)
        serve(cfg, store, stop=True, workdir=workdir)
    assert len(statuses) > 3 and set(statuses) == {200}, statuses
    assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "1.0"
    with pytest.raises(JobError, match="versions of classifier archived"):
        switch_to(cfg, store, workdir, "3.0")


@pytest.mark.e2e
def test_switch_to_with_no_server_sets_the_stores_default(two_versions: RunPaths, tmp_path: Path, monkeypatch,
                                                          capsys):
    store = tmp_path / "model-store"
    shutil.copytree(two_versions.model_store, store)
    switched = jobs_cli(monkeypatch, capsys, "serve", "--model-store", str(store), "--switch-to", "2.0")
    assert switched.code == 0 and "classifier 2.0 is the default" in switched.out, switched
    assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "2.0"
    unknown = jobs_cli(monkeypatch, capsys, "serve", "--model-store", str(store), "--switch-to", "9.0")
    assert unknown.code == 2 and len(unknown.err.splitlines()) == 1 and "1.0, 2.0" in unknown.err, unknown


@pytest.mark.e2e
@pytest.mark.parametrize("cpus", ["1", None], ids=["one-process", "plans-processes"])
def test_kserve_switch_and_rollback_under_load_answer_every_request(two_versions: RunPaths, tmp_path: Path,
                                                                   monkeypatch, cpus: str | None):
    """KServe's model server serves 1.0 (in its one process, and in the worker processes the machine's plan
    gives: two on 2 cores); a client loop sends V2 requests while it switches to 2.0, back to 1.0, and to a
    broken 3.0 that it refuses, still serving 1.0."""
    pytest.importorskip("kserve", reason="the kserve extra is not installed")
    if cpus:
        monkeypatch.setenv("JOBS_CPUS", cpus)  # handler.cpus: the plan's cores, in the runtime too
    store, workdir = tmp_path / "model-store", tmp_path / "state"
    shutil.copytree(two_versions.model_store, store)
    link_or_copy(versioned_mar(store, "classifier", "1.0"), store / "classifier.mar")
    (store / VERSIONS_DIR / "classifier-3.0.mar").write_bytes(b"not a zip file")
    cfg = load_config(None, {})
    server = launch_kserve(cfg, store, workdir, host="127.0.0.1", port=free_ports(1)[0], disable_token_auth=False)
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(PHOTOS[0].read_bytes()).decode()]}]}
    url = f"{server.inference_url}/v2/models/classifier/infer"

    def client() -> None:
        while not stop.is_set():
            r = requests.post(url, json=body, headers=server.auth(), timeout=60)
            answers.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))

    def next_versions() -> set:
        """The versions of the next few answers (not the one in flight now, begun before what just happened)."""
        start, deadline = len(answers), time.monotonic() + 30
        while len(answers) < start + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {v for _, v in answers[start + 1:]}

    loop = threading.Thread(target=client)
    try:
        loop.start()
        assert next_versions() == {"1.0"}, answers
        assert switch_to(cfg, store, workdir, "2.0") == 0
        assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "2.0"  # what a restart serves
        assert next_versions() == {"2.0"}, answers[-5:]
        assert switch_to(cfg, store, workdir, "1.0") == 0  # the rollback
        assert next_versions() == {"1.0"}, answers[-5:]
        with pytest.raises(JobError, match=r"could not load classifier 3\.0 .*1\.0 stays the default .*kserve\.out"):
            switch_to(cfg, store, workdir, "3.0")
        assert next_versions() == {"1.0"}, answers[-5:]
        metrics = requests.get(f"{server.inference_url}/metrics", timeout=10).text
        counted = {v: sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                          if line.startswith("classifier_answers_total{") and f'model_version="{v}"' in line)
                   for v in ("1.0", "2.0")}
        assert counted["1.0"] > 0 and counted["2.0"] > 0, counted  # each version's answers under its own labels
    finally:
        stop.set()
        if loop.is_alive():
            loop.join(60)
        server.stop()
    assert len(answers) > 10 and {s for s, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]
    assert packed_settings(store / "classifier.mar")[0]["modelVersion"] == "1.0"
    log = (workdir / "kserve.out").read_text()
    assert "now serving classifier 2.0 (was 1.0)" in log and "could not load" in log


def test_a_status_file_whose_process_died_is_not_a_serving_process_even_when_its_pid_is_taken_again(tmp_path: Path):
    """The switch waits for every serving process; one that died must not count, nor a stranger with its pid."""
    folder = tmp_path / STATUS_DIR
    folder.mkdir()
    me = os.getpid()
    for name, pid, started in (("live", me, process_start(me)), ("before-started-was-kept", me, None),
                               ("pid-taken-again", me, process_start(me) - 1), ("gone", 2**22 + 1, 1)):
        (folder / f"classifier.{name}.json").write_text(json.dumps({"pid": pid, "started": started,
                                                                    "model": "classifier", "version": name}))
    assert sorted(p["version"] for p in serving_processes(tmp_path, "classifier")) == [
        "before-started-was-kept", "live"]


def test_kserve_worker_processes_unpacking_the_next_archive_at_once_share_one_folder(tmp_path: Path):
    """Every worker process of the KServe runtime unpacks the switched-to archive at the same moment: each into a
    temp folder renamed into place, the first rename wins and the others use it; none sees half a folder."""
    pytest.importorskip("kserve", reason="the kserve extra is not installed")
    from concurrent.futures import ThreadPoolExecutor

    from handler.kserve_runtime import RELOADS, archive_identity, unpack_reload

    def mar(path: Path, version: str) -> Path:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {
                "modelName": "classifier", "modelVersion": version, "serializedFile": "model.pt"}}))
            z.writestr("model.pt", b"x" * 100_000)
        return path

    store, dest = tmp_path / "store", tmp_path / "models"
    (store / VERSIONS_DIR).mkdir(parents=True)
    default = store / "classifier.mar"
    for version in ("1.0", "2.0"):
        link_or_copy(mar(store / VERSIONS_DIR / f"classifier-{version}.mar", version), default)
        with ThreadPoolExecutor(8) as pool:
            archives = list(pool.map(lambda _: unpack_reload(default, dest), range(8)))
        assert {a.model_dir for a in archives} == {archives[0].model_dir}
        assert {a.version for a in archives} == {version}
        assert archives[0].identity == archive_identity(default.stat()) and archives[0].source == default.absolute()
        assert (archives[0].model_dir / "model.pt").stat().st_size == 100_000
    assert sorted(p.name.startswith(".") for p in (dest / RELOADS).iterdir()) == [False, False]  # no temp left


def test_a_switch_removes_the_folders_of_earlier_switches_once_no_process_can_be_loading_them(tmp_path: Path):
    """Each switch unpacks its archive (the model's size again) into ``.reloads``: switching back and forth for
    weeks must not fill the disk, and a folder just unpacked or reused (another process may be loading it) stays."""
    pytest.importorskip("kserve", reason="the kserve extra is not installed")
    from handler.kserve_runtime import RELOADS, sweep_reloads, unpack_reload

    store, dest = tmp_path / "store", tmp_path / "models"
    store.mkdir()
    folders = {}
    for version in ("1.0", "2.0", "3.0"):
        with zipfile.ZipFile(store / f"{version}.mar", "w") as z:
            z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {
                "modelName": "classifier", "modelVersion": version, "serializedFile": "model.pt"}}))
        folders[version] = unpack_reload(store / f"{version}.mar", dest).model_dir
        os.utime(folders[version], (time.time() - 3600,) * 2)  # unpacked an hour ago
    (dest / RELOADS / ".3.0.crashed-unpack").mkdir()  # a temp folder left by a process that died (fresh)
    assert unpack_reload(store / "2.0.mar", dest).model_dir == folders["2.0"]  # 2.0 reused: fresh again
    removed = sweep_reloads(dest, folders["3.0"], idle_s=60)
    assert removed == [folders["1.0"]]  # 3.0 serves here, 2.0 was just reused, the temp folder is fresh
    assert sorted(p.name for p in (dest / RELOADS).iterdir()) == sorted(
        [folders["2.0"].name, folders["3.0"].name, ".3.0.crashed-unpack"])
    assert (folders["3.0"] / "MAR-INF" / "MANIFEST.json").is_file()
    os.utime(folders["2.0"], (time.time() - 3600,) * 2)
    assert sweep_reloads(dest, folders["3.0"], idle_s=60) == [folders["2.0"]]
