/*
 * test_format.c - the packed format and the export stream, read here from
 * docs/FORMAT.md alone.
 *  - the stream header, sizes, block order, zeroed unflushed layer blocks,
 *    windows and the FNV-1a 64 checksum;
 *  - codes (mma tile layout), fp16 (scale, lo) pairs and fp32 token norms
 *    against the reference quantiser of testlib (codes equal except within
 *    1e-6 of a rounding boundary);
 *  - oscar_code_position against the FORMAT.md formula;
 *  - export -> import (fresh cache, same cache) gives identical attention and
 *    bytes, and the imported sequence keeps working;
 *  - mismatched configurations, corrupted, truncated and crafted streams give
 *    OSCAR_E_FORMAT and leave the cache unchanged; a fuzz loop of random
 *    flips and truncations never crashes and never accepts a stream that
 *    does not re-export to the same bytes.
 */
#include "testlib.h"
#include "internal.h" /* oscar_code_position */

#include <stdlib.h>
#include <string.h>

#define HDR 80  /* versions 4 and 5 */
#define HDR3 64 /* versions 2 and 3; version 1 had 56 and no packed counts */

typedef struct stream {
    uint32_t version, method, bits, d, hkv, L, gk, gv, R, W, rotv, n_blocks;
    uint64_t tokens[8], packed[8];
    uint32_t lag, reserved, vbits, norm_per_head, reserved2, reserved3;
    size_t blocks_off, win_off[8], size;
} stream;

/* Parses and validates the layout; returns 1 if consistent with g. */
static int parse_stream(const unsigned char *b, size_t n, const tl_geom *g, stream *s) {
    memset(s, 0, sizeof *s);
    if (!CHECKF(n >= HDR + 8, "stream too short: %zu", n)) return 0;
    CHECKF(memcmp(b, "OSCARSEQ", 8) == 0, "magic");
    s->version = tl_rd32(b + 8);
    s->method = tl_rd32(b + 12);
    s->bits = tl_rd32(b + 16);
    s->d = tl_rd32(b + 20);
    s->hkv = tl_rd32(b + 24);
    s->L = tl_rd32(b + 28);
    s->gk = tl_rd32(b + 32);
    s->gv = tl_rd32(b + 36);
    s->R = tl_rd32(b + 40);
    s->W = tl_rd32(b + 44);
    s->rotv = tl_rd32(b + 48);
    s->n_blocks = tl_rd32(b + 52);
    s->lag = tl_rd32(b + 56);
    s->reserved = tl_rd32(b + 60);
    s->vbits = tl_rd32(b + 64);
    s->norm_per_head = tl_rd32(b + 68);
    s->reserved2 = tl_rd32(b + 72);
    s->reserved3 = tl_rd32(b + 76);
    int ok = 1;
    ok &= CHECKF(s->version == OSCAR_FORMAT_VERSION && s->version == 5, "version %u", s->version);
    ok &= CHECKF(s->vbits == (uint32_t)g->vbits && s->norm_per_head == (uint32_t)g->norm_per_head &&
                     s->reserved2 == 0 && s->reserved3 == 0,
                 "value bits %u, key_norm_per_head %u, reserved %u %u", s->vbits, s->norm_per_head, s->reserved2,
                 s->reserved3);
    ok &= CHECKF(s->lag == (uint32_t)g->cfg.rollback_tokens && s->reserved == (uint32_t)g->cfg.sink_tokens,
                 "rollback_tokens %u sink_tokens %u", s->lag, s->reserved);
    ok &= CHECKF(s->method == (uint32_t)g->cfg.method, "method %u", s->method);
    ok &= CHECKF(s->bits == (uint32_t)g->kbits, "key bits %u", s->bits);
    ok &= CHECKF(s->d == (uint32_t)g->d && s->hkv == (uint32_t)g->hkv && s->L == (uint32_t)g->L, "shape %u %u %u", s->d,
                 s->hkv, s->L);
    ok &= CHECKF(s->gk == (uint32_t)g->gk && s->gv == (uint32_t)g->gv && s->R == (uint32_t)g->R, "groups %u %u R %u",
                 s->gk, s->gv, s->R);
    ok &= CHECKF(s->W == (uint32_t)g->W && s->rotv == (uint32_t)(g->cfg.rotate_values ? 1 : 0), "W %u rotv %u", s->W,
                 s->rotv);
    if (!ok || s->L > 8) return 0;
    size_t off = HDR;
    uint64_t maxb = 0;
    for (uint32_t l = 0; l < s->L; l++, off += 16) {
        s->tokens[l] = tl_rd64(b + off);
        s->packed[l] = tl_rd64(b + off + 8);
        /* without a rollback lag a layer packs every full block */
        if (g->cfg.rollback_tokens == 0)
            ok &= CHECKF(s->packed[l] == s->tokens[l] / s->R, "layer %u: %llu packed blocks for %llu tokens", l,
                         (unsigned long long)s->packed[l], (unsigned long long)s->tokens[l]);
        if (s->packed[l] > maxb) maxb = s->packed[l];
    }
    ok &= CHECKF(s->n_blocks == maxb, "n_blocks %u, max over layers of packed blocks is %llu", s->n_blocks,
                 (unsigned long long)maxb);
    s->blocks_off = off;
    off += (size_t)s->n_blocks * s->L * g->LB;
    for (uint32_t l = 0; l < s->L; l++) {
        s->win_off[l] = off;
        /* K rows, V rows, then one fp32 key sum of squares per token */
        off += 2 * (size_t)(s->tokens[l] - s->packed[l] * s->R) * g->hkv * g->d * g->w;
        off += 4 * (size_t)(s->tokens[l] - s->packed[l] * s->R);
    }
    off += 8;
    s->size = off;
    ok &= CHECKF(off == n, "stream size %zu, FORMAT.md gives %zu", n, off);
    /* reported, but the contents are checked even if this fails */
    if (off == n)
        CHECKF(tl_rd64(b + n - 8) == tl_fnv1a(b, n - 8),
               "trailing checksum 0x%016llx is not FNV-1a 64 of the stream (0x%016llx)",
               (unsigned long long)tl_rd64(b + n - 8), (unsigned long long)tl_fnv1a(b, n - 8));
    return ok;
}

static const unsigned char *layer_block(const unsigned char *b, const stream *s, const tl_geom *g, int i, int l) {
    return b + s->blocks_off + ((size_t)i * s->L + (size_t)l) * g->LB;
}

/* ---- codes ------------------------------------------------------------------------ */

static void test_code_layout(void) {
    for (int bits = 2; bits <= 4; bits += 2) {
        int P = 16 / bits, bad = 0;
        for (int lane = 0; lane < 32; lane++)
            for (int q = 0; q < 64; q++)
                for (int e = 0; e < 2; e++) {
                    int word = -1, bit = -1;
                    oscar_code_position(bits, lane, q, e, &word, &bit);
                    if (word != q / P || bit != 16 * e + bits * (q % P)) bad++;
                }
        CHECKF(bad == 0, "oscar_code_position disagrees with FORMAT.md at %d positions (b=%d)", bad, bits);
        for (int d = 64; d <= 256; d *= 2)
            for (int isv = 0; isv < 2; isv++) {
                /* every (token, channel) exactly once; encode/decode inverse */
                const int R = 32;
                uint8_t *plane = malloc((size_t)R * d), *back = malloc((size_t)R * d);
                unsigned char *codes = calloc((size_t)R * d * bits / 8, 1);
                for (int i = 0; i < R * d; i++) plane[i] = (uint8_t)((i * 7 + i / d) & ((1 << bits) - 1));
                tl_encode_codes(plane, R, d, bits, isv, codes);
                tl_decode_codes(codes, R, d, bits, isv, back);
                CHECKF(memcmp(plane, back, (size_t)R * d) == 0, "tile walk not a bijection (d=%d b=%d %s)", d, bits,
                       isv ? "V" : "K");
                /* a single code lands where FORMAT.md says: K token 0 channel 1
                 * is lane 0 pair 0 element 1 -> word 0 bit 16 */
                memset(codes, 0, (size_t)R * d * bits / 8);
                memset(plane, 0, (size_t)R * d);
                plane[1] = 1; /* token 0, channel 1 */
                tl_encode_codes(plane, R, d, bits, isv, codes);
                if (!isv)
                    CHECK(tl_rd32(codes) == (1u << 16));
                else /* V: token 0 channel 1 -> g=1 (lane 4), pair 0, e 0 */
                    CHECK(tl_rd32(codes + 4 * (size_t)d * bits / 16) == 1u);
                free(plane);
                free(back);
                free(codes);
            }
    }
}

