"""Slow, obvious scalar versions of the non-obvious GGUF searches, one block at a time, for tests.

These read like ggml-quants.c's loops (every value a float32 scalar, sums accumulated in order) so the
vectorised searches in ggml_blocks can be checked against something a reader can verify line by line.
They are far too slow for real weights: use lowbit.schemes.ggml.quantize_rows.
"""
from __future__ import annotations

import numpy as np

f32 = np.float32


def nearest_int(v: float) -> int:
    """Round half to even in float32 (ggml's nearest_int)."""
    return int(np.rint(f32(v)))


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.float32, np.float32, list[int]]:
    """One sub-block's (scale, the_min, codes) by the reference affine search; value = scale*code - the_min."""
    lo, hi = f32(x[0]), f32(x[0])
    sum_w = f32(weights[0])
    sum_x = f32(sum_w * x[0])
    for i in range(1, len(x)):
        lo, hi = min(lo, f32(x[i])), max(hi, f32(x[i]))
        sum_w = f32(sum_w + weights[i])
        sum_x = f32(sum_x + f32(weights[i] * x[i]))
    lo = min(lo, f32(0))
    if hi == lo:
        return f32(0), f32(-lo), [0] * len(x)

    def error(scale, offset, codes):
        total = f32(0)
        for xi, wi, q in zip(x, weights, codes):
            diff = f32(f32(f32(scale * f32(q)) + offset) - xi)
            total = f32(total + f32(wi * (abs(diff) if use_mad else f32(diff * diff))))
        return total

    iscale = f32(f32(nmax) / f32(hi - lo))
    scale = f32(f32(1) / iscale)
    codes = [max(0, min(nmax, nearest_int(f32(iscale * f32(xi - lo))))) for xi in x]
    best = error(scale, lo, codes)
    for step in range(nstep + 1):
        # the origin of each trial is the best min so far, as in the reference
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * f32(step))) + f32(nmax)) / f32(hi - lo))
        cand = [max(0, min(nmax, nearest_int(f32(iscale * f32(xi - lo))))) for xi in x]
        sum_l = sum_l2 = sum_xl = f32(0)
        for xi, wi, q in zip(x, weights, cand):
            wl = f32(wi * f32(q))
            sum_l, sum_l2, sum_xl = f32(sum_l + wl), f32(sum_l2 + f32(wl * f32(q))), f32(sum_xl + f32(wl * xi))
        det = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if det > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / det)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sum_xl / sum_l2)
            err = error(this_scale, this_min, cand)
            if err < best:
                codes, best, scale, lo = cand, err, this_scale, this_min
    return scale, f32(-lo), codes


def quantize_block_q4_k(x: np.ndarray) -> tuple[np.float16, np.float16, list[int], list[int], list[int]]:
    """One 256-value Q4_K block: (d, dmin, 6-bit scales[8], 6-bit mins[8], codes[256]) as the reference."""
    scales, mins, codes = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32].astype(f32)
        sum_x2 = f32(0)
        for v in sub:
            sum_x2 = f32(sum_x2 + f32(v * v))
        av_x = np.sqrt(f32(sum_x2 / f32(32)))
        weights = [f32(av_x + abs(v)) for v in sub]
        s, m, q = make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20, False)
        scales.append(s)
        mins.append(m)
        codes += q
    max_scale, max_min = max([f32(0)] + scales), max([f32(0)] + mins)
    inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
    inv_min = f32(63) / max_min if max_min > 0 else f32(0)
    ls = [min(63, nearest_int(f32(inv_scale * s)) & 0xFF) for s in scales]
    lm = [min(63, nearest_int(f32(inv_min * m)) & 0xFF) for m in mins]
    d, dmin = np.float16(max_scale / f32(63)), np.float16(max_min / f32(63))
    for j in range(8):
        step = f32(f32(d) * f32(ls[j]))
        if step == 0:
            continue
        offset = f32(f32(dmin) * f32(lm[j]))
        for i in range(32 * j, 32 * j + 32):
            codes[i] = max(0, min(15, nearest_int(f32(f32(x[i] + offset) / step))))
    return d, dmin, ls, lm, codes
