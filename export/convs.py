"""Exact rewrites of convolutions into shapes that onnxruntime's CPU kernels run fast.

onnxruntime's CPU convolution (NCHWc, AVX-512) computes output channels 16 at a time and
reuses each input load across up to four such blocks, so a convolution with 3 or 6 output
channels leaves most of each vector idle, and one with 16 reuses nothing. Folding output
positions into channels fixes both: a stride-1 convolution with O outputs equals one of stride
(t, s) with t*s*O outputs, whose kernel for phase (p, q) is the original kernel shifted p rows
down and q columns right inside a (kh + t - 1) x (kw + s - 1) window of zeros; interleaving
the phases gives the original output back. When the convolution feeds ReLU and a max pool
whose window the fold divides, the interleave is skipped: pooling each phase and taking the
maximum across phases is the same pool, and ReLU commutes with max. `choose_fold` picks (t, s)
with a cost model measured on this project's layers (see `fold_cost`). Batch norms are fused
into their convolutions first so the rewrite sees plain Conv2d layers. The results are the
same products summed in another order (float32 rounding only); export's parity gate checks
them against the untouched model. Imports torch only.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

VECTOR_CHANNELS = 16  # output channels one NCHWc block computes at once (AVX-512 floats)
MULTI_BLOCK_SPEEDUP = 1.3  # measured: 2+ output blocks share input loads (1 thread, this CPU)
MAX_FOLD = 8  # largest fold tried per axis; more widens the kernel for little gain
MAX_FOLDED_CHANNELS = 128  # at most 8 NCHWc blocks of output channels


def fold_cost(out_channels: int, kernel: tuple[int, int], fold: tuple[int, int],
              lanes: int = VECTOR_CHANNELS) -> float:
    """Relative time per useful multiply-add: idle vector lanes times the kernel grown by
    zeros, divided by the speed-up of computing several output blocks per input load."""
    channels = out_channels * fold[0] * fold[1]
    blocks = math.ceil(channels / lanes)
    lane_waste = blocks * lanes / channels
    growth = (kernel[0] + fold[0] - 1) * (kernel[1] + fold[1] - 1) / (kernel[0] * kernel[1])
    return lane_waste * growth / (MULTI_BLOCK_SPEEDUP if blocks > 1 else 1.0)


def choose_fold(out_channels: int, kernel: tuple[int, int], out_size_px: tuple[int, int],
                lanes: int = VECTOR_CHANNELS, divides: tuple[int, int] | None = None
                ) -> tuple[int, int]:
    """(t, s) of least `fold_cost` among the folds that divide the output size (and, when
    given, `divides`: a following pool window); (1, 1) is no fold."""
    def allowed(axis: int) -> list[int]:
        return [f for f in range(1, MAX_FOLD + 1) if out_size_px[axis] % f == 0
                and (divides is None or divides[axis] % f == 0)]

    folds = [(t, s) for t in allowed(0) for s in allowed(1)
             if out_channels * t * s <= MAX_FOLDED_CHANNELS]
    # Ties go to the smaller fold, then to folding rows: a column stride costs the kernel
    # contiguous input loads (measured a few percent slower).
    return min(folds, key=lambda f: (fold_cost(out_channels, kernel, f, lanes), f[0] * f[1],
                                     -f[0]))


def _foldable(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.groups == 1 \
        and conv.dilation == (1, 1) and conv.padding_mode == "zeros" \
        and not isinstance(conv.padding, str)


class FoldedConv2d(nn.Module):
    """A stride-1 Conv2d computed as a (t, s)-strided one with t*s times the outputs."""

    def __init__(self, conv: nn.Conv2d, fold: tuple[int, int]):
        super().__init__()
        if not _foldable(conv):
            raise ValueError(f"cannot fold {conv}: needs stride 1, no dilation or groups, "
                             "numeric zero padding")
        out_ch, in_ch, kernel_h, kernel_w = conv.weight.shape
        fold_h, fold_w = fold
        weight = conv.weight.detach()
        folded = weight.new_zeros(fold_h, fold_w, out_ch, in_ch, kernel_h + fold_h - 1,
                                  kernel_w + fold_w - 1)
        for p in range(fold_h):  # phase (p, q) reads the input shifted p down, q right
            for q in range(fold_w):
                folded[p, q, :, :, p : p + kernel_h, q : q + kernel_w] = weight
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(out_ch)
        self.register_buffer("weight", folded.reshape(fold_h * fold_w * out_ch, in_ch,
                                                      kernel_h + fold_h - 1, -1))
        self.register_buffer("bias", bias.repeat(fold_h * fold_w))  # channel (p*s + q)*O + o
        self.out_channels, self.fold, self.padding = out_ch, (fold_h, fold_w), conv.padding

    def phases(self, x: torch.Tensor) -> torch.Tensor:
        """(B, t*s*O, H/t, W/s); channel (p*s + q)*O + o holds output rows p, p+t, ... and
        columns q, q+s, ... of channel o."""
        return F.conv2d(x, self.weight, self.bias, stride=self.fold, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.phases(x)
        (fold_h, fold_w), (_, _, height, width) = self.fold, y.shape
        y = y.reshape(-1, fold_h, fold_w, self.out_channels, height, width)  # (B,t,s,O,h,w)
        y = y.permute(0, 3, 4, 1, 5, 2)  # (B, O, h, t, w, s): row i*t + p, column j*s + q
        return y.reshape(-1, self.out_channels, height * fold_h, width * fold_w)


class FoldedConvReluPool(FoldedConv2d):
    """Conv2d, ReLU, MaxPool2d(window) where the fold divides the window: each phase is
    pooled by window / fold, then the maximum is taken across phases; no interleave."""

    def __init__(self, conv: nn.Conv2d, fold: tuple[int, int], window: tuple[int, int]):
        super().__init__(conv, fold)
        self.phase_window = (window[0] // fold[0], window[1] // fold[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.phases(x)  # (B, t*s*O, H/t, W/s)
        if self.phase_window != (1, 1):
            y = F.max_pool2d(y, self.phase_window, self.phase_window)
        # Max over the phases as elementwise Max ops (onnxruntime 1.32's quantizer cannot
        # take the ReduceMax that amax exports to).
        y = functools.reduce(torch.maximum, y.split(self.out_channels, dim=1))  # (B, O, ...)
        return F.relu(y)  # relu(max) == max(relu)


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _pool_window(layer: nn.Module) -> tuple[int, int] | None:
    """(height, width) of a plain non-overlapping MaxPool2d, else None."""
    if not isinstance(layer, nn.MaxPool2d) or layer.ceil_mode or layer.return_indices:
        return None
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
    if kernel != stride or _pair(layer.padding) != (0, 0) or _pair(layer.dilation) != (1, 1):
        return None
    return kernel


def _fuse_batchnorms(layers: list[nn.Module]) -> list[nn.Module]:
    fused: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d) and fused and isinstance(fused[-1], nn.Conv2d):
            fused[-1] = fuse_conv_bn_eval(fused[-1], layer)
        else:
            fused.append(layer)
    return fused


def _rewrite_one(layers: list[nn.Module], i: int, out_size: tuple[int, int], lanes: int
                 ) -> tuple[nn.Module, int]:
    """The replacement for layers[i] (a foldable conv) and how many layers it stands for."""
    conv = layers[i]
    kernel = tuple(conv.kernel_size)
    window = _pool_window(layers[i + 2]) if i + 2 < len(layers) else None
    if window is not None and isinstance(layers[i + 1], nn.ReLU) \
            and out_size[0] % window[0] == 0 and out_size[1] % window[1] == 0:
        fold = choose_fold(conv.out_channels, kernel, out_size, lanes, divides=window)
        if fold != (1, 1) and fold_cost(conv.out_channels, kernel, fold, lanes) < \
                fold_cost(conv.out_channels, kernel, (1, 1), lanes):
            return FoldedConvReluPool(conv, fold, window), 3
    fold = choose_fold(conv.out_channels, kernel, out_size, lanes)
    return (FoldedConv2d(conv, fold) if fold != (1, 1) else conv), 1


@torch.no_grad()
def fold_convolutions(module: nn.Module, input_shape: tuple[int, int, int],
                      lanes: int = VECTOR_CHANNELS) -> nn.Module:
    """A new eval-mode module computing what `module` (an nn.Sequential) computes, with each
    convolution that `fold_cost` says runs faster folded rewritten. `module` is not modified;
    anything that is not an nn.Sequential is returned as it is."""
    if not isinstance(module, nn.Sequential):
        return module
    if module.training:
        raise ValueError("fold_convolutions needs an eval-mode module (batch norms are fused)")
    layers = _fuse_batchnorms([layer for layer in module])
    x = torch.zeros(1, *input_shape)  # traced through to learn each layer's output size
    rewritten: list[nn.Module] = []
    i = 0
    while i < len(layers):
        replacement, used = layers[i], 1
        if _foldable(layers[i]):
            out_size = tuple(layers[i](x).shape[-2:])
            replacement, used = _rewrite_one(layers, i, out_size, lanes)
            if replacement is not layers[i]:
                log.debug("%s -> %s folded %s", layers[i], type(replacement).__name__,
                          replacement.fold)
        for layer in layers[i : i + used]:
            x = layer(x)
        rewritten.append(replacement)
        i += used
    return nn.Sequential(*rewritten).eval()
