/* GGUF block types read as the file stores them: y = x W^T straight from the ggml blocks, no repacking.
 *
 * Why: a GGUF weight repacked into one code per byte plus float statistics costs 1 byte per weight to read
 * (Q5_0, Q6_K, Q8_0) where the file needs 0.56-1.06, and keeps a second copy of every weight resident. Decoding
 * is bound by the bytes it reads, so these kernels read the blocks themselves.
 *
 * Two arithmetics, chosen per call (`act8`):
 *   float   float32 activations against the block's codes: per 16 columns (d * scale) * dot(q - offset, x) less
 *           (dmin * min) * sum(x) (AVX2), or the block dequantized into a float buffer (the values gguf-py's
 *           dequantize gives, bit for bit) and dotted (portable): the result differs from a float32 matmul of
 *           the dequantized weight only by float rounding.
 *   act8    llama.cpp's arithmetic: the activation row is rounded once per matmul to int8 per block (per 32
 *           columns for the 32-value types, Q8_0-style; per 256 for the K-quants, Q8_K-style, with the sums of
 *           every 16 int8 values), and each block's dot product is done in integers (AVX2 vpmaddubsw/vpmaddwd),
 *           scaled once per block. The only error beyond float rounding is the activations' rounding: at most
 *           half an activation scale per value.
 *
 * Every type also has a portable form: `lb_ggml_unpack` turns any block into unsigned integer codes with
 * integer sub-scales and sub-minimums per 16 columns,
 *     w[k] = (d * scale[k/16]) * (q[k] - offset) - (dmin * min[k/16]),
 * which is exactly ggml's float32 dequantization for every type (legacy minimums ride on dmin = -m, min = 1),
 * and the scalar kernels, the float path and prompt dequantization are all written on it. The AVX2 act8 kernels
 * unpack the hot types (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) with vector code.
 */
#ifndef LOWBIT_GGML_BLOCKS_H
#define LOWBIT_GGML_BLOCKS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* lb_linear.kind of a GGUF block type: LB_GGML + the ggml_type enum value. */
#define LB_GGML 16
enum {
    LB_Q4_0 = LB_GGML + 2, LB_Q4_1 = LB_GGML + 3, LB_Q5_0 = LB_GGML + 6, LB_Q5_1 = LB_GGML + 7,
    LB_Q8_0 = LB_GGML + 8, LB_Q2_K = LB_GGML + 10, LB_Q3_K = LB_GGML + 11, LB_Q4_K = LB_GGML + 12,
    LB_Q5_K = LB_GGML + 13, LB_Q6_K = LB_GGML + 14,
};

static inline int lb_is_ggml(int64_t kind) {
    switch (kind) {
    case LB_Q4_0: case LB_Q4_1: case LB_Q5_0: case LB_Q5_1: case LB_Q8_0:
    case LB_Q2_K: case LB_Q3_K: case LB_Q4_K: case LB_Q5_K: case LB_Q6_K: return 1;
    default: return 0;
    }
}

/* Values per block (32 or 256) and bytes per block. */
static inline int64_t lb_ggml_block(int64_t kind) { return kind >= LB_Q2_K ? 256 : 32; }
static inline int64_t lb_ggml_bytes(int64_t kind) {
    switch (kind) {
    case LB_Q4_0: return 18;
    case LB_Q4_1: return 20;
    case LB_Q5_0: return 22;
    case LB_Q5_1: return 24;
    case LB_Q8_0: return 34;
    case LB_Q2_K: return 84;
    case LB_Q3_K: return 110;
    case LB_Q4_K: return 144;
    case LB_Q5_K: return 176;
    case LB_Q6_K: return 210;
    default: return 0;
    }
}

/* Bytes of one weight row of a GGUF block weight (k / block size blocks). */
static inline int64_t lb_ggml_row_bytes(const lb_linear *L) {
    return (L->k / lb_ggml_block(L->kind)) * lb_ggml_bytes(L->kind);
}

static inline float lb_ggml_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return lb_half(h);
}

/* Bytes ahead of the block being read that the row kernels ask the cache for, into L2 (prefetcht1), one request
 * per block per 64-byte line: rows are contiguous, so this streams past a row's end into the next row a thread
 * computes. Decoding reads each weight once, so without it the arithmetic waits for memory: measured on one
 * thread (bench harness over 464 MB of Q4_K [8960, 1536] matrices, GB of weights per CPU second), no prefetch
 * 4.9, whole rows 2 KB ahead at the row's start with prefetchnta (the previous scheme) 7.0, the same into L2
 * 9.5, per block 2 KB ahead into L2 9.8 (and 9.6 against 7.0 for [1536, 8960], whose 5 KB rows the per-row
 * scheme fetched in one burst); a plain read of the same bytes 13.4. 1 KB ahead was slower (8.6).
 * AMD Zen (an EPYC Zen 4, 32 MB L3) is the opposite: its hardware prefetchers follow the rows' streams, and the
 * requests only take issue slots and cache room from them. 151 MB of Q4_K [131072, 2048] rows, one activation
 * row, alternated runs: 1 thread 9.9-11.0 GB/s with 2 KB ahead, 12.0-13.5 with none, 12.3-13.3 4 KB ahead;
 * 2 threads 19.8-20.7 against 23.7-29.8 with none (Q6_K and Q8_0: the same or better with none, Q4_1 even). So a
 * build for a Zen CPU (-march=native or -march=znverN, which define __znverN__) issues none, for every GGUF kernel;
 * elsewhere 2 KB. An experiment may set it: LOWBIT_CFLAGS=-DLB_GGML_PREFETCH_BYTES=4096. */
#ifndef LB_GGML_PREFETCH_BYTES
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define LB_GGML_PREFETCH_BYTES 0
#else
#define LB_GGML_PREFETCH_BYTES 2048
#endif
#endif
static inline void lb_ggml_prefetch(const uint8_t *block, int64_t bytes) {
#if LB_GGML_PREFETCH_BYTES > 0
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(block + LB_GGML_PREFETCH_BYTES + line, 0, 2);
#else
    (void)block; (void)bytes;
#endif
}

/* One block as integers (see the top of the file); only the first `block` codes and block/16 sub-scales are used. */
typedef struct {
    uint8_t q[256];
    int16_t scale[16], min[16];
    float d, dmin;
    int32_t offset;
} lb_unpacked;

/* Q4_K / Q5_K: the 6-bit scale and minimum of sub-block j (of 8) from the 12 packed bytes. */
static inline void lb_k4_scale_min(int j, const uint8_t *s, int *scale, int *min) {
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q3_K's 16 signed 6-bit scales (stored + 32) from their 12 packed bytes: low 4 bits in bytes 0-7 (two per
 * byte), high 2 bits in bytes 8-11 (four per byte). */
static inline void lb_q3k_scales(const uint8_t *s, int16_t *out) {
    for (int j = 0; j < 16; j++) {
        const int low = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
        const int high = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        out[j] = (int16_t)((low | (high << 4)) - 32);
    }
}

/* The sub-scales and header of a block (everything but the codes). */
static inline void lb_ggml_header(int64_t kind, const uint8_t *b, lb_unpacked *u) {
    u->offset = 0;
    u->dmin = 0.0f;
    for (int j = 0; j < 16; j++) u->scale[j] = 1, u->min[j] = 0;
    switch (kind) {
    case LB_Q4_0: case LB_Q5_0: case LB_Q8_0:
        u->d = lb_ggml_half(b);
        u->offset = kind == LB_Q4_0 ? 8 : kind == LB_Q5_0 ? 16 : 128;
        break;
    case LB_Q4_1: case LB_Q5_1:
        u->d = lb_ggml_half(b);
        u->dmin = -lb_ggml_half(b + 2);      /* w = d q + m = d q - (-m) */
        u->min[0] = u->min[1] = 1;
        break;
    case LB_Q2_K:
        u->d = lb_ggml_half(b + 80);
        u->dmin = lb_ggml_half(b + 82);
        for (int j = 0; j < 16; j++) u->scale[j] = b[j] & 0xF, u->min[j] = b[j] >> 4;
        break;
    case LB_Q3_K:
        u->d = lb_ggml_half(b + 108);
        u->offset = 4;
        lb_q3k_scales(b + 96, u->scale);
        break;
    case LB_Q4_K: case LB_Q5_K:
        u->d = lb_ggml_half(b);
        u->dmin = lb_ggml_half(b + 2);
        for (int j = 0; j < 8; j++) {
            int scale, min;
            lb_k4_scale_min(j, b + 4, &scale, &min);
            u->scale[2 * j] = u->scale[2 * j + 1] = (int16_t)scale;
            u->min[2 * j] = u->min[2 * j + 1] = (int16_t)min;
        }
        break;
    case LB_Q6_K:
        u->d = lb_ggml_half(b + 208);
        u->offset = 32;
        for (int j = 0; j < 16; j++) u->scale[j] = (int8_t)b[192 + j];
        break;
    }
}

