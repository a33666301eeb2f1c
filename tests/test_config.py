from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_job

from jobs.config import (
    TRAJECTORY_KEYS,
    Config,
    ConfigError,
    key_names,
    key_table_markdown,
    keys_for,
    load_config,
    saved_yaml,
)


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
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'epoch'; did you mean 'epochs'?"


def test_a_run_folder_remembers_its_config(tmp_path: Path):
    saved = tmp_path / "config.yaml"
    saved.write_text("epochs: 9\nweights: none\nretired_key: 1\n")
    user = tmp_path / "user.yaml"
    user.write_text("epochs: 4\n")
    cfg = load_config(user, {"lr": "0.1"}, saved=saved)
    assert (cfg.epochs, cfg.weights, cfg.lr) == (4, "none", 0.1)


@pytest.mark.parametrize("overrides, message", [
    ({"lr": "inf"}, "config key 'lr' must be a finite number in (0, 10] (got inf)"),
    ({"lr": "nan"}, "config key 'lr' must be a finite number in (0, 10] (got nan)"),
    ({"weight_decay": "-1"}, "config key 'weight_decay' must be a finite number in [0, 10] (got -1.0)"),
    ({"backbone_lr_div": "0"}, "config key 'backbone_lr_div' must be a finite number in (0, 1e+06] (got 0.0)"),
    ({"epochs": float("inf")}, "config key 'epochs' expects int, got inf"),
    ({"batch_size": "1e20"},
     "config key 'batch_size' must be a finite number in [1, 65536] (got 100000000000000000000)"),
    ({"terms": {"a": 1}}, "config key 'terms' expects list, got {'a': 1}"),
])
def test_every_number_is_finite_and_in_range(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert str(e.value) == message


def test_bad_numbers_from_the_command_line_are_one_line(tmp_path: Path):
    for option, value in (("--lr", "nan"), ("--weight-decay", "-1"), ("--backbone-lr-div", "0"),
                          ("--batch-size", "1e20"), ("--weights", "/nonexistent.pth")):
        proc = run_job("train", "--out", str(tmp_path / "o"), option, value, check=False)
        assert proc.returncode == 2, (option, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert option.removeprefix("--").replace("-", "_") in proc.stderr or "weights file" in proc.stderr


def test_a_saved_config_cut_at_a_line_boundary_is_refused(tmp_path: Path):
    saved = tmp_path / "config.yaml"
    text = saved_yaml(load_config(overrides={"epochs": 150, "finetune_epochs": 2, "deterministic": True}).to_dict())
    saved.write_text(text)
    assert load_config(saved=saved).epochs == 150
    saved.write_text("".join(text.splitlines(keepends=True)[:20]))
    with pytest.raises(ConfigError, match=r"config.yaml is damaged: it was written with \d+ keys and now has \d+; "):
        load_config(saved=saved)


def test_the_key_table_is_the_one_source():
    """CLI options, trajectory keys and the key table in docs/configuration.md all come from the key definitions."""
    assert "lr" in TRAJECTORY_KEYS and "epochs" not in TRAJECTORY_KEYS and "device" not in TRAJECTORY_KEYS
    assert "batch_size" in keys_for("evaluate") and "lr" not in keys_for("evaluate")
    assert set(keys_for("run")) == set(key_names())
    evaluate_help = run_job("evaluate", "--help").stdout
    assert "--batch-size" in evaluate_help and "--lr" not in evaluate_help
    assert key_table_markdown() in (REPO / "docs" / "configuration.md").read_text(), \
        "docs/configuration.md's key table is stale: paste jobs.config.key_table_markdown() into it"
