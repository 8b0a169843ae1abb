"""Model-only latency and throughput: PyTorch eager vs onnxruntime, per graph and backend.

For each graph (encoder+classifier, and the decoder of each variant given: `upsample`, `base`)
and each backend (PyTorch eager; onnxruntime on a plain `torch.onnx.export` file; onnxruntime
on flowae-export's fp32 and int8 files; on CUDA, PyTorch eager, onnxruntime fp32 and fp16, shown
as skipped without a CUDA device) and thread count: model or session creation time, the first
inference, mean/p50/p90/p99 at batch 1 after warm-up, and images/s at each batch size, with
ratios against eager on the same graph, device and threads. Inputs are random arrays of the
contract's shapes, built before any timing; every backend gets the same arrays (NumPy in,
NumPy out, so CUDA rows include the host-device copies). Writes latency.json, latency.md and
latency.png into --out. Imports everything it needs (torch, onnxruntime, flowae, the runtime,
flowae.export); nothing imports it.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np

from benchmarks.machine import (
    NO_CUDA,
    device_label,
    load_average,
    machine_header,
    ort_cuda_available,
    torch_cuda_available,
)
from benchmarks.options import DEFAULT_DATA_ROOT, DEFAULT_OUT, parse_int_list
from benchmarks.report import (
    Column,
    Section,
    echo_paths,
    failed,
    first_line,
    is_ok,
    plot_series,
    write_report,
)
from benchmarks.sources import (
    ModelSource,
    file_mb,
    plain_export,
    prepare_sources,
    weights_mb,
)
from benchmarks.timing import (
    TimingPlan,
    latency_stats,
    ratio,
    time_calls_ms,
    time_once_ms,
)
from flowae.runtime.contract import (
    GRAPH_IO,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    graph_file,
)
from flowae.runtime.errors import FlowaeError

NAME = "latency"
ROLES = (ROLE_ENCODER_CLASSIFIER, ROLE_DECODER)


@dataclass(frozen=True)
class LatencyConfig:
    """Every default of a latency run; QUICK is the smoke-test size."""

    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 256)  # throughput is measured at each
    threads: tuple[int, ...] = (1, 2)  # CPU intra-op threads, one row per value
    latency_repeats: int = 200  # timed batch-1 calls at most (the percentiles)
    throughput_repeats: int = 50  # timed calls per larger batch size at most
    warmup: int = 10  # untimed batch-1 calls before the percentiles
    throughput_warmup: int = 2  # untimed calls before each larger batch size
    min_repeats: int = 5  # timed calls at least, even past the budget
    budget_s: float = 2.0  # per series: stop timing once this much time is spent
    seed: int = 0  # fresh weights and the random inputs


QUICK = LatencyConfig(batch_sizes=(1, 8), threads=(1,), latency_repeats=10,
                      throughput_repeats=3, warmup=1, throughput_warmup=1, min_repeats=2,
                      budget_s=0.2)


@dataclass(frozen=True)
class Backend:
    """One way of running a graph."""

    engine: str  # "torch" (eager), "ort" (flowae-export's file), "ort-plain" (plain export)
    precision: str  # fp32, int8, fp16
    device: str  # cpu or cuda

    @property
    def format(self) -> str:
        if self.engine == "torch":
            return f"PyTorch eager {self.precision}"
        plain = " (plain export)" if self.engine == "ort-plain" else ""
        return f"onnxruntime {self.precision}{plain}"


BACKENDS = (
    Backend("torch", "fp32", "cpu"),
    Backend("ort-plain", "fp32", "cpu"),
    Backend("ort", "fp32", "cpu"),
    Backend("ort", "int8", "cpu"),
    Backend("torch", "fp32", "cuda"),
    Backend("ort", "fp32", "cuda"),
    Backend("ort", "fp16", "cuda"),
)

Bind = Callable[[np.ndarray], Callable[[], object]]  # inputs -> a zero-argument timed call


@dataclass
class GraphCase:
    """One graph of one model source, with the plain export to compare against."""

    source: ModelSource
    role: str
    input_shape: tuple[int, ...]  # (C, H, W) without the batch axis
    plain_path: Path | None = None
    plain_error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.role} ({self.source.name})"


# ----------------------------------------------------------------------------- creators
def torch_creator(checkpoint: Path, role: str, device: str, threads: int | None
                  ) -> Callable[[], Bind]:
    """Rebuild the module from its checkpoint file (what 'creation' means for eager)."""

    def create() -> Bind:
        import torch

        from flowae.checkpoint import load_checkpoint, model_from_checkpoint

        if threads is not None:
            torch.set_num_threads(threads)
        model = model_from_checkpoint(load_checkpoint(checkpoint))
        module = (model if role == ROLE_ENCODER_CLASSIFIER else model.decoder).to(device)
        target = torch.device(device)

        def bind(inputs: np.ndarray) -> Callable[[], object]:
            def call():
                with torch.inference_mode():
                    outputs = module(torch.from_numpy(inputs).to(target))
                if target.type == "cuda":  # NumPy out, as the onnxruntime rows give
                    outputs = [o.cpu() for o in (outputs if isinstance(outputs, tuple)
                                                 else (outputs,))]
                return outputs

            return call

        return bind

    return create


def ort_creator(path: Path, role: str, provider: str, threads: int | None,
                through_runtime: bool) -> Callable[[], Bind]:
    """A session as the runtime builds it (flowae-export files, metadata checked) or bare,
    from the runtime's one session factory. Both fail in one line when onnxruntime does not
    start `provider`."""

    def create() -> Bind:
        if through_runtime:
            from flowae.runtime.predictor import load_graph

            session = load_graph(path, role, provider, threads).session
        else:
            from flowae.runtime.session import create_session

            # Spinning as the runtime's sessions have it: the plain-export row and the
            # flowae-export rows then differ only in the file. Rows are timed one at a time.
            session = create_session(path, providers=[provider], threads=threads,
                                     spinning=True)
        (input_name,), _ = GRAPH_IO[role]
        dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32

        def bind(inputs: np.ndarray) -> Callable[[], object]:
            feed = {input_name: inputs.astype(dtype, copy=False)}  # before timing
            return lambda: session.run(None, feed)

        return bind

    return create


def plan_row(case: GraphCase, backend: Backend, threads: int | None
             ) -> tuple[dict, Callable[[], Bind] | None]:
    """The row's identity, and its creator, or None with the reason in row['status']."""
    source = case.source
    row = {
        "graph": case.label, "role": case.role, "variant": source.variant,
        "source": source.origin, "format": backend.format, "engine": backend.engine,
        "precision": backend.precision, "device": backend.device,
        "device_name": device_label(backend.device), "threads": threads,
        "status": "ok", "file": None, "size_mb": None,
    }
    provider = "CUDAExecutionProvider" if backend.device == "cuda" else "CPUExecutionProvider"
    if backend.engine == "torch":
        if backend.device == "cuda" and not torch_cuda_available():
            row["status"] = NO_CUDA
            return row, None
        if source.checkpoint is None:
            row["status"] = "skipped: no checkpoint (give --run with the --model-dir)"
            return row, None
        row["file"] = str(source.checkpoint)
        row["size_mb"] = weights_mb(source.checkpoint, case.role)
        return row, torch_creator(source.checkpoint, case.role, backend.device, threads)
    if backend.device == "cuda" and not ort_cuda_available():
        row["status"] = (NO_CUDA if not torch_cuda_available() else
                         "skipped: onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)")
        return row, None
    if backend.engine == "ort-plain":
        if case.plain_path is None:
            row["status"] = case.plain_error or "skipped: no checkpoint to export"
            return row, None
        row["file"], row["size_mb"] = str(case.plain_path), file_mb(case.plain_path)
        return row, ort_creator(case.plain_path, case.role, provider, threads, False)
    if source.model_dir is None:
        row["status"] = f"failed: {source.onnx_error or 'no ONNX files'}"
        return row, None
    path = source.model_dir / graph_file(case.role, backend.precision)
    if not path.is_file():
        row["status"] = f"skipped: export wrote no {path.name}"
        return row, None
    row["file"], row["size_mb"] = str(path), file_mb(path)
    return row, ort_creator(path, case.role, provider, threads, True)


