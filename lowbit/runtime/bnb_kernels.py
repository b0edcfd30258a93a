"""Kernels for the bitsandbytes schemes: NF4/FP4 codebooks, LLM.int8() and dynamic int8.

- `bnb4-tiled`: dequantize a few hundred rows at a time into the compute dtype and multiply; never holds the
  whole weight in floating point. Exact (the reference's values rounded once to the compute dtype).
- `bnb4-cached`: dequantize once to the compute dtype and keep it (dense speed; 16 bits per weight in bf16).
- `bnb4-int8`: requantize once to row-wise int8 and use torch's int8 weight-only matmul (fast at batch 1;
  approximate to |row max| / 254 per weight; 8 bits per weight resident).
- `llm-int8`: LLM.int8()'s decomposition. Input columns with any |x| >= threshold are multiplied in float by
  the dequantized weight columns; the rest is quantized per token (absmax) to int8 and multiplied with
  `torch._int_mm` (int32 accumulation), then scaled by row_absmax * SCB / 127^2 as bitsandbytes does.
- `dynamic-int8`: activations quantized per token with their min/max (asymmetric int8), int8 matmul, and the
  zero point corrected with the weight's row sums.
Measured speeds are in bench/bench_bnb.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.quantized import QuantizedWeight
from lowbit.runtime.kernels import KERNELS, Kernel, register_kernel
from lowbit.schemes.codebook import Codebook4, codebook
from lowbit.schemes.int8row import INV_127, RowInt8

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
INV_127_SQUARED = 6.200124e-05  # bitsandbytes' int8_mm_dequant constant (1/127^2 in float32)


# -- NF4 / FP4 ---------------------------------------------------------------------------------------------
@dataclass
class _Codebook4State:
    codes: torch.Tensor        # uint8 [N, K]
    absmax: torch.Tensor       # float32 [N, K // blocksize] when blocks align with rows, else flat [n_blocks]
    table: torch.Tensor        # float32 [16]
    blocksize: int
    dtype: torch.dtype
    aligned: bool


def dequantize_rows(state: _Codebook4State, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the weight in the compute dtype (values table[code] * absmax in float32, rounded once)."""
    codes = state.codes[start:stop]
    values = state.table[codes.long()]
    if state.aligned:
        rows, k = codes.shape
        values = values.view(rows, -1, state.blocksize) * state.absmax[start:stop].unsqueeze(-1)
        return values.view(rows, k).to(state.dtype)
    k = codes.shape[1]
    block = torch.arange(start * k, stop * k) // state.blocksize
    return (values.reshape(-1) * state.absmax[block]).view(stop - start, k).to(state.dtype)


