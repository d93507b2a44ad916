"""Measuring inference: TTFT, TPOT, ITL, percentiles, memory, roofline. Built in notebooks/03_measuring_inference.ipynb.

Definitions (as vLLM's benchmark_serving, GenAI-Perf and llmperf use them), for a request
that starts at t0 and receives its n output tokens at t_1 <= ... <= t_n:
    TTFT = t_1 - t0          E2E = t_n - t0          ITL_i = t_{i+1} - t_i  (n - 1 gaps)
    TPOT = (E2E - TTFT) / (n - 1)   (the mean ITL; undefined for n = 1)
    output tokens/s = n / E2E (the user's view)   decode tokens/s = 1 / TPOT (the engine's view)
The roofline half (bandwidth, matmul rate, decode ceiling) lives in course_lib.roofline.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.env import hardware_stamp, synchronize


@dataclass(frozen=True)
class RequestMetrics:
    """The latency figures of one request, all in seconds."""

    ttft_s: float  # request start -> first token
    e2e_s: float  # request start -> last token
    itl_s: tuple[float, ...]  # gaps between consecutive tokens (n - 1 of them)
    output_tokens: int

    @classmethod
    def from_timestamps(cls, start: float, token_times: Sequence[float]) -> "RequestMetrics":
        """Metrics from a request's start time and the arrival time of each output token."""
        times = [float(t) for t in token_times]
        if not times:
            raise ValueError("no tokens: a request needs at least one output token timestamp")
        previous = float(start)
        for i, t in enumerate(times):
            if t < previous:
                where = "the request start" if i == 0 else f"token {i - 1}"
                raise ValueError(f"timestamps go backwards: token {i} at {t} is before {where} at {previous}")
            previous = t
        itl = tuple(b - a for a, b in zip(times, times[1:]))
        return cls(ttft_s=times[0] - start, e2e_s=times[-1] - start, itl_s=itl, output_tokens=len(times))

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (n - 1); None for one token."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def output_tokens_per_s(self) -> float:
        """n / E2E: output tokens per second over the whole request, TTFT included."""
        return self.output_tokens / self.e2e_s if self.e2e_s > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float | None:
        """1 / TPOT: the generation speed once the first token is out; None for one token."""
        tpot = self.tpot_s
        if tpot is None:
            return None
        return 1.0 / tpot if tpot > 0 else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "itl_s": list(self.itl_s), "tpot_s": self.tpot_s,
                "output_tokens_per_s": self.output_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


def time_stream(token_iterator_factory: Callable[[], Iterable[Any]],
                device: torch.device | str) -> tuple[list[Any], RequestMetrics]:
    """Run a token stream and timestamp each token (device synchronized before each clock read).

    The factory is called after the start time is taken, so its setup counts toward TTFT.
    Items that are tuples (as stream_naive's (token_id, time)) are reduced to their first element.
    """
    synchronize(device)
    start = time.perf_counter()
    tokens, times = [], []
    for item in token_iterator_factory():
        synchronize(device)
        times.append(time.perf_counter())
        tokens.append(item[0] if isinstance(item, tuple) else item)
    return tokens, RequestMetrics.from_timestamps(start, times)


