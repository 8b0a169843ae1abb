"""The training loop: autoencoder, classifier and decoder-refit phases over in-memory data.

Three phases, each optional by its epoch count: 1 the autoencoder (MSE on the reconstruction),
2 the classifier with the encoder fine-tuned (cross-entropy), 3 the decoder refit to the final
encoder (MSE, encoder frozen; 0 epochs in the seed recipe). `train()` is the one entry point:
it reads the data (Flowers102 or class folders), runs the phases with a checkpoint after every
epoch, resumes from one, evaluates val each epoch and test at the end, and writes metrics.json
and the plots into the run directory; it returns a `TrainResult`. `evaluate_model` scores any
model on a split. Runs unchanged under torchrun (DistributedDataParallel: gloo on CPU, nccl on
CUDA, BatchNorm statistics over the global batch). Imports torch, flowae and the runtime; never
prints (progress bars go to stderr through tqdm).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowae import __version__
from flowae.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_class_names,
    checkpoint_payload,
    load_checkpoint,
    save_checkpoint,
)
from flowae.config import TrainConfig
from flowae.data import (
    Dataset,
    TensorSplit,
    load_split,
    open_training_data,
    preprocess_for,
    to_float,
)
from flowae.distributed import DistInfo, sync_batchnorm
from flowae.models import FlowAE, ModelConfig, build_model, count_parameters
from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import CheckpointError, DataError, FlowaeError
from flowae.runtime.files import remove_stale_temps, write_text_atomic

log = logging.getLogger(__name__)

PHASES = ("ae", "cls", "dec")  # autoencoder, classifier, decoder refit (0 epochs in the seed)
METRICS_NAME = "metrics.json"


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
def evaluate_model(
    model: FlowAE, split: TensorSplit, preprocess: Preprocess, batch_size: int = 128,
    device: torch.device | None = None, dist: DistInfo | None = None, *,
    channels_last: bool = False, inputs: torch.Tensor | None = None,
) -> dict:
    """Reconstruction MSE, cross-entropy, top-1 and top-5 accuracy (%) over a whole split.

    `device` defaults to the model's; `dist` (a run under torchrun) splits the batches across
    processes and sums their results; `inputs`, when given, is `float_inputs(split, ...)`
    computed once by the caller. The model is left in the mode it came in.
    """
    device = device or next(model.parameters()).device
    dist = dist or DistInfo()
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


# --- one phase ------------------------------------------------------------------------------

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


@dataclass
class PhaseRun:
    """One phase's training state: the graph it steps, its optimizer and where its data comes
    from. `train_epoch` is one pass over the phase's images."""

    phase: str  # one of PHASES
    total_epochs: int
    step_model: nn.Module  # _Reconstruct, _Classify or _Refit, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    batches: Batches
    config: TrainConfig
    dist: DistInfo
    device: torch.device

    def _loss(self, images: torch.Tensor, labels: torch.Tensor,
              mixing: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, output) of one batch; CutMix (phase 2 only) mixes images and labels."""
        mixed = None
        if self.phase == "cls" and self.config.cutmix > 0:
            images, mixed = cutmix(images, labels, self.config.cutmix, mixing)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            output = self.step_model(images)
        output = output.float()  # losses in float32
        if self.phase != "cls":
            return F.mse_loss(output, images), output
        smoothing = self.config.label_smoothing
        loss = F.cross_entropy(output, labels, label_smoothing=smoothing)
        if mixed is not None:
            other, share = mixed
            loss = (1 - share) * loss + share * F.cross_entropy(output, other,
                                                                label_smoothing=smoothing)
        return loss, output

    def train_epoch(self, epoch: int, bar=None) -> dict:
        """Mean train loss (and, in phase 2, top-1 %) of epoch `epoch` (1-based)."""
        seed = _epoch_seed(self.config.seed, self.phase, epoch)  # the same on every rank
        rank = self.dist.rank
        torch.manual_seed(seed + rank)  # dropout draws, one stream per rank
        mixing = torch.Generator().manual_seed(seed + 7919 + rank)  # CutMix draws, per rank
        self.step_model.train()
        batch_size = self.config.batch_size
        steps = self.batches.steps_per_epoch(batch_size, self.phase)
        loss_sum, correct, count = 0.0, 0, 0
        batches = self.batches.epoch(seed, batch_size, self.dist, self.device, self.phase)
        for step, (images, labels) in enumerate(batches):
            lr = learning_rate(self.config, ((epoch - 1) * steps + step)
                               / (self.total_epochs * steps))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, output = self._loss(images, labels, mixing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.item() * len(labels)
            count += len(labels)
            if self.phase == "cls":
                correct += (output.argmax(dim=1) == labels).sum().item()
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        totals = self.dist.all_reduce_sum(torch.tensor([loss_sum, correct, count],
                                                       dtype=torch.float64))
        row = {"train_loss": totals[0].item() / max(totals[2].item(), 1)}
        if self.phase == "cls":
            row["train_top1"] = 100.0 * totals[1].item() / max(totals[2].item(), 1)
        return row


# --- a whole run ----------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What `train` returns. `stopped`: `stop_after_epochs` ended the call before the last
    epoch (resume continues it); then `metrics` is empty. Otherwise `metrics` is what
    metrics.json holds."""

    stopped: bool
    progress: dict[str, int]  # epochs done per phase
    history: dict[str, list[dict]]  # per phase, one row per epoch
    metrics: dict = field(default_factory=dict)

    @property
    def test(self) -> dict | None:
        """Final test figures (val's when the data has no test split), None when stopped."""
        return self.metrics.get("test")


