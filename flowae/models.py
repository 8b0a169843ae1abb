"""Models by architecture: the seed's convolutional autoencoder and latent classifier, and a
residual family, each an encoder, a decoder and a classifier.

Each architecture has one builder function (`build_seed`, `build_res`), registered under its
`arch` name in ARCHITECTURES, that reads only its own config class (flowae.config: SeedConfig,
ResConfig; VARIANTS names configs). `build_model` turns any config into a FlowAE. The seed
layers follow the seed specification exactly (its tables are transcribed in
tests/flowae/test_flowae_models.py), except that the seed's NumPy upsample (which cut the
gradient) is a traceable nn.Upsample; they run exact fast kernels (flowae.fastconv) on CPU,
outside export tracing. Imports torch, flowae.config, flowae.fastconv and the runtime only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flowae.config import VARIANTS, ModelConfig, ResConfig, SeedConfig, get_variant
from flowae.fastconv import FastSequential
from flowae.runtime.contract import DEFAULT_IMAGE_SIZE_PX
from flowae.runtime.errors import FlowaeError

# The configs live in flowae.config (torch-free); training, export and tests name them here.
__all__ = ["ARCHITECTURES", "VARIANTS", "FlowAE", "ModelConfig", "ResConfig", "SeedConfig",
           "build_model", "count_parameters", "get_variant"]


def conv_block(
    in_ch: int, out_ch: int, kernel: int, padding: int, batchnorm: bool, act: nn.Module
) -> list[nn.Module]:
    """Conv2d(stride 1) [+ BatchNorm2d] + activation, as every seed layer is built."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, 1, padding)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(act)
    return layers


class Encoder(FastSequential):
    """LeNet-5 sized encoder: (B, 3, 100, 100) -> latent (B, 16, 22, 22)."""

    def __init__(self, batchnorm: bool):
        super().__init__(
            *conv_block(3, 6, 5, 0, batchnorm, nn.ReLU()),  # (B, 6, 96, 96)
            nn.MaxPool2d(2, 2),  # (B, 6, 48, 48)
            *conv_block(6, 16, 5, 0, batchnorm, nn.ReLU()),  # (B, 16, 44, 44)
            nn.MaxPool2d(2, 2),  # (B, 16, 22, 22)
        )


class BaseDecoder(FastSequential):
    """Grows the map with zero-padded convolutions: 22 -> 34 -> 46 -> 58 -> 70 -> 82 -> 100."""

    def __init__(self, batchnorm: bool):
        super().__init__(
            *conv_block(16, 16, 13, 12, batchnorm, nn.ReLU()),  # (B, 16, 34, 34)
            *conv_block(16, 16, 13, 12, batchnorm, nn.ReLU()),  # (B, 16, 46, 46)
            *conv_block(16, 6, 13, 12, batchnorm, nn.ReLU()),  # (B, 6, 58, 58)
            *conv_block(6, 6, 13, 12, batchnorm, nn.ReLU()),  # (B, 6, 70, 70)
            *conv_block(6, 6, 13, 12, batchnorm, nn.ReLU()),  # (B, 6, 82, 82)
            *conv_block(6, 3, 19, 18, batchnorm, nn.Tanh()),  # (B, 3, 100, 100)
        )


class UpsampleDecoder(FastSequential):
    """2x nearest upsampling and padded convolutions: 22 -> 44 -> 48 -> 96 -> 100.

    nn.Upsample keeps the graph differentiable (the encoder learns from the reconstruction
    loss) and exports as a single ONNX Resize.
    """

    def __init__(self, batchnorm: bool):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),  # (B, 16, 44, 44)
            *conv_block(16, 6, 5, 4, batchnorm, nn.ReLU()),  # (B, 6, 48, 48)
            nn.Upsample(scale_factor=2, mode="nearest"),  # (B, 6, 96, 96)
            *conv_block(6, 3, 5, 4, batchnorm, nn.Tanh()),  # (B, 3, 100, 100)
        )


class Classifier(FastSequential):
    """Seed latent (B, 16, 22, 22) -> (B, num_classes) logits."""

    def __init__(self, batchnorm: bool, dropout: bool, num_classes: int):
        def maybe(flag: bool, module: nn.Module) -> list[nn.Module]:
            return [module] if flag else []

        super().__init__(
            *conv_block(16, 32, 3, 0, batchnorm, nn.ReLU()),  # (B, 32, 20, 20)
            nn.MaxPool2d(2, 2),  # (B, 32, 10, 10)
            *maybe(dropout, nn.Dropout2d(0.2)),
            *conv_block(32, 64, 3, 0, batchnorm, nn.ReLU()),  # (B, 64, 8, 8)
            nn.MaxPool2d(2, 2),  # (B, 64, 4, 4)
            nn.Flatten(),  # (B, 1024)
            *maybe(dropout, nn.Dropout(0.5)),
            nn.Linear(1024, 512),
            *maybe(batchnorm, nn.BatchNorm1d(512)),
            nn.ReLU(),
            *maybe(dropout, nn.Dropout(0.25)),
            nn.Linear(512, num_classes),
        )


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """Conv2d ("same" padding, no bias) + BatchNorm2d + ReLU: the "res" family's unit."""
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU()]


