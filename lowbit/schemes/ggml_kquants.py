"""GGUF K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): 256-value super-blocks with quantized sub-block scales.

Each codec reproduces llama.cpp's quantize_row_qX_K_ref byte for byte (and quantize_row_qX_K_impl when an
importance vector is given), in float32 with the C order of operations; see ggml_blocks for the searches.
Every codec runs in three steps: search a scale (and min) per sub-block, quantize those sub-scales to 4 or 6
bits against one fp16 super-scale, then re-round each value against the sub-scale it will be decoded with.
"""
from __future__ import annotations

import numpy as np

from lowbit.schemes.ggml_blocks import (
    F32, GROUP_MAX_EPS, BlockCodec, as_u8_wrapped, by_group, fp16_bytes, fp16_values, from_groups,
    make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants, nearest_int, pack_fields, round_fp16,
    sequential_sum, signed_absmax, unpack_fields,
)

QK_K = 256


def _sum_sq_per_block(x: np.ndarray) -> np.ndarray:
    """sum(x^2) over each 256-value block, accumulated in order: [nb]."""
    cols = by_group(x, QK_K)
    return sequential_sum(cols * cols)


def _imatrix_weights(x: np.ndarray, qweights: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's importance weighting: imatrix * sqrt(sigma^2 + x^2)."""
    return qweights * np.sqrt(sigma2[:, None] + x * x)


def _requantize(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None,
                lo: int, hi: int, code_shift: int) -> np.ndarray:
    """Re-round each value against its decoded sub-scale (x [nb, S, g], scale/offset [nb, S]).

    Sub-blocks whose decoded scale is zero keep the codes the search chose, as the reference does.
    """
    s = scale[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (x + offset[..., None]) / s if offset is not None else x / s
        new = np.clip(nearest_int(v), lo, hi) + F32(code_shift)
    return np.where(s != 0, new, codes)


# -- 6-bit sub-scale packing of Q4_K / Q5_K (8 scales + 8 mins in 12 bytes) -----------------------------
def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """[nb, 8] scales and mins (6 bit) -> [nb, 12] bytes in get_scale_min_k4's layout."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[nb, 12] -> (scales [nb, 8], mins [nb, 8]) as uint8."""
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


# -- 6-bit sub-scale packing of Q3_K (16 scales in 12 bytes) ------------------------------------------
def pack_scales_q3(ls: np.ndarray) -> np.ndarray:
    """[nb, 16] 6-bit values -> [nb, 12]: low nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11."""
    ls = ls.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    out[:, 8:] = pack_fields(ls >> 4, 2, 1, 4)
    return out


def unpack_scales_q3(b: np.ndarray) -> np.ndarray:
    """[nb, 12] -> [nb, 16] unsigned 6-bit values (subtract 32 for the signed scale)."""
    low = unpack_fields(b[:, :8], 4, 1, 2)
    high = unpack_fields(b[:, 8:], 2, 1, 4)
    return low | (high << 4)


class _KQuant(BlockCodec):
    block = QK_K


class Q4K(_KQuant):
    """4.5 bits: 8 sub-blocks of 32, 6-bit scale and min each, codes 0..15; value = d*sc*q - dmin*m."""

    name, type_id, type_size, group, maxq, has_min, bits_per_code = "Q4_K", 12, 144, 32, 15, True, 4
    ref_search = (-1.0, 0.1, 20)  # rmin, rdelta, nstep of quantize_row_q4_K_ref

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        nb, n_sub = x.shape[0], QK_K // 32
        if qweights is None:
            cols = by_group(x, 32)
            av_x = np.sqrt(sequential_sum(cols * cols) / F32(32))
            weights = av_x + np.abs(cols)
            scales, mins, codes = make_qkx_quants(cols, weights, cls.maxq, *cls.ref_search, use_mad=False)
            scales, mins = scales.reshape(nb, n_sub), mins.reshape(nb, n_sub)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(divide="ignore"):
                inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
                inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
            ls = np.minimum(as_u8_wrapped(nearest_int(inv_scale[:, None] * scales)), 63)
            lm = np.minimum(as_u8_wrapped(nearest_int(inv_min[:, None] * mins)), 63)
            d, dmin = max_scale / F32(63), max_min / F32(63)
        else:
            sigma2 = F32(2) * _sum_sq_per_block(x) / F32(QK_K)
            cols = by_group(x, 32)
            weights = by_group(_imatrix_weights(x, qweights, sigma2), 32)
            sum_w = sequential_sum(weights).reshape(nb, n_sub)
            scales, mins, codes = make_qkx_quants(cols, weights, cls.maxq, -0.9, 0.05, 36, use_mad=False,
                                                  guarded=True)
            d, ls = make_qp_quants(scales.reshape(nb, n_sub).T.copy(), 63, sum_w.T.copy())
            dmin, lm = make_qp_quants(mins.reshape(nb, n_sub).T.copy(), 63, sum_w.T.copy())
            ls, lm = ls.T.astype(np.uint8), lm.T.astype(np.uint8)
        d16, dmin16 = round_fp16(d), round_fp16(dmin)
        codes = from_groups(codes, QK_K).reshape(nb, n_sub, 32)
        codes = _requantize(x.reshape(nb, n_sub, 32), codes, d16[:, None] * ls.astype(F32),
                            dmin16[:, None] * lm.astype(F32), 0, cls.maxq, 0)
        return cls._assemble(fp16_bytes(d), fp16_bytes(dmin), pack_scale_min_k4(ls, lm),
                             codes.reshape(nb, QK_K).astype(np.uint8))

    @classmethod
    def _assemble(cls, d, dmin, scales, codes):
        return np.concatenate([d, dmin, scales, pack_fields(codes, 4, 4, 2)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 16:], 4, 4, 2)

    @classmethod
    def with_codes(cls, blocks, codes):
        out = blocks.copy()
        out[:, 16:] = pack_fields(codes, 4, 4, 2)
        return out

    @classmethod
    def affine(cls, blocks):
        d, dmin = fp16_values(blocks[:, 0:2]), fp16_values(blocks[:, 2:4])
        sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
        return d[:, None] * sc.astype(F32), dmin[:, None] * mn.astype(F32)


class Q5K(Q4K):
    """5.5 bits: Q4_K's layout plus a fifth code bit per value (qh); codes 0..31."""

    name, type_id, type_size, maxq, bits_per_code = "Q5_K", 13, 176, 31, 5
    ref_search = (-0.5, 0.1, 15)

    @classmethod
    def _assemble(cls, d, dmin, scales, codes):
        return np.concatenate([d, dmin, scales, pack_fields(codes >> 4, 1, 1, 8),
                               pack_fields(codes & 0xF, 4, 4, 2)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 48:], 4, 4, 2) | (unpack_fields(blocks[:, 16:48], 1, 1, 8) << 4)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(blocks[:, 0:2], blocks[:, 2:4], blocks[:, 4:16], codes.astype(np.uint8))


class Q2K(_KQuant):
    """2.625 bits: 16 sub-blocks of 16, 4-bit scale and min each, codes 0..3; value = d*sc*q - dmin*m."""

    name, type_id, type_size, group, maxq, has_min, bits_per_code = "Q2_K", 10, 84, 16, 3, True, 2

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        nb, n_sub = x.shape[0], QK_K // 16
        cols = by_group(x, 16)
        if qweights is None:
            scales, mins, codes = make_qkx_quants(cols, np.abs(cols), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = scales.reshape(nb, n_sub), mins.reshape(nb, n_sub)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(max_scale[:, None] > 0,
                              nearest_int((F32(15) / max_scale)[:, None] * scales), F32(0))
                lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), F32(0))
            ls, lm = as_u8_wrapped(ls) & 0xF, as_u8_wrapped(lm) & 0xF
            d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
            dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
        else:
            sigma2 = _sum_sq_per_block(x) / F32(QK_K)
            weights = by_group(_imatrix_weights(x, qweights, sigma2), 16)
            sum_w = sequential_sum(weights).reshape(nb, n_sub)
            scales, mins, codes = make_qkx_quants(cols, weights, 3, -0.9, 0.05, 36, use_mad=False, guarded=True)
            d, ls = make_qp_quants(scales.reshape(nb, n_sub).T.copy(), 15, sum_w.T.copy())
            dmin, lm = make_qp_quants(mins.reshape(nb, n_sub).T.copy(), 15, sum_w.T.copy())
            ls, lm = ls.T.astype(np.uint8), lm.T.astype(np.uint8)
        d16, dmin16 = round_fp16(d), round_fp16(dmin)
        codes = from_groups(codes, QK_K).reshape(nb, n_sub, 16)
        codes = _requantize(x.reshape(nb, n_sub, 16), codes, d16[:, None] * ls.astype(F32),
                            dmin16[:, None] * lm.astype(F32), 0, 3, 0)
        return np.concatenate([ls | (lm << 4), pack_fields(codes.reshape(nb, QK_K).astype(np.uint8), 2, 2, 4),
                               fp16_bytes(d), fp16_bytes(dmin)], axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 16:80], 2, 2, 4)

    @classmethod
    def with_codes(cls, blocks, codes):
        out = blocks.copy()
        out[:, 16:80] = pack_fields(codes, 2, 2, 4)
        return out

    @classmethod
    def affine(cls, blocks):
        d, dmin = fp16_values(blocks[:, 80:82]), fp16_values(blocks[:, 82:84])
        sc = blocks[:, :16]
        return d[:, None] * (sc & 0xF).astype(F32), dmin[:, None] * (sc >> 4).astype(F32)


