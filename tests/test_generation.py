"""Sampling filters, seeded sampling, and the naive loop against transformers' generate."""

import json
import math
from pathlib import Path

import pytest
import torch

from course_lib.batching import sample_each_row
from course_lib.generation import (
    GREEDY_BELOW,
    SamplingConfig,
    apply_penalties,
    apply_temperature,
    chat_input_ids,
    filter_logits,
    forward_logits,
    generate_naive,
    min_p_filter,
    sample_next_token,
    stop_token_ids,
    stream_naive,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"
PARITY_PROMPTS = ("chat-01", "expl-02", "code-02")  # one that stops early, two that run to 32 tokens


def logits_of(probs) -> torch.Tensor:
    """Logits (1, V) whose softmax is `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(0)


def kept(logits: torch.Tensor) -> set[int]:
    """Indices a filter left finite in a (1, V) row."""
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def draws(logits: torch.Tensor, sampling: SamplingConfig, n: int, seed: int) -> torch.Tensor:
    """n independent samples from one (1, V) row, in one batched call."""
    g = torch.Generator().manual_seed(seed)
    return sample_next_token(logits.expand(n, -1), sampling, g)


class BigramModel(torch.nn.Module):
    """A stand-in model whose next-token logits depend only on the last token; returns a tensor
    (like the course Transformer), so it also exercises forward_logits' tensor path."""

    def __init__(self, vocab_size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g))
        # make token t's greedy successor (t + 1) % V, so greedy outputs are easy to predict
        with torch.no_grad():
            self.table[torch.arange(vocab_size), (torch.arange(vocab_size) + 1) % vocab_size] += 10
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return self.table[input_ids]  # (B, T, V)


# ---------------------------------------------------------------- SamplingConfig validation

@pytest.mark.parametrize("kwargs, reason", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be None or an integer >= 1"),
    (dict(top_k=2.5), "top_k must be None or an integer >= 1"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\)"),
])
def test_sampling_config_rejects_bad_values(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        SamplingConfig(**kwargs)


def test_sampling_config_greedy_and_frozen():
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.7).greedy
    with pytest.raises(AttributeError):
        SamplingConfig().temperature = 1.0


def test_filters_reject_bad_values():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        top_k_filter(x, 0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_filter(x, 0.0)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\)"):
        min_p_filter(x, 1.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        apply_temperature(x, -1.0)
    with pytest.raises(ValueError, match=r"logits must be \(B, V\)"):
        sample_next_token(torch.zeros(4), SamplingConfig())


# ---------------------------------------------------------------- temperature

def test_temperature_divides_logits_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(apply_temperature(logits, 2.0), logits / 2)

    def entropy(t):
        p = torch.softmax(apply_temperature(logits, t), -1)
        return -(p * p.log()).sum().item()

    assert entropy(0.5) < entropy(1.0) < entropy(2.0)


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_temperature_to_zero_is_greedy_argmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 1000, generator=g)  # continuous values: no exact ties
    sampling = SamplingConfig(temperature=temperature)
    got = sample_next_token(logits, sampling, torch.Generator().manual_seed(1))
    assert torch.equal(got, logits.argmax(-1))


# ---------------------------------------------------------------- every legal parameter is safe

def test_a_tiny_top_p_keeps_exactly_the_most_likely_token():
    # p below the tolerance used to keep nothing: every logit -inf, softmax NaN, multinomial raised.
    logits = logits_of(SHUFFLED)
    for p in (1e-6, 1e-9, 1e-300):
        assert kept(top_p_filter(logits, p)) == {int(logits.argmax())}
    got = sample_next_token(logits.repeat(64, 1), SamplingConfig(temperature=1.0, top_p=1e-9),
                            torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {int(logits.argmax())}


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, GREEDY_BELOW / 2])
def test_a_temperature_too_small_to_divide_by_samples_greedily(temperature):
    # 1e-40 is subnormal in fp32 and 5e-324 rounds to 0: dividing gave inf - inf = NaN.
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 30  # (64, 500)
    sampling = SamplingConfig(temperature=temperature)
    assert sampling.greedy
    assert torch.equal(sample_next_token(logits, sampling, torch.Generator().manual_seed(1)), logits.argmax(-1))
    assert torch.isfinite(filter_logits(logits, sampling)).all()


