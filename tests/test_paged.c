/*
 * test_paged.c - many sequences in one pool.
 *  - interleaved multi-sequence appends (several layers, empty appends)
 *    give each sequence exactly the bytes of a fresh single-sequence cache,
 *    and multi-sequence attention equals per-sequence attention;
 *  - fork: blocks shared, window copied; fork then diverge; the parent is
 *    unaffected; freeing the parent keeps the child intact; blocks return to
 *    the pool when the last user frees; fork of a fork; empty forks;
 *  - block tables, memory statistics, pool reuse (no stale data).
 */
#include "testlib.h"

#include <stdlib.h>
#include <string.h>

#define MAXL 3

typedef struct hist {
    float *k[MAXL], *v[MAXL];
    int64_t n[MAXL], cap;
} hist;

static void hist_init(hist *h, int64_t cap, int64_t row) {
    memset(h, 0, sizeof *h);
    h->cap = cap;
    for (int l = 0; l < MAXL; l++) {
        h->k[l] = malloc(sizeof(float) * (size_t)(cap * row));
        h->v[l] = malloc(sizeof(float) * (size_t)(cap * row));
    }
}

static void hist_copy(hist *dst, const hist *src, int64_t row) {
    hist_init(dst, src->cap, row);
    for (int l = 0; l < MAXL; l++) {
        dst->n[l] = src->n[l];
        memcpy(dst->k[l], src->k[l], sizeof(float) * (size_t)(src->n[l] * row));
        memcpy(dst->v[l], src->v[l], sizeof(float) * (size_t)(src->n[l] * row));
    }
}

static void hist_free(hist *h) {
    for (int l = 0; l < MAXL; l++) {
        free(h->k[l]);
        free(h->v[l]);
    }
}

/* Appends n fresh random tokens to one sequence and its history. */
static oscar_status hist_append(oscar_cache *c, int32_t seq, hist *h, int layer, int64_t n, tl_rng *r, int hkv,
                                int d, oscar_dtype dt) {
    int64_t row = (int64_t)hkv * d;
    if (h->n[layer] + n > h->cap) n = h->cap - h->n[layer];
    float *k = h->k[layer] + h->n[layer] * row, *v = h->v[layer] + h->n[layer] * row;
    tl_gen_kv(r, (int)(tl_next(r) % 3), k, v, n, hkv, d, dt);
    oscar_status st = tl_append(c, layer, seq, k, v, n, hkv, d, dt);
    if (st == OSCAR_OK) h->n[layer] += n;
    return st;
}

/* A fresh cache with one sequence holding the history, prefilled. */
static oscar_cache *fresh_copy(const oscar_config *cfg, const hist *h, int32_t *seq) {
    oscar_config c1 = *cfg;
    c1.max_seqs = 1;
    oscar_cache *c = tl_create(&c1);
    if (!c) return NULL;
    CHECK_OK(oscar_seq_add(c, seq));
    for (int l = 0; l < cfg->num_layers; l++)
        CHECK_OK(tl_append(c, l, *seq, h->k[l], h->v[l], h->n[l], cfg->num_kv_heads, cfg->head_dim,
                           OSCAR_DTYPE_F32));
    return c;
}

static int matches_fresh(oscar_cache *c, int32_t seq, const oscar_config *cfg, const hist *h) {
    int32_t fs;
    oscar_cache *f = fresh_copy(cfg, h, &fs);
    if (!f) return 0;
    int same = tl_same_export(c, seq, f, fs);
    oscar_cache_destroy(f);
    return same;
}

static oscar_memory_stats stats(oscar_cache *c) {
    oscar_memory_stats m;
    memset(&m, 0, sizeof m);
    CHECK_OK(oscar_memory(c, &m));
    return m;
}

/* ---- many sequences ---------------------------------------------------------- */

