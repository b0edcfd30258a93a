/* One decode step of a pre-norm decoder in one call: rotary ones (Llama, Mistral, Qwen2/3, SmolLM2, Gemma 1/2/3,
 * Phi-3), the mixture-of-experts ones (Mixtral, Qwen2-MoE, Qwen3-MoE) and the LayerNorm ones (GPT-NeoX, Falcon with
 * rotary; GPT-2, OPT with learned positions added before the call; BLOOM with ALiBi).
 *
 * Why: at batch 1 a small model's decode step is ~50 torch operations per layer, and their dispatch costs more
 * than the arithmetic (measured: 13.4 ms per SmolLM2-135M token, of which ~5 ms were matmuls). Here the whole
 * step runs inside one OpenMP parallel region: the threads split each matmul's output rows and each
 * attention's heads, and meet at a barrier between stages, so a token costs one call from Python.
 *
 * Numbers are float32 throughout (weights are read as their codes, see affine_dot.h), the KV cache is the
 * engine's float32 cache [layers, slots, kv_heads, context, head_dim], and each of the B rows decodes one
 * token for its own cache slot at its own position (continuous batching).
 */
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include "checks.h"

/* Bounds of lowbit_check_model: the loaders' limits (lowbit/models/validate.py HPARAM_LIMITS), which keep every
 * size product of the step and its workspace far inside 63 bits. */
#define LB_MAX_LAYERS 1024
#define LB_MAX_HIDDEN (1 << 17)
#define LB_MAX_HEADS 4096
#define LB_MAX_HEAD_DIM (1 << 14)
#define LB_MAX_WIDTH (1 << 20)         /* intermediate, an expert's width, heads x head_dim */
#define LB_MAX_VOCAB (1 << 22)
#define LB_MAX_CONTEXT (1 << 24)
#define LB_MAX_EXPERTS 4096
#define LB_MAX_SLOTS (1 << 20)
#define LB_MAX_ROWS (1 << 20)          /* rows of one step call */

/* A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE) as transformers routes it: softmax over the router's
 * logits of all experts, the top_k most probable experts per token, weighted by their probabilities (divided by
 * their sum when `renormalize`); plus, when `shared`, a shared expert every token runs, weighted by
 * sigmoid(shared gate logit). Each expert is act(gate(x)) * up(x) -> down, without biases. */
typedef struct {
    int64_t n_experts, top_k, renormalize, shared;
    lb_linear router[2];          /* router [n_experts, hidden] and the shared expert's gate [1, hidden] (n == 0:
                                     no shared expert): their logits side by side, one matmul */
    const lb_linear *experts;     /* [n_experts + shared][3]: gate, up, down of each expert, the shared one last */
} lb_moe;

/* Every norm is an RMSNorm y = x / rms(x) * w, but for the input, MLP and final norms of layer_norm models
 * (LayerNorms with a bias); the caller passes w as the family computes it (Gemma's 1 + w is added once when the
 * step is built, as transformers adds it in float32 on every call). */
typedef struct {
    const float *input_norm, *mlp_norm;          /* before attention, before the MLP */
    const float *attn_out_norm, *mlp_out_norm;   /* sandwich norms (Gemma 2/3) of the attention and MLP outputs,
                                                    applied before the residual add; NULL when absent */
    const float *q_norm, *k_norm;                /* per-head norms (Qwen3, Gemma 3), or NULL */
    const float *cos, *sin;                      /* this layer's rotary tables [context, rope_dim] (Gemma 3's
                                                    sliding-window layers have their own base) */
    int64_t window;                              /* attend to the last `window` positions only; 0: all */
    lb_linear qkv[3], o, gate_up[2], down;   /* q, k, v and gate, up (parts with n == 0 are absent: a fused
                                                weight in the first part computes them all) */
    const lb_moe *moe;                       /* the MLP is this mixture of experts (gate_up, down unused); or NULL */
    const float *input_norm_bias, *mlp_norm_bias;   /* LayerNorm biases (layer_norm models) */
} lb_layer;

enum { LB_ACT_SILU = 0, LB_ACT_GELU_TANH = 1, LB_ACT_GELU = 2, LB_ACT_RELU = 3 };

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, rope_dim, intermediate, context, slots;
    float norm_eps, q_norm_eps, k_norm_eps, attn_scale;
    float attn_softcap, final_softcap;   /* cap * tanh(s / cap) of attention scores / final logits; 0: none */
    int64_t activation;                  /* LB_ACT_*: act(gate) * up, or act(up) */
    int64_t activations;                 /* LB_ACTS_*: the matmuls' activation arithmetic (affine_dot.h) */
    const lb_layer *layers;
    const float *final_norm;
    lb_linear lm_head;
    float *k_cache, *v_cache;
    int64_t layer_norm;                  /* input, MLP and final norms are LayerNorms with bias (GPT-NeoX) */
    int64_t gated;                       /* MLP act(gate) * up; 0: act(up) from one weight */
    int64_t parallel;                    /* x + attn(norm(x)) + mlp(norm2(x)): the MLP reads the block's input */
    const float *final_norm_bias;
    const float *alibi;                  /* [heads]: slope * key position added to the scores (BLOOM), or NULL */
    const int64_t *qk_head_order;        /* [head_dim], a permutation: every q and k head of every layer is
                                            head[qk_head_order[i]] of the q|k|v matmul's output (weights stored in
                                            another row order, llama.cpp's interleaved-rope q and k of a GGUF file,
                                            read where they lie), gathered before the q/k norms and rope; or NULL */
} lb_model;

/* The first present part when every present part is GGUF blocks prepared alike to it (one rounding of x serves
 * them all, so one loop can share out all their rows), else NULL. */
static const lb_linear *ggml_shared_preparation(const lb_linear *parts, int64_t count, int64_t M, int activations) {
    const lb_linear *first = NULL;
    for (int64_t i = 0; i < count; i++) {
        if (!parts[i].n) continue;
        if (!first) first = &parts[i];
        if (!lb_prepared_alike(first, &parts[i], M, activations)) return NULL;   /* (GGUF blocks only) */
    }
    return first;
}

/* The concatenated outputs of several weights reading the same x, into y's columns in order; one barrier. GGUF
 * parts prepared alike share one dynamically scheduled loop over all their rows, so a thread the OS preempts on a
 * busy machine leaves its rows to the others (a static share of q and k made the others wait for it). */
