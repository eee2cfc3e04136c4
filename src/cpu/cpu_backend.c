/* CPU backend: the pool in host memory, append/pack through the reference
 * packer, and a multi-threaded decode attention that reads the packed codes
 * in place (no dequantised copy of the cache is ever made).
 *
 * Attention works on items of (sequence, KV head, run of blocks). Each item
 * computes a partial softmax (max, sum, unnormalised output) over its tokens
 * for all g*q_len query rows of the KV head, so every K/V byte is read once
 * per GQA group; partials are merged with the usual log-sum-exp rule. */
#include "attention_q2.h"
#include "format.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* The hot attention functions are compiled twice on x86-64: for AVX2+FMA
 * (x86-64-v3) and for the baseline, and the loader picks one per CPU
 * (ifunc), so a portable build (OSCAR_NATIVE=OFF) keeps 8-wide vectors.
 * Results do not depend on the copy: C11 mode does not contract a * b + c
 * into fma, and every copy does the same operations in the same order. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__)
#define CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v3", "default")))
/* the 8-wide helpers are always inlined, so their vector ABI never shows */
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define CPU_DISPATCH
#endif

typedef struct cpu_state {
    uint8_t *pool;    /* [layer][block] layer blocks                     */
    uint8_t *windows; /* [layer][slot] K [R][Hkv][d] then V [R][Hkv][d]  */
    size_t pool_bytes, windows_bytes;
    int own_pool, own_windows;
    const oscar_allocator *allocator;
    int32_t *packed;  /* [layer][slot] blocks packed (the batch API's state) */
    int32_t *held;    /* [layer][slot] tokens written (lowering seq_len is a rollback) */
    /* Attention's per-call scratch (work items, rotated queries, partials,
     * per-thread buffers), 64-byte aligned. Kept in the handle and grown
     * only when a call needs more than every call before it, so a steady
     * decode loop allocates nothing (a handle serves one thread at a time). */
    uint8_t *scratch;
    size_t scratch_bytes;
} cpu_state;

static cpu_state *ST(oscar_cache *c) { return (cpu_state *)c->backend_state; }

static uint8_t *layer_block(oscar_cache *c, int layer, int32_t b) {
    return ST(c)->pool + ((size_t)layer * c->cfg.block_count + (size_t)b) * c->lay.layer_block_bytes;
}

/* A slot's layer: K [sinks + window_rows][Hkv][d], then V the same. The sink
 * rows (config.sink_tokens) come first; window_k/window_v point past them. */
static uint8_t *sink_k(oscar_cache *c, int layer, int32_t slot) {
    return ST(c)->windows + ((size_t)layer * c->cfg.max_seqs + (size_t)slot) * c->lay.window_layer_bytes;
}

static uint8_t *sink_v(oscar_cache *c, int layer, int32_t slot) {
    return sink_k(c, layer, slot) + c->lay.window_layer_bytes / 2;
}

static uint8_t *window_k(oscar_cache *c, int layer, int32_t slot) {
    return sink_k(c, layer, slot) + (size_t)c->lay.sinks * c->lay.hkv * c->lay.d * c->lay.window_esize;
}

static uint8_t *window_v(oscar_cache *c, int layer, int32_t slot) {
    return window_k(c, layer, slot) + c->lay.window_layer_bytes / 2;
}

/* The window's token sums of squares (window_rows floats). */
static float *window_ss(oscar_cache *c, int layer, int32_t slot) {
    return (float *)(ST(c)->windows + c->lay.window_ss_offset) +
           ((size_t)layer * c->cfg.max_seqs + (size_t)slot) * (size_t)c->lay.window_rows;
}

static int thread_count(const oscar_cache *c) {
    return c->cfg.num_threads > 0 ? c->cfg.num_threads : omp_get_max_threads();
}

static void *alloc64(size_t n) {
    n = (n + 63) & ~(size_t)63;
    return OSCAR_ALIGNED_ALLOC(64, n ? n : 64);
}

static void sizes(const oscar_config *cfg, const oscar_layout *L, size_t *pool, size_t *win) {
    *pool = L->layer_block_bytes * (size_t)cfg->num_layers * (size_t)cfg->block_count;
    *win = L->windows_bytes;
}

static uint8_t *region(cpu_state *s, void *given, size_t bytes, int *owned) {
    *owned = given == NULL;
    if (given) return (uint8_t *)given;
    if (s->allocator) return (uint8_t *)s->allocator->alloc(s->allocator->user, bytes ? bytes : 64, 256);
    return (uint8_t *)alloc64(bytes);
}

static void region_free(cpu_state *s, uint8_t *p, size_t bytes, int owned) {
    if (!p || !owned) return;
    if (s->allocator)
        s->allocator->free(s->allocator->user, p, bytes ? bytes : 64);
    else
        free(p);
}

static void cpu_destroy(oscar_cache *c) {
    cpu_state *s = ST(c);
    region_free(s, s->pool, s->pool_bytes, s->own_pool);
    region_free(s, s->windows, s->windows_bytes, s->own_windows);
    free(s->packed);
    free(s->held);
    free(s->scratch);
    free(s);
    c->backend_state = NULL;
}

/* At least `bytes` of the handle's scratch (64-byte aligned), or NULL when
 * growing it fails; the old buffer is kept then, so the cache is as it was. */
static uint8_t *scratch_at_least(cpu_state *s, size_t bytes) {
    if (bytes <= s->scratch_bytes) return s->scratch;
    uint8_t *p = (uint8_t *)alloc64(bytes);
    if (!p) return NULL;
    free(s->scratch);
    s->scratch = p;
    s->scratch_bytes = bytes;
    return p;
}

/* Carves consecutive 64-byte-aligned pieces out of one buffer. */
static size_t carve(size_t *off, size_t bytes) {
    const size_t at = *off;
    *off += (bytes + 63) & ~(size_t)63;
    return at;
}

static oscar_status cpu_init(oscar_cache *c, const oscar_memory_source *mem) {
    cpu_state *s = (cpu_state *)OSCAR_CALLOC(1, sizeof *s);
    if (!s) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "out of host memory");
    s->allocator = mem ? mem->allocator : NULL;
    sizes(&c->cfg, &c->lay, &s->pool_bytes, &s->windows_bytes);
    s->pool = region(s, mem ? mem->pool : NULL, s->pool_bytes, &s->own_pool);
    s->windows = region(s, mem ? mem->windows : NULL, s->windows_bytes, &s->own_windows);
    s->packed = (int32_t *)OSCAR_CALLOC((size_t)c->cfg.num_layers * (size_t)c->cfg.max_seqs, sizeof(int32_t));
    s->held = (int32_t *)OSCAR_CALLOC((size_t)c->cfg.num_layers * (size_t)c->cfg.max_seqs, sizeof(int32_t));
    c->backend_state = s;
    if (!s->pool || !s->windows || !s->packed || !s->held) {
        const double mib = (double)(s->pool_bytes + s->windows_bytes) / 1048576.0;
        cpu_destroy(c); /* frees s */
        return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "cannot allocate %.1f MiB of host memory for the pool", mib);
    }
    /* Caller memory may hold anything; the library's own starts zeroed too,
     * so that both read the same. */
    memset(s->pool, 0, s->pool_bytes);
    memset(s->windows, 0, s->windows_bytes);
    return OSCAR_OK;
}

static oscar_status cpu_requirements(const oscar_config *cfg, oscar_memory_requirements *out, char *eb, size_t en) {
    oscar_layout L;
    oscar_layout_init(&L, cfg);
    sizes(cfg, &L, &out->pool_bytes, &out->window_bytes);
    out->workspace_bytes = 0; /* the CPU backend's scratch is per call */
    out->alignment = 256;
    return OSCAR_OK;
}

/* ---- append ------------------------------------------------------------ */

