"""The playground page at `/`: static files shipped in the package, no build step.

`index.html` is rendered per request with two values only the server knows: the base URL of the
application (Serve's route prefix, so the page's relative URLs work wherever the app is mounted) and
the page's settings (the paralinguistic tags of the checkpoint's tokenizer, the rate of raw `pcm`).
"""

from __future__ import annotations

import html
import json
from functools import cache
from pathlib import Path

from chatterbox.constants import PARALINGUISTIC_TAGS, S3GEN_SR

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
