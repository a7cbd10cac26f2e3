"""End-to-end HyperRule fine-tuning throughput (data pipeline included) on a generated CIFAR-sized set
(1,000 images of 32x32 -> the rule's 160/128 px), for each data path, next to the model-only step rate,
so that data-pipeline stalls show as a fraction below 100%.

    python benchmarks/bench_finetune.py                                  # CPU, R50x1, batch 16
    python benchmarks/bench_finetune.py --device cuda --batch 512 --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bigtransfer as bt


def model_only(name: str, batch: int, res: int, device: str, precision: str, steps: int) -> float:
    model = bt.create_model(name, num_classes=10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for i in range(steps + 2):
        if i == 2:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def loop_rate(run: Path, batch: int) -> float:
    """img/s between the first and the last logged step (start-up and compilation excluded)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = lines[0], lines[-1]
    return batch * (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="BiT-M-R50x1")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    logging.disable(logging.INFO)
    log_every = max(1, args.steps // 4)
    variants = {"DataLoader, decode every epoch": {"workers": args.workers},
                "in memory + DataLoader": {"workers": args.workers, "in_memory": True},
                "on-device batches": {"device_data": True}}
    base = model_only(args.model, args.batch, 128, args.device, args.precision, max(3, args.steps // 2))
    print(f"{args.model}, batch {args.batch}, 128 px crops, {args.device}, {args.precision}"
          f"{', compiled' if args.compile else ''}: model-only step {base:.1f} img/s")
    tmp = Path(tempfile.mkdtemp())
    try:
        for name, options in variants.items():
            run = tmp / name.replace(" ", "_")
            bt.finetune(args.model, "fractals:10", out=run, steps=args.steps, batch_size=args.batch,
                        precision=args.precision, compile=args.compile or None, device=args.device,
                        log_every=log_every, progress=False, **options)
            rate = loop_rate(run, args.batch)
            print(f"  {name:32} {rate:9.1f} img/s  {rate / base:6.0%} of the model-only rate; "
                  f"full CIFAR-10 HyperRule (10,000 x 512) would take {10_000 * 512 / rate / 60:.1f} min")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
