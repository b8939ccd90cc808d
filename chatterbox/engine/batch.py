"""DecodeBatch: T3's decode core, synchronous and thread-free.

    row = batch.make_row(t3_request)   # validates; touches no batch state
    batch.admit(row)
    while batch.has_work:
        failed = batch.prefill()       # waiting rows into free cache rows, with their first draw
        finished = batch.step()        # one token per decoding row; the rows that stopped

The server's T3 thread, ``generate_tokens`` (``TurboTTS.generate``) and the GPU suite all run it.
Each request owns a ``SlotCache`` row and samples with its own settings, history and seed, so its
tokens do not depend on what shares its steps. The stop rule (``_stops``) and the speech-token
filter (``speech_only``) live here only.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from chatterbox.constants import SPEECH_VOCAB_SIZE, START_SPEECH_TOKEN, STOP_SPEECH_TOKEN
from chatterbox.engine.capacity import allocate_cache
from chatterbox.engine.config import DEFAULT_TOKEN_CAP, TokenCap
from chatterbox.engine.cuda_graphs import GraphedDecodeStep, static_slot_step
from chatterbox.engine.kv_cache import PrefixCache, SlotContext
from chatterbox.errors import TextTooLongError
from chatterbox.t3 import T3, T3Request
from chatterbox.t3.sampler import process_logits, sample, seed_keys


def speech_only(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(N,) int64 CPU: the draws S3Gen vocodes (START, STOP and any id >= 6561 dropped)."""
    ids = torch.as_tensor(tokens, dtype=torch.long).cpu()
    return ids[ids < SPEECH_VOCAB_SIZE]


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
class Row:
    """One request in a DecodeBatch: waiting, prefilling, decoding, then retired."""

    request: T3Request  # its seed is always set (make_row draws one when it is None)
    key: str = ""  # the caller's name for the row (the engine's request id)
    voice_id: str | None = None  # the PrefixCache key of its voice prefix; None: not cached
    ignore_stop_token: bool = False
    cache_row: int = -1
    prefix_len: int = 0  # 1 + P: speaker embedding and voice prompt
    prefix_cached: bool = False
    pending: torch.Tensor | None = None  # (n, W) prefill embeddings not yet run
    length: int = 0  # positions in the cache = where the next input is written
    tokens: list[int] = field(default_factory=list)  # every draw, STOP included
    taken: int = 0  # draws already handed out by take_speech_tokens
    times: StageTimes = field(default_factory=lambda: StageTimes(submitted=time.monotonic()))

    @property
    def limit(self) -> int:
        """Draws at most: one from the prefill, then one per decode step."""
        return self.request.sampling.max_new_tokens + 1

    def speech_tokens(self) -> torch.Tensor:
        return speech_only(self.tokens)

    def take_speech_tokens(self) -> torch.Tensor:
        """The speech tokens drawn since the last call (for streaming)."""
        new = self.tokens[self.taken :]
        self.taken = len(self.tokens)
        return speech_only(new)


def _stops(row: Row, cap: TokenCap | None) -> bool:
    """The stop rule, after each draw: the row's limit, the token cap for its text length, or STOP.
    A row that ignores STOP runs to its limit (the cap stands in for a STOP). The reference never
    checks its first draw for STOP, so a first STOP does not end a row."""
    drawn = len(row.tokens)
    if drawn >= row.limit:
        return True
    if row.ignore_stop_token:
        return False
    if cap is not None and drawn >= cap.tokens(row.request.text_tokens.numel()):
        return True
    return drawn > 1 and row.tokens[-1] == STOP_SPEECH_TOKEN


class _SamplerState:
    """Per-row sampler state, (max_rows, ...) tensors on the model's device; rows 0..B-1 decode.

    Persistent and updated in place, so a captured decode graph can read it.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.vocab = vocab
        self.tokens = zeros(rows)  # last draw: the next decode input
        self.lengths = zeros(rows)  # positions in the cache = the next input's position
        self.seen = zeros(rows, vocab, dtype=torch.bool)  # ids the repetition penalty applies to
        self.counts = zeros(rows)  # draws so far (the noise step)
        self.keys = zeros(rows)  # sampling noise keys
        self.temperature = zeros(rows, dtype=torch.float32)
        self.top_k = zeros(rows)
        self.top_p = zeros(rows, dtype=torch.float32)
        self.repetition_penalty = zeros(rows, dtype=torch.float32)

    def _tensors(self) -> Iterator[torch.Tensor]:
        return (value for value in vars(self).values() if isinstance(value, torch.Tensor))

    def load(self, index: int, row: Row) -> None:
        """Set a freshly prefilled row's state; its history is START alone."""
        params = row.request.sampling
        assert params.seed is not None
        self.lengths[index] = row.length
        self.counts[index] = 0
        self.seen[index] = False
        self.seen[index, START_SPEECH_TOKEN] = True
        self.keys[index] = seed_keys(torch.tensor([params.seed]))[0]
        self.temperature[index] = params.temperature
        self.top_k[index] = params.top_k
        self.top_p[index] = params.top_p
        self.repetition_penalty[index] = params.repetition_penalty

    def move(self, src: int, dst: int) -> None:
        for tensor in self._tensors():
            tensor[dst] = tensor[src]


