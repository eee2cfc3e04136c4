/* attention_q2.c - decode attention over 2-bit blocks (attention_q2.h).
 *
 * The tile layout (docs/FORMAT.md) is the operand layout of a GPU MMA: lane
 * l = 4g + t of a 16-token tile holds W = d/32 words. For keys, lane g's
 * codes are tokens g and g + 8 (all channels); for values, lane g's codes are
 * channels 16s + g and 16s + g + 8 (all tokens). So the 8 lanes g = 0..7 that
 * share (t, word w) form one 8-wide vector whose element g is, for keys,
 * token g (or g + 8) at one channel, for values channel g (+ 16s + 8(j&1))
 * of one token. A tile is 8 rows g of 4W consecutive words, so these
 * vectors are the columns of the tile read as an 8 x 4W matrix of words: the
 * AVX2 copy loads rows and transposes 8 x 8 blocks in registers.
 *
 * Each 2-bit code of such a vector is decoded with one shift and one
 * vpermilps (the permute reads only the low two bits of each 32-bit lane, a
 * 4-entry table of centred codes -1.5, -0.5, 0.5, 1.5), and the decoded
 * vector meets every query row with one FMA against a broadcast
 * q * scale (keys) or p * scale (values). Per 8 codes that is 2 + nr
 * operations (the previous kernel used 4 + 2 nr: shift, mask, convert,
 * subtract, then a multiply and an add per row).
 *
 * The scalar copy is the reference: same numbers, plain loops. */
#include "attention_q2.h"

#include "internal.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu_features.h"
#define Q2_X86 1
#endif

/* ---- scalar reference ---------------------------------------------------- */

/* Centred codes of one tile, cc[tok][ch] (tok 0..15), for keys (is_v = 0) or
 * values (is_v = 1), straight from the FORMAT.md table. */
static void tile_codes_scalar(int d, const uint8_t *tile, int is_v, float *cc) {
    const int W = d / 32, npairs = d / 4; /* pairs q = 4s + j per lane */
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        const uint8_t *chunk = tile + (size_t)l * W * 4;
        for (int q = 0; q < npairs; q++) {
            uint32_t word;
            memcpy(&word, chunk + (size_t)(q / 8) * 4, 4); /* little-endian hosts only, like the packer */
            const int s = q >> 2, j = q & 3;
            for (int e = 0; e < 2; e++) {
                const uint32_t code = (word >> (16 * e + 2 * (q % 8))) & 3u;
                int tok, ch;
                if (!is_v) {
                    tok = g + 8 * (j & 1);
                    ch = 16 * s + 2 * t + 8 * (j >> 1) + e;
                } else {
                    tok = 2 * t + 8 * (j >> 1) + e;
                    ch = 16 * s + g + 8 * (j & 1);
                }
                cc[(size_t)tok * d + ch] = (float)code - 1.5f;
            }
        }
    }
}

static void logits_scalar(int d, int R, int Gk, const uint8_t *codes, const uint16_t *params, const float *norms,
                          int nr, const float *q, float sm, float *out, int64_t ld) {
    float qt[OSCAR_Q2_MAX_ROWS][256], bias[OSCAR_Q2_MAX_ROWS], cc[16 * 256];
    for (int g0 = 0; g0 < R; g0 += Gk) {
        float pf[512];
        oscar_to_f32(params + (size_t)(g0 / Gk) * d * 2, OSCAR_DTYPE_F16, pf, 2 * d);
        for (int r = 0; r < nr; r++) {
            float b = 0.0f;
            for (int c = 0; c < d; c++) {
                const float sc = pf[2 * c], lo = pf[2 * c + 1];
                qt[r][c] = q[(size_t)r * d + c] * sc;
                b += q[(size_t)r * d + c] * (lo + 1.5f * sc);
            }
            bias[r] = b;
        }
        for (int T = g0 / 16; T < (g0 + Gk) / 16; T++) {
            tile_codes_scalar(d, codes + (size_t)T * 4 * d, 0, cc);
            for (int i = 0; i < 16; i++) {
                const int tok = 16 * T + i;
                const float s = (norms ? norms[tok] : 1.0f) * sm;
                for (int r = 0; r < nr; r++) {
                    float a = 0.0f;
                    for (int c = 0; c < d; c++) a += qt[r][c] * cc[(size_t)i * d + c];
                    out[(size_t)r * ld + tok] = s * (bias[r] + a);
                }
            }
        }
    }
}

