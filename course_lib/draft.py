"""Draft models for speculative decoding: the offline draft and the online pairs. Built in notebooks/07_speculative_decoding.ipynb.

A draft must share the target's tokenizer and cost far less per step. The offline default
(SmolLM2-135M, 30 layers, 49,152-token vocabulary) has no smaller sibling, so the course ships
its own: a Llama-shaped decoder of a few layers that borrows the target's frozen embedding
matrix at run time and stores only its own layers (data/draft/draft.safetensors, fp16).
Its output head scores only the `head_vocab` most frequent tokens of the target's answers (rows
of the same embedding matrix): at batch 1 a step reads every head weight, and a full
49,152 x 576 head alone would cost a fifth of a target step. A token outside the head is never
proposed; speculative sampling stays exact for any draft distribution, so this costs acceptance,
never correctness. (FR-Spec, Zhao et al. 2025, prunes a draft's vocabulary the same way.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.paths import data_path
from course_lib.transformer import Block, ModelConfig, RMSNorm, RotaryEmbedding, Transformer, unfused_state_dict

# Shape letters: B batch, T tokens, C hidden size, K head vocabulary, V full vocabulary.

DRAFT_FILE = "draft.safetensors"

# Target preset -> draft presets that share its tokenizer (hub models: GPU / Colab with network).
# "offline-draft" is this module's distilled draft for the offline default.
DRAFT_PAIRS: dict[str, tuple[str, ...]] = {
    "smollm2-135m": ("offline-draft",),
    "smollm2-360m": ("smollm2-135m",),
    "smollm2-1.7b": ("smollm2-135m", "smollm2-360m"),
    "qwen2.5-1.5b": ("qwen2.5-0.5b",),
}


@dataclass(frozen=True)
class DraftConfig:
    """The shape of the offline draft: the target's width, few layers, a pruned head."""

    num_layers: int = 2  # decoder blocks (the target has 30)
    head_vocab: int = 8192  # output head rows: the most frequent answer tokens (of 49,152)
    init_layers: tuple[int, ...] = (0, 1)  # target layers copied in as the starting point

    def __post_init__(self):
        if self.num_layers < 1 or self.head_vocab < 2:
            raise ValueError(f"need num_layers >= 1 and head_vocab >= 2, got {self.num_layers}, {self.head_vocab}")
        if len(self.init_layers) != self.num_layers:
            raise ValueError(f"init_layers names {len(self.init_layers)} target layers for {self.num_layers} draft layers")


