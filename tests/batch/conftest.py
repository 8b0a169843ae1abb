"""Batch fixtures: one local Ray (2 CPUs) per session, the 306 full-size photos plus three broken
files, one flowae-batch job over them (2 actors, small part files) and flowae-infer --json's
answers for the same files, from the real CLI in a subprocess. All use the bundled model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

ROWS_PER_FILE = 64  # 309 inputs -> 5 part files, so a test can delete some of them


@pytest.fixture(scope="session")
def ray_session():
    """Ray on this machine for the whole session; run_batch finds it running and keeps it."""
    ray = pytest.importorskip("ray", reason="the [distributed] extra (ray[data]) is missing")
    pytest.importorskip("ray.data", reason="the [distributed] extra (ray[data]) is missing")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos(fullres_root) -> list[Path]:
    found = sorted((fullres_root / "jpg").glob("*.jpg"))
    assert len(found) == 306, f"expected 306 photos in {fullres_root / 'jpg'}, found {len(found)}"
    return found


@pytest.fixture(scope="session")
def broken_dir(tmp_path_factory, photos) -> Path:
    """An empty file, a truncated JPEG and a text file, each named .jpg."""
    folder = tmp_path_factory.mktemp("broken")
    (folder / "empty.jpg").write_bytes(b"")
    data = photos[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "not_an_image.jpg").write_text("these are words, not pixels\n")
    return folder


@pytest.fixture(scope="session")
def inputs(photos, broken_dir) -> list[str]:
    """Every input's absolute path, as the results' `image` column names it."""
    return [str(p) for p in photos] + [str(p) for p in sorted(broken_dir.iterdir())]


def _read_rows(out: Path | None = None, names=None) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(names or out.glob("part-*")):
        path = Path(path)
        if path.suffix == ".parquet":
            rows += pq.read_table(path).to_pylist()
        else:
            rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


@pytest.fixture(scope="session")
def read_rows():
    """read_rows(out) or read_rows(names=[...]): the rows of a results folder's part files (or
    of these files), Parquet or JSON lines. A fixture, not an import: `from conftest import`
    can resolve to another folder's conftest.py when the whole suite runs."""
    return _read_rows


@pytest.fixture(scope="session")
def rows_per_file() -> int:
    return ROWS_PER_FILE


@pytest.fixture(scope="session")
def batch_job(ray_session, tmp_path_factory, fullres_root, broken_dir):
    """(summary, results folder) of one job over the photos folder and the broken folder."""
    from flowae.runtime.batch.pipeline import BatchConfig, run_batch

    out = tmp_path_factory.mktemp("batch") / "results"
    config = BatchConfig(out=str(out), actors=2, threads=1, rows_per_file=ROWS_PER_FILE)
    summary = run_batch([fullres_root / "jpg", broken_dir], config)
    return summary, out


@pytest.fixture(scope="session")
def infer_json(fullres_root, broken_dir) -> dict[str, dict]:
    """image -> the object `flowae-infer --json` prints for it (the real CLI, same files)."""
    command = [sys.executable, "-m", "flowae.runtime.cli", "--json", "--provider", "cpu",
               str(fullres_root / "jpg"), str(broken_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1, done.stderr  # the three broken files fail
    records = [json.loads(line) for line in done.stdout.splitlines() if line]
    return {record["image"]: record for record in records}
