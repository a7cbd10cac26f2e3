"""`finetune`: transfer a BiT model to a labelled image dataset with the BiT-HyperRule.

The plan (resolution, steps, learning rate, MixUp, batch) is resolved from the data by
`bigtransfer.hyperrule`, any value can be overridden, and the resolved plan is printed and saved
with the run before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset

from . import hyperrule
from .checkpoints import load_weights
from .data import (
    HyperRuleTransform,
    LabelledImages,
    StepSampler,
    TorchDatasetImages,
    eval_loader,
    match_classes,
    measure_image_size,
    open_dataset,
    select_examples,
    train_loader,
)
from .data.device import DeviceImages, device_batches
from .data.memory import InMemoryImages
from .data.sources import HELD_OUT_PART, held_out_rest
from .engine import EngineConfig, momentum_sgd, train
from .evaluate import evaluate
from .models import ResNetV2, create_model
from .runs import RunDir, as_recorded, held_out_data, labels_fingerprint, starting_weights
from .runtime import setup

log = logging.getLogger("bigtransfer")


@dataclass
class FinetunePlan:
    """Every choice of a fine-tuning run; `overridden` names those that did not come from the rule."""

    model: str
    data: str
    n_examples: int
    num_classes: int
    image_size: tuple[int, int]
    variant: str = "release"
    resize: int = 0
    crop: int = 0
    flip: bool = True
    random_crop: bool = True
    steps: int = 0
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()
    base_lr: float = hyperrule.BASE_LR
    batch_size: int = hyperrule.BATCH_SIZE
    batch_split: int | str = 1
    mixup_alpha: float = 0.0
    examples_per_class: int | None = None
    examples_per_class_seed: int = 0
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool | None = None  # None: the engine's choice (channels_last where it captures CUDA graphs)
    compile: bool = False
    overridden: list[str] = field(default_factory=list)

    @property
    def schedule(self) -> hyperrule.Schedule:
        return hyperrule.Schedule(self.warmup_steps, tuple(self.decay_steps), self.steps)


# Overrides that change what is trained (compared on resume); how it runs (device, workers...) is free.
PLAN_KEYS = {f.name for f in dataclasses.fields(FinetunePlan)} - {"model", "data", "n_examples", "num_classes",
                                                                     "image_size", "overridden"}


def make_plan(model: str, data: LabelledImages, **overrides) -> FinetunePlan:
    """Resolve the HyperRule for `data` (already few-shot sampled), then apply `overrides`."""
    unknown = set(overrides) - PLAN_KEYS - {"steps", "resolution"}
    if unknown:
        raise TypeError(f"unknown fine-tuning options: {', '.join(sorted(unknown))}")
    variant = overrides.get("variant", "release")
    n = len(data)
    size = measure_image_size(data)
    resolution = overrides.pop("resolution", None)
    if resolution is not None and (isinstance(resolution, int | str) or len(resolution) != 2):
        raise TypeError(f"resolution=(resize, crop): two sides, e.g. (160, 128); got {resolution!r}")
    resize, crop = resolution or hyperrule.resolution(size, variant)
    sched = hyperrule.schedule(n, variant)
    if overrides.get("steps") is not None:
        sched = sched.scaled(overrides["steps"])
    plan = FinetunePlan(model=model, data=data.name, n_examples=n, num_classes=len(data.classes), image_size=size,
                        variant=variant, resize=resize, crop=crop, flip=data.flip, steps=sched.total_steps,
                        warmup_steps=sched.warmup_steps, decay_steps=sched.decay_steps,
                        mixup_alpha=hyperrule.mixup_alpha(n))
    given = {k: v for k, v in overrides.items() if v is not None and k not in ("steps", "variant")}
    plan = dataclasses.replace(plan, **given)
    plan.overridden = sorted(given) + (["steps"] if overrides.get("steps") is not None else [])
    if resolution is not None:
        plan.overridden.append("resolution")
    if plan.crop > plan.resize:
        raise ValueError(f"crop {plan.crop} is larger than resize {plan.resize}")
    wrong = [f"{k} {v}" for k, v in {"steps": plan.steps, "batch_size": plan.batch_size, "crop": plan.crop}.items()
             if v < 1]
    wrong += [] if math.isfinite(plan.base_lr) and plan.base_lr > 0 else [f"base_lr {plan.base_lr}"]
    wrong += [] if math.isfinite(plan.mixup_alpha) and plan.mixup_alpha >= 0 else [f"mixup_alpha {plan.mixup_alpha}"]
    if wrong:
        raise ValueError(f"fine-tuning plan: {', '.join(wrong)} (steps, batch_size and crop must be >= 1, base_lr "
                         "> 0, mixup_alpha >= 0, all finite)")
    return plan


def plan_table(plan: FinetunePlan, eval_data: LabelledImages | None = None) -> Table:
    """The resolved plan as people read it, with the origin of every value (and the held-out data's size)."""
    def origin(*keys: str) -> str:
        return "override" if any(k in plan.overridden for k in keys) else f"HyperRule ({plan.variant})"

    table = Table(title=f"BiT-HyperRule plan: {plan.model} on {plan.data}")
    for col in ("", "value", "from"):
        table.add_column(col)
    h, w = plan.image_size
    rows = [
        ("training examples", f"{plan.n_examples:,}" + (f" ({plan.examples_per_class} per class, seed "
                                                         f"{plan.examples_per_class_seed})"
                                                         if plan.examples_per_class is not None else ""), "data"),
        ("classes", str(plan.num_classes), "data"),
        ("image size (median)", f"{h}x{w}", "measured"),
        ("resize -> crop", f"{plan.resize} -> {plan.crop}", origin("resolution")),
        ("augmentation", ("random crop" if plan.random_crop else "no crop") + (" + flip" if plan.flip else ", no flip"),
         origin("flip", "random_crop") if {"flip", "random_crop"} & set(plan.overridden) else "data / rule"),
        ("steps", str(plan.steps), origin("steps")),
        ("warmup, decays x0.1 after", f"{plan.warmup_steps}, {list(plan.decay_steps)}", origin("steps")),
        ("learning rate", f"{plan.base_lr:g} (SGD momentum {hyperrule.MOMENTUM}, no weight decay)", origin("base_lr")),
        ("batch (global)", str(plan.batch_size), origin("batch_size")),
        ("batch split", str(plan.batch_split), "override" if "batch_split" in plan.overridden else "default"),
        ("MixUp alpha", f"{plan.mixup_alpha:g}", origin("mixup_alpha")),
        ("precision", plan.precision + (", channels_last" if plan.channels_last else "")
         + (", compiled" if plan.compile else ""), "setting"),
        ("seed", str(plan.seed), "setting"),
    ]
    if eval_data is not None:  # a folder that is its own held-out data shows how much of it is held out
        where = "held out of the data" if eval_data.name.endswith(f"({HELD_OUT_PART})") else "evaluation data"
        rows.insert(1, ("held-out examples", f"{len(eval_data):,}", where))
    for row in rows:
        table.add_row(*row)
    return table


def as_source(data: LabelledImages | Dataset | str, split: str = "train", download: bool = False,
              hold_out: bool = True) -> LabelledImages:
    """Accept a spec string (see `open_dataset`), one of our sources, or any torch Dataset."""
    if isinstance(data, LabelledImages):
        return data
    if isinstance(data, str | os.PathLike):
        return open_dataset(str(data), split, download=download, hold_out=hold_out)
    if isinstance(data, Dataset):
        return TorchDatasetImages(data)
    raise TypeError(f"cannot use {type(data).__name__} as training data")


def same_data(train_data: object, eval_data: object) -> bool:
    """Whether two data specs name the same data (which then holds out a part of itself for evaluation)."""
    return isinstance(train_data, str | os.PathLike) and isinstance(eval_data, str | os.PathLike) and (
        os.fspath(train_data) == os.fspath(eval_data) or Path(train_data).resolve() == Path(eval_data).resolve())


def open_sources(train_data: LabelledImages | Dataset | str, eval_data: LabelledImages | Dataset | str | None,
                 download: bool = False) -> tuple[LabelledImages, LabelledImages | None]:
    """The training source and the held-out one (or None), labelled alike (`match_classes`). A folder of
    class folders (or a CSV) gives up about a fifth of its images as held-out data only where it is the held-out
    data too (`open_dataset`)."""
    same = same_data(train_data, eval_data)
    train = as_source(train_data, "train", download, hold_out=same)
    if eval_data is None:
        return train, None
    held_out = held_out_rest(train) if same else None  # a carved training part: its rest, not read again
    if held_out is None:
        held_out = as_source(eval_data, "eval", download, hold_out=same)
    return train, match_classes(train.classes, held_out, multi_label=train.multi_label)


def default_run_dir(plan: FinetunePlan) -> Path:
    """Deterministic, so that running the same command again finds the run and resumes it."""
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(plan.data.split(":")[-1]).name or plan.data).strip("_")
    shots = f"_k{plan.examples_per_class}s{plan.examples_per_class_seed}" if plan.examples_per_class is not None else ""
    return Path("runs") / f"{plan.model}_{data}{shots}_seed{plan.seed}"


