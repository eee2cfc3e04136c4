/*
 * test_engine.c - the engine-facing API on the CPU backend.
 *
 *  - config.caller_metadata = 1 and the batch API (oscar_batch_append,
 *    oscar_batch_attention), driven by a block manager written here (a
 *    shuffled free list with reference counts, tables padded with -1), bit
 *    for bit against the sequence API fed the same tokens: several methods,
 *    prefill chunks of different sizes, batched decode in a random order,
 *    multi-token decode steps, sequences restarted in old and new slots.
 *    Method none with an F32 window is also compared with a float64
 *    softmax attention over the raw tokens.
 *  - oscar_slot_copy forks (block table rows shared by the test's manager)
 *    against oscar_seq_fork, parent and children diverging afterwards.
 *  - Bad input to every new function: the status, a message, and nothing
 *    changed (a twin cache that never saw the call gives the same attention;
 *    after a difference the twins are rebuilt, so one bug gives one failure).
 *    Each API refuses the other mode (OSCAR_E_UNSUPPORTED).
 *  - oscar_memory_requirements_get and oscar_cache_create_with_memory:
 *    exactly sized caller regions (with canaries), regions allocated through
 *    an allocation hook that is counted (create/destroy only, every byte
 *    given back), failing hooks, misaligned regions.
 *  - oscar_poll / oscar_synchronize, const functions that never write the
 *    handle's message, and OSCAR_MAX_Q_LEN (4096 works, 4097 is rejected).
 */
#define _POSIX_C_SOURCE 200112L
#include "testlib.h"

#include <stdlib.h>
#include <string.h>

enum { MAXS = 8, MAXL = 2, MAXB = 160, MAXPOOL = 512 };

static oscar_config engine_cfg(oscar_method m, int bits, int d, int hkv, int hq, int R, int kg, int vg,
                               oscar_dtype w, int layers) {
    oscar_config c = tl_small_config(m, bits, d, hkv, hq);
    c.residual = R;
    c.k_group = kg;
    c.v_group = vg;
    c.window_dtype = w;
    c.num_layers = layers;
    c.block_count = 64;
    c.max_seqs = MAXS;
    c.caller_metadata = 0;
    return c;
}

/* The main configuration: oscar 2-bit, d 64, Hkv 2, Hq 4, R 32, groups
 * 16/16, 2 layers. */
static oscar_config base_cfg(void) {
    return engine_cfg(OSCAR_METHOD_OSCAR, 2, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_F16, 2);
}

static oscar_cache *create_mode(oscar_config cfg, int caller_metadata) {
    cfg.caller_metadata = caller_metadata;
    return tl_create(&cfg);
}

static void *encode_new(const float *x, oscar_dtype dt, int64_t n) {
    void *p = malloc((size_t)(n > 0 ? n : 1) * (size_t)tl_dtype_size(dt));
    if (n > 0) tl_encode(x, dt, p, n);
    return p;
}

/* ---- the test's block manager ---------------------------------------------- */

typedef struct bmgr {
    int n, top;
    int32_t stack[MAXPOOL];
    int32_t ref[MAXPOOL];
} bmgr;

static void bm_init(bmgr *m, int n, uint64_t seed) {
    tl_rng r = tl_rng_seeded(seed);
    m->n = n;
    m->top = n;
    for (int i = 0; i < n; i++) {
        m->stack[i] = i;
        m->ref[i] = 0;
    }
    for (int i = n - 1; i > 0; i--) { /* physical blocks in a scrambled order */
        int j = tl_randint(&r, 0, i);
        int32_t t = m->stack[i];
        m->stack[i] = m->stack[j];
        m->stack[j] = t;
    }
}

static int32_t bm_get(bmgr *m) {
    if (!CHECKF(m->top > 0, "test block manager: out of blocks")) return 0;
    int32_t b = m->stack[--m->top];
    m->ref[b] = 1;
    return b;
}

static void bm_put(bmgr *m, int32_t b) {
    if (--m->ref[b] == 0) m->stack[m->top++] = b;
}

/* ---- one cache driven through either API ----------------------------------- */

typedef struct drv {
    oscar_cache *c;
    oscar_config cfg;
    int batch;                 /* 1: batch API with the test's metadata */
    tl_rng lr;                 /* layout choices only (slack, stride)    */
    int32_t ids[MAXS];         /* sequence API ids                       */
    int32_t slot[MAXS], nblk[MAXS];
    int32_t table[MAXS][MAXB];
    int64_t len[MAXS][MAXL];
    bmgr bm;
    int32_t b_lens[MAXS], b_slots[MAXS], b_tables[MAXS * MAXB];
} drv;

static drv *drv_new(oscar_cache *c, const oscar_config *cfg, int batch, uint64_t seed) {
    drv *D = calloc(1, sizeof *D);
    D->c = c;
    D->cfg = *cfg;
    D->batch = batch;
    D->lr = tl_rng_seeded(seed);
    bm_init(&D->bm, cfg->block_count, seed ^ 0x5151);
    return D;
}

/* Most blocks a sequence of n tokens can have packed (oscar.h, oscar_batch):
 * block j holds tokens [S + jR, S + (j+1)R), so the first S don't count. */
static int64_t blocks_needed(const oscar_config *cfg, int64_t n) {
    const int64_t S = cfg->sink_tokens;
    return n > S ? (n - S) / cfg->residual : 0;
}

/* The table grows only as far as packing can reach; entries past that stay
 * -1 (drv_batch), so a backend that packs or reads a block too many fails. */
static void drv_grow(drv *D, int i, int64_t newlen) {
    while (D->nblk[i] < blocks_needed(&D->cfg, newlen) && D->nblk[i] < MAXB)
        D->table[i][D->nblk[i]++] = bm_get(&D->bm);
}

/* The batch arrays for sequences idx[0..n) at their current length in
 * `layer` plus `extra` tokens; random slack in max_seq_len and stride, unused
 * table entries -1. */
static oscar_batch drv_batch(drv *D, int n, const int *idx, int tps, int layer, int64_t extra) {
    const int R = D->cfg.residual;
    int64_t maxlen = 0;
    for (int i = 0; i < n; i++) {
        D->b_lens[i] = (int32_t)(D->len[idx[i]][layer] + extra);
        D->b_slots[i] = D->slot[idx[i]];
        if (D->b_lens[i] > maxlen) maxlen = D->b_lens[i];
    }
    int64_t msl = maxlen + (tl_randint(&D->lr, 0, 2) ? tl_randint(&D->lr, 1, 40) : 0);
    if (msl / R > MAXB) msl = maxlen;
    int stride = (int)blocks_needed(&D->cfg, msl) + tl_randint(&D->lr, 0, 2); /* the least allowed, or more */
    if (stride < 1) stride = 1;
    if (stride > MAXB) stride = MAXB;
    for (int i = 0; i < n * stride; i++) D->b_tables[i] = -1;
    for (int i = 0; i < n; i++) {
        int nb = D->nblk[idx[i]] < stride ? D->nblk[idx[i]] : stride;
        memcpy(D->b_tables + (size_t)i * stride, D->table[idx[i]], sizeof(int32_t) * (size_t)nb);
    }
    oscar_batch b;
    memset(&b, 0, sizeof b); /* fields this test does not use stay NULL / 0 */
    b.num_seqs = n;
    b.tokens_per_seq = tps;
    b.max_seq_len = (int32_t)msl;
    b.block_table_stride = stride;
    b.seq_lens = D->b_lens;
    b.window_slots = D->b_slots;
    b.block_tables = D->b_tables;
    return b;
}

static oscar_status drv_add(drv *D, int i, int32_t slot) {
    for (int l = 0; l < MAXL; l++) D->len[i][l] = 0;
    D->nblk[i] = 0;
    D->slot[i] = slot;
    if (!D->batch) return oscar_seq_add(D->c, &D->ids[i]);
    return OSCAR_OK;
}

static oscar_status drv_free(drv *D, int i) {
    for (int l = 0; l < MAXL; l++) D->len[i][l] = 0;
    if (!D->batch) return oscar_seq_free(D->c, D->ids[i]);
    for (int j = 0; j < D->nblk[i]; j++) bm_put(&D->bm, D->table[i][j]);
    D->nblk[i] = 0;
    return OSCAR_OK;
}

static oscar_status drv_fork(drv *D, int src, int dst, int32_t dst_slot) {
    if (!D->batch) {
        oscar_status st = oscar_seq_fork(D->c, D->ids[src], &D->ids[dst]);
        if (st == OSCAR_OK)
            for (int l = 0; l < MAXL; l++) D->len[dst][l] = D->len[src][l];
        return st;
    }
    D->slot[dst] = dst_slot;
    D->nblk[dst] = D->nblk[src];
    for (int j = 0; j < D->nblk[src]; j++) {
        D->table[dst][j] = D->table[src][j];
        D->bm.ref[D->table[src][j]]++;
    }
    for (int l = 0; l < MAXL; l++) D->len[dst][l] = D->len[src][l];
    return oscar_slot_copy(D->c, D->slot[src], dst_slot, D->len[src][0], NULL);
}

/* Appends nt[i] tokens to sequence idx[i]; k, v encoded in dt, the tokens of
 * idx[0] first. The batch API makes one call when the counts are equal and
 * one call per sequence otherwise (it takes tokens_per_seq for all). */
static oscar_status drv_append(drv *D, int layer, int n, const int *idx, const int32_t *nt, const void *k,
                               const void *v, oscar_dtype dt) {
    if (!D->batch) {
        int32_t ids[MAXS] = {0};
        for (int i = 0; i < n; i++) ids[i] = D->ids[idx[i]];
        oscar_status st = oscar_append(D->c, layer, n, ids, nt, k, v, dt, NULL);
        if (st == OSCAR_OK)
            for (int i = 0; i < n; i++) D->len[idx[i]][layer] += nt[i];
        return st;
    }
    const size_t es = (size_t)tl_dtype_size(dt) * (size_t)D->cfg.num_kv_heads * (size_t)D->cfg.head_dim;
    int uniform = 1;
    for (int i = 1; i < n; i++) uniform &= nt[i] == nt[0];
    if (uniform && nt[0] > 0) {
        for (int i = 0; i < n; i++) drv_grow(D, idx[i], D->len[idx[i]][layer] + nt[0]);
        oscar_batch b = drv_batch(D, n, idx, nt[0], layer, nt[0]);
        oscar_status st = oscar_batch_append(D->c, layer, &b, k, v, dt, NULL);
        if (st == OSCAR_OK)
            for (int i = 0; i < n; i++) D->len[idx[i]][layer] += nt[0];
        return st;
    }
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (nt[i] <= 0) continue;
        drv_grow(D, idx[i], D->len[idx[i]][layer] + nt[i]);
        oscar_batch b = drv_batch(D, 1, &idx[i], nt[i], layer, nt[i]);
        oscar_status st = oscar_batch_append(D->c, layer, &b, (const char *)k + (size_t)off * es,
                                             (const char *)v + (size_t)off * es, dt, NULL);
        if (st != OSCAR_OK) return st;
        D->len[idx[i]][layer] += nt[i];
        off += nt[i];
    }
    return OSCAR_OK;
}

/* Attention for the last q_len tokens of each sequence; out is float32,
 * poisoned with NaN first. */
static oscar_status drv_attention(drv *D, int layer, int n, const int *idx, int q_len, const void *q,
                                  oscar_dtype qdt, float *out, float scale) {
    memset(out, 0xff, sizeof(float) * (size_t)n * q_len * D->cfg.num_q_heads * D->cfg.head_dim);
    if (!D->batch) {
        int32_t ids[MAXS] = {0};
        for (int i = 0; i < n; i++) ids[i] = D->ids[idx[i]];
        return oscar_attention(D->c, layer, n, ids, q_len, q, qdt, out, OSCAR_DTYPE_F32, scale, NULL);
    }
    oscar_batch b = drv_batch(D, n, idx, q_len, layer, 0);
    return oscar_batch_attention(D->c, layer, &b, q, qdt, out, OSCAR_DTYPE_F32, scale, NULL);
}

/* ---- two drivers fed the same tokens --------------------------------------- */

typedef struct pair {
    drv *a, *b;
    const char *what;
    tl_rng *r;
    int flavor;
    int ref_check;   /* float64 attention over the raw tokens (exact caches only) */
    int64_t cap;     /* tokens of history per sequence and layer */
    float *hk[MAXS][MAXL], *hv[MAXS][MAXL];
    double key_norm;
    int step;
    int64_t max_len; /* longest sequence so far */
} pair;

static void pair_init(pair *P, drv *a, drv *b, const char *what, tl_rng *r, int flavor, int ref_check, int64_t cap) {
    memset(P, 0, sizeof *P);
    P->a = a;
    P->b = b;
    P->what = what;
    P->r = r;
    P->flavor = flavor;
    P->ref_check = ref_check;
    P->cap = cap;
    P->key_norm = 1.0;
}

static void pair_done(pair *P) {
    for (int i = 0; i < MAXS; i++)
        for (int l = 0; l < MAXL; l++) {
            free(P->hk[i][l]);
            free(P->hv[i][l]);
        }
    free(P->a);
    free(P->b);
}

static int64_t row_of(const pair *P) { return (int64_t)P->a->cfg.num_kv_heads * P->a->cfg.head_dim; }

static void pair_hist(pair *P, int i) {
    for (int l = 0; l < MAXL; l++) {
        if (!P->hk[i][l]) P->hk[i][l] = malloc(sizeof(float) * (size_t)(P->cap * row_of(P)));
        if (!P->hv[i][l]) P->hv[i][l] = malloc(sizeof(float) * (size_t)(P->cap * row_of(P)));
    }
}

