/* testlib.c - see testlib.h. */
#if defined(__GNUC__) && !defined(__clang__)
/* The float64 reference is the hot part of the suite; keep it reasonably
 * fast in the -O0 sanitizer build too (instrumentation stays on). */
#pragma GCC optimize("O2")
#endif
#include "testlib.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- framework ------------------------------------------------------- */

long tl_passed, tl_failed;
const char *tl_current = "";
static long tl_printed;
#define TL_MAX_PRINTED 60

int tl_check(int ok, const char *file, int line, const char *fmt, ...) {
    if (ok) {
        tl_passed++;
        return 1;
    }
    tl_failed++;
    if (tl_printed < TL_MAX_PRINTED) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stdout, "FAIL %s:%d [%s]: ", file, line, tl_current);
        vfprintf(stdout, fmt, ap);
        fputc('\n', stdout);
        va_end(ap);
        fflush(stdout);
    } else if (tl_printed == TL_MAX_PRINTED) {
        fprintf(stdout, "(further failures are counted but not printed)\n");
    }
    tl_printed++;
    return 0;
}

int tl_check_status(const oscar_cache *cache, oscar_status got, oscar_status want,
                    const char *file, int line, const char *expr) {
    if (got != want) {
        return tl_check(0, file, line, "%s returned %s, expected %s (last error: \"%s\")", expr,
                        oscar_status_name(got), oscar_status_name(want),
                        cache ? oscar_last_error(cache) : "-");
    }
    if (want != OSCAR_OK && cache) {
        const char *msg = oscar_last_error(cache);
        return tl_check(msg != NULL && msg[0] != '\0', file, line,
                        "%s failed with %s but oscar_last_error is empty", expr,
                        oscar_status_name(got));
    }
    return tl_check(1, file, line, "%s", expr);
}

static double tl_now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void tl_run(const char *name, void (*fn)(void)) {
    long f0 = tl_failed, p0 = tl_passed;
    double t0 = tl_now();
    tl_current = name;
    printf("== %s\n", name);
    fflush(stdout);
    fn();
    printf("   %s: %ld checks, %ld failed (%.2f s)\n", name, (tl_passed - p0) + (tl_failed - f0),
           tl_failed - f0, tl_now() - t0);
    fflush(stdout);
    tl_current = "";
}

static double *tl_hmat[3];

int tl_finish(void) {
    for (int i = 0; i < 3; i++) {
        free(tl_hmat[i]);
        tl_hmat[i] = NULL;
    }
    printf("%ld passed, %ld failed\n", tl_passed, tl_failed);
    fflush(stdout);
    return tl_failed ? 1 : 0;
}

/* ---- random numbers -------------------------------------------------- */

uint64_t tl_next(tl_rng *r) {
    /* splitmix64 */
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

tl_rng tl_rng_seeded(uint64_t seed) {
    tl_rng r;
    r.s = seed;
    return r;
}

tl_rng tl_rng_for(const char *name) {
    uint64_t seed = tl_fnv1a(name, strlen(name));
    const char *env = getenv("OSCAR_TEST_SEED");
    if (env && *env) seed ^= strtoull(env, NULL, 0) * 0x9e3779b97f4a7c15ull;
    printf("   seed(%s) = 0x%016llx%s\n", name, (unsigned long long)seed,
           env && *env ? " (OSCAR_TEST_SEED)" : "");
    return tl_rng_seeded(seed);
}

double tl_uniform(tl_rng *r) { return (double)(tl_next(r) >> 11) * (1.0 / 9007199254740992.0); }

double tl_normal(tl_rng *r) {
    double u1 = tl_uniform(r), u2 = tl_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

int tl_randint(tl_rng *r, int lo, int hi) {
    return lo + (int)(tl_next(r) % (uint64_t)(hi - lo + 1));
}

void tl_fill_normal(tl_rng *r, float *x, int64_t n, double sigma) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)(sigma * tl_normal(r));
}

const char *tl_flavor_name(int flavor) {
    static const char *names[] = {"normal", "sinks", "outliers", "const", "zero", "huge"};
    return flavor >= 0 && flavor < TL_FLAVORS ? names[flavor] : "?";
}

void tl_gen_kv(tl_rng *r, int flavor, float *k, float *v, int64_t T, int hkv, int d, oscar_dtype in) {
    const int64_t row = (int64_t)hkv * d;
    double *off = malloc(sizeof(double) * (size_t)row);
    double *kmul = malloc(sizeof(double) * (size_t)row);
    double *vmul = malloc(sizeof(double) * (size_t)row);
    for (int64_t i = 0; i < row; i++) {
        off[i] = 0.5 * tl_normal(r);
        kmul[i] = vmul[i] = 1.0;
    }
    if (flavor == TL_FLAVOR_OUTLIERS)
        for (int h = 0; h < hkv; h++)
            for (int n = 0; n < 3; n++) {
                int c = tl_randint(r, 0, d - 1);
                kmul[h * d + c] = 10.0 + 10.0 * tl_uniform(r);
                vmul[h * d + tl_randint(r, 0, d - 1)] = 5.0;
            }
    for (int64_t t = 0; t < T; t++) {
        double tok = 1.0;
        if (flavor == TL_FLAVOR_SINKS && (t == 0 || tl_uniform(r) < 0.04)) tok = 0.05;
        int zero = flavor == TL_FLAVOR_ZERO && (t == 1 || tl_uniform(r) < 0.1);
        for (int64_t i = 0; i < row; i++) {
            double kv = tok * kmul[i] * (off[i] + tl_normal(r));
            double vv = vmul[i] * tl_normal(r);
            int c = (int)(i % d);
            if (flavor == TL_FLAVOR_CONST) {
                if (c % 2 == 0) kv = off[i] * 4.0;
                if (c < d / 2) vv = off[i - c] * 3.0 + 0.25;
            }
            if (flavor == TL_FLAVOR_HUGE) {
                kv = 20000.0 * tl_normal(r);
                vv = 20000.0 * tl_normal(r);
                if (kv > 60000.0) kv = 60000.0;
                if (kv < -60000.0) kv = -60000.0;
                if (vv > 60000.0) vv = 60000.0;
                if (vv < -60000.0) vv = -60000.0;
            }
            if (zero) kv = 0.0;
            k[t * row + i] = (float)tl_round_dtype(in, kv);
            v[t * row + i] = (float)tl_round_dtype(in, vv);
        }
    }
    free(off);
    free(kmul);
    free(vmul);
}

