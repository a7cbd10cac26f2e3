"""Winograd F(4x4, 3x3) for CPU inference: its convolution against torch's in float64 at sizes that do and do not
fill whole tiles, the layers it takes and leaves, and the model's inference with it against the training path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import bigtransfer as bt
from bigtransfer.models import winograd_cpu
from bigtransfer.models.resnetv2 import StdConv2d

pytestmark = pytest.mark.skipif(winograd_cpu.library() is None, reason="no working C compiler")


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (3, 32, 5, 7), (1, 16, 1, 1), (2, 48, 6, 9), (4, 16, 13, 4)])
def test_convolution_against_float64(shape):
    """Tiles that cross the image's edges (sizes not multiples of 4, a 1x1 image) read zeros there and write only
    the outputs inside; channels in and out differ; the kernel's transform reads a non-contiguous weight (as an
    input gradient's flipped, transposed one would be)."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], 32, 3, 3).flip(-1).transpose(0, 1)  # not contiguous: transposed, flipped
    expected = F.conv2d(x.double(), weight.double(), padding=1)
    result = winograd_cpu.conv3x3(x, winograd_cpu.transform_kernel(weight))
    assert result.shape == expected.shape and result.is_contiguous(memory_format=torch.channels_last)
    direct = _relative_error(F.conv2d(x, weight, padding=1), expected)
    winograd = _relative_error(result, expected)
    assert winograd < 1e-5 and winograd < 30 * direct, (winograd, direct)  # rounding, not a wrong term


def test_chunks_of_samples_compute_the_same(monkeypatch):
    """Peak memory is bounded by transforming a few samples at a time; the chunks must cover every sample."""
    x = torch.randn(7, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    kernel = winograd_cpu.transform_kernel(torch.randn(16, 16, 3, 3))
    whole = winograd_cpu.conv3x3(x, kernel)
    monkeypatch.setattr(winograd_cpu, "CHUNK_BYTES", 36 * 9 * 16 * 4 * 2)  # two samples' transforms
    torch.testing.assert_close(winograd_cpu.conv3x3(x, kernel), whole, rtol=1e-6, atol=1e-6)


def test_which_layers_it_takes():
    conv = StdConv2d(128, 128, 3)
    x = torch.randn(16, 128, 14, 14).contiguous(memory_format=torch.channels_last)
    assert winograd_cpu.usable(x, conv)
    assert not winograd_cpu.usable(x.contiguous(), conv)  # NCHW
    assert not winograd_cpu.usable(x.double(), conv)
    assert not winograd_cpu.usable(x, StdConv2d(128, 128, 3, stride=2))
    assert not winograd_cpu.usable(x, StdConv2d(128, 128, 1))
    assert not winograd_cpu.usable(x[:1], conv)  # 16 tiles: too few to pay for reading the transformed kernel
    assert not winograd_cpu.usable(torch.randn(16, 120, 14, 14).contiguous(memory_format=torch.channels_last),
                                   StdConv2d(120, 128, 3))  # not whole vectors of 16 channels
    assert winograd_cpu.worthwhile((1, 64, 28, 28), 64) and winograd_cpu.worthwhile((32, 512, 4, 4), 512)
    assert not winograd_cpu.worthwhile((256, 32, 56, 56), 32) and not winograd_cpu.worthwhile((64, 64, 56, 56), 32)


def test_a_call_it_cannot_compute_is_refused():
    """The C code trusts shapes and layouts; the Python entry checks them, so a wrong call is an error, not a
    read past a buffer."""
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    kernel = winograd_cpu.transform_kernel(torch.randn(16, 32, 3, 3))
    for bad_x, bad_kernel in ((x.contiguous(), kernel), (x.double(), kernel), (x[:, :16], kernel),
                              (x, kernel.transpose(1, 2)), (x, kernel[:, :, :8].contiguous())):
        with pytest.raises(ValueError, match="winograd conv3x3"):
            winograd_cpu.conv3x3(bad_x, bad_kernel)


def _winograd_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, StdConv2d) and module._cache is not None and "winograd" in module._cache.kernels]


def test_model_inference_against_the_training_path():
    """R26x0.5 at 64 px, batch 32: stages 2-4 (64-256 channels) run Winograd in inference, and the output is what
    the autograd path (F.conv2d) computes, to Winograd's rounding."""
    torch.manual_seed(0)
    model = bt.create_model("BiT-R26x0.5", num_classes=10, zero_head=False).eval()
    x = torch.randn(32, 3, 64, 64)
    reference = model(x)  # gradients on
    with torch.inference_mode():
        fast = model(x)
    assert _winograd_layers(model) == [f"stages.{s}.1.conv2" for s in (1, 2, 3)]  # units 0 have stride 2
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    features = model.forward_features(x).detach()
    with torch.inference_mode():
        assert _relative_error(model.forward_features(x), features.double()) < 1e-4


def test_a_weight_edit_reaches_the_transformed_kernel():
    """The transformed kernel is cached like oneDNN's packed one: an edit through .data (no version bump) and an
    optimiser step (a version bump), each made while the kernel is cached, give what a fresh copy computes."""
    torch.manual_seed(1)
    model = bt.create_model("BiT-R26x0.5", num_classes=4, zero_head=False).eval()
    x = torch.randn(32, 3, 64, 64)
    conv = model.stages[3][1].conv2
    optimizer = torch.optim.SGD([conv.weight], lr=0.5)
    with torch.no_grad():
        first = model(x)
        kernel = conv._cache.kernels["winograd"]
        assert torch.equal(model(x), first) and conv._cache.kernels["winograd"] is kernel  # reused
        conv.weight.data.mul_(-1.0).add_(0.01)
        edited = model(x)
        assert conv._cache.kernels["winograd"] is not kernel
        torch.testing.assert_close(edited, copy.deepcopy(model)(x), rtol=0, atol=0)
        kernel = conv._cache.kernels["winograd"]
    conv.weight.grad = torch.randn_like(conv.weight)  # no forward with gradients: that would drop the cache
    optimizer.step()
    with torch.no_grad():
        stepped = model(x)
        assert conv._cache.kernels["winograd"] is not kernel and not torch.equal(stepped, edited)
        torch.testing.assert_close(stepped, copy.deepcopy(model)(x), rtol=0, atol=0)


def test_batch_sizes_on_both_sides_of_the_threshold_keep_both_kernels():
    """A batch too small for Winograd runs oneDNN's packed kernel; alternating the two prepares neither again."""
    torch.manual_seed(2)
    model = bt.create_model("BiT-R26x0.5", num_classes=4, zero_head=False).eval()
    x, small = torch.randn(32, 3, 64, 64), torch.randn(1, 3, 64, 64)
    conv = model.stages[3][1].conv2
    with torch.no_grad():
        model(x)
        model(small)
        kernels = dict(conv._cache.kernels)
        assert set(kernels) == {"winograd", "onednn"}
        torch.testing.assert_close(model(small), copy.deepcopy(model)(small), rtol=0, atol=0)
        model(x)
        assert all(conv._cache.kernels[form] is kernel for form, kernel in kernels.items())


def test_the_default_dtype_does_not_reach_the_buffers():
    """`torch.set_default_dtype(torch.float64)` (common in numerical code) must not change what the fp32 buffers
    of `conv3x3` are."""
    x = torch.randn(4, 64, 12, 12).contiguous(memory_format=torch.channels_last)
    kernel = winograd_cpu.transform_kernel(torch.randn(64, 64, 3, 3))
    expected = winograd_cpu.conv3x3(x, kernel)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = winograd_cpu.conv3x3(x, kernel)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