class Q3K(_KQuant):
    """3.4375 bits: 16 sub-blocks of 16, signed 6-bit scales, codes 0..7 around 4; value = d*sc*(q-4)."""

    name, type_id, type_size, group, maxq, has_min, bits_per_code = "Q3_K", 11, 110, 16, 7, False, 3
    zero = 4

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        nb, n_sub = x.shape[0], QK_K // 16
        cols = by_group(x, 16)
        if qweights is None:
            scales, codes = make_q3_quants(cols, 4)
            scales = scales.reshape(nb, n_sub)
            max_scale = signed_absmax(scales.T)
            with np.errstate(divide="ignore", invalid="ignore"):
                iscale = F32(-32) / max_scale
                levels = nearest_int(iscale[:, None] * scales)
            levels = as_u8_wrapped(levels).view(np.int8).astype(F32)  # int8_t in the reference
            ls = np.where(max_scale[:, None] != 0, np.clip(levels, -32, 31) + 32, F32(0)).astype(np.uint8)
            with np.errstate(divide="ignore"):
                d = np.where(max_scale != 0, F32(1) / iscale, F32(0))
        else:
            sigma2 = F32(2) * _sum_sq_per_block(x) / F32(QK_K)
            weights = by_group(_imatrix_weights(x, qweights, sigma2), 16)
            sum_w = sequential_sum(weights).reshape(nb, n_sub)
            scales, codes = make_qx_quants(cols, 4, weights)
            d, ls = make_qx_quants(scales.reshape(nb, n_sub).T.copy(), 32, sum_w.T.copy())
            ls = ls.T.astype(np.uint8)
        d16 = round_fp16(d)
        codes = from_groups(codes, QK_K).reshape(nb, n_sub, 16)
        codes = _requantize(x.reshape(nb, n_sub, 16), codes, d16[:, None] * (ls.astype(F32) - F32(32)),
                            None, -4, 3, 4)
        return cls._assemble(codes.reshape(nb, QK_K).astype(np.uint8), pack_scales_q3(ls), fp16_bytes(d))

    @classmethod
    def _assemble(cls, codes, scales, d):
        return np.concatenate([pack_fields(codes >> 2, 1, 1, 8), pack_fields(codes & 3, 2, 2, 4), scales, d],
                              axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, 32:96], 2, 2, 4) | (unpack_fields(blocks[:, :32], 1, 1, 8) << 2)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(codes.astype(np.uint8), blocks[:, 96:108], blocks[:, 108:110])

    @classmethod
    def affine(cls, blocks):
        d = fp16_values(blocks[:, 108:110])
        sc = unpack_scales_q3(blocks[:, 96:108]).astype(np.int8) - np.int8(32)
        return d[:, None] * sc.astype(F32), np.full(sc.shape, F32(cls.zero))


