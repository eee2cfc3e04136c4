/*
 * test_properties.c - properties that hold whatever the data:
 *  - per-element error bound |x - x^| <= scale/2 + parameter rounding
 *    (through oscar_seq_read, against parameters computed here);
 *  - constant groups and all-zero keys are exact;
 *  - tokens == packed + window after every append;
 *  - attention over the library's own dequantised K/V equals float64
 *    attention over them (1e-5), incl. edge cases of the causal mask and of
 *    the packed/window boundary; method none with an F32 window is exact;
 *  - prefill, token-by-token and chunked appends give identical bytes;
 *  - input dtypes, output dtypes, softmax_scale, thread counts;
 *  - offline V rotation (rotate_values = 0, oscar_fold_hadamard_*).
 */
#include "testlib.h"

#include <stdlib.h>
#include <string.h>

static const oscar_method QMETHODS[] = {OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT, OSCAR_METHOD_SCALE_ONLY,
                                        OSCAR_METHOD_OSCAR};
static const oscar_method ALLMETHODS[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT,
                                          OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};

/* ---- error bound ------------------------------------------------------------ */

/* Checks |x - x^| against the bound for every packed element of one layer.
 * Returns the number of violations. */
static int64_t check_bound(const tl_geom *g, const tl_ref *ref, const float *lib, int is_v, double *worst_ratio) {
    const int d = g->d, hkv = g->hkv;
    const int64_t row = (int64_t)hkv * d;
    const int rot = is_v ? g->rotv : g->rot;
    int64_t bad = 0;
    double x[256];
    *worst_ratio = 0.0;
    for (int64_t t = 0; t < ref->packed; t++)
        for (int h = 0; h < hkv; h++) {
            int64_t base = t * row + (int64_t)h * d;
            for (int c = 0; c < d; c++) x[c] = lib[base + c];
            if (rot) tl_hadamard_ref(x, x, d);
            double s = is_v ? 1.0 : ref->s[t];
            double nrm = 0.0;
            for (int c = 0; c < d; c++) nrm += x[c] * x[c] / (s * s);
            nrm = sqrt(nrm / d);
            for (int c = 0; c < d; c++) {
                /* the group of this element, its fp32 range, stored params */
                const float *gx;
                int n, stride;
                if (is_v) {
                    int j = c / g->gv;
                    gx = ref->xv + base + j * g->gv;
                    n = g->gv;
                    stride = 1;
                } else {
                    int64_t t0 = (t / g->gk) * g->gk;
                    gx = ref->kq + t0 * row + h * d + c;
                    n = g->gk;
                    stride = (int)row;
                }
                float lo = gx[0], hi = gx[0];
                for (int i = 1; i < n; i++) {
                    float v = gx[(int64_t)i * stride];
                    if (v < lo) lo = v;
                    if (v > hi) hi = v;
                }
                float scale = (hi - lo) / (float)g->Q;
                double sc16 = tl_f16_to_double(tl_f16_from_double(scale));
                double lo16 = tl_f16_to_double(tl_f16_from_double(lo));
                double plo = fabs(lo - lo16), psc = fabs(scale - sc16);
                if (rot) { /* library params may round the other way */
                    double u = 0.5 * tl_ulp(OSCAR_DTYPE_F16, lo);
                    if (plo < u) plo = u;
                    u = 0.5 * tl_ulp(OSCAR_DTYPE_F16, scale);
                    if (psc < u) psc = u;
                }
                double xv = is_v ? ref->xv[base + c] : ref->kq[base + c];
                double bound = sc16 / 2 + plo + g->Q * psc + 1e-5 * nrm + 1e-6 * fabs(xv);
                if (rot && g->W != OSCAR_DTYPE_F32) /* window rounding of fp32 vs float64 rotation */
                    bound += tl_ulp(g->W, fabs(xv) * s) / s + 0.5 * g->Q * tl_ulp(OSCAR_DTYPE_F16, scale);
                double e = fabs(x[c] / s - xv);
                if (!(e <= bound)) bad++;
                double ratio = e / (sc16 / 2 + plo + g->Q * psc + 1e-30);
                if (ratio > *worst_ratio) *worst_ratio = ratio;
            }
        }
    return bad;
}

