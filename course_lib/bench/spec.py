"""Measuring speculative decoding: the `spec` bench suite and per-step costs. Built in notebooks/07_speculative_decoding.ipynb.

    python -m course_lib bench --suite spec [--model M] [--device D] [--json FILE]

The prompts of data/prompts.jsonl (on a CPU the first --prompts of each category, 3 by default, to
keep the run to a few minutes; on a GPU all 42) run four ways, greedy, interleaved prompt by prompt
so that a change in machine load hits all alike: plain cached decoding (kv_cache.stream_cached),
prompt lookup, and draft-model speculation with a fixed number of guesses (the theory's setting) and
with adaptive stopping (DraftProposer's min_confidence). Outputs are compared token by token; speedups are
ratios of decode time (end to end minus time to first token: speculation does not touch the
prefill), summed over prompts. step_costs() times one step of each model, eager and (on a GPU)
with CUDA graphs, to give the cost ratio c of the theory.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch

from course_lib.bench import BenchContext, SuiteResult, register
from course_lib.paths import prompt_rows
from course_lib.draft import DRAFT_PAIRS, draft_for
from course_lib.generation import chat_input_ids, stop_token_ids
from course_lib.kv_cache import KVCache, decode_step, prefill, stream_cached
from course_lib.measure import median_time, time_stream
from course_lib.speculative import (DRAFT_GAMMA, DRAFT_MIN_CONFIDENCE, LOOKUP_GAMMA, LOOKUP_NGRAM, DraftProposer, PromptLookup, SpecStats, expected_speedup,
                                    expected_tokens_per_call, stream_speculative)
from course_lib.transformer import Transformer

ADAPTIVE = "draft, stop < 0.4"


def verify_step(model, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The target's verification pass: tokens (1, k+1) at input_pos (k+1,) -> logits (1, k+1, V)."""
    return model(tokens, input_pos, kv_cache=cache)


