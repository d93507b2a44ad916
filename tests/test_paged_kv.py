"""course_lib.paged_kv: the block manager's accounting (no block leaked or held twice), attention
through scattered blocks equal to a contiguous cache, and the waste measure."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from course_lib.batching import pad_batch
from course_lib.kv_cache import KVCache
from course_lib.paged_kv import BlockManager, KVSample, PagedKVCache, kv_waste
from course_lib.transformer import Transformer


def tiny() -> Transformer:
    """A tiny random grouped-query course Transformer (no download)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Transformer.from_hf(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())


# ---- BlockManager ---------------------------------------------------------------------------

def test_blocks_follow_the_length():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]  # ceil(5 / 4) = 2 blocks
    for _ in range(3):  # positions 5, 6, 7 fill block 1
        bm.append_slot("a")
    assert len(bm.block_tables["a"]) == 2 and bm.num_free == 4
    bm.append_slot("a")  # position 8 starts a third block
    assert len(bm.block_tables["a"]) == 3 and bm.num_tokens["a"] == 9
    bm.check()
    bm.free("a")
    assert bm.num_free == 6 and not bm.block_tables
    bm.check()


def test_block_manager_refuses_what_it_cannot_do():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 4)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.allocate("a", 1)
    with pytest.raises(ValueError, match="needs 2 blocks, only 1 are free"):
        bm.allocate("b", 5)
    bm.allocate("b", 4)
    assert not bm.can_append("a")
    with pytest.raises(ValueError, match="no free block for request 'a'"):
        bm.append_slot("a")
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(0, 16)


def test_check_catches_a_block_held_twice_and_a_leak():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm.allocate("b", 2)
    bm.block_tables["b"][0] = bm.block_tables["a"][0]  # corrupt: one block in two tables
    with pytest.raises(AssertionError, match="assigned twice"):
        bm.check()
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm.block_tables["a"].clear()  # corrupt: a block vanished
    bm.num_tokens["a"] = 0
    with pytest.raises(AssertionError, match="leaked"):
        bm.check()


def test_random_operations_keep_every_block_accounted_for():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    live, next_id = [], 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.3 and bm.can_allocate(n := rng.randint(1, 12)):
            bm.allocate(next_id, n)
            live.append(next_id)
            next_id += 1
        elif op < 0.8 and live:
            seq = rng.choice(live)
            if bm.can_append(seq):
                bm.append_slot(seq)
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        bm.check()
        assert bm.num_free + sum(len(t) for t in bm.block_tables.values()) == 32
    assert next_id > 50  # the walk did allocate a lot


# ---- PagedKVCache ---------------------------------------------------------------------------

def test_paged_attention_through_scattered_blocks_equals_contiguous():
    """Two sequences of different lengths, their blocks deliberately out of order and interleaved in the
    pool: prefill + 10 decode steps give the same logits as one contiguous cache per sequence."""
    model = tiny()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (11, 4)]
    paged = PagedKVCache.for_model(model, num_blocks=16, block_size=4)
    tables = [[9, 2, 14, 5, 0, 7], [3, 12, 1, 8, 11]]  # enough blocks for 11 + 10 and 4 + 10 positions
    refs = [KVCache.for_model(model, 32) for _ in seqs]
    tokens, _, pos = pad_batch(seqs)
    with torch.inference_mode():
        paged.bind(tables)
        got = model(tokens, pos, kv_cache=paged)[:, -1]
        want = torch.cat([model(torch.tensor([s]), kv_cache=c)[:, -1] for s, c in zip(seqs, refs)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        lengths = [len(s) for s in seqs]
        for _ in range(10):
            nxt = want.argmax(-1)  # (B,)
            got = model(nxt.view(2, 1), torch.tensor(lengths).view(2, 1), kv_cache=paged)[:, -1]
            want = torch.cat([model(nxt[i].view(1, 1), torch.tensor([lengths[i]]), kv_cache=refs[i])[:, -1]
                              for i in range(2)])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            lengths = [n + 1 for n in lengths]
    # the keys really live where the tables say: sequence 1, position 5 -> block 12, offset 1
    torch.testing.assert_close(paged.k[0, 12 * 4 + 1], refs[1].k[0, 0, :, 5])


def test_paged_cache_does_not_store_padding():
    model = tiny()
    paged = PagedKVCache.for_model(model, num_blocks=4, block_size=4)
    tokens, _, pos = pad_batch([[1, 2, 3, 4, 5, 6], [7]])
    paged.bind([[0, 1], [2]])
    with torch.inference_mode():
        model(tokens, pos, kv_cache=paged)
    assert paged.k[:, 2 * 4 + 1:4 * 4].abs().sum() == 0  # sequence 1 wrote only position 0 of block 2
    assert paged.k[:, 2 * 4].abs().sum() > 0
    assert paged.k[:, 4 * 4:].abs().sum() > 0  # its 5 padding tokens went to the scratch block


# ---- waste -----------------------------------------------------------------------------------

def test_kv_waste_fractions():
    samples = [KVSample(tokens=10, paged_slots=16, reserved_slots=40, max_len_slots=200),
               KVSample(tokens=30, paged_slots=32, reserved_slots=40, max_len_slots=200)]
    w = kv_waste(samples)
    assert w["paged"] == pytest.approx(1 - 40 / 48)
    assert w["reserved"] == pytest.approx(0.5)
    assert w["max_len"] == pytest.approx(0.9)
    assert kv_waste([]) == {"paged": 0.0, "reserved": 0.0, "max_len": 0.0}