class DraftModel(nn.Module):
    """A few decoder blocks between the target's frozen embedding and a head over head_ids.

    Called like the course Transformer: (tokens (B, T), input_pos, kv_cache) -> logits (B, T, V),
    with -inf for tokens outside the head, so KVCache, prefill and decode_step work unchanged.
    """

    def __init__(self, target_config: ModelConfig, config: DraftConfig, embed_weight: torch.Tensor,
                 head_ids: torch.Tensor):
        super().__init__()
        if head_ids.numel() != config.head_vocab:
            raise ValueError(f"head_ids has {head_ids.numel()} ids, config.head_vocab is {config.head_vocab}")
        self.draft_config = config
        self.config = dataclasses.replace(target_config, num_layers=config.num_layers)  # KVCache.for_model reads it
        self.layers = nn.ModuleList(Block(self.config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(target_config.hidden_size, target_config.rms_norm_eps)
        self.rope = RotaryEmbedding(target_config.head_dim, target_config.max_position, target_config.rope_theta)
        # Borrowed, frozen, not saved: the target's embedding matrix (V, C) and its head rows (K, C).
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        self.register_buffer("head_ids", head_ids.long().sort().values, persistent=False)
        self.register_buffer("head_weight", self.embed_weight[self.head_ids].clone(), persistent=False)

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Final normalized hidden states (B, T, C)."""
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rope(input_pos)
        x = F.embedding(tokens, self.embed_weight)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, kv_cache)
        return self.norm(x)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of the K head tokens (..., K): the only matmul against the vocabulary."""
        return hidden @ self.head_weight.T

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, kv_cache=None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), -inf outside the head vocabulary (last_only: (B, 1, V))."""
        if mask is not None:
            raise ValueError("DraftModel does not take an attention mask (batch-1 speculation only)")
        hidden = self.hidden(tokens, input_pos, kv_cache)  # (B, T, C)
        sub = self.head_logits(hidden[:, -1:] if last_only else hidden)  # (B, T or 1, K)
        logits = sub.new_full((*sub.shape[:-1], self.embed_weight.shape[0]), float("-inf"))  # (B, T, V)
        return logits.index_copy_(-1, self.head_ids, sub)

    def num_parameters(self) -> int:
        """Parameters the draft owns (the borrowed embedding and head rows are not counted)."""
        return sum(p.numel() for p in self.parameters())


def init_from_target(target: Transformer, config: DraftConfig, head_ids: torch.Tensor) -> DraftModel:
    """A draft whose blocks and final norm start as copies of target layers config.init_layers."""
    draft = DraftModel(target.config, config, target.embed_tokens.weight, head_ids)
    ref = target.embed_tokens.weight
    draft = draft.to(device=ref.device, dtype=ref.dtype)
    for mine, theirs in zip(draft.layers, config.init_layers):
        mine.load_state_dict(unfused_state_dict(target.layers[theirs]))  # the target's blocks may be fused
    draft.norm.load_state_dict(target.norm.state_dict())
    return draft


def default_draft_path() -> Path:
    """The course's distilled draft, data/draft/draft.safetensors (found by course_lib.paths)."""
    return data_path(f"draft/{DRAFT_FILE}")


def save_draft(draft: DraftModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the draft's own weights (fp16) and head ids, with its config in the metadata."""
    from safetensors.torch import save_file

    # state_dict holds the draft's own layers and norm: the borrowed matrices are non-persistent buffers.
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in draft.state_dict().items()}
    tensors["head_ids"] = draft.head_ids.to("cpu", torch.int32)
    cfg = draft.draft_config
    meta = {"num_layers": str(cfg.num_layers), "head_vocab": str(cfg.head_vocab),
            "init_layers": ",".join(map(str, cfg.init_layers)), **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_draft(target: Transformer, path: str | Path | None = None) -> DraftModel:
    """The offline draft for `target` (the course Transformer of the default model), on its device and dtype."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_draft_path()
    if not path.is_file():
        raise FileNotFoundError(f"no draft weights at {path}: train them with `python tools/train_draft.py data` "
                                "then `python tools/train_draft.py train`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = DraftConfig(num_layers=int(meta["num_layers"]), head_vocab=int(meta["head_vocab"]),
                         init_layers=tuple(int(x) for x in meta["init_layers"].split(",")))
    if target.config.hidden_size != tensors["norm.weight"].shape[0]:
        raise ValueError(f"this draft was made for hidden size {tensors['norm.weight'].shape[0]}, "
                         f"the target has {target.config.hidden_size}: it drafts only for the offline default model")
    head_ids = tensors.pop("head_ids")
    ref = target.embed_tokens.weight
    draft = DraftModel(target.config, config, ref, head_ids).to(device=ref.device, dtype=ref.dtype)
    draft.load_state_dict({k: v.to(ref.dtype) for k, v in tensors.items()}, strict=True)
    return draft.eval()


def shape_only_draft(target: Transformer, num_layers: int = 2) -> DraftModel:
    """An untrained draft shaped for any target: copies of its first layers and a head over the
    first min(8192, V) token ids. For random-weight (shape-only) targets: it measures the cost of
    drafting (c), not a meaningful acceptance rate."""
    layers = min(num_layers, target.config.num_layers)
    config = DraftConfig(num_layers=layers, head_vocab=min(DraftConfig.head_vocab, target.config.vocab_size),
                         init_layers=tuple(range(layers)))
    head_ids = torch.arange(config.head_vocab, device=target.embed_tokens.weight.device)
    return init_from_target(target, config, head_ids).eval()


def draft_label(target_name: str, draft_name: str | None = None) -> str:
    """What draft_for(target, target_name, draft_name) returns, in words."""
    from course_lib.models import RANDOM_SUFFIX

    if target_name.endswith(RANDOM_SUFFIX) and target_name.removesuffix(RANDOM_SUFFIX) not in DRAFT_PAIRS:
        return "untrained 2-layer draft copied from the shape-only target (measures cost, not acceptance)"
    pair = draft_name or DRAFT_PAIRS.get(target_name.removesuffix(RANDOM_SUFFIX), ("?",))[0]
    if pair == "offline-draft":
        return ("the course's distilled 2-layer draft (data/draft)" if not target_name.endswith(RANDOM_SUFFIX)
                else "untrained 2-layer draft copied from the shape-only target (measures cost, not acceptance)")
    return pair + (RANDOM_SUFFIX if target_name.endswith(RANDOM_SUFFIX) else "")


def draft_for(target: Transformer, target_name: str, draft_name: str | None = None) -> nn.Module:
    """The draft of DRAFT_PAIRS[target_name] (the first unless draft_name), as a course model on the
    target's device and dtype. Hub drafts need the network; offline they raise ModelUnavailableError.
    A random-weight target ("name:random") gets its pair with random weights too, or, where the pair
    is the offline draft or there is none, shape_only_draft(target): draft_label says which."""
    from course_lib.models import RANDOM_SUFFIX, load_model

    random_weights = target_name.endswith(RANDOM_SUFFIX)
    preset = target_name.removesuffix(RANDOM_SUFFIX)
    if random_weights and (draft_name or DRAFT_PAIRS.get(preset, ("offline-draft",))[0]) == "offline-draft":
        return shape_only_draft(target)
    if preset not in DRAFT_PAIRS:
        raise ValueError(f"no draft pair for {target_name!r}; pairs: {DRAFT_PAIRS}")
    draft_name = draft_name or DRAFT_PAIRS[preset][0]
    if draft_name not in DRAFT_PAIRS[preset]:
        raise ValueError(f"{draft_name!r} is not a draft for {preset!r}: choose from {DRAFT_PAIRS[preset]}")
    if draft_name == "offline-draft":
        return load_draft(target)
    ref = next(target.parameters())
    hf_draft, _, _ = load_model(draft_name + (RANDOM_SUFFIX if random_weights else ""), ref.device, ref.dtype)
    draft = Transformer.from_hf(hf_draft)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocabulary {draft.config.vocab_size} != target vocabulary {target.config.vocab_size}")
    return draft


def load_spec_pair(target_name: str, draft_name: str | None = None, device=None, dtype=None):
    """(target Transformer, draft, tokenizer, target ModelInfo) for a pair of DRAFT_PAIRS."""
    from course_lib.models import load_model

    if target_name not in DRAFT_PAIRS:  # fail before a download
        raise ValueError(f"no draft pair for {target_name!r}; pairs: {DRAFT_PAIRS}")
    hf_target, tokenizer, info = load_model(target_name, device, dtype)
    target = Transformer.from_hf(hf_target)
    return target, draft_for(target, target_name, draft_name), tokenizer, info


class PrunedHead(nn.Module):
    """An output head over K token ids that returns full-vocabulary logits (-inf elsewhere)."""

    def __init__(self, weight: torch.Tensor, head_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)  # (K, C)
        self.register_buffer("head_ids", head_ids, persistent=False)  # (K,)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = hidden @ self.weight.T  # (B, T, K)
        logits = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))  # (B, T, V)
        return logits.index_copy_(-1, self.head_ids, sub)


def to_hf_assistant(draft: DraftModel):
    """The offline draft as a transformers LlamaForCausalLM (same weights, same logits), usable as
    `assistant_model=` in transformers' generate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = draft.config
    hf_config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                            head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                            max_position_embeddings=cfg.max_position, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
    ref = draft.embed_weight
    with torch.device(ref.device):
        hf = LlamaForCausalLM(hf_config).to(ref.dtype)
    hf.model.embed_tokens.weight = nn.Parameter(ref, requires_grad=False)  # shared with the target, no copy
    sd = {f"model.{k}": v for k, v in draft.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"model.embed_tokens.weight", "lm_head.weight"}:
        raise RuntimeError(f"weight names do not line up: missing {missing}, unexpected {unexpected}")
    hf.lm_head = PrunedHead(draft.head_weight, draft.head_ids, cfg.vocab_size)
    return hf.eval()
