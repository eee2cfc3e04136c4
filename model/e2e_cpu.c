/*
 * e2e_cpu.c - `oscar bench-e2e --device cpu`: the CPU runner end to end on a
 * GGUF model, measured the way llama.cpp's llama-bench measures (decode
 * tokens/s at given depths, prefill tokens/s of a 512-token prompt), so that
 * scripts/llama-cpp.sh can put both runners side by side (docs/BENCHMARKS.md).
 *
 * Tokens are pseudo-random ids (as llama-bench's): speed does not depend on
 * content. For each cache (--kv none, oscar-2, oscar-4) one sequence grows
 * through the depths: at each depth it decodes --gen tokens --reps times (so
 * the depth drifts by gen * reps tokens, 192 by default), then is prefilled
 * up to the next depth. All caches are held at once and their decode
 * repetitions alternate (cache 1 rep 1, cache 2 rep 1, ..., cache 1 rep 2,
 * ...), so that on a shared machine a burst of load hits every cache alike. Prefill is timed from an empty cache, in
 * the chunks `oscar run` uses. The GPU benchmark (model/gpu/e2e.cu) is
 * reached with --device cuda.
 */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"
#include "model_commands.h"
#include "qmatmul.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU seconds of all the process's threads: on a shared machine the wall
 * clock measures the other users too; tokens per CPU-second times the thread
 * count is what an idle machine would give (a little less: it counts the
 * time threads spend waiting at barriers). */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* "a,b,c" into up to max ints; returns the count, -1 on a bad list */
static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > (1 << 20) || n == max) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static int32_t random_token(int vocab) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (int32_t)(rng_state % (uint64_t)vocab);
}

/* Runs tokens [kv->len, end) through the model in the runner's chunks. */
static int prefill_to(const llama_model *m, llama_state *st, llama_kv *kv, int64_t end, char *err, size_t en) {
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)st->max_chunk);
    if (!ids) return -1;
    int rc = 0;
    while (kv->len < end && rc == 0) {
        int n = llama_next_chunk(kv, end, st->max_chunk);
        for (int i = 0; i < n; i++) ids[i] = random_token(m->vocab);
        rc = llama_forward(m, st, kv, ids, n, 1, err, en);
    }
    free(ids);
    return rc;
}

typedef struct cache_case {
    const char *name;
    oscar_method method;
    int bits;
} cache_case;

static void usage(void) {
    fprintf(stderr,
            "usage: oscar bench-e2e --device cpu [--model M.gguf] [--kv none,oscar] [--bits 2,4]\n"
            "                       [--depth 0,4096,8192] [--gen 64] [--pp 512] [--reps 3] [--threads N]\n"
            "  The CPU runner end to end: decode tokens/s at each depth and prefill tokens/s of a\n"
            "  --pp token prompt, per KV cache (none = 16-bit; oscar at each of --bits), medians of\n"
            "  --reps runs. Compare with llama.cpp: scripts/llama-cpp.sh bench (docs/BENCHMARKS.md).\n"
            "  --device cuda runs the GPU benchmark (its own options: oscar bench-e2e --device cuda -h).\n");
}

