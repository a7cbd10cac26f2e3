"""The run directory: everything a training run leaves behind, written so that nothing is lost.

    config.json        the resolved plan (written before training starts)
    metrics.jsonl      one JSON line per logged step and per evaluation
    checkpoint.pt      resume state (model, optimiser, step), written atomically
    model.safetensors  final weights
    eval.json          final evaluation (top-1, top-5; per-class accuracy and confusion matrix up to 1,000 classes)
    curves.png         loss / learning rate / accuracy against steps
    summary.json/.md   the outcome in short
    log.txt            the log
    .lock              held by the process training into the folder (`RunDir` as a context manager)
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch import nn

from .checkpoints.formats import atomic_path, remove_stale_temporaries
from .data.sources import LabelledImages

log = logging.getLogger("bigtransfer")


# plan fields a resumed run may change: the overrides' bookkeeping, and the micro-batching (the same update)
SAME_UPDATE = ("overridden", "batch_split")


def starting_weights(model_or_name: nn.Module | str, pretrained: bool | str | os.PathLike = False) -> str:
    """What a run starts from, as config.json records it: "random", "registry" (the model's released
    checkpoint), a checkpoint's absolute path, or a model passed in from Python; so that a run started from other
    weights is never resumed, nor its results returned. A model passed in is not told apart from another one:
    fine-tuning trains it in place, so the same model holds other weights at every call."""
    if isinstance(model_or_name, nn.Module):
        return MODEL_PASSED_IN
    if pretrained is False:
        return "random"
    return "registry" if pretrained is True else str(Path(pretrained).resolve())


MODEL_PASSED_IN = "model passed in"


def held_out_data(*sources: LabelledImages | str | None) -> str:
    """How config.json names the data a run evaluates on (compared on a re-run, like the plan)."""
    names = [s if isinstance(s, str) else f"{s.name} ({len(s)} images)" for s in sources if s is not None]
    return "; ".join(names) or "none"


def labels_fingerprint(*sources: LabelledImages | None) -> str:
    """A digest of the sources' class names and of every item with its label (a file by its path), which a run
    folder compares on a re-run (config.json's "labels"): other data under the same name and size -- a Dataset
    passed in from Python, which is named by its type, or a folder whose images moved between classes -- is
    refused there, naming the difference, instead of getting the old run's results back or resuming it on other
    labels."""
    digest = hashlib.sha256()
    for source in (s for s in sources if s is not None):
        digest.update(json.dumps([str(c) for c in source.classes]).encode())
        for lo in range(0, len(source), 65536):  # a block at a time: one string of 14M items would take 2 GB
            block = range(lo, min(lo + 65536, len(source)))
            items = "".join(f"{source.describe(i)}\t{source.targets[i]}\n" for i in block)
            digest.update(items.encode("utf-8", "surrogateescape"))  # file names that are not UTF-8 as their bytes
        digest.update(b"|")
    return digest.hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a log we append to (none if it is not there); a last line cut short (a crash or a full
    disk while it was appended) is left out, since the step it logged is done again on resume."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from e
            log.warning("%s: its last line was cut short (%r); left out", path, line[:60])
    return records


def as_recorded(obj: object) -> object:
    """`obj` as config.json and summary.json hold it (lists for tuples...): a fresh run returns what a finished
    one reads back."""
    return json.loads(json.dumps(obj, default=str))


class RunDir:
    """Files of one run. With `writer=False` (DDP ranks other than 0) every write is skipped."""

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self._lock: FileLock | None = None
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> RunDir:
        """The folder claimed by this process (the main one under torchrun) until the block ends: a second
        command training into it would interleave its checkpoints and metrics with the first's. Refused at
        once, naming the folder; the lock (``.lock``, an flock) goes with the process, however it ends. Then
        what a killed process left half-written is removed (not before: it could be the other process's). A
        finished run in a folder where the lock cannot be made (read-only) is opened for reading only."""
        if self.writer:
            self._lock = FileLock(str(self / ".lock"), timeout=0)
            try:
                self._lock.acquire()
            except Timeout:
                raise ValueError(f"{self.path} is in use by another process training into it; wait for it to "
                                 "finish, or pass another output folder (--out)") from None
            except OSError as e:  # a read-only folder (an archive, another user's): a finished run is still read
                if not (self / "summary.json").exists():
                    raise PermissionError(f"{self.path}: cannot write here ({e.strerror or e}); pass another "
                                          "output folder (--out)") from e
                self._lock, self.writer = None, False
                return self
            remove_stale_temporaries(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: object) -> None:
        if self.writer:
            with atomic_path(self / name) as tmp:
                tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> object | None:
        p = self / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:  # written atomically by us: damaged since
            raise ValueError(f"{p}: damaged, not JSON ({e}); restore it or pass another output folder (--out)") from e

    def previous_results(self, settings: dict) -> dict | None:
        """For a folder that already holds a run: refuse other `settings` (config.json's "plan", "pretrained",
        "eval_data", and any other key given; naming what differs), return the saved results of a finished run,
        None for an interrupted one (the caller resumes it) or for one that stopped before its first checkpoint
        (it starts afresh)."""
        saved = self.read_json("config.json")
        if saved is None:
            held = [n for n in ("checkpoint.pt", "summary.json", "model.safetensors") if (self / n).exists()]
            if held:  # another command's results, or a run whose settings are lost: never resumed blindly
                raise ValueError(f"{self.path} holds {', '.join(held)} but no config.json, so no run this command "
                                 "can resume or return; pass another output folder (--out)")
            return None
        if not ((self / "checkpoint.pt").exists() or (self / "summary.json").exists()):
            return None
        now = as_recorded(settings["plan"])
        then = saved["plan"]
        changed = [k for k in sorted(now) if k not in SAME_UPDATE and then.get(k) != now[k]]
        old = {"False": "random", "True": "registry"}  # earlier versions recorded str(pretrained)
        then["pretrained"] = old.get(saved.get("pretrained"), saved.get("pretrained"))
        if then["pretrained"] == "random" and settings["pretrained"] == MODEL_PASSED_IN:
            then["pretrained"] = MODEL_PASSED_IN  # earlier versions recorded a model passed in as "random"
        for key in (k for k in settings if k != "plan"):
            if key != "pretrained":
                then[key] = saved.get(key, settings[key])  # eval_data, shards: not recorded by earlier versions
            now[key] = settings[key]
            if now[key] != then[key]:
                changed.append(key)
        if changed:
            diffs = "; ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(f"{self.path} holds a run with other settings ({diffs}); "
                             "pass another output folder (--out) to start a new run")
        summary = self.read_json("summary.json")
        if summary is not None:
            log.info("%s is already complete; its results are returned as they are", self.path)
        return summary

    def metrics(self) -> list[dict]:
        return read_jsonl(self / "metrics.jsonl")

    def append_metrics(self, record: dict) -> None:
        if self.writer:
            with open(self / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind_metrics(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
        if self.writer and (self / "metrics.jsonl").exists():
            kept = [r for r in self.metrics() if r["step"] <= step]
            with atomic_path(self / "metrics.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(self, state: dict) -> None:
        if self.writer:
            with atomic_path(self / "checkpoint.pt") as tmp:
                try:
                    torch.save(state, tmp)
                except RuntimeError as e:  # torch's writer reports a full disk as "[enforce fail ...]"
                    raise OSError(errno.EIO, f"could not be written ({str(e).splitlines()[0]})",
                                  str(self / "checkpoint.pt")) from e

    def load_checkpoint(self) -> dict | None:
        p = self / "checkpoint.pt"
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            why = (str(e).splitlines() or [""])[0][:200]
            raise ValueError(f"{p}: damaged, cannot be read ({type(e).__name__}: {why}); delete it to start this "
                             "run over, or pass another output folder (--out)") from e

    @contextlib.contextmanager
    def log_to_file(self) -> Iterator[None]:
        """log.txt gets the package's log while the block runs, and the error that stopped it, if one did (the
        terminal that showed it may be gone by the time anyone looks)."""
        if not self.writer:
            yield
            return
        # a file name that is not UTF-8 (surrogate escapes) is written escaped, not dropped with a traceback
        handler = logging.FileHandler(self / "log.txt", encoding="utf-8", errors="backslashreplace")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            yield
        except BaseException as e:  # to the file only: the terminal shows the error as the caller reports it
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped by %s: %s",
                                          (type(e).__name__, e), None))
            raise
        finally:
            log.removeHandler(handler)
            handler.close()

    def plot(self) -> Path | None:
        """Loss and learning rate per step, and evaluation accuracy, in one PNG."""
        if not self.writer:
            return None
        from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures stay as they were

        records = self.metrics()
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        fig = Figure(figsize=(13, 3.6))
        axes = fig.subplots(1, 3)
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
        axes[0].set(title="training loss", xlabel="step", yscale="log" if train else "linear")
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
        axes[1].set(title="learning rate", xlabel="step")
        names = sorted({k for r in evals for k, v in r["eval"].items() if isinstance(v, float)})
        for name in names:  # top1, top5, mAP, probe_Kshot: whatever the run evaluates, as a percentage
            pts = [(r["step"], 100 * r["eval"][name]) for r in evals if name in r["eval"]]
            axes[2].plot(*zip(*pts, strict=True), "o-", label=name)
        axes[2].set(title="evaluation (%)", xlabel="step")
        if evals:
            axes[2].legend()
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self / "curves.png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        # matplotlib's mathtext (the log axis' tick labels) leaves parse exceptions in reference cycles whose
        # frames link back to the caller's: the training loop's frame, with the model, the optimizer and the
        # DDP reducer that holds the process group, would outlive the run until some later collection, or
        # until the interpreter's exit, where gloo now and then aborts the finished process
        gc.collect()
        return self / "curves.png"
