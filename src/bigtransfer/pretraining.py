"""`pretrain`: BiT upstream training (the paper's recipe) on the same engine as fine-tuning.

Recipe (all overridable): SGD momentum 0.9, lr 0.03 x global_batch / 256, linear warmup (the
paper's 5,000 steps, never past the first decay), weight decay 1e-4 on every convolution kernel
and the head's weight matrix (not on GroupNorm scales/offsets or the head bias), x0.1 at epochs
30/60/80 of 90 (`bit`; `bit-l`: 40 epochs, decays after 10/23/30/37), global batch 4096.
Inception-style crop to 224 + flip, no MixUp. Softmax cross-entropy for single-label data, sigmoid
cross-entropy (summed over classes) with the head bias at -10 for multi-label data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from .data import (
    HyperRuleTransform,
    InceptionCropTransform,
    LabelledImages,
    StepSampler,
    eval_loader,
    match_classes,
    to_model_input,
    train_loader,
)
from .data.loader import process_share
from .data.memory import InMemoryImages
from .data.shards import MANIFEST, ShardStream, read_manifest, shard_fingerprint
from .engine import EngineConfig, momentum_sgd, softmax_cross_entropy, train
from .evaluate import evaluate, evaluating
from .finetuning import as_source, open_sources, same_data
from .hyperrule import MOMENTUM, Schedule
from .models import ResNetV2, create_model
from .probe import linear_probe
from .runs import RunDir, as_recorded, held_out_data, labels_fingerprint, starting_weights
from .runtime import PRECISIONS, Runtime, all_reduce_sum, autocast, setup

log = logging.getLogger("bigtransfer")

RECIPES = {"bit": {"epochs": 90, "decay_epochs": (30, 60, 80)},
           "bit-l": {"epochs": 40, "decay_epochs": (10, 23, 30, 37)}}
FULL_SCALE_WARMUP = 5000
HEAD_BIAS_SIGMOID = -10.0


@dataclass
class PretrainPlan:
    model: str
    data: str
    n_examples: int
    num_classes: int
    multi_label: bool
    recipe: str = "bit"
    epochs: float = 90
    decay_epochs: tuple[float, ...] = (30, 60, 80)
    batch_size: int = 4096
    base_lr: float = 0.0  # 0: 0.03 x batch / 256
    warmup_steps: int = -1  # -1: min(5000, first decay step)
    weight_decay: float = 1e-4
    crop: int = 224
    min_crop_area: float = 0.08  # Inception crop: fraction of the image area, at least
    flip: bool = True
    batch_split: int | str = 1
    precision: str = "fp32"
    channels_last: bool | None = None  # None: the engine's choice (channels_last where it captures CUDA graphs)
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    steps_per_epoch: int = 0
    steps: int = 0
    decay_steps: tuple[int, ...] = ()
    loss: str = "softmax"
    overridden: list[str] = field(default_factory=list)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.warmup_steps, tuple(self.decay_steps), self.steps)


# What a user sets; the rest of the plan is the data's (model, sizes, flip rule) or derived from these (steps).
PRETRAIN_OPTIONS = {f.name for f in dataclasses.fields(PretrainPlan)} - {
    "model", "data", "n_examples", "num_classes", "multi_label", "recipe", "steps_per_epoch", "steps", "decay_steps",
    "loss", "overridden"}


def make_pretrain_plan(model: str, data_name: str, n_examples: int, num_classes: int, multi_label: bool,
                       recipe: str = "bit", data_flip: bool = True, **overrides) -> PretrainPlan:
    """The paper's epoch recipe converted to steps for this dataset size and global batch; `data_flip` is the
    data's own rule (digits and text are never mirrored), which a `flip` override replaces."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    unknown = set(overrides) - PRETRAIN_OPTIONS
    if unknown:
        raise TypeError(f"unknown pre-training options: {', '.join(sorted(unknown))} (steps follow from epochs, "
                        f"decay_epochs and batch_size; the options are {', '.join(sorted(PRETRAIN_OPTIONS))})")
    given = {k: v for k, v in overrides.items() if v is not None}
    plan = PretrainPlan(model, data_name, n_examples, num_classes, multi_label, recipe, flip=data_flip,
                        **RECIPES[recipe])
    if "epochs" in given and "decay_epochs" not in given:  # a shorter/longer run keeps the recipe's shape
        f = given["epochs"] / RECIPES[recipe]["epochs"]
        given["decay_epochs"] = tuple(e * f for e in RECIPES[recipe]["decay_epochs"])
    plan = dataclasses.replace(plan, **given)
    plan.overridden = sorted(k for k in given if overrides.get(k) is not None)
    plan.steps_per_epoch = max(1, n_examples // plan.batch_size)  # whole batches only
    plan.steps = max(1, round(plan.epochs * plan.steps_per_epoch))
    plan.decay_steps = tuple(round(e * plan.steps_per_epoch) for e in plan.decay_epochs)
    if plan.base_lr == 0.0:
        plan.base_lr = 0.03 * plan.batch_size / 256
    if plan.warmup_steps < 0:
        plan.warmup_steps = min(FULL_SCALE_WARMUP, min(plan.decay_steps, default=plan.steps))
    plan.loss = "sigmoid" if multi_label else "softmax"
    late = [e for e in plan.decay_epochs if not 0 < e < plan.epochs]
    if late:
        raise ValueError(f"decay epochs {', '.join(f'{e:g}' for e in late)} do not fall inside the run's "
                         f"{plan.epochs:g} epochs")
    return plan


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example sigmoid cross-entropy, summed over classes (multi-label upstream data)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(dim=1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution kernels and the head's weight matrix; none on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def memory_plan(model: ResNetV2, micro_batch: int, crop: int, precision: str, checkpointing: bool) -> dict:
    """Bytes for weights, gradients, SGD momentum and the activations autograd keeps for one
    micro-batch, measured by running the model on the meta device (no memory, no compute)."""
    n_params = sum(p.numel() for p in model.parameters())
    act_bytes = {"total": 0}
    units = [u for stage in model.stages for u in stage]
    inputs, per_unit, current = [], [], {"unit": None}

    def pack(t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        act_bytes["total"] += size
        if current["unit"] is not None:
            per_unit[current["unit"]] += size
        return t

    def enter(i: int, args: tuple) -> None:
        current["unit"] = i
        inputs.append(args[0].numel())

    def leave(*_: object) -> None:
        current["unit"] = None

    with torch.device("meta"):
        meta = ResNetV2(model.arch, num_classes=max(1, model.num_classes))
    hooks = []
    for i, unit in enumerate([u for stage in meta.stages for u in stage]):
        per_unit.append(0)
        hooks.append(unit.register_forward_pre_hook(lambda m, a, i=i: enter(i, a)))
        hooks.append(unit.register_forward_hook(leave))
    dtype = PRECISIONS[precision] or torch.float32
    x = torch.empty(micro_batch, 3, crop, crop, device="meta", dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.device("meta"):
        meta(x)
    for h in hooks:
        h.remove()
    activations = act_bytes["total"]
    if checkpointing:  # unit inputs stay, one unit is recomputed at a time
        activations = activations - sum(per_unit) + sum(inputs) * dtype.itemsize + max(per_unit, default=0)
    return {"parameters": n_params, "weights": 4 * n_params, "gradients": 4 * n_params, "momentum": 4 * n_params,
            "activations": activations, "units": len(units), "micro_batch": micro_batch}


def plan_table(plan: PretrainPlan, memory: dict) -> Table:
    table = Table(title=f"BiT upstream pre-training: {plan.model} on {plan.data}")
    table.add_column("")
    table.add_column("value")
    gib = 2**30
    rows = [("examples, classes", f"{plan.n_examples:,}, {plan.num_classes:,}"
             + (" (multi-label)" if plan.multi_label else "")),
            ("recipe", f"{plan.recipe}: {plan.epochs:g} epochs, x0.1 at epochs "
                       f"{', '.join(f'{e:.3g}' for e in plan.decay_epochs)}"),
            ("steps", f"{plan.steps:,} ({plan.steps_per_epoch:,} per epoch), warmup {plan.warmup_steps:,}, "
                      f"decays after {list(plan.decay_steps)}"),
            ("batch (global), split", f"{plan.batch_size}, {plan.batch_split}"),
            ("learning rate", f"{plan.base_lr:g} (SGD momentum {MOMENTUM}), weight decay {plan.weight_decay:g} "
                              "on conv kernels + head weights"),
            ("input", f"Inception crop {plan.crop} ({plan.min_crop_area:g}-1 of the area)"
                      + (" + flip" if plan.flip else "")),
            ("loss", "sigmoid cross-entropy, head bias -10" if plan.loss == "sigmoid" else "softmax cross-entropy"),
            ("precision", plan.precision + (", activation checkpointing" if plan.activation_checkpointing else "")),
            ("memory: weights + grads + momentum",
             f"{(memory['weights'] + memory['gradients'] + memory['momentum']) / gib:.2f} GiB "
             f"({memory['parameters'] / 1e6:.1f}M parameters)"),
            ("memory: activations",
             f"{memory['activations'] / gib:.2f} GiB per micro-batch of {memory['micro_batch']}"),
            ("overrides", ", ".join(plan.overridden) or "none")]
    for row in rows:
        table.add_row(*row)
    return table


def _shards_dir(data: str | os.PathLike | LabelledImages) -> Path | None:
    if isinstance(data, str | os.PathLike) and (Path(data) / MANIFEST).is_file():
        return Path(data)
    return None


def pretrain(model_name: str, data: str | os.PathLike | LabelledImages, eval_data=None, *,
             out: str | os.PathLike, probe_data: str | None = None, probe_shots: int = 10,
             pretrained: bool | str | os.PathLike = False, device: str | None = None, workers: int = 0,
             eval_every: int | None = None, checkpoint_every: int | None = None, checkpoint_minutes: float = 10.0,
             log_every: int = 10, progress: bool = True, sample_log: bool = False, recipe: str = "bit",
             in_memory: bool = False, **overrides) -> dict:
    """Pre-train `model_name` upstream on `data` (a shards folder from `bit shards`, or any source
    `open_dataset` reads). Evaluates held-out top-1 (mAP for multi-label) on `eval_data` and a
    `probe_shots`-per-class linear probe on `probe_data` (e.g. "digits") every `eval_every` steps.
    `in_memory` decodes (or renders) a non-shard source once into RAM before training."""
    runtime = setup(device)
    shards = _shards_dir(data)
    if shards is not None:
        if in_memory:
            raise ValueError(f"--in-memory: {shards} holds shards, which are streamed, not decoded into RAM; "
                             "leave the flag out")
        manifest = read_manifest(shards)
        name, n = f"shards:{os.path.abspath(shards)}", manifest["total"]
        classes, multi = manifest["classes"], manifest["multi_label"]
        flip = manifest.get("flip", True)
        eval_source = None if eval_data is None else match_classes(  # labelled as the training data is
            classes, as_source(eval_data, "eval", hold_out=same_data(data, eval_data)), multi_label=multi)
    else:
        source, eval_source = open_sources(data, eval_data)  # eval_source labelled as source is
        if in_memory:
            source = InMemoryImages(source, workers=max(1, workers), progress=progress)
        name, n, classes, multi, flip = source.name, len(source), source.classes, source.multi_label, source.flip
    if n == 0:
        raise ValueError(f"{name} holds no images to train on")
    if multi and eval_source is not None:
        _check_map_fits(len(eval_source), len(classes))
    plan = make_pretrain_plan(model_name, name, n, len(classes), multi, recipe, data_flip=flip, **overrides)
    process_share(plan.batch_size, runtime.world_size)  # refused here for shards too, before anything is written
    with RunDir(out, writer=runtime.is_main) as run:  # claimed until this returns
        probe = None if probe_data is None else f"probe {probe_data}, {probe_shots} per class"
        settings = {"plan": as_recorded(dataclasses.asdict(plan)),
                    "pretrained": starting_weights(model_name, pretrained),
                    "eval_data": held_out_data(eval_source, probe)}
        if shards is not None:  # the same folder re-sharded, re-ordered or re-written: resume would skip other samples
            settings["shards"] = shard_fingerprint(manifest)
        settings["labels"] = labels_fingerprint(None if shards is not None else source, eval_source)
        done = run.previous_results(settings)
        if done is not None:
            return done
        with run.log_to_file(), torch.random.fork_rng(devices=[]):  # seeded inside; the caller's RNG left as it was
            saved = run.read_json("config.json")
            if saved is not None and shards is not None and (saved["world_size"], saved.get("workers", workers)) != (
                    runtime.world_size, workers):
                log.warning("resuming with %d processes of %d data workers, the run started with %d of %s: the shard "
                            "order of the current epoch changes, so that epoch may see some samples twice and others "
                            "not at all", runtime.world_size, workers, saved["world_size"], saved.get("workers"))
            torch.manual_seed(plan.seed)
            model = create_model(model_name, num_classes=plan.num_classes, pretrained=pretrained)
            if multi and not model.head.bias.any():  # a new head (random init, or another checkpoint's head size)
                nn.init.constant_(model.head.bias, HEAD_BIAS_SIGMOID)
            model.multi_label = multi  # as it is trained: sigmoid or softmax scores
            model.set_grad_checkpointing(plan.activation_checkpointing)
            local = plan.batch_size // runtime.world_size
            micro = local // plan.batch_split if isinstance(plan.batch_split, int) else local
            if runtime.is_main:
                memory = memory_plan(model, micro, plan.crop, plan.precision, plan.activation_checkpointing)
                Console(stderr=True).print(plan_table(plan, memory))
                run.write_json("config.json", {**settings, "memory": memory, "world_size": runtime.world_size,
                                               "workers": workers})
            optimizer = momentum_sgd(parameter_groups(model, plan.weight_decay), plan.base_lr, runtime.device)
            config = EngineConfig(schedule=plan.schedule, base_lr=plan.base_lr, global_batch=plan.batch_size,
                                  input_size=plan.crop, batch_split=plan.batch_split, precision=plan.precision,
                                  channels_last=plan.channels_last, compile=plan.compile, seed=plan.seed,
                                  eval_every=eval_every, checkpoint_every=checkpoint_every,
                                  checkpoint_minutes=checkpoint_minutes, log_every=log_every, progress=progress)
            transform = InceptionCropTransform(plan.crop, plan.flip, scale=(plan.min_crop_area, 1.0))
            batches = _batch_source(shards, None if shards else source, transform, plan, runtime, workers,
                                    run if sample_log else None)
            evaluator = _evaluator(eval_source, probe_data, probe_shots, plan, runtime, workers)
            loss = sigmoid_cross_entropy if multi else softmax_cross_entropy
            labels = {"bigtransfer.classes": json.dumps([str(c) for c in classes]),
                      "bigtransfer.resolution": str(plan.crop), "bigtransfer.multi_label": str(multi).lower()}
            results = train(model, optimizer, batches, config, runtime, run, loss_fn=loss, evaluator=evaluator,
                            weights_metadata=labels)
            results["plan"] = settings["plan"]  # as a finished run returns it
            run.write_json("summary.json", results)
            return results


def _batch_source(shards: Path | None, source: LabelledImages | None, transform, plan: PretrainPlan,
                  runtime: Runtime, workers: int, sample_log: RunDir | None):
    local = process_share(plan.batch_size, runtime.world_size)
    pin = runtime.device.type == "cuda"

    def batches(start: int):
        if shards is not None:
            stream = ShardStream(shards, transform, local, plan.seed, runtime.rank, runtime.world_size, workers,
                                 start_step=start)
            loader = DataLoader(stream, batch_size=local, num_workers=workers, pin_memory=pin)
        else:
            sampler = StepSampler(len(source), plan.batch_size, plan.seed, runtime.rank, runtime.world_size)
            loader = train_loader(source, transform, sampler, start, plan.steps, workers, pin_memory=pin,
                                  with_keys=True)
        log_path = None if sample_log is None else sample_log.path / f"samples.rank{runtime.rank}.jsonl"
        if log_path is not None:
            _rewind_sample_log(log_path, start)
        for step, (images, targets, reports, keys) in enumerate(loader, start):
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "keys": list(map(str, keys))}) + "\n")
            yield images, targets, reports

    return batches


def _rewind_sample_log(path: Path, start: int) -> None:
    """Cut the log before its first line of step `start` or later (logged again on resume), or a line cut short by a
    crash. Lines are appended in step order, so it is read a line at a time up to there and cut in place: a long
    run's log is gigabytes (6.5 KiB a step and process at 512 images per process), which parsing whole took
    minutes and many times its size in memory."""
    if not path.exists():
        return
    keep = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            if line.strip():
                step = re.match(rb'\{"step": (\d+),', line)  # as `batches` writes them; else parsed in full
                try:
                    step = int(step[1]) if step else json.loads(line)["step"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}, line {number}: not a record of this log ({e!r})") from e
                if step >= start:
                    break
            keep += len(line)
    os.truncate(path, keep)


def _evaluator(eval_source: LabelledImages | None, probe_data: str | None, probe_shots: int, plan: PretrainPlan,
               runtime: Runtime, workers: int):
    """Held-out top-1 (mAP for multi-label) and a few-shot linear probe on a downstream set."""
    probe = None if probe_data is None else (as_source(probe_data, "train"), as_source(probe_data, "test"))
    if eval_source is None and probe is None:
        return None

    def evaluator(net: nn.Module, batch_size: int) -> dict:
        metrics = {}
        if eval_source is not None:
            tf = HyperRuleTransform(plan.crop, plan.crop, train=False)
            loader = eval_loader(eval_source, tf, batch_size, workers, runtime.rank, runtime.world_size)
            if plan.multi_label:
                metrics["mAP"] = mean_average_precision(net, loader, runtime, plan.precision, plan.num_classes)
            else:
                metrics |= evaluate(net, loader, plan.num_classes, runtime, plan.precision, plan.channels_last)
        if probe is not None and runtime.is_main:
            rows = linear_probe(net, *probe, resolution=plan.crop, runtime=runtime, shots=(probe_shots,),
                                batch_size=batch_size, precision=plan.precision, workers=workers)
            metrics[f"probe_{probe_shots}shot"] = rows[0]["accuracy"]
        return metrics

    return evaluator


def _check_map_fits(images: int, classes: int) -> None:
    """Held-out mAP keeps every (image, class) score and label in memory, each process those of its share of the
    images: refused before training, not by the out-of-memory killer at the first evaluation, hours in (a fifth
    of a 14M-image manifest carved out as held-out data would need 300 GB for ImageNet-21k's classes)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such query here (not Linux): nothing to check against
        return
    here, world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("WORLD_SIZE", "1"))
    need = images * classes * 10 * here // world  # float32 scores, a byte per label; twice while batches are joined
    if need > memory:
        raise ValueError(f"held-out mAP over {images:,} images x {classes:,} classes needs {need / 2**30:,.0f} GiB of "
                         f"scores on this machine ({here} of {world} processes), more than its "
                         f"{memory / 2**30:,.0f} GiB: give smaller evaluation data (--eval-data)")


@torch.no_grad()
def mean_average_precision(net: nn.Module, loader: DataLoader, runtime: Runtime, precision: str,
                           num_classes: int) -> float:
    """Mean over classes (with at least one positive) of the average precision of the sigmoid scores. With several
    processes, each scores its share of the images (`eval_loader`'s rank, rank + world_size, ...)."""
    scores, targets = [torch.zeros(0, num_classes)], [torch.zeros(0, num_classes, dtype=torch.bool)]
    with evaluating(net):
        for images, hot, reports in loader:
            keep = torch.tensor([not r for r in reports])
            with autocast(runtime.device, precision):
                scores.append(net(to_model_input(images[keep].to(runtime.device))).float().cpu())
            targets.append(hot[keep].bool())  # a byte per (image, class): 21,843 classes make it large
    return average_precision(torch.cat(scores), torch.cat(targets), runtime)


_AP_CELLS = 2**24  # (image, class) cells that `average_precision` sorts at once: 128 MB per float64 tensor


def average_precision(scores: torch.Tensor, targets: torch.Tensor, runtime: Runtime) -> float:
    """scikit-learn's macro `average_precision_score` over the classes with a positive, ties included: per class,
    the sum over score thresholds of (recall gained) x (precision there). `scores`, `targets`: this process's
    images (rows) of every class; all processes call it together.

    Why not scikit-learn's: it loops over classes in Python on the CPU, about 250 s per evaluation for 50,000
    images of ImageNet-21k's 21,843 classes; here blocks of classes are sorted at once, on the device."""
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # sum of the classes' APs, classes counted
    for block_scores, hits in _class_blocks(scores, targets, runtime):
        n = len(block_scores)
        s, order = block_scores.sort(dim=0, descending=True, stable=True)
        hits = hits.gather(0, order).double()
        positives = hits.sum(0)
        precision = hits.cumsum(0) / torch.arange(1, n + 1, device=s.device, dtype=torch.float64)[:, None]
        # tied scores are one threshold: each hit gets the precision at the last row of its run of ties
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        rows = torch.arange(n, device=s.device)[:, None].expand_as(s)
        end = torch.where(last, rows, n).flip(0).cummin(0).values.flip(0)
        per_class = (hits * precision.gather(0, end)).sum(0) / positives
        sums += torch.stack([per_class[positives > 0].sum(), (positives > 0).sum().double()])
    total, counted = all_reduce_sum(sums, runtime).tolist()
    return total / counted if counted else 0.0


def _class_blocks(scores: torch.Tensor, targets: torch.Tensor, runtime: Runtime
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(scores, bool labels) of every image for blocks of `_AP_CELLS` cells' classes, on the device. Across
    processes the blocks are dealt out in turn: each is gathered from every process's rows into one process, so
    that no process holds every score (nor sorts every class). They move in rounds of one block per process, the
    next round's gathers started before this round's blocks are sorted: one gather at a time, each process waited
    for the sorting of the one it sends to; all at once, every score was on the device together."""
    rows = torch.tensor([len(scores)], device=runtime.device)
    counts = [rows] if not runtime.distributed else [torch.zeros_like(rows) for _ in range(runtime.world_size)]
    if runtime.distributed:
        dist.all_gather(counts, rows)
    counts = [int(c) for c in counts]
    block = max(1, _AP_CELLS // max(sum(counts), 1))  # classes at a time
    starts = range(0, scores.shape[1], block)
    if not runtime.distributed:
        for lo in starts:
            yield scores[:, lo:lo + block].to(runtime.device), targets[:, lo:lo + block].to(runtime.device)
        return

    def start_round(first: int) -> list:
        """Gathers of blocks first .. first + world_size - 1 (block b into process b % world_size), started."""
        started = []
        for b in range(first, min(first + runtime.world_size, len(starts))):
            lo = starts[b]
            part = torch.cat([scores[:, lo:lo + block], targets[:, lo:lo + block].float()], 1)
            part = F.pad(part, (0, 0, 0, max(counts) - len(scores))).to(runtime.device)  # one shape for a gather
            parts = [torch.empty_like(part) for _ in counts] if runtime.rank == b % runtime.world_size else None
            started.append((dist.gather(part, parts, dst=b % runtime.world_size, async_op=True), part, parts))
        return started  # each `part` kept until its gather is done

    pending = start_round(0)
    for first in range(0, len(starts), runtime.world_size):
        following = start_round(first + runtime.world_size)
        for work, part, parts in pending:
            work.wait()
            if parts is not None:
                width = part.shape[1] // 2
                joined = torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
                yield joined[:, :width], joined[:, width:] > 0.5
        pending = following
