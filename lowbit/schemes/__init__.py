"""Schemes: how numbers are represented (integer grids, codebooks, GGUF blocks)."""
from lowbit.schemes.base import Scheme, known_schemes, register_scheme, scheme_from_config
from lowbit.schemes.intgrid import IntGrid
from lowbit.schemes import codebook, int8row  # noqa: F401  (registers bnb4 / int8-row; issue 5)
from lowbit.schemes import ggml  # noqa: F401  (registers the GGUF block types; issue 3)

__all__ = ["Scheme", "IntGrid", "register_scheme", "scheme_from_config", "known_schemes"]