double tl_key_rms_norm(const float *k, int64_t T, int hkv, int d) {
    double acc = 0.0;
    for (int64_t i = 0; i < T * hkv * d; i++) acc += (double)k[i] * k[i];
    return T > 0 ? sqrt(acc / (double)(T * hkv)) : 1.0;
}

void tl_gen_q(tl_rng *r, float *q, int64_t n, int hq, int d, double key_norm, double logit_std,
              oscar_dtype dt) {
    if (!(key_norm > 0)) key_norm = 1.0;
    double sigma = logit_std * sqrt((double)d) / key_norm;
    for (int64_t i = 0; i < n * hq * d; i++) q[i] = (float)tl_round_dtype(dt, sigma * tl_normal(r));
}

/* ---- scalar conversions ------------------------------------------------ */

/* Rounds |x| (finite, > 0) to a binary format with `mant` stored mantissa
 * bits and minimum normal exponent emin; returns the rounded value. */
static double tl_round_format(double a, int mant, int emin) {
    int e;
    frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) -> leading bit 2^(e-1) */
    int lead = e - 1;
    if (lead < emin) lead = emin;
    double quantum = ldexp(1.0, lead - mant);
    double q = a / quantum; /* exact: power-of-two scaling */
    return rint(q) * quantum; /* rint: ties to even in the default mode */
}

uint16_t tl_f16_from_double(double x) {
    uint16_t sign = signbit(x) ? 0x8000u : 0u;
    if (isnan(x)) return (uint16_t)(sign | 0x7e00u);
    double a = fabs(x);
    if (a == 0.0) return sign;
    double r = a > 1e6 ? 65536.0 : tl_round_format(a, 10, -14);
    if (r > 65504.0) return (uint16_t)(sign | 0x7bffu); /* saturate */
    if (r < ldexp(1.0, -14)) {
        /* subnormal (or rounds up to the smallest normal: 1024 = 0x400) */
        return (uint16_t)(sign | (uint16_t)(r * 16777216.0));
    }
    int e;
    frexp(r, &e);
    int lead = e - 1;
    uint32_t m = (uint32_t)(r / ldexp(1.0, lead - 10)) - 1024u;
    return (uint16_t)(sign | (uint16_t)((uint32_t)(lead + 15) << 10) | (uint16_t)m);
}

double tl_f16_to_double(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double s = (h & 0x8000u) ? -1.0 : 1.0;
    if (e == 0) return s * ldexp((double)m, -24);
    if (e == 31) return m ? NAN : s * INFINITY;
    return s * ldexp((double)(m + 1024), e - 25);
}

uint16_t tl_bf16_from_double(double x) {
    uint16_t sign = signbit(x) ? 0x8000u : 0u;
    if (isnan(x)) return (uint16_t)(sign | 0x7fc0u);
    double a = fabs(x);
    if (a == 0.0) return sign;
    if (isinf(a)) return (uint16_t)(sign | 0x7f80u);
    double r = tl_round_format(a, 7, -126);
    if (r >= ldexp(1.0, 128)) return (uint16_t)(sign | 0x7f80u);
    if (r < ldexp(1.0, -126)) return (uint16_t)(sign | (uint16_t)(r / ldexp(1.0, -133)));
    int e;
    frexp(r, &e);
    int lead = e - 1;
    uint32_t m = (uint32_t)(r / ldexp(1.0, lead - 7)) - 128u;
    return (uint16_t)(sign | (uint16_t)((uint32_t)(lead + 127) << 7) | (uint16_t)m);
}

double tl_bf16_to_double(uint16_t h) {
    int e = (h >> 7) & 255, m = h & 127;
    double s = (h & 0x8000u) ? -1.0 : 1.0;
    if (e == 0) return s * ldexp((double)m, -133);
    if (e == 255) return m ? NAN : s * INFINITY;
    return s * ldexp((double)(m + 128), e - 134);
}

double tl_round_dtype(oscar_dtype dt, double x) {
    switch (dt) {
    case OSCAR_DTYPE_F16: return tl_f16_to_double(tl_f16_from_double(x));
    case OSCAR_DTYPE_BF16: return tl_bf16_to_double(tl_bf16_from_double(x));
    default: return (double)(float)x;
    }
}

double tl_ulp(oscar_dtype dt, double x) {
    int mant = dt == OSCAR_DTYPE_F16 ? 10 : dt == OSCAR_DTYPE_BF16 ? 7 : 23;
    int emin = dt == OSCAR_DTYPE_F16 ? -14 : -126;
    double a = fabs(x);
    int lead = emin;
    if (a > 0) {
        int e;
        frexp(a, &e);
        lead = e - 1 < emin ? emin : e - 1;
    }
    return ldexp(1.0, lead - mant);
}

