"""A load generator for any OpenAI-compatible endpoint. Built in notebooks/08_putting_it_together.ipynb.

    python -m course_lib loadgen --url http://127.0.0.1:8000 --rate 2 --requests 32 [--json FILE]

Works against the course server, vLLM, SGLang, TGI, llama.cpp's server or a managed API (its key
read from the environment variable named by --api-key-env, never from the command line). Two
ways to offer load:
    rate        - requests arrive as a Poisson process (workload.make_workload draws the arrival
                  times), whether or not earlier ones have finished: an open system, like users;
    concurrency - N clients each send a request, wait for the whole answer, send the next: a
                  closed system, which never offers more than N at once.
Every request streams; the client timestamps each server-sent event that carries text. The
metrics follow course_lib.measure: TTFT = first text chunk - send, E2E = last chunk - send,
ITL = gaps between chunks, TPOT = (E2E - TTFT) / (output tokens - 1), with the token count from
the server's usage report (a chunk may carry several tokens). Throughput is output tokens over
the wall time from the first send to the last answer. A run is bounded both in requests and in
seconds: at the deadline unfinished requests are cancelled and counted as failed.

Service-level objectives (notebooks/09_serving_real_traffic.ipynb): an SLO names a TTFT and a TPOT
objective and a percentile. A request meets the SLO when it meets every objective; a failed one
never does. Goodput is the requests per second that met it (DistServe's term); a run meets the SLO
when at least `percentile` % of the requests offered did. Capacity at SLO is the highest *achieved*
throughput (completed requests/s, never the offered rate) among the runs of a sweep that meet it:

    python -m course_lib loadgen --url URL --rates 0.5 1 2 4 --slo-ttft-ms 2000 --slo-tpot-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from course_lib.measure import RequestMetrics, latency_row, print_table
from course_lib.workload import WorkloadConfig, make_workload


@dataclass(frozen=True)
class SLO:
    """Objectives every request should meet (None: no objective), and the share that must."""

    ttft_ms: float | None = None  # time to first token, from the send (or arrival)
    tpot_ms: float | None = None  # time per output token after the first (one-token answers have none)
    percentile: float = 90.0  # a run meets the SLO when this % of the requests offered meet every objective

    def __post_init__(self):
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if any(x is not None and not x > 0 for x in (self.ttft_ms, self.tpot_ms)):
            raise ValueError(f"objectives must be > 0 ms or None, got {self.ttft_ms}, {self.tpot_ms}")

    def met_by(self, m: RequestMetrics) -> bool:
        """Whether one request met every objective."""
        if self.ttft_ms is not None and m.ttft_s * 1e3 > self.ttft_ms:
            return False
        return self.tpot_ms is None or m.tpot_s is None or m.tpot_s * 1e3 <= self.tpot_ms

    @property
    def label(self) -> str:
        parts = ([f"TTFT <= {self.ttft_ms:g} ms"] if self.ttft_ms is not None else []) + \
                ([f"TPOT <= {self.tpot_ms:g} ms"] if self.tpot_ms is not None else [])
        return f"{' and '.join(parts) or 'no objective'} for {self.percentile:g}% of requests"


def slo_report(metrics: Sequence[RequestMetrics], num_offered: int, duration_s: float, slo: SLO) -> dict:
    """SLO attainment (share of the requests offered that completed and met every objective),
    goodput (those per second of the run) and whether the run meets the SLO."""
    good = sum(slo.met_by(m) for m in metrics)
    attainment = good / num_offered if num_offered else 0.0
    return {"slo_met_requests": good, "slo_attainment": attainment,
            "goodput_req_s": good / duration_s if duration_s > 0 else 0.0,
            "meets_slo": attainment >= slo.percentile / 100 - 1e-12}


def capacity_at_slo(points: Sequence[dict]) -> dict | None:
    """The sweep point with the highest achieved throughput (requests_per_s) among those that meet
    the SLO (their "meets_slo"); None if none does."""
    ok = [p for p in points if p.get("meets_slo")]
    return max(ok, key=lambda p: p["requests_per_s"]) if ok else None


def plot_capacity(points: Sequence[dict], slo: SLO, title: str = "Capacity at SLO", ax=None):
    """Achieved throughput and goodput against the offered rate, the offered = achieved line, and
    the capacity at SLO marked; returns the axes."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 4))[1]
    offered = [p["offered_rate"] for p in points]
    ax.plot(offered, offered, ls=":", color="grey", label="offered = achieved")
    ax.plot(offered, [p["requests_per_s"] for p in points], marker="o", label="achieved throughput")
    ax.plot(offered, [p["goodput_req_s"] for p in points], marker="s", label=f"goodput ({slo.label})")
    cap = capacity_at_slo(points)
    if cap is not None:
        ax.axhline(cap["requests_per_s"], ls="--", color="green",
                   label=f"capacity at SLO: {cap['requests_per_s']:.2f} req/s")
    ax.set(xlabel="offered load (requests/s)", ylabel="requests/s", title=title)
    ax.legend(fontsize=8)
    return ax


