"""`flowae-export --ort`: an ORT-format copy of every fp32 and int8 graph (fp16 stays .onnx:
the converter optimises for the CPU, which casts it back to float32), made by onnxruntime's own
converter, carrying the same contract metadata and giving the .onnx file's outputs (to float
rounding: see below); plus the required_operators.config of a reduced onnxruntime build; all
listed in the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from flowae.export import ExportOptions, export_model
from flowae.export.ort_format import ORT_OPERATORS_CONFIG
from flowae.export.pipeline import ORT_PRECISIONS
from flowae.runtime.contract import (
    GRAPH_IO,
    METADATA_KEY,
    OUTPUT_LATENT,
    PRECISIONS,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    graph_file,
)
from flowae.runtime.modeldir import sha256_of
from flowae.runtime.session import create_session


@pytest.fixture(scope="module")
def ort_export(tiny_runs, fake_root, tmp_path_factory):
    """`base` (folded convolutions, explicit pads) in every precision, with .ort copies."""
    out_dir = tmp_path_factory.mktemp("ort") / "model"
    options = ExportOptions(data_root=fake_root, int8=True, fp16=True, ort_format=True,
                            int8_max_drop_points=100.0, latency_rounds=2)
    return out_dir, export_model(tiny_runs["base"], out_dir, options)


def outputs(path, inputs: np.ndarray) -> list[np.ndarray]:
    session = create_session(path)
    return session.run(None, {session.get_inputs()[0].name: inputs})


def test_every_graph_has_an_ort_copy_listed_with_its_hash(ort_export):
    out_dir, manifest = ort_export
    assert ORT_PRECISIONS == ("fp32", "int8")
    expected = {graph_file(role, precision) for role in GRAPH_IO for precision in PRECISIONS} | {
        graph_file(role, precision, "ort") for role in GRAPH_IO for precision in ORT_PRECISIONS}
    assert {p.name for p in out_dir.iterdir()} == expected | {ORT_OPERATORS_CONFIG,
                                                               "manifest.json"}
    assert set(manifest["files"]) == expected | {ORT_OPERATORS_CONFIG}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_of(out_dir / name)
        assert entry["size_bytes"] == (out_dir / name).stat().st_size
    for role in GRAPH_IO:
        for precision in ORT_PRECISIONS:
            entry = manifest["files"][graph_file(role, precision, "ort")]
            assert (entry["role"], entry["precision"], entry["format"]) == (role, precision, "ort")
            assert entry["parity"]["passed"]
            assert entry["parity"]["against"] == graph_file(role, precision)


def test_ort_files_keep_the_metadata_and_the_outputs(ort_export, torch_side):
    out_dir, _ = ort_export
    side = torch_side["base"]
    diffs: dict[str, float] = {}
    for role in GRAPH_IO:
        feed = side.images if role == ROLE_ENCODER_CLASSIFIER else side.reference[OUTPUT_LATENT]
        for precision in ORT_PRECISIONS:
            onnx_path = out_dir / graph_file(role, precision)
            ort_path = out_dir / graph_file(role, precision, "ort")
            assert ort_path.read_bytes()[4:8] == b"ORTM"  # the ORT format's file identifier
            metadata = [create_session(path).get_modelmeta().custom_metadata_map[METADATA_KEY]
                        for path in (onnx_path, ort_path)]
            assert metadata[0] == metadata[1]
            meta = ModelMetadata.from_json(metadata[1])
            assert (meta.role, meta.extra["precision"]) == (role, precision)
            for a, b in zip(outputs(onnx_path, feed), outputs(ort_path, feed), strict=True):
                diffs[precision] = max(diffs.get(precision, 0.0), float(np.abs(a - b).max()))
                # The .ort holds the graph as optimised at conversion (without the x86-only
                # NCHWc layout, for portability); the .onnx is optimised at load, with it:
                # other kernels sum in another order (float32 rounding; int8 is exact).
                assert np.all(np.abs(a - b) <= 1e-4), \
                    f"{ort_path.name} differs from {onnx_path.name}"
    print("max |ort - onnx| per precision:", diffs)


def test_required_operators_config_names_the_graphs_ops(ort_export):
    out_dir, _ = ort_export
    text = (out_dir / ORT_OPERATORS_CONFIG).read_text()
    ops = {op for line in text.splitlines() if line and not line.startswith("#")
           for op in line.split(";")[2].split(",")}
    assert {"Conv", "QuantizeLinear", "DequantizeLinear"} <= ops
    assert str(out_dir.parent) not in text  # no scratch paths in the header
    named = {line[4:] for line in text.splitlines() if line.startswith("# - ")}
    assert named == {graph_file(role, precision, "ort") for role in GRAPH_IO
                     for precision in ORT_PRECISIONS}


def test_the_runtime_serves_the_ort_graphs(ort_export, fake_root):
    """Predictor given the .ort file (verified against the manifest beside it) answers as it
    does from the .onnx file: the same top-5 labels, probabilities to float rounding."""
    from flowae.runtime.predictor import Predictor

    out_dir, _ = ort_export
    images = sorted((fake_root / "flowers-102" / "jpg").glob("*.jpg"))[:6]
    results = [Predictor(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER, "fp32", fmt),
                         provider="cpu").predict(images, top_k=5) for fmt in ("onnx", "ort")]
    for onnx_top5, ort_top5 in zip(*results, strict=True):
        assert [p.label for p in onnx_top5] == [p.label for p in ort_top5]
        assert [p.probability for p in ort_top5] == pytest.approx(
            [p.probability for p in onnx_top5], abs=1e-5)