static void test_error_bound(void) {
    tl_rng r = tl_rng_for("error_bound");
    int idx = 0;
    for (int mi = 0; mi < 4; mi++)
        for (int bits = 2; bits <= 4; bits += 2)
            for (int flavor = 0; flavor < TL_FLAVORS; flavor++, idx++) {
                int d = (idx % 3 == 0) ? 64 : (idx % 3 == 1) ? 128 : 256;
                int hkv = 1 + idx % 3;
                oscar_config cfg = tl_small_config(QMETHODS[mi], bits, d, hkv, hkv * 2);
                cfg.window_dtype = (idx % 4 == 0) ? OSCAR_DTYPE_F32 : (idx % 4 == 1) ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F16;
                cfg.k_group = (idx % 2) ? 16 : 32;
                cfg.residual = 32;
                cfg.v_group = (idx % 5 == 0) ? 64 : 16 * (1 + idx % 2);
                if (cfg.v_group > d) cfg.v_group = 32;
                tl_geom g = tl_geom_of(&cfg);
                oscar_cache *c = tl_create(&cfg);
                if (!c) continue;
                int32_t seq;
                CHECK_OK(oscar_seq_add(c, &seq));
                int64_t T = 2 * cfg.residual + 3, row = (int64_t)hkv * d;
                float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
                tl_gen_kv(&r, flavor, k, v, T, hkv, d, OSCAR_DTYPE_F32);
                CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F32));
                tl_ref ref;
                tl_ref_build(&g, k, v, T, NULL, &ref);
                float *kl, *vl;
                if (tl_read_all(c, seq, 0, hkv, d, &kl, &vl) == T) {
                    double wk, wv;
                    int64_t bk = check_bound(&g, &ref, kl, 0, &wk), bv = check_bound(&g, &ref, vl, 1, &wv);
                    CHECKF(bk == 0 && bv == 0,
                           "%s b=%d d=%d W=%s %s: %lld K and %lld V elements beyond scale/2 + param rounding "
                           "(worst ratio K %.3f V %.3f)",
                           oscar_method_name(cfg.method), bits, d, tl_dtype_name(cfg.window_dtype),
                           tl_flavor_name(flavor), (long long)bk, (long long)bv, wk, wv);
                }
                free(kl);
                free(vl);
                tl_ref_free(&ref);
                free(k);
                free(v);
                oscar_cache_destroy(c);
            }
}

/* ---- exact cases -------------------------------------------------------------- */

static void test_constant_groups_exact(void) {
    tl_rng r = tl_rng_for("constant_groups_exact");
    for (int bits = 2; bits <= 4; bits += 2)
        for (int wi = 0; wi < 2; wi++) {
            oscar_config cfg = tl_small_config(OSCAR_METHOD_KIVI, bits, 64, 2, 4);
            cfg.window_dtype = wi ? OSCAR_DTYPE_F32 : OSCAR_DTYPE_F16;
            oscar_cache *c = tl_create(&cfg);
            if (!c) continue;
            int32_t seq;
            CHECK_OK(oscar_seq_add(c, &seq));
            const int d = 64, hkv = 2;
            const int64_t T = 2 * cfg.residual + 5, row = hkv * d;
            float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
            float kc[128];
            for (int i = 0; i < row; i++) kc[i] = (float)tl_round_dtype(OSCAR_DTYPE_F16, 3.0 * tl_normal(&r));
            kc[5] = 0.0f;
            kc[6] = 65504.0f;
            kc[7] = -65504.0f;
            kc[8] = 6e-8f; /* an fp16 subnormal */
            kc[8] = (float)tl_round_dtype(OSCAR_DTYPE_F16, kc[8]);
            for (int64_t t = 0; t < T; t++)
                for (int h = 0; h < hkv; h++) {
                    for (int c2 = 0; c2 < d; c2++) k[t * row + h * d + c2] = kc[h * d + c2];
                    for (int j = 0; j < d / 32; j++) {
                        float val = (float)tl_round_dtype(OSCAR_DTYPE_F16, 100.0 * tl_normal(&r));
                        if ((t + j) % 7 == 0) val = 0.0f;
                        for (int c2 = 0; c2 < 32; c2++) v[t * row + h * d + j * 32 + c2] = val;
                    }
                }
            CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F16));
            float *kl, *vl;
            if (tl_read_all(c, seq, 0, hkv, d, &kl, &vl) == T) {
                int64_t bk = 0, bv = 0;
                for (int64_t i = 0; i < T * row; i++) {
                    if (kl[i] != k[i]) bk++;
                    if (vl[i] != v[i]) bv++;
                }
                CHECKF(bk == 0 && bv == 0, "kivi b=%d W=%s: constant groups not exact (%lld K, %lld V elements)",
                       bits, tl_dtype_name(cfg.window_dtype), (long long)bk, (long long)bv);
            }
            free(kl);
            free(vl);
            free(k);
            free(v);
            oscar_cache_destroy(c);
        }
}

static void test_zero_keys(void) {
    tl_rng r = tl_rng_for("zero_keys");
    for (int mi = 0; mi < 4; mi++) {
        oscar_config cfg = tl_small_config(QMETHODS[mi], 2, 128, 2, 8);
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        int32_t seq;
        CHECK_OK(oscar_seq_add(c, &seq));
        const int d = 128, hkv = 2, hq = 8;
        const int64_t T = cfg.residual + 10, row = hkv * d;
        float *k = calloc((size_t)(T * row), sizeof(float)), *v = malloc(sizeof(float) * (size_t)(T * row));
        tl_fill_normal(&r, v, T * row, 1.0);
        tl_round_array(OSCAR_DTYPE_F16, v, T * row);
        CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F32));
        float *kl, *vl;
        if (tl_read_all(c, seq, 0, hkv, d, &kl, &vl) == T) {
            int64_t nz = 0;
            for (int64_t i = 0; i < T * row; i++)
                if (kl[i] != 0.0f) nz++;
            CHECKF(nz == 0, "%s: all-zero keys read back with %lld non-zero elements", oscar_method_name(cfg.method),
                   (long long)nz);
            /* all logits are 0: the output is the mean of the values */
            float q[8 * 128], o[8 * 128];
            double want[8 * 128];
            tl_fill_normal(&r, q, hq * d, 1.0);
            CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, hq, d));
            for (int j = 0; j < hq; j++)
                for (int c2 = 0; c2 < d; c2++) {
                    double acc = 0.0;
                    for (int64_t t = 0; t < T; t++) acc += vl[t * row + (j / 4) * d + c2];
                    want[j * d + c2] = acc / (double)T;
                }
            double w;
            int64_t bad = tl_compare_out(o, want, NULL, hq, d, OSCAR_DTYPE_F32, 1e-5, &w);
            CHECKF(bad == 0, "%s: zero keys, attention is not the mean of V (worst %.3g)",
                   oscar_method_name(cfg.method), w);
        }
        free(kl);
        free(vl);
        free(k);
        free(v);
        oscar_cache_destroy(c);
    }
}

