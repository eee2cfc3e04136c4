/*
 * test_kernels.c - the attention and pack kernels, element by element,
 * against plain references written here (llm.c style).
 *
 * Attention. A cache is built through the public API and one layer of each
 * sequence is read back from its export stream by this file: the codes
 * (FORMAT.md tiles, tl_decode_codes), the fp16 (scale, lo) pairs, the token
 * norms and the window rows. From those the test computes attention in
 * float64 as FORMAT.md defines it: q' = H q, logit_t = s_t (q' . x^_t) *
 * scale for packed tokens and q' . k'_t * scale for window tokens, one
 * softmax over both, o' = sum p_t v^'_t, o = H o' when values were rotated.
 * Every output element is compared with its own bound (see ref_attention):
 * no whole-call norm. Outputs are NaN-poisoned before the call, so an
 * element the kernel did not write fails as "unwritten".
 *
 * The same comparison runs on the CPU backend (always: this part runs in
 * CI) and on the CUDA backend (with a device). Each backend is compared
 * with the codes it wrote itself. On the CPU pass the test also emulates
 * the CUDA kernels' fp16 value path in float64 (p and p 2^S scale rounded
 * per 64-token chunk) and checks that the bound covers it: the bound is
 * derived, and this shows the derivation is not short of the kernel.
 *
 * Pack (CUDA only). A CPU and a CUDA cache get the same tokens in the same
 * appends; every code, (scale, lo) pair, token norm and window byte must be
 * bit-identical. The first difference is printed with its position.
 *
 * Sink tokens (config.sink_tokens, the cases with a last field): the
 * stream's sink rows are read as tokens 0 .. S-1, blocks follow from token
 * S; the same reference covers them (exact tokens, no norm).
 *
 * Self-test (always). The comparison code is shown to fail on purpose: a
 * sign flipped, one element nudged past its bound, one element unwritten,
 * the causal limit moved by one token, one code changed in a stream.
 *
 * Exit: 0 pass; 77 skip: no CUDA device ("SKIPPED: no CUDA device"; the CPU
 * and self-test parts have run and passed); anything else: failure.
 * `test_kernels --small`: the reduced set (compute-sanitizer).
 * `test_kernels --cpu`: the self-test and the CPU half only; passes without a GPU.
 */
#include "testlib.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static int g_small = 0;
static int g_have_gpu = 0;
static double g_worst_ratio[2] = {0.0, 0.0}; /* largest |error| / bound per backend (CPU, CUDA) */
static double g_worst_emu = 0.0;             /* the emulated fp16 value path / bound */

#define CUCHECK(x)                                                                                     \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)

/* ---- adversarial K/V ------------------------------------------------------ */

enum {
    ADV_NORMAL = 0,
    ADV_SINKS,    /* token 0 and a few others with keys x32: attention sinks */
    ADV_OUTLIERS, /* a few key channels x10..x20, value channels x5 */
    ADV_CONST,    /* constant key channels and value groups: scale 0 */
    ADV_HUGE,     /* values near the fp16 maximum */
    ADV_ZERO      /* some all-zero keys */
};

static const char *adv_name(int a) {
    static const char *n[] = {"normal", "sinks", "outliers", "const", "huge", "zero-keys"};
    return n[a];
}

/* k, v [T][hkv][d] in the input dtype's values; *knorm (may be NULL): the
 * RMS key head norm before the sinks are boosted (queries are scaled to it). */
static void gen_kv(tl_rng *r, int adv, float *k, float *v, int64_t T, int hkv, int d, oscar_dtype in, double *knorm) {
    static const int flavor[] = {TL_FLAVOR_NORMAL, TL_FLAVOR_NORMAL, TL_FLAVOR_OUTLIERS,
                                 TL_FLAVOR_CONST,  TL_FLAVOR_HUGE,   TL_FLAVOR_ZERO};
    tl_gen_kv(r, flavor[adv], k, v, T, hkv, d, in);
    if (knorm) *knorm = tl_key_rms_norm(k, T, hkv, d);
    if (adv == ADV_SINKS) {
        const int64_t row = (int64_t)hkv * d;
        for (int64_t t = 0; t < T; t++)
            if (t == 0 || tl_uniform(r) < 0.02)
                for (int64_t i = 0; i < row; i++) k[t * row + i] = (float)tl_round_dtype(in, 32.0 * k[t * row + i]);
    }
}

/* ---- one layer of a sequence, read from its export stream ---------------- */

typedef struct seqdata {
    int64_t T, packed;
    /* [T][hkv][d] in the quantised (rotated) space: x^ = l0 + code * sc for
     * packed tokens, the window (or method none: block) value otherwise */
    double *kx, *vx;
    /* [T][hkv][d]: |code * sc| + |l0| (packed) or |x|: the size of what the
     * kernel multiplies, to which its rounding errors are relative */
    double *kmag, *vmag;
    double *s; /* [T] token norm (1 where there is none) */
    /* [T][hkv][d]: the value's code, scale and lo (code -1: not quantised),
     * for the emulation of the kernel's fp16 value path */
    double *vcode, *vsc, *vlo;
} seqdata;

