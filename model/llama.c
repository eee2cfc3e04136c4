/*
 * llama.c - the Llama forward pass. See llama.h.
 *
 * Tokens are processed in chunks: every weight row is dequantised once per
 * chunk and reused for all its tokens, which is what makes scoring long texts
 * affordable on a few cores. Attention goes through oscar_append +
 * oscar_attention (q_len = chunk), so later tokens always read the cache as
 * oscar stores it.
 */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"
#include "llama_gpu.h"
#include "qmatmul.h"

#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void seterr(char *err, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

/* ---- loading ------------------------------------------------------------ */

static int get_u32_arch(const gguf_file *f, const char *arch, const char *key, uint32_t *out) {
    char k[160];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    return gguf_get_u32(f, k, out);
}

static int get_f32_arch(const gguf_file *f, const char *arch, const char *key, float *out) {
    char k[160];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    return gguf_get_f32(f, k, out);
}

static int bind_mat(const gguf_file *f, const char *name, int64_t rows, int64_t cols, qmat *out,
                    char *err, size_t n) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        seterr(err, n, "tensor '%s' is missing", name);
        return -1;
    }
    if (t->n_dims > 2 || (int64_t)t->ne[0] != cols || (int64_t)t->ne[1] != rows) {
        seterr(err, n, "tensor '%s' has shape [%llu, %llu], expected [%lld, %lld]", name,
               (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (long long)cols, (long long)rows);
        return -1;
    }
    if (!ggml_type_supported(t->type)) {
        seterr(err, n, "tensor '%s' has type %s (ggml type %u), which this runner does not read "
               "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)", name, ggml_type_name(t->type), t->type);
        return -1;
    }
    uint64_t be, bb;
    ggml_type_block(t->type, &be, &bb);
    out->type = t->type;
    out->rows = rows;
    out->cols = cols;
    out->row_bytes = (size_t)((uint64_t)cols / be * bb);
    out->data = t->data;
    out->owned = NULL;
    return 0;
}

static const float *bind_vec(const gguf_file *f, const char *name, int64_t len, char *err, size_t n) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        seterr(err, n, "tensor '%s' is missing", name);
        return NULL;
    }
    if (t->type != GGML_T_F32 || t->n_elements != (uint64_t)len) {
        seterr(err, n, "tensor '%s' must be F32 with %lld elements (is %s, %llu)", name, (long long)len,
               ggml_type_name(t->type), (unsigned long long)t->n_elements);
        return NULL;
    }
    if (((uintptr_t)t->data & 3) != 0) {
        seterr(err, n, "tensor '%s' is not 4-byte aligned in the file", name);
        return NULL;
    }
    return (const float *)t->data;
}

/* Replaces a matrix by an fp32 copy we own (for folding). */
static int own_f32(qmat *w) {
    float *p = malloc((size_t)(w->rows * w->cols) * sizeof *p);
    if (!p) return -1;
    for (int64_t r = 0; r < w->rows; r++)
        ggml_dequantize_row(w->type, (const uint8_t *)w->data + (size_t)r * w->row_bytes, p + r * w->cols, w->cols);
    w->owned = p;
    w->data = p;
    w->type = GGML_T_F32;
    w->row_bytes = (size_t)w->cols * sizeof(float);
    return 0;
}

void llama_free(llama_model *m) {
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->n_layers; l++) {
            free(m->layers[l].wv.owned);
            free(m->layers[l].wo.owned);
        }
    }
    free(m->layers);
    free(m->rope_freq);
    free(m->rope_freq_swa);
    free(m->name);
    tok_free(m->tok);
    gguf_close(m->file);
    free(m);
}