/* ---- counts ----------------------------------------------------------------------- */

static void test_token_counts(void) {
    tl_rng r = tl_rng_for("token_counts");
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 1, 1);
    cfg.num_layers = 3;
    cfg.residual = 32;
    cfg.block_count = 64;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    int64_t tokens[3] = {0, 0, 0};
    /* an empty sequence */
    for (int l = 0; l < 3; l++) {
        oscar_seq_info info;
        memset(&info, 0x55, sizeof info);
        CHECK_OK(oscar_seq_info_get(c, seq, l, &info));
        CHECK(info.tokens == 0 && info.packed_tokens == 0 && info.window_tokens == 0 && info.blocks == 0);
        CHECK_OK(oscar_seq_read(c, seq, l, 0, 0, NULL, NULL));
    }
    float *k = malloc(sizeof(float) * 100 * 64), *v = malloc(sizeof(float) * 100 * 64);
    tl_fill_normal(&r, k, 100 * 64, 1.0);
    tl_fill_normal(&r, v, 100 * 64, 1.0);
    for (int step = 0; step < 60; step++) {
        int layer = tl_randint(&r, 0, 2);
        int n = tl_randint(&r, 0, step % 10 == 0 ? 100 : 20);
        if (!CHECK_OK(tl_append(c, layer, seq, k, v, n, 1, 64, OSCAR_DTYPE_F32))) break;
        tokens[layer] += n;
        int64_t maxblocks = 0;
        for (int l = 0; l < 3; l++) {
            oscar_seq_info info;
            CHECK_OK(oscar_seq_info_get(c, seq, l, &info));
            CHECKF(info.tokens == tokens[l] && info.packed_tokens + info.window_tokens == info.tokens &&
                       info.packed_tokens % 32 == 0 && info.window_tokens < 32 && info.window_tokens >= 0,
                   "layer %d: tokens %lld (expected %lld) packed %lld window %d", l, (long long)info.tokens,
                   (long long)tokens[l], (long long)info.packed_tokens, info.window_tokens);
            if (tokens[l] / 32 > maxblocks) maxblocks = tokens[l] / 32;
            CHECKF(info.blocks == maxblocks || l < 2, "blocks %d, expected max over layers %lld", info.blocks,
                   (long long)maxblocks);
        }
        int32_t table[64], count = -1;
        CHECK_OK(oscar_seq_block_table(c, seq, table, 64, &count));
        CHECKF(count == maxblocks, "block table has %d entries, expected %lld", count, (long long)maxblocks);
    }
    free(k);
    free(v);
    oscar_cache_destroy(c);
}

/* ---- attention kernel ----------------------------------------------------------- */

/* Attention over the library's own dequantised data (oscar_seq_read) in
 * float64 must match the library's attention to 1e-5. */
static int attention_matches_readback(oscar_cache *c, int32_t seq, int layer, const tl_geom *g, int q_len,
                                      oscar_dtype qdt, oscar_dtype odt, tl_rng *r, const char *what) {
    float *kl, *vl;
    int64_t T = tl_read_all(c, seq, layer, g->hkv, g->d, &kl, &vl);
    int ok = 1;
    if (T >= q_len && T > 0) {
        int64_t nq = (int64_t)q_len * g->hq * g->d;
        float *q = malloc(sizeof(float) * (size_t)nq), *o = malloc(sizeof(float) * (size_t)nq);
        double *want = malloc(sizeof(double) * (size_t)nq), *mag = malloc(sizeof(double) * (size_t)(q_len * g->hq));
        tl_gen_q(r, q, q_len, g->hq, g->d, tl_key_rms_norm(kl, T, g->hkv, g->d), 2.5, qdt);
        CHECK_OK(tl_attention(c, layer, 1, &seq, q_len, q, qdt, odt, 0.0f, o, g->hq, g->d));
        tl_ref_attention_f(g->d, g->hkv, g->hq, kl, vl, T, q_len, q, 1.0 / sqrt((double)g->d), want, mag);
        double w;
        int64_t bad = tl_compare_out(o, want, mag, (int64_t)q_len * g->hq, g->d, odt, 1e-5, &w);
        ok = CHECKF(bad == 0, "%s: T=%lld q_len=%d: %lld output elements differ (worst %.3g)", what, (long long)T,
                    q_len, (long long)bad, w);
        free(q);
        free(o);
        free(want);
        free(mag);
    }
    free(kl);
    free(vl);
    return ok;
}

