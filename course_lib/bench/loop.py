"""Notebook 03's suites: the naive loop against transformers' generate, and the hardware roofline.

Built in notebooks/03_measuring_inference.ipynb; run with `python -m course_lib bench --suite loop|hardware`.
"""

from __future__ import annotations

import statistics

import torch

from course_lib.bench import (BenchContext, SuiteResult, naive_model, prompt_ids, register, run_hf_generate, run_naive,
                              warmup_tokens)
from course_lib.measure import RequestMetrics
from course_lib.paths import load_prompts
from course_lib.roofline import measure_bandwidth, measure_matmul_tflops, model_decode_ceiling


def _row(label: str, prompt_tokens: list[int], runs: list[RequestMetrics]) -> dict:
    return {"loop": label, "requests": len(runs), "prompt_tokens": statistics.median(prompt_tokens),
            "new_tokens": runs[0].output_tokens,
            "ttft_ms": statistics.median(r.ttft_s for r in runs) * 1e3,
            "tpot_ms": statistics.median(r.tpot_s for r in runs) * 1e3,
            "decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs)}


LOOP_COLUMNS = [("loop", "loop"), ("requests", "requests"), ("prompt_tokens", "prompt (tokens)"),
                ("new_tokens", "new (tokens)"), ("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"),
                ("decode_tok_s", "decode (tok/s)")]


@register("loop")
def loop_suite(ctx: BenchContext) -> SuiteResult:
    """The naive loop (full recompute per token) against transformers' generate (KV cache), greedy."""
    naive, naive_label = naive_model(ctx.model)
    prompts = prompt_ids(ctx, load_prompts(ctx.num_prompts))
    run_naive(naive, prompts[0], warmup_tokens(ctx), ctx.device)  # warm-up: first calls pay one-time costs
    run_hf_generate(ctx.model, prompts[0], warmup_tokens(ctx), ctx.device)
    naive_runs, hf_runs, same = [], [], 0
    for ids in prompts:
        naive_tokens, m = run_naive(naive, ids, ctx.new_tokens, ctx.device)
        naive_runs.append(m)
        hf_tokens, m = run_hf_generate(ctx.model, ids, ctx.new_tokens, ctx.device)
        hf_runs.append(m)
        same += naive_tokens == hf_tokens
    lengths = [ids.shape[1] for ids in prompts]
    rows = [_row(naive_label, lengths, naive_runs), _row("transformers generate (KV cache)", lengths, hf_runs)]
    return SuiteResult(
        results=rows,
        ratios={"naive_vs_hf_decode": rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]},
        settings={"prompts": len(prompts), "new_tokens": ctx.new_tokens, "batch": 1, "sampling": "greedy",
                  "statistic": "median over prompts, one timed request each after one warm-up request",
                  "greedy_tokens_identical": f"{same}/{len(prompts)} prompts"},
        columns=LOOP_COLUMNS)


@register("hardware")
def hardware_suite(ctx: BenchContext) -> SuiteResult:
    """Memory bandwidth, matmul rate, the model's batch-1 decode ceiling and how close loops get."""
    bandwidth = measure_bandwidth(ctx.device, repeats=ctx.sizes.repeats + 2)
    tflops = measure_matmul_tflops(ctx.device, getattr(torch, ctx.info.dtype), repeats=ctx.sizes.repeats + 2)
    ids = prompt_ids(ctx, load_prompts(1))[0]
    context = ids.shape[1] + ctx.new_tokens // 2  # mean context while generating
    ceiling = model_decode_ceiling(ctx.info, bandwidth, context)
    naive, naive_label = naive_model(ctx.model)
    run_naive(naive, ids, warmup_tokens(ctx), ctx.device)  # warm-up
    _, m = run_naive(naive, ids, ctx.new_tokens, ctx.device)
    run_hf_generate(ctx.model, ids, warmup_tokens(ctx), ctx.device)
    _, hf = run_hf_generate(ctx.model, ids, ctx.new_tokens, ctx.device)
    rows = [
        {"quantity": "memory bandwidth (copy, read + write)", "value": bandwidth, "unit": "GB/s"},
        {"quantity": f"matmul rate ({ctx.info.dtype})", "value": tflops * 1e3, "unit": "GFLOP/s"},
        {"quantity": f"decode ceiling ({ctx.info.bytes / 1e6:.0f} MB weights, context {context})",
         "value": ceiling, "unit": "tok/s"},
        {"quantity": naive_label, "value": m.decode_tokens_per_s, "unit": "tok/s"},
        {"quantity": "transformers generate (KV cache)", "value": hf.decode_tokens_per_s, "unit": "tok/s"},
    ]
    return SuiteResult(
        results=rows,
        ratios={"naive_roofline_fraction": m.decode_tokens_per_s / ceiling,
                "hf_generate_roofline_fraction": hf.decode_tokens_per_s / ceiling},
        settings={"prompt_tokens": ids.shape[1], "new_tokens": ctx.new_tokens, "batch": 1,
                  "ceiling": "bandwidth / (weight bytes + KV bytes at the mean context)",
                  "bandwidth_bytes": "256 MB copy on CPU, 1 GB on GPU; median of repeats"},
        columns=[("quantity", "quantity"), ("value", "value"), ("unit", "unit")])
