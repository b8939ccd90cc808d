"""API keys of the HTTP API: `Authorization: Bearer <key>` on every route but the probes and the
playground page's files (the page asks its user for a key). The handle API is inside the cluster
and takes no key.

Keys come from `AuthConfig.api_keys` and from the file the CHATTERBOX_API_KEYS_FILE environment
variable names (one key per line; blank lines and `#` comments skipped). No key is ever logged.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.api.errors import error_response, openai_error_response
from serve_app.api.http_body import route_path
from serve_app.config import AuthConfig
from serve_app.errors import SynthesisError

API_KEYS_FILE_ENV = "CHATTERBOX_API_KEYS_FILE"
# Visible ASCII (a header value), long enough not to be guessed.
API_KEY_PATTERN = re.compile(r"[\x21-\x7e]{16,256}")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIXES = ("/static/",)
# Routes whose clients expect OpenAI's error shape.
OPENAI_PATHS = frozenset({"/v1/audio/speech", "/v1/models", "/v1/voices"})
OPENAI_PREFIXES = ("/v1/voices/",)


class ApiKeys:
    """The accepted keys; empty: the API is open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = tuple(key.encode("ascii") for key in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def accepts(self, token: bytes) -> bool:
        """Whether `token` is a key, in time independent of which key matches or where they differ:
        every key is compared, in constant time each."""
        accepted = False
        for key in self._keys:
            accepted |= hmac.compare_digest(key, token)
        return accepted


def load_api_keys(config: AuthConfig, environ: Mapping[str, str] = os.environ) -> ApiKeys:
    """The configured keys and those of the file `environ[API_KEYS_FILE_ENV]` names (if set).
    Raises ValueError naming a malformed key by its place, never by its value."""
    keys = {f"auth.api_keys[{i}]": key.get_secret_value() for i, key in enumerate(config.api_keys)}
    path = environ.get(API_KEYS_FILE_ENV)
    if path:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            key = line.strip()
            if key and not key.startswith("#"):
                keys[f"{path}, line {number}"] = key
    for place, key in keys.items():
        if not API_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"{place}: an API key is 16 to 256 visible ASCII characters (no spaces)")
    return ApiKeys(list(keys.values()))


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme ignores case)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def unauthorized(path: str, has_token: bool) -> JSONResponse:
    """401 with `WWW-Authenticate: Bearer`, in OpenAI's error shape on OpenAI's routes."""
    if has_token:
        error = SynthesisError("invalid_api_key", "the API key is not valid")
    else:
        error = SynthesisError("missing_api_key", "an API key is required: Authorization: Bearer <key>")
    is_openai = path in OPENAI_PATHS or path.startswith(OPENAI_PREFIXES)
    response = openai_error_response(error) if is_openai else error_response(error)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


class ApiKeyMiddleware:
    """Refuses HTTP requests without a valid key (while keys are configured).

    `keys` is asked per request: the keys are loaded in the ingress replica's constructor, after
    this middleware was attached to the application.
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], ApiKeys]) -> None:
        self._app = app
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = route_path(scope)
        keys = self._keys()
        if not keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self._app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if token is not None and keys.accepts(token):
            await self._app(scope, receive, send)
            return
        await unauthorized(path, has_token=token is not None)(scope, receive, send)