@dataclass
class _Record:
    """Progress a checkpoint carries from one call of `train` to the next."""

    history: dict[str, list[dict]]
    done: dict[str, int]
    seconds_before: float  # training time of earlier calls (resume)


def _check_dataset(model_config: ModelConfig, config: TrainConfig, dataset: Dataset) -> None:
    if model_config.num_classes != len(dataset.class_names):
        raise DataError(f"model {model_config.name!r} has {model_config.num_classes} outputs "
                          f"but {dataset.root} has {len(dataset.class_names)} classes; build "
                          f"the model with num_classes={len(dataset.class_names)}")
    if config.cls_images == "train+val" and "test" not in dataset.splits:
        raise DataError(f"{dataset.root} has no test split: with cls_images=train+val no "
                        f"held-out image would be left to score the model")


def _same_data(saved: dict, dataset: Dataset) -> bool:
    """Whether a checkpoint's recorded data is `dataset` (the folder may have moved)."""
    now = dataset.describe()
    return all(saved.get(key) == now[key] for key in now if key != "root")


def _load_resume(run_dir: Path, model_config: ModelConfig, config: TrainConfig,
                 dataset: Dataset) -> dict:
    path = run_dir / CHECKPOINT_NAME
    payload = load_checkpoint(path)
    if ModelConfig.from_dict(payload["model_config"]) != model_config:
        raise CheckpointError(
            f"{path}: --resume with another model ({payload['model_config']['name']!r}, "
            f"asked for {model_config.name!r}); use a new --out"
        )
    saved = TrainConfig.from_dict(payload["train_config"])
    # Only the device may change on resume; anything else would make a different run.
    if replace(saved, device=config.device) != config:
        raise CheckpointError(f"{path}: --resume with other training options than the run had")
    if tuple(checkpoint_class_names(payload)) != dataset.class_names or (
            "dataset" in payload and not _same_data(payload["dataset"], dataset)):
        raise CheckpointError(f"{path}: --resume with other data than the run had "
                              f"({dataset.root}: other classes, split or image count)")
    return payload


def _check_every_rank_sees_the_same(dist: DistInfo, has_run: bool, dataset: Dataset) -> None:
    """Under torchrun on several nodes, each reads its own disk: the data and the run folder
    must be the same everywhere (a shared filesystem for --out), or ranks would train apart."""
    if dist.world_size == 1:
        return
    described = {k: v for k, v in dataset.describe().items() if k != "root"}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).digest()
    mine = torch.tensor([float(has_run), float(int.from_bytes(digest[:4], "big"))],
                        dtype=torch.float64)
    total = dist.all_reduce_sum(mine.clone())
    if total[0].item() not in (0, dist.world_size):
        raise FlowaeError("some processes see a checkpoint in --out and others do not; put "
                          "--out on a filesystem every node shares")
    if total[1].item() != dist.world_size * mine[1].item():
        raise DataError(f"{dataset.root}: the processes read different data (classes or "
                        f"image counts differ between nodes)")


