"""course_lib.transformer against transformers: real weights, tiny random configs, the KV-cache hook."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from course_lib.generation import SamplingConfig, generate_naive
from tiny import FAMILIES, tiny_config
from tiny import tiny_hf as _tiny_hf
from course_lib.transformer import (
    ModelConfig,
    RMSNorm,
    RotaryEmbedding,
    Transformer,
    apply_rotary,
    bytes_per_token,
    flops_per_token,
    parameter_counts,
)

TOL = 1e-4  # max abs logit difference allowed in fp32

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    # a longer one: a few hundred tokens
    " ".join(f"Step {i}: the model reads every earlier token before it writes the next one." for i in range(25)),
]

FAMILIES_TESTED = sorted(FAMILIES)


def tiny_hf(name: str, dtype=torch.float32):
    """A tiny transformers model (plain init, logits O(1)) with max_position 128."""
    return _tiny_hf(name, dtype=dtype, out_gain=1.0, max_position=128)


@pytest.fixture(scope="module")
def real(default_model):
    hf, tokenizer, _ = default_model
    return hf, Transformer.from_hf(hf), tokenizer


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "sentence", "code", "long"])
def test_real_model_logits_match_transformers(real, prompt):
    hf, ours, tokenizer = real
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL, f"{ids.shape[1]} tokens: max abs logit diff {diff:.2e}"


def test_long_prompt_is_long(real):
    assert real[2](PROMPTS[-1], return_tensors="pt").input_ids.shape[1] > 300


@pytest.mark.parametrize("name", FAMILIES_TESTED)
def test_tiny_random_logits_match_transformers(name):
    hf = tiny_hf(name)
    ours = Transformer.from_hf(hf)
    ids = torch.randint(0, tiny_config(name, max_position=128).vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        diff = (ours(ids) - ref).abs().max().item()
    assert ref.abs().max() > 1.0, "weights too small for the comparison to mean anything"
    assert diff <= TOL, f"{name}: max abs logit diff {diff:.2e}"


def test_from_hf_keeps_dtype_and_structure():
    hf = tiny_hf("qwen2", dtype=torch.bfloat16)
    ours = Transformer.from_hf(hf)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.layers[0].self_attn.q_proj.bias is not None and ours.layers[0].self_attn.o_proj.bias is None
    assert ours.lm_head.weight.data_ptr() != ours.embed_tokens.weight.data_ptr()  # untied
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids).float() - hf(ids).logits.float()).abs().max().item()
    assert diff <= 0.1, f"bf16 max abs logit diff {diff:.3f}"


def test_tied_head_is_one_tensor_and_counted_once():
    hf = tiny_hf("smollm2")
    ours = Transformer.from_hf(hf)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    with torch.no_grad():  # a copy, not a view: changing ours leaves transformers' model alone
        ours.embed_tokens.weight.zero_()
    assert hf.model.embed_tokens.weight.abs().sum() > 0


def test_greedy_64_tokens_identical_to_transformers_generate(real):
    hf, ours, tokenizer = real
    ids = tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    ref_new = ref[0, ids.shape[1]:].tolist()
    new = generate_naive(ours, ids, 64, SamplingConfig(), stop_ids=[tokenizer.eos_token_id])
    assert len(ref_new) == 64, "the reference stopped early: pick a prompt that runs 64 tokens"
    assert new == ref_new


def test_batched_positions_equal_broadcast_positions():
    ours = Transformer.from_hf(tiny_hf("smollm2"))
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(5, 25)  # positions need not start at 0
    with torch.no_grad():
        a = ours(ids, pos)
        b = ours(ids, pos.expand(3, 20))
        c = ours(ids)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c), "positions must change the result (RoPE)"


class ConcatCache:
    """The smallest object that speaks the kv_cache hook: keep every layer's keys/values, append."""

    def __init__(self):
        self.k, self.v, self.calls = {}, {}, []

    def update(self, layer_idx, input_pos, k, v):
        self.calls.append((layer_idx, input_pos.tolist(), tuple(k.shape)))
        if layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k], dim=2)  # (B, KV, S, D)
            v = torch.cat([self.v[layer_idx], v], dim=2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_kv_cache_hook_prefill_then_decode_matches_full_forward(which, request):
    if which == "real":
        ours = request.getfixturevalue("real")[1]
    else:
        ours = Transformer.from_hf(tiny_hf("qwen2"))
    cfg = ours.config
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    cache, prefill = ConcatCache(), 9
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :prefill], torch.arange(prefill), kv_cache=cache)]
        for t in range(prefill, ids.shape[1]):
            steps.append(ours(ids[:, t:t + 1], torch.tensor([t]), kv_cache=cache))
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= TOL, f"cached vs full forward: max abs logit diff {diff:.2e}"
    assert cache.calls[0] == (0, list(range(prefill)), (2, cfg.num_kv_heads, prefill, cfg.head_dim))
    assert [c[0] for c in cache.calls[:cfg.num_layers]] == list(range(cfg.num_layers))
    assert cache.k[0].shape == (2, cfg.num_kv_heads, ids.shape[1], cfg.head_dim)


