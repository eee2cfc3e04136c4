/*
 * bench_gpu.c - decode attention and append/pack timings of the CUDA backend.
 *
 *   bench_gpu [out.jsonl]
 *
 * Decode: Hq=32, Hkv=8, R=128, Gk=Gv=32, one query per sequence, caches
 * filled by the append kernel itself. Each timing is the median of >= 30
 * CUDA-event-timed calls after warm-up; when one batch's cache is smaller
 * than 4x the L2, calls rotate over several copies of the batch (distinct
 * sequences) so that the bytes come from HBM. Bytes counted: every packed
 * layer block of the batch (codes, parameters, norms) + window rows.
 * Append: 128K tokens of one sequence (8 KV heads, d=128, bf16 input) into
 * an empty cache, check_finite = 0; bytes = input read + blocks written.
 * One JSON object per line goes to stdout and to the file.
 */
#include "oscar.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)
#define OK(c, x)                                                                                       \
    do {                                                                                               \
        oscar_status s_ = (x);                                                                         \
        if (s_ != OSCAR_OK) {                                                                          \
            fprintf(stderr, "%s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #x, oscar_status_name(s_),     \
                    (c) ? oscar_last_error(c) : "");                                                   \
            exit(3);                                                                                   \
        }                                                                                              \
    } while (0)

static FILE *g_out;
static size_t g_l2 = 50u << 20;

static uint64_t rng_s = 0x9e3779b97f4a7c15ull;
static double urand(void) {
    rng_s ^= rng_s << 13;
    rng_s ^= rng_s >> 7;
    rng_s ^= rng_s << 17;
    return (double)(rng_s >> 11) * (1.0 / 9007199254740992.0);
}
static float nrand(void) { return (float)((urand() + urand() + urand() + urand() - 2.0) * 1.7320508); }

static uint16_t to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Device buffer of n 16-bit elements with random N(0,1)-ish values
 * (a 4M-element random pattern repeated). */
static void *rand_dev(size_t n, oscar_dtype dt) {
    const size_t pat = (size_t)1 << 22;
    uint16_t *h = malloc(pat * 2);
    for (size_t i = 0; i < pat; i++) {
        float x = nrand();
        h[i] = dt == OSCAR_DTYPE_BF16 ? to_bf16(x) : oscar_f32_to_f16(x);
    }
    void *d;
    CK(cudaMalloc(&d, n * 2));
    for (size_t o = 0; o < n; o += pat) {
        size_t m = n - o < pat ? n - o : pat;
        CK(cudaMemcpy((uint16_t *)d + o, h, m * 2, cudaMemcpyHostToDevice));
    }
    free(h);
    return d;
}

static int cmpf(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static float median(float *x, int n) {
    qsort(x, (size_t)n, sizeof(float), cmpf);
    return n % 2 ? x[n / 2] : 0.5f * (x[n / 2 - 1] + x[n / 2]);
}

typedef struct dcase {
    const char *tag;
    int B, ctx, d, bits;
    oscar_method method;
    oscar_dtype dt; /* window, q, out and K/V input dtype */
} dcase;

static oscar_config base_cfg(int d, int bits, oscar_method m, oscar_dtype dt) {
    oscar_config c = oscar_config_default();
    c.method = m;
    c.bits = bits;
    c.head_dim = d;
    c.num_kv_heads = 8;
    c.num_q_heads = 32;
    c.num_layers = 1;
    c.k_group = 32;
    c.v_group = 32;
    c.residual = 128;
    c.window_dtype = dt;
    c.backend = OSCAR_BACKEND_CUDA;
    c.check_finite = 0;
    return c;
}

static void bench_decode(const dcase *C, void *kin, void *vin) {
    const int hkv = 8, hq = 32, R = 128;
    oscar_config cfg = base_cfg(C->d, C->bits, C->method, C->dt);
    /* bytes of one batch */
    oscar_cache *probe = NULL;
    char err[256];
    cfg.block_count = 1;
    cfg.max_seqs = 1;
    OK(NULL, oscar_cache_create(&cfg, &probe, err, sizeof err));
    oscar_memory_stats ms;
    OK(probe, oscar_memory(probe, &ms));
    oscar_cache_destroy(probe);
    const int64_t blocks_per_seq = C->ctx / R;
    const int wtok = C->ctx % R;
    const double batch_bytes = (double)C->B * ((double)blocks_per_seq * (double)ms.block_bytes +
                                               (double)wtok * hkv * C->d * 2 * 2);
    int sets = (int)ceil(4.0 * (double)g_l2 / batch_bytes);
    if (sets < 1) sets = 1;
    if (sets * C->B > 64) sets = 64 / C->B;
    cfg.block_count = (int)(blocks_per_seq * C->B * sets + 1);
    cfg.max_seqs = C->B * sets;
    oscar_cache *c = NULL;
    OK(NULL, oscar_cache_create(&cfg, &c, err, sizeof err));
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cfg.max_seqs);
    for (int i = 0; i < cfg.max_seqs; i++) {
        OK(c, oscar_seq_add(c, &ids[i]));
        /* the append kernel fills the cache: up to 128K tokens per call */
        int64_t left = C->ctx;
        while (left > 0) {
            int32_t n = (int32_t)(left > 131072 ? 131072 : left);
            OK(c, oscar_append(c, 0, 1, &ids[i], &n, kin, vin, C->dt, NULL));
            left -= n;
        }
    }
    CK(cudaDeviceSynchronize());
    const size_t qn = (size_t)C->B * hq * C->d;
    void *q = rand_dev(qn, C->dt), *o;
    CK(cudaMalloc(&o, qn * 2));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int warm = 10, reps = 50;
    float t[64];
    for (int it = 0; it < warm + reps; it++) {
        const int s = it % sets;
        CK(cudaEventRecord(e0, NULL));
        OK(c, oscar_attention(c, 0, C->B, ids + (size_t)s * C->B, 1, q, C->dt, o, C->dt, 0.0f, NULL));
        CK(cudaEventRecord(e1, NULL));
        CK(cudaEventSynchronize(e1));
        if (it >= warm) CK(cudaEventElapsedTime(&t[it - warm], e0, e1));
    }
    CK(cudaGetLastError());
    const float ms_med = median(t, reps);
    const double gbs = batch_bytes / (ms_med * 1e-3) / 1e9;
    char line[512];
    snprintf(line, sizeof line,
             "{\"kind\":\"decode\",\"tag\":\"%s\",\"B\":%d,\"ctx\":%d,\"d\":%d,\"bits\":%d,\"method\":\"%s\","
             "\"dtype\":\"%s\",\"ms\":%.5f,\"bytes\":%.0f,\"GBps\":%.1f,\"sets\":%d,\"min_ms\":%.5f}",
             C->tag, C->B, C->ctx, C->d, C->bits, oscar_method_name(C->method),
             C->dt == OSCAR_DTYPE_BF16 ? "bf16" : "fp16", ms_med, batch_bytes, gbs, sets, t[0]);
    printf("%s\n", line);
    if (g_out) fprintf(g_out, "%s\n", line);
    fflush(stdout);
    CK(cudaFree(q));
    CK(cudaFree(o));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    free(ids);
    oscar_cache_destroy(c);
}

static void bench_append(const char *tag, int d, int bits, oscar_method m, oscar_dtype dt, void *kin, void *vin) {
    const int T = 131072, hkv = 8, R = 128;
    oscar_config cfg = base_cfg(d, bits, m, dt);
    cfg.block_count = T / R + 8;
    cfg.max_seqs = 2;
    char err[256];
    oscar_cache *c = NULL;
    OK(NULL, oscar_cache_create(&cfg, &c, err, sizeof err));
    oscar_memory_stats ms;
    OK(c, oscar_memory(c, &ms));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int warm = 3, reps = 20;
    float t[32];
    for (int it = 0; it < warm + reps; it++) {
        int32_t id;
        OK(c, oscar_seq_add(c, &id));
        int32_t n = T;
        CK(cudaEventRecord(e0, NULL));
        OK(c, oscar_append(c, 0, 1, &id, &n, kin, vin, dt, NULL));
        CK(cudaEventRecord(e1, NULL));
        CK(cudaEventSynchronize(e1));
        if (it >= warm) CK(cudaEventElapsedTime(&t[it - warm], e0, e1));
        OK(c, oscar_seq_free(c, id));
    }
    const float ms_med = median(t, reps);
    const double in_bytes = (double)T * hkv * d * 2 * 2;
    const double out_bytes = (double)(T / R) * (double)ms.block_bytes;
    char line[512];
    snprintf(line, sizeof line,
             "{\"kind\":\"append\",\"tag\":\"%s\",\"tokens\":%d,\"d\":%d,\"bits\":%d,\"method\":\"%s\",\"dtype\":\"%s\","
             "\"ms\":%.5f,\"in_bytes\":%.0f,\"out_bytes\":%.0f,\"GBps\":%.1f}",
             tag, T, d, bits, oscar_method_name(m), dt == OSCAR_DTYPE_BF16 ? "bf16" : "fp16", ms_med, in_bytes,
             out_bytes, (in_bytes + out_bytes) / (ms_med * 1e-3) / 1e9);
    printf("%s\n", line);
    if (g_out) fprintf(g_out, "%s\n", line);
    fflush(stdout);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    oscar_cache_destroy(c);
}

int main(int argc, char **argv) {
    if (!oscar_backend_available(OSCAR_BACKEND_CUDA)) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    g_out = argc > 1 ? fopen(argv[1], "w") : NULL;
    const char *only = getenv("OSCAR_BENCH_ONLY");
    int l2 = 0;
    CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    if (l2 > 0) g_l2 = (size_t)l2;
    const int T = 131072;
    /* inputs for 128K tokens of 8 heads at d <= 256 */
    void *kb = rand_dev((size_t)T * 8 * 256, OSCAR_DTYPE_BF16), *vb = rand_dev((size_t)T * 8 * 256, OSCAR_DTYPE_BF16);
    void *kh = rand_dev((size_t)T * 8 * 128, OSCAR_DTYPE_F16), *vh = rand_dev((size_t)T * 8 * 128, OSCAR_DTYPE_F16);

    if (!only || strstr(only, "append")) {
        bench_append("append oscar b2 d128 bf16", 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, kb, vb);
        bench_append("append oscar b2 d128 fp16", 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_F16, kh, vh);
        bench_append("append oscar b4 d128 bf16", 128, 4, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, kb, vb);
        bench_append("append oscar b2 d64 bf16", 64, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, kb, vb);
        bench_append("append oscar b2 d256 bf16", 256, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, kb, vb);
    }
    if (!only || strstr(only, "decode")) {
        const dcase main_cases[] = {
            {"main", 1, 8192, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
            {"main", 1, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
            {"main", 1, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
            {"main", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
            {"main", 8, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
            {"main", 32, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
        };
        for (size_t i = 0; i < sizeof main_cases / sizeof main_cases[0]; i++)
            bench_decode(&main_cases[i], kb, vb);
        if (!only || strstr(only, "variants")) {
            const dcase var_cases[] = {
                {"fp16", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_F16},
                {"fp16", 1, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_F16},
                {"4bit", 8, 32768, 128, 4, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
                {"4bit", 1, 131072, 128, 4, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
                {"d64", 8, 32768, 64, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
                {"d64", 1, 131072, 64, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
                {"d256", 8, 32768, 256, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
                {"d256", 1, 131072, 256, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16},
                {"kivi", 8, 32768, 128, 2, OSCAR_METHOD_KIVI, OSCAR_DTYPE_BF16},
                {"none", 8, 32768, 128, 2, OSCAR_METHOD_NONE, OSCAR_DTYPE_BF16},
            };
            for (size_t i = 0; i < sizeof var_cases / sizeof var_cases[0]; i++)
                bench_decode(&var_cases[i], var_cases[i].dt == OSCAR_DTYPE_F16 ? kh : kb,
                             var_cases[i].dt == OSCAR_DTYPE_F16 ? vh : vb);
        }
    }
    CK(cudaFree(kb));
    CK(cudaFree(vb));
    CK(cudaFree(kh));
    CK(cudaFree(vh));
    if (g_out) fclose(g_out);
    return 0;
}