def step_costs(target, draft, context: int = 256, gamma: int = DRAFT_GAMMA, modes: tuple[str, ...] | None = None,
               repeats: int = 20, alphas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> dict:
    """Seconds per step of the target (1 token), its verify pass (gamma+1 tokens) and the draft (1 token)
    at `context` cached tokens, for each mode: "eager", and "reduce-overhead" (torch.compile with CUDA
    graphs; default on CUDA only: a CPU compile takes minutes). Returns per mode c = draft / target,
    v = verify / target and the predicted speedup at each alpha, ideal (v = 1) and with the measured v."""
    device = next(target.parameters()).device
    modes = modes or (("eager", "reduce-overhead") if device.type == "cuda" else ("eager",))
    out = {"context": context, "gamma": gamma, "device": str(device),
           "dtype": str(next(target.parameters()).dtype).removeprefix("torch."), "modes": {}}
    for mode in modes:
        step = decode_step if mode == "eager" else torch.compile(decode_step, mode=mode, fullgraph=True)
        verify = verify_step if mode == "eager" else torch.compile(verify_step, mode=mode, fullgraph=True)
        times = {}
        for name, model, fn, k in (("target", target, step, 1), ("verify", target, verify, gamma + 1),
                                   ("draft", draft, step, 1)):
            cache = KVCache.for_model(model, context + gamma + 1, static=True)
            ids = torch.randint(0, model.config.vocab_size, (1, context + k), device=device)  # values do not matter
            with torch.inference_mode():
                prefill(model, ids[:, :context], cache)
                pos = torch.arange(context, context + k, device=device)
                tokens = ids[:, context:]
                if k == 1:
                    tokens, pos = tokens.view(1, 1), pos.view(1)

                def call():
                    torch.compiler.cudagraph_mark_step_begin()
                    return fn(model, tokens, pos, cache)

                # 3 warm-up calls: they compile and record the graph in compiled mode
                times[name] = median_time(call, device, repeats, warmup=3)
        c, v = times["draft"] / times["target"], times["verify"] / times["target"]
        out["modes"][mode] = {**{f"{k}_ms": t * 1e3 for k, t in times.items()}, "cost_ratio": c, "verify_cost": v,
                              "predicted_speedup": {str(a): expected_speedup(a, gamma, c, v) for a in alphas},
                              "predicted_speedup_ideal": {str(a): expected_speedup(a, gamma, c) for a in alphas}}
    return out


def load_rows(per_category: int | None = None) -> list[dict]:
    """The prompts of data/prompts.jsonl with id and category: all, or the first per_category of each."""
    rows = prompt_rows()
    if per_category is None:
        return rows
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    kept, seen = [], Counter()
    for r in rows:
        seen[r["category"]] += 1
        if seen[r["category"]] <= per_category:
            kept.append(r)
    return kept


def _decode_seconds(metrics) -> float:
    return metrics.e2e_s - metrics.ttft_s


SPEC_COLUMNS = [("method", "method"), ("prompts", "prompts"), ("category", "category"), ("new_tokens", "new tokens"),
                ("acceptance", "alpha"), ("tokens_per_call", "tokens/call"), ("decode_tok_s", "decode (tok/s)"),
                ("speedup", "speedup (x)"), ("identical", "identical")]


@register("spec")
def spec_suite(ctx: BenchContext) -> SuiteResult:
    """Prompt lookup and the offline draft against plain cached decoding on every prompt, greedy."""
    device = ctx.device
    if ctx.info.name not in DRAFT_PAIRS or ctx.tokenizer is None:
        raise ValueError(f"the spec suite needs real weights of a model with a draft: {', '.join(DRAFT_PAIRS)}")
    target = Transformer.from_hf(ctx.model)
    draft = draft_for(target, ctx.info.name)
    draft_label = DRAFT_PAIRS[ctx.info.name][0]
    stop = stop_token_ids(ctx.tokenizer)
    cpu = device.type == "cpu"
    short_n, grounded_n = (32, 64) if cpu else (128, 256)
    rows = load_rows(ctx.num_prompts if cpu else None)
    # "draft" guesses DRAFT_GAMMA tokens every call, as the theory formulas assume; ADAPTIVE makes up
    # to DRAFT_GAMMA and stops where the draft is unsure (no formula, but fewer wasted guesses).
    methods = {"plain": None, "prompt lookup": lambda: PromptLookup(*LOOKUP_NGRAM), "draft": lambda: DraftProposer(draft),
               ADAPTIVE: lambda: DraftProposer(draft, min_confidence=DRAFT_MIN_CONFIDENCE)}
    gammas = {"prompt lookup": LOOKUP_GAMMA, "draft": DRAFT_GAMMA, ADAPTIVE: DRAFT_GAMMA}

    def run(method: str, ids: torch.Tensor, n: int):
        if method == "plain":
            tokens, m = time_stream(lambda: stream_cached(target, ids, n, stop_ids=stop), device)
            return tokens, m, None
        stats = SpecStats()
        tokens, m = time_stream(lambda: stream_speculative(target, ids, n, methods[method](), gammas[method],
                                                           stop_ids=stop, stats=stats), device)
        return tokens, m, stats

    warm = chat_input_ids(ctx.tokenizer, rows[0]["prompt"])
    for method in methods:
        run(method, warm, 4)  # warm-up
    runs = []  # (row, method, tokens, metrics, stats)
    for row in rows:
        ids = chat_input_ids(ctx.tokenizer, row["prompt"])
        n = grounded_n if row["category"] == "grounded" else short_n
        for method in methods:
            runs.append((row, method, *run(method, ids, n)))
    plain = {r["id"]: (tokens, m) for r, meth, tokens, m, _ in runs if meth == "plain"}
    identical = {(r["id"], meth): tokens == plain[r["id"]][0] for r, meth, tokens, _, _ in runs if meth != "plain"}

    def summary(method: str, category: str | None) -> dict:
        sel = [(r, t, m, s) for r, meth, t, m, s in runs if meth == method and category in (None, r["category"])]
        base = sum(_decode_seconds(plain[r["id"]][1]) for r, *_ in sel)
        mine = sum(_decode_seconds(m) for _, _, m, _ in sel)
        tokens = sum(m.output_tokens - 1 for _, _, m, _ in sel)
        row = {"method": method, "prompts": len(sel), "category": category or "all",
               "new_tokens": sum(m.output_tokens for _, _, m, _ in sel), "decode_tok_s": tokens / mine,
               "speedup": base / mine if method != "plain" else 1.0}
        if method != "plain":
            stats = SpecStats()
            for *_, s in sel:
                stats.proposed += s.proposed
                stats.accepted += s.accepted
                stats.emitted += s.emitted
            row.update(acceptance=stats.acceptance_rate, tokens_per_call=stats.tokens_per_call,
                       identical=f"{sum(identical[(r['id'], method)] for r, *_ in sel)}/{len(sel)}",
                       histogram=stats.histogram())
        return row

    categories = sorted({r["category"] for r in rows})
    table = [summary(meth, cat) for meth in methods for cat in categories + [None]]
    draft_all = next(r for r in table if r["method"] == "draft" and r["category"] == "all")
    adaptive_all = next(r for r in table if r["method"] == ADAPTIVE and r["category"] == "all")
    lookup_grounded = next(r for r in table if r["method"] == "prompt lookup" and r["category"] == "grounded")
    context = int(statistics.mean(chat_input_ids(ctx.tokenizer, r["prompt"]).shape[1] for r in rows)) + short_n // 2
    costs = step_costs(target, draft, context, DRAFT_GAMMA, repeats=10 if cpu else 50)
    eager = costs["modes"]["eager"]
    alpha, c, v = draft_all["acceptance"], eager["cost_ratio"], eager["verify_cost"]
    theory = {"alpha": alpha, "cost_ratio": c, "verify_cost": v, "gamma": DRAFT_GAMMA,
              "expected_tokens_per_call": expected_tokens_per_call(alpha, DRAFT_GAMMA),
              "measured_tokens_per_call": draft_all["tokens_per_call"],
              "predicted_speedup_ideal": expected_speedup(alpha, DRAFT_GAMMA, c),
              "predicted_speedup_with_verify_cost": expected_speedup(alpha, DRAFT_GAMMA, c, v),
              "measured_speedup": draft_all["speedup"]}
    ratios = {"pld_speedup_grounded": lookup_grounded["speedup"], "draft_speedup": draft_all["speedup"],
              "draft_adaptive_speedup": adaptive_all["speedup"],
              "spec_greedy_identical": sum(identical.values()) / len(identical),
              "draft_acceptance_rate": alpha, "draft_cost_ratio": c}
    settings = {"prompts": [r["id"] for r in rows], "draft": draft_label, "draft_gamma": DRAFT_GAMMA, "adaptive_min_confidence": DRAFT_MIN_CONFIDENCE, "lookup_gamma": LOOKUP_GAMMA,
                "lookup_ngram_max_min": LOOKUP_NGRAM, "new_tokens_short": short_n, "new_tokens_grounded": grounded_n,
                "batch": 1, "sampling": "greedy", "stop": "at <|im_end|>/eos (outputs may be shorter)",
                "speedup": "sum of plain decode time / sum of method decode time (E2E - TTFT), same prompts",
                "mismatches": [f"{pid} ({meth})" for (pid, meth), ok in identical.items() if not ok],
                "step_costs": costs, "theory": theory}
    return SuiteResult(results=table, ratios=ratios, settings=settings, columns=SPEC_COLUMNS)
