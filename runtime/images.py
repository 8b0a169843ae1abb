"""Opening any image a user has as an RGB PIL image, with one-line errors.

Rules, the same for training and the device runtime:
- EXIF orientation is applied; for animations the first frame is used.
- Modes with alpha (RGBA, LA, PA, P with transparency) are composited over white.
- 16/32-bit grayscale (I;16, I, F) keeps its top 8 bits (values / 256, clipped to 0..255).
- Everything else (1, L, P, CMYK, YCbCr, LAB, HSV) goes through Pillow's convert("RGB").
- NumPy arrays are uint8 (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA, then as above.
Pillow's decompression-bomb limit stays in force. The optional reduced-size JPEG decode
(`draft_px`) lets libjpeg scale by 1/2, 1/4 or 1/8 while keeping both sides >= draft_px.
Imports Pillow, numpy and the runtime's errors only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowae.runtime.errors import ImageError

_WHITE = (255, 255, 255)
_ARRAY_MODES = {2: "L", 3: "RGB", 4: "RGBA"}  # channels of an (H, W[, C]) uint8 array -> mode


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an opened image of any mode to RGB by the rules above."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64) / 256.0
        gray = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def array_to_image(array: np.ndarray) -> Image.Image:
    """A uint8 (H, W), (H, W, 3) or (H, W, 4) array as a PIL image (L, RGB or RGBA)."""
    if array.dtype != np.uint8:
        raise ImageError(f"array image must be uint8 (0..255), got {array.dtype}")
    channels = 2 if array.ndim == 2 else (array.shape[2] if array.ndim == 3 else 0)
    if channels not in _ARRAY_MODES or (channels == 2 and array.ndim != 2):
        raise ImageError(
            f"array image must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    return Image.fromarray(np.ascontiguousarray(array), mode=_ARRAY_MODES[channels])


def draft_scale(size: tuple[int, int], draft_px: int) -> int:
    """The JPEG scale denominator (1, 2, 4 or 8) Pillow's draft picks for (draft_px, draft_px)."""
    ratio = min(size[0] // draft_px, size[1] // draft_px)
    return next(s for s in (8, 4, 2, 1) if ratio >= s)


def load_rgb(
    source: str | os.PathLike | Image.Image | np.ndarray, *, draft_px: int | None = None
) -> Image.Image:
    """Open a path (or take a PIL image or array) and return a fully decoded RGB image.

    With `draft_px`, a JPEG file is decoded at the smallest 1/2, 1/4 or 1/8 scale whose
    sides are still >= draft_px (faster, slightly different pixels); other inputs ignore it.
    Raises ImageError with a one-line reason for anything that is not a usable image.
    """
    if isinstance(source, np.ndarray):
        source = array_to_image(source)
    if isinstance(source, Image.Image):
        try:
            return to_rgb(source)
        except (OSError, ValueError) as exc:
            raise ImageError(f"image cannot be converted to RGB: {exc}") from exc
    if not isinstance(source, str | os.PathLike):
        raise ImageError(
            f"expected a path, PIL image or uint8 array, got {type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            if draft_px is not None and image.format == "JPEG":
                image.draft(None, (draft_px, draft_px))
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # `image` is closed on leaving
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: truncated or corrupt image ({exc})") from exc
