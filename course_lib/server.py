"""An OpenAI-compatible server on the course engine. Built in notebooks/08_putting_it_together.ipynb.

    python -m course_lib serve --model smollm2-135m --port 8000 [--speculative lookup] [--quant int8] ...

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, GET /health, and GET /engine/stats (the engine's slots, KV blocks
and counters; not part of the OpenAI API). Errors are JSON in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, missing or invalid fields
and max_tokens beyond the context, 404 for an unknown model or path.

Threads: the engine is not thread-safe, so one background thread owns it (EngineLoop) and runs
step() while there is work. Request handlers run on the web server's event loop; they hand
requests to the engine thread through a queue and get their tokens back through a per-request
asyncio queue, filled from the engine thread with call_soon_threadsafe. Many requests in flight
at once are therefore batched by the engine like any other. A client that disconnects cancels
its handler, which aborts its request: its slot and KV blocks are freed at the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from course_lib.engine import Engine, EngineConfig, StepOutput
from course_lib.generation import SamplingConfig, chat_input_ids, stop_token_ids
from course_lib.scheduler import Request, rejection_reason

DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (capped by what the context leaves)
HISTORY_KEPT = 4096  # engine step records kept while serving (the latest, for plots)


# ---- the engine thread ---------------------------------------------------------------------------------

class EngineLoop:
    """Owns the engine in one background thread: submit/abort/call from any thread, tokens out
    through a callback (`sink`) per request, called from the engine thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict[int, tuple[Request, Callable]] = {}  # request id -> (request, sink)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the last exception a step raised

    def start(self) -> None:
        """Start the engine thread."""
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current step, fail what is in flight, end the thread."""
        self.inbox.put(None)
        if self.thread is not None:
            self.thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submit(self, request: Request, sink: Callable[[StepOutput | Exception], None]) -> None:
        """Queue a request; sink receives each StepOutput, or an Exception if it cannot be served."""
        self.inbox.put(("submit", request, sink))

    def abort(self, request: Request) -> None:
        """Ask the engine thread to drop a request and free its slot and blocks."""
        self.inbox.put(("abort", request, None))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn() in the engine thread between steps (to read engine state safely)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("call", fn, future))
        return future

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()  # idle: sleep until something arrives
            try:
                while True:
                    item = self.inbox.get(block=block)
                    block = False
                    if item is None:
                        self._fail_all(RuntimeError("the server is shutting down"))
                        return
                    self._handle(*item)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bad step must not take the server down with it
                self.error = exc
                self._fail_all(exc)
                continue
            for out in outputs:
                request, sink = self.sinks.get(out.request.request_id, (None, None))
                if out.finished:
                    self.sinks.pop(out.request.request_id, None)
                if sink is not None:
                    _deliver(sink, out)
            self._trim()

    def _handle(self, kind: str, obj, arg) -> None:
        if kind == "submit":
            if self.engine.add_request(obj):
                self.sinks[obj.request_id] = (obj, arg)
            else:
                _deliver(arg, ValueError(obj.finish_reason))
        elif kind == "abort":
            self.sinks.pop(obj.request_id, None)
            self.engine.abort(obj)
        elif kind == "call":
            try:
                arg.set_result(obj())
            except Exception as exc:
                arg.set_exception(exc)

    def _trim(self) -> None:
        """A server runs for days: keep the engine's step records and finished lists bounded."""
        records = [self.engine.history]
        if self.engine.batch is not None:
            records += [self.engine.batch.history, self.engine.batch.kv_samples, self.engine.batch.finished]
        for r in records:
            if len(r) > 2 * HISTORY_KEPT:
                del r[:-HISTORY_KEPT]

    def _fail_all(self, exc: BaseException) -> None:
        for request, sink in list(self.sinks.values()):
            self.engine.abort(request)
            _deliver(sink, exc)
        self.sinks.clear()


def _deliver(sink: Callable, item) -> None:
    try:
        sink(item)
    except RuntimeError:  # the handler's event loop is gone (server stopping): nobody to tell
        pass


# ---- text out: detokenizing a stream -----------------------------------------------------------