static void seqdata_free(seqdata *sd) {
    free(sd->kx), free(sd->vx), free(sd->kmag), free(sd->vmag), free(sd->s);
    free(sd->vcode), free(sd->vsc), free(sd->vlo);
    memset(sd, 0, sizeof *sd);
}

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static double rdf32(const unsigned char *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

/* One element of dtype dt at p. */
static double rd_elem(const unsigned char *p, oscar_dtype dt) {
    float f;
    tl_decode(p, dt, &f, 1);
    return f;
}

/* Reads layer `layer` of a version-5 stream (version 4's bytes) (FORMAT.md "Export stream"):
 * the Sk = sink_tokens first tokens from their sink rows, then the blocks,
 * then the window. sd->packed counts the packed tokens; they are tokens
 * [sk, sk + packed), sk = min(T, Sk) (0 without sinks).
 * Returns 0 (with a failed check) if the stream is not what the geometry
 * says. */
static int read_stream(const tl_geom *g, const unsigned char *buf, size_t size, int layer, seqdata *sd) {
    memset(sd, 0, sizeof *sd);
    const size_t hdr = 80 + 16 * (size_t)g->L;
    const int Sk = g->cfg.sink_tokens;
    if (!CHECKF(size > hdr && memcmp(buf, "OSCARSEQ", 8) == 0 && tl_rd32(buf + 8) == 5 &&
                      tl_rd32(buf + 60) == (uint32_t)Sk, "stream: bad header (not version 5 with %d sink tokens)", Sk))
        return 0;
    const uint32_t n_blocks = tl_rd32(buf + 52);
    const int64_t T = (int64_t)tl_rd64(buf + 80 + 16 * (size_t)layer);
    const int64_t P = (int64_t)tl_rd64(buf + 80 + 16 * (size_t)layer + 8);
    const int d = g->d, hkv = g->hkv, R = g->R, w = g->w;
    const int64_t row = (int64_t)hkv * d;
    const int64_t sk = T < Sk ? T : Sk; /* tokens in the sink rows */
    sd->T = T;
    sd->packed = P * R;
    const size_t n = (size_t)(T > 0 ? T : 1) * (size_t)row;
    sd->kx = malloc(n * sizeof(double)), sd->vx = malloc(n * sizeof(double));
    sd->vcode = malloc(n * sizeof(double)), sd->vsc = malloc(n * sizeof(double)), sd->vlo = malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) sd->vcode[i] = -1.0, sd->vsc[i] = 0.0, sd->vlo[i] = 0.0;
    sd->kmag = malloc(n * sizeof(double)), sd->vmag = malloc(n * sizeof(double));
    sd->s = malloc((size_t)(T > 0 ? T : 1) * sizeof(double));
    /* packed blocks */
    uint8_t *kc = malloc((size_t)R * d), *vc = malloc((size_t)R * d);
    for (int64_t i = 0; i < P; i++) {
        const unsigned char *blk = buf + hdr + ((size_t)i * g->L + layer) * g->LB;
        for (int h = 0; h < hkv; h++) {
            /* method none: K [R][d] then V [R][d] in W per head */
            const size_t head_bytes = g->quant ? g->head_bytes : (size_t)2 * R * d * w;
            const unsigned char *hb = blk + (size_t)h * head_bytes;
            if (g->quant) {
                tl_decode_codes(hb, R, d, g->bits, 0, kc);
                tl_decode_codes(hb + g->codes_bytes, R, d, g->bits, 1, vc);
            }
            for (int tt = 0; tt < R; tt++) {
                const int64_t t = sk + i * R + tt;
                double *kx = sd->kx + t * row + (int64_t)h * d, *vx = sd->vx + t * row + (int64_t)h * d;
                double *km = sd->kmag + t * row + (int64_t)h * d, *vm = sd->vmag + t * row + (int64_t)h * d;
                if (!g->quant) {
                    for (int c = 0; c < d; c++) {
                        kx[c] = rd_elem(hb + ((size_t)tt * d + c) * w, g->W);
                        vx[c] = rd_elem(hb + ((size_t)(R + tt) * d + c) * w, g->W);
                        km[c] = fabs(kx[c]), vm[c] = fabs(vx[c]);
                    }
                    continue;
                }
                const unsigned char *kp = hb + 2 * g->codes_bytes;
                const unsigned char *vp = kp + g->kparams_bytes;
                for (int c = 0; c < d; c++) {
                    const unsigned char *pk = kp + ((size_t)(tt / g->gk) * d + c) * 4;
                    const double ksc = tl_f16_to_double(rd16(pk)), klo = tl_f16_to_double(rd16(pk + 2));
                    const unsigned char *pv = vp + ((size_t)tt * (d / g->gv) + c / g->gv) * 4;
                    const double vsc = tl_f16_to_double(rd16(pv)), vlo = tl_f16_to_double(rd16(pv + 2));
                    const int ck = kc[tt * d + c], cv = vc[tt * d + c];
                    kx[c] = klo + ck * ksc;
                    vx[c] = vlo + cv * vsc;
                    km[c] = fabs(ck * ksc) + fabs(klo);
                    vm[c] = fabs(cv * vsc) + fabs(vlo);
                    const int64_t at = t * row + (int64_t)h * d + c;
                    sd->vcode[at] = cv, sd->vsc[at] = vsc, sd->vlo[at] = vlo;
                }
            }
        }
        for (int tt = 0; tt < R; tt++)
            sd->s[sk + i * R + tt] = g->scale ? rdf32(blk + (size_t)hkv * g->head_bytes + 4 * (size_t)tt) : 1.0;
    }
    free(kc);
    free(vc);
    /* per layer: sink K rows, sink V rows, window K rows, V rows, sums of
     * squares */
    size_t off = hdr + (size_t)n_blocks * g->L * g->LB;
    for (int l = 0; l < g->L; l++) {
        const int64_t Tl = (int64_t)tl_rd64(buf + 80 + 16 * (size_t)l);
        const int64_t skl = Tl < Sk ? Tl : Sk;
        const size_t sink_bytes = (size_t)skl * row * w;
        if (l == layer) {
            if (!CHECKF(off + 2 * sink_bytes <= size, "stream: sink rows past the end")) return 0;
            for (int64_t t = 0; t < skl; t++) {
                for (int64_t i = 0; i < row; i++) {
                    sd->kx[t * row + i] = rd_elem(buf + off + ((size_t)t * row + i) * w, g->W);
                    sd->vx[t * row + i] = rd_elem(buf + off + sink_bytes + ((size_t)t * row + i) * w, g->W);
                    sd->kmag[t * row + i] = fabs(sd->kx[t * row + i]);
                    sd->vmag[t * row + i] = fabs(sd->vx[t * row + i]);
                }
                sd->s[t] = 1.0;
            }
        }
        off += 2 * sink_bytes;
        const int64_t wt = Tl - skl - (int64_t)tl_rd64(buf + 80 + 16 * (size_t)l + 8) * R;
        const size_t rows_bytes = (size_t)wt * row * w;
        if (l == layer) {
            if (!CHECKF(off + 2 * rows_bytes <= size, "stream: window past the end")) return 0;
            for (int64_t j = 0; j < wt; j++)
                for (int64_t i = 0; i < row; i++) {
                    const int64_t t = sk + sd->packed + j;
                    sd->kx[t * row + i] = rd_elem(buf + off + ((size_t)j * row + i) * w, g->W);
                    sd->vx[t * row + i] = rd_elem(buf + off + rows_bytes + ((size_t)j * row + i) * w, g->W);
                    sd->kmag[t * row + i] = fabs(sd->kx[t * row + i]);
                    sd->vmag[t * row + i] = fabs(sd->vx[t * row + i]);
                }
            for (int64_t j = 0; j < wt; j++) sd->s[sk + sd->packed + j] = 1.0;
        }
        off += 2 * rows_bytes + 4 * (size_t)wt;
    }
    return CHECKF(off + 8 == size, "stream: %zu bytes, expected %zu", size, off + 8);
}

/* ---- the float64 reference and each element's bound ---------------------- */

