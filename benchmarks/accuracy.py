"""Accuracy and speed per deployment format, Ultralytics-style, on the Flowers102 test split.

Format | Status | Size (MB) | top-1 | top-5 | ms/image | images/s | speed-up vs eager, for PyTorch
eager and each ONNX file flowae-export wrote (fp32 and int8 on onnxruntime's CPU provider;
fp16 and fp32 on its CUDA provider, and PyTorch on CUDA, shown as skipped without a CUDA
device). Every row sees the very same float32 inputs: each test image is decoded and
preprocessed once, by the runtime's own preprocessing (full JPEG decode, the model's
metadata rule), before anything is timed. ms/image and images/s are model-only, over the
whole split at --batch-size after a warm-up batch. A format that cannot run is a row that
says why. Writes accuracy.json, accuracy.md and accuracy.png (top-1 against ms/image) into
--out. Imports torch, onnxruntime, flowae, flowae.export and the runtime; nothing imports it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np

from benchmarks.machine import (
    NO_CUDA,
    device_label,
    machine_header,
    ort_cuda_available,
    torch_cuda_available,
    usable_cores,
)
from benchmarks.options import DEFAULT_DATA_ROOT, DEFAULT_OUT, BenchmarkError
from benchmarks.report import Column, Section, echo_paths, failed, write_report
from benchmarks.sources import ModelSource, file_mb, prepare_sources, weights_mb
from benchmarks.timing import gc_paused, ratio
from flowae.runtime.contract import (
    MANIFEST_NAME,
    ROLE_ENCODER_CLASSIFIER,
    Preprocess,
    graph_file,
)
from flowae.runtime.errors import FlowaeError

NAME = "accuracy"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class AccuracyConfig:
    """Every default of an accuracy run; QUICK is the smoke-test size."""

    split: str = "test"  # the report's split: 6149 images
    limit: int | None = None  # use the split's first N images only
    batch_size: int = 64  # images per model call
    threads: int | None = None  # CPU threads (torch and onnxruntime); None: usable cores
    warmup_batches: int = 2  # untimed calls on the first batch before timing the split


QUICK = AccuracyConfig(limit=64, batch_size=16, warmup_batches=1)


@dataclass(frozen=True)
class Format:
    """One row of the table: how the model runs."""

    name: str  # as the table shows it
    engine: str  # "torch" or "ort"
    precision: str  # fp32, int8, fp16
    device: str  # cpu or cuda


FORMATS = (
    Format("PyTorch eager (CPU)", "torch", "fp32", "cpu"),
    Format("ONNX fp32 (onnxruntime CPU)", "ort", "fp32", "cpu"),
    Format("ONNX int8 (onnxruntime CPU)", "ort", "int8", "cpu"),
    Format("PyTorch eager (CUDA)", "torch", "fp32", "cuda"),
    Format("ONNX fp32 (onnxruntime CUDA)", "ort", "fp32", "cuda"),
    Format("ONNX fp16 (onnxruntime CUDA)", "ort", "fp16", "cuda"),
)

Logits = Callable[[np.ndarray], np.ndarray]  # float32 (B, 3, S, S) -> (B, classes)


# ----------------------------------------------------------------------------- inputs
def preprocess_rule(source: ModelSource) -> Preprocess:
    """The rule the runtime applies: the ONNX metadata's, else the checkpoint's config."""
    if source.model_dir is not None:
        from flowae.runtime.predictor import load_graph

        path = source.model_dir / graph_file(ROLE_ENCODER_CLASSIFIER)
        return load_graph(path, ROLE_ENCODER_CLASSIFIER, "CPUExecutionProvider", 1
                          ).metadata.preprocess
    from flowae.checkpoint import load_checkpoint
    from flowae.config import ModelConfig
    from flowae.data import preprocess_for

    return preprocess_for(ModelConfig.from_dict(load_checkpoint(source.checkpoint)["model_config"]))


def load_inputs(data_root: Path, split: str, spec: Preprocess, limit: int | None,
                workers: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(float32 (N, 3, S, S), int64 labels (N,), seconds): the runtime's preprocessing, once."""
    from flowae.runtime.datasets import flowers102_split
    from flowae.runtime.preprocess import load_pixels, normalize

    paths, labels = flowers102_split(Path(data_root), split)
    paths, labels = paths[:limit], labels[:limit]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:  # Pillow decodes without the GIL
        pixels = list(pool.map(lambda path: load_pixels(path, spec, jpeg_draft=False), paths))
    images = normalize(np.stack(pixels), spec)  # (N, 3, S, S)
    return np.ascontiguousarray(images), np.asarray(labels), time.perf_counter() - start


