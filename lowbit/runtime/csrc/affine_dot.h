/* y = x W^T for the weight layouts lowbit's compiled kernels read, shared by affine_gemv.c (one matmul per call)
 * and decode.c (a whole decode step per call).
 *
 * Integer codes are affine per group: W[n,k] = a[n,g] * q[n,k] + b[n,g], so
 *   y[m,n] = sum_g a[n,g] * dot(x[m, g], q[n, g]) + b[n,g] * xsum[m,g],   xsum[m,g] = sum of x over group g.
 * NF4/FP4 codes instead index a 16-value table (W[n,k] = a[n,g] * table[q[n,k]]), looked up with one permute.
 * Activations and accumulation stay float32: the result differs from a float32 matmul of the dequantized weight
 * only by summation order. The opt-in act8 path (integer codes only) rounds activations to int8 per 32 columns
 * and uses VNNI dot products, as llama.cpp does; it is no longer float32-exact.
 *
 * Layouts:
 *   LB_F32  float32 weight [N, K].
 *   LB_F16, LB_BF16  float16 / bfloat16 weight [N, K] (heads and embeddings kept in their checkpoint's dtype): read
 *           as stored and widened to float32 in registers (F16C, or a 16-bit shift for bfloat16), so a half head
 *           costs half the bytes of a float32 one and gives the same products of the same values.
 *   LB_U8   one code per byte [N, K] (any code width up to 8 bits, any group size).
 *   LB_NIB  two 4-bit codes per byte [N, K/2], in chunks of 32 columns: byte j of chunk c holds column 32c+j in
 *           its low nibble and column 32c+16+j in its high one, so one 16-byte load widens to two vectors of 16
 *           consecutive columns with a mask and a shift. Needs K % 32 == 0 and a group size of 16 or a multiple
 *           of 32 (the last group may be shorter, as GPTQ's ragged groups are).
 *
 * Speed: a fused multiply-add takes 4 cycles before its result can be added to, so a single running sum per
 * dot product waits on itself (measured 3.5 weights/cycle). The kernels compute a tile of NR weight rows x R
 * activation rows at once, with two partial sums each, so 8 independent sums are in flight; at batch 1 the tile
 * is 4 weight rows sharing each activation load.
 */
#ifndef LOWBIT_AFFINE_DOT_H
#define LOWBIT_AFFINE_DOT_H

#include <stddef.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { LB_F32 = 0, LB_U8 = 1, LB_NIB = 2, LB_F16 = 3, LB_BF16 = 4 };

/* The float layouts: plain weights, no group statistics. */
static inline int lb_is_float(int64_t kind) { return kind == LB_F32 || kind == LB_F16 || kind == LB_BF16; }
static inline int64_t lb_float_bytes(int64_t kind) { return kind == LB_F32 ? 4 : 2; }

/* The activations' arithmetic of a matmul, chosen by the caller (lowbit/runtime/activations.py mirrors it):
 * float32; int8 where the layout allows (llama.cpp's arithmetic); or auto: int8 for GGUF block weights (what
 * llama.cpp computes on the same file, and its speed) and float32 for lowbit's own layouts (float32-exact). */
enum { LB_ACTS_FLOAT32 = 0, LB_ACTS_INT8 = 1, LB_ACTS_AUTO = 2 };
#define LB_PREFETCH 2    /* blocks of four weight rows to prefetch ahead */

/* How the group statistics a, b [n, groups] are stored: float32 both; float16 both; or a alone (float16 or
 * float32) with b = offset * a (symmetric grids and GGUF Q4_0/Q5_0/Q8_0/Q6_K, where b = -zero * a for one
 * zero): reading fewer statistics bytes matters because decoding is bound by the bytes it reads. */
enum { LB_STATS_F32 = 0, LB_STATS_F16 = 1, LB_STATS_F16_OFFSET = 2, LB_STATS_F32_OFFSET = 3 };
static inline int lb_stats_f32(int64_t stats) { return stats == LB_STATS_F32 || stats == LB_STATS_F32_OFFSET; }
static inline int lb_stats_offset(int64_t stats) { return stats == LB_STATS_F16_OFFSET || stats == LB_STATS_F32_OFFSET; }

typedef struct {
    int64_t kind, n, k, groups, group;   /* LB_F32 / LB_F16 / LB_BF16 / LB_U8 / LB_NIB / a GGUF block kind (ggml_blocks.h);
                                            weight [n, k]; groups of `group` columns */
    const void *w;                       /* weight, codes, or GGUF blocks [n, k / block * block bytes] */
    const void *a, *b;                   /* [n, groups]: W = a * q + b (unused for the float kinds) */
    const float *bias;                   /* [n] or NULL */
    int64_t stats;                       /* LB_STATS_* */
    float offset;                        /* b = offset * a for LB_STATS_*_OFFSET */
    const int32_t *perm;                 /* NULL, or [k]: column j of the weight multiplies x[:, perm[j]]
                                            (act-order checkpoints, columns sorted so groups are contiguous) */
    const float *table;                  /* NULL, or 16 values 4-bit codes index instead of being integers:
                                            W = a * table[q] + b (NF4/FP4 codebooks, LB_NIB only) */
} lb_linear;

