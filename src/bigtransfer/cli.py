"""`bit`: the command line. Thin: parse arguments, call the public Python API, print the result."""

from __future__ import annotations

import argparse
import fnmatch
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from . import __version__
from .checkpoints import (
    FORMATS,
    SUFFIX_FORMATS,
    CheckpointError,
    DownloadError,
    cached_path,
    download_pretrained,
    head_is_multi_label,
    implied_metadata,
    read_checkpoint,
    write_checkpoint,
)
from .models import get_model_spec, list_models
from .runtime import TrainingInterrupted

console = Console()



def cmd_models(args: argparse.Namespace) -> int:
    table = Table(title="BiT models (GMACs: one forward pass, convolutions + head)")
    for col in ("name", "params (M)", "GMACs 128", "GMACs 224", "GMACs 480", "upstream", "head", "res",
                "cached"):
        table.add_column(col, no_wrap=True,
                         justify="right" if col.startswith(("params", "GMACs", "head", "res")) else "left")
    names = [n for n in list_models() if fnmatch.fnmatch(n.lower(), args.pattern.lower())] if args.pattern else \
        [n for n in list_models() if not get_model_spec(n).vtab_run]
    if not names:
        raise SystemExit(f"bit models: no model name matches {args.pattern!r}")
    for name in names:
        spec = get_model_spec(name)
        macs = [spec.arch.macs(r, spec.num_classes) / 1e9 for r in (128, 224, 480)]
        path = cached_path(spec)
        cached = "-" if path is None else ("yes" if path.exists() else "no")
        table.add_row(name, f"{spec.arch.num_params(spec.num_classes) / 1e6:.1f}", *(f"{m:.2f}" for m in macs),
                      spec.upstream or "(random init)", str(spec.num_classes), str(spec.resolution), cached)
    Console(width=max(console.width, 140)).print(table)  # a fixed 80 columns when piped would wrap it
    if not args.pattern:
        print(f"(and {len(list_models()) - len(names)} BiT-M runs fine-tuned on VTAB-1k tasks: "
              "`bit models '*-run0-*'` lists one run of each)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.checkpoint)
    same = [n for n in list_models() if get_model_spec(n).arch == ckpt.arch]
    runs = [n for n in same if get_model_spec(n).vtab_run]
    same = [n for n in same if n not in runs] + ([f"{len(runs)} VTAB-1k runs"] if runs else [])
    table = Table(show_header=False, title=str(ckpt.path))
    names = {"safetensors": "bigtransfer's own", "npz": "npz (the authors' release)"}.get(ckpt.format, ckpt.format)
    rows = [("parameter names", names), ("architecture", f"BiT-{ckpt.arch.name}"),
            ("units per stage", str(list(ckpt.arch.depths))), ("width factor", f"{ckpt.arch.width:g}"),
            ("parameters", f"{ckpt.num_params:,}"),
            ("head size", f"{ckpt.num_classes} ({'sigmoid: multi-label' if head_is_multi_label(ckpt) else 'softmax'})"
             if ckpt.num_classes else "none"),
            ("registry names", ", ".join(same) or "(none)")]
    rows += [(f"metadata: {k}", v) for k, v in sorted(ckpt.metadata.items())]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def _format_named_by(dst: Path) -> str:
    """The format a target's name asks for: by suffix, and a name without one is an HF transformers folder."""
    if dst.suffix in SUFFIX_FORMATS or not dst.suffix:
        return SUFFIX_FORMATS.get(dst.suffix, "hf")
    raise ValueError(f"cannot tell the checkpoint format from {dst.name!r} (known suffixes: "
                     f"{', '.join(SUFFIX_FORMATS)}, none for an HF folder); name it: --to {{{','.join(FORMATS)}}}")


def cmd_convert(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.src)
    fmt = args.to or _format_named_by(Path(args.dst))
    out = write_checkpoint(ckpt.state, ckpt.arch, args.dst, fmt, metadata=implied_metadata(ckpt))  # names, side...
    console.print(f"{ckpt.path} ({ckpt.format}, BiT-{ckpt.arch.name}) -> {out} ({fmt})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    for name in args.names:
        console.print(str(download_pretrained(name, progress=not args.quiet)))
    return 0


def _plan_inputs(args: argparse.Namespace) -> tuple:
    """(train source, eval source or None, plan overrides) from the shared fine-tuning flags."""
    train_source, eval_source = _data_inputs(args)
    overrides = {"variant": args.variant, "steps": args.steps, "base_lr": args.lr, "batch_size": args.batch,
                 "batch_split": args.batch_split, "resolution": tuple(args.resolution) if args.resolution else None,
                 "mixup_alpha": args.mixup_alpha, "flip": False if args.no_flip else None,
                 "random_crop": False if args.no_crop else None, "examples_per_class": args.examples_per_class,
                 "examples_per_class_seed": args.examples_per_class_seed, "seed": args.seed,
                 "precision": args.precision, "channels_last": args.channels_last,
                 "compile": args.compile or None}
    return train_source, eval_source, {k: v for k, v in overrides.items() if v is not None}


def _data_inputs(args: argparse.Namespace) -> tuple:
    """(train source, eval source or None) from --data, --eval-data and --download."""
    from .data import match_classes
    from .data.sources import MissingSplit
    from .finetuning import as_source, open_sources

    if args.eval_data is not None:
        train_source, eval_source = open_sources(args.data, None if args.eval_data == "none" else args.eval_data,
                                                 download=args.download)
    else:  # the test split of --data, else its val split
        train_source, eval_source = as_source(args.data, "train", download=args.download), None
        for split in ("test", "val"):
            try:
                eval_source = as_source(args.data, split, download=args.download)
                break
            except MissingSplit:  # not one there but unreadable: that error is the user's to see
                continue
        else:
            logging.getLogger("bigtransfer").warning("no test or val split found for %s: training without "
                                                     "evaluation (pass --eval-data)", args.data)
        if eval_source is not None:
            eval_source = match_classes(train_source.classes, eval_source, multi_label=train_source.multi_label)
    return train_source, eval_source


def cmd_plan(args: argparse.Namespace) -> int:
    from .data import select_examples
    from .finetuning import make_plan, plan_table

    source, eval_source, overrides = _plan_inputs(args)
    source, _ = select_examples(source, overrides.get("examples_per_class"),
                                overrides.get("examples_per_class_seed", 0))
    console.print(plan_table(make_plan(args.model, source, **overrides), eval_source))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetuning import finetune

    source, eval_source, overrides = _plan_inputs(args)
    results = finetune(args.model, source, eval_source, out=args.out, pretrained=args.pretrained, device=args.device,
                       workers=args.workers, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                       log_every=args.log_every, progress=not args.no_progress, in_memory=args.in_memory,
                       device_data=args.device_data, **overrides)
    ev = results.get("eval") or {}
    top1 = f", top-1 {100 * ev['top1']:.2f}%" if ev else ""
    if _main_process():
        console.print(f"done: {results['steps']} steps{top1}; results in {results['run_dir']}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from .data import open_dataset
    from .data.shards import write_shards

    manifest = write_shards(open_dataset(args.src, "all"), args.out, shard_size=args.shard_size,
                            max_side=args.max_side, quality=args.quality, workers=args.workers,
                            progress=not args.quiet)
    bad = f", {len(manifest['bad_images'])} bad images left out (listed in the manifest)" if manifest[
        "bad_images"] else ""
    console.print(f"{manifest['total']:,} images of {len(manifest['classes'])} classes in "
                  f"{len(manifest['shards'])} shards -> {args.out}{bad}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretraining import pretrain

    overrides = {"epochs": args.epochs, "batch_size": args.batch, "base_lr": args.lr, "warmup_steps": args.warmup_steps,
                 "weight_decay": args.weight_decay, "decay_epochs": tuple(args.decay_epochs) if args.decay_epochs
                 else None, "crop": args.resolution, "batch_split": args.batch_split, "precision": args.precision,
                 "channels_last": args.channels_last, "compile": args.compile or None,
                 "activation_checkpointing": args.activation_checkpointing or None, "seed": args.seed,
                 "flip": False if args.no_flip else None, "min_crop_area": args.min_crop_area}
    results = pretrain(args.model, args.data, args.eval_data, out=args.out, probe_data=args.probe_data,
                       probe_shots=args.probe_shots, pretrained=args.pretrained, device=args.device,
                       workers=args.workers, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                       log_every=args.log_every, progress=not args.no_progress, sample_log=args.sample_log,
                       recipe=args.recipe, in_memory=args.in_memory, **overrides)
    if _main_process():
        console.print(f"done: {results['steps']} steps; final loss {results['final_loss']:.4f}; results in {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    demo(args.out, seeds=args.seeds, shots=tuple(args.shots), full_budget=args.full, device=args.device,
         progress=not args.no_progress)
    return 0


def _main_process() -> bool:
    """Under torchrun, the process of rank 0 speaks for the run (the others would print the same lines)."""
    return int(os.environ.get("RANK", "0")) == 0


def _refuse_flags(overrides: dict, keys, why: str) -> None:
    """A flag that a command would ignore is an error, not a silent no-op."""
    names = {"base_lr": "--lr", "batch_size": "--batch", "flip": "--no-flip", "random_crop": "--no-crop"}
    given = sorted(names.get(k, "--" + k.replace("_", "-")) for k in keys if k in overrides)
    if given:
        raise ValueError(f"{', '.join(given)}: {why}")


def _sweep_settings(args: argparse.Namespace, train, test) -> dict:
    """What a sweep's results folder holds the results of (sweep.json), as a run folder's config.json does."""
    from .runs import held_out_data, starting_weights

    return {"model": args.model, "data": train.name, "eval_data": held_out_data(test),
            "pretrained": starting_weights(args.model, args.pretrained), "shots": _k_list(args.shots, args.full),
            "seeds": args.seeds}


def _k_list(shots: list[int], full: bool) -> list[int | None]:
    return list(shots) + ([None] if full else [])


def cmd_fewshot(args: argparse.Namespace) -> int:
    from .protocols import few_shot_sweep, results_folder, results_table, write_results

    train, test, overrides = _plan_inputs(args)
    if test is None:
        raise ValueError("bit fewshot needs evaluation data (--eval-data)")
    _refuse_flags(overrides, ("examples_per_class", "examples_per_class_seed", "seed"),
                  "bit fewshot draws the examples and seeds itself (--shots, --seeds)")
    settings = {"command": "fewshot", **_sweep_settings(args, train, test), "overrides": overrides}
    results_folder(args.out, settings)
    rows = few_shot_sweep(args.model, train, test, Path(args.out) / "runs", pretrained=args.pretrained,
                          shots=_k_list(args.shots, args.full), seeds=list(range(args.seeds)), device=args.device,
                          workers=args.workers, **overrides)
    title = f"{args.model} few-shot on {train.name}"
    write_results(rows, args.out, title, settings=settings)
    console.print(results_table(rows, title))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model
    from .probe import linear_probe
    from .protocols import results_folder, results_table, write_results
    from .runtime import setup

    train, test = _data_inputs(args)
    if test is None:
        raise ValueError("bit probe needs evaluation data (--eval-data)")
    # a file is read once: the side its run trained at (our runs record it; else the registry's), its weights
    weights = args.pretrained if args.pretrained in (False, True) else read_checkpoint(args.pretrained)
    recorded = int(getattr(weights, "metadata", {}).get("bigtransfer.resolution", 0))
    resolution = args.resolution or recorded or get_model_spec(args.model).resolution
    settings = {"command": "probe", **_sweep_settings(args, train, test), "resolution": resolution, "l2": args.l2}
    results_folder(args.out, settings)
    runtime = setup(args.device)
    torch.manual_seed(0)  # a random-init baseline is the same network at every run
    model = create_model(args.model, pretrained=weights).to(runtime.device)
    rows = linear_probe(model, train, test, resolution, runtime, shots=_k_list(args.shots, args.full),
                        seeds=list(range(args.seeds)), l2=args.l2, workers=args.workers, progress=True)
    for row in rows:
        row["init"] = "pretrained" if args.pretrained else "scratch"
    title = f"linear probe of {args.model} on {train.name} (ridge, l2 {args.l2:g})"
    write_results(rows, args.out, title, [f"features at {resolution} px"], settings)
    console.print(results_table(rows, title))
    return 0


def cmd_vtab(args: argparse.Namespace) -> int:
    from .vtab import SEARCH_SPACE, run_vtab, vtab_table

    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch, "base_lr": args.lr,
                                   "batch_split": args.batch_split, "precision": args.precision,
                                   "resolution": tuple(args.resolution) if args.resolution else None}.items()
                 if v is not None}
    if args.search:
        _refuse_flags(overrides, SEARCH_SPACE, "--search picks these per trial (steps, lr, MixUp, resolution)")
    results = run_vtab(args.model, args.root, args.out, tasks=args.tasks, pretrained=args.pretrained,
                       search=args.search, seed=args.seed, device=args.device, **overrides)
    console.print(vtab_table(results, f"VTAB-1k: {args.model}"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .inference import load_model, predict

    model, classes, resolution = load_model(args.model, args.resolution)
    results = predict(model, args.images, classes, args.top_k, resolution, args.batch,
                      args.device or "cpu", args.workers, not args.quiet, args.precision)
    print(json.dumps(results, indent=1))
    return _unreadable("predict", [r["error"] for r in results if "error" in r], len(results))


def cmd_embed(args: argparse.Namespace) -> int:
    from .inference import embed, embeddings_path, load_model, save_embeddings

    embeddings_path(args.out)
    model, _, resolution = load_model(args.model, args.resolution)
    features, files, errors = embed(model, args.images, resolution, args.batch,
                                    args.device or "cpu", args.workers, not args.quiet, args.precision)
    out = save_embeddings(features, files, args.out)
    console.print(f"{features.shape[0]} x {features.shape[1]} features -> {out}")
    return _unreadable("embed", [errors[f] for f in files if f in errors], len(files), "their rows are NaN")


def _unreadable(command: str, reports: list[str], total: int, consequence: str = "") -> int:
    """Exit status 1 when some images did not decode (the output is complete otherwise), naming them."""
    if not reports:
        return 0
    consequence = f"; {consequence}" if consequence else ""
    print(f"bit {command}: {len(reports)} of {total} images could not be read{consequence}:", *reports,
          sep="\n  ", file=sys.stderr)
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    from .inference import export, load_model

    model, _, resolution = load_model(args.model, args.resolution)
    out = export(model, args.out, args.format, resolution, args.output)
    console.print(f"{args.format} ({args.output}) with Weight Standardization folded in -> {out}")
    return 0


def _number(kind: type, minimum: float, inclusive: bool = True, maximum: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite `kind` of at least (or above) `minimum`, so that nonsense stops at the flag."""
    def parse(value: str) -> float:
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'a whole number' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(x) or x < minimum or (x == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {value}")
        if x > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return x
    return parse


COUNT = _number(int, 1)  # steps, batch sizes, shots, seeds per k, pixels
INDEX = _number(int, 0)  # seeds, workers, trials
POSITIVE = _number(float, 0.0, inclusive=False)  # learning rates, epochs
NON_NEGATIVE = _number(float, 0.0)  # weight decay, MixUp alpha
FRACTION = _number(float, 0.0, inclusive=False, maximum=1.0)


def _positive_or_auto(value: str) -> int | str:
    return value if value == "auto" else COUNT(value)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Model and data flags, shared by every command that reads a labelled dataset."""
    p.add_argument("--model", required=True, help="registry name, e.g. BiT-M-R50x1 (see `bit models`)")
    p.add_argument("--data", required=True,
                   help="digits | glyphs[:PER_CLASS] | fractals[:CLASSES] | cifar10[:ROOT] | cifar100[:ROOT] | "
                        "pets[:ROOT] | flowers102[:ROOT] | imagenet[:ROOT] | an image folder (class sub-folders, or "
                        "train/val/test of them) | a CSV manifest (path,label) | a shards folder (`bit shards`)")
    p.add_argument("--eval-data", help="evaluation data (default: the test, else val split of --data; 'none': no "
                                       "evaluation)")
    p.add_argument("--download", action="store_true", help="let torchvision download a standard dataset "
                                                           "(needs a network)")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that fine-tune (plan, finetune, fewshot): data, model and every HyperRule override."""
    add_data_arguments(p)
    g = p.add_argument_group("HyperRule overrides (default: the rule's value for this data)")
    g.add_argument("--variant", choices=("release", "paper"), help="release: authors' code (default); paper: "
                                                                   "448/384, decays at 30/60/90%%")
    g.add_argument("--steps", type=COUNT, help="total steps (warmup and decays scale along)")
    g.add_argument("--lr", type=POSITIVE, help="base learning rate (rule: 0.003)")
    g.add_argument("--batch", type=COUNT, help="global batch size (rule: 512), the same for any number of processes")
    g.add_argument("--batch-split", type=_positive_or_auto,
                   help="gradient accumulation: micro-batches per batch, or 'auto' (largest that fits in GPU memory)")
    g.add_argument("--resolution", type=COUNT, nargs=2, metavar=("RESIZE", "CROP"), help="resize and crop sides")
    g.add_argument("--mixup-alpha", type=NON_NEGATIVE, help="MixUp alpha (rule: 0.1 from 20k examples, else 0)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips (off already for digits)")
    g.add_argument("--no-crop", action="store_true", help="no random crop: resize straight to the crop size")
    g.add_argument("--examples-per-class", type=COUNT, metavar="K", help="few-shot: exactly K training examples "
                                                                        "per class")
    g.add_argument("--examples-per-class-seed", type=INDEX, metavar="S", help="seed of the few-shot draw (default 0)")
    g.add_argument("--seed", type=INDEX, help="seed of data order, augmentation and MixUp (default 0)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (default fp32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory layout (default: on a GPU where the step runs as CUDA graphs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """How a training run runs (not what it trains), shared by `bit finetune` and `bit pretrain`."""
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--workers", type=INDEX, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--eval-every", type=COUNT, metavar="STEPS", help="evaluate every STEPS steps (and at the end)")
    p.add_argument("--checkpoint-every", type=COUNT, metavar="STEPS",
                   help="write the resume checkpoint every STEPS steps (default: every 10 minutes)")
    p.add_argument("--in-memory", action="store_true", help="decode (or render) the training images once into RAM "
                                                            "(small sets, generated data)")
    p.add_argument("--log-every", type=COUNT, default=10, metavar="STEPS", help="metrics line every STEPS steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bit", description="Big Transfer (BiT): ResNet-v2 GN+WS models, checkpoints and the BiT-HyperRule.")
    parser.add_argument("--version", action="version", version=f"bigtransfer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models with parameters, GMACs and cache state",
                       description="List every registered BiT variant: parameters, GMACs at 128/224/480 px "
                                   "(counted, not typed in), upstream data, head size, default resolution, "
                                   "and whether its released checkpoint is in the cache ($BIT_HOME).")
    p.add_argument("pattern", nargs="?", help="only names matching this pattern (case-insensitive, * and ?); "
                                              "without one, the VTAB-1k runs are left out")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="describe a checkpoint file (format, architecture, parameters, head)",
                       description="Read a checkpoint in any supported format (detected from its content) "
                                   "and print its format, the architecture inferred from its shapes, "
                                   "parameter count and head size.")
    p.add_argument("checkpoint", help="path to a .npz, .safetensors, .pth/.pt/.bin checkpoint")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint between npz, timm, hf and our safetensors",
                       description="Convert a checkpoint between formats: the authors' npz, timm state dict, "
                                   "HF transformers BitForImageClassification, and ours (safetensors). "
                                   "The source format is detected from its content.")
    p.add_argument("src", help="checkpoint to read (any supported format)")
    p.add_argument("dst", help="file to write; an HF target without suffix is a directory "
                               "(model.safetensors + config.json)")
    p.add_argument("--to", choices=FORMATS,
                   help="target format (default: from DST's suffix: .npz npz, .pth/.pt/.bin timm, "
                        ".safetensors ours, no suffix hf)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="download released checkpoints into the cache",
                       description="Download released checkpoints into the cache ($BIT_HOME, default "
                                   "$XDG_CACHE_HOME/bigtransfer, else ~/.cache/bigtransfer). Resumes "
                                   "interrupted downloads; the base address can be replaced with "
                                   "$BIT_MODELS_URL (a mirror).")
    p.add_argument("names", nargs="+", metavar="NAME", help="registry names, see `bit models`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("plan", help="print the BiT-HyperRule plan for a dataset without training",
                       description="Resolve the BiT-HyperRule for a dataset (image size measured from the data, "
                                   "number of examples, few-shot sampling) and print the plan.")
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("finetune", help="fine-tune a BiT model on a dataset with the BiT-HyperRule",
                       description="Fine-tune with the BiT-HyperRule on CPU, one GPU, or many under torchrun "
                                   "(torchrun --nproc_per_node N -m bigtransfer finetune ...). The plan is printed "
                                   "and saved in the run folder with metrics.jsonl, checkpoints, final weights, "
                                   "eval.json, curves.png and a summary. Running the same command again resumes an "
                                   "interrupted run; SIGTERM/SIGINT write a checkpoint and stop.")
    add_plan_arguments(p)
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="CKPT",
                   help="start from the registry's released weights (flag alone) or from a checkpoint file")
    p.add_argument("--out", help="run folder (default: runs/MODEL_DATA[_kKsS]_seedN)")
    add_run_arguments(p)
    p.add_argument("--device-data", action="store_true", help="keep the training images on the GPU and "
                                                              "resize/crop/flip there in batch (small data sets)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("demo", help="the BiT story offline in minutes: glyph-pretrained vs. scratch on real digits",
                       description="Fine-tune the embedded glyph-pretrained BiT-R14x0.25 and the same network from "
                                   "random init with the (CPU-scaled) BiT-HyperRule on scikit-learn's handwritten "
                                   "digits at 1, 5 and 10 examples per class and on all training images; print the "
                                   "table (min <- median -> max over seeds) and write summary.json, report.md and "
                                   "accuracy.png. About 2 minutes on 2 CPU cores.")
    p.add_argument("--out", default="bit-demo", help="output folder (default bit-demo)")
    p.add_argument("--seeds", type=COUNT, default=3, help="few-shot draws per k (default 3)")
    p.add_argument("--shots", type=COUNT, nargs="+", default=[1, 5, 10], help="examples per class (default 1 5 10)")
    p.add_argument("--full", action="store_true", help="the rule's full budget (500 steps of 512) instead of the "
                                                       "CPU-scaled one: tens of minutes")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    for name, helptext in (("fewshot", "sweep examples per class x seeds with HyperRule fine-tuning"),
                           ("probe", "linear probe: frozen features + closed-form ridge classifier")):
        p = sub.add_parser(name, help=helptext, description=helptext + "; table + summary.json + report.md + "
                                                                     "accuracy.png in --out.")
        if name == "fewshot":
            add_plan_arguments(p)
        else:  # no network is trained: no HyperRule flags
            add_data_arguments(p)
            p.add_argument("--resolution", type=COUNT, metavar="SIDE",
                           help="input side of the features (default: the side a checkpoint file was trained at, "
                                "where it records it, else the registry's)")
        p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="CKPT",
                       help="released weights (flag alone) or a checkpoint file")
        p.add_argument("--shots", type=COUNT, nargs="+", default=[1, 5, 10], help="examples per class")
        p.add_argument("--seeds", type=COUNT, default=3, help="draws per k (default 3)")
        p.add_argument("--full", action="store_true", help="also all training data")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
        p.add_argument("--workers", type=INDEX, default=0, help="data-loading worker processes (default 0)")
        if name == "probe":
            p.add_argument("--l2", type=POSITIVE, default=2.0**10, help="ridge regularisation (default 1024)")
        p.set_defaults(func=cmd_fewshot if name == "fewshot" else cmd_probe)

    p = sub.add_parser("vtab", help="VTAB-1k protocol on task folders (1,000 examples, optional BiT-HyperParam)",
                       description="For every task folder under ROOT (train/ and test/ image folders, optional "
                                   "task.json with group/flip/crop): train on 1,000 examples with the HyperRule, or "
                                   "with --search N run N random trials on an 800/200 split first (lr, steps, "
                                   "MixUp, resolution) and retrain the best on all 1,000; table grouped natural / "
                                   "specialized / structured, results in --out.")
    p.add_argument("root", help="folder of task folders")
    p.add_argument("--model", required=True, help="registry name")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="CKPT",
                   help="released weights (flag alone) or a checkpoint file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", help="only these task folders")
    p.add_argument("--search", type=INDEX, default=0, metavar="N", help="random search trials per task (default 0)")
    p.add_argument("--seed", type=INDEX, default=0, help="seed of the 1,000 draw, the split and the trials")
    p.add_argument("--steps", type=COUNT, help="override the steps")
    p.add_argument("--batch", type=COUNT, help="override the batch")
    p.add_argument("--lr", type=POSITIVE, help="override the learning rate")
    p.add_argument("--batch-split", type=_positive_or_auto, help="micro-batches per batch, or 'auto'")
    p.add_argument("--resolution", type=COUNT, nargs=2, metavar=("RESIZE", "CROP"), help="override the resolution")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.set_defaults(func=cmd_vtab)

    for name, helptext in (("predict", "top-k classes of image files, as JSON"),
                           ("embed", "pre-logit features of image files to .npy or .safetensors"),
                           ("export", "export to ONNX or TorchScript with Weight Standardization folded in")):
        p = sub.add_parser(name, help=helptext, description=helptext + ". --model takes a checkpoint of any "
                           "supported format (a fine-tuning run's model.safetensors carries its class names) or a "
                           "registry name.")
        p.add_argument("--model", required=True, help="checkpoint file or registry name")
        p.add_argument("--resolution", type=COUNT, help="input side (default: the checkpoint's or registry's)")
        if name == "export":
            p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
            p.add_argument("--output", choices=("logits", "features"), default="logits",
                           help="what the exported model gives: logits (default) or the pre-logit features")
            p.add_argument("--out", required=True, help="output file")
        else:
            p.add_argument("images", nargs="+", help="image files, or folders to read recursively")
            p.add_argument("--batch", type=COUNT, default=32, help="batch size (default 32)")
            p.add_argument("--device", help="cpu (default), cuda")
            p.add_argument("--workers", type=INDEX, default=0, help="decoding worker processes (default 0)")
            p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                           help="autocast precision (default fp32; bf16 is faster on GPUs and on CPUs with "
                                "AVX512-BF16 or AMX; about 1%% relative error)")
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
            if name == "predict":
                p.add_argument("--top-k", type=COUNT, default=5, help="classes per image (default 5)")
            else:
                p.add_argument("--out", required=True, help="features.npy or features.safetensors")
        p.set_defaults(func={"predict": cmd_predict, "embed": cmd_embed, "export": cmd_export}[name])

    p = sub.add_parser("shards", help="write WebDataset tar shards from an image folder or CSV manifest",
                       description="Re-encode a dataset (image folder, CSV manifest with ';'-separated labels for "
                                   "multi-label data, or any spec `--data` takes: a standard dataset's training "
                                   "split, a split folder's train/) into WebDataset tar shards of JPEGs "
                                   "with a manifest.json (classes, counts, sha256 per shard), for streaming "
                                   "upstream training. Unreadable images are reported and left out.")
    p.add_argument("src", help="image folder, CSV manifest (path,label), or any --data spec (digits, "
                                "cifar10:ROOT, ...)")
    p.add_argument("out", help="folder for shard-NNNNNN.tar and manifest.json")
    p.add_argument("--shard-size", type=COUNT, default=1000, help="images per shard (default 1000)")
    p.add_argument("--max-side", type=COUNT, default=512, help="shrink images whose longest side is larger "
                                                             "(default 512)")
    p.add_argument("--quality", type=_number(int, 1, maximum=100), default=90, help="JPEG quality, 1-100 (default 90)")
    p.add_argument("--workers", type=COUNT, default=1, help="encoding processes (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("pretrain", help="BiT upstream pre-training (the paper's recipe) on shards or image folders",
                       description="Upstream pre-training with the BiT recipe: SGD momentum 0.9, lr 0.03 x batch/256, "
                                   "warmup, weight decay 1e-4, x0.1 at epochs 30/60/80 of 90 (or --recipe bit-l), "
                                   "Inception crop + flip; softmax or, for multi-label data, sigmoid loss with head "
                                   "bias -10. Runs under torchrun for many GPUs/nodes; the same command resumes.")
    p.add_argument("--model", required=True, help="registry name (see `bit models`)")
    p.add_argument("--data", required=True, help="shards folder from `bit shards`, or any --data spec of finetune")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--eval-data", help="held-out data: top-1 (mAP for multi-label) during training")
    p.add_argument("--probe-data", help="downstream data for a few-shot linear probe during training, e.g. digits")
    p.add_argument("--probe-shots", type=COUNT, default=10, help="examples per class of the probe (default 10)")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue pre-training from released weights (flag alone) or a checkpoint file")
    g = p.add_argument_group("recipe overrides (default: the paper's)")
    g.add_argument("--recipe", choices=("bit", "bit-l"), default="bit", help="bit: 90 epochs, decays 30/60/80; "
                                                                            "bit-l: 40 epochs, 10/23/30/37")
    g.add_argument("--epochs", type=POSITIVE, help="training epochs (the decay epochs scale along unless given)")
    g.add_argument("--decay-epochs", type=POSITIVE, nargs="+", help="epochs after which the lr drops x0.1")
    g.add_argument("--batch", type=COUNT, help="global batch (default 4096)")
    g.add_argument("--lr", type=POSITIVE, help="base learning rate (default 0.03 x batch / 256)")
    g.add_argument("--warmup-steps", type=INDEX, help="linear warmup steps (default min(5000, first decay step))")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, help="on conv kernels and head weights (default 1e-4)")
    g.add_argument("--resolution", type=COUNT, help="crop side (default 224)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips (text, digits)")
    g.add_argument("--min-crop-area", type=FRACTION,
                   help="smallest Inception crop, fraction of the area (default 0.08)")
    g.add_argument("--batch-split", type=_positive_or_auto, help="micro-batches per batch, or 'auto'")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory layout (default: on a GPU where the step runs as CUDA graphs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute units in the backward pass")
    g.add_argument("--seed", type=INDEX, help="seed (default 0)")
    add_run_arguments(p)
    p.add_argument("--sample-log", action="store_true", help="record which samples every step saw "
                                                            "(samples.rankN.jsonl)")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        code = args.func(args)
    except TrainingInterrupted as e:  # any training command, sweeps too; under torchrun all stopped at one step
        print(f"bit {args.command}: {e}", file=sys.stderr)
        code = 128 + e.signum
    except (CheckpointError, DownloadError, FloatingPointError, ImportError, KeyError, OSError, ValueError) as e:
        if args.verbose:  # the traceback too
            raise
        print(f"bit {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bit {args.command}: interrupted", file=sys.stderr)
        return 130
    # under torchrun every process got here: leave the process group together (left to the interpreter's exit,
    # gloo now and then aborts a finished process, and torchrun reports the whole run as failed)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


def _message(e: Exception) -> str:
    """The message alone (a KeyError's str() would quote it; other errors' first argument need not be their
    message: a UnicodeDecodeError's is the codec); an OS error as "PATH: what went wrong"."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


if __name__ == "__main__":
    sys.exit(main())
