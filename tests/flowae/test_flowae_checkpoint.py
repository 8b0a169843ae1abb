"""Checkpoint files: atomic writes, weights-only loading, and CheckpointError for anything that
is not a flowae checkpoint or does not fit its model. (Checkpoints written by a real training
run are checked in test_flowae_train.py.)"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from flowae.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    atomic_write_bytes,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flowae.models import VARIANTS, build_model
from flowae.runtime.errors import CheckpointError, FlowaeError
from flowae.train import TrainConfig

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


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, lambda handle: handle.write(b"old contents"))

    def fail_halfway(handle):
        handle.write(b"new, half-written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(path, fail_halfway)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_creates_missing_parent_folders(tmp_path):
    path = tmp_path / "run" / "deeper" / CHECKPOINT_NAME
    atomic_write_bytes(path, lambda handle: handle.write(b"x"))
    assert path.read_bytes() == b"x"


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
