"""Reading checkpoints: formats detected from content, and clear errors for every kind of bad file."""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bigtransfer as bt
from bigtransfer.checkpoints import CheckpointError
from npz_reference import random_bit_npz

TINY = ((1, 1, 1, 1), 0.25)  # BiT-R14x0.25: narrow enough to stay fast, same layout as the big ones


@pytest.fixture
def tiny_npz(tmp_path):
    path = tmp_path / "tiny.npz"
    return path, random_bit_npz(path, *TINY, num_classes=6)


@pytest.mark.parametrize("fmt,suffix", [("npz", ".npz"), ("timm", ".pth"), ("timm", ".safetensors"),
                                        ("hf", ".safetensors"), ("safetensors", ".safetensors")])
def test_format_is_detected_from_content_not_extension(tmp_path, tiny_npz, fmt, suffix):
    model = bt.create_model("BiT-R14x0.25", pretrained=tiny_npz[0])
    written = bt.save_weights(model, tmp_path / f"w{suffix}", format=fmt)
    disguised = shutil.copy(written, tmp_path / "weights.bin")  # an extension that says nothing
    ckpt = bt.read_checkpoint(disguised)
    assert (ckpt.format, ckpt.arch, ckpt.num_classes) == (fmt, bt.Architecture(*TINY), 6)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state[key], value), key


