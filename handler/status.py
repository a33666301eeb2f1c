"""The KServe runtime's status files: one per serving process, ``<workdir>/serving/<model>.<pid>.json``, written by
``handler.kserve_runtime`` and read by ``jobs serve --switch-to`` (``jobs.switch``). Here so that both use one
definition and the reader needs no kserve."""

from __future__ import annotations

from pathlib import Path

STATUS_DIR = "serving"


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``, field 22). With the pid it
    names one process: a status file left by a process that died names another that later got its pid, and this
    tells them apart. None where /proc has no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the name start at field 3
