"""The decode core and its server shell: one KV cache, one decode batch, one vocoder stage.

- ``kv_cache``: ``SlotCache`` (one row per request), ``SlotContext``, ``PrefixCache``.
- ``batch``: ``DecodeBatch``, synchronous and thread-free: admit, prefill, step, retire; the stop
  rule and the speech-token filter; ``generate_tokens`` runs it to completion (``TurboTTS``).
- ``cuda_graphs``: the decode step replayed as CUDA graphs, self-checked against eager.
- ``vocoder``: the S3Gen stage, whole rows and streamed hops on one thread.
- ``outcomes``: ``isolate_failures``, one outcome per item of a batched call.
- ``capacity``: free memory and the KV cache's capacity error.
- ``engine``: ``TurboEngine``, the threads, queues and futures around them.
"""

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