class Codebook4TiledKernel(Kernel):
    """Dequantize `tile_rows` output rows at a time into the compute dtype; peak extra memory one tile."""

    name = "bnb4-tiled"
    tile_rows = 512

    def computes_in_float32(self, state: _Codebook4State) -> bool:
        return state.dtype == torch.float32

    def supports(self, qw: QuantizedWeight) -> bool:
        return isinstance(qw.scheme, Codebook4)

    def prepare(self, qw: QuantizedWeight) -> _Codebook4State:
        scheme: Codebook4 = qw.scheme  # type: ignore[assignment]
        aligned = qw.in_features % scheme.blocksize == 0
        absmax = scheme.flat_absmax(qw)
        if aligned:
            absmax = absmax.view(qw.out_features, -1)
        return _Codebook4State(qw.codes.contiguous(), absmax, codebook(scheme.quant_type), scheme.blocksize,
                               _DTYPES[scheme.compute_dtype], aligned)

    def matmul(self, x: torch.Tensor, state: _Codebook4State) -> torch.Tensor:
        xc = x.to(state.dtype)
        n = state.codes.shape[0]
        parts = [F.linear(xc, dequantize_rows(state, s, min(s + self.tile_rows, n)))
                 for s in range(0, n, self.tile_rows)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


class Codebook4CachedKernel(Kernel):
    """Dequantize once into the compute dtype and keep it: dense speed, dense memory."""

    name = "bnb4-cached"

    def computes_in_float32(self, w: torch.Tensor) -> bool:
        return w.dtype == torch.float32

    def supports(self, qw: QuantizedWeight) -> bool:
        return isinstance(qw.scheme, Codebook4)

    def prepare(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.dequantize(_DTYPES[qw.scheme.compute_dtype])  # type: ignore[attr-defined]

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(w.dtype), w).to(x.dtype)


class Codebook4Int8Kernel(Kernel):
    """Requantize the NF4/FP4 weight row-wise to int8 once and run torch's int8 weight-only matmul.

    Not exact: each weight moves by at most |row max| / 254 (a fraction of NF4's own step) and activations
    are rounded to bf16; resident memory is 8 bits per weight. Fast at batch 1, where the others are not.
    """

    name = "bnb4-int8"

    def supports(self, qw: QuantizedWeight) -> bool:
        return isinstance(qw.scheme, Codebook4) and KERNELS["int8pack"].supports(self._as_int8(qw, probe=True))

    @staticmethod
    def _as_int8(qw: QuantizedWeight, probe: bool = False) -> QuantizedWeight:
        weight = torch.zeros(1, 1) if probe else qw.dequantize()
        return RowInt8(threshold=0.0, activations="float").quantize(weight)

    def prepare(self, qw: QuantizedWeight):
        return KERNELS["int8pack"].prepare(self._as_int8(qw))

    def matmul(self, x: torch.Tensor, state) -> torch.Tensor:
        return KERNELS["int8pack"].matmul(x, state)


# -- int8 --------------------------------------------------------------------------------------------------
def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 a [M, K] @ b_t [K, N] for int8 inputs (torch._int_mm; exact float64 fallback where it is missing)."""
    try:
        return torch._int_mm(a, b_t)
    except (RuntimeError, AttributeError):
        return (a.double() @ b_t.double()).to(torch.int32)


def quantize_rows_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (token) absmax int8 as bitsandbytes' int8_vectorwise_quant: (codes, row absmax float32)."""
    row = x.abs().amax(dim=1).float()
    safe = torch.where(row > 0, row, torch.ones_like(row))
    return torch.round(x * (127.0 / safe.unsqueeze(-1))).to(torch.int8), row


@dataclass
class _Int8State:
    cb: torch.Tensor           # int8 [N, K]
    cb_t: torch.Tensor         # int8 [K, N] (the layout _int_mm takes)
    scb: torch.Tensor          # float32 [N] row absmax
    row_sums: torch.Tensor     # int32 [N] sum_k CB[n, k] (zero-point correction of asymmetric activations)
    threshold: float


class LLMInt8Kernel(Kernel):
    """LLM.int8(): outlier input columns in float, everything else int8 x int8 -> int32."""

    name = "llm-int8"

    def computes_in_float32(self, state: Any) -> bool:
        return True         # int8 activations are LLM.int8's (and dynamic int8's) method, not a speed shortcut
    activations = "int8"

    def supports(self, qw: QuantizedWeight) -> bool:
        return isinstance(qw.scheme, RowInt8) and qw.scheme.activations == self.activations

    def prepare(self, qw: QuantizedWeight) -> _Int8State:
        scheme: RowInt8 = qw.scheme  # type: ignore[assignment]
        cb = scheme.int8_codes(qw).contiguous()
        return _Int8State(cb, cb.t().contiguous(), qw.extra["SCB"].float(), cb.sum(dim=1, dtype=torch.int32),
                          scheme.threshold)

    def matmul(self, x: torch.Tensor, state: _Int8State) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        outlier_cols = None
        if state.threshold > 0:
            outlier_cols = (x2.abs() >= state.threshold).any(dim=0).nonzero().squeeze(1)
            if outlier_cols.numel():
                x_int8_part = x2.clone()
                x_int8_part[:, outlier_cols] = 0
            else:
                outlier_cols = None
        xq, row = quantize_rows_absmax(x2 if outlier_cols is None else x_int8_part)
        acc = int8_matmul(xq, state.cb_t)
        y = acc * (row.unsqueeze(1) * state.scb.unsqueeze(0)) * INV_127_SQUARED
        if outlier_cols is not None:
            w_cols = state.cb[:, outlier_cols].float() * state.scb.unsqueeze(1) * INV_127
            y = y.addmm(x2[:, outlier_cols], w_cols.t())
        return y.reshape(*shape[:-1], -1).to(x.dtype)


class DynamicInt8Kernel(LLMInt8Kernel):
    """Dynamic int8: each token quantized with its own min/max (asymmetric int8), int8 matmul, zero-point fix."""

    name = "dynamic-int8"
    activations = "int8-asym"

    def matmul(self, x: torch.Tensor, state: _Int8State) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        lo = x2.amin(dim=1).clamp(max=0)
        hi = x2.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale) - 128  # so that lo maps to -128
        xq = torch.clamp(torch.round(x2 / scale.unsqueeze(1)) + zero.unsqueeze(1), -128, 127).to(torch.int8)
        acc = int8_matmul(xq, state.cb_t) - zero.to(torch.int32).unsqueeze(1) * state.row_sums.unsqueeze(0)
        y = acc * (scale.unsqueeze(1) * (state.scb * INV_127).unsqueeze(0))
        return y.reshape(*shape[:-1], -1).to(x.dtype)


register_kernel(LLMInt8Kernel(), before="int4")
register_kernel(DynamicInt8Kernel(), before="int4")
register_kernel(Codebook4TiledKernel(), before="reference")
register_kernel(Codebook4CachedKernel(), before=None)  # only on request: it keeps a dense copy
register_kernel(Codebook4Int8Kernel(), before=None)    # only on request: approximate, 8 bits resident
