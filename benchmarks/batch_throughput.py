"""Batch throughput: images/s of flowae-batch on Ray Data (1 and 2 actors) vs plain flowae-infer.

For each image set (the 306 full-size photos, and a generated set of camera-size JPEGs in a
temp folder) it times `flowae-infer --json` as a subprocess (the whole process: start-up, model
load, every image) and `run_batch` with 1 and with 2 actors into a fresh results folder each,
in interleaved rounds, and reports the median. A Ray row's time is the job alone (actor
start-up, model load in each actor, every image, results written); Ray's own start-up
(one local ray.init, kept up, idle, while flowae-infer runs) is reported apart and in an
end-to-end column. Overhead is the ms/image difference to flowae-infer on the same set. Timed
with time.perf_counter on the bundled model; the machine is shared, so the load average is
recorded at start and end. Writes batch_throughput.json and .md into --out. Imports the
standard library, numpy, Pillow, click, the runtime and its batch pipeline (Ray); nothing
imports it.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from benchmarks.machine import load_average, machine_header, usable_cores
from benchmarks.options import DEFAULT_OUT, DEFAULT_PHOTOS, BenchmarkError
from benchmarks.report import Column, Section, echo_paths, write_report
from flowae.runtime.errors import FlowaeError

NAME = "batch_throughput"
CAMERA_SIZE = (4032, 3024)  # a 12 MP phone photo, landscape


@dataclass(frozen=True)
class ThroughputConfig:
    """Every default of a run; QUICK is the smoke-test size."""

    synthetic: int = 2000  # generated camera-size JPEGs (0: photos only)
    distinct: int = 16  # different pictures among them (the rest repeat their bytes)
    size: tuple[int, int] = CAMERA_SIZE
    actors: tuple[int, ...] = (1, 2)
    rounds: int = 2  # runs of each engine, interleaved; rows report the median
    batch_size: int = 32
    rows_per_file: int = 1000


QUICK = ThroughputConfig(synthetic=40, distinct=4, size=(1600, 1200), rounds=1)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_synthetic(folder: Path, config: ThroughputConfig, seed: int = 0) -> list[Path]:
    """`config.synthetic` JPEGs of `config.size`: smooth colour fields with noise, written as
    `distinct` different pictures whose bytes repeat (decoding costs the same either way)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = config.size
    pictures = []
    for _ in range(config.distinct):
        small = rng.integers(0, 256, size=(height // 64, width // 64, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, size=(height // 4, width // 4, 1))
        noisy = np.asarray(image, dtype=np.float32) + np.repeat(np.repeat(grain, 4, 0), 4, 1)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        pictures.append(buffer.getvalue())
    paths = []
    for i in range(config.synthetic):
        path = folder / f"synthetic_{i:05d}.jpg"
        path.write_bytes(pictures[i % len(pictures)])
        paths.append(path)
    return paths


INFER = "flowae-infer (subprocess)"


def ray_engine(actors: int) -> str:
    return f"flowae-batch, Ray, {actors} actor{'s' * (actors > 1)}"


def time_infer(folder: Path, images: int) -> tuple[float, int]:
    """One `flowae-infer --json FOLDER` process, from launch to exit: (seconds, failed images)."""
    script = Path(sys.executable).parent / "flowae-infer"
    command = [sys.executable, str(script)] if script.is_file() else ["flowae-infer"]
    started = time.perf_counter()
    done = subprocess.run([*command, "--json", "--provider", "cpu", str(folder)],
                          capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - started
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode not in (0, 1) or len(records) != images:
        lines = done.stderr.strip().splitlines()
        raise BenchmarkError(f"flowae-infer on {folder}: exit {done.returncode}, {len(records)} "
                             f"of {images} answered ({lines[-1] if lines else ''})")
    return wall_s, sum("error" in record for record in records)


def time_ray(folder: Path, images: int, actors: int, config: ThroughputConfig,
             out: Path) -> tuple[float, int]:
    """One run_batch job (Ray already running) into a fresh folder: (seconds, failed images)."""
    from flowae.runtime.batch.pipeline import BatchConfig, run_batch

    job = BatchConfig(out=str(out), actors=actors, threads=1, batch_size=config.batch_size,
                      rows_per_file=config.rows_per_file)
    started = time.perf_counter()
    summary = run_batch([folder], job)
    wall_s = time.perf_counter() - started
    if summary.processed != images:
        raise BenchmarkError(f"flowae-batch on {folder}: {summary.processed} of {images} rows")
    shutil.rmtree(out)
    return wall_s, summary.failed


def image_sets(photos: Path | None, config: ThroughputConfig, scratch: Path,
               progress) -> dict[str, tuple[Path, int]]:
    """name -> (folder, images): the photos, and the synthetic JPEGs written into `scratch`."""
    sets: dict[str, tuple[Path, int]] = {}
    if photos is not None:
        sets["full-size photos"] = (photos, len(list(photos.glob("*.jpg"))))
    if config.synthetic:
        folder = scratch / "synthetic"
        folder.mkdir()
        width, height = config.size
        progress(f"writing {config.synthetic} synthetic {width}x{height} JPEGs")
        sets[f"synthetic {width}x{height}"] = (folder, len(write_synthetic(folder, config)))
    if not sets:
        raise BenchmarkError("nothing to measure: no photos folder and --synthetic 0")
    return sets


def measure(photos: Path | None, config: ThroughputConfig,
            progress=lambda text: None) -> tuple[list[dict], dict]:
    """Rows per (image set, engine) with the median of `rounds` runs, and Ray's start-up time.

    Rounds interleave the engines (flowae-infer, then each actor count), so a change in the
    machine's load during the run falls on all of them alike; Ray stays up (idle) throughout.
    """
    from flowae.runtime.batch.pipeline import quiet_ray_logging, require_ray, start_ray

    ray = require_ray()
    quiet_ray_logging()
    if ray.is_initialized():
        raise BenchmarkError("Ray is already running in this process; its start-up would not "
                             "be measured")
    runs: dict[tuple[str, str], list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="flowae-batch-bench-") as tmp:
        sets = image_sets(photos, config, Path(tmp), progress)
        progress("starting Ray")
        ray_start_s = start_ray(None, usable_cores())
        try:
            for round_ in range(1, config.rounds + 1):
                for name, (folder, images) in sets.items():
                    progress(f"round {round_}: flowae-infer on {name}")
                    runs.setdefault((name, INFER), []).append(time_infer(folder, images))
                    for actors in config.actors:
                        progress(f"round {round_}: flowae-batch, {actors} actor(s), on {name}")
                        runs.setdefault((name, ray_engine(actors)), []).append(
                            time_ray(folder, images, actors, config, Path(tmp) / "results"))
        finally:
            ray.shutdown()
    rows = []
    for (name, engine), samples in runs.items():
        images = sets[name][1]
        wall_s = float(np.median([wall for wall, _ in samples]))
        row = {"set": name, "engine": engine, "images": images, "wall_s": wall_s,
               "wall_s_runs": [round(wall, 3) for wall, _ in samples],
               "failed": max(failed for _, failed in samples),
               "images_per_s": images / wall_s, "ms_per_image": 1e3 * wall_s / images}
        if engine != INFER:
            row["with_ray_start_images_per_s"] = images / (wall_s + ray_start_s)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["set"] == row["set"] and r["engine"] == INFER)
        row["overhead_ms_per_image"] = row["ms_per_image"] - base["ms_per_image"]
        row["speed_vs_infer"] = row["images_per_s"] / base["images_per_s"]
    return rows, {"ray_start_s": ray_start_s}


COLUMNS = [Column("set", "image set"), Column("engine", "engine"), Column("images", "images"),
           Column("wall_s", "wall s (median)", "{:.2f}"), Column("failed", "failed"),
           Column("images_per_s", "images/s", "{:.1f}"),
           Column("ms_per_image", "ms/image", "{:.2f}"),
           Column("overhead_ms_per_image", "overhead vs flowae-infer, ms/image", "{:+.2f}"),
           Column("speed_vs_infer", "x flowae-infer", "{:.2f}"),
           Column("with_ray_start_images_per_s", "images/s incl. Ray start", "{:.1f}")]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--photos", type=click.Path(path_type=Path), default=DEFAULT_PHOTOS,
              show_default=True, help="Folder with jpg/ of full-size photos (--no-photos: none).")
@click.option("--no-photos", is_flag=True, help="Measure the synthetic set only.")
@click.option("--synthetic", type=click.IntRange(min=0), default=ThroughputConfig.synthetic,
              show_default=True, help="Generated camera-size JPEGs (0: none).")
@click.option("--rounds", type=click.IntRange(min=1), default=ThroughputConfig.rounds,
              show_default=True, help="Runs of each engine, interleaved; rows take the median.")
@click.option("--quick", is_flag=True, help="Smoke-test size: 40 small synthetic JPEGs.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / NAME,
              show_default=True, help="Folder for batch_throughput.json and .md.")
def main(photos: Path, no_photos: bool, synthetic: int, rounds: int, quick: bool,
         out: Path) -> None:
    """images/s of flowae-batch (Ray Data, 1 and 2 actors) against flowae-infer."""
    config = QUICK if quick else ThroughputConfig(synthetic=synthetic, rounds=rounds)
    folder = None if no_photos else photos / "jpg"
    if folder is not None and not folder.is_dir():
        raise click.UsageError(f"{folder}: no such folder (or pass --no-photos)")
    header = machine_header(torch_info=False)
    try:
        rows, extra = measure(folder, config,
                              progress=lambda text: click.echo(f"{NAME}: {text}", err=True))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    header["settings"] = {"Ray start-up (ray.init, local, no dashboard)":
                          f"{extra['ray_start_s']:.2f} s",
                          "config": json.dumps(asdict(config)),
                          "Ray Data": f"ray {_version('ray')}, pyarrow {_version('pyarrow')}",
                          "flowae-infer": "--provider cpu, default threads (one per core) and "
                                          "decode workers; Ray actors: 1 thread each"}
    notes = ["Each row: the median of its runs (wall_s_runs in the JSON), rounds interleaved.",
             "A Ray row's time is its job alone: actor start-up and model load in each actor, "
             "every image, part files written; Ray's start-up is only in the last column.",
             "The machine is shared: compare rows of one report, not across "
             "reports; see the load average above."]
    paths = write_report(out, NAME, "Batch throughput: flowae-batch on Ray vs flowae-infer",
                         header, rows, [Section("Throughput", rows, COLUMNS, notes)], extra)
    click.echo(paths["markdown"].read_text())
    click.echo(echo_paths(paths))
    click.echo(f"load average (1 min) at end: {load_average()}", err=True)


if __name__ == "__main__":
    main()
