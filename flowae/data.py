"""Training data decoded once into uint8 tensors held in memory.

Which files make up a split, and their labels and class names, comes from runtime.datasets
(Flowers102's official split, or class folders); this module only decodes them: the runtime's
image loader (the rules every input follows), then the contract's eval transform (built here
from `Preprocess`, the same rule the runtime applies), optionally into a larger "store" size
that training-time augmentation crops from. `--download` uses torchvision's own downloader.
Imports torch, torchvision and the runtime.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import transforms as T

from flowae.runtime.contract import CLASS_NAMES, Preprocess
from flowae.runtime.datasets import (
    DEFAULT_DATA_ROOT,
    FLOWERS102_FOLDER,
    SPLITS,
    Dataset,
    SplitFiles,
    flowers102_split,
    open_class_folders,
    without_unreadable,
)
from flowae.runtime.errors import DataError, ImageError
from flowae.runtime.images import load_rgb

log = logging.getLogger(__name__)

# Re-exported: the CLI, export and tests name them through this module.
__all__ = ["DEFAULT_DATA_ROOT", "SPLITS", "Dataset", "SplitFiles", "TensorSplit", "decode_files",
           "download", "eval_transform", "load_split", "open_training_data", "preprocess_for",
           "reopen_dataset", "split_files", "to_float", "to_uint8"]


def preprocess_for(model_config, resize_px: int | None = None) -> Preprocess:
    """The preprocessing rule a model config trains and deploys with (contract defaults):
    shorter side resized to `resize_px` (default: the input side), then a centre crop."""
    side = model_config.image_size_px
    resize_px = side if resize_px is None else resize_px
    if resize_px < side:
        raise DataError(f"resize size must be >= the model's input side {side}, got {resize_px}")
    return Preprocess(image_size_px=side, resize_px=resize_px)


def eval_transform(preprocess: Preprocess) -> T.Compose:
    """PIL RGB image -> uint8 (3, S, S) tensor; scaling to float happens in `to_float`."""
    if preprocess.resize_filter != "bilinear":
        raise DataError(f"unsupported resize filter {preprocess.resize_filter!r}")
    return T.Compose(
        [
            T.Resize(preprocess.resize_px, interpolation=T.InterpolationMode.BILINEAR,
                     antialias=True),
            T.CenterCrop(preprocess.image_size_px),
            T.PILToTensor(),
        ]
    )


def to_float(images_u8: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 scaled as the contract says ([-1, 1] by default)."""
    mean = torch.tensor(preprocess.mean, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def to_uint8(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Inverse of `to_float`, clamped: for plotting reconstructions."""
    mean = torch.tensor(preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=images.device).view(1, 3, 1, 1)
    return ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _missing_message(root: Path, what: str) -> str:
    return (f"{what}; pass --data-root pointing at the folder that holds {FLOWERS102_FOLDER}/, "
            f"or add --download to fetch it")


def download(root: Path) -> None:
    """Fetch the dataset with torchvision's downloader (needs internet)."""
    from torchvision.datasets import Flowers102

    try:
        for split in SPLITS:
            Flowers102(str(root), split=split, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"download of Flowers102 into {root} failed: {exc}") from exc


def split_files(root: Path, split: str) -> SplitFiles:
    """The official split as torchvision's Flowers102 reads it (labels 0..101), with the
    training CLI's hint on a missing or corrupt dataset."""
    try:
        return flowers102_split(root, split)
    except DataError as exc:
        if split not in SPLITS:
            raise
        raise DataError(_missing_message(root, str(exc))) from exc


def open_training_data(root: Path, *, class_folders: bool = False,
                       val_fraction: float | None = None, split_seed: int = 0) -> Dataset:
    """Flowers102 under `root` (the default), or a class-folder dataset at `root`."""
    if class_folders:
        return open_class_folders(root, val_fraction, split_seed)
    if val_fraction is not None:
        raise DataError("the val fraction applies to class-folder data only; Flowers102 has "
                        "an official val split")
    splits = {name: split_files(root, name) for name in SPLITS}
    return Dataset("flowers102", Path(root), CLASS_NAMES, splits)


def reopen_dataset(record: dict, root: Path | None = None) -> Dataset:
    """The data a run recorded (a checkpoint's or metrics.json's "dataset"), at `root` or where
    it was, split as it was (same val fraction and seed); DataError if its classes changed."""
    root = Path(root or record["root"])
    if record.get("kind") == "class-folders":
        dataset = open_class_folders(root, record.get("val_fraction"),
                                     record.get("split_seed") or 0)
    else:
        dataset = open_training_data(root)
    if list(dataset.class_names) != list(record["class_names"]):
        raise DataError(f"{root}: its classes are not the ones the run trained on")
    return dataset


@dataclass
class TensorSplit:
    """A whole split in memory: uint8 images (N, 3, S, S) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def decode_files(files: SplitFiles, preprocess: Preprocess, store_px: int | None = None,
                 workers: int = 2) -> tuple[TensorSplit, dict[Path, str]]:
    """Decode `files` once; return the images that decoded and {path: reason} for the rest.

    With `store_px` the images are resized/cropped to that side instead of the model's input
    side (for random-resized-crop augmentation); otherwise to the eval transform's output.
    An image the runtime's loader refuses fails here too, with its one-line reason.
    """
    if store_px is not None:
        preprocess = Preprocess(store_px, store_px, preprocess.mean, preprocess.std,
                                preprocess.resize_filter)
    transform = eval_transform(preprocess)

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return transform(load_rgb(path))
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        decoded = list(pool.map(decode, files.paths))
    failed = {p: out for p, out in zip(files.paths, decoded, strict=True) if isinstance(out, str)}
    kept = [(out, label) for out, label in zip(decoded, files.labels, strict=True)
            if not isinstance(out, str)]
    side = preprocess.image_size_px
    images = torch.stack([out for out, _ in kept]) if kept else torch.empty(0, 3, side, side,
                                                                            dtype=torch.uint8)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return TensorSplit(images, labels), failed


def load_split(data: Path | Dataset, split: str, preprocess: Preprocess,
               store_px: int | None = None, workers: int = 2, *, strict: bool = False
               ) -> TensorSplit:
    """Decode every image of `split` once: of Flowers102 under `data` when it is a path, else
    of the Dataset. Flowers102 must decode whole; a class-folder dataset skips unreadable
    images (counted in the log) unless `strict`."""
    if not isinstance(data, Dataset):
        data = Dataset("flowers102", Path(data), CLASS_NAMES, {split: split_files(data, split)})
    files = data.split(split)
    tensors, failed = decode_files(files, preprocess, store_px, workers)
    if failed and data.kind == "flowers102":
        raise DataError(_missing_message(data.root, next(iter(failed.values()))))
    if failed:
        without_unreadable(files, failed, data.class_names, strict=strict,
                           what=f"{data.root} {split}")
    log.info("decoded %d %s images from %s", len(tensors), split, data.root)
    return tensors
