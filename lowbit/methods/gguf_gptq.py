"""GPTQ on the exact GGUF block grid of a llama.cpp mix ("gptq-gguf").

Each Linear gets the GGUF type the mix gives it (gguf_mixes' llama.cpp rules). Its block statistics (d, dmin,
the 4/6-bit sub-scales) are fixed from the weights by the type's own importance-weighted search (imatrix =
diag of the GPTQ Hessian), then GPTQ's column sweep re-chooses every code on that fixed grid, pushing each
rounding error onto the columns not yet quantized. The result is ordinary GGUF blocks (llama.cpp runs them
unchanged) with lower output error than round-to-nearest. Layers the mix keeps in F16/F32 stay float.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.methods.base import register_method
from lowbit.methods.gptq import GPTQ, run_calibrated
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.ggml import CODECS, GGMLScheme


@register_method
class GGUFGPTQ(GPTQ):
    """GPTQ with a per-layer GGUF scheme chosen by a llama.cpp mix (options: gguf_type, tensor_types, pure)."""

    name = "gptq-gguf"

    def option_names(self) -> tuple[str, ...]:
        return (*super().option_names(), "gguf_type", "tensor_types", "pure")

    def check_layer(self, name: str, linear: nn.Module) -> None:
        """Row widths are handled by the mix's fallbacks, never an error."""

    def layer_types(self, model: nn.Module) -> dict[str, str]:
        """{Linear module name: GGUF type} for this method's mix."""
        from lowbit.formats.gguf import plan_gguf_types

        plan = plan_gguf_types(model, str(self.option("gguf_type", "Q4_K_M")), self.option("tensor_types", None),
                               bool(self.option("pure", False)), has_imatrix=True)
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        return {n[:-len(".weight")]: t for n, t in plan.items() if n.endswith(".weight") and n[:-7] in linears}

    def quantize_model(self, model: nn.Module, calibration: Any = None, progress: bool = True,
                       kernel: str = "auto") -> nn.Module:
        self._types = self.layer_types(model)
        floats = tuple(n for n, t in self._types.items() if t not in CODECS)
        self.config.skip = tuple(self.config.skip) + floats  # the mix keeps these in F16/F32
        return run_calibrated(self, model, calibration, progress, kernel)

    def scheme(self) -> GGMLScheme:
        return GGMLScheme(self._types[self._layer])

    def quantize_with_hessian(self, name: str, weight: torch.Tensor, hessian: torch.Tensor):
        self._layer = name
        return super().quantize_with_hessian(name, weight, hessian)

    def quantize_weight(self, name: str, weight: torch.Tensor, importance: torch.Tensor | None = None
                        ) -> QuantizedWeight:
        self._layer = name
        return super().quantize_weight(name, weight, importance)
