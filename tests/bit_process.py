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


def kill_after_checkpoint(args, out, min_step: int, max_step: int, timeout: float = 180) -> None:
    """Start `bit ARGS --out OUT` and SIGKILL it as soon as its resume checkpoint is at a step in
    [min_step, max_step): a crash mid-run, with nothing written after the checkpoint."""
    import signal
    import time
    from pathlib import Path

    import torch

    proc = subprocess.Popen(bit_command(*args, "--out", out), env=bit_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    ckpt = Path(out) / "checkpoint.pt"
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and min_step <= torch.load(ckpt, weights_only=True)["step"] < max_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
