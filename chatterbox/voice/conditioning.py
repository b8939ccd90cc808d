"""Voice conditioning: a reference recording -> the conditionals T3 and S3Gen need (turbo-spec 1.1 steps 3-7).

From one 24 kHz, loudness-normalised reference:
- T3 prompt tokens: speech tokens of the first 15 s of the soxr-resampled 16 kHz audio (<= 375).
- speaker embedding: voice encoder over the whole soxr-resampled 16 kHz audio.
- S3Gen prompt (``embed_ref``): on the first 10 s, the 24 kHz mel, and the speech tokens and
  CAMPPlus x-vector of the windowed-sinc-resampled 16 kHz audio; the tokens are cut to half the mel
  frames when the two disagree.
The voice encoder runs batched over the references; the speech tokenizer, CAMPPlus and the mels
run per reference (CAMPPlus is not mask-aware; for the tokenizer see ``condition``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from chatterbox.constants import (
    S3GEN_MEL_FRAMES_PER_TOKEN,
    S3GEN_PROMPT_SAMPLES_24K,
    SAMPLES_PER_TOKEN_24K,
    T3_PROMPT_SAMPLES_16K,
    T3_PROMPT_TOKENS,
)
from chatterbox.voice.campplus import CAMPPlus
from chatterbox.voice.features import s3gen_mel, sinc_resample_24k_to_16k, soxr_resample_24k_to_16k
from chatterbox.voice.speech_tokenizer import SpeechTokenizer
from chatterbox.voice.voice import VoiceConditionals
from chatterbox.voice.voice_encoder import VoiceEncoder
from chatterbox.weights import subdict

MIN_REFERENCE_SAMPLES_24K = 2 * SAMPLES_PER_TOKEN_24K  # 80 ms: enough for every front end and CAMPPlus


def _validated_reference(wav: np.ndarray, index: int) -> np.ndarray:
    if not isinstance(wav, np.ndarray):
        raise ValueError(f"reference {index}: expected a numpy array, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise ValueError(f"reference {index}: expected mono 1-D audio, got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"reference {index}: expected floating-point samples, got {wav.dtype}")
    if wav.shape[0] < MIN_REFERENCE_SAMPLES_24K:
        raise ValueError(
            f"reference {index}: {wav.shape[0]} samples is shorter than two speech tokens "
            f"({MIN_REFERENCE_SAMPLES_24K} samples at 24 kHz)"
        )
    if not np.isfinite(wav).all():
        raise ValueError(f"reference {index}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(wav, dtype=np.float32)


class VoiceConditioner(nn.Module):
    """Holds the speech tokenizer, CAMPPlus and the voice encoder; turns references into conditionals."""

    def __init__(
        self, speech_tokenizer: SpeechTokenizer, campplus: CAMPPlus, voice_encoder: VoiceEncoder
    ) -> None:
        super().__init__()
        self.speech_tokenizer = speech_tokenizer
        self.campplus = campplus
        self.voice_encoder = voice_encoder

    @classmethod
    def from_state_dicts(
        cls, s3gen_state_dict: Mapping[str, Tensor], ve_state_dict: Mapping[str, Tensor]
    ) -> VoiceConditioner:
        """From the ``tokenizer.`` and ``speaker_encoder.`` entries of ``s3gen_meanflow.safetensors``
        and all of ``ve.safetensors``, each loaded strictly."""
        return cls(
            SpeechTokenizer.from_state_dict(subdict(s3gen_state_dict, "tokenizer.")),
            CAMPPlus.from_state_dict(subdict(s3gen_state_dict, "speaker_encoder.")),
            VoiceEncoder.from_state_dict(ve_state_dict),
        )

    @property
    def device(self) -> torch.device:
        return self.speech_tokenizer.device

    @torch.inference_mode()
    def condition(self, ref_wavs_24k: Sequence[np.ndarray]) -> list[VoiceConditionals]:
        """Conditionals of each reference: (N_i,) mono float32 at 24 kHz, already loudness-normalised.

        Returned tensors live on this module's device.
        """
        if len(ref_wavs_24k) == 0:
            raise ValueError("condition needs at least one reference")
        wavs_24k = [_validated_reference(wav, i) for i, wav in enumerate(ref_wavs_24k)]

        # Librosa's soxr resampler over the whole reference feeds T3's side; S3Gen's side
        # (embed_ref) takes the first 10 s through the windowed-sinc resampler.
        refs_16k = [soxr_resample_24k_to_16k(wav) for wav in wavs_24k]
        speaker_embs = self.voice_encoder.embed_utterances(refs_16k)
        conditionals = []
        for wav_24k, ref_16k, speaker_emb in zip(wavs_24k, refs_16k, speaker_embs, strict=True):
            # One reference per tokenizer call: a batch changes the GEMM shapes and with them the
            # float summation order, which can flip a token whose FSQ value sits on a rounding
            # boundary; alone, each reference gets the reference's (B=1) arithmetic exactly.
            t3_prompt_tokens, _ = self.speech_tokenizer.tokenize(
                [ref_16k[:T3_PROMPT_SAMPLES_16K]], max_len=T3_PROMPT_TOKENS
            )
            prompt_24k = torch.from_numpy(wav_24k[:S3GEN_PROMPT_SAMPLES_24K]).to(self.device)
            prompt_16k = sinc_resample_24k_to_16k(prompt_24k)
            prompt_tokens, _ = self.speech_tokenizer.tokenize([prompt_16k])
            prompt_feat = s3gen_mel(prompt_24k)
            # The flow expects 2 mel frames per prompt token; the reference only ever drops tokens.
            n_prompt = min(prompt_tokens.shape[1], prompt_feat.shape[0] // S3GEN_MEL_FRAMES_PER_TOKEN)
            conditionals.append(
                VoiceConditionals(
                    speaker_emb=speaker_emb,
                    t3_prompt_tokens=t3_prompt_tokens[0],
                    prompt_tokens=prompt_tokens[0, :n_prompt],
                    prompt_feat=prompt_feat,
                    embedding=self.campplus.embed(prompt_16k),
                )
            )
        return conditionals
