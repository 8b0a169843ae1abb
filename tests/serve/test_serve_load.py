"""A small run of benchmarks/serve_load.py (50 requests, 8 clients, bad uploads mixed in):
with and without micro-batching, no 5xx, no dropped connection, every good upload answered
with the Python runtime's answer, every bad one a 4xx, and grouping seen only when enabled."""

from __future__ import annotations

from benchmarks.serve_load import QUICK, run_load


def test_quick_load_run_has_no_5xx_and_only_right_answers(photos):
    rows = run_load(photos[0].parent, QUICK)
    batched, single, infer = rows
    for row in (batched, single):
        assert row["requests"] == QUICK.requests
        assert row["bad"] == QUICK.requests // QUICK.bad_every
        assert row["status_5xx"] == row["failed_connections"] == 0, row
        assert row["good_not_200"] == row["good_wrong"] == row["bad_not_4xx"] == 0, row
        assert row["server_exit_code"] == 0
    assert single["largest_batch"] == 1
    assert sum(single["batch_sizes"].values()) == QUICK.requests - single["bad"]
    assert sum(k * v for k, v in batched["batch_sizes"].items()) == QUICK.requests - batched["bad"]
    assert infer["good"] == QUICK.photos and infer["images_per_s"] > 0
