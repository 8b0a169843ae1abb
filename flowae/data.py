"""Oxford 102 Flowers, decoded once into uint8 tensors held in memory.

The split files are torchvision's layout (`ROOT/flowers-102/{jpg,imagelabels.mat,setid.mat}`);
`--download` uses torchvision's own downloader. Images go through the contract's eval
transform (built here from `Preprocess`, the same rule the runtime applies), optionally into a
larger "store" size that training-time augmentation crops from. Imports torch, torchvision,
scipy and the runtime's contract and image loader.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from flowae.runtime.contract import NUM_CLASSES, Preprocess
from flowae.runtime.errors import DataError, ImageError
from flowae.runtime.images import load_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # names inside setid.mat
BASE_FOLDER = "flowers-102"
DEFAULT_DATA_ROOT = Path("data/flowers102")  # where --download puts it unless told otherwise


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


@dataclass(frozen=True)
class SplitFiles:
    """Image paths and 0-based labels of one official split."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]


def _missing_message(root: Path, what: str) -> str:
    return (
        f"Flowers102 not found or corrupt in {root} ({what}); pass --data-root pointing at the "
        f"folder that holds {BASE_FOLDER}/, or add --download to fetch it"
    )


def download(root: Path) -> None:
    """Fetch the dataset with torchvision's downloader (needs internet)."""
    from torchvision.datasets import Flowers102

    try:
        for split in SPLITS:
            Flowers102(str(root), split=split, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"download of Flowers102 into {root} failed: {exc}") from exc


def split_files(root: Path, split: str) -> SplitFiles:
    """Read the official split and labels as torchvision's Flowers102 does (labels 0..101)."""
    import zlib

    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    base = Path(root) / BASE_FOLDER
    images_dir = base / "jpg"
    if not images_dir.is_dir():
        raise DataError(_missing_message(root, f"no folder {images_dir}"))
    try:
        set_ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
        image_labels = loadmat(str(base / "imagelabels.mat"), squeeze_me=True)
        ids = np.atleast_1d(set_ids[_SPLIT_KEYS[split]]).astype(int).tolist()
        all_labels = np.atleast_1d(image_labels["labels"]).astype(int)
    # loadmat reports a damaged file with any of these (truncated: OSError, IndexError,
    # MatReadError; a flipped byte in the compressed original files: zlib.error).
    except (OSError, ValueError, KeyError, TypeError, IndexError, MatReadError,
            zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(_missing_message(root, f"split/label files unreadable: {reason}")) from exc
    paths = tuple(images_dir / f"image_{i:05d}.jpg" for i in ids)
    try:
        labels = tuple(int(all_labels[i - 1]) - 1 for i in ids)
    except IndexError as exc:
        raise DataError(_missing_message(root, "setid.mat and imagelabels.mat disagree")) from exc
    if any(not 0 <= label < NUM_CLASSES for label in labels):
        raise DataError(_missing_message(root, "labels outside 1..102 in imagelabels.mat"))
    return SplitFiles(paths, labels)


@dataclass
class TensorSplit:
    """A whole split in memory: uint8 images (N, 3, S, S) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_split(
    root: Path, split: str, preprocess: Preprocess, store_px: int | None = None, workers: int = 2
) -> TensorSplit:
    """Decode every image of `split` once.

    With `store_px` the images are resized/cropped to that side instead of the model's input
    side (for random-resized-crop augmentation); otherwise to the eval transform's output.
    """
    files = split_files(root, split)
    if store_px is not None:
        preprocess = Preprocess(store_px, store_px, preprocess.mean, preprocess.std,
                                preprocess.resize_filter)
    transform = eval_transform(preprocess)

    def decode(path: Path) -> torch.Tensor:
        try:
            return transform(load_rgb(path))
        except ImageError as exc:
            raise DataError(_missing_message(root, str(exc))) from exc

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        images = list(pool.map(decode, files.paths))
    log.info("decoded %d %s images from %s", len(images), split, root)
    return TensorSplit(torch.stack(images), torch.tensor(files.labels, dtype=torch.int64))
