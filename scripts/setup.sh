#!/usr/bin/env bash
# Set up a machine to run the job and its tests: system packages (as root, Debian/Ubuntu),
# then a virtual environment in .venv with the project installed.
#   bash scripts/setup.sh          # everything (Java for TorchServe, Chromium for the report test)
#   SKIP_APT=1 bash scripts/setup.sh   # only the Python side
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  command -v python3 >/dev/null || need+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v curl >/dev/null || need+=(curl)
  command -v ss >/dev/null || need+=(iproute2)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: on a machine with local wheels pip takes them; elsewhere PyPI's CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[serve,test]"
echo "setup: done ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
