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
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from course_lib.batching import StaticBatch, pad_batch, sample_rows
from course_lib.env import synchronize
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
        return queue_or_reject(request, rejection_reason(request, self.max_model_len), self.waiting, self.rejected)

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
        """Admit -> prefill the admitted -> decode every running request -> retire; return the finished."""
        done, prefill_tokens = [], 0
        admitted = self.scheduler.admit()
        if admitted:
            prefill_tokens = sum(r.num_tokens for r in admitted)
            done += self._forward(admitted, prefill=True)
        decoding = self.scheduler.prepare_decode()
        if decoding:
            done += self._forward(decoding, prefill=False)
        self._record(len(decoding), prefill_tokens, len(admitted) + len(decoding))
        return done

    def _forward(self, requests: list[Request], prefill: bool) -> list[Request]:
        """One batched forward: a padded prefill of whole sequences, or one new token per request."""
        if prefill:  # prompt + any output kept from a preemption (recomputed)
            tokens, _, input_pos = pad_batch([r.prompt_ids + r.output_ids for r in requests], self.pad_id, self.device)
        else:  # feed each request's newest token at its own position
            tokens = torch.tensor([[r.output_ids[-1]] for r in requests], device=self.device)  # (B, 1)
            input_pos = torch.tensor([[r.num_tokens - 1] for r in requests], device=self.device)  # (B, 1)
        self.cache.bind([self.blocks.block_tables[r.request_id] for r in requests])
        with torch.inference_mode():
            logits = self.model(tokens, input_pos, kv_cache=self.cache)[:, -1, :]  # (B, V)
            next_ids = sample_rows(logits, [r.sampling for r in requests], [r.generator for r in requests]).tolist()
        synchronize(self.device)
        now = time.perf_counter()
        done = []
        for r, token in zip(requests, next_ids):
            if r.append_token(token, now):
                self.scheduler.finish(r)  # blocks back to the free list now, not at the end of a batch
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