def test_no_legal_combination_of_parameters_leaves_nothing_to_sample():
    """Every filter keeps the most likely token, so each draw is a token with finite logit."""
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(3)) * 20
    logits[0, 5] = logits[0].max() + 50  # one row dominated by a single token
    for t in (1e-40, 1e-5, 0.3, 1.0, 2.0, 1e6):
        for top_p in (1e-12, 1e-7, 0.5, 1.0):
            for top_k in (None, 1, 3):
                for min_p in (0.0, 0.5, 0.999999):
                    sampling = SamplingConfig(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p)
                    got = sample_next_token(logits, sampling, torch.Generator().manual_seed(0))
                    assert got.shape == (8,) and bool((got >= 0).all() and (got < 300).all())
                    if top_k == 1 or top_p == 1e-12:
                        assert torch.equal(got, logits.argmax(-1)), sampling


def test_sample_each_row_keeps_a_rows_failure_to_itself():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = float("nan")  # a numerical fault in one request's forward
    sampled = SamplingConfig(temperature=1.0)
    for samplings in ([SamplingConfig()] * 3, [sampled] * 3):
        out = sample_each_row(logits, samplings, [torch.Generator().manual_seed(i) for i in range(3)])
        assert isinstance(out[1], FloatingPointError) and "not finite" in str(out[1])
        for i in (0, 2):  # the others: exactly what they draw alone with the same generator
            alone = sample_next_token(logits[i:i + 1], samplings[i], torch.Generator().manual_seed(i))
            assert out[i] == int(alone)


# ---------------------------------------------------------------- penalties and logprobs

def test_penalties_follow_openais_formula():
    # Hand-derived: token 2 appears twice, token 4 once. presence 0.5, frequency 0.25:
    # token 2 loses 0.5 + 2 * 0.25 = 1.0, token 4 loses 0.5 + 0.25 = 0.75, the rest nothing.
    logits = torch.zeros(6)
    out = apply_penalties(logits, [2, 4, 2], presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, 0.0, -1.0, 0.0, -0.75, 0.0]
    assert apply_penalties(logits, [1, 1], presence=-1.0).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # encourages
    assert apply_penalties(logits, [], 2.0, 2.0) is logits and logits.tolist() == [0.0] * 6  # input untouched


def test_token_logprobs_are_the_models_log_softmax():
    # Hand-derived: logits (log 1, log 2, log 5) are probabilities 1/8, 2/8, 5/8.
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]])
    [(chosen, top)] = token_logprobs(logits, torch.tensor([1]), top=2)
    assert chosen == pytest.approx(math.log(2 / 8))
    assert [i for i, _ in top] == [2, 1] and [v for _, v in top] == pytest.approx([math.log(5 / 8), math.log(2 / 8)])
    assert token_logprobs(logits, torch.tensor([0]))[0][1] == []  # top=0: the chosen token only


# ---------------------------------------------------------------- top-k

def test_top_k_filter_keeps_exactly_the_k_largest():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    out = top_k_filter(logits, 5)
    for row, row_out in zip(logits, out):
        assert set(torch.isfinite(row_out).nonzero().flatten().tolist()) == set(row.topk(5).indices.tolist())
        kept_mask = torch.isfinite(row_out)
        assert torch.equal(row_out[kept_mask], row[kept_mask])  # survivors unchanged
    assert torch.equal(top_k_filter(logits, 100), logits) and torch.equal(top_k_filter(logits, None), logits)


