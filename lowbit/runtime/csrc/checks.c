/* Size checks run before a weight description reaches the kernels: does every buffer an lb_linear points to hold
 * the bytes affine_dot.h will read for its layout, and do its fields describe a layout the kernels handle? And the
 * words for every status code the entry points return (checks.h).
 *
 * Why in C: the rules are the kernels' own (bytes per code, statistics widths, the nibble layout's constraints),
 * so they live next to them, and Python (lowbit/runtime/checks.py) only supplies how many bytes each pointer has
 * behind it. A failed check returns a code naming the first problem; nothing is read through the pointers except
 * the permutation, whose values are indices the kernels use.
 */
#include <stdint.h>

#include "checks.h"

static const char *const STATUS_TEXT[LB_STATUS_COUNT] = {
    [LB_OK] = "no error",
    [LB_CHECK_KIND] = "an unknown layout or statistics kind",
    [LB_CHECK_DIMS] = "sizes that do not cover its columns",
    [LB_CHECK_NIBBLE_LAYOUT] = "a nibble layout with columns or groups the kernels cannot split",
    [LB_CHECK_WEIGHT_BYTES] = "fewer weight bytes than its shape needs",
    [LB_CHECK_STATS_BYTES] = "fewer group statistics than its shape needs",
    [LB_CHECK_BIAS_BYTES] = "a bias shorter than its outputs",
    [LB_CHECK_PERM] = "a column order shorter than its inputs or naming columns outside them",
    [LB_CHECK_TABLE] = "a code table it cannot use",
    [LB_CHECK_OVERFLOW] = "sizes that overflow",
    [LB_ERR_INPUT_SIZE] = "the input holds fewer values than rows x inputs",
    [LB_ERR_OUTPUT_SIZE] = "the output holds fewer values than the call writes",
    [LB_ERR_SCRATCH_SIZE] = "the scratch memory is smaller than the call needs",
    [LB_ERR_ROW_RANGE] = "a row range outside the weight's rows",
    [LB_ERR_SLOT] = "a cache slot outside the cache",
    [LB_ERR_POSITION] = "a position outside the context",
    [LB_ERR_CACHE_SIZE] = "a KV cache smaller than the model's dimensions",
    [LB_ERR_ARGUMENT] = "an invalid row count, thread count or option",
    [LB_ERR_MODEL_FLAGS] = "an unknown activation, arithmetic or flag",
    [LB_ERR_MODEL_DIMS] = "dimensions outside their bounds",
    [LB_ERR_MODEL_SHAPE] = "a weight shape that disagrees with the model's dimensions",
    [LB_ERR_MODEL_MISSING] = "a part the step reads is missing",
    [LB_ERR_MODEL_UNSUPPORTED] = "a combination of parts the step does not compute",
    [LB_ERR_MODEL_ORDER] = "a q/k head order that is not a permutation of the head's dimensions",
};

/* The words for a status code of any entry point (for the one-line error Python raises). */
const char *lowbit_status_text(int64_t code) {
    return code >= 0 && code < LB_STATUS_COUNT ? STATUS_TEXT[code] : "an unknown status";
}

/* 0 when `L` can be given to lb_matmul; else an LB_CHECK_* code. *_bytes: bytes available behind each pointer
 * (ignored for NULL pointers); a pointer that is set with 0 bytes behind it fails. */
int64_t lowbit_check_linear(const lb_linear *L, int64_t w_bytes, int64_t a_bytes, int64_t b_bytes,
                            int64_t bias_bytes, int64_t perm_bytes, int64_t table_bytes) {
    const int layout = lb_check_layout(L);
    if (layout != LB_OK) return layout;
    if (L->bias && bias_bytes < L->n * 4) return LB_CHECK_BIAS_BYTES;
    int64_t weight_bytes;
    if (lb_is_ggml(L->kind))
        weight_bytes = lb_size_mul(lb_size_mul(L->n, L->k / lb_ggml_block(L->kind)), lb_ggml_bytes(L->kind));
    else if (lb_is_float(L->kind))
        weight_bytes = lb_size_mul(lb_size_mul(L->n, L->k), lb_float_bytes(L->kind));
    else
        weight_bytes = L->kind == LB_NIB ? L->n * L->k / 2 : L->n * L->k;   /* < n x k x 4: no overflow */
    if (weight_bytes < 0) return LB_CHECK_OVERFLOW;
    if (w_bytes < weight_bytes) return LB_CHECK_WEIGHT_BYTES;
    if (lb_is_ggml(L->kind) || lb_is_float(L->kind)) return LB_OK;
    const int64_t stat_bytes = lb_size_mul(lb_size_mul(L->n, L->groups), lb_stats_f32(L->stats) ? 4 : 2);
    if (stat_bytes < 0) return LB_CHECK_OVERFLOW;
    if (a_bytes < stat_bytes) return LB_CHECK_STATS_BYTES;
    if (!lb_stats_offset(L->stats) && b_bytes < stat_bytes) return LB_CHECK_STATS_BYTES;
    if (L->table && table_bytes < 16 * 4) return LB_CHECK_TABLE;
    if (L->perm) {
        if (perm_bytes < L->k * 4) return LB_CHECK_PERM;
        for (int64_t j = 0; j < L->k; j++)
            if (L->perm[j] < 0 || L->perm[j] >= L->k) return LB_CHECK_PERM;
    }
    return LB_OK;
}
