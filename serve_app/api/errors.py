"""Refusals as HTTP answers, in our shape (`{"error": {"code", "message", "field"}}`) or OpenAI's
(`{"error": {"message", "type", "param", "code"}}`), and the one place every refusal is counted:
HTTP answers, errors in the middle of a stream, and the handle API's."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from serve_app.api.http_body import route_path
from serve_app.errors import SynthesisError, error_status
from serve_app.metrics import record_refusal

logger = logging.getLogger("ray.serve")

# Statuses that say "not now" rather than "not this": they carry Retry-After.
RETRYABLE_STATUSES = frozenset({429, 503})


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer: `{"error": {"code", "message", "field"}}`."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, which its clients turn into their typed exceptions."""

    error: OpenAIErrorDetail


def count_refusal(code: str, status: int) -> None:
    """Every refusal, whichever way it is answered, is counted here once."""
    record_refusal(code, status)


@contextlib.contextmanager
def counting_refusals() -> Iterator[None]:
    """Counts a handle-API call's refusal (HTTP counts its refusals where it answers them)."""
    try:
        yield
    except SynthesisError as error:
        count_refusal(error.code, error.status)
        raise
    except Exception:
        count_refusal("internal_error", error_status("internal_error"))
        raise


def unexpected_error(what: str) -> SynthesisError:
    """Log the exception being handled (with its traceback) as one in `what`; the error the client
    is told instead (500 `internal_error`)."""
    logger.exception("unexpected error in %s", what)
    return SynthesisError("internal_error", "internal error; see the server log")


def renamed(error: SynthesisError, fields: Mapping[str, str]) -> SynthesisError:
    """`error` naming its field as an API calls it (the handle API's names are ours)."""
    return SynthesisError(error.code, error.message, fields.get(error.field, error.field))


def _answer(body: BaseModel, code: str, status: int, retry_after_s: int | None) -> JSONResponse:
    count_refusal(code, status)
    response = JSONResponse(body.model_dump(), status_code=status)
    if status in RETRYABLE_STATUSES and retry_after_s is not None:
        response.headers["Retry-After"] = str(retry_after_s)
    return response


def error_response(
    error: SynthesisError, retry_after_s: int | None = None, status: int | None = None
) -> JSONResponse:
    """Our error body with the code's status (or ``status``, for Starlette's own errors, which keep
    theirs); a 429 or 503 says when to come back."""
    body = ErrorResponse(error=ErrorDetail(code=error.code, message=error.message, field=error.field))
    return _answer(body, error.code, status or error.status, retry_after_s)


def openai_error(error: SynthesisError) -> tuple[OpenAIErrorResponse, int]:
    """Our error in OpenAI's shape and status: a refused input is 400 there (ours: 422)."""
    status = 400 if error.status == 422 else error.status
    if status < 500:
        kind = "invalid_request_error"
    elif error.code == "overloaded":
        kind = "overloaded_error"
    else:
        kind = "server_error"
    detail = OpenAIErrorDetail(message=error.message, type=kind, param=error.field, code=error.code)
    return OpenAIErrorResponse(error=detail), status


def openai_error_response(error: SynthesisError, retry_after_s: int | None = None) -> JSONResponse:
    """The HTTP answer of an OpenAI route's refusal."""
    body, status = openai_error(error)
    return _answer(body, error.code, status, retry_after_s)


def _allowed_methods(request: Request) -> str | None:
    """The methods the published document lists for the request's path (None: not in it)."""
    path = route_path(request.scope)
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            return ", ".join(sorted(method.upper() for method in operations))
    return None


async def http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in our error shape, with their headers.
    A 405's `Allow` (RFC 9110) names every method of the path: Starlette names only those of the
    first route that matched it, one of several when each method has its own."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    response = error_response(SynthesisError(code, str(error.detail)), status=error.status_code)
    response.headers.update(error.headers or {})
    if error.status_code == 405 and (allowed := _allowed_methods(request)):
        response.headers["Allow"] = allowed
    return response
