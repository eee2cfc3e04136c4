/*
 * tni.c - `oscar tni`: Token Norm Imbalance of the keys of a real model.
 *
 * For every layer it runs the model over the first N tokens of a text,
 * collects the post-RoPE keys and reports how unequal token norms are inside
 * the key quantisation groups (G_k consecutive tokens), before and after
 * Canalized Rotation + Omni-Token Scaling, which tokens are the small-norm
 * sinks, and the key reconstruction error each method gets from the library.
 */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"
#include "model_commands.h"
#include "png.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct keys_store {
    int n_layers, kvd;
    int64_t cap;
    float *k; /* [layers][cap][kvd] */
} keys_store;

static void keep_keys(void *ud, int layer, int64_t pos0, int n, const float *k) {
    keys_store *ks = ud;
    if (pos0 + n > ks->cap) return;
    memcpy(ks->k + ((int64_t)layer * ks->cap + pos0) * ks->kvd, k, (size_t)n * ks->kvd * sizeof(float));
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Relative squared error of the keys the library reconstructs for `method`
 * over the quantised (packed) tokens, overall and on the `sinks` tokens. */
static int key_error(const float *k, int64_t T, int hkv, int d, oscar_method method, int bits, int kg, int res,
                     const int *sinks, int n_sinks, double *err_all, double *err_sinks) {
    oscar_config c = oscar_config_default();
    c.method = method;
    c.bits = bits;
    c.head_dim = d;
    c.num_kv_heads = hkv;
    c.num_q_heads = hkv;
    c.num_layers = 1;
    c.k_group = kg;
    c.residual = res;
    c.max_seqs = 1;
    c.block_count = (int)(T / res + 2);
    c.window_dtype = OSCAR_DTYPE_F32;
    oscar_cache *oc = NULL;
    char e[256];
    if (oscar_cache_create(&c, &oc, e, sizeof e) != OSCAR_OK) return -1;
    int32_t seq;
    int32_t nt = (int32_t)T;
    int64_t packed = T / res * res;
    float *back = malloc((size_t)(packed > 0 ? packed : 1) * hkv * d * sizeof(float));
    int rc = -1;
    if (back && oscar_seq_add(oc, &seq) == OSCAR_OK &&
        oscar_append(oc, 0, 1, &seq, &nt, k, k, OSCAR_DTYPE_F32, NULL) == OSCAR_OK &&
        (packed == 0 || oscar_seq_read(oc, seq, 0, 0, packed, back, NULL) == OSCAR_OK)) {
        double num = 0, den = 0, sn = 0, sd = 0;
        int64_t kvd = (int64_t)hkv * d;
        for (int64_t t = 0; t < packed; t++) {
            double a = 0, b = 0;
            for (int64_t i = 0; i < kvd; i++) {
                double x = k[t * kvd + i], y = back[t * kvd + i];
                a += (x - y) * (x - y);
                b += x * x;
            }
            num += a;
            den += b;
            for (int s = 0; s < n_sinks; s++)
                if (sinks[s] == t) { sn += a; sd += b; }
        }
        *err_all = den > 0 ? num / den : 0;
        *err_sinks = sd > 0 ? sn / sd : NAN;
        rc = 0;
    }
    free(back);
    oscar_cache_destroy(oc);
    return rc;
}

typedef struct layer_stats {
    float nmin, nmed, nmax;
    double grp_mean, grp_worst;      /* token-norm max/min inside key groups, raw keys */
    double ots_grp_worst;            /* same after rotation + token scaling (1 by design) */
    double head_worst_raw, head_worst_ots; /* per-head norm max/min inside groups */
    int sinks[8], n_sinks, n_small;
    double err[4], err_sink[4];
} layer_stats;

static void heat_colour(double x, uint8_t *px) {
    if (x < 0) x = 0;
    if (x > 1) x = 1;
    /* dark blue -> teal -> yellow: readable, monotone in lightness */
    px[0] = (uint8_t)(255 * pow(x, 1.3));
    px[1] = (uint8_t)(30 + 215 * pow(x, 0.7));
    px[2] = (uint8_t)(90 + 60 * x - 130 * x * x > 0 ? 90 + 60 * x - 130 * x * x : 0);
}

static int write_plot(const char *path, const float *k, int64_t T, int hkv, int d, const float *norms,
                      const layer_stats *ls, int kg) {
    int64_t Tp = T > 512 ? 512 : T;
    int px = (int)(512 / Tp) > 0 ? (int)(512 / Tp) : 1;
    int kvd = hkv * d, rows = kvd > 256 ? 256 : kvd, rstep = (kvd + rows - 1) / rows;
    rows = (kvd + rstep - 1) / rstep;
    int W = (int)Tp * px + 8, H1 = 150, gap = 6, H = 4 + H1 + gap + rows + gap + rows + 4;
    uint8_t *img = malloc((size_t)W * H * 3);
    float *rot = malloc((size_t)Tp * kvd * sizeof(float)), *tmp = malloc((size_t)Tp * kvd * sizeof(float));
    if (!img || !rot || !tmp) { free(img); free(rot); free(tmp); return -1; }
    memset(img, 255, (size_t)W * H * 3);
#define PIX(x, y) (img + ((size_t)(y) * W + (x)) * 3)
    /* panel 1: token norms (blue), group boundaries (grey), sinks (red) */
    float nmax = 0;
    for (int64_t t = 0; t < Tp; t++) nmax = norms[t] > nmax ? norms[t] : nmax;
    for (int64_t t = 0; t < Tp; t += kg)
        for (int y = 4; y < 4 + H1; y++) { uint8_t *p = PIX(4 + t * px, y); p[0] = p[1] = p[2] = 215; }
    for (int x = 4; x < W - 4; x++) { uint8_t *p = PIX(x, 4 + H1 - 1); p[0] = p[1] = p[2] = 120; }
    for (int64_t t = 0; t < Tp; t++) {
        int h = nmax > 0 ? (int)((H1 - 2) * norms[t] / nmax) : 0;
        int sink = 0;
        for (int s = 0; s < ls->n_sinks; s++) sink |= ls->sinks[s] == t;
        for (int y = 0; y <= h; y++)
            for (int xx = 0; xx < px; xx++) {
                uint8_t *p = PIX(4 + t * px + xx, 4 + H1 - 2 - y);
                if (y >= h - 1 || sink) { p[0] = sink ? 220 : 30; p[1] = sink ? 30 : 80; p[2] = sink ? 30 : 200; }
                else { p[0] = 190; p[1] = 205; p[2] = 240; }
            }
    }
    /* panels 2 and 3: |k| per channel (rows) and token (columns), raw and after
     * rotation + token scaling, each scaled to its own 99th percentile */
    memcpy(rot, k, (size_t)Tp * kvd * sizeof(float));
    oscar_hadamard(rot, Tp * hkv, d);
    for (int64_t t = 0; t < Tp; t++) {
        double s = norms[t] > 0 ? norms[t] : 1;
        for (int i = 0; i < kvd; i++) rot[t * kvd + i] = (float)(rot[t * kvd + i] / s);
    }
    for (int panel = 0; panel < 2; panel++) {
        const float *src = panel == 0 ? k : rot;
        for (int64_t i = 0; i < Tp * kvd; i++) tmp[i] = fabsf(src[i]);
        qsort(tmp, (size_t)(Tp * kvd), sizeof *tmp, cmp_float);
        float hi = tmp[(size_t)(0.99 * (Tp * kvd - 1))];
        if (hi <= 0) hi = 1;
        int y0 = 4 + H1 + gap + panel * (rows + gap);
        for (int r = 0; r < rows; r++)
            for (int64_t t = 0; t < Tp; t++) {
                float v = 0;
                for (int j = 0; j < rstep && r * rstep + j < kvd; j++) {
                    float a = fabsf(src[t * kvd + r * rstep + j]);
                    v = a > v ? a : v;
                }
                for (int xx = 0; xx < px; xx++) heat_colour(v / hi, PIX(4 + t * px + xx, y0 + r));
            }
    }
#undef PIX
    int rc = png_write_rgb(path, img, W, H);
    free(img); free(rot); free(tmp);
    return rc;
}

typedef struct tni_args {
    const char *model, *text, *png;
    int layer, tokens, k_group, bits, residual, threads;
    int cuda; /* --device cuda: the keys come from the GPU runner */
} tni_args;

static int tni_parse(int argc, char **argv, tni_args *a) {
    memset(a, 0, sizeof *a);
    a->model = getenv("OSCAR_MODEL") ? getenv("OSCAR_MODEL") : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    a->layer = -1;
    a->tokens = 512;
    a->k_group = 32;
    a->bits = 2;
    a->residual = 128;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *iv = NULL;
        long lo = 1, hi = 1 << 20;
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            fprintf(stderr,
                    "usage: oscar tni --model M.gguf --text FILE [--layer L] [--png out.png] [--tokens N]\n"
                    "                 [--k-group G] [--bits 2|4] [--residual R] [--threads N]\n"
                    "                 [--device cpu|cuda]\n"
                    "  Per-layer statistics of key token norms before and after Canalized Rotation and\n"
                    "  Omni-Token Scaling, the sink tokens, and a PNG of layer L's keys (default: the\n"
                    "  layer with the worst imbalance).\n");
            return 2;
        }
        if (!strcmp(o, "--device")) {
            if (!v || (strcmp(v, "cpu") && strcmp(v, "cuda"))) {
                fprintf(stderr, "oscar tni: --device: cpu or cuda\n");
                return -1;
            }
            a->cuda = !strcmp(v, "cuda");
            i++;
            continue;
        }
        if (!strcmp(o, "--model") || !strcmp(o, "-m") || !strcmp(o, "--text") || !strcmp(o, "--png")) {
            if (!v) { fprintf(stderr, "oscar tni: %s needs a value\n", o); return -1; }
            if (!strcmp(o, "--text")) a->text = v;
            else if (!strcmp(o, "--png")) a->png = v;
            else a->model = v;
            i++;
            continue;
        }
        if (!strcmp(o, "--layer")) { iv = &a->layer; lo = 0; }
        else if (!strcmp(o, "--tokens")) { iv = &a->tokens; lo = 2; }
        else if (!strcmp(o, "--k-group")) iv = &a->k_group;
        else if (!strcmp(o, "--bits")) { iv = &a->bits; lo = 2; hi = 4; }
        else if (!strcmp(o, "--residual")) iv = &a->residual;
        else if (!strcmp(o, "--threads")) { iv = &a->threads; hi = 1024; }
        else { fprintf(stderr, "oscar tni: unknown option '%s' (see oscar tni --help)\n", o); return -1; }
        char *end;
        long x = v ? strtol(v, &end, 10) : 0;
        if (!v || end == v || *end || x < lo || x > hi) {
            fprintf(stderr, "oscar tni: %s needs an integer in [%ld, %ld]\n", o, lo, hi);
            return -1;
        }
        *iv = (int)x;
        i++;
    }
    if (a->bits == 3) { fprintf(stderr, "oscar tni: --bits must be 2 or 4\n"); return -1; }
    return 0;
}