llama_model *llama_load(const char *path, int fold_v, char *err, size_t n) {
    llama_model *m = calloc(1, sizeof *m);
    if (!m) {
        seterr(err, n, "out of memory");
        return NULL;
    }
    m->file = gguf_open(path, err, n);
    if (!m->file) {
        free(m);
        return NULL;
    }
    gguf_file *f = m->file;
    char *arch = gguf_get_string(f, "general.architecture");
    if (arch && strcmp(arch, "llama") == 0) {
        m->arch = LLAMA_ARCH_LLAMA;
    } else if (arch && strcmp(arch, "qwen3") == 0) {
        m->arch = LLAMA_ARCH_QWEN3;
        m->rope_neox = 1;
    } else if (arch && strcmp(arch, "gemma3") == 0) {
        m->arch = LLAMA_ARCH_GEMMA3;
        m->rope_neox = 1;
    } else {
        seterr(err, n, "'%s': architecture '%s' is not supported (only 'llama', 'qwen3' and 'gemma3')", path,
               arch ? arch : "(missing)");
        free(arch);
        llama_free(m);
        return NULL;
    }
    uint32_t v;
#define NEED_U32(key, dst)                                                                      \
    do {                                                                                        \
        if (get_u32_arch(f, arch, key, &v) != 0 || v == 0 || v > (1u << 20)) {                  \
            seterr(err, n, "'%s': metadata %s.%s is missing or invalid", path, arch, key);      \
            free(arch);                                                                         \
            llama_free(m);                                                                      \
            return NULL;                                                                        \
        }                                                                                       \
        dst = (int)v;                                                                           \
    } while (0)
    /* Optional fields, when present, get the same bounds: a value cast to int
     * unchecked could go negative (a negative rope.dimension_count passed the
     * shape checks below and sized an allocation from it). */
#define OPT_U32(key, dst, fallback)                                                             \
    do {                                                                                        \
        dst = (fallback);                                                                       \
        if (get_u32_arch(f, arch, key, &v) == 0) {                                              \
            if (v == 0 || v > (1u << 20)) {                                                     \
                seterr(err, n, "'%s': metadata %s.%s = %u is out of range 1..%u", path, arch, key, \
                       v, 1u << 20);                                                            \
                free(arch);                                                                     \
                llama_free(m);                                                                  \
                return NULL;                                                                    \
            }                                                                                   \
            dst = (int)v;                                                                       \
        }                                                                                       \
    } while (0)
    NEED_U32("block_count", m->n_layers);
    NEED_U32("embedding_length", m->dim);
    NEED_U32("feed_forward_length", m->ffn_dim);
    NEED_U32("attention.head_count", m->n_heads);
    OPT_U32("attention.head_count_kv", m->n_kv_heads, m->n_heads);
    OPT_U32("context_length", m->ctx_max, 2048);
    OPT_U32("attention.key_length", m->head_dim, m->dim / m->n_heads);
    OPT_U32("rope.dimension_count", m->rope_dim, m->head_dim);
#undef OPT_U32
    m->eps = 1e-5f;
    get_f32_arch(f, arch, "attention.layer_norm_rms_epsilon", &m->eps);
    m->rope_base = 10000.0f;
    get_f32_arch(f, arch, "rope.freq_base", &m->rope_base);
    if (!(m->eps > 0.0f) || isinf(m->eps) || !(m->rope_base > 1.0f) || isinf(m->rope_base)) {
        seterr(err, n, "'%s': RMS norm epsilon %g or RoPE base %g is not a usable number", path, (double)m->eps,
               (double)m->rope_base);
        free(arch);
        llama_free(m);
        return NULL;
    }
    {
        char k[160];
        snprintf(k, sizeof k, "%s.rope.scaling.type", arch);
        char *st = gguf_get_string(f, k);
        int bad = st && strcmp(st, "none") != 0;
        if (bad) seterr(err, n, "'%s': RoPE scaling '%s' is not supported", path, st);
        free(st);
        if (bad) {
            free(arch);
            llama_free(m);
            return NULL;
        }
    }
    if (m->arch == LLAMA_ARCH_GEMMA3) {
        /* llama.cpp's reading of a gemma3 GGUF (llama-model.cpp), which stores neither the layer
         * pattern nor the local RoPE base: every sixth layer (5, 11, 17, ...) is global, the others
         * see the last attention.sliding_window positions with RoPE base 10000; the query scale is
         * 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim, true of all but the 27B model). */
        NEED_U32("attention.sliding_window", m->swa_window);
        m->rope_base_swa = 10000.0f;
        get_f32_arch(f, arch, "rope.freq_base_swa", &m->rope_base_swa);
        const char *unsupported[] = {"attention.sliding_window_pattern", "final_logit_softcapping",
                                     "attn_logit_softcapping"};
        for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
            char k[160];
            snprintf(k, sizeof k, "%s.%s", arch, unsupported[i]);
            if (gguf_find_kv(f, k)) {
                seterr(err, n, "'%s': metadata %s is not supported by this runner", path, k);
                free(arch);
                llama_free(m);
                return NULL;
            }
        }
        if (!(m->rope_base_swa > 1.0f) || isinf(m->rope_base_swa)) {
            seterr(err, n, "'%s': local RoPE base %g is not a usable number", path, (double)m->rope_base_swa);
            free(arch);
            llama_free(m);
            return NULL;
        }
    }
    free(arch);
