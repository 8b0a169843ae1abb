"""Opening files under a pixel budget: any size of camera JPEG with bounded memory, other
images over the budget refused before decoding, Pillow's process-wide limit left alone and its
warning never printed, special files refused without being opened; encoded bytes in memory
decoded and refused exactly as the same bytes in a file."""

from __future__ import annotations

import io
import os
import socket
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from benchmarks.fuzz_images import flat_jpeg, measure_big_jpeg
from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import ImageError
from flowae.runtime.images import DEFAULT_MAX_PIXELS, jpeg_scale, load_rgb, load_rgb_bytes
from flowae.runtime.preprocess import load_pixels, preprocess


def truncated_variants(jpeg: bytes) -> dict[str, bytes]:
    """A real photo's JPEG whose data ends before its header's last row, three ways."""
    frame = jpeg.index(b"\xff\xc0")  # baseline frame header: length, precision, height
    height = int.from_bytes(jpeg[frame + 5 : frame + 7], "big")
    return {
        "cut": jpeg[: len(jpeg) // 2],  # the file stops mid-scan
        "cut+eoi": jpeg[: len(jpeg) // 2] + b"\xff\xd9",  # ... then says "end of image"
        "cut-1%+eoi": jpeg[: len(jpeg) * 99 // 100] + b"\xff\xd9",  # only the last rows lost
        "taller-header": jpeg[: frame + 5] + (2 * height).to_bytes(2, "big") + jpeg[frame + 7 :],
    }


@pytest.fixture(scope="module")
def truncated_jpegs(fullres_root, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("truncated")
    photo = sorted((fullres_root / "jpg").glob("*.jpg"))[1].read_bytes()
    files = {}
    for name, data in truncated_variants(photo).items():
        files[name] = folder / f"{name}.jpg"
        files[name].write_bytes(data)
    return files


def test_flat_jpeg_is_a_real_jpeg(tmp_path):
    path = flat_jpeg(tmp_path / "small.jpg", 40, 24)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.format == "JPEG" and pixels.shape == (24, 40, 3)
    assert (pixels == 141).all()  # 128 + DC 100 / 8 = 140.5, rounded up by libjpeg


def test_200_megapixel_jpeg_is_classified_with_bounded_memory():
    """16320 x 12240, what a 200 Mpx phone sensor writes: past twice Pillow's limit, so
    Image.open would refuse it; decoded in full it would take 600 MB as RGB."""
    assert 2 * Image.MAX_IMAGE_PIXELS < 16320 * 12240
    row = measure_big_jpeg(16320, 12240)  # a fresh process, warnings as errors
    assert row["shape"] == [3, 100, 100] and row["dtype"] == "float32"
    assert abs(row["mean"] - (141 / 255 - 0.5) / 0.5) < 1e-6
    assert row["peak_rss_mb"] < 150, row  # the interpreter and imports take about 50 MB
    assert row["stderr"] == ""  # no DecompressionBombWarning, nor anything else


def test_jpeg_over_budget_is_drafted_even_with_draft_off(tmp_path):
    spec = Preprocess()
    assert jpeg_scale((16320, 12240), spec.resize_px, False, DEFAULT_MAX_PIXELS) == 8
    assert jpeg_scale((16320, 12240), None, False, DEFAULT_MAX_PIXELS) == 2  # fits at 1/2
    assert jpeg_scale((4000, 3000), spec.resize_px, False, DEFAULT_MAX_PIXELS) == 1
    assert jpeg_scale((4000, 3000), spec.resize_px, True, DEFAULT_MAX_PIXELS) == 8
    camera = flat_jpeg(tmp_path / "camera.jpg", 4000, 3000)
    assert load_rgb(camera).size == (4000, 3000)  # within the budget: full size
    assert load_rgb(camera, draft_px=100, jpeg_draft=False, max_pixels=5_000_000).size == \
        (500, 375)  # over a smaller budget: the smallest scale still >= 100 px
    assert load_rgb(camera, max_pixels=5_000_000).size == (2000, 1500)  # no target: fits
    assert load_pixels(camera, spec, max_pixels=5_000_000).shape == (100, 100, 3)


def test_jpeg_too_big_even_at_one_eighth_is_refused(tmp_path):
    camera = flat_jpeg(tmp_path / "camera.jpg", 4000, 3000)
    with pytest.raises(ImageError) as caught:
        load_rgb(camera, max_pixels=100_000)
    assert str(caught.value) == (f"{camera}: JPEG is 4000x3000 px (12.0 Mpx), over the pixel "
                                 "budget of 100,000 px even decoded at 1/8 size")


def test_other_images_over_the_budget_are_refused_before_decoding(tmp_path):
    png = tmp_path / "wide.png"
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(png)
    header_only = tmp_path / "header.png"  # signature, IHDR, a few bytes: decoding would fail
    header_only.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ImageError, match=r"header\.png: image is 3000x2000 px .*budget"):
        load_rgb(header_only, max_pixels=5_000_000)
    with pytest.raises(ImageError, match=r"header\.png: truncated or corrupt image"):
        load_rgb(header_only)
    for call in (lambda: load_rgb(png, max_pixels=5_000_000),
                 lambda: load_pixels(png, Preprocess(), max_pixels=5_000_000),
                 lambda: preprocess(png, max_pixels=5_000_000)):
        with pytest.raises(ImageError) as caught:
            call()
        assert str(caught.value) == (f"{png}: image is 3000x2000 px (6.0 Mpx), over the pixel "
                                     "budget of 5,000,000 px")
    assert preprocess(png, max_pixels=6_000_000).shape == (3, 100, 100)


def test_pillow_limit_is_left_alone_and_never_warns(tmp_path, monkeypatch):
    png = tmp_path / "medium.png"
    Image.new("RGB", (400, 300)).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120,000 px: Pillow would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as caught:
            load_rgb(png)
        jpeg = flat_jpeg(tmp_path / "camera.jpg", 800, 600)  # JPEGs follow our budget alone
        assert load_rgb(jpeg).size == (800, 600)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # read, never set
    assert str(caught.value) == (f"{png}: image is 400x300 px (0.1 Mpx), over Pillow's limit of "
                                 "100,000 px (PIL.Image.MAX_IMAGE_PIXELS)")


@pytest.mark.parametrize("kind", ["fifo", "socket", "/dev/zero", "/dev/null"])
def test_special_files_are_refused_without_opening(tmp_path, kind):
    if kind == "fifo":
        path, expected = tmp_path / "pipe.jpg", "not a regular file: named pipe"
        os.mkfifo(path)  # opening it for reading would block until a writer came
    elif kind == "socket":
        path, expected = tmp_path / "s.jpg", "not a regular file: socket"
        server = socket.socket(socket.AF_UNIX)
        server.bind(os.fspath(path))
        server.close()
    else:
        path, expected = Path(kind), "not a regular file: character device"
    with pytest.raises(ImageError) as caught:
        load_rgb(path)
    assert str(caught.value) == f"{path}: {expected}"


def test_proc_files_and_directories(tmp_path):
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc on this system")
    with pytest.raises(ImageError) as caught:
        load_rgb(status)
    assert str(caught.value) == (f"{status}: not an image: a virtual file (reports 0 bytes, as "
                                 "/proc and /sys files do)")
    with pytest.raises(ImageError, match=r": is a directory, not an image$"):
        load_rgb(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file \(0 bytes\)$"):
        load_rgb(tmp_path / "empty.png")


def test_truncated_jpeg_is_refused_even_if_pillow_may_load_truncated(truncated_jpegs,
                                                                     monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # Pillow then pads silently
    for path in truncated_jpegs.values():
        with pytest.raises(ImageError, match="truncated or corrupt image"):
            load_rgb(path)
        with pytest.raises(ImageError, match="truncated or corrupt image"):
            load_rgb(path, draft_px=100)


def test_a_grey_corner_alone_is_not_truncation(tmp_path, fullres_root):
    photo = Image.open(sorted((fullres_root / "jpg").glob("*.jpg"))[0]).convert("RGB")
    framed = Image.new("RGB", (photo.width + 64, photo.height + 64), (128, 128, 128))
    framed.paste(photo, (32, 32))
    framed.save(tmp_path / "framed.jpg", quality=90)
    Image.new("L", (300, 200), 128).save(tmp_path / "grey.jpg")
    for name in ("framed.jpg", "grey.jpg"):
        image = load_rgb(tmp_path / name)
        assert image.getpixel((image.width - 1, image.height - 1)) == (128, 128, 128)


def test_gif_and_webp_canvases_are_held_to_the_budget_before_pillow_opens_them(tmp_path):
    """Pillow sizes a GIF's canvas by its first frame, and allocates a WebP's, while opening:
    their headers are read first, so neither warns nor allocates."""
    gif = io.BytesIO()
    Image.new("P", (10, 10)).save(gif, "GIF")
    data = bytearray(gif.getvalue())
    descriptor = data.index(b",", 13)
    struct.pack_into("<HH", data, descriptor + 5, 10_000, 10_000)  # frame reaches 10000x10000
    (tmp_path / "frame.gif").write_bytes(bytes(data))
    webp = io.BytesIO()
    Image.new("RGB", (10, 10)).save(webp, "WEBP", lossless=True)
    data = bytearray(webp.getvalue())
    assert data[12:16] == b"VP8L"
    struct.pack_into("<I", data, 21, (10_000 - 1) | (10_000 - 1) << 14)  # 10000 x 10000
    (tmp_path / "canvas.webp").write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own check would warn at 100 Mpx
        for name in ("frame.gif", "canvas.webp"):
            with pytest.raises(ImageError) as caught:
                load_rgb(tmp_path / name)
            assert str(caught.value) == (f"{tmp_path / name}: image is 10000x10000 px "
                                         "(100.0 Mpx), over the pixel budget of 89,478,485 px")


def _bomb_png() -> bytes:
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 Mpx in a few kB
    return bomb.getvalue()


def _wide_png(size: tuple[int, int] = (3000, 2000)) -> bytes:
    png = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(png, format="PNG")
    return png.getvalue()


def _big_gif_frame() -> bytes:
    gif = io.BytesIO()
    Image.new("P", (10, 10)).save(gif, "GIF")
    data = bytearray(gif.getvalue())
    struct.pack_into("<HH", data, data.index(b",", 13) + 5, 10_000, 10_000)
    return bytes(data)


# name -> (file content, load options, what the one-line error says)
BAD_INPUTS = {
    "words.jpg": (lambda: b"hello, not a JPEG", {}, "not an image Pillow can read"),
    "empty.png": (lambda: b"", {}, "empty file (0 bytes)"),
    "bomb.png": (_bomb_png, {}, "over the pixel budget"),
    "wide.png": (_wide_png, {"max_pixels": 5_000_000}, "over the pixel budget"),
    "header.png": (lambda: _wide_png()[:60], {}, "truncated or corrupt image"),
    "frame.gif": (_big_gif_frame, {}, "over the pixel budget"),
    "bad-marker.jpg": (lambda: b"\xff\xd8\xff\xe0\x00", {}, "JPEG"),
}


def _error(call) -> str:
    with pytest.raises(ImageError) as caught:
        call()
    return str(caught.value)


def _same_error_by_path_and_bytes(path: Path, options: dict) -> str:
    """load_rgb's error for the file; the same bytes in memory, as bytes and as a binary
    file, must give the same line, naming the name given instead of the path."""
    data = path.read_bytes()
    by_path = _error(lambda: load_rgb(path, **options))
    assert by_path.startswith(f"{path}: ") and "\n" not in by_path
    reason = by_path.removeprefix(f"{path}: ")
    assert _error(lambda: load_rgb_bytes(data, str(path), **options)) == by_path
    assert _error(lambda: load_rgb_bytes(io.BytesIO(data), "upload.x", **options)) == \
        f"upload.x: {reason}"
    return by_path


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_bytes_fail_as_the_same_file_does(tmp_path, name):
    content, options, says = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(content())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not fire either way
        assert says in _same_error_by_path_and_bytes(path, options)


@pytest.mark.parametrize("loose", [False, True])
@pytest.mark.parametrize("variant", ["cut", "cut+eoi", "cut-1%+eoi", "taller-header"])
def test_truncated_jpeg_bytes_fail_as_the_same_file_does(truncated_jpegs, variant, loose,
                                                         monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", loose)
    for options in ({}, {"draft_px": 100}):
        error = _same_error_by_path_and_bytes(truncated_jpegs[variant], options)
        assert "truncated or corrupt image" in error


def test_good_bytes_decode_as_the_same_file_does(tmp_path, fullres_root):
    camera = flat_jpeg(tmp_path / "camera.jpg", 4000, 3000)
    photo = sorted((fullres_root / "jpg").glob("*.jpg"))[0]
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 20), (200, 10, 10, 0)).save(rgba)
    cases = [(camera, {"max_pixels": 5_000_000}, (2000, 1500)),  # drafted to fit the budget
             (camera, {"draft_px": 100}, (500, 375)),
             (photo, {}, None), (photo, {"draft_px": 100, "jpeg_draft": False}, None),
             (rgba, {}, (30, 20))]
    for path, options, size in cases:
        by_path = load_rgb(path, **options)
        by_bytes = load_rgb_bytes(path.read_bytes(), "any name", **options)
        assert by_bytes.mode == "RGB" and by_bytes.size == by_path.size
        assert size is None or by_bytes.size == size
        assert np.array_equal(np.asarray(by_bytes), np.asarray(by_path))
    assert np.asarray(load_rgb_bytes(rgba.read_bytes(), "rgba.png")).min() == 255  # over white
    stream = io.BytesIO(b"archive header" + photo.read_bytes())
    stream.seek(len(b"archive header"))  # a binary file is read from where it stands
    assert np.array_equal(np.asarray(load_rgb_bytes(stream, "member.jpg")),
                          np.asarray(load_rgb(photo)))


def test_bytes_entry_refuses_what_is_not_bytes():
    assert _error(lambda: load_rgb_bytes("a.jpg", "a.jpg")) == (
        "a.jpg: expected image bytes or a binary file, got str")
    assert _error(lambda: load_rgb_bytes(io.StringIO("text"), "t.txt")) == (
        "t.txt: expected a binary file, got one that reads str")
