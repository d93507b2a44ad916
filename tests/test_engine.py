"""course_lib.engine: every switch combination gives plain cached decoding's greedy tokens (a quantized
engine gives its own unbatched quantized tokens), speculation hands over to the batch without changing
them, aborts free slots and KV blocks, bad configurations and impossible requests are refused; an
injected fault fails only its own request, and a step that raises leaves no request behind."""

import copy

import pytest
import torch

from course_lib.engine import Engine, EngineConfig
from course_lib.generation import SamplingConfig, chat_input_ids, stop_token_ids
from course_lib.kv_cache import generate_cached
from course_lib.quant import INT8, QuantLinear, quantize_model
from course_lib.scheduler import Request, RequestStatus
from course_lib.transformer import Transformer
from course_lib.workload import WorkloadConfig, make_workload, replay
from tiny import VOCAB, tiny_transformer
from tiny_server import Faulty



def tiny(seed: int, layers: int = 2) -> Transformer:
    """A tiny random course Transformer whose blocks decide the next token (see tests/tiny.py)."""
    return tiny_transformer("qwen2", seed, max_position=256, num_hidden_layers=layers, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny(0)


@pytest.fixture(scope="module")
def draft(model) -> Transformer:
    """The target with noise on its matrices: it agrees with the target on about a third of its guesses."""
    d = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.1)
    return d


def prompts(n: int = 8, seed: int = 1) -> list[list[int]]:
    """Mixed lengths; every other prompt repeats a phrase, so prompt lookup has something to find."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(0, VOCAB, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
        out.append(p * 3 if i % 2 else p)
    return out


NEW = [12, 5, 16, 9, 14, 7, 16, 10]

COMBOS = [EngineConfig(kv_cache=False, batching=False, quant=q) for q in (None, "int8")] + [
    EngineConfig(batching=b, speculative=s, quant=q, max_batch=3, block_size=4)
    for q in (None, "int8") for b in (False, True) for s in (None, "lookup", "draft")]


@pytest.fixture(scope="module")
def stop_and_refs(model):
    """A stop token that ends some requests early, and the plain cached greedy outputs."""
    free = [generate_cached(model, torch.tensor([p]), n) for p, n in zip(prompts(), NEW)]
    stop = {free[0][4]}
    refs = [generate_cached(model, torch.tensor([p]), n, stop_ids=stop) for p, n in zip(prompts(), NEW)]
    assert any(len(r) < n for r, n in zip(refs, NEW)), "the stop token should end a request early"
    return stop, refs


@pytest.fixture(scope="module")
def quant_refs(model, stop_and_refs):
    """The int8 engine's own unbatched run (KV cache, one request at a time, no speculation)."""
    stop, _ = stop_and_refs
    return Engine(model, EngineConfig(quant="int8", batching=False)).generate_many(prompts(), NEW, stop_ids=stop)


@pytest.mark.parametrize("config", COMBOS, ids=lambda c: c.label.replace(" ", ""))
def test_every_switch_combination_gives_plain_greedy_output(model, draft, config, stop_and_refs, quant_refs):
    stop, refs = stop_and_refs
    engine = Engine(model, config, draft=draft)
    if config.batching and config.speculative:
        # Submitted all at once, the batch would take every request before any speculation: let one
        # decode alone until a guess is kept, then send the others. Prompt 3 repeats a phrase that
        # prompt lookup matches after 6 of its 9 tokens (the others find no match before they end).
        requests = [Request(p, n, stop_ids=stop) for p, n in zip(prompts(), NEW)]
        first = 3
        engine.add_request(requests[first])
        engine.step()
        while engine.current is requests[first] and not sum(engine._spec.accepted):  # until a guess is kept
            engine.step()
        assert engine.current is requests[first], "it should still be mid-answer when the others arrive"
        for r in requests[:first] + requests[first + 1:]:
            engine.add_request(r)
        while engine.has_unfinished():
            engine.step()
        outputs = [r.output_ids for r in requests]
    else:
        outputs = engine.generate_many(prompts(), NEW, stop_ids=stop)
    assert outputs == (quant_refs if config.quant else refs)
    stats = engine.stats()
    assert stats["finished"] == len(NEW) and stats["running"] == stats["waiting"] == 0
    assert stats["output_tokens"] == sum(map(len, refs if not config.quant else quant_refs))
    if config.batching:
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["kv_blocks_consistent"]
        assert max(h.running for h in engine.batch.history) == 3  # really batched, up to max_batch
    if config.speculative:  # the speculative path ran: guesses were made and kept
        assert stats["spec_target_calls"] > 0 and 0 < stats["spec_accepted"] <= stats["spec_proposed"]
    if config.speculative and not config.batching:  # (the draft's guesses also turned down)
        assert config.speculative == "lookup" or stats["spec_accepted"] < stats["spec_proposed"]
    if config.speculative and config.batching:
        assert stats["joined_batch"] == 1
    if config.quant:
        assert any(isinstance(m, QuantLinear) for m in engine.model.modules())
        assert not any(isinstance(m, QuantLinear) for m in model.modules())  # the caller's model is untouched


