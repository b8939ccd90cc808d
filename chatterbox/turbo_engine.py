"""TurboEngine: TurboTTS as a server, continuous batching on a fixed slot KV cache (issue 12).

    engine = TurboEngine(tts, EngineConfig(max_slots=8))  # allocates the KV cache once
    engine.start()
    wav = await engine.submit(TTSRequest("Hello.", voice=voice, sampling=SamplingParams(seed=1)))

Two threads run the two stages:

- The T3 loop. Each iteration admits waiting requests into free cache rows (prefill: the voice
  prefix is copied from the ``PrefixCache``, or computed and stored, then text + START run), runs
  one batched decode step over every live row, samples each row with its own settings, history and
  seed, and retires rows at STOP or their limit. Live rows stay packed in rows 0..B-1.
- The S3Gen worker vocodes whatever retired rows are waiting, in one batch (on CUDA on its own
  stream). T3 never waits for it.

Results go back to each caller's asyncio loop with ``call_soon_threadsafe``. A seeded request's
tokens and audio equal ``TurboTTS.generate([request])``'s (fp32 CPU: the same tokens, audio within
1e-6) whenever it joined, whichever row it got, whatever shared its steps: rows are never padded,
each row's positions start at 0 in its own row, and the sampling noise of a row depends only on
its seed and step.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from chatterbox.constants import MAX_NEW_TOKENS, SPEECH_VOCAB_SIZE, START_SPEECH_TOKEN, STOP_SPEECH_TOKEN
from chatterbox.engine import Job, TTSRequest, TurboTTS
from chatterbox.errors import TextTooLongError
from chatterbox.t3 import T3, T3Request
from chatterbox.t3.gpt2 import GPT2Config
from chatterbox.t3.graphs import GraphedDecodeStep, static_slot_step
from chatterbox.t3.sampler import process_logits, sample, seed_keys
from chatterbox.t3.slots import PrefixCache, SlotCache, SlotContext

RECENT_TIMES = 4096  # finished requests whose stage times stay readable (stage_times)
STEP_RATE_WINDOW = 64  # decode steps the steps/s figure averages over
CAPACITY_HEADROOM = 0.9  # share of free memory a suggested cache may take


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # rows of the fixed KV cache = most requests decoding at once
    max_positions: int | None = None  # cache length per row; None: the longest possible row
    prefix_cache_voices: int = 16  # voices whose prefix K/V is kept (LRU); 0 turns the cache off
    s3gen_max_batch: int = 8  # most finished rows vocoded in one S3Gen call
    prefill_chunk_tokens: int | None = None  # most prefill positions per iteration (None: whole rows)
    # Decode steps replayed as CUDA graphs (t3/graphs.py; CUDA only, captured at construction).
    # Off until bench/gpu_suite.sh has checked them on a GPU: no session has had one yet.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        minimums = {
            "max_slots": (self.max_slots, 1),
            "max_positions": (self.max_positions, 2),
            "prefix_cache_voices": (self.prefix_cache_voices, 0),
            "s3gen_max_batch": (self.s3gen_max_batch, 1),
            "prefill_chunk_tokens": (self.prefill_chunk_tokens, 1),
        }
        for name, (value, minimum) in minimums.items():
            integer = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and (not integer or value < minimum):
                raise ValueError(f"EngineConfig.{name} must be an integer >= {minimum}, got {value!r}")


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
    s3gen_batches: int  # S3Gen calls that succeeded


class EngineCapacityError(RuntimeError):
    """The KV cache does not fit in memory; the message names a capacity that would."""


class EngineClosedError(RuntimeError):
    """The engine was closed before the request finished."""


@dataclass
class StageTimes:
    """``time.monotonic()`` at each stage of one request; None until the stage happens."""

    submitted: float
    admitted: float | None = None  # given a cache row; prefill starts
    first_token: float | None = None
    t3_done: float | None = None
    s3gen_start: float | None = None
    s3gen_done: float | None = None


@dataclass(eq=False)
class _Row:
    """One request inside the engine: owned by the T3 loop, then by the S3Gen worker."""

    id: str
    job: Job
    t3: T3Request
    loop: asyncio.AbstractEventLoop
    audio: asyncio.Future[np.ndarray] | None  # submit: resolved with the audio
    token_chunks: asyncio.Queue[object] | None  # stream: token tensors, then _END or an exception
    watermark: bool
    ignore_stop_token: bool
    times: StageTimes
    cancelled: bool = False  # set by cancel() from any thread; acted on by the stage holding the row
    slot: int = -1
    prefix_len: int = 0  # 1 + P: speaker embedding and voice prompt
    prefix_cached: bool = False
    pending: torch.Tensor | None = None  # (n, W) prefill embeddings not yet run
    length: int = 0  # positions in the cache = where the next input is written
    tokens: list[int] = field(default_factory=list)  # every draw, STOP included

    @property
    def limit(self) -> int:
        return self.t3.sampling.max_new_tokens + 1

    def speech_tokens(self) -> torch.Tensor:
        """(N,) int64 CPU: the draws S3Gen vocodes (ids >= 6561 dropped, as T3.generate does)."""
        tokens = torch.tensor(self.tokens, dtype=torch.long)
        return tokens[tokens < SPEECH_VOCAB_SIZE]


_END = object()  # the last item of a stream's token queue


class _SlotState:
    """Per-row decode state, (max_slots, ...) tensors on the model's device; rows 0..B-1 are live.

    Persistent and updated in place, so a captured decode graph can read it.
    """

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.vocab = vocab
        self.tokens = zeros(slots)  # last draw: the next decode input
        self.lengths = zeros(slots)  # positions in the cache = the next input's position
        self.seen = zeros(slots, vocab, dtype=torch.bool)  # ids the repetition penalty applies to
        self.counts = zeros(slots)  # draws so far (the noise step)
        self.keys = zeros(slots)  # sampling noise keys
        self.temperature = zeros(slots, dtype=torch.float32)
        self.top_k = zeros(slots)
        self.top_p = zeros(slots, dtype=torch.float32)
        self.repetition_penalty = zeros(slots, dtype=torch.float32)

    def _tensors(self) -> Iterator[torch.Tensor]:
        return (value for value in vars(self).values() if isinstance(value, torch.Tensor))

    def load(self, slot: int, row: _Row) -> None:
        """Set a freshly prefilled row's state; its history is START alone, as T3.generate's."""
        params = row.t3.sampling
        assert params.seed is not None  # Job.t3_request always derives one
        self.lengths[slot] = row.length
        self.counts[slot] = 0
        self.seen[slot] = False
        self.seen[slot, START_SPEECH_TOKEN] = True
        self.keys[slot] = seed_keys(torch.tensor([params.seed]))[0]
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.repetition_penalty[slot] = params.repetition_penalty

    def move(self, src: int, dst: int) -> None:
        for tensor in self._tensors():
            tensor[dst] = tensor[src]


class TurboEngine:
    """Continuous batching of TurboTTS requests: a T3 loop over a fixed slot cache and an S3Gen worker."""

    def __init__(self, tts: TurboTTS, config: EngineConfig = EngineConfig()) -> None:
        self.tts = tts
        self.config = config
        self._t3 = tts.t3
        self._dtype = tts.t3.speech_emb.weight.dtype
        self._device = tts.t3.device
        t3_config = tts.t3.config
        table = t3_config.gpt2.positions
        longest_row = 1 + t3_config.max_prompt_tokens + tts.max_text_tokens + 1 + MAX_NEW_TOKENS + 1
        self.max_positions = config.max_positions or min(longest_row, table)
        if self.max_positions > table:
            raise ValueError(f"max_positions {self.max_positions} exceeds T3's position table ({table})")
        self._cache = _allocate_cache(
            t3_config.gpt2, config.max_slots, self.max_positions, self._dtype, self._device
        )
        self._state = _SlotState(config.max_slots, t3_config.speech_vocab, self._device)
        self._graphed_decode = GraphedDecodeStep(
            static_slot_step(self._t3, self._cache),
            config.max_slots,
            self.max_positions - 1,
            self._device,
            enabled=config.cuda_graphs,
        )
        self.prefix_cache = PrefixCache(config.prefix_cache_voices)

        self._lock = threading.Condition()  # guards _waiting, _rows, _recent_times, _closing
        self._waiting: deque[_Row] = deque()
        self._rows: dict[str, _Row] = {}  # submitted and not finished, by request id
        self._recent_times: OrderedDict[str, StageTimes] = OrderedDict()
        self._closing = False
        self._threads: list[threading.Thread] = []
        # T3 loop only:
        self._decoding: list[_Row] = []  # _decoding[i] holds cache row i
        self._prefilling: _Row | None = None  # admitted, its prefill split across iterations
        self._step_times: deque[float] = deque(maxlen=STEP_RATE_WINDOW)
        self._vocode_queue: queue.Queue[_Row | object] = queue.Queue()
        self._counts = dict.fromkeys(
            ("steps", "tokens", "done", "cancelled", "failed", "peak_live", "s3gen_batches"), 0
        )

    # --------------------------------------------------------------------------------- lifecycle

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    @property
    def cache_dtype(self) -> torch.dtype:
        return self._dtype

    def start(self) -> None:
        """Start the T3 loop and the S3Gen worker (idempotent)."""
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._t3_loop, name="turbo-engine-t3", daemon=True),
                threading.Thread(target=self._s3gen_loop, name="turbo-engine-s3gen", daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop both threads; every unfinished request fails with EngineClosedError."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._vocode_queue.put(_END)
        for thread in self._threads:
            thread.join()
        with self._lock:
            rows = list(self._rows.values())
        for row in rows:
            self._fail(row, EngineClosedError(f"the engine closed before request {row.id} finished"))

    # ------------------------------------------------------------------------------------ API

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
        row = self._enqueue(request, request_id, watermark, ignore_stop_token, stream=False)
        assert row.audio is not None
        try:
            return await row.audio
        except asyncio.CancelledError:
            self.cancel(row.id)  # the caller went away: free its row
            raise

    async def stream(
        self, request: TTSRequest, request_id: str | None = None, *, ignore_stop_token: bool = False
    ) -> AsyncIterator[torch.Tensor]:
        """The request's speech tokens as T3 samples them: each yield is a (n,) int64 CPU tensor of
        every token since the last yield (ids >= 6561 never appear). Ends at STOP or the limit."""
        row = self._enqueue(request, request_id, False, ignore_stop_token, stream=True)
        assert row.token_chunks is not None
        ended = False
        try:
            while not ended:
                items = [await row.token_chunks.get()]
                while not row.token_chunks.empty():
                    items.append(row.token_chunks.get_nowait())
                chunks = [item for item in items if isinstance(item, torch.Tensor)]
                if chunks:
                    yield torch.cat(chunks)
                if isinstance(items[-1], BaseException):
                    ended = True
                    raise items[-1]
                ended = items[-1] is _END
        finally:
            if not ended:
                self.cancel(row.id)  # the consumer stopped early

    def cancel(self, request_id: str) -> None:
        """Drop a waiting or live request at the next iteration; unknown or finished ids are ignored."""
        with self._lock:
            row = self._rows.get(request_id)
            if row is not None:
                row.cancelled = True
                self._lock.notify_all()

    @property
    def graph_capture_s(self) -> float | None:
        """Seconds spent capturing the decode step's CUDA graphs at construction; None when eager."""
        return self._graphed_decode.capture_s if self._graphed_decode.graphed else None

    def stats(self) -> EngineStats:
        with self._lock:
            queue_depth = len(self._waiting)
        now = time.monotonic()
        times = list(self._step_times)
        recent = len(times) >= 2 and now - times[-1] < 1.0
        counts = self._counts
        return EngineStats(
            live_rows=self._live_rows(),
            queue_depth=queue_depth,
            steps=counts["steps"],
            steps_per_s=(len(times) - 1) / (times[-1] - times[0]) if recent else 0.0,
            tokens_generated=counts["tokens"],
            prefix_hits=self.prefix_cache.hits,
            prefix_misses=self.prefix_cache.misses,
            requests_done=counts["done"],
            requests_cancelled=counts["cancelled"],
            cache_bytes=self.cache_bytes,
            cache_dtype=str(self._dtype).removeprefix("torch."),
            requests_failed=counts["failed"],
            peak_live_rows=counts["peak_live"],
            s3gen_batches=counts["s3gen_batches"],
        )

    def stage_times(self, request_id: str) -> StageTimes | None:
        """A live or recently finished request's stage times (a copy), None if unknown."""
        with self._lock:
            row = self._rows.get(request_id)
            times = row.times if row is not None else self._recent_times.get(request_id)
            return StageTimes(**vars(times)) if times is not None else None

    # ----------------------------------------------------------------------------- admission

    def _enqueue(
        self,
        request: TTSRequest,
        request_id: str | None,
        watermark: bool,
        ignore_stop_token: bool,
        stream: bool,
    ) -> _Row:
        loop = asyncio.get_running_loop()
        job = self.tts.jobs([request])[0]  # tokenises and checks the text, fixes seed and voice
        t3_request = job.t3_request()
        max_new_tokens = t3_request.sampling.max_new_tokens
        self._t3._check_request(0, t3_request, max_new_tokens)
        needed = T3.prefill_len(t3_request) + max_new_tokens
        if needed > self.max_positions:
            raise TextTooLongError(
                f"the request needs {needed} positions (voice prompt, text, {max_new_tokens} new tokens);"
                f" this engine's rows hold {self.max_positions}",
                "text",
            )
        row = _Row(
            id=request_id if request_id is not None else uuid.uuid4().hex,
            job=job,
            t3=t3_request,
            loop=loop,
            audio=None if stream else loop.create_future(),
            token_chunks=asyncio.Queue() if stream else None,
            watermark=watermark,
            ignore_stop_token=ignore_stop_token,
            times=StageTimes(submitted=time.monotonic()),
        )
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if row.id in self._rows:
                raise ValueError(f"request id {row.id!r} is already in the engine")
            self._rows[row.id] = row
            self._waiting.append(row)
            self._lock.notify_all()
        return row

    # ------------------------------------------------------------------------------- T3 loop

    def _t3_loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._waiting or self._live_rows()):
                        self._lock.wait()
                    if self._closing:
                        return
                try:
                    self._iteration()
                except Exception as error:  # a fault in a shared step fails the rows in it, not the loop
                    for row in [*self._decoding, *filter(None, [self._prefilling])]:
                        self._fail(row, error)
                    self._decoding, self._prefilling = [], None

    def _iteration(self) -> None:
        """Drop cancelled rows, admit waiting requests, run one decode step over the live rows."""
        with self._lock:
            cancelled = [row for row in self._waiting if row.cancelled]
            for row in cancelled:
                self._waiting.remove(row)
        for row in cancelled:
            self._drop(row)
        for row in [row for row in self._decoding if row.cancelled][::-1]:  # descending slots
            self._release(row)
            self._drop(row)
        if self._prefilling is not None and self._prefilling.cancelled:
            self._drop(self._prefilling)
            self._prefilling = None
        self._admit()
        self._counts["peak_live"] = max(self._counts["peak_live"], self._live_rows())
        if self._decoding:
            self._decode_step()

    def _live_rows(self) -> int:
        """Rows holding a cache row: decoding, or in the middle of a split prefill."""
        return len(self._decoding) + (self._prefilling is not None)

    def _next_waiting(self) -> _Row | None:
        with self._lock:
            return self._waiting.popleft() if self._waiting else None

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, at most ``prefill_chunk_tokens`` positions."""
        budget = self.config.prefill_chunk_tokens or math.inf
        while budget > 0:
            row = self._prefilling
            if row is None:
                if len(self._decoding) >= self.config.max_slots:
                    return
                row = self._next_waiting()
                if row is None:
                    return
            try:
                if row is not self._prefilling:
                    self._begin_prefill(row, slot=len(self._decoding))
                positions, logits = self._prefill_chunk(row, budget)
            except Exception as error:  # e.g. a voice whose tensors do not fit the model
                self._prefilling = None
                self._fail(row, error)
                continue
            budget -= positions
            if logits is None:
                self._prefilling = row
            else:
                self._prefilling = None
                self._start_decoding(row, logits)

    def _begin_prefill(self, row: _Row, slot: int) -> None:
        """Give the row a cache row; on a prefix hit its voice prefix is copied in."""
        row.slot = slot
        row.times.admitted = time.monotonic()
        row.prefix_len = 1 + row.t3.prompt_speech_tokens.numel()
        text = self._t3.text_embeds(row.t3)  # (Lt + 1, W)
        prefix = self.prefix_cache.get(row.job.voice.id)
        if prefix is None:
            row.pending = torch.cat((self._t3.prefix_embeds(row.t3), text))  # (1 + P + Lt + 1, W)
            row.length = 0
        else:
            self._cache.write_prefix(slot, *prefix)
            row.prefix_cached = True
            row.pending = text
            row.length = row.prefix_len

    def _prefill_chunk(self, row: _Row, budget: float) -> tuple[int, torch.Tensor | None]:
        """Run the row's next prefill positions; returns how many, and the logits after START once
        the prefill is complete (1, V)."""
        assert row.pending is not None
        n = len(row.pending)
        if row.length < row.prefix_len:
            # A computed prefix is a forward of its own, so its K/V are the very tensors a later
            # request of the voice copies: cached and uncached prefills then agree exactly.
            n = min(n, row.prefix_len - row.length)
        n = int(min(n, budget))
        context = SlotContext.prefill(self._cache, row.slot, row.length, n, self._dtype, self._device)
        positions = torch.arange(row.length, row.length + n, device=self._device)[None]  # (1, n)
        logits = self._t3.last_logits(row.pending[None, :n], positions, context)  # (1, V)
        row.length += n
        row.pending = row.pending[n:]
        if not row.prefix_cached and row.length == row.prefix_len:
            self.prefix_cache.put(row.job.voice.id, *self._cache.read_prefix(row.slot, row.prefix_len))
        if len(row.pending):
            return n, None
        row.pending = None
        return n, logits

    def _start_decoding(self, row: _Row, logits: torch.Tensor) -> None:
        """Pack the prefilled row after the decoding rows and make its first draw."""
        slot = len(self._decoding)
        if row.slot != slot:  # decoding rows retired during a split prefill
            self._cache.move_row(row.slot, slot, row.length)
            row.slot = slot
        self._state.load(slot, row)
        self._decoding.append(row)
        # The reference never checks its first draw for STOP, so a first STOP does not end a row.
        token = self._draw(logits, slot, slot + 1)
        # The first draw saw only START in its history; from here on the history is the row's own.
        self._state.seen[slot : slot + 1] = F.one_hot(self._state.tokens[slot : slot + 1], self._state.vocab)
        row.times.first_token = time.monotonic()
        self._record(row, token[0])

    # ------------------------------------------------------------------------------ decoding

    def _decode_step(self) -> None:
        """One token for every decoding row (rows 0..B-1), each at its own position."""
        rows, state = self._decoding, self._state
        B = len(rows)
        kv_len = max(row.length for row in rows) + 1
        lengths = state.lengths[:B]  # (B,) each row's next position
        if self._graphed_decode.graphed:  # static shapes: attention over the whole cache
            logits = self._graphed_decode(state.tokens[:B], lengths)  # (B, V)
        else:
            context = SlotContext.decode(self._cache, lengths, kv_len, self._dtype)  # mask (B, 1, 1, kv_len)
            logits = self._t3.decode_step(state.tokens[:B], lengths, context)  # (B, V)
        state.lengths[:B] += 1
        tokens = self._draw(logits, 0, B)
        self._counts["steps"] += 1
        self._step_times.append(time.monotonic())
        finished = []
        for row, token in zip(rows, tokens, strict=True):
            row.length += 1
            self._record(row, token)
            if len(row.tokens) >= row.limit or (token == STOP_SPEECH_TOKEN and not row.ignore_stop_token):
                finished.append(row)
        for row in finished[::-1]:  # descending slots: a moved row is never one still to release
            self._release(row)
            self._finish_t3(row)

    def _draw(self, logits: torch.Tensor, first: int, stop: int) -> list[int]:
        """Sample one token for rows first..stop-1 from their logits (B, V) with their own settings
        and history; updates their state and returns the tokens (the loop's one host sync)."""
        state, rows = self._state, slice(first, stop)
        candidates = max(row.t3.sampling.top_k for row in self._decoding[rows])
        scores = process_logits(
            logits,
            state.seen[rows],
            state.temperature[rows],
            state.top_k[rows],
            state.top_p[rows],
            state.repetition_penalty[rows],
            candidates,
        )
        tokens = sample(scores, state.keys[rows], state.counts[rows])  # (B,)
        state.tokens[rows] = tokens
        state.counts[rows] += 1
        state.seen[rows].scatter_(1, tokens[:, None], True)
        self._counts["tokens"] += stop - first
        return tokens.tolist()

    def _record(self, row: _Row, token: int) -> None:
        row.tokens.append(token)
        if row.token_chunks is not None and token < SPEECH_VOCAB_SIZE:
            _post(row, row.token_chunks.put_nowait, torch.tensor([token]))

    def _release(self, row: _Row) -> None:
        """Free a decoding row's cache row, moving the last decoding row into it."""
        last = self._decoding.pop()
        if last is not row:
            self._cache.move_row(last.slot, row.slot, last.length)
            self._state.move(last.slot, row.slot)
            self._decoding[row.slot] = last
            last.slot = row.slot

    def _finish_t3(self, row: _Row) -> None:
        row.times.t3_done = time.monotonic()
        if row.token_chunks is not None:
            self._forget(row, "done")
            _post(row, row.token_chunks.put_nowait, _END)
        else:
            self._vocode_queue.put(row)

    # ---------------------------------------------------------------------------- S3Gen stage

    def _s3gen_loop(self) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        with torch.inference_mode(), torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            while True:
                batch = [self._vocode_queue.get()]
                if stream is not None:  # voices reach the device on the default stream
                    stream.wait_stream(torch.cuda.default_stream(self._device))
                while len(batch) < self.config.s3gen_max_batch:
                    try:
                        batch.append(self._vocode_queue.get_nowait())
                    except queue.Empty:
                        break
                if _END in batch or self._closing:
                    return  # close() fails whatever is left
                rows = [row for row in batch if isinstance(row, _Row)]
                for row in rows:
                    if row.cancelled:
                        self._drop(row)
                self._vocode([row for row in rows if not row.cancelled])

    def _vocode(self, rows: list[_Row]) -> None:
        """One S3Gen batch; if it fails, each row again alone so the error stays with its row."""
        if not rows:
            return
        start = time.monotonic()
        for row in rows:
            row.times.s3gen_start = start
        try:
            wavs = self.tts.vocode_jobs([row.job for row in rows], [row.speech_tokens() for row in rows])
        except Exception as error:
            if len(rows) == 1:
                self._fail(rows[0], error)
            else:
                for row in rows:
                    self._vocode([row])
            return
        self._counts["s3gen_batches"] += 1
        done = time.monotonic()
        for row, wav in zip(rows, wavs, strict=True):
            row.times.s3gen_done = done
            try:
                audio = self.tts.watermark(wav) if row.watermark else wav
            except Exception as error:
                self._fail(row, error)
                continue
            assert row.audio is not None
            self._forget(row, "done")
            _post(row, _set_result, row.audio, audio)

    # ------------------------------------------------------------------------------- endings

    def _forget(self, row: _Row, outcome: str) -> None:
        """The row leaves the engine: count it and keep its stage times for a while. Called before
        the caller hears of it, so the counts already include it when the caller looks."""
        with self._lock:
            if self._rows.pop(row.id, None) is not row:
                return
            self._recent_times[row.id] = row.times
            while len(self._recent_times) > RECENT_TIMES:
                self._recent_times.popitem(last=False)
            self._counts[outcome] += 1

    def _drop(self, row: _Row) -> None:
        """A cancelled row leaves: its submit raises CancelledError, its stream ends with it."""
        self._forget(row, "cancelled")
        message = f"request {row.id} was cancelled"
        if row.audio is not None:
            _post(row, row.audio.cancel, message)
        if row.token_chunks is not None:
            _post(row, row.token_chunks.put_nowait, asyncio.CancelledError(message))

    def _fail(self, row: _Row, error: BaseException) -> None:
        self._forget(row, "failed")
        if row.audio is not None:
            _post(row, _set_exception, row.audio, error)
        if row.token_chunks is not None:
            _post(row, row.token_chunks.put_nowait, error)


def call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    """Run callback(*args) on a caller's event loop, from an engine thread."""
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


def _post(row: _Row, callback: Callable[..., object], *args: object) -> None:
    """Run callback(*args) on the row's caller's event loop."""
    call_in_loop(row.loop, callback, *args)


def _set_result(future: asyncio.Future[np.ndarray], audio: np.ndarray) -> None:
    if not future.done():
        future.set_result(audio)


def _set_exception(future: asyncio.Future[np.ndarray], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _allocate_cache(
    config: GPT2Config, slots: int, positions: int, dtype: torch.dtype, device: torch.device
) -> SlotCache:
    """The slot cache, or EngineCapacityError naming a capacity that fits the free memory."""
    needed = SlotCache.nbytes_for(config, slots, positions, dtype)
    free = _free_memory(device)
    if needed <= free:
        try:
            return SlotCache(config, slots, positions, dtype, device)
        except RuntimeError as error:  # torch.OutOfMemoryError, or the CPU allocator's refusal
            raise EngineCapacityError(_capacity_message(config, slots, positions, dtype, free)) from error
    raise EngineCapacityError(_capacity_message(config, slots, positions, dtype, free))


def _capacity_message(config: GPT2Config, slots: int, positions: int, dtype: torch.dtype, free: int) -> str:
    per_position = SlotCache.nbytes_for(config, 1, 1, dtype)
    usable = int(free * CAPACITY_HEADROOM)
    fitting_slots = usable // (per_position * positions)
    fitting_positions = usable // (per_position * slots)
    gib = 2**30
    message = (
        f"a KV cache of max_slots={slots} x max_positions={positions} ({dtype}) needs "
        f"{per_position * slots * positions / gib:.2f} GiB, but {free / gib:.2f} GiB is free"
    )
    if fitting_slots >= 1:
        message += f"; max_slots={fitting_slots} (at max_positions={positions})"
        if fitting_positions >= 2:
            message += f" or max_positions={fitting_positions} (at max_slots={slots})"
        return message + " would fit"
    return message + f"; not even max_slots=1 fits: try max_positions={usable // per_position}"


def _free_memory(device: torch.device) -> int:
    """Bytes a new allocation may take on the device (CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
