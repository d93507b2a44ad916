"""Static and continuous batching engines behind one interface. Built in notebooks/06_batching.ipynb.

Both engines take Request objects as they arrive (add_request) and do one step of work per call
(step), so one driver (course_lib.workload.replay) can feed them the same workload:
    StaticBatchEngine      - when idle, take up to max_batch waiting requests (optionally waiting up
                             to max_wait_s for more), run them as one StaticBatch until the longest
                             is done; arrivals meanwhile wait for the next batch.
    ContinuousBatchEngine  - every step: schedule (a token for every decoding request, prompt tokens
                             for the new and the still-prefilling ones, at most token_budget in all),
                             run them as ONE forward, retire the finished at once. Keys/values live
                             in a PagedKVCache: attention really reads them through the block tables
                             that the scheduler's BlockManager hands out.

One forward mixes prefill and decode (as vLLM and SGLang schedule them): every request's tokens are
cut into rows of T tokens, each row read through its request's block table (rows of one prompt
share a table: each layer writes every row's keys before any row reads, so a row sees the rows of
its prompt before it). A decoding request is one row with one real token; a chunk of n prompt
tokens is ceil(n / T) rows. T is chosen per step (row_width): small T pads decode rows less,
large T gathers fewer rows of keys. Where padding every decoder to T would cost more than reading
the weights a second time (plan_forwards: on the CPU, many decoders beside a long chunk), the step
runs the decoders and the prompts as two forwards instead; either way a decoder waits for at most
one budget of prompt work per step.

Chunked prefill (token_budget set) bounds the work of a step, so a long prompt can no longer stall
every running stream for its whole prefill; prefix caching (prefix_caching=True) lets a prompt
share the full KV blocks of any earlier prompt that starts the same way (paged_kv.BlockManager).
A decode-only step has static shapes when static_decode is on (the default on a GPU): the batch is
padded to one of DECODE_BATCH_SIZES rows and the tables to a power-of-two width, padded rows write
to the scratch block, and paged_forward does tensor work only (no .item(), no data-dependent
shape), so a CUDA graph can be captured per size, as vLLM does.

A server batches strangers, so one request's failure must stay its own: the continuous engine
samples each row apart (batching.sample_each_row), and a forward that raises is run again one
request at a time, so only the request that fails alone is retired, with finish_reason "error".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from course_lib.batching import StaticBatch, sample_each_row
from course_lib.env import synchronize
from course_lib.generation import apply_penalties, token_logprobs
from course_lib.paged_kv import BlockManager, KVSample, PagedKVCache
from course_lib.scheduler import Request, RequestStatus, Scheduler, queue_or_reject, rejection_reason

DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # decode batches padded to these (static_decode)
# A row's fixed cost in tokens' worth of matmul work, per key position it gathers (its keys and values
# through the block table, its share of attention): measured on the 2-core CPU, SmolLM2-135M, fp32,
# a row at a ~200-position context cost about as much as two tokens.
ROW_COST_PER_KEY = 0.01
FORWARD_COST = 25.0  # a forward's fixed cost (every weight read once) in tokens' worth, same machine

# Shape letters: B batch (requests in one forward), T tokens, V vocabulary.


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did, for queue-length and throughput plots."""

    time: float  # time.perf_counter() at the end of the step
    waiting: int  # requests queued after the step
    running: int  # unfinished requests holding a batch slot after the step
    batch_rows: int  # rows in the step's decode forward (static batching counts idle rows too)
    prefill_tokens: int  # prompt tokens prefilled in the step (padding and prefix-cache hits excluded)
    new_tokens: int  # output tokens produced in the step
    cached_tokens: int = 0  # prompt tokens of the requests admitted in the step found in the prefix cache


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


def paged_forward(model, cache: PagedKVCache, tokens: torch.Tensor, input_pos: torch.Tensor,
                  block_tables: torch.Tensor) -> torch.Tensor:
    """One forward through the paged cache: tokens, input_pos (B, T) (negative = padding), block
    tables (B, W) -> the logits at each row's last position (B, V). Tensor work only, no host sync
    (on a GPU; the CPU checks positions): with fixed B, T, W it can be compiled or graph-captured."""
    cache.bind_tensor(block_tables)
    return model(tokens, input_pos, kv_cache=cache, last_only=True)[:, -1]  # (B, V)


