"""benchmarks.results tabulates real (tiny) training runs and refuses unfinished ones.

Run as a script, the way users run it: nothing imports benchmarks."""

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
