/*
 * test_qmatmul.c - the runner's matrix kernels (model/qmatmul.c) at every
 * level this CPU runs (scalar, AVX2, AVX-512 VNNI) against an independent
 * float64 reference: weights dequantised by the GGUF reader
 * (ggml_dequantize_row, itself checked against the gguf Python package by
 * check_logits.py), activations dequantised from their int8 blocks.
 *
 * Weights and activations are random and adversarial: all-equal blocks,
 * extreme codes and scales, zero blocks, activations that saturate int8 and
 * tiny ones. Outputs are poisoned with NaN before each call and guarded by
 * sentinels past the last row, so a kernel that skips or overruns fails.
 */
#include "gguf.h"
#include "qmatmul.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            failures++;                                                                                                \
            if (failures < 20) {                                                                                       \
                fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                                   \
                fprintf(stderr, __VA_ARGS__);                                                                          \
                fputc('\n', stderr);                                                                                   \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float urand(void) { return (float)(rnd() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; }

/* IEEE half from float, round to nearest (the test's own encoder). */
static uint16_t to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int e = (int)((x >> 23) & 0xFF) - 127 + 15;
    uint32_t m = x & 0x7FFFFF;
    if (e >= 31) return (uint16_t)(sign | 0x7BFF); /* clamp to the largest finite */
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        m |= 0x800000;
        uint32_t sh = (uint32_t)(14 - e);
        uint32_t h = m >> sh;
        if ((m >> (sh - 1)) & 1) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (m >> 13);
    if (m & 0x1000) h++;
    return (uint16_t)h;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }

typedef enum { W_RANDOM, W_EQUAL, W_EXTREME_LO, W_EXTREME_HI, W_ZERO_SCALE, W_BIG_SCALE, W_KINDS } wkind;

/* One row of `cols` weights in the ggml encoding. */
static void make_row(uint32_t type, uint8_t *p, int64_t cols, wkind kind) {
    float scale = kind == W_BIG_SCALE ? 60000.0f : kind == W_ZERO_SCALE ? 0.0f : 0.01f + 0.05f * fabsf(urand());
    int eq = (int)(rnd() & 15);
    switch (type) {
    case GGML_T_Q4_0:
    case GGML_T_Q4_1: {
        const int bb = type == GGML_T_Q4_0 ? 18 : 20, qo = type == GGML_T_Q4_0 ? 2 : 4;
        for (int64_t b = 0; b < cols / 32; b++, p += bb) {
            put16(p, to_f16(scale * (kind == W_RANDOM ? fabsf(urand()) + 0.1f : 1.0f)));
            if (type == GGML_T_Q4_1) put16(p + 2, to_f16(kind == W_BIG_SCALE ? -60000.0f : -8.0f * scale * urand()));
            for (int j = 0; j < 16; j++) {
                int lo = kind == W_EQUAL ? eq : kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 15 : (int)(rnd() & 15);
                int hi = kind == W_EQUAL ? eq : kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 15 : (int)(rnd() & 15);
                p[qo + j] = (uint8_t)(lo | hi << 4);
            }
        }
        break;
    }
    case GGML_T_Q8_0:
        for (int64_t b = 0; b < cols / 32; b++, p += 34) {
            put16(p, to_f16(scale));
            for (int j = 0; j < 32; j++) {
                int v = kind == W_EQUAL ? eq * 17 - 128 : kind == W_EXTREME_LO ? -128 : kind == W_EXTREME_HI ? 127
                                                                                                             : (int)(rnd() & 255) - 128;
                p[2 + j] = (uint8_t)(int8_t)v;
            }
        }
        break;
    case GGML_T_Q6_K:
        for (int64_t b = 0; b < cols / 256; b++, p += 210) {
            for (int j = 0; j < 128; j++)
                p[j] = kind == W_EQUAL ? (uint8_t)(eq * 17) : kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 255
                                                                                                             : (uint8_t)rnd();
            for (int j = 0; j < 64; j++)
                p[128 + j] = kind == W_EQUAL ? 0x55 : kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 255
                                                                                                       : (uint8_t)rnd();
            for (int j = 0; j < 16; j++)
                p[192 + j] = (uint8_t)(int8_t)(kind == W_EXTREME_LO ? -128 : kind == W_EXTREME_HI ? 127
                                                                                                   : (int)(rnd() & 255) - 128);
            put16(p + 208, to_f16(scale * 0.01f));
        }
        break;
    case GGML_T_Q5_0:
        for (int64_t b = 0; b < cols / 32; b++, p += 22) {
            put16(p, to_f16(scale * (kind == W_RANDOM ? fabsf(urand()) + 0.1f : 1.0f)));
            for (int j = 0; j < 20; j++)
                p[2 + j] = kind == W_EQUAL ? (uint8_t)(eq * 17) : kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 255
                                                                                                             : (uint8_t)rnd();
            if (kind == W_EQUAL) memset(p + 2, (eq & 1) ? 0xFF : 0, 4); /* equal codes: the 5th bit alike too */
        }
        break;
    case GGML_T_Q4_K:
        for (int64_t b = 0; b < cols / 256; b++, p += 144) {
            put16(p, to_f16(scale * 0.02f));
            put16(p + 2, to_f16(kind == W_BIG_SCALE ? 900.0f : scale * 0.01f * (urand() + 1.0f)));
            for (int j = 0; j < 12; j++)
                p[4 + j] = kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 255 : (uint8_t)rnd();
            for (int j = 0; j < 128; j++)
                p[16 + j] = kind == W_EQUAL ? (uint8_t)(eq * 17) : kind == W_EXTREME_LO ? 0 : kind == W_EXTREME_HI ? 255
                                                                                                              : (uint8_t)rnd();
        }
        break;
    case GGML_T_F16:
    case GGML_T_BF16:
    case GGML_T_F32:
        for (int64_t c = 0; c < cols; c++) {
            float v = kind == W_EQUAL ? 0.5f : kind == W_EXTREME_LO ? -scale : kind == W_EXTREME_HI ? scale : scale * urand();
            if (kind == W_BIG_SCALE) v = 60000.0f * urand();
            if (type == GGML_T_F32) {
                memcpy(p + 4 * c, &v, 4);
            } else if (type == GGML_T_F16) {
                put16(p + 2 * c, to_f16(v));
            } else {
                uint32_t u;
                memcpy(&u, &v, 4);
                put16(p + 2 * c, (uint16_t)(u >> 16));
            }
        }
        break;
    }
}

typedef enum { X_RANDOM, X_EQUAL, X_SATURATE, X_TINY, X_ZERO, X_ONE_HOT, X_KINDS } xkind;

static void make_acts(float *x, int64_t n, xkind kind) {
    for (int64_t i = 0; i < n; i++) {
        switch (kind) {
        case X_RANDOM: x[i] = 3.0f * urand(); break;
        case X_EQUAL: x[i] = -1.25f; break;
        case X_SATURATE: x[i] = (i & 1 ? 1.0f : -1.0f) * 1e4f * (0.9995f + 0.0005f * urand()); break; /* all codes +-127 */
        case X_TINY: x[i] = 1e-35f * urand(); break;
        case X_ZERO: x[i] = 0.0f; break;
        default: x[i] = (i % 37 == 0) ? 1e4f : 1e-3f * urand(); break; /* one large value per block */
        }
    }
}

/* ---- quantisation of activations ------------------------------------------ */

/* Independent statement of the rule: d = amax/Q, q = round-half-even(x * Q/amax), Q = 127 or 32767. */
static int round_even(float v, float Q) {
    float r = floorf(v);
    float frac = v - r;
    if (frac > 0.5f || (frac == 0.5f && fmodf(r, 2.0f) != 0.0f)) r += 1.0f;
    if (r > Q) r = Q;
    if (r < -Q) r = -Q;
    return (int)r;
}

static void quantize_reference16(const float *x, act_q16 *out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fabsf(x[32 * b + i]) > amax ? fabsf(x[32 * b + i]) : amax;
        int small = amax < 1e-30f;
        float d = small ? 0.0f : amax / 32767.0f, inv = small ? 0.0f : 32767.0f / amax;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            out[b].q[i] = (int16_t)round_even(x[32 * b + i] * inv, 32767.0f);
            sum += out[b].q[i];
        }
        out[b].d = d;
        out[b].sum = d * (float)sum;
    }
}

