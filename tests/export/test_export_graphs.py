"""export_model on the tiny seeded runs: graphs, parity, metadata, class names, batch sizes,
and a failed gate that leaves the model directory as it was."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from flowae.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from flowae.export import ExportOptions, export_model, parity, pipeline
from flowae.models import VARIANTS
from flowae.runtime import contract
from flowae.runtime.contract import (
    BATCH_AXIS,
    CLASS_NAMES,
    CONTRACT_VERSION,
    GRAPH_IO,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    METADATA_KEY,
    NUM_CLASSES,
    OUTPUT_LATENT,
    OUTPUT_LOGITS,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    graph_file,
)
from flowae.runtime.errors import DataError, ExportError
from flowae.runtime.modeldir import sha256_of
from flowae.runtime.predictor import Predictor
from flowae.runtime.session import create_session

FP32_FILES = sorted(graph_file(role) for role in GRAPH_IO)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: inputs}), strict=True))


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_exports_and_passes_parity(variant, exports, torch_side):
    out_dir, manifest = exports[variant]
    side = torch_side[variant]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*FP32_FILES, MANIFEST_NAME])
    assert json.loads((out_dir / MANIFEST_NAME).read_text()) == manifest
    assert manifest[MANIFEST_RECOMMENDED] == "fp32"
    assert manifest["variant"] == variant
    for role in GRAPH_IO:
        path = out_dir / graph_file(role)
        onnx.checker.check_model(str(path), full_check=True)
        entry = manifest["files"][path.name]
        assert entry["sha256"] == sha256_of(path)
        assert entry["size_bytes"] == path.stat().st_size
        assert entry["parity"]["passed"] and entry["parity"]["images"] == len(side.images)
        # The gate's figures, recomputed here from a fresh session on the same images.
        feed = side.images if role == ROLE_ENCODER_CLASSIFIER else side.reference[OUTPUT_LATENT]
        outputs = run(path, feed)
        assert set(outputs) == set(GRAPH_IO[role][1])
        for name, value in outputs.items():
            assert max_abs_diff(value, side.reference[name]) <= 1e-4
            assert entry["parity"]["max_abs_diff"][name] <= 1e-4
        if role == ROLE_ENCODER_CLASSIFIER:
            assert np.array_equal(outputs[OUTPUT_LOGITS].argmax(1),
                                  side.reference[OUTPUT_LOGITS].argmax(1))
            assert entry["parity"]["top1_agreement_pct"] == 100.0
    accuracy = manifest["accuracy"]["top1_pct"]
    assert accuracy["fp32"] == accuracy["pytorch"] == parity.top1_pct(
        side.reference[OUTPUT_LOGITS], side.labels)


def test_metadata_round_trips(full_export, tiny_runs, torch_side):
    out_dir, manifest = full_export
    run_dir = tiny_runs["upsample"]
    payload = load_checkpoint(run_dir)
    precisions = set()
    for name, entry in manifest["files"].items():
        props = {p.key: p.value for p in onnx.load(str(out_dir / name)).metadata_props}
        text = props[METADATA_KEY]
        meta = ModelMetadata.from_json(text)
        assert meta.to_json() == text
        assert (meta.role, meta.variant) == (entry["role"], "upsample")
        assert meta.contract_version == CONTRACT_VERSION
        assert meta.preprocess == contract.Preprocess()
        assert meta.latent_shape == torch_side["upsample"].model.latent_shape()
        assert meta.class_names == CLASS_NAMES
        assert meta.extra["precision"] == entry["precision"]
        assert meta.extra["checkpoint_sha256"] == sha256_of(resolve_checkpoint(run_dir))
        assert meta.extra["test_top1"] == payload["test"]["top1"]
        assert meta.extra["test_top5"] == payload["test"]["top5"]
        assert set(meta.extra["versions"]) == {"flowae", "torch", "onnx", "onnxruntime"}
        assert meta.extra["opset"] == manifest["opset"]
        assert datetime.fromisoformat(meta.extra["exported_utc"]).tzinfo is not None
        precisions.add(entry["precision"])
    assert precisions == {"fp32", "int8", "fp16"}


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("variant", ["upsample", "base"])
def test_batch_sizes(variant, batch, exports, torch_side, seeded):
    out_dir, _ = exports[variant]
    model = torch_side[variant].model
    images = torch.from_numpy(seeded.uniform(-1, 1, (batch, 3, 100, 100)).astype(np.float32))
    with torch.no_grad():
        logits, latent = model(images)
        reconstruction = model.decoder(latent)
    encoded = run(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER), images.numpy())
    decoded = run(out_dir / graph_file(ROLE_DECODER), latent.numpy())
    assert encoded[OUTPUT_LOGITS].shape == (batch, NUM_CLASSES)
    assert encoded[OUTPUT_LATENT].shape == (batch, *model.latent_shape())
    assert decoded[contract.OUTPUT_RECONSTRUCTION].shape == images.shape
    assert max_abs_diff(encoded[OUTPUT_LOGITS], logits) <= 1e-4
    assert max_abs_diff(encoded[OUTPUT_LATENT], latent) <= 1e-4
    assert max_abs_diff(decoded[contract.OUTPUT_RECONSTRUCTION], reconstruction) <= 1e-4


def test_graph_io_follows_contract(full_export):
    out_dir, manifest = full_export
    for name, entry in manifest["files"].items():
        graph = onnx.load(str(out_dir / name)).graph
        inputs, outputs = GRAPH_IO[entry["role"]]
        assert tuple(v.name for v in graph.input) == inputs
        assert tuple(v.name for v in graph.output) == outputs
        for value in [*graph.input, *graph.output]:
            tensor = value.type.tensor_type
            assert tensor.elem_type == onnx.TensorProto.FLOAT  # fp16 and int8 keep float32 IO
            assert tensor.shape.dim[0].dim_param == BATCH_AXIS


def test_upsample_is_a_resize(exports):
    out_dir, _ = exports["upsample"]
    resizes = [n for n in onnx.load(str(out_dir / graph_file(ROLE_DECODER))).graph.node
               if n.op_type == "Resize"]
    assert len(resizes) == 2
    assert all(onnx.helper.get_attribute_value(a) == b"nearest"
               for n in resizes for a in n.attribute if a.name == "mode")


def test_base_decoder_is_rewritten_for_cpu(exports):
    out_dir, manifest = exports["base"]
    graph = onnx.load(str(out_dir / graph_file(ROLE_DECODER))).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pads = [n for n in graph.node if n.op_type == "Pad"]
    assert manifest["rewrite_convs"] is True
    assert len(convs) == len(pads) == 6
    assert all(len(n.input) == 4 for n in pads)  # the axes input keeps PadFusion away
    for conv in convs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        assert not any(attrs.get("pads", []))
    strides = sorted(tuple(onnx.helper.get_attribute_value(a)) for n in convs
                     for a in n.attribute if a.name == "strides")
    assert (4, 4) in strides  # the 3-channel output layer is folded into 48 channels


def _bump_last_bias(proto, op_type: str, amount: float) -> None:
    """Shift the bias of the graph's last `op_type` node: its output moves by `amount`."""
    node = [n for n in proto.graph.node if n.op_type == op_type][-1]
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name == node.input[2]:
            values = numpy_helper.to_array(tensor) + np.float32(amount)
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, tensor.name))
            return
    raise AssertionError(f"the last {op_type} has no bias initializer")


