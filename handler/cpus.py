"""How many CPUs this process may really use: the one answer for serving plans, DataLoader workers and
collect's verification threads.

``os.sched_getaffinity`` alone is wrong in a container: ``docker run --cpus 1.5`` or a Kubernetes CPU
limit leaves every host core in the affinity mask and caps the time with a cgroup quota instead, so a
64-core node would get 16 serving workers that then fight over 2 CPUs' worth of time (and 16 model
copies in a pod limited to 4 GiB). A pod with only a CPU *request* has no quota at all; it says what
it was given through ``JOBS_CPUS`` (deploy/k8s/serve.yaml sets it from ``requests.cpu``).

Standard library only, like the rest of the serving package it belongs to.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV = "JOBS_CPUS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class CpusSettingError(ValueError):
    """``JOBS_CPUS`` is set to something that is not a CPU count (the CLI prints it as one line)."""


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """``JOBS_CPUS`` when set (a positive number, rounded up); else the affinity mask's size, capped by
    the cgroup's CPU quota rounded up (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``)."""
    given = os.environ.get(ENV, "").strip()
    if given:
        try:
            value = float(given)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise CpusSettingError(f"{ENV}={given!r} is not a positive number of CPUs; unset it or set e.g. {ENV}=2")
        return math.ceil(value)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(affinity, math.ceil(quota))) if quota else affinity


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup allows (1.5 for ``--cpus 1.5``), or None when unlimited or unknown."""
    for quota_file, period_file in ((root / "cpu.max", None),
                                    (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
        except (OSError, ValueError, IndexError):
            continue
    return None