int oscar_cmd_tni(int argc, char **argv) {
    tni_args a;
    int pr = tni_parse(argc, argv, &a);
    if (pr != 0) return pr == 2 ? 0 : 1;
    if (!a.text) { fprintf(stderr, "oscar tni: --text is required\n"); return 1; }
    if (a.threads > 0) omp_set_num_threads(a.threads);
    FILE *f = fopen(a.text, "rb");
    if (!f) { fprintf(stderr, "oscar tni: cannot read '%s': %s\n", a.text, strerror(errno)); return 1; }
    /* enough bytes for the requested tokens with a wide margin */
    size_t want = (size_t)a.tokens * 16 + 1024, tlen;
    char *text = malloc(want);
    tlen = text ? fread(text, 1, want, f) : 0;
    fclose(f);
    if (!text) { fprintf(stderr, "oscar tni: out of memory\n"); return 1; }
    char err[512];
    llama_model *m = llama_load(a.model, 0, err, sizeof err);
    if (!m) {
        fprintf(stderr, "oscar tni: %s%s\n", err, strstr(err, "cannot open") ? " (scripts/get-model.sh downloads the default model)" : "");
        free(text);
        return 1;
    }
    int rc = 1;
    int32_t *ids = NULL;
    size_t n_ids = 0, cap = 0;
    keys_store ks = {0};
    llama_kv kv;
    llama_state st;
    memset(&kv, 0, sizeof kv);
    memset(&st, 0, sizeof st);
    layer_stats *ls = NULL;
    float *norms = NULL;
    if (a.layer >= m->n_layers) { fprintf(stderr, "oscar tni: --layer %d: the model has %d layers\n", a.layer, m->n_layers); goto out; }
    if (tok_encode(m->tok, text, tlen, 0, &ids, &n_ids, &cap) != 0) { fprintf(stderr, "oscar tni: out of memory\n"); goto out; }
    int64_t T = (int64_t)n_ids < a.tokens ? (int64_t)n_ids : a.tokens;
    if (T > m->ctx_max) T = m->ctx_max;
    if (T < a.k_group) { fprintf(stderr, "oscar tni: '%s' gives only %lld tokens, fewer than one key group\n", a.text, (long long)T); goto out; }
    const int hkv = m->n_kv_heads, d = m->head_dim, kvd = hkv * d;
    ks.n_layers = m->n_layers;
    ks.kvd = kvd;
    ks.cap = T;
    ks.k = malloc((size_t)m->n_layers * T * kvd * sizeof(float));
    ls = calloc((size_t)m->n_layers, sizeof *ls);
    norms = malloc((size_t)m->n_layers * T * sizeof(float));
    if (!ks.k || !ls || !norms || llama_state_init(&st, m, 64) != 0) {
        fprintf(stderr, "oscar tni: out of memory\n");
        goto out;
    }
    /* the keys are observed before the cache: the CPU runner's own fp32
     * cache, or on the GPU a 16-bit oscar cache with fp32 weights (the
     * CPU's numbers to float rounding) */
    oscar_config gcfg = oscar_config_default();
    gcfg.method = OSCAR_METHOD_NONE;
    gcfg.backend = OSCAR_BACKEND_CUDA;
    m->gpu_weights_f32 = 1;
    if (llama_kv_init(&kv, m, a.cuda ? &gcfg : NULL, a.cuda ? 0 : 1, T, err, sizeof err) != 0) {
        fprintf(stderr, "oscar tni: %s\n", err);
        goto out;
    }
    st.key_hook = keep_keys;
    st.key_hook_ud = &ks;
    for (int64_t p = 0; p < T; p += 64) {
        int nt = (int)(T - p < 64 ? T - p : 64);
        if (llama_forward(m, &st, &kv, ids + p, nt, 0, err, sizeof err) != 0) { fprintf(stderr, "oscar tni: %s\n", err); goto out; }
    }
    static const oscar_method methods[4] = {OSCAR_METHOD_KIVI, OSCAR_METHOD_QUAROT, OSCAR_METHOD_SCALE_ONLY, OSCAR_METHOD_OSCAR};
    float *sorted = malloc((size_t)T * sizeof(float));
    float *rot = malloc((size_t)T * kvd * sizeof(float));
    if (!sorted || !rot) { free(sorted); free(rot); fprintf(stderr, "oscar tni: out of memory\n"); goto out; }
    int worst_layer = 0;
    int64_t ng = T / a.k_group;
    for (int l = 0; l < m->n_layers; l++) {
        layer_stats *S = &ls[l];
        const float *K = ks.k + (int64_t)l * T * kvd;
        float *nr = norms + (int64_t)l * T;
        for (int64_t t = 0; t < T; t++) {
            double s = 0;
            for (int i = 0; i < kvd; i++) s += (double)K[t * kvd + i] * K[t * kvd + i];
            nr[t] = (float)sqrt(s);
        }
        memcpy(sorted, nr, (size_t)T * sizeof(float));
        qsort(sorted, (size_t)T, sizeof(float), cmp_float);
        S->nmin = sorted[0]; S->nmed = sorted[T / 2]; S->nmax = sorted[T - 1];
        /* sinks: tokens far below the median norm, smallest first */
        for (int64_t t = 0; t < T; t++) S->n_small += nr[t] < 0.5f * S->nmed;
        for (int s = 0; s < 8 && s < T; s++) {
            int best = -1;
            for (int64_t t = 0; t < T; t++) {
                if (nr[t] >= 0.5f * S->nmed) continue;
                int used = 0;
                for (int j = 0; j < S->n_sinks; j++) used |= S->sinks[j] == t;
                if (!used && (best < 0 || nr[t] < nr[best])) best = (int)t;
            }
            if (best < 0) break;
            S->sinks[S->n_sinks++] = best;
        }
        memcpy(rot, K, (size_t)T * kvd * sizeof(float));
        oscar_hadamard(rot, T * hkv, d);
        double gsum = 0;
        for (int64_t g = 0; g < ng; g++) {
            double mx = 0, mn = INFINITY, omx = 0, omn = INFINITY;
            for (int64_t t = g * a.k_group; t < (g + 1) * a.k_group; t++) {
                double s = nr[t] > 0 ? nr[t] : 1, on = 0;
                for (int i = 0; i < kvd; i++) on += (rot[t * kvd + i] / s) * (rot[t * kvd + i] / s);
                on = sqrt(on);
                mx = nr[t] > mx ? nr[t] : mx; mn = nr[t] < mn ? nr[t] : mn;
                omx = on > omx ? on : omx; omn = on < omn ? on : omn;
            }
            double r = mn > 0 ? mx / mn : INFINITY, orat = omn > 0 ? omx / omn : INFINITY;
            gsum += r;
            S->grp_worst = r > S->grp_worst ? r : S->grp_worst;
            S->ots_grp_worst = orat > S->ots_grp_worst ? orat : S->ots_grp_worst;
            for (int h = 0; h < hkv; h++) {
                double hmx = 0, hmn = INFINITY, qmx = 0, qmn = INFINITY;
                for (int64_t t = g * a.k_group; t < (g + 1) * a.k_group; t++) {
                    double hn = 0, qn = 0, s = nr[t] > 0 ? nr[t] : 1;
                    for (int c = 0; c < d; c++) {
                        double x = K[t * kvd + h * d + c], y = rot[t * kvd + h * d + c] / s;
                        hn += x * x;
                        qn += y * y;
                    }
                    hn = sqrt(hn); qn = sqrt(qn);
                    hmx = hn > hmx ? hn : hmx; hmn = hn < hmn ? hn : hmn;
                    qmx = qn > qmx ? qn : qmx; qmn = qn < qmn ? qn : qmn;
                }
                double r1 = hmn > 0 ? hmx / hmn : INFINITY, r2 = qmn > 0 ? qmx / qmn : INFINITY;
                S->head_worst_raw = r1 > S->head_worst_raw ? r1 : S->head_worst_raw;
                S->head_worst_ots = r2 > S->head_worst_ots ? r2 : S->head_worst_ots;
            }
        }
        S->grp_mean = ng > 0 ? gsum / ng : 0;
        for (int mth = 0; mth < 4; mth++)
            if (key_error(K, T, hkv, d, methods[mth], a.bits, a.k_group, a.residual, S->sinks, S->n_sinks,
                          &S->err[mth], &S->err_sink[mth]) != 0)
                S->err[mth] = S->err_sink[mth] = NAN;
        if (S->grp_worst > ls[worst_layer].grp_worst) worst_layer = l;
    }
    free(sorted);
    free(rot);
    printf("oscar tni: %s, %lld tokens of '%s', key groups of %d tokens, %d-bit, window %d\n",
           m->name ? m->name : a.model, (long long)T, a.text, a.k_group, a.bits, a.residual);
    printf("token norm = ||k_t|| over all %d KV heads x %d channels (post-RoPE). ratio = max/min norm inside a\n"
           "key group; 'after' = after Canalized Rotation + Omni-Token Scaling. key err = relative squared\n"
           "error of the keys the library reconstructs (quantised tokens only); sink err = same on the sinks.\n\n",
           hkv, d);
    printf("layer | norm min / median / max | group ratio mean  worst -> after | head ratio worst -> after | "
           "sinks (<0.5 median): positions | key err kivi quarot scale oscar | sink err kivi quarot scale oscar\n");
    for (int l = 0; l < m->n_layers; l++) {
        layer_stats *S = &ls[l];
        char pos[96] = "";
        size_t pl = 0;
        for (int s = 0; s < S->n_sinks && pl < sizeof pos - 8; s++)
            pl += (size_t)snprintf(pos + pl, sizeof pos - pl, "%s%d", s ? "," : "", S->sinks[s]);
        printf("%5d | %6.2f / %6.2f / %6.2f | %7.2f %7.2f -> %4.2f | %7.2f -> %5.2f | %3d: %-24s | %.4f %.4f %.4f %.4f | "
               "%.3f %.3f %.3f %.3f\n",
               l, S->nmin, S->nmed, S->nmax, S->grp_mean, S->grp_worst, S->ots_grp_worst, S->head_worst_raw,
               S->head_worst_ots, S->n_small, S->n_sinks ? pos : "-", S->err[0], S->err[1], S->err[2], S->err[3],
               S->err_sink[0], S->err_sink[1], S->err_sink[2], S->err_sink[3]);
    }
    double e[4] = {0};
    for (int l = 0; l < m->n_layers; l++)
        for (int j = 0; j < 4; j++) e[j] += ls[l].err[j] / m->n_layers;
    printf("\nmean key err over layers: kivi %.4f  quarot %.4f  scale-only %.4f  oscar %.4f\n", e[0], e[1], e[2], e[3]);
    int pl = a.layer >= 0 ? a.layer : worst_layer;
    if (a.png) {
        if (write_plot(a.png, ks.k + (int64_t)pl * T * kvd, T, hkv, d, norms + (int64_t)pl * T, &ls[pl], a.k_group) != 0) {
            fprintf(stderr, "oscar tni: cannot write '%s': %s\n", a.png, strerror(errno));
            goto out;
        }
        printf("wrote %s: layer %d, first %lld tokens. Top: token norms (sinks red, grey lines = key groups);\n"
               "middle: |k| per channel (rows: head-major) and token; bottom: the same after rotation + token scaling.\n",
               a.png, pl, (long long)(T > 512 ? 512 : T));
    }
    rc = 0;
out:
    free(ids);
    free(text);
    free(ks.k);
    free(ls);
    free(norms);
    llama_state_free(&st);
    llama_kv_free(&kv);
    llama_free(m);
    return rc;
}
