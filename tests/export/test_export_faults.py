"""A `flowae-export` process killed with SIGKILL at each step never costs the model it replaces.

The export runs as a real `flowae-export` subprocess over a copy of a complete model
directory (fp32, int8 and fp16 graphs). The CLI entry module's test-only hook
(FLOWAE_EXPORT_CRASH_AT=<step>) makes the process SIGKILL itself when the export reaches the
step: deterministic, no sleeps or polling, and as abrupt as an outside `kill -9` (no finally
block, atexit handler or buffered write runs). After each kill the directory holds the
complete old model (or, once swapped, the complete new one), the runtime answers from it, and
the next export clears what the killed one left. Also: the directories an export refuses to
replace, and the swap itself in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowae.export import ExportOptions, export_model
from flowae.export.install import check_replaceable, install, is_complete, recover
from flowae.runtime.contract import GRAPH_IO, MANIFEST_NAME, graph_file
from flowae.runtime.errors import ExportError
from flowae.runtime.predictor import Predictor

FLOWAE_EXPORT = Path(sys.executable).with_name("flowae-export")
FP32_FILES = sorted([*(graph_file(role) for role in GRAPH_IO), MANIFEST_NAME])
# (step, swap): every step the export reports, on both swap paths where they differ.
KILL_POINTS = [
    ("scratch", "exchange"),  # scratch folder made, empty
    ("graphs", "exchange"),  # fp32 graphs in the scratch folder, no manifest yet
    ("manifest", "exchange"),  # scratch complete, not yet swapped in
    ("swapped", "exchange"),  # new model in place, old one under the scratch name
    ("old-aside", "rename"),  # old model renamed aside, new one not yet in: no model dir
    ("swapped", "rename"),  # new model in place, old one not yet removed
]


def snapshot(model_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in model_dir.iterdir()}


def siblings(model_dir: Path) -> list[str]:
    """The hidden folders beside `model_dir` that exports make."""
    return sorted(p.name for p in model_dir.parent.iterdir() if p.name.startswith("."))


def answers(model_dir: Path, images: list[Path]) -> list:
    return Predictor(model_dir, provider="cpu").predict(images, top_k=5)


def run_export(run: Path, out_dir: Path, data_root: Path, crash_at: str | None = None,
               swap: str = "exchange") -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("FLOWAE_EXPORT_CRASH_AT", "FLOWAE_EXPORT_SWAP")}
    if crash_at is not None:
        env["FLOWAE_EXPORT_CRASH_AT"] = crash_at
    if swap == "rename":
        env["FLOWAE_EXPORT_SWAP"] = "rename"
    # fp32 only, without the conv rewrite: every graph differs from the old model's.
    return subprocess.run([str(FLOWAE_EXPORT), str(run), "--out", str(out_dir), "--data-root",
                           str(data_root), "--no-rewrite-convs"],
                          env=env, capture_output=True, text=True, check=False)


@pytest.fixture
def images(fake_root) -> list[Path]:
    return sorted((fake_root / "flowers-102" / "jpg").glob("*.jpg"))[:6]


@pytest.fixture
def old_model(full_export, tmp_path, images) -> tuple[Path, dict, list]:
    """A complete model directory (fp32, int8, fp16), its bytes and the runtime's answers."""
    out_dir = tmp_path / "model"
    shutil.copytree(full_export[0], out_dir)
    return out_dir, snapshot(out_dir), answers(out_dir, images)


def test_the_console_script_is_installed():
    assert FLOWAE_EXPORT.is_file(), f"{FLOWAE_EXPORT}: run `pip install -e .` first"