static void pair_add(pair *P, int i, int32_t slot) {
    pair_hist(P, i);
    CHECK_ST(P->a->c, drv_add(P->a, i, slot), OSCAR_OK);
    CHECK_ST(P->b->c, drv_add(P->b, i, slot), OSCAR_OK);
}

static void pair_free(pair *P, int i) {
    CHECK_ST(P->a->c, drv_free(P->a, i), OSCAR_OK);
    CHECK_ST(P->b->c, drv_free(P->b, i), OSCAR_OK);
}

static void pair_fork(pair *P, int src, int dst, int32_t slot) {
    pair_hist(P, dst);
    CHECKF(drv_fork(P->a, src, dst, slot) == OSCAR_OK, "%s: fork %d -> %d (a): %s", P->what, src, dst,
           oscar_last_error(P->a->c));
    CHECKF(drv_fork(P->b, src, dst, slot) == OSCAR_OK, "%s: fork %d -> %d (b): %s", P->what, src, dst,
           oscar_last_error(P->b->c));
    size_t n = sizeof(float) * (size_t)(P->a->len[src][0] * row_of(P));
    for (int l = 0; l < P->a->cfg.num_layers; l++) {
        memcpy(P->hk[dst][l], P->hk[src][l], n);
        memcpy(P->hv[dst][l], P->hv[src][l], n);
    }
}

/* Fresh tokens (flavour of the pair, rounded to dt) to both caches. */
static void pair_append(pair *P, int layer, int n, const int *idx, const int32_t *nt, oscar_dtype dt) {
    const int hkv = P->a->cfg.num_kv_heads, d = P->a->cfg.head_dim;
    const int64_t row = row_of(P);
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += nt[i];
    float *k = malloc(sizeof(float) * (size_t)((total ? total : 1) * row));
    float *v = malloc(sizeof(float) * (size_t)((total ? total : 1) * row));
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        int s = idx[i];
        int64_t at = P->a->len[s][layer];
        if (!CHECKF(at + nt[i] <= P->cap, "test history too short")) {
            free(k);
            free(v);
            return;
        }
        if (nt[i] > 0 && at == 0) {
            tl_gen_kv(P->r, P->flavor, P->hk[s][layer], P->hv[s][layer], nt[i], hkv, d, dt);
        } else if (nt[i] > 0) {
            /* a continuation: tl_gen_kv makes its first token special (a
             * sink, or zero keys at token 1): generate one more and drop it */
            float *gk = malloc(sizeof(float) * (size_t)((nt[i] + 1) * row));
            float *gv = malloc(sizeof(float) * (size_t)((nt[i] + 1) * row));
            tl_gen_kv(P->r, P->flavor, gk, gv, nt[i] + 1, hkv, d, dt);
            memcpy(P->hk[s][layer] + at * row, gk + row, sizeof(float) * (size_t)(nt[i] * row));
            memcpy(P->hv[s][layer] + at * row, gv + row, sizeof(float) * (size_t)(nt[i] * row));
            free(gk);
            free(gv);
        }
        if (nt[i] > 0) {
            memcpy(k + off * row, P->hk[s][layer] + at * row, sizeof(float) * (size_t)(nt[i] * row));
            memcpy(v + off * row, P->hv[s][layer] + at * row, sizeof(float) * (size_t)(nt[i] * row));
        }
        off += nt[i];
        if (at + nt[i] > P->max_len) P->max_len = at + nt[i];
    }
    if (total >= 3) P->key_norm = tl_key_rms_norm(k, total, hkv, d); /* sets the scale of the queries */
    void *ke = encode_new(k, dt, total * row), *ve = encode_new(v, dt, total * row);
    oscar_status sa = drv_append(P->a, layer, n, idx, nt, ke, ve, dt);
    oscar_status sb = drv_append(P->b, layer, n, idx, nt, ke, ve, dt);
    CHECKF(sa == OSCAR_OK, "%s step %d: append (a, layer %d) = %s: %s", P->what, P->step, layer,
           oscar_status_name(sa), oscar_last_error(P->a->c));
    CHECKF(sb == OSCAR_OK, "%s step %d: append (b, layer %d) = %s: %s", P->what, P->step, layer,
           oscar_status_name(sb), oscar_last_error(P->b->c));
    free(k);
    free(v);
    free(ke);
    free(ve);
}

/* Same q to both caches; 1 if both succeed with finite, bit-identical
 * float32 outputs. Checks the statuses (and, with ref_check, the float64
 * reference); leaves the equality to the caller. */
static int pair_compare(pair *P, int layer, int n, const int *idx, int q_len, oscar_dtype qdt, float scale) {
    const int hq = P->a->cfg.num_q_heads, d = P->a->cfg.head_dim;
    const int64_t per = (int64_t)q_len * hq * d, nq = n * per;
    float *q = malloc(sizeof(float) * (size_t)nq);
    float *oa = malloc(sizeof(float) * (size_t)nq), *ob = malloc(sizeof(float) * (size_t)nq);
    tl_gen_q(P->r, q, (int64_t)n * q_len, hq, d, P->key_norm, 1.5, qdt);
    void *qe = encode_new(q, qdt, nq);
    oscar_status sa = drv_attention(P->a, layer, n, idx, q_len, qe, qdt, oa, scale);
    oscar_status sb = drv_attention(P->b, layer, n, idx, q_len, qe, qdt, ob, scale);
    CHECKF(sa == OSCAR_OK, "%s step %d: attention (a, layer %d, q_len %d) = %s: %s", P->what, P->step, layer, q_len,
           oscar_status_name(sa), oscar_last_error(P->a->c));
    CHECKF(sb == OSCAR_OK, "%s step %d: attention (b, layer %d, q_len %d) = %s: %s", P->what, P->step, layer, q_len,
           oscar_status_name(sb), oscar_last_error(P->b->c));
    int same = sa == OSCAR_OK && sb == OSCAR_OK && tl_count_nonfinite(oa, nq) == 0 &&
               tl_count_nonfinite(ob, nq) == 0 && memcmp(oa, ob, sizeof(float) * (size_t)nq) == 0;
    if (P->ref_check && sa == OSCAR_OK) {
        const int hkv = P->a->cfg.num_kv_heads;
        double sm = scale > 0.0f ? (double)scale : 1.0 / sqrt((double)d);
        double *ref = malloc(sizeof(double) * (size_t)per), *mag = malloc(sizeof(double) * (size_t)q_len * hq);
        for (int i = 0; i < n; i++) {
            int s = idx[i];
            int64_t T = P->a->len[s][layer];
            tl_ref_attention_f(d, hkv, hq, P->hk[s][layer], P->hv[s][layer], T, q_len, q + i * per, sm, ref, mag);
            double w = 0;
            int64_t bad = tl_compare_out(oa + i * per, ref, mag, (int64_t)q_len * hq, d, OSCAR_DTYPE_F32, 1e-5, &w);
            CHECKF(bad == 0, "%s step %d: layer %d seq %d (%lld tokens, q_len %d) vs float64 attention: %lld bad, "
                   "worst %.3g", P->what, P->step, layer, s, (long long)T, q_len, (long long)bad, w);
        }
        free(ref);
        free(mag);
    }
    free(q);
    free(oa);
    free(ob);
    free(qe);
    return same;
}

static int pair_attend(pair *P, int layer, int n, const int *idx, int q_len, oscar_dtype qdt, float scale) {
    int same = pair_compare(P, layer, n, idx, q_len, qdt, scale);
    return CHECKF(same, "%s step %d: layer %d, %d sequences, q_len %d: the two caches give different (or "
                  "non-finite) attention", P->what, P->step, layer, n, q_len);
}

/* Every layer: append nt[i] tokens, then attention for the new tokens. */
static void pair_step(pair *P, int n, const int *idx, const int32_t *nt, oscar_dtype dt, oscar_dtype qdt,
                      float scale) {
    const int L = P->a->cfg.num_layers;
    for (int l = 0; l < L; l++) pair_append(P, l, n, idx, nt, dt);
    int uniform = 1;
    for (int i = 1; i < n; i++) uniform &= nt[i] == nt[0];
    for (int l = 0; l < L; l++) {
        if (uniform && nt[0] > 0) {
            pair_attend(P, l, n, idx, nt[0], qdt, scale);
        } else {
            for (int i = 0; i < n; i++)
                if (nt[i] > 0) pair_attend(P, l, 1, &idx[i], nt[i], qdt, scale);
        }
    }
    P->step++;
}

static oscar_dtype rand_dtype(tl_rng *r) { return (oscar_dtype)tl_randint(r, 0, 2); }

