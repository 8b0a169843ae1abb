"""Every config a run is made of, and the named ones: model variants and training recipes.

A model config is one frozen dataclass per architecture holding only the fields its builder
(flowae.models) reads: `SeedConfig` for the seed's autoencoder and classifier, `ResConfig` for
the residual family, both `ModelConfig`s. `VARIANTS` is the registry the CLI offers, like
timm's registered model functions; `get_variant(name, num_classes=...)` sizes one for a
dataset. `TrainConfig` holds every training default and `RECIPES` names whole recipes. Both are
saved in every checkpoint. Kept free of torch, so that `flowae-train --help` lists them
without importing it. Imports the standard library and the runtime's contract and errors only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

from flowae import __version__
from flowae.runtime.contract import DEFAULT_IMAGE_SIZE_PX, NUM_CLASSES
from flowae.runtime.errors import CheckpointError, FlowaeError


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every architecture's config has; `to_dict` is saved in every checkpoint."""

    arch: ClassVar[str] = ""  # the subclass's architecture name (CONFIG_TYPES key)
    name: str  # registry name, e.g. "upsample"
    image_size_px: int = DEFAULT_IMAGE_SIZE_PX  # square input side
    num_classes: int = NUM_CLASSES  # classifier outputs: the dataset's class count

    def to_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The config a checkpoint saved, by its "arch" ("seed" when absent: the oldest)."""
        data = dict(data)
        arch = data.pop("arch", "seed")
        if arch not in CONFIG_TYPES:
            raise CheckpointError(f"unknown model arch {arch!r}; this flowae knows "
                                  f"{', '.join(CONFIG_TYPES)}")
        config_type = CONFIG_TYPES[arch]
        # Checkpoints written when all architectures shared one config carry the other's
        # fields at values that meant "not used" (the res family's "light" decoder and
        # batch norm were fixed by the arch): drop those.
        for key, unused in _SHARED_CONFIG_LEFTOVERS.get(arch, {}).items():
            if key in data and data[key] in unused:
                del data[key]
        known = {f.name for f in fields(config_type)}
        if set(data) - known:
            raise CheckpointError(f"model config fields {sorted(set(data) - known)} are "
                                  f"unknown to the {arch!r} architecture")
        if "widths" in data:
            data["widths"] = tuple(data["widths"])  # JSON gives a list
        try:
            return config_type(**data)
        except TypeError as exc:
            raise CheckpointError(f"bad {arch!r} model config: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class SeedConfig(ModelConfig):
    """The seed's autoencoder and classifier, in its four variants."""

    arch: ClassVar[str] = "seed"
    decoder: str = "base"  # "base" (big padded convolutions) or "upsample" (2x nearest + conv)
    batchnorm: bool = False  # BatchNorm after every convolution (and after the hidden Linear)
    dropout: bool = False  # the seed's three dropouts in the classifier


@dataclass(frozen=True, kw_only=True)
class ResConfig(ModelConfig):
    """Residual encoder, global-average-pool classifier and a light 2x-upsampling decoder."""

    arch: ClassVar[str] = "res"
    widths: tuple[int, ...]  # channels of the latent, classifier stage 2, classifier stage 3
    dropout: bool = True  # before the classifier's Linear


CONFIG_TYPES: dict[str, type[ModelConfig]] = {config.arch: config
                                              for config in (SeedConfig, ResConfig)}
_SHARED_CONFIG_LEFTOVERS = {"seed": {"widths": ((), [])},
                            "res": {"decoder": ("light",), "batchnorm": (True,)}}

VARIANTS: dict[str, ModelConfig] = {
    "base": SeedConfig(name="base"),
    "bn": SeedConfig(name="bn", batchnorm=True),
    "bn-dropout": SeedConfig(name="bn-dropout", batchnorm=True, dropout=True),
    "upsample": SeedConfig(name="upsample", decoder="upsample", batchnorm=True, dropout=True),
    # Trained with the "modern" recipe (RECIPES below). Widths are multiples of 16:
    # onnxruntime's AVX-512 kernels work in blocks of 16 channels (measured: 24-48-96 runs
    # slower than 32-48-96 at batch 1).
    "res16": ResConfig(name="res16", widths=(16, 32, 64)),
    "res32": ResConfig(name="res32", widths=(32, 48, 96)),
}


