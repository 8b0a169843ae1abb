"""flowae's benchmark scripts: speed and accuracy of each deployment format, as tables.

Run from the repository root as `python -m benchmarks.<name> --help` (latency, end_to_end,
cold_start, accuracy). Each script writes JSON, a Markdown table and, where it applies, a PNG
plot into its --out folder. Benchmarks may import everything (flowae, flowae.export, the
runtime, torch, onnxruntime); nothing imports benchmarks.
"""
