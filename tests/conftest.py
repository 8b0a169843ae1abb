"""Shared fixtures: a generated fake Flowers102 folder, the real copy in ../shared, and a
tiny seeded training run (one epoch per phase on the fake data) to export and serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_ROOT = SHARED / "flowers102"
FULLRES_ROOT = SHARED / "flowers102-fullres"

FAKE_SPLIT_SIZES = {"trnid": 12, "valid": 8, "tstid": 10}


def write_fake_flowers102(root: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """Write a Flowers102-layout folder: random JPEGs of odd sizes plus the two .mat files."""
    from PIL import Image
    from scipy.io import savemat

    sizes = sizes or FAKE_SPLIT_SIZES
    rng = np.random.default_rng(seed)
    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    total = sum(sizes.values())
    labels = rng.integers(1, 103, size=total)  # 1-based, as in the real file
    for i in range(1, total + 1):
        h, w = int(rng.integers(100, 180)), int(rng.integers(100, 180))
        # A smooth colour field whose hue follows the label, plus noise: learnable, cheap.
        tint = np.array([labels[i - 1] * 2.5, 255 - labels[i - 1] * 2.5, (labels[i - 1] * 37) % 255])
        pixels = tint + rng.normal(0, 25, size=(h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            base / "jpg" / f"image_{i:05d}.jpg", quality=90)
    ids = rng.permutation(np.arange(1, total + 1))
    cut1, cut2 = sizes["trnid"], sizes["trnid"] + sizes["valid"]
    savemat(base / "setid.mat", {"trnid": ids[:cut1], "valid": ids[cut1:cut2], "tstid": ids[cut2:]})
    savemat(base / "imagelabels.mat", {"labels": labels})
    return root


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    return write_fake_flowers102(tmp_path_factory.mktemp("fake_flowers102"))


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not (REAL_ROOT / "flowers-102" / "setid.mat").exists():
        pytest.skip(f"real Flowers102 not found at {REAL_ROOT} (the tests that need it skip)")
    return REAL_ROOT


@pytest.fixture(scope="session")
def fullres_root() -> Path:
    if not (FULLRES_ROOT / "labels.csv").exists():
        pytest.skip(f"full-size photos not found at {FULLRES_ROOT}")
    return FULLRES_ROOT


def tiny_train(variant: str, data_root: Path, run_dir: Path, **overrides):
    """One epoch per phase on `data_root`, seeded: a small but real flowae run."""
    from flowae.models import get_variant
    from flowae.train import TrainConfig, train

    options = {"ae_epochs": 1, "cls_epochs": 1, "batch_size": 8, "seed": 0, "device": "cpu"}
    options.update(overrides)
    return train(get_variant(variant), TrainConfig(**options), data_root, run_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, fake_root) -> dict[str, Path]:
    """name -> run directory, trained lazily once per session and variant."""
    cache: dict[str, Path] = {}

    class Runs(dict):
        def __missing__(self, variant: str) -> Path:
            run_dir = tmp_path_factory.mktemp(f"run_{variant}")
            tiny_train(variant, fake_root, run_dir)
            cache[variant] = run_dir
            self[variant] = run_dir
            return run_dir

    return Runs()
