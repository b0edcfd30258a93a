/* One matmul per call for the torch-side kernels: y = x W^T for any weight layout of affine_dot.h (float,
 * one code per byte, two 4-bit codes per byte, codebooks, act-order), and the dequantized rows that prompt
 * processing feeds to a GEMM. Every entry point checks the sizes of the buffers it is given (checks.h).
 *
 * Decoding is memory-bound, so the weight is read as its codes plus the group statistics and never
 * materialised. Output rows are split over OpenMP threads (the libgomp torch loads, so the pools do not
 * fight), as many as torch.get_num_threads() (passed in: OpenMP's own setting is per calling thread).
 */
#include "checks.h"

#include <omp.h>

/* LB_OK and *floats = the floats of scratch lowbit_linear needs for M rows on `threads` threads; or a status. */
int lowbit_linear_scratch(const lb_linear *weight, int64_t M, int threads, int64_t *floats) {
    const int layout = lb_check_layout(weight);
    if (layout != LB_OK) return layout;
    if (M < 0 || !lb_threads_fit(threads)) return LB_ERR_ARGUMENT;
    /* lb_scratch_floats is at most M x (4k + 256) (groups <= k, see lb_check_layout): that product bounds it */
    if (lb_size_mul(M, lb_size_add(lb_size_mul(weight->k, 4), 256)) < 0 || lb_size_mul(M, weight->n) < 0)
        return LB_CHECK_OVERFLOW;
    *floats = lb_size_mul(threads, lb_scratch_floats(weight->k, weight->groups, M));
    return *floats < 0 ? LB_CHECK_OVERFLOW : LB_OK;
}

/* y [M, N] = x [M, K] W^T + bias for one weight described by `weight` (see affine_dot.h); `activations`:
 * LB_ACTS_* (int8 activations where it and the layout allow). *_floats: the floats behind x, y and scratch
 * (lowbit_linear_scratch's count); LB_OK, or a status and nothing written. */
int lowbit_linear(const lb_linear *weight, const float *x, int64_t x_floats, int64_t M, float *y, int64_t y_floats,
                  float *scratch, int64_t scratch_floats, int activations, int threads) {
    int64_t need;
    const int status = lowbit_linear_scratch(weight, M, threads, &need);
    if (status != LB_OK) return status;
    if (activations < LB_ACTS_FLOAT32 || activations > LB_ACTS_AUTO) return LB_ERR_ARGUMENT;
    if (!lb_covers(x_floats, M * weight->k)) return LB_ERR_INPUT_SIZE;
    if (!lb_covers(y_floats, M * weight->n)) return LB_ERR_OUTPUT_SIZE;
    if (!lb_covers(scratch_floats, need)) return LB_ERR_SCRATCH_SIZE;
    const int64_t per_thread = need / threads;
    #pragma omp parallel num_threads(threads)
    lb_matmul(weight, x, M, y, weight->n, 0, scratch + (int64_t)omp_get_thread_num() * per_thread, activations, 1);
    return LB_OK;
}

int lowbit_has_act8(void) { return LB_HAVE_ACT8; }

/* 1 when lowbit_linear / the decode step round `weight`'s activations to int8 under `activations` (LB_ACTS_*). */
int lowbit_uses_act8(const lb_linear *weight, int activations) { return lb_uses_act8(weight, activations); }

/* 1 when a matmul of `rows` activation rows by `weight` runs on AMX tiles under `activations` (the rule
 * lb_ggml_matmul applies), for Python to know which weights its many-row steps tile. */
int lowbit_amx_fits(const lb_linear *weight, int64_t rows, int activations) {
    return lb_is_ggml(weight->kind) && lb_ggml_amx_fits(weight->kind, rows, lb_uses_act8(weight, activations));
}

int lb_amx_state = 0;

