/*
 * bench_gpu.c - decode attention and append/pack timings of the CUDA backend.
 *
 *   bench_gpu [out.jsonl]     (OSCAR_BENCH_ONLY=append|decode|variants|engine narrows it)
 *
 * Decode: Hq=32, Hkv=8, R=128, Gk=Gv=32, one query per sequence, caches
 * filled by the append kernel itself. Each timing is the median of >= 30
 * CUDA-event-timed calls after warm-up; when one batch's cache is smaller
 * than 4x the L2, calls rotate over several copies of the batch (distinct
 * sequences) so that the bytes come from HBM. Bytes counted: every packed
 * layer block of the batch (codes, parameters, norms) + window rows.
 * Append: 128K tokens of one sequence (8 KV heads, d=128, bf16 input) into
 * an empty cache, check_finite = 0; bytes = input read + blocks written.
 * Engine (OSCAR_BENCH_ONLY=engine): Qwen3-8B shape (Hq=32, Hkv=8, d=128,
 * oscar 2-bit, bf16, check_finite = 1), B = 1, 8, 32 sequences of 32K
 * tokens, one layer:
 *  - kind "engine_host": host wall time of one call (median, p90, max over
 *    200 calls) of oscar_batch_append / oscar_batch_attention (batch API,
 *    caller_metadata = 1) and oscar_append / oscar_attention (sequence API),
 *    one token per sequence. The stream is held by a blocking host function
 *    while the calls are made (rounds of 25), so the GPU is never waiting
 *    for the host and each call only enqueues: the time is the library's
 *    own host cost.
 *  - kind "engine_graph": one decode step of the layer (batch append +
 *    batch attention), GPU time from CUDA events, median of 50 reps:
 *    "eager_us" launched call by call from an otherwise idle host;
 *    "graph_us" the same two calls captured once in a CUDA graph and
 *    replayed; "kernels_us" the device time of the kernels themselves
 *    (events around each call, enqueued behind a held stream so no launch
 *    gap is counted), split into "append_kernels_us" and
 *    "attention_kernels_us"; and the ratios eager/graph, graph/kernels,
 *    eager/kernels.
 * OSCAR_BENCH_CASE="main B1 ctx131072" (a substring of a case's label) runs
 * only the matching decode/append cases (scripts/gpu-profile.sh uses it).
 * One JSON object per line goes to stdout and to the file.
 */
#define _POSIX_C_SOURCE 200809L

#include "oscar.h"
#include "kv_bf16.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    /* past the paper (0: base_cfg's): key_bits, value_bits, k_group,
     * v_group, residual R, sink_tokens, rollback_tokens (min-exact),
     * key_norm_per_head */
    int kbits, vbits, gk, gv, R, sinks, lag, norm_per_head;
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

/* OSCAR_BENCH_CASE narrows the run to the cases whose label contains it
 * (decode: "main B1 ctx131072 d128 b2"; append: its tag), e.g. for ncu. */
static int case_selected(const char *label) {
    const char *want = getenv("OSCAR_BENCH_CASE");
    return !want || !*want || strstr(label, want) != NULL;
}

static void bench_decode(const dcase *C, void *kin, void *vin) {
    const int hkv = 8, hq = 32, R = C->R ? C->R : 128;
    char label[128];
    snprintf(label, sizeof label, "%s B%d ctx%d d%d b%d", C->tag, C->B, C->ctx, C->d, C->bits);
    if (!case_selected(label)) return;
    oscar_config cfg = base_cfg(C->d, C->bits, C->method, C->dt);
    cfg.key_bits = C->kbits;
    cfg.value_bits = C->vbits;
    if (C->gk) cfg.k_group = C->gk;
    if (C->gv) cfg.v_group = C->gv;
    cfg.residual = R;
    cfg.sink_tokens = C->sinks;
    cfg.rollback_tokens = C->lag;
    cfg.key_norm_per_head = C->norm_per_head;
    /* bytes of one batch */
    oscar_cache *probe = NULL;
    char err[256];
    cfg.block_count = 1;
    cfg.max_seqs = 1;
    OK(NULL, oscar_cache_create(&cfg, &probe, err, sizeof err));
    oscar_memory_stats ms;
    OK(probe, oscar_memory(probe, &ms));
    oscar_cache_destroy(probe);
    /* blocks packed at ctx tokens (FORMAT.md step 3); the rest is exact */
    const int64_t after_sinks = C->ctx - C->sinks;
    const int64_t blocks_per_seq = after_sinks >= C->lag ? (after_sinks - C->lag) / R : 0;
    const int64_t wtok = C->ctx - blocks_per_seq * R;
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
             "\"dtype\":\"%s\",\"ms\":%.5f,\"bytes\":%.0f,\"GBps\":%.1f,\"sets\":%d,\"min_ms\":%.5f,"
             "\"key_bits\":%d,\"value_bits\":%d,\"k_group\":%d,\"v_group\":%d,\"residual\":%d,\"sinks\":%d,"
             "\"min_exact\":%d,\"norm_per_head\":%d}",
             C->tag, C->B, C->ctx, C->d, C->bits, oscar_method_name(C->method),
             C->dt == OSCAR_DTYPE_BF16 ? "bf16" : "fp16", ms_med, batch_bytes, gbs, sets, t[0],
             C->kbits ? C->kbits : C->bits, C->vbits ? C->vbits : C->bits, cfg.k_group, cfg.v_group, R, C->sinks,
             C->lag, C->norm_per_head);
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
    if (!case_selected(tag)) return;
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

