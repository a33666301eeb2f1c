"""The job from Python (jobs.api): what a notebook user calls, and what the command line calls too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURE_IMAGES, TINY_ARCH

from jobs import api, cli
from jobs.config import ConfigError
from jobs.errors import JobError

TINY = {"arch": TINY_ARCH, "weights": "none", "epochs": 1, "batch_size": 8, "min_images_per_class": 3, "num_workers": 0,
        "feature_views": 1}


@pytest.mark.e2e
def test_run_from_python_with_relative_paths(tmp_path: Path, monkeypatch, capsys):
    """docs/python-api.md's first example, tiny: fixture photos, random weights, one epoch, relative paths."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURE_IMAGES, "photos")
    mar = api.run(data="photos", out="runs/pets", **TINY)
    assert mar == Path("runs/pets/model-store/classifier.mar") and mar.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith("run: clean -> audit -> split -> train -> export -> evaluate -> archive: "
                              "images from photos into runs/pets")
    report = api.evaluate("runs/pets", batch_size=4)
    assert report == Path("runs/pets/report/index.html") and report.is_file()
    assert json.loads(Path("runs/pets/model/metadata.json").read_text())["classes"] == ["ants", "bees"]


def test_keys_are_checked_as_on_the_command_line(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown config key 'epoch'; did you mean 'epochs'"):
        api.split(tmp_path, epoch=3)
    with pytest.raises(ConfigError, match="config key 'lr' must be a finite number"):
        api.train(tmp_path, lr=-1)
    with pytest.raises(JobError, match="resume must be auto, require or fresh"):
        api.train(tmp_path, resume="yes")
    assert not any(tmp_path.iterdir()), "a refused call wrote into the run folder"


def test_the_cli_run_is_the_api_run(monkeypatch, tmp_path: Path):
    """`jobs run` has no pipeline of its own: it hands its options to api.run and prints what it returns."""
    calls = []

    def fake_run(data, out, **kwargs):
        calls.append((data, out, kwargs))
        return Path(out) / "model-store" / "classifier.mar"

    monkeypatch.setattr(api, "run", fake_run)
    result = CliRunner().invoke(cli.cli, ["run", "--data", "photos", "--out", "runs/x", "--epochs", "3", "--fresh"])
    assert result.exit_code == 0, result.output
    (data, out, kwargs), = calls
    assert (data, out) == (Path("photos"), Path("runs/x"))
    assert kwargs["resume"] == "fresh" and kwargs["epochs"] == "3" and kwargs["lr"] is None
    assert "done: runs/x/model-store/classifier.mar" in result.output
