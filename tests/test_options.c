/*
 * test_options.c - the options past the paper (docs/ACCURACY.md, "Past the
 * paper"), each against a float64 reference written here:
 *  - sink_tokens S: the first S tokens stay exact, blocks hold tokens
 *    [S + jR, S + (j+1)R); read-back and attention against the reference
 *    quantiser of the tokens after the sinks plus the exact sinks; export /
 *    import (format version 3), fork, truncation, failed calls;
 *  - clip_search: each group's (scale, lo) is the least-squared-error
 *    candidate of the grid of docs/FORMAT.md, found here independently in
 *    float64; read-back and attention against that reference;
 *  - the configuration checks: ranges, the batch API and sinks, the older
 *    struct_size;
 *  - format version 4: key_norm_per_head (one key norm per token and KV
 *    head) and key_bits / value_bits (K4/V2, K2/V4), against a float64
 *    reference of FORMAT.md written here: bit-exact read-back and block
 *    bytes for the non-rotating methods, attention against float64, OScaR
 *    with sinks and a lag within a code step; a per-head cache is the sum of
 *    one-head caches (no all-gather under tensor parallelism); a mixed cache
 *    is a 4-bit cache's keys and a 2-bit cache's values; export / import,
 *    version-3 streams, refused imports, the batch API, the checks.
 */
#include "testlib.h"

#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- the reference for a cache with sinks --------------------------------- */

/* Reconstruction ([T][hkv][d], original space, float64) of a cache with S
 * sink tokens and `packed` packed tokens after them: sinks and window exact
 * (rounded to W), blocks by the reference quantiser of FORMAT.md. */
static void ref_with_sinks(const tl_geom *g, const float *k, const float *v, int64_t T, int S, int64_t packed,
                           double **krec, double **vrec) {
    const int64_t row = (int64_t)g->hkv * g->d, sh = T < S ? T : S;
    *krec = malloc(sizeof(double) * (size_t)(T * row));
    *vrec = malloc(sizeof(double) * (size_t)(T * row));
    tl_ref a, b;
    tl_ref_build_packed(g, k, v, sh, 0, NULL, &a); /* sinks: nothing packed */
    memcpy(*krec, a.krec, sizeof(double) * (size_t)(sh * row));
    memcpy(*vrec, a.vrec, sizeof(double) * (size_t)(sh * row));
    tl_ref_free(&a);
    if (T > sh) {
        tl_ref_build_packed(g, k + sh * row, v + sh * row, T - sh, packed, NULL, &b);
        memcpy(*krec + sh * row, b.krec, sizeof(double) * (size_t)((T - sh) * row));
        memcpy(*vrec + sh * row, b.vrec, sizeof(double) * (size_t)((T - sh) * row));
        tl_ref_free(&b);
    }
}

/* Worst |lib - ref| relative to the largest |ref| of the token row. */
static double worst_rel(const float *lib, const double *ref, int64_t n_rows, int64_t row) {
    double worst = 0;
    for (int64_t t = 0; t < n_rows; t++) {
        double m = tl_max_abs(ref + t * row, row);
        if (m == 0) m = 1;
        for (int64_t i = 0; i < row; i++) {
            double e = fabs((double)lib[t * row + i] - ref[t * row + i]) / m;
            if (!(e <= worst)) worst = e;
        }
    }
    return worst;
}

typedef struct sink_case {
    oscar_method method;
    int bits, d, hkv, hq, R, S, lag, q_len, chunk;
    int64_t T;
} sink_case;

static void run_sink_case(const sink_case *sc, tl_rng *r) {
    oscar_config cfg = tl_small_config(sc->method, sc->bits, sc->d, sc->hkv, sc->hq);
    cfg.residual = sc->R;
    cfg.sink_tokens = sc->S;
    cfg.rollback_tokens = sc->lag;
    cfg.block_count = 32;
    printf("   %-10s b=%d d=%d Hkv=%d Hq=%d R=%d S=%d L=%d T=%lld q_len=%d chunk=%d\n", oscar_method_name(sc->method),
           sc->bits, sc->d, sc->hkv, sc->hq, sc->R, sc->S, sc->lag, (long long)sc->T, sc->q_len, sc->chunk);
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    tl_geom g = tl_geom_of(&cfg);
    const int64_t row = (int64_t)sc->hkv * sc->d, T = sc->T;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(r, TL_FLAVOR_SINKS, k, v, T, sc->hkv, sc->d, OSCAR_DTYPE_F32);
    int32_t seq = -1;
    CHECK_OK(oscar_seq_add(c, &seq));
    int64_t done = 0, P = 0;
    while (done < T) {
        int64_t n = sc->chunk ? tl_randint(r, 0, sc->chunk) : T;
        if (n > T - done) n = T - done;
        if (!CHECK_OK(tl_append(c, 0, seq, k + done * row, v + done * row, n, sc->hkv, sc->d, OSCAR_DTYPE_F32))) break;
        done += n;
        /* the rule of oscar.h: P' = max(P, (n - S - L) / R) once n >= S + L */
        const int64_t after = done - (done < sc->S ? done : sc->S);
        if (after >= sc->lag && (after - sc->lag) / sc->R > P) P = (after - sc->lag) / sc->R;
        oscar_seq_info info;
        CHECK_OK(oscar_seq_info_get(c, seq, 0, &info));
        CHECKF(info.tokens == done && info.packed_tokens == P * sc->R &&
                   info.packed_tokens + info.window_tokens == info.tokens,
               "after %lld tokens: packed %lld (expected %lld), window %d", (long long)done,
               (long long)info.packed_tokens, (long long)(P * sc->R), info.window_tokens);
    }
    double *krec, *vrec;
    ref_with_sinks(&g, k, v, T, sc->S, P * sc->R, &krec, &vrec);
    float *kl, *vl;
    int64_t got = tl_read_all(c, seq, 0, sc->hkv, sc->d, &kl, &vl);
    if (CHECK(got == T)) {
        /* the sinks are exact: equal to the window rounding of the input */
        const int64_t sh = T < sc->S ? T : sc->S;
        double ws = worst_rel(kl, krec, sh, row), wsv = worst_rel(vl, vrec, sh, row);
        /* (rotating methods: the read-back's fp32 inverse rotation; one fp16
         * step is 1e-3, a 2-bit one 0.3) */
        const double tol = g.rot ? 2e-4 : 1e-7;
        CHECKF(ws < tol && wsv < tol, "sink tokens are not exact: K %.3g V %.3g", ws, wsv);
        /* everything, packed tokens included: within a last-bit code flip */
        double wk = worst_rel(kl, krec, T, row), wv = worst_rel(vl, vrec, T, row);
        const double allow = sc->bits == 2 ? 0.75 : 0.2; /* one step of a group, relative */
        CHECKF(wk < allow && wv < allow, "read-back vs the reference with sinks: K %.3g V %.3g", wk, wv);
        /* the mean error shows a shifted or missing sink region at once */
        double ek = 0, nk = 0;
        for (int64_t i = 0; i < T * row; i++) {
            ek += (kl[i] - krec[i]) * (kl[i] - krec[i]);
            nk += krec[i] * krec[i];
        }
        CHECKF(ek <= 1e-4 * nk || g.rot, "K read-back differs from the reference: %.3g of the energy", ek / nk);
        /* attention against float64 attention over the reference tokens */
        if (T >= sc->q_len) {
            const int64_t nq = (int64_t)sc->q_len * sc->hq * sc->d;
            float *q = malloc(sizeof(float) * (size_t)nq), *o = malloc(sizeof(float) * (size_t)nq);
            double *o_lib = malloc(sizeof(double) * (size_t)nq), *o_ref = malloc(sizeof(double) * (size_t)nq);
            double *mag = malloc(sizeof(double) * (size_t)(sc->q_len * sc->hq));
            tl_gen_q(r, q, sc->q_len, sc->hq, sc->d, tl_key_rms_norm(k, T, sc->hkv, sc->d), 2.0, OSCAR_DTYPE_F32);
            const double sm = 1.0 / sqrt((double)sc->d);
            CHECK_OK(tl_attention(c, 0, 1, &seq, sc->q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, sc->hq,
                                  sc->d));
            /* over the library's own read-back: the attention arithmetic */
            tl_ref_attention_f(sc->d, sc->hkv, sc->hq, kl, vl, T, sc->q_len, q, sm, o_lib, mag);
            double w1 = 0;
            int64_t b1 = tl_compare_out(o, o_lib, mag, (int64_t)sc->q_len * sc->hq, sc->d, OSCAR_DTYPE_F32, 1e-5, &w1);
            CHECKF(b1 == 0, "attention with sinks vs float64 over the read-back: %lld elements, worst %.3g",
                   (long long)b1, w1);
            /* over the reference quantiser's tokens */
            tl_ref_attention(sc->d, sc->hkv, sc->hq, krec, vrec, T, sc->q_len, q, sm, o_ref, mag);
            double w2 = 0;
            int64_t b2 = tl_compare_out(o, o_ref, mag, (int64_t)sc->q_len * sc->hq, sc->d, OSCAR_DTYPE_F32, 0.05, &w2);
            CHECKF(b2 == 0, "attention with sinks vs the float64 reference: %lld elements, worst %.3g", (long long)b2,
                   w2);
            free(q), free(o), free(o_lib), free(o_ref), free(mag);
        }
    }
    free(kl), free(vl), free(krec), free(vrec), free(k), free(v);
    CHECK_OK(oscar_seq_free(c, seq));
    oscar_cache_destroy(c);
}

static void test_sinks_reference(void) {
    tl_rng r = tl_rng_for("sinks_reference");
    static const sink_case cases[] = {
        {OSCAR_METHOD_OSCAR, 2, 64, 3, 9, 64, 4, 0, 1, 0, 300},   /* prefill */
        {OSCAR_METHOD_OSCAR, 2, 64, 3, 9, 64, 4, 0, 3, 40, 300},  /* chunked */
        {OSCAR_METHOD_OSCAR, 2, 128, 2, 4, 64, 16, 32, 8, 40, 250}, /* sinks and a lag */
        {OSCAR_METHOD_KIVI, 2, 64, 1, 4, 32, 3, 0, 4, 0, 100},
        {OSCAR_METHOD_OSCAR, 4, 64, 2, 2, 32, 100, 0, 5, 33, 180}, /* S > R */
        {OSCAR_METHOD_NONE, 16, 64, 2, 4, 32, 8, 0, 2, 17, 90},
        {OSCAR_METHOD_OSCAR, 2, 64, 1, 1, 32, 8, 0, 3, 5, 6},     /* all tokens in the sinks */
        {OSCAR_METHOD_OSCAR, 2, 64, 1, 2, 32, 8, 0, 40, 0, 120},  /* a long query chunk over blocks and sinks */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_sink_case(&cases[i], &r);
}

/* Sinks against the same cache without sinks given the tokens after the
 * sinks: blocks must be byte-identical (they hold the same tokens). */
static void test_sinks_blocks_shifted(void) {
    tl_rng r = tl_rng_for("sinks_blocks_shifted");
    const int S = 5, d = 64, hkv = 2;
    oscar_config a = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, hkv, 4);
    a.residual = 32;
    oscar_config b = a;
    a.sink_tokens = S;
    oscar_cache *ca = tl_create(&a), *cb = tl_create(&b);
    if (!ca || !cb) return;
    const int64_t T = 200, row = (int64_t)hkv * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k, v, T, hkv, d, OSCAR_DTYPE_F32);
    int32_t sa, sb;
    CHECK_OK(oscar_seq_add(ca, &sa));
    CHECK_OK(oscar_seq_add(cb, &sb));
    CHECK_OK(tl_append(ca, 0, sa, k, v, T, hkv, d, OSCAR_DTYPE_F32));
    CHECK_OK(tl_append(cb, 0, sb, k + S * row, v + S * row, T - S, hkv, d, OSCAR_DTYPE_F32));
    int32_t ta[16], tb[16], na = 0, nb = 0;
    CHECK_OK(oscar_seq_block_table(ca, sa, ta, 16, &na));
    CHECK_OK(oscar_seq_block_table(cb, sb, tb, 16, &nb));
    CHECKF(na == (T - S) / 32 && na == nb, "blocks: %d with sinks, %d without", na, nb);
    /* read both back: the tokens after the sinks are the same numbers */
    float *kla, *vla, *klb, *vlb;
    tl_read_all(ca, sa, 0, hkv, d, &kla, &vla);
    tl_read_all(cb, sb, 0, hkv, d, &klb, &vlb);
    CHECK(memcmp(kla + S * row, klb, sizeof(float) * (size_t)((T - S) * row)) == 0);
    CHECK(memcmp(vla + S * row, vlb, sizeof(float) * (size_t)((T - S) * row)) == 0);
    free(kla), free(vla), free(klb), free(vlb), free(k), free(v);
    oscar_cache_destroy(ca);
    oscar_cache_destroy(cb);
}

/* Export / import (format version 3), fork and truncation with sinks; a
 * failed call leaves the cache as it was. */