/* ---- stream contents against the reference ------------------------------------ */

typedef struct fmt_counts {
    int64_t codes, code_near, code_bad, params, param_diff, param_bad, win, win_diff, win_bad;
} fmt_counts;

/* How far x may be from the library's x (rotated methods compute the FWHT in
 * fp32 and may round the window value differently). */
static double x_uncertainty(const tl_geom *g, double x, double s, int rot, double rms) {
    if (!rot) return 0.0;
    /* the fp32 FWHT is accurate relative to the vector, not the element */
    if (g->W == OSCAR_DTYPE_F32) return 4e-6 * (fabs(x) + rms);
    return tl_ulp(g->W, (fabs(x) + 4e-6 * rms) * s) / s * 1.01 + 4e-6 * (fabs(x) + rms);
}

/* RMS of every (token, head) vector of x [T][hkv][d]. */
static double *head_rms(const float *x, int64_t T, int hkv, int d) {
    double *out = malloc(sizeof(double) * (size_t)(T * hkv + 1));
    for (int64_t i = 0; i < T * hkv; i++) {
        double acc = 0;
        for (int c = 0; c < d; c++) acc += (double)x[i * d + c] * x[i * d + c];
        out[i] = sqrt(acc / d);
    }
    return out;
}

static void check_code(const tl_geom *g, float x, uint16_t sc16, uint16_t lo16, int got, double unc, fmt_counts *fc) {
    int want = tl_ref_code(x, sc16, lo16, g->Q);
    fc->codes++;
    if (want == got) return;
    double sc = tl_f16_to_double(sc16), l0 = tl_f16_to_double(lo16);
    int near = 0;
    if (sc > 0) {
        double u = ((double)x - l0) / sc;
        double dist = fabs(u - floor(u) - 0.5);
        near = dist <= 1e-6 * (fabs(u) > 1 ? fabs(u) : 1) + unc / sc;
        near = near && abs(want - got) == 1;
    }
    if (near)
        fc->code_near++;
    else
        fc->code_bad++;
}