#undef NEED_U32
    if (m->n_kv_heads <= 0 || m->n_heads % m->n_kv_heads != 0 || m->head_dim <= 0 || (m->head_dim & 1) ||
        m->rope_dim > m->head_dim || (m->rope_dim & 1)) {
        seterr(err, n, "'%s': inconsistent attention shape (heads %d, kv heads %d, head dim %d, rope dim %d)",
               path, m->n_heads, m->n_kv_heads, m->head_dim, m->rope_dim);
        llama_free(m);
        return NULL;
    }
    m->name = gguf_get_string(f, "general.name");
    m->embed_scale = m->arch == LLAMA_ARCH_GEMMA3 ? sqrtf((float)m->dim) : 1.0f;
    m->attn_scale = (float)(1.0 / sqrt((double)m->head_dim));

    m->tok = tok_load(f, err, n);
    if (!m->tok) {
        llama_free(m);
        return NULL;
    }
    m->vocab = tok_vocab_size(m->tok);

    int64_t qd = (int64_t)m->n_heads * m->head_dim, kvd = (int64_t)m->n_kv_heads * m->head_dim;
    if (bind_mat(f, "token_embd.weight", m->vocab, m->dim, &m->embed, err, n) != 0) goto fail;
    if (gguf_find_tensor(f, "output.weight")) {
        if (bind_mat(f, "output.weight", m->vocab, m->dim, &m->output, err, n) != 0) goto fail;
    } else {
        m->output = m->embed; /* tied embeddings */
    }
    if (!(m->out_norm = bind_vec(f, "output_norm.weight", m->dim, err, n))) goto fail;
    m->layers = calloc((size_t)m->n_layers, sizeof *m->layers);
    if (!m->layers) {
        seterr(err, n, "out of memory");
        goto fail;
    }
    for (int l = 0; l < m->n_layers; l++) {
        llama_layer *L = &m->layers[l];
        char nm[96];
#define T(name) (snprintf(nm, sizeof nm, "blk.%d." name ".weight", l), nm)
        if (!(L->attn_norm = bind_vec(f, T("attn_norm"), m->dim, err, n))) goto fail;
        if (!(L->ffn_norm = bind_vec(f, T("ffn_norm"), m->dim, err, n))) goto fail;
        if (m->arch == LLAMA_ARCH_QWEN3 || m->arch == LLAMA_ARCH_GEMMA3) {
            if (!(L->q_norm = bind_vec(f, T("attn_q_norm"), m->head_dim, err, n))) goto fail;
            if (!(L->k_norm = bind_vec(f, T("attn_k_norm"), m->head_dim, err, n))) goto fail;
        }
        if (m->arch == LLAMA_ARCH_GEMMA3) {
            /* The file's norm weights already hold Gemma's (1 + w): llama.cpp's converter adds the 1. */
            if (!(L->post_attn_norm = bind_vec(f, T("post_attention_norm"), m->dim, err, n))) goto fail;
            if (!(L->post_ffn_norm = bind_vec(f, T("post_ffw_norm"), m->dim, err, n))) goto fail;
            L->swa = m->swa_window > 0 && (l + 1) % 6 != 0;
        }
        L->kv_layer = L->swa ? m->n_swa_layers++ : l - m->n_swa_layers;
        if (bind_mat(f, T("attn_q"), qd, m->dim, &L->wq, err, n) != 0 ||
            bind_mat(f, T("attn_k"), kvd, m->dim, &L->wk, err, n) != 0 ||
            bind_mat(f, T("attn_v"), kvd, m->dim, &L->wv, err, n) != 0 ||
            bind_mat(f, T("attn_output"), m->dim, qd, &L->wo, err, n) != 0 ||
            bind_mat(f, T("ffn_gate"), m->ffn_dim, m->dim, &L->wgate, err, n) != 0 ||
            bind_mat(f, T("ffn_up"), m->ffn_dim, m->dim, &L->wup, err, n) != 0 ||
            bind_mat(f, T("ffn_down"), m->dim, m->ffn_dim, &L->wdown, err, n) != 0)
            goto fail;
#undef T
        if (fold_v && !L->swa) { /* only the layers whose values the oscar cache holds */
            if (own_f32(&L->wv) != 0 || own_f32(&L->wo) != 0) {
                seterr(err, n, "out of memory");
                goto fail;
            }
            oscar_status st = oscar_fold_hadamard_wv(L->wv.owned, m->n_kv_heads, m->head_dim, m->dim);
            if (st == OSCAR_OK) st = oscar_fold_hadamard_wo(L->wo.owned, m->dim, m->n_heads, m->head_dim);
            if (st != OSCAR_OK) {
                seterr(err, n, "folding the Hadamard rotation into layer %d failed: %s", l, oscar_status_name(st));
                goto fail;
            }
        }
    }
    m->v_folded = fold_v;
    m->rope_freq = malloc((size_t)(m->rope_dim / 2) * sizeof *m->rope_freq);
    if (!m->rope_freq) {
        seterr(err, n, "out of memory");
        goto fail;
    }
    for (int i = 0; i < m->rope_dim / 2; i++) m->rope_freq[i] = pow((double)m->rope_base, -2.0 * i / m->rope_dim);
    if (m->n_swa_layers > 0) {
        m->rope_freq_swa = malloc((size_t)(m->rope_dim / 2) * sizeof *m->rope_freq_swa);
        if (!m->rope_freq_swa) {
            seterr(err, n, "out of memory");
            goto fail;
        }
        for (int i = 0; i < m->rope_dim / 2; i++)
            m->rope_freq_swa[i] = pow((double)m->rope_base_swa, -2.0 * i / m->rope_dim);
    }
    if (llama_cache_layers(m) == 0) {
        seterr(err, n, "'%s': every layer is a sliding-window layer; the oscar cache would hold none", path);
        goto fail;
    }
    return m;
