"""Token-level audio streaming over a TurboEngine (issue 15).

    streamer = AudioStreamer(engine)  # over a TurboEngine
    streamer.start()  # starts the engine too
    async for piece in streamer.stream(TTSRequest("Hello there.", sampling=SamplingParams(seed=1))):
        play(piece)  # float32 24 kHz mono pieces, in order; together the whole utterance

The engine's T3 loop hands over each request's speech tokens as it samples them
(``TurboEngine.stream``). A worker thread of this module owns one ``S3GenStream`` per request:
it pushes the tokens in and, whenever streams have a hop ready, plays the next hop of up to
``max_batch`` of them in one ``StreamingS3Gen.step``. So a request's first audio leaves after its
prefill, ``first_hop + lookahead`` decode steps (19 by default) and one small S3Gen pass, while T3
keeps decoding it and the others.

A request's audio depends on its text, voice, settings, seed and hop schedule only. When the
consumer stops iterating, the request is cancelled in the engine, which frees its cache row, and
its stream is dropped here, so no vocoder work is spent on it (``TurboEngine.cancel`` of its id
does the same, and the consumer gets CancelledError). A step that fails is retried
stream by stream, so an error stays with the stream that causes it. Pieces are not watermarked
(the Serve stitcher watermarks what it sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from chatterbox.engine import TTSRequest
from chatterbox.s3gen.streaming import HopSchedule, S3GenStream, StreamingS3Gen
from chatterbox.turbo_engine import EngineClosedError, TurboEngine, call_in_loop

_OPEN = object()  # a new request: the worker holds it from now on
_END = object()  # a request's tokens are all in / its audio is all out


@dataclass(frozen=True)
class StreamerStats:
    live_streams: int  # streams the worker holds (tokens arriving or hops to play)
    steps: int  # StreamingS3Gen steps run
    hops: int  # hops played, all streams together
    streams_done: int
    streams_cancelled: int
    streams_failed: int


@dataclass(eq=False)
class _Request:
    """One streamed request: its S3Gen stream (worker thread only) and its consumer's queue."""

    id: str
    s3gen: S3GenStream
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue[object]  # np.ndarray pieces, then _END or an exception
    cancelled: bool = False  # set from the consumer's side; the worker stops stepping it
    closed: bool = False  # the worker is done with it (worker thread only)


