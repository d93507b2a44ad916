"""bitsandbytes models, decode speed of any model, and the `quant` bench suite. Built in notebooks/05_quantization.ipynb.

    python -m course_lib bench --suite quant [--model M] [--device D] [--json FILE]

Side by side in one run: the course Transformer in the model's dtype, with int8 (per-channel,
absmax) and int4 (groups of 64, zero points) weights. For each: bytes of the quantized linear
layers (codes + scales + zero points) against their fp32 bytes, perplexity / KL / greedy
agreement against the unquantized model (course_lib.quality), and decode speed through the KV
cache loop. Ratios: *_weight_bytes_ratio, *_ppl_increase_pct, *_decode_speed_ratio.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import logging
import statistics

import torch

from course_lib.bench import BenchContext, SuiteResult, register, run_hf_generate
from course_lib.paths import load_prompts
from course_lib.env import pick_device
from course_lib.generation import chat_input_ids
from course_lib.kv_cache import stream_cached
from course_lib.measure import RequestMetrics, time_stream
from course_lib.models import PRESETS, RANDOM_SUFFIX, _default_checkpoint, parse_name
from course_lib.quality import build_reference, evaluate, heldout_windows
from course_lib.quant import INT4, INT8, QuantLinear, QuantScheme, model_bytes, quantize_model, use_kernel
from course_lib.transformer import Transformer

BNB_KINDS = ("llm.int8", "nf4", "nf4-dq")


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig for 'llm.int8', 'nf4' or 'nf4-dq' (NF4 + double quantization)."""
    from transformers import BitsAndBytesConfig

    if kind == "llm.int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind in ("nf4", "nf4-dq"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=kind == "nf4-dq")
    raise ValueError(f"unknown bitsandbytes kind {kind!r}: choose one of {BNB_KINDS}")


def quantized_copy(model: torch.nn.Module, scheme: QuantScheme, **options) -> torch.nn.Module:
    """quantize_model(copy.deepcopy(model), scheme, **options), except that the copy shares every float
    tensor it keeps (embedding, norms, RoPE tables) with `model` instead of copying it: only the new
    codes and scales take memory, and no second float model exists even for a moment."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return quantize_model(copy.deepcopy(model, shared), scheme, **options)


def bnb_unavailable(name: str | None = None, device: str | torch.device | None = None) -> str | None:
    """Why bitsandbytes cannot quantize this preset on this device, in words; None when it can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (it has no build for some platforms, e.g. macOS)"
    preset, random_weights = parse_name(name)
    if random_weights:
        return (f"bitsandbytes quantizes a checkpoint while loading it, and {preset}{RANDOM_SUFFIX} has random "
                "weights: there is no checkpoint to load")
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type not in ("cpu", "cuda"):
        return f"bitsandbytes runs on CUDA GPUs and CPUs, not on {dev.type}"
    return None


def load_bnb(kind: str, name: str | None = None, device: str | torch.device | None = None):
    """The preset's weights quantized by bitsandbytes while loading; returns the transformers model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    preset, random_weights = parse_name(name)
    if random_weights:
        raise ValueError("bitsandbytes quantizes a checkpoint while loading it: random weights have none")
    source = _default_checkpoint() if PRESETS[preset].offline else PRESETS[preset].hf_id
    dev = pick_device(device)
    config = bnb_config(kind, torch.float32 if dev.type == "cpu" else torch.float16)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to fp16", per call
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map=str(dev))
    finally:
        hf_logging.enable_progress_bar()
    return model.eval()


def run_decode(model, input_ids: torch.Tensor, new_tokens: int, device) -> RequestMetrics:
    """One timed greedy request of exactly new_tokens: the course KV-cache loop for a course
    Transformer, transformers' generate (with its KV cache) for anything else (e.g. bitsandbytes)."""
    if isinstance(model, Transformer):
        return time_stream(lambda: stream_cached(model, input_ids, new_tokens), device)[1]
    return run_hf_generate(model, input_ids, new_tokens, device)[1]


def decode_speeds(models: dict[str, torch.nn.Module], input_ids: torch.Tensor, new_tokens: int, device,
                  repeats: int = 3) -> dict[str, float]:
    """Median decode tokens/s (1 / TPOT) per model; one warm-up each, then the models take turns
    so that a slow patch on a shared machine hits them all alike."""
    for model in models.values():
        run_decode(model, input_ids, 2, device)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(run_decode(model, input_ids, new_tokens, device).decode_tokens_per_s)
    return {name: statistics.median(v) for name, v in runs.items()}


def linear_fp32_bytes(model: torch.nn.Module) -> int:
    """fp32 bytes of the weights that quantize_model replaces by default (every linear layer but the head)."""
    head = getattr(model, "lm_head", None)
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


# The default model was published as a GGUF in llama.cpp's Q4_1 format (groups of 32, fp16 scale
# and minimum), and its "fp32" weights are those 4-bit values dequantized. "int4_q41" re-quantizes
# onto exactly that grid, so it measures how much of int4's cost this model has already paid.
Q4_1 = QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False, float_zero=True)
VARIANTS: dict[str, QuantScheme | None] = {"baseline": None, "int8": INT8, "int4": INT4, "int4_q41": Q4_1}
TIMED = ("baseline", "int8", "int4")  # decode speed; int4_q41 decodes like int4


