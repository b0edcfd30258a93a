"""Methods: how codes are chosen. Importing this package registers every built-in method."""
from lowbit.methods.base import Method, QuantizeConfig, get_method, known_methods, register_method
from lowbit.methods import rtn  # noqa: F401

__all__ = ["Method", "QuantizeConfig", "get_method", "known_methods", "register_method"]
