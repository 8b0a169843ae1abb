"""Exact fast paths for the seed's layer patterns: the same function, computed faster on CPU.

`run_sequential` runs an nn.Sequential's own layers but computes these patterns another way,
from the same parameters (gradients reach the same tensors), with the same result up to float
rounding (tests/flowae/test_fast_kernels.py holds each to float64 references):

- nearest 2x upsample + Conv2d (odd kernel) -> a convolution on the low-resolution map with
  4x the output channels, whose outputs interleave into the 2x map (the "sub-pixel" form).
  Each tap of the original kernel reads one low-resolution pixel, so the effective kernel is
  a sum of original taps, computed from the parameters in every forward. A 5x5 kernel becomes
  3x3 on a map 4x smaller: a third of the multiply-adds, and no upsampled tensor.
- "full" Conv2d (padding = kernel - 1) with a kernel of 7 or more -> FFT convolution (CPU):
  rfft2 of input and kernel, channel mixing as one small matmul per frequency, irfft2, with
  the backward written out. The base decoder's 13x13 and 19x19 convolutions have 3-16
  channels, which oneDNN's direct kernels (16-channel vectors) run far below peak.
- Conv2d + BatchNorm2d: in eval mode one convolution with the batch norm folded into its
  weights; in training, followed by ReLU and MaxPool2d, the pooling runs on the convolution's
  output and the normalisation and ReLU on the 4x smaller pooled map (see
  `_conv_bn_relu_pool_train`); otherwise, on a channels-last map, the statistics come from
  matrix products (`_BatchNormTrain`). Both centre the convolution's output through its bias
  first, so that E[y^2] - E[y]^2 cancels no digits.
- ReLU + MaxPool2d -> MaxPool2d + ReLU (they commute: ReLU is monotone), and 2x2 max pooling
  without autograd as two elementwise maxima instead of ATen's index-recording kernel.

Tracing for export sees the plain layers (`tracing()`), so ONNX graphs are the seed's.

Why this module exists: it serves only the four seed variants (flowae.models.SeedConfig; the
res family is plain nn.Sequential), and it is what keeps the seed `upsample` recipe near its
5-minute training figure on a 2-core CPU (docs/RESULTS.md, "Speed of training"). Per training
step at batch 255, plain layers and fast paths alternated step by step in one process, median
of 5 each, cores shared with other jobs (`python -m benchmarks.fast_kernels --variant upsample
--threads 1 --steps 5`): phase 1 2.19 -> 1.28 s (1.71x), phase 2 1.36 -> 1.01 s (1.34x); an
earlier, quieter run of the same measurement gave 1.65x and 1.49x, and on 2 threads phase 1
1.5-2.5x and phase 2 0.9-1.7x across repeats. Phase 1 is 100 of the recipe's 160 epochs. The
base decoder's FFT path gains 5-6x (`--variant base --threads 1 --steps 3`: phase 1 19.1 ->
3.31 s, 5.77x). Imports torch only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FFT_MIN_KERNEL = 7  # full convolutions with kernels at least this wide go through the FFT
FFT_CHUNK_BYTES = 4 << 20  # spectra of this many bytes go through the FFT path at a time
CENTRE_SAMPLE = 16  # images whose mean output centres a convolution before batch statistics


def tracing() -> bool:
    """True while torch.export/dynamo/TorchScript trace: they see the plain layers."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def applies_to(x: torch.Tensor) -> bool:
    """Whether the fast paths run for input x: float32/64 CPU tensors outside tracing and
    autocast. They were written and measured for full-precision CPU training; on a GPU
    cuDNN runs the plain layers well, and these paths are untested there."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not tracing() and not torch.is_autocast_enabled("cpu"))


# -- nearest 2x upsample + convolution, as a sub-pixel convolution ---------------------------


@functools.cache
def _subpixel_taps(kernel: int, padding: int) -> tuple[torch.Tensor, int, int]:
    """Selection S (2, k', kernel): S[r, d, a] = 1 when tap a of output phase r reads the
    low-resolution pixel at offset d - pad_before; returns (S, k', pad_before).

    Output row i = 2m + r reads upsampled row i + a - padding, i.e. low-resolution row
    m + (r + a - padding) // 2.
    """
    first, last = (-padding) // 2, (1 + kernel - 1 - padding) // 2
    taps = last - first + 1
    select = torch.zeros(2, taps, kernel)
    for phase in range(2):
        for a in range(kernel):
            select[phase, (phase + a - padding) // 2 - first, a] = 1.0
    return select, taps, -first


def upsample2x_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      padding: tuple[int, int]) -> torch.Tensor:
    """conv2d(nearest_upsample_2x(x), weight, bias, stride 1, padding) without the upsample.

    x (B, C, h, w) -> (B, O, 2h + 2p - k + 1, ...), as the plain layers give.
    """
    out_ch, in_ch, kernel_h, kernel_w = weight.shape
    if kernel_h % 2 == 0 or kernel_w % 2 == 0:
        raise ValueError(f"sub-pixel form needs odd kernels, got {kernel_h}x{kernel_w}")
    sel_h, taps_h, before_h = _subpixel_taps(kernel_h, padding[0])
    sel_w, taps_w, before_w = _subpixel_taps(kernel_w, padding[1])
    sel_h, sel_w = sel_h.to(weight), sel_w.to(weight)
    # (2, 2, O, C, k'h, k'w): row phase r, column phase s, output channel o. Phase-major
    # channels (r * 2O + s * O + o) make the final interleave a copy of whole 2O-value runs
    # in channels-last memory; pixel_shuffle's o-major order moves single values.
    folded = torch.einsum("rya,sxb,ocab->rsocyx", sel_h, sel_w, weight)
    folded = folded.reshape(4 * out_ch, in_ch, taps_h, taps_w)
    bias = None if bias is None else bias.repeat(4)
    out_h = 2 * x.shape[-2] + 2 * padding[0] - kernel_h + 1
    out_w = 2 * x.shape[-1] + 2 * padding[1] - kernel_w + 1
    # With an odd kernel the low-resolution padding is ceil(p / 2) on both sides.
    y = F.conv2d(x, folded, bias, padding=(before_h, before_w))  # (B, 4O, out_h/2, out_w/2)
    batch, _, half_h, half_w = y.shape
    y = y.permute(0, 2, 3, 1).reshape(batch, half_h, half_w, 2, 2, out_ch)  # (B, h, w, r, s, O)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(batch, out_h, out_w, out_ch)  # (B, 2h, 2w, O)
    return y.permute(0, 3, 1, 2)  # (B, O, out_h, out_w), channels-last memory


# -- full convolution (padding = kernel - 1) by FFT -------------------------------------------


def fft_size(length: int) -> int:
    """Smallest multiple of 4 >= length with no prime factor above 7.

    MKL's transforms of such sizes measured fastest here: 36 beats 34 and 35 by 1.3-1.7x,
    48 beats 46 and 50 by 3x, 84 beats 90 and 96 by 2x. The rule is fixed, not tuned at run
    time, so that every process of a run picks the same size (and the same rounding).
    """
    size = length + (-length) % 4
    while True:
        rest = size
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 4


def _freq_major(spectrum: torch.Tensor) -> torch.Tensor:
    """(N, C, Lh, Lw') complex -> (Lh * Lw', N, C) contiguous: one small matrix per frequency."""
    return spectrum.reshape(spectrum.shape[0], spectrum.shape[1], -1).permute(2, 0, 1).contiguous()


def _batch_major(mixed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(Lh * Lw', N, C) -> (N, C, Lh, Lw') view; irfft2 copies it into the layout it needs."""
    return mixed.permute(1, 2, 0).reshape(mixed.shape[1], mixed.shape[2], size[0], -1)


class _FullConvFFT(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=kernel-1) as a circular convolution of size `size`.

    With size >= input + kernel - 1 on both axes nothing wraps around, so the circular result
    is the linear one. PyTorch's conv2d is a correlation; the flipped kernel makes it a
    convolution. The backward is the adjoint: correlation with the kernel (input gradient) and
    with the input (kernel gradient), both by the same transforms. Images go through in
    chunks whose spectra fit in cache: the layout changes around the per-frequency matmul
    then run about twice as fast as on whole-batch spectra.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, size, chunk):
        height, width = x.shape[-2:]
        kernel_h, kernel_w = weight.shape[-2:]
        out_h, out_w = height + kernel_h - 1, width + kernel_w - 1
        w_f = _freq_major(torch.fft.rfft2(weight.flip(-2, -1), s=size))  # (F, O, C)
        w_f = w_f.transpose(1, 2).contiguous()  # (F, C, O)
        y = x.new_empty(x.shape[0], weight.shape[0], out_h, out_w)
        spectra = []  # per chunk, for the kernel gradient
        for start in range(0, x.shape[0], chunk):
            x_f = _freq_major(torch.fft.rfft2(x[start : start + chunk].contiguous(), s=size))
            spectra.append(x_f)  # (F, b, C)
            z = torch.fft.irfft2(_batch_major(torch.bmm(x_f, w_f), size), s=size)  # (b, O, L, L)
            if bias is None:
                y[start : start + chunk] = z[..., :out_h, :out_w]
            else:
                torch.add(z[..., :out_h, :out_w], bias.view(1, -1, 1, 1),
                          out=y[start : start + chunk])
        ctx.save_for_backward(w_f, *spectra)
        ctx.shapes = (size, chunk, (height, width), (kernel_h, kernel_w), bias is not None)
        return y  # (B, O, H + kh - 1, W + kw - 1)

    @staticmethod
    def backward(ctx, grad_y):
        w_f, *spectra = ctx.saved_tensors
        size, chunk, (height, width), (kernel_h, kernel_w), has_bias = ctx.shapes
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_y.new_empty(grad_y.shape[0], w_f.shape[1], height, width) if need_x else None
        w_adjoint = w_f.transpose(1, 2).conj()  # (F, O, C)
        grad_w_f = None  # (F, O, C), summed over chunks
        for index, start in enumerate(range(0, grad_y.shape[0], chunk)):
            grad_f = _freq_major(torch.fft.rfft2(grad_y[start : start + chunk].contiguous(),
                                                 s=size))  # (F, b, O)
            if need_x:
                mixed = torch.bmm(grad_f, w_adjoint)  # (F, b, C)
                grad_x[start : start + chunk] = torch.fft.irfft2(
                    _batch_major(mixed, size), s=size)[..., :height, :width]
            if need_w:
                part = torch.bmm(grad_f.transpose(1, 2), spectra[index].conj())  # (F, O, C)
                grad_w_f = part if grad_w_f is None else grad_w_f.add_(part)
        grad_w = None
        if need_w:
            grad_w = torch.fft.irfft2(_batch_major(grad_w_f, size), s=size)
            grad_w = grad_w[..., :kernel_h, :kernel_w].flip(-2, -1)  # (O, C, kh, kw)
        grad_b = grad_y.sum(dim=(0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def fft_full_conv2d(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride 1, padding kernel - 1): (B, C, H, W) -> (B, O, H+k-1, ...)."""
    size = tuple(fft_size(n + k - 1) for n, k in zip(x.shape[-2:], weight.shape[-2:],
                                                       strict=True))
    per_image = max(weight.shape[:2]) * size[0] * (size[1] // 2 + 1) * 8  # complex64 bytes
    chunk = max(1, min(x.shape[0], FFT_CHUNK_BYTES // per_image))
    return _FullConvFFT.apply(x, weight, bias, size, chunk)


# -- batch norm: folded into the convolution, or computed in few memory passes ---------------
#
# On channels-last (NHWC) tensors with 3-16 channels PyTorch's batch-norm and broadcasting
# kernels loop over rows only C values long. Here per-channel sums are matrix products over
# the (B*H*W, C) view, and per-channel affine maps run on rows of lcm(C, 16) values with the
# channel vector tiled to match, so every inner loop is a full SIMD width.


def _rows(y: torch.Tensor) -> torch.Tensor | None:
    """(B*H*W, C) view of a channels-last (B, C, H, W) tensor; None for other layouts."""
    if y.dim() != 4 or y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
        return None
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _tiled(y: torch.Tensor) -> torch.Tensor | None:
    """Channels-last y as rows of lcm(C, 16) values (a view), or None."""
    rows = _rows(y)
    period = math.lcm(y.shape[1], 16)
    if rows is None or y.numel() % period:
        return None
    return rows.reshape(-1, period)


def channel_sums(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel sum of a (B, C, H, W), or of a * b when b is given: (C,).

    Channels-last: column sums of the tiled rows, or the diagonal of their Gram matrix (one
    GEMM pass over both tensors; the off-diagonal work is cheaper than writing a * b out).
    """
    channels = a.shape[1]
    flat_a, flat_b = _tiled(a), (_tiled(b) if b is not None else None)
    if flat_a is not None and (b is None or flat_b is not None):
        if b is None:
            return flat_a.sum(dim=0).view(-1, channels).sum(dim=0)
        return torch.mm(flat_a.t(), flat_b).diagonal().reshape(-1, channels).sum(dim=0)
    rows_a, rows_b = _rows(a), (_rows(b) if b is not None else None)
    if rows_a is not None and (b is None or rows_b is not None):  # channels-last, odd size
        if b is None:
            return rows_a.sum(dim=0)
        return torch.mm(rows_a.t(), rows_b).diagonal()
    planes_a = a.reshape(a.shape[0], channels, -1)  # (B, C, H*W)
    if b is None:
        return planes_a.sum(dim=(0, 2))
    return torch.linalg.vecdot(planes_a, b.reshape(planes_a.shape), dim=2).sum(dim=0)


def channel_affine(y: torch.Tensor, slope: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """y * slope[c] + offset[c] over (B, C, H, W), in y's memory layout."""
    flat = _tiled(y)
    if flat is None:
        return torch.addcmul(offset.view(1, -1, 1, 1), y, slope.view(1, -1, 1, 1))
    repeats = flat.shape[1] // y.shape[1]
    out = torch.addcmul(offset.repeat(repeats), flat, slope.repeat(repeats))
    return out.view(y.shape[0], y.shape[2], y.shape[3], y.shape[1]).permute(0, 3, 1, 2)


def _add_channel_scaled_(acc: torch.Tensor, y: torch.Tensor, slope: torch.Tensor) -> None:
    """acc += y * slope[c], in place; acc and y share one layout."""
    flat_acc, flat_y = _tiled(acc), _tiled(y)
    if flat_acc is None or flat_y is None:
        acc.addcmul_(y, slope.view(1, -1, 1, 1))
        return
    flat_acc.addcmul_(flat_y, slope.repeat(flat_acc.shape[1] // y.shape[1]))


def _moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance over (B, H, W), and the count behind them.

    E[y^2] - E[y]^2 loses digits when |mean| >> std; the callers centre y first (see
    `_batch_mean_of_conv`), so that the subtraction cancels nothing.
    """
    count = y.numel() // y.shape[1]
    mean = channel_sums(y) / count
    var = (channel_sums(y, y) / count - mean * mean).clamp_min(0.0)
    return mean, var, count


class _BatchMoments(torch.autograd.Function):
    """(mean, biased variance) of y per channel, as batch norm takes them in training."""

    @staticmethod
    def forward(ctx, y):
        mean, var, _ = _moments(y)
        ctx.save_for_backward(y, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        y, mean = ctx.saved_tensors
        count = y.numel() // y.shape[1]
        # d mean / dy = 1 / n;  d var / dy = 2 (y - mean) / n
        slope = (2.0 / count) * grad_var
        return channel_affine(y, slope, grad_mean / count - slope * mean)


class _BatchNormTrain(torch.autograd.Function):
    """F.batch_norm with batch statistics; returns (out, mean, biased var) for the running
    statistics. Two passes forward, three backward."""

    @staticmethod
    def forward(ctx, y, weight, bias, eps):
        mean, var, count = _moments(y)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        out = channel_affine(y, scale, bias - mean * scale)
        ctx.save_for_backward(y, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        y, weight, mean, invstd = ctx.saved_tensors
        count = y.numel() // y.shape[1]
        grad_out = grad_out.contiguous(memory_format=_layout(y))
        sum_g = channel_sums(grad_out)
        sum_g_xhat = (channel_sums(grad_out, y) - mean * sum_g) * invstd
        grad_y = None
        if ctx.needs_input_grad[0]:
            # scale * (g - mean(g) - xhat * mean(g * xhat)), as g * a + y * b + c
            scale = weight * invstd
            slope_y = -scale * invstd * sum_g_xhat / count
            offset = -scale * sum_g / count - slope_y * mean
            grad_y = channel_affine(y, slope_y, offset)
            _add_channel_scaled_(grad_y, grad_out, scale)
        return grad_y, sum_g_xhat, sum_g, None


def _layout(y: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _rows(y) is not None else torch.contiguous_format


def _batch_norm_train(y: torch.Tensor, bn: nn.BatchNorm2d,
                      centre: torch.Tensor | None = None) -> torch.Tensor:
    """bn(y + centre) in training mode, for y = (batch-norm input) - centre: batch norm does
    not see a per-channel shift, its running mean does."""
    out, mean, var = _BatchNormTrain.apply(y, bn.weight, bn.bias, bn.eps)
    _update_running_stats(bn, mean if centre is None else mean + centre, var,
                          y.numel() // y.shape[1])
    return out


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                          count: int) -> None:
    with torch.no_grad():  # what nn.BatchNorm2d does with its running statistics
        bn.num_batches_tracked.add_(1)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), bn.momentum)
        unbiased = var * (count / max(count - 1, 1))
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), bn.momentum)


def _batch_stats_mode(bn: nn.Module) -> bool | None:
    """True: normalises with batch statistics (and can update running ones the usual way);
    False: with running statistics (foldable); None: anything else (run the module)."""
    if type(bn) is not nn.BatchNorm2d or not bn.affine:
        return None
    if bn.training:
        return True if bn.track_running_stats and bn.momentum is not None else None
    return False if bn.running_mean is not None else None


def _fold_eval_bn(weight, bias, bn):
    """Weights and bias of conv followed by an eval-mode batch norm, as one convolution."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (O,)
    bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return weight * scale.view(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias


@torch.no_grad()
def _batch_mean_of_conv(conv_fn, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Per-channel mean of conv_fn(x, weight, bias) over (H, W) and the first few images:
    close enough to the batch mean to centre on. The convolution is linear, so that mean is
    the convolution of the images' sum, one small map instead of a batch of them."""
    sample = x[:CENTRE_SAMPLE]
    total = conv_fn(sample.sum(dim=0, keepdim=True), weight, None)  # (1, O, H', W')
    mean = total.sum(dim=(0, 2, 3)) / (sample.shape[0] * total.shape[2] * total.shape[3])
    return mean if bias is None else mean + bias


def _conv_bn_train(conv_fn, x, weight, bias, bn):
    """bn(conv(x)) with batch statistics, the convolution's output centred by its bias."""
    centre = _batch_mean_of_conv(conv_fn, x, weight, bias)
    bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return _batch_norm_train(conv_fn(x, weight, bias - centre), bn, centre)


def _conv_bn_relu_pool_train(conv_fn, x, weight, bias, bn, relu, pool):
    """relu(pool(bn(conv(x)))) with batch statistics; bn's affine and relu act on the pooled
    (4x smaller) map.

    Max-pooling commutes with a per-channel map that does not decrease, and batch norm is
    gamma / std * (y - mean) + beta: flipping the sign of the channels with gamma < 0 inside
    the convolution makes it non-decreasing. The bias also takes away about the batch mean,
    so the statistics are taken on centred values (see _moments).
    """
    sign = torch.where(bn.weight.detach() >= 0, 1.0, -1.0).to(weight.dtype)  # (O,)
    centre = _batch_mean_of_conv(conv_fn, x, weight, bias)  # (O,)
    bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
    y = conv_fn(x, weight * sign.view(-1, 1, 1, 1), (bias - centre) * sign)  # (B, O, H, W)
    mean, var = _BatchMoments.apply(y)  # of sign * (conv(x) - centre)
    scale = bn.weight * sign * torch.rsqrt(var + bn.eps)  # |gamma| / std
    pooled = _pool(pool, y)  # (B, O, H/2, W/2)
    out = relu(channel_affine(pooled, scale, bn.bias - mean * scale))
    _update_running_stats(bn, mean.detach() * sign + centre, var.detach(),
                          y.numel() // y.shape[1])
    return out


# -- pattern matching over an nn.Sequential ---------------------------------------------------


def _plain_conv(layer: nn.Module | None) -> bool:
    return (isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward
            and layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def _nearest_2x(layer: nn.Module) -> bool:
    if not isinstance(layer, nn.Upsample) or layer.mode != "nearest" or layer.size is not None:
        return False
    scale = layer.scale_factor
    return all(float(s) == 2.0 for s in (scale if isinstance(scale, tuple) else (scale,)))


def _fft_worthy(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    kernel = conv.kernel_size
    return (x.device.type == "cpu" and min(kernel) >= FFT_MIN_KERNEL
            and conv.padding == (kernel[0] - 1, kernel[1] - 1))


def _convolution_at(layers: Sequence[nn.Module], index: int, x: torch.Tensor):
    """(conv module, fn(x, weight, bias), layers used) for a convolution starting at index."""
    layer = layers[index]
    after = layers[index + 1] if index + 1 < len(layers) else None
    if _nearest_2x(layer) and _plain_conv(after) and all(k % 2 for k in after.kernel_size):
        return after, lambda x, w, b: upsample2x_conv2d(x, w, b, after.padding), 2
    if _plain_conv(layer):
        if _fft_worthy(layer, x):
            return layer, fft_full_conv2d, 1
        return layer, lambda x, w, b: F.conv2d(x, w, b, padding=layer.padding), 1
    return None, None, 0


def _channels_last_output(layers: Sequence[nn.Module], index: int, x: torch.Tensor) -> bool:
    """Whether the convolution at index gives a channels-last map: the sub-pixel form always
    does, oneDNN does for channels-last input, the FFT path never does."""
    if _nearest_2x(layers[index]):
        return True
    return _rows(x) is not None and not _fft_worthy(layers[index], x)


def _plain_pool_2x2(pool: nn.Module | None) -> bool:
    return (type(pool) is nn.MaxPool2d and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and not pool.return_indices)


def max_pool_2x2_no_grad(x: torch.Tensor) -> torch.Tensor | None:
    """2x2/2 max pooling of a channels-last map as two elementwise maxima over views; None
    where that does not apply. ATen's CPU max pooling always records argmax indices (for a
    backward this path never has), which costs about 5x more.
    """
    rows = _rows(x)
    if rows is None or x.requires_grad or x.device.type != "cpu" or x.shape[2] % 2 \
            or x.shape[3] % 2:
        return None
    batch, channels, height, width = x.shape
    pairs = rows.view(batch, height // 2, 2, width // 2, 2 * channels)  # two rows, two columns
    x = torch.maximum(pairs[:, :, 0], pairs[:, :, 1])  # (B, H/2, W/2, 2C): max of two rows
    pairs = x.view(batch, height // 2, width // 2, 2, channels)
    return torch.maximum(pairs[..., 0, :], pairs[..., 1, :]).permute(0, 3, 1, 2)  # (B, C, ...)


def _pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fast = max_pool_2x2_no_grad(x) if _plain_pool_2x2(pool) else None
    return pool(x) if fast is None else fast


def run_sequential(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """What `nn.Sequential(*layers)(x)` computes, with the patterns above computed fast."""
    index = 0
    while index < len(layers):
        conv, conv_fn, used = _convolution_at(layers, index, x)
        if conv is not None:
            channels_last = _channels_last_output(layers, index, x)
            index += used
            bn = layers[index] if index < len(layers) else None
            mode = _batch_stats_mode(bn) if bn is not None else None
            if mode is False:  # running statistics: one convolution with folded weights
                x = conv_fn(x, *_fold_eval_bn(conv.weight, conv.bias, bn))
                index += 1
            elif mode and x.device.type == "cpu" and index + 2 < len(layers) \
                    and type(layers[index + 1]) is nn.ReLU \
                    and type(layers[index + 2]) is nn.MaxPool2d \
                    and not layers[index + 2].return_indices:
                x = _conv_bn_relu_pool_train(conv_fn, x, conv.weight, conv.bias, bn,
                                             layers[index + 1], layers[index + 2])
                index += 3
            elif mode and x.device.type == "cpu" and channels_last:
                # ATen's batch norm is slow on channels-last CPU maps (fine on NCHW ones).
                x = _conv_bn_train(conv_fn, x, conv.weight, conv.bias, bn)
                index += 1
            else:
                x = conv_fn(x, conv.weight, conv.bias)
            continue
        layer = layers[index]
        after = layers[index + 1] if index + 1 < len(layers) else None
        if type(layer) is nn.ReLU and type(after) is nn.MaxPool2d and not after.return_indices:
            x = layer(_pool(after, x))
            index += 2
        elif _plain_pool_2x2(layer):
            x = _pool(layer, x)
            index += 1
        else:
            x = layer(x)
            index += 1
    return x


class FastSequential(nn.Sequential):
    """An nn.Sequential (same children, same state_dict keys) that runs `run_sequential`.

    Tracing for export (torch.export / torch.onnx dynamo, TorchScript), autocast, other dtypes
    and `fast_kernels = False` run the plain layers one by one, as nn.Sequential does.
    """

    fast_kernels: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_kernels or not applies_to(x):
            return super().forward(x)
        return run_sequential(list(self), x)
