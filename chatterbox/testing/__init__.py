"""Synthetic checkpoints for tests, benchmarks and ``model=tiny`` (no real weights needed).

``python -m chatterbox.testing make-checkpoint DIR --size tiny|nano|full --seed N``.
"""

from chatterbox.testing.checkpoints import (
    CHECKPOINT_FILES,
    FULL,
    NANO,
    SIZES,
    TINY,
    CheckpointDims,
    checkpoint_layout,
    make_checkpoint,
    s3gen_state_dict,
    s3gen_synthesis_state_dict,
    t3_state_dict,
    ve_state_dict,
)

__all__ = [
    "CHECKPOINT_FILES",
    "FULL",
    "NANO",
    "SIZES",
    "TINY",
    "CheckpointDims",
    "checkpoint_layout",
    "make_checkpoint",
    "s3gen_state_dict",
    "s3gen_synthesis_state_dict",
    "t3_state_dict",
    "ve_state_dict",
]
