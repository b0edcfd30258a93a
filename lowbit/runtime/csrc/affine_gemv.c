/* y = x W^T for weights held as uint8 codes with an affine map per group: W[n,k] = a[n,g] * q[n,k] + b[n,g].
 *
 * Decoding is memory-bound, so this reads each weight as its 1-byte code (plus the group statistics) instead of
 * a dequantized float, and never materialises W. It serves every affine scheme whose codes torch's int4pack
 * cannot take (5..8-bit grids, GGUF Q5_0/Q5_1/Q8_0/Q3_K/Q6_K/Q2_K, any group size).
 *
 *   y[m,n] = sum_g a[n,g] * dot(x[m, g], q[n, g]) + b[n,g] * xsum[m,g],   xsum[m,g] = sum of x over group g.
 *
 * Rows n are split over OpenMP threads (the same libgomp runtime torch uses, so the pools do not fight), as
 * many as torch.get_num_threads() (passed in: OpenMP's own setting is per calling thread).
 * With AVX-512 the inner loop widens 16 codes to floats per step; without it a plain loop the compiler
 * vectorises for whatever the machine has.
 */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ROWS 4   /* activation rows sharing one pass over a weight row: codes are widened once for all */

/* out[r] = dot of weight row q (affine per group) with activation rows x[r*K...], r < rows <= ROWS. */
static inline __attribute__((always_inline)) void row_dots(const float *x, const float *xsum, int64_t rows, const uint8_t *q, const float *a,
                            const float *b, int64_t K, int64_t G, int64_t group, float *out) {
    float bias[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(__AVX512F__)
    __m512 acc[ROWS];
    for (int64_t r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group;
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        const __m512 scale = _mm512_set1_ps(a[g]);
        __m512 part[ROWS];
        for (int64_t r = 0; r < rows; r++) part[r] = _mm512_setzero_ps();
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
            for (int64_t r = 0; r < rows; r++)
                part[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * K + k), part[r]);
        }
        if (k < k1) {
            const __mmask16 lanes = (__mmask16)((1u << (k1 - k)) - 1u);
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, q + k)));
            for (int64_t r = 0; r < rows; r++)
                part[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + r * K + k), part[r]);
        }
        for (int64_t r = 0; r < rows; r++) {
            acc[r] = _mm512_fmadd_ps(part[r], scale, acc[r]);
            bias[r] += b[g] * xsum[r * G + g];
        }
    }
    for (int64_t r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc[r]) + bias[r];
#else
    float total[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group;
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        for (int64_t r = 0; r < rows; r++) {
            float part = 0.0f;
            for (int64_t k = k0; k < k1; k++) part += (float)q[k] * x[r * K + k];
            total[r] += a[g] * part;
            bias[r] += b[g] * xsum[r * G + g];
        }
    }
    for (int64_t r = 0; r < rows; r++) out[r] = total[r] + bias[r];
#endif
}

/* x [M,K] float32, xsum [M,G], codes [N,K] uint8, a/b [N,G] float32, y [M,N] float32 (all contiguous). */
void lowbit_affine_gemv_u8(const float *x, const float *xsum, int64_t M, int64_t K, const uint8_t *codes,
                           const float *a, const float *b, int64_t N, int64_t G, int64_t group, float *y,
                           int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += ROWS) {
            const int64_t rows = M - m < ROWS ? M - m : ROWS;
            float out[ROWS];
            const float *xm = x + m * K, *sm = xsum + m * G, *an = a + n * G, *bn = b + n * G;
            const uint8_t *qn = codes + n * K;
            /* constant row counts let the compiler keep every accumulator in a register */
            switch (rows) {
                case 1: row_dots(xm, sm, 1, qn, an, bn, K, G, group, out); break;
                case 2: row_dots(xm, sm, 2, qn, an, bn, K, G, group, out); break;
                case 3: row_dots(xm, sm, 3, qn, an, bn, K, G, group, out); break;
                default: row_dots(xm, sm, 4, qn, an, bn, K, G, group, out); break;
            }
            for (int64_t r = 0; r < rows; r++) y[(m + r) * N + n] = out[r];
        }
    }
}

int lowbit_kernel_has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* float32 -> bfloat16 bits, rounding to nearest even (what torch's .to(torch.bfloat16) does for finite values). */
static inline uint16_t to_bf16(float value) {
    union { float f; uint32_t u; } bits = { value };
    return (uint16_t)((bits.u + 0x7FFFu + ((bits.u >> 16) & 1u)) >> 16);
}

/* W[n,k] = a[n,g] * q[n,k] + b[n,g] into out [N,K] bfloat16: the weight for a prompt-sized GEMM (bf16 GEMMs
 * run on AMX/AVX512-BF16 several times faster than float32 here), built in one parallel pass instead of the
 * several passes and temporaries torch's broadcasting ops need. */
void lowbit_affine_dequant_u8_bf16(const uint8_t *codes, const float *a, const float *b, int64_t N, int64_t K,
                                   int64_t G, int64_t group, uint16_t *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *q = codes + n * K;
        uint16_t *w = out + n * K;
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = g * group;
            const int64_t k1 = k0 + group < K ? k0 + group : K;
            const float scale = a[n * G + g], offset = b[n * G + g];
            for (int64_t k = k0; k < k1; k++) w[k] = to_bf16(scale * (float)q[k] + offset);
        }
    }
}
