"""What every benchmark script shares: the machine header, the timing loop, percentile rows,
the JSON/Markdown/PNG writers, and the models a benchmark runs (a training run, an exported
model directory, or freshly initialised seeded weights of a variant, exported on the fly).

Functions return values; only the scripts print. Timing uses time.perf_counter around each
call, with the garbage collector paused while a series runs. Imports the standard library,
numpy, the runtime and (inside the functions that need them) torch, onnxruntime, flowae,
flowae.export and matplotlib. Nothing imports this module but the benchmark scripts.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowae.runtime.errors import FlowaeError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA_ROOT = SHARED / "flowers102"  # Flowers102 test split (6149 images, 160 px)
DEFAULT_PHOTOS = SHARED / "flowers102-fullres"  # 306 full-size photos + labels.csv
DEFAULT_OUT = REPO / "runs" / "benchmarks"  # runs/ is git-ignored

# CPU features that decide which kernels onnxruntime and PyTorch can use.
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                         "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript",
            "numpy", "pillow", "flowae")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "ORT_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
NO_CUDA = "skipped: no CUDA device"


class BenchmarkError(FlowaeError):
    """A benchmark was asked for something it cannot do (bad path, conflicting options)."""


# ----------------------------------------------------------------------------- machine header
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cores.add((fields.get("physical id"), fields.get("core id")))
    return len(cores) or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which can be fewer than exist."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """1-minute load average: how busy the machine was (others' work included)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _command_line() -> str:
    """How this script was started: `python -m benchmarks.NAME ARGS` or `python FILE ARGS`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"-m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return " ".join(["python", program, *sys.argv[1:]])


def machine_header(*, torch_info: bool = True) -> dict:
    """CPU, cores, library versions, thread settings and load: what every report heads with.

    torch_info=False keeps torch out of this process (cold_start measures imports).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    header = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model_stepping": "/".join(
            info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "load_average_1m_at_start": load_average(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": _command_line(),
    }
    import onnxruntime as ort

    header["onnxruntime_providers"] = list(ort.get_available_providers())
    if torch_info:
        import torch

        header["torch_threads"] = torch.get_num_threads()
        header["torch_interop_threads"] = torch.get_num_interop_threads()
        header["cuda_device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                 else None)
    return header


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_label(device: str) -> str:
    """How a row names its device: "cpu", or "cuda (GPU name)" when torch sees one."""
    if device != "cuda" or not torch_cuda_available():
        return device
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})"


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class TimingPlan:
    """How long to time one case: warm up, then repeat until `repeats` or the time budget."""

    warmup: int = 10  # untimed calls first (allocations, caches, onnxruntime's arenas)
    repeats: int = 200  # timed calls at most
    min_repeats: int = 5  # timed calls at least, even when that overruns the budget
    budget_s: float = 2.0  # stop timing once this much has been spent (after min_repeats)


class gc_paused:
    """Context manager: no garbage collection inside a timed region (it would be noise)."""

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc_info):
        if self.was_enabled:
            gc.enable()
        return False


def time_once_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_calls_ms(fn: Callable[[], object], plan: TimingPlan) -> np.ndarray:
    """Per-call wall times in ms of `fn()` after `plan.warmup` untimed calls."""
    for _ in range(plan.warmup):
        fn()
    samples: list[float] = []
    with gc_paused():
        spent = 0.0
        while len(samples) < plan.repeats and (
            len(samples) < plan.min_repeats or spent < plan.budget_s
        ):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            samples.append(elapsed * 1e3)
            spent += elapsed
    return np.asarray(samples)


