#!/usr/bin/env bash
# The GPU checks (device tool); results go to $OUT (default ./gpu_out), one file per section (the device
# tool brings back at most 8). All sections take about 9 minutes on an H100: on a 10-minute limit per
# call, run them as two calls (measured 2026-11-26: about 5 and 4 minutes).
#   bash benchmarks/gpu_check.sh facts fused bench bench512
#   bash benchmarks/gpu_check.sh e2e sizes compiled
# facts     what GroupNorm does on this torch + GPU (layout, autocast dtype)
# fused     the fused GroupNorm+ReLU kernels: correctness against torch, time per R50x1 layer
# bench     R50x1 against timm/HF, bf16, batch 128 (NCHW and channels_last)
# bench512  R50x1 against timm, training at batch 512 (the HyperRule's batch)
# sizes     R101x1 and R50x3 against timm, batch 128
# e2e       the whole fine-tuning loop (data included), with and without CUDA graphs, batch 512 and 128
# compiled  R50x1 and timm both under torch.compile
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
BENCH="$PY benchmarks/bench_models.py --device cuda --precision bf16 --threads 16 --repeats 5 --iters 10"
sections=${*:-facts fused bench bench512 sizes e2e compiled}

facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import triton; print('triton', triton.__version__)"
  timeout 60 $PY benchmarks/gpu_facts.py
}

fused() { timeout 120 $PY benchmarks/gpu_fused_norm.py; }

bench() {  # each implementation in its own worker; ours-unfused = ours with BIGTRANSFER_FUSED_NORM=0
  timeout 150 $BENCH --batch 128 --models R50x1 --impls ours ours-unfused timm hf
  timeout 120 $BENCH --batch 128 --models R50x1 --impls ours timm --channels-last
}

bench512() { timeout 120 $BENCH --batch 512 --models R50x1 --impls ours timm --modes train; }

sizes() { timeout 200 $BENCH --batch 128 --models R101x1 R50x3 --impls ours timm; }

e2e() {  # a generated CIFAR-sized set, 128 px crops, on-device batches; same seed: same losses expected
  for batch in 512 128; do
    for graphs in 0 1; do
      name="b${batch}_graphs${graphs}"
      echo "== batch $batch, BIGTRANSFER_CUDA_GRAPHS=$graphs"
      BIGTRANSFER_CUDA_GRAPHS=$graphs timeout 120 $PY -m bigtransfer finetune --model BiT-M-R50x1 \
        --data fractals:10 --in-memory --device-data --eval-data none --steps 40 --batch $batch \
        --precision bf16 --batch-split auto --no-progress --out "/tmp/e2e_$name" 2>&1 | grep -v fontManager | tail -4
      cat "/tmp/e2e_$name/metrics.jsonl"
    done
    $PY - "$batch" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"/tmp/e2e_b{sys.argv[1]}_graphs{g}/model.safetensors") for g in (0, 1))
num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
den = sum(float(a[k].double().norm() ** 2) for k in a)
print(f"final weights, graphs vs eager: relative L2 distance {(num / den) ** 0.5:.2e}")
EOF
  done
}

compiled() { timeout 200 $BENCH --batch 128 --models R50x1 --impls ours timm --channels-last --compile --modes train; }

for section in $sections; do
  echo "### $section"
  $section 2>&1 | tee "$OUT/$section.txt"
done