def test_left_padding_with_mask_and_per_sequence_positions():
    ours = Transformer.from_hf(tiny_hf("llama"))
    short = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    long = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(6))
    pad = 4
    tokens = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])  # (2, 10)
    is_real = torch.ones(2, 10, dtype=torch.bool)
    is_real[0, :pad] = False
    input_pos = (is_real.cumsum(1) - 1).clamp(min=0)  # (2, 10): the short row counts from its first real token
    mask = is_real[:, None, None, :]  # (B, 1, 1, S): never attend to padding
    with torch.no_grad():
        batched = ours(tokens, input_pos, mask=mask)
        alone_short, alone_long = ours(short), ours(long)
    assert torch.isfinite(batched).all(), "padding rows must not produce NaN"
    assert (batched[0, pad:] - alone_short[0]).abs().max() <= TOL
    assert (batched[1] - alone_long[0]).abs().max() <= TOL


def test_mask_is_anded_with_causality():
    ours = Transformer.from_hf(tiny_hf("llama"))
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(7))
    everything = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    hide_first = everything.clone()
    hide_first[..., 0] = False
    with torch.no_grad():
        assert torch.equal(ours(ids, mask=everything), ours(ids))  # an all-True mask cannot undo causality
        changed = (ours(ids, mask=hide_first) - ours(ids)).abs().amax(dim=-1)[0]
    assert (changed[1:] > 1e-3).all()


def test_components_match_transformers_modules():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    ours, ref = RMSNorm(16, eps=1e-6), LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    assert torch.equal(ours(x), ref(x))
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    rope = RotaryEmbedding(8, 32, theta=10_000.0)
    cos, sin = rope(pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.allclose(apply_rotary(q, cos, sin), q_ref) and torch.allclose(apply_rotary(k, cos, sin), k_ref)
    # RoPE is a rotation: it keeps each vector's length
    assert torch.allclose(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES_TESTED)
def test_config_from_hf_round_trips(name):
    hf_cfg = tiny_config(name, max_position=128)
    cfg = ModelConfig.from_hf(hf_cfg)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        hf_cfg.vocab_size, hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads,
        hf_cfg.num_key_value_heads)
    assert cfg.head_dim == (getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    assert cfg.intermediate_size == hf_cfg.intermediate_size
    assert cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == hf_cfg.rms_norm_eps and cfg.max_position == hf_cfg.max_position_embeddings
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings and cfg.qkv_bias == (name == "qwen2")
    assert Transformer(cfg).config == cfg and ModelConfig.from_hf(tiny_hf(name).config) == cfg


def test_real_config_from_hf(real):
    cfg = real[1].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias) == (49152, 100_000.0, True, False)


@pytest.mark.parametrize("name", FAMILIES_TESTED)
def test_parameter_flop_and_byte_counts(name):
    ours = Transformer.from_hf(tiny_hf(name))
    cfg = ours.config
    counts = parameter_counts(cfg)
    assert sum(counts.values()) == ours.num_parameters()
    assert counts["attention"] == sum(p.numel() for layer in ours.layers for p in layer.self_attn.parameters())
    assert counts["mlp"] == sum(p.numel() for layer in ours.layers for p in layer.mlp.parameters())
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in ours.modules() if isinstance(m, torch.nn.Linear))  # the head counts, tied or not
    assert flops_per_token(cfg) == 2 * linear
    assert flops_per_token(cfg, context=10) - flops_per_token(cfg) == 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 10
    head_extra = cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0  # tied head rereads the table
    table = cfg.vocab_size * cfg.hidden_size
    assert bytes_per_token(cfg, 2) == 2 * (ours.num_parameters() - table + cfg.hidden_size + head_extra)


