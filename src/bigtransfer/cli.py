"""`bit`: the command line. Thin: parse arguments, call the public Python API, print the result."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import __version__
from .checkpoints import (
    FORMATS,
    CheckpointError,
    DownloadError,
    cached_path,
    download_pretrained,
    read_checkpoint,
    write_checkpoint,
)
from .models import get_model_spec, list_models

console = Console()

SUFFIX_FORMATS = {".npz": "npz", ".pth": "timm", ".pt": "timm", ".bin": "timm", ".safetensors": "safetensors"}


def cmd_models(args: argparse.Namespace) -> int:
    table = Table(title="BiT models (GMACs: one forward pass, convolutions + head)")
    for col in ("name", "params (M)", "GMACs 128", "GMACs 224", "GMACs 480", "upstream", "head", "res",
                "cached"):
        table.add_column(col, no_wrap=True,
                         justify="right" if col.startswith(("params", "GMACs", "head", "res")) else "left")
    for name in list_models():
        spec = get_model_spec(name)
        macs = [spec.arch.macs(r, spec.num_classes) / 1e9 for r in (128, 224, 480)]
        path = cached_path(spec)
        cached = "-" if path is None else ("yes" if path.exists() else "no")
        table.add_row(name, f"{spec.arch.num_params(spec.num_classes) / 1e6:.1f}", *(f"{m:.2f}" for m in macs),
                      spec.upstream or "(random init)", str(spec.num_classes), str(spec.resolution), cached)
    Console(width=max(console.width, 140)).print(table)  # a fixed 80 columns when piped would wrap it
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.checkpoint)
    same = [n for n in list_models() if get_model_spec(n).arch == ckpt.arch]
    table = Table(show_header=False, title=str(ckpt.path))
    rows = [("format", ckpt.format), ("architecture", f"BiT-{ckpt.arch.name}"),
            ("units per stage", str(list(ckpt.arch.depths))), ("width factor", f"{ckpt.arch.width:g}"),
            ("parameters", f"{ckpt.num_params:,}"), ("head size", str(ckpt.num_classes or "none")),
            ("registry names", ", ".join(same) or "(none)")]
    rows += [(f"metadata: {k}", v) for k, v in sorted(ckpt.metadata.items())]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    fmt = args.to or SUFFIX_FORMATS.get(dst.suffix) or ("hf" if not dst.suffix else None)
    if fmt is None:
        raise SystemExit(f"bit convert: cannot tell the format from {dst.name!r}; pass --to {{{','.join(FORMATS)}}}")
    ckpt = read_checkpoint(args.src)
    out = write_checkpoint(ckpt.state, ckpt.arch, dst, fmt)
    console.print(f"{ckpt.path} ({ckpt.format}, BiT-{ckpt.arch.name}) -> {out} ({fmt})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    for name in args.names:
        console.print(str(download_pretrained(name, progress=not args.quiet)))
    return 0


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
                                   "~/.cache/bigtransfer). Resumes interrupted downloads; the base address "
                                   "can be replaced with $BIT_MODELS_URL (a mirror).")
    p.add_argument("names", nargs="+", metavar="NAME", help="registry names, see `bit models`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (CheckpointError, DownloadError, KeyError) as e:
        print(f"bit {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)  # unwrapped, greppable
        return 2


if __name__ == "__main__":
    sys.exit(main())
