"""Delivery of a job's result where its user keeps it: the audio PUT to `output_url` (a presigned
object-store URL, say) and the final status POSTed to `webhook`, each retried. Both are refused at
submit unless their host is in `jobs.allowed_hosts`, so the service cannot be made to send requests
to hosts its operator did not name (no server-side request forgery by default)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from serve_app.errors import SynthesisError

logger = logging.getLogger("ray.serve")


def check_target(url: str | None, allowed_hosts: tuple[str, ...], field: str) -> None:
    """Refuse (422 naming `field`) a URL that is not http(s) or whose host is not allowed."""
    if url is None:
        return
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SynthesisError("invalid_parameter", f"{field}: not an http or https URL", field)
    if parsed.hostname.lower() not in allowed_hosts:
        raise SynthesisError(
            "host_not_allowed",
            f"{field}: host {parsed.hostname!r} is not in the service's jobs.allowed_hosts",
            field,
        )


def _send(method: str, url: str, data: bytes, content_type: str, attempts: int, timeout_s: float) -> None:
    """One request, retried with a doubling delay on a network error or a 5xx/429; raises the last error."""
    for attempt in range(attempts):
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
            return
        except urllib.error.HTTPError as error:
            if (error.code < 500 and error.code != 429) or attempt == attempts - 1:
                raise
        except OSError:
            if attempt == attempts - 1:
                raise
        logger.warning(
            "%s of a job result failed (attempt %d of %d); retrying", method, attempt + 1, attempts
        )
        time.sleep(0.5 * 2**attempt)


def put_audio(url: str, audio: bytes, content_type: str, attempts: int, timeout_s: float) -> None:
    _send("PUT", url, audio, content_type, attempts, timeout_s)


def post_status(url: str, status: dict[str, Any], attempts: int, timeout_s: float) -> None:
    _send("POST", url, json.dumps(status).encode(), "application/json", attempts, timeout_s)
