"""Seeded random checkpoints in the official file layout of ``ResembleAI/chatterbox-turbo``.

No machine of ours can download the real weights, so every test and benchmark runs on a directory
this module writes: the nine official files with the official key names, seeded random weights
drawn at the scales the modules' own initialisation gives, and a small byte-level BPE tokenizer in
the real file format.

- ``full``: exactly the official key names and shapes (T3 299 tensors, S3Gen 2491, VE 16, float32).
- ``tiny``: the same keys (every layer) at small widths, so tests run in seconds.
- ``nano``: ``full`` with Chatterbox Nano's GPT-2 small T3 (``t3_nano_v1.safetensors``).

CLI: ``python -m chatterbox.testing make-checkpoint DIR --size tiny|nano|full --seed N``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import pre_tokenizers

from chatterbox.constants import (
    HEAD_DIM,
    PARALINGUISTIC_TAGS,
    S3_SR,
    S3GEN_MEL_BINS,
    SPEECH_VOCAB_SIZE,
    T3_SPEECH_VOCAB_SIZE,
)
from chatterbox.s3gen.hift import (
    HARMONICS,
    RESBLOCK_KERNELS,
    SOURCE_CHANNELS,
    SOURCE_DOWNS,
    SOURCE_RESBLOCK_KERNELS,
    UPSAMPLE_KERNELS,
)
from chatterbox.voice.features import FBANK_BINS, mel_filters
from chatterbox.voice.speech_tokenizer import SpeechTokenizerConfig

CHECKPOINT_FILES = (
    "t3_turbo_v1.safetensors",
    "s3gen_meanflow.safetensors",
    "ve.safetensors",
    "conds.pt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class CheckpointDims:
    """Every width and depth a checkpoint directory is built from (head_dim is always 64)."""

    t3_width: int
    t3_layers: int
    t3_positions: int
    t3_text_vocab: int | None  # None: as many rows as the fixture tokenizer has ids
    speaker_dim: int  # voice-encoder embedding size (T3's speaker input)
    ve_mels: int
    ve_layers: int
    tokenizer_width: int
    tokenizer_blocks: int
    campplus_head_channels: int
    campplus_init_channels: int
    campplus_growth: int
    campplus_bottleneck: int
    campplus_block_layers: tuple[int, int, int]
    xvector_dim: int
    flow_width: int
    flow_ffn: int
    flow_blocks: int
    flow_up_blocks: int
    estimator_channels: int
    estimator_heads: int
    estimator_transformers: int  # transformer blocks after each resnet
    estimator_mid_blocks: int
    hift_channels: int
    conds_t3_prompt_tokens: int
    conds_gen_prompt_tokens: int


FULL = CheckpointDims(
    t3_width=1024,
    t3_layers=24,
    t3_positions=8196,
    t3_text_vocab=50276,
    speaker_dim=256,
    ve_mels=40,
    ve_layers=3,
    tokenizer_width=1280,
    tokenizer_blocks=6,
    campplus_head_channels=32,
    campplus_init_channels=128,
    campplus_growth=32,
    campplus_bottleneck=128,
    campplus_block_layers=(12, 24, 16),
    xvector_dim=192,
    flow_width=512,
    flow_ffn=2048,
    flow_blocks=6,
    flow_up_blocks=4,
    estimator_channels=256,
    estimator_heads=8,
    estimator_transformers=4,
    estimator_mid_blocks=12,
    hift_channels=512,
    conds_t3_prompt_tokens=375,
    conds_gen_prompt_tokens=250,
)
TINY = replace(  # the same keys (every layer) at small widths
    FULL,
    t3_width=128,
    t3_text_vocab=None,
    speaker_dim=64,
    tokenizer_width=128,
    campplus_head_channels=8,
    campplus_init_channels=32,
    campplus_growth=8,
    campplus_bottleneck=32,
    flow_width=128,
    flow_ffn=256,
    estimator_channels=64,
    estimator_heads=1,
    hift_channels=32,
    conds_t3_prompt_tokens=100,
    conds_gen_prompt_tokens=100,
)
# Chatterbox Nano: Turbo with a GPT-2 small T3 (768 x 12), in t3_nano_v1.safetensors.
NANO = replace(FULL, t3_width=768, t3_layers=12)
SIZES = {"tiny": TINY, "nano": NANO, "full": FULL}


# Random tensors at the modules' own initial scales


class _StateDictBuilder:
    """Collects named tensors drawn from one seeded generator.

    Init rules follow what the reference modules do at construction: PyTorch's default
    ``U(±1/sqrt(fan_in))`` for Linear/Conv, N(0, 0.02) for GPT-2, N(0, 1) for nn.Embedding,
    Kaiming-normal where the module re-initialises (CAMPPlus x-vector, flow estimator),
    identity norms, and weight-norm magnitudes equal to the direction's norm.
    """

    def __init__(self, seed: int, salt: str, device: str = "cpu") -> None:
        digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        self.device = device  # "meta" records names and shapes without drawing any numbers
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, value: torch.Tensor) -> None:
        if name in self.tensors:
            raise KeyError(f"duplicate checkpoint key {name}")
        self.tensors[name] = value.contiguous()

    def _uniform(self, shape: tuple[int, ...], bound: float) -> torch.Tensor:
        if self.device == "meta":
            return torch.empty(shape, device="meta")
        return (torch.rand(shape, generator=self.generator) * 2 - 1) * bound

    def _normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        if self.device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.generator) * std

    def weight(self, name: str, shape: tuple[int, ...], init: str = "default") -> None:
        """A Linear/Conv weight ``[out, in, *kernel]`` (ConvTranspose: ``[in, out, *kernel]``)."""
        fan_in = math.prod(shape[1:])
        if init == "default":
            value = self._uniform(shape, 1 / math.sqrt(fan_in))
        elif init == "kaiming":
            value = self._normal(shape, math.sqrt(2 / fan_in))
        elif init == "gpt2":
            value = self._normal(shape, 0.02)
        elif init == "embedding":
            value = self._normal(shape, 1.0)
        elif init == "xavier":
            value = self._uniform(shape, math.sqrt(6 / (shape[0] + shape[1])))
        else:
            raise ValueError(f"unknown init {init!r}")
        self.put(name, value)

    def bias(self, name: str, size: int, fan_in: int | None) -> None:
        """Default bias ``U(±1/sqrt(fan_in))``; ``fan_in=None`` gives zeros (re-initialised modules)."""
        if fan_in is None:
            self.put(name, torch.zeros(size))
        else:
            self.put(name, self._uniform((size,), 1 / math.sqrt(fan_in)))

    def linear(
        self, prefix: str, fan_in: int, fan_out: int, bias: bool = True, init: str = "default"
    ) -> None:
        self.weight(f"{prefix}.weight", (fan_out, fan_in), init)
        if bias:
            self.bias(f"{prefix}.bias", fan_out, fan_in if init == "default" else None)

    def conv(
        self,
        prefix: str,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...] | int,
        bias: bool = True,
        init: str = "default",
        groups: int = 1,
    ) -> None:
        kernel = (kernel,) if isinstance(kernel, int) else kernel
        shape = (c_out, c_in // groups, *kernel)
        self.weight(f"{prefix}.weight", shape, init)
        if bias:
            self.bias(f"{prefix}.bias", c_out, math.prod(shape[1:]) if init == "default" else None)

    def weight_norm_conv(
        self, prefix: str, c_in: int, c_out: int, kernel: int, transposed: bool = False
    ) -> None:
        """Conv1d (or ConvTranspose1d) under ``torch.nn.utils.parametrizations.weight_norm``."""
        shape = (c_in, c_out, kernel) if transposed else (c_out, c_in, kernel)
        direction = self._uniform(shape, 1 / math.sqrt(math.prod(shape[1:])))
        self.put(f"{prefix}.parametrizations.weight.original0", direction.norm(dim=(1, 2), keepdim=True))
        self.put(f"{prefix}.parametrizations.weight.original1", direction)
        self.bias(f"{prefix}.bias", c_out, math.prod(shape[1:]))

    def layer_norm(self, prefix: str, size: int) -> None:
        self.put(f"{prefix}.weight", torch.ones(size))
        self.put(f"{prefix}.bias", torch.zeros(size))

    def batch_norm(self, prefix: str, size: int, affine: bool = True) -> None:
        if affine:
            self.layer_norm(prefix, size)
        self.put(f"{prefix}.running_mean", torch.zeros(size))
        self.put(f"{prefix}.running_var", torch.ones(size))
        # The official file stores this unused counter as F32 (the modules hold int64).
        self.put(f"{prefix}.num_batches_tracked", torch.zeros(()))


def t3_state_dict(
    dims: CheckpointDims, text_vocab: int, seed: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of ``t3_turbo_v1.safetensors``: GPT-2 backbone (Conv1D ``[in, out]`` layout) and T3 heads."""
    sd = _StateDictBuilder(seed, "t3", device)
    width = dims.t3_width
    sd.weight("tfmr.wte.weight", (text_vocab, width), "gpt2")
    sd.weight("tfmr.wpe.weight", (dims.t3_positions, width), "gpt2")
    for i in range(dims.t3_layers):
        block = f"tfmr.h.{i}"
        sd.layer_norm(f"{block}.ln_1", width)
        for name, fan_in, fan_out in (
            ("attn.c_attn", width, 3 * width),
            ("attn.c_proj", width, width),
            ("mlp.c_fc", width, 4 * width),
            ("mlp.c_proj", 4 * width, width),
        ):
            sd.weight(f"{block}.{name}.weight", (fan_in, fan_out), "gpt2")
            sd.put(f"{block}.{name}.bias", torch.zeros(fan_out))
            if name == "attn.c_proj":
                sd.layer_norm(f"{block}.ln_2", width)
    sd.layer_norm("tfmr.ln_f", width)
    sd.linear("cond_enc.spkr_enc", dims.speaker_dim, width)
    sd.weight("text_emb.weight", (text_vocab, width), "embedding")
    sd.weight("speech_emb.weight", (T3_SPEECH_VOCAB_SIZE, width), "embedding")
    sd.linear("text_head", width, text_vocab, bias=False)
    sd.linear("speech_head", width, T3_SPEECH_VOCAB_SIZE)
    return sd.tensors


