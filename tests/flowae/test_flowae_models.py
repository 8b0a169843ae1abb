"""The model registry against the seed specification, whose layer tables are transcribed below:
every layer in execution order with its output shape, parameter counts derived from those
tables by formula, and the differentiable 2x nearest upsample that replaces the seed's NumPy
one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowae.models import (
    VARIANTS,
    FlowAE,
    ModelConfig,
    SeedConfig,
    build_model,
    count_parameters,
    get_variant,
)
from flowae.runtime.errors import FlowaeError

SEED_VARIANTS = ("base", "bn", "bn-dropout", "upsample")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The seed specification's tables, transcribed: Conv2d(in_ch, out_ch, kernel, stride, padding).
ENCODER_CONVS = ((3, 6, 5, 1, 0), (6, 16, 5, 1, 0))
BASE_DECODER_CONVS = (
    (16, 16, 13, 1, 12), (16, 16, 13, 1, 12), (16, 6, 13, 1, 12),
    (6, 6, 13, 1, 12), (6, 6, 13, 1, 12), (6, 3, 19, 1, 18),
)  # fmt: skip
UPSAMPLE_DECODER_CONVS = ((16, 6, 5, 1, 4), (6, 3, 5, 1, 4))
CLASSIFIER_CONVS = ((16, 32, 3, 1, 0), (32, 64, 3, 1, 0))


@dataclass
class Expected:
    """Builds the layer list a seed table describes: (layer, output shape without batch),
    tracking the shape by the convolution/pooling formulas and the parameter count by
    in*out*k*k + out (Conv2d), in*out + out (Linear), 2*C (affine BatchNorm)."""

    shape: tuple[int, ...]
    layers: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    parameters: int = 0

    def add(self, name: str) -> None:  # a shape-preserving layer without parameters
        self.layers.append((name, self.shape))

    def conv(self, spec: tuple[int, int, int, int, int], batchnorm: bool, act: str) -> None:
        in_ch, out_ch, kernel, stride, padding = spec
        channels, side, _ = self.shape
        assert channels == in_ch, "seed table does not chain"
        side = (side + 2 * padding - kernel) // stride + 1
        self.shape = (out_ch, side, side)
        self.add(f"Conv2d({in_ch}, {out_ch}, {kernel}, {stride}, {padding})")
        self.parameters += in_ch * out_ch * kernel * kernel + out_ch
        if batchnorm:
            self.add(f"BatchNorm2d({out_ch})")
            self.parameters += 2 * out_ch
        self.add(act)

    def pool(self) -> None:
        channels, side, _ = self.shape
        self.shape = (channels, side // 2, side // 2)
        self.add("MaxPool2d(2, 2)")

    def upsample(self) -> None:
        channels, side, _ = self.shape
        self.shape = (channels, 2 * side, 2 * side)
        self.add("Upsample(2x, nearest)")

    def flatten(self) -> None:
        self.shape = (int(np.prod(self.shape)),)
        self.add("Flatten")

    def linear(self, in_features: int, out_features: int) -> None:
        assert self.shape == (in_features,), "seed table does not chain"
        self.shape = (out_features,)
        self.add(f"Linear({in_features}, {out_features})")
        self.parameters += in_features * out_features + out_features


def expected_encoder(batchnorm: bool) -> Expected:
    stack = Expected((3, 100, 100))
    for spec in ENCODER_CONVS:
        stack.conv(spec, batchnorm, "ReLU")
        stack.pool()
    return stack


def expected_decoder(decoder: str, batchnorm: bool) -> Expected:
    stack = Expected((16, 22, 22))
    if decoder == "base":
        for i, spec in enumerate(BASE_DECODER_CONVS):
            stack.conv(spec, batchnorm, "Tanh" if i == len(BASE_DECODER_CONVS) - 1 else "ReLU")
    else:
        stack.upsample()
        stack.conv(UPSAMPLE_DECODER_CONVS[0], batchnorm, "ReLU")
        stack.upsample()
        stack.conv(UPSAMPLE_DECODER_CONVS[1], batchnorm, "Tanh")
    return stack


def expected_classifier(batchnorm: bool, dropout: bool) -> Expected:
    stack = Expected((16, 22, 22))
    stack.conv(CLASSIFIER_CONVS[0], batchnorm, "ReLU")
    stack.pool()
    if dropout:
        stack.add("Dropout2d(0.2)")  # after the classifier's first pool
    stack.conv(CLASSIFIER_CONVS[1], batchnorm, "ReLU")
    stack.pool()
    stack.flatten()
    if dropout:
        stack.add("Dropout(0.5)")  # after Flatten
    stack.linear(1024, 512)
    if batchnorm:
        stack.add("BatchNorm1d(512)")  # after Linear(1024, 512)
        stack.parameters += 2 * 512
    stack.add("ReLU")
    if dropout:
        stack.add("Dropout(0.25)")  # before the last Linear
    stack.linear(512, 102)
    return stack


# What each seed variant is, restated from its experiments table.
SEED_SPEC = {
    "base": {"decoder": "base", "batchnorm": False, "dropout": False},
    "bn": {"decoder": "base", "batchnorm": True, "dropout": False},
    "bn-dropout": {"decoder": "base", "batchnorm": True, "dropout": True},
    "upsample": {"decoder": "upsample", "batchnorm": True, "dropout": True},
}


def describe(module: nn.Module) -> str:
    """One leaf module in the notation of the seed tables (and `Expected`)."""
    if isinstance(module, nn.Conv2d):
        square = {module.kernel_size[0] == module.kernel_size[1], module.stride[0] ==
                  module.stride[1], module.padding[0] == module.padding[1]}
        assert square == {True}, f"non-square {module}"
        assert module.bias is not None and module.groups == 1 and module.dilation == (1, 1)
        assert module.padding_mode == "zeros"  # the base decoder grows through zero padding
        return (f"Conv2d({module.in_channels}, {module.out_channels}, {module.kernel_size[0]}, "
                f"{module.stride[0]}, {module.padding[0]})")
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        assert module.affine and module.track_running_stats
        return f"{type(module).__name__}({module.num_features})"
    if isinstance(module, nn.MaxPool2d):
        assert module.padding == 0 and module.dilation == 1 and not module.ceil_mode
        return f"MaxPool2d({module.kernel_size}, {module.stride})"
    if isinstance(module, nn.Upsample):
        assert module.size is None
        return f"Upsample({float(module.scale_factor):g}x, {module.mode})"
    if isinstance(module, (nn.Dropout, nn.Dropout2d)):
        return f"{type(module).__name__}({module.p})"
    if isinstance(module, nn.Linear):
        assert module.bias is not None
        return f"Linear({module.in_features}, {module.out_features})"
    return type(module).__name__


def leaves(module: nn.Module) -> list[nn.Module]:
    """The layers a model part registers, in registration order."""
    return [m for m in module.modules() if not list(m.children())]


def run_layers(module: nn.Module, inputs: torch.Tensor, replace=None) -> tuple[torch.Tensor, list]:
    """Run a part's registered layers one by one, recording (layer, output shape without
    batch); `replace` maps a layer type to a function run in its place."""
    records: list[tuple[str, tuple[int, ...]]] = []
    x = inputs
    for layer in leaves(module):
        x = (replace or {}).get(type(layer), layer)(x)
        records.append((describe(layer), tuple(x.shape[1:])))
    return x, records


def assert_same_function(module: nn.Module, inputs: torch.Tensor, expected: torch.Tensor) -> None:
    """The part's own forward computes what its layers compute one by one. It may use faster
    exact kernels (flowae.fastconv: FFT and sub-pixel convolutions), equal up to float32
    rounding, hence a tolerance rather than torch.equal."""
    torch.testing.assert_close(module(inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def models() -> dict[str, FlowAE]:
    torch.manual_seed(0)
    return {name: build_model(VARIANTS[name]).eval() for name in SEED_VARIANTS}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 100, 100, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_registry_names_the_four_seed_variants():
    # The seed's four come first; the others are the "res" family.
    assert list(VARIANTS)[:4] == list(SEED_VARIANTS)
    assert {VARIANTS[name].arch for name in list(VARIANTS)[4:]} == {"res"}
    for name in SEED_VARIANTS:
        config = VARIANTS[name]
        assert config.name == name and config.arch == "seed"
        assert get_variant(name) is config
        assert {k: getattr(config, k) for k in SEED_SPEC[name]} == SEED_SPEC[name]
        assert (config.image_size_px, config.num_classes) == (100, 102)


def test_unknown_variant_names_the_choices():
    with pytest.raises(FlowaeError, match="unknown variant 'resnet'") as info:
        get_variant("resnet")
    assert all(name in str(info.value) for name in SEED_VARIANTS)


@pytest.mark.parametrize("name", SEED_VARIANTS)
def test_layers_and_shapes_match_seed(models, images, name):
    spec = SEED_SPEC[name]
    model = models[name]
    with torch.no_grad():
        latent, encoder_layers = run_layers(model.encoder, images)
        reconstruction, decoder_layers = run_layers(model.decoder, latent)
        logits, classifier_layers = run_layers(model.classifier, latent)
        assert_same_function(model.encoder, images, latent)
        assert_same_function(model.decoder, latent, reconstruction)
        assert_same_function(model.classifier, latent, logits)

    assert encoder_layers == expected_encoder(spec["batchnorm"]).layers
    assert decoder_layers == expected_decoder(spec["decoder"], spec["batchnorm"]).layers
    assert classifier_layers == expected_classifier(spec["batchnorm"], spec["dropout"]).layers

    # The sizes the seed specification prints, read off the real model, not the formulas above.
    pools = [shape for layer, shape in encoder_layers if layer.startswith("MaxPool")]
    assert pools == [(6, 48, 48), (16, 22, 22)]
    decoder_sides = [shape[1] for layer, shape in decoder_layers
                     if layer.startswith(("Conv2d", "Upsample"))]
    assert decoder_sides == ([34, 46, 58, 70, 82, 100] if spec["decoder"] == "base"
                             else [44, 48, 96, 100])
    classifier_pools = [shape for layer, shape in classifier_layers if layer.startswith("MaxPool")]
    assert classifier_pools == [(32, 10, 10), (64, 4, 4)]

    assert latent.shape == (2, 16, 22, 22)
    assert model.latent_shape() == (16, 22, 22)
    assert reconstruction.shape == (2, 3, 100, 100)
    assert logits.shape == (2, 102)
    assert reconstruction.abs().max() <= 1.0  # Tanh: the [-1, 1] range of the inputs


@pytest.mark.parametrize("name", SEED_VARIANTS)
def test_forward_returns_logits_and_latent(models, images, name):
    model = models[name]
    with torch.no_grad():
        logits, latent = model(images)
        assert torch.equal(latent, model.encoder(images))
        assert torch.equal(logits, model.classifier(latent))
    assert logits.shape == (2, 102) and latent.shape == (2, 16, 22, 22)


@pytest.mark.parametrize("name", SEED_VARIANTS)
def test_parameter_counts_follow_seed_tables(models, name):
    spec = SEED_SPEC[name]
    parts = {
        "encoder": expected_encoder(spec["batchnorm"]).parameters,
        "decoder": expected_decoder(spec["decoder"], spec["batchnorm"]).parameters,
        "classifier": expected_classifier(spec["batchnorm"], spec["dropout"]).parameters,
    }
    model = models[name]
    assert {part: count_parameters(getattr(model, part)) for part in parts} == parts
    assert count_parameters(model) == sum(parts.values())
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_counts_rank_as_the_architectures_do(models):
    counts = {name: count_parameters(model) for name, model in models.items()}
    # BatchNorm adds 2 per channel; dropout adds nothing; the upsample decoder is far smaller.
    assert counts["bn"] - counts["base"] == 2 * (6 + 16 + 16 + 16 + 6 + 6 + 6 + 3 + 32 + 64 + 512)
    assert counts["bn-dropout"] == counts["bn"]
    assert counts["upsample"] < counts["base"] < counts["bn"]


def _kron_upsample(x: torch.Tensor) -> torch.Tensor:
    """The seed's upsample: through NumPy, np.kron with a 2x2 block of ones (detaches)."""
    return torch.from_numpy(np.kron(x.detach().numpy(), np.ones((1, 1, 2, 2), np.float32)))


