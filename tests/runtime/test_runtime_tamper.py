"""A corpus of tampered and foreign models, built at test time from the real exported tiny
model: bad metadata of every kind, ONNX graphs flowae never wrote, truncated files and flipped
weight bytes. Each is refused on load, by the Predictor with one FlowaeError line and by
`flowae-infer` with one line on stderr and exit 2, never a traceback.

Tampered metadata and foreign graphs are signed into the manifest (as an export that wrote
them would have), so that the contract check, not the hash check, is what meets them; the
damaged-file cases keep the exported manifest, so the hash check must meet them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flowae.runtime.cli import main
from flowae.runtime.contract import (
    CLASS_NAMES,
    MANIFEST_NAME,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    graph_file,
)
from flowae.runtime.errors import FlowaeError
from flowae.runtime.predictor import Predictor

ENCODER = graph_file(ROLE_ENCODER_CLASSIFIER)
DECODER = graph_file(ROLE_DECODER)
FLIPPED_BYTES = 4096


def edit_metadata(change):
    """A case that rewrites the encoder's flowae metadata with `change(dict)` (or text)."""

    def build(folder: Path, helpers) -> None:
        read_metadata, set_metadata = helpers
        path = folder / ENCODER
        data = read_metadata(path)
        text = change(data)
        set_metadata(path, text if isinstance(text, str) or text is None else json.dumps(data))

    return build


def field(key, value, within=None):
    def change(data):
        (data[within] if within else data)[key] = value
        return data

    return change


def foreign_graph(*, metadata: bool = True, names=("image", "logits", "latent"),
                  classes: int = len(CLASS_NAMES), latent_channels: int | None = None,
                  side: int | None = None, logits_rank: int = 2, batch_of_one: bool = False):
    """A small ONNX graph made with onnx.helper in place of the exported encoder: mean colour
    -> MatMul for the logits, one strided Conv for the latent, with static declared dims."""

    def build(folder: Path, helpers) -> None:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        read_metadata, set_metadata = helpers
        meta = read_metadata(folder / ENCODER)
        channels, height, _ = meta["latent_shape"]
        channels = latent_channels or channels
        size = side or meta["preprocess"]["image_size_px"]
        stride = size // height
        kernel = size - stride * (height - 1)  # so that the Conv gives height x height
        rng = np.random.default_rng(0)
        image_in, logits_out, latent_out = names
        weights = [
            numpy_helper.from_array(rng.normal(size=(3, classes)).astype(np.float32), "w"),
            numpy_helper.from_array(
                rng.normal(size=(channels, 3, kernel, kernel)).astype(np.float32), "k"),
            numpy_helper.from_array(np.array([1, 3], np.int64), "one"),  # batch 1 only
        ]
        nodes = [
            helper.make_node("GlobalAveragePool", [image_in], ["pooled"]),
            helper.make_node("Reshape", ["pooled", "one"], ["colour"]) if batch_of_one else
            helper.make_node("Flatten", ["pooled"], ["colour"]),
            helper.make_node("MatMul", ["colour", "w"], [logits_out if logits_rank == 2
                                                         else "flat"]),
            helper.make_node("Conv", [image_in, "k"], [latent_out], strides=[stride, stride]),
        ]
        logits_shape = ["batch", classes]
        if logits_rank != 2:
            nodes.append(helper.make_node("Unsqueeze", ["flat", "axis"], [logits_out]))
            weights.append(numpy_helper.from_array(np.array([2], np.int64), "axis"))
            logits_shape = ["batch", classes, 1]
        graph = helper.make_graph(
            nodes, "foreign",
            [helper.make_tensor_value_info(image_in, TensorProto.FLOAT,
                                           ["batch", 3, size, size])],
            [helper.make_tensor_value_info(logits_out, TensorProto.FLOAT, logits_shape),
             helper.make_tensor_value_info(latent_out, TensorProto.FLOAT,
                                           ["batch", channels, height, height])],
            initializer=weights,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / ENCODER))
        if metadata:
            set_metadata(folder / ENCODER, json.dumps(meta))

    return build


def truncate(name: str):
    def build(folder: Path, helpers) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return build


def flip_weights(name: str):
    """XOR 4 KB inside the largest weight tensor's bytes: same size, valid protobuf."""

    def build(folder: Path, helpers) -> None:
        import onnx

        path = folder / name
        model = onnx.load(str(path))
        largest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        data = bytearray(path.read_bytes())
        start = bytes(data).find(largest.raw_data)
        assert start > 0 and len(largest.raw_data) >= FLIPPED_BYTES
        for i in range(start, start + FLIPPED_BYTES):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))

    return build