static void shuffle(tl_rng *r, int *x, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = tl_randint(r, 0, i);
        int t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

/* ---- 1. batch API == sequence API -------------------------------------------- */

static void equiv_scenario(const char *what, oscar_config cfg, int flavor, int ref_check, tl_rng *r) {
    oscar_cache *A = create_mode(cfg, 0), *B = create_mode(cfg, 1);
    if (!A || !B) {
        oscar_cache_destroy(A);
        oscar_cache_destroy(B);
        return;
    }
    printf("   equivalence: %s (%s, %s window, %s tokens)\n", what, oscar_method_name(cfg.method),
           tl_dtype_name(cfg.window_dtype), tl_flavor_name(flavor));
    oscar_config got;
    CHECK_OK(oscar_cache_config(B, &got));
    CHECK(got.caller_metadata == 1);
    CHECK_OK(oscar_cache_config(A, &got));
    CHECK(got.caller_metadata == 0);
    pair P;
    pair_init(&P, drv_new(A, &cfg, 0, 11), drv_new(B, &cfg, 1, 12), what, r, flavor, ref_check, 260);
    const int R = cfg.residual;
    const int NS = 3;
    const int32_t slots[3] = {5, 0, 3};
    for (int i = 0; i < NS; i++) pair_add(&P, i, slots[i]);
    /* prefill in rounds: the sequence API appends every sequence's chunk in
     * one call (counts differ, some are 0), the batch API one call each */
    const int32_t chunks[4][3] = {{45, 20, 33}, {0, 50, 31}, {0, 0, 36}, {0, 0, 1}};
    const int idx3[3] = {0, 1, 2};
    for (int round = 0; round < 4; round++) {
        oscar_dtype dt = ref_check ? OSCAR_DTYPE_F32 : rand_dtype(r);
        int32_t nt[3];
        for (int i = 0; i < NS; i++) nt[i] = chunks[round][i] * (R / 32); /* same block crossings for any R */
        pair_step(&P, NS, idx3, nt, dt, OSCAR_DTYPE_F32, 0.0f);
    }
    /* batched decode in a random order, some steps with 3 tokens per
     * sequence; sequence 1 restarts in a new slot, sequence 0 in its own */
    for (int s = 0; s < 30; s++) {
        if (s == 10) {
            pair_free(&P, 1);
            pair_add(&P, 1, 7);
            const int one = 1;
            const int32_t n10 = 10;
            pair_step(&P, 1, &one, &n10, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
        }
        if (s == 15) { /* a one-token prompt in slot 0, which held packed blocks */
            pair_free(&P, 2);
            pair_add(&P, 2, 0);
            const int two = 2;
            const int32_t n1 = 1;
            pair_step(&P, 1, &two, &n1, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
        }
        if (s == 20) { /* short and block-crossing prompts in old slots */
            pair_free(&P, 0);
            pair_add(&P, 0, 5);
            const int zero = 0;
            const int32_t n7 = 7;
            pair_step(&P, 1, &zero, &n7, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
        }
        if (s == 25) {
            pair_free(&P, 1);
            pair_add(&P, 1, 3);
            const int one = 1;
            const int32_t n40 = R + 8;
            pair_step(&P, 1, &one, &n40, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
        }
        int perm[3] = {0, 1, 2};
        shuffle(r, perm, NS);
        int32_t tps = (s % 9 == 5) ? 3 : 1;
        int32_t nt[3] = {tps, tps, tps};
        oscar_dtype dt = ref_check ? OSCAR_DTYPE_F32 : rand_dtype(r);
        oscar_dtype qdt = s % 4 == 1 ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F32;
        float scale = s % 5 == 2 ? 0.09f : 0.0f;
        pair_step(&P, NS, perm, nt, dt, qdt, scale);
    }
    int64_t maxlen = P.max_len;
    CHECKF(maxlen >= 2 * R, "%s: the longest sequence holds only %lld tokens", what, (long long)maxlen);
    /* the lengths the library reports for the sequence API are the test's */
    for (int i = 0; i < NS; i++) {
        oscar_seq_info info;
        CHECK_OK(oscar_seq_info_get(A, P.a->ids[i], 1, &info));
        CHECK(info.tokens == P.a->len[i][1] && info.tokens == P.b->len[i][1]);
    }
    pair_done(&P);
    oscar_cache_destroy(A);
    oscar_cache_destroy(B);
}

static void test_batch_equals_sequence_api(void) {
    tl_rng r = tl_rng_for("batch_equals_sequence_api");
    equiv_scenario("oscar-2", base_cfg(), TL_FLAVOR_SINKS, 0, &r);
    equiv_scenario("none, f32 window",
                   engine_cfg(OSCAR_METHOD_NONE, 2, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_F32, 2), TL_FLAVOR_NORMAL, 1,
                   &r);
    equiv_scenario("kivi-4", engine_cfg(OSCAR_METHOD_KIVI, 4, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_BF16, 2),
                   TL_FLAVOR_OUTLIERS, 0, &r);
    oscar_config so = engine_cfg(OSCAR_METHOD_SCALE_ONLY, 2, 128, 1, 2, 64, 32, 32, OSCAR_DTYPE_F16, 2);
    equiv_scenario("scale-only-2, d 128, R 64", so, TL_FLAVOR_ZERO, 0, &r);
    oscar_config qr = engine_cfg(OSCAR_METHOD_QUAROT, 2, 64, 2, 2, 32, 32, 32, OSCAR_DTYPE_F16, 2);
    qr.rotate_values = 0;
    equiv_scenario("quarot-2, folded V", qr, TL_FLAVOR_OUTLIERS, 0, &r);
}

/* ---- 1b. sink tokens: batch API == sequence API ------------------------------- */

/* With sink_tokens = S: prompts shorter than S, of exactly S, one past S and
 * crossing S and a block, a prompt in two chunks across S, then batched
 * decode (some 3-token steps) until every sequence has crossed two block
 * boundaries after its sinks, with a restart in a dirty slot. Both caches
 * get the same tokens; every attention must be bit-identical. */
/* A cache over a pool of the test's own (docs/FORMAT.md: layer block (l, i)
 * at byte (l * block_count + i) * LB), so that its blocks can be read. */
static oscar_cache *create_over_pool(oscar_config cfg, int caller_metadata, void **pool) {
    cfg.caller_metadata = caller_metadata;
    oscar_memory_requirements rq;
    char eb[256] = "";
    *pool = NULL;
    if (!CHECKF(oscar_memory_requirements_get(&cfg, &rq, eb, sizeof eb) == OSCAR_OK, "requirements: %s", eb) ||
        posix_memalign(pool, rq.alignment, rq.pool_bytes ? rq.pool_bytes : rq.alignment) != 0)
        return NULL;
    oscar_memory_source src;
    memset(&src, 0, sizeof src);
    src.pool = *pool;
    oscar_cache *c = NULL;
    CHECKF(oscar_cache_create_with_memory(&cfg, &src, &c, eb, sizeof eb) == OSCAR_OK, "create over a pool: %s", eb);
    return c;
}

/* Every packed block of sequences 0..n-1, layer by layer, byte for byte:
 * the sequence API's (its own block ids) against the batch API's (the
 * test's table). Returns the blocks compared. */
static int64_t same_blocks(pair *P, int n, const uint8_t *pool_a, const uint8_t *pool_b) {
    const oscar_config *cfg = &P->a->cfg;
    oscar_memory_stats ms;
    CHECK_OK(oscar_memory(P->a->c, &ms));
    const size_t LB = (size_t)ms.block_bytes / (size_t)cfg->num_layers; /* one layer block */
    int64_t compared = 0;
    for (int i = 0; i < n; i++) {
        int32_t table[MAXB], count = 0;
        CHECK_OK(oscar_seq_block_table(P->a->c, P->a->ids[i], table, MAXB, &count));
        for (int l = 0; l < cfg->num_layers; l++) {
            oscar_seq_info info;
            CHECK_OK(oscar_seq_info_get(P->a->c, P->a->ids[i], l, &info));
            const int64_t packed = info.packed_tokens / cfg->residual;
            CHECKF(packed <= count && packed <= P->b->nblk[i], "%s: sequence %d layer %d: %lld blocks packed, tables "
                   "of %d and %d", P->what, i, l, (long long)packed, (int)count, (int)P->b->nblk[i]);
            for (int64_t j = 0; j < packed && j < count && j < P->b->nblk[i]; j++, compared++) {
                const uint8_t *x = pool_a + ((size_t)l * cfg->block_count + (size_t)table[j]) * LB;
                const uint8_t *y = pool_b + ((size_t)l * cfg->block_count + (size_t)P->b->table[i][j]) * LB;
                CHECKF(memcmp(x, y, LB) == 0, "%s: sequence %d layer %d block %lld: the batch API packed other bytes "
                       "than the sequence API", P->what, i, l, (long long)j);
            }
        }
    }
    return compared;
}

static void sinks_scenario(const char *what, oscar_config cfg, int flavor, int ref_check, tl_rng *r) {
    void *pool_a = NULL, *pool_b = NULL;
    oscar_cache *A = create_over_pool(cfg, 0, &pool_a), *B = create_over_pool(cfg, 1, &pool_b);
    if (!A || !B) {
        oscar_cache_destroy(A);
        oscar_cache_destroy(B);
        free(pool_a), free(pool_b);
        return;
    }
    const int S = cfg.sink_tokens, R = cfg.residual, L = cfg.rollback_tokens;
    printf("   sinks: %s (S %d, R %d, L %d, %s, %s window)\n", what, S, R, L, oscar_method_name(cfg.method),
           tl_dtype_name(cfg.window_dtype));
    pair P;
    const int64_t cap = S + 2 * (int64_t)(R + L) + 3 * R + 120;
    pair_init(&P, drv_new(A, &cfg, 0, 71), drv_new(B, &cfg, 1, 72), what, r, flavor, ref_check, cap);
    enum { NS = 4 };
    const int32_t slots[NS] = {6, 1, 3, 0};
    for (int i = 0; i < NS; i++) pair_add(&P, i, slots[i]);
    const oscar_dtype dt0 = ref_check ? OSCAR_DTYPE_F32 : OSCAR_DTYPE_F16;
    /* prompts: 1 token (then S more: 1 + S crosses S), S - 1, S, S + R + 3 */
    const int32_t prompt[NS] = {1, S > 1 ? S - 1 : 1, S, S + R + 3};
    for (int i = 0; i < NS; i++) pair_step(&P, 1, &i, &prompt[i], dt0, OSCAR_DTYPE_F32, 0.0f);
    {
        const int zero = 0;
        const int32_t n = S;
        pair_step(&P, 1, &zero, &n, dt0, OSCAR_DTYPE_F32, 0.0f);
    }
    /* decode until the shortest sequence (S - 1 tokens) has packed two
     * blocks: S + 2R + L tokens, and a little more */
    const int steps = 2 * R + L + 8;
    for (int s = 0; s < steps; s++) {
        if (s == steps / 2) { /* sequence 2 restarts in slot 7, then in its own old slot */
            pair_free(&P, 2);
            pair_add(&P, 2, 7);
            const int two = 2;
            const int32_t n = S + 2;
            pair_step(&P, 1, &two, &n, dt0, OSCAR_DTYPE_F32, 0.0f);
        }
        int perm[NS] = {0, 1, 2, 3};
        shuffle(r, perm, NS);
        const int32_t tps = s % 7 == 3 ? 3 : 1;
        const int32_t nt[NS] = {tps, tps, tps, tps};
        const oscar_dtype dt = ref_check ? OSCAR_DTYPE_F32 : rand_dtype(r);
        const oscar_dtype qdt = s % 4 == 1 ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F32;
        pair_step(&P, NS, perm, nt, dt, qdt, s % 5 == 2 ? 0.09f : 0.0f);
    }
    /* the sequence API's view agrees with the test's: sink rows exact, the
     * blocks after them */
    for (int i = 0; i < NS; i++)
        for (int l = 0; l < cfg.num_layers; l++) {
            oscar_seq_info info;
            CHECK_OK(oscar_seq_info_get(A, P.a->ids[i], l, &info));
            const int64_t T = P.b->len[i][l];
            CHECKF(info.tokens == T && info.packed_tokens == blocks_needed(&cfg, T - L) * R,
                   "%s: sequence %d layer %d: %lld tokens, %lld packed (test: %lld tokens)", what, i, l,
                   (long long)info.tokens, (long long)info.packed_tokens, (long long)T);
        }
    CHECKF(P.max_len >= S + 2 * R, "%s: the longest sequence holds only %lld tokens", what, (long long)P.max_len);
    /* the packed blocks themselves, byte for byte */
    const int64_t blocks = same_blocks(&P, NS, pool_a, pool_b);
    CHECKF(blocks >= NS * cfg.num_layers, "%s: only %lld packed blocks compared", what, (long long)blocks);
    /* blocks the batch side's manager handed out: exactly what packing needs */
    for (int i = 0; i < NS; i++) pair_free(&P, i);
    CHECKF(P.b->bm.top == cfg.block_count, "%s: the test's block manager lost blocks", what);
    pair_done(&P);
    oscar_cache_destroy(A);
    oscar_cache_destroy(B);
    free(pool_a), free(pool_b);
}

static oscar_config sinks_cfg(oscar_config c, int S, int L) {
    c.sink_tokens = S;
    c.rollback_tokens = L;
    return c;
}

static void test_batch_sinks(void) {
    tl_rng r = tl_rng_for("batch_sinks");
    const oscar_config base = base_cfg(); /* R 32 */
    sinks_scenario("S 1", sinks_cfg(base, 1, 0), TL_FLAVOR_SINKS, 0, &r);
    sinks_scenario("S 5, L 3", sinks_cfg(base, 5, 3), TL_FLAVOR_OUTLIERS, 0, &r);
    sinks_scenario("S 32 = R", sinks_cfg(base, 32, 0), TL_FLAVOR_SINKS, 0, &r);
    sinks_scenario("S 33 (odd, > R), L 32", sinks_cfg(base, 33, 32), TL_FLAVOR_NORMAL, 0, &r);
    sinks_scenario("S 40 > R, none, f32 window",
                   sinks_cfg(engine_cfg(OSCAR_METHOD_NONE, 2, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_F32, 2), 40, 5),
                   TL_FLAVOR_NORMAL, 1, &r);
    oscar_config rec = engine_cfg(OSCAR_METHOD_OSCAR, 2, 64, 2, 4, 64, 32, 32, OSCAR_DTYPE_F16, 2);
    sinks_scenario("S 64, R 64, L 64 (the recommended shape)", sinks_cfg(rec, 64, 64), TL_FLAVOR_SINKS, 0, &r);
    sinks_scenario("S 32, R 64, L 64 (the recommended configuration)", sinks_cfg(rec, 32, 64), TL_FLAVOR_SINKS, 0,
                   &r);
    oscar_config k4 = engine_cfg(OSCAR_METHOD_KIVI, 4, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_BF16, 2);
    k4.clip_search = 1;
    sinks_scenario("S 7, kivi-4, clipped", sinks_cfg(k4, 7, 0), TL_FLAVOR_OUTLIERS, 0, &r);
}

/* ---- 2. forks: oscar_slot_copy == oscar_seq_fork ------------------------------ */

static void fork_scenario(oscar_config cfg, int ref_check, int64_t t0, tl_rng *r) {
    oscar_cache *A = create_mode(cfg, 0), *B = create_mode(cfg, 1);
    if (!A || !B) {
        oscar_cache_destroy(A);
        oscar_cache_destroy(B);
        return;
    }
    char what[96];
    snprintf(what, sizeof what, "fork %s at %lld tokens (S %d, L %d)", oscar_method_name(cfg.method), (long long)t0,
             cfg.sink_tokens, cfg.rollback_tokens);
    printf("   %s\n", what);
    pair P;
    pair_init(&P, drv_new(A, &cfg, 0, 21), drv_new(B, &cfg, 1, 22), what, r, TL_FLAVOR_SINKS, ref_check, 220);
    const int R = cfg.residual;
    const oscar_dtype dt = ref_check ? OSCAR_DTYPE_F32 : OSCAR_DTYPE_F16;
    /* slot 6 first holds another sequence, so the child's slot is dirty */
    {
        const int three = 3;
        const int32_t n = R - 1;
        pair_add(&P, 3, 6);
        pair_step(&P, 1, &three, &n, dt, OSCAR_DTYPE_F32, 0.0f);
        pair_free(&P, 3);
    }
    const int zero = 0;
    pair_add(&P, 0, 2);
    int32_t c1 = (int32_t)(t0 > R ? R + 1 : t0), c2 = (int32_t)(t0 - c1);
    pair_step(&P, 1, &zero, &c1, dt, OSCAR_DTYPE_F32, 0.0f);
    if (c2 > 0) pair_step(&P, 1, &zero, &c2, dt, OSCAR_DTYPE_F32, 0.0f);
    pair_fork(&P, 0, 1, 6);
    /* right after the fork the child answers the parent's query exactly as
     * the parent does, in both caches */
    {
        const int L = cfg.num_layers, hq = cfg.num_q_heads, d = cfg.head_dim;
        const int64_t per = (int64_t)hq * d;
        float *q = malloc(sizeof(float) * (size_t)(2 * per)), *o = malloc(sizeof(float) * (size_t)(2 * per));
        tl_gen_q(r, q, 1, hq, d, P.key_norm, 1.5, OSCAR_DTYPE_F32);
        memcpy(q + per, q, sizeof(float) * (size_t)per);
        const int both[2] = {0, 1};
        for (int l = 0; l < L; l++) {
            drv *Ds[2] = {P.a, P.b};
            for (int k = 0; k < 2; k++) {
                CHECK_OK(drv_attention(Ds[k], l, 2, both, 1, q, OSCAR_DTYPE_F32, o, 0.0f));
                CHECKF(tl_count_nonfinite(o, 2 * per) == 0 && memcmp(o, o + per, sizeof(float) * (size_t)per) == 0,
                       "%s: layer %d, %s API: the child's attention differs from the parent's", what, l,
                       k ? "batch" : "sequence");
            }
            pair_attend(&P, l, 2, both, 1, OSCAR_DTYPE_F32, 0.0f);
        }
        free(q);
        free(o);
    }
    /* diverge: different token counts, then batched decode; a grandchild
     * forks from the child with a partly filled window */
    {
        const int both[2] = {0, 1};
        const int32_t nt[2] = {3, 5};
        pair_step(&P, 2, both, nt, dt, OSCAR_DTYPE_F32, 0.0f);
    }
    for (int s = 0; s < 24; s++) {
        int n = s < 8 ? 2 : 3;
        if (s == 8) pair_fork(&P, 1, 2, 1);
        int perm[3] = {0, 1, 2};
        shuffle(r, perm, n);
        int32_t nt[3] = {1, 1, 1};
        pair_step(&P, n, perm, nt, dt, OSCAR_DTYPE_F32, 0.0f);
    }
    /* the parent is freed; the children still match */
    pair_free(&P, 0);
    {
        const int kids[2] = {1, 2};
        const int32_t nt[2] = {R, R};
        pair_step(&P, 2, kids, nt, dt, OSCAR_DTYPE_F32, 0.0f);
    }
    /* every block came back to the test's manager (shared ones once) */
    pair_free(&P, 1);
    pair_free(&P, 2);
    CHECKF(P.b->bm.top == cfg.block_count, "%s: the test's block manager lost blocks (%d of %d free)", what,
           P.b->bm.top, cfg.block_count);
    pair_done(&P);
    oscar_cache_destroy(A);
    oscar_cache_destroy(B);
}

static void test_slot_copy_fork(void) {
    tl_rng r = tl_rng_for("slot_copy_fork");
    oscar_config c = base_cfg();
    fork_scenario(c, 0, 2 * 32 + 5, &r);
    fork_scenario(c, 0, 2 * 32, &r);
    fork_scenario(c, 0, 7, &r);
    fork_scenario(c, 0, 3 * 32 - 1, &r);
    fork_scenario(engine_cfg(OSCAR_METHOD_NONE, 2, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_F32, 2), 1, 32 + 17, &r);
    /* with sink tokens: forks inside the sink rows, at exactly S, past S
     * and a block (the sink rows must travel with the window) */
    const oscar_config s5 = sinks_cfg(c, 5, 0), s40 = sinks_cfg(c, 40, 4);
    fork_scenario(s5, 0, 3, &r);
    fork_scenario(s5, 0, 5, &r);
    fork_scenario(s5, 0, 5 + 32 + 6, &r);
    fork_scenario(s40, 0, 39, &r);
    fork_scenario(s40, 0, 40 + 2 * 32 + 4 + 1, &r);
    fork_scenario(sinks_cfg(engine_cfg(OSCAR_METHOD_NONE, 2, 64, 2, 4, 32, 16, 16, OSCAR_DTYPE_F32, 2), 9, 0), 1,
                  9 + 32 + 2, &r);
}

/* ---- 3. bad input ------------------------------------------------------------- */

/* A batch with its own, editable arrays. */
typedef struct tmpl {
    oscar_batch b;
    int32_t lens[MAXS + 2], slots[MAXS + 2], tables[(MAXS + 2) * MAXB];
} tmpl;

/* The sequences idx[] at their current length (+extra), minimal stride. */
static void tmpl_make(tmpl *t, const drv *D, int n, const int *idx, int tps, int layer, int64_t extra) {
    const int R = D->cfg.residual;
    int32_t maxlen = 0;
    for (int i = 0; i < n; i++) {
        t->lens[i] = (int32_t)(D->len[idx[i]][layer] + extra);
        t->slots[i] = D->slot[idx[i]];
        if (t->lens[i] > maxlen) maxlen = t->lens[i];
    }
    int stride = maxlen / R > 0 ? maxlen / R : 1;
    for (int i = 0; i < (MAXS + 2) * MAXB; i++) t->tables[i] = -1;
    for (int i = 0; i < n; i++)
        memcpy(t->tables + (size_t)i * stride, D->table[idx[i]], sizeof(int32_t) * (size_t)D->nblk[idx[i]]);
    memset(&t->b, 0, sizeof t->b);
    for (int i = n; i < MAXS + 2; i++) { /* for num_seqs too large: plausible rows */
        t->lens[i] = t->lens[0];
        t->slots[i] = i;
        memcpy(t->tables + (size_t)i * stride, t->tables, sizeof(int32_t) * (size_t)stride);
    }
    t->b.num_seqs = n;
    t->b.tokens_per_seq = tps;
    t->b.max_seq_len = maxlen;
    t->b.block_table_stride = stride;
    t->b.seq_lens = t->lens;
    t->b.window_slots = t->slots;
    t->b.block_tables = t->tables;
}

/* The ways a batch can be wrong, for both batch calls. */
enum {
    BAD_NUM0, BAD_NUM_NEG, BAD_NUM_BIG, BAD_TPS0, BAD_TPS_NEG, BAD_MAXLEN, BAD_MAXLEN0, BAD_LEN0, BAD_LEN_NEG,
    BAD_LEN_LT_TPS, BAD_SLOT_NEG, BAD_SLOT_BIG, BAD_SLOT_DUP, BAD_BLOCK_BIG, BAD_BLOCK_NEG, BAD_BLOCK_LAST,
    BAD_STRIDE, BAD_STRIDE0, BAD_STRIDE_NEG, BAD_LENS_NULL, BAD_SLOTS_NULL, BAD_TABLES_NULL, BAD_BELOW_PACKED,
    BAD_KINDS
};
static const char *const bad_names[BAD_KINDS] = {
    "num_seqs 0", "num_seqs -1", "num_seqs > max_seqs", "tokens_per_seq 0", "tokens_per_seq -1",
    "max_seq_len < a seq_len", "max_seq_len 0", "a seq_len 0", "a seq_len -5", "a seq_len < tokens_per_seq",
    "slot -1", "slot max_seqs", "duplicate slots", "block id block_count", "block id -1",
    "last needed block id -1", "block_table_stride too small", "block_table_stride 0", "block_table_stride -1",
    "seq_lens NULL", "window_slots NULL", "block_tables NULL", "a seq_len below its packed tokens"};

static void tmpl_break(tmpl *t, int kind, const oscar_config *cfg) {
    oscar_batch *b = &t->b;
    const int R = cfg->residual;
    switch (kind) {
    case BAD_NUM0: b->num_seqs = 0; break;
    case BAD_NUM_NEG: b->num_seqs = -1; break;
    case BAD_NUM_BIG: b->num_seqs = cfg->max_seqs + 1; break;
    case BAD_TPS0: b->tokens_per_seq = 0; break;
    case BAD_TPS_NEG: b->tokens_per_seq = -1; break;
    case BAD_MAXLEN: b->max_seq_len -= 1; break;
    case BAD_MAXLEN0: b->max_seq_len = 0; break;
    case BAD_LEN0: t->lens[1] = 0; break;
    case BAD_LEN_NEG: t->lens[1] = -5; break;
    case BAD_LEN_LT_TPS: t->lens[2] = b->tokens_per_seq - 1; break;
    case BAD_SLOT_NEG: t->slots[1] = -1; break;
    case BAD_SLOT_BIG: t->slots[1] = cfg->max_seqs; break;
    case BAD_SLOT_DUP: /* seq 0 (40 tokens, 1 block) also in seq 2's slot (0 packed, 20 tokens) */
        t->slots[0] = t->slots[2];
        break;
    case BAD_BLOCK_BIG: t->tables[0] = cfg->block_count; break; /* seq 0, block 0 */
    case BAD_BLOCK_NEG: t->tables[0] = -1; break;
    case BAD_BLOCK_LAST: /* seq 1's last needed entry */
        t->tables[(size_t)b->block_table_stride + (size_t)(t->lens[1] / R) - 1] = -1;
        break;
    case BAD_STRIDE: b->block_table_stride = b->max_seq_len / R - 1; break;
    case BAD_STRIDE0: b->block_table_stride = 0; break;
    case BAD_STRIDE_NEG: b->block_table_stride = -1; break;
    case BAD_LENS_NULL: b->seq_lens = NULL; break;
    case BAD_SLOTS_NULL: b->window_slots = NULL; break;
    case BAD_TABLES_NULL: b->block_tables = NULL; break;
    case BAD_BELOW_PACKED: /* seq 1 has 2 blocks packed; the header allows lowering to >= 2R only */
        t->lens[1] = 2 * R - 1;
        break;
    }
}

static int filled_with(const void *p, unsigned char byte, size_t n) {
    const unsigned char *c = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        if (c[i] != byte) return 0;
    return 1;
}

/* Three sequences in a twin pair of batch caches; X sees the bad calls. */
static void bad_setup(pair *P, oscar_config cfg, tl_rng *r, const char *what) {
    oscar_cache *X = create_mode(cfg, 1), *Y = create_mode(cfg, 1);
    pair_init(P, drv_new(X, &cfg, 1, 31), drv_new(Y, &cfg, 1, 31), what, r, TL_FLAVOR_OUTLIERS, 0, 200);
    const int32_t slots[3] = {0, 4, 2}, lens[3] = {40, 75, 20};
    for (int i = 0; i < 3; i++) {
        pair_add(P, i, slots[i]);
        pair_step(P, 1, &i, &lens[i], OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, 0.0f);
    }
}

static void bad_teardown(pair *P) {
    oscar_cache_destroy(P->a->c);
    oscar_cache_destroy(P->b->c);
    pair_done(P);
}

/* 1 if X and Y still give the same attention over everything. */
static int twins_same(pair *P) {
    const int idx3[3] = {0, 1, 2};
    int same = 1;
    for (int l = 0; l < P->a->cfg.num_layers; l++) same &= pair_compare(P, l, 3, idx3, 2, OSCAR_DTYPE_F32, 0.0f);
    return same;
}

/* Checks that X still equals its twin; after a difference (reported) both
 * are rebuilt, so that one accepted bad call gives one failure. */
#define TWINS_SAME(P, cfg, r, ...)                                                                               \
    do {                                                                                                         \
        if (!CHECKF(twins_same(P), __VA_ARGS__)) {                                                               \
            bad_teardown(P);                                                                                     \
            bad_setup((P), (cfg), (r), "bad input");                                                             \
            X = (P)->a->c;                                                                                       \
        }                                                                                                        \
    } while (0)

static void test_bad_batch_input(void) {
    tl_rng r = tl_rng_for("bad_batch_input");
    oscar_config cfg = base_cfg();
    cfg.block_count = 200;
    pair P;
    bad_setup(&P, cfg, &r, "bad input");
    oscar_cache *X = P.a->c;
    if (!X || !P.b->c) return;
    const int R = cfg.residual, hq = cfg.num_q_heads, d = cfg.head_dim;
    const int64_t row = (int64_t)cfg.num_kv_heads * d;
    const int idx3[3] = {0, 1, 2};
    const int tps = 2;
    /* valid template: rewrite the last 2 (window) tokens of each sequence */
    float *k = malloc(sizeof(float) * (size_t)(4100 * row)), *v = malloc(sizeof(float) * (size_t)(4100 * row));
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 4100, cfg.num_kv_heads, d, OSCAR_DTYPE_F32);
    const int64_t nq = 4100LL * hq * d;
    float *q = malloc(sizeof(float) * (size_t)nq), *out = malloc(sizeof(float) * (size_t)nq);
    tl_fill_normal(&r, q, nq, 0.2);
    const size_t out3 = sizeof(float) * (size_t)(3 * tps * hq * d);
    tmpl t;

    /* every bad batch, in append and in attention (an append only needs the
     * table entries of the blocks it packs: bad entries below those are
     * tried on attention only; bad packed entries further down) */
    for (int kind = 0; kind < BAD_KINDS; kind++)
        for (int l = 0; l < 2; l++) {
            int append_too = kind != BAD_BLOCK_BIG && kind != BAD_BLOCK_NEG && kind != BAD_BLOCK_LAST;
            tmpl_make(&t, P.a, 3, idx3, tps, l, 0);
            tmpl_break(&t, kind, &cfg);
            oscar_status st;
            if (append_too) {
                st = oscar_batch_append(X, l, &t.b, k, v, OSCAR_DTYPE_F32, NULL);
                CHECKF(st == OSCAR_E_INVALID_ARGUMENT && oscar_last_error(X)[0],
                       "batch_append(%s), layer %d: %s, expected OSCAR_E_INVALID_ARGUMENT with a message",
                       bad_names[kind], l, oscar_status_name(st));
                TWINS_SAME(&P, cfg, &r, "batch_append(%s), layer %d: changed the cache", bad_names[kind], l);
            }
            tmpl_make(&t, P.a, 3, idx3, tps, l, 0);
            tmpl_break(&t, kind, &cfg);
            memset(out, 0x5a, out3);
            st = oscar_batch_attention(X, l, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL);
            CHECKF(st == OSCAR_E_INVALID_ARGUMENT && oscar_last_error(X)[0],
                   "batch_attention(%s), layer %d: %s, expected OSCAR_E_INVALID_ARGUMENT with a message",
                   bad_names[kind], l, oscar_status_name(st));
            CHECKF(filled_with(out, 0x5a, out3), "batch_attention(%s): wrote the output of a rejected call",
                   bad_names[kind]);
            TWINS_SAME(&P, cfg, &r, "batch_attention(%s), layer %d: changed the cache", bad_names[kind], l);
        }
    /* the other arguments */
    tmpl_make(&t, P.a, 3, idx3, tps, 0, 0);
    CHECK_ST(NULL, oscar_batch_append(NULL, 0, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, 0, NULL, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, 0, &t.b, NULL, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, 0, &t.b, k, NULL, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, -1, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, 2, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, 0, &t.b, k, v, (oscar_dtype)3, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_append(X, 0, &t.b, k, v, (oscar_dtype)-1, NULL), OSCAR_E_INVALID_ARGUMENT);
    TWINS_SAME(&P, cfg, &r, "bad batch_append arguments changed the cache");
    CHECK_ST(NULL, oscar_batch_attention(NULL, 0, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, NULL, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, NULL, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, q, OSCAR_DTYPE_F32, NULL, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, -1, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 2, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, q, (oscar_dtype)3, out, OSCAR_DTYPE_F32, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, q, OSCAR_DTYPE_F32, out, (oscar_dtype)3, 0.0f, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, NAN, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, INFINITY, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    TWINS_SAME(&P, cfg, &r, "bad batch_attention arguments changed the cache");
    /* NaN / Inf in K or V: rejected at once on the CPU, nothing appended */
    {
        tmpl_make(&t, P.a, 3, idx3, tps, 0, 0);
        const int64_t at = 2 * row + 5; /* token 2: sequence 1 of the batch */
        float keep = k[at];
        k[at] = NAN;
        CHECK_ST(X, oscar_batch_append(X, 0, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_NONFINITE);
        k[at] = keep;
        keep = v[5 * row + 1];
        v[5 * row + 1] = INFINITY;
        CHECK_ST(X, oscar_batch_append(X, 1, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_NONFINITE);
        v[5 * row + 1] = keep;
        TWINS_SAME(&P, cfg, &r, "a rejected non-finite batch_append changed the cache");
    }
    /* tokens_per_seq above OSCAR_MAX_Q_LEN, everything else valid (a
     * 4097-token sequence over in-range blocks the live sequences don't use) */
    {
        tmpl_make(&t, P.a, 1, idx3, 1, 0, 0);
        t.lens[0] = OSCAR_MAX_Q_LEN + 1;
        t.b.max_seq_len = OSCAR_MAX_Q_LEN + 1;
        t.b.block_table_stride = (OSCAR_MAX_Q_LEN + 1) / R;
        for (int j = 0; j < t.b.block_table_stride; j++) t.tables[j] = 60 + j;
        t.b.tokens_per_seq = OSCAR_MAX_Q_LEN + 1;
        CHECK_ST(X, oscar_batch_append(X, 0, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(X, oscar_batch_attention(X, 0, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
                 OSCAR_E_INVALID_ARGUMENT);
        TWINS_SAME(&P, cfg, &r, "tokens_per_seq 4097 changed the cache");
    }
    /* an append whose flush block is out of range: sequence 1 (75 tokens)
     * grows to 96, filling block 2 */
    {
        const int one = 1;
        for (int bad = 0; bad < 2; bad++) {
            tmpl_make(&t, P.a, 1, &one, 21, 0, 21);
            t.tables[2] = bad ? -1 : cfg.block_count;
            t.b.max_seq_len = 96;
            t.b.block_table_stride = 3;
            CHECK_ST(X, oscar_batch_append(X, 0, &t.b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
        }
        TWINS_SAME(&P, cfg, &r, "an append into a bad block changed the cache");
    }
    /* an append whose seq_len jumps past what its slot holds: slot 7 (the
     * last, unused: nothing packed, empty window) told it held 3R - 1 tokens
     * before this 1-token append, with valid blocks to pack into */
    {
        int32_t len = 3 * R, slot = cfg.max_seqs - 1, table[3] = {150, 151, 152};
        oscar_batch b = {.num_seqs = 1, .tokens_per_seq = 1, .max_seq_len = 3 * R, .block_table_stride = 3,
                         .seq_lens = &len, .window_slots = &slot, .block_tables = table};
        oscar_status st = oscar_batch_append(X, 0, &b, k, v, OSCAR_DTYPE_F32, NULL);
        CHECKF(st == OSCAR_E_INVALID_ARGUMENT && oscar_last_error(X)[0],
               "batch_append with seq_len %d into an empty slot (tokens_per_seq 1): %s, expected "
               "OSCAR_E_INVALID_ARGUMENT (the window would be read past its rows)", (int)len, oscar_status_name(st));
        len = 2 * R + 1;
        st = oscar_batch_append(X, 1, &b, k, v, OSCAR_DTYPE_F32, NULL);
        CHECKF(st == OSCAR_E_INVALID_ARGUMENT && oscar_last_error(X)[0],
               "batch_append with seq_len %d into an empty slot (tokens_per_seq 1): %s, expected "
               "OSCAR_E_INVALID_ARGUMENT", (int)len, oscar_status_name(st));
        TWINS_SAME(&P, cfg, &r, "an append past its slot's tokens changed the cache");
    }
    /* oscar_slot_copy */
    CHECK_ST(NULL, oscar_slot_copy(NULL, 0, 1, 5, NULL), OSCAR_E_INVALID_ARGUMENT);
    /* slot 4 holds sequence 1 (75 tokens): n_tokens 75 is right for it */
    CHECK_ST(X, oscar_slot_copy(X, -1, 1, 75, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_slot_copy(X, cfg.max_seqs, 1, 75, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_slot_copy(X, 4, -1, 75, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_slot_copy(X, 4, cfg.max_seqs, 75, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(X, oscar_slot_copy(X, 4, 0, -1, NULL), OSCAR_E_INVALID_ARGUMENT); /* would overwrite sequence 0 */
    TWINS_SAME(&P, cfg, &r, "bad slot_copy calls changed the cache");
    CHECK_ST(NULL, oscar_poll(NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_synchronize(NULL, NULL), OSCAR_E_INVALID_ARGUMENT);
    /* the CPU reports everything synchronously: nothing left for poll */
    CHECK_OK(oscar_poll(X));
    CHECK_OK(oscar_synchronize(X, NULL));

    /* valid boundaries: stride exactly max_seq_len / R (and 0 when every
     * sequence is shorter than R), max_seq_len exactly the longest, unused
     * table entries -1; then the template itself, to show that the bad calls
     * above were rejected for the one thing changed */
    {
        oscar_config c2 = cfg;
        c2.num_layers = 1;
        oscar_cache *Z = create_mode(c2, 1);
        if (Z) {
            int32_t len = 7, slot = 3;
            oscar_batch b = {.num_seqs = 1, .tokens_per_seq = 7, .max_seq_len = 7, .block_table_stride = 0,
                             .seq_lens = &len, .window_slots = &slot};
            int32_t table0[1] = {-1};
            b.block_tables = table0;
            CHECKF(oscar_batch_append(Z, 0, &b, k, v, OSCAR_DTYPE_F32, NULL) == OSCAR_OK,
                   "batch_append with block_table_stride 0 and seq_len < R: %s", oscar_last_error(Z));
            CHECKF(oscar_batch_attention(Z, 0, &b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL) == OSCAR_OK &&
                       tl_count_nonfinite(out, 7LL * hq * d) == 0,
                   "batch_attention with block_table_stride 0: %s", oscar_last_error(Z));
            oscar_cache_destroy(Z);
        }
    }
    for (int l = 0; l < 2; l++) {
        tmpl_make(&t, P.a, 3, idx3, tps, l, 0);
        CHECKF(t.b.block_table_stride == 75 / R, "test: template stride");
        CHECKF(oscar_batch_append(X, l, &t.b, k, v, OSCAR_DTYPE_F32, NULL) == OSCAR_OK,
               "the valid template append (layer %d) failed: %s", l, oscar_last_error(X));
    }
    CHECKF(!twins_same(&P), "rewriting window tokens of one twin did not change its attention: the twin "
                           "comparison cannot see changes");
    for (int l = 0; l < 2; l++) {
        tmpl_make(&t, P.b, 3, idx3, tps, l, 0);
        CHECKF(oscar_batch_append(P.b->c, l, &t.b, k, v, OSCAR_DTYPE_F32, NULL) == OSCAR_OK,
               "the valid template append on the twin (layer %d) failed: %s", l, oscar_last_error(P.b->c));
    }
    CHECKF(twins_same(&P), "the same valid append to both twins gave different caches");
    for (int l = 0; l < 2; l++) {
        tmpl_make(&t, P.a, 3, idx3, tps, l, 0);
        memset(out, 0xff, out3);
        CHECKF(oscar_batch_attention(X, l, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL) == OSCAR_OK &&
                   tl_count_nonfinite(out, (int64_t)3 * tps * hq * d) == 0,
               "the valid template attention (layer %d) failed: %s", l, oscar_last_error(X));
    }
    free(k);
    free(v);
    free(q);
    free(out);
    bad_teardown(&P);
}

/* Bad batches with sink_tokens = S = 5 (R 32): what the S offset changes.
 * Sequences 0, 1, 2 hold 40, 75, 20 tokens: 1, 2 and 0 blocks packed, so
 * their first 37, 69 and 0 tokens can never be removed. Every rejected call
 * leaves the cache as its twin; the boundaries right next to them pass. */
static void test_bad_batch_sinks(void) {
    tl_rng r = tl_rng_for("bad_batch_sinks");
    oscar_config cfg = sinks_cfg(base_cfg(), 5, 0);
    cfg.block_count = 200;
    const int S = 5, R = cfg.residual, hq = cfg.num_q_heads, d = cfg.head_dim;
    pair P;
    bad_setup(&P, cfg, &r, "bad input");
    oscar_cache *X = P.a->c;
    if (!X || !P.b->c) return;
    const int64_t row = (int64_t)cfg.num_kv_heads * d;
    float *k = malloc(sizeof(float) * (size_t)(100 * row)), *v = malloc(sizeof(float) * (size_t)(100 * row));
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 100, cfg.num_kv_heads, d, OSCAR_DTYPE_F32);
    float *q = malloc(sizeof(float) * (size_t)(100 * hq * d)), *out = malloc(sizeof(float) * (size_t)(100 * hq * d));
    tl_fill_normal(&r, q, 100LL * hq * d, 0.2);
    const int idx3[3] = {0, 1, 2}, zero = 0;
    const size_t out3 = sizeof(float) * (size_t)(3 * 2 * hq * d);
    tmpl t;
    oscar_status st;
    /* seq_len below the sink rows and blocks: 68 < S + 2R = 69 (a backend
     * that forgot the sinks would allow down to 2R = 64); append and
     * attention. 69 itself is allowed. */
    for (int l = 0; l < 2; l++) {
        tmpl_make(&t, P.a, 3, idx3, 2, l, 0);
        t.lens[1] = S + 2 * R - 1;
        memset(out, 0x5a, out3);
        st = oscar_batch_attention(X, l, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL);
        CHECKF(st == OSCAR_E_INVALID_ARGUMENT && strstr(oscar_last_error(X), "sink") != NULL,
               "batch_attention, seq_len %d below its sink rows and 2 blocks: %s (%s)", S + 2 * R - 1,
               oscar_status_name(st), oscar_last_error(X));
        CHECK(filled_with(out, 0x5a, out3));
        t.lens[1] = S + 2 * R - 1 + 2; /* an append of 2 after lowering to 68 */
        st = oscar_batch_append(X, l, &t.b, k, v, OSCAR_DTYPE_F32, NULL);
        CHECKF(st == OSCAR_E_INVALID_ARGUMENT, "batch_append after lowering seq_len to %d: %s", S + 2 * R - 1,
               oscar_status_name(st));
        TWINS_SAME(&P, cfg, &r, "seq_len below the sink rows and blocks (layer %d) changed the cache", l);
        tmpl_make(&t, P.a, 3, idx3, 2, l, 0);
        t.lens[1] = S + 2 * R;
        CHECKF(oscar_batch_attention(X, l, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL) == OSCAR_OK &&
                   tl_count_nonfinite(out, 3LL * 2 * hq * d) == 0,
               "batch_attention at seq_len S + 2R = %d (layer %d): %s", S + 2 * R, l, oscar_last_error(X));
    }
    /* a packed block's table entry missing (-1 or out of range): sequence 1
     * needs entries 0 and 1 */
    for (int bad = 0; bad < 4; bad++) {
        tmpl_make(&t, P.a, 3, idx3, 2, 0, 0);
        t.tables[(size_t)t.b.block_table_stride + (bad & 1)] = bad < 2 ? -1 : cfg.block_count;
        memset(out, 0x5a, out3);
        st = oscar_batch_attention(X, 0, &t.b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL);
        CHECKF(st == OSCAR_E_INVALID_ARGUMENT && oscar_last_error(X)[0],
               "batch_attention with block_tables[1][%d] bad: %s", bad & 1, oscar_status_name(st));
        CHECK(filled_with(out, 0x5a, out3));
    }
    /* an append that packs block 1 of sequence 0 (40 -> 70 tokens: 65 after
     * the sinks) into a missing or bad entry */
    for (int bad = 0; bad < 2; bad++) {
        tmpl_make(&t, P.a, 1, &zero, 30, 0, 30);
        CHECK(t.b.block_table_stride == 2 && t.tables[0] >= 0 && t.tables[1] == -1);
        if (bad) t.tables[1] = cfg.block_count;
        st = oscar_batch_append(X, 0, &t.b, k, v, OSCAR_DTYPE_F32, NULL);
        CHECKF(st == OSCAR_E_INVALID_ARGUMENT && strstr(oscar_last_error(X), "block_tables[0][1]") != NULL,
               "batch_append packing into block_tables[0][1] = %d: %s (%s)", (int)t.tables[1],
               oscar_status_name(st), oscar_last_error(X));
    }
    TWINS_SAME(&P, cfg, &r, "bad block table entries with sinks changed the cache");
    /* slot_copy below what can be removed, or past what the slot holds,
     * into sequence 2's slot (which would change if it were accepted) */
    {
        const int32_t s1 = P.a->slot[1], s0 = P.a->slot[0], s2 = P.a->slot[2];
        CHECK_ST(X, oscar_slot_copy(X, s1, s2, S + 2 * R - 1, NULL), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(X, oscar_slot_copy(X, s1, s2, 76, NULL), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(X, oscar_slot_copy(X, s0, s2, S + R - 1, NULL), OSCAR_E_INVALID_ARGUMENT);
        TWINS_SAME(&P, cfg, &r, "rejected slot_copy calls with sinks changed the cache");
        /* inside the sink rows of a slot with nothing packed: allowed */
        CHECKF(oscar_slot_copy(X, s2, 6, 3, NULL) == OSCAR_OK, "slot_copy of 3 tokens (< S, nothing packed): %s",
               oscar_last_error(X));
    }
    /* block_table_stride: (max_seq_len - S) / R is enough; one less is not.
     * A fresh cache: one sequence of 66 tokens packs (66 - 5) / 32 = 1 block. */
    {
        oscar_config c1 = cfg;
        c1.num_layers = 1;
        oscar_cache *Z = create_mode(c1, 1);
        if (Z) {
            int32_t len = 66, slot = 3, table[2] = {17, -1};
            oscar_batch b = {.num_seqs = 1, .tokens_per_seq = 66, .max_seq_len = 66, .block_table_stride = 0,
                             .seq_lens = &len, .window_slots = &slot, .block_tables = table};
            st = oscar_batch_append(Z, 0, &b, k, v, OSCAR_DTYPE_F32, NULL);
            CHECKF(st == OSCAR_E_INVALID_ARGUMENT && strstr(oscar_last_error(Z), "block_table_stride") != NULL,
                   "block_table_stride 0 for 66 tokens with S 5: %s (%s)", oscar_status_name(st), oscar_last_error(Z));
            b.block_table_stride = 1;
            CHECKF(oscar_batch_append(Z, 0, &b, k, v, OSCAR_DTYPE_F32, NULL) == OSCAR_OK,
                   "block_table_stride (66 - S) / R = 1: %s", oscar_last_error(Z));
            CHECKF(oscar_batch_attention(Z, 0, &b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL) == OSCAR_OK &&
                       tl_count_nonfinite(out, 66LL * hq * d) == 0,
                   "attention over 66 tokens, 1 block: %s", oscar_last_error(Z));
            /* the pool's capacity counts the sink rows too */
            b.max_seq_len = c1.block_count * R + R - 1 + S + 1;
            b.block_table_stride = c1.block_count + 1;
            CHECK_ST(Z, oscar_batch_attention(Z, 0, &b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
                     OSCAR_E_INVALID_ARGUMENT);
            oscar_cache_destroy(Z);
        }
    }
    free(k);
    free(v);
    free(q);
    free(out);
    bad_teardown(&P);
}

/* One API per caller_metadata setting; the other gives OSCAR_E_UNSUPPORTED
 * with a message and changes nothing. */
static void test_wrong_mode(void) {
    tl_rng r = tl_rng_for("wrong_mode");
    oscar_config cfg = base_cfg();
    char err[256];
    for (int bad = -1; bad <= 2; bad += 3) {
        oscar_config c = cfg;
        c.caller_metadata = bad;
        err[0] = 0;
        CHECKF(oscar_config_validate(&c, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && err[0],
               "caller_metadata %d accepted by config_validate", bad);
        oscar_cache *x = NULL;
        err[0] = 0;
        CHECKF(oscar_cache_create(&c, &x, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && !x && err[0],
               "caller_metadata %d accepted by cache_create", bad);
        oscar_cache_destroy(x);
        oscar_memory_requirements req;
        err[0] = 0;
        CHECKF(oscar_memory_requirements_get(&c, &req, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && err[0],
               "caller_metadata %d accepted by memory_requirements_get", bad);
    }
    const int R = cfg.residual, d = cfg.head_dim, hq = cfg.num_q_heads;
    const int64_t row = (int64_t)cfg.num_kv_heads * d;
    float *k = calloc((size_t)(4 * row), sizeof(float)), *v = calloc((size_t)(4 * row), sizeof(float));
    float *q = calloc((size_t)(4 * hq * d), sizeof(float)), *out = malloc(sizeof(float) * (size_t)(4 * hq * d));
    /* sequence-API caches refuse the batch API */
    {
        pair P;
        pair_init(&P, drv_new(create_mode(cfg, 0), &cfg, 0, 41), drv_new(create_mode(cfg, 0), &cfg, 0, 41),
                  "sequence twins", &r, TL_FLAVOR_SINKS, 0, 100);
        oscar_cache *S = P.a->c;
        if (S && P.b->c) {
            const int zero = 0;
            const int32_t n = R + 3;
            pair_add(&P, 0, 0);
            pair_step(&P, 1, &zero, &n, OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, 0.0f);
            int32_t len = R + 4, slot = 0, table[2] = {0, 1};
            oscar_batch b = {.num_seqs = 1, .tokens_per_seq = 1, .max_seq_len = R + 4, .block_table_stride = 2,
                             .seq_lens = &len, .window_slots = &slot, .block_tables = table};
            CHECK_ST(S, oscar_batch_append(S, 0, &b, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_UNSUPPORTED);
            CHECK_ST(S, oscar_batch_attention(S, 0, &b, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
                     OSCAR_E_UNSUPPORTED);
            CHECK_ST(S, oscar_slot_copy(S, 0, 1, R + 3, NULL), OSCAR_E_UNSUPPORTED);
            CHECK_OK(oscar_poll(S));
            CHECK_OK(oscar_synchronize(S, NULL));
            for (int l = 0; l < 2; l++)
                CHECKF(pair_compare(&P, l, 1, &zero, 1, OSCAR_DTYPE_F32, 0.0f),
                       "refused batch calls changed a sequence-API cache (layer %d)", l);
        }
        oscar_cache_destroy(P.a->c);
        oscar_cache_destroy(P.b->c);
        pair_done(&P);
    }
    /* batch-API caches refuse the sequence API */
    {
        pair P;
        pair_init(&P, drv_new(create_mode(cfg, 1), &cfg, 1, 42), drv_new(create_mode(cfg, 1), &cfg, 1, 42),
                  "batch twins", &r, TL_FLAVOR_SINKS, 0, 100);
        oscar_cache *Bc = P.a->c;
        if (Bc && P.b->c) {
            const int zero = 0;
            const int32_t n = R + 3;
            pair_add(&P, 0, 0);
            pair_step(&P, 1, &zero, &n, OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, 0.0f);
            int32_t id = -7, nt = 1, id0 = 0;
            CHECK_ST(Bc, oscar_seq_add(Bc, &id), OSCAR_E_UNSUPPORTED);
            CHECK(id == -7);
            CHECK_ST(Bc, oscar_append(Bc, 0, 1, &id0, &nt, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_UNSUPPORTED);
            CHECK_ST(Bc, oscar_attention(Bc, 0, 1, &id0, 1, q, OSCAR_DTYPE_F32, out, OSCAR_DTYPE_F32, 0.0f, NULL),
                     OSCAR_E_UNSUPPORTED);
            CHECK_ST(Bc, oscar_seq_fork(Bc, id0, &id), OSCAR_E_UNSUPPORTED);
            CHECK_ST(Bc, oscar_seq_free(Bc, id0), OSCAR_E_UNSUPPORTED);
            CHECK_ST(Bc, oscar_seq_truncate(Bc, id0, 0), OSCAR_E_UNSUPPORTED);
            CHECK_ST(Bc, oscar_seq_read(Bc, id0, 0, 0, 1, k, v), OSCAR_E_UNSUPPORTED);
            size_t sz = 0;
            CHECK_ST(Bc, oscar_seq_export(Bc, id0, NULL, 0, &sz), OSCAR_E_UNSUPPORTED);
            unsigned char junk[64] = {0};
            CHECK_ST(Bc, oscar_seq_import(Bc, junk, sizeof junk, &id), OSCAR_E_UNSUPPORTED);
            oscar_seq_info info;
            int32_t tab[4], cnt;
            CHECK(oscar_seq_info_get(Bc, id0, 0, &info) != OSCAR_OK);
            CHECK(oscar_seq_block_table(Bc, id0, tab, 4, &cnt) != OSCAR_OK);
            oscar_memory_stats ms;
            CHECK_OK(oscar_memory(Bc, &ms));
            CHECK_OK(oscar_poll(Bc));
            CHECK_OK(oscar_synchronize(Bc, NULL));
            for (int l = 0; l < 2; l++)
                CHECKF(pair_compare(&P, l, 1, &zero, 1, OSCAR_DTYPE_F32, 0.0f),
                       "refused sequence calls changed a batch-API cache (layer %d)", l);
        }
        oscar_cache_destroy(P.a->c);
        oscar_cache_destroy(P.b->c);
        pair_done(&P);
    }
    free(k);
    free(v);
    free(q);
    free(out);
}

/* ---- 4. memory ---------------------------------------------------------------- */

/* A caller region of n bytes at 256-byte alignment, garbage inside and a
 * 64-byte canary after it. */
static unsigned char *region_new(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 256, n + 64) != 0) return NULL;
    memset(p, 0xab, n);
    memset((unsigned char *)p + n, 0x5c, 64);
    return (unsigned char *)p;
}

static int region_canary_ok(const unsigned char *p, size_t n) { return filled_with(p + n, 0x5c, 64); }

static size_t count_nonzero(const unsigned char *p, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += p[i] != 0;
    return c;
}

/* Counting allocator. */
typedef struct hook {
    int allocs, frees, fail_at, live, bad_free, bad_align;
    size_t bytes_alloc, bytes_free, max_request;
    void *ptr[64];
    size_t size[64];
} hook;

static void *hook_alloc(void *user, size_t bytes, size_t alignment) {
    hook *h = (hook *)user;
    int call = h->allocs++;
    if (call == h->fail_at || h->fail_at == -2) return NULL;
    if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
        h->bad_align++;
        return NULL;
    }
    if (alignment < sizeof(void *)) alignment = sizeof(void *);
    void *p = NULL;
    if (posix_memalign(&p, alignment, bytes ? bytes : 1) != 0) return NULL;
    memset(p, 0xcd, bytes); /* garbage: the library zeroes what it uses */
    for (int i = 0; i < 64; i++)
        if (!h->ptr[i]) {
            h->ptr[i] = p;
            h->size[i] = bytes;
            break;
        }
    h->live++;
    h->bytes_alloc += bytes;
    if (bytes > h->max_request) h->max_request = bytes;
    return p;
}

static void hook_free(void *user, void *p, size_t bytes) {
    hook *h = (hook *)user;
    h->frees++;
    if (!p) return;
    for (int i = 0; i < 64; i++)
        if (h->ptr[i] == p) {
            if (h->size[i] != bytes) h->bad_free++;
            h->bytes_free += bytes;
            h->ptr[i] = NULL;
            h->live--;
            free(p);
            return;
        }
    h->bad_free++; /* not ours: leaked rather than freed wrongly */
}

static oscar_allocator hook_allocator(hook *h, int fail_at) {
    memset(h, 0, sizeof *h);
    h->fail_at = fail_at;
    oscar_allocator a = {hook_alloc, hook_free, h};
    return a;
}

/* Two caches of one mode fed the same work: prefill, batched decode, a fork. */
static void twin_workload(oscar_cache *x, oscar_cache *y, const oscar_config *cfg, int batch, tl_rng *r,
                          const char *what, hook *h) {
    pair P;
    pair_init(&P, drv_new(x, cfg, batch, 51), drv_new(y, cfg, batch, 52), what, r, TL_FLAVOR_SINKS, 0, 200);
    const int R = cfg->residual;
    int a0 = h ? h->allocs : 0, f0 = h ? h->frees : 0;
    const int32_t slots[3] = {1, 3, 0}, lens[3] = {37, 2 * R, 5};
    for (int i = 0; i < 3; i++) {
        pair_add(&P, i, slots[i]);
        pair_step(&P, 1, &i, &lens[i], OSCAR_DTYPE_BF16, OSCAR_DTYPE_F32, 0.0f);
    }
    for (int s = 0; s < 12; s++) {
        int n = s < 4 ? 3 : 4;
        if (s == 4) pair_fork(&P, 1, 3, 2);
        int perm[4] = {0, 1, 2, 3};
        shuffle(r, perm, n);
        int32_t nt[4] = {2, 2, 2, 2};
        pair_step(&P, n, perm, nt, OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, 0.0f);
    }
    if (h) {
        CHECKF(oscar_poll(x) == OSCAR_OK && oscar_synchronize(x, NULL) == OSCAR_OK, "%s: poll", what);
        CHECKF(h->allocs == a0 && h->frees == f0,
               "%s: the allocation hook was called on the hot path (%d allocs, %d frees during append/attention/"
               "fork)", what, h->allocs - a0, h->frees - f0);
    }
    pair_done(&P);
}

/* Every block of the pool and every window slot (windows up to R - 1
 * tokens), so that a region smaller than what the cache touches is found
 * (ASan, canaries). Needs block_count == 3 * max_seqs. */
static void fill_workload(oscar_cache *x, oscar_cache *y, const oscar_config *cfg, int batch, tl_rng *r,
                          const char *what) {
    pair P;
    pair_init(&P, drv_new(x, cfg, batch, 53), drv_new(y, cfg, batch, 54), what, r, TL_FLAVOR_OUTLIERS, 0, 120);
    const int R = cfg->residual, S = cfg->max_seqs;
    int idx[MAXS];
    int32_t nt[MAXS];
    for (int i = 0; i < S; i++) {
        idx[i] = S - 1 - i;
        nt[i] = 3 * R - 1;
        pair_add(&P, i, (int32_t)i);
    }
    pair_step(&P, S, idx, nt, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
    for (int i = 0; i < S; i++) nt[i] = 1;
    pair_step(&P, S, idx, nt, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
    if (batch) CHECKF(P.a->bm.top == 0, "%s: the pool is not full (%d blocks free)", what, P.a->bm.top);
    pair_step(&P, S, idx, nt, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f);
    pair_done(&P);
}

static void test_memory(void) {
    tl_rng r = tl_rng_for("memory");
    oscar_config cfg = base_cfg();
    cfg.block_count = 48;
    cfg.max_seqs = 5;
    tl_geom g = tl_geom_of(&cfg);
    char err[256];
    oscar_memory_requirements req;
    memset(&req, 0, sizeof req);
    CHECK_OK(oscar_memory_requirements_get(&cfg, &req, err, sizeof err));
    const size_t pool_min = (size_t)cfg.block_count * cfg.num_layers * g.LB;
    const size_t win_min = (size_t)cfg.max_seqs * cfg.num_layers * 2 * cfg.residual * g.hkv * g.d * g.w;
    printf("   requirements: pool %zu (layout %zu), windows %zu (layout %zu), workspace %zu, alignment %zu\n",
           req.pool_bytes, pool_min, req.window_bytes, win_min, req.workspace_bytes, req.alignment);
    CHECK(req.alignment == 256);
    CHECKF(req.pool_bytes >= pool_min && req.pool_bytes <= pool_min + 4096, "pool_bytes %zu, blocks need %zu",
           req.pool_bytes, pool_min);
    CHECKF(req.window_bytes >= win_min && req.window_bytes <= win_min + 4096, "window_bytes %zu, windows need %zu",
           req.window_bytes, win_min);
    {
        oscar_config c2 = cfg;
        c2.block_count *= 2;
        c2.caller_metadata = 1;
        oscar_memory_requirements r2;
        CHECK_OK(oscar_memory_requirements_get(&c2, &r2, NULL, 0));
        CHECKF(r2.pool_bytes >= 2 * pool_min && r2.window_bytes == req.window_bytes,
               "doubling block_count: pool %zu -> %zu, windows %zu -> %zu", req.pool_bytes, r2.pool_bytes,
               req.window_bytes, r2.window_bytes);
    }
    /* bad arguments */
    err[0] = 0;
    CHECKF(oscar_memory_requirements_get(NULL, &req, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && err[0],
           "requirements_get(NULL config)");
    err[0] = 0;
    CHECKF(oscar_memory_requirements_get(&cfg, NULL, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && err[0],
           "requirements_get(NULL out)");
    {
        oscar_config bad = cfg;
        bad.head_dim = 96;
        err[0] = 0;
        CHECKF(oscar_memory_requirements_get(&bad, &req, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && err[0],
               "requirements_get(head_dim 96)");
        CHECK(oscar_memory_requirements_get(&bad, &req, NULL, 0) == OSCAR_E_INVALID_ARGUMENT);
    }
    CHECK_OK(oscar_memory_requirements_get(&cfg, &req, err, sizeof err));

    /* exactly sized caller regions, both modes, every block and slot used:
     * same attention as a cache that allocated its own memory; the regions
     * are zeroed at creation and then used; nothing is written past them */
    for (int mode = 0; mode < 2; mode++) {
        oscar_config c = cfg;
        c.caller_metadata = mode;
        c.max_seqs = 4;
        c.block_count = 12;
        oscar_memory_requirements rq;
        CHECK_OK(oscar_memory_requirements_get(&c, &rq, NULL, 0));
        unsigned char *pool = region_new(rq.pool_bytes), *win = region_new(rq.window_bytes);
        unsigned char *ws = rq.workspace_bytes ? region_new(rq.workspace_bytes) : NULL;
        oscar_memory_source src = {pool, win, ws, NULL};
        oscar_cache *x = NULL;
        err[0] = 0;
        oscar_status st = oscar_cache_create_with_memory(&c, &src, &x, err, sizeof err);
        CHECKF(st == OSCAR_OK && x, "create_with_memory(exact regions, %s API): %s (%s)", mode ? "batch" : "sequence",
               oscar_status_name(st), err);
        oscar_cache *y = tl_create(&c);
        if (x && y) {
            CHECKF(count_nonzero(pool, rq.pool_bytes) == 0 && count_nonzero(win, rq.window_bytes) == 0 &&
                       (!ws || count_nonzero(ws, rq.workspace_bytes) == 0),
                   "create_with_memory did not zero the caller's regions");
            fill_workload(x, y, &c, mode, &r, mode ? "caller regions, batch API" : "caller regions, sequence API");
            CHECKF(count_nonzero(pool, rq.pool_bytes) > rq.pool_bytes / 2,
                   "the caller's pool region was not used (%zu bytes written)", count_nonzero(pool, rq.pool_bytes));
            CHECKF(count_nonzero(win, rq.window_bytes) > 0, "the caller's window region was not used");
        }
        oscar_cache_destroy(x);
        oscar_cache_destroy(y);
        CHECKF(region_canary_ok(pool, rq.pool_bytes) && region_canary_ok(win, rq.window_bytes) &&
                   (!ws || region_canary_ok(ws, rq.workspace_bytes)),
               "the library wrote past the end of a caller region");
        free(pool);
        free(win);
        free(ws);
    }

    /* everything through the hook; never on the hot path; every byte back */
    for (int mode = 0; mode < 2; mode++) {
        oscar_config c = cfg;
        c.caller_metadata = mode;
        oscar_memory_requirements rq;
        CHECK_OK(oscar_memory_requirements_get(&c, &rq, NULL, 0));
        hook h;
        oscar_allocator al = hook_allocator(&h, -1);
        oscar_memory_source src = {NULL, NULL, NULL, &al};
        oscar_cache *x = NULL;
        err[0] = 0;
        oscar_status st = oscar_cache_create_with_memory(&c, &src, &x, err, sizeof err);
        CHECKF(st == OSCAR_OK && x, "create_with_memory(hook): %s (%s)", oscar_status_name(st), err);
        CHECKF(h.allocs >= 1 && h.bytes_alloc >= rq.pool_bytes + rq.window_bytes + rq.workspace_bytes,
               "hook: %d allocations, %zu bytes, fewer than the %zu required", h.allocs, h.bytes_alloc,
               rq.pool_bytes + rq.window_bytes + rq.workspace_bytes);
        CHECK(h.bad_align == 0);
        oscar_cache *y = tl_create(&c);
        if (x && y) twin_workload(x, y, &c, mode, &r, mode ? "hook, batch API" : "hook, sequence API", &h);
        int a = h.allocs;
        oscar_cache_destroy(x);
        oscar_cache_destroy(y);
        CHECK(h.allocs == a);
        CHECKF(h.live == 0 && h.bad_free == 0 && h.bytes_free == h.bytes_alloc,
               "hook after destroy: %d live, %d bad frees, %zu of %zu bytes freed", h.live, h.bad_free, h.bytes_free,
               h.bytes_alloc);
    }
    /* caller pool, the rest through the hook */
    {
        hook h;
        oscar_allocator al = hook_allocator(&h, -1);
        unsigned char *pool = region_new(req.pool_bytes);
        oscar_memory_source src = {pool, NULL, NULL, &al};
        oscar_cache *x = NULL;
        CHECK_OK(oscar_cache_create_with_memory(&cfg, &src, &x, err, sizeof err));
        CHECKF(h.bytes_alloc >= req.window_bytes + req.workspace_bytes &&
                   h.bytes_alloc < req.pool_bytes + req.window_bytes + req.workspace_bytes,
               "caller pool + hook: the hook allocated %zu bytes (windows %zu, pool %zu)", h.bytes_alloc,
               req.window_bytes, req.pool_bytes);
        oscar_cache *y = tl_create(&cfg);
        if (x && y) twin_workload(x, y, &cfg, 0, &r, "caller pool + hook", &h);
        oscar_cache_destroy(x);
        oscar_cache_destroy(y);
        CHECKF(h.live == 0 && h.bad_free == 0 && h.bytes_free == h.bytes_alloc, "caller pool + hook: %d live",
               h.live);
        CHECK(region_canary_ok(pool, req.pool_bytes));
        free(pool);
    }
    /* mem == NULL: like oscar_cache_create */
    {
        oscar_cache *x = NULL;
        CHECK_OK(oscar_cache_create_with_memory(&cfg, NULL, &x, err, sizeof err));
        oscar_cache *y = tl_create(&cfg);
        if (x && y) twin_workload(x, y, &cfg, 0, &r, "mem NULL", NULL);
        oscar_cache_destroy(x);
        oscar_cache_destroy(y);
    }
    /* a hook that fails at its first, second, ... call: OSCAR_E_OUT_OF_MEMORY,
     * a message, no handle, everything it gave back (LeakSanitizer checks
     * the library's own allocations) */
    {
        int failures = 0, succeeded = 0;
        for (int fail_at = 0; fail_at < 12 && !succeeded; fail_at++) {
            hook h;
            oscar_allocator al = hook_allocator(&h, fail_at);
            oscar_memory_source src = {NULL, NULL, NULL, &al};
            oscar_cache *x = (oscar_cache *)(uintptr_t)1;
            err[0] = 0;
            oscar_status st = oscar_cache_create_with_memory(&cfg, &src, &x, err, sizeof err);
            if (st == OSCAR_OK) {
                succeeded = 1;
                CHECKF(h.allocs <= fail_at, "create succeeded although allocation %d failed", fail_at);
                oscar_cache_destroy(x);
            } else {
                failures++;
                CHECKF(st == OSCAR_E_OUT_OF_MEMORY && x == NULL && err[0],
                       "hook failing at call %d: %s, out %p, message \"%s\"", fail_at, oscar_status_name(st),
                       (void *)x, err);
            }
            CHECKF(h.live == 0 && h.bad_free == 0, "hook failing at call %d: %d allocations not freed", fail_at,
                   h.live);
        }
        CHECK(failures >= 1 && succeeded);
        hook h;
        oscar_allocator al = hook_allocator(&h, -2); /* always fails */
        unsigned char *pool = region_new(req.pool_bytes);
        oscar_memory_source src = {pool, NULL, NULL, &al};
        oscar_cache *x = NULL;
        err[0] = 0;
        CHECKF(oscar_cache_create_with_memory(&cfg, &src, &x, err, sizeof err) == OSCAR_E_OUT_OF_MEMORY && !x &&
                   err[0],
               "a hook that always fails (caller pool) was not reported as OSCAR_E_OUT_OF_MEMORY");
        free(pool);
    }
    /* misaligned regions, bad arguments */
    {
        unsigned char *pool = region_new(req.pool_bytes + 256), *win = region_new(req.window_bytes + 256);
        unsigned char *ws = region_new(req.workspace_bytes + 256);
        const size_t offs[2] = {64, 1};
        for (int o = 0; o < 2; o++) {
            oscar_memory_source srcs[3] = {{pool + offs[o], win, ws, NULL},
                                           {pool, win + offs[o], ws, NULL},
                                           {pool, win, ws + offs[o], NULL}};
            for (int i = 0; i < 3; i++) {
                if (i == 2 && req.workspace_bytes == 0) continue; /* nothing of it is used */
                oscar_cache *x = (oscar_cache *)(uintptr_t)1;
                err[0] = 0;
                oscar_status st = oscar_cache_create_with_memory(&cfg, &srcs[i], &x, err, sizeof err);
                CHECKF(st == OSCAR_E_INVALID_ARGUMENT && x == NULL && err[0],
                       "create_with_memory with the %s region %zu bytes off alignment: %s, message \"%s\"",
                       i == 0 ? "pool" : i == 1 ? "window" : "workspace", offs[o], oscar_status_name(st), err);
                if (st == OSCAR_OK) oscar_cache_destroy(x);
            }
        }
        /* misaligned pool, the rest through the hook: the hook's memory
         * comes back */
        hook h;
        oscar_allocator al = hook_allocator(&h, -1);
        oscar_memory_source src = {pool + 64, NULL, NULL, &al};
        oscar_cache *x = NULL;
        CHECK_ST(NULL, oscar_cache_create_with_memory(&cfg, &src, &x, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
        CHECK(x == NULL && h.live == 0);
        oscar_memory_source ok = {pool, win, ws, NULL};
        CHECK_ST(NULL, oscar_cache_create_with_memory(NULL, &ok, &x, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(NULL, oscar_cache_create_with_memory(&cfg, &ok, NULL, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
        oscar_config bad = cfg;
        bad.residual = 24;
        err[0] = 0;
        CHECKF(oscar_cache_create_with_memory(&bad, &ok, &x, err, sizeof err) == OSCAR_E_INVALID_ARGUMENT && !x &&
                   err[0],
               "create_with_memory(residual 24)");
        /* an allocator without functions: refused, or treated as none */
        oscar_allocator none = {NULL, NULL, NULL};
        oscar_memory_source src2 = {pool, NULL, NULL, &none};
        oscar_status st = oscar_cache_create_with_memory(&cfg, &src2, &x, err, sizeof err);
        CHECKF(st == OSCAR_OK || st == OSCAR_E_INVALID_ARGUMENT, "allocator without functions: %s",
               oscar_status_name(st));
        if (st == OSCAR_OK) oscar_cache_destroy(x);
        free(pool);
        free(win);
        free(ws);
    }
}

/* ---- 5. const functions, poll, OSCAR_MAX_Q_LEN ----------------------------------- */

/* The const calls that fail; the handle's message must stay `want`. */
static void const_failures_keep(const oscar_cache *c, int32_t live_id, const char *want, const char *when) {
    oscar_seq_info info;
    int32_t table[8], count;
    const int32_t unknown = 424242;
    struct {
        const char *what;
        oscar_status st, expect;
    } calls[] = {
        {"seq_info_get(unknown id)", oscar_seq_info_get(c, unknown, 0, &info), OSCAR_E_NOT_FOUND},
        {"seq_info_get(out NULL)", oscar_seq_info_get(c, live_id, 0, NULL), OSCAR_E_INVALID_ARGUMENT},
        {"seq_info_get(layer 99)", oscar_seq_info_get(c, live_id, 99, &info), OSCAR_E_INVALID_ARGUMENT},
        {"seq_info_get(layer -1)", oscar_seq_info_get(c, live_id, -1, &info), OSCAR_E_INVALID_ARGUMENT},
        {"seq_block_table(unknown id)", oscar_seq_block_table(c, unknown, table, 8, &count), OSCAR_E_NOT_FOUND},
        {"seq_block_table(count NULL)", oscar_seq_block_table(c, live_id, table, 8, NULL), OSCAR_E_INVALID_ARGUMENT},
        {"seq_block_table(capacity -1)", oscar_seq_block_table(c, live_id, table, -1, &count),
         OSCAR_E_INVALID_ARGUMENT},
        {"seq_block_table(table NULL)", oscar_seq_block_table(c, live_id, NULL, 8, &count), OSCAR_E_INVALID_ARGUMENT},
        {"cache_config(out NULL)", oscar_cache_config(c, NULL), OSCAR_E_INVALID_ARGUMENT},
        {"memory(out NULL)", oscar_memory(c, NULL), OSCAR_E_INVALID_ARGUMENT},
    };
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        CHECKF(calls[i].st == calls[i].expect, "%s: %s returned %s, expected %s", when, calls[i].what,
               oscar_status_name(calls[i].st), oscar_status_name(calls[i].expect));
    }
    const char *now = oscar_last_error(c);
    CHECKF(now && strcmp(now, want) == 0, "%s: failing const calls changed the handle's message from \"%s\" to \"%s\"",
           when, want, now ? now : "(null)");
    /* and a failing const call right after each other, one at a time */
    for (int i = 0; i < 4; i++) {
        oscar_status st = i == 0   ? oscar_seq_info_get(c, unknown, 0, &info)
                          : i == 1 ? oscar_seq_block_table(c, unknown, table, 8, &count)
                          : i == 2 ? oscar_cache_config(c, NULL)
                                   : oscar_memory(c, NULL);
        CHECK(st != OSCAR_OK);
        CHECKF(strcmp(oscar_last_error(c), want) == 0, "%s: const call %d wrote the message \"%s\"", when, i,
               oscar_last_error(c));
    }
}

static void test_const_calls_read_only(void) {
    tl_rng r = tl_rng_for("const_calls_read_only");
    oscar_config cfg = base_cfg();
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    const int64_t row = (int64_t)cfg.num_kv_heads * cfg.head_dim;
    float *k = malloc(sizeof(float) * (size_t)(50 * row)), *v = malloc(sizeof(float) * (size_t)(50 * row));
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 50, cfg.num_kv_heads, cfg.head_dim, OSCAR_DTYPE_F32);
    int32_t id;
    CHECK_OK(oscar_seq_add(c, &id));
    for (int l = 0; l < 2; l++)
        CHECK_OK(tl_append(c, l, id, k, v, 50, cfg.num_kv_heads, cfg.head_dim, OSCAR_DTYPE_F32));
    CHECKF(strcmp(oscar_last_error(c), "") == 0, "fresh handle: message \"%s\"", oscar_last_error(c));
    const_failures_keep(c, id, "", "no earlier failure");
    /* a failing non-const call sets the message; const failures keep it */
    int32_t n = 1;
    CHECK_ST(c, oscar_append(c, 99, 1, &id, &n, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    char saved[512];
    snprintf(saved, sizeof saved, "%s", oscar_last_error(c));
    CHECK(saved[0] != 0);
    const_failures_keep(c, id, saved, "after a failed append");
    /* successful const calls keep it too */
    {
        oscar_seq_info info;
        oscar_memory_stats ms;
        oscar_config got;
        int32_t table[4], count;
        CHECK_OK(oscar_seq_info_get(c, id, 1, &info));
        CHECK(info.tokens == 50 && info.window_tokens == 50 % cfg.residual);
        CHECK_OK(oscar_seq_block_table(c, id, table, 4, &count));
        CHECK(count == 50 / cfg.residual);
        CHECK_OK(oscar_memory(c, &ms));
        CHECK_OK(oscar_cache_config(c, &got));
        CHECK(got.caller_metadata == 0 && got.residual == cfg.residual && got.num_layers == cfg.num_layers);
        CHECKF(strcmp(oscar_last_error(c), saved) == 0, "successful const calls changed the message");
    }
    /* a second, different failure replaces it; const calls keep the new one */
    CHECK_ST(c, oscar_seq_free(c, 31337), OSCAR_E_NOT_FOUND);
    snprintf(saved, sizeof saved, "%s", oscar_last_error(c));
    const_failures_keep(c, id, saved, "after a failed seq_free");
    /* poll and synchronize on the CPU: OK, after failures too */
    CHECK_OK(oscar_poll(c));
    CHECK_OK(oscar_synchronize(c, NULL));
    oscar_cache_destroy(c);
    /* a batch-API handle */
    oscar_config cb = cfg;
    cb.caller_metadata = 1;
    c = tl_create(&cb);
    if (c) {
        CHECK_ST(c, oscar_slot_copy(c, -3, 0, 1, NULL), OSCAR_E_INVALID_ARGUMENT);
        snprintf(saved, sizeof saved, "%s", oscar_last_error(c));
        oscar_seq_info info;
        oscar_config got;
        CHECK(oscar_seq_info_get(c, 0, 0, &info) != OSCAR_OK);
        CHECK(oscar_seq_info_get(c, 0, 0, NULL) != OSCAR_OK);
        CHECK(oscar_cache_config(c, NULL) == OSCAR_E_INVALID_ARGUMENT);
        CHECK(oscar_memory(c, NULL) == OSCAR_E_INVALID_ARGUMENT);
        CHECKF(strcmp(oscar_last_error(c), saved) == 0, "batch handle: const calls changed the message to \"%s\"",
               oscar_last_error(c));
        CHECK_OK(oscar_cache_config(c, &got));
        CHECK(got.caller_metadata == 1);
        oscar_cache_destroy(c);
    }
    /* NULL handles */
    {
        oscar_config got;
        oscar_memory_stats ms;
        oscar_seq_info info;
        int32_t count;
        CHECK(oscar_cache_config(NULL, &got) == OSCAR_E_INVALID_ARGUMENT);
        CHECK(oscar_memory(NULL, &ms) == OSCAR_E_INVALID_ARGUMENT);
        CHECK(oscar_seq_info_get(NULL, 0, 0, &info) == OSCAR_E_INVALID_ARGUMENT);
        CHECK(oscar_seq_block_table(NULL, 0, NULL, 0, &count) == OSCAR_E_INVALID_ARGUMENT);
        CHECK(oscar_last_error(NULL) != NULL);
    }
    free(k);
    free(v);
}

/* OSCAR_MAX_Q_LEN queries in one call, through both APIs (two 4096-query
 * calls: the expensive part of this file, about 4 s each under ASan). */
static void test_max_q_len(void) {
    tl_rng r = tl_rng_for("max_q_len");
    const int d = 64, hkv = 1, hq = 1, R = 32, Q = OSCAR_MAX_Q_LEN;
    CHECK(OSCAR_MAX_Q_LEN == 4096);
    oscar_config cfg = engine_cfg(OSCAR_METHOD_OSCAR, 2, d, hkv, hq, R, 16, 16, OSCAR_DTYPE_F16, 1);
    cfg.block_count = Q / R + 4;
    oscar_cache *A = create_mode(cfg, 0), *B = create_mode(cfg, 1);
    const int64_t nq = (int64_t)(Q + 1) * hq * d;
    float *q = malloc(sizeof(float) * (size_t)nq), *oa = malloc(sizeof(float) * (size_t)nq);
    float *ob = malloc(sizeof(float) * (size_t)nq);
    if (A && B) {
        pair P;
        pair_init(&P, drv_new(A, &cfg, 0, 61), drv_new(B, &cfg, 1, 62), "q_len 4096", &r, TL_FLAVOR_SINKS, 0,
                  Q + 8);
        const int zero = 0;
        const int32_t n = Q;
        pair_add(&P, 0, 3);
        pair_append(&P, 0, 1, &zero, &n, OSCAR_DTYPE_F16); /* the batch side: tokens_per_seq 4096 */
        tl_gen_q(&r, q, Q + 1, hq, d, P.key_norm, 2.0, OSCAR_DTYPE_F32);
        oscar_status sa = drv_attention(P.a, 0, 1, &zero, Q, q, OSCAR_DTYPE_F32, oa, 0.0f);
        oscar_status sb = drv_attention(P.b, 0, 1, &zero, Q, q, OSCAR_DTYPE_F32, ob, 0.0f);
        const int64_t no = (int64_t)Q * hq * d;
        CHECKF(sa == OSCAR_OK, "attention with q_len %d: %s (%s)", Q, oscar_status_name(sa), oscar_last_error(A));
        CHECKF(sb == OSCAR_OK, "batch_attention with tokens_per_seq %d: %s (%s)", Q, oscar_status_name(sb),
               oscar_last_error(B));
        CHECK(tl_count_nonfinite(oa, no) == 0 && tl_count_nonfinite(ob, no) == 0);
        CHECKF(memcmp(oa, ob, sizeof(float) * (size_t)no) == 0,
               "q_len %d: the batch API's attention differs from the sequence API's", Q);
        /* sampled query rows against float64 attention over the read-back
         * (dequantised) cache: query i sees tokens [0, i] */
        float *kr = NULL, *vr = NULL;
        int64_t T = tl_read_all(A, P.a->ids[0], 0, hkv, d, &kr, &vr);
        CHECK(T == Q);
        if (T == Q) {
            const int rows[6] = {0, 1, 31, 777, Q - 2, Q - 1};
            for (int i = 0; i < 6; i++) {
                double ref[64], mag[1];
                int qi = rows[i];
                tl_ref_attention_f(d, hkv, hq, kr, vr, qi + 1, 1, q + (int64_t)qi * hq * d, 1.0 / sqrt((double)d),
                                   ref, mag);
                double w = 0;
                CHECKF(tl_compare_out(oa + (int64_t)qi * hq * d, ref, mag, hq, d, OSCAR_DTYPE_F32, 1e-5, &w) == 0,
                       "q_len %d, query %d vs float64 over the read-back cache: worst %.3g", Q, qi, w);
            }
        }
        free(kr);
        free(vr);
        /* 4097 queries: refused by both APIs, output untouched, even when the
         * sequence holds that many tokens */
        const int32_t one = 1;
        pair_append(&P, 0, 1, &zero, &one, OSCAR_DTYPE_F16);
        memset(oa, 0x5a, sizeof(float) * 64);
        CHECK_ST(A, oscar_attention(A, 0, 1, &P.a->ids[0], Q + 1, q, OSCAR_DTYPE_F32, oa, OSCAR_DTYPE_F32, 0.0f, NULL),
                 OSCAR_E_INVALID_ARGUMENT);
        CHECK(filled_with(oa, 0x5a, sizeof(float) * 64));
        tmpl t;
        tmpl_make(&t, P.b, 1, &zero, Q + 1, 0, 0);
        CHECK(t.lens[0] == Q + 1 && t.b.block_table_stride == (Q + 1) / R);
        memset(ob, 0x5a, sizeof(float) * 64);
        CHECK_ST(B, oscar_batch_attention(B, 0, &t.b, q, OSCAR_DTYPE_F32, ob, OSCAR_DTYPE_F32, 0.0f, NULL),
                 OSCAR_E_INVALID_ARGUMENT);
        CHECK(filled_with(ob, 0x5a, sizeof(float) * 64));
        float *kv = calloc((size_t)(Q + 1) * hkv * d, sizeof(float));
        CHECK_ST(B, oscar_batch_append(B, 0, &t.b, kv, kv, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
        free(kv);
        /* q_len larger than what a sequence holds */
        int32_t small;
        CHECK_OK(oscar_seq_add(A, &small));
        CHECK_OK(tl_append(A, 0, small, q, q, 3, hkv, d, OSCAR_DTYPE_F32));
        const int32_t both[2] = {P.a->ids[0], small};
        CHECK_ST(A, oscar_attention(A, 0, 2, both, 4, q, OSCAR_DTYPE_F32, oa, OSCAR_DTYPE_F32, 0.0f, NULL),
                 OSCAR_E_INVALID_ARGUMENT);
        /* the caches still agree afterwards */
        pair_attend(&P, 0, 1, &zero, 2, OSCAR_DTYPE_F32, 0.0f);
        pair_done(&P);
    }
    oscar_cache_destroy(A);
    oscar_cache_destroy(B);
    free(q);
    free(oa);
    free(ob);
}

int main(void) {
    printf("oscar %s, test_engine\n", oscar_version());
    TL_RUN(test_batch_equals_sequence_api);
    TL_RUN(test_batch_sinks);
    TL_RUN(test_slot_copy_fork);
    TL_RUN(test_bad_batch_input);
    TL_RUN(test_bad_batch_sinks);
    TL_RUN(test_wrong_mode);
    TL_RUN(test_memory);
    TL_RUN(test_const_calls_read_only);
    TL_RUN(test_max_q_len);
    return tl_finish();
}
