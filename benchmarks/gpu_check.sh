#!/usr/bin/env bash
# The GPU checks (device tool); results go to $OUT (default ./gpu_out), one file per section (the device
# tool brings back at most 8). Next, in one call (~7 min; measured runs: benchmarks/RESULTS.md):
#   bash benchmarks/gpu_check.sh fused pool levers   # the prepared levers per kernel, then in the whole loop
# then, with the faster defaults: bash benchmarks/gpu_check.sh profile bench bench512tuned shortened   (~5 min).
# A device session has 15 minutes, and a machine left idle goes back within a minute: the second call starts
# a fresh one (1-2 min). `levers` ends with a table whose `all_three` row is the whole loop with every
# prepared lever on, i.e. what the defaults become if each lever wins on its own row: the first call alone
# measures what would ship.
# facts     what GroupNorm does on this torch + GPU (layout, autocast dtype)
# fused     the fused GroupNorm+ReLU kernels (with and without the residual add): correctness against torch,
#           GPU time per R50x1 layer at batch 512
# pool      the stem max-pool's kernels against torch's: correctness, GPU time, batch 512
# levers    the whole loop at batch 512 with the prepared levers (norm blocks kept in registers, the pool's
#           kernels, the residual adds in the norms) off, each on (blocks of 16K and 8K), and all three; and
#           without the Weight Standardization kernels (on by default)
# rows      the whole loop at batch 512, the channels_last norm taking $ROWS (32 64 128 512) bytes of each row
# profile   kernel time per category of a training step, batch 512, NCHW and channels_last
# bench     R50x1 against timm/HF, bf16, batch 128, each as a user's own loop runs it
# bench512  R50x1 against timm, training at batch 512 (the HyperRule's batch)
# bench512tuned  the same with cuDNN autotuning for both
# sizes     R101x1 and R50x3 against timm, batch 128
# e2e       the whole fine-tuning loop (data included), with and without CUDA graphs, batch 512 and 128
# e2e512    the whole fine-tuning loop at batch 512 with CUDA graphs: NCHW or channels_last, cuDNN autotuned or not
# shortened batches shortened by bad images (in-memory, on the device), with and without CUDA graphs: same weights
# compiled  R50x1 and timm both under torch.compile
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
BENCH="$PY benchmarks/bench_models.py --device cuda --precision bf16 --threads 16 --repeats 5 --iters 10"
sections=${*:-fused pool levers}  # the next call's; at most 8 sections a call (one file each comes back)

facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import triton; print('triton', triton.__version__)"
  timeout 60 $PY benchmarks/gpu_facts.py
}

fused() { timeout 240 $PY benchmarks/gpu_fused_norm.py; }

bench() {  # each implementation in its own worker, as a user's own loop runs it (NCHW, as given)
  timeout 150 $BENCH --batch 128 --models R50x1 --impls ours timm hf
}

bench512() { timeout 120 $BENCH --batch 512 --models R50x1 --impls ours timm --modes train; }

bench512tuned() {  # both with cuDNN autotuning, as `bit finetune` and timm's train.py run them
  timeout 120 $BENCH --batch 512 --models R50x1 --impls ours timm --modes train --cudnn-benchmark
}

sizes() { timeout 200 $BENCH --batch 128 --models R101x1 R50x3 --impls ours timm; }

finetune() {  # NAME BATCH GRAPHS [FLAGS...]: `bit finetune` on a generated CIFAR-sized set, 128 px crops,
  # on-device batches, 60 steps; prints the metrics and the img/s between steps 20 and 60 (data included)
  local name=$1 batch=$2 graphs=$3
  shift 3
  rm -rf "/tmp/e2e_$name"  # a run folder left by an earlier call would return its old results, not train
  echo "== $name: batch $batch, BIGTRANSFER_CUDA_GRAPHS=$graphs $*"
  BIGTRANSFER_CUDA_GRAPHS=$graphs timeout 150 $PY -m bigtransfer finetune --model BiT-M-R50x1 \
    --data fractals:10 --in-memory --device-data --eval-data none --steps 60 --batch "$batch" \
    --precision bf16 --batch-split auto --no-progress --out "/tmp/e2e_$name" "$@" 2>&1 | grep -v fontManager | tail -4
  cat "/tmp/e2e_$name/metrics.jsonl"
  $PY - "/tmp/e2e_$name/metrics.jsonl" "$batch" <<'EOF'
import json, sys
rows = {r["step"]: r for r in map(json.loads, open(sys.argv[1])) if "elapsed_s" in r}
rate = 40 * int(sys.argv[2]) / (rows[60]["elapsed_s"] - rows[20]["elapsed_s"])
print(f"img/s, steps 20-60: {rate:,.0f}; the HyperRule CIFAR-10 schedule (5.12M images) at it: {5.12e6 / rate / 60:.1f} min")
EOF
}

e2e() {  # same seed: same losses expected with and without graphs
  for batch in 512 128; do
    for graphs in 0 1; do
      finetune "b${batch}_graphs${graphs}" "$batch" "$graphs" --channels-last  # one layout for both
    done
    same_weights "b${batch}_graphs0" "b${batch}_graphs1"
  done
}

