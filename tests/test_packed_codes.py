"""A loaded 4-bit weight keeps its codes once, in the compiled kernels' nibble layout (two codes per byte), and
gives the exact codes back to anything that asks (methods, writers), act-order column orders included."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.quantized import QuantizedWeight, packed_codes
from lowbit.runtime.clib import native_library
from lowbit.runtime.cpu import float32_arithmetic
from lowbit.runtime.surgery import install_quantized
from lowbit.schemes.intgrid import IntGrid

pytestmark = pytest.mark.skipif(native_library() is None, reason="no C compiler: the kernels' layout is not used")


def _weight(bits: int, n: int, k: int, group: int, act_order: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).half().float()
    zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32) if act_order else None
    return QuantizedWeight(IntGrid(bits=bits, group_size=group), (n, k), codes, scales, zeros, group, g_idx)


@pytest.mark.parametrize("act_order", [False, True])
def test_an_installed_4bit_weight_holds_only_nibbles_and_unpacks_exactly(act_order):
    qw = _weight(4, 64, 128, 32, act_order)
    codes, weight = qw.codes.clone(), qw.dequantize()
    model = nn.Sequential(nn.Linear(128, 64))
    bias = model[0].bias.detach().clone()
    install_quantized(model, "0", qw)
    assert qw.__dict__["_codes"] is None, "the one-byte codes must be dropped"
    assert tuple(packed_codes(qw).shape) == (64, 64)
    assert torch.equal(qw.codes, codes) and torch.equal(qw.dequantize(), weight)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), float32_arithmetic():
        torch.testing.assert_close(model(x), x @ weight.t() + bias, rtol=1e-5, atol=1e-5)


def test_new_codes_replace_the_packed_copy():
    qw = _weight(4, 32, 64, 32, act_order=True)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    install_quantized(model, "0", qw)
    flipped = qw.codes ^ 1
    qw.codes = flipped
    assert packed_codes(qw) is None and torch.equal(qw.codes, flipped)
    x = torch.randn(2, 64)
    with torch.no_grad(), float32_arithmetic():
        torch.testing.assert_close(model(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["u8", "auto"])
@pytest.mark.parametrize("part", ["scales", "zeros"])
def test_new_statistics_replace_the_kernels_description(kernel, part):
    """QAT's finish replaces a weight's scales (training.qat): the compiled kernels' cached description holds copies
    of the statistics, so replacing scales or zeros must describe the weight again, not compute with the old ones."""
    qw = _weight(4, 32, 64, 32, act_order=True)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    layer = install_quantized(model, "0", qw, kernel=kernel)
    x = torch.randn(2, 64)
    with torch.no_grad(), float32_arithmetic():
        before = model(x)
        setattr(qw, part, getattr(qw, part) * 1.5)
        layer.set_kernel(layer.kernel_preference)
        after = model(x)
    torch.testing.assert_close(after, x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 0.1


@pytest.mark.parametrize("bits,k,group", [(8, 128, 32), (4, 48, 16 * 3)])
def test_weights_the_nibble_layout_cannot_hold_keep_their_codes(bits, k, group):
    qw = _weight(bits, 16, k, group, act_order=False)
    install_quantized(nn.Sequential(nn.Linear(k, 16)), "0", qw)
    assert qw.__dict__["_codes"] is not None and packed_codes(qw) is None


def test_a_packed_model_saves_the_same_file_and_copies(tmp_path):
    import copy

    from lowbit.formats.native import load_native, save_native
    from conftest import tiny_llama
    from lowbit.api import quantize

    model = quantize(tiny_llama(hidden=64, intermediate=128), method="rtn", bits=4, group_size=32, progress=False)
    save_native(model, None, tmp_path / "a")
    loaded, _ = load_native(tmp_path / "a")
    assert all(packed_codes(m.qweight) is not None for n, m in loaded.named_modules() if hasattr(m, "qweight"))
    save_native(copy.deepcopy(loaded), None, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bits", range(1, 9))
def test_whole_byte_widths_pack_the_bit_streams_bytes(bits):
    from lowbit.schemes.packing import _pack_chunk, pack_codes, unpack_codes

    codes = torch.randint(0, 2 ** bits, (48, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, _pack_chunk(codes.reshape(-1), bits))
    assert torch.equal(unpack_codes(packed, bits, (48, 80)), codes)
