"""Runtime fixtures: one tiny model exported per session by the real flowae.export (so these
tests also check that what export writes is what the runtime reads), served by a Predictor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowae.runtime.contract import (
    METADATA_KEY,
)

REPO = Path(__file__).resolve().parents[2]


def set_metadata(path: Path, text: str | None, out: Path | None = None) -> Path:
    """Rewrite (or with None remove) the flowae metadata entry of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if text is not None:
        model.metadata_props.add(key=METADATA_KEY, value=text)
    out = out or path
    onnx.save(model, str(out))
    return out


def read_metadata(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])


@pytest.fixture(scope="session")
def model_dir(tiny_runs, fake_root, tmp_path_factory) -> Path:
    """A model directory exported by flowae.export from the tiny seeded `upsample` run (fp32)."""
    from flowae.export import ExportOptions, export_model

    out_dir = tmp_path_factory.mktemp("model")
    export_model(tiny_runs["upsample"], out_dir, ExportOptions(data_root=fake_root))
    return out_dir


@pytest.fixture(scope="session")
def predictor(model_dir):
    from flowae.runtime.predictor import Predictor

    return Predictor(model_dir, provider="cpu", threads=1, batch_size=4)


@pytest.fixture(scope="session")
def real_jpegs(real_root) -> list[Path]:
    """A spread of real test-split JPEGs (shorter side 160 px, both orientations)."""
    files = sorted((real_root / "flowers-102" / "jpg").glob("image_*.jpg"))
    return files[:: max(1, len(files) // 12)][:12]


@pytest.fixture(scope="session")
def onnx_metadata():
    """(read, write) for the flowae metadata of an ONNX file, for tests that tamper with it."""
    return read_metadata, set_metadata