static void quantize_reference(const float *x, act_q8 *out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fabsf(x[32 * b + i]) > amax ? fabsf(x[32 * b + i]) : amax;
        int small = amax < 1e-30f;
        float d = small ? 0.0f : amax / 127.0f, inv = small ? 0.0f : 127.0f / amax;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            out[b].q[i] = (int8_t)round_even(x[32 * b + i] * inv, 127.0f);
            sum += out[b].q[i];
        }
        out[b].d = d;
        out[b].sum = d * (float)sum;
    }
}

static void test_quantize(void) {
    enum { N = 32 * 48 };
    static float x[N];
    static act_q8 ref[N / 32], got[N / 32];
    static act_q16 ref16[N / 32], got16[N / 32];
    for (int kind = 0; kind < X_KINDS; kind++) {
        make_acts(x, N, (xkind)kind);
        if (kind == X_RANDOM) x[5] = 0.5f * (127.0f / 127.0f); /* some exact halves appear below */
        quantize_reference(x, ref, N);
        quantize_reference16(x, ref16, N);
        for (int lv = 0; lv < QM_LEVELS; lv++) {
            if (!qm_level_available((qm_level)lv)) continue;
            memset(got, 0xA5, sizeof got);
            memset(got16, 0xA5, sizeof got16);
            qm_quantize_q8_level((qm_level)lv, x, got, N);
            qm_quantize_q16_level((qm_level)lv, x, got16, N);
            for (int b = 0; b < N / 32; b++) {
                CHECK(memcmp(got16[b].q, ref16[b].q, 64) == 0 && got16[b].d == ref16[b].d && got16[b].sum == ref16[b].sum,
                      "quantize16 %s kind %d block %d: differs", qm_level_name((qm_level)lv), kind, b);
                for (int i = 0; i < 32; i++)
                    /* x * inv is rounded in float first: up to ~0.002 d more at |q| ~ 32767 */
                    CHECK(fabs((double)got16[b].d * got16[b].q[i] - x[32 * b + i]) <=
                              got16[b].d * 0.51 + 1e-6 * fabs(x[32 * b + i]) + 1e-30,
                          "quantize16 %s kind %d: error > d/2", qm_level_name((qm_level)lv), kind);
                CHECK(memcmp(got[b].q, ref[b].q, 32) == 0, "quantize %s kind %d block %d: codes differ",
                      qm_level_name((qm_level)lv), kind, b);
                CHECK(got[b].d == ref[b].d && got[b].sum == ref[b].sum, "quantize %s kind %d block %d: d %g/%g sum %g/%g",
                      qm_level_name((qm_level)lv), kind, b, got[b].d, ref[b].d, got[b].sum, ref[b].sum);
                for (int i = 0; i < 32; i++) {
                    float err = fabsf(got[b].d * got[b].q[i] - x[32 * b + i]);
                    CHECK(err <= got[b].d * 0.5001f + 1e-30f, "quantize %s kind %d: error %g > d/2 (d %g)",
                          qm_level_name((qm_level)lv), kind, err, got[b].d);
                }
            }
        }
    }
    /* ties: x * 127/amax lands on k + 0.5 with amax = 127 */
    for (int i = 0; i < 32; i++) x[i] = (i == 0) ? 127.0f : (float)(i % 9) - 4.5f;
    quantize_reference(x, ref, 32);
    for (int lv = 0; lv < QM_LEVELS; lv++) {
        if (!qm_level_available((qm_level)lv)) continue;
        qm_quantize_q8_level((qm_level)lv, x, got, 32);
        CHECK(memcmp(got[0].q, ref[0].q, 32) == 0, "quantize %s: ties not rounded to even", qm_level_name((qm_level)lv));
    }
    CHECK(ref[0].q[1] == -4 && ref[0].q[2] == -2, "reference: ties to even (got %d %d)", ref[0].q[1], ref[0].q[2]);
}