static int all_finite(const void *p, oscar_dtype dt, int64_t n) {
    /* Exponent all ones means Inf or NaN in every one of the three formats. */
    if (dt == OSCAR_DTYPE_F32) {
        const uint32_t *x = (const uint32_t *)p;
        uint32_t bad = 0;
        for (int64_t i = 0; i < n; i++) bad |= ((x[i] & 0x7f800000u) == 0x7f800000u);
        return !bad;
    }
    const uint16_t *x = (const uint16_t *)p;
    const uint16_t m = dt == OSCAR_DTYPE_F16 ? 0x7c00u : 0x7f80u;
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= ((x[i] & m) == m);
    return !bad;
}

static oscar_status cpu_append(oscar_cache *c, int layer, const oscar_append_job *jobs, int n_jobs, int64_t rows,
                               const void *k, const void *v, oscar_dtype dtype, const float *tp_sumsq,
                               int tp_heads, void *stream) {
    const oscar_layout *L = &c->lay;
    const int d = L->d, R = L->residual;
    const size_t row = (size_t)L->hkv * d, es = (size_t)L->window_esize, in_es = (size_t)oscar_dtype_size(dtype);
    if (c->cfg.check_finite && rows > 0) {
        if (!all_finite(k, dtype, rows * (int64_t)row))
            return oscar_set_error(c, OSCAR_E_NONFINITE, "append: K contains NaN or Inf; nothing was appended");
        if (!all_finite(v, dtype, rows * (int64_t)row))
            return oscar_set_error(c, OSCAR_E_NONFINITE, "append: V contains NaN or Inf; nothing was appended");
    }
    const int nt = thread_count(c);
    int64_t n_pairs = 0;
    for (int i = 0; i < n_jobs; i++) n_pairs += jobs[i].n_flush;
    /* Every buffer is taken before the first byte of the cache is written,
     * so running out of memory leaves the cache as it was. */
    uint8_t *staged = (uint8_t *)OSCAR_MALLOC(2 * (size_t)(rows ? rows : 1) * row * es);
    float *ss_new = (float *)OSCAR_MALLOC(sizeof(float) * (size_t)(rows ? rows : 1));
    float *rowbuf = (float *)OSCAR_MALLOC(sizeof(float) * row * 2 * (size_t)nt);
    /* per thread: K, V, scratch [R][row] and the block's token sums [R] */
    const size_t pack_floats = (size_t)R * row * 3 + (size_t)R;
    float *packbuf = n_pairs ? (float *)OSCAR_MALLOC(sizeof(float) * pack_floats * (size_t)nt) : NULL;
    int64_t *pair_job = n_pairs ? (int64_t *)OSCAR_MALLOC(sizeof(int64_t) * 2 * (size_t)n_pairs) : NULL;
    if (!staged || !ss_new || !rowbuf || (n_pairs && (!packbuf || !pair_job))) {
        free(staged), free(ss_new), free(rowbuf), free(packbuf), free(pair_job);
        return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "append: out of host memory");
    }
    uint8_t *staged_v = staged + (size_t)rows * row * es;

    /* 1. Rotate every new token and round it to the window dtype: these are
     *    the values the window holds and that blocks are quantised from. */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *xk = rowbuf + (size_t)omp_get_thread_num() * row * 2, *xv = xk + row;
        oscar_to_f32((const uint8_t *)k + (size_t)r * row * in_es, dtype, xk, (int64_t)row);
        oscar_to_f32((const uint8_t *)v + (size_t)r * row * in_es, dtype, xv, (int64_t)row);
        for (int h = 0; h < L->hkv; h++) {
            if (L->rotate) oscar_fwht(xk + (size_t)h * d, d);
            if (L->rotate_v) oscar_fwht(xv + (size_t)h * d, d);
        }
        oscar_from_f32(xk, staged + (size_t)r * row * es, (oscar_dtype)L->window_dtype, (int64_t)row);
        oscar_from_f32(xv, staged_v + (size_t)r * row * es, (oscar_dtype)L->window_dtype, (int64_t)row);
        /* the token's key sum of squares, over the stored (rounded) values,
         * or over every shard's heads as the caller gathered them */
        if (tp_sumsq) {
            ss_new[r] = oscar_sum_heads(tp_sumsq + (size_t)r * tp_heads, tp_heads);
        } else {
            oscar_to_f32(staged + (size_t)r * row * es, (oscar_dtype)L->window_dtype, xk, (int64_t)row);
            ss_new[r] = oscar_row_sumsq(L, xk);
        }
    }

    /* 1b. Sink tokens (config.sink_tokens) go to their rows for good. */
    for (int i = 0; i < n_jobs; i++) {
        const oscar_append_job *j = &jobs[i];
        if (j->sink_new <= 0) continue;
        const int64_t src = j->input_row - j->sink_new;
        memcpy(sink_k(c, layer, j->seq_slot) + (size_t)j->sink_before * row * es, staged + (size_t)src * row * es,
               (size_t)j->sink_new * row * es);
        memcpy(sink_v(c, layer, j->seq_slot) + (size_t)j->sink_before * row * es, staged_v + (size_t)src * row * es,
               (size_t)j->sink_new * row * es);
    }

    /* 2. Quantise every block that fills up. */
    int64_t pi = 0;
    for (int i = 0; i < n_jobs; i++)
        for (int f = 0; f < jobs[i].n_flush; f++, pi++) {
            pair_job[2 * pi] = i;
            pair_job[2 * pi + 1] = f;
        }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t p = 0; p < n_pairs; p++) {
        const oscar_append_job *j = &jobs[pair_job[2 * p]];
        int f = (int)pair_job[2 * p + 1];
        float *xk = packbuf + (size_t)omp_get_thread_num() * pack_floats, *xv = xk + (size_t)R * row,
              *scratch = xv + (size_t)R * row, *ss = scratch + (size_t)R * row;
        const uint8_t *wk = window_k(c, layer, j->seq_slot), *wv = window_v(c, layer, j->seq_slot);
        const float *wss = window_ss(c, layer, j->seq_slot);
        for (int t = 0; t < R; t++) {
            int64_t sidx = (int64_t)f * R + t; /* index in window ++ new tokens */
            const uint8_t *srck, *srcv;
            if (sidx < j->window_before) {
                srck = wk + (size_t)sidx * row * es;
                srcv = wv + (size_t)sidx * row * es;
                ss[t] = wss[sidx];
            } else {
                int64_t r = j->input_row + sidx - j->window_before;
                srck = staged + (size_t)r * row * es;
                srcv = staged_v + (size_t)r * row * es;
                ss[t] = ss_new[r];
            }
            oscar_to_f32(srck, (oscar_dtype)L->window_dtype, xk + (size_t)t * row, (int64_t)row);
            oscar_to_f32(srcv, (oscar_dtype)L->window_dtype, xv + (size_t)t * row, (int64_t)row);
        }
        oscar_pack_block(L, xk, xv, ss, layer_block(c, layer, j->flush_blocks[f]), scratch);
    }

    /* 3. The tokens left over become the window: stream tokens
     *    [n_flush*R, window_before + n_new). With a rollback lag some of them
     *    are old window rows, which move down by n_flush*R rows (memmove:
     *    the ranges may touch, never in the wrong order). */
    for (int i = 0; i < n_jobs; i++) {
        const oscar_append_job *j = &jobs[i];
        const int64_t shift = (int64_t)j->n_flush * R;
        uint8_t *wk = window_k(c, layer, j->seq_slot), *wv = window_v(c, layer, j->seq_slot);
        float *wss = window_ss(c, layer, j->seq_slot);
        int64_t from_window = j->window_before - shift; /* old rows that stay */
        if (from_window < 0) from_window = 0;
        if (shift > 0 && from_window > 0) {
            memmove(wk, wk + (size_t)shift * row * es, (size_t)from_window * row * es);
            memmove(wv, wv + (size_t)shift * row * es, (size_t)from_window * row * es);
            memmove(wss, wss + shift, (size_t)from_window * sizeof(float));
        }
        const int64_t dst = j->n_flush ? from_window : j->window_before;
        const int64_t keep = j->window_after - dst;
        const int64_t src = j->input_row + j->n_new - keep;
        if (keep > 0) {
            memcpy(wk + (size_t)dst * row * es, staged + (size_t)src * row * es, (size_t)keep * row * es);
            memcpy(wv + (size_t)dst * row * es, staged_v + (size_t)src * row * es, (size_t)keep * row * es);
            memcpy(wss + dst, ss_new + src, (size_t)keep * sizeof(float));
        }
    }
    free(staged), free(ss_new), free(rowbuf), free(packbuf), free(pair_job);
    return OSCAR_OK;
}

