"""Bad inputs of every kind, built as real files at test time: each gets a one-line
error naming the file and the reason, and never stops a batch; every valid image, however
small or elongated, gets its answer."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowae.runtime.cli import expand_inputs
from flowae.runtime.contract import CONTRACT_VERSION, ROLE_DECODER, ROLE_ENCODER_CLASSIFIER
from flowae.runtime.contract import graph_file as graph_name
from flowae.runtime.errors import ContractError, ImageError, ModelLoadError
from flowae.runtime.predictor import Predictor, load_graph


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A real PNG signature and IHDR claiming width x height, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def tiff_missing_dimensions(path: Path) -> Path:
    """A two-page 16-bit TIFF whose second page lost its ImageWidth tag: Pillow opens it, then
    raises `TypeError: Missing dimensions` when it counts the pages."""
    page = Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)
    buffer = io.BytesIO()
    page.save(buffer, "TIFF", save_all=True, append_images=[page])
    data = bytearray(buffer.getvalue())  # little-endian: "II", 42, offset of the first IFD
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data,
                                                                                first)[0])[0]
    for entry in range(struct.unpack_from("<H", data, second)[0]):
        at = second + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 256:  # ImageWidth -> an unknown tag
            struct.pack_into("<H", data, at, 65000)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def bad_images(real_jpegs, fullres_root, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason its error must give)."""
    folder = tmp_path_factory.mktemp("bad_images")
    jpeg = real_jpegs[0].read_bytes()
    photo = sorted((fullres_root / "jpg").glob("*.jpg"))[0].read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "ends_early.jpg").write_bytes(photo[: len(photo) * 3 // 4] + b"\xff\xd9")
    (folder / "text.jpg").write_text("this is a text file, not a photo\n")
    png_header_only(folder / "bomb.png", 30_000, 30_000)  # 9e8 px: 10 x the budget
    tiff_missing_dimensions(folder / "pages.tif")
    os.mkfifo(folder / "pipe.jpg")  # open() for reading would wait for a writer forever
    return {
        "missing": (folder / "missing.jpg", "no such file"),
        "zero-byte": (folder / "zero.jpg", "empty file (0 bytes)"),
        "truncated": (folder / "truncated.jpg", "truncated or corrupt image"),
        "ends-early": (folder / "ends_early.jpg", "truncated or corrupt image (the JPEG's data"),
        "text": (folder / "text.jpg", "not an image Pillow can read"),
        "bomb": (folder / "bomb.png", "image is 30000x30000 px (900.0 Mpx), over the pixel "
                                      "budget of 89,478,485 px"),
        "tiff": (folder / "pages.tif", "truncated or corrupt image (Missing dimensions)"),
        "fifo": (folder / "pipe.jpg", "not a regular file: named pipe"),
        "device": (Path("/dev/zero"), "not a regular file: character device"),
        "directory": (folder, "is a directory, not an image"),
    }


def test_each_bad_image_gets_a_one_line_error_and_the_batch_goes_on(predictor, bad_images,
                                                                   real_jpegs):
    good = real_jpegs[1]
    sources = [good] + [path for path, _ in bad_images.values()] + [good]
    results = list(predictor.run(sources, top_k=3))
    assert results[0].ok and results[-1].ok and results[0].top_k == results[-1].top_k
    for result, (name, (path, reason)) in zip(results[1:-1], bad_images.items(), strict=True):
        assert not result.ok, name
        assert result.error.startswith(f"{path}: "), name
        assert reason in result.error, (name, result.error)
        assert "\n" not in result.error and "Traceback" not in result.error


def test_corrupt_tiff_beside_a_photo_with_the_bundled_model(bad_images, fullres_root):
    photo = sorted((fullres_root / "jpg").glob("*.jpg"))[0]
    tiff = bad_images["tiff"][0]
    bundled = Predictor(provider="cpu", threads=1)
    broken, answered = bundled.run([tiff, photo])
    assert broken.error == f"{tiff}: truncated or corrupt image (Missing dimensions)"
    assert answered.ok and list(answered.top_k) == bundled.predict(photo)[0]  # as if alone


def test_tiny_and_elongated_images_are_classified(predictor, tmp_path):
    shapes = {"one_pixel.png": (1, 1), "two_by_three.png": (2, 3), "panorama.png": (20_000, 20),
              "tower.png": (20, 20_000), "sliver.jpg": (1000, 3)}
    for name, size in shapes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    results = list(predictor.run([tmp_path / name for name in shapes]))
    for result, name in zip(results, shapes, strict=True):
        assert result.ok and len(result.top_k) == 5, (name, result.error)
    # One colour of any shape is the same 100 x 100 input to the model.
    assert len({tuple(p.label for p in r.top_k) for r in results[:4]}) == 1


def test_pillow_limit_still_guards_other_formats(predictor, real_jpegs, tmp_path, monkeypatch):
    Image.new("RGB", (60, 40)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the application's own choice
    png, jpeg = predictor.run([tmp_path / "small.png", real_jpegs[0]])
    assert png.error == (f"{tmp_path / 'small.png'}: image is 60x40 px (0.0 Mpx), over Pillow's "
                         "limit of 1,000 px (PIL.Image.MAX_IMAGE_PIXELS)")
    assert jpeg.ok  # JPEGs follow the runtime's budget, with reduced decoding above it


def test_odd_but_valid_files_work(predictor, real_jpegs, tmp_path):
    photo = Image.open(real_jpegs[2]).convert("RGB")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    gray16 = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    for result in predictor.run([tmp_path / "cmyk.jpg", tmp_path / "gray16.png"]):
        assert result.ok and len(result.top_k) == 5, result.error


def test_in_memory_inputs_are_named_in_errors(predictor):
    (result,) = predictor.run([Image.new("RGB", (1, 1))])
    assert result.ok
    with pytest.raises(ImageError, match=r"<array int64 \(4, 4\)>: array image must be uint8"):
        predictor.predict(np.zeros((4, 4), dtype=np.int64))


def test_empty_directory_and_unmatched_glob(tmp_path, real_jpegs):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    items = expand_inputs([tmp_path / "empty", tmp_path / "notes", str(tmp_path / "*.png"),
                           real_jpegs[0]])
    errors = [item.error for item in items[:3]]
    assert errors == [f"{tmp_path / 'empty'}: directory holds no images",
                      f"{tmp_path / 'notes'}: directory holds no images",
                      f"{tmp_path / '*.png'}: no file matches"]
    assert items[3] == real_jpegs[0]


# ONNX files: corrupt, without flowae metadata, another contract version, and friends.
@pytest.fixture
def encoder_file(model_dir) -> Path:
    return model_dir / graph_name(ROLE_ENCODER_CLASSIFIER)


def test_corrupt_onnx_files(encoder_file, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(encoder_file.read_bytes()[:5000])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path, reason in [(truncated, "not a loadable ONNX model"),
                         (garbage, "not a loadable ONNX model"),
                         (empty, "empty file (0 bytes)")]:
        with pytest.raises(ModelLoadError) as caught:
            Predictor(path, provider="cpu")
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_onnx_without_flowae_metadata(encoder_file, tmp_path, onnx_metadata):
    _, set_metadata = onnx_metadata
    bare = set_metadata(encoder_file, None, tmp_path / graph_name(ROLE_ENCODER_CLASSIFIER))
    with pytest.raises(ContractError, match=r"no 'flowae' metadata; not a graph written by"):
        Predictor(bare, provider="cpu")


def test_onnx_of_another_contract_version(encoder_file, tmp_path, onnx_metadata):
    read_metadata, set_metadata = onnx_metadata
    metadata = read_metadata(encoder_file)
    metadata["contract_version"] = CONTRACT_VERSION + 1
    newer = set_metadata(encoder_file, json.dumps(metadata),
                         tmp_path / graph_name(ROLE_ENCODER_CLASSIFIER))
    with pytest.raises(ContractError) as caught:
        Predictor(newer, provider="cpu")
    assert str(caught.value) == (f"{newer}: model has contract version {CONTRACT_VERSION + 1}, "
                                 f"this runtime reads {CONTRACT_VERSION}")


def test_onnx_with_unreadable_metadata_or_wrong_role(encoder_file, model_dir, tmp_path,
                                                     onnx_metadata):
    _, set_metadata = onnx_metadata
    broken = set_metadata(encoder_file, "{not json", tmp_path / "broken.onnx")
    with pytest.raises(ContractError, match="metadata is not valid JSON"):
        load_graph(broken, ROLE_ENCODER_CLASSIFIER, "CPUExecutionProvider")
    decoder = model_dir / graph_name(ROLE_DECODER)
    with pytest.raises(ContractError, match="is a decoder graph, expected encoder_classifier"):
        Predictor(decoder, provider="cpu")


def test_decoder_from_another_model_is_refused(model_dir, tmp_path, real_jpegs, onnx_metadata):
    read_metadata, set_metadata = onnx_metadata
    for role in (ROLE_ENCODER_CLASSIFIER, ROLE_DECODER):
        (tmp_path / graph_name(role)).write_bytes((model_dir / graph_name(role)).read_bytes())
    decoder = tmp_path / graph_name(ROLE_DECODER)
    metadata = read_metadata(decoder)
    metadata["variant"] = "base"
    set_metadata(decoder, json.dumps(metadata))
    mixed = Predictor(tmp_path, provider="cpu")
    assert mixed.predict(real_jpegs[0])  # classification does not need the decoder
    with pytest.raises(ContractError, match="decoder of variant 'base' does not match"):
        mixed.reconstruct(real_jpegs[0])


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nowhere: no such model file or directory"):
        Predictor(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=r"no encoder_classifier graph \(\.onnx or \.ort\)"):
        Predictor(tmp_path)