static void check_stream_contents(const tl_geom *g, const unsigned char *b, const stream *s, float *const *k,
                                  float *const *v, const char *what) {
    const int d = g->d, hkv = g->hkv, R = g->R;
    const int64_t row = (int64_t)hkv * d;
    fmt_counts fc;
    memset(&fc, 0, sizeof fc);
    for (int l = 0; l < g->L; l++) {
        int64_t T = (int64_t)s->tokens[l], P = (T / R) * R;
        /* norms from the stream (summation order is not part of the format) */
        float *norms = malloc(sizeof(float) * (size_t)(P > 0 ? P : 1));
        for (int64_t t = 0; t < P; t++) norms[t] = 1.0f;
        if (g->scale)
            for (int64_t i = 0; i < P / R; i++) {
                const unsigned char *nb = layer_block(b, s, g, (int)i, l) + (size_t)hkv * g->head_bytes;
                for (int t = 0; t < R; t++) {
                    uint32_t u = tl_rd32(nb + 4 * t);
                    memcpy(&norms[i * R + t], &u, 4);
                }
            }
        tl_ref ref, own;
        tl_ref_build(g, k[l], v[l], T, g->scale ? norms : NULL, &ref);
        tl_ref_build(g, k[l], v[l], T, NULL, &own);
        double *rk = head_rms(ref.kq ? ref.kq : ref.xk, ref.kq ? P : T, hkv, d);
        double *rv = head_rms(ref.xv, T, hkv, d);
        double *rxk = head_rms(ref.xk, T, hkv, d);
        if (g->scale) {
            int64_t bad = 0;
            for (int64_t t = 0; t < P; t++) {
                double rel = fabs(norms[t] - own.s[t]) / own.s[t];
                if (!(rel <= (g->rot ? (g->W == OSCAR_DTYPE_F32 ? 1e-5 : 1e-4) : 2e-6))) bad++;
            }
            CHECKF(bad == 0, "%s layer %d: %lld token norms differ from sqrt(sum x^2) (or 1 for zero keys)", what, l,
                   (long long)bad);
        }
        /* blocks */
        for (int64_t i = 0; i < (int64_t)s->n_blocks; i++) {
            const unsigned char *lb = layer_block(b, s, g, (int)i, l);
            if (i >= P / R) {
                int nz = 0;
                for (size_t j = 0; j < g->LB; j++) nz |= lb[j];
                CHECKF(nz == 0, "%s layer %d: unflushed layer block %lld is not zero", what, l, (long long)i);
                continue;
            }
            if (!g->quant) {
                /* head h: K [R][d] then V [R][d] in W */
                size_t es = (size_t)g->w;
                unsigned char *want = malloc((size_t)R * d * es);
                float *tmp = malloc(sizeof(float) * (size_t)R * d);
                int bad = 0;
                for (int h = 0; h < hkv; h++)
                    for (int kv = 0; kv < 2; kv++) {
                        for (int t = 0; t < R; t++)
                            for (int c = 0; c < d; c++)
                                tmp[t * d + c] = (kv ? ref.xv : ref.xk)[(i * R + t) * row + h * d + c];
                        tl_encode(tmp, g->W, want, (int64_t)R * d);
                        const unsigned char *got = lb + ((size_t)h * 2 + kv) * R * d * es;
                        if (memcmp(got, want, (size_t)R * d * es) != 0) bad++;
                    }
                CHECKF(bad == 0, "%s layer %d block %lld: %d of the K/V arrays differ from the inputs in W", what, l,
                       (long long)i, bad);
                free(want);
                free(tmp);
                continue;
            }
            uint8_t *plane = malloc((size_t)R * d);
            for (int h = 0; h < hkv; h++) {
                const unsigned char *hb = lb + (size_t)h * g->head_bytes;
                const unsigned char *kp = hb + 2 * g->codes_bytes, *vp = kp + g->kparams_bytes;
                /* K params [R/Gk][d] */
                for (int gi = 0; gi < R / g->gk; gi++)
                    for (int c = 0; c < d; c++) {
                        uint16_t sc = (uint16_t)tl_rd32(kp + 4 * ((size_t)gi * d + c)),
                                 lo = (uint16_t)(tl_rd32(kp + 4 * ((size_t)gi * d + c)) >> 16);
                        size_t pi = ((size_t)(i * R / g->gk + gi) * hkv + h) * d + c;
                        fc.params++;
                        if (sc != ref.ksc[pi] || lo != ref.klo[pi]) {
                            fc.param_diff++;
                            double dsc = fabs(tl_f16_to_double(sc) - tl_f16_to_double(ref.ksc[pi]));
                            double dlo = fabs(tl_f16_to_double(lo) - tl_f16_to_double(ref.klo[pi]));
                            double u = 0.0; /* allowed: x uncertainty of the group's extremes */
                            for (int t = 0; t < g->gk; t++) {
                                int64_t tt = i * R + gi * g->gk + t;
                                double uu = x_uncertainty(g, ref.kq[tt * row + h * d + c], ref.s[tt], g->rot,
                                                           rk[tt * hkv + h]);
                                if (uu > u) u = uu;
                            }
                            if (!g->rot || dsc > 2 * u + tl_ulp(OSCAR_DTYPE_F16, tl_f16_to_double(sc)) ||
                                dlo > u + tl_ulp(OSCAR_DTYPE_F16, tl_f16_to_double(lo)))
                                fc.param_bad++;
                        }
                    }
                /* V params [R][d/Gv] */
                for (int t = 0; t < R; t++)
                    for (int j = 0; j < d / g->gv; j++) {
                        uint32_t w = tl_rd32(vp + 4 * ((size_t)t * (d / g->gv) + j));
                        uint16_t sc = (uint16_t)w, lo = (uint16_t)(w >> 16);
                        size_t pi = ((size_t)(i * R + t) * hkv + h) * (d / g->gv) + j;
                        fc.params++;
                        if (sc != ref.vsc[pi] || lo != ref.vlo[pi]) {
                            fc.param_diff++;
                            double u = 0.0;
                            for (int c = 0; c < g->gv; c++) {
                                double uu = x_uncertainty(g, ref.xv[(i * R + t) * row + h * d + j * g->gv + c], 1.0,
                                                          g->rotv, rv[(i * R + t) * hkv + h]);
                                if (uu > u) u = uu;
                            }
                            double dsc = fabs(tl_f16_to_double(sc) - tl_f16_to_double(ref.vsc[pi]));
                            double dlo = fabs(tl_f16_to_double(lo) - tl_f16_to_double(ref.vlo[pi]));
                            if (!g->rotv || dsc > 2 * u + tl_ulp(OSCAR_DTYPE_F16, tl_f16_to_double(sc)) ||
                                dlo > u + tl_ulp(OSCAR_DTYPE_F16, tl_f16_to_double(lo)))
                                fc.param_bad++;
                        }
                    }
                /* K codes, computed from the stream's parameters and the reference x */
                tl_decode_codes(hb, R, d, g->bits, 0, plane);
                for (int t = 0; t < R; t++)
                    for (int c = 0; c < d; c++) {
                        int gi = t / g->gk;
                        uint32_t w = tl_rd32(kp + 4 * ((size_t)gi * d + c));
                        int64_t tt = i * R + t;
                        float x = ref.kq[tt * row + h * d + c];
                        check_code(g, x, (uint16_t)w, (uint16_t)(w >> 16), plane[t * d + c],
                                   x_uncertainty(g, x, ref.s[tt], g->rot, rk[tt * hkv + h]), &fc);
                    }
                tl_decode_codes(hb + g->codes_bytes, R, d, g->bits, 1, plane);
                for (int t = 0; t < R; t++)
                    for (int c = 0; c < d; c++) {
                        uint32_t w = tl_rd32(vp + 4 * ((size_t)t * (d / g->gv) + c / g->gv));
                        float x = ref.xv[(i * R + t) * row + h * d + c];
                        check_code(g, x, (uint16_t)w, (uint16_t)(w >> 16), plane[t * d + c],
                                   x_uncertainty(g, x, 1.0, g->rotv, rv[(i * R + t) * hkv + h]), &fc);
                    }
            }
            free(plane);
        }
        /* window: K rows then V rows in W */
        {
            int64_t wt = T - P;
            size_t es = (size_t)g->w, nbytes = (size_t)wt * row * es;
            const unsigned char *wk = b + s->win_off[l], *wv = wk + nbytes;
            for (int kv = 0; kv < 2; kv++) {
                const unsigned char *src = kv ? wv : wk;
                const float *want = (kv ? ref.xv : ref.xk) + P * row;
                int rot = kv ? g->rotv : g->rot;
                float *got = malloc(sizeof(float) * (size_t)(wt * row + 1));
                tl_decode(src, g->W, got, wt * row);
                for (int64_t j = 0; j < wt * row; j++) {
                    fc.win++;
                    if (got[j] != want[j]) {
                        fc.win_diff++;
                        int64_t th = P * hkv + j / d; /* (token, head) index */
                        double rms = kv ? rv[th] : rxk[th];
                        if (!rot || fabs(got[j] - want[j]) > x_uncertainty(g, want[j], 1.0, 1, rms) * 1.01 +
                                                                  tl_ulp(g->W, want[j]))
                            fc.win_bad++;
                    }
                }
                free(got);
            }
            /* each window token's sum of squares, from its stored K row:
             * per head a sequential fp32 sum, then the heads in order */
            const unsigned char *ssp = wv + nbytes;
            float *krow = malloc(sizeof(float) * (size_t)row);
            int64_t ss_bad = 0;
            for (int64_t t = 0; t < wt; t++) {
                tl_decode(wk + (size_t)t * row * es, g->W, krow, row);
                float total = 0.0f;
                for (int h = 0; h < hkv; h++) total = total + tl_head_sumsq_def(krow + h * d, d);
                const uint32_t u = tl_rd32(ssp + 4 * (size_t)t);
                float got;
                memcpy(&got, &u, 4);
                ss_bad += memcmp(&got, &total, 4) != 0;
            }
            CHECKF(ss_bad == 0, "%s layer %d: %lld of %lld window sums of squares differ from the stored K rows'",
                   what, l, (long long)ss_bad, (long long)wt);
            free(krow);
        }
        free(norms);
        free(rk);
        free(rv);
        free(rxk);
        tl_ref_free(&ref);
        tl_ref_free(&own);
    }
    printf("     %s: %lld codes (%lld differ at a rounding boundary), %lld params (%lld differ), %lld window "
           "values (%lld differ)\n",
           what, (long long)fc.codes, (long long)fc.code_near, (long long)fc.params, (long long)fc.param_diff,
           (long long)fc.win, (long long)fc.win_diff);
    CHECKF(fc.code_bad == 0 && fc.param_bad == 0 && fc.win_bad == 0,
           "%s: %lld codes, %lld params, %lld window values differ from FORMAT.md beyond rounding", what,
           (long long)fc.code_bad, (long long)fc.param_bad, (long long)fc.win_bad);
    double frac = g->rot && g->W != OSCAR_DTYPE_F32 ? 0.01 : 0.001;
    CHECKF(fc.code_near <= frac * fc.codes + 2, "%s: too many boundary code differences (%lld of %lld)", what,
           (long long)fc.code_near, (long long)fc.codes);
    CHECKF(fc.param_diff <= (g->rot ? 0.03 * fc.params + 2 : 0), "%s: %lld of %lld params differ", what,
           (long long)fc.param_diff, (long long)fc.params);
    /* an fp32 window keeps the last bits of the fp32 FWHT: differences are
     * expected there and bounded above; an fp16/bf16 window rounds them away
     * except in rare elements */
    if (g->W != OSCAR_DTYPE_F32)
        CHECKF(fc.win_diff <= (g->rot ? 0.01 * fc.win + 2 : 0), "%s: %lld of %lld window values differ", what,
               (long long)fc.win_diff, (long long)fc.win);
}