static void matmul_parts(const lb_linear *parts, int64_t count, const float *x, int64_t M, float *y, int64_t ldy,
                         float *xsum, int activations) {
    const lb_linear *first = ggml_shared_preparation(parts, count, M, activations);
    if (first) {
        lb_ggml_prepared prepared = lb_ggml_prepare(first, x, M, xsum, lb_uses_act8(first, activations), 0);
        int64_t items = 0;
        for (int64_t i = 0; i < count; i++) items += (parts[i].n + 15) / 16;
        #pragma omp for schedule(dynamic, lb_ggml_chunk(first, items, 1, M))
        for (int64_t item = 0; item < items; item++) {
            int64_t part = 0, local = item, column = 0;          /* the part holding this item, and its columns */
            while (local >= (parts[part].n + 15) / 16) {
                local -= (parts[part].n + 15) / 16;
                column += parts[part].n;
                part++;
            }
            lb_ggml_run_item(&parts[part], local, y + column, ldy, 0, M, &prepared);
        }
        lb_ggml_finish(&prepared);
        return;
    }
    int64_t last = 0, column = 0;
    const lb_linear *previous = NULL;
    for (int64_t i = 0; i < count; i++)
        if (parts[i].n) last = i;
    for (int64_t i = 0; i <= last; i++)
        if (parts[i].n) {
            const int prepared = previous && lb_prepared_alike(previous, &parts[i], M, activations);
            lb_matmul_prepared(&parts[i], x, M, y + column, ldy, 0, xsum, activations, i == last, prepared);
            column += parts[i].n;
            previous = &parts[i];
        }
}

static void rms_norm(const float *x, const float *weight, int64_t size, float eps, float *out) {
    float squares = 0.0f;
    #pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < size; i++) squares += x[i] * x[i];
    const float inv = 1.0f / sqrtf(squares / (float)size + eps);
    for (int64_t i = 0; i < size; i++) out[i] = weight[i] * (x[i] * inv);
}

/* (x - mean) / sqrt(var + eps) * w + b, var the mean square deviation (as torch's layer_norm). */
static void layer_norm(const float *x, const float *weight, const float *bias, int64_t size, float eps, float *out) {
    float total = 0.0f, squares = 0.0f;
    #pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < size; i++) total += x[i];
    const float mean = total / (float)size;
    #pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < size; i++) squares += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / sqrtf(squares / (float)size + eps);
    for (int64_t i = 0; i < size; i++) out[i] = (x[i] - mean) * inv * weight[i] + (bias ? bias[i] : 0.0f);
}

/* A block's input, MLP or final norm of one row: the model's kind. */
static void hidden_norm(const lb_model *m, const float *x, const float *weight, const float *bias, float *out) {
    if (m->layer_norm) layer_norm(x, weight, bias, m->hidden, m->norm_eps, out);
    else rms_norm(x, weight, m->hidden, m->norm_eps, out);
}

/* Rotary embedding as transformers' rotate_half on the first d dimensions (all, or Phi-3's partial rotary):
 * pairs (i, i + d/2). */
static void rope(float *v, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * cos[i] - x1 * sin[i];
        v[i + half] = x1 * cos[i + half] + x0 * sin[i + half];
    }
}

/* e^x for x in [-87.3, 88.3] (clamped; 1.26 ulp at worst against exp in double over that range; NaN stays NaN), in
 * arithmetic alone so that a loop over it vectorises (libm's expf is a call per element: the MLP's activation of 32
 * rows of SmolLM2 spent ~5 ms a step in it). x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is
 * exact), e^r = 1 + r + r^2 p(r) with p of degree 5 (Cephes' minimax coefficients), 2^n put in the exponent bits.
 * n is rounded by adding 1.5 * 2^23, which leaves it in the low bits of the sum's mantissa: no float-to-int
 * conversion, which a NaN would make undefined. */
static inline float fast_exp(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    const float shifted = __builtin_fmaf(x, 1.44269504088896341f, 12582912.0f);
    const float n = shifted - 12582912.0f;
    float r = __builtin_fmaf(n, -0.693359375f, x);
    r = __builtin_fmaf(n, 2.12194440e-4f, r);
    float poly = 1.9875691500e-4f;
    poly = __builtin_fmaf(poly, r, 1.3981999507e-3f);
    poly = __builtin_fmaf(poly, r, 8.3334519073e-3f);
    poly = __builtin_fmaf(poly, r, 4.1665795894e-2f);
    poly = __builtin_fmaf(poly, r, 1.6666665459e-1f);
    poly = __builtin_fmaf(poly, r, 5.0000001201e-1f);
    poly = __builtin_fmaf(poly, r * r, r + 1.0f);
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;      /* n + 127 in the exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return poly * scale;
}

static inline float silu(float x) { return x / (1.0f + fast_exp(-x)); }

/* GELU's tanh form through 0.5 (1 + tanh z) = 1 / (1 + e^(-2z)) */
static inline float gelu_tanh(float x) {
    return x / (1.0f + fast_exp(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}

static float activation(float x, int64_t kind) {
    if (kind == LB_ACT_GELU_TANH) return gelu_tanh(x);
    if (kind == LB_ACT_GELU) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    if (kind == LB_ACT_RELU) return x > 0.0f ? x : 0.0f;
    return silu(x);
}

/* out[j] = scale * act(gate[j]) * up[j] (up NULL: 1) for j < n (scale: an expert's routing weight, else 1); one
 * loop per activation, so that SiLU's and GELU's tanh form vectorise (erf stays libm's call per element). */
static void activate(const float *restrict gate, const float *restrict up, float *restrict out, int64_t n,
                     int64_t kind, float scale) {
    if (kind == LB_ACT_SILU && up) {
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] = scale * silu(gate[j]) * up[j];
    } else if (kind == LB_ACT_SILU) {
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] = scale * silu(gate[j]);
    } else if (kind == LB_ACT_GELU_TANH && up) {
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] = scale * gelu_tanh(gate[j]) * up[j];
    } else if (kind == LB_ACT_GELU_TANH) {
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] = scale * gelu_tanh(gate[j]);
    } else {
        for (int64_t j = 0; j < n; j++) out[j] = scale * activation(gate[j], kind) * (up ? up[j] : 1.0f);
    }
}

/* act[b, j0 .. j0 + width) = act(gate) (* up when gated) for every row b < B of gu [B, 2I] (gate columns 0..I-1,
 * up columns I..2I-1) into act [B, I]. */
static void activate_columns(const float *gu, float *act, int64_t B, int64_t I, int64_t j0, int64_t width,
                             int64_t kind, int gated) {
    for (int64_t b = 0; b < B; b++)
        activate(gu + b * 2 * I + j0, gated ? gu + b * 2 * I + I + j0 : NULL, act + b * I + j0, width, kind, 1.0f);
}

static float softcap(float x, float cap) { return cap > 0.0f ? tanhf(x / cap) * cap : x; }

/* x[b] += rms_norm(y[b]) for every row, rows split over the threads (a sandwich norm; needs y's whole rows, so
 * it follows the matmul's barrier). */
static void add_normed(float *x, const float *y, const float *weight, int64_t B, int64_t H, float eps, float *tmp) {
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        rms_norm(y + b * H, weight, H, eps, tmp);
        for (int64_t i = 0; i < H; i++) x[b * H + i] += tmp[i];
    }
}

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* -- attention by KV group -----------------------------------------------------------------------------------
 * The query heads that share a KV head (heads / kv_heads of them: 3 in SmolLM2, 7 in Qwen2.5-0.5B) read the same
 * keys and values, so one work item takes a (row, KV head) and a run of its query heads: one pass over the keys
 * computes all their scores, one pass over the values accumulates all their outputs (each key and value row is
 * read from memory once per item, not once per head). Each head's numbers do not depend on which heads share its
 * item (every score is its own dot product, every output column its own sum over the positions in order), so the
 * split of the heads, which follows the thread count, never changes a result. */

