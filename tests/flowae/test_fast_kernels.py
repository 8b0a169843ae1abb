"""The fast kernels (flowae.fastconv) against the plain nn layers they stand in for.

Each kernel is held to the plain layers in float64, where both are exact up to ~1e-12, and
whole models in float32 are held to a float64 reference: the fast path may not stray further
from it than the plain float32 layers do (float rounding, nothing else). Also: same
parameters and state_dict keys, the same running statistics, export tracing sees the plain
layers, and the switch that turns the kernels off.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowae import fastconv
from flowae.fastconv import (
    FastSequential,
    _batch_norm_train,
    fft_full_conv2d,
    fft_size,
    max_pool_2x2_no_grad,
    run_sequential,
    upsample2x_conv2d,
)
from flowae.models import VARIANTS, build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F64_TOL = 1e-10  # float64: fast and plain differ only in summation order
F32_SLACK = 4.0  # float32: fast error vs a float64 reference <= this x the plain error, ...
F32_FLOOR = 1e-6  # ... + this (relative to the largest value compared)


def grads(output: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Gradients of <output, fixed random cotangent> with respect to `inputs`; the cotangent
    is drawn in float64 whatever the dtype, so float32 and float64 runs get the same one."""
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64).to(output.dtype)
    return list(torch.autograd.grad(output, inputs, cotangent))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kernel,padding,side", [(5, 4, 22), (5, 4, 48), (3, 1, 9), (5, 1, 8),
                                                 (7, 3, 6), (3, 0, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_form_equals_upsample_then_conv(kernel, padding, side, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, kernel, 1, padding).double()
    x = torch.randn(3, 5, side, side, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    plain = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    fast = upsample2x_conv2d(x, conv.weight, conv.bias, conv.padding)
    assert fast.shape == plain.shape
    assert max_abs(fast, plain) < F64_TOL
    params = [x, conv.weight, conv.bias]
    for got, want in zip(grads(fast, params), grads(plain, params), strict=True):
        assert max_abs(got, want) < F64_TOL * max(1.0, want.abs().max().item())


def test_subpixel_form_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd kernels"):
        upsample2x_conv2d(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 4, 4), None, (1, 1))


@pytest.mark.parametrize("in_ch,out_ch,side,kernel", [(16, 16, 22, 13), (16, 6, 46, 13),
                                                      (6, 3, 82, 19), (4, 2, 9, 7)])
def test_fft_convolution_equals_conv2d(monkeypatch, in_ch, out_ch, side, kernel):
    # A small chunk budget sends the batch through the FFT path in several chunks.
    monkeypatch.setattr(fastconv, "FFT_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, kernel, 1, kernel - 1).double()
    x = torch.randn(3, in_ch, side, side + 3, dtype=torch.float64, requires_grad=True)
    plain, fast = conv(x), fft_full_conv2d(x, conv.weight, conv.bias)
    assert fast.shape == plain.shape
    assert max_abs(fast, plain) < F64_TOL
    params = [x, conv.weight, conv.bias]
    for got, want in zip(grads(fast, params), grads(plain, params), strict=True):
        assert max_abs(got, want) < F64_TOL * max(1.0, want.abs().max().item())


def test_fft_convolution_without_bias_or_input_gradient():
    torch.manual_seed(0)
    weight = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    plain, fast = F.conv2d(x, weight, None, padding=6), fft_full_conv2d(x, weight, None)
    assert max_abs(fast, plain) < F64_TOL
    assert max_abs(grads(fast, [weight])[0], grads(plain, [weight])[0]) < F64_TOL * 100


@pytest.mark.parametrize("length", [1, 34, 46, 58, 70, 82, 100, 113])
def test_fft_sizes_are_multiples_of_4_with_small_prime_factors(length):
    size = fft_size(length)
    assert length <= size < length + 16 and size % 4 == 0
    rest = size
    for prime in (2, 3, 5, 7):
        while rest % prime == 0:
            rest //= prime
    assert rest == 1


@pytest.mark.parametrize("channels,side", [(6, 48), (3, 100), (16, 10), (6, 7)])  # 7: untiled
def test_batch_norm_by_matrix_products_equals_batch_norm(channels, side):
    torch.manual_seed(0)
    plain_bn = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        plain_bn.weight.copy_(torch.randn(channels))
        plain_bn.bias.copy_(torch.randn(channels))
    fast_bn = copy.deepcopy(plain_bn)
    x = (torch.randn(4, channels, side, side, dtype=torch.float64) * 3 + 0.5)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    plain, fast = plain_bn(x), _batch_norm_train(x, fast_bn)
    assert max_abs(fast, plain) < F64_TOL
    params = [x, plain_bn.weight, plain_bn.bias]
    fast_params = [x, fast_bn.weight, fast_bn.bias]
    for got, want in zip(grads(fast, fast_params), grads(plain, params), strict=True):
        assert max_abs(got, want) < F64_TOL
    for name, buffer in plain_bn.named_buffers():
        assert torch.allclose(getattr(fast_bn, name), buffer, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("channels,side", [(6, 96), (16, 44), (3, 7 * 2)])
def test_no_grad_max_pool_is_bitwise_max_pool(channels, side):
    x = torch.randn(3, channels, side, side).contiguous(memory_format=torch.channels_last)
    fast = max_pool_2x2_no_grad(x)
    assert fast is not None and torch.equal(fast, F.max_pool2d(x, 2))
    assert max_pool_2x2_no_grad(x.contiguous()) is None  # NCHW: left to ATen
    assert max_pool_2x2_no_grad(x.requires_grad_(True)) is None  # autograd needs the indices


def randomize_batch_norms(model: nn.Module, seed: int) -> None:
    """Negative and positive gammas (the sign trick in the fused conv-bn-pool path), shifted
    betas and non-trivial running statistics (the eval-mode folding)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                shape = module.weight.shape
                module.weight.copy_(torch.randn(shape, generator=generator))
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.3)
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)


def forward_backward(model, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Logits, reconstruction, then the gradient of every parameter (dropout seeded)."""
    torch.manual_seed(5)
    logits, latent = model(images)
    reconstruction = model.decoder(latent)
    loss = F.mse_loss(reconstruction, images) + F.cross_entropy(logits, labels)
    return [logits, reconstruction, *torch.autograd.grad(loss, list(model.parameters()))]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    scale = max(w.abs().max().item() for w in want)
    return max(max_abs(g, w) for g, w in zip(got, want, strict=True)) / scale


SEED_ARCH = [name for name, config in VARIANTS.items() if config.arch == "seed"]


@pytest.mark.parametrize("variant", SEED_ARCH)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_fast_path_equals_plain_layers(variant, training, channels_last):
    torch.manual_seed(1)
    reference = build_model(VARIANTS[variant]).double().use_fast_kernels(False)
    randomize_batch_norms(reference, seed=3)
    reference.train(training)
    images = torch.rand(4, 3, 100, 100, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 102, (4,))

    def run(model, dtype):
        model = copy.deepcopy(model).to(dtype)
        x = images.to(dtype)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(
                memory_format=torch.channels_last)
        return model, forward_backward(model, x, labels)

    plain64, want = run(reference, torch.float64)
    fast64, got64 = run(reference.use_fast_kernels(True), torch.float64)
    plain32, got_plain32 = run(reference.use_fast_kernels(False), torch.float32)
    fast32, got_fast32 = run(reference.use_fast_kernels(True), torch.float32)

    # float64: the same function; outputs, logits and every parameter gradient.
    assert relative_error(got64[:2], want[:2]) < F64_TOL
    assert relative_error(got64[2:], want[2:]) < F64_TOL
    # float32: no further from the float64 reference than the plain layers in float32.
    for part in (slice(0, 2), slice(2, None)):
        plain_err = relative_error(got_plain32[part], want[part])
        assert relative_error(got_fast32[part], want[part]) <= F32_SLACK * plain_err + F32_FLOOR
    # Running statistics and batch counters move exactly as the plain batch norms move them.
    want_state = plain64.state_dict()
    assert list(fast64.state_dict()) == list(want_state)
    for name, value in fast64.state_dict().items():
        assert torch.allclose(value.double(), want_state[name].double(), rtol=1e-10,
                              atol=1e-12), name


@pytest.mark.parametrize("variant", SEED_ARCH)
def test_no_grad_evaluation_equals_plain_layers(variant):
    torch.manual_seed(1)
    model = build_model(VARIANTS[variant]).double()
    randomize_batch_norms(model, seed=4)
    model.eval().to(memory_format=torch.channels_last)
    images = (torch.rand(4, 3, 100, 100, dtype=torch.float64) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        fast = [*model(images), model.decoder(model.encoder(images))]
        model.use_fast_kernels(False)
        plain = [*model(images), model.decoder(model.encoder(images))]
    assert relative_error(fast, plain) < F64_TOL


def test_fast_kernels_keep_parameters_and_state_dict_keys():
    for variant in SEED_ARCH:
        model = build_model(VARIANTS[variant])
        plain_keys = list(copy.deepcopy(model).use_fast_kernels(False).state_dict())
        assert list(model.state_dict()) == plain_keys
        for part in (model.encoder, model.decoder, model.classifier):
            assert isinstance(part, FastSequential) and isinstance(part, nn.Sequential)
            assert part.fast_kernels


def test_switch_and_tracing_run_the_plain_layers(monkeypatch):
    calls = []
    monkeypatch.setattr(fastconv, "run_sequential",
                        lambda layers, x: calls.append(len(layers)) or run_sequential(layers, x))
    model = build_model(VARIANTS["upsample"]).eval()
    latent = torch.randn(2, 16, 22, 22)
    with torch.no_grad():
        model.decoder(latent)
        assert len(calls) == 1
        model.use_fast_kernels(False).decoder(latent)
        assert len(calls) == 1
        model.use_fast_kernels(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.decoder(latent)
        assert len(calls) == 1


@pytest.mark.parametrize("variant", ["upsample", "bn"])
def test_onnx_export_sees_the_plain_layers(monkeypatch, variant):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    calls = []
    monkeypatch.setattr(fastconv, "run_sequential",
                        lambda layers, x: calls.append(1) or run_sequential(layers, x))
    torch.manual_seed(0)
    model = build_model(VARIANTS[variant])
    randomize_batch_norms(model, seed=5)
    decoder = model.decoder.eval()
    latent = torch.randn(2, 16, 22, 22)
    program = torch.onnx.export(decoder, (latent,), dynamo=True, verbose=False)
    assert calls == []  # traced through nn.Sequential's own forward
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert not ops & {"DFT", "STFT", "Einsum", "DepthToSpace"}
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: latent.numpy()})[0]
    with torch.no_grad():
        eager = decoder(latent)  # the fast path
    assert calls and max_abs(torch.from_numpy(exported), eager) < 1e-4


def test_run_sequential_leaves_other_layers_alone():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), nn.Tanh(),
                           nn.MaxPool2d(3), nn.Upsample(scale_factor=3), nn.Conv2d(4, 2, 5),
                           nn.BatchNorm2d(2, momentum=None), nn.ReLU())
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(run_sequential(list(copy.deepcopy(layers)), x), layers(x))


def test_evaluation_from_inputs_scaled_once_equals_per_batch_scaling():
    from flowae.data import TensorSplit
    from flowae.distributed import DistInfo
    from flowae.runtime.contract import Preprocess
    from flowae.train import evaluate_model, float_inputs

    torch.manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (10, 3, 100, 100), dtype=torch.uint8),
                        torch.randint(0, 102, (10,)))
    preprocess, cpu = Preprocess(), torch.device("cpu")
    model = build_model(VARIANTS["upsample"]).to(memory_format=torch.channels_last)
    inputs = float_inputs(split, preprocess, cpu, torch.channels_last)
    per_batch = evaluate_model(model, split, preprocess, 4, cpu, DistInfo(), channels_last=True)
    assert evaluate_model(model, split, preprocess, 4, cpu, DistInfo(), channels_last=True,
                          inputs=inputs) == per_batch