int tl_dtype_size(oscar_dtype dt) { return dt == OSCAR_DTYPE_F32 ? 4 : 2; }

const char *tl_dtype_name(oscar_dtype dt) {
    return dt == OSCAR_DTYPE_F32 ? "f32" : dt == OSCAR_DTYPE_F16 ? "f16" : "bf16";
}

void tl_encode(const float *src, oscar_dtype dt, void *dst, int64_t n) {
    if (dt == OSCAR_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; i++)
        d[i] = dt == OSCAR_DTYPE_F16 ? tl_f16_from_double(src[i]) : tl_bf16_from_double(src[i]);
}

void tl_decode(const void *src, oscar_dtype dt, float *dst, int64_t n) {
    if (dt == OSCAR_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = (float)(dt == OSCAR_DTYPE_F16 ? tl_f16_to_double(s[i]) : tl_bf16_to_double(s[i]));
}

void tl_round_array(oscar_dtype dt, float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)tl_round_dtype(dt, x[i]);
}

/* ---- reference Hadamard ------------------------------------------------ */

static int tl_popcount(unsigned v) {
    int c = 0;
    while (v) {
        v &= v - 1;
        c++;
    }
    return c;
}

/* Cached matrices for the head sizes (built from the definition). */

static const double *tl_hadamard_matrix(int n) {
    int idx = n == 64 ? 0 : n == 128 ? 1 : n == 256 ? 2 : -1;
    if (idx < 0) return NULL;
    if (!tl_hmat[idx]) {
        double *m = malloc(sizeof(double) * (size_t)n * n);
        double norm = 1.0 / sqrt((double)n);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) m[i * n + j] = (tl_popcount((unsigned)(i & j)) & 1) ? -norm : norm;
        tl_hmat[idx] = m;
    }
    return tl_hmat[idx];
}

void tl_hadamard_ref(const double *x, double *y, int n) {
    double tmp[4096];
    double norm = 1.0 / sqrt((double)n);
    const double *m = tl_hadamard_matrix(n);
    if (m) {
        for (int i = 0; i < n; i++) {
            const double *row = m + (size_t)i * n;
            double acc = 0.0;
            for (int j = 0; j < n; j++) acc += row[j] * x[j];
            tmp[i] = acc;
        }
        memcpy(y, tmp, sizeof(double) * (size_t)n);
        return;
    }
    for (int i = 0; i < n; i++) {
        double acc = 0.0;
        for (int j = 0; j < n; j++) acc += (tl_popcount((unsigned)(i & j)) & 1) ? -x[j] : x[j];
        tmp[i] = acc * norm;
    }
    memcpy(y, tmp, sizeof(double) * (size_t)n);
}

/* ---- geometry ---------------------------------------------------------- */

tl_geom tl_geom_of(const oscar_config *cfg) {
    tl_geom g;
    memset(&g, 0, sizeof g);
    g.cfg = *cfg;
    g.d = cfg->head_dim;
    g.hkv = cfg->num_kv_heads;
    g.hq = cfg->num_q_heads;
    g.L = cfg->num_layers;
    g.R = cfg->residual;
    g.gk = cfg->k_group;
    g.gv = cfg->v_group;
    g.W = cfg->window_dtype;
    g.w = tl_dtype_size(g.W);
    g.quant = cfg->method != OSCAR_METHOD_NONE;
    g.rot = cfg->method == OSCAR_METHOD_QUAROT || cfg->method == OSCAR_METHOD_OSCAR;
    g.rotv = g.rot && cfg->rotate_values;
    g.scale = cfg->method == OSCAR_METHOD_SCALE_ONLY || cfg->method == OSCAR_METHOD_OSCAR;
    g.kbits = g.quant ? (cfg->key_bits ? cfg->key_bits : cfg->bits) : 16;
    g.vbits = g.quant ? (cfg->value_bits ? cfg->value_bits : cfg->bits) : 16;
    g.Qk = g.quant ? (1 << g.kbits) - 1 : 0;
    g.Qv = g.quant ? (1 << g.vbits) - 1 : 0;
    g.norm_per_head = g.scale && cfg->key_norm_per_head;
    g.bits = g.kbits;
    g.Q = g.Qk;
    if (g.quant) {
        g.kcodes_bytes = (size_t)g.R * g.d * g.kbits / 8;
        g.vcodes_bytes = (size_t)g.R * g.d * g.vbits / 8;
        g.codes_bytes = g.kcodes_bytes;
        g.kparams_bytes = (size_t)(g.R / g.gk) * g.d * 4;
        g.vparams_bytes = (size_t)g.R * (g.d / g.gv) * 4;
        g.head_bytes = g.kcodes_bytes + g.vcodes_bytes + g.kparams_bytes + g.vparams_bytes;
        g.norms_bytes = g.scale ? (size_t)4 * g.R * (g.norm_per_head ? (size_t)g.hkv : 1) : 0;
        g.LB = (size_t)g.hkv * g.head_bytes + g.norms_bytes;
    } else {
        g.LB = (size_t)g.hkv * 2 * g.R * g.d * g.w;
    }
    return g;
}

