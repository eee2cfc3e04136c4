/*
 * test_reference.c - the library against an independent float64 reference.
 *
 *  - the test's own fp16/bf16 conversions against known constants, then the
 *    library's scalar conversions against them;
 *  - oscar_hadamard against the definition H[i][j] = (-1)^popcount(i&j)/sqrt(n);
 *  - a sweep over every method, bits 2/4, head_dim 64/128/256, GQA ratios
 *    1/2/4/8, Hkv 1..4, K/V, Q and output dtypes, window dtypes, q_len 1/3/8,
 *    lengths that are not multiples of R or of the groups, several layers,
 *    prefill or chunked appends, and adversarial data: the dequantised K/V
 *    (oscar_seq_read) against FORMAT.md steps 1-8 computed here, and the
 *    attention output against float64 attention (one softmax over packed and
 *    window tokens, causal for q_len > 1, GQA mapping, inverse rotation).
 */
#include "testlib.h"

#include <stdlib.h>
#include <string.h>

/* ---- the test's own conversions ------------------------------------------ */

static void test_own_conversions(void) {
    struct {
        double x;
        uint16_t h;
    } f16[] = {
        {0.0, 0x0000},         {-0.0, 0x8000},        {1.0, 0x3c00},
        {-2.0, 0xc000},        {65504.0, 0x7bff},     {65519.0, 0x7bff},
        {65520.0, 0x7bff},     {1e9, 0x7bff},         {-1e9, 0xfbff},
        {INFINITY, 0x7bff},    {-INFINITY, 0xfbff},   {0.5, 0x3800},
        {1.0 / 3.0, 0x3555},   {0.1, 0x2e66},         {6.103515625e-05, 0x0400},
        {5.960464477539063e-08, 0x0001},              {2.98023223876953125e-08, 0x0000},
        {2.98023223876953126e-08 * 1.0000001, 0x0001},
        {1.0 + 1.0 / 2048.0, 0x3c00},                 /* tie -> even */
        {1.0 + 3.0 / 2048.0, 0x3c02},                 /* tie -> even (up) */
        {1.0 + 1.0 / 2048.0 + 1e-9, 0x3c01},
        {6.097555160522461e-05, 0x03ff},              /* largest subnormal */
        {2048.0 + 1.0, 0x6800},                       /* tie at ulp 2 -> even */
        {2048.0 + 3.0, 0x6802},
    };
    for (size_t i = 0; i < sizeof f16 / sizeof f16[0]; i++) {
        uint16_t got = tl_f16_from_double(f16[i].x);
        CHECKF(got == f16[i].h, "own fp16(%.17g) = 0x%04x, expected 0x%04x", f16[i].x, got, f16[i].h);
    }
    CHECK((tl_f16_from_double(NAN) & 0x7c00) == 0x7c00 && (tl_f16_from_double(NAN) & 0x3ff) != 0);
    /* every finite half round-trips */
    for (unsigned h = 0; h < 65536; h++) {
        if (((h >> 10) & 31) == 31) continue;
        double x = tl_f16_to_double((uint16_t)h);
        uint16_t back = tl_f16_from_double(x);
        if (!CHECKF(back == h || (x == 0.0 && (back & 0x7fff) == 0), "fp16 round trip 0x%04x", h)) break;
    }
    CHECK(tl_f16_to_double(0x7c00) == INFINITY && isnan(tl_f16_to_double(0x7e00)));
    struct {
        double x;
        uint16_t h;
    } bf[] = {
        {1.0, 0x3f80},          {-2.0, 0xc000},          {0.0, 0x0000},
        {1.0 + 1.0 / 256.0, 0x3f80}, /* tie -> even */
        {1.0 + 3.0 / 256.0, 0x3f82},
        {3.0e38, 0x7f62},       {3.4e38, 0x7f80},        /* overflow rounds to Inf */
        {1e-40, 0x0001},        {65504.0, 0x4780},
    };
    for (size_t i = 0; i < sizeof bf / sizeof bf[0]; i++) {
        uint16_t got = tl_bf16_from_double(bf[i].x);
        CHECKF(got == bf[i].h, "own bf16(%.9g) = 0x%04x, expected 0x%04x", bf[i].x, got, bf[i].h);
    }
    for (unsigned h = 0; h < 65536; h++) {
        if (((h >> 7) & 255) == 255) continue;
        double x = tl_bf16_to_double((uint16_t)h);
        uint16_t back = tl_bf16_from_double(x);
        if (!CHECKF(back == h || (x == 0.0 && (back & 0x7fff) == 0), "bf16 round trip 0x%04x", h)) break;
    }
    CHECK(tl_ulp(OSCAR_DTYPE_F16, 1.0) == 1.0 / 1024 && tl_ulp(OSCAR_DTYPE_F16, 0.0) == ldexp(1, -24));
    CHECK(tl_ulp(OSCAR_DTYPE_BF16, 1.5) == 1.0 / 128 && tl_ulp(OSCAR_DTYPE_F32, 2.0) == ldexp(1, -22));
}

