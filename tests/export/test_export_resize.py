"""Test-time resize (`flowae-export --resize-px`, chosen on val with benchmarks.resize): the
metadata carries it, the runtime follows it, and the exported res variant runs in fp32, int8
and fp16 (global average pooling included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.data import load_split, preprocess_for, to_float
from flowae.export import ExportOptions, export_model
from flowae.runtime.contract import ROLE_ENCODER_CLASSIFIER, graph_file
from flowae.runtime.errors import DataError
from flowae.runtime.predictor import Predictor, load_graph

REPO = Path(__file__).resolve().parents[2]
RESIZE = 120  # the fake JPEGs are larger than this on their shorter side


@pytest.fixture(scope="module")
def resized_export(tiny_runs, fake_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("resized") / "model"
    options = ExportOptions(data_root=fake_root, int8=True, fp16=True, resize_px=RESIZE,
                            int8_max_drop_points=100.0, latency_rounds=2, test_accuracy=True)
    return out_dir, export_model(tiny_runs["res16"], out_dir, options)


def test_metadata_carries_the_resize_and_the_runtime_follows_it(resized_export, tiny_runs,
                                                                fake_root):
    out_dir, manifest = resized_export
    assert {graph_file(ROLE_ENCODER_CLASSIFIER, p) for p in ("fp32", "int8", "fp16")} <= set(
        manifest["files"])
    metadata = load_graph(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER), ROLE_ENCODER_CLASSIFIER,
                          "CPUExecutionProvider", 1).metadata
    assert (metadata.preprocess.resize_px, metadata.preprocess.image_size_px) == (RESIZE, 100)

    # The runtime's top-1 on the val JPEGs equals PyTorch's on the same resize-then-crop inputs
    # (and the resize changes what the model sees).
    model = model_from_checkpoint(load_checkpoint(tiny_runs["res16"])).eval()
    predictor = Predictor(out_dir, provider="cpu", precision="fp32")
    preprocess = preprocess_for(model.config, RESIZE)
    split = load_split(fake_root, "val", preprocess)
    plain = load_split(fake_root, "val", preprocess_for(model.config))
    assert not torch.equal(split.images, plain.images)
    with torch.no_grad():
        logits, _ = model(to_float(split.images, preprocess))
    from flowae.data import split_files

    paths = split_files(fake_root, "val").paths
    got = [p[0].label for p in predictor.predict(list(paths), top_k=1)]
    assert got == logits.argmax(dim=1).tolist()


def test_resize_below_the_input_side_is_refused(tiny_runs, fake_root, tmp_path):
    with pytest.raises(DataError, match="resize size must be >= the model's input side 100"):
        export_model(tiny_runs["res16"], tmp_path / "model",
                     ExportOptions(data_root=fake_root, resize_px=90))
    assert not (tmp_path / "model").exists()


def test_resize_sweep_script_reports_val_top1_per_size(tiny_runs, fake_root, tmp_path):
    out = tmp_path / "sweep.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.resize", str(tiny_runs["res16"]),
                           "--data-root", str(fake_root), "--sizes", "100,120", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| resize shorter side to (px) | val top-1 %")
    sizes = [int(line.split("|")[1].split()[0]) for line in lines[2:]]
    assert sizes == [100, 120]
    top1 = [float(line.split("|")[2]) for line in lines[2:]]
    assert all(0 <= v <= 100 for v in top1)
    assert done.stdout.strip().endswith(f"--resize-px {[100, 120][int(np.argmax(top1))]}")
    bad = subprocess.run([sys.executable, "-m", "benchmarks.resize", str(tiny_runs["res16"]),
                          "--data-root", str(fake_root), "--sizes", "big"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "expected integers" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_test_figures_describe_the_exported_preprocessing(resized_export, tiny_runs, fake_root,
                                                          tmp_path):
    # --test-accuracy: PyTorch's test top-1 with the exported resize, recomputed here.
    out_dir, manifest = resized_export
    model = model_from_checkpoint(load_checkpoint(tiny_runs["res16"])).eval()
    preprocess = preprocess_for(model.config, RESIZE)
    test = load_split(fake_root, "test", preprocess)
    with torch.no_grad():
        logits, _ = model(to_float(test.images, preprocess))
    top1 = 100.0 * (logits.argmax(dim=1) == test.labels).float().mean().item()
    assert manifest["checkpoint"]["test_top1"] == pytest.approx(top1)
    assert "--test-accuracy" in manifest["checkpoint"]["test_figures_from"]
    extra = load_graph(out_dir / graph_file(ROLE_ENCODER_CLASSIFIER), ROLE_ENCODER_CLASSIFIER,
                       "CPUExecutionProvider", 1).metadata.extra
    assert extra["test_top1"] == pytest.approx(top1)

    # Without it, another resize drops the run's own figures (measured at the input side)
    # rather than pass them off as this model's; the default resize keeps them.
    run_test = load_checkpoint(tiny_runs["res16"])["test"]["top1"]
    for resize, expected in ((RESIZE, None), (None, run_test)):
        plain = export_model(tiny_runs["res16"], tmp_path / f"model-{resize}",
                             ExportOptions(data_root=fake_root, resize_px=resize,
                                           latency_rounds=2))
        assert plain["checkpoint"]["test_top1"] == expected
