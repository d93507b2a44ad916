"""A Llama-family decoder from scratch. Built in notebooks/02_transformer_from_scratch.ipynb."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Shape letters: B batch, T new tokens, S key positions, C hidden size, H query heads,
# KV key/value heads, D head dim, V vocabulary.


@dataclass(frozen=True)
class ModelConfig:
    """The numbers that define a Llama/Qwen2-style decoder."""

    vocab_size: int  # V: rows of the embedding table and of the output head
    hidden_size: int  # C: width of the residual stream
    num_layers: int  # decoder blocks
    num_heads: int  # H: query heads
    num_kv_heads: int  # KV: key/value heads (< H means grouped-query attention)
    head_dim: int  # D: width of one head
    intermediate_size: int  # SwiGLU inner width
    rope_theta: float = 10_000.0  # RoPE base; larger = slower-turning rotations
    rms_norm_eps: float = 1e-5
    max_position: int = 2048  # longest sequence the RoPE tables cover
    tie_embeddings: bool = True  # output head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v (not on o)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dimensions")

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config) -> ModelConfig:
        """Read a transformers LlamaConfig/Qwen2Config; refuse features this file does not implement."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"model_type {model_type!r} is not supported: only 'llama' and 'qwen2'")
        rope = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported: only the default RoPE")
        theta = rope.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10_000.0
        if getattr(hf_config, "mlp_bias", False) or (model_type == "llama" and getattr(hf_config, "attention_bias", False)):
            raise ValueError("Llama with attention_bias/mlp_bias is not supported (o_proj/MLP biases)")
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            rope_theta=float(theta),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            max_position=hf_config.max_position_embeddings,
            tie_embeddings=bool(hf_config.tie_word_embeddings),
            qkv_bias=model_type == "qwen2",
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_position: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle pos * theta^(-2i/D), each (max_position, D), halves repeated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (D/2,)
    angles = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]  # (P, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, D): dim i and i + D/2 form one pair
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + D/2) pair of x (B, H, T, D) by its position's angle; cos/sin (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): same angle for every head
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables; call with positions (T,) or (B, T) to get their cos, sin."""

    def __init__(self, head_dim: int, max_position: int, theta: float):
        super().__init__()
        self.head_dim, self.max_position, self.theta = head_dim, max_position, theta
        cos, sin = rope_tables(head_dim, max_position, theta)
        self.register_buffer("cos", cos, persistent=False)  # derived, not weights: not in state_dict
        self.register_buffer("sin", sin, persistent=False)

    def reset(self) -> None:
        """Recompute the tables in place (after building on the meta device)."""
        cos, sin = rope_tables(self.head_dim, self.max_position, self.theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[input_pos], self.sin[input_pos]  # (T, D) or (B, T, D)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV * n_rep, S, D): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, KV, S, D = x.shape
    return x[:, :, None].expand(B, KV, n_rep, S, D).reshape(B, KV * n_rep, S, D)


def attention_mask(input_pos: torch.Tensor, num_keys: int | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query may see, (B or 1, 1, T, S): keys at positions 0..num_keys-1 (a cache)
    or, with num_keys None, the tokens at input_pos themselves; ANDed with `mask` if given."""
    key_pos = input_pos if num_keys is None else torch.arange(num_keys, device=input_pos.device)  # (S,) or (B, S)
    # The causal rule, written with positions: query at p sees key at s iff s <= p.
    allowed = key_pos[..., None, :] <= input_pos[..., :, None]  # (T, S) or (B, T, S)
    allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]  # (B or 1, 1, T, S)
    if mask is not None:
        allowed = allowed & mask
    # A query that may see nothing (a padding slot) would give NaN, and NaN spreads through
    # later layers via 0 * NaN; let such a row see everything: its output is junk but finite.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


# F.scaled_dot_product_attention reads grouped key/value heads in place from torch 2.5 (enable_gqa);
# older versions get copies made by repeat_kv.
SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output rows are the given layers' rows, stacked: the same products in one
    matmul (one weight read, one kernel launch instead of len(linears))."""
    w = linears[0].weight
    fused = nn.Linear(w.shape[1], sum(m.out_features for m in linears), bias=linears[0].bias is not None,
                      device="meta")  # no init: the weights are copied in below
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=w.requires_grad)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=w.requires_grad)
    return fused


def linear_rows(fused: nn.Module, sizes: tuple[int, ...], index: int, name: str) -> nn.Linear:
    """A read-only nn.Linear over part `index` of a fused layer's rows (a view: no copy)."""
    if not isinstance(fused, nn.Linear):
        raise AttributeError(f"{name} was fused and the fused layer is now {type(fused).__name__}: read its rows "
                             f"{sizes} instead")
    start = sum(sizes[:index])
    part = nn.Linear(fused.in_features, sizes[index], bias=fused.bias is not None, device="meta")
    part.weight = nn.Parameter(fused.weight[start:start + sizes[index]], requires_grad=False)
    if fused.bias is not None:
        part.bias = nn.Parameter(fused.bias[start:start + sizes[index]], requires_grad=False)
    return part


