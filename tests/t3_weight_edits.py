"""Edits of T3 weights that make a random checkpoint draw STOP first, for the first-STOP tests."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from chatterbox.constants import START_SPEECH_TOKEN, STOP_SPEECH_TOKEN

START_NORM = 100.0  # START's embedding dominates the residual stream at its position
STOP_MARGIN = 10.0  # STOP's logit: about +10 right after START, about -10 after any other token


@torch.no_grad()
def stop_only_after_start(tensors: MutableMapping[str, torch.Tensor]) -> None:
    """Make STOP the greedy first token of every request and (almost) never a later one.

    ``tensors``: T3's parameters by checkpoint name (``speech_emb.weight``, ``speech_head.*``),
    edited in place. START's embedding is scaled up so the final hidden state after START points
    along it, and STOP's head row reads that direction: STOP wins only where the input is START.
    """
    emb, head_w, head_b = (
        tensors["speech_emb.weight"],
        tensors["speech_head.weight"],
        tensors["speech_head.bias"],
    )
    direction = emb[START_SPEECH_TOKEN] / emb[START_SPEECH_TOKEN].norm()
    emb[START_SPEECH_TOKEN] = direction * START_NORM
    # ln_f's output has norm about sqrt(width): STOP's logit is about +STOP_MARGIN after START.
    head_w[STOP_SPEECH_TOKEN] = direction * (2 * STOP_MARGIN / emb.shape[1] ** 0.5)
    head_b[STOP_SPEECH_TOKEN] = -STOP_MARGIN