# ----------------------------------------------------------------------------- runners
def torch_logits(checkpoint: Path, device: str, threads: int | None) -> Logits:
    import torch

    from flowae.checkpoint import load_checkpoint, model_from_checkpoint

    if threads is not None:
        torch.set_num_threads(threads)
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(device)
    target = torch.device(device)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits, _ = model(torch.from_numpy(batch).to(target))
        return logits.cpu().numpy()

    return run


def ort_logits(path: Path, provider: str, threads: int | None) -> Logits:
    from flowae.runtime.contract import GRAPH_IO, OUTPUT_LOGITS
    from flowae.runtime.predictor import load_graph

    session = load_graph(path, ROLE_ENCODER_CLASSIFIER, provider, threads).session
    if provider not in session.get_providers():
        raise FlowaeError(f"onnxruntime did not start {provider} for {path.name}")
    (input_name,), _ = GRAPH_IO[ROLE_ENCODER_CLASSIFIER]
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32

    def run(batch: np.ndarray) -> np.ndarray:
        (logits,) = session.run([OUTPUT_LOGITS], {input_name: batch.astype(dtype, copy=False)})
        return np.asarray(logits, dtype=np.float32)

    return run


def plan_row(fmt: Format, source: ModelSource, threads: int | None
             ) -> tuple[dict, Callable[[], Logits] | None]:
    row = {"format": fmt.name, "engine": fmt.engine, "precision": fmt.precision,
           "device": fmt.device, "device_name": device_label(fmt.device),
           "status": "ok", "file": None, "size_mb": None}
    if fmt.engine == "torch":
        if fmt.device == "cuda" and not torch_cuda_available():
            row["status"] = NO_CUDA
            return row, None
        if source.checkpoint is None:
            row["status"] = "skipped: no checkpoint (give --run)"
            return row, None
        row["file"] = str(source.checkpoint)
        row["size_mb"] = weights_mb(source.checkpoint, ROLE_ENCODER_CLASSIFIER)
        return row, lambda: torch_logits(source.checkpoint, fmt.device, threads)
    if fmt.device == "cuda" and not ort_cuda_available():
        row["status"] = (NO_CUDA if not torch_cuda_available() else
                         "skipped: onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)")
        return row, None
    if source.model_dir is None:
        row["status"] = f"failed: {source.onnx_error or 'no ONNX files'}"
        return row, None
    path = source.model_dir / graph_file(ROLE_ENCODER_CLASSIFIER, fmt.precision)
    if not path.is_file():
        row["status"] = f"skipped: export wrote no {path.name}"
        return row, None
    provider = "CUDAExecutionProvider" if fmt.device == "cuda" else "CPUExecutionProvider"
    row["file"], row["size_mb"] = str(path), file_mb(path)
    return row, lambda: ort_logits(path, provider, threads)


def evaluate(create: Callable[[], Logits], images: np.ndarray, labels: np.ndarray,
             config: AccuracyConfig) -> tuple[dict, np.ndarray]:
    """Accuracy and model-only speed over the whole split; and the predicted top-1 labels."""
    start = time.perf_counter()
    run = create()
    result = {"create_ms": (time.perf_counter() - start) * 1e3}
    batches = [np.ascontiguousarray(images[i : i + config.batch_size])
               for i in range(0, len(images), config.batch_size)]  # built before timing
    for _ in range(config.warmup_batches):
        run(batches[0])
    outputs, seconds = [], 0.0
    with gc_paused():
        for batch in batches:
            tick = time.perf_counter()
            outputs.append(run(batch))
            seconds += time.perf_counter() - tick
    logits = np.concatenate(outputs)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    result.update({
        "images": int(len(labels)),
        "top1": 100.0 * float((top5[:, 0] == labels).mean()),
        "top5": 100.0 * float((top5 == labels[:, None]).any(axis=1).mean()),
        "ms_per_image": 1e3 * seconds / len(labels),
        "images_per_s": len(labels) / seconds,
    })
    return result, top5[:, 0]


