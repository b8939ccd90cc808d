"""A request's chunk calls to the model deployment: a few in flight at a time, results in order;
and the ingress's admission of whole requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.errors import SynthesisError
from serve_app.metrics import record_time_to_first_audio
from serve_app.schemas import ChunkJob


class Admission:
    """Holds one of `limit` request slots of an ingress replica; without a free one, refuses at once
    (503 `overloaded`): waiting behind that many requests would take longer than a client should wait.
    None: no limit."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._active = 0

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        if self._limit is not None and self._active >= self._limit:
            raise SynthesisError(
                "overloaded", f"the service is busy ({self._limit} requests in progress); retry later"
            )
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1


async def _first_finished(running: dict[asyncio.Future, DeploymentResponse]) -> None:
    """Wait until a call in `running` finishes and remove it; raise its error if it failed."""
    finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    for waiter in finished:
        del running[waiter]
    for waiter in finished:
        waiter.result()


def _record_first_audio(accepted_at: float) -> Callable[[asyncio.Future], None]:
    """A done callback for a request's first chunk call: its audio is ready, the earliest a
    streamed response can send audio."""

    def record(call: asyncio.Future) -> None:
        if not call.cancelled() and call.exception() is None:
            record_time_to_first_audio(time.monotonic() - accepted_at)

    return record


async def finished_in_order(
    model: DeploymentHandle, jobs: list[ChunkJob], max_in_flight: int, accepted_at: float | None
) -> AsyncIterator[tuple[asyncio.Future, DeploymentResponse]]:
    """The `model.synthesize_chunk` calls of `jobs`, each (its result future, its response) yielded
    in order once it and every call before it have finished; the first one's finishing is recorded
    as the request's time to first audio (since `accepted_at`; None: its first audio comes from
    elsewhere).

    At most `max_in_flight` calls of one request run at once, the next sent as an earlier
    one finishes, so a long text does not fill every replica's queue ahead of later requests.
    When one call fails or this request is cancelled (its client went away), the calls still
    running are cancelled: awaiting a response and being cancelled does not cancel its call.
    """
    calls: list[tuple[asyncio.Future, DeploymentResponse]] = []
    running: dict[asyncio.Future, DeploymentResponse] = {}
    yielded = 0
    try:
        for job in jobs:
            if len(running) >= max_in_flight:
                await _first_finished(running)
            response = model.synthesize_chunk.remote(job)
            call = asyncio.ensure_future(response)
            if not calls and accepted_at is not None:
                call.add_done_callback(_record_first_audio(accepted_at))
            calls.append((call, response))
            running[call] = response
            while yielded < len(calls) and calls[yielded][0].done():
                calls[yielded][0].result()  # raises the call's error
                yield calls[yielded]
                yielded += 1
        for call, response in calls[yielded:]:
            while not call.done():
                await _first_finished(running)
            call.result()
            yield call, response
    finally:
        for waiter, response in running.items():
            response.cancel()
            waiter.cancel()


async def synthesize_chunks(
    model: DeploymentHandle, jobs: list[ChunkJob], max_in_flight: int, accepted_at: float
) -> list[DeploymentResponse]:
    """The finished model calls of `jobs`, in order (see `finished_in_order`)."""
    calls = finished_in_order(model, jobs, max_in_flight, accepted_at)
    return [response async for _, response in calls]
