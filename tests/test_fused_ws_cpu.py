"""Weight Standardization's C kernels (the CPU default for fp32 kernels): values and gradients against torch's
batch norm in float64 for every pair of layouts, the channels_last output the convolutions want, when they
apply, and second-order gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtransfer.models import fused_ws_cpu
from bigtransfer.models.resnetv2 import WS_EPS, StdConv2d, batch_norm_standardize, standardize

pytestmark = pytest.mark.skipif(fused_ws_cpu._LIBRARY.get() is None, reason="no working C compiler")


def _errors(w, g, fn):
    """Largest error of fn's output and weight gradient in fp32, over the largest value, against float64."""
    w64 = w.double().requires_grad_()
    ref = standardize(w64)  # float64: torch's batch norm
    ref.backward(g.double())
    leaf = w.clone().requires_grad_()
    out = fn(leaf)
    out.backward(g)
    return out, leaf.grad, [((a.double() - b).abs().max() / b.abs().max()).item()
                            for a, b in ((out, ref), (leaf.grad, w64.grad))]


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last", "transposed view"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [
    (64, 3, 7, 7),     # the stem: 3 input channels, under one block of the transpose
    (24, 512, 3, 3),   # 4,608 per row
    (16, 40, 3, 3),    # 40 input channels: two blocks and a remainder
    (32, 256, 1, 1),   # 1x1: both layouts are the same memory
])
def test_matches_float64(shape, weight_layout, grad_layout):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05 + 0.02
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif weight_layout == "transposed view":
        w = w.transpose(2, 3)  # neither layout: copied first
    g = torch.randn(shape)
    if grad_layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)

    out, grad, ours = _errors(w, g, lambda t: fused_ws_cpu.standardize(t, WS_EPS))
    _, _, torchs = _errors(w, g, batch_norm_standardize)
    assert out.is_contiguous(memory_format=torch.channels_last)  # what oneDNN convolves NHWC activations with
    assert grad.shape == w.shape
    assert ours[0] < 2e-7 and ours[1] < 2e-7, (ours, torchs)
    assert ours[0] <= 1.5 * torchs[0] and ours[1] <= 1.5 * torchs[1], (ours, torchs)


def test_large_mean_keeps_its_digits():
    """Sums in double: a kernel whose mean is 1,000x its spread standardises to float precision."""
    torch.manual_seed(1)
    w = torch.randn(8, 64, 3, 3) * 1e-3 + 1.0
    g = torch.randn(8, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    _, _, ours = _errors(w, g, lambda t: fused_ws_cpu.standardize(t, WS_EPS))
    assert ours[0] < 1e-4 and ours[1] < 1e-4, ours


def test_which_weights_use_it():
    w = torch.randn(8, 4, 3, 3)
    assert fused_ws_cpu.usable(w) and fused_ws_cpu.usable(torch.nn.Parameter(w))
    assert not fused_ws_cpu.usable(w.double())
    assert not fused_ws_cpu.usable(w[:0])
    assert not fused_ws_cpu.usable(w.flatten(1))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not fused_ws_cpu.usable(w)  # dispatch modes see torch's ops

    conv = StdConv2d(16, 16, 3)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    kernel = conv.standardized_weight()  # training: recomputed at every call, through the C kernels
    assert "Standardize" in type(kernel.grad_fn).__name__
    assert kernel.is_contiguous(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    w64 = conv.weight.detach().double().requires_grad_()
    loss64 = F.conv2d(x.double(), standardize(w64), padding=1).square().sum()
    (expected,) = torch.autograd.grad(loss64, w64)
    assert ((conv.weight.grad.double() - expected).norm() / expected.norm()).item() < 1e-6


def test_same_bits_whatever_the_thread_count():
    """A row is summed by one thread in a fixed order, so results do not depend on the threads."""
    w = torch.randn(40, 32, 3, 3)
    g = torch.randn(40, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaf = w.clone().requires_grad_()
            out = fused_ws_cpu.standardize(leaf, WS_EPS)
            results.append((out, *torch.autograd.grad(out, leaf, g)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_double_backward_goes_through_torchs_ops(monkeypatch):
    """With create_graph=True (a gradient penalty) the backward runs through torch's differentiable ops: the
    second-order gradients equal those of the batch-norm form, the first-order ones those of the C kernels."""
    conv = StdConv2d(8, 8, 3)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)

    def grads(fused: bool):
        monkeypatch.setattr(fused_ws_cpu, "ENABLED", fused)
        assert ("Standardize" in type(conv.standardized_weight().grad_fn).__name__) == fused
        (dw,) = torch.autograd.grad(conv(x).square().sum(), conv.weight, create_graph=True)
        return [dw, *torch.autograd.grad(dw.square().sum(), conv.weight)]

    for ours, reference in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
