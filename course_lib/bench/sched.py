"""The `sched` bench suite: chunked prefill, prefix caching and goodput at an SLO. Built in notebooks/09_serving_real_traffic.ipynb.

    python -m course_lib bench --suite sched [--model M] [--device D] [--json FILE]

Each pair is replayed in real time through the same continuous engine, one feature switched, one
after the other in one run (same model, same seeded workload):
    chunked_prefill_itl_p99_gain      p99 inter-token latency without chunked prefill / with it, on a
                                      mix of short prompts with long answers (sent at once) and long
                                      prompts arriving one by one while those decode
    chunked_prefill_throughput_ratio  output tokens/s with / without, same run (what the chunks cost)
    prefix_cache_multiturn_ttft_gain  median TTFT without prefix caching / with it, on multi-turn
                                      conversations behind one shared system prompt
    prefix_cache_hit_rate             prompt tokens found in the cache / prompt tokens looked up
    goodput_at_slo                    requests/s meeting every objective (the settings name them) on
                                      shared-system-prompt traffic, both features on
Greedy outputs with and without each feature are compared token for token (settings; they must be
identical in fp32).
"""

from __future__ import annotations

import math
import random

from course_lib.batch_engine import ContinuousBatchEngine
from course_lib.bench import BenchContext, SuiteResult, register
from course_lib.engine import EngineConfig
from course_lib.loadgen import SLO, slo_report
from course_lib.measure import percentile
from course_lib.transformer import Transformer
from course_lib.workload import (
    WorkloadItem,
    conversation_workload,
    log_uniform,
    replay,
    shared_prefix_workload,
)

BLOCK_SIZE = 16
CPU_TOKEN_BUDGET = EngineConfig.token_budget  # tokens per step with chunked prefill on a CPU


def long_short_workload(vocab_size: int, num_requests: int, long_len: int, short_len: int,
                        output_len: tuple[int, int], every: int = 3, seed: int = 0) -> list[WorkloadItem]:
    """All at t = 0: every `every`-th prompt long_len random tokens, the others short_len; log-uniform outputs."""
    rng = random.Random(seed)
    return [WorkloadItem(0.0, tuple(rng.randrange(vocab_size) for _ in range(long_len if i % every == 1 else short_len)),
                         log_uniform(rng, *output_len)) for i in range(num_requests)]


def stall_workload(vocab_size: int, num_short: int, num_long: int, long_len: int, short_len: int = 32,
                   short_output: tuple[int, int] = (48, 64), long_output: tuple[int, int] = (4, 16),
                   gap_s: float = 1.0, seed: int = 0) -> list[WorkloadItem]:
    """Short prompts with long answers, all at t = 0, then long prompts with short answers arriving
    every gap_s seconds (from gap_s on) while the short ones decode: each long prefill lands on
    running streams. Random token ids, log-uniform output lengths."""
    rng = random.Random(seed)

    def prompt(n):
        return tuple(rng.randrange(vocab_size) for _ in range(n))

    shorts = [WorkloadItem(0.0, prompt(short_len), log_uniform(rng, *short_output)) for _ in range(num_short)]
    longs = [WorkloadItem(gap_s * (k + 1), prompt(long_len), log_uniform(rng, *long_output)) for k in range(num_long)]
    return shorts + longs