/* A whole block as integers, portable code. */
static inline void lb_ggml_unpack(int64_t kind, const uint8_t *b, lb_unpacked *u) {
    lb_ggml_header(kind, b, u);
    uint8_t *q = u->q;
    switch (kind) {
    case LB_Q4_0: case LB_Q4_1: {
        const uint8_t *qs = b + (kind == LB_Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; j++) q[j] = qs[j] & 0xF, q[j + 16] = qs[j] >> 4;
        break;
    }
    case LB_Q5_0: case LB_Q5_1: {
        const uint8_t *qh = b + (kind == LB_Q5_0 ? 2 : 4), *qs = qh + 4;
        uint32_t high;
        memcpy(&high, qh, 4);
        for (int j = 0; j < 16; j++) {
            q[j] = (uint8_t)((qs[j] & 0xF) | (((high >> j) & 1) << 4));
            q[j + 16] = (uint8_t)((qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4));
        }
        break;
    }
    case LB_Q8_0:
        for (int j = 0; j < 32; j++) q[j] = (uint8_t)(b[2 + j] ^ 0x80);   /* int8 + 128 */
        break;
    case LB_Q2_K:
        for (int half = 0; half < 2; half++)
            for (int shift = 0; shift < 4; shift++)
                for (int l = 0; l < 32; l++) q[half * 128 + shift * 32 + l] = (b[16 + half * 32 + l] >> (2 * shift)) & 3;
        break;
    case LB_Q3_K:
        for (int half = 0; half < 2; half++)
            for (int shift = 0; shift < 4; shift++)
                for (int l = 0; l < 32; l++) {
                    const int bit = half * 4 + shift;
                    q[half * 128 + shift * 32 + l] = (uint8_t)(((b[32 + half * 32 + l] >> (2 * shift)) & 3)
                                                               | (((b[l] >> bit) & 1) << 2));
                }
        break;
    case LB_Q4_K: case LB_Q5_K: {
        const uint8_t *qh = b + 16, *qs = b + (kind == LB_Q4_K ? 16 : 48);
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                uint8_t lo = qs[j * 32 + l] & 0xF, hi = qs[j * 32 + l] >> 4;
                if (kind == LB_Q5_K) {
                    lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                    hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                }
                q[j * 64 + l] = lo;
                q[j * 64 + 32 + l] = hi;
            }
        break;
    }
    case LB_Q6_K:
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = b + half * 64, *qh = b + 128 + half * 32;
            uint8_t *o = q + half * 128;
            for (int l = 0; l < 32; l++) {
                o[l] = (uint8_t)((ql[l] & 0xF) | ((qh[l] & 3) << 4));
                o[l + 32] = (uint8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                o[l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                o[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
            }
        }
        break;
    }
}

/* `count` consecutive blocks as float32 into out (ggml's dequantization, bit for bit). */
/* fp-contract off: a fused multiply-add would round differently from ggml's separate multiply and subtract */
__attribute__((optimize("fp-contract=off"))) static void lb_ggml_dequantize(int64_t kind, const uint8_t *blocks, int64_t count, float *out) {
    const int64_t block = lb_ggml_block(kind), bytes = lb_ggml_bytes(kind);
    lb_unpacked u;
    for (int64_t i = 0; i < count; i++) {
        lb_ggml_unpack(kind, blocks + i * bytes, &u);
        for (int64_t s = 0; s < block / 16; s++) {
            const float scale = u.d * (float)u.scale[s], min = u.dmin * (float)u.min[s];
            float *o = out + i * block + s * 16;
            #pragma omp simd
            for (int l = 0; l < 16; l++) o[l] = scale * (float)((int32_t)u.q[s * 16 + l] - u.offset) - min;
        }
    }
}

/* -- int8 activations --------------------------------------------------------------------------------------
 * One row of K activations as the act8 kernels read it: x8 [K] int8 (|v| <= 127), dx [K / qblock] scales,
 * bsum [K / 16] sums of every 16 int8 values, and for 32-value blocks sx [K / 32] = dx * (sum of the block). */
typedef struct {
    const int8_t *x8;
    const float *dx, *sx;
    const int16_t *bsum;
} lb_act8_row;

/* Floats of scratch one row of K activations takes in the act8 layout. */
static inline int64_t lb_ggml_act8_floats(int64_t K) { return K / 4 + K / 32 + K / 32 + K / 32 + 4; }

static inline lb_act8_row lb_ggml_act8_at(float *scratch, int64_t K) {
    lb_act8_row row;
    row.dx = scratch;
    row.sx = scratch + K / 32;
    row.bsum = (const int16_t *)(scratch + 2 * (K / 32));
    row.x8 = (const int8_t *)(scratch + 3 * (K / 32));
    return row;
}

/* Round x [K] to int8 per `qblock` columns (scale absmax / 127) into the layout at `scratch`. */
static inline void lb_ggml_quantize_act8(const float *x, int64_t K, int64_t qblock, float *scratch) {
    float *dx = scratch, *sx = scratch + K / 32;
    int16_t *bsum = (int16_t *)(scratch + 2 * (K / 32));
    int8_t *x8 = (int8_t *)(scratch + 3 * (K / 32));
    for (int64_t b = 0; b < K / qblock; b++) {
        const float *xb = x + b * qblock;
        float top = 0.0f;
        #pragma omp simd reduction(max : top)
        for (int64_t k = 0; k < qblock; k++) {      /* not fmaxf: without -ffast-math that is a libm call per value */
            const float size = fabsf(xb[k]);
            top = size > top ? size : top;
        }
        const float d = top / 127.0f, inv = top > 0.0f ? 127.0f / top : 0.0f;
        dx[b] = d;
        for (int64_t k = 0; k < qblock; k++) {
            float v = rintf(xb[k] * inv);
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            x8[b * qblock + k] = (int8_t)v;
        }
    }
    for (int64_t s = 0; s < K / 16; s++) {
        int32_t total = 0;
        for (int l = 0; l < 16; l++) total += x8[s * 16 + l];
        bsum[s] = (int16_t)total;
    }
    if (qblock == 32)
        for (int64_t b = 0; b < K / 32; b++) sx[b] = dx[b] * (float)(bsum[2 * b] + bsum[2 * b + 1]);
}

/* sum_k w[k] x[k] over a block from its integers and the activations' int8 form (portable). Block `index` of
 * the row: its activation scale is dx[index] (one scale per block, both for 32- and 256-value blocks). */
static inline float lb_ggml_dot_unpacked(const lb_unpacked *u, int64_t block, const lb_act8_row *a, int64_t index) {
    const int8_t *x8 = a->x8 + index * block;
    const int16_t *bsum = a->bsum + index * (block / 16);
    int32_t total = 0, mins = 0;
    for (int64_t s = 0; s < block / 16; s++) {
        int32_t part = 0;
        for (int l = 0; l < 16; l++) part += (int32_t)u->q[s * 16 + l] * x8[s * 16 + l];
        total += u->scale[s] * (part - u->offset * bsum[s]);
        mins += u->min[s] * bsum[s];
    }
    return a->dx[index] * (u->d * (float)total - u->dmin * (float)mins);
}

/* Row kernels are inlined into a dispatcher that calls them with constant kind and row count R, so that at R = 1
 * (decoding) the per-row accumulators are registers, not arrays in memory. */
#define LB_GGML_INLINE static inline __attribute__((always_inline))

#if defined(__AVX2__) && defined(__FMA__)
static inline int32_t lb_ggml_hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* 16 bytes of packed nibbles -> 32 codes in column order (byte j: column j low, column 16 + j high). */
static inline __m256i lb_nibbles32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

/* 32 bits (little-endian) -> 32 bytes, 0x10 where the bit is set: the fifth bit of Q5_0 / Q5_1 codes. */
static inline __m256i lb_bits32_to_0x10(const uint8_t *p) {
    uint32_t bits;
    memcpy(&bits, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(0x10));
}

/* int32x8 partial sums of u8 codes (< 128) times int8 activations, 32 columns. */
static inline __m256i lb_dot_u8s8(__m256i codes, __m256i x8) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x8), _mm256_set1_epi16(1));
}

/* A 32-value block's codes as 32 unsigned bytes in column order (Q8_0: int8 + 128, as lb_ggml_unpack). */
static inline __m256i lb_codes32(int64_t kind, const uint8_t *b) {
    switch (kind) {
    case LB_Q4_0: return lb_nibbles32(b + 2);
    case LB_Q4_1: return lb_nibbles32(b + 4);
    case LB_Q5_0: return _mm256_or_si256(lb_nibbles32(b + 6), lb_bits32_to_0x10(b + 2));
    case LB_Q5_1: return _mm256_or_si256(lb_nibbles32(b + 8), lb_bits32_to_0x10(b + 4));
    default: return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b + 2)), _mm256_set1_epi8((char)0x80));
    }
}

/* The 32-value types, one weight row against R activation rows (R <= 16). Per block,
 *   d * dx * dot(q, x8) + (m - offset * d) * sx   (sx = dx * sum(x8 of the block), m = Q4_1 / Q5_1's minimum). */
LB_GGML_INLINE void lb_ggml_row32_act8(int64_t kind, const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R,
                                      float *out) {
    const int64_t bytes = lb_ggml_bytes(kind), nb = K / 32;
    __m256 acc[16];
    float extra[16];
    for (int64_t r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), extra[r] = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * bytes;
        lb_ggml_prefetch(b, bytes);
        const float d = lb_ggml_half(b);
        if (kind == LB_Q8_0) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(b + 2));
            const __m256i aw = _mm256_sign_epi8(w, w);   /* |w| (as unsigned: -128 reads as 128) */
            for (int64_t r = 0; r < R; r++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(act[r].x8 + i * 32));
                const __m256i dot = lb_dot_u8s8(aw, _mm256_sign_epi8(x, w));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * act[r].dx[i]), _mm256_cvtepi32_ps(dot), acc[r]);
            }
            continue;
        }
        const __m256i q = lb_codes32(kind, b);
        const float m = kind == LB_Q4_1 || kind == LB_Q5_1 ? lb_ggml_half(b + 2) : 0.0f;
        const float offset = kind == LB_Q4_0 ? 8.0f : kind == LB_Q5_0 ? 16.0f : 0.0f;
        const float corr = m - offset * d;
        for (int64_t r = 0; r < R; r++) {
            const __m256i dot = lb_dot_u8s8(q, _mm256_loadu_si256((const __m256i *)(act[r].x8 + i * 32)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * act[r].dx[i]), _mm256_cvtepi32_ps(dot), acc[r]);
            extra[r] += corr * act[r].sx[i];
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = lb_hsum256(acc[r]) + extra[r];
}

/* A Q4_K / Q5_K block's 8 six-bit scales and minimums (12 packed bytes at b + 4, see lb_k4_scale_min) as the low
 * 8 bytes of two vectors: bytes 0-3 keep scales 0-3 and, in bits 6-7, the high bits of scales 4-7; bytes 4-7 the
 * same for the minimums; bytes 8-11 the low nibbles of scales 4-7 and, high nibbles, of minimums 4-7. */
static inline void lb_k4_scales_mins(const uint8_t *b, __m128i *scales, __m128i *mins) {
    uint32_t w[3];
    memcpy(w, b + 4, 12);
    const uint32_t scales_hi = (w[2] & 0x0F0F0F0Fu) | ((w[0] >> 6) & 0x03030303u) << 4;
    const uint32_t mins_hi = ((w[2] >> 4) & 0x0F0F0F0Fu) | ((w[1] >> 6) & 0x03030303u) << 4;
    *scales = _mm_setr_epi32((int)(w[0] & 0x3F3F3F3Fu), (int)scales_hi, 0, 0);
    *mins = _mm_setr_epi32((int)(w[1] & 0x3F3F3F3Fu), (int)mins_hi, 0, 0);
}

/* A K-quant block's codes into q[256] with vector code (Q4_K, Q5_K, Q6_K), else the portable unpack. */
static inline void lb_ggml_unpack_k(int64_t kind, const uint8_t *b, lb_unpacked *u) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    if (kind == LB_Q4_K || kind == LB_Q5_K) {
        __m128i scales8, mins8;            /* the header: each sub-scale and minimum twice (per 16 columns) */
        lb_k4_scales_mins(b, &scales8, &mins8);
        _mm256_storeu_si256((__m256i *)u->scale, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(scales8, scales8)));
        _mm256_storeu_si256((__m256i *)u->min, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins8, mins8)));
        u->d = lb_ggml_half(b);
        u->dmin = lb_ggml_half(b + 2);
        u->offset = 0;
        const uint8_t *qs = b + (kind == LB_Q4_K ? 16 : 48);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)), one = _mm256_set1_epi8(1);
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            if (kind == LB_Q5_K) {
                const __m128i shift = _mm_cvtsi32_si128(2 * j);
                const __m256i h = _mm256_srl_epi16(qh, shift);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 1), one), 4));
            }
            _mm256_storeu_si256((__m256i *)(u->q + 64 * j), lo);
            _mm256_storeu_si256((__m256i *)(u->q + 64 * j + 32), hi);
        }
    } else if (kind == LB_Q6_K) {
        _mm256_storeu_si256((__m256i *)u->scale, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192))));
        _mm256_storeu_si256((__m256i *)u->min, _mm256_setzero_si256());
        u->d = lb_ggml_half(b + 208);
        u->dmin = 0.0f;
        u->offset = 32;
        const __m256i three = _mm256_set1_epi8(3);
        for (int half = 0; half < 2; half++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + half * 64));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + half * 64 + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + half * 32));
            uint8_t *o = u->q + half * 128;
