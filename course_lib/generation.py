"""Sampling and the naive generation loop. Built in notebooks/01_what_is_inference.ipynb."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from course_lib.env import synchronize

# Top-p compares a running sum of probabilities with p. Float rounding puts that sum a few ulps
# either side of the exact value, so "the mass reaches p" is read with this much slack.
TOP_P_TOLERANCE = 1e-6
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing by it could overflow
# fp32 (1e-40 is subnormal; below ~1e-45 it rounds to 0 and gives 0/0), and the distribution it
# would sample from is one-hot to float precision anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits (the knobs every inference API exposes)."""

    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) means greedy (argmax); >0 divides the logits
    top_k: int | None = None  # keep only the k most likely tokens (None: keep all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # keep tokens with probability >= min_p * (probability of the top token)

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1) (0 keeps every token), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        """True when the next token is simply the argmax of the logits (temperature below GREEDY_BELOW)."""
        return self.temperature < GREEDY_BELOW


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the model on (B, T) token ids and return its logits (B, T, V)."""
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by the temperature (<1 sharpens, >1 flattens); below GREEDY_BELOW (0 included)
    leaves them for argmax, since dividing by a tiny temperature overflows."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature < GREEDY_BELOW or temperature == 1:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set every logit outside the k largest (per row) to -inf; exactly k survive."""
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k!r}")
    top_idx = logits.topk(k, dim=-1).indices  # (..., k)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top_idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (nucleus)."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p == 1:
        return logits
    probs = torch.softmax(logits.double(), dim=-1)  # float64: the cumulative sum is compared with p
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    # The one rule: a token stays while the tokens above it have not yet reached p. The top token
    # always stays (nothing is above it; for p below the tolerance the comparison alone would drop
    # it and leave nothing to sample), and the set stops at the first token that reaches p.
    keep_sorted = mass_before < p - TOP_P_TOLERANCE
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
    if min_p == 0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p): no softmax needed.
    max_logit = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - max_logit < math.log(min_p), float("-inf"))


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (the order transformers and vLLM use). Every filter
    keeps the most likely token, so at least one logit per row stays finite."""
    logits = apply_temperature(logits.float(), sampling.temperature)
    logits = top_k_filter(logits, sampling.top_k)
    logits = top_p_filter(logits, sampling.top_p)
    return min_p_filter(logits, sampling.min_p)


def sample_next_token(logits: torch.Tensor, sampling: SamplingConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of (B, V) logits: argmax when greedy, else a seeded draw."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, sampling), dim=-1)  # (B, V)
    if generator is not None and generator.device != probs.device:
        # Draw where the generator lives: a CPU generator then gives the same tokens on any device.
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def apply_penalties(logits: torch.Tensor, output_ids: list[int], presence: float = 0.0,
                    frequency: float = 0.0) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on one row of logits (V,): every token already in
    the output loses `presence` once and `frequency` per occurrence (negative values encourage)."""
    if not output_ids or (presence == 0 and frequency == 0):
        return logits
    counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])  # (V,)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of (B, V) logits: the chosen token's log-probability under the model's own
    distribution (softmax of the raw logits), and the `top` most likely (token, log-probability)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logprobs.gather(-1, tokens.view(-1, 1)).squeeze(-1).tolist()  # (B,)
    if top < 1:
        return [(c, []) for c in chosen]
    values, ids = logprobs.topk(top, dim=-1)  # (B, top)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


def _check_generation_args(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (1, T) tensor of token ids "
                         f"(got {type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))})")
    if input_ids.shape[0] != 1:
        raise ValueError(f"the naive loop generates for one sequence: batch size must be 1, got {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")


def stream_naive(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                 generator: torch.Generator | None = None) -> Iterator[tuple[int, float]]:
    """Yield (token_id, time.perf_counter() after device sync) per new token; recomputes all each step."""
    _check_generation_args(input_ids, max_new_tokens)  # here, not in the generator: fail at the call
    return _stream_naive(model, input_ids, max_new_tokens, sampling, frozenset(stop_ids), generator)


def _stream_naive(model, input_ids, max_new_tokens, sampling, stop_ids, generator):
    device = next(model.parameters()).device
    ids = input_ids.to(device)  # (1, T)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = forward_logits(model, ids)[:, -1, :]  # (1, V): only the last position predicts
            next_id = sample_next_token(logits, sampling, generator)  # (1,)
            synchronize(device)
            token = int(next_id.item())
            yield token, time.perf_counter()
            if token in stop_ids:  # the stop token is part of the output, then we stop
                return
            ids = torch.cat([ids, next_id.view(1, 1).to(ids.dtype)], dim=1)  # (1, T+1)


def generate_naive(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                   sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                   generator: torch.Generator | None = None) -> list[int]:
    """Generate up to max_new_tokens new token ids, re-running the whole sequence every step."""
    return [token for token, _ in stream_naive(model, input_ids, max_new_tokens, sampling, stop_ids, generator)]


def chat_input_ids(tokenizer, prompt: str | list[dict], system: str | None = None) -> torch.Tensor:
    """Token ids (1, T) of a chat prompt, ending with the assistant's turn marker."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty: give the model something to answer")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not messages:
            raise ValueError("prompt is an empty list of messages")
        if any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in messages):
            raise ValueError("each message must be a dict with 'role' and 'content'")
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return ids.long().view(1, -1)  # (1, T)


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos, and <|im_end|> when the vocabulary has it."""
    eos = tokenizer.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.append(im_end)
    return list(dict.fromkeys(ids))  # deduplicated, order kept
