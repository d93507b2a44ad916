"""Automatic prefix caching (course_lib.paged_kv.BlockManager with enable_caching): full blocks named by
a chain hash are shared by reference count, kept after their request ends and evicted least recently
used; the books balance after every operation of a long random walk; greedy outputs with the cache
equal those without it (and those of each request alone)."""

import random

import pytest
import torch

from course_lib.batch_engine import ContinuousBatchEngine, run_to_completion
from course_lib.kv_cache import generate_cached
from course_lib.paged_kv import BlockManager
from course_lib.scheduler import Request
from tiny import tiny_transformer


@pytest.fixture(scope="module")
def model():
    return tiny_transformer("qwen2", max_position=256, rope_theta=10_000.0)


def solo(model, prompt, new):
    return generate_cached(model, torch.tensor([prompt]), new)


# ---- the block manager, by hand ---------------------------------------------------------------

def test_shared_blocks_are_counted_kept_after_free_and_evicted_lru():
    bm = BlockManager(num_blocks=6, block_size=4, enable_caching=True)
    a = list(range(10))  # blocks [0 1 2 3] [4 5 6 7] and two tokens of a third
    assert bm.match_prefix(a) == []
    bm.allocate("a", 10, (), a)
    bm.commit("a", a, 10)  # two full blocks computed: both named
    assert len(bm.cached) == 2
    b = list(range(8)) + [50, 51, 52]
    hit = bm.match_prefix(b[:-1])
    assert hit == bm.block_tables["a"][:2]
    bm.allocate("b", 11, hit, b)
    assert [bm.ref_counts[x] for x in hit] == [2, 2] and bm.num_free == 6 - 3 - 1
    bm.check()
    bm.free("a")  # its third block goes back; the shared two stay held by b
    assert bm.num_free == 3 and all(x not in bm.free_blocks for x in hit)
    bm.check()
    bm.free("b")
    assert bm.num_free == 6 and len(bm.cached) == 2  # free, but still findable
    assert bm.match_prefix(list(range(9))) == hit
    # Hit rate: a looked up 10 tokens and found 0; b looked up 11 and found 8.
    assert bm.hit_tokens == 8 and bm.query_tokens == 21 and bm.hit_rate == pytest.approx(8 / 21)
    # Taking all six blocks for a new request evicts both cached ones.
    bm.allocate("c", 24, (), [99] * 24)
    assert bm.cached == {} and bm.evictions == 2
    bm.check()


def test_a_hit_on_a_free_cached_block_revives_it_and_counts_against_the_free_list():
    bm = BlockManager(num_blocks=3, block_size=2, enable_caching=True)
    bm.allocate("a", 4, (), [1, 2, 3, 4])
    bm.commit("a", [1, 2, 3, 4], 4)
    bm.free("a")  # 3 free, 2 of them cached
    hit = bm.match_prefix([1, 2, 3, 4])
    assert len(hit) == 2
    assert bm.can_allocate(6, hit)  # 2 revived + 1 new = 3 <= 3
    assert not bm.can_allocate(8, hit)  # 2 revived + 2 new = 4 > 3
    bm.allocate("b", 6, hit)
    assert bm.num_free == 0
    bm.check()
    with pytest.raises(ValueError, match="not a cached block"):
        BlockManager(4, 2, enable_caching=True).allocate("x", 2, [0])


def test_the_chain_hash_names_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    bm.allocate("a", 4, (), [1, 2, 3, 4])
    bm.commit("a", [1, 2, 3, 4], 4)
    # The same second block after a different first block is a different prefix: no hit past block 0.
    assert bm.match_prefix([9, 9, 3, 4]) == []
    assert len(bm.match_prefix([1, 2, 3, 4])) == 2
    assert len(bm.match_prefix([1, 2, 7, 7])) == 1


def test_check_catches_a_block_freed_while_referenced_and_a_wrong_count():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    bm.allocate("a", 2, (), [1, 2])
    bm.free_blocks[bm.block_tables["a"][0]] = None  # corrupt: held and free at once
    with pytest.raises(AssertionError, match="both held and free"):
        bm.check()
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    bm.allocate("a", 2, (), [1, 2])
    bm.ref_counts[bm.block_tables["a"][0]] = 2
    with pytest.raises(AssertionError, match="reference count"):
        bm.check()


