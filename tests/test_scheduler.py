"""course_lib.scheduler, batch_engine and workload: continuous batching serves every request exactly
once with the tokens it would get alone, leaks no KV block, rejects what can never run with a reason,
admits at every step; static batching waits for the batch; workloads are seeded and replayed in order."""

import math

import pytest
import torch

from course_lib.batch_engine import ContinuousBatchEngine, StaticBatchEngine, run_to_completion
from course_lib.generation import SamplingConfig, chat_input_ids
from course_lib.kv_cache import generate_cached
from course_lib.paged_kv import BlockManager
from course_lib.scheduler import Request, RequestStatus, Scheduler, rejection_reason
from course_lib.transformer import Transformer
from course_lib.workload import WorkloadConfig, WorkloadItem, make_workload, replay, to_requests
from tiny import tiny_transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A tiny random course Transformer (grouped-query attention) whose blocks decide the next token."""
    return tiny_transformer("qwen2", max_position=256, rope_theta=10_000.0)


def mixed(n: int = 10, seed: int = 1) -> list[tuple[list[int], int]]:
    """n (prompt, max_new_tokens) pairs of mixed lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length, new = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
        out.append((torch.randint(0, 300, (length,), generator=gen).tolist(), new))
    return out


def solo(model, prompt, new, **kwargs):
    return generate_cached(model, torch.tensor([prompt]), new, **kwargs)


def assert_served_once(engine, requests):
    ids = [r.request_id for r in engine.finished]
    assert len(ids) == len(set(ids)), "a request finished twice"
    assert sorted(ids) == sorted(r.request_id for r in requests if r.status is RequestStatus.FINISHED)
    assert not engine.has_unfinished()


# ---- continuous batching: invariants ---------------------------------------------------------

@pytest.mark.parametrize("num_blocks,max_batch", [(200, 4), (200, 16), (16, 6)])
def test_continuous_greedy_equals_solo_every_request_once_no_leak(model, num_blocks, max_batch):
    work = mixed()
    refs = [solo(model, p, n) for p, n in work]
    engine = ContinuousBatchEngine(model, num_blocks=num_blocks, block_size=4, max_batch=max_batch)
    requests = run_to_completion(engine, [Request(p, n) for p, n in work])
    assert [r.output_ids for r in requests] == refs
    assert all(r.status is RequestStatus.FINISHED and r.finish_reason == "length" for r in requests)
    assert_served_once(engine, requests)
    engine.blocks.check()
    assert engine.blocks.num_free == num_blocks and not engine.blocks.block_tables
    assert max(h.running for h in engine.history) <= max_batch
    if num_blocks == 16:  # 64 positions for 6 slots: the pool runs dry, so requests were preempted and recomputed
        assert sum(r.num_preemptions for r in requests) > 0


def test_blocks_are_never_held_twice_during_a_run(model):
    engine = ContinuousBatchEngine(model, num_blocks=20, block_size=4, max_batch=5)
    for p, n in mixed(12, seed=3):
        engine.add_request(Request(p, n))
    while engine.has_unfinished():
        engine.step()
        engine.blocks.check()
        for r in engine.scheduler.running:  # memory follows the actual length, under one block of slack
            reserved = r.num_tokens  # every token has its position; the newest is fed at the next step
            assert engine.blocks.num_tokens[r.request_id] == reserved
            assert len(engine.blocks.block_tables[r.request_id]) == engine.blocks.blocks_needed(reserved)


def test_impossible_requests_are_rejected_with_a_reason_and_the_rest_proceed(model):
    work = mixed(4)
    good = [Request(p, n) for p, n in work]
    bad = {"zero": Request([1, 2, 3], 0), "negative": Request([1, 2], -2), "empty": Request([], 5),
           "model": Request(list(range(200)), 100), "pool": Request(list(range(60)), 20)}
    engine = ContinuousBatchEngine(model, num_blocks=16, block_size=4, max_batch=4, max_model_len=256)
    queued = [engine.add_request(r) for r in good[:2] + list(bad.values()) + good[2:]]
    assert queued == [True, True] + [False] * len(bad) + [True, True]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in good] == [solo(model, p, n) for p, n in work]
    assert all(r.status is RequestStatus.REJECTED and not r.output_ids for r in bad.values())
    assert bad["zero"].finish_reason.startswith("rejected: max_new_tokens must be an integer >= 1, got 0")
    assert "got -2" in bad["negative"].finish_reason
    assert "prompt is empty" in bad["empty"].finish_reason
    assert "needs 299 positions; max_model_len is 256" in bad["model"].finish_reason
    assert "needs 20 KV blocks of 4 positions" in bad["pool"].finish_reason and "can never fit" in bad["pool"].finish_reason
    assert engine.rejected == list(bad.values())
    engine.blocks.check()


