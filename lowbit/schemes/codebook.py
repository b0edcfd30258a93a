"""4-bit codebook schemes as bitsandbytes defines them: NF4 and FP4, blockwise absmax, double quantization.

The weight is flattened row-major and cut into blocks of `blocksize` values (blocks may straddle rows when
the row width is not a multiple of the block size, exactly as bitsandbytes does). Each block is divided by
its absolute maximum and every value is mapped to the nearest of 16 table entries; the 4-bit code is the
entry's index in bitsandbytes' table order. Double quantization subtracts the mean of all absmax values and
stores the rest as 8-bit codes of the signed "dynamic" map, blockwise (256) with float32 absmax of their own.

Every float32 operation below follows the order bitsandbytes' CPU path uses (reciprocal-multiply for full
blocks, division for the tail block, midpoint bucketing with ties going to the lower entry; the nested 8-bit
lookup of its C code), so codes and statistics are bit-identical to `bitsandbytes.functional.quantize_4bit`
(checked against bitsandbytes 0.50 on CPU in tests/test_bnb.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from lowbit.errors import CorruptFile, LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme, register_scheme

# bitsandbytes' NF4 table (quantiles of N(0, 1), normalised to [-1, 1]), in code order.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order; code 8 is -0.
# The table is normalised by its largest magnitude (12) as bitsandbytes does, in float32.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_TINY = 1e-38  # bitsandbytes' clamp on absmax before taking its reciprocal (all-zero blocks)


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 float32 values of `quant_type` ('nf4' or 'fp4') indexed by 4-bit code, as bitsandbytes has them."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise LowbitError(f"unknown 4-bit type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")


@lru_cache(maxsize=None)
def _bucketing(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted table values, and the code of each sorted position.

    The sort is stable so that +0 (code 0) precedes -0 (code 8) in FP4, as in bitsandbytes.
    """
    table = codebook(quant_type)
    sorted_values, order = torch.sort(table, stable=True)
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    return midpoints, order.to(torch.uint8)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic-exponent code (256 sorted float32 values in [-1, 1]).

    Exponent e = 0..max_exponent_bits-1 scales 2^e (signed) evenly spaced fraction midpoints in [0.1, 1] by
    10^(e - max_exponent_bits + 1); 0 and 1 complete the map. Computed in float32 as bitsandbytes does.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for e in range(max_exponent_bits):
        n_fraction = 2 ** (e + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        boundaries = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + e)
        values += (magnitude * means).tolist()
        if signed:
            values += (-magnitude * means).tolist()
    leftover = 2 ** (non_sign_bits - max_exponent_bits) - 1  # codes with no exponent bit at all
    if leftover > 0:
        boundaries = torch.linspace(0.1, 1, leftover + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (magnitude * means).tolist()
        if signed:
            values += (-magnitude * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_map_cached() -> torch.Tensor:
    return dynamic_map()


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full blocks [B, blocksize] and the tail (possibly empty) of a flat tensor."""
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].reshape(-1, blocksize), flat[full:]


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, weight's shape, values 0..15) and float32 absmax per flat block, as bitsandbytes on CPU."""
    flat = weight.reshape(-1).float()
    body, tail = _blocks(flat, blocksize)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_TINY).view(-1, 1)), -1, 1).reshape(-1)
    if tail.numel():
        tail_max = tail.abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_max, -1, 1)])
    midpoints, order = _bucketing(quant_type)
    codes = order[torch.bucketize(scaled, midpoints)]
    return codes.reshape(weight.shape), absmax


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """float32 values table[code] * absmax of each flat block (shape of `codes`)."""
    values = codebook(quant_type)[codes.reshape(-1).long()]
    return (values * absmax.repeat_interleave(blocksize)[: values.numel()]).reshape(codes.shape)


LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' 8-bit CPU quantizer


