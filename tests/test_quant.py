"""course_lib.quant and course_lib.quality: error bounds, packing, layers, model swap, memory, bad input.

The bound every scheme must meet. Codes are picked with the scale as stored (rounded up, so the
range is never clipped) and rounding picks the nearest code, so no weight moves by more than half
a step:
    symmetric:  s >= max|w| / qmax, so |w / s| <= qmax and q = round(w / s) is never clamped;
                |w - q s| = s |w/s - round(w/s)| <= s / 2.
    asymmetric: z = round(-lo / s) = -lo/s + e with |e| <= 1/2, and (hi - lo) / s <= 2^b - 1, so
                w/s + z lies in [-1/2, 2^b - 1/2]: rounding then clamping to [0, 2^b - 1] moves it
                by at most 1/2, i.e. |w - (q - z) s| <= s / 2.
    float min:  m <= min w and (max w - m) / s <= 2^b - 1, so (w - m) / s lies in [0, 2^b - 1]: s / 2.
Dequantizing in fp32 adds at most a few ulps of |w| on top, hence the small relative slack.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from course_lib.quant import (
    INT4,
    INT8,
    QuantEmbedding,
    QuantLinear,
    QuantScheme,
    fake_quantize,
    model_bytes,
    pack_int4,
    quantize,
    quantize_model,
    unpack_int4,
)
from course_lib.bench.quant import bnb_config, bnb_unavailable, quantized_copy
from course_lib.transformer import ModelConfig, Transformer

SCHEMES = [
    QuantScheme(bits=bits, granularity=gran, group_size=g, symmetric=sym, float_zero=fz)
    for bits in (8, 4, 3)
    for gran, g in (("tensor", 64), ("channel", 64), ("group", 32), ("group", 64), ("group", 128))
    for sym, fz in ((True, False), (False, False), (False, True))
]


def matrices():
    torch.manual_seed(0)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(48, 256, generator=g) * 0.02
    # heavy tails: Student's t with 2 degrees of freedom (infinite variance), plus a few planted outliers
    t = torch.distributions.StudentT(2.0).sample((48, 256)) * 0.02
    t[3, 17], t[40, 200] = 25.0, -40.0
    shifted = torch.rand(48, 256, generator=g) + 0.5  # all positive: asymmetric ranges matter
    return {"normal": normal, "heavy": t, "positive": shifted}


def step_per_element(qt) -> torch.Tensor:
    """The stored scale of every element's group, (R, C)."""
    R, C = qt.shape
    s = qt.scale.float().expand(R, -1) if qt.scale.shape[0] == 1 else qt.scale.float()
    return s.repeat_interleave(C // s.shape[1], dim=1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label.replace(" ", "-"))
@pytest.mark.parametrize("kind", ["normal", "heavy", "positive"])
def test_round_trip_error_at_most_half_a_step(scheme, kind):
    w = matrices()[kind]
    qt = quantize(w, scheme)
    err = (qt.dequantize() - w).abs()
    bound = step_per_element(qt) / 2 + 4 * torch.finfo(torch.float32).eps * w.abs()
    assert (err <= bound).all(), f"max error/step {(err / step_per_element(qt)).max():.4f} > 0.5"
    codes = qt.int_codes()
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax


@pytest.mark.parametrize("scheme", [INT8, INT4, QuantScheme(4, "group", 32)], ids=lambda s: s.label)
def test_bound_is_tight_and_error_is_not_zero(scheme):
    """The bound is not vacuous: random weights use most of the half step."""
    w = matrices()["normal"]
    qt = quantize(w, scheme)
    ratio = ((qt.dequantize() - w).abs() / step_per_element(qt)).max()
    assert 0.45 < ratio <= 0.5 + 1e-4


def test_group_scales_follow_the_groups():
    w = matrices()["heavy"]
    qt = quantize(w, QuantScheme(4, "group", 32))
    assert qt.scale.shape == (48, 256 // 32) and qt.zero is None
    # the outlier at column 17 inflates only its own group's scale (columns 0..31 of row 3)
    assert qt.scale[3, 0] > 20 * qt.scale[3, 1]
    assert quantize(w, QuantScheme(8, "tensor")).scale.shape == (1, 1)
    assert quantize(w, QuantScheme(8, "channel", symmetric=False)).zero.dtype == torch.uint8
    assert quantize(w, QuantScheme(4, "group", 64, symmetric=False, float_zero=True)).zero.dtype == torch.float16


def test_smaller_groups_lower_the_error_on_heavy_tails():
    w = matrices()["heavy"]
    errors = [(fake_quantize(w, QuantScheme(4, "group", g)) - w).pow(2).mean() for g in (32, 64, 128)]
    per_channel = (fake_quantize(w, QuantScheme(4, "channel")) - w).pow(2).mean()
    assert errors[0] < errors[1] < errors[2] < per_channel


def test_int4_pack_unpack_is_exact():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([1, 2, 15, 0])).tolist() == [0x21, 0x0F]  # element 2i low nibble
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_int4_packing_rejects_bad_codes():
    with pytest.raises(ValueError, match="even number"):
        pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([3, 16]))


