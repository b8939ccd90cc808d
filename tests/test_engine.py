"""The TurboTTS engine on the tiny checkpoint: batching invariance, validation, watermark, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox.constants import STOP_SPEECH_TOKEN
from chatterbox.errors import EmptyTextError, TextTooLongError, TTSInputError
from chatterbox.s3gen import S3GenRequest
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS, derive_seed
from chatterbox.voice import Voice
from chatterbox.watermark import detect_watermark
from tests.audio_samples import encode, speechlike
from tests.t3_weight_edits import stop_only_after_start

TOKENS = 40  # speech tokens per request: 1.6 s of audio keeps the tiny model fast


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def voices(tts: TurboTTS) -> list[Voice]:
    refs = [encode(speechlike(s, sr, seed=int(s)), sr) for s, sr in ((6.0, 16000), (11.0, 44100))]
    return [tts.default_voice, *(tts.prepare_voice(ref) for ref in refs)]


def test_batch_of_six_with_three_voices_equals_each_request_alone(tts: TurboTTS, voices: list[Voice]):
    requests = [
        TTSRequest("Hello there.", voice=voices[0], sampling=SamplingParams(seed=1, max_new_tokens=TOKENS)),
        TTSRequest(
            "A somewhat longer sentence [laugh] with a tag.",
            voice=voices[1],
            sampling=SamplingParams(seed=2, max_new_tokens=TOKENS),
        ),
        TTSRequest(
            "Short.",
            voice=voices[2],
            sampling=SamplingParams(seed=3, max_new_tokens=TOKENS - 15, temperature=0.5),
        ),
        TTSRequest(
            "Hello there.", voice=voices[1], sampling=SamplingParams(seed=1, max_new_tokens=TOKENS, top_k=50)
        ),
        TTSRequest(
            "Numbers 1, 2, 3.",
            voice=voices[2],
            sampling=SamplingParams(seed=5, max_new_tokens=TOKENS, top_p=0.8),
        ),
        TTSRequest(
            "The last one, with default settings.",
            voice=None,
            sampling=SamplingParams(seed=6, max_new_tokens=TOKENS),
        ),
    ]
    batched = tts.generate(requests, watermark=False)
    for request, wav in zip(requests, batched, strict=True):
        alone = tts.generate([request], watermark=False)[0]
        assert wav.shape == alone.shape
        assert np.abs(wav - alone).max() <= 1e-4
    # different voices really differ (same text and seed, voices 0 and 1)
    assert not np.allclose(batched[0], batched[3][: len(batched[0])], atol=1e-3)


def test_audio_is_960_samples_per_speech_token_plus_silence(tts: TurboTTS):
    request = TTSRequest("Count the samples.", sampling=SamplingParams(seed=11, max_new_tokens=TOKENS))
    tokens = tts.speech_tokens([request])[0]
    assert 0 < tokens.numel() <= TOKENS + 1
    assert int(tokens.max()) < 6561
    wav = tts.generate([request], watermark=False)[0]
    assert wav.dtype == np.float32
    assert len(wav) == 960 * (tokens.numel() + 3)


def test_seeds_reproduce_and_unseeded_requests_vary(tts: TurboTTS):
    seeded = TTSRequest("Same seed, same audio.", sampling=SamplingParams(seed=7, max_new_tokens=TOKENS))
    first, second = (tts.generate([seeded], watermark=False)[0] for _ in range(2))
    assert np.array_equal(first, second)
    unseeded = TTSRequest("No seed.", sampling=SamplingParams(max_new_tokens=TOKENS))
    a, b = tts.generate([unseeded, unseeded], watermark=False)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_watermark_is_on_by_default(tts: TurboTTS):
    request = TTSRequest("Marked audio.", sampling=SamplingParams(seed=3, max_new_tokens=TOKENS))
    marked = tts.generate([request])[0]
    plain = tts.generate([request], watermark=False)[0]
    assert detect_watermark(marked, 24000) > 0.9
    assert detect_watermark(plain, 24000) < 0.1


def test_serialised_voice_gives_the_same_audio(tts: TurboTTS, voices: list[Voice]):
    restored = Voice.from_bytes(voices[1].to_bytes())
    request = TTSRequest(
        "Round trip.", voice=voices[1], sampling=SamplingParams(seed=4, max_new_tokens=TOKENS)
    )
    again = TTSRequest("Round trip.", voice=restored, sampling=SamplingParams(seed=4, max_new_tokens=TOKENS))
    assert np.array_equal(*tts.generate([request, again], watermark=False))


def test_voice_ids_are_stable_per_audio_and_model(tts: TurboTTS, voices: list[Voice]):
    again = tts.prepare_voice(encode(speechlike(6.0, 16000, seed=6), 16000))
    assert again.id == voices[1].id
    assert voices[1].id != voices[2].id


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("", EmptyTextError, "text is empty"),
        (" \n\t ", EmptyTextError, "text is empty"),
        ("word " * 1100, TextTooLongError, "one request takes at most 1024"),
    ],
)
def test_bad_text_is_refused_naming_the_field(tts: TurboTTS, text: str, error: type, message: str):
    request = TTSRequest(text)
    with pytest.raises(error, match=message) as info:
        tts.generate([TTSRequest("A good request first.", sampling=SamplingParams(seed=1)), request])
    assert info.value.field == "text"


def test_a_first_stop_token_is_voiced_past_as_upstream_does(tiny_checkpoint: Path):
    tts = TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")
    stop_only_after_start(dict(tts.t3.named_parameters()))
    request = TTSRequest(
        "Stop first, then speak.", sampling=SamplingParams(seed=5, top_k=1, max_new_tokens=TOKENS)
    )
    tokens = tts.speech_tokens([request])[0]
    assert tokens.numel() == TOKENS  # STOP, then TOKENS more draws; the STOP is dropped
    assert len(tts.generate([request], watermark=False)[0]) == 960 * (TOKENS + 3)


def test_a_row_of_only_stop_tokens_vocodes_the_silence_tokens(tiny_checkpoint: Path):
    tts = TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")
    with torch.no_grad():  # STOP at every draw: the first is fed back, the second ends the row
        tts.t3.speech_head.bias[STOP_SPEECH_TOKEN] += 1e3
    request = TTSRequest("Nothing but stops.", sampling=SamplingParams(seed=6, max_new_tokens=TOKENS))
    assert tts.speech_tokens([request])[0].numel() == 0
    wav = tts.generate([request], watermark=False)[0]
    conditionals = tts.default_voice.conditionals
    silence = S3GenRequest(
        speech_tokens=torch.zeros(0, dtype=torch.long),
        prompt_tokens=conditionals.prompt_tokens,
        prompt_feat=conditionals.prompt_feat,
        embedding=conditionals.embedding,
        seed=derive_seed(6, "s3gen"),
    )
    expected = tts.s3gen.generate([silence])[0].numpy()
    assert len(wav) == len(expected) == 960 * 3  # the built-in voice's prompt mel has an even length
    assert np.abs(wav).max() > 0  # upstream vocodes its 3 silence tokens; it never pads zeros
    np.testing.assert_array_equal(wav, expected)


def test_prepare_voice_from_an_array_needs_its_rate(tts: TurboTTS):
    with pytest.raises(TTSInputError, match="needs its sample_rate"):
        tts.prepare_voice(speechlike(6.0, 24000))
    voice = tts.prepare_voice(speechlike(6.0, 24000), sample_rate=24000)
    assert voice.conditionals.embedding.shape == (192,)


def _synthesize_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "chatterbox", "synthesize", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_cli_synthesize_writes_a_24k_wav_of_960_samples_per_token(
    tts: TurboTTS, tiny_checkpoint: Path, tmp_path: Path
):
    ref = tmp_path / "ref.wav"
    ref.write_bytes(encode(speechlike(6.0, 16000, seed=6), 16000))
    out = tmp_path / "out.wav"
    text = "Hello from the command line."
    proc = _synthesize_cli(
        "--text", text, "--voice", str(ref), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
        "--seed", "9", "--max-new-tokens", str(TOKENS), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    wav, sample_rate = sf.read(out, dtype="float32")
    assert sample_rate == 24000
    voice = tts.prepare_voice(ref.read_bytes())
    tokens = tts.speech_tokens(
        [TTSRequest(text, voice=voice, sampling=SamplingParams(seed=9, max_new_tokens=TOKENS))]
    )[0]
    assert len(wav) == 960 * (tokens.numel() + 3)
    assert detect_watermark(wav, 24000) > 0.9


def test_cli_refuses_max_new_tokens_over_the_bound_before_loading(tmp_path: Path):
    out = tmp_path / "o.wav"
    proc = _synthesize_cli(
        "--text", "Hi.", "--out", str(out), "--checkpoint", str(tmp_path / "none"), "--max-new-tokens", "1001"
    )
    assert proc.returncode == 2
    assert "--max-new-tokens: must be an integer in [1, 1000], got '1001'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_reports_bad_input_without_a_traceback(tiny_checkpoint: Path, tmp_path: Path):
    ref = tmp_path / "short.wav"
    ref.write_bytes(encode(speechlike(2.0, 16000), 16000))
    proc = _synthesize_cli(
        "--text",
        "Hi.",
        "--voice",
        str(ref),
        "--out",
        str(tmp_path / "o.wav"),
        "--checkpoint",
        str(tiny_checkpoint),
    )
    assert proc.returncode == 2
    assert "error: reference audio is 2.00 s long; a voice needs more than 5 s" in proc.stderr
    assert "Traceback" not in proc.stderr
