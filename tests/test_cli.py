"""The `bit` command line, run as users run it (real processes), and registry downloads end to end."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bigtransfer as bt
from bigtransfer.cli import main
from bigtransfer.models import ModelSpec, get_model_spec, register_model
from bit_process import SRC, bit
from http_server import serve_directory
from npz_reference import random_bit_npz


def run_main(capsys, *args):
    """The CLI in-process (same code path as the console script, without a new interpreter)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_and_help(capsys):
    script = Path(sys.executable).parent / "bit"
    if script.exists():  # installed with pip: the `bit` entry point itself
        assert "usage: bit" in subprocess.run([script, "--help"], capture_output=True, text=True).stdout
    assert "convert" in bit("--help").stdout  # python -m bigtransfer
    for command in ("models", "info", "convert", "download"):
        with pytest.raises(SystemExit) as exit_:
            run_main(capsys, command, "--help")
        assert exit_.value.code == 0
        assert "usage: bit " + command in capsys.readouterr().out


def test_models_table_shows_computed_numbers(capsys):
    out = run_main(capsys, "models")[1]
    vtab_runs = [n for n in bt.list_models() if "-run" in n]
    for name in bt.list_models():
        assert (name in out) == (name not in vtab_runs), name
    assert "and 285 BiT-M runs fine-tuned on VTAB-1k" in out  # listed by a pattern instead:
    assert {n for n in vtab_runs if n in run_main(capsys, "models", "BIT-M-*-RUN0-*")[1]} == \
        {n for n in vtab_runs if "-run0-" in n}
    with pytest.raises(SystemExit, match="no model name matches 'nope'"):
        main(["models", "nope"])
    r152x4 = get_model_spec("BiT-M-R152x4")
    row = next(line for line in out.splitlines() if "BiT-M-R152x4 " in line)
    assert f"{r152x4.arch.num_params(21843) / 1e6:.1f}" in row
    assert f"{r152x4.arch.macs(480, 21843) / 1e9:.2f}" in row  # 839.42: REFERENCE's 845 counts norms too
    assert "ImageNet-21k" in row and "no" in row


def test_plan_shows_the_held_out_part_a_folder_gives_up(tmp_path, capsys):
    from bigtransfer.data import open_dataset
    from images import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=3, per_class=20, size=40)
    rows = dict(re.findall(r"│ (training|held-out) examples +│ ([0-9,]+) ", run_main(capsys, "plan", "--model",
                                                                                 "BiT-R14x0.25", "--data", folder)[1]))
    trained, held_out = (len(open_dataset(str(folder), split)) for split in ("train", "eval"))
    assert rows == {"training": str(trained), "held-out": str(held_out)} and trained + held_out == 60
    assert "held-out" not in run_main(capsys, "plan", "--model", "BiT-R14x0.25", "--data", folder, "--eval-data",
                                      "none")[1]


def test_info_and_convert(tmp_path, capsys):
    random_bit_npz(tmp_path / "w.npz", (1, 1, 1, 1), 0.25, num_classes=3)
    info = run_main(capsys, "info", tmp_path / "w.npz")[1]
    assert re.search(r"parameter names\W+npz \(the authors' release\)", info) and "BiT-R14x0.25" in info
    assert "[1, 1, 1, 1]" in info and "head size" in info
    assert f"{bt.Architecture((1, 1, 1, 1), 0.25).num_params(3):,}" in info
    bt.save_weights(bt.create_model("BiT-S-R50x1", num_classes=2), tmp_path / "r50.safetensors")
    info = run_main(capsys, "info", tmp_path / "r50.safetensors")[1]
    words = " ".join(re.findall(r"[\w.,-]+", info))  # the table wraps the names
    assert "BiT-R50x1-distilled-160, 57 VTAB-1k runs" in words and "-run0-" not in info

    assert run_main(capsys, "convert", tmp_path / "w.npz", tmp_path / "w.pth")[0] == 0
    assert run_main(capsys, "convert", tmp_path / "w.pth", tmp_path / "ours.bin", "--to", "safetensors")[0] == 0
    assert bt.read_checkpoint(tmp_path / "w.pth").format == "timm"
    assert re.search(r"parameter names\W+timm ", run_main(capsys, "info", tmp_path / "w.pth")[1])
    assert bt.read_checkpoint(tmp_path / "ours.bin").format == "safetensors"

    code, _, err = run_main(capsys, "info", tmp_path / "absent.npz")
    assert code == 2 and "bit info: error: " in err and "absent.npz: no such checkpoint file" in err
    code, _, err = run_main(capsys, "convert", tmp_path / "w.npz", tmp_path / "out.xyz")
    assert code == 2 and "cannot tell the checkpoint format from 'out.xyz'" in err
    # in Python too, the name says the format unless one is given
    model = bt.ResNetV2(bt.Architecture((1, 1, 1, 1), 1), num_classes=3)  # width 1: HF's 32 groups fit
    for name, fmt in (("s.pth", "timm"), ("s.npz", "npz"), ("s.safetensors", "safetensors"), ("v1.5", "safetensors")):
        assert bt.read_checkpoint(bt.save_weights(model, tmp_path / name)).format == fmt
    assert bt.read_checkpoint(bt.save_weights(model, tmp_path / "s.bin", format="safetensors")).format == "safetensors"


