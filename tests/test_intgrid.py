"""Integer grids: round-trip error bounds derived from the grid, clip search, packing."""
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.schemes import IntGrid, scheme_from_config
from lowbit.schemes.packing import pack_codes, unpack_codes

FP16_REL = 2.0 ** -11  # relative rounding of a scale stored in fp16


def expanded(qw, t):
    return t[:, qw.group_index()]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_symmetric_absmax_error_within_half_step(bits, group_size):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    qw = IntGrid(bits, group_size, symmetric=True).quantize(w)
    step = expanded(qw, qw.scales)
    err = (qw.dequantize() - w).abs()
    # Half a step, plus what rounding the scale to fp16 moves the clipped top level by (2^(b-1)-0.5 steps).
    bound = step * (0.5 + (2 ** (bits - 1) + 1) * FP16_REL)
    assert bool((err <= bound + 1e-7).all()), (err / step).max()
    assert qw.codes.max() <= 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_error_within_half_step_and_zero_exact(bits):
    torch.manual_seed(bits)
    w = torch.randn(32, 128) + 0.7
    w[0, :] = 0.0
    qw = IntGrid(bits, 64, symmetric=False).quantize(w)
    step = expanded(qw, qw.scales)
    err = (qw.dequantize() - w).abs()
    # Rounding the zero point to an integer shifts the grid by up to half a step at the range ends.
    assert bool((err <= step * (1.0 + 2 ** bits * FP16_REL) + 1e-7).all())
    assert torch.equal(qw.dequantize()[0], torch.zeros(128)), "zero must be exactly representable"
    assert qw.zeros.min() >= 0 and qw.zeros.max() <= 2 ** bits - 1


def test_per_tensor_and_per_channel_statistics_shapes():
    w = torch.randn(16, 96)
    per_tensor = IntGrid(8, 0).quantize(w)
    assert per_tensor.scales.shape == (16, 1) and per_tensor.scales.unique().numel() == 1
    per_channel = IntGrid(8, -1).quantize(w)
    assert per_channel.scales.shape == (16, 1) and per_channel.scales.unique().numel() == 16
    # Every row's step is at most the tensor's step, so row-wise errors shrink on average.
    assert (per_channel.dequantize() - w).pow(2).mean() < (per_tensor.dequantize() - w).pow(2).mean()
    assert bool((per_channel.scales[:, 0] <= per_tensor.scales[0, 0] * (1 + FP16_REL)).all())


def test_ragged_last_group_is_quantized_on_its_own_range():
    torch.manual_seed(0)
    w = torch.randn(8, 576)
    w[:, 512:] *= 0.01  # the short last group (64 columns) has a much smaller range
    qw = IntGrid(4, 128, symmetric=True).quantize(w)
    assert qw.scales.shape == (8, 5)
    tail = w[:, 512:]
    assert torch.allclose(qw.scales[:, 4], (2 * tail.abs().amax(1) / 15).half().float())
    assert (qw.dequantize()[:, 512:] - tail).abs().max() <= qw.scales[:, 4].max() * 0.51


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_worse_in_mse(symmetric, bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 256)
    w[torch.rand_like(w) < 0.01] *= 8  # heavy tails make clipping worthwhile
    plain = IntGrid(bits, 64, symmetric=symmetric).quantize(w).dequantize()
    clipped = IntGrid(bits, 64, symmetric=symmetric, clip_search=True).quantize(w).dequantize()
    per_group = lambda d: (d - w).pow(2).reshape(64, 4, 64).sum(-1)  # noqa: E731
    assert bool((per_group(clipped) <= per_group(plain) * (1 + 1e-6)).all())
    assert per_group(clipped).sum() < per_group(plain).sum()


