"""The reduced-precision copies of an fp32 graph: static int8 (QDQ) and float16.

int8 uses onnxruntime's own tools: `quant_pre_process` (shape inference and basic graph
optimisation), then `quantize_static` in QDQ format with per-channel int8 weights and uint8
activations calibrated (min/max) on real training inputs fed by a small CalibrationDataReader.
float16 uses onnxruntime's converter (`onnxruntime.transformers.float16`): float weights and
activations become float16, inputs and outputs stay float32 behind Cast nodes so callers
feed the same arrays, Resize's scales stay float32. Imports numpy and the runtime's errors;
onnx and onnxruntime's quantization and transformers tools inside the functions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from flowae.runtime.errors import ExportError

log = logging.getLogger(__name__)

# onnxruntime's default block list less the elementwise Max/Min that the folded
# convolution-ReLU-pool rewrite (flowae.export.convs) emits: both have float16 kernels in the
# CPU and CUDA providers, and keeping them float32 would wrap each in a Cast pair.
FP16_ALSO_CONVERT = ("Max", "Min")


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


def fp16_op_block_list() -> list[str]:
    """Op types the float16 conversion leaves in float32 (see FP16_ALSO_CONVERT)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return [op for op in DEFAULT_OP_BLOCK_LIST if op not in FP16_ALSO_CONVERT]


def to_float16(proto):
    """A float16 copy of an fp32 onnx.ModelProto, float32 at its inputs and outputs.

    onnxruntime's own converter (`convert_float_to_float16`, keep_io_types=True) does the
    work; its Cast nodes are appended at the end of the graph, so the nodes are then put back
    in topological order, which onnx's checker requires. The converter runs in place: `proto`
    is copied first and left as it was.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.ModelProto()
    model.CopyFrom(proto)  # the converter edits its argument in place
    # torch's exporter lists initializers in value_info too; the converter would retype such
    # an entry to float16 while leaving a float32-only initializer (Resize's scales) as it is,
    # and the graph would contradict itself. It infers every type again anyway.
    del model.graph.value_info[:]
    try:
        converted = convert_float_to_float16(model, keep_io_types=True,
                                             op_block_list=fp16_op_block_list())
    except Exception as exc:  # the converter raises many types; the message is what matters
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"float16 conversion failed: {reason}") from exc
    OnnxModel(converted).topological_sort()
    return converted
