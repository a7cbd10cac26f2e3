"""ResNet-v2 with GroupNorm + Weight Standardization: the BiT architecture (paper and authors' release).

Layout of the module tree (our checkpoint names follow it)::

    root.conv                      7x7/2 weight-standardised conv, then zero pad 1 + 3x3/2 max-pool
    stages.{s}.{u}.norm1 / conv1   unit pre-activation GN, 1x1 conv
    stages.{s}.{u}.norm2 / conv2   GN, 3x3 conv (carries the stage stride)
    stages.{s}.{u}.norm3 / conv3   GN, 1x1 conv
    stages.{s}.0.proj              1x1 projection shortcut, applied to the *pre-activated* input
    norm                           head GN (+ ReLU), then global average pool
    head                           linear classifier (zero-initialised for transfer)
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused_norm, fused_norm_cpu, fused_pool, fused_ws, fused_ws_cpu, winograd_cpu

WS_EPS = 1e-10  # the authors' release; timm / HF transformers use 1e-8
GN_EPS = 1e-5
GN_GROUPS = 32


def group_norm_groups(channels: int, groups: int = GN_GROUPS) -> int:
    """Number of GroupNorm groups for a layer with `channels` channels.

    The paper uses 32 groups everywhere, and every released model has a multiple of 64 channels in
    every layer, so the rule below returns 32 for all of them. Narrow layers of the small CPU
    variants would otherwise get groups of a single channel (instance norm, which destroys the
    per-channel signal at 1x1 resolution). Rule: at most 32 groups and at least 2 channels per
    group, i.e. ``min(32, channels // 2)``, lowered to the nearest divisor of `channels`.
    """
    g = max(1, min(groups, channels // 2))
    while channels % g:
        g -= 1
    return g


def standardize(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Weight Standardization: per output channel, zero mean and unit (biased) variance over (in, kh, kw).

    On CUDA (training and inference), `fused_ws` does it in Triton kernels that also emit autocast's dtype
    (no cast after); for fp32 on CPUs, `fused_ws_cpu` in C kernels that write the channels_last kernel the
    convolution wants (no transposing copy after, none of the gradient before); elsewhere
    `batch_norm_standardize`.
    """
    if fused_ws.usable(weight):
        return fused_ws.standardize(weight, eps)
    if fused_ws_cpu.usable(weight):
        return fused_ws_cpu.standardize(weight, eps)
    return batch_norm_standardize(weight, eps)


def batch_norm_standardize(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """`standardize` in torch's ops, as a batch norm over a (1, out, in*kh*kw) view: exactly the same arithmetic
    as mean/var, but one fused kernel forward and one backward instead of five elementwise passes over the
    weights. What compiling, tracing and exporting see, and the form the fused kernels are measured against."""
    flat = weight.reshape(1, weight.shape[0], -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(weight)


_HAS_ONEDNN_OPS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this convolution may run as inference with a kernel prepared once (oneDNN's fused op with a
    pre-packed kernel, or Winograd's transformed one): fp32 on a CPU, no gradients, nothing intercepting the call
    (autocast, torch.compile, tracing, a dispatch mode such as the FLOP counter) -- everywhere else the plain
    `F.conv2d` runs."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and _cacheable(weight))


def _cacheable(weight: torch.Tensor) -> bool:
    """Whether the standardised kernel may be kept between calls: a CPU weight no gradient flows to, in plain
    eager mode (compiling or tracing must see the ops), that tracks versions (inference tensors do not). Not on
    CUDA: checking there that the weight is unchanged would wait for the GPU at every convolution."""
    return (fused_norm.plain_eager() and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and weight.requires_grad) and not weight.is_inference())


def _fingerprint(weight: torch.Tensor) -> float:
    """A weighted sum over a fixed sample of the weight's elements (every one for small kernels, else one in
    257: a sixteenth of the cache lines). An edit through ``.data`` bumps no version counter; any dense one (a
    copy, an EMA update, noise) still changes this sum, and so does a reordering (of output channels, say):
    the weights rise along the sample."""
    w = weight.detach()
    dense = w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)
    flat = torch.as_strided(w, (w.numel(),), (1,), w.storage_offset()) if dense else w.flatten()
    sample = flat if flat.numel() < 16_384 else flat[::257]
    return float(torch.dot(sample, _ramp(sample.numel(), sample.dtype)))


@functools.lru_cache(maxsize=128)
def _ramp(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(1.0, 2.0, n, dtype=dtype)


class _KernelCache(NamedTuple):
    """A StdConv2d's prepared kernels, valid while `weight` is alive and its `key` holds."""

    weight: weakref.ref
    key: tuple
    kernels: dict[str, torch.Tensor]  # by form: "standardized", "onednn", "winograd"


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is weight-standardised on every call (no bias, as in BiT).

    `forward(x, residual)` returns ``conv(x) + residual``: the unit's residual add, which inference on
    a CPU fuses into the convolution. Where no gradient flows to the weight on a CPU, the standardised kernel
    is computed once and kept in the form the convolution wants, so no call standardises or reorders it again:
    Winograd's transform for the 3x3 layers where that is faster (`winograd_cpu`), else oneDNN's blocked
    layout (measured: convolutions 4-15% faster than standardising each call). Each form is made on first use
    and kept; all are dropped when the weight is another tensor, its version counter moved (an optimiser step,
    a load, any in-place edit) or a weighted sum over a sample of it changed (an edit through ``.data``), and
    after every `train()`/`eval()` switch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 eps: float = WS_EPS) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, bias=False)
        self.eps = eps
        self._cache: _KernelCache | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached kernel behind (oneDNN's packed tensors have no storage)."""
        return {**self.__dict__, "_cache": None}

    def train(self, mode: bool = True) -> StdConv2d:
        self._cache = None
        return super().train(mode)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if not _cacheable(w):
            self._cache = None
            return standardize(w, self.eps)
        return self._cached_kernel("standardized", x_shape=None)

    def _cached_kernel(self, form: str, x_shape: torch.Size | None) -> torch.Tensor:
        """The standardised kernel in `form`: "standardized" (as is), "onednn" (packed for `x_shape`, which only
        guides oneDNN's choice of layout: the first input's shape chooses it for all) or "winograd"
        (`winograd_cpu.transform_kernel`). Each form asked for is kept until the weight changes, so inputs that
        alternate between forms (batch sizes on both sides of `winograd_cpu.worthwhile`) prepare nothing again."""
        w = self.weight
        key = (w._version, _fingerprint(w), w.dtype, w.shape, w.stride())
        cache = self._cache
        if cache is None or cache.weight() is not w or cache.key != key:
            cache = self._cache = _KernelCache(weakref.ref(w), key, {})
        kernel = cache.kernels.get(form)
        if kernel is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                kernel = standardize(w, self.eps)
                if form == "onednn":
                    kernel = torch.ops.mkldnn._reorder_convolution_weight(
                        kernel, list(self.padding), list(self.stride), list(self.dilation), 1, list(x_shape))
                elif form == "winograd":
                    kernel = winograd_cpu.transform_kernel(kernel)
            cache.kernels[form] = kernel
        return kernel

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if _cpu_inference(x, self.weight):
            if winograd_cpu.usable(x, self):
                out = winograd_cpu.conv3x3(x, self._cached_kernel("winograd", x.shape))
                return out if residual is None else out.add_(residual)
            if _HAS_ONEDNN_OPS and torch.backends.mkldnn.enabled:
                conv = torch.ops.mkldnn._convolution_pointwise
                args = (self._cached_kernel("onednn", x.shape), None, list(self.padding), list(self.stride),
                        list(self.dilation), 1)
                if residual is None:
                    return conv(x, *args, "none", [], "")
                return conv.binary(x, residual, *args, "add", None, None, [], None)
        weight = self.standardized_weight()
        if x.shape[-1] == 1 < weight.shape[-1] and x.device.type == "cpu" and weight.requires_grad:
            # A width-1 input (images of 16 px or less reach one) meets only the kernel's centre column, the
            # others see the zero padding: convolve with that column alone, the same sums. oneDNN's bf16
            # backward at stride 2 (torch 2.14) fills the other columns' weight gradient from stale memory
            # instead of with zeros (measured: NaN, or values as large as the true gradient's).
            centre = weight.shape[-1] // 2
            out = F.conv2d(x, weight[..., centre:centre + 1], None, self.stride, (self.padding[0], 0))
        elif (norm := fused_norm_cpu.norm_output(x)) is not None:
            out = fused_norm_cpu.conv2d_of_norm_output(x, weight, self.stride, self.padding, norm)
        else:
            out = F.conv2d(x, weight, None, self.stride, self.padding)
        return out if residual is None else out.add_(residual)  # in place: no backward needs the conv output


def _cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """On CPUs, channels_last activations let oneDNN convolve without reordering and GroupNorm+ReLU use the
    fused NHWC kernels of `fused_norm_cpu` (measured before those: inference +25%, training even); convolutions
    then keep the layout. On CUDA the input is left as it is: there channels_last pays only where the step
    runs as CUDA graphs, so the training engine chooses it (`engine.train`). Launched op by op it costs more
    CPU time than it saves GPU time (H100, bf16, R50x1 training at batch 512: 55 against 49 ms per step,
    with the GPU busy 32 against 40 ms)."""
    cpu = x.device.type == "cpu" and x.dim() == 4 and torch._C._functorch.peek_interpreter_stack() is None  # not vmap
    return x.contiguous(memory_format=torch.channels_last) if cpu else x


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by ReLU: every norm in a pre-activation ResNet is followed by one. Both run as one
    kernel each way: Triton on CUDA (`fused_norm`, in the activations' dtype), C on CPUs (`fused_norm_cpu`,
    fp32 channels_last); elsewhere, torch's two ops."""

    def __init__(self, channels: int) -> None:
        super().__init__(group_norm_groups(channels), channels, eps=GN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_norm.usable(x):
            return fused_norm.group_norm_relu(x, self.num_groups, self.weight, self.bias, self.eps)
        if fused_norm_cpu.usable(x):
            return fused_norm_cpu.group_norm_relu(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps), inplace=True)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + residual`` and this norm of s, both returned, the add done by the norm's CUDA kernels (see
        `ResNetV2._fuses_residuals`)."""
        return fused_norm.add_group_norm_relu(x, residual, self.num_groups, self.weight, self.bias, self.eps)


class Root(nn.Module):
    """The stem: 7x7/2 conv, zero pad 1, 3x3/2 max-pool without padding (what the released weights expect)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.conv = StdConv2d(3, out_channels, 7, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_padded_max_pool(self.conv(x))


def zero_padded_max_pool(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(pad(x, 1), 3, stride=2)`` without building the padded copy (a fill and a copy of the
    largest activation): pool with the implicit -inf padding, then let the windows that overlap the
    border -- the first row and column, and the last ones when the size is odd -- see the zero too.
    Out of place, so that exporters and autograd see plain ops. `fused_pool` has CUDA kernels for it."""
    if fused_pool.usable(x):
        return fused_pool.zero_padded_max_pool(x)
    y = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    (h, w), (out_h, out_w) = x.shape[-2:], y.shape[-2:]
    rows, cols = torch.arange(out_h, device=x.device), torch.arange(out_w, device=x.device)
    at_border = ((rows == 0) | ((rows == out_h - 1) & (h % 2 == 1)))[:, None] | \
        ((cols == 0) | ((cols == out_w - 1) & (w % 2 == 1)))[None, :]
    return torch.maximum(y, torch.where(at_border, 0.0, float("-inf")).to(y.dtype))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit; the stride sits on the 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        mid = out_channels // 4
        self.norm1 = GroupNormAct(in_channels)
        self.conv1 = StdConv2d(in_channels, mid, 1)
        self.norm2 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm3 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_channels, 1)
        needs_proj = stride != 1 or in_channels != out_channels
        self.proj = StdConv2d(in_channels, out_channels, 1, stride=stride) if needs_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(*self.branch(x, self.norm1(x)))

    def branch(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit after its first norm (`a`, of its input `x`): the last convolution's input, and the shortcut
        that convolution's output is added to."""
        shortcut = self.proj(a) if self.proj is not None else x
        return self.norm3(self.conv2(self.norm2(self.conv1(a)))), shortcut


@dataclass(frozen=True)
class Architecture:
    """What determines the shapes of a BiT network: units per stage and the width factor."""

    depths: tuple[int, ...] = (3, 4, 6, 3)
    width: float = 1.0

    @property
    def root_channels(self) -> int:
        return _channels(64 * self.width)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(_channels(256 * self.width * 2**i) for i in range(len(self.depths)))

    @property
    def num_features(self) -> int:
        return self.stage_channels[-1]

    @property
    def name(self) -> str:
        """R{layers}x{width}, as the paper names them (3 convs per unit + root + head)."""
        layers = 3 * sum(self.depths) + 2
        width = int(self.width) if float(self.width).is_integer() else self.width
        return f"R{layers}x{width}"

    def num_params(self, num_classes: int = 0) -> int:
        """Parameter count by arithmetic (no model built); tests check it against a real model."""
        total, cin = 3 * self.root_channels * 49, self.root_channels
        for depth, cout in zip(self.depths, self.stage_channels, strict=True):
            mid = cout // 4
            for u in range(depth):
                total += 2 * cin + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * cout
                total += cin * cout if u == 0 else 0
                cin = cout
        return total + 2 * cin + (cin + 1) * num_classes if num_classes else total + 2 * cin

    def macs(self, resolution: int, num_classes: int = 0) -> int:
        """Multiply-accumulates of one forward pass on a square image (convolutions and head, the way
        papers count them), by shape arithmetic; tests check it against torch's FLOP counter."""
        size = (resolution - 1) // 2 + 1  # 7x7/2 conv, padding 3
        total = size * size * 3 * self.root_channels * 49
        size = (size + 2 - 3) // 2 + 1  # zero pad 1, 3x3/2 max-pool
        cin = self.root_channels
        for i, (depth, cout) in enumerate(zip(self.depths, self.stage_channels, strict=True)):
            mid = cout // 4
            for u in range(depth):
                stride = 2 if i > 0 and u == 0 else 1
                out = (size - 1) // stride + 1
                total += size * size * cin * mid + out * out * (9 * mid * mid + mid * cout)
                total += out * out * cin * cout if u == 0 else 0  # projection shortcut
                size, cin = out, cout
        return total + cin * num_classes


def hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether a hook would run when one of `modules` is called: its own, or one registered for all modules
    (``torch.nn.modules.module.register_module_forward_hook`` and the like). Paths that skip calling modules
    (the fused residual adds, a CUDA-graph replay) are not taken then, so that no user's hook goes unheard."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)


def _channels(value: float) -> int:
    if not float(value).is_integer() or value < 4:
        raise ValueError(f"width factor gives {value} channels; pick a width whose channel counts are integers >= 4")
    return int(value)


class ResNetV2(nn.Module):
    """BiT ResNet-v2. `forward_features` gives the pre-logit (N, C) vector, `forward` the logits."""

    def __init__(self, arch: Architecture, num_classes: int = 0, zero_head: bool = True) -> None:
        super().__init__()
        self.arch = arch
        self.root = Root(arch.root_channels)
        stages, in_ch = [], arch.root_channels
        for i, (depth, out_ch) in enumerate(zip(arch.depths, arch.stage_channels, strict=True)):
            stride = 1 if i == 0 else 2
            units = [PreActBottleneck(in_ch if u == 0 else out_ch, out_ch, stride if u == 0 else 1)
                     for u in range(depth)]
            stages.append(nn.Sequential(*units))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.norm = GroupNormAct(arch.num_features)
        self.num_features = arch.num_features
        self.head: nn.Linear | None = None
        # True where the head scores every class on its own (sigmoid: trained on multi-label data, as BiT-M's
        # ImageNet-21k head) rather than one class among all (softmax); what `predict` turns logits into
        self.multi_label = False
        self.grad_checkpointing = False
        self._init_weights()
        self.reset_head(num_classes, zero_init=zero_head)

    @property
    def num_classes(self) -> int:
        return 0 if self.head is None else self.head.out_features

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_head(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the classifier (0 removes it). Zero-initialised by default, as BiT transfer prescribes."""
        try:
            num_classes = operator.index(num_classes)  # ints of any kind (numpy's too), not 2.5
        except TypeError:
            raise TypeError(f"num_classes must be a whole number, got {num_classes!r}") from None
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {num_classes}")
        self.multi_label = False  # a new head: whoever trains it multi-label says so
        if num_classes == 0:
            self.head = None
            return
        ref = self.norm.weight
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(self.num_features))
            nn.init.zeros_(self.head.bias)

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps for a detection/segmentation backbone: strides 4, 4, 8, 16, 32.

        ``root`` and ``stage1..3`` are raw pre-activation outputs (the next unit normalises them);
        ``stage4`` is passed through the head norm + ReLU, the only activated output the net has.
        """
        feats = {"root": self.root(_cpu_layout(x))}
        x = feats["root"]
        for i, stage in enumerate(self.stages):
            x = self._run_stage(stage, x)
            feats[f"stage{i + 1}"] = x
        feats[f"stage{len(self.stages)}"] = self.norm(x)
        return feats

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing: keep only each unit's input and recompute the unit in the backward
        pass (about one extra forward) -- what lets the largest models train on one GPU."""
        self.grad_checkpointing = enable

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        for unit in stage:
            x = checkpoint(unit, x, use_reentrant=False)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.root(_cpu_layout(x))
        if self._fuses_residuals(x):
            return self._units_with_fused_residuals(x).mean(dim=(2, 3))
        for stage in self.stages:
            x = self._run_stage(stage, x)
        return self.norm(x).mean(dim=(2, 3))

    def _fuses_residuals(self, x: torch.Tensor) -> bool:
        """Whether each unit's residual add may run in the next norm's kernels (`fused_norm.RESIDUAL`, CUDA).
        That path calls no unit, stage or first norm as a module, so it is not taken where hooks would then
        not run (registered on those, or globally), nor under activation checkpointing (which runs units)."""
        if not (fused_norm.RESIDUAL and fused_norm.usable(x)) or (self.grad_checkpointing and torch.is_grad_enabled()):
            return False
        units = [unit for stage in self.stages for unit in stage]
        bypassed = [*self.stages, *units, *(unit.norm1 for unit in units), self.norm]
        return not hooked(bypassed)

    def _units_with_fused_residuals(self, x: torch.Tensor) -> torch.Tensor:
        """The stages and the head norm, each unit handing on its last convolution's output and its shortcut
        unsummed: the next unit's first norm (after the last unit, the head norm) reads both and writes their
        sum -- the next shortcut -- with its activation, one pass over the activations less forward and two
        less backward (`fused_norm.add_group_norm_relu`). Returns the head norm's output."""
        unsummed = None
        for unit in (unit for stage in self.stages for unit in stage):
            x, a = (x, unit.norm1(x)) if unsummed is None else unit.norm1.add_forward(*unsummed)
            out, shortcut = unit.branch(x, a)
            unsummed = unit.conv3(out), shortcut
        return self.norm.add_forward(*unsummed)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.head is None:
            raise RuntimeError("this model has no classification head; call reset_head(num_classes) "
                               "or use forward_features()")
        return self.head(features)