/* Attention of one sequence's q_len x hq query rows (q [q_len][hq][d]),
 * query i attending tokens [0, T - q_len + i] + `extra` (the self-test
 * moves the causal limit with it). out and err are [q_len][hq][d]: the
 * reference and the bound on |kernel - reference| before the output
 * rounding (compare() adds that).
 *
 * The bound follows the CUDA kernels' roundings (the CPU backend rounds
 * less):
 *  - logits (log2 units, f = s_t |scale| log2 e): q' * scale is carried as
 *    fp16 hi + lo parts (~2^-22 relative per product), sums in fp32
 *    (tensor-core accumulators, or d sequential fp32 adds on the dense path),
 *    fp32 factors: (2^-16 + d 2^-24) f A_t with A_t = sum_c |q'_c| |k_c|
 *    (|k_c| = |code * scale| + |lo|); fp16 underflow of q' 2^-E * scale and
 *    of q' 2^-E (bias): 2^-25 2^E absolute per product, at most
 *    f 2 max|q'| 2^-24 (Q d + sum_c |k_c|); the fp32 H q:
 *    f log2(d) 2^-24 |q|_1 / sqrt(d) sum_c |k_c|;
 *  - a token's weight p_t is rounded to fp16 and p_t 2^S scale again
 *    (2 roundings: 2^-10 relative), and its logit error moves it by
 *    ln 2 (eps_t + mean eps) relative (the mean from the normalisation);
 *    p below fp16's normal range: 2^-24 absolute; p 2^S scale below it:
 *    2^-33 max|v| per token (S puts the chunk's largest scale near 2^14);
 *  - fp32 accumulation over the tokens: (T/16 + 64) 2^-23 relative;
 *  - all of it relative to |code * scale| + |lo| of each value element;
 *  - o = H o' in fp32 spreads an error of o' over the channels:
 *    |e_c| <= sum |e'| / sqrt(d), plus log2(d) 2^-23 of sum |o'| / sqrt(d).
 * The comparison allows 1.5x this bound plus half an ulp of the output
 * dtype (fp32: 2^-24 relative). The H o' step makes the bound of a rotated
 * output a spread (sum |e'| / sqrt(d) per channel): for fp32 outputs the
 * test also rotates the kernel's output back (H is its own inverse) and
 * compares o' per element against e' (out_rot, err_rot: o' and e' before
 * the rotation; may be NULL). */
/* fp16 exponent of x > 0 as the kernel reads it from the scale's bits:
 * (bits >> 10) - 15, so -15 for zero and subnormal scales */
static int f16_exponent(double x) { return (int)((tl_f16_from_double(x) & 0x7fff) >> 10) - 15; }

static void ref_attention(const tl_geom *g, const seqdata *sd, int q_len, const float *q, double scale, int extra,
                          double *out, double *err, double *out_rot, double *err_rot, double *emu_rot) {
    const int d = g->d, hkv = g->hkv, hq = g->hq, grp = hq / hkv;
    const int64_t T = sd->T, row = (int64_t)hkv * d;
    const double log2e = 1.4426950408889634, ln2 = 0.6931471805599453;
    const double Q = g->quant ? g->Q : 1.0;
    double *L2 = malloc(sizeof(double) * (size_t)(T > 0 ? T : 1));
    double *eps = malloc(sizeof(double) * (size_t)(T > 0 ? T : 1));
    double qr[256], o[256], e[256];
    for (int i = 0; i < q_len; i++)
        for (int j = 0; j < hq; j++) {
            const int h = j / grp;
            for (int c = 0; c < d; c++) qr[c] = q[((int64_t)i * hq + j) * d + c];
            if (g->rot) tl_hadamard_ref(qr, qr, d);
            double qmax = 0.0, q1 = 0.0;
            for (int c = 0; c < d; c++) qmax = fmax(qmax, fabs(qr[c]));
            for (int c = 0; c < d; c++) q1 += fabs(q[((int64_t)i * hq + j) * d + c]);
            /* the kernel's fp32 H q: |error| <= log2(d) 2^-24 |q|_1 / sqrt(d) per element */
            const double fwht = g->rot ? log2((double)d) * 0x1p-24 * q1 / sqrt((double)d) : 0.0;
            int64_t last = T - q_len + i + extra;
            if (last > T - 1) last = T - 1;
            double mx = -INFINITY;
            for (int64_t t = 0; t <= last; t++) {
                const double *kx = sd->kx + t * row + (int64_t)h * d, *km = sd->kmag + t * row + (int64_t)h * d;
                double dot = 0.0, A = 0.0, K1 = 0.0;
                for (int c = 0; c < d; c++) dot += qr[c] * kx[c], A += fabs(qr[c]) * km[c], K1 += km[c];
                const double f = sd->s[t] * fabs(scale) * log2e;
                L2[t] = sd->s[t] * dot * scale * log2e;
                eps[t] = ((0x1p-16 + d * 0x1p-24) * A + 2.0 * qmax * 0x1p-24 * (Q * d + K1) + fwht * K1) * f;
                if (L2[t] > mx) mx = L2[t];
            }
            double l = 0.0, ebar = 0.0;
            for (int64_t t = 0; t <= last; t++) l += exp2(L2[t] - mx);
            for (int64_t t = 0; t <= last; t++) ebar += exp2(L2[t] - mx) / l * eps[t];
            const double acc_rel = ((double)T / 16.0 + 64.0) * 0x1p-23;
            double vmax = 0.0; /* p * 2^S * scale below fp16's normal range: 2^-25 2^-S absolute */
            for (int64_t t = 0; t <= last; t++)
                for (int c = 0; c < d; c++) vmax = fmax(vmax, sd->vmag[t * row + (int64_t)h * d + c]);
            for (int c = 0; c < d; c++) o[c] = 0.0, e[c] = 0x1p-33 * (double)(last + 1) * vmax / l;
            for (int64_t t = 0; t <= last; t++) {
                const double w = exp2(L2[t] - mx) / l;
                const double rel = 0x1p-10 + ln2 * (eps[t] + ebar) + acc_rel;
                const double *vx = sd->vx + t * row + (int64_t)h * d, *vm = sd->vmag + t * row + (int64_t)h * d;
                for (int c = 0; c < d; c++) {
                    o[c] += w * vx[c];
                    e[c] += (w * rel + 0x1p-24 / l) * vm[c];
                }
            }
            if (emu_rot) {
                /* the CUDA kernels' value path, emulated: per 64-token
                 * chunk of a block, running max, p and p 2^S scale rounded
                 * to fp16 (S from the chunk's largest value scale), lo . p
                 * with fp16 p; window tokens in full precision */
                double *em = emu_rot + ((int64_t)i * hq + j) * d;
                double m = -INFINITY, le = 0.0;
                for (int c = 0; c < d; c++) em[c] = 0.0;
                for (int64_t t0 = 0; t0 <= last;) {
                    int64_t t1 = t0 < sd->packed ? (t0 / g->R) * g->R + (t0 % g->R / 64 + 1) * 64 : last + 1;
                    if (t0 < sd->packed && t1 > (t0 / g->R + 1) * g->R) t1 = (t0 / g->R + 1) * g->R;
                    if (t1 > last + 1) t1 = last + 1;
                    double cm = -INFINITY, msc = 0.0;
                    /* the chunk's scale exponent covers all its tokens (the
                     * kernel reads whole tiles), masked or not */
                    const int64_t tend = t0 < sd->packed ? t1 + (t1 % 16 ? 16 - t1 % 16 : 0) : t1;
                    for (int64_t t = t0; t < t1; t++) cm = fmax(cm, L2[t]);
                    for (int64_t t = t0; t < tend && t < sd->packed; t++)
                        for (int c = 0; c < d; c++) msc = fmax(msc, sd->vsc[t * row + (int64_t)h * d + c]);
                    const double mn = fmax(m, cm);
                    if (m > -INFINITY)
                        for (int c = 0; c < d; c++) em[c] *= exp2(m - mn);
                    le = (m > -INFINITY ? le * exp2(m - mn) : 0.0);
                    m = mn;
                    const int S = 14 - f16_exponent(msc) < 15 ? 14 - f16_exponent(msc) : 15;
                    for (int64_t t = t0; t < t1; t++) {
                        const double p = exp2(L2[t] - m);
                        le += p;
                        const double p16 = tl_f16_to_double(tl_f16_from_double(p));
                        for (int c = 0; c < d; c++) {
                            const int64_t at = t * row + (int64_t)h * d + c;
                            if (sd->vcode[at] < 0.0) {
                                em[c] += p * sd->vx[at];
                            } else {
                                const double pv = tl_f16_to_double(tl_f16_from_double(p16 * ldexp(1.0, S) * sd->vsc[at]));
                                em[c] += sd->vcode[at] * pv * ldexp(1.0, -S) + p16 * sd->vlo[at];
                            }
                        }
                    }
                    t0 = t1;
                }
                for (int c = 0; c < d; c++) em[c] /= le;
            }
            double *po = out + ((int64_t)i * hq + j) * d, *pe = err + ((int64_t)i * hq + j) * d;
            if (out_rot)
                for (int c = 0; c < d; c++) out_rot[((int64_t)i * hq + j) * d + c] = o[c];
            if (err_rot)
                for (int c = 0; c < d; c++) err_rot[((int64_t)i * hq + j) * d + c] = e[c];
            if (g->rotv) {
                double se = 0.0, so = 0.0;
                for (int c = 0; c < d; c++) se += e[c], so += fabs(o[c]);
                tl_hadamard_ref(o, o, d);
                const double spread = (se + log2((double)d) * 0x1p-23 * so) / sqrt((double)d);
                for (int c = 0; c < d; c++) e[c] = spread;
            }
            for (int c = 0; c < d; c++) po[c] = o[c], pe[c] = e[c];
        }
    free(L2);
    free(eps);
}

