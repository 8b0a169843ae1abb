"""Accuracy of the deployed model, measured through the runtime alone (no torch, no scipy).

`evaluate` runs a Predictor over Flowers102's official test split (top-1/top-5; the split and
labels are read from the dataset's own .mat files by a small MATLAB v5 reader here) and,
optionally, over a folder of full-size photos listed in labels.csv (file,label,class_name).
Each set is run twice, with full JPEG decoding (bit-exact with training's eval transform) and
with reduced-size decoding (Pillow's draft), and the report states the top-1 difference, the
share of images whose top-1 changed and how many images the draft actually reduced: the figure
that decides whether reduced decoding may be the default. Imports numpy, Pillow and the
runtime only; the CLI (runtime.cli --evaluate) prints what this returns.
"""

from __future__ import annotations

import csv
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flowae.runtime.contract import EXTRA_TEST_TOP1, EXTRA_TEST_TOP5
from flowae.runtime.errors import DataError
from flowae.runtime.images import draft_scale
from flowae.runtime.predictor import Predictor, ProgressFn

# torchvision's Flowers102 layout: ROOT/flowers-102/{jpg/, imagelabels.mat, setid.mat}.
FLOWERS102_FOLDER = "flowers-102"
SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # arrays inside setid.mat
FULLRES_LABELS = "labels.csv"  # beside jpg/ in a full-size photo folder

# MATLAB v5 element types -> NumPy dtypes (numeric data only).
_MAT_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8",
               12: "i8", 13: "u8"}  # fmt: skip
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS
_COMPLEX_FLAG = 0x0800


def _mat_elements(buffer: bytes, order: str):
    """Yield (type, payload) of each data element, the small 4-byte form included."""
    pos = 0
    while pos + 8 <= len(buffer):
        mdtype, nbytes = struct.unpack_from(order + "II", buffer, pos)
        if mdtype >> 16:  # small element: size in the high half, data in the next 4 bytes
            yield mdtype & 0xFFFF, buffer[pos + 4 : pos + 4 + (mdtype >> 16)]
            pos += 8
            continue
        yield mdtype, buffer[pos + 8 : pos + 8 + nbytes]
        # Compressed elements are not padded; everything else is, to 8 bytes.
        pos += 8 + (nbytes if mdtype == _MI_COMPRESSED else (nbytes + 7) // 8 * 8)


def _mat_matrix(payload: bytes, order: str) -> tuple[str, np.ndarray] | None:
    parts = list(_mat_elements(payload, order))
    if len(parts) < 4:
        return None
    flags = np.frombuffer(parts[0][1], order + "u4")
    if flags[0] & 0xFF not in _NUMERIC_CLASSES or flags[0] & _COMPLEX_FLAG:
        return None  # cells, structs, chars and complex numbers: not needed here
    dims = tuple(int(d) for d in np.frombuffer(parts[1][1], order + "i4"))
    name = parts[2][1].decode("ascii")
    real_type, real = parts[3]
    if real_type not in _MAT_DTYPES:
        return None
    values = np.frombuffer(real, order + _MAT_DTYPES[real_type])
    return name, values.reshape(dims, order="F")


def read_mat(path: Path) -> dict[str, np.ndarray]:
    """The numeric arrays of a MATLAB v5 .mat file (what setid.mat and imagelabels.mat hold)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI") or not data.startswith(b"MATLAB"):
        raise DataError(f"{path}: not a MATLAB 5.0 .mat file")
    order = "<" if data[126:128] == b"IM" else ">"
    arrays: dict[str, np.ndarray] = {}
    try:
        for mdtype, payload in _mat_elements(data[128:], order):
            if mdtype == _MI_COMPRESSED:
                inner = zlib.decompress(payload)
                mdtype, payload = next(_mat_elements(inner, order))
            if mdtype == _MI_MATRIX:
                found = _mat_matrix(payload, order)
                if found is not None:
                    arrays[found[0]] = found[1]
    except (zlib.error, struct.error, ValueError, UnicodeDecodeError, StopIteration) as exc:
        raise DataError(f"{path}: corrupt .mat file ({exc})") from exc
    return arrays


def flowers102_split(root: Path, split: str = "test") -> tuple[list[Path], np.ndarray]:
    """Paths and 0-based labels of one official split, as torchvision's Flowers102 gives them."""
    if split not in SPLIT_KEYS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_KEYS)}")
    base = Path(root) / FLOWERS102_FOLDER
    for needed in (base / "jpg", base / "setid.mat", base / "imagelabels.mat"):
        if not needed.exists():
            raise DataError(f"{root}: not a Flowers102 folder (no {needed.relative_to(root)})")
    set_ids = read_mat(base / "setid.mat")
    all_labels = read_mat(base / "imagelabels.mat").get("labels")
    ids = set_ids.get(SPLIT_KEYS[split])
    if ids is None or all_labels is None:
        raise DataError(f"{base}: setid.mat or imagelabels.mat lacks its arrays")
    ids = ids.astype(np.int64).ravel()
    all_labels = all_labels.astype(np.int64).ravel()
    if ids.min() < 1 or ids.max() > len(all_labels):
        raise DataError(f"{base}: setid.mat and imagelabels.mat disagree")
    paths = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
    return paths, all_labels[ids - 1] - 1