# ----------------------------------------------------------------------------- measuring
def build_inputs(shape: tuple[int, ...], role: str, batch_sizes: tuple[int, ...], seed: int
                 ) -> dict[int, np.ndarray]:
    """Random float32 inputs per batch size: images in [-1, 1], latents >= 0 (post-ReLU)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for batch in sorted(set(batch_sizes) | {1}):
        if role == ROLE_ENCODER_CLASSIFIER:
            array = rng.uniform(-1.0, 1.0, size=(batch, *shape))
        else:
            array = np.abs(rng.normal(0.0, 1.0, size=(batch, *shape)))
        inputs[batch] = np.ascontiguousarray(array, dtype=np.float32)
    return inputs


def measure(create: Callable[[], Bind], inputs: dict[int, np.ndarray], config: LatencyConfig
            ) -> dict:
    """Creation, first call, batch-1 percentiles and throughput per batch size of one row."""
    start = time.perf_counter()
    bind = create()
    result: dict = {"create_ms": (time.perf_counter() - start) * 1e3}
    call = bind(inputs[1])
    result["first_ms"] = time_once_ms(call)
    samples = time_calls_ms(call, TimingPlan(
        config.warmup, config.latency_repeats, config.min_repeats, config.budget_s))
    result.update(latency_stats(samples))
    result["ips_b1"] = 1e3 * samples.size / samples.sum()
    result["p50_ms_b1"] = result["p50_ms"]
    for batch in config.batch_sizes:
        if batch == 1:
            continue
        try:
            timed = time_calls_ms(bind(inputs[batch]), TimingPlan(
                config.throughput_warmup, config.throughput_repeats, config.min_repeats,
                config.budget_s))
        except Exception as exc:  # e.g. out of memory at the largest batch: keep the rest
            result["status"] = f"failed at batch {batch}: {first_line(exc)}"
            break
        result[f"ips_b{batch}"] = 1e3 * batch * timed.size / timed.sum()
        result[f"p50_ms_b{batch}"] = float(np.median(timed))
        result[f"n_b{batch}"] = int(timed.size)
    return result


def add_ratios(rows: list[dict], batch_sizes: tuple[int, ...]) -> None:
    """speedup_p50 (eager p50 / this p50, batch 1) and speedup_ips_bN (this images/s / eager's
    at batch N), in place.

    The reference is PyTorch eager on the same graph, device and threads.
    """
    eager = {(r["graph"], r["device"], r["threads"]): r for r in rows
             if r["engine"] == "torch" and "p50_ms" in r}
    for row in rows:
        base = eager.get((row["graph"], row["device"], row["threads"]))
        if base is None or "p50_ms" not in row:
            continue
        row["speedup_p50"] = ratio(base["p50_ms"], row["p50_ms"])
        for batch in sorted(set(batch_sizes) | {1}):
            row[f"speedup_ips_b{batch}"] = ratio(row.get(f"ips_b{batch}"),
                                                        base.get(f"ips_b{batch}"))


def prepare_cases(sources: list[ModelSource], roles: tuple[str, ...], work_dir: Path,
                  plain: bool) -> list[GraphCase]:
    """The graphs to time, each with its plain torch.onnx.export file where asked."""
    cases = []
    for source in sources:
        shapes = input_shapes(source)
        model = None
        for role in roles:
            case = GraphCase(source, role, shapes[role])
            if plain and source.checkpoint is not None:
                try:
                    model = model or _torch_model(source.checkpoint)
                    case.plain_path = plain_export_of(model, role, shapes[role], work_dir
                                                      / f"{source.name}-plain")
                except Exception as exc:  # the plain export failing is a result too
                    case.plain_error = failed(exc)
            elif plain:
                case.plain_error = "skipped: no checkpoint to export (give --run)"
            else:
                case.plain_error = "skipped: --no-plain-export"
            cases.append(case)
    return cases


def _torch_model(checkpoint: Path):
    from flowae.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(checkpoint))


def plain_export_of(model, role: str, shape: tuple[int, ...], folder: Path) -> Path:
    import torch

    module = model if role == ROLE_ENCODER_CLASSIFIER else model.decoder
    example = torch.zeros(2, *shape)  # batch >= 2 keeps the batch axis dynamic
    return plain_export(module, role, example, folder / graph_file(role))


def input_shapes(source: ModelSource) -> dict[str, tuple[int, ...]]:
    """(C, H, W) of each graph's input, from the checkpoint's config or the ONNX metadata."""
    if source.checkpoint is not None:
        from flowae.checkpoint import load_checkpoint
        from flowae.models import ModelConfig, build_model

        config = ModelConfig.from_dict(load_checkpoint(source.checkpoint)["model_config"])
        side, latent = config.image_size_px, build_model(config).latent_shape()
    else:
        from flowae.runtime.predictor import load_graph

        metadata = load_graph(source.model_dir / graph_file(ROLE_ENCODER_CLASSIFIER),
                              ROLE_ENCODER_CLASSIFIER, "CPUExecutionProvider", 1).metadata
        side, latent = metadata.preprocess.image_size_px, metadata.latent_shape
    return {ROLE_ENCODER_CLASSIFIER: (3, side, side), ROLE_DECODER: tuple(latent)}


def run_latency(sources: list[ModelSource], roles: tuple[str, ...],
                config: LatencyConfig, work_dir: Path, plain: bool = True,
                progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every (graph, backend, threads) row, measured one after another in this process."""
    import torch

    threads_before = torch.get_num_threads()
    rows: list[dict] = []
    try:
        for case in prepare_cases(sources, roles, work_dir, plain):
            inputs = build_inputs(case.input_shape, case.role, config.batch_sizes, config.seed)
            for backend in BACKENDS:
                for threads in (config.threads if backend.device == "cpu" else (None,)):
                    row, create = plan_row(case, backend, threads)
                    if create is not None:
                        if progress is not None:
                            progress(f"{case.label}: {backend.format} {backend.device}"
                                     f"{'' if threads is None else f', {threads} threads'}")
                        row["load_1m_before"] = load_average()
                        try:
                            row.update(measure(create, inputs, config))
                        except Exception as exc:  # a backend that fails is a row that says so
                            row["status"] = failed(exc)
                        gc.collect()  # free this session's arenas before the next row
                    rows.append(row)
    finally:
        torch.set_num_threads(threads_before)
    add_ratios(rows, config.batch_sizes)
    return rows


