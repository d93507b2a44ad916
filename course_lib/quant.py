"""Weight quantization: int8 and int4 from scratch, exact memory accounting. Built in notebooks/05_quantization.ipynb.

A b-bit integer code q stands for a float through a scale s (and, asymmetric, an offset), kept
for the whole tensor, for each output row ("channel") or for each group of `group_size`
consecutive weights of a row:
    symmetric (absmax):  s = max|w| / (2^(b-1) - 1)      q = round(w / s)        w ~ q * s
    asymmetric:          s = (max w - min w) / (2^b - 1)  q = round(w / s) + z    w ~ (q - z) * s
where the zero point z = round(-min w / s) is an integer (min/max stretched to include 0, so 0 is
exact), or, with float_zero, the minimum itself is kept as a float m and w ~ q * s + m (llama.cpp's
Q4_1). Scales are stored rounded up (and float minimums rounded down), so the grid always covers
the weights it stands for, and rounding to the nearest code moves every weight by at most s / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantScheme:
    """How a weight matrix is turned into integer codes."""

    bits: int = 8  # 2..8; 4-bit codes are packed two per byte, other widths use a byte each
    granularity: str = "channel"  # "tensor": one scale; "channel": one per row; "group": one per group of a row
    group_size: int = 64  # weights per group (granularity "group" only)
    symmetric: bool = True  # True: absmax, no zero point; False: min/max with a zero point
    float_zero: bool = False  # asymmetric only: keep the minimum as a float (Q4_1) instead of an integer
    scale_dtype: torch.dtype = torch.float16  # how scales (and float minimums) are stored

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"unsupported bit width {self.bits!r}: bits must be an integer from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.float_zero and self.symmetric:
            raise ValueError("float_zero needs symmetric=False: a symmetric scheme has no zero point")
        if not self.scale_dtype.is_floating_point:
            raise ValueError(f"scale_dtype must be a float type, got {self.scale_dtype}")

    @property
    def qmin(self) -> int:
        """Smallest code: -(2^(b-1) - 1) symmetric (the grid stays symmetric), 0 asymmetric."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: 2^(b-1) - 1 symmetric, 2^b - 1 asymmetric."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def label(self) -> str:
        """Short name for tables, e.g. 'int4 g64 asym'."""
        where = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        kind = "sym" if self.symmetric else ("asym, float min" if self.float_zero else "asym")
        return f"int{self.bits} {where} {kind}"


INT8 = QuantScheme(bits=8, granularity="channel")  # the course's int8: per-channel absmax
INT4 = QuantScheme(bits=4, granularity="group", group_size=64, symmetric=False)  # int4 g64 with zero points


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes 0..15 (..., n) two per byte -> uint8 (..., n/2): element 2i low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of codes per row, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("int4 codes must lie in 0..15 before packing")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., n/2) -> uint8 codes (..., n)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (..., n/2, 2) -> (..., n)


