/*
 * test_gpu.c - the CUDA backend against the CPU backend (the reference).
 *
 * For every method x bits x head_dim (and window / input / query dtypes,
 * group sizes, layers) the same tokens are appended to a CPU cache and a
 * CUDA cache, in batches of sequences of different lengths, prefill and
 * single-token appends mixed. Then:
 *  - the exported streams are compared field by field: header and windows
 *    byte-equal, parameters equal (a few allowed where the token norm, whose
 *    summation order is not part of the format, differs in its last bit),
 *    codes equal except at rounding boundaries (counted, bounded, and never
 *    more than one level apart);
 *  - attention (q_len 1..8, outputs poisoned with NaN first) agrees within
 *    2e-3 relative (L2 over each call's output);
 *  - a sequence exported by one backend and imported into the other gives
 *    the same attention;
 *  - NaN input with check_finite marks the sequence failed on the device
 *    and is reported by the next poll (see test_nonfinite);
 *  - sink tokens (test_sinks): exports byte-identical to the CPU backend's
 *    through prompts shorter than, equal to and crossing S, decode runs,
 *    drafts and truncation, query chunks crossing S, fork and import;
 *  - key and value widths 2/3/4 and per-head key norms (test_widths): the
 *    same walk, byte-identical exports;
 *  - long sequences (test_long, 40-48 blocks): each sequence's chunks and
 *    its exact tokens split over several CTAs.
 * Without a CUDA device the test prints a skip message and exits 77.
 * `test_gpu --small` runs a reduced set (used under compute-sanitizer);
 * `test_gpu --sinks` only the sink-token and clip tests, `--widths`
 * test_widths and test_long, `--long` test_long, `--basic` the rest.
 */
#include "testlib.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int g_small = 0;
static double g_worst_attn = 0.0;
static int64_t g_code_diffs = 0, g_codes = 0, g_param_diffs = 0, g_params = 0;

#define CUCHECK(x)                                                                                     \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)

typedef struct pair {
    oscar_cache *cpu, *gpu;
    oscar_config cfg;
    tl_geom g;
} pair;

static int make_pair(pair *P, oscar_config cfg) {
    memset(P, 0, sizeof *P);
    P->cfg = cfg;
    P->g = tl_geom_of(&cfg);
    cfg.backend = OSCAR_BACKEND_CPU;
    P->cpu = tl_create(&cfg);
    cfg.backend = OSCAR_BACKEND_CUDA;
    P->gpu = tl_create(&cfg);
    return P->cpu && P->gpu;
}

static void free_pair(pair *P) {
    oscar_cache_destroy(P->cpu);
    oscar_cache_destroy(P->gpu);
}