def test_hf_backbone_and_ddp_prefixed_state_dicts(tmp_path, tiny_npz):
    model = bt.create_model("BiT-R14x0.25", pretrained=tiny_npz[0])
    hf = bt.read_checkpoint(bt.save_weights(model, tmp_path / "hf.safetensors", format="hf"))
    backbone = {k.removeprefix("bit."): v for k, v in hf_tensors(tmp_path / "hf.safetensors").items()
                if k.startswith("bit.")}  # HF BitModel: no "bit." prefix, no classifier
    save_file(backbone, str(tmp_path / "bitmodel.safetensors"))
    ckpt = bt.read_checkpoint(tmp_path / "bitmodel.safetensors")
    assert (ckpt.format, ckpt.num_classes) == ("hf", 0)
    assert hf.num_classes == 6

    timm_sd = torch.load(bt.save_weights(model, tmp_path / "t.pth", format="timm"), weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_sd.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    assert bt.read_checkpoint(tmp_path / "ddp.pth").format == "timm"


def hf_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_missing_array_is_named(tmp_path, tiny_npz):
    arrays = dict(tiny_npz[1])
    del arrays["resnet/block2/unit01/b/group_norm/gamma"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"missing.npz: missing array 'resnet/block2/unit01/b/group_norm/gamma'"):
        bt.read_checkpoint(tmp_path / "missing.npz")


@pytest.mark.parametrize("array", ["stages.0.0.conv1.weight", "stages.2.0.conv1.weight", "stages.1.0.norm2.bias"])
def test_missing_array_of_a_unit_is_named_not_read_as_a_shallower_net(tmp_path, tiny_npz, array):
    state = {k: v.contiguous() for k, v in bt.read_checkpoint(tiny_npz[0]).state.items() if k != array}
    save_file(state, str(tmp_path / "holed.safetensors"))
    with pytest.raises(CheckpointError, match=rf"holed.safetensors: missing array '{array}' \(a safetensors "
                                              r"checkpoint of a BiT-R14x0.25\)"):
        bt.read_checkpoint(tmp_path / "holed.safetensors")


def test_a_foreign_network_with_a_stem_is_refused(tmp_path):
    save_file({"stem.conv.weight": torch.zeros(32, 3, 3, 3), "s1.b1.conv1.conv.weight": torch.zeros(32, 32, 1, 1)},
              str(tmp_path / "regnet.safetensors"))
    with pytest.raises(CheckpointError, match="regnet.safetensors: no residual units .* not a BiT ResNet-v2"):
        bt.read_checkpoint(tmp_path / "regnet.safetensors")


def test_a_model_hf_cannot_hold_is_refused_without_leaving_a_folder(tmp_path, tiny_npz):
    model = bt.create_model("BiT-R14x0.25", pretrained=tiny_npz[0])
    with pytest.raises(CheckpointError, match="HF transformers' Bit uses 32 groups everywhere"):
        bt.save_weights(model, tmp_path / "hf_dir", format="hf")
    assert not (tmp_path / "hf_dir").exists()
    for name, fmt in (("x.npz", "timm"), ("x.npz", "safetensors"), ("x.safetensors", "npz")):
        with pytest.raises(ValueError, match=f"{name}: a {fmt} checkpoint is written as a .* file"):
            bt.save_weights(model, tmp_path / name, format=fmt)


def test_written_files_get_the_usual_permissions_and_conversions_keep_metadata(tmp_path):
    """safetensors writes its file 0600 in place of ours; a fine-tuned model's class names and resolution must
    survive `bit convert`, and an HF folder it writes reads back as a checkpoint."""
    from bigtransfer.cli import main
    from bigtransfer.inference import load_model

    random_bit_npz(tmp_path / "r14x1.npz", (1, 1, 1, 1), 1, num_classes=6)  # width 1: HF's 32 groups fit
    old = os.umask(0o022)
    try:
        model = bt.ResNetV2(bt.read_checkpoint(tmp_path / "r14x1.npz").arch, num_classes=6)
        bt.load_weights(model, tmp_path / "r14x1.npz")
        meta = {"bigtransfer.classes": '["a", "b", "c", "d", "e", "f"]', "bigtransfer.resolution": "48",
                "bigtransfer.multi_label": "true"}
        src = bt.save_weights(model, tmp_path / "ft.safetensors", metadata=meta)
        assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 0
        assert main(["convert", str(src), str(tmp_path / "hf_dir"), "--to", "hf"]) == 0
        for path in (src, tmp_path / "copy.safetensors", tmp_path / "hf_dir" / "model.safetensors"):
            assert os.stat(path).st_mode & 0o777 == 0o644, path
    finally:
        os.umask(old)
    for path in (tmp_path / "copy.safetensors", tmp_path / "hf_dir"):
        net, classes, resolution = load_model(path)
        assert classes == list("abcdef") and resolution == 48 and net.multi_label
        for key, value in model.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key
    assert bt.read_checkpoint(tmp_path / "hf_dir").format == "hf"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        bt.save_weights(model, tmp_path / "hf_dir")
    # the HF config carries the class names too (HF's pipelines show them; a folder HF saved again keeps them)
    config = json.loads((tmp_path / "hf_dir" / "config.json").read_text())
    assert config["id2label"] == {str(i): c for i, c in enumerate("abcdef")} and config["label2id"]["f"] == 5
    assert config["problem_type"] == "multi_label_classification"  # HF's name for a sigmoid head
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "hf_dir" / "model.safetensors"
    save_file(load_file(weights), weights)  # as HF writes it: no metadata of ours
    assert load_model(tmp_path / "hf_dir")[1] == list("abcdef") and load_model(tmp_path / "hf_dir")[0].multi_label
    # labels renamed the HF way, in config.json, win over those our own copy of the file still carries
    assert main(["convert", str(src), str(tmp_path / "bit-r14.v2"), "--to", "hf"]) == 0  # a dotted name: a folder
    renamed = json.loads((tmp_path / "bit-r14.v2" / "config.json").read_text())
    renamed["id2label"] = {str(i): c for i, c in enumerate("uvwxyz")}
    (tmp_path / "bit-r14.v2" / "config.json").write_text(json.dumps(renamed))
    assert load_model(tmp_path / "bit-r14.v2")[1] == list("uvwxyz")
    # a config for another layout would load every array and compute something else
    (tmp_path / "hf_dir" / "config.json").write_text(json.dumps({**config, "global_padding": "SAME"}))
    with pytest.raises(CheckpointError, match=r"config.json: global_padding='SAME': not BiT's layout"):
        bt.read_checkpoint(tmp_path / "hf_dir")


def test_a_tensors_only_target_says_what_it_leaves_out(tmp_path, caplog):
    model = bt.create_model("BiT-R14x0.25", num_classes=3)
    meta = {"bigtransfer.classes": '["a", "b", "c"]', "bigtransfer.resolution": "48"}
    ckpt = bt.read_checkpoint(bt.save_weights(model, tmp_path / "ft.safetensors", metadata=meta))
    for name, fmt in (("ft.pth", "timm"), ("ft.npz", "npz")):
        bt.checkpoints.write_checkpoint(ckpt.state, ckpt.arch, tmp_path / name, fmt, metadata=ckpt.metadata)
        assert f"{name}: a {'torch' if fmt == 'timm' else 'npz'} file holds tensors only: the checkpoint's " \
               "classes and resolution are left out" in caplog.text


def test_integer_weights_are_named(tmp_path, tiny_npz):
    arrays = dict(tiny_npz[1])
    key = "resnet/block2/unit01/b/standardized_conv2d/kernel"
    arrays[key] = arrays[key].astype(np.int32)  # would load as zeros where every weight is below 1
    np.savez(tmp_path / "int.npz", **arrays)
    with pytest.raises(CheckpointError, match=f"int.npz: array '{key}' holds torch.int32 values; weights are floating"):
        bt.read_checkpoint(tmp_path / "int.npz")


def test_wrong_shape_is_named(tmp_path, tiny_npz):
    arrays = dict(tiny_npz[1])
    arrays["resnet/block3/unit01/c/standardized_conv2d/kernel"] = np.zeros((1, 1, 64, 255), np.float32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"shape.npz: array 'resnet/block3/unit01/c/standardized_conv2d/kernel' "
                                              r"has shape \(1, 1, 64, 255\), a BiT-R14x0.25 needs \(1, 1, 64, 256\)"):
        bt.read_checkpoint(tmp_path / "shape.npz")


@pytest.mark.parametrize("key,array,message", [
    ("resnet/head/conv2d/kernel", np.zeros((2, 1, 512, 6), np.float32),
     r"has shape \(2, 1, 512, 6\), a BiT-R14x0.25 needs \(1, 1, 512, 6\)"),
    ("resnet/head/conv2d/kernel", np.zeros(6, np.float32), r"has shape \(6,\), a BiT-R14x0.25 needs \(1, 1, 512, 6\)"),
    ("resnet/head/conv2d/bias", np.zeros((6, 1), np.float32), r"has shape \(6, 1\): a bias is a vector"),
    ("resnet/head/conv2d/bias", np.zeros(7, np.float32), r"has 7 classes, 'resnet/head/conv2d/kernel' 6"),
    ("resnet/root_block/standardized_conv2d/kernel", np.zeros(3, np.float32),
     r"has shape \(3,\): a convolution kernel has 4 dimensions"),
    ("resnet/block2/unit01/a/group_norm/gamma", np.full(64, np.nan, np.float32), "holds NaN or infinite values"),
])
def test_arrays_of_impossible_shapes_or_values_are_named(tmp_path, tiny_npz, key, array, message):
    """Shapes that cannot even be rearranged into ours (torch raised its own reshape or index errors, naming
    neither file nor array), and weights a diverged run left: predictions would all be NaN."""
    np.savez(tmp_path / "odd.npz", **{**tiny_npz[1], key: array})
    with pytest.raises(CheckpointError, match=rf"odd.npz: .*'{key}' {message}"):
        bt.read_checkpoint(tmp_path / "odd.npz")


def test_metadata_and_hf_configs_of_the_wrong_kind_are_named(tmp_path, tiny_npz):
    model = bt.ResNetV2(bt.read_checkpoint(tiny_npz[0]).arch, num_classes=6)
    for meta, message in (({"bigtransfer.resolution": "abc"}, "'bigtransfer.resolution' must be a positive number"),
                          ({"bigtransfer.resolution": "0"}, "'bigtransfer.resolution' must be a positive number"),
                          ({"bigtransfer.classes": "[a, b"}, "'bigtransfer.classes' is not JSON"),
                          ({"bigtransfer.classes": '["a", "b"]'}, "'bigtransfer.classes' must list the head's 6")):
        path = bt.save_weights(model, tmp_path / "meta.safetensors", metadata=meta)
        with pytest.raises(CheckpointError, match=rf"meta.safetensors: metadata {message}"):
            bt.read_checkpoint(path)
    random_bit_npz(tmp_path / "r14x1.npz", (1, 1, 1, 1), 1, num_classes=6)  # width 1: HF's 32 groups fit
    wide = bt.ResNetV2(bt.read_checkpoint(tmp_path / "r14x1.npz").arch, num_classes=6)
    bt.save_weights(wide, tmp_path / "hf", format="hf")
    for config in ([1, 2], {"id2label": ["a", "b"]}):
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=r"config.json: not an HF model config"):
            bt.read_checkpoint(tmp_path / "hf")