@lru_cache(maxsize=8)
def _nearest_code_lut(code_bytes: bytes) -> torch.Tensor:
    """uint8 [65536]: for bin i (value -1 + 2i/65535) the first code whose upper midpoint is not below it."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.bucketize(bins, midpoints).to(torch.uint8)


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes into sorted `code` and float32 absmax per block, as bitsandbytes' CPU `quantize_blockwise`.

    bitsandbytes (0.50, CPU) does not search the code: it scales each value by 1/absmax, rounds it onto 65536
    bins of [-1, 1] and reads the nearest code of the bin from a table. That is coarser than a true nearest
    search near 0 (where the dynamic map is denser than the bins), and we reproduce it exactly.
    """
    lut = _nearest_code_lut(code.float().contiguous().numpy().tobytes())
    flat = values.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    absmax = padded.reshape(-1, blocksize).abs().amax(dim=-1)
    inverse = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    scaled = torch.clamp(flat * inverse, -1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, as the C cast
    codes = lut[bins.clamp(0, LUT_SIZE - 1)]
    codes[(absmax == 0).repeat_interleave(blocksize)[:n]] = 0  # an all-zero block stores code 0
    return codes.reshape(values.shape), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
                              ) -> torch.Tensor:
    """float32 code[codes] * absmax of each block."""
    flat = code.float()[codes.reshape(-1).long()]
    return (flat * absmax.repeat_interleave(blocksize)[: flat.numel()]).reshape(codes.shape)


