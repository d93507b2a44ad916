"""Chunked prefill and the mixed forward (course_lib.batch_engine): a token budget per step, long
prompts prefilled over several steps while the others keep decoding in the same forward, greedy
outputs equal to each request alone (with preemption too); the static-shape decode step traces
with torch.compile(fullgraph=True), i.e. without graph breaks or host syncs."""

import pytest
import torch

from course_lib.batch_engine import (
    ContinuousBatchEngine,
    paged_forward,
    padded_size,
    plan_forwards,
    row_width,
    run_to_completion,
)
from course_lib.kv_cache import generate_cached
from course_lib.paged_kv import PagedKVCache
from course_lib.scheduler import Request
from tiny import tiny_transformer


@pytest.fixture(scope="module")
def model():
    return tiny_transformer("qwen2", max_position=256, rope_theta=10_000.0)


def solo(model, prompt, new):
    return generate_cached(model, torch.tensor([prompt]), new)


def long_and_short(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 90, 5, 60, 2, 120, 7, 4]
    return [(torch.randint(0, 300, (n,), generator=gen).tolist(), int(torch.randint(2, 16, (1,), generator=gen)))
            for n in lengths]


def test_row_width_by_hand():
    # 7 decoding rows + a 64-token chunk at 200 keys: a row costs T + 2 tokens' work.
    # T=1: 71 rows x 3 = 213; T=2: 39 x 4 = 156; T=4: 23 x 6 = 138; T=8: 15 x 10 = 150.
    assert row_width([1] * 7 + [64], 200) == 4
    assert row_width([1, 1, 1], 500) == 1  # decode only: one token per row
    assert row_width([64], 100) == 64  # one prompt: one row of 64 (1 x 65) beats 64 rows of 1 (64 x 2)
    assert [padded_size(n) for n in (1, 3, 8, 9, 600)] == [1, 4, 8, 16, 600]


def test_plan_forwards_by_hand():
    # 7 decoders + a 64-token chunk, 200 keys each; a forward costs 25 + its rows.
    # One forward: 25 + 138 (T=4 above) = 163. Apart: decoders 25 + 7 x 3 = 46, the chunk 25 + 1 x 66 = 91: 137.
    assert plan_forwards([1] * 7 + [64], [200] * 8) == [(list(range(7)), 1), ([7], 64)]
    # 2 decoders + a 16-token chunk at 100 keys: one forward at T=2: 25 + (2 + 8) x 3 = 55;
    # apart: 25 + 2 x 2 + 25 + 1 x 17 = 71.
    assert plan_forwards([1, 1, 16], [100] * 3) == [([0, 1, 2], 2)]
    assert plan_forwards([1, 1], [40, 80]) == [([0, 1], 1)]


@pytest.mark.parametrize("budget,num_blocks,static", [(None, 200, False), (8, 200, False), (16, 200, True),
                                                      (33, 32, False)])
def test_chunked_outputs_equal_solo_with_preemption(model, budget, num_blocks, static):
    """Prompts of 2 to 120 tokens, four slots; budget 8 is the smallest allowed (max_batch 4 + 4);
    32 blocks of 4 positions (the 120-token prompt needs 31) force a preemption."""
    work = long_and_short()
    engine = ContinuousBatchEngine(model, num_blocks=num_blocks, block_size=4, max_batch=4, token_budget=budget,
                                   static_decode=static)
    requests = run_to_completion(engine, [Request(p, n) for p, n in work])
    assert [r.output_ids for r in requests] == [solo(model, p, n) for p, n in work]
    engine.blocks.check()
    assert engine.blocks.num_free == num_blocks
    if budget is not None:
        assert all(h.prefill_tokens + h.batch_rows <= budget for h in engine.history)
    if num_blocks == 32:
        assert sum(r.num_preemptions for r in requests) > 0


