/*
 * test_tp.c - tensor parallelism on the CPU backend: two shards of 4 KV
 * heads each against one cache holding all 8.
 *
 * Omni-Token Scaling divides each key by its norm over ALL KV heads. Each
 * shard computes its heads' sums of squares (oscar_key_sumsq), the test
 * "all-gathers" them in head order (what NCCL or torch.distributed would
 * do), and both shards append with the gathered sums
 * (oscar_append_with_key_sums). Then, from the export streams:
 *  - every packed block's codes and parameters of shard r's heads are the
 *    bytes of heads 4r..4r+3 of the single cache, and the token norms are
 *    the same bits;
 *  - the windows and their sums of squares are the same bits;
 *  - attention of shard r equals the single cache's query heads 8r..8r+7
 *    (to float rounding: the CPU splits work by the number of heads).
 * The per-shard alternative (no gathered sums: norms over the local heads)
 * gives different norms, and is measured against float64 attention.
 * The batch API takes the same sums (oscar_batch.key_head_sumsq) and is
 * checked to give the same attention as the sequence API.
 */
#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { HKV = 8, HQ = 16, D = 64, LAYERS = 2, R = 32, SHARDS = 2, LH = HKV / SHARDS, LQ = HQ / SHARDS };

static oscar_config cfg_for(int hkv, int hq, int caller) {
    oscar_config c = tl_small_config(OSCAR_METHOD_OSCAR, 2, D, hkv, hq);
    c.num_layers = LAYERS;
    c.residual = R;
    c.k_group = 16;
    c.v_group = 16;
    c.window_dtype = OSCAR_DTYPE_BF16;
    c.block_count = 32;
    c.caller_metadata = caller;
    return c;
}

/* Rows [n][HKV][D] -> shard r's [n][LH][D]. */
static void shard_rows(const uint16_t *full, int64_t n, int r, uint16_t *out) {
    for (int64_t t = 0; t < n; t++)
        memcpy(out + (size_t)t * LH * D, full + ((size_t)t * HKV + (size_t)r * LH) * D, sizeof(uint16_t) * LH * D);
}

typedef struct parsed {
    uint32_t nb;
    uint64_t tokens[LAYERS], packed[LAYERS];
    const unsigned char *blocks, *win[LAYERS];
} parsed;

static int parse(const unsigned char *b, size_t n, int hkv, size_t LB, parsed *p) {
    memset(p, 0, sizeof *p);
    /* format version 5 (4's layout): an 80-byte header, value bits at 64, all-head norms (0) at 68 */
    if (!CHECKF(n > 80 + 16 * LAYERS && tl_rd32(b + 8) == 5 && tl_rd32(b + 60) == 0 && tl_rd32(b + 24) == (uint32_t)hkv &&
                    tl_rd32(b + 64) == 2 && tl_rd32(b + 68) == 0,
                "stream header"))
        return 0;
    p->nb = tl_rd32(b + 52);
    size_t off = 80;
    for (int l = 0; l < LAYERS; l++, off += 16) p->tokens[l] = tl_rd64(b + off), p->packed[l] = tl_rd64(b + off + 8);
    p->blocks = b + off;
    off += (size_t)p->nb * LAYERS * LB;
    for (int l = 0; l < LAYERS; l++) {
        p->win[l] = b + off;
        const size_t wn = (size_t)(p->tokens[l] - p->packed[l] * R);
        off += 2 * wn * (size_t)hkv * D * 2 + 4 * wn;
    }
    return CHECKF(off + 8 == n, "stream size %zu, parsed %zu", n, off + 8);
}

