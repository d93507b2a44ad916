"""Metric arithmetic on synthetic timestamps, percentiles, records, tables and roofline arithmetic."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from course_lib.measure import (
    BenchRecord,
    RequestMetrics,
    aggregate,
    format_table,
    peak_memory,
    percentile,
    repeat_timed,
    summarize,
    time_stream,
)
from course_lib.roofline import (
    compute_ceiling_tokens_per_s,
    decode_ceiling_tokens_per_s,
    kv_bytes_per_position,
    model_decode_ceiling,
    roofline_fraction,
)

# Times chosen as exact binary fractions, so every difference below is exact in floating point.
START = 1.0
TIMES = [1.25, 1.375, 1.5, 1.75, 2.0]


def test_request_metrics_from_timestamps():
    m = RequestMetrics.from_timestamps(START, TIMES)
    assert m.ttft_s == 0.25
    assert m.e2e_s == 1.0
    assert m.itl_s == (0.125, 0.125, 0.25, 0.25)
    assert m.output_tokens == 5
    assert m.tpot_s == 0.75 / 4  # (E2E - TTFT) / (n - 1)
    assert m.tpot_s == sum(m.itl_s) / len(m.itl_s)  # TPOT is the mean ITL of one request
    assert m.output_tokens_per_s == 5.0
    assert m.decode_tokens_per_s == 4 / 0.75


def test_single_token_request_has_no_tpot():
    m = RequestMetrics.from_timestamps(0.0, [0.5])
    assert (m.ttft_s, m.e2e_s, m.itl_s, m.output_tokens) == (0.5, 0.5, (), 1)
    assert m.tpot_s is None and m.decode_tokens_per_s is None
    assert m.output_tokens_per_s == 2.0


def test_bad_timestamps_raise():
    with pytest.raises(ValueError, match="no tokens"):
        RequestMetrics.from_timestamps(0.0, [])
    with pytest.raises(ValueError, match="backwards.*token 2"):
        RequestMetrics.from_timestamps(0.0, [0.1, 0.3, 0.2])
    with pytest.raises(ValueError, match="backwards.*request start"):
        RequestMetrics.from_timestamps(1.0, [0.5, 1.5])


def test_percentile_linear_interpolation_exact():
    values = [50, 10, 40, 20, 30]  # sorted: 10 20 30 40 50, ranks 0..4
    assert percentile(values, 0) == 10
    assert percentile(values, 50) == 30
    assert percentile(values, 90) == pytest.approx(46.0, abs=1e-12)  # rank 3.6 -> 40 + 0.6 * 10
    assert percentile(values, 99) == pytest.approx(49.6, abs=1e-12)  # rank 3.96 -> 40 + 0.96 * 10
    assert percentile(values, 100) == 50
    assert percentile([7.0], 99) == 7.0
    # Two values: p99 sits 99% of the way from the smaller to the larger.
    assert percentile([0.0, 100.0], 99) == pytest.approx(99.0, abs=1e-12)


def test_percentile_matches_numpy_default():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 37, 101):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_percentile_bad_input():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_summarize_and_aggregate():
    s = summarize([1, 2, 3, 4])
    assert (s.n, s.mean, s.median) == (4, 2.5, 2.5)
    assert s.p90 == pytest.approx(3.7) and s.p99 == pytest.approx(3.97)
    a = RequestMetrics.from_timestamps(START, TIMES)
    b = RequestMetrics.from_timestamps(0.0, [0.5])  # one token: no TPOT, no gaps
    agg = aggregate([a, b])
    assert agg["ttft_s"].n == 2 and agg["ttft_s"].mean == pytest.approx(0.375)
    assert agg["tpot_s"].n == 1 and agg["tpot_s"].median == a.tpot_s
    assert agg["itl_s"].n == 4 and agg["itl_s"].median == pytest.approx(0.1875)
    assert set(aggregate([b])) == {"ttft_s", "e2e_s", "output_tokens_per_s"}
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_time_stream_counts_tokens_and_keeps_order():
    def stream():
        for token in (5, 6, 7):
            yield token, 0.0  # stream_naive's (token_id, time) shape; time_stream uses its own clock

    tokens, m = time_stream(stream, "cpu")
    assert tokens == [5, 6, 7]
    assert m.output_tokens == 3 and len(m.itl_s) == 2
    assert 0 <= m.ttft_s <= m.e2e_s and all(g >= 0 for g in m.itl_s)
    with pytest.raises(ValueError, match="no tokens"):
        time_stream(lambda: iter(()), "cpu")


def test_repeat_timed_runs_warmup_then_repeats():
    calls = []
    times = repeat_timed(lambda: calls.append(1), "cpu", repeats=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats >= 1"):
        repeat_timed(lambda: None, "cpu", repeats=0)


def test_peak_memory_cpu_sees_a_large_allocation():
    size = 64 * 2**20  # 64 Mi floats = 256 MiB, touched by torch.ones
    result, mem = peak_memory(lambda: torch.ones(size), "cpu", method="rss")
    assert result.numel() == size
    assert mem.delta_bytes > 200 * 2**20
    assert "RSS" in mem.method


def test_peak_memory_counts_live_tensors_exactly():
    """Hand-counted: a (1024, 1024) fp32 temporary (4 MiB) freed before a (256, 1024) result (1 MiB)
    is made; views and in-place ops on memory that existed before add nothing."""
    big = torch.ones(4096, 1024)  # 16 MiB, made before the call

    def work():
        tmp = torch.ones(1024, 1024)  # 4 MiB
        s = tmp.sum()  # a 4-byte scalar
        del tmp
        view = big[:10].t()  # a view of existing memory: no bytes
        big.mul_(1.0)  # in place: no bytes
        return torch.zeros(256, 1024) + s + view.sum()  # zeros (1 MiB) + a result (1 MiB) + scalars

    _, mem = peak_memory(work, "cpu")
    MiB = 2**20
    # peak: the temporary and the scalar sum, alive together (later at most 2 MiB + a few scalars)
    assert mem.peak_bytes == 4 * MiB + 4, "the pre-existing 16 MiB tensor and its views must not count"
    assert "live tensors" in mem.method
    with pytest.raises(ValueError, match="method"):
        peak_memory(work, "cpu", method="psutil")


def test_bench_record_json_round_trip(tmp_path):
    m = RequestMetrics.from_timestamps(START, TIMES)
    record = BenchRecord(name="unit", model="smollm2-135m (float32, cpu)", dtype="float32", device="cpu",
                         settings={"new_tokens": 5}, results=[m.as_dict()], ratios={"x_vs_y": 0.5})
    path = record.save(tmp_path / "r.json")
    loaded = BenchRecord.load(path)
    assert loaded == record
    raw = json.loads(path.read_text())
    assert raw["results"][0]["tpot_s"] == 0.1875 and raw["ratios"] == {"x_vs_y": 0.5}
    assert raw["hardware"]["cpu_cores"] >= 1 and raw["hardware"]["torch"] == torch.__version__


def test_format_table_aligns_and_keeps_units():
    text = format_table([{"name": "naive", "tps": 3.456}, {"name": "hf generate", "tps": 14.0}],
                        [("name", "loop"), ("tps", "decode (tok/s)")])
    lines = text.splitlines()
    assert lines[0].split("  ")[0].strip() == "loop" and "decode (tok/s)" in lines[0]
    assert len({len(line) for line in lines}) == 1  # every line equally wide: aligned
    assert lines[2].endswith(" 3.46") and lines[3].endswith("14.00")


def test_decode_ceiling_arithmetic():
    assert decode_ceiling_tokens_per_s(1e9, 0, 100.0) == pytest.approx(100.0)  # 100 GB/s over 1 GB
    assert decode_ceiling_tokens_per_s(1e9, 1e9, 100.0) == pytest.approx(50.0)  # KV reads count too
    assert kv_bytes_per_position(30, 3, 64, 4) == 46_080  # SmolLM2-135M in fp32: K and V, 30 layers
    info = SimpleNamespace(bytes=538_000_000, dtype="float32", num_layers=30, num_kv_heads=3, head_dim=64)
    assert model_decode_ceiling(info, 20.0, 100) == pytest.approx(20e9 / (538e6 + 46_080 * 100))
    assert compute_ceiling_tokens_per_s(1_000_000, 10, 1.0) == pytest.approx(1e12 / 2e7)
    assert roofline_fraction(5.0, 20.0) == 0.25
    with pytest.raises(ValueError, match="bandwidth"):
        decode_ceiling_tokens_per_s(1e9, 0, 0.0)
    with pytest.raises(ValueError, match="ceiling"):
        roofline_fraction(1.0, 0.0)


class _Tokenizer:
    """Stands in for a tokenizer: token i decodes to the letter chr(97 + i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


@pytest.mark.parametrize("widget", [False, True])
def test_show_stream_returns_metrics(widget, capsys):
    from course_lib.stream_view import show_stream

    m = show_stream(lambda: iter([(0, 0.0), (1, 0.0), (2, 0.0)]), _Tokenizer(), "cpu", title="demo", widget=widget)
    assert isinstance(m, RequestMetrics) and m.output_tokens == 3
    out = capsys.readouterr().out
    assert "abc" in out and "3 tokens, TTFT" in out


def test_first_divergence_and_token_match():
    from course_lib.measure import first_divergence, token_match

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one list ends early: they part where it ends
    assert first_divergence([], []) is None
    same = token_match("a vs b", [1, 2, 3], [1, 2, 3], torch.float32)
    assert "identical, 3 greedy tokens (float32" in same
    low = token_match("a vs b", [1, 5, 3], [1, 2, 3], torch.bfloat16, max_logit_diff=0.25)
    assert "first divergence at new token 2 of 3" in low and "2.5e-01" in low and "expected in bfloat16" in low
    assert "bug" in token_match("a vs b", [1, 5], [1, 2], "float32")


def test_every_reference_record_has_the_one_schema():
    from course_lib.measure import BenchRecord, describe_record, reference_records

    records = reference_records()
    assert len(records) >= 8
    for name, record in records.items():
        assert isinstance(record, BenchRecord) and record.hardware.get("torch"), name
        assert isinstance(record.caveat, str) and isinstance(record.reliable, bool), name
        assert all(isinstance(v, (int, float)) for v in record.ratios.values()), name
        text = describe_record(name, record)
        assert name in text and (record.caveat in text)
    # the README of data/reference_results calls the first H200 batch sweep host-bound
    assert not records["gpu_h200_batch_smollm2-1.7b-random.json"].reliable


def test_load_rejects_a_file_that_is_not_a_record(tmp_path):
    import json

    from course_lib.measure import BenchRecord

    path = tmp_path / "x.json"
    path.write_text(json.dumps({"gpu": "H200", "speedup": 2}))
    with pytest.raises(ValueError, match="not a BenchRecord"):
        BenchRecord.load(path)
