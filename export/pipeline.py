"""`export_model`: a training run in, a verified model directory out, or nothing at all.

The whole model directory (graphs, optional ORT-format copies, manifest) is first built in a
scratch folder beside the output, checked (onnx's full checker, the parity gate against
PyTorch on real images, the int8 accuracy gate), then swapped in place of the old directory
as a whole by flowae.export.install, which also clears what killed exports left behind. A
failure raises ExportError and leaves the output directory as it was. The images come from
the run's own data: Flowers102 under `data_root`, or for a class-folder run the split its
checkpoint recorded, reopened where it was or under `data` (`export_data`). `ExportOptions`
holds every default of the stage. Imports numpy, torch, onnxruntime, flowae (checkpoint, data,
models), flowae.export and the runtime (contract, errors, files, session); onnx is imported
inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flowae import __version__
from flowae.checkpoint import (
    checkpoint_class_names,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)
from flowae.data import (
    DEFAULT_DATA_ROOT,
    SPLITS,
    Dataset,
    load_split,
    preprocess_for,
    reopen_dataset,
    to_float,
)
from flowae.export import parity
from flowae.export.install import check_replaceable, install, recover, scratch_prefix
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
from flowae.export.ort_format import write_ort
from flowae.export.quantize import quantize_int8, to_float16
from flowae.export.resize import candidate_sizes, choose, evaluate_split, sweep
from flowae.models import FlowAE
from flowae.runtime.contract import (
    CONTRACT_VERSION,
    EXTRA_TEST_TOP1,
    EXTRA_TEST_TOP5,
    GRAPH_IO,
    MANIFEST_FILES,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
    OUTPUT_LATENT,
    OUTPUT_LOGITS,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    Preprocess,
    graph_file,
)
from flowae.runtime.errors import CheckpointError, DataError, ExportError
from flowae.runtime.files import write_bytes_atomic
from flowae.runtime.modeldir import sha256_of
from flowae.runtime.session import create_session

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=True)"  # the torch.export-based exporter
RECOMMEND_CHOICES = ("auto", "fp32", "int8")
RESIZE_AUTO = "auto"  # resize_px value: choose the test-time resize on val (export.resize)
# Provider families a manifest recommends a precision for, beyond the measured CPU choice.
GPU_FAMILIES = ("cuda", "tensorrt")  # serve the float16 graphs where exported
FP32_FAMILIES = ("openvino",)  # compiles fp32 graphs itself; our int8/fp16 were not measured there
Step = Callable[[str], None]  # told each step's name as the export passes it
# Precisions that get an .ort copy. The converter optimises for onnxruntime's CPU provider,
# which casts float16 weights back to float32 (an fp16 .ort came out as large as the fp32
# one), so float16, a GPU precision, stays .onnx only.
ORT_PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class ExportOptions:
    """Every default of `flowae-export`."""

    data_root: Path = DEFAULT_DATA_ROOT  # folder holding flowers-102/, as for flowae-train
    data: Path | None = None  # class-folder runs: where their data is now; None: where the
    # checkpoint recorded it (refused for a Flowers102 run, which reads data_root)
    opset: int | None = None  # ONNX opset; None: the exporter's default
    int8: bool = False  # also write static QDQ int8 graphs
    fp16: bool = False  # also write float16 graphs (for GPU execution providers)
    rewrite_convs: bool = True  # exact conv rewrite for onnxruntime's CPU kernels (convs.py)
    trace_batch: int = 2  # batch of the example input; >= 2 keeps the batch axis dynamic
    split: str = "val"  # images for the parity gate and the accuracy figures
    resize_px: int | str | None = None  # test-time resize of the shorter side before the
    # centre crop; None: the input side; "auto": the best val top-1 of a sweep (export.resize)
    ort_format: bool = False  # also write .ort copies and required_operators.config
    atomic_exchange: bool = True  # swap the model directory in with one renameat2 exchange
    # where Linux offers it; False: two renames (flowae.export.install describes both)
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
        if not (self.resize_px is None or self.resize_px == RESIZE_AUTO
                or (isinstance(self.resize_px, int) and self.resize_px >= 1)):
            raise ExportError(f"resize must be a size in px or {RESIZE_AUTO!r}, "
                              f"got {self.resize_px!r}")


def _versions() -> dict:
    import onnx

    return {"flowae": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def _file_entry(path: Path, role: str | None = None, precision: str | None = None,
                fmt: str = "onnx") -> dict:
    entry = {"size_bytes": path.stat().st_size, "sha256": sha256_of(path)}
    if role is not None:
        entry = {"role": role, "precision": precision, "format": fmt, **entry}
    return entry


def _class_names(payload: dict, num_classes: int) -> tuple[str, ...]:
    """The checkpoint's class names (its dataset's; Flowers102's for older checkpoints)."""
    names = checkpoint_class_names(payload)
    if len(names) != num_classes:
        raise CheckpointError(f"checkpoint names {len(names)} classes, its model has "
                              f"{num_classes} outputs")
    return names