static void *to_device(const float *x, int64_t n, oscar_dtype dt) {
    size_t bytes = (size_t)(n > 0 ? n : 1) * (size_t)tl_dtype_size(dt);
    void *h = malloc(bytes), *d = NULL;
    if (n > 0) tl_encode(x, dt, h, n);
    CUCHECK(cudaMalloc(&d, bytes));
    CUCHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

/* The same append on both backends; both statuses must agree. */
static oscar_status both_append(pair *P, int layer, int n, const int32_t *ids_c, const int32_t *ids_g,
                                const int32_t *nt, const float *k, const float *v, oscar_dtype dt) {
    int64_t rows = 0;
    for (int i = 0; i < n; i++) rows += nt[i];
    const int64_t cnt = rows * P->g.hkv * P->g.d;
    size_t bytes = (size_t)(cnt > 0 ? cnt : 1) * (size_t)tl_dtype_size(dt);
    void *kh = malloc(bytes), *vh = malloc(bytes);
    if (cnt > 0) {
        tl_encode(k, dt, kh, cnt);
        tl_encode(v, dt, vh, cnt);
    }
    oscar_status sc = oscar_append(P->cpu, layer, n, ids_c, nt, kh, vh, dt, NULL);
    void *kd = NULL, *vd = NULL;
    CUCHECK(cudaMalloc(&kd, bytes));
    CUCHECK(cudaMalloc(&vd, bytes));
    CUCHECK(cudaMemcpy(kd, kh, bytes, cudaMemcpyHostToDevice));
    CUCHECK(cudaMemcpy(vd, vh, bytes, cudaMemcpyHostToDevice));
    oscar_status sg = oscar_append(P->gpu, layer, n, ids_g, nt, kd, vd, dt, NULL);
    CUCHECK(cudaDeviceSynchronize());
    CUCHECK(cudaFree(kd));
    CUCHECK(cudaFree(vd));
    free(kh);
    free(vh);
    CHECKF(sc == sg, "append status cpu %s gpu %s (%s)", oscar_status_name(sc), oscar_status_name(sg),
           oscar_last_error(P->gpu));
    return sg;
}

/* GPU attention with device buffers; output poisoned with NaN (0xff bytes). */
static oscar_status gpu_attention(oscar_cache *c, int layer, int n, const int32_t *ids, int q_len, const float *q,
                                  oscar_dtype q_dt, oscar_dtype out_dt, float scale, float *out, int hq, int d) {
    const int64_t cnt = (int64_t)n * q_len * hq * d;
    void *qd = to_device(q, cnt, q_dt), *od = NULL;
    const size_t ob = (size_t)cnt * (size_t)tl_dtype_size(out_dt);
    CUCHECK(cudaMalloc(&od, ob));
    CUCHECK(cudaMemset(od, 0xff, ob));
    oscar_status st = oscar_attention(c, layer, n, ids, q_len, qd, q_dt, od, out_dt, scale, NULL);
    CUCHECK(cudaDeviceSynchronize());
    void *oh = malloc(ob);
    CUCHECK(cudaMemcpy(oh, od, ob, cudaMemcpyDeviceToHost));
    tl_decode(oh, out_dt, out, cnt);
    free(oh);
    CUCHECK(cudaFree(qd));
    CUCHECK(cudaFree(od));
    return st;
}

static double rel_l2(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double x = (double)a[i] - (double)b[i];
        if (!(x == x)) return INFINITY;
        num += x * x;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Compares two export streams of the same configuration field by field. */
static void compare_exports(const tl_geom *g, const unsigned char *a, size_t na, const unsigned char *b, size_t nb,
                            const char *what) {
    CHECKF(na == nb, "%s: export sizes %zu vs %zu", what, na, nb);
    if (na != nb) return;
    /* stream version 5 (as version 4): 80-byte header, (tokens, packed blocks) per layer */
    const size_t hdr = 80 + 16 * (size_t)g->L;
    CHECKF(memcmp(a, b, hdr) == 0, "%s: headers differ", what);
    const uint32_t n_blocks = tl_rd32(a + 52);
    const unsigned char *A = a + hdr, *B = b + hdr;
    int64_t code_diff = 0, code_far = 0, codes = 0, par_diff = 0, pars = 0, norm_bad = 0, raw_diff = 0;
    uint8_t *ca = NULL, *cb = NULL;
    if (g->quant) {
        ca = malloc((size_t)g->R * g->d);
        cb = malloc((size_t)g->R * g->d);
    }
    for (uint32_t i = 0; i < n_blocks; i++)
        for (int l = 0; l < g->L; l++) {
            const size_t off = ((size_t)i * g->L + l) * g->LB;
            /* a layer that has not packed block i is zeros in both */
            const int64_t packed = (int64_t)tl_rd64(a + 80 + 16 * (size_t)l + 8);
            if ((int64_t)i >= packed) continue;
            const unsigned char *x = A + off, *y = B + off;
            if (!g->quant) {
                for (size_t j = 0; j < g->LB; j++) raw_diff += x[j] != y[j];
                continue;
            }
            for (int h = 0; h < g->hkv; h++) {
                const unsigned char *hx = x + (size_t)h * g->head_bytes, *hy = y + (size_t)h * g->head_bytes;
                for (int isv = 0; isv < 2; isv++) {
                    /* K codes, then V codes, each at its own width (3 bits: two planes) */
                    const size_t off_c = isv ? g->kcodes_bytes : 0;
                    const int bits = isv ? g->vbits : g->kbits;
                    tl_decode_codes(hx + off_c, g->R, g->d, bits, isv, ca);
                    tl_decode_codes(hy + off_c, g->R, g->d, bits, isv, cb);
                    for (int j = 0; j < g->R * g->d; j++) {
                        int dd = (int)ca[j] - (int)cb[j];
                        code_diff += dd != 0;
                        code_far += dd > 1 || dd < -1;
                    }
                    codes += (int64_t)g->R * g->d;
                }
                const size_t np = (g->kparams_bytes + g->vparams_bytes) / 2;
                const uint16_t *px = (const uint16_t *)(hx + g->kcodes_bytes + g->vcodes_bytes);
                const uint16_t *py = (const uint16_t *)(hy + g->kcodes_bytes + g->vcodes_bytes);
                for (size_t j = 0; j < np; j++) par_diff += px[j] != py[j];
                pars += (int64_t)np;
            }
            if (g->scale) {
                const float *sx = (const float *)(x + (size_t)g->hkv * g->head_bytes);
                const float *sy = (const float *)(y + (size_t)g->hkv * g->head_bytes);
                /* the sum of squares has one defined order (FORMAT.md): same bits
                 * ([R] norms, or [Hkv][R] with per-head norms) */
                const int nn = g->R * (g->norm_per_head ? g->hkv : 1);
                for (int t = 0; t < nn; t++) norm_bad += memcmp(&sx[t], &sy[t], 4) != 0;
            }
        }
    free(ca);
    free(cb);
    /* windows and the rest must be byte-equal (checksum excluded) */
    const size_t wstart = hdr + (size_t)n_blocks * g->L * g->LB;
    int64_t wdiff = 0;
    for (size_t j = wstart; j + 8 < na; j++) wdiff += a[j] != b[j];
    CHECKF(raw_diff == 0, "%s: %lld raw block bytes differ", what, (long long)raw_diff);
    CHECKF(wdiff == 0, "%s: %lld window bytes differ", what, (long long)wdiff);
    CHECKF(norm_bad == 0, "%s: %lld token norms differ", what, (long long)norm_bad);
    CHECKF(code_far == 0, "%s: %lld codes differ by more than one level", what, (long long)code_far);
    CHECKF(code_diff <= codes / 200 + 2, "%s: %lld of %lld codes differ", what, (long long)code_diff,
           (long long)codes);
    CHECKF(par_diff <= pars / 1000 + 2, "%s: %lld of %lld parameters differ", what, (long long)par_diff,
           (long long)pars);
    g_code_diffs += code_diff, g_codes += codes, g_param_diffs += par_diff, g_params += pars;
}

static void compare_seq(pair *P, int32_t sc, int32_t sg, const char *what) {
    size_t na = 0, nb = 0;
    unsigned char *a = tl_export(P->cpu, sc, &na);
    unsigned char *b = tl_export(P->gpu, sg, &nb);
    if (a && b) compare_exports(&P->g, a, na, b, nb, what);
    free(a);
    free(b);
}

static void check_attn(const char *what, const float *got, const float *ref, int64_t n) {
    int64_t bad = tl_count_nonfinite(got, n);
    double e = rel_l2(got, ref, n);
    if (e > g_worst_attn && bad == 0) g_worst_attn = e;
    CHECKF(bad == 0 && e <= 2e-3, "%s: %lld non-finite, rel L2 %.3g", what, (long long)bad, e);
}

typedef struct variant {
    const char *name;
    oscar_config cfg;
    oscar_dtype in_dt, q_dt, out_dt;
    int flavor;
} variant;

static void run_variant(const variant *V) {
    pair P;
    if (!make_pair(&P, V->cfg)) {
        free_pair(&P);
        return;
    }
    const tl_geom *g = &P.g;
    tl_rng r = tl_rng_for(V->name);
    const int NS = 3;
    int32_t idc[3], idg[3];
    for (int i = 0; i < NS; i++) {
        CHECK_OK(oscar_seq_add(P.cpu, &idc[i]));
        CHECK_OK(oscar_seq_add(P.gpu, &idg[i]));
    }
    const int64_t row = (int64_t)g->hkv * g->d;
    const int R = g->R;
    double knorm = 0.0; /* RMS key head norm: queries are scaled to logits of std ~2 */
    /* rounds: a prefill of different lengths, single tokens, a crossing */
    int32_t rounds[4][3] = {{g_small ? R + 7 : 3 * R + 11, g_small ? 9 : R - 1, 17},
                            {1, 1, 1},
                            {0, R + 5, 2},
                            {1, 1, g_small ? 1 : 2 * R}};
    for (int layer = 0; layer < g->L; layer++) {
        for (int rd = 0; rd < 4; rd++) {
            int64_t rows = 0;
            for (int i = 0; i < NS; i++) rows += rounds[rd][i];
            float *k = malloc(sizeof(float) * (size_t)(rows * row + 1));
            float *v = malloc(sizeof(float) * (size_t)(rows * row + 1));
            tl_gen_kv(&r, V->flavor, k, v, rows, g->hkv, g->d, V->in_dt);
            if (layer == 0 && rd == 0) knorm = tl_key_rms_norm(k, rows, g->hkv, g->d);
            oscar_status st = both_append(&P, layer, NS, idc, idg, rounds[rd], k, v, V->in_dt);
            CHECKF(st == OSCAR_OK, "%s: append: %s %s", V->name, oscar_status_name(st), oscar_last_error(P.gpu));
            free(k);
            free(v);
        }
    }
    for (int i = 0; i < NS; i++) {
        char w[160];
        snprintf(w, sizeof w, "%s seq %d export", V->name, i);
        compare_seq(&P, idc[i], idg[i], w);
    }
    /* attention, all sequences at once, several q_len */
    const int hq = g->hq, d = g->d;
    const int qls[3] = {1, 3, 8};
    for (int qi = 0; qi < (g_small ? 2 : 3); qi++) {
        const int ql = qls[qi];
        for (int layer = 0; layer < g->L; layer++) {
            const int64_t n = (int64_t)NS * ql * hq * d;
            float *q = malloc(sizeof(float) * (size_t)n), *oc = malloc(sizeof(float) * (size_t)n),
                  *og = malloc(sizeof(float) * (size_t)n);
            tl_gen_q(&r, q, (int64_t)NS * ql, hq, d, knorm, 2.0, V->q_dt);
            CHECK_OK(tl_attention(P.cpu, layer, NS, idc, ql, q, V->q_dt, V->out_dt, 0.0f, oc, hq, d));
            oscar_status st = gpu_attention(P.gpu, layer, NS, idg, ql, q, V->q_dt, V->out_dt, 0.0f, og, hq, d);
            CHECKF(st == OSCAR_OK, "%s: attention: %s %s", V->name, oscar_status_name(st), oscar_last_error(P.gpu));
            char w[160];
            snprintf(w, sizeof w, "%s attention q_len %d layer %d", V->name, ql, layer);
            check_attn(w, og, oc, n);
            free(q), free(oc), free(og);
        }
    }
    /* cross import: GPU -> CPU and CPU -> GPU */
    {
        size_t na = 0, nb = 0;
        unsigned char *eg = tl_export(P.gpu, idg[0], &na);
        unsigned char *ec = tl_export(P.cpu, idc[1], &nb);
        int32_t on_cpu = -1, on_gpu = -1;
        if (eg) CHECK_OK(oscar_seq_import(P.cpu, eg, na, &on_cpu));
        if (ec) CHECK_OK(oscar_seq_import(P.gpu, ec, nb, &on_gpu));
        if (on_cpu >= 0 && on_gpu >= 0) {
            /* the imported copy exports to the same bytes on the other side */
            size_t n2 = 0;
            unsigned char *back = tl_export(P.gpu, on_gpu, &n2);
            CHECKF(back && n2 == nb && memcmp(back, ec, nb) == 0, "%s: CPU stream imported into GPU exports differently",
                   V->name);
            free(back);
            const int ql = 2;
            const int64_t n = (int64_t)ql * hq * d;
            float *q = malloc(sizeof(float) * (size_t)n), *o1 = malloc(sizeof(float) * (size_t)n),
                  *o2 = malloc(sizeof(float) * (size_t)n);
            tl_gen_q(&r, q, ql, hq, d, knorm, 2.0, V->q_dt);
            CHECK_OK(tl_attention(P.cpu, 0, 1, &on_cpu, ql, q, V->q_dt, OSCAR_DTYPE_F32, 0.0f, o1, hq, d));
            CHECK_OK(gpu_attention(P.gpu, 0, 1, &idg[0], ql, q, V->q_dt, OSCAR_DTYPE_F32, 0.0f, o2, hq, d));
            char w[160];
            snprintf(w, sizeof w, "%s GPU-written seq read by CPU", V->name);
            check_attn(w, o2, o1, n);
            CHECK_OK(tl_attention(P.cpu, 0, 1, &idc[1], ql, q, V->q_dt, OSCAR_DTYPE_F32, 0.0f, o1, hq, d));
            CHECK_OK(gpu_attention(P.gpu, 0, 1, &on_gpu, ql, q, V->q_dt, OSCAR_DTYPE_F32, 0.0f, o2, hq, d));
            snprintf(w, sizeof w, "%s CPU-written seq read by GPU", V->name);
            check_attn(w, o2, o1, n);
            free(q), free(o1), free(o2);
        }
        free(eg);
        free(ec);
    }
    free_pair(&P);
}

static void add(variant *list, int *n, const char *name, oscar_method m, int bits, int d, oscar_dtype W,
                oscar_dtype in, oscar_dtype qd, int flavor) {
    variant *V = &list[(*n)++];
    memset(V, 0, sizeof *V);
    V->name = name;
    V->cfg = tl_small_config(m, bits, d, 2, 8);
    V->cfg.window_dtype = W;
    V->cfg.block_count = 256;
    V->in_dt = in;
    V->q_dt = qd;
    V->out_dt = qd == OSCAR_DTYPE_F32 ? OSCAR_DTYPE_F32 : qd;
    V->flavor = flavor;
}

static char g_names[512][96];

static void test_matrix(void) {
    static variant list[512];
    int n = 0, nn = 0;
    const oscar_method methods[5] = {OSCAR_METHOD_NONE, OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT,
                                     OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    const int ds[3] = {64, 128, 256};
    if (g_small) {
        snprintf(g_names[nn], 96, "small oscar d128 b2");
        add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 2, 128, OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0);
        snprintf(g_names[nn], 96, "small none d64");
        add(list, &n, g_names[nn++], OSCAR_METHOD_NONE, 2, 64, OSCAR_DTYPE_BF16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0);
    } else {
        for (int mi = 0; mi < 5; mi++)
            for (int bi = 0; bi < (mi == 0 ? 1 : 2); bi++)
                for (int di = 0; di < 3; di++) {
                    const int bits = bi ? 4 : 2;
                    const int flavor = (mi + bi + di) % TL_FLAVORS;
                    const oscar_dtype W = (di % 2) ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F16;
                    const oscar_dtype in = (mi % 3) == 0 ? OSCAR_DTYPE_F32 : (mi % 3) == 1 ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F16;
                    const oscar_dtype qd = (di == 2) ? OSCAR_DTYPE_F32 : (mi % 2) ? OSCAR_DTYPE_BF16 : OSCAR_DTYPE_F16;
                    snprintf(g_names[nn], 96, "%s b%d d%d W%s in%s q%s %s", oscar_method_name(methods[mi]), bits,
                             ds[di], tl_dtype_name(W), tl_dtype_name(in), tl_dtype_name(qd), tl_flavor_name(flavor));
                    add(list, &n, g_names[nn++], methods[mi], bits, ds[di], W, in, qd, flavor);
                }
        /* every flavour on the headline configuration */
        for (int f = 0; f < TL_FLAVORS; f++) {
            snprintf(g_names[nn], 96, "oscar b2 d128 bf16 %s", tl_flavor_name(f));
            add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 2, 128, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, f);
        }
        /* group sizes, R, f32 window, rotate_values = 0, layers, GQA shapes */
        snprintf(g_names[nn], 96, "oscar b2 d128 gk16 gv16 R48");
        add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 2, 128, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0);
        list[n - 1].cfg.k_group = 16, list[n - 1].cfg.v_group = 16, list[n - 1].cfg.residual = 48;
        snprintf(g_names[nn], 96, "oscar b4 d64 gk64 gv64 R128");
        add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 4, 64, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 2);
        list[n - 1].cfg.k_group = 64, list[n - 1].cfg.v_group = 64, list[n - 1].cfg.residual = 128;
        snprintf(g_names[nn], 96, "quarot b2 d256 f32 window");
        add(list, &n, g_names[nn++], OSCAR_METHOD_QUAROT, 2, 256, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 1);
        snprintf(g_names[nn], 96, "oscar b2 d128 rotate_values 0, 2 layers");
        add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 2, 128, OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0);
        list[n - 1].cfg.rotate_values = 0, list[n - 1].cfg.num_layers = 2;
        snprintf(g_names[nn], 96, "none f32 window d128");
        add(list, &n, g_names[nn++], OSCAR_METHOD_NONE, 2, 128, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0);
        snprintf(g_names[nn], 96, "oscar b2 d128 hkv8 hq32 R128");
        add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 2, 128, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0);
        list[n - 1].cfg.num_kv_heads = 8, list[n - 1].cfg.num_q_heads = 32, list[n - 1].cfg.residual = 128;
        snprintf(g_names[nn], 96, "kivi b2 d64 hkv1 hq1 (g=1)");
        add(list, &n, g_names[nn++], OSCAR_METHOD_KIVI, 2, 64, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0);
        list[n - 1].cfg.num_kv_heads = 1, list[n - 1].cfg.num_q_heads = 1;
        snprintf(g_names[nn], 96, "oscar b2 d64 hkv2 hq16 (g=8)");
        add(list, &n, g_names[nn++], OSCAR_METHOD_OSCAR, 2, 64, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0);
        list[n - 1].cfg.num_q_heads = 16;
    }
    for (int i = 0; i < n; i++) {
        const long before = tl_failed;
        run_variant(&list[i]);
        printf("  %-60s %s\n", list[i].name, tl_failed == before ? "ok" : "FAILED");
        fflush(stdout);
    }
}

