# %% [markdown]
# # 04b · Faster than the library you would otherwise call: where the time goes
#
# Notebook 04 made decoding fast by not recomputing the past. The cached loop is still a plain
# PyTorch loop, and `transformers`' `generate` is one too: which is faster, and why? Here we
# open one decode step with the profiler, see what its time is spent on, then change one thing at
# a time and measure each change against the step before it and against `generate`.
#
# In this notebook you will:
# - profile one decode step with `torch.profiler` and sort its time into op families;
# - apply four changes one at a time: logits only where one is needed (prefill), grouped-query
#   attention without copies, no mask for a single query, fused q/k/v and gate/up projections;
# - measure each side by side with the one before it and with `generate` (same prompt, same
#   tokens, medians over interleaved repeats), and place the result on the roofline;
# - see why a decode step with static shapes and no host syncs can be captured as a CUDA graph;
# - know where production engines do the same things.

# %% [markdown]
# ## 0. Setup
#
# The course model, its copy in the course's `Transformer` (which `from_hf` now builds with
# fused projections), and a second, *unfused* copy that we take apart step by step. Sizes come
# from `run_sizes`, so the notebook stays short on a CPU.

# %%
import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.bench import run_hf_generate
from course_lib.env import hardware_stamp, pick_device, run_sizes, synchronize
from course_lib.generation import chat_input_ids
from course_lib.kv_cache import KVCache, decode_step, prefill
from course_lib.measure import median_time
from course_lib.models import course_model, load_model
from course_lib.paths import load_prompts
from course_lib.transformer import Transformer, apply_rotary, attention_mask, repeat_kv

# %%
torch.manual_seed(0)
device = pick_device()
sizes = run_sizes(device)
hf_model, tokenizer, info = load_model(course_model(device), device=device)
fast = Transformer.from_hf(hf_model)  # course_lib as it is now: every change below applied
plain = Transformer.from_hf(hf_model, fused=False)  # the checkpoint's seven projections per layer
cfg = fast.config
print(f"model: {info.label}; hardware: {hardware_stamp().short()}; torch threads: {torch.get_num_threads()}")
print(f"{cfg.num_layers} layers, hidden size {cfg.hidden_size}, {cfg.num_heads} query heads sharing "
      f"{cfg.num_kv_heads} KV heads, vocabulary {cfg.vocab_size:,}, {info.dtype}")

# %% [markdown]
# ## 1. The step before: attention as notebook 02 wrote it
#
# To measure the changes one at a time we need the attention layer *before* them. `StepAttention`
# wraps a course `Attention` (same weights, no copy) and has two switches: `copies` repeats each
# key/value head for every query head that reads it (`repeat_kv`, a new tensor per layer per
# step), and `always_mask` builds the causal mask even for one query that may see every key.

# %%
class StepAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn, self.copies, self.always_mask = attn, True, True

    def forward(self, x, cos, sin, input_pos, kv_cache=None, mask=None, masks=None):
        a, (B, T, _) = self.attn, x.shape
        q = a.q_proj(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = a.k_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = a.v_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = kv_cache.update(a.layer_idx, input_pos, k, v)  # (B, KV, S, D)
        allowed = None
        if self.always_mask or T > 1:
            allowed = masks.get(k.shape[2]) if k.shape[2] in masks else attention_mask(input_pos, k.shape[2])
            masks[k.shape[2]] = allowed
        if self.copies:
            g = a.num_heads // a.num_kv_heads
            return a.o_proj(F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=allowed)
                            .transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)  # (B, H, T, D)
        return a.o_proj(y.transpose(1, 2).reshape(B, T, -1))

# %% [markdown]
# Each step of the walk is a model and three settings. `configure` flips the switches on the
# unfused copy; the last step is `fast`, course_lib's `Transformer` itself.

# %%
for layer in plain.layers:
    layer.self_attn = StepAttention(layer.self_attn)

STEPS = {  # name -> (model, logits only at the last prompt position, copies, always_mask)
    "before": (plain, False, True, True),
    "+ last-position logits": (plain, True, True, True),
    "+ GQA without copies": (plain, True, False, True),
    "+ no mask for one query": (plain, True, False, False),
    "+ fused projections": (fast, True, None, None),
}


def configure(step):
    model, last_only, copies, always_mask = STEPS[step]
    for layer in model.layers:
        if isinstance(layer.self_attn, StepAttention):
            layer.self_attn.copies, layer.self_attn.always_mask = copies, always_mask
    return model, last_only