def test_top_k_sampling_never_leaves_the_top_k():
    # temperature 3 flattens the distribution: without the filter ~90% of draws would fall outside
    # the top 5 of 50 tokens, so a broken filter cannot pass 5000 draws.
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    samples = draws(logits, SamplingConfig(temperature=3.0, top_k=5), 5000, seed=0)
    assert set(samples.tolist()) <= top5
    assert len(set(samples.tolist())) == 5  # and every one of the five does get drawn


# ---------------------------------------------------------------- top-p

# probabilities in shuffled order so that the filter must sort: sorted they are .5 .3 .15 .05
SHUFFLED = [0.15, 0.5, 0.05, 0.3]  # index 1 = .5, index 3 = .3, index 0 = .15, index 2 = .05


@pytest.mark.parametrize("p, expected", [
    (0.01, {1}),  # the top token is always kept
    (0.5, {1}),  # .5 alone reaches p exactly: stop there
    (0.5001, {1, 3}),
    (0.8, {1, 3}),  # .5 + .3 hits the boundary exactly
    (0.8001, {1, 3, 0}),
    (0.95, {1, 3, 0}),  # .5 + .3 + .15 hits the boundary exactly
    (0.96, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),  # p = 1 keeps everything
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(logits_of(SHUFFLED), p)) == expected
    assert kept(top_p_filter(logits_of(SHUFFLED).float(), p)) == expected  # same from fp32 logits


def test_top_p_keeps_everything_at_one_even_with_tiny_tail():
    probs = [0.999999, 1e-7, 9e-7]
    assert kept(top_p_filter(logits_of(probs), 1.0)) == {0, 1, 2}


def test_top_p_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(1, 30, generator=g, dtype=torch.float64) * 2
        p = torch.rand(1, generator=g).item() * 0.98 + 0.01
        probs = torch.softmax(logits[0], -1).tolist()
        order = sorted(range(30), key=lambda i: -probs[i])
        total, expected = 0.0, set()
        for i in order:  # smallest prefix of the sorted tokens whose mass reaches p
            expected.add(i)
            total += probs[i]
            if total >= p:
                break
        if abs(total - p) < 1e-5:
            continue  # too close to call in floating point; the exact boundary is tested above
        assert kept(top_p_filter(logits, p)) == expected


def test_top_p_filters_each_row_separately():
    rows = torch.cat([logits_of([0.5, 0.3, 0.2]), logits_of([0.2, 0.3, 0.5])])
    out = top_p_filter(rows, 0.6)
    assert torch.isfinite(out).tolist() == [[True, True, False], [False, True, True]]


# ---------------------------------------------------------------- min-p

def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    probs = [0.40, 0.25, 0.15, 0.09, 0.06, 0.05]
    assert kept(min_p_filter(logits_of(probs), 0.2)) == {0, 1, 2, 3}  # threshold .08
    assert kept(min_p_filter(logits_of(probs), 0.5)) == {0, 1}  # threshold .20
    assert kept(min_p_filter(logits_of(probs), 0.99)) == {0}  # the top token always survives
    assert kept(min_p_filter(logits_of(probs), 0.0)) == set(range(6))


def test_min_p_matches_the_definition_on_random_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 40, generator=g) * 3
    probs = torch.softmax(logits.double(), -1)
    for min_p in (0.01, 0.1, 0.3):
        expected = probs >= min_p * probs.max(-1, keepdim=True).values
        margin = (probs - min_p * probs.max(-1, keepdim=True).values).abs() > 1e-6
        assert torch.equal(torch.isfinite(min_p_filter(logits, min_p))[margin], expected[margin])


# ---------------------------------------------------------------- sampling as a whole

def test_filter_logits_applies_every_knob():
    logits = logits_of([0.4, 0.3, 0.2, 0.06, 0.04]).float()
    assert kept(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=4))) == {0, 1, 2, 3}
    assert kept(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=4, top_p=0.7))) == {0, 1}
    assert kept(filter_logits(logits, SamplingConfig(temperature=1.0, min_p=0.6))) == {0, 1}


