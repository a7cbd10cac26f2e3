"""predict / embed / export, through the command line where users meet them."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import bigtransfer as bt
from bigtransfer.cli import main
from bigtransfer.evaluate import evaluate
from bigtransfer.finetuning import finetune
from bigtransfer.inference import fold_weight_standardization, load_model
from bigtransfer.runtime import Runtime
from images import make_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    make_image_folder(root / "shapes", classes=3, per_class=8, size=32)
    finetune("BiT-R14x0.25", str(root / "shapes"), out=root / "run", steps=20, batch_size=12, base_lr=0.05,
             resolution=(36, 32), progress=False)
    return root


def run_cli(capsys, *args):
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_predict_names_the_classes(trained, capsys):
    files = sorted((trained / "shapes" / "class1").glob("*.png"))[:3]
    out = json.loads(run_cli(capsys, "predict", *files, "--model", trained / "run" / "model.safetensors",
                             "--top-k", "2"))
    assert [r["file"] for r in out] == [str(f) for f in files]
    # the two most probable classes of softmax(model(x)), computed here, under the names the run recorded
    from bigtransfer.data import HyperRuleTransform, decode_image, to_model_input

    model, classes, _ = load_model(trained / "run" / "model.safetensors")
    x = torch.stack([HyperRuleTransform(32, 32, train=False)(decode_image(f), 0) for f in files])
    with torch.no_grad():
        probs, top = model(to_model_input(x)).softmax(-1).topk(2)
    assert classes == ["class0", "class1", "class2"]
    for r, p, t in zip(out, probs.tolist(), top.tolist(), strict=True):
        assert [(e["label"], e["index"]) for e in r["top"]] == [(classes[i], i) for i in t]
        assert [e["probability"] for e in r["top"]] == pytest.approx(p, rel=1e-5)
    # the run's checkpoint.pt (an interrupted run has no model.safetensors yet) carries the names and side too
    assert json.loads(run_cli(capsys, "predict", *files, "--model", trained / "run" / "checkpoint.pt",
                              "--top-k", "2")) == out


def test_embed_matches_forward_features(trained, capsys, tmp_path):
    files = sorted((trained / "shapes" / "class0").glob("*.png"))[:4]
    ckpt = trained / "run" / "model.safetensors"
    run_cli(capsys, "embed", *files, "--model", ckpt, "--out", tmp_path / "f.npy")
    run_cli(capsys, "embed", *files, "--model", ckpt, "--out", tmp_path / "f.safetensors")
    features = np.load(tmp_path / "f.npy", allow_pickle=False)
    assert features.shape == (4, 512)
    np.testing.assert_array_equal(load_file(str(tmp_path / "f.safetensors"))["features"], features)
    model, _, resolution = load_model(ckpt)
    assert resolution == 32
    from bigtransfer.data import HyperRuleTransform, decode_image, to_model_input

    x = torch.stack([HyperRuleTransform(32, 32, train=False)(decode_image(f), 0) for f in files])
    with torch.no_grad():
        np.testing.assert_allclose(model.forward_features(to_model_input(x)).numpy(), features, rtol=1e-5, atol=1e-6)


def test_predict_and_embed_in_bf16(trained, capsys, tmp_path):
    """`--precision bf16` runs the model under bf16 autocast: the outputs are those of the model called by hand under
    torch.autocast (probabilities from the logits in fp32), within bf16's rounding of fp32's, not equal to them."""
    from bigtransfer.data import HyperRuleTransform, decode_image, to_model_input
    from bigtransfer.inference import embed, predict

    files = sorted((trained / "shapes" / "class2").glob("*.png"))[:4]
    ckpt = trained / "run" / "model.safetensors"
    run_cli(capsys, "embed", *files, "--model", ckpt, "--out", tmp_path / "f.npy", "--precision", "bf16")
    top = json.loads(run_cli(capsys, "predict", *files, "--model", ckpt, "--top-k", "3", "--precision", "bf16"))
    model, classes, _ = load_model(ckpt)
    x = to_model_input(torch.stack([HyperRuleTransform(32, 32, train=False)(decode_image(f), 0) for f in files]))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        by_hand, logits = model.forward_features(x).float(), model(x).float()
    with torch.no_grad():
        exact = model.forward_features(x)
    features = np.load(tmp_path / "f.npy", allow_pickle=False)
    np.testing.assert_allclose(features, by_hand.numpy(), rtol=1e-5, atol=1e-6)
    assert 1e-4 < float((by_hand - exact).norm() / exact.norm()) < 5e-2  # bf16 rounding, not fp32
    probs, ix = logits.softmax(-1).topk(3)
    for r, p, i in zip(top, probs.tolist(), ix.tolist(), strict=True):
        assert [e["index"] for e in r["top"]] == i
        assert [e["probability"] for e in r["top"]] == pytest.approx(p, rel=1e-5)
    assert np.array_equal(embed(model, files, 32, precision="bf16")[0], features)
    assert predict(model, files, classes, 3, 32, precision="bf16") == top
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        embed(model, files, 32, precision="fp8")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_reported_and_the_rest_still_done(trained, capsys, tmp_path, workers):
    """One corrupt file among many gets an error entry (predict) or a NaN row (embed) and exit status 1; the
    other images' outputs are those of a run without it, in the order given, folders read recursively."""
    ckpt = trained / "run" / "model.safetensors"
    good = sorted((trained / "shapes" / "class1").glob("*.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:60])  # a truncated PNG
    args = [good[0], corrupt, trained / "shapes" / "class1", "--model", ckpt, "--batch", "3", "--workers", workers]
    assert main(["predict", *map(str, args), "--top-k", "1"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["file"] for r in results] == [str(good[0]), str(corrupt), *map(str, good)]
    assert str(corrupt) in results[1]["error"] and "top" not in results[1]
    assert f"bit predict: 1 of {len(good) + 2} images could not be read" in captured.err
    assert str(corrupt) in captured.err
    alone = json.loads(run_cli(capsys, "predict", *good, "--model", ckpt, "--top-k", "1"))
    def top(entries):
        return [(e["top"][0]["label"], e["top"][0]["probability"]) for e in entries]

    labels, probabilities = zip(*top(alone), strict=True)
    for got in (top(results[2:]), top(results[:1]) + top(alone)[1:]):  # batches of other sizes: equal to rounding
        assert [g[0] for g in got] == list(labels)
        np.testing.assert_allclose([g[1] for g in got], probabilities, rtol=1e-5)

    assert main(["embed", *map(str, args), "--out", str(tmp_path / "f.safetensors")]) == 1
    assert "their rows are NaN" in capsys.readouterr().err
    features = load_file(str(tmp_path / "f.safetensors"))["features"]
    assert np.isnan(features[1]).all() and not np.isnan(np.delete(features, 1, axis=0)).any()
    run_cli(capsys, "embed", *good, "--model", ckpt, "--out", tmp_path / "alone.npy")
    np.testing.assert_allclose(features[2:], np.load(tmp_path / "alone.npy"), rtol=1e-5, atol=1e-6)


def test_missing_image_names_and_empty_folders_fail_up_front(trained, capsys, tmp_path):
    ckpt = str(trained / "run" / "model.safetensors")
    assert main(["predict", str(tmp_path / "nope.png"), "--model", ckpt]) == 2
    assert "nope.png: no such image file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["embed", str(tmp_path / "empty"), "--model", ckpt, "--out", str(tmp_path / "f.npy")]) == 2
    assert "empty: no image files in this folder" in capsys.readouterr().err
    assert not (tmp_path / "f.npy").exists()
    image = sorted((trained / "shapes" / "class0").glob("*.png"))[0]
    (tmp_path / "loop" / "a").mkdir(parents=True)
    (tmp_path / "loop" / "a" / "x.png").write_bytes(image.read_bytes())
    (tmp_path / "loop" / "a" / "up").symlink_to("..")  # a link back up the tree: each folder is read once
    assert len(json.loads(run_cli(capsys, "predict", tmp_path / "loop", "--model", ckpt))) == 1


def test_evaluation_and_inference_leave_the_model_in_its_mode(trained):
    """predict, embed and evaluate put a model in eval mode while they run and back in its own mode however they
    end: a notebook's interrupt inside the loop left it in eval mode."""
    model = bt.load_model(trained / "run" / "model.safetensors")[0].train()
    image = sorted((trained / "shapes" / "class1").glob("*.png"))[0]
    bt.predict(model, image, resolution=32)
    bt.embed(model, image, resolution=32)
    assert model.training
    seen = []

    def interrupted_batches():
        seen.append(model.training)
        raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, interrupted_batches(), model.num_classes, Runtime(torch.device("cpu")))
    assert seen == [False] and model.training


def test_the_python_api_takes_what_users_pass(trained, tmp_path, caplog):
    model, classes, resolution = bt.load_model(trained / "run" / "model.safetensors")
    image = sorted((trained / "shapes" / "class1").glob("*.png"))[0]
    one = bt.predict(model, image, classes, top_k=1, resolution=resolution)  # one name: that file, not its letters
    assert [r["file"] for r in one] == [str(image)] and one[0]["top"][0]["label"] in classes
    assert "no resolution given" not in caplog.text
    features, files, errors = bt.embed(model, str(image))  # no side given: 224, and a warning says so
    assert files == [str(image)] and not errors and "no resolution given: 224 px" in caplog.text
    for call, message in ((lambda: bt.predict(model, [], resolution=32), "no image files given"),
                          (lambda: bt.predict(model, image, classes[:2], resolution=32), "2 class names for a head"),
                          (lambda: bt.predict(model, image, top_k=0, resolution=32), "top_k must be >= 1"),
                          (lambda: bt.embed(model, image, batch_size=0), "batch_size must be >= 1"),
                          (lambda: bt.export(model, tmp_path / "m.onnx", "torchscript"), "name it .pt")):
        with pytest.raises(ValueError, match=message):
            call()
    assert {"predict", "embed", "export", "load_model", "pretrain"} <= set(dir(bt))


def test_folding_weight_standardization_is_exact():
    model = bt.create_model("BiT-R14x0.25", num_classes=5, zero_head=False).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fold_weight_standardization(model)(x), model(x), rtol=1e-5, atol=1e-6)
        half = bt.create_model("BiT-R14x0.25", num_classes=5, zero_head=False).eval().bfloat16()
        half.load_state_dict(model.state_dict())
        folded = fold_weight_standardization(half)  # in the model's dtype (and device), not fp32 CPU layers
        assert {p.dtype for p in folded.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(folded(x.bfloat16()).float(), model(x), rtol=0.1, atol=0.05)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(trained, capsys, tmp_path, fmt):
    ckpt = trained / "run" / "model.safetensors"
    out = tmp_path / f"model.{fmt}"
    run_cli(capsys, "export", "--model", ckpt, "--format", fmt, "--out", out, "--resolution", "32")
    model, _, _ = load_model(ckpt)
    if fmt == "torchscript":  # a bf16 model exports the fp32 file every runtime takes
        bt.export(load_model(ckpt)[0].bfloat16(), tmp_path / "from_bf16.pt", fmt, resolution=32)
        assert {p.dtype for p in torch.jit.load(str(tmp_path / "from_bf16.pt")).parameters()} == {torch.float32}
    x = torch.randn(3, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    with torch.no_grad():
        reference = model(x).numpy()
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    else:
        got = torch.jit.load(str(out))(x).detach().numpy()
    assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()
    # the features `bit embed` writes, as a model of its own (a backbone without a head too)
    run_cli(capsys, "export", "--model", ckpt, "--format", fmt, "--output", "features", "--out",
            tmp_path / f"features.{fmt}", "--resolution", "32")
    with torch.no_grad():
        reference = model.forward_features(x).numpy()
    if fmt == "onnx":
        session = ort.InferenceSession(str(tmp_path / f"features.{fmt}"), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["features"]
        got = session.run(None, {"images": x.numpy()})[0]
    else:
        got = torch.jit.load(str(tmp_path / f"features.{fmt}"))(x).detach().numpy()
    assert got.shape == (3, 512) and np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()
    backbone = bt.create_model("BiT-R14x0.25", num_classes=0)
    bt.export(backbone, tmp_path / f"backbone.{fmt}", fmt, resolution=32, output="features")
    if fmt == "torchscript":  # a program, which no checkpoint reader should take for a state dict
        from bigtransfer.checkpoints import CheckpointError

        with pytest.raises(CheckpointError, match=r"model.torchscript: a TorchScript program \(`bit export"):
            load_model(out)


def test_onnx_export_without_onnx_says_what_to_install(trained, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where it is not installed: `import onnx` fails
    ckpt = str(trained / "run" / "model.safetensors")
    assert main(["export", "--model", ckpt, "--out", str(tmp_path / "m.onnx")]) == 2
    assert "bit export: error: ONNX export needs the onnx package: pip install onnx" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_user_errors_name_the_file(trained, capsys, tmp_path):
    """A missing checkpoint path is a missing file, not an unknown model name; a backbone cannot predict;
    features go exactly where --out says (np.save would append .npy to another name)."""
    image = sorted((trained / "shapes" / "class0").glob("*.png"))[0]
    assert main(["predict", str(image), "--model", "runs/c10/model.safetensors"]) == 2
    assert "runs/c10/model.safetensors: no such checkpoint file" in capsys.readouterr().err
    backbone = bt.create_model("BiT-R14x0.25", num_classes=0)
    bt.save_weights(backbone, tmp_path / "backbone.safetensors")
    assert main(["predict", str(image), "--model", str(tmp_path / "backbone.safetensors")]) == 2
    assert "no classification head (a backbone): `bit embed` gives its features (`bit export --output features`" \
        in capsys.readouterr().err
    ckpt = trained / "run" / "model.safetensors"
    assert main(["embed", str(image), "--model", str(ckpt), "--out", str(tmp_path / "features")]) == 2
    assert "features: features are written as .npy or .safetensors" in capsys.readouterr().err
    assert not list(tmp_path.glob("features*"))
    run_cli(capsys, "embed", image, "--model", ckpt, "--out", tmp_path / "new" / "f.npy")
    assert np.load(tmp_path / "new" / "f.npy").shape == (1, 512)


def test_the_bundled_file_runs_at_the_resolution_it_was_trained_at():
    """Its file has no resolution in its metadata: the registry entry it is named after gives 32 px, as the name."""
    from bigtransfer.models import get_model_spec

    spec = get_model_spec("BiT-R14x0.25-glyphs")
    path = bt.checkpoints.download_pretrained(spec)
    assert load_model(path)[2] == load_model("BiT-R14x0.25-glyphs")[2] == spec.resolution == 32


def test_a_given_resolution_replaces_the_fallback_without_a_warning(trained, capsys, caplog, tmp_path):
    """A file that records no side (a released .npz) runs at 224 with a warning, or silently at the side given."""
    from npz_reference import random_bit_npz

    random_bit_npz(tmp_path / "BiT-X.npz", (1, 1, 1, 1), 0.25, num_classes=5)
    assert load_model(tmp_path / "BiT-X.npz", resolution=48)[2] == 48 and "records no input side" not in caplog.text
    image = sorted((trained / "shapes" / "class0").glob("*.png"))[0]
    run_cli(capsys, "embed", image, "--model", tmp_path / "BiT-X.npz", "--out", tmp_path / "f.npy", "--resolution", 40)
    assert "records no input side" not in caplog.text
    assert load_model(tmp_path / "BiT-X.npz")[2] == 224 and "records no input side" in caplog.text


def test_evaluate_against_the_models_own_predictions_with_and_without_the_matrix(trained, tmp_path, caplog,
                                                                                 monkeypatch):
    """Top-1 and the confusion matrix against argmax(model(x)) image by image, computed here; per_class=False
    (upstream's 21k classes) gives the same top-1 without the matrix; an unreadable image is left out, counted
    and logged in both."""
    import shutil

    from bigtransfer.data import HyperRuleTransform, open_dataset, to_model_input
    from bigtransfer.data.loader import eval_loader
    from bigtransfer.data.sources import BadImageError

    shutil.copytree(trained / "shapes", tmp_path / "shapes")
    (tmp_path / "shapes" / "class0" / "broken.png").write_bytes(b"not an image")
    for k, path in enumerate(sorted((tmp_path / "shapes" / "class1").glob("*.png"))[:3]):  # mislabelled: errors
        path.rename(tmp_path / "shapes" / "class2" / f"moved{k}.png")
    source = open_dataset(str(tmp_path / "shapes"), hold_out=False)
    model = load_model(trained / "run" / "model.safetensors")[0]
    transform = HyperRuleTransform(36, 32, train=False)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for i in range(len(source)):
        try:
            image, label = source[i]
        except BadImageError:
            continue
        with torch.no_grad():
            expected[label, int(model(to_model_input(transform(image, 0)[None])).argmax())] += 1
    cpu = Runtime(torch.device("cpu"))
    full = evaluate(model, eval_loader(source, transform, 5), 3, cpu)
    brief = evaluate(model, eval_loader(source, transform, 5), 3, cpu, per_class=False)
    assert full["confusion_matrix"] == expected.tolist() and full["examples"] == len(source) - 1 == 24
    # hits and misses both (which class the 20-step model gets wrong is up to a CPU's rounding: not asserted)
    assert full["top1"] == brief["top1"] == expected.trace().item() / 24 and 0 < expected.trace() < 24
    assert full["bad_images"] == brief["bad_images"] == 1 and "confusion_matrix" not in brief
    assert caplog.text.count("bad image skipped in evaluation: ") == 2 and "broken.png" in caplog.text
    monkeypatch.setattr("bigtransfer.evaluate.PER_CLASS_LIMIT", 2)  # by default, none past the limit (21k classes)
    assert evaluate(model, eval_loader(source, transform, 5), 3, cpu) == brief