# ----------------------------------------------------------------------------- report
def target_rows(rows: list[dict], config: LatencyConfig) -> list[dict]:
    """The speed targets this project sets, where this run measured what they need (CPU,
    most threads): encoder+classifier at least 5x eager at batch 1 and 6000 images/s at
    batch 64; the base decoder no slower than eager.

    One line per onnxruntime precision: int8 counts only where its accuracy holds, which the
    accuracy benchmark shows.
    """
    threads = max(config.threads)
    where = f"{threads} thread{'s' if threads > 1 else ''}"
    ok = [r for r in rows if is_ok(r) and r["device"] == "cpu"
          and r["threads"] == threads and r["engine"] == "ort"]
    targets = []
    for row in ok:
        graph = row["graph"]
        if row["role"] == ROLE_ENCODER_CLASSIFIER:
            targets.append(_target(f"{graph}: x eager, p50 batch 1, {where}", row,
                                   row.get("speedup_p50"), 5.0, "x"))
            if 64 in config.batch_sizes:
                targets.append(_target(f"{graph}: images/s at batch 64, {where}", row,
                                       row.get("ips_b64"), 6000.0, " img/s"))
        elif row["variant"] == "base":
            targets.append(_target(f"{graph}: x eager, p50 batch 1, {where}", row,
                                   row.get("speedup_p50"), 1.0, "x"))
    return targets