/* ---- attention ----------------------------------------------------------- */

/* Dot product with 16 independent partial sums, so the compiler can keep
 * them in one vector register without reassociating a serial sum. */
static inline float dot16(const float *a, const float *b, int n) {
    float part[16] = {0};
    for (int i = 0; i < n; i += 16)
        for (int k = 0; k < 16; k++) part[k] += a[i + k] * b[i + k];
    float s = 0.0f;
    for (int k = 0; k < 16; k++) s += part[k];
    return s;
}

enum { MAX_ROWS = 8 }; /* query rows handled together; more rows loop */

/* Per-thread scratch of the attention kernel. */
typedef struct attn_scratch {
    float *logits; /* [rows][max item tokens]                 */
    float *qt;     /* [rows][d] query times key scale          */
    float *acc;    /* [rows][d] unnormalised output, rotated   */
    float *vbias;  /* [rows][d/Gv] sum of p * value lo         */
    float *qlocal; /* [rows][d] this item's rotated queries    */
    float *row;    /* [d] one converted row                    */
    double *dacc;  /* [rows][d] float64 output total of the item */
} attn_scratch;

/*
 * The code tiles are laid out for a GPU warp (docs/FORMAT.md). On the CPU
 * the eight lanes g = 0..7 that share t = lane % 4 are processed together
 * as one 8-wide vector: for keys they hold the same channels of tokens g
 * (or g + 8), for values eight consecutive channels of one token. So every
 * decoded code vector meets one broadcast scalar and accumulates straight
 * into token logits or output channels, with no reshuffling.
 */
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8u gather_words(const uint32_t *tile, int t, int w, int W) {
    v8u x;
    for (int g = 0; g < 8; g++) x[g] = tile[(4 * g + t) * W + w];
    return x;
}

/* Codes are used centred, code - Q/2, and the group's midpoint lo + sc*Q/2
 * takes the place of lo. Both parts then stay near the size of the values
 * themselves, so the sums over channels and tokens do not cancel two large
 * terms of opposite sign (which cost fp32 digits at long contexts). */
static inline __attribute__((always_inline)) v8f decode(v8u x, int shift, uint32_t mask) {
    return __builtin_convertvector((x >> shift) & mask, v8f) - (float)mask * 0.5f;
}

/* A 3-bit code (format version 5): its low two bits from the 2-bit plane's
 * word x, its high bit from the 1-bit plane's word xh; centred, code - 3.5. */
static inline __attribute__((always_inline)) v8f decode3(v8u x, int shift, v8u xh, int hshift) {
    return __builtin_convertvector(((x >> shift) & 3u) | (((xh >> hshift) & 1u) << 2), v8f) - 3.5f;
}

typedef int32_t v8i __attribute__((vector_size(32)));

/* exp(x) for x <= 0, 8 at a time (Cephes expf: x = n ln2 + r, |r| <= ln2/2,
 * degree-6 polynomial; within 2 ulp of expf). Below -87.3 it returns about
 * 1e-38 instead of underflowing to 0, which no softmax sum notices. */
static inline __attribute__((always_inline)) v8f exp_nonpositive(v8f x) {
    const v8f lo = (v8f){0} - 87.3f;
    const v8i small = x < lo;
    x = (v8f)(((v8i)x & ~small) | ((v8i)lo & small));
    const v8f fn = x * 1.44269504088896341f - 0.5f; /* x <= 0: trunc(x log2e - 0.5) rounds to nearest */
    const v8i n = __builtin_convertvector(fn, v8i);
    const v8f nf = __builtin_convertvector(n, v8f);
    const v8f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8f y = (v8f){0} + 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * (r * r) + r + 1.0f;
    return y * (v8f)((n + 127) << 23);
}

/* Logits of the R tokens of one quantised block for one KV head. P (pairs
 * per word), NR (query rows) and B3 are compile-time constants at each call
 * site, so the accumulators live in registers. B3: 3-bit codes, read as the
 * 2-bit plane (P = 8) plus the high-bit plane after it (FORMAT.md, version
 * 5): low-plane word w of a lane holds pairs 8w..8w+7, which sit in
 * high-plane word w/2 at slots 8(w&1)..8(w&1)+7. */
static inline __attribute__((always_inline)) void block_logits_q(const oscar_layout *L, const uint8_t *blk, int h,
                                                                 float *out, int64_t ld, float sm, attn_scratch *S,
                                                                 const int P, const int NR, const int B3) {
    const int d = L->d, R = L->residual, bits = 16 / P, W = d * bits / 64; /* bits = L->kbits (2 if B3) */
    const uint32_t Q = B3 ? 7u : (1u << bits) - 1u;
    const int Wh = d / 64; /* B3: words per lane chunk of the high-bit plane */
    const uint8_t *base = blk + (size_t)h * L->head_bytes;
    const uint16_t *kp = (const uint16_t *)(base + L->kcodes_bytes + L->vcodes_bytes);
    const float *norms = (const float *)(blk + (size_t)L->hkv * L->head_bytes) + (L->norm_per_head ? (size_t)h * R : 0);
    const size_t tile_bytes = 2 * (size_t)d * bits;
    const uint8_t *hplane = base + (size_t)R * d / 4; /* B3 */
    float bias[MAX_ROWS], gscale[256], glo[256]; /* glo: group midpoints */
    for (int g0 = 0; g0 < R; g0 += L->k_group) {
        const uint16_t *gp = kp + (size_t)(g0 / L->k_group) * d * 2;
        float pairs[512];
        oscar_to_f32(gp, OSCAR_DTYPE_F16, pairs, 2 * d);
        for (int c = 0; c < d; c++) {
            gscale[c] = pairs[2 * c];
            glo[c] = pairs[2 * c + 1] + gscale[c] * ((float)Q * 0.5f); /* midpoint */
        }
        for (int r = 0; r < NR; r++) {
            const float *qv = S->qlocal + (size_t)r * d;
            float *qt = S->qt + (size_t)r * d;
            for (int c = 0; c < d; c++) qt[c] = qv[c] * gscale[c];
            bias[r] = dot16(qv, glo, d);
        }
        for (int T = g0 / 16; T < (g0 + L->k_group) / 16; T++) {
            const uint32_t *tile = (const uint32_t *)(base + (size_t)T * tile_bytes);
            const uint32_t *htile = (const uint32_t *)(hplane + (size_t)T * 2 * d);
            v8f acc[MAX_ROWS][2]; /* tokens 0..7 and 8..15 of the tile */
            for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = (v8f){0};
            for (int t = 0; t < 4; t++)
                for (int w = 0; w < W; w++) {
                    const v8u x = gather_words(tile, t, w, W);
                    const v8u xh = B3 ? gather_words(htile, t, w >> 1, Wh) : x;
                    for (int p = 0; p < P; p++)
                        for (int e = 0; e < 2; e++) {
                            const int q = w * P + p, j = q & 3;
                            const int ch = 16 * (q >> 2) + 2 * t + 8 * (j >> 1) + e;
                            const v8f cv = B3 ? decode3(x, 16 * e + 2 * p, xh, 16 * e + 8 * (w & 1) + p)
                                              : decode(x, 16 * e + bits * p, Q);
                            for (int r = 0; r < NR; r++) acc[r][j & 1] += S->qt[(size_t)r * d + ch] * cv;
                        }
                }
            for (int r = 0; r < NR; r++)
                for (int i = 0; i < 16; i++) {
                    const int tok = T * 16 + i;
                    const float s = (L->scale_keys ? norms[tok] : 1.0f) * sm;
                    out[(size_t)r * ld + tok] = s * (bias[r] + acc[r][i >> 3][i & 7]);
                }
        }
    }
}

