"""Stitcher deployment: joins chunk audio in order, watermarks the result once, encodes it; and
watermarks and encodes the pieces of a streamed result, which the ingress joins as chunks arrive.

CPU only. The ingress passes the model's pending responses straight in as arguments, so chunk
audio travels from the model replicas to the stitcher without passing through the ingress.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from serve_app.config import AppArgs, front_deployment_options
from serve_app.schemas import ChunkInfo, SynthesisResult
from serve_app.synthesis.audio import StitchPlan, chunk_starts, encode_audio, stitch, to_s16le


class Stitcher:
    @classmethod
    def get_deployment_options(cls, args: AppArgs) -> dict[str, Any]:
        return front_deployment_options(cls.__name__, args.stitcher, args.shutdown)

    def __init__(self, watermark: bool) -> None:
        self._apply_watermark = None
        if watermark:
            # Imported here so a deployment without watermarking never loads the watermarker.
            from chatterbox.watermark import apply_watermark, is_markable

            apply_watermark(np.zeros(2400, np.float32), 24_000)  # load the watermarker now, not on a request
            self._apply_watermark = apply_watermark
            self._is_markable = is_markable

    async def stitch(self, plan: StitchPlan, *chunk_audio: np.ndarray) -> SynthesisResult:
        """Join `chunk_audio` (in plan order) and encode it in `plan.format`."""
        return await asyncio.to_thread(self._stitch, plan, chunk_audio)

    def _stitch(self, plan: StitchPlan, chunk_audio: tuple[np.ndarray, ...]) -> SynthesisResult:
        if len(chunk_audio) != len(plan.chunk_texts):
            raise ValueError(f"plan has {len(plan.chunk_texts)} chunks, got {len(chunk_audio)} audio arrays")
        wav = stitch(chunk_audio, plan.pauses, plan.crossfade)
        if self._apply_watermark is not None:
            wav = np.asarray(self._apply_watermark(wav, plan.sample_rate), dtype=np.float32)
        starts, _ = chunk_starts([len(a) for a in chunk_audio], plan.pauses, plan.crossfade)
        return SynthesisResult(
            audio=encode_audio(wav, plan.sample_rate, plan.format),
            sample_rate=plan.sample_rate,
            duration_s=len(wav) / plan.sample_rate,
            format=plan.format,
            chunks=[
                ChunkInfo(text=text, start_sample=start, num_samples=len(audio))
                for text, start, audio in zip(plan.chunk_texts, starts, chunk_audio, strict=True)
            ],
        )

    async def encode_piece(self, samples: np.ndarray, sample_rate: int) -> bytes:
        """One streamed piece, watermarked on its own, as s16le bytes."""
        return await asyncio.to_thread(self._encode_piece, samples, sample_rate)

    def _encode_piece(self, samples: np.ndarray, sample_rate: int) -> bytes:
        # Streamed pieces are long enough to mark (`chatterbox.watermark`'s piece rules); only a
        # whole result shorter than that stays unmarked.
        if self._apply_watermark is not None and self._is_markable(len(samples), sample_rate):
            samples = np.asarray(self._apply_watermark(samples, sample_rate), dtype=np.float32)
        return to_s16le(samples)
