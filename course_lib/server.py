"""An OpenAI-compatible server on the course engine. Built in notebooks/08_putting_it_together.ipynb.

    python -m course_lib serve --model smollm2-135m --port 8000 [--speculative lookup] [--quant int8] ...

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, GET /health, and GET /engine/stats (the engine's slots, KV blocks
and counters; not part of the OpenAI API). What a request may ask, and the error shape, are in
course_lib.protocol. Status codes: 400 for malformed JSON, missing, invalid, unknown or unsupported
fields (named in the error); 404 for an unknown model or path; 413 for a body over
--max-request-bytes; 429 with Retry-After when --max-waiting requests already wait for a slot;
500 when the engine failed on this request (only this one); 503 when the engine has stopped
(/health says why); 504 past the per-request deadline (--request-timeout). Errors of requests the
same input would fail again carry `x-should-retry: false`, which the openai client obeys.

Threads: the engine is not thread-safe, so one background thread owns it (EngineLoop) and runs
step() while there is work. Request handlers run on the web server's event loop; they hand
requests to the engine thread through a queue and get their tokens back through a per-request
asyncio queue, filled from the engine thread with call_soon_threadsafe. Many requests in flight
at once are therefore batched by the engine like any other. A client that disconnects cancels
its handler, which aborts its request: its slot and KV blocks are freed at the next step.

Surviving its users: a request's own failure ends only that request (course_lib.engine); a step
that raises anyway fails the requests in flight and resets the engine; an engine thread that dies
fails every waiting handler with a 503 and refuses new requests, so nothing waits forever; and
the engine thread drops any request past its deadline, even one whose client never reads.
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
from dataclasses import dataclass, replace

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from course_lib.engine import Engine, EngineConfig, StepOutput
from course_lib.generation import SamplingConfig, chat_input_ids, stop_token_ids
from course_lib.protocol import (MAX_TOP_LOGPROBS, APIError, ChatParams, CompletionParams, TextStream, _Params,
                                 chat_logprobs, completion_logprobs, unknown_parameters, validation_error)
from course_lib.scheduler import Request

__all__ = ["EngineLoop", "ServerLimits", "TextStream", "create_app", "serve_in_background", "BackgroundServer", "main"]

DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (capped by what the context leaves)
HISTORY_KEPT = 4096  # engine step records kept while serving (the latest, for plots)
NO_PROGRESS_STEPS = 1000  # steps in a row without a token: the engine is stuck, fail what it holds
RETRY_AFTER_S = 1  # what a 429 tells the client to wait


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server; the defaults suit a laptop serving a small model."""

    max_tokens: int | None = None  # largest max_tokens a request may ask (None: what the context leaves)
    max_waiting: int = 32  # requests queued for a slot beyond the engine's own; more get 429
    request_timeout_s: float = 300.0  # per-request deadline, queueing included (0: none)
    max_stop_strings: int = 4  # OpenAI's limit
    max_stop_length: int = 64  # characters per stop string (the stream holds back that many - 1)
    max_request_bytes: int = 1 << 20  # request body; more gets 413

    def __post_init__(self):
        if self.max_waiting < 0 or self.request_timeout_s < 0 or min(self.max_stop_strings, self.max_stop_length,
                                                                     self.max_request_bytes) < 0:
            raise ValueError(f"server limits must be >= 0: {self}")


class EngineStopped(RuntimeError):
    """The engine thread is not running (it died, or the server is stopping): answered with 503."""


class QueueFull(RuntimeError):
    """Too many requests wait already: answered with 429 and Retry-After."""


class DeadlineExceeded(RuntimeError):
    """The request ran past its deadline: answered with 504."""


# ---- the engine thread ---------------------------------------------------------------------------------

