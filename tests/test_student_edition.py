"""`make student`: the workshop edition has no solution code and no stored exercise outputs."""

import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import student_edition  # noqa: E402


def defined_functions(nb: dict) -> set[str]:
    names = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "\n".join(l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("%", "!")))
        names |= {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    return names


def test_student_edition_has_no_solutions(tmp_path):
    assert student_edition.main([str(tmp_path)]) == 0
    for original in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        full = json.loads(original.read_text())
        student = json.loads((tmp_path / original.name).read_text())
        # the code of every solution cell of the full edition is absent from the student edition
        solutions, on = [], False
        for cell in full["cells"]:
            if student_edition.is_solutions_heading(cell):
                on = True
            elif on and cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith("#"):
                on = False
            elif on and cell["cell_type"] == "code":
                solutions.append("".join(cell["source"]))
        student_code = ["".join(c["source"]) for c in student["cells"] if c["cell_type"] == "code"]
        assert not set(solutions) & set(student_code), original.name
        if solutions:
            assert any("instructor's edition" in "".join(c["source"]) for c in student["cells"]), original.name
        # exercise cells carry no stored output (the checker's verdict on a solution would leak it)
        started = False
        for cell in student["cells"]:
            if "instructor's edition" in "".join(cell["source"]):
                break  # the exercises end where the solutions began
            started |= student_edition.is_exercise_cell(cell)
            if started and cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, original.name
        assert defined_functions(student) <= defined_functions(full)
    assert (tmp_path / "conftest.py").is_file()


def test_every_notebook_from_01_has_two_exercises_with_checkers():
    for path in sorted((REPO / "notebooks").glob("0[1-9]*.ipynb")):
        nb = json.loads(path.read_text())
        ends = next(i for i, c in enumerate(nb["cells"]) if student_edition.is_solutions_heading(c))
        exercises = [c for c in nb["cells"][:ends] if student_edition.is_exercise_cell(c)]
        checkers = [n for n in defined_functions(nb) if n.startswith("check")]
        assert len(exercises) >= 2 and len(checkers) >= 2, (path.name, len(exercises), checkers)