def latency_stats(samples_ms: Sequence[float] | np.ndarray, prefix: str = "") -> dict:
    """n, mean, std, min, p50, p90, p99 (ms) of a series, keys prefixed with `prefix`."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        return {f"{prefix}n": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        f"{prefix}n": int(values.size),
        f"{prefix}mean_ms": float(values.mean()),
        f"{prefix}std_ms": float(values.std()),
        f"{prefix}min_ms": float(values.min()),
        f"{prefix}p50_ms": float(p50),
        f"{prefix}p90_ms": float(p90),
        f"{prefix}p99_ms": float(p99),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def failed(exc: BaseException) -> str:
    """The status of a row whose format failed: 'failed: <one line>'."""
    return f"failed: {first_line(exc)}"


def is_ok(row: dict) -> bool:
    return row.get("status") == "ok"


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); every value a positive integer."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchmarkError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BenchmarkError(f"{what}: expected integers >= 1, got {text!r}")
    return values


# ----------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class Column:
    """One Markdown column: a row key, its header, and how a value is written."""

    key: str
    header: str
    fmt: str = "{}"  # e.g. "{:.2f}"; None and missing values are written as "-"

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        if isinstance(value, float) and not np.isfinite(value):
            return "-"
        return self.fmt.format(value) if not isinstance(value, str) else value


@dataclass
class Section:
    """A titled Markdown table with notes under it."""

    title: str
    rows: list[dict]
    columns: list[Column]
    notes: list[str] = dataclasses.field(default_factory=list)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = (c.cell(row).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_markdown(header: dict) -> str:
    """The machine header as a short Markdown list."""
    versions = ", ".join(f"{k} {v}" for k, v in header.get("versions", {}).items())
    cores = (f"{header.get('logical_cores')} logical / {header.get('physical_cores')} physical"
             f" / {header.get('usable_cores')} usable")
    lines = [
        f"- CPU: {header.get('cpu_model')} (family/model/stepping "
        f"{header.get('cpu_family_model_stepping')}; {' '.join(header.get('cpu_flags', []))})",
        f"- Cores: {cores}; load average (1 min) at start "
        f"{header.get('load_average_1m_at_start')}, at end {header.get('load_average_1m_at_end')}",
        f"- Versions: python {header.get('python')}, {versions}",
        f"- onnxruntime providers: {', '.join(header.get('onnxruntime_providers', []))}",
    ]
    if "torch_threads" in header:
        lines.append(
            f"- Threads: torch intra-op {header['torch_threads']}, inter-op "
            f"{header['torch_interop_threads']} at start (each row sets its own, see Threads); "
            f"environment {header.get('thread_env') or 'none set'}; CUDA device "
            f"{header.get('cuda_device') or 'none'}"
        )
    else:
        lines.append(f"- Thread environment: {header.get('thread_env') or 'none set'}")
    for key, value in header.get("settings", {}).items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- Command: `{header.get('command')}` at {header.get('started_at')}")
    return "\n".join(lines)


def render_markdown(title: str, header: dict, sections: Sequence[Section],
                    intro: str = "") -> str:
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += [header_markdown(header), ""]
    for section in sections:
        parts += [f"## {section.title}", "", markdown_table(section.rows, section.columns), ""]
        parts += [f"- {note}" for note in section.notes]
        if section.notes:
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_report(out_dir: Path, name: str, title: str, header: dict, rows: list[dict],
                 sections: Sequence[Section], extra: dict | None = None,
                 intro: str = "") -> dict[str, Path]:
    """Write OUT/name.json and OUT/name.md; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {**header, "load_average_1m_at_end": load_average()}
    payload = {"benchmark": name, "title": title, "header": header, "rows": rows,
               **(extra or {})}
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    md_path.write_text(render_markdown(title, header, sections, intro))
    return {"json": json_path, "markdown": md_path}


