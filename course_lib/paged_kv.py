"""Paged KV cache: fixed-size blocks, block tables and a free list. Built in notebooks/06_batching.ipynb.

A contiguous cache reserves, for each request, room for the longest sequence it might reach, and
most of that room sits empty while the request is short. Paging (vLLM's PagedAttention) cuts the
cache into blocks of block_size positions. A request owns a *block table*: the list of blocks
holding its positions 0..n-1, in order, so position p lives in block table[p // block_size] at
offset p % block_size. Blocks are taken from a free list only when a request's length crosses a
block boundary and go back when it finishes, so memory follows actual lengths and at most
block_size - 1 slots per request are unused.

BlockManager does the accounting (no tensors); PagedKVCache holds the pools, one per layer, and
implements the transformer's kv_cache.update hook: it writes the new keys/values through the
block tables and gathers each request's blocks back into (B, KV, S, D) for attention.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

# Shape letters: L layers, N blocks, P block size, B batch, KV key/value heads, S positions, T tokens, D head dim.


class BlockManager:
    """Which blocks are free and which request holds which blocks, in order."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[Hashable, list[int]] = {}  # request id -> its blocks, position order
        self.num_tokens: dict[Hashable, int] = {}  # request id -> positions it has reserved

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens positions: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return len(self.free_blocks)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether num_tokens positions for a new request fit in the free blocks now."""
        return self.blocks_needed(num_tokens) <= self.num_free

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Give a new request blocks for its first num_tokens positions; return its block table."""
        if seq_id in self.block_tables:
            raise ValueError(f"request {seq_id!r} already holds blocks")
        if not self.can_allocate(num_tokens):
            raise ValueError(f"request {seq_id!r} needs {self.blocks_needed(num_tokens)} blocks, "
                             f"only {self.num_free} are free")
        self.block_tables[seq_id] = [self.free_blocks.popleft() for _ in range(self.blocks_needed(num_tokens))]
        self.num_tokens[seq_id] = num_tokens
        return self.block_tables[seq_id]

    def can_append(self, seq_id: Hashable) -> bool:
        """Whether one more position fits: room in the last block, or a free block."""
        return self.num_tokens[seq_id] % self.block_size != 0 or self.num_free > 0

    def append_slot(self, seq_id: Hashable) -> None:
        """Reserve the next position; take a new block when the last one is full."""
        if not self.can_append(seq_id):
            raise ValueError(f"no free block for request {seq_id!r}: preempt a request first")
        if self.num_tokens[seq_id] % self.block_size == 0:  # the last block is full (or there is none)
            self.block_tables[seq_id].append(self.free_blocks.popleft())
        self.num_tokens[seq_id] += 1

    def free(self, seq_id: Hashable) -> None:
        """Return every block of a request to the free list."""
        self.free_blocks.extend(self.block_tables.pop(seq_id))
        del self.num_tokens[seq_id]

    def check(self) -> None:
        """Raise AssertionError unless every block is either free or held by exactly one request."""
        every = [b for table in self.block_tables.values() for b in table] + list(self.free_blocks)
        if len(every) != len(set(every)):
            raise AssertionError("a block is assigned twice (or is both held and free)")
        if sorted(every) != list(range(self.num_blocks)):
            raise AssertionError("a block was leaked (neither held nor free)")
        for seq_id, table in self.block_tables.items():
            if len(table) != self.blocks_needed(self.num_tokens[seq_id]):
                raise AssertionError(f"request {seq_id!r} holds {len(table)} blocks for {self.num_tokens[seq_id]} positions")


class PagedKVCache:
    """Pools of keys and values, (L, (N + 1) * P, KV, D), read and written through block tables.
    Block N is a scratch block: padding tokens (negative positions) are written there, never read."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)  # (L, (N+1)*P, KV, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.block_tables: torch.Tensor | None = None  # (B, max blocks) for the batch being run

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> PagedKVCache:
        """Pools shaped for a course Transformer, on its device and in its dtype."""
        cfg, ref = model.config, next(model.parameters())
        return cls(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, ref.dtype, ref.device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the two pools."""
        return 2 * self.k.numel() * self.k.element_size()

    def bind(self, block_tables: Sequence[Sequence[int]]) -> None:
        """Set the block tables of the batch the next forward runs (row b of the batch = table b)."""
        width = max(len(t) for t in block_tables)
        # Short tables are padded with block 0: positions past a row's length are never visible to
        # its queries (causal rule), so whatever block 0 holds there is never attended to.
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        self.block_tables = torch.tensor(padded, dtype=torch.long, device=self.k.device)  # (B, max blocks)
        S = width * self.block_size  # every position the tables cover: fixed per forward, no host sync
        self._every = self._slots(torch.arange(S, device=self.k.device).expand(len(padded), S))  # (B, S)

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Pool rows of positions pos (B, T): table[b, p // P] * P + p % P; negative -> the scratch block."""
        block = self.block_tables.gather(1, pos.clamp(min=0) // self.block_size)  # (B, T)
        rows = block * self.block_size + pos % self.block_size
        return torch.where(pos >= 0, rows, self.num_blocks * self.block_size)

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at input_pos (B, T) (negative = padding, not kept); return each
        row's keys/values at positions 0..S-1 (B, KV, S, D), S = the blocks its table width covers."""
        B, KV, T, D = k.shape
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos  # (B, T)
        slots = self._slots(pos).reshape(-1)  # (B*T,) pool rows
        self.k[layer_idx].index_copy_(0, slots, k.transpose(1, 2).reshape(B * T, KV, D).to(self.k.dtype))
        self.v[layer_idx].index_copy_(0, slots, v.transpose(1, 2).reshape(B * T, KV, D).to(self.v.dtype))
        keys = self.k[layer_idx, self._every].transpose(1, 2)  # (B, S, KV, D) -> (B, KV, S, D)
        values = self.v[layer_idx, self._every].transpose(1, 2)
        return keys, values


@dataclass(frozen=True)
class KVSample:
    """KV-cache occupancy at one engine step, in token slots."""

    tokens: int  # positions actually holding keys/values
    paged_slots: int  # slots in the blocks held (blocks x block_size)
    reserved_slots: int  # contiguous: each request reserves prompt + max_new_tokens up front
    max_len_slots: int  # contiguous: each request reserves max_model_len (a fixed slot per sequence)


def kv_waste(samples: Sequence[KVSample]) -> dict[str, float]:
    """Fraction of allocated KV slots that hold nothing, summed over steps, for paged blocks and
    for the two contiguous reservations."""
    used = sum(s.tokens for s in samples)
    out = {}
    for name in ("paged_slots", "reserved_slots", "max_len_slots"):
        total = sum(getattr(s, name) for s in samples)
        out[name.removesuffix("_slots")] = 1 - used / total if total else 0.0
    return out
