"""`flowae-infer` through click's CliRunner: output formats, exit codes 0/1/2, reconstructions,
progress, and --evaluate."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from flowae.runtime.cli import main
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
        assert set(record) == {"image", "top_k"}
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
    assert [set(r) for r in records] == [{"image", "top_k"}, {"image", "error"},
                                         {"image", "error"}, {"image", "top_k"}]
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
    assert [r["reconstruction"] for r in records] == [str(out_dir / f"{stem}.png"),
                                                      str(out_dir / f"{stem}-2.png")]
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{stem}-2.png", f"{stem}.png"]
    pair = Image.open(out_dir / f"{stem}.png")
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
    assert message in result.stderr
    assert "Traceback" not in result.output
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
        (line,) = lines(result.stderr)
        assert line.startswith("flowae-infer: error: ") and message in line
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
    assert lines(result.stderr) == [f"flowae-infer: error: {tmp_path}: not a Flowers102 folder "
                                    "(no flowers-102/jpg)"]