static void test_many_sequences(void) {
    tl_rng r = tl_rng_for("many_sequences");
    for (int mi = 0; mi < 3; mi++) {
        oscar_method m = mi == 0 ? OSCAR_METHOD_OSCAR : mi == 1 ? OSCAR_METHOD_KIVI : OSCAR_METHOD_NONE;
        const int d = 64, hkv = 2, hq = 8, NS = 6, L = 3;
        const int64_t row = hkv * d, cap = 200;
        oscar_config cfg = tl_small_config(m, mi == 1 ? 4 : 2, d, hkv, hq);
        cfg.num_layers = L;
        cfg.residual = 32;
        cfg.k_group = 16;
        cfg.max_seqs = 8;
        cfg.block_count = NS * 7 + 2;
        cfg.window_dtype = mi == 2 ? OSCAR_DTYPE_F32 : OSCAR_DTYPE_F16;
        cfg.num_threads = 2; /* batched append and attention in parallel */
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        int32_t ids[6];
        hist h[6];
        for (int s = 0; s < NS; s++) {
            CHECK_OK(oscar_seq_add(c, &ids[s]));
            for (int j = 0; j < s; j++) CHECKF(ids[j] != ids[s] && ids[s] >= 0, "sequence ids not unique / negative");
            hist_init(&h[s], cap, row);
        }
        /* rounds of multi-sequence appends, a random subset in random order */
        for (int round = 0; round < 25; round++) {
            int layer = tl_randint(&r, 0, L - 1);
            int order[6], n_sel = 0;
            for (int s = 0; s < NS; s++)
                if (tl_uniform(&r) < 0.7) order[n_sel++] = s;
            for (int i = n_sel - 1; i > 0; i--) {
                int j = tl_randint(&r, 0, i), t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
            if (n_sel == 0) continue;
            int32_t sid[6], nt[6];
            int64_t total = 0;
            for (int i = 0; i < n_sel; i++) {
                int s = order[i];
                int64_t n = tl_randint(&r, 0, round % 5 == 0 ? 40 : 9);
                if (h[s].n[layer] + n > cap) n = cap - h[s].n[layer];
                sid[i] = ids[s];
                nt[i] = (int32_t)n;
                total += n;
            }
            float *kb = malloc(sizeof(float) * (size_t)((total + 1) * row)), *vb = malloc(sizeof(float) * (size_t)((total + 1) * row));
            int64_t at = 0;
            for (int i = 0; i < n_sel; i++) {
                int s = order[i];
                float *k = h[s].k[layer] + h[s].n[layer] * row, *v = h[s].v[layer] + h[s].n[layer] * row;
                tl_gen_kv(&r, i % 3, k, v, nt[i], hkv, d, OSCAR_DTYPE_F32);
                memcpy(kb + at * row, k, sizeof(float) * (size_t)(nt[i] * row));
                memcpy(vb + at * row, v, sizeof(float) * (size_t)(nt[i] * row));
                at += nt[i];
            }
            oscar_status st = oscar_append(c, layer, n_sel, sid, nt, kb, vb, OSCAR_DTYPE_F32, NULL);
            CHECKF(st == OSCAR_OK, "multi-sequence append: %s (%s)", oscar_status_name(st), oscar_last_error(c));
            if (st == OSCAR_OK)
                for (int i = 0; i < n_sel; i++) h[order[i]].n[layer] += nt[i];
            free(kb);
            free(vb);
        }
        /* make sure every layer of every sequence has at least 8 tokens */
        for (int s = 0; s < NS; s++)
            for (int l = 0; l < L; l++)
                if (h[s].n[l] < 8) CHECK_OK(hist_append(c, ids[s], &h[s], l, 8, &r, hkv, d, OSCAR_DTYPE_F32));
        for (int s = 0; s < NS; s++) {
            for (int l = 0; l < L; l++) {
                oscar_seq_info info;
                CHECK_OK(oscar_seq_info_get(c, ids[s], l, &info));
                CHECK(info.tokens == h[s].n[l]);
            }
            CHECKF(matches_fresh(c, ids[s], &cfg, &h[s]), "%s: sequence %d differs from a fresh cache with its tokens",
                   oscar_method_name(m), s);
        }
        /* attention for all sequences at once equals one at a time */
        const int q_len = 3;
        int64_t per = (int64_t)q_len * hq * d;
        float *q = malloc(sizeof(float) * (size_t)(NS * per)), *o = malloc(sizeof(float) * (size_t)(NS * per));
        float *o1 = malloc(sizeof(float) * (size_t)per);
        double *ref = malloc(sizeof(double) * (size_t)per);
        tl_fill_normal(&r, q, NS * per, 0.3);
        for (int l = 0; l < L; l++) {
            CHECK_OK(tl_attention(c, l, NS, ids, q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, hq, d));
            for (int s = 0; s < NS; s++) {
                CHECK_OK(tl_attention(c, l, 1, &ids[s], q_len, q + s * per, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f,
                                      o1, hq, d));
                float *kl, *vl;
                double mag[3 * 8];
                int64_t T = tl_read_all(c, ids[s], l, hkv, d, &kl, &vl);
                if (T >= q_len) {
                    tl_ref_attention_f(d, hkv, hq, kl, vl, T, q_len, q + s * per, 1.0 / 8.0, ref, mag);
                    double w;
                    CHECKF(tl_compare_out(o + s * per, ref, mag, q_len * hq, d, OSCAR_DTYPE_F32, 1e-5, &w) == 0,
                           "%s layer %d seq %d: attention vs float64 over read-back: worst %.3g", oscar_method_name(m),
                           l, s, w);
                    /* the work split depends on the batch: fp32 rounding only
                     * (two results, each within 1e-5 of the exact one) */
                    for (int64_t i = 0; i < per; i++) ref[i] = o1[i];
                    double wb = 0;
                    int64_t bb = tl_compare_out(o + s * per, ref, mag, q_len * hq, d, OSCAR_DTYPE_F32, 2e-5, &wb);
                    CHECKF(bb == 0,
                           "%s layer %d: batched attention of sequence %d differs from its own (worst %.3g of sum p|v|)",
                           oscar_method_name(m), l, s, wb);
                }
                free(kl);
                free(vl);
            }
        }
        free(q);
        free(o);
        free(o1);
        free(ref);
        /* free in a scrambled order; blocks come back */
        for (int s = NS - 1; s >= 0; s -= 2) CHECK_OK(oscar_seq_free(c, ids[s]));
        for (int s = 0; s < NS; s += 2) CHECK_OK(oscar_seq_free(c, ids[s]));
        oscar_memory_stats ms = stats(c);
        CHECKF(ms.blocks_free == cfg.block_count && ms.blocks_used == 0 && ms.seqs_live == 0,
               "after freeing everything: free %lld used %lld live %d", (long long)ms.blocks_free,
               (long long)ms.blocks_used, ms.seqs_live);
        for (int s = 0; s < NS; s++) hist_free(&h[s]);
        oscar_cache_destroy(c);
    }
}

/* ---- fork ----------------------------------------------------------------------- */

static int32_t table_of(oscar_cache *c, int32_t seq, int32_t *table, int cap) {
    int32_t count = -1;
    CHECK_OK(oscar_seq_block_table(c, seq, table, cap, &count));
    return count;
}

static void fork_scenario(oscar_method m, int64_t t0, tl_rng *r) {
    const int d = 64, hkv = 2, hq = 4, L = 2, R = 32;
    const int64_t row = hkv * d, cap = 400;
    oscar_config cfg = tl_small_config(m, 2, d, hkv, hq);
    cfg.num_layers = L;
    cfg.residual = R;
    cfg.block_count = 40;
    cfg.max_seqs = 6;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    printf("   fork: %s, parent with %lld tokens\n", oscar_method_name(m), (long long)t0);
    int32_t P, C;
    hist hp, hc;
    hist_init(&hp, cap, row);
    CHECK_OK(oscar_seq_add(c, &P));
    for (int l = 0; l < L; l++)
        if (t0 > 0) CHECK_OK(hist_append(c, P, &hp, l, t0, r, hkv, d, OSCAR_DTYPE_F16));
    oscar_memory_stats m0 = stats(c);
    CHECK_OK(oscar_seq_fork(c, P, &C));
    CHECK(C != P && C >= 0);
    hist_copy(&hc, &hp, row);
    oscar_memory_stats m1 = stats(c);
    CHECKF(m1.blocks_used == m0.blocks_used && m1.blocks_free == m0.blocks_free,
           "fork allocated blocks (used %lld -> %lld)", (long long)m0.blocks_used, (long long)m1.blocks_used);
    CHECK(m1.seqs_live == m0.seqs_live + 1);
    int32_t tp[64], tc[64];
    int32_t np = table_of(c, P, tp, 64), nc = table_of(c, C, tc, 64);
    CHECKF(np == t0 / R && nc == np && memcmp(tp, tc, sizeof(int32_t) * (size_t)(np > 0 ? np : 0)) == 0,
           "fork: block tables differ (%d vs %d entries)", np, nc);
    CHECKF(tl_same_export(c, P, c, C), "fork: child does not export the parent's bytes");
    for (int l = 0; l < L; l++) {
        oscar_seq_info ip, ic;
        CHECK_OK(oscar_seq_info_get(c, P, l, &ip));
        CHECK_OK(oscar_seq_info_get(c, C, l, &ic));
        CHECK(ip.tokens == ic.tokens && ip.window_tokens == ic.window_tokens && ip.blocks == ic.blocks);
    }
    /* diverge: both get different tokens, enough to flush new blocks */
    for (int l = 0; l < L; l++) {
        CHECK_OK(hist_append(c, C, &hc, l, R + 3, r, hkv, d, OSCAR_DTYPE_F16));
        CHECK_OK(hist_append(c, P, &hp, l, R - 1, r, hkv, d, OSCAR_DTYPE_F16));
        CHECK_OK(hist_append(c, P, &hp, l, 5, r, hkv, d, OSCAR_DTYPE_F16));
    }
    CHECKF(matches_fresh(c, P, &cfg, &hp), "fork: the parent was changed by the child's appends");
    CHECKF(matches_fresh(c, C, &cfg, &hc), "fork: the child differs from a fresh sequence with its tokens");
    np = table_of(c, P, tp, 64);
    nc = table_of(c, C, tc, 64);
    int shared = (int)(t0 / R);
    CHECKF(np >= shared && nc >= shared && memcmp(tp, tc, sizeof(int32_t) * (size_t)shared) == 0,
           "fork: the shared prefix of the block tables changed");
    int overlap = 0;
    for (int i = shared; i < np; i++)
        for (int j = shared; j < nc; j++)
            if (tp[i] == tc[j]) overlap++;
    CHECKF(overlap == 0, "fork: parent and child share a block written after the fork");
    oscar_memory_stats m2 = stats(c);
    CHECKF(m2.blocks_used == shared + (np - shared) + (nc - shared), "blocks used %lld, expected %d",
           (long long)m2.blocks_used, shared + (np - shared) + (nc - shared));
    /* attention of the child equals the fresh copy's */
    {
        int32_t fs;
        oscar_cache *f = fresh_copy(&cfg, &hc, &fs);
        if (f) {
            float q[2 * 4 * 64], oc[2 * 4 * 64], of[2 * 4 * 64];
            double ref[2 * 4 * 64];
            tl_fill_normal(r, q, 2 * hq * d, 0.3);
            for (int l = 0; l < L; l++) {
                CHECK_OK(tl_attention(c, l, 1, &C, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oc, hq, d));
                CHECK_OK(tl_attention(f, l, 1, &fs, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, of, hq, d));
                for (int i = 0; i < 2 * hq * d; i++) ref[i] = of[i];
                CHECKF(tl_compare_out(oc, ref, NULL, 2 * hq, d, OSCAR_DTYPE_F32, 1e-6, NULL) == 0,
                       "fork: child attention differs from a fresh copy (layer %d)", l);
            }
            oscar_cache_destroy(f);
        }
    }
    /* fork of the child, then free the parent: children intact */
    int32_t G;
    CHECK_OK(oscar_seq_fork(c, C, &G));
    hist hg;
    hist_copy(&hg, &hc, row);
    CHECK_OK(oscar_seq_free(c, P));
    CHECK_CONST_ST(c, oscar_seq_info_get(c, P, 0, &(oscar_seq_info){0}), OSCAR_E_NOT_FOUND);
    CHECKF(matches_fresh(c, C, &cfg, &hc), "fork: freeing the parent damaged the child");
    CHECKF(matches_fresh(c, G, &cfg, &hg), "fork: freeing the parent damaged the grandchild");
    oscar_memory_stats m3 = stats(c);
    CHECKF(m3.blocks_used == nc, "after freeing the parent: %lld blocks used, expected %d", (long long)m3.blocks_used,
           nc);
    for (int l = 0; l < L; l++) CHECK_OK(hist_append(c, G, &hg, l, 2 * R, r, hkv, d, OSCAR_DTYPE_F16));
    CHECKF(matches_fresh(c, C, &cfg, &hc), "fork: the grandchild's appends changed the child");
    CHECKF(matches_fresh(c, G, &cfg, &hg), "fork: grandchild differs from a fresh copy");
    CHECK_OK(oscar_seq_free(c, C));
    CHECKF(matches_fresh(c, G, &cfg, &hg), "fork: freeing the child damaged the grandchild");
    CHECK_OK(oscar_seq_free(c, G));
    oscar_memory_stats m4 = stats(c);
    CHECKF(m4.blocks_used == 0 && m4.blocks_free == cfg.block_count && m4.seqs_live == 0,
           "blocks not returned: used %lld free %lld live %d", (long long)m4.blocks_used, (long long)m4.blocks_free,
           m4.seqs_live);
    hist_free(&hp);
    hist_free(&hc);
    hist_free(&hg);
    oscar_cache_destroy(c);
}

static void test_fork(void) {
    tl_rng r = tl_rng_for("fork");
    fork_scenario(OSCAR_METHOD_OSCAR, 2 * 32 + 5, &r);
    fork_scenario(OSCAR_METHOD_OSCAR, 2 * 32, &r);
    fork_scenario(OSCAR_METHOD_KIVI, 31, &r);
    fork_scenario(OSCAR_METHOD_QUAROT, 0, &r);
    fork_scenario(OSCAR_METHOD_NONE, 3 * 32 + 1, &r);
    fork_scenario(OSCAR_METHOD_SCALE_ONLY, 100, &r);
}

static void test_fork_unequal_layers(void) {
    tl_rng r = tl_rng_for("fork_unequal_layers");
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 1, 1);
    cfg.num_layers = 2;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    int32_t P, C = -77;
    hist h;
    hist_init(&h, 100, 64);
    CHECK_OK(oscar_seq_add(c, &P));
    CHECK_OK(hist_append(c, P, &h, 0, 70, &r, 1, 64, OSCAR_DTYPE_F32));
    CHECK_OK(hist_append(c, P, &h, 1, 69, &r, 1, 64, OSCAR_DTYPE_F32));
    oscar_memory_stats m0 = stats(c);
    CHECK_ST(c, oscar_seq_fork(c, P, &C), OSCAR_E_INVALID_ARGUMENT);
    oscar_memory_stats m1 = stats(c);
    CHECK(m1.seqs_live == m0.seqs_live && m1.blocks_used == m0.blocks_used);
    CHECKF(matches_fresh(c, P, &cfg, &h), "a failed fork changed the parent");
    hist_free(&h);
    oscar_cache_destroy(c);
}

