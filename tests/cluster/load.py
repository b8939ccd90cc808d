"""A bounded steady load on `POST /v1/tts`: a few clients, each sending its next request when the
last one is answered (after the Retry-After of a refusal), and every answer sorted into audio,
our JSON refusal, or anything else."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import soundfile as sf

from tests.text_samples import SENTENCES

AUDIO, REFUSED, OTHER = "audio", "refused", "other"


@dataclass(frozen=True)
class Outcome:
    sent_at: float  # time.time() of the request and of its answer
    answered_at: float
    kind: str  # AUDIO, REFUSED or OTHER
    detail: str  # the refusal's code, or what else came back


def classify(response: httpx.Response) -> tuple[str, str]:
    """AUDIO: 200 with a WAV that decodes to samples; REFUSED: 503 in our error shape with a
    Retry-After; OTHER: anything else."""
    if response.status_code == 200:
        body = response.json()
        samples, _ = sf.read(io.BytesIO(base64.b64decode(body["audio_base64"])), dtype="int16")
        if len(samples) > 0 and body["format"] == "wav":
            return AUDIO, ""
        return OTHER, f"200 with {len(samples)} samples"
    if response.status_code == 503 and response.headers.get("retry-after", "").isdigit():
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return OTHER, f"503 not in our shape: {response.text[:200]}"
        return REFUSED, code
    return OTHER, f"{response.status_code}: {response.text[:200]}"


@dataclass
class SteadyLoad:
    """``clients`` threads, each one request at a time; half the requests name ``voice``."""

    url: str
    voice: str
    clients: int = 3
    timeout_s: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as http:
            sent = 0
            while not self._stop.is_set():
                number = index + sent * self.clients
                body = {"text": SENTENCES[number % len(SENTENCES)], "seed": number, "format": "wav"}
                if number % 2:
                    body["voice"] = self.voice
                sent += 1
                sent_at = time.time()
                wait = 0.0
                try:
                    response = http.post("/v1/tts", json=body)
                    kind, detail = classify(response)
                    if kind == REFUSED:
                        wait = float(response.headers["retry-after"])
                except Exception as error:
                    kind, detail = OTHER, repr(error)
                self.outcomes.append(Outcome(sent_at, time.time(), kind, detail))
                self._stop.wait(wait)

    def start(self) -> None:
        for index in range(self.clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop sending; wait for the answers still outstanding."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 10)

    def counts(self) -> Counter[str]:
        return Counter(outcome.kind for outcome in self.outcomes)

    def first_audio_after(self, moment: float) -> float | None:
        """The first answer with audio to a request sent after ``moment`` (time.time())."""
        times = [o.answered_at for o in self.outcomes if o.kind == AUDIO and o.sent_at >= moment]
        return min(times, default=None)
