"""lowbit: post-training quantization, export, CPU inference and evaluation of causal language models."""
__version__ = "0.1.0"

from lowbit.api import load, quantize, save  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.methods.base import CalibrationRequest, QuantizeConfig  # noqa: E402

__all__ = ["load", "quantize", "save", "QuantizeConfig", "CalibrationRequest", "LowbitError"]
