"""Progress lines a person can follow: the stage counter, and bars that become plain lines in a log."""

from __future__ import annotations

import re

import pytest

from jobs import progress
from jobs.errors import JobError
from jobs.progress import Bar, Stages, begin_stage, duration, track


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.04, 9.94, 12.4, 59.6, 61, 3599, 3600, 7321)] == [
        "0.0 s", "9.9 s", "12 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 02 min"]


def test_stages_count_across_the_run_and_time_each(capsys):
    with Stages(["clean", "split", "train head", "train finetune", "evaluate"]) as stages:
        stages.begin("clean")
        stages.begin("split")
        head = begin_stage("train head")  # what train does, without the counter passed to it
        assert head.label == "[3/5] train head" and begin_stage("train head") is head  # already running
        begin_stage("train finetune")
        stages.begin("evaluate")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == ["[1/5] clean", "[2/5] split", "[3/5] train head", "[4/5] train finetune", "[5/5] evaluate"]
    assert all(re.fullmatch(r"\[\d/5\] [a-z ]+ done in \d+\.\d s", line) for line in lines[1:-1:2])
    assert re.fullmatch(r"\[5/5\] evaluate done in \d+\.\d s \(the whole run: \d+\.\d s\)", lines[-1])
    assert begin_stage("train head").label == "train head"  # no run: a bare clock, nothing printed
    assert capsys.readouterr().out == ""


def test_a_failed_stage_is_not_reported_done(capsys):
    with pytest.raises(RuntimeError), Stages(["clean", "split"]) as stages:
        stages.begin("clean")
        raise RuntimeError("boom")
    assert capsys.readouterr().out == "[1/2] clean\n"


def test_eta_extrapolates_the_work_done_here(monkeypatch):
    clock = progress.Stage("[5/9] train head", started=0.0)
    monkeypatch.setattr(progress.time, "monotonic", lambda: 30.0)
    # resumed after epoch 1, the loop began at 10 s: 2 epochs in 20 s, 7 to go
    assert clock.timing(3, 10, since=10.0, done_before=1) == "30 s elapsed, ETA 1 min 10 s"
    assert clock.timing(10, 10) == "30 s elapsed"


def test_in_a_log_a_bar_is_a_line_per_ten_percent_and_no_carriage_return(capsys):
    with Bar(50, "[4/8] train head: epoch 2/3", unit="batch", min_interval_s=0) as bar:
        for _ in range(50):
            bar.set_postfix("loss=0.5000")
            bar.update()
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert "\r" not in out.out + out.err
    assert [re.match(r"\[4/8\] train head: epoch 2/3: (\d+)% \((\d+)/50 batch", x).groups() for x in lines] == [
        (str(p), str(p // 2)) for p in range(10, 100, 10)]  # never 100 %: the caller's own line says it ended
    assert all(line.endswith("loss=0.5000") and "elapsed, ETA" in line for line in lines)


def test_a_short_loop_says_nothing_in_a_log(capsys):
    assert list(track(range(1000), 1000, "clean: decoding", unit="img")) == list(range(1000))
    assert capsys.readouterr().out == ""


def test_the_log_interval_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("JOBS_PROGRESS_INTERVAL_S", "0")
    list(track(range(20), 20, "features: train", unit="img"))
    assert len(capsys.readouterr().out.splitlines()) == 9
    monkeypatch.setenv("JOBS_PROGRESS_INTERVAL_S", "soon")
    with pytest.raises(JobError, match="JOBS_PROGRESS_INTERVAL_S='soon' is not a number of seconds"):
        Bar(10, "x")
