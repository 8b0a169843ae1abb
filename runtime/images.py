"""Opening any image a user has as an RGB PIL image, with bounded memory and one-line errors.

Rules, the same for training and the device runtime:
- EXIF orientation is applied; for animations the first frame is used.
- Modes with alpha (RGBA, LA, PA, P with transparency) are composited over white.
- 16/32-bit grayscale (I;16, I, F) keeps its top 8 bits (values / 256, clipped to 0..255).
- Everything else (1, L, P, CMYK, YCbCr, LAB, HSV) goes through Pillow's convert("RGB").
- NumPy arrays are uint8 (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA, then as above.
A file is read only if it is a regular file; its size comes from its header, before any pixel
is decoded, and is held to a pixel budget (`max_pixels`, DEFAULT_MAX_PIXELS by default). A
JPEG over the budget is decoded at reduced size (libjpeg's 1/2, 1/4 or 1/8 scale: the smallest
whose sides stay >= `draft_px`, or without `draft_px` the largest that fits the budget), even
when the caller did not ask for reduced decoding; any other image over it is refused. With
`draft_px` and `jpeg_draft`, every JPEG is decoded at the smallest such scale (faster, not
bit-exact). Pillow's own decompression-bomb check never runs on our behalf (it warns or raises
by a process-wide limit); a file over that limit is refused in a line instead. Every exception
raised while decoding one file becomes that file's ImageError, and a JPEG whose scan ends before
its header's last row (libjpeg would fill the rest with grey) is refused as truncated.
Encoded bytes already in memory (an upload, an object store's read) go through
`load_rgb_bytes`: the same rules and the same messages, naming what the caller calls them.
Imports Pillow, numpy and the runtime's errors only.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, JpegImagePlugin

from flowae.runtime.errors import ImageError

# Pillow's own default MAX_IMAGE_PIXELS (1024**3 // 4 // 3, where it starts to warn): about
# 268 MB as RGB, above any PNG/TIFF/WebP a camera writes, and JPEGs above it are drafted.
DEFAULT_MAX_PIXELS = 89_478_485
JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg's scaled IDCT offers

_WHITE = (255, 255, 255)
_ARRAY_MODES = {2: "L", 3: "RGB", 4: "RGBA"}  # channels of an (H, W[, C]) uint8 array -> mode
_FILE_KINDS = {stat.S_IFIFO: "named pipe", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}
# Errors Pillow's plugins raise for "not my format" (Image.open tries the next plugin on these).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)
# Entropy-coded bytes (no 0xFF) that decode to non-zero coefficients; see scan_was_short.
_JPEG_FILLER = bytes(range(1, 255)) * 2


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an opened image of any mode to RGB by the rules above."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # else exif_transpose copies
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
    ratio = min(size[0] // draft_px, size[1] // draft_px)  # 0 for a side under draft_px
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def scaled_pixels(size: tuple[int, int], scale: int) -> int:
    """Pixels of a JPEG decoded at 1/scale (libjpeg rounds each side up)."""
    return -(-size[0] // scale) * -(-size[1] // scale)


def jpeg_scale(size: tuple[int, int], draft_px: int | None, jpeg_draft: bool,
               max_pixels: int) -> int:
    """The 1/scale a JPEG of `size` is decoded at by the module's rules (1: full size)."""
    over_budget = size[0] * size[1] > max_pixels
    if draft_px is not None and (jpeg_draft or over_budget):
        return draft_scale(size, draft_px)
    if over_budget:
        fits = [s for s in JPEG_SCALES if scaled_pixels(size, s) <= max_pixels]
        return fits[0] if fits else JPEG_SCALES[-1]
    return 1


def describe_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} px ({size[0] * size[1] / 1e6:.1f} Mpx)"


