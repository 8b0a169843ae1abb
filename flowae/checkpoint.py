"""Checkpoints: weights, optimizer, progress, both configs and the class names in one file.

A checkpoint rebuilds everything on its own (export and `--resume` need nothing else) and
loads with `torch.load(weights_only=True)`: it holds tensors, dicts, lists, strings and numbers
only. `checkpoint_payload` is the one place that lays a payload out (training and the
benchmarks' fresh-weight checkpoints both use it); `save_checkpoint` writes it atomically with
the runtime's helper. Class names live under CLASS_NAMES_KEY (label i is class_names[i]).
Imports torch, flowae.models and the runtime (contract, errors, files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowae import __version__
from flowae.models import FlowAE, ModelConfig, build_model
from flowae.runtime.contract import CLASS_NAMES
from flowae.runtime.errors import CheckpointError, FlowaeError
from flowae.runtime.files import write_atomic

CHECKPOINT_FORMAT = "flowae-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # inside a run directory
_REQUIRED_KEYS = ("format", "version", "model_config", "train_config", "model", "progress")


CLASS_NAMES_KEY = "class_names"  # list of str, one per classifier output


def checkpoint_payload(model_config: ModelConfig, train_config, model: torch.nn.Module, *,
                       class_names: tuple[str, ...] | None = None, dataset: dict | None = None,
                       phase: str = "cls", progress: dict | None = None,
                       history: dict | None = None,
                       optimizer: torch.optim.Optimizer | None = None,
                       train_seconds: float = 0.0, **extra) -> dict:
    """The dict a checkpoint file holds. `train_config` is a flowae.config.TrainConfig;
    class names come from `dataset` (runtime.datasets' Dataset.describe()) when given, else
    `class_names`, else the contract's Flowers102 names; `extra` adds keys (e.g. a note)."""
    if dataset is not None:
        class_names = tuple(dataset["class_names"])
    class_names = tuple(CLASS_NAMES if class_names is None else class_names)
    if len(class_names) != model_config.num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a model with "
                              f"{model_config.num_classes} outputs")
    payload = {
        "model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
        CLASS_NAMES_KEY: list(class_names), "phase": phase,
        "progress": dict(progress or {}), "history": history or {},
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train_seconds": train_seconds, "flowae_version": __version__, **extra,
    }
    if dataset is not None:
        payload["dataset"] = dataset
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    return payload


def checkpoint_class_names(payload: dict) -> tuple[str, ...]:
    """A loaded checkpoint's class names; a checkpoint from before they were stored is a
    Flowers102 run (102 outputs), whose names are the contract's."""
    names = payload.get(CLASS_NAMES_KEY)
    if names is None:
        num_classes = payload["model_config"].get("num_classes", len(CLASS_NAMES))
        if num_classes != len(CLASS_NAMES):
            raise CheckpointError(f"checkpoint has {num_classes} outputs and no class names")
        return CLASS_NAMES
    return tuple(str(name) for name in names)


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    write_atomic(path, lambda handle: torch.save(payload, handle))


def resolve_checkpoint(path: Path) -> Path:
    """Accept a run directory or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (give a run directory or a .pt file)")
    return path


def load_checkpoint(path: Path) -> dict:
    """Load and validate a flowae checkpoint (a run directory or a file)."""
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a flowae checkpoint ({reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a flowae checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')!r}, "
            f"this flowae reads {CHECKPOINT_VERSION}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def model_from_checkpoint(payload: dict) -> FlowAE:
    """Rebuild the model of a loaded checkpoint, weights included, in eval mode."""
    try:
        model = build_model(ModelConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["model"])
    except (TypeError, RuntimeError, FlowaeError) as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint does not fit its model config: {reason}") from exc
    return model.eval()


