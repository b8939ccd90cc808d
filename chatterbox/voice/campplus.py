"""CAMPPlus speaker encoder: 16 kHz audio -> 192-dim x-vector for S3Gen (turbo-spec 5.2).

A 2-D convolutional head over the Kaldi filter bank (frequency downsampled 8x), a strided TDNN,
three densely connected blocks of context-aware-masking (CAM) layers with transition layers, then
mean+std statistics pooling and a dense layer. Batch norms run on their running statistics.

The CAM context means, the statistics pooling and the convolutions all see every frame, so padded
batches would change the result: embed one utterance at a time (a voice is conditioned once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox.voice.features import FBANK_BINS, kaldi_fbank_cmn
from chatterbox.weights import CheckpointError, load_strict, require_keys

BLOCK_DILATIONS = (1, 2, 2)  # of the three dense blocks; not recorded in the weights
CAM_SEGMENT = 100  # frames per segment of the CAM segment-average context
MIN_SAMPLES_16K = 720  # 3 Kaldi frames: the stride-2 TDNN must leave 2 for the unbiased std


_DIM_KEYS = (
    "head.conv1.weight",
    "xvector.tdnn.linear.weight",
    "xvector.block1.tdnnd1.linear1.weight",
    "xvector.block1.tdnnd1.cam_layer.linear_local.weight",
    "xvector.dense.linear.weight",
)


@dataclass(frozen=True)
class CAMPPlusConfig:
    head_channels: int = 32
    init_channels: int = 128
    growth: int = 32
    bottleneck: int = 128
    block_layers: tuple[int, ...] = (12, 24, 16)
    embed_dim: int = 192

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> CAMPPlusConfig:
        """Dims of the ``speaker_encoder.`` entries of ``s3gen_meanflow.safetensors`` (prefix removed)."""
        require_keys(sd, _DIM_KEYS, "CAMPPlus")
        layers: dict[int, set[int]] = {}
        for key in sd:
            if m := re.match(r"xvector\.block(\d+)\.tdnnd(\d+)\.", key):
                layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if sorted(layers) != list(range(1, len(BLOCK_DILATIONS) + 1)) or any(
            ids != set(range(1, len(ids) + 1)) for ids in layers.values()
        ):
            raise CheckpointError(f"CAMPPlus: unexpected dense block layout {layers}")
        first = "xvector.block1.tdnnd1"
        return cls(
            head_channels=sd["head.conv1.weight"].shape[0],
            init_channels=sd["xvector.tdnn.linear.weight"].shape[0],
            growth=sd[f"{first}.cam_layer.linear_local.weight"].shape[0],
            bottleneck=sd[f"{first}.linear1.weight"].shape[0],
            block_layers=tuple(len(layers[b]) for b in sorted(layers)),
            embed_dim=sd["xvector.dense.linear.weight"].shape[0],
        )


class Nonlinear(nn.Module):
    """The file's ``nonlinear.batchnorm``: a batch norm, then ReLU unless ``relu=False``."""

    def __init__(self, channels: int, affine: bool = True, relu: bool = True) -> None:
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=affine)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.batchnorm(x)
        return F.relu(x) if self.relu else x


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with batch norms; frequency stride on the first, projection shortcut."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels, channels, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ConvHead(nn.Module):
    """(B, 80, T) filter bank -> (B, C * 10, T): frequency downsampled 80 -> 40 -> 20 -> 10."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(ResBlock2d(channels, 2), ResBlock2d(channels, 1))
        self.layer2 = nn.Sequential(ResBlock2d(channels, 2), ResBlock2d(channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x[:, None])))
        x = self.layer2(self.layer1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        return x.flatten(1, 2)


class TDNN(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(c_in, c_out, 5, stride=2, padding=2, bias=False)
        self.nonlinear = Nonlinear(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """A dilated conv whose output channels are gated by utterance- and segment-level context."""

    def __init__(self, bottleneck: int, growth: int, dilation: int) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(bottleneck, growth, 3, padding=dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bottleneck, bottleneck // 2, 1)
        self.linear2 = nn.Conv1d(bottleneck // 2, growth, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, bottleneck, T) -> (B, growth, T)."""
        n_frames = x.shape[-1]
        segment_mean = F.avg_pool1d(x, CAM_SEGMENT, CAM_SEGMENT, ceil_mode=True)
        segment_mean = segment_mean.repeat_interleave(CAM_SEGMENT, dim=-1)[..., :n_frames]
        context = x.mean(-1, keepdim=True) + segment_mean
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * gate


