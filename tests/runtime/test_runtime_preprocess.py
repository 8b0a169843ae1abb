"""Runtime preprocessing vs training's eval transform (torchvision) on real JPEGs of every mode
and on images of any shape (1x1 to 20000x20), and the stated conversion rules of each odd mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from flowae.data import eval_transform, to_float
from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import ImageError
from flowae.runtime.images import draft_scale, load_rgb
from flowae.runtime.preprocess import (
    FULL_RESIZE_MAX_PX,
    denormalize,
    load_pixels,
    normalize,
    preprocess,
    resize_window,
    resized_size,
    vertical_pass_first,
)

TOLERANCE = 1e-6  # float32 scaling; in practice the two agree bit for bit


def torchvision_input(source, spec: Preprocess | None = None) -> np.ndarray:
    """What training feeds the model: eval_transform then to_float, as float32 (3, S, S)."""
    spec = spec or Preprocess()
    tensor = eval_transform(spec)(load_rgb(source))  # uint8 (3, S, S)
    return to_float(tensor[None], spec)[0].numpy()


def odd_mode_files(source_path, folder) -> dict[str, object]:
    """Real-photo files in every mode the runtime promises to handle."""
    photo = Image.open(source_path).convert("RGB")
    gray = photo.convert("L")
    alpha = Image.linear_gradient("L").resize(photo.size)
    files = {}

    def save(name, image, **options):
        files[name] = folder / name
        image.save(files[name], **options)

    save("rgb.jpg", photo, quality=90)
    save("gray.jpg", gray, quality=90)
    save("palette.png", photo.quantize(64))
    palette_t = photo.quantize(64)
    palette_t.info["transparency"] = 0
    save("palette_transparent.png", palette_t, transparency=0)
    rgba = photo.copy()
    rgba.putalpha(alpha)
    save("rgba.png", rgba)
    la = gray.copy()
    la.putalpha(alpha)
    save("la.png", la)
    save("cmyk.jpg", photo.convert("CMYK"), quality=90)
    save("gray16.png", Image.fromarray(np.asarray(gray).astype(np.uint16) * 257))
    second = ImageOps.invert(photo).quantize(64)
    save("animated.gif", photo.quantize(64), save_all=True, append_images=[second])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; display rotated 90 degrees
    save("rotated.jpg", photo, quality=90, exif=exif.tobytes())
    return files


@pytest.fixture(scope="module")
def odd_files(real_jpegs, tmp_path_factory):
    return odd_mode_files(real_jpegs[0], tmp_path_factory.mktemp("odd_modes"))


def test_parity_with_torchvision_on_real_jpegs(real_jpegs):
    for path in real_jpegs:
        ours = preprocess(path)
        assert ours.shape == (3, 100, 100) and ours.dtype == np.float32
        assert np.abs(ours - torchvision_input(path)).max() <= TOLERANCE, path


def test_parity_on_full_size_photos(fullres_root):
    for path in sorted((fullres_root / "jpg").glob("*.jpg"))[:4]:
        assert np.abs(preprocess(path) - torchvision_input(path)).max() <= TOLERANCE, path


def test_parity_on_every_odd_mode(odd_files):
    opened_modes = {name: Image.open(path).mode for name, path in odd_files.items()}
    assert opened_modes["gray16.png"] == "I;16" and opened_modes["cmyk.jpg"] == "CMYK"
    assert opened_modes["palette_transparent.png"] == "P" and opened_modes["la.png"] == "LA"
    for name, path in odd_files.items():
        assert np.abs(preprocess(path) - torchvision_input(path)).max() <= TOLERANCE, name


@pytest.mark.parametrize("spec", [
    Preprocess(image_size_px=100, resize_px=128),  # crop inside a larger resize
    Preprocess(image_size_px=100, resize_px=90),  # torchvision pads with zeros, then crops
    Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
])
def test_parity_for_other_rules(real_jpegs, spec):
    for path in real_jpegs[:3]:
        assert np.abs(preprocess(path, spec) - torchvision_input(path, spec)).max() <= TOLERANCE


EXTREME_SHAPES = [(1, 1), (2, 3), (3, 2), (7, 5), (1000, 3), (3, 1000), (20000, 20),
                  (20, 20000), (3000, 400), (400, 3000)]


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", EXTREME_SHAPES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_any_shape_is_classified_bit_exact(size, tmp_path):
    """Tiny images are upscaled and panoramas centre-cropped, bit for bit as eval_transform."""
    image = random_image(size, seed=size[0] * 7 + size[1])
    image.save(tmp_path / "image.png")
    for spec in (Preprocess(), Preprocess(image_size_px=100, resize_px=90)):  # 90: zero padding
        ours = preprocess(tmp_path / "image.png", spec)
        assert ours.shape == (3, 100, 100) and ours.dtype == np.float32
        assert np.abs(ours - torchvision_input(image, spec)).max() == 0.0, (size, spec)


def test_panoramas_take_the_windowed_resize():
    """The shapes above that would resize to more than FULL_RESIZE_MAX_PX take the window path."""
    windowed = [size for size in EXTREME_SHAPES
                if np.prod(resized_size(size, 100), dtype=np.int64) > FULL_RESIZE_MAX_PX]
    assert {(20000, 20), (20, 20000)} <= set(windowed)


@pytest.mark.parametrize("seed", range(3))
def test_resize_window_is_pillows_resize_bit_for_bit(seed):
    """Any window of any resize (up, down, one axis, both pass orders) equals Pillow's."""
    rng = np.random.default_rng(seed)
    orders = set()
    for _ in range(40):
        size = tuple(int(v) for v in rng.integers(1, 250, 2))
        if rng.random() < 0.3:  # very tall or very wide
            size = (size[0], size[1] * 20) if rng.random() < 0.5 else (size[0] * 20, size[1])
        new_size = tuple(int(v) for v in rng.integers(1, 200, 2))
        image = random_image(size, int(rng.integers(1 << 30)))
        full = np.asarray(image.resize(new_size, Image.Resampling.BILINEAR))
        left, top = (int(rng.integers(0, n)) for n in new_size)
        width, height = int(rng.integers(1, new_size[0] - left + 1)), \
            int(rng.integers(1, new_size[1] - top + 1))
        window = resize_window(image, new_size, (left, top, width, height))
        assert np.array_equal(window, full[top : top + height, left : left + width]), \
            (size, new_size, (left, top, width, height))
        orders.add(vertical_pass_first(size, new_size))
    assert orders == {True, False}