def test_upsample_decoder_computes_the_seeds_nearest_2x(models):
    decoder = models["upsample"].decoder
    upsamples = [m for m in leaves(decoder) if isinstance(m, nn.Upsample)]
    assert len(upsamples) == 2
    latent = torch.randn(2, 16, 22, 22, generator=torch.Generator().manual_seed(1))
    for upsample in upsamples:
        assert torch.equal(upsample(latent), _kron_upsample(latent))
    with torch.no_grad():  # the whole decoder is the seed's, with np.kron in the upsamples' place
        seed_output, _ = run_layers(decoder, latent, replace={nn.Upsample: _kron_upsample})
        assert_same_function(decoder, latent, seed_output)


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def test_reconstruction_loss_reaches_the_encoder_in_upsample_variant(images):
    torch.manual_seed(0)
    model = build_model(VARIANTS["upsample"]).train()
    loss = F.mse_loss(model.decoder(model.encoder(images)), images)
    loss.backward()
    for module in (model.encoder, model.decoder):
        grad = _first_conv(module).weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.decoder.parameters())

    # The same check fails for the seed's NumPy upsample: nothing before it gets a gradient.
    torch.manual_seed(0)
    seed_like = build_model(VARIANTS["upsample"]).train()
    layers = list(seed_like.decoder)
    latent = seed_like.encoder(images)
    out = latent
    for layer in layers:
        out = _kron_upsample(out) if isinstance(layer, nn.Upsample) else layer(out)
    F.mse_loss(out, images).backward()
    assert _first_conv(seed_like.encoder).weight.grad is None
    assert _first_conv(seed_like.decoder).weight.grad is None