/* ---- the library's scalar conversions ------------------------------------ */

static float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_library_conversions(void) {
    tl_rng r = tl_rng_for("library_conversions");
    long bad16 = 0, badbf = 0, n = 0;
    for (int i = 0; i < 300000; i++) {
        uint32_t u;
        if (i < 1000) {
            /* values around the fp16 range ends and ties */
            u = 0x477fe000u + (uint32_t)(i - 500);
        } else if (i < 2000) {
            u = 0x33000000u + (uint32_t)(i - 1500) * 4096u; /* subnormal halves */
        } else {
            u = (uint32_t)tl_next(&r);
            /* keep the exponent in a useful range most of the time */
            if (i % 4) u = (u & 0x807fffffu) | ((uint32_t)tl_randint(&r, 96, 150) << 23);
            if (i % 16 == 5) u &= 0xffffe000u | 0x1000u; /* exact fp16 ties */
            if (i % 16 == 6) u &= 0xffff8000u | 0x8000u; /* exact bf16 ties */
        }
        float f = bits_to_float(u);
        if (isnan(f)) continue;
        n++;
        uint16_t want = tl_f16_from_double(f), got = oscar_f32_to_f16(f);
        if (got != want && !(f == 0.0f && (got & 0x7fff) == 0)) {
            if (bad16++ < 5)
                CHECKF(0, "oscar_f32_to_f16(%.9g = 0x%08x) = 0x%04x, expected 0x%04x", f, u, got, want);
        }
        uint16_t wantb = tl_bf16_from_double(f), gotb = oscar_f32_to_bf16(f);
        if (gotb != wantb) {
            if (badbf++ < 5)
                CHECKF(0, "oscar_f32_to_bf16(%.9g = 0x%08x) = 0x%04x, expected 0x%04x", f, u, gotb, wantb);
        }
    }
    CHECKF(bad16 == 0, "%ld of %ld fp16 conversions differ", bad16, n);
    CHECKF(badbf == 0, "%ld of %ld bf16 conversions differ", badbf, n);
    /* saturation, never Inf (FORMAT.md) */
    CHECK(oscar_f32_to_f16(1e30f) == 0x7bff);
    CHECK(oscar_f32_to_f16(-70000.0f) == 0xfbff);
    CHECK(oscar_f32_to_f16(INFINITY) == 0x7bff);
    CHECK(oscar_f32_to_f16(-INFINITY) == 0xfbff);
    uint16_t hn = oscar_f32_to_f16(NAN);
    CHECKF((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff), "fp16(NaN) = 0x%04x is not a NaN", hn);
    uint16_t bn = oscar_f32_to_bf16(NAN);
    CHECKF((bn & 0x7f80) == 0x7f80 && (bn & 0x7f), "bf16(NaN) = 0x%04x is not a NaN", bn);
    /* decoding of every 16-bit pattern */
    long badd = 0;
    for (unsigned h = 0; h < 65536; h++) {
        double w16 = tl_f16_to_double((uint16_t)h), wbf = tl_bf16_to_double((uint16_t)h);
        float g16 = oscar_f16_to_f32((uint16_t)h), gbf = oscar_bf16_to_f32((uint16_t)h);
        int ok16 = isnan(w16) ? isnan(g16) : (double)g16 == w16 && !signbit(g16) == !signbit(w16);
        int okbf = isnan(wbf) ? isnan(gbf) : (double)gbf == wbf && !signbit(gbf) == !signbit(wbf);
        if (!ok16 || !okbf) {
            if (badd++ < 5) CHECKF(0, "decode 0x%04x: f16 %.9g vs %.9g, bf16 %.9g vs %.9g", h, g16, w16, gbf, wbf);
        }
    }
    CHECKF(badd == 0, "%ld 16-bit patterns decode wrongly", badd);
}

