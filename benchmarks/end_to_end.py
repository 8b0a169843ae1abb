"""End to end: a full-size JPEG file in, top-5 flower names out, through the runtime.

On the photos of ../shared/flowers102-fullres (306 camera-size JPEGs), with full JPEG decoding
and with reduced-size decoding (Pillow's draft, the runtime's `jpeg_draft`), at batch 1 and
batched. Two paths are timed:
- "Predictor API": what a user calls. Batch 1 is `Predictor.predict(path)` per image (warm;
  p50/p90/p99 per image); batched is `Predictor.run(paths)` over the whole set with the
  runtime's decode threads (images/s).
- "stages": the same runtime functions called one after another in this thread, timed
  separately, to give the share of time in decoding, preprocessing (resize, crop, scaling),
  the model and the top-k. Also gives top-1/top-5 on the photos per decode mode.
Predictor creation and the first image are reported apart from the warm figures. Writes
end_to_end.json, end_to_end.md and end_to_end.png (ms per image vs batch size) into --out.
Imports the runtime (and flowae.export / torch only to export a --run or --variant here);
nothing imports it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np

from benchmarks.machine import machine_header, usable_cores
from benchmarks.options import (
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    DEFAULT_PHOTOS,
    BenchmarkError,
    parse_int_list,
)
from benchmarks.report import (
    Column,
    Section,
    echo_paths,
    failed,
    is_ok,
    plot_series,
    write_report,
)
from benchmarks.sources import check_one_model, one_runtime_model
from benchmarks.timing import gc_paused, latency_stats, ratio, time_once_ms
from flowae.runtime.errors import FlowaeError

NAME = "end_to_end"
DECODES = ("full", "draft")  # full JPEG decode; reduced-size decode (Pillow draft)
STAGES = ("decode", "preprocess", "model", "topk")


@dataclass(frozen=True)
class EndToEndConfig:
    """Every default of an end-to-end run; QUICK is the smoke-test size."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)  # images per model call
    repeats: int = 3  # timed passes over the photos per case
    warmup: int = 1  # untimed passes first (file cache, sessions, allocator)
    limit: int | None = None  # use the first N photos only
    top_k: int = 5
    threads: int | None = None  # onnxruntime intra-op threads; None: one per usable core
    precision: str = "auto"  # which graph files: auto is the manifest's recommendation


QUICK = EndToEndConfig(batch_sizes=(1, 4), repeats=1, warmup=1, limit=8)


def photo_set(root: Path, limit: int | None) -> tuple[list[Path], np.ndarray]:
    """Paths and labels of a full-size photo folder (labels.csv + jpg/), first `limit`."""
    from flowae.runtime.datasets import fullres_files

    root = Path(root)
    if not (root / "labels.csv").is_file():
        raise BenchmarkError(f"{root}: no labels.csv (expected a folder like "
                                    f"{DEFAULT_PHOTOS})")
    paths, labels = fullres_files(root)
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    if not paths:
        raise BenchmarkError(f"{root}: labels.csv lists no photos")
    return paths, labels


def make_predictor(model, decode: str, batch_size: int, config: EndToEndConfig):
    from flowae.runtime.predictor import Predictor

    return Predictor(model, provider="cpu", threads=config.threads, batch_size=batch_size,
                     precision=config.precision, jpeg_draft=decode == "draft")


