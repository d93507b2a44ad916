"""The `engine` bench suite: the whole engine against the naive loop. Built in notebooks/08_putting_it_together.ipynb.

    python -m course_lib bench --suite engine [--model M] [--device D] [--new-tokens N] [--json FILE]

One seeded mixed workload (notebook 06's make_workload: Poisson arrivals, the chat prompts of
data/prompts.jsonl short and long, log-uniform output lengths, each request asking for exactly
that many tokens) is replayed in real time through two course_lib.engine engines:
    naive loop   EngineConfig(kv_cache=False, batching=False): one request at a time, the whole
                 sequence recomputed for every new token (notebook 01);
    full engine  KV cache + continuous batching over paged blocks (notebooks 04 and 06), plus int8
                 weights (notebook 05) only where they do not slow a decode step down.
Ratios: engine_all_vs_naive_throughput = the engine's output tokens/s / the naive loop's (output
tokens over the wall time from the first arrival to the last token, same workload);
engine_vs_naive_p50_ttft = the naive loop's median TTFT / the engine's (> 1: the engine answers
sooner). The table also gives each engine's TTFT and TPOT percentiles.

int8 is decided by measurement on the device at hand: one decode step at the engine's batch size
is timed with the float weights and with int8 (interleaved, best of two rounds each); int8 joins the
engine only if its step is no slower. Our int8 layers turn their codes back into floats before each
matmul (time spent) but read a quarter of the bytes (time saved where memory bandwidth limits), so
the answer differs between machines and even between a busy and a quiet CPU; the timings and the
choice are in the record's settings. Speculative decoding stays out: a verify pass serves one
sequence, so the engine speculates only while it holds a single request, which under a stream of
overlapping requests is rare (the spec suite measures speculation at batch 1).
"""

from __future__ import annotations

import copy


from course_lib.bench.batch import decode_step_seconds, prompt_pool
from course_lib.bench import BenchContext, SuiteResult, register
from course_lib.engine import Engine, EngineConfig
from course_lib.quant import INT8, quantize_model
from course_lib.transformer import Transformer
from course_lib.workload import ReplayResult, WorkloadConfig, WorkloadItem, make_workload, replay

BLOCK_SIZE = 16


