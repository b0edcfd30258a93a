"""lowbit/runtime/fast_kernels.py against the exact dequantized weights, with error bounds from the arithmetic."""
from __future__ import annotations

import pytest
import torch

from lowbit.runtime import fast_kernels
from lowbit.runtime.kernels import KERNELS, select_kernel
from lowbit.schemes.intgrid import IntGrid

BF16_EPS = 2.0 ** -8   # relative rounding error of one bf16 value


def _schemes():
    schemes = [IntGrid(bits=4, group_size=32), IntGrid(bits=4, group_size=64, symmetric=False),
               IntGrid(bits=8, group_size=128), IntGrid(bits=5, group_size=32, symmetric=False),
               IntGrid(bits=8, group_size=-1), IntGrid(bits=3, group_size=32)]
    try:
        from lowbit.schemes.ggml import GGMLScheme
    except ImportError:
        return schemes
    return schemes + [GGMLScheme(t) for t in ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "Q3_K")]


def _weight(scheme, seed: int = 0):
    torch.manual_seed(seed)
    k = 512 if getattr(getattr(scheme, "codec", None), "block", 32) == 256 else 160
    w = torch.randn(48, k)
    w[3] = 0.0                                   # an all-zero row (zero scale) must not produce NaNs
    return scheme.quantize(w)


def _offsets(qw) -> torch.Tensor:
    """|b| per weight, expanded from the per-group affine form."""
    _, b, _ = fast_kernels.affine_form(qw)
    return b.abs().repeat_interleave(qw.effective_group_size, 1)[:, :qw.in_features]


@pytest.mark.parametrize("scheme", _schemes(), ids=lambda s: s.name)
@pytest.mark.parametrize("rows", [1, 3, 5, 40])
def test_kernels_match_dequantized_weights(scheme, rows):
    qw = _weight(scheme)
    w = qw.dequantize()
    x = torch.randn(rows, qw.in_features)
    exact = x.double() @ w.double().t()
    magnitude = x.abs().double() @ (w.abs().double() + 2 * _offsets(qw).double()).t()
    checked = 0
    for name in ("int4", "u8"):
        kernel = KERNELS[name]
        if not kernel.supports(qw):
            continue
        y = kernel.matmul(x, kernel.prepare(qw)).double()
        assert torch.isfinite(y).all()
        float32_path = name == "u8" and rows < fast_kernels.PREFILL_ROWS
        # float32 path: only summation rounding; bf16 paths: activations, weights or statistics rounded
        # to bf16 (relative 2^-8 each), bounded against sum |x| (|w| + 2|b|).
        bound = (1e-5 if float32_path else 4 * BF16_EPS) * magnitude + 1e-5
        assert ((y - exact).abs() <= bound).all(), (name, float((y - exact).abs().max()))
        checked += 1
    assert checked or fast_kernels.affine_form(qw)[2] > 4 and fast_kernels.native_library() is None


def test_auto_order_prefers_fast_kernels():
    assert select_kernel(_weight(IntGrid(bits=4, group_size=32))).name == "int4"
    if fast_kernels.native_library() is not None:
        assert select_kernel(_weight(IntGrid(bits=8, group_size=128))).name == "u8"
        # per-channel 8-bit too: the C kernel decodes as fast as int8pack and prefills much faster
        assert select_kernel(_weight(IntGrid(bits=8, group_size=-1))).name == "u8"
    else:
        assert select_kernel(_weight(IntGrid(bits=8, group_size=-1))).name == "int8pack"


def test_without_the_native_library_the_registry_falls_back(monkeypatch):
    monkeypatch.setattr(fast_kernels, "native_library", lambda: None)
    qw = _weight(IntGrid(bits=6, group_size=32))
    assert not KERNELS["u8"].supports(qw)
    kernel = select_kernel(qw)
    assert kernel.name != "u8"
    x = torch.randn(2, qw.in_features)
    torch.testing.assert_close(kernel.matmul(x, kernel.prepare(qw)), x @ qw.dequantize().t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_dequantization_is_bit_exact(monkeypatch, dtype):
    """The C pass that dequantizes weight slices for prompts equals torch's float32 math (rounded to bf16 when
    the GEMM runs in bf16), for every slice of a weight taller than one slice."""
    if fast_kernels.native_library() is None:
        pytest.skip("the C kernel could not be built here (no C compiler)")
    monkeypatch.setattr(fast_kernels, "gemm_dtype", lambda: dtype)
    monkeypatch.setattr(fast_kernels, "PREFILL_SLICE_ROWS", 24)   # several slices, the last one partial
    qw = _weight(IntGrid(bits=5, group_size=32, symmetric=False))
    a, b, _ = fast_kernels.affine_form(qw)
    group = qw.effective_group_size
    expected = (a.repeat_interleave(group, 1) * qw.codes.float() + b.repeat_interleave(group, 1)).to(dtype)
    x = torch.eye(qw.in_features)                 # rows of the identity read the weight back out
    got = fast_kernels.prefill_matmul(x, qw).t().to(dtype)
    assert torch.equal(got, expected)