static void test_attention_edges(void) {
    tl_rng r = tl_rng_for("attention_edges");
    static const int ratios[] = {1, 2, 4, 8};
    int idx = 0;
    for (int mi = 0; mi < 5; mi++)
        for (int ri = 0; ri < 4; ri++, idx++) {
            int hkv = 1 + (idx % 4), d = (idx % 3 == 0) ? 128 : 64;
            oscar_config cfg = tl_small_config(ALLMETHODS[mi], idx % 2 ? 4 : 2, d, hkv, hkv * ratios[ri]);
            cfg.residual = 32;
            cfg.window_dtype = (oscar_dtype)(idx % 3);
            tl_geom g = tl_geom_of(&cfg);
            oscar_cache *c = tl_create(&cfg);
            if (!c) continue;
            char what[128];
            snprintf(what, sizeof what, "%s b=%d d=%d Hkv=%d Hq=%d W=%s", oscar_method_name(cfg.method), cfg.bits, d,
                     hkv, cfg.num_q_heads, tl_dtype_name(cfg.window_dtype));
            int32_t seq;
            CHECK_OK(oscar_seq_add(c, &seq));
            int64_t row = (int64_t)hkv * d;
            float *k = malloc(sizeof(float) * (size_t)(100 * row)), *v = malloc(sizeof(float) * (size_t)(100 * row));
            tl_gen_kv(&r, idx % TL_FLAVORS == TL_FLAVOR_HUGE ? 0 : idx % TL_FLAVORS, k, v, 100, hkv, d,
                      OSCAR_DTYPE_F32);
            /* grow the sequence through the interesting lengths */
            static const int64_t lens[] = {1, 2, 8, 31, 32, 34, 64, 70, 96, 100};
            int64_t have = 0;
            for (int li = 0; li < 10; li++) {
                int64_t n = lens[li] - have;
                CHECK_OK(tl_append(c, 0, seq, k + have * row, v + have * row, n, hkv, d, OSCAR_DTYPE_F32));
                have = lens[li];
                int qls[4] = {1, 3, 8, (int)have};
                for (int qi = 0; qi < 4; qi++) {
                    if (qls[qi] > have || (qi == 3 && have > 40)) continue;
                    oscar_dtype odt = (oscar_dtype)((li + qi) % 3), qdt = (oscar_dtype)((li + 2 * qi) % 3);
                    attention_matches_readback(c, seq, 0, &g, qls[qi], qdt, odt, &r, what);
                }
            }
            free(k);
            free(v);
            oscar_cache_destroy(c);
        }
}

/* The 1e-5 criterion at a longer context: 64 blocks in one sequence. */
static void test_long_context_accuracy(void) {
    tl_rng r = tl_rng_for("long_context_accuracy");
    static const oscar_method ms[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_OSCAR};
    const int d = 128, hkv = 4, hq = 16;
    const int64_t T = 64 * 64 + 17, row = (int64_t)hkv * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, T, hkv, d, OSCAR_DTYPE_F32);
    float q[16 * 128], o[16 * 128];
    double want[16 * 128], mag[16];
    tl_gen_q(&r, q, 1, hq, d, tl_key_rms_norm(k, T, hkv, d), 2.0, OSCAR_DTYPE_F32);
    for (int mi = 0; mi < 3; mi++) {
        oscar_config cfg = tl_small_config(ms[mi], 2, d, hkv, hq);
        cfg.residual = 64;
        cfg.block_count = 80;
        cfg.window_dtype = OSCAR_DTYPE_F32;
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        int32_t seq;
        CHECK_OK(oscar_seq_add(c, &seq));
        CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F32));
        float *kl, *vl;
        if (tl_read_all(c, seq, 0, hkv, d, &kl, &vl) == T) {
            CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, hq, d));
            tl_ref_attention_f(d, hkv, hq, kl, vl, T, 1, q, 1.0 / sqrt((double)d), want, mag);
            double w = 0, wmax = 0;
            int64_t bad = tl_compare_out(o, want, mag, hq, d, OSCAR_DTYPE_F32, 1e-5, &w);
            tl_compare_out(o, want, NULL, hq, d, OSCAR_DTYPE_F32, 1e-5, &wmax);
            printf("   %s, T=%lld: attention error vs float64 over its own K/V: %.3g of sum p|v|, %.3g of max|o|\n",
                   oscar_method_name(cfg.method), (long long)T, w, wmax);
            CHECKF(bad == 0, "%s T=%lld: attention over the library's own K/V is off by %.3g of sum p|v| (> 1e-5)",
                   oscar_method_name(cfg.method), (long long)T, w);
        }
        free(kl);
        free(vl);
        oscar_cache_destroy(c);
    }
    free(k);
    free(v);
}