class Residual(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))): a ResNet basic block, two 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(channels, channels, 3),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResEncoder(nn.Sequential):
    """(B, 3, 100, 100) -> latent (B, C, 25, 25): 5x5 stride-2 stem, 2x2 pool, a residual block.

    Two cheap steps take the map to a quarter of the side; the 3x3 work happens at 25x25.
    """

    def __init__(self, channels: int):
        super().__init__(
            *conv_bn_relu(3, channels, 5, stride=2),  # (B, C, 50, 50)
            nn.MaxPool2d(2, 2),  # (B, C, 25, 25)
            Residual(channels),
        )


class ResClassifier(nn.Sequential):
    """Latent (B, C, 25, 25) -> logits: two stride-2 stages with a residual block each, global
    average pooling and one Linear (no 1024 x 512 hidden layer to overfit)."""

    def __init__(self, widths: tuple[int, ...], dropout: bool, num_classes: int):
        latent, mid, top = widths
        super().__init__(
            *conv_bn_relu(latent, mid, 3, stride=2),  # (B, mid, 13, 13)
            Residual(mid),
            *conv_bn_relu(mid, top, 3, stride=2),  # (B, top, 7, 7)
            Residual(top),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, top)
            *([nn.Dropout(0.3)] if dropout else []),
            nn.Linear(top, num_classes),
        )


class LightDecoder(nn.Sequential):
    """Latent (B, C, 25, 25) -> (B, 3, 100, 100): two 2x nearest upsamples and 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),  # (B, C, 50, 50)
            *conv_bn_relu(channels, 16, 3),  # (B, 16, 50, 50)
            nn.Upsample(scale_factor=2, mode="nearest"),  # (B, 16, 100, 100)
            nn.Conv2d(16, 3, 3, 1, 1),
            nn.Tanh(),
        )


class FlowAE(nn.Module):
    """Encoder, decoder and classifier of one variant, built by its architecture's builder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch not in ARCHITECTURES:
            raise FlowaeError(f"unknown arch {config.arch!r}; expected one of "
                              f"{', '.join(ARCHITECTURES)}")
        if config.image_size_px != DEFAULT_IMAGE_SIZE_PX:
            raise FlowaeError(
                f"variant {config.name!r}: the layers need {DEFAULT_IMAGE_SIZE_PX} px "
                f"inputs, got {config.image_size_px}"
            )
        self.config = config
        self.encoder, self.decoder, self.classifier = ARCHITECTURES[config.arch](config)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, latent); the decoder runs separately, as in deployment."""
        latent = self.encoder(images)  # (B, *latent_shape())
        return self.classifier(latent), latent

    def use_fast_kernels(self, enabled: bool) -> FlowAE:
        """Switch the exact fast kernels (on by default) on or off; returns self."""
        for module in self.modules():
            if isinstance(module, FastSequential):
                module.fast_kernels = enabled
        return self

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the encoder's output: (16, 22, 22) for the seed, (widths[0], 25, 25)
        for the res family at 100 px."""
        side = self.config.image_size_px
        if isinstance(self.config, ResConfig):
            side = (side + 1) // 2 // 2  # stride-2 stem, 2x2 pool
            return (self.config.widths[0], side, side)
        side = ((side - 4) // 2 - 4) // 2  # two (5x5 conv, 2x2 pool)
        return (16, side, side)


Parts = tuple[nn.Module, nn.Module, nn.Module]  # encoder, decoder, classifier


def build_seed(config: SeedConfig) -> Parts:
    decoders = {"base": BaseDecoder, "upsample": UpsampleDecoder}
    if config.decoder not in decoders:
        raise FlowaeError(f"unknown decoder {config.decoder!r}; expected {list(decoders)}")
    return (Encoder(config.batchnorm), decoders[config.decoder](config.batchnorm),
            Classifier(config.batchnorm, config.dropout, config.num_classes))


def build_res(config: ResConfig) -> Parts:
    if len(config.widths) != 3:
        raise FlowaeError(f"variant {config.name!r}: arch 'res' needs three widths, got "
                          f"{config.widths}")
    return (ResEncoder(config.widths[0]), LightDecoder(config.widths[0]),
            ResClassifier(config.widths, config.dropout, config.num_classes))


# arch name -> its builder (its config class: flowae.config.CONFIG_TYPES)
ARCHITECTURES: dict[str, Callable[..., Parts]] = {
    SeedConfig.arch: build_seed,
    ResConfig.arch: build_res,
}


def build_model(config: ModelConfig) -> FlowAE:
    return FlowAE(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
