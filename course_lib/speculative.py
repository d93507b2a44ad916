"""Speculative decoding: draft, verify, accept. Built in notebooks/07_speculative_decoding.ipynb.

At batch 1 a decode step is bound by reading the weights, so scoring k+1 tokens in one forward
pass costs little more than scoring one. A cheap proposer guesses the next k tokens; the target
runs once over [last token, guess_1 .. guess_k] and gets its own distribution p at each of the
k+1 positions. Guess i is accepted with probability min(1, p_i(x) / q_i(x)) (q: the proposer's
distribution); at the first rejection the token is redrawn from norm(max(0, p_i - q_i)); when all
k pass, p_{k+1} gives a bonus token. The output is then distributed exactly as the target's own
sampling (Leviathan et al. 2023; Chen et al. 2023). Greedy is the special case where p and q are
one-hot: keep guesses while they equal the target's argmax, then emit the argmax.

Proposers: a draft model with its own KV cache (DraftProposer), or prompt lookup (PromptLookup):
find the sequence's last few tokens earlier in the prompt or the output and guess what followed.
KV caches are position-addressed (kv_cache.KVCache), so rolling back after a rejection is just
moving the "filled up to" counter back: stale keys at later positions are hidden by the causal
(position) mask and overwritten by the next write.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from course_lib.env import synchronize
from course_lib.generation import SamplingConfig, filter_logits, sample_next_token
from course_lib.kv_cache import KVCache, decode_step, prefill

# Shape letters: k proposed tokens, V vocabulary.

# Defaults notebook 07 measured (its gamma sweep); the engine and the spec bench use them.
DRAFT_GAMMA = 4  # guesses per target call for the draft model (the notebook's gamma sweep picks it)
LOOKUP_GAMMA = 12  # prompt lookup's guesses cost nothing to make, so it guesses further
LOOKUP_NGRAM = (3, 2)  # (max, min) n-gram length: one-token matches guess poorly and waste verify time
DRAFT_MIN_CONFIDENCE = 0.4  # the adaptive draft stops guessing below this top probability (transformers' default)


# ---- the acceptance rule -----------------------------------------------------------------------

def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: draft_tokens (k,), target_logits (k+1, V) -> (accepted count n, next token).

    Keep guesses while they equal the target's argmax; the next token is the target's argmax at
    the first mismatch (or the bonus after all k)."""
    choice = target_logits.argmax(dim=-1).cpu()  # (k+1,)
    k = draft_tokens.numel()
    mismatch = (draft_tokens.cpu() != choice[:k]).nonzero()
    n = int(mismatch[0]) if len(mismatch) else k
    return n, int(choice[n])


