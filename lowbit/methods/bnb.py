"""bitsandbytes' load-time methods: NF4/FP4 (optionally double-quantized), LLM.int8(), dynamic int8.

All are weight-only round-to-nearest choices on their scheme (no calibration); what differs at run time
(outlier columns in float, activations quantized per token) is carried by the scheme and done by the kernels
in lowbit.runtime.bnb_kernels.
"""
from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError
from lowbit.methods.base import Method, register_method
from lowbit.runtime import bnb_kernels  # noqa: F401  (registers the kernels these schemes run with)
from lowbit.schemes.codebook import BLOCKSIZES, Codebook4
from lowbit.schemes.int8row import RowInt8

_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                "fp16": "float16", "float16": "float16"}


def compute_dtype_name(value: Any) -> str:
    """Normalise a compute dtype given as 'bf16'/'fp32'/'fp16', a full name, or a torch dtype."""
    key = str(value).replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise LowbitError(f"compute dtype {value!r} unknown; use bf16, fp16 or fp32")
    return _DTYPE_NAMES[key]


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise LowbitError(f"option {name}={value!r} must be true or false")


class _Bnb4Bit(Method):
    """4-bit codebook with absmax per block of `blocksize` weights (bitsandbytes' Linear4bit)."""

    quant_type = "nf4"
    option_types = {"blocksize": int, "double_quant": bool, "compute_dtype": str}

    def option_names(self) -> tuple[str, ...]:
        return ("blocksize", "double_quant", "compute_dtype")

    def scheme(self) -> Codebook4:
        o = self.config.options
        blocksize = int(o.get("blocksize", 64))
        if blocksize not in BLOCKSIZES:
            raise LowbitError(f"--blocksize {blocksize} is not supported; choose one of "
                              f"{', '.join(map(str, BLOCKSIZES))}")
        return Codebook4(quant_type=self.quant_type, blocksize=blocksize,
                         double_quant=_as_bool("double_quant", o.get("double_quant", False)),
                         compute_dtype=compute_dtype_name(o.get("compute_dtype", "bf16")))


@register_method
class NF4(_Bnb4Bit):
    name = "nf4"
    quant_type = "nf4"


@register_method
class FP4(_Bnb4Bit):
    name = "fp4"
    quant_type = "fp4"


@register_method
class LLMInt8(Method):
    """LLM.int8(): row-wise absmax int8 weights; activation columns with any |x| >= threshold stay in float."""

    name = "int8"
    aliases = ("llm-int8",)
    option_types = {"threshold": float}

    def option_names(self) -> tuple[str, ...]:
        return ("threshold",)

    def scheme(self) -> RowInt8:
        return RowInt8(threshold=float(self.config.options.get("threshold", 6.0)), activations="int8")


@register_method
class DynamicInt8(Method):
    """Dynamic quantization: int8 weights per channel, activations int8 per token (min/max) at run time."""

    name = "dynamic-int8"

    def scheme(self) -> RowInt8:
        return RowInt8(threshold=0.0, activations="int8-asym")