static inline float lb_half(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    union { uint32_t u; float f; } bits;
    if (exponent == 0) {                 /* zero or subnormal: mantissa * 2^-24 */
        bits.f = (float)mantissa * (1.0f / 16777216.0f);
        bits.u |= sign;
    } else if (exponent == 31) {
        bits.u = sign | 0x7F800000u | (mantissa << 13);
    } else {
        bits.u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    return bits.f;
#endif
}

/* Element `at` of a float weight stored as `kind` (lb_is_float), as float32 (exact: every half and bfloat16 is one). */
static inline float lb_float_at(const void *w, int64_t at, int64_t kind) {
    if (kind == LB_F16) return lb_half(((const uint16_t *)w)[at]);
    if (kind == LB_BF16) {
        union { uint32_t u; float f; } bits;
        bits.u = (uint32_t)((const uint16_t *)w)[at] << 16;
        return bits.f;
    }
    return ((const float *)w)[at];
}

/* Statistic `index` of an a or b array stored as `stats` says. */
static inline float lb_stat(const void *values, int64_t index, int64_t stats) {
    return lb_stats_f32(stats) ? ((const float *)values)[index] : lb_half(((const uint16_t *)values)[index]);
}

static inline int64_t lb_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* Bytes of weights a thread takes at a time from a loop that ends at a barrier and shares its items dynamically: a
 * thread the OS preempts on a busy machine then leaves its items to the others instead of making them wait at the
 * barrier (llama.cpp shares its matmuls' chunks the same way). 256 KB (64 KB before) since a Zen 4 run of decoding's
 * one-row kernels (bench/bench_block_kernels.py, [8960, 1536], 2 threads, streaming int8, two alternations): Q4_K
 * 19.3 / 19.4 GB/s with 64 KB chunks, 22.8 / 21.8 with 256 KB, 24.6 / 21.3 with 1 MB; Q6_K 23.1 / 22.2, 27.8 / 24.4,
 * 27.5 / 22.8. Each chunk is a new stream for the hardware prefetcher to find. A chunk is still 10-25 us of work,
 * far below the time slice a busy machine takes a thread away for. That is for one activation row (decoding); with
 * more rows a byte of weights is rows times the work, so many-row loops (prompts, batches) keep 64 KB chunks. An
 * experiment may set either: LOWBIT_CFLAGS=-DLB_CHUNK_BYTES=65536. */
#ifndef LB_CHUNK_BYTES
#define LB_CHUNK_BYTES 262144
#endif
#ifndef LB_CHUNK_BYTES_ROWS
#define LB_CHUNK_BYTES_ROWS 65536
#endif

/* Items a thread takes at a time from such a loop over `items` items of `item_bytes` bytes of weights each, for
 * `rows` activation rows: about LB_CHUNK_BYTES (one row) or LB_CHUNK_BYTES_ROWS (more), and at least 16 chunks in
 * all (so two threads still balance on a small weight). */
static inline int64_t lb_dynamic_chunk(int64_t item_bytes, int64_t items, int64_t rows) {
    const int64_t bytes = rows > 1 ? LB_CHUNK_BYTES_ROWS : LB_CHUNK_BYTES;
    const int64_t chunk = lb_min(bytes / (item_bytes > 0 ? item_bytes : 1), items / 16);
    return chunk < 1 ? 1 : chunk;
}

#if defined(__AVX2__)
/* The sum of 8 floats (one helper for every AVX2 kernel here and in ggml_blocks.h). */
static inline float lb_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#include "ggml_blocks.h"   /* GGUF block kinds (LB_Q4_0 ... LB_Q6_K): lb_matmul hands them to lb_ggml_matmul */

/* Bytes of one weight row of lowbit's own layouts (codes or floats; statistics apart). */
static inline int64_t lb_row_bytes(const lb_linear *L) {
    return L->kind == LB_NIB ? L->k / 2 : L->kind == LB_U8 ? L->k : L->k * lb_float_bytes(L->kind);
}



/* sum_g values[g] * xsum[g] for G statistics stored as `stats` says (the b * xsum term of one output). */
static inline float lb_stat_dot(const void *values, int64_t stats, const float *xsum, int64_t G) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 lanes = (__mmask16)(G - g >= 16 ? 0xFFFFu : (1u << (G - g)) - 1u);
        const __m512 v = lb_stats_f32(stats)
            ? _mm512_maskz_loadu_ps(lanes, (const float *)values + g)
            : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)values + g));
        acc = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(lanes, xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        const __m256 v = lb_stats_f32(stats) ? _mm256_loadu_ps((const float *)values + g)
                                             : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)values + g)));
        acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(xsum + g), acc);
    }
    float total = lb_hsum256(acc);
    for (; g < G; g++) total += lb_stat(values, g, stats) * xsum[g];
    return total;
#else
    float total = 0.0f;
    for (int64_t g = 0; g < G; g++) total += lb_stat(values, g, stats) * xsum[g];
    return total;
#endif
}

/* xsum[m, g] for rows of x [rows, K] and groups of `group` columns (the last may be shorter). */
static inline void group_sums(const float *x, int64_t rows, int64_t K, int64_t G, int64_t group, float *xsum) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            const int64_t k1 = lb_min(g * group + group, K);
            for (int64_t k = g * group; k < k1; k++) s += x[r * K + k];
            xsum[r * G + g] = s;
        }
}

/* out[i][r] = sum_g a[i,g] * dot(q[i, g], x[r, g]) for weight rows i < NR (codes `stride` bytes apart) and
 * activation rows r < R; the b * xsum term is added by the caller. NR, R are constants after inlining. */
#define LB_TILE_ARGS const float *x, int64_t R, const uint8_t *q, int64_t stride, const void *a, int64_t stats, \
                     const float *table, int64_t NR, int64_t K, int64_t G, int64_t group, float out[4][4]
#define LB_INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define LB_ZERO(v) for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) v[i][r] = _mm512_setzero_ps()
#define LB_STORE(v) for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) \
                        out[i][r] = _mm512_reduce_add_ps(v[i][r])

LB_INLINE void tile_nib(LB_TILE_ARGS) {
    const __m512i low = _mm512_set1_epi32(0xF);
    const __m512 values = table ? _mm512_loadu_ps(table) : _mm512_setzero_ps();
    /* 16 codes (int32 lanes) to floats: the integers themselves, or their codebook values (one permute) */
#define LB_NIB_FLOATS(v) (table ? _mm512_permutexvar_ps((v), values) : _mm512_cvtepi32_ps(v))
    __m512 acc[4][4], odd[4][4];
    LB_ZERO(acc);
    if (group == 16) {                      /* each half of a chunk is its own group */
        LB_ZERO(odd);
        for (int64_t k = 0; k < K; k += 32)
            for (int64_t i = 0; i < NR; i++) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i * stride + k / 2)));
                const __m512 lo = LB_NIB_FLOATS(_mm512_and_si512(v, low));
                const __m512 hi = LB_NIB_FLOATS(_mm512_srli_epi32(v, 4));
                const __m512 a0 = _mm512_set1_ps(lb_stat(a, i * G + k / 16, stats)),
                             a1 = _mm512_set1_ps(lb_stat(a, i * G + k / 16 + 1, stats));
                for (int64_t r = 0; r < R; r++) {
                    acc[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(x + r * K + k)), a0, acc[i][r]);
                    odd[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(x + r * K + k + 16)), a1,
                                                odd[i][r]);
                }
            }
        for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) acc[i][r] = _mm512_add_ps(acc[i][r], odd[i][r]);
    } else {
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = g * group, k1 = lb_min(k0 + group, K);
            __m512 even[4][4];
            LB_ZERO(even);
            LB_ZERO(odd);
            for (int64_t k = k0; k < k1; k += 32)
                for (int64_t i = 0; i < NR; i++) {
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i * stride + k / 2)));
                    const __m512 lo = LB_NIB_FLOATS(_mm512_and_si512(v, low));
                    const __m512 hi = LB_NIB_FLOATS(_mm512_srli_epi32(v, 4));
                    for (int64_t r = 0; r < R; r++) {
                        even[i][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + r * K + k), even[i][r]);
                        odd[i][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + r * K + k + 16), odd[i][r]);
                    }
                }
            for (int64_t i = 0; i < NR; i++) {
                const __m512 scale = _mm512_set1_ps(lb_stat(a, i * G + g, stats));
                for (int64_t r = 0; r < R; r++)
                    acc[i][r] = _mm512_fmadd_ps(_mm512_add_ps(even[i][r], odd[i][r]), scale, acc[i][r]);
            }
        }
    }
    LB_STORE(acc);
#undef LB_NIB_FLOATS
}

