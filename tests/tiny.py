"""Tiny random models shared by the unit tests: shaped like the course's model families, no download."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from course_lib.transformer import Transformer

VOCAB = 300

# name -> (config class, settings): Llama with full attention, Qwen2 (q/k/v bias, untied, theta 1e6),
# and SmolLM2's shape (9 heads sharing 3 KV heads, tied embeddings).
FAMILIES = {
    "llama": (LlamaConfig, dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, rope_theta=500_000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=False)),
    "smollm2": (LlamaConfig, dict(hidden_size=72, intermediate_size=192, num_hidden_layers=3, num_attention_heads=9,
                                  num_key_value_heads=3, head_dim=8, rope_theta=100_000.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=True)),
}


def tiny_config(name: str = "qwen2", max_position: int = 512, **overrides):
    """The transformers config of a tiny model of one family (overrides: any config field)."""
    cls, settings = FAMILIES[name]
    return cls(vocab_size=VOCAB, max_position_embeddings=max_position, **{**settings, **overrides})


def tiny_hf(name: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32, out_gain: float = 8.0,
            **config):
    """A tiny transformers model whose blocks, not the embedding, decide the next token: output
    projections are scaled by out_gain, so greedy decoding does not just repeat its input (a tied
    random model with plain init does); out_gain=1 is plain init with logits O(1) rather than ~0."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(name, **config), dtype=torch.float32)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:  # Qwen2's q/k/v biases
                p.normal_(0, 0.2)
            elif "embed" in pname:
                p.normal_(0, 1.0)
            else:
                gain = out_gain if pname.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.normal_(0, gain * p.shape[1] ** -0.5)
    return hf.to(dtype).eval()


def tiny_transformer(name: str = "qwen2", seed: int = 0, **options) -> Transformer:
    """A course Transformer holding a tiny_hf model's weights (options: as tiny_hf)."""
    return Transformer.from_hf(tiny_hf(name, seed, **options))
