"""Saved voices against a deployment of their own (tiny model, CPU, loopback; its store in a
temporary directory): upload, list, use by name and id on every API, delete, redeploy, and the
refusals (path traversal, duplicates, the voice limit, bad uploads)."""

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from ray import serve

from serve_app.api.openai import SERVED_MODEL_ID, SpeechRequest
from serve_app.api.tts import TTSHttpRequest
from serve_app.app import build_app
from serve_app.config import AppArgs, VoicesConfig
from serve_app.errors import SynthesisError
from serve_app.schemas import SynthesisRequest
from tests.serve.conftest import voice_wav

APP = "voices"
MAX_VOICES = 4
TEXT = "A saved voice, used by name."
CLIP = voice_wav(6.0)


@dataclass(frozen=True)
class VoicesApp:
    url: str
    args: AppArgs
    store: Path

    def deploy(self) -> None:
        serve.run(build_app(self.args), name=APP, route_prefix=f"/{APP}")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@pytest.fixture(scope="module")
def voices_app(serve_app, tmp_path_factory) -> Iterator[VoicesApp]:
    store = tmp_path_factory.mktemp("voice-store")
    voices = VoicesConfig(store_dir=str(store), max_voices=MAX_VOICES)
    args = serve_app.args.model_copy(update={"voices": voices})
    app = VoicesApp(url=f"{serve_app.url}/{APP}", args=args, store=store)
    app.deploy()
    yield app
    serve.delete(APP)


@pytest.fixture
def http(voices_app) -> Iterator[httpx.Client]:
    with voices_app.client() as client:
        yield client


def upload(http: httpx.Client, name: str, clip: bytes = CLIP, description: str = "") -> httpx.Response:
    return http.post(
        "/v1/voices",
        files={"file": ("voice.wav", clip, "audio/wav")},
        data={"name": name, "description": description},
    )


def speech(http: httpx.Client, **fields) -> httpx.Response:
    body = {"model": "chatterbox-turbo", "input": TEXT, "response_format": "wav", "seed": 7, **fields}
    return http.post("/v1/audio/speech", json=body)