static void test_stream_contents(void) {
    tl_rng r = tl_rng_for("stream_contents");
    static const oscar_method ms[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT,
                                      OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    int idx = 0;
    for (int mi = 0; mi < 5; mi++)
        for (int bits = 2; bits <= 4; bits += 2)
            for (int wi = 0; wi < 3; wi++, idx++) {
                if (mi == 0 && bits == 4) continue;
                int d = (idx % 3 == 0) ? 64 : (idx % 3 == 1) ? 128 : 256;
                int hkv = d == 256 ? 1 : 2;
                oscar_config cfg = tl_small_config(ms[mi], bits, d, hkv, 2 * hkv);
                cfg.num_layers = 2;
                cfg.residual = (idx % 2) ? 64 : 32;
                cfg.k_group = (idx % 4 == 1) ? 32 : 16;
                cfg.v_group = (idx % 5 == 2) ? 64 : (idx % 2) ? 16 : 32;
                cfg.window_dtype = (oscar_dtype)wi;
                cfg.block_count = 16;
                tl_geom g = tl_geom_of(&cfg);
                oscar_cache *c = tl_create(&cfg);
                if (!c) continue;
                int32_t seq;
                CHECK_OK(oscar_seq_add(c, &seq));
                const int64_t row = (int64_t)hkv * d;
                int64_t T[2] = {2 * cfg.residual + 5, cfg.residual + 3};
                float *k[2], *v[2];
                for (int l = 0; l < 2; l++) {
                    k[l] = malloc(sizeof(float) * (size_t)(T[l] * row));
                    v[l] = malloc(sizeof(float) * (size_t)(T[l] * row));
                    tl_gen_kv(&r, (idx + l) % TL_FLAVORS, k[l], v[l], T[l], hkv, d, OSCAR_DTYPE_F32);
                    CHECK_OK(tl_append(c, l, seq, k[l], v[l], T[l], hkv, d, OSCAR_DTYPE_F32));
                }
                char what[160];
                snprintf(what, sizeof what, "%s b=%d d=%d W=%s R=%d Gk=%d Gv=%d %s/%s", oscar_method_name(cfg.method),
                         g.bits, d, tl_dtype_name(cfg.window_dtype), cfg.residual, cfg.k_group, cfg.v_group,
                         tl_flavor_name(idx % TL_FLAVORS), tl_flavor_name((idx + 1) % TL_FLAVORS));
                size_t n = 0;
                unsigned char *buf = tl_export(c, seq, &n);
                stream s;
                if (buf && parse_stream(buf, n, &g, &s)) {
                    CHECK(s.tokens[0] == (uint64_t)T[0] && s.tokens[1] == (uint64_t)T[1] && s.n_blocks == 2);
                    check_stream_contents(&g, buf, &s, k, v, what);
                }
                free(buf);
                for (int l = 0; l < 2; l++) {
                    free(k[l]);
                    free(v[l]);
                }
                oscar_cache_destroy(c);
            }
}

/* ---- export / import ------------------------------------------------------------------ */

typedef struct fixture {
    oscar_config cfg;
    tl_geom g;
    oscar_cache *c;
    int32_t seq;
} fixture;

static int fixture_make(fixture *f, oscar_method m, int equal_layers, tl_rng *r) {
    f->cfg = tl_small_config(m, 2, 64, 2, 4);
    f->cfg.num_layers = 2;
    f->cfg.residual = 32;
    f->cfg.k_group = 16;
    f->cfg.block_count = 24;
    f->g = tl_geom_of(&f->cfg);
    f->c = tl_create(&f->cfg);
    if (!f->c) return 0;
    CHECK_OK(oscar_seq_add(f->c, &f->seq));
    const int64_t row = 128;
    for (int l = 0; l < 2; l++) {
        int64_t T = (l == 0 || equal_layers) ? 2 * 32 + 9 : 32 + 2;
        float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
        tl_gen_kv(r, TL_FLAVOR_SINKS, k, v, T, 2, 64, OSCAR_DTYPE_F32);
        CHECK_OK(tl_append(f->c, l, f->seq, k, v, T, 2, 64, OSCAR_DTYPE_F32));
        free(k);
        free(v);
    }
    return 1;
}

static void attention_pair(oscar_cache *a, int32_t sa, oscar_cache *b, int32_t sb, int layer, tl_rng *r,
                           const char *what) {
    float q[2 * 4 * 64], oa[2 * 4 * 64], ob[2 * 4 * 64];
    double ref[2 * 4 * 64];
    tl_fill_normal(r, q, 2 * 4 * 64, 0.3);
    CHECK_OK(tl_attention(a, layer, 1, &sa, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oa, 4, 64));
    CHECK_OK(tl_attention(b, layer, 1, &sb, 2, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, ob, 4, 64));
    for (int i = 0; i < 2 * 4 * 64; i++) ref[i] = oa[i];
    CHECKF(tl_compare_out(ob, ref, NULL, 8, 64, OSCAR_DTYPE_F32, 1e-6, NULL) == 0, "%s: attention differs (layer %d)", what,
           layer);
}

static void test_export_import(void) {
    tl_rng r = tl_rng_for("export_import");
    static const oscar_method ms[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT,
                                      OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    for (int mi = 0; mi < 5; mi++) {
        fixture f;
        if (!fixture_make(&f, ms[mi], mi % 2, &r)) continue;
        const char *name = oscar_method_name(ms[mi]);
        size_t n = 0;
        unsigned char *buf = tl_export(f.c, f.seq, &n);
        if (!buf) {
            oscar_cache_destroy(f.c);
            continue;
        }
        /* into a fresh cache with a different pool size and Hq (not part of the stream) */
        oscar_config c2 = f.cfg;
        c2.block_count = 9;
        c2.max_seqs = 3;
        c2.num_q_heads = 4;
        oscar_cache *other = tl_create(&c2);
        int32_t imp = -1, imp2 = -1;
        if (other) {
            CHECK_OK(oscar_seq_import(other, buf, n, &imp));
            CHECKF(tl_same_export(f.c, f.seq, other, imp), "%s: import then export changes the bytes", name);
            for (int l = 0; l < 2; l++) {
                oscar_seq_info a, b;
                CHECK_OK(oscar_seq_info_get(f.c, f.seq, l, &a));
                CHECK_OK(oscar_seq_info_get(other, imp, l, &b));
                CHECK(a.tokens == b.tokens && a.packed_tokens == b.packed_tokens && a.window_tokens == b.window_tokens);
                attention_pair(f.c, f.seq, other, imp, l, &r, name);
            }
            oscar_memory_stats m;
            CHECK_OK(oscar_memory(other, &m));
            CHECKF(m.blocks_used == 2 && m.seqs_live == 1, "%s: import used %lld blocks", name, (long long)m.blocks_used);
            /* both keep working identically */
            for (int l = 0; l < 2; l++) {
                float k[40 * 128], v[40 * 128];
                tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 40, 2, 64, OSCAR_DTYPE_F32);
                CHECK_OK(tl_append(f.c, l, f.seq, k, v, 40, 2, 64, OSCAR_DTYPE_F32));
                CHECK_OK(tl_append(other, l, imp, k, v, 40, 2, 64, OSCAR_DTYPE_F32));
            }
            CHECKF(tl_same_export(f.c, f.seq, other, imp), "%s: appends after import diverge", name);
            attention_pair(f.c, f.seq, other, imp, 1, &r, name);
        }
        /* into the same cache: a new id, its own blocks */
        oscar_memory_stats m0, m1;
        CHECK_OK(oscar_memory(f.c, &m0));
        CHECK_OK(oscar_seq_import(f.c, buf, n, &imp2));
        CHECK(imp2 != f.seq && imp2 >= 0);
        CHECK_OK(oscar_memory(f.c, &m1));
        CHECKF(m1.blocks_used == m0.blocks_used + 2 && m1.seqs_live == m0.seqs_live + 1,
               "%s: import into the same cache: blocks %lld -> %lld", name, (long long)m0.blocks_used,
               (long long)m1.blocks_used);
        size_t n2 = 0;
        unsigned char *buf2 = tl_export(f.c, imp2, &n2);
        CHECK(buf2 && n2 == n && memcmp(buf, buf2, n) == 0);
        free(buf2);
        CHECK_OK(oscar_seq_free(f.c, imp2));
        free(buf);
        oscar_cache_destroy(other);
        oscar_cache_destroy(f.c);
    }
    /* an empty sequence */
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 2, 4);
    oscar_cache *c = tl_create(&cfg);
    if (c) {
        int32_t s, s2;
        CHECK_OK(oscar_seq_add(c, &s));
        size_t n = 0;
        unsigned char *buf = tl_export(c, s, &n);
        CHECKF(n == HDR + 16 + 8, "empty sequence stream is %zu bytes", n);
        if (buf) {
            CHECK_OK(oscar_seq_import(c, buf, n, &s2));
            oscar_seq_info info;
            CHECK_OK(oscar_seq_info_get(c, s2, 0, &info));
            CHECK(info.tokens == 0);
        }
        free(buf);
        oscar_cache_destroy(c);
    }
}

