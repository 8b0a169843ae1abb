"""`export_model`: a training run in, a verified model directory out, or nothing at all.

Every file is first written to a temporary directory beside the output directory, checked
(onnx's full checker, the parity gate against PyTorch on real images, the int8 accuracy gate),
and only then moved in with os.replace, the manifest last. A failure raises ExportError and
leaves the output directory as it was. `ExportOptions` holds every default of the stage.
Imports numpy, torch, onnxruntime, flowae (checkpoint, data, models), flowae.export and the
runtime's contract and errors; onnx is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flowae import __version__
from flowae.checkpoint import (
    atomic_write_bytes,
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)
from flowae.data import DEFAULT_DATA_ROOT, SPLITS, load_split, preprocess_for, to_float
from flowae.export import parity
from flowae.export.onnx_export import (
    MIN_OPSET,
    check_io,
    copy_io_shapes,
    export_graph,
    graph_modules,
    opset_of,
    set_metadata,
    tensor_shapes,
    with_explicit_pads,
    write_model,
)
from flowae.export.quantize import quantize_int8, to_float16
from flowae.models import FlowAE
from flowae.runtime.contract import (
    CONTRACT_VERSION,
    EXTRA_TEST_TOP1,
    EXTRA_TEST_TOP5,
    GRAPH_IO,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    OUTPUT_LATENT,
    OUTPUT_LOGITS,
    PRECISIONS,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    Preprocess,
    graph_file,
)
from flowae.runtime.errors import ExportError

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=True)"  # the torch.export-based exporter
RECOMMEND_CHOICES = ("auto", "fp32", "int8")
MODEL_FILE_MODE = 0o644  # temp files are created owner-only; model files are for everyone


@dataclass(frozen=True)
class ExportOptions:
    """Every default of `flowae-export`."""

    data_root: Path = DEFAULT_DATA_ROOT  # folder holding flowers-102/, as for flowae-train
    opset: int | None = None  # ONNX opset; None: the exporter's default
    int8: bool = False  # also write static QDQ int8 graphs
    fp16: bool = False  # also write float16 graphs (for GPU execution providers)
    rewrite_convs: bool = True  # exact conv rewrite for onnxruntime's CPU kernels (convs.py)
    trace_batch: int = 2  # batch of the example input; >= 2 keeps the batch axis dynamic
    split: str = "val"  # images for the parity gate and the accuracy figures
    resize_px: int | None = None  # test-time resize of the shorter side before the centre
    # crop; None: the input side. Choose it on val (python -m benchmarks.resize).
    test_accuracy: bool = False  # measure PyTorch's test top-1/top-5 with the exported
    # preprocessing into the metadata (for a final candidate; the run's own test figures
    # hold only for the preprocessing it trained with)
    max_images: int | None = None  # use the split's first N images only; None: all of it
    fp32_atol: float = 1e-4  # parity gate: max |onnx - torch| on logits, latent, decoder
    fp16_atol: float = 1e-2  # fp16 gate: |onnx - torch| <= fp16_atol + fp16_rtol * |torch|
    fp16_rtol: float = 1e-2  # float16 keeps 11 significant bits; weights round at 2**-11
    calibration_images: int = 256  # training images (seeded sample) for int8 calibration
    calibration_seed: int = 0  # which training images calibrate
    int8_max_drop_points: float = 1.0  # most top-1 points (on `split`) int8 may lose vs fp32
    allow_accuracy_drop: bool = False  # keep an int8 that loses more (never served by default)
    recommend: str = "auto"  # auto: the fastest precision that keeps accuracy; fp32; int8
    latency_rounds: int = 30  # rounds timing fp32 against int8 at batch 1 for "auto"
    int8_speed_margin: float = 0.9  # auto serves int8 only at <= this x fp32's p10 latency,
    # so that timing noise on a busy machine cannot flip the choice

    def validate(self) -> None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if self.opset is not None and not MIN_OPSET <= self.opset <= newest:
            raise ExportError(f"opset must be between {MIN_OPSET} and {newest} (onnx "
                              f"{onnx.__version__}), got {self.opset}")
        if self.trace_batch < 2:
            raise ExportError(f"trace batch must be >= 2 to keep the batch axis dynamic, "
                              f"got {self.trace_batch}")
        if self.split not in SPLITS:
            raise ExportError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ExportError(f"max images must be >= 1, got {self.max_images}")
        if self.calibration_images < 1:
            raise ExportError(f"calibration images must be >= 1, got {self.calibration_images}")
        for name in ("fp32_atol", "fp16_atol", "fp16_rtol"):
            if not getattr(self, name) >= 0:
                raise ExportError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.int8_max_drop_points):
            raise ExportError("int8 max drop must be a finite number of points")
        if self.recommend not in RECOMMEND_CHOICES:
            raise ExportError(f"recommend must be one of {', '.join(RECOMMEND_CHOICES)}, "
                              f"got {self.recommend!r}")
        if self.recommend == "int8" and not self.int8:
            raise ExportError("recommending int8 needs the int8 export (--int8)")
        if not 0 < self.int8_speed_margin <= 1:
            raise ExportError(f"int8 speed margin must be in (0, 1], got "
                              f"{self.int8_speed_margin}")
        if self.latency_rounds < 1:
            raise ExportError(f"latency rounds must be >= 1, got {self.latency_rounds}")


def _versions() -> dict:
    import onnx

    return {"flowae": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def _file_entry(path: Path, role: str, precision: str) -> dict:
    return {"role": role, "precision": precision, "size_bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


class _Export:
    """One export in a scratch directory: graphs, figures and the manifest's pieces."""

    def __init__(self, model: FlowAE, payload: dict, checkpoint: Path, options: ExportOptions,
                 work: Path, test_figures: dict | None = None):
        self.model, self.options, self.work = model, options, work
        self.preprocess = preprocess_for(model.config, options.resize_px)
        self.shapes = tensor_shapes(model)
        if test_figures is not None:
            test, source = test_figures, "flowae-export --test-accuracy (PyTorch, this resize)"
        elif self.preprocess == preprocess_for(model.config):
            test, source = payload.get("test") or {}, "flowae-train (end of the run)"
        else:  # the run measured test with another resize: its figures do not describe this
            test, source = {}, "not measured with this preprocessing (see --test-accuracy)"
        self.provenance = {
            "checkpoint_sha256": file_sha256(checkpoint),
            EXTRA_TEST_TOP1: test.get("top1"), EXTRA_TEST_TOP5: test.get("top5"),
            "test_figures_from": source,
            "exporter": EXPORTER, "rewrite_convs": options.rewrite_convs,
            "exported_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            # How the weights were made: enough to rerun flowae-train with the same options.
            "model_config": payload["model_config"], "train_config": payload["train_config"],
            "train_seconds": payload.get("train_seconds"),
        }
        self.files: dict[str, dict] = {}
        self.protos: dict[str, object] = {}  # role -> fp32 ModelProto
        self.sessions: dict[tuple[str, str], ort.InferenceSession] = {}
        self.outputs: dict[tuple[str, str], dict] = {}  # (role, precision) -> onnx outputs

    def metadata(self, role: str, precision: str, opset: int) -> ModelMetadata:
        extra = {**self.provenance, "precision": precision, "opset": opset}
        return ModelMetadata(role=role, variant=self.model.config.name,
                             preprocess=self.preprocess,
                             latent_shape=tuple(self.model.latent_shape()), extra=extra)

    def inputs(self, role: str, images: np.ndarray, reference: dict) -> np.ndarray:
        return images if role == ROLE_ENCODER_CLASSIFIER else reference[OUTPUT_LATENT]

    def write(self, proto, role: str, precision: str) -> Path:
        check_io(proto, role, self.shapes)
        set_metadata(proto, self.metadata(role, precision, opset_of(proto)))
        path = self.work / graph_file(role, precision)
        write_model(proto, path)
        path.chmod(MODEL_FILE_MODE)
        self.files[path.name] = _file_entry(path, role, precision)
        self.sessions[role, precision] = parity.make_session(path)
        return path

    def measure(self, role: str, precision: str, images: np.ndarray, reference: dict,
                tolerance: parity.Tolerance) -> dict:
        session = self.sessions[role, precision]
        outputs = parity.run_graph(session, self.inputs(role, images, reference))
        figures = parity.compare(outputs, reference, tolerance)
        self.files[graph_file(role, precision)]["parity"] = figures
        self.outputs[role, precision] = outputs
        return figures

    def fp32(self, images: np.ndarray, reference: dict) -> None:
        tolerance = parity.Tolerance(atol=self.options.fp32_atol)
        for role, module in graph_modules(self.model, self.options.rewrite_convs).items():
            (input_name,), _ = GRAPH_IO[role]
            example = torch.zeros(self.options.trace_batch, *self.shapes[input_name])
            proto = export_graph(module, role, example, self.options.opset, self.shapes)
            self.protos[role] = proto
            path = self.write(with_explicit_pads(proto) if self.options.rewrite_convs else proto,
                              role, "fp32")
            parity.check(self.measure(role, "fp32", images, reference, tolerance), path.name)

    def int8(self, calibration_images: np.ndarray, images: np.ndarray, reference: dict) -> None:
        import onnx

        calibration = {ROLE_ENCODER_CLASSIFIER: calibration_images}
        with torch.no_grad():  # the decoder calibrates on the latents it will be fed
            latents = self.model.encoder(torch.from_numpy(calibration_images))  # (N, 16, 22, 22)
        calibration[ROLE_DECODER] = latents.numpy()
        scratch = self.work / "int8-scratch"
        scratch.mkdir()
        report_only = parity.Tolerance(atol=None, min_top1_agreement_pct=None)
        for role in GRAPH_IO:
            plain, raw = scratch / graph_file(role, "fp32"), scratch / graph_file(role, "int8")
            write_model(self.protos[role], plain)  # without explicit pads (see with_explicit_pads)
            quantize_int8(plain, raw, calibration[role], scratch)
            proto = onnx.load(str(raw))
            copy_io_shapes(proto, self.protos[role])
            self.write(proto, role, "int8")
            self.measure(role, "int8", images, reference, report_only)
        shutil.rmtree(scratch)

    def fp16(self, images: np.ndarray, reference: dict) -> None:
        tolerance = parity.Tolerance(atol=self.options.fp16_atol, rtol=self.options.fp16_rtol,
                                     min_top1_agreement_pct=None)
        for role, proto in self.protos.items():
            path = self.write(to_float16(proto), role, "fp16")
            parity.check(self.measure(role, "fp16", images, reference, tolerance), path.name)


