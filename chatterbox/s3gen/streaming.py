"""Streaming S3Gen: 24 kHz audio from a growing speech-token sequence, hop by hop.

A hop's flow row is [voice prompt | up to ``left_context`` played tokens | the hop | ``lookahead``
tokens]; with 3 lookahead tokens (the encoder's pre-lookahead conv) the hop's last frames see what
the full decode sees there, and only attention sees a shorter row. Lookahead frames are decoded
again by the next hop; once finished, the 3 silence tokens join and the final hop plays the rest.

Seams: a hop's last ``overlap_frames`` played frames are held back and vocoded again at the start
of the next segment, with their excitation (HiFT's source cache) and running harmonic phase carried
over, and cross-faded; concatenated pieces are exactly as long as the full decode.

Every random value is fixed by its absolute position (``PositionalNoise``), so a stream's audio
depends only on its tokens, voice, seed and schedule, and a stream whose tokens all arrive before
its first hop equals the full decode with the same draws. ``StreamingS3Gen.step`` batches the next
hop of several streams as ``S3Gen`` batches whole utterances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatterbox.constants import (
    S3GEN_MEL_BINS,
    S3GEN_MEL_FRAMES_PER_TOKEN,
    S3GEN_SILENCE_TOKEN,
    S3GEN_SILENCE_TOKENS_APPENDED,
    S3GEN_SR,
    SPEECH_VOCAB_SIZE,
)
from chatterbox.s3gen.encoder import PRE_LOOKAHEAD_TOKENS
from chatterbox.s3gen.hift import HARMONICS, SAMPLES_PER_FRAME, draw_source_noise, frame_mask
from chatterbox.s3gen.s3gen import S3Gen, S3GenNoise, S3GenRequest

NOISE_BLOCK_FRAMES = 50  # positional noise is drawn in blocks of 1 s of mel frames
_FLOW_NOISE, _SOURCE_NOISE, _PHASES = "flow", "source", "phases"


@dataclass(frozen=True)
class HopSchedule:
    """How a stream cuts its tokens into hops (the shape of vLLM-Omni's recipe: small, then doubling)."""

    first_hop: int = 16  # tokens the first hop plays (0.64 s of audio)
    growth: float = 2.0  # each later hop plays this many times the tokens of the one before ...
    max_hop: int = 60  # ... up to this many (2.4 s)
    lookahead: int = PRE_LOOKAHEAD_TOKENS  # tokens a non-final hop waits for and does not play
    left_context: int = 50  # tokens already played that a hop's flow row encodes again
    overlap_frames: int = 8  # mel frames vocoded again and cross-faded at a seam (8 = 160 ms)

    def __post_init__(self) -> None:
        for name in ("first_hop", "max_hop", "lookahead", "left_context", "overlap_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.first_hop < 1:
            raise ValueError("first_hop must be at least 1 token")
        if self.max_hop < self.first_hop:
            raise ValueError(f"max_hop ({self.max_hop}) must be at least first_hop ({self.first_hop})")
        if not (math.isfinite(self.growth) and self.growth >= 1):
            raise ValueError(f"growth must be a finite number >= 1, got {self.growth!r}")
        # A hop holds back its last overlap_frames frames, so it must play at least that many (the
        # first hop plays one frame fewer after an odd-length prompt mel).
        if S3GEN_MEL_FRAMES_PER_TOKEN * self.first_hop - 1 < self.overlap_frames:
            raise ValueError(
                f"overlap_frames ({self.overlap_frames}) must not exceed the first hop's "
                f"{S3GEN_MEL_FRAMES_PER_TOKEN * self.first_hop - 1} frames"
            )

    def hop_tokens(self, previous: int | None) -> int:
        """Tokens a non-final hop plays after one that played ``previous`` (None: the first hop)."""
        if previous is None:
            return self.first_hop
        return min(self.max_hop, max(previous, round(previous * self.growth)))


class PositionalNoise:
    """A stream's random draws, each fixed by its absolute position.

    Flow noise per mel frame of the whole sequence [prompt | speech | silence] (the frame layout of
    ``S3GenNoise.flow``), source noise per speech frame (480 samples each) and the harmonic phases.
    Frames are drawn in blocks of ``NOISE_BLOCK_FRAMES`` from a generator seeded by (seed, kind,
    block), so a slice is the same whichever hop asks for it.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        self.phases, _ = draw_source_noise(0, self._generator(_PHASES, 0))  # (9,)

    def _generator(self, kind: str, block: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{kind}:{block}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _frames(self, kind: str, rows: int, per_frame: int, start: int, stop: int) -> torch.Tensor:
        """(rows, per_frame * (stop - start)) standard normal values of frames [start, stop)."""
        if stop <= start:
            return torch.zeros(rows, 0, device=self.device)
        first, last = start // NOISE_BLOCK_FRAMES, (stop - 1) // NOISE_BLOCK_FRAMES
        width = per_frame * NOISE_BLOCK_FRAMES
        blocks = torch.cat(
            [
                torch.randn(rows, width, generator=self._generator(kind, b), device=self.device)
                for b in range(first, last + 1)
            ],
            dim=1,
        )
        offset = first * NOISE_BLOCK_FRAMES
        return blocks[:, per_frame * (start - offset) : per_frame * (stop - offset)]

    def flow(self, start: int, stop: int) -> torch.Tensor:
        """(80, stop - start) flow starting noise of frames [start, stop) of the whole sequence."""
        return self._frames(_FLOW_NOISE, S3GEN_MEL_BINS, 1, start, stop)

    def source(self, start: int, stop: int) -> torch.Tensor:
        """(9, 480 * (stop - start)) HiFT source noise of speech frames [start, stop)."""
        return self._frames(_SOURCE_NOISE, HARMONICS, SAMPLES_PER_FRAME, start, stop)

    def utterance(self, request: S3GenRequest) -> S3GenNoise:
        """The same positions' draws for a whole utterance: ``S3Gen.generate`` with these gives the
        full decode a stream of ``request.speech_tokens`` is measured against."""
        return S3GenNoise(
            flow=self.flow(0, S3GEN_MEL_FRAMES_PER_TOKEN * request.n_tokens),
            phases=self.phases,
            source=self.source(0, request.n_speech_frames),
        )


@dataclass(frozen=True)
class Hop:
    """Token spans of one hop, in the stream's sequence (speech tokens, then silence once finished)."""

    context: int  # first token of the flow row after the voice prompt
    start: int  # first token played
    stop: int  # one past the last token played
    row_stop: int  # one past the last token of the flow row (stop + lookahead; stop when final)
    final: bool


@dataclass
class _Seam:
    """What a non-final hop leaves for the next: its last played frames, held back."""

    mel: torch.Tensor  # (80, k) mel frames, vocoded again at the start of the next segment
    audio: torch.Tensor  # (480k,) their audio, cross-faded into the next hop's
    excitation: torch.Tensor  # (480k,) their source excitation, reused by the next hop
    cycles: torch.Tensor  # (9,) each harmonic's running phase in cycles (mod 1) after them


class S3GenStream:
    """One utterance decoded while its tokens arrive: ``push`` tokens, then ``finish``; each
    ``StreamingS3Gen.step`` that includes this stream plays its next hop."""

    def __init__(self, request: S3GenRequest, noise: PositionalNoise, schedule: HopSchedule) -> None:
        self.request = request  # the voice and seed; its speech_tokens are the first tokens pushed
        self.noise = noise
        self.schedule = schedule
        self.tokens: list[int] = request.speech_tokens.tolist()  # + 3 silence tokens once finished
        self.finished = False
        self.done = False  # the final hop has been played
        self.played = 0  # tokens of ``tokens`` played (their audio emitted or held back)
        self._last_hop: int | None = None  # tokens of the last non-final hop
        self._seam: _Seam | None = None

    def push(self, tokens: torch.Tensor) -> None:
        """Append speech tokens, a 1-D integer tensor of ids < 6561."""
        if self.finished:
            raise ValueError("the stream is finished: no more tokens")
        integer = not (
            tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool
        )
        if tokens.ndim != 1 or not integer:
            raise ValueError(
                f"tokens must be a 1-D tensor of integer ids, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        ids = tokens.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < SPEECH_VOCAB_SIZE:
            raise ValueError(
                f"tokens must be in [0, {SPEECH_VOCAB_SIZE}), got values in [{min(ids)}, {max(ids)}]"
            )
        self.tokens.extend(ids)

    def finish(self) -> None:
        """No more tokens: the final hop plays the rest and the 3 silence tokens of the full path."""
        if not self.finished:
            self.tokens.extend([S3GEN_SILENCE_TOKEN] * S3GEN_SILENCE_TOKENS_APPENDED)
            self.finished = True

    def next_hop(self) -> Hop | None:
        """The hop the next step would play, or None while too few tokens have arrived."""
        if self.done:
            return None
        size = self.schedule.hop_tokens(self._last_hop)
        remaining = len(self.tokens) - self.played
        lookahead = self.schedule.lookahead
        if self.finished and remaining <= size + lookahead:
            stop = row_stop = len(self.tokens)
        elif remaining >= size + lookahead:
            stop = self.played + size
            row_stop = stop + lookahead
        else:
            return None
        context = max(0, self.played - self.schedule.left_context)
        return Hop(context, self.played, stop, row_stop, final=stop == len(self.tokens) and self.finished)

    def _advance(self, hop: Hop, seam: _Seam | None) -> None:
        """``hop`` was played and left ``seam`` (None: it was the final hop)."""
        self.played = hop.stop
        self._seam = seam
        if hop.final:
            self.done = True
        else:
            self._last_hop = hop.stop - hop.start

    def _speech_frame(self, token: int) -> int:
        """Index of token ``token``'s first mel frame among the speech frames the full path returns
        (they start after the prompt mel, one frame into the first token after an odd prompt)."""
        prompt_frames = self.request.prompt_feat.shape[0]
        n_prompt = self.request.prompt_tokens.numel()
        return max(0, S3GEN_MEL_FRAMES_PER_TOKEN * (n_prompt + token) - prompt_frames)


def _fade_in(samples: int, device: torch.device) -> torch.Tensor:
    """(samples,) raised cosine rising from 0 to 1; 1 minus it is the matching fade-out."""
    n = torch.arange(samples, device=device, dtype=torch.float32)
    return (1 - torch.cos(math.pi * (n + 0.5) / samples)) / 2


class StreamingS3Gen:
    """Streams over one ``S3Gen``: ``open`` one per utterance, ``step`` the ready ones together."""

    def __init__(self, s3gen: S3Gen, schedule: HopSchedule | None = None) -> None:
        self.s3gen = s3gen
        self.schedule = schedule or HopSchedule()

    def open(self, request: S3GenRequest) -> S3GenStream:
        """A stream with ``request``'s voice and seed (None: a random one), starting with its
        ``speech_tokens`` (may be empty)."""
        request.validate(0)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        return S3GenStream(request, PositionalNoise(seed, self.s3gen.device), self.schedule)

    @torch.inference_mode()
    def step(self, streams: Sequence[S3GenStream]) -> list[torch.Tensor]:
        """Play the next hop of every stream (each must have one: ``next_hop()`` is not None), all
        in one flow call. Returns each stream's new audio, float32 on the CPU."""
        if not streams:
            raise ValueError("no streams")
        hops = []
        for i, stream in enumerate(streams):
            hop = stream.next_hop()
            if hop is None:
                raise ValueError(f"stream {i} has no hop ready")
            hops.append(hop)
        played = self._vocode(streams, hops, self._flow(streams, hops))
        # Streams advance only once every hop of the step is decoded, so a step that raises leaves
        # them as they were (a caller may retry each stream alone).
        for stream, hop, (_, seam) in zip(streams, hops, played, strict=True):
            stream._advance(hop, seam)
        return [piece for piece, _ in played]

    def _flow(self, streams: Sequence[S3GenStream], hops: Sequence[Hop]) -> list[torch.Tensor]:
        """Each hop's mel from its first played frame to the end of its row (lookahead included)."""
        device = self.s3gen.device
        rows = [
            torch.cat([s.request.prompt_tokens.long().cpu(), torch.tensor(s.tokens[h.context : h.row_stop])])
            for s, h in zip(streams, hops, strict=True)
        ]
        lengths = torch.tensor([row.numel() for row in rows])
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        frames = S3GEN_MEL_FRAMES_PER_TOKEN * tokens.shape[1]
        cond = torch.zeros(len(rows), S3GEN_MEL_BINS, frames, device=device)
        noise = torch.zeros(len(rows), S3GEN_MEL_BINS, frames, device=device)
        for i, (stream, hop, row) in enumerate(zip(streams, hops, rows, strict=True)):
            tokens[i, : row.numel()] = row
            prompt_feat = stream.request.prompt_feat
            cond[i, :, : prompt_feat.shape[0]] = prompt_feat.T.to(device)
            # Row frames are whole-sequence frames with the tokens before ``context`` left out.
            prompt_frames = S3GEN_MEL_FRAMES_PER_TOKEN * stream.request.prompt_tokens.numel()
            skipped = S3GEN_MEL_FRAMES_PER_TOKEN * hop.context
            noise[i, :, :prompt_frames] = stream.noise.flow(0, prompt_frames)
            noise[i, :, prompt_frames : 2 * row.numel()] = stream.noise.flow(
                prompt_frames + skipped, S3GEN_MEL_FRAMES_PER_TOKEN * row.numel() + skipped
            )
        xvectors = torch.stack([s.request.embedding.to(device, torch.float32) for s in streams])
        mel = self.s3gen.flow(tokens.to(device), lengths.to(device), cond, xvectors, noise).float()
        mels = []
        for i, (stream, hop, row) in enumerate(zip(streams, hops, rows, strict=True)):
            first = stream._speech_frame(hop.start) + stream.request.prompt_feat.shape[0]
            first -= S3GEN_MEL_FRAMES_PER_TOKEN * hop.context  # whole-sequence frame -> row frame
            mels.append(mel[i, :, first : S3GEN_MEL_FRAMES_PER_TOKEN * row.numel()])
        return mels

    def _vocode(
        self, streams: Sequence[S3GenStream], hops: Sequence[Hop], mels: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, _Seam | None]]:
        """Vocode [held-back frames | new frames | lookahead frames] per stream and join the seams:
        each stream's new audio (CPU) and the seam it leaves (None after its final hop)."""
        segments = [
            torch.cat([s._seam.mel, mel], dim=1) if s._seam is not None else mel
            for s, mel in zip(streams, mels, strict=True)
        ]
        if self.s3gen.batch_vocoder:
            return self._vocode_group(streams, hops, segments)
        return [
            self._vocode_group([stream], [hop], [segment])[0]
            for stream, hop, segment in zip(streams, hops, segments, strict=True)
        ]

    def _vocode_group(
        self, streams: Sequence[S3GenStream], hops: Sequence[Hop], segments: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, _Seam | None]]:
        """Segments through HiFT in one batch, right-padded to the longest with their lengths given
        (no masks when all are equal), each continuing its stream's sines."""
        hift, device = self.s3gen.mel2wav, self.s3gen.device
        held = [s._seam.mel.shape[1] if s._seam is not None else 0 for s in streams]
        frames = [segment.shape[1] for segment in segments]
        longest = max(frames)
        mel = torch.stack([F.pad(seg, (0, longest - n)) for seg, n in zip(segments, frames, strict=True)])
        lengths = None if min(frames) == longest else torch.tensor(frames, device=device)
        source_noise = torch.stack(
            [
                F.pad(
                    s.noise.source(s._speech_frame(h.start) - k, s._speech_frame(h.start) - k + n),
                    (0, SAMPLES_PER_FRAME * (longest - n)),
                )
                for s, h, k, n in zip(streams, hops, held, frames, strict=True)
            ]
        )  # (G, 9, 480 L)
        phases = torch.stack([s.noise.phases for s in streams])
        f0 = hift.f0_predictor(mel, frame_mask(lengths, longest))  # (G, L) Hz
        harmonic = torch.arange(1, HARMONICS + 1, device=device, dtype=f0.dtype)
        frame_cycles = f0[:, None, :] * harmonic[:, None] * (SAMPLES_PER_FRAME / S3GEN_SR)  # (G, 9, L)
        # Phase continuity: the first new frame starts where the previous hop's held-back frames ended.
        start_cycles = torch.stack(
            [
                s._seam.cycles - frame_cycles[g, :, :k].sum(-1)
                if s._seam is not None
                else torch.zeros(HARMONICS, device=device)
                for g, (s, k) in enumerate(zip(streams, held, strict=True))
            ]
        )
        excitation = hift.m_source(f0, phases, source_noise, start_cycles=start_cycles)  # (G, 1, 480L)
        for g, (stream, k) in enumerate(zip(streams, held, strict=True)):
            if k:
                excitation[g, 0, : k * SAMPLES_PER_FRAME] = stream._seam.excitation  # the source cache
        wavs = hift.decode(mel, excitation, lengths)
        played = []
        for g, (stream, hop, k) in enumerate(zip(streams, hops, held, strict=True)):
            played_end = k + stream._speech_frame(hop.stop) - stream._speech_frame(hop.start)
            if hop.final:
                played_end = frames[g]
            wav = wavs[g, : played_end * SAMPLES_PER_FRAME]  # the lookahead frames were right context
            if hop.start == 0:
                wav[: self.s3gen.trim_fade.numel()] *= self.s3gen.trim_fade
            if k:
                overlap = k * SAMPLES_PER_FRAME
                fade = _fade_in(overlap, device)
                wav[:overlap] = stream._seam.audio * (1 - fade) + wav[:overlap] * fade
            if hop.final:
                played.append((wav.cpu(), None))
                continue
            keep = min(stream.schedule.overlap_frames, played_end - k)
            cut = (played_end - keep) * SAMPLES_PER_FRAME
            seam = _Seam(
                mel=mel[g, :, played_end - keep : played_end],
                audio=wav[cut:].clone(),
                excitation=excitation[g, 0, cut : played_end * SAMPLES_PER_FRAME].clone(),
                cycles=(start_cycles[g] + frame_cycles[g, :, :played_end].sum(-1)) % 1,
            )
            played.append((wav[:cut].cpu(), seam))
        return played

    def stream_tokens(
        self, requests: Sequence[S3GenRequest], tokens_per_push: int = 1
    ) -> list[list[torch.Tensor]]:
        """Stream each request's ``speech_tokens`` as if they arrived ``tokens_per_push`` at a time,
        all requests side by side, each finishing when its tokens run out; after every push one
        step plays the next hop of every ready stream. Returns each request's audio pieces."""
        if tokens_per_push < 1:
            raise ValueError(f"tokens_per_push must be >= 1, got {tokens_per_push}")
        streams = [self.open(dataclasses.replace(r, speech_tokens=r.speech_tokens[:0])) for r in requests]
        pieces: list[list[torch.Tensor]] = [[] for _ in requests]
        pushed = 0
        while not all(s.done for s in streams):
            for stream, request in zip(streams, requests, strict=True):
                if not stream.finished:
                    stream.push(request.speech_tokens[pushed : pushed + tokens_per_push])
                    if pushed + tokens_per_push >= request.speech_tokens.numel():
                        stream.finish()
            pushed += tokens_per_push
            while ready := [i for i, s in enumerate(streams) if s.next_hop() is not None]:
                for i, piece in zip(ready, self.step([streams[i] for i in ready]), strict=True):
                    pieces[i].append(piece)
        return pieces
