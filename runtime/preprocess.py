"""Image -> model input, exactly as training's eval transform does it, with NumPy and Pillow.

The rule is the contract's `Preprocess` (carried in each graph's metadata): RGB as
runtime.images states, resize so the shorter side is `resize_px` with PIL bilinear (which
antialiases, as torchvision's Resize does on PIL images; small images are upscaled), center-crop
`image_size_px` (zero padding where the image is smaller, as torchvision's CenterCrop), divide
by 255, then (x - mean) / std in float32. Any image size is accepted, 1x1 included. Where the
full resize would be large (a panorama: a 1,000,000 x 1 px image resized to a 100 px shorter
side is 10^10 pixels), only the part the crop keeps is computed, with Pillow's own bilinear
arithmetic, so the result stays bit-exact. Files are opened under runtime.images' pixel budget
(`max_pixels`). Parity tests hold this to 1e-6 of flowae.data.eval_transform. Imports numpy,
Pillow and the runtime's contract, errors and images only.
"""

from __future__ import annotations

import math
import os

import numpy as np
import PIL
from PIL import Image

from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import ContractError, ImageError
from flowae.runtime.images import DEFAULT_MAX_PIXELS, load_rgb

# A resize larger than this (12 MB as RGB) computes only the pixels the crop keeps.
FULL_RESIZE_MAX_PX = 1 << 22
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
_PRECISION_BITS = 32 - 8 - 2  # fixed-point bits of Pillow's 8-bit resampling (Resample.c)

ImageSource = str | os.PathLike | Image.Image | np.ndarray


def describe(source: ImageSource) -> str:
    """How an input is named in messages: its path, or what kind of in-memory image it is."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {tuple(source.shape)}>"
    return os.fspath(source) if isinstance(source, str | os.PathLike) else repr(source)


def resized_size(size: tuple[int, int], resize_px: int) -> tuple[int, int]:
    """(width, height) with the shorter side resize_px, torchvision's rounding for the longer."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize_px * long / short)
    return (resize_px, new_long) if width <= height else (new_long, resize_px)


def crop_window(length: int, crop: int) -> tuple[int, int, int]:
    """One axis of CenterCrop on a resized side: (first kept index, kept count, zero padding
    before), with torchvision's rounding and its padding when the side is shorter."""
    if crop <= length:
        return int(round((length - crop) / 2.0)), crop, 0
    return 0, length, (crop - length) // 2