def load_batches(dataset: Dataset, model_config: ModelConfig, config: TrainConfig, *,
                 strict: bool = False) -> Batches:
    """Decode the train and val splits once, at the sizes the recipe needs."""
    preprocess = preprocess_for(model_config)
    store_px = round(model_config.image_size_px * 1.15) if config.augment else None
    train_split = load_split(dataset, "train", preprocess, store_px=store_px, strict=strict)
    val_split = load_split(dataset, "val", preprocess, strict=strict)
    val_store = (load_split(dataset, "val", preprocess, store_px, strict=strict)
                 if store_px else val_split)
    train_and_val = TensorSplit(torch.cat([train_split.images, val_store.images]),
                                torch.cat([train_split.labels, val_store.labels]))
    ae_split = None
    if config.cls_images == "train+val":  # every phase trains on both
        train_split = train_and_val
    elif config.ae_images == "train+val" and (config.ae_epochs or config.dec_epochs):
        # Val images join phases 1 and 3 without their labels; they still choose nothing there.
        ae_split = train_and_val
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    return Batches(train_split, val_split, preprocess, config.augment, memory_format=layout,
                   ae_train=ae_split, crop_scale_min=config.crop_scale_min)


@dataclass
class _Run:
    """What every step of one `train` call reads: configs, data, where it runs and writes."""

    model_config: ModelConfig
    config: TrainConfig
    dataset: Dataset
    batches: Batches
    run_dir: Path
    dist: DistInfo
    device: torch.device
    strict: bool  # refuse unreadable class-folder images instead of skipping them


def _build(run: _Run, state: dict | None) -> tuple[FlowAE, _Record]:
    """The model (fresh and seeded, or the checkpoint's) on its device, and its progress."""
    torch.manual_seed(run.config.seed)
    model = build_model(run.model_config)
    record = _Record({phase: [] for phase in PHASES}, dict.fromkeys(PHASES, 0), 0.0)
    if state is not None:
        model.load_state_dict(state["model"])
        record.history.update(state["history"])
        record.done.update(state["progress"])
        record.seconds_before = state.get("train_seconds", 0.0)
    if run.dist.world_size > 1:
        model = sync_batchnorm(model)  # batch statistics of the global batch, not the shard
    model.to(run.device)
    if run.config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, record


def _save(run: _Run, model: FlowAE, record: _Record, phase: str,
          optimizer: torch.optim.Optimizer, train_seconds: float) -> None:
    if run.dist.is_main:
        save_checkpoint(run.run_dir / CHECKPOINT_NAME, checkpoint_payload(
            run.model_config, run.config, model, dataset=run.dataset.describe(), phase=phase,
            progress=record.done, history=record.history, optimizer=optimizer,
            train_seconds=train_seconds))
    run.dist.barrier()


def _run_phases(run: _Run, model: FlowAE, record: _Record, state: dict | None,
                stop_after_epochs: int | None, progress: bool) -> bool:
    """Train the epochs still to do, checkpointing after each; True if stopped early."""
    from tqdm import tqdm

    config, batches = run.config, run.batches
    val_inputs = float_inputs(batches.val, batches.preprocess, run.device, batches.memory_format)
    scores_val = config.cls_images == "train"  # val top-1 means nothing once trained on
    epochs_run = 0
    started = time.perf_counter()
    totals = (config.ae_epochs, config.cls_epochs, config.dec_epochs)
    for phase, total in zip(PHASES, totals, strict=True):
        if record.done[phase] >= total:
            continue
        phase_run = PhaseRun(phase, total, _wrap(model, phase, run.dist, run.device),
                             _make_optimizer(model, phase, config), batches, config, run.dist,
                             run.device)
        if state is not None and state["phase"] == phase:
            phase_run.optimizer.load_state_dict(state["optimizer"])
        bar = tqdm(range(record.done[phase] + 1, total + 1),
                   desc=f"{run.model_config.name} {phase}", unit="epoch",
                   disable=not (progress and run.dist.is_main), dynamic_ncols=True)
        for epoch in bar:
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                bar.close()
                return True
            tick = time.perf_counter()
            row = {"epoch": epoch, **phase_run.train_epoch(epoch, bar)}
            if scores_val or phase != "cls":  # a reconstruction MSE is still worth watching
                val = evaluate_model(model, batches.val, batches.preprocess,
                                     config.eval_batch_size, run.device, run.dist,
                                     channels_last=config.channels_last, inputs=val_inputs)
                row.update({f"val_{k}": v for k, v in val.items()})
            row["seconds"] = time.perf_counter() - tick
            record.history[phase].append(row)
            record.done[phase] = epoch
            epochs_run += 1
            shown = row.get("val_top1" if phase == "cls" else "val_recon_mse")
            bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                            **({} if shown is None else {"val": f"{shown:.3g}"}))
            _save(run, model, record, phase, phase_run.optimizer,
                  record.seconds_before + time.perf_counter() - started)
    record.seconds_before += time.perf_counter() - started
    return False