def _target(what: str, row: dict, value: float | None, goal: float, unit: str) -> dict:
    return {"target": what, "goal": f">= {goal:g}{unit}", "format": row["format"],
            "measured": None if value is None else f"{value:.2f}{unit}",
            "met": None if value is None else ("yes" if value >= goal else
                                               f"no ({value / goal:.0%} of goal)")}


def sections(rows: list[dict], config: LatencyConfig) -> list[Section]:
    largest = max(config.batch_sizes)
    columns = [
        Column("format", "Format"), Column("device_name", "Device"),
        Column("threads", "Threads"), Column("status", "Status"),
        Column("size_mb", "Size (MB)", "{:.2f}"),
        Column("create_ms", "Create (ms)", "{:.1f}"),
        Column("first_ms", "First (ms)", "{:.2f}"),
        Column("min_ms", "min (ms)", "{:.3f}"),
        Column("mean_ms", "Mean (ms)", "{:.3f}"),
        Column("p50_ms", "p50 (ms)", "{:.3f}"),
        Column("p90_ms", "p90 (ms)", "{:.3f}"),
        Column("p99_ms", "p99 (ms)", "{:.3f}"),
        *[Column(f"ips_b{b}", f"img/s b{b}", "{:.0f}")
          for b in sorted(set(config.batch_sizes) | {1})],
        Column("speedup_p50", "x eager p50 b1", "{:.2f}"),
        Column(f"speedup_ips_b{largest}", f"x eager img/s b{largest}", "{:.2f}"),
    ]
    result = []
    for graph in dict.fromkeys(r["graph"] for r in rows):
        graph_rows = [r for r in rows if r["graph"] == graph]
        result.append(Section(graph, graph_rows, columns, [
            f"source: {graph_rows[0]['source']}",
            "Latency columns are batch 1; x eager compares with PyTorch eager on the same "
            "graph, device and threads (above 1: faster than eager). On a busy machine min "
            "is the steadiest figure; compare p50s only from an idle one.",
        ]))
    targets = target_rows(rows, config)
    if targets:
        result.append(Section("Targets", targets, [
            Column("target", "Target"), Column("goal", "Goal"),
            Column("format", "Format"), Column("measured", "Measured"),
            Column("met", "Met"),
        ], ["int8 meets a target only if its accuracy holds: see the accuracy benchmark."]))
    return result


