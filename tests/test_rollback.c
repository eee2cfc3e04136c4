/*
 * test_rollback.c - exact rollback for speculative decoding.
 *
 * A random walk of speculative rounds on cache A: append k <= L draft tokens
 * to every layer, attend with q_len = k, accept a random a <= k of them
 * (oscar_seq_truncate), append one "bonus" token. Cache B only ever sees the
 * accepted tokens and the bonus tokens. Then:
 *  - the sequence-API cache A and a batch-API cache A' (which rolls back by
 *    lowering its seq_lens) give bit-identical attention at every step;
 *  - at every step, the window of A holds exactly the tokens B's history
 *    says it should, bit for bit (oscar_seq_read against B);
 *  - whenever A and B have packed the same blocks, their attention outputs
 *    are bit-identical, and after a common tail of R + L tokens their export
 *    streams are byte-identical (packing depends on the longest length seen,
 *    so the schedules meet again once both have grown past it);
 *  - attention over A equals a float64 reference over B's tokens (method
 *    none with an f32 window: exact up to float rounding);
 *  - truncating into packed blocks is refused and changes nothing; the
 *    lag guarantees every draft can be removed right after it was appended.
 */
#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { LAYERS = 2, MAXTOK = 1200 };

typedef struct walk {
    oscar_config cfg;
    oscar_cache *a, *b, *ab; /* A (sequence API), B (accepted only), A' (batch API) */
    int32_t sa, sb;
    int hkv, hq, d, R, L, S;
    /* A' block manager: one sequence, slot 0 */
    int32_t table[64];
    int32_t next_block;
    int64_t len_ab;
} walk;

static int walk_make(walk *w, oscar_method m, int bits, oscar_dtype wdt, int L, int R, int S) {
    memset(w, 0, sizeof *w);
    w->cfg = tl_small_config(m, bits, 64, 2, 4);
    w->cfg.num_layers = LAYERS;
    w->cfg.residual = R;
    w->cfg.k_group = 16;
    w->cfg.v_group = 16;
    w->cfg.window_dtype = wdt;
    w->cfg.rollback_tokens = L;
    w->cfg.sink_tokens = S;
    w->cfg.block_count = 64;
    w->hkv = 2, w->hq = 4, w->d = 64, w->R = R, w->L = L, w->S = S;
    w->a = tl_create(&w->cfg);
    w->b = tl_create(&w->cfg);
    oscar_config cb = w->cfg;
    cb.caller_metadata = 1;
    w->ab = tl_create(&cb);
    if (!w->a || !w->b || !w->ab) return 0;
    CHECK_OK(oscar_seq_add(w->a, &w->sa));
    CHECK_OK(oscar_seq_add(w->b, &w->sb));
    for (int i = 0; i < 64; i++) w->table[i] = 63 - i; /* any order: the caller's choice */
    return 1;
}

static void walk_free(walk *w) {
    oscar_cache_destroy(w->a);
    oscar_cache_destroy(w->b);
    oscar_cache_destroy(w->ab);
}

static oscar_batch batch_of(walk *w, int32_t *len, int32_t *slot, int n) {
    oscar_batch b;
    b.num_seqs = 1;
    b.tokens_per_seq = n;
    b.max_seq_len = MAXTOK + 64;
    b.block_table_stride = 64;
    b.seq_lens = len;
    b.window_slots = slot;
    b.block_tables = w->table;
    return b;
}

/* Appends the same n tokens (fp16-encoded) to A, A' and optionally B. */
static void append_all(walk *w, const float *k, const float *v, int n, int to_b) {
    const int64_t row = (int64_t)w->hkv * w->d;
    uint16_t *kh = malloc(sizeof(uint16_t) * (size_t)(n * row)), *vh = malloc(sizeof(uint16_t) * (size_t)(n * row));
    tl_encode(k, OSCAR_DTYPE_F16, kh, n * row);
    tl_encode(v, OSCAR_DTYPE_F16, vh, n * row);
    int32_t nt = n, slot = 0, len = (int32_t)(w->len_ab + n);
    oscar_batch b = batch_of(w, &len, &slot, n);
    for (int l = 0; l < LAYERS; l++) {
        CHECK_OK(oscar_append(w->a, l, 1, &w->sa, &nt, kh, vh, OSCAR_DTYPE_F16, NULL));
        CHECK_OK(oscar_batch_append(w->ab, l, &b, kh, vh, OSCAR_DTYPE_F16, NULL));
        if (to_b) CHECK_OK(oscar_append(w->b, l, 1, &w->sb, &nt, kh, vh, OSCAR_DTYPE_F16, NULL));
    }
    w->len_ab += n;
    free(kh), free(vh);
}

