"""The int8 and fp16 copies: real quantized/half graphs, their figures, the int8 gate's pass path
(the refuse path runs through the CLI in test_export_cli.py), the fp16 graph being exactly
onnxruntime's converter's, and the default precision per provider family."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from flowae.export import parity, pipeline
from flowae.export.onnx_export import export_graph, graph_modules, tensor_shapes
from flowae.export.quantize import FP16_ALSO_CONVERT, fp16_op_block_list
from flowae.runtime.contract import (
    GRAPH_IO,
    MANIFEST_RECOMMENDED,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
    METADATA_KEY,
    OUTPUT_LATENT,
    OUTPUT_LOGITS,
    ROLE_ENCODER_CLASSIFIER,
    graph_file,
)


def run(path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: inputs}), strict=True))


def feed(role: str, side) -> np.ndarray:
    return side.images if role == ROLE_ENCODER_CLASSIFIER else side.reference[OUTPUT_LATENT]


def test_int8_files_are_static_qdq_per_channel(full_export):
    out_dir, _ = full_export
    for role in GRAPH_IO:
        path = out_dir / graph_file(role, "int8")
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path)).graph
        ops = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert any(t.data_type == TensorProto.INT8 and len(t.dims) == 4
                   for t in graph.initializer), "conv weights stored as int8"
        per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear"
                       and any(a.name == "axis" for a in n.attribute)]
        assert per_channel, "per-channel weight scales"


def test_int8_gate_pass_path(full_export, torch_side):
    out_dir, manifest = full_export
    side = torch_side["upsample"]
    accuracy = manifest["accuracy"]
    top1 = accuracy["top1_pct"]
    assert set(top1) == {"pytorch", "fp32", "int8", "fp16"}
    assert accuracy["split"] == "val" and accuracy["images"] == len(side.labels)
    assert accuracy["int8_drop_points"] == pytest.approx(top1["fp32"] - top1["int8"])
    assert accuracy["int8_max_drop_points"] == 100.0 and accuracy["int8_within_gate"] is True
    # The figures are what the files compute: a fresh session on the same images.
    for precision in ("fp32", "int8"):
        logits = run(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER, precision),
                     side.images)[OUTPUT_LOGITS]
        assert parity.top1_pct(logits, side.labels) == top1[precision]
    for role in GRAPH_IO:
        name = graph_file(role, "int8")
        figures = manifest["files"][name]["parity"]
        assert figures["passed"] is None and figures["tolerance"] == "not gated"
        outputs = run(out_dir / name, feed(role, side))
        for output, value in outputs.items():
            recorded = manifest["files"][name]["parity"]["max_abs_diff"][output]
            diff = float(np.abs(value.astype(np.float64) - side.reference[output]).max())
            assert recorded == pytest.approx(diff, rel=1e-3, abs=1e-6)


def test_default_precision_follows_the_measurements(full_export):
    _, manifest = full_export
    recommended = manifest[MANIFEST_RECOMMENDED]
    latency = manifest["latency_ms"]
    assert set(latency[ROLE_ENCODER_CLASSIFIER]) == {"fp32", "int8"}
    # Whatever this machine measured, the choice is the one its figures imply.
    margin = pipeline.ExportOptions().int8_speed_margin
    timing = latency[ROLE_ENCODER_CLASSIFIER]
    faster = timing["int8"]["p10"] <= margin * timing["fp32"]["p10"]
    assert pipeline.int8_faster(latency, margin) == faster
    assert recommended == ("int8" if faster else "fp32")
    assert f"{timing['fp32']['p10']:.3f} ms" in manifest["recommended_reason"]


def test_fp16_copy(full_export, torch_side):
    out_dir, manifest = full_export
    side = torch_side["upsample"]
    for role in GRAPH_IO:
        fp16, fp32 = graph_file(role, "fp16"), graph_file(role)
        onnx.checker.check_model(str(out_dir / fp16), full_check=True)
        graph = onnx.load(str(out_dir / fp16)).graph
        weights = [t for t in graph.initializer if len(t.dims) == 4]
        assert {t.data_type for t in weights} == {TensorProto.FLOAT16}
        fp32_weights = [t for t in onnx.load(str(out_dir / fp32)).graph.initializer
                        if len(t.dims) == 4]
        assert 2 * sum(numpy_helper.to_array(t).nbytes for t in weights) == \
            sum(numpy_helper.to_array(t).nbytes for t in fp32_weights)
        figures = manifest["files"][fp16]["parity"]
        assert figures["passed"] and "0.01" in figures["tolerance"]
        for output, value in run(out_dir / fp16, feed(role, side)).items():
            assert value.dtype == np.float32  # float32 in and out, float16 inside
            expected = side.reference[output]
            assert np.all(np.abs(value - expected) <= 1e-2 + 1e-2 * np.abs(expected))
            assert figures["max_abs_diff"][output] > 0  # it really is a different precision


def test_fp16_keeps_resize_scales_float32(full_export):
    out_dir, _ = full_export
    graph = onnx.load(str(out_dir / graph_file("decoder", "fp16"))).graph
    initializers = {t.name: t for t in graph.initializer}
    scales = [n.input[2] for n in graph.node if n.op_type == "Resize"]
    assert scales and all(initializers[s].data_type == TensorProto.FLOAT for s in scales)
    assert all(numpy_helper.to_array(initializers[s]).tolist()[-2:] == [2.0, 2.0]
               for s in scales)


def _without_metadata(proto):
    del proto.metadata_props[:]
    return proto


def _nodes(graph) -> list:
    return sorted(node.SerializeToString(deterministic=True) for node in graph.node)


def test_fp16_graph_is_onnxruntimes_conversion(full_export, torch_side):
    """The fp16 file is what onnxruntime's converter makes of the fp32 graph: the same nodes
    and initializers (ours are only put in topological order) and the same outputs, to 0."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    out_dir, _ = full_export
    side = torch_side["upsample"]
    assert set(fp16_op_block_list()) == set(DEFAULT_OP_BLOCK_LIST) - set(FP16_ALSO_CONVERT)
    shapes = tensor_shapes(side.model)
    for role, module in graph_modules(side.model, rewrite_convs=True).items():
        (input_name,), _ = GRAPH_IO[role]
        # The graph the export converted: the exporter's own, before explicit pads.
        source = export_graph(module, role, torch.zeros(2, *shapes[input_name]), None, shapes)
        del source.graph.value_info[:]
        theirs = convert_float_to_float16(source, keep_io_types=True,
                                          op_block_list=fp16_op_block_list())
        ours = _without_metadata(onnx.load(str(out_dir / graph_file(role, "fp16"))))
        assert _nodes(ours.graph) == _nodes(theirs.graph)
        assert sorted(t.SerializeToString() for t in ours.graph.initializer) == \
            sorted(t.SerializeToString() for t in theirs.graph.initializer)
        inputs = feed(role, side)
        theirs_out = ort.InferenceSession(theirs.SerializeToString(),
                                          providers=["CPUExecutionProvider"]).run(
            None, {input_name: inputs})
        ours_out = list(run(out_dir / graph_file(role, "fp16"), inputs).values())
        for a, b in zip(ours_out, theirs_out, strict=True):
            assert np.array_equal(a, b)