static void test_import_mismatch(void) {
    tl_rng r = tl_rng_for("import_mismatch");
    fixture f;
    if (!fixture_make(&f, OSCAR_METHOD_OSCAR, 1, &r)) return;
    size_t n = 0;
    unsigned char *buf = tl_export(f.c, f.seq, &n);
    for (int field = 0; field < 10 && buf; field++) {
        oscar_config c2 = f.cfg;
        switch (field) {
        case 0: c2.method = OSCAR_METHOD_QUAROT; break;
        case 1: c2.bits = 4; break;
        case 2: c2.head_dim = 128; break;
        case 3: c2.num_kv_heads = 1; c2.num_q_heads = 4; break;
        case 4: c2.num_layers = 3; break;
        case 5: c2.k_group = 32; break;
        case 6: c2.v_group = 16; break;
        case 7: c2.residual = 64; break;
        case 8: c2.window_dtype = OSCAR_DTYPE_BF16; break;
        case 9: c2.rotate_values = 0; break;
        }
        oscar_cache *c = tl_create(&c2);
        if (!c) continue;
        /* a resident sequence that must stay untouched */
        int32_t keep, got = -99;
        CHECK_OK(oscar_seq_add(c, &keep));
        float k[70 * 256], v[70 * 256];
        int64_t row = (int64_t)c2.num_kv_heads * c2.head_dim;
        tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 70 * 128 / row > 0 ? 70 * 128 / row : 1, c2.num_kv_heads, c2.head_dim,
                  OSCAR_DTYPE_F32);
        CHECK_OK(tl_append(c, 0, keep, k, v, 70 * 128 / row, c2.num_kv_heads, c2.head_dim, OSCAR_DTYPE_F32));
        size_t n0 = 0;
        unsigned char *before = tl_export(c, keep, &n0);
        oscar_memory_stats m0, m1;
        CHECK_OK(oscar_memory(c, &m0));
        CHECK_ST(c, oscar_seq_import(c, buf, n, &got), OSCAR_E_FORMAT);
        CHECK_OK(oscar_memory(c, &m1));
        CHECKF(m1.blocks_used == m0.blocks_used && m1.seqs_live == m0.seqs_live,
               "mismatch %d: a rejected import changed the pool", field);
        size_t n1 = 0;
        unsigned char *after = tl_export(c, keep, &n1);
        CHECKF(before && after && n0 == n1 && memcmp(before, after, n0) == 0,
               "mismatch %d: a rejected import changed a resident sequence", field);
        free(before);
        free(after);
        oscar_cache_destroy(c);
    }
    free(buf);
    oscar_cache_destroy(f.c);
}

/* ---- streams written here, from FORMAT.md alone ---------------------------------------- */

/* Builds the stream of one single-layer sequence from the reference
 * quantiser; returns a malloc'd buffer. */
static unsigned char *handmade_stream(const tl_geom *g, const tl_ref *ref, size_t *size) {
    const int d = g->d, hkv = g->hkv, R = g->R;
    const int64_t row = (int64_t)hkv * d, T = ref->T, nb = T / R, wt = T % R;
    size_t n = HDR + 16 + (size_t)nb * g->LB + 2 * (size_t)wt * row * g->w + 4 * (size_t)wt + 8;
    unsigned char *b = calloc(n, 1); /* rollback_tokens 0 and sink_tokens 0 stay 0 */
    memcpy(b, "OSCARSEQ", 8);
    uint32_t f[12] = {5, (uint32_t)g->cfg.method, (uint32_t)g->kbits, (uint32_t)d, (uint32_t)hkv, 1,
                      (uint32_t)g->gk, (uint32_t)g->gv, (uint32_t)R, (uint32_t)g->W,
                      (uint32_t)(g->cfg.rotate_values != 0), (uint32_t)nb};
    for (int i = 0; i < 12; i++) tl_wr32(b + 8 + 4 * i, f[i]);
    tl_wr32(b + 64, (uint32_t)g->vbits); /* version 4 on: value bits; per-head norms 0 */
    tl_wr64(b + HDR, (uint64_t)T);
    tl_wr64(b + HDR + 8, (uint64_t)nb);
    unsigned char *p = b + HDR + 16;
    uint8_t *plane = malloc((size_t)R * d);
    for (int64_t i = 0; i < nb; i++, p += g->LB) {
        if (!g->quant) { /* head h: K [R][d] then V [R][d] in W */
            float *tmp = malloc(sizeof(float) * (size_t)R * d);
            for (int h = 0; h < hkv; h++)
                for (int kv = 0; kv < 2; kv++) {
                    for (int t = 0; t < R; t++)
                        for (int c = 0; c < d; c++) tmp[t * d + c] = (kv ? ref->xv : ref->xk)[(i * R + t) * row + h * d + c];
                    tl_encode(tmp, g->W, p + ((size_t)h * 2 + kv) * R * d * g->w, (int64_t)R * d);
                }
            free(tmp);
            continue;
        }
        for (int h = 0; h < hkv; h++) {
            unsigned char *hb = p + (size_t)h * g->head_bytes;
            for (int kv = 0; kv < 2; kv++) {
                for (int t = 0; t < R; t++)
                    for (int c = 0; c < d; c++)
                        plane[t * d + c] = (kv ? ref->vcode : ref->kcode)[(i * R + t) * row + h * d + c];
                tl_encode_codes(plane, R, d, kv ? g->vbits : g->kbits, kv, hb + (size_t)kv * g->kcodes_bytes);
            }
            unsigned char *kp = hb + g->kcodes_bytes + g->vcodes_bytes, *vp = kp + g->kparams_bytes;
            for (int gi = 0; gi < R / g->gk; gi++)
                for (int c = 0; c < d; c++) {
                    size_t pi = ((size_t)(i * R / g->gk + gi) * hkv + h) * d + c;
                    tl_wr32(kp + 4 * ((size_t)gi * d + c), (uint32_t)ref->ksc[pi] | (uint32_t)ref->klo[pi] << 16);
                }
            for (int t = 0; t < R; t++)
                for (int j = 0; j < d / g->gv; j++) {
                    size_t pi = ((size_t)(i * R + t) * hkv + h) * (d / g->gv) + j;
                    tl_wr32(vp + 4 * ((size_t)t * (d / g->gv) + j), (uint32_t)ref->vsc[pi] | (uint32_t)ref->vlo[pi] << 16);
                }
        }
        if (g->scale)
            for (int t = 0; t < R; t++) {
                uint32_t u;
                memcpy(&u, &ref->s[i * R + t], 4);
                tl_wr32(p + (size_t)hkv * g->head_bytes + 4 * t, u);
            }
    }
    tl_encode(ref->xk + nb * R * row, g->W, p, wt * row);
    p += (size_t)wt * row * g->w;
    tl_encode(ref->xv + nb * R * row, g->W, p, wt * row);
    p += (size_t)wt * row * g->w;
    /* the window tokens' key sums of squares (FORMAT.md), from the rounded K */
    {
        float *kr = malloc(sizeof(float) * (size_t)row);
        unsigned char *kw = malloc((size_t)row * g->w);
        for (int64_t t = 0; t < wt; t++) {
            tl_encode(ref->xk + (nb * R + t) * row, g->W, kw, row);
            tl_decode(kw, g->W, kr, row);
            float total = 0.0f;
            for (int h = 0; h < hkv; h++) total = total + tl_head_sumsq_def(kr + h * d, d);
            uint32_t u;
            memcpy(&u, &total, 4);
            tl_wr32(p + 4 * (size_t)t, u);
        }
        free(kr), free(kw);
    }
    tl_wr64(b + n - 8, tl_fnv1a(b, n - 8));
    free(plane);
    *size = n;
    return b;
}

