"""VTAB-1k (Zhai et al. 2019) as the BiT paper runs it, on task folders the user has on disk.

A task folder holds ``train/`` and ``test/`` image folders (class sub-folders) and optionally a
``task.json`` (``{"group": "natural" | "specialized" | "structured", "flip": bool, "crop": bool}``);
the 19 VTAB task names (and the folder names of the common VTAB-1k copy, `ALIASES`) get their group and
flip/crop switches from `KNOWN_TASKS`. Each task trains
on 1,000 examples (drawn with the seed when ``train/`` has more). By default the BiT-HyperRule is
used as is; ``search=N`` runs "BiT-HyperParam": N random trials over lr, steps, MixUp and resolution
on an 800/200 split of the 1,000, then retrains the best on all 1,000 and tests it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from .checkpoints.formats import atomic_path
from .data import open_dataset
from .finetuning import finetune

log = logging.getLogger("bigtransfer")
TRAIN_EXAMPLES, SEARCH_TRAIN = 1000, 800
GROUPS = ("natural", "specialized", "structured")
NO_FLIP = {"dsprites_orientation", "dsprites_location", "smallnorb_azimuth", "svhn"}
NO_CROP = {"clevr_count", "clevr_distance", "dmlab", "kitti_distance", "dsprites_location"}  # a crop moves x
KNOWN_TASKS = {
    **{t: "natural" for t in ("caltech101", "cifar100", "dtd", "flowers102", "pets", "sun397", "svhn")},
    **{t: "specialized" for t in ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")},
    **{t: "structured" for t in ("clevr_count", "clevr_distance", "dmlab", "kitti_distance", "dsprites_location",
                                 "dsprites_orientation", "smallnorb_azimuth", "smallnorb_elevation")},
}
ALIASES = {  # the folder names of the VTAB-1k copy most papers since VPT use, and of the authors' release
    "cifar": "cifar100", "oxford_flowers102": "flowers102", "oxford_iiit_pet": "pets", "clevr_dist": "clevr_distance",
    "dsprites_loc": "dsprites_location", "dsprites_xpos": "dsprites_location", "dsprites_ori": "dsprites_orientation",
    "kitti": "kitti_distance", "smallnorb_azi": "smallnorb_azimuth", "smallnorb_ele": "smallnorb_elevation",
}
SEARCH_SPACE = {  # BiT-HyperParam's axes
    "base_lr": (0.001, 0.003, 0.01, 0.03),
    "steps": (500, 1000, 2500),
    "mixup_alpha": (0.0, 0.1),
    "resolution": ((160, 128), (448, 384)),
}


def task_settings(folder: Path) -> dict:
    """Group and augmentation switches: task.json, else the VTAB task table (by name or alias), else no group
    and flips and crops on."""
    name = folder.name.replace("-", "_")  # the release spells clevr-count, smallnorb-azimuth...
    name = ALIASES.get(name, name)
    settings = {"group": KNOWN_TASKS.get(name), "flip": name not in NO_FLIP, "crop": name not in NO_CROP}
    path = folder / "task.json"
    if not path.is_file():
        if name not in KNOWN_TASKS:
            log.warning("%s: not a VTAB task name and no task.json: no group, flips and crops on", folder.name)
        return settings
    try:
        given = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    types = {"group": lambda v: v is None or v in GROUPS, "flip": lambda v: isinstance(v, bool),
             "crop": lambda v: isinstance(v, bool)}
    wrong = [f"{k}: {v!r}" for k, v in given.items() if k not in types or not types[k](v)] if isinstance(
        given, dict) else [repr(given)]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)} (expected an object with group one of {', '.join(GROUPS)} "
                         "or null, flip and crop true or false)")
    return settings | given


def split_train(n: int, seed: int, train_examples: int = TRAIN_EXAMPLES,
                search_train: int = SEARCH_TRAIN) -> tuple[list[int], list[int], list[int]]:
    """(the 1,000, their first 800 for search training, the other 200 for search validation)."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(n, size=train_examples, replace=False).tolist()) if n > train_examples else list(
        range(n))
    order = rng.permutation(len(chosen))
    cut = round(len(chosen) * search_train / train_examples)
    return chosen, sorted(chosen[i] for i in order[:cut]), sorted(chosen[i] for i in order[cut:])