LB_INLINE void tile_u8(LB_TILE_ARGS) {
    (void)table;
    __m512 acc[4][4];
    LB_ZERO(acc);
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group, k1 = lb_min(k0 + group, K);
        __m512 even[4][4], odd[4][4];
        LB_ZERO(even);
        LB_ZERO(odd);
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32)
            for (int64_t i = 0; i < NR; i++) {
                const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i * stride + k))));
                const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i * stride + k + 16))));
                for (int64_t r = 0; r < R; r++) {
                    even[i][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), even[i][r]);
                    odd[i][r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), odd[i][r]);
                }
            }
        for (; k < k1; k += 16) {
            const __mmask16 lanes = (__mmask16)(k1 - k >= 16 ? 0xFFFFu : (1u << (k1 - k)) - 1u);
            for (int64_t i = 0; i < NR; i++) {
                const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, q + i * stride + k)));
                for (int64_t r = 0; r < R; r++)
                    even[i][r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + r * K + k), even[i][r]);
            }
        }
        for (int64_t i = 0; i < NR; i++) {
            const __m512 scale = _mm512_set1_ps(lb_stat(a, i * G + g, stats));
            for (int64_t r = 0; r < R; r++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_add_ps(even[i][r], odd[i][r]), scale, acc[i][r]);
        }
    }
    LB_STORE(acc);
}

/* 16 weights of a float row from element `at` (lanes past `lanes` read as 0), widened to float32. */
LB_INLINE __m512 lb_floats16(const void *w, int64_t at, int64_t kind, __mmask16 lanes) {
    if (kind == LB_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)w + at));
    if (kind == LB_BF16)     /* a bfloat16 is the top 16 bits of its float32 */
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)w + at)), 16));
    return _mm512_maskz_loadu_ps(lanes, (const float *)w + at);
}

/* A tile of a float weight stored as `kind` (q points at its elements, `stride` counts elements). */
LB_INLINE void tile_float(LB_TILE_ARGS, int64_t kind) {
    __m512 acc[4][4], odd[4][4];
    LB_ZERO(acc);
    LB_ZERO(odd);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)      /* two sums per dot product: 8 FMA chains in flight at a 4-row tile */
        for (int64_t i = 0; i < NR; i++) {
            const __m512 v0 = lb_floats16(q, i * stride + k, kind, (__mmask16)0xFFFF);
            const __m512 v1 = lb_floats16(q, i * stride + k + 16, kind, (__mmask16)0xFFFF);
            for (int64_t r = 0; r < R; r++) {
                acc[i][r] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + r * K + k), acc[i][r]);
                odd[i][r] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + r * K + k + 16), odd[i][r]);
            }
        }
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) acc[i][r] = _mm512_add_ps(acc[i][r], odd[i][r]);
    for (; k + 16 <= K; k += 16)
        for (int64_t i = 0; i < NR; i++) {
            const __m512 v = lb_floats16(q, i * stride + k, kind, (__mmask16)0xFFFF);
            for (int64_t r = 0; r < R; r++) acc[i][r] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + r * K + k), acc[i][r]);
        }
    if (k < K) {
        const __mmask16 lanes = (__mmask16)((1u << (K - k)) - 1u);
        for (int64_t i = 0; i < NR; i++) {
            const __m512 v = lb_floats16(q, i * stride + k, kind, lanes);
            for (int64_t r = 0; r < R; r++)
                acc[i][r] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(lanes, x + r * K + k), acc[i][r]);
        }
    }
    LB_STORE(acc);
    (void)a; (void)stats; (void)table; (void)G; (void)group;
}

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA (8 float lanes; machines without AVX-512, e.g. AMD Zen 2/3): the same tiles as above. Per group,
 * two partial sums per (weight row, activation row) (one for each 8-column half of a 16-column step, so 8
 * independent FMA chains are in flight at the usual 4-row tile), scaled by the group's a at the group's end.
 * Columns past the last multiple of 8 in a group (ragged widths such as 172) are summed in scalar code. */
#define LB_ZERO(v) for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) v[i][r] = _mm256_setzero_ps()

/* The low 8 bytes of `bytes` (codes < 16 with a table) as 8 floats: the integers, or table[code] (two 8-entry
 * permutes and a blend on bit 3). */
LB_INLINE __m256 lb_codes8(__m128i bytes, const float *table, __m256 t0, __m256 t1) {
    const __m256i v = _mm256_cvtepu8_epi32(bytes);
    if (!table) return _mm256_cvtepi32_ps(v);
    const __m256 lo = _mm256_permutevar8x32_ps(t0, v), hi = _mm256_permutevar8x32_ps(t1, v);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
}

LB_INLINE void tile_nib(LB_TILE_ARGS) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m256 t0 = table ? _mm256_loadu_ps(table) : _mm256_setzero_ps();
    const __m256 t1 = table ? _mm256_loadu_ps(table + 8) : _mm256_setzero_ps();
    __m256 acc[4][4];
    LB_ZERO(acc);
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group, k1 = lb_min(k0 + group, K);
        __m256 even[4][4], odd[4][4];
        LB_ZERO(even);
        LB_ZERO(odd);
        /* 16 columns a step: one half of a 32-column chunk (low nibbles, then high ones); groups are 16 or
         * multiples of 32 columns, so they never split a half */
        for (int64_t k = k0; k < k1; k += 16) {
            const int64_t at = (k / 32) * 16;
            const int high = (k & 16) != 0;
            for (int64_t i = 0; i < NR; i++) {
                __m128i v = _mm_loadu_si128((const __m128i *)(q + i * stride + at));
                v = _mm_and_si128(high ? _mm_srli_epi16(v, 4) : v, low);
                const __m256 w0 = lb_codes8(v, table, t0, t1), w1 = lb_codes8(_mm_unpackhi_epi64(v, v), table, t0, t1);
                for (int64_t r = 0; r < R; r++) {
                    even[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), even[i][r]);
                    odd[i][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), odd[i][r]);
                }
            }
        }
        for (int64_t i = 0; i < NR; i++) {
            const __m256 scale = _mm256_set1_ps(lb_stat(a, i * G + g, stats));
            for (int64_t r = 0; r < R; r++)
                acc[i][r] = _mm256_fmadd_ps(_mm256_add_ps(even[i][r], odd[i][r]), scale, acc[i][r]);
        }
    }
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) out[i][r] = lb_hsum256(acc[i][r]);
}

LB_INLINE void tile_u8(LB_TILE_ARGS) {
    (void)table;
    __m256 acc[4][4];
    float tail[4][4] = {{0.0f}};
    LB_ZERO(acc);
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group, k1 = lb_min(k0 + group, K);
        __m256 even[4][4], odd[4][4];
        LB_ZERO(even);
        LB_ZERO(odd);
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16)
            for (int64_t i = 0; i < NR; i++) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(q + i * stride + k));
                const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v)));
                for (int64_t r = 0; r < R; r++) {
                    even[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), even[i][r]);
                    odd[i][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), odd[i][r]);
                }
            }
        for (; k + 8 <= k1; k += 8)
            for (int64_t i = 0; i < NR; i++) {
                const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i * stride + k))));
                for (int64_t r = 0; r < R; r++) even[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), even[i][r]);
            }
        for (int64_t i = 0; i < NR; i++) {
            const float s = lb_stat(a, i * G + g, stats);
            const __m256 scale = _mm256_set1_ps(s);
            for (int64_t r = 0; r < R; r++) {
                acc[i][r] = _mm256_fmadd_ps(_mm256_add_ps(even[i][r], odd[i][r]), scale, acc[i][r]);
                float part = 0.0f;
                for (int64_t kk = k; kk < k1; kk++) part += (float)q[i * stride + kk] * x[r * K + kk];
                tail[i][r] += s * part;
            }
        }
    }
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) out[i][r] = lb_hsum256(acc[i][r]) + tail[i][r];
}

