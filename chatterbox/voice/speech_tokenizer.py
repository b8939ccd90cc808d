"""S3 speech tokenizer (S3TokenizerV2, 25 Hz, 6561 codes): 16 kHz audio -> speech tokens (turbo-spec 4).

Log-mel -> two stride-2 convolutions -> residual blocks of rotary attention plus an FSMN memory
(a depthwise convolution over the values) -> finite scalar quantisation of an 8-dim projection to
3 levels each. Every step is mask-aware, so in exact arithmetic a zero-padded batch gives each
utterance the tokens it gets alone; in float32 the batch changes the GEMM shapes and so the
summation order (differences ~1e-6 before rounding), which flips a token only when an FSQ value
sits within that distance of a rounding boundary. Only used for voice conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox.constants import HEAD_DIM, SPEECH_VOCAB_SIZE
from chatterbox.voice.features import tokenizer_log_mel
from chatterbox.weights import CheckpointError, count_indexed, load_strict, require_keys

FSQ_LEVELS = 3
FSQ_SHRINK = 0.999  # keeps tanh outputs off the +-1 rounding edge
ROPE_BASE = 10000.0
TOKENIZER_FRAMES_PER_TOKEN = 4  # the tokenizer's log-mel runs at 100 Hz, its tokens at 25 Hz
MAX_MEL_FRAMES = 3000  # 30 s; the reference switches to a sliding-window path beyond this
MIN_SAMPLES_16K = 640  # one token


_DIM_KEYS = (
    "window",
    "encoder.conv1.weight",
    "encoder.blocks.0.attn.fsmn_block.weight",
    "quantizer._codebook.project_down.weight",
)


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    n_fft: int = 400
    n_mels: int = 128
    width: int = 1280
    n_heads: int = 20
    n_blocks: int = 6
    fsmn_kernel: int = 31
    fsq_dims: int = 8

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> SpeechTokenizerConfig:
        """Dims of the ``tokenizer.`` entries of ``s3gen_meanflow.safetensors`` (prefix removed)."""
        require_keys(sd, _DIM_KEYS, "speech tokenizer")
        width, n_mels, _ = sd["encoder.conv1.weight"].shape
        fsq_dims = sd["quantizer._codebook.project_down.weight"].shape[0]
        if FSQ_LEVELS**fsq_dims != SPEECH_VOCAB_SIZE:
            raise CheckpointError(
                f"speech tokenizer: {fsq_dims} FSQ dims do not give {SPEECH_VOCAB_SIZE} codes"
            )
        return cls(
            n_fft=sd["window"].shape[0],
            n_mels=n_mels,
            width=width,
            n_heads=width // HEAD_DIM,
            n_blocks=count_indexed(sd, "encoder.blocks."),
            fsmn_kernel=sd["encoder.blocks.0.attn.fsmn_block.weight"].shape[-1],
            fsq_dims=fsq_dims,
        )


def rotary_tables(n_positions: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, (n_positions, head_dim), the two halves repeated.

    The angles go through ``torch.polar`` because the reference reads cos/sin off unit complex
    numbers, which differ from ``torch.cos``/``torch.sin`` in the last bit.
    """
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(n_positions, device=device), inv_freq).float()
    rotation = torch.polar(torch.ones_like(angles), angles)
    cos, sin = rotation.real, rotation.imag
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX half rotation. x (B, T, H, D); cos, sin (1, T, 1, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class FSMNAttention(nn.Module):
    """Multi-head self-attention with rotary q/k plus an FSMN memory over the values."""

    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width, bias=False)
        self.value = nn.Linear(cfg.width, cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.fsmn_block = nn.Conv1d(cfg.width, cfg.width, cfg.fsmn_kernel, groups=cfg.width, bias=False)
        self.fsmn_pad = ((cfg.fsmn_kernel - 1) // 2, cfg.fsmn_kernel - 1 - (cfg.fsmn_kernel - 1) // 2)

    def fsmn_memory(self, v: Tensor, valid: Tensor) -> Tensor:
        """v (B, T, C) -> (B, T, C): depthwise conv over the zeroed-padding values, plus v."""
        v = v * valid
        memory = self.fsmn_block(F.pad(v.transpose(1, 2), self.fsmn_pad)).transpose(1, 2)
        return (memory + v) * valid

    def forward(self, x: Tensor, key_bias: Tensor, valid: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, C); key_bias (B, 1, 1, T) 0 / -1e10; valid (B, T, 1) bool; cos, sin (1, T, 1, D)."""
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_heads, -1)
        k = self.key(x).view(B, T, self.n_heads, -1)
        v = self.value(x).view(B, T, self.n_heads, -1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        memory = self.fsmn_memory(v.view(B, T, C), valid)

        scale = q.shape[-1] ** -0.25  # split between q and k, as in the reference
        q = q.permute(0, 2, 1, 3) * scale  # (B, H, T, D)
        k = k.permute(0, 2, 3, 1) * scale  # (B, H, D, T)
        scores = (q @ k + key_bias).float()
        weights = torch.softmax(scores, dim=-1)
        attended = (weights @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3).flatten(start_dim=2)
        return self.out(attended) + memory


class TokenizerBlock(nn.Module):
    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.attn = FSMNAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width)
        )
        self.mlp_ln = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, x: Tensor, key_bias: Tensor, valid: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x), key_bias, valid, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


class TokenizerEncoder(nn.Module):
    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.width, cfg.width, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(TokenizerBlock(cfg) for _ in range(cfg.n_blocks))
        self.head_dim = cfg.width // cfg.n_heads

    def forward(self, mels: Tensor, mel_lens: Tensor) -> tuple[Tensor, Tensor]:
        """mels (B, n_mels, F) zero-padded, mel_lens (B,) -> hidden (B, T, C), lens (B,); T = ceil(F/4)."""
        lens, n_frames = mel_lens, mels.shape[-1]
        x = mels
        for conv in (self.conv1, self.conv2):  # each halves the length (rounding up)
            x = F.gelu(conv(x * length_mask(lens, n_frames)[:, None, :]))
            lens, n_frames = (lens - 1) // 2 + 1, (n_frames - 1) // 2 + 1
        x = x.transpose(1, 2)
        valid = length_mask(lens, n_frames)
        key_bias = ((1.0 - valid.to(x.dtype)) * -1.0e10)[:, None, None, :]
        cos, sin = rotary_tables(n_frames, self.head_dim, x.device)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        for block in self.blocks:
            x = block(x, key_bias, valid[..., None], cos, sin)
        return x, lens


class FSQuantizer(nn.Module):
    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.project_down = nn.Linear(cfg.width, cfg.fsq_dims)
        self.register_buffer(
            "powers", FSQ_LEVELS ** torch.arange(cfg.fsq_dims, dtype=torch.float32), persistent=False
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, C) -> tokens (B, T) int64 in [0, 3^fsq_dims)."""
        digits = (self.project_down(hidden).float().tanh() * FSQ_SHRINK).round() + 1  # each in {0, 1, 2}
        return (digits * self.powers).sum(dim=-1).long()


class SpeechTokenizer(nn.Module):
    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # The log-mel front end's filters and window are checkpoint buffers (loaded, not recomputed).
        self.register_buffer("_mel_filters", torch.zeros(cfg.n_mels, cfg.n_fft // 2 + 1))
        self.register_buffer("window", torch.zeros(cfg.n_fft))
        self.encoder = TokenizerEncoder(cfg)
        self.quantizer = FSQuantizer(cfg)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> SpeechTokenizer:
        """Load the ``tokenizer.`` entries (prefix removed) strictly."""
        cfg = SpeechTokenizerConfig.from_state_dict(sd)
        module = cls(cfg)
        # The file nests the projection in an otherwise empty codebook module.
        renamed = {k.replace("quantizer._codebook.", "quantizer.", 1): v for k, v in sd.items()}
        load_strict(module, renamed, "speech tokenizer")
        return module.eval()

    @property
    def device(self) -> torch.device:
        return self.window.device

    def forward(self, mels: Tensor, mel_lens: Tensor) -> tuple[Tensor, Tensor]:
        """mels (B, n_mels, F) zero-padded, mel_lens (B,) -> tokens (B, T) int64, token_lens (B,) int64."""
        hidden, token_lens = self.encoder(mels, mel_lens)
        tokens = self.quantizer(hidden) * length_mask(token_lens, hidden.shape[1])
        return tokens, token_lens.long()

    @torch.inference_mode()
    def tokenize(
        self, wavs_16k: Sequence[Tensor | np.ndarray], max_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Speech tokens of 16 kHz waveforms, batched.

        Each (N_i,) waveform gives ceil(F_i / 4) tokens, F_i = N_i // 160 log-mel frames (cut to
        ``4 * max_len`` frames when ``max_len`` is given; the mel is normalised over the whole
        waveform first, as in the reference). Returns tokens (B, T_max) int64, zero-padded, and
        lengths (B,) int64. For tokens bit-identical to the reference's single-utterance calls,
        pass one waveform at a time (see the module docstring).
        """
        if not wavs_16k:
            raise ValueError("tokenize needs at least one waveform")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        mels = []
        for i, wav in enumerate(wavs_16k):
            wav = torch.as_tensor(wav, dtype=torch.float32, device=self.device)
            if wav.dim() != 1 or wav.shape[0] < MIN_SAMPLES_16K:
                raise ValueError(
                    f"waveform {i}: expected 1-D audio of at least {MIN_SAMPLES_16K} samples at 16 kHz, "
                    f"got shape {tuple(wav.shape)}"
                )
            mel = tokenizer_log_mel(wav, self._mel_filters, self.window)
            if max_len is not None:
                mel = mel[:, : TOKENIZER_FRAMES_PER_TOKEN * max_len]
            if mel.shape[1] > MAX_MEL_FRAMES:
                raise ValueError(
                    f"waveform {i}: {mel.shape[1]} mel frames exceed the {MAX_MEL_FRAMES} (30 s) "
                    "the tokenizer handles in one window"
                )
            mels.append(mel)
        mel_lens = torch.tensor([m.shape[1] for m in mels], device=self.device)
        batch = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
        return self(batch, mel_lens)
