/* Scalar numerics shared by every backend: float conversions, the fast
 * Walsh-Hadamard transform and the group quantisation parameters of
 * docs/FORMAT.md. Kept plain so that the CUDA backend can mirror it exactly. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu_features.h"
/* 8-wide half conversions with F16C, chosen at run time so that a portable
 * build uses them too. The hardware rounds to nearest even like
 * oscar_f32_to_f16 and converts halves exactly, so the bits do not depend on
 * the path. */
#define OSCAR_X86_F16C 1
static int have_f16c(void) {
    static int known = -1; /* a race writes the same value */
    if (known < 0) known = oscar_x86_has_avx_f16c();
    return known;
}

__attribute__((target("avx,f16c"))) static int64_t f16_to_f32_f16c(const uint16_t *s, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    return i;
}

__attribute__((target("avx,f16c"))) static int64_t f32_to_f16_f16c(const float *src, uint16_t *d, int64_t n) {
    /* Clamping first gives the saturating conversion of FORMAT.md. NaN
     * passes through min/max as their second operand and stays NaN. */
    const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    return i;
}
#endif

uint16_t oscar_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN stays NaN */
    /* 65504 is the largest half; anything at or above it saturates, so a
     * parameter can never become Inf (FORMAT.md). */
    if (ax >= 0x477fe000u) return (uint16_t)(sign | 0x7bffu);
    if (ax < 0x38800000u) {
        /* Below 2^-14 the half is subnormal: its value is m * 2^-24, and
         * scaling by 2^24 is exact, so rintf gives round-half-even. */
        float af;
        memcpy(&af, &ax, 4);
        uint32_t m = (uint32_t)rintf(af * 16777216.0f);
        return (uint16_t)(sign | m);
    }
    uint32_t h = ((((ax >> 23) - 127u + 15u)) << 10) | ((ax & 0x7fffffu) >> 13);
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

float oscar_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    if (e == 31)
        bits = sign | 0x7f800000u | (m << 13);
    else
        bits = sign | ((e + 112u) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t oscar_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

float oscar_bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

int oscar_dtype_size(oscar_dtype dtype) { return dtype == OSCAR_DTYPE_F32 ? 4 : 2; }

void oscar_to_f32(const void *src, oscar_dtype dtype, float *dst, int64_t n) {
    if (dtype == OSCAR_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == OSCAR_DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) {
            uint32_t x = (uint32_t)s[i] << 16;
            memcpy(&dst[i], &x, 4);
        }
    } else {
        const uint16_t *s = (const uint16_t *)src;
        int64_t i = 0;
#ifdef OSCAR_X86_F16C
        if (have_f16c()) i = f16_to_f32_f16c(s, dst, n);
#endif
        for (; i < n; i++) dst[i] = oscar_f16_to_f32(s[i]);
    }
}

void oscar_from_f32(const float *src, void *dst, oscar_dtype dtype, int64_t n) {
    if (dtype == OSCAR_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == OSCAR_DTYPE_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = oscar_f32_to_bf16(src[i]);
    } else {
        uint16_t *d = (uint16_t *)dst;
        int64_t i = 0;
#ifdef OSCAR_X86_F16C
        if (have_f16c()) i = f32_to_f16_f16c(src, d, n);
#endif
        for (; i < n; i++) d[i] = oscar_f32_to_f16(src[i]);
    }
}

/* (internal.h: the order is part of the format's definition of the norm,
 * so that a GPU warp computes it with five shuffles and the CPU gets the
 * same bits) */
float oscar_head_sumsq(const float *x, int d) {
    float lane[32];
    const int e = d / 32;
    for (int l = 0; l < 32; l++) {
        float s = 0.0f;
        for (int i = 0; i < e; i++) s += x[l * e + i] * x[l * e + i];
        lane[l] = s;
    }
    for (int m = 16; m >= 1; m >>= 1) {
        float next[32];
        for (int l = 0; l < 32; l++) next[l] = lane[l] + lane[l ^ m];
        memcpy(lane, next, sizeof lane);
    }
    return lane[0];
}

float oscar_sum_heads(const float *head_sums, int n_heads) {
    float s = 0.0f;
    for (int h = 0; h < n_heads; h++) s += head_sums[h];
    return s;
}