oscar_config tl_small_config(oscar_method m, int bits, int d, int hkv, int hq) {
    oscar_config c = oscar_config_default();
    c.method = m;
    c.bits = bits;
    c.head_dim = d;
    c.num_kv_heads = hkv;
    c.num_q_heads = hq;
    c.num_layers = 1;
    c.k_group = 32;
    c.v_group = 32;
    c.residual = 64;
    c.window_dtype = OSCAR_DTYPE_F16;
    c.rotate_values = 1;
    c.block_count = 64;
    c.max_seqs = 8;
    c.backend = OSCAR_BACKEND_CPU;
    /* one worker: ctest runs two executables at once on two cores, and an
     * oversubscribed OpenMP team costs milliseconds per call; the tests that
     * exercise the parallel paths set num_threads themselves */
    c.num_threads = 1;
    c.check_finite = 1;
    return c;
}

/* ---- reference quantiser ------------------------------------------------ */

void tl_ref_params(const float *x, int n, int stride, int Q, uint16_t *sc16, uint16_t *lo16) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        float v = x[(size_t)i * stride];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    float scale = (hi - lo) / (float)Q;
    *sc16 = tl_f16_from_double(scale);
    *lo16 = tl_f16_from_double(lo);
}

int tl_ref_code(float x, uint16_t sc16, uint16_t lo16, int Q) {
    float sc = (float)tl_f16_to_double(sc16);
    float l0 = (float)tl_f16_to_double(lo16);
    if (!(sc > 0.0f)) return 0;
    float q = (x - l0) / sc;
    float r = rintf(q);
    if (r < 0.0f) return 0;
    if (r > (float)Q) return Q;
    return (int)r;
}

static float tl_ref_deq(int code, uint16_t sc16, uint16_t lo16) {
    float sc = (float)tl_f16_to_double(sc16);
    float l0 = (float)tl_f16_to_double(lo16);
    float prod = (float)code * sc;
    return l0 + prod;
}

void tl_ref_build(const tl_geom *g, const float *k, const float *v, int64_t T,
                  const float *s_override, tl_ref *o) {
    tl_ref_build_packed(g, k, v, T, (T / g->R) * g->R, s_override, o);
}

void tl_ref_build_packed(const tl_geom *g, const float *k, const float *v, int64_t T, int64_t packed_tokens,
                         const float *s_override, tl_ref *o) {
    memset(o, 0, sizeof *o);
    const int d = g->d, hkv = g->hkv;
    const int64_t row = (int64_t)hkv * d;
    o->T = T;
    o->packed = packed_tokens;
    size_t nt = (size_t)(T > 0 ? T : 1) * (size_t)row;
    o->xk = calloc(nt, sizeof(float));
    o->xv = calloc(nt, sizeof(float));
    o->krec = calloc(nt, sizeof(double));
    o->vrec = calloc(nt, sizeof(double));
    double buf[256];
    /* steps 1-2: rotation and window rounding */
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < hkv; h++) {
            const float *ks = k + t * row + (int64_t)h * d;
            const float *vs = v + t * row + (int64_t)h * d;
            for (int c = 0; c < d; c++) buf[c] = ks[c];
            if (g->rot) tl_hadamard_ref(buf, buf, d);
            for (int c = 0; c < d; c++) o->xk[t * row + h * d + c] = (float)tl_round_dtype(g->W, buf[c]);
            for (int c = 0; c < d; c++) buf[c] = vs[c];
            if (g->rotv) tl_hadamard_ref(buf, buf, d);
            for (int c = 0; c < d; c++) o->xv[t * row + h * d + c] = (float)tl_round_dtype(g->W, buf[c]);
        }
    const int64_t P = o->packed;
    if (g->quant && P > 0) {
        size_t np = (size_t)P * (size_t)row;
        o->s = calloc((size_t)P, sizeof(float));
        o->kq = calloc(np, sizeof(float));
        o->kcode = calloc(np, 1);
        o->vcode = calloc(np, 1);
        o->kdeq = calloc(np, sizeof(float));
        o->vdeq = calloc(np, sizeof(float));
        o->ksc = calloc((size_t)(P / g->gk) * row, sizeof(uint16_t));
        o->klo = calloc((size_t)(P / g->gk) * row, sizeof(uint16_t));
        o->vsc = calloc((size_t)P * hkv * (d / g->gv), sizeof(uint16_t));
        o->vlo = calloc((size_t)P * hkv * (d / g->gv), sizeof(uint16_t));
        /* step 4: token norms */
        for (int64_t t = 0; t < P; t++) {
            float s = 1.0f;
            if (g->scale) {
                if (s_override) {
                    s = s_override[t];
                } else {
                    double acc = 0.0;
                    for (int64_t i = 0; i < row; i++) acc += (double)o->xk[t * row + i] * o->xk[t * row + i];
                    s = (float)sqrt(acc);
                    if (!(s > 0.0f) || isinf(s)) s = 1.0f;
                }
            }
            o->s[t] = s;
            for (int64_t i = 0; i < row; i++)
                o->kq[t * row + i] = g->scale ? o->xk[t * row + i] / s : o->xk[t * row + i];
        }
        /* steps 5-8, keys: groups of gk tokens per (head, channel) */
        for (int64_t t0 = 0; t0 < P; t0 += g->gk)
            for (int64_t i = 0; i < row; i++) {
                size_t pi = (size_t)(t0 / g->gk) * row + i;
                tl_ref_params(o->kq + t0 * row + i, g->gk, (int)row, g->Q, &o->ksc[pi], &o->klo[pi]);
                for (int64_t t = t0; t < t0 + g->gk; t++) {
                    int code = tl_ref_code(o->kq[t * row + i], o->ksc[pi], o->klo[pi], g->Q);
                    o->kcode[t * row + i] = (uint8_t)code;
                    o->kdeq[t * row + i] = tl_ref_deq(code, o->ksc[pi], o->klo[pi]);
                }
            }
        /* values: groups of gv channels per (token, head) */
        const int nvg = d / g->gv;
        for (int64_t t = 0; t < P; t++)
            for (int h = 0; h < hkv; h++)
                for (int j = 0; j < nvg; j++) {
                    size_t pi = ((size_t)t * hkv + h) * nvg + j;
                    const float *x = o->xv + t * row + h * d + j * g->gv;
                    tl_ref_params(x, g->gv, 1, g->Qv, &o->vsc[pi], &o->vlo[pi]);
                    for (int c = 0; c < g->gv; c++) {
                        int64_t idx = t * row + h * d + j * g->gv + c;
                        int code = tl_ref_code(x[c], o->vsc[pi], o->vlo[pi], g->Qv);
                        o->vcode[idx] = (uint8_t)code;
                        o->vdeq[idx] = tl_ref_deq(code, o->vsc[pi], o->vlo[pi]);
                    }
                }
    }
    /* original-space reconstruction */
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < hkv; h++) {
            int64_t base = t * row + (int64_t)h * d;
            int packed = g->quant && t < P;
            for (int c = 0; c < d; c++)
                buf[c] = packed ? (double)o->s[t] * o->kdeq[base + c] : o->xk[base + c];
            if (g->rot) tl_hadamard_ref(buf, buf, d);
            memcpy(o->krec + base, buf, sizeof(double) * (size_t)d);
            for (int c = 0; c < d; c++) buf[c] = packed ? o->vdeq[base + c] : o->xv[base + c];
            if (g->rotv) tl_hadamard_ref(buf, buf, d);
            memcpy(o->vrec + base, buf, sizeof(double) * (size_t)d);
        }
}

