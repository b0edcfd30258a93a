"""What every scheme (a way of representing numbers) provides, and the registry that finds one by name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, fields, replace
from typing import Any, ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight

_SCHEMES: dict[str, type["Scheme"]] = {}


def register_scheme(cls: type["Scheme"]) -> type["Scheme"]:
    """Class decorator: make a scheme constructible from its saved config by its `kind`."""
    _SCHEMES[cls.kind] = cls
    return cls


def scheme_from_config(config: dict[str, Any]) -> "Scheme":
    """Rebuild a scheme from `Scheme.to_config()` output (as stored in a checkpoint)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _SCHEMES:
        raise LowbitError(f"unknown quantization scheme {kind!r} in checkpoint; known: {sorted(_SCHEMES)}")
    return _SCHEMES[kind].from_config(config)


def known_schemes() -> list[str]:
    return sorted(_SCHEMES)


class Scheme(ABC):
    """How a weight matrix [N, K] is represented: fit statistics, quantize to codes, dequantize, count bits.

    Subclasses are frozen dataclasses; their fields are the scheme's whole configuration.
    Grids are applied along the input dimension K in groups (the layout every format and kernel expects).
    """

    kind: ClassVar[str]

    @property
    def name(self) -> str:
        return self.kind

    @abstractmethod
    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        """Round-to-nearest quantization of a [N, K] weight; `importance` [K] weights the error in any search."""

    @abstractmethod
    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """The float32 [N, K] weight represented by `qw`."""

    @abstractmethod
    def storage_bits(self, qw: QuantizedWeight) -> int:
        """Bits needed to store `qw` (packed codes plus every statistic)."""

    # Column-wise access used by error-compensating methods (GPTQ) and quantization-aware training: statistics are
    # fixed (or learned), codes chosen per column. Affine grids (integer grids, GGUF types) define `grid_position`
    # and `maxq`; rounding and clamping are the same for all of them, with or without gradients.
    maxq: int

    def grid_position(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """`w` in code units before rounding and clamping, under statistics broadcastable to w."""
        raise LowbitError(f"scheme {self.kind} does not support column-wise encoding (needed by GPTQ and QAT)")

    def encode(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """Codes for `w` [N, c] under per-row statistics `scales`/`zeros` broadcastable to [N, c]."""
        with torch.no_grad():
            # a zero scale (an all-zero group of a GGUF block): any code decodes the same
            position = torch.nan_to_num(self.grid_position(w, scales, zeros), nan=0.0, posinf=0.0, neginf=0.0)
            return torch.clamp(torch.round(position), 0, self.maxq).to(torch.uint8)

    def fake_quantize_ste(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """decode(encode(w)) with straight-through rounding: differentiable in w (identity inside the grid, zero
        where clamped) and in the statistics (LSQ's step-size gradient, d/ds = q - w/s inside the grid)."""
        return self.decode(torch.clamp(round_ste(self.grid_position(w, scales, zeros)), 0, self.maxq), scales, zeros)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """Values of `codes` [N, c] under statistics broadcastable to [N, c]."""
        raise LowbitError(f"scheme {self.kind} does not support column-wise decoding (needed by GPTQ)")

    @property
    def affine_bits(self) -> int | None:
        """b if this scheme's weights are exactly scales * (codes - zeros) per group with b-bit codes, else None.

        The default `affine_form` is built on it; kernels read `affine_form`.
        """
        return None

    def affine_form(self, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(a, b, code bits) with w = a * q + b per group ([N, n_groups] float32), or None if not affine.

        The one view every affine kernel consumes, whatever scheme (integer grid, GGUF block) made the codes.
        """
        bits = self.affine_bits
        if bits is None or qw.zeros is None:
            return None
        return qw.scales, -qw.scales * qw.zeros, bits

    @property
    def quantizes_activations(self) -> bool:
        """True when the scheme defines its matmul on quantized activations (LLM.int8, dynamic int8), so a
        kernel computing with float activations would change its numbers."""
        return False

    def codebook_form(self, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table, a) with w = a * table[q], a [N, n_groups] per group of columns, for schemes whose codes index
        a table of values (NF4/FP4); None for every other scheme."""
        return None

    @property
    def code_bits(self) -> int:
        """Bits one code needs when packed (defaults to the scheme's `bits`, else 8)."""
        return int(getattr(self, "bits", 8))

    def to_tensors(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The tensors lowbit's native format stores for `qw` (packed codes, statistics, extras)."""
        from lowbit.schemes.packing import pack_codes

        out = {"codes": pack_codes(qw.codes, self.code_bits), "scales": _compact_float(qw.scales)}
        if qw.zeros is not None:
            out["zeros"] = _compact_float(qw.zeros)
        if qw.g_idx is not None:
            out["g_idx"] = qw.g_idx.to(torch.int32)
        out.update({f"extra.{k}": v for k, v in qw.extra.items() if isinstance(v, torch.Tensor)})
        return out

    def from_tensors(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int
                     ) -> QuantizedWeight:
        """Inverse of `to_tensors`: rebuild the QuantizedWeight exactly."""
        from lowbit.schemes.packing import unpack_codes

        return QuantizedWeight(
            self, tuple(shape), codes=unpack_codes(tensors["codes"], self.code_bits, tuple(shape)),
            scales=tensors["scales"].float(), zeros=tensors["zeros"].float() if "zeros" in tensors else None,
            group_size=group_size, g_idx=tensors.get("g_idx"),
            extra={k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Scheme":
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(config) - names
        if unknown:
            raise LowbitError(f"scheme {cls.kind}: unknown settings {sorted(unknown)}")
        return cls(**config)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, the identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _compact_float(t: torch.Tensor) -> torch.Tensor:
    """Store float32 statistics as uint8 or fp16 when that is exact (it usually is), else as they are."""
    t = t.float()
    if t.numel() and bool(((t >= 0) & (t <= 255) & (t == t.round())).all()):
        return t.to(torch.uint8)
    if bool((t.half().float() == t).all()):
        return t.half()
    return t


def expand_groups(stat: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Per-group statistics [N, G] -> per-column [N, K] using each column's group."""
    return stat.index_select(1, group_index)


class KeptGrid(Scheme):
    """The statistics of an existing weight (`base`: its scales and zeros, or GGUF block statistics) kept, only
    the codes chosen anew: what `merge` re-quantizes an adapted layer on when the method's grid is the base's.

    Rounding W_base + delta on a fresh grid moves every weight by up to half a step (a whole re-quantization's
    error, of the order of the base's own); on the base's grid, W_base sits on grid points, so each weight's
    rounding error is at most its delta's size, and error-compensating rounding (GPTQ) turns the deltas into the
    few code changes that carry them. Not registered: the weights it makes carry the base's own scheme."""

    kind = "kept"

    def __init__(self, base: QuantizedWeight):
        self.base = base

    @property
    def name(self) -> str:
        return f"{self.base.scheme.name} (kept statistics)"

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = self.base.group_index()
        zeros = self.base.zeros
        return expand_groups(self.base.scales, index), None if zeros is None else expand_groups(zeros, index)

    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        if tuple(weight.shape) != tuple(self.base.shape):
            raise LowbitError(f"a kept grid of shape {tuple(self.base.shape)} cannot quantize a "
                              f"{tuple(weight.shape)} weight")
        scales, zeros = self._columns()
        return self.with_codes(self.base, self.encode(weight.float(), scales, zeros))

    def with_codes(self, qw: QuantizedWeight, codes: torch.Tensor) -> QuantizedWeight:
        """The base weight with `codes` (block bytes rebuilt for GGUF types), under its own scheme."""
        rebuild = getattr(self.base.scheme, "with_codes", None)
        return rebuild(self.base, codes) if rebuild is not None else replace(self.base, codes=codes)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return self.base.scheme.dequantize(qw)

    def storage_bits(self, qw: QuantizedWeight) -> int:
        return self.base.scheme.storage_bits(qw)

    @property
    def maxq(self) -> int:          # type: ignore[override]
        return self.base.scheme.maxq

    def grid_position(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        return self.base.scheme.grid_position(w, scales, zeros)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        return self.base.scheme.decode(codes, scales, zeros)

    @property
    def affine_bits(self) -> int | None:
        return self.base.scheme.affine_bits
