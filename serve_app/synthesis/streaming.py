"""A request's audio streamed in pieces, in order: the first chunk token by token, the later ones
whole as they finish, joined with the same crossfades and pauses as the whole response.

Piece lengths follow the watermark's rules (`chatterbox.watermark`): the stitcher marks every
piece on its own, so a piece is a multiple of the watermark's granule and, but for the last, at
least MIN_PIECE_SECONDS long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
from ray.serve.handle import DeploymentHandle

from chatterbox.watermark import MIN_PIECE_SECONDS, piece_length
from serve_app.metrics import record_time_to_first_audio
from serve_app.schemas import AudioPiece, ChunkJob
from serve_app.synthesis.audio import StitchPlan, StreamingStitch
from serve_app.synthesis.fanout import finished_in_order


async def joined_audio(
    model: DeploymentHandle, jobs: list[ChunkJob], plan: StitchPlan, max_in_flight: int, accepted_at: float
) -> AsyncIterator[tuple[np.ndarray, int]]:
    """(joined samples that no later chunk can change, chunks done) as they become final.

    The first chunk streams token by token (`TurboModel.stream_chunk`): its pieces pass on as
    they come, less the tail a next chunk's crossfade still changes. Meanwhile the later chunks
    are synthesised whole (`finished_in_order`) and joined in order once the first has ended.
    """
    joiner = StreamingStitch(plan.pauses, plan.crossfade)
    first = model.options(stream=True).stream_chunk.remote(jobs[0])
    later = finished_in_order(model, jobs[1:], max(1, max_in_flight - 1), None)
    next_later = asyncio.ensure_future(anext(later, None))  # sends the later chunks' calls now
    # What `joiner.add` holds back of the first chunk (at least one sample, so the chunk's end
    # always comes with a piece that says it is done).
    held = max(1, plan.crossfade if len(jobs) > 1 else 0)
    try:
        parts: list[np.ndarray] = []
        sent = 0
        async for part in first:
            if not parts:
                record_time_to_first_audio(time.monotonic() - accepted_at)
            parts.append(part)
            final = piece_length(sum(len(p) for p in parts) - held, plan.sample_rate)
            if final > sent:
                yield np.concatenate(parts)[sent:final], 0
                sent = final
        # The first chunk is not faded in, so `add` returns the samples passed on unchanged.
        yield joiner.add(np.concatenate(parts))[sent:], 1
        done = 1
        while (item := await next_later) is not None:
            call, _ = item
            done += 1
            yield joiner.add(call.result()), done
            next_later = asyncio.ensure_future(anext(later, None))
    finally:
        first.cancel()
        next_later.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # its error was raised above
            await next_later
        await later.aclose()  # cancels the later chunks' calls still running


async def audio_pieces(
    model: DeploymentHandle,
    stitcher: DeploymentHandle,
    jobs: list[ChunkJob],
    plan: StitchPlan,
    max_in_flight: int,
    accepted_at: float,
) -> AsyncIterator[AudioPiece]:
    """The request's audio in pieces (s16le), each watermarked on its own by the stitcher; a piece
    leaves once it has MIN_PIECE_SECONDS of final samples (or is the last)."""
    min_piece = MIN_PIECE_SECONDS * plan.sample_rate
    pending: list[np.ndarray] = []
    start = 0
    joined = joined_audio(model, jobs, plan, max_in_flight, accepted_at)
    async with contextlib.aclosing(joined):
        async for final, done in joined:
            pending.append(final)
            samples = np.concatenate(pending)
            if len(samples) < min_piece and done < len(jobs):
                continue
            pending = []
            audio = await stitcher.encode_piece.remote(samples, plan.sample_rate)
            yield AudioPiece(
                audio=audio,
                sample_rate=plan.sample_rate,
                start_sample=start,
                num_samples=len(samples),
                chunks_done=done,
                chunks_total=len(jobs),
            )
            start += len(samples)