class TextStream:
    """Turns token ids into text pieces as they arrive. A piece is held back while the text ends in
    an incomplete UTF-8 character (decoded as U+FFFD) or could be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was found: the text ends before it

    def add(self, tokens: list[int], final: bool = False) -> str:
        """Append tokens; return the new text that is safe to send (all of it when final)."""
        self.ids += tokens
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            text, final, self.stopped = text[:min(hits)], True, True
        if not final:
            if text.endswith("\ufffd"):
                return ""
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[:len(text) - hold] if hold else text
        if not text.startswith(self.sent):  # decoding changed earlier text: send nothing more mid-stream
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


# ---- requests in: parameters and errors ----------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Params(BaseModel):
    """Fields common to both endpoints; unknown fields are accepted and ignored (clients send many)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampled
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # vLLM's extension
    min_p: float = Field(0.0, ge=0, lt=1)  # vLLM's extension
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end of the answer (load tests)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatParams(_Params):
    messages: list[Message] = Field(min_length=1)


class CompletionParams(_Params):
    prompt: str | list[str] | list[int]


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)


# ---- the app ---------------------------------------------------------------------------------------

class Completion:
    """One request's way through the server: prompt ids -> engine -> text -> OpenAI's JSON or events."""

    def __init__(self, app_state, params: _Params, prompt_ids: list[int], kind: str):
        engine: Engine = app_state.engine
        self.params, self.kind, self.loop = params, kind, app_state.loop
        self.prompt_tokens = n = len(prompt_ids)
        allowed = min(engine.max_model_len - n + 1, app_state.max_tokens_limit)  # prompt + new - 1 <= context
        if allowed < 1:
            raise APIError(400, f"the prompt has {n} tokens; this model's context is {engine.max_model_len} tokens",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        asked = params.max_completion_tokens or params.max_tokens
        if asked is not None and asked > allowed:
            raise APIError(400, f"max_tokens={asked} is too large: at most {allowed} for this {n}-token prompt "
                                f"(context {engine.max_model_len} tokens, server limit {app_state.max_tokens_limit})",
                           param="max_tokens", code="context_length_exceeded")
        try:
            sampling = SamplingConfig(params.temperature, params.top_k, params.top_p, params.min_p)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        stop_ids = () if params.ignore_eos else app_state.stop_ids
        self.request = Request(prompt_ids, asked or min(DEFAULT_MAX_TOKENS, allowed), sampling, stop_ids, params.seed)
        reason = rejection_reason(self.request, engine.max_model_len, engine.batch.blocks if engine.batch else None)
        if reason is not None:  # the engine thread would refuse it: say so now, before any event is sent
            raise APIError(400, reason, param="max_tokens")
        self.text = TextStream(app_state.tokenizer, [params.stop] if isinstance(params.stop, str) else params.stop or [])
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.head = {"id": prefix + uuid.uuid4().hex[:24], "object": "chat.completion" if kind == "chat" else
                     "text_completion", "created": int(time.time()), "model": app_state.model_id}

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as the engine produces tokens; sets finish_reason and completion_tokens."""
        events: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        self.loop.submit(self.request, lambda item: aio.call_soon_threadsafe(events.put_nowait, item))
        try:
            while self.finish_reason is None:
                out = await events.get()
                if isinstance(out, Exception):
                    raise APIError(500, f"the engine failed: {out}", kind="server_error")
                self.completion_tokens += len(out.new_tokens)
                piece = self.text.add(list(out.new_tokens), final=out.finished)
                if out.finished or self.text.stopped:
                    self.finish_reason = "stop" if self.text.stopped else out.finish_reason
                if piece:
                    yield piece
        finally:  # cancelled (the client left) or cut by a stop string: free the slot now
            if self.finish_reason is None or self.text.stopped:
                self.loop.abort(self.request)

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        """choices[0] of a response or of a streamed chunk."""
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not self.params.stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def answer(self, http: HTTPRequest) -> dict | JSONResponse:
        """The whole answer as one JSON object; a client that hangs up first cancels the request."""
        async def collect() -> str:
            return "".join([p async for p in self.pieces()])

        async def until_disconnect() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(until_disconnect())
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()  # raises CancelledError inside pieces(): it aborts the request
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        return {**self.head, "choices": [self.choice(work.result(), self.finish_reason)], "usage": self.usage()}

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events: a chunk per piece of text, the finish reason, usage
        (if stream_options.include_usage), then [DONE]."""
        head = {**self.head, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion"}

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        if self.kind == "chat":
            yield event({**head, "choices": [self.choice(None, None, first=True)]})
        try:
            async for piece in self.pieces():
                yield event({**head, "choices": [self.choice(piece, None)]})
        except APIError as exc:  # the 200 header is gone already: report in the stream
            yield event({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": None}})
            return
        yield event({**head, "choices": [self.choice(None, self.finish_reason)]})
        if self.params.stream_options and self.params.stream_options.include_usage:
            yield event({**head, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    async def respond(self, http: HTTPRequest):
        if not self.params.stream:
            return await self.answer(http)
        return StreamingResponse(self.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(engine: Engine, model_id: str | None = None, max_tokens_limit: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_id`; the engine thread runs while the app does."""
    if engine.tokenizer is None:
        raise ValueError("the engine has no tokenizer: a server turns text into tokens and back")
    model_id = model_id or (engine.info.name if engine.info is not None else "course-engine")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop.start()
        yield
        app.state.loop.stop()

    app = FastAPI(title="Inference Lab engine", lifespan=lifespan)
    app.state.engine, app.state.tokenizer, app.state.model_id = engine, engine.tokenizer, model_id
    app.state.loop = EngineLoop(engine)
    app.state.stop_ids = frozenset(stop_token_ids(engine.tokenizer))
    app.state.max_tokens_limit = max_tokens_limit or engine.max_model_len
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(params: ChatParams, http: HTTPRequest):
        check_model(params.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in params.messages]
        try:
            prompt_ids = chat_input_ids(engine.tokenizer, messages)[0].tolist()
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return await Completion(app.state, params, prompt_ids, "chat").respond(http)

    @app.post("/v1/completions")
    async def completions(params: CompletionParams, http: HTTPRequest):
        check_model(params.model)
        prompt = params.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "this server takes one prompt per request", param="prompt")
            prompt = prompt[0]
        ids = engine.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: it needs at least one token", param="prompt")
        if any(not 0 <= t < engine.model.config.vocab_size for t in ids):
            raise APIError(400, f"token ids must lie in 0..{engine.model.config.vocab_size - 1}", param="prompt")
        return await Completion(app.state, params, ids, "completion").respond(http)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "inference-lab", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if not app.state.loop.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/engine/stats")
    async def stats():
        return await asyncio.wrap_future(app.state.loop.call(engine.stats))

    return app


# ---- running it: blocking, or in a background thread (notebooks) ------------------------------------

class BackgroundServer:
    """uvicorn serving an app in a daemon thread, so a notebook keeps its kernel:

        with BackgroundServer(create_app(engine)) as server:
            run_load(LoadConfig(url=server.url, ...))
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the system picks a free one
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321 (the OpenAI base_url is url + '/v1')."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; return once the server accepts connections."""
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, let uvicorn shut down (which stops the engine thread), join."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self if self.thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(engine: Engine, model_id: str | None = None, port: int = 0,
                        max_tokens_limit: int | None = None, warmup: bool = True) -> BackgroundServer:
    """Start an OpenAI-compatible server on `engine` in a background thread (warmed up first);
    use it as a context manager: `with serve_in_background(engine) as server: ... server.url`."""
    if warmup:
        engine.warmup()
    return BackgroundServer(create_app(engine, model_id, max_tokens_limit), port=port).start()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m course_lib serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="preset name (default: $COURSE_MODEL or smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-kv-cache", action="store_true", help="the naive loop (implies --no-batching)")
    p.add_argument("--no-batching", action="store_true", help="one request at a time")
    p.add_argument("--quant", choices=["int8", "int4"], default=None)
    p.add_argument("--speculative", choices=["lookup", "draft"], default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m course_lib serve`: load the model, build the engine, serve until Ctrl-C."""
    import uvicorn

    from course_lib.models import ModelUnavailableError

    args = parse_args(list(argv or []))
    try:
        config = EngineConfig(kv_cache=not args.no_kv_cache, batching=not (args.no_batching or args.no_kv_cache),
                              quant=args.quant, speculative=args.speculative, max_batch=args.max_batch,
                              max_model_len=args.max_model_len)
        engine = Engine.load(args.model, config, args.device, args.dtype)
    except (ValueError, ModelUnavailableError) as exc:
        print(f"serve: {exc}")
        return 2
    engine.warmup()
    app = create_app(engine, max_tokens_limit=args.max_tokens_limit)
    print(f"serving {app.state.model_id} ({engine.label}) at http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