/* Scores of `count` query heads (q: head j at q + j * D) against keys first..last into score + j * stride. */
static void attention_scores(const float *q, int64_t count, const float *keys, int64_t first, int64_t last,
                             int64_t D, float *score, int64_t stride) {
    int64_t t = first;
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) {
        /* 8 keys at a time (1 to 2 KB: they stay in L1 while every head of the item reads them), 8 independent
         * sums per head, folded into the 8 scores by one tree of horizontal adds */
        for (; t + 8 <= last + 1; t += 8) {
            const float *k = keys + t * D;
            for (int64_t j = 0; j < count; j++) {
                const float *qj = q + j * D;
                __m256 acc[8];
                for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
                for (int64_t i = 0; i < D; i += 8) {
                    const __m256 qv = _mm256_loadu_ps(qj + i);
                    for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + r * D + i), acc[r]);
                }
                const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
                const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
                const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
                const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                                  _mm256_permute2f128_ps(s0123, s4567, 0x31));
                _mm256_storeu_ps(score + j * stride + t, sums);
            }
        }
    }
#endif
    for (; t <= last; t++)
        for (int64_t j = 0; j < count; j++) score[j * stride + t] = dot(q + j * D, keys + t * D, D);
}

/* Attention of `count` query heads (hh0, hh0 + 1, ...; q: head j at q + j * D) of one row at position pos over the
 * cached keys and values of their KV head, positions first..pos, into out + j * D; score: count x (T + 1)
 * floats. */