/* Compares n outputs; NaN (the poison) counts as unwritten. Returns the
 * number of elements out of bounds (unwritten included); the first is
 * described in *first (index i, decoded by the caller's shape). */
/* compare() without an output rounding (values already in double) */
#define OSCAR_DTYPE_F64_FOR_TEST ((oscar_dtype)-1)

typedef struct cmp_stats {
    int64_t bad, unwritten, first;
    double worst; /* largest |error| / allowed */
} cmp_stats;

static int64_t compare(const float *got, const double *ref, const double *err, int64_t n, oscar_dtype out_dt,
                       cmp_stats *st) {
    memset(st, 0, sizeof *st);
    st->first = -1;
    for (int64_t i = 0; i < n; i++) {
        const double x = got[i];
        if (isnan(x)) {
            st->unwritten++;
            st->bad++;
            if (st->first < 0) st->first = i;
            continue;
        }
        const double big = fmax(fabs(ref[i]), fabs(x));
        const double out_round = out_dt == OSCAR_DTYPE_F64_FOR_TEST ? 0.0
                                 : out_dt == OSCAR_DTYPE_F32     ? big * 0x1p-24
                                                                 : 0.5 * tl_ulp(out_dt, big);
        const double allowed = 1.5 * err[i] + out_round + 1e-30;
        const double r = fabs(x - ref[i]) / allowed;
        if (!(r <= 1.0)) {
            st->bad++;
            if (st->first < 0) st->first = i;
        }
        if (r > st->worst) st->worst = r;
    }
    return st->bad;
}

/* ---- building caches -------------------------------------------------------- */

typedef struct kcase {
    const char *name;
    oscar_method method;
    int bits, d, hkv, hq, layers;
    int gk, gv, R; /* 0: tl_small_config's (32, 32, 64) */
    oscar_dtype W, in, qd, od;
    int adv;
    int nseq;
    int64_t T[3];
    int q_len;
    float scale; /* 0: the default 1/sqrt(d) */
    int small;   /* in the --small set */
    int sinks;   /* config.sink_tokens (0 when not given) */
} kcase;

static oscar_config case_config(const kcase *K, oscar_backend be) {
    oscar_config cfg = tl_small_config(K->method, K->bits, K->d, K->hkv, K->hq);
    if (K->gk) cfg.k_group = K->gk;
    if (K->gv) cfg.v_group = K->gv;
    if (K->R) cfg.residual = K->R;
    cfg.num_layers = K->layers > 0 ? K->layers : 1;
    cfg.window_dtype = K->W;
    cfg.sink_tokens = K->sinks;
    int64_t blocks = 4;
    for (int s = 0; s < K->nseq; s++) blocks += K->T[s] / cfg.residual + 1;
    cfg.block_count = (int32_t)blocks;
    cfg.max_seqs = 4;
    cfg.backend = be;
    return cfg;
}

static void *to_device(const void *h, size_t bytes) {
    void *d = NULL;
    CUCHECK(cudaMalloc(&d, bytes ? bytes : 1));
    if (bytes) CUCHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}

/* n tokens (fp32 values [n][hkv][d]) encoded in dt, appended to one
 * sequence of either backend. */
static oscar_status append_tokens(oscar_cache *c, oscar_backend be, int layer, int32_t seq, const float *k,
                                  const float *v, int64_t n, int hkv, int d, oscar_dtype dt) {
    if (be == OSCAR_BACKEND_CPU) return tl_append(c, layer, seq, k, v, n, hkv, d, dt);
    const int64_t cnt = n * hkv * d;
    const size_t bytes = (size_t)cnt * (size_t)tl_dtype_size(dt);
    void *kh = malloc(bytes ? bytes : 1), *vh = malloc(bytes ? bytes : 1);
    tl_encode(k, dt, kh, cnt);
    tl_encode(v, dt, vh, cnt);
    void *kd = to_device(kh, bytes), *vd = to_device(vh, bytes);
    int32_t nt = (int32_t)n;
    oscar_status st = oscar_append(c, layer, 1, &seq, &nt, kd, vd, dt, NULL);
    CUCHECK(cudaDeviceSynchronize());
    CUCHECK(cudaFree(kd));
    CUCHECK(cudaFree(vd));
    free(kh);
    free(vh);
    return st;
}

/* Attention of n_seqs sequences on either backend, output poisoned with NaN
 * (0xff bytes in every dtype) first, decoded to fp32. */
static oscar_status run_attention(oscar_cache *c, oscar_backend be, int layer, int n_seqs, const int32_t *ids,
                                  int q_len, const float *q, oscar_dtype q_dt, oscar_dtype out_dt, float scale,
                                  float *out, int hq, int d) {
    if (be == OSCAR_BACKEND_CPU) return tl_attention(c, layer, n_seqs, ids, q_len, q, q_dt, out_dt, scale, out, hq, d);
    const int64_t cnt = (int64_t)n_seqs * q_len * hq * d;
    const size_t qb = (size_t)cnt * (size_t)tl_dtype_size(q_dt), ob = (size_t)cnt * (size_t)tl_dtype_size(out_dt);
    void *qh = malloc(qb), *oh = malloc(ob);
    tl_encode(q, q_dt, qh, cnt);
    void *qd = to_device(qh, qb), *od = NULL;
    CUCHECK(cudaMalloc(&od, ob));
    CUCHECK(cudaMemset(od, 0xff, ob));
    oscar_status st = oscar_attention(c, layer, n_seqs, ids, q_len, qd, q_dt, od, out_dt, scale, NULL);
    CUCHECK(cudaDeviceSynchronize());
    CUCHECK(cudaMemcpy(oh, od, ob, cudaMemcpyDeviceToHost));
    tl_decode(oh, out_dt, out, cnt);
    CUCHECK(cudaFree(qd));
    CUCHECK(cudaFree(od));
    free(qh);
    free(oh);
    return st;
}

