"""The playground page at `/`: static files shipped in the package, no build step.

`index.html` is rendered per request with two values only the server knows: the base URL of the
application (Serve's route prefix, so the page's relative URLs work wherever the app is mounted) and
the page's settings (the paralinguistic tags of the checkpoint's tokenizer, the rate of raw `pcm`).
No `from __future__ import annotations` (see `serve_app.api.tts`).
"""

import html
import json
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from chatterbox.constants import PARALINGUISTIC_TAGS, S3GEN_SR

router = APIRouter()
STATIC_DIR = Path(__file__).parent / "static"
_BASE_HREF = "{{base_href}}"
_SETTINGS = "{{settings_json}}"


@cache
def _template() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def page_settings() -> dict[str, object]:
    """What the page's script reads from the server instead of repeating it."""
    return {"tags": list(PARALINGUISTIC_TAGS), "pcmSampleRate": S3GEN_SR}


def render_page(root_path: str) -> str:
    """The page for an application mounted at `root_path` (ASGI's; "" at the root)."""
    base_href = html.escape(root_path.rstrip("/") + "/", quote=True)
    # "</" would end the <script> element that holds the JSON; "<\/" is the same JSON string.
    settings = json.dumps(page_settings()).replace("</", "<\\/")
    return _template().replace(_BASE_HREF, base_href).replace(_SETTINGS, settings)


class PlaygroundRoutes:
    """The page's route (its files are mounted at /static by the ingress)."""

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request) -> HTMLResponse:
        """The playground page, for the route prefix the app is mounted at."""
        return HTMLResponse(render_page(request.scope.get("root_path", "")))
