/* test_attention_q2.c - the CPU 2-bit attention kernels (src/cpu/attention_q2.c),
 * every copy this machine runs (scalar reference, AVX2), against a float64
 * reference written here from docs/FORMAT.md's tile table, on random and
 * adversarial blocks: outlier channels, constant groups (scale 0), all codes
 * 0 or all 3, sink tokens with large norms, huge and tiny parameters,
 * probabilities that are zero past an odd length, every row count 1..8
 * (g = Hq/Hkv with q_len 1), d = 64/128/256, several R, k_group, v_group.
 *
 * Tolerance, per element: |kernel - reference| <= 1e-5 * M, where M is the
 * sum of the magnitudes of the terms (keys: sm * norm * sum_c |q_c| (|lo_c|
 * + 3 |scale_c|); values: sum_t p_t (|lo| + 3 |scale|)). fp32 arithmetic
 * over <= 256 channels or R tokens stays far inside it (the largest error
 * seen is printed); the 2-bit quantisation error itself is up to half a step,
 * 1/6 of a group's range, four orders of magnitude above. */
#include "attention_q2.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static double uni(void) { return (next_u32() + 0.5) / 4294967296.0; }      /* (0, 1) */
static double gauss(void) { return sqrt(-2.0 * log(uni())) * cos(6.283185307179586 * uni()); }