/* A stream written from FORMAT.md (with its FNV-1a 64 checksum) must be
 * accepted, and read back as the reference dequantised values. */
static void test_handmade_streams(void) {
    tl_rng r = tl_rng_for("handmade_streams");
    static const oscar_method ms[] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    /* bits, then key_bits / value_bits: 3-bit codes are format version 5 */
    static const int widths[][3] = {{2, 0, 0}, {4, 0, 0}, {2, 3, 0}, {2, 0, 3}, {4, 3, 3}};
    for (int mi = 0; mi < 4; mi++)
        for (int wi = 0; wi < 5; wi++) {
            const int bits = widths[wi][0];
            if (ms[mi] == OSCAR_METHOD_NONE && wi >= 2) continue;
            oscar_config cfg = tl_small_config(ms[mi], bits, 64, 2, 4);
            cfg.key_bits = widths[wi][1], cfg.value_bits = widths[wi][2];
            cfg.residual = 32;
            cfg.k_group = 16;
            tl_geom g = tl_geom_of(&cfg);
            oscar_cache *c = tl_create(&cfg);
            if (!c) continue;
            const int d = 64, hkv = 2;
            const int64_t T = 2 * 32 + 7, row = hkv * d;
            float *k = malloc(sizeof(float) * (size_t)(T * row)), *v = malloc(sizeof(float) * (size_t)(T * row));
            tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k, v, T, hkv, d, OSCAR_DTYPE_F16);
            tl_ref ref;
            tl_ref_build(&g, k, v, T, NULL, &ref);
            size_t n = 0;
            unsigned char *b = handmade_stream(&g, &ref, &n);
            int32_t seq = -1;
            oscar_status st = oscar_seq_import(c, b, n, &seq);
            CHECKF(st == OSCAR_OK, "%s b=%d: a stream written from FORMAT.md is rejected: %s (%s)",
                   oscar_method_name(cfg.method), bits, oscar_status_name(st), oscar_last_error(c));
            if (st == OSCAR_OK) {
                float *kl, *vl;
                if (tl_read_all(c, seq, 0, hkv, d, &kl, &vl) == T) {
                    double ek = 0, ev = 0, mk = tl_max_abs(ref.krec, T * row), mv = tl_max_abs(ref.vrec, T * row);
                    for (int64_t i = 0; i < T * row; i++) {
                        if (fabs(kl[i] - ref.krec[i]) > ek) ek = fabs(kl[i] - ref.krec[i]);
                        if (fabs(vl[i] - ref.vrec[i]) > ev) ev = fabs(vl[i] - ref.vrec[i]);
                    }
                    CHECKF(ek <= 1e-6 * mk && ev <= 1e-6 * mv,
                           "%s b=%d: handmade stream reads back wrongly (K %.3g, V %.3g of max)",
                           oscar_method_name(cfg.method), bits, ek / mk, ev / mv);
                }
                free(kl);
                free(vl);
                /* and it re-exports to the same bytes */
                size_t n2 = 0;
                unsigned char *b2 = tl_export(c, seq, &n2);
                CHECKF(b2 && n2 == n && memcmp(b, b2, n) == 0,
                       "%s b=%d K%d/V%d: handmade stream does not re-export identically", oscar_method_name(cfg.method),
                       bits, g.kbits, g.vbits);
                free(b2);
                /* labelled version 4: the same import for 2- and 4-bit codes (re-exported as
                 * version 5); refused with a 3-bit width, which no version-4 writer wrote */
                tl_wr32(b + 8, 4);
                tl_fix_checksum(b, n);
                int32_t s4 = -1;
                const oscar_status st4 = oscar_seq_import(c, b, n, &s4);
                if (g.kbits == 3 || g.vbits == 3) {
                    CHECKF(st4 == OSCAR_E_FORMAT && strstr(oscar_last_error(c), "3-bit"),
                           "%s K%d/V%d: a version-4 stream with 3-bit codes: %s (%s)", oscar_method_name(cfg.method),
                           g.kbits, g.vbits, oscar_status_name(st4), oscar_last_error(c));
                } else if (CHECKF(st4 == OSCAR_OK, "%s b=%d: a version-4 stream is rejected: %s",
                                  oscar_method_name(cfg.method), bits, oscar_last_error(c))) {
                    b2 = tl_export(c, s4, &n2);
                    tl_wr32(b + 8, 5);
                    tl_fix_checksum(b, n);
                    CHECKF(b2 && n2 == n && memcmp(b, b2, n) == 0, "%s b=%d: a version-4 stream re-exports differently",
                           oscar_method_name(cfg.method), bits);
                    free(b2);
                }
            }
            free(b);
            tl_ref_free(&ref);
            free(k);
            free(v);
            oscar_cache_destroy(c);
        }
}

/* ---- corruption ------------------------------------------------------------------------ */

typedef struct snapshot {
    oscar_memory_stats m;
    unsigned char *bytes;
    size_t n;
} snapshot;

static snapshot snap(oscar_cache *c, int32_t seq) {
    snapshot s;
    memset(&s, 0, sizeof s);
    CHECK_OK(oscar_memory(c, &s.m));
    s.bytes = tl_export(c, seq, &s.n);
    return s;
}

static int same_snapshot(oscar_cache *c, int32_t seq, const snapshot *a) {
    snapshot b = snap(c, seq);
    int same = b.m.blocks_used == a->m.blocks_used && b.m.blocks_free == a->m.blocks_free &&
               b.m.seqs_live == a->m.seqs_live && a->bytes && b.bytes && a->n == b.n &&
               memcmp(a->bytes, b.bytes, a->n) == 0;
    free(b.bytes);
    return same;
}

/* Imports a (possibly bad) stream; `must_fail` requires OSCAR_E_FORMAT.
 * An accepted stream must re-export to the same bytes; it is then freed.
 * Returns 1 if accepted. */
