"""Dynamic micro-batching: concurrent requests share one model call.

A request first takes a `Slot` (refused with `Busy` when `max_queue` images already wait:
the server's back-pressure), decodes its image off the event loop, then submits it. The
batcher's loop takes the oldest waiting item, waits at most `max_wait_ms` from that item's
arrival for up to `max_batch` items, and runs `process(items)` once on the given executor (one
model thread, so model calls never overlap and each sees a full batch); while it runs, the next
batch gathers. A cancelled request (timed out, or its client left) is dropped before its
batch runs. `close()` stops admission and lets every submitted item finish. Standard library
and the runtime's errors only: it knows nothing of HTTP or models.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from flowae.runtime.errors import FlowaeError


class Busy(FlowaeError):
    """Too many images are waiting: the caller should retry later (HTTP 503)."""


class Closing(FlowaeError):
    """The server is shutting down and takes no new work (HTTP 503)."""


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    arrived_s: float  # time.monotonic() at submit
    slot: Slot  # released when the job leaves the queue


@dataclass
class BatchStats:
    """What the batcher has done so far; `sizes` maps a batch size to how many ran."""

    batches: int = 0
    items: int = 0
    rejected_busy: int = 0
    dropped_cancelled: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "batches": self.batches,
            "images": self.items,
            "largest_batch": max(self.sizes, default=0),
            "batch_sizes": {str(size): n for size, n in sorted(self.sizes.items())},
            "rejected_busy": self.rejected_busy,
            "dropped_cancelled": self.dropped_cancelled,
        }


class Slot:
    """One admitted image: holds a place in the queue from admission until its batch runs."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._reserved -= 1

    async def submit(self, item: Any) -> Any:
        """Queue `item`; return what `process` gave for it (or raise what it raised)."""
        return await self._batcher._submit(item, self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class MicroBatcher:
    """Groups items submitted from many coroutines into calls of `process(items) -> results`.

    process: runs on `executor`, takes a list of items, returns one result per item (an
    exception fails the whole batch). max_batch: items per call. max_wait_ms: how long the
    oldest waiting item may wait for company. max_queue: images admitted and not yet in a
    running batch (decoding or waiting); one more is refused with Busy.
    """

    def __init__(self, process: Callable[[list[Any]], Sequence[Any]], executor: Executor, *,
                 max_batch: int, max_wait_ms: float, max_queue: int):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise FlowaeError(f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, got "
                              f"{max_batch}, {max_queue}, {max_wait_ms}")
        self.process = process
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._reserved = 0  # slots held: admitted images not yet taken into a batch
        self._running = 0  # items in the model call now
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def waiting(self) -> int:
        return self._reserved

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="flowae-batcher")

    def slot(self) -> Slot:
        """Admit one image, or raise Busy (queue full) or Closing (shutting down)."""
        if self._closing:
            raise Closing("the server is shutting down")
        if self._reserved >= self.max_queue:
            self.stats.rejected_busy += 1
            raise Busy(f"server busy: {self._reserved} images are waiting "
                       f"(at most {self.max_queue}); retry shortly")
        self._reserved += 1
        return Slot(self)

    async def _submit(self, item: Any, slot: Slot) -> Any:
        if self._task is None:
            raise FlowaeError("the batcher was not started")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(item, future, time.monotonic(), slot))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Refuse new slots, run everything already submitted, stop the loop."""
        self._closing = True
        if self._task is None:
            return
        self._wake.set()
        await self._task

    def _take(self) -> list[_Job]:
        """Pop up to max_batch live jobs; cancelled ones (timed out) are dropped here."""
        batch: list[_Job] = []
        while self._queue and len(batch) < self.max_batch:
            job = self._queue.popleft()
            job.slot.release()
            if job.future.done():
                self.stats.dropped_cancelled += 1
            else:
                batch.append(job)
        return batch

    async def _gather(self) -> None:
        """Wait until max_batch jobs wait, or the oldest has waited max_wait_s, or closing."""
        deadline = self._queue[0].arrived_s + self.max_wait_s
        while len(self._queue) < self.max_batch and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            self._running = len(batch)
            try:
                results = await loop.run_in_executor(
                    self.executor, self.process, [job.item for job in batch])
            except Exception as exc:  # the whole batch failed: every caller hears why
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
            finally:
                self._running = 0
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
