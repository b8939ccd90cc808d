"""Reference tasks for S3Gen (runs in ``.venv-ref`` only, through reference/oracle.py)."""

from __future__ import annotations

import time

import torch
from chatterbox.models.s3gen.const import S3GEN_SIL
from ref_common import load_s3gen


def inference(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Upstream ``S3Gen.inference`` once per case, each after ``torch.manual_seed(seed)``.

    Inputs per case k: ``speech_tokens_k`` (N,), ``prompt_tokens_k`` (P,), ``prompt_feat_k`` (T, 80),
    ``embedding_k`` (192,); params ``ckpt_dir``, ``seeds`` (one per case). The 3 silence tokens are
    appended as ``ChatterboxTurboTTS.generate`` does. Outputs per case: ``wav_k`` (480 L,), the
    encoder output ``encoder_k`` (2(P+N+3), 512), the CFM start ``flow_noise_k`` (80, 2(P+N+3)),
    the speech mel ``mel_k`` (80, L) and the HiFT excitation ``source_k`` (480 L,).
    """
    s3gen = load_s3gen(params["ckpt_dir"])
    captured: dict[str, torch.Tensor] = {}

    def keep_encoder(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        captured["encoder"] = output[0][0].clone()

    # Upstream calls the estimator and the vocoder through methods (no module hooks fire there).
    estimator, vocoder = s3gen.flow.decoder.estimator, s3gen.mel2wav
    estimator_forward, vocoder_inference = estimator.forward, vocoder.inference

    def estimator_keeping_start(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        captured.setdefault("flow_noise", x[0].clone())
        return estimator_forward(x, *args, **kwargs)

    def vocoder_keeping_mel(
        speech_feat: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        captured["mel"] = speech_feat[0].clone()
        return vocoder_inference(speech_feat, *args, **kwargs)

    s3gen.flow.encoder.register_forward_hook(keep_encoder)
    estimator.forward = estimator_keeping_start
    vocoder.inference = vocoder_keeping_mel

    out: dict[str, torch.Tensor] = {}
    for k, seed in enumerate(params["seeds"]):
        captured.clear()
        silence = torch.tensor([S3GEN_SIL] * 3, dtype=torch.long)
        speech_tokens = torch.cat([tensors[f"speech_tokens_{k}"].long(), silence])
        ref_dict = {
            "prompt_token": tensors[f"prompt_tokens_{k}"].long()[None],
            "prompt_token_len": torch.tensor([tensors[f"prompt_tokens_{k}"].numel()]),
            "prompt_feat": tensors[f"prompt_feat_{k}"].float()[None],
            "prompt_feat_len": None,
            "embedding": tensors[f"embedding_{k}"].float()[None],
        }
        torch.manual_seed(seed)
        wav, source = s3gen.inference(speech_tokens=speech_tokens, ref_dict=ref_dict, n_cfm_timesteps=2)
        out[f"wav_{k}"] = wav[0]
        out[f"source_{k}"] = source[0, 0]
        for name, value in captured.items():
            out[f"{name}_{k}"] = value
    return out, {}


def vocoder_voiced(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Upstream HiFT on given mels with every frame voiced (F0 predictor bias raised by ``f0_offset``).

    Inputs ``mel_k`` (80, L); params ``ckpt_dir``, ``seeds``, ``f0_offset``. Each case runs
    ``mel2wav.inference`` after ``torch.manual_seed(seed)``. Outputs ``f0_k`` (L,), ``source_k``
    (480 L,) and ``wav_k`` (480 L,) (no fade-in).
    """
    vocoder = load_s3gen(params["ckpt_dir"]).mel2wav
    with torch.no_grad():
        vocoder.f0_predictor.classifier.bias += params["f0_offset"]
    out: dict[str, torch.Tensor] = {}
    for k, seed in enumerate(params["seeds"]):
        mel = tensors[f"mel_{k}"].float()[None]
        torch.manual_seed(seed)
        wav, source = vocoder.inference(speech_feat=mel)
        out[f"wav_{k}"], out[f"source_{k}"] = wav[0], source[0, 0]
        with torch.inference_mode():
            out[f"f0_{k}"] = vocoder.f0_predictor(mel)[0]
    return out, {}


def benchmark(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Wall time of upstream ``S3Gen.inference`` per case, one case at a time (after a warm-up call).

    Inputs as for ``inference``; params ``ckpt_dir``, ``device``, ``threads``. Returns the seconds
    and the output samples of each case.
    """
    torch.set_num_threads(params["threads"])
    device = params["device"]
    s3gen = load_s3gen(params["ckpt_dir"]).to(device)
    silence = torch.tensor([S3GEN_SIL] * 3, dtype=torch.long)

    def run(k: int) -> int:
        speech_tokens = torch.cat([tensors[f"speech_tokens_{k}"].long(), silence]).to(device)
        ref_dict = {
            "prompt_token": tensors[f"prompt_tokens_{k}"].long()[None].to(device),
            "prompt_token_len": torch.tensor([tensors[f"prompt_tokens_{k}"].numel()]).to(device),
            "prompt_feat": tensors[f"prompt_feat_{k}"].float()[None].to(device),
            "prompt_feat_len": None,
            "embedding": tensors[f"embedding_{k}"].float()[None].to(device),
        }
        wav, _ = s3gen.inference(speech_tokens=speech_tokens, ref_dict=ref_dict, n_cfm_timesteps=2)
        wav = wav.cpu()  # waits for the device
        return wav.numel()

    run(0)  # warm-up at the measured size
    seconds, samples = [], []
    k = 0
    while f"speech_tokens_{k}" in tensors:
        start = time.perf_counter()
        samples.append(run(k))
        seconds.append(time.perf_counter() - start)
        k += 1
    return {}, {"seconds": seconds, "samples": samples}
