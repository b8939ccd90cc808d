"""One request's path over the deployments' handles, for every API of the ingress: admit, prepare,
fan the chunks out to the model, then stitch them whole or stream them. Plain async code: no
FastAPI here; refusals are `SynthesisError`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from serve_app.deployments.args import IngressArgs
from serve_app.errors import model_error
from serve_app.schemas import AudioPiece, SynthesisRequest, SynthesisResult
from serve_app.synthesis.fanout import Admission, synthesize_chunks
from serve_app.synthesis.prepare import Preparer
from serve_app.synthesis.streaming import audio_pieces
from serve_app.voices.store import VoiceStore


class Synthesis:
    def __init__(
        self,
        model: DeploymentHandle,
        stitcher: DeploymentHandle,
        config: IngressArgs,
        voice_store: VoiceStore,
    ) -> None:
        self._model = model
        self._stitcher = stitcher
        self._max_in_flight = config.max_chunks_in_flight
        self._admission = Admission(config.limits.max_active_requests)
        self._preparer = Preparer(model, config, voice_store)

    async def synthesize(self, request: SynthesisRequest, accepted_at: float) -> SynthesisResult:
        """The whole result; `accepted_at` (monotonic) starts its time to first audio."""
        with self._admission.admitted():
            jobs, plan = await self._preparer.prepare(request)
            try:
                chunk_audio = await synthesize_chunks(self._model, jobs, self._max_in_flight, accepted_at)
                return await self._stitcher.stitch.remote(plan, *chunk_audio)
            except Exception as error:
                raise model_error(error) from None

    async def stream(self, request: SynthesisRequest, accepted_at: float) -> AsyncIterator[AudioPiece]:
        """The result in pieces, in order (`serve_app.synthesis.streaming`)."""
        with self._admission.admitted():
            jobs, plan = await self._preparer.prepare(request)
            pieces = audio_pieces(self._model, self._stitcher, jobs, plan, self._max_in_flight, accepted_at)
            try:
                async with contextlib.aclosing(pieces):  # closed at once when the caller stops early
                    async for piece in pieces:
                        yield piece
            except Exception as error:
                raise model_error(error) from None