@dataclass(frozen=True)
class LoadConfig:
    """What load to offer, to which endpoint, for how long."""

    url: str  # base URL of the server ("http://host:port" or ".../v1")
    model: str | None = None  # None: the first model GET /v1/models lists
    rate: float | None = None  # requests/s, Poisson arrivals (math.inf: all at t = 0)
    concurrency: int | None = None  # closed loop with this many clients (used when rate is None)
    num_requests: int = 32
    duration_s: float = 120.0  # hard bound: nothing is sent after it and unfinished requests are cancelled
    max_tokens: tuple[int, int] = (64, 64)  # output length per request, log-uniform on (lo, hi)
    prompts: tuple[str, ...] = ()  # chat prompts drawn at random; empty: data/prompts.jsonl
    endpoint: str = "chat"  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM's extension (the course server has it): exactly max_tokens each
    api_key_env: str | None = None  # name of the environment variable holding the API key
    timeout_s: float = 300.0  # per-request HTTP timeout
    seed: int = 0
    slo: SLO | None = None  # objectives to report attainment and goodput against
    burstiness: float = 1.0  # arrivals' gamma shape (1: Poisson, < 1: bursty); rate mode only

    def __post_init__(self):
        if self.rate is None and self.concurrency is None:
            raise ValueError("give rate (requests/s, Poisson) or concurrency (closed-loop clients)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (math.inf: all at once), got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests < 1 or not self.duration_s > 0:
            raise ValueError(f"need num_requests >= 1 and duration_s > 0, got {self.num_requests}, {self.duration_s}")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ValueError(f"the environment variable {self.api_key_env} (api_key_env) is not set")

    @property
    def base(self) -> str:
        """The URL up to and including /v1."""
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    @property
    def mode(self) -> str:
        return f"rate {self.rate:g} req/s" if self.rate is not None else f"concurrency {self.concurrency}"


@dataclass
class RequestResult:
    """What one request saw from the client side (times are time.perf_counter())."""

    index: int
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each event that carried text
    text: str = ""
    output_tokens: int | None = None  # the server's usage count (None if it sent none)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    def metrics(self) -> RequestMetrics:
        """TTFT, E2E, ITL from the chunk times; the token count (for TPOT) from the usage report."""
        m = RequestMetrics.from_timestamps(self.sent, self.chunk_times)
        n = self.output_tokens or len(self.chunk_times)
        return RequestMetrics(m.ttft_s, m.e2e_s, m.itl_s, n)


@dataclass
class LoadResult:
    """Every request of one run, and the run's summary."""

    config: LoadConfig
    model: str
    requests: list[RequestResult]
    start: float
    end: float

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.requests if r.ok]

    def summary(self) -> dict:
        """Throughput (output tok/s and req/s over the run's wall time) and TTFT/TPOT/ITL/E2E percentiles."""
        done = self.completed
        duration = self.end - self.start
        tokens = sum(r.metrics().output_tokens for r in done)
        row = {"mode": self.config.mode, "offered_rate": self.config.rate, "concurrency": self.config.concurrency,
               "requests": len(done), "failed": len(self.requests) - len(done), "duration_s": duration,
               "output_tokens": tokens, "throughput_tok_s": tokens / duration if duration > 0 else 0.0,
               "requests_per_s": len(done) / duration if duration > 0 else 0.0}
        if done:
            row.update(latency_row([r.metrics() for r in done], ("median", "p90", "p99")))
        if self.config.slo is not None:
            row.update(slo_report([r.metrics() for r in done], len(self.requests), duration, self.config.slo))
        return row

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "model": self.model, "summary": self.summary(),
                "requests": [asdict(r) for r in self.requests]}


