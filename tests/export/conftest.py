"""Exports shared by tests/export, each made once per session from the tiny seeded runs:
one fp32 export per variant, one `upsample` export with int8 (gate set to pass) and fp16, and
the PyTorch side of each run (model, real fake-data images, its outputs) to compare against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.data import load_split, preprocess_for, to_float
from flowae.export import ExportOptions, export_model
from flowae.export.parity import torch_reference
from flowae.models import FlowAE

QUICK = {"latency_rounds": 2}  # the default-precision timing is not under test here


@dataclass
class TorchSide:
    """A run's PyTorch model, the fake val split through the eval transform, its outputs."""

    model: FlowAE
    images: np.ndarray  # (N, 3, 100, 100) float32, scaled as the contract says
    labels: np.ndarray  # (N,)
    reference: dict  # output name -> float32 array


@pytest.fixture(scope="session")
def torch_side(tiny_runs, fake_root) -> dict[str, TorchSide]:
    """variant -> TorchSide, made lazily."""

    class Sides(dict):
        def __missing__(self, variant: str) -> TorchSide:
            model = model_from_checkpoint(load_checkpoint(tiny_runs[variant]))
            preprocess = preprocess_for(model.config)
            split = load_split(fake_root, "val", preprocess)
            images = to_float(split.images, preprocess)
            self[variant] = TorchSide(model, images.numpy(), split.labels.numpy(),
                                      torch_reference(model, images))
            return self[variant]

    return Sides()


@pytest.fixture(scope="session")
def exports(tiny_runs, fake_root, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """variant -> (model directory, manifest) of a default fp32 export, made lazily."""

    class Exports(dict):
        def __missing__(self, variant: str) -> tuple[Path, dict]:
            out_dir = tmp_path_factory.mktemp(f"export_{variant}") / "model"
            manifest = export_model(tiny_runs[variant], out_dir,
                                    ExportOptions(data_root=fake_root, **QUICK))
            self[variant] = (out_dir, manifest)
            return self[variant]

    return Exports()


@pytest.fixture(scope="session")
def full_export(tiny_runs, fake_root, tmp_path_factory) -> tuple[Path, dict]:
    """`upsample` in fp32, int8 and fp16; the int8 gate allows 100 points, so it passes."""
    out_dir = tmp_path_factory.mktemp("export_full") / "model"
    options = ExportOptions(data_root=fake_root, int8=True, fp16=True,
                            int8_max_drop_points=100.0, **QUICK)
    return out_dir, export_model(tiny_runs["upsample"], out_dir, options)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return np.random.default_rng(0)
