/*
 * test_kv_bf16.c - the paged BF16 KV cache of model/gpu/kv_bf16.h against a
 * float64 host reference.
 *
 *   test_kv_bf16 [--small] [--skip-reference] [--only NAME[,NAME...]] [--list]
 *
 * Tests (NAME in brackets):
 *  [shapes]  d 64/128/256, GQA 1/4/8, q_len 1, 7 and 16, lengths 1, 63, 64,
 *            65, 1000, 33000 in one batch of mixed lengths, shuffled block
 *            ids, pages of 16..128 tokens, two layers. The cache is filled by
 *            kvbf16_append (prefill in two calls per sequence, one of them
 *            through the unaligned path, then q_len tokens for the whole
 *            batch); the pool read back must equal, byte for byte, the
 *            inputs at their pages with every other byte untouched. Attention
 *            (outputs poisoned with NaN before every call) is compared
 *            element by element with softmax(q.k * scale) v in float64 over
 *            the bf16 values: |err| <= 1e-2 * max |out| of the row. Variants:
 *            the split count picked for the batch, one split (no workspace),
 *            a workspace of 2 tiles, max_seq_len 3x the longest sequence,
 *            single-sequence calls, and the scalar reference kernel.
 *  [graph]   append + attention of two layers captured once in a CUDA graph
 *            and replayed for 40 decode steps (1 and 3 tokens per step) with
 *            seq_lens growing on the device; every output bit-identical to
 *            the same calls made eagerly on a twin pool, both pools equal
 *            and equal to the host model at the end, outputs checked
 *            against float64 at the first and last step.
 *  [badmeta] a length above max_seq_len, below q_len, and a block id out of
 *            range give NaN rows for that sequence only (one split and
 *            several), the other sequences' rows are unaffected.
 *  [args]    bad layouts and arguments fail with KVBF16_E_INVALID and a
 *            message, before anything is launched.
 *
 * --small runs short lengths (1, 63, 64, 65, 200) and 6 graph steps;
 * --skip-reference leaves out the scalar reference kernel in [shapes] (it is
 * slow under compute-sanitizer or an emulator at 33000 tokens).
 * Without a CUDA device of compute capability 9.0 (the kernels are built for
 * sm_90a) it prints "SKIP: ..." and exits 77.
 */
#include "testlib.h"

#include "kv_bf16.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int g_small = 0, g_skip_ref = 0;
static const char *g_only = NULL;
static int g_sms = 132;
static double g_worst = 0.0;

#define TOL 1e-2

/* A CUDA call of the test itself failed: nothing after it can be trusted. */
#define CU(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            printf("FATAL %s:%d [%s]: %s: %s (%s)\n", __FILE__, __LINE__, tl_current, #x,              \
                   cudaGetErrorName(e_), cudaGetErrorString(e_));                                      \
            fflush(stdout);                                                                            \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)

/* ---- bf16 helpers ------------------------------------------------------------ */

static double g_lut[65536]; /* bf16 bits -> value (tl_bf16_to_double) */

static void lut_init(void) {
    for (int i = 0; i < 65536; i++) g_lut[i] = tl_bf16_to_double((uint16_t)i);
}

/* round to nearest even (inputs finite) */
static uint16_t bf16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* about N(0, 1): a sum of four uniforms, scaled */
static float qnormal(tl_rng *r) {
    double s = 0.0;
    for (int i = 0; i < 4; i++) s += tl_uniform(r);
    return (float)((s - 2.0) * 1.7320508075688772);
}

static int is_nan_bf16(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu); }

/* ---- a cache under test: host model + device pool --------------------------- */

typedef struct rig {
    kvbf16_layout L;
    int layer, n, stride, max_len;
    int *len;          /* [n] final lengths                           */
    int32_t *table;    /* [n][stride] host block tables                */
    uint16_t **K, **V; /* [n] -> [len][hkv][d] host token data         */
    uint16_t *expect;  /* host model of the pool                       */
    void *pool;        /* device                                       */
    int32_t *d_table, *d_lens;
    size_t pool_bytes;
} rig;

static void *dev_alloc(size_t bytes) {
    void *p = NULL;
    CU(cudaMalloc(&p, bytes ? bytes : 16));
    return p;
}

static void *dev_copy(const void *h, size_t bytes) {
    void *p = dev_alloc(bytes);
    if (bytes) CU(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    return p;
}

/* element offset of (block, layer, kv, head, row) in the pool */
static size_t pool_off(const kvbf16_layout *L, int32_t b, int layer, int kv, int h, int row) {
    return ((((size_t)b * L->num_layers + layer) * 2 + kv) * L->num_kv_heads + h) * (size_t)L->block_tokens *
               L->head_dim +
           (size_t)row * L->head_dim;
}

/* Lays out n sequences of lengths len[] (room for `extra` more tokens each)
 * on shuffled blocks; unused table entries hold out-of-range ids. The pool
 * and its host model start as 0xff bytes (bf16 NaN). */
static void rig_init(rig *R, tl_rng *rng, kvbf16_layout L, int layer, int n, const int *len, int extra,
                     int spare_blocks) {
    memset(R, 0, sizeof *R);
    R->L = L;
    R->layer = layer;
    R->n = n;
    R->len = malloc(sizeof(int) * (size_t)n);
    int need = 0, maxb = 1;
    for (int i = 0; i < n; i++) {
        R->len[i] = len[i];
        const int nb = (len[i] + extra + L.block_tokens - 1) / L.block_tokens;
        need += nb;
        if (nb > maxb) maxb = nb;
        if (len[i] + extra > R->max_len) R->max_len = len[i] + extra;
    }
    R->L.num_blocks = need + spare_blocks;
    R->stride = maxb + 1;
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)R->L.num_blocks);
    for (int i = 0; i < R->L.num_blocks; i++) perm[i] = i;
    for (int i = R->L.num_blocks - 1; i > 0; i--) {
        const int j = tl_randint(rng, 0, i);
        const int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    R->table = malloc(sizeof(int32_t) * (size_t)n * R->stride);
    int next = 0;
    for (int i = 0; i < n; i++) {
        const int nb = (len[i] + extra + L.block_tokens - 1) / L.block_tokens;
        for (int j = 0; j < R->stride; j++)
            R->table[(size_t)i * R->stride + j] = j < nb ? perm[next++] : (int32_t)(0x7fffff00 - j);
    }
    free(perm);
    R->K = calloc((size_t)n, sizeof(uint16_t *));
    R->V = calloc((size_t)n, sizeof(uint16_t *));
    const size_t row = (size_t)L.num_kv_heads * L.head_dim;
    for (int i = 0; i < n; i++) {
        R->K[i] = malloc(sizeof(uint16_t) * ((size_t)(len[i] + extra) * row + 1));
        R->V[i] = malloc(sizeof(uint16_t) * ((size_t)(len[i] + extra) * row + 1));
    }
    R->pool_bytes = kvbf16_pool_bytes(&R->L);
    CHECKF(R->pool_bytes == (size_t)R->L.num_blocks * L.num_layers * 2 * L.num_kv_heads * L.block_tokens *
                                L.head_dim * 2,
           "kvbf16_pool_bytes %zu", R->pool_bytes);
    R->pool = dev_alloc(R->pool_bytes);
    CU(cudaMemset(R->pool, 0xff, R->pool_bytes));
    R->expect = malloc(R->pool_bytes);
    memset(R->expect, 0xff, R->pool_bytes);
    R->d_table = dev_copy(R->table, sizeof(int32_t) * (size_t)n * R->stride);
    R->d_lens = dev_alloc(sizeof(int32_t) * (size_t)n);
}