# name -> (how to damage a copy of the model, sign the result into the manifest?, message)
CASES = {
    "ten class names for 102 logits": (
        edit_metadata(field("class_names", list(CLASS_NAMES[:10]))), True,
        "graph gives 102 logits but its metadata names 10 classes"),
    "resize_px 0": (edit_metadata(field("resize_px", 0, "preprocess")), True,
                    "resize_px must be an integer from 1 to 4096, got 0"),
    "image_size_px absurd": (edit_metadata(field("image_size_px", 10**6, "preprocess")), True,
                             "image_size_px must be an integer from 1 to 4096"),
    "one-element mean": (edit_metadata(field("mean", [0.5], "preprocess")), True,
                         "mean must be 3 finite numbers"),
    "std 0": (edit_metadata(field("std", [0.5, 0, 0.5], "preprocess")), True,
              "std must be > 0"),
    "unknown resize filter": (edit_metadata(field("resize_filter", "lanczos", "preprocess")),
                              True, "unsupported resize filter 'lanczos'"),
    "numbers as class names": (edit_metadata(field("class_names", list(range(102)))), True,
                               "class_names must be non-empty strings"),
    "duplicate class names": (edit_metadata(field("class_names", ["rose"] * 102)), True,
                              "class name 'rose' appears more than once"),
    "two-axis latent shape": (edit_metadata(field("latent_shape", [16, 22])), True,
                              "latent_shape must be 3 positive integers"),
    "latent shape the graph does not have": (
        edit_metadata(lambda d: field("latent_shape", [d["latent_shape"][0] + 1]
                                      + d["latent_shape"][1:])(d)), True, "graph's latent is"),
    "metadata not JSON": (edit_metadata(lambda d: "{not json"), True,
                          "metadata is not valid JSON"),
    "metadata a JSON list": (edit_metadata(lambda d: "[1, 2]"), True, "not a JSON object"),
    "no flowae metadata": (edit_metadata(lambda d: None), True, "no 'flowae' metadata"),
    "another contract version": (edit_metadata(field("contract_version", 99)), True,
                                 "model has contract version 99"),
    "decoder role in the encoder file": (edit_metadata(field("role", ROLE_DECODER)), True,
                                         "is a decoder graph, expected encoder_classifier"),
    "foreign graph without metadata": (foreign_graph(metadata=False), True,
                                       "no 'flowae' metadata"),
    "foreign graph, wrong tensor names": (
        foreign_graph(names=("input", "output", "features")), True,
        "tensors ('input',) -> ('output', 'features'), the contract says"),
    "foreign graph, 5 logits": (foreign_graph(classes=5), True,
                                "graph gives 5 logits but its metadata names 102 classes"),
    "foreign graph, wrong latent": (foreign_graph(latent_channels=3), True,
                                    "graph's latent is (3,"),
    "foreign graph, wrong image size": (foreign_graph(side=64), True,
                                        "graph's image tensor is (3, 64, 64)"),
    "foreign graph, 3-axis logits": (foreign_graph(logits_rank=3), True,
                                     "logits tensor is ['batch', 102, 1]"),
    "truncated, re-signed": (truncate(ENCODER), True, "not a loadable ONNX model"),
    "truncated encoder": (truncate(ENCODER), False, "bytes, manifest.json says"),
    "flipped encoder weights": (flip_weights(ENCODER), False,
                                "sha256 does not match manifest.json"),
    "flipped decoder weights": (flip_weights(DECODER), False,
                                "sha256 does not match manifest.json"),
    "empty encoder": (lambda folder, _: (folder / ENCODER).write_bytes(b""), False,
                      "0 bytes, manifest.json says"),
}


@pytest.fixture(params=list(CASES))
def tampered(request, model_copy, onnx_metadata, signer):
    build, sign, message = CASES[request.param]
    build(model_copy, onnx_metadata)
    if sign:
        signer(model_copy)
    return model_copy, message


def test_predictor_refuses_in_one_line(tampered):
    folder, message = tampered
    with pytest.raises(FlowaeError) as caught:
        Predictor(folder, provider="cpu")
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert text.startswith(str(folder))  # names the file (or directory) at fault


def test_cli_refuses_with_one_line_and_exit_2(tampered, real_jpegs):
    folder, message = tampered
    result = CliRunner().invoke(main, ["--model", str(folder), "--provider", "cpu",
                                       str(real_jpegs[0])])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    (line,) = [line for line in result.stderr.splitlines() if line]
    assert line.startswith(f"flowae-infer: error: {folder}") and message in line
    assert result.stdout == ""


def test_only_the_hash_check_stands_between_flipped_weights_and_the_user(model_copy, real_jpegs,
                                                                         onnx_metadata):
    """The flipped model is a valid graph with valid metadata: without its manifest it loads
    (with a warning) and answers; with the manifest, the real process refuses it in one line."""
    flip_weights(ENCODER)(model_copy, onnx_metadata)
    args = [sys.executable, "-m", "flowae.runtime.cli", "--model", str(model_copy),
            "--provider", "cpu", "--json", str(real_jpegs[0])]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (f"flowae-infer: error: {model_copy / ENCODER}: sha256 does not "
                              f"match {MANIFEST_NAME} (tampered or incomplete copy)\n")
    (model_copy / MANIFEST_NAME).unlink()
    served = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0 and json.loads(served.stdout)["top_k"]
    assert served.stderr == (f"flowae-infer: warning: {model_copy}: no {MANIFEST_NAME}: "
                             "graphs not verified\n")


def test_a_graph_that_fails_while_running_is_one_line_too(model_copy, onnx_metadata, signer,
                                                          real_jpegs):
    """It loads and fits the contract, but its Reshape takes one image at a time."""
    foreign_graph(batch_of_one=True)(model_copy, onnx_metadata)
    signer(model_copy)
    predictor = Predictor(model_copy, provider="cpu", batch_size=2)
    assert len(predictor.predict(real_jpegs[0])[0]) == 5  # a batch of one runs
    with pytest.raises(FlowaeError) as caught:
        predictor.predict(real_jpegs[:2])
    assert str(caught.value).startswith(f"{model_copy / ENCODER}: onnxruntime could not run "
                                        "this graph on a batch of 2 (")
    assert "\n" not in str(caught.value)
    result = CliRunner().invoke(main, ["--model", str(model_copy), "--provider", "cpu",
                                       "--batch-size", "2", *map(str, real_jpegs[:2])])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [f"flowae-infer: error: {caught.value}"]
