"""Reference tasks for T3 (runs in ``.venv-ref`` only): teacher forcing, greedy and timed decoding."""

from __future__ import annotations

import time

import torch
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS
from chatterbox.models.t3.modules.cond_enc import T3Cond
from ref_common import turbo_t3_config
from safetensors.torch import load_file

START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562


def load_t3_file(t3_file: str) -> T3:
    """Upstream's Turbo T3 loading, for a GPT-2 medium (Turbo) or GPT-2 small (Nano) file."""
    state_dict = load_file(t3_file)
    hp = turbo_t3_config()
    width = state_dict["tfmr.wpe.weight"].shape[1]
    if width == 768:  # upstream only ships GPT2_medium; Nano's backbone is GPT-2 small
        LLAMA_CONFIGS["GPT2_small"] = {
            **GPT2_MEDIUM_CONFIG,
            "n_embd": 768,
            "hidden_size": 768,
            "n_head": 12,
            "n_layer": 12,
        }
        hp.llama_config_name = "GPT2_small"
    t3 = T3(hp)
    t3.load_state_dict(state_dict)
    del t3.tfmr.wte
    return t3.eval()


def _cond(tensors: dict, case: str | int) -> T3Cond:
    # A fresh T3Cond per call: upstream caches the prompt embedding inside it.
    return T3Cond(
        speaker_emb=tensors[f"{case}.speaker_emb"][None],
        cond_prompt_speech_tokens=tensors[f"{case}.prompt"][None],
        emotion_adv=torch.full((1, 1, 1), 0.5),
    )


@torch.inference_mode()
def teacher_forced_and_greedy(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Per case: speech logits along forced tokens (one full forward), and greedy inference_turbo.

    Inputs per case ``c``: ``c.speaker_emb`` (S,), ``c.prompt`` (P,), ``c.text`` (Lt,), ``c.forced``
    (N,). Outputs: ``c.logits`` (N+1, V) (after START and after each forced token) and
    ``c.greedy`` (the tokens of inference_turbo with top_k=1 and ``max_gen_len=greedy_steps``).
    """
    torch.set_num_threads(params["threads"])
    t3 = load_t3_file(params["t3_file"])
    out = {}
    for case in params["cases"]:
        text = tensors[f"{case}.text"][None]
        forced = tensors[f"{case}.forced"]
        speech = torch.cat((torch.tensor([START_SPEECH_TOKEN]), forced))[None]
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=_cond(tensors, case), text_tokens=text, speech_tokens=speech
        )
        hidden = t3.tfmr(inputs_embeds=embeds)[0]
        out[f"{case}.logits"] = t3.speech_head(hidden[0, -speech.shape[1] :])
        out[f"{case}.greedy"] = t3.inference_turbo(
            _cond(tensors, case), text, top_k=1, max_gen_len=params["greedy_steps"]
        )[0]
    return out, {}


@torch.inference_mode()
def timed_sequential(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Time upstream's ``inference_turbo`` (fp32 on ``device``) on requests one at a time, stop disabled.

    Inputs per request ``i``: ``{i}.speaker_emb`` (S,), ``{i}.prompt`` (P,), ``{i}.text`` (Lt,). Each
    request samples ``tokens`` tokens (1 from the prefill + ``tokens - 1`` loop steps). Request 0 runs
    once untimed first, as the warm-up our side gets.
    """
    device = params["device"]
    t3 = load_t3_file(params["t3_file"]).to(device)
    torch.set_num_threads(params["threads"])
    with torch.no_grad():  # never sampling STOP keeps every request at exactly ``tokens`` tokens
        t3.speech_head.bias[STOP_SPEECH_TOKEN] = float("-inf")
    seconds, tokens = [], []
    # The same warm-up as our side gets: request 0 once, untimed (first-call allocations, kernels).
    t3.inference_turbo(
        _cond(tensors, 0).to(device=device),
        tensors["0.text"][None].to(device),
        max_gen_len=params["tokens"] - 1,
    )
    for i in range(params["requests"]):
        cond = _cond(tensors, i).to(device=device)
        text = tensors[f"{i}.text"][None].to(device)
        begin = time.perf_counter()
        speech = t3.inference_turbo(cond, text, max_gen_len=params["tokens"] - 1).cpu()
        seconds.append(time.perf_counter() - begin)
        tokens.append(speech.shape[1])
    return {}, {"seconds": seconds, "tokens": tokens}