static void rig_free(rig *R) {
    for (int i = 0; i < R->n; i++) free(R->K[i]), free(R->V[i]);
    free(R->K), free(R->V), free(R->len), free(R->table), free(R->expect);
    CU(cudaFree(R->pool));
    CU(cudaFree(R->d_table));
    CU(cudaFree(R->d_lens));
}

/* Random tokens [t0, t1) of sequence i: keys with per-channel offsets. */
static void gen_tokens(rig *R, tl_rng *rng, int i, int t0, int t1) {
    const int hkv = R->L.num_kv_heads, d = R->L.head_dim;
    for (int t = t0; t < t1; t++)
        for (int h = 0; h < hkv; h++)
            for (int c = 0; c < d; c++) {
                const size_t o = ((size_t)t * hkv + h) * d + c;
                const float off = 0.5f * (float)((c * 7 + h * 3) % 5 - 2);
                R->K[i][o] = bf16_bits(qnormal(rng) + off);
                R->V[i][o] = bf16_bits(qnormal(rng));
            }
}

/* Host model of an append of tokens [t0, t1) of sequence i. */
static void model_append(rig *R, int i, int t0, int t1) {
    const kvbf16_layout *L = &R->L;
    const int hkv = L->num_kv_heads, d = L->head_dim;
    for (int t = t0; t < t1; t++) {
        const int32_t b = R->table[(size_t)i * R->stride + t / L->block_tokens];
        for (int h = 0; h < hkv; h++) {
            memcpy(R->expect + pool_off(L, b, R->layer, 0, h, t % L->block_tokens), R->K[i] + ((size_t)t * hkv + h) * d,
                   sizeof(uint16_t) * d);
            memcpy(R->expect + pool_off(L, b, R->layer, 1, h, t % L->block_tokens), R->V[i] + ((size_t)t * hkv + h) * d,
                   sizeof(uint16_t) * d);
        }
    }
}

/* kvbf16_append of tokens [t0, t1) of one sequence; `shift` = 1 passes k
 * and v one element past a 16-byte boundary (the unaligned path). */
