"""Static and continuous batching engines behind one interface. Built in notebooks/06_batching.ipynb.

Both engines take Request objects as they arrive (add_request) and do one step of work per call
(step), so one driver (course_lib.workload.replay) can feed them the same workload:
    StaticBatchEngine      - when idle, take up to max_batch waiting requests (optionally waiting up
                             to max_wait_s for more), run them as one StaticBatch until the longest
                             is done; arrivals meanwhile wait for the next batch.
    ContinuousBatchEngine  - every step: admit waiting requests into free slots, prefill them, run one
                             decode step for every running request, retire the finished at once.
                             Keys/values live in a PagedKVCache: attention really reads them through
                             the block tables that the scheduler's BlockManager hands out.

A server batches strangers, so one request's failure must stay its own: the continuous engine
samples each row apart (batching.sample_each_row), and a forward that raises is run again one
request at a time, so only the request that fails alone is retired, with finish_reason "error".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from course_lib.batching import StaticBatch, pad_batch, sample_each_row
from course_lib.env import synchronize
from course_lib.generation import apply_penalties, token_logprobs
from course_lib.paged_kv import BlockManager, KVSample, PagedKVCache
from course_lib.scheduler import Request, RequestStatus, Scheduler, queue_or_reject, rejection_reason

# Shape letters: B batch (requests in one forward), T tokens, V vocabulary.


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did, for queue-length and throughput plots."""

    time: float  # time.perf_counter() at the end of the step
    waiting: int  # requests queued after the step
    running: int  # unfinished requests holding a batch slot after the step
    batch_rows: int  # rows in the step's decode forward (static batching counts idle rows too)
    prefill_tokens: int  # prompt tokens prefilled in the step (padding excluded)
    new_tokens: int  # output tokens produced in the step


class StaticBatchEngine:
    """Static batching: one batch at a time, run to the end of its longest request."""

    def __init__(self, model, max_batch: int = 8, max_model_len: int | None = None, max_wait_s: float = 0.0,
                 pad_id: int = 0):
        self.model, self.max_batch, self.max_wait_s, self.pad_id = model, max_batch, max_wait_s, pad_id
        self.max_model_len = max_model_len or model.config.max_position
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.batch: StaticBatch | None = None
        self.batch_requests: list[Request] = []
        self.finished: list[Request] = []
        self.rejected: list[Request] = []
        self.history: list[StepRecord] = []

    def add_request(self, request: Request) -> bool:
        """Queue a request (its arrival time defaults to now), or reject it with a reason; True if queued."""
        if request.arrival_time is None:
            request.arrival_time = time.perf_counter()
        reason = rejection_reason(request, self.max_model_len)
        if reason is None and request.needs_logits:
            reason = "the static engine samples without penalties and returns no logprobs"
        return queue_or_reject(request, reason, self.waiting, self.rejected)

    def has_unfinished(self) -> bool:
        """True while a request waits or a batch runs."""
        return bool(self.waiting) or self.batch is not None

    def _start_batch(self) -> bool:
        oldest_wait = time.perf_counter() - self.waiting[0].arrival_time
        if len(self.waiting) < self.max_batch and oldest_wait < self.max_wait_s:
            time.sleep(min(0.002, self.max_wait_s - oldest_wait))  # let more requests arrive
            return False
        take = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
        self.batch = StaticBatch(self.model, [r.prompt_ids for r in take], [r.max_new_tokens for r in take],
                                 [r.sampling for r in take], [r.stop_ids for r in take],
                                 [r.generator for r in take], self.pad_id)
        self.batch_requests = take
        for r in take:
            r.status = RequestStatus.RUNNING
        return True

    def step(self) -> list[Request]:
        """One forward of the current batch (starting a new batch if none runs); return the requests
        that finished in it."""
        if self.batch is None and (not self.waiting or not self._start_batch()):
            return []
        prefill = self.batch.steps == 0
        rows = len(self.batch_requests)
        newly = self.batch.step()
        new_tokens = 0
        for i, r in enumerate(self.batch_requests):  # a step adds at most one token per row
            if len(self.batch.outputs[i]) > len(r.output_ids):
                r.append_token(self.batch.outputs[i][-1], self.batch.token_times[i][-1])
                new_tokens += 1
        done = [self.batch_requests[i] for i in newly]
        for r in done:
            r.status = RequestStatus.FINISHED
            self.finished.append(r)
        running = sum(not f for f in self.batch.finished)
        prefill_tokens = sum(self.batch.lengths) if prefill else 0
        if self.batch.done:
            self.batch, self.batch_requests = None, []
        self.history.append(StepRecord(time.perf_counter(), len(self.waiting), running, 0 if prefill else rows,
                                       prefill_tokens, new_tokens))
        return done


