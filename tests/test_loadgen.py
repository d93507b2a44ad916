"""SLOs, goodput and capacity at SLO (course_lib.loadgen), and the cost model fed with a capacity at SLO
(course_lib.cost): hand-derived values only."""

import pytest

from course_lib.cost import ApiPrice, break_even_at_slo, cost_per_million_at_slo, replicas_at_slo
from course_lib.loadgen import SLO, capacity_at_slo, parse_args, slo_report
from course_lib.measure import RequestMetrics


def m(ttft_ms, tpot_ms, n=5):
    """A request whose first token came after ttft_ms and the n - 1 others tpot_ms apart."""
    ttft, tpot = ttft_ms / 1e3, tpot_ms / 1e3
    return RequestMetrics(ttft, ttft + (n - 1) * tpot, (tpot,) * (n - 1), n)


def test_a_request_meets_the_slo_only_when_it_meets_every_objective():
    slo = SLO(ttft_ms=500, tpot_ms=100)
    assert slo.met_by(m(500, 100)) and not slo.met_by(m(501, 50)) and not slo.met_by(m(100, 101))
    assert slo.met_by(m(400, 10_000, n=1))  # one token: no TPOT to judge
    assert SLO(ttft_ms=500).met_by(m(100, 10_000))
    assert "TTFT <= 500 ms and TPOT <= 100 ms for 90% of requests" == slo.label
    with pytest.raises(ValueError, match="percentile"):
        SLO(100, 100, percentile=0)


def test_goodput_counts_failed_requests_as_misses():
    """10 offered, 8 completed, 7 of those within the SLO, in 2 s: attainment 7/10, goodput 3.5 req/s;
    at the 70th percentile the run meets the SLO, at the 90th it does not."""
    done = [m(100, 10)] * 7 + [m(900, 10)]
    report = slo_report(done, num_offered=10, duration_s=2.0, slo=SLO(500, 50, percentile=70))
    assert report == {"slo_met_requests": 7, "slo_attainment": 0.7, "goodput_req_s": 3.5, "meets_slo": True}
    assert not slo_report(done, 10, 2.0, SLO(500, 50, percentile=90))["meets_slo"]


def test_capacity_is_the_best_achieved_throughput_that_meets_the_slo():
    points = [{"offered_rate": 1, "requests_per_s": 0.98, "meets_slo": True},
              {"offered_rate": 2, "requests_per_s": 1.9, "meets_slo": True},
              {"offered_rate": 4, "requests_per_s": 2.6, "meets_slo": False},  # faster, but late
              {"offered_rate": 3, "requests_per_s": 2.4, "meets_slo": True}]
    assert capacity_at_slo(points)["requests_per_s"] == 2.4  # achieved, not the offered 3
    assert capacity_at_slo(points[2:3]) is None


def test_cost_at_slo_by_hand():
    # 2 req/s at SLO x 100 output tokens = 200 tok/s; $2/h -> 2 / (200 * 3600) * 1e6 = $2.78 per 1M tokens.
    assert cost_per_million_at_slo(2.0, 2.0, 100) == pytest.approx(2 / 720_000 * 1e6)
    assert replicas_at_slo(5.0, 2.0) == 3 and replicas_at_slo(4.0, 2.0) == 2 and replicas_at_slo(0.1, 2.0) == 1
    # API: 500 in x $2.50/M + 100 out x $10/M = $0.00225 a query. One replica costs 2 * 24 * 30 = $1,440 a
    # month -> 1440 / (0.00225 * 30) = 21,333 queries/day, within its 2 * 86,400 = 172,800.
    api = ApiPrice("x", 2.50, 10.00)
    assert break_even_at_slo(500, 100, api, 2.0, 2.0) == pytest.approx(1440 / (0.00225 * 30))
    assert break_even_at_slo(500, 100, api, 2.0, 0.1) is None  # 8,640 queries/day is all it can serve


def test_cli_slo_options():
    args = parse_args(["--url", "http://x", "--rates", "1", "2", "--slo-ttft-ms", "800", "--slo-tpot-ms", "90",
                       "--slo-percentile", "95", "--burstiness", "0.5"])
    assert args.rates == [1.0, 2.0] and (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_percentile) == (800, 90, 95)
    assert args.burstiness == 0.5
