"""Per-request sampling settings: their defaults, their bounds and their validation, defined once.

The engine (``TTSRequest``), T3 (``T3Request``) and the Serve graph all carry a ``SamplingParams``;
the HTTP schemas build their fields from ``SAMPLING_BOUNDS`` and the defaults of ``SamplingParams``
(``SamplingParams().top_p``), so a value the HTTP API accepts is a value the engine accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chatterbox.constants import MAX_NEW_TOKENS
from chatterbox.errors import TTSInputError

MAX_SEED = 2**63  # seeds are 63-bit: derived stream seeds and the noise keys assume it


@dataclass(frozen=True)
class Bounds:
    """The accepted range of one setting, named as pydantic's ``Field`` takes it (gt, ge, le, lt)."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def interval(self) -> str:
        """The range in interval notation, e.g. ``(0, 5]``."""
        low = f"({_bound_text(self.gt)}" if self.gt is not None else f"[{_bound_text(self.ge)}"
        high = f"{_bound_text(self.le)}]" if self.le is not None else f"{_bound_text(self.lt)})"
        return f"{low}, {high}"

    def field_kwargs(self) -> dict[str, float]:
        """The bounds that are set, as keyword arguments (``Field(default, **bounds.field_kwargs())``)."""
        named = {"gt": self.gt, "ge": self.ge, "le": self.le, "lt": self.lt}
        return {name: value for name, value in named.items() if value is not None}


# Upper bounds on temperature, top_k and repetition_penalty are sanity limits of the service
# (beyond them sampling is noise or a single token); the lower bounds are what the maths needs.
SAMPLING_BOUNDS: dict[str, Bounds] = {
    "temperature": Bounds(gt=0, le=5),
    "top_k": Bounds(ge=1, le=100_000),
    "top_p": Bounds(gt=0, le=1),
    "repetition_penalty": Bounds(ge=1, le=10),
    "max_new_tokens": Bounds(ge=1, le=MAX_NEW_TOKENS),
    "seed": Bounds(ge=0, lt=MAX_SEED),
}
INTEGER_SETTINGS = frozenset({"top_k", "max_new_tokens", "seed"})


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples its speech tokens; defaults are the reference's ``generate`` defaults.

    Construction validates every setting and raises ``TTSInputError`` naming the field.
    ``max_new_tokens`` counts decode steps as the reference's ``max_gen_len`` does: a request
    samples at most ``max_new_tokens + 1`` tokens (one from the prefill).
    """

    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    max_new_tokens: int = MAX_NEW_TOKENS
    seed: int | None = None  # None -> a fresh random seed per generate call

    def __post_init__(self) -> None:
        for name, bounds in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            integer = name in INTEGER_SETTINGS
            if not _is_number(value, integer) or not bounds.contains(value):
                kind = "an integer" if integer else "a number"
                optional = "None or " if name == "seed" else ""
                raise TTSInputError(
                    f"{name} must be {optional}{kind} in {bounds.interval()}, got {value!r}", name
                )


def _bound_text(value: float | None) -> str:
    return "2**63" if value == MAX_SEED else f"{value:g}"


def _is_number(value: object, integer: bool) -> bool:
    """An int (never a bool) for integer settings; a finite int or float otherwise."""
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)
