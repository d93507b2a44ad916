"""course_lib.kv_cache: cached generation equals the naive loop and transformers, prefix caching,
overflow errors, the KV memory formula."""

import pytest
import torch


from course_lib.generation import SamplingConfig, chat_input_ids, generate_naive
from course_lib.bench.kv import estimate_naive_seconds, long_system_prompt, shared_prefix
from course_lib.kv_cache import (
    KVCache,
    PrefixCache,
    decode_step,
    generate_cached,
    kv_cache_bytes,
    prefill,
    stream_cached,
)
from course_lib.models import PRESETS, hf_config
from course_lib.roofline import kv_bytes_per_position
from course_lib.transformer import ModelConfig, Transformer
from tiny import FAMILIES, tiny_transformer

STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def tiny(name: str) -> Transformer:
    """A tiny random course Transformer of one family (see tests/tiny.py)."""
    return tiny_transformer(name)


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def real(default_model):
    hf, tokenizer, _ = default_model
    return hf, Transformer.from_hf(hf), tokenizer


# ---- equivalence: cached == naive, cached == transformers -----------------------------------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tiny_cached_greedy_equals_naive_for_128_tokens(name):
    model = tiny(name)
    ids = prompt(12)
    naive = generate_naive(model, ids, 128)
    assert len(set(naive)) > 10, "a degenerate model repeating one token would prove little"
    assert generate_cached(model, ids, 128) == naive
    assert generate_cached(model, ids, 128, static=True) == naive


def test_real_cached_greedy_equals_transformers_generate_for_128_tokens(real):
    hf, model, tokenizer = real
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert len(ref) == 128, "the reference stopped early: pick a prompt that runs 128 tokens"
    assert generate_cached(model, ids, 128, stop_ids=[tokenizer.eos_token_id]) == ref


def test_real_cached_greedy_equals_naive_short_prompt(real):
    _, model, tokenizer = real
    ids = chat_input_ids(tokenizer, "Name three colours.")
    assert generate_cached(model, ids, 20) == generate_naive(model, ids, 20)


def test_seeded_sampling_gives_the_same_tokens_cached_and_naive():
    model = tiny("qwen2")
    ids = prompt(10, seed=1)
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95)
    naive = generate_naive(model, ids, 64, sampling, generator=torch.Generator().manual_seed(7))
    cached = generate_cached(model, ids, 64, sampling, generator=torch.Generator().manual_seed(7))
    greedy = generate_cached(model, ids, 64)
    assert cached == naive
    assert cached != greedy, "sampling at temperature 0.9 should leave the greedy path"


def test_stop_token_is_included_and_ends_generation():
    model = tiny("smollm2")
    ids = prompt(8, seed=2)
    full = generate_cached(model, ids, 40)
    stop = full[15]
    out = generate_cached(model, ids, 40, stop_ids=[stop])
    assert out == full[:full.index(stop) + 1]
    assert out == generate_naive(model, ids, 40, stop_ids=[stop])


def test_stream_yields_each_token_as_soon_as_its_forward_ran():
    """A stream computes lazily: the k-th token is yielded after exactly k forwards (one prefill,
    then one decode each), not after all of them; so its time stamp is that token's. (Checking that
    perf_counter values come out sorted could not fail: the clock is monotonic.)"""
    model = tiny("llama")
    forwards = []
    hook = model.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[1]))
    try:
        stream = stream_cached(model, prompt(5), 6)
        assert forwards == []  # nothing runs before the first token is asked for
        tokens = []
        for k in range(1, 7):
            token, when = next(stream)
            tokens.append(token)
            assert len(forwards) == k and isinstance(when, float)
        assert forwards == [5, 1, 1, 1, 1, 1]  # the prompt once, then one new token per forward
    finally:
        hook.remove()
    assert tokens == generate_cached(model, prompt(5), 6)
    assert not torch.is_inference_mode_enabled()


# ---- the cache itself ----------------------------------------------------------------------

def test_prefill_then_decode_logits_match_full_forward():
    model = tiny("smollm2")
    ids = prompt(20, seed=3)
    cache = KVCache.for_model(model, 20)
    with torch.inference_mode():
        full = model(ids)  # (1, 20, V)
        steps = [prefill(model, ids[:, :13], cache)]
        for t in range(13, 20):
            steps.append(decode_step(model, ids[:, t:t + 1], torch.tensor([t]), cache))
    got = torch.stack(steps, dim=1)  # (1, 8, V): logits at positions 12..19
    assert (got - full[:, 12:]).abs().max() <= 1e-4


