/* One decode step of a pre-norm rotary decoder (Llama, Mistral, Qwen2/3, SmolLM2, Gemma 1/2/3, Phi-3) in one call.
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
#include <stddef.h>

#include "affine_dot.h"

/* Every norm is an RMSNorm y = x / rms(x) * w; the caller passes w as the family computes it (Gemma's 1 + w
 * is added once when the step is built, as transformers adds it in float32 on every call). */
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
} lb_layer;

enum { LB_ACT_SILU = 0, LB_ACT_GELU_TANH = 1, LB_ACT_GELU = 2 };

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, rope_dim, intermediate, context, slots;
    float norm_eps, q_norm_eps, k_norm_eps, attn_scale;
    float attn_softcap, final_softcap;   /* cap * tanh(s / cap) of attention scores / final logits; 0: none */
    int64_t activation;                  /* LB_ACT_*: act(gate) * up */
    int64_t activations;                 /* LB_ACTS_*: the matmuls' activation arithmetic (affine_dot.h) */
    const lb_layer *layers;
    const float *final_norm;
    lb_linear lm_head;
    float *k_cache, *v_cache;
} lb_model;

/* The concatenated outputs of several weights reading the same x, into y's columns in order; one barrier. */
static void matmul_parts(const lb_linear *parts, int64_t count, const float *x, int64_t M, float *y, int64_t ldy,
                         float *xsum, int activations) {
    int64_t last = 0, column = 0;
    for (int64_t i = 0; i < count; i++)
        if (parts[i].n) last = i;
    for (int64_t i = 0; i <= last; i++)
        if (parts[i].n) {
            lb_matmul(&parts[i], x, M, y + column, ldy, 0, xsum, activations, i == last);
            column += parts[i].n;
        }
}

