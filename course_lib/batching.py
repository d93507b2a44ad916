"""Static batching: left padding, per-sequence positions, one batch run to completion. Built in notebooks/06_batching.ipynb.

At batch 1 a decode step reads every weight to produce one token; with B sequences the same read
produces B tokens. Static batching runs B prompts together: prompts of different lengths are
left-padded to one length T, so the last column holds every sequence's newest token and all rows
decode in step. Each row keeps its own positions (0.. from its first real token); padding gets
position PAD_POS = -1, which the cache below never stores, so no real token ever attends to it.
Without a cache, keys are the tokens themselves and the padding must be hidden by an attention
mask instead (padding_mask). The batch ends when its longest request ends: rows that finished
early keep their slot and burn compute until then.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from course_lib.env import synchronize
from course_lib.generation import SamplingConfig, sample_next_token

# Shape letters: L layers, B batch, KV key/value heads, S cache positions, T tokens, D head dim, V vocabulary.
PAD_POS = -1  # the position given to padding (and to finished rows): never written to the cache


def pad_batch(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to (B, T): returns tokens, attention_mask (True = real token) and
    input_pos (each row's own positions 0..n-1, PAD_POS at padding)."""
    rows = [p.view(-1).tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if not rows:
        raise ValueError("pad_batch needs at least one prompt")
    if any(len(r) == 0 for r in rows):
        raise ValueError(f"prompt {next(i for i, r in enumerate(rows) if not r)} is empty: every prompt needs a token")
    B, T = len(rows), max(len(r) for r in rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):] = torch.tensor(r, dtype=torch.long)  # right-aligned: padding on the left
        mask[i, T - len(r):] = True
    input_pos = mask.long().cumsum(-1) - 1  # (B, T): 0 at each row's first real token
    input_pos = input_pos.masked_fill(~mask, PAD_POS)
    return tokens.to(device), mask.to(device), input_pos.to(device)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token mask -> (B, 1, T, T) attention mask for a cacheless forward: key j is
    visible iff it is a real token (the causal rule by positions is applied on top)."""
    B, T = attention_mask.shape
    return attention_mask[:, None, None, :].expand(B, 1, T, T)


class BatchKVCache:
    """Keys/values (L, B, KV, S + 1, D), each row written at its own positions (B, T). Slot S is a
    scratch slot that takes the writes of PAD_POS tokens, so they never land at a real position.
    Reads return all S positions (a fixed shape, no host sync): slots a row has not reached yet
    hold zeros or its own older keys, and the causal rule hides every position past the query."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(num_layers, batch_size, num_kv_heads, max_len, head_dim) < 1:
            raise ValueError("every BatchKVCache dimension must be >= 1, got "
                             f"{(num_layers, batch_size, num_kv_heads, max_len, head_dim)}")
        shape = (num_layers, batch_size, num_kv_heads, max_len + 1, head_dim)  # (L, B, KV, S + 1, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, max_len: int, batch_size: int) -> BatchKVCache:
        """A cache shaped for a course Transformer, on its device and in its dtype."""
        cfg, ref = model.config, next(model.parameters())
        return cls(cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, ref.dtype, ref.device)

    @property
    def max_len(self) -> int:
        """Real positions the cache holds (0..max_len-1)."""
        return self.k.shape[3] - 1

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at positions input_pos (B, T) or (T,); return keys/values (B, KV, S, D)."""
        B, KV, T, D = k.shape
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos  # (B, T)
        if pos.device.type == "cpu" and int(pos.max()) >= self.max_len:  # free on a CPU; a GPU would stall
            raise ValueError(f"BatchKVCache overflow: position {int(pos.max())} does not fit max_len={self.max_len}")
        slots = torch.where(pos >= 0, pos, self.max_len)  # padding -> the scratch slot
        index = slots[:, None, :, None].expand(B, KV, T, D)  # (B, KV, T, D)
        self.k[layer_idx].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer_idx].scatter_(2, index, v.to(self.v.dtype))
        return self.k[layer_idx, :, :, :-1], self.v[layer_idx, :, :, :-1]  # (B, KV, S, D): all but scratch


def sample_rows(logits: torch.Tensor, samplings: Sequence[SamplingConfig],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of (B, V) logits, each row with its own sampling settings and generator."""
    if all(s.greedy for s in samplings):
        return logits.argmax(dim=-1)  # one call for the whole batch
    return torch.cat([sample_next_token(logits[i:i + 1], s, g)
                      for i, (s, g) in enumerate(zip(samplings, generators))])


