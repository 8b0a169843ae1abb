"""`flowae-infer`: top-k flower names (or reconstructions) for image files, from the shell.

A thin click wrapper over flowae.runtime.predictor (and runtime.evaluate for --evaluate): it
expands file, directory and glob arguments, builds a Predictor, prints a table or one JSON
object per line, writes reconstruction PNGs without ever replacing a file, and draws a
progress line on stderr. Every message for the user is one line on stderr, library warnings
included. Exit codes: 0 every image worked; 1 some image failed (the rest were still
processed); 2 the command could not run as given (bad or conflicting options, no usable
model). Imports click, Pillow and the runtime only.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click
from PIL import Image

from flowae.runtime import __version__
from flowae.runtime.contract import PRECISIONS
from flowae.runtime.errors import FlowaeError
from flowae.runtime.files import write_atomic
from flowae.runtime.images import DEFAULT_MAX_PIXELS
from flowae.runtime.predictor import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_JPEG_DRAFT,
    DEFAULT_PROVIDERS,
    MAX_BATCH_SIZE,
    MAX_THREADS,
    ImageResult,
    Predictor,
    ProgressFn,
)
from flowae.runtime.preprocess import ImageSource
from flowae.runtime.session import parse_providers

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_TOP_K = 5
_PROG = "flowae-infer"
RECONSTRUCTION_SUFFIX = ".recon.png"  # OUT_DIR/<stem>.recon.png, then <stem>.recon-2.png, ...


# Command-line style inputs: files, directories and globs, each image or a one-line error.
def _image_suffixes() -> set[str]:
    return {suffix.lower() for suffix in Image.registered_extensions()}


def expand_inputs(arguments: Iterable[str | os.PathLike]) -> list[Path | ImageResult]:
    """Each argument as image paths (a directory: the images inside, sorted; a glob: its
    matches, sorted), or an ImageResult error for an argument that names no image at all.
    A path that does not exist is kept, so that reading it reports 'no such file'."""
    suffixes = _image_suffixes()
    items: list[Path | ImageResult] = []
    for argument in arguments:
        if not os.fspath(argument):  # Path("") is ".", which would classify the whole folder
            items.append(ImageResult("", error="an empty argument names no image"))
            continue
        path = Path(argument)
        if path.is_dir():
            try:
                found = sorted(p for p in path.iterdir() if p.is_file()
                               and p.suffix.lower() in suffixes and not p.name.startswith("."))
            except OSError as exc:  # e.g. no permission to list it
                items.append(ImageResult(os.fspath(argument), error=f"{path}: cannot list "
                                         f"this directory ({exc.strerror or exc})"))
                continue
            items.extend(found or [ImageResult(os.fspath(argument),
                                               error=f"{path}: directory holds no images")])
        elif not path.exists() and glob.has_magic(os.fspath(argument)):
            matches = sorted(glob.glob(os.fspath(argument), recursive=True))
            found = [Path(m) for m in matches if not Path(m).is_dir()]
            items.extend(found or [ImageResult(os.fspath(argument),
                                               error=f"{argument}: no file matches")])
        else:
            items.append(path)
    return items


def run_inputs(
    predictor: Predictor, items: Sequence[Path | ImageResult], *, top_k: int = 5,
    reconstruct: bool = False, progress: ProgressFn | None = None,
) -> Iterator[ImageResult]:
    """Results for `expand_inputs`'s items, in order: argument errors pass straight through."""
    total = len(items)
    done_before = 0

    def offset_progress(done: int, _: int) -> None:
        if progress is not None:
            progress(done_before + done, total)

    start = 0
    while start < total:
        if isinstance(items[start], ImageResult):
            yield items[start]
            start += 1
            done_before = start
            continue
        stop = start
        while stop < total and not isinstance(items[stop], ImageResult):
            stop += 1
        yield from predictor.run(items[start:stop], top_k=top_k, reconstruct=reconstruct,
                                 progress=offset_progress)
        start = done_before = stop


