"""What every scheme (a way of representing numbers) provides, and the registry that finds one by name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, fields
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

    # Column-wise access used by error-compensating methods (GPTQ): statistics are fixed, codes chosen per column.
    def encode(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """Codes for `w` [N, c] under per-row statistics `scales`/`zeros` broadcastable to [N, c]."""
        raise LowbitError(f"scheme {self.kind} does not support column-wise encoding (needed by GPTQ)")

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """Values of `codes` [N, c] under statistics broadcastable to [N, c]."""
        raise LowbitError(f"scheme {self.kind} does not support column-wise decoding (needed by GPTQ)")

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Scheme":
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(config) - names
        if unknown:
            raise LowbitError(f"scheme {cls.kind}: unknown settings {sorted(unknown)}")
        return cls(**config)


def expand_groups(stat: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Per-group statistics [N, G] -> per-column [N, K] using each column's group."""
    return stat.index_select(1, group_index)
