"""The seed's two-phase recipe: autoencoder (MSE), then classifier fine-tuning (cross-entropy).

`train()` is the one entry point: it loads the splits into memory, runs both phases with a
checkpoint after every epoch, resumes from one, evaluates val each epoch and test at the end,
and writes metrics.json and the plots into the run directory. It runs unchanged under torchrun
(DistributedDataParallel: gloo on CPU, nccl on CUDA). Imports torch, flowae and the runtime's
contract; never prints (progress bars go to stderr through tqdm, results are returned).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowae import __version__
from flowae.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from flowae.checkpoint import atomic_write_bytes as _atomic_write
from flowae.data import TensorSplit, load_split, to_float
from flowae.distributed import DistInfo
from flowae.models import FlowAE, ModelConfig, build_model, count_parameters
from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import CheckpointError, FlowaeError

log = logging.getLogger(__name__)

PHASES = ("ae", "cls", "dec")  # autoencoder, classifier, decoder refit (0 epochs in the seed)
METRICS_NAME = "metrics.json"


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
    # Beyond the seed (issue 6); each default below leaves the seed recipe unchanged.
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle (linear warm-up, then cosine to zero)
    label_smoothing: float = 0.0  # phase 2 cross-entropy
    ae_images: str = "train"  # phase 1 images: train | train+val (val images without labels)
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
                   "ae_images": ("train", "train+val")}
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
    # Issue 6: augmentation, AdamW with one-cycle, label smoothing, autoencoder pre-training on
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


WARMUP_FRACTION = 0.1  # onecycle: share of a phase's steps spent warming up from lr / 25


def learning_rate(config: TrainConfig, progress: float) -> float:
    """Learning rate at `progress` (0..1) through a phase: a pure function, so resumes agree."""
    if config.schedule == "constant":
        return config.lr
    if progress < WARMUP_FRACTION:
        return config.lr * (0.04 + 0.96 * progress / WARMUP_FRACTION)
    rest = (progress - WARMUP_FRACTION) / (1 - WARMUP_FRACTION)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FlowaeError("--device cuda: torch sees no CUDA device here; use cpu or auto")
    return torch.device(name)


class _Reconstruct(nn.Module):
    """Phase 1 graph: encoder + decoder (the classifier takes no part)."""

    def __init__(self, model: FlowAE):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))  # (B, 3, H, W)


class _Refit(_Reconstruct):
    """Phase 3 graph: the frozen encoder (eval mode, no gradient) feeds the decoder."""

    def train(self, mode: bool = True) -> _Refit:
        super().train(mode)
        self.encoder.eval()  # keeps its batch-norm statistics, so classification is unchanged
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latent = self.encoder(images)
        return self.decoder(latent)


class _Classify(nn.Module):
    """Phase 2 graph: encoder + classifier (the decoder takes no part)."""

    def __init__(self, model: FlowAE):
        super().__init__()
        self.encoder, self.classifier = model.encoder, model.classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(images))  # (B, num_classes)


def _epoch_seed(seed: int, phase: str, epoch: int) -> int:
    # One seed per (phase, epoch): a resumed run draws exactly what a whole run draws.
    return (seed * 1_000_003 + PHASES.index(phase) * 10_007 + epoch * 101) % (2**63)


def float_inputs(split: TensorSplit, preprocess: Preprocess, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A whole split as model inputs, once: the same numbers `to_float` gives per batch."""
    images = to_float(split.images.to(device), preprocess)  # (N, 3, S, S) float32
    return images.contiguous(memory_format=memory_format)