fail:
    llama_free(m);
    return NULL;
}

/* ---- kernels ------------------------------------------------------------ */

/* One product of a group that shares its input: y[t, r] = sum_c x[t, c] W[r, c]. */
typedef struct mm_job {
    const qmat *w;
    float *y;
} mm_job;

enum { ROW_TILE = 32 }; /* rows per work item: ~11 KiB of Q4_1 weights, reused by every token of the chunk */

/*
 * Runs the products of a group with one input x [T, cols] (Q, K and V; gate
 * and up) in one parallel region: the input is quantised to int8 blocks once
 * (for the quantised weights), then row tiles of all the group's matrices
 * are shared among the threads. So a decode step pays four fork/joins per
 * layer (QKV, output, gate/up, down; the attention adds the library's own)
 * instead of one per matrix, and no allocation.
 */
/* The activation blocks of the quantised products: 16-bit codes (results
 * within ~1e-5 of fp32 ones) unless OSCAR_ACT=q8 asks for llama.cpp's int8
 * ones (faster; see qmatmul.h for why they are not the default). */
static qm_act act_format(void) {
    static int fmt = -1;
    if (fmt < 0) {
        const char *e = getenv("OSCAR_ACT");
        fmt = e && strcmp(e, "q8") == 0 ? QM_ACT_Q8 : QM_ACT_Q16;
    }
    return (qm_act)fmt;
}

static void matmul_group(const mm_job *jobs, int n_jobs, const float *x, int T, void *xq) {
    const int64_t cols = jobs[0].w->cols;
    const qm_act act = act_format();
    const size_t xq_row = qm_act_row_bytes(act, cols);
    int need_q8 = 0;
    int64_t tiles = 0, first_tile[8];
    for (int j = 0; j < n_jobs; j++) {
        need_q8 |= qm_wants_int_acts(jobs[j].w->type);
        first_tile[j] = tiles;
        tiles += (jobs[j].w->rows + ROW_TILE - 1) / ROW_TILE;
    }
    /* A decode step's few rows are quantised here: a worksharing loop would
     * cost a barrier inside the region for a microsecond of work. */
    const int quantise_inside = need_q8 && T > 4;
    if (need_q8 && !quantise_inside)
        for (int t = 0; t < T; t++) qm_quantize(act, x + (int64_t)t * cols, (uint8_t *)xq + t * xq_row, cols);
#pragma omp parallel
    {
        if (quantise_inside) {
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) qm_quantize(act, x + (int64_t)t * cols, (uint8_t *)xq + t * xq_row, cols);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < tiles; tile++) {
            int j = n_jobs - 1;
            while (first_tile[j] > tile) j--;
            const qmat *w = jobs[j].w;
            const int64_t r0 = (tile - first_tile[j]) * ROW_TILE;
            const int64_t nr = w->rows - r0 < ROW_TILE ? w->rows - r0 : ROW_TILE;
            qm_gemm(w->type, act, (const uint8_t *)w->data + (size_t)r0 * w->row_bytes, w->row_bytes, cols, nr,
                    qm_wants_int_acts(w->type) ? (const void *)xq : (const void *)x, T, jobs[j].y + r0, w->rows);
        }
    }
}

static void matmul(float *y, const float *x, const qmat *w, int T, void *xq) {
    const mm_job job = {w, y};
    matmul_group(&job, 1, x, T, xq);
}

