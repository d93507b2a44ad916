"""Requests and the continuous-batching scheduler. Built in notebooks/06_batching.ipynb; chunked
prefill and prefix caching in notebooks/09_serving_real_traffic.ipynb.

Continuous (iteration-level) batching decides who runs at every step instead of once per batch:
requests that finished leave at once, and waiting ones take their places in the same step. The
scheduler owns the queues and the KV blocks, never the model. Each running request knows how many
of its tokens already have keys/values in the cache (num_computed); a step feeds each one some of
the rest:
    schedule(budget)  - this step's work, as (request, tokens to feed): first one token for every
                        decoding request, then chunks of the prompts still being prefilled, then
                        newly admitted requests (admit()), until `budget` tokens are taken. With no
                        budget every prompt is prefilled whole in one step (and stalls the decoders
                        for that long); with one, a long prompt is prefilled in chunks over several
                        steps while the others keep decoding: chunked prefill (vLLM's
                        --enable-chunked-prefill with --max-num-batched-tokens);
    admit()           - move waiting requests to running while a slot and enough KV blocks are free;
                        with prefix caching its prompt's cached blocks are shared, not recomputed;
    prepare_decode()  - at the end of a step, reserve the next KV position of every running request;
                        if blocks run out, preempt the newest request (free its blocks, send it back
                        to the front of the queue: it is recomputed later, as vLLM does by default);
    finish()          - retire a request and free its blocks the moment it is done.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from course_lib.generation import SamplingConfig
from course_lib.measure import RequestMetrics
from course_lib.paged_kv import BlockManager

_request_ids = itertools.count()


class RequestStatus(Enum):
    """Where a request is in its life."""

    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV blocks and a batch slot
    FINISHED = "finished"  # hit a stop token or max_new_tokens
    REJECTED = "rejected"  # refused at arrival; `finish_reason` says why


@dataclass(eq=False)
class Request:
    """One generation request: its prompt, its own sampling settings and stop conditions, and its state."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None  # seeds this request's own generator (sampled output then does not depend on batching)
    arrival_time: float | None = None  # time.perf_counter() when it arrived (TTFT counts from here)
    presence_penalty: float = 0.0  # OpenAI's penalties (generation.apply_penalties); batch lane only
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    request_id: int = field(default_factory=lambda: next(_request_ids))
    # state, changed by the engine
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # time.perf_counter() of each output token
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or "rejected: <why>"
    num_preemptions: int = 0
    num_computed: int = 0  # leading tokens whose keys/values are in the KV cache (0 while waiting)
    num_cached_tokens: int = 0  # of those, found in the prefix cache at its (last) admission
    output_logprobs: list = field(default_factory=list)  # per output token: (logprob, [(id, logprob)]) if asked
    error: str | None = None  # why the engine failed this request (finish_reason "error")

    def __post_init__(self):
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.stop_ids = frozenset(self.stop_ids)
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt then output tokens: what the KV cache holds, position by position."""
        return self.prompt_ids + self.output_ids

    @property
    def max_positions(self) -> int:
        """KV positions at full length: prompt + max_new_tokens - 1 (the last token is never fed back)."""
        return len(self.prompt_ids) + self.max_new_tokens - 1

    @property
    def needs_logits(self) -> bool:
        """True when the engine must see this request's logits (penalties, logprobs): batch lane only."""
        return self.logprobs is not None or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def is_done(self) -> bool:
        """True once finished or rejected."""
        return self.status in (RequestStatus.FINISHED, RequestStatus.REJECTED)

    def append_token(self, token: int, now: float) -> bool:
        """Record a new token; return True (and set finish_reason) when it ends the request."""
        self.output_ids.append(int(token))
        self.token_times.append(now)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def metrics(self) -> RequestMetrics:
        """TTFT, ITL and E2E from arrival_time and the token times."""
        if self.arrival_time is None or not self.token_times:
            raise ValueError(f"request {self.request_id} has no arrival time or no tokens yet")
        return RequestMetrics.from_timestamps(self.arrival_time, self.token_times)


def rejection_reason(request: Request, max_model_len: int, block_manager: BlockManager | None = None) -> str | None:
    """Why a request can never be served (None if it can): no tokens asked, empty prompt, too long
    for the model, or more KV blocks than the whole pool has."""
    if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, int) \
            or request.max_new_tokens < 1:
        return f"max_new_tokens must be an integer >= 1, got {request.max_new_tokens!r}: nothing to generate"
    if not request.prompt_ids:
        return "the prompt is empty: it needs at least one token"
    longest = request.max_positions
    if longest > max_model_len:
        return (f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) needs "
                f"{longest} positions; max_model_len is {max_model_len}")
    if block_manager is not None and block_manager.blocks_needed(longest) > block_manager.num_blocks:
        return (f"needs {block_manager.blocks_needed(longest)} KV blocks of {block_manager.block_size} positions "
                f"at full length; the whole pool has {block_manager.num_blocks}: it can never fit")
    return None


def queue_or_reject(request: Request, reason: str | None, waiting: deque, rejected: list) -> bool:
    """Append the request to `waiting`, or, given a reason, mark it REJECTED and list it in `rejected`."""
    if reason is not None:
        request.status, request.finish_reason = RequestStatus.REJECTED, f"rejected: {reason}"
        rejected.append(request)
        return False
    waiting.append(request)
    return True