def fullres_files(root: Path) -> tuple[list[Path], np.ndarray]:
    """Paths and labels of a full-size photo folder: ROOT/labels.csv and ROOT/jpg/FILE."""
    table = Path(root) / FULLRES_LABELS
    try:
        with open(table, newline="") as handle:
            rows = list(csv.DictReader(handle))
        paths = [Path(root) / "jpg" / row["file"] for row in rows]
        labels = np.array([int(row["label"]) for row in rows], dtype=np.int64)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{table}: expected a CSV with columns file,label ({exc})") from exc
    return paths, labels


@dataclass(frozen=True)
class Accuracy:
    """Top-1/top-5 (percent of the images that could be read) of one pass over a set."""

    images: int
    failed: int  # images that could not be read; they count as neither right nor wrong
    top1: float
    top5: float


def score(predictor: Predictor, paths: list[Path], labels: np.ndarray,
          progress: ProgressFn | None = None) -> tuple[Accuracy, np.ndarray]:
    """Accuracy over `paths`, and the top-1 label per image (-1 where it failed)."""
    top1_labels = np.full(len(paths), -1, dtype=np.int64)
    hits5 = 0
    for i, result in enumerate(predictor.run(paths, top_k=5, progress=progress)):
        if result.ok:
            top1_labels[i] = result.top_k[0].label
            hits5 += int(labels[i]) in {p.label for p in result.top_k}
    read = int((top1_labels >= 0).sum())
    top1 = 100.0 * int((top1_labels == labels).sum()) / max(read, 1)
    return Accuracy(len(paths), len(paths) - read, top1, 100.0 * hits5 / max(read, 1)), top1_labels


def reduced_by_draft(paths: list[Path], draft_px: int) -> int:
    """How many of `paths` are JPEGs large enough for the draft decode to shrink."""
    count = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                count += image.format == "JPEG" and draft_scale(image.size, draft_px) > 1
        except (OSError, ValueError):
            continue
    return count


def compare_decodes(full: Predictor, draft: Predictor, paths: list[Path], labels: np.ndarray,
                    progress: ProgressFn | None = None) -> dict:
    """Accuracy with full and with reduced-size JPEG decoding, and how far they differ."""
    full_acc, full_top1 = score(full, paths, labels, progress)
    draft_acc, draft_top1 = score(draft, paths, labels, progress)
    both = (full_top1 >= 0) & (draft_top1 >= 0)
    return {
        "full_decode": asdict(full_acc),
        "draft_decode": asdict(draft_acc),
        "draft_top1_drop": full_acc.top1 - draft_acc.top1,  # points; > 0: the draft is worse
        "draft_top1_changed_pct": 100.0 * float((full_top1 != draft_top1)[both].mean())
        if both.any() else 0.0,
        "draft_reduced_images": reduced_by_draft(paths, full.preprocess.resize_px),
    }


# Keys under which flowae-export copies the training run's own test figures (metadata extra).
PYTORCH_TEST_KEYS = {"top1": EXTRA_TEST_TOP1, "top5": EXTRA_TEST_TOP5}


def _pytorch_test_accuracy(extra: dict) -> dict | None:
    """The training run's test top-1/top-5 (percent) as the model's metadata carries them."""
    found = {name: extra.get(key) for name, key in PYTORCH_TEST_KEYS.items()}
    if not isinstance(found["top1"], int | float):
        return None
    return {name: float(value) for name, value in found.items() if isinstance(value, int | float)}


def evaluate(
    model: str | os.PathLike | None,
    data_root: Path,
    fullres_root: Path | None = None,
    *,
    provider: str = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    progress: ProgressFn | None = None,
) -> dict:
    """Test-split (and full-size photo) accuracy of a model, full vs reduced JPEG decoding."""
    options = {"provider": provider, "threads": threads, "batch_size": batch_size,
               "precision": precision}
    full = Predictor(model, jpeg_draft=False, **options)
    draft = Predictor(model, jpeg_draft=True, **options)
    report = {
        "model": str(full.files.encoder_classifier),
        "precision": full.files.precision,
        "provider": full.provider,
        "variant": full.metadata.variant,
    }
    paths, labels = flowers102_split(Path(data_root), "test")
    report["test"] = compare_decodes(full, draft, paths, labels, progress)
    pytorch = _pytorch_test_accuracy(full.metadata.extra)
    if pytorch is not None:
        report["pytorch_test"] = pytorch
        report["runtime_minus_pytorch_top1"] = report["test"]["full_decode"]["top1"] - pytorch[
            "top1"]
    if fullres_root is not None:
        paths, labels = fullres_files(Path(fullres_root))
        report["fullres"] = compare_decodes(full, draft, paths, labels, progress)
    return report