def tts(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/v1/tts", json={"text": TEXT, "format": "wav", "seed": 7, **fields})


def samples(wav: bytes) -> np.ndarray:
    audio, sample_rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert sample_rate == 24_000
    assert len(audio) > 0
    return audio


def tts_samples(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return samples(base64.b64decode(response.json()["audio_base64"]))


def speech_samples(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return samples(response.content)


def openai_refusal(response: httpx.Response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return response.status_code, error["code"], error["param"]


def voices_prepared() -> int:
    return serve.get_deployment_handle("TurboModel", APP).stats.remote().result().voices_prepared


def test_upload_list_use_by_name_and_id_then_delete(voices_app, http):
    created = upload(http, "narrator", description="warm, slow")
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["object"] == "voice"
    assert voice["id"].startswith("voice_")
    assert (voice["name"], voice["description"], voice["duration_s"]) == ("narrator", "warm, slow", 6.0)
    assert http.get(f"/v1/voices/{voice['id']}").json() == voice
    assert http.get("/v1/voices/narrator").json() == voice
    listed = http.get("/v1/voices").json()
    assert listed["object"] == "list"
    assert voice in listed["data"]

    clip_base64 = base64.b64encode(CLIP).decode()
    # /v1/audio/speech streams wav (its first chunk token by token), /v1/tts answers whole: each is
    # compared with the same route given the clip inline.
    by_name = speech_samples(speech(http, voice="narrator"))  # prepared now, and stored
    inline = speech_samples(speech(http, reference_audio=clip_base64))
    assert np.array_equal(by_name, inline)
    assert np.array_equal(speech_samples(speech(http, voice=voice["id"])), inline)
    inline_whole = tts_samples(tts(http, reference_audio_base64=clip_base64))
    assert np.array_equal(tts_samples(tts(http, voice="narrator")), inline_whole)
    assert np.array_equal(tts_samples(tts(http, voice=voice["id"])), inline_whole)
    handle = serve.get_app_handle(APP)
    result = handle.synthesize.remote(SynthesisRequest(text=TEXT, voice="narrator", seed=7)).result()
    assert np.array_equal(samples(result.audio), inline_whole)
    # The stored conditionals are this model's, filed under its voice id.
    assert len(list((voices_app.store / voice["id"]).glob("*.safetensors"))) == 1

    deleted = http.delete("/v1/voices/narrator")
    assert deleted.json() == {"id": voice["id"], "object": "voice.deleted", "deleted": True}
    assert openai_refusal(http.get(f"/v1/voices/{voice['id']}")) == (404, "voice_not_found", "voice_id")
    assert openai_refusal(http.delete(f"/v1/voices/{voice['id']}")) == (404, "voice_not_found", "voice_id")
    assert openai_refusal(speech(http, voice="narrator")) == (404, "voice_not_found", "voice")
    refused = tts(http, voice=voice["id"])
    assert (refused.status_code, refused.json()["error"]["field"]) == (404, "voice")
    with pytest.raises(SynthesisError) as raised:
        handle.synthesize.remote(SynthesisRequest(text=TEXT, voice="narrator")).result()
    assert raised.value.code == "voice_not_found"
    assert voice not in http.get("/v1/voices").json()["data"]
    assert not (voices_app.store / voice["id"]).exists()


def test_a_voice_survives_a_redeploy_and_is_not_prepared_again(voices_app, http):
    created = upload(http, "survivor", voice_wav(7.0))  # a clip no replica has prepared yet
    assert created.status_code == 201, created.text
    before = speech_samples(speech(http, voice="survivor"))  # prepares it and stores its conditionals
    assert len(list((voices_app.store / created.json()["id"]).glob("*.safetensors"))) == 1

    serve.delete(APP)
    voices_app.deploy()
    assert created.json() in http.get("/v1/voices").json()["data"]
    after = speech_samples(speech(http, voice="survivor"))
    assert np.array_equal(after, before)
    assert voices_prepared() == 0  # the new replica loaded the stored conditionals
    assert http.delete("/v1/voices/survivor").status_code == 200


def test_a_json_upload_takes_base64_or_a_data_url(http):
    data_url = "data:audio/wav;base64," + base64.b64encode(CLIP).decode()
    created = http.post("/v1/voices", json={"name": "from-json", "audio": data_url})
    assert created.status_code == 201, created.text
    assert created.json()["description"] == ""
    assert http.delete(f"/v1/voices/{created.json()['id']}").status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/v1/voices/..%2F..", "/v1/voices/..%2F..%2Findex.json", "/v1/voices/%2E%2E", "/v1/voices/" + "a" * 300],
)
def test_path_traversal_and_overlong_ids_are_refused(voices_app, http, path):
    canary = upload(http, "canary")
    assert canary.status_code == 201, canary.text
    try:
        for method in ("GET", "DELETE"):
            response = http.request(method, path)
            assert 400 <= response.status_code < 500, response.text
            assert "error" in response.json()
        assert http.get("/v1/voices/canary").status_code == 200  # nothing was deleted
        assert (voices_app.store / "index.json").is_file()
    finally:
        http.delete("/v1/voices/canary")


@pytest.mark.parametrize(
    ("request_fields", "status", "code", "param"),
    [
        ({"voice": "../../etc/passwd"}, 400, "invalid_parameter", "voice"),
        ({"voice": "v" * 300}, 400, "invalid_parameter", "voice"),
        ({"voice": "nobody"}, 404, "voice_not_found", "voice"),
        (
            {"voice": "nobody", "reference_audio": base64.b64encode(CLIP).decode()},
            400,
            "invalid_parameter",
            "voice",
        ),
    ],
)
def test_a_bad_voice_in_speech_is_refused(http, request_fields, status, code, param):
    assert openai_refusal(speech(http, **request_fields)) == (status, code, param)


@pytest.mark.parametrize(
    ("name", "clip", "code", "param"),
    [
        ("../x", CLIP, "invalid_parameter", "name"),
        ("a/b", CLIP, "invalid_parameter", "name"),
        ("default", CLIP, "invalid_parameter", "name"),
        ("n" * 65, CLIP, "invalid_parameter", "name"),
        ("short", voice_wav(3.0), "voice_too_short", "file"),
        ("garbage", b"RIFF not audio at all", "invalid_audio", "file"),
    ],
)
def test_bad_multipart_uploads_are_refused_naming_the_field(voices_app, http, name, clip, code, param):
    before = http.get("/v1/voices").json()["data"]
    assert openai_refusal(upload(http, name, clip)) == (400, code, param)
    assert http.get("/v1/voices").json()["data"] == before


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"name": "x", "audio": "not base64!"}, 400, "invalid_base64", "audio"),
        ({"audio": base64.b64encode(CLIP).decode()}, 400, "missing_parameter", "name"),
        ({"name": "x", "audio": "", "extra": 1}, 400, "invalid_parameter", "extra"),
        (
            {"name": "x", "audio": base64.b64encode(CLIP).decode(), "description": "d" * 501},
            400,
            "invalid_parameter",
            "description",
        ),
    ],
)
def test_bad_json_uploads_are_refused_naming_the_field(http, body, status, code, param):
    assert openai_refusal(http.post("/v1/voices", json=body)) == (status, code, param)


def test_a_multipart_upload_without_a_file_is_refused(http):
    response = http.post("/v1/voices", files={"name": (None, "nofile")})
    assert openai_refusal(response) == (400, "missing_parameter", "file")


def test_duplicate_names_and_the_voice_limit_are_409(http):
    names = [f"limit-{i}" for i in range(MAX_VOICES)]
    try:
        for name in names:
            assert upload(http, name).status_code == 201
        assert openai_refusal(upload(http, "LIMIT-0")) == (409, "voice_exists", "name")
        refused = upload(http, "one-too-many")
        assert openai_refusal(refused) == (409, "voice_limit_reached", None)
        assert f"{MAX_VOICES} voices" in refused.json()["error"]["message"]
    finally:
        for name in names:
            http.delete(f"/v1/voices/{name}")
    assert http.get("/v1/voices").json()["data"] == []


def test_default_is_the_built_in_voice_on_every_api():
    assert SynthesisRequest(text=TEXT, voice="default").voice is None
    assert TTSHttpRequest(text=TEXT, voice="default").voice is None
    speech_request = SpeechRequest(model=SERVED_MODEL_ID, input=TEXT)
    assert speech_request.synthesis_request().voice is None
    by_name = SpeechRequest(model=SERVED_MODEL_ID, input=TEXT, voice="narrator")
    assert by_name.synthesis_request().voice == "narrator"
