"""flowae's benchmark scripts: speed and accuracy of each deployment format, as tables.

Run from the repository root as `python -m benchmarks.<name> --help`. Each script writes JSON,
a Markdown table and, where it applies, a PNG plot into its --out folder. The scripts share
machine.py (the report header), timing.py, report.py (tables and writers), sources.py (the
models a benchmark runs) and options.py. Benchmarks may import everything (flowae,
flowae.export, the runtime, torch, onnxruntime); the package never imports benchmarks.
"""
