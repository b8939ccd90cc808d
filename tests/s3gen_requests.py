"""Random S3Gen requests for the S3Gen tests: token ids, prompt mel and speaker embedding from one seed."""

from __future__ import annotations

import torch

from chatterbox.constants import SPEECH_VOCAB_SIZE
from chatterbox.s3gen import S3GenRequest


def random_request(draw_seed: int, n_prompt: int, n_speech: int, seed: int | None, odd: bool) -> S3GenRequest:
    """Inputs drawn from ``draw_seed``; ``seed`` is the request's own (its noise); ``odd`` adds one
    prompt mel frame past 2 per prompt token."""
    g = torch.Generator().manual_seed(draw_seed)
    return S3GenRequest(
        speech_tokens=torch.randint(0, SPEECH_VOCAB_SIZE, (n_speech,), generator=g),
        prompt_tokens=torch.randint(0, SPEECH_VOCAB_SIZE, (n_prompt,), generator=g),
        prompt_feat=torch.randn(2 * n_prompt + odd, 80, generator=g) * 2 - 6,
        embedding=torch.randn(192, generator=g),
        seed=seed,
    )
