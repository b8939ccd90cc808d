"""The API schemas take sampling defaults and bounds from the engine's SamplingParams, and the
stitch plan follows the chunks' breaks (pure: no Ray)."""

import pytest
from pydantic import ValidationError

from chatterbox.errors import TTSInputError
from chatterbox.sampling import SAMPLING_BOUNDS, SamplingParams
from serve_app.config import StitchingConfig
from serve_app.schemas import SynthesisParams
from serve_app.synthesis.audio import StitchPlan, stitch_plan
from serve_app.synthesis.chunking import TextChunk


def test_a_request_without_settings_samples_with_the_engine_defaults():
    assert SynthesisParams(text="Hi.").sampling(max_new_tokens=7) == SamplingParams(max_new_tokens=7)


def test_a_request_carries_its_settings_and_seed():
    request = SynthesisParams(text="Hi.", seed=3, temperature=0.5, top_p=0.5, top_k=7, repetition_penalty=2)
    assert request.sampling(max_new_tokens=9) == SamplingParams(
        temperature=0.5, top_k=7, top_p=0.5, repetition_penalty=2.0, max_new_tokens=9, seed=3
    )


def accepts(build, value) -> bool:
    try:
        build(value)
    except (ValidationError, TTSInputError):
        return False
    return True


@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k", "repetition_penalty"])
def test_the_api_accepts_exactly_the_values_the_engine_accepts(name):
    bounds = SAMPLING_BOUNDS[name]
    step = 1 if name == "top_k" else 1e-6
    edges = [b for b in (bounds.gt, bounds.ge, bounds.le, bounds.lt) if b is not None]
    values = [type(step)(edge + d) for edge in edges for d in (-step, 0, step)]
    for value in values:
        api = accepts(lambda v: SynthesisParams(text="Hi.", **{name: v}), value)
        engine = accepts(lambda v: SamplingParams(**{name: v}), value)
        assert api == engine, (name, value)
    assert {accepts(lambda v: SamplingParams(**{name: v}), value) for value in values} == {True, False}


def test_the_stitch_plan_pauses_by_how_each_chunk_ends():
    chunks = [
        TextChunk("One.", "sentence"),
        TextChunk("two,", "clause"),
        TextChunk("three.", "paragraph"),
        TextChunk("Four.", "sentence"),  # the last chunk: no pause after it
    ]
    stitching = StitchingConfig(crossfade_ms=10, sentence_pause_ms=80, paragraph_pause_ms=600)
    assert stitch_plan(chunks, stitching, 24_000, "flac") == StitchPlan(
        chunk_texts=["One.", "two,", "three.", "Four."],
        pauses=[1920, 0, 14_400],
        crossfade=240,
        sample_rate=24_000,
        format="flac",
    )