#define LB_Q6_HIGH(s) _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, (s)), three), 4)
            _mm256_storeu_si256((__m256i *)o, _mm256_or_si256(_mm256_and_si256(ql0, low), LB_Q6_HIGH(0)));
            _mm256_storeu_si256((__m256i *)(o + 32), _mm256_or_si256(_mm256_and_si256(ql1, low), LB_Q6_HIGH(2)));
            _mm256_storeu_si256((__m256i *)(o + 64),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), LB_Q6_HIGH(4)));
            _mm256_storeu_si256((__m256i *)(o + 96),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low), LB_Q6_HIGH(6)));
#undef LB_Q6_HIGH
        }
    } else {
        lb_ggml_unpack(kind, b, u);
    }
}

/* The K-quants (256-value blocks, codes < 64), one weight row against R activation rows: per block the integer
 * sum over 16-column sub-blocks of scale * dot(q, x8) (vpmaddubsw, then vpmaddwd with the two sub-scales of each
 * 32 columns), less the offset and minimum terms from the activations' 16-column sums. */
static inline void lb_ggml_row256_act8(int64_t kind, const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R,
                                       float *out) {
    const int64_t bytes = lb_ggml_bytes(kind), nb = K / 256;
    lb_unpacked u __attribute__((aligned(32)));
    float total[16];
    for (int64_t r = 0; r < R; r++) total[r] = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        lb_ggml_prefetch(row + i * bytes, bytes);
        lb_ggml_unpack_k(kind, row + i * bytes, &u);
        const __m256i scales = _mm256_loadu_si256((const __m256i *)u.scale);
        const __m256i mins = _mm256_loadu_si256((const __m256i *)u.min);
        __m256i pair[8];   /* the two sub-scales of 32 columns c, each over its 8 int16 lanes */
        for (int c = 0; c < 8; c++)
            pair[c] = _mm256_set_m128i(_mm_set1_epi16(u.scale[2 * c + 1]), _mm_set1_epi16(u.scale[2 * c]));
        for (int64_t r = 0; r < R; r++) {
            const int8_t *x8 = act[r].x8 + i * 256;
            __m256i sum = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(u.q + 32 * c));
                const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(x8 + 32 * c)));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, pair[c]));
            }
            const __m256i bsum = _mm256_loadu_si256((const __m256i *)(act[r].bsum + i * 16));
            const int32_t dot = lb_ggml_hsum_i32(sum) - u.offset * lb_ggml_hsum_i32(_mm256_madd_epi16(scales, bsum));
            const int32_t minsum = lb_ggml_hsum_i32(_mm256_madd_epi16(mins, bsum));
            total[r] += act[r].dx[i] * (u.d * (float)dot - u.dmin * (float)minsum);
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = total[r];
}

/* 16 int16 lanes of `v`, each lane holding int16 element `low` (low 128 bits) or `high` (high 128 bits) of a
 * vector whose two 128-bit halves are the same 8 int16 values: one sub-scale per lane group for vpmaddwd. */
static inline __m256i lb_pick16(__m256i v, int low, int high) {
    return _mm256_shuffle_epi8(v, _mm256_set_m128i(_mm_set1_epi16((short)((2 * high + 1) << 8 | 2 * high)),
                                                   _mm_set1_epi16((short)((2 * low + 1) << 8 | 2 * low))));
}

/* v's 16-bit lanes shifted left by `count` bits (right by -count when negative); count is a constant here. */
static inline __m256i lb_shift16(__m256i v, int count) {
    return count >= 0 ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(count)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(-count));
}

/* Q4_K / Q5_K, one weight row against R activation rows (Q8_K-style: one scale per 256, sums per 16).
 * A block is d, dmin, 8 six-bit scales and minimums packed in 12 bytes (bytes 0-3: scales 0-3 and, in bits 6-7,
 * the high bits of scales 4-7; bytes 4-7: minimums 0-3, high bits of minimums 4-7; bytes 8-11: low nibbles of
 * scales 4-7 and, high nibbles, of minimums 4-7), then 32-column sub-blocks 2j and 2j + 1 in the low and high
 * nibbles of 32 code bytes (Q5_K: their fifth bits in 32 more bytes, bits 2j and 2j + 1). Per block
 *   d dx sum_j scale_j dot(q_j, x8_j) - dmin dx sum_j min_j sum(x8_j),
 * both sums in integer vectors (vpmaddubsw, vpmaddwd with the sub-scale of each lane), scaled into float vector
 * accumulators: no horizontal sum until the row's end. */
/* A Q4_K / Q5_K block (layout above) unpacked: its codes q[c] for 32-column sub-block c, its 8 scales (int16, in both
 * 128-bit halves, for lb_pick16) and its minimums per 16 columns. */
LB_GGML_INLINE void lb_k4_block(int64_t kind, const uint8_t *b, __m256i q[8], __m256i *scales, __m256i *mins) {
    const int five = kind == LB_Q5_K;
    const __m256i low = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    const uint8_t *qs = b + (five ? 48 : 16);
    __m128i scales8, mins8;
    lb_k4_scales_mins(b, &scales8, &mins8);
    *scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scales8));
    *mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins8, mins8));   /* per 16 columns */
    const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        q[2 * j] = _mm256_and_si256(v, low);
        q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if (five) {
            /* bits 2j and 2j + 1 of each qh byte to bit 4 (a 16-bit shift: what crosses bytes is masked off) */
            q[2 * j] = _mm256_or_si256(q[2 * j], _mm256_and_si256(lb_shift16(qh, 4 - 2 * j), bit4));
            q[2 * j + 1] = _mm256_or_si256(q[2 * j + 1], _mm256_and_si256(lb_shift16(qh, 3 - 2 * j), bit4));
        }
    }
}

/* -- one activation row, AVX-512 (AVX-512BW/VL) ----------------------------------------------------------------
 * Decoding is bound by the instructions per block as much as by memory: the AVX2 Q4_K kernel issues ~120 per
 * 144-byte block (27 cycles on a Zen 4 core, 16 GB/s of blocks from L2). With 512-bit vectors, two 32-column
 * sub-blocks go through each vpmaddubsw / vpmaddwd / vpshufb, and a block's scales are unpacked by seven vector
 * operations instead of scalar shifts (~68 instructions a block instead of ~120; measured on a Zen 4 only, where
 * two 256-bit halves share each 512-bit operation's pipe, so the gain is the front end's). The integer sums are the same values in the same eight lanes (integer
 * addition: exact in any order), folded from 16 lanes to 8 before the float arithmetic, which is the AVX2
 * kernel's operation for operation; so results are bit for bit those of the AVX2 kernel and of the many-row
 * kernels below, which tests/test_batch_gemm.py and tests/test_ggml_block_kernels.py check. */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define LB_GGML_ROW512 1
/* A Q4_K / Q5_K block's eight 6-bit scales (bytes 0-7) and minimums (bytes 8-15) from its 12 packed bytes at b + 4
 * (layout above lb_k4_scales_mins): dwords w0 w1 w2 give scales 0-3 = w0 & 0x3F.., 4-7 = (w2 & 0x0F..) |
 * (w0 >> 6 & 3) << 4, minimums 0-3 = w1 & 0x3F.., 4-7 = (w2 >> 4 & 0x0F..) | (w1 >> 6 & 3) << 4. */
static inline __m128i lb_k4_scales_mins128(const uint8_t *b) {
    /* the block's first 16 bytes (d, dmin, the 12), shifted down to w0 w1 w2: a copy into a buffer would be read
     * back before its stores could forward (a 16-byte load over 8- and 4-byte stores), ~2x slower per block */
    const __m128i v = _mm_srli_si128(_mm_loadu_si128((const __m128i *)b), 4);
    const __m128i x = _mm_shuffle_epi32(v, 0x98);                  /* w0, w2, w1, w2 */
    const __m128i y = _mm_shuffle_epi32(v, 0x40);                  /* -, w0, -, w1 */
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(x, _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    return _mm_or_si128(low, _mm_and_si128(_mm_srli_epi32(y, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
}

/* A Q4_K / Q5_K block unpacked for the 512-bit kernel: q[p] the codes of sub-blocks 2p (low 256 bits) and 2p + 1
 * (high), scales the 8 scales as int16 in every 128-bit lane (picked per pair by vpshufb), mins per 16 columns. */
LB_GGML_INLINE void lb_k4_block512(int64_t kind, const uint8_t *b, __m512i q[4], __m512i *scales, __m256i *mins) {
    const int five = kind == LB_Q5_K;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const uint8_t *qs = b + (five ? 48 : 16);
    const __m128i sm = lb_k4_scales_mins128(b);
    *scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sm));
    *mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));         /* per 16 columns */
    const __m512i qh = five ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)))
                            : _mm512_setzero_si512();
    for (int p = 0; p < 4; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
        q[p] = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), low);
        if (five) {      /* bit 2p (low half) / 2p + 1 (high half) of each qh byte to bit 4 */
            const __m512i counts = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * p)),
                                                      _mm256_set1_epi16((short)(2 * p + 1)), 1);
            const __m512i bit = _mm512_and_si512(_mm512_srlv_epi16(qh, counts), _mm512_set1_epi8(1));
            q[p] = _mm512_or_si512(q[p], _mm512_slli_epi16(bit, 4));
        }
    }
}