static void attend_run(const lb_model *m, const float *q, int64_t hh0, int64_t count, const float *keys,
                       const float *values, int64_t first, int64_t pos, float *score, float *out) {
    const int64_t D = m->head_dim, T = m->context;
    attention_scores(q, count, keys, first, pos, D, score, T + 1);
    /* each head's row of `score`: its probabilities at first..pos (unnormalised), then 1 / their sum at T */
    for (int64_t j = 0; j < count; j++) {
        float *s = score + j * (T + 1);
        const float slope = m->alibi ? m->alibi[hh0 + j] : 0.0f;
        float top = -INFINITY, total = 0.0f;
        for (int64_t t = first; t <= pos; t++) {
            s[t] = softcap(s[t] * m->attn_scale, m->attn_softcap) + (m->alibi ? slope * (float)t : 0.0f);
            if (s[t] > top) top = s[t];
        }
        for (int64_t t = first; t <= pos; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        s[T] = 1.0f / total;
    }
    /* position by position, each value row read once, start to end (a stream the hardware prefetches; summing a
     * few columns at a time down the positions instead stalled on every row's cache line); every output column
     * is its own sum over the positions in order */
    for (int64_t j = 0; j < count; j++)
        for (int64_t i = 0; i < D; i++) out[j * D + i] = 0.0f;
    for (int64_t t = first; t <= pos; t++) {
        const float *vt = values + t * D;
        for (int64_t j = 0; j < count; j++) {
            const float p = score[j * (T + 1) + t];
            float *o = out + j * D;
            #pragma omp simd
            for (int64_t i = 0; i < D; i++) o[i] += p * vt[i];
        }
    }
    for (int64_t j = 0; j < count; j++) {
        const float inv = score[j * (T + 1) + T];
        for (int64_t i = 0; i < D; i++) out[j * D + i] *= inv;
    }
}

/* Query heads per attention work item: the (row, KV head) items split into runs of heads when there are too few
 * of them to keep the threads equally busy (one row of a model with 3 KV heads on 2 threads), the split with the
 * least work on the busiest thread of an even share (a run costs its heads plus about one head's reading of the
 * keys and values, which its heads share); the fewest runs among equals. The items are shared dynamically, so a
 * preempted thread's go to the others; on a quiet machine that share is the even one this estimates. */
static int64_t attention_run(int64_t items, int64_t group_ratio, int threads) {
    int64_t best = group_ratio, best_cost = -1;
    for (int64_t tried = 1; tried <= group_ratio; tried++) {
        const int64_t run = (group_ratio + tried - 1) / tried, runs = (group_ratio + run - 1) / run;
        const int64_t cost = (items * runs + threads - 1) / threads * (run + 1);
        if (best_cost < 0 || cost < best_cost) best = run, best_cost = cost;
    }
    return best;
}

/* An expert layer's routing tables and buffers for B rows, carved from `base` (NULL: only count the floats).
 * A "routed row" is one (token row, expert) pair; routed rows are grouped by expert so that each expert runs one
 * matmul over all the tokens routed to it. One function for the workspace size and the step, so they agree. */
typedef struct {
    float *logits;        /* [B, n_experts + shared]: router logits, then softmax probabilities in place */
    int64_t *first;       /* [experts + 1]: routed rows of expert e are first[e] .. first[e + 1] - 1 */
    int64_t *row_of, *expert_of;  /* [routed]: the token row and the expert of each routed row */
    float *weight_of;     /* [routed]: its routing weight */
    int64_t *slots;       /* [B, top_k + shared]: row b's routed rows, in expert order (the sum's order) */
    int64_t *chosen, *next;   /* [B, top_k]: each row's experts; [experts]: next free routed row of each */
    float *chosen_weight;     /* [B, top_k]: their weights */
    float *x, *gate_up, *act, *y;   /* [routed, hidden], [routed, 2 * widest], [routed, widest], [routed, hidden] */
} lb_moe_work;

static int64_t moe_widest(const lb_moe *moe) {
    int64_t widest = 0;
    for (int64_t e = 0; e < moe->n_experts + moe->shared; e++)
        if (moe->experts[3 * e].n > widest) widest = moe->experts[3 * e].n;
    return widest;
}

static int64_t moe_routed(const lb_moe *moe, int64_t B) { return B * (moe->top_k + moe->shared); }

static int64_t moe_work(const lb_moe *moe, int64_t B, int64_t H, float *base, lb_moe_work *w) {
    const int64_t E = moe->n_experts + moe->shared, R = moe_routed(moe, B), I = moe_widest(moe);
    int64_t at = 0;
    /* int64 tables (2 floats each) at even offsets: aligned as int64 */
#define LB_CARVE(field, type, floats) \
    do { if (base) w->field = (type *)(base + at); at += ((floats) + 1) / 2 * 2; } while (0)
    LB_CARVE(logits, float, B * E);
    LB_CARVE(first, int64_t, 2 * (E + 1));
    LB_CARVE(row_of, int64_t, 2 * R);
    LB_CARVE(expert_of, int64_t, 2 * R);
    LB_CARVE(weight_of, float, R);
    LB_CARVE(slots, int64_t, 2 * R);
    LB_CARVE(chosen, int64_t, 2 * B * moe->top_k);
    LB_CARVE(next, int64_t, 2 * E);
    LB_CARVE(chosen_weight, float, B * moe->top_k);
    LB_CARVE(x, float, R * H);
    LB_CARVE(gate_up, float, R * 2 * I);
    LB_CARVE(act, float, R * I);
    LB_CARVE(y, float, R * H);
#undef LB_CARVE
    return at;
}

/* Per-thread matmul scratch for B rows: sized for the widest matmul input (hidden, intermediate or heads x D).
 * One function for lowbit_decode_workspace and lowbit_decode_step (through thread_floats), so the size and the
 * layout cannot drift. */
static int64_t thread_scratch_floats(const lb_model *m, int64_t B) {
    int64_t widest = m->hidden > m->intermediate ? m->hidden : m->intermediate, rows = B;
    if (m->heads * m->head_dim > widest) widest = m->heads * m->head_dim;
    for (int64_t l = 0; l < m->n_layers; l++) {       /* an expert matmul reads up to all routed rows */
        const lb_moe *moe = m->layers[l].moe;
        if (!moe) continue;
        if (moe_widest(moe) > widest) widest = moe_widest(moe);
        if (moe_routed(moe, B) > rows) rows = moe_routed(moe, B);
    }
    return lb_scratch_floats(widest, widest, rows);
}

/* Floats of each thread's own buffers: matmul scratch, its normalised rows h [B, hidden], and one head [head_dim]
 * (the q/k head gather of qk_head_order). */
static int64_t thread_floats(const lb_model *m, int64_t B) {
    return lb_size_add(lb_size_add(thread_scratch_floats(m, B), lb_size_mul(B, m->hidden)), m->head_dim);
}

/* Floats of the expert layers' buffers (the largest layer's; layers run one after the other). */
static int64_t moe_floats(const lb_model *m, int64_t B) {
    int64_t most = 0;
    for (int64_t l = 0; l < m->n_layers; l++)
        if (m->layers[l].moe) {
            const int64_t floats = moe_work(m->layers[l].moe, B, m->hidden, NULL, NULL);
            if (floats > most) most = floats;
        }
    return most;
}

/* Row b's choice of experts (inside `omp single`): softmax over all experts' logits, the top_k most probable
 * (the first of equal ones, as a stable descending sort), their probabilities (over their sum if renormalize). */
static void route_row(const lb_moe *moe, float *logits, int64_t *chosen, float *weights) {
    const int64_t E = moe->n_experts, K = moe->top_k;
    float top = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
    for (int64_t e = 0; e < E; e++) total += (logits[e] = expf(logits[e] - top));
    for (int64_t e = 0; e < E; e++) logits[e] /= total;
    float picked = 0.0f;
    for (int64_t j = 0; j < K; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        chosen[j] = best;
        picked += (weights[j] = logits[best]);
    }
    if (moe->renormalize)
        for (int64_t j = 0; j < K; j++) weights[j] /= picked;
}

/* y [B, H] = the expert layer's output for the normalised rows h [B, H] (each thread's own copy). */
static void moe_mlp(const lb_model *m, const lb_moe *moe, const float *h, int64_t B, float *base, float *y,
                    float *xsum, int activations) {
    const int64_t H = m->hidden, E = moe->n_experts, S = moe->shared, K = moe->top_k;
    const int64_t R = moe_routed(moe, B), I = moe_widest(moe), per_row = K + S;
    lb_moe_work w;
    moe_work(moe, B, H, base, &w);
    matmul_parts(moe->router, 2, h, B, w.logits, E + S, xsum, activations);

    #pragma omp single
    {
        for (int64_t b = 0; b < B; b++)
            route_row(moe, w.logits + b * (E + S), w.chosen + b * K, w.chosen_weight + b * K);
        /* group the routed rows by expert: counts, then where each expert's rows begin */
        for (int64_t e = 0; e <= E + S; e++) w.first[e] = 0;
        for (int64_t i = 0; i < B * K; i++) w.first[w.chosen[i] + 1]++;
        if (S) w.first[E + 1] = B;
        for (int64_t e = 0; e < E + S; e++) w.first[e + 1] += w.first[e];
        for (int64_t e = 0; e < E + S; e++) w.next[e] = w.first[e];
        for (int64_t b = 0; b < B; b++) {
            int64_t *slots = w.slots + b * per_row;
            for (int64_t e = 0, j = 0; e < E; e++)            /* row b's experts in expert order */
                for (int64_t c = 0; c < K; c++)
                    if (w.chosen[b * K + c] == e) {
                        const int64_t at = w.next[e]++;
                        w.row_of[at] = b;
                        w.expert_of[at] = e;
                        w.weight_of[at] = w.chosen_weight[b * K + c];
                        slots[j++] = at;
                    }
            if (S) {                           /* the shared expert, added last as transformers adds it */
                const int64_t at = w.next[E]++;
                w.row_of[at] = b;
                w.expert_of[at] = E;
                w.weight_of[at] = 1.0f / (1.0f + expf(-w.logits[b * (E + S) + E]));
                slots[K] = at;
            }
        }
    }

    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < H; i++) w.x[r * H + i] = h[w.row_of[r] * H + i];

    /* gate and up of every expert that has rows: one barrier after the last */
    int64_t last = -1;
    for (int64_t e = 0; e < E + S; e++)
        if (w.first[e + 1] > w.first[e]) last = e;
    for (int64_t e = 0; e <= last; e++) {
        const int64_t rows = w.first[e + 1] - w.first[e];
        if (!rows) continue;
        const lb_linear *ex = moe->experts + 3 * e;
        float *out = w.gate_up + w.first[e] * 2 * I;
        lb_matmul(&ex[0], w.x + w.first[e] * H, rows, out, 2 * I, 0, xsum, activations, 0);
        lb_matmul(&ex[1], w.x + w.first[e] * H, rows, out + ex[0].n, 2 * I, 0, xsum, activations, e == last);
    }
    /* weight * act(gate) * up, each expert's rows packed [rows, its width] for its down matmul (down is linear
       without bias, so weighting its input weights its output) */
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const int64_t e = w.expert_of[r], width = moe->experts[3 * e].n;
        const float *gu = w.gate_up + r * 2 * I;
        float *a = w.act + w.first[e] * I + (r - w.first[e]) * width;
        activate(gu, gu + width, a, width, m->activation, w.weight_of[r]);
    }
    for (int64_t e = 0; e <= last; e++) {
        const int64_t rows = w.first[e + 1] - w.first[e];
        if (!rows) continue;
        lb_matmul(&moe->experts[3 * e + 2], w.act + w.first[e] * I, rows, w.y + w.first[e] * H, H, 0, xsum, activations,
                  e == last);
    }
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < H; i++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < per_row; j++) sum += w.y[w.slots[b * per_row + j] * H + i];
            y[b * H + i] = sum;
        }
}

/* LB_OK and *floats = the floats of scratch memory lowbit_decode_step needs for B rows and `threads` threads (of a
 * model lowbit_check_model accepted); or a status. */
