"""`python -m course_lib bench`: suites run through main() and write the documented JSON."""

import json
import math

import pytest

from course_lib.bench import SUITES, main


def _check_record(path, suite, ratios):
    record = json.loads(path.read_text())
    assert {"hardware", "model", "settings", "results", "ratios"} <= set(record)
    assert record["name"] == suite
    assert record["model"].startswith("smollm2-135m")
    assert record["hardware"]["cpu_cores"] >= 1 and record["hardware"]["torch"]
    assert set(ratios) <= set(record["ratios"])
    for name in ratios:
        value = record["ratios"][name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    return record


def test_hardware_suite_writes_ratios(tmp_path, capsys):
    path = tmp_path / "h.json"
    assert main(["--suite", "hardware", "--device", "cpu", "--new-tokens", "3", "--json", str(path)]) == 0
    record = _check_record(path, "hardware", ["naive_roofline_fraction"])
    # A naive loop that recomputes the whole sequence cannot beat the bandwidth ceiling.
    assert record["ratios"]["naive_roofline_fraction"] < 1
    units = {row["unit"] for row in record["results"]}
    assert {"GB/s", "GFLOP/s", "tok/s"} <= units
    out = capsys.readouterr().out
    assert "GB/s" in out and "naive_roofline_fraction" in out


def test_loop_suite_writes_ratio(tmp_path):
    path = tmp_path / "loop.json"
    assert main(["bench", "--suite", "loop", "--device", "cpu", "--new-tokens", "3", "--prompts", "1",
                 "--json", str(path)]) == 0
    record = _check_record(path, "loop", ["naive_vs_hf_decode"])
    assert [row["new_tokens"] for row in record["results"]] == [3, 3]
    assert record["settings"]["prompts"] == 1
    # The naive loop over the course Transformer picks the same greedy tokens as generate.
    assert record["settings"]["greedy_tokens_identical"] == "1/1 prompts"


def test_unknown_suite_lists_suites(capsys):
    assert main(["--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err
    assert all(name in err for name in SUITES) and {"loop", "hardware"} <= set(SUITES)


def test_too_few_new_tokens_rejected(capsys):
    assert main(["--suite", "loop", "--new-tokens", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_missing_suite_argument_exits():
    with pytest.raises(SystemExit):
        main([])
