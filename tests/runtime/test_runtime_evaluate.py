"""The runtime's evaluation: the .mat reader it uses against scipy, the split against the .mat
files as scipy reads them, and its accuracy against PyTorch's on the same checkpoint and
images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.data import eval_transform, to_float
from flowae.runtime.datasets import flowers102_split, fullres_files, read_mat
from flowae.runtime.errors import DataError
from flowae.runtime.evaluate import score
from flowae.runtime.images import load_rgb

PARITY = 1e-4  # logits may differ this much between onnxruntime and PyTorch


def test_mat_reader_matches_scipy(real_root, fake_root, tmp_path):
    files = [real_root / "flowers-102" / "setid.mat",  # zlib-compressed, as published
             real_root / "flowers-102" / "imagelabels.mat",
             fake_root / "flowers-102" / "setid.mat"]  # scipy's uncompressed writer
    savemat(tmp_path / "mixed.mat", {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                     "b": np.array([[7]], dtype=np.int16)},
            do_compression=True)
    files.append(tmp_path / "mixed.mat")
    for path in files:
        ours, theirs = read_mat(path), loadmat(str(path))
        names = {k for k in theirs if not k.startswith("__")}
        assert set(ours) == names, path
        for name in names:
            assert ours[name].dtype == theirs[name].dtype
            assert np.array_equal(ours[name], theirs[name]), (path, name)


def test_mat_reader_refuses_other_files(tmp_path):
    (tmp_path / "x.mat").write_text("plain text")
    with pytest.raises(DataError, match="not a MATLAB 5.0 .mat file"):
        read_mat(tmp_path / "x.mat")
    with pytest.raises(DataError, match="Flowers102 not found or corrupt in"):
        flowers102_split(tmp_path)
    with pytest.raises(DataError, match="expected a CSV with columns file,label"):
        fullres_files(tmp_path)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_follows_the_mat_files_as_scipy_reads_them(real_root, split):
    paths, labels = flowers102_split(real_root, split)
    base = real_root / "flowers-102"
    ids = loadmat(base / "setid.mat")[{"train": "trnid", "val": "valid", "test": "tstid"}[
        split]].ravel()
    all_labels = loadmat(base / "imagelabels.mat")["labels"].ravel()
    assert [p.name for p in paths] == [f"image_{i:05d}.jpg" for i in ids]
    assert list(labels) == [int(all_labels[i - 1]) - 1 for i in ids]
    assert len(paths) == {"train": 1020, "val": 1020, "test": 6149}[split]


def test_fullres_labels(fullres_root):
    paths, labels = fullres_files(fullres_root)
    assert len(paths) == 306 and all(p.is_file() for p in paths[:10])
    assert np.bincount(labels, minlength=102).tolist() == [3] * 102


def test_top1_agrees_with_pytorch_on_real_test_images(real_root, tiny_runs, predictor):
    """Image for image, the runtime's top-1 is PyTorch's wherever their logits can tell."""
    paths, labels = flowers102_split(real_root, "test")
    paths, labels = paths[::41], labels[::41]  # 150 images spread over the split
    model = model_from_checkpoint(load_checkpoint(tiny_runs["upsample"]))
    transform = eval_transform(predictor.preprocess)
    with torch.no_grad():
        inputs = to_float(torch.stack([transform(load_rgb(p)) for p in paths]),
                          predictor.preprocess)
        logits = model(inputs)[0].numpy()
    accuracy, top1 = score(predictor, paths, labels)
    ordered = np.sort(logits, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > 2 * PARITY  # no near-tie a 1e-4 error could flip
    assert clear.mean() > 0.9
    assert np.array_equal(top1[clear], logits.argmax(axis=1)[clear])
    assert accuracy.images == 150 and accuracy.failed == 0
    assert accuracy.top1 == pytest.approx(100 * float((top1 == labels).mean()))


def test_class_folders_must_list_the_models_classes(tmp_path):
    from PIL import Image

    from flowae.runtime.evaluate import evaluate

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / split / name / "a.jpg")
    with pytest.raises(DataError, match="2 classes are not the model's 102 classes"):
        evaluate(None, tmp_path, provider="cpu")
