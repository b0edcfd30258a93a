"""What this CPU computes fast, for choosing the arithmetic of prompt-sized matmuls.

bfloat16 GEMMs are several times faster than float32 where the CPU multiplies bf16 natively (AMX, AVX-512 BF16;
measured 7x on a Sapphire Rapids) and slower where it does not (AVX2 machines convert every element), so prompt
processing uses bf16 only where the hardware has it.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def gemm_dtype() -> torch.dtype:
    """The dtype prompt-sized GEMMs run in on this CPU: bfloat16 where it is native, else float32."""
    return torch.bfloat16 if has_native_bf16() and not float32_required() else torch.float32


# Evaluation measures what quantization lost, so it can ask for float32 arithmetic everywhere: kernels that round
# activations or dequantized weights to bf16 for speed (int4pack, int8pack, bf16 GEMMs) step aside while this is
# set, and prompt-sized GEMMs run in float32 (see QuantLinear.forward).
_FLOAT32_DEPTH = 0


def float32_required() -> bool:
    return _FLOAT32_DEPTH > 0


@contextlib.contextmanager
def float32_arithmetic():
    """Within this block every QuantLinear computes in float32 (the weight's own values, summed in float32)."""
    global _FLOAT32_DEPTH
    _FLOAT32_DEPTH += 1
    try:
        yield
    finally:
        _FLOAT32_DEPTH -= 1
