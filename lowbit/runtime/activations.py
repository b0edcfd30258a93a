"""The arithmetic the compiled kernels do on their activations (`--activations`, `Engine(activations=...)`).

GGUF block weights are what llama.cpp runs, and llama.cpp rounds the activation row to int8 blocks (Q8_0 / Q8_K)
before every dot product with them: `int8` is that arithmetic, read by lowbit's AVX2 integer kernels. `float32`
keeps the activations in float32 (equal to a float32 matmul of the dequantized weight up to rounding: what the
tests comparing with transformers need). `auto` is int8 for GGUF block weights, where it is llama.cpp's own
arithmetic on the same file, and float32 for lowbit's own layouts (RTN/GPTQ/AWQ codes, NF4), whose float32
kernels are exact and not slower enough to give that up by default.

The codes are csrc/affine_dot.h's LB_ACTS_*; which weights a choice rounds is decided in C alone
(lb_uses_act8, asked through clib.uses_act8), so Python holds no second copy of that rule.
"""
from __future__ import annotations

import enum

from lowbit.errors import LowbitError


class Activations(str, enum.Enum):
    FLOAT32 = "float32"
    INT8 = "int8"
    AUTO = "auto"

    @property
    def code(self) -> int:
        """csrc/affine_dot.h's LB_ACTS_* value."""
        return {Activations.FLOAT32: 0, Activations.INT8: 1, Activations.AUTO: 2}[self]

    @classmethod
    def parse(cls, value: str | Activations) -> Activations:
        """An Activations from its name; LowbitError naming the choices for anything else."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(a.value for a in cls)
            raise LowbitError(f"unknown activations {value!r}; choose one of: {choices}") from None


ACTIVATION_CHOICES = tuple(a.value for a in Activations)
