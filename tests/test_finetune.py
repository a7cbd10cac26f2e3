"""Fine-tuning end to end on CPU with a tiny model: accuracy, batch split, DDP, resume, bad images."""

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bigtransfer.checkpoints import CheckpointError, save_weights
from bigtransfer.data import LabelledImages, open_dataset, sample_per_class
from bigtransfer.evaluate import metrics_from_confusion
from bigtransfer.finetuning import finetune, make_plan
from bigtransfer.models import ResNetV2, create_model
from bigtransfer.protocols import plot_accuracy
from bigtransfer.runs import RunDir
from bigtransfer.runtime import TrainingInterrupted
from bit_process import bit, bit_command, bit_env, kill_after_checkpoint

TINY = "BiT-R14x0.25"
FAST = {"resolution": (40, 32), "progress": False}  # 32 px crops keep CPU runs to seconds


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b, rel=None):
    """Bit for bit, or (rel) equal up to float summation order: the whole model's weights within `rel`
    relative L2 distance. (Per element is too strict: a summation-order difference can flip the
    max-pool's choice between equal activations on a digit's flat background and route one gradient
    elsewhere; measured up to 1e-3 on single small bias entries, 5e-7 for the model as a whole.)"""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    if rel is None:
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
        return
    flat_a, flat_b = (torch.cat([w[k].flatten() for k in sorted(wa)]) for w in (wa, wb))
    distance = ((flat_a - flat_b).norm() / flat_a.norm()).item()
    assert distance <= rel, f"relative L2 distance {distance:.2e}"


def test_few_shot_sampler():
    targets = [0] * 5 + [1] * 3 + [2] * 7
    a = sample_per_class(targets, 3, seed=1)
    assert sorted(np.bincount(np.asarray(targets)[a]).tolist()) == [3, 3, 3]
    assert a == sample_per_class(targets, 3, seed=1) and a != sample_per_class(targets, 3, seed=2)
    with pytest.raises(ValueError, match="class 'cat' has only 3 examples, 4 per class"):
        sample_per_class(targets, 4, seed=0, classes=["dog", "cat", "emu"])
    with pytest.raises(ValueError, match="class 'yak' has only 0 examples, 3 per class"):  # not silently left out
        sample_per_class(targets, 3, seed=0, classes=["dog", "cat", "emu", "yak"])
    assert sample_per_class(targets, 3, seed=1, usable=lambda i: True) == a
    b = sample_per_class(targets, 3, seed=1, usable=lambda i: i != a[0])  # an unreadable draw is replaced
    assert a[0] not in b and set(a[1:]) <= set(b) and len(b) == 9
    with pytest.raises(ValueError, match="examples per class need single-label data"):  # not flat indices into
        sample_per_class([(0, 1), (1, 2), (0, 2)] * 2, 1, seed=0)  # an (N, 2) array, some past the 6 items
    with pytest.raises(ValueError, match="the few-shot seed must be >= 0, got -1"):
        sample_per_class(targets, 3, seed=-1)
    assert sample_per_class(np.array([255, 3, 255], dtype=np.uint8), 1, seed=0) in ([0, 1], [1, 2])  # dtype's top
    mixed = np.random.default_rng(0).permutation(targets * 4).tolist()  # the draws, by their definition: per
    for seed in range(5):  # class in label order, `k` of its items in index order, one generator for all
        rng = np.random.default_rng(seed)
        expected = [i for c in range(3) for i in rng.choice(np.flatnonzero(np.asarray(mixed) == c), 3, replace=False)]
        assert sample_per_class(mixed, 3, seed) == sorted(expected)


def test_step_sampler_walks_each_epochs_permutation_in_order():
    from bigtransfer.data.loader import StepSampler

    for n, batch in ((10, 4), (7, 7), (13, 5), (64, 16)):
        sampler = StepSampler(n, batch, seed=3)
        walk = [int(i) for epoch in range(6) for i in sampler._permutation(epoch)]
        steps = 5 * n // batch  # batches that span the end of an epoch included
        assert [i for step in range(steps) for i in sampler.global_items(step)] == walk[:steps * batch]
        assert all(sorted(walk[e * n:(e + 1) * n]) == list(range(n)) for e in range(6))  # each item once an epoch


def test_plan_checks_the_resolution_it_will_use():
    digits = open_dataset("digits")
    with pytest.raises(ValueError, match="crop 200 is larger than resize 100"):
        make_plan(TINY, digits, resize=100, crop=200)  # set one by one, not as resolution=(resize, crop)
    with pytest.raises(ValueError, match="crop 0 "):
        make_plan(TINY, digits, crop=0)
    with pytest.raises(TypeError, match=r"resolution=\(resize, crop\): two sides, e.g. \(160, 128\); got 32"):
        make_plan(TINY, digits, resolution=32)


def test_a_model_passed_in_takes_no_pretrained_weights(tmp_path):
    with pytest.raises(ValueError, match="pretrained= picks the starting weights of a registry name"):
        finetune(create_model(TINY), "digits", out=tmp_path / "run", pretrained=True, **FAST)  # was ignored
    assert not (tmp_path / "run").exists()


