"""The helpers every benchmark script shares, on their own: timing statistics and ratios,
option parsing, Markdown rendering, the report writer and the machine header. No model and
no timing claim: each test checks a value that a wrong helper would get wrong."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from benchmarks.machine import NO_CUDA, machine_header, usable_cores
from benchmarks.options import BenchmarkError, parse_int_list
from benchmarks.report import (
    Column,
    Section,
    failed,
    first_line,
    is_ok,
    markdown_table,
    render_markdown,
    write_report,
)
from benchmarks.timing import TimingPlan, gc_paused, latency_stats, ratio, time_calls_ms


def test_latency_stats_are_numpy_percentiles_with_a_prefix():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    stats = latency_stats(samples, prefix="b1_")
    assert stats == {"b1_n": 5, "b1_mean_ms": 3.0, "b1_std_ms": pytest.approx(math.sqrt(2)),
                     "b1_min_ms": 1.0, "b1_p50_ms": 3.0,
                     "b1_p90_ms": pytest.approx(4.6), "b1_p99_ms": pytest.approx(4.96)}
    assert latency_stats([]) == {"n": 0}


def test_ratio_is_none_where_either_side_is_missing_or_zero():
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(None, 3.0) is None and ratio(6.0, None) is None and ratio(6.0, 0.0) is None


def test_time_calls_runs_warmup_untimed_and_stops_at_repeats():
    calls = []
    samples = time_calls_ms(lambda: calls.append(1), TimingPlan(warmup=3, repeats=7,
                                                                 min_repeats=2, budget_s=60.0))
    assert len(calls) == 10 and samples.shape == (7,) and (samples >= 0).all()


def test_time_calls_keeps_min_repeats_when_the_budget_is_spent():
    samples = time_calls_ms(lambda: None, TimingPlan(warmup=0, repeats=50, min_repeats=4,
                                                     budget_s=0.0))
    assert samples.shape == (4,)


def test_gc_paused_restores_the_collector():
    import gc

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.parametrize("text, expected", [("1,8,32", (1, 8, 32)), ("4", (4,)),
                                            (" 2, 3 ,", (2, 3))])
def test_parse_int_list(text, expected):
    assert parse_int_list(text, "--batch-sizes") == expected


@pytest.mark.parametrize("text", ["0,8", "a,b", "", "-1"])
def test_parse_int_list_refuses_in_one_line(text):
    with pytest.raises(BenchmarkError, match="^--threads: expected"):
        parse_int_list(text, "--threads")


def test_row_statuses():
    assert first_line(ValueError("bad file\nmore detail")) == "ValueError: bad file"
    assert first_line(KeyError()) == "KeyError"
    assert failed(OSError("disk full")) == "failed: OSError: disk full"
    assert is_ok({"status": "ok"}) and not is_ok({"status": NO_CUDA}) and not is_ok({})


def test_markdown_table_formats_escapes_and_dashes_missing_values():
    columns = [Column("name", "Name"), Column("ms", "ms", "{:.2f}"), Column("n", "n")]
    rows = [{"name": "a|b", "ms": 1.234, "n": 3}, {"name": "c", "ms": float("nan")}]
    assert markdown_table(rows, columns).splitlines() == [
        "| Name | ms | n |", "|---|---|---|", "| a\\|b | 1.23 | 3 |", "| c | - | - |"]


def test_write_report_writes_json_and_markdown_with_the_header(tmp_path):
    header = machine_header(torch_info=False)
    rows = [{"format": "fp32", "status": "ok", "p50_ms": np.float64(0.5)}]
    section = Section("Rows", rows, [Column("format", "Format"),
                                     Column("p50_ms", "p50 (ms)", "{:.3f}")], ["a note"])
    paths = write_report(tmp_path / "out", "demo", "Demo report", header, rows, [section],
                         extra={"config": {"repeats": 3}})
    report = json.loads(paths["json"].read_text())
    assert report["benchmark"] == "demo" and report["rows"][0]["p50_ms"] == 0.5
    assert report["config"] == {"repeats": 3}
    assert "load_average_1m_at_end" in report["header"]
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Demo report\n")
    assert "## Rows\n\n| Format | p50 (ms) |\n|---|---|\n| fp32 | 0.500 |\n\n- a note\n" in markdown
    assert header["cpu_model"] in markdown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo.json", "demo.md"]


def test_render_markdown_puts_the_intro_before_the_header():
    header = {"cpu_model": "cpu X", "command": "python -m benchmarks.demo"}
    text = render_markdown("T", header, [], intro="Why this report.")
    assert re.match(r"# T\n\nWhy this report\.\n\n- CPU: cpu X", text)
    assert text.endswith("- Command: `python -m benchmarks.demo` at None\n")


def test_machine_header_without_torch_names_this_process():
    header = machine_header(torch_info=False)
    assert header["usable_cores"] == usable_cores() == len(os.sched_getaffinity(0))
    assert "onnxruntime" in header["versions"] and "CPUExecutionProvider" in \
        header["onnxruntime_providers"]
    assert "torch_threads" not in header
