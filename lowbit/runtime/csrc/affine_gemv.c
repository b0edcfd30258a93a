/* One matmul per call for the torch-side kernels: y = x W^T for any weight layout of affine_dot.h (float,
 * one code per byte, two 4-bit codes per byte, codebooks, act-order), and the bf16 dequantization that prompt
 * processing feeds to a GEMM.
 *
 * Decoding is memory-bound, so the weight is read as its codes plus the group statistics and never
 * materialised. Output rows are split over OpenMP threads (the libgomp torch loads, so the pools do not
 * fight), as many as torch.get_num_threads() (passed in: OpenMP's own setting is per calling thread).
 */
#include "affine_dot.h"

#include <omp.h>

/* Floats of scratch lowbit_linear needs for M rows on `threads` threads. */
int64_t lowbit_linear_scratch(const lb_linear *weight, int64_t M, int threads) {
    return (int64_t)threads * lb_scratch_floats(weight->k, weight->groups, M);
}

/* y [M, N] = x [M, K] W^T + bias for one weight described by `weight` (see affine_dot.h); `act8`: int8
 * activations where the layout allows. */
void lowbit_linear(const lb_linear *weight, const float *x, int64_t M, float *y, float *scratch, int act8,
                   int threads) {
    const int64_t per_thread = lb_scratch_floats(weight->k, weight->groups, M);
    #pragma omp parallel num_threads(threads)
    lb_matmul(weight, x, M, y, weight->n, 0, scratch + (int64_t)omp_get_thread_num() * per_thread, act8, 1);
}

int lowbit_has_act8(void) { return LB_HAVE_ACT8; }

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