@pytest.mark.parametrize("speculative", ["lookup", "draft"])
def test_speculation_hands_its_request_to_the_batch_when_a_second_arrives(model, draft, speculative, stop_and_refs):
    """A request alone decodes speculatively; once others arrive it joins the batch mid-answer
    (prefilled again from prompt + output so far) and its tokens do not change."""
    stop, refs = stop_and_refs
    engine = Engine(model, EngineConfig(speculative=speculative, max_batch=3, block_size=4), draft=draft)
    requests = [Request(p, n, stop_ids=stop) for p, n in zip(prompts(), NEW)]
    first = max(range(len(refs)), key=lambda i: len(refs[i]))  # the longest answer: it is mid-way below
    engine.add_request(requests[first])
    while len(requests[first].output_ids) < 4:
        engine.step()
    assert engine.current is requests[first] and not engine.in_batch
    assert len(requests[first].output_ids) < len(refs[first])
    for r in requests[:first] + requests[first + 1:]:
        engine.add_request(r)
    assert engine.current is None and requests[first].request_id in engine.in_batch
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in requests] == refs
    stats = engine.stats()
    assert stats["joined_batch"] == 1 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # Idle again: the next request alone is speculative again.
    engine.add_request(Request(prompts()[1], 6, stop_ids=stop))
    assert engine.solo_queue and not engine.in_batch


def test_seeded_sampling_is_the_same_batched_or_alone(model):
    sampling = SamplingConfig(temperature=1.0, top_k=50)
    seeds = list(range(len(NEW)))
    alone = Engine(model, EngineConfig(batching=False)).generate_many(prompts(), NEW, sampling, seeds=seeds)
    batched = Engine(model, EngineConfig(max_batch=3, block_size=4)).generate_many(prompts(), NEW, sampling, seeds=seeds)
    assert batched == alone
    assert alone != Engine(model, EngineConfig(batching=False)).generate_many(prompts(), NEW)  # really sampled


@pytest.mark.parametrize("config", [EngineConfig(speculative="lookup", max_batch=3, block_size=4),
                                    EngineConfig(kv_cache=False, batching=False)], ids=lambda c: c.label)
def test_workload_replay_drives_the_engine_like_the_batch_engines(model, config):
    """workload.replay (notebook 06's driver) runs any engine configuration: every request is served
    with plain cached decoding's tokens, and the step records count every token."""
    work = make_workload(WorkloadConfig(num_requests=6, rate=200.0, prompt_len=(2, 20), output_len=(2, 10)), VOCAB)
    result = replay(Engine(model, config), work)
    assert [r.output_ids for r in result.requests] == [
        generate_cached(model, torch.tensor([w.prompt_ids]), w.output_len) for w in work]
    assert result.summary()["requests"] == 6 and sum(h.new_tokens for h in result.history) == result.output_tokens


@pytest.mark.parametrize("config", [EngineConfig(max_batch=3, block_size=4),
                                    EngineConfig(batching=False, speculative="lookup")], ids=["batch", "solo"])
def test_abort_frees_the_slot_and_blocks_at_once(model, config):
    engine = Engine(model, config)
    requests = [Request(p, 40) for p in prompts(6)]
    for r in requests:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    running = [r for r in requests if r.status is RequestStatus.RUNNING]
    waiting = [r for r in requests if r.status is RequestStatus.WAITING]
    assert running and waiting
    for r in (running[0], waiting[-1]):
        assert engine.abort(r)
        assert r.status is RequestStatus.FINISHED and r.finish_reason == "abort"
        assert not engine.abort(r)  # a second abort does nothing
    stats = engine.stats()
    assert stats["aborted"] == 2 and stats["running"] == len(running) - 1
    if config.batching:
        assert running[0].request_id not in engine.batch.blocks.block_tables
        assert stats["kv_blocks_consistent"]
    n_aborted = len(running[0].output_ids)
    while engine.has_unfinished():
        engine.step()
    assert len(running[0].output_ids) == n_aborted and not waiting[-1].output_ids  # nothing more for them
    assert sum(r.finish_reason == "length" for r in requests) == 4
    if config.batching:
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def test_bad_configurations_are_refused(model):
    with pytest.raises(ValueError, match="naive loop"):
        EngineConfig(kv_cache=False)  # batching is on by default
    with pytest.raises(ValueError, match="naive loop"):
        EngineConfig(kv_cache=False, batching=False, speculative="lookup")
    with pytest.raises(ValueError, match="quant"):
        EngineConfig(quant="int3")
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match="gamma"):
        EngineConfig(speculative="lookup", gamma=0)
    with pytest.raises(ValueError, match="draft model"):
        Engine(model, EngineConfig(speculative="draft"))


