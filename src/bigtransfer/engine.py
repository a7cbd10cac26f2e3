"""The one training loop, shared by fine-tuning and pre-training.

One update = one global batch, loaded as this process's share and fed through the model in
`batch_split` micro-batches with gradient accumulation (GroupNorm has no batch statistics, so the
update equals the whole-batch one). Under torchrun every process takes its slice of the same global
batch and DDP averages the gradients: same batch, same schedule, whatever the number of processes.
Batches and augmentations are functions of (seed, step), so resuming from a checkpoint replays
nothing and skips nothing; SIGTERM/SIGINT write a checkpoint and stop cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import save_weights
from .checkpoints.formats import atomic_path, first_non_finite
from .data import to_model_input
from .hyperrule import MOMENTUM, Schedule, learning_rate
from .models.resnetv2 import hooked
from .runs import RunDir
from .runtime import Runtime, TrainingInterrupted, all_reduce_sum, autocast, upload

log = logging.getLogger("bigtransfer")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> per-example loss
BatchSource = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]]
Evaluator = Callable[[nn.Module, int], dict | None]


@dataclass
class EngineConfig:
    schedule: Schedule
    base_lr: float
    global_batch: int
    input_size: int  # side of the training crops (the probe of --batch-split auto, the CUDA-graph capture)
    batch_split: int | str = 1  # or "auto": the largest micro-batch that fits in GPU memory
    mixup_alpha: float = 0.0
    precision: str = "fp32"
    channels_last: bool | None = None  # None: where the step runs as CUDA graphs (`_graphs_wanted`)
    compile: bool = False
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None  # steps; None: by time only
    checkpoint_minutes: float = 10.0
    log_every: int = 10
    progress: bool = True


def momentum_sgd(params: Iterable[torch.Tensor] | Iterable[dict], lr: float, device: torch.device) -> torch.optim.SGD:
    """BiT's optimiser, upstream and for transfer: SGD with momentum 0.9 (weight decay, if any, per parameter
    group). For CUDA training, torch's fused kernels: one pass over weights, gradients and momenta instead of
    three (the optimizer took 0.73 ms of a 33 ms R50x1 step on an H100). Elsewhere torch's default: the fused
    CPU kernels round differently now and then (a head bias 1e-10 apart after 10 steps of a from-scratch
    run, which few-shot training amplified into accuracies a few points apart), for about 1% of a step."""
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, fused=device.type == "cuda" or None)


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSource, config: EngineConfig,
          runtime: Runtime, run: RunDir, loss_fn: LossFn = softmax_cross_entropy,
          evaluator: Evaluator | None = None, weights_metadata: dict[str, str] | None = None) -> dict:
    """Train `model` (parameters already in `optimizer`) for `config.schedule.total_steps` updates.

    `batches(start)` yields this process's (uint8 images, targets, bad-image reports) for steps
    start, start + 1, ...; `evaluator(net, batch_size)` returns a dict of metrics (or None).
    Returns a summary: steps, last loss, images/s, bad-image count, final evaluation (if any)."""
    total = config.schedule.total_steps
    model.to(runtime.device)
    start, elapsed = _resume(model, optimizer, run, runtime)
    _optimizer_state_like_parameters(optimizer)  # before --batch-split auto's probe, which must leave room for them
    local_batch = config.global_batch // runtime.world_size
    split = _batch_split(config, model, local_batch, runtime)
    graphs = _graphs_wanted(model, config, runtime, split)
    if config.channels_last is None:
        config = replace(config, channels_last=graphs)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        _optimizer_state_like_parameters(optimizer)  # the buffers in the parameters' new layout
    net: nn.Module = model
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        net = torch.compile(net)
    model.train()
    graphed = _capture_cuda_graphs(model, config, runtime, local_batch) if graphs else None
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.precision == "fp16")

    def run_eval() -> dict | None:
        return None if evaluator is None else evaluator(net, max(1, local_batch // split))

    def checkpoint(step: int) -> None:
        _finite_weights(model, step)  # a step's loss is taken before its update: the update may still diverge
        _save_bad_images(run, runtime, step, bad_seen, bad_count)
        run.save_checkpoint({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "elapsed_s": time.perf_counter() - started,  # and what predict needs from the file:
                             "metadata": weights_metadata or {}})  # classes, side (`bit predict` reads it too)

    bad_seen, bad_count = _load_bad_images(run, runtime, start)
    logged = [r for r in run.metrics() if "loss" in r] if start else []  # what a resumed run reports until it logs
    last_loss = logged[-1]["loss"] if logged else math.nan
    speed = logged[-1]["images_per_s"] if logged else 0.0
    last_save = time.monotonic()
    done = start
    with _signals() as stop, _progress(config.progress and runtime.is_main, total, start) as bar:
        t0 = time.perf_counter()  # the last log step's time (after the GPU finished it), and its step: images/s
        logged_step = start  # between log steps, of the whole loop (data loading, evaluations, checkpoints)
        started = t0 - elapsed  # elapsed_s counts the training time of every attempt, as the steps do
        for step, (images, labels, reports) in zip(range(start, total), batches(start), strict=False):
            lr = learning_rate(step, config.schedule, config.base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if any(reports):
                keep = torch.tensor([not r for r in reports])
                for r in reports:
                    if r and r not in bad_seen:
                        bad_seen.add(r)
                        log.warning("bad image left out of training: %s", r)
                bad_count += int((~keep).sum())
                images, labels = images[keep], labels[keep]
            loss = _update(net, graphed, optimizer, scaler, images, labels, loss_fn, split, step, config, runtime)
            done = step + 1
            stopping = stop.signum is not None
            timed = time.monotonic() - last_save > 60 * config.checkpoint_minutes
            if done % config.log_every == 0 or done == total:
                mean, (stopping, timed) = _meet(loss, (stopping, timed), runtime)  # the same answers everywhere
                # timed only here: `_meet` waits for the GPU, which between log steps runs behind the CPU (a
                # CPU-side time per step measured how fast kernels were queued: twice the H100's real rate)
                now = time.perf_counter()
                speed = config.global_batch * (done - logged_step) / (now - t0)
                t0, logged_step = now, done
                if mean is not None:
                    last_loss = _finite(mean, done)
                    run.append_metrics({"step": done, "loss": last_loss, "lr": lr, "images_per_s": round(speed, 2),
                                        "elapsed_s": round(now - started, 3)})
            elif runtime.distributed:  # decided where the processes meet: else they would stop at other steps
                stopping = timed = False
            bar.update(done, last_loss, lr, speed)
            if config.eval_every and done % config.eval_every == 0 and done < total:
                metrics = run_eval()
                if metrics is not None:
                    run.append_metrics({"step": done, "eval": _scalars(metrics)})
                    log.info("step %d: %s", done, _format(metrics))
            if stopping or timed or (config.checkpoint_every and done % config.checkpoint_every == 0):
                if loss is not None:  # a diverged model is never checkpointed over a good one
                    _finite(float(loss), done)
                checkpoint(done)
                last_save = time.monotonic()
            if stopping:
                raise TrainingInterrupted(done, stop.signum or signal.SIGTERM)  # another process's signal, if not ours

    if done < total:
        raise RuntimeError(f"the training data ran out at step {done} of {total}")
    if done > start:  # before the final evaluation, which a signal may cut short: a re-run only evaluates
        checkpoint(total)
    if runtime.is_main:
        save_weights(model, run / "model.safetensors", metadata=weights_metadata)
    final = run_eval()
    if final is not None:
        run.append_metrics({"step": total, "eval": _scalars(final)})
        run.write_json("eval.json", final)
    run.plot()
    bad_seen, bad_count = _gather_bad_images(bad_seen, bad_count, runtime)
    if bad_seen:
        run.write_json("bad_images.json", {"count": len(bad_seen), "times_left_out": bad_count,
                                           "files": sorted(bad_seen)})
    if runtime.is_main:
        for path in run.path.glob("bad_images.rank*.json"):
            path.unlink()
    return {"steps": total, "final_loss": last_loss, "images_per_s": round(speed, 2), "batch_split": split,
            "bad_images": len(bad_seen), "eval": final, "run_dir": str(run.path)}


def _meet(loss: torch.Tensor | None, flags: tuple[bool, ...], runtime: Runtime) -> tuple[float | None, list[bool]]:
    """The loss averaged over the processes, and each flag raised by any of them, in one collective (every
    process calls it at the same steps; a step skipped for bad images is skipped by all, so its loss is None)."""
    value = torch.zeros(1, device=runtime.device) if loss is None else loss.detach().float().reshape(1)
    shared = all_reduce_sum(torch.cat([value, torch.tensor([float(f) for f in flags], device=runtime.device)]),
                            runtime).tolist()
    return (None if loss is None else shared[0] / runtime.world_size), [v > 0 for v in shared[1:]]


def _finite(value: float, step: int) -> float:
    """The loss, if finite: a diverged run (NaN or infinite loss) stops here with its last checkpoint kept,
    rather than going on to save NaN weights as a finished model."""
    if not math.isfinite(value):
        raise FloatingPointError(f"the training loss is {value} at step {step}: the run diverged (is the learning "
                                 "rate too high?); its last checkpoint is kept")
    return value


def _finite_weights(model: nn.Module, step: int) -> None:
    """The weights, if all finite (one check for all of them: one wait for a GPU), else the run stops as for a
    diverged loss, its last checkpoint kept."""
    name = first_non_finite(dict(model.named_parameters()))
    if name is not None:
        raise FloatingPointError(f"the weights hold NaN or infinite values after step {step} ({name} first): the "
                                 "run diverged (is the learning rate too high?); its last checkpoint is kept")


def _save_bad_images(run: RunDir, runtime: Runtime, step: int, seen: set[str], count: int) -> None:
    """This process's bad images up to `step`, written just before the checkpoint of `step`, so that a resumed
    run reports them too. Each process writes its own file (a checkpoint on a signal may not wait in a
    collective), keeping the record of the checkpoint before as well: a kill between this file and the
    checkpoint leaves the checkpoint one step behind it."""
    if seen:
        path = run.path / f"bad_images.rank{runtime.rank}.json"
        records = json.loads(path.read_text())[-1:] if path.exists() else []
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps([*records, {"step": step, "count": count, "files": sorted(seen)}]))


def _load_bad_images(run: RunDir, runtime: Runtime, step: int) -> tuple[set[str], int]:
    """The bad images every process had met by the resumed `step` (any number of processes then), for the main
    process to carry on; records of other steps are another attempt's, whose images will come again."""
    seen: set[str] = set()
    count = 0
    if step and runtime.is_main:
        for path in run.path.glob("bad_images.rank*.json"):
            for record in json.loads(path.read_text()):
                if record["step"] == step:
                    seen.update(record["files"])
                    count += record["count"]
    return seen, count