static void rmsnorm(float *out, const float *x, const float *w, int T, int dim, float eps) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (int64_t)t * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float s = (float)(1.0 / sqrt(ss / dim + eps));
        for (int i = 0; i < dim; i++) out[(int64_t)t * dim + i] = xr[i] * s * w[i];
    }
}

/* Llama GGUFs store Q/K permuted by the converter so that the rotation pairs

 * are adjacent elements (2i, 2i+1): llama.cpp's "normal" RoPE. Qwen3 GGUFs
 * keep Hugging Face's layout, whose pairs are (i, i + rope_dim/2) ("neox"). */
static void rope_table(const llama_model *m, const double *freq, float *cs, int T, int64_t pos0) {
    const int half = m->rope_dim / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            double a = (double)(pos0 + t) * freq[i];
            cs[((int64_t)t * half + i) * 2] = (float)cos(a);
            cs[((int64_t)t * half + i) * 2 + 1] = (float)sin(a);
        }
}

/* cs: the chunk's cos/sin pairs (rope_table), computed once for all layers. */
static void rope(const llama_model *m, const float *cs, float *x, int T, int n_heads) {
    const int d = m->head_dim, half = m->rope_dim / 2;
    const int stride = m->rope_neox ? 1 : 2, partner = m->rope_neox ? half : 1;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            float c = cs[((int64_t)t * half + i) * 2], s = cs[((int64_t)t * half + i) * 2 + 1];
            for (int h = 0; h < n_heads; h++) {
                float *p = x + ((int64_t)t * n_heads + h) * d + stride * i;
                float x0 = p[0], x1 = p[partner];
                p[0] = x0 * c - x1 * s;
                p[partner] = x0 * s + x1 * c;
            }
        }
    }
}

/* ---- KV cache ----------------------------------------------------------- */

int llama_kv_init(llama_kv *kv, const llama_model *m, const oscar_config *cfg_in, int use_f32,
                  int64_t max_tokens, char *err, size_t n) {
    memset(kv, 0, sizeof *kv);
    kv->use_f32 = use_f32;
    kv->cap = max_tokens;
    if (m->n_swa_layers > 0) {
        if (cfg_in && cfg_in->backend == OSCAR_BACKEND_CUDA) {
            seterr(err, n, "--device cuda: the GPU runner has no sliding-window layers (gemma3); use the CPU runner");
            return -1;
        }
        /* The ring holds the window plus `slack` positions, so a chunk of up to slack + 1 tokens
         * can be appended before its queries attend (llama_next_chunk keeps chunks there).
         * OSCAR_SWA_RING_SLACK shrinks it so that tests wrap the ring on short texts. */
        int64_t slack = 512;
        const char *env = getenv("OSCAR_SWA_RING_SLACK");
        if (env && atoi(env) > 0 && atoi(env) < 512) slack = atoi(env);
        const int64_t want = (int64_t)m->swa_window + slack;
        kv->swa_cap = max_tokens < want ? max_tokens : want;
        kv->swa_max_chunk = max_tokens <= want ? 0 : (int)slack + 1; /* 0: the ring never wraps */
        size_t sz = (size_t)m->n_swa_layers * (size_t)kv->swa_cap * (size_t)(m->n_kv_heads * m->head_dim);
        kv->swa_k = malloc(sz * sizeof(float));
        kv->swa_v = malloc(sz * sizeof(float));
        if (!kv->swa_k || !kv->swa_v) {
            llama_kv_free(kv);
            seterr(err, n, "out of memory for the sliding-window layers' %lld-position ring", (long long)kv->swa_cap);
            return -1;
        }
    }
    if (use_f32) {
        size_t sz = (size_t)llama_cache_layers(m) * (size_t)max_tokens * (size_t)(m->n_kv_heads * m->head_dim);
        kv->k = malloc(sz * sizeof(float));
        kv->v = malloc(sz * sizeof(float));
        if (!kv->k || !kv->v) {
            llama_kv_free(kv);
            seterr(err, n, "out of memory for a %lld-token fp32 cache", (long long)max_tokens);
            return -1;
        }
        return 0;
    }
    oscar_config c = cfg_in ? *cfg_in : oscar_config_default();
    c.head_dim = m->head_dim;
    c.num_kv_heads = m->n_kv_heads;
    c.num_q_heads = m->n_heads;
    c.num_layers = llama_cache_layers(m);
    c.max_seqs = 1;
    c.rotate_values = m->v_folded ? 0 : 1;
    if (c.residual <= 0) c.residual = 128;
    c.block_count = (int)(max_tokens / c.residual + 2);
    if (c.method != OSCAR_METHOD_NONE) {
        kv->residual = c.residual;
        kv->pack_offset = c.sink_tokens + c.rollback_tokens;
    }
    if (c.backend == OSCAR_BACKEND_CUDA) {
#ifdef OSCAR_MODEL_GPU
        kv->gpu = llama_gpu_create(m, &c, max_tokens, m->gpu_weights_f32 ? LLAMA_GPU_WEIGHTS_F32 : LLAMA_GPU_WEIGHTS_BF16,
                                   err, n);
        return kv->gpu ? 0 : -1;
#else
        seterr(err, n, "--device cuda: this oscar was built without the CUDA backend (nvcc not found)");
        return -1;
#endif
    }
    c.backend = OSCAR_BACKEND_CPU;
    char e2[256] = "";
    oscar_status st = oscar_cache_create(&c, &kv->oc, e2, sizeof e2);
    if (st != OSCAR_OK) {
        seterr(err, n, "cannot create the oscar cache: %s (%s)", e2, oscar_status_name(st));
        llama_kv_free(kv);
        return -1;
    }
    st = oscar_seq_add(kv->oc, &kv->seq);
    if (st != OSCAR_OK) {
        seterr(err, n, "oscar_seq_add: %s", oscar_last_error(kv->oc));
        llama_kv_free(kv);
        return -1;
    }
    return 0;
}

