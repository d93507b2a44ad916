"""The cost model, checked on the article's own worked examples (and where they do not add up)."""

import math

import pytest

from course_lib.cost import (
    ARTICLE_PRICES,
    ApiPrice,
    Workload,
    api_monthly_cost,
    break_even_queries_per_day,
    cost_per_million_tokens,
    gpus_needed,
    instance_monthly_cost,
    self_host_monthly_cost,
)

MINI, GPT4O, SONNET = ARTICLE_PRICES["gpt-4o-mini"], ARTICLE_PRICES["gpt-4o"], ARTICLE_PRICES["claude-3.5-sonnet"]
# The article's example: 100,000 queries/day, 500 input + 300 output tokens each (30-day month).
ARTICLE_WORKLOAD = Workload(queries_per_day=100_000, input_tokens=500, output_tokens=300)
# The article's self-hosting example: A100 80GB at ~$2/hour, ~100 tokens/s, 50% utilization.
A100_PER_HOUR, A100_TOKENS_PER_S, A100_UTILIZATION = 2.0, 100.0, 0.5


def test_article_api_example_per_model():
    # 50M input + 30M output tokens a day.
    # mini: 50 * 0.15 + 30 * 0.60 = $25.50/day -> $765/month
    # 4o:   50 * 2.50 + 30 * 10   = $425/day   -> $12,750/month
    # Sonnet (article: $3/$15): 50 * 3 + 30 * 15 = $600/day -> $18,000/month
    assert api_monthly_cost(ARTICLE_WORKLOAD, MINI) == pytest.approx(765.0)
    assert api_monthly_cost(ARTICLE_WORKLOAD, GPT4O) == pytest.approx(12_750.0)
    assert api_monthly_cost(ARTICLE_WORKLOAD, SONNET) == pytest.approx(18_000.0)


def test_article_api_range_does_not_add_up():
    # The article puts this workload at "$4,000-$16,000 per month depending on model choice".
    # With its own prices, GPT-4o mini costs $765 (over 5x below the range's low end), GPT-4o
    # $12,750 (inside), Claude 3.5 Sonnet $18,000 (above the high end). No quoted model costs
    # $4,000, so the low end matches none of them.
    low, high = 4_000.0, 16_000.0
    mini = api_monthly_cost(ARTICLE_WORKLOAD, MINI)
    assert mini < low / 5
    assert low <= api_monthly_cost(ARTICLE_WORKLOAD, GPT4O) <= high
    assert api_monthly_cost(ARTICLE_WORKLOAD, SONNET) > high
    assert all(not math.isclose(api_monthly_cost(ARTICLE_WORKLOAD, p), low, rel_tol=0.1)
               for p in ARTICLE_PRICES.values())


def test_article_price_ratio_17x_holds():
    # "GPT-4o mini ... 17x cheaper than GPT-4o". Both prices scale by 2.50 / 0.15 = 10 / 0.60 = 50/3,
    # so the monthly bills of any workload do too: $12,750 / $765 = 16.67 (hand-derived above).
    assert api_monthly_cost(ARTICLE_WORKLOAD, GPT4O) / api_monthly_cost(ARTICLE_WORKLOAD, MINI) == pytest.approx(50 / 3)
    one_query = Workload(queries_per_day=1, input_tokens=1_000_000, output_tokens=0, days_per_month=1)
    assert api_monthly_cost(one_query, GPT4O) == pytest.approx(2.50)  # 1M input tokens at $2.50/M


def test_a100_monthly_cost_bills_only_busy_hours_in_article():
    # A rented instance is billed every hour: $2 * 24 * 30 = $1,440/month (hand-derived).
    # The article's "~$720 at 50% utilization" is $2 * 12 * 30: the bill of only the busy hours.
    assert instance_monthly_cost(A100_PER_HOUR) == pytest.approx(1_440.0)
    assert instance_monthly_cost(A100_PER_HOUR, hours_per_day=12) == pytest.approx(720.0)
    assert instance_monthly_cost(A100_PER_HOUR, gpus=3, days_per_month=31) == pytest.approx(2 * 24 * 31 * 3)


def test_a100_tokens_and_api_equivalence_off_by_an_order_of_magnitude():
    # 100 tokens/s at 50% utilization: 100 * 0.5 * 86,400 * 30 = 129.6M tokens/month (~130M), i.e.
    # 4.32M a day, 14,400 queries of 300 output tokens: one A100 serves exactly that many.
    assert Workload(14_400, 500, 300).output_tokens_per_s == pytest.approx(50.0)  # = 100 tok/s * 0.5
    assert gpus_needed(Workload(14_400, 500, 300), A100_TOKENS_PER_S, A100_UTILIZATION) == 1
    # The article calls $720/month "equivalent to processing roughly 100M tokens via GPT-4o mini".
    # 100M tokens on mini cost $15 (all input, $0.15/M) to $60 (all output, $0.60/M), so $720 is
    # 12x to 48x too high: the equivalence is off by more than an order of magnitude.
    all_input = Workload(queries_per_day=100e6 / 30, input_tokens=1, output_tokens=0)
    all_output = Workload(queries_per_day=100e6 / 30, input_tokens=0, output_tokens=1)
    cheap, dear = api_monthly_cost(all_input, MINI), api_monthly_cost(all_output, MINI)
    assert (cheap, dear) == (pytest.approx(15.0), pytest.approx(60.0))
    assert not cheap <= instance_monthly_cost(A100_PER_HOUR, hours_per_day=12) <= dear  # $720 is far above both
    # What the A100 really costs per token, billed full time: $2 / (100 tok/s * 3600 * 0.5) = $11.11/M,
    # about 19x GPT-4o mini's output price.
    per_m = cost_per_million_tokens(A100_PER_HOUR, A100_TOKENS_PER_S, A100_UTILIZATION)
    assert per_m == pytest.approx(11.111, abs=1e-3)
    assert per_m / MINI.output_per_m > 10


