"""Cost model: $/1M tokens, API cost, break-even. Built in notebooks/03_measuring_inference.ipynb.

Conventions: a month is `days_per_month` = 30 days (so 720 hours); a rented GPU instance is
billed for every hour it exists, busy or idle; `utilization` is the fraction of those hours in
which it produces tokens at its measured `tokens_per_s`. Self-hosted capacity is counted in
output tokens (decode is the expensive part; measure tokens_per_s with your prompt lengths so
prefill is included in it). API prices are dollars per million tokens, input and output apart.
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


def gpus_needed(workload: Workload, tokens_per_s: float, utilization: float = 1.0) -> int:
    """Instances needed to serve the workload's output tokens when each runs at `tokens_per_s`
    for a `utilization` share of the day (at least one)."""
    if tokens_per_s <= 0 or not 0 < utilization <= 1:
        raise ValueError(f"need tokens_per_s > 0 and 0 < utilization <= 1, got {tokens_per_s}, {utilization}")
    return max(1, math.ceil(workload.output_tokens_per_s / (tokens_per_s * utilization) - 1e-9))


def self_host_monthly_cost(workload: Workload, dollars_per_hour: float, tokens_per_s: float,
                           utilization: float = 1.0) -> float:
    """$ per month for enough instances, each billed 24 h a day, to serve the workload."""
    gpus = gpus_needed(workload, tokens_per_s, utilization)
    return instance_monthly_cost(dollars_per_hour, days_per_month=workload.days_per_month, gpus=gpus)


def break_even_queries_per_day(input_tokens: float, output_tokens: float, price: ApiPrice,
                               dollars_per_hour: float, tokens_per_s: float, utilization: float = 1.0,
                               days_per_month: float = DAYS_PER_MONTH) -> float | None:
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
    capacity = tokens_per_s * utilization * SECONDS_PER_DAY / output_tokens  # queries/day per instance
    volume = instance_monthly_cost(dollars_per_hour, days_per_month=days_per_month) / (per_query * days_per_month)
    return volume if volume <= capacity * (1 + 1e-12) else None