/* Attention of A and A' over their last q_len tokens: bit-identical. */
static void attend_pair(walk *w, int q_len, tl_rng *r, float *out_a) {
    const int64_t n = (int64_t)q_len * w->hq * w->d;
    float *q = malloc(sizeof(float) * (size_t)n), *ob = malloc(sizeof(float) * (size_t)n);
    tl_fill_normal(r, q, n, 0.2);
    int32_t slot = 0, len = (int32_t)w->len_ab;
    oscar_batch b = batch_of(w, &len, &slot, q_len);
    for (int l = 0; l < LAYERS; l++) {
        CHECK_OK(tl_attention(w->a, l, 1, &w->sa, q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, out_a, w->hq, w->d));
        tl_poison(ob, n);
        CHECK_OK(oscar_batch_attention(w->ab, l, &b, q, OSCAR_DTYPE_F32, ob, OSCAR_DTYPE_F32, 0.0f, NULL));
        CHECKF(memcmp(out_a, ob, sizeof(float) * (size_t)n) == 0, "layer %d: batch-API attention differs from the "
               "sequence API (q_len %d, %lld tokens)", l, q_len, (long long)w->len_ab);
    }
    free(q), free(ob);
}

/* 1 if A and B have packed the same number of blocks in every layer. */
static int same_packing(walk *w) {
    for (int l = 0; l < LAYERS; l++) {
        oscar_seq_info ia, ib;
        if (oscar_seq_info_get(w->a, w->sa, l, &ia) || oscar_seq_info_get(w->b, w->sb, l, &ib)) return 0;
        if (ia.tokens != ib.tokens || ia.packed_tokens != ib.packed_tokens) return 0;
    }
    return 1;
}

/* Tokens of a layer that stay exact for good or are packed: the sink rows
 * and the blocks after them once a block exists (oscar.h). */
static int64_t frozen_tokens(const walk *w, const oscar_seq_info *info) {
    return info->packed_tokens > 0 ? w->S + info->packed_tokens : 0;
}

/* A's window tokens read back equal B's (which holds the same history). */
static void check_windows(walk *w) {
    for (int l = 0; l < LAYERS; l++) {
        oscar_seq_info ia;
        CHECK_OK(oscar_seq_info_get(w->a, w->sa, l, &ia));
        CHECKF(ia.window_tokens <= w->R - 1 + w->L + w->S,
               "layer %d window holds %d tokens, more than R - 1 + L + S (sink rows included)", l, ia.window_tokens);
        float *ka, *va, *kb, *vb;
        int64_t na = tl_read_all(w->a, w->sa, l, w->hkv, w->d, &ka, &va);
        int64_t nb = tl_read_all(w->b, w->sb, l, w->hkv, w->d, &kb, &vb);
        CHECKF(na == nb, "layer %d: A holds %lld tokens, B %lld", l, (long long)na, (long long)nb);
        const int64_t row = (int64_t)w->hkv * w->d, from = frozen_tokens(w, &ia);
        /* tokens B also still has in its window read back exactly alike (and
         * the sink rows, exact in both) */
        oscar_seq_info ib;
        CHECK_OK(oscar_seq_info_get(w->b, w->sb, l, &ib));
        const int64_t common = from > frozen_tokens(w, &ib) ? from : frozen_tokens(w, &ib);
        const int64_t sinks = na < w->S ? na : w->S;
        if (na == nb && sinks > 0)
            CHECKF(memcmp(ka, kb, sizeof(float) * (size_t)(sinks * row)) == 0 &&
                       memcmp(va, vb, sizeof(float) * (size_t)(sinks * row)) == 0,
                   "layer %d: sink rows differ between A and B", l);
        if (na == nb && common < na)
            CHECKF(memcmp(ka + common * row, kb + common * row, sizeof(float) * (size_t)((na - common) * row)) == 0 &&
                       memcmp(va + common * row, vb + common * row, sizeof(float) * (size_t)((na - common) * row)) == 0,
                   "layer %d: window tokens %lld.. differ between A and B", l, (long long)common);
        free(ka), free(va), free(kb), free(vb);
    }
}