static void test_sinks_stream_fork_truncate(void) {
    tl_rng r = tl_rng_for("sinks_stream");
    const int S = 6, d = 64, hkv = 2, hq = 4, R = 32;
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, hkv, hq);
    cfg.residual = R;
    cfg.sink_tokens = S;
    cfg.rollback_tokens = 8;
    cfg.num_layers = 2;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    const int64_t T = 150, row = (int64_t)hkv * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(&r, TL_FLAVOR_SINKS, k, v, T, hkv, d, OSCAR_DTYPE_F32);
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F32));
    CHECK_OK(tl_append(c, 1, seq, k, v, 3, hkv, d, OSCAR_DTYPE_F32)); /* layer 1: only sink tokens */
    size_t n = 0;
    unsigned char *s = tl_export(c, seq, &n);
    if (!s) return;
    CHECKF(tl_rd32(s + 8) == 5 && tl_rd32(s + 60) == (uint32_t)S, "version %u, sink_tokens %u", tl_rd32(s + 8),
           tl_rd32(s + 60));
    int32_t imp = -1;
    CHECK_OK(oscar_seq_import(c, s, n, &imp));
    CHECK(tl_same_export(c, seq, c, imp));
    float *k1, *v1, *k2, *v2;
    tl_read_all(c, seq, 0, hkv, d, &k1, &v1);
    tl_read_all(c, imp, 0, hkv, d, &k2, &v2);
    CHECK(memcmp(k1, k2, sizeof(float) * (size_t)(T * row)) == 0 && memcmp(v1, v2, sizeof(float) * (size_t)(T * row)) == 0);
    free(k2), free(v2);
    CHECK_OK(oscar_seq_free(c, imp));
    /* the stream into a cache with other sinks, or none: OSCAR_E_FORMAT */
    oscar_config other = cfg;
    other.sink_tokens = 0;
    oscar_cache *c0 = tl_create(&other);
    int32_t bad = -1;
    if (c0) {
        CHECK_ST(c0, oscar_seq_import(c0, s, n, &bad), OSCAR_E_FORMAT);
        CHECKF(strstr(oscar_last_error(c0), "sink_tokens") != NULL, "message: %s", oscar_last_error(c0));
        oscar_cache_destroy(c0);
    }
    /* a version-2 stream (no sinks; a 64-byte header) into this cache: OSCAR_E_FORMAT */
    memmove(s + 64, s + 80, n - 80);
    n -= 16;
    tl_wr32(s + 8, 2);
    tl_wr32(s + 60, 0);
    tl_fix_checksum(s, n);
    oscar_memory_stats before, after;
    CHECK_OK(oscar_memory(c, &before));
    CHECK_ST(c, oscar_seq_import(c, s, n, &bad), OSCAR_E_FORMAT);
    CHECKF(strstr(oscar_last_error(c), "version 2") != NULL, "message: %s", oscar_last_error(c));
    CHECK_OK(oscar_memory(c, &after));
    CHECK(before.blocks_free == after.blocks_free && before.seqs_live == after.seqs_live);
    free(s);
    /* a NaN sink value (checksum fixed): rejected, nothing changes */
    s = tl_export(c, seq, &n);
    if (s) {
        const size_t sink_off = 80 + 16 * 2 + (size_t)tl_rd32(s + 52) * 2 * tl_geom_of(&cfg).LB;
        s[sink_off] = 0x00;
        s[sink_off + 1] = 0x7e; /* fp16 NaN: the first K value of sink token 0 */
        tl_fix_checksum(s, n);
        CHECK_ST(c, oscar_seq_import(c, s, n, &bad), OSCAR_E_FORMAT);
        CHECKF(strstr(oscar_last_error(c), "sink") != NULL, "message: %s", oscar_last_error(c));
        free(s);
    }
    /* fork: the same attention and read-back */
    int32_t fk = -1;
    CHECK_ST(c, oscar_seq_fork(c, seq, &fk), OSCAR_E_INVALID_ARGUMENT); /* the layers' lengths differ */
    CHECK_OK(tl_append(c, 1, seq, k + 3 * row, v + 3 * row, T - 3, hkv, d, OSCAR_DTYPE_F32));
    CHECK_OK(oscar_seq_fork(c, seq, &fk));
    CHECK(tl_same_export(c, seq, c, fk));
    float *q = malloc(sizeof(float) * (size_t)hq * d), *o1 = malloc(sizeof(float) * (size_t)hq * d),
          *o2 = malloc(sizeof(float) * (size_t)hq * d);
    tl_gen_q(&r, q, 1, hq, d, tl_key_rms_norm(k, T, hkv, d), 2.0, OSCAR_DTYPE_F32);
    CHECK_OK(tl_attention(c, 0, 1, &seq, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o1, hq, d));
    CHECK_OK(tl_attention(c, 0, 1, &fk, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o2, hq, d));
    CHECK(memcmp(o1, o2, sizeof(float) * (size_t)hq * d) == 0);
    CHECK_OK(oscar_seq_free(c, fk));
    /* truncation: blocks hold tokens from S on, so a sequence with packed
     * blocks cannot be cut below S + P R; the window part can be removed */
    oscar_seq_info info;
    CHECK_OK(oscar_seq_info_get(c, seq, 0, &info));
    const int64_t floor_len = S + info.packed_tokens;
    CHECK_ST(c, oscar_seq_truncate(c, seq, floor_len - 1), OSCAR_E_INVALID_ARGUMENT);
    CHECK_OK(oscar_seq_info_get(c, seq, 0, &info));
    CHECK(info.tokens == T);
    CHECK_OK(oscar_seq_truncate(c, seq, floor_len));
    /* appending the removed tokens again gives the same cache as before */
    CHECK_OK(tl_append(c, 0, seq, k + floor_len * row, v + floor_len * row, T - floor_len, hkv, d, OSCAR_DTYPE_F32));
    tl_read_all(c, seq, 0, hkv, d, &k2, &v2);
    CHECK(memcmp(k1, k2, sizeof(float) * (size_t)(T * row)) == 0 && memcmp(v1, v2, sizeof(float) * (size_t)(T * row)) == 0);
    free(k2), free(v2);
    /* a sequence still inside its sinks can be cut anywhere */
    int32_t young;
    CHECK_OK(oscar_seq_add(c, &young));
    CHECK_OK(tl_append(c, 0, young, k, v, 4, hkv, d, OSCAR_DTYPE_F32));
    CHECK_OK(oscar_seq_truncate(c, young, 1));
    CHECK_OK(tl_append(c, 0, young, k + row, v + row, 3, hkv, d, OSCAR_DTYPE_F32));
    tl_read_all(c, young, 0, hkv, d, &k2, &v2);
    CHECK(memcmp(k1, k2, sizeof(float) * (size_t)(4 * row)) == 0);
    free(k2), free(v2);
    /* a failed append (NaN) while the sinks fill: nothing changes */
    float *kn = malloc(sizeof(float) * (size_t)(4 * row));
    memcpy(kn, k + 4 * row, sizeof(float) * (size_t)(4 * row));
    kn[3 * row] = NAN;
    CHECK_ST(c, tl_append(c, 0, young, kn, v + 4 * row, 4, hkv, d, OSCAR_DTYPE_F32), OSCAR_E_NONFINITE);
    CHECK_OK(oscar_seq_info_get(c, young, 0, &info));
    CHECK(info.tokens == 4);
    tl_read_all(c, young, 0, hkv, d, &k2, &v2);
    CHECK(memcmp(k1, k2, sizeof(float) * (size_t)(4 * row)) == 0);
    free(k2), free(v2), free(kn);
    free(q), free(o1), free(o2), free(k1), free(v1), free(k), free(v);
    oscar_cache_destroy(c);
}

/* ---- clipping --------------------------------------------------------------- */

/* The grid of docs/FORMAT.md step 6 with clip_search, and the search done
 * here in float64 over the test's own fp16 conversions. */
static const double GRID[6] = {0.0, 0.05, 0.1, 0.15, 0.2, 0.3};

static void ref_clip_params(const float *x, int n, int stride, int Q, uint16_t *sc16, uint16_t *lo16) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    const float range = hi - lo;
    double best = INFINITY;
    *sc16 = *lo16 = 0;
    for (int a = 0; a < 6; a++)
        for (int b = 0; b < 6; b++) {
            /* the candidate range in fp32, as the format states it */
            const float l = lo + (float)GRID[a] * range, h = hi - (float)GRID[b] * range;
            if (!(h >= l)) continue;
            const uint16_t s16 = tl_f16_from_double((float)((h - l) / (float)Q)), l16 = tl_f16_from_double(l);
            const double sc = tl_f16_to_double(s16), l0 = tl_f16_to_double(l16);
            double err = 0;
            for (int i = 0; i < n; i++) {
                const float v = x[(size_t)i * stride];
                const int code = tl_ref_code(v, s16, l16, Q);
                const double rec = (float)((float)l0 + (float)code * (float)sc);
                err += ((double)v - rec) * ((double)v - rec);
            }
            if (err < best) {
                best = err;
                *sc16 = s16;
                *lo16 = l16;
            }
        }
}

/* Method KIVI (no rotation, no scaling), so every number is exact: with
 * clip_search the library's read-back equals dequantisation with the
 * reference's searched parameters, element for element. */
static void test_clip_reference(void) {
    tl_rng r = tl_rng_for("clip_reference");
    for (int bits = 2; bits <= 4; bits += 2) {
        const int d = 64, hkv = 2, R = 32, G = 32;
        oscar_config cfg = tl_small_config(OSCAR_METHOD_KIVI, bits, d, hkv, 4);
        cfg.residual = R;
        cfg.clip_search = 1;
        cfg.window_dtype = OSCAR_DTYPE_F32;
        oscar_cache *c = tl_create(&cfg);
        if (!c) return;
        const int64_t T = 2 * R + 7, row = (int64_t)hkv * d, P = 2 * R;
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k, v, T, hkv, d, OSCAR_DTYPE_F32);
        for (int64_t i = 0; i < T * row; i += 37) v[i] *= 6.0f; /* outliers inside value groups */
        int32_t seq;
        CHECK_OK(oscar_seq_add(c, &seq));
        CHECK_OK(tl_append(c, 0, seq, k, v, T, hkv, d, OSCAR_DTYPE_F32));
        float *kl, *vl;
        tl_read_all(c, seq, 0, hkv, d, &kl, &vl);
        const int Q = (1 << bits) - 1;
        int64_t bad = 0, clipped = 0, groups = 0;
        double err_clip = 0, err_plain = 0;
        double *krec = malloc(sizeof(double) * (size_t)(T * row)), *vrec = malloc(sizeof(double) * (size_t)(T * row));
        for (int64_t i = 0; i < T * row; i++) krec[i] = k[i], vrec[i] = v[i]; /* window: exact (fp32) */
        /* keys: per (channel, G tokens) */
        for (int64_t t0 = 0; t0 < P; t0 += G)
            for (int64_t i = 0; i < row; i++) {
                uint16_t s16, l16, ps, pl;
                ref_clip_params(k + t0 * row + i, G, (int)row, Q, &s16, &l16);
                tl_ref_params(k + t0 * row + i, G, (int)row, Q, &ps, &pl);
                groups++;
                clipped += s16 != ps || l16 != pl;
                for (int64_t t = t0; t < t0 + G; t++) {
                    const float x = k[t * row + i];
                    const float rec = (float)tl_f16_to_double(l16) +
                                      (float)tl_ref_code(x, s16, l16, Q) * (float)tl_f16_to_double(s16);
                    const float plain = (float)tl_f16_to_double(pl) +
                                        (float)tl_ref_code(x, ps, pl, Q) * (float)tl_f16_to_double(ps);
                    krec[t * row + i] = rec;
                    bad += kl[t * row + i] != rec;
                    err_clip += ((double)x - rec) * ((double)x - rec);
                    err_plain += ((double)x - plain) * ((double)x - plain);
                }
            }
        /* values: per (token, head, G channels) */
        for (int64_t t = 0; t < P; t++)
            for (int64_t g0 = 0; g0 < row; g0 += G) {
                uint16_t s16, l16, ps, pl;
                ref_clip_params(v + t * row + g0, G, 1, Q, &s16, &l16);
                tl_ref_params(v + t * row + g0, G, 1, Q, &ps, &pl);
                groups++;
                clipped += s16 != ps || l16 != pl;
                for (int64_t i = g0; i < g0 + G; i++) {
                    const float x = v[t * row + i];
                    const float rec = (float)tl_f16_to_double(l16) +
                                      (float)tl_ref_code(x, s16, l16, Q) * (float)tl_f16_to_double(s16);
                    const float plain = (float)tl_f16_to_double(pl) +
                                        (float)tl_ref_code(x, ps, pl, Q) * (float)tl_f16_to_double(ps);
                    vrec[t * row + i] = rec;
                    bad += vl[t * row + i] != rec;
                    err_clip += ((double)x - rec) * ((double)x - rec);
                    err_plain += ((double)x - plain) * ((double)x - plain);
                }
            }
        CHECKF(bad == 0, "bits %d: %lld read-back elements differ from the float64 clip-search reference", bits,
               (long long)bad);
        /* window tokens untouched */
        CHECK(memcmp(kl + P * row, k + P * row, sizeof(float) * (size_t)((T - P) * row)) == 0);
        /* the search must do something on this data, and never worse */
        CHECKF(clipped > groups / 20, "bits %d: only %lld of %lld groups clipped", bits, (long long)clipped,
               (long long)groups);
        CHECKF(err_clip < err_plain, "bits %d: clipping error %.6g not below min/max %.6g", bits, err_clip, err_plain);
        printf("   bits %d: %lld of %lld groups clipped, squared error %.4g -> %.4g\n", bits, (long long)clipped,
               (long long)groups, err_plain, err_clip);
        /* attention over the reference tokens */
        const int hq = 4, q_len = 3;
        float *q = malloc(sizeof(float) * (size_t)q_len * hq * d), *o = malloc(sizeof(float) * (size_t)q_len * hq * d);
        double *o_ref = malloc(sizeof(double) * (size_t)q_len * hq * d), *mag = malloc(sizeof(double) * q_len * hq);
        tl_gen_q(&r, q, q_len, hq, d, tl_key_rms_norm(k, T, hkv, d), 2.0, OSCAR_DTYPE_F32);
        CHECK_OK(tl_attention(c, 0, 1, &seq, q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, hq, d));
        tl_ref_attention(d, hkv, hq, krec, vrec, T, q_len, q, 1.0 / sqrt((double)d), o_ref, mag);
        double w = 0;
        int64_t b = tl_compare_out(o, o_ref, mag, (int64_t)q_len * hq, d, OSCAR_DTYPE_F32, 1e-5, &w);
        CHECKF(b == 0, "bits %d: attention with clipping vs float64: %lld elements, worst %.3g", bits, (long long)b, w);
        /* the blocks decode by the usual rule: they export and import into a
         * cache without clip_search, and read back the same */
        oscar_config plain = cfg;
        plain.clip_search = 0;
        oscar_cache *c2 = tl_create(&plain);
        size_t n = 0;
        unsigned char *s = tl_export(c, seq, &n);
        int32_t imp = -1;
        if (c2 && s && CHECK_OK(oscar_seq_import(c2, s, n, &imp))) {
            float *k2, *v2;
            tl_read_all(c2, imp, 0, hkv, d, &k2, &v2);
            CHECK(memcmp(k2, kl, sizeof(float) * (size_t)(T * row)) == 0 &&
                  memcmp(v2, vl, sizeof(float) * (size_t)(T * row)) == 0);
            free(k2), free(v2);
        }
        free(s);
        oscar_cache_destroy(c2);
        free(q), free(o), free(o_ref), free(mag), free(krec), free(vrec), free(kl), free(vl), free(k), free(v);
        oscar_cache_destroy(c);
    }
}

