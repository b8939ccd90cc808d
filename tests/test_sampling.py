"""SamplingParams: one set of defaults and bounds, validated at construction with the field named."""

from __future__ import annotations

import pytest

from chatterbox.errors import TTSInputError
from chatterbox.sampling import SAMPLING_BOUNDS, Bounds, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"temperature": 0.0}, "temperature", r"temperature must be a number in \(0, 5\], got 0.0"),
        ({"temperature": float("nan")}, "temperature", "temperature must be a number"),
        ({"temperature": float("inf")}, "temperature", "temperature must be a number"),
        ({"temperature": 5.5}, "temperature", r"in \(0, 5\], got 5.5"),
        ({"top_k": 0}, "top_k", r"top_k must be an integer in \[1, 100000\], got 0"),
        ({"top_k": 2.5}, "top_k", "top_k must be an integer"),
        ({"top_k": True}, "top_k", "top_k must be an integer"),
        ({"top_p": 0.0}, "top_p", r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, "top_p", r"top_p must be a number in \(0, 1\]"),
        ({"repetition_penalty": 0.5}, "repetition_penalty", r"must be a number in \[1, 10\], got 0.5"),
        ({"max_new_tokens": 0}, "max_new_tokens", r"max_new_tokens must be an integer in \[1, 1000\], got 0"),
        ({"max_new_tokens": 1001}, "max_new_tokens", r"in \[1, 1000\], got 1001"),
        ({"seed": -1}, "seed", r"seed must be None or an integer in \[0, 2\*\*63\), got -1"),
        ({"seed": 2**63}, "seed", r"seed must be None or an integer"),
        ({"seed": "7"}, "seed", r"got '7'"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kwargs: dict, field: str, message: str):
    with pytest.raises(TTSInputError, match=message) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert info.value.code == "invalid_parameter"


def test_defaults_are_the_reference_generate_defaults_and_bounds_admit_the_edges():
    assert SamplingParams() == SamplingParams(
        temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2, max_new_tokens=1000, seed=None
    )
    edges = SamplingParams(
        temperature=5, top_k=100_000, top_p=1.0, repetition_penalty=1, max_new_tokens=1, seed=2**63 - 1
    )
    assert edges.seed == 2**63 - 1


def test_every_field_has_bounds_that_its_default_satisfies():
    defaults = SamplingParams()
    assert set(SAMPLING_BOUNDS) == set(vars(defaults))
    for name, bounds in SAMPLING_BOUNDS.items():
        value = getattr(defaults, name)
        assert value is None or bounds.contains(value), name


def test_bounds_read_as_pydantic_field_keywords_and_as_an_interval():
    assert SAMPLING_BOUNDS["temperature"].field_kwargs() == {"gt": 0, "le": 5}
    assert SAMPLING_BOUNDS["seed"].field_kwargs() == {"ge": 0, "lt": 2**63}
    assert SAMPLING_BOUNDS["top_p"].interval() == "(0, 1]"
    assert Bounds(ge=1, lt=3).contains(1) and not Bounds(ge=1, lt=3).contains(3)