# ---- aggregation over requests -------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) by linear interpolation between order statistics.

    Rank r = q/100 * (n - 1) in the sorted values v; the result is v[floor(r)] plus the
    fraction of r past floor(r) times the step to the next value. This is numpy's default
    ("linear", type 7 of Hyndman & Fan).
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    v = sorted(float(x) for x in values)
    rank = q / 100 * (len(v) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


@dataclass(frozen=True)
class Summary:
    """Mean, median and tail percentiles of one metric."""

    n: int
    mean: float
    median: float
    p90: float
    p99: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values: Iterable[float]) -> Summary:
    """Mean, median (p50), p90 and p99 of a list of values."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("summarize needs at least one value")
    return Summary(n=len(v), mean=statistics.fmean(v), median=percentile(v, 50),
                   p90=percentile(v, 90), p99=percentile(v, 99))


def aggregate(requests: Sequence[RequestMetrics]) -> dict[str, Summary]:
    """Summaries over requests: ttft_s, tpot_s (requests with n >= 2), itl_s (all gaps pooled),
    e2e_s, output_tokens_per_s."""
    if not requests:
        raise ValueError("aggregate needs at least one request")
    out = {"ttft_s": summarize(r.ttft_s for r in requests),
           "e2e_s": summarize(r.e2e_s for r in requests),
           "output_tokens_per_s": summarize(r.output_tokens_per_s for r in requests)}
    tpots = [r.tpot_s for r in requests if r.tpot_s is not None]
    gaps = [g for r in requests for g in r.itl_s]
    if tpots:
        out["tpot_s"] = summarize(tpots)
    if gaps:
        out["itl_s"] = summarize(gaps)
    return out


def latency_row(requests: Sequence[RequestMetrics], quantiles: Sequence[str] = ("median", "p99"),
                names: Sequence[str] = ("ttft", "tpot", "itl", "e2e")) -> dict[str, float]:
    """Flat table columns such as ttft_p50_ms, e2e_p99_ms from aggregate(requests) (median -> p50);
    a latency that no request has (e.g. TPOT of one-token replies) is left out."""
    agg = aggregate(requests)
    return {f"{name}_{'p50' if q == 'median' else q}_ms": getattr(agg[f"{name}_s"], q) * 1e3
            for name in names if f"{name}_s" in agg for q in quantiles}


# ---- warm-up, repeats, memory --------------------------------------------------------------

def time_call(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds one call takes, with the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def repeat_timed(fn: Callable[[], Any], device: torch.device | str, repeats: int = 3,
                 warmup: int = 1) -> list[float]:
    """Run `warmup` untimed calls, then return the seconds of each of `repeats` timed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def median_time(fn: Callable[[], Any], device: torch.device | str, repeats: int = 3,
                warmup: int = 1) -> float:
    """Median seconds per call after warm-up: the number to report."""
    return statistics.median(repeat_timed(fn, device, repeats, warmup))


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory while a function ran; `method` says how it was measured."""

    peak_bytes: int  # highest memory seen during the call
    baseline_bytes: int  # memory just before the call
    method: str

    @property
    def delta_bytes(self) -> int:
        """How much the call added on top of what was already held."""
        return self.peak_bytes - self.baseline_bytes


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created while active, and the peak of their sum.

    Every op's outputs are seen here; an output that shares storage with an input (a view, an
    in-place op) is no new memory. A storage stops counting when the last tensor seen on it dies.
    Memory an op uses only internally (a kernel's workspace) is not seen."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors seen on it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0 or (key in inputs and key not in self.live):
                continue  # no storage, or an alias of memory that existed before
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str, interval_s: float = 0.002,
                method: str = "tensors") -> tuple[Any, MemoryPeak]:
    """Run fn and return (its result, MemoryPeak).

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensor memory only,
    exact). CPU/MPS, method "tensors" (default): the peak of the bytes of tensors created during
    the call and still alive, counted op by op (_LiveTensorBytes) - the same quantity as on CUDA,
    independent of the allocator. Method "rss": the process's resident set size (psutil) sampled
    every `interval_s`; it includes the allocator's cached pages, so after a warm-up it can show
    no growth at all while the call allocates hundreds of MB. (resource.getrusage's ru_maxrss
    cannot be reset, so it could not isolate one call.)
    """
    device = torch.device(device)
    if method not in ("tensors", "rss"):
        raise ValueError(f"method must be 'tensors' or 'rss', got {method!r}")
    if device.type != "cuda" and method == "tensors":
        counter = _LiveTensorBytes()
        with counter:
            result = fn()
        synchronize(device)
        return result, MemoryPeak(counter.peak, 0, "peak bytes of live tensors created during the call (op by op)")
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return result, MemoryPeak(torch.cuda.max_memory_allocated(device), base,
                                  "torch.cuda.max_memory_allocated")
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
        synchronize(device)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return result, MemoryPeak(peak[0], base, f"process RSS sampled every {interval_s * 1e3:g} ms (psutil)")


# ---- results as records --------------------------------------------------------------------

# ---- exactness: when two paths should give the same tokens -------------------------------

def first_divergence(ours: Sequence[int], ref: Sequence[int]) -> int | None:
    """Index of the first position where two token lists differ (or where the shorter one ends);
    None when they are identical."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return i
    return None if len(ours) == len(ref) else min(len(ours), len(ref))


def token_match(label: str, ours: Sequence[int], ref: Sequence[int], dtype: torch.dtype | str,
                max_logit_diff: float | None = None) -> str:
    """One line for a notebook: the two greedy token lists are identical, or where they part, with
    the largest logit difference when given, and whether parting is expected in this dtype."""
    dtype = str(dtype).removeprefix("torch.")
    gap = "" if max_logit_diff is None else f"; largest logit difference {max_logit_diff:.1e}"
    n = first_divergence(ours, ref)
    if n is None:
        return f"{label}: identical, {len(ref)} greedy tokens ({dtype}{gap})"
    if dtype == "float32":
        why = "unexpected in fp32, where both paths agree to rounding error: a bug to look for"
    else:
        why = (f"expected in {dtype}: the two paths add numbers in a different order, so they round "
               "differently, and a near-tie between two tokens flips; after that the texts differ")
    return f"{label}: first divergence at new token {n + 1} of {len(ref)}{gap} ({why})"


