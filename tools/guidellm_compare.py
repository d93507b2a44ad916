"""GuideLLM (a third-party benchmark client) beside the course's load generator, same server, same workload.

    .venv/bin/python tools/guidellm_compare.py [--guidellm /tmp/guidellm-venv/bin/guidellm] [--json OUT]

Starts `python -m course_lib serve` on the default model, then for each concurrency runs GuideLLM
(synthetic 64-token prompts, exactly 16 output tokens, closed loop of N streams, streamed chat
completions) and `course_lib.loadgen` on GuideLLM's own prompts with the same settings (ignore_eos,
the server's default temperature 1.0, the same number of requests), and prints their TTFT, ITL,
TPOT, E2E and throughput side by side. GuideLLM lives in its own venv so it cannot disturb the
course's (python3 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install guidellm==0.8.1).
Not part of CI: it needs the default model and takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib.env import hardware_stamp  # noqa: E402
from course_lib.loadgen import LoadConfig, run_load  # noqa: E402
from course_lib.models import cache_dir  # noqa: E402

OUT = ROOT / "data" / "reference_results" / "cpu_2core_guidellm_vs_loadgen_smollm2-135m.json"
PROMPT_TOKENS, OUTPUT_TOKENS = 64, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "course_lib", "serve", "--port", str(port), "--log-level",
                               "warning"], cwd=ROOT, env=env)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise RuntimeError("the server exited before it was ready")
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError("the server did not become ready in 150 s")


def run_guidellm(guidellm: str, url: str, streams: int, requests: int, out: Path) -> dict:
    """One GuideLLM benchmark; returns its medians and throughput, and the prompts it sent."""
    tokenizer = cache_dir() / "smollm2-tokenizer"
    cmd = [guidellm, "run", "--backend", f"kind=openai_http,target={url}",
           "--profile", f"kind=concurrent,streams={streams}",
           "--constraint", f"kind=max_requests,count={requests}",
           "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer}", "--disable-progress",
           "--output", f"kind=json,path={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    data = json.loads(out.read_text())
    bench = data["benchmarks"][0]
    m = bench["metrics"]

    def median(name: str) -> float:
        return m[name]["successful"]["median"]

    prompts = []
    for r in bench["requests"]["successful"]:
        body = json.loads(r["request_args"])["body"]
        content = body["messages"][0]["content"]
        prompts.append(content if isinstance(content, str) else "".join(p["text"] for p in content))
    return {"version": data["metadata"]["guidellm_version"], "prompts": prompts, "summary": {
        "requests": m["request_totals"]["successful"], "failed": m["request_totals"]["errored"],
        "ttft_p50_ms": median("time_to_first_token_ms"), "itl_p50_ms": median("inter_token_latency_ms"),
        "tpot_p50_ms": median("time_per_output_token_ms"), "e2e_p50_ms": median("request_latency") * 1e3,
        "throughput_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
        "requests_per_s": m["requests_per_second"]["successful"]["mean"],
        "output_tokens_mean": m["output_token_count"]["successful"]["mean"],
        "prompt_tokens_mean": m["prompt_token_count"]["successful"]["mean"]}}


def run_loadgen(url: str, streams: int, requests: int, prompts: list[str]) -> dict:
    result = run_load(LoadConfig(url=url, concurrency=streams, num_requests=requests, prompts=tuple(prompts),
                                 max_tokens=(OUTPUT_TOKENS, OUTPUT_TOKENS), ignore_eos=True, temperature=1.0))
    s = result.summary()
    keys = ("requests", "failed", "ttft_p50_ms", "itl_p50_ms", "tpot_p50_ms", "e2e_p50_ms", "throughput_tok_s",
            "requests_per_s")
    return {k: s.get(k) for k in keys} | {"output_tokens_mean": s["output_tokens"] / max(1, s["requests"])}


def build_record(points: list[dict], version: str, requests: int, server_threads: int, shared_cores: bool,
                 created: str | None = None) -> dict:
    """The run as a course_lib.measure.BenchRecord (JSON): every point in results, and as ratios
    GuideLLM's number over loadgen's for the same quantity, averaged over the repeats."""
    ratios = {}
    for streams in sorted({pt["streams"] for pt in points}):
        mine = [pt for pt in points if pt["streams"] == streams]
        for name, g_key, l_key in (("ttft_p50", "ttft_p50_ms", "ttft_p50_ms"), ("e2e_p50", "e2e_p50_ms", "e2e_p50_ms"),
                                   ("tpot_p50", "itl_p50_ms", "tpot_p50_ms"),  # the same definition (notes)
                                   ("throughput", "throughput_tok_s", "throughput_tok_s")):
            ratios[f"guidellm_over_loadgen_{name}_c{streams}"] = sum(
                pt["guidellm"][g_key] / pt["loadgen"][l_key] for pt in mine) / len(mine)
    return {
        "name": "guidellm_vs_loadgen", "model": "smollm2-135m (float32, cpu)", "dtype": "float32", "device": "cpu",
        "settings": {
            "versions": {"guidellm": version, "python": sys.version.split()[0]},
            "endpoint": "/v1/chat/completions (streamed)", "profile": "closed loop, N concurrent streams",
            "requests_per_point": requests,
            "prompt_tokens": f"{PROMPT_TOKENS} synthetic (GuideLLM's; loadgen reuses the prompts GuideLLM sent, "
                             "drawn at random)",
            "output_tokens": OUTPUT_TOKENS, "ignore_eos": True,
            "temperature": "1.0 (the server's default; GuideLLM sends none)",
            "server": "python -m course_lib serve (defaults: max_batch 8, max_model_len 1024), "
                      f"OMP_NUM_THREADS={server_threads}",
            "clients": "one client at a time against the server, on the same machine; each point repeated with "
                       "GuideLLM first, then loadgen first",
            "notes": ["GuideLLM's TTFT/ITL/TPOT/E2E are medians over successful requests and its throughput the "
                      "mean output tokens/s it reports; loadgen's are medians of its per-request metrics "
                      "(course_lib.measure) and output tokens over the run's wall time.",
                      "Both clients run on the same 2 cores as the server, so client overhead is in the numbers.",
                      "Definitions differ: GuideLLM's time_per_output_token is E2E / output tokens (TTFT included); "
                      "its inter_token_latency is (E2E - TTFT) / (output tokens - 1), which is what "
                      "course_lib.measure calls TPOT (the tpot_p50 ratios compare those two). The course's ITL "
                      "is the median gap between streamed chunks.",
                      "GuideLLM's prompt_tokens (94) count the chat template around its 64 synthetic tokens."]},
        "results": points, "ratios": ratios, "hardware": hardware_stamp().as_dict(),
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "caveat": ("The machine's 2 CPU cores were shared with another engineer's work (notebooks executing) "
                   "while this ran: treat the times as rough; compare the two clients within a point.")
                  if shared_cores else "",
        "reliable": True,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guidellm", default="/tmp/guidellm-venv/bin/guidellm")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="concurrencies (default 1 4)")
    p.add_argument("--requests", type=int, default=12, help="requests per concurrency (default 12)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per client and concurrency, in alternating order (GuideLLM first, then loadgen first)")
    p.add_argument("--server-threads", type=int, default=2, help="OMP_NUM_THREADS of the server (default 2)")
    p.add_argument("--json", default=str(OUT))
    p.add_argument("--shared-cores", action="store_true", help="record that other work shared the machine")
    args = p.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, args.server_threads)
    points = []
    try:
        for streams in args.streams:
            prompts = None
            for rep in range(args.repeats):
                out = Path(f"/tmp/guidellm_{streams}_{rep}.json")
                if rep % 2 == 0 or prompts is None:
                    g = run_guidellm(args.guidellm, url, streams, args.requests, out)
                    prompts = prompts or g["prompts"]
                    lg = run_loadgen(url, streams, args.requests, prompts)
                else:  # the other order: loadgen first, on the prompts GuideLLM sent before
                    lg = run_loadgen(url, streams, args.requests, prompts)
                    g = run_guidellm(args.guidellm, url, streams, args.requests, out)
                points.append({"streams": streams, "repeat": rep, "first": "guidellm" if rep % 2 == 0 else "loadgen",
                               "guidellm": g["summary"], "loadgen": lg})
                version = g["version"]
    finally:
        server.terminate()
        server.wait(30)
    columns = [("requests", "{:.0f}"), ("ttft_p50_ms", "{:.0f}"), ("itl_p50_ms", "{:.1f}"), ("tpot_p50_ms", "{:.1f}"),
               ("e2e_p50_ms", "{:.0f}"), ("throughput_tok_s", "{:.1f}"), ("requests_per_s", "{:.2f}")]
    print(f"{'streams':>7} {'run':>3} {'client':>9} " + " ".join(f"{c:>16}" for c, _ in columns))
    for pt in points:
        for client in ("guidellm", "loadgen"):
            row = pt[client]
            print(f"{pt['streams']:>7} {pt['repeat']:>3} {client:>9} " + " ".join(
                f"{fmt.format(row[c]) if row.get(c) is not None else '-':>16}" for c, fmt in columns))
    record = build_record(points, version, args.requests, args.server_threads, args.shared_cores)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