same_weights() {  # RUN RUN: relative L2 distance of two finetune runs' final weights
  $PY - "$1" "$2" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"/tmp/e2e_{name}/model.safetensors") for name in sys.argv[1:])
num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
den = sum(float(a[k].double().norm() ** 2) for k in a)
print(f"final weights, {sys.argv[2]} vs {sys.argv[1]}: relative L2 distance {(num / den) ** 0.5:.2e}")
EOF
}

shortened() {  # batches shortened by bad images: padded to the captured batch under CUDA graphs (engine._padded)
  rm -rf /tmp/bad_folder
  $PY - <<'EOF'
import sys
sys.path.insert(0, "tests")
from images import make_image_folder
root = make_image_folder("/tmp/bad_folder", classes=4, per_class=64, size=160)
for c in range(2):
    (root / f"class{c}" / "broken.png").write_bytes(b"not an image")
EOF
  for graphs in 0 1; do
    rm -rf "/tmp/e2e_bad$graphs"
    BIGTRANSFER_CUDA_GRAPHS=$graphs timeout 120 $PY -m bigtransfer finetune --model BiT-M-R50x1 --data /tmp/bad_folder \
      --in-memory --device-data --eval-data none --steps 30 --batch 64 --precision bf16 --channels-last --no-progress \
      --out "/tmp/e2e_bad$graphs" 2>&1 | grep -E "CUDA graphs|bad|done|Error" | tail -6
  done
  same_weights bad0 bad1
}

e2e512() {  # cuDNN autotuning (BIGTRANSFER_CUDNN_AUTOTUNE) and the layout, each on and off
  finetune b512_graphs1_nchw 512 1 --no-channels-last  # its own name: e2e's b512_graphs1 is channels_last
  BIGTRANSFER_CUDNN_AUTOTUNE=0 finetune b512_graphs1_nchw_heuristics 512 1 --no-channels-last
  finetune b512_graphs1_cl 512 1 --channels-last
  BIGTRANSFER_CUDNN_AUTOTUNE=0 finetune b512_graphs1_cl_heuristics 512 1 --channels-last
}

rows() {  # channels_last norm: how many bytes of each position's row one program takes (fused_norm.ROW_BYTES)
  for r in ${ROWS:-32 64 128 512}; do BIGTRANSFER_NORM_ROW_BYTES=$r finetune "b512_rows$r" 512 1; done
}

pool() { timeout 90 $PY benchmarks/gpu_fused_pool.py; }

levers() {  # the prepared, unmeasured levers alone and together; the first run is today's default
  finetune b512_default 512 1
  BIGTRANSFER_NORM_TILE_ELEMENTS=16384 finetune b512_whole_blocks 512 1   # norm blocks kept in registers
  BIGTRANSFER_NORM_TILE_ELEMENTS=8192 finetune b512_whole_8k 512 1        # the same, two programs per SM
  BIGTRANSFER_FUSED_POOL=1 finetune b512_fused_pool 512 1                 # the stem max-pool's kernels
  BIGTRANSFER_FUSED_RESIDUAL=1 finetune b512_fused_residual 512 1         # residual adds in the next norm
  BIGTRANSFER_NORM_TILE_ELEMENTS=16384 BIGTRANSFER_FUSED_POOL=1 BIGTRANSFER_FUSED_RESIDUAL=1 \
    finetune b512_all_three 512 1
  BIGTRANSFER_FUSED_WS=0 finetune b512_no_fused_ws 512 1                   # batch_norm + autocast's casts
  compare b512_default b512_whole_blocks b512_whole_8k b512_fused_pool b512_fused_residual b512_all_three \
    b512_no_fused_ws
}

compare() {  # RUN...: img/s (steps 20-60) of finetune runs at batch 512, and their losses against the first's
  $PY - "$@" <<'EOF'
import json, sys
def rate_and_losses(name):
    rows = {r["step"]: r for r in map(json.loads, open(f"/tmp/e2e_{name}/metrics.jsonl")) if "elapsed_s" in r}
    return 40 * 512 / (rows[60]["elapsed_s"] - rows[20]["elapsed_s"]), {s: r["loss"] for s, r in rows.items()}
first, first_losses = rate_and_losses(sys.argv[1])
print(f"{'run':22} {'img/s':>8} {'vs first':>8} {'schedule':>9} {'max loss diff':>13}")
for name in sys.argv[1:]:
    try:
        rate, losses = rate_and_losses(name)
    except (OSError, KeyError) as e:
        print(f"{name:22} no result ({e!r})")
        continue
    diff = max(abs(losses[s] - first_losses[s]) for s in first_losses)
    print(f"{name:22} {rate:8,.0f} {rate / first:7.3f}x {5.12e6 / rate / 60:7.2f} m {diff:13.2e}")
EOF
}

profile() { timeout 150 $PY benchmarks/gpu_profile.py --batch 512 --layouts nchw channels_last; }

compiled() { timeout 200 $BENCH --batch 128 --models R50x1 --impls ours timm --channels-last --compile --modes train; }

for section in $sections; do
  echo "### $section"
  $section 2>&1 | tee "$OUT/$section.txt"
done
