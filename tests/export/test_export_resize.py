"""Test-time resize (`flowae-export --resize-px N|auto`): the metadata carries it, the runtime
follows it, auto picks the best val top-1 of its sweep (recorded in the manifest), and the
exported res variant runs in fp32, int8 and fp16 (global average pooling included)."""

from __future__ import annotations

import pytest
import torch

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.config import TrainConfig
from flowae.data import load_split, preprocess_for, to_float
from flowae.export import ExportOptions, export_model
from flowae.export.resize import RESIZE_CANDIDATES_PCT, candidate_sizes, choose
from flowae.models import get_variant
from flowae.runtime.contract import ROLE_ENCODER_CLASSIFIER, graph_file
from flowae.runtime.errors import DataError, ExportError
from flowae.runtime.predictor import Predictor, load_graph
from flowae.train import train

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


def _top1(model, root, split: str, preprocess) -> float:
    data = load_split(root, split, preprocess)
    with torch.no_grad():
        logits, _ = model(to_float(data.images, preprocess))
    return 100.0 * (logits.argmax(dim=1) == data.labels).float().mean().item()


def test_auto_resize_is_the_best_val_top1_of_its_sweep(tiny_runs, fake_root, tmp_path):
    manifest = export_model(tiny_runs["res16"], tmp_path / "model",
                            ExportOptions(data_root=fake_root, resize_px="auto",
                                          latency_rounds=2))
    resize = manifest["resize"]
    sizes = [row["resize_px"] for row in resize["sweep"]]
    assert sizes == list(candidate_sizes(100)) == [round(p) for p in RESIZE_CANDIDATES_PCT]
    # Each figure is PyTorch's val top-1 at that size, recomputed here; test is never used.
    model = model_from_checkpoint(load_checkpoint(tiny_runs["res16"])).eval()
    for row in resize["sweep"]:
        assert row["top1"] == pytest.approx(_top1(model, fake_root, "val",
                                                  preprocess_for(model.config, row["resize_px"])))
    best = max(row["top1"] for row in resize["sweep"])
    assert resize["resize_px"] == min(row["resize_px"] for row in resize["sweep"]
                                      if row["top1"] == best)
    assert manifest["preprocess"]["resize_px"] == resize["resize_px"]
    metadata = load_graph(tmp_path / "model" / graph_file(ROLE_ENCODER_CLASSIFIER),
                          ROLE_ENCODER_CLASSIFIER, "CPUExecutionProvider", 1).metadata
    assert metadata.preprocess.resize_px == resize["resize_px"]


def test_a_model_trained_on_val_takes_a_given_resize_and_says_what_it_saw(fake_root,
                                                                           tmp_path):
    run_dir = tmp_path / "trainval"
    config = TrainConfig(ae_epochs=1, cls_epochs=1, batch_size=8, device="cpu",
                         cls_images="train+val")
    train(get_variant("res16"), config, fake_root, run_dir, progress=False)
    with pytest.raises(ExportError, match="trained on the val split"):
        export_model(run_dir, tmp_path / "auto", ExportOptions(data_root=fake_root,
                                                                 resize_px="auto"))
    assert not (tmp_path / "auto").exists()
    manifest = export_model(run_dir, tmp_path / "model",
                            ExportOptions(data_root=fake_root, resize_px=RESIZE,
                                          latency_rounds=2))
    assert manifest["trained_on_splits"] == ["train", "val"]
    assert manifest["resize"] == {"resize_px": RESIZE, "chosen_by": "--resize-px"}
    assert manifest["checkpoint"]["train_config"]["cls_images"] == "train+val"


def test_choose_breaks_ties_to_the_smaller_size():
    rows = [{"resize_px": 121, "top1": 50.0}, {"resize_px": 107, "top1": 50.0},
            {"resize_px": 100, "top1": 40.0}]
    assert choose(rows)["resize_px"] == 107
    assert candidate_sizes(32) == (32, 34, 36, 39, 41, 43, 45)


def test_a_fixed_resize_is_recorded_as_chosen_by_the_option(resized_export):
    _, manifest = resized_export
    assert manifest["resize"] == {"resize_px": RESIZE, "chosen_by": "--resize-px"}


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