def test_upsample_decoder_exports_with_its_upsamples(models):
    # The seed's NumPy upsample could be neither traced nor exported; torch.export (what the
    # ONNX exporter traces with) must see two nearest-neighbour upsamples and the same function.
    decoder = models["upsample"].decoder
    latent = torch.randn(3, 16, 22, 22, generator=torch.Generator().manual_seed(2))
    exported = torch.export.export(decoder, (latent,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum("upsample_nearest2d" in target for target in targets) == 2
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(latent), decoder(latent), rtol=1e-4,
                                   atol=1e-5)


def test_model_config_round_trips_and_rebuilds_identically():
    for config in VARIANTS.values():
        assert ModelConfig.from_dict(config.to_dict()) == config
    torch.manual_seed(3)
    first = build_model(VARIANTS["bn"]).state_dict()
    torch.manual_seed(3)
    second = build_model(VARIANTS["bn"]).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_model_configs_are_refused():
    with pytest.raises(FlowaeError, match="100 px inputs, got 128"):
        FlowAE(SeedConfig(name="base", image_size_px=128))
    with pytest.raises(FlowaeError, match="unknown decoder 'pixelshuffle'"):
        FlowAE(SeedConfig(name="base", decoder="pixelshuffle"))
    with pytest.raises(FlowaeError, match="unknown arch"):
        FlowAE(ModelConfig(name="abstract"))


def test_a_variant_resized_for_a_dataset_keeps_its_layers():
    config = get_variant("bn-dropout", num_classes=7)
    assert config == SeedConfig(name="bn-dropout", batchnorm=True, dropout=True, num_classes=7)
    assert get_variant("bn-dropout") == VARIANTS["bn-dropout"]  # the registry is untouched
    assert build_model(config).classifier[-1].out_features == 7
    with pytest.raises(FlowaeError, match="variant 'base'.*widths"):
        get_variant("base", widths=(8, 8, 8))  # a seed config has no widths to set