static void append_one(rig *R, int i, int t0, int t1, int shift, cudaStream_t s) {
    if (t1 <= t0) return;
    const size_t row = (size_t)R->L.num_kv_heads * R->L.head_dim, n = (size_t)(t1 - t0) * row;
    uint16_t *kd = dev_alloc(sizeof(uint16_t) * (n + 8)), *vd = dev_alloc(sizeof(uint16_t) * (n + 8));
    CU(cudaMemcpy(kd + shift, R->K[i] + (size_t)t0 * row, sizeof(uint16_t) * n, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(vd + shift, R->V[i] + (size_t)t0 * row, sizeof(uint16_t) * n, cudaMemcpyHostToDevice));
    int32_t *dl = dev_copy(&t1, sizeof(int32_t));
    char err_[256] = "";
    const int st = kvbf16_append(R->pool, &R->L, R->layer, 1, t1 - t0, dl, R->d_table + (size_t)i * R->stride,
                                 R->stride, kd + shift, vd + shift, s, err_, sizeof err_);
    CHECKF(st == KVBF16_OK, "append seq %d tokens [%d, %d): %d %s", i, t0, t1, st, err_);
    CU(cudaStreamSynchronize(s));
    CU(cudaFree(kd));
    CU(cudaFree(vd));
    CU(cudaFree(dl));
    model_append(R, i, t0, t1);
}

/* kvbf16_append of the last T tokens of every sequence (lengths lens[]). */
static void append_batch(rig *R, const int *lens, int T, cudaStream_t s) {
    const size_t row = (size_t)R->L.num_kv_heads * R->L.head_dim;
    uint16_t *kh = malloc(sizeof(uint16_t) * (size_t)R->n * T * row), *vh = malloc(sizeof(uint16_t) * (size_t)R->n * T * row);
    for (int i = 0; i < R->n; i++) {
        memcpy(kh + (size_t)i * T * row, R->K[i] + (size_t)(lens[i] - T) * row, sizeof(uint16_t) * T * row);
        memcpy(vh + (size_t)i * T * row, R->V[i] + (size_t)(lens[i] - T) * row, sizeof(uint16_t) * T * row);
    }
    void *kd = dev_copy(kh, sizeof(uint16_t) * (size_t)R->n * T * row);
    void *vd = dev_copy(vh, sizeof(uint16_t) * (size_t)R->n * T * row);
    int32_t *l32 = malloc(sizeof(int32_t) * (size_t)R->n);
    for (int i = 0; i < R->n; i++) l32[i] = lens[i];
    CU(cudaMemcpy(R->d_lens, l32, sizeof(int32_t) * (size_t)R->n, cudaMemcpyHostToDevice));
    char err_[256] = "";
    const int st = kvbf16_append(R->pool, &R->L, R->layer, R->n, T, R->d_lens, R->d_table, R->stride, kd, vd, s,
                                 err_, sizeof err_);
    CHECKF(st == KVBF16_OK, "batched append of %d tokens: %d %s", T, st, err_);
    CU(cudaStreamSynchronize(s));
    for (int i = 0; i < R->n; i++) model_append(R, i, lens[i] - T, lens[i]);
    CU(cudaFree(kd));
    CU(cudaFree(vd));
    free(kh), free(vh), free(l32);
}

/* The device pool must equal the host model byte for byte. */
static void check_pool(const kvbf16_layout *L, const void *pool, const uint16_t *expect, size_t bytes,
                       const char *what) {
    uint16_t *got = malloc(bytes);
    CU(cudaMemcpy(got, pool, bytes, cudaMemcpyDeviceToHost));
    const size_t n = bytes / 2;
    size_t bad = 0, first = (size_t)-1;
    for (size_t i = 0; i < n; i++)
        if (got[i] != expect[i]) {
            if (!bad) first = i;
            bad++;
        }
    if (bad) {
        const size_t d = (size_t)L->head_dim, bt = (size_t)L->block_tokens;
        size_t e = first;
        const size_t c = e % d;
        e /= d;
        const size_t row = e % bt;
        e /= bt;
        const size_t h = e % (size_t)L->num_kv_heads;
        e /= (size_t)L->num_kv_heads;
        const size_t kv = e % 2;
        e /= 2;
        const size_t layer = e % (size_t)L->num_layers, block = e / (size_t)L->num_layers;
        CHECKF(0,
               "%s: %zu of %zu pool elements differ; first at block %zu layer %zu %s head %zu row %zu ch %zu: "
               "got 0x%04x want 0x%04x",
               what, bad, n, block, layer, kv ? "V" : "K", h, row, c, got[first], expect[first]);
    } else {
        CHECK(1);
    }
    free(got);
}

/* float64 attention of sequence i: out [q_len][hq][d], its last q_len tokens
 * as queries q [q_len][hq][d] (bf16 bits). */
static void ref_attention(const rig *R, int i, int len, int q_len, const uint16_t *q, double scale, double *out) {
    const int hkv = R->L.num_kv_heads, hq = R->L.num_q_heads, d = R->L.head_dim, G = hq / hkv;
    double *w = malloc(sizeof(double) * (size_t)len), *qd = malloc(sizeof(double) * (size_t)d);
    double *o = malloc(sizeof(double) * (size_t)d);
    for (int qi = 0; qi < q_len; qi++)
        for (int j = 0; j < hq; j++) {
            const int kvh = j / G, lim = len - q_len + qi;
            for (int c = 0; c < d; c++) qd[c] = g_lut[q[((size_t)qi * hq + j) * d + c]];
            double m = -INFINITY;
            for (int t = 0; t <= lim; t++) {
                const uint16_t *k = R->K[i] + ((size_t)t * hkv + kvh) * d;
                double s = 0.0;
                for (int c = 0; c < d; c++) s += qd[c] * g_lut[k[c]];
                w[t] = s * scale;
                if (w[t] > m) m = w[t];
            }
            double sum = 0.0;
            for (int c = 0; c < d; c++) o[c] = 0.0;
            for (int t = 0; t <= lim; t++) {
                const double p = exp(w[t] - m);
                sum += p;
                const uint16_t *v = R->V[i] + ((size_t)t * hkv + kvh) * d;
                for (int c = 0; c < d; c++) o[c] += p * g_lut[v[c]];
            }
            for (int c = 0; c < d; c++) out[((size_t)qi * hq + j) * d + c] = o[c] / sum;
        }
    free(w), free(qd), free(o);
}

/* Compares bf16 outputs of `rows` rows of d with the float64 reference:
 * |got - ref| <= TOL * max|ref| of the row, no NaN. Returns the worst ratio. */
static double compare_rows(const uint16_t *got, const double *ref, size_t rows, int d, const char *what) {
    double worst = 0.0;
    size_t bad = 0, first = 0;
    for (size_t r = 0; r < rows; r++) {
        double mx = 0.0;
        for (int c = 0; c < d; c++) mx = fmax(mx, fabs(ref[r * d + c]));
        if (mx == 0.0) mx = 1.0;
        for (int c = 0; c < d; c++) {
            const uint16_t h = got[r * d + c];
            const double e = is_nan_bf16(h) ? INFINITY : fabs(g_lut[h] - ref[r * d + c]) / mx;
            if (!(e <= TOL)) {
                if (!bad) first = r * d + c;
                bad++;
            }
            if (e > worst) worst = e;
        }
    }
    CHECKF(bad == 0, "%s: %zu of %zu outputs off by more than %.0e of the row max (first: element %zu, got %g, want %g)",
           what, bad, rows * (size_t)d, TOL, first, g_lut[got[first]], ref[first]);
    if (worst > g_worst && isfinite(worst)) g_worst = worst;
    return worst;
}

/* Runs kvbf16_attention (or the reference kernel, max_len < 0) on
 * sequences [s0, s0 + n) and returns the bf16 outputs (malloc'd). */
static uint16_t *run_attention(rig *R, int s0, int n, int q_len, const void *dq, int max_len, void *ws, size_t ws_bytes,
                               cudaStream_t s, int *splits) {
    const size_t cnt = (size_t)n * q_len * R->L.num_q_heads * R->L.head_dim;
    uint16_t *od = dev_alloc(sizeof(uint16_t) * cnt), *oh = malloc(sizeof(uint16_t) * cnt);
    CU(cudaMemset(od, 0xff, sizeof(uint16_t) * cnt));
    char err_[256] = "";
    const uint16_t *q = (const uint16_t *)dq + (size_t)s0 * q_len * R->L.num_q_heads * R->L.head_dim;
    int st;
    if (max_len < 0) {
        st = kvbf16_attention_reference(R->pool, &R->L, R->layer, n, q_len, R->d_lens + s0,
                                        R->d_table + (size_t)s0 * R->stride, R->stride, q, od, 0.0f, s, err_,
                                        sizeof err_);
        if (splits) *splits = 0;
    } else {
        st = kvbf16_attention(R->pool, &R->L, R->layer, n, q_len, R->d_lens + s0, R->d_table + (size_t)s0 * R->stride,
                              R->stride, max_len, q, od, 0.0f, ws, ws_bytes, s, err_, sizeof err_);
        if (splits) *splits = kvbf16_attention_splits(&R->L, n, q_len, max_len, ws ? ws_bytes : 0);
    }
    CHECKF(st == KVBF16_OK, "attention: %d %s", st, err_);
    CU(cudaStreamSynchronize(s));
    CU(cudaMemcpy(oh, od, sizeof(uint16_t) * cnt, cudaMemcpyDeviceToHost));
    CU(cudaFree(od));
    return oh;
}

/* ---- [shapes] ------------------------------------------------------------------ */

typedef struct shape {
    int d, hkv, hq, bt, layers, layer;
} shape;

static void run_shape(const shape *S, int q_len, const int *lens_in, int n, cudaStream_t s) {
    char name[128];
    snprintf(name, sizeof name, "d%d hkv%d hq%d bt%d q_len%d", S->d, S->hkv, S->hq, S->bt, q_len);
    tl_rng rng = tl_rng_for(name);
    kvbf16_layout L = {S->layers, S->hkv, S->hq, S->d, S->bt, 1};
    int *lens = malloc(sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++) lens[i] = lens_in[i] < q_len ? q_len : lens_in[i];
    rig R;
    rig_init(&R, &rng, L, S->layer, n, lens, 0, 3);
    for (int i = 0; i < n; i++) gen_tokens(&R, &rng, i, 0, lens[i]);
    /* prefill: the first half aligned, the second half through the unaligned path */
    for (int i = 0; i < n; i++) {
        const int pre = lens[i] - q_len, h1 = pre / 2;
        append_one(&R, i, 0, h1, 0, s);
        append_one(&R, i, h1, pre, 1, s);
    }
    append_batch(&R, lens, q_len, s);
    check_pool(&R.L, R.pool, R.expect, R.pool_bytes, name);

    /* queries and the float64 reference */
    const int hq = S->hq, d = S->d;
    const size_t per = (size_t)q_len * hq * d;
    uint16_t *qh = malloc(sizeof(uint16_t) * n * per);
    for (size_t i = 0; i < n * per; i++) qh[i] = bf16_bits(2.5f * qnormal(&rng));
    void *dq = dev_copy(qh, sizeof(uint16_t) * n * per);
    double *ref = malloc(sizeof(double) * n * per);
    for (int i = 0; i < n; i++) ref_attention(&R, i, lens[i], q_len, qh + i * per, 1.0 / sqrt((double)d), ref + i * per);

    const size_t ws_bytes = kvbf16_workspace_bytes(&R.L, 1, 2 * g_sms);
    void *ws = dev_alloc(ws_bytes);
    const size_t tiny_bytes = kvbf16_workspace_bytes(&R.L, 1, 2) / (size_t)S->hkv; /* 2 tiles */
    char what[256];
    int sp = 0;
    double w;
    uint16_t *o;

    o = run_attention(&R, 0, n, q_len, dq, R.max_len, ws, ws_bytes, s, &sp);
    snprintf(what, sizeof what, "%s batch of %d, %d splits", name, n, sp);
    w = compare_rows(o, ref, (size_t)n * q_len * hq, d, what);
    printf("   %s: worst %.2e\n", what, w);
    free(o);
    const int sp_batch = sp;

    o = run_attention(&R, 0, n, q_len, dq, R.max_len, NULL, 0, s, &sp);
    snprintf(what, sizeof what, "%s batch, no workspace (%d split)", name, sp);
    CHECKF(sp == 1, "%s: splits %d", what, sp);
    w = compare_rows(o, ref, (size_t)n * q_len * hq, d, what);
    printf("   %s: worst %.2e\n", what, w);
    free(o);

    o = run_attention(&R, 0, n, q_len, dq, R.max_len, ws, tiny_bytes, s, &sp);
    snprintf(what, sizeof what, "%s batch, 2-tile workspace (%d splits)", name, sp);
    w = compare_rows(o, ref, (size_t)n * q_len * hq, d, what);
    printf("   %s: worst %.2e\n", what, w);
    free(o);

    o = run_attention(&R, 0, n, q_len, dq, 3 * R.max_len, ws, ws_bytes, s, &sp);
    snprintf(what, sizeof what, "%s batch, max_seq_len x3 (%d splits)", name, sp);
    w = compare_rows(o, ref, (size_t)n * q_len * hq, d, what);
    printf("   %s: worst %.2e\n", what, w);
    free(o);

    for (int i = 0; i < n; i++) {
        if (i != 0 && i != n - 1 && lens[i] != 65) continue;
        o = run_attention(&R, i, 1, q_len, dq, lens[i], ws, ws_bytes, s, &sp);
        snprintf(what, sizeof what, "%s sequence %d alone (length %d, %d splits)", name, i, lens[i], sp);
        w = compare_rows(o, ref + i * per, (size_t)q_len * hq, d, what);
        printf("   %s: worst %.2e\n", what, w);
        free(o);
    }

    if (!g_skip_ref) {
        o = run_attention(&R, 0, n, q_len, dq, -1, NULL, 0, s, NULL);
        snprintf(what, sizeof what, "%s scalar reference kernel", name);
        w = compare_rows(o, ref, (size_t)n * q_len * hq, d, what);
        printf("   %s: worst %.2e\n", what, w);
        free(o);
    }
    (void)sp_batch;

    CU(cudaFree(ws));
    CU(cudaFree(dq));
    free(qh), free(ref), free(lens);
    rig_free(&R);
}

static void test_shapes(void) {
    cudaStream_t s;
    CU(cudaStreamCreate(&s));
    const int full[] = {1, 63, 64, 65, 1000, 33000};
    const int small[] = {1, 63, 64, 65, 200};
    const int *lens = g_small ? small : full;
    const int n = g_small ? 5 : 6;
    /* (d, hkv, hq, page, layers, layer) */
    const shape s128 = {128, 8, 32, 64, 2, 1};  /* GQA 4, the Llama/Qwen-8B shape */
    const shape s64 = {64, 2, 16, 16, 1, 0};    /* GQA 8, 16-token pages          */
    const shape s256 = {256, 4, 4, 32, 2, 0};   /* GQA 1                          */
    const shape s128g8 = {128, 2, 16, 128, 2, 1}; /* GQA 8, 128-token pages       */
    run_shape(&s128, 1, lens, n, s);
    run_shape(&s128, 7, lens, n, s);
    const int mid[] = {1, 63, 64, 65, 1000, 4000};
    const int *lm = g_small ? small : mid;
    run_shape(&s64, 1, lm, n, s);
    run_shape(&s64, 7, lm, n, s);
    run_shape(&s256, 1, lm, n, s);
    run_shape(&s256, 7, lm, n, s);
    const int few[] = {16, 100, 3000};
    const int fs[] = {16, 100};
    run_shape(&s128g8, 7, g_small ? fs : few, g_small ? 2 : 3, s);  /* 56 rows: 4 row chunks  */
    run_shape(&s128g8, 16, g_small ? fs : few, g_small ? 2 : 3, s); /* 128 rows: 8 row chunks */
    CU(cudaStreamDestroy(s));
}

/* ---- [graph] -------------------------------------------------------------------- */

static void graph_case(int T) {
    char name[64];
    snprintf(name, sizeof name, "graph T%d", T);
    tl_rng rng = tl_rng_for(name);
    const int n = 3, steps = g_small ? 6 : 40, max_len = 1024;
    const int init[3] = {1, 100, 511};
    kvbf16_layout L = {2, 8, 32, 128, 16, 1};
    const int hkv = L.num_kv_heads, hq = L.num_q_heads, d = L.head_dim;
    int final_len[3];
    for (int i = 0; i < n; i++) final_len[i] = init[i] + steps * T;
    /* one rig per layer (same blocks and pool: the layers share the pool) */
    rig R[2];
    rig_init(&R[0], &rng, L, 0, n, final_len, 0, 2);
    L = R[0].L; /* with the block count */
    R[1] = R[0]; /* shallow: the same table, pool and model; own token data */
    R[1].layer = 1;
    R[1].K = calloc(n, sizeof(uint16_t *));
    R[1].V = calloc(n, sizeof(uint16_t *));
    R[1].len = malloc(sizeof(int) * n);
    for (int i = 0; i < n; i++) {
        R[1].len[i] = final_len[i];
        const size_t sz = sizeof(uint16_t) * ((size_t)final_len[i] * hkv * d + 1);
        R[1].K[i] = malloc(sz);
        R[1].V[i] = malloc(sz);
    }
    for (int ly = 0; ly < 2; ly++)
        for (int i = 0; i < n; i++) gen_tokens(&R[ly], &rng, i, 0, final_len[i]);
    CHECKF(R[0].max_len <= max_len, "graph: max_len %d", R[0].max_len);
    /* the twin pool for the eager calls */
    void *pool_b = dev_alloc(R[0].pool_bytes);
    CU(cudaMemset(pool_b, 0xff, R[0].pool_bytes));

    cudaStream_t s;
    CU(cudaStreamCreate(&s));
    /* prefill both pools, both layers */
    for (int ly = 0; ly < 2; ly++)
        for (int i = 0; i < n; i++) append_one(&R[ly], i, 0, init[i], 0, s);
    R[1].expect = R[0].expect; /* (append_one wrote the model through R[ly]; same buffer) */
    CU(cudaMemcpy(pool_b, R[0].pool, R[0].pool_bytes, cudaMemcpyDeviceToDevice));

    /* per-step inputs (fixed device addresses) */
    const size_t kv_elems = (size_t)n * T * hkv * d, q_elems = (size_t)n * T * hq * d;
    uint16_t *dk[2], *dv[2], *dqd[2], *oa[2], *ob[2];
    uint16_t *hk, *hv, *hqq, *ha, *hb;
    int32_t *hl;
    for (int ly = 0; ly < 2; ly++) {
        dk[ly] = dev_alloc(2 * kv_elems);
        dv[ly] = dev_alloc(2 * kv_elems);
        dqd[ly] = dev_alloc(2 * q_elems);
        oa[ly] = dev_alloc(2 * q_elems);
        ob[ly] = dev_alloc(2 * q_elems);
    }
    CU(cudaMallocHost((void **)&hk, 2 * 2 * kv_elems));
    CU(cudaMallocHost((void **)&hv, 2 * 2 * kv_elems));
    CU(cudaMallocHost((void **)&hqq, 2 * 2 * q_elems));
    CU(cudaMallocHost((void **)&ha, 2 * 2 * q_elems));
    CU(cudaMallocHost((void **)&hb, 2 * 2 * q_elems));
    CU(cudaMallocHost((void **)&hl, sizeof(int32_t) * n));
    const size_t ws_bytes = kvbf16_workspace_bytes(&L, 1, 2 * g_sms);
    void *ws_a = dev_alloc(ws_bytes), *ws_b = dev_alloc(ws_bytes);
    const int splits = kvbf16_attention_splits(&L, n, T, max_len, ws_bytes);
    printf("   %s: %d splits per (sequence, kv head)\n", name, splits);

    /* one decode step of both layers on pool p */
    char err_[256] = "";
#define STEP(pool, outs, ws)                                                                                   \
    do {                                                                                                       \
        for (int ly = 0; ly < 2; ly++) {                                                                       \
            st[2 * ly] = kvbf16_append((pool), &L, ly, n, T, R[0].d_lens, R[0].d_table, R[0].stride, dk[ly],   \
                                       dv[ly], s, err_, sizeof err_);                                          \
            st[2 * ly + 1] = kvbf16_attention((pool), &L, ly, n, T, R[0].d_lens, R[0].d_table, R[0].stride,    \
                                              max_len, dqd[ly], (outs)[ly], 0.0f, (ws), ws_bytes, s, err_,     \
                                              sizeof err_);                                                    \
        }                                                                                                      \
    } while (0)
    int st[4];
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    STEP(R[0].pool, oa, ws_a);
    const cudaError_t ce = cudaStreamEndCapture(s, &graph);
    for (int k = 0; k < 4; k++) CHECKF(st[k] == KVBF16_OK, "%s: call %d during capture: %d %s", name, k, st[k], err_);
    CHECKF(ce == cudaSuccess, "%s: cudaStreamEndCapture: %s", name, cudaGetErrorString(ce));
    if (ce != cudaSuccess) {
        (void)cudaGetLastError();
        goto done;
    }
    CU(cudaGraphInstantiate(&exec, graph, 0));

    int cur[3];
    for (int i = 0; i < n; i++) cur[i] = init[i];
    long long differ = 0;
    for (int step = 0; step < steps; step++) {
        for (int i = 0; i < n; i++) cur[i] += T, hl[i] = cur[i];
        for (int ly = 0; ly < 2; ly++) {
            for (int i = 0; i < n; i++) {
                const size_t rowb = (size_t)hkv * d;
                memcpy(hk + ly * kv_elems + (size_t)i * T * rowb, R[ly].K[i] + (size_t)(cur[i] - T) * rowb,
                       2 * T * rowb);
                memcpy(hv + ly * kv_elems + (size_t)i * T * rowb, R[ly].V[i] + (size_t)(cur[i] - T) * rowb,
                       2 * T * rowb);
            }
            for (size_t e = 0; e < q_elems; e++) hqq[ly * q_elems + e] = bf16_bits(2.5f * qnormal(&rng));
            CU(cudaMemcpyAsync(dk[ly], hk + ly * kv_elems, 2 * kv_elems, cudaMemcpyHostToDevice, s));
            CU(cudaMemcpyAsync(dv[ly], hv + ly * kv_elems, 2 * kv_elems, cudaMemcpyHostToDevice, s));
            CU(cudaMemcpyAsync(dqd[ly], hqq + ly * q_elems, 2 * q_elems, cudaMemcpyHostToDevice, s));
            CU(cudaMemsetAsync(oa[ly], 0xff, 2 * q_elems, s));
            CU(cudaMemsetAsync(ob[ly], 0xff, 2 * q_elems, s));
        }
        CU(cudaMemcpyAsync(R[0].d_lens, hl, sizeof(int32_t) * n, cudaMemcpyHostToDevice, s));
        CU(cudaGraphLaunch(exec, s));
        STEP(pool_b, ob, ws_b);
        for (int k = 0; k < 4; k++) CHECKF(st[k] == KVBF16_OK, "%s step %d: eager call %d: %d %s", name, step, k, st[k], err_);
        for (int ly = 0; ly < 2; ly++) {
            CU(cudaMemcpyAsync(ha + ly * q_elems, oa[ly], 2 * q_elems, cudaMemcpyDeviceToHost, s));
            CU(cudaMemcpyAsync(hb + ly * q_elems, ob[ly], 2 * q_elems, cudaMemcpyDeviceToHost, s));
        }
        CU(cudaStreamSynchronize(s));
        for (int ly = 0; ly < 2; ly++) {
            for (int i = 0; i < n; i++) model_append(&R[ly], i, cur[i] - T, cur[i]);
            if (memcmp(ha + ly * q_elems, hb + ly * q_elems, 2 * q_elems)) differ++;
            if (step == 0 || step == steps - 1) {
                const size_t per = (size_t)T * hq * d;
                double *ref = malloc(sizeof(double) * n * per);
                for (int i = 0; i < n; i++)
                    ref_attention(&R[ly], i, cur[i], T, hqq + ly * q_elems + i * per, 1.0 / sqrt((double)d),
                                  ref + i * per);
                char what[128];
                snprintf(what, sizeof what, "%s step %d layer %d (graph)", name, step, ly);
                const double w = compare_rows(ha + ly * q_elems, ref, (size_t)n * T * hq, d, what);
                printf("   %s: worst %.2e\n", what, w);
                free(ref);
            }
        }
    }
    CHECKF(differ == 0, "%s: %lld of %d graph outputs differ from the eager calls", name, differ, 2 * steps);
    printf("   %s: %d steps x 2 layers, graph and eager outputs %s\n", name, steps,
           differ ? "DIFFER" : "bit-identical");
    check_pool(&L, R[0].pool, R[0].expect, R[0].pool_bytes, "graph pool");
    check_pool(&L, pool_b, R[0].expect, R[0].pool_bytes, "eager pool");

done:
    if (exec) CU(cudaGraphExecDestroy(exec));
    if (graph) CU(cudaGraphDestroy(graph));
#undef STEP
    for (int ly = 0; ly < 2; ly++) {
        CU(cudaFree(dk[ly]));
        CU(cudaFree(dv[ly]));
        CU(cudaFree(dqd[ly]));
        CU(cudaFree(oa[ly]));
        CU(cudaFree(ob[ly]));
    }
    CU(cudaFreeHost(hk));
    CU(cudaFreeHost(hv));
    CU(cudaFreeHost(hqq));
    CU(cudaFreeHost(ha));
    CU(cudaFreeHost(hb));
    CU(cudaFreeHost(hl));
    CU(cudaFree(ws_a));
    CU(cudaFree(ws_b));
    CU(cudaFree(pool_b));
    CU(cudaStreamDestroy(s));
    for (int i = 0; i < n; i++) free(R[1].K[i]), free(R[1].V[i]);
    free(R[1].K), free(R[1].V), free(R[1].len);
    rig_free(&R[0]);
}

static void test_graph(void) {
    graph_case(1);
    graph_case(3);
}

/* ---- [badmeta] ------------------------------------------------------------------ */

static int row_all_nan(const uint16_t *o, int d) {
    for (int c = 0; c < d; c++)
        if (!is_nan_bf16(o[c])) return 0;
    return 1;
}

static void test_badmeta(void) {
    tl_rng rng = tl_rng_for("badmeta");
    kvbf16_layout L = {1, 2, 8, 128, 16, 1};
    const int n = 4, q_len = 2;
    const int lens[4] = {50, 80, 30, 47};
    rig R;
    rig_init(&R, &rng, L, 0, n, lens, 3, 2);
    cudaStream_t s;
    CU(cudaStreamCreate(&s));
    for (int i = 0; i < n; i++) {
        gen_tokens(&R, &rng, i, 0, lens[i]);
        append_one(&R, i, 0, lens[i], 0, s);
    }
    const int hq = L.num_q_heads, d = L.head_dim;
    const size_t per = (size_t)q_len * hq * d;
    uint16_t *qh = malloc(sizeof(uint16_t) * n * per);
    for (size_t i = 0; i < n * per; i++) qh[i] = bf16_bits(2.5f * qnormal(&rng));
    void *dq = dev_copy(qh, sizeof(uint16_t) * n * per);
    double *ref = malloc(sizeof(double) * n * per);
    for (int i = 0; i < n; i++) ref_attention(&R, i, lens[i], q_len, qh + i * per, 1.0 / sqrt((double)d), ref + i * per);
    const size_t ws_bytes = kvbf16_workspace_bytes(&R.L, 1, 2 * g_sms);
    void *ws = dev_alloc(ws_bytes);

    /* seq 0: a block id out of range (its second page); seq 1: length 80 >
     * max_seq_len 79; seq 2: length 1 < q_len; seq 3: fine */
    const int32_t saved = R.table[1];
    R.table[1] = R.L.num_blocks;
    CU(cudaMemcpy(R.d_table, R.table, sizeof(int32_t) * (size_t)n * R.stride, cudaMemcpyHostToDevice));
    int32_t l32[4] = {50, 80, 1, 47};
    CU(cudaMemcpy(R.d_lens, l32, sizeof l32, cudaMemcpyHostToDevice));
    for (int variant = 0; variant < 2; variant++) {
        int sp = 0;
        uint16_t *o = run_attention(&R, 0, n, q_len, dq, 79, variant ? NULL : ws, variant ? 0 : ws_bytes, s, &sp);
        char what[128];
        snprintf(what, sizeof what, "badmeta (%d splits) sequence 3", sp);
        int nan_rows[3] = {0, 0, 0};
        for (int i = 0; i < 3; i++)
            for (int r = 0; r < q_len * hq; r++) nan_rows[i] += row_all_nan(o + i * per + (size_t)r * d, d);
        for (int i = 0; i < 3; i++)
            CHECKF(nan_rows[i] == q_len * hq, "badmeta (%d splits): sequence %d has %d of %d NaN rows", sp, i,
                   nan_rows[i], q_len * hq);
        compare_rows(o + 3 * per, ref + 3 * per, (size_t)q_len * hq, d, what);
        printf("   badmeta, %d splits: NaN rows %d/%d/%d of %d, sequence 3 within tolerance\n", sp, nan_rows[0],
               nan_rows[1], nan_rows[2], q_len * hq);
        free(o);
    }
    /* the reference kernel: bad block and bad length also give NaN */
    {
        uint16_t *o = run_attention(&R, 0, n, q_len, dq, -1, NULL, 0, s, NULL);
        CHECKF(row_all_nan(o, d) && row_all_nan(o + 2 * per, d), "reference kernel: NaN rows for bad metadata");
        compare_rows(o + 3 * per, ref + 3 * per, (size_t)q_len * hq, d, "badmeta reference kernel sequence 3");
        free(o);
    }
    /* restored metadata: everything valid again */
    R.table[1] = saved;
    CU(cudaMemcpy(R.d_table, R.table, sizeof(int32_t) * (size_t)n * R.stride, cudaMemcpyHostToDevice));
    for (int i = 0; i < n; i++) l32[i] = lens[i];
    CU(cudaMemcpy(R.d_lens, l32, sizeof l32, cudaMemcpyHostToDevice));
    {
        uint16_t *o = run_attention(&R, 0, n, q_len, dq, 80, ws, ws_bytes, s, NULL);
        compare_rows(o, ref, (size_t)n * q_len * hq, d, "badmeta restored");
        free(o);
    }
    /* an append over a block id out of range writes nothing for those rows:
     * tokens 47, 48, 49 of sequence 3, token 47 on its (bad) third page */
    {
        const int i = 3, t0 = lens[3], T = 3;
        gen_tokens(&R, &rng, i, t0, t0 + T);
        const int32_t keep = R.table[(size_t)i * R.stride + 2];
        R.table[(size_t)i * R.stride + 2] = -5;
        CU(cudaMemcpy(R.d_table, R.table, sizeof(int32_t) * (size_t)n * R.stride, cudaMemcpyHostToDevice));
        const size_t row = (size_t)L.num_kv_heads * d;
        void *kd = dev_copy(R.K[i] + (size_t)t0 * row, sizeof(uint16_t) * T * row);
        void *vd = dev_copy(R.V[i] + (size_t)t0 * row, sizeof(uint16_t) * T * row);
        const int32_t nl = t0 + T;
        int32_t *dl = dev_copy(&nl, sizeof nl);
        char err_[256] = "";
        const int st = kvbf16_append(R.pool, &R.L, 0, 1, T, dl, R.d_table + (size_t)i * R.stride, R.stride, kd, vd, s,
                                     err_, sizeof err_);
        CHECKF(st == KVBF16_OK, "badmeta append: %d %s", st, err_);
        CU(cudaStreamSynchronize(s));
        model_append(&R, i, t0 + 1, t0 + T); /* token t0 is skipped */
        R.table[(size_t)i * R.stride + 2] = keep;
        CU(cudaFree(kd));
        CU(cudaFree(vd));
        CU(cudaFree(dl));
    }
    check_pool(&R.L, R.pool, R.expect, R.pool_bytes, "badmeta pool");
    CU(cudaFree(ws));
    CU(cudaFree(dq));
    CU(cudaStreamDestroy(s));
    free(qh), free(ref);
    rig_free(&R);
}

/* ---- [args] --------------------------------------------------------------------- */

static void expect_invalid(int st, const char *err, const char *what) {
    CHECKF(st == KVBF16_E_INVALID, "%s: status %d, want KVBF16_E_INVALID", what, st);
    CHECKF(err[0] != 0, "%s: no message", what);
}

static void test_args(void) {
    const kvbf16_layout good = {2, 8, 32, 128, 64, 10};
    kvbf16_layout L;
    char err[256];
    void *pool = dev_alloc(kvbf16_pool_bytes(&good));
    int32_t *lens = dev_alloc(64), *tab = dev_alloc(64);
    uint16_t *q = dev_alloc(1 << 16), *o = dev_alloc(1 << 16);
    cudaStream_t s;
    CU(cudaStreamCreate(&s));
    CHECK(kvbf16_pool_bytes(&good) == (size_t)10 * 2 * 2 * 8 * 64 * 128 * 2);
    CHECK(kvbf16_workspace_bytes(&good, 2, 3) == (size_t)2 * 8 * 3 * 16 * (128 + 2) * 4);
    CHECK(kvbf16_workspace_bytes(&good, 1, 0) == kvbf16_workspace_bytes(&good, 1, 64));
    const struct {
        int field, value;
        const char *what;
    } bad[] = {{0, 0, "num_layers 0"},  {1, 0, "num_kv_heads 0"},     {2, 12, "num_q_heads 12 with 8 kv heads"},
               {3, 96, "head_dim 96"},  {4, 24, "block_tokens 24"},   {4, 8, "block_tokens 8"},
               {5, 0, "num_blocks 0"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        L = good;
        int *f[6] = {&L.num_layers, &L.num_kv_heads, &L.num_q_heads, &L.head_dim, &L.block_tokens, &L.num_blocks};
        *f[bad[i].field] = bad[i].value;
        CHECKF(kvbf16_pool_bytes(&L) == 0, "pool_bytes with %s", bad[i].what);
        CHECKF(kvbf16_attention_splits(&L, 1, 1, 100, 0) < 0, "attention_splits with %s", bad[i].what);
        err[0] = 0;
        expect_invalid(kvbf16_append(pool, &L, 0, 1, 1, lens, tab, 4, q, q, s, err, sizeof err), err, bad[i].what);
        err[0] = 0;
        expect_invalid(kvbf16_attention(pool, &L, 0, 1, 1, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, err, sizeof err),
                       err, bad[i].what);
        err[0] = 0;
        expect_invalid(kvbf16_attention_reference(pool, &L, 0, 1, 1, lens, tab, 4, q, o, 0.0f, s, err, sizeof err),
                       err, bad[i].what);
    }
    L = good;
    err[0] = 0;
    expect_invalid(kvbf16_append(pool, &L, 2, 1, 1, lens, tab, 4, q, q, s, err, sizeof err), err, "append layer 2");
    err[0] = 0;
    expect_invalid(kvbf16_append(pool, &L, 0, 1, 1, lens, tab, 0, q, q, s, err, sizeof err), err, "append stride 0");
    err[0] = 0;
    expect_invalid(kvbf16_append(pool, &L, 0, 1, 1, NULL, tab, 4, q, q, s, err, sizeof err), err, "append lens NULL");
    err[0] = 0;
    expect_invalid(kvbf16_append((char *)pool + 8, &L, 0, 1, 1, lens, tab, 4, q, q, s, err, sizeof err), err,
                   "append misaligned pool");
    err[0] = 0;
    expect_invalid(kvbf16_append(pool, &L, 0, 1, 1, lens, tab, 4, (char *)q + 1, q, s, err, sizeof err), err,
                   "append odd k");
    err[0] = 0;
    expect_invalid(kvbf16_append(pool, &L, 0, -1, 1, lens, tab, 4, q, q, s, err, sizeof err), err, "append -1 seqs");
    CHECK(kvbf16_append(pool, &L, 0, 0, 1, lens, tab, 4, q, q, s, err, sizeof err) == KVBF16_OK);
    CHECK(kvbf16_append(pool, &L, 0, 3, 0, lens, tab, 4, q, q, s, err, sizeof err) == KVBF16_OK);
    err[0] = 0;
    expect_invalid(kvbf16_attention(pool, &L, 0, 1, 0, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, err, sizeof err), err,
                   "attention q_len 0");
    err[0] = 0;
    expect_invalid(kvbf16_attention(pool, &L, -1, 1, 1, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, err, sizeof err),
                   err, "attention layer -1");
    err[0] = 0;
    expect_invalid(kvbf16_attention(pool, &L, 0, 1, 4, lens, tab, 4, 3, q, o, 0.0f, NULL, 0, s, err, sizeof err), err,
                   "attention max_seq_len < q_len");
    err[0] = 0;
    expect_invalid(kvbf16_attention(pool, &L, 0, 1, 1, lens, tab, 4, 100, q, NULL, 0.0f, NULL, 0, s, err, sizeof err),
                   err, "attention out NULL");
    err[0] = 0;
    expect_invalid(kvbf16_attention(pool, &L, 0, 70000, 1, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, err, sizeof err),
                   err, "attention 70000 sequences");
    err[0] = 0;
    expect_invalid(kvbf16_attention(pool, &L, 0, 1, 1, lens, tab, 4, 100, q, o, 0.0f, (char *)o + 4, 1024, s, err,
                                    sizeof err),
                   err, "attention misaligned workspace");
    err[0] = 0;
    expect_invalid(kvbf16_attention((char *)pool + 2, &L, 0, 1, 1, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, err,
                                    sizeof err),
                   err, "attention misaligned pool");
    CHECK(kvbf16_attention(pool, &L, 0, 0, 1, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, err, sizeof err) == KVBF16_OK);
    /* err may be NULL */
    CHECK(kvbf16_attention(pool, NULL, 0, 1, 1, lens, tab, 4, 100, q, o, 0.0f, NULL, 0, s, NULL, 0) == KVBF16_E_INVALID);
    /* the split count: more splits for fewer sequences, 1 without workspace */
    const size_t ws = kvbf16_workspace_bytes(&good, 1, 2 * g_sms);
    const int s1 = kvbf16_attention_splits(&good, 1, 1, 131072, ws), s8 = kvbf16_attention_splits(&good, 8, 1, 131072, ws);
    const int s32 = kvbf16_attention_splits(&good, 32, 1, 32768, ws), s0 = kvbf16_attention_splits(&good, 1, 1, 131072, 0);
    printf("   splits at Hkv 8, d 128: B1/128K %d, B8/128K %d, B32/32K %d, B1/128K without workspace %d\n", s1, s8, s32,
           s0);
    CHECKF(s1 >= s8 && s8 >= s32 && s32 >= 1 && s0 == 1 && s1 <= 256, "split counts %d %d %d %d", s1, s8, s32, s0);
    if (g_sms >= 64) CHECKF(s1 >= g_sms / 8, "B1/128K uses %d splits on %d SMs", s1, g_sms);
    CU(cudaStreamSynchronize(s));
    CU(cudaStreamDestroy(s));
    CU(cudaFree(pool));
    CU(cudaFree(lens));
    CU(cudaFree(tab));
    CU(cudaFree(q));
    CU(cudaFree(o));
}

/* ---- main --------------------------------------------------------------------------- */

static const struct {
    const char *name;
    void (*fn)(void);
    const char *what;
} g_tests[] = {
    {"args", test_args, "bad arguments fail before any launch"},
    {"shapes", test_shapes, "append bytes and attention against float64, many shapes"},
    {"badmeta", test_badmeta, "bad lengths and block ids give NaN rows for that sequence only"},
    {"graph", test_graph, "graph-captured append + attention = eager, bit for bit"},
};

static int selected(const char *name) {
    if (!g_only) return 1;
    const size_t n = strlen(name);
    for (const char *p = g_only; *p;) {
        const char *e = strchr(p, ',');
        const size_t m = e ? (size_t)(e - p) : strlen(p);
        if (m == n && !strncmp(p, name, n)) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const int n_tests = (int)(sizeof g_tests / sizeof g_tests[0]);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--small")) {
            g_small = 1;
        } else if (!strcmp(argv[i], "--skip-reference")) {
            g_skip_ref = 1;
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            g_only = argv[++i];
        } else if (!strcmp(argv[i], "--list")) {
            for (int t = 0; t < n_tests; t++) printf("%-8s %s\n", g_tests[t].name, g_tests[t].what);
            return 0;
        } else {
            printf("usage: %s [--small] [--skip-reference] [--only NAME[,NAME...]] [--list]\n", argv[0]);
            return 2;
        }
    }
    int ndev = 0;
    const cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev < 1) {
        printf("SKIP: no CUDA device (%s); test_kv_bf16 not run\n",
               ce != cudaSuccess ? cudaGetErrorString(ce) : "none found");
        return 77;
    }
    int dev = 0;
    CU(cudaGetDevice(&dev));
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, dev));
    if (prop.major != 9 || prop.minor != 0) {
        printf("SKIP: %s is compute capability %d.%d; the kvbf16 kernels are built for sm_90a only\n", prop.name,
               prop.major, prop.minor);
        return 77;
    }
    g_sms = prop.multiProcessorCount;
    printf("device %d: %s (cc %d.%d, %d SMs)%s\n", dev, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
           g_small ? ", --small" : "");
    lut_init();
    int ran = 0;
    for (int t = 0; t < n_tests; t++) {
        if (!selected(g_tests[t].name)) continue;
        tl_run(g_tests[t].name, g_tests[t].fn);
        ran++;
    }
    if (!ran) {
        printf("no test matches --only %s (see --list)\n", g_only);
        return 2;
    }
    printf("worst attention error over all checks: %.3e of the row max (limit %.0e)\n", g_worst, TOL);
    return tl_finish();
}