@pytest.mark.parametrize("pooled", [True, False])
def test_batch_statistics_keep_their_digits_when_the_mean_dwarfs_the_spread(pooled):
    """E[y^2] - E[y]^2 in float32 would lose ~4 digits at mean/std = 100; the fast path
    centres the convolution's output first and stays as close to float64 as ATen's."""
    torch.manual_seed(0)
    tail = [nn.ReLU(), nn.MaxPool2d(2)] if pooled else [nn.ReLU()]
    upsample_conv = [nn.Upsample(scale_factor=2), nn.Conv2d(3, 6, 5, 1, 4)]
    head = [nn.Conv2d(3, 6, 5)] if pooled else upsample_conv
    reference = FastSequential(*head, nn.BatchNorm2d(6), *tail).double()
    with torch.no_grad():
        reference[len(head) - 1].bias.fill_(100.0)  # mean ~ 100, std ~ 1
    images = torch.rand(24, 3, 20, 20, dtype=torch.float64) * 2 - 1  # > CENTRE_SAMPLE

    def run(fast, dtype):
        model = copy.deepcopy(reference).to(dtype).to(memory_format=torch.channels_last)
        model.fast_kernels = fast
        x = images.to(dtype).contiguous(memory_format=torch.channels_last)
        out = model(x)
        bn = model[len(head)]
        return [out, *grads(out, list(model.parameters())), bn.running_mean, bn.running_var]

    want = run(False, torch.float64)
    plain_err = relative_error(run(False, torch.float32)[:1], want[:1])
    fast = run(True, torch.float32)
    assert relative_error(fast[:1], want[:1]) <= F32_SLACK * plain_err + F32_FLOOR
    assert relative_error(fast[1:], want[1:]) < 1e-4
