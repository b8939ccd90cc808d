"""The playground page at `/`: what the server renders (fast suite), then the page itself in headless
Chromium from Debian's packages (`-m browser`), playing audio synthesised by the session's
deployment (tiny checkpoint) at the root, and by an application under a route prefix with an API key."""

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from chatterbox.constants import PARALINGUISTIC_TAGS, S3GEN_SR
from serve_app.api.playground import render_page
from serve_app.app import build_app
from serve_app.config import AuthConfig, VoicesConfig
from tests.serve.conftest import REPO_ROOT, voice_wav
from tests.serve.test_serve_app import paragraph

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEYED_APP = "tts-keyed"
PREFIX = "/speech-lab"
API_KEY = "playground-test-key-0123456789"
SENTENCE = "The playground streams this sentence. [chuckle] And then a second one."


def page_settings(html: str) -> dict:
    found = re.search(r'<script id="settings" type="application/json">(.*?)</script>', html)
    assert found, html
    return json.loads(found.group(1))


# --- what the server renders --------------------------------------------------------------------


def test_render_page_escapes_the_root_path():
    html = render_page('/a"b<c/')
    assert '<base href="/a&quot;b&lt;c/">' in html
    assert "{{" not in html
    assert page_settings(html)["tags"] == list(PARALINGUISTIC_TAGS)


