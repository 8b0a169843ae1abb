"""`flowae-infer`: top-k flower names (or reconstructions) for image files, from the shell.

A thin click wrapper over flowae.runtime.predictor (and runtime.evaluate for --evaluate): it
parses options, builds a Predictor, prints a table or one JSON object per line, and draws a
progress line on stderr. Exit codes: 0 every image worked; 1 some image failed (the rest were
still processed); 2 the command could not run as given (bad or conflicting options, no
usable model). Imports click and the runtime only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from flowae.runtime.contract import PRECISIONS
from flowae.runtime.errors import FlowaeError
from flowae.runtime.predictor import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_JPEG_DRAFT,
    PROVIDERS,
    ImageResult,
    Predictor,
    expand_inputs,
    reconstruction_path,
    run_inputs,
    save_png_atomic,
    side_by_side,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_PROG = "flowae-infer"


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.started = time.perf_counter()
        self.drawn_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.drawn_at < 0.1 and done < total):
            return
        self.drawn_at = now
        width = 30
        filled = width * done // max(total, 1)
        rate = done / max(now - self.started, 1e-9)
        click.echo(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                   f"images, {rate:.0f} images/s", err=True, nl=False)
        if done >= total:
            click.echo("", err=True)


def _fail(message: str, code: int) -> None:
    click.echo(f"{_PROG}: error: {message}", err=True)
    sys.exit(code)


def _json_line(result: ImageResult, saved: Path | None) -> str:
    if not result.ok:
        return json.dumps({"image": result.name, "error": result.error})
    record = {"image": result.name, "top_k": [
        {"label": p.label, "class_name": p.class_name, "probability": round(p.probability, 6)}
        for p in result.top_k
    ]}
    if saved is not None:
        record["reconstruction"] = str(saved)
    return json.dumps(record)


def _table_rows(result: ImageResult, saved: Path | None) -> list[str]:
    rows = [result.name]
    rows += [f"  {rank:>2}  {p.class_name:<28} {100 * p.probability:6.2f}%  (label {p.label})"
             for rank, p in enumerate(result.top_k, start=1)]
    if saved is not None:
        rows.append(f"      reconstruction: {saved}")
    return rows


def _print_evaluation(report: dict) -> None:
    click.echo(f"model {report['model']} ({report['variant']}, {report['precision']}, "
               f"{report['provider']})")
    if "pytorch_test" in report:
        click.echo(f"pytorch test top-1 (from the model's metadata): "
                   f"{report['pytorch_test']['top1']:.2f}%; runtime minus pytorch: "
                   f"{report['runtime_minus_pytorch_top1']:+.2f} points")
    for name in ("test", "fullres"):
        if name not in report:
            continue
        part = report[name]
        for decode in ("full_decode", "draft_decode"):
            acc = part[decode]
            click.echo(f"{name:<8} {decode:<13} images {acc['images']:>5}  failed "
                       f"{acc['failed']:>3}  top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%")
        click.echo(f"{name:<8} draft: top-1 drop {part['draft_top1_drop']:+.2f} points, top-1 "
                   f"changed on {part['draft_top1_changed_pct']:.2f}% of images, "
                   f"{part['draft_reduced_images']} images decoded at reduced size")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1)
@click.option("--model", type=click.Path(path_type=Path),
              help="Model directory from flowae-export, or an encoder_classifier .onnx file "
                   "[default: the model bundled with this install].")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many classes to list per image.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout.")
@click.option("--reconstruct", "reconstruct_dir",
              type=click.Path(file_okay=False, path_type=Path),
              help="Also write input-beside-reconstruction PNGs into this folder.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime has it, else CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads [default: one per core].")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE,
              show_default=True, help="Images per model call.")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto",
              show_default=True, help="Which graph files; auto: the manifest's recommendation.")
@click.option("--jpeg-draft/--no-jpeg-draft", default=DEFAULT_JPEG_DRAFT, show_default=True,
              help="Decode JPEGs at reduced size (faster; not bit-exact with training).")
@click.option("--progress/--no-progress", default=None,
              help="Progress line on stderr [default: when stderr is a terminal].")
@click.option("--evaluate", "data_root", type=click.Path(path_type=Path),
              help="Instead of IMAGEs: test-split top-1/top-5 on this Flowers102 folder, with "
                   "full and reduced-size JPEG decoding.")
@click.option("--fullres", "fullres_root", type=click.Path(path_type=Path),
              help="With --evaluate: also a folder of full-size photos with labels.csv.")
@click.pass_context
def main(ctx: click.Context, images: tuple[str, ...], model: Path | None, top_k: int,
         as_json: bool, reconstruct_dir: Path | None, provider: str, threads: int | None,
         batch_size: int, precision: str, jpeg_draft: bool, progress: bool | None,
         data_root: Path | None, fullres_root: Path | None) -> None:
    """Classify IMAGE files (files, directories of images, or globs) into Oxford 102 flowers."""
    if progress is None:
        progress = sys.stderr.isatty()
    if data_root is not None:
        unused = [f"--{name.replace('_', '-')}" for name in ("top_k", "jpeg_draft")
                  if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        unused += ["IMAGE"] * bool(images) + ["--reconstruct"] * (reconstruct_dir is not None)
        if unused:
            raise click.UsageError(f"--evaluate takes no {', '.join(unused)} (it reports top-1 "
                                   "and top-5 of the test split, with both JPEG decodes)")
        _evaluate(model, data_root, fullres_root, provider, threads, batch_size, precision,
                  as_json, progress)
        return
    if fullres_root is not None:
        raise click.UsageError("--fullres needs --evaluate")
    if not images:
        raise click.UsageError("give at least one IMAGE (a file, a directory or a glob)")
    try:
        predictor = Predictor(model, provider=provider, threads=threads, batch_size=batch_size,
                              precision=precision, jpeg_draft=jpeg_draft)
        items = expand_inputs(images)
        results = run_inputs(predictor, items, top_k=top_k,
                             reconstruct=reconstruct_dir is not None,
                             progress=Progress(_PROG, progress and len(items) > 1))
        failed = _report(results, as_json, reconstruct_dir)
    except FlowaeError as exc:
        _fail(str(exc), EXIT_USAGE)
    except OSError as exc:  # writing --reconstruct files: disk full, no permission
        _fail(f"cannot write: {exc}", EXIT_FAILED)
    if failed:
        click.echo(f"{_PROG}: {failed} of {len(items)} images failed", err=True)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _report(results, as_json: bool, reconstruct_dir: Path | None) -> int:
    """Print each result as it comes; write reconstructions; return how many failed."""
    failed = 0
    taken: set[Path] = set()
    for result in results:
        saved = None
        if result.ok and reconstruct_dir is not None:
            path = reconstruction_path(reconstruct_dir, result.source, taken)
            saved = save_png_atomic(side_by_side(result), path)
        failed += not result.ok
        if as_json:
            click.echo(_json_line(result, saved))
        elif result.ok:
            click.echo("\n".join(_table_rows(result, saved)))
        else:
            click.echo(f"{_PROG}: {result.error}", err=True)
    return failed


def _evaluate(model, data_root, fullres_root, provider, threads, batch_size, precision,
              as_json: bool, progress: bool) -> None:
    from flowae.runtime.evaluate import evaluate

    try:
        report = evaluate(model, data_root, fullres_root, provider=provider, threads=threads,
                          batch_size=batch_size, precision=precision,
                          progress=Progress(f"{_PROG} --evaluate", progress))
    except FlowaeError as exc:
        _fail(str(exc), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print_evaluation(report)
    parts = [report[name] for name in ("test", "fullres") if name in report]
    failed = any(part[d]["failed"] for part in parts for d in ("full_decode", "draft_decode"))
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


if __name__ == "__main__":
    main()