static int bench_cpu(int argc, char **argv) {
    const char *model = DEFAULT_MODEL;
    int depths[16] = {0, 4096, 8192}, n_depths = 3, bits[4] = {2, 4}, n_bits = 2;
    int gen = 64, pp = 512, reps = 3, threads = 0, want_none = 1, want_oscar = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 2;
        } else if (!strcmp(a, "--device") && v) {
            i++;
        } else if (!strcmp(a, "--model") && v) {
            model = v, i++;
        } else if (!strcmp(a, "--kv") && v) {
            want_none = strstr(v, "none") != NULL, want_oscar = strstr(v, "oscar") != NULL, i++;
        } else if (!strcmp(a, "--bits") && v) {
            n_bits = parse_list(v, bits, 4), i++;
        } else if (!strcmp(a, "--depth") && v) {
            n_depths = parse_list(v, depths, 16), i++;
        } else if (!strcmp(a, "--gen") && v) {
            gen = atoi(v), i++;
        } else if (!strcmp(a, "--pp") && v) {
            pp = atoi(v), i++;
        } else if (!strcmp(a, "--reps") && v) {
            reps = atoi(v), i++;
        } else if (!strcmp(a, "--threads") && v) {
            threads = atoi(v), i++;
        } else {
            fprintf(stderr, "bench-e2e: unknown option '%s'\n", a);
            usage();
            return 2;
        }
    }
    if (n_depths <= 0 || n_bits <= 0 || gen < 1 || pp < 0 || reps < 1 || reps > 100 || threads < 0 ||
        (!want_none && !want_oscar)) {
        fprintf(stderr, "bench-e2e: bad --depth, --bits, --gen, --pp, --reps, --threads or --kv\n");
        return 2;
    }
    for (int i = 0; i < n_bits; i++)
        if (bits[i] != 2 && bits[i] != 4) {
            fprintf(stderr, "bench-e2e: --bits takes 2 and/or 4\n");
            return 2;
        }
    for (int i = 1; i < n_depths; i++)
        if (depths[i] <= depths[i - 1]) {
            fprintf(stderr, "bench-e2e: --depth must increase\n");
            return 2;
        }
    if (threads > 0) omp_set_num_threads(threads);
    char err[512] = "";
    llama_model *m = llama_load(model, 0, err, sizeof err);
    if (!m) {
        fprintf(stderr, "bench-e2e: %s\n", err);
        return 1;
    }
    cache_case cases[6];
    int n_cases = 0;
    if (want_none) cases[n_cases++] = (cache_case){"none (16-bit)", OSCAR_METHOD_NONE, 16};
    if (want_oscar)
        for (int i = 0; i < n_bits; i++)
            cases[n_cases++] = (cache_case){bits[i] == 2 ? "oscar-2" : "oscar-4", OSCAR_METHOD_OSCAR, bits[i]};
    const int64_t cap = (int64_t)depths[n_depths - 1] + (int64_t)gen * reps + (pp > 0 ? pp : 0) + 256;
    const int max_chunk = pp > 512 ? pp : 512;
    printf("# oscar bench-e2e --device cpu: %s, %d threads, kernels %s, activations %s, gen %d, pp %d, reps %d\n",
           m->name ? m->name : model, omp_get_max_threads(), qm_level_name(qm_current_level()),
           getenv("OSCAR_ACT") && !strcmp(getenv("OSCAR_ACT"), "q8") ? "int8" : "int16", gen, pp, reps);
    printf("| cache | test | tokens/s (median) | min | max | tokens per CPU-s x threads (median) |\n"
           "| --- | --- | ---: | ---: | ---: | ---: |\n");
    fflush(stdout);
    int rc = 0;
    double *tps = malloc(sizeof(double) * (size_t)reps), *cps = malloc(sizeof(double) * (size_t)reps);
    const int nthreads = omp_get_max_threads();
    int32_t *one = malloc(sizeof(int32_t));
    /* Every cache lives at once, so that the decode repetitions of the caches
     * can alternate (rep 1 of each cache, then rep 2 of each, ...): on a
     * shared machine the load then falls on all of them alike. */
    llama_kv kvs[sizeof cases / sizeof cases[0]];
    llama_state sts[sizeof cases / sizeof cases[0]];
    int live = 0;
    double (*dt)[2] = malloc(sizeof(double[2]) * (size_t)n_cases * (size_t)reps); /* [case][rep] wall, cpu */
    if (!tps || !cps || !one || !dt) rc = 1;
    for (int ci = 0; ci < n_cases && rc == 0; ci++, live++) {
        oscar_config cfg = oscar_config_default();
        cfg.method = cases[ci].method;
        cfg.bits = cases[ci].method == OSCAR_METHOD_NONE ? cfg.bits : cases[ci].bits;
        if (llama_kv_init(&kvs[ci], m, &cfg, 0, cap, err, sizeof err) != 0) {
            fprintf(stderr, "bench-e2e: %s\n", err);
            rc = 1;
            break;
        }
        if (llama_state_init(&sts[ci], m, max_chunk) != 0) {
            fprintf(stderr, "bench-e2e: out of memory\n");
            llama_kv_free(&kvs[ci]);
            rc = 1;
            break;
        }
    }
    /* prefill: reps prompts of pp tokens from an empty cache, per cache */
    for (int ci = 0; ci < n_cases && rc == 0 && pp > 0; ci++) {
        llama_kv *kv = &kvs[ci];
        for (int r = 0; r < reps && rc == 0; r++) {
            if (llama_kv_reset(kv, err, sizeof err) != 0) rc = -1;
            double t0 = now_s(), c0 = cpu_s();
            if (rc == 0) rc = prefill_to(m, &sts[ci], kv, pp, err, sizeof err);
            tps[r] = pp / (now_s() - t0);
            cps[r] = pp / (cpu_s() - c0) * nthreads;
        }
        if (rc == 0) {
            double lo = tps[0], hi = tps[0];
            for (int r = 1; r < reps; r++) lo = tps[r] < lo ? tps[r] : lo, hi = tps[r] > hi ? tps[r] : hi;
            printf("| %s | pp%d | %.1f | %.1f | %.1f | %.1f |\n", cases[ci].name, pp, median(tps, reps), lo, hi,
                   median(cps, reps));
            fflush(stdout);
        }
    }
    for (int ci = 0; ci < n_cases && rc == 0; ci++) rc = llama_kv_reset(&kvs[ci], err, sizeof err);
    for (int di = 0; di < n_depths && rc == 0; di++) {
        for (int ci = 0; ci < n_cases && rc == 0; ci++)
            rc = prefill_to(m, &sts[ci], &kvs[ci], depths[di] > kvs[ci].len ? depths[di] : kvs[ci].len, err,
                            sizeof err);
        for (int r = 0; r < reps && rc == 0; r++)
            for (int ci = 0; ci < n_cases && rc == 0; ci++) {
                double t0 = now_s(), c0 = cpu_s();
                for (int g = 0; g < gen && rc == 0; g++) {
                    one[0] = random_token(m->vocab);
                    rc = llama_forward(m, &sts[ci], &kvs[ci], one, 1, 1, err, sizeof err);
                }
                dt[(size_t)ci * reps + r][0] = now_s() - t0;
                dt[(size_t)ci * reps + r][1] = cpu_s() - c0;
            }
        for (int ci = 0; ci < n_cases && rc == 0; ci++) {
            for (int r = 0; r < reps; r++) {
                tps[r] = gen / dt[(size_t)ci * reps + r][0];
                cps[r] = gen / dt[(size_t)ci * reps + r][1] * nthreads;
            }
            double lo = tps[0], hi = tps[0];
            for (int r = 1; r < reps; r++) lo = tps[r] < lo ? tps[r] : lo, hi = tps[r] > hi ? tps[r] : hi;
            printf("| %s | tg%d @ d%d | %.1f | %.1f | %.1f | %.1f |\n", cases[ci].name, gen, depths[di],
                   median(tps, reps), lo, hi, median(cps, reps));
            fflush(stdout);
        }
    }
    if (rc != 0) fprintf(stderr, "bench-e2e: %s\n", err);
    for (int ci = 0; ci < live; ci++) {
        llama_state_free(&sts[ci]);
        llama_kv_free(&kvs[ci]);
    }
    free(dt);
    free(tps);
    free(cps);
    free(one);
    llama_free(m);
    return rc == 0 ? 0 : 1;
}

/* `oscar bench-e2e`: --device cpu here; --device cuda (or no --device in a
 * CUDA build) the GPU benchmark, which gets the arguments without --device. */
int oscar_cmd_bench_e2e_device(int argc, char **argv) {
    const char *device = NULL;
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--device")) device = argv[i + 1];
#ifdef OSCAR_MODEL_E2E
    const int cpu = device && !strcmp(device, "cpu");
#else
    const int cpu = !device || !strcmp(device, "cpu");
#endif
    if (device && strcmp(device, "cpu") != 0 && strcmp(device, "cuda") != 0) {
        fprintf(stderr, "bench-e2e: --device takes cpu or cuda\n");
        return 2;
    }
    if (cpu) return bench_cpu(argc, argv);
    char **rest = malloc(sizeof(char *) * (size_t)(argc + 1));
    if (!rest) return 1;
    int n = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            i++;
            continue;
        }
        rest[n++] = argv[i];
    }
    rest[n] = NULL;
    int rc = oscar_cmd_bench_e2e(n, rest);
    free(rest);
    return rc;
}