def run_accuracy(source: ModelSource, images: np.ndarray, labels: np.ndarray,
                 config: AccuracyConfig, progress=None) -> list[dict]:
    import torch

    threads_before = torch.get_num_threads()
    threads = config.threads or usable_cores()
    rows, predictions = [], {}
    try:
        for fmt in FORMATS:
            row, create = plan_row(fmt, source, threads if fmt.device == "cpu" else None)
            row["threads"] = threads if fmt.device == "cpu" else None
            if create is not None:
                if progress is not None:
                    progress(fmt.name)
                try:
                    result, top1 = evaluate(create, images, labels, config)
                    row.update(result)
                    predictions[fmt.name] = top1
                except Exception as exc:  # a format that fails is a row that says so
                    row["status"] = failed(exc)
            rows.append(row)
    finally:
        torch.set_num_threads(threads_before)
    add_comparisons(rows, predictions)
    return rows


def add_comparisons(rows: list[dict], predictions: dict[str, np.ndarray]) -> None:
    """Speed-up vs eager on the same device, and top-1 agreement with the reference format."""
    eager = {r["device"]: r for r in rows if r["engine"] == "torch" and "images_per_s" in r}
    reference = next((r["format"] for r in rows if r["format"] in predictions), None)
    for row in rows:
        base = eager.get(row["device"])
        if base is not None and "images_per_s" in row:
            row["speedup_vs_eager"] = ratio(row["images_per_s"], base["images_per_s"])
        if reference is not None and row["format"] in predictions:
            row["top1_agree_pct"] = 100.0 * float(
                (predictions[row["format"]] == predictions[reference]).mean())
            row["agreement_reference"] = reference


# ----------------------------------------------------------------------------- report
def run_figures(source: ModelSource) -> list[str]:
    """What the training run and the export recorded, to read the table against."""
    import json

    notes = []
    if source.checkpoint is not None:
        from flowae.checkpoint import load_checkpoint

        test = load_checkpoint(source.checkpoint).get("test") or {}
        if "top1" in test:
            notes.append(f"The training run's own test figures (flowae.train's pipeline, "
                         f"PyTorch): top-1 {test['top1']:.2f}%, top-5 "
                         f"{test.get('top5', float('nan')):.2f}%.")
    manifest = source.model_dir / MANIFEST_NAME if source.model_dir else None
    if manifest is not None and manifest.is_file():
        data = json.loads(manifest.read_text())
        accuracy = data.get("accuracy", {})
        if accuracy.get("top1_pct"):
            figures = ", ".join(f"{k} {v:.2f}%" for k, v in accuracy["top1_pct"].items())
            notes.append(f"The export's manifest ({accuracy.get('split')} split, "
                         f"{accuracy.get('images')} images): top-1 {figures}; recommended "
                         f"precision {data.get('recommended_precision')}.")
    return notes


def sections(rows: list[dict], config: AccuracyConfig, source: ModelSource,
             images: int) -> list[Section]:
    columns = [
        Column("format", "Format"), Column("status", "Status"),
        Column("size_mb", "Size (MB)", "{:.2f}"),
        Column("top1", f"{config.split} top-1 %", "{:.2f}"),
        Column("top5", "top-5 %", "{:.2f}"),
        Column("ms_per_image", "ms/image", "{:.4f}"),
        Column("images_per_s", "images/s", "{:.0f}"),
        Column("speedup_vs_eager", "speed-up vs eager", "{:.2f}"),
        Column("top1_agree_pct", "top-1 agrees %", "{:.2f}"),
        Column("device_name", "Device"), Column("threads", "Threads"),
    ]
    notes = [
        f"{images} images of the {config.split} split, each decoded and preprocessed once by "
        "the runtime (full JPEG decode), the same float32 inputs for every row.",
        f"ms/image and images/s: model only, batch {config.batch_size}, whole split after "
        f"{config.warmup_batches} warm-up batches; speed-up vs eager on the same device.",
        "Size: the encoder+classifier ONNX file; for PyTorch, the encoder and classifier "
        "weights (parameters and buffers). MB = 10^6 bytes.",
        "top-1 agrees: share of images whose top-1 equals the first row's that ran.",
        *run_figures(source),
    ]
    return [Section(f"Formats ({source.name}: {source.origin})", rows, columns, notes)]