class DecodeBatch:
    """Continuous batching of T3 rows over one fixed ``SlotCache`` (live rows packed in 0..B-1)."""

    def __init__(
        self,
        t3: T3,
        max_rows: int,
        max_positions: int,
        prefix_cache_voices: int = 0,
        cuda_graphs: bool = False,
        token_cap: TokenCap | None = DEFAULT_TOKEN_CAP,
    ) -> None:
        table = t3.config.gpt2.positions
        if max_positions > table:
            raise ValueError(f"max_positions {max_positions} exceeds T3's position table ({table})")
        self.t3 = t3
        self.max_rows = max_rows
        self.max_positions = max_positions
        self.token_cap = token_cap
        self.dtype = t3.speech_emb.weight.dtype
        self.device = t3.device
        self.cache = allocate_cache(t3.config.gpt2, max_rows, max_positions, self.dtype, self.device)
        self.prefix_cache = PrefixCache(prefix_cache_voices)
        self.graphed_decode = GraphedDecodeStep(
            static_slot_step(t3, self.cache),
            max_rows,
            max_positions - 1,
            self.device,
            enabled=cuda_graphs,
            dtype=self.dtype,
        )
        self._state = _SamplerState(max_rows, t3.config.speech_vocab, self.device)
        self.waiting: deque[Row] = deque()  # admitted, no cache row yet
        self.decoding: list[Row] = []  # decoding[i] holds cache row i
        self.prefilling: Row | None = None  # holds a cache row, its prefill split across calls
        self.steps = 0
        self.tokens_drawn = 0
        self.peak_live = 0

    def make_row(
        self,
        request: T3Request,
        key: str = "",
        voice_id: str | None = None,
        ignore_stop_token: bool = False,
        index: int = 0,
    ) -> Row:
        """A validated row for ``request`` (ValueError or TextTooLongError if it cannot run here).
        Reads no batch state, so any thread may call it."""
        max_new_tokens = request.sampling.max_new_tokens
        self.t3._check_request(index, request, max_new_tokens)
        needed = T3.prefill_len(request) + max_new_tokens
        if needed > self.max_positions:
            raise TextTooLongError(
                f"the request needs {needed} positions (voice prompt, text, {max_new_tokens} new tokens);"
                f" this engine's rows hold {self.max_positions}",
                "text",
            )
        if request.sampling.seed is None:
            request = replace(request, sampling=replace(request.sampling, seed=secrets.randbits(63)))
        return Row(request, key, voice_id, ignore_stop_token)

    def admit(self, row: Row) -> None:
        """Queue a row from ``make_row``; ``prefill`` gives it a cache row when one is free."""
        self.waiting.append(row)

    @property
    def live(self) -> int:
        """Rows holding a cache row: decoding, or in the middle of a split prefill."""
        return len(self.decoding) + (self.prefilling is not None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.live > 0

    def cancel(self, row: Row) -> bool:
        """Drop a row wherever it is; its cache row is free for the next prefill. False if absent."""
        if row is self.prefilling:
            self.prefilling = None
        elif row in self.decoding:
            self._release(row)
        elif row in self.waiting:
            self.waiting.remove(row)
        else:
            return False
        return True

    def abort(self) -> list[Row]:
        """Drop every row holding a cache row (after a fault in a shared step); returns them."""
        rows = [*self.decoding, *filter(None, [self.prefilling])]
        self.decoding, self.prefilling = [], None
        return rows

    def prefill(self, budget: int | None = None) -> list[tuple[Row, Exception]]:
        """Prefill waiting rows into free cache rows, at most ``budget`` positions (None: no bound);
        each completed prefill makes its row's first draw. Returns the rows that failed, with why."""
        left: float = budget or math.inf
        failed: list[tuple[Row, Exception]] = []
        while left > 0:
            row = self.prefilling
            if row is None:
                if len(self.decoding) >= self.max_rows or not self.waiting:
                    break
                row = self.waiting.popleft()
            try:
                if row is not self.prefilling:
                    self._begin_prefill(row, len(self.decoding))
                positions, logits = self._prefill_chunk(row, left)
            except Exception as error:  # e.g. a voice whose tensors do not fit the model
                self.prefilling = None
                failed.append((row, error))
                continue
            left -= positions
            if logits is None:
                self.prefilling = row
            else:
                self.prefilling = None
                self._start_decoding(row, logits)
        self.peak_live = max(self.peak_live, self.live)
        return failed

    def _begin_prefill(self, row: Row, cache_row: int) -> None:
        """Give the row a cache row; on a prefix hit its voice prefix is copied in."""
        row.cache_row = cache_row
        row.times.admitted = time.monotonic()
        row.prefix_len = 1 + row.request.prompt_speech_tokens.numel()
        text = self.t3.text_embeds(row.request)  # (Lt + 1, W)
        prefix = self.prefix_cache.get(row.voice_id) if row.voice_id is not None else None
        if prefix is None:
            row.pending = torch.cat((self.t3.prefix_embeds(row.request), text))  # (1 + P + Lt + 1, W)
            row.length = 0
        else:
            self.cache.write_prefix(cache_row, *prefix)
            row.prefix_cached = True
            row.pending = text
            row.length = row.prefix_len

    def _prefill_chunk(self, row: Row, budget: float) -> tuple[int, torch.Tensor | None]:
        """Run the row's next prefill positions; returns how many, and the logits after START once
        the prefill is complete (1, V)."""
        assert row.pending is not None
        n = len(row.pending)
        if row.length < row.prefix_len:
            # A computed prefix is a forward of its own, so its K/V are the very tensors a later
            # request of the voice copies: cached and uncached prefills then agree exactly.
            n = min(n, row.prefix_len - row.length)
        n = int(min(n, budget))
        context = SlotContext.prefill(self.cache, row.cache_row, row.length, n, self.dtype, self.device)
        positions = torch.arange(row.length, row.length + n, device=self.device)[None]  # (1, n)
        logits = self.t3.last_logits(row.pending[None, :n], positions, context)  # (1, V)
        row.length += n
        row.pending = row.pending[n:]
        if not row.prefix_cached and row.length == row.prefix_len and row.voice_id is not None:
            self.prefix_cache.put(row.voice_id, *self.cache.read_prefix(row.cache_row, row.prefix_len))
        if len(row.pending):
            return n, None
        row.pending = None
        return n, logits

    def _start_decoding(self, row: Row, logits: torch.Tensor) -> None:
        """Pack the prefilled row after the decoding rows and make its first draw."""
        index = len(self.decoding)
        if row.cache_row != index:  # decoding rows retired during a split prefill
            self.cache.move_row(row.cache_row, index, row.length)
            row.cache_row = index
        self._state.load(index, row)
        self.decoding.append(row)
        row.tokens.append(self._draw(logits, index, index + 1)[0])
        # The first draw saw only START in its history; from here on the history is the row's own.
        state = self._state
        state.seen[index : index + 1] = F.one_hot(state.tokens[index : index + 1], state.vocab)
        row.times.first_token = time.monotonic()
        assert not _stops(row, self.token_cap)  # limit and cap >= 2, and a first STOP never stops

    def step(self) -> list[Row]:
        """One token for every decoding row (rows 0..B-1), each at its own position; returns the
        rows that stopped, already released from the cache."""
        rows, state = self.decoding, self._state
        B = len(rows)
        if not B:
            return []
        lengths = state.lengths[:B]  # (B,) each row's next position
        if self.graphed_decode.graphed:  # static shapes: attention over the whole cache
            logits = self.graphed_decode(state.tokens[:B], lengths)  # (B, V)
        else:
            kv_len = max(row.length for row in rows) + 1
            context = SlotContext.decode(self.cache, lengths, kv_len, self.dtype)  # mask (B, 1, 1, kv_len)
            logits = self.t3.decode_step(state.tokens[:B], lengths, context)  # (B, V)
        state.lengths[:B] += 1
        tokens = self._draw(logits, 0, B)
        self.steps += 1
        finished = []
        for row, token in zip(rows, tokens, strict=True):
            row.length += 1
            row.tokens.append(token)
            if _stops(row, self.token_cap):
                row.times.t3_done = time.monotonic()
                finished.append(row)
        for row in finished[::-1]:  # descending rows: a moved row is never one still to release
            self._release(row)
        return finished

    def _draw(self, logits: torch.Tensor, first: int, stop: int) -> list[int]:
        """Sample one token for rows first..stop-1 from their logits (B, V) with their own settings
        and history; updates their state and returns the tokens (the loop's one host sync)."""
        state, rows = self._state, slice(first, stop)
        candidates = max(row.request.sampling.top_k for row in self.decoding[rows])
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
        self.tokens_drawn += stop - first
        return tokens.tolist()

    def _release(self, row: Row) -> None:
        """Free a decoding row's cache row, moving the last decoding row into it."""
        last = self.decoding.pop()
        if last is not row:
            self.cache.move_row(last.cache_row, row.cache_row, last.length)
            self._state.move(last.cache_row, row.cache_row)
            self.decoding[row.cache_row] = last
            last.cache_row = row.cache_row


@torch.inference_mode()
def generate_tokens(
    t3: T3, requests: Sequence[T3Request], ignore_stop_token: bool = False
) -> list[torch.Tensor]:
    """Every request's speech tokens, all in one batch: admit all, step until none is live.

    Returns one (N_i,) int64 CPU tensor per request (ids >= 6561 dropped). Every request is checked
    before any model work; ``ignore_stop_token`` runs every row to its token limit.
    """
    if not requests:
        return []
    longest = max(T3.prefill_len(r) + r.sampling.max_new_tokens for r in requests)
    batch = DecodeBatch(t3, len(requests), min(longest, t3.config.gpt2.positions))
    rows = [
        batch.make_row(request, ignore_stop_token=ignore_stop_token, index=i)
        for i, request in enumerate(requests)
    ]
    for row in rows:
        batch.admit(row)
    while batch.has_work:
        failed = batch.prefill()
        if failed:
            raise failed[0][1]
        batch.step()
    return [row.speech_tokens() for row in rows]
