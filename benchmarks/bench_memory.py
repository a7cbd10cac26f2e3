"""Peak memory of one training step, ours vs timm, each in a fresh process (CPU: peak RSS; CUDA: peak
allocated). Same model, batch, resolution and threads. `ours-recompute` is ours with the CPU norms' outputs
recomputed in the backward instead of kept (`BIGTRANSFER_RECOMPUTE_NORM=1`).

    python benchmarks/bench_memory.py [--device cuda] [--batch 16] [--res 128] [--impls ours ours-recompute timm]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {src!r})
torch.set_num_threads(2)
impl, device, batch, res = {impl!r}, torch.device({device!r}), {batch}, {res}
if impl.startswith("ours"):
    import bigtransfer as bt
    model = bt.create_model("BiT-M-R50x1", num_classes=1000)
else:
    import timm
    model = timm.create_model("resnetv2_50x1_bit", num_classes=1000)
model = model.to(device).train()
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
x, y = torch.randn(batch, 3, res, res, device=device), torch.randint(0, 1000, (batch,), device=device)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
if device.type == "cuda":
    print(torch.cuda.max_memory_allocated() / 2**20)
else:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=["ours", "timm"], choices=("ours", "ours-recompute", "timm"))
    args = p.parse_args()
    src = str(Path(__file__).resolve().parents[1] / "src")
    peak = {}
    for impl in dict.fromkeys([*args.impls, "timm"]):  # timm last, the reference
        code = CHILD.format(src=src, impl=impl, device=args.device, batch=args.batch, res=args.res)
        env = {**os.environ, "BIGTRANSFER_RECOMPUTE_NORM": "1" if impl == "ours-recompute" else "0"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        peak[impl] = float(out.stdout.strip().splitlines()[-1])
    what = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"R50x1 training step, batch {args.batch}, {args.res} px, {args.device}: {what} (MiB)")
    for impl, mib in peak.items():
        print(f"  {impl:14} {mib:8.0f}  ({mib / peak['timm']:.2f}x timm)")


if __name__ == "__main__":
    main()
