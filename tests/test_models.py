"""The architecture against REFERENCE.md section 2 and independent references (torchvision, torch's FLOP counter)."""

import logging
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bigtransfer as bt
import bigtransfer.inference  # noqa: F401  (bt.inference in the cache test)
from bigtransfer.models import get_model_spec, group_norm_groups
from bigtransfer.models.resnetv2 import StdConv2d

RELEASED = [f"BiT-{t}-R{a}" for t in "SM" for a in ("50x1", "50x3", "101x1", "101x3", "152x2", "152x4")]


def test_registry_has_every_released_variant():
    names = bt.list_models()
    for name in RELEASED + [f"{n}-ILSVRC2012" for n in RELEASED if n.startswith("BiT-M")]:
        assert name in names
    assert {"BiT-R50x1-distilled-224", "BiT-R50x1-distilled-160"} <= set(names)
    assert get_model_spec("BiT-M-R152x4").num_classes == 21843
    assert get_model_spec("BiT-S-R101x3").num_classes == 1000
    assert get_model_spec("bit-m-r50x1").name == "BiT-M-R50x1"  # case-insensitive
    assert get_model_spec("BiT-M-R152x4").arch.num_params(0) == pytest.approx(936e6, rel=0.01)
    assert get_model_spec("BiT-S-R50x1").arch.num_params(1000) == pytest.approx(25.5e6, rel=0.01)


def test_registry_has_the_release_s_vtab_runs():
    """The authors' README gives the 285 files as one wget pattern; every one is a name here, fetched from there."""
    import itertools

    pattern = ("BiT-M-{R50x1,R101x1,R50x3,R101x3,R152x4}-run{0,1,2}-{caltech101,diabetic_retinopathy,dtd,"
               "oxford_flowers102,oxford_iiit_pet,resisc45,sun397,cifar100,eurosat,patch_camelyon,smallnorb-elevation,"
               "svhn,dsprites-orientation,smallnorb-azimuth,clevr-distance,clevr-count,dmlab,kitti-distance,"
               "dsprites-xpos}")
    parts = re.split(r"\{([^}]*)\}", pattern)  # literal, choices, literal, choices...
    names = ["".join(p) for p in itertools.product(*[[x] if i % 2 == 0 else x.split(",") for i, x in enumerate(parts)])]
    assert len(names) == 285 and {n for n in bt.list_models() if "-run" in n} == set(names)
    spec = get_model_spec("BiT-M-R101x3-run2-smallnorb-azimuth")
    assert spec.url == "https://storage.googleapis.com/bit_models/vtab/BiT-M-R101x3-run2-smallnorb-azimuth.npz"
    assert (spec.num_classes, spec.arch) == (18, get_model_spec("BiT-M-R101x3").arch)
    assert [get_model_spec(f"BiT-M-R50x1-run0-{t}").resolution for t in ("cifar100", "dmlab")] == [128, 480]


def test_registry_urls_follow_the_base_address(monkeypatch):
    spec = get_model_spec("BiT-M-R50x1")
    assert spec.url == "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"
    monkeypatch.setenv("BIT_MODELS_URL", "http://127.0.0.1:9/mirror/")
    assert spec.url == "http://127.0.0.1:9/mirror/BiT-M-R50x1.npz"
    assert get_model_spec("BiT-R50x1-distilled-160").url == "http://127.0.0.1:9/mirror/distill/R50x1_160.npz"


def test_unknown_name_suggests_close_ones():
    with pytest.raises(KeyError, match="BiT-M-R50x1"):
        bt.create_model("BiT-M-R50x2")


def test_group_norm_rule():
    assert all(group_norm_groups(c) == 32 for c in (64, 128, 192, 256, 384, 2048, 8192))
    assert group_norm_groups(16) == 8 and group_norm_groups(32) == 16 and group_norm_groups(4) == 2
    assert group_norm_groups(24) == 12 and group_norm_groups(2) == 1
    tiny = bt.create_model("BiT-R14x0.25")
    for m in tiny.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 2