/* OScaR with clipping: the library's packer against the reference search on
 * the library's own stored norms (read-back within one step; most exact). */
static void test_clip_oscar(void) {
    tl_rng r = tl_rng_for("clip_oscar");
    const int d = 128, hkv = 2;
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, hkv, 8);
    oscar_config off = cfg;
    cfg.clip_search = 1;
    oscar_cache *c = tl_create(&cfg), *c0 = tl_create(&off);
    if (!c || !c0) return;
    const int64_t T = 200, row = (int64_t)hkv * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(&r, TL_FLAVOR_SINKS, k, v, T, hkv, d, OSCAR_DTYPE_F16);
    int32_t s1, s0;
    CHECK_OK(oscar_seq_add(c, &s1));
    CHECK_OK(oscar_seq_add(c0, &s0));
    CHECK_OK(tl_append(c, 0, s1, k, v, T, hkv, d, OSCAR_DTYPE_F16));
    CHECK_OK(tl_append(c0, 0, s0, k, v, T, hkv, d, OSCAR_DTYPE_F16));
    float *k1, *v1, *k0, *v0;
    tl_read_all(c, s1, 0, hkv, d, &k1, &v1);
    tl_read_all(c0, s0, 0, hkv, d, &k0, &v0);
    tl_geom g = tl_geom_of(&cfg);
    tl_ref ref;
    tl_ref_build(&g, k, v, T, NULL, &ref);
    /* squared error of the packed values against the input: clipping lowers
     * it (it minimises each group's error; the rotation is orthogonal) */
    const int64_t P = ref.packed;
    double e1 = 0, e0 = 0;
    for (int64_t i = 0; i < P * row; i++) {
        const double x = v[i];
        e1 += (v1[i] - x) * (v1[i] - x);
        e0 += (v0[i] - x) * (v0[i] - x);
    }
    CHECKF(e1 < e0, "V squared error with clipping %.6g, without %.6g", e1, e0);
    /* the values' parameters, from the reference search on the window
     * values (no norm involved for V), in the rotated space: H v_lib per
     * head against the reference's dequantised values */
    int64_t bad = 0;
    for (int64_t t = 0; t < P; t++)
        for (int h = 0; h < hkv; h++) {
            double x[128], y[128];
            for (int i = 0; i < d; i++) x[i] = v1[t * row + h * d + i];
            tl_hadamard_ref(x, y, d);
            for (int g0 = 0; g0 < d; g0 += 32) {
                uint16_t s16, l16;
                const float *xv = ref.xv + t * row + h * d + g0;
                ref_clip_params(xv, 32, 1, 3, &s16, &l16);
                for (int i = 0; i < 32; i++) {
                    const double rec = (float)((float)tl_f16_to_double(l16) +
                                               (float)tl_ref_code(xv[i], s16, l16, 3) * (float)tl_f16_to_double(s16));
                    bad += fabs(y[g0 + i] - rec) > 1e-4 * (fabs(rec) + 1e-3);
                }
            }
        }
    CHECKF(bad <= P * row / 100, "%lld of %lld V elements differ from the clip-search reference", (long long)bad,
           (long long)(P * row));
    tl_ref_free(&ref);
    free(k1), free(v1), free(k0), free(v0), free(k), free(v);
    oscar_cache_destroy(c);
    oscar_cache_destroy(c0);
}

/* ---- configuration -------------------------------------------------------------- */

static void test_config_checks(void) {
    char eb[256];
    oscar_config c = oscar_config_default();
    CHECK(c.sink_tokens == 0 && c.clip_search == 0);
    c.sink_tokens = -1;
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    CHECKF(strstr(eb, "sink_tokens") != NULL, "message: %s", eb);
    c.sink_tokens = 4097;
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    c.sink_tokens = 4096;
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    c.caller_metadata = 1; /* the batch API has sink rows too (test_engine compares it with the sequence API) */
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    c.block_count = 4;
    c.max_seqs = 2;
    oscar_cache *x = NULL;
    CHECK_OK(oscar_cache_create(&c, &x, eb, sizeof eb));
    CHECK(x != NULL);
    oscar_cache_destroy(x);
    c = oscar_config_default();
    c.clip_search = 2;
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    CHECKF(strstr(eb, "clip_search") != NULL, "message: %s", eb);
    c.clip_search = 1;
    c.caller_metadata = 1; /* clipping is only a packer's choice: the batch API has it */
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    /* the CUDA backend runs sink tokens (both APIs) and clipping
     * (without CUDA: not built, or no device) */
    c = oscar_config_default();
    c.backend = OSCAR_BACKEND_CUDA;
    for (int opt = 0; opt < 3; opt++) {
        c.sink_tokens = opt != 1 ? 4 : 0;
        c.clip_search = opt == 1;
        c.caller_metadata = opt == 2;
        if (oscar_backend_available(OSCAR_BACKEND_CUDA)) {
            CHECK_OK(oscar_cache_create(&c, &x, eb, sizeof eb));
            oscar_cache_destroy(x);
            x = NULL;
        } else {
            CHECK_ST(NULL, oscar_cache_create(&c, &x, eb, sizeof eb), OSCAR_E_UNSUPPORTED);
        }
    }
    /* a caller of the older header (struct_size without the two fields) */
    c = oscar_config_default();
    c.sink_tokens = 77; /* beyond the old struct: must be ignored */
    c.clip_search = 5;
    c.struct_size = offsetof(oscar_config, sink_tokens);
    c.head_dim = 64;
    c.num_kv_heads = 1;
    c.num_q_heads = 1;
    c.block_count = 4;
    c.max_seqs = 1;
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    CHECK_OK(oscar_cache_create(&c, &x, eb, sizeof eb));
    if (x) {
        oscar_config got;
        memset(&got, 0xab, sizeof got);
        got.struct_size = offsetof(oscar_config, sink_tokens);
        CHECK_OK(oscar_cache_config(x, &got));
        /* only the old fields are written */
        CHECK(got.head_dim == 64 && got.struct_size == offsetof(oscar_config, sink_tokens));
        unsigned char tail[sizeof(oscar_config) - offsetof(oscar_config, sink_tokens)];
        memset(tail, 0xab, sizeof tail);
        CHECK(memcmp((unsigned char *)&got + offsetof(oscar_config, sink_tokens), tail, sizeof tail) == 0);
        got.struct_size = sizeof got;
        CHECK_OK(oscar_cache_config(x, &got));
        CHECK(got.sink_tokens == 0 && got.clip_search == 0);
        oscar_cache_destroy(x);
    }
    c.struct_size = offsetof(oscar_config, sink_tokens) + 4;
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    /* memory: S sink rows per slot and layer */
    oscar_config a = oscar_config_default(), b = a;
    b.sink_tokens = 16;
    oscar_memory_requirements ma, mb;
    CHECK_OK(oscar_memory_requirements_get(&a, &ma, eb, sizeof eb));
    CHECK_OK(oscar_memory_requirements_get(&b, &mb, eb, sizeof eb));
    CHECKF(mb.window_bytes == ma.window_bytes + (size_t)16 * 2 * a.num_kv_heads * a.head_dim * 2 * a.num_layers *
                                                    a.max_seqs,
           "window bytes %zu -> %zu", ma.window_bytes, mb.window_bytes);
    CHECK(mb.pool_bytes == ma.pool_bytes);
}

/* ---- format version 4: per-head key norms, key and value bit widths ------- */

/* The reference of one layer under the version-4 options, from FORMAT.md
 * steps 1-8 (own Hadamard in float64, own fp16 conversions): P packed
 * tokens of T. Keys are coded with QK = 2^bK - 1 levels, values with QV;
 * norms are per token (the same for every head) or per token and head. */
typedef struct oref {
    int64_t T, P;
    float *xk, *xv;            /* [T][hkv][d] window values (rotated, rounded to W) */
    float *s;                  /* [P][hkv] the norm head h's key was divided by */
    uint8_t *kcode, *vcode;    /* [P][hkv][d] */
    uint16_t *ksc, *klo;       /* [P/gk][hkv][d] */
    uint16_t *vsc, *vlo;       /* [P][hkv][d/gv] */
    float *kread, *vdeq;       /* [P][hkv][d] fp32: s * x^ (keys), x^ (values): the stored space */
    double *krec, *vrec;       /* [T][hkv][d] original space, float64 */
} oref;

static void oref_free(oref *o) {
    free(o->xk), free(o->xv), free(o->s), free(o->kcode), free(o->vcode), free(o->ksc), free(o->klo);
    free(o->vsc), free(o->vlo), free(o->kread), free(o->vdeq), free(o->krec), free(o->vrec);
    memset(o, 0, sizeof *o);
}

static float deq_f32(int code, uint16_t sc16, uint16_t lo16) {
    const float sc = (float)tl_f16_to_double(sc16), l0 = (float)tl_f16_to_double(lo16);
    const float prod = (float)code * sc;
    return l0 + prod;
}

static void oref_build(const tl_geom *g, const float *k, const float *v, int64_t T, int64_t P, oref *o) {
    memset(o, 0, sizeof *o);
    const int d = g->d, H = g->hkv, ng = d / g->gv;
    const int64_t row = (int64_t)H * d;
    o->T = T;
    o->P = P;
    const size_t nt = (size_t)(T > 0 ? T : 1) * (size_t)row, np = (size_t)(P > 0 ? P : 1) * (size_t)row;
    o->xk = calloc(nt, sizeof(float)), o->xv = calloc(nt, sizeof(float));
    o->krec = calloc(nt, sizeof(double)), o->vrec = calloc(nt, sizeof(double));
    o->s = calloc((size_t)(P > 0 ? P : 1) * H, sizeof(float));
    o->kcode = calloc(np, 1), o->vcode = calloc(np, 1);
    o->kread = calloc(np, sizeof(float)), o->vdeq = calloc(np, sizeof(float));
    o->ksc = calloc(np, sizeof(uint16_t)), o->klo = calloc(np, sizeof(uint16_t));
    o->vsc = calloc(np, sizeof(uint16_t)), o->vlo = calloc(np, sizeof(uint16_t));
    float *kq = calloc(np, sizeof(float));
    double buf[256];
    for (int64_t t = 0; t < T; t++) /* steps 1-2 */
        for (int h = 0; h < H; h++) {
            const int64_t b = t * row + (int64_t)h * d;
            for (int c = 0; c < d; c++) buf[c] = k[b + c];
            if (g->rot) tl_hadamard_ref(buf, buf, d);
            for (int c = 0; c < d; c++) o->xk[b + c] = (float)tl_round_dtype(g->W, buf[c]);
            for (int c = 0; c < d; c++) buf[c] = v[b + c];
            if (g->rotv) tl_hadamard_ref(buf, buf, d);
            for (int c = 0; c < d; c++) o->xv[b + c] = (float)tl_round_dtype(g->W, buf[c]);
        }
    for (int64_t t = 0; t < P; t++) { /* step 4 */
        float e[64], tot = 0.0f;
        for (int h = 0; h < H; h++) {
            e[h] = tl_head_sumsq_def(o->xk + t * row + (int64_t)h * d, d);
            tot = h == 0 ? e[0] : tot + e[h];
        }
        for (int h = 0; h < H; h++) {
            float s = 1.0f;
            if (g->scale) {
                s = sqrtf(g->norm_per_head ? e[h] : tot);
                if (!(s > 0.0f) || isinf(s)) s = 1.0f;
            }
            o->s[t * H + h] = s;
            for (int c = 0; c < d; c++) {
                const int64_t i = t * row + (int64_t)h * d + c;
                kq[i] = g->scale ? o->xk[i] / s : o->xk[i];
            }
        }
    }
    for (int64_t t0 = 0; t0 < P; t0 += g->gk) /* steps 5-8, keys: QK */
        for (int64_t i = 0; i < row; i++) {
            const size_t pi = (size_t)(t0 / g->gk) * row + i;
            tl_ref_params(kq + t0 * row + i, g->gk, (int)row, g->Qk, &o->ksc[pi], &o->klo[pi]);
            for (int64_t t = t0; t < t0 + g->gk; t++) {
                const int code = tl_ref_code(kq[t * row + i], o->ksc[pi], o->klo[pi], g->Qk);
                o->kcode[t * row + i] = (uint8_t)code;
                o->kread[t * row + i] = deq_f32(code, o->ksc[pi], o->klo[pi]) * o->s[t * H + i / d];
            }
        }
    for (int64_t t = 0; t < P; t++) /* values: QV */
        for (int h = 0; h < H; h++)
            for (int j = 0; j < ng; j++) {
                const size_t pi = ((size_t)t * H + h) * ng + j;
                const float *x = o->xv + t * row + (int64_t)h * d + j * g->gv;
                tl_ref_params(x, g->gv, 1, g->Qv, &o->vsc[pi], &o->vlo[pi]);
                for (int c = 0; c < g->gv; c++) {
                    const int64_t i = t * row + (int64_t)h * d + j * g->gv + c;
                    const int code = tl_ref_code(x[c], o->vsc[pi], o->vlo[pi], g->Qv);
                    o->vcode[i] = (uint8_t)code;
                    o->vdeq[i] = deq_f32(code, o->vsc[pi], o->vlo[pi]);
                }
            }
    for (int64_t t = 0; t < T; t++) /* the original space, float64 */
        for (int h = 0; h < H; h++) {
            const int64_t b = t * row + (int64_t)h * d;
            const int packed = g->quant && t < P;
            for (int c = 0; c < d; c++) buf[c] = packed ? (double)o->kread[b + c] : o->xk[b + c];
            if (g->rot) tl_hadamard_ref(buf, buf, d);
            memcpy(o->krec + b, buf, sizeof(double) * (size_t)d);
            for (int c = 0; c < d; c++) buf[c] = packed ? (double)o->vdeq[b + c] : o->xv[b + c];
            if (g->rotv) tl_hadamard_ref(buf, buf, d);
            memcpy(o->vrec + b, buf, sizeof(double) * (size_t)d);
        }
    free(kq);
}