def default_prompts() -> tuple[str, ...]:
    """The course's prompt set (data/prompts.jsonl), short and long."""
    from course_lib.paths import load_prompts

    return tuple(load_prompts(1000, "short") + load_prompts(1000, "long"))


def _headers(config: LoadConfig) -> dict:
    headers = {"Content-Type": "application/json"}
    if config.api_key_env:
        headers["Authorization"] = f"Bearer {os.environ[config.api_key_env]}"
    return headers


async def _first_model(client, config: LoadConfig) -> str:
    response = await client.get(f"{config.base}/models", headers=_headers(config))
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _one(client, config: LoadConfig, model: str, prompt: str, max_tokens: int, result: RequestResult) -> None:
    """Send one streamed request and timestamp every event that carries text."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": config.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "chat/completions" if config.endpoint == "chat" else "completions"
    result.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{config.base}/{path}", json=body, headers=_headers(config)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return
                if event.get("usage"):
                    result.output_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = choice.get("text") if config.endpoint == "completions" else delta.get("content")
                    if piece:
                        result.chunk_times.append(time.perf_counter())
                        result.text += piece
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except asyncio.CancelledError:
        result.error = "cancelled: the run's time limit was reached"
        raise
    except Exception as exc:  # a load test records failures, it does not stop at the first
        result.error = f"{type(exc).__name__}: {exc}"


async def run_load_async(config: LoadConfig) -> LoadResult:
    """Offer the configured load and wait for it (or for the time limit); see run_load."""
    import httpx

    prompts = config.prompts or default_prompts()
    # Arrival times and output lengths come from notebook 06's seeded workload; its "prompts" are
    # indices into our text prompts.
    work = make_workload(WorkloadConfig(config.num_requests, config.rate or math.inf, (1, 1), config.max_tokens,
                                        config.seed, config.burstiness), prompt_pool=[(i,) for i in range(len(prompts))])
    results = [RequestResult(i, 0.0) for i in range(config.num_requests)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as client:
        model = config.model or await _first_model(client, config)
        start = time.perf_counter()
        deadline = start + config.duration_s

        def send(i: int):
            return _one(client, config, model, prompts[work[i].prompt_ids[0]], work[i].output_len, results[i])

        if config.rate is not None:
            async def arrive(i: int) -> None:
                await asyncio.sleep(work[i].arrival_s)
                await send(i)
            tasks = [asyncio.ensure_future(arrive(i)) for i in range(config.num_requests)]
        else:
            order = iter(range(config.num_requests))

            async def client_loop() -> None:
                for i in order:  # a shared iterator: each index is taken by exactly one client
                    await send(i)
            tasks = [asyncio.ensure_future(client_loop()) for _ in range(config.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
    for r in results:
        if not r.sent:
            r.error = "not sent: the run's time limit was reached"
    ends = [r.chunk_times[-1] for r in results if r.ok]
    return LoadResult(config, model, results, start, max(ends, default=end) if not pending else end)


def run_load(config: LoadConfig) -> LoadResult:
    """Offer the configured load to the endpoint and return every request's timings. Works in a
    script and in a notebook (whose event loop is already running: the run gets its own thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_load_async(config))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run_load_async(config)).result()


def sweep(url: str, rates: list[float], num_requests: int = 16, **options) -> list[dict]:
    """Load-test at each rate in turn (same seed, same prompts); return one summary per rate, the
    points of a throughput-latency curve (with slo=SLO(...), of goodput: see capacity_at_slo).
    `options` are further LoadConfig fields."""
    return [run_load(LoadConfig(url=url, rate=rate, num_requests=num_requests, **options)).summary()
            for rate in rates]