/* ---- Hadamard ---------------------------------------------------------------- */

static void test_hadamard_definition(void) {
    tl_rng r = tl_rng_for("hadamard_definition");
    for (int n = 1; n <= 1024; n *= 2) {
        int rows = 3;
        float *x = malloc(sizeof(float) * (size_t)rows * n);
        double *ref = malloc(sizeof(double) * (size_t)n);
        double *in = malloc(sizeof(double) * (size_t)n);
        tl_fill_normal(&r, x, (int64_t)rows * n, 1.0);
        float *orig = malloc(sizeof(float) * (size_t)rows * n);
        memcpy(orig, x, sizeof(float) * (size_t)rows * n);
        CHECK_OK(oscar_hadamard(x, rows, n));
        double worst = 0.0;
        for (int row = 0; row < rows; row++) {
            for (int i = 0; i < n; i++) in[i] = orig[row * n + i];
            tl_hadamard_ref(in, ref, n);
            double norm = 0.0;
            for (int i = 0; i < n; i++) norm += in[i] * in[i];
            norm = sqrt(norm);
            for (int i = 0; i < n; i++) {
                double e = fabs(x[row * n + i] - ref[i]) / norm;
                if (!(e <= worst)) worst = e;
            }
        }
        CHECKF(worst < 2e-6, "oscar_hadamard n=%d differs from the definition by %.3g (relative to ||x||)", n,
               worst);
        /* self-inverse and orthogonal */
        CHECK_OK(oscar_hadamard(x, rows, n));
        double e2 = 0.0;
        for (int i = 0; i < rows * n; i++) {
            double e = fabs(x[i] - orig[i]);
            if (!(e <= e2)) e2 = e;
        }
        CHECKF(e2 < 1e-5, "H(H x) != x for n=%d: %.3g", n, e2);
        free(x);
        free(ref);
        free(in);
        free(orig);
    }
    /* every matrix entry, through unit vectors, for the head sizes */
    for (int n = 64; n <= 256; n *= 2) {
        float *e = calloc((size_t)n * n, sizeof(float));
        for (int j = 0; j < n; j++) e[(size_t)j * n + j] = 1.0f;
        CHECK_OK(oscar_hadamard(e, n, n)); /* row j becomes column j of H (H symmetric) */
        int bad = 0;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < n; i++) {
                unsigned v = (unsigned)(i & j);
                int par = 0;
                while (v) {
                    par ^= 1;
                    v &= v - 1;
                }
                double want = (par ? -1.0 : 1.0) / sqrt((double)n);
                if (fabs(e[(size_t)j * n + i] - want) > 1e-6) bad++;
            }
        CHECKF(bad == 0, "H_%d: %d entries differ from (-1)^popcount(i&j)/sqrt(n)", n, bad);
        free(e);
    }
    /* big sizes: norm preserved, self-inverse */
    for (int n = 2048; n <= 65536; n *= 4) {
        float *x = malloc(sizeof(float) * (size_t)n), *o = malloc(sizeof(float) * (size_t)n);
        tl_fill_normal(&r, x, n, 1.0);
        memcpy(o, x, sizeof(float) * (size_t)n);
        CHECK_OK(oscar_hadamard(x, 1, n));
        double n0 = 0, n1 = 0;
        for (int i = 0; i < n; i++) {
            n0 += (double)o[i] * o[i];
            n1 += (double)x[i] * x[i];
        }
        CHECKF(fabs(sqrt(n1) / sqrt(n0) - 1.0) < 1e-5, "||Hx|| != ||x|| for n=%d", n);
        CHECK_OK(oscar_hadamard(x, 1, n));
        double e2 = 0.0;
        for (int i = 0; i < n; i++)
            if (fabs(x[i] - o[i]) > e2) e2 = fabs(x[i] - o[i]);
        CHECKF(e2 < 1e-4, "H(H x) != x for n=%d: %.3g", n, e2);
        free(x);
        free(o);
    }
}

