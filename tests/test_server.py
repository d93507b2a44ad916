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
