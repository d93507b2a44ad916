"""Run a notebook's code cells top to bottom in one plain Python process (no Jupyter needed).

    python tools/run_notebook_plain.py notebooks/00_setup.ipynb

For machines without Jupyter (the lent GPU image): proves the notebook runs end to end there.
IPython magics and shell escapes are skipped; `display` falls back to print. nbval remains the
real test of a notebook (`make test`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run(path: str) -> float:
    nb = json.loads(Path(path).read_text())
    namespace = {"__name__": "__main__", "display": print}
    start = time.perf_counter()
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        lines = [l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))]
        print(f"\n----- cell {i} -----", flush=True)
        exec(compile("\n".join(lines), f"{path}:cell{i}", "exec"), namespace)
    return time.perf_counter() - start


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    seconds = run(sys.argv[1])
    print(f"\n{sys.argv[1]}: all code cells ran in {seconds:.1f} s")
