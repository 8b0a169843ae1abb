"""Opening any image a user has as an RGB PIL image, with one-line errors.

Rules, the same for training and the device runtime:
- EXIF orientation is applied; for animations the first frame is used.
- Modes with alpha (RGBA, LA, PA, P with transparency) are composited over white.
- 16/32-bit grayscale (I;16, I, F) keeps its top 8 bits (values / 256, clipped to 0..255).
- Everything else (1, L, P, CMYK, YCbCr, LAB, HSV) goes through Pillow's convert("RGB").
Pillow's decompression-bomb limit stays in force. Imports Pillow and numpy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flowae.runtime.errors import ImageError
from PIL import Image, ImageOps, UnidentifiedImageError

_WHITE = (255, 255, 255)


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


def load_rgb(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Open a path (or take a PIL image) and return a fully decoded RGB image.

    Raises ImageError with a one-line reason for anything that is not a usable image.
    """
    if isinstance(source, Image.Image):
        try:
            return to_rgb(source)
        except (OSError, ValueError) as exc:
            raise ImageError(f"image cannot be converted to RGB: {exc}") from exc
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # `image` is closed on leaving
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: truncated or corrupt image ({exc})") from exc
