"""Seeded request workloads and a real-time replay driver. Built in notebooks/06_batching.ipynb;
traffic-shaped workloads (bursts, shared system prompts, conversations, trace replay) in
notebooks/09_serving_real_traffic.ipynb.

A workload is a list of (arrival time, prompt, output length). Arrivals follow a Poisson process:
the gaps between requests are independent exponential draws with mean 1 / rate, which is how
independent users hitting a service look. With burstiness b != 1 the gaps are gamma draws of shape
b and the same mean (vLLM's benchmark_serving --burstiness): b < 1 bunches arrivals into bursts
separated by lulls (coefficient of variation 1 / sqrt(b)), b > 1 spaces them more evenly. Prompt lengths are uniform on [lo, hi] tokens. Output
lengths are log-uniform on [lo, hi] (uniform in log space: many short replies, a few long ones,
as in chat traffic); each request asks for exactly that many tokens (max_new_tokens, no stop
token), as serving benchmarks do with ignore_eos, so every engine does the same work.

Traffic that looks like production:
    shared_prefix_workload  - many users, one long system prompt in front of each short message;
    conversation_workload   - multi-turn chats: each turn's prompt is the previous turn's prompt +
                              the answer the engine gave + a new message, sent a think time after
                              the answer (WorkloadItem.follows names the previous turn);
    trace_workload          - a request log of (timestamp, prompt tokens, output tokens) rows, such
                              as data/traces/azure_llm_code_2023_head64.csv (load_trace), with its
                              token counts and its clock scaled to the machine.

replay() runs a workload against an engine in real wall-clock time: a request is handed to the
engine once its arrival time has passed, the engine steps while it has work, and the driver
sleeps until the next arrival when it is idle. TTFT and E2E count from the arrival, so time spent
queued is part of them.
"""

from __future__ import annotations

import csv
import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from course_lib.generation import SamplingConfig
from course_lib.measure import RequestMetrics, latency_row
from course_lib.scheduler import Request, RequestStatus


@dataclass(frozen=True)
class WorkloadConfig:
    """How a synthetic request stream is drawn (all seeded)."""

    num_requests: int = 16
    rate: float = 2.0  # mean arrivals per second (Poisson); math.inf: everything arrives at t = 0
    prompt_len: tuple[int, int] = (16, 64)  # uniform, tokens (ignored when prompts come from a pool)
    output_len: tuple[int, int] = (4, 64)  # log-uniform, tokens
    seed: int = 0
    burstiness: float = 1.0  # gamma shape of the gaps: 1 Poisson, < 1 bursty, > 1 evenly spaced

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (math.inf for all at once), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0 (1: Poisson), got {self.burstiness}")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")


@dataclass(frozen=True)
class WorkloadItem:
    """One request of a workload, before it is turned into an engine Request."""

    arrival_s: float  # seconds after the start of the replay; with `follows`, after that turn's answer
    prompt_ids: tuple[int, ...]  # with `follows`: the new message, appended to that turn's prompt + answer
    output_len: int  # max_new_tokens
    follows: int | None = None  # index of the previous turn of the same conversation


