"""One FlowAE graph to one ONNX model: trace, export, check the contract, label, write.

`graph_modules` splits a model into the contract's graphs (encoder+classifier, decoder),
`export_graph` runs torch's `torch.export`-based exporter with the contract's tensor names and
dynamic batch axis and checks the result against the contract, `set_metadata` attaches the
ModelMetadata JSON, and `write_model` runs onnx's full checker before an atomic write.
Imports torch, flowae.models, flowae.export.convs and the runtime's contract, errors and
atomic writes; onnx is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowae.export.convs import fold_convolutions
from flowae.models import FlowAE
from flowae.runtime.contract import (
    BATCH_AXIS,
    GRAPH_IO,
    INPUT_IMAGE,
    INPUT_LATENT,
    METADATA_KEY,
    OUTPUT_LATENT,
    OUTPUT_LOGITS,
    OUTPUT_RECONSTRUCTION,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
)
from flowae.runtime.errors import ContractError, ExportError
from flowae.runtime.files import write_bytes_atomic

log = logging.getLogger(__name__)

MIN_OPSET = 18  # the torch.export-based exporter's floor; Pad's `axes` input needs 18 too


class EncoderClassifier(nn.Module):
    """(B, 3, H, W) image -> (logits (B, classes), latent (B, C, h, w)): one graph, two outputs."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(image)  # (B, 16, 22, 22)
        return self.classifier(latent), latent


def tensor_shapes(model: FlowAE) -> dict[str, tuple[int, ...]]:
    """Per-sample shape (batch axis left out) of every tensor the graphs exchange."""
    side = model.config.image_size_px
    return {
        INPUT_IMAGE: (3, side, side),
        OUTPUT_LOGITS: (model.config.num_classes,),
        OUTPUT_LATENT: tuple(model.latent_shape()),
        INPUT_LATENT: tuple(model.latent_shape()),
        OUTPUT_RECONSTRUCTION: (3, side, side),
    }


def graph_modules(model: FlowAE, rewrite_convs: bool) -> dict[str, nn.Module]:
    """role -> eval-mode module to export; encoder and decoder CPU-rewritten if asked (exact,
    see flowae.export.convs; the classifier's convolutions already fill the vectors)."""
    encoder, decoder = model.encoder, model.decoder
    if rewrite_convs:
        shapes = tensor_shapes(model)
        encoder = fold_convolutions(encoder, shapes[INPUT_IMAGE])
        decoder = fold_convolutions(decoder, shapes[INPUT_LATENT])
    return {
        ROLE_ENCODER_CLASSIFIER: EncoderClassifier(encoder, model.classifier).eval(),
        ROLE_DECODER: decoder.eval(),
    }


def with_explicit_pads(proto):
    """A copy of `proto` with each Conv's zero padding moved into a Pad node in front of it.

    onnxruntime's NCHWc convolution takes a slow path for every output that reads padding,
    which for the decoders' "full" convolutions is almost every output; a padded input lets
    it run the fast interior kernel everywhere. Only convolutions padded wider than "same"
    (more than kernel // 2 on every side: the decoders' full convolutions, folded or not) get
    one: for "same" padding the extra pass over the map costs more than it saves (measured
    on res32's 3x3 convolutions: 0.70 vs 0.57 ms for the encoder+classifier at batch 1).
    The Pad carries an `axes` input, which keeps onnxruntime's PadFusion from folding it back
    into the Conv. For fp32 only: onnxruntime's int8 layout transformer mishandles a Pad with
    `axes` (1.32: Gather index out of range).
    """
    import onnx
    from onnx import helper, numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}

    def full(node, pads) -> bool:
        kernel = next((tuple(a.ints) for a in node.attribute if a.name == "kernel_shape"),
                      weights.get(node.input[1], ())[2:] if len(node.input) > 1 else ())
        return len(kernel) == 2 and all(pad > kernel[i % 2] // 2
                                        for i, pad in enumerate(pads.ints))

    nodes = []
    for node in graph.node:
        pads = next((a for a in node.attribute if a.name == "pads"), None)
        auto_pad = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and pads is not None \
                and any(pads.ints) and auto_pad == b"NOTSET" and len(pads.ints) == 4 \
                and full(node, pads):
            stem = f"{node.name or node.output[0]}_explicit_pad"
            graph.initializer.append(numpy_helper.from_array(
                np.asarray(pads.ints, dtype=np.int64), f"{stem}_pads"))
            graph.initializer.append(numpy_helper.from_array(
                np.asarray([2, 3], dtype=np.int64), f"{stem}_axes"))  # H and W of NCHW
            nodes.append(helper.make_node(
                "Pad", [node.input[0], f"{stem}_pads", "", f"{stem}_axes"], [f"{stem}_out"],
                name=stem, mode="constant"))
            node.input[0] = f"{stem}_out"
            del pads.ints[:]
            pads.ints.extend([0, 0, 0, 0])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return copy


