"""course_lib.paths: data found however the course is installed; a missing file is a clear error."""

import json
import sys
from pathlib import Path

import pytest

import course_lib
from course_lib import paths
from course_lib.paths import CourseDataError, data_path, load_prompts

REPO = Path(__file__).resolve().parent.parent


def _write_prompts(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_course_data_env_comes_first(tmp_path, monkeypatch):
    rows = [{"id": "a", "prompt": "alpha", "length": "short"}, {"id": "b", "prompt": "beta", "length": "long"},
            {"id": "c", "prompt": "gamma", "length": "short"}]
    _write_prompts(tmp_path, rows)
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    assert data_path("prompts.jsonl") == tmp_path / "prompts.jsonl"
    assert load_prompts(5) == ["alpha", "gamma"]
    assert load_prompts(1, "long") == ["beta"]


def test_env_folder_without_the_file_falls_through_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))  # empty folder: the repository's data/ answers
    assert data_path("heldout.txt") == REPO / "data" / "heldout.txt"


def test_missing_file_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    with pytest.raises(CourseDataError) as info:
        data_path("no_such_file.json")
    message = str(info.value)
    assert "no_such_file.json" in message and str(tmp_path) in message
    assert str(REPO / "data") in message and paths.DATA_ENV in message
    assert isinstance(info.value, FileNotFoundError)


def test_repository_prompt_set_is_read_not_replaced():
    # The repository's first short prompt and its counts per length, read from the file itself
    # independently of the loader: no built-in fallback list can satisfy this.
    rows = [json.loads(line) for line in (REPO / "data" / "prompts.jsonl").read_text().splitlines() if line.strip()]
    short = [r["prompt"] for r in rows if r["length"] == "short"]
    assert load_prompts(1000) == short and len(short) > 10
    assert load_prompts(1) == ["What is the capital of France?"]


def test_bad_prompt_arguments_raise():
    with pytest.raises(ValueError, match="length"):
        load_prompts(3, "medium")
    with pytest.raises(ValueError, match="at least 1"):
        load_prompts(0)


def test_installed_copy_wins_over_the_repository(tmp_path, monkeypatch):
    # A wheel install puts data/ inside the package: simulate it by pointing the package path there.
    fake_pkg = tmp_path / "site-packages" / "course_lib"
    _write_prompts(fake_pkg / "data", [{"id": "x", "prompt": "installed", "length": "short"}])
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setattr(paths, "__file__", str(fake_pkg / "paths.py"))
    assert paths.data_roots()[0] == fake_pkg / "data"
    assert load_prompts(1) == ["installed"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_packaging_ships_every_subpackage_and_the_data():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    root = Path(course_lib.__file__).parent
    subpackages = {".".join(p.parent.relative_to(root.parent).parts) for p in root.rglob("__init__.py")}
    assert subpackages <= listed, f"subpackages missing from pyproject: {subpackages - listed}"
    assert config["package-dir"]["course_lib.data"] == "data"
    data_folders = {p.name for p in (REPO / "data").iterdir() if p.is_dir()}
    assert {f"course_lib.data.{name}" for name in data_folders} <= listed


def test_concept_modules_never_import_bench():
    import ast

    root = Path(course_lib.__file__).parent
    offenders = []
    for path in root.glob("*.py"):
        if path.name == "__main__.py":  # the command line dispatches to bench by design
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "course_lib.bench" or n.startswith("course_lib.bench.")]
    assert not offenders, offenders