/* Adversarial keys for per-head norms: head 0 huge, head 1 tiny (when there
 * are two heads or more), outlier channels from the flavour, a constant key
 * channel group, and every 7th token with an all-zero head 2 (norm 0 -> 1). */
static void make_adversarial(tl_rng *r, int flavor, float *k, float *v, int64_t T, int hkv, int d, float big,
                             float tiny) {
    tl_gen_kv(r, flavor, k, v, T, hkv, d, OSCAR_DTYPE_F32);
    const int64_t row = (int64_t)hkv * d;
    for (int64_t t = 0; t < T; t++) {
        for (int c = 0; c < d; c++) {
            k[t * row + c] *= big;
            if (hkv > 1) k[t * row + d + c] *= tiny;
        }
        if (hkv > 1) /* a group of 16 channels of head 1 constant over all tokens */
            for (int c = 16; c < 32; c++) k[t * row + d + c] = 0.25f * tiny;
        if (hkv > 2 && t % 7 == 3)
            for (int c = 0; c < d; c++) k[t * row + 2 * d + c] = 0.0f;
    }
}

typedef struct v4_case {
    oscar_method method;
    int bits, kb, vb, nph, d, hkv, hq, R, gk, gv, q_len, chunk, flavor;
    int64_t T;
} v4_case;

/* Exact configurations (no rotation, fp32 window: every number the library
 * computes is one the reference computes the same way): the read-back equals
 * the reference bit for bit, the exported block holds the reference's codes,
 * (scale, lo) pairs and norms where FORMAT.md puts them, and attention
 * matches float64 attention over the reference. */
static void run_exact_case(const v4_case *vc, tl_rng *r) {
    oscar_config cfg = tl_small_config(vc->method, vc->bits, vc->d, vc->hkv, vc->hq);
    cfg.residual = vc->R;
    cfg.k_group = vc->gk;
    cfg.v_group = vc->gv;
    cfg.window_dtype = OSCAR_DTYPE_F32;
    cfg.key_norm_per_head = vc->nph;
    cfg.key_bits = vc->kb;
    cfg.value_bits = vc->vb;
    cfg.block_count = 32;
    const tl_geom g = tl_geom_of(&cfg);
    printf("   %-10s bits=%d K%d/V%d per-head=%d d=%d Hkv=%d R=%d Gk=%d Gv=%d T=%lld chunk=%d %s\n",
           oscar_method_name(vc->method), vc->bits, g.kbits, g.vbits, vc->nph, vc->d, vc->hkv, vc->R, vc->gk, vc->gv,
           (long long)vc->T, vc->chunk, tl_flavor_name(vc->flavor));
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    const int d = vc->d, H = vc->hkv, R = vc->R;
    const int64_t row = (int64_t)H * d, T = vc->T, P = T / R * R;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    make_adversarial(r, vc->flavor, k, v, T, H, d, 300.0f, 0.003f);
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    for (int64_t done = 0; done < T;) {
        int64_t n = vc->chunk ? tl_randint(r, 1, vc->chunk) : T;
        if (n > T - done) n = T - done;
        if (!CHECK_OK(tl_append(c, 0, seq, k + done * row, v + done * row, n, H, d, OSCAR_DTYPE_F32))) break;
        done += n;
    }
    oref o;
    oref_build(&g, k, v, T, P, &o);
    float *kl, *vl;
    if (CHECK(tl_read_all(c, seq, 0, H, d, &kl, &vl) == T)) {
        int64_t bk = 0, bv = 0;
        for (int64_t i = 0; i < T * row; i++) {
            const float wk = i < P * row ? o.kread[i] : o.xk[i], wv = i < P * row ? o.vdeq[i] : o.xv[i];
            bk += memcmp(&kl[i], &wk, 4) != 0;
            bv += memcmp(&vl[i], &wv, 4) != 0;
        }
        CHECKF(bk == 0 && bv == 0, "read-back differs from the FORMAT.md reference: %lld K, %lld V of %lld elements",
               (long long)bk, (long long)bv, (long long)(T * row));
        /* the bytes of every block where FORMAT.md puts them */
        size_t n = 0;
        unsigned char *s = tl_export(c, seq, &n);
        int64_t bad_codes = 0, bad_params = 0, bad_norms = 0;
        if (s) {
            CHECK(tl_rd32(s + 8) == 5 && tl_rd32(s + 16) == (uint32_t)g.kbits && tl_rd32(s + 64) == (uint32_t)g.vbits &&
                  tl_rd32(s + 68) == (uint32_t)g.norm_per_head);
            uint8_t *plane = malloc((size_t)R * d);
            for (int64_t b = 0; b < P / R; b++) {
                const unsigned char *blk = s + 80 + 16 + (size_t)b * g.LB;
                for (int h = 0; h < H; h++) {
                    const unsigned char *hb = blk + (size_t)h * g.head_bytes;
                    for (int kv = 0; kv < 2; kv++) {
                        tl_decode_codes(kv ? hb + g.kcodes_bytes : hb, R, d, kv ? g.vbits : g.kbits, kv, plane);
                        for (int t = 0; t < R; t++)
                            for (int ch = 0; ch < d; ch++)
                                bad_codes += plane[t * d + ch] !=
                                             (kv ? o.vcode : o.kcode)[(b * R + t) * row + (int64_t)h * d + ch];
                    }
                    const unsigned char *kp = hb + g.kcodes_bytes + g.vcodes_bytes, *vp = kp + g.kparams_bytes;
                    for (int gi = 0; gi < R / vc->gk; gi++)
                        for (int ch = 0; ch < d; ch++) {
                            const size_t pi = (size_t)(b * R / vc->gk + gi) * row + (size_t)h * d + ch;
                            bad_params += tl_rd32(kp + 4 * ((size_t)gi * d + ch)) !=
                                          ((uint32_t)o.ksc[pi] | (uint32_t)o.klo[pi] << 16);
                        }
                    for (int t = 0; t < R; t++)
                        for (int j = 0; j < d / vc->gv; j++) {
                            const size_t pi = ((size_t)(b * R + t) * H + h) * (d / vc->gv) + j;
                            bad_params += tl_rd32(vp + 4 * ((size_t)t * (d / vc->gv) + j)) !=
                                          ((uint32_t)o.vsc[pi] | (uint32_t)o.vlo[pi] << 16);
                        }
                }
                if (g.scale) /* [R], or [Hkv][R] with per-head norms */
                    for (int h = 0; h < (g.norm_per_head ? H : 1); h++)
                        for (int t = 0; t < R; t++) {
                            uint32_t u;
                            memcpy(&u, &o.s[(b * R + t) * H + h], 4);
                            bad_norms += tl_rd32(blk + (size_t)H * g.head_bytes + 4 * ((size_t)h * R + t)) != u;
                        }
            }
            free(plane);
            CHECKF(s && n > 80 + 16 + (size_t)(P / R) * g.LB, "stream of %zu bytes", n);
        }
        CHECKF(bad_codes == 0 && bad_params == 0 && bad_norms == 0,
               "stored block differs from FORMAT.md: %lld codes, %lld (scale, lo) pairs, %lld norms", (long long)bad_codes,
               (long long)bad_params, (long long)bad_norms);
        free(s);
        /* attention against float64 attention over the reference's tokens */
        const int64_t nq = (int64_t)vc->q_len * vc->hq * d;
        float *q = malloc(sizeof(float) * (size_t)nq), *out = malloc(sizeof(float) * (size_t)nq);
        double *o_ref = malloc(sizeof(double) * (size_t)nq), *mag = malloc(sizeof(double) * (size_t)(vc->q_len * vc->hq));
        /* queries sized for the tiny head too: logits of a few units there */
        tl_gen_q(r, q, vc->q_len, vc->hq, d, tl_key_rms_norm(k, T, H, d), 2.0, OSCAR_DTYPE_F32);
        for (int i = 0; i < vc->q_len; i++)
            for (int j = 0; j < vc->hq; j++)
                if (H > 1 && j / (vc->hq / H) == 1)
                    for (int ch = 0; ch < d; ch++) q[((int64_t)i * vc->hq + j) * d + ch] *= 3e4f;
        CHECK_OK(tl_attention(c, 0, 1, &seq, vc->q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, out, vc->hq, d));
        tl_ref_attention(d, H, vc->hq, o.krec, o.vrec, T, vc->q_len, q, 1.0 / sqrt((double)d), o_ref, mag);
        double w = 0;
        const int64_t nb = tl_compare_out(out, o_ref, mag, (int64_t)vc->q_len * vc->hq, d, OSCAR_DTYPE_F32, 1e-5, &w);
        CHECKF(nb == 0, "attention vs float64 over the reference: %lld elements, worst %.3g", (long long)nb, w);
        free(q), free(out), free(o_ref), free(mag);
        free(kl), free(vl);
    }
    oref_free(&o);
    free(k), free(v);
    oscar_cache_destroy(c);
}