/* NaN input with check_finite = 1. The CUDA backend checks on the device:
 * the append returns OSCAR_OK, the sequence is marked failed (nothing of it
 * is written, its attention rows are NaN), the next poll / sync / append
 * reports OSCAR_E_NONFINITE once, other sequences of the same call are
 * appended normally, and a sequence that reuses the slot is healthy. */
static void test_nonfinite(void) {
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 2, 8);
    cfg.backend = OSCAR_BACKEND_CUDA;
    oscar_cache *c = tl_create(&cfg);
    cfg.backend = OSCAR_BACKEND_CPU;
    oscar_cache *ref = tl_create(&cfg);
    if (!c || !ref) return;
    int32_t id[2], rid[2];
    for (int i = 0; i < 2; i++) {
        CHECK_OK(oscar_seq_add(c, &id[i]));
        CHECK_OK(oscar_seq_add(ref, &rid[i]));
    }
    tl_rng r = tl_rng_for("nonfinite");
    const int64_t T = 100, n = T * 2 * 128;
    float *k = malloc(sizeof(float) * 2 * n), *v = malloc(sizeof(float) * 2 * n);
    tl_gen_kv(&r, 0, k, v, 2 * T, 2, 128, OSCAR_DTYPE_F16);
    void *kd = to_device(k, 2 * n, OSCAR_DTYPE_F16), *vd = to_device(v, 2 * n, OSCAR_DTYPE_F16);
    int32_t nt[2] = {(int32_t)T, (int32_t)T};
    CHECK_OK(oscar_append(c, 0, 2, id, nt, kd, vd, OSCAR_DTYPE_F16, NULL));
    /* the CPU twin gets the same first 100 tokens of both; only the second
     * sequence gets the next 100 (the first one's are poisoned on the GPU) */
    void *kh = malloc(2 * (size_t)2 * n), *vh = malloc(2 * (size_t)2 * n);
    tl_encode(k, OSCAR_DTYPE_F16, kh, 2 * n);
    tl_encode(v, OSCAR_DTYPE_F16, vh, 2 * n);
    CHECK_OK(oscar_append(ref, 0, 2, rid, nt, kh, vh, OSCAR_DTYPE_F16, NULL));
    /* second append: sequence 0 gets a NaN in V and an Inf in K, sequence 1
     * clean rows */
    void *vbad = to_device(v, 2 * n, OSCAR_DTYPE_F16), *kbad = to_device(k, 2 * n, OSCAR_DTYPE_F16);
    const uint16_t nan16 = 0x7e00, inf16 = 0xfc00;
    CUCHECK(cudaMemcpy((uint16_t *)vbad + n - 7, &nan16, 2, cudaMemcpyHostToDevice));
    CUCHECK(cudaMemcpy((uint16_t *)kbad + 3, &inf16, 2, cudaMemcpyHostToDevice));
    CHECK_OK(oscar_append(c, 0, 2, id, nt, kbad, vbad, OSCAR_DTYPE_F16, NULL));
    CHECK_OK(oscar_append(ref, 0, 1, &rid[1], &nt[1], (uint16_t *)kh + n, (uint16_t *)vh + n, OSCAR_DTYPE_F16, NULL));
    CHECK_ST(c, oscar_synchronize(c, NULL), OSCAR_E_NONFINITE);
    char want[32];
    snprintf(want, sizeof want, "sequence(s) %d;", (int)id[0]);
    CHECKF(strstr(oscar_last_error(c), want) != NULL, "nonfinite: message names the sequence: %s", oscar_last_error(c));
    CHECK_OK(oscar_poll(c)); /* reported once */
    /* attention: NaN rows for the failed sequence, the twin's for the other */
    const int hq = 8, d = 128;
    float *q = malloc(sizeof(float) * 2 * hq * d);
    tl_fill_normal(&r, q, 2 * hq * d, 0.1);
    void *qd = to_device(q, 2 * hq * d, OSCAR_DTYPE_F32), *od = NULL;
    CUCHECK(cudaMalloc(&od, sizeof(float) * 2 * hq * d));
    CUCHECK(cudaMemset(od, 0, sizeof(float) * 2 * hq * d));
    CHECK_OK(oscar_attention(c, 0, 2, id, 1, qd, OSCAR_DTYPE_F32, od, OSCAR_DTYPE_F32, 0.0f, NULL));
    float *o = malloc(sizeof(float) * 2 * hq * d), *orf = malloc(sizeof(float) * hq * d);
    CUCHECK(cudaMemcpy(o, od, sizeof(float) * 2 * hq * d, cudaMemcpyDeviceToHost));
    int nan_rows = 0;
    for (int i = 0; i < hq * d; i++) nan_rows += isnan(o[i]);
    CHECKF(nan_rows == hq * d, "nonfinite: %d of %d outputs of the failed sequence are NaN", nan_rows, hq * d);
    CHECK_OK(oscar_attention(ref, 0, 1, &rid[1], 1, q + hq * d, OSCAR_DTYPE_F32, orf, OSCAR_DTYPE_F32, 0.0f, NULL));
    double e = rel_l2(o + hq * d, orf, hq * d);
    CHECKF(e < 2e-3, "nonfinite: the healthy sequence of the same call: rel err %.3g", e);
    /* a report found on the device turns the next append into the error */
    CHECK_OK(oscar_append(c, 0, 1, &id[1], &nt[0], kbad, vd, OSCAR_DTYPE_F16, NULL));
    CUCHECK(cudaDeviceSynchronize());
    CHECK_ST(c, oscar_append(c, 0, 1, &id[1], &nt[0], kd, vd, OSCAR_DTYPE_F16, NULL), OSCAR_E_NONFINITE);
    CHECK_OK(oscar_poll(c));
    /* freeing releases the slot; a new sequence there starts healthy */
    CHECK_OK(oscar_seq_free(c, id[0]));
    CHECK_OK(oscar_seq_free(c, id[1]));
    int32_t fresh;
    CHECK_OK(oscar_seq_add(c, &fresh));
    CHECK_OK(oscar_append(c, 0, 1, &fresh, &nt[0], kd, vd, OSCAR_DTYPE_F16, NULL));
    CHECK_OK(oscar_attention(c, 0, 1, &fresh, 1, qd, OSCAR_DTYPE_F32, od, OSCAR_DTYPE_F32, 0.0f, NULL));
    CUCHECK(cudaMemcpy(o, od, sizeof(float) * hq * d, cudaMemcpyDeviceToHost));
    CHECK_OK(oscar_attention(ref, 0, 1, &rid[0], 1, q, OSCAR_DTYPE_F32, orf, OSCAR_DTYPE_F32, 0.0f, NULL));
    e = rel_l2(o, orf, hq * d);
    CHECKF(e < 2e-3, "nonfinite: a fresh sequence in the failed slot: rel err %.3g", e);
    CHECK_OK(oscar_synchronize(c, NULL));
    free(k), free(v), free(kh), free(vh), free(q), free(o), free(orf);
    cudaFree(kd), cudaFree(vd), cudaFree(vbad), cudaFree(kbad), cudaFree(qd), cudaFree(od);
    oscar_cache_destroy(c);
    oscar_cache_destroy(ref);
}