def next_gap(rng: random.Random, rate: float, burstiness: float = 1.0) -> float:
    """One inter-arrival gap, mean 1 / rate: exponential (Poisson arrivals) at burstiness 1, else
    gamma with shape burstiness and scale 1 / (rate * burstiness)."""
    if not math.isfinite(rate):
        return 0.0
    if burstiness == 1.0:
        return rng.expovariate(rate)  # exponential gaps = Poisson arrivals
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi], uniform in log space (many small, a few large)."""
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def make_workload(config: WorkloadConfig, vocab_size: int | None = None,
                  prompt_pool: Sequence[Sequence[int]] | None = None) -> list[WorkloadItem]:
    """Draw a workload: Poisson arrivals, prompts (random token ids of uniform length, or picked at
    random from prompt_pool) and log-uniform output lengths. Same config, same workload."""
    if prompt_pool is None and vocab_size is None:
        raise ValueError("give vocab_size (random prompts) or prompt_pool (real tokenized prompts)")
    rng = random.Random(config.seed)
    items, t = [], 0.0
    for i in range(config.num_requests):
        if i > 0:
            t += next_gap(rng, config.rate, config.burstiness)
        if prompt_pool is not None:
            prompt = tuple(rng.choice(prompt_pool))
        else:
            prompt = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*config.prompt_len)))
        items.append(WorkloadItem(t, prompt, log_uniform(rng, *config.output_len)))
    return items


def shared_prefix_workload(num_requests: int, rate: float, vocab_size: int, system_len: int = 256,
                           message_len: tuple[int, int] = (8, 32), output_len: tuple[int, int] = (8, 32),
                           num_system_prompts: int = 1, burstiness: float = 1.0, seed: int = 0) -> list[WorkloadItem]:
    """Many users behind one product: each prompt is one of num_system_prompts long system prompts
    (system_len random tokens) + a user message (uniform length); log-uniform outputs."""
    rng = random.Random(seed)
    systems = [tuple(rng.randrange(vocab_size) for _ in range(system_len)) for _ in range(num_system_prompts)]
    items, t = [], 0.0
    for i in range(num_requests):
        t += next_gap(rng, rate, burstiness) if i else 0.0
        message = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*message_len)))
        items.append(WorkloadItem(t, rng.choice(systems) + message, log_uniform(rng, *output_len)))
    return items


def conversation_workload(num_users: int, turns: int, rate: float, vocab_size: int, system_len: int = 64,
                          message_len: tuple[int, int] = (8, 32), output_len: tuple[int, int] = (8, 32),
                          think_s: float = 0.5, burstiness: float = 1.0, seed: int = 0) -> list[WorkloadItem]:
    """Multi-turn chats: users start at `rate` per second; a user's first prompt is a shared system
    prompt + a message, each later turn a new message sent think_s after the previous answer (its
    prompt, built by replay, is the whole conversation so far). Items are in user-major order."""
    rng = random.Random(seed)
    system = tuple(rng.randrange(vocab_size) for _ in range(system_len))
    items, t = [], 0.0
    for u in range(num_users):
        t += next_gap(rng, rate, burstiness) if u else 0.0
        for k in range(turns):
            message = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*message_len)))
            out = log_uniform(rng, *output_len)
            if k == 0:
                items.append(WorkloadItem(t, system + message, out))
            else:
                items.append(WorkloadItem(think_s, message, out, follows=len(items) - 1))
    return items


@dataclass(frozen=True)
class TraceRow:
    """One request of a production log."""

    time_s: float  # arrival, seconds after the log's first request
    prompt_tokens: int
    output_tokens: int


def load_trace(path: str | Path) -> list[TraceRow]:
    """Rows of a CSV request log with columns TIMESTAMP, ContextTokens, GeneratedTokens (the Azure LLM
    inference trace's layout), in arrival order, times relative to the first."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    stamps = [datetime.fromisoformat(r["TIMESTAMP"].strip()[:26]) for r in rows]
    start = min(stamps)
    out = [TraceRow((s - start).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
           for s, r in zip(stamps, rows)]
    return sorted(out, key=lambda r: r.time_s)


def trace_workload(rows: Sequence[TraceRow], vocab_size: int, token_scale: float = 1.0, time_scale: float = 1.0,
                   max_prompt: int | None = None, max_output: int | None = None, seed: int = 0) -> list[WorkloadItem]:
    """Replay a trace scaled to this machine: prompt lengths x token_scale (at least 1, at most
    max_prompt), output lengths as logged (at most max_output), arrival times x time_scale (> 1
    stretches the log: fewer requests per second). The log has no text: prompts are seeded
    random token ids of those lengths."""
    if token_scale <= 0 or time_scale <= 0:
        raise ValueError(f"token_scale and time_scale must be > 0, got {token_scale}, {time_scale}")
    rng = random.Random(seed)
    items = []
    for r in rows:
        n = max(1, round(r.prompt_tokens * token_scale))
        n = min(n, max_prompt) if max_prompt else n
        out = max(1, min(r.output_tokens, max_output) if max_output else r.output_tokens)
        items.append(WorkloadItem(r.time_s * time_scale, tuple(rng.randrange(vocab_size) for _ in range(n)), out))
    return items


def to_requests(workload: Sequence[WorkloadItem], sampling: SamplingConfig = SamplingConfig(),
                stop_ids: Sequence[int] = ()) -> list[Request]:
    """Fresh engine Requests for a workload (requests hold state, so each replay needs new ones).
    A conversation's later turns depend on earlier answers: replay() builds those itself."""
    if any(w.follows is not None for w in workload):
        raise ValueError("a conversation's later turns need the earlier answers: use replay()")
    return [Request(list(w.prompt_ids), w.output_len, sampling, frozenset(stop_ids), seed=i)
            for i, w in enumerate(workload)]


@dataclass
class ReplayResult:
    """Per-request metrics and engine-level numbers of one replay."""

    requests: list[Request]  # in workload order (rejected ones included)
    start: float  # time.perf_counter() at t = 0 of the workload
    end: float  # when the last request finished
    history: list  # the engine's StepRecords

    @property
    def completed(self) -> list[Request]:
        return [r for r in self.requests if r.status is RequestStatus.FINISHED]

    @property
    def metrics(self) -> list[RequestMetrics]:
        """TTFT / ITL / E2E of each completed request, measured from its arrival."""
        return [r.metrics() for r in self.completed]

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    @property
    def output_tokens(self) -> int:
        return sum(len(r.output_ids) for r in self.completed)

    def summary(self) -> dict:
        """Throughput (output tok/s, requests/s over the whole replay) and TTFT/TPOT/E2E percentiles."""
        row = {"requests": len(self.completed), "rejected": len(self.requests) - len(self.completed),
               "duration_s": self.duration_s, "output_tokens": self.output_tokens,
               "throughput_tok_s": self.output_tokens / self.duration_s,
               "requests_per_s": len(self.completed) / self.duration_s,
               "max_waiting": max((h.waiting for h in self.history), default=0)}
        row.update(latency_row(self.metrics, ("median", "p99"), ("ttft", "tpot", "e2e")))
        return row


def replay(engine, workload: Sequence[WorkloadItem], sampling: SamplingConfig = SamplingConfig(),
           stop_ids: Sequence[int] = ()) -> ReplayResult:
    """Replay a workload against an engine in real time (wall clock, time.perf_counter): hand each
    request over when its arrival time has passed (a conversation's next turn: think time after the
    previous answer, its prompt = that turn's prompt + answer + the new message), step while there
    is work, sleep when idle."""
    requests: list[Request | None] = [None] * len(workload)
    follow_up = {w.follows: i for i, w in enumerate(workload) if w.follows is not None}  # turn -> next turn
    due = [(w.arrival_s, i) for i, w in enumerate(workload) if w.follows is None]  # (seconds, index) heap
    heapq.heapify(due)
    waiting_on: set[int] = set()  # turns whose answer a later turn waits for
    first_step = len(engine.history)  # an engine may be reused: keep only this replay's steps
    start = time.perf_counter()
    while due or engine.has_unfinished() or waiting_on:
        now = time.perf_counter() - start
        while due and due[0][0] <= now:
            t, i = heapq.heappop(due)
            w = workload[i]
            prompt = list(w.prompt_ids)
            if w.follows is not None:
                prev = requests[w.follows]
                prompt = prev.prompt_ids + prev.output_ids + prompt
            requests[i] = Request(prompt, w.output_len, sampling, frozenset(stop_ids), seed=i,
                                  arrival_time=start + t)  # the scheduled arrival, not when we noticed
            engine.add_request(requests[i])
            if i in follow_up:
                waiting_on.add(i)
        if engine.has_unfinished():
            engine.step()
        for i in [i for i in waiting_on if requests[i].is_done]:
            waiting_on.discard(i)
            answered = requests[i].token_times[-1] if requests[i].token_times else time.perf_counter()
            heapq.heappush(due, (answered - start + workload[follow_up[i]].arrival_s, follow_up[i]))
        if not engine.has_unfinished() and due:
            time.sleep(max(0.0, due[0][0] - (time.perf_counter() - start)))
    done = [r.token_times[-1] for r in requests if r.token_times]
    return ReplayResult(requests, start, max(done, default=start), engine.history[first_step:])