int lowbit_decode_workspace(const lb_model *m, int64_t B, int threads, int64_t *floats) {
    if (B < 0 || B > LB_MAX_ROWS || !lb_threads_fit(threads)) return LB_ERR_ARGUMENT;
    const int64_t qkv = (m->heads + 2 * m->kv_heads) * m->head_dim;
    const int64_t per_row = qkv + m->heads * m->head_dim + 3 * m->intermediate + m->hidden;
    /* the attention scores: per thread, a row of context + 1 floats for each head of a KV group (see the step) */
    const int64_t scores = lb_size_mul(threads, lb_size_mul(m->heads / m->kv_heads, m->context + 1));
    *floats = lb_size_add(lb_size_add(lb_size_mul(B, per_row), lb_size_mul(threads, thread_floats(m, B))),
                          lb_size_add(lb_size_add(scores, moe_floats(m, B)), 2));
    return *floats < 0 ? LB_CHECK_OVERFLOW : LB_OK;
}

/* Floats of one KV cache [layers, slots, kv_heads, context, head_dim], or -1 when the product overflows. */
static int64_t cache_floats(const lb_model *m) {
    return lb_size_mul(lb_size_mul(lb_size_mul(m->n_layers, m->slots), lb_size_mul(m->kv_heads, m->context)),
                       m->head_dim);
}

/* A failed check of lowbit_check_model: `code`, with what failed written into detail[bytes] (for the error). */
static int refuse(char *detail, int64_t bytes, int code, const char *format, ...) {
    if (detail && bytes > 0) {
        va_list args;
        va_start(args, format);
        vsnprintf(detail, (size_t)bytes, format, args);
        va_end(args);
    }
    return code;
}

/* The weights of parts[0..count) that are present (n != 0) read `inputs` columns, give `outputs` rows together,
 * and are laid out as the kernels read them. */
static int check_parts(const lb_linear *parts, int64_t count, int64_t outputs, int64_t inputs, const char *where,
                       const char *what, char *detail, int64_t bytes) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) {
        const lb_linear *part = &parts[i];
        if (part->n == 0) continue;
        const int layout = lb_check_layout(part);
        if (layout != LB_OK)
            return refuse(detail, bytes, layout, "%s %s part %lld (%lld x %lld)", where, what, (long long)i,
                          (long long)part->n, (long long)part->k);
        if (part->k != inputs)
            return refuse(detail, bytes, LB_ERR_MODEL_SHAPE,
                          "%s %s part %lld reads %lld inputs, and the model has %lld", where, what, (long long)i,
                          (long long)part->k, (long long)inputs);
        total = lb_size_add(total, part->n);
    }
    if (total != outputs)
        return refuse(detail, bytes, LB_ERR_MODEL_SHAPE, "%s %s gives %lld outputs, and the model needs %lld", where,
                      what, (long long)total, (long long)outputs);
    return LB_OK;
}

/* An expert layer: routing sizes, router and shared gate [experts + shared, hidden], every expert gate, up
 * [width, hidden] and down [hidden, width] without biases, and no dense MLP beside it. */
static int check_moe(const lb_model *m, const lb_layer *layer, const char *where, char *detail, int64_t bytes) {
    const lb_moe *moe = layer->moe;
    const int64_t H = m->hidden;
    int status;
    if (m->parallel || layer->gate_up[0].n || layer->gate_up[1].n || layer->down.n)
        return refuse(detail, bytes, LB_ERR_MODEL_UNSUPPORTED, "%s has experts beside a dense MLP or in a parallel "
                      "block", where);
    if ((moe->renormalize != 0 && moe->renormalize != 1) || (moe->shared != 0 && moe->shared != 1))
        return refuse(detail, bytes, LB_ERR_MODEL_FLAGS, "%s has renormalize %lld and shared %lld (0 or 1 each)", where,
                      (long long)moe->renormalize, (long long)moe->shared);
    if (moe->n_experts < 1 || moe->n_experts > LB_MAX_EXPERTS || moe->top_k < 1 || moe->top_k > moe->n_experts)
        return refuse(detail, bytes, LB_ERR_MODEL_DIMS, "%s has %lld experts and top_k %lld", where,
                      (long long)moe->n_experts, (long long)moe->top_k);
    if (moe->experts == NULL) return refuse(detail, bytes, LB_ERR_MODEL_MISSING, "%s has no expert weights", where);
    if (moe->router[0].n != moe->n_experts || moe->router[1].n != moe->shared)
        return refuse(detail, bytes, LB_ERR_MODEL_SHAPE, "%s router gives %lld + %lld logits for %lld + %lld experts",
                      where, (long long)moe->router[0].n, (long long)moe->router[1].n, (long long)moe->n_experts,
                      (long long)moe->shared);
    if ((status = check_parts(moe->router, 2, moe->n_experts + moe->shared, H, where, "router", detail, bytes)))
        return status;
    for (int64_t e = 0; e < moe->n_experts + moe->shared; e++) {
        const lb_linear *expert = moe->experts + 3 * e;
        const int64_t width = expert[0].n;
        char gate[40], up[40], down[40];
        snprintf(gate, sizeof gate, "expert %lld gate", (long long)e);
        snprintf(up, sizeof up, "expert %lld up", (long long)e);
        snprintf(down, sizeof down, "expert %lld down", (long long)e);
        if (width < 1 || width > LB_MAX_WIDTH)
            return refuse(detail, bytes, LB_ERR_MODEL_DIMS, "%s %s has width %lld", where, gate, (long long)width);
        if (expert[0].bias || expert[1].bias || expert[2].bias)
            return refuse(detail, bytes, LB_ERR_MODEL_UNSUPPORTED, "%s expert %lld has biases (the step reads "
                          "experts without)", where, (long long)e);
        if ((status = check_parts(&expert[0], 1, width, H, where, gate, detail, bytes))
            || (status = check_parts(&expert[1], 1, width, H, where, up, detail, bytes))
            || (status = check_parts(&expert[2], 1, H, width, where, down, detail, bytes)))
            return status;
    }
    return LB_OK;
}

/* One decoder layer of a model whose dimensions are checked. */
static int check_layer(const lb_model *m, const lb_layer *layer, int64_t index, char *detail, int64_t bytes) {
    const int64_t H = m->hidden, D = m->head_dim, I = m->intermediate;
    char where[32];
    int status;
    snprintf(where, sizeof where, "layer %lld", (long long)index);
    if (!layer->input_norm || !layer->mlp_norm)
        return refuse(detail, bytes, LB_ERR_MODEL_MISSING, "%s has no input or MLP norm", where);
    if (m->rope_dim && (!layer->cos || !layer->sin))
        return refuse(detail, bytes, LB_ERR_MODEL_MISSING, "%s has no rotary tables", where);
    if (layer->window < 0)
        return refuse(detail, bytes, LB_ERR_MODEL_DIMS, "%s has window %lld", where, (long long)layer->window);
    if (!m->layer_norm && (layer->input_norm_bias || layer->mlp_norm_bias))
        return refuse(detail, bytes, LB_ERR_MODEL_UNSUPPORTED, "%s has norm biases on RMSNorms", where);
    if (m->parallel && (layer->attn_out_norm || layer->mlp_out_norm))
        return refuse(detail, bytes, LB_ERR_MODEL_UNSUPPORTED, "%s has sandwich norms in a parallel block", where);
    if ((status = check_parts(layer->qkv, 3, (m->heads + 2 * m->kv_heads) * D, H, where, "q|k|v", detail, bytes))
        || (status = check_parts(&layer->o, 1, H, m->heads * D, where, "o", detail, bytes)))
        return status;
    if (layer->moe) return check_moe(m, layer, where, detail, bytes);
    if ((status = check_parts(layer->gate_up, 2, (m->gated ? 2 : 1) * I, H, where, "gate|up", detail, bytes))
        || (status = check_parts(&layer->down, 1, H, I, where, "down", detail, bytes)))
        return status;
    return LB_OK;
}

