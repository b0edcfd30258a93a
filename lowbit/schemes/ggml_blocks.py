"""Shared machinery of the GGUF block types: float32-exact block searches, bit packing, the codec base class.

Bit-exactness with llama.cpp's reference quantizers (ggml-quants.c) depends on doing every operation in
float32, in the same order. The searches here therefore work on a transposed layout [n, G]: the n values of
one sub-block run down axis 0 and the G sub-blocks across axis 1, so that every element-wise step is one
vectorised numpy operation over all sub-blocks, and every sum can be accumulated left to right like the C
loops do (`sequential_sum`; numpy's own sum is pairwise and would round differently).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's threshold below which a group counts as all zeros


# -- float32 primitives ---------------------------------------------------------------------------------
def nearest_int(v: np.ndarray) -> np.ndarray:
    """Round half to even, as ggml's nearest_int (the 1.5*2^23 magic-number trick) does; stays float32."""
    return np.rint(v)


def sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Sum [n, G] over axis 0 strictly left to right in float32 (the order of a C `sum += t` loop)."""
    acc = terms[0].copy()
    for row in terms[1:]:
        acc += row
    return acc


def round_fp16(v: np.ndarray) -> np.ndarray:
    """The float32 value a float stored as IEEE half (round to nearest even) reads back as."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def as_u8_wrapped(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to uint8 (modulo 256), for values that are already integral floats."""
    return (np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64) & 0xFF).astype(np.uint8)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per column of [n, G], the signed value of largest magnitude (first one on ties, like ggml's loops)."""
    idx = np.argmax(np.abs(x), axis=0)
    return x[idx, np.arange(x.shape[1])]


def _quiet():
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


# -- block searches (ports of ggml-quants.c's make_*_quants; every one works on [n, G]) ------------------
def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (rmse_type 1): try 19 scales around nmax/max, keep the best weighted fit.

    Returns (scale [G], codes [n, G] in 0..2*nmax-1, float32). Weights default to x^2.
    """
    n, groups = x.shape
    w = x * x if weights is None else weights
    wx = w * x
    vmax = signed_absmax(x)
    all_zero = np.abs(vmax) < GROUP_MAX_EPS

    def trial(iscale):
        levels = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        return levels, sequential_sum(wx * levels), sequential_sum(w * levels * levels)

    with _quiet():
        levels, sumlx, suml2 = trial(F32(-nmax) / vmax)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            cand, slx, sl2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            levels = np.where(better, cand, levels)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    codes = levels + F32(nmax)
    codes[:, all_zero] = 0
    scale = np.where(all_zero, F32(0), scale).astype(F32)
    return scale, codes


def make_qkx_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, guarded: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine (scale, min) search: from min/max, try nstep+1 scales, each with a least-squares scale and min.

    guarded=False is make_qkx2_quants (reference quantizers), True is make_qkx3_quants (imatrix path), which
    clamps the candidate codes before rounding. Returns (scale [G], the_min [G] >= 0, codes [n, G] float32);
    the block is decoded as scale * code - the_min.
    """
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = (hi <= lo) if guarded else (hi == lo)
    sum_w = sequential_sum(weights)
    sum_x = sequential_sum(weights * x)

    def error(scale, offset, codes):
        diff = scale * codes + offset - x
        diff = np.abs(diff) if use_mad else diff * diff
        return sequential_sum(weights * diff)

    with _quiet():
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        codes = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)
        best = error(scale, lo, codes)
        offset = lo
        for step in range(nstep + 1):
            # the reference keeps using the best min found so far as the origin of the next trial
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - offset)
            v = iscale * (x - offset)
            if guarded:
                cand = np.where(v > 0, nearest_int(np.minimum(v, F32(nmax))), F32(0))
            else:
                cand = np.clip(nearest_int(v), 0, nmax)
            wl = weights * cand
            sum_l = sequential_sum(wl)
            sum_l2 = sequential_sum(wl * cand)
            sum_xl = sequential_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            err = error(this_scale, this_min, cand)
            better = (det > 0) & (err < best)
            best = np.where(better, err, best)
            codes = np.where(better, cand, codes)
            scale = np.where(better, this_scale, scale)
            offset = np.where(better, this_min, offset)
    codes[:, flat] = 0
    scale = np.where(flat, F32(0), scale).astype(F32)
    offset = np.where(flat, lo, offset).astype(F32)
    return scale, -offset, codes


