"""Faster kernels for affine weights (integer grids, GGUF blocks), measured on this CPU.

Measured (SmolLM2 shapes, 2 threads, bf16 activations): torch's `_weight_int4pack_mm_for_cpu` reads a 4-bit
weight at near memory bandwidth for one or a few rows (decode), but for hundreds of rows (prompt processing) it
is 10-15x slower than a float GEMM. So the kernels here switch on the number of rows: few rows go through
int4pack (or the C kernel below), many rows dequantize the weight once per call (cost ~N*K, amortised over the
rows; one parallel C pass) and use the bf16 GEMM (AMX). Everything is written as w = a * q + b per group, which covers both the symmetric grids
(a = scale, b = -scale * zero) and the GGUF types with a minimum (w = d * q - m: a = d, b = -m).

Codes torch cannot take (5..8 bits with groups: GGUF Q5_x/Q6_K/Q8_0, grouped 8-bit grids, K-quants with
16-column groups) go through a small C kernel (csrc/affine_gemv.c) that reads 1-byte codes and the group
statistics directly. It is compiled with the machine's C compiler on first use (or at install time by `make setup`,
which calls `build_native()`) for this CPU's instruction set, cached by source and CPU flags;
with no compiler the kernel simply reports itself unsupported and the registry picks the next one.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.quantized import QuantizedWeight
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
        # The prefill path reads the unpacked codes the QuantizedWeight already holds (no extra copy).
        return {"packed": packed, "sz": scales_and_offsets, "group": group, "pad": pad,
                "codes": qw.codes.contiguous(), "a": a.float().contiguous(), "b": b.float().contiguous()}

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS:
            y = prefill_matmul(x2, state["codes"], state["a"], state["b"], state["group"])
        else:
            x2 = x2.to(torch.bfloat16)
            if state["pad"]:
                x2 = F.pad(x2, (0, state["pad"]))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), state["packed"], state["group"],
                                                           state["sz"])
        return y.reshape(*shape[:-1], -1).to(x.dtype)


# -- the compiled kernel for 1-byte codes ------------------------------------------------------------------
SOURCE = Path(__file__).with_name("csrc") / "affine_gemv.c"
_LIBRARY: ctypes.CDLL | None = None
_LIBRARY_TRIED = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_library_path() -> Path:
    """Where the compiled kernel for this source and this CPU lives (package folder, else the user cache)."""
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode()).hexdigest()[:16]
    name = f"affine_gemv-{key}.so"
    package_dir = Path(__file__).with_name("_native")
    if os.access(package_dir if package_dir.exists() else package_dir.parent, os.W_OK):
        return package_dir / name
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit" / name


def build_native(verbose: bool = False) -> Path | None:
    """Compile csrc/affine_gemv.c for this CPU (-march=native, OpenMP); the library path, or None on failure."""
    target = native_library_path()
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: the u8 kernel is unavailable (other kernels are used)")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    for flags in (["-march=native"], []):   # a compiler that refuses -march=native still builds a portable one
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            os.replace(tmp, target)        # atomic: a concurrent build never sees half a library
            if verbose:
                print(" ".join(cmd))
            return target
        os.unlink(tmp)
        log.debug("kernel build failed: %s\n%s", " ".join(cmd), result.stderr)
    log.info("could not compile the u8 kernel; other kernels are used")
    return None


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it cannot be built or loaded."""
    global _LIBRARY, _LIBRARY_TRIED
    if _LIBRARY_TRIED:
        return _LIBRARY
    _LIBRARY_TRIED = True
    if os.environ.get("LOWBIT_NO_NATIVE"):
        return None
    path = build_native()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))   # torch is imported first, so its libgomp is the one shared
    except OSError as exc:
        log.info("could not load %s (%s); other kernels are used", path, exc)
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lowbit_affine_gemv_u8.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i32]
    lib.lowbit_affine_gemv_u8.restype = None
    lib.lowbit_affine_dequant_u8_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ptr, i32]
    lib.lowbit_affine_dequant_u8_bf16.restype = None
    _LIBRARY = lib
    return lib


class AffineU8Kernel(Kernel):
    """Any affine weight with codes <= 255 and contiguous groups: the C kernel for decode rows, bf16
    dequantize + GEMM for prefill."""

    name = "u8"

    def supports(self, qw: QuantizedWeight) -> bool:
        form = affine_form(qw)
        return form is not None and form[2] <= 8 and contiguous_groups(qw) and native_library() is not None

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        a, b, _ = affine_form(qw)
        return {"codes": qw.codes.to(torch.uint8).contiguous(), "a": a.float().contiguous(),
                "b": b.float().contiguous(), "group": qw.effective_group_size, "k": qw.in_features}

    def matmul(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        codes, a, b, group, k = state["codes"], state["a"], state["b"], state["group"], state["k"]
        n, n_groups = a.shape
        if x2.shape[0] >= PREFILL_ROWS:
            return prefill_matmul(x2, codes, a, b, group).reshape(*shape[:-1], n).to(x.dtype)
        x2 = x2.float().contiguous()
        pad = n_groups * group - k
        xsum = (F.pad(x2, (0, pad)) if pad else x2).view(-1, n_groups, group).sum(-1).contiguous()
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        native_library().lowbit_affine_gemv_u8(x2.data_ptr(), xsum.data_ptr(), x2.shape[0], k, codes.data_ptr(),
                                               a.data_ptr(), b.data_ptr(), n, n_groups, group, y.data_ptr(),
                                               torch.get_num_threads())
        return y.reshape(*shape[:-1], n).to(x.dtype)


register_kernel(AffineInt4Kernel(), before="int8pack")
# Before int8pack too: same decode speed for per-channel 8-bit, exact float32 sums, and fast prefill.
register_kernel(AffineU8Kernel(), before="int8pack")