/* The offset a Q4 block's kernel adds and subtracts (8d for Q4_0, m for Q4_1):
 * the float rounding of a product is relative to these terms too. */
static double offset_mag(uint32_t type, const uint8_t *row, int64_t c) {
    if (type == GGML_T_Q5_0) {
        const uint8_t *blk = row + (c / 32) * 22;
        return 16.0 * fabs(gguf_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8)));
    }
    if (type == GGML_T_Q4_K) { /* dmin * m: the largest the 6-bit min can be */
        const uint8_t *blk = row + (c / 256) * 144;
        return 63.0 * fabs(gguf_f16_to_f32((uint16_t)(blk[2] | blk[3] << 8)));
    }
    if (type != GGML_T_Q4_0 && type != GGML_T_Q4_1) return 0.0;
    const uint8_t *blk = row + (c / 32) * (type == GGML_T_Q4_0 ? 18 : 20);
    const float d = gguf_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
    if (type == GGML_T_Q4_0) return 8.0 * fabs(d);
    return fabs(gguf_f16_to_f32((uint16_t)(blk[2] | blk[3] << 8)));
}

/* ---- the GGUF reader's dequantisation of Q5_0 and Q4_K ------------------------ */

/* Element e of a block, read bit by bit from ggml's layout description
 * (ggml-quants.c): an independent statement of what ggml_dequantize_row does. */
