/* Size checks run before a weight description reaches the kernels: does every buffer an lb_linear points to hold
 * the bytes affine_dot.h will read for its layout, and do its fields describe a layout the kernels handle?
 *
 * Why in C: the rules are the kernels' own (bytes per code, statistics widths, the nibble layout's constraints),
 * so they live next to them, and Python (lowbit/runtime/checks.py) only supplies how many bytes each pointer has
 * behind it. A failed check returns a code naming the first problem; nothing is read through the pointers except
 * the permutation, whose values are indices the kernels use.
 */
#include <stdint.h>

#include "affine_dot.h"

enum {
    LB_CHECK_OK = 0,
    LB_CHECK_KIND = 1,          /* unknown kind or statistics layout */
    LB_CHECK_DIMS = 2,          /* n, k, groups or group not positive, or groups x group does not cover k */
    LB_CHECK_NIBBLE_LAYOUT = 3, /* LB_NIB with k % 32 != 0 or a group size the nibble tiles cannot split */
    LB_CHECK_WEIGHT_BYTES = 4,  /* w holds fewer bytes than n x k codes (or floats) need */
    LB_CHECK_STATS_BYTES = 5,   /* a or b hold fewer than n x groups statistics */
    LB_CHECK_BIAS_BYTES = 6,    /* bias holds fewer than n floats */
    LB_CHECK_PERM = 7,          /* perm holds fewer than k indices, or one outside 0..k-1 */
    LB_CHECK_TABLE = 8,         /* table holds fewer than 16 floats, or is set on a layout that is not LB_NIB */
    LB_CHECK_OVERFLOW = 9,      /* a size product overflows 63 bits */
};

static int mul_fits(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || (a && b > INT64_MAX / a)) return 0;
    *out = a * b;
    return 1;
}

/* 0 when `L` can be given to lb_matmul; else an LB_CHECK_* code. *_bytes: bytes available behind each pointer
 * (ignored for NULL pointers); a pointer that is set with 0 bytes behind it fails. */
int64_t lowbit_check_linear(const lb_linear *L, int64_t w_bytes, int64_t a_bytes, int64_t b_bytes,
                            int64_t bias_bytes, int64_t perm_bytes, int64_t table_bytes) {
    int64_t cells, need;
    if (L->kind != LB_F32 && L->kind != LB_U8 && L->kind != LB_NIB && !lb_is_ggml(L->kind)) return LB_CHECK_KIND;
    if (L->n <= 0 || L->k <= 0) return LB_CHECK_DIMS;
    if (!mul_fits(L->n, L->k, &cells) || !mul_fits(cells, 4, &need)) return LB_CHECK_OVERFLOW;
    if (L->w == NULL) return LB_CHECK_WEIGHT_BYTES;
    if (L->bias && bias_bytes < L->n * 4) return LB_CHECK_BIAS_BYTES;
    if (lb_is_ggml(L->kind)) {          /* GGUF blocks as stored: whole blocks per row, no separate statistics */
        if (L->k % lb_ggml_block(L->kind)) return LB_CHECK_DIMS;
        if (L->table || L->perm) return LB_CHECK_TABLE;
        if (!mul_fits(L->n, L->k / lb_ggml_block(L->kind), &cells) || !mul_fits(cells, lb_ggml_bytes(L->kind), &need))
            return LB_CHECK_OVERFLOW;
        return w_bytes < need ? LB_CHECK_WEIGHT_BYTES : LB_CHECK_OK;
    }
    if (L->kind == LB_F32) {
        if (L->table || L->perm) return LB_CHECK_TABLE;
        return w_bytes < need ? LB_CHECK_WEIGHT_BYTES : LB_CHECK_OK;
    }
    if (L->stats < LB_STATS_F32 || L->stats > LB_STATS_F32_OFFSET) return LB_CHECK_KIND;
    if (L->groups <= 0 || L->group <= 0) return LB_CHECK_DIMS;
    int64_t covered;
    if (!mul_fits(L->groups, L->group, &covered)) return LB_CHECK_OVERFLOW;
    if (covered < L->k) return LB_CHECK_DIMS;
    if (L->kind == LB_NIB) {
        if (L->k % 32 || !(L->group == 16 || L->group % 32 == 0)) return LB_CHECK_NIBBLE_LAYOUT;
        need = cells / 2;
    } else {
        need = cells;
        if (L->table) return LB_CHECK_TABLE;
    }
    if (w_bytes < need) return LB_CHECK_WEIGHT_BYTES;
    int64_t stat_cells, stat_bytes;
    if (!mul_fits(L->n, L->groups, &stat_cells) || !mul_fits(stat_cells, lb_stats_f32(L->stats) ? 4 : 2, &stat_bytes))
        return LB_CHECK_OVERFLOW;
    if (L->a == NULL || a_bytes < stat_bytes) return LB_CHECK_STATS_BYTES;
    if (!lb_stats_offset(L->stats) && (L->b == NULL || b_bytes < stat_bytes)) return LB_CHECK_STATS_BYTES;
    if (L->table && table_bytes < 16 * 4) return LB_CHECK_TABLE;
    if (L->perm) {
        if (perm_bytes < L->k * 4) return LB_CHECK_PERM;
        for (int64_t j = 0; j < L->k; j++)
            if (L->perm[j] < 0 || L->perm[j] >= L->k) return LB_CHECK_PERM;
    }
    return LB_CHECK_OK;
}