def pack_nibbles(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Flat 4-bit codes -> uint8 [ceil(n/2), 1], the FIRST code in the HIGH nibble (bitsandbytes' order).

    An odd count is padded with `pad_code` (bitsandbytes pads with the code of 0.0: 7 in NF4, 0 in FP4).
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad_code)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: the first `numel` codes, flat uint8."""
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    out = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return out[:numel].contiguous()


@register_scheme
@dataclass(frozen=True)
class Codebook4(Scheme):
    """NF4/FP4 4-bit codes with absmax per flat block of `blocksize`, optionally double-quantized absmax.

    QuantizedWeight layout: codes uint8 [N, K] (table indices); scales float32 = the absmax each block uses
    (after double quantization, i.e. what dequantization multiplies by), [N, K // blocksize] when blocks
    align with rows, else [1, n_blocks]; extra holds what is stored instead of float absmax under double
    quantization: `absmax_codes` uint8 [n_blocks], `nested_absmax` float32 [ceil(n_blocks / 256)],
    `nested_offset` float32 scalar.
    `compute_dtype` is the activation dtype the runtime kernels use (bitsandbytes' bnb_4bit_compute_dtype).
    """

    kind = "bnb4"
    nested_blocksize: ClassVar[int] = NESTED_BLOCKSIZE
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise LowbitError(f"unknown 4-bit type {self.quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
        if self.blocksize not in BLOCKSIZES:
            raise LowbitError(f"blocksize {self.blocksize} is not supported by bitsandbytes' 4-bit format; "
                              f"choose one of {', '.join(map(str, BLOCKSIZES))}")
        if self.compute_dtype not in ("bfloat16", "float32", "float16"):
            raise LowbitError(f"compute dtype {self.compute_dtype!r} unknown; use bfloat16, float16 or float32")

    @property
    def name(self) -> str:
        return f"{self.quant_type}-b{self.blocksize}{'-dq' if self.double_quant else ''}"

    @property
    def code_bits(self) -> int:
        return 4

    def table(self) -> torch.Tensor:
        """The 16 values codes index into."""
        return codebook(self.quant_type)

    @property
    def zero_code(self) -> int:
        """The code 0.0 quantizes to (bitsandbytes pads odd-sized weights with it)."""
        midpoints, order = _bucketing(self.quant_type)
        return int(order[torch.bucketize(torch.zeros(1), midpoints)])

    def pack(self, qw: QuantizedWeight) -> torch.Tensor:
        """Codes packed two per byte exactly as bitsandbytes stores `weight` (uint8 [ceil(N*K/2), 1])."""
        return pack_nibbles(qw.codes, self.zero_code)

    # -- quantize / dequantize ---------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        n, k = weight.shape
        w = weight.detach()
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            w = w.float()
        codes, absmax = quantize_4bit(w, self.quant_type, self.blocksize)
        extra: dict[str, torch.Tensor] = {}
        if self.double_quant:
            extra = self.compress_absmax(absmax)
            absmax = self.nested_absmax_values(extra)
        return QuantizedWeight(self, (n, k), codes=codes, scales=self._scales_layout(absmax, (n, k)),
                               zeros=None, group_size=self.blocksize, extra=extra)

    def compress_absmax(self, absmax: torch.Tensor) -> dict[str, torch.Tensor]:
        """Double quantization: absmax - mean as 8-bit dynamic codes, blockwise 256, plus the mean."""
        offset = absmax.mean()
        codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, _dynamic_map_cached(),
                                                       self.nested_blocksize)
        return {"absmax_codes": codes, "nested_absmax": nested_absmax, "nested_offset": offset.reshape(())}

    def nested_absmax_values(self, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 absmax that double-quantized statistics decode to (bitsandbytes' order of operations)."""
        decoded = dequantize_blockwise_8bit(extra["absmax_codes"], extra["nested_absmax"], _dynamic_map_cached(),
                                            self.nested_blocksize)
        return decoded + extra["nested_offset"].float()

    def _scales_layout(self, absmax: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        n, k = shape
        return absmax.reshape(n, k // self.blocksize) if k % self.blocksize == 0 else absmax.reshape(1, -1)

    def codebook_form(self, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table, absmax [N, K / blocksize]) when the flat blocks lie within rows; None when they straddle them."""
        n, k = qw.shape
        if k % self.blocksize or tuple(qw.scales.shape) != (n, k // self.blocksize):
            return None
        return self.table(), qw.scales.float()

    def flat_absmax(self, qw: QuantizedWeight) -> torch.Tensor:
        """float32 [n_blocks]: the absmax of each flat block as dequantization uses it."""
        return qw.scales.reshape(-1).float()

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return dequantize_4bit(qw.codes, self.flat_absmax(qw), self.quant_type, self.blocksize)

    def storage_bits(self, qw: QuantizedWeight) -> int:
        n_weights = qw.shape[0] * qw.shape[1]
        n_blocks = -(-n_weights // self.blocksize)
        if self.double_quant:
            n_nested = -(-n_blocks // self.nested_blocksize)
            stats = 8 * n_blocks + 32 * n_nested + 32
        else:
            stats = 32 * n_blocks
        return 4 * n_weights + stats

    # -- storage in lowbit's native format -------------------------------------------------------------
    def to_tensors(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        out = {"codes": self.pack(qw)}
        if self.double_quant:
            out.update({f"extra.{k}": v for k, v in qw.extra.items()})
        else:
            out["scales"] = self.flat_absmax(qw)
        return out

    def from_tensors(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int
                     ) -> QuantizedWeight:
        n, k = shape
        codes = unpack_nibbles(tensors["codes"], n * k).reshape(n, k)
        extra = {key[len("extra."):]: v for key, v in tensors.items() if key.startswith("extra.")}
        try:
            absmax = self.nested_absmax_values(extra) if self.double_quant else tensors["scales"].float()
        except KeyError as exc:
            raise CorruptFile(f"4-bit weight of shape {tuple(shape)} lacks its statistics ({exc}); "
                              "the file is incomplete") from exc
        if absmax.numel() != -(-n * k // self.blocksize):
            raise CorruptFile(f"4-bit weight of shape {tuple(shape)} has {absmax.numel()} absmax values, "
                              f"expected {-(-n * k // self.blocksize)} for blocksize {self.blocksize}")
        return QuantizedWeight(self, (n, k), codes=codes, scales=self._scales_layout(absmax, (n, k)),
                               group_size=self.blocksize, extra=extra)


def quant_state_json(scheme: Codebook4, qw: QuantizedWeight, dtype: str = "float32") -> dict:
    """bitsandbytes' QuantState JSON for a 4-bit weight (`dtype`: the weight's original float dtype)."""
    state = {"quant_type": scheme.quant_type, "blocksize": scheme.blocksize, "dtype": dtype,
             "shape": list(qw.shape)}
    if scheme.double_quant:
        state.update({"nested_blocksize": scheme.nested_blocksize, "nested_dtype": "float32",
                      "nested_offset": float(qw.extra["nested_offset"])})
    return state


def json_to_uint8(obj: dict) -> torch.Tensor:
    """bitsandbytes stores its quant-state JSON as a uint8 tensor of the UTF-8 bytes."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).clone()


def uint8_to_json(tensor: torch.Tensor) -> dict:
    """Inverse of `json_to_uint8`."""
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
