"""Evaluation: top-1, top-5, per-class accuracy and the confusion matrix, exact under DDP
(each process counts its share, the counts are summed)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import HyperRuleTransform, LabelledImages, eval_loader, to_model_input
from .runtime import Runtime, all_reduce_sum, autocast

log = logging.getLogger("bigtransfer")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in, however the block ends (an interrupt
    in a notebook included)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_outputs(fn: Callable[[torch.Tensor], torch.Tensor], source: LabelledImages, width: int, resolution: int,
                  batch_size: int, device: torch.device, workers: int = 0, precision: str = "fp32",
                  progress: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
    """(fn's float output row of every item, in order; {index: why} for items that do not decode), images resized
    straight to `resolution`. An unreadable image gets a row of NaN and a report rather than stopping a run over
    thousands of files. The caller puts the model in eval mode (`evaluating`)."""
    from rich.console import Console
    from rich.progress import Progress

    loader = eval_loader(source, HyperRuleTransform(resolution, resolution, train=False), batch_size, workers,
                         pin_memory=device.type == "cuda")
    rows = torch.empty(len(source), width)  # filled in place: a list of batches to concatenate took twice this
    errors: dict[int, str] = {}
    done = 0
    with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("images", total=len(source))
        for x, _, reports in loader:
            good = torch.tensor([not r for r in reports])
            out = rows[done:done + len(reports)].fill_(math.nan)
            if good.any():
                with torch.inference_mode(), autocast(device, precision):
                    out[good] = fn(to_model_input(x[good].to(device, non_blocking=True))).float().cpu()
            errors.update({done + i: r for i, r in enumerate(reports) if r})
            done += len(reports)
            bar.advance(task, len(reports))
    return rows, errors


PER_CLASS_LIMIT = 1000  # classes up to which `evaluate` reports per-class accuracy and the confusion matrix


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, runtime: Runtime,
             precision: str = "fp32", channels_last: bool = False, per_class: bool | None = None) -> dict:
    """Classification metrics of `model` over `loader` (batches of uint8 images, labels, bad-image reports).
    `per_class=False` skips the per-class accuracy and the K x K confusion matrix; None: only up to
    `PER_CLASS_LIMIT` classes (ImageNet-21k's would be 3.8 GB, and its eval.json about 4 GB of text)."""
    per_class = num_classes <= PER_CLASS_LIMIT if per_class is None else per_class
    size = num_classes if per_class else 2
    confusion = torch.zeros(size, size, dtype=torch.int64, device=runtime.device)
    top5 = torch.zeros((), dtype=torch.int64, device=runtime.device)
    bad = []
    with evaluating(model):
        for images, labels, reports in loader:
            if any(reports):  # (indexing copies out of the loader's pinned memory: only where needed)
                keep = torch.tensor([not r for r in reports])
                bad += [r for r in reports if r]
                images, labels = images[keep], labels[keep]
            images = to_model_input(images.to(runtime.device, non_blocking=True))
            labels = labels.to(runtime.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(runtime.device, precision):
                logits = model(images).float()
            k = min(5, num_classes)
            top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
            predictions = logits.argmax(dim=1)
            if not per_class:  # [[wrong, right]] in the first row is all top-1 needs
                labels, predictions = torch.zeros_like(labels), (predictions == labels).long()
            confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
        all_reduce_sum(confusion, runtime)
        all_reduce_sum(top5, runtime)
    for report in bad:
        log.warning("bad image skipped in evaluation: %s", report)
    if not per_class:
        total = int(confusion.sum())
        return {"examples": total, "top1": int(confusion[0, 1]) / total if total else 0.0,
                "top5": int(top5) / total if total else 0.0, "bad_images": len(bad)}
    return metrics_from_confusion(confusion.cpu(), int(top5), bad_images=len(bad))


def metrics_from_confusion(confusion: torch.Tensor, top5_correct: int, bad_images: int = 0) -> dict:
    """Rows are true classes, columns predictions. Per-class accuracy is None for an absent class."""
    total = int(confusion.sum())
    per_class_total = confusion.sum(dim=1)
    diag = confusion.diagonal()
    return {
        "examples": total,
        "top1": float(diag.sum()) / total if total else 0.0,
        "top5": top5_correct / total if total else 0.0,
        "per_class_accuracy": [float(d) / float(n) if n else None for d, n in zip(diag, per_class_total, strict=True)],
        "confusion_matrix": confusion.tolist(),
        "bad_images": bad_images,
    }
