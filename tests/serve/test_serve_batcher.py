"""The MicroBatcher on its own, on a real event loop and thread pool: grouping up to
max_batch, back-pressure, a failing batch reaching every caller, cancelled callers dropped,
and close() answering everything already submitted."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from flowae.runtime.serve.batching import Busy, Closing, MicroBatcher

LONG_WAIT_MS = 60_000  # batches form by size or by close(), never by this timer


def _batcher(pool, process=None, **options) -> MicroBatcher:
    settings = {"max_batch": 4, "max_wait_ms": LONG_WAIT_MS, "max_queue": 16, **options}
    return MicroBatcher(process or (lambda items: [item * 10 for item in items]), pool,
                        **settings)


async def _submit(batcher: MicroBatcher, item):
    with batcher.slot() as slot:
        return await slot.submit(item)


def test_groups_up_to_max_batch_and_close_flushes_the_rest():
    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool)
            batcher.start()
            tasks = [asyncio.create_task(_submit(batcher, i)) for i in range(6)]
            await asyncio.sleep(0)  # one turn of the loop (no waiting): each task queues
            first_four = await asyncio.gather(*tasks[:4])
            await batcher.close()
            return first_four + [await task for task in tasks[4:]], batcher.stats

    results, stats = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50]
    assert stats.sizes == {4: 1, 2: 1}
    assert stats.to_dict()["largest_batch"] == 4


def test_full_queue_and_closing_refuse_new_work():
    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool, max_queue=2)
            batcher.start()
            held = [batcher.slot(), batcher.slot()]
            with pytest.raises(Busy):
                batcher.slot()
            held[0].release()
            batcher.slot().release()  # a released place is free again
            held[1].release()
            await batcher.close()
            with pytest.raises(Closing):
                batcher.slot()
            return batcher.stats.rejected_busy

    assert asyncio.run(scenario()) == 1


def test_a_failing_batch_fails_each_caller_and_the_loop_goes_on():
    calls = []

    def process(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("model call failed")
        return items

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool, process, max_batch=2)
            batcher.start()
            failing = [asyncio.create_task(_submit(batcher, x)) for x in ("bad", "ok")]
            outcomes = await asyncio.gather(*failing, return_exceptions=True)
            later = await asyncio.gather(*(_submit(batcher, x) for x in ("a", "b")))
            await batcher.close()
            return outcomes, later

    outcomes, later = asyncio.run(scenario())
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert later == ["a", "b"]
    assert calls == [["bad", "ok"], ["a", "b"]]


def test_a_cancelled_caller_is_dropped_before_its_batch_runs():
    seen = []

    def process(items):
        seen.extend(items)
        return items

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(pool, process)
            batcher.start()
            gone = asyncio.create_task(_submit(batcher, "timed out"))
            kept = asyncio.create_task(_submit(batcher, "kept"))
            await asyncio.sleep(0)
            gone.cancel()
            await batcher.close()
            return await kept, batcher.stats

    kept, stats = asyncio.run(scenario())
    assert kept == "kept" and seen == ["kept"]
    assert stats.dropped_cancelled == 1 and stats.items == 1