def test_random_operations_keep_the_books_and_every_shared_block_holds_its_prefix():
    """Thousands of random allocate (sharing what the cache has) / compute / append / free / evict
    operations, check() after each. A shadow pool records which token each slot was written with:
    every request's computed positions must always read back its own tokens, so a shared or revived
    block always holds the prefix it is named for and no held block is ever overwritten by another."""
    rng = random.Random(0)
    P, N = 4, 24
    bm = BlockManager(num_blocks=N, block_size=P, enable_caching=True)
    shadow: dict[int, int] = {}  # pool slot (block * P + offset) -> token written there
    stems = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]  # shared system prompts
    live: dict[int, list] = {}  # id -> [tokens, num_computed]
    next_id = shares = 0

    def write(seq, start, stop):
        tokens, table = live[seq][0], bm.block_tables[seq]
        for p in range(start, stop):
            slot = table[p // P] * P + p % P
            assert table[p // P] not in bm.block_hash, "a write into a named block, which others may read"
            shadow[slot] = tokens[p]

    for _ in range(3000):
        op = rng.random()
        if op < 0.25:
            tokens = rng.choice(stems)[:rng.randint(0, 12)] + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
            prefix = bm.match_prefix(tokens[:-1])
            if bm.can_allocate(len(tokens), prefix):
                bm.allocate(next_id, len(tokens), prefix, tokens)
                live[next_id] = [tokens, len(prefix) * P]
                shares += bool(prefix)
                next_id += 1
        elif op < 0.6 and live:  # compute some of a request's positions and name its full blocks
            seq = rng.choice(list(live))
            tokens, done = live[seq]
            upto = min(len(tokens), done + rng.randint(1, 6))
            write(seq, done, upto)
            live[seq][1] = upto
            bm.commit(seq, tokens, upto)
        elif op < 0.8 and live:  # decode: one more token and its position
            seq = rng.choice(list(live))
            tokens, done = live[seq]
            if done == len(tokens) and bm.can_append(seq):
                bm.append_slot(seq)
                tokens.append(rng.randrange(50))
        elif live:
            seq = rng.choice(list(live))
            del live[seq]
            bm.free(seq)
        bm.check()
        for seq, (tokens, done) in live.items():
            table = bm.block_tables[seq]
            assert [shadow.get(table[p // P] * P + p % P) for p in range(done)] == tokens[:done]
        assert bm.num_free + len({b for t in bm.block_tables.values() for b in t}) == N
    assert next_id > 200 and shares > 50 and bm.evictions > 20  # the walk did share and evict a lot


# ---- the engine ---------------------------------------------------------------------------------

def shared_prefix_requests(n=8, system=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    stem = torch.randint(0, 300, (system,), generator=gen).tolist()
    out = []
    for _ in range(n):
        tail = torch.randint(0, 300, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        out.append((stem + tail, int(torch.randint(2, 12, (1,), generator=gen))))
    return out


@pytest.mark.parametrize("num_blocks,budget", [(200, None), (200, 16), (14, None)])
def test_cached_outputs_equal_uncached_and_solo(model, num_blocks, budget):
    """Requests sharing a 20-token system prompt, in two waves (the second finds the first's blocks);
    14 blocks of 4 also force preemption and eviction."""
    work = shared_prefix_requests()
    refs = [solo(model, p, n) for p, n in work]
    outs = {}
    for caching in (False, True):
        engine = ContinuousBatchEngine(model, num_blocks=num_blocks, block_size=4, max_batch=4,
                                       token_budget=budget, prefix_caching=caching)
        first = run_to_completion(engine, [Request(p, n) for p, n in work[:3]])
        second = run_to_completion(engine, [Request(p, n) for p, n in work[3:]])
        outs[caching] = [r.output_ids for r in first + second]
        engine.blocks.check()
        assert engine.blocks.num_free == num_blocks and not engine.blocks.block_tables
        if caching:
            assert engine.blocks.hit_tokens >= 16 * 5  # every second-wave request found the 4 full system blocks
            assert sum(h.cached_tokens for h in engine.history) == engine.blocks.hit_tokens
    assert outs[True] == outs[False] == refs


def test_hit_rate_of_two_requests_by_hand(model):
    """A = S(12) + 3 tokens, then B = S(12) + 5 tokens, blocks of 4: B finds S's 3 blocks; the engine
    looked up 15 + 17 = 32 prompt tokens and found 12."""
    stem = list(range(100, 112))
    engine = ContinuousBatchEngine(model, num_blocks=40, block_size=4, max_batch=2, prefix_caching=True)
    a = run_to_completion(engine, [Request(stem + [1, 2, 3], 4)])[0]
    b = run_to_completion(engine, [Request(stem + [4, 5, 6, 7, 8], 4)])[0]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 12)
    assert engine.blocks.hit_rate == pytest.approx(12 / 32)
    assert b.output_ids == solo(model, stem + [4, 5, 6, 7, 8], 4)


def test_multi_turn_reuses_the_answer_too(model):
    """Turn 2's prompt is turn 1's prompt + its answer + a new message: its full blocks, answer
    included, come from the cache (only blocks whose every position was computed are named: the
    answer's last token was never fed)."""
    engine = ContinuousBatchEngine(model, num_blocks=60, block_size=4, max_batch=2, prefix_caching=True)
    first = run_to_completion(engine, [Request(list(range(1, 11)), 9)])[0]
    context = first.prompt_ids + first.output_ids  # 19 tokens; positions 0..17 were computed
    second = run_to_completion(engine, [Request(context + [7, 8, 9], 5)])[0]
    assert second.num_cached_tokens == 16  # 4 full blocks of the 18 computed positions
    assert second.output_ids == solo(model, context + [7, 8, 9], 5)