static double ref_q5_0(const uint8_t *blk, int e) {
    const double d = gguf_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
    const int nib = e < 16 ? blk[6 + e] & 15 : blk[6 + e - 16] >> 4;
    const int hi = (blk[2 + e / 8] >> (e % 8)) & 1; /* bit e of the little-endian qh */
    return d * (nib + 16 * hi - 16);
}

static double ref_q4_k(const uint8_t *blk, int e) {
    const double d = gguf_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
    const double dmin = gguf_f16_to_f32((uint16_t)(blk[2] | blk[3] << 8));
    const uint8_t *sc = blk + 4;
    const int j = e / 32; /* sub-block: 8 of 32, each with a 6-bit scale and min */
    int s, m;
    if (j < 4) {
        s = sc[j] & 0x3F;
        m = sc[j + 4] & 0x3F;
    } else { /* low 4 bits in bytes 8..11, high 2 bits in the top of bytes 0..7 */
        s = (sc[8 + j - 4] & 0x0F) | (sc[j - 4] >> 6) << 4;
        m = (sc[8 + j - 4] >> 4) | (sc[j] >> 6) << 4;
    }
    /* the 64 elements of sub-blocks 2k, 2k+1 are the low, then high nibbles of bytes 32k..32k+31 */
    const uint8_t byte = blk[16 + 32 * (j / 2) + e % 32];
    const int q = (j & 1) ? byte >> 4 : byte & 15;
    return d * s * q - dmin * m;
}

static void test_dequant(uint32_t type, int64_t cols) {
    uint64_t be, bb;
    ggml_type_block(type, &be, &bb);
    const size_t row_bytes = (size_t)(cols / (int64_t)be * bb);
    uint8_t *w = malloc(row_bytes);
    float *wf = malloc(sizeof(float) * cols);
    for (int wk = 0; wk < W_KINDS; wk++)
        for (int rep = 0; rep < 20; rep++) {
            make_row(type, w, cols, (wkind)wk);
            ggml_dequantize_row(type, w, wf, cols);
            for (int64_t c = 0; c < cols; c++) {
                const uint8_t *blk = w + (size_t)(c / (int64_t)be) * bb;
                const double ref = type == GGML_T_Q5_0 ? ref_q5_0(blk, (int)(c % 32)) : ref_q4_k(blk, (int)(c % 256));
                CHECK(fabs(wf[c] - ref) <= 1e-6 * fabs(ref) + 1e-3 * (type == GGML_T_Q4_K ? offset_mag(type, w, c) : 0) + 1e-30,
                      "dequant %s kind %d element %lld: %.9g vs %.9g", ggml_type_name(type), wk, (long long)c, wf[c], ref);
            }
        }
    free(w), free(wf);
}

/* ---- products ---------------------------------------------------------------- */

