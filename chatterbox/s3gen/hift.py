"""HiFT vocoder (mel2wav): 80-bin mel at 50 Hz -> 24 kHz waveform, 480 samples a frame (turbo-spec 5.6).

Neural source filter + iSTFTNet: an F0 predictor drives a harmonic sine source whose STFT is fused
into a HiFi-GAN style upsampler (x8, x5, x3) predicting a 16-point STFT; the iSTFT (hop 4) makes
the waveform. Source randomness (harmonic phases, noise) is an explicit input.

Batching: given ``lengths``, every convolution's input is zeroed past each row's end, the source
STFT reflects each row at its own end and the iSTFT overlap-adds only the row's own frames, so
every row equals its solo output; without ``lengths`` all rows are full. Weight-normed convs keep
the checkpoint's parametrization layout until ``fold_weight_norm``.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from chatterbox.constants import S3GEN_MEL_BINS, S3GEN_SR

HARMONICS = 9  # fundamental + 8 overtones
UPSAMPLE_RATES = (8, 5, 3)
UPSAMPLE_KERNELS = (16, 11, 7)
RESBLOCK_KERNELS = (3, 7, 11)
SOURCE_RESBLOCK_KERNELS = (7, 7, 11)
DILATIONS = (1, 3, 5)
N_FFT = 16
HOP = 4
SOURCE_CHANNELS = N_FFT + 2  # real and imaginary parts of the source's 9-bin STFT
# The source STFT (hop 4, 120 frames per mel frame) is brought to each stage's rate.
SOURCE_DOWNS = ((30, 15, 7), (6, 3, 1), (1, 1, 0))  # (kernel, stride, padding) per upsampling stage
SAMPLES_PER_FRAME = math.prod(UPSAMPLE_RATES) * HOP  # 480
SINE_AMP = 0.1
NOISE_STD = 0.003
VOICED_THRESHOLD = 10.0  # Hz
LRELU_SLOPE = 0.1
AUDIO_LIMIT = 0.99
MAX_MAGNITUDE = 100.0


@dataclass
class HiFTConfig:
    channels: int = 512  # after conv_pre; halves at each upsampling
    f0_channels: int = 512

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> HiFTConfig:
        """``sd`` holds the keys under ``mel2wav.``."""
        return cls(
            channels=sd["conv_pre.bias"].shape[0],
            f0_channels=sd["f0_predictor.classifier.weight"].shape[1],
        )


def wn_conv(c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Conv1d:
    """Weight-normed 'same' Conv1d."""
    return weight_norm(
        nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
    )


def draw_source_noise(frames: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic phases (9,) and source noise (9, 480 * frames) for one mel, in the reference's order."""
    device = generator.device
    # U(-π, π) as torch.distributions.Uniform computes it: low + u * (high - low), in float32.
    low, high = torch.tensor(-math.pi, device=device), torch.tensor(math.pi, device=device)
    phases = low + torch.rand(HARMONICS, generator=generator, device=device) * (high - low)
    phases[0] = 0  # the fundamental starts at phase 0
    noise = torch.randn(HARMONICS, SAMPLES_PER_FRAME * frames, generator=generator, device=device)
    return phases, noise


def stft_window() -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float64).float()


def frame_mask(lengths: torch.Tensor | None, frames: int) -> torch.Tensor | None:
    """(B, 1, frames) bool, True on each row's first ``lengths`` frames (None: no mask)."""
    if lengths is None:
        return None
    return (torch.arange(frames, device=lengths.device) < lengths[:, None]).unsqueeze(1)


def stage_masks(lengths: torch.Tensor | None, frames: int) -> list[torch.Tensor | None]:
    """Frame masks at HiFT's four rates: the mel's, after the x8 and x5 upsamplings, and the
    120 L + 1 STFT frames after the last one (all None without lengths)."""
    if lengths is None:
        return [None] * (len(UPSAMPLE_RATES) + 1)
    rates = itertools.accumulate((1, *UPSAMPLE_RATES[:-1]), operator.mul)  # 1, 8, 40
    masks = [frame_mask(lengths * rate, frames * rate) for rate in rates]
    per_frame = SAMPLES_PER_FRAME // HOP  # 120 STFT frames per mel frame, plus one at the end
    return [*masks, frame_mask(lengths * per_frame + 1, frames * per_frame + 1)]


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, T) with the frames past each row's end zeroed (``where``: padding may hold inf)."""
    return x if mask is None else torch.where(mask, x, 0.0)


