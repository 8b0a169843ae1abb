"""The model that ships inside the package (runtime/models/): its files are the ones its
manifest lists, its metadata says how it was made, and on the real test split its fp32 graph
gives the test accuracy its training run recorded."""

from __future__ import annotations

import hashlib
import json

import pytest

from flowae.runtime.contract import MANIFEST_NAME, MANIFEST_RECOMMENDED, ROLE_ENCODER_CLASSIFIER
from flowae.runtime.datasets import flowers102_split
from flowae.runtime.evaluate import score
from flowae.runtime.modeldir import DEFAULT_MODEL_DIR
from flowae.runtime.predictor import Predictor, load_graph


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / MANIFEST_NAME).read_text())


def test_bundled_files_are_those_the_manifest_lists(manifest):
    listed = set(manifest["files"])
    assert {p.name for p in DEFAULT_MODEL_DIR.iterdir()} == listed | {MANIFEST_NAME}
    for name, entry in manifest["files"].items():
        path = DEFAULT_MODEL_DIR / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["size_bytes"]
    total_mb = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) / 1e6
    assert total_mb < 8  # "small (a few MB)"


def test_bundled_metadata_says_how_the_model_was_made(manifest):
    graph = load_graph(DEFAULT_MODEL_DIR / "encoder_classifier.onnx", ROLE_ENCODER_CLASSIFIER,
                       "CPUExecutionProvider", 1)
    extra = graph.metadata.extra
    assert graph.metadata.variant == manifest["variant"]
    checkpoint = manifest["checkpoint"]
    assert len(checkpoint["checkpoint_sha256"]) == 64
    assert checkpoint["train_config"]["ae_epochs"] >= 1
    assert checkpoint["train_config"]["cls_epochs"] >= 1
    assert extra  # train and model config travel inside the graph, not only in the manifest
    assert manifest[MANIFEST_RECOMMENDED] in manifest["accuracy"]["top1_pct"]


def test_bundled_fp32_graph_reproduces_the_recorded_test_accuracy(manifest, real_root):
    """The whole 6149-image test split through the torch-free runtime (about 20 s here)."""
    paths, labels = flowers102_split(real_root, "test")
    accuracy, _ = score(Predictor(precision="fp32", provider="cpu"), paths, labels)
    assert (accuracy.images, accuracy.failed) == (6149, 0)
    # Same graph as PyTorch up to float rounding: at most a borderline image or two may flip.
    assert accuracy.top1 == pytest.approx(manifest["checkpoint"]["test_top1"], abs=0.05)
    assert accuracy.top5 == pytest.approx(manifest["checkpoint"]["test_top5"], abs=0.05)
