"""lowbit: post-training quantization, export, CPU inference and evaluation of causal language models."""
__version__ = "0.1.0"

import importlib as _importlib
import os as _os

# OpenMP threads that spin at barriers collapse on a busy machine: a spinning thread burns the time slice its
# preempted sibling needs to reach the barrier. Measured with SmolLM2 decoding on 2 cores at load 12: 0.5 tok/s
# spinning (libgomp's default), 11 tok/s sleeping (and 8.3 on one thread). libgomp reads this when torch loads it,
# so it is set before torch is imported; OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