/* ---- the engine API: host cost per call, eager launches vs a CUDA graph ---- */

static void emit(const char *line) {
    printf("%s\n", line);
    if (g_out) fprintf(g_out, "%s\n", line);
    fflush(stdout);
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Sorts x; the p-quantile (nearest rank). */
static double quantile(double *x, int n, double p) {
    qsort(x, (size_t)n, sizeof(double), cmpd);
    int i = (int)ceil(p * n) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return x[i];
}

static atomic_int g_hold_release, g_hold_timeouts;

/* Blocks its stream until released (or 2 s pass, counted as a timeout: a
 * call that waited for the device). */
static void CUDART_CB hold_fn(void *arg) {
    (void)arg;
    const double t0 = now_us();
    while (!atomic_load(&g_hold_release)) {
        if (now_us() - t0 > 2e6) {
            atomic_fetch_add(&g_hold_timeouts, 1);
            return;
        }
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

static void hold(cudaStream_t s) {
    atomic_store(&g_hold_release, 0);
    CK(cudaLaunchHostFunc(s, hold_fn, NULL));
}

static void release(cudaStream_t s) {
    atomic_store(&g_hold_release, 1);
    CK(cudaStreamSynchronize(s));
}

enum { ENG_BATCH_APPEND, ENG_BATCH_ATTENTION, ENG_SEQ_APPEND, ENG_SEQ_ATTENTION, ENG_CALLS };
static const char *const eng_call_name[ENG_CALLS] = {"batch_append", "batch_attention", "append", "attention"};

typedef struct engine_rig {
    int B, ctx, max_len, stride;
    oscar_cache *cb, *cs;      /* batch API (caller_metadata = 1), sequence API */
    oscar_batch dec;           /* decode batch of cb: 1 token per sequence     */
    int32_t *ids, *ones;       /* cs's sequences                               */
    int32_t *d_lens, *d_slots, *d_tables;
    void *k1, *v1, *q, *o;     /* one decode step's inputs and output          */
    cudaStream_t s;
} engine_rig;

static oscar_status eng_call(engine_rig *E, int which) {
    switch (which) {
    case ENG_BATCH_APPEND: return oscar_batch_append(E->cb, 0, &E->dec, E->k1, E->v1, OSCAR_DTYPE_BF16, E->s);
    case ENG_BATCH_ATTENTION:
        return oscar_batch_attention(E->cb, 0, &E->dec, E->q, OSCAR_DTYPE_BF16, E->o, OSCAR_DTYPE_BF16, 0.0f, E->s);
    case ENG_SEQ_APPEND:
        return oscar_append(E->cs, 0, E->B, E->ids, E->ones, E->k1, E->v1, OSCAR_DTYPE_BF16, E->s);
    default:
        return oscar_attention(E->cs, 0, E->B, E->ids, 1, E->q, OSCAR_DTYPE_BF16, E->o, OSCAR_DTYPE_BF16, 0.0f, E->s);
    }
}

static oscar_cache *eng_cache(int which, const engine_rig *E) {
    return which == ENG_SEQ_APPEND || which == ENG_SEQ_ATTENTION ? E->cs : E->cb;
}

static void bench_engine(int B, int ctx, void *kin, void *vin, size_t kin_elems) {
    const int hkv = 8, hq = 32, d = 128, R = 128, chunk = OSCAR_MAX_Q_LEN;
    engine_rig E;
    memset(&E, 0, sizeof E);
    E.B = B;
    E.ctx = ctx;
    E.max_len = ctx + 1;
    /* room for the decode tokens the sequence API appends (~210) */
    E.stride = ctx / R + 4;
    if ((size_t)B * chunk * hkv * d > kin_elems) {
        fprintf(stderr, "bench_engine: input buffer too small for B=%d\n", B);
        exit(2);
    }
    oscar_config cfg = base_cfg(d, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16);
    cfg.check_finite = 1; /* what an engine runs with now that the check is asynchronous */
    cfg.max_seqs = B;
    cfg.block_count = B * E.stride + 1;
    oscar_config cfgb = cfg;
    cfgb.caller_metadata = 1;
    char err[256];
    OK(NULL, oscar_cache_create(&cfgb, &E.cb, err, sizeof err));
    OK(NULL, oscar_cache_create(&cfg, &E.cs, err, sizeof err));
    CK(cudaStreamCreate(&E.s));
    const cudaStream_t s = E.s;

    /* device metadata: sequence i in slot i, blocks i*stride .. */
    int32_t *h_tables = malloc(sizeof(int32_t) * (size_t)B * E.stride), *h_slots = malloc(sizeof(int32_t) * B);
    int32_t *h_lens = malloc(sizeof(int32_t) * B);
    E.ids = malloc(sizeof(int32_t) * B);
    E.ones = malloc(sizeof(int32_t) * B);
    int32_t *n_chunk = malloc(sizeof(int32_t) * B);
    for (int i = 0; i < B; i++) {
        h_slots[i] = i;
        E.ones[i] = 1;
        for (int j = 0; j < E.stride; j++) h_tables[(size_t)i * E.stride + j] = i * E.stride + j;
        OK(E.cs, oscar_seq_add(E.cs, &E.ids[i]));
    }
    CK(cudaMalloc((void **)&E.d_lens, sizeof(int32_t) * B));
    CK(cudaMalloc((void **)&E.d_slots, sizeof(int32_t) * B));
    CK(cudaMalloc((void **)&E.d_tables, sizeof(int32_t) * (size_t)B * E.stride));
    CK(cudaMemcpy(E.d_slots, h_slots, sizeof(int32_t) * B, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(E.d_tables, h_tables, sizeof(int32_t) * (size_t)B * E.stride, cudaMemcpyHostToDevice));

    /* fill both caches with ctx tokens per sequence, OSCAR_MAX_Q_LEN at a time */
    for (int pos = 0; pos < ctx; pos += chunk) {
        const int n = ctx - pos < chunk ? ctx - pos : chunk;
        for (int i = 0; i < B; i++) h_lens[i] = pos + n, n_chunk[i] = n;
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(E.d_lens, h_lens, sizeof(int32_t) * B, cudaMemcpyHostToDevice));
        oscar_batch bf;
        memset(&bf, 0, sizeof bf);
        bf.num_seqs = B, bf.tokens_per_seq = n, bf.max_seq_len = E.max_len, bf.block_table_stride = E.stride;
        bf.seq_lens = E.d_lens, bf.window_slots = E.d_slots, bf.block_tables = E.d_tables;
        OK(E.cb, oscar_batch_append(E.cb, 0, &bf, kin, vin, OSCAR_DTYPE_BF16, s));
        OK(E.cs, oscar_append(E.cs, 0, B, E.ids, n_chunk, kin, vin, OSCAR_DTYPE_BF16, s));
    }
    OK(E.cb, oscar_synchronize(E.cb, s));
    OK(E.cs, oscar_synchronize(E.cs, s));
    /* decode: every batch-API step appends token ctx (seq_len ctx + 1) again */
    for (int i = 0; i < B; i++) h_lens[i] = ctx + 1;
    CK(cudaMemcpy(E.d_lens, h_lens, sizeof(int32_t) * B, cudaMemcpyHostToDevice));
    memset(&E.dec, 0, sizeof E.dec);
    E.dec.num_seqs = B, E.dec.tokens_per_seq = 1, E.dec.max_seq_len = E.max_len, E.dec.block_table_stride = E.stride;
    E.dec.seq_lens = E.d_lens, E.dec.window_slots = E.d_slots, E.dec.block_tables = E.d_tables;
    E.k1 = kin;
    E.v1 = vin;
    E.q = rand_dev((size_t)B * hq * d, OSCAR_DTYPE_BF16);
    CK(cudaMalloc(&E.o, (size_t)B * hq * d * 2));
    char line[768];

    /* (a) host time per call, the stream held so that calls only enqueue */
    {
        enum { ROUNDS = 8, PER_ROUND = 25, N = ROUNDS * PER_ROUND };
        double t[N];
        for (int which = 0; which < ENG_CALLS; which++) {
            oscar_cache *c = eng_cache(which, &E);
            for (int w = 0; w < 5; w++) OK(c, eng_call(&E, which));
            OK(c, oscar_synchronize(c, s));
            atomic_store(&g_hold_timeouts, 0);
            for (int r = 0; r < ROUNDS; r++) {
                hold(s);
                for (int j = 0; j < PER_ROUND; j++) {
                    const double t0 = now_us();
                    const oscar_status st = eng_call(&E, which);
                    t[r * PER_ROUND + j] = now_us() - t0;
                    if (st != OSCAR_OK) {
                        release(s);
                        OK(c, st);
                    }
                }
                release(s);
            }
            OK(c, oscar_synchronize(c, s));
            const double med = quantile(t, N, 0.5), p90 = quantile(t, N, 0.9), mx = t[N - 1];
            snprintf(line, sizeof line,
                     "{\"kind\":\"engine_host\",\"tag\":\"engine\",\"B\":%d,\"ctx\":%d,\"d\":%d,\"bits\":2,"
                     "\"method\":\"oscar\",\"dtype\":\"bf16\",\"api\":\"%s\",\"call\":\"%s\",\"us_median\":%.2f,"
                     "\"us_p90\":%.2f,\"us_max\":%.2f,\"calls\":%d,\"hold_timeouts\":%d}",
                     B, ctx, d, which < ENG_SEQ_APPEND ? "batch" : "sequence", eng_call_name[which], med, p90, mx, N,
                     atomic_load(&g_hold_timeouts));
            emit(line);
        }
    }

    /* (b) one layer's decode step: eager, kernels only, CUDA graph */
    {
        enum { WARM = 10, REPS = 50 };
        float te[REPS], ta[REPS], tb[REPS], tk[REPS], tg[REPS];
        cudaEvent_t e0, e1, e2;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        CK(cudaEventCreate(&e2));
        /* eager: the host launches the two calls while the GPU waits */
        for (int it = 0; it < WARM + REPS; it++) {
            CK(cudaEventRecord(e0, s));
            OK(E.cb, eng_call(&E, ENG_BATCH_APPEND));
            OK(E.cb, eng_call(&E, ENG_BATCH_ATTENTION));
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            if (it >= WARM) CK(cudaEventElapsedTime(&te[it - WARM], e0, e1));
        }
        /* kernels: everything enqueued behind a held stream, then run back to back */
        atomic_store(&g_hold_timeouts, 0);
        for (int it = 0; it < WARM + REPS; it++) {
            hold(s);
            CK(cudaEventRecord(e0, s));
            OK(E.cb, eng_call(&E, ENG_BATCH_APPEND));
            CK(cudaEventRecord(e1, s));
            OK(E.cb, eng_call(&E, ENG_BATCH_ATTENTION));
            CK(cudaEventRecord(e2, s));
            release(s);
            if (it >= WARM) {
                CK(cudaEventElapsedTime(&ta[it - WARM], e0, e1));
                CK(cudaEventElapsedTime(&tb[it - WARM], e1, e2));
                tk[it - WARM] = ta[it - WARM] + tb[it - WARM];
            }
        }
        OK(E.cb, oscar_synchronize(E.cb, s));
        /* graph: captured once, replayed */
        cudaGraph_t graph = NULL;
        cudaGraphExec_t exec = NULL;
        char graph_err[256] = "";
        cudaError_t ce = cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        if (ce != cudaSuccess) {
            snprintf(graph_err, sizeof graph_err, "cudaStreamBeginCapture: %s", cudaGetErrorString(ce));
        } else {
            const oscar_status s1 = eng_call(&E, ENG_BATCH_APPEND);
            const oscar_status s2 = eng_call(&E, ENG_BATCH_ATTENTION);
            ce = cudaStreamEndCapture(s, &graph);
            if (s1 != OSCAR_OK || s2 != OSCAR_OK)
                snprintf(graph_err, sizeof graph_err, "during capture: append %s, attention %s: %s",
                         oscar_status_name(s1), oscar_status_name(s2), oscar_last_error(E.cb));
            else if (ce != cudaSuccess)
                snprintf(graph_err, sizeof graph_err, "cudaStreamEndCapture: %s", cudaGetErrorString(ce));
            else if ((ce = cudaGraphInstantiate(&exec, graph, 0)) != cudaSuccess)
                snprintf(graph_err, sizeof graph_err, "cudaGraphInstantiate: %s", cudaGetErrorString(ce));
        }
        (void)cudaGetLastError();
        for (char *p = graph_err; *p; p++)
            if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) *p = '\'';
        float g_med = NAN;
        if (!graph_err[0]) {
            CK(cudaGraphUpload(exec, s));
            for (int it = 0; it < WARM + REPS; it++) {
                CK(cudaEventRecord(e0, s));
                CK(cudaGraphLaunch(exec, s));
                CK(cudaEventRecord(e1, s));
                CK(cudaEventSynchronize(e1));
                if (it >= WARM) CK(cudaEventElapsedTime(&tg[it - WARM], e0, e1));
            }
            OK(E.cb, oscar_synchronize(E.cb, s));
            g_med = median(tg, REPS) * 1e3f;
        } else {
            fprintf(stderr, "bench_engine B=%d: CUDA graph not measured: %s\n", B, graph_err);
        }
        if (exec) CK(cudaGraphExecDestroy(exec));
        if (graph) CK(cudaGraphDestroy(graph));
        const float e_med = median(te, REPS) * 1e3f, k_med = median(tk, REPS) * 1e3f;
        const float a_med = median(ta, REPS) * 1e3f, b_med = median(tb, REPS) * 1e3f;
        /* JSON has no NaN: what needs the graph is null when it was not measured */
        char g_us[32], r_eg[32], r_gk[32];
        snprintf(g_us, sizeof g_us, isfinite(g_med) ? "%.2f" : "null", g_med);
        snprintf(r_eg, sizeof r_eg, isfinite(g_med) ? "%.3f" : "null", e_med / g_med);
        snprintf(r_gk, sizeof r_gk, isfinite(g_med) ? "%.3f" : "null", g_med / k_med);
        snprintf(line, sizeof line,
                 "{\"kind\":\"engine_graph\",\"tag\":\"engine\",\"B\":%d,\"ctx\":%d,\"d\":%d,\"bits\":2,"
                 "\"method\":\"oscar\",\"dtype\":\"bf16\",\"eager_us\":%.2f,\"graph_us\":%s,\"kernels_us\":%.2f,"
                 "\"append_kernels_us\":%.2f,\"attention_kernels_us\":%.2f,\"eager_over_graph\":%s,"
                 "\"graph_over_kernels\":%s,\"eager_over_kernels\":%.3f,\"reps\":%d,\"hold_timeouts\":%d%s%s%s}",
                 B, ctx, d, e_med, g_us, k_med, a_med, b_med, r_eg, r_gk, e_med / k_med, REPS,
                 atomic_load(&g_hold_timeouts), graph_err[0] ? ",\"graph_error\":\"" : "", graph_err[0] ? graph_err : "",
                 graph_err[0] ? "\"" : "");
        emit(line);
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        cudaEventDestroy(e2);
    }
    CK(cudaFree(E.q));
    CK(cudaFree(E.o));
    CK(cudaFree(E.d_lens));
    CK(cudaFree(E.d_slots));
    CK(cudaFree(E.d_tables));
    free(h_tables), free(h_slots), free(h_lens), free(n_chunk), free(E.ids), free(E.ones);
    CK(cudaStreamDestroy(E.s));
    oscar_cache_destroy(E.cb);
    oscar_cache_destroy(E.cs);
}

/* ---- the BF16 paged KV cache baseline (model/gpu/kv_bf16.h) ----
 * OSCAR_BENCH_ONLY=bf16kv (also part of the full run): kvbf16_attention at
 * the shapes of the decode cases (Hq=32, Hkv=8, one query per sequence, the
 * cuDNN peers of peers.py are measured at the same (B, ctx, d)), pages of 64
 * tokens on shuffled blocks, random bf16 K/V filling the pool. One call per
 * timing (split kernel + merge kernel when there are splits), CUDA events,
 * median of 50 after 10 warm-up calls, rotating over several copies of the
 * batch when one is smaller than 4x the L2, as bench_decode does. Bytes: the
 * K and V rows of the batch, B * ctx * Hkv * d * 2 * 2. Records have kind
 * "decode", tag "bf16kv", method "paged", bits 16, so that peers.py's table
 * lists them beside cuDNN; "splits" is the split count the call used. */
static void fill_random_bf16(void *dst, size_t n) {
    const size_t pat = (size_t)1 << 22;
    uint16_t *h = malloc(pat * 2);
    for (size_t i = 0; i < pat; i++) h[i] = to_bf16(nrand());
    const size_t first = n < pat ? n : pat;
    CK(cudaMemcpy(dst, h, first * 2, cudaMemcpyHostToDevice));
    /* then double the filled prefix on the device */
    for (size_t done = first; done < n;) {
        const size_t m = n - done < done ? n - done : done;
        CK(cudaMemcpy((uint16_t *)dst + done, dst, m * 2, cudaMemcpyDeviceToDevice));
        done += m;
    }
    free(h);
}

static void bench_bf16kv(int B, int ctx, int d) {
    const int hkv = 8, hq = 32, bt = 64;
    const double batch_bytes = (double)B * ctx * hkv * d * 2 * 2;
    int sets = (int)ceil(4.0 * (double)g_l2 / batch_bytes);
    if (sets < 1) sets = 1;
    if (sets * B > 64) sets = B >= 64 ? 1 : 64 / B;
    const int per_seq = (ctx + bt - 1) / bt, nseq = B * sets;
    kvbf16_layout L = {1, hkv, hq, d, bt, nseq * per_seq};
    const size_t pool_bytes = kvbf16_pool_bytes(&L);
    void *pool = NULL, *ws = NULL, *o = NULL;
    CK(cudaMalloc(&pool, pool_bytes));
    fill_random_bf16(pool, pool_bytes / 2);
    /* block tables: a shuffled permutation of the pool's blocks */
    int32_t *tab = malloc(sizeof(int32_t) * (size_t)nseq * per_seq), *lens = malloc(sizeof(int32_t) * (size_t)nseq);
    for (int i = 0; i < nseq * per_seq; i++) tab[i] = i;
    for (int i = nseq * per_seq - 1; i > 0; i--) {
        const int j = (int)(urand() * (i + 1)); /* 0 .. i */
        const int32_t x = tab[i];
        tab[i] = tab[j];
        tab[j] = x;
    }
    for (int i = 0; i < nseq; i++) lens[i] = ctx;
    int32_t *d_tab = NULL, *d_lens = NULL;
    CK(cudaMalloc((void **)&d_tab, sizeof(int32_t) * (size_t)nseq * per_seq));
    CK(cudaMalloc((void **)&d_lens, sizeof(int32_t) * (size_t)nseq));
    CK(cudaMemcpy(d_tab, tab, sizeof(int32_t) * (size_t)nseq * per_seq, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_lens, lens, sizeof(int32_t) * (size_t)nseq, cudaMemcpyHostToDevice));
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t ws_bytes = kvbf16_workspace_bytes(&L, 1, 2 * sms);
    CK(cudaMalloc(&ws, ws_bytes));
    const size_t qn = (size_t)B * hq * d;
    void *q = rand_dev(qn, OSCAR_DTYPE_BF16);
    CK(cudaMalloc(&o, qn * 2));
    const int splits = kvbf16_attention_splits(&L, B, 1, ctx, ws_bytes);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int warm = 10, reps = 50;
    float t[64];
    char err[256];
    for (int it = 0; it < warm + reps; it++) {
        const int s = it % sets;
        CK(cudaEventRecord(e0, NULL));
        const int st = kvbf16_attention(pool, &L, 0, B, 1, d_lens + (size_t)s * B, d_tab + (size_t)s * B * per_seq,
                                        per_seq, ctx, q, o, 0.0f, ws, ws_bytes, NULL, err, sizeof err);
        if (st != KVBF16_OK) {
            fprintf(stderr, "kvbf16_attention B=%d ctx=%d d=%d: %s\n", B, ctx, d, err);
            exit(3);
        }
        CK(cudaEventRecord(e1, NULL));
        CK(cudaEventSynchronize(e1));
        if (it >= warm) CK(cudaEventElapsedTime(&t[it - warm], e0, e1));
    }
    CK(cudaGetLastError());
    const float ms_med = median(t, reps);
    char line[512];
    snprintf(line, sizeof line,
             "{\"kind\":\"decode\",\"tag\":\"bf16kv\",\"B\":%d,\"ctx\":%d,\"d\":%d,\"bits\":16,\"method\":\"paged\","
             "\"dtype\":\"bf16\",\"ms\":%.5f,\"bytes\":%.0f,\"GBps\":%.1f,\"sets\":%d,\"min_ms\":%.5f,\"splits\":%d,"
             "\"block_tokens\":%d}",
             B, ctx, d, ms_med, batch_bytes, batch_bytes / (ms_med * 1e-3) / 1e9, sets, t[0], splits, bt);
    emit(line);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    CK(cudaFree(q));
    CK(cudaFree(o));
    CK(cudaFree(ws));
    CK(cudaFree(d_tab));
    CK(cudaFree(d_lens));
    CK(cudaFree(pool));
    free(tab), free(lens);
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
            {"main", 1, 8192, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
            {"main", 1, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
            {"main", 1, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
            {"main", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
            {"main", 8, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
            {"main", 32, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
        };
        for (size_t i = 0; i < sizeof main_cases / sizeof main_cases[0]; i++)
            bench_decode(&main_cases[i], kb, vb);
        if (!only || strstr(only, "variants")) {
            const dcase var_cases[] = {
                {"fp16", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_F16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"fp16", 1, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_F16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"4bit", 8, 32768, 128, 4, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"4bit", 1, 131072, 128, 4, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"d64", 8, 32768, 64, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"d64", 1, 131072, 64, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"d256", 8, 32768, 256, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"d256", 1, 131072, 256, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"kivi", 8, 32768, 128, 2, OSCAR_METHOD_KIVI, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                {"none", 8, 32768, 128, 2, OSCAR_METHOD_NONE, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 0},
                /* the recommended configurations (docs/ACCURACY.md): OScaR-2
                 * with R 64, 32 sinks, 64 exact recent tokens; K3/V2 with
                 * 64/64 groups and the same window; and K4/V2, per-head norms */
                {"rec2", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 64, 32, 64, 0},
                {"rec2", 1, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 64, 32, 64, 0},
                {"k3v2", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 3, 2, 64, 64, 64, 32, 64, 0},
                {"k3v2", 1, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 3, 2, 64, 64, 64, 32, 64, 0},
                {"k3v2", 8, 131072, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 3, 2, 64, 64, 64, 32, 64, 0},
                {"k3v2", 8, 32768, 64, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 3, 2, 64, 64, 64, 32, 64, 0},
                {"k4v2", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 4, 2, 0, 0, 0, 0, 0, 0},
                {"perhead", 8, 32768, 128, 2, OSCAR_METHOD_OSCAR, OSCAR_DTYPE_BF16, 0, 0, 0, 0, 0, 0, 0, 1},
            };
            for (size_t i = 0; i < sizeof var_cases / sizeof var_cases[0]; i++)
                bench_decode(&var_cases[i], var_cases[i].dt == OSCAR_DTYPE_F16 ? kh : kb,
                             var_cases[i].dt == OSCAR_DTYPE_F16 ? vh : vb);
        }
    }
    if (!only || strstr(only, "engine")) {
        const int bs[3] = {1, 8, 32};
        for (int i = 0; i < 3; i++) bench_engine(bs[i], 32768, kb, vb, (size_t)T * 8 * 256);
    }
    if (!only || strstr(only, "bf16kv")) {
        /* the BF16 paged KV cache baseline at the decode cases' (B, ctx, d) */
        const int bf_cases[][3] = {{1, 8192, 128},  {1, 32768, 128}, {1, 131072, 128}, {8, 32768, 128},
                                   {8, 131072, 128}, {32, 32768, 128}, {8, 32768, 64},   {1, 131072, 64},
                                   {8, 32768, 256},  {1, 131072, 256}};
        for (size_t i = 0; i < sizeof bf_cases / sizeof bf_cases[0]; i++)
            bench_bf16kv(bf_cases[i][0], bf_cases[i][1], bf_cases[i][2]);
    }
    CK(cudaFree(kb));
    CK(cudaFree(vb));
    CK(cudaFree(kh));
    CK(cudaFree(vh));
    if (g_out) fclose(g_out);
    return 0;
}