def bilinear_weights(in_size: int, out_size: int, start: int, count: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear taps for outputs start..start+count-1 of an in_size -> out_size
    resize: first source index (count,) and fixed-point weights (count, taps).

    The same double arithmetic as Pillow's precompute_coeffs and normalize_coeffs_8bpc, in the
    same order, so the integer weights are Pillow's."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C (int): toward zero
    used = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    distance = np.abs(((offsets + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(distance < 1.0, 1.0 - distance, 0.0)
    weights[offsets >= used[:, None]] = 0.0
    total = np.cumsum(weights, axis=1)[:, -1:]  # summed left to right, as Pillow does
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    return first, (0.5 + weights * (1 << _PRECISION_BITS)).astype(np.int64)


def resample_axis(pixels: np.ndarray, axis: int, in_size: int, out_size: int, start: int,
                  count: int, offset: int = 0) -> np.ndarray:
    """Pillow's 8-bit bilinear pass along `axis` of uint8 (H, W, 3): outputs start..+count of
    an in_size -> out_size resize, where `pixels` holds source indices offset.. of that axis."""
    first, weights = bilinear_weights(in_size, out_size, start, count)
    total = np.full(pixels.shape[:axis] + (count,) + pixels.shape[axis + 1 :],
                    1 << (_PRECISION_BITS - 1), dtype=np.int64)
    shape = [1, 1, 1]
    shape[axis] = count
    for tap in range(weights.shape[1]):
        index = np.clip(first + tap - offset, 0, pixels.shape[axis] - 1)  # clipped: weight 0
        total += np.take(pixels, index, axis=axis) * weights[:, tap].reshape(shape)
    return np.clip(total >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def source_span(in_size: int, out_size: int, start: int, count: int) -> slice:
    """The source indices the bilinear taps of outputs start..start+count-1 read."""
    first, weights = bilinear_weights(in_size, out_size, start, count)
    return slice(int(first.min()), int(min(first.max() + weights.shape[1], in_size)))


def vertical_pass_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Pillow's pass order: from Pillow 13 the vertical pass runs first when the height
    shrinks by more than twice what the width does (Resample.c); before, never."""
    (width, height), (new_width, new_height) = in_size, out_size
    shrink = height - new_height
    return PILLOW_MAJOR >= 13 and shrink > 0 and shrink > 2 * (width - new_width)


def resize_window(image: Image.Image, new_size: tuple[int, int],
                  window: tuple[int, int, int, int]) -> np.ndarray:
    """The (left, top, width, height) window of image.resize(new_size, BILINEAR), bit for bit,
    computing nothing far outside it: uint8 (height, width, 3)."""
    left, top, width, height = window
    (in_width, in_height), (new_width, new_height) = image.size, new_size
    pixels = np.asarray(image)  # (H, W, 3)
    resize_x, resize_y = new_width != in_width, new_height != in_height
    if resize_y and vertical_pass_first(image.size, new_size):
        cols = source_span(in_width, new_width, left, width) if resize_x \
            else slice(left, left + width)
        band = resample_axis(pixels[:, cols], 0, in_height, new_height, top, height)
        if not resize_x:
            return band
        return resample_axis(band, 1, in_width, new_width, left, width, offset=cols.start)
    rows = source_span(in_height, new_height, top, height) if resize_y \
        else slice(top, top + height)
    band = resample_axis(pixels[rows], 1, in_width, new_width, left, width) if resize_x \
        else pixels[rows, left : left + width]
    if not resize_y:
        return np.ascontiguousarray(band)
    return resample_axis(band, 0, in_height, new_height, top, height, offset=rows.start)


def resize_crop(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB PIL image -> uint8 (S, S, 3): Resize(resize_px) then CenterCrop(image_size_px)."""
    if spec.resize_filter != "bilinear":
        raise ContractError(f"unsupported resize filter {spec.resize_filter!r}; expected bilinear")
    crop = spec.image_size_px
    new_size = resized_size(image.size, spec.resize_px)
    left, width, pad_left = crop_window(new_size[0], crop)
    top, height, pad_top = crop_window(new_size[1], crop)
    if new_size[0] * new_size[1] > FULL_RESIZE_MAX_PX:
        pixels = resize_window(image, new_size, (left, top, width, height))
    else:
        resized = image.resize(new_size, Image.Resampling.BILINEAR) if new_size != image.size \
            else image
        pixels = np.asarray(resized)[top : top + height, left : left + width]
    # torchvision pads a side shorter than the crop with zeros, then crops
    return np.pad(pixels, ((pad_top, crop - height - pad_top), (pad_left, crop - width - pad_left),
                           (0, 0)))  # (S, S, 3)


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


def load_pixels(source: ImageSource, spec: Preprocess, *, jpeg_draft: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any input -> uint8 (S, S, 3), the crop the model sees, or ImageError naming the input.

    A JPEG file is decoded at reduced size (the smallest libjpeg scale still >= resize_px)
    when `jpeg_draft`, or whenever its full decode would exceed `max_pixels`; another file
    over `max_pixels` is refused before decoding (runtime.images).
    """
    try:
        image = load_rgb(source, draft_px=spec.resize_px, jpeg_draft=jpeg_draft,
                         max_pixels=max_pixels)
    except ImageError as exc:
        if isinstance(source, str | os.PathLike):
            raise  # load_rgb already names the file
        raise ImageError(f"{describe(source)}: {exc}") from exc
    return resize_crop(image, spec)


def preprocess(
    source: ImageSource, spec: Preprocess | None = None, *, jpeg_draft: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """A path, PIL image or uint8 array -> float32 (3, S, S), the model's input for one image.

    `spec` defaults to the contract's default rule; pass the model's (Predictor.preprocess).
    `jpeg_draft=True` decodes JPEG files at reduced size first (faster, not bit-exact);
    `max_pixels` is the pixel budget of a file (see load_pixels).
    """
    spec = spec or Preprocess()
    return normalize(load_pixels(source, spec, jpeg_draft=jpeg_draft, max_pixels=max_pixels),
                     spec)