def test_a_long_prompt_does_not_stall_the_decoders(model):
    """One request decodes; a 100-token prompt arrives. Budget 16: each step feeds the decoder's token
    and 15 prompt tokens, so the prompt takes ceil(100 / 15) = 7 steps, and the decoder gets a token
    in every one of them. Without a budget the prompt is one step, the same step for the decoder."""
    prompt = list(range(1, 101))
    for budget, prefill_steps in ((16, 7), (None, 1)):
        engine = ContinuousBatchEngine(model, num_blocks=100, block_size=4, max_batch=2, token_budget=budget)
        short = Request([5, 6, 7], 40)
        engine.add_request(short)
        engine.step()  # short's prefill: it now decodes
        long_ = Request(prompt, 3)
        engine.add_request(long_)
        steps = []
        while not long_.output_ids:
            before = len(short.output_ids)
            engine.step()
            steps.append((engine.history[-1].prefill_tokens, len(short.output_ids) - before))
        assert len(steps) == prefill_steps
        assert [p for p, _ in steps] == ([15] * 6 + [10] if budget else [100])
        assert all(got == 1 for _, got in steps)  # the decoder kept its pace: one token per step
        while engine.has_unfinished():
            engine.step()
        assert long_.output_ids == solo(model, prompt, 3) and short.output_ids == solo(model, [5, 6, 7], 40)


def test_budget_must_leave_room_beside_the_decoders(model):
    with pytest.raises(ValueError, match="token_budget"):
        ContinuousBatchEngine(model, num_blocks=10, block_size=4, max_batch=8, token_budget=4)


def test_static_decode_pads_to_a_captured_size(model):
    """Five decoding requests run as a batch of 8 rows, the three padding rows writing to the scratch
    block: outputs are each request's own, and no real block is touched by padding."""
    work = [(list(range(i + 1, i + 4)), 6) for i in range(5)]
    engine = ContinuousBatchEngine(model, num_blocks=30, block_size=4, max_batch=5, static_decode=True)
    requests = run_to_completion(engine, [Request(p, n) for p, n in work])
    assert [r.output_ids for r in requests] == [solo(model, p, n) for p, n in work]


def test_batched_decode_traces_without_graph_breaks(model):
    """torch.compile(fullgraph=True) fails on any graph break (a .item(), a data-dependent shape, a
    Python branch on a tensor value): the decode forward has none, so a CUDA graph can replay it.
    Padded shapes: 4 rows (one padding), tables 4 blocks wide (scratch-padded)."""
    P = 4
    cache = PagedKVCache.for_model(model, num_blocks=16, block_size=P)
    prompts = [list(range(1, 9)), list(range(20, 31)), list(range(40, 45))]
    tables = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    with torch.inference_mode():  # prefill each prompt into its blocks (eager)
        for p, t in zip(prompts, tables):
            cache.bind([t])
            model(torch.tensor([p]), torch.arange(len(p))[None], kv_cache=cache)
    tokens = torch.tensor([[p[-1]] for p in prompts] + [[0]])  # (4, 1): the last prompt token fed again
    pos = torch.tensor([[len(p) - 1] for p in prompts] + [[-1]])
    block_tables = cache.table_tensor(tables + [[cache.scratch_block]], width=4)
    compiled = torch.compile(paged_forward, fullgraph=True, backend="eager")
    with torch.inference_mode():
        want = paged_forward(model, cache, tokens, pos, block_tables)
        got = compiled(model, cache, tokens, pos, block_tables)
    torch.testing.assert_close(got, want)
    refs = [model(torch.tensor([p]))[0, -1] for p in prompts]
    torch.testing.assert_close(got[:3], torch.stack(refs), rtol=1e-4, atol=1e-4)


def test_compiled_static_decode_gives_the_solo_outputs(model):
    """The engine's decode forward through torch.compile (the path CUDA graphs take on a GPU, here
    with the eager backend so CI stays fast) serves every request exactly what it gets alone."""
    work = long_and_short()[:4]
    engine = ContinuousBatchEngine(model, num_blocks=64, block_size=4, max_batch=4, token_budget=16,
                                   static_decode=True, decode_compile={"backend": "eager"})
    requests = run_to_completion(engine, [Request(p, n) for p, n in work])
    assert [r.output_ids for r in requests] == [solo(model, p, n) for p, n in work]
    with pytest.raises(ValueError, match="static_decode"):
        ContinuousBatchEngine(model, num_blocks=8, static_decode=False, decode_compile={"backend": "eager"})
