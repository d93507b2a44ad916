"""Roofline: memory bandwidth, matmul rate and the decode ceiling. Built in notebooks/03_measuring_inference.ipynb.

Generating one token at batch 1 reads every weight once (plus the KV cache so far) and does
about 2 FLOPs per weight. On any current device the bytes take longer than the FLOPs, so
    decode ceiling (tokens/s) = bandwidth / (weight bytes + KV-cache bytes read per token).
A real loop reaches some fraction of that; the fraction is the number worth tracking.
"""

from __future__ import annotations

import statistics

import torch

from course_lib.measure import repeat_timed


def measure_bandwidth(device: torch.device | str, size_mb: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s (1e9 bytes/s): bytes read + written by a large tensor copy,
    median of `repeats`. Default size: 256 MB on CPU, 1 GB on a GPU (far beyond the caches)."""
    device = torch.device(device)
    size_mb = size_mb or (256 if device.type == "cpu" else 1024)
    n = size_mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = statistics.median(repeat_timed(lambda: dst.copy_(src), device, repeats, warmup=1))
    moved = 2 * src.numel() * src.element_size()  # each byte is read once and written once
    return moved / seconds / 1e9


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.float32,
                          n: int | None = None, repeats: int = 5) -> float:
    """Dense matmul rate in TFLOP/s (1e12 FLOP/s): an (n, n) @ (n, n) product is 2 n^3 FLOPs,
    median of `repeats`. Default n: 1024 on CPU, 8192 on a GPU."""
    device = torch.device(device)
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = statistics.median(repeat_timed(lambda: a @ b, device, repeats, warmup=1))
    return 2 * n**3 / seconds / 1e12


def kv_bytes_per_position(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: int) -> int:
    """KV-cache bytes for one token position: a key and a value vector per KV head per layer."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_element


def decode_ceiling_tokens_per_s(weight_bytes: float, kv_bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Upper bound on batch-1 decode speed: bandwidth / (weight bytes + KV bytes read per token).

    kv_bytes_per_token is what one decode step reads from the cache:
    kv_bytes_per_position(...) times the context length."""
    if weight_bytes <= 0 or kv_bytes_per_token < 0 or bandwidth_gb_s <= 0:
        raise ValueError(f"need weight_bytes > 0, kv_bytes_per_token >= 0, bandwidth > 0; got "
                         f"{weight_bytes}, {kv_bytes_per_token}, {bandwidth_gb_s}")
    return bandwidth_gb_s * 1e9 / (weight_bytes + kv_bytes_per_token)


def model_decode_ceiling(info, bandwidth_gb_s: float, context_tokens: int) -> float:
    """decode_ceiling_tokens_per_s for a loaded model (course_lib.models.ModelInfo) at a context length."""
    element = torch.empty((), dtype=getattr(torch, info.dtype)).element_size()
    kv = kv_bytes_per_position(info.num_layers, info.num_kv_heads, info.head_dim, element) * context_tokens
    return decode_ceiling_tokens_per_s(info.bytes, kv, bandwidth_gb_s)


def compute_ceiling_tokens_per_s(parameters: int, tokens_per_step: int, tflops: float) -> float:
    """Upper bound set by arithmetic: a step that pushes `tokens_per_step` tokens through the
    model costs about 2 * parameters FLOPs per token and yields one new token."""
    return tflops * 1e12 / (2 * parameters * tokens_per_step)


def roofline_fraction(tokens_per_s: float, ceiling_tokens_per_s: float) -> float:
    """Measured speed as a fraction of the ceiling (1.0 = at the roofline)."""
    if ceiling_tokens_per_s <= 0:
        raise ValueError(f"ceiling must be > 0, got {ceiling_tokens_per_s}")
    return tokens_per_s / ceiling_tokens_per_s


def plot_roofline(bandwidth_gb_s: float, tflops: float, points: dict[str, tuple[float, float]],
                  title: str, ax=None):
    """The roofline (attainable TFLOP/s vs FLOPs per byte, both axes log) with measured points
    given as label -> (arithmetic intensity in FLOP/byte, achieved TFLOP/s)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 4))[1]
    ridge = tflops * 1e12 / (bandwidth_gb_s * 1e9)  # FLOP/byte where the two limits meet
    xs = [ridge / 1000 * 10 ** (i / 10) for i in range(0, 61)]
    ax.plot(xs, [min(tflops, bandwidth_gb_s * 1e9 * x / 1e12) for x in xs], color="k",
            label=f"roofline: {bandwidth_gb_s:.1f} GB/s, {tflops:.3g} TFLOP/s")
    for label, (intensity, achieved) in points.items():
        ax.plot([intensity], [achieved], "o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="arithmetic intensity (FLOP/byte, log scale)",
           ylabel="attainable TFLOP/s (log scale)", title=title)
    ax.legend(fontsize=8)
    return ax