def plot(rows: list[dict], config: LatencyConfig, path: Path) -> Path | None:
    batches = sorted(set(config.batch_sizes) | {1})
    panels: dict[str, dict] = {}
    for row in rows:
        points = [(b, 1e3 / row[f"ips_b{b}"]) for b in batches if row.get(f"ips_b{b}")]
        if not points:
            continue
        threads = "" if row["threads"] is None else f", {row['threads']}t"
        label = f"{row['format']} {row['device_name']}{threads}"
        panels.setdefault(row["graph"], {})[label] = ([p[0] for p in points],
                                                      [p[1] for p in points])
    return plot_series(path, panels, xlabel="batch size",
                              ylabel="ms per image (1 / throughput)",
                              title="Model-only latency per image vs batch size")


# ----------------------------------------------------------------------------- CLI
def _resolve_config(quick: bool, **given) -> LatencyConfig:
    base = QUICK if quick else LatencyConfig()
    return replace(base, **{k: v for k, v in given.items() if v is not None})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "runs", multiple=True, type=click.Path(path_type=Path),
              help="Training run directory or checkpoint (repeatable). PyTorch rows use it; "
                   "onnxruntime rows use its --model-dir, or a fresh flowae-export of it.")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(path_type=Path),
              help="flowae-export output directory (repeatable; pairs with --run in order).")
@click.option("--variant", "variants", multiple=True,
              help="Fresh seeded weights of this variant, exported on the fly (repeatable). "
                   "Default when no model is given: --variant upsample --variant base.")
