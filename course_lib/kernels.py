"""Fused int4 matmul kernels: torch's packed CPU kernel and a Triton kernel of our own. Built in notebooks/05_quantization.ipynb.

Notebook 05's int4 layer rebuilds the float weight from its codes on every call (unpack, convert,
multiply-add: three passes over memory) and only then multiplies, so it reads more bytes than fp32
would. A fused kernel reads the packed codes once and dequantizes inside the dot product.

Every 4-bit group scheme of course_lib.quant stores codes u in 0..15 and means w = u * s + o, one
scale s and one offset o per (row, group): o = -z * s (integer zero point z), the float minimum
(Q4_1), or -8 * s (symmetric). Both kernels take that form:

- `Int4PackCPU`: torch's `_weight_int4pack_mm_for_cpu` (an AVX2/AVX-512 kernel in PyTorch >= 2.5)
  with its own packing; it computes in bf16 (activations are rounded to bf16, accumulation in fp32),
  so its output differs from the fp32 reference by bf16 rounding, and it runs only on CPU tensors.
- `int4_matmul_triton`: a Triton kernel written for the course, one program per block of output
  rows, looping over the input in blocks; on a GPU it compiles to one kernel, on a CPU it runs in
  Triton's interpreter when TRITON_INTERPRET=1 (slow: for tests only). Triton has no macOS wheels:
  install it with `pip install "inference-lab[triton]"` on Linux; `triton_unavailable()` says why
  it cannot run here.
"""

from __future__ import annotations

import os

import torch

INT4PACK_GROUPS = (32, 64, 128, 256)  # group sizes torch's packed int4 kernel accepts


def int4_offsets(qweight) -> torch.Tensor:
    """(R, G) float offsets o with w = u * s + o for a 4-bit QuantizedTensor (u = stored codes)."""
    scale = qweight.scale.float()
    if qweight.zero is None:
        return -8 * scale  # symmetric int4 stores q + 8
    if qweight.zero.is_floating_point():
        return qweight.zero.float()  # Q4_1: the float minimum
    return -qweight.zero.float() * scale


def int4pack_unavailable(qweight, device: torch.device | str = "cpu") -> str | None:
    """Why torch's packed int4 CPU kernel cannot run this weight here, or None if it can."""
    if torch.device(device).type != "cpu":
        return f"it runs on CPU tensors only, not {torch.device(device).type}"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"this torch ({torch.__version__}) has no _weight_int4pack_mm_for_cpu (PyTorch >= 2.5 does)"
    if qweight.scheme.bits != 4 or qweight.scheme.granularity != "group":
        return f"it needs int4 with groups, got {qweight.scheme.label}"
    if qweight.scheme.group_size not in INT4PACK_GROUPS:
        return f"group size {qweight.scheme.group_size} is not one of {INT4PACK_GROUPS}"
    if qweight.shape[0] % 16:
        return f"it needs a multiple of 16 output features, got {qweight.shape[0]}"
    return None


class Int4PackCPU:
    """A 4-bit weight repacked for torch's fused CPU kernel; call it like F.linear(x, w)."""

    def __init__(self, qweight):
        reason = int4pack_unavailable(qweight)
        if reason:
            raise ValueError(f"torch's int4 CPU kernel cannot take this weight: {reason}")
        from course_lib.quant import unpack_int4

        self.group_size, self.out_features = qweight.scheme.group_size, qweight.shape[0]
        codes = unpack_int4(qweight.codes).to(torch.int32)  # (N, K) stored codes 0..15
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # (N, K/2) uint8
        scale = qweight.scale.float()  # (N, K/g)
        # torch's convention: w = (u - 8) * scale + zero, so zero = o + 8 * scale
        zero = int4_offsets(qweight) + 8 * scale
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K): the kernel computes in bf16
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


# ---- Triton -------------------------------------------------------------------------------------

def triton_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the Triton kernel cannot run on `device` here, or None if it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ("Triton is not installed (Linux x86-64/aarch64 only: pip install 'inference-lab[triton]'; "
                "there are no macOS wheels)")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on a CPU Triton kernels run only in the interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device.type == "cpu":
        import triton.language as tl

        if type(tl.sum).__name__ != "InterpretedFunction":  # triton.language was built before the setting
            return ("Triton was imported before TRITON_INTERPRET=1 was set (bitsandbytes imports it, for one): "
                    "set it before any import, at the top of the notebook, and restart the kernel")
    if device.type not in ("cpu", "cuda"):
        return f"no Triton backend for {device.type} here"
    return None


_KERNEL = None


def _kernel():
    """Build the kernel on first use (the interpreter setting is read when the kernel is made)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def int4_matmul_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, N, K,
                           GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (m, pid): output rows pid*BLOCK_N .. +BLOCK_N of input row m
        m, pid = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)  # (BK,) input positions
            col_ok = cols < K
            ok = row_ok[:, None] & col_ok[None, :]
            # two codes per byte, element 2i in the low nibble: byte i // 2, shift 4 * (i % 2)
            byte = tl.load(codes_ptr + rows[:, None] * (K // 2) + cols[None, :] // 2, mask=ok, other=0)
            u = ((byte >> ((cols[None, :] % 2) * 4)) & 0xF).to(tl.float32)  # (BN, BK) codes 0..15
            g = rows[:, None] * (K // GROUP) + cols[None, :] // GROUP  # (BN, BK) index of (row, group)
            s = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)
            o = tl.load(offset_ptr + g, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + m * K + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BK,)
            acc += tl.sum((u * s + o) * x[None, :], axis=1)  # dequantize inside the dot product
        tl.store(y_ptr + m * N + rows, acc, mask=row_ok)

    _KERNEL = int4_matmul_kernel
    return _KERNEL


def int4_matmul_triton(x: torch.Tensor, qweight, offsets: torch.Tensor | None = None,
                       block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """x (..., K) @ the 4-bit group-quantized weight (N, K)^T -> (..., N) in x's dtype, accumulated
    in fp32 by the course's Triton kernel. `offsets` (N, K/g): int4_offsets(qweight), if precomputed."""
    reason = triton_unavailable(x.device)
    if reason:
        raise RuntimeError(f"the Triton kernel cannot run here: {reason}")
    if qweight.scheme.bits != 4 or qweight.scheme.granularity != "group":
        raise ValueError(f"the kernel takes int4 with groups, got {qweight.scheme.label}")
    N, K = qweight.shape
    if block_k % 2 or block_k % qweight.scheme.group_size and qweight.scheme.group_size % block_k:
        raise ValueError(f"block_k {block_k} must be even and tile the group size {qweight.scheme.group_size}")
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    offsets = int4_offsets(qweight) if offsets is None else offsets
    y = torch.empty(x2.shape[0], N, device=x.device, dtype=torch.float32)
    grid = (x2.shape[0], (N + block_n - 1) // block_n)
    _kernel()[grid](x2, qweight.codes.contiguous(), qweight.scale.contiguous(), offsets.contiguous(), y, N, K,
                    GROUP=qweight.scheme.group_size, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.to(x.dtype).view(*x.shape[:-1], N)