def side_by_side(result: ImageResult) -> Image.Image:
    """The model's input crop beside its reconstruction, one RGB image (2S x S)."""
    left, right = result.model_input, result.reconstruction
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def reconstruction_name(stem: str, number: int) -> str:
    """<stem>.recon.png for the first, <stem>.recon-<number>.png after it."""
    if number == 1:
        return f"{stem}{RECONSTRUCTION_SUFFIX}"
    return f"{stem}{RECONSTRUCTION_SUFFIX.removesuffix('.png')}-{number}.png"


def save_reconstruction(image: Image.Image, out_dir: Path, source: ImageSource,
                        inputs: set[str]) -> Path:
    """Write `image` as OUT_DIR/<stem>.recon.png, or the first <stem>.recon-N.png (N = 2, 3,
    ...) that names nothing yet and no input of this run (`inputs`: their real paths).

    The file is created, never replaced: a file that appears under the chosen name meanwhile
    sends it on to the next number. A directory under a candidate name is an error (OSError).
    """
    stem = Path(source).stem if isinstance(source, str | os.PathLike) else "image"
    number = 0
    while True:
        number += 1
        path = out_dir / reconstruction_name(stem, number)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: a directory has this name; reconstruction "
                                    "not written")
        if os.path.lexists(path) or os.path.realpath(path) in inputs:
            continue
        try:
            return write_atomic(path, lambda handle: image.save(handle, format="PNG"),
                                replace=False)
        except FileExistsError:
            continue


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


def _printable(text: str) -> str:
    """`text` with control characters escaped (a file name may hold a newline or a terminal
    escape sequence; neither may split a message or reach the terminal raw)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _one_line(text: str) -> str:
    return _printable(str(text).strip())


def fail(prog: str, message: str, code: int) -> NoReturn:
    """`PROG: error: <the message's first line>` on stderr, then exit with `code`."""
    click.echo(f"{prog}: error: {_one_line(message)}", err=True)
    sys.exit(code)


def _fail(message: str, code: int) -> NoReturn:
    fail(_PROG, message, code)


class _OneLineHandler(logging.Handler):
    """Library log records as `flowae-infer: warning: ...`, one line each, on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"{_PROG}: {record.levelname.lower()}: {_one_line(record.getMessage())}",
                       err=True)
        except Exception:  # logging's rule: a broken handler must not break the program
            self.handleError(record)


@contextmanager
def _user_logging(verbose: bool) -> Iterator[None]:
    """Show flowae's warnings (and with --verbose its info lines) for one command, then put
    the logger back as it was (tests run many commands in one process)."""
    logger = logging.getLogger("flowae")
    handler, saved_level = _OneLineHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


