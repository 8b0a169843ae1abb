"""The PyTorch side of each tiny seeded run (model, real fake-data images, its outputs), made
once per session, for tests/export to compare exports against. The exports themselves are
session fixtures of tests/conftest.py, shared with the runtime and benchmark tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.data import load_split, preprocess_for, to_float
from flowae.export.parity import torch_reference
from flowae.models import FlowAE


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


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return np.random.default_rng(0)