static void rms_norm(const float *x, const float *weight, int64_t size, float eps, float *out) {
    float squares = 0.0f;
    #pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < size; i++) squares += x[i] * x[i];
    const float inv = 1.0f / sqrtf(squares / (float)size + eps);
    for (int64_t i = 0; i < size; i++) out[i] = weight[i] * (x[i] * inv);
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

static float activation(float x, int64_t kind) {
    if (kind == LB_ACT_GELU_TANH) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    if (kind == LB_ACT_GELU) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    return x / (1.0f + expf(-x));
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

/* Per-thread matmul scratch for B rows: sized for the widest matmul input (hidden, intermediate or heads x D).
 * One function for lowbit_decode_workspace and lowbit_decode_step, so the size and the layout cannot drift. */
static int64_t thread_scratch_floats(const lb_model *m, int64_t B) {
    int64_t widest = m->hidden > m->intermediate ? m->hidden : m->intermediate;
    if (m->heads * m->head_dim > widest) widest = m->heads * m->head_dim;
    return lb_scratch_floats(widest, widest, B);
}

/* Floats of scratch memory lowbit_decode_step needs for B rows and `threads` threads. */
int64_t lowbit_decode_workspace(const lb_model *m, int64_t B, int threads) {
    const int64_t qkv = (m->heads + 2 * m->kv_heads) * m->head_dim;
    return B * (qkv + m->heads * m->head_dim + 3 * m->intermediate + m->heads * m->context + m->hidden)
           + (int64_t)threads * (thread_scratch_floats(m, B) + B * m->hidden);
}

/* x [B, hidden]: the rows' embeddings, overwritten with the final hidden states; logits [B, vocab] out (or
 * [1, vocab] for the last row only, with `last_only`). Row b decodes into cache slot slots[b] at position
 * positions[b] (< context), attending to positions 0..pos. Every row's keys and values are cached before any
 * row attends, so rows of one slot at consecutive positions are a causal prompt chunk (prefill). */
void lowbit_decode_step(const lb_model *m, float *x, int64_t B, const int64_t *slots, const int64_t *positions,
                        float *logits, float *work, int threads, int last_only) {
    const int64_t H = m->hidden, D = m->head_dim, heads = m->heads, kv_heads = m->kv_heads;
    const int64_t I = m->intermediate, T = m->context, QKV = (heads + 2 * kv_heads) * D;
    const int64_t group_ratio = heads / kv_heads;
    float *qkv = work, *attn = qkv + B * QKV, *gu = attn + B * heads * D, *act = gu + B * 2 * I;
    float *scores = act + B * I, *out = scores + B * heads * T, *per_thread = out + B * H;
    const int64_t scratch_floats = thread_scratch_floats(m, B);

    #pragma omp parallel num_threads(threads)
    {
        /* Each thread normalises the rows itself into its own h (a few hundred floats), which saves the barrier
         * a shared copy would need before the next matmul: 2 of a layer's 8 barriers (one more is saved where
         * each thread applies the MLP's activation to the gate and up rows it computed). */
        float *xsum = per_thread + (int64_t)omp_get_thread_num() * (scratch_floats + B * H);
        float *h = xsum + scratch_floats;
        const int activations = (int)m->activations;
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lb_layer *layer = &m->layers[l];
            for (int64_t b = 0; b < B; b++) rms_norm(x + b * H, layer->input_norm, H, m->norm_eps, h + b * H);
            matmul_parts(layer->qkv, 3, h, B, qkv, QKV, xsum, activations);

            /* per-head norms (Qwen3, Gemma 3), rotary embedding, and this token's keys and values into the cache */
            #pragma omp for schedule(static) collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < heads + kv_heads; j++) {
                    const int64_t pos = positions[b];
                    float *v = qkv + b * QKV + j * D;
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

            #pragma omp for schedule(static) collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t hh = 0; hh < heads; hh++) {
                    const int64_t pos = positions[b];
                    const int64_t base = ((l * m->slots + slots[b]) * kv_heads + hh / group_ratio) * T * D;
                    const float *q = qkv + b * QKV + hh * D, *keys = m->k_cache + base, *values = m->v_cache + base;
                    float *score = scores + (b * heads + hh) * T, *head_out = attn + b * heads * D + hh * D;
                    /* positions first..pos: all of them, or the last `window` (pos - t < window) */
                    const int64_t first = layer->window > 0 && pos >= layer->window ? pos - layer->window + 1 : 0;
                    float top = -INFINITY;
                    for (int64_t t = first; t <= pos; t++) {
                        score[t] = softcap(dot(q, keys + t * D, D) * m->attn_scale, m->attn_softcap);
                        if (score[t] > top) top = score[t];
                    }
                    float total = 0.0f;
                    for (int64_t t = first; t <= pos; t++) {
                        score[t] = expf(score[t] - top);
                        total += score[t];
                    }
                    for (int64_t i = 0; i < D; i++) head_out[i] = 0.0f;
                    for (int64_t t = first; t <= pos; t++) {
                        const float p = score[t];
                        const float *vt = values + t * D;
                        #pragma omp simd
                        for (int64_t i = 0; i < D; i++) head_out[i] += p * vt[i];
                    }
                    const float inv = 1.0f / total;
                    for (int64_t i = 0; i < D; i++) head_out[i] *= inv;
                }

            if (layer->attn_out_norm) {                                   /* x += norm(attention output) */
                lb_matmul(&layer->o, attn, B, out, H, 0, xsum, activations, 1);
                add_normed(x, out, layer->attn_out_norm, B, H, m->norm_eps, h);
            } else {
                lb_matmul(&layer->o, attn, B, x, H, 1, xsum, activations, 1);  /* x += attention output */
            }
            for (int64_t b = 0; b < B; b++) rms_norm(x + b * H, layer->mlp_norm, H, m->norm_eps, h + b * H);
            const lb_linear *gate = &layer->gate_up[0], *up = &layer->gate_up[1];
            const int64_t per_item = lb_matmul_rows_per_item(gate);
            if (gate->n == I && up->n == I && lb_matmul_rows_per_item(up) == per_item) {
                /* separate gate and up: each thread applies the activation to the rows it computed of both (the
                 * same static partition, see lb_matmul_rows_per_item), so no barrier between the matmuls and it */
                lb_matmul(gate, h, B, gu, 2 * I, 0, xsum, activations, 0);
                lb_matmul(up, h, B, gu + I, 2 * I, 0, xsum, activations, 0);
                #pragma omp for schedule(static)
                for (int64_t item = 0; item < (I + per_item - 1) / per_item; item++)
                    for (int64_t b = 0; b < B; b++)
                        for (int64_t j = item * per_item; j < lb_min(I, (item + 1) * per_item); j++)
                            act[b * I + j] = activation(gu[b * 2 * I + j], m->activation) * gu[b * 2 * I + I + j];
            } else {
                matmul_parts(layer->gate_up, 2, h, B, gu, 2 * I, xsum, activations);
                #pragma omp for schedule(static)
                for (int64_t i = 0; i < B * I; i++) {
                    const int64_t b = i / I, j = i - b * I;
                    act[i] = activation(gu[b * 2 * I + j], m->activation) * gu[b * 2 * I + I + j];
                }
            }
            if (layer->mlp_out_norm) {                                    /* x += norm(MLP output) */
                lb_matmul(&layer->down, act, B, out, H, 0, xsum, activations, 1);
                add_normed(x, out, layer->mlp_out_norm, B, H, m->norm_eps, h);
            } else {
                lb_matmul(&layer->down, act, B, x, H, 1, xsum, activations, 1);  /* x += MLP output */
            }
        }
        const int64_t first = last_only ? B - 1 : 0;
        for (int64_t b = first; b < B; b++) rms_norm(x + b * H, m->final_norm, H, m->norm_eps, h + b * H);
        lb_matmul(&m->lm_head, h + first * H, B - first, logits, m->lm_head.n, 0, xsum, activations, 1);
        if (m->final_softcap > 0.0f) {
            const int64_t count = (B - first) * m->lm_head.n;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < count; i++) logits[i] = softcap(logits[i], m->final_softcap);
        }
    }
}
