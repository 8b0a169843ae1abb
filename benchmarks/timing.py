"""How the benchmarks time a call: warm up untimed, then time each call with
time.perf_counter while the garbage collector is paused, and summarise a series as
n/mean/std/min/p50/p90/p99 in milliseconds; ratios between two such numbers.

Imports the standard library and numpy. Nothing outside benchmarks/ imports this module.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one case: warm up, then repeat until `repeats` or the time budget."""

    warmup: int = 10  # untimed calls first (allocations, caches, onnxruntime's arenas)
    repeats: int = 200  # timed calls at most
    min_repeats: int = 5  # timed calls at least, even when that overruns the budget
    budget_s: float = 2.0  # stop timing once this much has been spent (after min_repeats)


class gc_paused:
    """Context manager: no garbage collection inside a timed region (it would be noise)."""

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc_info):
        if self.was_enabled:
            gc.enable()
        return False


def time_once_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_calls_ms(fn: Callable[[], object], plan: TimingPlan) -> np.ndarray:
    """Per-call wall times in ms of `fn()` after `plan.warmup` untimed calls."""
    for _ in range(plan.warmup):
        fn()
    samples: list[float] = []
    with gc_paused():
        spent = 0.0
        while len(samples) < plan.repeats and (
            len(samples) < plan.min_repeats or spent < plan.budget_s
        ):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            samples.append(elapsed * 1e3)
            spent += elapsed
    return np.asarray(samples)


def latency_stats(samples_ms: Sequence[float] | np.ndarray, prefix: str = "") -> dict:
    """n, mean, std, min, p50, p90, p99 (ms) of a series, keys prefixed with `prefix`."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        return {f"{prefix}n": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        f"{prefix}n": int(values.size),
        f"{prefix}mean_ms": float(values.mean()),
        f"{prefix}std_ms": float(values.std()),
        f"{prefix}min_ms": float(values.min()),
        f"{prefix}p50_ms": float(p50),
        f"{prefix}p90_ms": float(p90),
        f"{prefix}p99_ms": float(p99),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator

