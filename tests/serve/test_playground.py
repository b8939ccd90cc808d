"""The playground page at `/`: what the server renders (fast suite), then the page itself in headless
Chromium from Debian's packages (`-m browser`), playing audio synthesised by the session's
deployment (tiny checkpoint), at the root and under a route prefix."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from chatterbox.constants import PARALINGUISTIC_TAGS, S3GEN_SR
from serve_app.app import build_app
from tests.serve.conftest import REPO_ROOT, voice_wav

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PREFIXED_APP = "tts-prefixed"
PREFIX = "/speech-lab"
SENTENCE = "The playground streams this sentence. [chuckle] And then a second one."
SECONDS = re.compile(r"^\d+\.\d\d s$")


def page_settings(html: str) -> dict:
    found = re.search(r'<script id="settings" type="application/json">(.*?)</script>', html)
    assert found, html
    return json.loads(found.group(1))


# --- what the server renders --------------------------------------------------------------------


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
    assert response.content == (REPO_ROOT / "serve_app" / "static" / path).read_bytes()


def test_a_missing_static_file_is_a_404_in_the_error_shape(serve_app):
    response = httpx.get(f"{serve_app.url}/static/missing.js", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.fixture(scope="module")
def prefixed_app(serve_app) -> Iterator[str]:
    """A second application mounted under PREFIX; its URL."""
    serve.run(build_app(serve_app.args), name=PREFIXED_APP, route_prefix=PREFIX)
    try:
        yield f"{serve_app.url}{PREFIX}"
    finally:
        serve.delete(PREFIXED_APP)


@pytest.mark.parametrize("slash", ["", "/"])
def test_page_under_a_route_prefix_points_at_it(prefixed_app, slash):
    response = httpx.get(f"{prefixed_app}{slash}", timeout=10, follow_redirects=True)
    assert response.status_code == 200
    assert response.url.path == f"{PREFIX}/"  # FastAPI redirects the bare prefix to it
    assert f'<base href="{PREFIX}/">' in response.text
    assert httpx.get(f"{prefixed_app}/static/app.js", timeout=10).status_code == 200


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
def test_play_gives_playable_audio_and_timings(serve_app, browser, audio_format):
    browser.get(f"{serve_app.url}/")
    synthesise(browser, SENTENCE, audio_format)
    assert browser.find_element(By.ID, "error").text == ""
    audio = decoded_player_audio(browser)
    assert audio["error"] is None
    assert audio["duration"] > 0.5
    assert audio["decodedSeconds"] == pytest.approx(audio["duration"], abs=0.05)
    assert audio["streamedSeconds"] == pytest.approx(audio["duration"], abs=0.05)
    assert audio["peak"] > 0.01  # sound, not silence
    assert SECONDS.match(browser.find_element(By.ID, "ttfa").text)
    rtf = browser.find_element(By.ID, "rtf").text
    assert re.match(r"^\d+\.\d\d \(\d+\.\d\d s for the whole\)$", rtf), rtf
    if audio_format == "wav":
        (REPO_ROOT / "docs").mkdir(exist_ok=True)
        browser.save_screenshot(str(REPO_ROOT / "docs" / "playground.png"))


@pytest.mark.browser
def test_tags_insert_at_the_cursor(serve_app, browser):
    browser.get(f"{serve_app.url}/")
    buttons = browser.find_elements(By.CSS_SELECTOR, "#tags button")
    assert [button.text for button in buttons] == list(PARALINGUISTIC_TAGS)
    text_box = browser.find_element(By.ID, "text")
    text_box.clear()
    text_box.send_keys("Well that is funny", Keys.HOME)
    buttons[PARALINGUISTIC_TAGS.index("[laugh]")].click()
    assert text_box.get_attribute("value") == "[laugh] Well that is funny"


@pytest.mark.browser
def test_an_api_error_is_shown_as_text(serve_app, browser):
    browser.get(f"{serve_app.url}/")
    synthesise(browser, "   ", "wav")
    assert browser.find_element(By.ID, "error").text.startswith("400 empty_text: ")
    assert browser.find_element(By.ID, "player").get_dom_attribute("src") is None


@pytest.mark.browser
def test_an_uploaded_clip_is_the_voice(serve_app, browser, tmp_path):
    clip = tmp_path / "voice.wav"
    clip.write_bytes(voice_wav(6.0))
    browser.get(f"{serve_app.url}/")
    browser.find_element(By.ID, "clip").send_keys(str(clip))
    assert not browser.find_element(By.ID, "voice").is_enabled()  # the clip is the voice now
    synthesise(browser, SENTENCE, "wav")
    assert browser.find_element(By.ID, "error").text == ""
    assert decoded_player_audio(browser)["duration"] > 0.5


@pytest.mark.browser
def test_the_page_works_under_a_route_prefix(prefixed_app, browser):
    browser.get(prefixed_app)  # no trailing slash: relative URLs resolve against the base href
    synthesise(browser, SENTENCE, "wav")
    assert browser.find_element(By.ID, "error").text == ""
    assert decoded_player_audio(browser)["duration"] > 0.5
    # The same app is also at the root: only the URLs show that the page used the prefixed one.
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map((entry) => entry.name)"
    )
    assert f"{prefixed_app}/v1/audio/speech" in fetched
    assert f"{prefixed_app}/static/app.js" in fetched
    assert all(url.startswith(f"{prefixed_app}/") for url in fetched), fetched