/* Per-kernel shared-memory limits are device-wide: a cache created after
 * another, with a shape that needs less shared memory, must not break the
 * first one's kernels (regression: it once lowered the limit). */
static void test_two_shapes(void) {
    oscar_config big = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 8, 32), small = big;
    big.backend = small.backend = OSCAR_BACKEND_CUDA;
    big.residual = 128;
    small.num_kv_heads = 1, small.num_q_heads = 4, small.k_group = 16, small.v_group = 16, small.residual = 32;
    oscar_cache *a = tl_create(&big), *b = tl_create(&small);
    big.backend = OSCAR_BACKEND_CPU;
    oscar_cache *ref = tl_create(&big);
    if (!a || !b || !ref) return;
    int32_t sa, sr;
    CHECK_OK(oscar_seq_add(a, &sa));
    CHECK_OK(oscar_seq_add(ref, &sr));
    tl_rng r = tl_rng_for("two_shapes");
    const int64_t T = 300, n = T * 8 * 128;
    float *k = malloc(sizeof(float) * n), *v = malloc(sizeof(float) * n);
    tl_gen_kv(&r, 0, k, v, T, 8, 128, OSCAR_DTYPE_BF16);
    void *kd = to_device(k, n, OSCAR_DTYPE_BF16), *vd = to_device(v, n, OSCAR_DTYPE_BF16);
    void *kh = malloc(2 * n), *vh = malloc(2 * n);
    tl_encode(k, OSCAR_DTYPE_BF16, kh, n);
    tl_encode(v, OSCAR_DTYPE_BF16, vh, n);
    int32_t nt = (int32_t)T;
    CHECK_OK(oscar_append(a, 0, 1, &sa, &nt, kd, vd, OSCAR_DTYPE_BF16, NULL));
    CHECK_OK(oscar_append(ref, 0, 1, &sr, &nt, kh, vh, OSCAR_DTYPE_BF16, NULL));
    CHECK_OK(oscar_synchronize(a, NULL));
    float *q = malloc(sizeof(float) * 32 * 128), *o = malloc(sizeof(float) * 32 * 128), *orf = malloc(sizeof(float) * 32 * 128);
    tl_fill_normal(&r, q, 32 * 128, 0.05);
    void *qd = to_device(q, 32 * 128, OSCAR_DTYPE_F32), *od = NULL;
    CUCHECK(cudaMalloc(&od, sizeof(float) * 32 * 128));
    CHECK_OK(oscar_attention(a, 0, 1, &sa, 1, qd, OSCAR_DTYPE_F32, od, OSCAR_DTYPE_F32, 0.0f, NULL));
    CUCHECK(cudaMemcpy(o, od, sizeof(float) * 32 * 128, cudaMemcpyDeviceToHost));
    CHECK_OK(oscar_attention(ref, 0, 1, &sr, 1, q, OSCAR_DTYPE_F32, orf, OSCAR_DTYPE_F32, 0.0f, NULL));
    const double e = rel_l2(o, orf, 32 * 128);
    CHECKF(e < 2e-3, "two shapes: the first cache after creating the second: rel err %.3g", e);
    free(k), free(v), free(kh), free(vh), free(q), free(o), free(orf);
    cudaFree(kd), cudaFree(vd), cudaFree(qd), cudaFree(od);
    oscar_cache_destroy(a);
    oscar_cache_destroy(b);
    oscar_cache_destroy(ref);
}

/* Speculative rounds on both backends through the sequence API with a
 * rollback lag: drafts appended, attended, partly truncated, a bonus token;
 * the streams must agree field by field and attention within 2e-3. */