/* 8 weights of a float row from element `at`, widened to float32. */
LB_INLINE __m256 lb_floats8(const void *w, int64_t at, int64_t kind) {
    if (kind == LB_F32) return _mm256_loadu_ps((const float *)w + at);
    const __m128i halves = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + at));
    if (kind == LB_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
#if defined(__F16C__)
    return _mm256_cvtph_ps(halves);
#else
    float values[8];
    for (int j = 0; j < 8; j++) values[j] = lb_half(((const uint16_t *)w)[at + j]);
    return _mm256_loadu_ps(values);
#endif
}

/* A tile of a float weight stored as `kind` (q points at its elements, `stride` counts elements). */
LB_INLINE void tile_float(LB_TILE_ARGS, int64_t kind) {
    __m256 acc[4][4], odd[4][4];
    LB_ZERO(acc);
    LB_ZERO(odd);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int64_t i = 0; i < NR; i++) {
            const __m256 v0 = lb_floats8(q, i * stride + k, kind), v1 = lb_floats8(q, i * stride + k + 8, kind);
            for (int64_t r = 0; r < R; r++) {
                acc[i][r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + r * K + k), acc[i][r]);
                odd[i][r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + r * K + k + 8), odd[i][r]);
            }
        }
    for (int64_t i = 0; i < NR; i++)
        for (int64_t r = 0; r < R; r++) {
            float s = lb_hsum256(_mm256_add_ps(acc[i][r], odd[i][r]));
            for (int64_t kk = k; kk < K; kk++) s += lb_float_at(q, i * stride + kk, kind) * x[r * K + kk];
            out[i][r] = s;
        }
    (void)a; (void)stats; (void)table; (void)G; (void)group;
}
#undef LB_ZERO

#else   /* portable loops; the compiler vectorises them for whatever the machine has */

LB_INLINE uint8_t lb_code(const uint8_t *q, int64_t k, int nibbles) {
    if (!nibbles) return q[k];
    const int64_t c = k & ~(int64_t)31, j = k - c;
    const uint8_t byte = q[c / 2 + (j & 15)];
    return j < 16 ? byte & 0xF : byte >> 4;
}

LB_INLINE void tile_codes(LB_TILE_ARGS, int nibbles) {
    for (int64_t i = 0; i < NR; i++)
        for (int64_t r = 0; r < R; r++) {
            float total = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                const int64_t k1 = lb_min(g * group + group, K);
                float part = 0.0f;
                for (int64_t k = g * group; k < k1; k++) {
                    const uint8_t code = lb_code(q + i * stride, k, nibbles);
                    part += (table ? table[code] : (float)code) * x[r * K + k];
                }
                total += lb_stat(a, i * G + g, stats) * part;
            }
            out[i][r] = total;
        }
}
LB_INLINE void tile_nib(LB_TILE_ARGS) { tile_codes(x, R, q, stride, a, stats, table, NR, K, G, group, out, 1); }
LB_INLINE void tile_u8(LB_TILE_ARGS) { tile_codes(x, R, q, stride, a, stats, NULL, NR, K, G, group, out, 0); (void)table; }
LB_INLINE void tile_float(LB_TILE_ARGS, int64_t kind) {
    for (int64_t i = 0; i < NR; i++)
        for (int64_t r = 0; r < R; r++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += lb_float_at(q, i * stride + k, kind) * x[r * K + k];
            out[i][r] = s;
        }
    (void)a; (void)stats; (void)table; (void)G; (void)group;
}
#endif

/* -- int8 activations (AVX-512 VNNI) ---------------------------------------------------------------------------
 * Optional (`act8`): activations are rounded to int8 per 32 columns (scale = absmax / 127, as llama.cpp's Q8_0),
 * and 4-bit codes meet them in vpdpbusd, 64 multiply-adds per instruction instead of 16 float ones. This is
 * llama.cpp's arithmetic; the float32 path stays the default because it matches a float matmul of the
 * dequantized weight to rounding. Activation rows are laid out per 128 columns as the LB_NIB bytes are: the
 * low-nibble columns (0-15 of each of 4 chunks) in 64 bytes, then the high-nibble ones. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LB_HAVE_ACT8 1
#define LB_ACT8_NIBBLE_ORDER 1   /* vpdpbusd tiles read activations in LB_NIB's byte order */
#elif defined(__AVX2__) && defined(__FMA__)
#define LB_HAVE_ACT8 1
#define LB_ACT8_NIBBLE_ORDER 0   /* AVX2 tiles widen the 16 code bytes of a chunk to 32 columns in natural order */
#else
#define LB_HAVE_ACT8 0
#define LB_ACT8_NIBBLE_ORDER 0
#endif

static inline int64_t lb_act8_blocks(int64_t K) { return (K + 127) / 128; }

/* Floats of per-thread scratch lb_matmul needs for M rows (group sums, and int8 activations with their scales). */
static inline int64_t lb_scratch_floats(int64_t K, int64_t G, int64_t M) {
    const int64_t affine = M * (G + K + lb_act8_blocks(K) * (32 + 128 / 4 + 128)), blocks = lb_ggml_scratch_floats(K, M);
    return affine > blocks ? affine : blocks;
}

/* x [M, K] (K % 32 == 0) -> x8 [M, blocks * 128] and lane scales sx [M, blocks * 32]; columns past K are zero.
 * `nibble_order`: each 128 columns as LB_NIB reads them (low-nibble columns of 4 chunks, then high-nibble ones),
 * sx holding chunk c's scale in lanes 4c..4c+3 of one 16-lane vector per block (vpdpbusd sums 4 bytes a lane);
 * else natural order, one 16-lane vector per 64 columns, chunk scales in lanes 0-7 and 8-15.
 * `rounded` [M, K] gets the activations the int8 values stand for: the b * xsum term must sum those, or the
 * rounding error of sum(x) times b (large for codes stored with an offset, as Q8_0's q + 128) stays in y. */