@pytest.mark.parametrize(("step", "swap"), KILL_POINTS)
def test_killed_export_leaves_a_whole_model(step, swap, old_model, tiny_runs, fake_root,
                                            images):
    out_dir, before, before_answers = old_model
    done = run_export(tiny_runs["upsample"], out_dir, fake_root, crash_at=step, swap=swap)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = siblings(out_dir)
    assert left, "the killed export left its scratch or old folder behind"

    if step == "old-aside":  # the one window with nothing at the path: the old model aside
        assert not out_dir.exists()
        (aside,) = [name for name in left if name.startswith(".model.old-")]
        assert snapshot(out_dir.parent / aside) == before
    elif step == "swapped":  # the new model whole, nothing of the old one mixed in
        assert sorted(snapshot(out_dir)) == FP32_FILES
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
        assert manifest["rewrite_convs"] is False
        assert all(snapshot(out_dir)[name] != before[name] for name in FP32_FILES)
        assert len(answers(out_dir, images)) == len(images)
    else:  # not swapped yet: the old model, byte for byte, answering as before
        assert snapshot(out_dir) == before
        assert answers(out_dir, images) == before_answers

    # What the next export does first: the old model comes back if it was aside, every
    # folder the dead process left goes.
    recover(out_dir)
    assert siblings(out_dir) == []
    if step != "swapped":
        assert snapshot(out_dir) == before
        assert answers(out_dir, images) == before_answers


def test_next_export_clears_every_stale_folder_and_succeeds(old_model, tiny_runs, fake_root,
                                                             images):
    out_dir, before, _ = old_model
    run = tiny_runs["upsample"]
    for step, swap in (("graphs", "exchange"), ("old-aside", "rename")):
        assert run_export(run, out_dir, fake_root, step, swap).returncode == -signal.SIGKILL
    assert not out_dir.exists() and len(siblings(out_dir)) == 2

    done = run_export(run, out_dir, fake_root)
    assert done.returncode == 0, done.stderr
    assert siblings(out_dir) == []
    assert sorted(snapshot(out_dir)) == FP32_FILES
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert manifest["rewrite_convs"] is False
    assert len(answers(out_dir, images)) == len(images)


def test_a_running_exports_folders_are_left_alone(old_model):
    out_dir, before, _ = old_model
    mine = out_dir.parent / f".model.export-{os.getpid()}-abc"
    mine.mkdir()
    (mine / "decoder.onnx").write_bytes(b"half written")
    assert recover(out_dir) == []
    assert mine.is_dir() and snapshot(out_dir) == before


@pytest.mark.parametrize("exchange", [True, False])
def test_install_swaps_whole_directories(old_model, tmp_path, exchange):
    out_dir, before, _ = old_model
    new = tmp_path / ".model.export-1-new"
    new.mkdir()
    (new / MANIFEST_NAME).write_text("{}")
    (new / graph_file("decoder")).write_bytes(b"new")
    steps = []
    install(new, out_dir, steps.append, exchange=exchange)
    assert steps == (["swapped"] if exchange else ["old-aside", "swapped"])
    assert snapshot(out_dir) == {MANIFEST_NAME: b"{}", graph_file("decoder"): b"new"}
    assert siblings(out_dir) == []  # the old model was removed, the scratch name is gone
    assert before  # (the old model had files: the swap replaced a real directory)


@pytest.mark.parametrize(("files", "message"), [
    ({"notes.txt": b"mine"}, "holds files an export did not write (notes.txt)"),
    ({MANIFEST_NAME: b"{}", "checkpoint.pt": b"x"}, "did not write (checkpoint.pt)"),
    ({graph_file("decoder"): b"x"}, "has no manifest.json"),
])
def test_a_directory_that_is_not_a_model_is_never_replaced(tiny_runs, fake_root, tmp_path,
                                                           files, message):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    with pytest.raises(ExportError, match=re.escape(message)) as caught:
        check_replaceable(out_dir)
    assert "\n" not in str(caught.value)
    done = run_export(tiny_runs["upsample"], out_dir, fake_root)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("Error: ") and message in done.stderr
    assert snapshot(out_dir) == files and siblings(out_dir) == []


def test_an_input_is_never_written(tiny_runs, fake_root, tmp_path):
    run = tiny_runs["upsample"]
    with pytest.raises(ExportError, match="holds files an export did not write"):
        export_model(run, run, ExportOptions(data_root=fake_root))
    with pytest.raises(ExportError, match="lies inside the data root"):
        export_model(run, fake_root / "model", ExportOptions(data_root=fake_root))
    assert not (fake_root / "model").exists()


def test_a_complete_model_directory_is_what_install_moves(old_model, tmp_path):
    out_dir, _, _ = old_model
    assert is_complete(out_dir)
    (out_dir / MANIFEST_NAME).unlink()
    assert not is_complete(out_dir)
