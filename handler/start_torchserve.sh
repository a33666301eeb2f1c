#!/bin/sh
# The serve image's entry point (Dockerfile.serve): TorchServe on every .mar in /model-store, with
# workers, threads and batching chosen for the machine (or pod) it starts on, not the build host's.
#
# `jobs serve-config` writes $TS_CONFIG_FILE plus TorchServe's per-model `models` setting (for the
# archives that leave batching open; handler.scheduler.serving_plan from the usable CPUs and GPUs) and the
# handler's metrics (handler/metrics.yaml) into $TEMP, which is writable even on a read-only root
# filesystem. A `models` or `metrics_config` line in $TS_CONFIG_FILE itself wins. TorchServe reads
# TS_CONFIG_FILE before --ts-config, so the variable is pointed at the result.
# Extra arguments are appended to the torchserve command line. MODEL_STORE: another archive folder.
set -e
store="${MODEL_STORE:-/model-store}"
machine_config="${TEMP:-/tmp}/config.properties"
python -m jobs serve-config --model-store "$store" --base "$TS_CONFIG_FILE" --dest "$machine_config"
export TS_CONFIG_FILE="$machine_config"
set -- torchserve --foreground --ncs --model-store "$store" --models all "$@"
case "${TS_DISABLE_TOKEN_AUTHORIZATION:-false}" in true|1) set -- "$@" --disable-token-auth;; esac
exec "$@"
