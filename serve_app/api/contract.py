"""The published contract (`/openapi.json`) with what a replica's configuration adds to it: every
constraint the server enforces on a field is in the document, so a client (or a fuzzer) reading it
knows exactly what is accepted. The fields' own constraints are declared beside them; this adds the
ones only the running configuration knows, and those of path parameters."""

from __future__ import annotations

import copy
from typing import Any

from serve_app.config import LimitsConfig
from serve_app.jobs.config import JobsConfig
from serve_app.schemas import VOICE_SCHEMA

# The text field of each synthesis route's JSON body.
_TEXT_FIELDS = {"/v1/tts": "text", "/v1/audio/speech": "input"}
_VOICE_PATH = "/v1/voices/{voice_id}"
_JOB_TEXT = "/v1/jobs"
_RUNPOD_INPUTS = ("/v2/{endpoint_id}/run", "/v2/{endpoint_id}/runsync")
_JOB_PATHS = ("/v1/jobs", "/v2/")  # prefixes of the jobs routes


def _json_body(operation: dict[str, Any]) -> dict[str, Any]:
    return operation["requestBody"]["content"]["application/json"]["schema"]


def with_limits(document: dict[str, Any], limits: LimitsConfig, jobs: JobsConfig | None) -> dict[str, Any]:
    """A copy of the OpenAPI `document` that states this replica's limits; without jobs (None),
    without their routes."""
    document = copy.deepcopy(document)
    paths = document["paths"]
    if jobs is None:
        for path in [p for p in paths if p.startswith(_JOB_PATHS)]:
            del paths[path]
    else:
        _json_body(paths[_JOB_TEXT]["post"])["properties"]["text"]["maxLength"] = jobs.max_text_chars
        for path in _RUNPOD_INPUTS:  # {"input": {"$ref": "#/$defs/..."}}: the body's own definitions
            body = _json_body(paths[path]["post"])
            fields = body["$defs"][body["properties"]["input"]["$ref"].rsplit("/", 1)[-1]]
            fields["properties"]["text"]["maxLength"] = jobs.max_text_chars
    for path, field in _TEXT_FIELDS.items():
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"][field]["maxLength"] = limits.max_text_chars
    for operation in paths[_VOICE_PATH].values():
        for parameter in operation["parameters"]:
            if parameter["name"] == "voice_id":
                parameter["schema"].update(VOICE_SCHEMA)
    return document
