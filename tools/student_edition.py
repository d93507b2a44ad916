"""The student edition for workshops: every notebook without its solutions (`make student`).

    python tools/student_edition.py [OUT_DIR]     (default: student/)

For each notebooks/NN_*.ipynb it writes OUT_DIR/NN_*.ipynb where
- the cells of the solutions section (from a heading that names solutions to the next heading
  that does not) are replaced by one note saying the solutions are in the instructor's copy;
- the outputs of the exercise cells (from the first "**Exercise" cell to the solutions) are
  cleared, so the stubs and checkers show nothing until the learner runs them;
- every other cell is kept with its stored output.
It also copies notebooks/conftest.py, so the folder runs under nbval as it is. The script fails
if any written notebook still holds a solution cell (tests/test_student_edition.py runs it).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTE = ("## Solutions\n\nThe worked solutions are in the instructor's edition of this notebook. "
        "Run each checker above: its hints lead the way.")


def _heading(cell: dict) -> str | None:
    text = "".join(cell["source"]).lstrip()
    return text.split("\n", 1)[0] if cell["cell_type"] == "markdown" and text.startswith("#") else None


def is_solutions_heading(cell: dict) -> bool:
    heading = _heading(cell)
    return heading is not None and "solution" in heading.lower()


def is_exercise_cell(cell: dict) -> bool:
    """A markdown cell that poses an exercise (a line starting "**Exercise")."""
    return cell["cell_type"] == "markdown" and any(
        line.startswith("**Exercise") for line in "".join(cell["source"]).splitlines())


def strip(nb: dict) -> tuple[dict, int, int]:
    """(student notebook, solution cells removed, exercise cells cleared)."""
    cells, removed, cleared, in_solutions, in_exercises = [], 0, 0, False, False
    for cell in nb["cells"]:
        if is_solutions_heading(cell):
            in_solutions, in_exercises = True, False
            cells.append({"cell_type": "markdown", "id": cell.get("id", "solutions"), "metadata": {},
                          "source": NOTE.splitlines(keepends=True)})
            continue
        if in_solutions and _heading(cell) is not None:
            in_solutions = False
        if in_solutions:
            removed += 1
            continue
        if is_exercise_cell(cell):
            in_exercises = True
        if in_exercises and cell["cell_type"] == "code":
            cell = {**cell, "outputs": [], "execution_count": None}
            cleared += 1
        cells.append(cell)
    return {**nb, "cells": cells}, removed, cleared


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else ROOT / "student"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        nb, removed, cleared = strip(json.loads(path.read_text()))
        if any(is_solutions_heading(c) and "instructor's edition" not in "".join(c["source"]) for c in nb["cells"]):
            raise SystemExit(f"{path.name}: a solutions section survived")
        (out / path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"{path.name}: {removed} solution cells removed, {cleared} exercise cells cleared")
    shutil.copy(ROOT / "notebooks" / "conftest.py", out / "conftest.py")
    print(f"student edition written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