/* see testlib.h */
void tl_compare_readback(const tl_geom *g, const tl_ref *ref, const float *lib, int is_v, tl_cmp_stats *st) {
    const int d = g->d, hkv = g->hkv;
    const int64_t row = (int64_t)hkv * d;
    double x[256];
    const int rot = is_v ? g->rotv : g->rot;
    /* one flag per quantisation group of the packed tokens */
    const int64_t packed = g->quant ? ref->packed : 0;
    const int64_t n_groups = is_v ? packed * hkv * (d / g->gv) : (packed / g->gk) * row;
    uint8_t *group_bad = calloc((size_t)(n_groups > 0 ? n_groups : 1), 1);
    if (!group_bad) {
        fprintf(stderr, "tl_compare_readback: out of memory\n");
        exit(2);
    }
    for (int64_t t = 0; t < ref->T; t++)
        for (int h = 0; h < hkv; h++) {
            int64_t base = t * row + (int64_t)h * d;
            int packed = g->quant && t < ref->packed;
            if (!packed) {
                const double *want = is_v ? ref->vrec + base : ref->krec + base;
                double rms = 0.0;
                for (int c = 0; c < d; c++) rms += want[c] * want[c];
                rms = sqrt(rms / d);
                for (int c = 0; c < d; c++) {
                    double e = fabs((double)lib[base + c] - want[c]);
                    /* window values: exact without rotation, fp32 FWHT error with */
                    double tol = rot ? 1e-5 * rms + 1e-6 * fabs(want[c]) : 0.0;
                    /* a rotated window value may be rounded to W differently
                     * (fp32 FWHT vs float64): one ulp of W in the rotated space */
                    if (rot) tol += tl_ulp(g->W, rms * sqrt((double)d)) * 1.01;
                    st->elems++;
                    if (!(e <= tol)) st->mism++, st->window_mism++;
                    if (!(e <= tol + 1e-3 * (rms + 1e-30) + tl_ulp(g->W, rms * sqrt((double)d)) * 4)) st->hard++;
                }
                continue;
            }
            for (int c = 0; c < d; c++) x[c] = lib[base + c];
            if (rot) tl_hadamard_ref(x, x, d);
            double s = is_v ? 1.0 : ref->s[t];
            const float *want = is_v ? ref->vdeq + base : ref->kdeq + base;
            double nrm = 0.0;
            for (int c = 0; c < d; c++) nrm += (double)want[c] * want[c];
            nrm = sqrt(nrm / d);
            for (int c = 0; c < d; c++) {
                double got = x[c] / s;
                double e = fabs(got - want[c]);
                double tol = 1e-5 * nrm + 2e-6 * fabs(want[c]) + 1e-30;
                /* one step of the group */
                double step;
                size_t pi;
                if (is_v) {
                    pi = ((size_t)t * hkv + h) * (d / g->gv) + (size_t)(c / g->gv);
                    step = tl_f16_to_double(ref->vsc[pi]) + 2 * tl_ulp(OSCAR_DTYPE_F16, tl_f16_to_double(ref->vlo[pi]));
                } else {
                    pi = (size_t)(t / g->gk) * row + (size_t)h * d + (size_t)c;
                    step = tl_f16_to_double(ref->ksc[pi]) + 2 * tl_ulp(OSCAR_DTYPE_F16, tl_f16_to_double(ref->klo[pi]));
                }
                st->elems++;
                if (!(e <= tol)) st->mism++, group_bad[pi] = 1;
                if (!(e <= 1.01 * step + tol + (rot ? 0.02 * nrm : 0.0))) st->hard++;
                if (!(e <= st->worst)) st->worst = e;
            }
        }
    st->groups += n_groups;
    for (int64_t i = 0; i < n_groups; i++) st->bad_groups += group_bad[i];
    free(group_bad);
}

