"""Flowers102 on disk: the official split read like torchvision, the eval transform built from
the contract, in-memory decoding, and one-line DataErrors for a missing or corrupt dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from flowae.data import (
    SPLITS,
    eval_transform,
    load_split,
    split_files,
    to_float,
    to_uint8,
)
from flowae.runtime.contract import CLASS_NAMES, NUM_CLASSES, Preprocess
from flowae.runtime.errors import DataError, FlowaeError
from flowae.runtime.images import load_rgb

OFFICIAL_SIZES = {"train": 1020, "val": 1020, "test": 6149}
TINY = {"trnid": 2, "valid": 2, "tstid": 2}


def contract_reference(path, preprocess: Preprocess) -> np.ndarray:
    """The contract's preprocessing rule spelled out with Pillow alone: (H, W, 3) uint8."""
    image = load_rgb(path)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(long * preprocess.resize_px / short)
    size = (preprocess.resize_px, new_long) if width <= height else (new_long, preprocess.resize_px)
    image = image.resize(size, Image.BILINEAR)
    crop = preprocess.image_size_px
    top = int(round((image.height - crop) / 2))
    left = int(round((image.width - crop) / 2))
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def assert_one_line_data_error(exc: BaseException, root) -> None:
    message = str(exc)
    assert isinstance(exc, DataError) and isinstance(exc, FlowaeError)
    assert "\n" not in message
    assert str(root) in message
    assert "--data-root" in message and "--download" in message


def test_class_names_are_torchvisions():
    from torchvision.datasets import Flowers102

    assert tuple(Flowers102.classes) == CLASS_NAMES
    assert NUM_CLASSES == len(set(CLASS_NAMES)) == 102


def test_fake_split_files_follow_the_mat_files(fake_root):
    base = fake_root / "flowers-102"
    set_ids = loadmat(base / "setid.mat")  # no squeeze: (1, N) arrays, read independently
    labels_1based = loadmat(base / "imagelabels.mat")["labels"].ravel()
    seen = []
    for split, key in zip(SPLITS, ("trnid", "valid", "tstid"), strict=True):
        files = split_files(fake_root, split)
        ids = set_ids[key].ravel().tolist()
        assert len(files.paths) == len(files.labels) == len(ids) > 0
        assert [p.name for p in files.paths] == [f"image_{i:05d}.jpg" for i in ids]
        assert all(p.parent == base / "jpg" and p.is_file() for p in files.paths)
        assert list(files.labels) == [int(labels_1based[i - 1]) - 1 for i in ids]
        seen += ids
    assert sorted(seen) == list(range(1, len(list((base / "jpg").iterdir())) + 1))  # a partition


@pytest.mark.real_data
@pytest.mark.parametrize("split", SPLITS)
def test_real_split_files_match_torchvision(real_root, split):
    from torchvision.datasets import Flowers102

    files = split_files(real_root, split)
    reference = Flowers102(str(real_root), split=split, download=False)
    assert len(files.paths) == OFFICIAL_SIZES[split]
    assert list(files.labels) == list(reference._labels)
    assert [p.resolve() for p in files.paths] == [p.resolve() for p in reference._image_files]


@pytest.mark.real_data
def test_real_splits_partition_the_dataset_ten_per_class_for_training(real_root):
    files = {split: split_files(real_root, split) for split in SPLITS}
    names = [p.name for split in SPLITS for p in files[split].paths]
    assert len(names) == len(set(names)) == 8189
    for split in ("train", "val"):  # the official split: 10 images per class in each
        assert np.bincount(files[split].labels, minlength=NUM_CLASSES).tolist() == [10] * 102
    assert set(files["test"].labels) == set(range(NUM_CLASSES))


@pytest.mark.real_data
def test_eval_transform_follows_the_contract_on_real_jpegs(real_root):
    preprocess = Preprocess()
    transform = eval_transform(preprocess)
    paths = split_files(real_root, "test").paths
    for path in (paths[0], paths[1000], paths[-1]):
        out = transform(load_rgb(path))
        assert out.dtype == torch.uint8 and out.shape == (3, 100, 100)
        assert np.array_equal(out.permute(1, 2, 0).numpy(), contract_reference(path, preprocess))
        scaled = to_float(out[None], preprocess)
        assert scaled.dtype == torch.float32 and scaled.shape == (1, 3, 100, 100)
        assert -1.0 <= scaled.min() < scaled.max() <= 1.0


@pytest.mark.real_data
def test_full_size_photos_agree_with_the_split_and_the_contract(real_root, fullres_root):
    import csv

    with open(fullres_root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = split_files(real_root, "test")
    label_of = {p.name: label for p, label in zip(test.paths, test.labels, strict=True)}
    assert len(rows) == 306
    for row in rows:  # official test images, with the split's label and the contract's name
        assert label_of[row["file"]] == int(row["label"])
        assert CLASS_NAMES[int(row["label"])] == row["class_name"]

    preprocess = Preprocess()
    transform = eval_transform(preprocess)
    for row in rows[::100]:  # camera-size JPEGs (about 500x670): the big downscale
        path = fullres_root / "jpg" / row["file"]
        out = transform(load_rgb(path))
        assert out.shape == (3, 100, 100)
        assert np.array_equal(out.permute(1, 2, 0).numpy(), contract_reference(path, preprocess))


def test_eval_transform_follows_the_contract_on_fake_jpegs(fake_root):
    # The fake JPEGs have odd sizes in both orientations (100..179 px each side).
    preprocess = Preprocess()
    transform = eval_transform(preprocess)
    for path in split_files(fake_root, "train").paths:
        out = transform(load_rgb(path))
        assert out.shape == (3, 100, 100)
        assert np.array_equal(out.permute(1, 2, 0).numpy(), contract_reference(path, preprocess))


def test_scaling_maps_uint8_onto_minus_one_to_one_and_back():
    preprocess = Preprocess()
    everything = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    scaled = to_float(everything, preprocess)
    assert scaled.dtype == torch.float32
    assert scaled.min() == -1.0 and scaled.max() == 1.0
    assert torch.equal(to_uint8(scaled, preprocess), everything)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2),
                                preprocess)[0, :, 0], torch.tensor([[0, 255]] * 3).to(torch.uint8))