/* LB_OK when lowbit_decode_step can run `m`: known flags, dimensions within bounds, every weight the shape the
 * dimensions give it and laid out as the kernels read it, every norm, rotary table and cache present, and no
 * combination the step would compute wrongly. Else a status, and what failed in detail[bytes]. Called once when
 * a step is built (it reads the structures, never the tensors: microseconds); the buffers' bytes are checked by
 * lowbit/runtime/checks.py, which knows them. */
int lowbit_check_model(const lb_model *m, char *detail, int64_t bytes) {
    if (m->activation < LB_ACT_SILU || m->activation > LB_ACT_RELU || m->activations < LB_ACTS_FLOAT32
        || m->activations > LB_ACTS_AUTO || (m->layer_norm != 0 && m->layer_norm != 1)
        || (m->gated != 0 && m->gated != 1) || (m->parallel != 0 && m->parallel != 1))
        return refuse(detail, bytes, LB_ERR_MODEL_FLAGS,
                      "activation %lld, arithmetic %lld, layer_norm %lld, gated %lld, parallel %lld",
                      (long long)m->activation, (long long)m->activations, (long long)m->layer_norm,
                      (long long)m->gated, (long long)m->parallel);
    if (m->n_layers < 1 || m->n_layers > LB_MAX_LAYERS || m->hidden < 1 || m->hidden > LB_MAX_HIDDEN
        || m->heads < 1 || m->heads > LB_MAX_HEADS || m->kv_heads < 1 || m->kv_heads > m->heads
        || m->heads % m->kv_heads || m->head_dim < 1 || m->head_dim > LB_MAX_HEAD_DIM
        || m->heads * m->head_dim > LB_MAX_WIDTH || m->rope_dim < 0 || m->rope_dim > m->head_dim || m->rope_dim % 2
        || m->intermediate < 1 || m->intermediate > LB_MAX_WIDTH || m->context < 1 || m->context > LB_MAX_CONTEXT
        || m->slots < 1 || m->slots > LB_MAX_SLOTS || m->lm_head.n < 1 || m->lm_head.n > LB_MAX_VOCAB
        || cache_floats(m) < 0)
        return refuse(detail, bytes, LB_ERR_MODEL_DIMS, "layers %lld, hidden %lld, heads %lld, kv heads %lld, head_dim "
                      "%lld, rotary %lld, intermediate %lld, context %lld, slots %lld, vocab %lld",
                      (long long)m->n_layers, (long long)m->hidden, (long long)m->heads, (long long)m->kv_heads,
                      (long long)m->head_dim, (long long)m->rope_dim, (long long)m->intermediate,
                      (long long)m->context, (long long)m->slots, (long long)m->lm_head.n);
    if (!m->layers || !m->final_norm || !m->k_cache || !m->v_cache)
        return refuse(detail, bytes, LB_ERR_MODEL_MISSING, "the model has no layers, final norm or KV caches");
    if (!m->layer_norm && m->final_norm_bias)
        return refuse(detail, bytes, LB_ERR_MODEL_UNSUPPORTED, "the final norm has a bias on an RMSNorm");
    for (int64_t l = 0; l < m->n_layers; l++) {
        const int status = check_layer(m, &m->layers[l], l, detail, bytes);
        if (status != LB_OK) return status;
    }
    if (m->qk_head_order) {        /* each of 0..head_dim-1 once (Python checked the array holds head_dim values) */
        uint8_t seen[LB_MAX_HEAD_DIM / 8] = {0};
        for (int64_t i = 0; i < m->head_dim; i++) {
            const int64_t from = m->qk_head_order[i];
            if (from < 0 || from >= m->head_dim || (seen[from / 8] >> (from % 8)) & 1)
                return refuse(detail, bytes, LB_ERR_MODEL_ORDER, "the q/k head order names dimension %lld at %lld "
                              "(each of 0..%lld once)", (long long)from, (long long)i, (long long)m->head_dim - 1);
            seen[from / 8] |= (uint8_t)(1 << (from % 8));
        }
    }
    return check_parts(&m->lm_head, 1, m->lm_head.n, m->hidden, "the", "lm_head", detail, bytes);
}

/* x [B, hidden]: the rows' embeddings, overwritten with the final hidden states; logits [B, vocab] out (or
 * [R, vocab] for the R rows `logit_rows` names, in its order, when it is not NULL: the last row of each prompt in a
 * batch of prompts, which saves the head's product for every other row). Row b decodes into cache slot slots[b] at position
 * positions[b] (< context), attending to positions 0..pos. Every row's keys and values are cached before any
 * row attends, so rows of one slot at consecutive positions are a causal prompt chunk (prefill).
 * *_floats / *_count: the values behind each pointer (work: lowbit_decode_workspace's count; the caches: the
 * model's k_cache and v_cache). `m` must be a model lowbit_check_model accepted. LB_OK, or a status and nothing
 * written (the checks: a few comparisons and one pass over the slots and positions). */
