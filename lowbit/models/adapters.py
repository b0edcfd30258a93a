"""Compatibility names for the architecture registry (lowbit.models.arch): methods, formats and loaders ask
the registry; these aliases keep older imports working."""
from __future__ import annotations

from lowbit.models.arch import architecture_for
from lowbit.models.arch.base import Architecture, ScaleGroup, in_out_features, is_linear, linear_weight

ArchAdapter = Architecture
adapter_for = architecture_for

__all__ = ["ArchAdapter", "Architecture", "ScaleGroup", "adapter_for", "architecture_for", "in_out_features",
           "is_linear", "linear_weight"]
