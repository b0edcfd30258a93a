"""GPTQ on the exact GGUF block grid of a llama.cpp mix ("gptq-gguf").

Each Linear gets the GGUF type the mix gives it (gguf_mixes' llama.cpp rules), chosen before quantization as
the method's per-layer scheme plan. Its block statistics (d, dmin, the 4/6-bit sub-scales) are fixed from the
weights by the type's own importance-weighted search (imatrix = diag of the GPTQ Hessian), then GPTQ's column
sweep re-chooses every code on that fixed grid, pushing each rounding error onto the columns not yet
quantized. The result is ordinary GGUF blocks (llama.cpp runs them unchanged) with lower output error than
round-to-nearest. Layers the mix keeps in F16/F32 stay float.
"""
from __future__ import annotations

from torch import nn

from lowbit.methods.base import register_method
from lowbit.methods.gptq import GPTQ


@register_method
class GGUFGPTQ(GPTQ):
    """GPTQ with a per-layer GGUF scheme chosen by a llama.cpp mix (options: gguf_type, tensor_types, pure)."""

    name = "gptq-gguf"

    def option_names(self) -> tuple[str, ...]:
        return (*super().option_names(), "gguf_type", "tensor_types", "pure")

    def check_layer(self, name: str, linear: nn.Module) -> None:
        """Row widths are handled by the mix's fallbacks, never an error."""

    def plan_layers(self, model: nn.Module) -> tuple[str, ...]:
        """Every Linear's GGUF scheme from the mix; the Linears the mix keeps in F16/F32 stay float."""
        from lowbit.formats.gguf import plan_gguf_schemes

        self.layer_schemes, floats = plan_gguf_schemes(
            model, str(self.option("gguf_type", "Q4_K_M")), self.option("tensor_types", None),
            bool(self.option("pure", False)), has_imatrix=True)
        return floats