/* Adds sum_t p[r][t] * value_t of one quantised block to S->acc (codes times
 * scale) and S->vbias (the lo part, added once per item). For a fixed word
 * index w every lane's codes land in the same P/2 channel octets, so those
 * accumulators stay in registers across the four t lanes. */
static inline __attribute__((always_inline)) void block_values_q(const oscar_layout *L, const uint8_t *blk, int h,
                                                                 const float *prob, int64_t ld, attn_scratch *S,
                                                                 const int P, const int NR, const int B3) {
    /* L->vbits; B3: 3-bit codes, two planes, as in block_logits_q */
    const int d = L->d, R = L->residual, bits = 16 / P, W = d * bits / 64, ng = d / L->v_group, Wh = d / 64;
    const uint32_t Q = B3 ? 7u : (1u << bits) - 1u;
    const uint8_t *base = blk + (size_t)h * L->head_bytes;
    const uint8_t *vc = base + L->kcodes_bytes;
    const uint16_t *vp = (const uint16_t *)(base + L->kcodes_bytes + L->vcodes_bytes + L->kparams_bytes);
    const size_t tile_bytes = 2 * (size_t)d * bits;
    float ps[MAX_ROWS][16][16]; /* [row][token in tile][group] p * scale */
    for (int T = 0; T < R / 16; T++) {
        float pairs[16 * 16 * 2]; /* the tile's (scale, lo) pairs as floats */
        oscar_to_f32(vp + (size_t)T * 16 * ng * 2, OSCAR_DTYPE_F16, pairs, 16 * ng * 2);
        for (int r = 0; r < NR; r++) {
            const float *pr = prob + (size_t)r * ld + T * 16;
            float *vb = S->vbias + (size_t)r * ng;
            for (int tok = 0; tok < 16; tok++)
                for (int gi = 0; gi < ng; gi++) {
                    const float sc = pairs[(tok * ng + gi) * 2], lo = pairs[(tok * ng + gi) * 2 + 1];
                    ps[r][tok][gi] = pr[tok] * sc;
                    vb[gi] += pr[tok] * (lo + sc * ((float)Q * 0.5f)); /* midpoint */
                }
        }
        const uint32_t *tile = (const uint32_t *)(vc + (size_t)T * tile_bytes);
        const uint32_t *htile = (const uint32_t *)(vc + (size_t)R * d / 4 + (size_t)T * 2 * d);
        for (int w = 0; w < W; w++) {
            /* Octet o of this word: channels 16*(w*P/4 + o/2) + 8*(o&1) + 0..7. */
            v8f acc[MAX_ROWS][4];
            const int c_first = 16 * (w * P / 4);
            for (int r = 0; r < NR; r++)
                for (int o = 0; o < P / 2; o++)
                    memcpy(&acc[r][o], S->acc + (size_t)r * d + c_first + 8 * o, sizeof(v8f));
            for (int t = 0; t < 4; t++) {
                const v8u x = gather_words(tile, t, w, W);
                const v8u xh = B3 ? gather_words(htile, t, w >> 1, Wh) : x;
                for (int p = 0; p < P; p++)
                    for (int e = 0; e < 2; e++) {
                        const int q = w * P + p, j = q & 3;
                        const int tok = 2 * t + 8 * (j >> 1) + e, o = ((q >> 2) - w * P / 4) * 2 + (j & 1);
                        const int gi = 16 * (q >> 2) / L->v_group;
                        const v8f cv = B3 ? decode3(x, 16 * e + 2 * p, xh, 16 * e + 8 * (w & 1) + p)
                                          : decode(x, 16 * e + bits * p, Q);
                        for (int r = 0; r < NR; r++) acc[r][o] += ps[r][tok][gi] * cv;
                    }
            }
            for (int r = 0; r < NR; r++)
                for (int o = 0; o < P / 2; o++)
                    memcpy(S->acc + (size_t)r * d + c_first + 8 * o, &acc[r][o], sizeof(v8f));
        }
    }
}

/* Copies of the kernels specialised for each row count (1..MAX_ROWS). */
#define ROW_CASE(n, CALL8, CALL4)                                                                                     \
    case n:                                                                                                           \
        if (P == 8) CALL8(n);                                                                                         \
        else CALL4(n);                                                                                                \
        break;
#define ROW_SWITCH(CALL8, CALL4)                                                                                      \
    switch (nr) {                                                                                                     \
        ROW_CASE(1, CALL8, CALL4) ROW_CASE(2, CALL8, CALL4) ROW_CASE(3, CALL8, CALL4) ROW_CASE(4, CALL8, CALL4)       \
        ROW_CASE(5, CALL8, CALL4) ROW_CASE(6, CALL8, CALL4) ROW_CASE(7, CALL8, CALL4) ROW_CASE(8, CALL8, CALL4)       \
    }

CPU_DISPATCH static void logits_q(const oscar_layout *L, const uint8_t *blk, int h, int nr, float *out, int64_t ld, float sm,
                     attn_scratch *S, int P) {
#define L8(n) block_logits_q(L, blk, h, out, ld, sm, S, 8, n, 0)
#define L4(n) block_logits_q(L, blk, h, out, ld, sm, S, 4, n, 0)
    ROW_SWITCH(L8, L4)
#undef L8
#undef L4
}

/* 3-bit codes (format version 5): the 2-bit plane's word order (P = 8) plus
 * the high-bit plane. */
CPU_DISPATCH static void logits_q3(const oscar_layout *L, const uint8_t *blk, int h, int nr, float *out, int64_t ld,
                                   float sm, attn_scratch *S) {
    const int P = 8;
#define L3(n) block_logits_q(L, blk, h, out, ld, sm, S, 8, n, 1)
    ROW_SWITCH(L3, L3)
#undef L3
}

CPU_DISPATCH static void values_q(const oscar_layout *L, const uint8_t *blk, int h, const float *prob, int64_t ld, int nr,
                     attn_scratch *S, int P) {
#define V8(n) block_values_q(L, blk, h, prob, ld, S, 8, n, 0)
#define V4(n) block_values_q(L, blk, h, prob, ld, S, 4, n, 0)
    ROW_SWITCH(V8, V4)
#undef V8
#undef V4
}

CPU_DISPATCH static void values_q3(const oscar_layout *L, const uint8_t *blk, int h, const float *prob, int64_t ld,
                                   int nr, attn_scratch *S) {
    const int P = 8;
#define V3(n) block_values_q(L, blk, h, prob, ld, S, 8, n, 1)
    ROW_SWITCH(V3, V3)
#undef V3
}

typedef struct attn_item {
    int job, head;
    int32_t u0, u1; /* units: blocks 0..n_blocks-1, then the window as unit n_blocks;
                       the sink rows (config.sink_tokens) are unit -1, an item alone */
} attn_item;

typedef struct attn_ctx {
    oscar_cache *c;
    const oscar_layout *L;
    int layer, q_len, g, ng;
    int Pk, Pv; /* code pairs per 32-bit word of keys, values: 16 / bits (2 and 4 bits) */
    float sm;
    size_t max_tok;
} attn_ctx;