def speculative_accept(draft_tokens: torch.Tensor, target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Exact speculative sampling: draft_tokens (k,), target_probs p (k+1, V), draft_probs q (k, V)
    (None: the guesses were deterministic, q one-hot) -> (accepted count n, next token).
    Random draws happen where the generator lives (the CPU by default)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    p = target_probs.float().to(dev)
    q = draft_probs.float().to(dev) if draft_probs is not None else None
    for i, x in enumerate(draft_tokens.tolist()):
        q_x = float(q[i, x]) if q is not None else 1.0
        # The one rule: accept x with probability min(1, p(x)/q(x)). Where the draft over-proposes
        # x (q > p) some guesses are turned away; the residual below hands that mass back to the
        # tokens the draft under-proposes, so accepted + resampled tokens follow p exactly.
        if float(torch.rand((), generator=generator, device=dev)) * q_x < float(p[i, x]):
            continue
        if q is not None:
            residual = (p[i] - q[i]).clamp(min=0)
        else:
            residual = p[i].clone()
            residual[x] = 0  # max(0, p - onehot(x)): every token but x keeps its probability
        if float(residual.sum()) <= 0:  # only reachable through rounding when p == q
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(draft_tokens), int(torch.multinomial(p[-1], 1, generator=generator))


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id from probs (V,), drawn where the generator lives (same draw on any device)."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def sampling_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution a model samples from (..., V): softmax after temperature/top-k/top-p/min-p."""
    return torch.softmax(filter_logits(logits, sampling), dim=-1)


# ---- proposers -------------------------------------------------------------------------------------

class PromptLookup:
    """Proposes the tokens that followed the sequence's last n tokens where they first occurred
    earlier (prompt or output), trying n = max_ngram down to min_ngram. No model, no cache.
    min_ngram=2 skips one-token matches, whose guesses are rarely right and still cost verify time."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], None]:
        """Up to k guesses for what follows `tokens` (none when no n-gram recurs)."""
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            pattern = tokens[L - n:]
            for start in range(L - n):  # the earliest match, as transformers' prompt lookup
                if tokens[start:start + n] == pattern:
                    return tokens[start + n:start + n + k], None
        return [], None

    def reset(self, max_len: int) -> None:
        """Nothing to prepare: prompt lookup keeps no state."""

    def rollback(self, length: int) -> None:
        """Nothing to undo."""


class DraftProposer:
    """Proposes up to k tokens by running a draft model one token at a time, with its own KV cache.

    min_confidence > 0 stops guessing at the first position where the draft's top probability is
    below it (a guess there is unlikely to be accepted, and every guess costs a draft step and
    verify time). The decision is made from q before the guess is drawn: the number of guesses may
    depend on the context, never on the drawn guess, or the guesses kept would not follow q."""

    def __init__(self, draft, sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None,
                 static: bool | None = None, min_confidence: float = 0.0):
        if not 0 <= min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence!r}")
        self.draft, self.sampling, self.generator = draft, sampling, generator
        self.min_confidence = min_confidence
        self.cache: KVCache | None = None
        self.filled = 0  # cache positions 0..filled-1 hold the current sequence's keys/values
        self.device = next(draft.parameters()).device
        # static=None: a static cache off the CPU (no host sync per layer, fixed shapes), as stream_cached picks
        self.static = self.device.type != "cpu" if static is None else static

    def reset(self, max_len: int) -> None:
        """Start a new sequence; (re)allocate the cache only when it is too short (a static cache
        keeps its address across runs, as CUDA graphs need)."""
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = KVCache.for_model(self.draft, max_len, static=self.static)
        self.filled = 0

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """k guesses and their draft distributions q (k, V) (None when greedy)."""
        if k == 0:
            return [], None
        new = torch.tensor([tokens[self.filled:]], device=self.device)  # (1, 1 or 2; the prompt at first)
        with torch.inference_mode():
            logits = prefill(self.draft, new, self.cache, self.filled)  # (1, V)
            self.filled = len(tokens)
            guesses, probs = [], []
            for i in range(k):
                if self.sampling.greedy:
                    q = torch.softmax(logits[0].float(), dim=-1) if self.min_confidence else None
                else:
                    q = sampling_probs(logits[0], self.sampling)  # q_i (V,)
                # Stop on max(q), before drawing. Dropping a guess *after* seeing it (q(x) small) would
                # keep guesses from q conditioned on q(x) >= t, not from q, and the accept/resample
                # rule -- exact only for guesses drawn from q -- would then bias the output.
                if self.min_confidence and float(q.max()) < self.min_confidence:
                    break  # not worth a verify slot
                if self.sampling.greedy:
                    token = logits.argmax(dim=-1)  # (1,)
                else:
                    token = _draw(q, self.generator).view(1)
                    probs.append(q)
                guesses.append(int(token))
                if i < k - 1:  # the last guess is never fed: the target's verdict decides what follows
                    pos = torch.tensor([self.filled], device=self.device)
                    logits = decode_step(self.draft, token.view(1, 1), pos, self.cache)
                    self.filled += 1
        return guesses, (torch.stack(probs) if probs else None)

    def rollback(self, length: int) -> None:
        """Forget cache positions >= length (rejected guesses): later writes overwrite them."""
        self.filled = min(self.filled, length)


# ---- statistics and the loop -----------------------------------------------------------------------

@dataclass
class SpecStats:
    """What one speculative run did, call by call."""

    proposed: list[int] = field(default_factory=list)  # guesses offered at each target call
    accepted: list[int] = field(default_factory=list)  # guesses the target kept at each call
    emitted: list[int] = field(default_factory=list)  # tokens each call added (accepted + 1, or fewer at the end)
    new_tokens: int = 0  # tokens generated, the prefill's first token included

    @property
    def target_calls(self) -> int:
        """Verification forward passes (the prompt's prefill not counted)."""
        return len(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """alpha: the chance a guess is accepted given the one before it was (guesses judged, each
        accepted guess plus the first rejected one per call), the alpha of the theory formulas."""
        judged = sum(a + (a < p) for a, p in zip(self.accepted, self.proposed))
        return sum(self.accepted) / judged if judged else float("nan")

    @property
    def accepted_fraction(self) -> float:
        """Accepted guesses / proposed guesses (vLLM's "draft acceptance rate")."""
        return sum(self.accepted) / sum(self.proposed) if sum(self.proposed) else float("nan")

    @property
    def tokens_per_call(self) -> float:
        """New tokens per target forward pass after the prefill."""
        return sum(self.emitted) / len(self.emitted) if self.emitted else float("nan")

    def histogram(self, gamma: int | None = None) -> list[int]:
        """counts[n] = target calls that accepted n guesses, n = 0..gamma (default: the most proposed)."""
        gamma = max(self.proposed, default=0) if gamma is None else gamma
        counts = Counter(self.accepted)
        return [counts.get(n, 0) for n in range(gamma + 1)]

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "target_calls": self.target_calls,
                "acceptance_rate": self.acceptance_rate, "accepted_fraction": self.accepted_fraction,
                "tokens_per_call": self.tokens_per_call, "accepted_histogram": self.histogram()}


def stream_speculative(target, input_ids: torch.Tensor, max_new_tokens: int, proposer, gamma: int = 4,
                       sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                       generator: torch.Generator | None = None, stats: SpecStats | None = None,
                       target_cache: KVCache | None = None) -> Iterator[tuple[int, float]]:
    """Yield (token_id, time.perf_counter() after device sync) per new token; tokens of one target
    call arrive together. Same output distribution as kv_cache.stream_cached (greedy: same tokens)."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma (guesses per target call) must be an integer >= 1, got {gamma!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (1, T) with T >= 1, got shape {tuple(input_ids.shape)}")
    needed = input_ids.shape[1] + max_new_tokens + gamma
    if target_cache is not None and target_cache.max_len < needed:
        raise ValueError(f"target_cache holds {target_cache.max_len} positions; this run needs {needed}")
    if target_cache is None:  # static off the CPU: a sliced cache reads a position back every layer (a sync)
        target_cache = KVCache.for_model(target, needed, static=next(target.parameters()).device.type != "cpu")
    proposer.reset(needed)
    return _stream(target, input_ids, max_new_tokens, proposer, gamma, sampling, frozenset(stop_ids), generator,
                   stats if stats is not None else SpecStats(), target_cache)


def _stream(target, input_ids, max_new_tokens, proposer, gamma, sampling, stop_ids, generator, stats, cache):
    device = next(target.parameters()).device
    tokens = input_ids[0].tolist()
    T = len(tokens)
    with torch.inference_mode():
        first = int(sample_next_token(prefill(target, input_ids.to(device), cache), sampling, generator))
    tokens.append(first)  # invariant: the target cache holds every token but the last
    stats.new_tokens = 1
    synchronize(device)
    yield first, time.perf_counter()
    if first in stop_ids or max_new_tokens == 1:
        return
    while True:
        left = max_new_tokens - (len(tokens) - T)
        guesses, q = proposer.propose(tokens, min(gamma, left - 1))  # a call adds <= k + 1 tokens
        n0 = len(tokens)
        chunk = torch.tensor([tokens[-1:] + guesses], device=device)  # (1, k+1)
        with torch.inference_mode():
            logits = target(chunk, torch.arange(n0 - 1, n0 + len(guesses), device=device), kv_cache=cache)[0]
        guess_t = torch.tensor(guesses, dtype=torch.long)
        if sampling.greedy:
            n, nxt = greedy_accept(guess_t, logits)
        else:
            n, nxt = speculative_accept(guess_t, sampling_probs(logits, sampling), q, generator)
        new = (guesses[:n] + [nxt])[:left]
        stop_at = next((i for i, t in enumerate(new) if t in stop_ids), None)
        if stop_at is not None:
            new = new[:stop_at + 1]
        tokens += new
        proposer.rollback(n0 + n)  # the draft's keys for rejected guesses are now stale
        stats.proposed.append(len(guesses))
        stats.accepted.append(n)
        stats.emitted.append(len(new))
        stats.new_tokens += len(new)
        synchronize(device)
        now = time.perf_counter()
        for t in new:
            yield t, now
        if stop_at is not None or len(tokens) - T >= max_new_tokens:
            return


def generate_speculative(target, input_ids: torch.Tensor, max_new_tokens: int, proposer, gamma: int = 4,
                         sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                         generator: torch.Generator | None = None,
                         target_cache: KVCache | None = None) -> tuple[list[int], SpecStats]:
    """Generate up to max_new_tokens new tokens speculatively; return them and the run's SpecStats."""
    stats = SpecStats()
    out = [t for t, _ in stream_speculative(target, input_ids, max_new_tokens, proposer, gamma, sampling,
                                            stop_ids, generator, stats, target_cache)]
    return out, stats


# ---- theory ------------------------------------------------------------------------------------------

def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """E[tokens per target call] = (1 - alpha^(gamma+1)) / (1 - alpha) for i.i.d. acceptance alpha."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return gamma + 1.0 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Speedup over plain decoding: E[tokens per call] / (gamma * c + verify_cost), c = draft step /
    target step, verify_cost = target pass over gamma+1 tokens / target step (1 in the ideal model)."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + verify_cost)


def required_cost_ratio(alpha: float, gamma: int, speedup: float, verify_cost: float = 1.0) -> float:
    """The largest c that still gives `speedup` at this alpha and gamma (negative: unreachable)."""
    return (expected_tokens_per_call(alpha, gamma) / speedup - verify_cost) / gamma


def required_alpha(gamma: int, cost_ratio: float, speedup: float, verify_cost: float = 1.0) -> float:
    """The smallest alpha that gives `speedup` at this c and gamma (nan if even alpha = 1 falls short)."""
    if expected_speedup(1.0, gamma, cost_ratio, verify_cost) < speedup:
        return float("nan")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the speedup grows with alpha
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_speedup(mid, gamma, cost_ratio, verify_cost) < speedup else (lo, mid)
    return hi