def _accuracy(export: _Export, reference: dict, labels: np.ndarray, options: ExportOptions
              ) -> dict:
    """Top-1 (%) of PyTorch and of every precision written, on the same images."""
    top1 = {"pytorch": parity.top1_pct(reference[OUTPUT_LOGITS], labels)}
    for (role, precision), outputs in export.outputs.items():
        if role == ROLE_ENCODER_CLASSIFIER:
            top1[precision] = parity.top1_pct(outputs[OUTPUT_LOGITS], labels)
    accuracy = {"split": options.split, "images": int(len(labels)), "top1_pct": top1}
    if "int8" in top1:
        drop = top1["fp32"] - top1["int8"]
        accuracy.update({"int8_drop_points": drop,
                         "int8_max_drop_points": options.int8_max_drop_points,
                         "int8_within_gate": drop <= options.int8_max_drop_points})
    return accuracy


def _recommend(export: _Export, accuracy: dict, images: np.ndarray, reference: dict,
               options: ExportOptions) -> tuple[str, str, dict]:
    """(precision, reason, latency figures): the fastest CPU file that keeps accuracy."""
    if options.recommend != "auto":
        return options.recommend, "chosen by the recommend option", {}
    if not options.int8:
        return "fp32", "the only CPU precision exported", {}
    latency = {"batch": 1, "threads": "onnxruntime default",
               "decided_on": f"p10, int8 at most {options.int8_speed_margin:g} x fp32"}
    for role in GRAPH_IO:
        one = np.ascontiguousarray(export.inputs(role, images, reference)[:1])
        latency[role] = parity.latency_ms(
            {p: export.sessions[role, p] for p in ("fp32", "int8")}, one,
            rounds=options.latency_rounds)
    if not accuracy["int8_within_gate"]:
        return "fp32", f"int8 loses more {options.split} top-1 than allowed", latency
    int8_ms, fp32_ms = (latency[ROLE_ENCODER_CLASSIFIER][p]["p10"] for p in ("int8", "fp32"))
    figures = f"p10 {int8_ms:.3f} vs {fp32_ms:.3f} ms at batch 1"
    if int8_faster(latency, options.int8_speed_margin):
        return "int8", (f"int8 {ROLE_ENCODER_CLASSIFIER} is faster ({figures}) within the "
                        f"accuracy gate"), latency
    return "fp32", f"int8 {ROLE_ENCODER_CLASSIFIER} is not clearly faster ({figures})", latency


