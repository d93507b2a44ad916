"""Quality of a changed model against its fp32 self: perplexity, greedy agreement, KL. Built in notebooks/05_quantization.ipynb.

    perplexity   = exp(mean over predicted tokens of -log p(token | earlier tokens)), on
                   data/heldout.txt cut into independent windows (each window's first token has
                   no context and is not predicted: W - 1 predictions per window of W tokens);
    KL(ref || q) = mean over the same positions of sum_v p_ref(v) (log p_ref(v) - log p_q(v)),
                   in nats per token: 0 when the next-token distributions are identical;
    agreement    = fraction of positions where the model's argmax equals the reference's argmax,
                   teacher-forced along the reference's own greedy reply to each prompt (every
                   position of the reply, including the stop token that ends it), so one early
                   mismatch does not derail the rest of the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from course_lib.generation import chat_input_ids, forward_logits, stop_token_ids
from course_lib.paths import data_path

HELDOUT_FILE = "heldout.txt"  # a course data file (course_lib.paths), written for the course
WINDOW_TOKENS = 256  # tokens per perplexity window (fast on a CPU; 4 windows = 1,020 predictions)
NUM_WINDOWS = 4
REPLY_TOKENS = 16  # reference reply length for greedy agreement


def heldout_windows(tokenizer, window: int = WINDOW_TOKENS, num_windows: int | None = NUM_WINDOWS,
                    path: str | Path | None = None) -> torch.Tensor:
    """Token windows (N, window) spread evenly over the held-out text, so they cover different topics;
    num_windows=None cuts the whole text into consecutive windows (the bench suite uses all of it).
    path: a text file of your own (default: the course's data/heldout.txt)."""
    path = Path(path) if path is not None else data_path(HELDOUT_FILE)
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    available = len(ids) // window
    if num_windows is None:
        num_windows = available
    if window < 2 or num_windows < 1 or num_windows > available:
        raise ValueError(f"cannot cut {num_windows} windows of {window} tokens (>= 2) from {len(ids)} tokens")
    starts = [round(i * (available - 1) / max(num_windows - 1, 1)) * window for i in range(num_windows)]
    return torch.stack([ids[s:s + window] for s in starts])  # (N, W)


@torch.inference_mode()
def _log_probs(model, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return F.log_softmax(forward_logits(model, input_ids.to(device)).float().cpu(), dim=-1)  # (B, T, V)


@dataclass
class Reference:
    """The reference model's outputs, computed once and compared with each changed model."""

    windows: torch.Tensor  # (N, W) held-out token windows
    window_log_probs: list[torch.Tensor]  # per window (W - 1, V): predictions for tokens 1..W-1
    sequences: list[torch.Tensor]  # per prompt (1, T + n): prompt and the reference's greedy reply
    reply_slices: list[slice]  # positions whose argmax predicts the next reply token (or the stop)
    reference_argmax: list[torch.Tensor]  # per prompt: the reference's argmax at those positions


@torch.inference_mode()
def greedy_reply(model, input_ids: torch.Tensor, max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy new tokens (stop token included) for a (1, T) prompt: the course's cached loop when the
    model is a course Transformer, else transformers' generate."""
    device = next(model.parameters()).device
    if hasattr(model, "generate"):
        out = model.generate(input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids) or None,
                             pad_token_id=list(stop_ids)[0] if stop_ids else None)
        return out[0, input_ids.shape[1]:].tolist()
    from course_lib.kv_cache import generate_cached

    return generate_cached(model, input_ids.to(device), max_new_tokens, stop_ids=stop_ids)


def _padded(sequences: list[torch.Tensor]) -> torch.Tensor:
    """(1, T_i) sequences right-padded with token 0 into one (B, max T) batch. Causal attention means
    a pad after a sequence never changes that sequence's logits, and positions still start at 0."""
    out = torch.zeros(len(sequences), max(s.shape[1] for s in sequences), dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :s.shape[1]] = s[0]
    return out


def _reply_argmax(model, sequences: list[torch.Tensor], slices: list[slice]) -> list[torch.Tensor]:
    lp = _log_probs(model, _padded(sequences))  # (B, T, V): one forward for every prompt
    return [lp[i, where].argmax(-1) for i, where in enumerate(slices)]


def build_reference(model, tokenizer, prompts: list[str], windows: torch.Tensor,
                    reply_tokens: int = REPLY_TOKENS) -> Reference:
    """Run the reference (fp32) model: its log-probs on the windows and its greedy replies to the prompts."""
    if not prompts:
        raise ValueError("greedy agreement needs at least one prompt")
    log_probs = list(_log_probs(model, windows)[:, :-1])  # N x (W - 1, V)
    stops = stop_token_ids(tokenizer)
    sequences, slices = [], []
    for prompt in prompts:
        ids = chat_input_ids(tokenizer, prompt)  # (1, T)
        reply = greedy_reply(model, ids, reply_tokens, stops)
        sequences.append(torch.cat([ids, torch.tensor([reply])], dim=1))  # (1, T + n)
        # logits at position p predict token p + 1: positions T-1 .. T+n-2 predict the reply
        slices.append(slice(ids.shape[1] - 1, ids.shape[1] - 1 + len(reply)))
    return Reference(windows, log_probs, sequences, slices, _reply_argmax(model, sequences, slices))


@dataclass(frozen=True)
class Quality:
    """How close a model stays to the reference (see the module docstring for the definitions)."""

    perplexity: float
    kl_nats: float  # mean KL(reference || model) per token, nats
    agreement: float  # fraction of greedy next tokens equal to the reference's
    tokens: int  # predicted held-out tokens behind perplexity and KL
    positions: int  # reply positions behind agreement

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "kl_nats": self.kl_nats, "agreement": self.agreement,
                "tokens": self.tokens, "positions": self.positions}


def evaluate(model, reference: Reference) -> Quality:
    """Perplexity, KL(reference || model) and greedy agreement of `model` against `reference`."""
    lp = _log_probs(model, reference.windows)[:, :-1]  # (N, W - 1, V): all windows in one batch
    nll = -lp.gather(-1, reference.windows[:, 1:, None]).sum().item()
    kl = sum((ref.exp() * (ref - mine)).sum().item() for ref, mine in zip(reference.window_log_probs, lp))
    tokens = lp.shape[0] * lp.shape[1]
    argmax = _reply_argmax(model, reference.sequences, reference.reply_slices)
    same = sum(int((a == b).sum()) for a, b in zip(argmax, reference.reference_argmax))
    positions = sum(len(b) for b in reference.reference_argmax)
    return Quality(math.exp(nll / tokens), kl / tokens, same / positions, tokens, positions)


def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean negative log-likelihood) of each window's tokens 1..W-1 given the tokens before them."""
    lp = _log_probs(model, windows)[:, :-1]  # (N, W - 1, V)
    return math.exp(-lp.gather(-1, windows[:, 1:, None]).mean().item())


def reference_quality(reference: Reference) -> Quality:
    """The reference scored against itself (KL 0, agreement 1), from its stored log-probs: no forward."""
    nll = -sum(lp.gather(-1, w[1:, None]).sum().item() for lp, w in zip(reference.window_log_probs, reference.windows))
    tokens = sum(lp.shape[0] for lp in reference.window_log_probs)
    positions = sum(len(a) for a in reference.reference_argmax)
    return Quality(math.exp(nll / tokens), 0.0, 1.0, tokens, positions)