# %% [markdown]
# One greedy run: prefill the prompt (the head over every position, or only the last), then
# decode one token at a time on a sliced cache. We time the prefill and the decode steps
# separately (the device synchronized before each clock read).

# %%
@torch.inference_mode()
def run(step, ids, new_tokens):
    model, last_only = configure(step)
    cache = KVCache.for_model(model, ids.shape[1] + new_tokens)
    synchronize(device)
    t0 = time.perf_counter()
    logits = model(ids, torch.arange(ids.shape[1], device=device), kv_cache=cache, last_only=last_only)[:, -1]
    token = logits.argmax(-1, keepdim=True)  # (1, 1)
    synchronize(device)
    t1, pos, out = time.perf_counter(), torch.tensor([ids.shape[1]], device=device), [token]
    for _ in range(new_tokens - 1):
        token = decode_step(model, token, pos, cache).argmax(-1, keepdim=True)
        pos += 1
        out.append(token)
    synchronize(device)
    return torch.cat(out, 1)[0].tolist(), t1 - t0, (new_tokens - 1) / (time.perf_counter() - t1)

# %% [markdown]
# Every step must compute the same function. A short chat prompt and a long one (500 tokens,
# the question repeated: token values do not change the time); every step's greedy tokens are
# compared with `generate`'s.

# %%
ids = chat_input_ids(tokenizer, load_prompts(1)[0]).to(device)  # (1, T)
long_ids = ids.repeat(1, 500 // ids.shape[1] + 1)[:, :500]  # (1, 500)
N = sizes.new_tokens
hf_tokens, _ = run_hf_generate(hf_model, ids, N, device)
for step in STEPS:
    tokens, _, _ = run(step, ids, N)
    match = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), None)
    print(f"{step:26} greedy tokens vs generate: " + ("identical" if match is None else f"first differ at token {match}"))

# %% [markdown]
# ## 2. Where one decode step spends its time
#
# `torch.profiler` records every operator PyTorch runs. We profile a few decode steps of the
# *before* model and of `fast`, and sort each operator's own time (self time, so nested calls
# are not counted twice) into families.

# %%
FAMILIES = {"matmul": ("mm", "addmm", "bmm", "matmul", "linear", "mv", "addmv"),
            "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax", "_cudnn_attention"),
            "norms": ("pow", "mean", "rsqrt"),
            "elementwise": ("mul", "add", "silu", "neg", "div", "sub", "where", "logical", "bitwise", "le", "any"),
            "copies/cat": ("cat", "copy_", "index_copy", "_to_copy", "clone", "index", "contiguous", "expand", "repeat")}


def op_family(name):
    op = name.removeprefix("aten::")
    for family, starts in FAMILIES.items():
        if any(op == s or op.startswith(s + "_") or op.startswith("_" + s) for s in starts):
            return family
    return "other"

# %%
def profile_decode(step, steps=5):
    model, _ = configure(step)
    cache = KVCache.for_model(model, ids.shape[1] + steps + 8)
    with torch.inference_mode():
        prefill(model, ids, cache)
        token, pos = ids[:, -1:], torch.tensor([ids.shape[1]], device=device)
        decode_step(model, token, pos, cache)  # warm-up
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                pos += 1
                decode_step(model, token, pos, cache)
    times = {f: 0.0 for f in [*FAMILIES, "other"]}
    for ev in prof.key_averages():
        times[op_family(ev.key)] += ev.self_cpu_time_total / steps / 1e3  # ms per step
    return times

# %%
profiles = {step: profile_decode(step) for step in ("before", "+ fused projections")}
print(f"{'op family':12} " + " ".join(f"{s:>22}" for s in profiles) + "   (ms of host time per decode step)")
for family in profiles["before"]:
    print(f"{family:12} " + " ".join(f"{p[family]:22.2f}" for p in profiles.values()))
print(f"{'total':12} " + " ".join(f"{sum(p.values()):22.2f}" for p in profiles.values()))
top = max(profiles["before"], key=profiles["before"].get)
print(f"largest family before: {top}, {profiles['before'][top] / sum(profiles['before'].values()):.0%} of the step")

# %% [markdown]
# On a GPU the profiler's CPU time is the time to *launch* kernels; the kernels themselves run
# on the device (pass `activities=[ProfilerActivity.CUDA]` to see them). On a CPU the two are the
# same thing.

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
width, families = 0.4, list(profiles["before"])
for i, (step, p) in enumerate(profiles.items()):
    ax.bar([j + (i - 0.5) * width for j in range(len(families))], [p[f] for f in families], width, label=step)