def test_perturbed_graph_fails_the_gate(exports, torch_side, tmp_path):
    out_dir, _ = exports["base"]
    proto = onnx.load(str(out_dir / graph_file(ROLE_DECODER)))
    _bump_last_bias(proto, "Conv", 1e-3)
    onnx.save(proto, str(tmp_path / "decoder.onnx"))
    side = torch_side["base"]
    outputs = parity.run_graph(create_session(tmp_path / "decoder.onnx"),
                               side.reference[OUTPUT_LATENT])
    figures = parity.compare(outputs, side.reference, parity.Tolerance(atol=1e-4))
    assert not figures["passed"]
    assert figures["max_abs_diff"][contract.OUTPUT_RECONSTRUCTION] > 1e-4
    with pytest.raises(ExportError, match=r"parity gate failed for decoder\.onnx") as caught:
        parity.check(figures, "decoder.onnx")
    assert "\n" not in str(caught.value)


def test_failed_gate_leaves_model_dir_as_it_was(exports, tiny_runs, fake_root, tmp_path,
                                                monkeypatch):
    out_dir = tmp_path / "model"
    shutil.copytree(exports["upsample"][0], out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    real_export_graph = pipeline.export_graph

    def perturbed(module, role, *args, **kwargs):
        proto = real_export_graph(module, role, *args, **kwargs)
        _bump_last_bias(proto, "Gemm", 1e-3)  # the first graph exported fails: no more runs
        return proto

    monkeypatch.setattr(pipeline, "export_graph", perturbed)
    with pytest.raises(ExportError, match=r"parity gate failed for encoder_classifier\.onnx"):
        export_model(tiny_runs["upsample"], out_dir, ExportOptions(data_root=fake_root))
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no scratch directory left


def test_missing_data_writes_nothing(tiny_runs, tmp_path):
    with pytest.raises(DataError, match="Flowers102 not found"):
        export_model(tiny_runs["upsample"], tmp_path / "model",
                     ExportOptions(data_root=tmp_path / "nowhere"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "message"), [
    ({"opset": 12}, "opset must be between 18"),
    ({"trace_batch": 1}, "trace batch must be >= 2"),
    ({"recommend": "int8"}, "needs the int8 export"),
    ({"split": "holdout"}, "split must be one of"),
    ({"int8_max_drop_points": float("nan")}, "finite"),
])
def test_conflicting_or_bad_options_are_refused(options, message):
    with pytest.raises(ExportError, match=message):
        ExportOptions(**options).validate()



def test_class_names_come_from_the_checkpoint(tiny_runs, fake_root, tmp_path):
    payload = load_checkpoint(tiny_runs["upsample"])
    names = [f"flower {i}" for i in range(NUM_CLASSES)]
    payload["class_names"] = names
    save_checkpoint(tmp_path / "named.pt", payload)
    out_dir = tmp_path / "model"
    export_model(tmp_path / "named.pt", out_dir, ExportOptions(data_root=fake_root,
                                                               latency_rounds=2))
    for name in FP32_FILES:
        props = {p.key: p.value for p in onnx.load(str(out_dir / name)).metadata_props}
        assert ModelMetadata.from_json(props[METADATA_KEY]).class_names == tuple(names)
    assert Predictor(out_dir, provider="cpu").class_names == tuple(names)