static void test_shards_equal_single(void) {
    tl_rng r = tl_rng_for("tp_shards");
    oscar_config cf = cfg_for(HKV, HQ, 0), cs = cfg_for(LH, LQ, 0);
    oscar_cache *full = tl_create(&cf), *sh[SHARDS], *own[SHARDS];
    for (int i = 0; i < SHARDS; i++) sh[i] = tl_create(&cs), own[i] = tl_create(&cs);
    if (!full || !sh[0] || !sh[1] || !own[0] || !own[1]) return;
    int32_t sf, ss[SHARDS], so[SHARDS];
    CHECK_OK(oscar_seq_add(full, &sf));
    for (int i = 0; i < SHARDS; i++) CHECK_OK(oscar_seq_add(sh[i], &ss[i])), CHECK_OK(oscar_seq_add(own[i], &so[i]));
    const int steps[] = {50, 1, 1, 1, 13, 1, 37, 1, 1, 64, 1, 5};
    const int nsteps = (int)(sizeof steps / sizeof steps[0]);
    int64_t total = 0;
    for (int i = 0; i < nsteps; i++) total += steps[i];
    const size_t row = (size_t)HKV * D;
    float *k = malloc(sizeof(float) * total * row), *v = malloc(sizeof(float) * total * row);
    uint16_t *kh = malloc(2 * total * row), *vh = malloc(2 * total * row);
    uint16_t *kr = malloc(2 * total * row), *vr = malloc(2 * total * row);
    float *part = malloc(sizeof(float) * total * LH), *gathered = malloc(sizeof(float) * total * HKV);
    int64_t at = 0;
    for (int s = 0; s < nsteps; s++) {
        const int n = steps[s];
        tl_gen_kv(&r, s % 3 == 0 ? 1 : s % 3 == 1 ? 2 : 0, k, v, n, HKV, D, OSCAR_DTYPE_BF16);
        tl_encode(k, OSCAR_DTYPE_BF16, kh, n * (int64_t)row);
        tl_encode(v, OSCAR_DTYPE_BF16, vh, n * (int64_t)row);
        int32_t nt = n;
        for (int l = 0; l < LAYERS; l++) {
            CHECK_OK(oscar_append(full, l, 1, &sf, &nt, kh, vh, OSCAR_DTYPE_BF16, NULL));
            /* phase 1 on every shard, then the all-gather in head order */
            for (int i = 0; i < SHARDS; i++) {
                shard_rows(kh, n, i, kr);
                CHECK_OK(oscar_key_sumsq(sh[i], n, kr, OSCAR_DTYPE_BF16, part, NULL));
                for (int t = 0; t < n; t++)
                    memcpy(gathered + (size_t)t * HKV + (size_t)i * LH, part + (size_t)t * LH, sizeof(float) * LH);
            }
            for (int i = 0; i < SHARDS; i++) {
                shard_rows(kh, n, i, kr);
                shard_rows(vh, n, i, vr);
                CHECK_OK(oscar_append_with_key_sums(sh[i], l, 1, &ss[i], &nt, kr, vr, OSCAR_DTYPE_BF16, gathered,
                                                    HKV, NULL));
                CHECK_OK(oscar_append(own[i], l, 1, &so[i], &nt, kr, vr, OSCAR_DTYPE_BF16, NULL));
            }
        }
        at += n;
    }
    /* byte-level comparison of the streams */
    size_t nf = 0, ns[SHARDS] = {0};
    unsigned char *ef = tl_export(full, sf, &nf), *es[SHARDS];
    for (int i = 0; i < SHARDS; i++) es[i] = tl_export(sh[i], ss[i], &ns[i]);
    oscar_memory_stats mf, ms;
    CHECK_OK(oscar_memory(full, &mf));
    CHECK_OK(oscar_memory(sh[0], &ms));
    const size_t LBf = (size_t)(mf.block_bytes / LAYERS), LBs = (size_t)(ms.block_bytes / LAYERS);
    const size_t norms = (size_t)R * 4, head = (LBs - norms) / LH;
    CHECK(LBf - norms == HKV * head);
    parsed pf, ps[SHARDS];
    if (ef && es[0] && es[1] && parse(ef, nf, HKV, LBf, &pf) && parse(es[0], ns[0], LH, LBs, &ps[0]) &&
        parse(es[1], ns[1], LH, LBs, &ps[1])) {
        int64_t head_bad = 0, norm_bad = 0, win_bad = 0, ss_bad = 0, blocks = 0;
        for (int i = 0; i < SHARDS; i++) {
            CHECK(ps[i].nb == pf.nb);
            for (uint32_t b = 0; b < pf.nb; b++)
                for (int l = 0; l < LAYERS; l++) {
                    if (pf.packed[l] <= b) continue;
                    const unsigned char *F = pf.blocks + ((size_t)b * LAYERS + l) * LBf;
                    const unsigned char *S = ps[i].blocks + ((size_t)b * LAYERS + l) * LBs;
                    for (int h = 0; h < LH; h++)
                        head_bad += memcmp(S + (size_t)h * head, F + (size_t)(i * LH + h) * head, head) != 0;
                    norm_bad += memcmp(S + LH * head, F + HKV * head, norms) != 0;
                    blocks++;
                }
            for (int l = 0; l < LAYERS; l++) {
                const size_t wn = (size_t)(pf.tokens[l] - pf.packed[l] * R);
                CHECK(ps[i].tokens[l] == pf.tokens[l] && ps[i].packed[l] == pf.packed[l]);
                for (int kv = 0; kv < 2; kv++)
                    for (size_t t = 0; t < wn; t++)
                        win_bad += memcmp(ps[i].win[l] + (kv * wn + t) * LH * D * 2,
                                          pf.win[l] + ((kv * wn + t) * HKV + (size_t)i * LH) * D * 2, LH * D * 2) != 0;
                ss_bad += memcmp(ps[i].win[l] + 2 * wn * LH * D * 2, pf.win[l] + 2 * wn * HKV * D * 2, 4 * wn) != 0;
            }
        }
        printf("   %lld shard blocks: %lld heads differ, %lld norm arrays differ; windows: %lld rows, %lld sums "
               "differ\n",
               (long long)blocks, (long long)head_bad, (long long)norm_bad, (long long)win_bad, (long long)ss_bad);
        CHECK(blocks > 0);
        CHECK(head_bad == 0 && norm_bad == 0 && win_bad == 0 && ss_bad == 0);
    }
    /* attention: shard r's query heads are the single cache's 8r..8r+7 */
    float *q = malloc(sizeof(float) * HQ * D), *of = malloc(sizeof(float) * HQ * D);
    float *os = malloc(sizeof(float) * LQ * D), *oo = malloc(sizeof(float) * LQ * D);
    tl_fill_normal(&r, q, HQ * D, 0.3);
    double worst = 0, worst_own = 0;
    for (int l = 0; l < LAYERS; l++) {
        CHECK_OK(tl_attention(full, l, 1, &sf, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, of, HQ, D));
        for (int i = 0; i < SHARDS; i++) {
            CHECK_OK(tl_attention(sh[i], l, 1, &ss[i], 1, q + (size_t)i * LQ * D, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32,
                                  0.0f, os, LQ, D));
            CHECK_OK(tl_attention(own[i], l, 1, &so[i], 1, q + (size_t)i * LQ * D, OSCAR_DTYPE_F32,
                                  OSCAR_DTYPE_F32, 0.0f, oo, LQ, D));
            double num = 0, den = 0, numo = 0;
            for (int j = 0; j < LQ * D; j++) {
                const double ref = of[(size_t)i * LQ * D + j];
                num += (os[j] - ref) * (os[j] - ref);
                numo += (oo[j] - ref) * (oo[j] - ref);
                den += ref * ref;
            }
            const double e = sqrt(num / den), eo = sqrt(numo / den);
            if (e > worst) worst = e;
            if (eo > worst_own) worst_own = eo;
        }
    }
    printf("   attention, shards with gathered norms vs one cache: rel err %.2e; shards with local norms: %.2e\n",
           worst, worst_own);
    CHECKF(worst < 1e-6, "tensor-parallel shards attend differently from the single cache: %.3g", worst);
    CHECKF(worst_own > worst, "local-only norms should change the cache (%.3g vs %.3g)", worst_own, worst);
    free(q), free(of), free(os), free(oo);
    free(ef), free(es[0]), free(es[1]);
    free(k), free(v), free(kh), free(vh), free(kr), free(vr), free(part), free(gathered);
    oscar_cache_destroy(full);
    for (int i = 0; i < SHARDS; i++) oscar_cache_destroy(sh[i]), oscar_cache_destroy(own[i]);
}

