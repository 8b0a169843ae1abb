"""benchmarks.results tabulates real (tiny) training runs and refuses unfinished ones.

Run as a script, the way users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def results(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.results", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, check=False)


def test_results_table_from_runs(tiny_runs, tmp_path):
    run_dir = tiny_runs["upsample"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "table.md"
    done = results(run_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert done.stdout.splitlines() == lines
    assert lines[0].startswith("| variant | test top-1 %")
    assert len(lines) == 3  # header, rule, one run
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "upsample"
    assert float(cells[1]) == round(metrics["test"]["top1"], 2)
    assert cells[5] == f"{metrics['parameters']:,}"
    assert cells[6] == "1+1"
    rows = json.loads(out.with_suffix(".json").read_text())
    assert rows[0]["test_top5"] == metrics["test"]["top5"]


def test_results_refuses_unfinished_run(tmp_path):
    done = results(tmp_path)
    assert done.returncode == 1
    assert "not a finished run" in done.stderr
    assert "Traceback" not in done.stderr


def test_command_column_reproduces_the_runs_training_options(fake_root, tmp_path):
    """A run of res16 with options off its recipe: the rebuilt command, run for one epoch,
    saves the same TrainConfig (device aside)."""
    from flowae.config import RECIPES

    config = {**RECIPES["modern"].to_dict(), "cls_epochs": 200, "cutmix": 0.5, "bf16": False,
              "device": "cpu"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    history = {"ae": [], "cls": [{"val_top1": 40.0}], "dec": []}
    (run_dir / "metrics.json").write_text(json.dumps({
        "variant": "res16", "train_config": config, "history": history, "parameters": 1,
        "test": {"top1": 1.0, "top5": 2.0, "recon_mse": 0.1}, "train_seconds": 60.0,
        "data_load_seconds": 1.0, "device": "cpu"}))
    done = results(run_dir)
    assert done.returncode == 0, done.stderr
    command = done.stdout.splitlines()[2].split("`")[1]
    assert command == (f"flowae-train --variant res16 --data-root DATA --out {run_dir} "
                       "--cls-epochs 200 --set bf16=false --set cutmix=0.5")
    replay = tmp_path / "replay"
    args = command.replace("DATA", str(fake_root)).replace(str(run_dir), str(replay)).split()[1:]
    trained = subprocess.run([sys.executable, "-m", "flowae.cli", *args, "--device", "cpu",
                              "--stop-after-epochs", "1", "--no-progress"],
                             cwd=REPO, capture_output=True, text=True, check=False)
    assert trained.returncode == 0, trained.stderr
    from flowae.checkpoint import load_checkpoint

    assert load_checkpoint(replay)["train_config"] == config


def test_a_run_that_trained_on_val_shows_no_val_figure_and_plots(tiny_runs, tmp_path):
    from flowae.config import RECIPES

    trained_on_val = tmp_path / "trainval"
    trained_on_val.mkdir()
    config = {**RECIPES["modern"].to_dict(), "cls_images": "train+val"}
    (trained_on_val / "metrics.json").write_text(json.dumps({
        "variant": "res16", "train_config": config, "parameters": 1,
        "history": {"ae": [], "cls": [{"epoch": 1, "train_top1": 5.0}], "dec": []},
        "test": {"top1": 3.0, "top5": 9.0, "recon_mse": 0.1}, "train_seconds": 60.0,
        "data_load_seconds": 1.0, "device": "cpu"}))
    picture = tmp_path / "runs.png"
    done = results(tiny_runs["upsample"], trained_on_val, "--plot", picture)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[2:]
    assert [row.split("|")[4].strip() for row in rows][1] == "trained on val"
    assert "--set cls_images=train+val" in rows[1]
    assert "nan" not in rows[0]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