def test_download_command_and_pretrained_true_through_a_mirror(tmp_path):
    """`bit download NAME` fetches the registry file from $BIT_MODELS_URL into $BIT_HOME; then
    `create_model(NAME, pretrained=True)` in another process finds it in the cache."""
    served = tmp_path / "mirror"
    served.mkdir()
    random_bit_npz(served / "BiT-S-R50x1.npz", (3, 4, 6, 3), 1, num_classes=1000)
    home = tmp_path / "home"
    with serve_directory(served) as server:
        env = {"BIT_MODELS_URL": server.url, "BIT_HOME": str(home)}
        bit("download", "BiT-S-R50x1", "--quiet", env=env)
        assert len(server.requests) == 1
        assert "BiT-S-R50x1" in bit("models", env=env).stdout.split("yes")[0].splitlines()[-1]
        code = "import bigtransfer as bt; m = bt.create_model('BiT-S-R50x1', pretrained=True); print(m.num_classes)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env, "PYTHONPATH": str(SRC)})
        assert proc.stdout.strip() == "1000", proc.stderr
        assert len(server.requests) == 1  # served from the cache
    cached = home / "checkpoints" / "BiT-S-R50x1.npz"
    assert cached.read_bytes() == (served / "BiT-S-R50x1.npz").read_bytes()