def _cast(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """x in `dtype`, rounded up (direction=inf) or down (-inf) so the stored value bounds x."""
    y = x.to(dtype)
    off = y.float() < x if direction > 0 else y.float() > x
    return torch.where(off, torch.nextafter(y, torch.full_like(y, direction)), y)


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized (R, C) matrix: codes plus one scale (and zero point) per tensor, row or group."""

    codes: torch.Tensor  # (R, C) int8 symmetric / uint8 asymmetric; 4-bit: uint8 (R, C/2), two per byte
    scale: torch.Tensor  # (A, G) in scheme.scale_dtype; A = 1 per-tensor else R, G = groups per row
    zero: torch.Tensor | None  # (A, G): uint8 zero points, float minimums (float_zero) or None (symmetric)
    shape: tuple[int, int]
    scheme: QuantScheme

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + zero points: the exact memory this tensor holds."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def int_codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The integer codes (R, C) as int32 (unpacked, the +8 offset of symmetric int4 removed)."""
        codes = self.codes if rows is None else self.codes[rows]
        if self.scheme.bits == 4:
            codes = unpack_int4(codes).to(torch.int32)
            return codes - 8 if self.scheme.symmetric else codes
        return codes.to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Floats (R, C) (or just `rows`), computed in fp32: q*s, (q - z)*s, or q*s + m."""
        codes = self.codes if rows is None else self.codes[rows]
        if self.scheme.bits == 4:
            codes = unpack_int4(codes)  # stored codes 0..15 (symmetric ones carry +8)
        scale, zero = self.scale, self.zero
        if rows is not None and scale.shape[0] > 1:  # per-tensor scales are shared by every row
            scale, zero = scale[rows], None if zero is None else zero[rows]
        R, G = codes.shape[0], scale.shape[1]
        q = codes.view(R, G, -1).float()  # (R, G, C/G): one scale per (row, group)
        s = scale.float()[..., None]  # (A, G, 1)
        # Every variant is q * s + offset, the offset one number per group: two passes over the
        # weight (convert, multiply-add) however the zero point is stored.
        if zero is not None:
            offset = zero.float()[..., None] if zero.is_floating_point() else -zero.float()[..., None] * s
        elif self.scheme.bits == 4:
            offset = -8 * s  # symmetric int4 stores q + 8
        else:
            return (q * s).view(R, -1).to(dtype)
        return torch.addcmul(offset, q, s).view(R, -1).to(dtype)


def quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """Quantize a 2-D float tensor (R, C) with `scheme`; raises ValueError if the groups do not fit."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize takes a 2-D float tensor, got {w.dim()}-D {w.dtype}")
    R, C = w.shape
    if scheme.granularity == "group" and C % scheme.group_size:
        raise ValueError(f"group_size {scheme.group_size} does not divide the row length {C} "
                         f"(divisors near it: {[g for g in (16, 32, 48, 64, 96, 128, 192, 256) if C % g == 0]})")
    if scheme.bits == 4 and C % 2:
        raise ValueError(f"int4 packs two codes per byte: the row length {C} must be even")
    G = C // scheme.group_size if scheme.granularity == "group" else 1
    x = w.detach().float().reshape(R, G, C // G)  # (R, G, g)
    dims = (0, 1, 2) if scheme.granularity == "tensor" else (2,)
    zero = None
    if scheme.symmetric:
        step = x.abs().amax(dims, keepdim=True) / scheme.qmax  # (A, G, 1)
        scale = _cast(torch.where(step > 0, step, 1.0), scheme.scale_dtype, float("inf"))  # round up: no clipping
        q = torch.round(x / scale.float())
    elif scheme.float_zero:
        low = _cast(x.amin(dims, keepdim=True), scheme.scale_dtype, -float("inf"))  # round down: w - m >= 0
        step = (x.amax(dims, keepdim=True) - low.float()) / scheme.qmax
        scale = _cast(torch.where(step > 0, step, 1.0), scheme.scale_dtype, float("inf"))
        q = torch.round((x - low.float()) / scale.float())
        zero = low
    else:
        low = x.amin(dims, keepdim=True).clamp(max=0)  # stretch the range to include 0
        step = (x.amax(dims, keepdim=True).clamp(min=0) - low) / scheme.qmax
        scale = _cast(torch.where(step > 0, step, 1.0), scheme.scale_dtype, float("inf"))
        zero = torch.round(-low / scale.float()).clamp(0, scheme.qmax)
        q = torch.round(x / scale.float()) + zero
        zero = zero.to(torch.uint8)
    if not torch.isfinite(scale).all():
        raise ValueError(f"weights up to {x.abs().max():.3g} overflow {scheme.scale_dtype} scales: "
                         "use scale_dtype=torch.float32")
    # Integer zero points can put a value half a step outside 0..qmax (see the docstring): clamp.
    q = q.clamp(scheme.qmin, scheme.qmax).reshape(R, C)
    if scheme.bits == 4:
        codes = pack_int4(q + 8 if scheme.symmetric else q)  # symmetric int4: -7..7 stored as 1..15
    else:
        codes = q.to(torch.int8 if scheme.symmetric else torch.uint8)
    zero = None if zero is None else zero.flatten(1)  # (A, G, 1) -> (A, G)
    return QuantizedTensor(codes, scale.flatten(1), zero, (R, C), scheme)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """w quantized and dequantized again (same dtype): the weight the quantized model really uses."""
    return quantize(w, scheme).dequantize(w.dtype)


def wide_range(dtype: torch.dtype) -> bool:
    """True for float types with fp32's exponent range (fp32, bf16); False for fp16."""
    return torch.finfo(dtype).max > 1e38


class QuantLinear(nn.Module):
    """A linear layer whose weight is kept as codes and scales and dequantized on every forward."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.scheme, self.out_features, self.in_features = qweight.scheme, *qweight.shape
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero", qweight.zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantLinear:
        """Quantize an nn.Linear's weight (out, in); the bias stays in float."""
        return cls(quantize(linear.weight, scheme), linear.bias)

    @property
    def qweight(self) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor (a view of the buffers, no copy)."""
        return QuantizedTensor(self.codes, self.scale, self.zero, (self.out_features, self.in_features), self.scheme)

    kernel: str = "reference"  # "reference" (PyTorch ops, below), "int4pack" or "triton" (course_lib.kernels)

    def use_kernel(self, kernel: str) -> QuantLinear:
        """Run the matmul with a fused int4 kernel of course_lib.kernels ("int4pack": torch's CPU
        kernel, bf16 compute; "triton": the course's kernel) or the PyTorch-ops "reference"; raises
        ValueError with the reason when the kernel cannot take this layer here."""
        from course_lib import kernels

        self._fused = None
        if kernel == "int4pack":
            self._fused = kernels.Int4PackCPU(self.qweight)  # raises with the reason
        elif kernel == "triton":
            reason = kernels.triton_unavailable(self.codes.device) or (
                None if self.scheme.bits == 4 and self.scheme.granularity == "group" else "it takes int4 with groups")
            if reason:
                raise ValueError(f"the Triton kernel cannot take this layer: {reason}")
            self._fused = kernels.int4_offsets(self.qweight)  # (R, G) fp32 offsets: fp16 would round -z * s
        elif kernel != "reference":
            raise ValueError(f"kernel must be 'reference', 'int4pack' or 'triton', got {kernel!r}")
        self.kernel = kernel
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "reference":  # a fused kernel: dequantizes inside the matmul
            if self.kernel == "triton":
                from course_lib.kernels import int4_matmul_triton

                y = int4_matmul_triton(x, self.qweight, self._fused)
            else:
                y = self._fused(x)
            return y if self.bias is None else y + self.bias
        # On the fly: the whole float weight is rebuilt for every call, which costs time. Fused
        # kernels dequantize inside the matmul instead, so only the small codes cross memory.
        if self.scheme.symmetric and self.scheme.bits == 8 and self.scheme.granularity != "group" and wide_range(x.dtype):
            # One scale per output row (or tensor) factors out of the dot product:
            # x . (q * s) = (x . q) * s, so we convert the codes and scale the (small) output instead.
            # x . q is about 1/s (~100-1000) times the real output: fine in fp32 and bf16 (range
            # 3e38), but it overflows fp16 (max 65,504), which rebuilds the float weight instead.
            y = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype).flatten()
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.qweight.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme.label}"


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized; a lookup dequantizes only the rows it reads."""

    def __init__(self, qweight: QuantizedTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.scheme, self.dtype = qweight.scheme, dtype
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero", qweight.zero)

    @property
    def qweight(self) -> QuantizedTensor:
        """The stored table as a QuantizedTensor (a view of the buffers, no copy)."""
        return QuantizedTensor(self.codes, self.scale, self.zero, (self.num_embeddings, self.embedding_dim), self.scheme)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.dequantize(self.dtype, rows=ids.reshape(-1))  # (N, C)
        return rows.view(*ids.shape, self.embedding_dim)


def _head_name(model: nn.Module) -> str | None:
    """Name of the output head: transformers' get_output_embeddings, else a module called lm_head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def use_kernel(model: nn.Module, kernel: str) -> list[str]:
    """Switch every QuantLinear of the model to `kernel` (see QuantLinear.use_kernel); returns the
    names of the layers that took it. Raises ValueError naming the first layer that cannot: a model
    never runs half on one kernel and half on another without saying so."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, layer in layers:
        try:
            layer.use_kernel(kernel)
        except ValueError as err:
            for _, done in layers:
                done.use_kernel("reference")
            raise ValueError(f"layer {name}: {err}") from err
    return [n for n, _ in layers]


def quantize_model(model: nn.Module, scheme: QuantScheme, keep_head: bool = True, keep_embeddings: bool = True,
                   embedding_scheme: QuantScheme | None = None) -> nn.Module:
    """Swap the model's nn.Linear layers for QuantLinear in place (course Transformer or transformers model).

    keep_head / keep_embeddings leave the output head / the embedding table in float; when they are
    quantized, it is with `embedding_scheme` (default: `scheme`). A head tied to the embedding (one
    matrix, two uses) becomes one quantized matrix serving both; tied, the two flags must agree.
    """
    head = _head_name(model)
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    head_module = model.get_submodule(head) if head else None
    tied = {n: m for n, m in embeddings if head_module is not None and m.weight is head_module.weight}
    if tied and keep_head != keep_embeddings:
        raise ValueError("the head is tied to the embedding: quantizing one of them keeps the float matrix "
                         "for the other, so nothing is saved; pass keep_head == keep_embeddings")
    shared = {}
    if not keep_embeddings:
        for name, emb in embeddings:
            qt = quantize(emb.weight, embedding_scheme or scheme)
            _set(model, name, QuantEmbedding(qt, emb.weight.dtype))
            if name in tied:
                shared[head] = qt
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (name == head and keep_head):
            continue
        new = QuantLinear(shared[name], module.bias) if name in shared else QuantLinear.from_linear(
            module, embedding_scheme or scheme if name == head else scheme)
        _set(model, name, new)
    return model


@dataclass(frozen=True)
class ModelBytes:
    """Exact bytes a model holds, by kind; every tensor counted once (a tied matrix once)."""

    codes: int  # integer codes of quantized layers (ours and bitsandbytes')
    scales: int  # their scales (bitsandbytes: absmax / SCB, incl. double-quantization state)
    zero_points: int  # integer zero points or float minimums
    float_weights: int  # parameters left in float: norms, embeddings/head if kept, biases
    quantized_params: int  # how many weights the codes stand for

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the quantized layers: codes + scales + zero points."""
        return self.codes + self.scales + self.zero_points

    @property
    def total(self) -> int:
        return self.quantized_bytes + self.float_weights

    def as_dict(self) -> dict:
        return {"codes": self.codes, "scales": self.scales, "zero_points": self.zero_points,
                "float_weights": self.float_weights, "quantized_params": self.quantized_params,
                "total": self.total}


def _tensors(obj) -> tuple[torch.Tensor, ...]:
    return tuple(v for v in vars(obj).values() if isinstance(v, torch.Tensor)) if obj is not None else ()


def model_bytes(model: nn.Module) -> ModelBytes:
    """Count every parameter and quantization buffer once (derived tables such as RoPE's are not weights)."""
    seen: set[int] = set()
    counts = dict(codes=0, scales=0, zero_points=0, float_weights=0, quantized_params=0)

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            counts[kind] += t.numel() * t.element_size()

    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            if module.codes.data_ptr() not in seen:
                counts["quantized_params"] += module.qweight.shape[0] * module.qweight.shape[1]
            add("codes", module.codes), add("scales", module.scale)
            add("zero_points", module.zero)
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit (NF4/FP4)
        if state is not None and weight.data_ptr() not in seen:
            counts["quantized_params"] += state.shape.numel()
            add("codes", weight)
            # absmax per block, the 16-entry code table, and with double quantization a second state.
            # (On a CPU, bnb repacks all of it for its kernel at the first forward: count what is there.)
            for t in _tensors(state) + _tensors(getattr(state, "state2", None)):
                add("scales", t)
        # LLM.int8(): one fp32 scale per row, on the weight until the first forward, then on module.state
        row_scales = getattr(weight, "SCB", None)
        if row_scales is None:
            row_scales = getattr(getattr(module, "state", None), "SCB", None)
        if row_scales is not None and weight.data_ptr() not in seen:
            counts["quantized_params"] += weight.numel()
            add("codes", weight), add("scales", row_scales)
    for p in model.parameters():
        add("float_weights", p)
    return ModelBytes(**counts)
