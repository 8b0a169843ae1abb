"""The models a benchmark runs, and where they come from: a training run (its checkpoint), an
exported model directory (flowae-export's files), or freshly initialised seeded weights of a
registry variant, written as a checkpoint and exported on the fly; plus the plain
`torch.onnx.export` file flowae-export is measured against and the sizes each format takes.

Imports the standard library, the benchmarks' options and row statuses, the runtime, and
(inside the functions that need them) torch, flowae and flowae.export. Nothing outside
benchmarks/ imports this module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.options import BenchmarkError
from benchmarks.report import first_line

log = logging.getLogger(__name__)


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

    Laid out by flowae.checkpoint's builder, as training lays out its own, so export and the
    PyTorch rows load it as they load a real run. Speed does not depend on the weights;
    accuracy of course does.
    """
    import torch

    from flowae.checkpoint import checkpoint_payload, save_checkpoint
    from flowae.config import TrainConfig
    from flowae.models import build_model, get_variant

    config = get_variant(variant)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    save_checkpoint(Path(path), checkpoint_payload(
        config, TrainConfig(seed=seed), model, progress={"ae": 0, "cls": 0},
        history={"ae": [], "cls": []},
        note=f"fresh weights (seed {seed}), untrained: written by benchmarks for speed runs"))
    return Path(path)


# flowae.export options that shrink an export for a smoke run: parity and calibration images,
# latency rounds for the precision choice.
QUICK_EXPORT = {"max_images": 32, "calibration_images": 32, "latency_rounds": 3}


def export_options(data_root: Path, *, int8: bool, fp16: bool, quick: bool = False):
    """flowae.export's ExportOptions for a benchmark export.

    Benchmarks measure accuracy, they do not gate on it: `allow_accuracy_drop` is set, so an
    int8 file that loses accuracy is still written and its loss shows in the accuracy table.
    """
    from flowae.export import ExportOptions

    return ExportOptions(data_root=Path(data_root), int8=int8, fp16=fp16,
                         allow_accuracy_drop=True, **(QUICK_EXPORT if quick else {}))


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