static void test_v4_exact_reference(void) {
    tl_rng r = tl_rng_for("v4_exact_reference");
    static const v4_case cases[] = {
        /* per-head norms: 2 and 4 bits, adversarial heads, odd lengths, decode and chunked prefill */
        {OSCAR_METHOD_SCALE_ONLY, 2, 0, 0, 1, 64, 3, 9, 32, 32, 32, 1, 0, TL_FLAVOR_OUTLIERS, 3 * 32 + 5},
        {OSCAR_METHOD_SCALE_ONLY, 4, 0, 0, 1, 64, 3, 6, 32, 16, 16, 5, 13, TL_FLAVOR_SINKS, 4 * 32 + 31},
        {OSCAR_METHOD_SCALE_ONLY, 2, 0, 0, 1, 128, 4, 8, 64, 32, 32, 9, 0, TL_FLAVOR_CONST, 2 * 64 + 1},
        /* as published (all-head norms) through the same reference: it must tell the two apart */
        {OSCAR_METHOD_SCALE_ONLY, 2, 0, 0, 0, 64, 3, 9, 32, 32, 32, 3, 0, TL_FLAVOR_OUTLIERS, 3 * 32 + 5},
        /* separate widths: K4/V2 and K2/V4, the fast 2-bit kernel on one side and the generic one on the other */
        {OSCAR_METHOD_KIVI, 2, 4, 2, 0, 64, 2, 4, 32, 32, 32, 3, 0, TL_FLAVOR_OUTLIERS, 2 * 32 + 7},
        {OSCAR_METHOD_KIVI, 2, 2, 4, 0, 64, 2, 4, 32, 32, 32, 3, 0, TL_FLAVOR_OUTLIERS, 2 * 32 + 7},
        {OSCAR_METHOD_KIVI, 4, 0, 2, 0, 128, 1, 2, 32, 16, 32, 8, 11, TL_FLAVOR_CONST, 3 * 32 + 9},
        {OSCAR_METHOD_KIVI, 4, 2, 0, 0, 256, 2, 2, 32, 32, 16, 2, 0, TL_FLAVOR_ZERO, 32 + 17},
        /* both options together */
        {OSCAR_METHOD_SCALE_ONLY, 2, 4, 2, 1, 64, 3, 3, 32, 32, 32, 4, 9, TL_FLAVOR_OUTLIERS, 3 * 32 + 3},
        {OSCAR_METHOD_SCALE_ONLY, 2, 2, 4, 1, 128, 2, 8, 64, 32, 64, 7, 0, TL_FLAVOR_SINKS, 2 * 64 + 63},
        /* 3-bit codes (format version 5): K3/V2, K2/V3, K3/V3, K3/V4, every head_dim, groups of 16 to 128,
         * adversarial data (outlier channels, constant groups, zeros, sinks), odd lengths, decode and chunks */
        {OSCAR_METHOD_KIVI, 2, 3, 2, 0, 64, 2, 4, 64, 64, 64, 3, 0, TL_FLAVOR_OUTLIERS, 2 * 64 + 7},
        {OSCAR_METHOD_KIVI, 2, 2, 3, 0, 64, 2, 4, 32, 32, 32, 3, 0, TL_FLAVOR_OUTLIERS, 3 * 32 + 1},
        {OSCAR_METHOD_KIVI, 2, 3, 3, 0, 128, 1, 2, 32, 16, 16, 8, 11, TL_FLAVOR_CONST, 3 * 32 + 9},
        {OSCAR_METHOD_KIVI, 4, 3, 0, 0, 256, 2, 2, 32, 32, 16, 2, 0, TL_FLAVOR_ZERO, 32 + 17},
        {OSCAR_METHOD_SCALE_ONLY, 2, 3, 2, 0, 64, 3, 9, 128, 128, 64, 4, 37, TL_FLAVOR_OUTLIERS, 2 * 128 + 5},
        {OSCAR_METHOD_SCALE_ONLY, 2, 3, 3, 1, 128, 2, 8, 64, 32, 64, 7, 0, TL_FLAVOR_SINKS, 2 * 64 + 63},
        {OSCAR_METHOD_SCALE_ONLY, 2, 2, 3, 1, 64, 3, 3, 32, 32, 32, 1, 9, TL_FLAVOR_CONST, 3 * 32 + 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_exact_case(&cases[i], &r);
}

/* Rotating configurations (OScaR itself, fp16 window, sinks and a lag,
 * chunked appends, several query rows): the library's fp32 rotation may
 * round a window value differently from the float64 one, so the read-back
 * is held to the reference within a code flip; attention is held tightly to
 * float64 attention over the library's own read-back (which checks that the
 * kernels read each head's norm and each side's width) and loosely to the
 * reference. */
static void test_v4_oscar_reference(void) {
    tl_rng r = tl_rng_for("v4_oscar_reference");
    static const struct {
        int bits, kb, vb, nph, d, hkv, hq, R, S, lag, q_len, chunk;
        int64_t T;
    } cases[] = {
        {2, 0, 0, 1, 64, 3, 9, 32, 0, 0, 1, 0, 3 * 32 + 5},
        {2, 0, 0, 1, 128, 2, 8, 64, 4, 16, 6, 40, 250},
        {2, 4, 2, 0, 64, 3, 9, 32, 0, 8, 3, 21, 150},
        {2, 2, 4, 0, 128, 2, 4, 64, 0, 0, 1, 0, 201},
        {4, 0, 2, 1, 64, 2, 4, 32, 5, 8, 9, 17, 163},
        {2, 4, 0, 1, 64, 1, 3, 32, 0, 0, 2, 0, 99},
        /* 3-bit codes (format version 5) */
        {2, 3, 2, 0, 64, 3, 9, 64, 32, 64, 3, 21, 300},
        {2, 2, 3, 0, 128, 2, 4, 64, 0, 0, 1, 0, 201},
        {2, 3, 3, 1, 64, 2, 4, 32, 5, 8, 9, 17, 163},
        {4, 3, 0, 0, 256, 1, 2, 32, 0, 0, 2, 0, 99},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int d = cases[ci].d, H = cases[ci].hkv, hq = cases[ci].hq, R = cases[ci].R, S = cases[ci].S;
        oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, cases[ci].bits, d, H, hq);
        cfg.residual = R;
        cfg.sink_tokens = S;
        cfg.rollback_tokens = cases[ci].lag;
        cfg.key_bits = cases[ci].kb;
        cfg.value_bits = cases[ci].vb;
        cfg.key_norm_per_head = cases[ci].nph;
        cfg.block_count = 32;
        const tl_geom g = tl_geom_of(&cfg);
        printf("   oscar K%d/V%d per-head=%d d=%d Hkv=%d R=%d S=%d L=%d T=%lld q_len=%d\n", g.kbits, g.vbits,
               cases[ci].nph, d, H, R, S, cases[ci].lag, (long long)cases[ci].T, cases[ci].q_len);
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        const int64_t row = (int64_t)H * d, T = cases[ci].T;
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        make_adversarial(&r, TL_FLAVOR_OUTLIERS, k, v, T, H, d, 30.0f, 0.01f); /* within fp16 */
        int32_t seq;
        CHECK_OK(oscar_seq_add(c, &seq));
        for (int64_t done = 0; done < T;) {
            int64_t n = cases[ci].chunk ? tl_randint(&r, 1, cases[ci].chunk) : T;
            if (n > T - done) n = T - done;
            if (!CHECK_OK(tl_append(c, 0, seq, k + done * row, v + done * row, n, H, d, OSCAR_DTYPE_F32))) break;
            done += n;
        }
        oscar_seq_info info;
        CHECK_OK(oscar_seq_info_get(c, seq, 0, &info));
        const int64_t P = info.packed_tokens, sh = T < S ? T : S;
        /* the reference: sinks exact, then the tokens after them */
        oref os, o;
        oref_build(&g, k, v, sh, 0, &os);
        oref_build(&g, k + sh * row, v + sh * row, T - sh, P, &o);
        double *krec = malloc(sizeof(double) * (size_t)(T * row)), *vrec = malloc(sizeof(double) * (size_t)(T * row));
        memcpy(krec, os.krec, sizeof(double) * (size_t)(sh * row));
        memcpy(vrec, os.vrec, sizeof(double) * (size_t)(sh * row));
        memcpy(krec + sh * row, o.krec, sizeof(double) * (size_t)((T - sh) * row));
        memcpy(vrec + sh * row, o.vrec, sizeof(double) * (size_t)((T - sh) * row));
        float *kl, *vl;
        if (CHECK(tl_read_all(c, seq, 0, H, d, &kl, &vl) == T)) {
            /* per head (the tiny head has its own scale), within one code step */
            double wk = 0, wv = 0;
            for (int64_t t = 0; t < T; t++)
                for (int h = 0; h < H; h++) {
                    const int64_t b = t * row + (int64_t)h * d;
                    double mk = tl_max_abs(krec + b, d), mv = tl_max_abs(vrec + b, d);
                    for (int ch = 0; ch < d; ch++) {
                        const double ek = fabs(kl[b + ch] - krec[b + ch]) / (mk > 0 ? mk : 1);
                        const double ev = fabs(vl[b + ch] - vrec[b + ch]) / (mv > 0 ? mv : 1);
                        if (!(ek <= wk)) wk = ek;
                        if (!(ev <= wv)) wv = ev;
                    }
                }
            /* one step of a group, relative: 1/3, 1/7, 1/15 of its range */
            const double ak = g.kbits == 2 ? 0.75 : g.kbits == 3 ? 0.35 : 0.2;
            const double av = g.vbits == 2 ? 0.75 : g.vbits == 3 ? 0.35 : 0.2;
            CHECKF(wk < ak && wv < av, "read-back vs the reference: K %.3g (allowed %.2g), V %.3g (allowed %.2g)", wk,
                   ak, wv, av);
            /* mean relative error per side: a wrong width or a wrong head's norm shows at once */
            double ek = 0, nk = 0, ev = 0, nv = 0;
            for (int64_t i = sh * row; i < (sh + P) * row; i++) {
                ek += (kl[i] - krec[i]) * (kl[i] - krec[i]), nk += krec[i] * krec[i];
                ev += (vl[i] - vrec[i]) * (vl[i] - vrec[i]), nv += vrec[i] * vrec[i];
            }
            CHECKF(ek <= 1e-4 * nk && ev <= 1e-4 * nv, "packed read-back vs the reference: K %.3g, V %.3g of the energy",
                   ek / (nk > 0 ? nk : 1), ev / (nv > 0 ? nv : 1));
            const int q_len = cases[ci].q_len;
            const int64_t nq = (int64_t)q_len * hq * d;
            float *q = malloc(sizeof(float) * (size_t)nq), *out = malloc(sizeof(float) * (size_t)nq);
            double *o_lib = malloc(sizeof(double) * (size_t)nq), *o_ref = malloc(sizeof(double) * (size_t)nq);
            double *mag = malloc(sizeof(double) * (size_t)(q_len * hq));
            tl_gen_q(&r, q, q_len, hq, d, tl_key_rms_norm(k, T, H, d), 2.0, OSCAR_DTYPE_F32);
            CHECK_OK(tl_attention(c, 0, 1, &seq, q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, out, hq, d));
            const double sm = 1.0 / sqrt((double)d);
            tl_ref_attention_f(d, H, hq, kl, vl, T, q_len, q, sm, o_lib, mag);
            double w1 = 0, w2 = 0;
            const int64_t b1 = tl_compare_out(out, o_lib, mag, (int64_t)q_len * hq, d, OSCAR_DTYPE_F32, 1e-5, &w1);
            CHECKF(b1 == 0, "attention vs float64 over the read-back: %lld elements, worst %.3g", (long long)b1, w1);
            tl_ref_attention(d, H, hq, krec, vrec, T, q_len, q, sm, o_ref, mag);
            const int64_t b2 = tl_compare_out(out, o_ref, mag, (int64_t)q_len * hq, d, OSCAR_DTYPE_F32, 0.05, &w2);
            CHECKF(b2 == 0, "attention vs the float64 reference: %lld elements, worst %.3g", (long long)b2, w2);
            free(q), free(out), free(o_lib), free(o_ref), free(mag);
            free(kl), free(vl);
        }
        free(krec), free(vrec);
        oref_free(&os), oref_free(&o);
        free(k), free(v);
        oscar_cache_destroy(c);
    }
}

/* Per-head norms make a cache the sum of its heads: a cache of Hkv heads
 * stores, head for head, the bytes (codes, pairs, norms) and reads back the
 * numbers of Hkv one-head caches, each given its head alone; that is what
 * tensor parallelism needs without an all-gather. With one KV head the
 * per-head and all-head blocks are the same bytes. */
static void test_norm_per_head_shards(void) {
    tl_rng r = tl_rng_for("norm_per_head_shards");
    const int d = 64, H = 3, hq = 6, R = 32;
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, H, hq);
    cfg.residual = R;
    cfg.key_norm_per_head = 1;
    cfg.rollback_tokens = 8;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    const int64_t T = 3 * R + 13, row = (int64_t)H * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    make_adversarial(&r, TL_FLAVOR_SINKS, k, v, T, H, d, 40.0f, 0.002f);
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    CHECK_OK(tl_append(c, 0, seq, k, v, T, H, d, OSCAR_DTYPE_F32));
    const tl_geom g = tl_geom_of(&cfg);
    size_t n = 0;
    unsigned char *s = tl_export(c, seq, &n);
    float *kl, *vl;
    tl_read_all(c, seq, 0, H, d, &kl, &vl);
    const uint32_t nb = s ? tl_rd32(s + 52) : 0;
    CHECK(nb == (T - 8) / R);
    float *kh = malloc(sizeof(float) * (size_t)(T * d)), *vh = malloc(sizeof(float) * (size_t)(T * d));
    for (int h = 0; h < H && s; h++) {
        for (int nph = 0; nph <= 1; nph++) { /* one head: per-head or not, the same bytes */
            oscar_config c1 = cfg;
            c1.num_kv_heads = 1;
            c1.num_q_heads = hq / H;
            c1.key_norm_per_head = nph;
            oscar_cache *one = tl_create(&c1);
            if (!one) continue;
            for (int64_t t = 0; t < T; t++) {
                memcpy(kh + t * d, k + t * row + (int64_t)h * d, sizeof(float) * d);
                memcpy(vh + t * d, v + t * row + (int64_t)h * d, sizeof(float) * d);
            }
            int32_t s1;
            CHECK_OK(oscar_seq_add(one, &s1));
            CHECK_OK(tl_append(one, 0, s1, kh, vh, T, 1, d, OSCAR_DTYPE_F32));
            size_t n1 = 0;
            unsigned char *e1 = tl_export(one, s1, &n1);
            const tl_geom g1 = tl_geom_of(&c1);
            int64_t bad = 0;
            for (uint32_t b = 0; e1 && b < nb; b++) {
                const unsigned char *blk = s + 80 + 16 + (size_t)b * g.LB, *blk1 = e1 + 80 + 16 + (size_t)b * g1.LB;
                bad += memcmp(blk + (size_t)h * g.head_bytes, blk1, g.head_bytes) != 0;
                bad += memcmp(blk + (size_t)H * g.head_bytes + 4 * (size_t)h * R, blk1 + g1.head_bytes, 4 * (size_t)R) != 0;
            }
            CHECKF(e1 && bad == 0, "head %d (one-head cache, per-head %d): %lld block parts differ", h, nph, (long long)bad);
            float *k1, *v1;
            tl_read_all(one, s1, 0, 1, d, &k1, &v1);
            int64_t diff = 0;
            for (int64_t t = 0; t < T; t++)
                diff += memcmp(k1 + t * d, kl + t * row + (int64_t)h * d, sizeof(float) * d) != 0 ||
                        memcmp(v1 + t * d, vl + t * row + (int64_t)h * d, sizeof(float) * d) != 0;
            CHECKF(diff == 0, "head %d: %lld tokens read back differently from a one-head cache", h, (long long)diff);
            free(k1), free(v1), free(e1);
            oscar_cache_destroy(one);
        }
    }
    /* a tensor-parallel append with any gathered sums gives the same blocks
     * with per-head norms; with all-head norms it does not (so this check
     * can see a difference) */
    for (int nph = 1; nph >= 0; nph--) {
        oscar_config c2 = cfg;
        c2.key_norm_per_head = nph;
        oscar_cache *a = tl_create(&c2), *b = tl_create(&c2);
        if (!a || !b) break;
        int32_t sa, sb;
        CHECK_OK(oscar_seq_add(a, &sa));
        CHECK_OK(oscar_seq_add(b, &sb));
        float *sums = malloc(sizeof(float) * (size_t)(T * 2 * H));
        for (int64_t i = 0; i < T * 2 * H; i++) sums[i] = (float)(1.0 + 50.0 * tl_uniform(&r));
        int32_t nt = (int32_t)T;
        CHECK_OK(oscar_append(a, 0, 1, &sa, &nt, k, v, OSCAR_DTYPE_F32, NULL));
        CHECK_OK(oscar_append_with_key_sums(b, 0, 1, &sb, &nt, k, v, OSCAR_DTYPE_F32, sums, 2 * H, NULL));
        float *ka, *va, *kb, *vb;
        tl_read_all(a, sa, 0, H, d, &ka, &va);
        tl_read_all(b, sb, 0, H, d, &kb, &vb);
        const int same = memcmp(ka, kb, sizeof(float) * (size_t)(T * row)) == 0;
        if (nph)
            CHECKF(same, "per-head norms: gathered key sums changed the blocks");
        else
            CHECKF(!same, "all-head norms: gathered key sums did not change the blocks");
        free(ka), free(va), free(kb), free(vb), free(sums);
        oscar_cache_destroy(a);
        oscar_cache_destroy(b);
    }
    free(kh), free(vh), free(kl), free(vl), free(s), free(k), free(v);
    oscar_cache_destroy(c);
}