def _refine_levels(x, w, levels, sumlx, suml2, lo_level, hi_level, need_positive_sl2):
    """Coordinate descent of make_q3_quants / make_qp_quants: move one level at a time while the fit improves."""
    n = x.shape[0]
    for _ in range(5):
        changed_any = np.zeros(x.shape[1], dtype=bool)
        for i in range(n):
            wi, xi, li = w[i], x[i], levels[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if need_positive_sl2 else slx > 0
            new = np.clip(nearest_int(xi * sl2 / slx), lo_level, hi_level)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            accept = ok & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            if not need_positive_sl2:
                accept &= sl2_new > 0
            levels[i] = np.where(accept, new, li)
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
            changed_any |= accept
        if not changed_any.any():  # a group with no change in a pass stays unchanged: stopping is exact
            break
    return levels, sumlx, suml2


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K reference search: levels from nmax/max, then x^2-weighted coordinate descent. (scale, codes)."""
    w = x * x
    vmax = signed_absmax(x)
    all_zero = np.abs(vmax) < GROUP_MAX_EPS
    with _quiet():
        levels = np.clip(nearest_int((F32(-nmax) / vmax) * x), -nmax, nmax - 1)
        wx = w * x
        sumlx = sequential_sum(wx * levels)
        suml2 = sequential_sum(w * levels * levels)
        levels, sumlx, suml2 = _refine_levels(x, w, levels, sumlx, suml2, -nmax, nmax - 1, False)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    codes = levels + F32(nmax)
    codes[:, all_zero] = 0
    return np.where(all_zero, F32(0), scale).astype(F32), codes


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale search for non-negative values (the sub-scales of the imatrix K-quants). (scale, codes 0..nmax)."""
    vmax = np.maximum(x.max(axis=0), F32(0))
    all_zero = vmax < GROUP_MAX_EPS

    def mse(scale, levels):
        diff = x - scale * levels
        return sequential_sum(weights * diff * diff)

    with _quiet():
        iscale = F32(nmax) / vmax
        best = mse(F32(1) / iscale, nearest_int(iscale * x))
        for step in range(-4, 5):
            if step == 0:
                continue
            cand_iscale = (F32(0.1) * F32(step) + F32(nmax)) / vmax
            err = mse(F32(1) / cand_iscale, np.minimum(F32(nmax), nearest_int(cand_iscale * x)))
            better = err < best
            best = np.where(better, err, best)
            iscale = np.where(better, cand_iscale, iscale)
        levels = np.minimum(F32(nmax), nearest_int(iscale * x))
        sumlx = sequential_sum(weights * x * levels)
        suml2 = sequential_sum(weights * levels * levels)
        levels, sumlx, suml2 = _refine_levels(x, weights, levels, sumlx, suml2, -np.inf, nmax, True)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    levels[:, all_zero] = 0
    return np.where(all_zero, F32(0), scale).astype(F32), levels


# -- bit packing --------------------------------------------------------------------------------------
def pack_fields(values: np.ndarray, bits: int, chunks: int, fields: int) -> np.ndarray:
    """Pack [nb, chunks*fields*width] small ints into [nb, chunks*width] bytes.

    Within each chunk, value f*width + j lands in byte j at bit offset f*bits, the interleaving every
    GGUF block type uses (e.g. Q4_K: chunks of 64 values, two 4-bit fields of 32).
    """
    nb = values.shape[0]
    v = values.astype(np.uint8).reshape(nb, chunks, fields, -1)
    out = np.zeros((nb, chunks, v.shape[-1]), dtype=np.uint8)
    for f in range(fields):
        out |= (v[:, :, f, :] & ((1 << bits) - 1)) << np.uint8(f * bits)
    return out.reshape(nb, -1)


def unpack_fields(packed: np.ndarray, bits: int, chunks: int, fields: int) -> np.ndarray:
    """Inverse of pack_fields: [nb, chunks*width] bytes -> [nb, chunks*fields*width] values."""
    nb = packed.shape[0]
    shifts = (np.arange(fields, dtype=np.uint8) * bits).reshape(1, 1, fields, 1)
    v = (packed.reshape(nb, chunks, 1, -1) >> shifts) & np.uint8((1 << bits) - 1)
    return v.reshape(nb, -1)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """[nb] float32 -> [nb, 2] little-endian IEEE half bytes."""
    return np.asarray(v, dtype=F32).astype("<f2").reshape(-1, 1).view(np.uint8)


def fp16_values(b: np.ndarray) -> np.ndarray:
    """[nb, 2] little-endian half bytes -> [nb] float32."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(F32)


def by_group(blocks: np.ndarray, group: int) -> np.ndarray:
    """[nb, block] float32 -> [group, nb*block/group]: the sub-blocks as columns (the search layout)."""
    return np.ascontiguousarray(blocks.reshape(-1, group).T)


def from_groups(columns: np.ndarray, block: int) -> np.ndarray:
    """Inverse of by_group."""
    return np.ascontiguousarray(columns.T).reshape(-1, block)


# -- codec base ---------------------------------------------------------------------------------------
class BlockCodec:
    """One GGUF block type: quantize rows to block bytes, and read codes and affine statistics back.

    Every value of a block is `scale * (code - zero)` for symmetric types (zero is the fixed code offset)
    and `scale * code - zero` for types with a stored minimum (has_min), per sub-block of `group` columns;
    this is exactly the float32 arithmetic of gguf.quants.dequantize.
    """

    name: ClassVar[str]
    type_id: ClassVar[int]          # ggml_type enum value
    block: ClassVar[int]            # values per block
    type_size: ClassVar[int]        # bytes per block
    group: ClassVar[int]            # values sharing one (scale, zero)
    maxq: ClassVar[int]             # largest code
    has_min: ClassVar[bool]
    bits_per_code: ClassVar[int]

    # subclasses implement these three
    @classmethod
    def quantize_blocks(cls, x: np.ndarray, qweights: np.ndarray | None, row_sigma2: np.ndarray | None) -> np.ndarray:
        """[nb, block] float32 (+ importance weights [nb, block]) -> [nb, type_size] uint8."""
        raise NotImplementedError

    @classmethod
    def codes(cls, blocks: np.ndarray) -> np.ndarray:
        """[nb, type_size] -> codes [nb, block] uint8."""
        raise NotImplementedError

    @classmethod
    def with_codes(cls, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Copy of `blocks` whose code bits are replaced by `codes` (headers and sub-scales kept)."""
        raise NotImplementedError

    @classmethod
    def affine(cls, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group (scale, zero), each [nb, block // group] float32."""
        raise NotImplementedError

    # shared
    needs_row_sigma2: ClassVar[bool] = False  # legacy imatrix variants use sum(x^2) over the whole row

    @classmethod
    def decode(cls, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        """Values of codes under (broadcastable) statistics, in the format's own float32 arithmetic."""
        c = codes.astype(F32)
        return scales * c - zeros if cls.has_min else scales * (c - zeros)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """[nb, type_size] -> [nb, block] float32."""
        nb = blocks.shape[0]
        scales, zeros = cls.affine(blocks)
        codes = cls.codes(blocks).reshape(nb, -1, cls.group)
        return cls.decode(codes, scales[..., None], zeros[..., None]).reshape(nb, cls.block)
