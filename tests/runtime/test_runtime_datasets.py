"""runtime.datasets: class-folder layouts and their errors, the stratified val split, the
full-size photo table's checks, and the one Flowers102 reader (torch-free)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowae.runtime.contract import CLASS_NAMES
from flowae.runtime.datasets import (
    SplitFiles,
    fullres_files,
    open_class_folders,
    open_dataset,
    open_flowers102,
    without_unreadable,
)
from flowae.runtime.errors import DataError


def write_classes(folder: Path, counts: dict[str, int]) -> None:
    """`counts[name]` small JPEGs in folder/name/ (a uniform colour per class)."""
    for k, (name, count) in enumerate(counts.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (16, 12), (40 * k % 256, 7 * i % 256, 90)).save(
                folder / name / f"{i:03d}.jpg")


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_split_layout_lists_each_split_with_sorted_class_names(tmp_path):
    write_classes(tmp_path / "train", {"tulip": 3, "daisy": 2, "rose": 4})
    write_classes(tmp_path / "val", {"rose": 1, "daisy": 2})
    (tmp_path / "train" / "rose" / "notes.txt").write_text("not an image")
    data = open_class_folders(tmp_path)
    assert data.kind == "class-folders" and data.layout == "split"
    assert data.class_names == ("daisy", "rose", "tulip")
    assert set(data.splits) == {"train", "val"}
    train = data.split("train")
    assert len(train.paths) == 9 and sorted(set(train.labels)) == [0, 1, 2]
    for path, label in zip(*train, strict=True):
        assert path.parent.name == data.class_names[label]
    assert [data.class_names[label] for label in data.split("val").labels] == [
        "daisy", "daisy", "rose"]
    one_line_error(lambda: data.split("test"), "no test split")
    described = data.describe()
    assert described["class_names"] == ["daisy", "rose", "tulip"]
    assert described["images"] == {"train": 9, "val": 3}


def test_optional_test_folder_is_read(tmp_path):
    for split in ("train", "val", "test"):
        write_classes(tmp_path / split, {"a": 2, "b": 2})
    assert open_dataset(tmp_path).split("test").labels == (0, 0, 1, 1)


def test_single_folder_is_split_stratified_and_seeded(tmp_path):
    write_classes(tmp_path, {"a": 20, "b": 10, "c": 1})
    data = open_class_folders(tmp_path, val_fraction=0.2, seed=3)
    assert data.layout == "single" and data.val_fraction == 0.2 and data.split_seed == 3
    train, val = data.split("train"), data.split("val")
    assert np.bincount(val.labels, minlength=3).tolist() == [4, 2, 0]  # c's one image: train
    assert np.bincount(train.labels, minlength=3).tolist() == [16, 8, 1]
    assert not set(train.paths) & set(val.paths)
    assert open_class_folders(tmp_path, val_fraction=0.2, seed=3) == data
    assert open_class_folders(tmp_path, val_fraction=0.2, seed=4).split("val") != val
    default = open_class_folders(tmp_path)
    assert default.val_fraction == 0.1
    assert np.bincount(default.split("val").labels, minlength=3).tolist() == [2, 1, 0]


def _missing(root):
    return root / "nowhere"


def _one_class(root):
    write_classes(root / "train", {"only": 2})
    write_classes(root / "val", {"only": 1})
    return root


def _empty_class(root):
    write_classes(root / "train", {"a": 2, "b": 2})
    write_classes(root / "val", {"a": 1})
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "readme.txt").write_text("x")
    return root


def _val_class_not_in_train(root):
    write_classes(root / "train", {"a": 2, "b": 2})
    write_classes(root / "val", {"a": 1, "zinnia": 1})
    return root


def _train_without_val(root):
    write_classes(root / "train", {"a": 2, "b": 2})
    return root


def _val_without_train(root):
    write_classes(root / "val", {"a": 2, "b": 2})
    return root


@pytest.mark.parametrize("make, needles", [
    (_missing, ["nowhere", "no such folder"]),
    (_one_class, ["found 1 class folder", "at least two"]),
    (_empty_class, ["train/c", "holds no image"]),
    (_val_class_not_in_train, ["'zinnia'", "not in train/"]),
    (_train_without_val, ["no val/"]),
    (_val_without_train, ["no train/"]),
])
def test_bad_class_folders_are_one_line_errors(tmp_path, make, needles):
    root = make(tmp_path)
    one_line_error(lambda: open_class_folders(root), *needles)


def test_val_fraction_is_refused_where_the_data_names_its_val_set(tmp_path, fake_root):
    write_classes(tmp_path / "train", {"a": 2, "b": 2})
    write_classes(tmp_path / "val", {"a": 1, "b": 1})
    one_line_error(lambda: open_class_folders(tmp_path, val_fraction=0.2), "val fraction")
    one_line_error(lambda: open_dataset(fake_root, val_fraction=0.2), "official val split")
    write_classes(tmp_path / "single", {"a": 2, "b": 2})
    for bad in (0.0, 1.0, -0.5):
        one_line_error(lambda bad=bad: open_class_folders(tmp_path / "single", bad),
                       "val fraction must be in (0, 1)")


def test_unreadable_images_are_skipped_counted_or_refused():
    names = ("a", "b")
    files = SplitFiles((Path("a1"), Path("a2"), Path("b1")), (0, 0, 1))
    assert without_unreadable(files, {}, names, strict=True, what="x") is files
    kept = without_unreadable(files, {Path("a2"): "a2: corrupt"}, names, strict=False, what="x")
    assert kept == SplitFiles((Path("a1"), Path("b1")), (0, 1))
    one_line_error(lambda: without_unreadable(files, {Path("a2"): "a2: corrupt"}, names,
                                              strict=True, what="DATA train"),
                   "DATA train", "1 unreadable", "a2: corrupt")
    one_line_error(lambda: without_unreadable(files, {Path("b1"): "b1: empty"}, names,
                                              strict=False, what="DATA train"),
                   "class 'b' has no readable image")


def test_flowers102_reader_gives_the_contract_class_names(fake_root):
    data = open_flowers102(fake_root)
    assert data.class_names == CLASS_NAMES and set(data.splits) == {"train", "val", "test"}
    assert open_dataset(fake_root) == data
    assert all(0 <= label < 102 for split in data.splits.values() for label in split.labels)


def _write_fullres(root: Path, lines: list[str]) -> Path:
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_fullres_table_is_read(tmp_path):
    root = _write_fullres(tmp_path, ["file,label,class_name", "a.jpg,0,pink primrose",
                                     "sub/b.jpg,101,blackberry lily"])
    paths, labels = fullres_files(root)
    assert paths == (root / "jpg" / "a.jpg", root / "jpg" / "sub" / "b.jpg")
    assert labels == (0, 101)


@pytest.mark.parametrize("row, needle", [
    ("c.jpg,102,x", "line 3: label 102 outside 0..101"),
    ("c.jpg,-1,x", "line 3: label -1 outside 0..101"),
    ("c.jpg,seven,x", "line 3: label 'seven' is not an integer"),
    ("/etc/passwd,1,x", "line 3: file '/etc/passwd' is outside"),
    ("../../secret.jpg,1,x", "line 3: file '../../secret.jpg' is outside"),
    ("c.jpg", "line 3: needs both a file and a label"),
    (",3,x", "line 3: needs both a file and a label"),
])
def test_fullres_rows_are_checked_one_line_naming_the_row(tmp_path, row, needle):
    root = _write_fullres(tmp_path, ["file,label,class_name", "a.jpg,0,x", row])
    one_line_error(lambda: fullres_files(root), "labels.csv", needle)


def test_fullres_table_needs_its_columns(tmp_path):
    root = _write_fullres(tmp_path, ["name,class", "a.jpg,0"])
    one_line_error(lambda: fullres_files(root), "missing file, label")
    one_line_error(lambda: fullres_files(tmp_path / "none"), "expected a CSV with columns")
    root = _write_fullres(tmp_path / "small", ["file,label", "a.jpg,3"])
    one_line_error(lambda: fullres_files(root, num_classes=3), "label 3 outside 0..2")


def test_readers_import_without_torch(tmp_path):
    write_classes(tmp_path / "data", {"a": 2, "b": 3})
    code = ("import sys; sys.modules['torch'] = None; sys.modules['scipy'] = None\n"
            "from flowae.runtime.datasets import open_dataset\n"
            f"print(len(open_dataset({str(tmp_path / 'data')!r}).split('train').paths))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