class _Export:
    """One export in a scratch directory: graphs, figures and the manifest's pieces."""

    def __init__(self, model: FlowAE, payload: dict, checkpoint: Path, options: ExportOptions,
                 preprocess: Preprocess, work: Path, test_figures: dict | None = None):
        self.model, self.options, self.work = model, options, work
        self.preprocess = preprocess
        self.class_names = _class_names(payload, model.config.num_classes)
        self.shapes = tensor_shapes(model)
        if test_figures is not None:
            test, source = test_figures, "flowae-export --test-accuracy (PyTorch, this resize)"
        elif self.preprocess == preprocess_for(model.config):
            test, source = payload.get("test") or {}, "flowae-train (end of the run)"
        else:  # the run measured test with another resize: its figures do not describe this
            test, source = {}, "not measured with this preprocessing (see --test-accuracy)"
        self.provenance = {
            "checkpoint_sha256": sha256_of(checkpoint),
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
                             preprocess=self.preprocess, class_names=self.class_names,
                             latent_shape=tuple(self.model.latent_shape()), extra=extra)

    def inputs(self, role: str, images: np.ndarray, reference: dict) -> np.ndarray:
        return images if role == ROLE_ENCODER_CLASSIFIER else reference[OUTPUT_LATENT]

    def write(self, proto, role: str, precision: str) -> Path:
        check_io(proto, role, self.shapes)
        set_metadata(proto, self.metadata(role, precision, opset_of(proto)))
        path = self.work / graph_file(role, precision)
        write_model(proto, path)
        self.files[path.name] = _file_entry(path, role, precision)
        self.sessions[role, precision] = create_session(path)
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

    def ort_format(self, images: np.ndarray, reference: dict) -> None:
        """An .ort copy of every fp32 and int8 graph, gated on giving the .onnx file's
        outputs."""
        graphs = {name: (entry["role"], entry["precision"]) for name, entry in self.files.items()
                  if entry["precision"] in ORT_PRECISIONS}
        written, config = write_ort([self.work / name for name in graphs], self.work, self.work)
        for path, (role, precision) in zip(written, graphs.values(), strict=True):
            entry = self.files[path.name] = _file_entry(path, role, precision, "ort")
            outputs = parity.run_graph(create_session(path),
                                       self.inputs(role, images, reference))
            # The .ort holds the graph optimised at conversion, without the x86-only NCHWc
            # layout; a session on the .onnx optimises at load, with it: float32 rounding.
            entry["parity"] = figures = parity.compare(
                outputs, self.outputs[role, precision],
                parity.Tolerance(atol=self.options.fp32_atol, min_top1_agreement_pct=None))
            figures["against"] = graph_file(role, precision)
            parity.check(figures, path.name)
        self.files[config.name] = _file_entry(config)


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


def recommend_by_provider(cpu: str, cpu_reason: str, fp16_written: bool
                          ) -> tuple[dict[str, str], dict[str, str]]:
    """({provider family: precision}, {provider family: reason}) for the manifest.

    CPU gets the measured choice. GPU providers get float16 when it was exported (it passed
    its parity gate; their kernels run it natively), else fp32; int8 QDQ is measured on the
    CPU only, so it is never recommended elsewhere.
    """
    precision, reason = {"cpu": cpu}, {"cpu": cpu_reason}
    for family in GPU_FAMILIES:
        precision[family] = "fp16" if fp16_written else "fp32"
        reason[family] = ("fp16 passed its parity gate; GPU kernels run float16 natively"
                          if fp16_written else "no fp16 graphs exported (flowae-export --fp16)")
    for family in FP32_FAMILIES:
        precision[family] = "fp32"
        reason[family] = "compiles the fp32 graph itself; other precisions not measured there"
    return precision, reason


