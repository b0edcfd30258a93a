"""Matmul kernels for quantized weights, chosen per layer by what the weight's scheme allows.

Each kernel turns a QuantizedWeight into its own packed state once (cached on the module) and multiplies
activations by it. The reference kernel dequantizes and works for every scheme; the others use torch's CPU
low-bit kernels, which are only fast with bf16 activations (fp32 inputs run 10-60x slower), so they cast.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.quantized import QuantizedWeight


class Kernel:
    """A way to compute x @ W^T for a QuantizedWeight."""

    name = "base"

    def supports(self, qw: QuantizedWeight) -> bool:
        raise NotImplementedError

    def prepare(self, qw: QuantizedWeight) -> Any:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def computes_in_float32(self, state: Any) -> bool:
        """True when matmul is float32 arithmetic on the weight's exact values (up to summation order), or the
        quantization method itself defines the arithmetic (LLM.int8's int8 activations); False for kernels that
        round to bf16 for speed, which evaluation replaces (runtime.cpu.float32_arithmetic)."""
        return False


class ReferenceKernel(Kernel):
    """Dequantize on every call: exact for every scheme, slow, no extra memory kept."""

    name = "reference"

    def computes_in_float32(self, state: Any) -> bool:
        return True

    def supports(self, qw: QuantizedWeight) -> bool:
        return True

    def prepare(self, qw: QuantizedWeight) -> QuantizedWeight:
        return qw

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        return F.linear(x, qw.dequantize(x.dtype))


def contiguous_groups(qw: QuantizedWeight) -> bool:
    """True when column k is in group k // group_size (no act-order permutation), as packed kernels need."""
    return qw.g_idx is None or bool(torch.equal(qw.g_idx.long(), torch.arange(qw.in_features) // qw.effective_group_size))


class Int8PackKernel(Kernel):
    """torch's `_weight_int8pack_mm`: 8-bit symmetric per-channel weights."""

    name = "int8pack"

    def supports(self, qw: QuantizedWeight) -> bool:
        return (qw.scheme.affine_bits == 8 and qw.scales.shape[1] == 1 and qw.zeros is not None
                and bool((qw.zeros == 128).all()))

    def prepare(self, qw: QuantizedWeight):
        # torch's kernel reads past the end unless the width is a multiple of 16 (it crashes at 172):
        # pad weights and activations with zero columns.
        pad = (-qw.in_features) % 16
        w = (qw.codes.to(torch.int16) - 128).to(torch.int8)
        if pad:
            w = F.pad(w, (0, pad))
        return w.contiguous(), qw.scales[:, 0].to(torch.bfloat16), pad

    def matmul(self, x: torch.Tensor, state) -> torch.Tensor:
        w, s, pad = state
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if pad:
            x2 = F.pad(x2, (0, pad))
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w, s)
        return y.reshape(*shape[:-1], -1).to(x.dtype)


class DequantBF16Kernel(Kernel):
    """Keep a bf16 copy of the dequantized weight: fast for large batches, costs 16 bits per weight."""

    name = "bf16"

    def supports(self, qw: QuantizedWeight) -> bool:
        return True

    def prepare(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.dequantize(torch.bfloat16)

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


KERNELS: dict[str, Kernel] = {k.name: k for k in (Int8PackKernel(), DequantBF16Kernel(), ReferenceKernel())}
# Tried in this order by kernel="auto"; the first that supports a weight wins.
AUTO_ORDER: list[str] = ["int8pack", "reference"]


def register_kernel(kernel: Kernel, before: str | None = "reference") -> None:
    """Add a kernel (e.g. a scheme-specific one) and try it in 'auto' mode before `before`."""
    KERNELS[kernel.name] = kernel
    if kernel.name not in AUTO_ORDER:
        AUTO_ORDER.insert(AUTO_ORDER.index(before) if before in AUTO_ORDER else len(AUTO_ORDER), kernel.name)


def select_kernel(qw: QuantizedWeight, preference: str = "auto") -> Kernel:
    """The kernel to run `qw` with: `preference` if it supports the weight, else the first in AUTO_ORDER."""
    if preference != "auto":
        kernel = KERNELS[preference]
        if kernel.supports(qw):
            return kernel
    return next(KERNELS[name] for name in AUTO_ORDER if KERNELS[name].supports(qw))


# Faster kernels measured on this CPU (issue 6); imported last because they register themselves here.
from lowbit.runtime import fast_kernels  # noqa: E402,F401
