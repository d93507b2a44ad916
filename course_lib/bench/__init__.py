"""The benchmark harness behind `python -m course_lib bench`. Built in notebooks/03_measuring_inference.ipynb.

    python -m course_lib bench --suite NAME [--model M] [--device D] [--new-tokens N] [--json FILE]
    python -m course_lib bench --suite all --json FILE

Each suite measures its variants side by side in one run and returns dimensionless ratios
(the numbers worth comparing across machines) plus the absolute results behind them. The JSON
holds "name" (the suite), "hardware", "model", "dtype", "device", "settings", "results",
"ratios" and "created" (a course_lib.measure.BenchRecord). Each notebook's suites live in a module of this package
(`loop` for 03, `kv` for 04, `quant` 05, `batch` 06, `spec` 07, `engine` 08) and add themselves to
SUITES with @register("name"); `load_suites()` imports them all.

`--suite all` loads the model once and runs every suite in course order (COURSE_ORDER, then any
other registered suite). Its JSON has the same top-level keys, with "name": "all", "results" one
row per suite (status, seconds, ratio count) and "ratios" every suite's ratios in one flat dict
(a name two suites share is kept as "suite.name"), plus "suites" (suite name -> that suite's
record, exactly as `--suite NAME` writes it) and "errors" (suite name -> the exception of a suite
that raised; the other suites still run, and the exit status is then 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from course_lib.env import RunSizes, run_sizes, synchronize
from course_lib.measure import BenchRecord, RequestMetrics, format_table, time_stream

CPU_LOOP_TOKENS = 24  # new tokens per request on CPU: keeps the loop suite near a minute on 2 cores


def warmup_tokens(ctx: "BenchContext") -> int:
    """Warm-up length: a GPU may pick kernels anew for each sequence length it meets, so warm up
    over every length; a CPU does not, and 2 tokens pay its one-time costs."""
    return 2 if ctx.device.type == "cpu" else ctx.new_tokens


@dataclass
class BenchContext:
    """What every suite gets: the loaded model and the run's sizes."""

    model: torch.nn.Module
    tokenizer: object
    info: object  # course_lib.models.ModelInfo
    device: torch.device
    sizes: RunSizes
    new_tokens: int
    num_prompts: int


@dataclass
class SuiteResult:
    """A suite's output: rows for the table and the JSON, the ratios, and its settings."""

    results: list[dict]
    ratios: dict[str, float]
    settings: dict
    columns: list[tuple[str, str]]  # (key, header with unit) for the printed table


SUITES: dict[str, Callable[[BenchContext], SuiteResult]] = {}


def register(name: str):
    """Decorator: add a suite to SUITES under `name`."""
    def add(fn: Callable[[BenchContext], SuiteResult]):
        SUITES[name] = fn
        return fn
    return add


def prompt_ids(ctx: BenchContext, prompts: list[str]) -> list[torch.Tensor]:
    """Chat-template token ids (1, T) per prompt; without a tokenizer (a random-weight model that
    would need a download for one), 32 seeded random token ids per prompt instead."""
    from course_lib.generation import chat_input_ids

    if ctx.tokenizer is not None:
        return [chat_input_ids(ctx.tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, ctx.info.vocab_size, (1, 32), generator=gen) for _ in prompts]