def draw_trials(n: int, seed: int, space: dict | None = None) -> list[dict]:
    """N distinct random points of the search space, reproducible from the seed: a point drawn again is drawn
    anew (it would only fine-tune the same model again); the others are those earlier versions drew."""
    space = space or SEARCH_SPACE
    points = math.prod(len(values) for values in space.values())
    if n > points:
        raise ValueError(f"{n} trials asked of a search space of {points} points")
    rng = np.random.default_rng([seed, 1])
    trials: list[dict] = []
    while len(trials) < n:
        trial = {k: values[int(rng.integers(len(values)))] for k, values in space.items()}
        if trial not in trials:
            trials.append(trial)
    return trials


def run_task(model: str, folder: str | os.PathLike, out: str | os.PathLike, *, pretrained=False, search: int = 0,
             seed: int = 0, space: dict | None = None, train_examples: int = TRAIN_EXAMPLES,
             search_train: int = SEARCH_TRAIN, device: str | None = None, **overrides) -> dict:
    """One task: optional search on 800/200, then train on the 1,000 and test. Every run has its own
    folder under `out`, so an interrupted task resumes where it stopped; the bookkeeping goes to
    OUT/result.json."""
    folder, out = Path(folder), Path(out)
    settings = task_settings(folder)
    task = str(folder.resolve())  # a path, never a dataset name: a task folder may be called pets or cifar100
    train_all, test = open_dataset(task, "train"), open_dataset(task, "test")
    if len(train_all) < train_examples:
        log.warning("%s: train/ holds %d images, fewer than VTAB-1k's %d: all are used", folder.name,
                    len(train_all), train_examples)
    chosen, search_train_idx, search_val_idx = split_train(len(train_all), seed, train_examples, search_train)
    aug = {"flip": settings["flip"] and train_all.flip, "random_crop": settings["crop"]}
    common = dict(pretrained=pretrained, device=device, seed=seed, progress=False, **aug)
    trials = []
    best = {}
    if search:
        for i, params in enumerate(draw_trials(search, seed, space)):
            r = finetune(model, train_all.subset(search_train_idx), train_all.subset(search_val_idx),
                         out=out / f"trial{i:02d}", **common, **(overrides | params))
            trials.append({"trial": i, "params": params, "val_accuracy": r["top1"]})
            log.info("%s trial %d %s: val %.2f%%", folder.name, i, params, 100 * trials[-1]["val_accuracy"])
        best = max(trials, key=lambda t: t["val_accuracy"])["params"]
    final = finetune(model, train_all.subset(chosen), test, out=out / "final", **common, **(overrides | best))
    result = {"task": folder.name, **settings, "train_examples": len(chosen), "search_trials": trials,
              "best_params": best, "test_accuracy": final["top1"], "test_examples": final["eval"]["examples"]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=list) + "\n")
    return result


def run_vtab(model: str, root: str | os.PathLike, out: str | os.PathLike, tasks: Sequence[str] | None = None,
             **kwargs) -> list[dict]:
    """Every task folder under `root` (or the named ones), then the grouped table in OUT/vtab.json."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"VTAB folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
    names = tasks or found
    if not names:
        raise FileNotFoundError(f"{root}: no task folders with train/ and test/ inside")
    missing = [name for name in names if name not in found]
    if missing:  # before the first task trains, not after
        raise FileNotFoundError(f"{root}: no task folder with train/ and test/ for {', '.join(missing)} (found: "
                                f"{', '.join(found) or 'none'})")
    results = [run_task(model, root / name, Path(out) / name, **kwargs) for name in names]
    with atomic_path(Path(out) / "vtab.json") as tmp:
        tmp.write_text(json.dumps({"tasks": results, "groups": group_means(results)}, indent=1, default=list))
    return results


def group_means(results: Sequence[dict]) -> dict[str, float]:
    """Mean test accuracy per group (tagged tasks only) and over all tasks, as VTAB reports."""
    means = {}
    for group in GROUPS:
        accs = [r["test_accuracy"] for r in results if r.get("group") == group]
        if accs:
            means[group] = statistics.mean(accs)
    means["mean"] = statistics.mean(r["test_accuracy"] for r in results)
    return means


def vtab_table(results: Sequence[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("group", "task", "top-1 %", "trials", "best params"):
        table.add_column(col)
    order = {g: i for i, g in enumerate(GROUPS)}
    for r in sorted(results, key=lambda r: (order.get(r.get("group"), 9), r["task"])):
        table.add_row(r.get("group") or "-", r["task"], f"{100 * r['test_accuracy']:.1f}", str(len(r["search_trials"])),
                      json.dumps(r["best_params"], default=list) if r["best_params"] else "HyperRule")
    for group, mean in group_means(results).items():
        table.add_row(f"[bold]{group}[/bold]", "mean", f"[bold]{100 * mean:.1f}[/bold]", "", "")
    return table