def test_static_cache_keeps_shapes_fixed():
    model = tiny("qwen2")
    cfg = model.config
    cache = KVCache.for_model(model, 32, static=True)
    k = torch.randn(1, cfg.num_kv_heads, 3, cfg.head_dim)
    k_all, _ = cache.update(0, torch.tensor([4, 5, 6]), k, k)
    assert k_all.shape == (1, cfg.num_kv_heads, 32, cfg.head_dim)
    assert torch.equal(k_all[:, :, 4:7], k) and k_all[:, :, :4].abs().sum() == 0
    dyn = KVCache.for_model(model, 32)
    assert dyn.update(1, torch.tensor([4, 5, 6]), k, k)[0].shape[2] == 7  # positions 0..6


def test_static_update_traces_as_one_graph():
    """The static write reads nothing back to the host and keeps shapes fixed, so torch.compile can
    capture it whole (fullgraph=True raises on any graph break) - what CUDA graphs need."""
    model = tiny("llama")
    cfg = model.config
    cache = KVCache.for_model(model, 16, static=True)
    k = torch.randn(1, cfg.num_kv_heads, 1, cfg.head_dim)
    update = torch.compile(cache.update, backend="eager", fullgraph=True)
    try:
        out_k, out_v = update(0, torch.tensor([3]), k, 2 * k)
    finally:
        torch._dynamo.reset()
    assert out_k.shape == (1, cfg.num_kv_heads, 16, cfg.head_dim)
    assert torch.equal(cache.k[0, :, :, 3:4], k) and torch.equal(cache.v[0, :, :, 3:4], 2 * k)


def test_overflow_raises_instead_of_truncating():
    model = tiny("llama")
    ids = prompt(10)
    with pytest.raises(ValueError, match=r"KV cache too short.*needs max_len >= 29, got 20"):
        generate_cached(model, ids, 20, max_len=20)
    assert len(generate_cached(model, ids, 20, max_len=29)) == 20  # exactly enough
    cache = KVCache.for_model(model, 12)
    k = torch.zeros(1, model.config.num_kv_heads, 1, model.config.head_dim)
    with pytest.raises(ValueError, match=r"KV cache overflow: position 12 does not fit.*max_len=12"):
        cache.update(0, torch.tensor([12]), k, k)
    with pytest.raises(ValueError, match="overflow"):  # a decode step past the end, through the model
        with torch.inference_mode():
            prefill(model, ids, cache)
            decode_step(model, ids[:, :1], torch.tensor([12]), cache)
    with pytest.raises(ValueError, match="overflow"):
        KVCache.for_model(model, 12, static=True).update(0, torch.tensor([12]), k, k)