static void test_rollback(void) {
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 2, 8);
    cfg.residual = 64;
    cfg.rollback_tokens = 6;
    cfg.num_layers = 2;
    pair P;
    if (!make_pair(&P, cfg)) {
        free_pair(&P);
        return;
    }
    int32_t sc, sg;
    CHECK_OK(oscar_seq_add(P.cpu, &sc));
    CHECK_OK(oscar_seq_add(P.gpu, &sg));
    tl_rng r = tl_rng_for("gpu rollback");
    const int hkv = 2, d = 128, hq = 8, rounds = g_small ? 12 : 60;
    float *k = malloc(sizeof(float) * 100 * hkv * d), *v = malloc(sizeof(float) * 100 * hkv * d);
    float *q = malloc(sizeof(float) * 8 * hq * d), *oc = malloc(sizeof(float) * 8 * hq * d),
          *og = malloc(sizeof(float) * 8 * hq * d);
    int64_t len = 0;
    int32_t n = 70;
    tl_gen_kv(&r, 1, k, v, n, hkv, d, OSCAR_DTYPE_BF16);
    for (int l = 0; l < 2; l++) both_append(&P, l, 1, &sc, &sg, &n, k, v, OSCAR_DTYPE_BF16);
    len = n;
    for (int i = 0; i < rounds; i++) {
        int32_t kd = tl_randint(&r, 1, 6);
        tl_gen_kv(&r, i % 3, k, v, kd, hkv, d, OSCAR_DTYPE_BF16);
        for (int l = 0; l < 2; l++) both_append(&P, l, 1, &sc, &sg, &kd, k, v, OSCAR_DTYPE_BF16);
        tl_fill_normal(&r, q, (int64_t)kd * hq * d, 0.1);
        CHECK_OK(tl_attention(P.cpu, 1, 1, &sc, kd, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oc, hq, d));
        CHECK_OK(gpu_attention(P.gpu, 1, 1, &sg, kd, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, og, hq, d));
        check_attn("rollback drafts", og, oc, (int64_t)kd * hq * d);
        const int acc = tl_randint(&r, 0, kd);
        CHECK_OK(oscar_seq_truncate(P.cpu, sc, len + acc));
        CHECK_OK(oscar_seq_truncate(P.gpu, sg, len + acc));
        len += acc;
        int32_t one = 1;
        tl_gen_kv(&r, 0, k, v, 1, hkv, d, OSCAR_DTYPE_BF16);
        for (int l = 0; l < 2; l++) both_append(&P, l, 1, &sc, &sg, &one, k, v, OSCAR_DTYPE_BF16);
        len++;
        tl_fill_normal(&r, q, hq * d, 0.1);
        CHECK_OK(tl_attention(P.cpu, 0, 1, &sc, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, oc, hq, d));
        CHECK_OK(gpu_attention(P.gpu, 0, 1, &sg, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, og, hq, d));
        check_attn("rollback decode", og, oc, hq * d);
    }
    CHECK_OK(oscar_synchronize(P.gpu, NULL));
    compare_seq(&P, sc, sg, "rollback walk");
    free(k), free(v), free(q), free(oc), free(og);
    free_pair(&P);
}

/* ---- sink tokens (config.sink_tokens) --------------------------------------
 * The CUDA backend against the CPU backend with S sink tokens: the first S
 * tokens of a sequence stay in the slot's sink rows, blocks hold the tokens
 * after them. Prompts shorter than S, exactly S and crossing S, in one
 * append call; long decode runs that pack many blocks (with a rollback lag:
 * drafts appended, attended and partly truncated, also while the sequence
 * is still in its sink rows); query chunks (q_len > 1) crossing S; fork;
 * export / import both ways. Checks: the export streams are the same bytes
 * (blocks, sink rows, window rows, sums of squares), so are the read-backs
 * (oscar_seq_read); attention (outputs NaN-poisoned) agrees with the CPU
 * backend within 2e-3 and with float64 attention over the read-back. */

typedef struct sink_case {
    const char *name;
    oscar_method method;
    int bits, d, hkv, hq, R, S, lag, layers;
    oscar_dtype W, in_dt, q_dt;
    int clip; /* config.clip_search (test_clip) */
    /* test_widths (0: the config's default): key_bits, value_bits,
     * key_norm_per_head, k_group, v_group */
    int kbits, vbits, norm_per_head, gk, gv;
} sink_case;

static double g_worst_sink_ref = 0.0; /* GPU attention vs float64 over its read-back, / bound */

/* The two exports of a sequence must be the same bytes; on a difference the
 * first differing byte and its region are printed, and compare_exports
 * gives the detail. Also the read-backs of every layer (sink rows through
 * read_sinks). */
static void same_stream(pair *P, int32_t sc, int32_t sg, const char *what) {
    size_t na = 0, nb = 0;
    unsigned char *a = tl_export(P->cpu, sc, &na), *b = tl_export(P->gpu, sg, &nb);
    if (a && b) {
        const int same = na == nb && memcmp(a, b, na) == 0;
        size_t first = 0;
        while (!same && first < na && first < nb && a[first] == b[first]) first++;
        const size_t hdr = 80 + 16 * (size_t)P->g.L;
        const size_t rows = hdr + (size_t)tl_rd32(a + 52) * (size_t)P->g.L * P->g.LB;
        CHECKF(same, "%s: exports differ (%zu vs %zu bytes; first difference at byte %zu, in the %s)", what, na, nb,
               first, first < hdr ? "header" : first < rows ? "blocks" : "sink/window rows or checksum");
        if (!same) compare_exports(&P->g, a, na, b, nb, what);
    }
    free(a), free(b);
    for (int l = 0; l < P->g.L; l++) {
        float *kc, *vc, *kg, *vg;
        const int64_t tc = tl_read_all(P->cpu, sc, l, P->g.hkv, P->g.d, &kc, &vc);
        const int64_t tg = tl_read_all(P->gpu, sg, l, P->g.hkv, P->g.d, &kg, &vg);
        const size_t n = (size_t)(tc > 0 ? tc : 0) * (size_t)P->g.hkv * (size_t)P->g.d * sizeof(float);
        CHECKF(tc == tg && memcmp(kc, kg, n) == 0 && memcmp(vc, vg, n) == 0,
               "%s: layer %d read-back differs (%lld vs %lld tokens)", what, l, (long long)tc, (long long)tg);
        free(kc), free(vc), free(kg), free(vg);
    }
}

/* n new tokens (random K/V of a flavour below TL_FLAVOR_HUGE, every layer)
 * for n_seqs sequences, nt[i] each, on both backends in one call per layer. */
static void sink_append(pair *P, tl_rng *r, const sink_case *C, int n_seqs, const int32_t *sc, const int32_t *sg,
                        const int32_t *nt, int flavor) {
    int64_t rows = 0;
    for (int i = 0; i < n_seqs; i++) rows += nt[i];
    const int64_t row = (int64_t)P->g.hkv * P->g.d;
    float *k = malloc(sizeof(float) * (size_t)(rows * row + 1)), *v = malloc(sizeof(float) * (size_t)(rows * row + 1));
    for (int l = 0; l < P->g.L; l++) {
        tl_gen_kv(r, flavor, k, v, rows, P->g.hkv, P->g.d, C->in_dt);
        oscar_status st = both_append(P, l, n_seqs, sc, sg, nt, k, v, C->in_dt);
        CHECKF(st == OSCAR_OK, "%s: append: %s %s", C->name, oscar_status_name(st), oscar_last_error(P->gpu));
    }
    free(k), free(v);
}

/* Attention of n_seqs sequences (q_len queries each) on both backends, every
 * layer: GPU within 2e-3 of the CPU. */
static void sink_attn(pair *P, tl_rng *r, const sink_case *C, int n_seqs, const int32_t *sc, const int32_t *sg,
                      int q_len, double knorm, const char *what) {
    const int hq = P->g.hq, d = P->g.d;
    const int64_t n = (int64_t)n_seqs * q_len * hq * d;
    float *q = malloc(sizeof(float) * (size_t)n), *oc = malloc(sizeof(float) * (size_t)n),
          *og = malloc(sizeof(float) * (size_t)n);
    for (int l = 0; l < P->g.L; l++) {
        tl_gen_q(r, q, (int64_t)n_seqs * q_len, hq, d, knorm, 2.0, C->q_dt);
        CHECK_OK(tl_attention(P->cpu, l, n_seqs, sc, q_len, q, C->q_dt, OSCAR_DTYPE_F32, 0.0f, oc, hq, d));
        oscar_status st = gpu_attention(P->gpu, l, n_seqs, sg, q_len, q, C->q_dt, OSCAR_DTYPE_F32, 0.0f, og, hq, d);
        CHECKF(st == OSCAR_OK, "%s: attention: %s %s", C->name, oscar_status_name(st), oscar_last_error(P->gpu));
        char w[200];
        snprintf(w, sizeof w, "%s: %s, layer %d, q_len %d", C->name, what, l, q_len);
        check_attn(w, og, oc, n);
    }
    free(q), free(oc), free(og);
}

/* GPU attention of one sequence (layer 0) against float64 attention over
 * its own read-back (sink, block and window tokens in the original space):
 * the causal limits of q_len queries over sinks, blocks and window. */
