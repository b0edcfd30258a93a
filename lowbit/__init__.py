"""lowbit: post-training quantization, export, CPU inference and evaluation of causal language models."""
__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin at barriers collapse on a busy machine: a spinning thread burns the time slice its
# preempted sibling needs to reach the barrier. Measured with SmolLM2 decoding on 2 cores at load 12: 0.5 tok/s
# spinning (libgomp's default), 11 tok/s sleeping (and 8.3 on one thread). libgomp reads this when torch loads it,
# so it is set before torch is imported; OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lowbit.api import load, quantize, save  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.methods.base import CalibrationRequest, QuantizeConfig  # noqa: E402

__all__ = ["load", "quantize", "save", "QuantizeConfig", "CalibrationRequest", "LowbitError"]