def forward_cost(lengths: list[int], num_keys: int, T: int) -> float:
    """Estimated work of one forward, in tokens' worth of matmuls: its fixed cost, then per row its
    T tokens (padding included) and its gather of num_keys keys."""
    return FORWARD_COST + sum(-(-n // T) for n in lengths) * (T + ROW_COST_PER_KEY * num_keys)


def row_width(lengths: list[int], num_keys: int) -> int:
    """The row width T, a power of two, for requests feeding `lengths` tokens each in one forward,
    with the least estimated work: tokens computed (padding included) + each row's key gather."""
    widths = [1 << k for k in range(max(lengths).bit_length() + 1)]
    return min(widths, key=lambda T: forward_cost(lengths, num_keys, T))


def plan_forwards(lengths: list[int], num_keys: list[int]) -> list[tuple[list[int], int]]:
    """How to run one step's work (request i feeds lengths[i] tokens over num_keys[i] keys): as
    (request indices, row width) per forward. One mixed forward, unless the decoders' padding costs
    more than a second forward: then the decoders (rows of one token) apart from the prompts."""
    every = list(range(len(lengths)))
    mixed = [(every, row_width(lengths, max(num_keys)))]
    decode, prompts = [i for i in every if lengths[i] == 1], [i for i in every if lengths[i] > 1]
    if not decode or not prompts:
        return mixed

    def cost(plan):
        return sum(forward_cost([lengths[i] for i in g], max(num_keys[i] for i in g), T) for g, T in plan)

    split = [(decode, 1), (prompts, row_width([lengths[i] for i in prompts], max(num_keys[i] for i in prompts)))]
    return min((mixed, split), key=cost)


def padded_size(n: int, sizes: tuple[int, ...] = DECODE_BATCH_SIZES) -> int:
    """The smallest size in `sizes` that holds n (n itself past the largest)."""
    return next((s for s in sizes if s >= n), n)


class ContinuousBatchEngine:
    """Continuous batching over a paged KV cache: schedule, run one mixed forward, retire, every step."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_batch: int = 8,
                 max_model_len: int | None = None, pad_id: int = 0, token_budget: int | None = None,
                 prefix_caching: bool = False, static_decode: bool | None = None,
                 decode_compile: dict | None = None):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len or model.config.max_position
        if token_budget is not None and token_budget < max_batch:
            raise ValueError(f"token_budget ({token_budget}) must be >= max_batch ({max_batch}): every running "
                             "request decodes one token per step, and a prompt needs room beside them")
        self.token_budget = token_budget  # None: no chunked prefill (a prompt is prefilled whole)
        self.static_decode = self.device.type == "cuda" if static_decode is None else static_decode
        # decode_compile: torch.compile options for the static decode-only forward, e.g.
        # {"mode": "reduce-overhead"} (CUDA graphs, one per padded batch size); None: eager
        if decode_compile is not None and not self.static_decode:
            raise ValueError("decode_compile needs static_decode: only static shapes can be captured")
        self._decode_forward = (torch.compile(paged_forward, fullgraph=True, **decode_compile)
                                if decode_compile is not None else paged_forward)
        self.blocks = BlockManager(num_blocks, block_size, enable_caching=prefix_caching)
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
        """Schedule (a token per decoding request, prompt chunks, admissions) -> run (one forward;
        sample the requests whose fed tokens reach their end) -> postprocess (append tokens, name the
        full blocks, retire the finished and the failed, reserve the next positions); return the
        requests that ended in this step."""
        work = self.scheduler.schedule(self.token_budget)
        decoding = sum(n == 1 and r.num_computed > 0 and bool(r.output_ids) for r, n in work)
        cached = sum(r.num_cached_tokens for r in self.scheduler.admitted)
        done, new_tokens = self._postprocess(work, self._run(work)) if work else ([], 0)
        self.scheduler.prepare_decode()  # the next position of every running request, preempting if short
        self._record(decoding, sum(n for _, n in work) - decoding, new_tokens, cached)
        return done

    def _run(self, work: list[tuple[Request, int]]) -> list[tuple[int | Exception | None, tuple | None]]:
        """One forward over the work and the sampling of every request it completes: (token, or the
        request's error, or None for a prompt chunk that does not reach the end; logprobs). A forward
        that raises runs again one request at a time; only a request that fails alone gets the error
        (KV writes are idempotent: the retry writes the same values at the same slots)."""
        try:
            logits = self._logits(work)  # (len(work), V)
        except Exception as exc:  # noqa: BLE001 - whose fault is it? ask each request alone
            if len(work) == 1:
                return [(exc, None)]
            return [self._run([w])[0] for w in work]
        complete = [i for i, (r, n) in enumerate(work) if r.num_computed + n == r.num_tokens]
        out: list = [(None, None)] * len(work)
        if complete:
            sampled = self._sample([work[i][0] for i in complete], logits[complete])
            for i, result in zip(complete, sampled):
                out[i] = result
        return out

    def _logits(self, work: list[tuple[Request, int]]) -> torch.Tensor:
        """The logits after each request's last fed token (len(work), V), from the forwards that
        plan_forwards chooses: one mixed forward, or the decoders apart from the prompts."""
        tables = [self.blocks.block_tables[r.request_id][:self.blocks.blocks_needed(r.num_computed + n)]
                  for r, n in work]
        plan = plan_forwards([n for _, n in work], [len(t) * self.blocks.block_size for t in tables])
        logits: list = [None] * len(work)
        for group, T in plan:
            out = self._forward([work[i] for i in group], [tables[i] for i in group], T)
            for i, row in zip(group, out):
                logits[i] = row
        return torch.stack(logits)  # (len(work), V)

    def _forward(self, work: list[tuple[Request, int]], tables: list[list[int]], T: int) -> torch.Tensor:
        """One forward: each request's tokens in rows of T (left-padded), or a static decode batch."""
        width = max(len(t) for t in tables)
        rows_tok, rows_pos, rows_table, spans = [], [], [], []
        for (r, n), table in zip(work, tables):
            ids, start = r.all_ids[r.num_computed:r.num_computed + n], r.num_computed
            pad = -n % T  # the first row of the request is the short one: its last row ends at its last token
            ids, pos = [self.pad_id] * pad + ids, [-1] * pad + list(range(start, start + n))
            for k in range(0, len(ids), T):
                rows_tok.append(ids[k:k + T])
                rows_pos.append(pos[k:k + T])
                rows_table.append(table)
            spans.append(range(len(rows_tok) - -(-n // T), len(rows_tok)))
        if T == 1 and self.static_decode:  # static shapes: B from DECODE_BATCH_SIZES, W a power of two
            pad_rows = padded_size(len(rows_tok)) - len(rows_tok)
            rows_tok += [[self.pad_id]] * pad_rows
            rows_pos += [[-1]] * pad_rows  # written to the scratch block, never read by a real row
            rows_table += [[self.cache.scratch_block]] * pad_rows
            width = min(1 << (width - 1).bit_length(), self.blocks.blocks_needed(self.max_model_len))
        tokens = torch.tensor(rows_tok, device=self.device)  # (rows, T)
        input_pos = torch.tensor(rows_pos, device=self.device)  # (rows, T)
        forward = self._decode_forward if T == 1 and self.static_decode else paged_forward
        with torch.inference_mode():
            if forward is not paged_forward:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: its outputs may be reused
            logits = forward(self.model, self.cache, tokens, input_pos,
                             self.cache.table_tensor(rows_table, width))  # (rows, V)
        # Each request's logits are those of its last row, unless one of its rows is not finite: its
        # keys feed the later rows, so the request is broken (and its sampling will say so).
        finite = torch.isfinite(logits).all(-1).tolist()
        return logits[[next((k for k in span if not finite[k]), span[-1]) for span in spans]]  # (len(work), V)

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

    def _postprocess(self, work: list[tuple[Request, int]],
                     results: list[tuple[int | Exception | None, tuple | None]]) -> tuple[list[Request], int]:
        """Count each request's fed tokens as computed (naming its newly full blocks for the prefix
        cache), append its token if it got one; retire the finished and the failed at once (their
        blocks go back to the free list now, not at the end of a batch); return them and the number
        of new tokens."""
        now = time.perf_counter()
        done, new_tokens = [], 0
        for (r, n), (token, logprobs) in zip(work, results):
            if isinstance(token, Exception):
                self.scheduler.fail(r, f"{type(token).__name__}: {token}")
                done.append(r)
                continue
            r.num_computed += n
            self.blocks.commit(r.request_id, r.all_ids, r.num_computed)
            if token is None:  # a prompt chunk short of the prompt's end: no token yet
                continue
            if logprobs is not None:
                r.output_logprobs.append(logprobs)
            new_tokens += 1
            if r.append_token(token, now):
                self.scheduler.finish(r)
                done.append(r)
        return done, new_tokens

    def _record(self, batch_rows: int, prefill_tokens: int, new_tokens: int, cached_tokens: int = 0) -> None:
        running = self.scheduler.running
        self.history.append(StepRecord(time.perf_counter(), len(self.scheduler.waiting), len(running),
                                       batch_rows, prefill_tokens, new_tokens, cached_tokens))
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
