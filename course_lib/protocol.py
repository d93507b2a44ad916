"""OpenAI's wire format for the course server: parameters, errors, text and logprobs out. Built in notebooks/08_putting_it_together.ipynb.

What a request may ask, and what the server does with it (course_lib.server serves it):
    implemented    model, messages / prompt, max_tokens (max_completion_tokens), temperature, top_p,
                   seed, stop, stream, stream_options (include_usage; vLLM's continuous_usage_stats),
                   presence_penalty, frequency_penalty, logprobs + top_logprobs (chat) or logprobs
                   (completions), n=1; vLLM's extensions top_k, min_p, ignore_eos.
    ignored        user, metadata, store, service_tier, safety_identifier, prompt_cache_key: labels
                   for the provider's bookkeeping that never change the answer.
    refused (400)  every other parameter, named in the error: tools, response_format, logit_bias,
                   echo, best_of, suffix, ... (UNSUPPORTED lists those a client may send with a value
                   that means "not used", such as "tools": [] or "echo": false; those pass).
Errors are {"error": {"message", "type", "param", "code"}}, as OpenAI sends them.
"""

from __future__ import annotations

from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes; OpenAI's seed is an int64
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits
MAX_PENDING_TOKENS = 16  # tokens a stream holds back for an incomplete character before it gives up

# Labels for the provider's bookkeeping: accepted and ignored, since they never change the answer.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
# OpenAI (and vLLM) parameters this server does not implement, with the values that mean "not used":
# a client may send those; any other value is refused with a 400 that names the parameter.
UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "verbosity": (None,), "min_tokens": (None, 0),
    "repetition_penalty": (None, 1, 1.0), "use_beam_search": (None, False), "prompt_logprobs": (None,),
}


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first complaint about a request body, as a 400 naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    where = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown parameter {where!r}", param=where, code="unknown_parameter")
    return APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage so far in every chunk


class _Params(BaseModel):
    """Fields common to both endpoints; other fields are checked by unknown_parameters()."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampled
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # vLLM's extension
    min_p: float = Field(0.0, ge=0, lt=1)  # vLLM's extension
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end of the answer (load tests)

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Fields an assistant message comes back with from the openai client (model_dump()) are let
    # through when empty; unknown_parameters() refuses them with a value.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatParams(_Params):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS["chat"])

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionParams(_Params):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS["completion"])

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def unknown_parameters(params: _Params) -> None:
    """Refuse, with a 400 naming it, any parameter the server would otherwise silently ignore."""
    for name, value in (params.model_extra or {}).items():
        if name in IGNORED or (name in UNSUPPORTED and value in UNSUPPORTED[name]):
            continue
        if name in UNSUPPORTED:
            raise APIError(400, f"{name!r} is not supported by this server (got {value!r})", param=name,
                           code="unsupported_parameter")
        raise APIError(400, f"unknown parameter {name!r}", param=name, code="unknown_parameter")
    if isinstance(params, ChatParams):
        if params.top_logprobs is not None and not params.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for i, m in enumerate(params.messages):
            for name, value in (m.model_extra or {}).items():
                if value not in (None, [], ""):
                    raise APIError(400, f"messages[{i}].{name} is not supported by this server", param=f"messages.{i}.{name}",
                                   code="unsupported_parameter")


# ---- text out: detokenizing a stream ---------------------------------------------------------------

class TextStream:
    """Token ids -> text pieces, in time linear in the output. Each add() decodes only a short window
    (the tokens since the one-before-last piece: a tokenizer that drops a leading space still sees
    its context), as vLLM and TGI do. Text is held back while the window ends in an incomplete UTF-8
    character (decoded as U+FFFD; at most MAX_PENDING_TOKENS tokens) or could be the start of a stop
    string; final=True hands out everything held back, reconciled with one full decode."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)  # chars that could begin a stop string
        self.ids: list[int] = []
        self.prefix_offset = 0  # the decode window starts here
        self.read_offset = 0  # tokens before this one are in the text already
        self.pending = ""  # decoded text not handed out yet (the stop-string hold-back)
        self.sent: list[str] = []  # pieces handed out
        self.stopped = False  # a stop string was found: the text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, tokens: list[int], final: bool = False) -> str:
        """Append tokens; return the new text that is safe to send (all that is left when final)."""
        if self.stopped:  # the text ended at a stop string: tokens after it are not part of it
            return ""
        self.ids += tokens
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        give_up = len(self.ids) - self.read_offset > MAX_PENDING_TOKENS  # not a character in the making
        if len(new_text) > len(prefix_text) and (final or give_up or not new_text.endswith("\ufffd")):
            self.pending += new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # Only `pending` can hold a stop string: everything sent was checked with `hold` chars after it.
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.pending, final, self.stopped = self.pending[:min(hits)], True, True
        if final and not self.stopped:
            self.pending = self._reconcile()
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        if piece:
            self.sent.append(piece)
        return piece

    def _reconcile(self) -> str:
        """What is left to send at the end: the full decode past what was sent (one O(n) decode). If
        the tokenizer rewrote earlier text after it was sent, send the full text from where the two
        part, so no character of the answer is lost."""
        full, sent = self._decode(self.ids), "".join(self.sent)
        if full.startswith(sent):
            return full[len(sent):]
        common = next((i for i, (a, b) in enumerate(zip(full, sent)) if a != b), min(len(full), len(sent)))
        return full[common:]

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        return "".join(self.sent)


# ---- logprobs out: OpenAI's two shapes ----------------------------------------------------------

def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, entries: list[tuple[float, list[tuple[int, float]]]], token_ids: list[int]) -> list[dict]:
    """choices[].logprobs.content for chat: one entry per token, with its top alternatives."""
    def one(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, (lp, top) in zip(token_ids, entries)]


def completion_logprobs(tokenizer, entries: list[tuple[float, list[tuple[int, float]]]], token_ids: list[int],
                        offset: int = 0) -> dict:
    """choices[].logprobs for completions: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in top} for _, top in entries],
            "text_offset": offsets}
