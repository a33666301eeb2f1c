#!/usr/bin/env bash
# The test command: unit + real-data tests, then the real Docker end-to-end test.
#   bash scripts/test.sh            # all of it (needs root for Docker)
#   NO_DOCKER=1 bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
.venv/bin/python -m pytest -m "not docker" "$@"
if [ "${NO_DOCKER:-0}" != 1 ]; then
  .venv/bin/python -m pytest -m docker "$@"
fi