def test_a_long_panorama_needs_no_full_resize(tmp_path):
    """1,000,000 x 2 px: the full resize would be 5 * 10^9 px (15 GB); only the crop is made."""
    strip = random_image((1_000_000, 2), seed=3)
    assert np.prod(resized_size(strip.size, 100), dtype=np.int64) == 5_000_000_000
    pixels = load_pixels(strip, Preprocess())  # (S, S, 3)
    middle = strip.crop((499_980, 0, 500_020, 2))  # the centre the crop sees, and its neighbours
    expected = np.asarray(middle.resize((2000, 100), Image.Resampling.BILINEAR))[:, 950:1050]
    assert pixels.shape == (100, 100, 3)
    assert np.abs(pixels.astype(int) - expected).max() <= 1  # same picture; exactness above


def test_path_pil_and_array_inputs_agree(real_jpegs):
    path = real_jpegs[1]
    image = Image.open(path)
    by_path = preprocess(path)
    assert np.array_equal(preprocess(image), by_path)
    assert np.array_equal(preprocess(np.asarray(image.convert("RGB"))), by_path)
    gray = image.convert("L")
    assert np.array_equal(preprocess(np.asarray(gray)), preprocess(gray))


def test_array_inputs_that_are_not_images_are_refused():
    with pytest.raises(ImageError, match=r"<array float32 \(10, 10, 3\)>: .*must be uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageError, match=r"shape \(H, W\), \(H, W, 3\) or \(H, W, 4\)"):
        preprocess(np.zeros((2, 10, 10, 3), np.uint8))


def test_alpha_is_composited_over_white(odd_files):
    alpha = np.asarray(Image.open(odd_files["rgba.png"]).getchannel("A"))
    rgb = np.asarray(load_rgb(odd_files["rgba.png"]))
    transparent = alpha == 0
    assert transparent.any() and (rgb[transparent] == 255).all()
    opaque = alpha == 255
    original = np.asarray(Image.open(odd_files["rgba.png"]).convert("RGB"))
    assert opaque.any() and np.array_equal(rgb[opaque], original[opaque])
    palette = Image.open(odd_files["palette_transparent.png"])
    clear = np.asarray(palette) == 0
    assert clear.any() and (np.asarray(load_rgb(palette))[clear] == 255).all()


def test_16_bit_keeps_its_top_8_bits(odd_files, real_jpegs):
    gray8 = np.asarray(Image.open(real_jpegs[0]).convert("RGB").convert("L"))
    rgb = np.asarray(load_rgb(odd_files["gray16.png"]))
    for channel in range(3):  # value * 257 / 256, floored, is the 8-bit value again
        assert np.array_equal(rgb[..., channel], gray8)


def test_exif_orientation_and_first_frame(odd_files, real_jpegs):
    upright = load_rgb(odd_files["rotated.jpg"])
    stored = Image.open(odd_files["rotated.jpg"])
    assert upright.size == (stored.height, stored.width)
    assert np.array_equal(np.asarray(upright),
                          np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    animation = Image.open(odd_files["animated.gif"])
    assert animation.n_frames == 2
    first = np.asarray(Image.open(odd_files["animated.gif"]).convert("RGB"))
    animation.seek(1)  # a caller left it on another frame: the first one is still used
    assert np.array_equal(np.asarray(load_rgb(animation)), first)


def test_resized_size_follows_torchvision_rounding():
    assert resized_size((213, 160), 100) == (133, 100)
    assert resized_size((160, 213), 100) == (100, 133)
    assert resized_size((667, 500), 100) == (133, 100)
    assert resized_size((100, 100), 100) == (100, 100)


def test_normalize_and_denormalize_are_inverse():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 100, 100, 3), dtype=np.uint8)
    spec = Preprocess()
    scaled = normalize(pixels, spec)
    assert scaled.shape == (2, 3, 100, 100) and scaled.min() >= -1 and scaled.max() <= 1
    assert np.array_equal(denormalize(scaled, spec), pixels)
    expected = to_float(torch.from_numpy(pixels).permute(0, 3, 1, 2), spec).numpy()
    assert np.array_equal(scaled, expected)


