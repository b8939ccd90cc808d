"""API keys: loading and checking them (pure), then a deployment of its own with keys configured
(tiny model, CPU, loopback): 401 without or with a wrong key, in the route's error shape; the
probes open; the official `openai` client with `api_key=`; the handle API untouched."""

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import ray
import soundfile as sf
from ray import serve

from serve_app.api.auth import API_KEYS_FILE_ENV, ApiKeys, bearer_token, load_api_keys, route_path
from serve_app.api.openai import SERVED_MODEL_ID
from serve_app.app import build_app
from serve_app.config import AppArgs, AuthConfig, VoicesConfig
from serve_app.schemas import SynthesisRequest
from tests.serve.conftest import voice_wav

APP = "keyed"
KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-test-fedcba9876543210"


# --- pure ---------------------------------------------------------------------------------------


def test_keys_come_from_the_config_and_the_file_the_environment_names(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated monthly\n\n  {OTHER_KEY}  \n")
    keys = load_api_keys(AuthConfig(api_keys=[KEY]), {API_KEYS_FILE_ENV: str(keys_file)})
    assert keys.accepts(KEY.encode())
    assert keys.accepts(OTHER_KEY.encode())
    assert not keys.accepts(b"# rotated monthly")
    assert not keys.accepts(KEY[:-1].encode())
    assert not keys.accepts(b"")
    assert not load_api_keys(AuthConfig(), {})  # none configured: the API is open


def test_a_bad_key_is_refused_without_showing_it(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("short-secret\n")
    with pytest.raises(ValueError, match="line 1") as raised:
        load_api_keys(AuthConfig(), {API_KEYS_FILE_ENV: str(keys_file)})
    assert "short-secret" not in str(raised.value)
    spaced = AppArgs(auth={"api_keys": ["has a space in it, so no"]}).auth
    with pytest.raises(ValueError, match=r"auth\.api_keys\[0\]") as raised:
        load_api_keys(spaced, {})
    assert "has a space" not in str(raised.value)
    assert KEY not in repr(AppArgs(auth={"api_keys": [KEY]}))  # configs are printed; keys never


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([(b"authorization", b"Bearer abc")], b"abc"),
        ([(b"Authorization", b"bearer   abc ")], b"abc"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"x-api-key", b"abc")], None),
        ([], None),
    ],
)
def test_bearer_token(headers, token):
    assert bearer_token(headers) == token


def test_route_path_drops_the_application_prefix():
    assert route_path({"path": "/keyed/healthz", "root_path": "/keyed"}) == "/healthz"
    assert route_path({"path": "/keyed", "root_path": "/keyed"}) == "/"
    assert route_path({"path": "/healthz", "root_path": ""}) == "/healthz"


def test_every_key_is_compared():
    assert ApiKeys([KEY, OTHER_KEY]).accepts(OTHER_KEY.encode())


# --- a deployment with keys -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url(serve_app, tmp_path_factory) -> Iterator[str]:
    voices = VoicesConfig(store_dir=str(tmp_path_factory.mktemp("keyed-voices")))
    args = serve_app.args.model_copy(update={"voices": voices, "auth": AuthConfig(api_keys=[KEY, OTHER_KEY])})
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_app.url}/{APP}"
    serve.delete(APP)


@pytest.fixture
def http(keyed_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed_url, timeout=120) as client:
        yield client


SPEECH = {"model": SERVED_MODEL_ID, "input": "Hello.", "response_format": "pcm"}
TTS = {"text": "Hello.", "format": "wav"}
ROUTES = [
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/v1/audio/speech", SPEECH, "openai"),
    ("GET", "/v1/voices", None, "openai"),
    ("GET", "/v1/voices/nobody", None, "openai"),
    ("POST", "/v1/tts", TTS, "ours"),
    ("GET", "/docs", None, "ours"),
    ("GET", "/no/such/route", None, "ours"),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path", "body", "shape"), ROUTES)
@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        (bearer("sk-test-wrongwrongwrong0"), "invalid_api_key"),
        (bearer(KEY[:-1]), "invalid_api_key"),
        ({"Authorization": KEY}, "missing_api_key"),  # no Bearer scheme
    ],
)
def test_without_a_valid_key_every_route_is_401(http, method, path, body, shape, headers, code):
    response = http.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    if shape == "openai":
        assert error == {
            "message": error["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": code,
        }
    else:
        assert error == {"code": code, "message": error["message"], "field": None}


def test_with_a_valid_key_the_routes_answer(http):
    assert http.get("/v1/models", headers=bearer(KEY)).json()["data"][0]["id"] == SERVED_MODEL_ID
    assert http.get("/v1/voices", headers=bearer(OTHER_KEY)).json() == {"object": "list", "data": []}
    response = http.post("/v1/tts", json=TTS, headers={"authorization": f"bearer {KEY}"})
    assert response.status_code == 200
    assert len(base64.b64decode(response.json()["audio_base64"])) > 44


def test_the_probes_need_no_key(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}


def test_the_openai_client_with_api_key_speaks_with_a_saved_voice(http, keyed_url):
    created = http.post(
        "/v1/voices",
        files={"file": ("voice.wav", voice_wav(6.0), "audio/wav")},
        data={"name": "keyed-voice"},
        headers=bearer(KEY),
    )
    assert created.status_code == 201, created.text
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    audio = client.audio.speech.create(
        model=SERVED_MODEL_ID, voice="keyed-voice", input="Hello there.", response_format="wav"
    ).read()
    wav, sample_rate = sf.read(io.BytesIO(audio))
    assert sample_rate == 24_000
    assert len(wav) > 0
    assert np.isfinite(wav).all()
    wrong = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="sk-test-not-a-key-at-all", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.audio.speech.create(model=SERVED_MODEL_ID, voice="keyed-voice", input="Hi.")
    assert raised.value.code == "invalid_api_key"
    assert http.delete("/v1/voices/keyed-voice", headers=bearer(KEY)).status_code == 200


def test_the_handle_api_needs_no_key(keyed_url):
    result = serve.get_app_handle(APP).synthesize.remote(SynthesisRequest(text="Hello.", seed=1)).result()
    assert result.sample_rate == 24_000
    assert len(result.audio) > 44


def test_no_key_reaches_the_logs(http):
    http.get("/v1/models", headers=bearer("sk-test-wrong-and-logged?"))
    http.get("/v1/models", headers=bearer(KEY))
    # This session's own directory (other Ray sessions may run on the machine); no public API has it.
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert any(logs.rglob("*.log"))
    for log in logs.rglob("*"):
        if log.is_file():
            text = log.read_bytes()
            assert KEY.encode() not in text, log
            assert b"sk-test-wrong-and-logged" not in text, log
