"""GGUF block types as a scheme: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K.

A GGMLScheme's QuantizedWeight keeps the exact block bytes in `extra["blocks"]` (uint8 [N, row_bytes], the
GGUF tensor data), so writing a .gguf is a copy and reading one keeps it quantized. It also exposes the
codes (uint8 [N, K]) and the effective per-sub-block statistics `scales`/`zeros` (float32 [N, K/group]) so
generic kernels and GPTQ can work with them:

    symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K):  w = scale * (code - zero), zero = the fixed code offset
    types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K):   w = scale * code - zero,   zero = the sub-block min

Both are exactly the float32 arithmetic of gguf.quants.dequantize. After changing codes under fixed
statistics (GPTQ), `GGMLScheme.with_codes` rebuilds the block bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme, expand_groups, register_scheme
from lowbit.schemes.ggml_blocks import (
    F32, BlockCodec, by_group, fp16_bytes, fp16_values, from_groups, make_qkx_quants, make_qx_quants,
    pack_fields, sequential_sum, signed_absmax, unpack_fields,
)
from lowbit.schemes.ggml_kquants import K_QUANT_CODECS

# rows quantized per numpy pass: big enough to amortise Python overhead, small enough to stay in cache
_CHUNK_VALUES = 1 << 18


# -- the 32-value "legacy" types --------------------------------------------------------------------------
class _Legacy(BlockCodec):
    block = group = 32
    needs_row_sigma2 = True

    @classmethod
    def _row_weights(cls, x, qweights, row_sigma2):
        return by_group(qweights * np.sqrt(row_sigma2[:, None] + x * x), 32)

    @classmethod
    def _pack_low(cls, codes):
        return pack_fields(codes & 0xF, 4, 1, 2)

    @classmethod
    def _pack_high(cls, codes):
        return pack_fields(codes >> 4, 1, 4, 8)  # bit i of the little-endian uint32 qh is code i's fifth bit


class _SymmetricLegacy(_Legacy):
    """Q4_0 / Q5_0: d = (signed absmax) / -2^(b-1); codes = trunc(x/d + 2^(b-1) + 0.5)."""

    has_min = False

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        half = cls.zero
        if qweights is None:
            d = signed_absmax(x.T) / F32(-half)
            with np.errstate(divide="ignore"):
                inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
            codes = np.minimum(F32(cls.maxq), np.trunc(x * inv[:, None] + F32(half + 0.5)))
        else:
            d, codes = make_qx_quants(by_group(x, 32), half, cls._row_weights(x, qweights, row_sigma2))
            codes = from_groups(codes, 32)
        return cls._assemble(fp16_bytes(d), codes.astype(np.uint8))

    @classmethod
    def affine(cls, blocks):
        d = fp16_values(blocks[:, :2])[:, None]
        return d, np.full(d.shape, F32(cls.zero))


class _MinLegacy(_Legacy):
    """Q4_1 / Q5_1: d = (max - min) / maxq, m = min; codes = trunc((x - min)/d + 0.5)."""

    has_min = True

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        if qweights is None:
            lo, hi = x.min(axis=1), x.max(axis=1)
            d = (hi - lo) / F32(cls.maxq)
            with np.errstate(divide="ignore"):
                inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
            codes = np.minimum(F32(cls.maxq), np.trunc((x - lo[:, None]) * inv[:, None] + F32(0.5)))
            m = lo
        else:
            d, the_min, codes = make_qkx_quants(by_group(x, 32), cls._row_weights(x, qweights, row_sigma2),
                                                cls.maxq, -0.9, 0.05, 36, use_mad=False, guarded=True)
            codes, m = from_groups(codes, 32), -the_min
        return cls._assemble(fp16_bytes(d), fp16_bytes(m), codes.astype(np.uint8))

    @classmethod
    def affine(cls, blocks):
        return fp16_values(blocks[:, :2])[:, None], -fp16_values(blocks[:, 2:4])[:, None]


class Q40(_SymmetricLegacy):
    name, type_id, type_size, maxq, bits_per_code, zero = "Q4_0", 2, 18, 15, 4, 8

    @classmethod
    def _assemble(cls, d, codes):
        return np.concatenate([d, cls._pack_low(codes)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 2:], 4, 1, 2)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(blocks[:, :2], codes.astype(np.uint8))


class Q50(_SymmetricLegacy):
    name, type_id, type_size, maxq, bits_per_code, zero = "Q5_0", 6, 22, 31, 5, 16

    @classmethod
    def _assemble(cls, d, codes):
        return np.concatenate([d, cls._pack_high(codes), cls._pack_low(codes)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 6:], 4, 1, 2) | (unpack_fields(blocks[:, 2:6], 1, 4, 8) << 4)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(blocks[:, :2], codes.astype(np.uint8))


class Q41(_MinLegacy):
    name, type_id, type_size, maxq, bits_per_code = "Q4_1", 3, 20, 15, 4

    @classmethod
    def _assemble(cls, d, m, codes):
        return np.concatenate([d, m, cls._pack_low(codes)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 4:], 4, 1, 2)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(blocks[:, :2], blocks[:, 2:4], codes.astype(np.uint8))


class Q51(_MinLegacy):
    name, type_id, type_size, maxq, bits_per_code = "Q5_1", 7, 24, 31, 5

    @classmethod
    def _assemble(cls, d, m, codes):
        return np.concatenate([d, m, cls._pack_high(codes), cls._pack_low(codes)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 8:], 4, 1, 2) | (unpack_fields(blocks[:, 4:8], 1, 4, 8) << 4)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(blocks[:, :2], blocks[:, 2:4], codes.astype(np.uint8))


class Q80(_Legacy):
    """8.5 bits: d = absmax/127, codes = round-half-away(x/d) stored as int8 (code = q + 128 here)."""

    name, type_id, type_size, maxq, bits_per_code, has_min, zero = "Q8_0", 8, 34, 255, 8, False, 128
    needs_row_sigma2 = False  # llama.cpp ignores the imatrix for Q8_0

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        d = np.abs(x).max(axis=1) / F32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        v = (x * inv[:, None]).astype(np.float64)  # roundf: half away from zero, exact in float64
        q = np.sign(v) * np.floor(np.abs(v) + 0.5)
        return cls._assemble(fp16_bytes(d), (q + 128).astype(np.uint8))

    @classmethod
    def _assemble(cls, d, codes):
        return np.concatenate([d, (codes ^ np.uint8(0x80))], axis=1)  # q + 128 <-> int8 two's complement

    @classmethod
    def codes(cls, blocks):
        return blocks[:, 2:] ^ np.uint8(0x80)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(blocks[:, :2], codes.astype(np.uint8))

    @classmethod
    def affine(cls, blocks):
        d = fp16_values(blocks[:, :2])[:, None]
        return d, np.full(d.shape, F32(cls.zero))


CODECS: dict[str, type[BlockCodec]] = {c.name: c for c in (Q40, Q41, Q50, Q51, Q80, *K_QUANT_CODECS)}


def codec(type_name: str) -> type[BlockCodec]:
    """The block codec of a GGUF type name such as "Q4_K"."""
    try:
        return CODECS[type_name.upper()]
    except KeyError:
        raise LowbitError(f"unknown GGUF block type {type_name!r}; known: {', '.join(CODECS)}") from None


# -- row-level entry points (numpy in, numpy out) ---------------------------------------------------------
def quantize_rows(weight: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, K] -> GGUF block bytes uint8 [N, K/block*type_size], as llama.cpp's quantize_<type>.

    `importance` [K] (an imatrix: mean squared activation per input column) selects llama.cpp's importance-
    weighted search; without it the result is byte-identical to the reference quantizer.
    """
    c = codec(type_name)
    x = np.ascontiguousarray(weight, dtype=F32)
    if x.ndim != 2:
        raise LowbitError(f"GGUF quantization expects a 2-D weight, got shape {tuple(x.shape)}")
    n, k = x.shape
    if k % c.block:
        raise LowbitError(f"{c.name} needs a row width that is a multiple of {c.block}, got {k}; "
                          "pick a type with a smaller block (llama.cpp falls back the same way) or keep it F16")
    qw = None
    if importance is not None:
        qw = np.asarray(importance, dtype=F32).reshape(-1)
        if qw.shape[0] != k:
            raise LowbitError(f"importance has {qw.shape[0]} entries but the weight has {k} input columns")
    out = np.empty((n, k // c.block * c.type_size), dtype=np.uint8)
    rows = max(1, _CHUNK_VALUES // k)
    for r0 in range(0, n, rows):
        xr = x[r0:r0 + rows]
        nr = xr.shape[0]
        sigma2 = None
        qb = None
        if qw is not None:
            qb = np.broadcast_to(qw, xr.shape).reshape(-1, c.block)
            if c.needs_row_sigma2:  # legacy imatrix variants scale by sum(x^2)/K of the whole row
                cols = np.ascontiguousarray(xr.T)
                sigma2 = np.repeat(sequential_sum(cols * cols) / F32(k), k // c.block)
        blocks = c.quantize_blocks(xr.reshape(-1, c.block), qb, sigma2)
        out[r0:r0 + nr] = blocks.reshape(nr, -1)
    return out


def dequantize_rows(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """GGUF block bytes [N, row_bytes] -> float32 [N, K] (same values as gguf.quants.dequantize)."""
    c = codec(type_name)
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    n = b.shape[0]
    return c.dequantize_blocks(b.reshape(-1, c.type_size)).reshape(n, -1)


# -- the scheme ----------------------------------------------------------------------------------------
@register_scheme
@dataclass(frozen=True)
class GGMLScheme(Scheme):
    """A GGUF block type ("Q4_0" ... "Q6_K") as a lowbit scheme; see the module docstring for the layout."""

    kind: ClassVar[str] = "ggml"
    type: str = "Q4_K"

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", codec(self.type).name)

    @property
    def name(self) -> str:
        return f"ggml-{self.type}"

    @property
    def codec(self) -> type[BlockCodec]:
        return CODECS[self.type]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.codec.type_size / self.codec.block

    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        imp = None if importance is None else importance.detach().float().cpu().numpy()
        blocks = quantize_rows(weight.detach().float().cpu().numpy(), self.type, imp)
        return self.from_blocks(blocks, tuple(weight.shape))

    # codes, scales and zeros are derived from the block bytes on access (QuantizedWeight), never stored: a
    # loaded GGUF holds its tensors once, as the file stores them (memory-mapped when read from a file).
    derives_codes = True

    def from_blocks(self, blocks: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> QuantizedWeight:
        """Wrap existing GGUF block bytes [N, row_bytes] (e.g. read from a file) without copying or decoding them."""
        c = self.codec
        b = blocks if isinstance(blocks, torch.Tensor) else torch.from_numpy(np.asarray(blocks, dtype=np.uint8))
        n, k = shape
        if b.dtype != torch.uint8 or k % c.block or b.numel() != n * (k // c.block) * c.type_size:
            raise LowbitError(f"{b.numel()} bytes of {c.name} blocks cannot hold a [{n}, {k}] weight")
        return QuantizedWeight(self, (n, k), codes=None, scales=None, zeros=None, group_size=c.group,
                               extra={"blocks": b.reshape(n, -1)})

    def derive(self, qw: QuantizedWeight, name: str) -> torch.Tensor:
        """codes (uint8 [N, K]), scales or zeros (float32 [N, K / group]) decoded from the block bytes."""
        c = self.codec
        n, k = qw.shape
        flat = qw.extra["blocks"].numpy().reshape(-1, c.type_size)
        if name == "codes":
            return torch.from_numpy(np.ascontiguousarray(c.codes(flat).reshape(n, k)))
        scales, zeros = c.affine(flat)
        return torch.from_numpy(np.ascontiguousarray((scales if name == "scales" else zeros).reshape(n, -1)))

    def rows(self, qw: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows `index` only (an embedding lookup dequantizes just these)."""
        return self.from_blocks(qw.extra["blocks"][index], (int(index.numel()), qw.in_features))

    def blocks(self, qw: QuantizedWeight) -> np.ndarray:
        """The GGUF bytes [N, row_bytes] of `qw`: its blocks, rebuilt from its codes if a method stored new ones."""
        c = self.codec
        n, k = qw.shape
        old = qw.extra["blocks"].numpy()
        if qw.__dict__.get("_codes") is None:
            return old.reshape(n, -1)
        codes = qw.codes.numpy().reshape(-1, c.block)
        return c.with_codes(old.reshape(-1, c.type_size), codes).reshape(n, -1)

    def with_codes(self, qw: QuantizedWeight, codes: torch.Tensor) -> QuantizedWeight:
        """A copy of `qw` with new codes [N, K] under the same statistics, block bytes rebuilt."""
        c = self.codec
        n, k = qw.shape
        old = qw.extra["blocks"].numpy().reshape(-1, c.type_size)
        new_blocks = c.with_codes(old, codes.to(torch.uint8).numpy().reshape(-1, c.block)).reshape(n, -1)
        return self.from_blocks(np.ascontiguousarray(new_blocks), qw.shape)

    @property
    def affine_bits(self) -> int | None:
        """Symmetric types are exactly scales * (codes - zeros); types with a min are not (see module doc)."""
        return None if self.codec.has_min else self.codec.bits_per_code

    def affine_form(self, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Types with a min store w = d * q - m: a = scales, b = -zeros; the others w = d * (q - z), as any scheme."""
        if self.codec.has_min:
            return qw.scales, -qw.zeros, self.codec.bits_per_code
        return super().affine_form(qw)

    @property
    def code_bits(self) -> int:
        return self.codec.bits_per_code

    def to_tensors(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Native format: the GGUF blocks are the whole state (codes and statistics are derived from them)."""
        return {"blocks": torch.from_numpy(self.blocks(qw))}

    def from_tensors(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int
                     ) -> QuantizedWeight:
        return self.from_blocks(tensors["blocks"].numpy(), tuple(shape))

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        if qw.__dict__.get("_codes") is None:      # the blocks are the state: one decoding pass
            return torch.from_numpy(dequantize_rows(qw.extra["blocks"].numpy(), self.type)).reshape(qw.shape)
        gi = qw.group_index()
        return self.decode(qw.codes, expand_groups(qw.scales, gi), expand_groups(qw.zeros, gi))

    def storage_bits(self, qw: QuantizedWeight) -> int:
        n, k = qw.shape
        return n * (k // self.codec.block) * self.codec.type_size * 8

    @property
    def maxq(self) -> int:          # type: ignore[override]
        return self.codec.maxq

    def grid_position(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        return (w + zeros) / scales if self.codec.has_min else w / scales + zeros

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        c = codes.float()
        return scales * c - zeros if self.codec.has_min else scales * (c - zeros)

