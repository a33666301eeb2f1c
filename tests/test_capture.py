"""Capture without a server (handler/capture.py): what is kept and how it is written, the cap shared by several
writers, and a full queue that drops and counts instead of blocking (tests/test_served_answers.py: real servers)."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURE_IMAGES, REPO, run_job

from handler.capture import (
    ABSTAINED,
    LOW_CONFIDENCE,
    QUEUE_FULL,
    SAMPLED,
    CaptureFolder,
    CaptureSettingError,
    CaptureSettings,
    CaptureSink,
)
from jobs.config import load_config
from jobs.serve import capture_environ

PHOTO = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))[0].read_bytes()


def answer(probability: float, abstain: bool = False) -> dict:
    return {"predictions": [{"label": "ants", "index": 0, "probability": probability}], "ood_score": 0.4,
            "abstain": abstain, "abstain_reason": "unlike the training images" if abstain else None}


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def folder_usage(folder: Path) -> tuple[int, int]:
    """(files, bytes) of the captures now; a file deleted while we look is not there."""
    count = size = 0
    for p in files(folder):
        try:
            size += p.stat().st_size
            count += 1
        except FileNotFoundError:
            pass
    return count, size


def test_settings_come_from_the_environment_and_a_bad_value_names_its_variable(tmp_path: Path):
    assert CaptureSettings.from_environ({}) is None and CaptureSettings.from_environ({"JOBS_CAPTURE_DIR": " "}) is None
    settings = CaptureSettings.from_environ({"JOBS_CAPTURE_DIR": str(tmp_path), "JOBS_CAPTURE_SAMPLE": "0.5"})
    assert settings == CaptureSettings(tmp_path, sample=0.5)
    assert CaptureSettings.from_environ(settings.environ()) == settings
    with pytest.raises(CaptureSettingError, match="JOBS_CAPTURE_BELOW='1.5': expected a float in"):
        CaptureSettings.from_environ({"JOBS_CAPTURE_DIR": str(tmp_path), "JOBS_CAPTURE_BELOW": "1.5"})
    with pytest.raises(CaptureSettingError, match="JOBS_CAPTURE_MAX_FILES='many'"):
        CaptureSettings.from_environ({"JOBS_CAPTURE_DIR": str(tmp_path), "JOBS_CAPTURE_MAX_FILES": "many"})
    # jobs serve decides: without --capture an inherited JOBS_CAPTURE_DIR does not turn it on
    assert capture_environ(load_config(None, {})) == {"JOBS_CAPTURE_DIR": ""}
    on = capture_environ(load_config(None, {"capture": str(tmp_path), "capture_max_files": 10}))
    assert CaptureSettings.from_environ(on) == CaptureSettings(tmp_path.resolve(), max_files=10)


def test_keeps_abstained_low_confidence_and_a_sample_as_owner_only_files_with_records(tmp_path: Path):
    folder = tmp_path / "captured"
    sink = CaptureSink(CaptureSettings(folder, below=0.8, sample=0.0), "clf", "2.0")
    sink.offer([PHOTO, b"\x89PNG\r\n\x1a\n..."], [answer(0.99, abstain=True), answer(0.5)], "req-1")
    sink.offer([PHOTO], [answer(0.95)], "req-2")  # confident, not sampled: not kept
    sink.close()
    kept = {json.loads(p.read_text())["why"]: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert set(kept) == {ABSTAINED, LOW_CONFIDENCE}
    record = kept[ABSTAINED]
    assert (record["model_name"], record["model_version"], record["request_id"]) == ("clf", "2.0", "req-1")
    assert record["answer"] == answer(0.99, abstain=True) and record["answered_at"].endswith("+00:00")
    assert (folder / record["image"]).read_bytes() == PHOTO and record["image"].endswith(".jpg")
    assert kept[LOW_CONFIDENCE]["image"].endswith(".png") and kept[LOW_CONFIDENCE]["image_index"] == 1
    assert len(files(folder)) == 4
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    sampled = CaptureSink(CaptureSettings(tmp_path / "all", below=0.0, sample=1.0), "clf", "2.0")
    assert sampled.why(answer(0.99)) == SAMPLED
    sampled.close()


def test_the_cap_holds_for_writers_sharing_the_folder_and_drops_the_oldest(tmp_path: Path):
    folder = tmp_path / "captured"
    max_files, max_bytes = 10, 6 * len(PHOTO)
    writers = [CaptureFolder(folder, max_bytes, max_files) for _ in range(3)]  # as three worker processes

    over: list[tuple[int, int]] = []

    def write(writer: CaptureFolder, w: int) -> None:
        for i in range(12):
            stamp = time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 10**9:09d}Z"
            assert writer.write(f"{stamp}-w{w}-{i}", PHOTO, {"i": i}) is None
            usage = folder_usage(folder)  # while the others write and trim
            if usage[0] > max_files or usage[1] > max_bytes:
                over.append(usage)

    threads = [threading.Thread(target=write, args=(w, n)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not over, over
    names = files(folder)
    assert 2 <= len(names) <= max_files and sum(p.stat().st_size for p in names) <= max_bytes
    last = {f"w{w}-11" for w in range(3)}
    assert any(any(tag in p.name for p in names) for tag in last)  # the newest are the ones left
    assert not list(folder.glob(".*.part"))
    assert CaptureFolder(folder, 10, 10).write("big", PHOTO, {}) == "over the cap"


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path):
    sink = CaptureSink(CaptureSettings(tmp_path / "captured", below=1.0, sample=0.0), "clf", "1.0", queue_size=2)
    release = threading.Event()
    written = []

    def slow_write(stem: str, image: bytes, record: dict) -> None:
        release.wait(30)  # a disk that does not keep up
        written.append(stem)

    sink.folder.write = slow_write
    start = time.perf_counter()
    for i in range(50):
        sink.offer([PHOTO], [answer(0.5)], f"req-{i}")
    offered = time.perf_counter() - start
    assert offered < 0.5, f"offer blocked for {offered:.2f} s"
    dropped = sink.take_dropped()
    assert dropped[QUEUE_FULL] >= 47 and sink.take_dropped() == {}
    release.set()
    sink.close()
    assert len(written) + dropped[QUEUE_FULL] == 50


@pytest.mark.parametrize("manifest", ["deploy/k8s/serve.yaml", "deploy/kserve/inferenceservice-kserve-runtime.yaml"])
def test_the_serving_manifests_carry_every_capture_setting_off(manifest: str, tmp_path: Path):
    docs = [d for d in yaml.safe_load_all((REPO / manifest).read_text()) if d]
    pod = next(d for d in docs if d["kind"] in {"Deployment", "InferenceService"})["spec"]
    pod = pod["template"]["spec"] if "template" in pod else pod["predictor"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if e["name"].startswith("JOBS_CAPTURE")}
    assert set(env) == set(CaptureSettings.ENV.values())
    assert CaptureSettings.from_environ(env) is None  # off
    on = CaptureSettings.from_environ({**env, "JOBS_CAPTURE_DIR": str(tmp_path)})
    assert on == CaptureSettings(tmp_path)  # the manifest's values are the defaults


def test_jobs_serve_takes_the_capture_options():
    text = run_job("serve", "--help").stdout
    for option in ("--capture", "--capture-below", "--capture-sample", "--capture-max-mb", "--capture-max-files"):
        assert option in text