int llama_next_chunk(const llama_kv *kv, int64_t end, int max) {
    int64_t p = kv->len, n = end - p < max ? end - p : max;
    if (kv->swa_max_chunk > 0 && n > kv->swa_max_chunk) n = kv->swa_max_chunk;
    if (kv->residual > 0 && n > 1) {
        /* a block packs when the length reaches off + k R (k >= 1): token
         * off + k R - 1 completes it (sinks and a rollback lag shift it) */
        const int64_t R = kv->residual, off = kv->pack_offset;
        int64_t k = p - off + 1 <= R ? 1 : (p - off + 1 + R - 1) / R;
        int64_t upto = off + k * R - 1 - p;
        n = upto <= 0 ? 1 : (n < upto ? n : upto);
    }
    return (int)n;
}

int llama_kv_reset(llama_kv *kv, char *err, size_t n) {
    kv->len = 0;
    if (kv->use_f32) return 0;
#ifdef OSCAR_MODEL_GPU
    if (kv->gpu) {
        llama_gpu_reset(kv->gpu);
        return 0;
    }
#endif
    oscar_status st = oscar_seq_free(kv->oc, kv->seq);
    if (st == OSCAR_OK) st = oscar_seq_add(kv->oc, &kv->seq);
    if (st != OSCAR_OK) {
        seterr(err, n, "resetting the oscar sequence: %s", oscar_last_error(kv->oc));
        return -1;
    }
    return 0;
}

void llama_kv_free(llama_kv *kv) {
#ifdef OSCAR_MODEL_GPU
    if (kv->gpu) llama_gpu_free(kv->gpu);
#endif
    if (kv->oc) oscar_cache_destroy(kv->oc);
    free(kv->k);
    free(kv->v);
    free(kv->swa_k);
    free(kv->swa_v);
    memset(kv, 0, sizeof *kv);
}

/* The runner's own attention over fp32 keys and values: exact softmax, fp64
 * sums. K, V: one layer's [ring][kv_dim], position j in row j % ring (ring =
 * the capacity for the full cache, which never wraps). window > 0: the query
 * at position p sees positions p - window + 1 .. p only (local layers). */
static void attention_f32(const llama_model *m, const float *K, const float *V, int64_t ring, int window,
                          const float *q, float *out, int T, int64_t pos0) {
    const int d = m->head_dim, hq = m->n_heads, g = m->n_heads / m->n_kv_heads;
    const int64_t kvd = (int64_t)m->n_kv_heads * d;
    const double scale = m->attn_scale;
#pragma omp parallel
    {
        double *sc = malloc((size_t)(pos0 + T) * sizeof *sc);
        double *acc = malloc((size_t)d * sizeof *acc);
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < hq; h++) {
                const float *qh = q + ((int64_t)t * hq + h) * d;
                int kh = h / g;
                const int64_t n_ctx = pos0 + t + 1;
                const int64_t j0 = window > 0 && n_ctx > window ? n_ctx - window : 0;
                double mx = -INFINITY;
                for (int64_t j = j0; j < n_ctx; j++) {
                    const float *kr = K + (j % ring) * kvd + (int64_t)kh * d;
                    double s = 0;
                    for (int c = 0; c < d; c++) s += (double)qh[c] * kr[c];
                    sc[j] = s * scale;
                    if (sc[j] > mx) mx = sc[j];
                }
                double sum = 0;
                for (int c = 0; c < d; c++) acc[c] = 0;
                for (int64_t j = j0; j < n_ctx; j++) {
                    double p = exp(sc[j] - mx);
                    sum += p;
                    const float *vr = V + (j % ring) * kvd + (int64_t)kh * d;
                    for (int c = 0; c < d; c++) acc[c] += p * vr[c];
                }
                float *o = out + ((int64_t)t * hq + h) * d;
                for (int c = 0; c < d; c++) o[c] = (float)(acc[c] / sum);
            }
        free(sc);
        free(acc);
    }
}

