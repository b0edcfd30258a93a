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

import ctypes
import logging
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.quantized import QuantizedWeight
from lowbit.runtime.checks import check_status
from lowbit.runtime.clib import affine_spec, column_order, linear, native_library, reads_blocks
from lowbit.runtime.cpu import gemm_dtype
from lowbit.runtime.kernels import Kernel, contiguous_groups, register_kernel

log = logging.getLogger("lowbit")

# Rows at or above which dequantize-to-bf16 + GEMM beats int4pack (measured crossover is ~8-16 rows).
PREFILL_ROWS = 16
INT4PACK_GROUPS = (32, 64, 128, 256)


def affine_form(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(a, b, code bits) with w = a * q + b per group, as the weight's scheme defines it (None: not affine)."""
    return qw.scheme.affine_form(qw)


# Output rows dequantized per GEMM call: bounds the transient weight slice (4096 x 4096 float32: 64 MB) for any
# matrix, a 150k-row head included.
PREFILL_SLICE_ROWS = 4096


def prefill_matmul(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x2 [M, K] @ W^T for many rows: slices of W dequantized from the packed bytes the decode kernels read (C),
    each fed to one GEMM in the CPU's fast dtype (bf16 with AMX, else float32); float32 out."""
    dtype = gemm_dtype()
    lib = native_library()
    described = affine_spec(qw) if lib is not None else None
    if described is None:                   # no compiled library: dequantize through the scheme
        return F.linear(x2.to(dtype), qw.dequantize(dtype)).float()
    spec = described[0]
    order = None if reads_blocks(qw) else column_order(qw)
    if order is not None:
        x2 = x2.index_select(1, order)      # the codes are stored in the sorted column order
    x2 = x2.to(dtype)
    n, k = qw.shape
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    for n0 in range(0, n, PREFILL_SLICE_ROWS):
        n1 = min(n, n0 + PREFILL_SLICE_ROWS)
        w = torch.empty(n1 - n0, k, dtype=dtype)
        check_status(lib.lowbit_dequantize_rows(ctypes.byref(spec), n0, n1, w.data_ptr(), w.numel() * w.element_size(),
                                                int(dtype == torch.bfloat16), torch.get_num_threads()),
                     f"dequantizing rows {n0}..{n1} of a {n} x {k} weight", lib)
        y[:, n0:n1] = F.linear(x2, w)
    return y


class AffineInt4Kernel(Kernel):
    """Any affine weight with codes < 16: int4pack for decode rows, bf16 dequantize + GEMM for prefill."""

    name = "int4"

    def supports(self, qw: QuantizedWeight) -> bool:
        form = affine_form(qw)
        return (form is not None and form[2] <= 4 and qw.effective_group_size in INT4PACK_GROUPS
                and qw.out_features % 16 == 0 and contiguous_groups(qw))

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        # Nothing is copied up front: prefill reads the packed bytes clib keeps for the decode kernels, and the
        # int4pack copy is made on the first decode-sized call (the engine's compiled step may never need it).
        return {"qw": qw, "packed": None, "group": qw.effective_group_size}

    @staticmethod
    def _pack(state: dict[str, Any]) -> None:
        qw = state["qw"]
        a, b, _ = affine_form(qw)
        codes, group = qw.codes, state["group"]
        n, k = codes.shape
        pad = a.shape[1] * group - k
        if pad:
            codes = torch.cat([codes, codes.new_zeros(n, pad)], dim=1)
        state["pad"] = pad
        state["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # int4pack computes (q - 8) * scale + offset per group: scale = a, offset = b + 8a.
        state["sz"] = torch.stack([a.float().t(), (b.float() + 8 * a.float()).t()], dim=-1).to(torch.bfloat16).contiguous()

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS:
            y = prefill_matmul(x2, state["qw"])
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

    def computes_in_float32(self, state: dict[str, Any]) -> bool:
        return True         # decode rows: float32 C kernel; prompt rows: prefill_matmul in gemm_dtype()

    def supports(self, qw: QuantizedWeight) -> bool:
        # act-order weights too: their columns are sorted into contiguous groups once, activations gathered
        return native_library() is not None and affine_form(qw) is not None and affine_spec(qw) is not None

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        # No ctypes objects in the state (modules holding it must stay deep-copyable) and no copy of the codes:
        # the C description and its packed bytes are looked up per call from clib's cache.
        return {"qw": qw}

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS:
            y = prefill_matmul(x2, state["qw"])
        else:
            y = linear(affine_spec(state["qw"])[0], x2)
        return y.reshape(*shape[:-1], -1).to(x.dtype)


class GGMLBlockKernel(AffineU8Kernel):
    """GGUF blocks (Q4_0 ... Q6_K) read as the file stores them (csrc/ggml_blocks.h): the u8 kernel's decode and
    prompt paths, whose C description of such a weight points at its blocks (clib.reads_blocks). No copy is made."""

    name = "ggml"

    def supports(self, qw: QuantizedWeight) -> bool:
        return reads_blocks(qw)


# First: GGUF blocks are read in place (int4pack and u8 would each keep a repacked copy).
register_kernel(GGMLBlockKernel(), before="int8pack")
register_kernel(AffineInt4Kernel(), before="int8pack")
# Before int8pack too: same decode speed for per-channel 8-bit, exact float32 sums, and fast prefill.
register_kernel(AffineU8Kernel(), before="int8pack")