def test_rejection_reason_is_none_for_a_request_that_fits():
    assert rejection_reason(Request([1] * 10, 7), max_model_len=16, block_manager=BlockManager(4, 4)) is None
    assert "max_model_len is 15" in rejection_reason(Request([1] * 10, 7), max_model_len=15)


def test_stop_token_and_per_request_sampling(model):
    work = mixed(5, seed=2)
    stop = solo(model, *work[0])[2]
    greedy_stop = Request(work[0][0], work[0][1], stop_ids=frozenset([stop]))
    sampled = Request(work[1][0], 12, SamplingConfig(temperature=1.0, top_k=40), seed=7)
    others = [Request(p, n) for p, n in work[2:]]
    engine = ContinuousBatchEngine(model, num_blocks=100, block_size=4, max_batch=8)
    run_to_completion(engine, [greedy_stop, sampled] + others)
    assert greedy_stop.output_ids == solo(model, *work[0], stop_ids=[stop])
    assert greedy_stop.output_ids[-1] == stop and greedy_stop.finish_reason == "stop"
    assert sampled.output_ids == solo(model, work[1][0], 12, sampling=SamplingConfig(temperature=1.0, top_k=40),
                                      generator=torch.Generator().manual_seed(7))
    assert [r.output_ids for r in others] == [solo(model, p, n) for p, n in work[2:]]


def test_a_used_request_cannot_be_added_again(model):
    engine = ContinuousBatchEngine(model, num_blocks=10, block_size=4)
    r = run_to_completion(engine, [Request([1, 2, 3], 2)])[0]
    with pytest.raises(ValueError, match="already used"):
        engine.add_request(r)


def test_scheduler_preempts_the_newest_and_requeues_it_first():
    s = Scheduler(BlockManager(num_blocks=4, block_size=2), max_batch=4, max_model_len=64)
    old, new = Request([1, 2, 3, 4], 5), Request([5, 6, 7], 5)
    s.add(old)
    s.add(new)
    assert s.admit() == [old, new]  # 4 positions (2 full blocks) and 3 positions (2 blocks): pool empty
    old.output_ids.append(9)  # as if both had run a prefill: each now feeds one more token
    new.output_ids.append(9)
    old.num_computed, new.num_computed = 4, 3
    assert s.prepare_decode() == [old]  # old's next position needs a new block: new is pushed out
    assert new.status is RequestStatus.WAITING and new.num_preemptions == 1 and s.waiting[0] is new
    s.blocks.check()


# ---- continuous vs static: when a waiting request gets in ------------------------------------

def test_continuous_admits_as_soon_as_a_slot_frees_static_waits_for_the_batch(model):
    work = [([5, 6, 7], 25), ([8, 9], 2), ([10, 11, 12, 13], 3)]  # long, short, and a third that must wait
    runs = {}
    for name, engine in (("continuous", ContinuousBatchEngine(model, num_blocks=50, block_size=4, max_batch=2)),
                         ("static", StaticBatchEngine(model, max_batch=2))):
        requests = run_to_completion(engine, [Request(p, n) for p, n in work])
        assert [r.output_ids for r in requests] == [solo(model, p, n) for p, n in work]
        assert_served_once(engine, requests)
        runs[name] = requests
    long_, _, third = runs["continuous"]
    assert third.token_times[0] < long_.token_times[-1]  # got the short one's slot while the long one ran
    long_, _, third = runs["static"]
    assert third.token_times[0] > long_.token_times[-1]  # waited for the whole first batch


def test_static_engine_rejects_with_a_reason(model):
    engine = StaticBatchEngine(model, max_batch=4)
    bad, good = Request([1, 2], 0), Request([1, 2], 3)
    assert not engine.add_request(bad) and engine.add_request(good)
    while engine.has_unfinished():
        engine.step()
    assert "max_new_tokens must be an integer >= 1" in bad.finish_reason
    assert good.output_ids == solo(model, [1, 2], 3)


def test_static_engine_can_wait_to_fill_its_batch(model):
    """max_wait_s > 0: a request arriving shortly after the first joins its batch (one prefill for both);
    with max_wait_s = 0 the first runs alone and the second waits for it to finish."""
    workload = [WorkloadItem(0.0, (1, 2, 3), 6), WorkloadItem(0.05, (4, 5), 6)]
    waited = replay(StaticBatchEngine(model, max_batch=2, max_wait_s=0.5), workload).requests
    assert waited[0].token_times[0] == waited[1].token_times[0]  # same prefill forward
    eager = replay(StaticBatchEngine(model, max_batch=2), workload).requests
    assert eager[1].token_times[0] > eager[0].token_times[-1]


# ---- workloads and replay ---------------------------------------------------------------------