@click.option("--role", "roles", multiple=True, type=click.Choice(ROLES),
              help="Graphs to time [default: both].")
@click.option("--batch-sizes", help="Comma-separated batch sizes for throughput "
                                    "[default 1,8,32,64,256; --quick 1,8].")
@click.option("--threads", "threads_text", help="Comma-separated CPU thread counts "
                                                "[default 1,2; --quick 1].")
@click.option("--repeats", type=click.IntRange(min=1),
              help="Timed batch-1 calls at most [default 200; --quick 10].")
@click.option("--throughput-repeats", type=click.IntRange(min=1),
              help="Timed calls per larger batch at most [default 50; --quick 3].")
@click.option("--warmup", type=click.IntRange(min=0), help="Untimed batch-1 calls "
                                                          "[default 10; --quick 1].")
@click.option("--budget-s", type=click.FloatRange(min=0), help="Seconds per timed series "
              "before stopping early (after a minimum of calls) [default 2; --quick 0.2].")
@click.option("--quick", is_flag=True, help="Smoke-test sizes: a few calls, batch 1 and 8.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of fresh weights and random inputs.")
@click.option("--plain-export/--no-plain-export", default=True, show_default=True,
              help="Also time a plain torch.onnx.export of each graph (needs a checkpoint).")
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Ask flowae-export for int8 files when exporting here.")
@click.option("--fp16/--no-fp16", default=True, show_default=True,
              help="Ask flowae-export for fp16 files when exporting here.")
@click.option("--data-root", type=click.Path(path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Flowers102 folder for export's parity check and int8 "
                                      "calibration.")
@click.option("--work-dir", type=click.Path(path_type=Path),
              help="Keep fresh checkpoints and exports here [default: a temporary folder].")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / NAME,
              show_default=True, help="Folder for latency.json, latency.md, latency.png.")
def main(runs, model_dirs, variants, roles, batch_sizes, threads_text, repeats,
         throughput_repeats, warmup, budget_s, quick, seed, plain_export, int8, fp16,
         data_root, work_dir, out):
    """Time each graph in PyTorch eager and onnxruntime; write JSON, Markdown and a plot."""
    try:
        config = _resolve_config(
            quick,
            batch_sizes=batch_sizes and parse_int_list(batch_sizes, "--batch-sizes"),
            threads=threads_text and parse_int_list(threads_text, "--threads"),
            latency_repeats=repeats, throughput_repeats=throughput_repeats, warmup=warmup,
            budget_s=budget_s, seed=seed)
        if not (runs or model_dirs or variants):
            variants = ("upsample", "base")
        with tempfile.TemporaryDirectory(prefix="flowae-bench-") as tmp:
            work = Path(work_dir) if work_dir else Path(tmp)
            header = machine_header()
            sources = prepare_sources(runs, model_dirs, variants, seed=seed,
                                             work_dir=work, data_root=data_root, int8=int8,
                                             fp16=fp16, quick_export=quick)
            rows = run_latency(sources, roles or ROLES, config, work, plain_export,
                               progress=lambda text: click.echo(f"timing {text}", err=True))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    header["settings"] = {
        "batch sizes": ", ".join(map(str, config.batch_sizes)),
        "threads": ", ".join(map(str, config.threads)),
        "timing": f"warm-up {config.warmup} calls, then up to {config.latency_repeats} timed "
                  f"batch-1 calls (at least {config.min_repeats}, stop after {config.budget_s}"
                  f" s); per larger batch {config.throughput_warmup} + up to "
                  f"{config.throughput_repeats}",
        "models": "; ".join(f"{s.name}: {s.origin}" for s in sources),
    }
    secs = sections(rows, config)
    paths = write_report(out, NAME, "Model-only latency: PyTorch eager vs onnxruntime",
                                header, rows, secs, extra={"config": asdict(config)})
    paths["plot"] = plot(rows, config, Path(out) / f"{NAME}.png")
    click.echo(paths["markdown"].read_text())
    click.echo(echo_paths(paths))


if __name__ == "__main__":
    main()