class AudioStreamer:
    """Streams each request's audio hop by hop while the engine's T3 loop decodes it."""

    def __init__(self, engine: TurboEngine, schedule: HopSchedule | None = None, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.streaming = StreamingS3Gen(engine.tts.s3gen, schedule)
        self.max_batch = max_batch
        self._inbox: queue.SimpleQueue[tuple[_Request | None, object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._live: list[_Request] = []  # worker thread only
        self._counts = dict.fromkeys(("steps", "hops", "done", "cancelled", "failed"), 0)

    def start(self) -> None:
        """Start the engine (if it is not running) and the streaming S3Gen worker (idempotent)."""
        self.engine.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="audio-streamer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the worker; unfinished streams fail with EngineClosedError. The engine keeps running."""
        if self._thread is not None:
            self._inbox.put((None, _END))
            self._thread.join()
            self._thread = None

    def stats(self) -> StreamerStats:
        counts = self._counts
        return StreamerStats(
            live_streams=len(self._live),
            steps=counts["steps"],
            hops=counts["hops"],
            streams_done=counts["done"],
            streams_cancelled=counts["cancelled"],
            streams_failed=counts["failed"],
        )

    async def stream(self, request: TTSRequest, request_id: str | None = None) -> AsyncIterator[np.ndarray]:
        """The request's float32 24 kHz audio in pieces, as soon as each hop is decoded. Bad input
        raises before the first piece (TTSInputError, ValueError); a request cancelled in the engine
        raises CancelledError; leaving the loop early cancels the request."""
        if self._thread is None:
            raise EngineClosedError("the streamer is not started")
        job = self.engine.tts.jobs([request])[0]  # checks the text, fixes the seed and the voice
        stream = self.streaming.open(job.s3gen_request(torch.zeros(0, dtype=torch.long)))
        entry = _Request(request_id or uuid.uuid4().hex, stream, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put((entry, _OPEN))
        # The engine draws T3's tokens from the seed the S3Gen stream's seed was derived from.
        seeded = replace(request, sampling=replace(request.sampling, seed=job.seed))
        feeding = asyncio.create_task(self._feed(entry, seeded))
        ended = False
        try:
            while True:
                item = await entry.pieces.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item
        finally:
            if not ended:
                self._cancel(entry)
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding

    def _cancel(self, entry: _Request) -> None:
        """Cancel the request in the engine (its cache row is freed) and its stream here."""
        entry.cancelled = True
        self.engine.cancel(entry.id)
        self._inbox.put((entry, _END))  # wakes the worker, which drops the stream

    async def _feed(self, entry: _Request, request: TTSRequest) -> None:
        """Hand the engine's token chunks to the worker, then _END (or the error that ended them)."""
        try:
            async for chunk in self.engine.stream(request, entry.id):
                self._inbox.put((entry, chunk))
        except Exception as error:  # e.g. text too long for the engine's rows: the consumer raises it
            self._inbox.put((entry, error))
            return
        except asyncio.CancelledError as error:  # cancelled in the engine, or the consumer left
            self._inbox.put((entry, error))
            raise
        self._inbox.put((entry, _END))

    # ------------------------------------------------------------------------------ worker

    def _worker(self) -> None:
        device = self.streaming.s3gen.device
        cuda_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with (
            torch.inference_mode(),
            torch.cuda.stream(cuda_stream) if cuda_stream else contextlib.nullcontext(),
        ):
            while True:
                ready = self._ready()
                messages = [] if ready else [self._inbox.get()]  # idle: sleep until tokens arrive
                with contextlib.suppress(queue.Empty):
                    while True:
                        messages.append(self._inbox.get_nowait())
                if any(entry is None for entry, _ in messages):
                    for entry in self._live:
                        self._end(entry, EngineClosedError(f"the streamer closed before {entry.id} finished"))
                    self._live.clear()
                    return
                for entry, item in messages:
                    assert entry is not None
                    self._receive(entry, item)
                ready = self._ready()
                if ready:
                    if cuda_stream is not None:  # voices reach the device on the default stream
                        cuda_stream.wait_stream(torch.cuda.default_stream(device))
                    self._step(ready[: self.max_batch])

    def _ready(self) -> list[_Request]:
        return [entry for entry in self._live if entry.s3gen.next_hop() is not None]

    def _receive(self, entry: _Request, item: object) -> None:
        if entry.closed:
            return
        if entry.cancelled:  # nobody listens: no more vocoder work for it
            entry.closed = True
            if entry in self._live:
                self._live.remove(entry)
            self._counts["cancelled"] += 1
            return
        if item is _OPEN:
            self._live.append(entry)
        elif isinstance(item, torch.Tensor):
            entry.s3gen.push(item)
        elif item is _END:
            entry.s3gen.finish()
        else:
            assert isinstance(item, BaseException)
            self._live.remove(entry)
            self._end(entry, item)

    def _step(self, entries: list[_Request]) -> None:
        """One step over the ready streams; if it fails, each stream again alone."""
        try:
            pieces = self.streaming.step([entry.s3gen for entry in entries])
        except Exception as error:
            if len(entries) == 1:
                self._live.remove(entries[0])
                self._end(entries[0], error)
            else:
                for entry in entries:
                    self._step([entry])
            return
        self._counts["steps"] += 1
        self._counts["hops"] += len(entries)
        for entry, piece in zip(entries, pieces, strict=True):
            _post(entry, piece.numpy())
            if entry.s3gen.done:
                self._live.remove(entry)
                self._end(entry, None)

    def _end(self, entry: _Request, error: BaseException | None) -> None:
        entry.closed = True
        outcome = "cancelled" if isinstance(error, asyncio.CancelledError) else "failed"
        self._counts["done" if error is None else outcome] += 1
        _post(entry, _END if error is None else error)


def _post(entry: _Request, item: object) -> None:
    """Put item on the consumer's queue, on the consumer's event loop."""
    call_in_loop(entry.loop, entry.pieces.put_nowait, item)