static void values_scalar(int d, int R, int Gv, const uint8_t *codes, const uint16_t *params, int nr, const float *p,
                          int64_t ld, float *acc, float *vbias) {
    const int ng = d / Gv;
    float cc[16 * 256];
    for (int T = 0; T < R / 16; T++) {
        tile_codes_scalar(d, codes + (size_t)T * 4 * d, 1, cc);
        for (int i = 0; i < 16; i++) {
            const int tok = 16 * T + i;
            float pf[32];
            oscar_to_f32(params + (size_t)tok * ng * 2, OSCAR_DTYPE_F16, pf, 2 * ng);
            for (int r = 0; r < nr; r++) {
                const float pt = p[(size_t)r * ld + tok];
                for (int gi = 0; gi < ng; gi++) {
                    const float sc = pf[2 * gi], lo = pf[2 * gi + 1];
                    const float ps = pt * sc;
                    vbias[(size_t)r * ng + gi] += pt * (lo + 1.5f * sc);
                    for (int c = gi * Gv; c < (gi + 1) * Gv; c++) acc[(size_t)r * d + c] += ps * cc[(size_t)i * d + c];
                }
            }
        }
    }
}

/* ---- AVX2 + FMA + F16C --------------------------------------------------- */

#ifdef Q2_X86
#define Q2_TARGET __attribute__((target("avx2,fma,f16c")))
#define Q2_INLINE static inline __attribute__((always_inline)) Q2_TARGET

/* In place: r[i] becomes column i of the 8 x 8 matrix of dwords r[0..7]. */
Q2_INLINE void transpose8(__m256i r[8]) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

/* The tile's columns: col[t*W + w] = the words (t, w) of lanes g = 0..7. */
Q2_INLINE void tile_columns(const uint8_t *tile, int d, __m256i *col) {
    const int cw = d / 8; /* words per row g = 4W */
    for (int b = 0; b < cw / 8; b++) {
        __m256i r[8];
        for (int g = 0; g < 8; g++) r[g] = _mm256_loadu_si256((const __m256i *)(tile + ((size_t)g * cw + 8 * b) * 4));
        transpose8(r);
        for (int i = 0; i < 8; i++) col[8 * b + i] = r[i];
    }
}

/* n {fp16 scale, fp16 lo} pairs (n a multiple of 8) to scale[] and
 * midpoint[] = lo + 1.5 scale (rounded as the scalar copy rounds it). */
Q2_INLINE void pairs_to_f32(const uint16_t *pairs, int n, float *scale, float *mid) {
    for (int c = 0; c < n; c += 8) {
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(pairs + 2 * c)));
        const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(pairs + 2 * c + 8)));
        /* [s0 s1 s4 s5 | s2 s3 s6 s7] -> s0..s7, the same for lo */
        const __m256 s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
        const __m256 l = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
        _mm256_storeu_ps(scale + c, s);
        _mm256_storeu_ps(mid + c, _mm256_add_ps(l, _mm256_mul_ps(_mm256_set1_ps(1.5f), s)));
    }
}

Q2_INLINE float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

Q2_INLINE void logits_avx2_n(int d, int R, int Gk, const uint8_t *codes, const uint16_t *params, const float *norms,
                             const float *q, float sm, float *out, int64_t ld, const int NR) {
    const int W = d / 32, lw = W == 2 ? 1 : W == 4 ? 2 : 3; /* log2 W */
    float qt[OSCAR_Q2_MAX_ROWS][256] __attribute__((aligned(32)));
    float gs[256] __attribute__((aligned(32))), gm[256] __attribute__((aligned(32)));
    float bias[OSCAR_Q2_MAX_ROWS];
    const __m256 lut = _mm256_setr_ps(-1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f);
    for (int g0 = 0; g0 < R; g0 += Gk) {
        pairs_to_f32(params + (size_t)(g0 / Gk) * d * 2, d, gs, gm);
        for (int r = 0; r < NR; r++) {
            __m256 b = _mm256_setzero_ps();
            for (int c = 0; c < d; c += 8) {
                const __m256 qv = _mm256_loadu_ps(q + (size_t)r * d + c);
                _mm256_store_ps(&qt[r][c], _mm256_mul_ps(qv, _mm256_load_ps(gs + c)));
                b = _mm256_fmadd_ps(qv, _mm256_load_ps(gm + c), b);
            }
            bias[r] = hsum8(b);
        }
        for (int T = g0 / 16; T < (g0 + Gk) / 16; T++) {
            __m256i col[32];
            tile_columns(codes + (size_t)T * 4 * d, d, col);
            __m256 acc[OSCAR_Q2_MAX_ROWS][2]; /* tokens 0..7 and 8..15 of the tile */
            for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int c = 0; c < 4 * W; c++) {
                const int t = c >> lw, w = c & (W - 1);
                const __m256i x = col[c];
                const float *qb = &qt[0][32 * w + 2 * t];
#pragma GCC unroll 8
                for (int p = 0; p < 8; p++)
#pragma GCC unroll 2
                    for (int e = 0; e < 2; e++) {
                        /* pair q = 8w + p: j = p & 3, s = 2w + p/4 */
                        const int off = 16 * (p >> 2) + 8 * ((p >> 1) & 1) + e;
                        const __m256 cv = _mm256_permutevar_ps(lut, _mm256_srli_epi32(x, 16 * e + 2 * p));
                        for (int r = 0; r < NR; r++)
                            acc[r][p & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(qb + r * 256 + off), cv, acc[r][p & 1]);
                    }
            }
            const int tok0 = 16 * T;
            const __m256 vsm = _mm256_set1_ps(sm);
            const __m256 s0 = norms ? _mm256_mul_ps(_mm256_loadu_ps(norms + tok0), vsm) : vsm;
            const __m256 s1 = norms ? _mm256_mul_ps(_mm256_loadu_ps(norms + tok0 + 8), vsm) : vsm;
            for (int r = 0; r < NR; r++) {
                const __m256 b = _mm256_set1_ps(bias[r]);
                _mm256_storeu_ps(out + (size_t)r * ld + tok0, _mm256_mul_ps(s0, _mm256_add_ps(b, acc[r][0])));
                _mm256_storeu_ps(out + (size_t)r * ld + tok0 + 8, _mm256_mul_ps(s1, _mm256_add_ps(b, acc[r][1])));
            }
        }
    }
}

