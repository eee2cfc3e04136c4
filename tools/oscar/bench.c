#define _POSIX_C_SOURCE 200809L
/* `oscar bench`: CPU decode attention and append throughput over a synthetic
 * cache, with the 2-bit OScaR cache and 16-bit / 32-bit caches measured in
 * the same run. Reports medians; bytes are the cache bytes a decode reads. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "args.h"
#include "commands.h"
#include "oscar.h"
#include "synth.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU seconds of the whole process (all threads): on a shared machine the
 * wall clock also measures the other users; with one thread the CPU time of
 * a call is close to what an idle machine would take. */
static double cpu_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct bench_case {
    const char *label;
    oscar_method method;
    int bits;
    oscar_dtype window;
} bench_case;

typedef struct bench_result {
    double append_s, decode_ms, decode_min_ms, decode_cpu_min_ms, bytes_read, bits_per_element;
} bench_result;

typedef struct bench_args {
    int tokens, hkv, hq, d, batch, reps, threads;
} bench_args;

static int run_case(const bench_args *A, const bench_case *bc, bench_result *res) {
    oscar_config cfg = oscar_config_default();
    cfg.method = bc->method;
    cfg.bits = bc->bits;
    cfg.window_dtype = bc->window;
    cfg.head_dim = A->d;
    cfg.num_kv_heads = A->hkv;
    cfg.num_q_heads = A->hq;
    cfg.max_seqs = A->batch;
    cfg.block_count = A->batch * (A->tokens / cfg.residual + 1);
    cfg.num_threads = A->threads;
    char err[512];
    oscar_cache *c = NULL;
    if (oscar_cache_create(&cfg, &c, err, sizeof err) != OSCAR_OK) {
        fprintf(stderr, "oscar bench: %s\n", err);
        return 1;
    }
    const int chunk = 4096;
    const size_t row = (size_t)A->hkv * A->d;
    float *K = (float *)malloc(sizeof(float) * row * chunk), *V = (float *)malloc(sizeof(float) * row * chunk);
    float *Q = (float *)malloc(sizeof(float) * (size_t)A->batch * A->hq * A->d);
    float *O = (float *)malloc(sizeof(float) * (size_t)A->batch * A->hq * A->d);
    int32_t *ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)A->batch);
    double *times = (double *)malloc(sizeof(double) * (size_t)A->reps);
    double cpu_min = 1e30;
    int rc = 1;
    if (!K || !V || !Q || !O || !ids || !times) {
        fprintf(stderr, "oscar bench: out of memory\n");
        goto out;
    }
    /* Append in chunks, timing only the library calls. */
    double append = 0;
    for (int b = 0; b < A->batch; b++) {
        if (oscar_seq_add(c, &ids[b])) goto fail;
        for (int t0 = 0; t0 < A->tokens; t0 += chunk) {
            int32_t n = A->tokens - t0 < chunk ? A->tokens - t0 : chunk;
            synth_kv((uint64_t)(b * 1000003 + t0 + 1), n, A->hkv, A->d, 1, A->hq, K, V, Q);
            double t = now_s();
            if (oscar_append(c, 0, 1, &ids[b], &n, K, V, OSCAR_DTYPE_F32, NULL)) goto fail;
            append += now_s() - t;
        }
    }
    synth_kv(99, 1, A->hkv, A->d, A->batch, A->hq, K, V, Q);
    for (int r = -2; r < A->reps; r++) {
        double t = now_s(), tc = cpu_now_s();
        if (oscar_attention(c, 0, A->batch, ids, 1, Q, OSCAR_DTYPE_F32, O, OSCAR_DTYPE_F32, 0.0f, NULL)) goto fail;
        if (r >= 0) times[r] = now_s() - t;
        if (r >= 0 && cpu_now_s() - tc < cpu_min) cpu_min = cpu_now_s() - tc;
    }
    qsort(times, (size_t)A->reps, sizeof(double), cmp_double);
    oscar_memory_stats m;
    oscar_memory(c, &m);
    res->append_s = append;
    res->decode_ms = 1e3 * times[A->reps / 2];
    res->decode_min_ms = 1e3 * times[0];
    res->decode_cpu_min_ms = 1e3 * cpu_min;
    res->bytes_read = (double)m.bytes_in_use;
    oscar_config_packed_bits(&cfg, &res->bits_per_element);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "oscar bench: %s\n", oscar_last_error(c));
out:
    oscar_cache_destroy(c);
    free(K), free(V), free(Q), free(O), free(ids), free(times);
    return rc;
}