def _finish(run: _Run, model: FlowAE, record: _Record, load_s: float) -> dict:
    """Test figures (val's when the data has no test split), then metrics.json, plots and the
    final checkpoint; returns the metrics."""
    config, preprocess = run.config, run.batches.preprocess
    final_split = "test" if "test" in run.dataset.splits else "val"
    final = (load_split(run.dataset, "test", preprocess, strict=run.strict)
             if final_split == "test" else run.batches.val)
    test = evaluate_model(model, final, preprocess, config.eval_batch_size, run.device,
                          run.dist, channels_last=config.channels_last)
    metrics = {
        "variant": run.model_config.name, "model_config": run.model_config.to_dict(),
        "train_config": config.to_dict(), "parameters": count_parameters(model),
        "world_size": run.dist.world_size, "device": str(run.device),
        "torch": torch.__version__, "flowae": __version__,
        "class_names": list(run.dataset.class_names), "dataset": run.dataset.describe(),
        "data_load_seconds": load_s, "train_seconds": record.seconds_before,
        "history": record.history, "test_split": final_split, "test": test,
    }
    if run.dist.is_main:
        payload = load_checkpoint(run.run_dir / CHECKPOINT_NAME)
        payload.update({"test": test, "train_seconds": record.seconds_before})
        save_checkpoint(run.run_dir / CHECKPOINT_NAME, payload)
        write_text_atomic(run.run_dir / METRICS_NAME, json.dumps(metrics, indent=2))
        from flowae.plots import save_plots

        save_plots(run.run_dir, record.history, model, final, preprocess, run.device)
    run.dist.barrier()
    return metrics


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    data: Path | Dataset,
    run_dir: Path,
    *,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    dist: DistInfo | None = None,
    strict: bool = False,
) -> TrainResult:
    """Run (or continue) the three phases; write checkpoint, metrics.json and plots.

    `data` is a Dataset (runtime.datasets) or a folder holding Flowers102. `strict` refuses
    unreadable images in class-folder data instead of skipping them. `stop_after_epochs` ends
    this call after that many epochs (all phases counted) with a checkpoint in place, so that
    `resume=True` can continue it later.
    """
    config.validate()
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    device = dist.device(resolve_device(config.device))
    dataset = data if isinstance(data, Dataset) else open_training_data(Path(data))
    _check_dataset(model_config, config, dataset)
    has_run = (run_dir / CHECKPOINT_NAME).exists()
    _check_every_rank_sees_the_same(dist, has_run, dataset)
    if has_run and not resume:
        raise FlowaeError(f"{run_dir} already holds a run; pass --resume or choose another --out")
    state = _load_resume(run_dir, model_config, config, dataset) if resume and has_run else None
    if dist.is_main and run_dir.is_dir():
        for path in remove_stale_temps(run_dir):  # left by a run that was killed mid-write
            log.info("removed %s, left by an interrupted write", path)

    started = time.perf_counter()
    batches = load_batches(dataset, model_config, config, strict=strict)
    load_s = time.perf_counter() - started
    run = _Run(model_config, config, dataset, batches, run_dir, dist, device, strict)
    model, record = _build(run, state)
    if _run_phases(run, model, record, state, stop_after_epochs, progress):
        return TrainResult(True, dict(record.done), record.history)
    return TrainResult(False, dict(record.done), record.history,
                       _finish(run, model, record, load_s))
