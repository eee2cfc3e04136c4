/*
 * qmatmul.h - matrix products with GGUF-encoded weights, for the CPU runner.
 *
 * Quantised weights (Q4_0, Q4_1, Q8_0, Q6_K) meet activations quantised per
 * block of 32 to int8 (act_q8): every block product is an integer dot product
 * times two scales. 16-bit and fp32 weights (F16, BF16, F32) meet fp32
 * activations. Each kernel exists as a portable scalar reference and as x86
 * versions (AVX2; AVX-512 with VNNI) picked at run time from cpuid, so one
 * build runs on any x86-64 and the tests compare every level against the
 * scalar one.
 */
#ifndef OSCAR_MODEL_QMATMUL_H
#define OSCAR_MODEL_QMATMUL_H

#include <stddef.h>
#include <stdint.h>

enum { QM_BLOCK = 32 };

/* 32 activations as int8: x[i] ~= d * q[i]; sum = d * sum(q), used by the
 * weights' offset terms (Q4_1's min, Q4_0's -8). */
typedef struct act_q8 {
    float d, sum;
    int8_t q[QM_BLOCK];
} act_q8;

/* The same with 16-bit codes: x[i] ~= d * q[i], |q| <= 32767. The runner's
 * default: its products then differ from fp32 ones by ~1e-5 relative, where
 * int8 codes (~4e-3) flip greedy tokens of a small model like SmolLM2-135M
 * (tests/cli_model.sh asks "Paris"). vpmaddwd multiplies 16-bit pairs about
 * as fast as vpmaddubsw does 8-bit ones, after one more widening. */
typedef struct act_q16 {
    float d, sum;
    int16_t q[QM_BLOCK];
} act_q16;

/* Which activation blocks the quantised weights meet. */
typedef enum qm_act { QM_ACT_Q16 = 0, QM_ACT_Q8 = 1 } qm_act;

typedef enum qm_level { QM_SCALAR = 0, QM_AVX2 = 1, QM_AVX512 = 2, QM_LEVELS = 3 } qm_level;

/* The level to use: AVX2 where the CPU has it (AVX-512 VNNI only with
 * OSCAR_CPU=avx512, see qmatmul.c), else scalar; OSCAR_CPU=scalar|avx2 caps it. */
qm_level qm_best_level(void);
/* 1 if this CPU (and this build) can run the level. */
int qm_level_available(qm_level level);
const char *qm_level_name(qm_level level);
/* The level the qm_gemm calls below use (qm_best_level() by default). */
void qm_use_level(qm_level level);
qm_level qm_current_level(void);

/* 1 if weights of this ggml type take integer activation blocks (act_q8/act_q16), 0 if fp32. */
int qm_wants_int_acts(uint32_t type);
/* 1 if qm_gemm reads this ggml type. */
int qm_type_supported(uint32_t type);

/* x[n] (n a multiple of 32) to n/32 blocks: d = max|x| / 127, q = round(x/d). */
void qm_quantize_q8(const float *x, act_q8 *out, int64_t n);
void qm_quantize_q8_level(qm_level level, const float *x, act_q8 *out, int64_t n);
/* The same with 16-bit codes: d = max|x| / 32767. */
void qm_quantize_q16(const float *x, act_q16 *out, int64_t n);
void qm_quantize_q16_level(qm_level level, const float *x, act_q16 *out, int64_t n);
/* Bytes of the activation blocks of one row of n values. */
size_t qm_act_row_bytes(qm_act act, int64_t n);
/* Quantises one row in the format act. */
void qm_quantize(qm_act act, const float *x, void *out, int64_t n);

/*
 * y[t * ldy + i] = sum_c W[r0 + i, c] * x[t, c] for i < nrows, t < T.
 * W: rows of row_bytes bytes in the ggml encoding `type`, `cols` columns.
 * x: T rows of cols/32 act blocks of kind `act` (qm_wants_int_acts) or of cols floats.
 * Weight rows are reused across tokens in register tiles of up to four
 * tokens, so a prefill chunk reads each weight block from cache, not memory.
 */
void qm_gemm(uint32_t type, qm_act act, const void *w, size_t row_bytes, int64_t cols, int64_t nrows, const void *x,
             int T, float *y, int64_t ldy);
void qm_gemm_level(qm_level level, uint32_t type, qm_act act, const void *w, size_t row_bytes, int64_t cols,
                   int64_t nrows, const void *x, int T, float *y, int64_t ldy);

#endif
