"""Voice affinity: Serve's request router for the model deployment, sending a voice's chunks to the
replica that already holds the voice.

Each model replica keeps its own prepared voices (`VoiceCache`) and its engine its own voice-prefix
K/V, both LRUs of `voice_cache_size` voices. Spread at random, every replica ends up preparing every
voice in use; routed by voice, each replica prepares only its share. The preferred replica of a voice
comes from rendezvous hashing of the voice's reference id over the replicas' ids: every router (one
per ingress or jobs replica) computes the same choice with no shared state, and when a replica comes
or goes only the voices it wins or held move.

A preferred replica with `saturated_at` chunks ongoing or more is saturated: the chunk goes to the
least-loaded of the replicas with fewer chunks, if any. Chunks of the built-in voice, and other
calls (stats, info), go to the least-loaded replica.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serve_app.schemas import ChunkJob


def voice_key(args: Sequence[object]) -> str | None:
    """The voice a model call is for: the reference id of its `ChunkJob`'s voice (one per clip,
    uploaded or saved); None: the built-in voice, or not a chunk call."""
    job = args[0] if args else None
    if isinstance(job, ChunkJob) and job.voice is not None:
        return job.voice.reference_id
    return None


def _weight(key: str, replica: str) -> bytes:
    # A hash every process computes alike (Python's own hash() is salted per process).
    return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()


def affinity_order(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` (their ids), the voice ``key``'s preferred one first: rendezvous hashing."""
    return sorted(replicas, key=lambda replica: _weight(key, replica), reverse=True)


def route_ranks(
    key: str | None, replicas: Sequence[str], ongoing: Mapping[str, int], saturated_at: int
) -> list[list[str]]:
    """The ranks Serve tries in turn for one call: it sends the call to the least-loaded replica
    of a rank that has room, else tries the next rank. `ongoing`: chunks each replica has (a
    replica missing from it is unknown, taken as free).

    A voice goes to its preferred replica while that one has fewer than `saturated_at` chunks;
    past that, to the least-loaded of the replicas with fewer chunks than it, if any."""
    if key is None:
        return [list(replicas)]
    preferred, *others = affinity_order(key, replicas)
    load = ongoing.get(preferred, 0)
    if load < saturated_at:
        ranks = [[preferred], others]
    else:
        # Serve picks among a rank by the loads it knows, so a replica of unknown load would lose
        # to a known one: the saturated replica is a rank of its own, after the lighter ones.
        lighter = [replica for replica in others if ongoing.get(replica, 0) < load]
        ranks = [lighter, [preferred], [replica for replica in others if replica not in lighter]]
    return [rank for rank in ranks if rank]


class VoiceAffinityRouter(RequestRouter):
    """Routes the model deployment's calls by voice (`route_ranks`). Serve builds one per deployment
    handle, with `request_router_kwargs` passed to `initialize_state`."""

    def initialize_state(self, saturated_at: int) -> None:
        if saturated_at < 1:
            raise ValueError(f"saturated_at must be at least 1, got {saturated_at}")
        self._saturated_at = saturated_at

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        queue_lengths = self.replica_queue_len_cache
        ongoing = {
            unique_id: length
            for unique_id, replica in by_id.items()
            if (length := queue_lengths.get(replica.replica_id)) is not None
        }
        key = voice_key(pending_request.args) if pending_request is not None else None
        if pending_request is not None:
            # The ranks together hold every replica: when all are full, back off before trying
            # again instead of spinning.
            pending_request.routing_context.should_backoff = True
        ranks = route_ranks(key, list(by_id), ongoing, self._saturated_at)
        return [[by_id[unique_id] for unique_id in rank] for rank in ranks]
