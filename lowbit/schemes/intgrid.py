"""Uniform integer grids: b-bit codes with a scale (and zero point) per group of input columns.

w ~= scale * (q - zero), q in [0, 2^b - 1]. Symmetric grids fix zero = 2^(b-1) (GPTQ's convention, which
uses all 2^b levels); asymmetric grids fit zero from the group's min and max. Scales are rounded to
`scale_dtype` when fitted so that formats storing fp16 scales (GPTQ, AWQ) hold them exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme, expand_groups, register_scheme

log = logging.getLogger("lowbit")
_NOTED_WIDTHS: set[int] = set()

PER_TENSOR = 0
PER_CHANNEL = -1

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@register_scheme
@dataclass(frozen=True)
class IntGrid(Scheme):
    """b-bit integer grid. group_size > 0: per group along K; -1: per output channel; 0: whole tensor."""

    kind = "int"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    clip_search: bool = False
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"bits={self.bits} is out of range: integer grids support 2 to 8 bits")
        if self.group_size < -1:
            raise LowbitError(f"group size {self.group_size} is invalid: use a positive size, -1 (per channel) "
                              "or 0 (per tensor)")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise LowbitError(f"scale dtype {self.scale_dtype!r} unknown; use one of {sorted(_SCALE_DTYPES)}")

    @property
    def name(self) -> str:
        gran = {PER_TENSOR: "tensor", PER_CHANNEL: "channel"}.get(self.group_size, f"g{self.group_size}")
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{gran}"

    @property
    def affine_bits(self) -> int:
        return self.bits

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def check_width(self, in_features: int, layer: str = "") -> None:
        """Note layers whose width is not a multiple of the group size: their last group is shorter (as in GPTQ)."""
        if self.group_size > 0 and in_features % self.group_size and in_features not in _NOTED_WIDTHS:
            _NOTED_WIDTHS.add(in_features)
            log.info("group size %d does not divide input width %d (%s): its last group has %d columns",
                     self.group_size, in_features, layer or "layer", in_features % self.group_size)

    # -- fitting ----------------------------------------------------------------------------------------
    def _params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero for groups whose kept range is [lo, hi] (lo <= 0 <= hi)."""
        sdt = _SCALE_DTYPES[self.scale_dtype]
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = (2 * amax / self.maxq)
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
        else:
            scale = (hi - lo) / self.maxq
        scale = scale.to(sdt).float()
        tiny = torch.finfo(sdt).tiny if sdt != torch.float16 else 6.1e-5
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 1.0))  # all-zero groups
        scale = torch.clamp(scale, min=tiny)
        if not self.symmetric:
            zero = torch.clamp(torch.round(-lo / scale), 0, self.maxq)
        return scale, zero

    def _grouped(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, K] -> ([N, G, g] view matching this grid's granularity, padding mask or None).

        A last group shorter than g is padded with copies of its own first column, which leaves its
        min, max and absmax unchanged; the mask keeps the padding out of clip-search errors.
        """
        n, k = weight.shape
        if self.group_size == PER_TENSOR:
            return weight.reshape(1, 1, n * k), None
        g = k if self.group_size == PER_CHANNEL else self.group_size
        n_groups = math.ceil(k / g)
        pad = n_groups * g - k
        if not pad:
            return weight.reshape(n, n_groups, g), None
        first = weight[:, (n_groups - 1) * g: (n_groups - 1) * g + 1]
        padded = torch.cat([weight, first.expand(n, pad)], dim=1)
        mask = torch.ones(1, n_groups, g)
        mask[0, -1, g - pad:] = 0
        return padded.reshape(n, n_groups, g), mask

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros [N, G]: absmax/min-max, or the clipping ratio minimising the (weighted) MSE."""
        w, mask = self._grouped(weight.float())
        lo = torch.clamp(w.amin(dim=-1), max=0)
        hi = torch.clamp(w.amax(dim=-1), min=0)
        scale, zero = self._params_from_range(lo, hi)
        if self.clip_search:
            imp = mask
            if importance is not None:
                imp = self._grouped(importance.float().reshape(1, -1).expand(weight.shape[0], -1))[0]
                imp = imp if mask is None else imp * mask
            best = self._group_error(w, scale, zero, imp)
            for i in range(1, self.clip_grid + 1):
                shrink = 1 - self.clip_max_shrink * i / self.clip_grid
                s, z = self._params_from_range(lo * shrink, hi * shrink)
                err = self._group_error(w, s, z, imp)
                better = err < best
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
                best = torch.where(better, err, best)
        if self.group_size == PER_TENSOR:
            scale = scale.expand(weight.shape[0], 1).contiguous()
            zero = zero.expand(weight.shape[0], 1).contiguous()
        return scale, zero

    def _group_error(self, w, scale, zero, imp) -> torch.Tensor:
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        err = (self.decode(self.encode(w, s, z), s, z) - w).pow_(2)
        if imp is not None:
            err = err * imp
        return err.sum(dim=-1)

    # -- codes -------------------------------------------------------------------------------------------
    def grid_position(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        return w / scales + zeros

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        return scales * (codes.float() - zeros)

    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        n, k = weight.shape
        scale, zero = self.fit(weight, importance)
        group_size = {PER_TENSOR: k, PER_CHANNEL: -1}.get(self.group_size, self.group_size)
        qw = QuantizedWeight(self, (n, k), codes=torch.empty(0), scales=scale, zeros=zero, group_size=group_size)
        gi = qw.group_index()
        qw.codes = self.encode(weight.float(), expand_groups(scale, gi), expand_groups(zero, gi))
        return qw

    def fake_quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """`quantize(weight).dequantize()`, the same numbers, without storing codes or gathering statistics per
        column: searches that try many candidates (AWQ's scales and clipping) only need the rounded weights."""
        n, k = weight.shape
        scale, zero = self.fit(weight, importance)
        if self.group_size == PER_TENSOR:
            scale, zero = scale[:1], zero[:1]          # fit repeats the one statistic per row
        w, _ = self._grouped(weight.float())
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        return self.decode(self.encode(w, s, z), s, z).reshape(n, -1)[:, :k]

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        gi = qw.group_index()
        return self.decode(qw.codes, expand_groups(qw.scales, gi), expand_groups(qw.zeros, gi))

    def storage_bits(self, qw: QuantizedWeight) -> int:
        n, k = qw.shape
        n_stats = 1 if self.group_size == PER_TENSOR else qw.scales.numel()
        scale_bits = torch.finfo(_SCALE_DTYPES[self.scale_dtype]).bits
        zero_bits = 0 if self.symmetric else self.bits
        gidx_bits = 32 * k if qw.g_idx is not None else 0
        return n * k * self.bits + n_stats * (scale_bits + zero_bits) + gidx_bits
