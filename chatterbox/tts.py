"""TurboTTS: loads Chatterbox Turbo, prepares voices and requests, and synthesises in true batches.

    tts = TurboTTS.from_pretrained()                       # or local_dir=..., device=..., dtype=...
    voice = tts.prepare_voice(open("ref.wav", "rb").read())
    wavs = tts.generate([TTSRequest("Hello there.", voice=voice, sampling=SamplingParams(seed=1))])

A request's audio depends only on its own text, voice, settings and seed, never on its batch. T3
runs on the engine's ``DecodeBatch``, the very code the server runs.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from chatterbox.constants import S3GEN_SR, TURBO_REPO_ID
from chatterbox.engine.batch import generate_tokens
from chatterbox.errors import EmptyTextError, TextTooLongError, TTSInputError
from chatterbox.hub import Checkpoint, hub_checkpoint, local_checkpoint, t3_weights_file
from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.sampling import SamplingParams
from chatterbox.t3 import T3, T3Request
from chatterbox.text import TextTokenizer, normalize_text
from chatterbox.voice import ReferenceAudio, Voice, decode_reference_audio, reference_from_array
from chatterbox.voice.conditioning import VoiceConditioner
from chatterbox.watermark import apply_watermark
from chatterbox.weights import CheckpointError, read_safetensors

# The four parts of s3gen_meanflow.safetensors; S3Gen and the voice conditioner load two each.
S3GEN_FILE_PREFIXES = ("tokenizer.", "speaker_encoder.", "flow.", "mel2wav.")


@dataclass(frozen=True)
class TTSRequest:
    """One utterance to synthesise. ``voice=None`` uses the checkpoint's built-in voice.

    ``sampling.seed`` seeds the whole request: T3's sampling and S3Gen's noise draw streams
    derived from it (``derive_seed``).
    """

    text: str
    voice: Voice | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


def derive_seed(seed: int, stream: str) -> int:
    """The 63-bit seed of one random stream ("t3" sampling, "s3gen" noise) of a request's seed."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Job:
    """A request with its seed, voice and text tokens fixed."""

    request: TTSRequest
    seed: int
    voice: Voice
    text_tokens: torch.Tensor

    def t3_request(self) -> T3Request:
        """T3's part of the job: its text, its voice's T3 conditionals, and the derived "t3" seed."""
        return T3Request(
            text_tokens=self.text_tokens,
            speaker_emb=self.voice.conditionals.speaker_emb,
            prompt_speech_tokens=self.voice.conditionals.t3_prompt_tokens,
            sampling=replace(self.request.sampling, seed=derive_seed(self.seed, "t3")),
        )

    def s3gen_request(self, speech_tokens: torch.Tensor) -> S3GenRequest:
        """S3Gen's part of the job: the tokens to vocode, its voice's S3Gen conditionals, the "s3gen" seed."""
        conditionals = self.voice.conditionals
        return S3GenRequest(
            speech_tokens=speech_tokens,
            prompt_tokens=conditionals.prompt_tokens,
            prompt_feat=conditionals.prompt_feat,
            embedding=conditionals.embedding,
            seed=derive_seed(self.seed, "s3gen"),
        )


