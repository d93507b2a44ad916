"""Paged KV cache: fixed-size blocks, block tables, a free list and automatic prefix caching.
Built in notebooks/06_batching.ipynb (paging) and notebooks/09_serving_real_traffic.ipynb (prefix caching).

A contiguous cache reserves, for each request, room for the longest sequence it might reach, and
most of that room sits empty while the request is short. Paging (vLLM's PagedAttention) cuts the
cache into blocks of block_size positions. A request owns a *block table*: the list of blocks
holding its positions 0..n-1, in order, so position p lives in block table[p // block_size] at
offset p % block_size. Blocks are taken from a free list only when a request's length crosses a
block boundary and go back when it finishes, so memory follows actual lengths and at most
block_size - 1 slots per request are unused.

Automatic prefix caching (vLLM's --enable-prefix-caching; SGLang's RadixAttention does the same
with a tree): the keys/values at position p depend only on tokens 0..p, so a *full* block is named
by a chain hash, hash(the previous block's hash, this block's tokens), which names its whole
prefix. A request whose prompt starts with blocks already named in the cache shares them (a
reference count per block) and prefills only the rest. A finished request's named blocks go back
to the free list *with their contents*: they stay findable until a new block is needed and the
least recently used one is evicted (its name forgotten). Shared blocks are full, and a request
only ever writes positions past its cached prefix, so a shared block is never written again.

BlockManager does the accounting (no tensors); PagedKVCache holds the pools, one per layer, and
implements the transformer's kv_cache.update hook: it writes the new keys/values through the
block tables and gathers each request's blocks back into (B, KV, S, D) for attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

# Shape letters: L layers, N blocks, P block size, B batch, KV key/value heads, S positions, T tokens, D head dim.


class BlockManager:
    """Which blocks are free, which request holds which blocks (in order), and, with
    enable_caching, which full blocks are named by a hash of their prefix and shared."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        # Blocks no request holds, oldest first: new blocks are taken from the front (evicting what a
        # cached one held); a freed block joins the back, so the front is the least recently used.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_tables: dict[Hashable, list[int]] = {}  # request id -> its blocks, position order
        self.num_tokens: dict[Hashable, int] = {}  # request id -> positions it has reserved
        self.ref_counts = [0] * num_blocks  # requests holding each block
        self.cached: dict[int, int] = {}  # chain hash -> the block holding that prefix's last block
        self.block_hash: dict[int, int] = {}  # block -> its chain hash (inverse of cached)
        self.seq_hashes: dict[Hashable, list[int]] = {}  # request id -> chain hashes of its first full blocks
        self.hit_tokens = self.query_tokens = self.evictions = 0  # prefix-cache counters

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens positions: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they can be evicted)."""
        return len(self.free_blocks)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found in the cache / prompt tokens looked up (0 before any lookup)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    # ---- prefix caching -------------------------------------------------------------------------

    @staticmethod
    def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
        """The name of a full block: its tokens and (through the parent's name) every token before it."""
        return hash((parent, tuple(tokens)))

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chain hashes of the full blocks of token_ids, in order."""
        hashes, parent, P = [], None, self.block_size
        for start in range(0, len(token_ids) - P + 1, P):
            parent = self.chain_hash(parent, token_ids[start:start + P])
            hashes.append(parent)
        return hashes

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest run of token_ids' full blocks from the start
        (empty without caching). Takes nothing: allocate(..., prefix=) does."""
        if not self.enable_caching:
            return []
        blocks = []
        for h in self.block_hashes(token_ids):
            if h not in self.cached:
                break
            blocks.append(self.cached[h])
        return blocks

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """Whether num_tokens positions for a new request fit now, sharing the cached blocks `prefix`
        (a free cached block it revives leaves the free list too)."""
        revived = sum(self.ref_counts[b] == 0 for b in prefix)
        return self.blocks_needed(num_tokens) - len(prefix) + revived <= self.num_free

    def _take_free(self) -> int:
        """The least recently freed block; if it held a cached prefix, that prefix is evicted."""
        block, _ = self.free_blocks.popitem(last=False)
        if block in self.block_hash:
            del self.cached[self.block_hash.pop(block)]
            self.evictions += 1
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq_id: Hashable, num_tokens: int, prefix: Sequence[int] = (),
                 token_ids: Sequence[int] = ()) -> list[int]:
        """Give a new request blocks for its first num_tokens positions, the first of them the shared
        cached blocks `prefix` (from match_prefix); return its block table. token_ids (its tokens,
        for the hit-rate counters) are optional."""
        if seq_id in self.block_tables:
            raise ValueError(f"request {seq_id!r} already holds blocks")
        if len(prefix) > self.blocks_needed(num_tokens) or not self.can_allocate(num_tokens, prefix):
            raise ValueError(f"request {seq_id!r} needs {self.blocks_needed(num_tokens) - len(prefix)} blocks, "
                             f"only {self.num_free} are free")
        for b in prefix:
            if b not in self.block_hash:
                raise ValueError(f"block {b} is not a cached block: only cached blocks can be shared")
            if self.ref_counts[b] == 0:
                del self.free_blocks[b]  # revived: a hit on a block no one held
            self.ref_counts[b] += 1
        table = list(prefix) + [self._take_free() for _ in range(self.blocks_needed(num_tokens) - len(prefix))]
        self.block_tables[seq_id], self.num_tokens[seq_id] = table, num_tokens
        self.seq_hashes[seq_id] = [self.block_hash[b] for b in prefix]
        if token_ids:
            self.query_tokens += len(token_ids)
            self.hit_tokens += len(prefix) * self.block_size
        return table

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Name the request's blocks that are now full and computed (positions < num_computed hold
        keys/values of token_ids): later requests with the same prefix can share them."""
        if not self.enable_caching:
            return
        hashes, table, P = self.seq_hashes[seq_id], self.block_tables[seq_id], self.block_size
        while (len(hashes) + 1) * P <= num_computed:
            i = len(hashes)
            h = self.chain_hash(hashes[-1] if hashes else None, token_ids[i * P:(i + 1) * P])
            hashes.append(h)
            if h not in self.cached and table[i] not in self.block_hash:  # a twin computed at the same
                self.cached[h], self.block_hash[table[i]] = table[i], h  # time stays unnamed

    def can_append(self, seq_id: Hashable) -> bool:
        """Whether one more position fits: room in the last block, or a free block."""
        return self.num_tokens[seq_id] % self.block_size != 0 or self.num_free > 0

    def append_slot(self, seq_id: Hashable) -> None:
        """Reserve the next position; take a new block when the last one is full."""
        if not self.can_append(seq_id):
            raise ValueError(f"no free block for request {seq_id!r}: preempt a request first")
        if self.num_tokens[seq_id] % self.block_size == 0:  # the last block is full (or there is none)
            self.block_tables[seq_id].append(self._take_free())
        self.num_tokens[seq_id] += 1

    def free(self, seq_id: Hashable) -> None:
        """Let go of every block of a request; a block no one else holds goes back to the free list
        (its tail first, so a prefix outlives its continuations in the cache)."""
        table = self.block_tables.pop(seq_id)
        del self.num_tokens[seq_id], self.seq_hashes[seq_id]
        for b in (reversed(table) if self.enable_caching else table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks[b] = None

    def check(self) -> None:
        """Raise AssertionError unless the books balance: every block is free or held; a held block's
        reference count is the number of tables holding it and it is not on the free list; a shared
        block is a named (full, cached) one; the cache's names and blocks match both ways."""
        counts = [0] * self.num_blocks
        for seq_id, table in self.block_tables.items():
            if len(table) != len(set(table)):
                raise AssertionError(f"request {seq_id!r} holds a block twice")
            if len(table) != self.blocks_needed(self.num_tokens[seq_id]):
                raise AssertionError(f"request {seq_id!r} holds {len(table)} blocks for {self.num_tokens[seq_id]} positions")
            for b in table:
                counts[b] += 1
        free = list(self.free_blocks)
        if any(not 0 <= b < self.num_blocks for b in free) or len(free) != len(set(free)):
            raise AssertionError("the free list holds a block twice or a block that does not exist")
        for b in range(self.num_blocks):
            if counts[b] > 1 and not self.enable_caching:
                raise AssertionError(f"block {b} is assigned twice (held by {counts[b]} requests)")
            if not counts[b] and b not in self.free_blocks:
                raise AssertionError(f"block {b} was leaked (neither held nor free)")
            if counts[b] and b in self.free_blocks:
                raise AssertionError(f"block {b} is both held and free (a block freed while referenced)")
            if counts[b] != self.ref_counts[b]:
                raise AssertionError(f"block {b} is held by {counts[b]} requests, its reference count says {self.ref_counts[b]}")
            if counts[b] > 1 and b not in self.block_hash:
                raise AssertionError(f"block {b} is shared but not a named cached block")
        if {b: h for h, b in self.cached.items()} != self.block_hash:
            raise AssertionError("the cache's hash -> block and block -> hash maps disagree")
        for seq_id, hashes in self.seq_hashes.items():
            table = self.block_tables[seq_id]
            if len(hashes) > len(table) or any(self.block_hash.get(b, h) != h for b, h in zip(table, hashes)):
                raise AssertionError(f"request {seq_id!r}'s named blocks disagree with the cache")


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

    @property
    def scratch_block(self) -> int:
        """The block that padding writes to and padded rows read (index N, past the real blocks)."""
        return self.num_blocks

    def table_tensor(self, block_tables: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
        """Block tables as one (B, width) tensor (width: the longest table, if not given)."""
        width = width or max(len(t) for t in block_tables)
        # Short tables are padded with the scratch block: positions past a row's length are never
        # visible to its queries (causal rule), so whatever it holds there is never attended to.
        padded = [list(t) + [self.scratch_block] * (width - len(t)) for t in block_tables]
        return torch.tensor(padded, dtype=torch.long, device=self.k.device)  # (B, width)

    def bind(self, block_tables: Sequence[Sequence[int]]) -> None:
        """Set the block tables of the batch the next forward runs (row b of the batch = table b)."""
        self.bind_tensor(self.table_tensor(block_tables))

    def bind_tensor(self, block_tables: torch.Tensor) -> None:
        """bind() for tables already on the device (B, W): tensor ops only, so a compiled or
        captured forward can include it (the shapes follow B and W, never the values)."""
        self.block_tables = block_tables  # (B, W)
        B, W = block_tables.shape
        S = W * self.block_size  # every position the tables cover: fixed per forward, no host sync
        self._every = self._slots(torch.arange(S, device=self.k.device).expand(B, S))  # (B, S)

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
