"""KV cache and cached generation. Built in notebooks/04_kv_cache.ipynb.

The naive loop re-runs the whole sequence for every new token. But a token's key and value
vectors never change once computed (attention is causal), so we keep them: a preallocated
buffer per layer, written at explicit positions. Generation splits in two phases:
    prefill  - run the prompt once (T tokens in parallel), filling positions 0..T-1;
    decode   - run one token at a time at position p, attending to the cached 0..p.
Memory: 2 (K and V) x layers x KV heads x head dim x tokens x bytes per value, per sequence.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterable, Iterator, Sequence

import torch

from course_lib.env import synchronize
from course_lib.generation import SamplingConfig, sample_next_token

# Shape letters: L layers, B batch, KV key/value heads, S cache positions, T new tokens, D head dim.


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, tokens: int,
                   batch_size: int = 1, bytes_per_value: int = 4) -> int:
    """KV-cache size: 2 (K and V) x layers x KV heads x head dim x tokens x batch x bytes per value."""
    return 2 * num_layers * num_kv_heads * head_dim * tokens * batch_size * bytes_per_value


class KVCache:
    """Preallocated keys and values of every layer, (L, B, KV, S, D), written at explicit positions.

    static=False returns only the positions written so far (0..end-1): less attention work, but
    the shapes grow each step. static=True always returns all max_len positions (unwritten ones
    are hidden by the causal mask, which comes from positions), so every decode step has the
    same shapes and CUDA graphs / torch.compile(mode="reduce-overhead") can capture it.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", static: bool = False):
        if min(num_layers, batch_size, num_kv_heads, max_len, head_dim) < 1:
            raise ValueError("every KVCache dimension must be >= 1, got "
                             f"{(num_layers, batch_size, num_kv_heads, max_len, head_dim)}")
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)  # (L, B, KV, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.static = static
        if static and self.k.device.type == "cuda":
            # Tell torch.compile these buffers keep their address, so a CUDA graph can write them in place.
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    @classmethod
    def for_model(cls, model, max_len: int, batch_size: int = 1, static: bool = False) -> KVCache:
        """A cache shaped for a course Transformer, on its device and in its dtype."""
        cfg, ref = model.config, next(model.parameters())
        return cls(cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, ref.dtype, ref.device, static)

    @property
    def max_len(self) -> int:
        """Positions the cache can hold (0..max_len-1)."""
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V buffers."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at positions input_pos (T,); return this layer's keys/values (B, KV, S, D)."""
        if input_pos.dim() != 1:
            raise ValueError(f"KVCache takes positions (T,) shared by the batch, got shape {tuple(input_pos.shape)}")
        # Reading a position on the host is free on a CPU; on a GPU it stalls the queue and breaks
        # graph capture, so a static cache there skips it (stream_cached checks lengths up front).
        check = input_pos.device.type == "cpu" and not torch.compiler.is_compiling()
        end = int(input_pos.max()) + 1 if check or not self.static else None
        if end is not None and end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end - 1} does not fit a cache of max_len="
                             f"{self.max_len} (positions 0..{self.max_len - 1}); make the cache longer "
                             "or generate fewer tokens - nothing is truncated silently")
        k_buf, v_buf = self.k[layer_idx], self.v[layer_idx]  # (B, KV, S, D) views
        k_buf.index_copy_(2, input_pos, k.to(k_buf.dtype))  # the write: slot = position
        v_buf.index_copy_(2, input_pos, v.to(v_buf.dtype))
        if self.static:
            return k_buf, v_buf  # fixed shape (B, KV, max_len, D)
        return k_buf[:, :, :end], v_buf[:, :, :end]  # (B, KV, end, D): only what was written


def prefill(model, input_ids: torch.Tensor, cache: KVCache, start_pos: int = 0) -> torch.Tensor:
    """Run a prompt chunk (B, T) at positions start_pos.. through the model, filling the cache;
    return the last position's logits (B, V). Only that position goes through the output head
    (last_only): the others' logits would be thrown away, and the head is the largest matmul."""
    T = input_ids.shape[1]
    input_pos = torch.arange(start_pos, start_pos + T, device=input_ids.device)  # (T,)
    if _takes_last_only(type(model)):
        return model(input_ids, input_pos, kv_cache=cache, last_only=True)[:, -1, :]
    return model(input_ids, input_pos, kv_cache=cache)[:, -1, :]  # any other model that speaks the cache hook


@functools.cache
def _takes_last_only(model_type: type) -> bool:
    return "last_only" in inspect.signature(model_type.forward).parameters


