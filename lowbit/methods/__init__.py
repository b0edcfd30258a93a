"""Methods: how codes are chosen. Importing this package registers every built-in method."""
from lowbit.methods.base import Method, QuantizeConfig, get_method, known_methods, register_method
from lowbit.methods import rtn  # noqa: F401
from lowbit.methods import bnb  # noqa: F401  (nf4, fp4, int8, dynamic-int8; issue 5)
from lowbit.methods import gptq, awq  # noqa: F401  (calibrated methods, issue 4)
from lowbit.methods import gguf_gptq  # noqa: F401  (GPTQ on the GGUF block grid, issue 3)
from lowbit.methods import qat  # noqa: F401  (quantization-aware training, block by block, issue 14)

__all__ = ["Method", "QuantizeConfig", "get_method", "known_methods", "register_method"]
