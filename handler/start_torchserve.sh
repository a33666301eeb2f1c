#!/bin/sh
# The serve image's entry point (Dockerfile.serve): TorchServe on every .mar in /model-store, with
# workers, threads and batching chosen for the machine (or pod) it starts on, not the build host's.
# SERVE_RUNTIME=kserve starts KServe's model server on the same archives instead (handler/kserve_runtime.py,
# port 8080, key_file.json in the working directory or the one KEY_FILE names; docs/serving-runtimes.md).
#
# `jobs serve-config` writes $TS_CONFIG_FILE plus TorchServe's per-model `models` setting (for the
# archives that leave batching open; handler.scheduler.serving_plan from the usable CPUs and GPUs) and the
# handler's metrics (handler/metrics.yaml) into $TEMP, which is writable even on a read-only root
# filesystem. A `models` or `metrics_config` line in $TS_CONFIG_FILE itself wins. TorchServe reads
# TS_CONFIG_FILE before --ts-config, so the variable is pointed at the result.
# Extra arguments are appended to the torchserve command line. MODEL_STORE: another archive folder.
# JOBS_CAPTURE_DIR (and JOBS_CAPTURE_BELOW/_SAMPLE/_MAX_MB/_MAX_FILES) reach the model's workers in either runtime
# as they are: capture of what the server meets, off while unset (handler/capture.py).
set -e
store="${MODEL_STORE:-/model-store}"
case "${TS_DISABLE_TOKEN_AUTHORIZATION:-false}" in true|1) no_token=1;; *) no_token="";; esac
if [ "${SERVE_RUNTIME:-torchserve}" = kserve ]; then
    set -- python -m handler.kserve_runtime --model-store "$store" --host 0.0.0.0 --port 8080 --workdir "$PWD" "$@"
    if [ -n "${KEY_FILE:-}" ] && [ -f "$KEY_FILE" ]; then set -- "$@" --key-file "$KEY_FILE"; fi
    if [ -n "$no_token" ]; then set -- "$@" --disable-token-auth; fi
    exec "$@"
elif [ "${SERVE_RUNTIME:-torchserve}" != torchserve ]; then
    echo "SERVE_RUNTIME must be torchserve or kserve, not '$SERVE_RUNTIME'" >&2
    exit 2
fi
machine_config="${TEMP:-/tmp}/config.properties"
python -m jobs serve-config --model-store "$store" --base "$TS_CONFIG_FILE" --dest "$machine_config"
export TS_CONFIG_FILE="$machine_config"
set -- torchserve --foreground --ncs --model-store "$store" --models all "$@"
if [ -n "$no_token" ]; then set -- "$@" --disable-token-auth; fi
exec "$@"