static void sink_ref_attn(pair *P, tl_rng *r, const sink_case *C, int32_t sg, int q_len, double knorm,
                          const char *what) {
    const int hq = P->g.hq, d = P->g.d, hkv = P->g.hkv;
    float *kl, *vl;
    const int64_t T = tl_read_all(P->gpu, sg, 0, hkv, d, &kl, &vl);
    if (T >= q_len) {
        const int64_t n = (int64_t)q_len * hq * d;
        float *q = malloc(sizeof(float) * (size_t)n), *og = malloc(sizeof(float) * (size_t)n);
        double *oref = malloc(sizeof(double) * (size_t)n), *mag = malloc(sizeof(double) * (size_t)(q_len * hq));
        tl_gen_q(r, q, q_len, hq, d, knorm, 2.0, OSCAR_DTYPE_F32);
        CHECK_OK(gpu_attention(P->gpu, 0, 1, &sg, q_len, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, og, hq, d));
        tl_ref_attention_f(d, hkv, hq, kl, vl, T, q_len, q, 1.0 / sqrt((double)d), oref, mag);
        /* the kernels round p (and p * scale) to fp16: ~2^-10 of the output's scale */
        const double tol = 4e-3;
        double worst = 0.0;
        const int64_t bad = tl_compare_out(og, oref, mag, (int64_t)q_len * hq, d, OSCAR_DTYPE_F32, tol, &worst);
        if (worst / tol > g_worst_sink_ref) g_worst_sink_ref = worst / tol;
        CHECKF(bad == 0, "%s: %s: attention vs float64 over the read-back (%lld tokens, q_len %d): %lld elements "
               "off, worst %.3g", C->name, what, (long long)T, q_len, (long long)bad, worst);
        free(q), free(og), free(oref), free(mag);
    }
    free(kl), free(vl);
}

/* Export / import: GPU -> GPU and CPU -> GPU give the same bytes again,
 * GPU -> CPU too; attention over the imported copy agrees with the CPU. */
static void sink_roundtrip(pair *P, tl_rng *r, const sink_case *C, int32_t sc, int32_t sg, double knorm,
                           const char *what) {
    size_t ng = 0, nc = 0;
    unsigned char *eg = tl_export(P->gpu, sg, &ng), *ec = tl_export(P->cpu, sc, &nc);
    char w[200];
    if (eg && ec) {
        int32_t gg = -1, cg = -1, gc = -1;
        CHECK_OK(oscar_seq_import(P->gpu, eg, ng, &gg));
        CHECK_OK(oscar_seq_import(P->gpu, ec, nc, &cg));
        CHECK_OK(oscar_seq_import(P->cpu, eg, ng, &gc));
        if (gg >= 0 && cg >= 0 && gc >= 0) {
            size_t n1 = 0, n2 = 0, n3 = 0;
            unsigned char *b1 = tl_export(P->gpu, gg, &n1), *b2 = tl_export(P->gpu, cg, &n2),
                          *b3 = tl_export(P->cpu, gc, &n3);
            CHECKF(b1 && n1 == ng && memcmp(b1, eg, ng) == 0, "%s: %s: GPU -> GPU import exports differently", C->name,
                   what);
            CHECKF(b2 && n2 == nc && memcmp(b2, ec, nc) == 0, "%s: %s: CPU -> GPU import exports differently", C->name,
                   what);
            CHECKF(b3 && n3 == ng && memcmp(b3, eg, ng) == 0, "%s: %s: GPU -> CPU import exports differently", C->name,
                   what);
            free(b1), free(b2), free(b3);
            oscar_seq_info info;
            CHECK_OK(oscar_seq_info_get(P->gpu, gg, 0, &info));
            const int qls[2] = {1, info.tokens < 3 ? (int)info.tokens : 3};
            for (int i = 0; i < 2; i++) {
                snprintf(w, sizeof w, "%s, GPU -> GPU import", what);
                sink_attn(P, r, C, 1, &sc, &gg, qls[i], knorm, w);
                snprintf(w, sizeof w, "%s, CPU -> GPU import", what);
                sink_attn(P, r, C, 1, &sc, &cg, qls[i], knorm, w);
            }
        }
        if (gg >= 0) CHECK_OK(oscar_seq_free(P->gpu, gg));
        if (cg >= 0) CHECK_OK(oscar_seq_free(P->gpu, cg));
        if (gc >= 0) CHECK_OK(oscar_seq_free(P->cpu, gc));
    }
    free(eg), free(ec);
}

static oscar_config sink_config(const sink_case *C) {
    oscar_config cfg = tl_small_config(C->method, C->bits, C->d, C->hkv, C->hq);
    cfg.residual = C->R;
    cfg.sink_tokens = C->S;
    cfg.rollback_tokens = C->lag;
    cfg.num_layers = C->layers;
    cfg.window_dtype = C->W;
    cfg.clip_search = C->clip;
    cfg.key_bits = C->kbits;
    cfg.value_bits = C->vbits;
    cfg.key_norm_per_head = C->norm_per_head;
    if (C->gk) cfg.k_group = C->gk;
    if (C->gv) cfg.v_group = C->gv;
    cfg.block_count = 256;
    cfg.max_seqs = 12;
    return cfg;
}

static void run_sink_case(const sink_case *C) {
    const oscar_config cfg = sink_config(C);
    pair P;
    if (!make_pair(&P, cfg)) {
        free_pair(&P);
        return;
    }
    tl_rng r = tl_rng_for(C->name);
    const int S = C->S, R = C->R, lag = C->lag;
    char w[200];
    double knorm; /* RMS key head norm: queries are scaled to logits of std ~2 */
    {
        const int64_t n = 64 * (int64_t)C->hkv * C->d;
        float *k = malloc(sizeof(float) * (size_t)n), *v = malloc(sizeof(float) * (size_t)n);
        tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 64, C->hkv, C->d, C->in_dt);
        knorm = tl_key_rms_norm(k, 64, C->hkv, C->d);
        free(k), free(v);
    }
    /* three sequences in one append call: a prompt shorter than S (S = 1:
     * exactly S), exactly S, and one crossing S that packs a block (S = 0:
     * prompts of 1, 1 and R + lag + 5 tokens) */
    int32_t sc[3], sg[3];
    for (int i = 0; i < 3; i++) {
        CHECK_OK(oscar_seq_add(P.cpu, &sc[i]));
        CHECK_OK(oscar_seq_add(P.gpu, &sg[i]));
    }
    const int32_t prompt[3] = {S > 1 ? (S + 1) / 2 : 1, S > 1 ? S : 1, S + R + lag + 5};
    sink_append(&P, &r, C, 3, sc, sg, prompt, TL_FLAVOR_SINKS);
    for (int i = 0; i < 3; i++) {
        snprintf(w, sizeof w, "%s prompt %d of %d tokens", C->name, i, (int)prompt[i]);
        sink_attn(&P, &r, C, 1, &sc[i], &sg[i], prompt[i], knorm, "prefill (q_len = the prompt)");
        same_stream(&P, sc[i], sg[i], w);
        sink_ref_attn(&P, &r, C, sg[i], prompt[i] < 8 ? prompt[i] : 8, knorm, "after the prefill");
    }
    sink_roundtrip(&P, &r, C, sc[0], sg[0], knorm, "prompt shorter than S");
    sink_roundtrip(&P, &r, C, sc[2], sg[2], knorm, "prompt crossing S");
    /* fork the one still in its sink rows and the one with a block; the
     * children grow differently from their parents */
    int32_t fc[2], fg[2];
    CHECK_OK(oscar_seq_fork(P.cpu, sc[0], &fc[0]));
    CHECK_OK(oscar_seq_fork(P.gpu, sg[0], &fg[0]));
    CHECK_OK(oscar_seq_fork(P.cpu, sc[2], &fc[1]));
    CHECK_OK(oscar_seq_fork(P.gpu, sg[2], &fg[1]));
    same_stream(&P, fc[0], fg[0], "fork of a sequence in its sink rows");
    same_stream(&P, fc[1], fg[1], "fork of a sequence with a block");
    const int32_t grow[2] = {S + 3, R + 1};
    sink_append(&P, &r, C, 2, fc, fg, grow, TL_FLAVOR_NORMAL);
    for (int i = 0; i < 2; i++) {
        sink_attn(&P, &r, C, 1, &fc[i], &fg[i], grow[i], knorm, "forked child");
        same_stream(&P, fc[i], fg[i], "forked child after its own tokens");
    }
    /* decode: one token to each of the three per step, until each has packed
     * several blocks; with a rollback lag, every 4th step sequence 0 gets
     * 1..6 drafts, attended, then truncated to a random accepted count */
    const int steps = (g_small ? 1 : 3) * R + lag + 9; /* --small: compute-sanitizer */
    int64_t len0 = prompt[0];
    for (int t = 0; t < steps; t++) {
        if (lag > 0 && t % 4 == 1) {
            int32_t kd = tl_randint(&r, 1, 6);
            sink_append(&P, &r, C, 1, &sc[0], &sg[0], &kd, t % TL_FLAVOR_HUGE);
            sink_attn(&P, &r, C, 1, &sc[0], &sg[0], kd, knorm, "drafts");
            const int acc = tl_randint(&r, 0, kd);
            CHECK_OK(oscar_seq_truncate(P.cpu, sc[0], len0 + acc));
            CHECK_OK(oscar_seq_truncate(P.gpu, sg[0], len0 + acc));
            len0 += acc;
        }
        const int32_t one[3] = {1, 1, 1};
        sink_append(&P, &r, C, 3, sc, sg, one, t % TL_FLAVOR_HUGE);
        len0++;
        sink_attn(&P, &r, C, 3, sc, sg, 1, knorm, "decode");
        if (t % (R / 2) == R / 2 - 1 || t == steps - 1) {
            for (int i = 0; i < 3; i++) {
                snprintf(w, sizeof w, "%s decode step %d seq %d", C->name, t, i);
                same_stream(&P, sc[i], sg[i], w);
            }
            sink_ref_attn(&P, &r, C, sg[0], 1, knorm, "decode");
        }
    }
    {
        oscar_seq_info info;
        CHECK_OK(oscar_seq_info_get(P.gpu, sg[1], 0, &info));
        CHECKF(info.packed_tokens >= (g_small ? 1 : 2) * R, "%s: the decode run packed only %lld tokens", C->name,
               (long long)info.packed_tokens);
    }
    /* query chunks crossing S, from an empty sequence: below S, across it,
     * a block's worth, single tokens, two blocks, a few */
    int32_t qc, qg;
    CHECK_OK(oscar_seq_add(P.cpu, &qc));
    CHECK_OK(oscar_seq_add(P.gpu, &qg));
    const int32_t chunks[7] = {S > 2 ? S - 2 : 1, 5, R + 3, 1, 2 * R + lag + 1, 3, 1};
    for (int i = 0; i < 7; i++) {
        sink_append(&P, &r, C, 1, &qc, &qg, &chunks[i], i % TL_FLAVOR_HUGE);
        snprintf(w, sizeof w, "chunk %d of %d tokens", i, (int)chunks[i]);
        sink_attn(&P, &r, C, 1, &qc, &qg, chunks[i], knorm, w);
        sink_ref_attn(&P, &r, C, qg, chunks[i] < 40 ? chunks[i] : 40, knorm, w);
    }
    same_stream(&P, qc, qg, "query chunks crossing S");
    /* the end state: every sequence exports and imports both ways */
    for (int i = 0; i < 3; i++) sink_roundtrip(&P, &r, C, sc[i], sg[i], knorm, "after the decode run");
    sink_roundtrip(&P, &r, C, qc, qg, knorm, "after the query chunks");
    CHECK_ST(P.gpu, oscar_synchronize(P.gpu, NULL), OSCAR_OK);
    free_pair(&P);
}