def finetune(model_or_name: nn.Module | str, train_data: LabelledImages | Dataset | str,
             eval_data: LabelledImages | Dataset | str | None = None, *, out: str | os.PathLike | None = None,
             pretrained: bool | str | os.PathLike = False, device: str | None = None, workers: int = 0,
             eval_every: int | None = None, checkpoint_every: int | None = None, checkpoint_minutes: float = 10.0,
             log_every: int = 10, progress: bool = True, in_memory: bool = False, device_data: bool = False,
             **overrides) -> dict:
    """Fine-tune with the BiT-HyperRule and return the results (also written to the run directory).

    model_or_name: a registry name (created with a new zero head of the right size, weights from
    `pretrained`) or a ResNetV2 (its head is replaced if its size differs). `eval_data` None: no evaluation
    (the command line evaluates on the data's test, else val split by default). Overrides: any field of
    `FinetunePlan` plus ``steps`` and ``resolution=(resize, crop)``. Running again with the same
    `out` resumes an interrupted run; a finished run returns its saved results. `in_memory` decodes
    the training images once into RAM (small sets: no per-epoch decoding); `device_data` further
    keeps them on the device and augments there in batch (implies `in_memory`).
    """
    if not isinstance(model_or_name, str) and pretrained is not False:
        raise ValueError("pretrained= picks the starting weights of a registry name; a model passed in starts from "
                         "its own weights (load a checkpoint into it with load_weights first)")
    runtime = setup(device)
    source, eval_source = open_sources(train_data, eval_data)
    if source.multi_label:
        raise ValueError(f"{source.name} has several labels per image; the HyperRule fine-tunes single-label "
                         "tasks (softmax): `bit pretrain` trains multi-label data (sigmoid)")
    k, k_seed = overrides.get("examples_per_class"), overrides.get("examples_per_class_seed") or 0
    train_source, _ = select_examples(source, k, k_seed)  # what the plan describes, without decoding anything
    name = model_or_name if isinstance(model_or_name, str) else f"BiT-{model_or_name.arch.name}"
    plan = make_plan(name, train_source, **overrides)
    with RunDir(out or default_run_dir(plan), writer=runtime.is_main) as run:  # claimed until this returns
        settings = {"plan": as_recorded(dataclasses.asdict(plan)),
                    "pretrained": starting_weights(model_or_name, pretrained), "eval_data": held_out_data(eval_source),
                    "labels": labels_fingerprint(source, eval_source)}
        done = run.previous_results(settings)
        if done is not None:  # what the run returned when it finished
            if not isinstance(model_or_name, str):  # a model passed in ends with the run's weights, as after training
                load_weights(_task_head(model_or_name, plan), run / "model.safetensors")
            return {**done, "eval": run.read_json("eval.json")}
        with run.log_to_file(), torch.random.fork_rng(devices=[]):  # seeded inside; the caller's RNG left as it was
            train_source, chosen = select_examples(source, k, k_seed, readable=True)  # only for a run that trains
            if runtime.is_main and progress:
                Console(stderr=True).print(plan_table(plan, eval_source))
            if runtime.is_main:
                run.write_json("config.json", {**settings, "world_size": runtime.world_size,
                                               "device": str(runtime.device)})
                if chosen is not None:
                    run.write_json("examples.json", {"indices": chosen, "files": [source.describe(i) for i in chosen]})
            if in_memory or device_data:  # after the few-shot choice: a 5-shot run decodes its 5 images per class
                side = plan.resize if plan.random_crop else plan.crop  # the training transform's first resize
                train_source = InMemoryImages(train_source, side, workers=max(1, workers), progress=progress)
            model = _build_model(model_or_name, plan, pretrained)
            optimizer = momentum_sgd(model.parameters(), plan.base_lr, runtime.device)
            config = EngineConfig(schedule=plan.schedule, base_lr=plan.base_lr, global_batch=plan.batch_size,
                                  input_size=plan.crop, batch_split=plan.batch_split, mixup_alpha=plan.mixup_alpha,
                                  precision=plan.precision, channels_last=plan.channels_last, compile=plan.compile,
                                  seed=plan.seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
                                  checkpoint_minutes=checkpoint_minutes, log_every=log_every, progress=progress)
            train_tf = HyperRuleTransform(plan.resize, plan.crop, train=True, flip=plan.flip,
                                          random_crop=plan.random_crop)
            eval_tf = HyperRuleTransform(plan.resize, plan.crop, train=False)
            sampler = StepSampler(len(train_source), plan.batch_size, plan.seed, runtime.rank, runtime.world_size)
            pin = runtime.device.type == "cuda"

            on_device = DeviceImages(train_source, runtime.device) if device_data else None

            def batches(start: int):
                if on_device is not None:
                    return device_batches(on_device, train_tf, sampler, start, plan.steps)
                return train_loader(train_source, train_tf, sampler, start, plan.steps, workers, pin_memory=pin)

            def evaluator(net: nn.Module, batch_size: int) -> dict | None:
                if eval_source is None:
                    return None
                loader = eval_loader(eval_source, eval_tf, batch_size, workers, runtime.rank, runtime.world_size, pin)
                return evaluate(net, loader, len(eval_source.classes), runtime, plan.precision, plan.channels_last)

            labels = {"bigtransfer.classes": json.dumps(list(source.classes)), "bigtransfer.resolution": str(plan.crop),
                      "bigtransfer.multi_label": "false"}  # the HyperRule trains a softmax head
            results = train(model, optimizer, batches, config, runtime, run, evaluator=evaluator,
                            weights_metadata=labels)
            results["plan"] = settings["plan"]  # as a finished run returns it
            _write_summary(run, plan, results)
            return results


