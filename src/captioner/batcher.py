"""Dynamic batching: items from many concurrent requests, processed together by one thread.

Request handlers (coroutines on the server's event loop) `await batcher.submit(items)`; one
worker thread takes the oldest waiting item, waits up to `max_wait` seconds for more (or none,
when max_wait is 0) until it holds `max_batch`, hands the batch to `process` and wakes each
waiting handler with its results. Only the worker calls `process`, so it may own state that is
not thread-safe (TensorFlow here), and the event loop never blocks on it. Under load the items
that arrive while a batch is being processed form the next one, so batches grow with the load.

max_batch = 1 turns batching off: every item is processed alone, in arrival order.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from captioner.errors import CaptionerError


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class ShuttingDown(CaptionerError):
    """Submitted after stop(): the server is going away."""


_STOP = object()  # put on the queue by stop(): the worker finishes what is before it, then exits


class Batcher:
    """Batches of at most `max_batch` items, `process(items) -> results` (one per item) called on
    one worker thread; see the module docstring."""

    def __init__(
        self, process: Callable[[list], Sequence], max_batch: int, max_wait: float
    ) -> None:
        if max_batch < 1 or max_wait < 0:
            raise CaptionerError(
                f"max batch must be >= 1 and max wait >= 0: {max_batch}, {max_wait}"
            )
        self.process, self.max_batch, self.max_wait = process, max_batch, max_wait
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._lock = threading.Lock()
        self._sizes: Counter[int] = Counter()  # batch size -> batches of that size
        self._busy = 0.0  # seconds spent in process()
        self._accepting = False

    def start(self) -> None:
        self._accepting = True
        self._worker.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new items, finish every item already submitted, then end the worker."""
        self._accepting = False
        if self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join(timeout)

    async def submit(self, items: Sequence) -> tuple[list, int]:
        """(the results of `items`, in order; the largest batch any of them was processed in).
        Raises what `process` raised for a batch holding one of them."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; try again later")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self._queue.put(_Job(item, future, loop))
        answers = await asyncio.gather(*futures)  # (result, batch size) per item
        return [result for result, _ in answers], max(size for _, size in answers)

    def stats(self) -> dict[str, Any]:
        """Batches formed so far: counts, mean and largest size, how many of each size, and the
        seconds spent processing them."""
        with self._lock:
            sizes, busy = dict(sorted(self._sizes.items())), self._busy
        batches, items = sum(sizes.values()), sum(size * n for size, n in sizes.items())
        return {
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000,
            "batches": batches,
            "items": items,
            "mean_batch_size": items / batches if batches else 0.0,
            "largest_batch": max(sizes, default=0),
            "batch_sizes": {str(size): n for size, n in sizes.items()},
            "busy_seconds": busy,  # in process(): the worker's share of the time
        }

    # --- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:  # past the deadline, only what is already waiting joins the batch
                    job = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if job is _STOP:
                    self._queue.put(_STOP)  # processed after this batch
                    break
                batch.append(job)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = list(self.process([job.item for job in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            outcomes = [(result, None) for result in results]
        except Exception as error:  # every waiting request gets the error, the worker lives on
            outcomes = [(None, error)] * len(batch)
        with self._lock:
            self._sizes[len(batch)] += 1
            self._busy += time.perf_counter() - start
        for job, (result, error) in zip(batch, outcomes, strict=True):
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error, len(batch))
            except RuntimeError:  # its event loop is closed: the request went away with it
                pass


def _settle(future: asyncio.Future, result: Any, error: Exception | None, size: int) -> None:
    if future.done():  # the request went away meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result((result, size))
