"""Round to nearest on an integer grid: absmax (or min/max) per group, optionally with an MSE clipping search."""
from __future__ import annotations

from lowbit.methods.base import Method, register_method
from lowbit.schemes.intgrid import IntGrid


@register_method
class RTN(Method):
    name = "rtn"

    def scheme(self) -> IntGrid:
        c = self.config
        return IntGrid(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric, clip_search=c.clip_search)