static void test_method_none_exact(void) {
    tl_rng r = tl_rng_for("method_none_exact");
    for (int wi = 0; wi < 3; wi++) {
        oscar_dtype W = (oscar_dtype)wi;
        oscar_config cfg = tl_small_config(OSCAR_METHOD_NONE, 2, 128, 2, 8);
        cfg.window_dtype = W;
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        int32_t seq;
        CHECK_OK(oscar_seq_add(c, &seq));
        const int d = 128, hkv = 2, hq = 8, q_len = 4;
        const int64_t T = 2 * cfg.residual + 21, row = hkv * d;
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k, v, T, hkv, d, OSCAR_DTYPE_F32);
        CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F32));
        float *kw = malloc(sizeof(float) * (size_t)(T * row)), *vw = malloc(sizeof(float) * (size_t)(T * row));
        memcpy(kw, k, sizeof(float) * (size_t)(T * row));
        memcpy(vw, v, sizeof(float) * (size_t)(T * row));
        tl_round_array(W, kw, T * row);
        tl_round_array(W, vw, T * row);
        float *kl, *vl;
        if (tl_read_all(c, seq, 0, hkv, d, &kl, &vl) == T) {
            CHECKF(memcmp(kl, kw, sizeof(float) * (size_t)(T * row)) == 0 &&
                       memcmp(vl, vw, sizeof(float) * (size_t)(T * row)) == 0,
                   "method none W=%s: read-back is not the inputs rounded to W", tl_dtype_name(W));
        }
        float q[4 * 8 * 128], o[4 * 8 * 128];
        double want[4 * 8 * 128], mag[4 * 8];
        tl_gen_q(&r, q, q_len, hq, d, tl_key_rms_norm(k, T, hkv, d), 3.0, OSCAR_DTYPE_F32);
        CHECK_OK(tl_attention(c, 0, 1, &seq, q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, hq, d));
        tl_ref_attention_f(d, hkv, hq, kw, vw, T, q_len, q, 1.0 / sqrt((double)d), want, mag);
        double w;
        int64_t bad = tl_compare_out(o, want, mag, q_len * hq, d, OSCAR_DTYPE_F32, 1e-5, &w);
        CHECKF(bad == 0, "method none W=%s: attention differs from exact float64 (%lld elements, worst %.3g)",
               tl_dtype_name(W), (long long)bad, w);
        free(kl);
        free(vl);
        free(k);
        free(v);
        free(kw);
        free(vw);
        oscar_cache_destroy(c);
    }
}

/* ---- append granularity ---------------------------------------------------------- */

static void test_prefill_vs_tokenwise(void) {
    tl_rng r = tl_rng_for("prefill_vs_tokenwise");
    for (int mi = 0; mi < 5; mi++) {
        oscar_config cfg = tl_small_config(ALLMETHODS[mi], mi % 2 ? 4 : 2, 64, 2, 4);
        cfg.num_layers = 2;
        cfg.residual = 32;
        cfg.k_group = 16;
        cfg.window_dtype = mi == 4 ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F16;
        oscar_cache *a = tl_create(&cfg), *b = tl_create(&cfg), *cc = tl_create(&cfg);
        if (!a || !b || !cc) {
            oscar_cache_destroy(a);
            oscar_cache_destroy(b);
            oscar_cache_destroy(cc);
            continue;
        }
        int32_t sa, sb, sc;
        CHECK_OK(oscar_seq_add(a, &sa));
        CHECK_OK(oscar_seq_add(b, &sb));
        CHECK_OK(oscar_seq_add(cc, &sc));
        const int d = 64, hkv = 2, hq = 4;
        const int64_t T = 3 * 32 + 7, row = hkv * d;
        for (int layer = 0; layer < 2; layer++) {
            float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
            tl_gen_kv(&r, layer ? TL_FLAVOR_SINKS : TL_FLAVOR_OUTLIERS, k, v, T, hkv, d, OSCAR_DTYPE_BF16);
            CHECK_OK(tl_append(a, layer, sa, k, v, T, hkv, d, OSCAR_DTYPE_BF16));
            for (int64_t t = 0; t < T; t++)
                CHECK_OK(tl_append(b, layer, sb, k + t * row, v + t * row, 1, hkv, d, OSCAR_DTYPE_BF16));
            for (int64_t t = 0; t < T;) {
                int64_t n = tl_randint(&r, 0, 45);
                if (n > T - t) n = T - t;
                CHECK_OK(tl_append(cc, layer, sc, k + t * row, v + t * row, n, hkv, d, OSCAR_DTYPE_BF16));
                t += n;
            }
            free(k);
            free(v);
        }
        CHECKF(tl_same_export(a, sa, b, sb), "%s: prefill and token-by-token appends export different bytes",
               oscar_method_name(cfg.method));
        CHECKF(tl_same_export(a, sa, cc, sc), "%s: prefill and chunked appends export different bytes",
               oscar_method_name(cfg.method));
        for (int layer = 0; layer < 2; layer++) {
            float q[3 * 4 * 64], oa[3 * 4 * 64], ob[3 * 4 * 64];
            double da[3 * 4 * 64];
            tl_fill_normal(&r, q, 3 * hq * d, 0.5);
            CHECK_OK(tl_attention(a, layer, 1, &sa, 3, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oa, hq, d));
            CHECK_OK(tl_attention(b, layer, 1, &sb, 3, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, ob, hq, d));
            for (int i = 0; i < 3 * hq * d; i++) da[i] = oa[i];
            CHECKF(tl_compare_out(ob, da, NULL, 3 * hq, d, OSCAR_DTYPE_F32, 1e-6, NULL) == 0,
                   "%s layer %d: prefill and token-by-token attention differ", oscar_method_name(cfg.method), layer);
        }
        oscar_cache_destroy(a);
        oscar_cache_destroy(b);
        oscar_cache_destroy(cc);
    }
}

/* ---- dtypes ------------------------------------------------------------------------ */