def test_same_seed_same_samples_different_seed_different():
    logits = torch.zeros(1, 100)  # uniform: the draws are all randomness
    sampling = SamplingConfig(temperature=1.0)
    a, b, c = (draws(logits, sampling, 200, seed) for seed in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 200 uniform draws from 100 tokens: a full match is ~1e-400


def test_sampling_frequencies_match_softmax():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 40_000
    samples = draws(logits_of(probs.tolist()).float(), SamplingConfig(temperature=1.0), n, seed=0)
    freq = torch.bincount(samples, minlength=6).double() / n
    # Each frequency is a mean of n Bernoulli(p) draws: standard error sqrt(p(1-p)/n), at most
    # 0.0025 here. A 5-sigma band is wide enough that a correct sampler fails it with probability
    # below 1e-6 per token, yet narrow enough (<= 0.012) to catch e.g. sampling at temperature 1.2.
    tolerance = 5 * (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs.double()).abs() <= tolerance).all(), (freq, probs, tolerance)


def test_sampler_uses_the_generators_device():
    logits = torch.zeros(3, 10)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_next_token(logits, SamplingConfig(temperature=1.0), g1)
    b = sample_next_token(logits, SamplingConfig(temperature=1.0), g2)
    assert a.shape == (3,) and a.dtype == torch.long and torch.equal(a, b)


# ---------------------------------------------------------------- the naive loop (stand-in model)

def test_generate_naive_greedy_follows_the_model_and_respects_max_new_tokens():
    model = BigramModel(16)
    out = generate_naive(model, torch.tensor([[3, 4]]), max_new_tokens=6)
    assert out == [5, 6, 7, 8, 9, 10]
    assert model.calls == 6  # one full forward per new token


