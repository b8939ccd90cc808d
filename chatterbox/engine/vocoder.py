"""The engine's one S3Gen stage: whole rows and streamed hops, on one thread and one CUDA stream.

An item is vocoded whole (``vocode``: batched with other finished rows) or hop by hop (``open``,
``push`` as T3 samples, ``finish``; up to ``max_batch`` ready streams play their next hop in one
``StreamingS3Gen.step``). Failed S3Gen calls are retried through ``isolate_failures``, outside the
handler, so an error stays with its item. ``deliver(item, result)`` runs on this thread: audio or
an exception for a whole item; pieces, then ``STREAM_END`` or an exception, for a stream; a
cancelled whole item gets ``asyncio.CancelledError``, a cancelled stream nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from chatterbox.engine.batch import StageTimes
from chatterbox.engine.outcomes import isolate_failures
from chatterbox.s3gen.streaming import HopSchedule, S3GenStream, StreamingS3Gen

if TYPE_CHECKING:
    from chatterbox.tts import Job, TurboTTS

STREAM_END = object()  # delivered after a streamed item's last piece
_CLOSE = "close"


class VocoderItem(Protocol):
    job: Job
    cancelled: bool

    @property
    def times(self) -> StageTimes: ...


Deliver = Callable[[VocoderItem, object], None]


@dataclass(frozen=True)
class VocoderStats:
    live_streams: int  # streams held (tokens arriving or hops to play)
    batches: int  # whole-row S3Gen calls that succeeded
    steps: int  # StreamingS3Gen steps that succeeded
    hops: int  # hops played, all streams together
    streams_done: int
    streams_cancelled: int
    streams_failed: int


class VocoderStage:
    """S3Gen for one engine. ``vocode``/``open``/``push``/``finish``/``cancel`` may be called from
    any thread; the S3Gen work runs on this stage's thread."""

    def __init__(
        self, tts: TurboTTS, max_batch: int, deliver: Deliver, schedule: HopSchedule | None = None
    ) -> None:
        self.tts = tts
        self.max_batch = max_batch
        self.streaming = StreamingS3Gen(tts.s3gen, schedule)
        self._deliver = deliver
        self._inbox: queue.SimpleQueue[tuple[str, VocoderItem | None, object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # This stage's thread only:
        self._whole: list[tuple[VocoderItem, torch.Tensor]] = []
        self._streams: dict[VocoderItem, S3GenStream] = {}
        self._counts = dict.fromkeys(("batches", "steps", "hops", "done", "cancelled", "failed"), 0)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="turbo-engine-s3gen", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread; what it still held is dropped (the engine fails those requests)."""
        if self._thread is not None:
            self._inbox.put((_CLOSE, None, None))
            self._thread.join()
            self._thread = None
        self._whole.clear()
        self._streams.clear()

    def vocode(self, item: VocoderItem, tokens: torch.Tensor) -> None:
        """Vocode ``tokens`` (N,) int64 as ``item``'s whole audio."""
        self._inbox.put(("vocode", item, tokens))

    def open(self, item: VocoderItem) -> None:
        """Start streaming ``item``: hops play as ``push`` brings its tokens."""
        self._inbox.put(("open", item, None))

    def push(self, item: VocoderItem, tokens: torch.Tensor) -> None:
        self._inbox.put(("push", item, tokens))

    def finish(self, item: VocoderItem) -> None:
        """All of ``item``'s tokens are in: play the rest of its hops, then deliver STREAM_END."""
        self._inbox.put(("finish", item, None))

    def cancel(self, item: VocoderItem) -> None:
        """Stop any work for ``item`` (set ``item.cancelled`` first)."""
        self._inbox.put(("cancel", item, None))

    def stats(self) -> VocoderStats:
        counts = self._counts
        return VocoderStats(
            live_streams=len(self._streams),
            batches=counts["batches"],
            steps=counts["steps"],
            hops=counts["hops"],
            streams_done=counts["done"],
            streams_cancelled=counts["cancelled"],
            streams_failed=counts["failed"],
        )

    def _run(self) -> None:
        device = self.tts.s3gen.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.inference_mode(), torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            while True:
                idle = not self._whole and not self._ready()
                messages = [self._inbox.get()] if idle else []  # sleep until work arrives
                with contextlib.suppress(queue.Empty):
                    while True:
                        messages.append(self._inbox.get_nowait())
                for kind, item, payload in messages:
                    if kind == _CLOSE:
                        return
                    assert item is not None
                    self._receive(kind, item, payload)
                if stream is not None:  # voices and tokens reach the device on the default stream
                    stream.wait_stream(torch.cuda.default_stream(device))
                if self._whole:
                    batch, self._whole = self._whole[: self.max_batch], self._whole[self.max_batch :]
                    self._vocode_whole(batch)
                ready = self._ready()
                if ready:
                    self._step(ready[: self.max_batch])

    def _receive(self, kind: str, item: VocoderItem, payload: object) -> None:
        if kind == "vocode":
            assert isinstance(payload, torch.Tensor)
            self._whole.append((item, payload))
        elif kind == "cancel":
            if self._streams.pop(item, None) is not None:
                self._counts["cancelled"] += 1
        elif item.cancelled:
            pass  # a stream's late tokens after its cancellation
        elif kind == "open":
            try:
                self._streams[item] = self.streaming.open(
                    item.job.s3gen_request(torch.zeros(0, dtype=torch.long))
                )
            except Exception as error:
                self._counts["failed"] += 1
                self._deliver(item, error)
        elif item in self._streams:
            if kind == "push":
                assert isinstance(payload, torch.Tensor)
                self._streams[item].push(payload)
            else:
                self._streams[item].finish()

    def _ready(self) -> list[VocoderItem]:
        return [item for item, stream in self._streams.items() if stream.next_hop() is not None]

    def _vocode_whole(self, batch: list[tuple[VocoderItem, torch.Tensor]]) -> None:
        for item, _ in batch:
            if item.cancelled:
                self._deliver(item, asyncio.CancelledError(f"{item} was cancelled"))
        batch = [(item, tokens) for item, tokens in batch if not item.cancelled]
        start = time.monotonic()
        for item, _ in batch:
            item.times.s3gen_start = start

        def vocode(part: list[tuple[VocoderItem, torch.Tensor]]) -> list[np.ndarray]:
            wavs = self.tts.vocode_jobs([item.job for item, _ in part], [tokens for _, tokens in part])
            self._counts["batches"] += 1
            return wavs

        try:
            outcomes = isolate_failures(vocode, batch)
        except Exception as error:  # a CUDA error: nothing on this device can run any more
            outcomes = [error] * len(batch)
        for (item, _), outcome in zip(batch, outcomes, strict=True):
            self._deliver(item, outcome)

    def _step(self, items: list[VocoderItem]) -> None:
        start = time.monotonic()
        for item in items:
            item.times.s3gen_start = item.times.s3gen_start or start

        def step(part: list[VocoderItem]) -> list[np.ndarray]:
            pieces = self.streaming.step([self._streams[item] for item in part])
            self._counts["steps"] += 1
            self._counts["hops"] += len(part)
            return [piece.numpy() for piece in pieces]

        try:
            outcomes = isolate_failures(step, items)
        except Exception as error:  # a CUDA error
            outcomes = [error] * len(items)
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                del self._streams[item]
                self._counts["failed"] += 1
                self._deliver(item, outcome)
                continue
            self._deliver(item, outcome)
            if self._streams[item].done:
                del self._streams[item]
                self._counts["done"] += 1
                self._deliver(item, STREAM_END)