/* ---- comparison of read-back data with the reference --------------------- */

/* ---- the sweep ---------------------------------------------------------------- */

typedef struct sweep_case {
    oscar_method method;
    int bits, d, hkv, hq, layers, R, gk, gv, q_len, flavor, chunked;
    int64_t T;
    oscar_dtype in, qdt, out, W;
} sweep_case;

static void run_case(const sweep_case *sc, tl_rng *r, int idx) {
    oscar_config cfg = tl_small_config(sc->method, sc->bits, sc->d, sc->hkv, sc->hq);
    cfg.num_layers = sc->layers;
    cfg.residual = sc->R;
    cfg.k_group = sc->gk;
    cfg.v_group = sc->gv;
    cfg.window_dtype = sc->W;
    cfg.block_count = 16;
    cfg.num_threads = (idx % 3 == 0) ? 2 : 1;
    printf("   case %2d: %-10s b=%d d=%3d Hkv=%d Hq=%2d L=%d R=%3d Gk=%2d Gv=%2d W=%-4s in=%-4s q=%-4s "
           "out=%-4s q_len=%d T=%3lld %s%s%s\n",
           idx, oscar_method_name(sc->method), sc->bits, sc->d, sc->hkv, sc->hq, sc->layers, sc->R, sc->gk,
           sc->gv, tl_dtype_name(sc->W), tl_dtype_name(sc->in), tl_dtype_name(sc->qdt), tl_dtype_name(sc->out),
           sc->q_len, (long long)sc->T, tl_flavor_name(sc->flavor), sc->chunked ? " chunked" : "",
           cfg.num_threads > 1 ? " 2 threads" : "");
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    tl_geom g = tl_geom_of(&cfg);
    int32_t seq = -1;
    CHECK_OK(oscar_seq_add(c, &seq));
    const int d = sc->d, hkv = sc->hkv, hq = sc->hq;
    const int64_t T = sc->T, row = (int64_t)hkv * d;
    for (int layer = 0; layer < sc->layers; layer++) {
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        tl_gen_kv(r, layer == 0 ? sc->flavor : TL_FLAVOR_NORMAL, k, v, T, hkv, d, sc->in);
        /* append, in one call or in random chunks (including empty ones) */
        int64_t done = 0;
        int ok = 1;
        while (done < T && ok) {
            int64_t n = sc->chunked ? tl_randint(r, 0, 40) : T;
            if (n > T - done) n = T - done;
            ok = CHECK_OK(tl_append(c, layer, seq, k + done * row, v + done * row, n, hkv, d, sc->in));
            done += n;
            oscar_seq_info info;
            CHECK_OK(oscar_seq_info_get(c, seq, layer, &info));
            CHECKF(info.tokens == done && info.packed_tokens + info.window_tokens == info.tokens &&
                       info.packed_tokens == (done / sc->R) * sc->R && info.window_tokens == done % sc->R,
                   "seq_info after %lld tokens: tokens %lld packed %lld window %d", (long long)done,
                   (long long)info.tokens, (long long)info.packed_tokens, info.window_tokens);
        }
        tl_ref ref;
        tl_ref_build(&g, k, v, T, NULL, &ref);
        float *kl, *vl;
        int64_t got = tl_read_all(c, seq, layer, hkv, d, &kl, &vl);
        CHECK(got == T);
        if (got == T) {
            tl_cmp_stats ks, vs;
            memset(&ks, 0, sizeof ks), memset(&vs, 0, sizeof vs);
            tl_compare_readback(&g, &ref, kl, 0, &ks);
            tl_compare_readback(&g, &ref, vl, 1, &vs);
            /* Without rotation the numerics are exact up to the last bit of
             * s; with rotation the window rounding of an fp32 FWHT may
             * differ from float64 in rare elements (tl_readback_within). */
            CHECKF(tl_readback_within(&g, &ks, &vs, 0),
                   "case %d layer %d: K %lld/%lld elements (%lld beyond a step, %lld in the window, %lld/%lld groups), "
                   "V %lld/%lld (%lld, %lld, %lld/%lld) differ from the reference",
                   idx, layer, (long long)ks.mism, (long long)ks.elems, (long long)ks.hard, (long long)ks.window_mism,
                   (long long)ks.bad_groups, (long long)ks.groups, (long long)vs.mism, (long long)vs.elems,
                   (long long)vs.hard, (long long)vs.window_mism, (long long)vs.bad_groups, (long long)vs.groups);
            if (ks.mism || vs.mism)
                printf("     layer %d: %lld K and %lld V of %lld elements differ from the reference\n", layer,
                       (long long)ks.mism, (long long)vs.mism, (long long)ks.elems);
            /* attention */
            if (T >= sc->q_len) {
                int64_t nq = (int64_t)sc->q_len * hq * d;
                float *q = malloc(sizeof(float) * (size_t)nq), *o = malloc(sizeof(float) * (size_t)nq);
                double *o_lib = malloc(sizeof(double) * (size_t)nq), *o_ref = malloc(sizeof(double) * (size_t)nq);
                double *mag = malloc(sizeof(double) * (size_t)(sc->q_len * hq)),
                       *mag2 = malloc(sizeof(double) * (size_t)(sc->q_len * hq));
                tl_gen_q(r, q, sc->q_len, hq, d, tl_key_rms_norm(k, T, hkv, d), 2.0, sc->qdt);
                float scale = (idx % 4 == 1) ? 0.05f : 0.0f;
                double sm = scale > 0 ? (double)scale : 1.0 / sqrt((double)d);
                CHECK_OK(tl_attention(c, layer, 1, &seq, sc->q_len, q, sc->qdt, sc->out, scale, o, hq, d));
                CHECKF(tl_count_nonfinite(o, nq) == 0, "case %d: attention left NaN/unwritten outputs", idx);
                tl_ref_attention_f(d, hkv, hq, kl, vl, T, sc->q_len, q, sm, o_lib, mag);
                tl_ref_attention(d, hkv, hq, ref.krec, ref.vrec, T, sc->q_len, q, sm, o_ref, mag2);
                double w1 = 0, w2 = 0;
                int64_t b1 = tl_compare_out(o, o_lib, mag, (int64_t)sc->q_len * hq, d, sc->out, 1e-5, &w1);
                CHECKF(b1 == 0, "case %d layer %d: attention vs float64 over the read-back K/V: %lld elements, worst %.3g",
                       idx, layer, (long long)b1, w1);
                /* the rotated-space formulation of FORMAT.md agrees with the
                 * original-space one (the reference against itself) */
                double *o_rot = malloc(sizeof(double) * (size_t)nq);
                tl_ref_attention_rot(&g, &ref, sc->q_len, q, sm, o_rot);
                double wr = 0;
                for (int64_t i = 0; i < nq; i++) {
                    double e = fabs(o_rot[i] - o_ref[i]) / mag2[i / d];
                    if (!(e <= wr)) wr = e;
                }
                CHECKF(wr < 1e-9, "case %d: reference attention in rotated space differs from original space (%.3g)",
                       idx, wr);
                free(o_rot);
                double rel2 = (ks.mism || vs.mism) ? 0.05 : 2e-5;
                int64_t b2 = tl_compare_out(o, o_ref, mag2, (int64_t)sc->q_len * hq, d, sc->out, rel2, &w2);
                CHECKF(b2 == 0, "case %d layer %d: attention vs the float64 reference quantiser: %lld elements, worst %.3g",
                       idx, layer, (long long)b2, w2);
                free(q);
                free(o);
                free(o_lib);
                free(o_ref);
                free(mag);
                free(mag2);
            }
        }
        free(kl);
        free(vl);
        tl_ref_free(&ref);
        free(k);
        free(v);
    }
    CHECK_OK(oscar_seq_free(c, seq));
    oscar_cache_destroy(c);
}

