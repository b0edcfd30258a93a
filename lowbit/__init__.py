"""lowbit: post-training quantization, export, CPU inference and evaluation of causal language models."""
__version__ = "0.1.0"

import importlib as _importlib
import os as _os

# OpenMP threads that spin at barriers collapse on a busy machine: a spinning thread burns the time slice its
# preempted sibling needs to reach the barrier (SmolLM2 decoding on 2 cores at load 12: 0.5 tok/s with libgomp's
# default spin, 11 tok/s sleeping). Sleeping at once costs a futex wake per barrier (~170 a token) on a quiet
# machine, so threads spin briefly, then sleep: GOMP_SPINCOUNT=3000 (a few microseconds). Measured side by side,
# Qwen2.5-0.5B Q4_K_M, 2 threads: quiet-ish (load 2-9) tg64 22.4 tok/s sleeping at once vs 25.2 with 3000 spins
# (24.8 with 20000); with 10 spinning processes on the 2 cores tg16 3.08/2.86 vs 3.11/2.87 (20000 spins lost 30%
# there: 2.3/2.1). libgomp reads these when it loads, so they are set before torch is imported; an
# OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000")

# The public API, imported on first use: `import lowbit` (and header-only commands such as `lowbit inspect`)
# must not pay for importing torch and transformers.
_PUBLIC = {
    "load": "lowbit.api",
    "quantize": "lowbit.api",
    "save": "lowbit.api",
    "LowbitError": "lowbit.errors",
    "CalibrationRequest": "lowbit.methods.base",
    "QuantizeConfig": "lowbit.methods.base",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
