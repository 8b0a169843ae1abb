"""Class-folder runs end to end: generated folders of JPEGs and PNGs (both layouts) through the
real `flowae-train --data`, `flowae-export --data --int8` and a `flowae-infer --json`
subprocess; the graphs name the folders' classes and have one logit per class, and the export
reads the split the training recorded. Also the one-line errors: data moved without --data
(exit 1, as every FlowaeError of flowae-export), --data with --data-root (usage, exit 2),
--data on a Flowers102 run, other classes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from flowae import __version__
from flowae.checkpoint import checkpoint_class_names, load_checkpoint
from flowae.cli import main as train_main
from flowae.export.cli import main as export_main
from flowae.runtime.contract import (
    GRAPH_IO,
    MANIFEST_NAME,
    METADATA_KEY,
    OUTPUT_LOGITS,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    graph_file,
)

FLOWAE_INFER = Path(sys.executable).with_name("flowae-infer")
CLASSES = ("bluebell", "daisy", "sunflower")  # sorted, as the folder names become labels
TINTS = {"bluebell": (60, 90, 220), "daisy": (235, 235, 80), "sunflower": (230, 150, 20)}
TINY = ["--ae-epochs", "1", "--cls-epochs", "1", "--dec-epochs", "0", "--batch-size", "8",
        "--seed", "0", "--device", "cpu", "--no-progress"]
# int8 of a one-epoch model on a few images may lose any share: the gate is not under test.
QUICK_INT8 = ["--int8", "--int8-max-drop", "100", "--calibration-images", "8"]


def write_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/ (root/<class>/ for split "") with counts[split] images a class:
    the class's colour plus noise, odd sizes, every third a PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(90, 160)), int(rng.integers(90, 160))
                pixels = np.array(TINTS[name]) + rng.normal(0, 20, size=(h, w, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{name}_{i}.{'png' if i % 3 == 2 else 'jpg'}")
    return root


LAYOUTS = {  # layout -> (image counts per split, extra flowae-train options)
    "split": ({"train": 8, "val": 3, "test": 3}, []),
    "single": ({"": 8}, ["--val-fraction", "0.25"]),
}


def invoke(command, *args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback instead of a message: {result.exception!r}"
    return result.exit_code, result.output.strip().splitlines()


def train(data: Path, run_dir: Path, layout: str) -> Path:
    code, lines = invoke(train_main, "--data", data, "--out", run_dir, *TINY, *LAYOUTS[layout][1])
    assert code == 0, lines
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, torch_one_thread):
    """layout -> (data folder, run directory), each trained once, lazily."""

    class Runs(dict):
        def __missing__(self, layout: str) -> tuple[Path, Path]:
            data = write_folders(tmp_path_factory.mktemp(f"data_{layout}"), LAYOUTS[layout][0])
            run_dir = train(data, tmp_path_factory.mktemp(f"run_{layout}") / "run", layout)
            self[layout] = data, run_dir
            return self[layout]

    return Runs()


def metadata(path: Path) -> ModelMetadata:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return ModelMetadata.from_json(props[METADATA_KEY])


def infer(model_dir: Path, images: list[Path], *extra) -> list[dict]:
    command = [FLOWAE_INFER, "--model", model_dir, "--json", *extra, *images]
    done = subprocess.run([str(a) for a in command], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_class_folder_run_exports_and_infers_its_own_classes(layout, trained, tmp_path):
    data, run_dir = trained[layout]
    payload = load_checkpoint(run_dir)
    assert checkpoint_class_names(payload) == CLASSES
    out_dir = tmp_path / "model"
    code, lines = invoke(export_main, run_dir, "--out", out_dir, "--data", data, *QUICK_INT8)
    assert code == 0, lines

    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    recorded = payload["dataset"]
    assert manifest["data"]["kind"] == "class-folders"
    assert manifest["data"]["layout"] == layout == recorded["layout"]
    assert Path(manifest["data"]["root"]) == data
    # Parity and accuracy ran on the val split training held out, calibration on its train.
    assert manifest["accuracy"]["images"] == recorded["images"]["val"]
    assert set(manifest["accuracy"]["top1_pct"]) == {"pytorch", "fp32", "int8"}
    for precision in ("fp32", "int8"):
        for role in GRAPH_IO:
            meta = metadata(out_dir / graph_file(role, precision))
            assert meta.class_names == CLASSES
        session = ort.InferenceSession(
            str(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER, precision)),
            providers=["CPUExecutionProvider"])
        logits = next(o for o in session.get_outputs() if o.name == OUTPUT_LOGITS)
        assert logits.shape[1] == len(CLASSES)

    images = sorted(data.rglob("*.png"))[:2] + sorted(data.rglob("*.jpg"))[:2]
    for precision in ("fp32", "int8"):
        # No --top-k: the default of 5 shrinks to the model's 3 classes.
        answers = infer(out_dir, images, "--precision", precision)
        assert [a["image"] for a in answers] == [str(p) for p in images]
        for answer in answers:
            assert sorted(p["class_name"] for p in answer["top_k"]) == list(CLASSES)
            assert [CLASSES[p["label"]] for p in answer["top_k"]] == \
                [p["class_name"] for p in answer["top_k"]]


def test_resize_sweep_and_test_accuracy_use_the_runs_splits(trained, tmp_path):
    data, run_dir = trained["split"]
    recorded = load_checkpoint(run_dir)["dataset"]["images"]
    out_dir = tmp_path / "model"
    code, lines = invoke(export_main, run_dir, "--out", out_dir, "--resize-px", "auto",
                         "--test-accuracy")  # no --data: the recorded folder is still there
    assert code == 0, lines
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert Path(manifest["data"]["root"]) == data
    sweep = manifest["resize"]["sweep"]
    assert len(sweep) > 1 and {row["images"] for row in sweep} == {recorded["val"]}
    top1 = metadata(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER)).extra["test_top1"]
    assert top1 is not None and 0 <= top1 <= 100
    assert manifest["checkpoint"]["test_figures_from"].startswith("flowae-export")


def test_a_split_without_test_is_refused_for_test_accuracy(trained, tmp_path):
    data, run_dir = trained["single"]
    code, lines = invoke(export_main, run_dir, "--out", tmp_path / "model", "--data", data,
                         "--test-accuracy")
    assert code == 1 and len(lines) == 1 and "no test split" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_moved_data_needs_data_and_then_exports(torch_one_thread, tmp_path_factory, tmp_path):
    data = write_folders(tmp_path_factory.mktemp("data_moved"), LAYOUTS["single"][0])
    run_dir = train(data, tmp_path_factory.mktemp("run_moved") / "run", "single")
    moved = shutil.move(data, tmp_path / "elsewhere")
    out_dir = tmp_path / "model"
    code, lines = invoke(export_main, run_dir, "--out", out_dir)
    assert code == 1, lines
    assert len(lines) == 1 and str(data) in lines[0] and "--data" in lines[0]
    assert not out_dir.exists()
    code, lines = invoke(export_main, run_dir, "--out", out_dir, "--data", moved)
    assert code == 0, lines
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert Path(manifest["data"]["root"]) == Path(moved)
    assert manifest["data"]["val_fraction"] == 0.25


def test_data_with_other_classes_or_split_is_refused(trained, tmp_path):
    _, run_dir = trained["split"]
    other = write_folders(tmp_path / "other", {"train": 2, "val": 1})
    shutil.move(other / "train" / "daisy", other / "train" / "poppy")
    shutil.move(other / "val" / "daisy", other / "val" / "poppy")
    code, lines = invoke(export_main, run_dir, "--out", tmp_path / "model", "--data", other)
    assert code == 1 and len(lines) == 1 and "not the ones the run trained on" in lines[0]
    fewer = write_folders(tmp_path / "fewer", {"train": 2, "val": 3, "test": 3})
    code, lines = invoke(export_main, run_dir, "--out", tmp_path / "model", "--data", fewer)
    assert code == 1 and len(lines) == 1 and "not the split this run trained on" in lines[0]
    assert "images" in lines[0]
    assert not (tmp_path / "model").exists()


def test_data_and_data_root_exclude_each_other(trained, fake_root, tmp_path):
    data, run_dir = trained["split"]
    code, lines = invoke(export_main, run_dir, "--out", tmp_path / "model", "--data", data,
                         "--data-root", fake_root)
    assert code == 2 and "exclude each other" in lines[-1]
    assert "Traceback" not in "\n".join(lines)


def test_data_is_refused_for_a_flowers102_run(tiny_runs, fake_root, tmp_path):
    code, lines = invoke(export_main, tiny_runs["upsample"], "--out", tmp_path / "model",
                         "--data", fake_root)
    assert code == 1 and len(lines) == 1 and "--data-root" in lines[0], lines
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_answers_to_both_names(flag):
    code, lines = invoke(export_main, flag)
    assert code == 0 and lines[0].startswith("Usage:")
    assert any(line.lstrip().startswith("--data ") for line in lines)


def test_version():
    code, lines = invoke(export_main, "--version")
    assert code == 0 and lines == [f"flowae-export {__version__}"]
