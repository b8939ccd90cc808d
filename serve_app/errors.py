"""Errors of the Serve graph in one place: the exception types, the HTTP status of every error code,
and the mappers from engine, replica and validation errors to what a client hears (how it hears
them over HTTP: `serve_app.api.errors`)."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import RequestCancelledError

from chatterbox.errors import TTSInputError

logger = logging.getLogger("ray.serve")

# HTTP status of every error code the service answers with. A code not listed is an input error the
# engine or the validation names (invalid_parameter, invalid_audio, voice_too_short, ...): 422.
ERROR_STATUS: dict[str, int] = {
    "invalid_json": 400,
    "invalid_base64": 400,
    "invalid_multipart": 400,
    "client_disconnected": 400,
    "unsupported_value": 400,
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "not_found": 404,
    "model_not_found": 404,
    "voice_not_found": 404,
    "job_not_found": 404,
    "method_not_allowed": 405,
    "voice_exists": 409,
    "voice_limit_reached": 409,
    "job_finished": 409,
    "job_not_completed": 409,
    "request_too_large": 413,
    "reference_too_large": 413,
    "text_too_long": 413,
    "unsupported_media_type": 415,
    "internal_error": 500,
    "out_of_memory": 503,
    "replica_unavailable": 503,
    "synthesis_failed": 503,
    "overloaded": 503,
    "queue_full": 503,
    "not_ready": 503,
}
INPUT_ERROR_STATUS = 422


def error_status(code: str) -> int:
    return ERROR_STATUS.get(code, INPUT_ERROR_STATUS)


class SynthesisError(Exception):
    """A request the service refuses or cannot serve; its HTTP status follows from its code.

    Handle callers receive it as raised (Ray wraps it but keeps isinstance and the attributes).
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message, field)  # args rebuild the error after pickling
        self.code = code
        self.message = message
        self.field = field

    @property
    def status(self) -> int:
        return error_status(self.code)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ChunkOutOfMemoryError(RuntimeError):
    """A single chunk did not fit in accelerator memory even alone (raised by a model replica)."""


class ReplicaBrokenError(RuntimeError):
    """A model replica hit a CUDA error and serves nothing more; Serve's health check replaces it."""


def input_error(error: TTSInputError) -> SynthesisError:
    """An input the engine refused (text, reference audio or a setting), under the engine's code."""
    return SynthesisError(error.code, str(error), error.field)


def validation_error(error: ValidationError) -> SynthesisError:
    """The first pydantic error as `invalid_parameter` (or `missing_parameter`) naming its field."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    code = "missing_parameter" if first["type"] == "missing" else "invalid_parameter"
    return SynthesisError(code, f"{field or 'body'}: {first['msg']}", field)


def root_cause(error: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrappers (one per hop: model -> stitcher -> here)."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def replica_lost(cause: BaseException) -> bool:
    """Whether a replica on the request's path is broken or died: the stitcher's own death, or (as
    Serve reports it) a RayServeException caused by the death of a model replica."""
    return isinstance(cause, ReplicaBrokenError | RayActorError | RequestCancelledError) or isinstance(
        cause.__cause__, RayActorError
    )


def model_error(error: Exception) -> SynthesisError:
    """What a client hears when its chunks or their stitching failed: the input error of a chunk the
    engine refused, else 503 (retryable): a replica broken or gone, memory, or a bug we log."""
    cause = root_cause(error)
    if isinstance(cause, TTSInputError):
        return input_error(cause)
    if isinstance(cause, ChunkOutOfMemoryError):
        return SynthesisError("out_of_memory", str(cause))
    if replica_lost(cause):
        return SynthesisError(
            "replica_unavailable", f"a replica failed while serving this request: {cause}; retry"
        )
    logger.error("synthesis failed", exc_info=cause)
    return SynthesisError("synthesis_failed", "synthesis failed; retry, or see the server log")