def plot_series(path: Path, panels: dict[str, dict[str, tuple[list, list]]], *, xlabel: str,
                ylabel: str, title: str, logx: bool = True, logy: bool = True) -> Path | None:
    """One subplot per panel, one line per label: {panel: {label: (xs, ys)}} -> PNG.

    Returns None (and writes nothing) when no panel has a point to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: {label: xy for label, xy in v.items() if xy[0]} for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, panels.items(), strict=False):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- models
@dataclass
class ModelSource:
    """One model to benchmark: a checkpoint for the PyTorch rows and/or exported ONNX graphs."""

    name: str  # row label: the variant name, made unique when two sources share it
    variant: str  # registry name of the model variant
    origin: str  # where it came from: "run PATH", "model dir PATH", "fresh weights, seed 0"
    checkpoint: Path | None = None  # PyTorch rows rebuild the model from this file
    model_dir: Path | None = None  # flowae-export's files (fp32 and, if written, int8/fp16)
    onnx_error: str | None = None  # why there is no model_dir (export missing or failed)


def write_fresh_checkpoint(variant: str, seed: int, path: Path) -> Path:
    """A flowae checkpoint of freshly initialised weights (torch.manual_seed(seed)), untrained.

    Written in the layout flowae.train writes, so export and the PyTorch rows load it as they
    load a real run. Speed does not depend on the weights; accuracy of course does.
    """
    import torch

    from flowae import __version__
    from flowae.checkpoint import save_checkpoint
    from flowae.models import build_model, get_variant
    from flowae.train import TrainConfig

    config = get_variant(variant)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    save_checkpoint(Path(path), {
        "model_config": config.to_dict(), "train_config": TrainConfig(seed=seed).to_dict(),
        "phase": "cls", "progress": {"ae": 0, "cls": 0}, "history": {"ae": [], "cls": []},
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "train_seconds": 0.0, "flowae_version": __version__,
        "note": f"fresh weights (seed {seed}), untrained: written by benchmarks for speed runs",
    })
    return Path(path)


# flowae.export options that shrink an export for a smoke run (parity and calibration images,
# latency rounds); each is passed only where ExportOptions has it.
QUICK_EXPORT = {"max_images": 32, "calibration_images": 32, "latency_rounds": 3}


def export_options(data_root: Path, *, int8: bool, fp16: bool, quick: bool = False):
    """flowae.export's ExportOptions for a benchmark export.

    Benchmarks measure accuracy, they do not gate on it: where ExportOptions has an
    `allow_accuracy_drop` switch it is set, so an int8 file that loses accuracy is still
    written and its loss shows in the accuracy table.
    """
    from flowae.export import ExportOptions

    names = {f.name for f in dataclasses.fields(ExportOptions)}
    options = {"data_root": Path(data_root), "int8": int8, "fp16": fp16,
               "allow_accuracy_drop": True, **(QUICK_EXPORT if quick else {})}
    required = {"data_root", "int8", "fp16"}
    return ExportOptions(**{k: v for k, v in options.items() if k in required or k in names})


def export_checkpoint(checkpoint: Path, out_dir: Path, data_root: Path, *, int8: bool = True,
                      fp16: bool = True, quick: bool = False) -> Path:
    """Export with flowae.export into out_dir (fp32, plus int8/fp16 when asked)."""
    from flowae.export import export_model

    out_dir.mkdir(parents=True, exist_ok=True)
    export_model(checkpoint, out_dir, export_options(data_root, int8=int8, fp16=fp16,
                                                     quick=quick))
    return out_dir


def model_dir_variant(model_dir: Path) -> str:
    """The variant an exported model directory holds, read from its metadata by the runtime."""
    from flowae.runtime.contract import ROLE_ENCODER_CLASSIFIER, graph_file
    from flowae.runtime.predictor import load_graph

    path = Path(model_dir)
    if not path.is_dir():
        raise BenchmarkError(f"{path}: not a model directory (flowae-export's --out)")
    graph = load_graph(path / graph_file(ROLE_ENCODER_CLASSIFIER), ROLE_ENCODER_CLASSIFIER,
                       "CPUExecutionProvider", threads=1)
    return graph.metadata.variant


def checkpoint_variant(run: Path) -> tuple[Path, str]:
    """(checkpoint file, variant) of a run directory or checkpoint file."""
    from flowae.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(Path(run))
    return path, str(load_checkpoint(path)["model_config"]["name"])


def prepare_sources(
    runs: Sequence[Path],
    model_dirs: Sequence[Path],
    variants: Sequence[str],
    *,
    seed: int,
    work_dir: Path,
    data_root: Path,
    export: bool = True,
    int8: bool = True,
    fp16: bool = True,
    quick_export: bool = False,
) -> list[ModelSource]:
    """Resolve the models a benchmark was given, exporting where ONNX files are missing.

    --run and --model-dir pair up in order when both are given (PyTorch rows from the run,
    onnxruntime rows from the directory); otherwise each run is exported into work_dir.
    --variant builds fresh seeded weights, written as a checkpoint and exported the same way.
    A failed export does not stop the benchmark: its rows show the failure.
    """
    from flowae.models import get_variant

    if runs and model_dirs and len(runs) != len(model_dirs):
        raise BenchmarkError(
            f"--run and --model-dir pair up in order: got {len(runs)} --run and "
            f"{len(model_dirs)} --model-dir"
        )
    sources: list[ModelSource] = []
    for i, run in enumerate(runs):
        checkpoint, variant = checkpoint_variant(run)
        source = ModelSource(variant, variant, f"run {run}", checkpoint=checkpoint)
        if model_dirs:
            found = model_dir_variant(model_dirs[i])
            if found != variant:
                raise BenchmarkError(
                    f"--model-dir {model_dirs[i]} holds variant {found!r}, its --run {run} "
                    f"holds {variant!r}"
                )
            source.model_dir, source.origin = Path(model_dirs[i]), f"run {run} + {model_dirs[i]}"
        sources.append(source)
    if not runs:
        for model_dir in model_dirs:
            variant = model_dir_variant(model_dir)
            sources.append(ModelSource(variant, variant, f"model dir {model_dir}",
                                       model_dir=Path(model_dir)))
    for variant in variants:
        get_variant(variant)  # an unknown name fails here, with the list of known ones
        checkpoint = write_fresh_checkpoint(
            variant, seed, Path(work_dir) / f"{variant}-seed{seed}" / "checkpoint.pt")
        sources.append(ModelSource(variant, variant, f"fresh weights, seed {seed}",
                                   checkpoint=checkpoint))
    _unique_names(sources)
    if export:
        for source in sources:
            if source.model_dir is None and source.checkpoint is not None:
                out = Path(work_dir) / f"{source.name}-onnx"
                try:
                    source.model_dir = export_checkpoint(source.checkpoint, out, data_root,
                                                         int8=int8, fp16=fp16,
                                                         quick=quick_export)
                except Exception as exc:  # a failed export becomes failure rows, not a crash
                    log.warning("export of %s failed: %s", source.name, first_line(exc))
                    source.onnx_error = f"export failed: {first_line(exc)}"
    return sources


def check_one_model(model: Path | None, run: Path | None, variant: str | None) -> None:
    """--model, --run and --variant exclude one another."""
    given = [f"--{name} {value}" for name, value in
             (("model", model), ("run", run), ("variant", variant)) if value]
    if len(given) > 1:
        raise BenchmarkError(f"give at most one of --model, --run, --variant; got "
                             f"{', '.join(given)}")


def one_runtime_model(model: Path | None, run: Path | None, variant: str | None, *,
                      seed: int, work_dir: Path, data_root: Path, quick_export: bool = False
                      ) -> tuple[Path | None, str]:
    """(what to give Predictor, where it came from) for scripts that run the runtime.

    One of: an exported model (directory or file), a run to export here, a variant's fresh
    weights to export here; none of them means the model bundled with the runtime (None).
    """
    check_one_model(model, run, variant)
    if model is not None:
        if not Path(model).exists():
            raise BenchmarkError(f"--model {model}: no such file or directory")
        return Path(model), f"model {model}"
    if run is None and variant is None:
        return None, "the model bundled with flowae.runtime"
    (source,) = prepare_sources([run] if run else [], [], [variant] if variant else [],
                                seed=seed, work_dir=work_dir, data_root=data_root,
                                quick_export=quick_export)
    if source.model_dir is None:
        raise BenchmarkError(f"no ONNX model for {source.origin}: {source.onnx_error}")
    return source.model_dir, f"{source.origin}, exported here with flowae.export"


def _unique_names(sources: list[ModelSource]) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        seen[source.name] = seen.get(source.name, 0) + 1
        if seen[source.name] > 1:
            source.name = f"{source.name}#{seen[source.name]}"


def plain_export(module, role: str, example, path: Path) -> Path:
    """The graph as plain `torch.onnx.export` writes it (TorchScript exporter, its defaults):
    the naive export flowae-export is measured against. Contract tensor names and a dynamic
    batch axis; no metadata, no graph rewrites."""
    import torch

    from flowae.runtime.contract import BATCH_AXIS, GRAPH_IO

    names_in, names_out = GRAPH_IO[role]
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), input_names=list(names_in),
            output_names=list(names_out), dynamo=False,
            dynamic_axes={name: {0: BATCH_AXIS} for name in names_in + names_out},
        )
    return path


def ort_session(path: Path, provider: str, threads: int | None):
    """A bare onnxruntime session with the runtime's options (intra-op threads, inter-op 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=[provider])


def weights_mb(checkpoint: Path, role: str) -> float:
    """Parameters and buffers of one graph's modules in a checkpoint, in MB (10^6 bytes):
    what PyTorch holds for that graph, comparable with the ONNX file's size."""
    from flowae.checkpoint import load_checkpoint
    from flowae.runtime.contract import ROLE_ENCODER_CLASSIFIER

    state = load_checkpoint(checkpoint)["model"]
    prefixes = ("encoder.", "classifier.") if role == ROLE_ENCODER_CLASSIFIER else ("decoder.",)
    return sum(t.numel() * t.element_size() for k, t in state.items()
               if k.startswith(prefixes)) / 1e6


def file_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6


def echo_paths(paths: dict[str, Path | None]) -> str:
    return "\n".join(f"wrote {kind}: {path}" for kind, path in paths.items() if path)
