/*
 * testlib.h - a tiny test framework and an independent float64 reference
 * of the oscar numerics (docs/FORMAT.md), shared by every tests/test_*.c.
 *
 * Nothing here calls the library's numerics: the Hadamard transform is the
 * O(d^2) product with the definition H[i][j] = (-1)^popcount(i&j)/sqrt(d),
 * the fp16/bf16 conversions are written from the IEEE definitions, and the
 * quantiser follows FORMAT.md steps 1-8 literally.
 */
#ifndef OSCAR_TESTLIB_H
#define OSCAR_TESTLIB_H

#include "oscar.h"
#include <stdio.h>
#include <string.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- framework ------------------------------------------------------- */

extern long tl_passed, tl_failed;

/* Records one check; prints file:line and the message on failure. */
int tl_check(int ok, const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

#define CHECK(cond) tl_check(!!(cond), __FILE__, __LINE__, "%s", #cond)
#define CHECKF(cond, ...) tl_check(!!(cond), __FILE__, __LINE__, __VA_ARGS__)
/* Status check; for an expected failure also requires a non-empty
 * oscar_last_error(cache) when cache is not NULL. */
#define CHECK_ST(cache, expr, want) tl_check_status((cache), (expr), (want), __FILE__, __LINE__, #expr)
int tl_check_status(const oscar_cache *cache, oscar_status got, oscar_status want,
                    const char *file, int line, const char *expr);
#define CHECK_OK(expr) CHECK_ST(NULL, (expr), OSCAR_OK)
/* A const call that must fail with `want` and leave the handle's error
 * message exactly as it was (const calls never write the handle). */
#define CHECK_CONST_ST(cache, expr, want)                                                              \
    do {                                                                                               \
        char before_[512];                                                                             \
        snprintf(before_, sizeof before_, "%s", oscar_last_error(cache));                              \
        CHECK_ST(NULL, (expr), (want));                                                                \
        CHECKF(strcmp(before_, oscar_last_error(cache)) == 0, "%s wrote the error message (\"%s\")",    \
               #expr, oscar_last_error(cache));                                                         \
    } while (0)

/* Runs one test function, printing its name and time. */
#define TL_RUN(fn) tl_run(#fn, fn)
void tl_run(const char *name, void (*fn)(void));
/* Prints "N passed, N failed"; returns the process exit code. */
int tl_finish(void);
/* Set while a test is running (for messages). */
extern const char *tl_current;

/* ---- random numbers -------------------------------------------------- */

typedef struct tl_rng {
    uint64_t s;
} tl_rng;

/* Seed derived from a name (and OSCAR_TEST_SEED if set); printed. */
tl_rng tl_rng_for(const char *name);
tl_rng tl_rng_seeded(uint64_t seed);
uint64_t tl_next(tl_rng *r);
double tl_uniform(tl_rng *r);               /* [0, 1) */
double tl_normal(tl_rng *r);                /* N(0, 1) */
int tl_randint(tl_rng *r, int lo, int hi);  /* [lo, hi] inclusive */
void tl_fill_normal(tl_rng *r, float *x, int64_t n, double sigma);

/* Test data [T][hkv][d] for keys and values, rounded to dtype `in`.
 * Flavours: */
enum {
    TL_FLAVOR_NORMAL = 0,   /* per-head channel offsets + N(0,1)                */
    TL_FLAVOR_SINKS = 1,    /* token 0 and ~4% others with key norm x0.05       */
    TL_FLAVOR_OUTLIERS = 2, /* a few key channels x10..x20, value channels x5   */
    TL_FLAVOR_CONST = 3,    /* half the key channels constant over all tokens,
                               value channels [0, d/2) constant per token       */
    TL_FLAVOR_ZERO = 4,     /* ~10% tokens (incl. token 1) with all-zero keys   */
    TL_FLAVOR_HUGE = 5,     /* values near the fp16 maximum (|x| <= 60000)      */
    TL_FLAVORS = 6
};
const char *tl_flavor_name(int flavor);
void tl_gen_kv(tl_rng *r, int flavor, float *k, float *v, int64_t T, int hkv, int d, oscar_dtype in);
/* Queries [n][hq][d] such that logits q.k/sqrt(d) have a std of about
 * `logit_std` for keys of RMS head norm key_norm; rounded to dtype. */
void tl_gen_q(tl_rng *r, float *q, int64_t n, int hq, int d, double key_norm, double logit_std,
              oscar_dtype dt);
/* RMS over (token, head) of the key head-vector norms. */
double tl_key_rms_norm(const float *k, int64_t T, int hkv, int d);

/* ---- scalar conversions (own implementation) -------------------------- */

/* double -> fp16, round to nearest even, saturating at +-65504 (FORMAT.md). */
uint16_t tl_f16_from_double(double x);
double tl_f16_to_double(uint16_t h);
/* double -> bf16, round to nearest even (overflow gives Inf). */
uint16_t tl_bf16_from_double(double x);
double tl_bf16_to_double(uint16_t h);
/* Rounds x to the nearest value of dtype (F32: to float). */
double tl_round_dtype(oscar_dtype dt, double x);
/* Distance from |x| to the next larger value of dtype (its ulp there). */
double tl_ulp(oscar_dtype dt, double x);
int tl_dtype_size(oscar_dtype dt);
const char *tl_dtype_name(oscar_dtype dt);
/* Encodes n floats into dtype (own conversion); decodes back. */
void tl_encode(const float *src, oscar_dtype dt, void *dst, int64_t n);
void tl_decode(const void *src, oscar_dtype dt, float *dst, int64_t n);
/* Makes every value exactly representable in dt (in place). */
void tl_round_array(oscar_dtype dt, float *x, int64_t n);

/* ---- reference Hadamard ---------------------------------------------- */

/* y = H_n x by the definition (O(n^2)); x and y may alias. n power of two <= 4096. */
void tl_hadamard_ref(const double *x, double *y, int n);

/* ---- geometry --------------------------------------------------------- */

typedef struct tl_geom {
    oscar_config cfg;
    int d, hkv, hq, L, R, gk, gv, bits, Q;
    int quant, rot, rotv, scale;
    oscar_dtype W;
    int w;                 /* window element bytes */
    size_t codes_bytes;    /* per head, K (= V) */
    size_t kparams_bytes, vparams_bytes, head_bytes, norms_bytes;
    size_t LB;             /* layer block bytes */
    /* format version 4: key and value widths (key_bits / value_bits; bits,
     * Q and codes_bytes above are the keys') and per-head key norms */
    int kbits, vbits, Qk, Qv, norm_per_head;
    size_t kcodes_bytes, vcodes_bytes;
} tl_geom;

tl_geom tl_geom_of(const oscar_config *cfg);
/* A small default configuration used by most tests. */
oscar_config tl_small_config(oscar_method m, int bits, int d, int hkv, int hq);

/* ---- reference quantiser (FORMAT.md steps 1-8) ------------------------- */

typedef struct tl_ref {
    int64_t T, packed;     /* tokens, quantised tokens */
    /* window-space values (after rotation, rounded to W), all T tokens:
     * [T][hkv][d] */
    float *xk, *xv;
    /* packed tokens only */
    float *s;              /* [packed] token norms (1 without scaling) */
    float *kq;             /* [packed][hkv][d] key to quantise (x/s) */
    uint16_t *ksc, *klo;   /* [packed/gk][hkv][d] */
    uint16_t *vsc, *vlo;   /* [packed][hkv][d/gv] */
    uint8_t *kcode, *vcode;/* [packed][hkv][d] */
    float *kdeq, *vdeq;    /* [packed][hkv][d] dequantised (quantised space) */
    /* everything in the original space (what oscar_seq_read returns),
     * [T][hkv][d]; V in the output space (un-rotated iff rotate_values) */
    double *krec, *vrec;
} tl_ref;

/* k, v: [T][hkv][d] input values as fp32 (already decoded from the input
 * dtype). s_override (may be NULL): token norms to use instead of the
 * reference's own (format tests take them from the stream, since the
 * summation order of s is not part of the format). */
void tl_ref_build(const tl_geom *g, const float *k, const float *v, int64_t T,
                  const float *s_override, tl_ref *out);
/* The same with an explicit number of packed tokens (a multiple of R, <= T):
 * a cache packs by the rule of oscar_config (a rollback lag, truncation), not
 * always floor(T / R) blocks. */
void tl_ref_build_packed(const tl_geom *g, const float *k, const float *v, int64_t T, int64_t packed_tokens,
                         const float *s_override, tl_ref *out);
void tl_ref_free(tl_ref *r);

/* Compares the library's read-back K or V ([T][hkv][d], original space, from
 * oscar_seq_read) with the reference. Packed tokens are compared in the
 * quantised space (inverse rotation and scaling in float64), window tokens
 * in the original space. mism: elements beyond fp32 rounding; hard: beyond
 * one quantisation step (a code flipped by a last-bit difference of s).
 * window_mism: the mism among window tokens. groups: quantisation groups of
 * the packed tokens (keys: gk tokens of one channel; values: gv channels of
 * one token); bad_groups: those holding a mism element. A last-bit
 * difference of s can move a group's f16 min or step by one ulp, which
 * shifts all gk (or gv) of its elements at once: without rotation, count
 * groups, not elements. */
typedef struct tl_cmp_stats {
    int64_t elems, mism, hard;
    double worst;
    int64_t window_mism, groups, bad_groups;
} tl_cmp_stats;
void tl_compare_readback(const tl_geom *g, const tl_ref *ref, const float *lib, int is_v, tl_cmp_stats *st);
/* The agreement a read-back check asks of the K and V stats, each by its
 * own rotation: rotated, at most 5% of elements beyond fp32 rounding and
 * 0.5% (+ hard_slack) beyond a step; not rotated, an exact window, at most
 * 0.5% of groups (+4) moved, and at most hard_slack elements beyond a step.
 * (Measured on 6,000 random histories without rotation: about 1e-4 of
 * groups move, and at most 5 of 1,408 in one history.) */
int tl_readback_within(const tl_geom *g, const tl_cmp_stats *k, const tl_cmp_stats *v, int64_t hard_slack);
/* Parameters of one group (step 6) from fp32 values. */
void tl_ref_params(const float *x, int n, int stride, int Q, uint16_t *sc16, uint16_t *lo16);
/* Step 7. */
int tl_ref_code(float x, uint16_t sc16, uint16_t lo16, int Q);

/* Float64 attention for one sequence.
 *  k, v: [T][hkv][d] in the original (output) space.
 *  q:    [q_len][hq][d]; out: [q_len][hq][d].
 *  Query i attends to tokens [0, T - q_len + i]; head j reads KV head j/(hq/hkv). */
/* mag (may be NULL): [q_len][hq], the natural scale of each output vector,
 * max over channels of sum_t p_t |v_t,c|. An fp32 kernel's rounding error is
 * relative to this, not to |out| (which may cancel to near zero). */
void tl_ref_attention(int d, int hkv, int hq, const double *k, const double *v, int64_t T,
                      int q_len, const float *q, double scale, double *out, double *mag);
/* The same attention computed the way FORMAT.md states it, in the rotated
 * and scaled space of the reference quantiser: q' = H q, logit_t =
 * s_t * (q' . x^_t) * scale for packed tokens and q' . k'_t * scale for
 * window tokens, one softmax, o' = sum p v^'_t, o = H o' if V was rotated. */
void tl_ref_attention_rot(const tl_geom *g, const tl_ref *ref, int q_len, const float *q, double scale,
                          double *out);
/* Same with float inputs. */
void tl_ref_attention_f(int d, int hkv, int hq, const float *k, const float *v, int64_t T,
                        int q_len, const float *q, double scale, double *out, double *mag);

/* ---- library helpers --------------------------------------------------- */

oscar_cache *tl_create(const oscar_config *cfg);
/* Appends n tokens (fp32 arrays [n][hkv][d]) encoded in dt to one sequence. */
oscar_status tl_append(oscar_cache *c, int layer, int32_t seq, const float *k, const float *v,
                       int64_t n, int hkv, int d, oscar_dtype dt);
/* Poisons out, runs attention, decodes the output to fp32 (out_f32 is
 * [n_seqs][q_len][hq][d]). q is fp32, encoded to q_dt. */
oscar_status tl_attention(oscar_cache *c, int layer, int n_seqs, const int32_t *ids, int q_len,
                          const float *q, oscar_dtype q_dt, oscar_dtype out_dt, float scale,
                          float *out_f32, int hq, int d);
/* Export into a malloc'd buffer (NULL on failure, with a failed check). */
unsigned char *tl_export(oscar_cache *c, int32_t seq, size_t *size);
/* 1 if the two sequences export to the same bytes. */
int tl_same_export(oscar_cache *a, int32_t sa, oscar_cache *b, int32_t sb);
/* Reads all tokens of a layer (outputs poisoned first); returns count. */
int64_t tl_read_all(oscar_cache *c, int32_t seq, int layer, int hkv, int d, float **k, float **v);
/* Fills a float buffer with NaN. */
void tl_poison(float *x, int64_t n);
/* Number of non-finite values. */
int64_t tl_count_nonfinite(const float *x, int64_t n);

/* ---- stream helpers ---------------------------------------------------- */

uint64_t tl_fnv1a(const void *data, size_t n);
uint32_t tl_rd32(const unsigned char *p);
uint64_t tl_rd64(const unsigned char *p);
void tl_wr32(unsigned char *p, uint32_t v);
void tl_wr64(unsigned char *p, uint64_t v);
/* Recomputes the trailing checksum of a stream in place. */
void tl_fix_checksum(unsigned char *buf, size_t size);

/* Decodes a K or V code array of one head (R tokens, FORMAT.md tiles; 3 bits:
 * the 2-bit plane then the 1-bit plane of format version 5)
 * into out[R][d]. */
void tl_decode_codes(const unsigned char *codes, int R, int d, int bits, int is_value,
                     uint8_t *out);
/* The inverse, for building streams in tests. */
void tl_encode_codes(const uint8_t *in, int R, int d, int bits, int is_value,
                     unsigned char *codes);

/* ---- error measures ----------------------------------------------------- */

/* ||a - b||_2 / ||b||_2 over n (b is the reference). */
double tl_rel_l2(const float *a, const double *b, int64_t n);
double tl_max_abs_diff(const float *a, const double *b, int64_t n);
double tl_max_abs(const double *b, int64_t n);
/* Compares nvec vectors of d outputs against a float64 reference:
 * element error <= rel * scale + half an ulp of out_dt (the output
 * rounding), where scale is mag[vector] (see tl_ref_attention) or, with
 * mag NULL, max|ref| over the vector. Returns the number of violating (or
 * NaN) elements; *worst (may be NULL) gets the largest error / scale. */
int64_t tl_compare_out(const float *got, const double *ref, const double *mag, int64_t nvec, int d,
                       oscar_dtype out_dt, double rel, double *worst);

/* FORMAT.md step 4's per-head key sum of squares, written from the
 * definition: 32 lanes sum d/32 consecutive squares in order, then
 * s_l += s_(l xor m) for m = 16, 8, 4, 2, 1, lane 0 wins; fp32 throughout. */
float tl_head_sumsq_def(const float *x, int d);

#endif