/* One of K or V by tl_readback_within's rule. */
static int readback_within_one(const tl_cmp_stats *st, int rotated, int64_t hard_slack) {
    if (rotated) /* the window rounding of an fp32 FWHT may differ from float64
                  * in rare elements, and moves the values quantised after it */
        return st->mism <= 0.05 * st->elems + 2 && st->hard <= st->elems / 200 + hard_slack;
    /* without rotation the window is exact, and the packed numerics are exact
     * up to the last bit of s: a few groups may move by one f16 ulp or one
     * code, no element by more than a step */
    return st->window_mism == 0 && st->bad_groups <= 0.005 * st->groups + 4 && st->hard <= hard_slack;
}

/* see testlib.h */
int tl_readback_within(const tl_geom *g, const tl_cmp_stats *k, const tl_cmp_stats *v, int64_t hard_slack) {
    return readback_within_one(k, g->rot, hard_slack) && readback_within_one(v, g->rotv, hard_slack);
}

void tl_ref_free(tl_ref *r) {
    free(r->xk);
    free(r->xv);
    free(r->s);
    free(r->kq);
    free(r->ksc);
    free(r->klo);
    free(r->vsc);
    free(r->vlo);
    free(r->kcode);
    free(r->vcode);
    free(r->kdeq);
    free(r->vdeq);
    free(r->krec);
    free(r->vrec);
    memset(r, 0, sizeof *r);
}

void tl_ref_attention(int d, int hkv, int hq, const double *k, const double *v, int64_t T,
                      int q_len, const float *q, double scale, double *out, double *mag) {
    int group = hq / hkv;
    double *logit = malloc(sizeof(double) * (size_t)(T > 0 ? T : 1));
    for (int i = 0; i < q_len; i++)
        for (int j = 0; j < hq; j++) {
            int h = j / group;
            const float *qv = q + ((int64_t)i * hq + j) * d;
            double *o = out + ((int64_t)i * hq + j) * d;
            int64_t last = T - q_len + i; /* inclusive */
            double mx = -INFINITY;
            for (int64_t t = 0; t <= last; t++) {
                const double *kv = k + (t * hkv + h) * d;
                double acc = 0.0;
                for (int c = 0; c < d; c++) acc += (double)qv[c] * kv[c];
                logit[t] = acc * scale;
                if (logit[t] > mx) mx = logit[t];
            }
            double den = 0.0, mg[256];
            for (int c = 0; c < d; c++) o[c] = mg[c] = 0.0;
            for (int64_t t = 0; t <= last; t++) {
                double p = exp(logit[t] - mx);
                den += p;
                const double *vv = v + (t * hkv + h) * d;
                for (int c = 0; c < d; c++) {
                    o[c] += p * vv[c];
                    mg[c] += p * fabs(vv[c]);
                }
            }
            double m = 0.0;
            for (int c = 0; c < d; c++) {
                o[c] /= den;
                if (mg[c] / den > m) m = mg[c] / den;
            }
            if (mag) mag[(int64_t)i * hq + j] = m;
        }
    free(logit);
}

void tl_ref_attention_rot(const tl_geom *g, const tl_ref *ref, int q_len, const float *q, double scale,
                          double *out) {
    const int d = g->d, hkv = g->hkv, hq = g->hq, group = hq / hkv;
    const int64_t T = ref->T, row = (int64_t)hkv * d;
    double *logit = malloc(sizeof(double) * (size_t)(T > 0 ? T : 1));
    double qr[256], o[256];
    for (int i = 0; i < q_len; i++)
        for (int j = 0; j < hq; j++) {
            const int h = j / group;
            for (int c = 0; c < d; c++) qr[c] = q[((int64_t)i * hq + j) * d + c];
            if (g->rot) tl_hadamard_ref(qr, qr, d);
            const int64_t last = T - q_len + i;
            double mx = -INFINITY;
            for (int64_t t = 0; t <= last; t++) {
                const int packed = g->quant && t < ref->packed;
                const float *kv = (packed ? ref->kdeq : ref->xk) + t * row + (int64_t)h * d;
                double acc = 0.0;
                for (int c = 0; c < d; c++) acc += qr[c] * kv[c];
                logit[t] = (packed ? (double)ref->s[t] : 1.0) * acc * scale;
                if (logit[t] > mx) mx = logit[t];
            }
            double den = 0.0;
            for (int c = 0; c < d; c++) o[c] = 0.0;
            for (int64_t t = 0; t <= last; t++) {
                const int packed = g->quant && t < ref->packed;
                const float *vv = (packed ? ref->vdeq : ref->xv) + t * row + (int64_t)h * d;
                double p = exp(logit[t] - mx);
                den += p;
                for (int c = 0; c < d; c++) o[c] += p * vv[c];
            }
            for (int c = 0; c < d; c++) o[c] /= den;
            if (g->rotv) tl_hadamard_ref(o, o, d);
            memcpy(out + ((int64_t)i * hq + j) * d, o, sizeof(double) * (size_t)d);
        }
    free(logit);
}

void tl_ref_attention_f(int d, int hkv, int hq, const float *k, const float *v, int64_t T,
                        int q_len, const float *q, double scale, double *out, double *mag) {
    size_t n = (size_t)(T > 0 ? T : 1) * hkv * d;
    double *kd = malloc(n * sizeof(double)), *vd = malloc(n * sizeof(double));
    for (int64_t i = 0; i < T * hkv * d; i++) {
        kd[i] = k[i];
        vd[i] = v[i];
    }
    tl_ref_attention(d, hkv, hq, kd, vd, T, q_len, q, scale, out, mag);
    free(kd);
    free(vd);
}

