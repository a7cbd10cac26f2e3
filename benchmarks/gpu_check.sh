#!/usr/bin/env bash
# Every GPU check in one call (device tool): facts, model benchmarks vs timm/HF, end-to-end fine-tuning.
# Results go to $OUT (default ./gpu_out). Usage on the lent machine: bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY benchmarks/gpu_facts.py
} 2>&1 | tee "$OUT/facts.txt"

# each implementation in its own worker process (CUDA start-up: a few seconds each); NCHW on CUDA (facts.txt)
timeout 240 $PY benchmarks/bench_models.py --device cuda --batch 128 --precision bf16 --threads 16 \
  --models R50x1 R101x1 R50x3 --impls ours timm hf --repeats 5 --iters 5 2>&1 | tee "$OUT/bench_bf16.txt"

# end to end: the whole fine-tuning loop (data included) on a generated CIFAR-sized set, 128 px crops
for variant in "loader:" "device_data:--device-data" "device_data_compiled:--device-data --compile"; do
  name=${variant%%:*}; flags=${variant#*:}
  timeout 100 $PY -m bigtransfer finetune --model BiT-M-R50x1 --data fractals:10 --in-memory --eval-data none \
    --steps 30 --batch 512 --precision bf16 --batch-split auto --workers 12 --no-progress $flags \
    --out "/tmp/e2e_$name" 2>&1 | tail -5 | tee "$OUT/e2e_$name.txt"
  cat "/tmp/e2e_$name/metrics.jsonl" | tee -a "$OUT/e2e_$name.txt"
done