/* ---- block table and memory accounting -------------------------------------------- */

static void test_block_table_and_stats(void) {
    tl_rng r = tl_rng_for("block_table_and_stats");
    static const oscar_method ms[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    for (int mi = 0; mi < 4; mi++)
        for (int wi = 0; wi < 3; wi++) {
            oscar_config cfg = tl_small_config(ms[mi], wi == 1 ? 4 : 2, 128, 3, 6);
            cfg.num_layers = 2;
            cfg.residual = 64;
            cfg.k_group = 32;
            cfg.v_group = wi == 2 ? 64 : 32;
            cfg.window_dtype = (oscar_dtype)wi;
            cfg.block_count = 10;
            cfg.max_seqs = 3;
            tl_geom g = tl_geom_of(&cfg);
            oscar_cache *c = tl_create(&cfg);
            if (!c) continue;
            oscar_memory_stats m = stats(c);
            CHECKF(m.block_bytes == (int64_t)(2 * g.LB), "%s W=%s: block_bytes %lld, FORMAT.md gives %zu",
                   oscar_method_name(cfg.method), tl_dtype_name(cfg.window_dtype), (long long)m.block_bytes, 2 * g.LB);
            CHECK(m.blocks_total == 10 && m.blocks_free == 10 && m.blocks_used == 0);
            CHECK(m.pool_bytes == m.blocks_total * m.block_bytes);
            CHECK(m.seqs_live == 0 && m.seqs_max == 3);
            CHECKF(fabs(m.packed_bytes_per_token - 2.0 * (double)g.LB / 64) < 1e-9, "packed_bytes_per_token %.3f",
                   m.packed_bytes_per_token);
            CHECKF(fabs(m.window_bytes_per_token - 2.0 * 2 * 3 * 128 * g.w) < 1e-9, "window_bytes_per_token %.3f",
                   m.window_bytes_per_token);
            CHECKF(fabs(m.fp16_bytes_per_token - 2.0 * 2 * 3 * 128 * 2) < 1e-9, "fp16_bytes_per_token %.3f",
                   m.fp16_bytes_per_token);
            CHECK(m.window_bytes >= 0 && m.bytes_in_use >= 0);
            double bits = -1;
            CHECK_OK(oscar_config_packed_bits(&cfg, &bits));
            double want = g.quant ? (double)g.LB * 8 / (2.0 * 64 * 3 * 128) : 8.0 * g.w;
            CHECKF(fabs(bits - want) < 1e-9, "%s: packed bits %.5f, FORMAT.md layout gives %.5f",
                   oscar_method_name(cfg.method), bits, want);
            /* a sequence with 3 blocks + window */
            int32_t s;
            hist h;
            hist_init(&h, 300, 3 * 128);
            CHECK_OK(oscar_seq_add(c, &s));
            CHECK_OK(hist_append(c, s, &h, 0, 3 * 64 + 7, &r, 3, 128, OSCAR_DTYPE_F32));
            CHECK_OK(hist_append(c, s, &h, 1, 2 * 64 + 1, &r, 3, 128, OSCAR_DTYPE_F32));
            int32_t table[8] = {-5, -5, -5, -5, -5, -5, -5, -5}, count = 0;
            CHECK_OK(oscar_seq_block_table(c, s, table, 1, &count));
            CHECKF(count == 3 && table[0] >= 0 && table[0] < 10 && table[1] == -5,
                   "block table with capacity 1: count %d, entries %d %d", count, table[0], table[1]);
            CHECK_OK(oscar_seq_block_table(c, s, table, 8, &count));
            CHECK(count == 3 && table[3] == -5);
            for (int i = 0; i < 3; i++) {
                CHECK(table[i] >= 0 && table[i] < 10);
                for (int j = 0; j < i; j++) CHECK(table[i] != table[j]);
            }
            m = stats(c);
            CHECK(m.blocks_used == 3 && m.blocks_free == 7 && m.seqs_live == 1);
            CHECK(m.bytes_in_use >= 3 * m.block_bytes);
            CHECKF(matches_fresh(c, s, &cfg, &h), "sequence differs from a fresh copy");
            hist_free(&h);
            oscar_cache_destroy(c);
        }
    /* the default configuration: 2 bits, groups 32, d 128, Hkv 8 */
    oscar_config def = oscar_config_default();
    double bits = 0;
    CHECK_OK(oscar_config_packed_bits(&def, &bits));
    tl_geom g = tl_geom_of(&def);
    printf("   default config: %.4f bits per element (16/%.4f = %.2fx)\n", bits, bits, 16.0 / bits);
    CHECKF(fabs(bits - (double)g.LB * 8 / (2.0 * def.residual * def.num_kv_heads * def.head_dim)) < 1e-9 &&
               bits > 3.0 && bits < 3.04,
           "default packed bits %.5f", bits);
}

static void test_pool_reuse(void) {
    tl_rng r = tl_rng_for("pool_reuse");
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 2, 2);
    cfg.residual = 32;
    cfg.block_count = 6;
    cfg.max_seqs = 2;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    for (int round = 0; round < 4; round++) {
        int32_t a, b;
        hist ha, hb;
        hist_init(&ha, 200, 128);
        hist_init(&hb, 200, 128);
        CHECK_OK(oscar_seq_add(c, &a));
        CHECK_OK(oscar_seq_add(c, &b));
        CHECK_OK(hist_append(c, a, &ha, 0, 4 * 32 + round, &r, 2, 64, OSCAR_DTYPE_F32));
        CHECK_OK(hist_append(c, b, &hb, 0, 2 * 32 + 31, &r, 2, 64, OSCAR_DTYPE_F32));
        oscar_memory_stats m = stats(c);
        CHECK(m.blocks_free == 0 && m.blocks_used == 6);
        CHECKF(matches_fresh(c, a, &cfg, &ha) && matches_fresh(c, b, &cfg, &hb), "round %d: reused blocks", round);
        if (round % 2) {
            CHECK_OK(oscar_seq_free(c, a));
            CHECK_OK(oscar_seq_free(c, b));
        } else {
            CHECK_OK(oscar_seq_free(c, b));
            CHECK_OK(oscar_seq_free(c, a));
        }
        hist_free(&ha);
        hist_free(&hb);
    }
    oscar_cache_destroy(c);
}