/* Partial softmax of rows [r0, r0+nr) of one item. Writes, per row, the max
 * logit, the sum of exp and the unnormalised output (rotated space) to pres. */
CPU_DISPATCH static void attend_rows(const attn_ctx *X, const oscar_attn_job *J, const attn_item *itm, const float *qr_job,
                        int r0, int nr, attn_scratch *S, float *pres) {
    const oscar_layout *L = X->L;
    oscar_cache *c = X->c;
    const int d = L->d, R = L->residual, h = itm->head, q_len = X->q_len, ng = X->ng;
    const size_t es = (size_t)L->window_esize, kvrow = (size_t)L->hkv * d;
    const int64_t ld = (int64_t)X->max_tok;
    for (int r = 0; r < nr; r++) {
        int jj = (r0 + r) / q_len, qi = (r0 + r) % q_len;
        memcpy(S->qlocal + (size_t)r * d, qr_job + ((size_t)qi * L->hq + (size_t)h * X->g + jj) * d,
               sizeof(float) * d);
    }
    /* token positions: sinks 0..sink_tokens-1, then blocks, then the window */
    const int64_t sk = J->sink_tokens;
    int64_t t_first = 0, ntok = sk; /* the sink item (u0 = -1) */
    if (itm->u0 >= 0) {
        const int64_t u_end = itm->u1 > J->n_blocks ? (int64_t)(itm->u1 - 1) * R + J->window_tokens : (int64_t)itm->u1 * R;
        t_first = sk + (int64_t)itm->u0 * R;
        ntok = u_end - (int64_t)itm->u0 * R;
    }
    /* Pass 1: logits. */
    for (int32_t u = itm->u0; u < itm->u1; u++) {
        float *lo = S->logits + (size_t)(u - itm->u0) * R;
        const uint8_t *kb;
        size_t stride;
        int n;
        if (u < 0) { /* sink rows, exact */
            kb = sink_k(c, X->layer, J->seq_slot) + (size_t)h * d * es;
            stride = kvrow * es;
            n = (int)sk;
        } else if (u < J->n_blocks) {
            const uint8_t *blk = layer_block(c, X->layer, J->block_table[u]);
            if (L->quantised) {
                /* keys by their own width (key_bits): the 2-bit kernel or the generic one */
                if (L->kbits == 2) /* src/cpu/attention_q2.c */
                    oscar_q2_logits(d, R, L->k_group, blk + (size_t)h * L->head_bytes,
                                    (const uint16_t *)(blk + (size_t)h * L->head_bytes + L->kcodes_bytes +
                                                       L->vcodes_bytes),
                                    L->scale_keys ? (const float *)(blk + (size_t)L->hkv * L->head_bytes) +
                                                        (L->norm_per_head ? (size_t)h * R : 0)
                                                  : NULL,
                                    nr, S->qlocal, X->sm, lo, ld);
                else if (L->kbits == 3) /* two code planes */
                    logits_q3(L, blk, h, nr, lo, ld, X->sm, S);
                else
                    logits_q(L, blk, h, nr, lo, ld, X->sm, S, X->Pk);
                continue;
            }
            kb = blk + (size_t)h * L->head_bytes;
            stride = (size_t)d * es;
            n = R;
        } else {
            kb = window_k(c, X->layer, J->seq_slot) + (size_t)h * d * es;
            stride = kvrow * es;
            n = J->window_tokens;
        }
        for (int t = 0; t < n; t++) {
            oscar_to_f32(kb + (size_t)t * stride, (oscar_dtype)L->window_dtype, S->row, d);
            for (int r = 0; r < nr; r++) lo[(size_t)r * ld + t] = dot16(S->qlocal + (size_t)r * d, S->row, d) * X->sm;
        }
    }
    /* Pass 2: causal mask among the new tokens, then exp. */
    for (int r = 0; r < nr; r++) {
        int qi = (r0 + r) % q_len;
        int64_t limit = J->tokens - q_len + 1 + qi - t_first; /* tokens this query sees here */
        if (limit > ntok) limit = ntok;
        float *lr = S->logits + (size_t)r * ld;
        float m = -INFINITY;
        {   /* the max 8 lanes at a time (exact, so the same as one lane) */
            v8f vm = (v8f){0} - INFINITY;
            int64_t t = 0;
            for (; t + 8 <= limit; t += 8) {
                v8f v;
                memcpy(&v, lr + t, sizeof v);
                const v8i gt = v > vm;
                vm = (v8f)(((v8i)v & gt) | ((v8i)vm & ~gt));
            }
            for (int k = 0; k < 8; k++) m = vm[k] > m ? vm[k] : m;
            for (; t < limit; t++) m = lr[t] > m ? lr[t] : m;
        }
        /* exp 8 at a time, summed in 8 lanes; tokens past the causal limit get 0 */
        v8f vsum = (v8f){0};
        int64_t t = 0;
        if (m > -INFINITY)
            for (; t + 8 <= limit; t += 8) {
                v8f v;
                memcpy(&v, lr + t, sizeof v);
                v = exp_nonpositive(v - m);
                memcpy(lr + t, &v, sizeof v);
                vsum += v;
            }
        float sum = 0.0f;
        for (int k = 0; k < 8; k++) sum += vsum[k];
        for (; t < ntok; t++) {
            float p = (t < limit && m > -INFINITY) ? expf(lr[t] - m) : 0.0f;
            lr[t] = p;
            sum += p;
        }
        pres[(size_t)r * (d + 2)] = m;
        pres[(size_t)r * (d + 2) + 1] = sum;
    }
    /* Pass 3: values. Each unit (block or window) sums in fp32 and is then
     * added to a float64 total, so long contexts do not lose digits. */
    for (size_t i = 0; i < (size_t)nr * d; i++) S->dacc[i] = 0.0;
    for (int32_t u = itm->u0; u < itm->u1; u++) {
        const float *pr = S->logits + (size_t)(u - itm->u0) * R;
        memset(S->acc, 0, sizeof(float) * (size_t)nr * d);
        memset(S->vbias, 0, sizeof(float) * (size_t)nr * ng);
        const uint8_t *vb = NULL;
        size_t stride = 0;
        int n = 0, quant = 0;
        if (u < 0) { /* sink rows, exact */
            vb = sink_v(c, X->layer, J->seq_slot) + (size_t)h * d * es;
            stride = kvrow * es;
            n = (int)sk;
        } else if (u < J->n_blocks) {
            const uint8_t *blk = layer_block(c, X->layer, J->block_table[u]);
            if (L->quantised) {
                const uint8_t *hb = blk + (size_t)h * L->head_bytes;
                if (L->vbits == 2) /* values by their own width (value_bits) */
                    oscar_q2_values(d, R, L->v_group, hb + L->kcodes_bytes,
                                    (const uint16_t *)(hb + L->kcodes_bytes + L->vcodes_bytes + L->kparams_bytes), nr,
                                    pr, ld, S->acc, S->vbias);
                else if (L->vbits == 3)
                    values_q3(L, blk, h, pr, ld, nr, S);
                else
                    values_q(L, blk, h, pr, ld, nr, S, X->Pv);
                quant = 1;
            } else {
                vb = blk + (size_t)h * L->head_bytes + (size_t)R * d * es;
                stride = (size_t)d * es;
                n = R;
            }
        } else {
            vb = window_v(c, X->layer, J->seq_slot) + (size_t)h * d * es;
            stride = kvrow * es;
            n = J->window_tokens;
        }
        for (int t = 0; t < n; t++) {
            oscar_to_f32(vb + (size_t)t * stride, (oscar_dtype)L->window_dtype, S->row, d);
            for (int r = 0; r < nr; r++) {
                float p = pr[(size_t)r * ld + t];
                if (p == 0.0f) continue;
                float *a = S->acc + (size_t)r * d;
                for (int i = 0; i < d; i++) a[i] += p * S->row[i];
            }
        }
        for (int r = 0; r < nr; r++) {
            double *o = S->dacc + (size_t)r * d;
            const float *a = S->acc + (size_t)r * d;
            /* by group, so no integer division per channel (same sums, same order) */
            const int vg = quant ? L->v_group : d;
            for (int i0 = 0; i0 < d; i0 += vg) {
                const double bias = quant ? (double)S->vbias[(size_t)r * ng + i0 / vg] : 0.0;
                for (int i = i0; i < i0 + vg; i++) o[i] += (double)a[i] + bias;
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float *o = pres + (size_t)r * (d + 2) + 2;
        for (int i = 0; i < d; i++) o[i] = (float)S->dacc[(size_t)r * d + i];
    }
}

/* A job's units of work per KV head: its blocks, then the window as one unit. */
static int64_t job_units(const oscar_attn_job *j) { return j->n_blocks + (j->window_tokens > 0); }

/* Work items per KV head: the units in chunks of `chunk`, plus the sink rows as
 * an item of their own. */
static int64_t job_items_per_head(const oscar_attn_job *j, int64_t chunk) {
    return (job_units(j) + chunk - 1) / chunk + (j->sink_tokens > 0);
}

static oscar_status cpu_attention(oscar_cache *c, int layer, const oscar_attn_job *jobs, int n_jobs, int q_len,
                                  const void *q, oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float sm,
                                  void *stream) {
    const oscar_layout *L = &c->lay;
    const int d = L->d, R = L->residual, hq = L->hq, g = hq / L->hkv, rows = g * q_len;
    const int nt = thread_count(c);
    /* Work items: about four per thread, at most 64 blocks each. */
    int64_t units_total = 0;
    for (int i = 0; i < n_jobs; i++)
        units_total += (int64_t)L->hkv * (job_units(&jobs[i]) + (jobs[i].sink_tokens > 0));
    int64_t chunk = units_total / (4 * (int64_t)nt);
    if (chunk < 1) chunk = 1;
    if (chunk > 64) chunk = 64;
    int64_t n_items = 0;
    for (int i = 0; i < n_jobs; i++) n_items += (int64_t)L->hkv * job_items_per_head(&jobs[i], chunk);
    attn_ctx X;
    memset(&X, 0, sizeof X);
    X.c = c;
    X.L = L;
    X.layer = layer;
    X.q_len = q_len;
    X.g = g;
    X.sm = sm;
    X.Pk = L->quantised ? 16 / L->kbits : 1;
    X.Pv = L->quantised ? 16 / L->vbits : 1;
    X.ng = L->quantised ? d / L->v_group : 1;
    X.max_tok = (size_t)chunk * R + (size_t)L->lag; /* the window unit holds up to R - 1 + lag */
    if (X.max_tok < (size_t)L->sinks) X.max_tok = (size_t)L->sinks; /* the sink item */
    const int nr_max = rows < MAX_ROWS ? rows : MAX_ROWS;
    /* Per thread: doubles first, then floats; a multiple of 16 floats keeps
     * every thread's block 64-byte aligned. */
    const size_t scratch_floats =
        ((size_t)nr_max * (X.max_tok + 5 * (size_t)d + X.ng) + d + 16 + 15) / 16 * 16;
    size_t total = 0;
    const size_t o_items = carve(&total, sizeof(attn_item) * (size_t)(n_items ? n_items : 1));
    const size_t o_qr = carve(&total, sizeof(float) * (size_t)n_jobs * q_len * hq * d);
    const size_t o_part = carve(&total, sizeof(float) * (size_t)(n_items ? n_items : 1) * rows * (d + 2));
    const size_t o_scratch = carve(&total, sizeof(float) * scratch_floats * (size_t)nt);
    const size_t o_orow = carve(&total, sizeof(float) * (size_t)d);
    uint8_t *arena = scratch_at_least(ST(c), total);
    if (!arena) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "attention: out of host memory for %zu bytes of scratch", total);
    attn_item *items = (attn_item *)(arena + o_items);
    float *qr = (float *)(arena + o_qr), *part = (float *)(arena + o_part);
    float *scratch = (float *)(arena + o_scratch), *orow = (float *)(arena + o_orow);
    int64_t it = 0;
    for (int i = 0; i < n_jobs; i++) {
        const int32_t u = (int32_t)job_units(&jobs[i]);
        for (int h = 0; h < L->hkv; h++) {
            if (jobs[i].sink_tokens > 0) { /* the sink rows: one item of their own */
                items[it].job = i;
                items[it].head = h;
                items[it].u0 = -1;
                items[it].u1 = 0;
                it++;
            }
            for (int32_t u0 = 0; u0 < u; u0 += (int32_t)chunk) {
                items[it].job = i;
                items[it].head = h;
                items[it].u0 = u0;
                items[it].u1 = u0 + (int32_t)chunk < u ? u0 + (int32_t)chunk : u;
                it++;
            }
        }
    }
    /* Rotated queries, fp32: [job][q_len][hq][d]. */
    const size_t qn = (size_t)n_jobs * q_len * hq;
    oscar_to_f32(q, q_dtype, qr, (int64_t)(qn * d));
    if (L->rotate)
        for (size_t i = 0; i < qn; i++) oscar_fwht(qr + i * d, d);

#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t ii = 0; ii < n_items; ii++) {
        const attn_item *itm = &items[ii];
        float *sb = scratch + scratch_floats * (size_t)omp_get_thread_num();
        attn_scratch S;
        S.dacc = (double *)sb;
        S.logits = sb + (size_t)nr_max * d * 2;
        S.qt = S.logits + (size_t)nr_max * X.max_tok;
        S.acc = S.qt + (size_t)nr_max * d;
        S.qlocal = S.acc + (size_t)nr_max * d;
        S.vbias = S.qlocal + (size_t)nr_max * d;
        S.row = S.vbias + (size_t)nr_max * X.ng;
        const float *qr_job = qr + (size_t)itm->job * q_len * hq * d;
        float *pres = part + (size_t)ii * rows * (d + 2);
        for (int r0 = 0; r0 < rows; r0 += MAX_ROWS) {
            int nr = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
            attend_rows(&X, &jobs[itm->job], itm, qr_job, r0, nr, &S, pres + (size_t)r0 * (d + 2));
        }
    }

    /* Merge the partials of each (job, head) with the log-sum-exp rule, undo
     * the value rotation and write [job][q_len][hq][d] in out_dtype. */
    const size_t out_es = (size_t)oscar_dtype_size(out_dtype);
    it = 0;
    for (int i = 0; i < n_jobs; i++) {
        const int64_t per_head = job_items_per_head(&jobs[i], chunk);
        for (int h = 0; h < L->hkv; h++, it += per_head) {
            for (int r = 0; r < rows; r++) {
                float m = -INFINITY;
                for (int64_t k = 0; k < per_head; k++) {
                    float mk = part[((size_t)(it + k) * rows + r) * (d + 2)];
                    m = mk > m ? mk : m;
                }
                float sum = 0.0f;
                for (int x = 0; x < d; x++) orow[x] = 0.0f;
                for (int64_t k = 0; k < per_head; k++) {
                    const float *pk = part + ((size_t)(it + k) * rows + r) * (d + 2);
                    if (!(pk[0] > -INFINITY)) continue;
                    float wgt = expf(pk[0] - m);
                    sum += wgt * pk[1];
                    for (int x = 0; x < d; x++) orow[x] += wgt * pk[2 + x];
                }
                float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
                for (int x = 0; x < d; x++) orow[x] *= inv;
                if (L->rotate_v) oscar_fwht(orow, d);
                int jj = r / q_len, qi = r % q_len;
                size_t o = (((size_t)i * q_len + qi) * hq + (size_t)h * g + jj) * d;
                oscar_from_f32(orow, (uint8_t *)out + o * out_es, out_dtype, d);
            }
        }
    }
    return OSCAR_OK;
}