class Q6K(_KQuant):
    """6.5625 bits: 16 sub-blocks of 16, int8 scales, codes 0..63 around 32; value = d*sc*(q-32)."""

    name, type_id, type_size, group, maxq, has_min, bits_per_code = "Q6_K", 14, 210, 16, 63, False, 6
    zero = 32

    @classmethod
    def quantize_blocks(cls, x, qweights, row_sigma2):
        nb, n_sub = x.shape[0], QK_K // 16
        cols = by_group(x, 16)
        weights = None if qweights is None else by_group(qweights, 16)  # Q6_K uses the imatrix as is
        scales, codes = make_qx_quants(cols, 32, weights)
        scales = scales.reshape(nb, n_sub)
        max_scale = signed_absmax(scales.T)
        empty = np.abs(max_scale) < GROUP_MAX_EPS
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-128) / max_scale
            ls = np.minimum(F32(127), nearest_int(iscale[:, None] * scales))
            d = F32(1) / iscale
        ls = np.where(empty[:, None], F32(0), ls)
        d = np.where(empty, F32(0), d)
        d16 = round_fp16(d)
        codes = from_groups(codes, QK_K).reshape(nb, n_sub, 16)
        codes = _requantize(x.reshape(nb, n_sub, 16), codes, d16[:, None] * ls, None, -32, 31, 32)
        codes = np.where(empty[:, None, None], F32(0), codes).reshape(nb, QK_K).astype(np.uint8)
        return cls._assemble(codes, ls.astype(np.int8).view(np.uint8), fp16_bytes(d))

    @classmethod
    def _assemble(cls, codes, scales, d):
        return np.concatenate([pack_fields(codes & 0xF, 4, 2, 2), pack_fields(codes >> 4, 2, 2, 4), scales, d],
                              axis=1)

    @classmethod
    def codes(cls, blocks):
        return unpack_fields(blocks[:, :128], 4, 2, 2) | (unpack_fields(blocks[:, 128:192], 2, 2, 4) << 4)

    @classmethod
    def with_codes(cls, blocks, codes):
        return cls._assemble(codes.astype(np.uint8), blocks[:, 192:208], blocks[:, 208:210])

    @classmethod
    def affine(cls, blocks):
        d = fp16_values(blocks[:, 208:210])
        sc = blocks[:, 192:208].view(np.int8).astype(F32)
        return d[:, None] * sc, np.full(sc.shape, F32(cls.zero))


K_QUANT_CODECS = (Q2K, Q3K, Q4K, Q5K, Q6K)
