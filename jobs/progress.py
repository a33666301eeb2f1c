"""Progress a person can follow, on a terminal and in a log.

Two parts:

- ``Stages``: the run's stage counter. The code that runs the pipeline lists the stages it will
  run and enters the counter (``with Stages([...]) as stages:``); ``stages.begin(name)`` ends the
  previous stage with its time and prints ``[3/9] split``. A stage function that has stages of
  its own (train: head, then fine-tune) calls ``begin_stage(name)``, which finds the active counter,
  so the counter need not be passed through every signature; outside a run it just times.
- ``Bar``: a tqdm bar when a person watches a terminal; in a log (stdout or stderr not a TTY)
  a carriage-return bar is garbage (``0%| 0/4`` repeated), so there it is a plain line at every
  ``LOG_EVERY_PERCENT`` -- and only when ``JOBS_PROGRESS_INTERVAL_S`` (default ``LOG_INTERVAL_S``)
  seconds passed since the last line: a short loop says nothing, its caller's one summary line
  (an epoch's, a stage's) is enough. ``JOBS_PROGRESS_INTERVAL_S=0`` logs every step of 10 %.

Every line goes through ``print``: under torchrun only rank 0 prints (``jobs.runtime``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm import tqdm

from jobs.errors import JobError

LOG_EVERY_PERCENT = 10
LOG_INTERVAL_S = 15.0
INTERVAL_ENV = "JOBS_PROGRESS_INTERVAL_S"

T = TypeVar("T")


def interactive() -> bool:
    """Whether a person watches a terminal: bars redraw in place there, and only there."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def log_interval() -> float:
    """Seconds between two progress lines of one loop in a log: ``JOBS_PROGRESS_INTERVAL_S``, else 15."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(text) if text else LOG_INTERVAL_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise JobError(f"{INTERVAL_ENV}={text!r} is not a number of seconds >= 0; unset it for the default "
                       f"({LOG_INTERVAL_S:g})")
    return value


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ----------------------------------------------------------------------------------------------
# the stage counter


@dataclass
class Stage:
    """One stage's clock; ``label`` is ``[3/9] split`` inside a run, ``split`` outside one."""

    label: str
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def timing(self, done: float, total: float, since: float | None = None, done_before: float = 0) -> str:
        """``12 s elapsed, ETA 18 s``: the rate of the work done since ``since`` (default the stage's start;
        ``done_before`` of it was done before then, e.g. epochs a resume skipped) extrapolated to ``total``."""
        now = time.monotonic()
        text = f"{duration(now - self.started)} elapsed"
        done_here = done - done_before
        if 0 < done_here and done < total:
            text += f", ETA {duration((now - (self.started if since is None else since)) / done_here * (total - done))}"
        return text


_active: list[Stages] = []


class Stages:
    """The stages of one run, in order; ``begin`` each as it starts (a stage not begun was skipped)."""

    def __init__(self, names: Sequence[str]):
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {list(names)}")
        self.names = list(names)
        self.current: Stage | None = None
        self.current_name = ""
        self.started = time.monotonic()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __enter__(self) -> Stages:
        self.started = time.monotonic()
        _active.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _active.remove(self)
        if exc_type is None:
            self.end(f" (the whole run: {duration(time.monotonic() - self.started)})")

    def begin(self, name: str) -> Stage:
        """End the current stage, print ``[i/n] name`` and start its clock (the current one: just return it)."""
        if self.current is not None and self.current_name == name:
            return self.current
        self.end()
        self.current = Stage(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}")
        self.current_name = name
        print(self.current.label, flush=True)
        return self.current

    def end(self, tail: str = "") -> None:
        if self.current is not None:
            print(f"{self.current.label} done in {duration(self.current.elapsed())}{tail}", flush=True)
            self.current = None


def begin_stage(name: str) -> Stage:
    """Begin ``name`` in the active run's counter; outside a run (or a stage the run did not list), a bare clock."""
    for stages in reversed(_active):
        if name in stages:
            return stages.begin(name)
    return Stage(name)


# ----------------------------------------------------------------------------------------------
# bars


class Bar:
    """A counter with tqdm's calls (``update``, ``set_postfix``, ``write``, ``close``) for both kinds of output."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 every_percent: float = LOG_EVERY_PERCENT, min_interval_s: float | None = None):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
        self.every = every_percent
        self.min_interval = log_interval() if min_interval_s is None else min_interval_s
        self.postfix = ""
        self.started = self.last_line = time.monotonic()
        self.initial = initial
        self.next_mark = self._mark_after(initial)
        self.tqdm = None
        if interactive() and not disable:
            self.tqdm = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                             file=sys.stderr)

    def _mark_after(self, n: float) -> float:
        if not self.total:
            return float("inf")
        step = self.total * self.every / 100
        return (int(n / step) + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.tqdm is not None:
            self.tqdm.update(n)
            return
        if self.disable or self.n < self.next_mark:
            return
        self.next_mark = self._mark_after(self.n)
        now = time.monotonic()
        if now - self.last_line >= self.min_interval and self.n < (self.total or 0):
            self.last_line = now
            print(self.line(now), flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        spent, done = now - self.started, self.n - self.initial
        rate = done / spent if spent > 0 else 0.0
        text = f"{self.desc}: {100 * self.n / self.total:.0f}% ({self.n}/{self.total} {self.unit}"
        text += f", {rate:.1f} {self.unit}/s" if done else ""
        text += f"), {duration(spent)} elapsed"
        if rate > 0 and self.total:
            text += f", ETA {duration((self.total - self.n) / rate)}"
        return text + (f" {self.postfix}" if self.postfix else "")

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(text, refresh=False)

    def write(self, message: str, file: Any = None) -> None:
        """A line that does not break the bar (tqdm.write on a terminal)."""
        if self.tqdm is not None:
            self.tqdm.write(message, file=file or sys.stdout)
        else:
            print(message, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it", initial: int = 0,
          disable: bool = False) -> Iterator[T]:
    """``items`` counted one by one on a ``Bar``."""
    with Bar(total, desc, unit, initial, disable) as counter:
        for item in items:
            yield item
            counter.update(1)
