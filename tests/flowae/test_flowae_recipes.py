"""Beyond the seed: the "res" variants, the modern recipe's pieces (one-cycle
schedule, batched augmentation, train+val autoencoder images, the decoder refit phase) and
`--recipe` on the command line, on the fake dataset."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.cli import main
from flowae.config import RECIPES, TrainConfig, default_recipe
from flowae.data import open_training_data
from flowae.models import VARIANTS, ModelConfig, build_model, get_variant
from flowae.runtime.errors import CheckpointError, FlowaeError
from flowae.train import WARMUP_FRACTION, augment_batch, cutmix, learning_rate, train

SIZES = {"trnid": 12, "valid": 4, "tstid": 6}
# The modern recipe's switches, shrunk to the fake data: 12 train + 4 val images in batches of 6.
MODERN = replace(RECIPES["modern"], ae_epochs=1, cls_epochs=2, dec_epochs=2, batch_size=6,
                 device="cpu")
RES = [name for name, config in VARIANTS.items() if config.arch == "res"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def root(make_fake_root):
    return make_fake_root(SIZES)


def run(root, run_dir, config=MODERN, **kwargs):
    return train(get_variant("res16"), config, root, run_dir, progress=False, **kwargs)


@pytest.mark.parametrize("name", RES)
def test_res_variants_have_the_documented_shapes(name):
    model = build_model(get_variant(name)).eval()
    images = torch.rand(2, 3, 100, 100) * 2 - 1
    with torch.no_grad():
        logits, latent = model(images)
        reconstruction = model.decoder(latent)
    width = get_variant(name).widths[0]
    assert latent.shape == (2, *model.latent_shape()) == (2, width, 25, 25)
    assert logits.shape == (2, 102)
    assert reconstruction.shape == images.shape
    assert reconstruction.abs().max() <= 1  # Tanh, like the seed's decoders


def test_res_configs_round_trip_through_json_and_reject_bad_shapes():
    config = get_variant("res32")
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    assert ModelConfig.from_dict(as_json) == config
    # The oldest checkpoints name no arch; later ones carry every field of one shared config.
    oldest = {k: v for k, v in VARIANTS["upsample"].to_dict().items() if k != "arch"}
    assert ModelConfig.from_dict(oldest) == VARIANTS["upsample"]
    assert ModelConfig.from_dict({**VARIANTS["upsample"].to_dict(), "widths": []}) == VARIANTS[
        "upsample"]
    shared = {**config.to_dict(), "decoder": "light", "batchnorm": True, "widths": [32, 48, 96]}
    assert ModelConfig.from_dict(shared) == config
    with pytest.raises(CheckpointError, match=r"\['decoder'\] are unknown to the 'res'"):
        ModelConfig.from_dict({**shared, "decoder": "base"})  # a field res never read
    with pytest.raises(FlowaeError, match="three widths"):
        build_model(replace(config, widths=(8, 16)))
    with pytest.raises(CheckpointError, match="unknown model arch 'vit'"):
        ModelConfig.from_dict({**config.to_dict(), "arch": "vit"})


def test_each_architecture_config_holds_only_the_fields_its_builder_reads():
    seed_fields = set(VARIANTS["upsample"].to_dict())
    res_fields = set(VARIANTS["res32"].to_dict())
    common = {"arch", "name", "image_size_px", "num_classes"}
    assert seed_fields == common | {"decoder", "batchnorm", "dropout"}
    assert res_fields == common | {"widths", "dropout"}
    with pytest.raises(TypeError):
        replace(VARIANTS["res32"], decoder="upsample")  # res has no decoder choice to ignore


def test_one_cycle_warms_up_then_decays_to_zero_and_constant_stays_put():
    config = TrainConfig(lr=2e-3, schedule="onecycle")
    points = [i / 1000 for i in range(1001)]
    rates = [learning_rate(config, p) for p in points]
    peak = points.index(WARMUP_FRACTION)
    assert rates[0] == pytest.approx(2e-3 / 25)
    assert rates[peak] == pytest.approx(2e-3) == max(rates)
    assert all(a < b for a, b in zip(rates[:peak], rates[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(rates[peak:-1], rates[peak + 1 :], strict=True))
    assert rates[-1] == pytest.approx(0, abs=1e-12)
    assert {learning_rate(TrainConfig(lr=3e-4), p) for p in points} == {3e-4}


def test_augment_batch_crops_flips_and_jitters_per_image_reproducibly():
    # Left half dark, right half bright: a flip shows as the bright half moving left.
    images = torch.zeros(64, 3, 115, 115, dtype=torch.uint8)
    images[..., 58:] = 200
    first = augment_batch(images, 100, torch.Generator().manual_seed(1))
    again = augment_batch(images, 100, torch.Generator().manual_seed(1))
    other = augment_batch(images, 100, torch.Generator().manual_seed(2))
    assert first.shape == (64, 3, 100, 100) and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)
    left = first[..., :50].float().mean(dim=(1, 2, 3))
    right = first[..., 50:].float().mean(dim=(1, 2, 3))
    flipped = left > right
    assert 10 < flipped.sum() < 54  # about half of 64 images are mirrored
    assert len({round(v, 1) for v in (left + right).tolist()}) > 32  # jitter differs per image

    # A uniform image stays uniform (crop, flip, contrast and saturation keep it so); only
    # brightness (0.7-1.3) scales it.
    gray = augment_batch(torch.full((16, 3, 115, 115), 100, dtype=torch.uint8), 100,
                         torch.Generator().manual_seed(3)).float()
    per_image = gray.flatten(1)
    assert torch.all(per_image.max(dim=1).values - per_image.min(dim=1).values <= 1)
    assert torch.all((per_image.mean(dim=1) >= 69) & (per_image.mean(dim=1) <= 131))


@pytest.fixture(scope="module")
def modern_runs(tmp_path_factory, root):
    """The shrunk modern recipe run whole, and the same run stopped after phase 2 and resumed."""
    whole = tmp_path_factory.mktemp("whole")
    split = tmp_path_factory.mktemp("split")
    metrics = run(root, whole).metrics
    stopped = run(root, split, stop_after_epochs=3)  # phase 1 (1 epoch) and phase 2 (2 epochs)
    after_cls = load_checkpoint(split)
    resumed = run(root, split, resume=True).metrics
    return metrics, load_checkpoint(whole), stopped, after_cls, resumed, load_checkpoint(split)


def test_modern_recipe_resumes_exactly_across_the_refit_phase(modern_runs):
    metrics, whole, stopped, after_cls, resumed, split = modern_runs
    assert stopped.stopped and stopped.progress == {"ae": 1, "cls": 2, "dec": 0}
    assert split["progress"] == whole["progress"] == {"ae": 1, "cls": 2, "dec": 2}
    differing = [k for k in whole["model"] if not torch.equal(whole["model"][k], split["model"][k])]
    assert differing == []
    assert resumed["test"] == metrics["test"]


def test_decoder_refit_changes_the_decoder_alone(modern_runs):
    metrics, whole, _, after_cls, _, _ = modern_runs
    changed = {k.split(".")[0] for k in whole["model"]
               if not torch.equal(whole["model"][k], after_cls["model"][k])}
    assert changed == {"decoder"}  # encoder weights and BatchNorm statistics untouched
    cls_rows, dec_rows = metrics["history"]["cls"], metrics["history"]["dec"]
    assert [row["epoch"] for row in dec_rows] == [1, 2]
    for row in dec_rows:  # classification is exactly what phase 2 left
        assert (row["val_top1"], row["val_loss"]) == (cls_rows[-1]["val_top1"],
                                                      cls_rows[-1]["val_loss"])
    assert "train_top1" not in dec_rows[0]


def test_train_plus_val_images_feed_the_autoencoder_phases(modern_runs, root, tmp_path):
    # 12 train + 4 val images in batches of 6: 3 steps per phase-1 epoch (2 with train alone).
    _, _, _, after_cls, _, _ = modern_runs
    model = model_from_checkpoint(after_cls)
    assert model.config == get_variant("res16")
    steps = {}
    for images in ("train", "train+val"):
        run_dir = tmp_path / images
        run(root, run_dir, replace(MODERN, ae_images=images), stop_after_epochs=1)
        state = load_checkpoint(run_dir)["optimizer"]["state"]
        steps[images] = {float(s["step"]) for s in state.values()}
    assert steps == {"train": {2.0}, "train+val": {3.0}}


def test_train_plus_val_labels_feed_every_phase_and_val_scores_nothing(root, tmp_path,
                                                                       class_folders):
    # 12 train + 4 val images in batches of 6: 3 steps per epoch in every phase.
    config = replace(MODERN, cls_images="train+val", ae_images="train", dec_epochs=1)
    result = run(root, tmp_path / "trainval", config)
    history = result.history
    for phase in ("ae", "cls", "dec"):
        assert [row["epoch"] for row in history[phase]] == list(
            range(1, getattr(config, f"{phase}_epochs") + 1))
    assert all("val_top1" not in row and "val_loss" not in row for row in history["cls"])
    assert all("val_recon_mse" in row for row in history["ae"] + history["dec"])
    assert result.metrics["test_split"] == "test" and 0 <= result.test["top1"] <= 100
    state = load_checkpoint(tmp_path / "trainval")
    assert state["train_config"]["cls_images"] == "train+val"
    # Phase 2 learned val's labels: the run's plots still draw (train curves only).
    assert (tmp_path / "trainval" / "accuracy.png").stat().st_size > 0

    steps = {}
    for images in ("train", "train+val"):
        run_dir = tmp_path / f"steps-{images}"
        one_phase = replace(MODERN, ae_epochs=0, dec_epochs=0, cls_epochs=1, cls_images=images)
        run(root, run_dir, one_phase)
        optimizer = load_checkpoint(run_dir)["optimizer"]["state"]
        steps[images] = {float(s["step"]) for s in optimizer.values()}
    assert steps == {"train": {2.0}, "train+val": {3.0}}

    # Without a test split no held-out image would be left: refused before any training.
    no_test = class_folders.make("single", per_class=6)
    with pytest.raises(FlowaeError, match="no test split"):
        train(get_variant("res16", num_classes=len(class_folders.classes)), config,
              open_training_data(no_test, class_folders=True), tmp_path / "no-test",
              progress=False)
    assert not (tmp_path / "no-test").exists()


def test_unknown_saved_training_options_are_a_one_line_checkpoint_error():
    saved = {**TrainConfig().to_dict(), "ema_decay": 0.999}
    with pytest.raises(CheckpointError, match="ema_decay") as info:
        TrainConfig.from_dict(saved)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [({"optimizer": "sgd"}, "optimizer must be one of"), ({"schedule": "step"}, "schedule"),
     ({"ae_images": "test"}, "ae_images"), ({"cls_images": "val"}, "cls_images"),
     ({"label_smoothing": 1.0}, "label smoothing"),
     ({"dec_epochs": -1}, "epochs"), ({"crop_scale_min": 0.0}, "crop_scale_min")],
)
def test_bad_recipe_fields_are_refused(change, message):
    with pytest.raises(FlowaeError, match=message):
        replace(RECIPES["modern"], **change).validate()


def test_cli_picks_the_variants_recipe_and_flags_override_it(root, tmp_path):
    assert default_recipe("upsample") == "seed" and default_recipe("res32") == "modern"
    flags = ["--data-root", root, "--ae-epochs", "1", "--cls-epochs", "0", "--dec-epochs", "0",
             "--batch-size", "8", "--device", "cpu", "--no-progress", "--stop-after-epochs", "1"]
    configs = {}
    for variant, extra in (("res16", []), ("upsample", []), ("upsample", ["--recipe", "modern"])):
        run_dir = tmp_path / f"{variant}-{len(extra)}"
        args = ["--variant", variant, "--out", run_dir, *flags, *extra]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        configs[(variant, len(extra))] = load_checkpoint(run_dir)["train_config"]
    shrink = {"ae_epochs": 1, "cls_epochs": 0, "dec_epochs": 0, "batch_size": 8, "device": "cpu"}
    modern = replace(RECIPES["modern"], **shrink).to_dict()
    assert configs[("res16", 0)] == modern == configs[("upsample", 2)]
    assert configs[("upsample", 0)] == replace(RECIPES["seed"], **shrink).to_dict()
    assert math.isclose(modern["lr"], 2e-3)


def test_cutmix_pastes_one_box_from_another_image_and_reports_its_area():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 20, 20).clone()
    labels = torch.arange(8) + 100
    seen = 0
    for seed in range(20):
        mixed, info = cutmix(images, labels, 1.0, torch.Generator().manual_seed(seed))
        other, share = info
        for i in range(8):
            pasted = mixed[i] != images[i]
            source = other[i].item() - 100  # each image's value is its index
            if source == i:
                assert not pasted.any()  # pasted from itself: unchanged
                continue
            assert torch.all(mixed[i][pasted] == source)
            assert pasted.sum().item() == pytest.approx(3 * 400 * share, abs=0.5)
            seen += 1
    assert seen > 100
    untouched, info = cutmix(images, labels, 0.0, torch.Generator().manual_seed(0))
    assert info is None and torch.equal(untouched, images)


def test_set_option_types_recipe_fields_and_refuses_unknown_ones(root, tmp_path):
    base = ["--variant", "res16", "--data-root", root, "--ae-epochs", "0", "--cls-epochs", "1",
            "--dec-epochs", "0", "--batch-size", "12", "--device", "cpu", "--no-progress"]
    run_dir = tmp_path / "set"
    result = CliRunner().invoke(main, [str(a) for a in [
        *base, "--out", run_dir, "--set", "cutmix=0.5", "--set", "weight-decay=0.1",
        "--set", "bf16=false", "--set", "schedule=constant"]])
    assert result.exit_code == 0, result.output
    saved = load_checkpoint(run_dir)["train_config"]
    assert (saved["cutmix"], saved["weight_decay"], saved["bf16"], saved["schedule"]) == (
        0.5, 0.1, False, "constant")
    for bad, exit_code, message in (("colour=red", 2, "KEY one of"), ("cutmix", 2, "KEY=VALUE"),
                                    ("bf16=maybe", 2, "takes a bool"),
                                    ("cutmix=nan", 2, "finite"),
                                    ("optimizer=sgd", 1, "optimizer must be one of")):
        result = CliRunner().invoke(main, [str(a) for a in [
            *base, "--out", tmp_path / "bad", "--set", bad]])
        assert result.exit_code == exit_code, (bad, result.output)
        assert message in result.output and "Traceback" not in result.output