/* Sequence ids live in a hash table that is rebuilt as freed ids pile up:
 * 20000 add/free cycles through 8 slots, with a few long-lived sequences,
 * must keep every live id found, every freed id gone and ids unique. */
static void test_id_churn(void) {
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 2, 4);
    cfg.max_seqs = 8;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    tl_rng r = tl_rng_for("id_churn");
    int32_t live[8];
    int n = 0, bad = 0;
    int32_t last = -1;
    for (int it = 0; it < 20000; it++) {
        if (n < 8 && (n < 3 || tl_randint(&r, 0, 1))) {
            int32_t id;
            if (oscar_seq_add(c, &id) != OSCAR_OK) { bad++; continue; }
            bad += id <= last; /* ids grow: never reused */
            last = id;
            live[n++] = id;
        } else {
            const int k = tl_randint(&r, 3 < n ? 3 : 0, n - 1); /* the first 3 live long */
            const int32_t gone = live[k];
            bad += oscar_seq_free(c, gone) != OSCAR_OK;
            live[k] = live[--n];
            oscar_seq_info info;
            bad += oscar_seq_info_get(c, gone, 0, &info) != OSCAR_E_NOT_FOUND;
        }
        if (it % 97 == 0)
            for (int i = 0; i < n; i++) {
                oscar_seq_info info;
                bad += oscar_seq_info_get(c, live[i], 0, &info) != OSCAR_OK;
            }
    }
    oscar_memory_stats m;
    CHECK_OK(oscar_memory(c, &m));
    CHECK(m.seqs_live == n);
    CHECKF(bad == 0, "id churn: %d lookups or ids wrong", bad);
    oscar_cache_destroy(c);
}

int main(void) {
    printf("oscar %s, test_paged\n", oscar_version());
    TL_RUN(test_id_churn);
    TL_RUN(test_many_sequences);
    TL_RUN(test_fork);
    TL_RUN(test_fork_unequal_layers);
    TL_RUN(test_block_table_and_stats);
    TL_RUN(test_pool_reuse);
    return tl_finish();
}