@pytest.mark.parametrize("scale", [1.0, 3e-5])
def test_weight_standardization_by_hand(scale):
    """REFERENCE section 2: biased variance, eps 1e-10. Kernels of variance ~1e-9 (scale 3e-5) make the eps
    count: timm's 1e-8 there gives another output."""
    conv = StdConv2d(3, 4, 3).double()
    with torch.no_grad():
        conv.weight.mul_(scale)
    flat = conv.weight.detach().reshape(4, -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)  # biased
    w_hat = ((flat - mean) / torch.sqrt(var + 1e-10)).reshape_as(conv.weight)
    x = torch.randn(1, 3, 8, 8, dtype=torch.double)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, padding=1), rtol=1e-12, atol=1e-12)


def test_group_norm_eps_by_hand():
    """GroupNorm(32) with eps 1e-5 (REFERENCE section 2), then ReLU: on activations of variance ~1e-6 the eps is
    a tenth of the denominator, so another eps shows."""
    norm = bt.create_model("BiT-R14x0.25").stages[0][0].norm1.double()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    x = 1e-3 * torch.randn(2, norm.num_channels, 5, 5, dtype=torch.double)
    g = x.reshape(2, norm.num_groups, -1)
    mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
    expected = ((g - mean) / torch.sqrt(var + 1e-5)).reshape_as(x) * norm.weight[:, None, None] \
        + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected.clamp_min(0), rtol=1e-12, atol=1e-12)


def test_root_pads_with_zeros_before_the_pool():
    """After ReLU-free conv outputs go negative, a -inf-padded pool would differ at the borders."""
    model = bt.create_model("BiT-R14x0.25")
    x = torch.randn(1, 3, 32, 32)
    y = model.root.conv(x)
    expected = F.max_pool2d(F.pad(y, (1, 1, 1, 1), value=0.0), 3, 2)
    assert torch.equal(model.root(x), expected)
    assert not torch.equal(model.root(x), F.max_pool2d(y, 3, 2, padding=1))


def test_unit_projection_takes_the_preactivated_input():
    unit = bt.create_model("BiT-R14x0.25").stages[1][0]
    x = torch.randn(1, 64, 8, 8)
    a = unit.norm1(x)
    body = unit.conv3(unit.norm3(unit.conv2(unit.norm2(unit.conv1(a)))))
    assert torch.allclose(unit(x), body + unit.proj(a), atol=1e-6)
    assert unit.conv2.stride == (2, 2) and unit.conv1.stride == (1, 1)  # the stride sits on the 3x3


def test_shapes_head_and_stages():
    model = bt.create_model("BiT-R14x0.25", num_classes=10)
    assert (model.head.weight == 0).all() and (model.head.bias == 0).all()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 512)
    assert model(x).shape == (2, 10) and (model(x) == 0).all()
    stages = model.forward_stages(x)
    assert [v.shape[-1] for v in stages.values()] == [16, 16, 8, 4, 2]  # strides 4, 4, 8, 16, 32
    model.reset_head(3)
    assert model(x).shape == (2, 3)
    model.reset_head(0)
    with pytest.raises(RuntimeError, match="no classification head"):
        model(x)
    assert bt.create_model("BiT-R14x0.25", num_classes=5, zero_head=False).head.weight.abs().sum() > 0
    model.reset_head(np.int64(4))  # a count from numpy is a count
    assert model.num_classes == 4
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        bt.create_model("BiT-R14x0.25", num_classes=-1)  # built a headless model before
    with pytest.raises(TypeError, match="num_classes must be a whole number, got 2.5"):
        bt.create_model("BiT-R14x0.25", num_classes=2.5)


@pytest.mark.parametrize("name,res", [("BiT-M-R50x1", 224), ("BiT-R14x0.25", 97), ("BiT-M-R101x3", 33)])
def test_macs_and_params_by_arithmetic_match_torch(name, res):
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = bt.ResNetV2(spec.arch, num_classes=spec.num_classes)
        x = torch.empty(1, 3, res, res)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert spec.arch.macs(res, spec.num_classes) == counter.get_total_flops() // 2
    assert spec.arch.num_params(spec.num_classes) == sum(p.numel() for p in model.parameters())