/* IEEE half from double (round to nearest even; no Inf: values stay small). */
static uint16_t to_half(double x) {
    float f = (float)x;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t e = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t m = u & 0x7fffffu;
    if ((u & 0x7fffffffu) == 0) return (uint16_t)sign;
    if (e >= 31) return (uint16_t)(sign | 0x7bffu); /* saturate */
    if (e <= 0) {                                   /* subnormal */
        if (e < -10) return (uint16_t)sign;
        m |= 0x800000u;
        int shift = 14 - e;
        uint32_t h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}
static double from_half(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
    return s ? -v : v;
}

/* The code of (token tok in 0..15, channel ch) of a tile, from FORMAT.md:
 * K: token = g + 8(j&1), channel = 16s + 2t + 8(j>>1) + e;
 * V: token = 2t + 8(j>>1) + e, channel = 16s + g + 8(j&1);
 * lane 4g + t, pair q = 4s + j, word q/8, bit 16e + 2(q%8). */
static int tile_code(const uint8_t *tile, int d, int is_v, int tok, int ch) {
    int g, t, s = ch >> 4, j, e;
    if (!is_v) {
        g = tok & 7;
        t = (ch & 7) >> 1;
        e = ch & 1;
        j = ((ch >> 3) & 1) * 2 + (tok >> 3);
    } else {
        g = ch & 7;
        t = (tok & 7) >> 1;
        e = tok & 1;
        j = (tok >> 3) * 2 + ((ch >> 3) & 1);
    }
    const int lane = 4 * g + t, q = 4 * s + j, W = d / 32;
    const uint8_t *w = tile + ((size_t)lane * W + q / 8) * 4;
    const uint32_t word = (uint32_t)w[0] | (uint32_t)w[1] << 8 | (uint32_t)w[2] << 16 | (uint32_t)w[3] << 24;
    return (int)((word >> (16 * e + 2 * (q % 8))) & 3u);
}

enum { MODE_RANDOM, MODE_OUTLIERS, MODE_CONSTANT, MODE_CODES0, MODE_CODES3, MODE_HUGE, MODE_TINY, N_MODES };
static const char *mode_name[] = {"random", "outlier channels", "constant groups", "codes all 0", "codes all 3",
                                  "huge parameters", "tiny parameters"};

static void make_params(uint16_t *pairs, int n, int mode, int stride_outlier) {
    for (int i = 0; i < n; i++) {
        double sc = fabs(gauss()) * 0.5 + 0.01, lo = gauss() - 1.5 * sc;
        if (mode == MODE_OUTLIERS && stride_outlier && i % stride_outlier == 3) sc *= 300.0, lo *= 300.0;
        if (mode == MODE_CONSTANT && (i % 3 == 0)) sc = 0.0;
        if (mode == MODE_HUGE) sc *= 2000.0, lo *= 2000.0;
        if (mode == MODE_TINY) sc *= 1e-4, lo *= 1e-4;
        pairs[2 * i] = to_half(sc);
        pairs[2 * i + 1] = to_half(lo);
    }
}

static double worst_k = 0, worst_v = 0;
static int failures = 0;

static void check(const char *what, int level, int d, int R, int G, int nr, int mode, int row, int idx, double got,
                  double ref, double mag, double *worst) {
    const double err = fabs(got - ref), rel = mag > 0 ? err / mag : err;
    if (rel > *worst) *worst = rel;
    if (!(rel <= 1e-5)) {
        if (failures++ < 10)
            fprintf(stderr,
                    "FAIL %s level %d d %d R %d group %d rows %d (%s): row %d element %d: got %.9g, float64 %.9g "
                    "(error %.3g of magnitude %.3g)\n",
                    what, level, d, R, G, nr, mode_name[mode], row, idx, got, ref, err, mag);
    }
}

static void run_case(int d, int R, int Gk, int Gv, int nr, int mode) {
    const size_t codes_bytes = (size_t)R * d / 4; /* 2 bits */
    uint8_t *kc = malloc(codes_bytes), *vc = malloc(codes_bytes);
    const int nkp = R / Gk * d, ng = d / Gv, nvp = R * ng;
    uint16_t *kp = malloc(sizeof(uint16_t) * 2 * nkp), *vp = malloc(sizeof(uint16_t) * 2 * nvp);
    float *norms = malloc(sizeof(float) * R), *q = malloc(sizeof(float) * nr * d);
    const int64_t ld = R + 5; /* rows of the logits / probabilities are padded */
    float *out = malloc(sizeof(float) * nr * ld), *p = malloc(sizeof(float) * nr * ld);
    float *acc = malloc(sizeof(float) * nr * d), *vbias = malloc(sizeof(float) * nr * ng);
    for (size_t i = 0; i < codes_bytes; i++) {
        kc[i] = mode == MODE_CODES0 ? 0 : mode == MODE_CODES3 ? 0xff : (uint8_t)next_u32();
        vc[i] = mode == MODE_CODES0 ? 0 : mode == MODE_CODES3 ? 0xff : (uint8_t)next_u32();
    }
    make_params(kp, nkp, mode, d);   /* key pairs [group][channel]: outlier channels 3, d+3, ... */
    make_params(vp, nvp, mode, 7);
    for (int t = 0; t < R; t++) norms[t] = (float)(0.5 + uni());
    norms[0] = 150.0f; /* a sink token with a large norm */
    if (R > 20) norms[17] = 40.0f;
    for (int i = 0; i < nr * d; i++) q[i] = (float)gauss();
    if (mode == MODE_OUTLIERS)
        for (int r = 0; r < nr; r++) q[(size_t)r * d + 5] = 80.0f;
    /* probabilities: softmax-like, zero past an odd length, one large weight */
    const int len = R - 1 - (int)(next_u32() % (R < 20 ? 1 : 13));
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < ld; t++) p[(size_t)r * ld + t] = t < len ? (float)(uni() * uni()) : 0.0f;
    for (int r = 0; r < nr; r++) p[(size_t)r * ld + 0] = 0.9f;
    const float sm = 0.125f;

    for (int level = 0; level <= 1; level++) {
        if (!oscar_q2_level_supported(level)) continue;
        /* keys */
        for (int i = 0; i < nr * ld; i++) out[i] = -12345.0f; /* the padding must stay untouched */
        const int use_norms = mode != MODE_CONSTANT;      /* NULL norms: methods without token norms */
        oscar_q2_logits_at(level, d, R, Gk, kc, kp, use_norms ? norms : NULL, nr, q, sm, out, ld);
        for (int r = 0; r < nr; r++) {
            for (int t = 0; t < R; t++) {
                const int T = t / 16, gi = t / Gk;
                double ref = 0, mag = 0;
                for (int c = 0; c < d; c++) {
                    const double sc = from_half(kp[2 * (gi * d + c)]), lo = from_half(kp[2 * (gi * d + c) + 1]);
                    const int code = tile_code(kc + (size_t)T * 4 * d, d, 0, t % 16, c);
                    ref += (double)q[(size_t)r * d + c] * (lo + sc * code);
                    mag += fabs((double)q[(size_t)r * d + c]) * (fabs(lo) + 3 * sc);
                }
                const double s = (use_norms ? (double)norms[t] : 1.0) * sm;
                check("logits", level, d, R, Gk, nr, mode, r, t, out[(size_t)r * ld + t], s * ref, s * mag, &worst_k);
            }
            for (int64_t t = R; t < ld; t++)
                if (out[(size_t)r * ld + t] != -12345.0f && failures++ < 10)
                    fprintf(stderr, "FAIL logits level %d wrote past R\n", level);
        }
        /* values: acc and vbias start from nonzero values (the kernel adds) */
        for (int i = 0; i < nr * d; i++) acc[i] = 0.25f;
        for (int i = 0; i < nr * ng; i++) vbias[i] = -0.5f;
        oscar_q2_values_at(level, d, R, Gv, vc, vp, nr, p, ld, acc, vbias);
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < d; c++) {
                double ref = 0.25 - 0.5, mag = 0.75;
                for (int t = 0; t < R; t++) {
                    const double pt = p[(size_t)r * ld + t];
                    const double sc = from_half(vp[2 * (t * ng + c / Gv)]), lo = from_half(vp[2 * (t * ng + c / Gv) + 1]);
                    const int code = tile_code(vc + (size_t)(t / 16) * 4 * d, d, 1, t % 16, c);
                    ref += pt * (lo + sc * code);
                    mag += pt * (fabs(lo) + 3 * sc);
                }
                const double got = (double)acc[(size_t)r * d + c] + (double)vbias[(size_t)r * ng + c / Gv];
                check("values", level, d, R, Gv, nr, mode, r, c, got, ref, mag, &worst_v);
            }
    }
    free(kc), free(vc), free(kp), free(vp), free(norms), free(q), free(out), free(p), free(acc), free(vbias);
}

int main(void) {
    const int ds[] = {64, 128, 256};
    const int Rs[] = {16, 48, 128};
    int cases = 0;
    for (int di = 0; di < 3; di++)
        for (int ri = 0; ri < 3; ri++)
            for (int nr = 1; nr <= OSCAR_Q2_MAX_ROWS; nr++)
                for (int mode = 0; mode < N_MODES; mode++) {
                    const int d = ds[di], R = Rs[ri];
                    /* groups: 16 and R for keys; 16, 32 and d for values, in turn */
                    const int Gk = (nr + mode) % 2 ? 16 : R;
                    const int gv_choice[3] = {16, 32, d};
                    const int Gv = gv_choice[(nr + mode + ri) % 3];
                    run_case(d, R, Gk, Gv, nr, mode);
                    cases++;
                }
    printf("test_attention_q2: %d cases, copies:%s%s (in use: %s); largest error / magnitude: logits %.3g, "
           "values %.3g (tolerance 1e-5)\n",
           cases, " scalar", oscar_q2_level_supported(1) ? " avx2" : "", oscar_q2_level() ? "avx2" : "scalar",
           worst_k, worst_v);
    if (failures) {
        fprintf(stderr, "test_attention_q2: %d failures\n", failures);
        return 1;
    }
    return 0;
}
