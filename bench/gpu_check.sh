#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no TorchServe/Java there): environment, a real training
# run of the job on the GPU (cached-feature head stage + fine-tune), then the training benchmarks
# and the cached-vs-full accuracy sweep, then the serving handler's GPU path.
#   bash bench/gpu_check.sh DATA      # DATA: a folder with train/<class>/ and val/<class>/
# Results land in $OUT (or /tmp/gpu-check).
set -uo pipefail
DATA=${1:?a folder with train/<class>/ and val/<class>/}
OUT=${OUT:-/tmp/gpu-check}
RUN=/tmp/gpu-run
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
"cuda", torch.version.cuda, torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())' | tee -a "$OUT/gpu.txt"

{
  $PY -m jobs clean --data "$DATA/train" --out $RUN &&
  $PY -m jobs split --out $RUN &&
  /usr/bin/time -v $PY -m jobs train --out $RUN --weights none --epochs 25 --finetune-epochs 5 --batch-size 64 &&
  $PY -m jobs evaluate --out $RUN
} > "$OUT/job.log" 2>&1
echo "job exit $?" | tee -a "$OUT/job.log"
cp $RUN/metrics.json "$OUT/job_metrics.json" 2>/dev/null

# Resume on the GPU: SIGTERM inside a fine-tune epoch (exit 143 after a checkpoint), then the same
# command resumes with AdamW's state on the GPU and finishes.
RESUME="$PY -m jobs train --out $RUN --weights none --epochs 25 --finetune-epochs 4 --batch-size 64 --fresh"
{
  $RESUME & pid=$!
  for _ in $(seq 600); do grep -q "train finetune: epoch 1/4: train loss" "$OUT/resume.log" 2>/dev/null && break; sleep 0.5; done
  sleep 2; kill -TERM $pid; wait $pid; echo "sigterm exit $?"
  ${RESUME% --fresh}; echo "resume exit $?"
} > "$OUT/resume.log" 2>&1
grep -E "exit|resuming" "$OUT/resume.log"
$PY -m pytest -q -p no:cacheprovider tests/test_pipeline.py -k models_device > "$OUT/resume_test.log" 2>&1
tail -1 "$OUT/resume_test.log"

timeout 240 $PY -m bench.train_finetune --device cuda --compile > "$OUT/bench_finetune.log" 2>&1
timeout 240 $PY -m bench.train_frozen --device cuda --data "$DATA" > "$OUT/bench_frozen.log" 2>&1
timeout 180 $PY -m bench.parity_sweep --device cuda --data "$DATA" --seeds 12 > "$OUT/bench_parity.log" 2>&1
# The serving handler's own path on the GPU (in-process, TorchServe's Context) against the bare forward pass.
timeout 90 $PY -m bench.handler_gpu --images "$DATA/val" --batch 32 --duration 20 > "$OUT/bench_handler_gpu.log" 2>&1
cp bench/results/*cuda*.json "$OUT/" 2>/dev/null
tail -5 "$OUT"/*.log