def test_page_embeds_the_tags_and_the_app_base(serve_app):
    response = httpx.get(f"{serve_app.url}/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<base href="/">' in response.text
    settings = page_settings(response.text)
    assert settings == {"tags": list(PARALINGUISTIC_TAGS), "pcmSampleRate": S3GEN_SR}


@pytest.mark.parametrize(("path", "content_type"), [("app.js", "text/javascript"), ("style.css", "text/css")])
def test_static_files_are_served(serve_app, path, content_type):
    response = httpx.get(f"{serve_app.url}/static/{path}", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert response.content == (REPO_ROOT / "serve_app" / "api" / "static" / path).read_bytes()


def test_a_missing_static_file_is_a_404_in_the_error_shape(serve_app):
    response = httpx.get(f"{serve_app.url}/static/missing.js", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.fixture(scope="module")
def keyed_app(serve_app, tmp_path_factory) -> Iterator[str]:
    """A second application, mounted under PREFIX, with an API key and its own voice store; its URL."""
    args = serve_app.args.model_copy(
        update={
            "auth": AuthConfig(api_keys=(API_KEY,)),
            "voices": VoicesConfig(store_dir=str(tmp_path_factory.mktemp("playground-voices"))),
        }
    )
    serve.run(build_app(args), name=KEYED_APP, route_prefix=PREFIX)
    try:
        yield f"{serve_app.url}{PREFIX}"
    finally:
        serve.delete(KEYED_APP)


@pytest.mark.parametrize("slash", ["", "/"])
def test_page_under_a_route_prefix_points_at_it_and_needs_no_key(keyed_app, slash):
    response = httpx.get(f"{keyed_app}{slash}", timeout=10, follow_redirects=True)
    assert response.status_code == 200
    assert response.url.path == f"{PREFIX}/"  # FastAPI redirects the bare prefix to it
    assert f'<base href="{PREFIX}/">' in response.text
    assert httpx.get(f"{keyed_app}/static/app.js", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_app}/v1/voices", timeout=10).status_code == 401  # the API is locked


# --- the page in a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"needs Debian's chromium and chromium-driver: {', '.join(missing)} not found")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,1100",
        # A whole-file format starts playing after the fetch, long after the click's user activation.
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def synthesise(driver, text: str, audio_format: str, timeout_s: float = 120.0) -> None:
    """On the loaded page: enters `text`, picks `audio_format`, presses Play, waits for the outcome."""
    text_box = driver.find_element(By.ID, "text")
    text_box.clear()
    text_box.send_keys(text)
    Select(driver.find_element(By.ID, "format")).select_by_value(audio_format)
    driver.find_element(By.ID, "play").click()
    WebDriverWait(driver, timeout_s).until(
        lambda d: d.find_element(By.ID, "status").text == "done" or d.find_element(By.ID, "error").text
    )


def decoded_player_audio(driver) -> dict:
    """What Chromium makes of the <audio> element's source: its own metadata, and the same bytes
    decoded by the Web Audio API."""
    return driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const player = document.getElementById("player");
        const decode = async () => {
          if (player.readyState < 1) await new Promise((ok) => { player.onloadedmetadata = ok; });
          const bytes = await (await fetch(player.src)).arrayBuffer();
          const audio = await new OfflineAudioContext(1, 1, 48000).decodeAudioData(bytes);
          const samples = audio.getChannelData(0);
          return {
            error: player.error && player.error.message,
            duration: player.duration,
            streamedSeconds: Number(player.dataset.audioSeconds),
            decodedSeconds: audio.duration,
            peak: samples.reduce((peak, x) => Math.max(peak, Math.abs(x)), 0),
          };
        };
        decode().then(done, (error) => done({ error: String(error) }));
        """
    )


@pytest.mark.browser
@pytest.mark.parametrize("audio_format", ["wav", "pcm", "mp3"])
def test_play_gives_playable_audio_and_timings(browser, serve_app, audio_format):
    browser.get(f"{serve_app.url}/")
    synthesise(browser, SENTENCE, audio_format)
    assert browser.find_element(By.ID, "error").text == ""
    audio = decoded_player_audio(browser)
    assert audio["error"] is None
    assert audio["duration"] > 0.5
    assert audio["decodedSeconds"] == pytest.approx(audio["duration"], abs=0.05)
    assert audio["streamedSeconds"] == pytest.approx(audio["duration"], abs=0.05)
    assert audio["peak"] > 0.01  # sound, not silence
    timings = shown_timings(browser)
    assert 0 < timings["ttfa_s"] <= timings["total_s"]
    assert timings["rtf"] == pytest.approx(timings["total_s"] / audio["duration"], abs=0.02)


def shown_timings(driver) -> dict[str, float]:
    """The time to first audio and real-time factor the page shows, as numbers."""
    ttfa = driver.find_element(By.ID, "ttfa").text
    assert re.fullmatch(r"\d+\.\d\d s", ttfa), ttfa
    rtf = driver.find_element(By.ID, "rtf").text
    found = re.fullmatch(r"(\d+\.\d\d) \((\d+\.\d\d) s for the whole\)", rtf)
    assert found, rtf
    return {"ttfa_s": float(ttfa[:-2]), "rtf": float(found.group(1)), "total_s": float(found.group(2))}


@pytest.mark.browser
def test_a_long_text_starts_playing_before_it_is_all_made(browser, serve_app):
    browser.get(f"{serve_app.url}/")
    synthesise(browser, paragraph(1200, offset=0), "pcm")  # 4 or 5 chunks of about 300 characters
    assert browser.find_element(By.ID, "error").text == ""
    timings = shown_timings(browser)
    assert timings["ttfa_s"] < 0.7 * timings["total_s"], timings
    assert decoded_player_audio(browser)["duration"] > 3.0
    # The README's screenshot is refreshed on request only, so a CI run leaves the tree clean.
    if os.environ.get("UPDATE_PLAYGROUND_SCREENSHOT"):
        browser.save_screenshot(str(REPO_ROOT / "docs" / "playground.png"))


@pytest.mark.browser
def test_tags_insert_at_the_cursor(browser, serve_app):
    browser.get(f"{serve_app.url}/")
    buttons = browser.find_elements(By.CSS_SELECTOR, "#tags button")
    assert [button.text for button in buttons] == list(PARALINGUISTIC_TAGS)
    text_box = browser.find_element(By.ID, "text")
    text_box.clear()
    text_box.send_keys("Well that is funny", Keys.HOME)
    buttons[PARALINGUISTIC_TAGS.index("[laugh]")].click()
    assert text_box.get_attribute("value") == "[laugh] Well that is funny"


@pytest.mark.browser
def test_an_api_error_is_shown_as_text(browser, serve_app):
    browser.get(f"{serve_app.url}/")
    synthesise(browser, "   ", "wav")
    assert browser.find_element(By.ID, "error").text.startswith("400 empty_text: ")
    assert browser.find_element(By.ID, "player").get_dom_attribute("src") is None


@pytest.mark.browser
def test_an_uploaded_clip_is_the_voice(browser, serve_app, tmp_path):
    clip = tmp_path / "voice.wav"
    clip.write_bytes(voice_wav(6.0))
    browser.get(f"{serve_app.url}/")
    browser.find_element(By.ID, "clip").send_keys(str(clip))
    assert not browser.find_element(By.ID, "voice").is_enabled()  # the clip is the voice now
    synthesise(browser, SENTENCE, "wav")
    assert browser.find_element(By.ID, "error").text == ""
    assert decoded_player_audio(browser)["duration"] > 0.5


def wait_for_text(driver, element_id: str, predicate, timeout_s: float = 30.0) -> str:
    """The element's text once `predicate` holds for it."""
    try:
        WebDriverWait(driver, timeout_s).until(lambda d: predicate(d.find_element(By.ID, element_id).text))
    except TimeoutException:
        pytest.fail(f"#{element_id} still reads {driver.find_element(By.ID, element_id).text!r}")
    return driver.find_element(By.ID, element_id).text


def enter_api_key(driver, key: str) -> None:
    key_box = driver.find_element(By.ID, "api-key")
    key_box.clear()
    key_box.send_keys(key, Keys.TAB)  # leaving the field stores the key and reloads the voices


@pytest.mark.browser
def test_with_keys_on_the_page_asks_for_one_and_works_with_it(browser, keyed_app):
    browser.get(keyed_app)  # no trailing slash: relative URLs resolve against the base href
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    error = wait_for_text(browser, "error", bool)
    assert error.startswith("voices: 401 missing_api_key: ")
    assert error.endswith("(enter an API key above)")

    enter_api_key(browser, "w" * len(API_KEY))
    wait_for_text(browser, "error", lambda text: "401 invalid_api_key" in text)
    synthesise(browser, SENTENCE, "wav")
    assert browser.find_element(By.ID, "error").text.startswith("401 invalid_api_key: ")
    assert browser.find_element(By.ID, "player").get_dom_attribute("src") is None

    enter_api_key(browser, API_KEY)
    wait_for_text(browser, "error", lambda text: text == "")
    synthesise(browser, SENTENCE, "wav")
    assert browser.find_element(By.ID, "error").text == ""
    assert decoded_player_audio(browser)["duration"] > 0.5
    # The same page is also served at the root: only the URLs show that it used the prefixed app.
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map((entry) => entry.name)"
    )
    assert f"{keyed_app}/v1/audio/speech" in fetched
    assert f"{keyed_app}/static/app.js" in fetched
    assert all(url.startswith(f"{keyed_app}/") for url in fetched), fetched

    browser.refresh()  # the key is remembered
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY


@pytest.mark.browser
def test_a_clip_saved_as_a_voice_is_listed_and_speaks(browser, keyed_app, tmp_path):
    clip = tmp_path / "voice.wav"
    clip.write_bytes(voice_wav(6.0))
    browser.get(f"{keyed_app}/")
    enter_api_key(browser, API_KEY)
    browser.find_element(By.ID, "clip").send_keys(str(clip))
    browser.find_element(By.ID, "voice-name").send_keys("Narrator")
    browser.find_element(By.ID, "save-voice").click()
    voice = Select(browser.find_element(By.ID, "voice"))
    WebDriverWait(browser, 60).until(lambda _: voice.first_selected_option.text == "Narrator")
    saved = httpx.get(f"{keyed_app}/v1/voices", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert [(v["id"], v["name"]) for v in saved.json()["data"]] == [
        (voice.first_selected_option.get_attribute("value"), "Narrator")
    ]
    assert browser.find_element(By.ID, "voice").is_enabled()  # the clip is saved: the list decides
    synthesise(browser, SENTENCE, "wav")
    assert browser.find_element(By.ID, "error").text == ""
    assert decoded_player_audio(browser)["duration"] > 0.5