def get_variant(name: str, **overrides) -> ModelConfig:
    """The registered config `name`, with fields replaced (e.g. num_classes=10)."""
    if name not in VARIANTS:
        raise FlowaeError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    if not overrides:
        return VARIANTS[name]
    try:
        return replace(VARIANTS[name], **overrides)
    except TypeError as exc:
        raise FlowaeError(f"variant {name!r}: {exc}") from exc


@dataclass(frozen=True)
class TrainConfig:
    """Every training default; the seed's recipe unless a comment says otherwise."""

    ae_epochs: int = 100  # phase 1: autoencoder, MSE on the reconstruction
    cls_epochs: int = 60  # phase 2: classifier + encoder fine-tuning, cross-entropy
    batch_size: int = 255  # global batch (split across processes under torchrun)
    lr: float = 1e-3  # Adam, both phases
    seed: int = 0  # model init, shuffling, dropout and augmentation
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    augment: bool = False  # random resized crop + flip + colour jitter (not in the seed)
    channels_last: bool = True  # NHWC memory layout: same numbers, faster convolutions
    eval_batch_size: int = 128  # evaluation only; no effect on results (smaller runs faster on CPU)
    # Beyond the seed recipe; each default below leaves it unchanged.
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle (linear warm-up, then cosine to zero)
    label_smoothing: float = 0.0  # phase 2 cross-entropy
    ae_images: str = "train"  # phase 1 images: train | train+val (val images without labels)
    # Phase 2 images: train | train+val (val with its labels). With train+val, val scores
    # nothing any more: choose the recipe on a train-only run first, then train the final model
    # on both (needs a dataset with a test split, the only held-out figure left).
    cls_images: str = "train"
    dec_epochs: int = 0  # phase 3: refit the decoder to the final encoder (encoder frozen)
    crop_scale_min: float = 0.25  # augmentation: smallest crop area (fraction of the image)
    bf16: bool = False  # bfloat16 autocast in training steps (AMX on this CPU); eval stays fp32
    cutmix: float = 0.0  # phase 2: share of batches where CutMix (alpha 1) pastes a box of
    # another image of the batch and mixes the two labels by area

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise CheckpointError(f"training options {sorted(unknown)} are unknown to this "
                                  f"version of flowae ({__version__}); resume with the version "
                                  f"that started the run")
        return cls(**data)

    def validate(self) -> None:
        if self.ae_epochs < 0 or self.cls_epochs < 0:
            raise FlowaeError("epochs must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise FlowaeError("batch sizes must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FlowaeError(f"learning rate must be > 0, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise FlowaeError(f"device must be auto, cpu or cuda, got {self.device!r}")
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "onecycle"),
                   "ae_images": ("train", "train+val"), "cls_images": ("train", "train+val")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FlowaeError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dec_epochs < 0:
            raise FlowaeError("epochs must be >= 0")
        if not (0 <= self.weight_decay < 1 and 0 <= self.label_smoothing < 1):
            raise FlowaeError("weight decay and label smoothing must be in [0, 1)")
        if not 0 <= self.cutmix <= 1:
            raise FlowaeError(f"cutmix must be in [0, 1], got {self.cutmix}")
        if not 0 < self.crop_scale_min <= 1:
            raise FlowaeError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")


# Named recipes: `flowae-train --recipe NAME` starts from one; explicit flags override fields.
RECIPES: dict[str, TrainConfig] = {
    "seed": TrainConfig(),
    # Augmentation, AdamW with one-cycle, label smoothing, autoencoder pre-training on
    # train+val images (no labels), longer phase 2, and a decoder refit at the end. 300 phase-2
    # epochs won on val over 200 and over 300 with CutMix (docs/RESULTS.md).
    "modern": TrainConfig(ae_epochs=30, cls_epochs=300, batch_size=64, lr=2e-3,
                          optimizer="adamw", weight_decay=0.05, schedule="onecycle",
                          label_smoothing=0.1, augment=True, ae_images="train+val",
                          dec_epochs=20, bf16=True),
}
# The recipe each variant trains with unless --recipe says otherwise.
DEFAULT_RECIPE = {"base": "seed", "bn": "seed", "bn-dropout": "seed", "upsample": "seed"}


def default_recipe(variant: str) -> str:
    return DEFAULT_RECIPE.get(variant, "modern")
