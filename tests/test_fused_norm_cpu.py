"""The fused GroupNorm+ReLU C kernels (the CPU default for channels_last fp32): values and the three gradients
against torch's GroupNorm + ReLU in float64, when they apply, and what happens without a C compiler."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bigtransfer.models import fused_norm_cpu
from bigtransfer.models.native import NativeLibrary
from bigtransfer.models.resnetv2 import GroupNormAct

pytestmark = pytest.mark.skipif(fused_norm_cpu.library() is None, reason="no working C compiler")

# built on first use, once per process (not once per parametrised case)
_PLAIN_STORES = NativeLibrary(fused_norm_cpu.SOURCE, fused_norm_cpu._declare, "GroupNorm, plain stores",
                              extra_flags=("-DBIT_PLAIN_STORES",))


def _relative_errors(x64, groups, mean_shift=0.0, seed=0):
    """Relative L2 errors of (output, d input, d weight, d bias) in fp32, fused and torch's, against torch in
    float64."""
    torch.manual_seed(seed)
    c = x64.shape[1]
    w64, b64 = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    dy64 = torch.randn_like(x64)

    def run(fn, dtype):
        x = (x64 + mean_shift).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        w, b = (t.to(dtype).clone().requires_grad_() for t in (w64, b64))
        y = fn(x, groups, w, b, 1e-5)
        y.backward(dy64.to(dtype))
        return y, x.grad, w.grad, b.grad

    def torch_ops(x, groups, w, b, eps):
        return F.relu(F.group_norm(x, groups, w, b, eps))

    reference = run(torch_ops, torch.float64)
    errors = {}
    for name, fn in (("fused", fused_norm_cpu.group_norm_relu), ("torch fp32", torch_ops)):
        results = run(fn, torch.float32)
        errors[name] = [((r.double() - ref).norm() / ref.norm()).item()
                        for r, ref in zip(results, reference, strict=True)]
        if name == "fused":
            assert results[0].is_contiguous(memory_format=torch.channels_last)
            assert results[1].is_contiguous(memory_format=torch.channels_last)
    return errors


@pytest.mark.parametrize(("shape", "groups"), [
    ((4, 64, 9, 7), 32),    # more samples than threads, odd sizes
    ((1, 256, 5, 5), 32),   # one sample
    ((3, 6, 4, 1), 3),      # width 1
    ((2, 24, 3, 3), 24),    # one channel per group
    ((2, 96, 70, 3), 32),   # 210 rows: more than one block of row sums
])
def test_matches_float64(shape, groups):
    x = torch.randn(shape, dtype=torch.float64) * 2
    errors = _relative_errors(x, groups)
    assert max(errors["fused"]) < 1e-5, errors


def test_large_mean_does_not_cancel():
    """Sums shifted by each sample's first pixel: at a mean 500x the spread, the fused kernels stay accurate
    where torch's fp32 GroupNorm loses digits."""
    x = torch.randn(3, 64, 6, 6, dtype=torch.float64)
    errors = _relative_errors(x, 32, mean_shift=500.0)
    assert max(errors["fused"]) < 1e-4, errors
    assert max(errors["fused"]) < max(errors["torch fp32"]), errors


def test_a_nan_stays_nan_as_in_torch():
    """A NaN makes its whole group NaN (its mean), and the ReLU must keep it so, as torch's does: clipping it to 0
    would hide a diverged run behind a finite loss."""
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    x[1, 5, 2, 3] = float("nan")
    w, b = torch.randn(32), torch.randn(32)
    torch.testing.assert_close(fused_norm_cpu.group_norm_relu(x, 8, w, b, 1e-5),
                               F.relu(F.group_norm(x, 8, w, b, 1e-5)), equal_nan=True)
    y = fused_norm_cpu.group_norm_relu(x, 8, w, b, 1e-5)
    assert y[1, 4:8].isnan().all() and not y[0].isnan().any() and not y[1, 8:].isnan().any()


def test_relu_mask_in_backward():
    """Where the output was clipped, no gradient flows: with every output clipped, all gradients are zero."""
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.ones(32, requires_grad=True), torch.full((32,), -100.0, requires_grad=True)
    y = fused_norm_cpu.group_norm_relu(x, 8, w, b, 1e-5)
    y.sum().backward()
    assert y.abs().max() == 0 and x.grad.abs().max() == 0 and w.grad.abs().max() == 0 and b.grad.abs().max() == 0


def test_which_inputs_use_it():
    x = torch.randn(2, 32, 4, 4)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert fused_norm_cpu.usable(channels_last)
    assert not fused_norm_cpu.usable(x)                   # NCHW: torch's kernel
    assert not fused_norm_cpu.usable(channels_last.double())
    assert not fused_norm_cpu.usable(channels_last[:0])
    with pytest.raises(ValueError, match="32 channels, 5 groups"):
        fused_norm_cpu.group_norm_relu(channels_last, 5, torch.ones(32), torch.zeros(32), 1e-5)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not fused_norm_cpu.usable(channels_last)   # dispatch modes see torch's ops


def test_torch_func_transforms_see_torchs_ops():
    """Under torch.func.grad the layer falls back to torch's ops (an autograd Function would need
    setup_context), and the gradient matches the ordinary autograd one through the fused kernels."""
    from torch.func import functional_call, grad

    layer = GroupNormAct(32)
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    params = dict(layer.named_parameters())
    by_func = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    torch.testing.assert_close(by_func["weight"], layer.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_func["bias"], layer.bias.grad, rtol=1e-5, atol=1e-5)


