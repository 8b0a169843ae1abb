"""How a failure inside Ray reaches the user: one line that names the error a user can fix."""

from __future__ import annotations

from flowae.runtime.batch.pipeline import _ray_failure
from flowae.runtime.errors import ModelLoadError

# What Ray quotes when an actor's constructor raised (the error itself stays on the worker).
ACTOR_DIED = """The actor died because of an error raised in its creation task, ray::MapWorker
  File "/work/main/runtime/modeldir.py", line 80, in resolve_model
    raise ModelLoadError(f"{path}: no such model file or directory")
flowae.runtime.errors.ModelLoadError: models: no such model file or directory"""


def test_a_quoted_remote_error_is_named():
    assert _ray_failure(RuntimeError(ACTOR_DIED)) == (
        "ModelLoadError: models: no such model file or directory")


def test_a_flowae_error_in_the_chain_wins():
    try:
        try:
            raise ModelLoadError("m.onnx: empty file (0 bytes)\nmore")
        except ModelLoadError as inner:
            raise RuntimeError("ray wrapper") from inner
    except RuntimeError as outer:
        assert _ray_failure(outer) == "m.onnx: empty file (0 bytes)"


def test_otherwise_the_first_message():
    assert _ray_failure(RuntimeError("node lost\nat 10:00")) == "node lost"
    assert _ray_failure(RuntimeError("")) == "RuntimeError"