static void test_dtype_equivalence(void) {
    tl_rng r = tl_rng_for("dtype_equivalence");
    for (int mi = 0; mi < 5; mi++) {
        oscar_config cfg = tl_small_config(ALLMETHODS[mi], 2, 128, 2, 4);
        cfg.residual = 32;
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        const int d = 128, hkv = 2, hq = 4;
        const int64_t T = 75, row = hkv * d;
        /* values exact in bf16 and in fp16: 8 significant bits, moderate exponents */
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k, v, T, hkv, d, OSCAR_DTYPE_BF16);
        for (int64_t i = 0; i < T * row; i++) {
            if (fabsf(k[i]) < 1e-3f) k[i] = 0.0f;
            if (fabsf(v[i]) < 1e-3f) v[i] = 0.0f;
        }
        int32_t s[3];
        for (int i = 0; i < 3; i++) {
            CHECK_OK(oscar_seq_add(c, &s[i]));
            CHECK_OK(tl_append(c, 0, s[i], k, v, T, hkv, d, (oscar_dtype)i));
        }
        CHECKF(tl_same_export(c, s[0], c, s[1]) && tl_same_export(c, s[0], c, s[2]),
               "%s: the same values appended as f32/f16/bf16 give different caches", oscar_method_name(cfg.method));
        /* queries in any dtype, same values: same output; output dtypes are
         * the f32 output rounded */
        float q[2 * 4 * 128], o32[2 * 4 * 128], ox[2 * 4 * 128];
        double ref[2 * 4 * 128];
        tl_fill_normal(&r, q, 2 * hq * d, 0.3);
        tl_round_array(OSCAR_DTYPE_BF16, q, 2 * hq * d);
        CHECK_OK(tl_attention(c, 0, 1, &s[0], 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o32, hq, d));
        for (int i = 0; i < 2 * hq * d; i++) ref[i] = o32[i];
        for (int qd = 0; qd < 3; qd++)
            for (int od = 0; od < 3; od++) {
                CHECK_OK(tl_attention(c, 0, 1, &s[0], 2, q, (oscar_dtype)qd, (oscar_dtype)od, 0.0f, ox, hq, d));
                int64_t bad = tl_compare_out(ox, ref, NULL, 2 * hq, d, (oscar_dtype)od, 1e-6, NULL);
                CHECKF(bad == 0, "%s: q %s / out %s differs from q f32 / out f32 (%lld elements)",
                       oscar_method_name(cfg.method), tl_dtype_name((oscar_dtype)qd), tl_dtype_name((oscar_dtype)od),
                       (long long)bad);
            }
        free(k);
        free(v);
        oscar_cache_destroy(c);
    }
}

static void test_softmax_scale(void) {
    tl_rng r = tl_rng_for("softmax_scale");
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 1, 2);
    tl_geom g = tl_geom_of(&cfg);
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    const int64_t T = 90, row = 64;
    float k[90 * 64], v[90 * 64], q[2 * 64], o1[2 * 64], o2[2 * 64], o3[2 * 64];
    double d1[2 * 64], want[2 * 64], mag[2];
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, T, 1, 64, OSCAR_DTYPE_F32);
    CHECK_OK(tl_append(c, 0, seq, k, v, T, 1, 64, OSCAR_DTYPE_F32));
    (void)row;
    tl_fill_normal(&r, q, 2 * 64, 0.2);
    CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o1, 2, 64));
    CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, -3.0f, o2, 2, 64));
    CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.125f, o3, 2, 64));
    for (int i = 0; i < 128; i++) d1[i] = o1[i];
    CHECK(tl_compare_out(o2, d1, NULL, 2, 64, OSCAR_DTYPE_F32, 1e-7, NULL) == 0);
    CHECK(tl_compare_out(o3, d1, NULL, 2, 64, OSCAR_DTYPE_F32, 1e-6, NULL) == 0);
    /* another scale against float64 over the read-back data */
    float *kl, *vl;
    if (tl_read_all(c, seq, 0, 1, 64, &kl, &vl) == T) {
        CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.7f, o3, 2, 64));
        tl_ref_attention_f(64, 1, 2, kl, vl, T, 1, q, (double)0.7f, want, mag);
        double w;
        CHECKF(tl_compare_out(o3, want, mag, 2, 64, OSCAR_DTYPE_F32, 1e-5, &w) == 0, "softmax_scale 0.7: worst %.3g", w);
        CHECKF(tl_compare_out(o3, d1, NULL, 2, 64, OSCAR_DTYPE_F32, 1e-3, NULL) > 0, "softmax_scale had no effect");
    }
    free(kl);
    free(vl);
    (void)g;
    oscar_cache_destroy(c);
}

