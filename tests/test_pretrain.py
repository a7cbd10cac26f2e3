"""Upstream pre-training: shards, the epoch recipe in steps, losses, DDP over shards, kill and resume."""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import bigtransfer as bt
from bigtransfer.data import HyperRuleTransform, InceptionCropTransform, decode_image, open_dataset, to_model_input
from bigtransfer.data.shards import ShardImages, ShardStream, verify_shards, write_shards
from bigtransfer.data.sources import MissingSplit
from bigtransfer.pretraining import (
    HEAD_BIAS_SIGMOID,
    make_pretrain_plan,
    mean_average_precision,
    memory_plan,
    parameter_groups,
    pretrain,
    sigmoid_cross_entropy,
)
from bigtransfer.probe import linear_probe
from bigtransfer.runtime import Runtime
from bit_process import bit, bit_env, kill_after_checkpoint
from images import make_image_folder

TINY = "BiT-R14x0.25"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 generated images of 4 classes -> 4 shards of 16, through the real `bit shards` command."""
    root = tmp_path_factory.mktemp("pretrain")
    make_image_folder(root / "images", classes=4, per_class=16)
    bit("shards", root / "images", root / "shards", "--shard-size", "16", "--quiet")
    return root


def test_recipe_in_steps_for_ilsvrc():
    """BiT-S on ILSVRC-2012 (1,281,167 images), batch 4096: 312 steps per epoch."""
    plan = make_pretrain_plan("BiT-S-R50x1", "ilsvrc", 1_281_167, 1000, multi_label=False)
    assert plan.steps_per_epoch == 312 and plan.steps == 90 * 312
    assert plan.decay_steps == (30 * 312, 60 * 312, 80 * 312) and plan.warmup_steps == 5000
    assert plan.base_lr == pytest.approx(0.03 * 4096 / 256) and plan.weight_decay == 1e-4
    assert plan.loss == "softmax"
    m = make_pretrain_plan("BiT-M-R50x1", "in21k", 14_197_122, 21843, multi_label=True, recipe="bit",
                           batch_size=1024)
    assert m.steps_per_epoch == 13864 and m.base_lr == pytest.approx(0.12) and m.loss == "sigmoid"
    lrec = make_pretrain_plan("BiT-L", "jft", 300_000_000, 18291, multi_label=True, recipe="bit-l")
    assert lrec.steps == 40 * 73242 and lrec.decay_steps == tuple(e * 73242 for e in (10, 23, 30, 37))
    small = make_pretrain_plan(TINY, "x", 64, 4, False, epochs=10, batch_size=16)
    assert (small.steps, small.decay_steps) == (40, (13, 27, 36))  # decays at 30/60/80 of 90, scaled to 10
    assert small.warmup_steps == 13  # never past the first decay
    lr = [bt.hyperrule.learning_rate(s, plan.schedule, plan.base_lr) for s in (2500, 9360, 9361, 18721, 24961)]
    assert lr == pytest.approx([0.24, 0.48, 0.048, 0.0048, 0.00048])
    with pytest.raises(TypeError, match="unknown pre-training options: decay_steps, steps .steps follow from epochs"):
        make_pretrain_plan(TINY, "x", 64, 4, False, steps=7, decay_steps=(3,))  # were overwritten silently


def test_sigmoid_loss_and_head_bias_by_hand():
    logits = torch.full((2, 3), HEAD_BIAS_SIGMOID)  # what a zero-weight head with bias -10 outputs
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    expected = [softplus(10) + 2 * softplus(-10), 2 * softplus(10) + softplus(-10)]
    assert sigmoid_cross_entropy(logits, targets).tolist() == pytest.approx(expected, rel=1e-6)


def test_weight_decay_groups_and_memory_plan():
    model = bt.create_model(TINY, num_classes=4)
    decay, no_decay = parameter_groups(model, 1e-4)
    assert all(p.ndim == 4 for p in decay["params"][:-1]) and decay["params"][-1] is model.head.weight
    assert any(p is model.head.bias for p in no_decay["params"]) and decay["weight_decay"] == 1e-4
    plain = memory_plan(model, 8, 64, "fp32", checkpointing=False)
    ckpt = memory_plan(model, 8, 64, "fp32", checkpointing=True)
    assert plain["weights"] == 4 * plain["parameters"] == 4 * sum(p.numel() for p in model.parameters())
    assert 0 < ckpt["activations"] < plain["activations"]


def test_activation_checkpointing_gives_the_same_gradients():
    model = bt.create_model(TINY, num_classes=4, zero_head=False)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def test_shards_manifest_checksums_and_webdataset_interop(shards):
    manifest = json.loads((shards / "shards" / "manifest.json").read_text())
    assert manifest["total"] == 64 and [s["count"] for s in manifest["shards"]] == [16] * 4
    assert manifest["classes"] == ["class0", "class1", "class2", "class3"]
    verify_shards(shards / "shards")
    indexed = ShardImages(shards / "shards")
    assert len(indexed) == 64 and Counter(indexed.targets) == {0: 16, 1: 16, 2: 16, 3: 16}
    assert indexed[5][0].size == (40, 40)
    wds = pytest.importorskip("webdataset")  # the webdataset library reads our shards as they are
    samples = list(wds.WebDataset(str(shards / "shards" / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 16 and {"jpg", "cls"} <= set(samples[0])
    with pytest.raises(ValueError, match="single split"):
        open_dataset(str(shards / "shards"), "test")


def test_shard_index_files_give_what_the_tar_headers_give_and_only_for_the_shard_they_index(tmp_path, caplog):
    """`write_shards` indexes each shard into a file beside it; `ShardImages` reads the same places, keys and
    labels from it as from the tar headers (single- and multi-label), and reads the headers instead where the
    index is not of the shard as it is now: written again, cut short, or the index itself damaged."""
    make_image_folder(tmp_path / "img", classes=3, per_class=5)
    rows = [f"img/class{c}/{i:03d}.png,{f'c{c};both' if i % 2 else f'c{c}'}" for c in range(3) for i in range(5)]
    (tmp_path / "labels.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    for name, source in (("single", open_dataset(str(tmp_path / "img"), "all")),
                         ("multi", open_dataset(str(tmp_path / "labels.csv"), "all"))):
        folder = tmp_path / name
        manifest = write_shards(source, folder, shard_size=4, progress=False)
        assert [s["index"] for s in manifest["shards"]] == [f"shard-{k:06d}.index.npz" for k in range(4)]
        fast = ShardImages(folder)
        for s in manifest["shards"]:
            (folder / s["index"]).rename(folder / f"{s['index']}.away")
        with caplog.at_level("WARNING", logger="bigtransfer"):
            slow = ShardImages(folder)
        assert "4 of 4 shards have no index file that matches them" in caplog.text
        assert np.array_equal(fast.locations, slow.locations) and fast.keys == slow.keys
        assert fast.targets == slow.targets and sorted(fast.targets) == sorted(source.targets)
        assert [fast[i][0].tobytes() for i in (0, 14)] == [slow[i][0].tobytes() for i in (0, 14)]
        for s in manifest["shards"]:
            (folder / f"{s['index']}.away").rename(folder / s["index"])
    folder = tmp_path / "single"
    old_index = (folder / "shard-000001.index.npz").read_bytes()
    write_shards(open_dataset(str(tmp_path / "labels.csv"), "all").subset(range(15)[::-1]), folder, shard_size=4,
                 progress=False)  # the folder written again (other images in each shard), one index put back
    (folder / "shard-000001.index.npz").write_bytes(old_index)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bigtransfer"):
        again = ShardImages(folder)
    assert "1 of 4 shards have no index file that matches them (written before shards had one, or changed since; " \
           "first: shard-000001.tar)" in caplog.text
    shard = folder / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        assert again.targets[4:8] == [tuple(json.load(tar.extractfile(f"{k}.json"))["labels"])
                                      for k in again.keys[4:8]]
    listed = json.loads((folder / "manifest.json").read_text())
    listed["shards"][3]["sha256"] = "0" * 64  # the manifest of a shard written again at the same size
    (folder / "manifest.json").write_text(json.dumps(listed))
    caplog.clear()
    with caplog.at_level("WARNING", logger="bigtransfer"):
        assert ShardImages(folder).targets == again.targets and "2 of 4 shards" in caplog.text
    for damaged in (b"PK\x03\x04 not a zip", b""):  # a damaged index (or one left empty by a power cut): warned
        (folder / "shard-000002.index.npz").write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING", logger="bigtransfer"):
            assert ShardImages(folder).targets == again.targets and "shard-000002.index.npz: unreadable shard " \
                "index" in caplog.text
    shard.write_bytes(shard.read_bytes()[:3000])  # cut short: its index is not used, its headers are found cut
    with pytest.raises(ValueError, match="shard-000001.tar: unreadable shard"):
        ShardImages(folder)


@pytest.mark.parametrize("dies", ["before", "after"])
def test_a_rewrite_of_shards_killed_while_indexing_leaves_no_index_of_another_shard(tmp_path, monkeypatch, dies):
    """`bit shards` over a folder of shards, killed as it indexes a shard (before or after its index is
    written): the folder has no manifest until a writing completes, so it is refused, not read as a mix of the
    two writings (the same images relabelled give tars of the same size: an index could pass for the other's);
    what a complete writing then reads is what each tar holds."""
    import bigtransfer.data.shards as shards

    make_image_folder(tmp_path / "img", classes=3, per_class=4)
    rows = [f"img/class{c}/{i:03d}.png" for c in range(3) for i in range(4)]
    for name, labels in (("a.csv", "abc"), ("b.csv", "cba")):
        (tmp_path / name).write_text("path,label\n" + "".join(f"{r},{labels[int(r[9])]}\n" for r in rows))
    write_shards(open_dataset(str(tmp_path / "a.csv"), "all"), tmp_path / "sh", shard_size=6, progress=False)
    real = shards._write_index

    def killed(*args, **kwargs):
        if any(getattr(a, "name", a) == "shard-000001.tar" for a in args):
            if dies == "after":
                real(*args, **kwargs)
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        write_shards(open_dataset(str(tmp_path / "b.csv"), "all"), tmp_path / "sh", shard_size=6, progress=False)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no manifest.json; write shards with `bit shards"):
        ShardImages(tmp_path / "sh")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardStream(tmp_path / "sh", HyperRuleTransform(16, 16), 6)
    write_shards(open_dataset(str(tmp_path / "a.csv"), "all"), tmp_path / "sh", shard_size=6, progress=False)
    in_tars = [t for k in range(2) for t in shards._index_shard(tmp_path / "sh" / f"shard-00000{k}.tar", 6, False,
                                                                   3)[2]]
    assert ShardImages(tmp_path / "sh").targets == in_tars


def test_shards_of_a_standard_dataset_hold_its_training_split_and_keep_its_flip_rule(tmp_path):
    bit("shards", "digits", tmp_path / "digits", "--shard-size", "400", "--quiet")
    shards = ShardImages(tmp_path / "digits")
    assert len(shards) == 1000 and shards.flip is False  # digits' training split; a mirrored digit is no digit
    assert open_dataset(str(tmp_path / "digits"), "train").flip is False


def test_multi_label_csv_to_shards(tmp_path):
    make_image_folder(tmp_path / "img", classes=2, per_class=3)
    rows = ["path,label"] + [f"img/class{c}/{i:03d}.png,{'dog;cat' if i == 0 else f'c{c}'}"
                             for c in range(2) for i in range(3)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    source = open_dataset(str(tmp_path / "labels.csv"))
    assert source.multi_label and source.classes == ["c0", "c1", "cat", "dog"]
    write_shards(source, tmp_path / "shards", shard_size=4, progress=False)
    indexed = ShardImages(tmp_path / "shards")
    assert indexed.multi_label and sorted(indexed.targets) == sorted(source.targets)
    assert (2, 3) in indexed.targets
    with pytest.raises(ValueError, match="several labels per image; the HyperRule fine-tunes single-label"):
        bt.finetune(TINY, source, steps=1, progress=False)  # softmax on multi-hot targets made no sense


@pytest.mark.parametrize("world,workers", [(2, 1), (1, 2), (2, 2)])
def test_shard_stream_is_exact_per_epoch_and_resumable(shards, world, workers):
    """Every (process, worker) stream together covers each sample once per epoch; a stream restarted
    at step s yields exactly what the uninterrupted one yields from step s on."""
    tf = InceptionCropTransform(16)
    local = 8

    def keys(rank, worker, n):
        s = ShardStream(shards / "shards", tf, local, seed=3, rank=rank, world_size=world, workers=workers,
                        shuffle_buffer=5)
        return [k for k, _, _ in _take(s.raw_stream(worker), n)]

    epoch = [k for r in range(world) for w in range(workers) for k in keys(r, w, 64 // (world * workers))]
    assert sorted(epoch) == sorted(set(epoch)) and len(epoch) == 64  # each sample exactly once
    two = [k for r in range(world) for w in range(workers) for k in keys(r, w, 128 // (world * workers))]
    assert Counter(two) == {k: 2 for k in epoch}  # and again, reshuffled, in the second epoch
    assert two[:64 // (world * workers)] != two[64 // (world * workers):128 // (world * workers)]


    def batches(start, n):  # through a DataLoader with its worker processes, as training reads them
        stream = ShardStream(shards / "shards", tf, local, seed=3, rank=0, world_size=world, workers=workers,
                             start_step=start, shuffle_buffer=5)
        loader = torch.utils.data.DataLoader(stream, batch_size=local, num_workers=workers if workers > 1 else 0)
        return [list(keys) for _, (_, _, _, keys) in zip(range(n), loader, strict=False)]

    assert batches(3, 4) == batches(0, 7)[3:]  # restarted at step 3: the same batches from there on


def _take(it, n):
    return [x for _, x in zip(range(n), it, strict=False)]


def test_torchrun_two_processes_over_shards(shards, tmp_path):
    """2 processes x 8 images per step over 4 shards: loss falls, one checkpoint, each sample once per epoch."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "bigtransfer", "pretrain", "--model", TINY, "--data", str(shards / "shards"), "--out", str(run),
           "--epochs", "8", "--batch", "16", "--resolution", "32", "--lr", "0.05", "--checkpoint-every", "8",
           "--log-every", "1", "--sample-log", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bit_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # measured: 1.36 -> 0.58
    assert len(losses) == 32 and last_epoch < 0.7 * first_epoch
    assert sorted(p.name for p in run.glob("*.pt")) == ["checkpoint.pt"] and len(list(run.glob("*.tmp"))) == 0
    assert (run / "config.json").exists() and json.loads((run / "config.json").read_text())["world_size"] == 2
    seen = {}
    for rank in (0, 1):
        for line in (run / f"samples.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert len(rec["keys"]) == 8
            seen.setdefault(rec["step"] // 4, []).extend(rec["keys"])  # 4 steps of 16 = one epoch of 64
    assert len(seen) == 8
    for epoch, keys in seen.items():
        assert len(keys) == 64 and len(set(keys)) == 64, f"epoch {epoch}"


def test_a_resume_cuts_the_sample_log_before_the_steps_it_logs_again(tmp_path):
    from bigtransfer.pretraining import _rewind_sample_log

    lines = [json.dumps({"step": step, "keys": [f"s{step}a", f"s{step}b"]}) + "\n" for step in range(12)]
    lines[3] = json.dumps({"keys": ["odd"], "step": 3}) + "\n"  # another key order is parsed in full
    lines[5] += "\n"  # a blank line is passed over
    log = tmp_path / "samples.rank0.jsonl"
    log.write_text("".join(lines) + '{"step": 12, "keys": ["s1')  # the last line cut short by a crash
    _rewind_sample_log(log, 12)
    assert log.read_text() == "".join(lines)
    _rewind_sample_log(log, 7)
    assert log.read_text() == "".join(lines[:7])
    log.write_text(lines[0] + "not json\n" + lines[1])
    with pytest.raises(ValueError, match=r"samples.rank0.jsonl, line 2: not a record of this log"):
        _rewind_sample_log(log, 1)
    _rewind_sample_log(tmp_path / "none.jsonl", 3)  # no log yet: nothing to cut
    assert not (tmp_path / "none.jsonl").exists()


def test_killed_pretraining_resumes_to_the_same_weights(shards, tmp_path):
    args = ["pretrain", "--model", TINY, "--data", shards / "shards", "--epochs", "10", "--batch", "16",
            "--resolution", "48", "--lr", "0.05", "--checkpoint-every", "3", "--workers", "2", "--no-progress"]
    bit(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 5, 40)
    bit(*args, "--out", killed)
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pretrain_on_an_image_folder_with_eval_and_probe(tmp_path):
    make_image_folder(tmp_path / "images", classes=4, per_class=10)
    r = pretrain(TINY, str(tmp_path / "images"), str(tmp_path / "images"), out=tmp_path / "run",
                 probe_data="digits", probe_shots=2, epochs=4, batch_size=8, crop=32, progress=False)
    held_out = open_dataset(str(tmp_path / "images"), "eval")  # the folder's carved part, about a fifth
    assert r["eval"]["examples"] == len(held_out) < 40 and (tmp_path / "run" / "curves.png").exists()
    final, _, side = bt.load_model(tmp_path / "run" / "model.safetensors")  # the probe again, on the saved weights
    again = linear_probe(final, open_dataset("digits", "train"), open_dataset("digits", "test"), side, shots=(2,))
    assert side == 32 and r["eval"]["probe_2shot"] == again[0]["accuracy"]


def test_multi_label_pretraining_reports_map_and_starts_from_bias_minus_ten(tmp_path):
    make_image_folder(tmp_path / "img", classes=3, per_class=6)
    for name, kept in (("labels.csv", range(4)), ("held.csv", range(4, 6))):  # held-out data in a manifest
        rows = [f"img/class{c}/{i:03d}.png,{f'c{c};any' if i % 2 else f'c{c}'}" for c in range(3) for i in kept]
        (tmp_path / name).write_text("\n".join(["path,label"] + rows) + "\n")  # of its own
    r = pretrain(TINY, str(tmp_path / "labels.csv"), str(tmp_path / "held.csv"), out=tmp_path / "run", epochs=2,
                 batch_size=6, crop=32, progress=False)
    assert r["plan"]["loss"] == "sigmoid" and 0 < r["eval"]["mAP"] <= 1
    bias = load_file(str(tmp_path / "run" / "model.safetensors"))["head.bias"]
    assert bias.shape == (4,) and (bias < -9).all()  # four small steps barely move it from -10
    # its head scores each class on its own: predict gives sigmoid(logits), from both files the run wrote
    files = [tmp_path / "img" / "class1" / "001.png", tmp_path / "img" / "class2" / "004.png"]
    model, classes, side = bt.load_model(tmp_path / "run" / "model.safetensors")
    x = torch.stack([HyperRuleTransform(side, side, train=False)(decode_image(f), 0) for f in files])
    with torch.no_grad():
        scores = model(to_model_input(x)).sigmoid()
    for path in ("run/model.safetensors", "run/checkpoint.pt"):
        rows = bt.predict(bt.load_model(tmp_path / path)[0], files, classes, top_k=4, resolution=side)
        for row, expected in zip(rows, scores, strict=True):
            assert {e["label"]: e["probability"] for e in row["top"]} == pytest.approx(
                dict(zip(classes, expected.tolist(), strict=True)), rel=1e-5), path
    assert scores.sum(1).max() < 0.5  # not a distribution: a softmax would sum to 1
    trained = tmp_path / "run" / "model.safetensors"
    assert bt.create_model(TINY, pretrained=trained).multi_label  # its head, and how it scores
    assert not bt.create_model(TINY, num_classes=3, pretrained=trained).multi_label  # a new head
    # held-out data with one label per image (as ImageNet-21k's often is), and a start from a checkpoint whose
    # head has another size: the new head starts at -10 too
    (tmp_path / "single.csv").write_text("\n".join(["path,label"] + [f"img/class{c}/{i:03d}.png,c{c}"
                                                                     for c in range(3) for i in range(6)]) + "\n")
    bt.save_weights(bt.create_model(TINY, num_classes=7, zero_head=False), tmp_path / "upstream.safetensors")
    r = pretrain(TINY, str(tmp_path / "labels.csv"), str(tmp_path / "single.csv"), out=tmp_path / "run2",
                 pretrained=tmp_path / "upstream.safetensors", epochs=2, batch_size=6, crop=32, progress=False)
    assert 0 < r["eval"]["mAP"] <= 1
    assert (load_file(str(tmp_path / "run2" / "model.safetensors"))["head.bias"] < -9).all()


def test_average_precision_equals_scikit_learns_with_ties_and_in_blocks(monkeypatch):
    from sklearn.metrics import average_precision_score

    from bigtransfer.pretraining import average_precision

    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        n, k = 40 + 17 * trial, 3 + trial
        scores = torch.randint(0, 5 if trial % 2 else 10**6, (n, k), generator=g).float()  # many ties, or few
        targets = torch.rand(n, k, generator=g) < 0.2
        targets[:, 0] = False  # a class without a positive is left out, as in mAP
        present = targets.sum(0) > 0
        expected = average_precision_score(targets[:, present].numpy(), scores[:, present].numpy(), average="macro")
        for cells in (2**24, 2 * n):  # all classes at once, or two at a time
            monkeypatch.setattr("bigtransfer.pretraining._AP_CELLS", cells)
            assert average_precision(scores, targets, Runtime(torch.device("cpu"))) == pytest.approx(expected,
                                                                                                     abs=1e-12)


_SHARED_MAP = """
import json, sys, torch, torch.distributed as dist
import bigtransfer.pretraining as pretraining
from bigtransfer.runtime import Runtime
from sklearn.metrics import average_precision_score

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
runtime = Runtime(torch.device("cpu"), rank, world)
g = torch.Generator().manual_seed(0)
scores = torch.randint(0, 6, (23, 9), generator=g).float()  # many ties
targets = torch.rand(23, 9, generator=g) < 0.3
targets[:, 4] = False  # no positive: not counted
present = targets.sum(0) > 0
expected = average_precision_score(targets[:, present].numpy(), scores[:, present].numpy(), average="macro")
got = {}
for cells in (2**24, 2 * 23):  # all classes in one block, or blocks of 2 dealt out between the processes
    pretraining._AP_CELLS = cells
    shares = {"by turns": torch.arange(rank, 23, world), "all on rank 0": torch.arange(23 if rank == 0 else 0)}
    for name, mine in shares.items():
        got[f"{name}, {cells} cells"] = pretraining.average_precision(scores[mine], targets[mine], runtime)
with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump({"expected": expected, "got": got}, f)
dist.destroy_process_group()  # as `bit` does: left to the interpreter's exit, gloo's threads abort it now and then
"""


def test_held_out_map_over_two_processes_equals_scikit_learns(tmp_path):
    """Real torchrun, gloo: each process holds its share of the scores; the mAP is scikit-learn's over all of them,
    with ties, classes dealt out in blocks, and a process with no images."""
    (tmp_path / "shared_map.py").write_text(_SHARED_MAP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "shared_map.py"), str(tmp_path / "result")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bit_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert len(result["got"]) == 4 and 0 < result["expected"] < 1
        assert result["got"] == pytest.approx({k: result["expected"] for k in result["got"]}, abs=1e-12)


def test_held_out_map_that_cannot_fit_in_memory_is_refused_before_training(monkeypatch):
    from bigtransfer.pretraining import _check_map_fits

    _check_map_fits(1000, 21843)  # 100 MiB
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    images = memory // (10 * 21843) + 1  # scores and labels, twice while the batches are joined
    with pytest.raises(ValueError, match=f"held-out mAP over {images:,} images x 21,843 classes needs"):
        _check_map_fits(images, 21843)
    monkeypatch.setenv("WORLD_SIZE", "4")  # each of torchrun's processes holds its share: 2 of 4 here hold half
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _check_map_fits(images, 21843)
    with pytest.raises(ValueError, match=r"needs .* GiB of scores on this machine \(2 of 4 processes\)"):
        _check_map_fits(2 * images, 21843)


def test_mean_average_precision_by_hand():
    """Per class, AP is the mean over its positives of the precision at each positive's rank; mAP averages
    the classes that have a positive, over the images not reported bad."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    hot = torch.zeros(10, 4)
    hot[[0, 3, 5, 8], 0] = hot[[1, 2, 5, 9], 1] = hot[[4, 7], 2] = 1  # class 3 has no positive
    reports = ["", "", "", "bad.png: truncated", "", "", "", "", "", ""]  # a positive of class 0, left out
    loader = [(images[:6], hot[:6], reports[:6]), (images[6:], hot[6:], reports[6:])]
    graphs = []  # the scores keep no autograd graph (each would hold its batch's activations until the end)
    net.register_forward_hook(lambda module, inputs, output: graphs.append(output.requires_grad))
    got = mean_average_precision(net, loader, Runtime(torch.device("cpu")), "fp32", num_classes=4)
    assert mean_average_precision(net, [], Runtime(torch.device("cpu")), "fp32", num_classes=4) == 0.0  # no images
    assert graphs == [False, False]
    kept = [i for i, r in enumerate(reports) if not r]
    with torch.no_grad():
        scores, y = net(images[kept].float() / 127.5 - 1), hot[kept]
    per_class = []
    for c in range(3):
        hits = y[scores[:, c].argsort(descending=True), c]
        precision_at_rank = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        per_class.append(float((precision_at_rank * hits).sum() / hits.sum()))
    assert got == pytest.approx(sum(per_class) / 3, abs=1e-6) and net.training


def test_data_that_must_not_be_mirrored_is_not_mirrored_upstream_either(tmp_path):
    r = pretrain(TINY, "digits", out=tmp_path / "run", epochs=1, batch_size=200, crop=16, progress=False)
    assert r["plan"]["flip"] is False
    assert pretrain(TINY, "digits", out=tmp_path / "flipped", epochs=1, batch_size=200, crop=16, flip=True,
                    progress=False)["plan"]["flip"] is True


def test_shard_streams_of_unequal_length_move_through_epochs_in_step(tmp_path):
    """64 images in shards of 12 (five, and one of 4): two streams hold 36 and 28 samples in some epochs. Each
    epoch every stream yields the shortest one's count, so no sample comes twice within an epoch (the longer
    stream used to run on into the next epoch's shards while the shorter one was still in this one)."""
    make_image_folder(tmp_path / "images", classes=4, per_class=16)
    write_shards(open_dataset(str(tmp_path / "images"), "all"), tmp_path / "shards", shard_size=12, progress=False)
    for world, workers in ((2, 1), (1, 3)):
        streams = [ShardStream(tmp_path / "shards", InceptionCropTransform(16), 4, seed=1, rank=r, world_size=world,
                               workers=workers) for r in range(world) for _ in range(workers)]
        workers_of = [w for _ in range(world) for w in range(workers)]
        n = world * workers
        lengths = [streams[0].epoch_length(e) for e in range(4)]
        assert all(s.epoch_length(e) == lengths[e] for s in streams for e in range(4))
        assert 64 - 12 * (n - 1) <= n * min(lengths) and max(lengths) <= 64 // n  # at most n - 1 shards left out
        taken = [[k for k, _, _ in _take(s.raw_stream(w), sum(lengths))] for s, w in zip(streams, workers_of,
                                                                                         strict=True)]
        start = 0
        for length in lengths:
            epoch = [k for keys in taken for k in keys[start:start + length]]
            assert len(epoch) == len(set(epoch)) == n * length
            start += length
    first = ShardImages(tmp_path / "shards")
    assert len({first.targets[i] for i in range(12)}) > 1  # `bit shards` mixes the classes in every shard
    with pytest.raises(ValueError, match="holds no images to write"):
        write_shards(first.subset([]), tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="--in-memory: .*shards holds shards, which are streamed"):
        pretrain(TINY, str(tmp_path / "shards"), out=tmp_path / "never", in_memory=True, progress=False)
    assert not (tmp_path / "never").exists()
    shard = tmp_path / "shards" / "shard-000002.tar"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:5000])  # truncated: the error names the shard
    stream = ShardStream(tmp_path / "shards", InceptionCropTransform(16), 4, seed=1)
    with pytest.raises(ValueError, match="shard-000002.tar: unreadable shard"):
        _take(stream.raw_stream(0), 64)
    with pytest.raises(ValueError, match="shard-000002.tar: unreadable shard"):
        ShardImages(tmp_path / "shards")
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(intact)) as tar, tarfile.open(shard, "w") as cut:
        for info in tar.getmembers()[:10]:  # a valid tar of 5 samples, not 12: tar itself sees nothing wrong
            cut.addfile(info, tar.extractfile(info))
    with pytest.raises(ValueError, match=r"shard-000002.tar: unreadable shard \(5 samples, the manifest says 12\)"):
        _take(ShardStream(tmp_path / "shards", InceptionCropTransform(16), 4, seed=1).raw_stream(0), 64)
    with pytest.raises(ValueError, match=r"shard-000002.tar: unreadable shard \(5 images, the manifest says 12\)"):
        ShardImages(tmp_path / "shards")
    with tarfile.open(fileobj=io.BytesIO(intact)) as tar, tarfile.open(shard, "w") as cut:
        for info in tar.getmembers()[:11]:  # cut between the sixth sample's image and its label
            cut.addfile(info, tar.extractfile(info))
    with pytest.raises(ValueError, match=r"shard-000002.tar: unreadable shard \(sample \d+ has no label"):
        _take(ShardStream(tmp_path / "shards", InceptionCropTransform(16), 4, seed=1).raw_stream(0), 64)