SUMMARY_COLUMNS = [("mode", "load"), ("requests", "done"), ("failed", "failed"),
                   ("throughput_tok_s", "output (tok/s)"), ("requests_per_s", "req/s"),
                   ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                   ("tpot_p50_ms", "TPOT p50 (ms)"), ("itl_p99_ms", "ITL p99 (ms)"), ("e2e_p50_ms", "E2E p50 (ms)")]
SLO_COLUMNS = [("slo_attainment", "SLO met (share)"), ("goodput_req_s", "goodput (req/s)")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m course_lib loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="requests per second, Poisson arrivals ('inf': all at once)")
    mode.add_argument("--rates", type=float, nargs="+", metavar="RATE",
                      help="a sweep: one run per rate, then the capacity at SLO (needs --slo-ttft-ms or --slo-tpot-ms)")
    mode.add_argument("--concurrency", type=int, help="closed loop: this many clients, each one request at a time")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson (default), < 1 bursty")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective per request (ms)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT objective per request (ms)")
    p.add_argument("--slo-percentile", type=float, default=90.0,
                   help="share of requests (%%) that must meet every objective (default 90)")
    p.add_argument("--requests", type=int, default=32, help="requests to send (default 32)")
    p.add_argument("--duration", type=float, default=120.0, help="time limit in seconds (default 120)")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[64], metavar="N",
                   help="output tokens per request: N, or LO HI for log-uniform lengths (default 64)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (vLLM extension)")
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every request and the summary to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m course_lib loadgen`: run one load test, print its summary, optionally save JSON."""
    args = parse_args(list(argv or []))
    lo, hi = (args.max_tokens * 2)[:2] if len(args.max_tokens) == 1 else args.max_tokens[:2]
    try:
        slo = None
        if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:
            slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_percentile)
        elif args.rates:
            raise ValueError("--rates finds the capacity at an SLO: give --slo-ttft-ms and/or --slo-tpot-ms")
        config = LoadConfig(url=args.url, model=args.model, rate=args.rate or (args.rates[0] if args.rates else None),
                            concurrency=args.concurrency, num_requests=args.requests, duration_s=args.duration,
                            max_tokens=(lo, hi), endpoint=args.endpoint, temperature=args.temperature,
                            ignore_eos=args.ignore_eos, api_key_env=args.api_key_env, seed=args.seed, slo=slo,
                            burstiness=args.burstiness)
    except ValueError as exc:
        print(f"loadgen: {exc}")
        return 2
    if args.rates:
        return _sweep_main(args, config)
    result = run_load(config)
    print(f"{result.model} at {config.base}, {config.mode}, {config.num_requests} requests, "
          f"max_tokens {lo}-{hi}, temperature {config.temperature:g}")
    print_table([result.summary()], SUMMARY_COLUMNS + (SLO_COLUMNS if config.slo else []), digits=1)
    if config.slo is not None:
        s = result.summary()
        print(f"SLO ({config.slo.label}): met by {s['slo_attainment']:.0%} of requests -> "
              f"{'meets' if s['meets_slo'] else 'misses'} it; goodput {s['goodput_req_s']:.2f} req/s")
    errors = [r.error for r in result.requests if r.error]
    if errors:
        print(f"{len(errors)} failed, first: {errors[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if result.completed else 1


def _sweep_main(args: argparse.Namespace, config: LoadConfig) -> int:
    """`loadgen --rates ...`: one run per rate, the table, and the capacity at SLO."""
    import dataclasses

    points = [run_load(dataclasses.replace(config, rate=rate)).summary() for rate in args.rates]
    print(f"sweep at {config.base}: {len(points)} rates x {config.num_requests} requests; SLO: {config.slo.label}")
    print_table(points, [("offered_rate", "offered (req/s)")] + SUMMARY_COLUMNS[1:] + SLO_COLUMNS, digits=2)
    cap = capacity_at_slo(points)
    if cap is None:
        print("capacity at SLO: no rate met the SLO (try lower rates)")
    else:
        print(f"capacity at SLO: {cap['requests_per_s']:.2f} req/s achieved (offered {cap['offered_rate']:g} req/s), "
              f"{cap['throughput_tok_s']:.1f} output tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"slo": asdict(config.slo), "points": points,
                                               "capacity": cap}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if cap is not None else 1