static int try_import(oscar_cache *c, int32_t keep, const snapshot *base, const unsigned char *buf, size_t n,
                      int must_fail, const char *what) {
    int32_t id = -1;
    oscar_status st = oscar_seq_import(c, buf, n, &id);
    if (st == OSCAR_OK) {
        CHECKF(!must_fail, "%s: a corrupted stream was accepted", what);
        size_t n2 = 0;
        unsigned char *again = tl_export(c, id, &n2);
        CHECKF(again && n2 == n && memcmp(again, buf, n) == 0, "%s: accepted stream does not re-export identically",
               what);
        free(again);
        CHECK_OK(oscar_seq_free(c, id));
        return 1;
    }
    CHECKF(st == OSCAR_E_FORMAT || (n == 0 && st == OSCAR_E_INVALID_ARGUMENT), "%s: import returned %s", what,
           oscar_status_name(st));
    CHECKF(oscar_last_error(c)[0] != '\0', "%s: no error message", what);
    CHECKF(same_snapshot(c, keep, base), "%s: a rejected import changed the cache", what);
    return 0;
}

static void test_corrupt_streams(void) {
    tl_rng r = tl_rng_for("corrupt_streams");
    fixture f;
    if (!fixture_make(&f, OSCAR_METHOD_OSCAR, 0, &r)) return;
    size_t n = 0;
    unsigned char *good = tl_export(f.c, f.seq, &n);
    if (!good) return;
    unsigned char *buf = malloc(n + 64);
    snapshot base = snap(f.c, f.seq);
    char what[96];
    /* every header byte, and bytes all over the stream, flipped */
    for (size_t pos = 0; pos < n; pos += (pos < HDR + 16 ? 1 : 1 + (size_t)tl_randint(&r, 0, 700))) {
        memcpy(buf, good, n);
        buf[pos] ^= (unsigned char)(1u << tl_randint(&r, 0, 7));
        snprintf(what, sizeof what, "flip at %zu", pos);
        try_import(f.c, f.seq, &base, buf, n, 1, what);
    }
    memcpy(buf, good, n);
    buf[n - 1] ^= 0x80;
    try_import(f.c, f.seq, &base, buf, n, 1, "flipped checksum");
    /* truncated and extended */
    size_t cuts[] = {0, 1, 7, 8, HDR - 1, HDR, HDR + 8, HDR + 16, n / 2, n - 9, n - 8, n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        memcpy(buf, good, n);
        snprintf(what, sizeof what, "truncated to %zu", cuts[i]);
        try_import(f.c, f.seq, &base, buf, cuts[i], 1, what);
        if (cuts[i] >= 8) {
            tl_fix_checksum(buf, cuts[i]);
            snprintf(what, sizeof what, "truncated to %zu, checksum fixed", cuts[i]);
            try_import(f.c, f.seq, &base, buf, cuts[i], 1, what);
        }
    }
    memcpy(buf, good, n);
    buf[n] = 0;
    try_import(f.c, f.seq, &base, buf, n + 1, 1, "one extra byte");
    memcpy(buf, good, n - 8);
    memset(buf + n - 8, 0, 8);
    tl_fix_checksum(buf, n + 8);
    try_import(f.c, f.seq, &base, buf, n + 8, 1, "8 extra bytes, checksum fixed");
    /* crafted headers with a valid checksum */
    struct {
        size_t off;
        int wide;
        uint64_t val;
        const char *what;
    } crafted[] = {
        {0, 0, 0x5241435349, "magic"},          {8, 0, 6, "version 6"},
        {8, 0, 0, "version 0"},                 {12, 0, OSCAR_METHOD_KIVI, "method"},
        {12, 0, 99, "method 99"},               {16, 0, 4, "bits 4"},
        {16, 0, 3, "bits 3"},                   {20, 0, 128, "head_dim"},
        {20, 0, 96, "head_dim 96"},             {24, 0, 1, "num_kv_heads"},
        {24, 0, 0, "num_kv_heads 0"},           {28, 0, 1, "num_layers 1"},
        {28, 0, 0xffffffffu, "num_layers huge"}, {32, 0, 32, "k_group"},
        {36, 0, 16, "v_group"},                 {40, 0, 64, "residual"},
        {40, 0, 0, "residual 0"},               {44, 0, OSCAR_DTYPE_BF16, "window dtype"},
        {44, 0, 7, "window dtype 7"},           {48, 0, 0, "rotate_values 0"},
        {48, 0, 2, "rotate_values 2"},          {52, 0, 1, "n_blocks 1"},
        {52, 0, 3, "n_blocks 3"},               {52, 0, 0xffffffffu, "n_blocks huge"},
        {56, 0, 1, "rollback_tokens 1"},        {60, 0, 1, "sink_tokens 1"},
        {64, 0, 4, "value bits 4"},             {64, 0, 3, "value bits 3"},
        {64, 0, 0, "value bits 0"},             {68, 0, 1, "key_norm_per_head 1"},
        {68, 0, 2, "key_norm_per_head 2"},      {72, 0, 1, "reserved word 72"},
        {76, 0, 1, "reserved word 76"},
        {HDR, 1, 2 * 32 + 10, "tokens +1"},      {HDR, 1, 2 * 32 + 8, "tokens -1"},
        {HDR, 1, 3 * 32 + 9, "tokens +R"},       {HDR + 16, 1, 0, "layer 1 tokens 0"},
        {HDR, 1, 1ull << 62, "tokens 2^62"},     {HDR, 1, ~0ull, "tokens 2^64-1"},
        {HDR + 16, 1, 0x8000000000000000ull, "tokens 2^63"},
        {HDR + 8, 1, 3, "packed +1"},            {HDR + 8, 1, 1, "packed -1"},
        {HDR + 8, 1, ~0ull, "packed 2^64-1"},    {HDR + 24, 1, 0x80000000ull, "layer 1 packed 2^31"},
    };
    for (size_t i = 0; i < sizeof crafted / sizeof crafted[0]; i++) {
        memcpy(buf, good, n);
        if (crafted[i].wide)
            tl_wr64(buf + crafted[i].off, crafted[i].val);
        else if (crafted[i].off == 0)
            memcpy(buf, "OSCARSEZ", 8);
        else
            tl_wr32(buf + crafted[i].off, (uint32_t)crafted[i].val);
        tl_fix_checksum(buf, n);
        try_import(f.c, f.seq, &base, buf, n, 1, crafted[i].what);
    }
    /* regressions: block contents a packer cannot write, checksum fixed:
     * a NaN scale, a negative scale, a NaN token norm */
    {
        const size_t blocks = HDR + 16 * (size_t)f.g.L;
        const struct {
            size_t off;
            uint32_t val;
            int wide;
            const char *what;
        } bad[] = {
            {blocks + 2 * f.g.codes_bytes, 0x7e00u, 0, "NaN scale in block 0"},
            {blocks + 2 * f.g.codes_bytes, 0xbc00u, 0, "negative scale in block 0"},
            {blocks + 2 * f.g.codes_bytes + 2, 0x7c00u, 0, "Inf lo in block 0"},
            {blocks + (size_t)f.g.hkv * f.g.head_bytes, 0x7fc00000u, 1, "NaN token norm in block 0"},
            {blocks + (size_t)f.g.hkv * f.g.head_bytes + 4, 0u, 1, "zero token norm in block 0"},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            memcpy(buf, good, n);
            if (bad[i].wide) {
                tl_wr32(buf + bad[i].off, bad[i].val);
            } else {
                buf[bad[i].off] = (unsigned char)(bad[i].val & 0xff);
                buf[bad[i].off + 1] = (unsigned char)(bad[i].val >> 8);
            }
            tl_fix_checksum(buf, n);
            try_import(f.c, f.seq, &base, buf, n, 1, bad[i].what);
        }
    }
    /* a changed window value with the checksum recomputed per FORMAT.md is
     * a valid stream */
    memcpy(buf, good, n);
    buf[n - 9] ^= 0x01; /* low byte of the last fp16 window value */
    tl_fix_checksum(buf, n);
    CHECKF(try_import(f.c, f.seq, &base, buf, n, 0, "window byte changed, FNV-1a recomputed") == 1,
           "a valid stream (changed window value, FNV-1a 64 recomputed) was rejected: %s", oscar_last_error(f.c));
    /* the untouched stream is still accepted */
    CHECK(try_import(f.c, f.seq, &base, good, n, 0, "original") == 1);
    /* a version-3 stream (written before per-head norms and separate widths:
     * a 64-byte header, one width at 16) is this one without the header
     * words 64..79; a version-2 stream (the word at 60 reserved, 0, no sink
     * rows) is that with another version number: both import and re-export
     * as this version-4 one */
    for (uint32_t ver = 3; ver >= 2; ver--) {
        const size_t n3 = n - (HDR - HDR3);
        memcpy(buf, good, HDR3);
        memcpy(buf + HDR3, good + HDR, n - HDR);
        tl_wr32(buf + 8, ver);
        tl_fix_checksum(buf, n3);
        int32_t id = -1;
        oscar_status st = oscar_seq_import(f.c, buf, n3, &id);
        CHECKF(st == OSCAR_OK, "a version-%u stream is rejected: %s", ver, oscar_last_error(f.c));
        if (st == OSCAR_OK) {
            size_t n2 = 0;
            unsigned char *again = tl_export(f.c, id, &n2);
            CHECKF(again && n2 == n && memcmp(again, good, n) == 0, "a version-%u stream does not re-export as version 4",
                   ver);
            free(again);
            CHECK_OK(oscar_seq_free(f.c, id));
        }
        /* the same bytes read as version 4 are 16 bytes short */
        tl_wr32(buf + 8, 4);
        tl_fix_checksum(buf, n3);
        try_import(f.c, f.seq, &base, buf, n3, 1, "version-3 bytes labelled version 4");
        if (ver == 2) {
            tl_wr32(buf + 8, 2);
            tl_wr32(buf + 60, 1); /* version 2 has no sinks: the word must be 0 */
            tl_fix_checksum(buf, n3);
            try_import(f.c, f.seq, &base, buf, n3, 1, "version 2 with reserved word 1");
        }
    }
    /* a version-1 stream (56-byte header, tokens only; packed = tokens / R)
     * of the same sequence imports and re-exports as this version-4 one */
    {
        /* version 1: no packed counts, and the windows carry no sums of
         * squares (the importer computes them from the K rows) */
        const uint32_t L = tl_rd32(good + 28), R = tl_rd32(good + 40), nb = tl_rd32(good + 52);
        const size_t rowb = (size_t)tl_rd32(good + 20) * tl_rd32(good + 24) *
                            (tl_rd32(good + 44) == OSCAR_DTYPE_F32 ? 4 : 2);
        unsigned char *v1 = malloc(n);
        memcpy(v1, good, 56);
        tl_wr32(v1 + 8, 1);
        size_t o1 = 56, o2 = HDR + 16 * (size_t)L;
        for (uint32_t l = 0; l < L; l++, o1 += 8) tl_wr64(v1 + o1, tl_rd64(good + HDR + 16 * (size_t)l));
        const size_t blocks = (size_t)nb * L * f.g.LB;
        memcpy(v1 + o1, good + o2, blocks);
        o1 += blocks, o2 += blocks;
        for (uint32_t l = 0; l < L; l++) {
            const uint64_t t = tl_rd64(good + HDR + 16 * (size_t)l), p = tl_rd64(good + HDR + 16 * (size_t)l + 8);
            const size_t kv = 2 * (size_t)(t - p * R) * rowb;
            memcpy(v1 + o1, good + o2, kv);
            o1 += kv, o2 += kv + 4 * (size_t)(t - p * R);
        }
        const size_t n1 = o1 + 8;
        tl_fix_checksum(v1, n1);
        int32_t id = -1;
        CHECK_OK(oscar_seq_import(f.c, v1, n1, &id));
        size_t n2 = 0;
        unsigned char *again = tl_export(f.c, id, &n2);
        CHECKF(again && n2 == n && memcmp(again, good, n) == 0, "a version-1 stream does not re-export as version 4");
        free(again);
        CHECK_OK(oscar_seq_free(f.c, id));
        free(v1);
    }
    free(base.bytes);
    free(buf);
    free(good);
    oscar_cache_destroy(f.c);
}

