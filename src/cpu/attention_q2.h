/* attention_q2.h - the CPU decode-attention kernels of 2-bit blocks: the
 * logits of a block's keys and the probability-weighted sum of its values,
 * read from the packed tiles of docs/FORMAT.md in place.
 *
 * Two copies: a portable scalar reference and an AVX2+FMA(+F16C) copy chosen
 * at run time (cpuid; OSCAR_CPU=scalar forces the reference). Both compute
 * in fp32 with the codes centred (code - 1.5, the group midpoint in place of
 * lo, as the rest of the CPU backend does); they differ by float rounding
 * only (the AVX2 copy fuses multiply-adds). tests/cpu/test_attention_q2.c
 * checks both against a float64 reference. */
#ifndef OSCAR_ATTENTION_Q2_H
#define OSCAR_ATTENTION_Q2_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { OSCAR_Q2_MAX_ROWS = 8 };

/* Logits of the R tokens of one head of a 2-bit block for nr (1..8) query
 * rows: out[r*ld + t] = sm * norm_t * sum_c q[r*d + c] * (lo + scale*code)
 * (norm_t = 1 when norms is NULL). codes: the head's K code tiles; params:
 * its [R/k_group][d] {fp16 scale, fp16 lo} pairs; q: [nr][d] fp32. */
void oscar_q2_logits(int d, int R, int k_group, const uint8_t *codes, const uint16_t *params, const float *norms,
                     int nr, const float *q, float sm, float *out, int64_t ld);

/* Adds the values of one head of a 2-bit block weighted by p[r*ld + t]:
 * acc[r*d + c] += sum_t p * scale_t,g * (code - 1.5) and
 * vbias[r*ng + g] += sum_t p * (lo_t,g + 1.5 * scale_t,g), ng = d / v_group,
 * so the value sum of channel c is acc[c] + vbias[c / v_group]. */
void oscar_q2_values(int d, int R, int v_group, const uint8_t *codes, const uint16_t *params, int nr, const float *p,
                     int64_t ld, float *acc, float *vbias);

/* The copies, for tests and benchmarks: level 0 = scalar, 1 = AVX2. */
int oscar_q2_level(void);          /* the copy the two functions above use */
int oscar_q2_level_supported(int); /* 1 if this CPU runs that copy        */
void oscar_q2_logits_at(int level, int d, int R, int k_group, const uint8_t *codes, const uint16_t *params,
                        const float *norms, int nr, const float *q, float sm, float *out, int64_t ld);
void oscar_q2_values_at(int level, int d, int R, int v_group, const uint8_t *codes, const uint16_t *params, int nr,
                        const float *p, int64_t ld, float *acc, float *vbias);

#ifdef __cplusplus
}
#endif
#endif
