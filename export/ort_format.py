"""ORT-format copies of the exported graphs, for onnxruntime's minimal and reduced builds.

`write_ort` runs onnxruntime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`,
fixed optimisation style, without the machine-specific NCHWc layout, as the converter does by
default) on a folder of ONNX graphs. Each `NAME.onnx` gets a `NAME.ort` beside it (the names
`graph_file(role, precision, "ort")` gives), and one `required_operators.config` lists the
operators of all of them, the input of a reduced onnxruntime build. The ORT format keeps the
model's metadata_props, so the runtime reads the same contract metadata from either file.
Imports the runtime's errors; onnxruntime's tools inside the function.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

from flowae.runtime.errors import ExportError

log = logging.getLogger(__name__)

ORT_OPERATORS_CONFIG = "required_operators.config"  # the converter's name for the ops list


def write_ort(onnx_paths: list[Path], out_dir: Path, work_dir: Path) -> tuple[list[Path], Path]:
    """Convert `onnx_paths` to ORT format into `out_dir`; return (ORT files, operators config).

    The conversion runs in `work_dir/ort` (copies of the graphs, nothing else), which is
    removed afterwards; only the finished files are moved into `out_dir`.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    scratch = Path(work_dir) / "ort"
    scratch.mkdir()
    try:
        for path in onnx_paths:
            shutil.copyfile(path, scratch / path.name)
        chatter = io.StringIO()  # the converter prints its progress; it goes to the log
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its own handler
        try:
            with contextlib.redirect_stdout(chatter):
                convert_onnx_models_to_ort(scratch, output_dir=scratch,
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:  # the converter raises many types; the message is what matters
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"ORT-format conversion failed: {reason}") from exc
        finally:
            log.debug("%s", chatter.getvalue())
        written = []
        for path in onnx_paths:
            converted = scratch / f"{path.stem}.ort"
            if not converted.is_file():
                raise ExportError(f"ORT-format conversion wrote no {converted.name}")
            written.append(Path(shutil.move(converted, Path(out_dir) / converted.name)))
        config = scratch / ORT_OPERATORS_CONFIG
        if not config.is_file():
            raise ExportError(f"ORT-format conversion wrote no {ORT_OPERATORS_CONFIG}")
        # Its header names the models by their scratch paths; the file names are what holds.
        lines = [f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line
                 for line in config.read_text().splitlines()]
        config.write_text("\n".join(lines) + "\n")
        return written, Path(shutil.move(config, Path(out_dir) / ORT_OPERATORS_CONFIG))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