def fused_int4_kernel(model: torch.nn.Module, device: torch.device) -> tuple[str | None, str]:
    """The fused int4 kernel (course_lib.kernels) this device can run on every layer of an int4
    model, and why: torch's packed CPU kernel on a CPU, the course's Triton kernel on a GPU."""
    from course_lib import kernels

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if device.type == "cpu":
        reason = next((r for r in (kernels.int4pack_unavailable(m.qweight) for m in layers) if r), None)
        return (None, reason) if reason else ("int4pack", "torch's packed int4 CPU kernel (bf16 compute)")
    reason = kernels.triton_unavailable(device)
    return (None, reason) if reason else ("triton", "the course's Triton int4 kernel (fp32 accumulation)")
PPL_WINDOW = 512  # the whole held-out text in windows of 512 tokens


@register("quant")
def quant_suite(ctx: BenchContext) -> SuiteResult:
    """Our int8 and int4 weights against the unquantized model: bytes, perplexity, KL, agreement, decode speed."""
    base = Transformer.from_hf(ctx.model)
    fp32_linear = linear_fp32_bytes(base)
    models = {name: base if scheme is None else quantize_model(copy.deepcopy(base), scheme)
              for name, scheme in VARIANTS.items()}
    kernel, kernel_why = fused_int4_kernel(models["int4"], ctx.device)
    if kernel:  # the same int4 weights through a fused kernel: its own quality (other rounding) and speed
        models["int4_fused"] = copy.deepcopy(models["int4"])
        use_kernel(models["int4_fused"], kernel)
    windows = heldout_windows(ctx.tokenizer, window=PPL_WINDOW, num_windows=None)
    reference = build_reference(base, ctx.tokenizer, load_prompts(ctx.num_prompts), windows)
    quality = {name: evaluate(model, reference) for name, model in models.items()}
    ids = chat_input_ids(ctx.tokenizer, load_prompts(1)[0])
    timed = TIMED + (("int4_fused",) if kernel else ())
    speed = decode_speeds({name: models[name] for name in timed}, ids, ctx.new_tokens, ctx.device, ctx.sizes.repeats)
    rows = []
    for name, model in models.items():
        counted = model_bytes(model)
        scheme = VARIANTS.get(name, INT4)
        weight_bytes = counted.quantized_bytes if scheme else fp32_linear * base.lm_head.weight.element_size() // 4
        label = ctx.info.dtype if scheme is None else scheme.label + (f", {kernel} kernel" if name == "int4_fused" else "")
        rows.append({"variant": label,
                     "linear_mb": weight_bytes / 1e6, "total_mb": counted.total / 1e6,
                     **quality[name].as_dict(), "decode_tok_s": speed.get(name)})
    ppl = {name: q.perplexity for name, q in quality.items()}
    ratios = {f"{name}_weight_bytes_ratio": model_bytes(models[name]).quantized_bytes / fp32_linear
              for name in ("int8", "int4")}
    ratios.update({f"{name}_ppl_increase_pct": 100 * (ppl[name] / ppl["baseline"] - 1)
                   for name in ("int8", "int4", "int4_q41")})
    ratios["int8_decode_speed_ratio"] = speed["int8"] / speed["baseline"]
    # int4 through the fastest path this device has: a fused kernel where one runs, else PyTorch ops
    ratios["int4_ops_decode_speed_ratio"] = speed["int4"] / speed["baseline"]
    ratios["int4_decode_speed_ratio"] = speed["int4_fused" if kernel else "int4"] / speed["baseline"]
    if kernel:
        ratios["int4_fused_ppl_increase_pct"] = 100 * (ppl["int4_fused"] / ppl["baseline"] - 1)
    return SuiteResult(
        results=rows,
        ratios=ratios,
        settings={"baseline_dtype": ctx.info.dtype, "int8": INT8.label, "int4": INT4.label, "int4_q41": Q4_1.label,
                  "scale_dtype": "float16", "kept_in_float": "embedding, tied head, norms",
                  "int4_kernel": kernel or "none (PyTorch ops)", "int4_kernel_why": kernel_why,
                  "int4_decode_speed_ratio": "the fused kernel's int4 where one runs (see int4_kernel), else PyTorch ops",
                  "perplexity": f"{reference.windows.shape[0]} windows x {reference.windows.shape[1]} tokens "
                                "of data/heldout.txt",
                  "agreement": f"{len(reference.sequences)} prompts, teacher-forced along the baseline's greedy reply",
                  "decode": f"course KV-cache loop, prompt {ids.shape[1]} tokens, {ctx.new_tokens} new tokens, "
                            f"batch 1, median of {ctx.sizes.repeats} interleaved runs",
                  "weight_bytes_ratio": "(codes + scales + zero points) / fp32 bytes of the same linear weights"},
        columns=[("variant", "variant"), ("linear_mb", "linear weights (MB)"), ("total_mb", "model (MB)"),
                 ("perplexity", "perplexity"), ("kl_nats", "KL (nats/token)"), ("agreement", "agreement"),
                 ("decode_tok_s", "decode (tok/s)")])