def test_r50x1_macs_equal_torchvision_resnet50():
    """Same conv shapes as ResNet-50 v1.5 (stride on the 3x3): an independent check of the arithmetic."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ref = torchvision.models.resnet50()
        x = torch.empty(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ref(x)
    assert get_model_spec("BiT-S-R50x1").arch.macs(224, 1000) == counter.get_total_flops() // 2


def test_new_head_is_logged_when_sizes_differ(tmp_path, caplog):
    source = bt.create_model("BiT-R14x0.25", num_classes=10, zero_head=False)
    bt.save_weights(source, tmp_path / "w.safetensors")
    with caplog.at_level(logging.INFO, logger="bigtransfer"):
        model = bt.create_model("BiT-R14x0.25", num_classes=4, pretrained=tmp_path / "w.safetensors")
    assert "checkpoint head has 10 classes, model has 4" in caplog.text
    assert model.head.out_features == 4 and (model.head.weight == 0).all()
    assert torch.equal(model.root.conv.weight, source.root.conv.weight)
    same = bt.create_model("BiT-R14x0.25", pretrained=tmp_path / "w.safetensors")  # keeps the checkpoint's head
    assert torch.equal(same.head.weight, source.head.weight)


def test_standardized_kernels_are_cached_for_inference_and_invalidated_by_updates(tmp_path):
    model = bt.create_model("BiT-R14x0.25", num_classes=3, zero_head=False)
    conv = model.stages[0][0].conv2
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first = model.eval()(x)
        cached = conv._cache.kernels["onednn"]
        assert torch.equal(model(x), first) and conv._cache.kernels["onednn"] is cached  # reused, not recomputed
    torch.testing.assert_close(dense(cached), standardize_by_hand(conv.weight.detach()))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()  # training never uses the cache
    opt.step()
    with torch.no_grad():
        after = model.eval()(x)
        assert not torch.equal(after, first)
        torch.testing.assert_close(dense(conv._cache.kernels["onednn"]), standardize_by_hand(conv.weight))
        torch.testing.assert_close(after, bt.inference.fold_weight_standardization(model)(x))
    bt.save_weights(bt.create_model("BiT-R14x0.25", num_classes=3, zero_head=False), tmp_path / "w.safetensors")
    bt.load_weights(model, tmp_path / "w.safetensors")  # copy_ into the parameters: the cache must notice
    with torch.no_grad():
        torch.testing.assert_close(conv.standardized_weight(), standardize_by_hand(conv.weight))


def test_no_edit_of_the_weights_leaves_a_stale_kernel():
    """Edits autograd's version counter does not see (through .data), new weight tensors that may reuse a freed
    one's memory (torch.func.functional_call, parametrizations), inference-tensor weights, compiled and traced
    models: every one must compute with the weights as they are, as a fresh copy of the model does."""
    import copy

    model = bt.create_model("BiT-R14x0.25", num_classes=5, zero_head=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.root.conv.weight.data.copy_(torch.randn_like(model.root.conv.weight))  # dense, through .data
        assert not torch.equal(model(x), before)
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x))
        conv = model.stages[0][0].conv2.weight
        conv.data.copy_(conv.data[torch.randperm(len(conv), generator=torch.Generator().manual_seed(2))])
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x))  # reordered through .data: the same sum
        model.stages[1][0].conv2.weight.data[0, 0, 0, 0] += 1.0  # sparse, through .data: seen after a mode switch
        torch.testing.assert_close(model.train().eval()(x), copy.deepcopy(model)(x))

        params = dict(model.named_parameters())
        for seed in range(6):  # new tensors each call, freed after it: their addresses come back
            torch.manual_seed(seed)
            weights = {k: torch.randn_like(v) * 0.1 if k.endswith("conv.weight") or ".conv" in k else v
                       for k, v in params.items()}
            reference = copy.deepcopy(model)
            reference.load_state_dict({**model.state_dict(), **weights})
            torch.testing.assert_close(torch.func.functional_call(model, weights, (x,)), reference(x))

    with torch.inference_mode():  # weights created under inference mode track no versions
        frozen = bt.create_model("BiT-R14x0.25", num_classes=5, zero_head=False).eval()
        frozen.load_state_dict(model.state_dict())
        torch.testing.assert_close(frozen(x), frozen(x))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # the second call once hit a data-pointer comparison, which breaks the graph
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
        batches = torch.randn(3, 2, 3, 32, 32)  # torch.func.vmap over batches of batches
        torch.testing.assert_close(torch.func.vmap(model)(batches), torch.stack([model(b) for b in batches]),
                                   rtol=1e-4, atol=1e-5)


def dense(kernel):
    """CPU inference keeps the kernel in oneDNN's blocked layout; compare its values."""
    return kernel.to_dense() if kernel.is_mkldnn else kernel