static void test_type(uint32_t type, int64_t cols, qm_act act) {
    enum { ROWS = 7, TMAX = 9, LDY = ROWS + 3 };
    uint64_t be, bb;
    ggml_type_block(type, &be, &bb);
    const size_t row_bytes = (size_t)(cols / (int64_t)be * bb);
    uint8_t *w = malloc(row_bytes * ROWS);
    float *wf = malloc(sizeof(float) * cols * ROWS);
    float *x = malloc(sizeof(float) * cols * TMAX);
    float *xd = malloc(sizeof(float) * cols * TMAX); /* what the kernel multiplies: dequantised acts */
    act_q8 *xq = malloc(sizeof(act_q8) * (cols / 32) * TMAX);
    act_q16 *xh = malloc(sizeof(act_q16) * (cols / 32) * TMAX);
    float *y = malloc(sizeof(float) * LDY * TMAX), *y0 = malloc(sizeof(float) * LDY * TMAX);
    const int q8 = qm_wants_int_acts(type);
    for (int wk = 0; wk < W_KINDS; wk++)
        for (int xk = 0; xk < X_KINDS; xk++) {
            if (wk == W_BIG_SCALE && xk == X_SATURATE) continue; /* the true products overflow float */
            for (int r = 0; r < ROWS; r++) {
                make_row(type, w + r * row_bytes, cols, (wkind)((wk + (r == ROWS - 1)) % W_KINDS));
                ggml_dequantize_row(type, w + r * row_bytes, wf + r * cols, cols);
            }
            make_acts(x, cols * TMAX, (xkind)xk);
            if (q8 && act == QM_ACT_Q8) {
                quantize_reference(x, xq, cols * TMAX);
                for (int64_t b = 0; b < cols / 32 * TMAX; b++)
                    for (int i = 0; i < 32; i++) xd[b * 32 + i] = xq[b].d * xq[b].q[i];
            } else if (q8) {
                quantize_reference16(x, xh, cols * TMAX);
                for (int64_t b = 0; b < cols / 32 * TMAX; b++)
                    for (int i = 0; i < 32; i++) xd[b * 32 + i] = xh[b].d * xh[b].q[i];
            } else {
                memcpy(xd, x, sizeof(float) * cols * TMAX);
            }
            for (int T = 1; T <= TMAX; T++) {
                for (int lv = 0; lv < QM_LEVELS; lv++) {
                    if (!qm_level_available((qm_level)lv)) continue;
                    for (int i = 0; i < LDY * TMAX; i++) y[i] = NAN;
                    const void *xin = !q8 ? (const void *)x : act == QM_ACT_Q8 ? (const void *)xq : (const void *)xh;
                    qm_gemm_level((qm_level)lv, type, act, w, row_bytes, cols, ROWS, xin, T, y, LDY);
                    for (int t = 0; t < T; t++) {
                        for (int r = 0; r < ROWS; r++) {
                            double ref = 0, mag = 0;
                            for (int64_t c = 0; c < cols; c++) {
                                ref += (double)wf[r * cols + c] * xd[t * cols + c];
                                mag += (fabs((double)wf[r * cols + c]) + 2 * offset_mag(type, w + r * row_bytes, c)) *
                                       fabs((double)xd[t * cols + c]);
                            }
                            const double got = y[t * LDY + r];
                            CHECK(isfinite(got) && fabs(got - ref) <= 2e-5 * mag + 1e-30,
                                  "%s/%s %s w%d x%d T=%d t=%d r=%d: %.9g vs %.9g (mag %g)", ggml_type_name(type), act ? "q8" : "q16",
                                  qm_level_name((qm_level)lv), wk, xk, T, t, r, got, ref, mag);
                        }
                        for (int r = ROWS; r < LDY; r++)
                            CHECK(isnan(y[t * LDY + r]), "%s %s: wrote past the rows", ggml_type_name(type),
                                  qm_level_name((qm_level)lv));
                    }
                    for (int i = T * LDY; i < LDY * TMAX; i++)
                        CHECK(isnan(y[i]), "%s %s: wrote past the tokens", ggml_type_name(type), qm_level_name((qm_level)lv));
                    if (lv == QM_SCALAR) memcpy(y0, y, sizeof(float) * LDY * T);
                }
            }
        }
    free(w), free(wf), free(x), free(xd), free(xq), free(xh), free(y), free(y0);
}

int main(void) {
    for (int lv = 0; lv < QM_LEVELS; lv++)
        printf("level %-12s %s\n", qm_level_name((qm_level)lv), qm_level_available((qm_level)lv) ? "tested" : "not on this CPU");
    test_quantize();
    test_dequant(GGML_T_Q5_0, 256);
    test_dequant(GGML_T_Q4_K, 512);
    const uint32_t types[] = {GGML_T_Q4_0, GGML_T_Q4_1, GGML_T_Q5_0, GGML_T_Q8_0, GGML_T_Q4_K,
                              GGML_T_Q6_K, GGML_T_F16,  GGML_T_BF16, GGML_T_F32};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        const int super = types[i] == GGML_T_Q6_K || types[i] == GGML_T_Q4_K;
        for (int act = 0; act < 2; act++) test_type(types[i], super ? 512 : 576, (qm_act)act);
        if (types[i] == GGML_T_F32) test_type(types[i], 37, QM_ACT_Q16); /* a tail shorter than a vector */
    }
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