def _quiet_broken_pipe() -> None:
    """stdout's reader went away (`flowae-infer ... | head`): point stdout at /dev/null so
    the interpreter's last flush does not fail too, as Python's signal docs recommend."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (CliRunner)
        pass


class OneLineCommand(click.Command):
    """click.Command whose usage errors are one line (`NAME: error: ...`, exit 2) instead
    of click's usage block, an interrupt is one line too (`on_abort`, exit 1), and a closed
    stdout pipe ends the run quietly. NAME is the command's name, so give the program's:
    `@click.command("flowae-infer", cls=OneLineCommand)`."""

    def __init__(self, *args, on_abort: str = "aborted", **kwargs):
        super().__init__(*args, **kwargs)
        self.on_abort = on_abort

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            fail(self.name, f"{exc.format_message()} (see {self.name} -h)", exc.exit_code)
        except click.Abort:
            fail(self.name, self.on_abort, EXIT_FAILED)
        except BrokenPipeError:
            _quiet_broken_pipe()
            sys.exit(EXIT_FAILED)


def _providers_option(ctx, param, value: str) -> str:
    try:
        parse_providers(value)
    except FlowaeError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


def _provider_options_option(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for value in values:
        key, sep, setting = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}")
        options[key.strip()] = setting
    return options


def _json_line(result: ImageResult, saved: Path | None, error: str | None,
               provider: str) -> str:
    record = result.to_dict()
    if result.ok:
        record["provider"] = provider
    if saved is not None:
        record["reconstruction"] = str(saved)
    if error is not None:
        record["error"] = error
    return json.dumps(record)


def _table_rows(result: ImageResult, saved: Path | None) -> list[str]:
    rows = [_printable(result.name)]
    rows += [f"  {rank:>2}  {_printable(p.class_name):<28} {100 * p.probability:6.2f}%  "
             f"(label {p.label})" for rank, p in enumerate(result.top_k, start=1)]
    if saved is not None:
        rows.append(f"      reconstruction: {_printable(saved)}")
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


def _describe(info: dict) -> str:
    threads = info["threads"] or "one per core"
    return (f"{_PROG}: model {info['model_dir']} ({info['variant']}, {info['precision']}) "
            f"served by {info['provider']} (asked {','.join(info['providers_asked'])}), "
            f"threads {threads}, batch {info['batch_size']}, onnxruntime "
            f"{info['onnxruntime']}, flowae {info['flowae']}")


@click.command(_PROG, cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name=_PROG,
                      message="%(prog)s %(version)s")
@click.argument("images", nargs=-1)
@click.option("--model", type=click.Path(path_type=Path),
              help="Model directory from flowae-export, or an encoder_classifier .onnx file "
                   "[default: the model bundled with this install].")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="How many classes to list per image [default: 5, or every class of a model "
                   "with fewer].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout.")
@click.option("--reconstruct", "reconstruct_dir",
              type=click.Path(file_okay=False, path_type=Path),
              help="Also write input-beside-reconstruction PNGs into this folder, as "
                   "<stem>.recon.png (<stem>.recon-2.png, ... if taken; nothing is replaced).")
@click.option("--provider", "providers", default=DEFAULT_PROVIDERS, show_default=True,
              callback=_providers_option,
              help="onnxruntime providers to try, best first, e.g. tensorrt,cuda,cpu; auto: "
                   "every one this onnxruntime offers.")
@click.option("--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
              callback=_provider_options_option,
              help="An option for the first provider (repeatable), e.g. device_id=1.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help=f"onnxruntime intra-op threads, at most {MAX_THREADS} [default: one per "
                   "core].")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=DEFAULT_BATCH_SIZE,
              show_default=True, help=f"Images per model call, at most {MAX_BATCH_SIZE}.")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto",
              show_default=True,
              help="Which graph files; auto: the manifest's choice for the provider that serves.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS,
              show_default=True, help="Refuse images with more decoded pixels than this.")
@click.option("--jpeg-draft/--no-jpeg-draft", default=DEFAULT_JPEG_DRAFT, show_default=True,
              help="Decode JPEGs at reduced size (faster; not bit-exact with training).")
@click.option("--progress/--no-progress", default=None,
              help="Progress line on stderr [default: when stderr is a terminal].")
@click.option("--verbose", "-v", is_flag=True,
              help="Say on stderr which model, precision and provider serve.")
@click.option("--evaluate", "data_root", type=click.Path(path_type=Path),
              help="Instead of IMAGEs: test-split top-1/top-5 on this Flowers102 folder, with "
                   "full and reduced-size JPEG decoding.")
@click.option("--fullres", "fullres_root", type=click.Path(path_type=Path),
              help="With --evaluate: also a folder of full-size photos with labels.csv.")
@click.pass_context
def main(ctx: click.Context, images: tuple[str, ...], model: Path | None, top_k: int | None,
         as_json: bool, reconstruct_dir: Path | None, providers: str,
         provider_options: dict[str, str], threads: int | None, batch_size: int,
         precision: str, max_pixels: int | None, jpeg_draft: bool, progress: bool | None,
         verbose: bool, data_root: Path | None, fullres_root: Path | None) -> None:
    """Classify IMAGE files (files, directories of images, or globs) into the model's classes
    (the bundled model: Oxford 102 flowers)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if data_root is not None:
        unused = [f"--{name.replace('_', '-')}" for name in
                  ("top_k", "jpeg_draft", "max_pixels", "provider_options")
                  if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        unused += ["IMAGE"] * bool(images) + ["--reconstruct"] * (reconstruct_dir is not None)
        if unused:
            raise click.UsageError(f"--evaluate takes no {', '.join(unused)} (it reports top-1 "
                                   "and top-5 of the test split, with both JPEG decodes)")
        with _user_logging(verbose):
            _evaluate(model, data_root, fullres_root, providers, threads, batch_size,
                      precision, as_json, progress)
        return
    if fullres_root is not None:
        raise click.UsageError("--fullres needs --evaluate")
    if not images:
        raise click.UsageError("give at least one IMAGE (a file, a directory or a glob)")
    with _user_logging(verbose):
        try:
            predictor = Predictor(model, providers=providers,
                                  provider_options=provider_options or None, threads=threads,
                                  batch_size=batch_size, precision=precision,
                                  jpeg_draft=jpeg_draft, max_pixels=max_pixels)
            if verbose:
                click.echo(_describe(predictor.info), err=True)
            if reconstruct_dir is not None:
                _make_folder(reconstruct_dir)
            items = expand_inputs(images)
            if top_k is None:
                top_k = min(DEFAULT_TOP_K, len(predictor.class_names))
            results = run_inputs(predictor, items, top_k=top_k,
                                 reconstruct=reconstruct_dir is not None,
                                 progress=Progress(_PROG, progress and len(items) > 1))
            failed = _report(results, as_json, reconstruct_dir, items,
                             predictor.info["provider"])
        except FlowaeError as exc:
            _fail(str(exc), EXIT_USAGE)
        except BrokenPipeError:  # the reader of stdout left (`| head`): stop, quietly
            _quiet_broken_pipe()
            sys.exit(EXIT_FAILED)
        except OSError as exc:  # stdout itself cannot be written (e.g. a full disk)
            _fail(f"cannot write the results ({exc.strerror or exc})", EXIT_FAILED)
    if failed:
        click.echo(f"{_PROG}: {failed} of {len(items)} images failed", err=True)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"{path}: cannot create the --reconstruct folder ({exc.strerror or exc})",
              EXIT_USAGE)


