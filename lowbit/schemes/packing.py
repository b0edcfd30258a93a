"""Bit packing of small unsigned codes into bytes, little-endian bit order, for any width 1..8."""
from __future__ import annotations

import torch

from lowbit.errors import CorruptFile


# Codes packed per call of _pack_chunk: a multiple of 8 so every chunk ends on a byte boundary, and small
# enough that the bit expansion (8 bytes per bit per code) stays a few tens of MB for any layer size.
_CHUNK = 1 << 20


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) of any shape -> flat uint8 bytes holding numel*bits bits (zero padded)."""
    flat = codes.reshape(-1)
    if bits in _WHOLE_BYTE_WIDTHS and flat.numel() % (8 // bits) == 0:
        return _pack_whole_bytes(flat.to(torch.uint8), bits)
    return torch.cat([_pack_chunk(flat[i:i + _CHUNK], bits) for i in range(0, max(flat.numel(), 1), _CHUNK)])


def _pack_chunk(flat: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat.to(torch.uint8).unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 bytes -> uint8 codes of `shape`."""
    numel = 1
    for d in shape:
        numel *= d
    need = (numel * bits + 7) // 8
    if packed.numel() != need:
        raise CorruptFile(f"packed codes hold {packed.numel()} bytes, expected {need} for shape {tuple(shape)} "
                          f"at {bits} bits: the file is truncated or corrupt")
    if bits in _WHOLE_BYTE_WIDTHS and numel % (8 // bits) == 0:
        return _unpack_whole_bytes(packed, bits).reshape(shape)
    out = torch.empty(numel, dtype=torch.uint8)
    byte_chunk = _CHUNK * bits // 8  # whole chunks of codes start on byte boundaries
    for start in range(0, numel, _CHUNK):
        part = packed[start * bits // 8: start * bits // 8 + byte_chunk]
        count = min(_CHUNK, numel - start)
        stream = ((part.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: count * bits]
        out[start:start + count] = (stream.reshape(count, bits).to(torch.int32)
                                    << torch.arange(bits, dtype=torch.int32)).sum(dim=1).to(torch.uint8)
    return out.reshape(shape)


# Widths whose codes never straddle a byte: packed and unpacked with shifts on whole bytes (the bit-stream path
# above gives the same bytes, 8 intermediate bytes per bit slower; a 1B model's codes took a minute to unpack).
_WHOLE_BYTE_WIDTHS = (1, 2, 4, 8)


def _pack_whole_bytes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    # a code's bits above `bits` are dropped, as the bit stream drops them, instead of spilling into its neighbour
    per, mask = 8 // bits, (1 << bits) - 1
    lanes = flat.reshape(-1, per)
    out = lanes[:, 0] & mask
    for j in range(1, per):
        out |= (lanes[:, j] & mask) << (bits * j)
    return out


def _unpack_whole_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    # the bytes as uint8, as the bit stream reads them: a file's int8 or int32 tensor gives uint8 codes, never
    # negative ones (int8 bytes shifted right keep their sign)
    per, mask, packed = 8 // bits, (1 << bits) - 1, packed.to(torch.uint8)
    return torch.stack([(packed >> (bits * j)) & mask for j in range(per)], dim=1).reshape(-1)