@dataclass
class Batches:
    """Input pipeline of one run: in-memory splits plus the (optional) augmentation."""

    train: TensorSplit
    val: TensorSplit
    preprocess: Preprocess
    augment: bool
    # Without augmentation the train split is scaled once (and laid out as the model wants)
    # instead of every batch: a gather per step instead of four passes over the batch.
    memory_format: torch.memory_format = torch.contiguous_format
    # Phase 1's images when they are not the train split's (train+val, labels unused).
    ae_train: TensorSplit | None = None
    crop_scale_min: float = 0.25
    _inputs: dict = field(default_factory=dict, init=False, repr=False)

    def epoch(self, seed: int, batch_size: int, dist: DistInfo, device: torch.device,
              phase: str = "cls"):
        """Yield this process's (images, labels) batches for one epoch, shuffled by `seed`.

        `seed` is the same on every rank: all ranks draw one order and each takes its share of
        every global batch, so the shards of a step partition that batch.
        """
        split = self.split_for(phase)
        key = "ae" if split is self.ae_train else "train"
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed + dist.rank)  # augmentation, per rank
        cached = self._inputs.get(key)
        if not self.augment and (cached is None or cached.device != device):
            cached = self._inputs[key] = float_inputs(split, self.preprocess, device,
                                                      self.memory_format)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size][dist.rank :: dist.world_size]
            labels = split.labels[index].to(device)
            if not self.augment:
                yield cached[index.to(device)], labels
                continue
            images = augment_batch(split.images[index], self.preprocess.image_size_px,
                                   generator, self.crop_scale_min)
            yield to_float(images.to(device), self.preprocess), labels

    def split_for(self, phase: str) -> TensorSplit:
        """Phase 2 trains on the train split; phases 1 and 3 on `ae_train` when there is one."""
        return self.ae_train if phase != "cls" and self.ae_train is not None else self.train

    def steps_per_epoch(self, batch_size: int, phase: str) -> int:
        return max(1, math.ceil(len(self.split_for(phase)) / batch_size))


