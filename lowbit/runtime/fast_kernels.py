"""Faster kernels for any affine 4-bit weight (integer grids, GGUF Q4_0 / Q4_1 / Q4_K), measured on this CPU.

Measured (SmolLM2 shapes, 2 threads, bf16 activations): torch's `_weight_int4pack_mm_for_cpu` reads a 4-bit
weight at near memory bandwidth for one or a few rows (decode), but for hundreds of rows (prompt processing) it
is 10-15x slower than a bf16 matmul. So the kernel here switches on the number of rows: few rows go through
int4pack, many rows dequantize the weight to bf16 once per call (cost ~N*K, amortised over the rows) and use
the bf16 GEMM. Everything is written as w = a * q + b per group, which covers both the symmetric grids
(a = scale, b = -scale * zero) and the GGUF types with a minimum (w = d * q - m: a = d, b = -m).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.quantized import QuantizedWeight
from lowbit.runtime.kernels import Kernel, register_kernel

# Rows at or above which dequantize-to-bf16 + GEMM beats int4pack (measured crossover is ~8-16 rows).
PREFILL_ROWS = 16
INT4PACK_GROUPS = (32, 64, 128, 256)


def _ggml_codec(qw: QuantizedWeight):
    try:
        from lowbit.schemes.ggml import GGMLScheme
    except ImportError:  # the GGUF schemes are optional for the kernels
        return None
    return qw.scheme.codec if isinstance(qw.scheme, GGMLScheme) else None


def affine_form(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(a, b, code bits) with w = a * q + b per group ([N, n_groups] float32), or None if not affine."""
    if qw.zeros is None:
        return None
    codec = _ggml_codec(qw)
    if codec is not None:
        bits = int(codec.maxq).bit_length()
        if codec.has_min:
            return qw.scales, -qw.zeros, bits
        return qw.scales, -qw.scales * qw.zeros, bits
    bits = qw.scheme.affine_bits
    if bits is None:
        return None
    return qw.scales, -qw.scales * qw.zeros, bits


def _contiguous_groups(qw: QuantizedWeight) -> bool:
    if qw.g_idx is None:
        return True
    return bool(torch.equal(qw.g_idx.long(), torch.arange(qw.in_features) // qw.effective_group_size))


class AffineInt4Kernel(Kernel):
    """Any affine weight with codes < 16: int4pack for decode rows, bf16 dequantize + GEMM for prefill."""

    name = "int4"

    def supports(self, qw: QuantizedWeight) -> bool:
        form = affine_form(qw)
        return (form is not None and form[2] <= 4 and qw.effective_group_size in INT4PACK_GROUPS
                and qw.out_features % 16 == 0 and _contiguous_groups(qw))

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        a, b, _ = affine_form(qw)
        group = qw.effective_group_size
        n, k = qw.shape
        n_groups = a.shape[1]
        pad = n_groups * group - k
        codes = qw.codes
        if pad:
            codes = torch.cat([codes, codes.new_zeros(n, pad)], dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # int4pack computes (q - 8) * scale + offset per group: scale = a, offset = b + 8a.
        scales_and_offsets = torch.stack([a.t(), (b + 8 * a).t()], dim=-1).to(torch.bfloat16).contiguous()
        return {"packed": packed, "sz": scales_and_offsets, "group": group, "pad": pad, "k": k,
                "codes": codes.view(n, n_groups, group),
                "a": a.to(torch.bfloat16)[..., None], "b": b.to(torch.bfloat16)[..., None]}

    def dequantize_bf16(self, state: dict[str, Any]) -> torch.Tensor:
        """The bf16 weight [N, K] (padding columns dropped), from codes and the same bf16 statistics."""
        codes = state["codes"]
        w = torch.addcmul(state["b"], codes.to(torch.bfloat16), state["a"])
        return w.view(codes.shape[0], -1)[:, :state["k"]]

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.shape[0] >= PREFILL_ROWS:
            y = F.linear(x2, self.dequantize_bf16(state))
        else:
            if state["pad"]:
                x2 = F.pad(x2, (0, state["pad"]))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), state["packed"], state["group"],
                                                           state["sz"])
        return y.reshape(*shape[:-1], -1).to(x.dtype)


register_kernel(AffineInt4Kernel(), before="int4pack")