def _build_model(model_or_name: nn.Module | str, plan: FinetunePlan, pretrained: bool | str | os.PathLike) -> ResNetV2:
    torch.manual_seed(plan.seed)  # a random-init model is reproducible too
    if isinstance(model_or_name, str):
        model = create_model(model_or_name, num_classes=plan.num_classes, pretrained=pretrained)
        model.reset_head(plan.num_classes)  # also where the checkpoint's head has the task's size: transfer starts at 0
        return model
    return _task_head(model_or_name, plan)


def _task_head(model: ResNetV2, plan: FinetunePlan) -> ResNetV2:
    """A model passed in, with a head of the task's size (a new zero one where its own has another size)."""
    if model.num_classes != plan.num_classes:
        log.info("replacing the model's %d-class head with a zero-initialised %d-class head",
                 model.num_classes, plan.num_classes)
        model.reset_head(plan.num_classes)
    model.multi_label = False  # a kept head too: the HyperRule trains it with softmax
    return model


def _write_summary(run: RunDir, plan: FinetunePlan, results: dict) -> None:
    """summary.json: `results` but the full evaluation (in eval.json), with its top-1 and top-5 (also added to
    `results`, so that a fresh run and a finished one return the same keys)."""
    ev = results.get("eval") or {}
    results["top1"], results["top5"] = ev.get("top1"), ev.get("top5")
    run.write_json("summary.json", {k: v for k, v in results.items() if k != "eval"})
    if run.writer:
        lines = [f"# {plan.model} on {plan.data}", "",
                 f"- examples: {plan.n_examples} ({plan.num_classes} classes), steps: {plan.steps}, "
                 f"batch {plan.batch_size}, lr {plan.base_lr:g}, crop {plan.crop}",
                 f"- final training loss: {results['final_loss']:.4f}",
                 f"- throughput: {results['images_per_s']} images/s"]
        if ev:
            lines.append(f"- evaluation on {ev['examples']} images: top-1 {100 * ev['top1']:.2f}%, "
                         f"top-5 {100 * ev['top5']:.2f}%")
        if results["bad_images"]:
            lines.append(f"- bad images left out: {results['bad_images']} (see bad_images.json)")
        (run / "summary.md").write_text("\n".join(lines) + "\n")
