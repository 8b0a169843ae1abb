"""The training loop (phases 1 and 2; phase 3 is in test_flowae_recipes.py) on the fake
dataset: checkpoints every epoch, --resume ending exactly where an uninterrupted run ends,
refusals, metrics.json, the plots, and the optional augmentation."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowae.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from flowae.config import TrainConfig
from flowae.data import load_split, to_float
from flowae.distributed import DistInfo
from flowae.models import VARIANTS, build_model, count_parameters, get_variant
from flowae.plots import ACCURACY_PLOT, LOSS_PLOT, RECONSTRUCTION_PLOT, save_plots
from flowae.runtime.contract import Preprocess
from flowae.runtime.errors import CheckpointError, FlowaeError
from flowae.train import METRICS_NAME, Batches, TrainResult, resolve_device, train

# `upsample` has BatchNorm (running statistics) and all three dropouts (RNG draws): the state a
# resumed run must restore. 12 fake training images in batches of 6: two Adam steps per epoch.
VARIANT = "upsample"
SIZES = {"trnid": 12, "valid": 4, "tstid": 10}
OPTIONS = {"ae_epochs": 2, "cls_epochs": 2, "batch_size": 6, "seed": 0, "device": "cpu"}
AE_KEYS = {"epoch", "train_loss", "val_recon_mse", "val_loss", "val_top1", "val_top5", "seconds"}
PLOTS = (LOSS_PLOT, ACCURACY_PLOT, RECONSTRUCTION_PLOT)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def run(data_root: Path, run_dir: Path, **kwargs) -> TrainResult:
    options = {**OPTIONS, **kwargs.pop("options", {})}
    return train(get_variant(kwargs.pop("variant", VARIANT)), TrainConfig(**options), data_root,
                 run_dir, progress=False, **kwargs)


def without_seconds(history: dict) -> dict:
    return {phase: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
            for phase, rows in history.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def train_root(make_fake_root) -> Path:
    return make_fake_root(SIZES)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, train_root) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("whole_run")
    return run_dir, run(train_root, run_dir).metrics


@dataclass
class SplitRun:
    run_dir: Path
    stops: list[TrainResult]  # what each stopped call returned
    saved_progress: list[dict]  # the checkpoint's progress after each stopped call
    metrics_after_stops: list[bool]  # whether metrics.json existed after each stopped call
    metrics: dict  # what the final, resumed call returned


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, train_root) -> SplitRun:
    """The whole run in three calls: stop inside phase 1 (Adam state must carry over), stop
    inside phase 2 after crossing the phase boundary, then finish."""
    run_dir = tmp_path_factory.mktemp("split_run")
    stops, saved, metrics_seen = [], [], []
    for resume, stop in ((False, 1), (True, 2)):
        stops.append(run(train_root, run_dir, resume=resume, stop_after_epochs=stop))
        saved.append(load_checkpoint(run_dir)["progress"])
        metrics_seen.append((run_dir / METRICS_NAME).exists())
    return SplitRun(run_dir, stops, saved, metrics_seen,
                    run(train_root, run_dir, resume=True).metrics)


def test_stopped_calls_leave_a_checkpoint_and_no_results(split_run):
    assert [stop.stopped for stop in split_run.stops] == [True, True]
    assert [stop.progress for stop in split_run.stops] == [
        {"ae": 1, "cls": 0, "dec": 0}, {"ae": 2, "cls": 1, "dec": 0}]
    assert split_run.saved_progress == [stop.progress for stop in split_run.stops]
    assert split_run.metrics_after_stops == [False, False]
    assert all(stop.metrics == {} and stop.test is None for stop in split_run.stops)
    assert [len(split_run.stops[1].history[phase]) for phase in ("ae", "cls")] == [2, 1]


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(whole_run, split_run):
    # torch.equal, not a tolerance: on CPU the resumed run repeats the same operations on the
    # same data in the same order (seeds per phase and epoch, Adam state and BatchNorm
    # statistics restored), so any difference at all is state that --resume lost.
    whole = load_checkpoint(whole_run[0])
    split = load_checkpoint(split_run.run_dir)
    assert whole["model"].keys() == split["model"].keys()
    differing = [k for k in whole["model"] if not torch.equal(whole["model"][k], split["model"][k])]
    assert differing == []
    assert whole["optimizer"]["param_groups"] == split["optimizer"]["param_groups"]
    for index, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, split["optimizer"]["state"][index][name]), (index, name)


def test_resumed_run_has_the_history_and_results_of_an_uninterrupted_one(whole_run, split_run):
    whole_metrics = whole_run[1]
    assert without_seconds(split_run.metrics["history"]) == without_seconds(
        whole_metrics["history"])
    assert split_run.metrics["test"] == whole_metrics["test"]
    saved = json.loads((split_run.run_dir / METRICS_NAME).read_text())
    assert without_seconds(saved["history"]) == without_seconds(whole_metrics["history"])


def test_checkpoint_holds_configs_optimizer_and_progress(whole_run):
    run_dir, metrics = whole_run
    raw = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert raw["model_config"] == VARIANTS[VARIANT].to_dict()
    assert raw["train_config"] == TrainConfig(**OPTIONS).to_dict()
    assert raw["progress"] == {"ae": 2, "cls": 2, "dec": 0} and raw["phase"] == "cls"
    assert raw["history"] == metrics["history"] and raw["test"] == metrics["test"]

    model = model_from_checkpoint(raw)
    assert model.config == VARIANTS[VARIANT]
    # Phase 2's single Adam covers every parameter; those with a gradient took 2 steps in each
    # of its 2 epochs. The decoder gets none from the cross-entropy, so Adam holds no state
    # for it.
    group = raw["optimizer"]["param_groups"][0]
    assert group["lr"] == TrainConfig().lr == 1e-3  # the seed's Adam lr, a default here
    params = list(model.parameters())
    assert sorted(group["params"]) == list(range(len(params)))
    decoder_ids = {id(p) for p in model.decoder.parameters()}
    with_state = {i for i, p in enumerate(params) if id(p) not in decoder_ids}
    assert set(raw["optimizer"]["state"]) == with_state
    assert {float(s["step"]) for s in raw["optimizer"]["state"].values()} == {4.0}


def test_metrics_json_has_per_epoch_rows_and_final_test_accuracy(whole_run):
    run_dir, metrics = whole_run
    saved = json.loads((run_dir / METRICS_NAME).read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["variant"] == VARIANT and saved["world_size"] == 1
    assert saved["parameters"] == count_parameters(build_model(VARIANTS[VARIANT]))
    assert saved["train_config"] == TrainConfig(**OPTIONS).to_dict()

    history = saved["history"]
    assert [row["epoch"] for row in history["ae"]] == [1, 2]
    assert [row["epoch"] for row in history["cls"]] == [1, 2]
    assert all(row.keys() == AE_KEYS for row in history["ae"])
    assert all(row.keys() == AE_KEYS | {"train_top1"} for row in history["cls"])
    for row in history["ae"] + history["cls"]:
        assert all(math.isfinite(v) for v in row.values())
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100
        assert 0 <= row["val_recon_mse"] <= 4  # both images in [-1, 1]
        assert row["train_loss"] > 0 and row["val_loss"] > 0
    assert all(0 <= row["train_top1"] <= 100 for row in history["cls"])

    test = saved["test"]
    assert test.keys() == {"recon_mse", "loss", "top1", "top5"}
    assert 0 <= test["top1"] <= test["top5"] <= 100
    for key in ("top1", "top5"):  # a whole number of the 10 fake test images
        correct = test[key] * SIZES["tstid"] / 100
        assert correct == pytest.approx(round(correct), abs=1e-9)


def test_final_test_metrics_match_an_independent_evaluation(whole_run, train_root):
    run_dir, metrics = whole_run
    model = model_from_checkpoint(load_checkpoint(run_dir))
    preprocess = Preprocess()
    test = load_split(train_root, "test", preprocess)
    assert len(test) == SIZES["tstid"]
    images = to_float(test.images, preprocess)
    with torch.no_grad():
        logits, latent = model(images)
        reconstruction = model.decoder(latent)
    top5 = logits.topk(5, dim=1).indices
    expected = {
        "top1": 100.0 * (top5[:, 0] == test.labels).sum().item() / len(test),
        "top5": 100.0 * (top5 == test.labels[:, None]).any(dim=1).sum().item() / len(test),
        "loss": F.cross_entropy(logits, test.labels).item(),
        "recon_mse": F.mse_loss(reconstruction, images).item(),
    }
    assert metrics["test"]["top1"] == expected["top1"]
    assert metrics["test"]["top5"] == expected["top5"]
    assert metrics["test"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["test"]["recon_mse"] == pytest.approx(expected["recon_mse"], rel=1e-5)


def test_plots_are_valid_pngs(whole_run):
    run_dir, _ = whole_run
    for name in PLOTS:
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG"
            image.verify()
    with Image.open(run_dir / RECONSTRUCTION_PLOT) as image:
        width, height = image.size
    assert width > 3 * height  # ten inputs above their ten reconstructions
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [CHECKPOINT_NAME, METRICS_NAME, *PLOTS])  # no temp files left behind


@pytest.mark.parametrize("ran", [("ae",), ("cls",), ("ae", "cls")])
def test_plots_are_drawn_whichever_phases_ran(whole_run, train_root, tmp_path, ran):
    # --ae-epochs 0 or --cls-epochs 0 leave one phase's history empty.
    run_dir, metrics = whole_run
    history = {phase: metrics["history"][phase] if phase in ran else [] for phase in ("ae", "cls")}
    model = model_from_checkpoint(load_checkpoint(run_dir))
    test = load_split(train_root, "test", Preprocess())
    save_plots(tmp_path, history, model, test, Preprocess(), torch.device("cpu"))
    expected = {LOSS_PLOT, RECONSTRUCTION_PLOT} | ({ACCURACY_PLOT} if "cls" in ran else set())
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in expected:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    target.mkdir()
    shutil.copy2(run_dir / CHECKPOINT_NAME, target / CHECKPOINT_NAME)
    return target


def test_rerunning_into_an_existing_run_without_resume_is_refused(whole_run, train_root, tmp_path):
    run_dir = copy_run(whole_run[0], tmp_path)
    before = sha256(run_dir / CHECKPOINT_NAME)
    with pytest.raises(FlowaeError, match="already holds a run; pass --resume") as info:
        run(train_root, run_dir)
    assert str(run_dir) in str(info.value) and "\n" not in str(info.value)
    assert sha256(run_dir / CHECKPOINT_NAME) == before
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME]


@pytest.mark.parametrize(
    "change",
    [{"lr": 3e-4}, {"batch_size": 4}, {"ae_epochs": 3}, {"cls_epochs": 1}, {"seed": 1},
     {"augment": True}, {"channels_last": False}],
    ids=lambda change: next(iter(change)),
)
def test_resuming_with_other_training_options_is_refused(whole_run, train_root, tmp_path, change):
    run_dir = copy_run(whole_run[0], tmp_path)
    before = sha256(run_dir / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="other training options") as info:
        run(train_root, run_dir, resume=True, options=change)
    assert str(run_dir / CHECKPOINT_NAME) in str(info.value) and "\n" not in str(info.value)
    assert sha256(run_dir / CHECKPOINT_NAME) == before


def test_resuming_with_another_variant_is_refused(whole_run, train_root, tmp_path):
    run_dir = copy_run(whole_run[0], tmp_path)
    with pytest.raises(CheckpointError, match="another model \\('upsample', asked for 'bn'\\)"):
        run(train_root, run_dir, resume=True, variant="bn")


@pytest.mark.parametrize(
    "change, message",
    [({"ae_epochs": -1}, "epochs must be >= 0"), ({"batch_size": 0}, "batch sizes must be >= 1"),
     ({"lr": 0.0}, "learning rate must be > 0"), ({"lr": float("nan")}, "learning rate"),
     ({"device": "tpu"}, "device must be auto, cpu or cuda")],
)
def test_bad_training_options_fail_before_touching_data(tmp_path, change, message):
    with pytest.raises(FlowaeError, match=message):
        run(tmp_path / "no-data", tmp_path / "run", options=change)
    assert not (tmp_path / "run").exists()


def test_an_infinite_learning_rate_is_refused():
    with pytest.raises(FlowaeError, match="learning rate"):
        TrainConfig(lr=float("inf")).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error():
    with pytest.raises(FlowaeError, match="torch sees no CUDA device") as info:
        resolve_device("cuda")
    assert "\n" not in str(info.value)


def test_augmentation_is_off_by_default_and_changes_training_inputs(train_root):
    assert TrainConfig().augment is False
    preprocess = Preprocess()
    plain_split = load_split(train_root, "train", preprocess)
    val = load_split(train_root, "val", preprocess)
    plain = Batches(plain_split, val, preprocess, augment=False)
    augmented = Batches(load_split(train_root, "train", preprocess, store_px=115), val, preprocess,
                        augment=True)
    cpu, single = torch.device("cpu"), DistInfo()

    # Without augmentation an epoch is every training image once, exactly as evaluated.
    eval_inputs = to_float(plain_split.images, preprocess)
    seen = []
    for images, labels in plain.epoch(5, 6, single, cpu):
        for image, label in zip(images, labels, strict=True):
            matches = [i for i in range(len(eval_inputs)) if torch.equal(eval_inputs[i], image)]
            assert len(matches) == 1 and plain_split.labels[matches[0]] == label
            seen += matches
    assert sorted(seen) == list(range(len(plain_split)))

    first = list(augmented.epoch(5, 6, single, cpu))
    again = list(augmented.epoch(5, 6, single, cpu))
    other_seed = list(augmented.epoch(6, 6, single, cpu))
    assert [images.shape for images, _ in first] == [(6, 3, 100, 100)] * 2
    for (images, labels), (images_again, labels_again) in zip(first, again, strict=True):
        assert torch.equal(images, images_again) and torch.equal(labels, labels_again)
        assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
        assert not any(torch.equal(image, reference)
                       for image in images for reference in eval_inputs)
    assert not torch.equal(first[0][0], other_seed[0][0])


def test_augment_option_reaches_training(make_fake_root, tmp_path):
    root = make_fake_root({"trnid": 4, "valid": 2, "tstid": 2})
    weights = {}
    for augment in (False, True):
        run_dir = tmp_path / f"augment-{augment}"
        result = run(root, run_dir, stop_after_epochs=1,
                     options={"batch_size": 4, "augment": augment})
        assert result.progress == {"ae": 1, "cls": 0, "dec": 0}
        saved = load_checkpoint(run_dir)
        assert saved["train_config"]["augment"] is augment
        weights[augment] = saved["model"]
    assert any(not torch.equal(weights[False][k], weights[True][k]) for k in weights[False]
               if k.startswith("encoder."))
