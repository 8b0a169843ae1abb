"""Checkpoint files: atomic writes, weights-only loading, and CheckpointError for anything that
is not a flowae checkpoint or does not fit its model. (Checkpoints written by a real training
run are checked in test_flowae_train.py.)"""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flowae.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    CLASS_NAMES_KEY,
    checkpoint_class_names,
    checkpoint_payload,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flowae.config import TrainConfig
from flowae.models import VARIANTS, build_model
from flowae.runtime.contract import CLASS_NAMES
from flowae.runtime.errors import CheckpointError, FlowaeError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def payload() -> dict:
    """What the training loop saves, from a real model after one real Adam step."""
    torch.manual_seed(0)
    model = build_model(VARIANTS["upsample"]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(2, 3, 100, 100) * 2 - 1
    F.mse_loss(model.decoder(model.encoder(images)), images).backward()
    optimizer.step()
    return {
        "model_config": VARIANTS["upsample"].to_dict(),
        "train_config": TrainConfig(ae_epochs=3, cls_epochs=2).to_dict(),
        "phase": "ae", "progress": {"ae": 1, "cls": 0}, "history": {"ae": [], "cls": []},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
    }


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_save_then_load_round_trips_with_weights_only(tmp_path, payload):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, payload)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # what export/resume rely on
    assert raw["format"] == CHECKPOINT_FORMAT and raw["version"] == CHECKPOINT_VERSION
    loaded = load_checkpoint(tmp_path)  # a run directory is accepted too
    assert loaded["model_config"] == payload["model_config"]
    assert loaded["train_config"] == payload["train_config"]
    assert loaded["progress"] == {"ae": 1, "cls": 0}
    assert_same_tensors(loaded["model"], payload["model"])
    assert loaded["optimizer"]["param_groups"] == payload["optimizer"]["param_groups"]
    for index, state in payload["optimizer"]["state"].items():
        assert_same_tensors(loaded["optimizer"]["state"][index], state)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left


def test_model_from_checkpoint_rebuilds_the_model_in_eval_mode(tmp_path, payload):
    save_checkpoint(tmp_path / CHECKPOINT_NAME, payload)
    model = model_from_checkpoint(load_checkpoint(tmp_path / CHECKPOINT_NAME))
    assert not model.training
    assert model.config == VARIANTS["upsample"]
    assert_same_tensors(model.state_dict(), payload["model"])


class FailsWhilePickled:
    """Stands for a write that fails halfway (a full disk): pickling it raises."""

    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, payload):
    path = tmp_path / "run" / "deeper" / CHECKPOINT_NAME  # missing folders are created
    save_checkpoint(path, payload)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {**payload, "history": {"ae": [FailsWhilePickled()]}})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_NAME]  # no temp file left


def test_payload_builder_carries_class_names_and_checks_their_count():
    torch.manual_seed(0)
    config = VARIANTS["res16"]
    model = build_model(config)
    built = checkpoint_payload(config, TrainConfig(), model, phase="ae", progress={"ae": 1})
    assert built[CLASS_NAMES_KEY] == list(CLASS_NAMES)  # Flowers102's, by default
    assert built["model_config"] == config.to_dict() and "optimizer" not in built
    assert all(torch.equal(built["model"][k], v) for k, v in model.state_dict().items())
    small = replace(config, num_classes=2)
    described = {"class_names": ["cat", "dog"], "kind": "class-folders"}
    two = checkpoint_payload(small, TrainConfig(), build_model(small), dataset=described)
    assert two[CLASS_NAMES_KEY] == ["cat", "dog"] and two["dataset"] == described
    assert checkpoint_class_names(two) == ("cat", "dog")
    with pytest.raises(CheckpointError, match="3 class names for a model with 2 outputs"):
        checkpoint_payload(small, TrainConfig(), model, class_names=("a", "b", "c"))
    # A checkpoint from before class names were stored: a Flowers102 run, or refused.
    older = {k: v for k, v in built.items() if k != CLASS_NAMES_KEY}
    assert checkpoint_class_names(older) == CLASS_NAMES
    with pytest.raises(CheckpointError, match="2 outputs and no class names"):
        checkpoint_class_names({"model_config": small.to_dict()})


class NotAllowedByWeightsOnly:
    """A pickled class instance: torch.load(weights_only=True) must refuse it."""


@pytest.mark.parametrize(
    "write, reason",
    [
        (lambda p: p.write_bytes(b"definitely not a checkpoint"), "not a flowae checkpoint"),
        (lambda p: p.write_bytes(b""), "not a flowae checkpoint"),
        (lambda p: p.write_bytes(pickle.dumps(NotAllowedByWeightsOnly(), protocol=2)),
         "not a flowae checkpoint"),
        (lambda p: torch.save(NotAllowedByWeightsOnly(), p), "not a flowae checkpoint"),
        (lambda p: torch.save({"model": {}}, p), "no 'flowae-checkpoint' tag"),
        (lambda p: torch.save([1, 2, 3], p), "no 'flowae-checkpoint' tag"),
        (lambda p: torch.save({"format": CHECKPOINT_FORMAT, "version": 99}, p),
         "checkpoint version 99"),
        (lambda p: torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                               "model": {}}, p), "lacks model_config, train_config, progress"),
    ],
    ids=["text", "empty", "pickle", "torch-object", "no-tag", "list", "version", "keys"],
)
def test_foreign_files_raise_checkpoint_error(tmp_path, write, reason):
    path = tmp_path / "foreign.pt"
    write(path)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint(path)
    assert isinstance(info.value, FlowaeError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint") as info:
        load_checkpoint(tmp_path)  # a run directory without checkpoint.pt
    assert str(tmp_path / CHECKPOINT_NAME) in str(info.value)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "elsewhere.pt")


def test_weights_that_do_not_fit_the_model_config_are_refused(tmp_path, payload):
    mismatched = dict(payload, model_config=VARIANTS["base"].to_dict())
    save_checkpoint(tmp_path / CHECKPOINT_NAME, mismatched)
    loaded = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit its model config") as info:
        model_from_checkpoint(loaded)
    assert "\n" not in str(info.value)
    bad_config = dict(payload, model_config={**payload["model_config"], "colour": "blue"})
    with pytest.raises(CheckpointError, match="does not fit its model config"):
        model_from_checkpoint(bad_config)