class EngineLoop:
    """Owns the engine in one background thread: submit/abort/call from any thread, tokens out
    through a callback (`sink`) per request, called from the engine thread. At most `max_in_flight`
    requests are held at once (running or waiting); each is dropped at its deadline."""

    def __init__(self, engine: Engine, max_in_flight: int | None = None):
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict[int, tuple[Request, Callable, float]] = {}  # request id -> (request, sink, deadline)
        self.thread: threading.Thread | None = None
        self.error: str | None = None  # the last exception a step raised
        self.stopped_because: str | None = None  # why the thread ended (None while it runs)
        self.in_flight = 0  # submitted and not yet finished, aborted or failed (guarded by _lock)
        self._lock = threading.Lock()
        self._closed = False

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
        return self.thread is not None and self.thread.is_alive() and not self._closed

    def submit(self, request: Request, sink: Callable[[StepOutput | Exception], None],
               timeout_s: float | None = None) -> None:
        """Queue a request; sink receives each StepOutput, or an Exception if it cannot be served.
        Raises EngineStopped or QueueFull at once instead of queueing what would never be served."""
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        with self._lock:
            if self._closed or self.thread is None:
                raise EngineStopped(self.stopped_because or "the engine thread is not running")
            if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
                raise QueueFull(f"{self.in_flight} requests are in flight already (the server's limit)")
            self.in_flight += 1
            self.inbox.put(("submit", request, (sink, deadline)))

    def abort(self, request: Request) -> None:
        """Ask the engine thread to drop a request and free its slot and blocks."""
        self.inbox.put(("abort", request, None))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn() in the engine thread between steps (to read engine state safely)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(EngineStopped(self.stopped_because))
            else:
                self.inbox.put(("call", fn, future))
        return future

    # -- inside the engine thread --

    def _run(self) -> None:
        """The supervisor: whatever ends the loop, every handler still waiting is told why."""
        reason = "the server is shutting down"
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a dying thread must still answer its handlers
            reason = f"the engine thread died: {type(exc).__name__}: {exc}"
        finally:
            self._close(reason)

    def _serve(self) -> None:
        idle_steps = 0
        while True:
            block = not self.engine.has_unfinished()  # idle: sleep until something arrives
            try:
                while True:
                    item = self.inbox.get(block=block)
                    block = False
                    if item is None:
                        return
                    self._handle(*item)
            except queue.Empty:
                pass
            self._expire()
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
                idle_steps = 0 if any(o.new_tokens or o.finished for o in outputs) else idle_steps + 1
                if idle_steps >= NO_PROGRESS_STEPS:
                    raise RuntimeError(f"no request made progress in {NO_PROGRESS_STEPS} steps")
            except Exception as exc:  # noqa: BLE001 - a bad step must not take the server down with it
                self.error = f"{type(exc).__name__}: {exc}"
                self._fail_all(exc)
                self.engine.abort_all()
                if self.engine.has_unfinished():
                    raise RuntimeError(f"the engine could not be reset after a failed step ({self.error})") from exc
                idle_steps = 0
                continue
            for out in outputs:
                entry = self.sinks.get(out.request.request_id)
                if out.finished:
                    self._release(out.request.request_id)
                if entry is not None:
                    _deliver(entry[1], out)
            self._trim()

    def _handle(self, kind: str, obj, arg) -> None:
        if kind == "submit":
            sink, deadline = arg
            try:
                added = self.engine.add_request(obj)
            except Exception as exc:  # noqa: BLE001 - this request's problem, not the engine's
                added, obj.finish_reason = False, f"{type(exc).__name__}: {exc}"
            if added:
                self.sinks[obj.request_id] = (obj, sink, deadline)
            else:
                self._release(None)
                _deliver(sink, ValueError(obj.finish_reason))
        elif kind == "abort":
            if self._release(obj.request_id):
                self.engine.abort(obj)
        elif kind == "call":
            try:
                arg.set_result(obj())
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                arg.set_exception(exc)

    def _release(self, request_id: int | None) -> bool:
        """Forget a request's sink (None: one never registered); True if it was held."""
        if request_id is not None and self.sinks.pop(request_id, None) is None:
            return False
        with self._lock:
            self.in_flight -= 1
        return True

    def _expire(self) -> None:
        """Drop the requests past their deadline (their handler may be gone: nobody else would)."""
        now = time.monotonic()
        for request, sink, deadline in [e for e in self.sinks.values() if e[2] < now]:
            self._release(request.request_id)
            self.engine.abort(request)
            _deliver(sink, DeadlineExceeded("the request did not finish within the server's deadline"))

    def _trim(self) -> None:
        """A server runs for days: keep the engine's step records and finished lists bounded."""
        records = [self.engine.history]
        if self.engine.batch is not None:
            records += [self.engine.batch.history, self.engine.batch.kv_samples, self.engine.batch.finished]
        for r in records:
            if len(r) > 2 * HISTORY_KEPT:
                del r[:-HISTORY_KEPT]

    def _fail_all(self, exc: BaseException) -> None:
        for request, sink, _ in list(self.sinks.values()):
            self._release(request.request_id)
            self.engine.abort(request)
            _deliver(sink, exc)

    def _close(self, reason: str) -> None:
        with self._lock:
            self._closed, self.stopped_because = True, reason
        stopped = EngineStopped(reason)
        while True:  # what arrived after the last look, and can no longer be served
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] == "submit":
                self._release(None)
                _deliver(item[2][0], stopped)
            elif item is not None and item[0] == "call":
                item[2].set_exception(stopped)
        self._fail_all(stopped)
        with contextlib.suppress(Exception):
            self.engine.abort_all()


