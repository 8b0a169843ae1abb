"""Training on class folders (ImageFolder / Ultralytics classify layout): class names from the
folders size the classifier and travel in metrics.json and the checkpoint; bad folders are
one-line errors with exit 2; resuming on other data is refused; and, on real photos, a short
run on a 10-class view of Flowers102 learns well above chance."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
from click.testing import CliRunner

from benchmarks.flowers_view import build_view, every_nth_label
from flowae.checkpoint import (
    CLASS_NAMES_KEY,
    checkpoint_class_names,
    load_checkpoint,
    model_from_checkpoint,
)
from flowae.cli import main
from flowae.config import TrainConfig
from flowae.data import open_training_data, reopen_dataset
from flowae.models import get_variant
from flowae.runtime.datasets import open_class_folders
from flowae.runtime.errors import CheckpointError, DataError
from flowae.train import METRICS_NAME, train

CLASSES = ("daisy", "rose", "tulip")  # the fixture's default classes

FAST = ["--variant", "res16", "--ae-epochs", "1", "--cls-epochs", "1", "--dec-epochs", "0",
        "--batch-size", "8", "--device", "cpu", "--no-progress", "--recipe", "seed"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("layout", ["split", "single"])
def test_cli_trains_on_class_folders_and_records_the_classes(class_folders, tmp_path,
                                                             layout):
    data = class_folders.make(layout)
    run_dir = tmp_path / "run"
    result = invoke("--data", data, "--out", run_dir, *FAST)
    assert result.exit_code == 0, result.output
    split = "test" if layout == "split" else "val"
    assert result.stdout.startswith(f"res16: {split} top-1 ")
    assert "3 classes" in result.stdout

    checkpoint = load_checkpoint(run_dir)
    assert checkpoint[CLASS_NAMES_KEY] == list(CLASSES)
    assert checkpoint_class_names(checkpoint) == CLASSES
    assert checkpoint["model_config"]["num_classes"] == 3
    model = model_from_checkpoint(checkpoint)
    assert model.classifier[-1].out_features == 3
    metrics = json.loads((run_dir / METRICS_NAME).read_text())
    assert metrics["class_names"] == list(CLASSES)
    assert metrics["test_split"] == split
    recorded = metrics["dataset"]
    assert recorded["kind"] == "class-folders" and recorded["layout"] == layout
    expected = open_class_folders(data).describe()
    assert recorded == expected
    if layout == "single":
        assert (recorded["val_fraction"], recorded["split_seed"]) == (0.1, 0)
        assert recorded["images"] == {"train": 21, "val": 3}  # one of 8 per class held out
    reopened = reopen_dataset(checkpoint["dataset"])  # what export reads its images from
    assert reopened.describe() == expected and reopened.splits == open_class_folders(
        data).splits


def test_val_fraction_reaches_the_split(class_folders, tmp_path):
    data = class_folders.make("single")
    result = invoke("--data", data, "--val-fraction", "0.25", "--out", tmp_path / "run", *FAST,
                    "--stop-after-epochs", "1")
    assert result.exit_code == 0, result.output
    recorded = load_checkpoint(tmp_path / "run")["dataset"]
    assert recorded["val_fraction"] == 0.25 and recorded["images"] == {"train": 18, "val": 6}


@pytest.mark.parametrize("args, needle", [
    (["--data-root", "X"], "exclude each other"),
    (["--download"], "exclude each other"),
])
def test_data_and_flowers102_options_exclude_each_other(class_folders, tmp_path, args,
                                                        needle):
    result = invoke("--data", class_folders.make("split"), "--out", tmp_path / "run", *args,
                    *FAST)
    assert result.exit_code == 2 and needle in result.stderr
    assert not (tmp_path / "run").exists()


def test_folder_options_need_data(tmp_path):
    for extra in (["--val-fraction", "0.2"], ["--strict"]):
        result = invoke("--out", tmp_path / "run", *extra, *FAST)
        assert result.exit_code == 2 and "apply to --data only" in result.stderr


def test_bad_folders_exit_2_naming_the_problem(class_folders, tmp_path):
    class_folders.write(tmp_path / "one", {"": {"daisy": 3}})
    line = one_line(invoke("--data", tmp_path / "one", "--out", tmp_path / "run", *FAST), 2)
    assert "at least two" in line
    class_folders.write(tmp_path / "layout", {"train": {"daisy": 2, "rose": 2},
                                              "val": {"daisy": 1, "violet": 1}})
    line = one_line(invoke("--data", tmp_path / "layout", "--out", tmp_path / "run", *FAST), 2)
    assert "'violet' is not in train/" in line
    line = one_line(invoke("--data", tmp_path / "nothing", "--out", tmp_path / "run", *FAST), 2)
    assert "nothing" in line and "no such folder" in line
    assert not (tmp_path / "run").exists()


def test_unreadable_images_are_skipped_with_a_count_or_refused_with_strict(class_folders, tmp_path,
                                                                           caplog):
    data = class_folders.write(tmp_path / "data", {"train": dict.fromkeys(CLASSES, 4),
                                                   "val": dict.fromkeys(CLASSES, 2)})
    (data / "train" / "rose" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (data / "train" / "rose" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        result = invoke("--data", data, "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable image(s)" in caplog.text
    line = one_line(invoke("--data", data, "--strict", "--out", tmp_path / "strict", *FAST), 2)
    assert "2 unreadable image(s)" in line and "train" in line
    for name in ("000.jpg", "001.jpg", "002.jpg", "003.png"):  # rose: nothing readable left
        (data / "train" / "rose" / f"rose_{name}").write_bytes(b"")
    line = one_line(invoke("--data", data, "--out", tmp_path / "empty", *FAST), 2)
    assert "class 'rose' has no readable image" in line


def test_resume_on_other_data_is_a_one_line_error(class_folders, tmp_path, fake_root):
    data = class_folders.make("split")
    run_dir = tmp_path / "run"
    assert invoke("--data", data, "--out", run_dir, *FAST, "--stop-after-epochs", "1"
                  ).exit_code == 0
    other = class_folders.write(tmp_path / "other", {"train": {"daisy": 4, "rose": 4,
                                                               "violet": 4},
                                                     "val": {"daisy": 2, "rose": 2}})
    line = one_line(invoke("--data", other, "--out", run_dir, "--resume", *FAST), 1)
    assert "other data than the run had" in line
    fewer = class_folders.write(tmp_path / "fewer", {"train": dict.fromkeys(CLASSES, 5),
                                                     "val": dict.fromkeys(CLASSES, 2)})
    line = one_line(invoke("--data", fewer, "--out", run_dir, "--resume", *FAST), 1)
    assert "other data than the run had" in line
    # Flowers102 has 102 classes: the model no longer fits, caught before any data is decoded.
    line = one_line(invoke("--data-root", fake_root, "--out", run_dir, "--resume", *FAST), 1)
    assert "another model" in line
    assert load_checkpoint(run_dir)["progress"] == {"ae": 1, "cls": 0, "dec": 0}
    finished = invoke("--data", data, "--out", run_dir, "--resume", *FAST)
    assert finished.exit_code == 0, finished.output


def test_a_model_that_does_not_fit_the_classes_is_refused(class_folders, tmp_path):
    dataset = open_training_data(class_folders.make("split"), class_folders=True)
    with pytest.raises(DataError, match="102 outputs but .* has 3 classes"):
        train(get_variant("res16"), TrainConfig(device="cpu"), dataset, tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError):
        checkpoint_class_names({"model_config": {"num_classes": 3}})


def test_synthetic_classes_are_learned(class_folders, tmp_path):
    dataset = open_training_data(class_folders.make("split", per_class=12), class_folders=True)
    config = TrainConfig(ae_epochs=0, cls_epochs=8, batch_size=12, lr=3e-3, device="cpu")
    model_config = replace(get_variant("res16"), num_classes=len(dataset.class_names))
    result = train(model_config, config, dataset, tmp_path / "run", progress=False)
    assert result.test["top1"] >= 80.0  # chance is 33 %


@pytest.mark.real_data
@pytest.mark.slow
def test_ten_real_flower_classes_are_learned_well_above_chance(real_root, tmp_path):
    data = tmp_path / "flowers10"
    build_view(real_root, data, every_nth_label(every=10, classes=10))  # labels 0, 10, ..., 90
    dataset = open_training_data(data, class_folders=True)
    assert len(dataset.class_names) == 10
    assert [len(dataset.split(s).paths) for s in ("train", "val")] == [100, 100]
    config = TrainConfig(ae_epochs=0, cls_epochs=30, batch_size=20, lr=2e-3, device="cpu",
                         augment=True, optimizer="adamw", weight_decay=0.05,
                         schedule="onecycle", label_smoothing=0.1)
    model_config = replace(get_variant("res16"), num_classes=10)
    result = train(model_config, config, dataset, tmp_path / "run", progress=False)
    assert result.metrics["test_split"] == "val"
    assert result.test["top1"] >= 45.0  # chance is 10 %; this run measured 62 % here