ax.set_xticks(range(len(families)), families)
ax.set_ylabel("host time per decode step (ms)")
ax.set_xlabel("operator family")
ax.set_title(f"One decode step by op family, {info.label}, {device.type}")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. One change at a time
#
# What each change does:
# - **last-position logits in prefill.** Only the last prompt position's logits pick the first
#   new token, but the head (vocabulary × hidden, the largest matrix) ran for every position and
#   wrote a T × V tensor. `Transformer(..., last_only=True)` keeps one row before the head.
# - **GQA without copies.** `repeat_kv` copies each key/value head for every query head of its
#   group, every layer, every step. `scaled_dot_product_attention(..., enable_gqa=True)` reads them in place.
# - **no mask for one query.** One new token on a sliced cache may see every key it gets back; building
#   a boolean mask for it is pure overhead.
# - **fused projections.** q, k, v read the same input: stacking their weights makes one matmul
#   (one weight read, one call) instead of three; gate and up likewise, two into one.
#
# Every step and `generate` run in turn, `repeats` times over, so a slow moment of a shared
# machine hits all of them alike; we keep medians and the spread.

# %%
results = {name: {"prefill_s": [], "decode_tok_s": []} for name in [*STEPS, "transformers generate"]}
run_hf_generate(hf_model, long_ids, 1, device)  # warm-up at the long shape
for step in STEPS:
    run(step, long_ids, 1)
for rep in range(sizes.repeats):
    for step in STEPS:
        results[step]["prefill_s"].append(run(step, long_ids, 1)[1])
        results[step]["decode_tok_s"].append(run(step, ids, N)[2])
    results["transformers generate"]["prefill_s"].append(run_hf_generate(hf_model, long_ids, 1, device)[1].ttft_s)
    results["transformers generate"]["decode_tok_s"].append(run_hf_generate(hf_model, ids, N, device)[1].decode_tokens_per_s)

# %%
med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
hf = med["transformers generate"]
print(f"{'step':26} {'prefill, 500 tok':>17} {'vs step before':>15} {'decode tok/s':>13} {'vs before':>10} "
      f"{'vs generate':>12}")
prev = None
for name, r in results.items():
    m, spread = med[name], f"[{min(r['decode_tok_s']):.1f}-{max(r['decode_tok_s']):.1f}]"
    step_pre = f"{med[prev]['prefill_s'] / m['prefill_s']:.2f}x" if prev and name in STEPS else ""
    step_dec = f"{m['decode_tok_s'] / med[prev]['decode_tok_s']:.2f}x" if prev and name in STEPS else ""
    print(f"{name:26} {m['prefill_s'] * 1e3:14.0f} ms {step_pre:>15} {m['decode_tok_s']:8.1f} {spread:>4} {step_dec:>10} "
          f"{m['decode_tok_s'] / hf['decode_tok_s']:11.2f}x")
    prev = name
print(f"(prefill: time to the first token of a 500-token prompt; decode: {N - 1} steps after a {ids.shape[1]}-token "
      f"prompt; medians of {sizes.repeats}, [min-max]; {info.dtype}, batch 1, greedy, {device.type})")

# %% [markdown]
# The cumulative effect, `before` → `fast`, and against `generate`. A change smaller than the
# spread of its repeats is within noise on this machine: we say so rather than count it.

# %%
def verdict(ratio, spread):
    if abs(ratio - 1) <= spread:
        return f"{ratio:.2f}x (within the {spread:.0%} spread of the repeats: no measurable change)"
    return f"{ratio:.2f}x ({'faster' if ratio > 1 else 'slower'})"


def rel_spread(name, key):
    xs = results[name][key]
    return (max(xs) - min(xs)) / statistics.median(xs)


first, last = "before", "+ fused projections"
for key, what in (("prefill_s", "prefill"), ("decode_tok_s", "decode")):
    gain = med[first][key] / med[last][key] if key == "prefill_s" else med[last][key] / med[first][key]
    vs_hf = hf[key] / med[last][key] if key == "prefill_s" else med[last][key] / hf[key]
    s = max(rel_spread(first, key), rel_spread(last, key))
    print(f"{what}: all four changes {verdict(gain, s)}; course vs generate {verdict(vs_hf, max(s, rel_spread('transformers generate', key)))}")

