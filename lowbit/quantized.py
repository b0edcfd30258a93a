"""The one in-memory representation of a quantized weight.

Every method produces a QuantizedWeight, every format reads and writes one, every kernel consumes one.
The scheme object interprets the numbers; this container only holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from lowbit.schemes.base import Scheme


@dataclass
class QuantizedWeight:
    """Codes and their statistics for a Linear weight of logical shape [out_features, in_features].

    codes:   unpacked small integers, uint8 [N, K] in the logical layout (packing belongs to formats/kernels).
    scales:  float32 [N, n_groups]; group j covers input columns with g_idx == j (default k // group_size).
    zeros:   float32 [N, n_groups] zero points (integer-valued for integer grids) or None for symmetric codebooks.
    g_idx:   int32 [K] group of each input column when columns were reordered (GPTQ act-order), else None.
    extra:   scheme-specific tensors (GGUF raw blocks and sub-scales, nested absmax of double quantization, ...).

    codes, scales and zeros may instead be derived on each access from what the scheme keeps in `extra` (a scheme
    with `derives_codes`, e.g. GGUF blocks kept as the file stores them): a loaded model then holds its weights
    once, in the bytes the kernels read, and a method that needs the unpacked codes unpacks one layer at a time.
    Likewise scales and zeros may be held narrower where exact (`keep_statistics_compact`) and widened to float32
    on each access.
    """

    scheme: "Scheme"
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = -1
    g_idx: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the codes live (code written for GPTQ layers, such as peft's, reads `qweight.device`)."""
        stored = self.__dict__.get("_codes")
        if stored is None:
            stored = packed_codes(self)
        if stored is None:
            stored = next((v for v in self.extra.values() if isinstance(v, torch.Tensor)), None)
        return stored.device if stored is not None else torch.device("cpu")

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size in (-1, 0, None) else self.group_size

    def group_index(self) -> torch.Tensor:
        """int64 [K]: the group of each input column (g_idx if set, else k // group_size)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features) // self.effective_group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The floating-point weight [N, K] these codes represent (exact, as the scheme defines it)."""
        return self.scheme.dequantize(self).to(dtype)

    def storage_bits(self) -> int:
        """Bits this weight occupies when stored in lowbit's own format (codes packed + statistics)."""
        return self.scheme.storage_bits(self)

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.scheme.name, **self.scheme.to_config(), "group_size": self.group_size,
                "act_order": self.g_idx is not None}


def _derivable(name: str) -> property:
    """`name` as stored, or, when nothing is stored, unpacked from the kernels' packed codes (`keep_codes_packed`)
    or, when the scheme derives it, decoded from `extra` per access."""
    slot = "_" + name

    def get(self: QuantizedWeight):
        value = self.__dict__.get(slot)
        if value is None and name == "codes" and self.__dict__.get("_packed_codes") is not None:
            packed, unpack = self.__dict__["_packed_codes"]
            return unpack(packed)
        if value is None and self.__dict__.get(_COMPACT + name) is not None:
            return self.__dict__[_COMPACT + name].float()
        if value is None and getattr(self.scheme, "derives_codes", False) and self.extra:
            return self.scheme.derive(self, name)
        return value

    def set(self: QuantizedWeight, value) -> None:
        self.__dict__[slot] = value
        self.__dict__.pop(_COMPACT + name, None)        # new statistics: a compact copy of the old ones is stale
        if name == "codes":
            self.__dict__.pop("_packed_codes", None)    # new codes: a packed copy of the old ones is stale

    return property(get, set, doc=f"{name} (stored, or derived from the scheme's own bytes on each access)")


# where keep_statistics_compact holds a statistic ("_compact_scales", "_compact_zeros")
_COMPACT = "_compact_"


for _name in ("codes", "scales", "zeros"):
    setattr(QuantizedWeight, _name, _derivable(_name))


def keep_codes_packed(qw: QuantizedWeight, packed: torch.Tensor, unpack: Callable[[torch.Tensor], torch.Tensor]
                      ) -> None:
    """Hold `qw`'s codes only as `packed` (the bytes a kernel reads, e.g. two 4-bit codes per byte) and drop the
    one-byte codes: a loaded model then keeps its weights once, as small as its file. `unpack(packed)` gives the
    codes back, exactly, to whatever asks for `qw.codes` (a method re-quantizing, a writer), one layer at a time."""
    qw.__dict__["_codes"] = None
    qw.__dict__["_packed_codes"] = (packed, unpack)


def packed_codes(qw: QuantizedWeight) -> torch.Tensor | None:
    """The packed bytes `keep_codes_packed` left as the codes' only copy, or None."""
    held = qw.__dict__.get("_packed_codes")
    return None if held is None else held[0]


def keep_statistics_compact(qw: QuantizedWeight, shared: tuple[torch.Tensor, ...] = ()) -> None:
    """Hold `qw`'s float32 scales and zeros as uint8 (integer zero points 0..255) or float16 where those give back
    every float32 bit unchanged (4-bit grids' zero points always, fp16 scale grids' scales), dropping the float32
    tensors: `qw.scales` / `qw.zeros` widen them on access. A narrowed statistic equal to one of `shared` (the
    float16 scales the kernels' description holds) is held as that very tensor: a loaded 1B model's statistics
    then take 22 MB instead of 72 MB."""
    for name in ("scales", "zeros"):
        value = qw.__dict__.get("_" + name)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or not value.numel():
            continue
        compact = _exact_narrowing(value)
        if compact is None:
            continue
        same = [t for t in shared if t.dtype == compact.dtype and t.shape == compact.shape and t.is_contiguous()
                and torch.equal(t.view(torch.uint8), compact.view(torch.uint8))]    # bit for bit (signed zeros)
        qw.__dict__["_" + name] = None
        qw.__dict__[_COMPACT + name] = same[0] if same else compact


def _exact_narrowing(value: torch.Tensor) -> torch.Tensor | None:
    """`value` (float32) as uint8 or float16 when that holds every bit of it (signed zeros and NaNs included), else
    None."""
    bits = value.view(torch.int32)
    for dtype in (torch.uint8, torch.float16):
        if dtype == torch.uint8 and not bool(((value >= 0) & (value <= 255)).all()):
            continue                           # out of range: the cast would wrap, not fail
        narrow = value.to(dtype)
        if torch.equal(narrow.float().view(torch.int32), bits):
            return narrow
    return None
