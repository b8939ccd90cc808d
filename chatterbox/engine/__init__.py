"""The decode core (``DecodeBatch``), its one KV cache, CUDA graphs and S3Gen stage, and
``TurboEngine``, the threaded shell around them."""

from chatterbox.engine.batch import DecodeBatch, StageTimes, generate_tokens
from chatterbox.engine.capacity import EngineCapacityError
from chatterbox.engine.config import EngineConfig
from chatterbox.engine.engine import EngineClosedError, EngineStats, TurboEngine
from chatterbox.engine.vocoder import VocoderStats

__all__ = [
    "DecodeBatch",
    "EngineCapacityError",
    "EngineClosedError",
    "EngineConfig",
    "EngineStats",
    "StageTimes",
    "TurboEngine",
    "VocoderStats",
    "generate_tokens",
]