def test_jpeg_draft_changes_nothing_where_it_cannot_reduce(real_jpegs):
    for path in real_jpegs[:4]:  # shorter side 160 px < 2 x 100 px: decoded at full size
        assert draft_scale(Image.open(path).size, 100) == 1
        assert np.array_equal(preprocess(path, jpeg_draft=True), preprocess(path))


def test_jpeg_draft_decodes_full_size_photos_smaller(fullres_root):
    path = sorted((fullres_root / "jpg").glob("*.jpg"))[0]
    size = Image.open(path).size
    scale = draft_scale(size, 100)
    assert scale >= 2
    drafted = load_rgb(path, draft_px=100)
    assert drafted.size == ((size[0] + scale - 1) // scale, (size[1] + scale - 1) // scale)
    assert min(drafted.size) >= 100
    spec = Preprocess()
    fast = load_pixels(path, spec, jpeg_draft=True).astype(np.float64)  # (S, S, 3) uint8
    exact = load_pixels(path, spec).astype(np.float64)
    assert fast.shape == exact.shape
    # Not bit-exact (libjpeg's scaled IDCT is a box filter), but the same picture.
    assert 0 < np.abs(fast - exact).mean() < 4.0  # 8-bit levels
    assert np.corrcoef(fast.ravel(), exact.ravel())[0, 1] > 0.98
