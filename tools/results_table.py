"""The README's headline table, generated from a committed bench record (`make results`).

    python tools/results_table.py [--record FILE] [--check]

Every number in the table is a ratio of the `--suite all` record named in the table's heading,
with the workload it was measured on; the GPU column quotes the reliable GPU records of
data/reference_results (an unreliable one is named, never quoted). `--check` exits 1 when the
README's table differs from what the record gives (tests/test_results_table.py runs it), so the
README and the record cannot drift apart silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib.measure import BenchRecord, reference_records  # noqa: E402

RECORD = "cpu_2core_bench_all_smollm2-135m.json"
README = ROOT / "README.md"
START, END = "<!-- results:start (make results) -->", "<!-- results:end -->"

# technique -> (suite, [(ratio key, how to say it)], workload in words from the suite's settings)
ROWS = [
    ("KV cache", "kv",
     [("kv_speedup_256", "{:.1f}x the naive loop's decode tokens/s over 256 new tokens"),
      ("prefix_cache_ttft_speedup", "prefix caching: {:.1f}x lower TTFT"),
      ("engine_vs_hf_decode", "our cached loop at {:.2f}x transformers' `generate`"),
      ("prefill_ttft_vs_hf", "prefill of a 500-token prompt at {:.2f}x transformers' speed"),
      ("cached_roofline_fraction", "{:.0%} of the memory-bandwidth roofline")],
     lambda s: f"greedy, batch 1, {s['prompt_tokens']}-token prompt; prefix test: {s['system_prompt_tokens']}-token system prompt"),
    ("quantization", "quant",
     [("int8_weight_bytes_ratio", "int8 weights {:.3f} of fp32 bytes"),
      ("int8_ppl_increase_pct", "perplexity {:+.2f}%"),
      ("int4_weight_bytes_ratio", "int4 g64 {:.3f}"),
      ("int4_ppl_increase_pct", "{:+.1f}%*"),
      ("int8_decode_speed_ratio", "decode speed int8 {:.2f}x fp32"),
      ("int4_decode_speed_ratio", "int4 {:.2f}x (fused kernel)"),
      ("int4_ops_decode_speed_ratio", "int4 through PyTorch ops {:.2f}x"),
      ("int4_fused_ppl_increase_pct", "fused int4 perplexity {:+.1f}% (bf16 compute)")],
     lambda s: f"{s['perplexity']}; decode: {s['decode']}; int4 kernel: {s.get('int4_kernel', 'none')}"),
    ("batching", "batch",
     [("static_batch8_throughput_gain", "static batch of 8: {:.1f}x tokens/s over one at a time"),
      ("continuous_vs_static_throughput", "continuous vs static: {:.2f}x throughput"),
      ("continuous_vs_static_p99_ttft", "{:.1f}x lower p99 TTFT"),
      ("paged_vs_contiguous_kv_waste", "paged KV wastes {:.2f}x the slots of contiguous reservation")],
     lambda s: (f"{s['workload']['num_requests']} Poisson requests at {s['workload']['rate_per_s']:g}/s, outputs "
                f"{s['workload']['output_len'][0]}-{s['workload']['output_len'][1]} tokens, max batch {s['max_batch']}")),
    ("serving real traffic", "sched",
     [("chunked_prefill_itl_p99_gain", "chunked prefill: {:.1f}x lower p99 ITL"),
      ("chunked_prefill_throughput_ratio", "at {:.2f}x the throughput"),
      ("prefix_cache_multiturn_ttft_gain", "prefix caching: {:.1f}x lower median TTFT on multi-turn chat"),
      ("prefix_cache_hit_rate", "hit rate {:.0%}"),
      ("goodput_at_slo", "goodput {:.2f} req/s at the SLO")],
     lambda s: (f"token budget {s['token_budget']}; stall: {s['chunked_workload']}; chat: {s['conversation_workload']}; "
                f"SLO TTFT <= {s['slo']['ttft_ms']:.0f} ms, TPOT <= {s['slo']['tpot_ms']:.0f} ms at p{s['slo']['percentile']:g}")),
    ("speculative decoding", "spec",
     [("pld_speedup_grounded", "prompt lookup {:.1f}x on grounded prompts"),
      ("draft_speedup", "distilled draft {:.2f}x"),
      ("draft_acceptance_rate", "(α {:.2f}"),
      ("draft_cost_ratio", "c {:.2f})"),
      ("spec_greedy_identical", "greedy identical: {:.0%} of prompts")],
     lambda s: f"{len(s['prompts'])} prompts, gamma {s['draft_gamma']} (draft) / {s['lookup_gamma']} (lookup), greedy"),
    ("all together", "engine",
     [("engine_all_vs_naive_throughput", "{:.1f}x the naive loop's output tokens/s"),
      ("engine_vs_naive_p50_ttft", "TTFT p50 {:.1f}x lower")],
     lambda s: (f"{s['engine']}, {s['workload']['num_requests']} Poisson requests at "
                f"{s['workload']['rate_per_s']:g}/s")),
]
# technique -> GPU ratio keys worth quoting beside it
GPU_KEYS = {"KV cache": ["compiled_vs_eager_decode", "kv_speedup_256"],
            "quantization": ["int8_decode_speed_ratio", "int4_decode_speed_ratio"],
            "batching": ["static_batch8_throughput_gain", "continuous_vs_static_throughput"],
            "serving real traffic": ["chunked_prefill_itl_p99_gain", "prefix_cache_multiturn_ttft_gain"],
            "speculative decoding": ["draft_speedup", "pld_speedup_grounded"],
            "all together": ["engine_all_vs_naive_throughput"]}


def gpu_cell(technique: str, records: dict[str, BenchRecord]) -> str:
    quoted, unreliable = [], []
    for name, rec in records.items():
        if rec.device != "cuda":
            continue
        keys = [k for k in GPU_KEYS[technique] if k in rec.ratios]
        if keys and not rec.reliable:
            unreliable.append(f"`{name}` (unreliable, see its caveat)")
        elif keys:
            where = f"{rec.hardware.get('gpu')}, {rec.model.split(' (')[0]}, {rec.dtype}"
            quoted += [f"{k} {rec.ratios[k]:.2f} ({where})" for k in keys]
    return "; ".join(quoted + unreliable) or "not measured yet"


def render(record_file: str = RECORD) -> str:
    records = reference_records()
    record = records[record_file]
    # BenchRecord keeps the flat ratios; the per-suite records (settings = workloads) are an extra key
    per_suite = json.loads((ROOT / "data" / "reference_results" / record_file).read_text())["suites"]
    hw = record.hardware
    lines = [f"From `data/reference_results/{record_file}` (`python -m course_lib bench --suite all`, "
             f"{record.created[:10]}, {record.settings.get('total_seconds', 0):.0f} s): {hw.get('cpu_cores')}-core "
             f"{hw.get('cpu')}, torch {hw.get('torch')}, {record.model}. Caveat: {record.caveat}", "",
             "| technique | measured on the CPU | workload | GPU reference |", "|---|---|---|---|"]
    for technique, suite, items, workload in ROWS:
        ratios = per_suite[suite]["ratios"]
        said = ", ".join(text.format(ratios[key]) for key, text in items if key in ratios)
        lines.append(f"| {technique} | {said} | {workload(per_suite[suite]['settings'])} | {gpu_cell(technique, records)} |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return text[text.index(START) + len(START):text.index(END)].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", default=RECORD, help="a --suite all record in data/reference_results")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table differs")
    args = parser.parse_args(argv)
    table, text = render(args.record), README.read_text()
    if args.check:
        if readme_table(text) != table:
            print("README.md's headline table differs from the record: run `make results`", file=sys.stderr)
            return 1
        print("README.md's headline table matches the record")
        return 0
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    README.write_text(f"{head}\n{table}\n{tail}")
    print(f"wrote the headline table of README.md from {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
