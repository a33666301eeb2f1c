"""A pytest plugin that keeps the suite's time in sight (conftest.py loads it).

With ``JOBS_SUITE_WARN_MINUTES`` set (scripts/test.sh sets 20 for the non-Docker suite), a session that
ran longer prints one warning line naming its five slowest tests. It never changes the exit status:
on a shared machine time alone is noise, and the line is there to be read, not to fail a run.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest

WARN_MINUTES = "JOBS_SUITE_WARN_MINUTES"
_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = time.monotonic()


def slowest(reports: list, n: int = 5) -> list[tuple[str, float]]:
    """The ``n`` tests that took longest, setup and teardown included, slowest first."""
    seconds: dict[str, float] = defaultdict(float)
    for report in reports:
        seconds[report.nodeid] += getattr(report, "duration", 0.0)
    return sorted(seconds.items(), key=lambda item: -item[1])[:n]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    limit = os.environ.get(WARN_MINUTES)
    if not limit or _STARTED not in config.stash:
        return
    elapsed = time.monotonic() - config.stash[_STARTED]
    if elapsed < float(limit) * 60:
        return
    reports = [r for key in ("passed", "failed", "error", "skipped") for r in terminalreporter.stats.get(key, [])
               if hasattr(r, "nodeid")]
    named = ", ".join(f"{nodeid} ({seconds:.0f} s)" for nodeid, seconds in slowest(reports))
    terminalreporter.write_line(f"warning: the suite took {elapsed / 60:.1f} min, over {float(limit):g}; "
                                f"the five slowest tests: {named}", yellow=True, bold=True)