def test_unexpected_arrays_are_named(tmp_path, tiny_npz):
    np.savez(tmp_path / "extra.npz", **tiny_npz[1], **{"resnet/block1/unit01/a/extra": np.zeros(3)})
    with pytest.raises(CheckpointError, match="resnet/block1/unit01/a/extra"):
        bt.read_checkpoint(tmp_path / "extra.npz")


def test_architecture_mismatch(tiny_npz):
    with pytest.raises(CheckpointError, match="holds a BiT-R14x0.25.*the model is a BiT-R26x0.5"):
        bt.create_model("BiT-R26x0.5", pretrained=tiny_npz[0])


@pytest.mark.parametrize("fmt,suffix", [("npz", ".npz"), ("safetensors", ".safetensors"), ("timm", ".pth")])
def test_truncated_files(tmp_path, tiny_npz, fmt, suffix):
    model = bt.create_model("BiT-R14x0.25", pretrained=tiny_npz[0])
    path = bt.save_weights(model, tmp_path / f"w{suffix}", format=fmt)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=rf"w{suffix}: .*(truncated|broken)"):
        bt.read_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_in_torch_file_is_refused(tmp_path, tiny_npz):
    torch.save({"root.conv.weight": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refusing to unpickle"):
        bt.read_checkpoint(tmp_path / "evil.pth")
    with open(tmp_path / "legacy.pth", "wb") as f:  # old-style (non-zip) pickle
        pickle.dump({"x": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"legacy.pth: refusing to unpickle"):
        bt.read_checkpoint(tmp_path / "legacy.pth")


def test_object_array_in_npz_is_refused(tmp_path, tiny_npz):
    arrays = dict(tiny_npz[1])
    arrays["resnet/group_norm/gamma"] = np.array([Payload()], dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"obj.npz: array 'resnet/group_norm/gamma' cannot be loaded without"):
        bt.read_checkpoint(tmp_path / "obj.npz")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.npz: not a checkpoint"):
        bt.read_checkpoint(tmp_path / "notes.npz")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        bt.read_checkpoint(tmp_path / "absent.npz")


def test_writes_are_atomic(tmp_path, tiny_npz):
    """A write that fails half-way (a file size limit, as a full disk) leaves the previous file untouched and no
    temporary behind."""
    import resource

    model = bt.create_model("BiT-R14x0.25", pretrained=tiny_npz[0])
    target = bt.save_weights(model, tmp_path / "w.safetensors")
    before = target.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))  # Python ignores SIGXFSZ: EFBIG
    try:
        with pytest.raises(OSError) as failed:
            bt.save_weights(bt.create_model("BiT-R14x0.25", zero_head=False), target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (failed.value.errno, failed.value.filename) == (errno.EFBIG, str(target)) and target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz", "w.safetensors"]


def test_a_write_that_fails_names_the_file(tmp_path):
    """A file size limit (as a full disk) fails the write with errno's words only; the error names the file, and
    nothing half-written is left."""
    import resource

    from bigtransfer.runs import RunDir

    model = bt.create_model("BiT-R14x0.25")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError) as npz:
            bt.save_weights(model, tmp_path / "w.npz")
        with pytest.raises(OSError) as checkpoint:
            RunDir(tmp_path / "run").save_checkpoint({"step": 1, "model": model.state_dict()})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert npz.value.filename == str(tmp_path / "w.npz") and npz.value.errno == errno.EFBIG
    assert checkpoint.value.filename == str(tmp_path / "run" / "checkpoint.pt")
    assert "could not be written" in str(checkpoint.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["run"]


def test_the_released_heads_say_how_they_score():
    """BiT-M's ImageNet-21k head was trained with sigmoid cross-entropy (multi-label data; the authors' answer
    to how BiT-M was trained), BiT-S's and every fine-tuned head with softmax. A released file records nothing: its
    registry entry (found by the file's name) says; a record in the file wins."""
    from bigtransfer.checkpoints import Checkpoint, head_is_multi_label, registry_entry

    m = bt.get_model_spec("BiT-M-R50x1")
    assert m.multi_label and not bt.get_model_spec("BiT-S-R50x1").multi_label
    assert not bt.get_model_spec("BiT-M-R50x1-ILSVRC2012").multi_label  # fine-tuned: softmax
    assert registry_entry("/downloads/BiT-M-R50x1.npz") is m and registry_entry("mine.npz") is None

    def released(num_classes, name="BiT-M-R50x1.npz", **metadata):
        return Checkpoint(Path(name), "npz", m.arch, num_classes, {}, metadata)

    assert head_is_multi_label(released(21843)) and not head_is_multi_label(released(21843, "r50.npz"))
    assert not head_is_multi_label(released(10))  # another head than the release's
    assert not head_is_multi_label(released(21843, **{"bigtransfer.multi_label": "false"}))


def test_a_released_bit_m_head_keeps_its_sigmoid_when_converted_or_saved(tmp_path, caplog, capsys):
    """The released file records nothing; its name says. Converted or saved from a loaded model, the new file
    records it (and, converted, the side), where its name no longer says. A stand-in: a tiny network with the
    21,843-class head, under the release's file name."""
    from bigtransfer.cli import main
    from bigtransfer.inference import load_model

    released = tmp_path / "BiT-M-R50x1.npz"
    random_bit_npz(released, *TINY, num_classes=21843)
    model, _, side = load_model(released)
    assert model.multi_label and side == bt.get_model_spec("BiT-M-R50x1").resolution
    assert main(["convert", str(released), str(tmp_path / "r50.safetensors")]) == 0
    bt.save_weights(model, tmp_path / "saved.safetensors")
    caplog.clear()
    converted, _, converted_side = load_model(tmp_path / "r50.safetensors")
    assert converted.multi_label and converted_side == side and "records no input side" not in caplog.text
    assert load_model(tmp_path / "saved.safetensors")[0].multi_label
    shutil.copy(released, tmp_path / "renamed.npz")  # under another name, nothing says so
    assert not load_model(tmp_path / "renamed.npz")[0].multi_label
    capsys.readouterr()
    assert main(["info", str(released)]) == 0 and "21843 (sigmoid: multi-label)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "renamed.npz")]) == 0 and "21843 (softmax)" in capsys.readouterr().out