/* 8 int32 lanes: the 16 of a 512-bit vector, high half added to the low (the AVX2 kernels' lane order). */
static inline __m256i lb_fold512(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

LB_GGML_INLINE void lb_k4_row_act8(int64_t kind, const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R,
                                   float *out) {
    const int64_t bytes = lb_ggml_bytes(kind), nb = K / 256;
    __m512i pick[4];        /* vpshufb indices: int16 scale 2p over the low 256 bits, 2p + 1 over the high */
    for (int p = 0; p < 4; p++)
        pick[p] = _mm512_inserti64x4(_mm512_set1_epi16((short)((4 * p + 1) << 8 | 4 * p)),
                                     _mm256_set1_epi16((short)((4 * p + 3) << 8 | (4 * p + 2))), 1);
    __m256 acc[16], mins_acc[16];
    for (int64_t r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), mins_acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * bytes;
        lb_ggml_prefetch(b, bytes);
        const float d = lb_ggml_half(b), dmin = lb_ggml_half(b + 2);
        __m512i q[4], scales, picked[4];
        __m256i mins;
        lb_k4_block512(kind, b, q, &scales, &mins);
        for (int p = 0; p < 4; p++) picked[p] = _mm512_shuffle_epi8(scales, pick[p]);
        for (int64_t r = 0; r < R; r++) {
            const int8_t *x8 = act[r].x8 + i * 256;
            __m512i sum = _mm512_setzero_si512();
            for (int p = 0; p < 4; p++)
                sum = _mm512_add_epi32(sum, _mm512_madd_epi16(
                    _mm512_maddubs_epi16(q[p], _mm512_loadu_si512((const void *)(x8 + 64 * p))), picked[p]));
            const __m256i bsum = _mm256_loadu_si256((const __m256i *)(act[r].bsum + i * 16));
            const float dx = act[r].dx[i];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(lb_fold512(sum)), acc[r]);
            mins_acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsum)),
                                          mins_acc[r]);
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = lb_hsum256(_mm256_sub_ps(acc[r], mins_acc[r]));
}
#else
#define LB_GGML_ROW512 0
LB_GGML_INLINE void lb_k4_row_act8(int64_t kind, const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R,
                                   float *out) {
    const int64_t bytes = lb_ggml_bytes(kind), nb = K / 256;
    __m256 acc[16], mins_acc[16];
    for (int64_t r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), mins_acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * bytes;
        lb_ggml_prefetch(b, bytes);
        const float d = lb_ggml_half(b), dmin = lb_ggml_half(b + 2);
        __m256i q[8], scales, mins;
        lb_k4_block(kind, b, q, &scales, &mins);
        for (int64_t r = 0; r < R; r++) {
            const int8_t *x8 = act[r].x8 + i * 256;
            __m256i sum = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i p = _mm256_maddubs_epi16(q[c], _mm256_loadu_si256((const __m256i *)(x8 + 32 * c)));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, lb_pick16(scales, c, c)));
            }
            const __m256i bsum = _mm256_loadu_si256((const __m256i *)(act[r].bsum + i * 16));
            const float dx = act[r].dx[i];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sum), acc[r]);
            mins_acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsum)),
                                          mins_acc[r]);
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = lb_hsum256(_mm256_sub_ps(acc[r], mins_acc[r]));
}
#endif

/* Q6_K, one weight row against R activation rows. A block is 128 bytes of low nibbles, 64 of high 2-bit pairs,
 * 16 signed 8-bit scales (one per 16 columns) and d; per 128-column half h, codes 32t..32t+31 (t < 4) are
 * nibble t / 2 (low or high) of low-nibble bytes 64h + 32 (t % 2) + l, with bits 2t, 2t + 1 of high byte 32h + l
 * on top; w = d scale (q - 32). Per block: d dx (sum_s scale_s dot(q_s, x8_s) - 32 sum_s scale_s sum(x8_s)). */
/* A Q6_K block (layout above) unpacked: its codes q[c] for 32-column sub-block c, its scales per 16 columns, and
 * those of each 128-column half in both 128-bit halves of a vector (for lb_pick16). */
LB_GGML_INLINE void lb_q6k_block(const uint8_t *b, __m256i q[8], __m256i *scales, __m256i half_scales[2]) {
    const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    const __m128i scale_bytes = _mm_loadu_si128((const __m128i *)(b + 192));
    *scales = _mm256_cvtepi8_epi16(scale_bytes);               /* per 16 columns */
    half_scales[0] = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(scale_bytes));
    half_scales[1] = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_srli_si128(scale_bytes, 8)));
    for (int h = 0; h < 2; h++) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
#define LB_Q6_HIGH(s) _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, (s)), three), 4)
        q[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, low), LB_Q6_HIGH(0));
        q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, low), LB_Q6_HIGH(2));
        q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), LB_Q6_HIGH(4));
        q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low), LB_Q6_HIGH(6));
#undef LB_Q6_HIGH
    }
}

/* The int16 scale of each lane of 32-column sub-block c of a Q6_K block (two 16-column scales), for vpmaddwd. */
static inline __m256i lb_q6k_pick(const __m256i half_scales[2], int c) {
    return lb_pick16(half_scales[c / 4], 2 * (c % 4), 2 * (c % 4) + 1);
}

#if LB_GGML_ROW512
/* Q6_K with 512-bit vectors: pair p = sub-blocks 2p, 2p + 1 (half h = p / 2). Half h's 64 low-nibble bytes are
 * [ql0 | ql1] in one load: pair 2h takes their low nibbles with qh bits 0-1 (low 256 bits) and 2-3 (high), pair
 * 2h + 1 their high nibbles with qh bits 4-5 and 6-7, each 2-bit field moved to bits 4-5 by a 16-bit shift (what
 * crosses a byte is masked off). The pair's four 16-column scales are spread over its four 128-bit lanes by vpermw. */
LB_GGML_INLINE void lb_q6k_row_act8(const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R, float *out) {
    const int64_t nb = K / 256;
    const __m512i low = _mm512_set1_epi8(0x0F), high2 = _mm512_set1_epi8(0x30);
    const __m512i up = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);   /* bits 0-1, 2-3 */
    const __m512i down = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1); /* bits 4-5, 6-7 */
    __m512i spread[4];      /* vpermw indices: scale 4p + l over 128-bit lane l */
    for (int p = 0; p < 4; p++)
        spread[p] = _mm512_inserti64x4(_mm512_castsi256_si512(
                        _mm256_set_m128i(_mm_set1_epi16((short)(4 * p + 1)), _mm_set1_epi16((short)(4 * p)))),
                        _mm256_set_m128i(_mm_set1_epi16((short)(4 * p + 3)), _mm_set1_epi16((short)(4 * p + 2))), 1);
    __m256 acc[16];
    for (int64_t r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * 210;
        lb_ggml_prefetch(b, 210);
        const float d = lb_ggml_half(b + 208);
        const __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));   /* per 16 */
        const __m512i scales512 = _mm512_castsi256_si512(scales);
        __m512i q[4], picked[4];
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * h));
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, low), _mm512_and_si512(_mm512_sllv_epi16(qh, up), high2));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low),
                                           _mm512_and_si512(_mm512_srlv_epi16(qh, down), high2));
        }
        for (int p = 0; p < 4; p++) picked[p] = _mm512_permutexvar_epi16(spread[p], scales512);
        for (int64_t r = 0; r < R; r++) {
            const int8_t *x8 = act[r].x8 + i * 256;
            __m512i sum = _mm512_setzero_si512();
            for (int p = 0; p < 4; p++)
                sum = _mm512_add_epi32(sum, _mm512_madd_epi16(
                    _mm512_maddubs_epi16(q[p], _mm512_loadu_si512((const void *)(x8 + 64 * p))), picked[p]));
            const __m256i bsum = _mm256_loadu_si256((const __m256i *)(act[r].bsum + i * 16));
            const __m256i offset = _mm256_madd_epi16(scales, bsum);
            const __m256i total = _mm256_sub_epi32(lb_fold512(sum), _mm256_slli_epi32(offset, 5));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * act[r].dx[i]), _mm256_cvtepi32_ps(total), acc[r]);
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = lb_hsum256(acc[r]);
}
#else
LB_GGML_INLINE void lb_q6k_row_act8(const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R, float *out) {
    const int64_t nb = K / 256;
    __m256 acc[16];
    for (int64_t r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * 210;
        lb_ggml_prefetch(b, 210);
        const float d = lb_ggml_half(b + 208);
        __m256i q[8], scales, half_scales[2];
        lb_q6k_block(b, q, &scales, half_scales);
        for (int64_t r = 0; r < R; r++) {
            const int8_t *x8 = act[r].x8 + i * 256;
            __m256i sum = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i p = _mm256_maddubs_epi16(q[c], _mm256_loadu_si256((const __m256i *)(x8 + 32 * c)));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, lb_q6k_pick(half_scales, c)));
            }
            const __m256i bsum = _mm256_loadu_si256((const __m256i *)(act[r].bsum + i * 16));
            const __m256i offset = _mm256_madd_epi16(scales, bsum);
            sum = _mm256_sub_epi32(sum, _mm256_slli_epi32(offset, 5));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * act[r].dx[i]), _mm256_cvtepi32_ps(sum), acc[r]);
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = lb_hsum256(acc[r]);
}
#endif

/* Float32 activations, one weight row against R rows of x (K apart), xsum16 [R, K / 16] their 16-column sums:
 * per 16 columns (d * scale) * dot(q - offset, x) (the offset taken off in integers, so codes stored with one,
 * as Q8_0's + 128, cancel nothing in floats), less (dmin * min) * xsum16. */
LB_GGML_INLINE void lb_ggml_row_f32_avx2(int64_t kind, const uint8_t *row, int64_t K, const float *x, int64_t R,
                                        const float *xsum16, float *out) {
    const int64_t block = lb_ggml_block(kind), bytes = lb_ggml_bytes(kind), subs = block / 16;
    lb_unpacked u __attribute__((aligned(32)));
    __m256 acc[16];
    float extra[16];
    for (int64_t r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), extra[r] = 0.0f;
    for (int64_t i = 0; i < K / block; i++) {
        const uint8_t *b = row + i * bytes;
        lb_ggml_prefetch(b, bytes);
        if (block == 32) {
            lb_ggml_header(kind, b, &u);
            _mm256_storeu_si256((__m256i *)u.q, lb_codes32(kind, b));
        } else {
            lb_ggml_unpack_k(kind, b, &u);
        }
        const __m256i offset = _mm256_set1_epi32(u.offset);
        for (int64_t s = 0; s < subs; s++) {
            const __m128i codes = _mm_loadu_si128((const __m128i *)(u.q + 16 * s));
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(codes), offset));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)),
                                                                  offset));
            const __m256 scale = _mm256_set1_ps(u.d * (float)u.scale[s]);
            const float min = u.dmin * (float)u.min[s];
            const int64_t k = i * block + 16 * s;
            for (int64_t r = 0; r < R; r++) {
                const float *xr = x + r * K + k;
                const __m256 dot = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), _mm256_mul_ps(w1, _mm256_loadu_ps(xr + 8)));
                acc[r] = _mm256_fmadd_ps(scale, dot, acc[r]);
                extra[r] -= min * xsum16[r * (K / 16) + k / 16];
            }
        }
    }
    for (int64_t r = 0; r < R; r++) out[r] = lb_hsum256(acc[r]) + extra[r];
}