/* ---- library helpers ----------------------------------------------------- */

oscar_cache *tl_create(const oscar_config *cfg) {
    char err[256] = "";
    oscar_cache *c = NULL;
    oscar_status st = oscar_cache_create(cfg, &c, err, sizeof err);
    CHECKF(st == OSCAR_OK && c != NULL, "oscar_cache_create: %s (%s)", oscar_status_name(st), err);
    return st == OSCAR_OK ? c : NULL;
}

oscar_status tl_append(oscar_cache *c, int layer, int32_t seq, const float *k, const float *v,
                       int64_t n, int hkv, int d, oscar_dtype dt) {
    int64_t cnt = n * hkv * d;
    size_t bytes = (size_t)(cnt > 0 ? cnt : 1) * (size_t)tl_dtype_size(dt);
    void *kb = malloc(bytes), *vb = malloc(bytes);
    if (cnt > 0) {
        tl_encode(k, dt, kb, cnt);
        tl_encode(v, dt, vb, cnt);
    }
    int32_t nt = (int32_t)n;
    oscar_status st = oscar_append(c, layer, 1, &seq, &nt, kb, vb, dt, NULL);
    free(kb);
    free(vb);
    return st;
}

oscar_status tl_attention(oscar_cache *c, int layer, int n_seqs, const int32_t *ids, int q_len,
                          const float *q, oscar_dtype q_dt, oscar_dtype out_dt, float scale,
                          float *out_f32, int hq, int d) {
    int64_t n = (int64_t)n_seqs * q_len * hq * d;
    size_t nb = (size_t)(n > 0 ? n : 1);
    void *qb = malloc(nb * (size_t)tl_dtype_size(q_dt));
    void *ob = malloc(nb * (size_t)tl_dtype_size(out_dt));
    tl_encode(q, q_dt, qb, n);
    memset(ob, 0xff, nb * (size_t)tl_dtype_size(out_dt)); /* NaN in every dtype */
    oscar_status st = oscar_attention(c, layer, n_seqs, ids, q_len, qb, q_dt, ob, out_dt, scale, NULL);
    tl_decode(ob, out_dt, out_f32, n);
    free(qb);
    free(ob);
    return st;
}

unsigned char *tl_export(oscar_cache *c, int32_t seq, size_t *size) {
    size_t need = 0;
    oscar_status st = oscar_seq_export(c, seq, NULL, 0, &need);
    if (!CHECKF(st == OSCAR_OK && need > 0, "export size: %s (%s)", oscar_status_name(st),
                oscar_last_error(c)))
        return NULL;
    unsigned char *buf = malloc(need);
    memset(buf, 0xa5, need);
    size_t got = 0;
    st = oscar_seq_export(c, seq, buf, need, &got);
    if (!CHECKF(st == OSCAR_OK && got == need, "export: %s, size %zu vs %zu (%s)",
                oscar_status_name(st), got, need, oscar_last_error(c))) {
        free(buf);
        return NULL;
    }
    *size = need;
    return buf;
}

int tl_same_export(oscar_cache *a, int32_t sa, oscar_cache *b, int32_t sb) {
    size_t na = 0, nb = 0;
    unsigned char *ba = tl_export(a, sa, &na), *bb = tl_export(b, sb, &nb);
    int same = ba && bb && na == nb && memcmp(ba, bb, na) == 0;
    free(ba);
    free(bb);
    return same;
}

void tl_poison(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = NAN;
}

int64_t tl_count_nonfinite(const float *x, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) c++;
    return c;
}

int64_t tl_read_all(oscar_cache *c, int32_t seq, int layer, int hkv, int d, float **k, float **v) {
    oscar_seq_info info;
    *k = *v = NULL;
    if (!CHECK_OK(oscar_seq_info_get(c, seq, layer, &info))) return -1;
    int64_t n = info.tokens * hkv * d;
    *k = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    *v = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    tl_poison(*k, n);
    tl_poison(*v, n);
    CHECK_OK(oscar_seq_read(c, seq, layer, 0, info.tokens, *k, *v));
    CHECKF(tl_count_nonfinite(*k, n) == 0 && tl_count_nonfinite(*v, n) == 0,
           "oscar_seq_read left unwritten (NaN) elements");
    return info.tokens;
}

/* ---- stream helpers -------------------------------------------------------- */