static inline void quantize_act8(const float *x, int64_t M, int64_t K, int8_t *x8, float *sx, float *rounded,
                                 int nibble_order) {
    const int64_t blocks = lb_act8_blocks(K);
    for (int64_t r = 0; r < M; r++)
        for (int64_t chunk = 0; chunk < blocks * 4; chunk++) {
            const int64_t col = chunk * 32, s = chunk / 4, c = chunk % 4;
            float top = 0.0f;
            if (col < K)
                for (int64_t j = 0; j < 32; j++) {
                    const float v = x[r * K + col + j] < 0 ? -x[r * K + col + j] : x[r * K + col + j];
                    if (v > top) top = v;
                }
            const float d = top / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t *row = x8 + r * blocks * 128;
            float *scales = sx + r * blocks * 32;
            for (int64_t j = 0; j < 32; j++) {
                const int8_t v = col < K ? (int8_t)__builtin_lrintf(x[r * K + col + j] * inv) : 0;
                if (col < K) rounded[r * K + col + j] = (float)v * d;
                if (nibble_order) row[s * 128 + (j < 16 ? c * 16 + j : 64 + c * 16 + j - 16)] = v;
                else row[col + j] = v;
            }
            if (nibble_order) for (int64_t l = 0; l < 4; l++) scales[s * 16 + c * 4 + l] = d;
            else for (int64_t l = 0; l < 8; l++) scales[(chunk / 2) * 16 + (chunk % 2) * 8 + l] = d;
        }
}

#if LB_HAVE_ACT8 && LB_ACT8_NIBBLE_ORDER   /* AVX-512 VNNI */
/* tile_nib with int8 activations (group % 32 == 0). */
LB_INLINE void tile_nib_act8(const int8_t *x8, const float *sx, int64_t R, const uint8_t *q, int64_t stride,
                             const void *a, int64_t stats, int64_t NR, int64_t K, int64_t G, int64_t group,
                             float out[4][4]) {
    const int64_t blocks = lb_act8_blocks(K);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i lane_chunk = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[4][4];
    LB_ZERO(acc);
    for (int64_t s = 0; s < blocks; s++) {
        const int64_t chunks = lb_min(4, (K - s * 128) / 32);
        const __mmask64 bytes = chunks == 4 ? ~(__mmask64)0 : ((__mmask64)1 << (chunks * 16)) - 1;
        __m512 sxv[4];
        for (int64_t r = 0; r < R; r++) sxv[r] = _mm512_loadu_ps(sx + r * blocks * 32 + s * 16);
        for (int64_t i = 0; i < NR; i++) {
            const __m512i v = _mm512_maskz_loadu_epi8(bytes, q + i * stride + s * 64);
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            /* a of each 32-column chunk, in the lanes that chunk's sums land in */
            __m512 scale;
            const __mmask8 present = (__mmask8)((1u << chunks) - 1);
            if (group % 128 == 0)
                scale = _mm512_set1_ps(lb_stat(a, i * G + s * 128 / group, stats));
            else if (group == 64)
                scale = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(lb_stat(a, i * G + 2 * s, stats)),
                                             _mm512_set1_ps(chunks > 2 ? lb_stat(a, i * G + 2 * s + 1, stats) : 0.0f));
            else {
                __m128 a4;
                if (group == 32 && lb_stats_f32(stats))
                    a4 = _mm_maskz_loadu_ps(present, (const float *)a + i * G + s * 4);
                else if (group == 32)
                    a4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(present, (const uint16_t *)a + i * G + s * 4));
                else {
                    float av[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    for (int64_t c = 0; c < chunks; c++) av[c] = lb_stat(a, i * G + (s * 128 + c * 32) / group, stats);
                    a4 = _mm_loadu_ps(av);
                }
                scale = _mm512_permutexvar_ps(lane_chunk, _mm512_castps128_ps512(a4));
            }
            for (int64_t r = 0; r < R; r++) {
                const int8_t *xr = x8 + r * blocks * 128 + s * 128;
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr));
                dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xr + 64));
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, sxv[r]), acc[i][r]);
            }
        }
    }
    LB_STORE(acc);
}

/* tile_u8 with int8 activations (group % 32 == 0; codes up to 255 meet signed activations in vpdpbusd). */
LB_INLINE void tile_u8_act8(const int8_t *x8, const float *sx, int64_t R, const uint8_t *q, int64_t stride,
                            const void *a, int64_t stats, int64_t NR, int64_t K, int64_t G, int64_t group,
                            float out[4][4]) {
    const int64_t blocks = lb_act8_blocks(K);
    __m512 acc[4][4];
    LB_ZERO(acc);
    for (int64_t t = 0; t * 64 < K; t++) {
        const int64_t cols = lb_min(64, K - t * 64);
        const __mmask64 bytes = cols == 64 ? ~(__mmask64)0 : ((__mmask64)1 << cols) - 1;
        __m512 sxv[4];
        for (int64_t r = 0; r < R; r++) sxv[r] = _mm512_loadu_ps(sx + r * blocks * 32 + t * 16);
        for (int64_t i = 0; i < NR; i++) {
            const __m512i v = _mm512_maskz_loadu_epi8(bytes, q + i * stride + t * 64);
            const float a0 = lb_stat(a, i * G + (t * 64) / group, stats);
            const float a1 = cols > 32 ? lb_stat(a, i * G + (t * 64 + 32) / group, stats) : 0.0f;
            const __m512 scale = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(a0), _mm512_set1_ps(a1));
            for (int64_t r = 0; r < R; r++) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v,
                                                        _mm512_loadu_si512(x8 + r * blocks * 128 + t * 64));
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, sxv[r]), acc[i][r]);
            }
        }
    }
    LB_STORE(acc);
}
#elif LB_HAVE_ACT8   /* AVX2: no VNNI; vpmaddubsw (u8 x s8 -> pairs of s16) and vpmaddwd (s16 pairs -> s32) */
/* out = sum over 32-column chunks c of a[group of c] * sx[c] * dot(q[c], x8[c]) for codes < 16 (LB_NIB). The 16 code
 * bytes of a chunk hold columns j (low nibble) and 16 + j (high), so [low nibbles | high nibbles] is the chunk's
 * 32 columns in order; 15 * 128 * 2 cannot saturate the s16 pairs. */
LB_INLINE void tile_nib_act8(const int8_t *x8, const float *sx, int64_t R, const uint8_t *q, int64_t stride,
                             const void *a, int64_t stats, int64_t NR, int64_t K, int64_t G, int64_t group,
                             float out[4][4]) {
    const int64_t blocks = lb_act8_blocks(K);
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / 32; c++) {
        const int64_t g = c * 32 / group, scale_at = (c / 2) * 16 + (c % 2) * 8;
        for (int64_t i = 0; i < NR; i++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(q + i * stride + c * 16));
            const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
            const float ai = lb_stat(a, i * G + g, stats);
            for (int64_t r = 0; r < R; r++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x8 + r * blocks * 128 + c * 32));
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones);
                acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ai * sx[r * blocks * 32 + scale_at]),
                                            acc[i][r]);
            }
        }
    }
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) out[i][r] = lb_hsum256(acc[i][r]);
}