def plot(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ran = [r for r in rows if r.get("ms_per_image")]
    if not ran:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in ran:
        ax.scatter(row["ms_per_image"], row["top1"], s=40)
        ax.annotate(row["format"], (row["ms_per_image"], row["top1"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.margins(x=0.35, y=0.25)  # room for the labels
    ax.set_xlabel("ms per image (model only, log scale)")
    ax.set_ylabel("top-1 %")
    ax.set_title("Accuracy against speed per format", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", type=click.Path(path_type=Path),
              help="Training run directory or checkpoint: the PyTorch row, and the ONNX rows "
                   "from --model-dir or from a flowae-export of it made here.")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="flowae-export output directory (with --run: the same model).")
@click.option("--variant", help="Fresh seeded weights of this variant, exported here (a smoke "
                                "test: its accuracy is chance).")
@click.option("--data-root", type=click.Path(path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Folder holding flowers-102/.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1),
              help="Use the split's first N images [default: all; --quick 64].")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per model call [default 64; --quick 16].")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch and onnxruntime [default: one per usable core].")
@click.option("--quick", is_flag=True, help="Smoke-test size: 64 images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --variant.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / NAME,
              show_default=True, help="Folder for accuracy.json, accuracy.md, accuracy.png.")
def main(run, model_dir, variant, data_root, split, limit, batch_size, threads, quick, seed,
         out):
    """Top-1/top-5 and model-only speed of each format on the same preprocessed images."""
    base = QUICK if quick else AccuracyConfig()
    config = replace(base, split=split, **{k: v for k, v in {
        "limit": limit, "batch_size": batch_size, "threads": threads}.items() if v is not None})
    try:
        if variant and (run or model_dir):
            raise BenchmarkError("give --variant alone, or --run and/or --model-dir")
        if not (run or model_dir or variant):
            raise BenchmarkError("give a model: --run RUN, --model-dir DIR (or both), "
                                        "or --variant NAME")
        with tempfile.TemporaryDirectory(prefix="flowae-bench-") as tmp:
            header = machine_header()
            (source,) = prepare_sources(
                [run] if run else [], [model_dir] if model_dir else [],
                [variant] if variant else [], seed=seed, work_dir=Path(tmp),
                data_root=data_root, quick_export=quick)
            spec = preprocess_rule(source)
            click.echo(f"decoding the {split} split of {data_root}", err=True)
            images, labels, decode_s = load_inputs(data_root, split, spec, config.limit,
                                                   usable_cores())
            rows = run_accuracy(source, images, labels, config,
                                progress=lambda text: click.echo(f"running {text}", err=True))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    header["settings"] = {
        "model": f"{source.name}: {source.origin}",
        "data": f"{len(labels)} images of the {split} split in {data_root}, decoded and "
                f"preprocessed once in {decode_s:.1f} s",
        "threads": f"{config.threads or usable_cores()} (torch intra-op and "
                   "onnxruntime intra-op; inter-op 1)",
        "batch size": config.batch_size,
    }
    secs = sections(rows, config, source, len(labels))
    paths = write_report(out, NAME, "Accuracy and speed per format", header, rows, secs,
                                extra={"config": asdict(config)})
    paths["plot"] = plot(rows, Path(out) / f"{NAME}.png")
    click.echo(paths["markdown"].read_text())
    click.echo(echo_paths(paths))


if __name__ == "__main__":
    main()