def test_a_run_over_shards_refuses_them_re_sharded(tmp_path):
    """The same images re-written as other shards keep the plan (path, count, classes) but not the sample order
    that an exact resume skips through: refused, naming the shards."""
    make_image_folder(tmp_path / "images", classes=2, per_class=8)
    write_shards(open_dataset(str(tmp_path / "images"), "all"), tmp_path / "shards", shard_size=8, progress=False)
    args = dict(out=tmp_path / "run", epochs=1, batch_size=8, crop=16, progress=False)
    done = pretrain(TINY, str(tmp_path / "shards"), **args)
    assert pretrain(TINY, str(tmp_path / "shards"), **args) == done  # unchanged: the finished run's results
    write_shards(open_dataset(str(tmp_path / "images"), "all"), tmp_path / "shards", shard_size=4, progress=False)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(shards: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        pretrain(TINY, str(tmp_path / "shards"), **args)
    with pytest.raises(MissingSplit, match="shards holds a single split and no held-out part can be taken from it"):
        pretrain(TINY, str(tmp_path / "shards"), str(tmp_path / "shards"), **{**args, "out": tmp_path / "scored"})


def _rewrite_shard(path: Path, keep, replace: dict[str, bytes] | None = None) -> None:
    """The tar at `path` again with the members `keep(name)` accepts, some of their contents replaced."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if keep(m.name)]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = (replace or {}).get(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_damaged_shards_and_manifests_are_named_never_read_with_wrong_labels(tmp_path):
    """One sample without its label and another without its image leave the counts equal: images are paired
    with labels by key (by position, every image after the gap took its neighbour's label). A label that is
    not a class of the manifest, and a manifest that is cut short or lacks an entry, are errors naming them.
    (Shards read through their tar headers, as without index files: an index holds the shard as it was written.)"""
    make_image_folder(tmp_path / "images", classes=3, per_class=2)
    write_shards(open_dataset(str(tmp_path / "images"), "all"), tmp_path / "shards", shard_size=6, progress=False)
    (tmp_path / "shards" / "shard-000000.index.npz").unlink()
    shard, manifest = tmp_path / "shards" / "shard-000000.tar", tmp_path / "shards" / "manifest.json"
    assert Counter(ShardImages(tmp_path / "shards").targets) == {0: 2, 1: 2, 2: 2}
    original = shard.read_bytes()
    with tarfile.open(shard) as tar:
        names = tar.getnames()  # key.jpg, key.cls, ...: drop the first sample's label and the second's image
    assert names[1].endswith(".cls") and names[2].endswith(".jpg")
    _rewrite_shard(shard, lambda name: name not in names[1:3])
    text = manifest.read_text()
    manifest.write_text(text.replace('"count": 6', '"count": 5'))
    with pytest.raises(ValueError, match=rf"shard-000000.tar: unreadable shard \(sample {names[1][:-4]} has no label"):
        ShardImages(tmp_path / "shards")
    manifest.write_text(text)
    key = names[-1][:-4]
    for label, why in ((b"seven", "invalid literal"), (b"3", "not in 0..2, the manifest's 3 classes"),
                       (b"-1", "not in 0..2")):
        shard.write_bytes(original)
        _rewrite_shard(shard, lambda name: True, {f"{key}.cls": label})
        with pytest.raises(ValueError, match=rf"shard-000000.tar:{key}: label {label!r}: {why}"):
            ShardImages(tmp_path / "shards")
        stream = ShardStream(tmp_path / "shards", HyperRuleTransform(16, 16), 6, seed=0)
        with pytest.raises(ValueError, match=rf"shards:{key}: label {label!r}: {why}"):
            list(stream)
    manifest.write_text(text[:40])
    with pytest.raises(ValueError, match=r"manifest.json: not a shard manifest \(.*\); `bit shards SRC"):
        ShardImages(tmp_path / "shards")
    manifest.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k not in ("shards", "total")}))
    with pytest.raises(ValueError, match=r"manifest.json: the manifest has no shards, total; `bit shards SRC"):
        ShardImages(tmp_path / "shards")
    manifest.write_text(text.replace('"count": 6', '"count": "6"'))  # counts are read as numbers
    with pytest.raises(ValueError, match=r"the manifest's shards\[0\].count: not a whole number; `bit shards SRC"):
        ShardImages(tmp_path / "shards")
    # the label member the manifest names is read, and only it: .cls under a multi-label manifest is named
    shard.write_bytes(original)
    _rewrite_shard(shard, lambda name: True, {})
    with tarfile.open(shard, "a") as tar:  # a metadata member beside the labels is not a label
        info = tarfile.TarInfo(f"{key}.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    manifest.write_text(text)
    assert Counter(ShardImages(tmp_path / "shards").targets) == {0: 2, 1: 2, 2: 2}
    assert len(_take(ShardStream(tmp_path / "shards", HyperRuleTransform(16, 16), 6, seed=0), 2)) == 2
    shard.write_bytes(original)
    manifest.write_text(text.replace('"multi_label": false', '"multi_label": true'))
    with pytest.raises(ValueError, match=r"sample \w+ has no label \(.json, as the manifest's multi-label"):
        ShardImages(tmp_path / "shards")
    with pytest.raises(ValueError, match=r"shards:\w+: no .json member, the label of every sample of a multi-label"):
        _take(ShardStream(tmp_path / "shards", HyperRuleTransform(16, 16), 6, seed=0), 2)
