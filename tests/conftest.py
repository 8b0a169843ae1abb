"""Shared fixtures: a generated fake Flowers102 folder, the real copy in ../shared, and a
tiny seeded training run (one epoch per phase on the fake data) to export and serve."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SHARED = REPO.parent / "shared"
REAL_ROOT = SHARED / "flowers102"
FULLRES_ROOT = SHARED / "flowers102-fullres"


def _import_installed_flowae() -> None:
    """Make `flowae` the installed package, not the tests/flowae/ folder.

    pytest's default (prepend) import mode puts tests/ on sys.path to import this file. The
    editable install's finder comes after the path finder, so a plain `import flowae` would then
    find tests/flowae/ as a namespace package (no __init__, no __version__) whenever the repo
    root is not on sys.path too (`.venv/bin/pytest`, unlike `python -m pytest`). Importing the
    package once with tests/ off sys.path pins the real one in sys.modules.
    """
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != TESTS]
    try:
        import flowae
    finally:
        sys.path[:] = saved
    if not hasattr(flowae, "__version__"):
        raise ImportError(f"flowae resolved to {list(flowae.__path__)}, not the installed package")


_import_installed_flowae()

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
        label = labels[i - 1]
        tint = np.array([label * 2.5, 255 - label * 2.5, (label * 37) % 255])
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
def make_fake_root(tmp_path_factory):
    """Factory for a fresh fake Flowers102 folder: other split sizes (keys as in setid.mat,
    e.g. {"trnid": 4, "valid": 2, "tstid": 2}) or a copy a test may damage. Tests take it as a
    fixture rather than importing this file: with another conftest.py loaded (tests/runtime/
    has one), `from conftest import ...` can resolve to that module instead of this one."""

    def make(sizes: dict | None = None, seed: int = 0) -> Path:
        return write_fake_flowers102(tmp_path_factory.mktemp("fake_flowers102"), seed, sizes)

    return make


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's torch work on one intra-op thread, then restore the setting.

    On a machine whose cores are shared (this project's has 2 for several people), two OpenMP
    threads spin-wait on each other and the tiny batches of the training tests run 5-20x
    slower than on one. Results do not depend on it: every comparison in those tests is
    between runs made under the same setting.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


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


# Exports of the tiny runs, each made once per session and shared by the export, runtime and
# benchmark tests. A test that changes a model directory works on a copy.
QUICK_EXPORT = {"latency_rounds": 2}  # the default-precision timing is not under test


@pytest.fixture(scope="session")
def exports(tiny_runs, fake_root, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """variant -> (model directory, manifest) of a default fp32 export, made lazily."""
    from flowae.export import ExportOptions, export_model

    class Exports(dict):
        def __missing__(self, variant: str) -> tuple[Path, dict]:
            out_dir = tmp_path_factory.mktemp(f"export_{variant}") / "model"
            manifest = export_model(tiny_runs[variant], out_dir,
                                    ExportOptions(data_root=fake_root, **QUICK_EXPORT))
            self[variant] = (out_dir, manifest)
            return self[variant]

    return Exports()


@pytest.fixture(scope="session")
def full_export(tiny_runs, fake_root, tmp_path_factory) -> tuple[Path, dict]:
    """`upsample` in fp32, int8 and fp16; the int8 gate allows 100 points, so it passes."""
    from flowae.export import ExportOptions, export_model

    out_dir = tmp_path_factory.mktemp("export_full") / "model"
    options = ExportOptions(data_root=fake_root, int8=True, fp16=True,
                            int8_max_drop_points=100.0, **QUICK_EXPORT)
    return out_dir, export_model(tiny_runs["upsample"], out_dir, options)