static void run_walk(oscar_method m, int bits, oscar_dtype wdt, int L, int R, int S, const char *name) {
    tl_rng r = tl_rng_for(name);
    walk w;
    if (!walk_make(&w, m, bits, wdt, L, R, S)) {
        walk_free(&w);
        return;
    }
    const int64_t row = (int64_t)w.hkv * w.d;
    float *k = malloc(sizeof(float) * (size_t)(MAXTOK * row)), *v = malloc(sizeof(float) * (size_t)(MAXTOK * row));
    float *out = malloc(sizeof(float) * (size_t)(64 * w.hq * w.d));
    /* B's history, for the float64 reference */
    float *hk = malloc(sizeof(float) * (size_t)(MAXTOK * row)), *hv = malloc(sizeof(float) * (size_t)(MAXTOK * row));
    int64_t hn = 0;
    /* a prompt */
    /* with sinks, a prompt short of S, so that the first rounds roll back
     * inside the sink rows */
    int prompt = w.S > 0 ? tl_randint(&r, 1, (w.S + 1) / 2) : tl_randint(&r, 1, 50);
    tl_gen_kv(&r, 1, k, v, prompt, w.hkv, w.d, OSCAR_DTYPE_F16);
    append_all(&w, k, v, prompt, 1);
    memcpy(hk, k, sizeof(float) * (size_t)(prompt * row));
    memcpy(hv, v, sizeof(float) * (size_t)(prompt * row));
    hn = prompt;
    int rounds = 0, exact_checks = 0, rejected_all = 0, rollbacks_refused = 0, in_sinks = 0;
    while (hn + L + 2 < MAXTOK - 2 * (w.R + L) && rounds < 120) {
        rounds++;
        /* with sinks the first round drafts L tokens from inside the sink
         * rows (often past S) and rejects them all: a rollback into them */
        const int first_in_sinks = w.S > 0 && rounds == 1;
        const int kdraft = first_in_sinks ? L : tl_randint(&r, 1, L);
        tl_gen_kv(&r, (int)(tl_next(&r) % 3), k, v, kdraft, w.hkv, w.d, OSCAR_DTYPE_F16);
        append_all(&w, k, v, kdraft, 0);
        attend_pair(&w, kdraft, &r, out);
        const int acc = first_in_sinks ? 0 : tl_randint(&r, 0, kdraft);
        rejected_all += acc == 0;
        /* the drafts are all still in the window: any of them can go */
        const int64_t keep = hn + acc;
        in_sinks += keep < w.S; /* a rollback inside the sink rows (nothing packed yet) */
        CHECK_OK(oscar_seq_truncate(w.a, w.sa, keep));
        w.len_ab = keep; /* the batch API: lower seq_lens */
        /* B gets the accepted drafts now */
        if (acc > 0) {
            const int64_t nt = acc;
            uint16_t *kh = malloc(sizeof(uint16_t) * (size_t)(nt * row)), *vh = malloc(sizeof(uint16_t) * (size_t)(nt * row));
            tl_encode(k, OSCAR_DTYPE_F16, kh, nt * row);
            tl_encode(v, OSCAR_DTYPE_F16, vh, nt * row);
            int32_t n32 = acc;
            for (int l = 0; l < LAYERS; l++)
                CHECK_OK(oscar_append(w.b, l, 1, &w.sb, &n32, kh, vh, OSCAR_DTYPE_F16, NULL));
            free(kh), free(vh);
            memcpy(hk + hn * row, k, sizeof(float) * (size_t)(acc * row));
            memcpy(hv + hn * row, v, sizeof(float) * (size_t)(acc * row));
            hn += acc;
        }
        /* the bonus token, to everyone */
        tl_gen_kv(&r, 0, k, v, 1, w.hkv, w.d, OSCAR_DTYPE_F16);
        append_all(&w, k, v, 1, 1);
        memcpy(hk + hn * row, k, sizeof(float) * (size_t)row);
        memcpy(hv + hn * row, v, sizeof(float) * (size_t)row);
        hn++;
        attend_pair(&w, 1, &r, out);
        check_windows(&w);
        if (same_packing(&w)) {
            float *q = malloc(sizeof(float) * (size_t)(w.hq * w.d)), *ob = malloc(sizeof(float) * (size_t)(w.hq * w.d));
            tl_fill_normal(&r, q, w.hq * w.d, 0.2);
            for (int l = 0; l < LAYERS; l++) {
                CHECK_OK(tl_attention(w.a, l, 1, &w.sa, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, out, w.hq, w.d));
                CHECK_OK(tl_attention(w.b, l, 1, &w.sb, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, ob, w.hq, w.d));
                CHECKF(memcmp(out, ob, sizeof(float) * (size_t)(w.hq * w.d)) == 0,
                       "%s round %d layer %d: A (rolled back) and B (accepted only) attend differently", name, rounds, l);
            }
            exact_checks++;
            free(q), free(ob);
        }
        /* truncating into a packed block is refused and changes nothing */
        oscar_seq_info ia;
        CHECK_OK(oscar_seq_info_get(w.a, w.sa, 0, &ia));
        if (ia.packed_tokens > 0) {
            size_t n0 = 0, n1 = 0;
            unsigned char *e0 = tl_export(w.a, w.sa, &n0);
            CHECK_ST(w.a, oscar_seq_truncate(w.a, w.sa, frozen_tokens(&w, &ia) - 1), OSCAR_E_INVALID_ARGUMENT);
            unsigned char *e1 = tl_export(w.a, w.sa, &n1);
            CHECK(e0 && e1 && n0 == n1 && memcmp(e0, e1, n0) == 0);
            free(e0), free(e1);
            /* the batch API refuses the same rollback, and accepts the
             * boundary, with the same attention afterwards */
            int32_t slot = 0, len = (int32_t)frozen_tokens(&w, &ia) - 1;
            oscar_batch b = batch_of(&w, &len, &slot, 1);
            float *q = calloc((size_t)(w.hq * w.d), sizeof(float)), *ob = malloc(sizeof(float) * (size_t)(w.hq * w.d));
            tl_poison(ob, w.hq * w.d);
            CHECK_ST(w.ab, oscar_batch_attention(w.ab, 0, &b, q, OSCAR_DTYPE_F32, ob, OSCAR_DTYPE_F32, 0.0f, NULL),
                     OSCAR_E_INVALID_ARGUMENT);
            len++;
            CHECK_OK(oscar_batch_attention(w.ab, 0, &b, q, OSCAR_DTYPE_F32, ob, OSCAR_DTYPE_F32, 0.0f, NULL));
            free(q), free(ob);
            rollbacks_refused++;
        }
    }
    /* float64 reference over B's tokens (exact caches only) */
    if (m == OSCAR_METHOD_NONE && wdt == OSCAR_DTYPE_F32) {
        float *q = malloc(sizeof(float) * (size_t)(w.hq * w.d));
        double *ref = malloc(sizeof(double) * (size_t)(w.hq * w.d)), *mag = malloc(sizeof(double) * (size_t)(w.hq * w.d));
        tl_fill_normal(&r, q, w.hq * w.d, 0.2);
        /* the caches hold fp16-rounded inputs */
        float *rk = malloc(sizeof(float) * (size_t)(hn * row)), *rv = malloc(sizeof(float) * (size_t)(hn * row));
        memcpy(rk, hk, sizeof(float) * (size_t)(hn * row));
        memcpy(rv, hv, sizeof(float) * (size_t)(hn * row));
        tl_round_array(OSCAR_DTYPE_F16, rk, hn * row);
        tl_round_array(OSCAR_DTYPE_F16, rv, hn * row);
        tl_ref_attention_f(w.d, w.hkv, w.hq, rk, rv, hn, 1, q, 1.0 / sqrt((double)w.d), ref, mag);
        CHECK_OK(tl_attention(w.a, 0, 1, &w.sa, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, out, w.hq, w.d));
        const double e = tl_rel_l2(out, ref, w.hq * w.d);
        CHECKF(e < 1e-5, "%s: attention after %d rounds of rollback vs float64 over the accepted tokens: %.3g", name,
               rounds, e);
        free(q), free(ref), free(mag), free(rk), free(rv);
    }
    /* a common tail of R + L tokens: both schedules meet, the streams match */
    const int tail = w.R + L + 3;
    tl_gen_kv(&r, 0, k, v, tail, w.hkv, w.d, OSCAR_DTYPE_F16);
    append_all(&w, k, v, tail, 1);
    CHECKF(same_packing(&w), "%s: after a common tail A and B still pack differently", name);
    CHECKF(tl_same_export(w.a, w.sa, w.b, w.sb), "%s: after rollback and a common tail, A's export differs from B's",
           name);
    printf("   %s: %d rounds (%d rejected every draft, %d rolled back into the sink rows), %lld tokens kept, %d "
           "bit-exact A/B attention checks, %d refused rollbacks\n",
           name, rounds, rejected_all, in_sinks, (long long)hn, exact_checks, rollbacks_refused);
    CHECKF(w.S == 0 || in_sinks > 0, "%s: no rollback inside the sink rows", name);
    CHECKF(exact_checks > rounds / 4, "%s: too few rounds with equal packing (%d of %d) to compare exactly", name,
           exact_checks, rounds);
    free(k), free(v), free(out), free(hk), free(hv);
    walk_free(&w);
}