def test_fp16_keeps_metadata(full_export):
    out_dir, _ = full_export
    props = {p.key for p in onnx.load(str(out_dir / graph_file("decoder", "fp16"))).metadata_props}
    assert METADATA_KEY in props


def test_each_provider_family_gets_a_precision(full_export, exports):
    _, manifest = full_export  # fp16 written
    by_provider = manifest[MANIFEST_RECOMMENDED_BY_PROVIDER]
    assert by_provider == {"cpu": manifest[MANIFEST_RECOMMENDED], "cuda": "fp16",
                           "tensorrt": "fp16", "openvino": "fp32"}
    assert set(manifest["recommended_reason_by_provider"]) == set(by_provider)
    assert manifest["recommended_reason_by_provider"]["cpu"] == manifest["recommended_reason"]
    for precision in by_provider.values():  # every recommended file is there
        assert graph_file(ROLE_ENCODER_CLASSIFIER, precision) in manifest["files"]
    _, plain = exports["upsample"]  # fp32 only
    assert plain[MANIFEST_RECOMMENDED_BY_PROVIDER] == {
        "cpu": "fp32", "cuda": "fp32", "tensorrt": "fp32", "openvino": "fp32"}
    assert "--fp16" in plain["recommended_reason_by_provider"]["cuda"]
