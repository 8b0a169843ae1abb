"""Fixtures of the training tests: generated class-folder datasets (both layouts) of synthetic,
learnable images in the sizes and modes a user's folder may hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CLASSES = ("daisy", "rose", "tulip")
# A colour per class: the network can tell them apart after a few epochs.
_TINTS = {"daisy": (235, 235, 80), "rose": (200, 30, 60), "tulip": (60, 90, 220),
          "violet": (140, 60, 200)}


def write_class_folders(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """root/<split>/<class>/ (or root/<class>/ for split "") holding counts[split][class]
    images: a class's colour with noise, odd sizes, JPEG and PNG, RGB, RGBA and grayscale."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for name, count in per_class.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
                pixels = np.array(_TINTS[name]) + rng.normal(0, 20, size=(h, w, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                if i % 5 == 3:  # a PNG with an opaque alpha channel
                    image.convert("RGBA").save(folder / f"{name}_{i:03d}.png")
                elif i % 7 == 6:  # a palette (P mode) image, upper-case suffix
                    image.convert("P").save(folder / f"{name}_{i:03d}.PNG")
                else:
                    image.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


class ClassFolders:
    """What the fixture hands a test: the default class names, `write` (any counts) and `make`
    (a fresh dataset of one layout in its own temp folder)."""

    classes = CLASSES
    write = staticmethod(write_class_folders)

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory

    def make(self, layout: str = "split", per_class: int = 8, classes=CLASSES,
             seed: int = 0) -> Path:
        """"split": train/ (per_class), val/ and test/ (a quarter, at least 2) per class;
        "single": per_class images in root/<class>/."""
        root = self._tmp.mktemp(f"folders_{layout}")
        share = max(2, per_class // 4)
        counts = ({"train": dict.fromkeys(classes, per_class), "val": dict.fromkeys(classes, share),
                   "test": dict.fromkeys(classes, share)}
                  if layout == "split" else {"": dict.fromkeys(classes, per_class)})
        return write_class_folders(root, counts, seed)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> ClassFolders:
    return ClassFolders(tmp_path_factory)
