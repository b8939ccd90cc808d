"""CUDA-graph decode pieces: buckets, padding a live batch to its bucket, eager fallback."""

from __future__ import annotations

import pytest
import torch

from chatterbox.t3.graphs import GraphedDecodeStep, bucket_for, decode_buckets


@pytest.mark.parametrize(
    ("max_slots", "expected"),
    [
        (1, (1,)),
        (8, (1, 2, 4, 8)),
        (12, (1, 2, 4, 8, 12)),
        (64, (1, 2, 4, 8, 16, 32, 64)),
        (100, (1, 2, 4, 8, 16, 32, 64, 96, 100)),
        (160, (1, 2, 4, 8, 16, 32, 64, 96, 128, 160)),
    ],
)
def test_buckets_are_powers_of_two_to_64_then_steps_of_32_up_to_max_slots(max_slots, expected):
    assert decode_buckets(max_slots) == expected


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch():
    buckets = decode_buckets(100)
    picks = {n: bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 33, 64, 65, 96, 97, 100)}
    assert picks == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 16, 33: 64, 64: 64, 65: 96, 96: 96, 97: 100, 100: 100}
    with pytest.raises(ValueError, match="101 live rows exceed the largest bucket 100"):
        bucket_for(101, buckets)
    with pytest.raises(ValueError, match="max_slots must be >= 1"):
        decode_buckets(0)
