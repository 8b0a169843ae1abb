"""Checkpoints: weights, optimizer, progress and both configs in one file, written atomically.

A checkpoint rebuilds everything on its own (export and `--resume` need nothing else) and
loads with `torch.load(weights_only=True)`: it holds tensors, dicts, lists, strings and numbers
only. Imports torch, flowae.models and the runtime's errors.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from flowae.models import FlowAE, ModelConfig, build_model
from flowae.runtime.errors import CheckpointError

CHECKPOINT_FORMAT = "flowae-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # inside a run directory
_REQUIRED_KEYS = ("format", "version", "model_config", "train_config", "model", "progress")


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


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
    except (TypeError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint does not fit its model config: {reason}") from exc
    return model.eval()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