# %% [markdown]
# Why the prefill gains most from the first change: the head's share of a prefill's matmul work
# is its V × C weights against every layer's, per position. From the config:

# %%
from course_lib.transformer import parameter_counts

counts = parameter_counts(cfg)
head_share = cfg.vocab_size * cfg.hidden_size / (counts["attention"] + counts["mlp"] + cfg.vocab_size * cfg.hidden_size)
T_long = long_ids.shape[1]
print(f"the head is {head_share:.0%} of the matmul FLOPs per position; over a {T_long}-token prefill, "
      f"last_only saves {T_long - 1} of {T_long} head products and a {T_long} x {cfg.vocab_size:,} logits tensor "
      f"({T_long * cfg.vocab_size * fast.embed_tokens.weight.element_size() / 1e6:.0f} MB in {info.dtype})")
for step in ("before", "+ last-position logits"):
    print(f"  {step:24} prefill {med[step]['prefill_s'] * 1e3:.0f} ms")

# %% [markdown]
# GQA only saves something when query heads share key/value heads:

# %%
group = cfg.num_heads // cfg.num_kv_heads
copied = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (ids.shape[1] + N) * fast.embed_tokens.weight.element_size()
if group == 1:
    print(f"this model has one KV head per query head (group 1): repeat_kv returned its input, nothing was copied")
else:
    print(f"groups of {group}: repeat_kv wrote about {copied / 1e6:.1f} MB of keys and values per decode step at "
          f"context {ids.shape[1] + N}, all of it copies of {copied / group / 1e6:.1f} MB already in the cache")
g = med["+ GQA without copies"]["decode_tok_s"] / med["+ last-position logits"]["decode_tok_s"]
print(f"measured: decode {verdict(g, max(rel_spread('+ GQA without copies', 'decode_tok_s'), rel_spread('+ last-position logits', 'decode_tok_s')))}")

# %% [markdown]
# At this short context the keys and values are small, so copying them costs little. The copy
# grows with the context; timing one layer's attention alone for one query at a few context
# lengths shows where it starts to matter:

# %%
group_q = torch.randn(1, cfg.num_heads, 1, cfg.head_dim, device=device, dtype=fast.embed_tokens.weight.dtype)
print(f"one layer's attention, one query, {cfg.num_heads} query heads on {cfg.num_kv_heads} KV heads "
      f"(median of 50 calls, microseconds):")
for S in (64, 256, 1024):
    k = torch.randn(1, cfg.num_kv_heads, S, cfg.head_dim, device=device, dtype=group_q.dtype)
    with_copies = median_time(lambda: F.scaled_dot_product_attention(group_q, repeat_kv(k, group), repeat_kv(k, group)),
                              device, repeats=50)
    in_place = median_time(lambda: F.scaled_dot_product_attention(group_q, k, k, enable_gqa=True), device, repeats=50)
    print(f"  context {S:5}: repeat_kv {with_copies * 1e6:7.1f} us, enable_gqa {in_place * 1e6:7.1f} us "
          f"({with_copies / in_place:.1f}x), x {cfg.num_layers} layers per step")

# %% [markdown]
# ## 4. On the roofline
#
# At batch 1 a decode step reads every weight once: the ceiling is memory bandwidth divided by
# the bytes per step (notebook 03). Bandwidth is measured here, now, in the same process.

# %%
from course_lib.roofline import measure_bandwidth, model_decode_ceiling

