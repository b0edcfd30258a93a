/* What every exported entry point of the kernel library checks before it reads or writes through a caller's
 * pointer, and the status codes it returns (0: done; else the first problem found; checks.c's lowbit_status_text
 * says each in words, and lowbit/runtime/checks.py's check_status turns it into a LowbitError).
 *
 * Why: the pointers come from Python (ctypes), where a shape mistake, a corrupt file that slipped past the loaders
 * or a caller's bug otherwise becomes a write past a buffer (heap corruption, a crash far from its cause). Every
 * entry point takes the size of each buffer it writes or reads rows from, and refuses sizes that do not cover
 * what it would touch. The checks are a few comparisons per call (and one pass over a decode step's slots and
 * positions), so the decode path keeps its speed.
 */
#ifndef LOWBIT_CHECKS_H
#define LOWBIT_CHECKS_H

#include <stdint.h>

#include "affine_dot.h"

enum {
    LB_OK = 0,
    /* a weight description (lb_linear) */
    LB_CHECK_KIND = 1,          /* unknown kind or statistics layout */
    LB_CHECK_DIMS = 2,          /* n, k, groups or group not positive, groups x group does not cover k, or more
                                   groups than columns */
    LB_CHECK_NIBBLE_LAYOUT = 3, /* LB_NIB with k % 32 != 0 or a group size the nibble tiles cannot split */
    LB_CHECK_WEIGHT_BYTES = 4,  /* w missing or holding fewer bytes than n x k codes (or float32 / 16-bit floats) need */
    LB_CHECK_STATS_BYTES = 5,   /* a or b missing or holding fewer than n x groups statistics */
    LB_CHECK_BIAS_BYTES = 6,    /* bias holds fewer than n floats */
    LB_CHECK_PERM = 7,          /* perm holds fewer than k indices, or one outside 0..k-1 */
    LB_CHECK_TABLE = 8,         /* table holds fewer than 16 floats, or is set on a layout that is not LB_NIB */
    LB_CHECK_OVERFLOW = 9,      /* a size product overflows 63 bits */
    /* the buffers and arguments of one call */
    LB_ERR_INPUT_SIZE = 10,     /* x holds fewer floats than rows x inputs */
    LB_ERR_OUTPUT_SIZE = 11,    /* y, out or logits hold fewer values than the call writes */
    LB_ERR_SCRATCH_SIZE = 12,   /* scratch or workspace smaller than the call's need */
    LB_ERR_ROW_RANGE = 13,      /* rows n0..n1 not within 0 <= n0 <= n1 <= n */
    LB_ERR_SLOT = 14,           /* a cache slot outside 0..slots-1, or fewer slots than rows */
    LB_ERR_POSITION = 15,       /* a position outside 0..context-1, or fewer positions than rows */
    LB_ERR_CACHE_SIZE = 16,     /* a KV cache smaller than layers x slots x kv_heads x context x head_dim */
    LB_ERR_ARGUMENT = 17,       /* a negative row count, a thread count outside 1..4096, an unknown option, or the
                                   last row's logits of no rows */
    /* a model description (decode.c's lowbit_check_model) */
    LB_ERR_MODEL_FLAGS = 18,    /* an unknown activation, arithmetic or 0/1 flag */
    LB_ERR_MODEL_DIMS = 19,     /* a dimension outside its bounds, or kv heads not dividing heads */
    LB_ERR_MODEL_SHAPE = 20,    /* a weight whose shape disagrees with the model's dimensions */
    LB_ERR_MODEL_MISSING = 21,  /* a norm, rotary table, cache or weight the step reads is missing */
    LB_ERR_MODEL_UNSUPPORTED = 22,  /* a combination the step does not compute (it would ignore a part) */
    LB_ERR_MODEL_ORDER = 23,    /* a q/k head order that is not a permutation of the head's dimensions */
    LB_STATUS_COUNT
};

#define LB_MAX_THREADS 4096

/* Sizes computed with these stay exact or become -1: any negative operand or an overflow gives -1, and -1 goes
 * on through every later step, so a whole size expression is checked once at its end (see lb_covers). */
static inline int64_t lb_size_mul(int64_t a, int64_t b) {
    int64_t product;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &product)) return -1;
    return product;
}

static inline int64_t lb_size_add(int64_t a, int64_t b) {
    int64_t sum;
    if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &sum)) return -1;
    return sum;
}

/* 1 when `have` values cover a need computed with lb_size_* (an overflowed need, -1, is never covered). */
static inline int lb_covers(int64_t have, int64_t need) { return need >= 0 && have >= need; }

/* The fields of a weight description the kernels index with, checked without reading through its pointers (a
 * few comparisons: every entry point runs it on every call). LB_OK or an LB_CHECK_* code. */
static inline int lb_check_layout(const lb_linear *L) {
    if (!lb_is_float(L->kind) && L->kind != LB_U8 && L->kind != LB_NIB && !lb_is_ggml(L->kind)) return LB_CHECK_KIND;
    if (L->n <= 0 || L->k <= 0) return LB_CHECK_DIMS;
    if (lb_size_mul(lb_size_mul(L->n, L->k), 4) < 0) return LB_CHECK_OVERFLOW;
    if (L->w == NULL) return LB_CHECK_WEIGHT_BYTES;
    /* every layout: lb_scratch_floats sizes scratch with `groups` (lowbit_linear_scratch bounds it by k) */
    if (L->groups < 0 || L->groups > L->k) return LB_CHECK_DIMS;
    if (lb_is_ggml(L->kind)) {          /* GGUF blocks as stored: whole blocks per row, no separate statistics */
        if (L->k % lb_ggml_block(L->kind)) return LB_CHECK_DIMS;
        return L->table || L->perm ? LB_CHECK_TABLE : LB_OK;
    }
    if (lb_is_float(L->kind)) return L->table || L->perm ? LB_CHECK_TABLE : LB_OK;
    if (L->stats < LB_STATS_F32 || L->stats > LB_STATS_F32_OFFSET) return LB_CHECK_KIND;
    if (L->groups <= 0 || L->group <= 0 || L->groups > L->k) return LB_CHECK_DIMS;
    const int64_t covered = lb_size_mul(L->groups, L->group);
    if (covered < 0) return LB_CHECK_OVERFLOW;
    if (covered < L->k) return LB_CHECK_DIMS;
    if (L->kind == LB_NIB && (L->k % 32 || !(L->group == 16 || L->group % 32 == 0))) return LB_CHECK_NIBBLE_LAYOUT;
    if (L->kind != LB_NIB && L->table) return LB_CHECK_TABLE;
    if (L->a == NULL || (!lb_stats_offset(L->stats) && L->b == NULL)) return LB_CHECK_STATS_BYTES;
    return LB_OK;
}

static inline int lb_threads_fit(int threads) { return threads >= 1 && threads <= LB_MAX_THREADS; }

#endif
