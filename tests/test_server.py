"""course_lib.server and course_lib.loadgen with the server on localhost (a free port, no network):
answers, streamed or not, decode to the engine's own tokens; bad requests get OpenAI-shaped 4xx errors;
32 concurrent requests are batched and each gets its single-request output; clients that disconnect
mid-answer free their slots and KV blocks; the load generator measures what it receives."""

import asyncio
import json
import time

import httpx
import pytest

from course_lib.engine import Engine, EngineConfig
from course_lib.generation import chat_input_ids, stop_token_ids
from course_lib.loadgen import LoadConfig, run_load, sweep
from course_lib.loadgen import main as loadgen_main
from course_lib.server import TextStream, serve_in_background
from course_lib.transformer import Transformer

MODEL = "smollm2-135m"
NEW = 6  # new tokens per request in the reference runs (short: the real model runs on 2 CPU cores)
TEXTS = ["What is the capital of France?", "Name three colours.", "Give me a word that rhymes with cat.",
         "What is 2 + 2?", "Say hello in French.", "Name a planet.", "Is water wet?", "Write the word blue twice."]
COMPLETION = "The three primary colours are"


@pytest.fixture(scope="module")
def served(default_model):
    """The real default model behind the server; reference tokens from the same engine, run alone
    before the server starts."""
    hf, tokenizer, _ = default_model
    engine = Engine(Transformer.from_hf(hf), EngineConfig(max_batch=8, max_model_len=256), tokenizer=tokenizer)
    stop = stop_token_ids(tokenizer)
    refs = {t: engine.generate(chat_input_ids(tokenizer, t), NEW, stop_ids=stop) for t in TEXTS}
    refs[COMPLETION] = engine.generate(tokenizer(COMPLETION)["input_ids"], NEW, stop_ids=stop)
    with serve_in_background(engine, MODEL) as server:  # as notebook 08 starts it
        yield server.url, engine, tokenizer, refs
    assert not server.thread.is_alive()  # stopped cleanly


def expected(tokenizer, tokens: list[int], stop: list[int]) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of a reference run."""
    reason = "stop" if tokens[-1] in stop else "length"
    return tokenizer.decode(tokens, skip_special_tokens=True), reason, len(tokens)


def sse(lines) -> list[dict]:
    """The data events of a server-sent event stream; checks that it ends with [DONE]."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]", "a stream ends with data: [DONE]"
    return [json.loads(d) for d in data[:-1]]


def chat_body(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": NEW, "temperature": 0,
            **extra}


def stats(url: str) -> dict:
    return httpx.get(f"{url}/engine/stats").json()


def test_models_and_health(served):
    url = served[0]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]


