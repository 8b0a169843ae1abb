"""Runtime fixtures: one tiny model exported per session by the real flowae.export (so these
tests also check that what export writes is what the runtime reads), served by a Predictor."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flowae.runtime.contract import MANIFEST_FILES, MANIFEST_NAME, METADATA_KEY

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


def sign_manifest(model_dir: Path, **fields) -> Path:
    """Make `model_dir`'s manifest list every graph file there with its current size and sha256
    (and set `fields`), as an export that wrote these very files would: tests that change a
    graph on purpose use it so that the check under test, not the hash check, meets the change."""
    path = model_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    files = {}
    for graph in sorted(model_dir.iterdir()):
        if graph.suffix in (".onnx", ".ort"):
            data = graph.read_bytes()
            entry = dict(manifest.get(MANIFEST_FILES, {}).get(graph.name, {}))
            entry.update(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            files[graph.name] = entry
    manifest.update(fields)
    manifest[MANIFEST_FILES] = files
    path.write_text(json.dumps(manifest, indent=2))
    return model_dir


@pytest.fixture(scope="session")
def signer():
    """sign_manifest, for tests that change a graph on purpose (see its docstring)."""
    return sign_manifest


@pytest.fixture
def model_copy(model_dir, tmp_path):
    """A fresh copy of the exported model directory, manifest included, for one test to alter."""
    return Path(shutil.copytree(model_dir, tmp_path / "model_copy"))


@pytest.fixture(scope="session")
def model_dir(exports) -> Path:
    """The tiny seeded `upsample` run exported by flowae.export (fp32); shared, never altered
    (tests that change it take `model_copy`)."""
    return exports["upsample"][0]


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