/* Separate widths: keys of a K4/V2 cache are the keys of a 4-bit cache and
 * its values those of a 2-bit cache, bytes and read-back (and K2/V4 the
 * other way round), with the norms of either. */
static void test_mixed_bits_halves(void) {
    tl_rng r = tl_rng_for("mixed_bits_halves");
    const int d = 128, H = 2, hq = 8, R = 64;
    const int64_t T = 2 * R + 29, row = (int64_t)H * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k, v, T, H, d, OSCAR_DTYPE_F32);
    for (int nph = 0; nph <= 1; nph++)
        for (int kb = 2; kb <= 4; kb += 2) {
            const int vb = 6 - kb;
            oscar_config m = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, H, hq);
            m.residual = R;
            m.key_norm_per_head = nph;
            m.key_bits = kb;
            m.value_bits = vb;
            oscar_config uk = m, uv = m;
            uk.bits = kb, uk.key_bits = uk.value_bits = 0;
            uv.bits = vb, uv.key_bits = uv.value_bits = 0;
            oscar_cache *cm = tl_create(&m), *ck = tl_create(&uk), *cv = tl_create(&uv);
            if (!cm || !ck || !cv) return;
            int32_t sm, sk, sv;
            CHECK_OK(oscar_seq_add(cm, &sm));
            CHECK_OK(oscar_seq_add(ck, &sk));
            CHECK_OK(oscar_seq_add(cv, &sv));
            CHECK_OK(tl_append(cm, 0, sm, k, v, T, H, d, OSCAR_DTYPE_F32));
            CHECK_OK(tl_append(ck, 0, sk, k, v, T, H, d, OSCAR_DTYPE_F32));
            CHECK_OK(tl_append(cv, 0, sv, k, v, T, H, d, OSCAR_DTYPE_F32));
            float *km, *vm, *kk, *vk, *kv2, *vv;
            tl_read_all(cm, sm, 0, H, d, &km, &vm);
            tl_read_all(ck, sk, 0, H, d, &kk, &vk);
            tl_read_all(cv, sv, 0, H, d, &kv2, &vv);
            CHECKF(memcmp(km, kk, sizeof(float) * (size_t)(T * row)) == 0, "K%d/V%d per-head=%d: keys differ from a %d-bit cache's", kb, vb, nph, kb);
            CHECKF(memcmp(vm, vv, sizeof(float) * (size_t)(T * row)) == 0, "K%d/V%d per-head=%d: values differ from a %d-bit cache's", kb, vb, nph, vb);
            /* bytes: K codes and K pairs from the one, V codes and V pairs from the other */
            size_t nm = 0, nk = 0, nv = 0;
            unsigned char *em = tl_export(cm, sm, &nm), *ek = tl_export(ck, sk, &nk), *ev = tl_export(cv, sv, &nv);
            const tl_geom gm = tl_geom_of(&m), gk = tl_geom_of(&uk), gv = tl_geom_of(&uv);
            int64_t bad = 0;
            for (int b = 0; em && ek && ev && b < (int)(T / R); b++) {
                const unsigned char *bm = em + 96 + (size_t)b * gm.LB, *bk = ek + 96 + (size_t)b * gk.LB,
                                    *bv = ev + 96 + (size_t)b * gv.LB;
                for (int h = 0; h < H; h++) {
                    const unsigned char *hm = bm + (size_t)h * gm.head_bytes, *hk = bk + (size_t)h * gk.head_bytes,
                                        *hv = bv + (size_t)h * gv.head_bytes;
                    bad += memcmp(hm, hk, gm.kcodes_bytes) != 0;                                   /* K codes */
                    bad += memcmp(hm + gm.kcodes_bytes, hv + gv.kcodes_bytes, gm.vcodes_bytes) != 0; /* V codes */
                    bad += memcmp(hm + gm.kcodes_bytes + gm.vcodes_bytes, hk + 2 * gk.kcodes_bytes, gm.kparams_bytes) != 0;
                    bad += memcmp(hm + gm.kcodes_bytes + gm.vcodes_bytes + gm.kparams_bytes,
                                  hv + 2 * gv.kcodes_bytes + gv.kparams_bytes, gm.vparams_bytes) != 0;
                }
                bad += memcmp(bm + (size_t)H * gm.head_bytes, bk + (size_t)H * gk.head_bytes, gm.norms_bytes) != 0;
            }
            CHECKF(bad == 0, "K%d/V%d per-head=%d: %lld block parts differ from the uniform caches'", kb, vb, nph,
                   (long long)bad);
            CHECKF(gm.LB == (size_t)H * ((size_t)R * d * (kb + vb) / 8 + 4 * (size_t)d * R / 32 + 4 * (size_t)R * d / 32) +
                                4 * (size_t)R * (nph ? H : 1),
                   "K%d/V%d layer block is %zu bytes", kb, vb, gm.LB);
            double bits = 0;
            CHECK_OK(oscar_config_packed_bits(&m, &bits));
            CHECKF(fabs(bits - 8.0 * (double)gm.LB / (2.0 * R * d * H)) < 1e-12, "packed bits %.6f", bits);
            free(em), free(ek), free(ev);
            free(km), free(vm), free(kk), free(vk), free(kv2), free(vv);
            oscar_cache_destroy(cm), oscar_cache_destroy(ck), oscar_cache_destroy(cv);
        }
    free(k), free(v);
}

/* Export / import of the version-4 options: the header words, round trips,
 * equivalent layouts, mismatches and version-3 streams; every refused import
 * leaves the cache as it was. */
static int cache_unchanged(oscar_cache *c, int32_t seq, const unsigned char *before, size_t n_before,
                           const oscar_memory_stats *m0) {
    oscar_memory_stats m1;
    CHECK_OK(oscar_memory(c, &m1));
    size_t n = 0;
    unsigned char *now = tl_export(c, seq, &n);
    const int same = now && n == n_before && memcmp(now, before, n) == 0 && m1.blocks_used == m0->blocks_used &&
                     m1.seqs_live == m0->seqs_live;
    free(now);
    return same;
}

static void expect_refused(oscar_cache *c, int32_t resident, const unsigned char *s, size_t n, const char *word,
                           const char *what) {
    size_t n0 = 0;
    unsigned char *before = tl_export(c, resident, &n0);
    oscar_memory_stats m0;
    CHECK_OK(oscar_memory(c, &m0));
    int32_t got = -7;
    CHECK_ST(c, oscar_seq_import(c, s, n, &got), OSCAR_E_FORMAT);
    CHECKF(got == -7, "%s: seq_id written on failure", what);
    CHECKF(strstr(oscar_last_error(c), word) != NULL, "%s: message \"%s\" does not name %s", what, oscar_last_error(c),
           word);
    CHECKF(cache_unchanged(c, resident, before, n0, &m0), "%s: a refused import changed the cache", what);
    free(before);
}

/* the stream without the version-4 header words, labelled `version` */
static unsigned char *as_v3(const unsigned char *s, size_t n, uint32_t version, size_t *n3) {
    *n3 = n - 16;
    unsigned char *b = malloc(n);
    memcpy(b, s, 64);
    memcpy(b + 64, s + 80, n - 80);
    tl_wr32(b + 8, version);
    tl_fix_checksum(b, *n3);
    return b;
}

static void test_v4_stream(void) {
    tl_rng r = tl_rng_for("v4_stream");
    const int d = 64, H = 2, hq = 4, R = 32, S = 4;
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, H, hq);
    cfg.residual = R;
    cfg.sink_tokens = S;
    cfg.rollback_tokens = 8;
    cfg.num_layers = 2;
    cfg.key_norm_per_head = 1;
    cfg.key_bits = 4;
    cfg.value_bits = 2;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    const int64_t T = 150, row = (int64_t)H * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    make_adversarial(&r, TL_FLAVOR_SINKS, k, v, T, H, d, 20.0f, 0.01f);
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    CHECK_OK(tl_append(c, 0, seq, k, v, T, H, d, OSCAR_DTYPE_F32));
    CHECK_OK(tl_append(c, 1, seq, k, v, 77, H, d, OSCAR_DTYPE_F32));
    size_t n = 0;
    unsigned char *s = tl_export(c, seq, &n);
    if (!s) return;
    CHECKF(tl_rd32(s + 8) == 5 && tl_rd32(s + 16) == 4 && tl_rd32(s + 64) == 2 && tl_rd32(s + 68) == 1 &&
               tl_rd32(s + 72) == 0 && tl_rd32(s + 76) == 0 && tl_rd32(s + 60) == (uint32_t)S,
           "header: version %u, key bits %u, value bits %u, per-head %u, reserved %u %u", tl_rd32(s + 8),
           tl_rd32(s + 16), tl_rd32(s + 64), tl_rd32(s + 68), tl_rd32(s + 72), tl_rd32(s + 76));
    /* into the same cache and a fresh one: the same bytes, read-back and attention */
    int32_t imp = -1;
    CHECK_OK(oscar_seq_import(c, s, n, &imp));
    CHECK(tl_same_export(c, seq, c, imp));
    oscar_cache *c2 = tl_create(&cfg);
    int32_t imp2 = -1;
    float *q = malloc(sizeof(float) * (size_t)3 * hq * d), *o1 = malloc(sizeof(float) * (size_t)3 * hq * d),
          *o2 = malloc(sizeof(float) * (size_t)3 * hq * d);
    tl_gen_q(&r, q, 3, hq, d, tl_key_rms_norm(k, T, H, d), 2.0, OSCAR_DTYPE_F32);
    if (c2 && CHECK_OK(oscar_seq_import(c2, s, n, &imp2))) {
        CHECK(tl_same_export(c, seq, c2, imp2));
        CHECK_OK(tl_attention(c, 0, 1, &seq, 3, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o1, hq, d));
        CHECK_OK(tl_attention(c2, 0, 1, &imp2, 3, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o2, hq, d));
        CHECK(memcmp(o1, o2, sizeof(float) * (size_t)3 * hq * d) == 0);
        /* it keeps working: appends after the import agree */
        CHECK_OK(tl_append(c, 1, seq, k + 77 * row, v + 77 * row, 40, H, d, OSCAR_DTYPE_F32));
        CHECK_OK(tl_append(c2, 1, imp2, k + 77 * row, v + 77 * row, 40, H, d, OSCAR_DTYPE_F32));
        CHECK(tl_same_export(c, seq, c2, imp2));
    }
    oscar_cache_destroy(c2);
    CHECK_OK(oscar_seq_free(c, imp));
    /* the same layout from other fields (bits 4, value_bits 2) imports; a
     * different one is refused, naming the field, and changes nothing */
    static const struct {
        int bits, kb, vb, nph;
        const char *word;
    } others[] = {
        {4, 0, 2, 1, NULL},        {4, 0, 0, 1, "value bits"}, {2, 0, 2, 1, "key bits"},
        {2, 4, 2, 0, "key_norm_per_head"}, {2, 2, 4, 1, "key bits"},
    };
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        oscar_config oc = cfg;
        oc.bits = others[i].bits, oc.key_bits = others[i].kb, oc.value_bits = others[i].vb;
        oc.key_norm_per_head = others[i].nph;
        oscar_cache *x = tl_create(&oc);
        if (!x) continue;
        int32_t resident, got = -1;
        CHECK_OK(oscar_seq_add(x, &resident));
        CHECK_OK(tl_append(x, 0, resident, k, v, 100, H, d, OSCAR_DTYPE_F32));
        if (!others[i].word) {
            if (CHECK_OK(oscar_seq_import(x, s, n, &got))) {
                size_t nx = 0;
                unsigned char *ex = tl_export(x, got, &nx);
                CHECKF(ex && nx == n && memcmp(ex, s, n) == 0, "the same layout from other fields re-exports differently");
                free(ex);
            }
        } else {
            char what[96];
            snprintf(what, sizeof what, "stream K4/V2 per-head into bits %d K%d V%d per-head %d", others[i].bits,
                     others[i].kb, others[i].vb, others[i].nph);
            expect_refused(x, resident, s, n, others[i].word, what);
        }
        oscar_cache_destroy(x);
    }
    /* crafted header words (checksum fixed): refused, nothing changes */
    static const struct {
        size_t off;
        uint32_t val;
        const char *word;
    } crafted[] = {{64, 4, "value bits"}, {64, 3, "value bits"}, {68, 0, "key_norm_per_head"},
                   {68, 2, "key_norm_per_head"}, {72, 1, "reserved"}, {76, 9, "reserved"}, {16, 2, "key bits"}};
    unsigned char *buf = malloc(n);
    for (size_t i = 0; i < sizeof crafted / sizeof crafted[0]; i++) {
        memcpy(buf, s, n);
        tl_wr32(buf + crafted[i].off, crafted[i].val);
        tl_fix_checksum(buf, n);
        char what[64];
        snprintf(what, sizeof what, "word %zu = %u", crafted[i].off, crafted[i].val);
        expect_refused(c, seq, buf, n, crafted[i].word, what);
    }
    /* a zero norm of head 1 (the second half of the [Hkv][R] norms): refused */
    {
        const tl_geom g = tl_geom_of(&cfg);
        memcpy(buf, s, n);
        const size_t norms = 80 + 16 * 2 + (size_t)H * g.head_bytes; /* block 0 of layer 0 */
        tl_wr32(buf + norms + 4 * (size_t)(R + 5), 0);
        tl_fix_checksum(buf, n);
        expect_refused(c, seq, buf, n, "norm", "zero norm of head 1");
    }
    /* version 3 bytes of a K4/V2 per-head stream: refused (one width, all-head norms) */
    size_t n3 = 0;
    unsigned char *v3 = as_v3(s, n, 3, &n3);
    expect_refused(c, seq, v3, n3, "version 3", "version-3 bytes into K4/V2 per-head");
    free(v3);
    free(buf);
    /* a version-3 stream of the published configuration imports into a
     * cache of that configuration (and re-exports as version 4), into a
     * K2/V4 or per-head cache it does not; a method without norms ignores
     * key_norm_per_head, so the stream of one imports into the other */
    for (int mi = 0; mi < 2; mi++) {
        oscar_config p = cfg;
        p.method = mi ? OSCAR_METHOD_KIVI : OSCAR_METHOD_OSCAR;
        p.key_norm_per_head = p.key_bits = p.value_bits = 0;
        oscar_cache *pc = tl_create(&p);
        if (!pc) continue;
        int32_t ps, got = -1;
        CHECK_OK(oscar_seq_add(pc, &ps));
        CHECK_OK(tl_append(pc, 0, ps, k, v, T, H, d, OSCAR_DTYPE_F32));
        size_t np = 0, n3p = 0;
        unsigned char *sp = tl_export(pc, ps, &np), *s3 = sp ? as_v3(sp, np, 3, &n3p) : NULL;
        if (s3 && CHECK_OK(oscar_seq_import(pc, s3, n3p, &got))) {
            size_t n2 = 0;
            unsigned char *again = tl_export(pc, got, &n2);
            CHECKF(again && n2 == np && memcmp(again, sp, np) == 0, "a version-3 stream does not re-export as version 4");
            free(again);
        }
        oscar_config q2 = p;
        q2.value_bits = 4;
        oscar_config q3 = p;
        q3.key_norm_per_head = 1;
        oscar_cache *x2 = tl_create(&q2), *x3 = tl_create(&q3);
        int32_t r2, r3;
        if (x2 && s3) {
            CHECK_OK(oscar_seq_add(x2, &r2));
            expect_refused(x2, r2, s3, n3p, "value bits", "version 3 into K2/V4");
        }
        if (x3 && s3) {
            CHECK_OK(oscar_seq_add(x3, &r3));
            if (mi == 0) {
                expect_refused(x3, r3, s3, n3p, "key_norm_per_head", "version 3 into per-head norms");
            } else { /* KIVI: no norms, nothing differs */
                int32_t g3 = -1;
                CHECK_OK(oscar_seq_import(x3, s3, n3p, &g3));
                CHECK_OK(oscar_seq_import(x3, sp, np, &g3));
            }
        }
        oscar_cache_destroy(x2), oscar_cache_destroy(x3);
        free(sp), free(s3);
        oscar_cache_destroy(pc);
    }
    free(q), free(o1), free(o2), free(s), free(k), free(v);
    oscar_cache_destroy(c);
}

