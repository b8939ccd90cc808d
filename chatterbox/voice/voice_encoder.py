"""Voice encoder: 16 kHz audio -> L2-normalised speaker embedding for T3 (turbo-spec 6).

The utterance is trimmed of leading/trailing silence, turned into a linear power mel, cut into
overlapping 160-frame partials, and each partial goes through a 3-layer LSTM whose last hidden
state is projected, ReLU'd and L2-normalised. The utterance embedding is the normalised mean of
its partials. Partials are independent and the zero padding of the last partial is the same in a
batch as alone, so utterances batch exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox.constants import S3_SR
from chatterbox.voice.features import VE_HOP, voice_encoder_mel
from chatterbox.weights import load_strict, require_keys

TRIM_TOP_DB = 20.0


@dataclass(frozen=True)
class VoiceEncoderConfig:
    n_mels: int = 40
    hidden: int = 256
    n_layers: int = 3
    embed_dim: int = 256
    partial_frames: int = 160
    partials_per_second: float = 1.3  # the reference's "rate": sets the hop between partials
    min_coverage: float = 0.8  # keep a last, zero-padded partial if at least this much of it is audio

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> VoiceEncoderConfig:
        """Dims of ``ve.safetensors``."""
        require_keys(sd, ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "proj.weight"), "voice encoder")
        n_layers = sum(1 for key in sd if key.startswith("lstm.weight_ih_l"))
        return cls(
            n_mels=sd["lstm.weight_ih_l0"].shape[1],
            hidden=sd["lstm.weight_hh_l0"].shape[1],
            n_layers=n_layers,
            embed_dim=sd["proj.weight"].shape[0],
        )

    @property
    def partial_step(self) -> int:
        """Frames between partial starts: 77 at 1.3 partials per second."""
        return round(S3_SR / self.partials_per_second / VE_HOP)


def partial_starts(n_frames: int, cfg: VoiceEncoderConfig) -> list[int]:
    """First frame of each partial of an ``n_frames`` mel, in the reference's rounding."""
    step, size = cfg.partial_step, cfg.partial_frames
    n_partials, remainder = divmod(max(n_frames - size + step, 0), step)
    if n_partials == 0 or (remainder + size - step) / size >= cfg.min_coverage:
        n_partials += 1
    return [i * step for i in range(n_partials)]


class VoiceEncoder(nn.Module):
    def __init__(self, cfg: VoiceEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.n_mels, cfg.hidden, num_layers=cfg.n_layers, batch_first=True)
        self.proj = nn.Linear(cfg.hidden, cfg.embed_dim)
        # Training-time similarity scale and offset: in the file, unused at inference.
        self.similarity_weight = nn.Parameter(torch.zeros(1))
        self.similarity_bias = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> VoiceEncoder:
        """Load ``ve.safetensors`` strictly."""
        module = cls(VoiceEncoderConfig.from_state_dict(sd))
        load_strict(module, sd, "voice encoder")
        return module.eval()

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def forward(self, partials: Tensor) -> Tensor:
        """partials (N, partial_frames, n_mels) -> (N, embed_dim) L2-normalised partial embeddings."""
        _, (hidden, _) = self.lstm(partials)
        embeds = F.relu(self.proj(hidden[-1]))
        return embeds / torch.linalg.norm(embeds, dim=1, keepdim=True)

    @torch.inference_mode()
    def embed_utterances(self, wavs_16k: Sequence[np.ndarray]) -> Tensor:
        """(N_i,) float32 16 kHz waveforms -> (B, embed_dim) utterance embeddings."""
        import librosa  # here, not at the top: the GPU suite runs the model without librosa

        partials, owners = [], []
        for i, wav in enumerate(wavs_16k):
            trimmed, _ = librosa.effects.trim(wav, top_db=TRIM_TOP_DB)
            mel = torch.from_numpy(voice_encoder_mel(trimmed, self.cfg.n_mels)).to(self.device)
            starts = partial_starts(mel.shape[0], self.cfg)
            padded_len = max(starts[-1] + self.cfg.partial_frames, mel.shape[0])
            mel = F.pad(mel, (0, 0, 0, padded_len - mel.shape[0]))
            partials.extend(mel[s : s + self.cfg.partial_frames] for s in starts)
            owners.extend([i] * len(starts))
        partial_embeds = self(torch.stack(partials))
        owner = torch.tensor(owners, device=self.device)
        utterance_embeds = torch.stack([partial_embeds[owner == i].mean(dim=0) for i in range(len(wavs_16k))])
        return utterance_embeds / torch.linalg.norm(utterance_embeds, dim=1, keepdim=True)
