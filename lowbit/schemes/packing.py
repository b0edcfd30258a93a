"""Bit packing of small unsigned codes into bytes, little-endian bit order, for any width 1..8."""
from __future__ import annotations

import torch

from lowbit.errors import CorruptFile


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) of any shape -> flat uint8 bytes holding numel*bits bits (zero padded)."""
    flat = codes.reshape(-1).to(torch.int32)
    n_bits = flat.numel() * bits
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-n_bits) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 bytes -> uint8 codes of `shape`."""
    numel = 1
    for d in shape:
        numel *= d
    need = (numel * bits + 7) // 8
    if packed.numel() != need:
        raise CorruptFile(f"packed codes hold {packed.numel()} bytes, expected {need} for shape {tuple(shape)} "
                          f"at {bits} bits: the file is truncated or corrupt")
    stream = ((packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    values = (stream << torch.arange(bits, dtype=torch.int32)).sum(dim=1)
    return values.to(torch.uint8).reshape(shape)
