"""A bounded soak test of course_lib.server: 200 requests from 32 concurrent clients on loopback, a fifth
malformed or extreme, a fifth hanging up mid-stream. Afterwards every well-formed request has been
served exactly once with the answer it gets alone, the engine holds no slot or KV block, and the
process's memory (RSS) is back near where it started. The server runs with chunked prefill (a budget
small enough that these prompts really are split) and prefix caching on (the chat template's system
prompt is shared). A tiny random model with the real SmolLM2 tokenizer keeps it to seconds on 2 CPU cores."""

import asyncio
import ctypes
import gc
import json
import os
import random

import httpx
import pytest

from course_lib.engine import EngineConfig
from course_lib.generation import SamplingConfig, chat_input_ids, stop_token_ids
from tiny_server import MODEL, tiny_chat_model, tiny_engine, tiny_server

CLIENTS, REQUESTS = 32, 200
TEXTS = ["What is the capital of France?", "Name three colours.", "Give me a word that rhymes with cat.",
         "What is 2 + 2?", "Say hello in French.", "Name a planet.", "Is water wet?", "Write the word blue twice."]
# Each is refused with a 4xx before it reaches the engine.
MALFORMED = [
    (b'{"model": "tiny-chat", "messages": [', 400), (b"[1, 2]", 400),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400),  # no model
    ({"model": MODEL, "messages": []}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": list("abcdef")}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100}}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
]
# Legal but extreme: each must be answered, and each is greedy in effect (see test_generation).
EXTREME = [{"temperature": 1.0, "top_p": 1e-9}, {"temperature": 1e-40}, {"temperature": 2.0, "top_k": 1}]


def rss_bytes() -> int:
    """Resident memory of this process now, after returning freed heap pages to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: measure as it is
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_jobs(seed: int) -> list[dict]:
    """REQUESTS jobs: 3/5 well-formed (greedy, seeded sampled or extreme; chat or completions;
    streamed or not), 1/5 malformed, 1/5 streams that hang up after their first piece of text."""
    rng = random.Random(seed)
    jobs = []
    for i in range(REQUESTS):
        kind = ("ok", "ok", "ok", "bad", "leave")[i % 5]
        text = rng.choice(TEXTS)
        if kind == "bad":
            body, status = MALFORMED[rng.randrange(len(MALFORMED))]
            jobs.append({"kind": kind, "body": body, "status": status, "path": "/v1/chat/completions"})
        elif kind == "leave":
            jobs.append({"kind": kind, "path": "/v1/chat/completions", "body": {
                "model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 200,
                "ignore_eos": True, "temperature": 0, "stream": True}})
        else:
            n = rng.randint(2, 16)
            sampling = rng.choice([{"temperature": 0}, {"temperature": 0.8, "seed": rng.randrange(10**6)},
                                   *EXTREME])
            chat = rng.random() < 0.7
            body = {"model": MODEL, "max_tokens": n, "stream": rng.random() < 0.5, **sampling}
            body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
            jobs.append({"kind": kind, "body": body, "text": text, "chat": chat,
                         "path": "/v1/chat/completions" if chat else "/v1/completions"})
    return jobs


async def send(client: httpx.AsyncClient, url: str, job: dict) -> dict:
    body, path = job["body"], url + job["path"]
    if isinstance(body, bytes):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        return {"status": response.status_code}
    if not body.get("stream"):
        response = await client.post(path, json=body)
        if response.status_code != 200:
            return {"status": response.status_code}
        choice = response.json()["choices"][0]
        return {"status": 200, "text": choice["message"]["content"] if "message" in choice else choice["text"]}
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code}
        text, done = "", False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event["choices"]:
                choice = event["choices"][0]
                text += (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]
            if job["kind"] == "leave" and text:
                return {"status": 200, "left": True}  # hang up: leaving the block closes the connection
        return {"status": 200, "text": text, "done": done}


async def run_clients(url: str, jobs: list[dict]) -> list[dict]:
    """CLIENTS clients share the jobs; each sends its next one as soon as the last is answered."""
    todo = list(enumerate(jobs))
    results: list[dict | None] = [None] * len(jobs)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as client:
        async def one_client():
            while todo:
                i, job = todo.pop(0)
                results[i] = await send(client, url, job)
        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return results


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model(seed=1)


def test_soak_200_requests_from_32_clients(model):
    jobs = make_jobs(seed=0)
    solo = tiny_engine(model, EngineConfig(batching=False, max_model_len=256))
    tok, stop = solo.tokenizer, stop_token_ids(solo.tokenizer)

    def alone(job) -> str:
        """The text of a well-formed job run alone on the one-at-a-time engine; extreme settings as greedy."""
        b = job["body"]
        ids = chat_input_ids(tok, job["text"])[0].tolist() if job["chat"] else tok(job["text"])["input_ids"]
        sampling = SamplingConfig(b["temperature"]) if b.get("seed") is not None else SamplingConfig()
        return tok.decode(solo.generate(ids, b["max_tokens"], sampling, stop, b.get("seed")), skip_special_tokens=True)

    expected = {i: alone(job) for i, job in enumerate(jobs) if job["kind"] == "ok"}
    served = EngineConfig(max_batch=8, max_model_len=256, chunked_prefill=True, token_budget=16, prefix_caching=True)
    with tiny_server(model, served) as (url, engine, _):
        asyncio.run(run_clients(url, make_jobs(seed=1)[:60]))  # warm up: first-time allocations
        for _ in range(20):  # let the warm-up's aborts reach the engine thread
            if httpx.get(url + "/engine/stats").json()["running"] == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        before, rss_before = httpx.get(url + "/engine/stats").json(), rss_bytes()
        results = asyncio.run(run_clients(url, jobs))
        for _ in range(200):
            after = httpx.get(url + "/engine/stats").json()
            if after["running"] == after["waiting"] == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        rss_after = rss_bytes()
        health = httpx.get(url + "/health").json()

    ok = [i for i, j in enumerate(jobs) if j["kind"] == "ok"]
    for i in ok:
        assert results[i]["status"] == 200 and results[i]["text"] == expected[i], (jobs[i]["body"], results[i])
        assert results[i].get("done", True)  # a stream ended with [DONE]
    for i, job in enumerate(jobs):
        if job["kind"] == "bad":
            assert results[i]["status"] == job["status"], (job["body"], results[i])
        elif job["kind"] == "leave":
            assert results[i] == {"status": 200, "left": True}
    leavers = sum(j["kind"] == "leave" for j in jobs)
    # Exactly once: the engine finished one request per well-formed job, and aborted one per leaver.
    assert after["finished"] - before["finished"] == len(ok) and after["failed"] == before["failed"]
    assert after["aborted"] - before["aborted"] == leavers
    assert after["running"] == after["waiting"] == 0 and after["free_slots"] == after["slots"]
    assert after["kv_blocks_free"] == after["kv_blocks_total"] and after["kv_blocks_consistent"]
    assert after["prefix_cache_hit_tokens"] > before["prefix_cache_hit_tokens"]  # the shared template hit
    assert max(h.prefill_tokens for h in engine.batch.history) <= 16  # prompts were prefilled in chunks
    assert health == {"status": "ok"}
    print(f"soak: RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB over {REQUESTS} requests")
    assert rss_after <= rss_before * 1.05, f"RSS grew from {rss_before / 2**20:.1f} to {rss_after / 2**20:.1f} MiB"
