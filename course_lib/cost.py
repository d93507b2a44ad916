"""Cost model: $/1M tokens, API cost, break-even. Built in notebooks/03_measuring_inference.ipynb;
from a capacity at SLO (replicas, $/1M tokens, break-even) in notebooks/09_serving_real_traffic.ipynb.

Conventions: a month is `days_per_month` = 30 days (so 720 hours); a rented GPU instance is
billed for every hour it exists, busy or idle; `utilization` is the fraction of those hours in
which it produces tokens at its measured `tokens_per_s`. A query costs an instance its output
tokens at `tokens_per_s` plus, when `prefill_tokens_per_s` is given, its prompt tokens at that rate
(an API bills the prompt too; the GPU's prefill is not free). Without it, `tokens_per_s` must be
measured end to end with your prompt lengths, so that prefill is inside it. API prices are
dollars per million tokens, input and output apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DAYS_PER_MONTH = 30.0
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class ApiPrice:
    """A managed API's list price."""

    name: str
    input_per_m: float  # $ per 1M input (prompt) tokens
    output_per_m: float  # $ per 1M output (generated) tokens


# Prices as the article quotes them ("as of early 2026"); check the providers' pages before use.
ARTICLE_PRICES: dict[str, ApiPrice] = {
    "gpt-4o-mini": ApiPrice("GPT-4o mini", 0.15, 0.60),
    "gpt-4o": ApiPrice("GPT-4o", 2.50, 10.00),
    "claude-3.5-sonnet": ApiPrice("Claude 3.5 Sonnet", 3.00, 15.00),
}


@dataclass(frozen=True)
class Workload:
    """A product's traffic: how many requests, how long each."""

    queries_per_day: float
    input_tokens: float  # per query
    output_tokens: float  # per query
    days_per_month: float = DAYS_PER_MONTH

    def __post_init__(self) -> None:
        if min(self.queries_per_day, self.input_tokens, self.output_tokens) < 0 or self.days_per_month <= 0:
            raise ValueError(f"a workload needs non-negative volumes and days_per_month > 0: {self}")

    @property
    def queries_per_month(self) -> float:
        return self.queries_per_day * self.days_per_month

    @property
    def output_tokens_per_s(self) -> float:
        """Average output tokens per second the workload asks for, spread over the whole day."""
        return self.queries_per_day * self.output_tokens / SECONDS_PER_DAY


def cost_per_million_tokens(dollars_per_hour: float, tokens_per_s: float, utilization: float = 1.0) -> float:
    """$ per 1M tokens from an instance's hourly price, its throughput when busy, and the
    fraction of paid hours it is busy: $/h / (tokens/s * 3600 * utilization) * 1e6."""
    if tokens_per_s <= 0 or not 0 < utilization <= 1:
        raise ValueError(f"need tokens_per_s > 0 and 0 < utilization <= 1, got {tokens_per_s}, {utilization}")
    return dollars_per_hour / (tokens_per_s * 3600 * utilization) * 1e6


def instance_monthly_cost(dollars_per_hour: float, hours_per_day: float = 24.0,
                          days_per_month: float = DAYS_PER_MONTH, gpus: int = 1) -> float:
    """$ per month for `gpus` instances billed `hours_per_day` (24 for one that stays up)."""
    return gpus * dollars_per_hour * hours_per_day * days_per_month


def api_monthly_cost(workload: Workload, price: ApiPrice) -> float:
    """$ per month for a workload on a managed API: input and output tokens at their prices."""
    per_query = (workload.input_tokens * price.input_per_m + workload.output_tokens * price.output_per_m) / 1e6
    return per_query * workload.queries_per_month


def query_seconds(input_tokens: float, output_tokens: float, tokens_per_s: float,
                  prefill_tokens_per_s: float | None = None) -> float:
    """Busy seconds one query costs an instance: output at tokens_per_s, plus the prompt at
    prefill_tokens_per_s (None: prefill is already inside tokens_per_s)."""
    if tokens_per_s <= 0 or (prefill_tokens_per_s is not None and prefill_tokens_per_s <= 0):
        raise ValueError(f"need tokens_per_s > 0 and prefill_tokens_per_s > 0 or None, got {tokens_per_s}, {prefill_tokens_per_s}")
    return output_tokens / tokens_per_s + (input_tokens / prefill_tokens_per_s if prefill_tokens_per_s else 0.0)