bandwidth = measure_bandwidth(device, repeats=sizes.repeats + 2)
ceiling = model_decode_ceiling(info, bandwidth, ids.shape[1] + N // 2)
print(f"copy bandwidth {bandwidth:.1f} GB/s -> ceiling {ceiling:.1f} tok/s at context {ids.shape[1] + N // 2} "
      f"({info.bytes / 1e6:.0f} MB of weights per step)")
for name in ("before", "+ fused projections", "transformers generate"):
    print(f"  {name:24} {med[name]['decode_tok_s']:6.1f} tok/s = {med[name]['decode_tok_s'] / ceiling:.0%} of the ceiling")
frac = med["+ fused projections"]["decode_tok_s"] / ceiling
print(f"course_lib's loop is {'within reach of' if frac >= 0.5 else 'far from'} the ceiling ({frac:.0%}): "
      + ("the time left is mostly reading weights" if frac >= 0.5 else "per-operator overhead still costs more than the weight reads"))

# %% [markdown]
# When the matmul family is most of the profile and the loop already sits near the ceiling, the
# remaining time is reading weights: no change to the *code around* the matmuls can beat that.
# Smaller weights can (notebook 05), and so can sharing each weight read among many sequences
# (notebook 06). On a GPU the picture differs: a 135 M model's matmuls take microseconds, and the
# step is dominated by the hundreds of kernel *launches* around them — the next section.

# %% [markdown]
# ## 5. The GPU path: one decode step as one CUDA graph
#
# A CUDA graph records a sequence of kernels once and replays it with one launch. It can
# capture a step only if the step has fixed shapes and never waits for the device (no `.item()`,
# no `int(tensor)`). The course's decode step meets both with a *static* cache (notebook 04):
# every step returns all `max_len` positions and a mask from positions hides the unwritten ones;
# size checks that would read a value back are skipped on a GPU and while compiling.
# `torch.compile(fullgraph=True)` raises at the first graph break, so tracing the step proves it
# — here with the `eager` backend, which traces without generating code (seconds, not minutes).

# %%
caches = [KVCache.for_model(fast, ids.shape[1] + 8, static=True) for _ in range(2)]  # one eager, one traced
traced_step = torch.compile(decode_step, backend="eager", fullgraph=True)
with torch.inference_mode():
    for cache in caches:
        logits = prefill(fast, ids, cache)
    token, pos = logits.argmax(-1, keepdim=True), torch.tensor([ids.shape[1]], device=device)
    eager = decode_step(fast, token, pos, caches[0])
    traced = traced_step(fast, token, pos, caches[1])
torch._dynamo.reset()
gap = (traced.float() - eager.float()).abs().max().item()
print(f"decode step traced as one graph (fullgraph=True, no graph break); largest logit difference from the "
      f"eager step: {gap:.1e}; next token " + ("identical" if traced.argmax() == eager.argmax() else "differs"))

# %% [markdown]
# On CUDA, `mode="reduce-overhead"` turns that graph into a CUDA graph; `python -m course_lib
# bench --suite kv` measures it there (`compiled_decode_speedup`). The speculative loop uses
# static caches on a GPU too, so its steps need no host sync per layer.
#
# ## What we measured

# %%
print(f"{info.label}, batch 1, greedy, {hardware_stamp().short()}, {torch.get_num_threads()} torch threads")
print(f"- one decode step before: {sum(profiles['before'].values()):.1f} ms of host time, {top} "
      f"{profiles['before'][top] / sum(profiles['before'].values()):.0%} of it")
for prev_name, name in zip(list(STEPS)[:-1], list(STEPS)[1:]):
    d = med[name]["decode_tok_s"] / med[prev_name]["decode_tok_s"]
    p = med[prev_name]["prefill_s"] / med[name]["prefill_s"]
    s = max(rel_spread(name, "decode_tok_s"), rel_spread(prev_name, "decode_tok_s"))
    sp = max(rel_spread(name, "prefill_s"), rel_spread(prev_name, "prefill_s"))
    print(f"- {name[2:]}: prefill {verdict(p, sp)}, decode {verdict(d, s)}")
print(f"- course_lib now: prefill {hf['prefill_s'] / med[last]['prefill_s']:.2f}x and decode "
      f"{med[last]['decode_tok_s'] / hf['decode_tok_s']:.2f}x transformers' generate (> 1: the course is faster)")
print(f"- roofline: {med['before']['decode_tok_s'] / ceiling:.0%} -> {med[last]['decode_tok_s'] / ceiling:.0%} "
      f"of the bandwidth ceiling ({ceiling:.1f} tok/s)")

# %% [markdown]
# ## Where production engines do the same
#
# - **Fused projections:** vLLM loads q, k, v into one `QKVParallelLinear` and gate, up into one
#   `MergedColumnParallelLinear` (split again across GPUs for tensor parallelism); gpt-fast keeps
#   one `wqkv` matrix; TensorRT-LLM and llama.cpp fuse likewise.
# - **GQA without copies:** FlashAttention and FlashInfer kernels index the shared key/value head
#   of each query head instead of copying it; FlashInfer and FlashDecoding pack a group's query
#   heads together so one read of the keys serves the whole group (exercise 2).
# - **Logits only where needed:** vLLM and SGLang compute logits only for the positions that
#   sample a token (the last of each prompt, every position of a speculative verify).
# - **CUDA graphs:** vLLM and SGLang capture decode steps for a set of batch sizes at start-up;
#   gpt-fast gets them from `torch.compile(mode="reduce-overhead")` over a static KV cache.
#
# ## Exercises
#
# **Exercise 1 — fuse two layers.** Write `my_fuse(a, b)`: one `nn.Linear` whose output is
# `a(x)` followed by `b(x)` along the last dimension, without running either (same device, dtype
# and biases).

# %%
def my_fuse(a, b):
    raise NotImplementedError  # your code here


def check_fuse(fn):
    g = torch.Generator().manual_seed(0)
    a, b, x = nn.Linear(16, 8, bias=True), nn.Linear(16, 4, bias=True), torch.randn(3, 16, generator=g)
    try:
        fused = fn(a, b)
    except NotImplementedError:
        return print("not done yet: hint: torch.cat the weights along dim 0 (rows = outputs), and the biases")
    if not isinstance(fused, nn.Linear) or tuple(fused.weight.shape) != (12, 16):
        return print(f"not yet: expected an nn.Linear with a (12, 16) weight, got {type(fused).__name__}")
    if fused.bias is None:
        return print("not yet: the fused layer lost the biases")
    ya, yb = fused(x).split([8, 4], dim=-1)
    ok = torch.allclose(ya, a(x), atol=1e-6) and torch.allclose(yb, b(x), atol=1e-6)
    print("correct: one matmul, both outputs" if ok else "not yet: outputs differ - a's rows first, then b's")


check_fuse(my_fuse)

# %% [markdown]
# **Exercise 2 — grouped attention for one query, without copies.** For a decode step, q is
# (B, H, 1, D) and the cache's k, v are (B, KV, S, D). The H/KV query heads of a group all read
# the same key/value head, and a single query needs no mask: view q as (B, KV, H/KV, D) — the
# group's heads as if they were H/KV query *positions* — and call plain
# `F.scaled_dot_product_attention` with no `enable_gqa` and no copies. Return (B, H, 1, D).

# %%
def my_gqa_decode(q, k, v):
    raise NotImplementedError  # your code here


def check_gqa_decode(fn):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3))
    try:
        got = fn(q, k, v)
    except NotImplementedError:
        return print("not done yet: hint: q.view(B, KV, H // KV, D), attend, then view back to (B, H, 1, D)")
    if got.shape != want.shape:
        return print(f"not yet: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    print("correct: the grouped answer, no key or value copied" if torch.allclose(got, want, atol=1e-5)
          else "not yet: values differ - heads h*G..h*G+G-1 belong to KV head h (view, do not transpose)")


