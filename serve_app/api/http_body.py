"""Reading request bodies: bounded as they arrive, and JSON checked strictly."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import Scope

from serve_app.errors import SynthesisError, validation_error

Body = TypeVar("Body", bound=BaseModel)
# Strict, padded base64 (what `decode_base64` accepts), as the published schema states it.
BASE64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
BASE64_SCHEMA = {"contentEncoding": "base64", "pattern": f"^{BASE64}$"}
# An audio clip field that also takes a data URL (`data:<type>;base64,<data>`).
CLIP_SCHEMA = {"pattern": rf"^(?:data:[^,]*;base64,)?{BASE64}$"}


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


async def parse_json(request: Request, model: type[Body], limit: int) -> Body:
    """The JSON body as `model`, refused naming the field at fault."""
    try:
        return model.model_validate(await read_json(request, limit))
    except ValidationError as error:
        raise validation_error(error) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that reads its JSON itself (to bound and check it first)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def decode_base64(value: str, field: str) -> bytes:
    """A base64 field's bytes, refused (naming `field`) unless it is strict, padded base64."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:  # ValueError: characters outside ASCII
        raise SynthesisError("invalid_base64", f"{field} is not valid base64: {error}", field) from None


def route_path(scope: Scope) -> str:
    """The path within the application (without the prefix it is deployed under)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path