/* lb_ggml_row_f32_avx2 with a constant kind, and R = 1 (decoding) apart. */
static inline void lb_ggml_row_f32_dispatch(int64_t kind, const uint8_t *row, int64_t K, const float *x, int64_t R,
                                            const float *xsum16, float *out) {
#define LB_KIND(k) case k: if (R == 1) lb_ggml_row_f32_avx2(k, row, K, x, 1, xsum16, out); \
                           else lb_ggml_row_f32_avx2(k, row, K, x, R, xsum16, out); break
    switch (kind) {
    LB_KIND(LB_Q4_0); LB_KIND(LB_Q4_1); LB_KIND(LB_Q5_0); LB_KIND(LB_Q5_1); LB_KIND(LB_Q8_0);
    LB_KIND(LB_Q4_K); LB_KIND(LB_Q5_K); LB_KIND(LB_Q6_K);
    default: lb_ggml_row_f32_avx2(kind, row, K, x, R, xsum16, out);
    }
#undef LB_KIND
}
#endif

/* -- many activation rows, int8 (AVX-512 VNNI) ------------------------------------------------------------------
 * Continuous batching's step multiplies each weight row by 16 activation rows at a time. lb_ggml_row32_act8 spends
 * ~9 instructions per block and row (two for the integer dot, the scale's product and broadcast, the conversion, the
 * fused multiply-add, the minimum's term); from LB_GGML_GEMM_ROWS rows the rows' int8 values, scales and sums are
 * first packed per 16 rows (lb_ggml_pack16: each block's 32 bytes of two rows side by side in 64, the 16 rows'
 * scales dx and sums sx of each block in one vector), so that one vpdpbusd computes a block's dot products for two
 * rows (the same eight 4-byte partial sums per row as vpmaddubsw + vpmaddwd: integer sums, exact), one multiply
 * gives all 16 rows' d * dx, one fused multiply-add their minimum terms, and a permute spreads two rows' scales over
 * the halves of a float accumulator. Every float operation per row is the one lb_ggml_row32_act8 does, in its order
 * (d * dx, the lane-wise fused multiply-add into eight lanes, their sum at the row's end, plus corr * sx summed
 * with fused multiply-adds), so the results are bit for bit the per-row kernel's. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__)
#define LB_GGML_GEMM 1
#else
#define LB_GGML_GEMM 0
#endif
#define LB_GGML_GEMM_ROWS 8

/* Floats one packed group of 16 activation rows of K columns takes (see lb_ggml_pack16): 16 K bytes of int8 values,
 * then K / 2 floats of scales and sums for the 32-value types (K / 2 + K / 16 for the K-quants). */
static inline int64_t lb_ggml_pack_floats(int64_t K) { return 4 * K + K / 2 + K / 2; }

/* Whether lb_ggml_matmul packs the activations for the many-row kernels: int8 activations, and a block type they
 * read (the 32-value types, Q4_K, Q5_K, Q6_K; Q2_K / Q3_K keep the per-row kernel). */
static inline int lb_ggml_gemm_fits(int64_t kind, int64_t M, int act8) {
#if LB_GGML_GEMM
    return act8 && M >= LB_GGML_GEMM_ROWS && kind != LB_Q2_K && kind != LB_Q3_K;
#else
    (void)kind; (void)M; (void)act8;
    return 0;
#endif
}

/* Rows m0..m0+15 of the act8 rows at `scratch` (`per_row` floats apart; rows from M on are zeros) into `pack`, per
 * 16-row group: for 32-value blocks x8 [blocks][8 pairs][64 bytes: row 2p's block, then row 2p + 1's], dx
 * [blocks][16], sx [blocks][16]; for 256-value blocks x8 [blocks][8 pairs][8 sub-blocks of 32][64 bytes, the same],
 * bsum [blocks][8 pairs][32 int16: row 2p's 16 sums, then row 2p + 1's], dx [blocks][16]. */
static inline void lb_ggml_pack16(const float *scratch, int64_t per_row, int64_t K, int64_t block, int64_t m0,
                                  int64_t M, float *pack) {
    const int64_t nb = K / block;
    int8_t *x8 = (int8_t *)pack;
    float *dx = pack + 4 * K + (block == 32 ? 0 : K / 2), *sx = dx + nb * 16;    /* x8: 16 K bytes */
    int16_t *bsum = (int16_t *)(pack + 4 * K);
    for (int64_t r = 0; r < 16; r++) {
        const int present = m0 + r < M;
        lb_act8_row row;
        if (present) row = lb_ggml_act8_at((float *)scratch + (m0 + r) * per_row, K);
        for (int64_t i = 0; i < nb; i++) {
            for (int64_t c = 0; c < block / 32; c++) {
                int8_t *target = x8 + ((i * 8 + r / 2) * (block / 32) + c) * 64 + (r % 2) * 32;
                if (present) memcpy(target, row.x8 + i * block + c * 32, 32);
                else memset(target, 0, 32);
            }
            dx[i * 16 + r] = present ? row.dx[i] : 0.0f;
            if (block == 32) {
                sx[i * 16 + r] = present ? row.sx[i] : 0.0f;
            } else {
                int16_t *sums = bsum + (i * 8 + r / 2) * 32 + (r % 2) * 16;
                if (present) memcpy(sums, row.bsum + i * 16, 32);
                else memset(sums, 0, 32);
            }
        }
    }
}

#if LB_GGML_GEMM
/* A 32-value block type's weight row against the 16 packed activation rows: out[r] for r < 16. */
LB_GGML_INLINE void lb_ggml_row32_gemm(int64_t kind, const uint8_t *row, int64_t K, const float *pack, float *out) {
    const int64_t bytes = lb_ggml_bytes(kind), nb = K / 32;
    const int8_t *x8 = (const int8_t *)pack;
    const float *dx = pack + 4 * K, *sx = dx + nb * 16;
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512i pick[8];           /* lanes 0-7 take row 2p's value, lanes 8-15 row 2p + 1's */
    for (int p = 0; p < 8; p++)
        pick[p] = _mm512_add_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                   _mm512_set1_epi32(2 * p));
    __m512 acc[8], extra = _mm512_setzero_ps();
    for (int p = 0; p < 8; p++) acc[p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * bytes;
        lb_ggml_prefetch(b, bytes);
        const float d = lb_ggml_half(b);
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(d), _mm512_loadu_ps(dx + i * 16));
        __m512i q;
        if (kind == LB_Q8_0) {      /* int8 + 128 as unsigned; sum(128 x) taken off below */
            q = _mm512_broadcast_i64x4(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b + 2)),
                                                        _mm256_set1_epi8((char)0x80)));
        } else {
            q = _mm512_broadcast_i64x4(lb_codes32(kind, b));
            const float m = kind == LB_Q4_1 || kind == LB_Q5_1 ? lb_ggml_half(b + 2) : 0.0f;
            const float offset = kind == LB_Q4_0 ? 8.0f : kind == LB_Q5_0 ? 16.0f : 0.0f;
            extra = _mm512_fmadd_ps(_mm512_set1_ps(m - offset * d), _mm512_loadu_ps(sx + i * 16), extra);
        }
        for (int p = 0; p < 8; p++) {
            const __m512i x = _mm512_loadu_si512((const void *)(x8 + (i * 8 + p) * 64));
            __m512i dot = _mm512_dpbusd_epi32(zero, q, x);
            if (kind == LB_Q8_0) dot = _mm512_sub_epi32(dot, _mm512_dpbusd_epi32(zero, flip, x));
            acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick[p], scale), _mm512_cvtepi32_ps(dot), acc[p]);
        }
    }
    float extras[16];
    _mm512_storeu_ps(extras, extra);
    for (int p = 0; p < 8; p++) {
        out[2 * p] = lb_hsum256(_mm512_castps512_ps256(acc[p])) + extras[2 * p];
        out[2 * p + 1] = lb_hsum256(_mm512_extractf32x8_ps(acc[p], 1)) + extras[2 * p + 1];
    }
}

/* Q4_K / Q5_K / Q6_K, a weight row against the 16 packed activation rows: lb_k4_row_act8 / lb_q6k_row_act8's sums
 * for two rows per vector (vpmaddubsw as there, then vpdpwssd: their vpmaddwd by the sub-scales and the add in one
 * instruction, the same integers), and their float operations lane for lane. */
LB_GGML_INLINE void lb_k_row_gemm(int64_t kind, const uint8_t *row, int64_t K, const float *pack, float *out) {
    const int64_t bytes = lb_ggml_bytes(kind), nb = K / 256;
    const int8_t *x8 = (const int8_t *)pack;
    const int16_t *bsum = (const int16_t *)(pack + 4 * K);
    const float *dx = pack + 4 * K + K / 2;
    __m512i pick[8];
    for (int p = 0; p < 8; p++)
        pick[p] = _mm512_add_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                   _mm512_set1_epi32(2 * p));
    __m512 acc[8], mins_acc[8];
    for (int p = 0; p < 8; p++) acc[p] = _mm512_setzero_ps(), mins_acc[p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * bytes;
        lb_ggml_prefetch(b, bytes);
        __m256i q[8], scales, mins, half_scales[2];
        float d, dmin = 0.0f;
        if (kind == LB_Q6_K) {
            d = lb_ggml_half(b + 208);
            lb_q6k_block(b, q, &scales, half_scales);
        } else {
            d = lb_ggml_half(b), dmin = lb_ggml_half(b + 2);
            lb_k4_block(kind, b, q, &scales, &mins);
        }
        const __m512 dx16 = _mm512_loadu_ps(dx + i * 16);
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(d), dx16), min_scale = _mm512_mul_ps(_mm512_set1_ps(dmin), dx16);
        __m512i sum[8];
        for (int p = 0; p < 8; p++) sum[p] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {
            const __m512i qc = _mm512_broadcast_i64x4(q[c]);
            const __m512i sc = _mm512_broadcast_i64x4(kind == LB_Q6_K ? lb_q6k_pick(half_scales, c)
                                                                      : lb_pick16(scales, c, c));
            for (int p = 0; p < 8; p++) {
                const __m512i x = _mm512_loadu_si512((const void *)(x8 + ((i * 8 + p) * 8 + c) * 64));
                sum[p] = _mm512_dpwssd_epi32(sum[p], _mm512_maddubs_epi16(qc, x), sc);
            }
        }
        const __m512i per16 = _mm512_broadcast_i64x4(kind == LB_Q6_K ? scales : mins);
        for (int p = 0; p < 8; p++) {
            const __m512i sums16 = _mm512_loadu_si512((const void *)(bsum + (i * 8 + p) * 32));
            const __m512 row_scale = _mm512_permutexvar_ps(pick[p], scale);
            if (kind == LB_Q6_K) {
                const __m512i offset = _mm512_madd_epi16(per16, sums16);
                const __m512i total = _mm512_sub_epi32(sum[p], _mm512_slli_epi32(offset, 5));
                acc[p] = _mm512_fmadd_ps(row_scale, _mm512_cvtepi32_ps(total), acc[p]);
            } else {
                acc[p] = _mm512_fmadd_ps(row_scale, _mm512_cvtepi32_ps(sum[p]), acc[p]);
                mins_acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick[p], min_scale),
                                              _mm512_cvtepi32_ps(_mm512_madd_epi16(per16, sums16)), mins_acc[p]);
            }
        }
    }
    for (int p = 0; p < 8; p++) {
        const __m512 v = kind == LB_Q6_K ? acc[p] : _mm512_sub_ps(acc[p], mins_acc[p]);
        out[2 * p] = lb_hsum256(_mm512_castps512_ps256(v));
        out[2 * p + 1] = lb_hsum256(_mm512_extractf32x8_ps(v, 1));
    }
}