@pytest.mark.parametrize("text", TEXTS[:2])
def test_chat_answers_streamed_and_not_decode_to_the_engines_tokens(served, text):
    url, engine, tokenizer, refs = served
    want, reason, n = expected(tokenizer, refs[text], stop_token_ids(tokenizer))
    answer = httpx.post(f"{url}/v1/chat/completions", json=chat_body(text), timeout=60).json()
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want} and choice["finish_reason"] == reason
    assert answer["usage"]["completion_tokens"] == n
    assert answer["usage"]["prompt_tokens"] == chat_input_ids(tokenizer, text).shape[1]
    body = chat_body(text, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(list(response.iter_lines()))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(pieces) == want and len([p for p in pieces if p]) >= 2  # streamed in pieces
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == reason
    assert events[-1]["usage"]["completion_tokens"] == n and events[-1]["choices"] == []


def test_completions_streamed_and_not_and_stop_strings(served):
    url, _, tokenizer, refs = served
    want, reason, n = expected(tokenizer, refs[COMPLETION], stop_token_ids(tokenizer))
    body = {"model": MODEL, "prompt": COMPLETION, "max_tokens": NEW, "temperature": 0}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == want and answer["choices"][0]["finish_reason"] == reason
    assert answer["usage"]["completion_tokens"] == n
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        events = sse(list(response.iter_lines()))
    assert "".join(e["choices"][0]["text"] for e in events) == want
    # A stop string ends the text just before it, with finish_reason "stop", streamed or not.
    stop = want.strip().split()[1]
    cut = want[:want.index(stop)]
    answer = httpx.post(f"{url}/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    assert answer["choices"][0]["text"] == cut and answer["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stop": stop, "stream": True}, timeout=60) as response:
        events = sse(list(response.iter_lines()))
    assert "".join(e["choices"][0]["text"] for e in events) == cut and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_partial_characters_and_stop_strings(served):
    tokenizer = served[2]
    ids = tokenizer("café au lait, s'il vous plaît")["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.add([t]) for t in ids[:-1]] + [stream.add(ids[-1:], final=True)]
    assert "".join(pieces) == tokenizer.decode(ids) and all("\ufffd" not in p for p in pieces)
    stream = TextStream(tokenizer, ["vous"])
    text = "".join(stream.add([t]) for t in ids)
    assert text == "café au lait, s'il " and stream.stopped


BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [', 400, "malformed JSON"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "dictionary"),
    ("no messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("no model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("unknown model", "/v1/chat/completions", chat_body("hi", model="gpt-9"), 404, "gpt-9"),
    ("max_tokens too large", "/v1/chat/completions", chat_body("hi", max_tokens=10_000), 400, "max_tokens=10000"),
    ("max_tokens zero", "/v1/chat/completions", chat_body("hi", max_tokens=0), 400, "max_tokens"),
    ("negative temperature", "/v1/chat/completions", chat_body("hi", temperature=-1), 400, "temperature"),
    ("n > 1", "/v1/chat/completions", chat_body("hi", n=2), 400, "n"),
    ("no prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("two prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("token id out of range", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "token ids"),
    ("prompt longer than the context", "/v1/completions", {"model": MODEL, "prompt": [1] * 300}, 400, "context"),
]


@pytest.mark.parametrize("path,body,status,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_shaped_errors(served, path, body, status, words):
    url = served[0]
    before = stats(url)["finished"]
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url + path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"]
    assert stats(url)["finished"] == before  # refused before reaching the engine


def test_unknown_path_is_a_json_404(served):
    response = httpx.get(served[0] + "/v1/nothing")
    assert response.status_code == 404 and "message" in response.json()["error"]


def test_32_concurrent_requests_are_batched_and_each_gets_its_single_request_output(served):
    """Eight prompts x (streamed, not) x (max_tokens 4, 6) at once; greedy. Each answer equals the
    engine's output for that request alone (a run with max_tokens 4 is the first 4 tokens)."""
    url, engine, tokenizer, refs = served
    stop = stop_token_ids(tokenizer)
    jobs = [(t, stream, n) for t in TEXTS for stream in (False, True) for n in (4, NEW)]
    assert len(jobs) == 32

    async def one(client, text, stream, n):
        body = chat_body(text, max_tokens=n, stream=stream)
        if not stream:
            return (await client.post(f"{url}/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            events = sse([line async for line in response.aiter_lines()])
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    first_step = engine.stats()["steps"]
    answers = asyncio.run(run_all())
    for (text, _, n), answer in zip(jobs, answers):
        assert answer == expected(tokenizer, refs[text][:n], stop)[0], f"{text!r}, max_tokens={n}"
    s = stats(url)
    assert s["running"] == s["waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
    busiest = max(h.running for h in engine.batch.history[-(s["steps"] - first_step):])
    assert busiest == 8, "concurrent requests should fill every batch slot"


def test_disconnected_clients_free_their_slots_and_blocks(served):
    """Four streams read their first piece and hang up; one non-streamed client times out. All five
    asked for 200 tokens past the end of the answer: aborted, they leave no slot or block behind."""
    url = served[0]
    before = stats(url)
    long_body = chat_body("Tell me a long story.", max_tokens=200, ignore_eos=True)
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", f"{url}/v1/chat/completions", json={**long_body, "stream": True})
                   for _ in range(4)]
        for s in streams:
            response = s.__enter__()
            for line in response.iter_lines():  # up to the first piece of text
                if '"content": "' in line and '"content": ""' not in line:
                    break
        for s in streams:
            s.__exit__(None, None, None)  # hang up mid-answer
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=long_body, timeout=httpx.Timeout(60, read=1.0))
    for _ in range(600):  # the aborts reach the engine thread at its next step
        now = stats(url)
        if now["aborted"] - before["aborted"] == 5 and now["running"] == now["waiting"] == 0:
            break
        time.sleep(0.05)
    assert now["aborted"] - before["aborted"] == 5
    assert now["running"] == now["waiting"] == 0 and now["free_slots"] == now["slots"]
    assert now["kv_blocks_free"] == now["kv_blocks_total"] and now["kv_blocks_consistent"]
    assert now["output_tokens"] - before["output_tokens"] < 5 * 200  # they did not run to the end
    # and the server still answers
    assert httpx.post(f"{url}/v1/chat/completions", json=chat_body(TEXTS[0]), timeout=60).status_code == 200



def test_loadgen_measures_what_it_receives(served, tmp_path):
    url = served[0]
    result = run_load(LoadConfig(url=url, rate=50.0, num_requests=4, max_tokens=(4, 4), ignore_eos=True,
                                 prompts=tuple(TEXTS[:2])))
    summary = result.summary()
    assert result.model == MODEL and summary["requests"] == 4 and summary["failed"] == 0
    assert summary["output_tokens"] == 16  # ignore_eos: exactly max_tokens each, counted from usage
    for r in result.completed:
        m = r.metrics()
        assert 0 < m.ttft_s <= m.e2e_s and m.output_tokens == 4 and len(m.itl_s) == len(r.chunk_times) - 1
    assert summary["ttft_p50_ms"] > 0 and summary["tpot_p50_ms"] > 0 and summary["throughput_tok_s"] > 0
    # Bounded in time: past the deadline nothing more is sent and unfinished requests are cancelled.
    capped = run_load(LoadConfig(url=url, concurrency=1, num_requests=3, duration_s=0.5, max_tokens=(200, 200),
                                 ignore_eos=True, prompts=("Tell me a story.",)))
    assert capped.summary()["requests"] == 0 and capped.summary()["failed"] == 3
    assert {r.error.split(":")[0] for r in capped.requests} == {"cancelled", "not sent"}
    # A sweep over rates, called as a notebook would (inside a running event loop): one summary per rate.
    async def in_a_notebook():
        return sweep(url, [5.0, 50.0], num_requests=2, max_tokens=(2, 2), ignore_eos=True, prompts=(TEXTS[0],))
    points = asyncio.run(in_a_notebook())
    assert [p["offered_rate"] for p in points] == [5.0, 50.0] and all(p["output_tokens"] == 4 for p in points)
    # The command line writes every request and the summary.
    out = tmp_path / "load.json"
    assert loadgen_main(["--url", url, "--concurrency", "2", "--requests", "2", "--max-tokens", "3",
                         "--ignore-eos", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["summary"]["requests"] == 2 and saved["summary"]["output_tokens"] == 6
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        LoadConfig(url=url, rate=1.0, api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(ValueError, match="rate"):
        LoadConfig(url=url)


# ==== a tiny random model behind the server: sampling, faults, limits, the openai client ====================
# The model is random but the tokenizer is SmolLM2's: chat template, special tokens and byte-level BPE are
# real, and its random tokens make text that is hard to stream (split characters, special tokens).

import concurrent.futures  # noqa: E402

import openai  # noqa: E402
import torch  # noqa: E402

from course_lib.generation import SamplingConfig  # noqa: E402
from course_lib.server import ServerLimits  # noqa: E402
from tiny_server import MODEL as TINY, Faulty, tiny_chat_model, tiny_engine, tiny_server  # noqa: E402

LONG = 120  # tokens of the long greedy streams (ignore_eos): they outlast the requests sent beside them


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """(url, engine, loop, reference) with reference(text, n, sampling, seed, ignore_eos) -> the text
    that request gets from a separate one-at-a-time engine (kv_cache.stream_cached, no batching)."""
    solo = tiny_engine(tiny_model, EngineConfig(batching=False, max_model_len=256))
    tok = solo.tokenizer
    stop = stop_token_ids(tok)

    def reference(text, n=NEW, sampling=SamplingConfig(), seed=None, ignore_eos=False):
        ids = chat_input_ids(tok, text)[0].tolist()
        out = solo.generate(ids, n, sampling, () if ignore_eos else stop, seed)
        return tok.decode(out, skip_special_tokens=True)

    with tiny_server(tiny_model) as (url, engine, loop):
        yield url, engine, loop, reference


def tiny_chat(text: str, **extra) -> dict:
    return {"model": TINY, "messages": [{"role": "user", "content": text}], "max_tokens": NEW, "temperature": 0,
            **extra}


def read_stream(url: str, body: dict, path: str = "/v1/chat/completions", timeout: float = 60) -> tuple[str, list[dict], float]:
    """(text, events, time of the last event) of a streamed request, read to the end."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        events = sse(list(response.iter_lines()))
    done = time.perf_counter()
    text = "".join((e["choices"][0].get("delta", {}).get("content") or e["choices"][0].get("text") or "")
                   for e in events if e.get("choices"))
    return text, events, done


def client(url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=retries, timeout=60)


def until(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def idle_and_clean(url: str) -> dict:
    """Stats once nothing runs or waits; every slot and KV block is back and the books balance."""
    def idle():
        s = stats(url)
        return s if s["running"] == s["waiting"] == 0 else None

    now = until(idle, what="an idle engine")
    assert now["free_slots"] == now["slots"] and now["kv_blocks_free"] == now["kv_blocks_total"]
    assert now["kv_blocks_consistent"]
    return now


def test_four_greedy_streams_survive_requests_with_top_p_1e9_and_temperature_1e40(tiny):
    """The issue's case: each of these used to make the engine step raise and fail every request beside
    it with a 500. Now both are answered; a top_p that small keeps only the most likely token, and a
    temperature that small is greedy, so both answers are the greedy answer; the four streams end
    with the text each gets alone."""
    url, engine, _, reference = tiny
    texts = TEXTS[:4]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(read_stream, url, tiny_chat(t, max_tokens=LONG, ignore_eos=True)) for t in texts]
        until(lambda: stats(url)["running"] == 4, what="four running streams")
        extreme = []
        for params in ({"temperature": 1.0, "top_p": 1e-9}, {"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-300}):
            response = httpx.post(f"{url}/v1/chat/completions", json=tiny_chat(TEXTS[5], **params), timeout=60)
            extreme.append((response, time.perf_counter()))
        results = [s.result() for s in streams]
    for response, answered in extreme:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == reference(TEXTS[5])
        assert answered < min(done for _, _, done in results), "answered while the four streams ran"
    for text, (got, events, _) in zip(texts, results):
        assert got == reference(text, LONG, ignore_eos=True)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert stats(url)["failed"] == 0
    idle_and_clean(url)


def test_sampled_and_greedy_requests_batched_over_http_get_what_each_gets_alone(tiny):
    """Seeded sampled requests (several settings) and greedy ones, all at once through the batch:
    each text equals the same request run alone on the one-at-a-time engine."""
    url, engine, _, reference = tiny
    jobs = [(TEXTS[i % 8], {"temperature": 0} if i % 3 == 0 else
             {"temperature": [0.7, 1.0, 1.3][i % 3], "top_p": [1.0, 0.9, 0.5][i % 3], "seed": 100 + i}
             | ({"top_k": 20} if i % 4 == 1 else {}) | ({"min_p": 0.05} if i % 5 == 2 else {}))
            for i in range(12)]

    async def run_all():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=tiny_chat(t, max_tokens=12, **p))
                                          for t, p in jobs))

    first_step = engine.stats()["steps"]
    answers = asyncio.run(run_all())
    assert max(h.running for h in engine.batch.history[-(engine.stats()["steps"] - first_step):]) >= 6  # batched
    sampled_differs = 0
    for (text, p), answer in zip(jobs, answers):
        sampling = SamplingConfig(p["temperature"], p.get("top_k"), p.get("top_p", 1.0), p.get("min_p", 0.0))
        want = reference(text, 12, sampling, p.get("seed"))
        assert answer.json()["choices"][0]["message"]["content"] == want, p
        sampled_differs += p["temperature"] > 0 and want != reference(text, 12)
    assert sampled_differs >= 4, "sampling should leave the greedy path"
    idle_and_clean(url)


def test_the_openai_client_chat_and_completions_streamed_and_not(tiny):
    url, engine, _, reference = tiny
    oa = client(url)
    want = reference(TEXTS[0])
    chat = oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": TEXTS[0]}], max_tokens=NEW,
                                      temperature=0, user="someone")  # `user` is accepted and ignored
    assert chat.choices[0].message.content == want and chat.usage.completion_tokens <= NEW
    pieces, usage = [], None
    for chunk in oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": TEXTS[0]}],
                                            max_tokens=NEW, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == want and usage.completion_tokens == chat.usage.completion_tokens
    tok = engine.tokenizer
    prompt_ids = tok("Once upon a time")["input_ids"]
    solo = tiny_engine(engine.model, EngineConfig(batching=False, max_model_len=256))
    want = tok.decode(solo.generate(prompt_ids, NEW, stop_ids=stop_token_ids(tok)), skip_special_tokens=True)
    done = oa.completions.create(model=TINY, prompt="Once upon a time", max_tokens=NEW, temperature=0)
    assert done.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model=TINY, prompt=prompt_ids, max_tokens=NEW, temperature=0, stream=True) if c.choices)
    assert streamed == want
    # Errors arrive as the client's typed exceptions, with OpenAI's fields.
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                   tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.param == "tools" and "not supported" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=TINY, prompt="hi", max_tokens=2, extra_body={"temprature": 0.5})
    assert e.value.param == "temprature" and e.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as e:  # streamed: refused before the stream starts
        list(oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], stream=True,
                                        max_tokens=10_000))
    assert e.value.param == "max_tokens"


def test_logprobs_in_openais_shapes_are_the_models_own(tiny):
    url, engine, _, _ = tiny
    oa, tok = client(url), engine.tokenizer
    chat = oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": TEXTS[1]}], max_tokens=NEW,
                                      temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    # Independent check: a full forward of the prompt gives the first token's log-probabilities.
    ids = chat_input_ids(tok, TEXTS[1])
    with torch.inference_mode():
        first = torch.log_softmax(engine.model(ids, torch.arange(ids.shape[1]).view(1, -1))[0, -1], -1)
    assert content[0].logprob == pytest.approx(float(first.max()), abs=1e-4)  # greedy took the top token
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(first.topk(3).values.tolist(), abs=1e-4)
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 and c.logprob == c.top_logprobs[0].logprob
               for c in content)
    chunks = [c for c in oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": TEXTS[1]}],
                                                    max_tokens=NEW, temperature=0, logprobs=True, stream=True)
              if c.choices and c.choices[0].logprobs]
    assert [e.logprob for c in chunks for e in c.choices[0].logprobs.content] == pytest.approx(
        [c.logprob for c in content])
    done = oa.completions.create(model=TINY, prompt="Once upon a time", max_tokens=NEW, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                         lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert e.value.param == "top_logprobs"


REFUSED = [  # (parameter, value): each would change the answer; the server cannot honour it
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
    ("logit_bias", {"42": 5}), ("echo", True), ("best_of", 3), ("suffix", "end"), ("tool_choice", "required"),
    ("repetition_penalty", 1.2), ("no_such_option", 1),
]
PASSED = [("user", "u-1"), ("tools", []), ("echo", False), ("logit_bias", {}), ("response_format", {"type": "text"}),
          ("store", False), ("metadata", {"k": "v"})]


@pytest.mark.parametrize("name,value", REFUSED, ids=[r[0] for r in REFUSED])
def test_parameters_that_would_be_ignored_are_refused_by_name(tiny, name, value):
    url = tiny[0]
    path, body = ("/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2}) if name in ("echo", "suffix", "best_of") \
        else ("/v1/chat/completions", tiny_chat("hi", max_tokens=2))
    response = httpx.post(url + path, json={**body, name: value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == name and name in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("name,value", PASSED, ids=[f"{p[0]}={p[1]}" for p in PASSED])
def test_harmless_parameters_are_accepted(tiny, name, value):
    response = httpx.post(tiny[0] + "/v1/chat/completions", json={**tiny_chat("hi", max_tokens=2), name: value})
    assert response.status_code == 200, response.text


LIMITED = [
    ("seed too large", {"seed": 2**64}, 400, "seed"),
    ("seed too small", {"seed": -2**63 - 1}, 400, "seed"),
    ("five stop strings", {"stop": list("abcde")}, 400, "stop"),
    ("a stop string too long", {"stop": ["x" * 65]}, 400, "stop"),
    ("presence_penalty out of range", {"presence_penalty": 2.5}, 400, "presence_penalty"),
    ("top_logprobs over 20", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("message with a name", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages.0.name"),
]


@pytest.mark.parametrize("body,status,param", [x[1:] for x in LIMITED], ids=[x[0] for x in LIMITED])
def test_limits_and_ranges_are_400s_naming_the_parameter(tiny, body, status, param):
    response = httpx.post(tiny[0] + "/v1/chat/completions", json={**tiny_chat("hi"), **body})
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_a_body_over_the_limit_is_413_and_a_template_error_is_400(tiny, monkeypatch):
    url, engine = tiny[:2]
    big = {"model": TINY, "prompt": "x" * (2 << 20)}
    response = httpx.post(url + "/v1/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny-chat", "prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
    import jinja2

    def refuse(*args, **kwargs):
        raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", refuse)
    response = httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi"))
    assert response.status_code == 400 and "roles must alternate" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "messages"


def test_a_full_queue_answers_429_with_retry_after(tiny_model):
    config = EngineConfig(max_batch=2, max_model_len=256)
    with tiny_server(tiny_model, config, ServerLimits(max_waiting=1)) as (url, engine, _):
        body = tiny_chat("hi", max_tokens=150, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            held = [pool.submit(read_stream, url, body) for _ in range(3)]  # two slots + one waiting
            until(lambda: stats(url)["running"] + stats(url)["waiting"] == 3, what="three in flight")
            response = httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi"))
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client(url).chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}])
            assert all(len(h.result()[0]) > 0 for h in held)
        assert httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi")).status_code == 200  # room again


def test_a_request_past_its_deadline_gets_504_and_frees_its_slot(tiny_model):
    with tiny_server(tiny_model, limits=ServerLimits(request_timeout_s=0.3)) as (url, engine, loop):
        step = engine.step

        def slow_step():  # 20 ms a step: 200 tokens take 4 s, far past the 0.3 s deadline
            time.sleep(0.02)
            return step()

        loop.call(lambda: setattr(engine, "step", slow_step)).result()
        body = tiny_chat("hi", max_tokens=200, ignore_eos=True)
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            last = json.loads([line for line in r.iter_lines() if line.startswith("data: ")][-1][6:])
        assert last["error"]["code"] == "timeout"  # streamed: the error is the last event
        now = idle_and_clean(url)
        assert now["aborted"] == 2 and now["output_tokens"] < 2 * 200


def test_a_fault_in_one_request_over_http_fails_only_that_request_and_is_not_retried(tiny):
    url, engine, loop, reference = tiny
    poison = 45_000  # a token id in no chat prompt of TEXTS
    assert all(poison not in chat_input_ids(engine.tokenizer, t)[0].tolist() for t in TEXTS)
    inner = engine.batch.model
    before = stats(url)
    loop.call(lambda: setattr(engine.batch, "model", Faulty(inner, poison=poison))).result()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(read_stream, url, tiny_chat(t, max_tokens=LONG, ignore_eos=True)) for t in TEXTS[:4]]
            until(lambda: stats(url)["running"] == 4, what="four running streams")
            with pytest.raises(openai.InternalServerError) as e:  # retries allowed, but x-should-retry: false
                client(url, retries=2).completions.create(model=TINY, prompt=[5, poison, 7], max_tokens=4)
            assert "injected fault" in e.value.message and e.value.response.headers["x-should-retry"] == "false"
            results = [s.result()[0] for s in streams]
    finally:
        loop.call(lambda: setattr(engine.batch, "model", inner)).result()
    assert results == [reference(t, LONG, ignore_eos=True) for t in TEXTS[:4]]
    now = idle_and_clean(url)
    assert now["failed"] - before["failed"] == 1  # sent once: the client did not retry it


def test_a_step_that_raises_fails_its_requests_resets_the_engine_and_never_spins(tiny, monkeypatch):
    """The zombie: the prefill half finishes a one-token request, then the decode half raises. The
    request used to stay in the engine forever and the engine thread spun at full CPU."""
    url, engine, loop, reference = tiny
    scheduler = engine.batch.scheduler
    prepare = scheduler.prepare_decode
    calls = []

    def broken_once():
        if not calls:
            calls.append(1)
            raise RuntimeError("injected scheduler bug")
        return prepare()

    loop.call(lambda: monkeypatch.setattr(scheduler, "prepare_decode", broken_once)).result()
    response = httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi", max_tokens=1), timeout=30)
    assert response.status_code == 500 and "injected scheduler bug" in response.json()["error"]["message"]
    idle = idle_and_clean(url)
    time.sleep(0.2)
    assert stats(url)["steps"] == idle["steps"], "an idle engine thread takes no steps"
    assert httpx.post(url + "/v1/chat/completions", json=tiny_chat(TEXTS[2]), timeout=30).json()[
        "choices"][0]["message"]["content"] == reference(TEXTS[2])


class EngineDeath(BaseException):
    """Not an Exception: escapes the loop's per-step handler, as a bug in the loop itself would."""


def test_when_the_engine_thread_dies_waiting_handlers_get_503_and_health_says_why(tiny_model):
    with tiny_server(tiny_model) as (url, engine, loop):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(httpx.post, url + "/v1/chat/completions",
                                  json=tiny_chat("hi", max_tokens=200, ignore_eos=True), timeout=30)
            streaming = pool.submit(read_stream, url, tiny_chat("hi", max_tokens=200, ignore_eos=True))
            until(lambda: stats(url)["running"] == 2, what="two running requests")

            def die():
                raise EngineDeath("injected")

            loop.call(lambda: setattr(engine, "step", die))
            response = waiting.result(timeout=10)  # an answer, not a hang
            assert response.status_code == 503 and "EngineDeath" in response.json()["error"]["message"]
            with pytest.raises(AssertionError):  # the stream's last event is an error, not [DONE]
                streaming.result(timeout=10)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "EngineDeath: injected" in health.json()["reason"]
        started = time.perf_counter()
        refused = httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi"), timeout=10)
        assert refused.status_code == 503 and refused.headers["x-should-retry"] == "false"
        assert time.perf_counter() - started < 2
        assert httpx.get(url + "/engine/stats").status_code == 503


def first_content(lines) -> None:
    """Read a stream's lines up to its first piece of text. Keep `lines` referenced: a line iterator
    that is dropped closes its connection, which the server sees as a client hanging up."""
    for line in lines:
        if '"content": "' in line and '"content": ""' not in line:
            return


def test_queued_and_preempted_streams_that_disconnect_free_everything(tiny_model):
    """Two slots and a KV pool too small for two long answers: a third stream waits in the queue, and
    the newer of the two running ones is preempted when blocks run out. Both hang up while waiting;
    they are aborted, and the remaining stream ends with the text it gets alone."""
    config = EngineConfig(max_batch=2, max_model_len=256, block_size=4, num_blocks=70)
    solo = tiny_engine(tiny_model, EngineConfig(batching=False, max_model_len=256))
    body = tiny_chat("hi", max_tokens=200, ignore_eos=True)
    ids = chat_input_ids(solo.tokenizer, "hi")[0].tolist()
    want = solo.tokenizer.decode(solo.generate(ids, 200), skip_special_tokens=True)
    assert (len(ids) + 200) // 4 + 1 <= 70 < 2 * (len(ids) + 200) // 4, "one long answer fits the pool, two do not"
    with tiny_server(tiny_model, config) as (url, engine, loop), httpx.Client(timeout=60) as http:
        step = engine.step

        def slow_step():  # 10 ms a step: the first answer takes 2 s, time enough to hang up on the others
            time.sleep(0.01)
            return step()

        loop.call(lambda: setattr(engine, "step", slow_step)).result()
        before = stats(url)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(read_stream, url, body)
            until(lambda: stats(url)["output_tokens"] > before["output_tokens"], what="the first stream's tokens")
            second = http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True})
            second_lines = second.__enter__().iter_lines()
            first_content(second_lines)
            queued = http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True})
            queued_lines = queued.__enter__().iter_lines()
            next(queued_lines)  # the role chunk: it is in, and waits for a slot
            assert stats(url)["waiting"] == 1, stats(url)
            queued.__exit__(None, None, None)  # hang up while queued
            until(lambda: stats(url)["waiting"] == 0, what="the queued stream's abort")

            def preempted():
                return loop.call(lambda: [r.num_preemptions for r in engine.batch.scheduler.waiting]).result()

            until(preempted, what="a preemption")
            second.__exit__(None, None, None)  # hang up while preempted (waiting to be recomputed)
            text, events, _ = first.result()
        assert text == want and events[-1]["choices"][0]["finish_reason"] == "length"
        now = idle_and_clean(url)
        assert now["aborted"] - before["aborted"] == 2 and now["finished"] - before["finished"] == 1


# ---- the text stream on its own ---------------------------------------------------------------------------

class CountingTokenizer:
    """A byte-level tokenizer (token i is byte i) that counts the tokens it decodes; `rewrite`
    makes it change earlier text when later tokens arrive (as cleanup of spaces before
    punctuation does), so decoding is not prefix-stable."""

    def __init__(self, rewrite: bool = False):
        self.decoded, self.rewrite = 0, rewrite

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        text = bytes(ids).decode("utf-8", errors="replace")
        return text.replace(" .", ".") if self.rewrite else text


def test_text_stream_is_linear_in_the_output_and_never_loses_text():
    data = ("naïve café, " * 200).encode()  # 2,800 tokens, with two-byte characters split across tokens
    tok = CountingTokenizer()
    stream = TextStream(tok, stop=["STOP"])
    text = "".join(stream.add([b]) for b in data[:-1]) + stream.add([data[-1]], final=True)
    assert text == data.decode()
    assert tok.decoded <= 8 * len(data), f"decoded {tok.decoded} tokens for {len(data)}: not linear"
    # Not prefix-stable: "a ." becomes "a." once the "." arrives, after "a " was sent. The end still
    # sends the rest of the text rather than dropping it.
    tok = CountingTokenizer(rewrite=True)
    stream = TextStream(tok)
    ids = list(b"wait a .")
    pieces = [stream.add([b]) for b in ids[:-1]] + [stream.add(ids[-1:], final=True)]
    assert "".join(pieces).endswith(".") and "".join(pieces).replace(" ", "") == "waita."
    # A byte that never completes a character is given up on after a bounded wait, not held forever.
    stream = TextStream(CountingTokenizer())
    held = [stream.add([0xE2]) for _ in range(40)]
    assert "".join(held).count("\ufffd") >= 40 - 20


def test_an_engine_without_a_batch_lane_refuses_what_it_cannot_compute(tiny_model):
    with tiny_server(tiny_model, EngineConfig(batching=False, max_model_len=256)) as (url, _, _):
        for extra, param in (({"logprobs": True}, "logprobs"), ({"presence_penalty": 1.0}, "presence_penalty")):
            response = httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi", **extra))
            assert response.status_code == 400 and response.json()["error"]["param"] == param
        assert httpx.post(url + "/v1/chat/completions", json=tiny_chat("hi")).status_code == 200


def test_serve_command_line_limits():
    from course_lib.server import main as serve_main
    from course_lib.server import parse_args

    args = parse_args([])
    assert (args.max_waiting, args.request_timeout, args.max_stop_strings, args.max_stop_length,
            args.max_request_bytes) == (32, 300.0, 4, 64, 1 << 20)
    assert serve_main(["--max-waiting", "-1"]) == 2  # refused before any model is loaded


def test_an_unexpected_error_is_still_an_openai_shaped_json_500(tiny, monkeypatch):
    url, engine = tiny[:2]

    def broken():
        raise KeyError("injected bug")

    monkeypatch.setattr(engine, "stats", broken)
    response = httpx.get(url + "/engine/stats")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "server_error" and "injected bug" in response.json()["error"]["message"]
