"""nbval settings for the notebooks: a wall-clock budget per notebook, and a timing summary.

nbval's own --nbval-cell-timeout limits one cell; this limits a whole notebook, so a notebook
that creeps past its few-minute promise fails CI with a clear message.
"""

import time

import pytest

_first_cell: dict[str, float] = {}
_last_cell: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption("--notebook-budget", type=float, default=420.0,
                     help="seconds one notebook may run under nbval before its next cell fails")


def pytest_runtest_setup(item):
    path = str(item.path)
    if not path.endswith(".ipynb"):
        return
    start = _first_cell.setdefault(path, time.monotonic())
    budget = item.config.getoption("--notebook-budget")
    elapsed = time.monotonic() - start
    if elapsed > budget:
        pytest.fail(f"{item.path.name} has run for {elapsed:.0f} s, over its budget of {budget:.0f} s: "
                    f"make it smaller (course_lib.env.run_sizes) or raise NB_BUDGET knowingly.")


def pytest_runtest_teardown(item):
    path = str(item.path)
    if path.endswith(".ipynb"):
        _last_cell[path] = time.monotonic()


def pytest_terminal_summary(terminalreporter):
    if _first_cell:
        terminalreporter.section("notebook wall time (kernel start excluded)")
        for path, start in _first_cell.items():
            seconds = _last_cell.get(path, start) - start
            terminalreporter.write_line(f"{seconds:7.1f} s  {path.rsplit('/', 1)[-1]}")
