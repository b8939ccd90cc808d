"""S3Gen: batched speech tokens -> 24 kHz waveforms, with each request's own voice prompt.

Per request (turbo-spec 5.3, 5.7, 8, 9): append 3 silence tokens; encode [prompt tokens, speech
tokens]; put the prompt mel at the start of ``cond``; sample the mel with the two-step mean flow;
keep the frames after the prompt mel; vocode with HiFT; fade in the first 40 ms.

The flow runs all requests as one right-padded, masked batch (exact per row). HiFT runs one mel at
a time, or with ``batch_vocoder`` (default on CUDA) as one batch with each row's lengths
(``vocode_batched``, exact per row); ``vocode_padded`` omits the lengths, so a row's last
``PADDED_VOCODER_TAIL_FRAMES`` frames see padding (kept to measure what the masks buy).

Each request draws from its own generator seeded by ``S3GenRequest.seed``, in the reference's
order, so a seeded row equals an unbatched reference call after ``torch.manual_seed(seed)``;
``S3GenNoise`` holds one request's draws and may be passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import (
    S3GEN_MEL_BINS,
    S3GEN_MEL_FRAMES_PER_TOKEN,
    S3GEN_SILENCE_TOKEN,
    S3GEN_SILENCE_TOKENS_APPENDED,
    S3GEN_SR,
    SPEECH_VOCAB_SIZE,
)
from chatterbox.s3gen.compiled import (
    FLOW_BUCKETS,
    HIFT_BUCKETS,
    Bucketed,
    CompileReport,
    compiled_estimator,
    compiled_hift,
    warm_up,
)
from chatterbox.s3gen.flow import Flow, FlowConfig
from chatterbox.s3gen.hift import HARMONICS, SAMPLES_PER_FRAME, HiFT, HiFTConfig, draw_source_noise
from chatterbox.weights import load_strict, read_safetensors, subdict

XVECTOR_DIM = 192
FADE_SAMPLES = S3GEN_SR // 50  # 20 ms of silence, then a 20 ms raised-cosine fade-in
# A zero-padded HiFT row differs from its solo output only in its last frames, where the padding
# enters the convolutions' receptive field and the STFTs' edges (tests/test_s3gen.py measures it
# on the tiny and full-size HiFT): before them within PADDED_VOCODER_BODY_ERROR.
PADDED_VOCODER_TAIL_FRAMES = 8  # 160 ms; the 3 appended silence tokens are the last 6 frames
PADDED_VOCODER_BODY_ERROR = 5e-4
MAX_COMPILED_BATCH = 16  # batch sizes a compiled module keeps graphs for (past it: eager, a warning)


@dataclass
class S3GenRequest:
    speech_tokens: torch.Tensor  # (N,) int64, N >= 0, ids < 6561 (T3 output, already filtered)
    prompt_tokens: torch.Tensor  # (P,) int64 reference speech tokens
    prompt_feat: torch.Tensor  # (T_mel, 80) float reference mel, T_mel = 2P or 2P + 1
    embedding: torch.Tensor  # (192,) float CAMPPlus x-vector
    seed: int | None = None  # per-row noise seed (None -> fresh random)

    def validate(self, index: int) -> None:
        where = f"request {index}"
        for name in ("speech_tokens", "prompt_tokens"):
            tokens = getattr(self, name)
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
                raise ValueError(f"{where}: {name} must be a 1-D tensor of token ids")
            if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
                raise ValueError(f"{where}: {name} must hold integer ids, got {tokens.dtype}")
            if tokens.numel() == 0:
                if name == "prompt_tokens":
                    raise ValueError(f"{where}: prompt_tokens is empty")
                continue  # T3 drew only stop tokens: the appended silence alone is vocoded, as upstream
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= SPEECH_VOCAB_SIZE:
                raise ValueError(
                    f"{where}: {name} must be in [0, {SPEECH_VOCAB_SIZE}), got values in [{low}, {high}]"
                )
        feat = self.prompt_feat
        if not isinstance(feat, torch.Tensor) or feat.ndim != 2 or feat.shape[1] != S3GEN_MEL_BINS:
            shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
            raise ValueError(f"{where}: prompt_feat must be (T_mel, {S3GEN_MEL_BINS}), got {shape}")
        if not feat.dtype.is_floating_point:
            raise ValueError(f"{where}: prompt_feat must be a float tensor, got {feat.dtype}")
        n_prompt = self.prompt_tokens.numel()
        if feat.shape[0] not in (
            S3GEN_MEL_FRAMES_PER_TOKEN * n_prompt,
            S3GEN_MEL_FRAMES_PER_TOKEN * n_prompt + 1,
        ):
            raise ValueError(
                f"{where}: prompt_feat has {feat.shape[0]} frames but {n_prompt} prompt tokens need "
                f"{S3GEN_MEL_FRAMES_PER_TOKEN * n_prompt} (or {S3GEN_MEL_FRAMES_PER_TOKEN * n_prompt + 1})"
            )
        emb = self.embedding
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != (XVECTOR_DIM,):
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"{where}: embedding must be ({XVECTOR_DIM},), got {shape}")
        if not emb.dtype.is_floating_point:
            raise ValueError(f"{where}: embedding must be a float tensor, got {emb.dtype}")
        if not (torch.isfinite(feat).all() and torch.isfinite(emb).all()):
            raise ValueError(f"{where}: prompt_feat and embedding must be finite")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"{where}: seed must be an int or None, got {self.seed!r}")

    @property
    def n_tokens(self) -> int:
        """Prompt + speech + appended silence tokens."""
        return self.prompt_tokens.numel() + self.speech_tokens.numel() + S3GEN_SILENCE_TOKENS_APPENDED

    @property
    def n_speech_frames(self) -> int:
        """Mel frames returned for this request (2N' normally, 2N' - 1 for an odd prompt mel)."""
        return S3GEN_MEL_FRAMES_PER_TOKEN * self.n_tokens - self.prompt_feat.shape[0]


@dataclass
class S3GenNoise:
    """Every random draw of one request."""

    flow: torch.Tensor  # (80, 2 * n_tokens) CFM starting point over prompt + speech frames
    phases: torch.Tensor  # (9,) harmonic phase offsets in [-π, π), the fundamental's is 0
    source: torch.Tensor  # (9, 480 * n_speech_frames) standard normal source noise


def draw_noise(request: S3GenRequest, generator: torch.Generator) -> S3GenNoise:
    """One request's draws in the reference's order, on the generator's device (float32)."""
    device = generator.device
    total = S3GEN_MEL_FRAMES_PER_TOKEN * request.n_tokens
    speech = S3GEN_MEL_FRAMES_PER_TOKEN * (request.speech_tokens.numel() + S3GEN_SILENCE_TOKENS_APPENDED)
    speech_noise = torch.randn(S3GEN_MEL_BINS, speech, generator=generator, device=device)
    flow = torch.randn(S3GEN_MEL_BINS, total, generator=generator, device=device)
    flow[:, total - speech :] = speech_noise
    phases, source = draw_source_noise(request.n_speech_frames, generator)
    return S3GenNoise(flow=flow, phases=phases, source=source)