def test_model_layer_uses_it_in_inference_and_training():
    """GroupNormAct (what every norm in the model is) gives torch's result through the fused path."""
    layer = GroupNormAct(64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(3, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    expected = F.relu(F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    y = layer(x.requires_grad_())
    assert y.grad_fn is not None and "GroupNormReLU" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


FALLBACK = textwrap.dedent("""
    import logging, torch, torch.nn.functional as F
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from bigtransfer.models import fused_norm_cpu
    from bigtransfer.models.resnetv2 import GroupNormAct
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    layer = GroupNormAct(32)
    expected = F.relu(F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    print("usable", fused_norm_cpu.usable(x))
    from bigtransfer.models import winograd_cpu
    print("winograd", winograd_cpu.library() is not None)
    from bigtransfer.models import fused_ws_cpu
    print("standardization", fused_ws_cpu.usable(torch.randn(8, 4, 3, 3)))
    try:  # the OpenMP runtimes in the process
        print("openmp", sorted({line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line}))
    except OSError:
        pass
""")


def _run(env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), **env_overrides}
    return subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=120)


def test_compiled_once_into_the_cache_and_torch_ops_without_a_compiler(tmp_path):
    without_compiler = _run({"BIT_HOME": str(tmp_path / "empty"), "CC": str(tmp_path / "no-such-cc")})
    assert without_compiler.returncode == 0, without_compiler.stderr
    assert "usable False" in without_compiler.stdout
    assert "fused CPU GroupNorm unavailable" in without_compiler.stderr and "no-such-cc" in without_compiler.stderr
    assert "winograd False" in without_compiler.stdout
    assert "Winograd CPU convolution unavailable" in without_compiler.stderr
    assert "standardization False" in without_compiler.stdout
    assert "CPU Weight Standardization unavailable" in without_compiler.stderr

    broken_compiler = _run({"BIT_HOME": str(tmp_path / "broken"), "CC": "false"})
    assert "usable False" in broken_compiler.stdout and "false -O3" in broken_compiler.stderr

    built = _run({"BIT_HOME": str(tmp_path / "home")})
    assert "usable True" in built.stdout and "winograd True" in built.stdout, built.stderr
    assert "standardization True" in built.stdout, built.stderr
    if "openmp" in built.stdout:  # built with -fopenmp, the kernels bind to the runtime torch loaded (same
        # soname) and run in torch's own thread pool, not in a second one that would fight it for the cores
        runtimes = ast.literal_eval(built.stdout.split("openmp", 1)[1].strip())
        assert len(runtimes) == 1, runtimes
    kernels = tmp_path / "home" / "kernels"
    libraries = [next(kernels.glob(f"{name}-*.so")) for name in ("fused_norm_cpu", "winograd_cpu", "fused_ws_cpu")]
    assert sorted(kernels.iterdir()) == sorted(libraries)  # no half-built leftovers
    cached = _run({"BIT_HOME": str(tmp_path / "home"), "CC": str(tmp_path / "no-such-cc")})
    assert "usable True" in cached.stdout and "winograd True" in cached.stdout, cached.stderr  # needs no compiler
    assert "standardization True" in cached.stdout, cached.stderr



def test_same_bits_whatever_the_thread_count():
    """Each sample is one task with a fixed order of summation, so results do not depend on the threads
    (torch's reductions split differently with the thread count)."""
    x = torch.randn(5, 64, 7, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    dy = torch.randn_like(x)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaf, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
            y = fused_norm_cpu.group_norm_relu(leaf, 16, wl, bl, 1e-5)
            results.append([y, *torch.autograd.grad(y, (leaf, wl, bl), dy)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_double_backward_goes_through_torchs_ops(monkeypatch):
    """With create_graph=True (a gradient penalty) the backward runs through torch's differentiable ops: the
    second-order gradients equal those of the plain layer, the first-order ones those of the C kernels."""
    layer = GroupNormAct(32)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 32, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()

    def grads(fused: bool):
        monkeypatch.setattr(fused_norm_cpu, "ENABLED", fused)
        y = layer(x)
        assert ("GroupNormReLU" in type(y.grad_fn).__name__) == fused
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (plain_dx,) = torch.autograd.grad(layer(x).square().sum(), x)
        return [plain_dx, dx, *torch.autograd.grad(dx.square().sum(), (x, layer.weight, layer.bias))]

    for ours, reference in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("shape", "groups"), [
    ((2, 64, 9, 7), 32),
    ((2, 24, 10, 15), 8),  # rows of 96 bytes: every other row starts off a cache line, 8 channels left
    ((2, 6, 4, 1), 3),  # rows shorter than a vector
])
def test_streamed_stores_write_the_same_bits_as_plain_ones(monkeypatch, shape, groups):
    """Where the compiler targets AVX-512, the forward writes its output with non-temporal vector stores (16
    channels at a time, in rows that start on a cache line; the rest element by element). A build with
    -DBIT_PLAIN_STORES writes every element by the plain loop: outputs, statistics and a NaN's group must come out
    the same, bit for bit, and so the backward too."""
    plain = _PLAIN_STORES
    assert plain.get() is not None
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    x[1, 2, 1, 0] = float("nan")
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    dy = torch.randn_like(x)
    results = []
    for build in (fused_norm_cpu._LIBRARY, plain):
        monkeypatch.setattr(fused_norm_cpu, "_LIBRARY", build)
        leaf, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
        y = fused_norm_cpu.group_norm_relu(leaf, groups, wl, bl, 1e-5)
        results.append([y, *torch.autograd.grad(y, (leaf, wl, bl), dy)])
    assert results[0][0].isnan().any() and not results[0][0].isnan().all()
    for streamed, plain_result in zip(*results, strict=True):
        assert torch.equal(streamed.nan_to_num(), plain_result.nan_to_num())
        assert torch.equal(streamed.isnan(), plain_result.isnan())
