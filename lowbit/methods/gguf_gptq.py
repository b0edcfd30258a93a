"""Methods on the GGUF block grids of a llama.cpp mix: "gguf" (round to nearest, llama-quantize's own
search) and "gptq-gguf" (GPTQ on the same grids).

The mix (gguf_mixes' llama.cpp rules) is a per-layer scheme plan chosen before quantization: every Linear gets
the GGUF type llama-quantize would give its tensor, and the Linears the mix keeps in F16/F32 stay float. The
walk then quantizes each Linear on its planned grid, so the GGUF writer only serialises the blocks.

gptq-gguf: each Linear's block statistics (d, dmin, the 4/6-bit sub-scales) are fixed from the weights by the
type's own importance-weighted search (imatrix = diag of the GPTQ Hessian), then GPTQ's column sweep
re-chooses every code on that fixed grid, pushing each rounding error onto the columns not yet quantized. The
result is ordinary GGUF blocks (llama.cpp runs them unchanged) with lower output error than round-to-nearest.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import Method, register_method
from lowbit.methods.gptq import GPTQ
from lowbit.quantized import QuantizedWeight

MIX_OPTIONS = ("gguf_type", "tensor_types", "pure")


def plan_mix(method: Method, model: nn.Module, has_imatrix: bool) -> tuple[str, ...]:
    """Fill `method.layer_schemes` with the mix's GGUF scheme of every Linear; return the Linears kept float."""
    from lowbit.formats.gguf import plan_gguf_schemes

    options = method.config.options
    method.layer_schemes, floats = plan_gguf_schemes(
        model, str(options.get("gguf_type") or "Q4_K_M"), options.get("tensor_types"), bool(options.get("pure")),
        has_imatrix=has_imatrix)
    return floats


@register_method
class GGUFRound(Method):
    """llama-quantize's rounding on the mix's per-layer GGUF types (options: gguf_type, tensor_types, pure,
    importance = {Linear name: imatrix vector} from lowbit.calibration.imatrix)."""

    name = "gguf"
    aliases = ("rtn-gguf",)

    def option_names(self) -> tuple[str, ...]:
        return (*MIX_OPTIONS, "importance")

    def check_layer(self, name: str, linear: nn.Module) -> None:
        """Row widths are handled by the mix's fallbacks, never an error."""

    def scheme(self):
        raise LowbitError("method gguf has no single scheme: each layer's GGUF type comes from the mix's plan")

    def plan_layers(self, model: nn.Module) -> tuple[str, ...]:
        return plan_mix(self, model, has_imatrix=bool(self.config.options.get("importance")))

    def quantize_weight(self, name: str, weight: torch.Tensor, importance: torch.Tensor | None = None
                        ) -> QuantizedWeight:
        """The layer's planned GGUF type, weighted by its imatrix when one was collected."""
        if importance is None:
            importance = (self.config.options.get("importance") or {}).get(name)
        return self.scheme_for(name).quantize(weight, importance)


@register_method
class GGUFGPTQ(GPTQ):
    """GPTQ with a per-layer GGUF scheme chosen by a llama.cpp mix (options: gguf_type, tensor_types, pure)."""

    name = "gptq-gguf"

    def option_names(self) -> tuple[str, ...]:
        return (*super().option_names(), *MIX_OPTIONS)

    def check_layer(self, name: str, linear: nn.Module) -> None:
        """Row widths are handled by the mix's fallbacks, never an error."""

    def plan_layers(self, model: nn.Module) -> tuple[str, ...]:
        return plan_mix(self, model, has_imatrix=True)


def mix_options(type: str | None, tensor_types: list[str] | None, pure: bool, **extra: Any) -> dict[str, Any]:
    """Method options of a GGUF mix given on the command line."""
    return {"gguf_type": type or "Q4_K_M", "tensor_types": tensor_types or None, "pure": pure, **extra}