def fade_in() -> torch.Tensor:
    """(960,) 20 ms of zeros then a 20 ms raised cosine from 0 to 1."""
    fade = torch.zeros(2 * FADE_SAMPLES)
    fade[FADE_SAMPLES:] = (torch.cos(torch.linspace(torch.pi, 0, FADE_SAMPLES)) + 1) / 2
    return fade


def vocode_padded(
    hift: HiFT, mels: list[torch.Tensor], phases: torch.Tensor, sources: list[torch.Tensor]
) -> list[torch.Tensor]:
    """One HiFT call over mels of any lengths: (80, L_i) -> (480 L_i,) each, not faded.

    Mels and source noise are right-padded with zeros to the longest row (zeros are what HiFT's
    first convolution pads a solo row with, so the leak starts one layer later than with any other
    fill; replicate and reflect padding measured 5-10x worse). The longest row is its solo output;
    shorter rows match theirs within PADDED_VOCODER_BODY_ERROR except the last
    PADDED_VOCODER_TAIL_FRAMES, which differ by up to the signal's own level.
    phases (B, 9); sources[i] (9, 480 L_i).
    """
    longest = max(mel.shape[-1] for mel in mels)
    batch = torch.stack([F.pad(mel, (0, longest - mel.shape[-1])) for mel in mels])  # (B, 80, L)
    source = torch.stack([F.pad(s, (0, SAMPLES_PER_FRAME * longest - s.shape[-1])) for s in sources])
    wavs = hift(batch.float(), phases.float(), source.float())  # (B, 480 L)
    return [wav[: SAMPLES_PER_FRAME * mel.shape[-1]] for wav, mel in zip(wavs, mels, strict=True)]