def test_unsupported_resize_filter_is_refused():
    with pytest.raises(DataError, match="unsupported resize filter 'lanczos'"):
        eval_transform(Preprocess(resize_filter="lanczos"))


def test_load_split_decodes_every_image_once_into_memory(fake_root):
    preprocess = Preprocess()
    transform = eval_transform(preprocess)
    files = split_files(fake_root, "val")
    split = load_split(fake_root, "val", preprocess)
    count = len(files.paths)
    assert split.images.dtype == torch.uint8 and split.images.shape == (count, 3, 100, 100)
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == list(files.labels)
    assert len(split) == count
    for image, path in zip(split.images, files.paths, strict=True):
        assert torch.equal(image, transform(load_rgb(path)))


def test_load_split_store_size_keeps_a_larger_square_for_augmentation(fake_root):
    split = load_split(fake_root, "train", Preprocess(), store_px=115)
    assert split.images.shape == (len(split_files(fake_root, "train").paths), 3, 115, 115)


def test_load_split_takes_grayscale_and_cmyk_jpegs(make_fake_root):
    root = make_fake_root(TINY)
    paths = split_files(root, "train").paths
    rgb = np.asarray(Image.open(paths[0]))
    Image.fromarray(rgb).convert("L").save(paths[0])
    Image.fromarray(rgb).convert("CMYK").save(paths[1])
    images = load_split(root, "train", Preprocess()).images
    assert images.shape == (2, 3, 100, 100)
    assert torch.equal(images[0, 0], images[0, 1]) and torch.equal(images[0, 1], images[0, 2])
    assert not torch.equal(images[1, 0], images[1, 1])  # colour survived the CMYK round trip


def test_unknown_split_is_refused(fake_root):
    with pytest.raises(DataError, match="unknown split 'validation'"):
        split_files(fake_root, "validation")


def _no_folder(make, tmp_path):
    return tmp_path / "nowhere"


def _empty_folder(make, tmp_path):
    (tmp_path / "flowers-102").mkdir(parents=True)
    return tmp_path


def _garbage_setid(make, tmp_path):
    root = make(TINY)
    (root / "flowers-102" / "setid.mat").write_bytes(b"this is not a MATLAB file\n" * 20)
    return root


def _truncated_labels(make, tmp_path):
    root = make(TINY)
    path = root / "flowers-102" / "imagelabels.mat"
    path.write_bytes(path.read_bytes()[:40])
    return root


def _flipped_byte_in_compressed_setid(make, tmp_path):
    # The real .mat files are zlib-compressed; damage there surfaces as zlib.error.
    root = make(TINY)
    path = root / "flowers-102" / "setid.mat"
    savemat(path, {"trnid": np.arange(1, 3), "valid": np.arange(3, 5), "tstid": np.arange(5, 7)},
            do_compression=True)
    data = bytearray(path.read_bytes())
    data[len(data) - 20] ^= 0xFF
    path.write_bytes(bytes(data))
    return root


def _missing_setid(make, tmp_path):
    root = make(TINY)
    (root / "flowers-102" / "setid.mat").unlink()
    return root


def _wrong_keys(make, tmp_path):
    root = make(TINY)
    savemat(root / "flowers-102" / "setid.mat", {"train": np.arange(1, 7)})
    return root


def _labels_too_short(make, tmp_path):
    root = make(TINY)
    savemat(root / "flowers-102" / "imagelabels.mat", {"labels": np.ones(1, dtype=np.uint8)})
    return root


def _label_out_of_range(make, tmp_path):
    root = make(TINY)
    savemat(root / "flowers-102" / "imagelabels.mat", {"labels": np.zeros(6, dtype=np.uint8)})
    return root


@pytest.mark.parametrize(
    "make_root",
    [_no_folder, _empty_folder, _garbage_setid, _truncated_labels,
     _flipped_byte_in_compressed_setid, _missing_setid, _wrong_keys, _labels_too_short,
     _label_out_of_range],
)
def test_missing_or_corrupt_dataset_is_one_line_naming_folder_and_fixes(
    make_fake_root, tmp_path, make_root
):
    root = make_root(make_fake_root, tmp_path)
    for split in SPLITS:
        with pytest.raises(DataError) as info:
            split_files(root, split)
        assert_one_line_data_error(info.value, root)
    with pytest.raises(DataError) as info:
        load_split(root, "train", Preprocess())
    assert_one_line_data_error(info.value, root)


@pytest.mark.parametrize("damage", ["corrupt", "empty", "missing"])
def test_bad_jpeg_in_a_split_is_one_line_naming_the_file(make_fake_root, damage):
    root = make_fake_root(TINY)
    victim = split_files(root, "val").paths[1]
    if damage == "corrupt":
        victim.write_bytes(victim.read_bytes()[:200])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.unlink()
    with pytest.raises(DataError) as info:
        load_split(root, "val", Preprocess())
    assert_one_line_data_error(info.value, root)
    assert victim.name in str(info.value)
    assert load_split(root, "train", Preprocess()).images.shape == (2, 3, 100, 100)