/* ---- fork and raw copies ------------------------------------------------- */

static oscar_status cpu_fork(oscar_cache *c, int32_t src, int32_t dst, const int32_t *wt, const int32_t *packed,
                             const int32_t *table, int32_t n_blocks) {
    const size_t half = c->lay.window_layer_bytes / 2;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    for (int l = 0; l < c->cfg.num_layers; l++) {
        if (c->lay.sinks) { /* every sink row; those not yet written are harmless */
            memcpy(sink_k(c, l, dst), sink_k(c, l, src), (size_t)c->lay.sinks * rowb);
            memcpy(sink_v(c, l, dst), sink_v(c, l, src), (size_t)c->lay.sinks * rowb);
        }
        memcpy(window_k(c, l, dst), window_k(c, l, src), (size_t)wt[l] * rowb);
        memcpy(window_k(c, l, dst) + half, window_k(c, l, src) + half, (size_t)wt[l] * rowb);
        memcpy(window_ss(c, l, dst), window_ss(c, l, src), (size_t)wt[l] * sizeof(float));
    }
    return OSCAR_OK;
}

static oscar_status cpu_read_block(oscar_cache *c, int layer, int32_t b, void *host) {
    memcpy(host, layer_block(c, layer, b), c->lay.layer_block_bytes);
    return OSCAR_OK;
}