/* The many-row kernels with a constant kind. */
static inline void lb_ggml_row_gemm(int64_t kind, const uint8_t *row, int64_t K, const float *pack, float *out) {
    switch (kind) {
    case LB_Q4_0: lb_ggml_row32_gemm(LB_Q4_0, row, K, pack, out); break;
    case LB_Q4_1: lb_ggml_row32_gemm(LB_Q4_1, row, K, pack, out); break;
    case LB_Q5_0: lb_ggml_row32_gemm(LB_Q5_0, row, K, pack, out); break;
    case LB_Q5_1: lb_ggml_row32_gemm(LB_Q5_1, row, K, pack, out); break;
    case LB_Q8_0: lb_ggml_row32_gemm(LB_Q8_0, row, K, pack, out); break;
    case LB_Q4_K: lb_k_row_gemm(LB_Q4_K, row, K, pack, out); break;
    case LB_Q5_K: lb_k_row_gemm(LB_Q5_K, row, K, pack, out); break;
    default: lb_k_row_gemm(LB_Q6_K, row, K, pack, out); break;
    }
}
#endif


/* -- many activation rows, int8, AMX tiles (Q4_K, Q5_K, Q6_K) -----------------------------------------------------
 * From LB_GGML_AMX_ROWS rows, a K-quant weight is multiplied 16 weight rows x 16 activation rows at a time by the
 * CPU's tile unit: one tdpbusd per sub-block of one sub-scale (32 columns for Q4_K / Q5_K, 16 for Q6_K) gives the
 * 256 integer dot products of the codes (unsigned) with the int8 activations, exact. Each is converted and scaled
 * by its weight row's sub-scale (both integers, the product below 2^24: exact in float), summed over the block, and
 * the offset term (Q4_K / Q5_K: sum_j min_j sum(x8_j), Q6_K: 32 sum_s scale_s sum(x8_s)) is an exact integer
 * (vpdpwssd over pairs of activation sums), so a row's result differs from the per-row kernel's only in float
 * rounding: the same block integers, summed in another order (tests/test_batch_gemm.py bounds the difference).
 * A tile op does 16 x 16 x 32 multiply-adds, 32 times what one vpdpwssd does. */
#if LB_GGML_GEMM && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define LB_GGML_AMX 1
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LB_GGML_AMX 0
#endif
#define LB_GGML_AMX_ROWS 16
#define LB_GGML_AMX_GROUPS 8        /* 16-row activation groups one pass over a weight tile carries (128 rows) */

/* Whether the tile path runs (1): compiled in, Linux granted this process the tile state (arch_prctl
 * ARCH_REQ_XCOMP_PERM, asked once when the library loads) and not switched off (LOWBIT_AMX=0, or lowbit_amx(0)).
 * One variable for the whole library: defined in affine_gemv.c. */
extern int lb_amx_state;

/* 1 if the tile path runs (after `mode` 0: switch it off, 1: on if the process may use it, -1: leave it). Switch
 * only between calls: a matmul reading another's packed activations (lb_prepared_alike) assumes both saw one state. */
int lowbit_amx(int mode);

static inline int lb_ggml_amx_fits(int64_t kind, int64_t M, int act8) {
    /* the 32-value types decode a block per 32 columns: at 16 rows that costs what the tiles save (Q4_0 0.94x,
     * Q8_0 0.84x of the vector kernel; 1.55x / 1.42x at 32 rows, one thread, bench/bench_amx_tiles.py) */
    return LB_GGML_AMX && lb_amx_state == 1 && lb_ggml_gemm_fits(kind, M, act8)   /* AMX builds have the GEMM path */
           && M >= (lb_ggml_block(kind) == 32 ? 2 * LB_GGML_AMX_ROWS : LB_GGML_AMX_ROWS);
}

#if LB_GGML_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lb_tile_config;

/* Columns one sub-scale covers: the K of one tile product. */
static inline int lb_amx_sub_columns(int64_t kind) { return kind == LB_Q6_K ? 16 : 32; }

static inline void lb_amx_configure(int64_t kind) {
    const int columns = lb_amx_sub_columns(kind);
    lb_tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 4; t++)                   /* tmm0-3: 16 weight rows x 16 activation rows, int32 */
        config.rows[t] = 16, config.colsb[t] = 64;
    for (int t = 4; t < 8; t += 2) {
        config.rows[t] = 16, config.colsb[t] = (uint16_t)columns;    /* tmm4, 6: 16 weight rows' sub-block codes */
        config.rows[t + 1] = (uint8_t)(columns / 4), config.colsb[t + 1] = 64;  /* tmm5, 7: 4-column steps x 16 x 4 */
    }
    _tile_loadconfig(&config);
}

/* Rows m0..m0+15 of the act8 rows at `scratch` (rows from M on are zeros) in the tile layout. For 256-value blocks:
 * tiles [blocks][8 sub-blocks of 32][8 four-column steps][16 rows][4 int8] (a 16-column sub-block is 4 of those
 * steps), dx [blocks][16], and each row's sums per 16 columns as int16 pairs [blocks][8][16 rows][2] (|sum| <= 16 x
 * 127): 4 K + K / 16 + K / 2 floats, within the lb_ggml_pack_floats(K) apart that groups are kept. The same for
 * every K-quant kind, so matmuls of different kinds on one input share it (lb_prepared_alike). For 32-value blocks
 * the same tiles (one 32-column block per 512 bytes), then dx and sx [blocks][16] (lb_ggml_pack16's layout). */
static inline void lb_ggml_pack16_amx(const float *scratch, int64_t per_row, int64_t K, int64_t block, int64_t m0,
                                      int64_t M, float *pack) {
    const int64_t nb = K / block;
    uint8_t *tiles = (uint8_t *)pack;
    float *dx = pack + 4 * K;
    for (int64_t r = 0; r < 16; r++) {
        const int present = m0 + r < M;
        lb_act8_row row;
        if (present) row = lb_ggml_act8_at((float *)scratch + (m0 + r) * per_row, K);
        for (int64_t j = 0; j < K / 32; j++) {        /* one tile per 32 columns, whatever the block size */
            uint8_t *tile = tiles + j * 512 + r * 4;
            for (int step = 0; step < 8; step++) {
                if (present) memcpy(tile + step * 64, row.x8 + j * 32 + step * 4, 4);
                else memset(tile + step * 64, 0, 4);
            }
        }
        for (int64_t i = 0; i < nb; i++) dx[i * 16 + r] = present ? row.dx[i] : 0.0f;
        if (block == 32) {                            /* sx [blocks][16], as lb_ggml_pack16 */
            float *sx = dx + nb * 16;
            for (int64_t i = 0; i < nb; i++) sx[i * 16 + r] = present ? row.sx[i] : 0.0f;
        } else {                                      /* the sums per 16 columns as pairs, per 32 columns */
            int16_t *sums = (int16_t *)(dx + nb * 16);
            for (int64_t j = 0; j < K / 32; j++) {
                int16_t *pair = sums + (j * 16 + r) * 2;
                pair[0] = present ? row.bsum[2 * j] : 0;
                pair[1] = present ? row.bsum[2 * j + 1] : 0;
            }
        }
    }
}

/* Weight rows n0..n0+15 (`rows`, row_bytes apart) of a Q4_K / Q5_K / Q6_K weight against G <= LB_GGML_AMX_GROUPS
 * packed 16-row activation groups (`pack`, group_floats apart): out[g][w][a] = dot(weight row n0 + w, activation
 * row 16 g + a). The tile configuration for `kind` must be loaded (lb_amx_configure). */
static void lb_k_tiles_amx(int64_t kind, const uint8_t *rows, int64_t row_bytes, int64_t K, const float *pack,
                           int64_t group_floats, int64_t G, float *out) {
    const int64_t nb = K / 256, bytes = lb_ggml_bytes(kind);
    const int six = kind == LB_Q6_K, columns = lb_amx_sub_columns(kind);
    uint8_t codes[8][16][32] __attribute__((aligned(64)));
    int32_t product[4][16][16] __attribute__((aligned(64)));
    float scale_f[16][16];                /* [weight row][sub-block of `columns`] */
    int32_t offset_pairs[16][8];          /* [weight row][16-column pair]: the offset term's int16 pairs */
    float d[16], offset_coef[16];
    float offset_out[LB_GGML_AMX_GROUPS][16][16];
    for (int64_t g = 0; g < G; g++)
        for (int w = 0; w < 16; w++)
            for (int a = 0; a < 16; a++) out[(g * 16 + w) * 16 + a] = 0.0f, offset_out[g][w][a] = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        for (int w = 0; w < 16; w++) {           /* the 16 rows' block i: codes per sub-block, scales, offsets */
            const uint8_t *b = rows + w * row_bytes + i * bytes;
            lb_ggml_prefetch(b, bytes);
            __m256i q[8];
            if (six) {
                __m256i scales16, half_scales[2];
                lb_q6k_block(b, q, &scales16, half_scales);
                const __m128i scale_bytes = _mm_loadu_si128((const __m128i *)(b + 192));
                _mm512_storeu_ps(scale_f[w], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scale_bytes)));
                _mm256_storeu_si256((__m256i *)offset_pairs[w], _mm256_cvtepi8_epi16(scale_bytes));
                d[w] = lb_ggml_half(b + 208), offset_coef[w] = 32.0f * d[w];
            } else {
                __m256i scales16, mins16;
                __m128i scales8, mins8;
                lb_k4_block(kind, b, q, &scales16, &mins16);
                lb_k4_scales_mins(b, &scales8, &mins8);
                _mm256_storeu_ps(scale_f[w], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scales8)));
                const __m256i mins32 = _mm256_cvtepu8_epi32(mins8);   /* each for both 16-column sums */
                _mm256_storeu_si256((__m256i *)offset_pairs[w], _mm256_or_si256(mins32, _mm256_slli_epi32(mins32, 16)));
                d[w] = lb_ggml_half(b), offset_coef[w] = lb_ggml_half(b + 2);
            }
            for (int c = 0; c < 8; c++) _mm256_store_si256((__m256i *)codes[c][w], q[c]);
        }
        for (int64_t g = 0; g < G; g++) {
            const float *group = pack + g * group_floats;
            const uint8_t *tiles = (const uint8_t *)group + i * 8 * 512;
            const __m512 dx = _mm512_loadu_ps(group + 4 * K + i * 16);
            const int16_t *sums = (const int16_t *)(group + 4 * K + nb * 16) + i * 8 * 32;
            __m512 total[16];
            for (int w = 0; w < 16; w++) total[w] = _mm512_setzero_ps();
            /* four sub-blocks in flight in tmm0-3 (tile registers are not renamed: one would serialise them), their
             * codes and activations loaded alternately into tmm4 / tmm5 and tmm6 / tmm7; sub-block s covers
             * columns s * columns of the block: its codes in codes[s * columns / 32] from byte s * columns % 32 */
#define LB_AMX_SUB(t, s, ta, tb) do { _tile_zero(t); \
        _tile_loadd(ta, &codes[(s) * columns / 32][0][(s) * columns % 32], 32); \
        _tile_loadd(tb, tiles + (s) * columns * 16, 64); _tile_dpbusd(t, ta, tb); } while (0)
            for (int s0 = 0; s0 < 256 / columns; s0 += 4) {
                LB_AMX_SUB(0, s0, 4, 5);
                LB_AMX_SUB(1, s0 + 1, 6, 7);
                LB_AMX_SUB(2, s0 + 2, 4, 5);
                LB_AMX_SUB(3, s0 + 3, 6, 7);
                _tile_stored(0, product[0], 64);
                _tile_stored(1, product[1], 64);
                _tile_stored(2, product[2], 64);
                _tile_stored(3, product[3], 64);
                for (int j = 0; j < 4; j++)
                    for (int w = 0; w < 16; w++)
                        total[w] = _mm512_fmadd_ps(_mm512_set1_ps(scale_f[w][s0 + j]),
                                                   _mm512_cvtepi32_ps(_mm512_load_si512((const void *)product[j][w])),
                                                   total[w]);
            }
