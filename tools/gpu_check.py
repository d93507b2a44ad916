"""GPU reference checks, one script for one call on a lent GPU machine (`make gpu-check`).

    PYTHONPATH=. COURSE_CACHE=.gpu_cache python3 tools/gpu_check.py OUT_DIR [--model smollm2-1.7b:random]

Runs, in order, and writes OUT_DIR/gpu_results.json (plus logs):
  1. `python -m course_lib doctor` with a shape-only (random-weight) model       [issue: foundation]
  2. notebooks/00_setup.ipynb, every code cell, with that model                   [foundation]
  3. memory bandwidth and bf16 matmul rate of this device                         [measuring]
  4. eager vs torch.compile (CUDA graphs) cached decode, and the roofline fraction [KV cache]
The GPU image has no Jupyter, so the notebook runs through tools/run_notebook_plain.py.
Random weights: speed does not depend on weight values; the generated text is meaningless.
On a CPU it runs everything but the compile step (which takes minutes there), to test the script.
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
        _static_decode_run(decode_step, model, ids, new_tokens)  # warm-up
        seconds = _static_decode_run(decode_step, model, ids, new_tokens)[1]
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
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-1.7b:random")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COURSE_MODEL=args.model, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    import torch

    on_gpu = torch.cuda.is_available()
    results: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d")}
    steps = {
        "doctor": lambda: _subprocess([sys.executable, "-m", "course_lib", "doctor"], args.out, "doctor", env),
        "notebook_00": lambda: _subprocess([sys.executable, str(ROOT / "tools/run_notebook_plain.py"),
                                            "00_setup.ipynb"], args.out, "notebook_00", env, ROOT / "notebooks"),
        "kv_decode": lambda: kv_decode(args.model, compile_too=on_gpu),
    }
    for name, step in steps.items():
        print(f"== {name}", flush=True)
        try:
            results[name] = step()
        except Exception:  # record and go on: one failure must not cost the other checks
            results[name] = {"error": traceback.format_exc()[-3000:]}
        print(json.dumps(results[name], indent=1, default=str)[:3000], flush=True)
        (args.out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [k for k, v in results.items() if isinstance(v, dict) and (v.get("error") or v.get("rc"))]
    print("failed:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