def test_workload_is_seeded_and_follows_its_distributions():
    cfg = WorkloadConfig(num_requests=2000, rate=4.0, prompt_len=(5, 9), output_len=(2, 50), seed=3)
    a, b = make_workload(cfg, vocab_size=100), make_workload(cfg, vocab_size=100)
    assert a == b and a != make_workload(WorkloadConfig(2000, 4.0, (5, 9), (2, 50), seed=4), vocab_size=100)
    arrivals = [w.arrival_s for w in a]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert arrivals[-1] / 1999 == pytest.approx(1 / 4.0, rel=0.1)  # mean gap 1 / rate
    assert {len(w.prompt_ids) for w in a} == set(range(5, 10))
    outs = [w.output_len for w in a]
    assert min(outs) == 2 and max(outs) == 50
    assert sum(o <= 10 for o in outs) > sum(o > 10 for o in outs)  # log-uniform: short replies dominate
    burst = make_workload(WorkloadConfig(5, math.inf, seed=0), prompt_pool=[[1, 2], [3]])
    assert all(w.arrival_s == 0 for w in burst) and all(w.prompt_ids in ((1, 2), (3,)) for w in burst)


def test_workload_config_checks():
    with pytest.raises(ValueError, match="rate must be > 0"):
        WorkloadConfig(rate=0)
    with pytest.raises(ValueError, match="output_len must be"):
        WorkloadConfig(output_len=(5, 2))
    with pytest.raises(ValueError, match="give vocab_size"):
        make_workload(WorkloadConfig())


@pytest.mark.parametrize("engine_kind", ["continuous", "static"])
def test_replay_serves_every_request_once_in_arrival_order(model, engine_kind):
    workload = make_workload(WorkloadConfig(num_requests=8, rate=40.0, prompt_len=(2, 20), output_len=(1, 12), seed=5),
                             vocab_size=300)
    engine = (ContinuousBatchEngine(model, num_blocks=40, block_size=4, max_batch=3) if engine_kind == "continuous"
              else StaticBatchEngine(model, max_batch=3))
    result = replay(engine, workload)
    assert [r.output_ids for r in result.requests] == [solo(model, list(w.prompt_ids), w.output_len) for w in workload]
    assert_served_once(engine, result.requests)
    for r, w in zip(result.requests, workload):
        assert r.arrival_time == pytest.approx(result.start + w.arrival_s)
        assert r.token_times[0] >= r.arrival_time  # nothing is served before it arrives
    summary = result.summary()
    assert summary["requests"] == 8 and summary["output_tokens"] == sum(w.output_len for w in workload)
    assert len(result.metrics) == 8 and all(m.ttft_s >= 0 for m in result.metrics)
    assert to_requests(workload)[0].request_id != result.requests[0].request_id  # fresh requests per replay


# ---- the real model ---------------------------------------------------------------------------

def test_real_model_batched_outputs_equal_solo(default_model):
    """SmolLM2-135M, greedy, chat prompts of different lengths: both engines give every request
    the tokens it gets alone (the KV-cached single-request loop)."""
    hf, tokenizer, _ = default_model
    model = Transformer.from_hf(hf)
    texts = ["What is the capital of France?", "Name three colours.",
             "Write a two-line poem about rain on a tin roof, please, in the style of an old sailor.",
             "Hi", "Explain in one sentence why the sky is blue."]
    prompts = [chat_input_ids(tokenizer, t)[0].tolist() for t in texts]
    new = [8, 4, 6, 5, 4]
    refs = [solo(model, p, n) for p, n in zip(prompts, new)]
    cont = run_to_completion(ContinuousBatchEngine(model, num_blocks=40, block_size=16, max_batch=3),
                             [Request(p, n) for p, n in zip(prompts, new)])
    assert [r.output_ids for r in cont] == refs
    static = run_to_completion(StaticBatchEngine(model, max_batch=5), [Request(p, n) for p, n in zip(prompts, new)])
    assert [r.output_ids for r in static] == refs


def test_abort_frees_blocks_and_slot_and_resume_requeues_at_the_front():
    blocks = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(blocks, max_batch=2, max_model_len=32)
    a, b, c = (Request(prompt_ids=[1, 2, 3], max_new_tokens=4) for _ in range(3))
    for r in (a, b, c):
        assert sched.add(r)
    assert sched.admit() == [a, b]
    assert sched.abort(a) and a.finish_reason == "abort" and a not in sched.finished
    assert blocks.num_free == 8 - len(blocks.block_tables[b.request_id])
    assert sched.abort(c) and list(sched.waiting) == []  # a waiting request holds no blocks
    assert not sched.abort(a)  # already gone
    blocks.check()
    d = Request(prompt_ids=[4, 5], max_new_tokens=4)
    d.output_ids.append(7)  # decoded elsewhere: comes back with its output kept
    sched.resume(d)
    assert sched.waiting[0] is d and sched.admit() == [d]
    with pytest.raises(ValueError, match="already scheduled"):
        sched.resume(d)