@dataclass
class BenchRecord:
    """One benchmark's results with everything needed to read them later (saved as JSON)."""

    name: str
    model: str  # ModelInfo.label
    dtype: str
    device: str
    settings: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # dimensionless, measured side by side
    hardware: dict = field(default_factory=lambda: hardware_stamp().as_dict())
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    caveat: str = ""  # what a reader must know before trusting the numbers ("" = none known)
    reliable: bool = True  # False: kept for the record, never priced or plotted as fact

    def save(self, path: str | Path) -> Path:
        """Write the record as indented JSON."""
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2, default=_jsonable) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BenchRecord":
        """Read a record written by save(); extra top-level keys (a `--suite all` record's
        "suites" and "errors") are ignored, a missing required key is an error naming the file."""
        data = json.loads(Path(path).read_text())
        known = {f for f in cls.__dataclass_fields__}
        missing = {"name", "model", "dtype", "device", "hardware", "ratios"} - set(data)
        if missing:
            raise ValueError(f"{path}: not a BenchRecord, missing {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def reference_records(folder: str | Path | None = None) -> dict[str, BenchRecord]:
    """Every record in data/reference_results (file name -> BenchRecord), in one schema."""
    from course_lib.paths import data_path

    folder = Path(folder) if folder is not None else data_path("reference_results")
    return {p.name: BenchRecord.load(p) for p in sorted(folder.glob("*.json"))}


def describe_record(name: str, record: BenchRecord) -> str:
    """A record's stamp, its ratios and its caveat, as a few printed lines."""
    hw = record.hardware
    where = hw.get("gpu") or f"{hw.get('cpu_cores')}-core CPU ({hw.get('cpu')})"
    lines = [f"{name}: {record.name}, {record.model}, {where}, torch {hw.get('torch')}, {record.created[:10]}"]
    lines += [f"    {k} = {v:.3g}" for k, v in record.ratios.items() if isinstance(v, (int, float))]
    if record.caveat:
        lines.append(("    UNRELIABLE: " if not record.reliable else "    caveat: ") + record.caveat)
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "as_dict"):
        return x.as_dict()
    if isinstance(x, (torch.device, torch.dtype)):
        return str(x)
    raise TypeError(f"cannot store {type(x).__name__} in a BenchRecord")


# ---- printing and plotting -----------------------------------------------------------------

def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if value != value or value in (math.inf, -math.inf):
            return str(value)
        return f"{value:,.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]] | None = None,
                 digits: int = 2) -> str:
    """Plain-text table; columns are (key, header) pairs whose header carries the unit,
    e.g. ("ttft_ms", "TTFT (ms)"). Text is left-aligned, numbers right-aligned."""
    if columns is None:
        columns = [(k, k) for k in (rows[0] if rows else {})]
    cells = [[_cell(row.get(key), digits) for key, _ in columns] for row in rows]
    widths = [max([len(head)] + [len(r[i]) for r in cells]) for i, (_, head) in enumerate(columns)]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
               for key, _ in columns]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(p.rjust(w) if num else p.ljust(w) for p, w, num in zip(parts, widths, numeric)).rstrip()

    out = [line([head for _, head in columns]), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in cells])


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]] | None = None,
                digits: int = 2) -> None:
    """Print format_table(rows, columns)."""
    print(format_table(rows, columns, digits))


def plot_token_latency(series: dict[str, Sequence[float]], title: str, ax=None):
    """Per-token latency (ms) against output position, one line per labelled series of gaps (s)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for label, gaps in series.items():
        ax.plot(range(2, len(gaps) + 2), [g * 1e3 for g in gaps], marker=".", label=label)
    ax.set(xlabel="output token position", ylabel="latency since previous token (ms)", title=title)
    ax.set_ylim(bottom=0, auto=None)  # keep autoscaling on: points a caller adds later stay in view
    ax.legend()
    return ax


def plot_cdf(series: dict[str, Sequence[float]], xlabel: str, title: str, ax=None, logx: bool = False):
    """Empirical CDF of a metric, one step line per labelled series; marks p50 and p99 of each."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for label, values in series.items():
        v = sorted(values)
        line, = ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=label)
        for q in (50, 99):
            ax.axvline(percentile(v, q), color=line.get_color(), ls=":", lw=1)
    if logx:
        ax.set_xscale("log")
        xlabel += " (log scale)"
    ax.set(xlabel=xlabel, ylabel="fraction of samples <= x", title=title + "  (dotted: p50, p99)")
    ax.legend()
    return ax