def engine_for(model, workload, max_batch: int, token_budget: int | None, prefix_caching: bool) -> ContinuousBatchEngine:
    """A continuous engine with room for max_batch of the workload's longest request."""
    longest = max(len(w.prompt_ids) + w.output_len for w in workload) + 256  # conversations grow
    return ContinuousBatchEngine(model, num_blocks=max_batch * -(-longest // BLOCK_SIZE), block_size=BLOCK_SIZE,
                                 max_batch=max_batch, token_budget=token_budget, prefix_caching=prefix_caching)


def pooled_itl(result) -> list[float]:
    return [g for m in result.metrics for g in m.itl_s]


def row(name: str, result, engine: ContinuousBatchEngine) -> dict:
    s = result.summary()
    itl = pooled_itl(result)
    return {"run": name, "requests": s["requests"], "duration_s": s["duration_s"],
            "throughput_tok_s": s["throughput_tok_s"], "ttft_p50_ms": s["ttft_p50_ms"],
            "ttft_p99_ms": s["ttft_p99_ms"], "itl_p50_ms": percentile(itl, 50) * 1e3 if itl else math.nan,
            "itl_p99_ms": percentile(itl, 99) * 1e3 if itl else math.nan,
            "prefill_tokens": sum(h.prefill_tokens for h in result.history),
            "hit_rate": engine.blocks.hit_rate}


def identical(a, b) -> str:
    return f"{sum(x.output_ids == y.output_ids for x, y in zip(a.requests, b.requests))}/{len(a.requests)}"


@register("sched")
def sched_suite(ctx: BenchContext) -> SuiteResult:
    """Chunked prefill on long + short prompts; prefix caching on conversations; goodput at an SLO."""
    model = Transformer.from_hf(ctx.model)
    cpu = ctx.device.type == "cpu"
    V, max_batch = ctx.info.vocab_size, ctx.sizes.max_batch
    budget = CPU_TOKEN_BUDGET if cpu else 512
    long_len = min(1024 if cpu else 4096, model.config.max_position // 2)  # the trace's median prompt: ~1.5k
    warm = long_short_workload(V, 2, 64, 8, (2, 2))
    replay(engine_for(model, warm, max_batch, budget, True), warm)  # one-time costs off the clock

    # 1. Chunked prefill: the stall a long prompt puts on every running stream, and what chunks cost.
    mix = stall_workload(V, max_batch - 2, 4 if cpu else 32, long_len, gap_s=2.0 if cpu else 0.2)
    runs = {}
    for name, b in (("whole prefill", None), (f"chunked prefill ({budget} tokens/step)", budget)):
        engine = engine_for(model, mix, max_batch, b, False)
        runs[name] = (replay(engine, mix), engine)
    (plain, e_plain), (chunked, e_chunked) = runs.values()
    rows = [row(n, r, e) for n, (r, e) in runs.items()]

    # 2. Prefix caching on conversations (chunked prefill on in both).
    talk = conversation_workload(num_users=5 if cpu else 48, turns=3, rate=2.0 if cpu else 16.0, vocab_size=V,
                                 system_len=192 if cpu else 1024, message_len=(16, 32), output_len=(8, 24),
                                 think_s=0.2, seed=1)
    talks = {}
    for name, caching in (("conversations, no prefix cache", False), ("conversations, prefix cache", True)):
        engine = engine_for(model, talk, max_batch, budget, caching)
        talks[name] = (replay(engine, talk), engine)
    (cold, e_cold), (warm_run, e_warm) = talks.values()
    rows += [row(n, r, e) for n, (r, e) in talks.items()]

    # 3. Goodput at an SLO set from this machine's own single-request times (so it means the same
    #    thing on any device): TTFT <= 4x a cold prefill of the longest prompt alone, TPOT <= 3x a
    #    lone decode step's ITL.
    traffic = shared_prefix_workload(16 if cpu else 256, rate=2.0 if cpu else 32.0, vocab_size=V,
                                     system_len=192 if cpu else 1024, message_len=(8, 32), output_len=(8, 32),
                                     burstiness=0.5, seed=2)
    lone = replay(engine_for(model, traffic[:1], max_batch, budget, False), traffic[:1]).metrics[0]
    slo = SLO(ttft_ms=round(4 * lone.ttft_s * 1e3), tpot_ms=round(3 * lone.tpot_s * 1e3), percentile=90)
    engine = engine_for(model, traffic, max_batch, budget, True)
    served = replay(engine, traffic)
    report = slo_report(served.metrics, len(traffic), served.duration_s, slo)
    rows.append({**row("shared system prompt, both features", served, engine),
                 "slo_attainment": report["slo_attainment"], "goodput_req_s": report["goodput_req_s"]})

    ratios = {"chunked_prefill_itl_p99_gain": rows[0]["itl_p99_ms"] / rows[1]["itl_p99_ms"],
              "chunked_prefill_throughput_ratio": rows[1]["throughput_tok_s"] / rows[0]["throughput_tok_s"],
              "prefix_cache_multiturn_ttft_gain": rows[2]["ttft_p50_ms"] / rows[3]["ttft_p50_ms"],
              "prefix_cache_hit_rate": e_warm.blocks.hit_rate,
              "goodput_at_slo": report["goodput_req_s"]}
    settings = {
        "max_batch": max_batch, "block_size": BLOCK_SIZE, "token_budget": budget,
        "chunked_workload": f"{max_batch - 2} prompts of 32 tokens at t=0 (48-64 output tokens), then "
                            f"{len(mix) - max_batch + 2} of {long_len} tokens (4-16 output tokens) one every "
                            f"{mix[-1].arrival_s / (len(mix) - max_batch + 2):g} s; random token ids, log-uniform outputs",
        "conversation_workload": f"{len(talk)} turns: 5 users x 3 turns, a shared 192-token system prompt, "
                                 "16-32-token messages, 8-24-token answers, 0.2 s think time" if cpu else
                                 f"{len(talk)} turns",
        "goodput_workload": f"{len(traffic)} requests, shared 192-token system prompt, gamma arrivals "
                            "(burstiness 0.5) at 2 req/s" if cpu else f"{len(traffic)} requests",
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "percentile": slo.percentile,
                "rule": "TTFT <= 4x the lone cold TTFT of one request, TPOT <= 3x its lone TPOT",
                "lone_ttft_ms": lone.ttft_s * 1e3, "lone_tpot_ms": lone.tpot_s * 1e3},
        "slo_attainment": report["slo_attainment"],
        "greedy_outputs_identical": {"chunked_vs_whole_prefill": identical(plain, chunked),
                                     "prefix_cache_vs_none": identical(cold, warm_run)},
        "preemptions": sum(r.num_preemptions for run, _ in list(runs.values()) + list(talks.values())
                           for r in run.requests),
        "order": "whole prefill, chunked, no cache, cache, one after the other in one process",
        "clock": "real wall time, arrivals replayed in real time"}
    columns = [("run", "run"), ("requests", "requests"), ("duration_s", "time (s)"),
               ("throughput_tok_s", "output (tok/s)"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
               ("itl_p50_ms", "ITL p50 (ms)"), ("itl_p99_ms", "ITL p99 (ms)"), ("prefill_tokens", "prefilled (tok)"),
               ("hit_rate", "hit rate")]
    return SuiteResult(results=rows, ratios=ratios, settings=settings, columns=columns)
