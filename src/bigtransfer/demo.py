"""`bit demo`: the whole BiT story offline, in minutes, on two CPU cores.

Upstream: the embedded `BiT-R14x0.25-glyphs`, pre-trained by this package's own `bit pretrain` on
generated glyphs (weights/BiT-R14x0.25-glyphs.json records the exact command). Downstream:
scikit-learn's real handwritten digits (1,000 training / 797 held-out test images), fine-tuned with
the BiT-HyperRule scaled to this setting, at 1, 5 and 10 examples per class and on all training
images -- and the same from random initialisation with the same budget.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import hyperrule
from .data import open_dataset
from .models.registry import DEMO_MODEL, get_model_spec
from .protocols import few_shot_sweep, results_table, shots_label, summarize, write_results

# The HyperRule for digits (1,000 images of 8x8 px): resize 160 -> crop 128, 500 steps of 512, lr 0.003,
# warmup 100, x0.1 after 200/300/400, no MixUp, no flip. Scaled for two CPU cores:
SCALED = {"resolution": (40, 32), "steps": 200, "batch_size": 32}
SCALED_WHY = [
    "resolution 160/128 -> 40/32: the embedded model was pre-trained at 32 px, and 16x fewer pixels suit 2 cores",
    "steps 500 -> 200 and batch 512 -> 32: 40x less compute per run, so 20 runs fit in minutes; warmup and "
    "decays keep their places (40, then x0.1 after 80/120/160)",
    "learning rate 0.003 -> 0.01 for the pre-trained model (best of 0.003/0.01/0.03 measured for this tiny net "
    "and small batch); random init gets its own best, 0.03, so that scratch is a fair baseline",
    "unchanged: SGD momentum 0.9, no weight decay, zero-initialised head, no MixUp (< 20k examples), no flip "
    "(digits)",
]
PRETRAINED_LR = 0.01
SCRATCH_LR = 0.03
SCRATCH_MODEL = "BiT-R14x0.25"


def demo(out: str | os.PathLike = "bit-demo", seeds: int = 3, shots: tuple[int, ...] = (1, 5, 10),
         all_data: bool = True, full_budget: bool = False, device: str | None = None, steps: int | None = None,
         progress: bool = True) -> list[dict]:
    """Run the demo; returns the result rows (also in OUT/summary.json, report.md, accuracy.png).
    `full_budget`: the rule's 500 steps of 512 instead of the scaled budget; `steps`: another budget."""
    console = Console(stderr=True)
    started = time.monotonic()
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    budget = dict(SCALED, steps=steps or SCALED["steps"])
    if full_budget:
        budget.update(steps=500, batch_size=hyperrule.BATCH_SIZE)
    ks: list[int | None] = list(shots) + ([None] if all_data else [])
    seed_list = list(range(seeds))
    total = 2 * (len(shots) * seeds + (1 if all_data else 0))
    console.print(f"[bold]bit demo[/bold]: {get_model_spec(DEMO_MODEL).description}; fine-tuning on the "
                  f"real handwritten digits ({len(train)} train / {len(test)} test), {total} runs.")
    for why in SCALED_WHY:
        console.print(f"  HyperRule scaled: {why}")
    rows: list[dict] = []
    logger = logging.getLogger("bigtransfer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # twenty runs' "loaded weights" lines would hide the progress bar
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("fine-tuning", total=total)

            def done(row: dict) -> None:
                bar.update(task, advance=1, description=f"{row['init']} {shots_label(row['examples_per_class'])} "
                                                        f"seed {row['seed']}: {100 * row['accuracy']:.1f}%")

            rows += few_shot_sweep(DEMO_MODEL, train, test, Path(out) / "runs", pretrained=True,
                                   shots=ks, seeds=seed_list, device=device, on_run=done, base_lr=PRETRAINED_LR,
                                   **budget)
            rows += few_shot_sweep(SCRATCH_MODEL, train, test, Path(out) / "runs", shots=ks,
                                   seeds=seed_list, device=device, on_run=done, base_lr=SCRATCH_LR, **budget)
    finally:
        logger.setLevel(level)
    title = "BiT transfer on 2 CPU cores: digits, glyph-pretrained vs. random init"
    elapsed = time.monotonic() - started
    notes = [f"upstream: {DEMO_MODEL} (bigtransfer/weights/{DEMO_MODEL}.json: command, seed, data version)",
             f"downstream: scikit-learn digits, {len(train)} training images (k per class drawn with the seed), "
             f"{len(test)} held-out test images", *(f"HyperRule scaled: {w}" for w in SCALED_WHY),
             f"{len(rows)} fine-tuning runs in {elapsed:.0f} s"]
    write_results(rows, out, title, notes)
    wide = Console(width=max(Console().width, 110))
    wide.print(results_table(rows, title))
    gains = _gains(rows)
    wide.print(", ".join(f"{k}: {g:+.1f} points" for k, g in gains.items()) + f"   ({elapsed:.0f} s; {out}/)")
    return rows


def _gains(rows: list[dict]) -> dict[str, float]:
    """Median pre-trained minus median scratch accuracy, in points, per k."""
    med = {(s["init"], s["examples_per_class"]): s["median"] for s in summarize(rows)}
    return {shots_label(k): 100 * (med[("pretrained", k)] - med[("scratch", k)])
            for (init, k) in med if init == "pretrained" and ("scratch", k) in med}