/* The CPU batch API (caller_metadata = 1) runs the options: the same
 * attention, bit for bit, as the sequence API over the same tokens. */
static void test_v4_batch_api(void) {
    tl_rng r = tl_rng_for("v4_batch_api");
    const int d = 64, H = 2, hq = 4, R = 32, q_len = 3;
    const int64_t T = 3 * R + 11, row = (int64_t)H * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    make_adversarial(&r, TL_FLAVOR_OUTLIERS, k, v, T, H, d, 20.0f, 0.01f);
    for (int variant = 0; variant < 3; variant++) {
        oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, H, hq);
        cfg.residual = R;
        cfg.key_norm_per_head = 1;
        cfg.key_bits = variant == 2 ? 3 : variant ? 2 : 4; /* K4/V2, K2/V4, K3/V3 (format version 5) */
        cfg.value_bits = variant == 2 ? 3 : variant ? 4 : 2;
        oscar_config bc = cfg;
        bc.caller_metadata = 1;
        oscar_cache *a = tl_create(&cfg), *b = tl_create(&bc);
        if (!a || !b) return;
        int32_t seq, nt = (int32_t)T;
        CHECK_OK(oscar_seq_add(a, &seq));
        CHECK_OK(oscar_append(a, 0, 1, &seq, &nt, k, v, OSCAR_DTYPE_F32, NULL));
        int32_t len = (int32_t)T, slot = 0, table[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        oscar_batch ba;
        memset(&ba, 0, sizeof ba);
        ba.num_seqs = 1;
        ba.tokens_per_seq = (int32_t)T;
        ba.max_seq_len = (int32_t)T;
        ba.block_table_stride = 8;
        ba.seq_lens = &len;
        ba.window_slots = &slot;
        ba.block_tables = table;
        CHECK_OK(oscar_batch_append(b, 0, &ba, k, v, OSCAR_DTYPE_F32, NULL));
        oscar_batch bq = ba;
        bq.tokens_per_seq = q_len;
        const int64_t nq = (int64_t)q_len * hq * d;
        float *q = malloc(sizeof(float) * (size_t)nq), *oa = malloc(sizeof(float) * (size_t)nq),
              *ob = malloc(sizeof(float) * (size_t)nq);
        tl_gen_q(&r, q, q_len, hq, d, tl_key_rms_norm(k, T, H, d), 2.0, OSCAR_DTYPE_F32);
        CHECK_OK(oscar_attention(a, 0, 1, &seq, q_len, q, OSCAR_DTYPE_F32, oa, OSCAR_DTYPE_F32, 0.0f, NULL));
        CHECK_OK(oscar_batch_attention(b, 0, &bq, q, OSCAR_DTYPE_F32, ob, OSCAR_DTYPE_F32, 0.0f, NULL));
        CHECKF(memcmp(oa, ob, sizeof(float) * (size_t)nq) == 0, "K%d/V%d per-head: batch API attention differs",
               cfg.key_bits, cfg.value_bits);
        free(q), free(oa), free(ob);
        oscar_cache_destroy(a), oscar_cache_destroy(b);
    }
    free(k), free(v);
}