class TurboTTS:
    """Chatterbox Turbo (or Nano): T3, S3Gen, voice conditioning, tokenizer and watermark."""

    sample_rate = S3GEN_SR

    def __init__(
        self,
        t3: T3,
        s3gen: S3Gen,
        conditioner: VoiceConditioner,
        tokenizer: TextTokenizer,
        default_voice: Voice,
        model_id: str,
        device: torch.device,
    ) -> None:
        self.t3 = t3
        self.s3gen = s3gen
        self.conditioner = conditioner
        self.tokenizer = tokenizer
        self.model_id = model_id  # part of every voice id: conditionals depend on the weights
        self.device = device
        self.default_voice = default_voice.to(device)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str = TURBO_REPO_ID,
        revision: str | None = None,
        local_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> TurboTTS:
        """Load from a local directory or the Hugging Face hub (cached; honours HF_HUB_OFFLINE).

        ``device`` defaults to CUDA when available; ``dtype`` to bf16 on CUDA (T3 and the flow;
        the vocoder stays fp32) and fp32 on CPU.
        """
        checkpoint = (
            local_checkpoint(local_dir) if local_dir is not None else hub_checkpoint(repo_id, revision)
        )
        return cls.from_checkpoint(checkpoint, device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> TurboTTS:
        """Load a resolved checkpoint, e.g. ``hub.resolve_model("tiny")`` (a Serve model source)."""
        ckpt_dir = checkpoint.path
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        s3gen_state = read_safetensors(ckpt_dir / "s3gen_meanflow.safetensors")
        stray = sorted(k for k in s3gen_state if not k.startswith(S3GEN_FILE_PREFIXES))
        if stray:
            raise CheckpointError(f"s3gen_meanflow.safetensors has keys no component loads: {stray[:10]}")
        t3 = T3.from_file(t3_weights_file(ckpt_dir), device=device, dtype=dtype)
        s3gen = S3Gen.from_state_dict(s3gen_state).to_device(device, dtype)
        conditioner = VoiceConditioner.from_state_dicts(
            s3gen_state, read_safetensors(ckpt_dir / "ve.safetensors")
        )
        conditioner = conditioner.to(device).eval()
        # Inference only: with no parameter requiring grad, no op can build an autograd graph, so
        # nothing a server caches (voices, prefix K/V) can hold one, in inference mode or not.
        for module in (t3, s3gen, conditioner):
            module.requires_grad_(False)
        del s3gen_state
        tokenizer = TextTokenizer.from_dir(ckpt_dir)
        if tokenizer.vocab_size > t3.config.text_vocab:
            raise CheckpointError(
                f"tokenizer has {tokenizer.vocab_size} ids, T3's text embedding {t3.config.text_vocab} rows"
            )
        default_voice = Voice.from_builtin(ckpt_dir / "conds.pt")
        return cls(t3, s3gen, conditioner, tokenizer, default_voice, checkpoint.model_id, device)

    def prepare_voice(
        self, audio: bytes | ReferenceAudio | np.ndarray, sample_rate: int | None = None
    ) -> Voice:
        """A voice from a reference clip: file bytes (wav/flac/ogg/mp3), a ReferenceAudio, or an array."""
        if isinstance(audio, bytes):
            reference = decode_reference_audio(audio)
        elif isinstance(audio, ReferenceAudio):
            reference = audio
        else:
            if sample_rate is None:
                raise TTSInputError("an audio array needs its sample_rate", "sample_rate")
            reference = reference_from_array(audio, sample_rate)
        return self.prepare_voices([reference])[0]

    @torch.inference_mode()
    def prepare_voices(self, references: Sequence[ReferenceAudio]) -> list[Voice]:
        """Conditionals of several clips, batched where that is exact."""
        conditionals = self.conditioner.condition([ref.wav_24k for ref in references])
        return [
            Voice(self.voice_id(ref.id), cond).to(self.device)
            for ref, cond in zip(references, conditionals, strict=True)
        ]

    def voice_id(self, reference_id: str) -> str:
        """The id of the voice this model prepares from the reference ``reference_id`` names."""
        return hashlib.sha256(f"{reference_id}:{self.model_id}".encode()).hexdigest()

    @property
    def max_text_tokens(self) -> int:
        """The longest text (in tokens, after normalisation) one request may carry."""
        return self.tokenizer.max_length

    def text_tokens(self, text: str, field: str = "text") -> list[int]:
        """Normalised, tokenised text; empty or over-long text is refused with a clear error."""
        if not text or not text.strip():
            raise EmptyTextError("text is empty", field)
        ids = self.tokenizer.encode(normalize_text(text))
        if len(ids) > self.max_text_tokens:
            raise TextTooLongError(
                f"text is {len(ids)} tokens; one request takes at most {self.max_text_tokens} "
                "(split long text into sentences, as the Serve ingress does)",
                field,
            )
        return ids

    def jobs(self, requests: Sequence[TTSRequest]) -> list[Job]:
        """Tokenise every request's text and fix its seed and voice before any model work."""
        jobs = []
        for request in requests:
            seed = request.sampling.seed
            jobs.append(
                Job(
                    request=request,
                    seed=seed if seed is not None else secrets.randbits(63),
                    voice=request.voice.to(self.device) if request.voice is not None else self.default_voice,
                    text_tokens=torch.tensor(self.text_tokens(request.text), dtype=torch.long),
                )
            )
        return jobs

    def _t3(self, jobs: Sequence[Job], ignore_stop_token: bool) -> list[torch.Tensor]:
        return generate_tokens(self.t3, [job.t3_request() for job in jobs], ignore_stop_token)

    def vocode_jobs(self, jobs: Sequence[Job], speech_tokens: Sequence[torch.Tensor]) -> list[np.ndarray]:
        # A row with no speech tokens (it drew nothing but stop tokens) is vocoded too, as upstream
        # vocodes its 3 appended silence tokens: 120 ms of the voice's silence.
        s3gen_requests = [job.s3gen_request(tokens) for job, tokens in zip(jobs, speech_tokens, strict=True)]
        return [wav.float().cpu().numpy() for wav in self.s3gen.generate(s3gen_requests)]

    @torch.inference_mode()
    def speech_tokens(
        self, requests: Sequence[TTSRequest], ignore_stop_token: bool = False
    ) -> list[torch.Tensor]:
        """The T3 stage alone: each request's speech tokens (25 per second of audio)."""
        return self._t3(self.jobs(requests), ignore_stop_token) if requests else []

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[TTSRequest], watermark: bool = True, ignore_stop_token: bool = False
    ) -> list[np.ndarray]:
        """Float32 mono 24 kHz audio for each request, all requests in one T3 and one S3Gen batch.

        A request's audio is 960 samples per speech token plus 3 tokens of trailing silence.
        ``ignore_stop_token`` makes every request run to its ``max_new_tokens`` (for benchmarks).
        """
        if not requests:
            return []
        jobs = self.jobs(requests)
        wavs = self.vocode_jobs(jobs, self._t3(jobs, ignore_stop_token))
        return [self.watermark(wav) for wav in wavs] if watermark else wavs

    def watermark(self, wav: np.ndarray) -> np.ndarray:
        return apply_watermark(wav, self.sample_rate)

    def generate_batches(
        self, requests: Sequence[TTSRequest], batch_size: int, watermark: bool = True
    ) -> Iterable[list[np.ndarray]]:
        """``generate`` over consecutive batches of at most ``batch_size`` (lazy, for progress bars)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(requests), batch_size):
            yield self.generate(requests[start : start + batch_size], watermark=watermark)