def gpus_needed(workload: Workload, tokens_per_s: float, utilization: float = 1.0,
                prefill_tokens_per_s: float | None = None) -> int:
    """Instances needed to serve the workload when each is busy a `utilization` share of the day,
    decoding at `tokens_per_s` (and prefilling at `prefill_tokens_per_s`, if given); at least one."""
    if not 0 < utilization <= 1:
        raise ValueError(f"need 0 < utilization <= 1, got {utilization}")
    busy = workload.queries_per_day * query_seconds(workload.input_tokens, workload.output_tokens,
                                                    tokens_per_s, prefill_tokens_per_s)  # seconds per day
    return max(1, math.ceil(busy / (SECONDS_PER_DAY * utilization) - 1e-9))


def self_host_monthly_cost(workload: Workload, dollars_per_hour: float, tokens_per_s: float,
                           utilization: float = 1.0, prefill_tokens_per_s: float | None = None) -> float:
    """$ per month for enough instances, each billed 24 h a day, to serve the workload."""
    gpus = gpus_needed(workload, tokens_per_s, utilization, prefill_tokens_per_s)
    return instance_monthly_cost(dollars_per_hour, days_per_month=workload.days_per_month, gpus=gpus)


def break_even_queries_per_day(input_tokens: float, output_tokens: float, price: ApiPrice,
                               dollars_per_hour: float, tokens_per_s: float, utilization: float = 1.0,
                               days_per_month: float = DAYS_PER_MONTH,
                               prefill_tokens_per_s: float | None = None) -> float | None:
    """The smallest queries/day at which self-hosting costs no more than the API; None if never.

    API cost grows linearly with volume (c per query); self-hosting costs n instances * H a month
    where n = ceil(volume / one instance's capacity C). One instance pays for itself at
    H / (c * days) queries/day, provided that is within its capacity C; if a full instance's
    capacity is worth less than H at API prices, adding instances never helps and the answer is
    None. Just past each n -> n+1 step the API can be cheaper again for a while.
    """
    per_query = (input_tokens * price.input_per_m + output_tokens * price.output_per_m) / 1e6
    if per_query <= 0 or output_tokens <= 0:
        raise ValueError("break-even needs a positive API price per query and output tokens per query")
    if not 0 < utilization <= 1:
        raise ValueError(f"need 0 < utilization <= 1, got {utilization}")
    # queries/day per instance: its busy seconds a day over what one query costs it
    capacity = utilization * SECONDS_PER_DAY / query_seconds(input_tokens, output_tokens, tokens_per_s, prefill_tokens_per_s)
    volume = instance_monthly_cost(dollars_per_hour, days_per_month=days_per_month) / (per_query * days_per_month)
    return volume if volume <= capacity * (1 + 1e-12) else None


# ---- from a measured capacity at an SLO (notebooks/09_serving_real_traffic.ipynb) -------------------
# A load test's capacity at SLO is the most completed requests/s one replica sustains while its
# latency objectives hold, measured end to end with the real prompt and output lengths: prefill
# is inside it. Provisioning for the peak rate at that capacity is what keeps the SLO.

def replicas_at_slo(peak_requests_per_s: float, capacity_requests_per_s: float) -> int:
    """Replicas that serve the peak rate without any one passing its capacity at SLO (at least one)."""
    if capacity_requests_per_s <= 0 or peak_requests_per_s < 0:
        raise ValueError(f"need capacity > 0 and peak >= 0 requests/s, got {capacity_requests_per_s}, {peak_requests_per_s}")
    return max(1, math.ceil(peak_requests_per_s / capacity_requests_per_s - 1e-9))


def cost_per_million_at_slo(dollars_per_hour: float, capacity_requests_per_s: float,
                            output_tokens_per_request: float, utilization: float = 1.0) -> float:
    """$ per 1M output tokens of a replica run at its capacity at SLO a `utilization` share of the time."""
    return cost_per_million_tokens(dollars_per_hour, capacity_requests_per_s * output_tokens_per_request, utilization)


def break_even_at_slo(input_tokens: float, output_tokens: float, price: ApiPrice, dollars_per_hour: float,
                      capacity_requests_per_s: float, utilization: float = 1.0,
                      days_per_month: float = DAYS_PER_MONTH) -> float | None:
    """Queries/day from which self-hosting at the capacity at SLO costs no more than the API (None if
    never): break_even_queries_per_day with capacity x output tokens as the end-to-end tokens/s."""
    return break_even_queries_per_day(input_tokens, output_tokens, price, dollars_per_hour,
                                      capacity_requests_per_s * output_tokens, utilization, days_per_month)