@pytest.mark.parametrize("scheme", [INT8, INT4, QuantScheme(4, "group", 32, symmetric=False, float_zero=True),
                                    QuantScheme(8, "tensor", symmetric=False)], ids=lambda s: s.label)
def test_quant_linear_equals_linear_with_dequantized_weight(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 40, bias=True)
    q = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(3, 5, 128)
    expected = F.linear(x, quantize(linear.weight, scheme).dequantize(), linear.bias)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)
    assert not torch.equal(q.qweight.dequantize(), linear.weight)  # it really is quantized
    assert q.codes.dtype == (torch.uint8 if scheme.bits == 4 or not scheme.symmetric else torch.int8)


LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("scheme", [INT8, INT4, QuantScheme(4, "group", 32, symmetric=False, float_zero=True)],
                         ids=lambda s: s.label)
def test_round_trip_error_bounded_in_every_dtype(scheme, dtype):
    """Dequantizing into bf16/fp16 adds one rounding of the result (eps/2 of |w|) to the s/2 bound."""
    w = matrices()["heavy"]
    qt = quantize(w, scheme)
    err = (qt.dequantize(dtype).float() - w).abs()
    eps = torch.finfo(dtype).eps
    bound = step_per_element(qt) * (0.5 + eps) + eps * w.abs() + 4 * torch.finfo(torch.float32).eps * w.abs()
    assert (err <= bound).all(), f"{dtype}: max excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("scheme", [INT8, INT4], ids=lambda s: s.label)