/* The same for one code per byte (up to 255: widened to s16 and multiplied in vpmaddwd, which cannot overflow). */
LB_INLINE void tile_u8_act8(const int8_t *x8, const float *sx, int64_t R, const uint8_t *q, int64_t stride,
                            const void *a, int64_t stats, int64_t NR, int64_t K, int64_t G, int64_t group,
                            float out[4][4]) {
    const int64_t blocks = lb_act8_blocks(K);
    __m256 acc[4][4];
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / 32; c++) {
        const int64_t g = c * 32 / group, scale_at = (c / 2) * 16 + (c % 2) * 8;
        for (int64_t i = 0; i < NR; i++) {
            const uint8_t *qc = q + i * stride + c * 32;
            const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qc));
            const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qc + 16)));
            const float ai = lb_stat(a, i * G + g, stats);
            for (int64_t r = 0; r < R; r++) {
                const int8_t *xc = x8 + r * blocks * 128 + c * 32;
                const __m256i dot = _mm256_add_epi32(
                    _mm256_madd_epi16(w0, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)xc))),
                    _mm256_madd_epi16(w1, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xc + 16)))));
                acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ai * sx[r * blocks * 32 + scale_at]),
                                            acc[i][r]);
            }
        }
    }
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) out[i][r] = lb_hsum256(acc[i][r]);
}
#endif

/* The dot products out[i][r] of weight rows n0..n0+NR-1 and activation rows m0..m0+R-1, written (or added) into
 * y [M, N] with the b * xsum term and the bias. */
LB_INLINE void lb_tile_store(const lb_linear *L, float out[4][4], const float *xsum, int64_t m0, int64_t R, int64_t n0,
                             int64_t NR, float *y, int64_t ldy, int accumulate) {
    const int64_t G = L->groups, stats = L->stats;
    const size_t stat_bytes = lb_stats_f32(stats) ? 4 : 2;
    for (int64_t i = 0; i < NR; i++) {
        const int64_t n = n0 + i;
        for (int64_t r = 0; r < R; r++) {
            float value = out[i][r] + (L->bias ? L->bias[n] : 0.0f);
            if (!lb_is_float(L->kind)) {
                const size_t at = (size_t)(n * G) * stat_bytes;
                if (lb_stats_offset(stats))
                    value += L->offset * lb_stat_dot((const char *)L->a + at, stats, xsum + (m0 + r) * G, G);
                else
                    value += lb_stat_dot((const char *)L->b + at, stats, xsum + (m0 + r) * G, G);
            }
            float *target = y + (m0 + r) * ldy + n;
            *target = accumulate ? *target + value : value;
        }
    }
}

/* Weight rows n0..n0+NR-1 against activation rows m0..m0+R-1, written (or added) into y [M, N] with the
 * b * xsum term and the bias. */
LB_INLINE void lb_tile(const lb_linear *L, const float *x, const float *xsum, const int8_t *x8, const float *sx,
                       int64_t m0, int64_t R, int64_t n0, int64_t NR, float *y, int64_t ldy, int accumulate) {
    const int64_t K = L->k, G = L->groups, stats = L->stats;
    const size_t stat_bytes = lb_stats_f32(stats) ? 4 : 2;
    const void *a = (const char *)L->a + n0 * G * stat_bytes;
    float out[4][4];
#if LB_HAVE_ACT8
    const int64_t blocks = lb_act8_blocks(K);
    if (x8 != NULL && L->kind == LB_NIB)
        tile_nib_act8(x8 + m0 * blocks * 128, sx + m0 * blocks * 32, R, (const uint8_t *)L->w + n0 * (K / 2), K / 2,
                      a, stats, NR, K, G, L->group, out);
    else if (x8 != NULL)
        tile_u8_act8(x8 + m0 * blocks * 128, sx + m0 * blocks * 32, R, (const uint8_t *)L->w + n0 * K, K, a, stats,
                     NR, K, G, L->group, out);
    else
#else
    (void)x8; (void)sx;
#endif
    if (L->kind == LB_NIB)
        tile_nib(x + m0 * K, R, (const uint8_t *)L->w + n0 * (K / 2), K / 2, a, stats, L->table, NR, K, G, L->group,
                 out);
    else if (L->kind == LB_U8)
        tile_u8(x + m0 * K, R, (const uint8_t *)L->w + n0 * K, K, a, stats, NULL, NR, K, G, L->group, out);
    else if (L->kind == LB_F32)   /* one call per kind: each inlines its own loads */
        tile_float(x + m0 * K, R, (const uint8_t *)L->w + n0 * K * 4, K, NULL, 0, NULL, NR, K, 0, 0, out, LB_F32);
    else if (L->kind == LB_F16)
        tile_float(x + m0 * K, R, (const uint8_t *)L->w + n0 * K * 2, K, NULL, 0, NULL, NR, K, 0, 0, out, LB_F16);
    else
        tile_float(x + m0 * K, R, (const uint8_t *)L->w + n0 * K * 2, K, NULL, 0, NULL, NR, K, 0, 0, out, LB_BF16);
    lb_tile_store(L, out, xsum, m0, R, n0, NR, y, ldy, accumulate);
}

/* -- many activation rows, float32 -------------------------------------------------------------------------------
 * Continuous batching's step multiplies every weight by M rows at once. The tiles above widen the codes of a block
 * of four weight rows again for every 4 activation rows, and those conversions share the FMA ports with the dot
 * products. From LB_GEMM_ROWS rows (AVX-512 builds) a block's codes are widened once into floats (the integers, or
 * their codebook values: the very vectors tile_nib and tile_u8 multiply) in the thread's scratch, and register tiles
 * of 4 weight rows x 2 activation rows read them. Each dot product is the same sequence of float operations as in
 * tile_nib / tile_u8 (per group: two partial sums over 32-column steps, 16-column tail steps into the first, then
 * acc += (even + odd) * a, one reduction at the end), so y is bit for bit what the per-row tiles give, for any M. */
#if defined(__AVX512F__)
#define LB_GEMM_ROWS 8
#define LB_HAVE_GEMM 1

/* Floats of scratch the decoded block takes (four weight rows of K columns). */
static inline int64_t lb_gemm_floats(int64_t K) { return 4 * K; }

/* Whether lb_matmul takes the decoded-block path for M rows of `L` (float32 activations, integer or codebook codes
 * whose tiles sum per group as tile_decoded does: LB_U8, and LB_NIB with groups of 32 columns or more). */
static inline int lb_gemm_fits(const lb_linear *L, int64_t M, int act8) {
    return M >= LB_GEMM_ROWS && !act8 && ((L->kind == LB_NIB && L->group % 32 == 0) || L->kind == LB_U8);
}

