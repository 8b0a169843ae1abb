"""`flowae-infer` through click's CliRunner: output formats, exit codes 0/1/2, reconstructions,
progress, and --evaluate."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from flowae.runtime.cli import main, save_reconstruction
from flowae.runtime.contract import CLASS_NAMES, ROLE_ENCODER_CLASSIFIER, graph_file


@pytest.fixture
def invoke(model_dir):
    def run(*args, model=True):
        argv = (["--model", str(model_dir)] if model else []) + [str(a) for a in args]
        return CliRunner().invoke(main, argv)

    return run


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_table_output_and_exit_0(invoke, real_jpegs, predictor):
    result = invoke(real_jpegs[0], real_jpegs[1], "--top-k", 2)
    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert out[0] == str(real_jpegs[0]) and out[3] == str(real_jpegs[1])
    expected = predictor.predict(real_jpegs[0], top_k=2)[0]
    assert expected[0].class_name in out[1] and out[1].strip().startswith("1")
    assert f"(label {expected[1].label})" in out[2]
    assert result.stderr == ""


def test_json_lines(invoke, real_jpegs, predictor):
    result = invoke("--json", "--top-k", 3, *real_jpegs[:3])
    assert result.exit_code == 0
    records = [json.loads(line) for line in lines(result.stdout)]
    assert [r["image"] for r in records] == [str(p) for p in real_jpegs[:3]]
    for record, path in zip(records, real_jpegs[:3], strict=True):
        assert set(record) == {"image", "top_k", "provider"}
        assert record["provider"] == "cpu"
        assert len(record["top_k"]) == 3
        for entry, expected in zip(record["top_k"], predictor.predict(path, top_k=3)[0],
                                   strict=True):
            assert set(entry) == {"label", "class_name", "probability"}
            assert entry["label"] == expected.label
            assert entry["class_name"] == CLASS_NAMES[entry["label"]]
            assert entry["probability"] == pytest.approx(expected.probability, abs=1e-6)


def test_a_failed_image_gives_exit_1_and_the_rest_still_run(invoke, real_jpegs, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    result = invoke("--json", real_jpegs[0], tmp_path / "missing.jpg", text, real_jpegs[1])
    assert result.exit_code == 1
    records = [json.loads(line) for line in lines(result.stdout)]
    assert [set(r) for r in records] == [{"image", "top_k", "provider"}, {"image", "error"},
                                         {"image", "error"}, {"image", "top_k", "provider"}]
    assert records[1] == {"image": str(tmp_path / "missing.jpg"),
                          "error": f"{tmp_path / 'missing.jpg'}: no such file"}
    assert records[2]["error"] == f"{text}: not an image Pillow can read"
    assert lines(result.stderr) == ["flowae-infer: 2 of 4 images failed"]
    table = invoke(real_jpegs[0], tmp_path / "missing.jpg")
    assert table.exit_code == 1
    assert lines(table.stderr) == [f"flowae-infer: {tmp_path / 'missing.jpg'}: no such file",
                                   "flowae-infer: 1 of 2 images failed"]
    assert "Traceback" not in table.output


def test_directories_and_globs(invoke, real_jpegs, tmp_path):
    for path in real_jpegs[:3]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "labels.txt").write_text("not an image, skipped")
    by_dir = invoke("--json", tmp_path)
    by_glob = invoke("--json", tmp_path / "*.jpg")
    expected = [str(tmp_path / p.name) for p in sorted(real_jpegs[:3])]
    for result in (by_dir, by_glob):
        assert result.exit_code == 0
        assert [json.loads(line)["image"] for line in lines(result.stdout)] == expected
    (tmp_path / "empty").mkdir()
    empty = invoke("--json", tmp_path / "empty")
    assert empty.exit_code == 1
    assert json.loads(empty.stdout)["error"] == f"{tmp_path / 'empty'}: directory holds no images"


def test_reconstruct_writes_input_beside_output(invoke, real_jpegs, tmp_path, predictor):
    out_dir = tmp_path / "recon"
    twin = tmp_path / "twin" / real_jpegs[0].name  # same stem from another folder
    twin.parent.mkdir()
    shutil.copy(real_jpegs[1], twin)
    result = invoke("--json", "--reconstruct", out_dir, real_jpegs[0], twin)
    assert result.exit_code == 0
    records = [json.loads(line) for line in lines(result.stdout)]
    stem = real_jpegs[0].stem
    assert [r["reconstruction"] for r in records] == [str(out_dir / f"{stem}.recon.png"),
                                                      str(out_dir / f"{stem}.recon-2.png")]
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{stem}.recon-2.png",
                                                         f"{stem}.recon.png"]
    pair = Image.open(out_dir / f"{stem}.recon.png")
    assert pair.size == (200, 100) and pair.mode == "RGB"
    assert pair.crop((100, 0, 200, 100)).tobytes() == predictor.reconstruct(
        real_jpegs[0])[0].tobytes()
    assert pair.crop((0, 0, 100, 100)).tobytes() == predictor.load(real_jpegs[0]).tobytes()


def test_progress_line_on_stderr(invoke, real_jpegs):
    result = invoke("--json", "--progress", *real_jpegs[:5])
    assert result.exit_code == 0
    assert "5/5 images" in result.stderr and "[" + "#" * 30 + "]" in result.stderr
    assert all(json.loads(line) for line in lines(result.stdout))  # stdout stays pure JSON
    quiet = invoke("--json", "--no-progress", *real_jpegs[:5])
    assert quiet.stderr == ""


@pytest.mark.parametrize("args, message", [
    ([], "give at least one IMAGE"),
    (["--top-k", "0", "x.jpg"], "Invalid value for '--top-k'"),
    (["--provider", "tpu", "x.jpg"], "Invalid value for '--provider'"),
    (["--batch-size", "0", "x.jpg"], "Invalid value for '--batch-size'"),
    (["--threads", "0", "x.jpg"], "Invalid value for '--threads'"),
    (["--threads", "257", "x.jpg"], "'--threads': 257 is not in the range 1<=x<=256"),
    (["--batch-size", "4097", "x.jpg"], "'--batch-size': 4097 is not in the range 1<=x<=4096"),
    (["--provider", "cuda,,cpu", "x.jpg"], "has an empty name"),
    (["--provider", "auto,cpu", "x.jpg"], "provider 'auto' stands alone"),
    (["--provider-option", "device_id", "x.jpg"], "expected KEY=VALUE, got 'device_id'"),
    (["--max-pixels", "0", "x.jpg"], "Invalid value for '--max-pixels'"),
    (["--evaluate", "root", "--max-pixels", "9"], "--evaluate takes no --max-pixels"),
    (["--no-such-option", "x.jpg"], "No such option '--no-such-option'"),
    (["--fullres", "somewhere", "x.jpg"], "--fullres needs --evaluate"),
    (["--evaluate", "root", "x.jpg"], "--evaluate takes no IMAGE"),
    (["--evaluate", "root", "--jpeg-draft"], "--evaluate takes no --jpeg-draft"),
    (["--evaluate", "root", "--top-k", "3"], "--evaluate takes no --top-k"),
    (["--evaluate", "root", "--reconstruct", "out"], "--evaluate takes no --reconstruct"),
])
def test_usage_errors_exit_2(invoke, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written; relative paths land here
    result = invoke(*args)
    assert result.exit_code == 2
    (line,) = lines(result.stderr)  # one line, not click's usage block
    assert line.startswith("flowae-infer: error: ") and message in line
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_reconstruct_into_a_file_is_a_usage_error(invoke, real_jpegs, tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = invoke("--reconstruct", tmp_path / "taken", real_jpegs[0])
    assert result.exit_code == 2 and "is a file" in result.stderr


def test_unusable_models_exit_2_with_one_line(invoke, model_dir, tmp_path, real_jpegs):
    corrupt = tmp_path / graph_file(ROLE_ENCODER_CLASSIFIER)
    corrupt.write_bytes(b"\x08\x07garbage" * 100)
    cases = [
        (["--model", corrupt], f"{corrupt}: not a loadable ONNX model"),
        (["--model", tmp_path / "none"], "no such model file or directory"),
        (["--model", model_dir, "--top-k", "500"], "top_k must be between 1 and 102"),
    ]
    for args, message in cases:
        result = invoke(*args, real_jpegs[0], model=False)
        assert result.exit_code == 2
        *warnings, line = lines(result.stderr)
        assert line.startswith("flowae-infer: error: ") and message in line
        assert all(w.startswith("flowae-infer: warning: ") for w in warnings)
        assert result.stdout == ""


def test_evaluate_on_fake_flowers102(invoke, fake_root, tmp_path, predictor, tiny_runs):
    fake_jpegs = sorted((fake_root / "flowers-102" / "jpg").glob("*.jpg"))[:4]
    fullres = tmp_path / "fullres"
    (fullres / "jpg").mkdir(parents=True)
    rows = ["file,label,class_name"]
    for path in fake_jpegs:
        shutil.copy(path, fullres / "jpg" / path.name)
        label = predictor.predict(path, top_k=1)[0][0].label  # right by construction
        rows.append(f'{path.name},{label},"{CLASS_NAMES[label]}"')
    (fullres / "labels.csv").write_text("\n".join(rows) + "\n")
    result = invoke("--evaluate", fake_root, "--fullres", fullres, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["test"]["full_decode"]["images"] == 10
    pytorch_top1 = json.loads((tiny_runs["upsample"] / "metrics.json").read_text())["test"]["top1"]
    assert report["pytorch_test"]["top1"] == pytest.approx(pytorch_top1)  # via the metadata
    assert report["runtime_minus_pytorch_top1"] == pytest.approx(
        report["test"]["full_decode"]["top1"] - pytorch_top1)
    assert report["fullres"]["full_decode"] == {"images": 4, "failed": 0, "top1": 100.0,
                                                "top5": 100.0}
    assert report["fullres"]["draft_reduced_images"] == 0  # the fake JPEGs are < 200 px
    assert report["fullres"]["draft_top1_drop"] == 0.0
    table = invoke("--evaluate", fake_root)
    assert table.exit_code == 0
    assert "test     full_decode   images    10" in table.stdout


def test_jpeg_draft_switch(invoke, fullres_root, model_dir):
    from flowae.runtime.predictor import Predictor

    photo = sorted((fullres_root / "jpg").glob("*.jpg"))[0]
    expected = {draft: [round(p.probability, 6) for p in Predictor(
        model_dir, provider="cpu", jpeg_draft=draft).predict(photo)[0]] for draft in (True, False)}
    assert expected[True] != expected[False]  # the switch makes a visible difference here
    for flag, draft in (("--jpeg-draft", True), ("--no-jpeg-draft", False)):
        got = json.loads(invoke("--json", flag, photo).stdout)["top_k"]
        assert [entry["probability"] for entry in got] == expected[draft]


def test_evaluate_on_a_folder_that_is_not_flowers102(invoke, tmp_path):
    result = invoke("--evaluate", tmp_path)
    assert result.exit_code == 2
    (line,) = lines(result.stderr)
    assert line.startswith(f"flowae-infer: error: {tmp_path}: ")


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def umask_022():
    saved = os.umask(0o022)
    yield
    os.umask(saved)


def test_reconstruct_into_the_input_folder_writes_beside_it(invoke, real_jpegs, tmp_path,
                                                           umask_022):
    flower = tmp_path / "flower.png"
    Image.open(real_jpegs[0]).save(flower)
    before = digest(flower)
    result = invoke("--json", "--reconstruct", tmp_path, flower)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reconstruction"] == str(tmp_path / "flower.recon.png")
    assert digest(flower) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flower.png", "flower.recon.png"]
    assert (tmp_path / "flower.recon.png").stat().st_mode & 0o777 == 0o644


def test_reconstructions_never_replace_an_input_or_an_earlier_file(invoke, real_jpegs, tmp_path,
                                                                   predictor):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(real_jpegs[0], folder / "a.jpg")
    Image.open(real_jpegs[1]).save(folder / "a.png")  # same stem, another photo
    pristine = tmp_path / "pristine.png"
    shutil.copy(folder / "a.png", pristine)
    (folder / "b.recon.png").write_text("a user's own file")
    shutil.copy(real_jpegs[2], folder / "b.jpg")
    first = invoke("--json", "--reconstruct", folder, folder)
    assert first.exit_code == 1, first.output  # b.recon.png, a text file, is not an image
    records = {Path(r["image"]).name: r for r in map(json.loads, lines(first.stdout))}
    assert set(records) == {"a.jpg", "a.png", "b.jpg", "b.recon.png"}
    assert "error" in records["b.recon.png"]  # the user's text file, read as an input
    assert records["a.jpg"]["reconstruction"] == str(folder / "a.recon.png")
    assert records["a.png"]["reconstruction"] == str(folder / "a.recon-2.png")
    assert records["b.jpg"]["reconstruction"] == str(folder / "b.recon-2.png")
    assert (folder / "b.recon.png").read_text() == "a user's own file"
    assert digest(folder / "a.png") == digest(pristine)
    expected = predictor.predict(pristine, top_k=5)[0]  # a.png classified as itself
    assert [e["label"] for e in records["a.png"]["top_k"]] == [p.label for p in expected]
    written = {name: digest(folder / name) for name in ("a.recon.png", "a.recon-2.png",
                                                        "b.recon-2.png")}
    second = invoke("--json", "--reconstruct", folder, folder / "a.jpg", folder / "a.png")
    assert second.exit_code == 0, second.output
    assert [json.loads(line)["reconstruction"] for line in lines(second.stdout)] == [
        str(folder / "a.recon-3.png"), str(folder / "a.recon-4.png")]
    assert {name: digest(folder / name) for name in written} == written
    assert digest(folder / "a.recon-3.png") == written["a.recon.png"]  # same input, same PNG


def test_a_directory_in_the_way_fails_that_item_only(invoke, real_jpegs, tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / f"{real_jpegs[0].stem}.recon.png").mkdir(parents=True)
    result = invoke("--reconstruct", out_dir, real_jpegs[0], real_jpegs[1])
    assert result.exit_code == 1
    blocked = out_dir / f"{real_jpegs[0].stem}.recon.png"
    assert lines(result.stderr) == [
        f"flowae-infer: {blocked}: a directory has this name; reconstruction not written",
        "flowae-infer: 1 of 2 images failed"]
    assert (out_dir / f"{real_jpegs[1].stem}.recon.png").is_file()  # the run went on
    assert blocked.is_dir() and list(blocked.iterdir()) == []


def test_a_name_equal_to_an_input_is_never_chosen(tmp_path):
    image = Image.new("RGB", (4, 2), (200, 10, 10))
    planned = tmp_path / "x.recon.png"  # an input of the run that does not exist (yet)
    saved = save_reconstruction(image, tmp_path, tmp_path / "x.jpg", {os.path.realpath(planned)})
    assert saved == tmp_path / "x.recon-2.png" and not planned.exists()
    assert Image.open(saved).tobytes() == image.tobytes()


def test_version_and_help(invoke):
    version = invoke("--version", model=False)
    assert version.exit_code == 0
    assert version.stdout == f"flowae-infer {importlib.metadata.version('flowae')}\n"
    for flag in ("-h", "--help"):
        shown = invoke(flag, model=False)
        assert shown.exit_code == 0 and shown.stdout.startswith("Usage: ")
        assert "--provider-option KEY=VALUE" in shown.stdout and "at most 256" in shown.stdout


def test_verbose_says_what_served_and_json_names_the_provider(invoke, real_jpegs, model_dir):
    result = invoke("--verbose", "--json", "--provider", "tensorrt,cuda,cpu", real_jpegs[0])
    assert result.exit_code == 0, result.output
    *info, line = lines(result.stderr)
    assert all(i.startswith("flowae-infer: info: ") for i in info)
    served = json.loads(result.stdout)["provider"]
    assert served in ("cuda", "cpu")
    assert line.startswith(f"flowae-infer: model {model_dir} (upsample, fp32) served by "
                           f"{served} (asked tensorrt,cuda,cpu), threads ")
    assert f"flowae {importlib.metadata.version('flowae')}" in line
    quiet = invoke("--json", real_jpegs[0], "--provider-option", "arena_extend_strategy=1")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_a_library_warning_reaches_the_user_as_one_line(invoke, model_dir, tmp_path, real_jpegs):
    alone = tmp_path / graph_file(ROLE_ENCODER_CLASSIFIER)
    shutil.copy(model_dir / graph_file(ROLE_ENCODER_CLASSIFIER), alone)  # no manifest beside
    result = invoke("--json", real_jpegs[0], "--model", alone, model=False)
    assert result.exit_code == 0
    (line,) = lines(result.stderr)
    assert line.startswith(f"flowae-infer: warning: {tmp_path}: no manifest.json")


def test_a_closed_pipe_ends_quietly(model_dir, real_jpegs, tmp_path):
    """`flowae-infer ... | head -1`: the reader leaves early; no traceback, no BrokenPipeError.
    40 images of 102 classes print ~300 KB, far beyond a pipe's buffer, so writes must fail."""
    args = [sys.executable, "-m", "flowae.runtime.cli", "--model", str(model_dir), "--json",
            "--top-k", "102", "--provider", "cpu", "--no-progress"] + [str(real_jpegs[0])] * 40
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    first = child.stdout.readline()
    child.stdout.close()  # what `head -1` does after its line
    stderr = child.stderr.read().decode()
    code = child.wait(timeout=300)
    assert json.loads(first)["image"] == str(real_jpegs[0])
    assert stderr == "" and code == 1