def _gather_bad_images(seen: set[str], count: int, runtime: Runtime) -> tuple[set[str], int]:
    """Every process's bad images, for the main one to report (each saw only its share of the batches)."""
    if not runtime.distributed:
        return seen, count
    parts: list = [None] * runtime.world_size
    dist.all_gather_object(parts, (sorted(seen), count))
    return {f for files, _ in parts for f in files}, sum(c for _, c in parts)


def _update(net: nn.Module, graphed: _GraphedForward | None, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, images: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn, split: int,
            step: int, config: EngineConfig, runtime: Runtime) -> torch.Tensor | None:
    """One SGD update over this process's share of the global batch, in `split` micro-batches; None (and no
    update) where every image of the global batch was bad."""
    n = len(labels)
    count: float | torch.Tensor = n  # the loss is the mean over the global batch's good images: DDP averages the
    if runtime.distributed:  # gradients, so each process divides by the global count over the number of processes
        count = all_reduce_sum(torch.tensor(float(n), device=runtime.device), runtime) / runtime.world_size
    if n == 0 and float(count) == 0:  # only a process with nothing waits for the count; then all skip, or none
        log.warning("step %d: every image of the batch was bad: no update at this step", step)
        return None
    images = images.to(runtime.device, non_blocking=True)  # a process whose share was all bad runs an empty
    labels = labels.to(runtime.device, non_blocking=True)  # micro-batch, to take part in the gradient average
    lam, perm = 1.0, None
    if config.mixup_alpha > 0:  # one lambda per global batch; partners from a permutation of this process's share
        lam = float(np.random.default_rng([config.seed, step]).beta(config.mixup_alpha, config.mixup_alpha))
        perm = upload(np.random.default_rng([config.seed, step, runtime.rank]).permutation(n), runtime.device)
    optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=runtime.device)
    chunks = torch.arange(n, device=runtime.device).tensor_split(split)
    ddp = isinstance(getattr(net, "_orig_mod", net), DistributedDataParallel)  # under torch.compile too
    for i, idx in enumerate(chunks):
        sync = i == len(chunks) - 1 or not ddp
        with contextlib.nullcontext() if sync else net.no_sync():
            x = to_model_input(images[idx])
            if perm is not None:
                x = lam * x + (1 - lam) * to_model_input(images[perm[idx]])
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if graphed is not None and x.shape[1:] == graphed.input_shape[1:]:
                logits = graphed.forward(_padded(x, graphed.input_shape[0]))[:len(idx)]
            else:
                with autocast(runtime.device, config.precision):
                    logits = net(x)
            per_example = loss_fn(logits, labels[idx])
            if perm is not None:
                per_example = lam * per_example + (1 - lam) * loss_fn(logits, labels[perm[idx]])
            loss = per_example.sum() / count
            scaler.scale(loss).backward()
        total_loss += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return total_loss


