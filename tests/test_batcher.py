"""The dynamic batcher on its own: batches form from concurrent submissions, never exceed their
limit, keep each item's result with its item, pass errors on, and drain on stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from captioner.batcher import Batcher, ShuttingDown


class Recorder:
    """process(): squares, noting each batch and the thread it ran on; slow enough that items
    submitted meanwhile queue up."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.seconds = seconds

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        return [item * item for item in items]


async def submit_all(batcher: Batcher, groups: list[list[int]]) -> list[tuple[list, int]]:
    return await asyncio.gather(*(batcher.submit(group) for group in groups))


def test_concurrent_items_form_batches_up_to_the_limit():
    process = Recorder()
    batcher = Batcher(process, max_batch=4, max_wait=0.05)
    batcher.start()
    try:
        answers = asyncio.run(submit_all(batcher, [[n] for n in range(10)] + [[20, 21, 22]]))
    finally:
        batcher.stop()
    assert [results for results, _ in answers] == [[n * n] for n in range(10)] + [[400, 441, 484]]
    sizes = [len(batch) for batch in process.batches]
    assert max(sizes) == 4 and sum(sizes) == 13  # batched, never above max_batch
    assert sorted(item for batch in process.batches for item in batch) == [*range(10), 20, 21, 22]
    assert process.threads == {"batcher"}  # only the worker thread ever processes
    for _, size in answers:  # each answer names a batch its items were really in
        assert size in sizes
    stats = batcher.stats()
    assert (stats["batches"], stats["items"], stats["largest_batch"]) == (len(sizes), 13, 4)
    assert stats["mean_batch_size"] == pytest.approx(13 / len(sizes))
    assert sum(stats["batch_sizes"].values()) == len(sizes)
    assert stats["busy_seconds"] >= 0.02 * len(sizes)  # each batch slept 20 ms in process()


def test_max_batch_one_turns_batching_off():
    process = Recorder(seconds=0)
    batcher = Batcher(process, max_batch=1, max_wait=0.05)
    batcher.start()
    try:
        answers = asyncio.run(submit_all(batcher, [[n] for n in range(6)]))
    finally:
        batcher.stop()
    assert [len(batch) for batch in process.batches] == [1] * 6
    assert {size for _, size in answers} == {1}


def test_a_failing_batch_fails_its_requests_and_the_worker_carries_on():
    def process(items: list[int]) -> list[int]:
        if -1 in items:
            raise RuntimeError("no negative numbers")
        return items

    batcher = Batcher(process, max_batch=8, max_wait=0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="no negative numbers"):
            asyncio.run(batcher.submit([1, -1]))
        assert asyncio.run(batcher.submit([5])) == ([5], 1)
    finally:
        batcher.stop()


def test_a_request_whose_event_loop_closed_does_not_stop_the_worker():
    """The worker settles each request on its event loop; a loop closed meanwhile (its caller
    gave up) once raised in the worker thread, which died, and every later request hung (seen
    once in CI: test_a_failing_batch_..., whose first asyncio.run closes its loop on the first
    of two errors)."""
    batcher = Batcher(Recorder(seconds=0.2), max_batch=8, max_wait=0)
    batcher.start()
    try:
        with pytest.raises(TimeoutError):  # the loop closes while its item is being processed
            asyncio.run(asyncio.wait_for(batcher.submit([3]), 0.05))
        time.sleep(0.3)  # the worker settles the abandoned item on the closed loop
        answer = asyncio.run(asyncio.wait_for(batcher.submit([4]), 5))
    finally:
        batcher.stop(timeout=5)
    assert answer == ([16], 1)


def test_stop_finishes_what_was_submitted_then_refuses():
    process = Recorder(seconds=0.05)
    batcher = Batcher(process, max_batch=2, max_wait=0)
    batcher.start()

    async def submit_then_stop():
        pending = asyncio.gather(*(batcher.submit([n]) for n in range(5)))
        await asyncio.sleep(0.01)  # the items are queued; stop while the first batch runs
        await asyncio.to_thread(batcher.stop)
        return await pending

    answers = asyncio.run(submit_then_stop())
    assert [results for results, _ in answers] == [[n * n] for n in range(5)]
    with pytest.raises(ShuttingDown):
        asyncio.run(batcher.submit([1]))


def test_nonsense_limits_are_refused():
    with pytest.raises(ValueError, match="max batch must be >= 1"):
        Batcher(Recorder(), max_batch=0, max_wait=0)
