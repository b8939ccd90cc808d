"""The length-proportional token cap (EngineConfig.token_cap) on the tiny checkpoint, whose random
T3 seldom draws STOP: the cap, not STOP, ends each chunk, and max_new_tokens stays the ceiling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from chatterbox.constants import TOKEN_HZ
from chatterbox.engine import DecodeBatch, EngineConfig, TurboEngine
from chatterbox.engine.config import DEFAULT_TOKEN_CAP, TokenCap
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from serve_app.config import AppArgs

TEXTS = ("Hi.", "A short sentence.", "A longer sentence, with a clause or two, to say slowly.")


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


def drawn(tts: TurboTTS, requests: list[TTSRequest], **batch_options: object) -> list[int]:
    """Draws of each request's row (STOP included) in one DecodeBatch run to the end."""
    jobs = tts.jobs(requests)
    t3_requests = [job.t3_request() for job in jobs]
    ignore_stop = bool(batch_options.pop("ignore_stop_token", False))
    batch = DecodeBatch(tts.t3, len(jobs), 1200, **batch_options)
    rows = [batch.make_row(r, ignore_stop_token=ignore_stop) for r in t3_requests]
    for row in rows:
        batch.admit(row)
    with torch.inference_mode():
        while batch.has_work:
            assert not batch.prefill()
            batch.step()
    return [len(row.tokens) for row in rows]


def text_tokens(tts: TurboTTS, text: str) -> int:
    return len(tts.text_tokens(text))


def test_the_default_cap_follows_from_25_tokens_a_second_at_the_slowest_pace():
    # 2 text tokens a second at the slowest: 12.5 speech tokens per text token, plus 2 s.
    assert DEFAULT_TOKEN_CAP.per_text_token == 12.5
    assert DEFAULT_TOKEN_CAP.extra == 2 * TOKEN_HZ
    assert EngineConfig().token_cap == DEFAULT_TOKEN_CAP
    assert DEFAULT_TOKEN_CAP.tokens(1) == 63
    assert DEFAULT_TOKEN_CAP.tokens(10) == 175
    # A full 300-character chunk is ~70 GPT-2 tokens: at most 925 tokens, under the 1000 ceiling.
    assert DEFAULT_TOKEN_CAP.tokens(70) == 925


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"per_text_token": 0}, "per_text_token must be a finite number > 0"),
        ({"per_text_token": float("nan")}, "per_text_token must be a finite number > 0"),
        ({"per_text_token": True}, "per_text_token must be a finite number > 0"),
        ({"extra": 1}, "extra must be an integer >= 2"),
        ({"extra": 2.5}, "extra must be an integer >= 2"),
    ],
)
def test_bad_caps_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TokenCap(**change)


def test_the_cap_ends_every_row_at_its_own_text_length(tts: TurboTTS):
    requests = [TTSRequest(text, sampling=SamplingParams(seed=i)) for i, text in enumerate(TEXTS)]
    caps = [DEFAULT_TOKEN_CAP.tokens(text_tokens(tts, text)) for text in TEXTS]
    assert caps == sorted(caps) and caps[-1] < 1001  # all under max_new_tokens' 1001 draws
    assert drawn(tts, requests) == caps
    # The offline path runs the same DecodeBatch: its speech tokens are at most the cap.
    for tokens, cap in zip(tts.speech_tokens(requests), caps, strict=True):
        assert 0 < tokens.numel() <= cap


def test_a_configured_cap_and_no_cap(tts: TurboTTS):
    requests = [TTSRequest(text, sampling=SamplingParams(seed=7, max_new_tokens=200)) for text in TEXTS[:2]]
    lengths = [text_tokens(tts, text) for text in TEXTS[:2]]
    assert drawn(tts, requests, token_cap=TokenCap(3, 10)) == [3 * n + 10 for n in lengths]
    assert drawn(tts, requests, token_cap=None) == [201, 201]  # max_new_tokens alone


def test_max_new_tokens_stays_the_ceiling_and_ignoring_stop_ignores_the_cap(tts: TurboTTS):
    text = TEXTS[0]
    assert DEFAULT_TOKEN_CAP.tokens(text_tokens(tts, text)) > 21
    short = [TTSRequest(text, sampling=SamplingParams(seed=1, max_new_tokens=20))]
    assert drawn(tts, short) == [21]
    # Benchmarks run rows to their limit: the cap guards a missed STOP, which they never look for.
    long = [TTSRequest(text, sampling=SamplingParams(seed=1, max_new_tokens=300))]
    assert drawn(tts, long, ignore_stop_token=True) == [301]


def test_the_engine_caps_its_chunks(tts: TurboTTS):
    cap = TokenCap(per_text_token=2, extra=12)
    request = TTSRequest(TEXTS[1], sampling=SamplingParams(seed=3))
    expected = cap.tokens(text_tokens(tts, TEXTS[1]))

    async def run() -> tuple[int, int]:
        engine = TurboEngine(tts, EngineConfig(max_slots=2, token_cap=cap))
        engine.start()
        try:
            streamed = sum([t.numel() async for t in engine.stream(request)])
            audio = await engine.submit(request)
        finally:
            engine.close()
        return streamed, len(audio)

    streamed, samples = asyncio.run(run())
    assert streamed == expected  # no STOP drawn: the cap ended it
    assert samples == 960 * (streamed + 3)  # the same draws, vocoded with the 3 silence tokens


def test_the_serve_config_sets_the_cap():
    args = AppArgs(engine={"token_cap": {"per_text_token": 10, "extra": 40}})
    assert args.engine.token_cap == TokenCap(10, 40)
    assert AppArgs(engine={"token_cap": None}).engine.token_cap is None
    assert AppArgs().engine.token_cap == DEFAULT_TOKEN_CAP
    with pytest.raises(ValueError, match="extra must be an integer >= 2"):
        AppArgs(engine={"token_cap": {"extra": 0}})
