"""Resemble's PerTh implicit watermark, applied to every audio our public paths return by default.

PerTh adds a small encoder's residual to the normalised log-magnitude of a 32 kHz STFT below 2 kHz
and keeps the phase. The `resemble-perth` package's model code imports torch's audio extension
(each wheel loads beside one torch build only), so the network is written here in plain torch and
loads the weights that package ships; the parity suite checks marks and scores equal PerTh's.
A standalone step (the Serve stitcher marks a whole stitched result once); loaded once per process.
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PERTH_SR = 32_000
PERTH_N_FFT = 2048
PERTH_HOP = 320
PERTH_HIDDEN = 256
PERTH_SUBBAND = round((PERTH_N_FFT // 2 + 1) * 2000 / (PERTH_SR / 2))  # STFT bins below 2 kHz (128)
MAGNITUDE_FLOOR_DB = -180.0  # 20 log10(1e-9)
HEADROOM_DB = 15.0
VOICED_FRAME_SHARE = 0.05  # frames carrying less than 5 % of the loudest frame's energy stay unmarked
DECODER_TIME_SCALES = {"slow": 1.25, "normal": 1.0, "fast": 0.75}
WEIGHTS_FILE = "perth_net/pretrained/implicit/perth_net_250000.pth.tar"


def _conv_stack(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 in, five 7-wide convolutions, 1x1 out; LeakyReLU after all but the last (key layout
    ``<i>.conv.{weight,bias}``)."""
    widths = [in_channels] + [PERTH_HIDDEN] * 6 + [out_channels]
    layers = []
    for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
        kernel = 1 if i in (0, 6) else 7
        layer = nn.Module()
        layer.conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2)
        layers.append(layer)
    return nn.Sequential(*layers)


def _run_stack(stack: nn.Sequential, x: Tensor) -> Tensor:
    for i, layer in enumerate(stack):
        x = layer.conv(x)
        if i < len(stack) - 1:
            x = F.leaky_relu(x)
    return x


def _voiced_frames(magspec: Tensor) -> Tensor:
    """(B, F, T) normalised magnitudes -> (B, 1, T) float mask of frames loud enough to mark."""
    energy = magspec.sum(dim=1)  # (B, T)
    return (energy > energy.max(dim=1).values[:, None] * VOICED_FRAME_SHARE).float()[:, None]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum(dim=2) / mask.sum(dim=2)  # (B, C)


class PerthEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _conv_stack(PERTH_SUBBAND, PERTH_SUBBAND)

    def forward(self, magspec: Tensor) -> Tensor:
        """(B, F, T) normalised magnitudes -> the same with the mark added below 2 kHz."""
        residual = _run_stack(self.layers, magspec[:, :PERTH_SUBBAND]) * _voiced_frames(magspec)
        marked = magspec.clone()
        marked[:, :PERTH_SUBBAND] += residual
        return marked


class PerthDecoder(nn.Module):
    """Three branches read the sub-band at 1.25x, 1x and 0.75x time scale; each gives a mark score
    and an attention logit averaged over voiced frames; the scores are mixed by softmax attention."""

    def __init__(self) -> None:
        super().__init__()
        for name in DECODER_TIME_SCALES:
            setattr(self, f"{name}_layers", _conv_stack(PERTH_SUBBAND, 2))

    def forward(self, magspec: Tensor) -> Tensor:
        """(B, F, T) -> (B,) watermark confidence (about 1 when marked, 0 when not)."""
        mask = _voiced_frames(magspec)
        subband = magspec[:, :PERTH_SUBBAND]
        frames = subband.shape[2]
        scores, logits = [], []
        for name, scale in DECODER_TIME_SCALES.items():
            x = subband
            if scale != 1.0:
                x = F.interpolate(x, size=int(frames * scale), mode="linear", align_corners=True)
            out = _run_stack(getattr(self, f"{name}_layers"), x)  # (B, 2, T_scaled)
            branch_mask = F.interpolate(mask, size=out.shape[2], mode="nearest")
            logits.append(_masked_mean(out[:, :1], branch_mask))
            scores.append(_masked_mean(out[:, 1:], branch_mask))
        attention = torch.softmax(torch.cat(logits, dim=1), dim=1)  # (B, 3)
        return (torch.cat(scores, dim=1) * attention).sum(dim=1)


class PerthNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = PerthEncoder()
        self.decoder = PerthDecoder()
        self.register_buffer("window", torch.hann_window(PERTH_N_FFT), persistent=False)

    @classmethod
    def from_package(cls) -> PerthNet:
        """The weights shipped in the installed `resemble-perth` package (located, not imported)."""
        spec = importlib.util.find_spec("perth")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the PerTh watermark needs its weights: pip install resemble-perth")
        path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        # The package's model also stores its STFT windows and a time-stretch table (training only);
        # the windows are plain Hann windows, rebuilt here.
        state = {k: v for k, v in state.items() if not k.startswith("ap.")}
        net = cls()
        net.load_state_dict(state, strict=True)
        return net.eval()

    def magnitude_and_phase(self, wav: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) at 32 kHz -> normalised log magnitude and phase, each (F, T)."""
        spec = torch.stft(
            wav, PERTH_N_FFT, PERTH_HOP, window=self.window, pad_mode="reflect", return_complex=True
        )
        magnitude_db = 20 * torch.log10(spec.abs().clip(10 ** (MAGNITUDE_FLOOR_DB / 20)))
        return (magnitude_db - MAGNITUDE_FLOOR_DB) / (HEADROOM_DB - MAGNITUDE_FLOOR_DB), torch.angle(spec)

    def waveform(self, magspec: Tensor, phase: Tensor) -> Tensor:
        """Inverse of ``magnitude_and_phase``: (F, T) each -> (N,) at 32 kHz."""
        magnitude_db = magspec * (HEADROOM_DB - MAGNITUDE_FLOOR_DB) + MAGNITUDE_FLOOR_DB
        spec = 10.0 ** ((magnitude_db / 20).clip(max=10)) * torch.exp(1.0j * phase)
        return torch.istft(spec, PERTH_N_FFT, PERTH_HOP, window=self.window, center=True)


_lock = threading.Lock()
_net: PerthNet | None = None


def _get_net() -> PerthNet:
    global _net
    if _net is None:
        _net = PerthNet.from_package()
    return _net


def apply_watermark(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """The watermarked copy of a mono float waveform (same length as PerTh gives, float32)."""
    import librosa  # here, not at the top: the GPU suite runs the model without librosa

    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"watermarking takes mono audio, got shape {wav.shape}")
    if wav.size == 0:
        return wav
    resampled = sample_rate != PERTH_SR
    if resampled:
        wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=PERTH_SR)
    # Plain no-grad mode even inside a caller's inference_mode: the network's weights must not
    # become inference tensors, or later calls outside that mode fail.
    with _lock, torch.inference_mode(False), torch.no_grad():  # one network: calls are not re-entrant
        net = _get_net()
        magspec, phase = net.magnitude_and_phase(torch.from_numpy(np.ascontiguousarray(wav)).float())
        marked = net.waveform(net.encoder(magspec[None])[0], phase).numpy()
    if resampled:
        marked = librosa.resample(marked, orig_sr=PERTH_SR, target_sr=sample_rate)
    return np.asarray(marked, dtype=np.float32)


def detect_watermark(wav: np.ndarray, sample_rate: int) -> float:
    """PerTh's watermark confidence, rounded to 0 or 1 as PerTh reports it (1.0 for our output)."""
    import librosa

    wav = np.asarray(wav, dtype=np.float32)
    if sample_rate != PERTH_SR:
        wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=PERTH_SR, res_type="polyphase")
    with _lock, torch.inference_mode(False), torch.no_grad():
        net = _get_net()
        magspec, _ = net.magnitude_and_phase(torch.from_numpy(np.ascontiguousarray(wav)).float())
        confidence = net.decoder(magspec[None])[0].clip(0.0, 1.0)
    return float(confidence.round())


# Lengths for audio marked piece by piece (a stream), so that every piece is marked and keeps its
# length: the one place these rules are stated.
# A marked signal keeps its length only when it is a multiple of the STFT hop (10 ms at 32 kHz).
PIECE_GRANULE_SECONDS = PERTH_HOP / PERTH_SR
# The STFT's reflect padding needs more than half its window (1024 samples at 32 kHz); shorter
# audio stays unmarked.
MIN_MARKED_SECONDS = 0.04
# Shortest piece a stream sends before its last: long enough to mark, and few pieces per second.
MIN_PIECE_SECONDS = 0.1


def piece_length(available: int, sample_rate: int) -> int:
    """The longest piece of at most `available` samples whose marked copy keeps its length."""
    granule = round(PIECE_GRANULE_SECONDS * sample_rate)
    return available // granule * granule


def is_markable(num_samples: int, sample_rate: int) -> bool:
    """Whether audio of `num_samples` is long enough for `apply_watermark` to mark."""
    return num_samples >= MIN_MARKED_SECONDS * sample_rate