def test_metrics_by_hand():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    m = metrics_from_confusion(confusion, top5_correct=8)
    assert m["examples"] == 8 and m["top1"] == 5 / 8 and m["top5"] == 1.0
    assert m["per_class_accuracy"] == [0.75, 0.5, None]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_momentum_sgd_is_the_hand_written_update(device):
    """BiT's optimiser (for CUDA training torch's fused kernels, which run here on the CPU too) against the
    update written out: buf = 0.9 buf + g + wd p, p -= lr buf, with the learning rate changed between steps
    and weight decay on one group only."""
    from bigtransfer.engine import momentum_sgd

    torch.manual_seed(0)
    weights = [torch.randn(7, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    params = [w.clone().requires_grad_() for w in weights]
    opt = momentum_sgd([{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:]}], 0.1,
                       torch.device(device))
    assert opt.defaults["fused"] == (device == "cuda" or None)
    buffers = [torch.zeros_like(w) for w in weights]
    for lr in (0.1, 0.05, 0.2):
        grads = [torch.randn_like(w) for w in weights]
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, (wd, g) in enumerate(zip((0.01, 0.0), grads, strict=True)):
            step = g + wd * weights[i]
            buffers[i] = step if lr == 0.1 else 0.9 * buffers[i] + step  # the first step starts the buffer at g
            weights[i] = weights[i] - lr * buffers[i]
    for p, w in zip(params, weights, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_digits_finetune_beats_chance_by_far(tmp_path):
    """Random-init tiny model, 200 steps of 64 on the 1,000 training digits: measured 93.6% top-1."""
    test = open_dataset("digits", "test")
    r = finetune(TINY, "digits", test, out=tmp_path / "run", steps=200, batch_size=64, base_lr=0.03,
                 eval_every=100, **FAST)
    assert r["eval"]["examples"] == 797 and r["eval"]["top1"] > 0.85
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "checkpoint.pt", "eval.json", "curves.png",
                 "summary.json", "summary.md", "log.txt"):
        assert (run / name).exists(), name
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert [e["step"] for e in evals] == [100, 200]
    ev = json.loads((run / "eval.json").read_text())
    assert np.asarray(ev["confusion_matrix"]).sum() == 797 and len(ev["per_class_accuracy"]) == 10
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert (plan["steps"], plan["warmup_steps"], plan["decay_steps"]) == (200, 40, [80, 120, 160])
    assert plan["flip"] is False  # digits are never flipped
    # a finished run is not trained again; another plan in the same folder is refused
    again = finetune(TINY, "digits", test, out=run, steps=200, batch_size=64, base_lr=0.03, **FAST)
    assert again == json.loads(json.dumps(r)) and again["top1"] == r["eval"]["top1"]  # what the run returned
    with pytest.raises(ValueError, match="base_lr: 0.03 -> 0.1"):
        finetune(TINY, "digits", out=run, steps=200, batch_size=64, base_lr=0.1, **FAST)


def test_transfer_starts_from_a_zero_head_and_a_run_folder_keeps_its_starting_weights(tmp_path, monkeypatch):
    """A checkpoint whose head already has the task's 10 classes still starts with a zero head (the first
    loss is then ln 10 exactly); re-running into the same folder from other weights is refused, not resumed."""
    upstream = create_model(TINY, num_classes=10)
    torch.nn.init.normal_(upstream.head.weight)
    save_weights(upstream, tmp_path / "upstream.safetensors")
    common = dict(steps=1, batch_size=16, log_every=1, **FAST)
    finetune(TINY, "digits", out=tmp_path / "run", pretrained=tmp_path / "upstream.safetensors", **common)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(np.log(10), abs=1e-6)
    monkeypatch.chdir(tmp_path)  # the same file by a relative path is the same start: the finished run is returned
    assert finetune(TINY, "digits", out="run", pretrained="upstream.safetensors", **common)["steps"] == 1
    with pytest.raises(ValueError, match="pretrained: '.*upstream.safetensors' -> 'random'"):
        finetune(TINY, "digits", out="run", **common)
    test = open_dataset("digits", "test")
    with pytest.raises(ValueError, match=r"eval_data: 'none' -> 'digits \(797 images\)'"):  # old results, else
        finetune(TINY, "digits", test, out="run", pretrained="upstream.safetensors", **common)
    # a model passed in is trained in place: calling again with it returns the run's results; a registry name's
    # random start in that folder is another start
    first = finetune(upstream, "digits", out="module", **common)
    assert finetune(upstream, "digits", out="module", **common) == json.loads(json.dumps(first))
    with pytest.raises(ValueError, match="pretrained: 'model passed in' -> 'random'"):
        finetune(TINY, "digits", out="module", **common)


def test_few_shot_run_saves_its_examples(tmp_path):
    r = finetune(TINY, "digits", out=tmp_path / "k2", steps=3, batch_size=32, examples_per_class=2,
                 examples_per_class_seed=7, **FAST)
    chosen = json.loads((tmp_path / "k2" / "examples.json").read_text())
    assert len(chosen["indices"]) == 20 and chosen["files"][0].startswith("digits")
    digits = open_dataset("digits", "train").targets
    assert sorted(digits[i] for i in chosen["indices"]) == sorted(list(range(10)) * 2)  # two of every class
    assert r["plan"]["n_examples"] == 20  # 20 examples fill a batch of 32 by drawing with replacement


def test_a_mixup_update_by_hand():
    """One update in two micro-batches: the loss the engine returns and the gradients it leaves are those of
    lam * CE(y) + (1 - lam) * CE(y[perm]) on lam * x + (1 - lam) * x[perm], written out here (REFERENCE section 4:
    one lambda ~ Beta(alpha, alpha) per batch, partners from a permutation of the batch). At 32 px: at 16 px the
    last stage's maps are 1x1 and its GroupNorms near-degenerate, so fp32 rounding alone moved gradients by 1% of
    their size (against float64) on an AVX-512 machine, and the whole batch and its two halves disagreed there."""
    import torch.nn.functional as F

    from bigtransfer.data import to_model_input
    from bigtransfer.engine import EngineConfig, _update, softmax_cross_entropy
    from bigtransfer.hyperrule import schedule
    from bigtransfer.runtime import setup

    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3, zero_head=False)
    images, labels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    config = EngineConfig(schedule(100), 0.0, 6, 32, mixup_alpha=0.4, seed=3, channels_last=False)
    loss = _update(model, None, torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler("cpu", enabled=False),
                   images, labels, softmax_cross_entropy, 2, 7, config, setup("cpu"))
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    lam = np.random.default_rng([3, 7]).beta(0.4, 0.4)  # the engine's draws for seed 3, step 7, rank 0
    perm = torch.from_numpy(np.random.default_rng([3, 7, 0]).permutation(6))
    assert 0.2 < lam < 0.8 and not torch.equal(perm, torch.arange(6))  # both terms count
    model.zero_grad()
    x = to_model_input(images)
    logits = model(lam * x + (1 - lam) * x[perm])
    hand = (lam * F.cross_entropy(logits, labels, reduction="none")
            + (1 - lam) * F.cross_entropy(logits, labels[perm], reduction="none")).mean()
    hand.backward()
    torch.testing.assert_close(loss, hand.detach().float(), rtol=1e-5, atol=1e-7)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_a_batch_shortened_by_bad_images_replays_the_captured_step():
    """Under CUDA graphs, 6 good images of a captured batch of 8 are padded to 8 and give the eager update on
    the 6 (the capture itself needs a GPU: a recording stand-in for the graphed forward runs it here)."""
    from bigtransfer.engine import EngineConfig, _GraphedForward, _padded, _update, softmax_cross_entropy
    from bigtransfer.hyperrule import schedule
    from bigtransfer.runtime import setup

    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3, zero_head=False)
    images, labels = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    config = EngineConfig(schedule(100), 0.0, 8, 16, mixup_alpha=0.4, seed=3, channels_last=False)

    def update(graphed):
        model.zero_grad()
        loss = _update(model, graphed, torch.optim.SGD(model.parameters(), lr=0.0),
                       torch.amp.GradScaler("cpu", enabled=False), images, labels, softmax_cross_entropy, 1, 7,
                       config, setup("cpu"))
        return loss, {k: p.grad.clone() for k, p in model.named_parameters()}

    given = []
    loss, grads = update(_GraphedForward(lambda x: given.append(x.clone()) or model(x), torch.Size([8, 3, 16, 16])))
    assert len(given) == 1 and given[0].shape == (8, 3, 16, 16) and not given[0][6:].any()
    cl = torch.randn(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)  # as the graphs were captured
    assert _padded(cl, 8).is_contiguous(memory_format=torch.channels_last) and torch.equal(_padded(cl, 8)[:6], cl)
    eager_loss, eager_grads = update(None)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    for k, g in grads.items():
        torch.testing.assert_close(g, eager_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_batch_split_gives_the_same_update(tmp_path):
    """GroupNorm has no batch statistics: 4 micro-batches of 8 = one batch of 32 (MixUp on, too)."""
    common = dict(steps=6, batch_size=32, base_lr=0.05, mixup_alpha=0.2, **FAST)
    finetune(TINY, "digits", out=tmp_path / "split1", batch_split=1, **common)
    finetune(TINY, "digits", out=tmp_path / "split4", batch_split=4, **common)
    before = weights(tmp_path / "split1" / "model.safetensors")
    assert_same_weights(tmp_path / "split1" / "model.safetensors", tmp_path / "split4" / "model.safetensors",
                        rel=1e-5)
    assert before["head.weight"].abs().sum() > 0  # it did train


def _folder_with_bad_images(root):
    """Two classes of random 20 px images, a grayscale one (converted), a non-image and a truncated JPEG."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / "a" / "gray.png")
    (root / "b" / os.fsdecode(b"broken\xe9.png")).write_bytes(b"not an image at all")  # a name not in UTF-8
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "a" / "cut.jpg")
    (root / "a" / "cut.jpg").write_bytes((root / "a" / "cut.jpg").read_bytes()[:300])  # truncated JPEG
    return root


def test_ddp_two_processes_equal_one(tmp_path):
    """Real torchrun, gloo on CPU: 2 processes x 8 images = 1 process x 16 images, also where the bad images
    fall unevenly on the two (the loss is the global batch's mean) and are found by either (all reported)."""
    data = _folder_with_bad_images(tmp_path / "shapes")
    args = ["finetune", "--model", TINY, "--data", data, "--eval-data", "none", "--steps", "5", "--batch", "16",
            "--lr", "0.05", "--resolution", "40", "32", "--no-progress"]
    bit(*args, "--out", tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "bigtransfer", *map(str, args), "--out", str(tmp_path / "two")]
    proc = subprocess.run(torchrun, capture_output=True, text=True, env=bit_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 5 steps") == 1  # rank 0 speaks for the run
    assert_same_weights(tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors",
                        rel=1e-5)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["plan"]["batch_size"] == 16
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5]  # only rank 0 writes
    one, two = (json.loads((tmp_path / run / "bad_images.json").read_text()) for run in ("one", "two"))
    assert one == two and one["count"] == 2 and one["times_left_out"] >= 2


def test_sigterm_under_torchrun_stops_every_process_at_the_same_step(tmp_path):
    """The processes meet every --log-every steps and stop there together: each checking only its own signal,
    one could checkpoint a step the other had already left (the other then died in a collective)."""
    args = ["finetune", "--model", TINY, "--data", "digits", "--eval-data", "none", "--steps", "2000", "--batch",
            "8", "--resolution", "36", "32", "--log-every", "3", "--no-progress", "--out", tmp_path / "run"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "bigtransfer", *map(str, args)]
    proc = subprocess.Popen(torchrun, env=bit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
    _, err = proc.communicate(timeout=120)
    step = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 2000 and step % 3 == 0, err[-3000:]
    assert err.count("interrupted by SIGTERM at step") == 2 and "Connection closed by peer" not in err, err[-3000:]


def test_killed_run_resumes_bit_identically(tmp_path):
    """SIGKILL mid-run (a real process), run the same command again: same weights, bit for bit."""
    args = ["finetune", "--model", TINY, "--data", "digits", "--eval-data", "none", "--steps", "40", "--batch",
            "48", "--lr", "0.05", "--resolution", "72", "64", "--checkpoint-every", "4", "--log-every", "4",
            "--no-progress"]
    bit(*args, "--out", tmp_path / "straight")

    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 8, 40)
    assert not (killed / "model.safetensors").exists()
    resumed = bit(*args, "--out", killed)
    assert "resuming" in resumed.stderr
    assert_same_weights(tmp_path / "straight" / "model.safetensors", killed / "model.safetensors")
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # nothing logged twice
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0  # the training time of both attempts, not restarted


def test_ctrl_c_with_loader_workers_stops_once(tmp_path):
    """A terminal's Ctrl-C signals the whole process group, DataLoader workers included: one message, one
    checkpoint, the workers shut down by the loop (they inherit its handler, and used to report it each)."""
    args = ["finetune", "--model", TINY, "--data", "digits", "--eval-data", "none", "--steps", "500", "--batch",
            "48", "--resolution", "72", "64", "--workers", "2", "--no-progress", "--out", tmp_path / "run"]
    proc = subprocess.Popen(bit_command(*args), env=bit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert err.count("SIGINT: stopping after this step") == 1 and "Traceback" not in err, err[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] >= 10


def test_sigterm_writes_a_checkpoint_and_stops_cleanly(tmp_path):
    args = ["finetune", "--model", TINY, "--data", "digits", "--eval-data", "none", "--steps", "500", "--batch",
            "48", "--resolution", "72", "64", "--no-progress", "--out", tmp_path / "run"]
    proc = subprocess.Popen(bit_command(*args), env=bit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    step = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= step < 500


def test_a_run_cut_short_in_its_final_evaluation_only_evaluates_again(tmp_path):
    """A signal's default action during the final evaluation (here: an interrupt from the evaluation data)
    must find the last step checkpointed, so that the same command only evaluates."""
    test = open_dataset("digits", "test")

    class InterruptedOnce(LabelledImages):  # the held-out digits, whose first read is interrupted
        name, classes, targets, interrupt = "digits-test", test.classes, test.targets, True

        def __getitem__(self, i):
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return test[i]

    held_out = InterruptedOnce()
    common = dict(steps=6, batch_size=16, base_lr=0.05, **FAST)
    with pytest.raises(KeyboardInterrupt):
        finetune(TINY, "digits", held_out, out=tmp_path / "run", **common)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6
    trained = weights(tmp_path / "run" / "model.safetensors")
    r = finetune(TINY, "digits", held_out, out=tmp_path / "run", **common)
    assert r["steps"] == 6 and r["eval"]["examples"] == 797 and r["final_loss"] > 0
    for key, value in weights(tmp_path / "run" / "model.safetensors").items():
        assert torch.equal(value, trained[key]), key


def test_a_nan_loss_stops_the_run_before_anything_is_saved(tmp_path):
    """(GN + WS keep even lr 1e6 finite here; a NaN in the starting weights is the realistic way to NaN. A
    checkpoint holding one is refused when it is read; a model passed in is trained as it is.)"""
    upstream = create_model(TINY, num_classes=10)
    with torch.no_grad():
        upstream.stages[1][0].conv2.weight[0, 0, 0, 0] = float("nan")
    save_weights(upstream, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="nan.safetensors: array 'stages.1.0.conv2.weight' holds NaN or inf"):
        finetune(TINY, "digits", out=tmp_path / "run", pretrained=tmp_path / "nan.safetensors", steps=4, **FAST)
    with pytest.raises(FloatingPointError, match="the training loss is nan at step 1: the run diverged"):
        finetune(upstream, "digits", out=tmp_path / "passed", steps=4, batch_size=16, log_every=5, checkpoint_every=1,
                 **FAST)
    assert not any((tmp_path / "passed" / name).exists() for name in ("model.safetensors", "checkpoint.pt"))
    # A step's loss (taken before its update) is finite, the update's weights are not: never checkpointed. (A huge
    # learning rate diverges either way, loss or weights first, depending on the last bits of the arithmetic; a
    # gradient that overflows at the second step, as a hook makes it here, does it the same way every time.)
    model, backward_calls = create_model(TINY, num_classes=10), []

    def overflowing(grad: torch.Tensor) -> torch.Tensor:
        backward_calls.append(1)
        return grad * float("inf") if len(backward_calls) >= 2 else grad

    model.stages[0][0].conv1.weight.register_hook(overflowing)
    with pytest.raises(FloatingPointError, match=r"the weights hold NaN or infinite values after step 2 \(stages.0.0"):
        finetune(model, "digits", out=tmp_path / "far", steps=8, batch_size=8, checkpoint_every=1, log_every=1, **FAST)
    kept = torch.load(tmp_path / "far" / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 1 and all(v.isfinite().all() for v in kept["model"].values())


def test_a_start_that_failed_before_its_first_checkpoint_does_not_hold_the_folder(tmp_path):
    with pytest.raises(ValueError, match="--batch-split 33 must be between 1 and the per-process batch 32"):
        finetune(TINY, "digits", out=tmp_path / "run", steps=2, batch_size=32, batch_split=33, **FAST)
    assert finetune(TINY, "digits", out=tmp_path / "run", steps=2, batch_size=32, batch_split=2, **FAST)["steps"] == 2


def test_bad_images_are_reported_not_trained_on(tmp_path):
    root = _folder_with_bad_images(tmp_path / "shapes")
    r = finetune(TINY, str(root), out=tmp_path / "run", steps=4, batch_size=16, **FAST)
    report = json.loads((tmp_path / "run" / "bad_images.json").read_text())
    assert len(report["files"]) == 2
    assert any("broken" in f for f in report["files"]) and any("cut.jpg" in f for f in report["files"])
    assert report["count"] == r["bad_images"] == 2 and report["times_left_out"] >= 2
    assert "broken\\udce9.png: not an image" in (tmp_path / "run" / "log.txt").read_text()  # escaped, not lost
    # few-shot: k readable images per class (class b has 6 of 7); the probe fits and scores the readable ones
    k6 = finetune(TINY, str(root), out=tmp_path / "k6", steps=1, batch_size=12, examples_per_class=6, **FAST)
    files = json.loads((tmp_path / "k6" / "examples.json").read_text())["files"]
    assert len(files) == 12 and not any(name in f for f in files for name in ("broken", "cut.jpg"))
    assert k6["bad_images"] == 0
    with pytest.raises(ValueError, match="class 'b' has only 6 readable examples, 7 per class"):
        finetune(TINY, str(root), out=tmp_path / "k7", steps=1, batch_size=14, examples_per_class=7, **FAST)
    from bigtransfer.probe import linear_probe

    def probe(folder):  # every readable image for training and for testing, and 6 per class for training
        data = open_dataset(str(folder), hold_out=False)
        torch.manual_seed(0)  # the same network for both folders
        return [r["accuracy"] for r in linear_probe(create_model(TINY, num_classes=0), data, data, 32,
                                                     shots=(None, 6))]

    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for bad in [*clean.glob("b/broken*"), clean / "a" / "cut.jpg"]:
        bad.unlink()
    (everything, six), (clean_everything, _) = probe(root), probe(clean)
    assert everything == clean_everything and 0 < six <= 1  # the bad files are left out, not scored as blank


def test_the_logged_speed_is_the_images_between_log_steps_over_their_time(tmp_path):
    """images_per_s is what elapsed_s says, to its rounding: on a GPU, times taken per step measured how fast
    the CPU queued kernels (the logs said twice the H100's real rate)."""
    finetune(TINY, "digits", out=tmp_path / "run", steps=12, batch_size=16, log_every=3, **FAST)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    for before, after in zip(logged, logged[1:], strict=False):
        seconds = after["elapsed_s"] - before["elapsed_s"]  # each rounded to 1 ms
        low, high = 16 * 3 / (seconds + 0.001), 16 * 3 / (seconds - 0.001)
        assert low - 0.01 <= after["images_per_s"] <= high + 0.01, (before, after)


def test_a_folder_another_process_trains_into_is_refused_and_its_files_left_alone(tmp_path):
    """Two commands training into one folder would interleave checkpoints and metrics: the second, a real
    `bit finetune` process holding it, makes this one stop at once, before it removes the other's files."""
    out = tmp_path / "run"
    first = subprocess.Popen(bit_command("finetune", "--model", TINY, "--data", "digits", "--steps", "100000",
                                         "--resolution", "40", "32", "--no-progress", "--out", out),
                             env=bit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        writing = out / ".checkpoint.pt.0123456789ab.tmp"  # as atomic_path names a file it is writing
        writing.write_bytes(b"half a checkpoint")
        with pytest.raises(ValueError, match=r"run is in use by another process training into it; wait for it"):
            finetune(TINY, "digits", out=out, steps=3, **FAST)
        assert writing.exists() and "stopped by" not in (out / "log.txt").read_text()
    finally:
        first.send_signal(signal.SIGTERM)  # stops after its step, with a checkpoint
        first.wait(timeout=120)
    with pytest.raises(ValueError, match="holds a run with other settings"):  # free again: reaches the settings
        finetune(TINY, "digits", out=out, steps=3, **FAST)


def test_a_finished_run_in_a_folder_that_cannot_be_written_is_still_returned(tmp_path):
    """A finished run in a read-only folder (an archive, another user's run) returns its results; one that would
    train there is refused, naming the folder. (A directory where the lock file goes stands in for a read-only
    folder, which root, who runs CI, could write anyway.)"""
    done = finetune(TINY, "digits", out=tmp_path / "run", steps=3, **FAST)
    (tmp_path / "run" / ".lock").unlink()
    (tmp_path / "run" / ".lock").mkdir()
    assert finetune(TINY, "digits", out=tmp_path / "run", steps=3, **FAST) == done
    (tmp_path / "new" / ".lock").mkdir(parents=True)
    with pytest.raises(PermissionError, match=r"new: cannot write here \(Is a directory\); pass another output"):
        finetune(TINY, "digits", out=tmp_path / "new", steps=3, **FAST)


def test_bad_images_in_memory_and_on_the_device_are_left_out_as_from_files(tmp_path):
    """--in-memory and --device-data keep an unreadable image's place and report it when drawn: the same
    weights (in memory) and the same report as from the files, instead of refusing the run."""
    root = _folder_with_bad_images(tmp_path / "shapes")
    common = dict(steps=4, batch_size=16, base_lr=0.05, **FAST)
    finetune(TINY, str(root), out=tmp_path / "files", **common)
    finetune(TINY, str(root), out=tmp_path / "memory", in_memory=True, **common)
    device = finetune(TINY, str(root), out=tmp_path / "device", device_data=True, **common)
    assert_same_weights(tmp_path / "files" / "model.safetensors", tmp_path / "memory" / "model.safetensors")
    files, memory, on_device = (json.loads((tmp_path / run / "bad_images.json").read_text())
                                for run in ("files", "memory", "device"))
    assert files == memory == on_device and files["count"] == device["bad_images"] == 2
    from bigtransfer.data.memory import InMemoryImages

    kept = InMemoryImages(open_dataset(str(root), "all"), 40).bad  # for the whole run: no decoder frames or bytes
    assert len(kept) == 2 and all(e.__traceback__ is e.__cause__ is e.__context__ is None for e in kept.values())


def _interrupted_once(root, at_read: int):
    """The image folder at `root`, whose `at_read`-th image read raises KeyboardInterrupt (a Ctrl-C mid-run),
    once: the same object then serves the rerun."""
    from bigtransfer.data.sources import ImageFolderImages

    class InterruptedOnce(ImageFolderImages):
        reads = 0

        def __getitem__(self, i):
            self.reads += 1
            if self.reads == at_read:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    return InterruptedOnce(root)


def test_bad_images_alone_in_a_batch_and_across_a_resume(tmp_path):
    """With batch 1 a bad image is a whole batch: that step makes no update (it used to stop the run). A run
    interrupted after its checkpoint and resumed reports the bad images met before, as a straight run does."""
    from bigtransfer.data.sources import ImageFolderImages

    root = _folder_with_bad_images(tmp_path / "shapes")
    common = dict(steps=30, batch_size=1, checkpoint_every=5, log_every=1, **FAST)  # two epochs of the 15 images
    finetune(TINY, ImageFolderImages(root), out=tmp_path / "straight", **common)
    straight = json.loads((tmp_path / "straight" / "bad_images.json").read_text())
    assert straight["count"] == 2 and straight["times_left_out"] == 4
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 30 - 4 and min(losses) > 0  # the 4 skipped steps log no loss (it was 0.0)
    assert "every image of the batch was bad: no update at this step" in (tmp_path / "straight" / "log.txt").read_text()

    source = _interrupted_once(root, at_read=22)  # after the checkpoint of step 20
    with pytest.raises(KeyboardInterrupt):
        finetune(TINY, source, out=tmp_path / "resumed", **common)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 20
    finetune(TINY, source, out=tmp_path / "resumed", **common)
    assert json.loads((tmp_path / "resumed" / "bad_images.json").read_text()) == straight
    assert not list((tmp_path / "resumed").glob("bad_images.rank*"))


def test_damaged_run_files_are_named_or_a_torn_last_line_dropped(tmp_path):
    """A crash (or full disk) while a metrics line was appended leaves half a line: the rerun drops it and
    resumes. A checkpoint.pt or config.json damaged since they were written is named, with what to do."""
    source = _interrupted_once(_folder_with_bad_images(tmp_path / "shapes"), at_read=40)  # after step 4's checkpoint
    common = dict(steps=6, batch_size=8, checkpoint_every=2, log_every=1, **FAST)
    with pytest.raises(KeyboardInterrupt):
        finetune(TINY, source, out=tmp_path / "run", **common)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "lo')  # cut short
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    intact = checkpoint.read_bytes()
    checkpoint.write_bytes(intact[:1000])
    with pytest.raises(ValueError, match=r"checkpoint.pt: damaged, cannot be read .*delete it to start this run over"):
        finetune(TINY, source, out=tmp_path / "run", **common)
    assert "ERROR stopped by ValueError: " in (tmp_path / "run" / "log.txt").read_text()  # the log says why, too
    checkpoint.write_bytes(intact)
    stale = tmp_path / "run" / ".checkpoint.pt.0123456789ab.tmp"  # what atomic_path leaves when SIGKILLed
    stale.write_bytes(intact)
    assert finetune(TINY, source, out=tmp_path / "run", **common)["steps"] == 6
    assert not stale.exists()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    (tmp_path / "run" / "config.json").write_text('{"plan": ')
    with pytest.raises(ValueError, match=r"config.json: damaged, not JSON"):
        finetune(TINY, source, out=tmp_path / "run", **common)
    (tmp_path / "run" / "config.json").unlink()  # a folder whose settings are lost is not resumed blindly
    with pytest.raises(ValueError, match=r"holds checkpoint.pt, summary.json, model.safetensors but no config.json"):
        finetune(TINY, source, out=tmp_path / "run", **common)


class Squares(torch.utils.data.Dataset):
    """40 images of two classes: a square or a bar in the corner."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        img = torch.zeros(3, 16, 16, dtype=torch.uint8)
        img[:, : 8 if i % 2 else 16, :8] = 255
        return img, i % 2


def test_any_torch_dataset_from_python(tmp_path):
    r = finetune(TINY, Squares(), Squares(), out=tmp_path / "run", steps=30, batch_size=20, base_lr=0.05, **FAST)
    assert r["plan"]["num_classes"] == 2 and r["eval"]["top1"] == 1.0


def test_a_finished_run_frees_its_model_at_once(tmp_path):
    """Nothing of a run waits for a garbage collection: matplotlib's log-axis labels left reference cycles
    that reached back to the training loop's frame. Kept alive, its model and optimizer held (GPU) memory into
    the next run of a sweep, and under torchrun its DDP reducer held the process group until the interpreter's
    exit, where gloo now and then aborted the finished rank-0 process."""
    def models() -> int:
        return sum(isinstance(o, ResNetV2) for o in gc.get_objects())

    gc.collect()
    gc.disable()  # only reference counting frees anything now
    try:
        before = models()
        finetune(TINY, "digits", out=tmp_path / "run", steps=2, batch_size=8, **FAST)
        after = models()
    finally:
        gc.enable()
    assert (tmp_path / "run" / "curves.png").exists() and after == before


def test_curves_leave_a_notebooks_matplotlib_alone(tmp_path):
    """Run curves and sweep plots are drawn without pyplot: a notebook's backend (inline, a GUI window) and open
    figures stay as they were (pyplot's `use("Agg")` switched a notebook to a backend that shows nothing)."""
    import matplotlib
    import matplotlib.pyplot as plt

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mine = plt.figure()
        run = RunDir(tmp_path / "run")
        for step in (1, 2, 3):
            run.append_metrics({"step": step, "loss": 1.0 / step, "lr": 0.1})
        run.append_metrics({"step": 3, "eval": {"top1": 0.5}})
        png = run.plot()
        rows = [{"init": "pretrained", "examples_per_class": k, "seed": s, "accuracy": 0.5 + 0.01 * s}
                for k in (1, 5, None) for s in range(3)]
        plot_accuracy(rows, tmp_path / "sweep.png", "a sweep")  # a sweep's plot, as bit demo draws it
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert Image.open(png).size == (1170, 324) and Image.open(tmp_path / "sweep.png").size == (640, 420)
        plt.close(mine)
    finally:
        matplotlib.use(previous)


def test_a_run_leaves_the_callers_random_state_alone(tmp_path):
    """A run seeds torch's global random state for itself and gives the caller's back as it was: finetune used
    to leave it reseeded with the plan's seed, so the caller's next draws were the same after any seed."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    r = finetune(TINY, "digits", out=tmp_path / "run", steps=2, batch_size=16, **FAST)
    assert torch.equal(torch.rand(3), expected) and r["plan"]["seed"] == 0


def test_a_finished_run_gives_a_model_passed_in_its_weights(tmp_path):
    """A notebook run again after a restart: the finished run's results come back, and the new model object that
    was passed in holds the run's weights (it was left untrained: its zero head predicted one class)."""
    trained = create_model(TINY, num_classes=0)
    first = finetune(trained, "digits", out=tmp_path / "run", steps=3, batch_size=16, **FAST)
    again = create_model(TINY, num_classes=0)
    assert finetune(again, "digits", out=tmp_path / "run", steps=3, batch_size=16, **FAST)["top1"] == first["top1"]
    mine, theirs = again.state_dict(), trained.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.head.weight.abs().sum() > 0


def test_an_interrupt_is_not_swallowed_and_a_second_one_stops_at_once(tmp_path):
    """Ctrl-C in a notebook: the first checkpoints after the step and raises TrainingInterrupted, which an
    ``except Exception`` around each run of a sweep does not catch (it did: the sweep went on); a second one,
    in a long step or a stalled data source, stops at once."""
    class Interrupting(Squares):
        def __init__(self, interrupts):
            self.interrupts = interrupts

        def __getitem__(self, i):
            if self.interrupts and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                for _ in range(self.interrupts):  # once, at the training loop's first read
                    os.kill(os.getpid(), signal.SIGINT)
                self.interrupts = 0
            return super().__getitem__(i)

    swallowed = []
    with pytest.raises(TrainingInterrupted) as once:
        try:
            finetune(TINY, Interrupting(1), Interrupting(0), out=tmp_path / "once", steps=10, batch_size=20, **FAST)
        except Exception as e:  # a sweep's guard around each run
            swallowed.append(e)
    assert not swallowed and once.value.step == 1 and (tmp_path / "once" / "checkpoint.pt").exists()
    with pytest.raises(KeyboardInterrupt) as twice:
        finetune(TINY, Interrupting(2), Interrupting(0), out=tmp_path / "twice", steps=10, batch_size=20, **FAST)
    assert not isinstance(twice.value, TrainingInterrupted) and not (tmp_path / "twice" / "checkpoint.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_bf16_autocast_and_channels_last_run_on_cpu(tmp_path):
    r = finetune(TINY, "digits", out=tmp_path / "run", steps=3, batch_size=16, precision="bf16",
                 channels_last=True, **FAST)
    assert np.isfinite(r["final_loss"]) and r["plan"]["precision"] == "bf16"
    fp32 = finetune(TINY, "digits", out=tmp_path / "fp32", steps=3, batch_size=16, channels_last=True, **FAST)
    assert r["final_loss"] != fp32["final_loss"] and r["final_loss"] == pytest.approx(fp32["final_loss"], rel=0.05)


def _sgd_steps(fused: bool, gradients: list[torch.Tensor], buffer_layout=None) -> torch.Tensor:
    """A channels_last weight after SGD steps through fp16's GradScaler; optionally resumed from a checkpoint
    whose momentum buffer has another layout, as the engine prepares a run."""
    from bigtransfer.engine import _optimizer_state_like_parameters

    weight = torch.nn.Parameter(torch.linspace(-1, 1, 4 * 3 * 9).reshape(4, 3, 3, 3)
                                .contiguous(memory_format=torch.channels_last))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, fused=fused)
    if buffer_layout is not None:
        state = optimizer.state_dict()
        state["state"] = {0: {"momentum_buffer": torch.arange(108.0).reshape(4, 3, 3, 3)
                                                     .contiguous(memory_format=buffer_layout)}}
        optimizer.load_state_dict(state)
    if fused:
        _optimizer_state_like_parameters(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # fills new memory with NaN (`fill_uninitialized_memory`): reads show
    try:
        for g in gradients:
            optimizer.zero_grad()
            scaler.scale((weight * g).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return weight.detach()


def test_fused_sgd_steps_equal_torchs_default_after_an_overflow_and_a_resume_in_another_layout():
    """The engine's fused SGD (CUDA) against torch's default SGD, on torch's CPU fused kernels: fp16's first
    step overflowing (the scaler skips it; a new fused buffer would keep uninitialised memory), and a
    checkpoint's NCHW buffer for a channels_last weight (the fused kernels read it as flat memory)."""
    grads = [torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    overflow = [grads[0].clone().index_put_((torch.tensor(0),), torch.tensor(float("inf")))] + grads[1:]
    exact = {"rtol": 1e-6, "atol": 1e-7}  # the fused kernels round a few values differently (fused multiply-adds)
    torch.testing.assert_close(_sgd_steps(True, overflow), _sgd_steps(False, overflow), **exact)
    assert not torch.allclose(_sgd_steps(False, overflow), _sgd_steps(False, grads))  # the skip did happen
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.testing.assert_close(_sgd_steps(True, grads, layout), _sgd_steps(False, grads, layout), **exact)


def test_momentum_buffers_are_made_for_the_parameters_that_train():
    """As torch makes them (at a parameter's first gradient): none for a frozen backbone, whose buffers would
    hold device memory and fill every checkpoint (3.5 GiB for R152x4)."""
    from bigtransfer.engine import _optimizer_state_like_parameters, momentum_sgd

    model = create_model(TINY, num_classes=3)
    model.root.requires_grad_(False)
    optimizer = momentum_sgd(model.parameters(), 0.1, torch.device("cpu"))
    _optimizer_state_like_parameters(optimizer)
    made = {n for n, p in model.named_parameters() if "momentum_buffer" in optimizer.state[p]}
    assert made == {n for n, p in model.named_parameters() if p.requires_grad} and not any("root" in n for n in made)


def test_layout_defaults_to_channels_last_only_where_the_step_runs_as_cuda_graphs(monkeypatch):
    """In CUDA graphs channels_last is the faster layout; launched op by op it is the slower one (H100,
    benchmarks/RESULTS.md). The rule is pure: it reads the device and the settings, no GPU needed."""
    from bigtransfer.engine import EngineConfig, _graphs_wanted
    from bigtransfer.hyperrule import Schedule
    from bigtransfer.runtime import Runtime

    model = torch.nn.Linear(2, 2)
    config = EngineConfig(Schedule(1, (), 10), 0.1, 8, 32)
    assert config.channels_last is None  # the engine decides
    cuda = Runtime(torch.device("cuda"))
    assert _graphs_wanted(model, config, cuda, split=1)
    assert not _graphs_wanted(model, config, cuda, split=2)  # micro-batches: no graphs, so no channels_last
    assert not _graphs_wanted(model, config, Runtime(torch.device("cpu")), split=1)
    assert not _graphs_wanted(model, config, Runtime(torch.device("cuda"), rank=0, world_size=2), split=1)  # DDP
    assert not _graphs_wanted(model, EngineConfig(Schedule(1, (), 10), 0.1, 8, 32, compile=True), cuda, split=1)
    model.grad_checkpointing = True
    assert not _graphs_wanted(model, config, cuda, split=1)
    model.grad_checkpointing = False
    handle = model.register_forward_hook(lambda *args: None)  # a replay would not call it
    assert not _graphs_wanted(model, config, cuda, split=1)
    handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *args: None)
    assert not _graphs_wanted(model, config, cuda, split=1)
    handle.remove()
    assert _graphs_wanted(model, config, cuda, split=1)
    monkeypatch.setenv("BIGTRANSFER_CUDA_GRAPHS", "0")
    assert not _graphs_wanted(model, config, cuda, split=1)

    from bigtransfer.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["finetune", "--model", "m", "--data", "d"]).channels_last is None
    assert parse(["finetune", "--model", "m", "--data", "d", "--no-channels-last"]).channels_last is False
    assert parse(["finetune", "--model", "m", "--data", "d", "--channels-last"]).channels_last is True


def test_on_device_batches_match_the_pil_path():
    """Same crops and flips from the same seeds; resampling differs by at most one grey level."""
    from bigtransfer.data import HyperRuleTransform
    from bigtransfer.data.device import DeviceImages
    from bigtransfer.data.memory import InMemoryImages

    source = InMemoryImages(open_dataset("digits", "train"))
    transform = HyperRuleTransform(40, 32, train=True, flip=True)
    keys = [(i, 1000 + i) for i in range(0, 64, 4)]
    on_device = DeviceImages(source.subset(range(64)), torch.device("cpu")).batch(keys, transform).float()
    pil = torch.stack([transform(source[i][0], seed) for i, seed in keys]).float()
    assert (on_device - pil).abs().max() <= 1 and (on_device - pil).abs().mean() < 0.2
    assert any(transform.params(seed)[2] for _, seed in keys)  # some of them flipped


def test_crop_and_flip_draws_are_uniform_and_the_same_alone_or_batched():
    """The on-device path draws a batch's crops in one vectorised call; each offset of the 9x9 range and
    both flips must come up about equally often, and a sample's draw must not depend on its batch."""
    from bigtransfer.data import HyperRuleTransform

    transform = HyperRuleTransform(40, 32)
    seeds = list(range(2**62 - 20_000, 2**62)) + list(range(20_000))  # near the sampler's wrap-around too
    top, left, flip = transform.batch_params(seeds)
    for offsets in (top, left):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 0.9 * len(seeds) / 9 and counts.max() < 1.1 * len(seeds) / 9
    assert abs(flip.mean() - 0.5) < 0.01 and abs(np.corrcoef(top, left)[0, 1]) < 0.02
    for i in (0, 7, 25_000, len(seeds) - 1):
        assert transform.params(seeds[i]) == (top[i], left[i], flip[i])
    assert not HyperRuleTransform(40, 32, train=False).batch_params(seeds)[2].any()
    assert not HyperRuleTransform(40, 32, random_crop=False).batch_params(seeds)[0].any()


@pytest.mark.parametrize("random_crop", [True, False])
def test_images_of_several_sizes_in_memory_train_exactly_as_from_files(tmp_path, random_crop):
    """--in-memory keeps them at the side the training transform resizes every image to first (resize, or crop
    without random crops): the same weights, bit for bit. Pre-training's Inception crop needs the originals:
    refused there."""
    from bigtransfer.pretraining import pretrain
    from images import make_image_folder

    root = make_image_folder(tmp_path / "images", classes=3, per_class=6, size=36)
    for i, path in enumerate(sorted(root.glob("*/*.png"))[::2]):
        Image.open(path).resize((30 + i, 44)).save(path)
    common = dict(steps=4, batch_size=6, base_lr=0.05, examples_per_class=4, random_crop=random_crop, **FAST)
    finetune(TINY, str(root), out=tmp_path / "files", **common)
    finetune(TINY, str(root), out=tmp_path / "memory", in_memory=True, **common)
    assert_same_weights(tmp_path / "files" / "model.safetensors", tmp_path / "memory" / "model.safetensors")
    with pytest.raises(ValueError, match=r"images of 10 sizes \(36x36, 44x30, .*\) cannot share one in-memory array"):
        pretrain(TINY, str(root), out=tmp_path / "pre", in_memory=True, epochs=1, batch_size=6, progress=False)


def test_device_data_finetune(tmp_path):
    r = finetune(TINY, "digits", open_dataset("digits", "test"), out=tmp_path / "run", steps=60, batch_size=32,
                 base_lr=0.05, device_data=True, examples_per_class=10, **FAST)
    assert r["eval"]["top1"] > 0.5


def test_other_labels_under_the_same_name_and_size_start_a_new_run(tmp_path, monkeypatch):
    """A Python Dataset is named by its type, a folder by its path: a second Dataset of the same type and size
    got the first one's results back, and a folder whose images moved between classes resumed on other labels."""
    images = (torch.rand(12, 3, 16, 16) * 255).to(torch.uint8)
    twos = torch.utils.data.TensorDataset(images, torch.arange(12) % 2)
    first = finetune(TINY, twos, out=tmp_path / "run", steps=2, batch_size=4, **FAST)
    halves = torch.utils.data.TensorDataset(images, torch.arange(12) // 6)  # same type, size and classes
    with pytest.raises(ValueError, match=r"other settings \(labels: '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        finetune(TINY, halves, out=tmp_path / "run", steps=2, batch_size=4, **FAST)
    again = torch.utils.data.TensorDataset(images.clone(), torch.arange(12) % 2)  # the same data in a new object
    assert finetune(TINY, again, out=tmp_path / "run", steps=2, batch_size=4, **FAST) == first
    for c in range(2):  # the same for a folder, whose images move between its class folders
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (16, 16), (40 * k, 90 * c, 0)).save(tmp_path / "folder" / f"class{c}" / f"{c}{k}.png")
    done = finetune(TINY, str(tmp_path / "folder"), out=tmp_path / "folder_run", steps=2, batch_size=4, **FAST)
    monkeypatch.chdir(tmp_path)  # the same folder spelled relative to here: the same data
    assert finetune(TINY, "folder", out=tmp_path / "folder_run", steps=2, batch_size=4, **FAST) == done
    shutil.move(tmp_path / "folder" / "class0" / "00.png", tmp_path / "folder" / "class1" / "00.png")
    shutil.move(tmp_path / "folder" / "class1" / "10.png", tmp_path / "folder" / "class0" / "10.png")
    with pytest.raises(ValueError, match=r"other settings \(labels: "):  # swapped: every count is the same
        finetune(TINY, str(tmp_path / "folder"), out=tmp_path / "folder_run", steps=2, batch_size=4, **FAST)


def test_a_run_on_a_folders_carved_part_is_not_a_run_on_other_images_of_it(tmp_path):
    """A run folder names the part of the data it trained on: one written before the held-out part was chosen by
    file name recorded the folder alone, and its parts held other images, so it is neither resumed nor returned."""
    from images import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=10, size=36)
    finetune(TINY, str(folder), str(folder), out=tmp_path / "run", steps=2, batch_size=4, **FAST)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    whole = f"folder:{os.path.abspath(folder)}"
    assert config["plan"]["data"] == f"{whole} (training part)"
    assert config["eval_data"].startswith(f"{whole} (held-out part) (")
    config["plan"]["data"], config["eval_data"] = whole, re.sub(r" \(held-out part\)", "", config.pop("eval_data"))
    config.pop("labels")  # as an earlier version wrote it
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"data: '{whole}' -> '{whole} (training part)'")):
        finetune(TINY, str(folder), str(folder), out=tmp_path / "run", steps=2, batch_size=4, **FAST)