def _manifest(export: _Export, checkpoint: Path, options: ExportOptions, accuracy: dict,
              latency: dict, recommended: str, reason: str, resize: dict, data: dict) -> dict:
    """The model directory's report: provenance, gates and figures, and one entry per file."""
    provenance = export.provenance
    by_provider, reasons = recommend_by_provider(recommended, reason, options.fp16)
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
        "preprocess": export.preprocess.to_dict(),
        "resize": resize,
        "data": data,
        "trained_on_splits": (["train", "val"] if _trained_on_val(provenance["train_config"])
                              else ["train"]),
        "parity": {"split": options.split, "images": accuracy["images"],
                   "fp32_tolerance": parity.Tolerance(options.fp32_atol).describe(),
                   "fp16_tolerance": parity.Tolerance(
                       options.fp16_atol, options.fp16_rtol, None).describe()},
        "accuracy": accuracy,
        "latency_ms": latency,
        MANIFEST_RECOMMENDED: recommended,  # the CPU's; what runtimes before per-provider read
        "recommended_reason": reason,
        MANIFEST_RECOMMENDED_BY_PROVIDER: by_provider,
        "recommended_reason_by_provider": reasons,
        MANIFEST_FILES: export.files,
    }


CLASS_FOLDERS = "class-folders"  # the "kind" a class-folder run records for its dataset


def export_data(payload: dict, options: ExportOptions) -> Path | Dataset:
    """Where a run's parity, calibration and accuracy images come from: the folder holding
    Flowers102 (`options.data_root`) for a Flowers102 run, else the class-folder dataset the
    checkpoint recorded, split as training split it, at `options.data` or where it was."""
    record = payload.get("dataset")
    if record is None or record.get("kind") != CLASS_FOLDERS:
        if options.data is not None:
            raise ExportError("this run trained on Flowers102: give its folder with "
                              "--data-root, not --data (which is for class-folder runs)")
        return Path(options.data_root)
    root = Path(record["root"]) if options.data is None else Path(options.data)
    if options.data is None and not root.is_dir():
        raise DataError(f"{root}: the class folders this run trained on are no longer there; "
                        f"pass --data pointing at where they are now")
    dataset = reopen_dataset(record, root)
    now = dataset.describe()
    changed = [key for key in ("layout", "val_fraction", "split_seed", "images")
               if record.get(key) != now[key]]
    if changed:
        raise DataError(f"{root}: not the split this run trained on (its {', '.join(changed)} "
                        f"differ from what the checkpoint recorded)")
    return dataset


def _data_root(data: Path | Dataset) -> Path:
    return data.root if isinstance(data, Dataset) else data


def _data_record(data: Path | Dataset) -> dict:
    """The manifest's "data": which images the gates and figures used."""
    if not isinstance(data, Dataset):
        return {"kind": "flowers102", "root": str(data)}
    described = data.describe()
    return {key: described[key] for key in ("kind", "root", "layout", "num_classes", "images",
                                            "val_fraction", "split_seed")}


def _load_images(data: Path | Dataset, split: str, preprocess: Preprocess, limit: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    tensors = load_split(data, split, preprocess)
    images, labels = tensors.images[:limit], tensors.labels[:limit]
    return to_float(images, preprocess).numpy(), labels.numpy()


def _calibration_images(data: Path | Dataset, preprocess: Preprocess, count: int, seed: int
                        ) -> np.ndarray:
    images, _ = _load_images(data, "train", preprocess, None)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(images), size=min(count, len(images)), replace=False))
    return images[chosen]


def _trained_on_val(train_config: dict) -> bool:
    """Whether phase 2 learned the val split's labels (flowae.config.TrainConfig.cls_images)."""
    return train_config.get("cls_images", "train") == "train+val"