class ContinuousBatchEngine:
    """Continuous batching over a paged KV cache: admit, prefill, decode, retire at every step."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_batch: int = 8,
                 max_model_len: int | None = None, pad_id: int = 0):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len or model.config.max_position
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_batch, self.max_model_len)
        self.history: list[StepRecord] = []
        self.kv_samples: list[KVSample] = []

    def add_request(self, request: Request) -> bool:
        """Queue a request (its arrival time defaults to now), or reject it with a reason; True if queued."""
        if request.arrival_time is None:
            request.arrival_time = time.perf_counter()
        return self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        """True while a request waits or runs."""
        return self.scheduler.has_unfinished()

    @property
    def finished(self) -> list[Request]:
        return self.scheduler.finished

    @property
    def rejected(self) -> list[Request]:
        return self.scheduler.rejected

    def step(self) -> list[Request]:
        """Schedule (admit waiting requests, reserve a KV position for each running one) -> run (prefill
        the admitted, decode the running) -> postprocess (append tokens, retire the finished and the
        failed); return the requests that ended in this step."""
        done, prefill_tokens, new_tokens = [], 0, 0
        admitted = self.scheduler.admit()
        if admitted:
            prefill_tokens = sum(r.num_tokens for r in admitted)
            results = self._run(admitted, prefill=True)
            new_tokens += sum(not isinstance(token, Exception) for token, _ in results)
            done += self._postprocess(admitted, results)
        decoding = self.scheduler.prepare_decode()
        if decoding:
            results = self._run(decoding, prefill=False)
            new_tokens += sum(not isinstance(token, Exception) for token, _ in results)
            done += self._postprocess(decoding, results)
        self._record(len(decoding), prefill_tokens, new_tokens)
        return done

    def _run(self, requests: list[Request], prefill: bool) -> list[tuple[int | Exception, tuple | None]]:
        """One batched forward and the sampling of every row: (token or the row's error, logprobs).
        A forward that raises runs again one request at a time; only a request that fails alone
        gets the error (KV writes are idempotent: the retry writes the same values at the same slots)."""
        try:
            logits = self._logits(requests, prefill)  # (B, V)
        except Exception as exc:  # noqa: BLE001 - whose fault is it? ask each request alone
            if len(requests) == 1:
                return [(exc, None)]
            return [self._run([r], prefill)[0] for r in requests]
        return self._sample(requests, logits)

    def _logits(self, requests: list[Request], prefill: bool) -> torch.Tensor:
        """The next-token logits (B, V): a padded prefill of whole sequences, or one new token per request."""
        if prefill:  # prompt + any output kept from a preemption (recomputed)
            tokens, _, input_pos = pad_batch([r.prompt_ids + r.output_ids for r in requests], self.pad_id, self.device)
        else:  # feed each request's newest token at its own position
            tokens = torch.tensor([[r.output_ids[-1]] for r in requests], device=self.device)  # (B, 1)
            input_pos = torch.tensor([[r.num_tokens - 1] for r in requests], device=self.device)  # (B, 1)
        self.cache.bind([self.blocks.block_tables[r.request_id] for r in requests])
        with torch.inference_mode():
            return self.model(tokens, input_pos, kv_cache=self.cache)[:, -1, :]  # (B, V)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[tuple[int | Exception, tuple | None]]:
        """Penalties on the rows that ask for them, one draw per row, logprobs from the raw logits."""
        penalized = logits
        if any(r.presence_penalty or r.frequency_penalty for r in requests):
            penalized = logits.clone()
            for i, r in enumerate(requests):
                penalized[i] = apply_penalties(logits[i], r.output_ids, r.presence_penalty, r.frequency_penalty)
        tokens = sample_each_row(penalized, [r.sampling for r in requests], [r.generator for r in requests])
        out = []
        for i, (r, token) in enumerate(zip(requests, tokens)):
            lp = None
            if r.logprobs is not None and not isinstance(token, Exception):
                lp = token_logprobs(logits[i:i + 1], torch.tensor([token], device=logits.device), r.logprobs)[0]
            out.append((token, lp))
        synchronize(self.device)
        return out

    def _postprocess(self, requests: list[Request], results: list[tuple[int | Exception, tuple | None]]) -> list[Request]:
        """Append each request's token; retire the finished and the failed at once (their blocks go
        back to the free list now, not at the end of a batch); return them."""
        now = time.perf_counter()
        done = []
        for r, (token, logprobs) in zip(requests, results):
            if isinstance(token, Exception):
                self.scheduler.fail(r, f"{type(token).__name__}: {token}")
                done.append(r)
                continue
            if logprobs is not None:
                r.output_logprobs.append(logprobs)
            if r.append_token(token, now):
                self.scheduler.finish(r)
                done.append(r)
        return done

    def _record(self, batch_rows: int, prefill_tokens: int, new_tokens: int) -> None:
        running = self.scheduler.running
        self.history.append(StepRecord(time.perf_counter(), len(self.scheduler.waiting), len(running),
                                       batch_rows, prefill_tokens, new_tokens))
        self.kv_samples.append(KVSample(
            tokens=sum(self.blocks.num_tokens.values()),
            paged_slots=sum(len(t) for t in self.blocks.block_tables.values()) * self.blocks.block_size,
            reserved_slots=sum(r.max_positions for r in running),
            max_len_slots=len(running) * self.max_model_len))


def run_to_completion(engine, requests: list[Request]) -> list[Request]:
    """Add every request at once and step the engine until all are done; return them in order."""
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    return requests
