"""Seeded request workloads and a real-time replay driver. Built in notebooks/06_batching.ipynb.

A workload is a list of (arrival time, prompt, output length). Arrivals follow a Poisson process:
the gaps between requests are independent exponential draws with mean 1 / rate, which is how
independent users hitting a service look. Prompt lengths are uniform on [lo, hi] tokens. Output
lengths are log-uniform on [lo, hi] (uniform in log space: many short replies, a few long ones,
as in chat traffic); each request asks for exactly that many tokens (max_new_tokens, no stop
token), as serving benchmarks do with ignore_eos, so every engine does the same work.

replay() runs a workload against an engine in real wall-clock time: a request is handed to the
engine once its arrival time has passed, the engine steps while it has work, and the driver
sleeps until the next arrival when it is idle. TTFT and E2E count from the arrival, so time spent
queued is part of them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

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

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (math.inf for all at once), got {self.rate}")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")


@dataclass(frozen=True)
class WorkloadItem:
    """One request of a workload, before it is turned into an engine Request."""

    arrival_s: float  # seconds after the start of the replay
    prompt_ids: tuple[int, ...]
    output_len: int  # max_new_tokens


def make_workload(config: WorkloadConfig, vocab_size: int | None = None,
                  prompt_pool: Sequence[Sequence[int]] | None = None) -> list[WorkloadItem]:
    """Draw a workload: Poisson arrivals, prompts (random token ids of uniform length, or picked at
    random from prompt_pool) and log-uniform output lengths. Same config, same workload."""
    if prompt_pool is None and vocab_size is None:
        raise ValueError("give vocab_size (random prompts) or prompt_pool (real tokenized prompts)")
    rng = random.Random(config.seed)
    items, t = [], 0.0
    for i in range(config.num_requests):
        if i > 0 and math.isfinite(config.rate):
            t += rng.expovariate(config.rate)  # exponential gaps = Poisson arrivals
        if prompt_pool is not None:
            prompt = tuple(rng.choice(prompt_pool))
        else:
            prompt = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*config.prompt_len)))
        lo, hi = config.output_len
        output_len = min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))
        items.append(WorkloadItem(t, prompt, output_len))
    return items


def to_requests(workload: Sequence[WorkloadItem], sampling: SamplingConfig = SamplingConfig(),
                stop_ids: Sequence[int] = ()) -> list[Request]:
    """Fresh engine Requests for a workload (requests hold state, so each replay needs new ones)."""
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
    request over when its arrival time has passed, step while there is work, sleep when idle."""
    requests = to_requests(workload, sampling, stop_ids)
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    first_step = len(engine.history)  # an engine may be reused: keep only this replay's steps
    start, nxt = time.perf_counter(), 0
    while nxt < len(order) or engine.has_unfinished():
        now = time.perf_counter() - start
        while nxt < len(order) and workload[order[nxt]].arrival_s <= now:
            i = order[nxt]
            requests[i].arrival_time = start + workload[i].arrival_s  # the scheduled arrival, not when we noticed
            engine.add_request(requests[i])
            nxt += 1
        if engine.has_unfinished():
            engine.step()
        elif nxt < len(order):
            time.sleep(max(0.0, workload[order[nxt]].arrival_s - (time.perf_counter() - start)))
    done = [r.token_times[-1] for r in requests if r.token_times]
    return ReplayResult(requests, start, max(done, default=start), engine.history[first_step:])
