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
from dataclasses import asdict, dataclass, field, replace
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

PHASES = ("ae", "cls")
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
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
    _inputs: torch.Tensor | None = field(default=None, init=False, repr=False)

    def epoch(self, seed: int, batch_size: int, dist: DistInfo, device: torch.device):
        """Yield this process's (images, labels) batches for one epoch, shuffled by `seed`.

        `seed` is the same on every rank: all ranks draw one order and each takes its share of
        every global batch, so the shards of a step partition that batch.
        """
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed + dist.rank)  # augmentation, per rank
        if not self.augment and (self._inputs is None or self._inputs.device != device):
            self._inputs = float_inputs(self.train, self.preprocess, device, self.memory_format)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size][dist.rank :: dist.world_size]
            labels = self.train.labels[index].to(device)
            if not self.augment:
                yield self._inputs[index.to(device)], labels
                continue
            images = augment_batch(self.train.images[index], self.preprocess.image_size_px,
                                   generator)
            yield to_float(images.to(device), self.preprocess), labels


def augment_batch(images: torch.Tensor, size_px: int, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.25-1), horizontal flip and colour jitter, per image."""
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty(len(images), 3, size_px, size_px, dtype=torch.uint8)
    side = images.shape[-1]
    for i, image in enumerate(images):
        u = torch.rand(8, generator=generator).tolist()
        area = side * side * (0.25 + 0.75 * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        h = min(side, round(math.sqrt(area / ratio)))
        w = min(side, round(math.sqrt(area * ratio)))
        top, left = int(u[2] * (side - h + 1)), int(u[3] * (side - w + 1))
        crop = TF.resized_crop(image, top, left, h, w, [size_px, size_px], antialias=True)
        if u[4] < 0.5:
            crop = TF.horizontal_flip(crop)
        crop = TF.adjust_brightness(crop, 0.7 + 0.6 * u[5])
        crop = TF.adjust_contrast(crop, 0.7 + 0.6 * u[6])
        out[i] = TF.adjust_saturation(crop, 0.7 + 0.6 * u[7])
    return out


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
                 seed: int, dist: DistInfo, device: torch.device, bar) -> dict:
    """One pass over the train split; returns mean loss (and accuracy in phase 2)."""
    torch.manual_seed(seed + dist.rank)  # dropout draws, one stream per rank
    step_model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in batches.epoch(seed, config.batch_size, dist, device):
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = step_model(images)
        if phase == "ae":
            loss = F.mse_loss(output, images)
        else:
            loss = F.cross_entropy(output, labels)
            correct += (output.argmax(dim=1) == labels).sum().item()
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
    return [model.encoder, model.decoder] if phase == "ae" else [model]


def _make_optimizer(model: FlowAE, phase: str, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for module in _phase_modules(model, phase) for p in module.parameters()]
    return torch.optim.Adam(params, lr=config.lr)


def _wrap(model: FlowAE, phase: str, dist: DistInfo, device: torch.device) -> nn.Module:
    step_model = _Reconstruct(model) if phase == "ae" else _Classify(model)
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
    batches = Batches(load_split(data_root, "train", preprocess, store_px=store_px),
                      load_split(data_root, "val", preprocess), preprocess, config.augment,
                      memory_format=layout)
    load_s = time.perf_counter() - started

    torch.manual_seed(config.seed)
    model = build_model(model_config)
    history = {"ae": [], "cls": []}
    done = {"ae": 0, "cls": 0}
    elapsed_before = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        history = state["history"]
        done = dict(state["progress"])
        elapsed_before = state.get("train_seconds", 0.0)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    val_inputs = float_inputs(batches.val, preprocess, device, layout)  # scaled once, not per epoch
    epochs_run = 0
    phase_start = time.perf_counter()
    for phase, total in zip(PHASES, (config.ae_epochs, config.cls_epochs), strict=True):
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
                                    device, bar))
            val = evaluate(model, batches.val, preprocess, config.eval_batch_size, device, dist,
                           config.channels_last, inputs=val_inputs)
            row.update({f"val_{k}": v for k, v in val.items()})
            row["seconds"] = time.perf_counter() - tick
            history[phase].append(row)
            done[phase] = epoch
            epochs_run += 1
            bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                            val=f"{val['recon_mse'] if phase == 'ae' else val['top1']:.3g}")
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