static oscar_status cpu_write_block(oscar_cache *c, int layer, int32_t b, const void *host) {
    memcpy(layer_block(c, layer, b), host, c->lay.layer_block_bytes);
    return OSCAR_OK;
}

static oscar_status cpu_read_window(oscar_cache *c, int layer, int32_t slot, int32_t n, void *k, void *v,
                                    float *ss) {
    if (ss) memcpy(ss, window_ss(c, layer, slot), (size_t)n * sizeof(float));
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    memcpy(k, window_k(c, layer, slot), (size_t)n * rowb);
    memcpy(v, window_v(c, layer, slot), (size_t)n * rowb);
    return OSCAR_OK;
}

static oscar_status cpu_write_window(oscar_cache *c, int layer, int32_t slot, int32_t n, const void *k,
                                     const void *v, const float *ss, int32_t packed_blocks) {
    memcpy(window_ss(c, layer, slot), ss, (size_t)n * sizeof(float));
    ST(c)->packed[(size_t)layer * c->cfg.max_seqs + slot] = packed_blocks;
    ST(c)->held[(size_t)layer * c->cfg.max_seqs + slot] = packed_blocks * c->cfg.residual + n;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    memcpy(window_k(c, layer, slot), k, (size_t)n * rowb);
    memcpy(window_v(c, layer, slot), v, (size_t)n * rowb);
    return OSCAR_OK;
}

static oscar_status cpu_read_sinks(oscar_cache *c, int layer, int32_t slot, int32_t n, void *k, void *v) {
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    memcpy(k, sink_k(c, layer, slot), (size_t)n * rowb);
    memcpy(v, sink_v(c, layer, slot), (size_t)n * rowb);
    return OSCAR_OK;
}

static oscar_status cpu_write_sinks(oscar_cache *c, int layer, int32_t slot, int32_t n, const void *k,
                                    const void *v) {
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    memcpy(sink_k(c, layer, slot), k, (size_t)n * rowb);
    memcpy(sink_v(c, layer, slot), v, (size_t)n * rowb);
    return OSCAR_OK;
}

/* ---- the batch API: the caller's host arrays, checked here ------------- */

/* Blocks packed in (layer, slot) before this call; an append that starts a
 * sequence (seq_len == tokens_per_seq) starts it at 0. */
static int32_t packed_before(oscar_cache *c, int layer, const oscar_batch *b, int i, int appending) {
    if (appending && b->seq_lens[i] == b->tokens_per_seq) return 0;
    return ST(c)->packed[(size_t)layer * c->cfg.max_seqs + b->window_slots[i]];
}

/* What a batch call does to sequence i (its slot already checked): tokens
 * before the call's append (all of them for attention) and after, the sink
 * rows held before and after (oscar_sinks_held), and the blocks packed
 * before and after (the rule under oscar_config on the tokens after the
 * sinks; attention packs nothing). The checks and the append both read it,
 * so they cannot disagree on which block-table entries a call writes. */
typedef struct batch_plan {
    int64_t before, len, s0, s1, p0, p1;
} batch_plan;

static batch_plan plan_of(oscar_cache *c, int layer, const oscar_batch *b, int i, int appending) {
    const int S = c->lay.sinks;
    batch_plan p;
    p.len = b->seq_lens[i];
    p.before = appending ? p.len - b->tokens_per_seq : p.len;
    p.s0 = oscar_sinks_held(p.before, S);
    p.s1 = oscar_sinks_held(p.len, S);
    p.p0 = packed_before(c, layer, b, i, appending);
    p.p1 = appending ? oscar_packed_after(p.p0, p.len - p.s1, c->cfg.residual, c->cfg.rollback_tokens) : p.p0;
    return p;
}

static oscar_status check_batch(oscar_cache *c, int layer, const oscar_batch *b, int appending, const char *what) {
    const int R = c->cfg.residual, S = c->lay.sinks;
    for (int i = 0; i < b->num_seqs; i++) {
        const int32_t slot = b->window_slots[i], len = b->seq_lens[i];
        if (slot < 0 || slot >= c->cfg.max_seqs)
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "%s: window_slots[%d] = %d is outside 0..%d", what, i,
                                   (int)slot, c->cfg.max_seqs - 1);
        for (int j = 0; j < i; j++)
            if (b->window_slots[j] == slot)
                return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "%s: window slot %d appears twice (entries %d, %d)",
                                       what, (int)slot, j, i);
        if (len < b->tokens_per_seq || len > b->max_seq_len)
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "%s: seq_lens[%d] = %d is outside tokens_per_seq %d .. max_seq_len %d", what, i,
                                   (int)len, b->tokens_per_seq, b->max_seq_len);
        const int32_t *row = b->block_tables + (size_t)i * b->block_table_stride;
        const batch_plan plan = plan_of(c, layer, b, i, appending);
        const int64_t p0 = plan.p0, p1 = plan.p1, before = plan.before;
        const int64_t frozen = oscar_frozen_tokens(p0, S, R);
        if (before < frozen)
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "%s: sequence %d (slot %d) holds %lld tokens in %spacked blocks; its length cannot "
                                   "go below that (seq_lens[%d] = %d)",
                                   what, i, (int)slot, (long long)frozen, S ? "sink rows and " : "", i, (int)len);
        /* the slot can only be read up to what was written to it */
        const int64_t held = appending && before == 0 ? 0 : ST(c)->held[(size_t)layer * c->cfg.max_seqs + slot];
        if (before > held)
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "%s: seq_lens[%d] = %d, but slot %d holds %lld tokens in layer %d%s", what, i,
                                   (int)len, (int)slot, (long long)held, layer,
                                   appending ? " (an append's seq_len is the length after it)" : "");
        for (int64_t j = appending ? p0 : 0; j < p1; j++)
            if (row[j] < 0 || row[j] >= c->cfg.block_count)
                return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                       "%s: block_tables[%d][%d] = %d is outside 0..%d%s", what, i, (int)j, (int)row[j],
                                       c->cfg.block_count - 1,
                                       S ? " (with sink_tokens = S, block j holds tokens S + jR .. S + (j+1)R - 1)"
                                         : "");
    }
    return OSCAR_OK;
}

