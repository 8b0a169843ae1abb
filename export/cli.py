"""`flowae-export`: click options -> ExportOptions -> flowae.export.export_model().

Thin by design: parsing, one library call, a summary of the manifest. FlowaeError becomes a
one-line message and exit code 1; a usage error (conflicting options) exits 2. For the fault
tests (tests/export/test_export_faults.py) this entry module, and nothing in the library,
reads two test-only environment variables: FLOWAE_EXPORT_CRASH_AT=<step> kills the process
with SIGKILL when the export reaches that step (see export_model and
flowae.export.install.install for the names), and FLOWAE_EXPORT_SWAP=rename takes the
two-rename swap instead of the atomic exchange. Imports click, onnxruntime (to quiet its C++
log) and flowae.export.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import click
import onnxruntime as ort

from flowae import __version__
from flowae.data import SPLITS
from flowae.export.pipeline import RECOMMEND_CHOICES, RESIZE_AUTO, ExportOptions, export_model
from flowae.runtime.contract import (
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
)
from flowae.runtime.errors import FlowaeError

_D = ExportOptions()  # the defaults live in the dataclass alone


CRASH_AT = "FLOWAE_EXPORT_CRASH_AT"  # test-only: SIGKILL this process at the named step
SWAP = "FLOWAE_EXPORT_SWAP"  # test-only: "rename" forces the two-rename swap


class ResizeType(click.ParamType):
    """A shorter-side size in px (>= 1), or "auto"."""

    name = "PX|auto"

    def convert(self, value, param, ctx):
        if value is None or value == RESIZE_AUTO or isinstance(value, int):
            return value
        try:
            size = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a size in px nor {RESIZE_AUTO!r}", param, ctx)
        if size < 1:
            self.fail(f"{size} is not a size in px (>= 1)", param, ctx)
        return size


def _crash_hook():
    """The on_step hook the fault tests ask for through CRASH_AT, else None."""
    step = os.environ.get(CRASH_AT)
    if not step:
        return None

    def crash(reached: str) -> None:
        if reached == step:
            os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9`: no cleanup of any kind runs

    return crash


def _summary(manifest: dict, out_dir: Path) -> list[str]:
    lines = []
    for name, entry in manifest["files"].items():
        figures = entry.get("parity")
        if figures is None:  # required_operators.config
            lines.append(f"{name:32s} {entry['size_bytes'] / 1e6:6.2f} MB")
            continue
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in figures["max_abs_diff"].items())
        agree = figures.get("top1_agreement_pct")
        agree_text = f", top-1 agreement {agree:.1f}%" if agree is not None else ""
        against = "ort - onnx" if entry.get("format") == "ort" else "onnx - torch"
        lines.append(f"{name:32s} {entry['size_bytes'] / 1e6:6.2f} MB  max |{against}|: "
                     f"{diffs}{agree_text}")
    accuracy = manifest["accuracy"]
    top1 = ", ".join(f"{k} {v:.2f}%" for k, v in accuracy["top1_pct"].items())
    seen = (" (images this model trained on: a parity check, not an accuracy)"
            if accuracy["split"] in manifest.get("trained_on_splits", ("train",)) else "")
    lines.append(f"{accuracy['split']} top-1 on {accuracy['images']} images: {top1}{seen}")
    resize = manifest["resize"]
    if "sweep" in resize:
        tried = ", ".join(f"{row['resize_px']} {row['top1']:.2f}%" for row in resize["sweep"])
        lines.append(f"resize chosen on val top-1: {resize['resize_px']} px (tried {tried})")
    others = ", ".join(f"{family} {precision}" for family, precision
                       in manifest[MANIFEST_RECOMMENDED_BY_PROVIDER].items() if family != "cpu")
    lines.append(f"recommended: {manifest[MANIFEST_RECOMMENDED]} on CPU "
                 f"({manifest['recommended_reason']}); {others} -> {out_dir / MANIFEST_NAME}")
    return lines


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="flowae-export",
                      message="%(prog)s %(version)s")
@click.argument("run", type=click.Path(path_type=Path), metavar="RUN_DIR_OR_CHECKPOINT")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Model directory to write (graphs and manifest.json).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              default=_D.data_root,
              help="Flowers102 runs: folder holding flowers-102/ (parity images).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="Class-folder runs (flowae-train --data): where that data is now; its "
                   "split is the one training recorded.  [default: where training read it]")
@click.option("--opset", type=int, default=_D.opset,
              help="ONNX opset  [default: the exporter's]")
@click.option("--int8", is_flag=True, help="Also write static QDQ int8 graphs.")
@click.option("--fp16", is_flag=True, help="Also write float16 graphs (for GPU providers).")
@click.option("--ort", "ort_format", is_flag=True,
              help="Also write an ORT-format copy of each fp32 and int8 graph and "
                   "required_operators.config (for onnxruntime's minimal and reduced builds).")
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
@click.option("--resize-px", type=ResizeType(), default=_D.resize_px,
              help="Test-time resize of the shorter side before the centre crop, written "
                   "into the metadata the runtime follows; auto: the best val top-1 over "
                   "the input side x 1.00-1.28 (recorded in the manifest)  [default: the "
                   "model's input side]")
@click.option("--test-accuracy", is_flag=True,
              help="Measure PyTorch's test-split top-1/top-5 with the exported preprocessing "
                   "into the metadata (for a final candidate chosen on val).")
@click.pass_context
def main(ctx, run, out_dir, data_root, data_dir, opset, int8, fp16, ort_format, int8_max_drop,
         allow_accuracy_drop, calibration_images, split, max_images, recommend, rewrite_convs,
         resize_px, test_accuracy):
    """Export a flowae run to ONNX graphs proven equal to PyTorch."""
    if data_dir is not None and (ctx.get_parameter_source("data_root")
                                 is not click.core.ParameterSource.DEFAULT):
        raise click.UsageError("--data (a class-folder run's data) and --data-root "
                               "(Flowers102) exclude each other")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    ort.set_default_logger_severity(3)  # errors only: its warnings are about its own fusions
    options = ExportOptions(
        data_root=data_root, data=data_dir, opset=opset, int8=int8, fp16=fp16,
        int8_max_drop_points=int8_max_drop, allow_accuracy_drop=allow_accuracy_drop,
        calibration_images=calibration_images, split=split, max_images=max_images,
        recommend=recommend, rewrite_convs=rewrite_convs, resize_px=resize_px,
        test_accuracy=test_accuracy, ort_format=ort_format,
        atomic_exchange=os.environ.get(SWAP) != "rename",
    )
    try:
        manifest = export_model(run, out_dir, options, on_step=_crash_hook())
    except FlowaeError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    for line in _summary(manifest, out_dir):
        click.echo(line)
