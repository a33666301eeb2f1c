from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_job

from jobs.config import Config, ConfigError, key_names, load_config


def test_yaml_then_cli_precedence(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.01\nterms: [cats, dogs]\nfreeze_backbone: false\n")
    cfg = load_config(f, {"epochs": "3", "weights": "none"})
    got = (cfg.epochs, cfg.lr, cfg.terms, cfg.freeze_backbone, cfg.weights)
    assert got == (3, 0.01, ["cats", "dogs"], False, "none")
    assert cfg.batch_size == Config().batch_size


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2\nbatchsize: 16\n")
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'; did you mean 'batch_size'"):
        load_config(f)


@pytest.mark.parametrize("overrides, key", [
    ({"epochs": "two"}, "epochs"), ({"val_fraction": 0.6, "test_fraction": 0.5}, "test_fraction"),
    ({"precision": "fp8"}, "precision"), ({"freeze_backbone": "maybe"}, "freeze_backbone"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=overrides)


def test_every_key_is_a_cli_option_of_run():
    help_text = run_job("run", "--help").stdout
    for key in key_names():
        assert f"--{key.replace('_', '-')}" in help_text, key


def test_config_typo_on_the_command_line_fails_cleanly(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("epoch: 2\n")
    proc = run_job("split", "--config", str(f), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown config key 'epoch'; did you mean 'epochs'?" \
        or "unknown config key 'epoch'" in proc.stderr


def test_a_run_folder_remembers_its_config(tmp_path: Path):
    saved = tmp_path / "config.yaml"
    saved.write_text("epochs: 9\nweights: none\nretired_key: 1\n")
    user = tmp_path / "user.yaml"
    user.write_text("epochs: 4\n")
    cfg = load_config(user, {"lr": "0.1"}, saved=saved)
    assert (cfg.epochs, cfg.weights, cfg.lr) == (4, "none", 0.1)