static oscar_status cpu_batch_append(oscar_cache *c, int layer, const oscar_batch *b, const void *k, const void *v,
                                     oscar_dtype dtype, void *stream) {
    oscar_status st = check_batch(c, layer, b, 1, "batch_append");
    if (st != OSCAR_OK) return st;
    oscar_append_job *jobs = (oscar_append_job *)OSCAR_CALLOC((size_t)b->num_seqs, sizeof *jobs);
    if (!jobs) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "batch_append: out of host memory");
    const int R = c->cfg.residual, n = b->tokens_per_seq;
    for (int i = 0; i < b->num_seqs; i++) {
        /* as oscar_append builds its jobs: the sink tokens first (none
         * without sinks), then the stream of the tokens after them */
        const batch_plan p = plan_of(c, layer, b, i, 1);
        const int64_t after0 = p.before - p.s0, after1 = p.len - p.s1; /* tokens after the sinks */
        oscar_append_job *j = &jobs[i];
        j->sink_before = (int32_t)p.s0;
        j->sink_new = (int32_t)(p.s1 - p.s0);
        j->input_row = (int64_t)i * n + j->sink_new;
        j->n_new = n - j->sink_new;
        j->seq_slot = b->window_slots[i];
        j->window_before = (int32_t)(after0 - p.p0 * R);
        j->n_flush = (int32_t)(p.p1 - p.p0);
        j->window_after = (int32_t)(after1 - p.p1 * R);
        j->first_flush_index = (int32_t)p.p0;
        j->flush_blocks = b->block_tables + (size_t)i * b->block_table_stride + p.p0;
    }
    st = cpu_append(c, layer, jobs, b->num_seqs, (int64_t)b->num_seqs * n, k, v, dtype, b->key_head_sumsq,
                    b->key_heads_total, stream);
    if (st == OSCAR_OK)
        for (int i = 0; i < b->num_seqs; i++) {
            ST(c)->packed[(size_t)layer * c->cfg.max_seqs + jobs[i].seq_slot] =
                jobs[i].first_flush_index + jobs[i].n_flush;
            ST(c)->held[(size_t)layer * c->cfg.max_seqs + jobs[i].seq_slot] = b->seq_lens[i];
        }
    free(jobs);
    return st;
}

static oscar_status cpu_batch_attention(oscar_cache *c, int layer, const oscar_batch *b, const void *q,
                                        oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float sm,
                                        void *stream) {
    oscar_status st = check_batch(c, layer, b, 0, "batch_attention");
    if (st != OSCAR_OK) return st;
    oscar_attn_job *jobs = (oscar_attn_job *)OSCAR_CALLOC((size_t)b->num_seqs, sizeof *jobs);
    if (!jobs) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "batch_attention: out of host memory");
    const int R = c->cfg.residual;
    for (int i = 0; i < b->num_seqs; i++) {
        const batch_plan p = plan_of(c, layer, b, i, 0);
        jobs[i].seq_slot = b->window_slots[i];
        jobs[i].n_blocks = (int32_t)p.p0;
        jobs[i].block_table = b->block_tables + (size_t)i * b->block_table_stride;
        jobs[i].sink_tokens = (int32_t)p.s1;
        jobs[i].window_tokens = (int32_t)(p.len - p.s1 - p.p0 * R);
        jobs[i].tokens = p.len;
    }
    st = cpu_attention(c, layer, jobs, b->num_seqs, b->tokens_per_seq, q, q_dtype, out, out_dtype, sm, stream);
    free(jobs);
    return st;
}

static oscar_status cpu_slot_copy(oscar_cache *c, int32_t src, int32_t dst, int64_t n_tokens, void *stream) {
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    const int R = c->cfg.residual, S = c->lay.sinks;
    const int64_t sinks = oscar_sinks_held(n_tokens, S);
    int32_t *packed = ST(c)->packed, *held = ST(c)->held;
    for (int l = 0; l < c->cfg.num_layers; l++) {
        const int32_t p = packed[(size_t)l * c->cfg.max_seqs + src];
        const int64_t frozen = oscar_frozen_tokens(p, S, R), n = n_tokens - sinks - (int64_t)p * R;
        if (n_tokens < frozen || n > c->lay.window_rows - 1)
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "slot_copy: slot %d layer %d has %lld tokens %spacked; %lld tokens cannot be copied",
                                   (int)src, l, (long long)frozen, S ? "in sink rows and " : "", (long long)n_tokens);
        if (n_tokens > held[(size_t)l * c->cfg.max_seqs + src])
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "slot_copy: slot %d layer %d holds %lld tokens, fewer than n_tokens %lld", (int)src,
                                   l, (long long)held[(size_t)l * c->cfg.max_seqs + src], (long long)n_tokens);
    }
    for (int l = 0; l < c->cfg.num_layers; l++) {
        const int32_t p = packed[(size_t)l * c->cfg.max_seqs + src];
        const size_t n = (size_t)(n_tokens - sinks - (int64_t)p * R);
        memcpy(sink_k(c, l, dst), sink_k(c, l, src), (size_t)sinks * rowb);
        memcpy(sink_v(c, l, dst), sink_v(c, l, src), (size_t)sinks * rowb);
        memcpy(window_k(c, l, dst), window_k(c, l, src), n * rowb);
        memcpy(window_v(c, l, dst), window_v(c, l, src), n * rowb);
        memcpy(window_ss(c, l, dst), window_ss(c, l, src), n * sizeof(float));
        packed[(size_t)l * c->cfg.max_seqs + dst] = p;
        held[(size_t)l * c->cfg.max_seqs + dst] = (int32_t)n_tokens;
    }
    return OSCAR_OK;
}

static oscar_status cpu_key_sumsq(oscar_cache *c, int64_t n_rows, const void *k, oscar_dtype dtype, float *out,
                                  void *stream) {
    const oscar_layout *L = &c->lay;
    const size_t row = (size_t)L->hkv * L->d, in_es = (size_t)oscar_dtype_size(dtype);
    float *x = (float *)OSCAR_MALLOC(sizeof(float) * row);
    uint8_t *w = (uint8_t *)OSCAR_MALLOC(row * (size_t)L->window_esize);
    if (!x || !w) {
        free(x), free(w);
        return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "key_sumsq: out of host memory");
    }
    for (int64_t r = 0; r < n_rows; r++) {
        /* exactly what append stores: rotated, rounded to the window dtype */
        oscar_to_f32((const uint8_t *)k + (size_t)r * row * in_es, dtype, x, (int64_t)row);
        for (int h = 0; h < L->hkv; h++)
            if (L->rotate) oscar_fwht(x + (size_t)h * L->d, L->d);
        oscar_from_f32(x, w, (oscar_dtype)L->window_dtype, (int64_t)row);
        oscar_to_f32(w, (oscar_dtype)L->window_dtype, x, (int64_t)row);
        for (int h = 0; h < L->hkv; h++) out[(size_t)r * L->hkv + h] = oscar_head_sumsq(x + (size_t)h * L->d, L->d);
    }
    free(x), free(w);
    return OSCAR_OK;
}

static oscar_status cpu_poll(oscar_cache *c) { return OSCAR_OK; }
static oscar_status cpu_sync(oscar_cache *c, void *stream) { return OSCAR_OK; }

const oscar_backend_ops oscar_cpu_backend_ops = {
    "cpu",           cpu_init,           cpu_destroy,         cpu_append,    cpu_attention,
    cpu_fork,        cpu_read_block,     cpu_write_block,     cpu_read_window, cpu_write_window,
    NULL,            cpu_batch_append,   cpu_batch_attention, cpu_slot_copy, cpu_poll,
    cpu_sync,        cpu_requirements,   cpu_key_sumsq,  cpu_read_sinks, cpu_write_sinks,
};
