"""The reduced-precision copies of an fp32 graph: static int8 (QDQ) and float16.

int8 uses onnxruntime's own tools: `quant_pre_process` (shape inference and basic graph
optimisation), then `quantize_static` in QDQ format with per-channel int8 weights and uint8
activations calibrated (min/max) on real training inputs fed by a small CalibrationDataReader.
float16 is converted here with onnx alone (onnxconverter-common is not a dependency): every
float weight becomes float16, inputs and outputs stay float32 behind Cast nodes so callers
feed the same arrays; only an allow-list of ops this project's graphs use is converted.
Imports numpy and the runtime's errors; onnx and onnxruntime.quantization inside functions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from flowae.runtime.errors import ExportError

log = logging.getLogger(__name__)

# Ops whose float inputs may all become float16, except the Resize inputs below.
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Relu", "Tanh", "Sigmoid", "MaxPool", "AveragePool", "Gemm",
    "MatMul", "Add", "Mul", "Sub", "Div", "Reshape", "Flatten", "Transpose", "Resize", "Pad",
    "Identity", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "BatchNormalization",
    "Shape", "Gather", "Max", "Min", "ReduceMean", "GlobalAveragePool",
})
_FLOAT32_INPUTS = {"Resize": (1, 2)}  # roi and scales stay float32 in every opset
FP16_MAX = 65504.0


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, work_dir: Path,
                  batch_size: int = 16) -> None:
    """Write a static QDQ int8 copy of `fp32_path`, calibrated on `calibration` (N, ...)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        """Feeds `calibration` to the calibrator, `batch_size` inputs at a time."""

        def __init__(self):
            self.starts = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            if start is None:
                return None
            batch = calibration[start : start + batch_size]
            return {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    prepared = Path(work_dir) / f"{Path(fp32_path).stem}.preprocessed.onnx"
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # the quantizer raises many types; the message is what matters
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"int8 quantization of {Path(fp32_path).name} failed: {reason}") \
            from exc
    finally:
        prepared.unlink(missing_ok=True)


def to_float16(proto):
    """A float16 copy of an fp32 onnx.ModelProto, float32 at its inputs and outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    unknown = sorted({node.op_type for node in graph.node if node.op_type not in FP16_OPS})
    if unknown:
        raise ExportError(f"float16 conversion does not handle ops {', '.join(unknown)}")
    keep_fp32 = {node.input[i] for node in graph.node
                 for i in _FLOAT32_INPUTS.get(node.op_type, ()) if i < len(node.input)}

    def half(tensor) -> TensorProto:
        values = numpy_helper.to_array(tensor)
        if np.abs(values).max(initial=0.0) > FP16_MAX:
            raise ExportError(f"weight {tensor.name!r} exceeds the float16 range")
        return numpy_helper.from_array(values.astype(np.float16), tensor.name)

    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep_fp32:
            graph.initializer[i].CopyFrom(half(tensor))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in keep_fp32:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    attribute.t.CopyFrom(half(attribute.t))

    # Inputs and outputs keep float32: a Cast after each input, one before each output.
    renamed = {}
    casts_in = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            renamed[value.name] = f"{value.name}_fp16"
            casts_in.append(helper.make_node("Cast", [value.name], [renamed[value.name]],
                                             name=f"{value.name}_to_fp16",
                                             to=TensorProto.FLOAT16))
    casts_out = []
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{value.name}_fp16"
            for node in graph.node:
                node.output[:] = [inner if name == value.name else name for name in node.output]
                node.input[:] = [inner if name == value.name else name for name in node.input]
            casts_out.append(helper.make_node("Cast", [inner], [value.name],
                                              name=f"{value.name}_to_fp32",
                                              to=TensorProto.FLOAT))
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float32 annotations of inner tensors are stale now
    return model