/* The case's tokens, appended to every layer of each sequence: a prefill,
 * then up to 3 single tokens (so the window and packing see both). The
 * data depends only on the case name, so two backends get the same. */
static double fill_cache(const kcase *K, oscar_cache *c, oscar_backend be, int32_t *ids) {
    tl_rng r = tl_rng_for(K->name);
    const int hkv = K->hkv, d = K->d, L = K->layers > 0 ? K->layers : 1;
    double knorm = 1.0;
    for (int s = 0; s < K->nseq; s++) {
        CHECK_OK(oscar_seq_add(c, &ids[s]));
        const int64_t T = K->T[s], row = (int64_t)hkv * d;
        float *k = malloc(sizeof(float) * (size_t)(T * row + 1)), *v = malloc(sizeof(float) * (size_t)(T * row + 1));
        for (int l = 0; l < L; l++) {
            double kn = 1.0;
            gen_kv(&r, K->adv, k, v, T, hkv, d, K->in, &kn);
            if (s == 0 && l == L - 1) knorm = kn;
            const int64_t singles = T > 3 ? 3 : 0;
            oscar_status st = append_tokens(c, be, l, ids[s], k, v, T - singles, hkv, d, K->in);
            for (int64_t t = T - singles; t < T && st == OSCAR_OK; t++)
                st = append_tokens(c, be, l, ids[s], k + t * row, v + t * row, 1, hkv, d, K->in);
            CHECKF(st == OSCAR_OK, "%s: append: %s (%s)", K->name, oscar_status_name(st), oscar_last_error(c));
        }
        free(k);
        free(v);
    }
    return knorm;
}

/* ---- attention against the reference ------------------------------------------ */

static void attention_case(const kcase *K, oscar_backend be) {
    const char *bn = be == OSCAR_BACKEND_CPU ? "cpu" : "cuda";
    oscar_config cfg = case_config(K, be);
    const tl_geom g = tl_geom_of(&cfg);
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    int32_t ids[3];
    const double knorm = fill_cache(K, c, be, ids);
    const int layer = g.L - 1, hq = K->hq, d = K->d, ql = K->q_len;
    const int64_t per = (int64_t)ql * hq * d, n = per * K->nseq;
    char qname[160];
    snprintf(qname, sizeof qname, "%s: queries", K->name);
    tl_rng r = tl_rng_for(qname);
    float *q = malloc(sizeof(float) * (size_t)n), *out = malloc(sizeof(float) * (size_t)n);
    tl_gen_q(&r, q, (int64_t)K->nseq * ql, hq, d, knorm, 2.0, K->qd);
    oscar_status st = run_attention(c, be, layer, K->nseq, ids, ql, q, K->qd, K->od, K->scale, out, hq, d);
    CHECKF(st == OSCAR_OK, "%s [%s]: attention: %s (%s)", K->name, bn, oscar_status_name(st), oscar_last_error(c));
    const double scale = K->scale > 0.0f ? (double)K->scale : 1.0 / sqrt((double)d);
    double *ref = malloc(sizeof(double) * (size_t)per), *err = malloc(sizeof(double) * (size_t)per);
    double *refr = malloc(sizeof(double) * (size_t)per), *errr = malloc(sizeof(double) * (size_t)per);
    double *emu = malloc(sizeof(double) * (size_t)per);
    /* the emulation costs a conversion per (row, token, channel): on the CPU
     * pass only, and not at q_len 4096 */
    const int emulate = be == OSCAR_BACKEND_CPU && ql <= 64 && K->sinks == 0; /* it assumes blocks from token 0 */
    float *gotr = malloc(sizeof(float) * (size_t)per);
    for (int s = 0; s < K->nseq && st == OSCAR_OK; s++) {
        size_t size = 0;
        unsigned char *buf = tl_export(c, ids[s], &size);
        seqdata sd;
        if (buf && read_stream(&g, buf, size, layer, &sd)) {
            CHECKF(sd.T == K->T[s], "%s [%s]: the stream holds %lld tokens, appended %lld", K->name, bn,
                   (long long)sd.T, (long long)K->T[s]);
            ref_attention(&g, &sd, ql, q + s * per, scale, 0, ref, err, refr, errr,
                          emulate ? emu : NULL);
            if (emulate) {
                /* the bound must cover the kernel's fp16 value path alone
                 * without its 1.5x margin (emulated in float64) */
                double wr = 0.0;
                int64_t wi = 0;
                for (int64_t i = 0; i < per; i++) {
                    const double r_ = fabs(emu[i] - refr[i]) / (errr[i] + 1e-300);
                    if (!(r_ <= wr)) wr = r_, wi = i;
                }
                CHECKF(wr <= 1.0, "%s seq %d: the emulated fp16 value path is %.3g x its bound at element %lld (%.9g vs %.9g, bound %.3g)",
                       K->name, s, wr, (long long)wi, emu[wi], refr[wi], errr[wi]);
                if (wr > g_worst_emu) g_worst_emu = wr;
            }
            cmp_stats cs;
            compare(out + s * per, ref, err, per, K->od, &cs);
            if (cs.first >= 0) {
                const int64_t i = cs.first;
                const int c_ = (int)(i % d), j = (int)(i / d % hq), qi = (int)(i / d / hq);
                CHECKF(0, "%s [%s] seq %d: %lld of %lld outputs out of bounds (%lld unwritten); first: query %d of %d, "
                          "head %d, channel %d: got %.9g, reference %.9g, bound %.3g",
                       K->name, bn, s, (long long)cs.bad, (long long)per, (long long)cs.unwritten, qi, ql, j, c_,
                       (double)out[s * per + i], ref[i], 1.5 * err[i]);
            }
            if (g.rotv && K->od == OSCAR_DTYPE_F32 && cs.bad == 0) {
                /* o' = H o of the kernel's output, per element against e',
                 * plus the fp32 rotation and output rounding spread back */
                double v[256];
                for (int64_t row = 0; row < per / d; row++) {
                    double so = 0.0;
                    for (int c_ = 0; c_ < d; c_++) v[c_] = out[s * per + row * d + c_], so += fabs(v[c_]);
                    tl_hadamard_ref(v, v, d);
                    const double extra = (log2((double)d) + 1.0) * 0x1p-23 * so / sqrt((double)d);
                    for (int c_ = 0; c_ < d; c_++) {
                        gotr[row * d + c_] = (float)v[c_];
                        errr[row * d + c_] += extra / 1.5 + fabs(v[c_] - (double)(float)v[c_]) / 1.5;
                    }
                }
                cmp_stats cr;
                compare(gotr, refr, errr, per, OSCAR_DTYPE_F64_FOR_TEST, &cr);
                if (cr.first >= 0) {
                    const int64_t i = cr.first;
                    CHECKF(0, "%s [%s] seq %d: rotated back, %lld of %lld outputs out of bounds; first: query %d head %d "
                              "channel %d of o': got %.9g, reference %.9g, bound %.3g",
                           K->name, bn, s, (long long)cr.bad, (long long)per, (int)(i / d / hq), (int)(i / d % hq),
                           (int)(i % d), (double)gotr[i], refr[i], 1.5 * errr[i]);
                }
                if (cr.worst > cs.worst) cs.worst = cr.worst;
            }
            const int bi = be == OSCAR_BACKEND_CPU ? 0 : 1;
            if (cs.worst > g_worst_ratio[bi]) g_worst_ratio[bi] = cs.worst;
            printf("  %-58s %-4s seq %d T %5lld (%s): worst |err|/bound %.3f\n", K->name, bn, s,
                   (long long)K->T[s], adv_name(K->adv), cs.worst);
            seqdata_free(&sd);
        }
        free(buf);
    }
    free(q), free(out), free(ref), free(err), free(refr), free(errr), free(gotr), free(emu);
    oscar_cache_destroy(c);
}