/* A NaN in the input of a sink row marks the sequence failed on the device,
 * like one in a window row: reported once, NaN attention rows. */
static void test_sinks_nonfinite(void) {
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 2, 8);
    cfg.backend = OSCAR_BACKEND_CUDA;
    cfg.sink_tokens = 16;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    int32_t id;
    CHECK_OK(oscar_seq_add(c, &id));
    tl_rng r = tl_rng_for("sinks nonfinite");
    const int64_t T = 10, n = T * 2 * 128;
    float *k = malloc(sizeof(float) * n), *v = malloc(sizeof(float) * n);
    tl_gen_kv(&r, 0, k, v, T, 2, 128, OSCAR_DTYPE_F32);
    k[5 * 2 * 128 + 7] = NAN; /* token 5: a sink row */
    void *kd = to_device(k, n, OSCAR_DTYPE_F32), *vd = to_device(v, n, OSCAR_DTYPE_F32);
    int32_t nt = (int32_t)T;
    CHECK_OK(oscar_append(c, 0, 1, &id, &nt, kd, vd, OSCAR_DTYPE_F32, NULL));
    CHECK_ST(c, oscar_synchronize(c, NULL), OSCAR_E_NONFINITE);
    CHECK_OK(oscar_poll(c));
    const int hq = 8, d = 128;
    float *q = malloc(sizeof(float) * hq * d), *o = malloc(sizeof(float) * hq * d);
    tl_fill_normal(&r, q, hq * d, 0.1);
    CHECK_OK(gpu_attention(c, 0, 1, &id, 1, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, hq, d));
    int nan_out = 0;
    for (int i = 0; i < hq * d; i++) nan_out += isnan(o[i]);
    CHECKF(nan_out == hq * d, "sinks nonfinite: %d of %d outputs are NaN", nan_out, hq * d);
    free(k), free(v), free(q), free(o);
    cudaFree(kd), cudaFree(vd);
    oscar_cache_destroy(c);
}

/* Runs the first `count` cases of a list (all of them, or `small` with
 * --small) through run_sink_case and prints a line per case. */
static void run_sink_cases(const sink_case *cases, int count, int small, int width) {
    for (int i = 0; i < (g_small ? small : count); i++) {
        const long before = tl_failed;
        run_sink_case(&cases[i]);
        printf("  %-*s %s\n", width, cases[i].name, tl_failed == before ? "ok" : "FAILED");
        fflush(stdout);
    }
}

/* clip_search on the CUDA backend: the searched (scale, lo) pairs, and so
 * the exports, byte-identical to the CPU backend's, with and without sink
 * tokens; attention as in test_sinks. */
static void test_clip(void) {
    static const sink_case cases[] = {
        /* name, method, bits, d, hkv, hq, R, S, lag, layers, W, in, q, clip */
        {"clip oscar b2 d128 R64 (the fused pack's shape)", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 64, 0, 0, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 1, 0, 0, 0, 0, 0},
        {"clip kivi b2 d64 R32 S7 lag32", OSCAR_METHOD_KIVI, 2, 64, 2, 4, 32, 7, 32, 1, OSCAR_DTYPE_BF16,
         OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 1, 0, 0, 0, 0, 0},
        {"clip oscar b4 d256 R64 S32", OSCAR_METHOD_OSCAR, 4, 256, 1, 4, 64, 32, 0, 1, OSCAR_DTYPE_F16,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 1, 0, 0, 0, 0, 0},
        {"clip scale-only b2 d128 R128 lag64 f32 window", OSCAR_METHOD_SCALE_ONLY, 2, 128, 2, 8, 128, 0, 64, 1,
         OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 1, 0, 0, 0, 0, 0},
    };
    run_sink_cases(cases, (int)(sizeof cases / sizeof cases[0]), 1, 60);
}

static void test_sinks(void) {
    static const sink_case cases[] = {
        /* name, method, bits, d, hkv, hq, R, S, lag, layers, W, in, q */
        {"sinks oscar b2 d128 R32 S7 (fast decode kernel)", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 32, 7, 0, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0},
        {"sinks oscar b2 d128 R64 S32 lag64 bf16, 2 layers", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 64, 32, 64, 2,
         OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0},
        {"sinks oscar b2 d64 R128 S64 (fused pack d64)", OSCAR_METHOD_OSCAR, 2, 64, 2, 4, 128, 64, 0, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0, 0, 0, 0, 0, 0},
        {"sinks kivi b4 d128 R32 S1 lag32", OSCAR_METHOD_KIVI, 4, 128, 1, 4, 32, 1, 32, 1, OSCAR_DTYPE_F16,
         OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0, 0, 0, 0, 0, 0},
        {"sinks none d64 R32 S7 lag32", OSCAR_METHOD_NONE, 16, 64, 2, 4, 32, 7, 32, 1, OSCAR_DTYPE_F16,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0, 0, 0, 0, 0, 0},
        {"sinks quarot b2 d256 R64 S64 f32 window", OSCAR_METHOD_QUAROT, 2, 256, 1, 2, 64, 64, 0, 1,
         OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0, 0, 0, 0, 0, 0},
        {"sinks oscar b2 d128 hkv8 hq32 R128 S32 lag64", OSCAR_METHOD_OSCAR, 2, 128, 8, 32, 128, 32, 64, 1,
         OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0},
        {"sinks scale-only b2 d128 R64 S1 gq16 (g=16)", OSCAR_METHOD_SCALE_ONLY, 2, 128, 1, 16, 64, 1, 0, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, 0, 0, 0, 0, 0, 0},
    };
    run_sink_cases(cases, (int)(sizeof cases / sizeof cases[0]), 2, 60);
    printf("  worst GPU attention vs float64 over the read-back: %.3g of the bound\n", g_worst_sink_ref);
}

/* Key and value widths (key_bits, value_bits: 2, 3 or 4 each; 3 bits are
 * two code planes, format version 5) and per-head key norms
 * (key_norm_per_head, version 4) on the CUDA backend: the same walk as the
 * sink tests (prefill, decode with drafts, query chunks, fork, export and
 * import both ways), exports byte-identical to the CPU backend's, attention
 * within 2e-3 of it and within the bound of float64 attention over the
 * read-back. Every (key, value) width pair runs on one of the head dims, the
 * recommended K3/V2 configuration on SmolLM2's shape and on d = 128. */
