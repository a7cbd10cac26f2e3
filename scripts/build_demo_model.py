"""Rebuild the embedded default model, BiT-R14x0.25-glyphs, and record how it was made.

    python scripts/build_demo_model.py            # about 7-10 minutes on 2 CPU cores

Runs the recorded `bit pretrain` command on generated glyphs from scratch (an earlier run in runs/ is
deleted first, so that the weights are always rebuilt), copies the final weights into
src/bigtransfer/weights/ and writes the provenance next to them: the command, seed, data version,
font checksums and library versions (same versions -> same images -> same weights on CPU).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "BiT-R14x0.25-glyphs"
COMMAND = ("bit pretrain --model BiT-R14x0.25 --data glyphs:150 --in-memory --out {out} --batch 128 --epochs 2.5 "
           "--decay-epochs 1.4 2.0 2.35 --warmup-steps 100 --lr 0.1 --weight-decay 5e-5 --resolution 32 --no-flip "
           "--min-crop-area 0.5 --workers 2 --probe-data digits --probe-shots 5 --eval-every 1000 --no-progress "
           "--seed 0")


def main() -> None:
    import matplotlib
    import numpy
    import PIL
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from bigtransfer.data.synthetic import GLYPHS_VERSION, font_paths, glyph_table

    out = ROOT / "runs" / NAME
    shutil.rmtree(out, ignore_errors=True)
    command = COMMAND.format(out=out.relative_to(ROOT))
    subprocess.run([sys.executable, "-m", "bigtransfer", *shlex.split(command)[1:]], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    weights = ROOT / "src" / "bigtransfer" / "weights"
    weights.mkdir(exist_ok=True)
    shutil.copy(out / "model.safetensors", weights / f"{NAME}.safetensors")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    provenance = {
        "model": NAME,
        "command": command,
        "seed": 0,
        "data": {"source": "glyphs", "version": GLYPHS_VERSION, "classes": len(glyph_table()[0]),
                 "per_class": 150,
                 "fonts": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in font_paths()}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                     "pillow": PIL.__version__, "matplotlib": matplotlib.__version__},
        "machine": f"{platform.machine()}, 2 CPU threads",
        "final_loss": next(m["loss"] for m in reversed(metrics) if "loss" in m),
        "digits_probe_5shot": [m["eval"] for m in metrics if "eval" in m],
        "sha256": hashlib.sha256((weights / f"{NAME}.safetensors").read_bytes()).hexdigest(),
    }
    (weights / f"{NAME}.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(json.dumps(provenance, indent=1))


if __name__ == "__main__":
    main()