static void test_reference_sweep(void) {
    tl_rng r = tl_rng_for("reference_sweep");
    static const oscar_method methods[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT,
                                           OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    static const int dims[] = {64, 128, 256};
    static const int ratios[] = {1, 2, 4, 8};
    static const int qlens[] = {1, 3, 8};
    static const int64_t lens[] = {1, 31, 33, 127, 129, 300, 64, 200};
    static const oscar_dtype dts[] = {OSCAR_DTYPE_F32, OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16};
    int idx = 0;
    for (int mi = 0; mi < 5; mi++)
        for (int bits = 2; bits <= 4; bits += 2)
            for (int di = 0; di < 3; di++, idx++) {
                sweep_case sc;
                sc.method = methods[mi];
                sc.bits = bits;
                sc.d = dims[di];
                sc.hkv = 1 + (idx % 4);
                sc.hq = sc.hkv * ratios[(idx / 4 + mi) % 4];
                if (sc.d == 256 && sc.hkv > 2) sc.hkv = 2, sc.hq = 2 * ratios[(idx / 4 + mi) % 4];
                sc.layers = 1 + (idx % 3 == 0);
                sc.R = (idx % 2) ? 128 : 64;
                sc.gk = (idx % 3 == 2) ? 16 : (idx % 5 == 4) ? 64 : 32;
                sc.gv = (idx % 4 == 3) ? 16 : (idx % 7 == 5) ? 64 : 32;
                sc.q_len = qlens[idx % 3];
                sc.T = lens[(idx + mi) % 8];
                if (sc.T < sc.q_len) sc.q_len = 1;
                if (sc.d == 256 && sc.T > 200) sc.T = 200;
                sc.flavor = idx % TL_FLAVORS;
                sc.chunked = (idx / 2) % 2;
                sc.in = dts[idx % 3];
                sc.qdt = dts[(idx / 3) % 3];
                sc.out = dts[(idx + 1) % 3];
                sc.W = dts[1 + (idx / 2) % 2];
                if (idx % 5 == 2) sc.W = OSCAR_DTYPE_F32;
                if (sc.flavor == TL_FLAVOR_HUGE) {
                    sc.out = OSCAR_DTYPE_F32;
                    if (sc.W == OSCAR_DTYPE_BF16) sc.in = OSCAR_DTYPE_F32;
                }
                run_case(&sc, &r, idx);
            }
    /* one larger shape: Qwen-like head geometry, a long sequence */
    sweep_case big = {OSCAR_METHOD_OSCAR, 2, 128, 4, 16, 1, 128, 32, 32, 1, TL_FLAVOR_SINKS, 0, 1000,
                      OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_F32, OSCAR_DTYPE_F16};
    run_case(&big, &r, idx++);
    sweep_case big2 = {OSCAR_METHOD_KIVI, 4, 64, 2, 16, 2, 64, 16, 16, 8, TL_FLAVOR_OUTLIERS, 1, 700,
                       OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16};
    run_case(&big2, &r, idx++);
}

int main(void) {
    printf("oscar %s, test_reference\n", oscar_version());
    TL_RUN(test_own_conversions);
    TL_RUN(test_library_conversions);
    TL_RUN(test_hadamard_definition);
    TL_RUN(test_reference_sweep);
    return tl_finish();
}
