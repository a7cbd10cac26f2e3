"""Run `python -m bigtransfer ...` (or torchrun) as a real process, the way users run it."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def bit_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200", "OMP_NUM_THREADS": "1", **extra}


def bit_command(*args) -> list[str]:
    return [sys.executable, "-m", "bigtransfer", *map(str, args)]


def bit(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(bit_command(*args), capture_output=True, text=True, env=bit_env(**(env or {})),
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
