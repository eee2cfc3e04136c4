/* `oscar eval-kv`: quantise real or synthetic K/V with one method and report
 * how far the dequantised cache and the attention output are from exact.
 * `oscar synth`: write a seeded synthetic example with Token Norm Imbalance. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "commands.h"
#include "npy.h"
#include "oscar.h"
#include "synth.h"

static void eval_usage(FILE *f) {
    fprintf(f,
            "usage: oscar eval-kv --k K.npy --v V.npy --q Q.npy [options]\n\n"
            "  K.npy, V.npy  float32 [tokens, kv_heads, head_dim] (post-RoPE keys; values)\n"
            "  Q.npy         float32 [queries, q_heads, head_dim]; every query attends to all tokens\n\n"
            "options:\n"
            "  --method M      none|kivi|quarot|scale-only|oscar (default oscar)\n"
            "  --bits B        2 or 4 (default 2)\n"
            "  --k-group N     tokens per key group (default 32)\n"
            "  --v-group N     channels per value group (default 32)\n"
            "  --residual R    window / block size in tokens (default 128)\n"
            "  --window T      window dtype f16|bf16|f32 (default f16)\n"
            "  --threads N     CPU threads (default: all cores)\n"
            "  --json          print one JSON object on stdout\n");
}

/* float64 attention of every query over all tokens: the exact reference. */
static void exact_attention(const npy_array *K, const npy_array *V, const npy_array *Q, double *O) {
    const int64_t T = K->shape[0], nq = Q->shape[0];
    const int hkv = (int)K->shape[1], d = (int)K->shape[2], hq = (int)Q->shape[1], g = hq / hkv;
    const double scale = 1.0 / sqrt((double)d);
    double *lg = (double *)malloc(sizeof(double) * (size_t)T);
    for (int64_t qi = 0; qi < nq; qi++)
        for (int j = 0; j < hq; j++) {
            const float *q = Q->data + ((size_t)qi * hq + j) * d;
            int h = j / g;
            double m = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                const float *k = K->data + ((size_t)t * hkv + h) * d;
                double s = 0;
                for (int c = 0; c < d; c++) s += (double)q[c] * k[c];
                lg[t] = s * scale;
                if (lg[t] > m) m = lg[t];
            }
            double sum = 0;
            for (int64_t t = 0; t < T; t++) sum += (lg[t] = exp(lg[t] - m));
            double *o = O + ((size_t)qi * hq + j) * d;
            for (int c = 0; c < d; c++) o[c] = 0;
            for (int64_t t = 0; t < T; t++) {
                const float *v = V->data + ((size_t)t * hkv + h) * d;
                double p = lg[t] / sum;
                for (int c = 0; c < d; c++) o[c] += p * v[c];
            }
        }
    free(lg);
}

static int check_finite(const npy_array *a, const char *path) {
    for (int64_t i = 0; i < a->count; i++)
        if (!isfinite(a->data[i])) {
            fprintf(stderr, "oscar eval-kv: %s: element %lld is %s; inputs must be finite\n", path, (long long)i,
                    isnan(a->data[i]) ? "NaN" : "Inf");
            return 0;
        }
    return 1;
}

