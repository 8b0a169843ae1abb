"""Batch inference over an image archive: Predictor actors on Ray Data, into a results folder.

The driver lists the inputs (runtime.batch.storage), drops those the results folder already
holds (runtime.batch.results), and builds a Ray dataset of the remaining paths. `map_batches`
runs them through an actor pool, one torch-free Predictor (one onnxruntime session) per actor;
an actor opens local paths itself and reads a URI's bytes with pyarrow, decoding both by the
same rules (runtime.images), so no image travels through the driver. Rows come back to the
driver (a path, the top-k and an error per image: small), which writes them as part files,
each whole or not at all, so an interrupted job keeps what it finished and a rerun does the
rest. A bad image is a row with an error, never a failed job. Imports the runtime core and
the batch modules, and Ray and pyarrow inside the functions that need them (the
`[distributed]` extra).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from flowae.runtime.batch.results import (
    FORMATS,
    ResultsFolder,
    error_row,
    result_row,
    results_schema,
)
from flowae.runtime.batch.storage import (
    BatchError,
    is_uri,
    list_inputs,
    open_filesystem,
)
from flowae.runtime.errors import FlowaeError, ImageError, first_line
from flowae.runtime.images import load_rgb_bytes
from flowae.runtime.predictor import DEFAULT_BATCH_SIZE, DEFAULT_JPEG_DRAFT, Predictor
from flowae.runtime.preprocess import ImageSource

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'flowae[distributed]'"
DEFAULT_ROWS_PER_FILE = 1000  # a killed job redoes at most this many images

ProgressFn = Callable[[int, int], None]  # (images done in this run, images to do in this run)


class MissingExtraError(BatchError):
    """Ray Data or pyarrow is not installed: the `[distributed]` extra is missing."""


@dataclass(frozen=True)
class BatchConfig:
    """Everything a batch job needs besides its inputs; defaults are flowae-batch's."""

    out: str  # results folder: a local path or a URI pyarrow can write
    model: str | None = None  # model directory or encoder_classifier file; None: bundled
    format: str = "parquet"  # parquet | jsonl
    actors: int = 1  # Predictor actors (one onnxruntime session each)
    threads: int = 1  # per actor: onnxruntime intra-op threads and decode threads
    batch_size: int = DEFAULT_BATCH_SIZE  # images per model call (and per Ray batch)
    top_k: int = 5
    provider: str = "cpu"
    precision: str = "auto"
    jpeg_draft: bool = DEFAULT_JPEG_DRAFT
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    address: str | None = None  # Ray cluster to join; None: start Ray on this machine

    def check(self) -> None:
        if self.format not in FORMATS:
            raise BatchError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for name in ("actors", "threads", "batch_size", "top_k", "rows_per_file"):
            if getattr(self, name) < 1:
                raise BatchError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class BatchSummary:
    """What a job did: inputs seen, skipped as already done, processed now, failures."""

    out: str
    inputs: int = 0
    skipped: int = 0  # already in the results folder
    processed: int = 0  # rows written by this run
    failed: int = 0  # of those, rows with an error
    failed_before: int = 0  # of the skipped, rows with an error
    files: list[str] = field(default_factory=list)  # part files written by this run
    ray_start_s: float | None = None  # None: Ray was already running in this process

    @property
    def failed_total(self) -> int:
        return self.failed + self.failed_before

    def to_dict(self) -> dict:
        return asdict(self) | {"failed_total": self.failed_total}


class UriPredictor(Predictor):
    """A Predictor that also takes URIs: their bytes are read with pyarrow and decoded by
    runtime.images' rules for a file (load_rgb_bytes), on the Predictor's decode threads, so
    a batch holds its crops, never its decoded images. Errors name the URI."""

    def load(self, source: ImageSource) -> np.ndarray:
        if isinstance(source, str) and is_uri(source):
            source = load_rgb_bytes(read_uri(source), source, draft_px=self.preprocess.resize_px,
                                    jpeg_draft=self.jpeg_draft, max_pixels=self.max_pixels)
        return super().load(source)


class PredictorActor:
    """A Ray Data callable class: one Predictor per actor; a batch of `image` keys in, rows out."""

    def __init__(self, model: str | None, top_k: int, predictor_options: dict):
        self.predictor = UriPredictor(model, **predictor_options)
        self.top_k = top_k

    def __call__(self, batch: dict):
        import pyarrow as pa

        images = [str(image) for image in batch["image"]]
        results = self.predictor.run(images, top_k=self.top_k)
        rows = [result_row(image, result) for image, result in zip(images, results, strict=True)]
        return pa.Table.from_pylist(rows, schema=results_schema())


def read_uri(uri: str) -> bytes:
    """All the bytes of the object at `uri`; ImageError naming it when it cannot be read."""
    from pyarrow import ArrowException

    try:
        filesystem, path = open_filesystem(uri)
        with filesystem.open_input_file(path) as handle:
            return handle.read()
    except (BatchError, ArrowException, OSError) as exc:
        raise ImageError(f"{uri}: cannot read ({first_line(exc)})") from exc


def model_settings(predictor: Predictor, config: BatchConfig) -> dict:
    """What a results folder must agree on across runs: format, top-k and the exact model."""
    digest = hashlib.sha256(predictor.files.encoder_classifier.read_bytes()).hexdigest()
    return {"format": config.format, "top_k": config.top_k, "model_sha256": digest,
            "precision": predictor.files.precision, "jpeg_draft": config.jpeg_draft}