def vocode_batched(
    hift: HiFT | Bucketed, mels: list[torch.Tensor], phases: torch.Tensor, sources: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``vocode_padded`` with each row's length given to HiFT, so every row is its solo waveform
    (float rounding aside: within 1e-5 of peak, tests/test_hift_batching.py). Same shapes."""
    frames = [mel.shape[-1] for mel in mels]
    longest = max(frames)
    batch = torch.stack([F.pad(mel, (0, longest - n)) for mel, n in zip(mels, frames, strict=True)])
    source = torch.stack([F.pad(s, (0, SAMPLES_PER_FRAME * longest - s.shape[-1])) for s in sources])
    # Equal lengths need no masks (a batch of full rows is the solo computation).
    lengths = None if min(frames) == longest else torch.tensor(frames, device=batch.device)
    wavs = hift(batch.float(), phases.float(), source.float(), lengths)  # (B, 480 L)
    return [wav[: SAMPLES_PER_FRAME * n] for wav, n in zip(wavs, frames, strict=True)]


class S3Gen(nn.Module):
    def __init__(self, flow_config: FlowConfig, hift_config: HiFTConfig) -> None:
        super().__init__()
        self.flow = Flow(flow_config)
        self.mel2wav = HiFT(hift_config)
        self.register_buffer("trim_fade", fade_in(), persistent=False)
        # One HiFT batch for all rows (exact either way). Batched HiFT ran 2.3x slower than one mel
        # at a time on CPU (bench/s3gen.py, "HiFT strategy"), so ``to_device`` turns it on for CUDA
        # only; set it after ``to_device`` to force either path (tests batch on CPU).
        self.batch_vocoder = False
        # HiFT's call compiled over length buckets (``compile``); None: eager.
        self.compiled_vocoder: Bucketed | None = None

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> S3Gen:
        """The whole ``s3gen_meanflow`` dict; ``flow.*`` and ``mel2wav.*`` load strictly (the tokenizer
        and speaker encoder belong to other modules)."""
        flow_sd, hift_sd = subdict(state_dict, "flow."), subdict(state_dict, "mel2wav.")
        model = cls(FlowConfig.from_state_dict(flow_sd), HiFTConfig.from_state_dict(hift_sd))
        load_strict(model.flow, flow_sd, "S3Gen flow")
        load_strict(model.mel2wav, hift_sd, "S3Gen HiFT")
        model.mel2wav.fold_weight_norm()
        return model.eval()

    @classmethod
    def from_file(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> S3Gen:
        """Load ``s3gen_meanflow.safetensors``. ``dtype`` applies to the flow; HiFT stays float32."""
        return cls.from_state_dict(read_safetensors(path)).to_device(device, dtype)

    def to_device(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> S3Gen:
        self.flow.to(device=device, dtype=dtype)
        self.mel2wav.to(device=device, dtype=torch.float32)
        self.trim_fade = self.trim_fade.to(device=device, dtype=torch.float32)
        self.batch_vocoder = self.device.type == "cuda"
        return self

    def compile(
        self,
        batch_sizes: Sequence[int] = (1,),
        flow_buckets: Sequence[int] = FLOW_BUCKETS,
        hift_buckets: Sequence[int] = HIFT_BUCKETS,
        warm: Sequence[int] | None = None,
    ) -> CompileReport:
        """Run the flow estimator and HiFT through ``torch.compile`` (inductor), inputs padded to
        length buckets (``chatterbox.s3gen.compiled``), on this device and dtype.

        Graphs for every ``batch_sizes`` x bucket (HiFT: batch 1 unless ``batch_vocoder``) are made
        here, or only for the buckets in ``warm`` (flow and HiFT buckets that hold those mel frame
        counts); other shapes compile at their first call. Returns the time taken; a compile error
        warns and leaves that module eager (``CompileReport.errors``). Call again after ``to_device``.
        """
        estimator = self.flow.decoder.estimator
        flow = compiled_estimator(estimator, flow_buckets)
        hift = compiled_hift(self.mel2wav, hift_buckets)
        # Dynamo keeps one graph per shape of a module's forward; the default cap (8) is below a
        # few batch sizes times the buckets, past which it would silently run eager.
        graphs = max(len(flow_buckets), len(hift_buckets)) * max(len(batch_sizes), MAX_COMPILED_BATCH)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        self.flow.decoder.compiled, self.compiled_vocoder = flow, hift
        flow_warm = sorted({flow.bucket(n) for n in warm} - {None}) if warm else flow.buckets
        hift_warm = sorted({hift.bucket(n) for n in warm} - {None}) if warm else hift.buckets
        device, dtype = self.device, self.flow.input_embedding.weight.dtype
        t_emb = estimator.embed_times(torch.zeros(1, device=device), torch.ones(1, device=device) / 2)
        runs = []
        for b in batch_sizes:
            for frames in flow_warm:
                x = torch.randn(b, S3GEN_MEL_BINS, frames, device=device, dtype=dtype)
                mask = torch.ones(b, 1, frames, device=device, dtype=dtype)
                spks = torch.randn(b, S3GEN_MEL_BINS, device=device, dtype=dtype)
                runs.append(lambda x=x, mask=mask, spks=spks: flow(x, mask, x, t_emb, spks, x))
        # One mel at a time unless the vocoder batches: then HiFT sees batch 1 only.
        for b in batch_sizes if self.batch_vocoder else (1,):
            for frames in hift_warm:
                mel = torch.randn(b, S3GEN_MEL_BINS, frames, device=device) - 5
                phases = torch.zeros(b, HARMONICS, device=device)
                source = torch.randn(b, HARMONICS, SAMPLES_PER_FRAME * frames, device=device)
                runs.append(lambda mel=mel, phases=phases, source=source: hift(mel, phases, source))
        return warm_up(runs, [flow, hift])

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    def noise_for(self, requests: list[S3GenRequest]) -> list[S3GenNoise]:
        """Each request's draws from a generator seeded by its ``seed`` (fresh entropy when None)."""
        noises = []
        for request in requests:
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
            noises.append(draw_noise(request, generator))
        return noises

    def _check(self, requests: list[S3GenRequest], noise: list[S3GenNoise] | None) -> None:
        if not requests:
            raise ValueError("no requests")
        for i, request in enumerate(requests):
            request.validate(i)
        if noise is None:
            return
        if len(noise) != len(requests):
            raise ValueError(f"{len(noise)} noise entries for {len(requests)} requests")
        for i, (request, n) in enumerate(zip(requests, noise, strict=True)):
            expected = {
                "flow": (S3GEN_MEL_BINS, S3GEN_MEL_FRAMES_PER_TOKEN * request.n_tokens),
                "phases": (HARMONICS,),
                "source": (HARMONICS, SAMPLES_PER_FRAME * request.n_speech_frames),
            }
            for name, shape in expected.items():
                if tuple(getattr(n, name).shape) != shape:
                    raise ValueError(
                        f"request {i}: noise.{name} must be {shape}, got {tuple(getattr(n, name).shape)}"
                    )

    def _tokens(self, requests: list[S3GenRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [prompt, speech, silence] ids (B, L) and their lengths (B,)."""
        silence = torch.full((S3GEN_SILENCE_TOKENS_APPENDED,), S3GEN_SILENCE_TOKEN, dtype=torch.long)
        rows = [
            torch.cat([r.prompt_tokens.long().cpu(), r.speech_tokens.long().cpu(), silence]) for r in requests
        ]
        lengths = torch.tensor([row.numel() for row in rows])
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : row.numel()] = row
        return tokens.to(self.device), lengths.to(self.device)

    @torch.inference_mode()
    def mels(self, requests: list[S3GenRequest], noise: list[S3GenNoise] | None = None) -> list[torch.Tensor]:
        """Speech mel per request, (80, n_speech_frames) float32 on the model's device."""
        self._check(requests, noise)
        return self._mels(requests, noise if noise is not None else self.noise_for(requests))

    def _mels(self, requests: list[S3GenRequest], noise: list[S3GenNoise]) -> list[torch.Tensor]:
        tokens, lengths = self._tokens(requests)
        B, frames = tokens.shape[0], S3GEN_MEL_FRAMES_PER_TOKEN * tokens.shape[1]
        cond = torch.zeros(B, S3GEN_MEL_BINS, frames, device=self.device)
        start = torch.zeros(B, S3GEN_MEL_BINS, frames, device=self.device)
        for i, (request, n) in enumerate(zip(requests, noise, strict=True)):
            cond[i, :, : request.prompt_feat.shape[0]] = request.prompt_feat.T.to(self.device)
            start[i, :, : n.flow.shape[1]] = n.flow.to(self.device, torch.float32)
        xvectors = torch.stack([r.embedding.to(self.device, torch.float32) for r in requests])
        mel = self.flow(tokens, lengths, cond, xvectors, start).float()
        return [
            mel[i, :, r.prompt_feat.shape[0] : S3GEN_MEL_FRAMES_PER_TOKEN * r.n_tokens]
            for i, r in enumerate(requests)
        ]

    @torch.inference_mode()
    def vocode(self, mels: list[torch.Tensor], noise: list[S3GenNoise]) -> list[torch.Tensor]:
        """Waveform per mel (80, L) -> (480L,) float32 on the model's device, faded in.

        With ``batch_vocoder`` all mels share one padded, length-masked HiFT batch
        (``vocode_batched``); otherwise each runs alone. Both give each row its solo waveform.
        """
        phases = torch.stack([n.phases for n in noise]).to(self.device, torch.float32)  # (B, 9)
        sources = [n.source.to(self.device) for n in noise]
        hift = self.compiled_vocoder or self.mel2wav
        if self.batch_vocoder:
            wavs = vocode_batched(hift, mels, phases, sources)
        else:
            wavs = [
                hift(mel[None].float(), phases[i : i + 1], sources[i][None].float())[0]
                for i, mel in enumerate(mels)
            ]
        for wav in wavs:
            wav[: self.trim_fade.numel()] *= self.trim_fade
        return wavs

    @torch.inference_mode()
    def generate(
        self, requests: list[S3GenRequest], noise: list[S3GenNoise] | None = None
    ) -> list[torch.Tensor]:
        """One float32 CPU waveform at 24 kHz per request, 960 * (N + 3) samples (480 fewer when the
        prompt mel has an odd length). ``noise`` overrides the seeded draws (tests)."""
        self._check(requests, noise)
        noise = noise if noise is not None else self.noise_for(requests)
        wavs = self.vocode(self._mels(requests, noise), noise)
        return [wav.cpu() for wav in wavs]
