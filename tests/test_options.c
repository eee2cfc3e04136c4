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
 *    struct_size.
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
    CHECKF(tl_rd32(s + 8) == 3 && tl_rd32(s + 60) == (uint32_t)S, "version %u, sink_tokens %u", tl_rd32(s + 8),
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
    /* a version-2 stream (no sinks) into this cache: OSCAR_E_FORMAT */
    tl_wr32(s + 8, 2);
    tl_wr32(s + 60, 0);
    tl_fix_checksum(s, n);
    oscar_memory_stats before, after;
    CHECK_OK(oscar_memory(c, &before));
    CHECK_ST(c, oscar_seq_import(c, s, n, &bad), OSCAR_E_FORMAT);
    CHECK_OK(oscar_memory(c, &after));
    CHECK(before.blocks_free == after.blocks_free && before.seqs_live == after.seqs_live);
    free(s);
    /* a NaN sink value (checksum fixed): rejected, nothing changes */
    s = tl_export(c, seq, &n);
    if (s) {
        const size_t sink_off = 64 + 16 * 2 + (size_t)tl_rd32(s + 52) * 2 * tl_geom_of(&cfg).LB;
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
    c.caller_metadata = 1; /* the batch API has no sink rows yet */
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_UNSUPPORTED);
    CHECKF(strstr(eb, "sink_tokens") != NULL && strstr(eb, "caller_metadata") != NULL, "message: %s", eb);
    oscar_cache *x = NULL;
    CHECK_ST(NULL, oscar_cache_create(&c, &x, eb, sizeof eb), OSCAR_E_UNSUPPORTED);
    CHECK(x == NULL);
    c = oscar_config_default();
    c.clip_search = 2;
    CHECK_ST(NULL, oscar_config_validate(&c, eb, sizeof eb), OSCAR_E_INVALID_ARGUMENT);
    CHECKF(strstr(eb, "clip_search") != NULL, "message: %s", eb);
    c.clip_search = 1;
    c.caller_metadata = 1; /* clipping is only a packer's choice: the batch API has it */
    CHECK_OK(oscar_config_validate(&c, eb, sizeof eb));
    /* the CUDA backend runs sink tokens (sequence API) and clipping
     * (without CUDA: not built, or no device) */
    c = oscar_config_default();
    c.backend = OSCAR_BACKEND_CUDA;
    for (int opt = 0; opt < 2; opt++) {
        c.sink_tokens = opt == 0 ? 4 : 0;
        c.clip_search = opt == 1;
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

int main(void) {
    printf("oscar %s, test_options\n", oscar_version());
    TL_RUN(test_config_checks);
    TL_RUN(test_sinks_reference);
    TL_RUN(test_sinks_blocks_shifted);
    TL_RUN(test_sinks_stream_fork_truncate);
    TL_RUN(test_clip_reference);
    TL_RUN(test_clip_oscar);
    return tl_finish();
}