/* ---- forward ------------------------------------------------------------ */

int llama_state_init(llama_state *s, const llama_model *m, int max_chunk) {
    memset(s, 0, sizeof *s);
    s->max_chunk = max_chunk;
    size_t T = (size_t)max_chunk;
    size_t qd = (size_t)m->n_heads * m->head_dim, kvd = (size_t)m->n_kv_heads * m->head_dim;
    s->x = malloc(T * m->dim * sizeof(float));
    s->xb = malloc(T * ((size_t)m->dim > qd ? (size_t)m->dim : qd) * sizeof(float));
    s->q = malloc(T * qd * sizeof(float));
    s->k = malloc(T * kvd * sizeof(float));
    s->v = malloc(T * kvd * sizeof(float));
    s->att = malloc(T * qd * sizeof(float));
    s->xo = malloc(T * m->dim * sizeof(float));
    s->hb = malloc(T * m->ffn_dim * sizeof(float));
    s->hb2 = malloc(T * m->ffn_dim * sizeof(float));
    s->logits = malloc(T * m->vocab * sizeof(float));
    size_t widest = (size_t)m->dim > qd ? (size_t)m->dim : qd;
    if ((size_t)m->ffn_dim > widest) widest = (size_t)m->ffn_dim;
    s->xq = malloc(T * (widest / QM_BLOCK + 1) * sizeof(act_q16)); /* the larger format */
    s->rope_cs = malloc(T * (size_t)m->rope_dim * sizeof(float));
    if (m->rope_freq_swa && !(s->rope_cs_swa = malloc(T * (size_t)m->rope_dim * sizeof(float)))) {
        llama_state_free(s);
        return -1;
    }
    if (!s->xq || !s->rope_cs || !s->x || !s->xb || !s->q || !s->k || !s->v || !s->att || !s->xo || !s->hb || !s->hb2 || !s->logits) {
        llama_state_free(s);
        return -1;
    }
    return 0;
}

void llama_state_free(llama_state *s) {
    free(s->x); free(s->xb); free(s->q); free(s->k); free(s->v);
    free(s->att); free(s->xo); free(s->hb); free(s->hb2); free(s->logits);
    free(s->xq); free(s->rope_cs); free(s->rope_cs_swa);
    memset(s, 0, sizeof *s);
}