def test_quant_linear_is_safe_and_accurate_in_every_dtype(scheme, dtype):
    """Activations as large as the default model's (|x| ~ 450 into a down projection) must not
    overflow fp16: x . q is ~1/s times the real output, so int8 may not factor the scale out there.
    Bound: rounding x and the dequantized weight to the dtype (eps each, relative) plus rounding
    the output (eps |y|), with fp32 accumulation; 4x margin."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(1536, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 1536, generator=g) * 0.02)
    x = torch.randn(4, 1536, generator=g) * 60
    x[:, :8] = 450.0  # a few large channels, as real activations have
    q = QuantLinear.from_linear(linear, scheme)
    w_deq = quantize(linear.weight, scheme).dequantize()  # fp32
    x_low = x.to(dtype)
    expected = F.linear(x_low.float(), w_deq)  # exact-ish reference from the same rounded input
    y = q.to(dtype)(x_low).float()
    assert torch.isfinite(y).all(), f"{scheme.label} in {dtype} overflowed"
    eps = torch.finfo(dtype).eps
    bound = 4 * eps * (F.linear(x_low.float().abs(), w_deq.abs()) + expected.abs()) + 1e-5
    assert ((y - expected).abs() <= bound).all(), f"max excess {((y - expected).abs() - bound).max():.3g}"


def test_quant_embedding_dequantizes_only_the_rows_it_reads():
    w = matrices()["normal"]
    for scheme in (INT8, INT4, QuantScheme(8, "tensor")):
        qt = quantize(w, scheme)
        emb = QuantEmbedding(qt)
        ids = torch.tensor([[0, 5, 47], [5, 5, 1]])
        torch.testing.assert_close(emb(ids), qt.dequantize()[ids], rtol=0, atol=0)


def tiny_course(tie=True) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, max_position=64, tie_embeddings=tie)
    return Transformer(cfg).eval()


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_swap_replaces_block_linears_and_keeps_head_and_embeddings():
    model = tiny_course()
    before = linear_names(model)
    quantize_model(model, INT8)
    assert linear_names(model) == {"lm_head"}  # 2 layers x 7 linears replaced, the head kept
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(before) - 1 == 14
    assert isinstance(model.embed_tokens, torch.nn.Embedding)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied


def test_swapped_model_equals_model_with_fake_quantized_weights():
    model, ref = tiny_course(), tiny_course()
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(fake_quantize(m.weight, INT4))
    quantize_model(model, INT4)
    tokens = torch.randint(0, 96, (2, 11))
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)


def test_tied_head_and_embedding_become_one_quantized_matrix():
    model = quantize_model(tiny_course(), INT4, keep_head=False, keep_embeddings=False, embedding_scheme=INT8)
    assert isinstance(model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.codes is model.embed_tokens.codes and model.lm_head.scheme == INT8
    counted = model_bytes(model)
    assert counted.float_weights == sum(p.numel() * 4 for n, p in model.named_parameters())  # only norms left
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down weights
    assert counted.codes == 96 * 64 + 2 * per_layer // 2  # int8 embedding/head + int4 blocks


def test_untied_head_can_be_quantized_alone():
    model = quantize_model(tiny_course(tie=False), INT8, keep_head=False)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.embed_tokens, torch.nn.Embedding)


def test_tied_flags_must_agree():
    with pytest.raises(ValueError, match="tied"):
        quantize_model(tiny_course(), INT8, keep_head=False, keep_embeddings=True)


def test_swap_works_on_a_transformers_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    quantize_model(model, INT8, keep_head=False, keep_embeddings=False)
    assert linear_names(model) == set()
    assert model.get_output_embeddings().codes is model.get_input_embeddings().codes
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("options", [{}, dict(keep_head=False, keep_embeddings=False, embedding_scheme=INT8)],
                         ids=["floats kept", "all quantized"])
def test_quantized_copy_equals_a_deep_copy_and_shares_the_floats_it_keeps(options):
    model = tiny_course()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    shared = quantized_copy(model, INT4, **options)
    ref = quantize_model(copy.deepcopy(model), INT4, **options)
    tokens = torch.randint(0, 96, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(shared(tokens), ref(tokens), rtol=0, atol=0)
    assert model_bytes(shared) == model_bytes(ref)  # counted as if it owned its floats
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the original is untouched
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 0
    ours = {id(p) for p in model.parameters()}
    kept = [p for p in shared.parameters()]
    assert kept and all(id(p) in ours for p in kept)  # every float tensor of the copy is the original's
    if options:
        assert isinstance(shared.embed_tokens, QuantEmbedding)
    else:
        assert shared.embed_tokens.weight is model.embed_tokens.weight


def test_bitsandbytes_says_why_it_cannot_run(monkeypatch):
    import importlib.util

    pytest.importorskip("bitsandbytes")
    assert bnb_unavailable("smollm2-135m", "cpu") is None
    assert "random weights" in bnb_unavailable("smollm2-mha-mini:random", "cpu")
    assert "not on mps" in bnb_unavailable("smollm2-135m", "mps")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert "not installed" in bnb_unavailable("smollm2-135m", "cpu")


@pytest.mark.parametrize("scheme", [INT8, INT4, QuantScheme(4, "group", 32, symmetric=False, float_zero=True)],
                         ids=lambda s: s.label)
def test_memory_accounting_is_exact(scheme):
    model = quantize_model(tiny_course(), scheme)
    counted = model_bytes(model)
    buffers = {n.rsplit(".", 1)[-1]: 0 for n, _ in model.named_buffers()}
    for n, b in model.named_buffers():
        buffers[n.rsplit(".", 1)[-1]] += b.numel() * b.element_size()
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied matrix yielded once
    assert counted.codes == buffers["codes"]
    assert counted.scales == buffers["scale"]
    assert counted.zero_points == buffers.get("zero", 0)
    assert counted.float_weights == params
    assert counted.total == buffers["codes"] + buffers["scale"] + buffers.get("zero", 0) + params
    n = counted.quantized_params
    assert n == sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    # the same figure from the format: bits per weight + a 16-bit scale (+ zero) per group
    group = {"channel": None, "group": scheme.group_size}[scheme.granularity]
    rows = sum(m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    groups = rows if group is None else n // group
    zero_bytes = 0 if scheme.symmetric else (2 if scheme.float_zero else 1)
    assert counted.quantized_bytes == n * scheme.bits // 8 + groups * (2 + zero_bytes)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_unsupported_bit_widths_raise(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, -32, 2.5])
def test_bad_group_sizes_raise(group_size):
    with pytest.raises(ValueError, match="positive integer"):
        QuantScheme(bits=4, granularity="group", group_size=group_size)


def test_group_size_must_divide_the_row():
    with pytest.raises(ValueError, match="does not divide the row length 576"):
        quantize(torch.randn(8, 576), QuantScheme(4, "group", 128))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(tiny_course(), QuantScheme(4, "group", 96))


def test_other_bad_input_raises():
    with pytest.raises(ValueError, match="granularity"):
        QuantScheme(granularity="row")
    with pytest.raises(ValueError, match="symmetric=False"):
        QuantScheme(bits=4, float_zero=True)
    with pytest.raises(ValueError, match="2-D float"):
        quantize(torch.randn(4, 4, 4), INT8)
    with pytest.raises(ValueError, match="2-D float"):
        quantize(torch.randint(0, 5, (4, 4)), INT8)
    with pytest.raises(ValueError, match="even"):
        quantize(torch.randn(4, 7), QuantScheme(4, "channel"))
    with pytest.raises(ValueError, match="float32"):
        quantize(torch.full((2, 4), 1e7), INT8)
    with pytest.raises(ValueError, match="unknown bitsandbytes kind"):
        bnb_config("int3")


# ---- the real default model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def course_fp32(default_model):
    return Transformer.from_hf(default_model[0])


def test_q4_1_grid_is_reproduced_exactly_by_int4_g32_float_min(course_fp32):
    """The default model was shipped as Q4_1 (4-bit, groups of 32, fp16 scale and min) with a Q8_0
    embedding; the matching formats give back its weights bit for bit, a mismatched one does not."""
    q4_1 = QuantScheme(4, "group", 32, symmetric=False, float_zero=True)
    layer = course_fp32.layers[7]
    for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
        assert torch.equal(fake_quantize(linear.weight, q4_1), linear.weight)
    assert not torch.equal(fake_quantize(layer.mlp.down_proj.weight, QuantScheme(4, "group", 32, symmetric=False)),
                           layer.mlp.down_proj.weight)
    emb = course_fp32.embed_tokens.weight
    assert torch.equal(fake_quantize(emb, QuantScheme(8, "group", 32)), emb)  # Q8_0


def test_real_model_int8_bytes_and_next_token(default_model, course_fp32):
    import copy

    _, tokenizer, _ = default_model
    q8 = quantize_model(copy.deepcopy(course_fp32), INT8)
    counted = model_bytes(q8)
    assert counted.quantized_params == 30 * (3 * 576 * 1536 + 2 * 576 * 576 + 2 * 576 * 192)
    assert counted.quantized_bytes / (counted.quantized_params * 4) < 0.26
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert q8(ids)[0, -1].argmax() == course_fp32(ids)[0, -1].argmax()


def test_bitsandbytes_models_are_counted(tmp_path):
    """model_bytes reads bitsandbytes' own layers: int8 codes + one fp32 scale per row (LLM.int8),
    4-bit codes two per byte + block absmax (NF4), as loaded and after a forward (a CPU repacks NF4)."""
    pytest.importorskip("bitsandbytes")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    n = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # weights of the 14 linear layers
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    for kind in ("llm.int8", "nf4"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config(kind), device_map="cpu")
        for _ in range(2):
            counted = model_bytes(model)
            assert counted.quantized_params == n
            if kind == "llm.int8":
                assert (counted.codes, counted.scales) == (n, 4 * rows)
            else:
                assert counted.codes == n // 2
                assert n // 64 * 2 <= counted.scales <= n // 64 * 4 + 14 * 16 * 4  # bf16/fp32 absmax + code tables
            assert counted.float_weights == (128 * 64 + 5 * 64) * 4  # tied embedding/head + 5 norms, fp32
            with torch.inference_mode():
                model(torch.tensor([[1, 2, 3]]))