static void test_threads_deterministic(void) {
    tl_rng r = tl_rng_for("threads_deterministic");
    const int d = 128, hkv = 4, hq = 16;
    const int64_t T = 300, row = hkv * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(&r, TL_FLAVOR_SINKS, k, v, T, hkv, d, OSCAR_DTYPE_F16);
    float q[2 * 16 * 128], o[3][2 * 16 * 128];
    tl_gen_q(&r, q, 2, hq, d, tl_key_rms_norm(k, T, hkv, d), 2.0, OSCAR_DTYPE_F32);
    oscar_cache *c[3];
    int32_t s[3];
    for (int i = 0; i < 3; i++) {
        oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, hkv, hq);
        cfg.num_threads = i; /* 0 = one per core */
        cfg.residual = 64;
        c[i] = tl_create(&cfg);
        if (!c[i]) return;
        CHECK_OK(oscar_seq_add(c[i], &s[i]));
        CHECK_OK(tl_append(c[i], 0, s[i], k, v, T, hkv, d, OSCAR_DTYPE_F16));
        CHECK_OK(tl_attention(c[i], 0, 1, &s[i], 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o[i], hq, d));
    }
    CHECKF(tl_same_export(c[0], s[0], c[1], s[1]) && tl_same_export(c[0], s[0], c[2], s[2]),
           "num_threads 0/1/2 give different blocks");
    /* the work split may depend on the thread count: outputs agree to fp32
     * rounding (relative to sum p|v|, see tl_ref_attention) */
    double ref[2 * 16 * 128], mag[2 * 16];
    float *kl, *vl;
    if (tl_read_all(c[1], s[1], 0, hkv, d, &kl, &vl) == T)
        tl_ref_attention_f(d, hkv, hq, kl, vl, T, 2, q, 1.0 / sqrt((double)d), ref, mag);
    free(kl);
    free(vl);
    for (int i = 0; i < 2 * hq * d; i++) ref[i] = o[1][i];
    double w0 = 0, w2 = 0;
    /* two results, each within 1e-5 of the exact one */
    int64_t b0 = tl_compare_out(o[0], ref, mag, 2 * hq, d, OSCAR_DTYPE_F32, 2e-5, &w0);
    int64_t b2 = tl_compare_out(o[2], ref, mag, 2 * hq, d, OSCAR_DTYPE_F32, 2e-5, &w2);
    CHECKF(b0 == 0 && b2 == 0, "num_threads 0/1/2: attention outputs differ (worst %.3g, %.3g of sum p|v|)", w0, w2);
    for (int i = 0; i < 3; i++) oscar_cache_destroy(c[i]);
    free(k);
    free(v);
}

/* ---- offline V rotation ------------------------------------------------------------ */

static void test_fold_functions(void) {
    tl_rng r = tl_rng_for("fold_functions");
    const int hkv = 2, hq = 4, d = 64, in = 5, outf = 3;
    float wv[2 * 64 * 5], wv0[2 * 64 * 5], wo[3 * 4 * 64], wo0[3 * 4 * 64];
    tl_fill_normal(&r, wv, hkv * d * in, 1.0);
    tl_fill_normal(&r, wo, outf * hq * d, 1.0);
    memcpy(wv0, wv, sizeof wv);
    memcpy(wo0, wo, sizeof wo);
    CHECK_OK(oscar_fold_hadamard_wv(wv, hkv, d, in));
    CHECK_OK(oscar_fold_hadamard_wo(wo, outf, hq, d));
    double col[64], res[64], worst = 0;
    /* W_v_h <- H W_v_h: each column of a head's [d][in] block is rotated */
    for (int h = 0; h < hkv; h++)
        for (int j = 0; j < in; j++) {
            for (int c = 0; c < d; c++) col[c] = wv0[(h * d + c) * in + j];
            tl_hadamard_ref(col, res, d);
            for (int c = 0; c < d; c++) {
                double e = fabs(wv[(h * d + c) * in + j] - res[c]);
                if (e > worst) worst = e;
            }
        }
    CHECKF(worst < 1e-5, "oscar_fold_hadamard_wv differs from H W_v by %.3g", worst);
    /* W_o <- W_o blockdiag(H): each row's head segment x becomes x H = H x */
    worst = 0;
    for (int o = 0; o < outf; o++)
        for (int h = 0; h < hq; h++) {
            for (int c = 0; c < d; c++) col[c] = wo0[o * hq * d + h * d + c];
            tl_hadamard_ref(col, res, d);
            for (int c = 0; c < d; c++) {
                double e = fabs(wo[o * hq * d + h * d + c] - res[c]);
                if (e > worst) worst = e;
            }
        }
    CHECKF(worst < 1e-5, "oscar_fold_hadamard_wo differs from W_o blockdiag(H) by %.3g", worst);
}

/* y = W_o attention(q, K, W_v x) with online rotation equals the folded
 * version with rotate_values = 0. */