static void test_fuzz(void) {
    tl_rng r = tl_rng_for("fuzz");
    fixture f;
    if (!fixture_make(&f, OSCAR_METHOD_OSCAR, 1, &r)) return;
    size_t n = 0;
    unsigned char *good = tl_export(f.c, f.seq, &n);
    if (!good) return;
    unsigned char *buf = malloc(n + 16);
    snapshot base = snap(f.c, f.seq);
    int accepted = 0, rejected = 0;
    char what[96];
    for (int it = 0; it < 400; it++) {
        memcpy(buf, good, n);
        size_t len = n;
        int kind = tl_randint(&r, 0, 4), must_fail = 0;
        int flips = tl_randint(&r, 1, 4);
        switch (kind) {
        case 0: /* flips, checksum not fixed: always detected */
            for (int i = 0; i < flips; i++) buf[tl_randint(&r, 0, (int)n - 1)] ^= (unsigned char)tl_randint(&r, 1, 255);
            must_fail = memcmp(buf, good, n) != 0;
            break;
        case 1: /* flips anywhere, checksum fixed */
            for (int i = 0; i < flips; i++) buf[tl_randint(&r, 0, (int)n - 9)] ^= (unsigned char)tl_randint(&r, 1, 255);
            tl_fix_checksum(buf, n);
            break;
        case 2: /* a header field replaced, checksum fixed */
            tl_wr32(buf + 4 * tl_randint(&r, 2, 13), (uint32_t)tl_next(&r) >> (tl_randint(&r, 0, 31)));
            tl_fix_checksum(buf, n);
            break;
        case 3: /* truncated */
            len = (size_t)tl_randint(&r, 0, (int)n - 1);
            if (tl_uniform(&r) < 0.5) tl_fix_checksum(buf, len);
            must_fail = 1;
            break;
        default: /* bytes in blocks / windows, checksum fixed */
            for (int i = 0; i < flips; i++) buf[tl_randint(&r, HDR + 16, (int)n - 9)] ^= (unsigned char)tl_randint(&r, 1, 255);
            tl_fix_checksum(buf, n);
            break;
        }
        snprintf(what, sizeof what, "fuzz %d (kind %d)", it, kind);
        if (try_import(f.c, f.seq, &base, buf, len, must_fail, what))
            accepted++;
        else
            rejected++;
    }
    printf("   fuzz: %d accepted (data bytes changed, checksum fixed), %d rejected\n", accepted, rejected);
    CHECK(rejected > 100);
    CHECKF(same_snapshot(f.c, f.seq, &base), "the fuzz loop changed the resident sequence");
    free(base.bytes);
    free(buf);
    free(good);
    oscar_cache_destroy(f.c);
}

int main(void) {
    printf("oscar %s, test_format\n", oscar_version());
    TL_RUN(test_code_layout);
    TL_RUN(test_stream_contents);
    TL_RUN(test_handmade_streams);
    TL_RUN(test_export_import);
    TL_RUN(test_import_mismatch);
    TL_RUN(test_corrupt_streams);
    TL_RUN(test_fuzz);
    return tl_finish();
}
