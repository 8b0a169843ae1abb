"""Labelled image datasets on disk, as lists of (path, label) plus class names: one reader each.

Three layouts: Oxford 102 Flowers as torchvision lays it out (`ROOT/flowers-102/{jpg/,
imagelabels.mat, setid.mat}`, the official train/val/test split), class folders as torchvision's
ImageFolder and Ultralytics' classify datasets use them (`ROOT/train/<class>/*`,
`ROOT/val/<class>/*`, optional `ROOT/test/<class>/*`, or a single `ROOT/<class>/*` split into
train/val by a seeded, stratified fraction), and a folder of full-size photos listed in
labels.csv. Nothing is decoded here: training (flowae.data) turns the files into tensors and
the runtime's evaluation feeds them to a Predictor. The readers live in the runtime, not in
flowae, so that `flowae-infer --evaluate` works on a runtime-only install; that is also why
the .mat files are read by the small MATLAB v5 reader below rather than by scipy. Imports
numpy, the standard library and the runtime's contract and errors only.
"""

from __future__ import annotations

import csv
import logging
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flowae.runtime.contract import CLASS_NAMES
from flowae.runtime.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path("data/flowers102")  # where `flowae-train --download` puts Flowers102
FLOWERS102_FOLDER = "flowers-102"  # torchvision's folder name under the data root
SPLITS = ("train", "val", "test")
SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # arrays inside setid.mat
FULLRES_LABELS = "labels.csv"  # beside jpg/ in a full-size photo folder
DEFAULT_VAL_FRACTION = 0.1  # share of each class held out for val in a single class folder
# torchvision's ImageFolder suffixes; other files in a class folder are not images to it either.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                            ".webp", ".gif"})


class SplitFiles(NamedTuple):
    """Image paths and 0-based labels of one split, in a fixed order (`paths, labels = ...`)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset: its class names (label i is class_names[i]) and its splits."""

    kind: str  # "flowers102" | "class-folders"
    root: Path
    class_names: tuple[str, ...]
    splits: Mapping[str, SplitFiles]  # "train", "val" and, when the data has one, "test"
    layout: str = ""  # class folders: "split" (train/ val/ [test/]) or "single" (ROOT/<class>/)
    val_fraction: float | None = None  # "single" layout: share of each class held out for val
    split_seed: int | None = None  # "single" layout: seed of that draw

    def split(self, name: str) -> SplitFiles:
        if name not in self.splits:
            raise DataError(f"{self.root}: no {name} split (this dataset has "
                            f"{', '.join(self.splits)})")
        return self.splits[name]

    def describe(self) -> dict:
        """What a run records about its data (JSON): enough to tell another dataset apart."""
        return {
            "kind": self.kind, "root": str(self.root), "layout": self.layout,
            "class_names": list(self.class_names), "num_classes": len(self.class_names),
            "images": {name: len(files.paths) for name, files in self.splits.items()},
            "val_fraction": self.val_fraction, "split_seed": self.split_seed,
        }


# --- MATLAB v5 files (setid.mat, imagelabels.mat) -------------------------------------------

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
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
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


# --- Oxford 102 Flowers -----------------------------------------------------------------------

def _flowers_error(root: Path, what: str) -> DataError:
    return DataError(f"Flowers102 not found or corrupt in {root} ({what})")


def flowers102_split(root: Path, split: str = "test") -> SplitFiles:
    """Paths and 0-based labels of one official split, as torchvision's Flowers102 gives them."""
    if split not in SPLIT_KEYS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_KEYS)}")
    root = Path(root)
    base = root / FLOWERS102_FOLDER
    for needed in (base / "jpg", base / "setid.mat", base / "imagelabels.mat"):
        if not needed.exists():
            raise _flowers_error(root, f"no {needed}")
    try:
        ids = read_mat(base / "setid.mat").get(SPLIT_KEYS[split])
        all_labels = read_mat(base / "imagelabels.mat").get("labels")
    except DataError as exc:
        raise _flowers_error(root, f"split/label files unreadable: {exc}") from exc
    if ids is None or all_labels is None or ids.size == 0:
        raise _flowers_error(root, "setid.mat or imagelabels.mat lacks its arrays")
    ids = ids.astype(np.int64).ravel()
    all_labels = all_labels.astype(np.int64).ravel()
    if ids.min() < 1 or ids.max() > len(all_labels):
        raise _flowers_error(root, "setid.mat and imagelabels.mat disagree")
    labels = all_labels[ids - 1] - 1
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise _flowers_error(root, f"labels outside 1..{len(CLASS_NAMES)} in imagelabels.mat")
    paths = tuple(base / "jpg" / f"image_{i:05d}.jpg" for i in ids)
    return SplitFiles(paths, tuple(int(label) for label in labels))


def open_flowers102(root: Path) -> Dataset:
    """All three official splits and the 102 class names."""
    splits = {name: flowers102_split(root, name) for name in SPLITS}
    return Dataset("flowers102", Path(root), CLASS_NAMES, splits)


# --- Full-size photos listed in labels.csv ----------------------------------------------------

