"""VTAB-1k split logic and BiT-HyperParam bookkeeping on two tiny generated tasks."""

import json

import pytest

from bigtransfer.protocols import markdown_table, summarize
from bigtransfer.vtab import draw_trials, group_means, run_vtab, split_train, task_settings
from images import make_image_folder


def test_split_of_the_thousand():
    chosen, train, val = split_train(1200, seed=3)
    assert len(chosen) == 1000 and len(set(chosen)) == 1000 and max(chosen) < 1200
    assert len(train) == 800 and len(val) == 200 and sorted(train + val) == chosen
    assert split_train(1200, seed=3) == (chosen, train, val) and split_train(1200, seed=4)[0] != chosen
    assert split_train(1000, seed=0)[0] == list(range(1000))


def test_trials_and_task_settings(tmp_path):
    assert draw_trials(5, seed=1) == draw_trials(5, seed=1) and draw_trials(5, seed=1) != draw_trials(5, seed=2)
    trials = draw_trials(20, 0)
    assert all(t["base_lr"] in (0.001, 0.003, 0.01, 0.03) and t["steps"] in (500, 1000, 2500) for t in trials)
    assert len({json.dumps(t) for t in trials}) == 20  # no trial repeats another
    with pytest.raises(ValueError, match="49 trials asked of a search space of 48 points"):
        draw_trials(49, 0)
    assert task_settings(tmp_path / "dsprites_orientation") == {"group": "structured", "flip": False, "crop": True}
    assert task_settings(tmp_path / "clevr_count")["crop"] is False
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "task.json").write_text('{"group": "specialized", "flip": false}')
    assert task_settings(tmp_path / "mine") == {"group": "specialized", "flip": False, "crop": True}
    assert task_settings(tmp_path / "dsprites_ori") == task_settings(tmp_path / "dsprites_orientation")
    assert task_settings(tmp_path / "oxford_iiit_pet") == {"group": "natural", "flip": True, "crop": True}
    # the names of the authors' fine-tuned release; x positions are neither flipped nor cropped
    assert task_settings(tmp_path / "smallnorb-azimuth") == task_settings(tmp_path / "smallnorb_azimuth")
    assert task_settings(tmp_path / "dsprites-xpos") == {"group": "structured", "flip": False, "crop": False}
    (tmp_path / "mine" / "task.json").write_text('{"group": "Natural", "flip": "false"}')
    with pytest.raises(ValueError, match=r"task.json: group: 'Natural', flip: 'false' \(expected"):
        task_settings(tmp_path / "mine")


def test_search_then_retrain_on_two_tasks(tmp_path, monkeypatch):
    """One task folder is called pets, as VTAB's is (a torchvision dataset's name); the root is given relative."""
    for name, seed in (("pets", 0), ("shapes", 1)):
        make_image_folder(tmp_path / "tasks" / name / "train", classes=3, per_class=14, size=24, seed=seed)
        make_image_folder(tmp_path / "tasks" / name / "test", classes=3, per_class=4, size=24, seed=seed + 9)
    (tmp_path / "tasks" / "shapes" / "task.json").write_text('{"group": "structured", "crop": false}')
    space = {"base_lr": (0.01, 0.05), "steps": (4, 6), "mixup_alpha": (0.0,), "resolution": ((28, 24),)}
    monkeypatch.chdir(tmp_path / "tasks")
    results = run_vtab("BiT-R14x0.25", ".", tmp_path / "out", search=2, seed=0, space=space,
                       train_examples=40, search_train=32, batch_size=8)
    assert [r["task"] for r in results] == ["pets", "shapes"]
    for r in results:
        assert r["train_examples"] == 40 and r["test_examples"] == 12 and len(r["search_trials"]) == 2
        best = max(r["search_trials"], key=lambda t: t["val_accuracy"])
        assert r["best_params"] == best["params"]
        plan = json.loads((tmp_path / "out" / r["task"] / "final" / "config.json").read_text())["plan"]
        assert plan["steps"] == best["params"]["steps"] and plan["n_examples"] == 40
        trial = json.loads((tmp_path / "out" / r["task"] / "trial00" / "config.json").read_text())["plan"]
        assert trial["n_examples"] == 32  # and it is scored on the other 8 of the 40 (the search's validation part)
        assert json.loads((tmp_path / "out" / r["task"] / "trial00" / "eval.json").read_text())["examples"] == 8
    assert results[1]["group"] == "structured" and results[1]["crop"] is False
    final_plan = json.loads((tmp_path / "out" / "shapes" / "final" / "config.json").read_text())["plan"]
    assert final_plan["random_crop"] is False
    saved = json.loads((tmp_path / "out" / "vtab.json").read_text())
    assert saved["groups"]["mean"] == pytest.approx((results[0]["test_accuracy"] + results[1]["test_accuracy"]) / 2)
    assert set(group_means(results)) == {"natural", "structured", "mean"}
    with pytest.raises(FileNotFoundError, match=r"train/ and test/ for nosuch \(found: pets, shapes"):
        run_vtab("BiT-R14x0.25", ".", tmp_path / "typo", tasks=["pets", "nosuch"])
    assert not (tmp_path / "typo").exists()


def test_summary_and_markdown_table():
    rows = [{"init": "pretrained", "examples_per_class": 1, "seed": s, "accuracy": a}
            for s, a in enumerate((0.5, 0.7, 0.6))] + [{"init": "pretrained", "examples_per_class": None,
                                                        "seed": 0, "accuracy": 0.9}]
    (one, full) = summarize(rows)
    assert (one["min"], one["median"], one["max"], one["seeds"]) == (0.5, 0.6, 0.7, 3)
    assert "| pretrained | 50.0 <- 60.0 -> 70.0 | 90.0 |" in markdown_table(rows)