@dataclass
class _GraphedForward:
    forward: Callable[[torch.Tensor], torch.Tensor]
    input_shape: torch.Size


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` followed by zero images up to `rows`, the captured batch: a batch shortened by bad images replays the
    graphs rather than running eagerly beside their memory pool (a second copy of the activations, enough to
    run out of memory where the captured step just fits). Exact: every layer sees each image alone (GroupNorm,
    not BatchNorm), and the padding gets no loss, hence no gradient."""
    return x if len(x) == rows else F.pad(x, (0, 0, 0, 0, 0, 0, 0, rows - len(x)))  # in x's layout


def _graphs_wanted(model: nn.Module, config: EngineConfig, runtime: Runtime, split: int) -> bool:
    """Whether the training step will be captured as CUDA graphs (if the capture succeeds; see
    `_capture_cuda_graphs`). It also picks the layout where none was asked for:
    in graphs, channels_last made R50x1's fine-tuning loop 1.22x faster (H100, bf16, batch 512: cuDNN's Hopper
    convolutions are NHWC kernels, and given NCHW spend 31% of the step's GPU time transposing); launched op by
    op, it is slower (more CPU time per step than the GPU saves; benchmarks/RESULTS.md)."""
    return (runtime.device.type == "cuda" and split == 1 and not runtime.distributed and not config.compile
            and not getattr(model, "grad_checkpointing", False) and not hooked(model.modules())
            and os.environ.get("BIGTRANSFER_CUDA_GRAPHS", "1") != "0")


def _capture_cuda_graphs(model: nn.Module, config: EngineConfig, runtime: Runtime,
                         micro_batch: int) -> _GraphedForward | None:
    """The training forward and backward of one batch shape, captured as CUDA graphs.

    Why: at BiT's fine-tuning sizes the GPU finishes a GroupNorm or a 1x1 conv faster than Python can
    launch the next kernel; a replay launches the ~1,000 kernels of an R50 step at once (measured on an
    H100, R50x1 at 128 px: see benchmarks/RESULTS.md). Only where it is exact and simple (`_graphs_wanted`): one CUDA
    process (DDP's gradient hooks have their own way), no torch.compile (Inductor has its own), no
    activation checkpointing (it reads the RNG state, which a capture forbids), no hooks (a replay would not
    run them), and one micro-batch per step (the replayed backward hands out the same gradient buffers every
    time, which accumulation over micro-batches would alias). A batch shortened by bad images replays it too,
    padded (`_padded`). The model keeps its own `forward`: the graphed one is returned.
    ``BIGTRANSFER_CUDA_GRAPHS=0`` turns it off. None where the capture fails."""
    x = torch.zeros(micro_batch, 3, config.input_size, config.input_size, device=runtime.device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:  # autocast must not cache cast weights across the capture (the cache would outlive the graph)
        with autocast(runtime.device, config.precision, cache_enabled=False), warnings.catch_warnings():
            # the capture's side stream meets gradient accumulators made on the default stream: one sync
            warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
            torch.cuda.make_graphed_callables(model, (x,), allow_unused_input=True)
        log.info("CUDA graphs: the training step is captured for batches of %d", micro_batch)
        return _GraphedForward(model.forward, x.shape)
    except (RuntimeError, AssertionError) as e:  # out of memory, an op that cannot be captured, or torch's checks
        log.warning("training without CUDA graphs: capturing them failed (%s)",
                    (str(e).splitlines() or [type(e).__name__])[0])
        torch.cuda.empty_cache()
        return None
    finally:
        model.__dict__.pop("forward", None)  # make_graphed_callables replaced it on the instance


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, run: RunDir, runtime: Runtime
            ) -> tuple[int, float]:
    """(step, seconds of training before it) of the run's checkpoint; (0, 0.0) for a fresh start."""
    state = run.load_checkpoint()
    if state is None:
        run.rewind_metrics(0)  # lines of an attempt that stopped before its first checkpoint
        return 0, 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    run.rewind_metrics(step)
    if runtime.is_main:
        log.info("resuming %s from step %d", run.path, step)
    return step, float(state.get("elapsed_s", 0.0))


def _optimizer_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Every momentum buffer as a tensor of its parameter's device and memory layout, zeros where none exists yet.

    Why: torch's fused SGD (CUDA here) treats parameter, gradient and buffer as one flat array; a buffer in
    another layout -- a checkpoint written before the engine changed the model's layout -- is refused on CUDA
    and silently misread by the CPU kernels. And the fused step's first call fills new buffers with
    `torch.empty_like`: skipped by fp16's GradScaler (an overflow, routine in the first steps), it leaves them
    holding whatever memory was there, which the next step multiplies by the momentum. A zero buffer gives the
    first step exactly what a new one would (0.9 * 0 + gradient)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == p.shape and (
                        value.device != p.device or value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
            if group.get("momentum") and p.requires_grad and "momentum_buffer" not in state:  # as torch would
                state["momentum_buffer"] = torch.zeros_like(p)


def _batch_split(config: EngineConfig, model: nn.Module, local_batch: int, runtime: Runtime) -> int:
    if config.batch_split != "auto":
        split = int(config.batch_split)
        if not 1 <= split <= local_batch:
            raise ValueError(f"--batch-split {split} must be between 1 and the per-process batch {local_batch}")
        return split
    if runtime.device.type != "cuda":
        return 1  # CPU memory is rarely the limit; accumulation only slows it down
    for split in (s for s in range(1, local_batch + 1) if local_batch % s == 0):
        try:  # one probe forward/backward at the micro-batch size, beside the momentum buffers; no weights change
            x = torch.zeros(local_batch // split, 3, config.input_size, config.input_size, device=runtime.device)
            with autocast(runtime.device, config.precision):
                model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)
            log.info("batch split auto: %d micro-batches of %d fit in GPU memory", split, local_batch // split)
            return split
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise RuntimeError("not even one image per micro-batch fits in GPU memory")


def _scalars(metrics: dict) -> dict:
    """The numbers of an evaluation worth a line in metrics.jsonl (not matrices or per-class lists)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _format(metrics: dict) -> str:
    return ", ".join(f"{k} {100 * v:.2f}%" if isinstance(v, float) else f"{k} {v}"
                     for k, v in _scalars(metrics).items())


class _Stop:
    signum: int | None = None


@contextlib.contextmanager
def _signals() -> Iterator[_Stop]:
    """SIGTERM/SIGINT only set a flag; the loop checkpoints after the current step and stops (under torchrun at
    the next step where the processes meet, every `log_every` steps, so that they all stop at the same one).
    A second SIGINT stops at once, without that checkpoint: a step (or a stalled data source) can take long.
    DataLoader workers forked meanwhile inherit the handler and ignore the signal (a terminal's Ctrl-C reaches
    them too): the loop shuts them down."""
    stop, owner = _Stop(), os.getpid()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            return
        if stop.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("interrupted again: stopped at once; the last checkpoint resumes the run")
        if stop.signum is None:
            log.warning("%s: stopping after this step, with a checkpoint (interrupt again to stop at once)",
                        signal.Signals(signum).name)
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _NoBar:
    def update(self, step: int, loss: float, lr: float, speed: float) -> None:
        pass


class _Bar:
    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def update(self, step: int, loss: float, lr: float, speed: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, speed=speed)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, start: int) -> Iterator[_NoBar | _Bar]:
    if not enabled:
        yield _NoBar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                                   "{task.fields[speed]:.1f} img/s"), TextColumn("ETA"), TimeRemainingColumn(),
                        console=Console(stderr=True))  # with the plan table and the log: stdout keeps the results
    task = progress.add_task("train", total=total, completed=start, loss=math.nan, lr=0.0, speed=0.0)
    with progress:
        yield _Bar(progress, task)

