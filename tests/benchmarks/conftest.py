"""Benchmark fixtures: the session's export of the tiny seeded `upsample` run (fp32, int8,
fp16; tests/conftest.py's `full_export`) and a small folder of camera-size JPEGs laid out like
../shared/flowers102-fullres."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def bench_model(full_export) -> Path:
    """The tiny `upsample` run exported by flowae.export, with int8 and fp16 copies."""
    return full_export[0]


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Four full-size-like JPEGs (both orientations) with labels.csv, as the fullres folder."""
    from PIL import Image

    from flowae.runtime.contract import CLASS_NAMES

    root = tmp_path_factory.mktemp("photos")
    (root / "jpg").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (width, height) in enumerate([(667, 500), (500, 667), (752, 500), (640, 480)]):
        name = f"photo_{i}.jpg"
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "jpg" / name, quality=90)
        rows.append({"file": name, "label": i, "class_name": CLASS_NAMES[i]})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "class_name"])
        writer.writeheader()
        writer.writerows(rows)
    return root
