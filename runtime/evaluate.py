"""Accuracy of the deployed model, measured through the runtime alone (no torch, no scipy).

`evaluate` runs a Predictor over a labelled dataset's test split (top-1/top-5): Flowers102's
official one, or a class-folder dataset's test/ (val/ when it has none), read by
runtime.datasets; and, optionally, over a folder of full-size photos listed in labels.csv.
Each set is run twice, with full JPEG decoding (bit-exact with training's eval transform) and
with reduced-size decoding (Pillow's draft), and the report states the top-1 difference, the
share of images whose top-1 changed and how many images the draft actually reduced: the figure
that decides whether reduced decoding may be the default. Imports numpy, Pillow and the
runtime only; the CLI (runtime.cli --evaluate) prints what this returns.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flowae.runtime.contract import EXTRA_TEST_TOP1, EXTRA_TEST_TOP5
from flowae.runtime.datasets import fullres_files, open_dataset
from flowae.runtime.errors import DataError
from flowae.runtime.images import draft_scale
from flowae.runtime.predictor import Predictor, ProgressFn


@dataclass(frozen=True)
class Accuracy:
    """Top-1/top-5 (percent of the images that could be read) of one pass over a set."""

    images: int
    failed: int  # images that could not be read; they count as neither right nor wrong
    top1: float
    top5: float


def score(predictor: Predictor, paths: list[Path], labels: np.ndarray,
          progress: ProgressFn | None = None) -> tuple[Accuracy, np.ndarray]:
    """Accuracy over `paths`, and the top-1 label per image (-1 where it failed)."""
    labels = np.asarray(labels, dtype=np.int64)
    top1_labels = np.full(len(paths), -1, dtype=np.int64)
    hits5 = 0
    for i, result in enumerate(predictor.run(paths, top_k=5, progress=progress)):
        if result.ok:
            top1_labels[i] = result.top_k[0].label
            hits5 += int(labels[i]) in {p.label for p in result.top_k}
    read = int((top1_labels >= 0).sum())
    top1 = 100.0 * int((top1_labels == labels).sum()) / max(read, 1)
    return Accuracy(len(paths), len(paths) - read, top1, 100.0 * hits5 / max(read, 1)), top1_labels


def reduced_by_draft(paths: list[Path], draft_px: int) -> int:
    """How many of `paths` are JPEGs large enough for the draft decode to shrink."""
    count = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                count += image.format == "JPEG" and draft_scale(image.size, draft_px) > 1
        except (OSError, ValueError):
            continue
    return count


def compare_decodes(full: Predictor, draft: Predictor, paths: list[Path], labels: np.ndarray,
                    progress: ProgressFn | None = None) -> dict:
    """Accuracy with full and with reduced-size JPEG decoding, and how far they differ."""
    full_acc, full_top1 = score(full, paths, labels, progress)
    draft_acc, draft_top1 = score(draft, paths, labels, progress)
    both = (full_top1 >= 0) & (draft_top1 >= 0)
    return {
        "full_decode": asdict(full_acc),
        "draft_decode": asdict(draft_acc),
        "draft_top1_drop": full_acc.top1 - draft_acc.top1,  # points; > 0: the draft is worse
        "draft_top1_changed_pct": 100.0 * float((full_top1 != draft_top1)[both].mean())
        if both.any() else 0.0,
        "draft_reduced_images": reduced_by_draft(paths, full.preprocess.resize_px),
    }


# Keys under which flowae-export copies the training run's own test figures (metadata extra).
PYTORCH_TEST_KEYS = {"top1": EXTRA_TEST_TOP1, "top5": EXTRA_TEST_TOP5}


def _pytorch_test_accuracy(extra: dict) -> dict | None:
    """The training run's test top-1/top-5 (percent) as the model's metadata carries them."""
    found = {name: extra.get(key) for name, key in PYTORCH_TEST_KEYS.items()}
    if not isinstance(found["top1"], int | float):
        return None
    return {name: float(value) for name, value in found.items() if isinstance(value, int | float)}


def _check_class_names(data_names: tuple[str, ...], model_names: tuple[str, ...],
                       root: Path) -> None:
    """Labels are indices: they mean the same only when both sides list the same classes."""
    if tuple(data_names) != tuple(model_names):
        raise DataError(f"{root}: the dataset's {len(data_names)} classes are not the model's "
                        f"{len(model_names)} classes (or not in the same order)")


def evaluate(
    model: str | os.PathLike | None,
    data_root: Path,
    fullres_root: Path | None = None,
    *,
    provider: str = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    progress: ProgressFn | None = None,
) -> dict:
    """Test-split (and full-size photo) accuracy of a model, full vs reduced JPEG decoding."""
    options = {"provider": provider, "threads": threads, "batch_size": batch_size,
               "precision": precision}
    full = Predictor(model, jpeg_draft=False, **options)
    draft = Predictor(model, jpeg_draft=True, **options)
    report = {
        "model": str(full.files.encoder_classifier),
        "precision": full.files.precision,
        "provider": full.provider,
        "variant": full.metadata.variant,
    }
    dataset = open_dataset(Path(data_root))
    _check_class_names(dataset.class_names, full.class_names, dataset.root)
    split = "test" if "test" in dataset.splits else "val"
    report["split"] = split
    paths, labels = dataset.split(split)
    report["test"] = compare_decodes(full, draft, paths, labels, progress)
    pytorch = _pytorch_test_accuracy(full.metadata.extra)
    if pytorch is not None:
        report["pytorch_test"] = pytorch
        report["runtime_minus_pytorch_top1"] = report["test"]["full_decode"]["top1"] - pytorch[
            "top1"]
    if fullres_root is not None:
        paths, labels = fullres_files(Path(fullres_root), len(full.class_names))
        report["fullres"] = compare_decodes(full, draft, paths, labels, progress)
    return report