def _speech_tokenizer(sd: _StateDictBuilder, dims: CheckpointDims) -> None:
    width = dims.tokenizer_width
    front = SpeechTokenizerConfig()  # the front end and quantizer are fixed; only width and depth vary
    filters = mel_filters(S3_SR, front.n_fft, front.n_mels, S3_SR / 2)
    sd.put("tokenizer._mel_filters", torch.from_numpy(filters))
    sd.put("tokenizer.window", torch.hann_window(front.n_fft, periodic=True))
    sd.conv("tokenizer.encoder.conv1", front.n_mels, width, 3)
    sd.conv("tokenizer.encoder.conv2", width, width, 3)
    for b in range(dims.tokenizer_blocks):
        block = f"tokenizer.encoder.blocks.{b}"
        sd.linear(f"{block}.attn.query", width, width)
        sd.linear(f"{block}.attn.key", width, width, bias=False)
        sd.linear(f"{block}.attn.value", width, width)
        sd.linear(f"{block}.attn.out", width, width)
        sd.conv(f"{block}.attn.fsmn_block", width, width, front.fsmn_kernel, bias=False, groups=width)
        sd.layer_norm(f"{block}.attn_ln", width)
        sd.linear(f"{block}.mlp.0", width, 4 * width)
        sd.linear(f"{block}.mlp.2", 4 * width, width)
        sd.layer_norm(f"{block}.mlp_ln", width)
    sd.linear("tokenizer.quantizer._codebook.project_down", width, front.fsq_dims)


