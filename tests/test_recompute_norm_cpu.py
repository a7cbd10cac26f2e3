"""Convolutions of a fused CPU norm's output that recompute it in their backward instead of keeping it
(`fused_norm_cpu.RECOMPUTE`, ``BIGTRANSFER_RECOMPUTE_NORM=1``): the same gradients to the bit as keeping it,
none of the outputs kept, and the edits, hooks, checkpointing and double backward that must still see what the
forward computed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtransfer.models import fused_norm_cpu
from bigtransfer.models.resnetv2 import Architecture, GroupNormAct, ResNetV2

pytestmark = pytest.mark.skipif(fused_norm_cpu.library() is None, reason="no working C compiler")


def _model() -> ResNetV2:
    torch.manual_seed(0)
    model = ResNetV2(Architecture((1, 2, 1, 1), 0.25), num_classes=5, zero_head=False).train()
    with torch.no_grad():  # norms away from their initial 1 and 0, so that every gradient term shows
        for norm in (m for m in model.modules() if isinstance(m, GroupNormAct)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return model


def _gradients(model: ResNetV2, x: torch.Tensor, recompute: bool, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(fused_norm_cpu, "RECOMPUTE", recompute)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    F.cross_entropy(model(x), torch.arange(x.shape[0]) % 5).backward()
    return [x.grad, *(p.grad for p in model.parameters())]


def _saved_storages(model: ResNetV2, x: torch.Tensor) -> dict[int, int]:
    """Bytes of every storage the forward leaves for the backward, by address."""
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum()
    return saved


def test_gradients_are_the_same_bits_as_with_the_outputs_kept(monkeypatch):
    """The recomputation repeats the forward's own arithmetic (one rounding of x * scale + shift, then the ReLU), and
    the backward's ReLU mask comes from the same expression, so every gradient equals the kept outputs' ones."""
    model, x = _model(), torch.randn(3, 3, 32, 32)
    recomputed = _gradients(model, x, True, monkeypatch)
    kept = _gradients(model, x, False, monkeypatch)
    assert all(g is not None and g.abs().sum() > 0 for g in recomputed)
    for ours, reference in zip(recomputed, kept, strict=True):
        assert torch.equal(ours, reference)


def test_no_norm_output_is_kept_for_the_backward(monkeypatch):
    """With RECOMPUTE, the storages saved for the backward hold none of the norms' outputs: exactly their bytes
    fewer than with the outputs kept (every norm but the head's feeds convolutions)."""
    model, x = _model(), torch.randn(2, 3, 32, 32)
    outputs = []
    norms = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    handles = [norm.register_forward_hook(lambda m, args, y: outputs.append(y.untyped_storage().nbytes()))
               for norm in norms[:-1]]
    monkeypatch.setattr(fused_norm_cpu, "RECOMPUTE", False)
    kept = _saved_storages(model, x)
    monkeypatch.setattr(fused_norm_cpu, "RECOMPUTE", True)
    outputs.clear()
    recomputed = _saved_storages(model, x)
    for handle in handles:
        handle.remove()
    assert len(outputs) == len(norms) - 1 == 15
    assert sum(kept.values()) - sum(recomputed.values()) == sum(outputs)


def test_an_output_edited_in_place_is_kept_as_edited(monkeypatch):
    """A forward hook that edits a norm's output in place gives it another grad_fn: that convolution keeps the edited
    tensor (nothing recomputes the unedited one), and the gradients are those of the edited network."""
    model, x = _model(), torch.randn(2, 3, 32, 32)
    model.stages[1][0].norm2.register_forward_hook(lambda m, args, y: y.mul_(0.5))
    recomputed = _gradients(model, x, True, monkeypatch)
    for ours, reference in zip(recomputed, _gradients(model, x, False, monkeypatch), strict=True):
        assert torch.equal(ours, reference)


def test_outputs_a_hook_keeps_are_never_overwritten(monkeypatch):
    """Outputs of norms that are recomputed live on reused buffers: a buffer is reused only once no tensor uses its
    memory. Outputs (and views of them) that a hook keeps across forwards keep their values; past the buffers' limit
    the heap serves."""
    monkeypatch.setattr(fused_norm_cpu, "RECOMPUTE", True)
    model, x = _model(), torch.randn(2, 3, 32, 32)
    kept, copies = [], []

    def keep(module, args, y):
        view = y[:, :2]
        kept.extend([y, view])
        copies.extend([y.detach().clone(), view.detach().clone()])

    for norm in (m for m in model.modules() if isinstance(m, GroupNormAct)):
        norm.register_forward_hook(keep)
    for _ in range(3):
        model(torch.randn_like(x)).sum().backward()
    assert len(kept) == 3 * 2 * 16
    for tensor, copy in zip(kept, copies, strict=True):
        assert torch.equal(tensor, copy)


def test_scratch_buffers_are_reused_and_aligned():
    """Free buffers serve later outputs (the smallest that fits; a free one too small is replaced), each tensor's
    first element on a 64-byte line; a buffer in use, even through a view alone, is not handed out again."""
    scratch = fused_norm_cpu._ScratchOutputs(limit=2)
    big, small = torch.empty(2, 64, 8, 8), torch.empty(1, 16, 4, 4)
    a = scratch.empty_like(big)
    assert a.shape == big.shape and a.is_contiguous(memory_format=torch.channels_last)
    assert a.data_ptr() % 64 == 0
    view = a[:, :3]
    del a
    b = scratch.empty_like(small)  # the first buffer is in use through the view: a second one
    assert len(scratch.buffers) == 2 and b.data_ptr() != view.data_ptr()
    c = scratch.empty_like(small)  # both in use, at the limit: the heap
    assert len(scratch.buffers) == 2 and c.data_ptr() not in (view.data_ptr(), b.data_ptr())
    first = view.data_ptr()
    del view
    d = scratch.empty_like(small)  # the first buffer is free again
    assert d.data_ptr() == first
    del b
    e = scratch.empty_like(torch.empty(2, 128, 8, 8))  # no free buffer holds it: the free small one is replaced
    assert len(scratch.buffers) == 2 and e.data_ptr() % 64 == 0 and e.data_ptr() != first


def test_double_backward_and_checkpointing_see_the_same_network(monkeypatch):
    """A gradient penalty (create_graph=True) recomputes the output through torch's differentiable ops, so the
    second-order gradients reach the norm's input and parameters as with the output kept; activation checkpointing
    reruns the units, whose convolutions recompute again, with the same first-order gradients."""
    model, x = _model(), torch.randn(2, 3, 32, 32)

    def penalty_gradients(recompute: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(fused_norm_cpu, "RECOMPUTE", recompute)
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(model(leaf).square().sum(), leaf, create_graph=True)
        dx.square().sum().backward()
        return [p.grad for p in model.parameters()]

    for ours, reference in zip(penalty_gradients(True), penalty_gradients(False), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)

    plain = _gradients(model, x, True, monkeypatch)
    model.set_grad_checkpointing()
    for ours, reference in zip(_gradients(model, x, True, monkeypatch), plain, strict=True):
        assert torch.equal(ours, reference)