int lowbit_decode_step(const lb_model *m, float *x, int64_t x_floats, int64_t B, const int64_t *slots,
                       int64_t slot_count, const int64_t *positions, int64_t position_count, float *logits,
                       int64_t logits_floats, float *work, int64_t work_floats, int64_t k_cache_floats,
                       int64_t v_cache_floats, int threads, const int64_t *logit_rows, int64_t logit_row_count) {
    int64_t need;
    const int status = lowbit_decode_workspace(m, B, threads, &need);
    if (status != LB_OK) return status;
    if (logit_rows != NULL && (logit_row_count < 1 || logit_row_count > B)) return LB_ERR_ARGUMENT;
    const int64_t R = logit_rows != NULL ? logit_row_count : B;     /* rows whose logits are computed */
    if (!lb_covers(work_floats, need)) return LB_ERR_SCRATCH_SIZE;
    if (!lb_covers(x_floats, B * m->hidden)) return LB_ERR_INPUT_SIZE;
    if (!lb_covers(logits_floats, R * m->lm_head.n)) return LB_ERR_OUTPUT_SIZE;
    if (!lb_covers(k_cache_floats, cache_floats(m)) || !lb_covers(v_cache_floats, cache_floats(m)))
        return LB_ERR_CACHE_SIZE;
    if (slot_count < B) return LB_ERR_SLOT;
    if (position_count < B) return LB_ERR_POSITION;
    for (int64_t r = 0; logit_rows != NULL && r < R; r++)
        if (logit_rows[r] < 0 || logit_rows[r] >= B) return LB_ERR_ARGUMENT;
    for (int64_t b = 0; b < B; b++) {
        if (slots[b] < 0 || slots[b] >= m->slots) return LB_ERR_SLOT;
        if (positions[b] < 0 || positions[b] >= m->context) return LB_ERR_POSITION;
    }
    const int64_t H = m->hidden, D = m->head_dim, heads = m->heads, kv_heads = m->kv_heads;
    const int64_t I = m->intermediate, T = m->context, QKV = (heads + 2 * kv_heads) * D;
    const int64_t group_ratio = heads / kv_heads;
    const int64_t run = attention_run(B * kv_heads, group_ratio, threads);      /* query heads per attention item */
    const int64_t runs = (group_ratio + run - 1) / run;
    float *qkv = work, *attn = qkv + B * QKV, *gu = attn + B * heads * D, *act = gu + B * 2 * I;
    /* scores: group_ratio rows of `context` + 1 floats per thread (an attention item's heads), not per (row, head): an
     * attention item uses its scores only itself (B x heads x context floats were 34 MB at 128 prompt rows of a
     * 32-head model, 2048 context, and grow with the context: the step keeps its largest workspace) */
    float *scores = act + B * I, *out = scores + (int64_t)threads * group_ratio * (T + 1);
    float *per_thread = out + B * H;
    const int64_t scratch_floats = thread_scratch_floats(m, B), own_floats = thread_floats(m, B);
    float *moe_base = per_thread + (int64_t)threads * own_floats;
    moe_base += ((uintptr_t)moe_base / sizeof(float)) % 2;      /* int64 routing tables: 8-byte aligned */

    #pragma omp parallel num_threads(threads)
    {
        /* Each thread normalises the rows itself into its own h (a few hundred floats), which saves the barrier
         * a shared copy would need before the next matmul: 2 of a layer's 8 barriers (one more is saved where
         * each thread applies the MLP's activation to the gate and up rows it computed). */
        float *xsum = per_thread + (int64_t)omp_get_thread_num() * own_floats;
        float *h = xsum + scratch_floats, *head = h + B * H;
        const int activations = (int)m->activations;
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lb_layer *layer = &m->layers[l];
            for (int64_t b = 0; b < B; b++)
                hidden_norm(m, x + b * H, layer->input_norm, layer->input_norm_bias, h + b * H);
            matmul_parts(layer->qkv, 3, h, B, qkv, QKV, xsum, activations);

            /* q and k heads put in order (stored rows in another order), per-head norms (Qwen3, Gemma 3), rotary
               embedding, and this token's keys and values into the cache */
            #pragma omp for schedule(static) collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < heads + kv_heads; j++) {
                    const int64_t pos = positions[b];
                    float *v = qkv + b * QKV + j * D;
                    if (m->qk_head_order) {
                        for (int64_t i = 0; i < D; i++) head[i] = v[m->qk_head_order[i]];
                        for (int64_t i = 0; i < D; i++) v[i] = head[i];
                    }
                    const float *norm = j < heads ? layer->q_norm : layer->k_norm;
                    if (norm) rms_norm(v, norm, D, j < heads ? m->q_norm_eps : m->k_norm_eps, v);
                    rope(v, layer->cos + pos * m->rope_dim, layer->sin + pos * m->rope_dim, m->rope_dim);
                    if (j >= heads) {
                        const int64_t kvh = j - heads;
                        const int64_t at = (((l * m->slots + slots[b]) * kv_heads + kvh) * T + pos) * D;
                        const float *value = qkv + b * QKV + (heads + kv_heads + kvh) * D;
                        for (int64_t i = 0; i < D; i++) {
                            m->k_cache[at + i] = v[i];
                            m->v_cache[at + i] = value[i];
                        }
                    }
                }

            #pragma omp for schedule(dynamic)      /* a preempted thread's items go to the others */
            for (int64_t item = 0; item < B * kv_heads * runs; item++) {
                const int64_t b = item / (kv_heads * runs), g = item / runs % kv_heads;
                const int64_t hh0 = g * group_ratio + item % runs * run;     /* the item's first query head */
                const int64_t pos = positions[b];
                const int64_t base = ((l * m->slots + slots[b]) * kv_heads + g) * T * D;
                /* positions first..pos: all of them, or the last `window` (pos - t < window) */
                const int64_t first = layer->window > 0 && pos >= layer->window ? pos - layer->window + 1 : 0;
                attend_run(m, qkv + b * QKV + hh0 * D, hh0, lb_min(run, (g + 1) * group_ratio - hh0),
                           m->k_cache + base, m->v_cache + base, first, pos,
                           scores + (int64_t)omp_get_thread_num() * group_ratio * (T + 1),
                           attn + b * heads * D + hh0 * D);
            }

            if (m->parallel) {                 /* out = attention output; x stays the block's input for the MLP */
                lb_matmul(&layer->o, attn, B, out, H, 0, xsum, activations, 1);
            } else if (layer->attn_out_norm) {                            /* x += norm(attention output) */
                lb_matmul(&layer->o, attn, B, out, H, 0, xsum, activations, 1);
                add_normed(x, out, layer->attn_out_norm, B, H, m->norm_eps, h);
            } else {
                lb_matmul(&layer->o, attn, B, x, H, 1, xsum, activations, 1);  /* x += attention output */
            }
            for (int64_t b = 0; b < B; b++) hidden_norm(m, x + b * H, layer->mlp_norm, layer->mlp_norm_bias, h + b * H);
            if (layer->moe) {                                             /* x += experts' output */
                moe_mlp(m, layer->moe, h, B, moe_base, out, xsum, activations);
                if (layer->mlp_out_norm) {
                    add_normed(x, out, layer->mlp_out_norm, B, H, m->norm_eps, h);
                } else {
                    #pragma omp for schedule(static)
                    for (int64_t i = 0; i < B * H; i++) x[i] += out[i];
                }
                continue;
            }
            const lb_linear *gate = &layer->gate_up[0], *up = &layer->gate_up[1];
            const int64_t per_item = lb_matmul_rows_per_item(gate);
            if (m->gated && gate->n == I && up->n == I && ggml_shared_preparation(layer->gate_up, 2, B, activations)) {
                /* GGUF gate and up: one dynamically shared loop computes 16 rows of each and their activation
                 * (a preempted thread's rows go to the others; one barrier, as below) */
                lb_ggml_prepared prepared = lb_ggml_prepare(gate, h, B, xsum, lb_uses_act8(gate, activations), 0);
                const int64_t items = (I + 15) / 16;
                #pragma omp for schedule(dynamic, lb_ggml_chunk(gate, items, 2, B))
                for (int64_t item = 0; item < items; item++) {
                    lb_ggml_run_item(gate, item, gu, 2 * I, 0, B, &prepared);
                    lb_ggml_run_item(up, item, gu + I, 2 * I, 0, B, &prepared);
                    activate_columns(gu, act, B, I, item * 16, lb_min(16, I - item * 16), m->activation, 1);
                }
                lb_ggml_finish(&prepared);
            } else if (m->gated && gate->n == I && up->n == I && lb_matmul_rows_per_item(up) == per_item) {
                /* separate gate and up: each thread applies the activation to the rows it computed of both (the
                 * same static partition, see lb_matmul_rows_per_item), so no barrier between the matmuls and it */
                lb_matmul(gate, h, B, gu, 2 * I, 0, xsum, activations, 0);
                lb_matmul_prepared(up, h, B, gu + I, 2 * I, 0, xsum, activations, 0,
                                   lb_prepared_alike(gate, up, B, activations));
                #pragma omp for schedule(static)
                for (int64_t item = 0; item < (I + per_item - 1) / per_item; item++)
                    activate_columns(gu, act, B, I, item * per_item, lb_min(per_item, I - item * per_item),
                                     m->activation, 1);
            } else {
                matmul_parts(layer->gate_up, 2, h, B, gu, 2 * I, xsum, activations);
                const int64_t runs = (I + 255) / 256;   /* (row, run of 256 columns) items: one row splits too */
                #pragma omp for schedule(static)
                for (int64_t item = 0; item < B * runs; item++) {
                    const int64_t b = item / runs, j = item % runs * 256;
                    activate_columns(gu + b * 2 * I, act + b * I, 1, I, j, lb_min(256, I - j), m->activation,
                                     m->gated);
                }
            }
            if (m->parallel) {                 /* x = (attention + MLP output) + x, transformers' order */
                lb_matmul(&layer->down, act, B, out, H, 1, xsum, activations, 1);
                #pragma omp for schedule(static)
                for (int64_t i = 0; i < B * H; i++) x[i] = out[i] + x[i];
            } else if (layer->mlp_out_norm) {                             /* x += norm(MLP output) */
                lb_matmul(&layer->down, act, B, out, H, 0, xsum, activations, 1);
                add_normed(x, out, layer->mlp_out_norm, B, H, m->norm_eps, h);
            } else {
                lb_matmul(&layer->down, act, B, x, H, 1, xsum, activations, 1);  /* x += MLP output */
            }
        }
        /* the final norm of the wanted rows, packed into h's first R rows (each thread's own h) */
        for (int64_t r = 0; r < R; r++) {
            const int64_t b = logit_rows != NULL ? logit_rows[r] : r;
            hidden_norm(m, x + b * H, m->final_norm, m->final_norm_bias, h + r * H);
        }
        lb_matmul(&m->lm_head, h, R, logits, m->lm_head.n, 0, xsum, activations, 1);
        if (m->final_softcap > 0.0f) {
            const int64_t count = R * m->lm_head.n;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < count; i++) logits[i] = softcap(logits[i], m->final_softcap);
        }
    }
    return LB_OK;
}