def augment_batch(images: torch.Tensor, size_px: int, generator: torch.Generator,
                  scale_min: float = 0.25) -> torch.Tensor:
    """Random resized crop (area scale_min-1, aspect 3/4-4/3), horizontal flip and colour
    jitter (brightness, contrast, saturation 0.7-1.3), drawn per image, applied to the whole
    batch at once: one bilinear `grid_sample` does every crop, resize and flip.

    uint8 (B, 3, S, S) -> uint8 (B, 3, size_px, size_px). Crops never leave the image.
    """
    n = len(images)
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64)
    area = scale_min + (1 - scale_min) * u[:, 0]  # fraction of the stored image
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # fraction of the side
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(u[:, 4] < 0.5, -width, width)  # negative: flipped
    theta[:, 0, 2] = (2 * u[:, 2] - 1) * (1 - width)  # crop centre, normalised coordinates
    theta[:, 1, 1] = height
    theta[:, 1, 2] = (2 * u[:, 3] - 1) * (1 - height)
    grid = F.affine_grid(theta.float(), [n, 3, size_px, size_px], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (B, 3, size, size), 0..255
    jitter = (0.7 + 0.6 * u[:, 5:]).float().view(n, 2, 1, 1, 1)
    brightness = (0.7 + 0.6 * torch.rand(n, generator=generator)).view(n, 1, 1, 1)
    out = out * brightness
    gray = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * jitter[:, 0] + mean  # contrast
    gray = (gray - mean) * jitter[:, 0] + mean
    out = (out - gray) * jitter[:, 1] + gray  # saturation
    return out.clamp(0, 255).round().to(torch.uint8)


def cutmix(images: torch.Tensor, labels: torch.Tensor, probability: float,
           generator: torch.Generator) -> tuple[torch.Tensor, tuple | None]:
    """With `probability`, paste one random box (area share ~ Beta(1, 1)) of a shuffled copy of
    the batch into every image; return the images and (labels of the pasted images, pasted
    area share), or None when this batch is left alone."""
    draws = torch.rand(4, generator=generator).tolist()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    if draws[0] >= probability:
        return images, None
    height, width = images.shape[-2:]
    cut = math.sqrt(draws[1])  # side fraction: area share uniform in [0, 1]
    box_h, box_w = round(height * cut), round(width * cut)
    top = int(draws[2] * (height - box_h + 1))
    left = int(draws[3] * (width - box_w + 1))
    mixed = images.clone()
    mixed[..., top : top + box_h, left : left + box_w] = \
        images[order][..., top : top + box_h, left : left + box_w]
    return mixed, (labels[order], box_h * box_w / (height * width))


@torch.no_grad()
def evaluate(
    model: FlowAE, split: TensorSplit, preprocess: Preprocess, batch_size: int,
    device: torch.device, dist: DistInfo, channels_last: bool = False,
    inputs: torch.Tensor | None = None,
) -> dict:
    """Reconstruction MSE, cross-entropy, top-1 and top-5 accuracy (%) over a whole split.

    `inputs`, when given, is `float_inputs(split, ...)` computed once by the caller.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # mse_sum, ce_sum, top1, top5, count
    for start in range(dist.rank * batch_size, len(split), batch_size * dist.world_size):
        if inputs is not None:
            images = inputs[start : start + batch_size]
        else:
            images = to_float(split.images[start : start + batch_size].to(device), preprocess)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = split.labels[start : start + batch_size].to(device)
        logits, latent = model(images)
        reconstruction = model.decoder(latent)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.tensor([
            F.mse_loss(reconstruction, images, reduction="none").mean(dim=(1, 2, 3)).sum().item(),
            F.cross_entropy(logits, labels, reduction="sum").item(),
            (top5[:, 0] == labels).sum().item(),
            (top5 == labels[:, None]).any(dim=1).sum().item(),
            len(labels),
        ], dtype=torch.float64)
    totals = dist.all_reduce_sum(totals)
    model.train(was_training)
    count = max(totals[4].item(), 1.0)
    return {
        "recon_mse": totals[0].item() / count,
        "loss": totals[1].item() / count,
        "top1": 100.0 * totals[2].item() / count,
        "top5": 100.0 * totals[3].item() / count,
    }


def _train_epoch(step_model, optimizer, batches: Batches, phase: str, config: TrainConfig,
                 seed: int, dist: DistInfo, device: torch.device, bar,
                 epoch: int = 1, total_epochs: int = 1) -> dict:
    """One pass over the phase's images; returns mean loss (and accuracy in phase 2)."""
    torch.manual_seed(seed + dist.rank)  # dropout draws, one stream per rank
    step_model.train()
    loss_sum, correct, count = 0.0, 0, 0
    steps = batches.steps_per_epoch(config.batch_size, phase)
    mixing = torch.Generator().manual_seed(seed + 7919 + dist.rank)  # CutMix draws, per rank
    for step, (images, labels) in enumerate(batches.epoch(seed, config.batch_size, dist, device,
                                                          phase)):
        lr = learning_rate(config, ((epoch - 1) * steps + step) / (total_epochs * steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        mixed = None
        if phase == "cls" and config.cutmix > 0:
            images, mixed = cutmix(images, labels, config.cutmix, mixing)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            output = step_model(images)
        output = output.float()  # losses in float32
        if phase == "cls":
            loss = F.cross_entropy(output, labels, label_smoothing=config.label_smoothing)
            if mixed is not None:
                other, share = mixed
                loss = (1 - share) * loss + share * F.cross_entropy(
                    output, other, label_smoothing=config.label_smoothing)
            correct += (output.argmax(dim=1) == labels).sum().item()
        else:
            loss = F.mse_loss(output, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        count += len(labels)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    totals = dist.all_reduce_sum(torch.tensor([loss_sum, correct, count], dtype=torch.float64))
    result = {"train_loss": totals[0].item() / max(totals[2].item(), 1)}
    if phase == "cls":
        result["train_top1"] = 100.0 * totals[1].item() / max(totals[2].item(), 1)
    return result


def _phase_modules(model: FlowAE, phase: str) -> list[nn.Module]:
    # Phase 2 optimises encoder, decoder and classifier together, as the seed did; the decoder
    # gets no gradient from the cross-entropy, so Adam leaves it unchanged.
    return {"ae": [model.encoder, model.decoder], "cls": [model], "dec": [model.decoder]}[phase]


def _make_optimizer(model: FlowAE, phase: str, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for module in _phase_modules(model, phase) for p in module.parameters()]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    # AdamW decays weights only: not biases or batch-norm scales (1-D tensors).
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _wrap(model: FlowAE, phase: str, dist: DistInfo, device: torch.device) -> nn.Module:
    step_model = {"ae": _Reconstruct, "cls": _Classify, "dec": _Refit}[phase](model)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=ids)
    return step_model


def _load_resume(run_dir: Path, model_config: ModelConfig, config: TrainConfig) -> dict | None:
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    payload = load_checkpoint(path)
    if payload["model_config"] != model_config.to_dict():
        raise CheckpointError(
            f"{path}: --resume with another model ({payload['model_config']['name']!r}, "
            f"asked for {model_config.name!r}); use a new --out"
        )
    saved = TrainConfig.from_dict(payload["train_config"])
    # Only the device may change on resume; anything else would make a different run.
    if replace(saved, device=config.device) != config:
        raise CheckpointError(f"{path}: --resume with other training options than the run had")
    return payload


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    data_root: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    dist: DistInfo | None = None,
) -> dict:
    """Run (or continue) both phases; return the metrics also written to metrics.json.

    `stop_after_epochs` ends this call after that many epochs (counting both phases) with a
    checkpoint in place, so that `resume=True` can continue it later.
    """
    from tqdm import tqdm

    config.validate()
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    device = dist.device(resolve_device(config.device))
    if (run_dir / CHECKPOINT_NAME).exists() and not resume:
        raise FlowaeError(f"{run_dir} already holds a run; pass --resume or choose another --out")
    state = _load_resume(run_dir, model_config, config) if resume else None

    preprocess = Preprocess(image_size_px=model_config.image_size_px,
                            resize_px=model_config.image_size_px)
    started = time.perf_counter()
    store_px = round(model_config.image_size_px * 1.15) if config.augment else None
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    train_split = load_split(data_root, "train", preprocess, store_px=store_px)
    val_split = load_split(data_root, "val", preprocess)
    ae_split = None
    if config.ae_images == "train+val" and (config.ae_epochs or config.dec_epochs):
        # Val images join phases 1 and 3 without their labels; they still choose nothing there.
        val_store = load_split(data_root, "val", preprocess, store_px) if store_px else val_split
        ae_split = TensorSplit(torch.cat([train_split.images, val_store.images]),
                               torch.cat([train_split.labels, val_store.labels]))
    batches = Batches(train_split, val_split, preprocess, config.augment, memory_format=layout,
                      ae_train=ae_split, crop_scale_min=config.crop_scale_min)
    load_s = time.perf_counter() - started

    torch.manual_seed(config.seed)
    model = build_model(model_config)
    history = {phase: [] for phase in PHASES}
    done = dict.fromkeys(PHASES, 0)
    elapsed_before = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        history.update(state["history"])
        done.update(state["progress"])
        elapsed_before = state.get("train_seconds", 0.0)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    val_inputs = float_inputs(batches.val, preprocess, device, layout)  # scaled once, not per epoch
    epochs_run = 0
    phase_start = time.perf_counter()
    totals = (config.ae_epochs, config.cls_epochs, config.dec_epochs)
    for phase, total in zip(PHASES, totals, strict=True):
        if done[phase] >= total:
            continue
        optimizer = _make_optimizer(model, phase, config)
        if state is not None and state["phase"] == phase:
            optimizer.load_state_dict(state["optimizer"])
        step_model = _wrap(model, phase, dist, device)
        bar = tqdm(range(done[phase] + 1, total + 1), desc=f"{model_config.name} {phase}",
                   unit="epoch", disable=not (progress and dist.is_main), dynamic_ncols=True)
        for epoch in bar:
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                bar.close()
                return {"stopped": True, "history": history, "progress": done}
            seed = _epoch_seed(config.seed, phase, epoch)  # the same on every rank
            tick = time.perf_counter()
            row = {"epoch": epoch}
            row.update(_train_epoch(step_model, optimizer, batches, phase, config, seed, dist,
                                    device, bar, epoch, total))
            val = evaluate(model, batches.val, preprocess, config.eval_batch_size, device, dist,
                           config.channels_last, inputs=val_inputs)
            row.update({f"val_{k}": v for k, v in val.items()})
            row["seconds"] = time.perf_counter() - tick
            history[phase].append(row)
            done[phase] = epoch
            epochs_run += 1
            bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                            val=f"{val['top1'] if phase == 'cls' else val['recon_mse']:.3g}")
            if dist.is_main:
                save_checkpoint(run_dir / CHECKPOINT_NAME, {
                    "model_config": model_config.to_dict(), "train_config": config.to_dict(),
                    "phase": phase, "progress": dict(done), "history": history,
                    "model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "train_seconds": elapsed_before + time.perf_counter() - phase_start,
                    "flowae_version": __version__,
                })
            dist.barrier()
    train_seconds = elapsed_before + time.perf_counter() - phase_start

    test = load_split(data_root, "test", preprocess)
    test_metrics = evaluate(model, test, preprocess, config.eval_batch_size, device, dist,
                            config.channels_last)
    metrics = {
        "variant": model_config.name, "model_config": model_config.to_dict(),
        "train_config": config.to_dict(), "parameters": count_parameters(model),
        "world_size": dist.world_size, "device": str(device), "torch": torch.__version__,
        "flowae": __version__, "data_load_seconds": load_s, "train_seconds": train_seconds,
        "history": history, "test": test_metrics,
    }
    if dist.is_main:
        payload = load_checkpoint(run_dir / CHECKPOINT_NAME)
        payload.update({"test": test_metrics, "train_seconds": train_seconds})
        save_checkpoint(run_dir / CHECKPOINT_NAME, payload)
        text = json.dumps(metrics, indent=2).encode()
        _atomic_write(run_dir / METRICS_NAME, lambda handle: handle.write(text))
        from flowae.plots import save_plots

        save_plots(run_dir, history, model, test, preprocess, device)
    dist.barrier()
    return metrics