def sample_each_row(logits: torch.Tensor, samplings: Sequence[SamplingConfig],
                    generators: Sequence[torch.Generator | None]) -> list[int | Exception]:
    """sample_rows with each row's failure kept to itself: a row whose logits are not finite (a
    numerical fault in its forward) or whose draw raises gets an Exception in its place; the others
    get their tokens exactly as sample_rows would draw them (each generator is used once, in order)."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # (B,): one reduction, no per-row sync
    if all(finite) and all(s.greedy for s in samplings):
        return logits.argmax(dim=-1).tolist()
    out: list[int | Exception] = []
    for i, (s, g) in enumerate(zip(samplings, generators)):
        if not finite[i]:
            out.append(FloatingPointError("the model's logits for this request are not finite (inf or NaN)"))
            continue
        try:
            out.append(int(sample_next_token(logits[i:i + 1], s, g)))
        except Exception as exc:  # noqa: BLE001 - whatever one row raises is that row's error
            out.append(exc)
    return out


class StaticBatch:
    """B requests run together to the end of the longest: step() prefills all prompts at once,
    then each later step() decodes one token for every row (finished rows ride along, idle)."""

    def __init__(self, model, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: Sequence[int],
                 samplings: Sequence[SamplingConfig], stop_ids: Sequence[Iterable[int]],
                 generators: Sequence[torch.Generator | None], pad_id: int = 0):
        if not len(prompts) == len(max_new_tokens) == len(samplings) == len(stop_ids) == len(generators):
            raise ValueError("prompts, max_new_tokens, samplings, stop_ids and generators must have one entry per row")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in max_new_tokens):
            raise ValueError(f"every max_new_tokens must be an integer >= 1, got {list(max_new_tokens)}")
        self.model, self.device = model, next(model.parameters()).device
        self.tokens, self.attention_mask, self.input_pos = pad_batch(prompts, pad_id, self.device)
        self.lengths = self.attention_mask.sum(-1).tolist()
        self.max_new, self.samplings, self.generators = list(max_new_tokens), list(samplings), list(generators)
        self.stop_ids = [frozenset(s) for s in stop_ids]
        B = len(self.lengths)
        max_len = max(n + m - 1 for n, m in zip(self.lengths, self.max_new))  # the last token is never fed
        if max_len > model.config.max_position:
            raise ValueError(f"a row needs {max_len} positions, the model has max_position={model.config.max_position}")
        self.cache = BatchKVCache.for_model(model, max(max_len, 1), B)
        self.outputs: list[list[int]] = [[] for _ in range(B)]
        self.token_times: list[list[float]] = [[] for _ in range(B)]
        self.finished = [False] * B
        self.steps = 0  # forwards run (the prefill included)
        self.idle_row_steps = 0  # decode rows spent on requests that had already finished

    @property
    def done(self) -> bool:
        """True once every row has finished."""
        return all(self.finished)

    @property
    def padding_tokens(self) -> int:
        """Padding positions the prefill computed for nothing."""
        return self.tokens.numel() - sum(self.lengths)

    def step(self) -> list[int]:
        """Run one forward (the prefill first, then decodes); return the rows that finished in it."""
        if self.done:
            raise RuntimeError("this batch is done: every row has finished")
        with torch.inference_mode():
            if self.steps == 0:
                logits = self.model(self.tokens, self.input_pos, kv_cache=self.cache)[:, -1, :]  # (B, V)
            else:
                last = torch.tensor([o[-1] for o in self.outputs], device=self.device).view(-1, 1)  # (B, 1)
                pos = torch.tensor([PAD_POS if f else n + len(o) - 1 for f, n, o in
                                    zip(self.finished, self.lengths, self.outputs)], device=self.device)
                self.idle_row_steps += sum(self.finished)
                logits = self.model(last, pos.view(-1, 1), kv_cache=self.cache)[:, -1, :]  # (B, V)
            next_ids = sample_rows(logits, self.samplings, self.generators).tolist()
        synchronize(self.device)
        now = time.perf_counter()
        self.steps += 1
        newly = []
        for i, token in enumerate(next_ids):
            if self.finished[i]:
                continue
            self.outputs[i].append(token)
            self.token_times[i].append(now)
            if token in self.stop_ids[i] or len(self.outputs[i]) == self.max_new[i]:
                self.finished[i] = True
                newly.append(i)
        return newly


@dataclass
class StaticBatchResult:
    """What one static batch produced, and what it wasted."""

    outputs: list[list[int]]  # new token ids per request
    token_times: list[list[float]] = field(repr=False)  # time.perf_counter() of each token
    start: float  # time.perf_counter() before the prefill
    steps: int  # forwards run (1 prefill + decodes)
    padding_tokens: int  # prefill positions that were padding
    idle_row_steps: int  # decode rows computed for already-finished requests


def generate_static(model, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int | Sequence[int],
                    sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                    generator: torch.Generator | None = None, pad_id: int = 0) -> StaticBatchResult:
    """Generate for all prompts as one static batch (same sampling and stop ids for every row)."""
    B = len(prompts)
    max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    stops = frozenset(stop_ids)
    batch = StaticBatch(model, prompts, max_new, [sampling] * B, [stops] * B, [generator] * B, pad_id)
    synchronize(batch.device)
    start = time.perf_counter()
    while not batch.done:
        batch.step()
    return StaticBatchResult(batch.outputs, batch.token_times, start, batch.steps, batch.padding_tokens,
                             batch.idle_row_steps)