def decode_step(model, token: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step: token (B, 1) at input_pos (1,) (a tensor, so shapes stay static) -> logits (B, V)."""
    return model(token, input_pos, kv_cache=cache)[:, -1, :]


class PrefixCache:
    """Keys/values of shared prompt prefixes (a system prompt), computed once and copied into each
    request's cache, so only the new suffix is prefilled."""

    def __init__(self):
        self.entries: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # ids -> (L, 1, KV, P, D) x2
        self.hit_tokens = 0  # prompt tokens served from the cache so far (not prefilled)

    def add(self, model, prefix_ids: torch.Tensor) -> None:
        """Prefill prefix_ids (1, P) once and keep its keys/values."""
        if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] == 0:
            raise ValueError(f"prefix_ids must be (1, P) with P >= 1, got shape {tuple(prefix_ids.shape)}")
        cache = KVCache.for_model(model, prefix_ids.shape[1])
        with torch.inference_mode():
            prefill(model, prefix_ids.to(cache.k.device), cache)
        self.entries[tuple(prefix_ids[0].tolist())] = (cache.k, cache.v)

    def match(self, input_ids: torch.Tensor) -> int:
        """Length of the longest stored prefix that input_ids (1, T) starts with (0 if none)."""
        ids = tuple(input_ids[0].tolist())
        return max((len(p) for p in self.entries if ids[:len(p)] == p), default=0)

    def load(self, input_ids: torch.Tensor, cache: KVCache) -> int:
        """Copy the longest matching prefix into cache positions 0..n-1; return n. At least the
        last prompt token is left to prefill: its logits give the first new token."""
        P = self.match(input_ids)
        n = min(P, input_ids.shape[1] - 1)
        if n > 0:
            k, v = self.entries[tuple(input_ids[0, :P].tolist())]
            cache.k[:, :, :, :n].copy_(k[:, :, :, :n])  # (L, 1, KV, n, D)
            cache.v[:, :, :, :n].copy_(v[:, :, :, :n])
            self.hit_tokens += n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes held by all stored prefixes."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.entries.values())


def _check_args(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be a (1, T) tensor, got {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")


def stream_cached(model, input_ids: torch.Tensor, max_new_tokens: int,
                  sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                  generator: torch.Generator | None = None, prefix_cache: PrefixCache | None = None,
                  max_len: int | None = None, static: bool | None = None) -> Iterator[tuple[int, float]]:
    """Like generation.stream_naive, with a KV cache: yield (token_id, time.perf_counter() after
    device sync) per new token. The cache holds max_len positions (default: prompt + new tokens).
    static=None picks a static cache on GPUs and a sliced one on the CPU (see KVCache)."""
    _check_args(input_ids, max_new_tokens)
    T = input_ids.shape[1]
    needed = T + max_new_tokens - 1  # the last new token is returned, never fed back
    max_len = needed if max_len is None else max_len
    if max_len < needed:
        raise ValueError(f"KV cache too short: a {T}-token prompt plus {max_new_tokens} new tokens needs "
                         f"max_len >= {needed}, got {max_len}")
    if max_len > model.config.max_position:
        raise ValueError(f"max_len={max_len} exceeds the model's max_position={model.config.max_position}")
    return _stream_cached(model, input_ids, max_new_tokens, sampling, frozenset(stop_ids), generator,
                          prefix_cache, max_len, static)


def _stream_cached(model, input_ids, max_new_tokens, sampling, stop_ids, generator, prefix_cache, max_len, static):
    device = next(model.parameters()).device
    ids = input_ids.to(device)  # (1, T)
    if static is None:
        # On a GPU, growing shapes cost a host sync per layer (to slice) and new kernel plans for
        # every length (cuDNN attention); fixed shapes avoid both. The CPU gains from slicing.
        static = device.type != "cpu"
    # inference_mode around each step, not around the yield: a suspended generator must not leave
    # the caller's code running in inference mode.
    with torch.inference_mode():
        cache = KVCache.for_model(model, max_len, static=static)
        start = prefix_cache.load(ids, cache) if prefix_cache is not None else 0
        logits = prefill(model, ids[:, start:], cache, start)  # (1, V)
        input_pos = torch.tensor([ids.shape[1]], device=device)  # (1,): the next token's position
    for i in range(max_new_tokens):
        with torch.inference_mode():
            next_id = sample_next_token(logits, sampling, generator)  # (1,)
        synchronize(device)
        token = int(next_id.item())
        yield token, time.perf_counter()
        if token in stop_ids or i == max_new_tokens - 1:
            return
        with torch.inference_mode():
            logits = decode_step(model, next_id.view(1, 1), input_pos, cache)
            input_pos += 1  # in place: no new tensor per step


@torch.inference_mode()
def cached_logit_gap(model, input_ids: torch.Tensor, tokens: Sequence[int]) -> float:
    """Largest |logit| difference between the cached path (prefill, then one decode step per given
    token, fed in as given) and one full forward over prompt + tokens. Both compute the same
    function: in fp32 the gap is rounding error; in bf16/fp16 it shows how far rounding moves logits."""
    T, device = input_ids.shape[1], input_ids.device
    cache = KVCache.for_model(model, T + len(tokens))
    steps = [prefill(model, input_ids, cache)]  # (1, V): logits for the token after the prompt
    for i, token in enumerate(tokens[:-1]):
        steps.append(decode_step(model, torch.tensor([[token]], device=device), torch.tensor([T + i], device=device), cache))
    cached = torch.cat(steps).float()  # (N, V)
    full = model(torch.cat([input_ids, torch.tensor([list(tokens[:-1])], device=device, dtype=input_ids.dtype)], 1)
                 if len(tokens) > 1 else input_ids)[0, T - 1:].float()  # (N, V)
    return float((cached - full).abs().max())


def generate_cached(model, input_ids: torch.Tensor, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                    generator: torch.Generator | None = None, prefix_cache: PrefixCache | None = None,
                    max_len: int | None = None, static: bool | None = None) -> list[int]:
    """Generate up to max_new_tokens new token ids with a KV cache (same options as generate_naive)."""
    return [t for t, _ in stream_cached(model, input_ids, max_new_tokens, sampling, stop_ids, generator,
                                        prefix_cache, max_len, static)]