def _campplus(sd: _StateDictBuilder, dims: CheckpointDims) -> None:
    head = "speaker_encoder.head"
    c = dims.campplus_head_channels
    sd.conv(f"{head}.conv1", 1, c, (3, 3), bias=False)
    sd.batch_norm(f"{head}.bn1", c)
    for layer in ("layer1", "layer2"):
        for j in range(2):
            block = f"{head}.{layer}.{j}"
            sd.conv(f"{block}.conv1", c, c, (3, 3), bias=False)
            sd.batch_norm(f"{block}.bn1", c)
            sd.conv(f"{block}.conv2", c, c, (3, 3), bias=False)
            sd.batch_norm(f"{block}.bn2", c)
            if j == 0:  # the strided block has a 1x1 projection shortcut
                sd.conv(f"{block}.shortcut.0", c, c, (1, 1), bias=False)
                sd.batch_norm(f"{block}.shortcut.1", c)
    sd.conv(f"{head}.conv2", c, c, (3, 3), bias=False)
    sd.batch_norm(f"{head}.bn2", c)

    xv = "speaker_encoder.xvector"
    channels = dims.campplus_init_channels
    # Three stride-2 stages take the 80 fbank bins down to 10 rows of `c` channels each.
    sd.conv(f"{xv}.tdnn.linear", c * (FBANK_BINS // 8), channels, 5, bias=False, init="kaiming")
    sd.batch_norm(f"{xv}.tdnn.nonlinear.batchnorm", channels)
    growth, bottleneck = dims.campplus_growth, dims.campplus_bottleneck
    for b, n_layers in enumerate(dims.campplus_block_layers, start=1):
        for j in range(1, n_layers + 1):
            layer = f"{xv}.block{b}.tdnnd{j}"
            c_in = channels + (j - 1) * growth
            sd.batch_norm(f"{layer}.nonlinear1.batchnorm", c_in)
            sd.conv(f"{layer}.linear1", c_in, bottleneck, 1, bias=False, init="kaiming")
            sd.batch_norm(f"{layer}.nonlinear2.batchnorm", bottleneck)
            sd.conv(f"{layer}.cam_layer.linear_local", bottleneck, growth, 3, bias=False, init="kaiming")
            sd.conv(f"{layer}.cam_layer.linear1", bottleneck, bottleneck // 2, 1, init="kaiming")
            sd.conv(f"{layer}.cam_layer.linear2", bottleneck // 2, growth, 1, init="kaiming")
        channels += n_layers * growth
        sd.batch_norm(f"{xv}.transit{b}.nonlinear.batchnorm", channels)
        sd.conv(f"{xv}.transit{b}.linear", channels, channels // 2, 1, bias=False, init="kaiming")
        channels //= 2
    sd.batch_norm(f"{xv}.out_nonlinear.batchnorm", channels)
    sd.conv(f"{xv}.dense.linear", 2 * channels, dims.xvector_dim, 1, bias=False, init="kaiming")
    sd.batch_norm(f"{xv}.dense.nonlinear.batchnorm", dims.xvector_dim, affine=False)


def _conformer_layer(sd: _StateDictBuilder, prefix: str, width: int, ffn: int) -> None:
    attn = f"{prefix}.self_attn"
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        sd.linear(f"{attn}.{name}", width, width)
    sd.linear(f"{attn}.linear_pos", width, width, bias=False)
    sd.weight(f"{attn}.pos_bias_u", (width // HEAD_DIM, HEAD_DIM), "xavier")
    sd.weight(f"{attn}.pos_bias_v", (width // HEAD_DIM, HEAD_DIM), "xavier")
    sd.linear(f"{prefix}.feed_forward.w_1", width, ffn)
    sd.linear(f"{prefix}.feed_forward.w_2", ffn, width)
    sd.layer_norm(f"{prefix}.norm_ff", width)
    sd.layer_norm(f"{prefix}.norm_mha", width)


def _flow(sd: _StateDictBuilder, dims: CheckpointDims) -> None:
    width = dims.flow_width
    sd.weight("flow.input_embedding.weight", (SPEECH_VOCAB_SIZE, width), "embedding")
    sd.linear("flow.spk_embed_affine_layer", dims.xvector_dim, S3GEN_MEL_BINS)
    enc = "flow.encoder"
    for embed in ("embed", "up_embed"):
        sd.linear(f"{enc}.{embed}.out.0", width, width)
        sd.layer_norm(f"{enc}.{embed}.out.1", width)
    sd.conv(f"{enc}.pre_lookahead_layer.conv1", width, width, 4)
    sd.conv(f"{enc}.pre_lookahead_layer.conv2", width, width, 3)
    for i in range(dims.flow_blocks):
        _conformer_layer(sd, f"{enc}.encoders.{i}", width, dims.flow_ffn)
    sd.conv(f"{enc}.up_layer.conv", width, width, 5)
    for i in range(dims.flow_up_blocks):
        _conformer_layer(sd, f"{enc}.up_encoders.{i}", width, dims.flow_ffn)
    sd.layer_norm(f"{enc}.after_norm", width)
    sd.linear("flow.encoder_proj", width, S3GEN_MEL_BINS)
    _estimator(sd, dims)


def _estimator(sd: _StateDictBuilder, dims: CheckpointDims) -> None:
    est = "flow.decoder.estimator"
    channels = dims.estimator_channels
    time_dim = 4 * channels
    in_channels = 4 * S3GEN_MEL_BINS  # [x, mu, speaker, cond]
    sd.linear(f"{est}.time_mlp.linear_1", in_channels, time_dim, init="kaiming")
    sd.linear(f"{est}.time_mlp.linear_2", time_dim, time_dim, init="kaiming")
    # The module starts as [I | 0] (mean-flow mixer passes t, ignores r); a little noise makes r
    # matter too, so parity checks see a wrong use of r.
    mixer = torch.cat([torch.eye(time_dim), torch.zeros(time_dim, time_dim)], dim=1)
    sd.put(f"{est}.time_embed_mixer.weight", mixer.to(sd.device) + sd._normal(mixer.shape, 0.01))

    def causal_block(prefix: str, c_in: int) -> None:
        sd.conv(f"{prefix}.block.0", c_in, channels, 3, init="kaiming")
        sd.layer_norm(f"{prefix}.block.2", channels)

    def resnet(prefix: str, c_in: int) -> None:
        sd.linear(f"{prefix}.mlp.1", time_dim, channels, init="kaiming")
        causal_block(f"{prefix}.block1", c_in)
        causal_block(f"{prefix}.block2", channels)
        sd.conv(f"{prefix}.res_conv", c_in, channels, 1, init="kaiming")

    def transformers(prefix: str) -> None:
        inner = HEAD_DIM * dims.estimator_heads
        for t in range(dims.estimator_transformers):
            block = f"{prefix}.{t}"
            sd.layer_norm(f"{block}.norm1", channels)
            for name in ("to_q", "to_k", "to_v"):
                sd.linear(f"{block}.attn1.{name}", channels, inner, bias=False, init="kaiming")
            sd.linear(f"{block}.attn1.to_out.0", inner, channels, init="kaiming")
            sd.layer_norm(f"{block}.norm3", channels)
            sd.linear(f"{block}.ff.net.0.proj", channels, 4 * channels, init="kaiming")
            sd.linear(f"{block}.ff.net.2", 4 * channels, channels, init="kaiming")

    resnet(f"{est}.down_blocks.0.0", in_channels)
    transformers(f"{est}.down_blocks.0.1")
    sd.conv(f"{est}.down_blocks.0.2", channels, channels, 3, init="kaiming")
    for m in range(dims.estimator_mid_blocks):
        resnet(f"{est}.mid_blocks.{m}.0", channels)
        transformers(f"{est}.mid_blocks.{m}.1")
    resnet(f"{est}.up_blocks.0.0", 2 * channels)
    transformers(f"{est}.up_blocks.0.1")
    sd.conv(f"{est}.up_blocks.0.2", channels, channels, 3, init="kaiming")
    causal_block(f"{est}.final_block", channels)
    sd.conv(f"{est}.final_proj", channels, S3GEN_MEL_BINS, 1, init="kaiming")


def _hift(sd: _StateDictBuilder, dims: CheckpointDims) -> None:
    hift = "mel2wav"
    channels = dims.hift_channels
    sd.linear(f"{hift}.m_source.l_linear", HARMONICS, 1)
    sd.weight_norm_conv(f"{hift}.conv_pre", S3GEN_MEL_BINS, channels, 7)

    def resblock(prefix: str, c: int, kernel: int) -> None:
        for j in range(3):
            sd.weight_norm_conv(f"{prefix}.convs1.{j}", c, c, kernel)
            sd.weight_norm_conv(f"{prefix}.convs2.{j}", c, c, kernel)
        for j in range(3):
            sd.put(f"{prefix}.activations1.{j}.alpha", torch.ones(c))
            sd.put(f"{prefix}.activations2.{j}.alpha", torch.ones(c))

    stages = zip(UPSAMPLE_KERNELS, SOURCE_DOWNS, SOURCE_RESBLOCK_KERNELS, strict=True)
    for i, (kernel, (down_kernel, _, _), source_kernel) in enumerate(stages):
        c_in, c_out = channels >> i, channels >> (i + 1)
        sd.weight_norm_conv(f"{hift}.ups.{i}", c_in, c_out, kernel, transposed=True)
        sd.conv(f"{hift}.source_downs.{i}", SOURCE_CHANNELS, c_out, down_kernel)
        resblock(f"{hift}.source_resblocks.{i}", c_out, source_kernel)
    for i in range(len(UPSAMPLE_KERNELS)):
        for j, kernel in enumerate(RESBLOCK_KERNELS):
            resblock(f"{hift}.resblocks.{len(RESBLOCK_KERNELS) * i + j}", channels >> (i + 1), kernel)
    last = channels >> len(UPSAMPLE_KERNELS)
    sd.weight_norm_conv(f"{hift}.conv_post", last, SOURCE_CHANNELS, 7)
    for j in range(5):
        sd.weight_norm_conv(
            f"{hift}.f0_predictor.condnet.{2 * j}", S3GEN_MEL_BINS if j == 0 else channels, channels, 3
        )
    sd.linear(f"{hift}.f0_predictor.classifier", channels, 1)


def s3gen_state_dict(dims: CheckpointDims, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of ``s3gen_meanflow.safetensors``: speech tokenizer, CAMPPlus, flow and HiFT."""
    sd = _StateDictBuilder(seed, "s3gen", device)
    _speech_tokenizer(sd, dims)
    _campplus(sd, dims)
    _flow(sd, dims)
    _hift(sd, dims)
    return sd.tensors


def ve_state_dict(dims: CheckpointDims, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of ``ve.safetensors``: a 3-layer LSTM, a projection and the (unused) similarity scalars."""
    sd = _StateDictBuilder(seed, "ve", device)
    hidden = dims.speaker_dim
    bound = 1 / math.sqrt(hidden)  # nn.LSTM draws every tensor from U(±1/sqrt(hidden))
    for layer in range(dims.ve_layers):
        fan_in = dims.ve_mels if layer == 0 else hidden
        sd.put(f"lstm.weight_ih_l{layer}", sd._uniform((4 * hidden, fan_in), bound))
        sd.put(f"lstm.weight_hh_l{layer}", sd._uniform((4 * hidden, hidden), bound))
        sd.put(f"lstm.bias_ih_l{layer}", sd._uniform((4 * hidden,), bound))
        sd.put(f"lstm.bias_hh_l{layer}", sd._uniform((4 * hidden,), bound))
    sd.linear("proj", hidden, hidden)
    sd.put("similarity_weight", torch.tensor([10.0]))
    sd.put("similarity_bias", torch.tensor([-5.0]))
    return sd.tensors


def builtin_conditionals(dims: CheckpointDims, seed: int) -> dict[str, dict[str, torch.Tensor | None]]:
    """The content of ``conds.pt``: a random built-in voice with the official structure."""
    g = torch.Generator().manual_seed(seed)
    speaker = torch.rand(1, dims.speaker_dim, generator=g)  # ReLU then L2-normalised, like the VE
    n_gen = dims.conds_gen_prompt_tokens
    return {
        "t3": {
            "speaker_emb": speaker / speaker.norm(),
            "clap_emb": None,
            "cond_prompt_speech_tokens": torch.randint(
                0, SPEECH_VOCAB_SIZE, (1, dims.conds_t3_prompt_tokens), generator=g
            ),
            "cond_prompt_speech_emb": None,
            "emotion_adv": torch.full((1, 1, 1), 0.5),
        },
        "gen": {
            "prompt_token": torch.randint(0, SPEECH_VOCAB_SIZE, (1, n_gen), generator=g),
            "prompt_token_len": torch.tensor([n_gen]),
            # Natural log-mel values of speech sit roughly in [-11.5, 2].
            "prompt_feat": (torch.randn(1, 2 * n_gen, S3GEN_MEL_BINS, generator=g) * 2 - 6).clamp(
                min=math.log(1e-5)
            ),
            "prompt_feat_len": None,
            "embedding": torch.randn(1, dims.xvector_dim, generator=g),
        },
    }


# A small byte-level BPE in the GPT-2 file format

_BPE_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world, this is a test of the speech service.
Chapter one. It was a bright cold day in April, and the clocks were striking thirteen.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
We need long scripts voiced fast, many requests at once, and a cluster that grows with load.
Numbers like 1, 2, 3, 42 and 2026 appear in text too. Don't forget: "quotes" and 'apostrophes'!
Please call Stella and ask her to bring these things with her from the store.
The rain in Spain stays mainly in the plain. Peter Piper picked a peck of pickled peppers.
Oh, that's hilarious! Well, I never thought it would end like this... What do you think?
Every morning the baker opens the shop at seven and the street smells of fresh bread.
"""
BPE_MERGES = 300


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in vocabulary id order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def learn_bpe(corpus: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges greedily (most frequent pair, ties by pair order).

    Returns the vocabulary (bytes, then merged tokens, then ``<|endoftext|>``) and the merges.
    """
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for line in corpus.splitlines() for piece, _ in splitter.pre_tokenize_str(line))
    segmented = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = segmented[word]
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged
    vocab = {symbol: i for i, symbol in enumerate(_byte_alphabet())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[ENDOFTEXT] = len(vocab)
    return vocab, merges


def write_tokenizer_files(out_dir: Path) -> int:
    """Write the five tokenizer files; returns the number of token ids (BPE + tags)."""
    vocab, merges = learn_bpe(_BPE_CORPUS, BPE_MERGES)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    tag_ids = {tag: len(vocab) + i for i, tag in enumerate(PARALINGUISTIC_TAGS)}
    (out_dir / "added_tokens.json").write_text(json.dumps(tag_ids, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}, indent=2)
    )

    def added(content: str, special: bool) -> dict[str, object]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": not special,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }

    decoder = {str(vocab[ENDOFTEXT]): added(ENDOFTEXT, True)}
    decoder.update({str(i): added(tag, False) for tag, i in tag_ids.items()})
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": ENDOFTEXT,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": ENDOFTEXT,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab) + len(tag_ids)


def checkpoint_layout(size: str, text_vocab: int | None = None) -> dict[str, dict[str, tuple[int, ...]]]:
    """File -> key -> shape of a checkpoint size, computed without drawing any weights."""
    dims = SIZES[size]
    vocab = dims.t3_text_vocab or text_vocab
    if vocab is None:
        raise ValueError(f"the {size} T3 text vocabulary follows the tokenizer: pass text_vocab")
    files = {
        "t3_turbo_v1.safetensors": t3_state_dict(dims, vocab, 0, "meta"),
        "s3gen_meanflow.safetensors": s3gen_state_dict(dims, 0, "meta"),
        "ve.safetensors": ve_state_dict(dims, 0, "meta"),
    }
    return {file: {key: tuple(t.shape) for key, t in sd.items()} for file, sd in files.items()}


def make_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a complete checkpoint directory (the nine official files) and return its path."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    dims = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_text_ids = write_tokenizer_files(out)
    text_vocab = dims.t3_text_vocab or n_text_ids
    t3_file = "t3_nano_v1.safetensors" if size == "nano" else "t3_turbo_v1.safetensors"
    save_file(t3_state_dict(dims, text_vocab, seed), out / t3_file)
    save_file(s3gen_state_dict(dims, seed), out / "s3gen_meanflow.safetensors")
    save_file(ve_state_dict(dims, seed), out / "ve.safetensors")
    torch.save(builtin_conditionals(dims, seed), out / "conds.pt")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chatterbox.testing", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-checkpoint", help="write a seeded random checkpoint directory")
    make.add_argument("dir", type=Path)
    make.add_argument("--size", choices=sorted(SIZES), default="tiny")
    make.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_checkpoint(args.dir, size=args.size, seed=args.seed)
    print(f"wrote {args.size} checkpoint (seed {args.seed}) to {out}")
