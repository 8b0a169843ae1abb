"""What every benchmark script's command line shares: the default data, photo and output
folders, the error a script raises for bad options (printed as one line by its CLI), and
the parser for comma-separated integer lists (--batch-sizes, --threads).

Imports the standard library and the runtime's errors. Nothing outside benchmarks/ imports
this module.
"""

from __future__ import annotations

from pathlib import Path

from flowae.runtime.errors import FlowaeError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA_ROOT = SHARED / "flowers102"  # Flowers102 test split (6149 images, 160 px)
DEFAULT_PHOTOS = SHARED / "flowers102-fullres"  # 306 full-size photos + labels.csv
DEFAULT_OUT = REPO / "runs" / "benchmarks"  # runs/ is git-ignored


class BenchmarkError(FlowaeError):
    """A benchmark was asked for something it cannot do (bad path, conflicting options)."""


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); every value a positive integer."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchmarkError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BenchmarkError(f"{what}: expected integers >= 1, got {text!r}")
    return values

