"""benchmarks.results tabulates real (tiny) training runs and refuses unfinished ones."""

from __future__ import annotations

import json

from click.testing import CliRunner

from benchmarks.results import main


def test_results_table_from_runs(tiny_runs, tmp_path):
    run_dir = tiny_runs["upsample"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "table.md"
    result = CliRunner().invoke(main, [str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
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
    result = CliRunner().invoke(main, [str(tmp_path)])
    assert result.exit_code == 1
    assert "not a finished run" in result.output
    assert "Traceback" not in result.output