def require_ray():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingExtraError(f"needs Ray Data and pyarrow ({exc.name or exc} is not "
                                f"installed); install them with: {EXTRA_HINT}") from exc
    return ray


def quiet_ray_logging() -> None:
    """For commands: Ray's and Ray Data's notices (token setup, progress bars off, execution
    finished) off the console; their errors still show, and a failed job still raises."""
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def start_ray(address: str | None, num_cpus: int) -> float | None:
    """Join the cluster at `address`, or start Ray here with `num_cpus` CPUs and no dashboard.

    Returns the seconds it took, or None when Ray was already running in this process (then
    the caller keeps it running).
    """
    ray = require_ray()
    if ray.is_initialized():
        return None
    started = time.perf_counter()
    level = max(logging.WARNING, logging.getLogger("ray").level)  # what quiet_ray_logging set
    quiet = {"logging_level": level, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise BatchError(f"cannot start {where} ({first_line(exc)})") from exc
    return time.perf_counter() - started


def run_batch(arguments: Sequence[str | os.PathLike], config: BatchConfig,
              progress: ProgressFn | None = None) -> BatchSummary:
    """Classify every input not yet in `config.out`, writing rows as part files; see the module
    docstring. Starts Ray (and shuts it down again) unless it is already running here."""
    config.check()
    ray = require_ray()
    options = {"provider": config.provider, "threads": config.threads,
               "batch_size": config.batch_size, "precision": config.precision,
               "jpeg_draft": config.jpeg_draft, "decode_workers": config.threads}
    predictor = Predictor(config.model, **options)  # a bad model or provider fails here, once
    num_classes = len(predictor.class_names)
    if config.top_k > num_classes:
        raise BatchError(f"top_k must be at most {num_classes} (the model's classes), "
                         f"got {config.top_k}")
    inputs = list_inputs(arguments)
    folder = ResultsFolder(config.out, config.format)
    done = folder.open(model_settings(predictor, config))
    summary = BatchSummary(out=config.out, inputs=len(inputs))
    argument_errors, images = [], []
    for item in inputs:
        if item.image in done:
            summary.skipped += 1
            summary.failed_before += done[item.image] is not None
        elif item.error is not None:
            argument_errors.append(item)
        else:
            images.append(item.image)
    log.info("%s: %d of %d inputs already done, %d to do", config.out, summary.skipped,
             summary.inputs, len(argument_errors) + len(images))
    if argument_errors:
        _write_rows(folder, summary, [error_row(i.image, i.error) for i in argument_errors])
    if not images:
        return summary
    num_cpus = max(os.cpu_count() or 1, config.actors * config.threads)
    summary.ray_start_s = start_ray(config.address, num_cpus)
    try:
        _run_dataset(ray, images, config, options, folder, summary, progress)
    finally:
        if summary.ray_start_s is not None:
            ray.shutdown()
    return summary


def _run_dataset(ray, images: list[str], config: BatchConfig, options: dict,
                 folder: ResultsFolder, summary: BatchSummary, progress: ProgressFn | None):
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Enough blocks that every actor gets work, few enough that scheduling stays cheap.
    blocks = max(1, min(math.ceil(len(images) / config.batch_size), 10_000))
    dataset = ray.data.from_items([{"image": image} for image in images],
                                  override_num_blocks=blocks)
    results = dataset.map_batches(
        PredictorActor,
        fn_constructor_kwargs={"model": _absolute(config.model), "top_k": config.top_k,
                               "predictor_options": options},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.threads,
    )
    try:
        for table in results.iter_batches(batch_size=config.rows_per_file,
                                          batch_format="pyarrow"):
            _write_rows(folder, summary, table)
            if progress is not None:
                progress(summary.processed, len(images))
    except ray.exceptions.RayError as exc:
        reason = _ray_failure(exc)
        raise BatchError(f"the Ray job failed ({reason}); {summary.processed} results are "
                         f"kept in {config.out}: run again to finish") from exc


def _absolute(model: str | None) -> str | None:
    """A local model path as an absolute one: an actor's working folder is not the driver's."""
    return os.path.abspath(model) if model is not None and not is_uri(model) else model


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (\S.*)$")


def _ray_failure(exc: BaseException) -> str:
    """What went wrong inside Ray's wrappers, in one line: a flowae error if there is one in
    the chain, else the last `SomeError: message` line of a remote traceback Ray quotes (an
    actor's constructor failing arrives only as text), else the first message there is."""
    chain, current = [], exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, FlowaeError):
            return first_line(error)
    quoted = [match for error in chain for line in str(error).splitlines()
              if (match := _ERROR_LINE.match(line))]
    if quoted:
        return f"{quoted[-1].group(1)}: {quoted[-1].group(2)}"
    return next((first_line(error) for error in chain if str(error).strip()), type(exc).__name__)


def _write_rows(folder: ResultsFolder, summary: BatchSummary, rows) -> None:
    import pyarrow as pa

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(
        rows, schema=results_schema())
    summary.files.append(folder.write(table))
    summary.processed += table.num_rows
    summary.failed += table.num_rows - table["error"].null_count