int oscar_cmd_eval_kv(int argc, char **argv) {
    const char *kp = NULL, *vp = NULL, *qp = NULL, *mname = "oscar", *wname = "f16";
    int bits = 2, kg = 32, vg = 32, R = 128, threads = 0, json = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            eval_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--k")) {
            if (!(kp = arg_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--v")) {
            if (!(vp = arg_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--q")) {
            if (!(qp = arg_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--method")) {
            if (!(mname = arg_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--window")) {
            if (!(wname = arg_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--bits")) {
            if (arg_int(argc, argv, &i, 2, 4, &bits)) return 2;
        } else if (!strcmp(a, "--k-group")) {
            if (arg_int(argc, argv, &i, 1, 4096, &kg)) return 2;
        } else if (!strcmp(a, "--v-group")) {
            if (arg_int(argc, argv, &i, 1, 4096, &vg)) return 2;
        } else if (!strcmp(a, "--residual")) {
            if (arg_int(argc, argv, &i, 1, 4096, &R)) return 2;
        } else if (!strcmp(a, "--threads")) {
            if (arg_int(argc, argv, &i, 0, 4096, &threads)) return 2;
        } else {
            fprintf(stderr, "oscar eval-kv: unknown option '%s'\n\n", a);
            eval_usage(stderr);
            return 2;
        }
    }
    if (!kp || !vp || !qp) {
        fprintf(stderr, "oscar eval-kv: --k, --v and --q are required\n\n");
        eval_usage(stderr);
        return 2;
    }
    oscar_config cfg = oscar_config_default();
    if (oscar_method_parse(mname, &cfg.method) != OSCAR_OK) {
        fprintf(stderr, "oscar eval-kv: unknown method '%s' (none, kivi, quarot, scale-only, oscar)\n", mname);
        return 2;
    }
    if (arg_dtype(wname, &cfg.window_dtype)) {
        fprintf(stderr, "oscar eval-kv: --window must be f16, bf16 or f32, got '%s'\n", wname);
        return 2;
    }
    npy_array K, V, Q;
    char err[512];
    memset(&K, 0, sizeof K), memset(&V, 0, sizeof V), memset(&Q, 0, sizeof Q);
    int rc = 1;
    double *Oex = NULL;
    float *O = NULL, *Kd = NULL, *Vd = NULL;
    int32_t *ids = NULL;
    oscar_cache *cache = NULL;
    if (npy_read_f32(kp, &K, err, sizeof err) || npy_read_f32(vp, &V, err, sizeof err) ||
        npy_read_f32(qp, &Q, err, sizeof err)) {
        fprintf(stderr, "oscar eval-kv: %s\n", err);
        goto out;
    }
    if (K.ndim != 3 || V.ndim != 3 || Q.ndim != 3) {
        fprintf(stderr, "oscar eval-kv: K, V and Q must have rank 3 (got %d, %d, %d)\n", K.ndim, V.ndim, Q.ndim);
        goto out;
    }
    if (memcmp(K.shape, V.shape, sizeof(int64_t) * 3) != 0) {
        fprintf(stderr, "oscar eval-kv: V shape [%lld, %lld, %lld] differs from K shape [%lld, %lld, %lld]\n",
                (long long)V.shape[0], (long long)V.shape[1], (long long)V.shape[2], (long long)K.shape[0],
                (long long)K.shape[1], (long long)K.shape[2]);
        goto out;
    }
    if (K.shape[0] < 1 || Q.shape[0] < 1 || K.shape[1] < 1) {
        fprintf(stderr, "oscar eval-kv: K and Q need at least one token/query and one head\n");
        goto out;
    }
    if (Q.shape[2] != K.shape[2]) {
        fprintf(stderr, "oscar eval-kv: Q head_dim %lld differs from K head_dim %lld\n", (long long)Q.shape[2],
                (long long)K.shape[2]);
        goto out;
    }
    if (!check_finite(&K, kp) || !check_finite(&V, vp) || !check_finite(&Q, qp)) goto out;
    const int64_t T = K.shape[0], nq = Q.shape[0];
    cfg.bits = bits;
    cfg.head_dim = (int)K.shape[2];
    cfg.num_kv_heads = (int)K.shape[1];
    cfg.num_q_heads = (int)Q.shape[1];
    cfg.k_group = kg;
    cfg.v_group = vg;
    cfg.residual = R;
    cfg.block_count = (int)(T / R + 1);
    cfg.max_seqs = 1;
    cfg.num_threads = threads;
    oscar_status st = oscar_cache_create(&cfg, &cache, err, sizeof err);
    if (st != OSCAR_OK) {
        fprintf(stderr, "oscar eval-kv: %s\n", err);
        goto out;
    }
    int32_t seq, n = (int32_t)T;
    if ((st = oscar_seq_add(cache, &seq)) || (st = oscar_append(cache, 0, 1, &seq, &n, K.data, V.data,
                                                                 OSCAR_DTYPE_F32, NULL))) {
        fprintf(stderr, "oscar eval-kv: %s\n", oscar_last_error(cache));
        goto out;
    }
    const int hq = cfg.num_q_heads, d = cfg.head_dim, hkv = cfg.num_kv_heads;
    O = (float *)malloc(sizeof(float) * (size_t)Q.count);
    Oex = (double *)malloc(sizeof(double) * (size_t)Q.count);
    ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)nq);
    Kd = (float *)malloc(sizeof(float) * (size_t)K.count);
    Vd = (float *)malloc(sizeof(float) * (size_t)K.count);
    if (!O || !Oex || !ids || !Kd || !Vd) {
        fprintf(stderr, "oscar eval-kv: out of memory\n");
        goto out;
    }
    /* Each query is its own q_len = 1 row of one batched call, so every
     * query sees all T tokens. */
    for (int64_t i = 0; i < nq; i++) ids[i] = seq;
    if ((st = oscar_attention(cache, 0, (int)nq, ids, 1, Q.data, OSCAR_DTYPE_F32, O, OSCAR_DTYPE_F32, 0.0f, NULL)) ||
        (st = oscar_seq_read(cache, seq, 0, 0, T, Kd, Vd))) {
        fprintf(stderr, "oscar eval-kv: %s\n", oscar_last_error(cache));
        goto out;
    }
    exact_attention(&K, &V, &Q, Oex);
    double num = 0, den = 0;
    for (int64_t i = 0; i < Q.count; i++) {
        double e = (double)O[i] - Oex[i];
        num += e * e;
        den += Oex[i] * Oex[i];
    }
    double attn_err = den > 0 ? sqrt(num / den) : sqrt(num);
    const int64_t packed = T / R * R, qe = packed * hkv * d;
    double kn = 0, kd = 0, vn = 0, vd = 0;
    for (int64_t i = 0; i < qe; i++) {
        double ek = (double)Kd[i] - K.data[i], ev = (double)Vd[i] - V.data[i];
        kn += ek * ek, kd += (double)K.data[i] * K.data[i];
        vn += ev * ev, vd += (double)V.data[i] * V.data[i];
    }
    double k_err = kd > 0 ? sqrt(kn / kd) : 0, v_err = vd > 0 ? sqrt(vn / vd) : 0;
    double packed_bits;
    oscar_config_packed_bits(&cfg, &packed_bits);
    double window_bits = cfg.window_dtype == OSCAR_DTYPE_F32 ? 32.0 : 16.0;
    double all_bits = ((double)packed * packed_bits + (double)(T - packed) * window_bits) / (double)T;
    if (json) {
        printf("{\"method\": \"%s\", \"bits\": %d, \"tokens\": %lld, \"queries\": %lld, \"kv_heads\": %d, "
               "\"q_heads\": %d, \"head_dim\": %d, \"k_group\": %d, \"v_group\": %d, \"residual\": %d, "
               "\"quantised_tokens\": %lld, \"attn_rel_err\": %.6e, \"k_rel_err\": %.6e, \"v_rel_err\": %.6e, "
               "\"packed_bits_per_element\": %.4f, \"bits_per_element\": %.4f}\n",
               mname, cfg.method == OSCAR_METHOD_NONE ? 16 : bits, (long long)T, (long long)nq, hkv, hq, d, kg, vg, R,
               (long long)packed, attn_err, k_err, v_err, packed_bits, all_bits);
    } else {
        printf("method %s, %d-bit, %lld tokens (%lld quantised), %d KV heads, %d query heads, head_dim %d\n", mname,
               cfg.method == OSCAR_METHOD_NONE ? 16 : bits, (long long)T, (long long)packed, hkv, hq, d);
        printf("  attention relative error  %.4e\n", attn_err);
        printf("  K relative error          %.4e\n", k_err);
        printf("  V relative error          %.4e\n", v_err);
        printf("  bits per element          %.3f packed, %.3f whole cache\n", packed_bits, all_bits);
    }
    rc = 0;
out:
    oscar_cache_destroy(cache);
    npy_free(&K), npy_free(&V), npy_free(&Q);
    free(O), free(Oex), free(ids), free(Kd), free(Vd);
    return rc;
}

int oscar_cmd_synth(int argc, char **argv) {
    const char *dir = NULL;
    int tokens = 2048, hkv = 8, hq = 32, d = 128, queries = 16, seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: oscar synth --out DIR [--tokens N] [--kv-heads N] [--q-heads N] [--head-dim D]\n"
                   "                   [--queries N] [--seed S]\n"
                   "Writes DIR/K.npy, DIR/V.npy, DIR/Q.npy: seeded keys with low-norm sink tokens and\n"
                   "outlier channels (Token Norm Imbalance), values, and queries.\n");
            return 0;
        } else if (!strcmp(a, "--out")) {
            if (!(dir = arg_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--tokens")) {
            if (arg_int(argc, argv, &i, 1, 1 << 22, &tokens)) return 2;
        } else if (!strcmp(a, "--kv-heads")) {
            if (arg_int(argc, argv, &i, 1, 1024, &hkv)) return 2;
        } else if (!strcmp(a, "--q-heads")) {
            if (arg_int(argc, argv, &i, 1, 8192, &hq)) return 2;
        } else if (!strcmp(a, "--head-dim")) {
            if (arg_int(argc, argv, &i, 1, 4096, &d)) return 2;
        } else if (!strcmp(a, "--queries")) {
            if (arg_int(argc, argv, &i, 1, 1 << 20, &queries)) return 2;
        } else if (!strcmp(a, "--seed")) {
            if (arg_int(argc, argv, &i, 0, 1 << 30, &seed)) return 2;
        } else {
            fprintf(stderr, "oscar synth: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!dir) {
        fprintf(stderr, "oscar synth: --out DIR is required\n");
        return 2;
    }
    if (hq % hkv) {
        fprintf(stderr, "oscar synth: --q-heads %d is not a multiple of --kv-heads %d\n", hq, hkv);
        return 2;
    }
    size_t kvn = (size_t)tokens * hkv * d, qn = (size_t)queries * hq * d;
    float *K = (float *)malloc(kvn * 4), *V = (float *)malloc(kvn * 4), *Q = (float *)malloc(qn * 4);
    if (!K || !V || !Q) {
        fprintf(stderr, "oscar synth: out of memory\n");
        free(K), free(V), free(Q);
        return 1;
    }
    synth_kv((uint64_t)seed, tokens, hkv, d, queries, hq, K, V, Q);
    char path[4096], err[512];
    int64_t kshape[3] = {tokens, hkv, d}, qshape[3] = {queries, hq, d};
    int rc = 0;
    const char *names[3] = {"K.npy", "V.npy", "Q.npy"};
    const float *data[3] = {K, V, Q};
    const int64_t *shapes[3] = {kshape, kshape, qshape};
    for (int i = 0; i < 3 && !rc; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (npy_write_f32(path, data[i], shapes[i], 3, err, sizeof err)) {
            fprintf(stderr, "oscar synth: %s\n", err);
            rc = 1;
        }
    }
    free(K), free(V), free(Q);
    return rc;
}