def fullres_files(root: Path, num_classes: int = len(CLASS_NAMES)) -> SplitFiles:
    """Paths and labels of a full-size photo folder: ROOT/labels.csv (file,label[,class_name])
    naming images in ROOT/jpg/. Every row is checked: a label in 0..num_classes-1 and a file
    name that stays inside ROOT/jpg/ (no absolute path, no `..`)."""
    root = Path(root)
    table = root / FULLRES_LABELS
    try:
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"file", "label"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{table}: expected a CSV with columns file,label; "
                                f"missing {', '.join(sorted(missing))}")
            rows = [(reader.line_num, row) for row in reader]
    except OSError as exc:
        raise DataError(f"{table}: expected a CSV with columns file,label "
                        f"({exc.strerror or exc})") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{table}: expected a CSV with columns file,label ({exc})") from exc
    paths, labels = [], []
    for line, row in rows:
        where = f"{table} line {line}"
        name, label_text = row.get("file"), row.get("label")
        if not name or label_text is None:
            raise DataError(f"{where}: needs both a file and a label")
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{where}: file {name!r} is outside {root / 'jpg'}")
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{where}: label {label_text!r} is not an integer") from None
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} outside 0..{num_classes - 1}")
        paths.append(root / "jpg" / relative)
        labels.append(label)
    return SplitFiles(tuple(paths), tuple(labels))


# --- Class folders ----------------------------------------------------------------------------

def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Image files under `folder` (any depth), by suffix, sorted: what ImageFolder would list."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = {d.name: _images_in(d) for d in _visible_dirs(split_dir)}
    for name, files in classes.items():
        if not files:
            raise DataError(f"{split_dir / name}: class folder holds no image "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes


def _labelled(classes: dict[str, list[Path]], class_names: tuple[str, ...]) -> SplitFiles:
    index = {name: i for i, name in enumerate(class_names)}
    pairs = [(path, index[name]) for name, files in classes.items() for path in files]
    return SplitFiles(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


def stratified_split(classes: dict[str, list[Path]], val_fraction: float,
                     seed: int) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Hold out round(n * val_fraction) images of each class (at least one, never all) for val,
    drawn by `seed`; a class of one image stays in train."""
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for name in sorted(classes):
        files = classes[name]
        order = rng.permutation(len(files))
        n_val = min(max(1, round(len(files) * val_fraction)), len(files) - 1)
        held = set(order[:n_val].tolist())
        train[name] = [f for i, f in enumerate(files) if i not in held]
        val[name] = [f for i, f in enumerate(files) if i in held]
    return train, val


def open_class_folders(root: Path, val_fraction: float | None = None, seed: int = 0) -> Dataset:
    """A class-folder dataset. Class names are the sorted folder names of train (or of ROOT).

    `val_fraction` (default DEFAULT_VAL_FRACTION) applies to the single-folder layout only;
    giving it for a train/val layout is refused, since that layout already names its val set.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected ROOT/train/<class>/ and "
                        f"ROOT/val/<class>/, or ROOT/<class>/)")
    has = {name: (root / name).is_dir() for name in SPLITS}
    if has["train"]:
        if not has["val"]:
            raise DataError(f"{root}: has train/ but no val/ (or put the class folders "
                            f"directly in {root} to split them by the val fraction)")
        if val_fraction is not None:
            raise DataError(f"{root}: has train/ and val/ already; the val fraction applies to "
                            f"a single folder of classes only")
        found = {name: _class_files(root / name) for name in SPLITS if has[name]}
        layout, split_seed = "split", None
    else:
        if has["val"] or has["test"]:
            raise DataError(f"{root}: has val/ or test/ but no train/")
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        if not 0 < val_fraction < 1:
            raise DataError(f"val fraction must be in (0, 1), got {val_fraction}")
        found = dict(zip(("train", "val"), stratified_split(_class_files(root), val_fraction,
                                                            seed), strict=True))
        layout, split_seed = "single", seed
    class_names = tuple(sorted(found["train"]))
    if len(class_names) < 2:
        raise DataError(f"{root}: found {len(class_names)} class folder(s) "
                        f"{list(class_names)}; a classifier needs at least two")
    for name in ("val", "test"):
        stray = sorted(set(found.get(name, {})) - set(class_names))
        if stray:
            raise DataError(f"{root / name}: class {stray[0]!r} is not in train/ "
                            f"({len(stray)} such class(es))")
    splits = {name: _labelled(classes, class_names) for name, classes in found.items()}
    return Dataset("class-folders", root, class_names, splits, layout=layout,
                   val_fraction=val_fraction if layout == "single" else None,
                   split_seed=split_seed)


def open_dataset(root: Path, val_fraction: float | None = None, seed: int = 0) -> Dataset:
    """Flowers102 when ROOT holds flowers-102/, class folders otherwise."""
    if (Path(root) / FLOWERS102_FOLDER).exists():
        if val_fraction is not None:
            raise DataError(f"{root}: Flowers102 has an official val split; the val fraction "
                            f"applies to a single folder of classes only")
        return open_flowers102(root)
    return open_class_folders(root, val_fraction, seed)


def without_unreadable(files: SplitFiles, failed: Mapping[Path, str], class_names: tuple[str, ...],
                       *, strict: bool, what: str) -> SplitFiles:
    """`files` less the ones that failed to decode (path -> one-line reason), logged with a
    count; with `strict`, or when a class is left with no image, a DataError instead."""
    if not failed:
        return files
    first = next(iter(failed.values()))
    if strict:
        raise DataError(f"{what}: {len(failed)} unreadable image(s), e.g. {first}")
    kept = [(p, label) for p, label in zip(files.paths, files.labels, strict=True)
            if p not in failed]
    emptied = sorted(set(files.labels) - {label for _, label in kept})
    if emptied:
        raise DataError(f"{what}: class {class_names[emptied[0]]!r} has no readable image "
                        f"(e.g. {first})")
    log.warning("%s: skipped %d unreadable image(s), e.g. %s", what, len(failed), first)
    return SplitFiles(tuple(p for p, _ in kept), tuple(label for _, label in kept))