static void test_speculative_walks(void) {
    run_walk(OSCAR_METHOD_OSCAR, 2, OSCAR_DTYPE_F16, 8, 32, 0, "oscar-2 L8");
    run_walk(OSCAR_METHOD_KIVI, 4, OSCAR_DTYPE_BF16, 5, 32, 0, "kivi-4 L5");
    run_walk(OSCAR_METHOD_NONE, 2, OSCAR_DTYPE_F32, 32, 32, 0, "none f32 L32 (=R)");
    run_walk(OSCAR_METHOD_QUAROT, 2, OSCAR_DTYPE_F16, 1, 32, 0, "quarot-2 L1");
}

/* The same walks with sink tokens: the batch API's rollback (lowering
 * seq_len, also below S while nothing is packed) against seq_truncate. */
static void test_speculative_walks_sinks(void) {
    run_walk(OSCAR_METHOD_OSCAR, 2, OSCAR_DTYPE_F16, 8, 32, 5, "oscar-2 L8 S5");
    run_walk(OSCAR_METHOD_KIVI, 4, OSCAR_DTYPE_BF16, 5, 32, 33, "kivi-4 L5 S33 (odd, > R)");
    run_walk(OSCAR_METHOD_NONE, 2, OSCAR_DTYPE_F32, 32, 32, 40, "none f32 L32 S40");
    run_walk(OSCAR_METHOD_OSCAR, 2, OSCAR_DTYPE_F16, 64, 64, 64, "oscar-2 R64 L64 S64");
    run_walk(OSCAR_METHOD_OSCAR, 2, OSCAR_DTYPE_F16, 64, 64, 32, "oscar-2 R64 L64 S32 (recommended)");
}

