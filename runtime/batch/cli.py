"""`flowae-batch`: classify an image archive on Ray Data into a resumable results folder.

A thin click wrapper over runtime.batch.pipeline: it parses options, reads RAY_ADDRESS (here
only, as --address's default), runs one job and prints a one-line summary. Exit codes: 0 every
image worked; 1 some image failed (the rest were still processed, each failure is a row with
its error); 2 the command could not run as given (bad options, no usable model, a results
folder of other settings, the `[distributed]` extra missing).

Why a command of its own and not `flowae-infer --engine ray`: the two differ in kind, not in
engine. flowae-infer streams answers to stdout for a person or a pipe, with a table or JSON
lines, reconstructions and evaluation; a batch job writes a results folder, resumes it, joins
a cluster and places actors, so every option of one would be meaningless in the other, and a
missing extra could only fail after flowae-infer's options were accepted. A separate command
also keeps the device install's CLI free of Ray's names. Imports click, the runtime and the
pipeline (which imports Ray only when a job runs).
"""

from __future__ import annotations

import json
import sys

import click

from flowae.runtime import __version__
from flowae.runtime.batch.pipeline import (
    DEFAULT_ROWS_PER_FILE,
    BatchConfig,
    BatchSummary,
    quiet_ray_logging,
    require_ray,
    run_batch,
)
from flowae.runtime.batch.results import FORMATS
from flowae.runtime.cli import OneLineCommand, Progress, fail
from flowae.runtime.contract import PRECISIONS
from flowae.runtime.errors import FlowaeError
from flowae.runtime.predictor import DEFAULT_BATCH_SIZE, DEFAULT_JPEG_DRAFT

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_PROG = "flowae-batch"


def _summary_line(summary: BatchSummary) -> str:
    line = (f"{summary.inputs} inputs: {summary.processed} processed now "
            f"({summary.failed} failed), {summary.skipped} already in {summary.out}")
    if summary.failed_before:
        line += f" ({summary.failed_before} of them failed)"
    return line + f"; {len(summary.files)} files written"


@click.command(_PROG, cls=OneLineCommand,
               on_abort="interrupted; run the same command again to finish",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("sources", nargs=-1, metavar="SOURCE...")
@click.option("--out", required=True, metavar="RESULTS",
              help="Results folder (local path or URI such as s3://bucket/results). A rerun "
                   "with the same folder skips the images already in it.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="parquet",
              show_default=True, help="Part files as Parquet or JSON lines.")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="Predictor actors (one onnxruntime session each).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Per actor: CPUs reserved, onnxruntime threads and decode threads.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE,
              show_default=True, help="Images per model call.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes kept per image.")
@click.option("--model", help="Model directory from flowae-export, or an encoder_classifier "
                               ".onnx file, at the same path on every node [default: bundled].")
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime provider(s) of each actor, as flowae-infer takes them.")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto",
              show_default=True, help="Which graph files; auto: the manifest's recommendation.")
@click.option("--jpeg-draft/--no-jpeg-draft", default=DEFAULT_JPEG_DRAFT, show_default=True,
              help="Decode JPEGs at reduced size (faster; as flowae-infer does by default).")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=DEFAULT_ROWS_PER_FILE,
              show_default=True, help="Rows per part file: at most this many images are redone "
                                      "after a killed job.")
@click.option("--address", envvar="RAY_ADDRESS", show_envvar=True,
              help="Ray cluster to join ('auto', HOST:PORT or ray://HOST:10001) [default: "
                   "start Ray on this machine].")
@click.option("--progress/--no-progress", default=None,
              help="Progress line on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as one JSON object instead of a sentence.")
@click.version_option(__version__, "--version", prog_name=_PROG,
                      message="%(prog)s %(version)s")
def main(sources: tuple[str, ...], out: str, fmt: str, actors: int, threads: int,
         batch_size: int, top_k: int, model: str | None, provider: str, precision: str,
         jpeg_draft: bool, rows_per_file: int, address: str | None, progress: bool | None,
         as_json: bool) -> None:
    """Classify every image of SOURCE... (files, folders, globs or URIs) on Ray Data, writing
    one row per image (path, top-k labels, class names, probabilities, error) into RESULTS."""
    if not sources:
        raise click.UsageError("give at least one SOURCE (a file, folder, glob or URI)")
    if progress is None:
        progress = sys.stderr.isatty()
    config = BatchConfig(out=out, model=model, format=fmt, actors=actors, threads=threads,
                         batch_size=batch_size, top_k=top_k, provider=provider,
                         precision=precision, jpeg_draft=jpeg_draft, rows_per_file=rows_per_file,
                         address=address or None)
    try:
        require_ray()
        quiet_ray_logging()
        summary = run_batch(sources, config, progress=Progress(_PROG, progress))
    except FlowaeError as exc:
        fail(_PROG, str(exc), EXIT_USAGE)
    click.echo(json.dumps(summary.to_dict()) if as_json else f"{_PROG}: {_summary_line(summary)}")
    sys.exit(EXIT_FAILED if summary.failed_total else EXIT_OK)


if __name__ == "__main__":
    main()