class CAMDenseLayer(nn.Module):
    def __init__(self, c_in: int, cfg: CAMPPlusConfig, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = Nonlinear(c_in)
        self.linear1 = nn.Conv1d(c_in, cfg.bottleneck, 1, bias=False)
        self.nonlinear2 = Nonlinear(cfg.bottleneck)
        self.cam_layer = CAMLayer(cfg.bottleneck, cfg.growth, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class TransitLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.nonlinear = Nonlinear(c_in)
        self.linear = nn.Conv1d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class DenseOut(nn.Module):
    """Pooled statistics -> embedding: a 1x1 conv and a batch norm without affine parameters."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.nonlinear = Nonlinear(c_out, affine=False, relu=False)

    def forward(self, stats: Tensor) -> Tensor:
        """stats (B, c_in) -> (B, c_out)."""
        return self.nonlinear(self.linear(stats[..., None])[..., 0])


class XVector(nn.Module):
    def __init__(self, cfg: CAMPPlusConfig) -> None:
        super().__init__()
        channels = cfg.init_channels
        self.tdnn = TDNN(cfg.head_channels * (FBANK_BINS // 8), channels)
        for b, (n_layers, dilation) in enumerate(
            zip(cfg.block_layers, BLOCK_DILATIONS, strict=True), start=1
        ):
            block = nn.ModuleDict(
                {
                    f"tdnnd{j + 1}": CAMDenseLayer(channels + j * cfg.growth, cfg, dilation)
                    for j in range(n_layers)
                }
            )
            channels += n_layers * cfg.growth
            setattr(self, f"block{b}", block)
            setattr(self, f"transit{b}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.n_blocks = len(cfg.block_layers)
        self.out_nonlinear = Nonlinear(channels)
        self.dense = DenseOut(2 * channels, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_head, T) -> (B, embed_dim)."""
        x = self.tdnn(x)
        for b in range(1, self.n_blocks + 1):
            for layer in getattr(self, f"block{b}").values():
                x = torch.cat([x, layer(x)], dim=1)  # dense connectivity
            x = getattr(self, f"transit{b}")(x)
        x = self.out_nonlinear(x)
        stats = torch.cat([x.mean(dim=-1), x.std(dim=-1)], dim=-1)  # std is unbiased, as in the reference
        return self.dense(stats)


class CAMPPlus(nn.Module):
    def __init__(self, cfg: CAMPPlusConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = ConvHead(cfg.head_channels)
        self.xvector = XVector(cfg)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> CAMPPlus:
        """Load the ``speaker_encoder.`` entries (prefix removed) strictly."""
        module = cls(CAMPPlusConfig.from_state_dict(sd))
        load_strict(module, sd, "CAMPPlus speaker encoder")
        return module.eval()

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, 80), mean-normalised, unpadded -> x-vectors (B, embed_dim)."""
        return self.xvector(self.head(fbank.transpose(1, 2)))

    @torch.inference_mode()
    def embed(self, wav_16k: Tensor) -> Tensor:
        """One (N,) 16 kHz waveform, N >= 720 -> its (embed_dim,) x-vector."""
        if wav_16k.dim() != 1 or wav_16k.shape[0] < MIN_SAMPLES_16K:
            raise ValueError(
                f"CAMPPlus needs 1-D audio of at least {MIN_SAMPLES_16K} samples at 16 kHz, "
                f"got shape {tuple(wav_16k.shape)}"
            )
        return self(kaldi_fbank_cmn(wav_16k)[None])[0]
