"""Ingress deployment: the FastAPI application and its route table, and the handle API.

Every route is a method of one of the `serve_app.api` route classes that `Ingress` inherits (Serve
binds them to the replica); each delegates to the request path in `serve_app.synthesis`. A new
endpoint family is one more route class: include its router below and add it to the bases.

No `from __future__ import annotations` here (see `serve_app.api.tts`).
"""

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve_app.api import contract, jobs, openai, playground, probes, runpod, tts, voices
from serve_app.api.auth import ApiKeyMiddleware, ApiKeys, load_api_keys
from serve_app.api.errors import counting_refusals, http_exception
from serve_app.config import AppArgs, front_deployment_options
from serve_app.deployments.args import IngressArgs
from serve_app.jobs.broker import jobs_root, make_dirs, producer
from serve_app.jobs.frontend import JobsFrontend
from serve_app.jobs.store import JobStore
from serve_app.schemas import AudioPiece, SynthesisRequest, SynthesisResult
from serve_app.synthesis.pipeline import Synthesis
from serve_app.synthesis.prepare import Preparer
from serve_app.voices.store import VoiceStore

api = FastAPI(title="Chatterbox Turbo TTS", version="1")
for module in (playground, probes, tts, openai, voices, jobs, runpod):
    api.include_router(module.router)
api.mount("/static", StaticFiles(directory=playground.STATIC_DIR), name="static")  # the playground's files
api.add_exception_handler(HTTPException, http_exception)
# The keys are the replica's (loaded by Ingress.__init__, in the replica's process).
api.add_middleware(ApiKeyMiddleware, keys=lambda: serve.get_replica_context().servable_object.api_keys)


def _openapi() -> dict[str, Any]:
    """`/openapi.json`: FastAPI's document with the replica's limits (`serve_app.api.contract`)."""
    if api.openapi_schema is None:
        replica = serve.get_replica_context().servable_object
        jobs = None if replica._jobs is None else replica._jobs.config
        api.openapi_schema = contract.with_limits(FastAPI.openapi(api), replica._limits, jobs)
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


@serve.ingress(api)
class Ingress(
    playground.PlaygroundRoutes,
    probes.ProbeRoutes,
    tts.TTSRoutes,
    openai.OpenAIRoutes,
    voices.VoicesRoutes,
    jobs.JobsRoutes,
    runpod.RunPodRoutes,
):
    @classmethod
    def get_deployment_options(cls, args: AppArgs) -> dict[str, Any]:
        options = front_deployment_options(cls.__name__, args.ingress, args.shutdown)
        return {**options, "max_queued_requests": args.ingress.max_queued_requests}

    def __init__(
        self,
        model: DeploymentHandle,
        stitcher: DeploymentHandle,
        jobs: DeploymentHandle | None,  # bound so Serve runs the consumer; None: jobs are off
        config: IngressArgs,
    ) -> None:
        self._limits = config.limits
        self._app_name = serve.get_replica_context().app_name
        self._model_deployment = model.deployment_name
        self._voice_store = VoiceStore(config.voices.store_dir)
        self._max_voices = config.voices.max_voices
        self._voice_store.sweep()
        self._synthesis = Synthesis(model, stitcher, config, self._voice_store)
        self.api_keys: ApiKeys = load_api_keys(config.auth)
        self._jobs: JobsFrontend | None = None
        if jobs is not None:
            make_dirs(config.jobs)
            preparer = Preparer(model, config.for_jobs(), self._voice_store)
            store = JobStore(jobs_root(config.jobs), config.jobs.retention_s)
            self._jobs = JobsFrontend(config.jobs, preparer, store, producer(config.jobs))

    async def synthesize(self, request: SynthesisRequest) -> SynthesisResult:
        """The handle API. Raises SynthesisError for a request it refuses or cannot serve."""
        with counting_refusals():
            return await self._synthesis.synthesize(request, time.monotonic())

    async def synthesize_stream(self, request: SynthesisRequest) -> AsyncIterator[AudioPiece]:
        """The streaming handle API: `handle.options(stream=True).synthesize_stream.remote(request)`
        yields AudioPiece (s16le) in order, each as soon as its chunks are ready. Raises
        SynthesisError for a request it refuses or cannot serve."""
        with counting_refusals():
            async for piece in self._synthesis.stream(request, time.monotonic()):
                yield piece
