"""course_lib.batching: left padding and per-sequence positions give, for every request of a static
batch, exactly the tokens it gets alone; waste accounting; the batch-size sweep's bookkeeping."""

import pytest
import torch

from course_lib.bench.batch import batch_sweep, roofline_step_seconds
from course_lib.batching import (
    PAD_POS,
    BatchKVCache,
    StaticBatch,
    generate_static,
    pad_batch,
    padding_mask,
    sample_rows,
)
from course_lib.generation import SamplingConfig, sample_next_token
from course_lib.kv_cache import generate_cached
from course_lib.transformer import Transformer
from tiny import tiny_transformer

def tiny(name: str = "qwen2") -> Transformer:
    """A tiny random course Transformer (see tests/tiny.py): plain multi-head or grouped-query attention."""
    return tiny_transformer(name, max_position=256)


def prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (1, n), generator=gen) for n in lengths]


# ---- padding, masks, positions --------------------------------------------------------------

def test_pad_batch_left_pads_with_own_positions():
    tokens, mask, pos = pad_batch([[5, 6, 7], [8], [1, 2]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert mask.tolist() == [[True, True, True], [False, False, True], [False, True, True]]
    assert pos.tolist() == [[0, 1, 2], [PAD_POS, PAD_POS, 0], [PAD_POS, 0, 1]]


def test_pad_batch_rejects_empty():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_batch([[1, 2], []])
    with pytest.raises(ValueError, match="at least one prompt"):
        pad_batch([])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_cacheless_padded_forward_needs_and_uses_the_mask(name):
    """Without a cache, keys are the tokens themselves: padding (position -1) would be visible to every
    query unless the attention mask hides it. With the mask, each row's last logits equal its solo run."""
    model = tiny(name)
    ps = prompts([7, 3, 11])
    tokens, mask, pos = pad_batch(ps)
    with torch.inference_mode():
        masked = model(tokens, pos, mask=padding_mask(mask))[:, -1]
        unmasked = model(tokens, pos)[:, -1]
        solo = torch.cat([model(p)[:, -1] for p in ps])
    torch.testing.assert_close(masked, solo, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked[1], solo[1], atol=1e-3)  # the padded row differs without the mask


def test_batch_cache_never_stores_padding():
    model = tiny()
    tokens, _, pos = pad_batch(prompts([2, 6]))
    cache = BatchKVCache.for_model(model, 8, batch_size=2)
    with torch.inference_mode():
        model(tokens, pos, kv_cache=cache)
    # row 0 has 2 real tokens: positions 2.. stay zero; the 4 padding writes went to the scratch slot
    assert cache.k[:, 0, :, 2:cache.max_len].abs().sum() == 0
    assert cache.k[:, 0, :, :2].abs().sum() > 0 and cache.k[:, 0, :, cache.max_len].abs().sum() > 0


def test_batch_cache_overflow_is_an_error():
    cache = BatchKVCache(1, 1, 1, 4, 2)
    with pytest.raises(ValueError, match="overflow: position 4"):
        cache.update(0, torch.tensor([[4]]), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    keys, _ = cache.update(0, torch.tensor([[3, PAD_POS]]), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert keys.shape == (1, 1, 4, 2)  # every real position, never the scratch slot


# ---- static batching == one at a time -------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_static_batch_greedy_equals_one_at_a_time(name):
    model = tiny(name)
    lengths, new = [5, 17, 1, 9, 30, 12], [9, 3, 14, 1, 6, 20]
    ps = prompts(lengths, seed=1)
    result = generate_static(model, ps, new)
    for p, n, out in zip(ps, new, result.outputs):
        assert out == generate_cached(model, p, n)
    assert result.steps == max(new)  # 1 prefill + (longest - 1) decodes: the batch waits for its longest
    assert result.padding_tokens == len(ps) * max(lengths) - sum(lengths)
    assert result.idle_row_steps == sum(max(new) - n for n in new)


def test_static_batch_stop_token_ends_only_its_row():
    model = tiny()
    ps = prompts([6, 8])
    ref = [generate_cached(model, p, 12) for p in ps]
    stop = ref[0][3]  # a token row 0 produces at step 4
    result = generate_static(model, ps, 12, stop_ids=[stop])
    for p, out in zip(ps, result.outputs):
        assert out == generate_cached(model, p, 12, stop_ids=[stop])
    assert result.outputs[0][-1] == stop and len(result.outputs[0]) <= 4


def test_static_batch_sampling_per_row_matches_solo_with_same_seed():
    model = tiny()
    ps = prompts([4, 9, 6])
    settings = [SamplingConfig(), SamplingConfig(temperature=1.0, top_k=50), SamplingConfig(temperature=0.8, top_p=0.9)]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = StaticBatch(model, ps, [8, 8, 8], settings, [(), (), ()], gens)
    while not batch.done:
        batch.step()
    for i, p in enumerate(ps):
        solo = generate_cached(model, p, 8, settings[i], generator=torch.Generator().manual_seed(10 + i))
        assert batch.outputs[i] == solo


def test_sample_rows_is_per_row_sample_next_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    s = SamplingConfig(temperature=1.0)
    got = sample_rows(logits, [s] * 3, [torch.Generator().manual_seed(i) for i in range(3)])
    want = [int(sample_next_token(logits[i:i + 1], s, torch.Generator().manual_seed(i))) for i in range(3)]
    assert got.tolist() == want
    assert sample_rows(logits, [SamplingConfig()] * 3, [None] * 3).tolist() == logits.argmax(-1).tolist()


def test_static_batch_rejects_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate_static(model, prompts([3, 4]), [2, 0])
    with pytest.raises(ValueError, match="one entry per row"):
        StaticBatch(model, prompts([3, 4]), [2], [SamplingConfig()] * 2, [()] * 2, [None] * 2)
    with pytest.raises(ValueError, match="max_position=256"):
        generate_static(model, prompts([250]), 10)


# ---- the batch-size sweep's bookkeeping (no timing asserted) ---------------------------------

def test_roofline_step_bounds():
    model = tiny()
    one = roofline_step_seconds(model, 1, 16, bandwidth_gb_s=10.0, tflops=1.0)
    many = roofline_step_seconds(model, 64, 16, bandwidth_gb_s=10.0, tflops=1.0)
    assert one["bound"] == "memory"
    assert many["compute_s"] == pytest.approx(64 * one["compute_s"])
    assert many["memory_s"] > one["memory_s"]  # every row reads its own KV cache


def test_batch_sweep_stops_at_the_memory_limit():
    model = tiny()
    full = batch_sweep(model, context=8, max_batch=4, memory_limit_bytes=2**30, steps=1, bandwidth_gb_s=10.0, tflops=1.0)
    assert [r["batch"] for r in full["rows"]] == [1, 2, 4]  # powers of two up to max_batch
    limit = int(full["rows"][1]["kv_cache_mb"] * 1e6)  # exactly what batch 2 needs
    out = batch_sweep(model, context=8, max_batch=64, memory_limit_bytes=limit, steps=1, bandwidth_gb_s=10.0, tflops=1.0)
    assert [r["batch"] for r in out["rows"]] == [1, 2]  # batch 4 would pass the limit
    assert out["flat_until_measured"] in (1, 2)
    assert out["weights_crossover_batch"] == pytest.approx(  # weight bytes / bandwidth = B * FLOPs / matmul rate
        roofline_step_seconds(model, 1, 0, 10.0, 1.0)["memory_s"] / roofline_step_seconds(model, 1, 8, 10.0, 1.0)["compute_s"])
