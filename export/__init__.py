"""flowae.export: training runs to self-describing ONNX graphs, proven equal to PyTorch.

`export_model(run_dir_or_checkpoint, out_dir, ExportOptions(...))` writes the contract's
graphs (fp32, and int8/fp16 copies and ORT-format files when asked) and a manifest into a
model directory that the torch-free runtime loads, replacing any older one whole. One module
a step: onnx_export (trace, check, label), convs (CPU rewrite), parity, quantize (int8,
fp16), ort_format, resize (test-time resize chosen on val), install (the directory swap);
pipeline orders them and cli is `flowae-export`. Imports torch, flowae's training modules and
the runtime; onnx and onnxruntime's tools are imported inside the functions that need them.
"""

from flowae.export.pipeline import ExportOptions, export_model

__all__ = ["ExportOptions", "export_model"]