def test_max_pixels_option(invoke, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 150), (30, 140, 60)).save(big)
    refused = invoke("--max-pixels", 200 * 150 - 1, big)
    assert refused.exit_code == 1
    first, summary = lines(refused.stderr)
    assert first.startswith(f"flowae-infer: {big}: image is ") and "pixel budget" in first
    assert summary == "flowae-infer: 1 of 1 images failed"
    assert invoke("--max-pixels", 200 * 150, big).exit_code == 0


def test_a_file_that_appears_meanwhile_is_kept_and_the_next_number_taken(tmp_path):
    """Another process creates <stem>.recon.png while ours is being encoded: write_atomic's
    create-only move refuses to take its place, and the next free number is used instead."""
    theirs = tmp_path / "x.recon.png"
    pixels = Image.new("RGB", (4, 2), (10, 200, 10))

    class Racing:  # encodes like the PIL image, after the other writer got there first
        def save(self, handle, format):
            if not theirs.exists():
                theirs.write_text("the other process's file")
            pixels.save(handle, format=format)

    saved = save_reconstruction(Racing(), tmp_path, tmp_path / "x.jpg", set())
    assert saved == tmp_path / "x.recon-2.png"
    assert theirs.read_text() == "the other process's file"
    assert Image.open(saved).tobytes() == pixels.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.recon-2.png", "x.recon.png"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_under_stdout_is_one_line(model_dir, real_jpegs, tmp_path):
    args = [sys.executable, "-m", "flowae.runtime.cli", "--model", str(model_dir),
            "--provider", "cpu", str(real_jpegs[0])]
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        done = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert done.stderr == ("flowae-infer: error: cannot write the results (No space left on "
                           "device)\n")