def test_registered_checkpoint_with_checksum(tmp_path, monkeypatch):
    served = tmp_path / "mirror"
    (served / "mine").mkdir(parents=True)
    source = bt.create_model("BiT-R14x0.25", num_classes=4, zero_head=False)
    path = bt.save_weights(source, served / "mine" / "tiny.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    register_model(ModelSpec("test-tiny-pretrained", source.arch, 4, 64, "test", "mine/tiny.safetensors", digest))
    register_model(ModelSpec("test-tiny-bad-sum", source.arch, 4, 64, "test", "mine/tiny.safetensors", "0" * 64))
    with serve_directory(served) as server:
        monkeypatch.setenv("BIT_MODELS_URL", server.url)
        model = bt.create_model("test-tiny-pretrained", pretrained=True)
        with pytest.raises(bt.checkpoints.DownloadError, match="sha256 mismatch"):
            bt.create_model("test-tiny-bad-sum", pretrained=True)
    # the server is gone, as on an offline machine: the error says why and where a copy fetched elsewhere goes
    register_model(ModelSpec("test-tiny-offline", source.arch, 4, 64, "test", "mine/offline.safetensors"))
    with pytest.raises(bt.checkpoints.DownloadError) as excinfo:
        bt.create_model("test-tiny-offline", pretrained=True)
    message = str(excinfo.value)
    assert "0 bytes received (last error: <urlopen error" in message and "refused" in message
    assert f"copy it to {bt.checkpoints.cache_dir() / 'checkpoints' / 'mine' / 'offline.safetensors'} " in message
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_a_download_that_is_not_the_checkpoint_is_not_cached(tmp_path, monkeypatch):
    """Released files have no published digests: an error page served with 200, a damaged archive or another
    network's file is read, refused and deleted, not cached as the model (and fetched never again)."""
    served, arch = tmp_path / "mirror", bt.create_model("BiT-R14x0.25").arch
    served.mkdir()
    (served / "page.npz").write_text("<html><body>Sign in to continue</body></html>")
    random_bit_npz(served / "good.npz", (1, 1, 1, 1), 0.25, num_classes=4)
    data = bytearray((served / "good.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped inside an array: the zip's CRC notices
    (served / "flipped.npz").write_bytes(bytes(data))
    monkeypatch.setenv("BIT_HOME", str(tmp_path / "home"))
    with serve_directory(served) as server:
        monkeypatch.setenv("BIT_MODELS_URL", server.url)
        for file, heads, why in (("page.npz", 4, "not a checkpoint"), ("flipped.npz", 4, "CRC"),
                                 ("good.npz", 10, "holds a BiT-R14x0.25 with 4 classes, test-dl-good.npz-10 is a "
                                                  "BiT-R14x0.25 with 10")):
            spec = register_model(ModelSpec(f"test-dl-{file}-{heads}", arch, heads, 32, "test", file))
            with pytest.raises(bt.checkpoints.DownloadError, match=f"{file} did not give the file wanted .*{why}") \
                    as refused:
                bt.checkpoints.download_pretrained(spec, progress=False)
            assert "internet" not in str(refused.value)  # the server answered: no advice for an offline machine
            assert not bt.checkpoints.cached_path(spec).exists() and not list((tmp_path / "home").rglob("*.part"))
        spec = register_model(ModelSpec("test-dl-good", arch, 4, 32, "test", "good.npz"))
        assert bt.create_model("test-dl-good", pretrained=True).num_classes == 4
    # a bad file cached before (by an older version, or copied there): the error says to delete it
    cached = bt.checkpoints.cached_path(spec)
    cached.write_bytes(bytes(data))
    with pytest.raises(bt.checkpoints.CheckpointError, match="It is the cached download of test-dl-good: delete it"):
        bt.create_model("test-dl-good", pretrained=True)


def test_fewshot_and_probe_commands(tmp_path, capsys):
    common = ["--model", "BiT-R14x0.25", "--data", "digits", "--shots", "2", "--seeds", "2"]
    run_main(capsys, "fewshot", *common, "--steps", "4", "--batch", "16", "--resolution", "36", "32",
             "--out", tmp_path / "fs")
    rows = json.loads((tmp_path / "fs" / "summary.json").read_text())["rows"]
    assert [(r["init"], r["examples_per_class"], r["seed"]) for r in rows] == [("scratch", 2, 0), ("scratch", 2, 1)]
    assert (tmp_path / "fs" / "runs" / "scratch_k2_seed1" / "model.safetensors").exists()
    _, out, _ = run_main(capsys, "probe", *common, "--full", "--resolution", "32", "--out", tmp_path / "pr")
    rows = json.loads((tmp_path / "pr" / "summary.json").read_text())["rows"]
    assert [r["examples_per_class"] for r in rows] == [2, 2, None]
    assert rows[-1]["accuracy"] > max(0.5, rows[0]["accuracy"], rows[1]["accuracy"])  # 1,000 examples beat 2 per class
    assert (tmp_path / "pr" / "accuracy.png").exists() and "linear probe" in out
    run_main(capsys, "probe", *common, "--full", "--resolution", "32", "--out", tmp_path / "pr2")
    again = json.loads((tmp_path / "pr2" / "summary.json").read_text())["rows"]
    assert again == rows  # the random-init baseline is the same network every time
    # a sweep folder holds one sweep: other settings are refused, not mixed into its table or written over it
    code, _, err = run_main(capsys, "fewshot", *common, "--steps", "4", "--batch", "16", "--resolution", "36", "32",
                            "--pretrained", tmp_path / "fs" / "runs" / "scratch_k2_seed0" / "model.safetensors",
                            "--out", tmp_path / "fs")
    assert code == 2 and "holds the results of other settings (pretrained: 'random' -> " in err
    code, _, err = run_main(capsys, "fewshot", *common[:-4], "--shots", "2", "200", "--out", tmp_path / "big")
    assert code == 2 and "has only" in err and "200 per class were asked for" in err
    assert not (tmp_path / "big" / "runs").exists()  # refused before any run trained
    code, _, err = run_main(capsys, "probe", *common[:-4], "--shots", "200", "--out", tmp_path / "pb")
    assert code == 2 and "200 per class were asked for" in err and not (tmp_path / "pb" / "sweep.json").exists()
    # so the corrected command is not refused; and a checkpoint's features are at the side its run trained at
    trained = tmp_path / "fs" / "runs" / "scratch_k2_seed0" / "model.safetensors"  # at 32 px
    _, out, _ = run_main(capsys, "probe", *common, "--pretrained", trained, "--out", tmp_path / "pb")
    assert json.loads((tmp_path / "pb" / "sweep.json").read_text())["resolution"] == 32
    assert "features at 32 px" in (tmp_path / "pb" / "report.md").read_text()
    # neither overwrites the other's results: a sweep's folder is no run, a run's folder takes no sweep results
    run = tmp_path / "fs" / "runs" / "scratch_k2_seed1"
    code, _, err = run_main(capsys, "probe", *common, "--out", run)
    assert code == 2 and f"{run} holds a training run (config.json)" in err
    code, _, err = run_main(capsys, "finetune", "--model", "BiT-R14x0.25", "--data", "digits", "--steps", "1",
                            "--out", tmp_path / "pr")
    assert code == 2 and "holds summary.json but no config.json" in err
    with pytest.raises(SystemExit):  # a probe trains no network: it has no HyperRule flags to ignore
        run_main(capsys, "probe", *common, "--lr", "0.1", "--out", tmp_path / "never")
    assert "unrecognized arguments: --lr 0.1" in capsys.readouterr().err
    from bigtransfer.protocols import few_shot_sweep

    digits = bt.data.open_dataset("digits")
    with pytest.raises(TypeError, match="few_shot_sweep takes a registry name .* not a ResNetV2"):
        few_shot_sweep(bt.create_model("BiT-R14x0.25"), digits, digits, tmp_path / "never")  # trained in place


@pytest.mark.parametrize(("args", "message"), [
    (("fewshot", "--model", "BiT-R14x0.25", "--data", "digits", "--shots", "0", "--out", "x"),
     "argument --shots: must be >= 1, got 0"),
    (("finetune", "--model", "BiT-R14x0.25", "--data", "digits", "--steps", "-5"), "argument --steps: must be >= 1"),
    (("finetune", "--model", "BiT-R14x0.25", "--data", "digits", "--lr", "0"), "argument --lr: must be > 0.0"),
    (("finetune", "--model", "BiT-R14x0.25", "--data", "digits", "--lr", "nan"), "argument --lr: must be > 0.0"),
    (("pretrain", "--model", "BiT-R14x0.25", "--data", "d", "--out", "x", "--min-crop-area", "2"),
     "argument --min-crop-area: must be <= 1.0, got 2"),
    (("shards", "src", "out", "--quality", "500"), "argument --quality: must be <= 100, got 500"),
    (("vtab", "tasks", "--model", "BiT-R14x0.25", "--out", "x", "--seed", "-1"), "argument --seed: must be >= 0"),
    (("predict", "a.png", "--model", "BiT-R14x0.25", "--top-k", "two"), "argument --top-k: 'two' is not a whole"),
])
def test_nonsense_numbers_stop_at_their_flag(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_main(capsys, *args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (("finetune", "--model", "BiT-R14x0.25", "--data", "digits", "--device", "gpu"),
     "bit finetune: error: device 'gpu': not a device name"),
    (("vtab", "nowhere", "--model", "BiT-R14x0.25", "--out", "x"), "bit vtab: error: VTAB folder not found: nowhere"),
    (("info", "missing.npz"), "bit info: error: "),
    (("vtab", ".", "--model", "BiT-R14x0.25", "--out", "x", "--search", "2", "--steps", "9"),
     "bit vtab: error: --steps: --search picks these per trial"),
    (("fewshot", "--model", "BiT-R14x0.25", "--data", "digits", "--examples-per-class", "3", "--out", "x"),
     "bit fewshot: error: --examples-per-class: bit fewshot draws the examples"),
])
def test_user_errors_are_one_line_naming_the_culprit(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, *args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert "missing.npz" in err or args[0] != "info"