def check_io(proto, role: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """The graph's inputs and outputs are the contract's, with a dynamic batch axis."""
    inputs, outputs = GRAPH_IO[role]
    for kind, expected, found in (("inputs", inputs, proto.graph.input),
                                  ("outputs", outputs, proto.graph.output)):
        names = tuple(value.name for value in found)
        if names != expected:
            raise ExportError(f"{role} graph {kind} are {names}, the contract says {expected}")
        for value in found:
            dims = value.type.tensor_type.shape.dim
            batch = dims[0].dim_param if dims else None
            static = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
            if batch != BATCH_AXIS or static != shapes[value.name]:
                raise ExportError(
                    f"{role} graph {value.name!r} has shape ({batch}, {static}), "
                    f"the contract says ({BATCH_AXIS}, {shapes[value.name]})")


def copy_io_shapes(proto, source) -> None:
    """Give `proto`'s inputs and outputs the shapes `source` declares for the same names.

    onnxruntime's quantization pre-processing rewrites declared shapes through its symbolic
    shape inference (the batch axis comes back as "floor(1.0*batch)" after a Resize); the
    graph's interface is the fp32 graph's, so it is restored from there.
    """
    declared = {v.name: v.type.tensor_type.shape for v in [*source.graph.input,
                                                            *source.graph.output]}
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name in declared:
            value.type.tensor_type.shape.CopyFrom(declared[value.name])


def export_graph(module: nn.Module, role: str, example: torch.Tensor, opset: int | None,
                 shapes: dict[str, tuple[int, ...]]):
    """Export `module` (eval mode) with torch.export; return a checked onnx.ModelProto.

    `example` must have a batch of at least 2, or torch.export specialises the batch axis.
    """
    if example.shape[0] < 2:
        raise ExportError(f"trace with a batch of at least 2 (got {example.shape[0]}) so the "
                          f"'{BATCH_AXIS}' axis stays dynamic")
    inputs, outputs = GRAPH_IO[role]
    try:
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=list(inputs),
            output_names=list(outputs), opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},), external_data=False,
            optimize=True, verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; the message is what matters
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export of the {role} graph failed: {reason}") from exc
    proto = program.model_proto
    check_io(proto, role, shapes)
    return proto


def opset_of(proto) -> int:
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def set_metadata(proto, metadata: ModelMetadata) -> None:
    """Put the metadata JSON under METADATA_KEY, replacing any earlier entry."""
    kept = [prop for prop in proto.metadata_props if prop.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()


def read_metadata(path: Path) -> ModelMetadata:
    """The ModelMetadata an ONNX file carries (ContractError if absent or malformed)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ContractError(f"{path}: no '{METADATA_KEY}' entry in metadata_props")
    return ModelMetadata.from_json(props[METADATA_KEY])


def write_model(proto, path: Path) -> None:
    """Run onnx's full checker (strict shape inference included), then write atomically."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ExportError(f"{Path(path).name} fails onnx.checker: {reason}") from exc
    write_bytes_atomic(path, proto.SerializeToString())

