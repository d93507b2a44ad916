"""One engine with every technique, each switchable. Built in notebooks/08_putting_it_together.ipynb.

The engine composes the earlier modules; it copies none of them:
    kv_cache=False            generation.stream_naive: the whole sequence recomputed per token (01)
    kv_cache=True             kv_cache.stream_cached, or the paged cache when batching (04, 06)
    quant="int8" / "int4"     quant.quantize_model on the engine's own copy of the weights (05)
    batching=True             batch_engine.ContinuousBatchEngine: admit, prefill, decode, retire (06)
      chunked_prefill=True    ... at most token_budget tokens per step: long prompts in chunks (09)
      prefix_caching=True     ... full KV blocks shared between prompts that start alike (09)
    speculative="lookup"/"draft"  speculative.stream_speculative with PromptLookup / DraftProposer (07)
Requests are scheduler.Request objects. The engine has the batch engines' interface (add_request,
step, has_unfinished, history), so workload.replay drives it like them, and step() also says which
requests got which tokens, so a server thread can stream them.

The one rule that joins speculation and batching: a verify pass checks the guesses of one sequence,
so speculation runs only while the engine holds a single request. A request that arrives at an
idle engine decodes speculatively; when a second one arrives, the first joins the continuous batch
the way a preempted request comes back (its prompt and output so far are prefilled into paged
blocks) and from then on every request decodes batched. Greedy output does not change: both paths
emit the target's argmax at every position. Requests that need the logits themselves (logprobs,
presence/frequency penalties) always take the batch lane, whose step computes them.

A failure stays with its request: a solo request whose stream raises ends with finish_reason
"error" (and Request.error), the batch engine retires only the requests that fail alone, and a
step that raises anyway leaves no finished request behind in the engine's books.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from course_lib.batch_engine import ContinuousBatchEngine, StepRecord
from course_lib.generation import SamplingConfig, stream_naive
from course_lib.kv_cache import stream_cached
from course_lib.quant import INT4, INT8, QuantLinear, quantize_model
from course_lib.scheduler import Request, RequestStatus, rejection_reason
from course_lib.speculative import DRAFT_GAMMA, LOOKUP_GAMMA, LOOKUP_NGRAM, DraftProposer, PromptLookup, SpecStats, stream_speculative
from course_lib.transformer import Transformer

QUANT_SCHEMES = {"int8": INT8, "int4": INT4}
SPECULATIVE = ("lookup", "draft")


@dataclass(frozen=True)
class EngineConfig:
    """Which techniques the engine uses, and its capacity."""

    kv_cache: bool = True  # False: the naive loop (one request at a time, no batching, no speculation)
    quant: str | None = None  # None (the model's dtype), "int8" or "int4" weights (course_lib.quant)
    batching: bool = True  # continuous batching over a paged KV cache; False: one request at a time
    speculative: str | None = None  # None, "lookup" (prompt lookup) or "draft" (a draft model)
    gamma: int | None = None  # guesses per target call; None: notebook 07's choice for the proposer
    max_batch: int = 8  # requests decoded together (batching only)
    block_size: int = 16  # positions per KV block (batching only)
    num_blocks: int | None = None  # KV blocks in the pool; None: max_batch sequences of max_model_len
    max_model_len: int = 1024  # longest prompt + output a request may need (capped by the model)
    chunked_prefill: bool = True  # at most token_budget tokens per step (batching only); see notebook 09
    token_budget: int = 256  # tokens per step with chunked prefill (vLLM's --max-num-batched-tokens); 256
                             # measured on the 2-core CPU as the balance of ITL and throughput (notebook 09)
    prefix_caching: bool = True  # share full KV blocks between prompts with the same prefix (batching only)

    def __post_init__(self):
        if self.quant not in (None, *QUANT_SCHEMES):
            raise ValueError(f"quant must be None, 'int8' or 'int4', got {self.quant!r}")
        if self.speculative not in (None, *SPECULATIVE):
            raise ValueError(f"speculative must be None, 'lookup' or 'draft', got {self.speculative!r}")
        if not self.kv_cache and (self.batching or self.speculative):
            raise ValueError("kv_cache=False is the naive loop: batching and speculative decoding both need "
                             "the KV cache (pass batching=False, speculative=None)")
        if self.gamma is not None and (isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1):
            raise ValueError(f"gamma must be None or an integer >= 1, got {self.gamma!r}")
        if min(self.max_batch, self.block_size, self.max_model_len, self.num_blocks or 1) < 1:
            raise ValueError("max_batch, block_size, num_blocks and max_model_len must be >= 1")
        if self.chunked_prefill and self.token_budget < self.max_batch:
            raise ValueError(f"token_budget ({self.token_budget}) must be >= max_batch ({self.max_batch}): each "
                             "running request decodes one token per step, and prompts need room beside them")

    @property
    def spec_gamma(self) -> int:
        """Guesses per target call: gamma, else DRAFT_GAMMA or LOOKUP_GAMMA from notebook 07."""
        return self.gamma or (DRAFT_GAMMA if self.speculative == "draft" else LOOKUP_GAMMA)

    @property
    def label(self) -> str:
        """Short name for tables, e.g. 'kv cache + int8 + batching + prompt lookup'."""
        parts = ["kv cache" if self.kv_cache else "naive loop"]
        parts += [self.quant] if self.quant else []
        parts += ["batching"] if self.batching else []
        parts += [{"lookup": "prompt lookup", "draft": "draft model"}[self.speculative]] if self.speculative else []
        return " + ".join(parts)


@dataclass(frozen=True)
class StepOutput:
    """Tokens one request received in one engine step."""

    request: Request
    new_tokens: tuple[int, ...]
    finished: bool
    finish_reason: str | None  # "stop", "length", "error" (request.error says why) or "abort", once finished
    logprobs: tuple = ()  # per new token (logprob, [(id, logprob)]) when the request asked for logprobs


class Engine:
    """Serves Requests with the techniques EngineConfig switches on. Not thread-safe: one thread
    calls add_request/abort/step (course_lib.server runs it in a background thread)."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), *, draft=None, tokenizer=None, info=None,
                 label: str = ""):
        target = model if isinstance(model, Transformer) else Transformer.from_hf(model)  # from_hf copies
        if config.quant and not any(isinstance(m, QuantLinear) for m in target.modules()):
            # Quantization swaps layers in place: work on a copy so the caller's model stays float.
            target = quantize_model(copy.deepcopy(target) if target is model else target, QUANT_SCHEMES[config.quant])
        if config.speculative == "draft" and draft is None:
            raise ValueError("speculative='draft' needs a draft model: pass draft=, or use Engine.load(name, config)")
        self.model, self.draft, self.tokenizer, self.config = target, draft, tokenizer, config
        self.info = info  # models.ModelInfo when loaded by Engine.load
        self.label = label or (f"{config.label}, {info.label}" if info is not None else config.label)
        self.device = next(target.parameters()).device
        self.max_model_len = min(config.max_model_len, target.config.max_position)
        self.batch: ContinuousBatchEngine | None = None
        if config.batching:
            num_blocks = config.num_blocks or config.max_batch * -(-self.max_model_len // config.block_size)
            self.batch = ContinuousBatchEngine(target, num_blocks, config.block_size, config.max_batch,
                                               self.max_model_len,
                                               token_budget=config.token_budget if config.chunked_prefill else None,
                                               prefix_caching=config.prefix_caching)
        self.solo_queue: deque[Request] = deque()  # one-at-a-time lane (no batching, or speculation)
        self.current: Request | None = None  # the request the solo lane is running
        self._stream: Iterator[tuple[int, float]] | None = None
        self._spec: SpecStats | None = None
        self.in_batch: dict[int, Request] = {}  # request id -> request, for those in the batch lane
        self.history: list[StepRecord] = []  # one record per step, as the batch engines keep
        self.counters = {"steps": 0, "finished": 0, "failed": 0, "aborted": 0, "rejected": 0, "output_tokens": 0,
                         "joined_batch": 0, "spec_target_calls": 0, "spec_proposed": 0, "spec_accepted": 0}

    @classmethod
    def load(cls, name: str | None = None, config: EngineConfig = EngineConfig(), device=None, dtype=None) -> Engine:
        """Load a preset (course_lib.models) into an engine; speculative='draft' loads its draft pair."""
        from course_lib.draft import draft_for
        from course_lib.models import load_model

        hf, tokenizer, info = load_model(name, device, dtype)
        target = Transformer.from_hf(hf)
        del hf
        draft = draft_for(target, info.name) if config.speculative == "draft" else None  # before quantizing:
        if config.quant:  # the draft borrows the float embedding, which quantize_model keeps
            quantize_model(target, QUANT_SCHEMES[config.quant])
        return cls(target, config, draft=draft, tokenizer=tokenizer, info=info)

    # ---- requests in and out -----------------------------------------------------------------------

    def add_request(self, request: Request) -> bool:
        """Queue a request (arrival time defaults to now); False if rejected (finish_reason says why)."""
        queued = request is self.current or request in self.solo_queue or request.request_id in self.in_batch
        if queued or request.status is not RequestStatus.WAITING or request.output_ids:
            raise ValueError(f"request {request.request_id} was already used (status {request.status.value})")
        if request.arrival_time is None:
            request.arrival_time = time.perf_counter()
        reason = self.refusal(request)
        if reason is not None:
            request.status, request.finish_reason = RequestStatus.REJECTED, f"rejected: {reason}"
            self.counters["rejected"] += 1
            return False
        if self.batch is None or (self.config.speculative and self._idle() and not request.needs_logits):
            self.solo_queue.append(request)  # one at a time; with batching, only at an idle engine
            return True
        if self.current is not None or self.solo_queue:  # a second request: speculation ends here
            self._join_batch()
        if not self.batch.add_request(request):
            return False
        self.in_batch[request.request_id] = request
        return True

    def refusal(self, request: Request) -> str | None:
        """Why this engine can never serve the request (None if it can); reads no changing state."""
        reason = rejection_reason(request, self.max_model_len, self.batch.blocks if self.batch else None)
        if reason is None and request.needs_logits and self.batch is None:
            reason = "logprobs and presence/frequency penalties need the batching engine (this one runs " \
                     f"{self.config.label})"
        return reason

    def abort(self, request: Request) -> bool:
        """Stop a request now (a client went away) and free its slot and KV blocks; False if already done."""
        if request.is_done:
            return False
        if request is self.current:
            self._close_solo()
        elif request in self.solo_queue:
            self.solo_queue.remove(request)
        elif self.in_batch.pop(request.request_id, None) is not None:
            self.batch.scheduler.abort(request)  # frees its blocks and its slot at once
        else:
            return False
        request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
        self.counters["aborted"] += 1
        return True

    def abort_all(self) -> list[Request]:
        """Drop every request (after a step that raised): free every slot and KV block; return them."""
        dropped = [r for r in [self.current, *self.solo_queue, *self.in_batch.values()] if r is not None and not r.is_done]
        if self._stream is not None:
            self._close_solo()
        self.current = None
        self.solo_queue.clear()
        self.in_batch.clear()
        if self.batch is not None:
            self.batch.scheduler.abort_all()
        for r in dropped:
            r.status, r.finish_reason = RequestStatus.FINISHED, "abort"
        self.counters["aborted"] += len(dropped)
        return dropped

    def has_unfinished(self) -> bool:
        """True while a request waits or runs."""
        return self.current is not None or bool(self.solo_queue) or bool(self.in_batch)

    def _idle(self) -> bool:
        return not self.has_unfinished()

    # ---- one step of work --------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One unit of work: a batched engine step, or one token (one target call when speculating)
        of the solo request. Returns the tokens each request received."""
        self.counters["steps"] += 1
        if self.current is not None or self.solo_queue:
            out = self._solo_step()
        elif self.in_batch:
            out = self._batch_step()
        else:
            out = []
        for o in out:
            self.counters["output_tokens"] += len(o.new_tokens)
            self.counters["failed" if o.finish_reason == "error" else "finished"] += o.finished
        return out

    def _start_solo(self, r: Request) -> None:
        ids = torch.tensor([r.prompt_ids], device=self.device)  # (1, T)
        r.status = RequestStatus.RUNNING
        if not self.config.kv_cache:
            self._stream = stream_naive(self.model, ids, r.max_new_tokens, r.sampling, r.stop_ids, r.generator)
        elif self.config.speculative:
            proposer = (PromptLookup(*LOOKUP_NGRAM) if self.config.speculative == "lookup"
                        else DraftProposer(self.draft, r.sampling, r.generator))
            self._spec = SpecStats()
            self._stream = stream_speculative(self.model, ids, r.max_new_tokens, proposer, self.config.spec_gamma,
                                              r.sampling, r.stop_ids, r.generator, self._spec)
        else:
            self._stream = stream_cached(self.model, ids, r.max_new_tokens, r.sampling, r.stop_ids, r.generator)
        self.current = r

    def _solo_step(self) -> list[StepOutput]:
        r, new = self.current or self.solo_queue[0], []
        prefill_tokens = 0 if r.output_ids else len(r.prompt_ids)  # the first call runs the prefill
        try:
            if self.current is None:
                self._start_solo(self.solo_queue.popleft())
            while True:
                token, when = next(self._stream)  # StopIteration too means the stream broke its promise
                new.append(token)
                done = r.append_token(token, when)
                # One target call emits up to gamma + 1 tokens at once: take every one already computed.
                if done or self._spec is None or len(r.output_ids) >= self._spec.new_tokens:
                    break
        except Exception as exc:  # noqa: BLE001 - the solo request's own failure: it ends, the engine goes on
            if self.current is r:
                self._close_solo()
            r.status, r.finish_reason, r.error = RequestStatus.FINISHED, "error", f"{type(exc).__name__}: {exc}"
            self.history.append(StepRecord(time.perf_counter(), len(self.solo_queue), 0, 0, 0, len(new)))
            return [StepOutput(r, tuple(new), True, "error")]
        if done:
            self._finish_solo(r)
        self.history.append(StepRecord(time.perf_counter(), len(self.solo_queue), int(not done),
                                       0 if prefill_tokens else 1, prefill_tokens, len(new)))
        return [StepOutput(r, tuple(new), done, r.finish_reason)]

    def _finish_solo(self, r: Request) -> None:
        self._close_solo()
        r.status = RequestStatus.FINISHED

    def _close_solo(self) -> None:
        """End the solo lane's stream (its contiguous KV cache goes with it); keep its speculation counts."""
        if self._stream is not None:
            self._stream.close()
        if self._spec is not None:
            self.counters["spec_target_calls"] += self._spec.target_calls
            self.counters["spec_proposed"] += sum(self._spec.proposed)
            self.counters["spec_accepted"] += sum(self._spec.accepted)
        self.current, self._stream, self._spec = None, None, None

    def _join_batch(self) -> None:
        """Move the solo lane's request (running or queued) into the continuous batch."""
        r = self.current or self.solo_queue.popleft()
        if self.current is not None:
            self._close_solo()
            self.counters["joined_batch"] += 1
        self.in_batch[r.request_id] = r
        if not r.output_ids:
            self.batch.add_request(r)  # checked against the same pool at submit: it fits
            return
        # It comes back like a preempted request: WAITING, at the front of the queue, with its output
        # kept; admission prefills prompt + output into paged blocks and decoding carries on from there.
        self.batch.scheduler.resume(r)

    def _batch_step(self) -> list[StepOutput]:
        before = {rid: len(r.output_ids) for rid, r in self.in_batch.items()}
        try:
            self.batch.step()
        finally:  # even if the step raised: a request it finished must not stay in_batch (abort refuses
            out = []  # done requests, so it would never leave, and has_unfinished() would stay True)
            for rid, n in before.items():
                r = self.in_batch[rid]
                if len(r.output_ids) > n or r.is_done:
                    out.append(StepOutput(r, tuple(r.output_ids[n:]), r.is_done, r.finish_reason,
                                          tuple(r.output_logprobs[n:]) if r.logprobs is not None else ()))
                if r.is_done:
                    del self.in_batch[rid]
        self.history.append(self.batch.history[-1])
        return out

    # ---- convenience and accounting ----------------------------------------------------------------

    def generate_many(self, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int | Sequence[int],
                      sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                      seeds: Sequence[int | None] | None = None) -> list[list[int]]:
        """Submit every prompt at once, step until all are done; return each one's new token ids."""
        n = len(prompts)
        max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        seeds = list(seeds) if seeds is not None else [None] * n
        requests = [Request(p.view(-1).tolist() if isinstance(p, torch.Tensor) else list(p), m, sampling,
                            frozenset(stop_ids), seed=s) for p, m, s in zip(prompts, max_new, seeds)]
        for r in requests:
            if not self.add_request(r):
                raise ValueError(r.finish_reason)
        while self.has_unfinished():
            self.step()
        return [r.output_ids for r in requests]

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                 seed: int | None = None) -> list[int]:
        """One request, run to completion on this engine."""
        return self.generate_many([prompt_ids], max_new_tokens, sampling, stop_ids, [seed])[0]

    def warmup(self, new_tokens: int = 4) -> None:
        """Serve one short request and forget it: first calls pay one-time costs (allocations, kernel
        selection) that should not land on the first real request. The engine must be idle."""
        if self.has_unfinished():
            raise RuntimeError("warmup() needs an idle engine")
        counters = dict(self.counters)
        self.generate(list(range(1, 9)), new_tokens)
        self.counters = counters

    def stats(self) -> dict:
        """Occupancy now (running, waiting, free slots and KV blocks) and counters since the start."""
        running = (self.current is not None) + (len(self.batch.scheduler.running) if self.batch else 0)
        waiting = len(self.solo_queue) + (len(self.batch.scheduler.waiting) if self.batch else 0)
        slots = self.config.max_batch if self.batch else 1
        out = {"engine": self.label, "running": running, "waiting": waiting, "slots": slots,
               "free_slots": slots - running, **self.counters}
        if self.batch is not None:
            blocks = self.batch.blocks
            try:
                blocks.check()
                consistent = True
            except AssertionError:
                consistent = False
            out.update(kv_blocks_total=blocks.num_blocks, kv_blocks_free=blocks.num_free,
                       kv_block_size=blocks.block_size, kv_blocks_consistent=consistent,
                       token_budget=self.batch.token_budget, prefix_caching=blocks.enable_caching,
                       prefix_cache_hit_rate=blocks.hit_rate, prefix_cache_hit_tokens=blocks.hit_tokens,
                       prefix_cache_query_tokens=blocks.query_tokens, kv_blocks_cached=len(blocks.cached))
        return out