def row_stft(excitation: torch.Tensor, window: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
    """Centered STFT of (B, S) -> (B, 9, S / HOP + 1) complex, each row reflect-padded at its own end
    ``samples`` (B,) (None: at S), as ``torch.stft(center=True)`` pads a solo row."""
    pad = N_FFT // 2
    padded = F.pad(excitation[:, None], (pad, pad), mode="reflect")[:, 0]  # (B, S + 16)
    if samples is not None:
        # A solo row of n samples continues with x[n - 2 - k] at n + k, k < pad.
        k = torch.arange(pad, device=samples.device)
        reflected = excitation.gather(1, (samples[:, None] - 2 - k).clamp(min=0))  # (B, pad)
        padded = padded.scatter(1, samples[:, None] + pad + k, reflected)
    return torch.stft(padded, N_FFT, HOP, N_FFT, window=window, center=False, return_complex=True)


def row_istft(spec: torch.Tensor, window: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centered iSTFT of (B, 9, F) complex -> (B, HOP * (F - 1)) from each row's own frames only.

    ``mask`` (B, 1, F) marks them: the window envelope that ``torch.istft`` divides by is each
    row's own, so a row's last samples do not see a padded frame's window.
    """
    frames = torch.fft.irfft(spec, n=N_FFT, dim=1) * window[None, :, None]  # (B, 16, F)
    frames = torch.where(mask, frames, 0.0)
    weights = mask.to(frames.dtype) * window.pow(2)[None, :, None]  # (B, 16, F)
    total = HOP * (spec.shape[-1] - 1) + N_FFT

    def overlap_add(x: torch.Tensor) -> torch.Tensor:
        return F.fold(x, output_size=(1, total), kernel_size=(1, N_FFT), stride=(1, HOP))[:, 0, 0]

    wav, envelope = overlap_add(frames), overlap_add(weights)  # (B, total) each
    pad = N_FFT // 2
    wav, envelope = wav[:, pad : total - pad], envelope[:, pad : total - pad]
    return torch.where(envelope > 1e-11, wav / envelope, 0.0)


class Snake(nn.Module):
    """x + sin²(αx)/α with a per-channel α (linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(wn_conv(channels, channels, kernel, d) for d in DILATIONS)
        self.convs2 = nn.ModuleList(wn_conv(channels, channels, kernel) for _ in DILATIONS)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in DILATIONS)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in DILATIONS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T), mask (B, 1, T) or None -> (B, C, T), exact on masked-in frames."""
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = conv2(masked(act2(conv1(masked(act1(x), mask))), mask)) + x
        return x


class F0Predictor(nn.Module):
    """5 x (weight-normed conv k3 + ELU) -> Linear -> |.|: mel (B, 80, L) -> F0 in Hz (B, L)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [wn_conv(S3GEN_MEL_BINS if i == 0 else channels, channels, 3), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask (B, 1, L) or None: frames past a row's end are zeroed before every conv."""
        x = mel
        for layer in self.condnet:
            x = layer(masked(x, mask) if isinstance(layer, nn.Conv1d) else x)
        return self.classifier(x.transpose(1, 2)).squeeze(-1).abs()


class SourceModule(nn.Module):
    """Harmonic-plus-noise excitation from F0, merged to one channel by Linear(9 -> 1) + tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.l_linear = nn.Linear(HARMONICS, 1)

    def forward(
        self,
        f0: torch.Tensor,
        phases: torch.Tensor,
        noise: torch.Tensor,
        start_cycles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """f0 (B, L) Hz, phases (B, 9) radians, noise (B, 9, 480L) standard normal -> (B, 1, 480L).

        ``start_cycles`` (B, 9): each harmonic's running phase, in cycles, before the first sample
        (a stream's next segment continues the previous one's sines; None: 0, a whole utterance).
        """
        f0 = F.interpolate(f0[:, None], scale_factor=float(SAMPLES_PER_FRAME), mode="nearest")  # (B, 1, S)
        harmonic = torch.arange(1, HARMONICS + 1, device=f0.device, dtype=f0.dtype)[:, None]
        cycles = f0 * harmonic / S3GEN_SR  # (B, 9, S) cycles per sample
        running = torch.cumsum(cycles, dim=-1)
        if start_cycles is not None:
            running = running + start_cycles[:, :, None]
        # The running phase wraps to [0, 1) cycles before scaling by 2π, as the reference does.
        theta = 2 * math.pi * (running % 1)
        sines = SINE_AMP * torch.sin(theta + phases[:, :, None])
        voiced = (f0 > VOICED_THRESHOLD).to(f0.dtype)
        noise_amp = voiced * NOISE_STD + (1 - voiced) * SINE_AMP / 3
        excitation = sines * voiced + noise_amp * noise
        return torch.tanh(self.l_linear(excitation.transpose(1, 2))).transpose(1, 2)


class HiFT(nn.Module):
    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        widths = [c >> (i + 1) for i in range(len(UPSAMPLE_RATES))]  # 256, 128, 64
        self.f0_predictor = F0Predictor(config.f0_channels)
        self.m_source = SourceModule()
        self.conv_pre = wn_conv(S3GEN_MEL_BINS, c, 7)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(c >> i, widths[i], k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(UPSAMPLE_RATES, UPSAMPLE_KERNELS, strict=True))
        )
        self.source_downs = nn.ModuleList(
            nn.Conv1d(SOURCE_CHANNELS, w, kernel, stride, padding=padding)
            for w, (kernel, stride, padding) in zip(widths, SOURCE_DOWNS, strict=True)
        )
        self.source_resblocks = nn.ModuleList(
            ResBlock(w, k) for w, k in zip(widths, SOURCE_RESBLOCK_KERNELS, strict=True)
        )
        self.resblocks = nn.ModuleList(ResBlock(w, k) for w in widths for k in RESBLOCK_KERNELS)
        self.conv_post = wn_conv(widths[-1], SOURCE_CHANNELS, 7)
        self.register_buffer("window", stft_window(), persistent=False)

    def fold_weight_norm(self) -> None:
        """Replace every weight-norm parametrization by its plain weight g·v/‖v‖ (same values)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    def source(
        self,
        mel: torch.Tensor,
        phases: torch.Tensor,
        noise: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mel (B, 80, L), phases (B, 9), noise (B, 9, 480L), lengths (B,) valid frames per row or
        None (all L) -> excitation (B, 1, 480L), exact on each row's own samples."""
        return self.m_source(self.f0_predictor(mel, frame_mask(lengths, mel.shape[-1])), phases, noise)

    def forward(
        self,
        mel: torch.Tensor,
        phases: torch.Tensor,
        noise: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mel (B, 80, L) float32, source randomness and lengths as in ``source`` -> waveform
        (B, 480L); a row's samples past 480 * lengths are not meaningful."""
        return self.decode(mel, self.source(mel, phases, noise, lengths), lengths)

    def decode(
        self, mel: torch.Tensor, excitation: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mel (B, 80, L) float32 and its source excitation (B, 1, 480L) -> waveform (B, 480L);
        lengths (B,) valid frames per row, or None (every row is L frames: no masks)."""
        masks = stage_masks(lengths, mel.shape[-1])
        if lengths is None:
            spec = torch.stft(
                excitation.squeeze(1), N_FFT, HOP, N_FFT, window=self.window, return_complex=True
            )
        else:
            spec = row_stft(excitation.squeeze(1), self.window, SAMPLES_PER_FRAME * lengths)
        source = masked(torch.cat([spec.real, spec.imag], dim=1), masks[-1])  # (B, 18, 120L + 1)

        x = self.conv_pre(masked(mel, masks[0]))
        kernels = len(RESBLOCK_KERNELS)
        for i, up in enumerate(self.ups):
            x = up(masked(F.leaky_relu(x, LRELU_SLOPE), masks[i]))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # 120L -> 120L + 1 STFT frames
            mask = masks[i + 1]
            x = x + self.source_resblocks[i](self.source_downs[i](source), mask)
            summed = self.resblocks[i * kernels](x, mask)
            for j in range(1, kernels):
                summed += self.resblocks[i * kernels + j](x, mask)
            x = summed / kernels
        x = self.conv_post(masked(F.leaky_relu(x), masks[-1]))  # default slope 0.01 here
        magnitude = torch.exp(x[:, : N_FFT // 2 + 1]).clamp(max=MAX_MAGNITUDE)
        phase = torch.sin(x[:, N_FFT // 2 + 1 :])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        if lengths is None:
            wav = torch.istft(spec, N_FFT, HOP, N_FFT, window=self.window)
        else:
            wav = row_istft(spec, self.window, masks[-1])
        return wav.clamp(-AUDIO_LIMIT, AUDIO_LIMIT)
