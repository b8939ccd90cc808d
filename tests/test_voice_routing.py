"""The voice-affinity router's choices, without Ray: which voice a model call is for, each voice's
preferred replica, and when a chunk spills to the least-loaded replica."""

from collections import Counter

import pytest
from ray import ObjectRef

from chatterbox.sampling import SamplingParams
from serve_app.config import AppArgs
from serve_app.deployments.model import TurboModel
from serve_app.deployments.routing import (
    VoiceAffinityRouter,
    affinity_order,
    route_ranks,
    voice_key,
)
from serve_app.schemas import ChunkJob, SharedReference, StoredVoiceReference

REPLICAS = ["replica-a", "replica-b", "replica-c"]


def chunk(voice: SharedReference | StoredVoiceReference | None) -> ChunkJob:
    return ChunkJob(request_id="r1", text="Hello.", voice=voice, sampling=SamplingParams())


def test_the_key_is_the_reference_id_of_an_uploaded_or_saved_voice():
    uploaded = SharedReference(reference_id="clip-1", audio=ObjectRef.nil())
    saved = StoredVoiceReference(reference_id="clip-2", store_dir="/voices", voice_id="v-2")
    assert voice_key([chunk(uploaded)]) == "clip-1"
    assert voice_key([chunk(saved)]) == "clip-2"


def test_built_in_voice_and_other_calls_have_no_key():
    assert voice_key([chunk(None)]) is None
    assert voice_key([]) is None  # stats(), info()
    assert voice_key(["clip-1"]) is None


def test_preferred_replica_depends_on_the_voice_and_the_replica_set_only():
    for voice in (f"voice-{i}" for i in range(50)):
        order = affinity_order(voice, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)
        assert affinity_order(voice, list(reversed(REPLICAS))) == order


def test_voices_spread_evenly_over_replicas():
    preferred = Counter(affinity_order(f"voice-{i}", REPLICAS)[0] for i in range(3000))
    assert set(preferred) == set(REPLICAS)
    assert all(900 <= count <= 1100 for count in preferred.values()), preferred


def test_a_new_replica_takes_voices_only_for_itself():
    voices = [f"voice-{i}" for i in range(2000)]
    before = {voice: affinity_order(voice, REPLICAS)[0] for voice in voices}
    after = {voice: affinity_order(voice, [*REPLICAS, "replica-d"])[0] for voice in voices}
    moved = [voice for voice in voices if after[voice] != before[voice]]
    assert all(after[voice] == "replica-d" for voice in moved)
    assert 400 <= len(moved) <= 600  # about a quarter of the voices


def test_a_voice_goes_to_its_preferred_replica_then_the_rest():
    order = affinity_order("voice-1", REPLICAS)
    ongoing = {order[0]: 3, order[1]: 0}  # the third replica's load is unknown
    assert route_ranks("voice-1", REPLICAS, ongoing, saturated_at=4) == [order[:1], order[1:]]


def test_a_saturated_preferred_replica_spills_to_the_less_loaded_ones():
    preferred, second, third = affinity_order("voice-1", REPLICAS)
    ongoing = {preferred: 4, second: 2}  # the third replica's load is unknown: taken as free
    # Serve takes the least-loaded of the first rank; the saturated replica only if both are full.
    assert route_ranks("voice-1", REPLICAS, ongoing, saturated_at=4) == [[second, third], [preferred]]
    ongoing = {preferred: 4, second: 4, third: 6}
    assert route_ranks("voice-1", REPLICAS, ongoing, saturated_at=4) == [[preferred], [second, third]]


def test_calls_without_a_voice_go_to_the_least_loaded_of_all():
    assert route_ranks(None, REPLICAS, {}, saturated_at=4) == [REPLICAS]


def test_one_replica_is_one_rank():
    assert route_ranks("voice-1", ["only"], {}, saturated_at=1) == [["only"]]
    assert route_ranks("voice-1", ["only"], {"only": 5}, saturated_at=1) == [["only"]]


def test_affinity_is_off_by_default_and_saturates_at_a_full_batch():
    assert "request_router_config" not in TurboModel.get_deployment_options(AppArgs(), 0.0)
    options = TurboModel.get_deployment_options(AppArgs(voice_affinity=True, max_batch_size=6), 0.0)
    router = options["request_router_config"]
    assert router.get_request_router_class() is VoiceAffinityRouter
    assert router.request_router_kwargs == {"saturated_at": 6}


def test_voice_affinity_is_a_boolean_setting():
    assert AppArgs.model_validate({"voice_affinity": "true"}).voice_affinity is True
    with pytest.raises(ValueError, match="voice_affinity"):
        AppArgs.model_validate({"voice_affinity": "sometimes"})