@pytest.mark.parametrize("res", [64, 67])
def test_inference_path_equals_the_training_path(res):
    """No-grad CPU inference runs oneDNN's fused conv(+residual) with packed kernels and a pool without a
    padded copy; it must compute what the plain autograd path computes, at even and odd sizes."""
    model = bt.create_model("BiT-R26x0.5", num_classes=5, zero_head=False).eval()
    x = torch.randn(3, 3, res, res)
    reference = model(x)  # gradients on: F.conv2d, out-of-place kernels
    with torch.inference_mode():
        fast = model(x)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_compiled_evaluation_traces_the_plain_path_in_one_graph():
    """Under torch.compile the oneDNN inference op is skipped (Inductor does its own fusion); a graph
    break per convolution would recompile each of them and fall back to eager."""
    model = bt.create_model("BiT-R14x0.25", num_classes=5, zero_head=False).eval()
    x = torch.randn(2, 3, 48, 48)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (9, 7), (7, 10)])
def test_zero_padded_max_pool_equals_pad_then_pool(size):
    from bigtransfer.models.resnetv2 import zero_padded_max_pool

    torch.manual_seed(0)
    x = (torch.randn(2, 3, *size) - 1.5).requires_grad_()  # mostly negative: the zero border wins often
    x_ref = x.detach().clone().requires_grad_()
    ours = zero_padded_max_pool(x)
    ref = F.max_pool2d(F.pad(x_ref, (1, 1, 1, 1)), kernel_size=3, stride=2)
    assert torch.equal(ours, ref) and (ref == 0).sum() >= 4
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def standardize_by_hand(w):
    flat = w.reshape(w.shape[0], -1).double()
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + 1e-10)).reshape_as(w).float()


PAGE_FAULTS = """
import resource, torch, bigtransfer as bt
torch.set_num_threads(1)
model = bt.create_model("BiT-R14x0.25", num_classes=10).eval()
x = torch.randn(64, 3, 224, 224)  # the largest activations are 51 MB: above any threshold glibc adapts to
with torch.inference_mode():
    for _ in range(3):  # the heap grows to its working size
        model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_importing_bigtransfer_stops_page_faults_on_every_forward():
    """With glibc's defaults every large activation is mmapped afresh and faulted in page by page;
    after `import bigtransfer` the freed heap is reused (BIGTRANSFER_MALLOC=system keeps the default)."""
    def faults(**env):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        return int(out.stdout.split()[-1])

    default, tuned = faults(BIGTRANSFER_MALLOC="system"), faults()
    assert default > 10_000 and tuned < default / 10, (default, tuned)


@pytest.mark.parametrize("height", [1, 3])
def test_bf16_weight_gradient_of_a_width_one_input_on_cpu(height):
    """A width-1 input (images of 16 px or less reach one) meets only the kernel's centre column. oneDNN's bf16
    backward at stride 2 (torch 2.14) filled the other columns' weight gradient from stale memory, in most
    draws: here each draw is checked against the same convolution in fp32."""
    torch.manual_seed(0)
    conv = StdConv2d(64, 64, 3, stride=2)
    for _ in range(8):
        x = torch.randn(16, 64, height, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        dy = torch.randn(y.shape)
        y.float().backward(dy)
        got, conv.weight.grad = conv.weight.grad, None
        conv(x).backward(dy)
        reference, conv.weight.grad = conv.weight.grad, None
        assert y.shape == (16, 64, (height + 1) // 2, 1) and torch.isfinite(got).all()
        assert (got - reference).abs().max() <= 0.03 * reference.abs().max()