class Scheduler:
    """Queues and KV blocks for continuous batching: schedule, admit, reserve, preempt, retire."""

    def __init__(self, block_manager: BlockManager, max_batch: int, max_model_len: int):
        if max_batch < 1 or max_model_len < 1:
            raise ValueError(f"need max_batch >= 1 and max_model_len >= 1, got {max_batch}, {max_model_len}")
        self.blocks, self.max_batch, self.max_model_len = block_manager, max_batch, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the first to be preempted
        self.finished: list[Request] = []
        self.rejected: list[Request] = []
        self.admitted: list[Request] = []  # admitted by the latest schedule()

    def add(self, request: Request) -> bool:
        """Queue a request, or reject it (status REJECTED, finish_reason says why); True if queued."""
        if request.status is not RequestStatus.WAITING or request.output_ids:
            raise ValueError(f"request {request.request_id} was already used (status {request.status.value})")
        return queue_or_reject(request, rejection_reason(request, self.max_model_len, self.blocks),
                               self.waiting, self.rejected)

    def has_unfinished(self) -> bool:
        """True while a request waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self, token_budget: int | None = None) -> list[tuple[Request, int]]:
        """This step's work, (request, number of its next tokens to feed), at most token_budget tokens
        in all (None: no limit, every prompt whole): decoding requests first (one token each: they
        never wait behind a prompt), then prompts being prefilled, then new admissions."""
        self._reserve()  # normally a no-op: the previous step's prepare_decode reserved every position
        left = token_budget if token_budget is not None else math.inf
        decoding = [r for r in self.running if r.num_tokens - r.num_computed == 1]
        work = [(r, 1) for r in decoding]
        left -= len(work)
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed > 1]
        self.admitted = self.admit(left - sum(r.num_tokens - r.num_computed for r in prefilling))
        for r in prefilling + self.admitted:
            if left <= 0:
                break
            n = int(min(r.num_tokens - r.num_computed, left))
            work.append((r, n))
            left -= n
        return work

    def admit(self, limit: float = math.inf) -> list[Request]:
        """Move waiting requests (first come, first served) into free slots while their KV blocks fit;
        return them: they need a prefill over prompt + any output kept from a preemption, minus what
        the prefix cache already holds. Admission stops once the admitted requests' uncached tokens
        reach `limit` (the tokens left in the step's budget)."""
        admitted, tokens = [], 0
        while self.waiting and len(self.running) < self.max_batch and tokens < limit:
            request = self.waiting[0]
            ids = request.all_ids
            # The last token is always fed (its logits give the next token): never take it from the cache.
            prefix = self.blocks.match_prefix(ids[:-1])
            # room for the prompt (+ kept output) and for its next token, unless that one is its last
            if not self.blocks.can_allocate(min(request.num_tokens + 1, request.max_positions), prefix):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(request.request_id, request.num_tokens, prefix, ids)
            request.num_computed = request.num_cached_tokens = len(prefix) * self.blocks.block_size
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            tokens += request.num_tokens - request.num_computed
        return admitted

    def prepare_decode(self) -> list[Request]:
        """Reserve KV positions for every running request's tokens (its newest one is fed next),
        preempting the newest ones when blocks run out; return the requests that will decode next,
        in admission order. Called at the end of each step."""
        self._reserve()
        return [r for r in self.running if r.num_tokens - r.num_computed == 1]

    def _reserve(self) -> None:
        for request in list(self.running):
            while request.status is RequestStatus.RUNNING and self.blocks.num_tokens[request.request_id] < request.num_tokens:
                if self.blocks.can_append(request.request_id):
                    self.blocks.append_slot(request.request_id)
                else:
                    self.preempt(self.running[-1])  # the newest: it has the least work to redo

    def preempt(self, request: Request) -> None:
        """Free a running request's blocks and put it back at the front of the queue (recompute later;
        with prefix caching its full blocks stay cached, so the recompute mostly hits)."""
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        request.num_computed = 0
        self.waiting.appendleft(request)

    def abort(self, request: Request) -> bool:
        """Drop a waiting or running request (its client went away): free its blocks and slot at once.
        The request is not listed as finished; False if the scheduler does not hold it."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
            self.blocks.free(request.request_id)
        else:
            return False
        request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
        return True

    def resume(self, request: Request) -> None:
        """Queue, at the front, a request that already has output (e.g. one that decoded elsewhere):
        admission prefills its prompt + output, exactly as after a preemption."""
        if request in self.waiting or request in self.running:
            raise ValueError(f"request {request.request_id} is already scheduled")
        request.status = RequestStatus.WAITING
        request.num_computed = 0
        self.waiting.appendleft(request)

    def fail(self, request: Request, error: str) -> None:
        """Retire a running request whose own forward or sampling failed (finish_reason "error")."""
        request.finish_reason, request.error = "error", error
        self.finish(request)

    def abort_all(self) -> list[Request]:
        """Drop every waiting and running request and free all their blocks; return them."""
        dropped = list(self.waiting) + list(self.running)
        for request in dropped:
            self.abort(request)
        return dropped

    def finish(self, request: Request) -> None:
        """Retire a running request at once: free its blocks and its slot."""
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED
        self.finished.append(request)
