"""A tiny random model with the real SmolLM2 tokenizer (its chat template, special tokens and byte-level
BPE), served on loopback, and a model wrapper that injects faults: server tests without real weights."""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from course_lib.engine import Engine, EngineConfig
from course_lib.models import load_tokenizer
from course_lib.server import ServerLimits, serve_in_background
from course_lib.transformer import Transformer
from tiny import FAMILIES

MODEL = "tiny-chat"
_TOKENIZER = []


def tokenizer():
    """The SmolLM2 tokenizer (3.5 MB, from the course cache; loaded once)."""
    if not _TOKENIZER:
        _TOKENIZER.append(load_tokenizer("smollm2-135m"))
    return _TOKENIZER[0]


def tiny_chat_model(seed: int = 0) -> Transformer:
    """SmolLM2's tiny test shape (tests/tiny.py) with the real 49,152-token vocabulary, initialized
    as tiny.tiny_hf does (blocks, not the embedding, decide the next token)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer()), max_position_embeddings=512, **FAMILIES["smollm2"][1])
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" in name:
                p.normal_(0, 1.0)
            else:
                gain = 8.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.normal_(0, gain * p.shape[1] ** -0.5)
    return Transformer.from_hf(hf.eval())


def tiny_engine(model: Transformer, config: EngineConfig = EngineConfig(max_batch=8, max_model_len=256)) -> Engine:
    return Engine(model, config, tokenizer=tokenizer())


@contextlib.contextmanager
def tiny_server(model: Transformer, config: EngineConfig = EngineConfig(max_batch=8, max_model_len=256),
                limits: ServerLimits | None = None):
    """(url, engine, app loop) of a server on a fresh engine over `model`."""
    engine = tiny_engine(model, config)
    with serve_in_background(engine, MODEL, limits=limits) as server:
        yield server.url, engine, server.app.state.loop


class Faulty(torch.nn.Module):
    """The model, except that a forward raises (or gives NaN logits for the affected rows) when a row
    holds token `poison` or feeds position `at_pos`: a fault that belongs to one request."""

    def __init__(self, inner, poison: int | None = None, at_pos: int | None = None, nan: bool = False):
        super().__init__()
        self.inner, self.poison, self.at_pos, self.nan, self.config = inner, poison, at_pos, nan, inner.config

    def forward(self, tokens, input_pos, **kwargs):
        logits = self.inner(tokens, input_pos, **kwargs)  # (B, T, V)
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool)  # (B,)
        if self.poison is not None:
            hit |= (tokens == self.poison).any(-1)
        if self.at_pos is not None:
            hit |= (input_pos == self.at_pos).any(-1)
        if bool(hit.any()):
            if not self.nan:
                raise RuntimeError("injected fault")
            logits = logits.masked_fill(hit[:, None, None], float("nan"))
        return logits