/* The codes of weight rows n0..n0+nr-1 as floats into w [nr, K], column k at w[i * K + k]. */
static inline void lb_decode_codes(const lb_linear *L, int64_t n0, int64_t nr, float *w) {
    const int64_t K = L->k;
    if (L->kind == LB_NIB) {
        const __m512i low = _mm512_set1_epi32(0xF);
        const __m512 values = L->table ? _mm512_loadu_ps(L->table) : _mm512_setzero_ps();
        for (int64_t i = 0; i < nr; i++) {
            const uint8_t *q = (const uint8_t *)L->w + (n0 + i) * (K / 2);
            for (int64_t k = 0; k < K; k += 32) {        /* byte j of a chunk: column j low, column 16 + j high */
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
                const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_srli_epi32(v, 4);
                _mm512_storeu_ps(w + i * K + k, L->table ? _mm512_permutexvar_ps(lo, values) : _mm512_cvtepi32_ps(lo));
                _mm512_storeu_ps(w + i * K + k + 16,
                                 L->table ? _mm512_permutexvar_ps(hi, values) : _mm512_cvtepi32_ps(hi));
            }
        }
        return;
    }
    for (int64_t i = 0; i < nr; i++) {
        const uint8_t *q = (const uint8_t *)L->w + (n0 + i) * K;
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 lanes = (__mmask16)(K - k >= 16 ? 0xFFFFu : (1u << (K - k)) - 1u);
            _mm512_mask_storeu_ps(w + i * K + k, lanes,
                                  _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, q + k))));
        }
    }
}

/* out[i][r] = sum_g a[i,g] * dot(w[i, g], x[r, g]) for decoded weight rows w [NR, K] (tile_nib / tile_u8's sums). */
LB_INLINE void tile_decoded(const float *w, const float *x, int64_t R, const void *a, int64_t stats, int64_t NR,
                            int64_t K, int64_t G, int64_t group, float out[4][4]) {
    __m512 acc[4][2];
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group, k1 = lb_min(k0 + group, K);
        __m512 even[4][2], odd[4][2];
        for (int64_t i = 0; i < NR; i++)
            for (int64_t r = 0; r < R; r++) even[i][r] = _mm512_setzero_ps(), odd[i][r] = _mm512_setzero_ps();
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) {
            __m512 x0[2], x1[2];
            for (int64_t r = 0; r < R; r++) x0[r] = _mm512_loadu_ps(x + r * K + k), x1[r] = _mm512_loadu_ps(x + r * K + k + 16);
            for (int64_t i = 0; i < NR; i++) {
                const __m512 w0 = _mm512_loadu_ps(w + i * K + k), w1 = _mm512_loadu_ps(w + i * K + k + 16);
                for (int64_t r = 0; r < R; r++) {
                    even[i][r] = _mm512_fmadd_ps(w0, x0[r], even[i][r]);
                    odd[i][r] = _mm512_fmadd_ps(w1, x1[r], odd[i][r]);
                }
            }
        }
        for (; k < k1; k += 16) {
            const __mmask16 lanes = (__mmask16)(k1 - k >= 16 ? 0xFFFFu : (1u << (k1 - k)) - 1u);
            for (int64_t i = 0; i < NR; i++) {
                const __m512 v = _mm512_maskz_loadu_ps(lanes, w + i * K + k);
                for (int64_t r = 0; r < R; r++)
                    even[i][r] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(lanes, x + r * K + k), even[i][r]);
            }
        }
        for (int64_t i = 0; i < NR; i++) {
            const __m512 scale = _mm512_set1_ps(lb_stat(a, i * G + g, stats));
            for (int64_t r = 0; r < R; r++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_add_ps(even[i][r], odd[i][r]), scale, acc[i][r]);
        }
    }
    for (int64_t i = 0; i < NR; i++) for (int64_t r = 0; r < R; r++) out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

/* Output rows n0..n0+nr-1 (nr <= 4) for all M activation rows through one decoded copy of their codes in w. */
static inline void lb_block_decoded(const lb_linear *L, const float *x, int64_t M, float *y, int64_t ldy,
                                    int accumulate, const float *xsum, int64_t n0, int64_t nr, float *w) {
    const int64_t K = L->k, G = L->groups, group = L->group, stats = L->stats;
    const void *a = (const char *)L->a + n0 * G * (lb_stats_f32(stats) ? 4 : 2);
    float out[4][4];
    lb_decode_codes(L, n0, nr, w);
    if (nr == 4) {              /* constant tile shapes: every sum in a register */
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) {
            tile_decoded(w, x + m * K, 2, a, stats, 4, K, G, group, out);
            lb_tile_store(L, out, xsum, m, 2, n0, 4, y, ldy, accumulate);
        }
        if (m < M) {
            tile_decoded(w, x + m * K, 1, a, stats, 4, K, G, group, out);
            lb_tile_store(L, out, xsum, m, 1, n0, 4, y, ldy, accumulate);
        }
        return;
    }
    for (int64_t i = 0; i < nr; i++) {
        const void *ai = (const char *)a + i * G * (lb_stats_f32(stats) ? 4 : 2);
        for (int64_t m = 0; m < M; m++) {
            tile_decoded(w + i * K, x + m * K, 1, ai, stats, 1, K, G, group, out);
            lb_tile_store(L, out, xsum, m, 1, n0 + i, 1, y, ldy, accumulate);
        }
    }
}
#else
#define LB_HAVE_GEMM 0
static inline int64_t lb_gemm_floats(int64_t K) { (void)K; return 0; }
static inline int lb_gemm_fits(const lb_linear *L, int64_t M, int act8) { (void)L; (void)M; (void)act8; return 0; }
static inline void lb_block_decoded(const lb_linear *L, const float *x, int64_t M, float *y, int64_t ldy,
                                    int accumulate, const float *xsum, int64_t n0, int64_t nr, float *w) {
    (void)L; (void)x; (void)M; (void)y; (void)ldy; (void)accumulate; (void)xsum; (void)n0; (void)nr; (void)w;
}
#endif

/* The tiles of block `block` (output rows 4*block .. 4*block+3) for all M activation rows. */
LB_INLINE void lb_block(const lb_linear *L, const float *x, int64_t M, float *y, int64_t ldy, int accumulate,
                        const float *xsum, const int8_t *x8, const float *sx, int64_t block, float *decoded) {
    const int64_t n0 = block * 4, nr = lb_min(4, L->n - n0);
    /* Ask for the codes and statistics two blocks ahead: measured 20% faster decoding than leaving it to the
     * hardware prefetcher (which sees several interleaved streams); further ahead was slower. */
    if (n0 + 4 * LB_PREFETCH < L->n && L->kind != LB_F32) {
        const char *next = (const char *)L->w + (n0 + 4 * LB_PREFETCH) * lb_row_bytes(L);
        for (int64_t off = 0; off < 4 * lb_row_bytes(L); off += 64) __builtin_prefetch(next + off, 0, 3);
    }
    if (n0 + 4 * LB_PREFETCH < L->n && !lb_is_float(L->kind)) {
        const int64_t stat_bytes = lb_stats_f32(L->stats) ? 4 : 2;
        const char *stats = (const char *)L->a + (n0 + 4 * LB_PREFETCH) * L->groups * stat_bytes;
        for (int64_t off = 0; off < 4 * L->groups * stat_bytes; off += 64) __builtin_prefetch(stats + off, 0, 3);
    }
    if (decoded) {                       /* many rows: the block's codes widened once (see lb_block_decoded) */
        lb_block_decoded(L, x, M, y, ldy, accumulate, xsum, n0, nr, decoded);
        return;
    }
    for (int64_t m = 0; m < M; m += 4) {
        const int64_t rows = lb_min(4, M - m);
        /* tiles of at most 4 dot products, with constant shapes so every sum stays in a register */
        if (rows == 1 && nr == 4) lb_tile(L, x, xsum, x8, sx, m, 1, n0, 4, y, ldy, accumulate);
        else if (rows == 2 && nr == 4) {
            lb_tile(L, x, xsum, x8, sx, m, 2, n0, 2, y, ldy, accumulate);
            lb_tile(L, x, xsum, x8, sx, m, 2, n0 + 2, 2, y, ldy, accumulate);
        } else
            for (int64_t i = 0; i < nr; i++) switch (rows) {
                case 1: lb_tile(L, x, xsum, x8, sx, m, 1, n0 + i, 1, y, ldy, accumulate); break;
                case 2: lb_tile(L, x, xsum, x8, sx, m, 2, n0 + i, 1, y, ldy, accumulate); break;
                case 3: lb_tile(L, x, xsum, x8, sx, m, 3, n0 + i, 1, y, ldy, accumulate); break;
                default: lb_tile(L, x, xsum, x8, sx, m, 4, n0 + i, 1, y, ldy, accumulate); break;
            }
    }
}

