"""Reading request bodies: bounded as they arrive, and JSON checked strictly."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from serve_app.errors import SynthesisError


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, counted as it arrives: past ``limit`` bytes it is refused at once, whether a
    Content-Length announced it or not (chunked), instead of being buffered whole first."""
    too_large = SynthesisError("request_too_large", f"request body exceeds {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise SynthesisError("client_disconnected", "the client closed the request mid-body") from None
    return bytes(body)


def media_type(request: Request) -> str:
    """The body's media type (Content-Type without parameters, lower case; JSON when absent)."""
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _reject_json_constant(name: str) -> None:
    """NaN and Infinity: Python's json accepts them, JSON does not."""
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, refused unless it is JSON of at most ``limit`` bytes."""
    kind = media_type(request)
    if kind != "application/json" and not kind.endswith("+json"):
        raise SynthesisError(
            "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), not {kind}"
        )
    body = await read_body(request, limit)
    try:
        return json.loads(body, parse_constant=_reject_json_constant)
    except ValueError as error:  # also bad UTF-8 and integers of over 4300 digits
        raise SynthesisError("invalid_json", f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise SynthesisError("invalid_json", "request body is nested too deeply") from None
