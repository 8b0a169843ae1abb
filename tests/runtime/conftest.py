"""Runtime fixtures: one exported tiny model per session, served by a real Predictor.

The export goes through flowae.export when the repo has it (the real path, so these tests
also check that what export writes is what the runtime reads); without it, a small stand-in
exports the tiny `upsample` run with torch.onnx.export and writes the contract's metadata
with onnx, which is all the runtime reads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flowae.runtime.contract import (
    BATCH_AXIS,
    GRAPH_IO,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    METADATA_KEY,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    Preprocess,
    graph_file,
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


def stand_in_export(run_dir: Path, out_dir: Path) -> Path:
    """Both graphs of a run, fp32, with contract names, a dynamic batch axis and metadata."""
    import torch

    from flowae.checkpoint import load_checkpoint, model_from_checkpoint

    payload = load_checkpoint(run_dir)
    model = model_from_checkpoint(payload)
    side = model.config.image_size_px
    preprocess = Preprocess(image_size_px=side, resize_px=side)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, side, side)  # batch >= 2 keeps the batch axis dynamic
    graphs = {
        ROLE_ENCODER_CLASSIFIER: (model, example),
        ROLE_DECODER: (model.decoder, torch.randn(2, *model.latent_shape())),
    }
    for role, (module, inputs) in graphs.items():
        names_in, names_out = GRAPH_IO[role]
        path = out_dir / graph_file(role)
        with warnings.catch_warnings():  # the legacy exporter's deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, (inputs,), str(path), input_names=list(names_in),
                output_names=list(names_out), dynamo=False,
                dynamic_axes={name: {0: BATCH_AXIS} for name in names_in + names_out},
            )
        metadata = ModelMetadata(
            role=role, variant=model.config.name, preprocess=preprocess,
            latent_shape=model.latent_shape(),
            extra={"test_top1": payload.get("test", {}).get("top1"),  # as flowae.export
                   "test_top5": payload.get("test", {}).get("top5"),
                   "exporter": "tests/runtime stand-in"},
        )
        set_metadata(path, metadata.to_json())
    (out_dir / MANIFEST_NAME).write_text(json.dumps({MANIFEST_RECOMMENDED: "fp32"}))
    return out_dir


def export_for_tests(run_dir: Path, out_dir: Path, data_root: Path) -> Path:
    """flowae.export's export_model once it exists in the repo, else the stand-in above."""
    if not (REPO / "export" / "__init__.py").is_file():
        return stand_in_export(run_dir, out_dir)
    from flowae.export import ExportOptions, export_model

    export_model(run_dir, out_dir, ExportOptions(data_root=data_root))
    return out_dir


@pytest.fixture(scope="session")
def model_dir(tiny_runs, fake_root, tmp_path_factory) -> Path:
    """A model directory exported from the tiny seeded `upsample` run (fp32 graphs)."""
    return export_for_tests(tiny_runs["upsample"], tmp_path_factory.mktemp("model"), fake_root)


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