def _report(results, as_json: bool, reconstruct_dir: Path | None,
            items: Sequence[Path | ImageResult], provider: str) -> int:
    """Print each result as it comes; write reconstructions; return how many failed."""
    failed = 0
    inputs = {os.path.realpath(item) for item in items if isinstance(item, Path)}
    for result in results:
        saved = error = None
        if result.ok and reconstruct_dir is not None:
            try:
                saved = save_reconstruction(side_by_side(result), reconstruct_dir,
                                            result.source, inputs)
            except BrokenPipeError:
                raise
            except OSError as exc:  # a directory in the way, no permission, disk full
                error = (str(exc) if isinstance(exc, IsADirectoryError) else
                         f"{result.name}: cannot write its reconstruction "
                         f"({exc.strerror or exc})")
        failed += not result.ok or error is not None
        if as_json:
            click.echo(_json_line(result, saved, error, provider))
        elif result.ok:
            click.echo("\n".join(_table_rows(result, saved)))
        if not as_json and (error or result.error):
            click.echo(f"{_PROG}: {_one_line(error or result.error)}", err=True)
    return failed


def _evaluate(model, data_root, fullres_root, providers, threads, batch_size, precision,
              as_json: bool, progress: bool) -> None:
    from flowae.runtime.evaluate import evaluate

    try:
        report = evaluate(model, data_root, fullres_root, provider=providers, threads=threads,
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
