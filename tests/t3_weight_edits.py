"""Edits of T3 weights that make a random checkpoint draw STOP first, for the first-STOP tests."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

START, STOP = 6561, 6562
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
    direction = emb[START] / emb[START].norm()
    emb[START] = direction * START_NORM
    head_w[STOP] = direction * (2 * STOP_MARGIN / emb.shape[1] ** 0.5)  # ln_f output has norm ~sqrt(width)
    head_b[STOP] = -STOP_MARGIN