def stage_pass(predictor, paths: list[Path], batch_size: int, top_k: int
               ) -> tuple[np.ndarray, np.ndarray, list]:
    """One serial pass: per batch, ms in each stage (B, 4) and ms per image; predictions."""
    from flowae.runtime.images import load_rgb
    from flowae.runtime.preprocess import normalize, resize_crop

    spec = predictor.preprocess
    stage_ms, per_image_ms, predictions = [], [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        t0 = time.perf_counter()
        images = [load_rgb(path, draft_px=spec.resize_px, jpeg_draft=predictor.jpeg_draft,
                           max_pixels=predictor.max_pixels) for path in chunk]
        t1 = time.perf_counter()
        crops = [resize_crop(image, spec) for image in images]
        inputs = normalize(np.stack(crops), spec)  # (B, 3, S, S)
        t2 = time.perf_counter()
        logits, _ = predictor.infer(inputs)
        t3 = time.perf_counter()
        predictions.extend(predictor.top_k(logits, top_k))
        t4 = time.perf_counter()
        stage_ms.append([(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3])
        per_image_ms.append((t4 - t0) * 1e3 / len(chunk))
    return np.asarray(stage_ms), np.asarray(per_image_ms), predictions


def accuracy(predictions: list, labels: np.ndarray) -> tuple[float, float]:
    top1 = np.mean([p[0].label == y for p, y in zip(predictions, labels, strict=True)])
    top5 = np.mean([y in {q.label for q in p} for p, y in zip(predictions, labels, strict=True)])
    return 100.0 * float(top1), 100.0 * float(top5)


def measure_stages(model, decode: str, batch: int, paths: list[Path], labels: np.ndarray,
                   config: EndToEndConfig) -> dict:
    predictor = make_predictor(model, decode, batch, config)
    for _ in range(config.warmup):
        stage_pass(predictor, paths, batch, config.top_k)
    stages, per_image, predictions = [], [], []
    with gc_paused():
        for _ in range(config.repeats):
            stage_ms, image_ms, predictions = stage_pass(predictor, paths, batch, config.top_k)
            stages.append(stage_ms)
            per_image.append(image_ms)
    totals = np.concatenate(stages).sum(axis=0)  # ms per stage over all timed passes
    seconds = totals.sum() / 1e3
    top1, top5 = accuracy(predictions, labels)
    row = {"path": "stages (serial)", **latency_stats(np.concatenate(per_image)),
           "images_per_s": len(paths) * config.repeats / seconds, "top1": top1, "top5": top5}
    row.update({f"{name}_pct": 100.0 * float(t / totals.sum())
                for name, t in zip(STAGES, totals, strict=True)})
    row.update({f"{name}_ms_per_image": float(t) / (len(paths) * config.repeats)
                for name, t in zip(STAGES, totals, strict=True)})
    return row


def measure_api(model, decode: str, batch: int, paths: list[Path], config: EndToEndConfig
                ) -> dict:
    """Predictor as a user calls it: predict(path) per image at batch 1, run(paths) batched."""
    start = time.perf_counter()
    predictor = make_predictor(model, decode, batch, config)
    row: dict = {"path": "Predictor API", "create_ms": (time.perf_counter() - start) * 1e3,
                 "decode_workers": predictor.decode_workers}
    if batch == 1:
        row["first_ms"] = time_once_ms(lambda: predictor.predict(paths[0],
                                                                        top_k=config.top_k))
        for _ in range(config.warmup):
            for path in paths:
                predictor.predict(path, top_k=config.top_k)
        samples = []
        with gc_paused():
            for _ in range(config.repeats):
                for path in paths:
                    samples.append(time_once_ms(
                        lambda p=path: predictor.predict(p, top_k=config.top_k)))
        row.update(latency_stats(samples))
        row["images_per_s"] = 1e3 * len(samples) / float(np.sum(samples))
        return row

    def one_pass():
        results = list(predictor.run(paths, top_k=config.top_k))
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise FlowaeError(f"{len(bad)} photos failed, first: {bad[0]}")

    row["first_ms"] = time_once_ms(one_pass) / len(paths)  # first pass, per image
    for _ in range(max(config.warmup - 1, 0)):
        one_pass()
    with gc_paused():
        passes = [time_once_ms(one_pass) for _ in range(config.repeats)]
    per_image = np.asarray(passes) / len(paths)
    row["mean_ms"] = float(per_image.mean())  # per image, averaged over each whole pass
    row["images_per_s"] = 1e3 / row["mean_ms"]
    row["n"] = len(paths) * config.repeats
    return row


def run_end_to_end(model, paths: list[Path], labels: np.ndarray, config: EndToEndConfig,
                   progress=None) -> list[dict]:
    rows = []
    for decode in DECODES:
        for batch in config.batch_sizes:
            for measure in (measure_api, measure_stages):
                row = {"decode": decode, "batch": batch, "images": len(paths),
                       "passes": config.repeats, "status": "ok"}
                if progress is not None:
                    progress(f"{decode} decode, batch {batch}, {measure.__name__}")
                try:
                    if measure is measure_stages:
                        row.update(measure(model, decode, batch, paths, labels, config))
                    else:
                        row.update(measure(model, decode, batch, paths, config))
                except Exception as exc:  # a failing case is a row that says so
                    row["path"] = ("stages (serial)" if measure is measure_stages
                                   else "Predictor API")
                    row["status"] = failed(exc)
                rows.append(row)
    full = {(r["path"], r["batch"]): r for r in rows if r["decode"] == "full"}
    for row in rows:
        base = full.get((row["path"], row["batch"]))
        if base is not None:
            row["speedup_vs_full"] = ratio(row.get("images_per_s"),
                                                  base.get("images_per_s"))
    return rows


def sections(rows: list[dict], default_decode: str) -> list[Section]:
    api = [r for r in rows if r["path"] == "Predictor API"]
    stages = [r for r in rows if r["path"] != "Predictor API"]
    api_columns = [
        Column("decode", "JPEG decode"), Column("batch", "Batch"),
        Column("status", "Status"), Column("create_ms", "Create (ms)", "{:.1f}"),
        Column("first_ms", "First (ms/img)", "{:.2f}"),
        Column("p50_ms", "p50 (ms/img)", "{:.3f}"),
        Column("p90_ms", "p90", "{:.3f}"), Column("p99_ms", "p99", "{:.3f}"),
        Column("mean_ms", "Mean (ms/img)", "{:.3f}"),
        Column("images_per_s", "images/s", "{:.0f}"),
        Column("speedup_vs_full", "x full decode", "{:.2f}"),
    ]
    stage_columns = [
        Column("decode", "JPEG decode"), Column("batch", "Batch"),
        Column("status", "Status"), Column("p50_ms", "p50 (ms/img)", "{:.3f}"),
        Column("mean_ms", "Mean (ms/img)", "{:.3f}"),
        Column("images_per_s", "images/s", "{:.0f}"),
        *[Column(f"{s}_pct", f"{s} %", "{:.1f}") for s in STAGES],
        Column("top1", "top-1 %", "{:.2f}"), Column("top5", "top-5 %", "{:.2f}"),
    ]
    target = [r for r in api if r["batch"] == 1 and is_ok(r)]
    notes = [f"Batch 1 is Predictor.predict(path) per image; batched is Predictor.run over the "
             f"whole set with the runtime's decode threads (mean over whole passes). The "
             f"runtime's default decode is {default_decode}.",
             "First: the first image after creating the Predictor (batched: the first whole "
             "pass, per image)."]
    notes += [f"Target: p50 <= 2 ms per image at batch 1, warm. {r['decode']} decode: "
              f"{r['p50_ms']:.3f} ms ({'met' if r['p50_ms'] <= 2.0 else 'missed'}; "
              f"{r['p50_ms'] / 2.0:.2f}x the target)" for r in target]
    return [
        Section("JPEG file to top-5 names, as the Predictor API runs it", api,
                       api_columns, notes),
        Section("Where the time goes (runtime stages called serially)", stages,
                       stage_columns, [
                           "decode: JPEG file to RGB image; preprocess: resize, centre crop, "
                           "scaling; model: onnxruntime encoder_classifier; topk: softmax and "
                           "names. Shares are of the summed time of all timed passes.",
                           "top-1/top-5 are on these photos with this decode mode.",
                       ]),
    ]


def plot(rows: list[dict], path: Path) -> Path | None:
    lines: dict[str, tuple[list, list]] = {}
    for row in rows:
        if row.get("mean_ms") is None:
            continue
        xs, ys = lines.setdefault(f"{row['path']}, {row['decode']} decode", ([], []))
        xs.append(row["batch"])
        ys.append(row["mean_ms"])
    return plot_series(path, {"full-size JPEG to top-5": lines}, xlabel="batch size",
                              ylabel="mean ms per image", title="End-to-end latency per "
                              "image vs batch size")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path),
              help="flowae-export model directory or encoder_classifier .onnx file "
                   "[default: the model bundled with flowae.runtime].")