/* A token's sampling weight e^x, x = (logit - the row's largest) / temperature <= 0: 0 below -87, so a token
 * masked with a -inf logit keeps probability 0 (fast_exp clamps there to 2^-126 instead). */
static inline float sample_weight(float x) { return x < -87.0f ? 0.0f : fast_exp(x); }

#define LB_SAMPLE_BLOCK 64      /* tokens whose weights are summed at once while looking for the drawn one */

/* Sum of the sampling weights of row[first .. first + count) (count <= LB_SAMPLE_BLOCK). */
static float sample_block_sum(const float *row, int64_t first, int64_t count, float top, float inverse) {
    float total = 0.0f;
    #pragma omp simd reduction(+ : total)
    for (int64_t j = first; j < first + count; j++) total += sample_weight((row[j] - top) * inverse);
    return total;
}

/* tokens[r] drawn from softmax(logits[r] / temperature) with uniforms[r] in [0, 1), for r < rows: the first token
 * whose cumulative weight exceeds uniforms[r] times the row's total weight (the inverse CDF, as generate.draw
 * computes it with torch in five passes over the row: here three, vectorised, the weights never stored). Where
 * rounding leaves the target between sums (a block's vector sum against its tokens' running sum, or the total),
 * the last token of nonzero weight before that point: a token of weight 0 (a -inf logit) is never drawn. Rows are
 * shared out over `threads`. A row with no finite largest logit (all -inf, +inf or NaN) gets token -1. LB_OK, or a
 * status and nothing written: a temperature whose inverse is not finite, or a uniform outside [0, 1), is
 * LB_ERR_ARGUMENT. */
int lowbit_sample_rows(const float *logits, int64_t logit_floats, int64_t rows, int64_t vocab, float temperature,
                       const double *uniforms, int64_t uniform_count, int64_t *tokens, int64_t token_count,
                       int threads) {
    if (rows < 0 || vocab < 1 || !lb_threads_fit(threads) || !(temperature > 0.0f) || isinf(1.0f / temperature)
        || isinf(temperature))
        return LB_ERR_ARGUMENT;
    if (!lb_covers(logit_floats, lb_size_mul(rows, vocab)) || uniform_count < rows) return LB_ERR_INPUT_SIZE;
    if (token_count < rows) return LB_ERR_OUTPUT_SIZE;
    for (int64_t r = 0; r < rows; r++)
        if (!(uniforms[r] >= 0.0 && uniforms[r] < 1.0)) return LB_ERR_ARGUMENT;     /* NaN included */
    const float inverse = 1.0f / temperature;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = logits + r * vocab;
        float top = -INFINITY;
        int nan = 0;
        #pragma omp simd reduction(max : top) reduction(| : nan)
        for (int64_t j = 0; j < vocab; j++) {
            top = row[j] > top ? row[j] : top;
            nan |= row[j] != row[j];
        }
        if (nan || !(top > -INFINITY) || isinf(top)) {
            tokens[r] = -1;
            continue;
        }
        /* the total as the sum of block sums, accumulated in the order the search below accumulates them */
        double total = 0.0;
        for (int64_t first = 0; first < vocab; first += LB_SAMPLE_BLOCK)
            total += sample_block_sum(row, first, lb_min(LB_SAMPLE_BLOCK, vocab - first), top, inverse);
        const double target = uniforms[r] * total;
        double below = 0.0;                       /* weight of the blocks before `first` */
        int64_t token = -1, last_weighted = -1;   /* the entered block's last token of nonzero weight so far */
        for (int64_t first = 0; first < vocab && token < 0; first += LB_SAMPLE_BLOCK) {
            const int64_t count = lb_min(LB_SAMPLE_BLOCK, vocab - first);
            const double block = sample_block_sum(row, first, count, top, inverse);
            if (below + block <= target) {        /* the drawn token is further on */
                below += block;
                continue;
            }
            /* the target is in this block (block > 0, so it holds a token of nonzero weight) */
            double cumulative = below;
            for (int64_t j = first; j < first + count && token < 0; j++) {
                const float weight = sample_weight((row[j] - top) * inverse);
                if (weight <= 0.0f) continue;
                cumulative += weight;
                last_weighted = j;
                if (cumulative > target) token = j;
            }
            if (token < 0) token = last_weighted;    /* the block's vector sum overshot its running sum */
        }
        if (token < 0) {                          /* the target is at or past the total: the last weighted token */
            for (int64_t j = vocab - 1; j >= 0 && token < 0; j--)
                if (sample_weight((row[j] - top) * inverse) > 0.0f) token = j;
        }
        tokens[r] = token;
    }
    return LB_OK;
}