def engine_workload(ctx: BenchContext) -> tuple[WorkloadConfig, list[WorkloadItem]]:
    """The suite's workload: 8 requests at 4/s on a CPU (32 at 16/s on a GPU), outputs of
    new_tokens/4 .. new_tokens tokens (log-uniform), prompts from the course's prompt set."""
    cpu = ctx.device.type == "cpu"
    n = ctx.new_tokens
    config = WorkloadConfig(num_requests=8 if cpu else 32, rate=4.0 if cpu else 16.0,
                            output_len=(max(2, n // 4), n), seed=0)
    return config, make_workload(config, prompt_pool=prompt_pool(ctx.tokenizer, ctx.info.vocab_size))


def int8_decision(model: Transformer, batch: int, context: int, rounds: int = 2) -> tuple[Transformer | None, dict]:
    """Time one decode step of `batch` rows at `context` with float and with int8 weights
    (interleaved, best of `rounds` medians each); return the int8 model if it is no slower, else None."""
    try:
        quantized = quantize_model(copy.deepcopy(model), INT8)
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # e.g. a device without the kernels
        return None, {"used": False, "why": f"int8 not tried: {type(exc).__name__}: {exc}"}
    times = {"float": [], "int8": []}
    for _ in range(rounds):  # alternate, so a slow patch on a shared machine hits both
        times["float"].append(decode_step_seconds(model, batch, context, steps=3, warmup=1))
        times["int8"].append(decode_step_seconds(quantized, batch, context, steps=3, warmup=1))
    float_s, int8_s = min(times["float"]), min(times["int8"])
    used = int8_s <= float_s
    return (quantized if used else None), {
        "used": used, "batch": batch, "context": context, "float_step_ms": float_s * 1e3, "int8_step_ms": int8_s * 1e3,
        "why": f"int8 decode step {int8_s * 1e3:.1f} ms vs float {float_s * 1e3:.1f} ms at batch {batch}: "
               + ("no slower, int8 used" if used else "slower, int8 left out")}


def replay_engines(engines: dict[str, Engine], workload: list[WorkloadItem], stop_ids=()) -> dict[str, ReplayResult]:
    """Warm each engine up, then replay the same workload through each in turn (real time)."""
    results = {}
    for label, engine in engines.items():
        engine.warmup()
        results[label] = replay(engine, workload, stop_ids=stop_ids)
    return results


ENGINE_COLUMNS = [("engine", "engine"), ("requests", "requests"), ("duration_s", "time (s)"),
                  ("output_tokens", "output (tokens)"), ("throughput_tok_s", "output (tok/s)"),
                  ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"), ("tpot_p50_ms", "TPOT p50 (ms)"),
                  ("tpot_p99_ms", "TPOT p99 (ms)"), ("e2e_p50_ms", "E2E p50 (ms)"), ("max_waiting", "max queue")]


@register("engine")
def engine_suite(ctx: BenchContext) -> SuiteResult:
    """The naive loop and the full engine (KV cache + continuous batching, + int8 if not slower) on one workload."""
    model = Transformer.from_hf(ctx.model)
    config, workload = engine_workload(ctx)
    longest = max(len(w.prompt_ids) + w.output_len for w in workload)
    max_len = -(-longest // BLOCK_SIZE) * BLOCK_SIZE
    mean_context = sum(len(w.prompt_ids) + w.output_len // 2 for w in workload) // len(workload)
    int8_model, int8 = int8_decision(model, ctx.sizes.max_batch, mean_context)
    full = EngineConfig(quant="int8" if int8_model is not None else None, max_batch=ctx.sizes.max_batch,
                        block_size=BLOCK_SIZE, max_model_len=max_len)
    engines = {"naive loop": Engine(model, EngineConfig(kv_cache=False, batching=False, max_model_len=max_len)),
               full.label: Engine(int8_model or model, full)}
    runs = replay_engines(engines, workload)
    naive, engine = runs["naive loop"], runs[full.label]
    rows = [{"engine": label, **{k: v for k, v in run.summary().items() if k != "rejected"}} for label, run in runs.items()]
    same = sum(a.output_ids == b.output_ids for a, b in zip(naive.requests, engine.requests))
    n, e = rows[0], rows[1]
    ratios = {"engine_all_vs_naive_throughput": e["throughput_tok_s"] / n["throughput_tok_s"],
              "engine_vs_naive_p50_ttft": n["ttft_p50_ms"] / e["ttft_p50_ms"]}
    lengths = [len(w.prompt_ids) for w in workload]
    settings = {"engine": full.label, "max_batch": full.max_batch, "block_size": BLOCK_SIZE,
                "num_blocks": engines[full.label].batch.blocks.num_blocks, "max_model_len": max_len, "int8": int8,
                "speculative": "off: the engine speculates only while it holds one request",
                "workload": {"num_requests": config.num_requests, "rate_per_s": config.rate,
                             "prompt_tokens": [min(lengths), max(lengths)], "output_len": config.output_len,
                             "output_len_dist": "log-uniform", "output_tokens": sum(w.output_len for w in workload),
                             "seed": config.seed},
                "greedy_outputs_identical": f"{same}/{len(workload)}" + (" (int8 weights change some tokens)"
                                                                         if int8["used"] else ""),
                "throughput": "output tokens / (last token - first arrival), arrivals replayed in real time",
                "ttft": "from each request's scheduled arrival: time spent queued counts"}
    return SuiteResult(results=rows, ratios=ratios, settings=settings, columns=ENGINE_COLUMNS)