def _deliver(sink: Callable, item) -> None:
    try:
        sink(item)
    except RuntimeError:  # the handler's event loop is gone (server stopping): nobody to tell
        pass


# ---- one request's way through the server -------------------------------------------------------------

NO_RETRY = {"x-should-retry": "false"}  # the same request would fail the same way


class Completion:
    """One request's way through the server: prompt ids -> engine -> text -> OpenAI's JSON or events."""

    def __init__(self, app_state, params: _Params, prompt_ids: list[int], kind: str):
        engine: Engine = app_state.engine
        limits: ServerLimits = app_state.limits
        self.params, self.kind, self.loop, self.limits = params, kind, app_state.loop, limits
        self.tokenizer = app_state.tokenizer
        self.prompt_tokens = n = len(prompt_ids)
        prompt_param = "messages" if kind == "chat" else "prompt"
        max_tokens_limit = limits.max_tokens or engine.max_model_len
        allowed = min(engine.max_model_len - n + 1, max_tokens_limit)  # prompt + new - 1 <= context
        if allowed < 1:
            raise APIError(400, f"the prompt has {n} tokens; this model's context is {engine.max_model_len} tokens",
                           param=prompt_param, code="context_length_exceeded")
        asked = params.max_completion_tokens or params.max_tokens
        if asked is not None and asked > allowed:
            raise APIError(400, f"max_tokens={asked} is too large: at most {allowed} for this {n}-token prompt "
                                f"(context {engine.max_model_len} tokens, server limit {max_tokens_limit})",
                           param="max_tokens", code="context_length_exceeded")
        stop = params.stop_strings
        if len(stop) > limits.max_stop_strings:
            raise APIError(400, f"{len(stop)} stop strings: this server takes at most {limits.max_stop_strings}",
                           param="stop")
        if any(len(s) > limits.max_stop_length for s in stop):
            raise APIError(400, f"a stop string is longer than {limits.max_stop_length} characters", param="stop")
        if params.num_logprobs is not None and params.num_logprobs > MAX_TOP_LOGPROBS[kind]:
            raise APIError(400, f"at most {MAX_TOP_LOGPROBS[kind]} top logprobs", param="logprobs")
        try:
            sampling = SamplingConfig(params.temperature, params.top_k, params.top_p, params.min_p)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        stop_ids = () if params.ignore_eos else app_state.stop_ids
        self.request = Request(prompt_ids, asked or min(DEFAULT_MAX_TOKENS, allowed), sampling, stop_ids, params.seed,
                               presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                               logprobs=params.num_logprobs)
        reason = engine.refusal(self.request)
        if reason is not None:  # the engine thread would refuse it: say so now, before any event is sent
            param = ("max_tokens" if "logprobs" not in reason else "logprobs" if params.num_logprobs is not None
                     else "presence_penalty" if params.presence_penalty else "frequency_penalty")
            raise APIError(400, reason, param=param)
        self.text = TextStream(self.tokenizer, stop)
        self.events_in: asyncio.Queue = asyncio.Queue()
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.head = {"id": prefix + uuid.uuid4().hex[:24], "object": "chat.completion" if kind == "chat" else
                     "text_completion", "created": int(time.time()), "model": app_state.model_id}

    def submit(self) -> None:
        """Hand the request to the engine thread now, before any response is sent (so a full queue or
        a stopped engine is an HTTP status, not an error inside a stream)."""
        aio = asyncio.get_running_loop()
        try:
            self.loop.submit(self.request, lambda item: aio.call_soon_threadsafe(self.events_in.put_nowait, item),
                             self.limits.request_timeout_s or None)
        except QueueFull as exc:
            raise APIError(429, f"the server is at capacity: {exc}; retry later", code="queue_full",
                           kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except EngineStopped as exc:
            raise APIError(503, f"the engine has stopped: {exc}", kind="server_error", code="engine_stopped",
                           headers=NO_RETRY) from exc

    async def pieces(self) -> AsyncIterator[tuple[str, list[int], list]]:
        """(text, token ids, logprobs) as the engine produces tokens; sets finish_reason and
        completion_tokens. Logprobs of tokens whose text is held back travel with the next text."""
        # A backstop for an engine thread that hangs inside a step (its own deadline check cannot run).
        timeout = self.limits.request_timeout_s + 5 if self.limits.request_timeout_s else None
        ids, lps = [], []
        try:
            while self.finish_reason is None:
                try:
                    out = await asyncio.wait_for(self.events_in.get(), timeout)
                except TimeoutError:
                    out = DeadlineExceeded("the engine thread did not answer in time")
                if isinstance(out, Exception):
                    raise _engine_error(out)
                if out.finish_reason == "error":
                    raise APIError(500, f"the engine failed on this request: {out.request.error}", kind="server_error",
                                   code="engine_error", headers=NO_RETRY)
                self.completion_tokens += len(out.new_tokens)
                ids += out.new_tokens
                lps += out.logprobs
                piece = self.text.add(list(out.new_tokens), final=out.finished)
                if out.finished or self.text.stopped:
                    self.finish_reason = "stop" if self.text.stopped else out.finish_reason
                if piece or (ids and self.finish_reason is not None):
                    self.token_ids += ids
                    self.logprobs += lps
                    yield piece, ids, lps
                    ids, lps = [], []
        finally:  # cancelled (the client left), failed or cut by a stop string: free the slot now
            if self.finish_reason is None or self.text.stopped:
                self.loop.abort(self.request)

    def _logprobs(self, ids: list[int], lps: list, offset: int = 0) -> dict | None:
        if self.request.logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": chat_logprobs(self.tokenizer, lps, ids), "refusal": None}
        return completion_logprobs(self.tokenizer, lps, ids, offset)

    def choice(self, text: str | None, finish: str | None, first: bool = False, logprobs: dict | None = None) -> dict:
        """choices[0] of a response or of a streamed chunk."""
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if not self.params.stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def answer(self, http: HTTPRequest) -> dict | JSONResponse:
        """The whole answer as one JSON object; a client that hangs up first cancels the request."""
        async def collect() -> str:
            return "".join([p async for p, _, _ in self.pieces()])

        async def until_disconnect() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(until_disconnect())
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()  # raises CancelledError inside pieces(): it aborts the request
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        text = work.result()  # raises the APIError of a failed request
        return {**self.head, "choices": [self.choice(text, self.finish_reason, logprobs=self._logprobs(
            self.token_ids, self.logprobs))], "usage": self.usage()}

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events: a chunk per piece of text, the finish reason, usage
        (if stream_options.include_usage; in every chunk with continuous_usage_stats), then [DONE]."""
        head = {**self.head, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion"}
        options = self.params.stream_options
        every = options is not None and options.continuous_usage_stats

        def event(payload: dict) -> str:
            if every and payload.get("choices"):
                payload["usage"] = self.usage()
            return f"data: {json.dumps(payload)}\n\n"

        if self.kind == "chat":
            yield event({**head, "choices": [self.choice(None, None, first=True)]})
        offset = 0
        try:
            async for piece, ids, lps in self.pieces():
                yield event({**head, "choices": [self.choice(piece, None, logprobs=self._logprobs(ids, lps, offset))]})
                offset += len(piece)
        except APIError as exc:  # the 200 header is gone already: report in the stream
            yield event(exc.body())
            return
        yield event({**head, "choices": [self.choice(None, self.finish_reason)]})
        if options is not None and options.include_usage:
            yield event({**head, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    async def respond(self, http: HTTPRequest):
        self.submit()
        if not self.params.stream:
            return await self.answer(http)
        return StreamingResponse(self.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _engine_error(exc: Exception) -> APIError:
    """The HTTP error for what the engine thread delivered instead of tokens."""
    if isinstance(exc, EngineStopped):
        return APIError(503, f"the engine has stopped: {exc}", kind="server_error", code="engine_stopped",
                        headers=NO_RETRY)
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, str(exc), kind="server_error", code="timeout")
    if isinstance(exc, ValueError):  # refused by the engine at admission
        return APIError(400, str(exc))
    return APIError(500, f"the engine failed: {type(exc).__name__}: {exc}", kind="server_error", code="engine_error")


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 (declared or streamed in chunks)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = APIError(413, too_large, code="request_too_large", headers=NO_RETRY).response()
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)  # FastAPI passes an HTTPException through as it is
            return message

        return await self.app(scope, limited, send)


# ---- the app ---------------------------------------------------------------------------------------

def create_app(engine: Engine, model_id: str | None = None, max_tokens_limit: int | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_id`; the engine thread runs while the app does."""
    if engine.tokenizer is None:
        raise ValueError("the engine has no tokenizer: a server turns text into tokens and back")
    model_id = model_id or (engine.info.name if engine.info is not None else "course-engine")
    limits = limits or ServerLimits()
    if max_tokens_limit is not None:
        limits = replace(limits, max_tokens=max_tokens_limit)
    slots = engine.config.max_batch if engine.batch is not None else 1

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop.start()
        yield
        app.state.loop.stop()

    app = FastAPI(title="Inference Lab engine", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.state.engine, app.state.tokenizer, app.state.model_id = engine, engine.tokenizer, model_id
    app.state.limits = limits
    app.state.loop = EngineLoop(engine, max_in_flight=slots + limits.max_waiting)
    app.state.stop_ids = frozenset(stop_token_ids(engine.tokenizer))
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        code = {404: "not_found", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):  # a bug: still an OpenAI-shaped answer, not plain text
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(params: ChatParams, http: HTTPRequest):
        check_model(params.model)
        unknown_parameters(params)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in params.messages]
        try:
            prompt_ids = chat_input_ids(engine.tokenizer, messages)[0].tolist()
        except Exception as exc:  # noqa: BLE001 - ValueError from us, TemplateError from the model's template
            raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        return await Completion(app.state, params, prompt_ids, "chat").respond(http)

    @app.post("/v1/completions")
    async def completions(params: CompletionParams, http: HTTPRequest):
        check_model(params.model)
        unknown_parameters(params)
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
        loop = app.state.loop
        if not loop.alive:
            return JSONResponse({"status": "engine stopped", "reason": loop.stopped_because or "not started"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/engine/stats")
    async def stats():
        try:
            return await asyncio.wrap_future(app.state.loop.call(engine.stats))
        except EngineStopped as exc:
            raise _engine_error(exc) from exc

    return app


# ---- running it: blocking, or in a background thread (notebooks) ------------------------------------

class BackgroundServer:
    """uvicorn serving an app in a daemon thread, so a notebook keeps its kernel:

        with BackgroundServer(create_app(engine)) as server:
            run_load(LoadConfig(url=server.url, ...))
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host, self.app = host, app
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
                        max_tokens_limit: int | None = None, warmup: bool = True,
                        limits: ServerLimits | None = None) -> BackgroundServer:
    """Start an OpenAI-compatible server on `engine` in a background thread (warmed up first);
    use it as a context manager: `with serve_in_background(engine) as server: ... server.url`."""
    if warmup:
        engine.warmup()
    return BackgroundServer(create_app(engine, model_id, max_tokens_limit, limits), port=port).start()


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
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt whole in one step (it stalls every running stream meanwhile)")
    p.add_argument("--token-budget", type=int, default=EngineConfig.token_budget,
                   help="tokens per step with chunked prefill (like vLLM's --max-num-batched-tokens; "
                        f"default {EngineConfig.token_budget})")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute every prompt (no sharing of KV blocks between prompts with the same prefix)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    d = ServerLimits()
    p.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help=f"requests queued beyond the engine's slots before 429 + Retry-After (default {d.max_waiting})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help=f"per-request deadline in seconds, queueing included; 0: none (default {d.request_timeout_s:g})")
    p.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help=f"stop strings per request (default {d.max_stop_strings})")
    p.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                   help=f"characters per stop string (default {d.max_stop_length})")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"request body size; larger gets 413 (default {d.max_request_bytes})")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m course_lib serve`: load the model, build the engine, serve until Ctrl-C."""
    import uvicorn

    from course_lib.models import ModelUnavailableError

    args = parse_args(list(argv or []))
    try:
        limits = ServerLimits(args.max_tokens_limit, args.max_waiting, args.request_timeout, args.max_stop_strings,
                              args.max_stop_length, args.max_request_bytes)
        config = EngineConfig(kv_cache=not args.no_kv_cache, batching=not (args.no_batching or args.no_kv_cache),
                              quant=args.quant, speculative=args.speculative, max_batch=args.max_batch,
                              max_model_len=args.max_model_len, chunked_prefill=not args.no_chunked_prefill,
                              token_budget=args.token_budget, prefix_caching=not args.no_prefix_caching)
        engine = Engine.load(args.model, config, args.device, args.dtype)
    except (ValueError, ModelUnavailableError) as exc:
        print(f"serve: {exc}")
        return 2
    engine.warmup()
    app = create_app(engine, limits=limits)
    print(f"serving {app.state.model_id} ({engine.label}) at http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
