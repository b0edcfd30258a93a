"""Faster kernels for affine weights (integer grids, GGUF blocks), measured on this CPU.

Measured (SmolLM2 shapes, 2 threads, bf16 activations): torch's `_weight_int4pack_mm_for_cpu` reads a 4-bit
weight at near memory bandwidth for one or a few rows (decode), but for hundreds of rows (prompt processing) it
is 10-15x slower than a float GEMM. So the kernels here switch on the number of rows: few rows go through
int4pack (or lowbit's compiled kernel), many rows dequantize the weight once per call (cost ~N*K, amortised
over the rows; one parallel C pass) and use the bf16 GEMM (AMX). Everything is written as w = a * q + b per
group, which covers both the symmetric grids (a = scale, b = -scale * zero) and the GGUF types with a minimum (w = d * q - m: a = d, b = -m).

Codes torch cannot take (5..8 bits with groups: GGUF Q5_x/Q6_K/Q8_0, grouped 8-bit grids, K-quants with
16-column groups) go through lowbit's compiled kernel (runtime/clib.py, csrc/affine_dot.h), which reads the codes
and the group statistics directly in float32; with no C compiler it reports itself unsupported and the registry
picks the next kernel.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.quantized import QuantizedWeight
from lowbit.runtime.clib import affine_spec, column_order, linear, native_library
from lowbit.runtime.kernels import Kernel, contiguous_groups, register_kernel

log = logging.getLogger("lowbit")

# Rows at or above which dequantize-to-bf16 + GEMM beats int4pack (measured crossover is ~8-16 rows).
PREFILL_ROWS = 16
INT4PACK_GROUPS = (32, 64, 128, 256)


def affine_form(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(a, b, code bits) with w = a * q + b per group, as the weight's scheme defines it (None: not affine)."""
    return qw.scheme.affine_form(qw)


def prefill_matmul(x2: torch.Tensor, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, group: int
                   ) -> torch.Tensor:
    """x2 [M, K] @ W^T for many rows: build W = a*q + b in bf16 once (C kernel, else torch ops), then one bf16
    GEMM (measured ~7x faster than float32 here: AMX), returned in float32."""
    n, k = codes.shape
    lib = native_library()
    if lib is not None:
        w = torch.empty(n, k, dtype=torch.bfloat16)
        lib.lowbit_affine_dequant_u8_bf16(codes.data_ptr(), a.data_ptr(), b.data_ptr(), n, k, a.shape[1], group,
                                          w.data_ptr(), torch.get_num_threads())
    else:
        w = torch.addcmul(b.repeat_interleave(group, 1)[:, :k], codes.float(),
                          a.repeat_interleave(group, 1)[:, :k]).to(torch.bfloat16)
    return F.linear(x2.to(torch.bfloat16), w).float()


class AffineInt4Kernel(Kernel):
    """Any affine weight with codes < 16: int4pack for decode rows, bf16 dequantize + GEMM for prefill."""

    name = "int4"

    def supports(self, qw: QuantizedWeight) -> bool:
        form = affine_form(qw)
        return (form is not None and form[2] <= 4 and qw.effective_group_size in INT4PACK_GROUPS
                and qw.out_features % 16 == 0 and contiguous_groups(qw))

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        a, b, _ = affine_form(qw)
        # The prefill path reads the unpacked codes the QuantizedWeight already holds (no extra copy); the
        # int4pack copy is made on the first decode-sized call (the engine's compiled step may never need it).
        return {"packed": None, "group": qw.effective_group_size, "codes": qw.codes.contiguous(),
                "a": a.float().contiguous(), "b": b.float().contiguous()}

    @staticmethod
    def _pack(state: dict[str, Any]) -> None:
        codes, a, b, group = state["codes"], state["a"], state["b"], state["group"]
        n, k = codes.shape
        pad = a.shape[1] * group - k
        if pad:
            codes = torch.cat([codes, codes.new_zeros(n, pad)], dim=1)
        state["pad"] = pad
        state["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # int4pack computes (q - 8) * scale + offset per group: scale = a, offset = b + 8a.
        state["sz"] = torch.stack([a.t(), (b + 8 * a).t()], dim=-1).to(torch.bfloat16).contiguous()

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS:
            y = prefill_matmul(x2, state["codes"], state["a"], state["b"], state["group"])
        else:
            if state["packed"] is None:
                self._pack(state)
            x2 = x2.to(torch.bfloat16)
            if state["pad"]:
                x2 = F.pad(x2, (0, state["pad"]))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), state["packed"], state["group"],
                                                           state["sz"])
        return y.reshape(*shape[:-1], -1).to(x.dtype)


class AffineU8Kernel(Kernel):
    """Any affine weight with codes <= 255 (act-order ones through a column order): lowbit's compiled kernel
    (clib) for decode rows (float32, 4-bit codes read two per byte), bf16 dequantize + GEMM for prefill."""

    name = "u8"

    def supports(self, qw: QuantizedWeight) -> bool:
        # act-order weights too: their columns are sorted into contiguous groups once, activations gathered
        return native_library() is not None and affine_form(qw) is not None and affine_spec(qw) is not None

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        a, b, _ = affine_form(qw)
        order = column_order(qw)
        codes = qw.codes if order is None else qw.codes[:, order]
        # No ctypes objects in the state (modules holding it must stay deep-copyable): the C description is
        # looked up per call from clib's cache.
        return {"qw": qw, "codes": codes.to(torch.uint8).contiguous(), "order": order,
                "a": a.float().contiguous(), "b": b.float().contiguous(), "group": qw.effective_group_size}

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS:
            if state["order"] is not None:
                x2 = x2.index_select(1, state["order"])
            y = prefill_matmul(x2, state["codes"], state["a"], state["b"], state["group"])
        else:
            y = linear(affine_spec(state["qw"])[0], x2)
        return y.reshape(*shape[:-1], -1).to(x.dtype)


register_kernel(AffineInt4Kernel(), before="int8pack")
# Before int8pack too: same decode speed for per-channel 8-bit, exact float32 sums, and fast prefill.
register_kernel(AffineU8Kernel(), before="int8pack")

