"""Where the course's data files live, however the course is installed. Used from notebooks/00_setup.ipynb on.

The data (prompts, held-out text, the draft model, reference results) is found in this order:

1. `$COURSE_DATA`, when set: a folder laid out like the repository's `data/`;
2. the installed package's own copy, `course_lib/data/` (a normal `pip install .`, as on Colab,
   ships `data/` inside the wheel);
3. the repository's `data/` beside `course_lib/` (a source checkout or an editable install).

A file that is in none of them is an error naming every place looked at: nothing falls back to
built-in substitutes, so a result never silently comes from other data than the one it names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DATA_ENV = "COURSE_DATA"
PROMPT_LENGTHS = ("short", "long")


class CourseDataError(FileNotFoundError):
    """A course data file is missing from every place the resolver looks."""


def data_roots() -> list[Path]:
    """The folders searched for course data, in order (see the module docstring)."""
    package = Path(__file__).resolve().parent
    roots = [Path(os.environ[DATA_ENV]).expanduser()] if os.environ.get(DATA_ENV) else []
    return roots + [package / "data", package.parent / "data"]


def data_path(relative: str) -> Path:
    """The course data file `relative` (e.g. "prompts.jsonl", "draft/draft.safetensors")."""
    looked = [root / relative for root in data_roots()]
    for path in looked:
        if path.exists():
            return path
    places = "\n  ".join(str(p) for p in looked)
    raise CourseDataError(
        f"course data file {relative!r} not found; looked in:\n  {places}\n"
        f"Install the course with `pip install .` from its repository (the wheel ships data/), "
        f"run from a clone of the repository, or set {DATA_ENV} to a folder holding {relative}.")


def prompt_rows() -> list[dict]:
    """Every row of data/prompts.jsonl (id, category, length, prompt, ...)."""
    text = data_path("prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_prompts(n: int, length: str = "short") -> list[str]:
    """The first n prompts of the given length ("short" or "long") from data/prompts.jsonl."""
    if length not in PROMPT_LENGTHS:
        raise ValueError(f"length must be one of {PROMPT_LENGTHS}, got {length!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    prompts = [r["prompt"] for r in prompt_rows() if r.get("length", "short") == length]
    return prompts[:n]
