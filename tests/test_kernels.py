"""course_lib.kernels: the fused int4 kernels against the dequantized reference of course_lib.quant.

The Triton kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernel is built), so CI checks it without a GPU; small shapes keep it fast. Error bounds:
the Triton kernel accumulates in fp32 like the reference (a few fp32 ulps of sum |x||w|); torch's
CPU kernel computes in bf16 (activations, scales and zeros rounded to 8 mantissa bits), so its bound
is a few bf16 steps of sum |x||w|.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from course_lib import kernels  # noqa: E402
from course_lib.quant import INT4, INT8, QuantLinear, QuantScheme, quantize, quantize_model, use_kernel  # noqa: E402
from tiny import tiny_transformer  # noqa: E402

SCHEMES = [INT4, QuantScheme(4, "group", 32), QuantScheme(4, "group", 32, symmetric=False, float_zero=True)]
needs_triton = pytest.mark.skipif(kernels.triton_unavailable("cpu") is not None,
                                  reason=str(kernels.triton_unavailable("cpu")))


def weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :3] = torch.tensor([0.3, -0.25, 0.2])  # a few outliers, as real weights have
    return w


def bound(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return 8 * eps * F.linear(x.float().abs(), w.abs()) + 1e-6


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_offsets_reproduce_the_dequantized_weight(scheme):
    qt = quantize(weights(32, 128), scheme)
    from course_lib.quant import unpack_int4

    u = unpack_int4(qt.codes).float().view(32, -1, scheme.group_size)  # (R, G, g) stored codes
    rebuilt = (u * qt.scale.float()[..., None] + kernels.int4_offsets(qt)[..., None]).view(32, 128)
    torch.testing.assert_close(rebuilt, qt.dequantize(), rtol=0, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("rows, cols, batch", [(40, 128, 1), (70, 192, 3), (16, 64, 2)])
def test_triton_kernel_matches_the_reference(scheme, rows, cols, batch):
    if cols % scheme.group_size:
        pytest.skip("group size must divide the row")
    qt = quantize(weights(rows, cols), scheme)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, qt.dequantize())
    got = kernels.int4_matmul_triton(x, qt)
    assert got.shape == ref.shape and got.dtype == x.dtype
    assert ((got - ref).abs() <= bound(x, qt.dequantize(), torch.finfo(torch.float32).eps)).all()
    # partial blocks on both axes (rows 70 with BLOCK_N 32, cols 192 with BLOCK_K 128) are masked, not read past
    assert torch.isfinite(kernels.int4_matmul_triton(x, qt, block_n=32, block_k=128)).all()


@needs_triton
def test_triton_layer_and_model_equal_the_reference_path():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    layer = QuantLinear.from_linear(linear, INT4)
    x = torch.randn(2, 5, 128)
    ref = layer(x)
    assert layer.use_kernel("triton").kernel == "triton"
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="int4 with groups"):
        QuantLinear.from_linear(linear, INT8).use_kernel("triton")


def test_int4pack_cpu_kernel_matches_the_reference_within_bf16():
    reason = kernels.int4pack_unavailable(quantize(weights(64, 128), INT4))
    if reason:
        pytest.skip(reason)
    for scheme in SCHEMES:
        qt = quantize(weights(64, 128), scheme)
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
        ref = F.linear(x, qt.dequantize())
        got = kernels.Int4PackCPU(qt)(x)
        assert got.dtype == x.dtype and got.shape == ref.shape
        assert ((got - ref).abs() <= bound(x, qt.dequantize(), torch.finfo(torch.bfloat16).eps)).all(), scheme.label
        assert (got - ref).abs().max() > 0  # bf16 compute really is a different computation


def test_int4pack_refuses_what_it_cannot_take():
    assert "multiple of 16" in kernels.int4pack_unavailable(quantize(weights(40, 128), INT4))
    assert "int4 with groups" in kernels.int4pack_unavailable(quantize(weights(64, 128), INT8))
    assert "group size" in kernels.int4pack_unavailable(quantize(weights(64, 96), QuantScheme(4, "group", 48)))
    assert "CPU tensors only" in kernels.int4pack_unavailable(quantize(weights(64, 128), INT4), "cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.Int4PackCPU(quantize(weights(40, 128), INT4))


def test_use_kernel_switches_a_whole_model_or_nothing():
    model = quantize_model(tiny_transformer(), INT4)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    reasons = {kernels.int4pack_unavailable(m.qweight) for m in layers}
    if reasons == {None}:
        assert len(use_kernel(model, "int4pack")) == len(layers)
        assert {m.kernel for m in layers} == {"int4pack"}
    else:  # one layer the kernel cannot take: nothing switches, and the error names the layer
        with pytest.raises(ValueError, match="layer "):
            use_kernel(model, "int4pack")
        assert {m.kernel for m in layers} == {"reference"}
    use_kernel(model, "reference")
    with pytest.raises(ValueError, match="kernel must be"):
        use_kernel(model, "cuda-magic")
