"""Evaluation protocols of the paper: few-shot sweeps with HyperRule fine-tuning, linear probes, and
a results table / JSON / plot shared by `bit fewshot`, `bit probe` and `bit demo`.

A result row is ``{"init": str, "examples_per_class": int | None (all), "seed": int, "accuracy": float}``;
tables report min <- median -> max over seeds, as the authors' release does.
"""

from __future__ import annotations

import json
import os
import statistics
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rich.table import Table

from .checkpoints.formats import atomic_path
from .data import LabelledImages, sample_per_class
from .finetuning import finetune
from .models import get_model_spec


def few_shot_sweep(model: str, train: LabelledImages, test: LabelledImages, out: str | os.PathLike, *,
                   init: str | None = None, pretrained: bool | str | os.PathLike = False,
                   shots: Sequence[int | None] = (1, 5, 10, None), seeds: Sequence[int] = (0, 1, 2),
                   full_seeds: Sequence[int] | None = None, device: str | None = None,
                   on_run: Callable[[dict], None] | None = None, **overrides) -> list[dict]:
    """Fine-tune `model` for every (examples per class, seed) and evaluate on `test`. `None` in
    `shots` is the whole training set (run for `full_seeds`, default the first seed only). Every run
    keeps its own folder under `out`, so an interrupted sweep resumes run by run. `init` names the rows
    (default "pretrained" or "scratch", as `pretrained` says)."""
    if not isinstance(model, str):  # one module trained in place would carry each run into the next
        raise TypeError(f"few_shot_sweep takes a registry name (every run starts afresh from it), not a "
                        f"{type(model).__name__}; pass pretrained=CHECKPOINT for other starting weights")
    init = init or ("pretrained" if pretrained is not False else "scratch")
    get_model_spec(model)  # up front, not in the first run: an unknown name, a missing file, a k too large
    if pretrained not in (False, True) and not Path(pretrained).exists():
        raise FileNotFoundError(f"{pretrained}: no such checkpoint file")
    for k in shots:
        if k is not None:
            sample_per_class(train.targets, k, 0, train.classes)
    rows = []
    for k in shots:
        for seed in seeds if k is not None else (full_seeds or seeds[:1]):
            name = f"{init}_all_seed{seed}" if k is None else f"{init}_k{k}_seed{seed}"
            result = finetune(model, train, test, out=Path(out) / name, pretrained=pretrained, device=device,
                              progress=False, examples_per_class=k, examples_per_class_seed=seed, seed=seed,
                              **overrides)
            row = {"init": init, "examples_per_class": k, "seed": seed, "accuracy": result["top1"]}
            rows.append(row)
            if on_run is not None:
                on_run(row)
    return rows


def summarize(rows: Iterable[dict]) -> list[dict]:
    """min / median / max accuracy and seed count per (init, examples per class)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["examples_per_class"]), []).append(r["accuracy"])
    out = []
    for (init, k), accs in groups.items():
        out.append({"init": init, "examples_per_class": k, "min": min(accs), "median": statistics.median(accs),
                    "max": max(accs), "seeds": len(accs)})
    return out


def _shots(rows: Iterable[dict]) -> list[int | None]:
    ks = {r["examples_per_class"] for r in rows}
    return sorted(k for k in ks if k is not None) + ([None] if None in ks else [])


def shots_label(k: int | None) -> str:
    """How tables and progress lines name a number of examples per class (None: the whole training set)."""
    return "all" if k is None else f"{k}-shot"


def results_table(rows: Sequence[dict], title: str) -> Table:
    """Accuracy (%) as min <- median -> max over seeds; one row per init, one column per k."""
    stats = {(s["init"], s["examples_per_class"]): s for s in summarize(rows)}
    inits = list(dict.fromkeys(r["init"] for r in rows))
    table = Table(title=title)
    table.add_column("init")
    for k in _shots(rows):
        table.add_column(shots_label(k), justify="center")
    for init in inits:
        cells = []
        for k in _shots(rows):
            s = stats.get((init, k))
            cells.append("-" if s is None else _cell(s))
        table.add_row(init, *cells)
    return table


def _cell(s: dict) -> str:
    if s["seeds"] == 1:
        return f"{100 * s['median']:.1f}"
    return f"{100 * s['min']:.1f} <- {100 * s['median']:.1f} -> {100 * s['max']:.1f}"


def markdown_table(rows: Sequence[dict]) -> str:
    stats = {(s["init"], s["examples_per_class"]): s for s in summarize(rows)}
    shots = _shots(rows)
    lines = ["| init | " + " | ".join(shots_label(k) for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for init in dict.fromkeys(r["init"] for r in rows):
        cells = [_cell(stats[(init, k)]) if (init, k) in stats else "-" for k in shots]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_folder(out: str | os.PathLike, settings: dict | None = None) -> Path:
    """`out`, unless it holds a training run (its config.json), whose summary.json the results would replace,
    or the results of other `settings` (its sweep.json: model, data, starting weights, shots...), which a table
    of this sweep alone would silently replace. Checked before the work, and again by `write_results`, which
    records `settings` with the results: a command refused on the way (a k too large, a wrong checkpoint)
    leaves nothing that would refuse the corrected one."""
    out = Path(out)
    if (out / "config.json").exists():
        raise ValueError(f"{out} holds a training run (config.json); pass another output folder (--out)")
    if settings is None:
        return out
    now = json.loads(json.dumps(settings))
    path = out / "sweep.json"
    if path.exists():
        then = json.loads(path.read_text())
        changed = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        if changed:
            diffs = "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds the results of other settings ({diffs}); pass another output folder "
                             "(--out)")
    return out


def write_results(rows: Sequence[dict], out: str | os.PathLike, title: str, notes: Sequence[str] = (),
                  settings: dict | None = None) -> None:
    """summary.json, report.md and accuracy.png into `out`, and `settings` (sweep.json; see `results_folder`)."""
    out = results_folder(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        with atomic_path(out / "sweep.json") as tmp:
            tmp.write_text(json.dumps(settings, indent=1) + "\n")
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({"rows": list(rows), "summary": summarize(rows)}, indent=1) + "\n")
    report = [f"# {title}", "", "Top-1 accuracy (%), min <- median -> max over seeds.", "", markdown_table(rows), ""]
    report += [f"- {n}" for n in notes]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(report) + "\n")
    plot_accuracy(rows, out / "accuracy.png", title)


def plot_accuracy(rows: Sequence[dict], path: Path, title: str) -> None:
    """Median accuracy against examples per class, min-max band over seeds; 'all' at the right."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures stay as they were

    shots = _shots(rows)
    xs = list(range(len(shots)))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    stats = {(s["init"], s["examples_per_class"]): s for s in summarize(rows)}
    for init in dict.fromkeys(r["init"] for r in rows):
        pts = [(x, stats[(init, k)]) for x, k in zip(xs, shots, strict=True) if (init, k) in stats]
        ax.plot([x for x, _ in pts], [100 * s["median"] for _, s in pts], "o-", label=init)
        ax.fill_between([x for x, _ in pts], [100 * s["min"] for _, s in pts], [100 * s["max"] for _, s in pts],
                        alpha=0.2)
    ax.set_xticks(xs, [shots_label(k) for k in shots])
    ax.set(xlabel="training examples per class", ylabel="test accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize="medium")  # long titles are cut off otherwise
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
