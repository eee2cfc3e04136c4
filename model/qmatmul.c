/*
 * qmatmul.c - GGUF-weight matrix products: the scalar reference kernels, the
 * run-time choice of x86 kernels (qmatmul_x86.inc, compiled once per level
 * with __attribute__((target))), and the dispatch. See qmatmul.h.
 */
#define _POSIX_C_SOURCE 200809L
#include "qmatmul.h"
#include "gguf.h"
#include "cpu_features.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline float ld_f16(const uint8_t *p) { return gguf_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

static inline float ld_bf16(const uint8_t *p) {
    uint32_t b = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

int qm_wants_int_acts(uint32_t type) {
    return type == GGML_T_Q4_0 || type == GGML_T_Q4_1 || type == GGML_T_Q8_0 || type == GGML_T_Q6_K ||
           type == GGML_T_Q5_0 || type == GGML_T_Q4_K;
}

/* Gemma 3's Q5_0 and Q4_K have x86 kernels for 16-bit activation codes (the
 * runner's default) only: against int8 codes every level runs the scalar one. */
static int scalar_only(uint32_t type, qm_act act) {
    return act == QM_ACT_Q8 && (type == GGML_T_Q5_0 || type == GGML_T_Q4_K);
}

int qm_type_supported(uint32_t type) {
    return qm_wants_int_acts(type) || type == GGML_T_F32 || type == GGML_T_F16 || type == GGML_T_BF16;
}

/* ---- activations to int8 ----------------------------------------------- */

/* Blocks whose largest magnitude is below this are stored as zeros: their
 * 127/amax would overflow to infinity (and 0 * inf is NaN), and values this
 * small do not move a float sum of weights of ordinary size. */
#define QM_TINY 1e-30f

/* The scale of one block from its largest magnitude. Every level calls this
 * same function, and multiplies and rounds (to nearest even) the same way,
 * so the quantised blocks are identical at all levels. */
static inline void block_scale(float amax, float *d, float *inv) {
    if (amax < QM_TINY) {
        *d = 0.0f;
        *inv = 0.0f;
    } else {
        *d = amax / 127.0f;
        *inv = 127.0f / amax;
    }
}

static inline void block_scale16(float amax, float *d, float *inv) {
    if (amax < QM_TINY) {
        *d = 0.0f;
        *inv = 0.0f;
    } else {
        *d = amax / 32767.0f;
        *inv = 32767.0f / amax;
    }
}

static void quantize_scalar(const float *x, act_q8 *out, int64_t n) {
    for (int64_t b = 0; b < n / QM_BLOCK; b++, x += QM_BLOCK) {
        float amax = 0.0f;
        for (int i = 0; i < QM_BLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d, inv;
        block_scale(amax, &d, &inv);
        int sum = 0;
        for (int i = 0; i < QM_BLOCK; i++) {
            float v = nearbyintf(x[i] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            out[b].q[i] = (int8_t)v;
            sum += out[b].q[i];
        }
        out[b].d = d;
        out[b].sum = d * (float)sum;
    }
}

/* A Q6_K super-block (256 weights, 210 bytes) as int8 values in element order
 * (-32..31); element e has the int8 scale sc[e / 16]. */
static void unpack_q6_k(const uint8_t *blk, int8_t *q) {
    const uint8_t *ql = blk, *qh = blk + 128;
    for (int half = 0; half < 2; half++, ql += 64, qh += 32, q += 128)
        for (int l = 0; l < 32; l++) {
            q[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
            q[l + 32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
}

static void quantize16_scalar(const float *x, act_q16 *out, int64_t n) {
    for (int64_t b = 0; b < n / QM_BLOCK; b++, x += QM_BLOCK) {
        float amax = 0.0f;
        for (int i = 0; i < QM_BLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d, inv;
        block_scale16(amax, &d, &inv);
        int32_t sum = 0;
        for (int i = 0; i < QM_BLOCK; i++) {
            float v = nearbyintf(x[i] * inv);
            v = v > 32767.0f ? 32767.0f : (v < -32767.0f ? -32767.0f : v);
            out[b].q[i] = (int16_t)v;
            sum += out[b].q[i];
        }
        out[b].d = d;
        out[b].sum = d * (float)sum;
    }
}

/* ---- scalar reference kernels ------------------------------------------- */

/* One weight row against one token; the kernels of every level compute the
 * same per-block formulas, only the order of the float additions differs.
 * Each exists for both activation formats (ACT: act_q8 or act_q16). */
#define DEFINE_DOTS(ACT)                                                                                               \
    static float dot_q4_0_##ACT(const uint8_t *w, const ACT *x, int64_t nb) {                                         \
        float acc = 0.0f;                                                                                              \
        for (int64_t b = 0; b < nb; b++, w += 18) {                                                                    \
            int32_t s = 0;                                                                                             \
            for (int j = 0; j < 16; j++) s += (w[2 + j] & 15) * x[b].q[j] + (w[2 + j] >> 4) * x[b].q[j + 16];        \
            /* the weight is d * (nibble - 8): the -8 meets the block's sum */                                         \
            acc += ld_f16(w) * ((float)s * x[b].d - 8.0f * x[b].sum);                                                  \
        }                                                                                                              \
        return acc;                                                                                                    \
    }                                                                                                                  \
    static float dot_q4_1_##ACT(const uint8_t *w, const ACT *x, int64_t nb) {                                         \
        float acc = 0.0f;                                                                                              \
        for (int64_t b = 0; b < nb; b++, w += 20) {                                                                    \
            int32_t s = 0;                                                                                             \
            for (int j = 0; j < 16; j++) s += (w[4 + j] & 15) * x[b].q[j] + (w[4 + j] >> 4) * x[b].q[j + 16];        \
            acc += ld_f16(w) * x[b].d * (float)s + ld_f16(w + 2) * x[b].sum; /* weight = d * nibble + m */             \
        }                                                                                                              \
        return acc;                                                                                                    \
    }                                                                                                                  \
    static float dot_q8_0_##ACT(const uint8_t *w, const ACT *x, int64_t nb) {                                         \
        float acc = 0.0f;                                                                                              \
        for (int64_t b = 0; b < nb; b++, w += 34) {                                                                    \
            int32_t s = 0;                                                                                             \
            for (int j = 0; j < 32; j++) s += (int8_t)w[2 + j] * x[b].q[j];                                            \
            acc += ld_f16(w) * x[b].d * (float)s;                                                                      \
        }                                                                                                              \
        return acc;                                                                                                    \
    }                                                                                                                  \
    static float dot_q6_k_##ACT(const uint8_t *w, const ACT *x, int64_t nb) {                                         \
        float acc = 0.0f;                                                                                              \
        int8_t q[256];                                                                                                 \
        for (int64_t sb = 0; sb < nb / 8; sb++, w += 210, x += 8) {                                                    \
            unpack_q6_k(w, q);                                                                                         \
            const int8_t *sc = (const int8_t *)(w + 192);                                                              \
            const float d = ld_f16(w + 208);                                                                           \
            for (int a = 0; a < 8; a++) { /* one activation block: two scale groups of 16 */                           \
                int32_t s0 = 0, s1 = 0;                                                                                \
                for (int j = 0; j < 16; j++) {                                                                         \
                    s0 += q[32 * a + j] * x[a].q[j];                                                                   \
                    s1 += q[32 * a + 16 + j] * x[a].q[16 + j];                                                         \
                }                                                                                                      \
                /* int64: with 16-bit codes the two scaled sums may pass 2^31 */                      \
                acc += d * x[a].d * (float)((int64_t)sc[2 * a] * s0 + (int64_t)sc[2 * a + 1] * s1);           \
            }                                                                                                          \
        }                                                                                                              \
        return acc;                                                                                                    \
    }                                                                                                                  \
    static float dot_q5_0_##ACT(const uint8_t *w, const ACT *x, int64_t nb) {                                         \
        float acc = 0.0f;                                                                                              \
        for (int64_t b = 0; b < nb; b++, w += 22) {                                                                    \
            const uint32_t qh = (uint32_t)w[2] | (uint32_t)w[3] << 8 | (uint32_t)w[4] << 16 | (uint32_t)w[5] << 24;   \
            int32_t s = 0;                                                                                             \
            for (int j = 0; j < 16; j++)                                                                               \
                s += (int)((w[6 + j] & 15) | ((qh >> j) & 1) << 4) * x[b].q[j] +                                       \
                     (int)((w[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) * x[b].q[j + 16];                            \
            /* the weight is d * (code - 16): the -16 meets the block's sum */                                         \
            acc += ld_f16(w) * ((float)s * x[b].d - 16.0f * x[b].sum);                                                 \
        }                                                                                                              \
        return acc;                                                                                                    \
    }                                                                                                                  \
    static float dot_q4_k_##ACT(const uint8_t *w, const ACT *x, int64_t nb) {                                         \
        float acc = 0.0f;                                                                                              \
        for (int64_t sb = 0; sb < nb / 8; sb++, w += 144, x += 8) {                                                    \
            const float d = ld_f16(w), dmin = ld_f16(w + 2);                                                           \
            const uint8_t *q = w + 16;                                                                                 \
            for (int a = 0; a < 8; a += 2, q += 32) { /* two activation blocks share 32 bytes of nibbles */            \
                int sc0, m0, sc1, m1;                                                                                  \
                ggml_q4_k_scale_min(w + 4, a, &sc0, &m0);                                                              \
                ggml_q4_k_scale_min(w + 4, a + 1, &sc1, &m1);                                                          \
                int32_t s0 = 0, s1 = 0;                                                                                \
                for (int l = 0; l < 32; l++) {                                                                         \
                    s0 += (q[l] & 15) * x[a].q[l];                                                                     \
                    s1 += (q[l] >> 4) * x[a + 1].q[l];                                                                 \
                }                                                                                                      \
                /* the weight is d * sc * code - dmin * m: the min meets the block's sum */                            \
                acc += d * ((float)sc0 * x[a].d * (float)s0 + (float)sc1 * x[a + 1].d * (float)s1) -                   \
                       dmin * ((float)m0 * x[a].sum + (float)m1 * x[a + 1].sum);                                       \
            }                                                                                                          \
        }                                                                                                              \
        return acc;                                                                                                    \
    }

DEFINE_DOTS(act_q8)
DEFINE_DOTS(act_q16)

static float dot_float(uint32_t type, const uint8_t *w, const float *x, int64_t n) {
    float acc = 0.0f;
    for (int64_t c = 0; c < n; c++) {
        float wv;
        if (type == GGML_T_F32)
            memcpy(&wv, w + 4 * c, 4);
        else if (type == GGML_T_F16)
            wv = ld_f16(w + 2 * c);
        else
            wv = ld_bf16(w + 2 * c);
        acc += wv * x[c];
    }
    return acc;
}

static void gemm_scalar(uint32_t type, qm_act act, const uint8_t *w, size_t row_bytes, int64_t cols, int64_t nrows,
                        const void *x, int T, float *y, int64_t ldy) {
    const int64_t nb = cols / QM_BLOCK;
    for (int64_t i = 0; i < nrows; i++) {
        const uint8_t *wr = w + (size_t)i * row_bytes;
        for (int t = 0; t < T; t++) {
            const act_q8 *x8 = (const act_q8 *)x + (size_t)t * nb;
            const act_q16 *x16 = (const act_q16 *)x + (size_t)t * nb;
            const int a16 = act == QM_ACT_Q16;
            float v;
            switch (type) {
            case GGML_T_Q4_0: v = a16 ? dot_q4_0_act_q16(wr, x16, nb) : dot_q4_0_act_q8(wr, x8, nb); break;
            case GGML_T_Q4_1: v = a16 ? dot_q4_1_act_q16(wr, x16, nb) : dot_q4_1_act_q8(wr, x8, nb); break;
            case GGML_T_Q8_0: v = a16 ? dot_q8_0_act_q16(wr, x16, nb) : dot_q8_0_act_q8(wr, x8, nb); break;
            case GGML_T_Q6_K: v = a16 ? dot_q6_k_act_q16(wr, x16, nb) : dot_q6_k_act_q8(wr, x8, nb); break;
            case GGML_T_Q5_0: v = a16 ? dot_q5_0_act_q16(wr, x16, nb) : dot_q5_0_act_q8(wr, x8, nb); break;
            case GGML_T_Q4_K: v = a16 ? dot_q4_k_act_q16(wr, x16, nb) : dot_q4_k_act_q8(wr, x8, nb); break;
            default: v = dot_float(type, wr, (const float *)x + (size_t)t * cols, cols); break;
            }
            y[(size_t)t * ldy + i] = v;
        }
    }
}

/* ---- x86 kernels, one copy per level ------------------------------------ */

typedef void (*gemm_fn)(uint32_t type, qm_act act, const uint8_t *w, size_t row_bytes, int64_t cols, int64_t nrows,
                        const void *x, int T, float *y, int64_t ldy);
typedef void (*quant_fn)(const float *x, act_q8 *out, int64_t n);
typedef void (*quant16_fn)(const float *x, act_q16 *out, int64_t n);

#if defined(__x86_64__) && defined(__GNUC__)
#define QM_HAVE_X86 1
#include <immintrin.h>

#define QMX(name) name##_avx2
#define QMX_TARGET "avx2,fma,f16c"
#define QMX_VNNI 0
#include "qmatmul_x86.inc"
#undef QMX
#undef QMX_TARGET
#undef QMX_VNNI

#define QMX(name) name##_avx512
#define QMX_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define QMX_VNNI 1
#include "qmatmul_x86.inc"
#undef QMX
#undef QMX_TARGET
#undef QMX_VNNI
#endif

/* ---- dispatch ------------------------------------------------------------- */

/* cpuid and xgetbv trap to the hypervisor in a virtual machine (tens of
 * microseconds each), and qm_gemm asks once per product, hundreds of times
 * per token: the answer is read once per level and kept. */
static int level_probe(qm_level level) {
    switch (level) {
    case QM_SCALAR: return 1;
#ifdef QM_HAVE_X86
    case QM_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && oscar_x86_has_avx_f16c();
    case QM_AVX512:
        return level_probe(QM_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    default: return 0;
    }
}

int qm_level_available(qm_level level) {
    static int known[QM_LEVELS] = {-1, -1, -1}; /* a race writes the same value */
    if (level < 0 || level >= QM_LEVELS) return 0;
    int v = __atomic_load_n(&known[level], __ATOMIC_RELAXED);
    if (v < 0) {
        v = level_probe(level);
        __atomic_store_n(&known[level], v, __ATOMIC_RELAXED);
    }
    return v;
}

const char *qm_level_name(qm_level level) {
    static const char *names[] = {"scalar", "avx2", "avx512-vnni"};
    return level >= 0 && level < QM_LEVELS ? names[level] : "?";
}

/* AVX-512 VNNI is opt-in (OSCAR_CPU=avx512) until it has run on such a CPU:
 * the development machine (Zen 3) has none, so test_qmatmul checks that
 * level only where it finds one. The kernels differ from AVX2 only in
 * vpdpbusd / vpdpwssd taking the place of vpmaddubsw+vpmaddwd / vpmaddwd+add. */
qm_level qm_best_level(void) {
    qm_level cap = QM_AVX2;
    const char *env = getenv("OSCAR_CPU");
    if (env && *env) {
        if (!strcmp(env, "scalar")) cap = QM_SCALAR;
        else if (!strcmp(env, "avx2")) cap = QM_AVX2;
        else if (!strcmp(env, "avx512")) cap = QM_AVX512;
    }
    for (int l = cap; l > QM_SCALAR; l--)
        if (qm_level_available((qm_level)l)) return (qm_level)l;
    return QM_SCALAR;
}

/* -1: not chosen yet. A race between two first calls writes the same value. */
static int current_level = -1;

void qm_use_level(qm_level level) { current_level = qm_level_available(level) ? (int)level : (int)QM_SCALAR; }

qm_level qm_current_level(void) {
    if (current_level < 0) current_level = (int)qm_best_level();
    return (qm_level)current_level;
}

static gemm_fn gemm_for(qm_level level) {
#ifdef QM_HAVE_X86
    if (level == QM_AVX512 && qm_level_available(QM_AVX512)) return gemm_avx512;
    if (level >= QM_AVX2 && qm_level_available(QM_AVX2)) return gemm_avx2;
#endif
    (void)level;
    return gemm_scalar;
}

static quant_fn quant_for(qm_level level) {
#ifdef QM_HAVE_X86
    if (level == QM_AVX512 && qm_level_available(QM_AVX512)) return quantize_avx512;
    if (level >= QM_AVX2 && qm_level_available(QM_AVX2)) return quantize_avx2;
#endif
    (void)level;
    return quantize_scalar;
}

static quant16_fn quant16_for(qm_level level) {
#ifdef QM_HAVE_X86
    if (level == QM_AVX512 && qm_level_available(QM_AVX512)) return quantize16_avx512;
    if (level >= QM_AVX2 && qm_level_available(QM_AVX2)) return quantize16_avx2;
#endif
    (void)level;
    return quantize16_scalar;
}

void qm_quantize_q16_level(qm_level level, const float *x, act_q16 *out, int64_t n) { quant16_for(level)(x, out, n); }

void qm_quantize_q16(const float *x, act_q16 *out, int64_t n) { quant16_for(qm_current_level())(x, out, n); }

size_t qm_act_row_bytes(qm_act act, int64_t n) {
    return (size_t)(n / QM_BLOCK) * (act == QM_ACT_Q16 ? sizeof(act_q16) : sizeof(act_q8));
}

void qm_quantize(qm_act act, const float *x, void *out, int64_t n) {
    if (act == QM_ACT_Q16)
        qm_quantize_q16(x, (act_q16 *)out, n);
    else
        qm_quantize_q8(x, (act_q8 *)out, n);
}

void qm_quantize_q8_level(qm_level level, const float *x, act_q8 *out, int64_t n) { quant_for(level)(x, out, n); }

void qm_quantize_q8(const float *x, act_q8 *out, int64_t n) { quant_for(qm_current_level())(x, out, n); }

void qm_gemm_level(qm_level level, uint32_t type, qm_act act, const void *w, size_t row_bytes, int64_t cols,
                   int64_t nrows, const void *x, int T, float *y, int64_t ldy) {
    gemm_for(scalar_only(type, act) ? QM_SCALAR : level)(type, act, (const uint8_t *)w, row_bytes, cols, nrows, x, T, y, ldy);
}

void qm_gemm(uint32_t type, qm_act act, const void *w, size_t row_bytes, int64_t cols, int64_t nrows, const void *x,
             int T, float *y, int64_t ldy) {
    gemm_for(scalar_only(type, act) ? QM_SCALAR : qm_current_level())(type, act, (const uint8_t *)w, row_bytes, cols, nrows, x,
                                                                 T, y, ldy);
}