def _choose_preprocess(model: FlowAE, data: Path | Dataset, options: ExportOptions
                       ) -> tuple[Preprocess, dict]:
    """The exported preprocessing and how its resize was chosen (the manifest's "resize")."""
    if options.resize_px != RESIZE_AUTO:
        preprocess = preprocess_for(model.config, options.resize_px)
        source = "the model's input side" if options.resize_px is None else "--resize-px"
        return preprocess, {"resize_px": preprocess.resize_px, "chosen_by": source}
    rows = sweep(model, data, candidate_sizes(model.config.image_size_px))
    best = choose(rows)
    log.info("resize sweep on val: %s; chose %d px", rows, best["resize_px"])
    return preprocess_for(model.config, best["resize_px"]), {
        "resize_px": best["resize_px"],
        "chosen_by": "best val top-1 of PyTorch over the sweep, ties to the smaller size",
        "sweep": rows}


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_not_an_input(out_dir: Path, checkpoint: Path, data_root: Path) -> None:
    """Refuse an output directory that is, or lies inside, one of the export's inputs."""
    if _inside(checkpoint, out_dir):
        raise ExportError(f"{out_dir} holds the checkpoint being exported; choose another --out")
    if _inside(out_dir, data_root):
        raise ExportError(f"{out_dir} lies inside the data root {data_root}; choose another "
                          f"--out")


def _scratch_dir(out_dir: Path) -> Path:
    """An empty scratch folder beside `out_dir`, with the mode the model directory will have."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=scratch_prefix(out_dir), dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"cannot write beside {out_dir}: {exc.strerror or exc}") from exc
    if out_dir.is_dir():
        mode = out_dir.stat().st_mode & 0o7777
    else:
        mask = os.umask(0)
        os.umask(mask)
        mode = 0o777 & ~mask
    work.chmod(mode)  # mkdtemp makes it owner-only
    return work


def export_model(run_dir_or_checkpoint: Path, out_dir: Path,
                 options: ExportOptions = ExportOptions(), on_step: Step | None = None) -> dict:
    """Export a training run to `out_dir`; return the manifest written there.

    `out_dir` must be absent, empty or a model directory an export wrote; it is replaced
    whole (flowae.export.install). `on_step(name)` is called as the export passes "scratch"
    (scratch folder made), "graphs" (fp32 graphs written there), "manifest" (scratch
    complete), then install's steps. Raises ExportError (or another FlowaeError:
    CheckpointError, DataError) and leaves `out_dir` untouched when any step or gate fails.
    """
    on_step = on_step or (lambda step: None)
    options.validate()
    out_dir = Path(out_dir)
    try:
        recover(out_dir)
    except OSError as exc:
        raise ExportError(f"cannot clear what an earlier export left beside {out_dir}: "
                          f"{exc.strerror or exc}") from exc
    check_replaceable(out_dir)
    checkpoint = resolve_checkpoint(Path(run_dir_or_checkpoint))
    payload = load_checkpoint(checkpoint)
    data = export_data(payload, options)
    _check_not_an_input(out_dir, checkpoint, _data_root(data))
    model = model_from_checkpoint(payload)
    if options.resize_px == RESIZE_AUTO and _trained_on_val(payload["train_config"]):
        raise ExportError("this model trained on the val split (cls_images=train+val), so val "
                          "cannot choose its resize; pass --resize-px N, chosen on a train-only "
                          "run of the same recipe")
    preprocess, resize = _choose_preprocess(model, data, options)
    images, labels = _load_images(data, options.split, preprocess, options.max_images)
    calibration = (_calibration_images(data, preprocess, options.calibration_images,
                                       options.calibration_seed)
                   if options.int8 else None)
    reference = parity.torch_reference(model, torch.from_numpy(images))
    test_figures = (evaluate_split(model, data, "test", preprocess)
                    if options.test_accuracy else None)

    work = _scratch_dir(out_dir)
    on_step("scratch")
    try:
        export = _Export(model, payload, checkpoint, options, preprocess, work, test_figures)
        export.fp32(images, reference)
        on_step("graphs")
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
        if options.ort_format:
            export.ort_format(images, reference)
        recommended, reason, latency = _recommend(export, accuracy, images, reference, options)
        manifest = _manifest(export, checkpoint, options, accuracy, latency, recommended, reason,
                             resize, _data_record(data))
        text = json.dumps(manifest, indent=2)
        manifest = json.loads(text)  # what a reader of the file gets (lists, not tuples)
        write_bytes_atomic(work / MANIFEST_NAME, text.encode())
        on_step("manifest")
        try:
            install(work, out_dir, on_step, exchange=options.atomic_exchange)
        except OSError as exc:
            raise ExportError(f"cannot move the export into {out_dir}: {exc.strerror or exc}") \
                from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)  # after a swap: the old model, or nothing
    log.info("exported %s to %s (recommended %s)", model.config.name, out_dir, recommended)
    return manifest
