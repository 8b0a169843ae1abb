"""Resuming a results folder: a rerun finishes only what is missing, never trusts a file it could
not have written, and refuses a folder of other settings or of other files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flowae.runtime.batch.pipeline import BatchConfig, run_batch
from flowae.runtime.batch.results import MARKER_NAME
from flowae.runtime.batch.storage import BatchError


@pytest.fixture
def results_copy(batch_job, tmp_path) -> Path:
    """A copy of the session job's results folder that a test may damage."""
    out = tmp_path / "results"
    shutil.copytree(batch_job[1], out)
    return out


@pytest.fixture
def sources(fullres_root, broken_dir) -> list[Path]:
    return [fullres_root / "jpg", broken_dir]


def config(out: Path, **changes) -> BatchConfig:
    return BatchConfig(out=str(out), actors=2, threads=1, rows_per_file=64, **changes)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_rerun_after_deleting_part_of_the_output_finishes_only_the_rest(
        ray_session, results_copy, sources, inputs, read_rows):
    deleted = sorted(results_copy.glob("part-*.parquet"))[1:3]
    lost = {row["image"]: row for row in read_rows(names=deleted)}
    for path in deleted:
        path.unlink()
    # What a job killed mid-write leaves: a hidden temp file, never read as results.
    (results_copy / ".part-killed-00009.parquet.x1y2z3.tmp").write_bytes(b"PAR1 half a file")
    summary = run_batch(sources, config(results_copy))
    assert summary.processed == len(lost) and summary.skipped == len(inputs) - len(lost)
    redone = read_rows(names=summary.files)
    assert sorted(row["image"] for row in redone) == sorted(lost)  # only the missing ones
    for row in redone:
        before = lost[row["image"]]
        assert (row["labels"], row["error"]) == (before["labels"], before["error"])
        assert row["probabilities"] == pytest.approx(before["probabilities"], abs=1e-9)
    assert sorted(row["image"] for row in read_rows(results_copy)) == sorted(inputs)


def test_a_finished_folder_is_left_alone(results_copy, sources, inputs):
    before = listing(results_copy)
    summary = run_batch(sources, config(results_copy))
    assert (summary.processed, summary.skipped, summary.files) == (0, len(inputs), [])
    assert (summary.failed, summary.failed_before) == (0, 3)
    assert listing(results_copy) == before


@pytest.mark.parametrize(("change", "named"), [({"top_k": 3}, "top_k"),
                                               ({"format": "jsonl"}, "format"),
                                               ({"precision": "fp32"}, "model_sha256")])
def test_other_settings_are_refused(results_copy, sources, change, named):
    before = listing(results_copy)
    with pytest.raises(BatchError, match=f"other settings: .*{named}"):
        run_batch(sources, config(results_copy, **change))
    assert listing(results_copy) == before


def test_a_part_file_that_does_not_read_back_is_refused(results_copy, sources):
    part = sorted(results_copy.glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:200])  # a half-written file, as a crash would leave it
    with pytest.raises(BatchError, match=f"{part.name}: not a results file this command wrote"):
        run_batch(sources, config(results_copy))


def test_a_folder_of_other_files_is_refused(tmp_path, sources):
    (tmp_path / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(BatchError, match=f"no {MARKER_NAME}"):
        run_batch(sources, config(tmp_path))
    assert listing(tmp_path) == {"holiday.jpg": b"mine"}
    with pytest.raises(BatchError, match="not a folder"):
        run_batch(sources, config(tmp_path / "holiday.jpg"))
