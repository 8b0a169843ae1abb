"""Fuzzing the public loading path (`preprocess`): seeded mutations of small valid JPEG, PNG,
GIF, WebP and TIFF files each end as the model's input or a one-line ImageError naming the file;
never another exception, a hang or a decompression-bomb warning. The generator and the judge
are benchmarks/fuzz_images.py, run here on a short corpus in a child process with a timeout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.fuzz_images import MUTATIONS, cases, dimension_offsets, mutate, seed_images

REPO = Path(__file__).resolve().parents[2]
CASES = 15_000  # about 14 s of CPU (30 s wall on the shared 2-core test machine)


def test_seeds_are_valid_and_their_header_fields_are_found():
    seeds = seed_images(0)
    assert {name.split("-")[0] for name in seeds} == {"jpeg", "png", "gif", "webp", "tiff"}
    for name, data in seeds.items():
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.size == (48, 32), name
        assert dimension_offsets(data), name  # header edits hit real fields, not only noise


def test_mutations_are_seeded_and_change_the_file():
    first = [(c.seed_name, c.mutation, c.data) for c in cases(70, seed=5)]
    assert first == [(c.seed_name, c.mutation, c.data) for c in cases(70, seed=5)]
    assert {mutation for _, mutation, _ in first} == set(MUTATIONS)
    data = seed_images(0)["png"]
    rng = np.random.default_rng(0)
    for kind in MUTATIONS:
        assert mutate(data, kind, rng) != data, kind


def test_mutated_images_are_classified_or_refused_in_one_line(tmp_path):
    out = tmp_path / "fuzz.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fuzz_images", "--cases", str(CASES), "--seed", "0",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and done.returncode == 0, report["failures"][:5]
    assert report["cases"] == CASES and set(report["outcomes"]) == {"ok", "ImageError"}
    for name, counts in report["by_seed"].items():  # every format reaches both outcomes
        assert counts["ok"] > 0 and counts["ImageError"] > 0, (name, counts)
    assert "DecompressionBombWarning" not in report["warnings"]
