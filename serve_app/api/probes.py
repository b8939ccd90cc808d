"""Probes: `GET /healthz` (liveness of the ingress) and `GET /readyz` (a healthy model replica runs).

No `from __future__ import annotations` (see `serve_app.api.tts`).
"""

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.schema import DeploymentStatus, ReplicaState

from serve_app.api.errors import ErrorResponse, error_response
from serve_app.config import LimitsConfig
from serve_app.errors import SynthesisError

logger = logging.getLogger("ray.serve")

router = APIRouter()
# How long /readyz waits for Serve's controller to report the model deployment's state.
READINESS_TIMEOUT_S = 5.0


class ProbeRoutes:
    """The routes; the ingress that inherits them sets these attributes."""

    _app_name: str
    _model_deployment: str
    _limits: LimitsConfig

    @router.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: this ingress answers (asks nothing of the model)."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Readiness: Serve's controller has a running model replica that passes its health checks
        (``TurboModel.check_health``, which a broken replica fails).

        Asked of the controller, not of a replica: a replica's calls queue behind its chunk calls,
        so a probe sent to a busy replica would time out exactly when the service is busiest.
        """
        retry_after_s = self._limits.retry_after_s
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), READINESS_TIMEOUT_S)
            deployment = status.applications[self._app_name].deployments[self._model_deployment]
        except Exception as error:
            logger.warning("not ready: %r", error)
            message = f"Serve's status is unavailable: {error}"
            return error_response(SynthesisError("not_ready", message), retry_after_s)
        running = deployment.replica_states.get(ReplicaState.RUNNING, 0)
        if running == 0 or deployment.status in (DeploymentStatus.UNHEALTHY, DeploymentStatus.DEPLOY_FAILED):
            detail = deployment.message or "none running"
            message = f"no healthy model replica ({deployment.status.value}: {detail})"
            return error_response(SynthesisError("not_ready", message), retry_after_s)
        return JSONResponse({"status": "ready"})