int oscar_cmd_bench(int argc, char **argv) {
    bench_args A = {32768, 8, 32, 128, 1, 20, 0};
    int json = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: oscar bench [--tokens N] [--kv-heads N] [--q-heads N] [--head-dim D] [--batch B]\n"
                   "                   [--reps N] [--threads N] [--cases oscar-2bit,fp16,...] [--json]\n"
                   "Decode attention (one query per sequence) over a synthetic cache of N tokens per\n"
                   "sequence, for the 2-bit OScaR cache, a 16-bit cache and a 32-bit cache, plus append\n"
                   "(prefill) throughput. Defaults: 32768 tokens, Hkv 8, Hq 32, d 128, batch 1, 20 reps.\n"
                   "\"cpu ms\" is the least process CPU time of one call (all threads): with --threads 1\n"
                   "on a shared machine it is the robust column, and \"GB/s per CPU-s\" is bytes over it.\n");
            return 0;
        }
        if (!strcmp(a, "--cases") && i + 1 < argc) {
            only = argv[++i];
            continue;
        }
        if (!strcmp(a, "--json")) {
            json = 1;
            continue;
        }
        int *dst = !strcmp(a, "--tokens") ? &A.tokens : !strcmp(a, "--kv-heads") ? &A.hkv
                 : !strcmp(a, "--q-heads") ? &A.hq : !strcmp(a, "--head-dim") ? &A.d
                 : !strcmp(a, "--batch") ? &A.batch : !strcmp(a, "--reps") ? &A.reps
                 : !strcmp(a, "--threads") ? &A.threads : NULL;
        if (!dst) {
            fprintf(stderr, "oscar bench: unknown option '%s'\n", a);
            return 2;
        }
        if (arg_int(argc, argv, &i, dst == &A.threads ? 0 : 1, 1 << 24, dst)) return 2;
    }
    const bench_case cases[] = {
        {"oscar-2bit", OSCAR_METHOD_OSCAR, 2, OSCAR_DTYPE_F16},
        {"oscar-4bit", OSCAR_METHOD_OSCAR, 4, OSCAR_DTYPE_F16},
        {"fp16", OSCAR_METHOD_NONE, 2, OSCAR_DTYPE_F16},
        {"fp32", OSCAR_METHOD_NONE, 2, OSCAR_DTYPE_F32},
    };
    const int nc = (int)(sizeof cases / sizeof cases[0]);
    bench_result r[4];
    if (!json)
        fprintf(stderr, "oscar bench: %d x %d tokens, Hq %d, Hkv %d, d %d, %d reps (median)\n", A.batch, A.tokens,
                A.hq, A.hkv, A.d, A.reps);
    int ran[4] = {0};
    for (int i = 0; i < nc; i++) {
        if (only && !strstr(only, cases[i].label)) continue;
        if (!json) fprintf(stderr, "  running %s ...\n", cases[i].label);
        if (run_case(&A, &cases[i], &r[i])) return 1;
        ran[i] = 1;
    }
    const double fp16_ms = ran[2] ? r[2].decode_ms : NAN;
    if (json) {
        printf("{\"tokens\": %d, \"batch\": %d, \"q_heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"cases\": [", A.tokens,
               A.batch, A.hq, A.hkv, A.d);
        int first = 1;
        for (int i = 0; i < nc; i++) {
            if (!ran[i]) continue;
            printf("%s{\"cache\": \"%s\", \"decode_ms\": %.4f, \"decode_cpu_min_ms\": %.4f, \"cache_mib\": %.2f, "
                   "\"gb_per_s\": %.2f, \"gb_per_cpu_s\": %.2f, \"append_tokens_per_s\": %.0f, \"speedup_vs_fp16\": %.3f}",
                   first ? "" : ", ", cases[i].label, r[i].decode_ms, r[i].decode_cpu_min_ms, r[i].bytes_read / 1048576.0,
                   r[i].bytes_read / (r[i].decode_ms * 1e-3) / 1e9,
                   r[i].bytes_read / (r[i].decode_cpu_min_ms * 1e-3) / 1e9, (double)A.tokens * A.batch / r[i].append_s,
                   fp16_ms / r[i].decode_ms);
            first = 0;
        }
        printf("]}\n");
        return 0;
    }
    printf("| cache | bits/elem | cache MiB | decode ms (median) | min ms | cpu ms (min) | GB/s read | GB/s per CPU-s "
           "| append tok/s | vs fp16 |\n");
    printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (int i = 0; i < nc; i++)
        if (ran[i])
        printf("| %s | %.2f | %.1f | %.3f | %.3f | %.3f | %.2f | %.2f | %.0f | %.2fx |\n", cases[i].label,
               cases[i].method == OSCAR_METHOD_NONE ? (cases[i].window == OSCAR_DTYPE_F32 ? 32.0 : 16.0)
                                                    : r[i].bits_per_element,
               r[i].bytes_read / 1048576.0, r[i].decode_ms, r[i].decode_min_ms, r[i].decode_cpu_min_ms,
               r[i].bytes_read / (r[i].decode_ms * 1e-3) / 1e9, r[i].bytes_read / (r[i].decode_cpu_min_ms * 1e-3) / 1e9,
               (double)A.tokens * A.batch / r[i].append_s,
               fp16_ms / r[i].decode_ms);
    return 0;
}