def naive_model(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The course Transformer holding the model's weights (transformers' model if it can't be built)."""
    try:
        from course_lib.transformer import Transformer

        return Transformer.from_hf(model), "naive loop (course Transformer, full recompute)"
    except (ImportError, AttributeError, KeyError, ValueError, RuntimeError):
        return model, "naive loop (transformers model, full recompute)"


def run_naive(model, input_ids: torch.Tensor, new_tokens: int, device) -> tuple[list[int], RequestMetrics]:
    """One timed request through generation.stream_naive (no stop tokens: exactly new_tokens)."""
    from course_lib.generation import stream_naive

    return time_stream(lambda: stream_naive(model, input_ids, new_tokens), device)


def run_hf_generate(model, input_ids: torch.Tensor, new_tokens: int, device) -> tuple[list[int], RequestMetrics]:
    """One timed greedy request through transformers' generate, timestamped by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    times: list[float] = []

    class Clock(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate hands the streamer the prompt first
                self.prompt_seen = True
                return
            synchronize(device)
            times.append(time.perf_counter())

        def end(self):
            pass

    ids = input_ids.to(device)
    synchronize(device)
    start = time.perf_counter()
    # eos_token_id=None: run past end-of-turn like the naive loop (min_new_tokens would instead
    # forbid eos and change the greedy tokens)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, streamer=Clock(),
                         pad_token_id=model.config.eos_token_id)
    return out[0, ids.shape[1]:].tolist(), RequestMetrics.from_timestamps(start, times)


# One module per notebook, in course order; importing a module registers its suites.
SUITE_MODULES = ("course_lib.bench.loop", "course_lib.bench.kv", "course_lib.bench.quant", "course_lib.bench.batch",
                 "course_lib.bench.spec", "course_lib.bench.engine", "course_lib.bench.sched")
COURSE_ORDER = ("loop", "hardware", "kv", "quant", "batch", "sched", "spec", "engine")  # the order of `--suite all`


def load_suites() -> None:
    """Import every suite module that exists in this checkout (each registers itself)."""
    import importlib

    for name in SUITE_MODULES:
        importlib.import_module(name)


def suite_order() -> list[str]:
    """Registered suites in course order (COURSE_ORDER first, then any others by name)."""
    return [n for n in COURSE_ORDER if n in SUITES] + sorted(n for n in SUITES if n not in COURSE_ORDER)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m course_lib bench",
                                     description="Run a benchmark suite; print a table and write JSON.")
    parser.add_argument("--suite", required=True, help=f"one of: {', '.join(SUITES)}, or all (every suite in course order)")
    parser.add_argument("--model", default=None, help="model preset (default: $COURSE_MODEL or the offline default)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: by device)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help=f"new tokens per request (default: {CPU_LOOP_TOKENS} on CPU, run_sizes on GPU)")
    parser.add_argument("--prompts", type=int, default=3, help="short prompts from data/prompts.jsonl")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def run_suite(name: str, ctx: BenchContext) -> tuple[BenchRecord, SuiteResult]:
    """Run one registered suite (seeded) and wrap its output in a stamped BenchRecord."""
    torch.manual_seed(0)
    out = SUITES[name](ctx)
    record = BenchRecord(name=name, model=ctx.info.label, dtype=ctx.info.dtype, device=str(ctx.device),
                         settings={"model_name": ctx.info.name, **out.settings}, results=out.results,
                         ratios=out.ratios)
    return record, out


def print_result(record: BenchRecord, out: SuiteResult) -> None:
    """The suite's header line, table and ratios."""
    print(f"suite {record.name}: {record.model}, {record.hardware['cpu_cores']}-core CPU"
          + (f", {record.hardware['gpu']}" if record.hardware["gpu"] else ""))
    print(format_table(out.results, out.columns))
    for name, value in out.ratios.items():
        flag = "" if math.isfinite(value) else "   <- not a finite number"
        print(f"ratio {name}: {value:.3g}{flag}")


def _json_value(x):
    return x.as_dict() if hasattr(x, "as_dict") else str(x)  # as BenchRecord.save stores them


def run_all(ctx: BenchContext) -> dict:
    """Every suite in course order on one loaded model; a suite that raises is recorded and skipped.
    Returns the `--suite all` record as a dict (see the module docstring)."""
    records, errors, rows, ratios = {}, {}, [], {}
    start_all = time.perf_counter()
    for name in suite_order():
        print(f"\n=== suite {name} ===", flush=True)
        start = time.perf_counter()
        try:
            record, out = run_suite(name, ctx)
        except Exception as exc:  # one broken suite must not cost the others their run
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            rows.append({"suite": name, "status": "error", "seconds": time.perf_counter() - start, "ratios": 0})
            print(f"suite {name} failed: {errors[name]}", file=sys.stderr)
            continue
        finally:
            gc.collect()
        seconds = time.perf_counter() - start
        print_result(record, out)
        print(f"suite {name}: {seconds:.0f} s")
        records[name] = asdict(record)
        rows.append({"suite": name, "status": "ok", "seconds": seconds, "ratios": len(out.ratios)})
        for key, value in out.ratios.items():
            ratios[f"{name}.{key}" if key in ratios else key] = value
    total = time.perf_counter() - start_all
    summary = BenchRecord(name="all", model=ctx.info.label, dtype=ctx.info.dtype, device=str(ctx.device),
                          settings={"model_name": ctx.info.name, "order": suite_order(), "new_tokens": ctx.new_tokens,
                                    "prompts": ctx.num_prompts, "total_seconds": total},
                          results=rows, ratios=ratios)
    print(f"\n=== all suites: {len(records)} ok, {len(errors)} failed, {total:.0f} s ===")
    print(format_table(rows, [("suite", "suite"), ("status", "status"), ("seconds", "time (s)"),
                              ("ratios", "ratios")], digits=0))
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.3g}")
    return {**asdict(summary), "suites": records, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m course_lib bench`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    load_suites()
    args = parse_args(argv)
    if args.suite not in SUITES and args.suite != "all":
        print(f"unknown suite {args.suite!r}; available suites: {', '.join(sorted(SUITES))}, all", file=sys.stderr)
        return 2
    if args.new_tokens is not None and args.new_tokens < 2:
        print("--new-tokens must be at least 2 (decode speed needs two tokens)", file=sys.stderr)
        return 2
    if args.prompts < 1:
        print("--prompts must be at least 1", file=sys.stderr)
        return 2
    from course_lib.env import pick_device
    from course_lib.models import course_model, load_model

    device = pick_device(args.device)
    model, tokenizer, info = load_model(args.model or course_model(device), device, args.dtype)
    sizes = run_sizes(device)
    new_tokens = args.new_tokens or (CPU_LOOP_TOKENS if device.type == "cpu" else sizes.new_tokens)
    ctx = BenchContext(model, tokenizer, info, device, sizes, new_tokens, args.prompts)
    if args.suite == "all":
        combined = run_all(ctx)
        if args.json:
            Path(args.json).write_text(json.dumps(combined, indent=2, default=_json_value) + "\n")
            print(f"wrote {args.json}")
        return 1 if combined["errors"] else 0
    record, out = run_suite(args.suite, ctx)
    print_result(record, out)
    if args.json:
        print(f"wrote {record.save(args.json)}")
    return 0