/* Without a lag a block is packed as soon as it is full; truncation then
 * works only inside the window, and the config limits hold. */
static void test_limits(void) {
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 2, 4);
    cfg.residual = 32;
    cfg.k_group = 16;
    cfg.v_group = 16;
    cfg.rollback_tokens = 33;
    char err[256];
    oscar_cache *c = NULL;
    CHECK_ST(NULL, oscar_cache_create(&cfg, &c, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
    CHECKF(strstr(err, "rollback_tokens") != NULL, "message: %s", err);
    cfg.rollback_tokens = -1;
    CHECK_ST(NULL, oscar_config_validate(&cfg, NULL, 0), OSCAR_E_INVALID_ARGUMENT);
    cfg.rollback_tokens = 0;
    c = tl_create(&cfg);
    if (!c) return;
    tl_rng r = tl_rng_for("limits");
    int32_t s;
    CHECK_OK(oscar_seq_add(c, &s));
    float k[40 * 128], v[40 * 128];
    tl_gen_kv(&r, 0, k, v, 40, 2, 64, OSCAR_DTYPE_F32);
    CHECK_OK(tl_append(c, 0, s, k, v, 40, 2, 64, OSCAR_DTYPE_F32));
    CHECK_ST(c, oscar_seq_truncate(c, s, 31), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(c, oscar_seq_truncate(c, s, -1), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(c, oscar_seq_truncate(c, 12345, 3), OSCAR_E_NOT_FOUND);
    CHECK_OK(oscar_seq_truncate(c, s, 32));
    CHECK_OK(oscar_seq_truncate(c, s, 100)); /* longer than it is: nothing to remove */
    oscar_seq_info info;
    CHECK_OK(oscar_seq_info_get(c, s, 0, &info));
    CHECK(info.tokens == 32 && info.packed_tokens == 32 && info.window_tokens == 0);
    oscar_cache_destroy(c);
}

int main(void) {
    printf("oscar %s, test_rollback\n", oscar_version());
    TL_RUN(test_limits);
    TL_RUN(test_speculative_walks);
    TL_RUN(test_speculative_walks_sinks);
    return tl_finish();
}