def int8_faster(latency: dict, margin: float) -> bool:
    """Whether the int8 encoder_classifier beats fp32 by `margin`, on the p10 figures."""
    timing = latency[ROLE_ENCODER_CLASSIFIER]
    return timing["int8"]["p10"] <= margin * timing["fp32"]["p10"]


def _manifest(export: _Export, checkpoint: Path, options: ExportOptions, accuracy: dict,
              latency: dict, recommended: str, reason: str) -> dict:
    """The model directory's report: provenance, gates and figures, and one entry per file."""
    provenance = export.provenance
    return {
        "contract_version": CONTRACT_VERSION,
        "variant": export.model.config.name,
        "checkpoint": {"path": str(checkpoint), "checkpoint_sha256":
                       provenance["checkpoint_sha256"],
                       "test_top1": provenance[EXTRA_TEST_TOP1],
                       "test_top5": provenance[EXTRA_TEST_TOP5],
                       "test_figures_from": provenance["test_figures_from"],
                       "train_config": provenance["train_config"],
                       "train_seconds": provenance["train_seconds"]},
        "exporter": EXPORTER,
        "opset": opset_of(export.protos[ROLE_ENCODER_CLASSIFIER]),
        "rewrite_convs": options.rewrite_convs,
        "exported_utc": provenance["exported_utc"],
        "versions": provenance["versions"],
        "parity": {"split": options.split, "images": accuracy["images"],
                   "fp32_tolerance": parity.Tolerance(options.fp32_atol).describe(),
                   "fp16_tolerance": parity.Tolerance(
                       options.fp16_atol, options.fp16_rtol, None).describe()},
        "accuracy": accuracy,
        "latency_ms": latency,
        MANIFEST_RECOMMENDED: recommended,
        "recommended_reason": reason,
        "files": export.files,
    }