static void test_offline_rotation(void) {
    tl_rng r = tl_rng_for("offline_rotation");
    const int hkv = 2, hq = 4, d = 64, in = 16, outf = 8;
    for (int quantised = 0; quantised < 2; quantised++)
        for (int mi = 0; mi < 2; mi++) {
            oscar_method m = mi ? OSCAR_METHOD_OSCAR : OSCAR_METHOD_QUAROT;
            const int64_t T = quantised ? 2 * 32 + 11 : 23, row = hkv * d;
            oscar_config ca = tl_small_config(m, 4, d, hkv, hq);
            ca.residual = 32;
            ca.window_dtype = OSCAR_DTYPE_F32;
            oscar_config cb = ca;
            cb.rotate_values = 0;
            oscar_cache *A = tl_create(&ca), *B = tl_create(&cb);
            if (!A || !B) {
                oscar_cache_destroy(A);
                oscar_cache_destroy(B);
                continue;
            }
            float *wv = malloc(sizeof(float) * hkv * d * in), *wo = malloc(sizeof(float) * outf * hq * d);
            float *wvf = malloc(sizeof(float) * hkv * d * in), *wof = malloc(sizeof(float) * outf * hq * d);
            tl_fill_normal(&r, wv, hkv * d * in, 0.3);
            tl_fill_normal(&r, wo, outf * hq * d, 0.3);
            memcpy(wvf, wv, sizeof(float) * hkv * d * in);
            memcpy(wof, wo, sizeof(float) * outf * hq * d);
            CHECK_OK(oscar_fold_hadamard_wv(wvf, hkv, d, in));
            CHECK_OK(oscar_fold_hadamard_wo(wof, outf, hq, d));
            float *x = malloc(sizeof(float) * (size_t)(T * in)), *k = malloc(sizeof(float) * (size_t)(T * row));
            float *v = malloc(sizeof(float) * (size_t)(T * row)), *vr = malloc(sizeof(float) * (size_t)(T * row));
            tl_fill_normal(&r, x, T * in, 1.0);
            tl_fill_normal(&r, k, T * row, 1.0);
            for (int64_t t = 0; t < T; t++)
                for (int i = 0; i < hkv * d; i++) {
                    double a = 0, b = 0;
                    for (int j = 0; j < in; j++) {
                        a += (double)wv[i * in + j] * x[t * in + j];
                        b += (double)wvf[i * in + j] * x[t * in + j];
                    }
                    v[t * row + i] = (float)a;
                    vr[t * row + i] = (float)b;
                }
            int32_t sa, sb;
            CHECK_OK(oscar_seq_add(A, &sa));
            CHECK_OK(oscar_seq_add(B, &sb));
            CHECK_OK(tl_append(A, 0, sa, k, v, T, hkv, d, OSCAR_DTYPE_F32));
            CHECK_OK(tl_append(B, 0, sb, k, vr, T, hkv, d, OSCAR_DTYPE_F32));
            /* seq_read of B gives V as the caller gave it (the folded space) */
            float *kl, *vl;
            if (tl_read_all(B, sb, 0, hkv, d, &kl, &vl) == T && !quantised) {
                double w = 0;
                for (int64_t i = 0; i < T * row; i++)
                    if (fabs(vl[i] - vr[i]) > w) w = fabs(vl[i] - vr[i]);
                CHECKF(w < 1e-5, "%s rotate_values=0: window V read back differs from the appended V by %.3g",
                       oscar_method_name(m), w);
            }
            free(kl);
            free(vl);
            float q[2 * 4 * 64], oa[2 * 4 * 64], ob[2 * 4 * 64];
            tl_fill_normal(&r, q, 2 * hq * d, 0.2);
            CHECK_OK(tl_attention(A, 0, 1, &sa, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oa, hq, d));
            CHECK_OK(tl_attention(B, 0, 1, &sb, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, ob, hq, d));
            /* y = W_o o */
            double ya[2 * 8], yb[2 * 8];
            float ybf[2 * 8];
            for (int i = 0; i < 2; i++)
                for (int o = 0; o < outf; o++) {
                    double a = 0, b = 0;
                    for (int j = 0; j < hq * d; j++) {
                        a += (double)wo[o * hq * d + j] * oa[i * hq * d + j];
                        b += (double)wof[o * hq * d + j] * ob[i * hq * d + j];
                    }
                    ya[i * outf + o] = a;
                    yb[i * outf + o] = b;
                    ybf[i * outf + o] = (float)b;
                }
            (void)yb;
            double w;
            /* window only: float rounding; quantised: the codes of the two
             * paths may differ at rounding boundaries */
            double tol = quantised ? 2e-2 : 1e-5;
            int64_t bad = tl_compare_out(ybf, ya, NULL, 2, outf, OSCAR_DTYPE_F32, tol, &w);
            CHECKF(bad == 0, "%s %s: folded (rotate_values=0) output differs from online rotation (worst %.3g)",
                   oscar_method_name(m), quantised ? "quantised" : "window", w);
            /* and B's raw output is H o_A */
            double hoa[2 * 4 * 64];
            for (int i = 0; i < 2 * hq; i++) {
                double tmp[64];
                for (int c = 0; c < d; c++) tmp[c] = oa[i * d + c];
                tl_hadamard_ref(tmp, hoa + i * d, d);
            }
            bad = tl_compare_out(ob, hoa, NULL, 2 * hq, d, OSCAR_DTYPE_F32, tol, &w);
            CHECKF(bad == 0, "%s %s: rotate_values=0 output is not H o (worst %.3g)", oscar_method_name(m),
                   quantised ? "quantised" : "window", w);
            free(wv);
            free(wo);
            free(wvf);
            free(wof);
            free(x);
            free(k);
            free(v);
            free(vr);
            oscar_cache_destroy(A);
            oscar_cache_destroy(B);
        }
}

int main(void) {
    printf("oscar %s, test_properties\n", oscar_version());
    TL_RUN(test_error_bound);
    TL_RUN(test_constant_groups_exact);
    TL_RUN(test_zero_keys);
    TL_RUN(test_token_counts);
    TL_RUN(test_attention_edges);
    TL_RUN(test_long_context_accuracy);
    TL_RUN(test_method_none_exact);
    TL_RUN(test_prefill_vs_tokenwise);
    TL_RUN(test_dtype_equivalence);
    TL_RUN(test_softmax_scale);
    TL_RUN(test_threads_deterministic);
    TL_RUN(test_fold_functions);
    TL_RUN(test_offline_rotation);
    return tl_finish();
}