#if LB_GGML_AMX
/* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): without it the first tile instruction faults */
static int lb_amx_permitted(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

__attribute__((constructor)) static void lb_amx_init(void) {
    const char *setting = getenv("LOWBIT_AMX");
    if (!(setting && setting[0] == '0')) lb_amx_state = lb_amx_permitted();
}
#endif

int lowbit_amx(int mode) {
#if LB_GGML_AMX
    if (mode == 0 || mode == 1) lb_amx_state = mode == 1 && lb_amx_permitted();
#else
    (void)mode;
#endif
    return lb_amx_state == 1;
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

/* Rows [n0, n1) of a described weight (any lb_linear layout) as float32, or bfloat16 bits when `bf16`, into out
 * [n1 - n0, K], columns in the order its codes are stored (an act-order weight's sorted order: the caller gathers
 * x's columns by `perm`). Prompt-sized matmuls dequantize a slice of rows this way and hand it to a GEMM, reading
 * the same packed bytes the decode kernels read, so no unpacked copy of the codes is ever kept. */
int lowbit_dequantize_rows(const lb_linear *L, int64_t n0, int64_t n1, void *out, int64_t out_bytes, int bf16,
                           int threads) {
    const int layout = lb_check_layout(L);
    if (layout != LB_OK) return layout;
    if (!(0 <= n0 && n0 <= n1 && n1 <= L->n)) return LB_ERR_ROW_RANGE;
    if ((bf16 != 0 && bf16 != 1) || !lb_threads_fit(threads)) return LB_ERR_ARGUMENT;
    if (!lb_covers(out_bytes, (n1 - n0) * L->k * (bf16 ? 2 : 4))) return LB_ERR_OUTPUT_SIZE;  /* <= n x k x 4 */
    const int64_t K = L->k, G = L->groups;
    if (lb_is_ggml(L->kind)) {           /* GGUF blocks: 256 columns at a time through a float buffer */
        const int64_t block = lb_ggml_block(L->kind), row_bytes = (K / block) * lb_ggml_bytes(L->kind);
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = n0; n < n1; n++) {
            float buffer[256];
            for (int64_t k0 = 0; k0 < K; k0 += 256) {
                const int64_t count = lb_min(256 / block, (K - k0) / block), width = count * block;
                float *target = bf16 ? buffer : (float *)out + (n - n0) * K + k0;
                lb_ggml_dequantize(L->kind, (const uint8_t *)L->w + n * row_bytes + (k0 / block) * lb_ggml_bytes(L->kind),
                                   count, target);
                if (bf16)
                    for (int64_t k = 0; k < width; k++) ((uint16_t *)out)[(n - n0) * K + k0 + k] = to_bf16(buffer[k]);
            }
        }
        return LB_OK;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        float *row32 = bf16 ? NULL : (float *)out + (n - n0) * K;
        uint16_t *row16 = bf16 ? (uint16_t *)out + (n - n0) * K : NULL;
        for (int64_t k = 0; k < K; k++) {
            float value;
            if (lb_is_float(L->kind)) {
                value = lb_float_at(L->w, n * K + k, L->kind);
            } else {
                uint8_t code;
                if (L->kind == LB_NIB) {
                    const int64_t chunk = k / 32, j = k % 32;
                    const uint8_t byte = ((const uint8_t *)L->w)[n * (K / 2) + chunk * 16 + (j & 15)];
                    code = j < 16 ? byte & 0xF : byte >> 4;
                } else {
                    code = ((const uint8_t *)L->w)[n * K + k];
                }
                const int64_t g = k / L->group;
                const float a = lb_stat(L->a, n * G + g, L->stats);
                const float b = lb_stats_offset(L->stats) ? L->offset * a : lb_stat(L->b, n * G + g, L->stats);
                value = a * (L->table ? L->table[code] : (float)code) + b;
            }
            if (bf16) row16[k] = to_bf16(value);
            else row32[k] = value;
        }
    }
    return LB_OK;
}
