"""Measuring batching: the `batch` bench suite and the batch-size sweep. Built in notebooks/06_batching.ipynb.

    python -m course_lib bench --suite batch [--model M] [--device D] [--json FILE]

Ratios, each measured side by side in one run:
    static_batch8_throughput_gain     output tok/s of 8 prompts as one static batch / the same 8 one at a time
    continuous_vs_static_throughput   output tok/s, one mixed-length Poisson workload through each engine
    continuous_vs_static_p99_ttft     static p99 TTFT / continuous p99 TTFT on that workload (> 1: continuous better)
    paged_vs_contiguous_kv_waste      unused KV slots with 16-token blocks / with a contiguous reservation of
                                      prompt + max_new_tokens per request (< 1: paging wastes less)
batch_sweep() is the part meant for a GPU: decode throughput against batch size up to a memory
limit, and the batch size where a step stops costing the same as at batch 1 (memory-bound),
measured and predicted by the roofline.
"""

from __future__ import annotations

import math
import time

import torch

from course_lib.batch_engine import ContinuousBatchEngine, StaticBatchEngine
from course_lib.batching import BatchKVCache, generate_static
from course_lib.bench import BenchContext, SuiteResult, register
from course_lib.paths import load_prompts
from course_lib.env import synchronize
from course_lib.generation import chat_input_ids
from course_lib.measure import median_time
from course_lib.paged_kv import kv_waste
from course_lib.roofline import kv_bytes_per_position, measure_bandwidth, measure_matmul_tflops
from course_lib.transformer import Transformer, bytes_per_token, flops_per_token
from course_lib.workload import WorkloadConfig, make_workload, replay


def decode_step_seconds(model, batch_size: int, context: int, steps: int = 5, warmup: int = 2) -> float:
    """Median seconds of one decode step for batch_size rows at position `context` (the cache holds
    zeros: the work does not depend on the values)."""
    device = next(model.parameters()).device
    cache = BatchKVCache.for_model(model, context + 1, batch_size)
    tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=device)  # (B, 1)
    pos = torch.full((batch_size, 1), context, device=device)  # (B, 1)
    with torch.inference_mode():
        return median_time(lambda: model(tokens, pos, kv_cache=cache).argmax(-1), device, steps, warmup)


def roofline_step_seconds(model, batch_size: int, context: int, bandwidth_gb_s: float, tflops: float) -> dict:
    """Lower bounds on one decode step: memory (weights once + every row's KV) and compute (FLOPs of B tokens)."""
    cfg = model.config
    element = next(model.parameters()).element_size()
    kv = kv_bytes_per_position(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, element) * context * batch_size
    memory_s = (bytes_per_token(cfg, element, 0) + kv) / (bandwidth_gb_s * 1e9)
    compute_s = batch_size * flops_per_token(cfg, context) / (tflops * 1e12)
    return {"memory_s": memory_s, "compute_s": compute_s, "bound": "memory" if memory_s >= compute_s else "compute"}


