"""kill -9 during training, at several points: the run's checkpoint stays whole, the next
`flowae-train --resume` removes what the killed process left half-written and finishes with
exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowae.checkpoint import CHECKPOINT_NAME, load_checkpoint

FLOWAE_TRAIN = Path(sys.executable).parent / "flowae-train"
EPOCHS = ("--ae-epochs", "4", "--cls-epochs", "4", "--dec-epochs", "0")


def command(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(FLOWAE_TRAIN), "--variant", "upsample", "--data-root", str(data_root),
            "--out", str(run_dir), "--batch-size", "8", "--seed", "0", "--device", "cpu",
            "--no-progress", *EPOCHS, *extra]


# torchrun's variables would make a child think it is one rank of a larger run.
_DIST_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID"}


def one_thread() -> dict:
    # One thread on both sides makes the summation order, and so the weights, identical.
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return {**env, "OMP_NUM_THREADS": "1"}


def kill_after_checkpoints(data_root: Path, run_dir: Path, writes: int) -> None:
    """Start a training run and SIGKILL it as soon as it has written `writes` checkpoints."""
    checkpoint = run_dir / CHECKPOINT_NAME
    log = run_dir.parent / f"killed-after-{writes}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command(data_root, run_dir), env=one_thread(),
                                   stdout=sink, stderr=subprocess.STDOUT)
    seen, last = 0, None
    deadline = time.monotonic() + 300
    try:
        while seen < writes and process.poll() is None and time.monotonic() < deadline:
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if stamp is not None and stamp != last:
                seen, last = seen + 1, stamp
            time.sleep(0.005)  # polling a file, not timing anything
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert seen >= writes, (f"saw {seen} of {writes} checkpoint writes before the run ended "
                            f"(exit {process.returncode}): {log.read_text()[-2000:]}")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / CHECKPOINT_NAME)["model"]


@pytest.fixture(scope="module")
def uninterrupted(fake_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(command(fake_root, run_dir), env=one_thread(), check=True,
                   capture_output=True, timeout=600)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("writes", [1, 3, 6])
def test_killed_training_resumes_to_the_same_weights(writes, fake_root, uninterrupted,
                                                     tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoints(fake_root, run_dir, writes)
    payload = load_checkpoint(run_dir / CHECKPOINT_NAME)  # whole, whatever the moment was
    assert sum(payload["progress"].values()) >= 1
    # What a kill in the middle of a write leaves: a half-written temp file beside it.
    stale = run_dir / f".{CHECKPOINT_NAME}.killed.tmp"
    stale.write_bytes(b"half a checkpoint")

    done = subprocess.run(command(fake_root, run_dir, "--resume"), env=one_thread(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "metrics.json").is_file()
    mine, reference = weights(run_dir), weights(uninterrupted)
    assert mine.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(mine[name], tensor), name