/* Whether lb_matmul rounds the activations of weight `L` to int8 under `activations` (LB_ACTS_*): GGUF blocks
 * always can (ggml_blocks.h, every build); lowbit's integer codes where this build has the act8 tiles and the
 * layout suits them (no codebook, groups and width multiples of 32). */
static inline int lb_uses_act8(const lb_linear *L, int activations) {
    if (activations == LB_ACTS_FLOAT32) return 0;
    if (lb_is_ggml(L->kind)) return 1;
    return activations == LB_ACTS_INT8 && LB_HAVE_ACT8 && !lb_is_float(L->kind) && !L->table && L->group % 32 == 0
           && L->k % 32 == 0;
}

/* Output rows of L that one iteration of lb_matmul's shared loop computes: its `omp for schedule(static)` runs over
 * ceil(n / rows) iterations, so a later loop with the same count and schedule gives every thread the rows it
 * computed itself (OpenMP assigns static iterations alike in both), and it may read them without a barrier. */
static inline int64_t lb_matmul_rows_per_item(const lb_linear *L) { return lb_is_ggml(L->kind) ? 16 : 4; }

/* y[M, :n] (= or +=) x[M, K] W^T + bias, y's rows `ldy` floats apart, with `scratch` of lb_scratch_floats
 * floats for this thread; `activations` (LB_ACTS_*): int8 activations where it and the layout allow (see above).
 * Call it from every thread of an OpenMP team: blocks of four output rows are shared out (orphaned `omp for`).
 * `wait`: end with a barrier; without one a thread goes straight on to other work that does not read y (e.g. the
 * next of several matmuls reading the same x). `prepared`: x's prepared form is in this thread's scratch already,
 * left by the previous lb_matmul of this thread on the same x and M, of a weight `lb_prepared_alike` to L. */
static inline void lb_matmul_prepared(const lb_linear *L, const float *x, int64_t M, float *y, int64_t ldy,
                                      int accumulate, float *scratch, int activations, int wait, int prepared) {
    const int act8 = lb_uses_act8(L, activations);
    if (lb_is_ggml(L->kind)) {           /* read as the file stores it (its own act8 arithmetic on every build) */
        lb_ggml_matmul(L, x, M, y, ldy, accumulate, scratch, act8, wait, prepared);
        return;
    }
    const int64_t blocks = (L->n + 3) / 4;
    float *xsum = scratch, *sx = NULL;
    int8_t *x8 = NULL;
    if (L->perm) {                       /* gather the columns in the weight's order (per thread) */
        float *gathered = scratch + M * L->groups;
        for (int64_t r = 0; r < M; r++)
            for (int64_t j = 0; j < L->k; j++) gathered[r * L->k + j] = x[r * L->k + L->perm[j]];
        x = gathered;
        scratch += M * L->k;
    }
    /* per thread, into its own scratch: no barrier */
    if (act8) {
        sx = scratch + M * L->groups;   /* (after the gathered copy, if any) */
        x8 = (int8_t *)(sx + M * lb_act8_blocks(L->k) * 32);
        float *rounded = (float *)(x8 + M * lb_act8_blocks(L->k) * 128);
        quantize_act8(x, M, L->k, x8, sx, rounded, L->kind == LB_NIB && LB_ACT8_NIBBLE_ORDER);
        group_sums(rounded, M, L->k, L->groups, L->group, xsum);
    } else if (!lb_is_float(L->kind))
        group_sums(x, M, L->k, L->groups, L->group, xsum);
    /* many rows: a block's widened codes after the group sums (and the gathered copy); lb_scratch_floats covers
       them from LB_GEMM_ROWS rows (lb_gemm_floats(K) <= M * 192 * blocks) */
    float *decoded = lb_gemm_fits(L, M, act8) ? scratch + M * L->groups : NULL;
    if (wait) {    /* dynamically (lb_dynamic_chunk), as lb_ggml_matmul and for the same reason */
        #pragma omp for schedule(dynamic, lb_dynamic_chunk(4 * lb_row_bytes(L), blocks, M))
        for (int64_t block = 0; block < blocks; block++)
            lb_block(L, x, M, y, ldy, accumulate, xsum, x8, sx, block, decoded);
    } else {
        #pragma omp for schedule(static) nowait
        for (int64_t block = 0; block < blocks; block++)
            lb_block(L, x, M, y, ldy, accumulate, xsum, x8, sx, block, decoded);
    }
}

/* lb_matmul_prepared for an x not prepared yet. */
static inline void lb_matmul(const lb_linear *L, const float *x, int64_t M, float *y, int64_t ldy, int accumulate,
                             float *scratch, int activations, int wait) {
    lb_matmul_prepared(L, x, M, y, ldy, accumulate, scratch, activations, wait, 0);
}

/* Whether the form of M rows of x that lb_matmul of `previous` leaves in a thread's scratch is what `next` reads:
 * both GGUF blocks of the same width and block size, with the same arithmetic and the same many-row packing (the
 * parts of q|k|v and gate|up; the rows are rounded to int8 once instead of once per part). */
static inline int lb_prepared_alike(const lb_linear *previous, const lb_linear *next, int64_t M, int activations) {
    const int act8 = lb_uses_act8(next, activations);
    return lb_is_ggml(previous->kind) && lb_is_ggml(next->kind) && previous->k == next->k
           && lb_ggml_block(previous->kind) == lb_ggml_block(next->kind)
           && lb_uses_act8(previous, activations) == act8
           && lb_ggml_gemm_fits(previous->kind, M, act8) == lb_ggml_gemm_fits(next->kind, M, act8)
           && lb_ggml_amx_fits(previous->kind, M, act8) == lb_ggml_amx_fits(next->kind, M, act8);
}

#endif
