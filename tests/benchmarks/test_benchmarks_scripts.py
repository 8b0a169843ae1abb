"""Each benchmark script runs on a tiny model at its smallest settings and writes well-formed
JSON, Markdown and (where it has one) a PNG plot with the rows it promises. Benchmarks are not
tests: nothing here looks at how fast anything was, only at what was written. The scripts run
as child processes, as a user runs them (`python -m benchmarks.NAME` or as a file)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("latency", "end_to_end", "cold_start", "accuracy", "flowers_view", "fast_kernels")
HEADER_KEYS = ("cpu_model", "logical_cores", "usable_cores", "versions", "started_at",
               "command", "onnxruntime_providers", "load_average_1m_at_start")
NO_CUDA = "skipped: no CUDA device"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def ran(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of a Markdown text as rows of cells (header and separator included)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            current.append([c.strip() for c in cells])
        elif current:
            tables.append(current)
            current = []
    return tables


def read_report(out: Path, name: str, plot: bool) -> tuple[dict, str]:
    """Load NAME.json and NAME.md, check their shape (and the PNG), return them."""
    report = json.loads((out / f"{name}.json").read_text())
    assert report["benchmark"] == name
    header = report["header"]
    for key in HEADER_KEYS:
        assert header.get(key) not in (None, "", []), key
    for package in ("onnxruntime", "numpy"):
        assert package in header["versions"]
    assert isinstance(report["rows"], list) and report["rows"]
    assert all(isinstance(row.get("status"), str) and row["status"] for row in report["rows"])
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith(f"# {report['title']}\n")
    assert header["cpu_model"] in markdown
    tables = markdown_tables(markdown)
    assert tables
    for table in tables:
        assert len(table) >= 3  # header, separator, at least one row
        assert set(table[1]) == {"---"}
        assert all(len(row) == len(table[0]) for row in table)
    png = out / f"{name}.png"
    if plot:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        from PIL import Image

        with Image.open(png) as image:
            assert image.width > 100 and image.height > 100
    return report, markdown


# ----------------------------------------------------------------------------- each script
@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    done = ran(run_script(name, "--help"))
    assert "Usage:" in done.stdout and "--out" in done.stdout


LATENCY_FORMATS = [
    ("PyTorch eager fp32", "cpu", 1), ("onnxruntime fp32 (plain export)", "cpu", 1),
    ("onnxruntime fp32", "cpu", 1), ("onnxruntime int8", "cpu", 1),
    ("PyTorch eager fp32", "cuda", None), ("onnxruntime fp32", "cuda", None),
    ("onnxruntime fp16", "cuda", None),
]


def test_latency_run_and_model_dir(tiny_runs, bench_model, tmp_path):
    out = tmp_path / "out"
    ran(run_script("latency", "--run", tiny_runs["upsample"], "--model-dir", bench_model,
                   "--quick", "--out", out))
    report, markdown = read_report(out, "latency", plot=True)
    rows = report["rows"]
    graphs = ["encoder_classifier (upsample)", "decoder (upsample)"]
    assert list(dict.fromkeys(r["graph"] for r in rows)) == graphs
    for graph in graphs:
        assert f"## {graph}" in markdown
        mine = [r for r in rows if r["graph"] == graph]
        assert [(r["format"], r["device"], r["threads"]) for r in mine] == LATENCY_FORMATS
        for row in mine:
            if row["device"] == "cuda" and not cuda_present():
                assert row["status"] == NO_CUDA
            elif row["device"] == "cpu":
                assert row["status"] == "ok", row
                assert 0 < row["p50_ms"] <= row["p99_ms"]
                assert row["n"] >= 2 and row["ips_b1"] > 0 and row["ips_b8"] > 0
                assert row["create_ms"] > 0 and row["first_ms"] > 0 and row["size_mb"] > 0
        eager = mine[0]
        assert eager["speedup_p50"] == 1.0 and eager["speedup_ips_b8"] == 1.0
        assert mine[2]["speedup_p50"] == pytest.approx(eager["p50_ms"] / mine[2]["p50_ms"])
        assert mine[2]["speedup_ips_b8"] == pytest.approx(mine[2]["ips_b8"] / eager["ips_b8"])
    assert report["config"]["batch_sizes"] == [1, 8]
    assert "## Targets\n" in markdown


@pytest.mark.slow
def test_latency_fresh_variant_exports_on_the_fly(fake_root, tmp_path):
    out = tmp_path / "out"
    ran(run_script("latency", "--variant", "base", "--role", "decoder", "--quick",
                   "--no-int8", "--no-fp16", "--no-plain-export", "--batch-sizes", "1",
                   "--data-root", fake_root, "--out", out))
    report, _ = read_report(out, "latency", plot=True)
    rows = {(r["format"], r["device"]): r for r in report["rows"]}
    assert {r["graph"] for r in report["rows"]} == {"decoder (base)"}
    assert rows["PyTorch eager fp32", "cpu"]["status"] == "ok"
    assert rows["onnxruntime fp32", "cpu"]["status"] == "ok"
    assert rows["onnxruntime int8", "cpu"]["status"] == "skipped: export wrote no decoder.int8.onnx"
    assert rows["onnxruntime fp32 (plain export)", "cpu"]["status"] == "skipped: --no-plain-export"
    assert "fresh weights, seed 0" in rows["onnxruntime fp32", "cpu"]["source"]


def test_end_to_end(bench_model, photos_dir, tmp_path):
    out = tmp_path / "out"
    ran(run_script("end_to_end", "--model", bench_model, "--photos", photos_dir, "--quick",
                   "--batch-sizes", "1,2", "--out", out))
    report, markdown = read_report(out, "end_to_end", plot=True)
    rows = report["rows"]
    keys = [(r["decode"], r["batch"], r["path"]) for r in rows]
    assert keys == [(d, b, p) for d in ("full", "draft") for b in (1, 2)
                    for p in ("Predictor API", "stages (serial)")]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["images"] == 4 and row["images_per_s"] > 0 and row["mean_ms"] > 0
        if row["path"] == "stages (serial)":
            shares = [row[f"{s}_pct"] for s in ("decode", "preprocess", "model", "topk")]
            assert sum(shares) == pytest.approx(100.0)
            assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
        elif row["batch"] == 1:
            assert 0 < row["p50_ms"] <= row["p99_ms"] and row["create_ms"] > 0
    assert "Where the time goes" in markdown and "Target: p50 <= 2 ms" in markdown


def test_cold_start(bench_model, photos_dir, tmp_path):
    out = tmp_path / "out"
    photo = photos_dir / "jpg" / "photo_0.jpg"
    ran(run_script("cold_start", "--model", bench_model, "--photo", photo, "--repeats", "1",
                   "--no-torch-reference", "--out", out))
    report, markdown = read_report(out, "cold_start", plot=False)
    rows = {r["row"]: r for r in report["rows"]}
    infer = rows["flowae-infer photo_0.jpg --model MODEL"]
    assert infer["status"] == "ok" and infer["first_ms"] > 0 and infer["n"] == 1
    assert rows["import flowae.runtime.cli"]["status"] == "ok"
    assert rows["import torch (reference, not used by the runtime)"]["status"].startswith(
        "skipped")
    (check,) = report["checks"]
    assert check["status"] == "ok: torch not imported" and check["forbidden_loaded"] == "none"
    packages = {r["package"] for r in report["import_breakdown"]}
    assert {"numpy", "onnxruntime"} <= packages
    assert "Runtime imports no torch" in markdown


ACCURACY_FORMATS = [
    "PyTorch eager (CPU)", "ONNX fp32 (onnxruntime CPU)", "ONNX int8 (onnxruntime CPU)",
    "PyTorch eager (CUDA)", "ONNX fp32 (onnxruntime CUDA)", "ONNX fp16 (onnxruntime CUDA)",
]


def test_accuracy(tiny_runs, bench_model, fake_root, tmp_path):
    out = tmp_path / "out"
    ran(run_script("accuracy", "--run", tiny_runs["upsample"], "--model-dir", bench_model,
                   "--data-root", fake_root, "--quick", "--out", out))
    report, markdown = read_report(out, "accuracy", plot=True)
    rows = report["rows"]
    assert [r["format"] for r in rows] == ACCURACY_FORMATS
    for row in rows:
        if row["device"] == "cpu":
            assert row["status"] == "ok", row
            assert row["images"] == 10  # the fake test split
            assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
            assert row["ms_per_image"] > 0 and row["size_mb"] > 0
        elif not cuda_present():
            assert row["status"] == NO_CUDA
    assert rows[0]["speedup_vs_eager"] == 1.0 and rows[0]["top1_agree_pct"] == 100.0
    assert rows[2]["size_mb"] < rows[1]["size_mb"]  # int8 weights are smaller
    assert "| Format | Status | Size (MB) | test top-1 % |" in markdown


def test_a_format_that_fails_is_a_row(bench_model, fake_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bench_model, broken)
    (broken / "encoder_classifier.int8.onnx").write_bytes(b"not an onnx file")
    out = tmp_path / "out"
    ran(run_script("accuracy", "--model-dir", broken, "--data-root", fake_root, "--quick",
                   "--out", out))
    report, _ = read_report(out, "accuracy", plot=True)
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["PyTorch eager (CPU)"]["status"] == "skipped: no checkpoint (give --run)"
    assert rows["ONNX fp32 (onnxruntime CPU)"]["status"] == "ok"
    assert rows["ONNX int8 (onnxruntime CPU)"]["status"].startswith("failed: ")
    assert "encoder_classifier.int8.onnx" in rows["ONNX int8 (onnxruntime CPU)"]["status"]


def test_flowers_view_links_every_train_and_val_image(fake_root, tmp_path):
    from benchmarks.flowers_view import class_folder
    from flowae.runtime.datasets import flowers102_split

    view, out = tmp_path / "view", tmp_path / "out"
    done = ran(run_script("flowers_view", fake_root, view, "--every", "1", "--classes", "102",
                          "--out", out))
    expected = {}
    for split in ("train", "val"):
        paths, labels = flowers102_split(fake_root, split)
        for path, label in zip(paths, labels, strict=True):
            expected[view / split / class_folder(label) / path.name] = path
    links = sorted(p for p in view.rglob("*") if not p.is_dir())
    assert links == sorted(expected)
    for link, source in expected.items():
        assert link.is_symlink() and link.resolve() == source.resolve()
        assert link.read_bytes() == source.read_bytes()
    report, markdown = read_report(out, "flowers_view", plot=False)
    assert [r["label"] for r in report["rows"]] == list(range(102))
    assert report["totals"] == {"train": 12, "val": 8}  # FAKE_SPLIT_SIZES of tests/conftest.py
    table = markdown_tables(done.stdout)[0]
    assert len(table) == 2 + 102 and table[0][:2] == ["label", "class"]
    # A second run never writes into the view it made: one line, exit 1, links untouched.
    again = run_script("flowers_view", fake_root, view)
    assert again.returncode == 1 and "not an empty folder" in again.stderr
    assert sorted(p for p in view.rglob("*") if not p.is_dir()) == links


def test_flowers_view_takes_only_the_chosen_classes(fake_root, tmp_path):
    from benchmarks.flowers_view import build_view, class_folder, every_nth_label
    from flowae.runtime.datasets import flowers102_split

    assert every_nth_label(10, 10) == tuple(range(0, 100, 10))
    paths, labels = flowers102_split(fake_root, "train")
    chosen = sorted(set(labels))[:2]
    rows = build_view(fake_root, tmp_path / "view", chosen)
    assert [(r["label"], r["train"]) for r in rows] == [(c, labels.count(c)) for c in chosen]
    linked = {p.name for p in (tmp_path / "view" / "train").rglob("*.jpg")}
    assert linked == {p.name for p, label in zip(paths, labels, strict=True) if label in chosen}
    assert sorted(p.name for p in (tmp_path / "view" / "train").iterdir()) == sorted(
        class_folder(c) for c in chosen)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "view"]  # no scratch folder left behind


def test_fast_kernels_times_both_phases(tmp_path):
    out = tmp_path / "out"
    done = ran(run_script("fast_kernels", "--variant", "upsample", "--threads", "1",
                          "--steps", "1", "--batch", "4", "--out", out))
    report, markdown = read_report(out, "fast_kernels", plot=False)
    rows = report["rows"]
    assert [(r["variant"], r["threads"], r["phase"]) for r in rows] == [
        ("upsample", 1, "ae"), ("upsample", 1, "cls")]
    for row in rows:
        assert row["status"] == "ok" and row["plain_s"] > 0 and row["fast_s"] > 0
        assert row["plain_over_fast"] == pytest.approx(row["plain_s"] / row["fast_s"])
    for text in (done.stdout, markdown):
        table = markdown_tables(text)[0]
        assert [row[2] for row in table[2:]] == ["ae", "cls"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name, args, expected", [
    ("latency", ["--model-dir", "{tmp}/missing"], "not a model directory"),
    ("latency", ["--batch-sizes", "0,8"], "--batch-sizes"),
    ("latency", ["--run", "{tmp}", "--quick"], "no such checkpoint"),
    ("end_to_end", ["--photos", "{tmp}/missing", "--model", "{tmp}"], "labels.csv"),
    ("end_to_end", ["--model", "{tmp}", "--variant", "upsample"], "at most one of"),
    ("cold_start", ["--photo", "{tmp}/missing.jpg"], "no such file"),
    ("accuracy", [], "give a model"),
    ("flowers_view", ["{tmp}/missing", "{tmp}/view"], "Flowers102 not found"),
    ("flowers_view", ["{tmp}", "{tmp}/view", "--every", "20", "--classes", "7"],
     "the last label would be 120"),
])
def test_bad_input_is_one_line_and_nonzero(name, args, expected, tmp_path):
    done = run_script(name, *[a.format(tmp=tmp_path) for a in args], "--out", tmp_path / "out")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_package_never_imports_benchmarks():
    """benchmarks/ stands above the package: flowae, the runtime and export never import it
    (tests may, to check the helpers themselves)."""
    pattern = re.compile(r"^\s*(from|import)\s+benchmarks\b", re.MULTILINE)
    for folder in ("flowae", "runtime", "export"):
        for path in (REPO / folder).rglob("*.py"):
            assert not pattern.search(path.read_text()), path