@pytest.mark.parametrize("batching", [False, True])
def test_impossible_requests_are_rejected_with_a_reason(model, batching):
    engine = Engine(model, EngineConfig(batching=batching, max_model_len=64, block_size=4))
    too_long = Request(list(range(1, 60)), 10)
    assert not engine.add_request(too_long)
    assert too_long.status is RequestStatus.REJECTED and "max_model_len is 64" in too_long.finish_reason
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(list(range(1, 60)), 10)
    ok = Request([1, 2, 3], 5)
    assert engine.add_request(ok)
    with pytest.raises(ValueError, match="already used"):
        engine.add_request(ok)
    assert engine.stats()["rejected"] == 2


# ---- faults: one request's failure stays its own --------------------------------------------------------

def run_all(engine, requests):
    for r in requests:
        assert engine.add_request(r)
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize("where", ["prefill raises", "decode raises", "prefill nan", "decode nan"])
def test_a_fault_in_one_request_fails_it_alone(model, stop_and_refs, where):
    stop, refs = stop_and_refs
    ps = prompts()
    engine = Engine(model, EngineConfig(max_batch=3, block_size=4))
    if where.startswith("prefill"):  # a token that only prompt 2 holds (admitted with two others)
        bad = 2
        poison = next(t for t in ps[bad] if all(t not in p for i, p in enumerate(ps) if i != bad))
        engine.batch.model = Faulty(model, poison=poison, nan=where.endswith("nan"))
    else:  # the last position the longest request feeds, which no other request reaches
        ends = [len(p) + len(r) - 2 for p, r in zip(ps, refs)]
        bad = max(range(len(ps)), key=lambda i: ends[i])
        assert sorted(ends)[-2] < ends[bad]
        engine.batch.model = Faulty(model, at_pos=ends[bad], nan=where.endswith("nan"))
    requests = [Request(p, n, stop_ids=stop) for p, n in zip(ps, NEW)]
    run_all(engine, requests)
    assert requests[bad].finish_reason == "error"
    assert ("not finite" if where.endswith("nan") else "injected fault") in requests[bad].error
    assert [r.output_ids for i, r in enumerate(requests) if i != bad] == [r for i, r in enumerate(refs) if i != bad]
    if where.startswith("decode"):  # it failed at its last step: everything before is its own greedy output
        assert requests[bad].output_ids == refs[bad][:-1]
    stats = engine.stats()
    assert stats["failed"] == 1 and stats["finished"] == len(ps) - 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["kv_blocks_consistent"]


@pytest.mark.parametrize("speculative", [None, "lookup"])
def test_a_fault_in_the_solo_lane_fails_that_request_and_the_next_one_runs(model, stop_and_refs, speculative):
    stop, refs = stop_and_refs
    engine = Engine(model, EngineConfig(batching=False, speculative=speculative))
    poison = prompts()[0][0]
    engine.model = Faulty(model, poison=poison)
    bad, good = Request(prompts()[0], NEW[0], stop_ids=stop), Request(prompts()[1], NEW[1], stop_ids=stop)
    run_all(engine, [bad, good])
    assert bad.finish_reason == "error" and "injected fault" in bad.error and bad.is_done
    assert good.output_ids == refs[1] and engine.stats()["failed"] == 1 and not engine.has_unfinished()