static void test_v4_config_checks(void) {
    char eb[512];
    oscar_config c = oscar_config_default();
    CHECK(c.key_norm_per_head == 0 && c.key_bits == 0 && c.value_bits == 0);
    static const struct {
        int field, val;
        const char *word;
    } bad[] = {{0, 2, "key_norm_per_head"}, {0, -1, "key_norm_per_head"}, {1, 5, "key_bits"}, {1, 1, "key_bits"},
               {1, 8, "key_bits"},          {1, -2, "key_bits"},          {2, 5, "value_bits"}, {2, 16, "value_bits"},
               {2, 1, "value_bits"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        c = oscar_config_default();
        *(bad[i].field == 0 ? &c.key_norm_per_head : bad[i].field == 1 ? &c.key_bits : &c.value_bits) = bad[i].val;
        eb[0] = 0;
        CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
        CHECKF(strstr(eb, bad[i].word) != NULL, "message: %s", eb);
        oscar_cache *x = (oscar_cache *)&c; /* must become NULL */
        CHECK_ST(NULL, oscar_cache_create(&c, &x, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
        CHECK(x == NULL);
        c.method = OSCAR_METHOD_NONE; /* ignored by method none, but still checked */
        CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    }
    c = oscar_config_default();
    c.key_bits = 4;
    c.value_bits = 2;
    c.key_norm_per_head = 1;
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    c.caller_metadata = 1; /* the CPU batch API has them */
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    c.method = OSCAR_METHOD_NONE;
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    for (int kb = 0; kb <= 4; kb++) /* 3-bit codes: format version 5 */
        for (int vb = 0; vb <= 4; vb++) {
            if (kb == 1 || vb == 1) continue;
            c = oscar_config_default();
            c.key_bits = kb, c.value_bits = vb;
            CHECKF(oscar_config_validate(&c, eb, sizeof eb) == OSCAR_OK, "K%d/V%d refused: %s", kb, vb, eb);
        }
    /* bits per element: default d=128, Hkv=8, R=128, G=32: 2 + 1 + 32/(2*8*128) */
    static const struct {
        int bits, kb, vb, nph;
        double want;
    } pb[] = {{2, 0, 0, 0, 3.015625}, {2, 0, 0, 1, 3.125},    {2, 4, 0, 0, 4.015625}, {4, 0, 2, 0, 4.015625},
              {2, 0, 4, 1, 4.125},    {4, 2, 2, 0, 3.015625}, {4, 0, 0, 1, 5.125},
              /* 3-bit codes: (3 + 1 + 2 + 1) / 2 + 1/64, ... */
              {2, 3, 0, 0, 3.515625}, {2, 0, 3, 0, 3.515625}, {2, 3, 3, 0, 4.015625}, {4, 3, 0, 1, 4.625},
              {2, 3, 3, 1, 4.125}};
    for (size_t i = 0; i < sizeof pb / sizeof pb[0]; i++) {
        c = oscar_config_default();
        c.bits = pb[i].bits, c.key_bits = pb[i].kb, c.value_bits = pb[i].vb, c.key_norm_per_head = pb[i].nph;
        double got = 0;
        CHECK_OK(oscar_config_packed_bits(&c, &got));
        CHECKF(fabs(got - pb[i].want) < 1e-12, "bits %d K%d V%d per-head %d: %.6f bits per element, expected %.6f",
               pb[i].bits, pb[i].kb, pb[i].vb, pb[i].nph, got, pb[i].want);
    }
    /* memory: the pool grows by the norms of the other heads */
    oscar_config a = oscar_config_default(), b = a;
    b.key_norm_per_head = 1;
    oscar_memory_requirements ma, mb;
    CHECK_OK(oscar_memory_requirements_get(&a, &ma, eb, sizeof eb));
    CHECK_OK(oscar_memory_requirements_get(&b, &mb, eb, sizeof eb));
    CHECK(mb.pool_bytes == ma.pool_bytes + (size_t)(a.num_kv_heads - 1) * 4 * a.residual * a.num_layers * a.block_count);
    CHECK(mb.window_bytes == ma.window_bytes);
    /* the CUDA backend takes them (format version 5, sixth session); without
     * a usable CUDA device the backend is refused as for any configuration */
    for (int which = 0; which < 5; which++) {
        c = oscar_config_default();
        c.backend = OSCAR_BACKEND_CUDA;
        c.block_count = 4;
        c.max_seqs = 1;
        if (which == 0) c.key_norm_per_head = 1;
        if (which == 1) c.key_bits = 4;
        if (which == 2) c.value_bits = 4;
        if (which == 3) c.key_bits = 3;
        if (which == 4) c.value_bits = 3, c.bits = 4;
        oscar_cache *x = NULL;
        if (oscar_backend_available(OSCAR_BACKEND_CUDA)) {
            CHECK_OK(oscar_cache_create(&c, &x, eb, sizeof eb));
            oscar_cache_destroy(x);
        } else {
            CHECK_ST(NULL, oscar_cache_create(&c, &x, eb, sizeof eb), OSCAR_E_UNSUPPORTED);
            CHECK(x == NULL);
            CHECKF(strstr(eb, "CUDA backend") != NULL, "message: %s", eb);
            oscar_memory_requirements mr;
            CHECK_ST(NULL, oscar_memory_requirements_get(&c, &mr, eb, sizeof eb), OSCAR_E_UNSUPPORTED);
        }
    }
    /* a caller of the version-3 header: its struct_size is the offset of
     * key_norm_per_head, or that struct's sizeof (rounded up to its
     * alignment); the new fields read as 0 whatever the bytes hold */
    const size_t v3 = offsetof(oscar_config, key_norm_per_head);
    const size_t al = _Alignof(oscar_config), v3_sizeof = (v3 + al - 1) / al * al;
    for (int variant = 0; variant < 2; variant++) {
        c = oscar_config_default();
        c.key_norm_per_head = 9; /* beyond the old struct: ignored */
        c.key_bits = 5;
        c.value_bits = -1;
        c.struct_size = variant ? v3_sizeof : v3;
        c.head_dim = 64;
        c.num_kv_heads = 1;
        c.num_q_heads = 1;
        c.block_count = 4;
        c.max_seqs = 1;
        c.sink_tokens = 2; /* a version-3 field: kept */
        CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
        oscar_cache *x = NULL;
        CHECK_OK(oscar_cache_create(&c, &x, eb, sizeof eb));
        if (!x) continue;
        oscar_config got;
        memset(&got, 0xab, sizeof got);
        got.struct_size = c.struct_size;
        CHECK_OK(oscar_cache_config(x, &got));
        CHECK(got.struct_size == c.struct_size && got.sink_tokens == 2 && got.head_dim == 64);
        unsigned char tail[sizeof(oscar_config)];
        memset(tail, 0xab, sizeof tail);
        CHECKF(memcmp((unsigned char *)&got + v3, tail, sizeof(oscar_config) - v3) == 0,
               "cache_config wrote past the version-3 fields");
        got.struct_size = sizeof got;
        CHECK_OK(oscar_cache_config(x, &got));
        CHECK(got.key_norm_per_head == 0 && got.key_bits == 0 && got.value_bits == 0 && got.sink_tokens == 2);
        oscar_cache_destroy(x);
    }
    c = oscar_config_default();
    c.struct_size = v3 + 4 == v3_sizeof ? v3 + 8 : v3 + 4; /* neither */
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    CHECKF(strstr(eb, "struct_size") != NULL, "message: %s", eb);
}


/* ---- format version 5: 3-bit codes ------------------------------------------ */

/* The bytes of a 3-bit code array, written here from the text of FORMAT.md
 * (version 5) alone: the low two bits of the code of (token, channel) go to
 * the 2-bit plane (R*d/4 bytes, 16-token tiles of 4d bytes, lane chunks of
 * d/8 bytes, pair q in word q/8 at bits 16e + 2(q%8)), the high bit to the
 * 1-bit plane after it (tiles of 2d bytes, lane chunks of d/16 bytes, pair
 * q in word q/16 at bit 16e + q%16). Lane, pair and element by the table of
 * "Code tiles". */
static void v5_expected_codes(const uint8_t *code, int R, int d, int is_value, unsigned char *out) {
    memset(out, 0, (size_t)R * d * 3 / 8);
    for (int T = 0; T < R / 16; T++)
        for (int l = 0; l < 32; l++)
            for (int q = 0; q < d / 4; q++)
                for (int e = 0; e < 2; e++) {
                    const int g = l / 4, t = l % 4, s = q / 4, j = q % 4;
                    const int tok = is_value ? 16 * T + 2 * t + 8 * (j >> 1) + e : 16 * T + g + 8 * (j & 1);
                    const int ch = is_value ? 16 * s + g + 8 * (j & 1) : 16 * s + 2 * t + 8 * (j >> 1) + e;
                    const unsigned c = code[(size_t)tok * d + ch];
                    const size_t lo_bit = 8 * ((size_t)T * 4 * d + (size_t)l * (d / 8) + (size_t)(q / 8) * 4) +
                                          (size_t)(16 * e + 2 * (q % 8));
                    const size_t hi_bit = 8 * ((size_t)R * d / 4 + (size_t)T * 2 * d + (size_t)l * (d / 16) +
                                               (size_t)(q / 16) * 4) +
                                          (size_t)(16 * e + q % 16);
                    /* little-endian words: bit b of a word is bit b%8 of its byte b/8 */
                    out[lo_bit / 8] |= (unsigned char)((c & 3u) << (lo_bit % 8));
                    out[hi_bit / 8] |= (unsigned char)(((c >> 2) & 1u) << (hi_bit % 8));
                }
}

/* A 3-bit cache's block bytes against FORMAT.md written out by hand (above),
 * its codes against the float64 reference quantiser with 7 levels, and every
 * code value 0..7 seen (a width of 2 or 4, or Q = 8, would miss or exceed). */
static void test_v5_layout(void) {
    tl_rng r = tl_rng_for("v5_layout");
    static const struct {
        int kb, vb, d, R, gk, gv;
    } cases[] = {{3, 3, 64, 32, 32, 32}, {3, 2, 128, 64, 64, 64}, {2, 3, 256, 32, 16, 16}, {3, 4, 64, 48, 16, 64}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int d = cases[ci].d, H = 2, R = cases[ci].R;
        oscar_config cfg = tl_small_config(OSCAR_METHOD_KIVI, 2, d, H, 2 * H);
        cfg.residual = R, cfg.k_group = cases[ci].gk, cfg.v_group = cases[ci].gv;
        cfg.key_bits = cases[ci].kb, cfg.value_bits = cases[ci].vb;
        cfg.window_dtype = OSCAR_DTYPE_F32;
        const tl_geom g = tl_geom_of(&cfg);
        printf("   kivi K%d/V%d d=%d R=%d Gk=%d Gv=%d\n", g.kbits, g.vbits, d, R, cases[ci].gk, cases[ci].gv);
        CHECKF(g.Qk == (g.kbits == 3 ? 7 : g.Qk) && g.Qv == (g.vbits == 3 ? 7 : g.Qv), "levels %d %d", g.Qk, g.Qv);
        oscar_cache *c = tl_create(&cfg);
        if (!c) continue;
        const int64_t row = (int64_t)H * d, T = 3 * R + 5, P = 3 * R;
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        make_adversarial(&r, TL_FLAVOR_OUTLIERS, k, v, T, H, d, 5.0f, 0.02f);
        int32_t seq;
        CHECK_OK(oscar_seq_add(c, &seq));
        CHECK_OK(tl_append(c, 0, seq, k, v, T, H, d, OSCAR_DTYPE_F32));
        oref o;
        oref_build(&g, k, v, T, P, &o);
        size_t n = 0;
        unsigned char *s = tl_export(c, seq, &n);
        const size_t kcb = (size_t)R * d * g.kbits / 8, vcb = (size_t)R * d * g.vbits / 8;
        CHECKF(g.kcodes_bytes == kcb && g.vcodes_bytes == vcb, "codes bytes %zu %zu", g.kcodes_bytes, g.vcodes_bytes);
        int64_t bad = 0, seen[2][8] = {{0}};
        unsigned char *want = malloc((size_t)R * d);
        uint8_t *plane = malloc((size_t)R * d);
        for (int b = 0; s && b < P / R; b++)
            for (int h = 0; h < H; h++)
                for (int kv = 0; kv < 2; kv++) {
                    const int bits = kv ? g.vbits : g.kbits;
                    if (bits != 3) continue;
                    for (int t = 0; t < R; t++)
                        for (int ch = 0; ch < d; ch++) {
                            plane[t * d + ch] = (kv ? o.vcode : o.kcode)[(b * R + t) * row + (int64_t)h * d + ch];
                            seen[kv][plane[t * d + ch] & 7]++;
                            bad += plane[t * d + ch] > 7;
                        }
                    v5_expected_codes(plane, R, d, kv, want);
                    const unsigned char *got = s + 96 + (size_t)b * g.LB + (size_t)h * g.head_bytes + (kv ? kcb : 0);
                    bad += memcmp(got, want, (size_t)R * d * 3 / 8) != 0;
                }
        CHECKF(bad == 0, "K%d/V%d: %lld 3-bit code arrays differ from FORMAT.md version 5", g.kbits, g.vbits,
               (long long)bad);
        for (int kv = 0; kv < 2; kv++)
            if ((kv ? g.vbits : g.kbits) == 3)
                for (int cv = 0; cv < 8; cv++)
                    CHECKF(seen[kv][cv] > 0, "%s: code %d never used (7 levels expected)", kv ? "values" : "keys", cv);
        free(want), free(plane), free(s);
        oref_free(&o);
        /* NaN and Inf are refused as at any width; the sequence is failed, the cache stays usable */
        for (int which = 0; which < 2; which++) {
            int32_t bad_seq;
            CHECK_OK(oscar_seq_add(c, &bad_seq));
            k[5 * row + 3] = which ? INFINITY : NAN;
            CHECK_ST(c, tl_append(c, 0, bad_seq, k, v, R + 7, H, d, OSCAR_DTYPE_F32), OSCAR_E_NONFINITE);
            k[5 * row + 3] = 0.5f;
            CHECK_OK(oscar_seq_free(c, bad_seq));
        }
        free(k), free(v);
        oscar_cache_destroy(c);
    }
}

/* Export / import with 3-bit codes: version 5 written, export -> import ->
 * export byte for byte, equal attention; the stream relabelled version 4 is
 * refused (no earlier writer wrote a width of 3), as are mismatched widths;
 * version-4 streams of 2- and 4-bit caches still import. */
static void test_v5_stream(void) {
    tl_rng r = tl_rng_for("v5_stream");
    const int d = 64, H = 3, hq = 6, R = 64;
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, d, H, hq);
    cfg.residual = R, cfg.k_group = 64, cfg.v_group = 64;
    cfg.sink_tokens = 8, cfg.rollback_tokens = 16, cfg.num_layers = 2;
    cfg.key_bits = 3, cfg.value_bits = 2;
    const int64_t T = 3 * R + 41, row = (int64_t)H * d;
    float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
    make_adversarial(&r, TL_FLAVOR_SINKS, k, v, T, H, d, 20.0f, 0.01f);
    oscar_cache *c = tl_create(&cfg), *c2 = tl_create(&cfg);
    if (!c || !c2) return;
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    CHECK_OK(tl_append(c, 0, seq, k, v, T, H, d, OSCAR_DTYPE_F32));
    CHECK_OK(tl_append(c, 1, seq, k, v, R + 9, H, d, OSCAR_DTYPE_F32));
    size_t n = 0;
    unsigned char *s = tl_export(c, seq, &n);
    if (!s) return;
    CHECKF(tl_rd32(s + 8) == 5 && OSCAR_FORMAT_VERSION == 5 && tl_rd32(s + 16) == 3 && tl_rd32(s + 64) == 2,
           "header: version %u, key bits %u, value bits %u", tl_rd32(s + 8), tl_rd32(s + 16), tl_rd32(s + 64));
    const tl_geom g = tl_geom_of(&cfg);
    CHECKF(g.LB == (size_t)H * ((size_t)R * d * 5 / 8 + 4 * (size_t)d + 4 * (size_t)R) + 4 * (size_t)R,
           "K3/V2 layer block is %zu bytes", g.LB);
    int32_t imp = -1;
    if (CHECK_OK(oscar_seq_import(c2, s, n, &imp))) {
        size_t n2 = 0;
        unsigned char *s2 = tl_export(c2, imp, &n2);
        CHECKF(s2 && n2 == n && memcmp(s, s2, n) == 0, "export -> import -> export differs");
        free(s2);
        float *q = malloc(sizeof(float) * (size_t)2 * hq * d), *o1 = malloc(sizeof(float) * (size_t)2 * hq * d),
              *o2 = malloc(sizeof(float) * (size_t)2 * hq * d);
        tl_gen_q(&r, q, 2, hq, d, tl_key_rms_norm(k, T, H, d), 2.0, OSCAR_DTYPE_F32);
        CHECK_OK(tl_attention(c, 0, 1, &seq, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o1, hq, d));
        CHECK_OK(tl_attention(c2, 0, 1, &imp, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o2, hq, d));
        CHECK(memcmp(o1, o2, sizeof(float) * (size_t)2 * hq * d) == 0);
        free(q), free(o1), free(o2);
    }
    /* the same bytes labelled version 4: refused, naming the version */
    unsigned char *buf = malloc(n);
    memcpy(buf, s, n);
    tl_wr32(buf + 8, 4);
    tl_fix_checksum(buf, n);
    expect_refused(c, seq, buf, n, "3-bit", "a version-4 stream with 3-bit keys");
    /* a 3-bit stream into caches of other widths, and theirs into it */
    static const struct {
        int bits, kb, vb;
        const char *word;
    } others[] = {{2, 0, 0, "key bits"}, {4, 0, 2, "key bits"}, {2, 3, 3, "value bits"}, {2, 2, 3, "key bits"}};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        oscar_config oc = cfg;
        oc.bits = others[i].bits, oc.key_bits = others[i].kb, oc.value_bits = others[i].vb;
        oscar_cache *x = tl_create(&oc);
        if (!x) continue;
        int32_t resident;
        CHECK_OK(oscar_seq_add(x, &resident));
        CHECK_OK(tl_append(x, 0, resident, k, v, 100, H, d, OSCAR_DTYPE_F32));
        char what[96];
        snprintf(what, sizeof what, "stream K3/V2 into bits %d K%d V%d", others[i].bits, others[i].kb, others[i].vb);
        expect_refused(x, resident, s, n, others[i].word, what);
        size_t nx = 0;
        unsigned char *sx = tl_export(x, resident, &nx);
        if (sx) expect_refused(c, seq, sx, nx, others[i].word, "another width's stream into K3/V2");
        /* version-4 streams (the same bytes labelled 4) of widths 2 and 4 still import */
        if (sx && others[i].kb != 3 && others[i].vb != 3) {
            tl_wr32(sx + 8, 4);
            tl_fix_checksum(sx, nx);
            int32_t got = -1;
            if (CHECK_OK(oscar_seq_import(x, sx, nx, &got))) CHECK(tl_same_export(x, resident, x, got));
        }
        free(sx);
        oscar_cache_destroy(x);
    }
    free(buf), free(s), free(k), free(v);
    oscar_cache_destroy(c), oscar_cache_destroy(c2);
}

int main(void) {
    printf("oscar %s, test_options\n", oscar_version());
    TL_RUN(test_config_checks);
    TL_RUN(test_sinks_reference);
    TL_RUN(test_sinks_blocks_shifted);
    TL_RUN(test_sinks_stream_fork_truncate);
    TL_RUN(test_clip_reference);
    TL_RUN(test_clip_oscar);
    TL_RUN(test_v4_config_checks);
    TL_RUN(test_v4_exact_reference);
    TL_RUN(test_v4_oscar_reference);
    TL_RUN(test_norm_per_head_shards);
    TL_RUN(test_mixed_bits_halves);
    TL_RUN(test_v4_stream);
    TL_RUN(test_v4_batch_api);
    TL_RUN(test_v5_layout);
    TL_RUN(test_v5_stream);
    return tl_finish();
}