static void test_widths(void) {
    static const sink_case cases[] = {
        /* name, method, bits, d, hkv, hq, R, S, lag, layers, W, in, q, clip, kbits, vbits, per-head, gk, gv */
        {"K3/V2 oscar d64 hkv3 hq9 R64 S32 lag64 g64/64 (recommended, SmolLM2 shape)", OSCAR_METHOD_OSCAR, 2, 64, 3, 9,
         64, 32, 64, 1, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0, 3, 2, 0, 64, 64},
        {"K3/V2 oscar d128 R64 S32 lag64 g64/64 bf16, 2 layers", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 64, 32, 64, 2,
         OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 3, 2, 0, 64, 64},
        {"K4/V2 oscar d128 R32", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 32, 0, 0, 1, OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16,
         OSCAR_DTYPE_BF16, 0, 4, 2, 0, 0, 0},
        {"K2/V4 oscar d64 R32 S4", OSCAR_METHOD_OSCAR, 2, 64, 2, 4, 32, 4, 0, 1, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16,
         OSCAR_DTYPE_F16, 0, 2, 4, 0, 0, 0},
        {"K3/V3 kivi d256 R32 f32 window", OSCAR_METHOD_KIVI, 2, 256, 1, 2, 32, 0, 0, 1, OSCAR_DTYPE_F32,
         OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0, 3, 3, 0, 0, 0},
        {"K2/V3 quarot d128 R48 g16/16", OSCAR_METHOD_QUAROT, 2, 128, 2, 8, 48, 0, 16, 1, OSCAR_DTYPE_F16,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F32, 0, 2, 3, 0, 16, 16},
        {"K4/V3 scale-only d64 R32 S1 (g=16)", OSCAR_METHOD_SCALE_ONLY, 2, 64, 1, 16, 32, 1, 0, 1, OSCAR_DTYPE_BF16,
         OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 4, 3, 0, 0, 0},
        {"K3/V4 oscar d128 R32 clip", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 32, 0, 0, 1, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16,
         OSCAR_DTYPE_F16, 1, 3, 4, 0, 0, 0},
        {"K2/V2 oscar d128 R32 per-head norms (not the fast kernel)", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 32, 0, 0, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 0, 0, 1, 0, 0},
        {"K3/V2 oscar d64 hkv3 hq9 R64 S16 lag32 per-head norms", OSCAR_METHOD_OSCAR, 2, 64, 3, 9, 64, 16, 32, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0, 3, 2, 1, 64, 64},
        {"b4 scale-only d256 hkv2 R32 per-head norms", OSCAR_METHOD_SCALE_ONLY, 4, 256, 2, 4, 32, 0, 0, 1,
         OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_F32, 0, 0, 0, 1, 0, 0},
        {"K2/V2 oscar d128 hkv8 hq32 R128 per-head norms, 2 layers", OSCAR_METHOD_OSCAR, 2, 128, 8, 32, 128, 0, 64, 2,
         OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 0, 0, 1, 0, 0},
    };
    run_sink_cases(cases, (int)(sizeof cases / sizeof cases[0]), 3, 72);
}

/* Long sequences: with tens of blocks the attention call splits a
 * sequence's chunks over several CTAs, and the exact tokens (sink rows and
 * window) are shared among those splits. Two sequences of different
 * lengths (blocks, window fill) in one call; decode steps and a query
 * chunk; against the CPU backend and float64 over the read-back. */
static void run_long_case(const sink_case *C, int blocks) {
    oscar_config cfg = sink_config(C);
    cfg.block_count = 2 * blocks + 8;
    pair P;
    if (!make_pair(&P, cfg)) {
        free_pair(&P);
        return;
    }
    tl_rng r = tl_rng_for(C->name);
    double knorm;
    {
        const int64_t n = 64 * (int64_t)C->hkv * C->d;
        float *k = malloc(sizeof(float) * (size_t)n), *v = malloc(sizeof(float) * (size_t)n);
        tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 64, C->hkv, C->d, C->in_dt);
        knorm = tl_key_rms_norm(k, 64, C->hkv, C->d);
        free(k), free(v);
    }
    int32_t sc[2], sg[2];
    for (int i = 0; i < 2; i++) {
        CHECK_OK(oscar_seq_add(P.cpu, &sc[i]));
        CHECK_OK(oscar_seq_add(P.gpu, &sg[i]));
    }
    const int32_t prompt[2] = {C->S + C->lag + blocks * C->R + C->R / 2 + 3, C->S + C->lag + (blocks / 2) * C->R + 1};
    sink_append(&P, &r, C, 2, sc, sg, prompt, TL_FLAVOR_SINKS);
    for (int t = 0; t < C->R + 3; t++) {
        const int32_t one[2] = {1, 1};
        sink_append(&P, &r, C, 2, sc, sg, one, t % TL_FLAVOR_HUGE);
        if (t % 8 == 0 || t == C->R + 2) sink_attn(&P, &r, C, 2, sc, sg, 1, knorm, "long decode");
        if (t % 32 == 0) sink_ref_attn(&P, &r, C, sg[0], 1, knorm, "long decode");
    }
    const int32_t chunk[2] = {7, 5};
    sink_append(&P, &r, C, 2, sc, sg, chunk, TL_FLAVOR_NORMAL);
    sink_attn(&P, &r, C, 1, &sc[1], &sg[1], 5, knorm, "long, query chunk");
    sink_ref_attn(&P, &r, C, sg[0], 7, knorm, "long, query chunk");
    for (int i = 0; i < 2; i++) same_stream(&P, sc[i], sg[i], "long sequence");
    free_pair(&P);
}

static void test_long(void) {
    static const sink_case cases[] = {
        /* name, method, bits, d, hkv, hq, R, S, lag, layers, W, in, q, clip, kbits, vbits, per-head, gk, gv */
        {"long: oscar b2 d128 R64 S32 lag64 (fast kernel), 48 blocks", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 64, 32, 64,
         1, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0},
        {"long: K3/V2 oscar d64 hkv3 hq9 R64 S32 lag64 g64/64, 48 blocks", OSCAR_METHOD_OSCAR, 2, 64, 3, 9, 64, 32,
         64, 1, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0, 3, 2, 0, 64, 64},
        {"long: oscar b2 d128 R128 (published), 40 blocks", OSCAR_METHOD_OSCAR, 2, 128, 2, 8, 128, 0, 0, 1,
         OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, OSCAR_DTYPE_F16, 0, 0, 0, 0, 0, 0},
    };
    const int blocks[3] = {48, 48, 40};
    for (int i = 0; i < (g_small ? 1 : 3); i++) {
        const long before = tl_failed;
        run_long_case(&cases[i], g_small ? 20 : blocks[i]);
        printf("  %-72s %s\n", cases[i].name, tl_failed == before ? "ok" : "FAILED");
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    /* groups: --sinks (sink tokens, clip), --widths (key/value widths,
     * per-head norms, long sequences), --long (long sequences alone),
     * --basic (the rest); none: all */
    int sinks = 0, widths = 0, longs = 0, basic = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--small")) g_small = 1;
        else if (!strcmp(argv[i], "--sinks")) sinks = 1;
        else if (!strcmp(argv[i], "--widths")) widths = longs = 1;
        else if (!strcmp(argv[i], "--long")) longs = 1;
        else if (!strcmp(argv[i], "--basic")) basic = 1;
        else {
            printf("usage: %s [--small] [--sinks] [--widths] [--long] [--basic]\n", argv[0]);
            return 2;
        }
    }
    if (!sinks && !widths && !longs && !basic) sinks = widths = longs = basic = 1;
    if (!oscar_backend_available(OSCAR_BACKEND_CUDA)) {
        printf("SKIP: no CUDA device (the CUDA backend is %s)\n",
               oscar_backend_available(OSCAR_BACKEND_CPU) ? "compiled, no device found" : "unavailable");
        return 77;
    }
    if (basic) {
        TL_RUN(test_nonfinite);
        TL_RUN(test_two_shapes);
        TL_RUN(test_rollback);
    }
    if (sinks) {
        TL_RUN(test_sinks_nonfinite);
        TL_RUN(test_sinks);
        TL_RUN(test_clip);
    }
    if (widths) TL_RUN(test_widths);
    if (longs) TL_RUN(test_long);
    if (basic) TL_RUN(test_matrix);
    printf("codes differing: %lld of %lld (%.2e); parameters differing: %lld of %lld; worst attention rel L2 %.3g\n",
           (long long)g_code_diffs, (long long)g_codes, g_codes ? (double)g_code_diffs / g_codes : 0.0,
           (long long)g_param_diffs, (long long)g_params, g_worst_attn);
    return tl_finish();
}