#undef LB_AMX_SUB
            __m512i pairs[8];
            for (int j = 0; j < 8; j++) pairs[j] = _mm512_loadu_si512((const void *)(sums + j * 32));
            for (int w = 0; w < 16; w++) {
                __m512i offset = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++)
                    offset = _mm512_dpwssd_epi32(offset, pairs[j], _mm512_set1_epi32(offset_pairs[w][j]));
                float *o = out + (g * 16 + w) * 16;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(d[w]), dx), total[w],
                                                    _mm512_loadu_ps(o)));
                _mm512_storeu_ps(offset_out[g][w], _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(offset_coef[w]), dx),
                                                                   _mm512_cvtepi32_ps(offset),
                                                                   _mm512_loadu_ps(offset_out[g][w])));
            }
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int w = 0; w < 16; w++) {
            float *o = out + (g * 16 + w) * 16;
            _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_loadu_ps(o), _mm512_loadu_ps(offset_out[g][w])));
        }
}

/* The same for the 32-value types (Q4_0/1, Q5_0/1, Q8_0): one tile product per block (its codes unsigned, Q8_0's
 * plus 128), four blocks in flight; per block d dx dot + (m - offset d) sx as the per-row kernel (offset 8 / 16 /
 * 128 for Q4_0 / Q5_0 / Q8_0's +128, m Q4_1 / Q5_1's minimum, sx = dx sum(x8)). */
static void lb_b32_tiles_amx(int64_t kind, const uint8_t *rows, int64_t row_bytes, int64_t K, const float *pack,
                             int64_t group_floats, int64_t G, float *out) {
    const int64_t nb = K / 32, bytes = lb_ggml_bytes(kind);
    const int minimum = kind == LB_Q4_1 || kind == LB_Q5_1;
    const float offset = kind == LB_Q4_0 ? 8.0f : kind == LB_Q5_0 ? 16.0f : kind == LB_Q8_0 ? 128.0f : 0.0f;
    uint8_t codes[4][16][32] __attribute__((aligned(64)));
    int32_t product[4][16][16] __attribute__((aligned(64)));
    float d[4][16], corr[4][16];
    for (int64_t e = 0; e < G * 256; e++) out[e] = 0.0f;
    for (int64_t i0 = 0; i0 < nb; i0 += 4) {
        const int count = (int)lb_min(4, nb - i0);
        for (int j = 0; j < count; j++)
            for (int w = 0; w < 16; w++) {
                const uint8_t *b = rows + w * row_bytes + (i0 + j) * bytes;
                lb_ggml_prefetch(b, bytes);
                _mm256_store_si256((__m256i *)codes[j][w], lb_codes32(kind, b));
                d[j][w] = lb_ggml_half(b);
                corr[j][w] = (minimum ? lb_ggml_half(b + 2) : 0.0f) - offset * d[j][w];
            }
        for (int64_t g = 0; g < G; g++) {
            const float *group = pack + g * group_floats;
            const uint8_t *tiles = (const uint8_t *)group + i0 * 512;
            const float *dx = group + 4 * K + i0 * 16, *sx = group + 4 * K + nb * 16 + i0 * 16;
#define LB_AMX_BLOCK(t, j, ta, tb) do { _tile_zero(t); _tile_loadd(ta, codes[j], 32); \
        _tile_loadd(tb, tiles + (j) * 512, 64); _tile_dpbusd(t, ta, tb); _tile_stored(t, product[j], 64); } while (0)
            LB_AMX_BLOCK(0, 0, 4, 5);
            if (count > 1) LB_AMX_BLOCK(1, 1, 6, 7);
            if (count > 2) LB_AMX_BLOCK(2, 2, 4, 5);
            if (count > 3) LB_AMX_BLOCK(3, 3, 6, 7);
#undef LB_AMX_BLOCK
            for (int w = 0; w < 16; w++) {
                float *o = out + (g * 16 + w) * 16;
                __m512 total = _mm512_loadu_ps(o);
                for (int j = 0; j < count; j++) {
                    const __m512 dxj = _mm512_loadu_ps(dx + j * 16);
                    total = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(d[j][w]), dxj),
                                            _mm512_cvtepi32_ps(_mm512_load_si512((const void *)product[j][w])), total);
                    total = _mm512_fmadd_ps(_mm512_set1_ps(corr[j][w]), _mm512_loadu_ps(sx + j * 16), total);
                }
                _mm512_storeu_ps(o, total);
            }
        }
    }
}
#endif

/* out[r] = dot(weight row, activation row r) for R <= 16 rows, int8 activations. */
static inline void lb_ggml_row_act8(int64_t kind, const uint8_t *row, int64_t K, const lb_act8_row *act, int64_t R,
                                    float *out) {
#if defined(__AVX2__) && defined(__FMA__)
    /* each kernel with a constant kind, and R = 1 (decoding) apart: kernel(leading arguments..., R, out) */
#define LB_ROWS(kernel, ...) do { if (R == 1) kernel(__VA_ARGS__, 1, out); else kernel(__VA_ARGS__, R, out); } while (0)
#define LB_KIND32(k) case k: LB_ROWS(lb_ggml_row32_act8, k, row, K, act); break
    switch (kind) {
    LB_KIND32(LB_Q4_0); LB_KIND32(LB_Q4_1); LB_KIND32(LB_Q5_0); LB_KIND32(LB_Q5_1); LB_KIND32(LB_Q8_0);
    case LB_Q4_K: LB_ROWS(lb_k4_row_act8, LB_Q4_K, row, K, act); break;
    case LB_Q5_K: LB_ROWS(lb_k4_row_act8, LB_Q5_K, row, K, act); break;
    case LB_Q6_K: LB_ROWS(lb_q6k_row_act8, row, K, act); break;
    default: lb_ggml_row256_act8(kind, row, K, act, R, out);    /* Q2_K, Q3_K: unpacked, then integer dots */
    }
#undef LB_KIND32
#undef LB_ROWS
#else
    const int64_t block = lb_ggml_block(kind), bytes = lb_ggml_bytes(kind);
    lb_unpacked u;
    for (int64_t r = 0; r < R; r++) out[r] = 0.0f;
    for (int64_t i = 0; i < K / block; i++) {
        lb_ggml_prefetch(row + i * bytes, bytes);
        lb_ggml_unpack(kind, row + i * bytes, &u);
        for (int64_t r = 0; r < R; r++) out[r] += lb_ggml_dot_unpacked(&u, block, &act[r], i);
    }
#endif
}

/* out[j] = dot(weight row j, the one activation row) for `count` consecutive rows `row_bytes` apart: decoding's
 * matmuls, whose rows are short (Qwen2.5-1.5B's gate/up: 6 Q4_K blocks a row). The kind's dispatch, the kernels'
 * constants and the per-row bookkeeping of lb_ggml_matmul_row happen once per run of rows instead of once per row:
 * through the per-row path, [8960, 1536] Q4_K rows ran at 13.9 GB/s (2 threads, from cache) where [1536, 8960]
 * ran at 21.9. Each row's arithmetic is lb_ggml_row_act8's with R = 1, so the results are its bits. */
static inline void lb_ggml_rows_act8(int64_t kind, const uint8_t *rows, int64_t row_bytes, int64_t count, int64_t K,
                                     const lb_act8_row *act, float *out) {
#if defined(__AVX2__) && defined(__FMA__)
#define LB_EACH_ROW(call) for (int64_t j = 0; j < count; j++) { const uint8_t *row = rows + j * row_bytes; call; }
#define LB_KIND32(k) case k: LB_EACH_ROW(lb_ggml_row32_act8(k, row, K, act, 1, out + j)); break
    switch (kind) {
    LB_KIND32(LB_Q4_0); LB_KIND32(LB_Q4_1); LB_KIND32(LB_Q5_0); LB_KIND32(LB_Q5_1); LB_KIND32(LB_Q8_0);
    case LB_Q4_K: LB_EACH_ROW(lb_k4_row_act8(LB_Q4_K, row, K, act, 1, out + j)); break;
    case LB_Q5_K: LB_EACH_ROW(lb_k4_row_act8(LB_Q5_K, row, K, act, 1, out + j)); break;
    case LB_Q6_K: LB_EACH_ROW(lb_q6k_row_act8(row, K, act, 1, out + j)); break;
    default: LB_EACH_ROW(lb_ggml_row256_act8(kind, row, K, act, 1, out + j));
    }
#undef LB_KIND32
#undef LB_EACH_ROW
#else
    for (int64_t j = 0; j < count; j++) lb_ggml_row_act8(kind, rows + j * row_bytes, K, act, 1, out + j);
#endif
}

/* out[r] = dot(weight row, x[r]) for R <= 16 float32 rows `K` apart: 256 columns at a time dequantized into a
 * buffer (ggml's values exactly), then dotted. */
static inline void lb_ggml_row_f32(int64_t kind, const uint8_t *row, int64_t K, const float *x, int64_t R,
                                   float *out) {
    const int64_t block = lb_ggml_block(kind), bytes = lb_ggml_bytes(kind), per = 256 / block;
    float w[256] __attribute__((aligned(32)));
    for (int64_t r = 0; r < R; r++) out[r] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
        const int64_t count = lb_min(per, (K - k0) / block), width = count * block;
        lb_ggml_dequantize(kind, row + (k0 / block) * bytes, count, w);
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * K + k0;
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < width; k++) s += w[k] * xr[k];
            out[r] += s;
        }
    }
}