def test_break_even_article_a100():
    # Against GPT-4o mini the A100 never pays: its whole capacity (14,400 queries/day of the
    # article's shape) is worth $110/month at mini prices, less than its $1,440 bill.
    assert break_even_queries_per_day(500, 300, MINI, A100_PER_HOUR, A100_TOKENS_PER_S, A100_UTILIZATION) is None
    # Against GPT-4o ($0.00425/query) it pays from 1,440 / (0.00425 * 30) = 11,294 queries/day.
    volume = break_even_queries_per_day(500, 300, GPT4O, A100_PER_HOUR, A100_TOKENS_PER_S, A100_UTILIZATION)
    assert volume == pytest.approx(1_440 / (0.00425 * 30))
    at = Workload(volume, 500, 300)
    assert self_host_monthly_cost(at, A100_PER_HOUR, A100_TOKENS_PER_S, A100_UTILIZATION) == pytest.approx(
        api_monthly_cost(at, GPT4O))
    below = Workload(volume * 0.9, 500, 300)
    assert self_host_monthly_cost(below, A100_PER_HOUR, A100_TOKENS_PER_S, A100_UTILIZATION) > api_monthly_cost(below, GPT4O)


def test_gpus_needed_and_self_host_scale_with_volume():
    # One A100 at 100 tok/s, 50% busy, makes 4.32M output tokens a day = 14,400 queries of 300 tokens.
    assert gpus_needed(Workload(14_400, 500, 300), 100, 0.5) == 1
    assert gpus_needed(Workload(14_401, 500, 300), 100, 0.5) == 2
    assert gpus_needed(ARTICLE_WORKLOAD, 100, 0.5) == 7  # 30M tokens/day / 4.32M = 6.9
    assert self_host_monthly_cost(ARTICLE_WORKLOAD, 2.0, 100, 0.5) == pytest.approx(7 * 1_440)
    assert gpus_needed(Workload(0, 0, 0), 100) == 1


def test_cost_per_million_tokens_formula():
    assert cost_per_million_tokens(3.6, 1.0) == pytest.approx(1e6 / 1000)  # $0.001 per token-second
    assert cost_per_million_tokens(2.0, 100, 0.25) == pytest.approx(2 * cost_per_million_tokens(2.0, 100, 0.5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dollars_per_hour=2.0, tokens_per_s=0), "tokens_per_s > 0"),
    (dict(dollars_per_hour=2.0, tokens_per_s=10, utilization=0), "utilization"),
    (dict(dollars_per_hour=2.0, tokens_per_s=10, utilization=1.5), "utilization"),
])
def test_cost_per_million_tokens_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cost_per_million_tokens(**kwargs)


def test_bad_workload_and_break_even_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        Workload(-1, 500, 300)
    with pytest.raises(ValueError, match="days_per_month"):
        Workload(1, 500, 300, days_per_month=0)
    with pytest.raises(ValueError, match="positive API price"):
        break_even_queries_per_day(500, 300, ApiPrice("free", 0, 0), 2.0, 100)


def test_prefill_is_not_free_on_the_gpu():
    """Hand-derived: 500 in / 300 out at 100 decode tok/s and 1,000 prefill tok/s costs the GPU
    3 + 0.5 = 3.5 busy seconds; at 50% utilization one GPU serves 43,200 / 3.5 = 12,342.9 queries a
    day (14,400 if the prompt were free). GPT-4o at $2/h: $1,440 a month / ($0.00425 x 30) =
    11,294.1 queries/day, within that capacity; with prefill at only 200 tok/s a query costs 5.5 s,
    capacity drops to 7,854.5 and the break-even disappears."""
    from course_lib.cost import query_seconds

    assert query_seconds(500, 300, 100, 1_000) == pytest.approx(3.5)
    assert query_seconds(500, 300, 100) == pytest.approx(3.0)
    assert break_even_queries_per_day(500, 300, GPT4O, 2.0, 100, 0.5, prefill_tokens_per_s=1_000) == pytest.approx(
        1_440 / (0.00425 * 30))
    assert break_even_queries_per_day(500, 300, GPT4O, 2.0, 100, 0.5, prefill_tokens_per_s=200) is None
    assert gpus_needed(Workload(12_342, 500, 300), 100, 0.5, prefill_tokens_per_s=1_000) == 1
    assert gpus_needed(Workload(12_343, 500, 300), 100, 0.5, prefill_tokens_per_s=1_000) == 2
    assert gpus_needed(Workload(14_400, 500, 300), 100, 0.5) == 1  # the free-prompt view needs one fewer GPU
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        query_seconds(500, 300, 100, 0)
