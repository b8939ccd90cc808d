"""TurboEngine: TurboTTS as a server, continuous batching on a fixed KV cache.

    engine = TurboEngine(tts, EngineConfig(max_slots=8)); engine.start()
    wav = await engine.submit(TTSRequest("Hello.", voice=voice, sampling=SamplingParams(seed=1)))
    async for tokens in engine.stream(request): ...        # speech tokens as T3 samples them
    async for piece in engine.stream_audio(request): ...   # audio hop by hop while T3 decodes

The shell only: a T3 thread driving a ``DecodeBatch``, the ``VocoderStage`` thread, futures and
queues on the callers' event loops, and stats. A seeded request's tokens and audio equal
``TurboTTS.generate([request])``'s (fp32 CPU: the same tokens, audio within 1e-6) whatever shared
its steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from chatterbox.constants import MAX_NEW_TOKENS
from chatterbox.engine.batch import DecodeBatch, Row, StageTimes
from chatterbox.engine.config import EngineConfig
from chatterbox.engine.vocoder import STREAM_END, VocoderStage, VocoderStats

if TYPE_CHECKING:
    from chatterbox.tts import Job, TTSRequest, TurboTTS

RECENT_TIMES = 4096  # finished requests whose stage times stay readable (stage_times)
STEP_RATE_WINDOW = 64  # decode steps the steps/s figure averages over

Mode = Literal["audio", "tokens", "hops"]  # what a request gets: whole audio, tokens, audio hops


@dataclass(frozen=True)
class EngineStats:
    live_rows: int  # rows holding a cache row (decoding or mid-prefill)
    queue_depth: int  # requests waiting for a row
    steps: int  # decode steps run
    steps_per_s: float  # over the last STEP_RATE_WINDOW steps; 0 when idle for a second
    tokens_generated: int
    prefix_hits: int
    prefix_misses: int
    requests_done: int
    requests_cancelled: int
    cache_bytes: int
    cache_dtype: str
    requests_failed: int
    peak_live_rows: int  # most rows live at once since construction
    s3gen_batches: int  # whole-row S3Gen calls that succeeded
    graph_buckets_eager: int = 0  # CUDA-graph buckets that failed their capture or self-check


class EngineClosedError(RuntimeError):
    """The engine was closed before the request finished."""


@dataclass(eq=False)
class _Request:
    """One request inside the engine: its decode row, and where its results go."""

    id: str
    job: Job
    row: Row
    mode: Mode
    loop: asyncio.AbstractEventLoop
    audio: asyncio.Future[np.ndarray] | None  # mode "audio": resolved with the audio
    results: asyncio.Queue[object] | None  # "tokens" / "hops": chunks, then _END or an exception
    watermark: bool
    cancelled: bool = False  # set by cancel() from any thread; acted on by the stage holding it

    @property
    def times(self) -> StageTimes:
        return self.row.times


_END = object()  # the last item of a streamed request's results


class TurboEngine:
    """Continuous batching of TurboTTS requests: a DecodeBatch on one thread, S3Gen on another."""

    def __init__(self, tts: TurboTTS, config: EngineConfig | None = None) -> None:
        self.tts = tts
        self.config = config = config or EngineConfig()
        t3_config = tts.t3.config
        longest_row = 1 + t3_config.max_prompt_tokens + tts.max_text_tokens + 1 + MAX_NEW_TOKENS + 1
        self.max_positions = config.max_positions or min(longest_row, t3_config.gpt2.positions)
        self._batch = DecodeBatch(
            tts.t3,
            config.max_slots,
            self.max_positions,
            config.prefix_cache_voices,
            config.cuda_graphs,
            config.token_cap,
        )
        self.prefix_cache = self._batch.prefix_cache
        on_cuda = tts.s3gen.device.type == "cuda"
        s3gen_batch = config.s3gen_max_batch or (config.max_slots if on_cuda else 1)
        self._vocoder = VocoderStage(tts, s3gen_batch, self._vocoded, config.hop_schedule)

        self._lock = threading.Condition()  # guards _incoming, _cancelled, _requests, _recent_times, _closing
        self._incoming: deque[_Request] = deque()  # submitted, not yet handed to the batch
        self._cancelled: list[_Request] = []  # cancel() calls the T3 thread has yet to act on
        self._requests: dict[str, _Request] = {}  # submitted and not finished, by id
        self._recent_times: OrderedDict[str, StageTimes] = OrderedDict()
        self._closing = False
        self._thread: threading.Thread | None = None
        # T3 thread only:
        self._streaming: list[_Request] = []  # in the batch, their tokens handed on as drawn
        self._step_times: deque[float] = deque(maxlen=STEP_RATE_WINDOW)
        self._counts = dict.fromkeys(("done", "cancelled", "failed"), 0)

    @property
    def cache_bytes(self) -> int:
        return self._batch.cache.nbytes

    @property
    def cache_dtype(self) -> torch.dtype:
        return self._batch.dtype

    @property
    def graph_capture_s(self) -> float | None:
        """Seconds spent capturing the decode step's CUDA graphs at construction; None when eager."""
        graphs = self._batch.graphed_decode
        return graphs.capture_s if graphs.graphed else None

    def start(self) -> None:
        """Start the T3 thread and the vocoder stage (idempotent)."""
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._t3_loop, name="turbo-engine-t3", daemon=True)
        self._vocoder.start()
        self._thread.start()

    def close(self) -> None:
        """Stop both threads; every unfinished request fails with EngineClosedError."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._vocoder.close()
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            self._fail(request, EngineClosedError(f"the engine closed before request {request.id} finished"))

    async def submit(
        self,
        request: TTSRequest,
        request_id: str | None = None,
        *,
        watermark: bool = False,
        ignore_stop_token: bool = False,
    ) -> np.ndarray:
        """The request's float32 24 kHz audio. Bad input raises here (TTSInputError, ValueError);
        ``cancel`` makes it raise CancelledError, and cancelling the awaiting task cancels the row."""
        entry = self._enqueue(request, request_id, "audio", watermark, ignore_stop_token)
        assert entry.audio is not None
        try:
            return await entry.audio
        except asyncio.CancelledError:
            self.cancel(entry.id)  # the caller went away: free its row
            raise

    async def stream(
        self, request: TTSRequest, request_id: str | None = None, *, ignore_stop_token: bool = False
    ) -> AsyncIterator[torch.Tensor]:
        """The request's speech tokens as T3 samples them: each yield is a (n,) int64 CPU tensor of
        every token since the last yield (ids >= 6561 never appear). Ends at STOP or the limit."""
        entry = self._enqueue(request, request_id, "tokens", False, ignore_stop_token)
        async for chunks in self._results(entry):
            yield torch.cat(chunks)

    async def stream_audio(
        self, request: TTSRequest, request_id: str | None = None
    ) -> AsyncIterator[np.ndarray]:
        """The request's float32 24 kHz audio in pieces, one per hop, as soon as each is vocoded;
        together the whole utterance, unwatermarked. Bad input raises before the first piece;
        a request cancelled in the engine raises CancelledError; leaving early cancels it."""
        entry = self._enqueue(request, request_id, "hops", False, False)
        async for pieces in self._results(entry):
            for piece in pieces:
                yield piece

    def cancel(self, request_id: str) -> None:
        """Drop a waiting or live request at the next iteration; unknown or finished ids are ignored."""
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is None or entry.cancelled:
                return
            entry.cancelled = True
            self._cancelled.append(entry)
            self._lock.notify_all()
        if entry.mode != "tokens":
            self._vocoder.cancel(entry)

    def stats(self) -> EngineStats:
        batch = self._batch
        with self._lock:
            queue_depth = len(self._incoming) + len(batch.waiting)
        now = time.monotonic()
        times = list(self._step_times)
        recent = len(times) >= 2 and now - times[-1] < 1.0
        counts = self._counts
        return EngineStats(
            live_rows=batch.live,
            queue_depth=queue_depth,
            steps=batch.steps,
            steps_per_s=(len(times) - 1) / (times[-1] - times[0]) if recent else 0.0,
            tokens_generated=batch.tokens_drawn,
            prefix_hits=batch.prefix_cache.hits,
            prefix_misses=batch.prefix_cache.misses,
            requests_done=counts["done"],
            requests_cancelled=counts["cancelled"],
            cache_bytes=self.cache_bytes,
            cache_dtype=str(batch.dtype).removeprefix("torch."),
            requests_failed=counts["failed"],
            peak_live_rows=batch.peak_live,
            s3gen_batches=self._vocoder.stats().batches,
            graph_buckets_eager=len(batch.graphed_decode.eager_buckets),
        )

    def vocoder_stats(self) -> VocoderStats:
        return self._vocoder.stats()

    def stage_times(self, request_id: str) -> StageTimes | None:
        """A live or recently finished request's stage times (a copy), None if unknown."""
        with self._lock:
            entry = self._requests.get(request_id)
            times = entry.times if entry is not None else self._recent_times.get(request_id)
            return StageTimes(**vars(times)) if times is not None else None

    def _enqueue(
        self,
        request: TTSRequest,
        request_id: str | None,
        mode: Mode,
        watermark: bool,
        ignore_stop_token: bool,
    ) -> _Request:
        loop = asyncio.get_running_loop()
        job = self.tts.jobs([request])[0]  # tokenises and checks the text, fixes seed and voice
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        row = self._batch.make_row(job.t3_request(), request_id, job.voice.id, ignore_stop_token)
        entry = _Request(
            id=request_id,
            job=job,
            row=row,
            mode=mode,
            loop=loop,
            audio=loop.create_future() if mode == "audio" else None,
            results=None if mode == "audio" else asyncio.Queue(),
            watermark=watermark,
        )
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in the engine")
            self._requests[request_id] = entry
            if mode == "hops":  # before the T3 thread can push its first tokens
                self._vocoder.open(entry)
            self._incoming.append(entry)
            self._lock.notify_all()
        return entry

    async def _results(self, entry: _Request) -> AsyncIterator[list[object]]:
        """A streamed request's results as they come: each yield is every chunk queued since the
        last; raises the exception that ends it; leaving early cancels the request."""
        assert entry.results is not None
        ended = False
        try:
            while not ended:
                items = [await entry.results.get()]
                while not entry.results.empty():
                    items.append(entry.results.get_nowait())
                chunks = []
                for item in items:
                    if item is _END or isinstance(item, BaseException):
                        ended = True
                        if chunks:
                            yield chunks
                        if isinstance(item, BaseException):
                            raise item
                        return
                    chunks.append(item)
                yield chunks
        finally:
            if not ended:
                self.cancel(entry.id)  # the consumer stopped early

    def _t3_loop(self) -> None:
        batch = self._batch
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._incoming or self._cancelled or batch.has_work):
                        self._lock.wait()
                    if self._closing:
                        return
                    incoming, cancelled = list(self._incoming), self._cancelled
                    self._incoming.clear()
                    self._cancelled = []
                try:
                    self._iteration(incoming, cancelled)
                except Exception as error:  # a fault in a shared step fails the rows in it, not the loop
                    for row in batch.abort():
                        entry = self._requests.get(row.key)
                        if entry is not None:
                            self._fail(entry, error)

    def _iteration(self, incoming: list[_Request], cancelled: list[_Request]) -> None:
        """Admit new requests, drop cancelled ones, prefill, run one decode step, hand results on."""
        batch = self._batch
        for entry in incoming:
            batch.admit(entry.row)
            if entry.mode != "audio":
                self._streaming.append(entry)
        for entry in cancelled:
            batch.cancel(entry.row)
            self._drop(entry)
        for row, error in batch.prefill(self.config.prefill_chunk_tokens):
            self._fail(self._requests[row.key], error)
        if cancelled or len(self._streaming) > batch.live + len(batch.waiting):  # some left the batch
            self._streaming = [entry for entry in self._streaming if self._requests.get(entry.id) is entry]
        finished = batch.step()
        if batch.decoding or finished:
            self._step_times.append(time.monotonic())
        for entry in self._streaming:
            tokens = entry.row.take_speech_tokens()
            if not tokens.numel():
                continue
            if entry.mode == "tokens":
                self._post(entry, entry.results.put_nowait, tokens)  # type: ignore[union-attr]
            else:
                self._vocoder.push(entry, tokens)
        for row in finished:
            self._finish_t3(self._requests[row.key])

    def _finish_t3(self, entry: _Request) -> None:
        if entry.mode == "audio":
            self._vocoder.vocode(entry, entry.row.speech_tokens())
            return
        self._streaming.remove(entry)
        if entry.mode == "hops":
            self._vocoder.finish(entry)
        elif self._forget(entry, "done"):
            self._post(entry, entry.results.put_nowait, _END)  # type: ignore[union-attr]

    def _vocoded(self, entry: _Request, result: object) -> None:
        """The vocoder stage's result for a request (on its thread)."""
        if isinstance(result, asyncio.CancelledError):
            self._drop(entry)
        elif isinstance(result, BaseException):
            self._fail(entry, result)
        elif entry.cancelled:
            return  # already dropped: nobody listens
        elif entry.mode == "hops":
            assert entry.results is not None
            if result is STREAM_END:
                if self._forget(entry, "done"):
                    self._post(entry, entry.results.put_nowait, _END)
            else:
                self._post(entry, entry.results.put_nowait, result)
        else:
            assert isinstance(result, np.ndarray) and entry.audio is not None
            entry.times.s3gen_done = time.monotonic()
            try:
                audio = self.tts.watermark(result) if entry.watermark else result
            except Exception as error:
                self._fail(entry, error)
                return
            if self._forget(entry, "done"):
                self._post(entry, _set_result, entry.audio, audio)

    def _forget(self, entry: _Request, outcome: str) -> bool:
        """The request leaves the engine: count it and keep its stage times for a while. Called
        before its caller hears of it, so the counts already include it when the caller looks.
        False if it had already left."""
        with self._lock:
            if self._requests.pop(entry.id, None) is not entry:
                return False
            self._recent_times[entry.id] = entry.times
            while len(self._recent_times) > RECENT_TIMES:
                self._recent_times.popitem(last=False)
            self._counts[outcome] += 1
        return True

    def _drop(self, entry: _Request) -> None:
        """A cancelled request leaves: its submit raises CancelledError, its stream ends with it."""
        if not self._forget(entry, "cancelled"):
            return
        message = f"request {entry.id} was cancelled"
        if entry.audio is not None:
            self._post(entry, entry.audio.cancel, message)
        else:
            self._post(entry, entry.results.put_nowait, asyncio.CancelledError(message))  # type: ignore[union-attr]

    def _fail(self, entry: _Request, error: BaseException) -> None:
        if not self._forget(entry, "failed"):
            return
        if entry.mode == "hops":
            self._vocoder.cancel(entry)  # no more hops for it
        if entry.audio is not None:
            self._post(entry, _set_exception, entry.audio, error)
        else:
            self._post(entry, entry.results.put_nowait, error)  # type: ignore[union-attr]

    @staticmethod
    def _post(entry: _Request, callback: Callable[..., object], *args: object) -> None:
        """Run callback(*args) on the request's caller's event loop, from an engine thread."""
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
            entry.loop.call_soon_threadsafe(callback, *args)


def _set_result(future: asyncio.Future[np.ndarray], audio: np.ndarray) -> None:
    if not future.done():
        future.set_result(audio)


def _set_exception(future: asyncio.Future[np.ndarray], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