Q2_INLINE void values_avx2_n(int d, int R, int Gv, const uint8_t *codes, const uint16_t *params, const float *p,
                             int64_t ld, float *acc_mem, float *vbias, const int NR) {
    const int W = d / 32, ng = d / Gv;
    /* per group gi: the 16 tokens' scale and midpoint, [gi][token] */
    float sc[16 * 16] __attribute__((aligned(32))), mid[16 * 16] __attribute__((aligned(32)));
    float ps[OSCAR_Q2_MAX_ROWS][16 * 16] __attribute__((aligned(32))); /* [row][group * 16 + token] p * scale */
    __m256 vb[OSCAR_Q2_MAX_ROWS][16];                                   /* [row][group] sums of p * midpoint */
    for (int r = 0; r < NR; r++)
        for (int gi = 0; gi < ng; gi++) vb[r][gi] = _mm256_setzero_ps();
    const __m256 lut = _mm256_setr_ps(-1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f);
    for (int T = 0; T < R / 16; T++) {
        /* the tile's {scale, lo} pairs are [token][group]: regroup them
         * [group][token] (as 32-bit units), then convert */
        const uint32_t *tp = (const uint32_t *)(params + (size_t)T * 16 * ng * 2);
        uint32_t pg[16 * 16] __attribute__((aligned(32)));
        if (ng == 1) {
            memcpy(pg, tp, 16 * 4);
        } else if (ng == 2) { /* even and odd dwords of 4 vectors of 4 tokens x 2 groups */
            for (int h = 0; h < 2; h++) {
                const __m256 a = _mm256_loadu_ps((const float *)tp + 16 * h);
                const __m256 b = _mm256_loadu_ps((const float *)tp + 16 * h + 8);
                const __m256 g0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
                const __m256 g1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
                _mm256_store_ps((float *)pg + 8 * h, g0);
                _mm256_store_ps((float *)pg + 16 + 8 * h, g1);
            }
        } else {
            for (int tok = 0; tok < 16; tok++)
                for (int gi = 0; gi < ng; gi++) pg[gi * 16 + tok] = tp[tok * ng + gi];
        }
        pairs_to_f32((const uint16_t *)pg, 16 * ng, sc, mid);
        for (int r = 0; r < NR; r++) {
            const float *pr = p + (size_t)r * ld + 16 * T;
            const __m256 p0 = _mm256_loadu_ps(pr), p1 = _mm256_loadu_ps(pr + 8);
            for (int gi = 0; gi < ng; gi++) {
                _mm256_store_ps(&ps[r][gi * 16], _mm256_mul_ps(p0, _mm256_load_ps(sc + gi * 16)));
                _mm256_store_ps(&ps[r][gi * 16 + 8], _mm256_mul_ps(p1, _mm256_load_ps(sc + gi * 16 + 8)));
                vb[r][gi] = _mm256_fmadd_ps(p0, _mm256_load_ps(mid + gi * 16), vb[r][gi]);
                vb[r][gi] = _mm256_fmadd_ps(p1, _mm256_load_ps(mid + gi * 16 + 8), vb[r][gi]);
            }
        }
        __m256i col[32];
        tile_columns(codes + (size_t)T * 4 * d, d, col);
        for (int w = 0; w < W; w++) {
            /* octet o: channels 32w + 8o + 0..7 */
            __m256 acc[OSCAR_Q2_MAX_ROWS][4];
            for (int r = 0; r < NR; r++)
                for (int o = 0; o < 4; o++) acc[r][o] = _mm256_loadu_ps(acc_mem + (size_t)r * d + 32 * w + 8 * o);
            for (int t = 0; t < 4; t++) {
                const __m256i x = col[t * W + w];
#pragma GCC unroll 8
                for (int pp = 0; pp < 8; pp++)
#pragma GCC unroll 2
                    for (int e = 0; e < 2; e++) {
                        const int tok = 2 * t + 8 * ((pp >> 1) & 1) + e, o = (pp >> 2) * 2 + (pp & 1);
                        const int gi = (32 * w + 16 * (pp >> 2)) / Gv;
                        const __m256 cv = _mm256_permutevar_ps(lut, _mm256_srli_epi32(x, 16 * e + 2 * pp));
                        for (int r = 0; r < NR; r++)
                            acc[r][o] = _mm256_fmadd_ps(_mm256_broadcast_ss(&ps[r][gi * 16 + tok]), cv, acc[r][o]);
                    }
            }
            for (int r = 0; r < NR; r++)
                for (int o = 0; o < 4; o++) _mm256_storeu_ps(acc_mem + (size_t)r * d + 32 * w + 8 * o, acc[r][o]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int gi = 0; gi < ng; gi++) vbias[(size_t)r * ng + gi] += hsum8(vb[r][gi]);
}

#define Q2_ROWS(CALL)                                                                                                 \
    switch (nr) {                                                                                                     \
    case 1: CALL(1); break;                                                                                           \
    case 2: CALL(2); break;                                                                                           \
    case 3: CALL(3); break;                                                                                           \
    case 4: CALL(4); break;                                                                                           \
    case 5: CALL(5); break;                                                                                           \
    case 6: CALL(6); break;                                                                                           \
    case 7: CALL(7); break;                                                                                           \
    default: CALL(8); break;                                                                                          \
    }

Q2_TARGET static void logits_avx2(int d, int R, int Gk, const uint8_t *codes, const uint16_t *params,
                                  const float *norms, int nr, const float *q, float sm, float *out, int64_t ld) {
#define LC(n) logits_avx2_n(d, R, Gk, codes, params, norms, q, sm, out, ld, n)
    Q2_ROWS(LC)
#undef LC
}

Q2_TARGET static void values_avx2(int d, int R, int Gv, const uint8_t *codes, const uint16_t *params, int nr,
                                  const float *p, int64_t ld, float *acc, float *vbias) {
#define VC(n) values_avx2_n(d, R, Gv, codes, params, p, ld, acc, vbias, n)
    Q2_ROWS(VC)
#undef VC
}
#endif /* Q2_X86 */

/* ---- dispatch ------------------------------------------------------------ */

int oscar_q2_level_supported(int level) {
    if (level == 0) return 1;
#ifdef Q2_X86
    if (level == 1) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && oscar_x86_has_avx_f16c();
    }
#endif
    return 0;
}

static int q2_level_known = -1;

int oscar_q2_level(void) {
    int l = __atomic_load_n(&q2_level_known, __ATOMIC_RELAXED);
    if (l < 0) {
        const char *env = getenv("OSCAR_CPU");
        l = env && !strcmp(env, "scalar") ? 0 : oscar_q2_level_supported(1) ? 1 : 0;
        __atomic_store_n(&q2_level_known, l, __ATOMIC_RELAXED);
    }
    return l;
}

void oscar_q2_logits_at(int level, int d, int R, int k_group, const uint8_t *codes, const uint16_t *params,
                        const float *norms, int nr, const float *q, float sm, float *out, int64_t ld) {
#ifdef Q2_X86
    if (level == 1) {
        logits_avx2(d, R, k_group, codes, params, norms, nr, q, sm, out, ld);
        return;
    }
#endif
    logits_scalar(d, R, k_group, codes, params, norms, nr, q, sm, out, ld);
}

void oscar_q2_values_at(int level, int d, int R, int v_group, const uint8_t *codes, const uint16_t *params, int nr,
                        const float *p, int64_t ld, float *acc, float *vbias) {
#ifdef Q2_X86
    if (level == 1) {
        values_avx2(d, R, v_group, codes, params, nr, p, ld, acc, vbias);
        return;
    }
#endif
    values_scalar(d, R, v_group, codes, params, nr, p, ld, acc, vbias);
}

void oscar_q2_logits(int d, int R, int k_group, const uint8_t *codes, const uint16_t *params, const float *norms,
                     int nr, const float *q, float sm, float *out, int64_t ld) {
    oscar_q2_logits_at(oscar_q2_level(), d, R, k_group, codes, params, norms, nr, q, sm, out, ld);
}

void oscar_q2_values(int d, int R, int v_group, const uint8_t *codes, const uint16_t *params, int nr, const float *p,
                     int64_t ld, float *acc, float *vbias) {
    oscar_q2_values_at(oscar_q2_level(), d, R, v_group, codes, params, nr, p, ld, acc, vbias);
}
