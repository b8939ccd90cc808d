"""Batching of a model replica's chunk calls: each batch is formed when the model is free.

`@serve.batch` (Ray 2.60) forms the next batch `batch_wait_timeout_s` after its first item arrives,
even while the previous batch is still running; the formed batch then waits its turn, and items
that arrive meanwhile go to later batches. Under steady load requests arrive one at a time, so its
batches froze at one request's chunks: measured on CPU with 32 concurrent 3-chunk requests, batches
of 3 while about 90 chunks waited in the replica. Here the runner takes the waiting items only once
the previous batch has finished, so everything that arrived during a batch can join the next one.

Batches take items round-robin over their owners (user requests), not in arrival order: a short
request that arrives behind a long one joins the next batch instead of waiting for all of the long
one's chunks.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from serve_app.metrics import record_batch_finished, record_batch_started

Item = TypeVar("Item")
Out = TypeVar("Out")


@dataclass(frozen=True)
class _Waiting(Generic[Item, Out]):
    item: Item
    future: asyncio.Future[Out | Exception]
    submitted_at: float  # time.monotonic(), for the chunk queue time metric


class Batcher(Generic[Item, Out]):
    """`await batcher.submit(item)` gives the outcome `run` returned for that item.

    `run(items)` gets at most `max_batch_size` items, one per owner in turn (`owner(item)`; each
    owner's items in arrival order), and returns one outcome per item; only one `run` is in flight
    at a time. A batch that is not full waits `wait_s` for more items first. If `run` raises, every
    item of that batch gets the exception as its outcome. An item whose caller was cancelled (its
    client went away) before its batch formed is dropped and counted in `dropped`.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Out]]],
        owner: Callable[[Item], Hashable],
        max_batch_size: int,
        wait_s: float,
    ) -> None:
        self._run = run
        self._owner = owner
        self.max_batch_size = max_batch_size  # both may change between batches (reconfigure)
        self.wait_s = wait_s
        self.dropped = 0
        # Waiting items by owner; the first owner gives the next item, then goes to the back.
        self._waiting: OrderedDict[Hashable, deque[_Waiting[Item, Out]]] = OrderedDict()
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Out | Exception:
        future: asyncio.Future[Out | Exception] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(item, future, time.monotonic())
        self._waiting.setdefault(self._owner(item), deque()).append(waiting)
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_batches())
        return await future

    def _num_waiting(self) -> int:
        return sum(len(items) for items in self._waiting.values())

    def _take_batch(self) -> list[_Waiting[Item, Out]]:
        batch = []
        while self._waiting and len(batch) < self.max_batch_size:
            owner, items = next(iter(self._waiting.items()))
            waiting = items.popleft()
            if items:
                self._waiting.move_to_end(owner)
            else:
                del self._waiting[owner]
            if waiting.future.cancelled():
                self.dropped += 1
            else:
                batch.append(waiting)
        return batch

    async def _run_batches(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            if self._num_waiting() < self.max_batch_size and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            batch = self._take_batch()
            if not batch:
                continue
            started_at = time.monotonic()
            record_batch_started([started_at - waiting.submitted_at for waiting in batch])
            try:
                outcomes: list[Out | Exception] = list(await self._run([waiting.item for waiting in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} items gave {len(outcomes)} outcomes")
            except Exception as error:  # every caller of the batch gets it
                outcomes = [error] * len(batch)
            finally:
                record_batch_finished()
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(outcome)