def test_bad_arguments_raise():
    model = tiny("llama")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_cached(model, prompt(4), 0)
    with pytest.raises(ValueError, match="empty"):
        generate_cached(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_position"):
        generate_cached(model, prompt(4), 4, max_len=10_000)
    with pytest.raises(ValueError, match=r"positions \(T,\)"):
        KVCache.for_model(model, 8).update(0, torch.zeros(2, 3, dtype=torch.long), None, None)


# ---- memory --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_memory_formula_is_exact(dtype):
    L, B, KV, S, D = 3, 2, 5, 17, 8
    cache = KVCache(L, B, KV, S, D, dtype=dtype)
    actual = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    size = torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes == actual == kv_cache_bytes(L, KV, D, S, B, size) == 2 * L * KV * D * S * B * size
    assert kv_cache_bytes(L, KV, D, S, B, size) == kv_bytes_per_position(L, KV, D, size) * S * B


def test_kv_memory_of_the_default_model():
    cfg = ModelConfig.from_hf(hf_config("smollm2-135m"))
    # 2 x 30 layers x 3 KV heads x 64 dims x 4 bytes = 46,080 bytes per token in fp32
    assert kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 1) == 46_080
    p = PRESETS["smollm2-135m"]
    no_gqa = kv_cache_bytes(p.num_layers, p.num_heads, p.hidden_size // p.num_heads, 1)
    assert no_gqa == 3 * 46_080  # 9 query heads: without GQA the cache is 3x larger


# ---- prefix caching ------------------------------------------------------------------------

def test_tiny_prefix_cached_equals_uncached():
    model = tiny("qwen2")
    system = prompt(40, seed=4)
    a, b = (torch.cat([system, prompt(6, seed=s)], dim=1) for s in (5, 6))
    cache = PrefixCache()
    cache.add(model, shared_prefix(a, b))
    assert cache.match(a) == cache.match(b) == shared_prefix(a, b).shape[1] >= 40
    for ids in (a, b):
        assert generate_cached(model, ids, 48, prefix_cache=cache) == generate_cached(model, ids, 48)
    assert cache.hit_tokens == 2 * cache.match(a)
    assert cache.match(prompt(46, seed=9)) == 0
    assert cache.nbytes == kv_cache_bytes(2, 2, 16, cache.match(a))


def test_prefix_equal_to_the_whole_prompt_still_prefills_one_token():
    model = tiny("llama")
    ids = prompt(16, seed=8)
    cache = PrefixCache()
    cache.add(model, ids)
    kv = KVCache.for_model(model, 24)
    assert cache.load(ids, kv) == 15
    assert generate_cached(model, ids, 8, prefix_cache=cache) == generate_naive(model, ids, 8)


def test_real_system_prompt_prefix_cached_equals_uncached(real):
    _, model, tokenizer = real
    system = long_system_prompt(tokenizer, 500)
    a = chat_input_ids(tokenizer, "How do I get a refund?", system=system)
    b = chat_input_ids(tokenizer, "Is the service down?", system=system)
    prefix = shared_prefix(a, b)
    assert prefix.shape[1] >= 500
    cache = PrefixCache()
    cache.add(model, prefix)
    assert cache.match(b) == prefix.shape[1]
    assert generate_cached(model, b, 24, prefix_cache=cache) == generate_cached(model, b, 24)


# ---- the naive-time estimate used by the kv suite ------------------------------------------

def test_estimate_naive_seconds_interpolates_linearly():
    steps = {10: 1.0, 20: 2.0, 30: 4.0}  # 0.1 s per token, then 0.2 s per token
    assert estimate_naive_seconds(steps, 10, 1) == pytest.approx(1.0)
    assert estimate_naive_seconds(steps, 10, 3) == pytest.approx(1.0 + 1.1 + 1.2)
    assert estimate_naive_seconds(steps, 29, 3) == pytest.approx(3.8 + 4.0 + 4.2)  # extended past 30
    with pytest.raises(ValueError, match="two or more"):
        estimate_naive_seconds({10: 1.0}, 10, 2)


def test_cached_logit_gap_is_rounding_error_and_catches_a_wrong_cache(monkeypatch):
    from course_lib import kv_cache
    from course_lib.kv_cache import cached_logit_gap

    model = tiny_transformer()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    tokens = [3, 8, 4, 6]
    assert cached_logit_gap(model, ids, tokens) < 1e-4
    assert cached_logit_gap(model.to(torch.bfloat16), ids, tokens) < 0.5
    model = model.float()
    real = kv_cache.decode_step
    # a decode step that writes its token one position too far (a classic off-by-one) must show
    monkeypatch.setattr(kv_cache, "decode_step", lambda m, t, pos, c: real(m, t, pos + 1, c))
    assert cached_logit_gap(model, ids, tokens) > 1e-3


# ---- the fast paths: last-position prefill, no mask for one query, a capturable decode step ------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_last_position_prefill_gives_the_full_forwards_next_token(name):
    """prefill runs the output head only for the last position; its logits are the full forward's
    last row, and the next token is the same."""
    model = tiny(name)
    ids = prompt(37, seed=5)
    with torch.inference_mode():
        full = model(ids)[:, -1]  # (1, V): the head over every position, keep the last
        got = prefill(model, ids, KVCache.for_model(model, 40))
    assert got.shape == full.shape
    assert (got - full).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_sliced_and_static_caches_give_the_same_decode_logits():
    """A sliced cache's single query sees every key it returns, so it runs without a mask; a static
    cache returns unwritten positions too, and its mask hides them. Both match the full forward."""
    model = tiny("smollm2")
    ids = prompt(24, seed=6)
    with torch.inference_mode():
        full = model(ids)
        out = {}
        for static in (False, True):
            cache = KVCache.for_model(model, 32, static=static)
            prefill(model, ids[:, :16], cache)
            out[static] = torch.cat([decode_step(model, ids[:, t:t + 1], torch.tensor([t]), cache)
                                     for t in range(16, 24)])  # (8, V)
    assert (out[False] - full[0, 16:]).abs().max() <= 1e-4
    assert (out[True] - full[0, 16:]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["smollm2", "qwen2"])
def test_decode_step_compiles_as_one_graph(name):
    """What CUDA graphs need, checked on the CPU: torch.compile(fullgraph=True) traces the whole
    decode step (fused projections, grouped attention, static cache write, mask) without a graph
    break - it raises on any - and the traced step gives the eager step's logits."""
    model = tiny(name)
    ids = prompt(10, seed=7)
    caches = [KVCache.for_model(model, 16, static=True) for _ in range(2)]
    step = torch.compile(decode_step, backend="eager", fullgraph=True)
    try:
        with torch.inference_mode():
            for cache in caches:
                prefill(model, ids, cache)
            token, pos = torch.tensor([[5]]), torch.tensor([10])
            eager = decode_step(model, token, pos, caches[0])
            traced = step(model, token, pos, caches[1])
            traced_next = step(model, token, pos + 1, caches[1])  # same shapes: no retrace needed
    finally:
        torch._dynamo.reset()
    assert (traced - eager).abs().max() <= 1e-5
    assert torch.isfinite(traced_next).all()
    assert torch.equal(caches[0].k[:, :, :, :11], caches[1].k[:, :, :, :11])
