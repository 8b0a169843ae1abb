"""`flowae-export`: click options -> ExportOptions -> flowae.export.export_model().

Thin by design: parsing, one library call, a summary of the manifest. FlowaeError becomes a
one-line message and exit code 1. Imports click, onnxruntime (to quiet its C++ log) and
flowae.export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import onnxruntime as ort

from flowae.data import SPLITS
from flowae.export.pipeline import RECOMMEND_CHOICES, ExportOptions, export_model
from flowae.runtime.contract import MANIFEST_NAME, MANIFEST_RECOMMENDED
from flowae.runtime.errors import FlowaeError

_D = ExportOptions()  # the defaults live in the dataclass alone


def _summary(manifest: dict, out_dir: Path) -> list[str]:
    lines = []
    for name, entry in manifest["files"].items():
        figures = entry["parity"]
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in figures["max_abs_diff"].items())
        agree = figures.get("top1_agreement_pct")
        agree_text = f", top-1 agreement {agree:.1f}%" if agree is not None else ""
        lines.append(f"{name:32s} {entry['size_bytes'] / 1e6:6.2f} MB  max |onnx - torch|: "
                     f"{diffs}{agree_text}")
    accuracy = manifest["accuracy"]
    top1 = ", ".join(f"{k} {v:.2f}%" for k, v in accuracy["top1_pct"].items())
    lines.append(f"{accuracy['split']} top-1 on {accuracy['images']} images: {top1}")
    lines.append(f"recommended: {manifest[MANIFEST_RECOMMENDED]} "
                 f"({manifest['recommended_reason']}) -> {out_dir / MANIFEST_NAME}")
    return lines


@click.command(context_settings={"show_default": True})
@click.argument("run", type=click.Path(path_type=Path), metavar="RUN_DIR_OR_CHECKPOINT")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Model directory to write (graphs and manifest.json).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              default=_D.data_root, help="Folder holding flowers-102/ (parity images).")
@click.option("--opset", type=int, default=_D.opset,
              help="ONNX opset  [default: the exporter's]")
@click.option("--int8", is_flag=True, help="Also write static QDQ int8 graphs.")
@click.option("--fp16", is_flag=True, help="Also write float16 graphs (for GPU providers).")
@click.option("--int8-max-drop", type=float, default=_D.int8_max_drop_points,
              help="Most top-1 points (on --split) int8 may lose against fp32; negative: "
                   "int8 must gain that many.")
@click.option("--allow-accuracy-drop", is_flag=True,
              help="Keep an int8 export that loses more (auto never recommends it then).")
@click.option("--calibration-images", type=click.IntRange(min=1),
              default=_D.calibration_images, help="Training images that calibrate int8.")
@click.option("--split", type=click.Choice(SPLITS), default=_D.split,
              help="Split whose images the parity gate and accuracy figures use.")
@click.option("--max-images", type=click.IntRange(min=1), default=_D.max_images,
              help="Use only the split's first N images  [default: all]")
@click.option("--recommend", type=click.Choice(RECOMMEND_CHOICES), default=_D.recommend,
              help="Precision the runtime serves by default (auto: fastest that keeps "
                   "accuracy).")
@click.option("--rewrite-convs/--no-rewrite-convs", default=_D.rewrite_convs,
              help="Exact convolution rewrite for onnxruntime's CPU kernels.")
@click.option("--resize-px", type=click.IntRange(min=1), default=_D.resize_px,
              help="Test-time resize of the shorter side before the centre crop, written "
                   "into the metadata the runtime follows; choose it on val with `python -m "
                   "benchmarks.resize RUN`  [default: the model's input side]")
@click.option("--test-accuracy", is_flag=True,
              help="Measure PyTorch's test-split top-1/top-5 with the exported preprocessing "
                   "into the metadata (for a final candidate chosen on val).")
def main(run, out_dir, data_root, opset, int8, fp16, int8_max_drop, allow_accuracy_drop,
         calibration_images, split, max_images, recommend, rewrite_convs, resize_px,
         test_accuracy):
    """Export a flowae run to ONNX graphs proven equal to PyTorch."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    ort.set_default_logger_severity(3)  # errors only: its warnings are about its own fusions
    options = ExportOptions(
        data_root=data_root, opset=opset, int8=int8, fp16=fp16,
        int8_max_drop_points=int8_max_drop, allow_accuracy_drop=allow_accuracy_drop,
        calibration_images=calibration_images, split=split, max_images=max_images,
        recommend=recommend, rewrite_convs=rewrite_convs, resize_px=resize_px,
        test_accuracy=test_accuracy,
    )
    try:
        manifest = export_model(run, out_dir, options)
    except FlowaeError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    for line in _summary(manifest, out_dir):
        click.echo(line)