uint64_t tl_fnv1a(const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

uint32_t tl_rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

uint64_t tl_rd64(const unsigned char *p) { return (uint64_t)tl_rd32(p) | (uint64_t)tl_rd32(p + 4) << 32; }

void tl_wr32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

void tl_wr64(unsigned char *p, uint64_t v) {
    tl_wr32(p, (uint32_t)v);
    tl_wr32(p + 4, (uint32_t)(v >> 32));
}

void tl_fix_checksum(unsigned char *buf, size_t size) {
    if (size < 8) return;
    tl_wr64(buf + size - 8, tl_fnv1a(buf, size - 8));
}

/* FORMAT.md, "Code tiles": lane l = 4g + t holds pairs q = 4s + j; element e
 * of pair q is in word q / (16/b), bits 16e + b*(q % (16/b)). */
static void tl_code_walk(unsigned char *codes, const unsigned char *ccodes, int R, int d, int bits,
                         int is_value, uint8_t *plane, int encode) {
    const int P = 16 / bits, Qm = (1 << bits) - 1;
    const size_t tile_bytes = (size_t)2 * d * bits, chunk = (size_t)d * bits / 16;
    for (int T = 0; T < R / 16; T++)
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            size_t base = (size_t)T * tile_bytes + (size_t)l * chunk;
            for (int s = 0; s < d / 16; s++)
                for (int j = 0; j < 4; j++) {
                    int q = 4 * s + j;
                    size_t woff = base + (size_t)(q / P) * 4;
                    for (int e = 0; e < 2; e++) {
                        int bit = 16 * e + bits * (q % P);
                        int tok, ch;
                        if (!is_value) {
                            tok = 16 * T + g + 8 * (j & 1);
                            ch = 16 * s + 2 * t + 8 * (j >> 1) + e;
                        } else {
                            tok = 16 * T + 2 * t + 8 * (j >> 1) + e;
                            ch = 16 * s + g + 8 * (j & 1);
                        }
                        if (encode) {
                            uint32_t w = tl_rd32(codes + woff);
                            w &= ~((uint32_t)Qm << bit);
                            w |= (uint32_t)(plane[(size_t)tok * d + ch] & Qm) << bit;
                            tl_wr32(codes + woff, w);
                        } else {
                            uint32_t w = tl_rd32(ccodes + woff);
                            plane[(size_t)tok * d + ch] = (uint8_t)((w >> bit) & (uint32_t)Qm);
                        }
                    }
                }
        }
}

/* 3-bit codes (format version 5): the low two bits of every code are a
 * 2-bit array of R*d/4 bytes, the high bit a 1-bit array after it. */
void tl_decode_codes(const unsigned char *codes, int R, int d, int bits, int is_value, uint8_t *out) {
    memset(out, 0xff, (size_t)R * d);
    if (bits == 3) {
        uint8_t *hi = malloc((size_t)R * d);
        tl_code_walk(NULL, codes, R, d, 2, is_value, out, 0);
        tl_code_walk(NULL, codes + (size_t)R * d / 4, R, d, 1, is_value, hi, 0);
        for (size_t i = 0; i < (size_t)R * d; i++) out[i] = (uint8_t)(out[i] | hi[i] << 2);
        free(hi);
        return;
    }
    tl_code_walk(NULL, codes, R, d, bits, is_value, out, 0);
}

void tl_encode_codes(const uint8_t *in, int R, int d, int bits, int is_value, unsigned char *codes) {
    if (bits == 3) {
        uint8_t *hi = malloc((size_t)R * d);
        for (size_t i = 0; i < (size_t)R * d; i++) hi[i] = (uint8_t)((in[i] >> 2) & 1);
        tl_code_walk(codes, NULL, R, d, 2, is_value, (uint8_t *)in, 1); /* masks to the low two bits */
        tl_code_walk(codes + (size_t)R * d / 4, NULL, R, d, 1, is_value, hi, 1);
        free(hi);
        return;
    }
    tl_code_walk(codes, NULL, R, d, bits, is_value, (uint8_t *)in, 1);
}

/* ---- error measures ---------------------------------------------------------- */

double tl_rel_l2(const float *a, const double *b, int64_t n) {
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double e = (double)a[i] - b[i];
        num += e * e;
        den += b[i] * b[i];
    }
    if (den == 0.0) return sqrt(num);
    return sqrt(num / den);
}

double tl_max_abs_diff(const float *a, const double *b, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= m)) m = e; /* NaN propagates */
    }
    return m;
}

double tl_max_abs(const double *b, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; i++)
        if (fabs(b[i]) > m) m = fabs(b[i]);
    return m;
}

int64_t tl_compare_out(const float *got, const double *ref, const double *mag, int64_t nvec, int d,
                       oscar_dtype out_dt, double rel, double *worst) {
    int64_t bad = 0;
    double w = 0.0;
    for (int64_t i = 0; i < nvec; i++) {
        const double *r = ref + i * d;
        const float *g = got + i * d;
        double mx = mag ? mag[i] : tl_max_abs(r, d);
        if (mx == 0.0) mx = 1e-30;
        for (int c = 0; c < d; c++) {
            double e = fabs((double)g[c] - r[c]);
            double big = fabs(r[c]) > fabs((double)g[c]) ? fabs(r[c]) : fabs((double)g[c]);
            double tol = rel * mx + (out_dt == OSCAR_DTYPE_F32 ? 0.0 : 0.5 * tl_ulp(out_dt, big) * 1.0001);
            if (!(e <= tol)) bad++;
            if (!(e / mx <= w)) w = e / mx;
        }
    }
    if (worst) *worst = w;
    return bad;
}

/* FORMAT.md step 4's per-head key sum of squares, written from the
 * definition: 32 lanes sum d/32 consecutive squares in order, then
 * s_l += s_(l xor m) for m = 16, 8, 4, 2, 1, lane 0 wins; fp32 throughout. */
float tl_head_sumsq_def(const float *x, int d) {
    float s[32], t[32];
    for (int l = 0; l < 32; l++) {
        s[l] = 0.0f;
        for (int i = 0; i < d / 32; i++) {
            const float sq = x[l * (d / 32) + i] * x[l * (d / 32) + i];
            s[l] = s[l] + sq;
        }
    }
    for (int m = 16; m >= 1; m /= 2) {
        for (int l = 0; l < 32; l++) t[l] = s[l] + s[l ^ m];
        for (int l = 0; l < 32; l++) s[l] = t[l];
    }
    return s[0];
}