check_gqa_decode(my_gqa_decode)

# %% [markdown]
# **Exercise 3 — what is left.** From `profiles`, compute the share of the `fast` step's host time
# that is *not* matmul, and write `my_overhead_share(profile)` returning it as a fraction.

# %%
def my_overhead_share(profile):
    raise NotImplementedError  # your code here


def check_overhead_share(fn):
    try:
        got = fn(profiles["+ fused projections"])
    except NotImplementedError:
        return print("not done yet: hint: 1 - matmul time / total time")
    p = profiles["+ fused projections"]
    want = 1 - p["matmul"] / sum(p.values())
    print(f"correct: {got:.0%} of the step is not matmul" if abs(got - want) < 1e-9
          else f"not yet: got {got:.3f} - a fraction of the total, between 0 and 1")


check_overhead_share(my_overhead_share)

# %% [markdown]
# ## Solutions
#
# The solution cells are collapsed: click the bar beside a cell to open it once you have tried.

# %%
def my_fuse(a, b):
    fused = nn.Linear(a.in_features, a.out_features + b.out_features, bias=a.bias is not None,
                      device=a.weight.device, dtype=a.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([a.weight, b.weight]))  # rows = outputs: a's, then b's
        if a.bias is not None:
            fused.bias.copy_(torch.cat([a.bias, b.bias]))
    return fused


check_fuse(my_fuse)

# %%
def my_gqa_decode(q, k, v):
    B, H, _, D = q.shape
    KV = k.shape[1]
    grouped = q.view(B, KV, H // KV, D)  # a group's query heads become H/KV queries of one KV head
    return F.scaled_dot_product_attention(grouped, k, v).view(B, H, 1, D)


check_gqa_decode(my_gqa_decode)

# %%
def my_overhead_share(profile):
    return 1 - profile["matmul"] / sum(profile.values())


check_overhead_share(my_overhead_share)