def open_regular_file(path: Path) -> BinaryIO:
    """Open a path for reading only if it is a regular file with content; never blocks."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "special file")
        raise ImageError(f"{path}: not a regular file: {kind}")
    try:
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it cannot hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    file = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{path}: not a regular file")
        if info.st_size == 0:  # /proc and /sys files report 0 bytes yet have content
            first = file.read(1)
            raise ImageError(f"{path}: empty file (0 bytes)" if not first else
                             f"{path}: not an image: a virtual file (reports 0 bytes, as "
                             "/proc and /sys files do)")
    except OSError as exc:
        file.close()
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ImageError:
        file.close()
        raise
    return file


def identify(file: BinaryIO, name: str, max_pixels: int) -> ImageFile.ImageFile:
    """What Image.open does, without its decompression-bomb check (see the module docstring).

    JPEGs open as plain JPEG: the first picture of a multi-picture (MPO) camera file. GIF
    and WebP files are held to the budget by their headers before Pillow opens them: those
    plugins size (and WebP allocates) the canvas as they open.
    """
    prefix = file.read(16)
    if prefix[:3] == b"\xff\xd8\xff":
        file.seek(0)
        try:
            return JpegImagePlugin.JpegImageFile(file, name)
        except _NOT_THIS_FORMAT as exc:
            raise ImageError(f"{name}: not an image Pillow can read (JPEG: {one_line(exc)})"
                             ) from exc
    if prefix[:6] in (b"GIF87a", b"GIF89a") or (prefix[:4], prefix[8:12]) == (b"RIFF", b"WEBP"):
        file.seek(0)
        canvas = canvas_size(file.read(1 << 20))
        if canvas is not None:
            check_budget(canvas, name, max_pixels)
    failures = []
    tried: set[str] = set()
    for register in (Image.preinit, Image.init):
        register()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:
                accepted = accept(prefix) if accept else True
            except Exception:  # some plugins' checks fail on a file of a few bytes
                continue
            if isinstance(accepted, str) or not accepted:  # a str: "maybe, but unsupported"
                continue
            file.seek(0)
            try:
                return factory(file, name)
            except _NOT_THIS_FORMAT as exc:
                if accept:  # its signature matched: say why it still failed
                    failures.append(f"{fmt}: {one_line(exc)}")
    detail = f" ({failures[0]})" if failures else ""
    raise ImageError(f"{name}: not an image Pillow can read{detail}")


def one_line(exc: BaseException) -> str:
    """An exception as a short single line: its message, or its type when it has none."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def set_jpeg_scale(image: JpegImagePlugin.JpegImageFile, scale: int) -> None:
    """Ask libjpeg to decode at exactly 1/scale (Pillow's draft picks from the size asked)."""
    if scale > 1:
        image.draft(None, (image.width // scale, image.height // scale))


def jpeg_end_of_scan(data: bytes) -> int | None:
    """Offset where the entropy-coded data of the file's last scan ends (None: no scan)."""
    at, end = 2, None
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA:  # start of scan: coded bytes run to the next non-RST marker
            while True:
                at = data.find(b"\xff", at)
                if at < 0 or at + 1 >= len(data):
                    return len(data)
                following = data[at + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    at += 2
                elif following == 0xFF:
                    at += 1
                else:
                    break
            end = at
    return end


def scan_was_short(image: Image.Image, file: BinaryIO, scale: int) -> bool:
    """True when libjpeg ran out of coded data before the last block of the image.

    It then leaves the missing blocks' coefficients at zero: uniform value-128 samples and
    no error. Only such an image (last pixel 128 in every band) is checked further: the file
    is decoded again with filler bytes inserted where its last scan ends. A complete scan
    ignores them; a short one decodes them into its missing blocks, so the picture changes.
    """
    corner = image.getpixel((image.width - 1, image.height - 1))
    if any(value != 128 for value in (corner if isinstance(corner, tuple) else (corner,))):
        return False
    file.seek(0)
    data = file.read()
    end = jpeg_end_of_scan(data)
    if end is None:
        return False
    with JpegImagePlugin.JpegImageFile(io.BytesIO(data[:end] + _JPEG_FILLER + data[end:])
                                       ) as padded:
        set_jpeg_scale(padded, scale)
        padded.load()
        return padded.size != image.size or np.asarray(padded).tobytes() != image.tobytes()


def check_budget(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """Refuse, before decoding, an image over the budget or over Pillow's own limit."""
    pixels = size[0] * size[1]
    if pixels > max_pixels:
        raise ImageError(f"{name}: image is {describe_size(size)}, over the pixel budget "
                         f"of {max_pixels:,} px")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and pixels > pillow_limit:
        raise ImageError(f"{name}: image is {describe_size(size)}, over Pillow's limit "
                         f"of {pillow_limit:,} px (PIL.Image.MAX_IMAGE_PIXELS)")


def webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """The canvas size in a WebP header (VP8, VP8L or VP8X), as Pillow reads it."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", head, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8X" and len(head) >= 30:
        return (int.from_bytes(head[24:27], "little") + 1,
                int.from_bytes(head[27:30], "little") + 1)
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def canvas_size(head: bytes) -> tuple[int, int] | None:
    """The size a GIF or WebP file has once Pillow opens it, from its first bytes."""
    return gif_canvas_size(head) if head[:3] == b"GIF" else webp_canvas_size(head)


def gif_canvas_size(head: bytes) -> tuple[int, int] | None:
    """The size Pillow gives a GIF once it places the first frame, which may reach past the
    logical screen (Pillow checks that size against its own limit, warning as it opens the
    file). Walks the blocks as Pillow does; None when `head` ends before the first frame."""
    try:
        width, height, flags = struct.unpack_from("<HHB", head, 6)
        at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        while at < len(head):
            block, at = head[at], at + 1
            if block == 0x3B:  # trailer: no frame
                return width, height
            if block == 0x21:  # extension: a label, then sub-blocks up to an empty one
                at += 1
                while head[at]:
                    at += head[at] + 1
                at += 1
            elif block == 0x2C:  # image descriptor: left, top, width, height
                left, top, frame_width, frame_height = struct.unpack_from("<HHHH", head, at)
                return max(width, left + frame_width), max(height, top + frame_height)
    except (IndexError, struct.error):
        pass
    return None


def decode_file(file: BinaryIO, name: str, draft_px: int | None, jpeg_draft: bool,
                max_pixels: int) -> Image.Image:
    """An opened, seekable binary file -> decoded RGB image, by the module's rules; every
    failure is one ImageError line starting with `name`."""
    try:
        return _decode(file, name, draft_px, jpeg_draft, max_pixels)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, too many pixels ({one_line(exc)})") from exc
    except Exception as exc:  # any decoder failure is this one file's problem
        raise ImageError(f"{name}: truncated or corrupt image ({one_line(exc)})") from exc


def _decode(file: BinaryIO, name: str, draft_px: int | None, jpeg_draft: bool,
            max_pixels: int) -> Image.Image:
    image = identify(file, name, max_pixels)
    is_jpeg, scale = isinstance(image, JpegImagePlugin.JpegImageFile), 1
    if is_jpeg:
        full_size = image.size
        scale = jpeg_scale(full_size, draft_px, jpeg_draft, max_pixels)
        set_jpeg_scale(image, scale)
        if image.width * image.height > max_pixels:
            raise ImageError(f"{name}: JPEG is {describe_size(full_size)}, over the pixel "
                             f"budget of {max_pixels:,} px even decoded at 1/{scale} size")
    else:
        check_budget(image.size, name, max_pixels)
    image.load()
    if is_jpeg and scan_was_short(image, file, scale):
        raise ImageError(f"{name}: truncated or corrupt image (the JPEG's data ends before "
                         "its last row)")
    return to_rgb(image)  # decoded: it no longer needs the file, which the caller closes


def load_rgb(
    source: str | os.PathLike | Image.Image | np.ndarray,
    *,
    draft_px: int | None = None,
    jpeg_draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open a path (or take a PIL image or array) and return a fully decoded RGB image.

    draft_px: the shorter side the caller will resize to; a JPEG may then be decoded at the
    smallest 1/2, 1/4 or 1/8 scale whose sides stay >= draft_px: always when `jpeg_draft`,
    otherwise only when its full decode would exceed `max_pixels`. max_pixels: the pixel
    budget of a file (see the module docstring); in-memory images are already decoded.
    Raises ImageError with a one-line reason for anything that is not a usable image.
    """
    if isinstance(source, np.ndarray):
        source = array_to_image(source)
    if isinstance(source, Image.Image):
        try:
            return to_rgb(source)
        except Exception as exc:  # a lazily opened image decodes here
            raise ImageError(f"image cannot be converted to RGB: {one_line(exc)}") from exc
    if not isinstance(source, str | os.PathLike):
        raise ImageError(
            f"expected a path, PIL image or uint8 array, got {type(source).__name__}"
        )
    path = Path(source)
    with open_regular_file(path) as file:
        return decode_file(file, str(path), draft_px, jpeg_draft, max_pixels)


def load_rgb_bytes(
    data: bytes | bytearray | memoryview | BinaryIO,
    name: str,
    *,
    draft_px: int | None = None,
    jpeg_draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An encoded image in memory (or a binary file object, read to its end from where it
    stands) -> a fully decoded RGB image, by exactly load_rgb's rules for a file: budget from
    the header, automatic JPEG draft, truncation check. Errors are load_rgb's one-line
    ImageErrors, naming the image `name` (a URI, an upload's file name) where load_rgb names
    the path. The options are load_rgb's.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        content = bytes(data)
    elif callable(getattr(data, "read", None)):
        try:
            content = data.read()
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
        if not isinstance(content, bytes | bytearray):
            raise ImageError(f"{name}: expected a binary file, got one that reads "
                             f"{type(content).__name__}")
    else:
        raise ImageError(f"{name}: expected image bytes or a binary file, got "
                         f"{type(data).__name__}")
    if not content:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return decode_file(io.BytesIO(content), name, draft_px, jpeg_draft, max_pixels)
