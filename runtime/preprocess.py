"""Image -> model input, exactly as training's eval transform does it, with NumPy and Pillow.

The rule is the contract's `Preprocess` (carried in each graph's metadata): RGB as
runtime.images states, resize so the shorter side is `resize_px` with PIL bilinear (which
antialiases, as torchvision's Resize does on PIL images), center-crop `image_size_px` (zero
padding where the image is smaller, as torchvision's CenterCrop), divide by 255, then
(x - mean) / std in float32. A parity test holds this to 1e-6 of flowae.data.eval_transform.
On top of the contract, the runtime refuses images it cannot use meaningfully: a shorter side
under MIN_SIDE_PX, or sides more unequal than MAX_ASPECT_RATIO. Imports numpy, Pillow and the
runtime's contract, errors and images only.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import ContractError, ImageError
from flowae.runtime.images import load_rgb

# A 1x1 or 4x4 image is a few colours: the model would still answer, confidently and wrongly.
MIN_SIDE_PX = 8
# Beyond this the centre crop sees a sliver, and the resize of a 1,000,000 x 1 px image (well
# inside Pillow's pixel limit) to a 100 px shorter side would need 10^10 pixels of memory.
MAX_ASPECT_RATIO = 20.0

ImageSource = str | os.PathLike | Image.Image | np.ndarray


def describe(source: ImageSource) -> str:
    """How an input is named in messages: its path, or what kind of in-memory image it is."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {tuple(source.shape)}>"
    return os.fspath(source) if isinstance(source, str | os.PathLike) else repr(source)


def check_geometry(size: tuple[int, int], name: str) -> None:
    """Refuse images too small or too elongated to classify (see the module docstring)."""
    width, height = size
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE_PX:
        raise ImageError(
            f"{name}: image is {width}x{height} px, too small "
            f"(the shorter side must be at least {MIN_SIDE_PX} px)"
        )
    if long / short > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{name}: image is {width}x{height} px, too elongated "
            f"(aspect ratio {long / short:.0f}:1, at most {MAX_ASPECT_RATIO:.0f}:1)"
        )


def resized_size(size: tuple[int, int], resize_px: int) -> tuple[int, int]:
    """(width, height) with the shorter side resize_px, torchvision's rounding for the longer."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize_px * long / short)
    return (resize_px, new_long) if width <= height else (new_long, resize_px)


def resize_crop(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB PIL image -> uint8 (S, S, 3): Resize(resize_px) then CenterCrop(image_size_px)."""
    if spec.resize_filter != "bilinear":
        raise ContractError(f"unsupported resize filter {spec.resize_filter!r}; expected bilinear")
    new_size = resized_size(image.size, spec.resize_px)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image)  # (h, w, 3)
    crop = spec.image_size_px
    height, width = pixels.shape[:2]
    if crop > width or crop > height:  # torchvision pads with zeros, then crops
        pad_w, pad_h = max(crop - width, 0), max(crop - height, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2),
                                 (0, 0)))
        height, width = pixels.shape[:2]
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return pixels[top : top + crop, left : left + crop]  # (S, S, 3)


def normalize(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S): /255, then (x - mean) / std."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    chw = np.moveaxis(pixels, -1, -3).astype(np.float32)  # (..., 3, S, S)
    return (chw / np.float32(255.0) - mean) / std


def denormalize(images: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Inverse of `normalize`, clipped, rounded: float32 (..., 3, S, S) -> uint8 (..., S, S, 3)."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    unit = np.clip(images * std + mean, 0.0, 1.0)
    return np.moveaxis(np.round(unit * 255.0).astype(np.uint8), -3, -1)


def load_pixels(source: ImageSource, spec: Preprocess, *, jpeg_draft: bool = False) -> np.ndarray:
    """Any input -> uint8 (S, S, 3), the crop the model sees, or ImageError naming the input."""
    name = describe(source)
    draft_px = spec.resize_px if jpeg_draft else None
    try:
        image = load_rgb(source, draft_px=draft_px)
    except ImageError as exc:
        if isinstance(source, str | os.PathLike):
            raise  # load_rgb already names the file
        raise ImageError(f"{name}: {exc}") from exc
    check_geometry(image.size, name)
    return resize_crop(image, spec)


def preprocess(
    source: ImageSource, spec: Preprocess | None = None, *, jpeg_draft: bool = False
) -> np.ndarray:
    """A path, PIL image or uint8 array -> float32 (3, S, S), the model's input for one image.

    `spec` defaults to the contract's default rule; pass the model's (Predictor.preprocess).
    `jpeg_draft=True` decodes JPEG files at reduced size first (faster, not bit-exact).
    """
    spec = spec or Preprocess()
    return normalize(load_pixels(source, spec, jpeg_draft=jpeg_draft), spec)
