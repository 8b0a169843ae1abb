"""flowae.export: training runs to self-describing ONNX graphs, proven equal to PyTorch.

`export_model(run_dir_or_checkpoint, out_dir, ExportOptions(...))` writes the contract's
graphs (fp32, and int8/fp16 copies when asked) and a manifest into a model directory that the
torch-free runtime loads. Imports torch, flowae's training modules and the runtime contract;
onnx and onnxruntime.quantization are imported inside the functions that need them.
"""

from flowae.export.pipeline import ExportOptions, export_model

__all__ = ["ExportOptions", "export_model"]