def test_bad_input_raises():
    ours = Transformer.from_hf(tiny_hf("llama"))  # max_position 128
    with pytest.raises(ValueError, match="exceed max_position"):
        ours(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position"):
        ours(torch.zeros(1, 4, dtype=torch.long), torch.arange(126, 130))
    with pytest.raises(ValueError, match=r"input_pos must be"):
        ours(torch.zeros(2, 4, dtype=torch.long), torch.arange(5))
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\)"):
        ours(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(100, 64, 1, num_heads=4, num_kv_heads=3, head_dim=16, intermediate_size=128)
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf(LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))


# ---- fused projections (built at load time by from_hf) -------------------------------------------

@pytest.mark.parametrize("name", FAMILIES_TESTED)
def test_fused_and_unfused_models_match_transformers(name):
    """from_hf fuses q/k/v and gate/up into one matmul each; both layouts compute transformers' logits,
    and the fused layer's rows are transformers' q, k, v (gate, up) weights in that order."""
    hf = tiny_hf(name)
    fused, plain = Transformer.from_hf(hf), Transformer.from_hf(hf, fused=False)
    assert fused.fused and not plain.fused
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf(ids).logits
        for ours in (fused, plain):
            diff = (ours(ids) - ref).abs().max().item()
            assert diff <= TOL, f"{name}, fused={ours.fused}: max abs logit diff {diff:.2e}"
    attn, mlp, hf_attn, hf_mlp = fused.layers[1].self_attn, fused.layers[1].mlp, hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    assert set(attn._modules) == {"qkv_proj", "o_proj"} and set(mlp._modules) == {"gate_up_proj", "down_proj"}
    assert torch.equal(attn.qkv_proj.weight, torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]))
    assert attn.qkv_proj.weight.shape[0] == sum(attn.qkv_split) == hf_attn.q_proj.out_features + 2 * hf_attn.k_proj.out_features
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
    # the checkpoint's names still read, as views of the fused rows
    assert torch.equal(attn.k_proj.weight, hf_attn.k_proj.weight) and torch.equal(mlp.up_proj.weight, hf_mlp.up_proj.weight)
    assert attn.v_proj.weight.data_ptr() != hf_attn.v_proj.weight.data_ptr()  # ours, not transformers'
    if name == "qwen2":
        assert torch.equal(attn.v_proj.bias, hf_attn.v_proj.bias)
    assert fused.num_parameters() == plain.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", FAMILIES_TESTED)
def test_unfused_state_dict_is_the_checkpoint_layout(name):
    from course_lib.transformer import unfused_state_dict

    hf = tiny_hf(name)
    sd = unfused_state_dict(Transformer.from_hf(hf))
    ref = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="unfused"):
        Transformer.from_hf(hf).load_hf_state_dict(hf.state_dict())


def test_fused_model_keeps_its_logits_quantized_like_the_unfused_one():
    """quantize_model swaps nn.Linear layers by name: a fused qkv_proj becomes one QuantLinear, and with
    per-row scales (codes per output row) it holds exactly the codes of the three separate layers."""
    from course_lib.quant import INT8, QuantLinear, quantize_model

    hf = tiny_hf("qwen2")
    fused = quantize_model(Transformer.from_hf(hf), INT8)
    plain = quantize_model(Transformer.from_hf(hf, fused=False), INT8)
    attn, ref = fused.layers[0].self_attn, plain.layers[0].self_attn
    assert isinstance(attn.qkv_proj, QuantLinear) and isinstance(fused.layers[0].mlp.gate_up_proj, QuantLinear)
    assert torch.equal(attn.qkv_proj.codes, torch.cat([ref.q_proj.codes, ref.k_proj.codes, ref.v_proj.codes]))
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (fused(ids) - plain(ids)).abs().max() <= TOL
    with pytest.raises(AttributeError, match="fused"):
        attn.q_proj


def test_gqa_without_copies_equals_repeat_kv(monkeypatch):
    """enable_gqa reads each key/value head in place; the fallback for torch < 2.5 copies it per
    query head (repeat_kv): the same attention."""
    import course_lib.transformer as transformer

    ours = Transformer.from_hf(tiny_hf("smollm2"))  # 9 query heads share 3 KV heads
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        in_place = ours(ids)
        monkeypatch.setattr(transformer, "SDPA_HAS_GQA", False)
        copied = ours(ids)
    assert (in_place - copied).abs().max() <= TOL


def test_last_only_gives_the_last_row_of_the_full_forward():
    ours = Transformer.from_hf(tiny_hf("smollm2"))
    ids = torch.randint(0, 300, (2, 25), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full, last = ours(ids), ours(ids, last_only=True)
    assert last.shape == (2, 1, ours.config.vocab_size)
    assert (last[:, 0] - full[:, -1]).abs().max() <= TOL