def _load_images(root: Path, split: str, preprocess: Preprocess, limit: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    data = load_split(root, split, preprocess)
    images, labels = data.images[:limit], data.labels[:limit]
    return to_float(images, preprocess).numpy(), labels.numpy()


def _test_accuracy(model: FlowAE, root: Path, preprocess: Preprocess) -> dict:
    """PyTorch's top-1/top-5 (%) on the whole test split with `preprocess`."""
    from flowae.distributed import DistInfo
    from flowae.train import evaluate

    test = load_split(root, "test", preprocess)
    result = evaluate(model, test, preprocess, 128, torch.device("cpu"), DistInfo())
    return {"top1": result["top1"], "top5": result["top5"], "images": len(test)}


def _calibration_images(root: Path, preprocess: Preprocess, count: int, seed: int) -> np.ndarray:
    images, _ = _load_images(root, "train", preprocess, None)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(images), size=min(count, len(images)), replace=False))
    return images[chosen]


def _move_in(work: Path, out_dir: Path, names: list[str]) -> None:
    """Replace the directory's graphs and manifest with the verified ones, manifest last.

    The old manifest goes first, so a directory caught halfway holds no manifest that
    describes files it no longer has; graphs of precisions this export did not write are
    removed so none can be served beside a newer manifest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for name in names:
        os.replace(work / name, out_dir / name)
    for role in GRAPH_IO:
        for precision in PRECISIONS:
            stale = out_dir / graph_file(role, precision)
            if stale.name not in names:
                stale.unlink(missing_ok=True)
    os.replace(work / MANIFEST_NAME, out_dir / MANIFEST_NAME)


def export_model(run_dir_or_checkpoint: Path, out_dir: Path,
                 options: ExportOptions = ExportOptions()) -> dict:
    """Export a training run to `out_dir`; return the manifest written there.

    Raises ExportError (or another FlowaeError: CheckpointError, DataError) and leaves
    `out_dir` untouched when any step or gate fails.
    """
    options.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    checkpoint = resolve_checkpoint(Path(run_dir_or_checkpoint))
    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload)
    preprocess = preprocess_for(model.config, options.resize_px)
    images, labels = _load_images(options.data_root, options.split, preprocess,
                                  options.max_images)
    calibration = (_calibration_images(options.data_root, preprocess,
                                       options.calibration_images, options.calibration_seed)
                   if options.int8 else None)
    reference = parity.torch_reference(model, torch.from_numpy(images))
    test_figures = (_test_accuracy(model, options.data_root, preprocess)
                    if options.test_accuracy else None)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"cannot write beside {out_dir}: {exc.strerror or exc}") from exc
    try:
        export = _Export(model, payload, checkpoint, options, work, test_figures)
        export.fp32(images, reference)
        if options.int8:
            export.int8(calibration, images, reference)
        if options.fp16:
            export.fp16(images, reference)
        accuracy = _accuracy(export, reference, labels, options)
        if options.int8 and not accuracy["int8_within_gate"] and not options.allow_accuracy_drop:
            top1 = accuracy["top1_pct"]
            raise ExportError(
                f"int8 loses {accuracy['int8_drop_points']:.2f} points of {options.split} top-1 "
                f"(fp32 {top1['fp32']:.2f}% -> int8 {top1['int8']:.2f}% on {len(labels)} "
                f"images), more than the {options.int8_max_drop_points:g} allowed; nothing "
                f"written (allow it with --allow-accuracy-drop, or export without --int8)")
        recommended, reason, latency = _recommend(export, accuracy, images, reference, options)
        manifest = _manifest(export, checkpoint, options, accuracy, latency, recommended, reason)
        text = json.dumps(manifest, indent=2, sort_keys=False).encode()
        atomic_write_bytes(work / MANIFEST_NAME, lambda handle: handle.write(text))
        (work / MANIFEST_NAME).chmod(MODEL_FILE_MODE)
        try:
            _move_in(work, out_dir, list(export.files))
        except OSError as exc:
            raise ExportError(f"cannot move the export into {out_dir}: {exc.strerror or exc}") \
                from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("exported %s to %s (recommended %s)", model.config.name, out_dir, recommended)
    return manifest
