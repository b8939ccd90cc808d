"""T3 on the tiny checkpoint: loading, GPT-2 maths, batch equivalence, stopping and input checks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatterbox.engine import generate_tokens
from chatterbox.engine.kv_cache import SlotCache
from chatterbox.sampling import SamplingParams
from chatterbox.t3 import T3, T3Request
from chatterbox.t3.gpt2 import GPT2Config
from chatterbox.t3.sampler import process_logits, sample, seed_keys
from chatterbox.testing import FULL, NANO, t3_state_dict
from chatterbox.weights import CheckpointError, read_safetensors, subdict
from tests.model_probes import teacher_forced_logits
from tests.t3_weight_edits import stop_only_after_start

START, STOP = 6561, 6562
STOP_BIAS = 3.0  # makes the tiny random model sample STOP now and then, so rows end at different steps


@pytest.fixture(scope="module")
def t3_file(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint / "t3_turbo_v1.safetensors"


@pytest.fixture(scope="module")
def model(t3_file: Path) -> T3:
    return T3.from_file(t3_file)


@pytest.fixture(scope="module")
def stopping_model(t3_file: Path) -> T3:
    model = T3.from_file(t3_file)
    with torch.no_grad():
        model.speech_head.bias[STOP] += STOP_BIAS
    return model


def _requests(model: T3, sampling: list[SamplingParams]) -> list[T3Request]:
    """Requests with different voices, prompt lengths (0 to 375) and text lengths."""
    g = torch.Generator().manual_seed(1)
    prompt_lengths = (0, 12, 375, 100, 250, 40, 7, 300)
    return [
        T3Request(
            text_tokens=torch.randint(0, model.config.text_vocab, (3 + 7 * i,), generator=g),
            speaker_emb=torch.rand(model.config.speaker_dim, generator=g),
            prompt_speech_tokens=torch.randint(0, 6561, (prompt_lengths[i],), generator=g),
            sampling=params,
        )
        for i, params in enumerate(sampling)
    ]


MIXED_SAMPLING = [
    SamplingParams(seed=11, max_new_tokens=60),
    SamplingParams(temperature=1.3, top_k=50, seed=2**62 + 5, max_new_tokens=45),
    SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=2.0, seed=0, max_new_tokens=70),
    SamplingParams(top_k=1, seed=7, max_new_tokens=30),
    SamplingParams(top_p=1.0, repetition_penalty=1.0, seed=123456789, max_new_tokens=55),
]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_config_is_read_from_the_tensors(model: T3):
    cfg = model.config
    assert cfg.gpt2 == GPT2Config(width=128, layers=24, positions=8196)
    assert cfg.gpt2.heads == 2
    assert (cfg.speaker_dim, cfg.speech_vocab, cfg.max_prompt_tokens) == (64, 6563, 375)
    assert not hasattr(model.tfmr, "wte") and not hasattr(model, "text_head")


def test_backbone_dims_are_read_from_the_official_shapes():
    turbo = t3_state_dict(FULL, 50276, 0, device="meta")  # names and shapes only
    nano = t3_state_dict(NANO, 50276, 0, device="meta")
    turbo_config = GPT2Config.from_state_dict(subdict(turbo, "tfmr."))
    nano_config = GPT2Config.from_state_dict(subdict(nano, "tfmr."))
    assert turbo_config == GPT2Config(width=1024, layers=24, positions=8196)  # GPT-2 medium
    assert nano_config == GPT2Config(width=768, layers=12, positions=8196)  # GPT-2 small
    assert (turbo_config.heads, nano_config.heads) == (16, 12)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("text_head.weight"), "text_head.weight should have shape .* got missing"),
        (
            lambda sd: sd.update({"tfmr.wte.weight": torch.zeros(3, 128)}),
            r"tfmr.wte.weight .* got \(3, 128\)",
        ),
        (lambda sd: sd.pop("tfmr.h.3.mlp.c_fc.bias"), r"missing \['tfmr.h.3.mlp.c_fc.bias'\]"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
        (lambda sd: sd.update({"speech_head.bias": torch.zeros(5)}), r"speech_head.bias: file \(5,\)"),
    ],
)
def test_strict_loading_rejects_mismatches(t3_file: Path, edit, message: str):
    state_dict = read_safetensors(t3_file)
    edit(state_dict)
    with pytest.raises(CheckpointError, match=message):
        T3.from_state_dict(state_dict)


def _naive_logits(sd: dict[str, torch.Tensor], request: T3Request, forced: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out from the file's tensors (Conv1D: y = x @ W + b), one row, no cache."""
    width = sd["tfmr.wpe.weight"].shape[1]
    heads = width // 64
    x = torch.cat(
        (
            request.speaker_emb[None] @ sd["cond_enc.spkr_enc.weight"].T + sd["cond_enc.spkr_enc.bias"],
            sd["speech_emb.weight"][request.prompt_speech_tokens],
            sd["text_emb.weight"][request.text_tokens],
            sd["speech_emb.weight"][torch.cat((torch.tensor([START]), forced))],
        )
    )
    T = x.shape[0]
    x = x + sd["tfmr.wpe.weight"][:T]

    def ln(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(h, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def conv1d(h: torch.Tensor, name: str) -> torch.Tensor:
        return h @ sd[f"{name}.weight"] + sd[f"{name}.bias"]

    causal = torch.ones(T, T).tril().bool()
    for i in range(24):
        p = f"tfmr.h.{i}"
        q, k, v = conv1d(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(width, dim=1)
        q, k, v = (t.view(T, heads, 64).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(1, 2) / 8).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(0, 1).reshape(T, width), f"{p}.attn.c_proj")
        h = conv1d(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # gelu_new
        x = x + conv1d(h, f"{p}.mlp.c_proj")
    x = ln(x, "tfmr.ln_f")[-(forced.numel() + 1) :]
    return x @ sd["speech_head.weight"].T + sd["speech_head.bias"]


def test_logits_match_gpt2_written_out_from_the_file(model: T3, t3_file: Path):
    request = _requests(model, [SamplingParams()] * 2)[1]
    forced = torch.randint(0, 6561, (9,), generator=torch.Generator().manual_seed(0))
    ours = teacher_forced_logits(model, [request], [forced])[0]
    expected = _naive_logits(read_safetensors(t3_file), request, forced)
    assert ours.shape == (10, 6563)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_batched_teacher_forced_logits_equal_each_row_alone(model: T3):
    requests = _requests(model, MIXED_SAMPLING)
    g = torch.Generator().manual_seed(2)
    forced = [torch.randint(0, 6563, (n,), generator=g) for n in (20, 3, 0, 11, 16)]
    batched = teacher_forced_logits(model, requests, forced)
    for request, tokens, row in zip(requests, forced, batched, strict=True):
        alone = teacher_forced_logits(model, [request], [tokens])[0]
        assert row.shape == alone.shape == (tokens.numel() + 1, 6563)
        assert (row - alone).abs().max().item() <= 1e-5


def test_seeded_rows_sample_the_same_tokens_alone_or_batched(stopping_model: T3, monkeypatch):
    compactions = []
    move_row = SlotCache.move_row
    monkeypatch.setattr(
        SlotCache,
        "move_row",
        lambda self, src, dst, n: compactions.append(src) or move_row(self, src, dst, n),
    )
    requests = _requests(stopping_model, MIXED_SAMPLING)
    batched = generate_tokens(stopping_model, requests)
    assert compactions, "no row finished early enough to compact the batch"
    lengths = {len(tokens) for tokens in batched}
    assert len(lengths) >= 3 and max(lengths) > 8  # rows really stopped at different steps
    for request, tokens in zip(requests, batched, strict=True):
        assert torch.equal(generate_tokens(stopping_model, [request])[0], tokens)
    # Another batch composition (reordered, one row twice) changes nothing either.
    again = generate_tokens(stopping_model, [requests[3], requests[0], requests[0], requests[2]])
    for i, tokens in zip((3, 0, 0, 2), again, strict=True):
        assert torch.equal(tokens, batched[i])


def test_generation_follows_the_reference_sampling_rules(model: T3):
    """Replay each step from teacher-forced logits: the first draw penalises only START, later
    draws the row's own tokens; the noise step is the number of tokens drawn so far."""
    requests = _requests(model, MIXED_SAMPLING[:3])
    for request in requests:
        request.sampling = dataclasses.replace(request.sampling, repetition_penalty=3.0, max_new_tokens=25)
    generated = generate_tokens(model, requests)
    for request, tokens in zip(requests, generated, strict=True):
        assert tokens.numel() == 26  # nothing dropped, so step i drew tokens[i]
        logits = teacher_forced_logits(model, [request], [tokens])[0]
        p = request.sampling
        params = [torch.tensor([v]) for v in (p.temperature, p.top_k, p.top_p, p.repetition_penalty)]
        key = seed_keys(torch.tensor([p.seed]))
        seen = torch.zeros(1, 6563, dtype=torch.bool)
        seen[0, START] = True
        for step in range(tokens.numel()):
            scores = process_logits(logits[step : step + 1], seen, *params, candidates=p.top_k)
            assert sample(scores, key, torch.tensor([step])).item() == tokens[step].item()
            seen = seen if step else torch.zeros_like(seen)
            seen[0, tokens[step]] = True


def test_stop_token_ends_each_row_and_limits_hold(model: T3, stopping_model: T3):
    requests = _requests(model, [SamplingParams(seed=i, max_new_tokens=9 + i) for i in range(4)])
    # Without STOP ever winning, each row samples exactly max_new_tokens + 1 tokens.
    assert [t.numel() for t in generate_tokens(model, requests)] == [10, 11, 12, 13]
    stopped = generate_tokens(stopping_model, requests)
    unstopped = generate_tokens(stopping_model, requests, ignore_stop_token=True)
    for short, full in zip(stopped, unstopped, strict=True):
        assert short.dtype == torch.int64 and short.device.type == "cpu"
        assert (full < 6561).all() and (short < 6561).all()
        assert torch.equal(full[: short.numel()], short)  # same draws up to the stop
    assert sum(s.numel() for s in stopped) < sum(f.numel() for f in unstopped)


def test_a_first_stop_token_does_not_end_the_row(t3_file: Path):
    """As upstream's inference_turbo: STOP drawn first is fed back and the row goes on."""
    model = T3.from_file(t3_file)
    stop_only_after_start(dict(model.named_parameters()))
    requests = _requests(
        model, [SamplingParams(top_k=1, seed=0, max_new_tokens=30 + 5 * i) for i in range(3)]
    )
    for request, tokens in zip(requests, generate_tokens(model, requests), strict=True):
        assert tokens.numel() == request.sampling.max_new_tokens  # STOP + max_new_tokens, STOP dropped
        logits = teacher_forced_logits(model, [request], [torch.cat((torch.tensor([STOP]), tokens))])[0]
        assert logits[0].argmax() == STOP  # greedy: the first draw was STOP
        # ... and every later draw is the greedy token after STOP was fed back as the first input.
        assert torch.equal(logits[1:-1].argmax(dim=1), tokens)


def test_rows_past_their_own_run_stay_inside_the_position_table(t3_file: Path):
    """A row that fills the table to its last entry shares a batch with a row that runs longer."""
    state_dict = read_safetensors(t3_file)
    state_dict["tfmr.wpe.weight"] = state_dict["tfmr.wpe.weight"][:64]  # a short table, same code
    model = T3.from_state_dict(state_dict)
    full, short = _requests(
        model, [SamplingParams(seed=1, max_new_tokens=6), SamplingParams(seed=2, max_new_tokens=40)]
    )
    full.prompt_speech_tokens = torch.zeros(0, dtype=torch.long)
    full.text_tokens = torch.arange(56)  # 1 speaker + 56 text + 1 start + 6 new = all 64 positions
    batched = generate_tokens(model, [full, short], ignore_stop_token=True)
    assert [t.numel() for t in batched] == [7, 41]
    for request, tokens in zip((full, short), batched, strict=True):
        assert torch.equal(generate_tokens(model, [request], ignore_stop_token=True)[0], tokens)
    forced = [torch.arange(6), torch.arange(40)]
    for request, tokens, logits in zip(
        (full, short), forced, teacher_forced_logits(model, [full, short], forced), strict=True
    ):
        assert (logits - teacher_forced_logits(model, [request], [tokens])[0]).abs().max() <= 1e-5


def test_bf16_backbone_keeps_float32_logits(model: T3, t3_file: Path):
    half = T3.from_file(t3_file, dtype=torch.bfloat16)
    assert half.tfmr.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert half.speech_head.weight.dtype == torch.float32
    requests = _requests(model, MIXED_SAMPLING[:2])
    forced = [torch.arange(5), torch.arange(8)]
    low_logits = teacher_forced_logits(half, requests, forced)
    for low, full in zip(low_logits, teacher_forced_logits(model, requests, forced), strict=True):
        assert low.dtype == torch.float32
        assert (low - full).abs().max() < 0.1 * full.abs().max()
    assert [t.numel() for t in generate_tokens(half, requests, ignore_stop_token=True)] == [61, 46]


def test_unseeded_requests_draw_fresh_seeds(model: T3):
    requests = _requests(model, [SamplingParams(max_new_tokens=20)] * 2)
    assert not torch.equal(generate_tokens(model, requests[:1])[0], generate_tokens(model, requests[:1])[0])
    assert generate_tokens(model, []) == []


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("text_tokens", torch.zeros(0, dtype=torch.long), "request 0: text_tokens must be a non-empty 1-D"),
        ("text_tokens", torch.tensor([1, 10_000]), r"text token ids must be integers in \[0, 576\)"),
        ("text_tokens", torch.zeros(8193, dtype=torch.long), "text too long for the position table: .* 8196"),
        ("speaker_emb", torch.zeros(256), r"speaker_emb must have shape \(64,\), got \(256,\)"),
        ("prompt_speech_tokens", torch.tensor([5, 6561]), r"prompt speech token ids must be .* \[0, 6561\)"),
        ("prompt_speech_tokens", torch.tensor([-1]), "prompt speech token ids must be integers"),
        ("prompt_speech_tokens", torch.zeros(376, dtype=torch.long), "has 376 tokens, at most 375"),
    ],
)
def test_bad_requests_are_rejected(model: T3, field: str, value: torch.Tensor, message: str):
    request = _requests(model, [SamplingParams(max_new_tokens=5)])[0]
    setattr(request, field, value)
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, [request])
    with pytest.raises(ValueError, match=message):
        teacher_forced_logits(model, [request], [torch.zeros(3, dtype=torch.long)])


def test_position_budget_counts_new_tokens(model: T3):
    request = _requests(model, [SamplingParams(max_new_tokens=1000)])[0]
    request.text_tokens = torch.zeros(8196 - 1000 - 2, dtype=torch.long)  # no prompt: 1 + Lt + 1 + 1000
    assert model._check_request(0, request, 1000) is None
    request.text_tokens = torch.zeros(8196 - 1000 - 1, dtype=torch.long)
    with pytest.raises(ValueError, match="1 speaker \\+ 0 prompt \\+ 7195 text \\+ 1 start \\+ 1000 new"):
        generate_tokens(model, [request])


def test_teacher_forcing_checks_its_tokens(model: T3):
    request = _requests(model, [SamplingParams()])[0]
    with pytest.raises(ValueError, match="1 requests but 2 speech token sequences"):
        teacher_forced_logits(model, [request], [torch.zeros(1, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match=r"speech_tokens\[0\] must be 1-D with ids in \[0, 6563\)"):
        teacher_forced_logits(model, [request], [torch.tensor([6563])])
