#!/usr/bin/env bash
# The test command.
#   bash scripts/test.sh                 # all of it: the non-Docker suite, then the real Docker end-to-end test
#   bash scripts/test.sh --fast          # the inner loop before each commit (under 3 minutes): no whole jobs,
#                                        # servers, torchrun or Docker (the tests marked e2e, slow or docker)
#   NO_DOCKER=1 bash scripts/test.sh     # all but Docker
# Further arguments go to pytest (-k resume, -x, ...). Both ways run two pytest workers (below).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ "${1:-}" = --fast ]; then
  shift
  exec .venv/bin/python -m pytest -m "not docker and not slow and not e2e" -n "${JOBS_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
fi
# Two pytest workers (pytest-xdist), a test file each at a time: alone, the suite keeps one of two cores
# busy on average (imports, servers starting, waits on subprocesses). Module fixtures stay built once.
# --no-loadscope-reorder (pytest-xdist 3.8): files are handed out in collection order, the longest first (tests/conftest.py);
# xdist's default hands out the files with the most tests first, which left a 150 s one-test file to the end,
# run alone while the other worker sat idle.
# Past 20 minutes the suite prints one warning line naming its five slowest tests (tests/suite_time.py).
JOBS_SUITE_WARN_MINUTES=20 .venv/bin/python -m pytest -m "not docker" -n "${JOBS_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
if [ "${NO_DOCKER:-0}" != 1 ]; then
  .venv/bin/python -m pytest -m docker "$@"
fi