/* The batch API with key_head_sumsq gives the sequence API's attention. */
static void test_batch_tp(void) {
    tl_rng r = tl_rng_for("tp_batch");
    oscar_config cs = cfg_for(LH, LQ, 0), cb = cfg_for(LH, LQ, 1);
    oscar_cache *a = tl_create(&cs), *b = tl_create(&cb);
    if (!a || !b) return;
    int32_t sa;
    CHECK_OK(oscar_seq_add(a, &sa));
    int32_t table[32], slot = 3, len = 0;
    for (int i = 0; i < 32; i++) table[i] = (i * 7) % 32;
    const size_t row = (size_t)LH * D;
    float *k = malloc(sizeof(float) * 80 * row), *v = malloc(sizeof(float) * 80 * row);
    float *sums = malloc(sizeof(float) * 80 * HKV), *q = malloc(sizeof(float) * LQ * D);
    float *oa = malloc(sizeof(float) * LQ * D), *ob = malloc(sizeof(float) * LQ * D);
    int mismatches = 0, calls = 0;
    for (int step = 0; step < 30; step++) {
        const int n = step == 0 ? 70 : 1;
        tl_gen_kv(&r, 1, k, v, n, LH, D, OSCAR_DTYPE_F32);
        /* any gathered sums will do: they only have to be the same for both */
        for (int i = 0; i < n * HKV; i++) sums[i] = (float)(0.5 + tl_uniform(&r) * 200.0);
        len += n;
        int32_t nt = n;
        oscar_batch bt = {1, n, 200, 32, &len, &slot, table, sums, HKV};
        for (int l = 0; l < LAYERS; l++) {
            CHECK_OK(oscar_append_with_key_sums(a, l, 1, &sa, &nt, k, v, OSCAR_DTYPE_F32, sums, HKV, NULL));
            CHECK_OK(oscar_batch_append(b, l, &bt, k, v, OSCAR_DTYPE_F32, NULL));
            tl_fill_normal(&r, q, LQ * D, 0.3);
            CHECK_OK(tl_attention(a, l, 1, &sa, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oa, LQ, D));
            oscar_batch bq = {1, 1, 200, 32, &len, &slot, table, NULL, 0};
            tl_poison(ob, LQ * D);
            CHECK_OK(oscar_batch_attention(b, l, &bq, q, OSCAR_DTYPE_F32, ob, OSCAR_DTYPE_F32, 0.0f, NULL));
            mismatches += memcmp(oa, ob, sizeof(float) * LQ * D) != 0;
            calls++;
        }
    }
    CHECKF(mismatches == 0, "batch API with gathered sums differs from the sequence API in %d of %d calls",
           mismatches, calls);
    /* bad key_heads_total */
    oscar_batch bad = {1, 1, 200, 32, &len, &slot, table, sums, LH - 1};
    len++;
    CHECK_ST(b, oscar_batch_append(b, 0, &bad, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    bad.key_head_sumsq = NULL;
    bad.key_heads_total = HKV;
    CHECK_ST(b, oscar_batch_append(b, 0, &bad, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    int32_t nt1 = 1;
    CHECK_ST(a, oscar_append_with_key_sums(a, 0, 1, &sa, &nt1, k, v, OSCAR_DTYPE_F32, sums, 0, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(a, oscar_key_sumsq(a, -1, k, OSCAR_DTYPE_F32, sums, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(a, oscar_key_sumsq(a, 1, NULL, OSCAR_DTYPE_F32, sums, NULL), OSCAR_E_INVALID_ARGUMENT);
    free(k), free(v), free(sums), free(q), free(oa), free(ob);
    oscar_cache_destroy(a);
    oscar_cache_destroy(b);
}

int main(void) {
    printf("oscar %s, test_tp\n", oscar_version());
    TL_RUN(test_shards_equal_single);
    TL_RUN(test_batch_tp);
    return tl_finish();
}
