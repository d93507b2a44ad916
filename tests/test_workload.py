"""course_lib.workload: traffic-shaped workloads. Bursty gaps keep their mean and spread as a gamma
law should; a shared system prompt opens every prompt; a conversation's later turns carry the whole
conversation (the engine's own answers included) and arrive a think time after the previous answer;
the trace file loads and scales as documented."""

import math
import statistics

import pytest
import torch

from course_lib.batch_engine import ContinuousBatchEngine
from course_lib.kv_cache import generate_cached
from course_lib.paths import data_path
from course_lib.workload import (
    TraceRow,
    WorkloadConfig,
    conversation_workload,
    load_trace,
    make_workload,
    replay,
    shared_prefix_workload,
    to_requests,
    trace_workload,
)
from tiny import tiny_transformer

TRACE = "traces/azure_llm_code_2023_head64.csv"


def gaps(items):
    return [b.arrival_s - a.arrival_s for a, b in zip(items, items[1:])]


def test_burstiness_keeps_the_mean_gap_and_sets_its_spread():
    """Gamma gaps of shape k: mean 1 / rate, coefficient of variation 1 / sqrt(k)."""
    for k in (0.25, 1.0, 4.0):
        g = gaps(make_workload(WorkloadConfig(4000, rate=5.0, burstiness=k, seed=1), vocab_size=10))
        assert statistics.fmean(g) == pytest.approx(0.2, rel=0.08)
        assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1 / math.sqrt(k), rel=0.1)
    with pytest.raises(ValueError, match="burstiness"):
        WorkloadConfig(burstiness=0)


def test_poisson_workloads_are_unchanged_by_the_burstiness_knob():
    cfg = WorkloadConfig(50, rate=3.0, seed=2)
    assert make_workload(cfg, vocab_size=100) == make_workload(WorkloadConfig(50, 3.0, seed=2, burstiness=1.0),
                                                               vocab_size=100)


def test_shared_prefix_workload():
    items = shared_prefix_workload(30, rate=2.0, vocab_size=100, system_len=40, message_len=(3, 5),
                                   output_len=(2, 9), num_system_prompts=2, seed=0)
    systems = {w.prompt_ids[:40] for w in items}
    assert len(systems) == 2 and all(43 <= len(w.prompt_ids) <= 45 for w in items)
    assert all(2 <= w.output_len <= 9 for w in items)


def test_conversations_replay_the_whole_context_and_wait_for_the_answer():
    model = tiny_transformer("qwen2", max_position=256, rope_theta=10_000.0)
    work = conversation_workload(num_users=2, turns=3, rate=50.0, vocab_size=300, system_len=8,
                                 message_len=(2, 4), output_len=(2, 5), think_s=0.02, seed=0)
    assert [w.follows for w in work] == [None, 0, 1, None, 3, 4]
    with pytest.raises(ValueError, match="replay"):
        to_requests(work)
    engine = ContinuousBatchEngine(model, num_blocks=60, block_size=4, max_batch=4, prefix_caching=True)
    result = replay(engine, work)
    reqs = result.requests
    for i, w in enumerate(work):
        r = reqs[i]
        if w.follows is None:
            assert r.prompt_ids == list(w.prompt_ids)
        else:
            prev = reqs[w.follows]
            assert r.prompt_ids == prev.prompt_ids + prev.output_ids + list(w.prompt_ids)
            assert r.arrival_time == pytest.approx(prev.token_times[-1] + 0.02)  # think time after the answer
        assert r.output_ids == generate_cached(model, torch.tensor([r.prompt_ids]), w.output_len)
    assert reqs[0].prompt_ids[:8] == reqs[3].prompt_ids[:8]  # one system prompt for every user
    assert engine.blocks.hit_tokens > 0


def test_trace_loads_in_order_and_scales_as_documented():
    rows = load_trace(data_path(TRACE))
    assert len(rows) == 63
    # First two lines of the file: 18:17:03.9799600, 4808, 10 and 18:17:04.0319600, 3180, 8
    assert rows[0] == TraceRow(0.0, 4808, 10)
    assert rows[1].time_s == pytest.approx(0.052) and rows[1].prompt_tokens == 3180
    assert all(a.time_s <= b.time_s for a, b in zip(rows, rows[1:]))
    items = trace_workload(rows[:2], vocab_size=50, token_scale=1 / 16, time_scale=10.0, max_prompt=250, max_output=9)
    assert [len(w.prompt_ids) for w in items] == [250, 199]  # 4808 / 16 = 300.5 -> capped; 3180 / 16 = 198.75
    assert [w.output_len for w in items] == [9, 8]
    assert [w.arrival_s for w in items] == pytest.approx([0.0, 0.52])
    assert trace_workload(rows[:2], 50, seed=3) == trace_workload(rows[:2], 50, seed=3)