def batch_sweep(model, context: int = 128, max_batch: int = 1024, memory_limit_bytes: int | None = None,
                steps: int = 5, tolerance: float = 1.25, bandwidth_gb_s: float | None = None,
                tflops: float | None = None) -> dict:
    """Decode throughput at batch 1, 2, 4, ... (up to max_batch or until the KV cache and logits
    would pass memory_limit_bytes: default 80% of free GPU memory, or 4 GB on a CPU). Returns:
      rows                        - per batch: step time, tokens/s, the roofline's floor and bound;
      flat_until_measured         - the largest batch whose step stays within `tolerance` x the
                                    batch-1 step (measured: batching still free);
      compute_bound_from_roofline - the first batch whose roofline compute time passes its memory time
                                    (None: memory-bound at every batch tried; every row's KV read
                                    grows with the batch too, so long contexts may never cross);
      weights_crossover_batch     - where B tokens' FLOPs take as long as reading the weights once
                                    (the crossover if KV reads were free).
    `model` is a course Transformer or a transformers Llama/Qwen2 model (converted here)."""
    if not isinstance(model, Transformer):
        model = Transformer.from_hf(model)
    device = next(model.parameters()).device
    cfg, element = model.config, next(model.parameters()).element_size()
    if memory_limit_bytes is None:
        memory_limit_bytes = int(0.8 * torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 4 * 2**30
    bandwidth_gb_s = bandwidth_gb_s or measure_bandwidth(device)
    tflops = tflops or measure_matmul_tflops(device, next(model.parameters()).dtype)
    per_row = (kv_bytes_per_position(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, element) * (context + 2)
               + 3 * cfg.vocab_size * 4)  # its KV cache, plus logits and their argmax work space
    rows, B = [], 1
    while B <= max_batch and B * per_row <= memory_limit_bytes:
        seconds = decode_step_seconds(model, B, context, steps)
        roof = roofline_step_seconds(model, B, context, bandwidth_gb_s, tflops)
        floor = max(roof["memory_s"], roof["compute_s"])
        rows.append({"batch": B, "step_ms": seconds * 1e3, "tok_s": B / seconds, "ms_per_token": seconds * 1e3 / B,
                     "roofline_step_ms": floor * 1e3, "roofline_fraction": floor / seconds,
                     "roofline_bound": roof["bound"], "kv_cache_mb": B * per_row / 1e6})
        B *= 2
    base = rows[0]["step_ms"]
    flat = [r["batch"] for r in rows if r["step_ms"] <= tolerance * base]
    crossover = next((r["batch"] for r in rows if r["roofline_bound"] == "compute"), None)
    weights_s = bytes_per_token(cfg, element, 0) / (bandwidth_gb_s * 1e9)
    token_s = flops_per_token(cfg, context) / (tflops * 1e12)
    return {"rows": rows, "context": context, "bandwidth_gb_s": bandwidth_gb_s, "tflops": tflops,
            "memory_limit_bytes": memory_limit_bytes, "tolerance": tolerance,
            "flat_until_measured": max(flat), "compute_bound_from_roofline": crossover,
            "weights_crossover_batch": weights_s / token_s,
            "device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def static_batch_gain(model, prompts: list[torch.Tensor], new_tokens: int) -> dict:
    """Output tokens/s of the prompts as one static batch vs one at a time: over the whole run
    (prefill included: "gain") and over the decode phase alone ("decode_gain")."""
    device = next(model.parameters()).device
    generate_static(model, prompts[:1], 2)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    singles = [generate_static(model, [p], new_tokens) for p in prompts]
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = generate_static(model, prompts, new_tokens)
    batch_s = time.perf_counter() - start
    decode_one = sum(r.token_times[0][-1] - r.token_times[0][0] for r in singles)  # first token -> last
    decode_batch = batched.token_times[0][-1] - batched.token_times[0][0]
    n, B = len(prompts) * new_tokens, len(prompts)
    return {"batch_1_tok_s": n / one_s, f"batch_{B}_tok_s": n / batch_s, "gain": one_s / batch_s,
            "decode_batch_1_tok_s": B * (new_tokens - 1) / decode_one,
            f"decode_batch_{B}_tok_s": B * (new_tokens - 1) / decode_batch, "decode_gain": decode_one / decode_batch,
            "identical": sum(a.outputs[0] == b for a, b in zip(singles, batched.outputs)),
            "padding_tokens": batched.padding_tokens}


def compare_engines(model, workload, max_batch: int = 8, block_size: int = 16, num_blocks: int | None = None) -> dict:
    """Replay one workload through static and continuous batching (real time); summaries and KV waste."""
    longest = max(len(w.prompt_ids) + w.output_len for w in workload)
    num_blocks = num_blocks or max_batch * -(-longest // block_size)  # room for max_batch of the longest
    static = StaticBatchEngine(model, max_batch=max_batch)
    continuous = ContinuousBatchEngine(model, num_blocks=num_blocks, block_size=block_size, max_batch=max_batch)
    s, c = replay(static, workload), replay(continuous, workload)
    same = sum(a.output_ids == b.output_ids for a, b in zip(s.requests, c.requests))
    return {"static": s, "continuous": c, "identical": same, "kv_waste": kv_waste(continuous.kv_samples),
            "num_blocks": num_blocks, "preemptions": sum(r.num_preemptions for r in c.requests)}


def prompt_pool(tokenizer, vocab_size: int, max_tokens: int = 120) -> list[list[int]]:
    """Chat-templated short and long prompts of data/prompts.jsonl up to max_tokens tokens; without a
    tokenizer (a random-weight model), seeded random ids of 24, 40, 64 and 100 tokens."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in (24, 40, 64, 100)]
    ids = [chat_input_ids(tokenizer, p)[0].tolist() for n in ("short", "long") for p in load_prompts(50, n)]
    return [p for p in ids if len(p) <= max_tokens]


@register("batch")
def batch_suite(ctx: BenchContext) -> SuiteResult:
    """Static batch 8 vs batch 1; static vs continuous on one workload; paged vs contiguous KV waste."""
    model = Transformer.from_hf(ctx.model)
    cpu = ctx.device.type == "cpu"
    pool = prompt_pool(ctx.tokenizer, ctx.info.vocab_size)
    eight = [torch.tensor([pool[i % len(pool)]]) for i in range(8)]
    gain = static_batch_gain(model, eight, ctx.sizes.new_tokens)
    max_batch = ctx.sizes.max_batch  # 8 on a CPU, 64 on a GPU
    config = WorkloadConfig(num_requests=20 if cpu else 256, rate=6.0 if cpu else 100.0,
                            output_len=(4, 48) if cpu else (8, 256), seed=0)
    workload = make_workload(config, prompt_pool=pool)
    cmp = compare_engines(model, workload, max_batch=max_batch)
    s, c = cmp["static"].summary(), cmp["continuous"].summary()
    rows = [{"engine": name, **{k: v for k, v in summ.items() if k != "rejected"}}
            for name, summ in (("static batching", s), ("continuous batching", c))]
    waste = cmp["kv_waste"]
    ratios = {"static_batch8_throughput_gain": gain["gain"],
              "continuous_vs_static_throughput": c["throughput_tok_s"] / s["throughput_tok_s"],
              "continuous_vs_static_p99_ttft": s["ttft_p99_ms"] / c["ttft_p99_ms"],
              "paged_vs_contiguous_kv_waste": waste["paged"] / waste["reserved"] if waste["reserved"] else math.nan}
    prompt_lengths = [len(w.prompt_ids) for w in workload]
    settings = {"static_gain": {k: v for k, v in gain.items() if k != "gain"},
                "static_gain_setup": f"8 prompts x {ctx.sizes.new_tokens} new tokens, greedy, no stop token; "
                                     "the ratio counts the whole run (prefill included)",
                "workload": {"num_requests": config.num_requests, "rate_per_s": config.rate,
                             "prompt_tokens": [min(prompt_lengths), max(prompt_lengths)],
                             "output_len": config.output_len, "output_len_dist": "log-uniform", "seed": config.seed},
                "max_batch": max_batch, "block_size": 16, "num_blocks": cmp["num_blocks"],
                "preemptions": cmp["preemptions"],
                "static_policy": f"take what is waiting (up to {max_batch}), run to the end of the longest",
                "kv_waste_fraction": waste,
                "kv_waste_ratio": "paged unused slots / contiguous (prompt + max_new_tokens) unused slots",
                "greedy_outputs_identical": f"{cmp['identical']}/{len(workload)}",
                "clock": "real wall time, arrivals replayed in real time"}
    columns = [("engine", "engine"), ("requests", "requests"), ("duration_s", "time (s)"),
               ("throughput_tok_s", "output (tok/s)"), ("requests_per_s", "req/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
               ("ttft_p99_ms", "TTFT p99 (ms)"), ("tpot_p50_ms", "TPOT p50 (ms)"), ("e2e_p50_ms", "E2E p50 (ms)"),
               ("e2e_p99_ms", "E2E p99 (ms)"), ("max_waiting", "max queue")]
    return SuiteResult(results=rows, ratios=ratios, settings=settings, columns=columns)