@click.option("--run", type=click.Path(path_type=Path),
              help="Instead of --model: a training run, exported here with flowae.export.")
@click.option("--variant", help="Instead of --model: fresh seeded weights of this variant, "
                                "exported here (speed only; its accuracy is chance).")
@click.option("--photos", type=click.Path(path_type=Path), default=DEFAULT_PHOTOS,
              show_default=True, help="Folder with labels.csv and jpg/ of full-size photos.")
@click.option("--limit", type=click.IntRange(min=1),
              help="Use the first N photos [default: all; --quick 8].")
@click.option("--batch-sizes", help="Comma-separated batch sizes [default 1,8,32; --quick 1,4].")
@click.option("--repeats", type=click.IntRange(min=1),
              help="Timed passes over the photos per case [default 3; --quick 1].")
@click.option("--warmup", type=click.IntRange(min=0),
              help="Untimed passes first [default 1].")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime intra-op threads [default: one per usable core].")
@click.option("--precision", type=click.Choice(("auto", "fp32", "int8")), default="auto",
              show_default=True, help="Graph files; auto: the manifest's recommendation.")
@click.option("--quick", is_flag=True, help="Smoke-test sizes: 8 photos, one pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --variant.")
@click.option("--data-root", type=click.Path(path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Flowers102 folder for exporting a --run or --variant.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / NAME,
              show_default=True, help="Folder for end_to_end.json, .md and .png.")
def main(model, run, variant, photos, limit, batch_sizes, repeats, warmup, threads, precision,
         quick, seed, data_root, out):
    """Time full-size JPEG files to top-5 names, full vs reduced-size decoding."""
    from flowae.runtime.predictor import DEFAULT_JPEG_DRAFT

    base = QUICK if quick else EndToEndConfig()
    try:
        config = replace(base, **{k: v for k, v in {
            "batch_sizes": batch_sizes and parse_int_list(batch_sizes, "--batch-sizes"),
            "repeats": repeats, "warmup": warmup, "limit": limit, "precision": precision,
            "threads": threads or base.threads or usable_cores()}.items() if v is not None})
        check_one_model(model, run, variant)
        paths, labels = photo_set(photos, config.limit)
        with tempfile.TemporaryDirectory(prefix="flowae-bench-") as tmp:
            model_path, origin = one_runtime_model(
                model, run, variant, seed=seed, work_dir=Path(tmp), data_root=data_root,
                quick_export=quick)
            header = machine_header(torch_info=False)
            rows = run_end_to_end(model_path, paths, labels, config,
                                  progress=lambda text: click.echo(f"timing {text}", err=True))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    header["settings"] = {
        "model": origin, "photos": f"{len(paths)} from {photos}",
        "threads": f"onnxruntime intra-op {config.threads}, provider CPU",
        "timing": f"{config.warmup} untimed + {config.repeats} timed passes per case",
        "precision": config.precision,
    }
    secs = sections(rows, "draft" if DEFAULT_JPEG_DRAFT else "full")
    paths_written = write_report(out, NAME, "End to end: full-size JPEG to top-5 names",
                                        header, rows, secs, extra={"config": asdict(config)})
    paths_written["plot"] = plot(rows, Path(out) / f"{NAME}.png")
    click.echo(paths_written["markdown"].read_text())
    click.echo(echo_paths(paths_written))


if __name__ == "__main__":
    main()
