"""`bench --suite all` and the `engine` suite: every suite runs once in course order on one loaded model,
one JSON holds every record and a flat dict of every ratio, a suite that raises is reported while
the others still run (exit status 1); the engine suite's pieces on a tiny random model. The suites
in the `all` tests are fast fakes: the real ones are benchmarks, run as commands, not tests."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import course_lib.models
from course_lib import bench
from course_lib.bench import COURSE_ORDER, BenchContext, SuiteResult, main
from course_lib.env import run_sizes
from course_lib.bench.engine import engine_suite, engine_workload, int8_decision
from course_lib.quant import QuantLinear
from course_lib.transformer import Transformer

RECORD_KEYS = {"name", "model", "dtype", "device", "settings", "results", "ratios", "hardware", "created", "caveat", "reliable"}


@pytest.fixture
def fake_suites(monkeypatch):
    """Replace the registered suites by fast fakes (registered out of order, plus one extra) and the
    model load by a stub that counts its calls. Returns (calls, loads, set_failing, set_ratio)."""
    calls, loads, failing, ratio_names = [], [], set(), {}

    def make(name):
        def suite(ctx):
            calls.append((name, torch.rand(1).item()))  # the draw shows each suite starts from seed 0
            if name in failing:
                raise RuntimeError(f"{name} broke")
            return SuiteResult(results=[{"variant": name, "tok_s": 1.5}], ratios={ratio_names.get(name, f"{name}_ratio"): 2.0},
                               settings={"fake": True}, columns=[("variant", "variant"), ("tok_s", "speed (tok/s)")])
        return suite

    names = ["engine", "zzz_extra", *reversed(COURSE_ORDER[:-1])]
    monkeypatch.setattr(bench, "SUITES", {n: make(n) for n in names})
    monkeypatch.setattr(bench, "load_suites", lambda: None)

    def fake_load(name=None, device=None, dtype=None):
        loads.append(name)
        return object(), None, SimpleNamespace(label="fake (float32, cpu)", dtype="float32", name="fake", vocab_size=10)

    monkeypatch.setattr(course_lib.models, "load_model", fake_load)
    return calls, loads, failing.add, ratio_names.__setitem__


def test_all_runs_every_suite_once_in_course_order_with_one_model_load(fake_suites, tmp_path, capsys):
    calls, loads, _, _ = fake_suites
    path = tmp_path / "all.json"
    assert main(["--suite", "all", "--device", "cpu", "--json", str(path)]) == 0
    order = [name for name, _ in calls]
    assert order == [*COURSE_ORDER, "zzz_extra"]
    assert len(loads) == 1
    assert len({draw for _, draw in calls}) == 1, "every suite should start from torch.manual_seed(0)"
    record = json.loads(path.read_text())
    assert RECORD_KEYS <= set(record) and record["name"] == "all" and record["errors"] == {}
    assert list(record["suites"]) == order
    for name, suite in record["suites"].items():
        assert set(suite) == RECORD_KEYS and suite["name"] == name and suite["ratios"] == {f"{name}_ratio": 2.0}
    assert record["ratios"] == {f"{name}_ratio": 2.0 for name in order}
    assert [(row["suite"], row["status"]) for row in record["results"]] == [(n, "ok") for n in order]
    out = capsys.readouterr().out
    assert all(f"suite {name}:" in out and f"ratio {name}_ratio: 2" in out for name in order)
    assert "speed (tok/s)" in out  # each suite's own table is printed


def test_a_suite_that_raises_is_reported_and_the_others_still_run(fake_suites, tmp_path, capsys):
    calls, _, fail, _ = fake_suites
    fail("kv")
    path = tmp_path / "all.json"
    assert main(["--suite", "all", "--device", "cpu", "--json", str(path)]) == 1
    assert [name for name, _ in calls] == [*COURSE_ORDER, "zzz_extra"]
    record = json.loads(path.read_text())
    assert record["errors"] == {"kv": "RuntimeError: kv broke"}
    assert "kv" not in record["suites"] and "kv_ratio" not in record["ratios"]
    assert {"engine", "spec", "loop"} <= set(record["suites"])
    assert next(r for r in record["results"] if r["suite"] == "kv")["status"] == "error"
    assert "suite kv failed: RuntimeError: kv broke" in capsys.readouterr().err


def test_a_ratio_name_two_suites_share_is_kept_under_both(fake_suites, tmp_path):
    _, _, _, name_ratio = fake_suites
    name_ratio("loop", "shared")
    name_ratio("engine", "shared")
    path = tmp_path / "all.json"
    assert main(["--suite", "all", "--device", "cpu", "--json", str(path)]) == 0
    ratios = json.loads(path.read_text())["ratios"]
    assert ratios["shared"] == 2.0 and ratios["engine.shared"] == 2.0


def test_a_single_suite_still_writes_a_plain_record(fake_suites, tmp_path):
    calls, _, _, _ = fake_suites
    path = tmp_path / "engine.json"
    assert main(["--suite", "engine", "--device", "cpu", "--json", str(path)]) == 0
    assert [name for name, _ in calls] == ["engine"]
    record = json.loads(path.read_text())
    assert set(record) == RECORD_KEYS and record["name"] == "engine"


def test_a_failing_single_suite_raises(fake_suites):
    _, _, fail, _ = fake_suites
    fail("engine")
    with pytest.raises(RuntimeError, match="engine broke"):
        main(["--suite", "engine", "--device", "cpu"])


@pytest.mark.parametrize("argv, message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--suite", "all", "--new-tokens", "1"], "at least 2"),
    (["--suite", "all", "--prompts", "0"], "--prompts must be at least 1"),
])
def test_bad_arguments_exit_2_before_loading_a_model(fake_suites, capsys, argv, message):
    _, loads, _, _ = fake_suites
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and loads == []
    if argv[1] == "nope":
        assert "all" in err and "engine" in err


def test_the_engine_suite_is_registered_and_ordered_last():
    bench.load_suites()
    assert "engine" in bench.SUITES and bench.suite_order()[-1] == "engine"
    assert bench.suite_order()[:len(COURSE_ORDER)] == list(COURSE_ORDER)


# ---- the engine suite's pieces on a tiny random model ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_ctx():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # large weights: clear argmax winners, so no near-tie flips a greedy token
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else (8.0 if name.endswith(("o_proj.weight", "down_proj.weight"))
                                                          else 1.0) * p.shape[1] ** -0.5)
    info = SimpleNamespace(label="tiny (float32, cpu, random weights)", dtype="float32", name="tiny", vocab_size=256)
    device = torch.device("cpu")
    return BenchContext(hf, None, info, device, run_sizes(device), new_tokens=8, num_prompts=1)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is overhead-bound: do not wait on a busy second core
    yield
    torch.set_num_threads(threads)


def test_engine_workload_is_seeded_and_sized_by_new_tokens(tiny_ctx):
    config, work = engine_workload(tiny_ctx)
    assert engine_workload(tiny_ctx)[1] == work
    assert len(work) == config.num_requests == 8 and config.output_len == (2, 8)
    assert all(2 <= w.output_len <= 8 for w in work)
    assert all(0 <= t < 256 for w in work for t in w.prompt_ids)


@pytest.mark.parametrize("float_ms, int8_ms, used", [(90.0, 97.0, False), (90.0, 60.0, True), (50.0, 50.0, True)])
def test_int8_is_chosen_exactly_when_its_step_is_no_slower(tiny_ctx, monkeypatch, float_ms, int8_ms, used):
    """The decision follows the two step times, fed in here (no clock), interleaved and best of rounds."""
    import course_lib.bench.engine as engine_bench

    seen = []

    def fake_step_seconds(model, batch, context, steps, warmup):
        int8 = any(isinstance(m, QuantLinear) for m in model.modules())
        seen.append("int8" if int8 else "float")
        noise = 0.01 * ((len(seen) + 1) // 2)  # round 2 slower than round 1: the best round must be used
        return ((int8_ms if int8 else float_ms) + noise) / 1e3

    monkeypatch.setattr(engine_bench, "decode_step_seconds", fake_step_seconds)
    model = Transformer.from_hf(tiny_ctx.model)
    quantized, info = int8_decision(model, batch=2, context=16, rounds=2)
    assert seen == ["float", "int8", "float", "int8"], "float and int8 must alternate"
    assert info["used"] is used and (quantized is not None) is used
    assert info["float_step_ms"] == pytest.approx(float_ms + 0.01) and info["int8_step_ms"] == pytest.approx(int8_ms + 0.01)
    assert ("int8 used" if used else "int8 left out") in info["why"]
    if used:
        assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    assert not any(isinstance(m, QuantLinear) for m in model.modules()), "the float model must stay float"


def test_engine_suite_on_a_tiny_model(tiny_ctx, one_thread):
    out = engine_suite(tiny_ctx)
    assert [row["engine"] for row in out.results][0] == "naive loop"
    assert out.results[1]["engine"].startswith("kv cache") and "batching" in out.results[1]["engine"]
    for row in out.results:
        assert row["requests"] == 8 and row["output_tokens"] == out.settings["workload"]["output_tokens"]
    for name in ("engine_all_vs_naive_throughput", "engine_vs_naive_p50_ttft"):
        assert math.isfinite(out.ratios[name]) and out.ratios[name] > 0
    # an independent fact: the suite served every token the seeded workload asks for (no stop tokens)
    _, work = engine_workload(tiny_ctx)
    assert out.settings["workload"]["output_tokens"] == sum(w.output_len for w in work)
    if not out.settings["int8"]["used"]:  # float weights: batching and caching change no greedy token
        assert out.settings["greedy_outputs_identical"] == "8/8"
