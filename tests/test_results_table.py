"""The README's headline table is generated from the committed bench record and cannot drift."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import results_table  # noqa: E402


def test_readme_table_matches_the_committed_record():
    assert results_table.main(["--check"]) == 0


def test_table_quotes_the_record_and_names_it():
    record = json.loads((REPO / "data" / "reference_results" / results_table.RECORD).read_text())
    table = results_table.readme_table((REPO / "README.md").read_text())
    assert results_table.RECORD in table
    # read straight from the JSON, formatted as a reader would: these numbers must be in the README
    assert f"{record['ratios']['kv_speedup_256']:.1f}x the naive loop" in table
    assert f"{record['ratios']['int8_weight_bytes_ratio']:.3f} of fp32 bytes" in table
    assert "unreliable" in table  # the host-bound H200 sweep is named, not quoted


def test_check_fails_when_the_readme_drifts(tmp_path, monkeypatch):
    record = json.loads((REPO / "data" / "reference_results" / results_table.RECORD).read_text())
    said = f"{record['ratios']['kv_speedup_256']:.1f}x the naive loop"
    text = (REPO / "README.md").read_text()
    assert said in text
    text = text.replace(said, f"{record['ratios']['kv_speedup_256'] + 1:.1f}x the naive loop")
    fake = tmp_path / "README.md"
    fake.write_text(text)
    monkeypatch.setattr(results_table, "README", fake)
    assert results_table.main(["--check"]) == 1