/* ---- pack: CUDA against CPU, bit for bit ------------------------------------- */

typedef struct pack_stats {
    int64_t codes, code_diff, params, param_diff, norms, norm_diff, win_bytes, win_diff;
    char first[320];
} pack_stats;

static void first_diff(pack_stats *ps, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void first_diff(pack_stats *ps, const char *fmt, ...) {
    if (ps->first[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->first, sizeof ps->first, fmt, ap);
    va_end(ap);
}

/* Compares two streams of one configuration field by field: a = the
 * reference (CPU), b = the kernel's (CUDA). */
static void compare_streams(const tl_geom *g, const unsigned char *a, size_t na, const unsigned char *b, size_t nb,
                            pack_stats *ps) {
    memset(ps, 0, sizeof *ps);
    if (na != nb) {
        first_diff(ps, "stream sizes %zu vs %zu", na, nb);
        ps->win_diff++;
        return;
    }
    const size_t hdr = 80 + 16 * (size_t)g->L;
    for (size_t i = 0; i < hdr; i++)
        if (a[i] != b[i]) {
            first_diff(ps, "header byte %zu: %u vs %u", i, a[i], b[i]);
            ps->win_diff++;
        }
    const uint32_t n_blocks = tl_rd32(a + 52);
    const int d = g->d, R = g->R;
    uint8_t *ca = malloc((size_t)R * d), *cb = malloc((size_t)R * d);
    for (uint32_t i = 0; i < n_blocks; i++)
        for (int l = 0; l < g->L; l++) {
            if ((int64_t)i >= (int64_t)tl_rd64(a + 80 + 16 * (size_t)l + 8)) continue;
            const size_t off = hdr + ((size_t)i * g->L + l) * g->LB;
            const unsigned char *x = a + off, *y = b + off;
            if (!g->quant) {
                for (size_t j = 0; j < g->LB; j++)
                    if (x[j] != y[j]) {
                        first_diff(ps, "block %u layer %d: byte %zu", i, l, j);
                        ps->code_diff++;
                    }
                ps->codes += (int64_t)g->LB;
                continue;
            }
            for (int h = 0; h < g->hkv; h++) {
                const unsigned char *hx = x + (size_t)h * g->head_bytes, *hy = y + (size_t)h * g->head_bytes;
                for (int isv = 0; isv < 2; isv++) {
                    tl_decode_codes(hx + isv * g->codes_bytes, R, d, g->bits, isv, ca);
                    tl_decode_codes(hy + isv * g->codes_bytes, R, d, g->bits, isv, cb);
                    for (int j = 0; j < R * d; j++)
                        if (ca[j] != cb[j]) {
                            first_diff(ps, "block %u layer %d head %d %s code of token %d channel %d: cpu %d cuda %d", i,
                                       l, h, isv ? "V" : "K", j / d, j % d, ca[j], cb[j]);
                            ps->code_diff++;
                        }
                    ps->codes += (int64_t)R * d;
                }
                const size_t nk = g->kparams_bytes / 2, nv = g->vparams_bytes / 2;
                const unsigned char *px = hx + 2 * g->codes_bytes, *py = hy + 2 * g->codes_bytes;
                for (size_t j = 0; j < nk + nv; j++) {
                    const uint16_t u = rd16(px + 2 * j), w = rd16(py + 2 * j);
                    if (u != w) {
                        if (j < nk)
                            first_diff(ps, "block %u layer %d head %d K %s of token group %zu channel %zu: cpu 0x%04x cuda 0x%04x",
                                       i, l, h, j % 2 ? "lo" : "scale", j / 2 / d, j / 2 % d, u, w);
                        else
                            first_diff(ps, "block %u layer %d head %d V %s of token %zu channel group %zu: cpu 0x%04x cuda 0x%04x",
                                       i, l, h, (j - nk) % 2 ? "lo" : "scale", (j - nk) / 2 / (d / g->gv),
                                       (j - nk) / 2 % (d / g->gv), u, w);
                        ps->param_diff++;
                    }
                }
                ps->params += (int64_t)(nk + nv);
            }
            if (g->scale) {
                const unsigned char *sx = x + (size_t)g->hkv * g->head_bytes, *sy = y + (size_t)g->hkv * g->head_bytes;
                for (int t = 0; t < R; t++)
                    if (memcmp(sx + 4 * t, sy + 4 * t, 4) != 0) {
                        first_diff(ps, "block %u layer %d token norm %d: cpu %.9g cuda %.9g", i, l, t, rdf32(sx + 4 * t),
                                   rdf32(sy + 4 * t));
                        ps->norm_diff++;
                    }
                ps->norms += R;
            }
        }
    free(ca);
    free(cb);
    const size_t ws = hdr + (size_t)n_blocks * g->L * g->LB;
    for (size_t j = ws; j + 8 < na; j++) {
        if (a[j] != b[j]) {
            first_diff(ps, "window byte %zu (of %zu after the blocks)", j - ws, na - 8 - ws);
            ps->win_diff++;
        }
        ps->win_bytes++;
    }
}

static int pack_ok(const pack_stats *ps) {
    return ps->code_diff == 0 && ps->param_diff == 0 && ps->norm_diff == 0 && ps->win_diff == 0;
}

static void pack_case(const kcase *K) {
    oscar_config cc = case_config(K, OSCAR_BACKEND_CPU), cg = case_config(K, OSCAR_BACKEND_CUDA);
    const tl_geom g = tl_geom_of(&cc);
    oscar_cache *a = tl_create(&cc), *b = tl_create(&cg);
    if (a && b) {
        int32_t ia[3], ib[3];
        fill_cache(K, a, OSCAR_BACKEND_CPU, ia);
        fill_cache(K, b, OSCAR_BACKEND_CUDA, ib);
        for (int s = 0; s < K->nseq; s++) {
            size_t na = 0, nb = 0;
            unsigned char *x = tl_export(a, ia[s], &na), *y = tl_export(b, ib[s], &nb);
            if (x && y) {
                pack_stats ps;
                compare_streams(&g, x, na, y, nb, &ps);
                CHECKF(pack_ok(&ps),
                       "%s seq %d pack: %lld of %lld codes, %lld of %lld (scale, lo) halves, %lld of %lld norms, "
                       "%lld of %lld window bytes differ; first: %s",
                       K->name, s, (long long)ps.code_diff, (long long)ps.codes, (long long)ps.param_diff,
                       (long long)ps.params, (long long)ps.norm_diff, (long long)ps.norms, (long long)ps.win_diff,
                       (long long)ps.win_bytes, ps.first);
                printf("  %-58s pack seq %d: %lld codes, %lld params, %lld norms compared, %s\n", K->name, s,
                       (long long)ps.codes, (long long)ps.params, (long long)ps.norms,
                       pack_ok(&ps) ? "identical" : "DIFFERENT");
            }
            free(x);
            free(y);
        }
    }
    oscar_cache_destroy(a);
    oscar_cache_destroy(b);
}

/* ---- the cases -------------------------------------------------------------------- */

#define F16 OSCAR_DTYPE_F16
#define BF16 OSCAR_DTYPE_BF16
#define F32 OSCAR_DTYPE_F32

static const kcase g_cases[] = {
    /* name, method, bits, d, hkv, hq, layers, gk, gv, R, W, in, q, out, adv, nseq, T, q_len, scale, small, sinks */
    {"oscar b2 d128 g4 q1 sinks (fast kernel)", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 1, 0, 0, 0, F16, BF16, BF16, BF16,
     ADV_SINKS, 2, {229, 517}, 1, 0.0f, 1, 0},
    {"oscar b2 d128 g4 q7 outliers, 2 layers", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 2, 0, 0, 0, F16, F16, F32, F32,
     ADV_OUTLIERS, 2, {301, 130}, 7, 0.0f, 1, 0},
    {"oscar b2 d128 g4 q64 const", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 1, 0, 0, 0, BF16, BF16, BF16, F16, ADV_CONST, 1,
     {333}, 64, 0.0f, 0, 0},
    {"oscar b2 d64 g2 q4096 normal", OSCAR_METHOD_OSCAR, 2, 64, 1, 2, 1, 0, 0, 0, BF16, BF16, BF16, F32, ADV_NORMAL, 1,
     {4429}, 4096, 0.0f, 0, 0},
    {"kivi b2 d256 g2 q1 huge", OSCAR_METHOD_KIVI, 2, 256, 2, 4, 1, 0, 0, 0, F32, F32, F32, F32, ADV_HUGE, 2,
     {200, 77}, 1, 0.0f, 0, 0},
    {"quarot b4 d128 g4 q7 sinks", OSCAR_METHOD_QUAROT, 4, 128, 2, 8, 1, 0, 0, 0, BF16, BF16, BF16, BF16, ADV_SINKS, 1,
     {190}, 7, 0.0f, 0, 0},
    {"scale-only b2 d64 g2 q1 outliers", OSCAR_METHOD_SCALE_ONLY, 2, 64, 4, 8, 1, 0, 0, 0, F16, F16, F16, F16,
     ADV_OUTLIERS, 3, {150, 64, 65}, 1, 0.0f, 0, 0},
    {"none d128 g4 q7 (dense path)", OSCAR_METHOD_NONE, 2, 128, 2, 8, 1, 0, 0, 0, BF16, BF16, F32, F32, ADV_SINKS, 1,
     {200}, 7, 0.0f, 1, 0},
    {"oscar b2 d256 g8 q1 zero-keys", OSCAR_METHOD_OSCAR, 2, 256, 1, 8, 1, 0, 0, 0, F16, F16, F32, F32, ADV_ZERO, 1,
     {300}, 1, 0.0f, 0, 0},
    {"oscar b2 d128 gk16 gv16 R48 q3 sinks", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 1, 16, 16, 48, F16, F16, F16, F16,
     ADV_SINKS, 1, {200}, 3, 0.0f, 1, 0},
    {"oscar b2 d128 g4 q1 R96 (32-token chunks)", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 1, 0, 0, 96, F16, BF16, BF16, F32,
     ADV_OUTLIERS, 1, {293}, 1, 0.0f, 1, 0},
    {"oscar b2 d128 g4 q1 window only", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 1, 0, 0, 0, F16, F16, F16, F16, ADV_NORMAL, 1,
     {40}, 1, 0.0f, 0, 0},
    {"oscar b4 d64 g2 q64 const, scale 0.3", OSCAR_METHOD_OSCAR, 4, 64, 2, 4, 1, 0, 0, 0, F16, F16, F32, BF16,
     ADV_CONST, 1, {500}, 64, 0.3f, 0, 0},
    {"oscar b2 d128 hkv8 hq32 q1 normal", OSCAR_METHOD_OSCAR, 2, 128, 8, 32, 1, 0, 0, 128, BF16, BF16, BF16, BF16,
     ADV_NORMAL, 1, {1000}, 1, 0.0f, 0, 0},
    /* sink tokens (last field): sink rows, then blocks from token S, then the
     * window; prompts shorter than S, and query chunks over all three */
    {"oscar b2 d128 g4 q1 S32 (fast kernel, sink rows)", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 1, 0, 0, 0, F16, BF16, BF16,
     BF16, ADV_SINKS, 3, {229, 20, 32}, 1, 0.0f, 1, 32},
    {"oscar b2 d64 g2 q140 S7 (queries over sinks, blocks, window)", OSCAR_METHOD_OSCAR, 2, 64, 1, 2, 1, 0, 0, 0, F16,
     F16, F32, F32, ADV_SINKS, 1, {140}, 140, 0.0f, 1, 7},
    {"oscar b2 d128 g4 q7 S64 R32, 2 layers", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 2, 0, 0, 32, BF16, BF16, BF16, F32,
     ADV_OUTLIERS, 2, {300, 9}, 7, 0.0f, 0, 64},
    {"kivi b4 d128 g4 q3 S1", OSCAR_METHOD_KIVI, 4, 128, 2, 8, 1, 0, 0, 0, F16, F32, F32, F32, ADV_NORMAL, 1, {150}, 3,
     0.0f, 0, 1},
    {"none d128 g4 q7 S5 (dense path)", OSCAR_METHOD_NONE, 2, 128, 2, 8, 1, 0, 0, 0, BF16, BF16, F32, F32, ADV_SINKS, 2,
     {200, 6}, 6, 0.0f, 1, 5},
};
#define N_CASES ((int)(sizeof g_cases / sizeof g_cases[0]))

static void run_cases(oscar_backend be) {
    for (int i = 0; i < N_CASES; i++) {
        if (g_small && !g_cases[i].small) continue;
        attention_case(&g_cases[i], be);
    }
}

static void test_attention_cpu(void) { run_cases(OSCAR_BACKEND_CPU); }
static void test_attention_cuda(void) { run_cases(OSCAR_BACKEND_CUDA); }

static void test_pack_cuda(void) {
    for (int i = 0; i < N_CASES; i++) {
        if (g_small && !g_cases[i].small) continue;
        pack_case(&g_cases[i]);
    }
}

/* ---- the comparison can fail ----------------------------------------------------- */

/* On one CPU case: the reference and the comparison must reject a flipped
 * sign, an element nudged past its bound, an unwritten element, a causal
 * limit one token off, and a stream with one code changed. */
static void test_self(void) {
    /* scale-only: quantised with token norms, no rotation, so each
     * element's bound is its own (no H o' spread) */
    const kcase K = {"self-test scale-only b2 d64 q3", OSCAR_METHOD_SCALE_ONLY, 2, 64, 1, 2, 1, 0, 0, 0, F16, F16, F32,
                     F32, ADV_NORMAL, 1, {150}, 3, 0.0f, 1, 0};
    oscar_config cfg = case_config(&K, OSCAR_BACKEND_CPU);
    const tl_geom g = tl_geom_of(&cfg);
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    int32_t id;
    const double knorm = fill_cache(&K, c, OSCAR_BACKEND_CPU, &id);
    const int hq = K.hq, d = K.d, ql = K.q_len;
    const int64_t n = (int64_t)ql * hq * d;
    tl_rng r = tl_rng_for("self-test queries");
    float *q = malloc(sizeof(float) * n), *out = malloc(sizeof(float) * n), *bad = malloc(sizeof(float) * n);
    double *ref = malloc(sizeof(double) * n), *err = malloc(sizeof(double) * n);
    tl_gen_q(&r, q, ql, hq, d, knorm, 2.0, K.qd);
    CHECK_OK(run_attention(c, OSCAR_BACKEND_CPU, 0, 1, &id, ql, q, K.qd, K.od, 0.0f, out, hq, d));
    size_t size = 0;
    unsigned char *buf = tl_export(c, id, &size);
    seqdata sd;
    cmp_stats cs = {0, 0, 0, 0.0};
    if (buf && read_stream(&g, buf, size, 0, &sd)) {
        const double scale = 1.0 / sqrt((double)d);
        ref_attention(&g, &sd, ql, q, scale, 0, ref, err, NULL, NULL, NULL);
        CHECKF(compare(out, ref, err, n, K.od, &cs) == 0, "self-test: the unmodified output fails (%lld)",
               (long long)cs.bad);
        /* the bound is not vacuous: a few % of the output at most */
        double rmax = 0.0, emax = 0.0;
        for (int64_t i = 0; i < n; i++) rmax = fmax(rmax, fabs(ref[i])), emax = fmax(emax, 1.5 * err[i]);
        CHECKF(emax < 0.05 * rmax, "self-test: the bound %.3g is not small against the output %.3g", emax, rmax);
        int64_t at = 0; /* the largest output: its sign flip is far outside any bound */
        for (int64_t i = 0; i < n; i++)
            if (fabs(ref[i]) > fabs(ref[at])) at = i;
        memcpy(bad, out, sizeof(float) * n);
        bad[at] = -bad[at];
        CHECKF(compare(bad, ref, err, n, K.od, &cs) == 1 && cs.first == at, "self-test: a flipped sign is not caught");
        memcpy(bad, out, sizeof(float) * n);
        bad[at] = (float)(ref[at] + 3.0 * 1.5 * err[at] + 1e-6 * fabs(ref[at]));
        CHECKF(compare(bad, ref, err, n, K.od, &cs) == 1 && cs.first == at,
               "self-test: an element 3x past its bound is not caught");
        memcpy(bad, out, sizeof(float) * n);
        bad[7] = NAN;
        CHECKF(compare(bad, ref, err, n, K.od, &cs) == 1 && cs.unwritten == 1, "self-test: an unwritten element is not caught");
        /* the reference with the causal limit one token later: the first
         * query rows (which do not see the last tokens) must differ */
        ref_attention(&g, &sd, ql, q, scale, 1, ref, err, NULL, NULL, NULL);
        CHECKF(compare(out, ref, err, n, K.od, &cs) > 0, "self-test: a causal limit one token off is not caught");
        /* a sign flipped in the reference's softmax scale */
        ref_attention(&g, &sd, ql, q, -scale, 0, ref, err, NULL, NULL, NULL);
        CHECKF(compare(out, ref, err, n, K.od, &cs) > n / 2, "self-test: a flipped logit sign is not caught (%lld)",
               (long long)cs.bad);
        seqdata_free(&sd);
        /* the pack comparison: the stream against itself, then with one
         * code changed (token 5 of block 0, channel 3, K) */
        pack_stats ps;
        compare_streams(&g, buf, size, buf, size, &ps);
        CHECKF(pack_ok(&ps) && ps.codes > 0, "self-test: a stream differs from itself");
        unsigned char *mut = malloc(size);
        memcpy(mut, buf, size);
        const size_t hdr = 80 + 16 * (size_t)g.L;
        uint8_t *codes = malloc((size_t)g.R * d);
        tl_decode_codes(mut + hdr, g.R, d, g.bits, 0, codes);
        codes[5 * d + 3] ^= 1;
        tl_encode_codes(codes, g.R, d, g.bits, 0, mut + hdr);
        compare_streams(&g, buf, size, mut, size, &ps);
        CHECKF(ps.code_diff == 1 && strstr(ps.first, "K code of token 5 channel 3") != NULL,
               "self-test: one changed code is reported as %lld (%s)", (long long)ps.code_diff, ps.first);
        mut[size - 20] ^= 0x40; /* a window byte */
        compare_streams(&g, buf, size, mut, size, &ps);
        CHECKF(ps.win_diff == 1, "self-test: one changed window byte is reported as %lld", (long long)ps.win_diff);
        free(codes);
        free(mut);
    }
    free(buf);
    free(q), free(out), free(bad), free(ref), free(err);
    oscar_cache_destroy(c);
}

int main(int argc, char **argv) {
    int cpu_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--small")) g_small = 1;
        else if (!strcmp(argv[i], "--cpu")) cpu_only = 1;
        else { fprintf(stderr, "usage: test_kernels [--small] [--cpu]\n"); return 2; }
    }
    /* --cpu: the self-test and the CPU backend only, a pass (not a skip) without a GPU:
     * ctest's test_kernels_cpu, so CI runs the comparison itself. */
    g_have_gpu = !cpu_only && oscar_backend_available(OSCAR_BACKEND_CUDA);
    TL_RUN(test_self);
    TL_RUN(test_attention_cpu);
    if (g_have_gpu) {
        TL_RUN(test_pack_cuda);
        TL_RUN(test_attention_cuda);
    }
    printf("worst |error| / bound: cpu %.3f, cuda %s%.3f; the emulated fp16 value path: %.3f of the bound\n",
           g_worst_ratio[0], g_have_gpu ? "" : "(not run) ", g_worst_ratio[1], g_worst_emu);
    const int rc = tl_finish();
    if (rc == 0 && !g_have_gpu && !cpu_only) {
        printf("SKIPPED: no CUDA device (the CPU backend and the self-test passed)\n");
        return 77;
    }
    return rc;
}