int llama_forward(const llama_model *m, llama_state *s, llama_kv *kv, const int32_t *tokens, int T,
                  int n_logits, char *err, size_t n) {
    if (T <= 0 || T > s->max_chunk || n_logits < 0 || n_logits > T) {
        seterr(err, n, "internal: bad chunk size %d (max %d)", T, s->max_chunk);
        return -1;
    }
    if (kv->len + T > kv->cap) {
        seterr(err, n, "context full: %lld + %d tokens exceed the cache's %lld", (long long)kv->len, T,
               (long long)kv->cap);
        return -1;
    }
#ifdef OSCAR_MODEL_GPU
    if (kv->gpu) {
        if (llama_gpu_forward(kv->gpu, tokens, T, n_logits, s->logits, s->key_hook, s->key_hook_ud, err, n) != 0)
            return -1;
        kv->len += T;
        return 0;
    }
#endif
    const int dim = m->dim, kvd = m->n_kv_heads * m->head_dim;
    const int64_t pos0 = kv->len;
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= m->vocab) {
            seterr(err, n, "token id %d is outside the vocabulary (%d)", tokens[t], m->vocab);
            return -1;
        }
        ggml_dequantize_row(m->embed.type, (const uint8_t *)m->embed.data + (size_t)tokens[t] * m->embed.row_bytes,
                            s->x + (int64_t)t * dim, dim);
        if (m->embed_scale != 1.0f)
            for (int i = 0; i < dim; i++) s->x[(int64_t)t * dim + i] *= m->embed_scale;
    }
    rope_table(m, m->rope_freq, s->rope_cs, T, pos0);
    if (s->rope_cs_swa) rope_table(m, m->rope_freq_swa, s->rope_cs_swa, T, pos0);
    for (int l = 0; l < m->n_layers; l++) {
        const llama_layer *L = &m->layers[l];
        rmsnorm(s->xb, s->x, L->attn_norm, T, dim, m->eps);
        const mm_job qkv[3] = {{&L->wq, s->q}, {&L->wk, s->k}, {&L->wv, s->v}};
        matmul_group(qkv, 3, s->xb, T, s->xq);
        if (L->q_norm) { /* Qwen3, Gemma 3: each head's q and k RMS-normalised (in place) */
            rmsnorm(s->q, s->q, L->q_norm, T * m->n_heads, m->head_dim, m->eps);
            rmsnorm(s->k, s->k, L->k_norm, T * m->n_kv_heads, m->head_dim, m->eps);
        }
        const float *cs = L->swa ? s->rope_cs_swa : s->rope_cs;
        rope(m, cs, s->q, T, m->n_heads);
        rope(m, cs, s->k, T, m->n_kv_heads);
        if (s->key_hook) s->key_hook(s->key_hook_ud, l, pos0, T, s->k);
        if (L->swa) { /* a local layer: the runner's exact ring, whatever the cache method */
            const size_t base = (size_t)L->kv_layer * (size_t)kv->swa_cap * kvd;
            for (int t = 0; t < T; t++) {
                const size_t off = base + (size_t)((pos0 + t) % kv->swa_cap) * kvd;
                memcpy(kv->swa_k + off, s->k + (size_t)t * kvd, (size_t)kvd * sizeof(float));
                memcpy(kv->swa_v + off, s->v + (size_t)t * kvd, (size_t)kvd * sizeof(float));
            }
            attention_f32(m, kv->swa_k + base, kv->swa_v + base, kv->swa_cap, m->swa_window, s->q, s->att, T, pos0);
        } else if (kv->use_f32) {
            const size_t base = (size_t)L->kv_layer * kv->cap * kvd, off = base + (size_t)pos0 * kvd;
            memcpy(kv->k + off, s->k, (size_t)T * kvd * sizeof(float));
            memcpy(kv->v + off, s->v, (size_t)T * kvd * sizeof(float));
            attention_f32(m, kv->k + base, kv->v + base, kv->cap, 0, s->q, s->att, T, pos0);
        } else {
            int32_t nt = T;
            oscar_status st = oscar_append(kv->oc, L->kv_layer, 1, &kv->seq, &nt, s->k, s->v, OSCAR_DTYPE_F32, NULL);
            if (st == OSCAR_OK)
                st = oscar_attention(kv->oc, L->kv_layer, 1, &kv->seq, T, s->q, OSCAR_DTYPE_F32, s->att,
                                     OSCAR_DTYPE_F32, m->attn_scale, NULL);
            if (st != OSCAR_OK) {
                seterr(err, n, "oscar (layer %d): %s: %s", l, oscar_status_name(st), oscar_last_error(kv->oc));
                return -1;
            }
        }
        matmul(s->xo, s->att, &L->wo, T, s->xq);
        if (L->post_attn_norm) rmsnorm(s->xo, s->xo, L->post_attn_norm, T, dim, m->eps);
        for (int64_t i = 0; i < (int64_t)T * dim; i++) s->x[i] += s->xo[i];
        rmsnorm(s->xb, s->x, L->ffn_norm, T, dim, m->eps);
        const mm_job gate_up[2] = {{&L->wgate, s->hb}, {&L->wup, s->hb2}};
        matmul_group(gate_up, 2, s->xb, T, s->xq);
        if (m->arch == LLAMA_ARCH_GEMMA3) { /* GELU, tanh approximation */
            for (int64_t i = 0; i < (int64_t)T * m->ffn_dim; i++) {
                float g = s->hb[i];
                s->hb[i] = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g))) * s->hb2[i];
            }
        } else { /* SiLU */
            for (int64_t i = 0; i < (int64_t)T * m->ffn_dim; i++) {
                float g = s->hb[i];
                s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i];
            }
        }
        matmul(s->xo, s->hb, &L->wdown, T, s->xq);
        if (L->post_ffn_norm) rmsnorm(s->xo, s->xo, L->post_ffn_norm, T, dim, m->eps);
        for (int64_t i = 0; i < (int64_t)T * dim; i++) s->x[i] += s->xo[i];
    }
    kv->len += T;
    if (n_logits > 0) {
        const float *xl = s->x + (int64_t)(T - n_logits) * dim;
        rmsnorm(s->xb, xl, m->out_norm, n_logits, dim, m->eps);
        matmul(s->logits, s->xb, &m->output, n_logits, s->xq);
    }
    return 0;
}