def test_importance_weights_the_clip_search():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    importance = torch.ones(128)
    importance[:8] = 1000.0
    a = IntGrid(3, 128, symmetric=False, clip_search=True).quantize(w)
    b = IntGrid(3, 128, symmetric=False, clip_search=True).quantize(w, importance)
    err = lambda q: ((q.dequantize() - w)[:, :8]).pow(2).sum()  # noqa: E731
    assert err(b) <= err(a)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_exact(bits):
    codes = torch.randint(0, 2 ** bits, (13, 37), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(13 * 37 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, (13, 37)), codes)


@pytest.mark.parametrize("bits", [3, 5, 6])   # widths the whole-byte shift path does not take
def test_pack_unpack_exact_across_chunks(bits, monkeypatch):
    import lowbit.schemes.packing as packing

    monkeypatch.setattr(packing, "_CHUNK", 64)
    codes = torch.randint(0, 2 ** bits, (9, 50), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    monkeypatch.setattr(packing, "_CHUNK", 1 << 20)
    assert torch.equal(packed, pack_codes(codes, bits))  # chunking does not change the bytes
    monkeypatch.setattr(packing, "_CHUNK", 64)
    assert torch.equal(unpack_codes(packed, bits, (9, 50)), codes)


def test_pack_is_little_endian_bit_order():
    assert pack_codes(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [0x21, 0x43]
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10001101]


def test_scheme_config_round_trip_and_bad_input():
    s = IntGrid(3, 64, symmetric=False, clip_search=True)
    assert scheme_from_config(s.to_config()) == s
    with pytest.raises(LowbitError, match="out of range"):
        IntGrid(9, 128)
    with pytest.raises(LowbitError, match="out of range"):
        IntGrid(1, 128)
    with pytest.raises(LowbitError, match="unknown quantization scheme"):
        scheme_from_config({"kind": "nope"})


def test_bits_per_weight_accounts_for_statistics():
    w = torch.randn(64, 512)
    assert IntGrid(4, 128, True).quantize(w).bits_per_weight() == pytest.approx(4 + 16 / 128)
    assert IntGrid(4, 128, False).quantize(w).bits_per_weight() == pytest.approx(4 + 20 / 128)
    assert IntGrid(8, -1, True).quantize(w).bits_per_weight() == pytest.approx(8 + 16 / 512)


@pytest.mark.parametrize("group_size", [32, 48, -1, 0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_bit_identical_to_quantize_then_dequantize(group_size, symmetric):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 80, generator=g) * torch.rand(1, 80, generator=g) * 3
    grid = IntGrid(bits=3, group_size=group_size, symmetric=symmetric, clip_search=True)
    assert torch.equal(grid.fake_quantize(w), grid.quantize(w).dequantize())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_whole_byte_path_reads_and_writes_what_the_bit_stream_does(bits, monkeypatch):
    """The shift path of widths 1, 2, 4 and 8 gives the bit stream's results for inputs outside the documented
    ones too: codes >= 2**bits keep only their low bits (none spill into a neighbour), and packed bytes stored as
    int8 or int32 in a file unpack to the same uint8 codes (int8 0xF1 is code 241 at 8 bits, not -15)."""
    import lowbit.schemes.packing as packing

    g = torch.Generator().manual_seed(bits)
    wide = torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=g)
    stored = torch.randint(-128, 128, (16 * bits,), dtype=torch.int8, generator=g)
    fast = (pack_codes(wide, bits), [unpack_codes(stored.to(d), bits, (8, 16)) for d in (torch.int8, torch.int32)])
    monkeypatch.setattr(packing, "_WHOLE_BYTE_WIDTHS", ())
    stream = (pack_codes(wide, bits), [unpack_codes(stored.to(d), bits, (8, 16)) for d in (torch.int8, torch.int32)])
    assert torch.equal(fast[0], stream[0])
    assert torch.equal(fast[0], pack_codes(wide & (2 ** bits - 1), bits))
    for codes, reference in zip(fast[1], stream[1]):
        assert codes.dtype == reference.dtype == torch.uint8
        assert torch.equal(codes, reference)
