"""Schemes: how numbers are represented (integer grids, codebooks, GGUF blocks)."""
from lowbit.schemes.base import Scheme, known_schemes, register_scheme, scheme_from_config
from lowbit.schemes.intgrid import IntGrid

__all__ = ["Scheme", "IntGrid", "register_scheme", "scheme_from_config", "known_schemes"]