class FusedParts:
    """Projections that read the same input, stacked at load time into one matrix FUSED (one matmul,
    one weight read); the parts PARTS still read, as views of its rows (split sizes in SPLIT)."""

    PARTS: tuple[str, ...] = ()
    FUSED = ""
    SPLIT = ""

    @property
    def fused(self) -> bool:
        return self.FUSED in self._modules

    def fuse(self) -> None:
        """Replace the separate PARTS by one FUSED linear layer holding their rows."""
        if not self.fused:
            setattr(self, self.FUSED, fuse_linears([self._modules[n] for n in self.PARTS]))
            for n in self.PARTS:
                del self._modules[n]

    def __getattr__(self, name: str):
        if name in type(self).PARTS and type(self).FUSED in self._modules:
            return linear_rows(self._modules[type(self).FUSED], getattr(self, type(self).SPLIT),
                               type(self).PARTS.index(name), name)
        return super().__getattr__(name)


class Attention(FusedParts, nn.Module):
    """Grouped-query self-attention with RoPE and a hook for a KV cache.

    Built with the checkpoint's q_proj, k_proj, v_proj; fuse() stacks them into one qkv_proj
    (rows split qkv_split). Fused, q_proj & co. still read, as views of qkv_proj's rows."""

    PARTS, FUSED, SPLIT = ("q_proj", "k_proj", "v_proj"), "qkv_proj", "qkv_split"

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the KV cache keeps one slot per layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, H, KV, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_split = (H * D, KV * D, KV * D)  # output rows of q, k, v (stacked in qkv_proj once fused)
        self.q_proj = nn.Linear(C, H * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, KV * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, KV * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)


    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                kv_cache=None, mask: torch.Tensor | None = None, masks: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)  # (B, T, H*D), (B, T, KV*D) x2: views
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, input_pos, k, v)  # (B, KV, S, D), keys at 0..S-1
        allowed = None
        # One query at position p on a cache that returns only positions 0..p (a KVCache with
        # static=False) may see every key: no mask to build. Otherwise the causal rule needs one.
        # Every layer of one forward sees the same positions, so the mask is built once and shared
        # through `masks` (keyed by the number of keys S); without it each layer builds its own.
        if not (T == 1 and mask is None and input_pos.dim() == 1 and getattr(kv_cache, "static", True) is False):
            allowed = None if masks is None else masks.get(k.shape[2])
            if allowed is None:
                allowed = attention_mask(input_pos, k.shape[2] if kv_cache is not None else None, mask)
                if masks is not None:
                    masks[k.shape[2]] = allowed
        if SDPA_HAS_GQA:  # each group of H/KV query heads reads its key/value head in place
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)  # (B, H, T, D)
        else:
            group = self.num_heads // self.num_kv_heads
            y = F.scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group), attn_mask=allowed)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(FusedParts, nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). fuse() stacks gate_proj and up_proj into gate_up_proj."""

    PARTS, FUSED, SPLIT = ("gate_proj", "up_proj"), "gate_up_proj", "gate_up_split"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_split = (config.intermediate_size, config.intermediate_size)  # rows of gate, up when fused
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).split(self.gate_up_split, dim=-1)  # (B, T, F) x2: views
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def fuse(self) -> None:
        """Fuse the attention's q/k/v and the MLP's gate/up projections (see Attention.fuse)."""
        self.self_attn.fuse()
        self.mlp.fuse()

    def forward(self, x, cos, sin, input_pos, kv_cache=None, mask=None, masks=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, kv_cache, mask, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder: embed -> blocks -> norm -> head. Names follow transformers' Llama minus 'model.'."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.max_position, config.rope_theta)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one matrix, two uses

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, kv_cache=None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T), input_pos (T,) or (B, T) (default arange(T)) -> logits (B, T, V), or with
        last_only the last position's logits (B, 1, V): all a prefill needs, for 1/T of the head's work."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be (B, T) with T >= 1, got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T > self.config.max_position:
            raise ValueError(f"{T} tokens exceed max_position={self.config.max_position}")
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.shape not in ((T,), (B, T)):
            raise ValueError(f"input_pos must be ({T},) or ({B}, {T}), got {tuple(input_pos.shape)}")
        # Checking values needs them on the host: free on CPU, a sync per step on a GPU (skipped),
        # and a graph break for torch.compile (skipped while compiling).
        check = input_pos.device.type == "cpu" and not torch.compiler.is_compiling()
        if check and int(input_pos.max()) >= self.config.max_position:
            raise ValueError(f"position {int(input_pos.max())} >= max_position={self.config.max_position}")
        cos, sin = self.rope(input_pos)  # (T, D) or (B, T, D)
        x = self.embed_tokens(tokens)  # (B, T, C)
        masks: dict = {}  # the attention mask, built by the first layer, shared by the others
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, kv_cache, mask, masks)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): the head (V x C, the largest matmul) runs for one position
        return self.lm_head(self.norm(x))  # (B, T or 1, V)

    @property
    def fused(self) -> bool:
        """True when q/k/v and gate/up run as one matmul each (fuse_projections, done by from_hf)."""
        return all(layer.self_attn.fused and layer.mlp.fused for layer in self.layers)

    def fuse_projections(self) -> Transformer:
        """Fuse every block's q/k/v and gate/up projections in place (same function, fewer matmuls)."""
        for layer in self.layers:
            layer.fuse()
        return self

    def num_parameters(self) -> int:
        """Parameter count; the tied embedding/head matrix counts once."""
        return sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a transformers Llama/Qwen2 state dict in: the key mapping is dropping 'model.'.
        Takes an unfused model (fuse_projections afterwards, as from_hf does)."""
        if any(layer.self_attn.fused or layer.mlp.fused for layer in self.layers):
            raise ValueError("load_hf_state_dict takes an unfused model: load first, then fuse_projections()")
        sd = {k.removeprefix("model."): v for k, v in state_dict.items() if "rotary_emb" not in k}
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        self.load_state_dict(sd, strict=True)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, fused: bool = True) -> Transformer:
        """A Transformer holding a copy of a transformers model's weights, same dtype and device;
        fused=True (the default) stacks q/k/v and gate/up into one matmul each at load time."""
        config = ModelConfig.from_hf(hf_model.config)
        ref = next(hf_model.parameters())
        with torch.device("meta"):  # no memory and no random init: every weight is copied in below
            model = cls(config)
        model = model.to_empty(device=ref.device)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # to_empty makes new tensors: tie again
        model.rope.reset()
        model = model.to(ref.dtype)
        model.load_hf_state_dict(hf_model.state_dict())
        return (model.fuse_projections() if fused else model).eval()


def unfused_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() in the checkpoint's layout: every fused qkv_proj / gate_up_proj split back
    into q_proj, k_proj, v_proj / gate_proj, up_proj (views, no copies)."""
    sd = module.state_dict()
    for name, m in module.named_modules():
        if not isinstance(m, FusedParts) or not m.fused:
            continue
        fused, split = m.FUSED, m.SPLIT
        prefix = f"{name}." if name else ""
        for kind in ("weight", "bias"):
            t = sd.pop(f"{prefix}{fused}.{kind}", None)
            if t is not None:
                for part, rows in zip(m.PARTS, t.split(getattr(m, split))):
                    sd[f"{prefix}{part}.{kind}"] = rows
    return sd


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by component: embedding, attention, mlp, norms, head (0 when tied)."""
    C, H, KV, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    bias = (H + 2 * KV) * D if config.qkv_bias else 0
    attention = C * H * D + 2 * C * KV * D + H * D * C + bias  # q, k, v, o
    return {
        "embedding": config.vocab_size * C,
        "attention": config.num_layers * attention,
        "mlp": config.num_layers * 3 * C * config.intermediate_size,
        "norms": (2 * config.num_layers + 1) * C,
        "head": 0 if config.tie_embeddings else config.vocab_size * C,
    }


def flops_per_token(config: ModelConfig, context: int = 0) -> int:
    """Forward FLOPs for one token: 2 per weight it multiplies (all but the embedding lookup;
    the head always multiplies, tied or not) plus 4*H*D per layer per earlier token for attention."""
    counts = parameter_counts(config)
    matmul_weights = counts["attention"] + counts["mlp"] + config.vocab_size * config.hidden_size
    attention_scores = 4 * config.num_layers * config.num_heads * config.head_dim * context  # QK^T and AV
    return 2 * matmul_weights + attention_scores


def bytes_per_token(config: ModelConfig, bytes_per_param: float = 4, context: int = 0) -> int:
    """Bytes read for one decode step at batch 1: every weight once (the embedding table only one
    row; a tied head reads the full matrix), plus the cached keys/values of `context` tokens."""
    counts = parameter_counts(config)
    C = config.hidden_size
    weights = counts["attention"] + counts["mlp"] + counts["norms"] + C + config.vocab_size * C
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * context
    return int((weights + kv) * bytes_per_param)
