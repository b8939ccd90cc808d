"""T3: text tokens + voice conditioning -> speech tokens (GPT-2 backbone, batched seeded sampler)."""

from chatterbox.t3.t3 import T3, T3Config, T3Request

__all__ = ["T3", "T3Config", "T3Request"]