/* Floats of per-thread scratch lb_ggml_matmul needs for M rows of K activations (their act8 form, and the packed
 * copy of every 16 of them for the many-row kernel). */
static inline int64_t lb_ggml_scratch_floats(int64_t K, int64_t M) {
    return M * lb_ggml_act8_floats(K) + (M >= LB_GGML_GEMM_ROWS ? (M + 15) / 16 * lb_ggml_pack_floats(K) : 0);
}

/* Output row n of lb_ggml_matmul: y[:M, n] (= or +=) x W[n]^T + bias[n], the activations already in `scratch`. */
static inline void lb_ggml_matmul_row(const lb_linear *L, int64_t n, int64_t row_bytes, const float *x, int64_t M,
                                      float *y, int64_t ldy, int accumulate, float *scratch, int act8,
                                      const float *pack) {
    const int64_t K = L->k, per_row = lb_ggml_act8_floats(K);
    const uint8_t *row = (const uint8_t *)L->w + n * row_bytes;
    lb_act8_row act[16];
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int64_t R = lb_min(16, M - m0);
        float out[16];
#if LB_GGML_GEMM
        if (pack && R >= LB_GGML_GEMM_ROWS) {      /* packed by lb_ggml_matmul (16 rows, padded with zeros) */
            lb_ggml_row_gemm(L->kind, row, K, pack + (m0 / 16) * lb_ggml_pack_floats(K), out);
        } else
#else
        (void)pack;
#endif
        if (act8) {
            for (int64_t r = 0; r < R; r++) act[r] = lb_ggml_act8_at(scratch + (m0 + r) * per_row, K);
            lb_ggml_row_act8(L->kind, row, K, act, R, out);
        } else {
#if defined(__AVX2__) && defined(__FMA__)
            lb_ggml_row_f32_dispatch(L->kind, row, K, x + m0 * K, R, scratch + m0 * (K / 16), out);
#else
            lb_ggml_row_f32(L->kind, row, K, x + m0 * K, R, out);
#endif
        }
        for (int64_t r = 0; r < R; r++) {
            float *target = y + (m0 + r) * ldy + n;
            const float value = out[r] + (L->bias ? L->bias[n] : 0.0f);
            *target = accumulate ? *target + value : value;
        }
    }
}

/* Output rows 16 item .. 16 item + 15 of lb_ggml_matmul (fewer at the end): 16 full rows through the tile path
 * when `tiles`, else row by row. */
static inline void lb_ggml_matmul_item(const lb_linear *L, int64_t item, int64_t row_bytes, const float *x, int64_t M,
                                       float *y, int64_t ldy, int accumulate, float *scratch, int act8,
                                       const float *pack, int tiles) {
    const int64_t n0 = item * 16, n1 = lb_min(L->n, n0 + 16);
#if LB_GGML_AMX
    if (tiles && n1 - n0 == 16) {
        float out[LB_GGML_AMX_GROUPS * 16 * 16];
        const int64_t group_floats = lb_ggml_pack_floats(L->k), groups = (M + 15) / 16;
        for (int64_t g0 = 0; g0 < groups; g0 += LB_GGML_AMX_GROUPS) {
            const int64_t G = lb_min(LB_GGML_AMX_GROUPS, groups - g0);
            (lb_ggml_block(L->kind) == 32 ? lb_b32_tiles_amx : lb_k_tiles_amx)(
                L->kind, (const uint8_t *)L->w + n0 * row_bytes, row_bytes, L->k, pack + g0 * group_floats,
                group_floats, G, out);
            for (int64_t g = 0; g < G; g++)
                for (int64_t w = 0; w < 16; w++)
                    for (int64_t a = 0; a < 16 && (g0 + g) * 16 + a < M; a++) {
                        float *target = y + ((g0 + g) * 16 + a) * ldy + n0 + w;
                        const float value = out[(g * 16 + w) * 16 + a] + (L->bias ? L->bias[n0 + w] : 0.0f);
                        *target = accumulate ? *target + value : value;
                    }
        }
        return;
    }
#else
    (void)tiles;
#endif
    if (M == 1 && act8) {          /* decoding one row: the run of rows in one call */
        float out[16];
        const lb_act8_row act = lb_ggml_act8_at(scratch, L->k);
        lb_ggml_rows_act8(L->kind, (const uint8_t *)L->w + n0 * row_bytes, row_bytes, n1 - n0, L->k, &act, out);
        for (int64_t n = n0; n < n1; n++) {
            const float value = out[n - n0] + (L->bias ? L->bias[n] : 0.0f);
            y[n] = accumulate ? y[n] + value : value;
        }
        return;
    }
    /* rows past the last 16 of a tile-path matmul: the per-row kernels on the act8 rows (its pack is in tiles) */
    for (int64_t n = n0; n < n1; n++)
        lb_ggml_matmul_row(L, n, row_bytes, x, M, y, ldy, accumulate, scratch, act8, tiles ? NULL : pack);
}

/* A thread's activations prepared for GGUF block weights (lb_ggml_prepare): what lb_ggml_run_item reads. */
typedef struct {
    const float *x, *pack;    /* x's float rows; the many-row pack (NULL: rows one by one) */
    float *scratch;           /* the act8 rows (act8), else x's 16-column sums (float path) */
    int act8, tiles;          /* int8 activations; the AMX tile path (the team's tile state) */
    int tile_columns;         /* the sub-block columns of the tile configuration this thread has loaded (0: none) */
} lb_ggml_prepared;

/* Round x [M, K] for weight L into this thread's `scratch` (act8 rows, then the many-row pack) unless `prepared`
 * says a previous call on the same x left it there for a weight lb_prepared_alike to L (no barrier: each thread
 * has its own copy). */
static inline lb_ggml_prepared lb_ggml_prepare(const lb_linear *L, const float *x, int64_t M, float *scratch,
                                               int act8, int prepared) {
    const int64_t K = L->k, per_row = lb_ggml_act8_floats(K);
    lb_ggml_prepared p = {x, NULL, scratch, act8, lb_ggml_amx_fits(L->kind, M, act8), 0};
    if (act8 && !prepared)
        for (int64_t r = 0; r < M; r++)
            lb_ggml_quantize_act8(x + r * K, K, lb_ggml_block(L->kind), scratch + r * per_row);
    if (lb_ggml_gemm_fits(L->kind, M, act8)) {   /* many rows: every 16 of them packed (lb_ggml_pack16) */
        float *pack = scratch + M * per_row;
        p.pack = pack;
        for (int64_t m0 = 0; m0 < M && !prepared; m0 += 16) {
            float *group = pack + (m0 / 16) * lb_ggml_pack_floats(K);
#if LB_GGML_AMX
            if (p.tiles) {
                lb_ggml_pack16_amx(scratch, per_row, K, lb_ggml_block(L->kind), m0, M, group);
                continue;
            }
#endif
            lb_ggml_pack16(scratch, per_row, K, lb_ggml_block(L->kind), m0, M, group);
        }
    }
#if defined(__AVX2__) && defined(__FMA__)
    if (!act8 && !prepared)              /* float path: scratch is [M, K / 16] sums of x */
        for (int64_t s = 0; s < M * (K / 16); s++) {
            float total = 0.0f;
            for (int l = 0; l < 16; l++) total += x[s * 16 + l];
            scratch[s] = total;
        }
#endif
    return p;
}

/* Output rows 16 item .. 16 item + 15 of y[M, :n] (= or +=) x W^T + bias for a weight prepared alike to the one
 * `p` was prepared for; loads the tile configuration L's kind needs when the thread has another (kinds whose
 * sub-blocks are as wide share one: gate Q4_K and up Q5_K alternate without reloading). */
static inline void lb_ggml_run_item(const lb_linear *L, int64_t item, float *y, int64_t ldy, int accumulate,
                                    int64_t M, lb_ggml_prepared *p) {
#if LB_GGML_AMX
    if (p->tiles && p->tile_columns != lb_amx_sub_columns(L->kind)) {
        lb_amx_configure(L->kind);
        p->tile_columns = lb_amx_sub_columns(L->kind);
    }
#endif
    lb_ggml_matmul_item(L, item, lb_ggml_row_bytes(L), p->x, M, y, ldy, accumulate, p->scratch, p->act8, p->pack,
                        p->tiles);
}

/* Release the tile state after a thread's last lb_ggml_run_item of a loop. */
static inline void lb_ggml_finish(lb_ggml_prepared *p) {
#if LB_GGML_AMX
    if (p->tile_columns) _tile_release();
    p->tile_columns = 0;
#else
    (void)p;
#endif
}

/* Items a thread takes at a time from a dynamically shared loop over `items` items that each read 16 rows of
 * `weights` weights shaped like L, for `rows` activation rows (lb_dynamic_chunk). */
static inline int64_t lb_ggml_chunk(const lb_linear *L, int64_t items, int64_t weights, int64_t rows) {
    return lb_dynamic_chunk(16 * lb_ggml_row_bytes(L) * weights, items, rows);
}

/* lb_matmul for a GGUF block weight: y[M, :n] (= or +=) x W^T + bias; called by every thread of a team; each
 * thread rounds the activations into its own scratch (no barrier). Rows are shared out by an orphaned `omp for`:
 * with `wait` (the matmul ends at a barrier, so no one reads y before every row is done) dynamically, in chunks
 * of about 64 KB of weights (at least 16 chunks), so that a thread the OS preempts on a busy machine leaves its
 * rows to the others instead of making them wait at the barrier (llama.cpp shares its matmuls' chunks the same
 * way); without `wait` statically, as lb_matmul_rows_per_item promises (the gate/up matmuls' rows are read back
 * by the thread that computed them). */
static inline void lb_ggml_matmul(const lb_linear *L, const float *x, int64_t M, float *y, int64_t ldy,
                                  int accumulate, float *scratch, int act8, int wait, int prepared) {
    lb_ggml_prepared p = lb_ggml_prepare(L, x, M, scratch, act8, prepared);
    /* Work is shared out in items of 16 output rows (lb_matmul_rows_per_item): the tile path's unit. */
    const int64_t items = (L->n + 15) / 16;
    if (wait) {
        #pragma omp for schedule(dynamic, lb_ggml_chunk(L, items, 1, M))
        for (int64_t item = 0; item < items; item++) lb_ggml_run_item(L, item, y, ldy, accumulate, M, &p);
    } else {
        #pragma omp for schedule(static) nowait
        for (int64_t item = 0; item < items; item++) lb_ggml_run_item(L, item, y, ldy, accumulate, M, &p);
    }
    lb_ggml_finish(&p);
}

#endif
