"""Test-time resize chosen on val: `flowae-export --resize-px auto`.

A model trained on random resized crops sees flowers larger than a plain resize to its input
side shows them; resizing the shorter side a little larger before the centre crop can match
the two (the "FixRes" effect). The input size, and so the latency, stays the same. `sweep`
measures PyTorch's top-1/top-5 on the val split for each candidate size (the input side times
RESIZE_CANDIDATES_PCT) and `choose` takes the best top-1, ties to the smaller size. The test
split is never looked at. `data` is the folder holding Flowers102 or a class-folder Dataset
(the run's own split, flowae.data.reopen_dataset). Imports torch, flowae (data, models, train)
and the contract.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowae.data import Dataset, load_split, preprocess_for
from flowae.models import FlowAE
from flowae.runtime.contract import Preprocess

# Shorter side, % of the model's input side. The 128 % end of the first sweep won for res32,
# so the sweep goes on to 142 %.
RESIZE_CANDIDATES_PCT = (100, 107, 114, 121, 128, 135, 142)
SWEEP_SPLIT = "val"  # choose on val, never on test


def candidate_sizes(image_size_px: int, percents: tuple[int, ...] = RESIZE_CANDIDATES_PCT
                    ) -> tuple[int, ...]:
    """Distinct shorter-side sizes (px) to try, ascending, none below the input side."""
    return tuple(sorted({max(image_size_px, round(image_size_px * p / 100)) for p in percents}))


def evaluate_split(model: FlowAE, data: Path | Dataset, split: str, preprocess: Preprocess
                   ) -> dict:
    """PyTorch's top-1/top-5 (%) on a whole split with `preprocess`, and its image count."""
    from flowae.train import evaluate_model

    tensors = load_split(data, split, preprocess)
    result = evaluate_model(model, tensors, preprocess, device=torch.device("cpu"))
    return {"top1": result["top1"], "top5": result["top5"], "images": len(tensors)}


def sweep(model: FlowAE, data: Path | Dataset, sizes: tuple[int, ...]) -> list[dict]:
    """[{resize_px, top1, top5, images}] on the val split, one row per size."""
    return [{"resize_px": size,
             **evaluate_split(model, data, SWEEP_SPLIT, preprocess_for(model.config, size))}
            for size in sizes]


def choose(rows: list[dict]) -> dict:
    """The row of best top-1; among equals, the smallest resize (the least change)."""
    return max(rows, key=lambda row: (row["top1"], -row["resize_px"]))
