"""One flowae-batch job over the 306 full-size photos and three broken files: one row per input,
errors as rows, and the same answers as flowae-infer --json (the real CLI on the same files)."""

from __future__ import annotations

import math

import pytest

from flowae.runtime.batch.results import COLUMNS


@pytest.fixture(scope="module")
def rows(batch_job, read_rows) -> list[dict]:
    return read_rows(batch_job[1])


def test_every_input_has_exactly_one_row(rows, inputs):
    images = [row["image"] for row in rows]
    assert sorted(images) == sorted(inputs)
    assert all(list(row) == list(COLUMNS) for row in rows)


def test_the_summary_counts_what_the_folder_holds(batch_job, inputs, rows_per_file):
    summary, out = batch_job
    assert (summary.inputs, summary.processed, summary.skipped) == (len(inputs), len(inputs), 0)
    assert (summary.failed, summary.failed_before) == (3, 0)
    assert len(summary.files) == math.ceil(len(inputs) / rows_per_file)
    assert sorted(str(p) for p in out.glob("part-*.parquet")) == sorted(summary.files)


def test_broken_files_are_rows_with_an_error(rows, broken_dir):
    failed = {row["image"]: row for row in rows if row["error"] is not None}
    assert sorted(failed) == sorted(str(p) for p in broken_dir.iterdir())
    for image, row in failed.items():
        assert row["error"].startswith(image) and "\n" not in row["error"]
        assert row["labels"] == row["class_names"] == row["probabilities"] == []
    assert "empty file" in failed[str(broken_dir / "empty.jpg")]["error"]


def test_predictions_equal_flowae_infer_json(rows, infer_json):
    assert sorted(row["image"] for row in rows) == sorted(infer_json)
    for row in rows:
        expected = infer_json[row["image"]]
        if row["error"] is not None:
            assert expected["error"] == row["error"]
            continue
        top_k = expected["top_k"]
        assert row["labels"] == [p["label"] for p in top_k]  # top-1 and the rest, in order
        assert row["class_names"] == [p["class_name"] for p in top_k]
        assert row["probabilities"] == pytest.approx([p["probability"] for p in top_k], abs=1e-6)