def test_a_step_that_raises_after_its_prefill_finished_a_request_leaves_no_zombie(model, stop_and_refs, monkeypatch):
    """The prefill half finishes a one-token request, then the decode half raises (a scheduler bug,
    not one request's fault). The finished request must leave the engine: abort() refuses a done
    request, so a zombie would keep has_unfinished() True and a server thread spinning forever."""
    stop, refs = stop_and_refs
    engine = Engine(model, EngineConfig(max_batch=3, block_size=4))
    one, longer = Request(prompts()[0], 1), Request(prompts()[1], NEW[1], stop_ids=stop)
    for r in (one, longer):
        engine.add_request(r)
    prepare = engine.batch.scheduler.prepare_decode

    def broken():
        raise RuntimeError("injected scheduler bug")

    monkeypatch.setattr(engine.batch.scheduler, "prepare_decode", broken)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert one.is_done and one.request_id not in engine.in_batch and len(one.output_ids) == 1
    assert set(engine.in_batch) == {longer.request_id}  # only the unfinished one is still held
    monkeypatch.setattr(engine.batch.scheduler, "prepare_decode", prepare)
    while engine.has_unfinished():
        engine.step()
    assert longer.output_ids == refs[1]
    dropped = Request(prompts()[2], 10)
    engine.add_request(dropped)
    engine.step()
    assert engine.abort_all() == [dropped] and not engine.has_unfinished() and dropped.finish_reason == "abort"
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


# ---- logprobs and penalties: the batch lane sees the logits ----------------------------------------------

def test_logprobs_are_the_models_own_and_penalties_follow_a_hand_written_loop(model):
    p = prompts()[1]  # a prompt that repeats itself: a penalty has something to push against
    engine = Engine(model, EngineConfig(speculative="lookup", max_batch=3, block_size=4))
    plain = Request(p, 8, logprobs=3)
    assert engine.add_request(plain) and plain.request_id in engine.in_batch  # not the speculative solo lane
    penalized = Request(p, 8, presence_penalty=1.5, frequency_penalty=0.5)
    run_all(engine, [penalized])
    # The reference: a full forward per token (no cache), penalties subtracted by hand.
    ids, expected, logprobs = list(p), [], []
    with torch.inference_mode():
        for _ in range(8):
            row = model(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1))[0, -1]  # (V,)
            counts = torch.zeros_like(row)
            for t in expected:
                counts[t] += 1
            expected.append(int((row - 1.5 * (counts > 0).float() - 0.5 * counts).argmax()))
            ids.append(expected[-1])
    assert penalized.output_ids == expected
    ids = list(p)
    with torch.inference_mode():
        for t in plain.output_ids:
            logprobs.append(torch.log_softmax(model(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1))[0, -1], -1))
            ids.append(t)
    assert len(plain.output_logprobs) == 8
    for t, lp, (chosen, top) in zip(plain.output_ids, logprobs, plain.output_logprobs):
        assert chosen == pytest.approx(float(lp[t]), abs=1e-4)
        assert [i for i, _ in top] == lp.topk(3).indices.tolist() and top[0][0] == t  # greedy: the top one
    assert plain.output_ids != penalized.output_ids  # the penalty changed the answer
    solo = Engine(model, EngineConfig(batching=False))
    refused = Request(p, 4, logprobs=0)
    assert not solo.add_request(refused) and "need the batching engine" in refused.finish_reason


# ---- the real default model ---------------------------------------------------------------------------

def test_real_model_engines_agree_with_plain_cached_decoding(default_model):
    """SmolLM2-135M, chat prompts, greedy: batching with prompt lookup (one request arriving alone,
    then the others) gives plain cached decoding's tokens; int8 batched gives int8 alone's tokens.
    (The offline draft's greedy identity on the real model is tested in test_speculative.)"""
    hf, tokenizer, _ = default_model
    target = Transformer.from_hf(hf)
    stop = stop_token_ids(tokenizer)
    texts = ["What is the capital of France?", "Repeat exactly: red, green, blue, red, green, blue.", "Name a fruit."]
    ids = [chat_input_ids(tokenizer, t)[0].tolist() for t in texts]
    refs = [generate_cached(target, torch.tensor([p]), 8, stop_ids=stop) for p in ids]
    lookup = Engine(target, EngineConfig(speculative="lookup", max_batch=2))
    first = Request(ids[1], 8, stop_ids=stop)
    lookup.add_request(first)
    lookup.step()
    rest = [Request(p, 8, stop_ids=stop) for p in (ids[0], ids[2])]
    for r in rest:
        lookup.add_request(r)
    while lookup.has_unfinished():
        lookup.step()
    assert [rest[0].output_ids, first.output_ids, rest[1].output_ids] == refs
    assert lookup.stats()["joined_batch"] == 1
    int8 = quantize_model(copy.deepcopy(target), INT8)  # quantized once; both engines use it as it is
    alone = Engine(int8, EngineConfig(quant="int8", batching=False)).generate_many(ids, 8, stop_ids=stop)
    assert Engine(int8, EngineConfig(quant="int8", max_batch=3)).generate_many(ids, 8, stop_ids=stop) == alone