def test_generate_naive_recomputes_the_whole_sequence():
    seen = []

    class Recorder(BigramModel):
        def forward(self, input_ids):
            seen.append(input_ids.shape[1])
            return super().forward(input_ids)

    generate_naive(Recorder(16), torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert seen == [3, 4, 5, 6]


def test_stop_token_ends_generation_and_is_included():
    model = BigramModel(16)
    assert generate_naive(model, torch.tensor([[3]]), 10, stop_ids=[7]) == [4, 5, 6, 7]
    assert generate_naive(model, torch.tensor([[3]]), 10, stop_ids={4, 12}) == [4]
    assert generate_naive(model, torch.tensor([[3]]), 3, stop_ids=[9]) == [4, 5, 6]  # cap first


def test_seeded_sampled_generation_is_reproducible():
    model = BigramModel(16)
    sampling = SamplingConfig(temperature=5.0)  # flat enough that tokens vary
    runs = [generate_naive(model, torch.tensor([[0]]), 20, sampling, generator=torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert runs[0] != [(i + 1) % 16 for i in range(20)]  # it really sampled, not argmax


def test_forward_logits_handles_tensor_and_output_objects():
    class WithLogits(torch.nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": torch.ones(ids.shape[0], ids.shape[1], 3)})()

    assert forward_logits(WithLogits(), torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 3)
    assert forward_logits(BigramModel(5), torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 5)


@pytest.mark.parametrize("fn", [generate_naive, stream_naive])
@pytest.mark.parametrize("input_ids, max_new_tokens, reason", [
    (torch.tensor([[1, 2]]), 0, "max_new_tokens must be an integer >= 1"),
    (torch.tensor([[1, 2]]), -3, "max_new_tokens must be an integer >= 1"),
    (torch.zeros(1, 0, dtype=torch.long), 4, "input_ids is empty"),
    (torch.tensor([1, 2]), 4, r"input_ids must be a \(1, T\) tensor"),
    (torch.tensor([[1, 2], [3, 4]]), 4, "batch size must be 1"),
])
def test_generation_rejects_bad_input(fn, input_ids, max_new_tokens, reason):
    # stream_naive must raise at the call, before anyone iterates
    with pytest.raises(ValueError, match=reason):
        fn(BigramModel(8), input_ids, max_new_tokens)


# ---------------------------------------------------------------- the real default model

def load_prompts() -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, PROMPTS.read_text().splitlines())}


def test_prompts_file_is_well_formed():
    rows = list(map(json.loads, PROMPTS.read_text().splitlines()))
    assert len(rows) >= 30 and len({r["id"] for r in rows}) == len(rows)
    for category in ("chat", "explanation", "code", "grounded"):
        assert sum(r["category"] == category for r in rows) >= 8, category
    for r in rows:
        assert r["length"] in ("short", "long") and r["prompt"].strip()
        assert r["category"] in ("chat", "explanation", "code", "grounded")
        if r["category"] == "grounded":
            assert r["task"] in ("summarize", "edit", "extract")


@pytest.fixture(scope="module")
def greedy_outputs(default_model):
    """Naive greedy tokens (up to 32) and the prompt ids for the parity prompts."""
    model, tokenizer, _ = default_model
    prompts = load_prompts()
    stops = stop_token_ids(tokenizer)
    result = {}
    for pid in PARITY_PROMPTS:
        ids = chat_input_ids(tokenizer, prompts[pid]["prompt"])
        result[pid] = (ids, generate_naive(model, ids, 32, stop_ids=stops))
    return result


def test_stop_token_ids_of_the_default_tokenizer(default_model):
    _, tokenizer, _ = default_model
    stops = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stops
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert len(stops) == len(set(stops))


def test_chat_input_ids(default_model):
    _, tokenizer, _ = default_model
    ids = chat_input_ids(tokenizer, "Hello there")
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    text = tokenizer.decode(ids[0])
    assert "Hello there" in text and text.rstrip().endswith("<|im_start|>assistant")
    with_system = tokenizer.decode(chat_input_ids(tokenizer, "Hello there", system="Be brief.")[0])
    assert "Be brief." in with_system
    messages = [{"role": "user", "content": "Hello there"}]
    assert torch.equal(chat_input_ids(tokenizer, messages), ids)
    with pytest.raises(ValueError, match="prompt is empty"):
        chat_input_ids(tokenizer, "   ")
    with pytest.raises(ValueError, match="empty list of messages"):
        chat_input_ids(tokenizer, [])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        chat_input_ids(tokenizer, [{"content": "hi"}])


@pytest.mark.parametrize("pid", PARITY_PROMPTS)
def test_naive_greedy_matches_transformers_generate(default_model, greedy_outputs, pid):
    model, tokenizer, _ = default_model
    ids, ours = greedy_outputs[pid]
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
    ref = ref[0, ids.shape[1]:].tolist()
    assert ours == ref, (tokenizer.decode(ours), tokenizer.decode(ref))


def test_real_model_stops_at_im_end(default_model, greedy_outputs):
    model, tokenizer, _ = default_model
    ids, out = greedy_outputs["chat-01"]  # "What is the capital of France?": a short reply
    assert len(out) < 32 and out[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out.count(out[-1]) == 1
    # any token can be a stop token: stopping on the reply's third token ends there
    assert generate_naive(model, ids, 32, stop_ids=[out[2]]) == out[: out.index(out[2]) + 1]


def test_stream_naive_yields_the_same_tokens_in_time_order(default_model, greedy_outputs):
    model, tokenizer, _ = default_model
    ids, out = greedy_outputs["chat-01"]
    streamed = list(stream_naive(model, ids, 32, stop_ids=stop_token_ids(tokenizer)))
    assert [token for token, _ in streamed] == out
    times = [t for _, t in streamed]
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert all(isinstance(t, float) and math.isfinite(t) for t in times)
