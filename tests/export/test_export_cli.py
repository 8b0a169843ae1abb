"""`flowae-export` through click's CliRunner: a real export that replaces an older one whole,
and one-line errors with exit 1 (usage errors: exit 2)."""

from __future__ import annotations

import json
import os
import shutil

import onnx
import pytest
import torch
from click.testing import CliRunner

from flowae.export.cli import main
from flowae.runtime.contract import (
    GRAPH_IO,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
    ROLE_DECODER,
    graph_file,
)

FP32_FILES = sorted(graph_file(role) for role in GRAPH_IO)


def invoke(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback instead of a message: {result.exception!r}"
    return result.exit_code, result.output.strip().splitlines()


def test_cli_export_with_opset_replaces_an_older_export(full_export, tiny_runs, fake_root,
                                                        tmp_path):
    out_dir = tmp_path / "model"
    shutil.copytree(full_export[0], out_dir)  # holds int8 and fp16 files too
    code, lines = invoke(tiny_runs["upsample"], "--out", out_dir, "--data-root", fake_root,
                         "--opset", 18, "--no-rewrite-convs")
    assert code == 0, lines
    assert any(line.startswith("decoder.onnx") for line in lines)
    assert lines[-1].startswith("recommended: fp32 on CPU")
    assert "cuda fp32" in lines[-1]  # no fp16 this time
    # Replaced whole: the older int8 and fp16 graphs went with the old directory.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*FP32_FILES, MANIFEST_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no scratch or old folder
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert manifest[MANIFEST_RECOMMENDED_BY_PROVIDER]["cuda"] == "fp32"
    assert manifest["opset"] == 18 and manifest["rewrite_convs"] is False
    assert set(manifest["files"]) == set(FP32_FILES)
    for name in FP32_FILES:
        proto = onnx.load(str(out_dir / name))
        assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [18]
        assert manifest["files"][name]["parity"]["passed"]
    umask = os.umask(0)
    os.umask(umask)
    for name in [*FP32_FILES, MANIFEST_NAME]:  # the usual mode, not the temp files' 0600
        assert (out_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert out_dir.stat().st_mode & 0o777 == full_export[0].stat().st_mode & 0o777
    decoder = onnx.load(str(out_dir / graph_file(ROLE_DECODER))).graph
    assert not any(n.op_type == "Pad" for n in decoder.node)  # the exporter's own graph


def test_cli_refuses_int8_that_loses_accuracy(tiny_runs, fake_root, tmp_path):
    out_dir = tmp_path / "model"
    # A negative allowance demands that int8 gain accuracy: the gate must refuse.
    code, lines = invoke(tiny_runs["upsample"], "--out", out_dir, "--data-root", fake_root,
                         "--int8", "--int8-max-drop", -100, "--calibration-images", 4)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("Error: int8 loses")
    assert "--allow-accuracy-drop" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no model dir, no scratch dir


def _torch_dict(path):
    torch.save({"weights": torch.zeros(3)}, path)


def _garbage(path):
    path.write_bytes(b"\x00not a pickle at all" * 10)


@pytest.mark.parametrize(("make", "message"), [
    (_torch_dict, "not a flowae checkpoint (no 'flowae-checkpoint' tag)"),
    (_garbage, "not a flowae checkpoint"),
    (None, "no such checkpoint"),
])
def test_cli_rejects_what_is_not_a_flowae_checkpoint(make, message, fake_root, tmp_path):
    checkpoint = tmp_path / "model.pt"
    if make is not None:
        make(checkpoint)
    code, lines = invoke(checkpoint, "--out", tmp_path / "model", "--data-root", fake_root)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not (tmp_path / "model").exists()


def test_cli_rejects_an_opset_the_exporter_cannot_write(tiny_runs, fake_root, tmp_path):
    code, lines = invoke(tiny_runs["upsample"], "--out", tmp_path / "model", "--data-root",
                         fake_root, "--opset", 12)
    assert code == 1
    assert len(lines) == 1 and "opset must be between 18" in lines[0]


@pytest.mark.parametrize("value", ["big", "0"])
def test_cli_rejects_a_resize_that_is_neither_a_size_nor_auto(value, tiny_runs, fake_root,
                                                              tmp_path):
    result = CliRunner().invoke(main, [str(tiny_runs["upsample"]), "--out",
                                       str(tmp_path / "model"), "--resize-px", value])
    assert result.exit_code == 2 and "--resize-px" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