void oscar_fwht(float *x, int n) {
    for (int h = 1; h < n; h <<= 1) {
        for (int i = 0; i < n; i += 2 * h) {
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
    }
    /* The normalisation is one fp32 constant, so every backend that runs the
     * same butterflies gets the same bits. */
    float norm = (float)(1.0 / sqrt((double)n));
    for (int i = 0; i < n; i++) x[i] *= norm;
}

void oscar_group_params(const float *x, int n, int stride, int levels, uint16_t *scale16,
                        uint16_t *lo16) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(int64_t)i * stride];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    *scale16 = oscar_f32_to_f16((hi - lo) / (float)levels);
    *lo16 = oscar_f32_to_f16(lo);
}

/* clip_search: fractions of the range cut from the bottom and from the top
 * (docs/FORMAT.md step 6); (0, 0) first, so an unclipped range wins ties. */
static const float CLIP_GRID[6] = {0.0f, 0.05f, 0.1f, 0.15f, 0.2f, 0.3f};

void oscar_group_params_clip(const float *x, int n, int stride, int levels, uint16_t *scale16, uint16_t *lo16) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(int64_t)i * stride];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    const float range = hi - lo;
    double best = INFINITY;
    uint16_t bs = 0, bl = 0;
    for (int a = 0; a < 6; a++)
        for (int b = 0; b < 6; b++) {
            const float l = lo + CLIP_GRID[a] * range, h = hi - CLIP_GRID[b] * range;
            if (!(h >= l)) continue;
            const uint16_t s16 = oscar_f32_to_f16((h - l) / (float)levels), l16 = oscar_f32_to_f16(l);
            const float sc = oscar_f16_to_f32(s16), l0 = oscar_f16_to_f32(l16);
            double err = 0.0;
            for (int i = 0; i < n; i++) {
                const float v = x[(int64_t)i * stride];
                const float r = l0 + (float)oscar_quant_code(v, sc, l0, levels) * sc; /* as dequantised */
                err += ((double)v - (double)r) * ((double)v - (double)r);
            }
            if (err < best) {
                best = err;
                bs = s16;
                bl = l16;
            }
        }
    if (!(best < INFINITY)) { /* non-finite input: as without clipping */
        oscar_group_params(x, n, stride, levels, scale16, lo16);
        return;
    }
    *scale16 = bs;
    *lo16 = bl;
}

/* ---- public helpers ---------------------------------------------------- */

static int is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

oscar_status oscar_hadamard(float *x, int64_t rows, int n) {
    if (!x || rows < 0 || !is_pow2(n) || n > 65536) return OSCAR_E_INVALID_ARGUMENT;
    for (int64_t r = 0; r < rows; r++) oscar_fwht(x + r * n, n);
    return OSCAR_OK;
}

oscar_status oscar_fold_hadamard_wv(float *w_v, int num_kv_heads, int head_dim, int64_t in_features) {
    if (!w_v || num_kv_heads <= 0 || !is_pow2(head_dim) || head_dim > 65536 || in_features <= 0)
        return OSCAR_E_INVALID_ARGUMENT;
    /* W_v_h <- H W_v_h transforms each column of the head's [d, in] slice. */
    float *col = (float *)OSCAR_MALLOC((size_t)head_dim * sizeof(float));
    if (!col) return OSCAR_E_OUT_OF_MEMORY;
    for (int h = 0; h < num_kv_heads; h++) {
        float *slice = w_v + (int64_t)h * head_dim * in_features;
        for (int64_t j = 0; j < in_features; j++) {
            for (int i = 0; i < head_dim; i++) col[i] = slice[(int64_t)i * in_features + j];
            oscar_fwht(col, head_dim);
            for (int i = 0; i < head_dim; i++) slice[(int64_t)i * in_features + j] = col[i];
        }
    }
    free(col);
    return OSCAR_OK;
}

oscar_status oscar_fold_hadamard_wo(float *w_o, int64_t out_features, int num_q_heads, int head_dim) {
    if (!w_o || out_features <= 0 || num_q_heads <= 0 || !is_pow2(head_dim) || head_dim > 65536)
        return OSCAR_E_INVALID_ARGUMENT;
    /* W_o blockdiag(H): each row's head segment r_h becomes r_h H = (H r_h)^T
     * because H is symmetric. */
    for (int64_t r = 0; r < out_features; r++)
        for (int h = 0; h < num_q_heads; h++)
            oscar_fwht(w_o + (r * num_q_heads + h) * head_dim, head_dim);
    return OSCAR_OK;
}
