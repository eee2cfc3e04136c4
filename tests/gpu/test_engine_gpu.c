/*
 * test_engine_gpu.c - the engine-facing CUDA API (include/oscar.h: the batch
 * API with caller-owned metadata, CUDA graph capture, caller memory and the
 * allocator hook, device-side reports through oscar_poll/oscar_synchronize).
 *
 *   test_engine_gpu [--small] [--only NAME[,NAME...]] [--list]
 *
 * Tests (NAME in brackets):
 *  1 [graph]     Qwen3-8B-like shape with 4 layers, 3 sequences prefilled
 *                through the batch API; >= 300 decode steps (append +
 *                attention for every layer) run eagerly on one cache and as
 *                a captured CUDA graph replayed on a twin cache; every output
 *                bit-equal; checked against the CPU backend at many steps.
 *  2 [nosync]    with the stream held by a blocking host function, the
 *                append/attention/slot_copy/poll calls of both APIs return at
 *                once, the stream is still busy afterwards, and the current
 *                device is left as it was.
 *  3 [noalloc]   allocator hook counts stay fixed and cudaMemGetInfo is
 *                unchanged across a hot loop (block crossings, q_len up to
 *                64); caches over caller-provided regions of exactly
 *                oscar_memory_requirements_get's sizes give bit-equal outputs.
 *  4 [prefill]   chunked prefill (q_len 1 .. 4096) at the Qwen3-8B shape,
 *                2 and 4 bits, plus d=64 and d=256: sequence API and batch
 *                API on the GPU against the CPU backend, per query row.
 *  5 [nonfinite] NaN/Inf input with check_finite=1 marks one sequence failed
 *                on the device; reported once by oscar_synchronize; its
 *                outputs are NaN, the others match a twin cache; restarting
 *                the slot clears it.
 *  6 [badmeta]   out-of-range device metadata (slots, block ids, lengths) is
 *                reported as OSCAR_E_INVALID_ARGUMENT after a sync, skips
 *                only that sequence, touches no memory out of bounds (run it
 *                under compute-sanitizer); bad host fields fail at once.
 *  7 [sinks]     sink_tokens S > 0 through the batch API (S 32 / R 64 / L 64,
 *                S 5, S 33 > R at 4 bits; K3/V2 with 64/64 groups and
 *                K4/V2 with per-head norms): prompts below, at and past S in
 *                chunks, decode across block boundaries as a captured graph
 *                (bit-equal to eager), a rollback to S + P R, a slot_copy
 *                fork; attention against the CPU backend's batch API at
 *                every call, the whole pool byte-identical to the CPU's
 *                (caller-provided pools), and a seq_len below S + P R
 *                reported from the device.
 *
 * --small runs reduced sizes (for compute-sanitizer); it also turns the
 * wall-clock, stream-query and hold-timeout checks of [nosync] and the
 * cudaMemGetInfo check of [noalloc] into information only, since the
 * sanitizer slows API calls down and allocates device memory of its own.
 * Without a usable CUDA device the test prints "SKIP: ..." and exits 77.
 */
#define _POSIX_C_SOURCE 200809L

#include "testlib.h"

#include <cuda_runtime_api.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_small = 0;
static const char *g_only = NULL;

/* A CUDA call of the test itself failed: nothing after it can be trusted. */
#define CU(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            printf("FATAL %s:%d [%s]: %s: %s (%s)\n", __FILE__, __LINE__, tl_current, #x,              \
                   cudaGetErrorName(e_), cudaGetErrorString(e_));                                      \
            fflush(stdout);                                                                            \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)

/* A library call that must succeed; the message names the call and the
 * library's last error. */
#define ST_OK(cache, expr) CHECK_ST((cache), (expr), OSCAR_OK)

#define BF16 OSCAR_DTYPE_BF16

/* ---- small helpers ------------------------------------------------------------ */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *pinned(size_t bytes) {
    void *p = NULL;
    CU(cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault));
    return p;
}

static void *dmalloc(size_t bytes) {
    void *p = NULL;
    CU(cudaMalloc(&p, bytes ? bytes : 1));
    CU(cudaMemset(p, 0, bytes ? bytes : 1));
    return p;
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        printf("FATAL: out of host memory (%zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}

static int imax(int a, int b) { return a > b ? a : b; }
static int imin(int a, int b) { return a < b ? a : b; }

/* Relative L2 error of a against the reference; INFINITY if either holds a
 * non-finite value. */
static double rel_l2(const float *a, const float *ref, int64_t n) {
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(ref[i])) return INFINITY;
        const double e = (double)a[i] - (double)ref[i];
        num += e * e;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static int64_t count_diff16(const uint16_t *a, const uint16_t *b, int64_t n) {
    int64_t d = 0;
    for (int64_t i = 0; i < n; i++) d += a[i] != b[i];
    return d;
}

static int64_t count_nan(const float *x, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += isnan(x[i]) != 0;
    return c;
}

/* Random K/V rows [T][hkv][d] and queries [n][hq][d], as bf16 bits (the
 * floats are generated already rounded to bf16). */
static void gen_kv16(tl_rng *r, int64_t T, int hkv, int d, uint16_t *k16, uint16_t *v16) {
    const int64_t n = T * hkv * d;
    float *k = xmalloc(sizeof(float) * (size_t)n), *v = xmalloc(sizeof(float) * (size_t)n);
    tl_gen_kv(r, TL_FLAVOR_NORMAL, k, v, T, hkv, d, BF16);
    tl_encode(k, BF16, k16, n);
    tl_encode(v, BF16, v16, n);
    free(k);
    free(v);
}

/* Key RMS head norm of tl_gen_kv's normal flavour: channel offsets 0.5 N(0,1)
 * plus N(0,1): E|k|^2 = 1.25 d. */
static double key_norm_of(int d) { return sqrt(1.25 * d); }

static void gen_q16(tl_rng *r, int64_t n, int hq, int d, uint16_t *q16) {
    const int64_t cnt = n * hq * d;
    float *q = xmalloc(sizeof(float) * (size_t)cnt);
    tl_gen_q(r, q, n, hq, d, key_norm_of(d), 2.0, BF16);
    tl_encode(q, BF16, q16, cnt);
    free(q);
}

/* The Qwen3-8B attention shape: oscar, 2 bits, d=128, Hkv=8, Hq=32, R=128,
 * G=32, bf16 window. */
static oscar_config qwen_cfg(int layers, int bits) {
    oscar_config c = oscar_config_default();
    c.method = OSCAR_METHOD_OSCAR;
    c.bits = bits;
    c.head_dim = 128;
    c.num_kv_heads = 8;
    c.num_q_heads = 32;
    c.num_layers = layers;
    c.k_group = 32;
    c.v_group = 32;
    c.residual = 128;
    c.window_dtype = BF16;
    c.rotate_values = 1;
    c.block_count = 64;
    c.max_seqs = 8;
    c.backend = OSCAR_BACKEND_CUDA;
    c.num_threads = 0;
    c.check_finite = 1;
    c.caller_metadata = 0;
    return c;
}

/* The CPU reference of a configuration: same numerics, sequence API. */
static oscar_cache *cpu_twin(oscar_config cfg) {
    cfg.backend = OSCAR_BACKEND_CPU;
    cfg.caller_metadata = 0;
    cfg.num_threads = 0;
    return tl_create(&cfg);
}

/* CPU attention over bf16 host queries; the bf16 output (poisoned first) is
 * decoded into out. */
static oscar_status cpu_attention16(oscar_cache *c, int layer, int n, const int32_t *ids, int q_len,
                                    const uint16_t *q16, float *out, int hq, int d) {
    const int64_t cnt = (int64_t)n * q_len * hq * d;
    uint16_t *o16 = xmalloc(sizeof(uint16_t) * (size_t)cnt);
    memset(o16, 0xff, sizeof(uint16_t) * (size_t)cnt);
    oscar_status st = oscar_attention(c, layer, n, ids, q_len, q16, BF16, o16, BF16, 0.0f, NULL);
    tl_decode(o16, BF16, out, cnt);
    free(o16);
    return st;
}

/* ---- device batch metadata ------------------------------------------------------ */

/* seq_lens, window_slots and block_tables of one batch in device memory,
 * with pinned host mirrors the test edits and uploads. Unused table
 * entries are -1 (the library must not read them). */
typedef struct meta {
    int n, stride;
    int32_t *d_lens, *d_slots, *d_tables;
    int32_t *h_lens, *h_slots, *h_tables;
} meta;

static void meta_init(meta *m, int n, int stride) {
    m->n = n;
    m->stride = stride;
    m->d_lens = dmalloc(sizeof(int32_t) * (size_t)n);
    m->d_slots = dmalloc(sizeof(int32_t) * (size_t)n);
    m->d_tables = dmalloc(sizeof(int32_t) * (size_t)n * (size_t)stride);
    m->h_lens = pinned(sizeof(int32_t) * (size_t)n);
    m->h_slots = pinned(sizeof(int32_t) * (size_t)n);
    m->h_tables = pinned(sizeof(int32_t) * (size_t)n * (size_t)stride);
    for (int i = 0; i < n; i++) m->h_lens[i] = m->h_slots[i] = 0;
    for (int i = 0; i < n * stride; i++) m->h_tables[i] = -1;
}

static void meta_free(meta *m) {
    CU(cudaFree(m->d_lens));
    CU(cudaFree(m->d_slots));
    CU(cudaFree(m->d_tables));
    CU(cudaFreeHost(m->h_lens));
    CU(cudaFreeHost(m->h_slots));
    CU(cudaFreeHost(m->h_tables));
    memset(m, 0, sizeof *m);
}

/* Enqueues the upload of all three arrays. The pinned mirrors must not be
 * edited again before the stream has passed this point. */
static void meta_upload(const meta *m, cudaStream_t s) {
    CU(cudaMemcpyAsync(m->d_lens, m->h_lens, sizeof(int32_t) * (size_t)m->n, cudaMemcpyHostToDevice, s));
    CU(cudaMemcpyAsync(m->d_slots, m->h_slots, sizeof(int32_t) * (size_t)m->n, cudaMemcpyHostToDevice, s));
    CU(cudaMemcpyAsync(m->d_tables, m->h_tables, sizeof(int32_t) * (size_t)m->n * (size_t)m->stride,
                       cudaMemcpyHostToDevice, s));
}

static void meta_upload_sync(const meta *m, cudaStream_t s) {
    meta_upload(m, s);
    CU(cudaStreamSynchronize(s));
}

/* The batch of all m->n sequences. */
static oscar_batch meta_batch(const meta *m, int tps, int max_len) {
    oscar_batch b;
    memset(&b, 0, sizeof b); /* fields this test does not set (tensor parallelism) stay NULL / 0 */
    b.num_seqs = m->n;
    b.tokens_per_seq = tps;
    b.max_seq_len = max_len;
    b.block_table_stride = m->stride;
    b.seq_lens = m->d_lens;
    b.window_slots = m->d_slots;
    b.block_tables = m->d_tables;
    return b;
}

/* The batch of sequence i alone (pointers into the same arrays). */
static oscar_batch meta_batch1(const meta *m, int i, int tps, int max_len) {
    oscar_batch b = meta_batch(m, tps, max_len);
    b.num_seqs = 1;
    b.seq_lens = m->d_lens + i;
    b.window_slots = m->d_slots + i;
    b.block_tables = m->d_tables + (size_t)i * (size_t)m->stride;
    return b;
}

/* Synchronous upload/download through the stream (test set-up only). */
static void h2d(void *dst, const void *src, size_t bytes, cudaStream_t s) {
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
    CU(cudaStreamSynchronize(s));
}

static void d2h(void *dst, const void *src, size_t bytes, cudaStream_t s) {
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    CU(cudaStreamSynchronize(s));
}

/* Fisher-Yates permutation of 0..n-1. */
static int32_t *permutation(tl_rng *r, int n) {
    int32_t *p = xmalloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) p[i] = i;
    for (int i = n - 1; i > 0; i--) {
        const int j = tl_randint(r, 0, i);
        const int32_t t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
    return p;
}

/* ---- a stream held by the host --------------------------------------------------- */

static atomic_int g_hold_release, g_hold_timed_out;
static double g_hold_limit_s = 5.0;

/* Host function that blocks its stream until the test releases it (or a
 * safety limit passes, so a library call that waits for the device cannot
 * hang the test: it shows up as a slow call and a timed-out hold). */
static void CUDART_CB hold_stream_fn(void *arg) {
    (void)arg;
    const double t0 = now_s();
    while (!atomic_load(&g_hold_release)) {
        if (now_s() - t0 > g_hold_limit_s) {
            atomic_store(&g_hold_timed_out, 1);
            return;
        }
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
}

static void hold_begin(cudaStream_t s) {
    atomic_store(&g_hold_release, 0);
    atomic_store(&g_hold_timed_out, 0);
    CU(cudaLaunchHostFunc(s, hold_stream_fn, NULL));
}

/* Releases the stream and waits for it; returns 1 if the hold timed out. */
static int hold_end(cudaStream_t s) {
    atomic_store(&g_hold_release, 1);
    CU(cudaStreamSynchronize(s));
    return atomic_load(&g_hold_timed_out);
}

/* =================================================================================
 * 1. CUDA graph capture of a decode step, replayed, against eager calls and
 *    the CPU backend.
 * ================================================================================= */

static void test_graph(void) {
    enum { L = 4, NS = 3 };
    const int hkv = 8, hq = 32, d = 128, R = 128;
    const int steps = g_small ? 40 : 320;
    const int chunk_max = 200; /* prefill chunks (<= OSCAR_MAX_Q_LEN), not block-aligned */
    const int start[NS] = {100, 300, 517};
    const int slots[NS] = {5, 0, 2};
    int final_len[NS], nblk[NS], max_len = 0, stride = 0, total_blocks = 0;
    for (int i = 0; i < NS; i++) {
        final_len[i] = start[i] + steps;
        nblk[i] = (final_len[i] + R - 1) / R;
        max_len = imax(max_len, final_len[i]);
        stride = imax(stride, nblk[i]);
        total_blocks += nblk[i];
    }
    stride += 2; /* fixed for the graph; the spare entries stay -1 */
    oscar_config cfg = qwen_cfg(L, 2);
    cfg.caller_metadata = 1;
    cfg.block_count = total_blocks + 5;
    cfg.max_seqs = 8;
    oscar_cache *ce = tl_create(&cfg), *cg = tl_create(&cfg), *cpu = cpu_twin(cfg);
    if (!ce || !cg || !cpu) {
        oscar_cache_destroy(ce), oscar_cache_destroy(cg), oscar_cache_destroy(cpu);
        return;
    }
    tl_rng r = tl_rng_for("engine graph");
    cudaStream_t s; /* non-blocking, as engines capture on a side stream */
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    /* identical device block tables in both caches (shuffled block ids) */
    meta me, mg;
    meta_init(&me, NS, stride);
    meta_init(&mg, NS, stride);
    int32_t *perm = permutation(&r, cfg.block_count);
    for (int i = 0, p = 0; i < NS; i++) {
        me.h_slots[i] = mg.h_slots[i] = slots[i];
        for (int j = 0; j < nblk[i]; j++) me.h_tables[i * stride + j] = mg.h_tables[i * stride + j] = perm[p++];
    }
    free(perm);
    meta_upload_sync(&me, s);
    meta_upload_sync(&mg, s);
    int32_t ids[NS];
    for (int i = 0; i < NS; i++) ST_OK(cpu, oscar_seq_add(cpu, &ids[i]));

    const int64_t row = (int64_t)hkv * d, qrow = (int64_t)hq * d;

    /* ---- prefill through the batch API, one sequence per call, in chunks;
     *      chunked attention on the eager cache against the CPU ---- */
    {
        uint16_t *hk = pinned(sizeof(uint16_t) * (size_t)(chunk_max * row));
        uint16_t *hv = pinned(sizeof(uint16_t) * (size_t)(chunk_max * row));
        uint16_t *hqb = pinned(sizeof(uint16_t) * (size_t)(chunk_max * qrow));
        uint16_t *ho = pinned(sizeof(uint16_t) * (size_t)(chunk_max * qrow));
        float *og = xmalloc(sizeof(float) * (size_t)(chunk_max * qrow));
        float *oc = xmalloc(sizeof(float) * (size_t)(chunk_max * qrow));
        void *dk = dmalloc(sizeof(uint16_t) * (size_t)(chunk_max * row));
        void *dv = dmalloc(sizeof(uint16_t) * (size_t)(chunk_max * row));
        void *dq = dmalloc(sizeof(uint16_t) * (size_t)(chunk_max * qrow));
        void *dout = dmalloc(sizeof(uint16_t) * (size_t)(chunk_max * qrow));
        double worst = 0.0;
        int chunks = 0;
        for (int i = 0; i < NS; i++) {
            for (int pos = 0; pos < start[i];) {
                const int n = imin(chunk_max, start[i] - pos);
                me.h_lens[i] = mg.h_lens[i] = pos + n;
                CU(cudaMemcpyAsync(me.d_lens + i, me.h_lens + i, sizeof(int32_t), cudaMemcpyHostToDevice, s));
                CU(cudaMemcpyAsync(mg.d_lens + i, mg.h_lens + i, sizeof(int32_t), cudaMemcpyHostToDevice, s));
                const oscar_batch be1 = meta_batch1(&me, i, n, max_len), bg1 = meta_batch1(&mg, i, n, max_len);
                for (int l = 0; l < L; l++) {
                    gen_kv16(&r, n, hkv, d, hk, hv);
                    gen_q16(&r, n, hq, d, hqb);
                    const size_t kvb = sizeof(uint16_t) * (size_t)(n * row), qb = sizeof(uint16_t) * (size_t)(n * qrow);
                    CU(cudaMemcpyAsync(dk, hk, kvb, cudaMemcpyHostToDevice, s));
                    CU(cudaMemcpyAsync(dv, hv, kvb, cudaMemcpyHostToDevice, s));
                    CU(cudaMemcpyAsync(dq, hqb, qb, cudaMemcpyHostToDevice, s));
                    CU(cudaMemsetAsync(dout, 0xff, qb, s));
                    ST_OK(ce, oscar_batch_append(ce, l, &be1, dk, dv, BF16, s));
                    ST_OK(cg, oscar_batch_append(cg, l, &bg1, dk, dv, BF16, s));
                    ST_OK(ce, oscar_batch_attention(ce, l, &be1, dq, BF16, dout, BF16, 0.0f, s));
                    CU(cudaMemcpyAsync(ho, dout, qb, cudaMemcpyDeviceToHost, s));
                    ST_OK(ce, oscar_synchronize(ce, s));
                    ST_OK(cg, oscar_synchronize(cg, s));
                    int32_t nt = n;
                    ST_OK(cpu, oscar_append(cpu, l, 1, &ids[i], &nt, hk, hv, BF16, NULL));
                    ST_OK(cpu, cpu_attention16(cpu, l, 1, &ids[i], n, hqb, oc, hq, d));
                    tl_decode(ho, BF16, og, n * qrow);
                    const double e = rel_l2(og, oc, n * qrow);
                    if (e > worst) worst = e;
                    CHECKF(e <= 2e-3, "prefill seq %d tokens %d..%d layer %d: chunked batch attention vs CPU rel L2 %.3g "
                           "(%lld non-finite)", i, pos, pos + n, l, e, (long long)tl_count_nonfinite(og, n * qrow));
                    chunks++;
                }
                pos += n;
            }
        }
        printf("   prefill: %d chunk x layer calls, worst chunked-attention rel L2 vs CPU %.3g\n", chunks, worst);
        CU(cudaFreeHost(hk)); CU(cudaFreeHost(hv)); CU(cudaFreeHost(hqb)); CU(cudaFreeHost(ho));
        free(og), free(oc);
        CU(cudaFree(dk)); CU(cudaFree(dv)); CU(cudaFree(dq)); CU(cudaFree(dout));
    }

    /* ---- decode: fixed device buffers per cache, refilled between steps ---- */
    const size_t kvL = (size_t)NS * (size_t)row, qL = (size_t)NS * (size_t)qrow; /* elements per layer */
    uint16_t *sk = pinned(2 * L * kvL), *sv = pinned(2 * L * kvL), *sq = pinned(2 * L * qL);
    uint16_t *soe = pinned(2 * L * qL), *sog = pinned(2 * L * qL);
    uint16_t *dke = dmalloc(2 * L * kvL), *dve = dmalloc(2 * L * kvL), *dqe = dmalloc(2 * L * qL), *doe = dmalloc(2 * L * qL);
    uint16_t *dkg = dmalloc(2 * L * kvL), *dvg = dmalloc(2 * L * kvL), *dqg = dmalloc(2 * L * qL), *dog = dmalloc(2 * L * qL);
    float *fe = xmalloc(sizeof(float) * qL), *fc = xmalloc(sizeof(float) * qL);
    const oscar_batch be = meta_batch(&me, 1, max_len), bg = meta_batch(&mg, 1, max_len);

    /* capture one step, all layers, once */
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int graph_ok = 0;
    {
        CU(cudaStreamSynchronize(s));
        cudaError_t e = cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        CHECKF(e == cudaSuccess, "cudaStreamBeginCapture: %s", cudaGetErrorString(e));
        if (e == cudaSuccess) {
            int calls_ok = 1;
            for (int l = 0; l < L; l++) {
                oscar_status a = oscar_batch_append(cg, l, &bg, dkg + l * kvL, dvg + l * kvL, BF16, s);
                calls_ok &= CHECKF(a == OSCAR_OK, "during capture: oscar_batch_append layer %d: %s (%s)", l,
                                   oscar_status_name(a), oscar_last_error(cg));
                oscar_status t = oscar_batch_attention(cg, l, &bg, dqg + l * qL, BF16, dog + l * qL, BF16, 0.0f, s);
                calls_ok &= CHECKF(t == OSCAR_OK, "during capture: oscar_batch_attention layer %d: %s (%s)", l,
                                   oscar_status_name(t), oscar_last_error(cg));
            }
            enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
            cudaError_t eq = cudaStreamIsCapturing(s, &cs);
            CHECKF(eq == cudaSuccess && cs == cudaStreamCaptureStatusActive,
                   "capture is no longer active after the library calls (cudaStreamIsCapturing: %s, status %d): "
                   "a call did something not allowed during capture", cudaGetErrorString(eq), (int)cs);
            cudaError_t e2 = cudaStreamEndCapture(s, &graph);
            CHECKF(e2 == cudaSuccess, "cudaStreamEndCapture: %s (%s)", cudaGetErrorName(e2), cudaGetErrorString(e2));
            if (e2 == cudaSuccess && calls_ok && graph) {
                size_t nodes = 0;
                CU(cudaGraphGetNodes(graph, NULL, &nodes));
                CHECKF(nodes > 0, "the captured graph is empty");
                cudaError_t e3 = cudaGraphInstantiate(&exec, graph, 0);
                CHECKF(e3 == cudaSuccess, "cudaGraphInstantiate: %s", cudaGetErrorString(e3));
                graph_ok = e3 == cudaSuccess && nodes > 0;
                printf("   captured %d layers (append + attention) into a graph of %zu nodes\n", L, nodes);
            }
        }
        cudaError_t le = cudaGetLastError();
        CHECKF(le == cudaSuccess, "CUDA error left after capture: %s", cudaGetErrorString(le));
        if (!graph_ok) printf("   graph capture FAILED: only the eager cache and the CPU are compared\n");
    }

    int64_t diff_elems = 0, nonfinite = 0;
    int diff_steps = 0, cpu_checks = 0;
    double worst_call = 0.0, worst_seq = 0.0;
    for (int step = 0; step < steps; step++) {
        for (int l = 0; l < L; l++) {
            gen_kv16(&r, NS, hkv, d, sk + l * kvL, sv + l * kvL);
            gen_q16(&r, NS, hq, d, sq + l * qL);
        }
        int cross = 0;
        for (int i = 0; i < NS; i++) {
            me.h_lens[i] = mg.h_lens[i] = start[i] + step + 1;
            cross |= me.h_lens[i] % R == 0 || me.h_lens[i] % R == 1;
        }
        CU(cudaMemcpyAsync(me.d_lens, me.h_lens, sizeof(int32_t) * NS, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(mg.d_lens, mg.h_lens, sizeof(int32_t) * NS, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dke, sk, 2 * L * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dve, sv, 2 * L * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dqe, sq, 2 * L * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dkg, sk, 2 * L * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dvg, sv, 2 * L * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dqg, sq, 2 * L * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemsetAsync(doe, 0xff, 2 * L * qL, s));
        CU(cudaMemsetAsync(dog, 0xff, 2 * L * qL, s));
        for (int l = 0; l < L; l++) {
            ST_OK(ce, oscar_batch_append(ce, l, &be, dke + l * kvL, dve + l * kvL, BF16, s));
            ST_OK(ce, oscar_batch_attention(ce, l, &be, dqe + l * qL, BF16, doe + l * qL, BF16, 0.0f, s));
        }
        if (graph_ok) CU(cudaGraphLaunch(exec, s));
        CU(cudaMemcpyAsync(soe, doe, 2 * L * qL, cudaMemcpyDeviceToHost, s));
        if (graph_ok) CU(cudaMemcpyAsync(sog, dog, 2 * L * qL, cudaMemcpyDeviceToHost, s));
        ST_OK(ce, oscar_synchronize(ce, s));
        ST_OK(cg, oscar_synchronize(cg, s));
        for (int l = 0; l < L; l++) {
            tl_decode(soe + l * qL, BF16, fe, (int64_t)qL);
            const int64_t bad = tl_count_nonfinite(fe, (int64_t)qL);
            nonfinite += bad;
            CHECKF(bad == 0, "step %d layer %d: %lld non-finite eager outputs", step, l, (long long)bad);
        }
        if (graph_ok) {
            const int64_t dd = count_diff16(soe, sog, (int64_t)(L * qL));
            diff_elems += dd;
            diff_steps += dd != 0;
            CHECKF(dd == 0, "step %d: %lld of %lld output elements differ between the graph replay and eager calls",
                   step, (long long)dd, (long long)(L * qL));
        }
        /* the CPU gets the same tokens; attention compared at some steps */
        const int compare = step < 2 || step == steps - 1 || step % 25 == 0 || cross;
        for (int l = 0; l < L; l++) {
            const int32_t nt[NS] = {1, 1, 1};
            ST_OK(cpu, oscar_append(cpu, l, NS, ids, nt, sk + l * kvL, sv + l * kvL, BF16, NULL));
            if (!compare) continue;
            ST_OK(cpu, cpu_attention16(cpu, l, NS, ids, 1, sq + l * qL, fc, hq, d));
            tl_decode(soe + l * qL, BF16, fe, (int64_t)qL);
            const double e = rel_l2(fe, fc, (int64_t)qL);
            if (e > worst_call) worst_call = e;
            for (int i = 0; i < NS; i++) {
                const double es = rel_l2(fe + i * qrow, fc + i * qrow, qrow);
                if (es > worst_seq) worst_seq = es;
            }
            CHECKF(e <= 2e-3, "step %d layer %d (lengths %d %d %d): GPU vs CPU rel L2 %.3g", step, l, me.h_lens[0],
                   me.h_lens[1], me.h_lens[2], e);
            cpu_checks++;
        }
    }

    /* a fresh query on both caches, eager calls on the graph's cache too */
    {
        for (int l = 0; l < L; l++) gen_q16(&r, NS, hq, d, sq + l * qL);
        CU(cudaMemcpyAsync(dqe, sq, 2 * L * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dqg, sq, 2 * L * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemsetAsync(doe, 0xff, 2 * L * qL, s));
        CU(cudaMemsetAsync(dog, 0xff, 2 * L * qL, s));
        for (int l = 0; l < L; l++) {
            ST_OK(ce, oscar_batch_attention(ce, l, &be, dqe + l * qL, BF16, doe + l * qL, BF16, 0.0f, s));
            ST_OK(cg, oscar_batch_attention(cg, l, &bg, dqg + l * qL, BF16, dog + l * qL, BF16, 0.0f, s));
        }
        CU(cudaMemcpyAsync(soe, doe, 2 * L * qL, cudaMemcpyDeviceToHost, s));
        CU(cudaMemcpyAsync(sog, dog, 2 * L * qL, cudaMemcpyDeviceToHost, s));
        ST_OK(ce, oscar_synchronize(ce, s));
        ST_OK(cg, oscar_synchronize(cg, s));
        const int64_t dd = count_diff16(soe, sog, (int64_t)(L * qL));
        CHECKF(dd == 0, "final fresh query: %lld output elements differ between the eager and the graph cache",
               (long long)dd);
        for (int l = 0; l < L; l++) {
            ST_OK(cpu, cpu_attention16(cpu, l, NS, ids, 1, sq + l * qL, fc, hq, d));
            tl_decode(soe + l * qL, BF16, fe, (int64_t)qL);
            const double e = rel_l2(fe, fc, (int64_t)qL);
            if (e > worst_call) worst_call = e;
            CHECKF(e <= 2e-3, "final fresh query layer %d: GPU vs CPU rel L2 %.3g", l, e);
            cpu_checks++;
        }
    }
    printf("   graph vs eager: %d steps x %d layers, %lld of %lld output elements differ (%d steps with differences)%s\n",
           steps, L, (long long)diff_elems, (long long)steps * L * (long long)qL, diff_steps,
           graph_ok ? "" : " [graph not run]");
    printf("   eager vs CPU: %d comparisons, worst rel L2 per call %.3g, per sequence %.3g; %lld non-finite outputs\n",
           cpu_checks, worst_call, worst_seq, (long long)nonfinite);

    if (exec) CU(cudaGraphExecDestroy(exec));
    if (graph) CU(cudaGraphDestroy(graph));
    CU(cudaFreeHost(sk)); CU(cudaFreeHost(sv)); CU(cudaFreeHost(sq)); CU(cudaFreeHost(soe)); CU(cudaFreeHost(sog));
    CU(cudaFree(dke)); CU(cudaFree(dve)); CU(cudaFree(dqe)); CU(cudaFree(doe));
    CU(cudaFree(dkg)); CU(cudaFree(dvg)); CU(cudaFree(dqg)); CU(cudaFree(dog));
    free(fe), free(fc);
    meta_free(&me);
    meta_free(&mg);
    CU(cudaStreamDestroy(s));
    oscar_cache_destroy(ce);
    oscar_cache_destroy(cg);
    oscar_cache_destroy(cpu);
}

/* =================================================================================
 * 2. No host synchronisation: every hot-path call returns while the stream is
 *    held by a blocking host function.
 * ================================================================================= */

typedef struct timing {
    double limit_ms, worst_ms;
    const char *worst_name;
    int enforce, want_device;
} timing;

static void timed_call(timing *T, oscar_cache *c, const char *name, oscar_status st, double t0) {
    const double ms = (now_s() - t0) * 1e3;
    int dev = -1;
    CU(cudaGetDevice(&dev));
    if (ms > T->worst_ms) T->worst_ms = ms, T->worst_name = name;
    CHECKF(st == OSCAR_OK, "%s with the stream held: %s (%s)", name, oscar_status_name(st), oscar_last_error(c));
    CHECKF(dev == T->want_device, "%s changed the current device from %d to %d", name, T->want_device, dev);
    if (T->enforce)
        CHECKF(ms < T->limit_ms, "%s took %.1f ms while the stream was held (limit %.0f ms): it waited for the device",
               name, ms, T->limit_ms);
}

#define TIMED(T, cache, name, expr)                                                                    \
    do {                                                                                               \
        const double t0_ = now_s();                                                                    \
        const oscar_status st_ = (expr);                                                               \
        timed_call((T), (cache), (name), st_, t0_);                                                    \
    } while (0)

static void test_nosync(void) {
    enum { NS = 2, REPS = 3 };
    const int hkv = 8, hq = 32, d = 128, R = 128;
    const int start[NS] = {200, 300}, slots[NS] = {1, 4}, spare_slot = 6;
    const int max_len = 1024, stride = max_len / R + 1;
    oscar_config cfg = qwen_cfg(1, 2);
    cfg.block_count = 32;
    oscar_config cfgb = cfg;
    cfgb.caller_metadata = 1;
    oscar_cache *cb = tl_create(&cfgb), *cs = tl_create(&cfg);
    if (!cb || !cs) {
        oscar_cache_destroy(cb), oscar_cache_destroy(cs);
        return;
    }
    tl_rng r = tl_rng_for("engine nosync");
    cudaStream_t s;
    CU(cudaStreamCreate(&s)); /* a blocking stream: legacy-stream work would wait for it */
    const int64_t row = (int64_t)hkv * d, qrow = (int64_t)hq * d;
    const int maxrows = imax(start[0], start[1]);
    meta m;
    meta_init(&m, NS, stride);
    for (int i = 0, p = 0; i < NS; i++) {
        m.h_slots[i] = slots[i];
        for (int j = 0; j < stride; j++) m.h_tables[i * stride + j] = p++;
    }
    int32_t ids[NS];
    for (int i = 0; i < NS; i++) ST_OK(cs, oscar_seq_add(cs, &ids[i]));
    uint16_t *hk = xmalloc(2 * (size_t)(maxrows * row)), *hv = xmalloc(2 * (size_t)(maxrows * row));
    uint16_t *hqb = xmalloc(2 * (size_t)(NS * 4 * qrow));
    void *dk = dmalloc(2 * (size_t)(maxrows * row)), *dv = dmalloc(2 * (size_t)(maxrows * row));
    void *dq = dmalloc(2 * (size_t)(NS * 4 * qrow)), *dout = dmalloc(2 * (size_t)(NS * 4 * qrow));
    /* prefill both caches with the same tokens */
    for (int i = 0; i < NS; i++) {
        gen_kv16(&r, start[i], hkv, d, hk, hv);
        h2d(dk, hk, 2 * (size_t)(start[i] * row), s);
        h2d(dv, hv, 2 * (size_t)(start[i] * row), s);
        m.h_lens[i] = start[i];
        meta_upload_sync(&m, s);
        const oscar_batch b1 = meta_batch1(&m, i, start[i], max_len);
        ST_OK(cb, oscar_batch_append(cb, 0, &b1, dk, dv, BF16, s));
        int32_t nt = start[i];
        ST_OK(cs, oscar_append(cs, 0, 1, &ids[i], &nt, dk, dv, BF16, s));
        ST_OK(cb, oscar_synchronize(cb, s));
        ST_OK(cs, oscar_synchronize(cs, s));
    }
    gen_kv16(&r, NS, hkv, d, hk, hv);
    gen_q16(&r, NS * 4, hq, d, hqb);
    h2d(dk, hk, 2 * (size_t)(NS * row), s);
    h2d(dv, hv, 2 * (size_t)(NS * row), s);
    h2d(dq, hqb, 2 * (size_t)(NS * 4 * qrow), s);
    /* seq_lens of every step, pinned: step 0 is the warm-up, steps
     * 1..REPS the held round, step REPS+1 the round with device 1 current */
    const int n_lens_steps = REPS + 2;
    int32_t *lens_pinned = pinned(sizeof(int32_t) * NS * (size_t)n_lens_steps);
    for (int k = 0; k < n_lens_steps; k++)
        for (int i = 0; i < NS; i++) lens_pinned[k * NS + i] = start[i] + k + 1;
    const int32_t ones[NS] = {1, 1};

    int ndev = 0;
    CU(cudaGetDeviceCount(&ndev));
    const int rounds = ndev >= 2 ? 2 : 1;
    int step = 0;
    for (int round = -1; round < rounds; round++) {
        /* round -1: warm-up (kernels loaded, nothing held); round 0: REPS
         * steps with the stream held; round 1 (two or more devices): one
         * step held, with device 1 current while the cache is on device 0 */
        const int nrep = round == 0 ? REPS : 1;
        const int other = round == 1;
        timing T = {50.0, 0.0, "-", !g_small && round >= 0, other ? 1 : 0};
        if (round >= 0) hold_begin(s);
        for (int k = 0; k < nrep; k++, step++) {
            /* the lens upload is not a library call: enqueued behind the hold */
            CU(cudaMemcpyAsync(m.d_lens, lens_pinned + (size_t)step * NS, sizeof(int32_t) * NS,
                               cudaMemcpyHostToDevice, s));
            const int len0 = lens_pinned[step * NS];
            const oscar_batch b = meta_batch(&m, 1, max_len), b4 = meta_batch(&m, 4, max_len);
            if (other) CU(cudaSetDevice(1));
            TIMED(&T, cb, "oscar_batch_append", oscar_batch_append(cb, 0, &b, dk, dv, BF16, s));
            TIMED(&T, cb, "oscar_batch_attention", oscar_batch_attention(cb, 0, &b, dq, BF16, dout, BF16, 0.0f, s));
            TIMED(&T, cb, "oscar_batch_attention (q_len 4)",
                  oscar_batch_attention(cb, 0, &b4, dq, BF16, dout, BF16, 0.0f, s));
            TIMED(&T, cb, "oscar_slot_copy", oscar_slot_copy(cb, slots[0], spare_slot, len0, s));
            TIMED(&T, cb, "oscar_poll (batch cache)", oscar_poll(cb));
            TIMED(&T, cs, "oscar_append", oscar_append(cs, 0, NS, ids, ones, dk, dv, BF16, s));
            TIMED(&T, cs, "oscar_attention", oscar_attention(cs, 0, NS, ids, 1, dq, BF16, dout, BF16, 0.0f, s));
            TIMED(&T, cs, "oscar_attention (q_len 4)",
                  oscar_attention(cs, 0, NS, ids, 4, dq, BF16, dout, BF16, 0.0f, s));
            TIMED(&T, cs, "oscar_poll (sequence cache)", oscar_poll(cs));
            if (other) CU(cudaSetDevice(0));
        }
        if (round >= 0) {
            const cudaError_t q = cudaStreamQuery(s);
            (void)cudaGetLastError(); /* cudaErrorNotReady is not sticky; clear it anyway */
            if (!g_small)
                CHECKF(q == cudaErrorNotReady,
                       "cudaStreamQuery right after the calls returned %s, not cudaErrorNotReady: the held stream "
                       "has drained, so something waited for it", cudaGetErrorName(q));
            const int timed_out = hold_end(s);
            if (!g_small)
                CHECKF(!timed_out, "the stream hold timed out after %.0f s: a library call waited for the device",
                       g_hold_limit_s);
            else if (timed_out)
                printf("   (--small: the stream hold timed out after %.0f s; not enforced under --small)\n",
                       g_hold_limit_s);
            printf("   round %d (%d step%s held, device %d current): slowest call %s, %.3f ms; stream query after "
                   "the calls: %s%s\n", round, nrep, nrep > 1 ? "s" : "", other ? 1 : 0, T.worst_name, T.worst_ms,
                   cudaGetErrorName(q), g_small ? " (--small: timings not enforced)" : "");
        } else {
            CU(cudaStreamSynchronize(s));
        }
        ST_OK(cb, oscar_synchronize(cb, s));
        ST_OK(cs, oscar_synchronize(cs, s));
    }
    /* the last outputs were written and are finite */
    {
        uint16_t *ho = xmalloc(2 * (size_t)(NS * 4 * qrow));
        float *fo = xmalloc(sizeof(float) * (size_t)(NS * 4 * qrow));
        d2h(ho, dout, 2 * (size_t)(NS * 4 * qrow), s);
        tl_decode(ho, BF16, fo, NS * 4 * qrow);
        CHECKF(tl_count_nonfinite(fo, NS * 4 * qrow) == 0, "outputs of the held calls are not finite");
        free(ho), free(fo);
    }
    if (ndev < 2) printf("   one device: the current-device check only covers device 0\n");
    CU(cudaFreeHost(lens_pinned));
    free(hk), free(hv), free(hqb);
    CU(cudaFree(dk)); CU(cudaFree(dv)); CU(cudaFree(dq)); CU(cudaFree(dout));
    meta_free(&m);
    CU(cudaStreamDestroy(s));
    oscar_cache_destroy(cb);
    oscar_cache_destroy(cs);
}

/* =================================================================================
 * 3. No allocation on the hot path; caller-provided memory.
 * ================================================================================= */

typedef struct counting {
    int allocs, frees, misaligned, failed;
    size_t bytes_alloc, bytes_freed;
} counting;

static void *cnt_alloc(void *user, size_t bytes, size_t alignment) {
    counting *c = (counting *)user;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        printf("   allocator hook: cudaMalloc(%zu) failed: %s\n", bytes, cudaGetErrorString(e));
        c->failed++;
        return NULL;
    }
    c->allocs++;
    c->bytes_alloc += bytes;
    if (alignment > 1 && (uintptr_t)p % alignment != 0) c->misaligned++;
    return p;
}

static void cnt_free(void *user, void *ptr, size_t bytes) {
    counting *c = (counting *)user;
    c->frees++;
    c->bytes_freed += bytes;
    cudaError_t e = cudaFree(ptr);
    if (e != cudaSuccess) {
        printf("   allocator hook: cudaFree(%p) failed: %s\n", ptr, cudaGetErrorString(e));
        c->failed++;
    }
}

/* A deterministic workload: sequence 1 prefilled alone, then joint steps of
 * both sequences with tokens_per_seq in tps[] (block crossings, q_len up to
 * 64 = R), append + attention for every layer of every step. Inputs,
 * metadata and outputs live in device buffers made before the hot loop. */
enum { WL_NS = 2, WL_MAX_STEPS = 16 };
typedef struct workload {
    oscar_config cfg; /* batch-API configuration; the sequence API uses caller_metadata = 0 */
    int n_steps;
    int tps[WL_MAX_STEPS];     /* step 0: sequence 1 alone */
    int nseq[WL_MAX_STEPS];    /* sequences in the step: 1 or 2 */
    int first[WL_MAX_STEPS];   /* first sequence of the step */
    int64_t kv_off[WL_MAX_STEPS], q_off[WL_MAX_STEPS]; /* element offsets of layer 0 */
    int64_t kv_total, q_total;
    int max_len, stride, spare_slot;
    int final_len[WL_NS];
    uint16_t *dk, *dv, *dq; /* device inputs */
    int32_t *d_lens;        /* [n_steps][WL_NS] */
    int32_t *d_slots, *d_tables;
    uint16_t *dout;         /* device outputs [q_total] */
} workload;

static void wl_make(workload *W, oscar_config cfg, tl_rng *r, cudaStream_t s) {
    memset(W, 0, sizeof *W);
    cfg.caller_metadata = 1;
    W->cfg = cfg;
    const int R = cfg.residual, L = cfg.num_layers;
    const int64_t row = (int64_t)cfg.num_kv_heads * cfg.head_dim, qrow = (int64_t)cfg.num_q_heads * cfg.head_dim;
    static const int joint[] = {50, 64, 1, 1, 13, 64, 1, 3, 64, 1, 2, 37};
    const int nj = g_small ? 8 : (int)(sizeof joint / sizeof joint[0]);
    W->n_steps = 1 + nj;
    W->tps[0] = 37, W->nseq[0] = 1, W->first[0] = 1;
    for (int j = 0; j < nj; j++) W->tps[1 + j] = joint[j], W->nseq[1 + j] = 2, W->first[1 + j] = 0;
    int32_t *lens = xmalloc(sizeof(int32_t) * (size_t)W->n_steps * WL_NS);
    int len[WL_NS] = {0, 0};
    for (int k = 0; k < W->n_steps; k++) {
        for (int i = W->first[k]; i < W->first[k] + W->nseq[k]; i++) len[i] += W->tps[k];
        for (int i = 0; i < WL_NS; i++) lens[k * WL_NS + i] = len[i];
        W->kv_off[k] = W->kv_total;
        W->q_off[k] = W->q_total;
        W->kv_total += (int64_t)L * W->nseq[k] * W->tps[k] * row;
        W->q_total += (int64_t)L * W->nseq[k] * W->tps[k] * qrow;
    }
    W->final_len[0] = len[0], W->final_len[1] = len[1];
    W->max_len = imax(len[0], len[1]);
    W->stride = (W->max_len + R - 1) / R + 1;
    W->spare_slot = 7;
    W->cfg.block_count = 2 * W->stride + 2;
    W->cfg.max_seqs = 8;
    /* tables: sequence i uses blocks i, i+2, i+4, ... (interleaved) */
    int32_t *tables = xmalloc(sizeof(int32_t) * (size_t)WL_NS * W->stride);
    for (int i = 0; i < WL_NS; i++)
        for (int j = 0; j < W->stride; j++) tables[i * W->stride + j] = i + 2 * j;
    const int32_t slots[WL_NS] = {3, 1};
    uint16_t *hk = xmalloc(2 * (size_t)W->kv_total), *hv = xmalloc(2 * (size_t)W->kv_total);
    uint16_t *hq = xmalloc(2 * (size_t)W->q_total);
    gen_kv16(r, W->kv_total / row, cfg.num_kv_heads, cfg.head_dim, hk, hv);
    gen_q16(r, W->q_total / qrow, cfg.num_q_heads, cfg.head_dim, hq);
    W->dk = dmalloc(2 * (size_t)W->kv_total);
    W->dv = dmalloc(2 * (size_t)W->kv_total);
    W->dq = dmalloc(2 * (size_t)W->q_total);
    W->dout = dmalloc(2 * (size_t)W->q_total);
    W->d_lens = dmalloc(sizeof(int32_t) * (size_t)W->n_steps * WL_NS);
    W->d_slots = dmalloc(sizeof(int32_t) * WL_NS);
    W->d_tables = dmalloc(sizeof(int32_t) * (size_t)WL_NS * W->stride);
    h2d(W->dk, hk, 2 * (size_t)W->kv_total, s);
    h2d(W->dv, hv, 2 * (size_t)W->kv_total, s);
    h2d(W->dq, hq, 2 * (size_t)W->q_total, s);
    h2d(W->d_lens, lens, sizeof(int32_t) * (size_t)W->n_steps * WL_NS, s);
    h2d(W->d_slots, slots, sizeof slots, s);
    h2d(W->d_tables, tables, sizeof(int32_t) * (size_t)WL_NS * W->stride, s);
    free(lens), free(tables), free(hk), free(hv), free(hq);
}

static void wl_free(workload *W) {
    CU(cudaFree(W->dk)); CU(cudaFree(W->dv)); CU(cudaFree(W->dq)); CU(cudaFree(W->dout));
    CU(cudaFree(W->d_lens)); CU(cudaFree(W->d_slots)); CU(cudaFree(W->d_tables));
}

static oscar_config wl_cfg(const workload *W, int batch_api) {
    oscar_config c = W->cfg;
    c.caller_metadata = batch_api ? 1 : 0;
    return c;
}

/* Runs the workload on a cache (batch API if the cache has caller_metadata,
 * else the sequence API with seq ids ids[]); outputs land in W->dout
 * (poisoned first). Enqueues only; the caller synchronises. */
static void wl_run(const workload *W, oscar_cache *c, const int32_t *ids, cudaStream_t s) {
    oscar_config cfg;
    ST_OK(c, oscar_cache_config(c, &cfg));
    const int L = cfg.num_layers;
    const int64_t row = (int64_t)cfg.num_kv_heads * cfg.head_dim, qrow = (int64_t)cfg.num_q_heads * cfg.head_dim;
    CU(cudaMemsetAsync(W->dout, 0xff, 2 * (size_t)W->q_total, s));
    for (int k = 0; k < W->n_steps; k++) {
        const int n = W->nseq[k], tps = W->tps[k], f = W->first[k];
        oscar_batch b;
        memset(&b, 0, sizeof b);
        b.num_seqs = n;
        b.tokens_per_seq = tps;
        b.max_seq_len = W->max_len;
        b.block_table_stride = W->stride;
        b.seq_lens = W->d_lens + (size_t)k * WL_NS + f;
        b.window_slots = W->d_slots + f;
        b.block_tables = W->d_tables + (size_t)f * W->stride;
        int32_t nt[WL_NS] = {tps, tps};
        for (int l = 0; l < L; l++) {
            const uint16_t *kk = W->dk + W->kv_off[k] + (int64_t)l * n * tps * row;
            const uint16_t *vv = W->dv + W->kv_off[k] + (int64_t)l * n * tps * row;
            const uint16_t *qq = W->dq + W->q_off[k] + (int64_t)l * n * tps * qrow;
            uint16_t *oo = W->dout + W->q_off[k] + (int64_t)l * n * tps * qrow;
            if (cfg.caller_metadata) {
                ST_OK(c, oscar_batch_append(c, l, &b, kk, vv, BF16, s));
                ST_OK(c, oscar_batch_attention(c, l, &b, qq, BF16, oo, BF16, 0.0f, s));
            } else {
                ST_OK(c, oscar_append(c, l, n, ids + f, nt, kk, vv, BF16, s));
                ST_OK(c, oscar_attention(c, l, n, ids + f, tps, qq, BF16, oo, BF16, 0.0f, s));
            }
        }
        ST_OK(c, oscar_poll(c));
    }
    if (cfg.caller_metadata) ST_OK(c, oscar_slot_copy(c, 3, W->spare_slot, W->final_len[0], s));
}

/* Creates a cache (with mem, or plainly), runs the workload, returns the
 * outputs (host copy, caller frees) or NULL. */
static uint16_t *wl_outputs(const workload *W, oscar_cache *c, cudaStream_t s) {
    oscar_config cfg;
    ST_OK(c, oscar_cache_config(c, &cfg));
    int32_t ids[WL_NS] = {-1, -1};
    if (!cfg.caller_metadata)
        for (int i = 0; i < WL_NS; i++) ST_OK(c, oscar_seq_add(c, &ids[i]));
    wl_run(W, c, ids, s);
    ST_OK(c, oscar_synchronize(c, s));
    uint16_t *h = xmalloc(2 * (size_t)W->q_total);
    d2h(h, W->dout, 2 * (size_t)W->q_total, s);
    float *f = xmalloc(sizeof(float) * (size_t)W->q_total);
    tl_decode(h, BF16, f, W->q_total);
    CHECKF(tl_count_nonfinite(f, W->q_total) == 0, "workload (%s API): %lld non-finite outputs",
           cfg.caller_metadata ? "batch" : "sequence", (long long)tl_count_nonfinite(f, W->q_total));
    free(f);
    return h;
}

static void test_noalloc(void) {
    cudaStream_t s;
    CU(cudaStreamCreate(&s));
    tl_rng r = tl_rng_for("engine noalloc");
    oscar_config base = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 2, 8); /* R = 64 */
    base.backend = OSCAR_BACKEND_CUDA;
    base.num_layers = 2;
    base.window_dtype = BF16;
    workload W;
    wl_make(&W, base, &r, s);
    const oscar_config cfg_b = wl_cfg(&W, 1), cfg_s = wl_cfg(&W, 0);
    char err[256];

    /* reference outputs from plainly created caches (this also loads every
     * kernel, so lazy module loading cannot allocate during the hot loop) */
    uint16_t *ref_b = NULL, *ref_s = NULL;
    {
        oscar_cache *c = tl_create(&cfg_b);
        if (c) ref_b = wl_outputs(&W, c, s);
        oscar_cache_destroy(c);
        c = tl_create(&cfg_s);
        if (c) ref_s = wl_outputs(&W, c, s);
        oscar_cache_destroy(c);
    }
    const size_t out_bytes = 2 * (size_t)W.q_total;

    /* caches whose memory comes through the counting hook */
    counting cnt;
    memset(&cnt, 0, sizeof cnt);
    const oscar_allocator hook = {cnt_alloc, cnt_free, &cnt};
    oscar_memory_source msrc;
    memset(&msrc, 0, sizeof msrc);
    msrc.allocator = &hook;
    oscar_cache *ca = NULL, *cs = NULL;
    err[0] = 0;
    oscar_status st = oscar_cache_create_with_memory(&cfg_b, &msrc, &ca, err, sizeof err);
    CHECKF(st == OSCAR_OK && ca, "create_with_memory (allocator hook, batch API): %s (%s)", oscar_status_name(st), err);
    const int allocs_b = cnt.allocs;
    err[0] = 0;
    st = oscar_cache_create_with_memory(&cfg_s, &msrc, &cs, err, sizeof err);
    CHECKF(st == OSCAR_OK && cs, "create_with_memory (allocator hook, sequence API): %s (%s)", oscar_status_name(st),
           err);
    oscar_memory_requirements rq_b, rq_s;
    ST_OK(NULL, oscar_memory_requirements_get(&cfg_b, &rq_b, err, sizeof err));
    ST_OK(NULL, oscar_memory_requirements_get(&cfg_s, &rq_s, err, sizeof err));
    const size_t need = rq_b.pool_bytes + rq_b.window_bytes + rq_b.workspace_bytes + rq_s.pool_bytes +
                        rq_s.window_bytes + rq_s.workspace_bytes;
    printf("   hook after creation: %d allocations (%d for the batch cache), %zu bytes; requirements sum %zu bytes\n",
           cnt.allocs, allocs_b, cnt.bytes_alloc, need);
    CHECKF(allocs_b >= 1 && cnt.allocs > allocs_b, "the allocator hook was not used for the library's regions");
    CHECKF(cnt.bytes_alloc >= need, "the hook allocated %zu bytes, less than the requirements' %zu", cnt.bytes_alloc,
           need);
    CHECKF(cnt.misaligned == 0 && cnt.failed == 0, "hook: %d misaligned, %d failed", cnt.misaligned, cnt.failed);
    if (ca && cs) {
        int32_t ids[WL_NS];
        for (int i = 0; i < WL_NS; i++) ST_OK(cs, oscar_seq_add(cs, &ids[i]));
        CU(cudaDeviceSynchronize());
        size_t free0 = 0, free1 = 0, total = 0;
        CU(cudaMemGetInfo(&free0, &total));
        const counting before = cnt;
        /* the hot loop: both caches, twice */
        uint16_t *out_a = xmalloc(out_bytes), *out_s = xmalloc(out_bytes);
        for (int rep = 0; rep < 2; rep++) {
            wl_run(&W, ca, NULL, s);
            ST_OK(ca, oscar_synchronize(ca, s));
            if (rep == 0) d2h(out_a, W.dout, out_bytes, s);
            if (rep == 0) {
                wl_run(&W, cs, ids, s);
                ST_OK(cs, oscar_synchronize(cs, s));
                d2h(out_s, W.dout, out_bytes, s);
            }
        }
        CU(cudaDeviceSynchronize());
        CU(cudaMemGetInfo(&free1, &total));
        CHECKF(cnt.allocs == before.allocs && cnt.frees == before.frees,
               "the allocator hook was called on the hot path: allocs %d -> %d, frees %d -> %d", before.allocs,
               cnt.allocs, before.frees, cnt.frees);
        /* under compute-sanitizer (--small) the tool allocates device memory of its own */
        if (!g_small)
            CHECKF(free1 == free0, "free device memory changed across the hot loop: %zu -> %zu bytes (%+lld)", free0,
                   free1, (long long)free1 - (long long)free0);
        printf("   hot loop: %d steps x %d layers per API; hook calls unchanged: %s; free device memory %zu -> %zu%s\n",
               W.n_steps, W.cfg.num_layers, cnt.allocs == before.allocs && cnt.frees == before.frees ? "yes" : "NO",
               free0, free1, g_small ? " (not enforced under --small)" : "");
        if (ref_b)
            CHECKF(memcmp(out_a, ref_b, out_bytes) == 0,
                   "batch API: outputs of the hook-allocated cache differ from a plainly created one (%lld elements)",
                   (long long)count_diff16(out_a, ref_b, W.q_total));
        if (ref_s)
            CHECKF(memcmp(out_s, ref_s, out_bytes) == 0,
                   "sequence API: outputs of the hook-allocated cache differ from a plainly created one (%lld elements)",
                   (long long)count_diff16(out_s, ref_s, W.q_total));
        free(out_a), free(out_s);
    }
    oscar_cache_destroy(ca);
    oscar_cache_destroy(cs);
    CHECKF(cnt.frees == cnt.allocs && cnt.bytes_freed == cnt.bytes_alloc,
           "after destroy: %d allocations (%zu bytes) but %d frees (%zu bytes)", cnt.allocs, cnt.bytes_alloc, cnt.frees,
           cnt.bytes_freed);

    /* caller-provided regions of exactly the required sizes */
    for (int api = 0; api < 2; api++) {
        const oscar_config *cfg = api ? &cfg_s : &cfg_b;
        const char *what = api ? "sequence API" : "batch API";
        const uint16_t *ref = api ? ref_s : ref_b;
        oscar_memory_requirements rq;
        err[0] = 0;
        st = oscar_memory_requirements_get(cfg, &rq, err, sizeof err);
        if (!CHECKF(st == OSCAR_OK, "%s: oscar_memory_requirements_get: %s (%s)", what, oscar_status_name(st), err))
            continue;
        CHECKF(rq.alignment >= 1 && (rq.alignment & (rq.alignment - 1)) == 0 && rq.alignment <= 256,
               "%s: alignment %zu is not a power of two <= 256 (cudaMalloc's guarantee)", what, rq.alignment);
        CHECKF(rq.pool_bytes > 0 && rq.window_bytes > 0, "%s: zero-sized pool or window requirement", what);
        printf("   %s requirements: pool %zu, windows %zu, workspace %zu bytes, alignment %zu\n", what, rq.pool_bytes,
               rq.window_bytes, rq.workspace_bytes, rq.alignment);
        void *pool = NULL, *win = NULL, *ws = NULL;
        CU(cudaMalloc(&pool, rq.pool_bytes ? rq.pool_bytes : 1));
        CU(cudaMalloc(&win, rq.window_bytes ? rq.window_bytes : 1));
        CU(cudaMalloc(&ws, rq.workspace_bytes ? rq.workspace_bytes : 1));
        /* garbage: the library must zero what it uses */
        CU(cudaMemset(pool, 0xa5, rq.pool_bytes ? rq.pool_bytes : 1));
        CU(cudaMemset(win, 0x7f, rq.window_bytes ? rq.window_bytes : 1));
        CU(cudaMemset(ws, 0xff, rq.workspace_bytes ? rq.workspace_bytes : 1));
        counting c2;
        memset(&c2, 0, sizeof c2);
        const oscar_allocator hook2 = {cnt_alloc, cnt_free, &c2};
        oscar_memory_source m2 = {pool, win, ws, &hook2};
        oscar_cache *c = NULL;
        err[0] = 0;
        st = oscar_cache_create_with_memory(cfg, &m2, &c, err, sizeof err);
        CHECKF(st == OSCAR_OK && c, "%s: create_with_memory over caller regions: %s (%s)", what, oscar_status_name(st),
               err);
        CHECKF(c2.allocs == 0, "%s: all three regions were given, yet the allocator hook was called %d times (%zu bytes)",
               what, c2.allocs, c2.bytes_alloc);
        if (c) {
            uint16_t *out = wl_outputs(&W, c, s);
            if (ref)
                CHECKF(memcmp(out, ref, out_bytes) == 0,
                       "%s: outputs over caller regions differ from a plainly created cache (%lld elements)", what,
                       (long long)count_diff16(out, ref, W.q_total));
            free(out);
            oscar_cache_destroy(c);
        }
        CHECKF(c2.frees == 0, "%s: the hook freed %d regions it never allocated", what, c2.frees);
        /* a misaligned region is refused */
        if (rq.alignment > 1) {
            oscar_memory_source m3 = {(char *)pool + rq.alignment / 2, win, ws, NULL};
            oscar_cache *bad = NULL;
            err[0] = 0;
            st = oscar_cache_create_with_memory(cfg, &m3, &bad, err, sizeof err);
            CHECKF(st != OSCAR_OK && bad == NULL && err[0] != 0,
                   "%s: a pool misaligned by %zu bytes was accepted (%s, \"%s\")", what, rq.alignment / 2,
                   oscar_status_name(st), err);
            if (st != OSCAR_OK) printf("   %s: misaligned pool refused: %s: %s\n", what, oscar_status_name(st), err);
            oscar_cache_destroy(bad);
        }
        /* the caller's regions are still the caller's */
        CU(cudaFree(pool));
        CU(cudaFree(win));
        CU(cudaFree(ws));
    }
    free(ref_b), free(ref_s);
    wl_free(&W);
    CU(cudaStreamDestroy(s));
}

/* =================================================================================
 * 4. Chunked prefill against the CPU backend.
 * ================================================================================= */

typedef struct pcase {
    const char *name;
    int d, hkv, hq, bits;
    int n_q;
    int q_lens[6];
} pcase;

static void run_prefill_case(const pcase *P, double *worst_all) {
    const int prefix = 300; /* the chunk starts mid-block (300 % 128 = 44) */
    int max_q = 0;
    for (int i = 0; i < P->n_q; i++) max_q = imax(max_q, P->q_lens[i]);
    oscar_config cfg = qwen_cfg(1, P->bits);
    cfg.head_dim = P->d;
    cfg.num_kv_heads = P->hkv;
    cfg.num_q_heads = P->hq;
    const int R = cfg.residual;
    const int max_len = prefix + max_q;
    const int stride = max_len / R + 2;
    cfg.block_count = stride + 2;
    cfg.max_seqs = 4;
    oscar_config cfgb = cfg;
    cfgb.caller_metadata = 1;
    oscar_cache *cpu = cpu_twin(cfg), *gs = tl_create(&cfg), *gb = tl_create(&cfgb);
    if (!cpu || !gs || !gb) {
        oscar_cache_destroy(cpu), oscar_cache_destroy(gs), oscar_cache_destroy(gb);
        return;
    }
    tl_rng r = tl_rng_for(P->name);
    cudaStream_t s;
    CU(cudaStreamCreate(&s));
    const int hkv = P->hkv, hq = P->hq, d = P->d;
    const int64_t row = (int64_t)hkv * d, qrow = (int64_t)hq * d;
    uint16_t *hk = xmalloc(2 * (size_t)(max_len * row)), *hv = xmalloc(2 * (size_t)(max_len * row));
    uint16_t *hqb = xmalloc(2 * (size_t)(max_q * qrow)), *ho = xmalloc(2 * (size_t)(max_q * qrow));
    float *oc = xmalloc(sizeof(float) * (size_t)(max_q * qrow)), *os = xmalloc(sizeof(float) * (size_t)(max_q * qrow));
    float *ob = xmalloc(sizeof(float) * (size_t)(max_q * qrow));
    uint16_t *dk = dmalloc(2 * (size_t)(max_len * row)), *dv = dmalloc(2 * (size_t)(max_len * row));
    uint16_t *dq = dmalloc(2 * (size_t)(max_q * qrow)), *dout = dmalloc(2 * (size_t)(max_q * qrow));
    meta m;
    meta_init(&m, 1, stride);
    m.h_slots[0] = 2;
    for (int j = 0; j < stride; j++) m.h_tables[j] = stride - j; /* reversed block ids */
    for (int qi = 0; qi < P->n_q; qi++) {
        const int q = P->q_lens[qi], T = prefix + q;
        gen_kv16(&r, T, hkv, d, hk, hv);
        gen_q16(&r, q, hq, d, hqb);
        h2d(dk, hk, 2 * (size_t)(T * row), s);
        h2d(dv, hv, 2 * (size_t)(T * row), s);
        h2d(dq, hqb, 2 * (size_t)(q * qrow), s);
        /* CPU and GPU sequence API: prefix, then the chunk, then attention */
        int32_t idc, idg;
        ST_OK(cpu, oscar_seq_add(cpu, &idc));
        ST_OK(gs, oscar_seq_add(gs, &idg));
        int32_t n1 = prefix, n2 = q;
        ST_OK(cpu, oscar_append(cpu, 0, 1, &idc, &n1, hk, hv, BF16, NULL));
        ST_OK(cpu, oscar_append(cpu, 0, 1, &idc, &n2, hk + prefix * row, hv + prefix * row, BF16, NULL));
        ST_OK(cpu, cpu_attention16(cpu, 0, 1, &idc, q, hqb, oc, hq, d));
        ST_OK(gs, oscar_append(gs, 0, 1, &idg, &n1, dk, dv, BF16, s));
        ST_OK(gs, oscar_append(gs, 0, 1, &idg, &n2, dk + prefix * row, dv + prefix * row, BF16, s));
        CU(cudaMemsetAsync(dout, 0xff, 2 * (size_t)(q * qrow), s));
        ST_OK(gs, oscar_attention(gs, 0, 1, &idg, q, dq, BF16, dout, BF16, 0.0f, s));
        ST_OK(gs, oscar_synchronize(gs, s));
        d2h(ho, dout, 2 * (size_t)(q * qrow), s);
        tl_decode(ho, BF16, os, q * qrow);
        /* GPU batch API: the slot restarts with the prefix, then the chunk */
        m.h_lens[0] = prefix;
        meta_upload_sync(&m, s);
        oscar_batch b = meta_batch(&m, prefix, max_len);
        ST_OK(gb, oscar_batch_append(gb, 0, &b, dk, dv, BF16, s));
        ST_OK(gb, oscar_synchronize(gb, s));
        m.h_lens[0] = T;
        meta_upload_sync(&m, s);
        b = meta_batch(&m, q, max_len);
        ST_OK(gb, oscar_batch_append(gb, 0, &b, dk + prefix * row, dv + prefix * row, BF16, s));
        CU(cudaMemsetAsync(dout, 0xff, 2 * (size_t)(q * qrow), s));
        ST_OK(gb, oscar_batch_attention(gb, 0, &b, dq, BF16, dout, BF16, 0.0f, s));
        ST_OK(gb, oscar_synchronize(gb, s));
        d2h(ho, dout, 2 * (size_t)(q * qrow), s);
        tl_decode(ho, BF16, ob, q * qrow);
        /* per query row (all heads of one position) */
        double worst_s = 0.0, worst_b = 0.0;
        int worst_s_row = 0, worst_b_row = 0, bad_s = 0, bad_b = 0;
        for (int i = 0; i < q; i++) {
            const double es = rel_l2(os + i * qrow, oc + i * qrow, qrow);
            const double eb = rel_l2(ob + i * qrow, oc + i * qrow, qrow);
            if (!(es <= worst_s)) worst_s = es, worst_s_row = i;
            if (!(eb <= worst_b)) worst_b = eb, worst_b_row = i;
            bad_s += !(es <= 3e-3);
            bad_b += !(eb <= 3e-3);
        }
        const int64_t nan_s = tl_count_nonfinite(os, q * qrow), nan_b = tl_count_nonfinite(ob, q * qrow);
        CHECKF(nan_s == 0, "%s q_len %d: sequence API left %lld non-finite outputs", P->name, q, (long long)nan_s);
        CHECKF(nan_b == 0, "%s q_len %d: batch API left %lld non-finite outputs", P->name, q, (long long)nan_b);
        CHECKF(bad_s == 0, "%s q_len %d: sequence API: %d of %d rows over 3e-3 rel L2 vs CPU (worst %.3g at row %d)",
               P->name, q, bad_s, q, worst_s, worst_s_row);
        CHECKF(bad_b == 0, "%s q_len %d: batch API: %d of %d rows over 3e-3 rel L2 vs CPU (worst %.3g at row %d)",
               P->name, q, bad_b, q, worst_b, worst_b_row);
        printf("   %-28s q_len %4d: worst row rel L2 vs CPU: sequence API %.3g (row %d), batch API %.3g (row %d)\n",
               P->name, q, worst_s, worst_s_row, worst_b, worst_b_row);
        fflush(stdout);
        if (worst_s > *worst_all) *worst_all = worst_s;
        if (worst_b > *worst_all) *worst_all = worst_b;
        ST_OK(cpu, oscar_seq_free(cpu, idc));
        ST_OK(gs, oscar_seq_free(gs, idg));
    }
    meta_free(&m);
    free(hk), free(hv), free(hqb), free(ho), free(oc), free(os), free(ob);
    CU(cudaFree(dk)); CU(cudaFree(dv)); CU(cudaFree(dq)); CU(cudaFree(dout));
    CU(cudaStreamDestroy(s));
    oscar_cache_destroy(cpu);
    oscar_cache_destroy(gs);
    oscar_cache_destroy(gb);
}

static void test_prefill(void) {
    const int big = g_small ? 200 : OSCAR_MAX_Q_LEN;
    pcase cases[4] = {
        {"prefill oscar b2 d128 8/32", 128, 8, 32, 2, 5, {1, 7, 1057, 2048, OSCAR_MAX_Q_LEN}},
        {"prefill oscar b4 d128 8/32", 128, 8, 32, 4, 5, {1, 7, 1057, 2048, OSCAR_MAX_Q_LEN}},
        {"prefill oscar b2 d64 2/16", 64, 2, 16, 2, 1, {OSCAR_MAX_Q_LEN}},
        {"prefill oscar b2 d256 1/8", 256, 1, 8, 2, 1, {OSCAR_MAX_Q_LEN}},
    };
    if (g_small) {
        for (int c = 0; c < 4; c++) {
            if (cases[c].n_q == 5) {
                cases[c].n_q = 3;
                cases[c].q_lens[2] = big;
            } else {
                cases[c].q_lens[0] = big;
            }
        }
        cases[1].n_q = 1; /* 4-bit: q_len 1 only */
    }
    double worst = 0.0;
    for (int c = 0; c < 4; c++) run_prefill_case(&cases[c], &worst);
    printf("   worst row rel L2 over all cases: %.3g (limit 3e-3)\n", worst);
}

/* =================================================================================
 * Shared by 5 and 6: a small batch-API cache pair on one stream.
 * ================================================================================= */

typedef struct rig {
    oscar_config cfg;
    int hkv, hq, d, R, max_len, stride;
    cudaStream_t s;
    uint16_t *dk, *dv, *dq, *dout; /* device scratch, capacity cap_rows */
    int cap_rows;
} rig;

static void rig_init(rig *G, int cap_rows) {
    memset(G, 0, sizeof *G);
    G->cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 2, 8); /* R = 64 */
    G->cfg.backend = OSCAR_BACKEND_CUDA;
    G->cfg.caller_metadata = 1;
    G->cfg.check_finite = 1;
    G->cfg.block_count = 64;
    G->cfg.max_seqs = 8;
    G->hkv = 2, G->hq = 8, G->d = 128, G->R = 64;
    G->max_len = 1024;
    G->stride = G->max_len / G->R; /* exactly the minimum */
    G->cap_rows = cap_rows;
    CU(cudaStreamCreate(&G->s));
    G->dk = dmalloc(2 * (size_t)cap_rows * G->hkv * G->d);
    G->dv = dmalloc(2 * (size_t)cap_rows * G->hkv * G->d);
    G->dq = dmalloc(2 * (size_t)cap_rows * G->hq * G->d);
    G->dout = dmalloc(2 * (size_t)cap_rows * G->hq * G->d);
}

static void rig_free(rig *G) {
    CU(cudaFree(G->dk)); CU(cudaFree(G->dv)); CU(cudaFree(G->dq)); CU(cudaFree(G->dout));
    CU(cudaStreamDestroy(G->s));
}

/* Batch append of host bf16 rows (uploaded first); waits for the stream
 * with cudaStreamSynchronize only, so pending reports stay pending. */
static oscar_status rig_append(rig *G, oscar_cache *c, const oscar_batch *b, const uint16_t *k, const uint16_t *v) {
    const int rows = b->num_seqs * b->tokens_per_seq;
    if (rows > G->cap_rows) {
        printf("FATAL: rig capacity %d rows < %d\n", G->cap_rows, rows);
        exit(2);
    }
    const size_t bytes = 2 * (size_t)rows * G->hkv * G->d;
    CU(cudaMemcpyAsync(G->dk, k, bytes, cudaMemcpyHostToDevice, G->s));
    CU(cudaMemcpyAsync(G->dv, v, bytes, cudaMemcpyHostToDevice, G->s));
    oscar_status st = oscar_batch_append(c, 0, b, G->dk, G->dv, BF16, G->s);
    CU(cudaStreamSynchronize(G->s));
    return st;
}

/* Batch attention; the output (poisoned with NaN first) decoded into out. */
static oscar_status rig_attention(rig *G, oscar_cache *c, const oscar_batch *b, const uint16_t *q, float *out) {
    const int rows = b->num_seqs * b->tokens_per_seq;
    if (rows > G->cap_rows) {
        printf("FATAL: rig capacity %d rows < %d\n", G->cap_rows, rows);
        exit(2);
    }
    const size_t n = (size_t)rows * G->hq * G->d;
    CU(cudaMemcpyAsync(G->dq, q, 2 * n, cudaMemcpyHostToDevice, G->s));
    CU(cudaMemsetAsync(G->dout, 0xff, 2 * n, G->s));
    oscar_status st = oscar_batch_attention(c, 0, b, G->dq, BF16, G->dout, BF16, 0.0f, G->s);
    uint16_t *h = xmalloc(2 * n);
    CU(cudaMemcpyAsync(h, G->dout, 2 * n, cudaMemcpyDeviceToHost, G->s));
    CU(cudaStreamSynchronize(G->s));
    tl_decode(h, BF16, out, (int64_t)n);
    free(h);
    return st;
}

/* Compares sequence i's rows of two outputs [n][tps][hq][d]: must match
 * (bit-equal expected; a relative L2 of 1e-3 tolerated and reported). */
static void expect_match(const char *what, int i, const float *got, const float *twin, int64_t per_seq, int *bitdiff) {
    const float *a = got + (int64_t)i * per_seq, *b = twin + (int64_t)i * per_seq;
    const int64_t nan = count_nan(a, per_seq);
    const double e = rel_l2(a, b, per_seq);
    int64_t diff = 0;
    for (int64_t j = 0; j < per_seq; j++) diff += memcmp(&a[j], &b[j], sizeof(float)) != 0;
    if (diff && bitdiff) (*bitdiff)++;
    CHECKF(nan == 0 && e <= 1e-3, "%s: sequence %d: %lld NaN, rel L2 %.3g against the twin cache (%lld elements differ)",
           what, i, (long long)nan, e, (long long)diff);
}

static void expect_all_nan(const char *what, int i, const float *got, int64_t per_seq) {
    const int64_t nan = count_nan(got + (int64_t)i * per_seq, per_seq);
    CHECKF(nan == per_seq, "%s: sequence %d: %lld of %lld outputs are NaN, expected all", what, i, (long long)nan,
           (long long)per_seq);
}

/* Expects a device report: oscar_synchronize returns want with a message,
 * then a second poll returns OSCAR_OK (each report once). */
static void expect_report(oscar_cache *c, cudaStream_t s, oscar_status want, const char *what) {
    const oscar_status st = oscar_synchronize(c, s);
    CHECKF(st == want, "%s: oscar_synchronize returned %s, expected %s (\"%s\")", what, oscar_status_name(st),
           oscar_status_name(want), oscar_last_error(c));
    if (st != OSCAR_OK) {
        const char *msg = oscar_last_error(c);
        CHECKF(msg && msg[0], "%s: %s reported with an empty message", what, oscar_status_name(st));
        printf("   %s: %s: %s\n", what, oscar_status_name(st), msg);
    }
    const oscar_status again = oscar_poll(c);
    CHECKF(again == OSCAR_OK, "%s: a second oscar_poll returned %s: the report was not returned only once", what,
           oscar_status_name(again));
}

/* =================================================================================
 * 5. Non-finite input on the device.
 * ================================================================================= */

static void test_nonfinite(void) {
    enum { NS = 3 };
    rig G;
    rig_init(&G, 256);
    const int hkv = G.hkv, hq = G.hq, d = G.d, R = G.R;
    const int64_t row = (int64_t)hkv * d, qrow = (int64_t)hq * d;
    oscar_cache *cf = tl_create(&G.cfg), *ct = tl_create(&G.cfg);
    if (!cf || !ct) {
        oscar_cache_destroy(cf), oscar_cache_destroy(ct);
        rig_free(&G);
        return;
    }
    tl_rng r = tl_rng_for("engine nonfinite");
    const int start[NS] = {70, 150, 33}, slots[NS] = {2, 6, 4};
    int len[NS];
    meta m;
    meta_init(&m, NS, G.stride);
    int next_block = 0;
    for (int i = 0; i < NS; i++) {
        m.h_slots[i] = slots[i];
        for (int j = 0; j < 5; j++) m.h_tables[i * G.stride + j] = next_block++;
    }
    uint16_t *k = xmalloc(2 * (size_t)(256 * row)), *v = xmalloc(2 * (size_t)(256 * row));
    uint16_t *kb = xmalloc(2 * (size_t)(256 * row)), *vb = xmalloc(2 * (size_t)(256 * row));
    uint16_t *q = xmalloc(2 * (size_t)(NS * qrow));
    float *of = xmalloc(sizeof(float) * (size_t)(NS * qrow)), *ot = xmalloc(sizeof(float) * (size_t)(NS * qrow));
    /* prefill, one sequence per call, identical on both */
    for (int i = 0; i < NS; i++) {
        len[i] = start[i];
        m.h_lens[i] = len[i];
        meta_upload_sync(&m, G.s);
        const oscar_batch b1 = meta_batch1(&m, i, start[i], G.max_len);
        gen_kv16(&r, start[i], hkv, d, k, v);
        ST_OK(cf, rig_append(&G, cf, &b1, k, v));
        ST_OK(ct, rig_append(&G, ct, &b1, k, v));
    }
    ST_OK(cf, oscar_synchronize(cf, G.s));
    ST_OK(ct, oscar_synchronize(ct, G.s));
    int bitdiff = 0;
    const oscar_batch b = meta_batch(&m, 1, G.max_len);
    /* A: a decode step where sequence 1's key row holds a NaN (cf only) */
    {
        for (int i = 0; i < NS; i++) m.h_lens[i] = ++len[i];
        meta_upload_sync(&m, G.s);
        gen_kv16(&r, NS, hkv, d, k, v);
        memcpy(kb, k, 2 * (size_t)(NS * row));
        kb[1 * row + 5] = 0x7fc0; /* bf16 quiet NaN */
        const oscar_status st = rig_append(&G, cf, &b, kb, v);
        CHECKF(st == OSCAR_OK, "append with a NaN on the CUDA backend returned %s, expected OSCAR_OK (the check "
               "runs on the device) (\"%s\")", oscar_status_name(st), oscar_last_error(cf));
        ST_OK(ct, rig_append(&G, ct, &b, k, v));
        expect_report(cf, G.s, OSCAR_E_NONFINITE, "NaN in K of sequence 1");
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }
    /* B: attention: sequence 1 NaN, the others as the twin */
    {
        gen_q16(&r, NS, hq, d, q);
        ST_OK(cf, rig_attention(&G, cf, &b, q, of));
        ST_OK(ct, rig_attention(&G, ct, &b, q, ot));
        expect_all_nan("attention after the NaN", 1, of, qrow);
        expect_match("attention after the NaN", 0, of, ot, qrow, &bitdiff);
        expect_match("attention after the NaN", 2, of, ot, qrow, &bitdiff);
        CHECKF(tl_count_nonfinite(ot, NS * qrow) == 0, "twin cache outputs not finite");
        const oscar_status st = oscar_synchronize(cf, G.s);
        CHECKF(st == OSCAR_OK || st == OSCAR_E_NONFINITE, "synchronize after attention over a failed sequence: %s",
               oscar_status_name(st));
        printf("   attention over the failed sequence, then synchronize: %s (either OK or NONFINITE accepted)\n",
               oscar_status_name(st));
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }
    /* C: further finite appends: sequence 1 stays failed, the others go on */
    for (int step = 0; step < 2; step++) {
        for (int i = 0; i < NS; i++) m.h_lens[i] = ++len[i];
        meta_upload_sync(&m, G.s);
        gen_kv16(&r, NS, hkv, d, k, v);
        ST_OK(cf, rig_append(&G, cf, &b, k, v));
        ST_OK(ct, rig_append(&G, ct, &b, k, v));
        oscar_status st = oscar_synchronize(cf, G.s);
        CHECKF(st == OSCAR_OK || st == OSCAR_E_NONFINITE, "synchronize after a finite append: %s", oscar_status_name(st));
        ST_OK(ct, oscar_synchronize(ct, G.s));
        gen_q16(&r, NS, hq, d, q);
        ST_OK(cf, rig_attention(&G, cf, &b, q, of));
        ST_OK(ct, rig_attention(&G, ct, &b, q, ot));
        expect_all_nan("later step", 1, of, qrow);
        expect_match("later step", 0, of, ot, qrow, &bitdiff);
        expect_match("later step", 2, of, ot, qrow, &bitdiff);
        st = oscar_synchronize(cf, G.s);
        CHECKF(st == OSCAR_OK || st == OSCAR_E_NONFINITE, "synchronize after attention: %s", oscar_status_name(st));
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }
    /* D: restart slot 6 (sequence 1) at length tokens_per_seq with fresh
     * blocks, on both caches */
    {
        const int T = R + 26;
        for (int j = 0; j < 5; j++) m.h_tables[1 * G.stride + j] = next_block++;
        len[1] = T;
        m.h_lens[1] = T;
        meta_upload_sync(&m, G.s);
        const oscar_batch b1 = meta_batch1(&m, 1, T, G.max_len);
        gen_kv16(&r, T, hkv, d, k, v);
        ST_OK(cf, rig_append(&G, cf, &b1, k, v));
        ST_OK(ct, rig_append(&G, ct, &b1, k, v));
        const oscar_status st = oscar_synchronize(cf, G.s);
        CHECKF(st == OSCAR_OK, "synchronize after restarting the failed slot: %s (\"%s\")", oscar_status_name(st),
               oscar_last_error(cf));
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }
    /* E: a decode step: everything finite and as the twin */
    {
        for (int i = 0; i < NS; i++) m.h_lens[i] = ++len[i];
        meta_upload_sync(&m, G.s);
        gen_kv16(&r, NS, hkv, d, k, v);
        ST_OK(cf, rig_append(&G, cf, &b, k, v));
        ST_OK(ct, rig_append(&G, ct, &b, k, v));
        gen_q16(&r, NS, hq, d, q);
        ST_OK(cf, rig_attention(&G, cf, &b, q, of));
        ST_OK(ct, rig_attention(&G, ct, &b, q, ot));
        for (int i = 0; i < NS; i++) expect_match("after the restart", i, of, ot, qrow, &bitdiff);
        ST_OK(cf, oscar_synchronize(cf, G.s));
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }
    /* F: -Inf in V of sequence 0 (tokens_per_seq 2), the same story */
    {
        const int tps = 2;
        for (int i = 0; i < NS; i++) m.h_lens[i] = (len[i] += tps);
        meta_upload_sync(&m, G.s);
        const oscar_batch b2 = meta_batch(&m, tps, G.max_len);
        gen_kv16(&r, NS * tps, hkv, d, k, v);
        memcpy(vb, v, 2 * (size_t)(NS * tps * row));
        vb[1 * row + 77] = 0xff80; /* bf16 -Inf, in the second token of sequence 0 */
        const oscar_status st = rig_append(&G, cf, &b2, k, vb);
        CHECKF(st == OSCAR_OK, "append with -Inf returned %s (\"%s\")", oscar_status_name(st), oscar_last_error(cf));
        ST_OK(ct, rig_append(&G, ct, &b2, k, v));
        expect_report(cf, G.s, OSCAR_E_NONFINITE, "-Inf in V of sequence 0");
        ST_OK(ct, oscar_synchronize(ct, G.s));
        gen_q16(&r, NS, hq, d, q);
        ST_OK(cf, rig_attention(&G, cf, &b, q, of));
        ST_OK(ct, rig_attention(&G, ct, &b, q, ot));
        expect_all_nan("after -Inf", 0, of, qrow);
        expect_match("after -Inf", 1, of, ot, qrow, &bitdiff);
        expect_match("after -Inf", 2, of, ot, qrow, &bitdiff);
        const oscar_status s2 = oscar_synchronize(cf, G.s);
        CHECKF(s2 == OSCAR_OK || s2 == OSCAR_E_NONFINITE, "synchronize: %s", oscar_status_name(s2));
    }
    printf("   healthy sequences vs the twin: %d comparisons not bit-equal (within 1e-3)\n", bitdiff);
    free(k), free(v), free(kb), free(vb), free(q), free(of), free(ot);
    meta_free(&m);
    oscar_cache_destroy(cf);
    oscar_cache_destroy(ct);
    rig_free(&G);
}

/* =================================================================================
 * 6. Bad batch metadata.
 * ================================================================================= */

typedef struct badcase {
    const char *name;
    int attention;  /* 0: append, 1: attention */
    int field;      /* 0: slot, 1: table entry, 2: seq_len */
    int index;      /* table entry index (field 1) */
    int value;      /* the bad value */
    int tps;        /* tokens_per_seq of the call */
} badcase;

static void test_badmeta(void) {
    enum { NS = 2 };
    rig G;
    rig_init(&G, 128);
    const int hkv = G.hkv, hq = G.hq, d = G.d, R = G.R;
    const int64_t row = (int64_t)hkv * d, qrow = (int64_t)hq * d;
    const int nb = G.cfg.block_count, ms = G.cfg.max_seqs;
    oscar_cache *cb = tl_create(&G.cfg), *ct = tl_create(&G.cfg);
    if (!cb || !ct) {
        oscar_cache_destroy(cb), oscar_cache_destroy(ct);
        rig_free(&G);
        return;
    }
    tl_rng r = tl_rng_for("engine badmeta");
    /* sequence 0 (slot 3) healthy, sequence 1 (slot 5) the victim, at 2R-1
     * tokens so that one more token completes its block 1 */
    int len[NS] = {100, 2 * R - 1};
    const int slots[NS] = {3, 5};
    meta m;
    meta_init(&m, NS, G.stride);
    for (int i = 0; i < NS; i++) {
        m.h_slots[i] = slots[i];
        for (int j = 0; j < 6; j++) m.h_tables[i * G.stride + j] = 10 * i + j;
    }
    uint16_t *k = xmalloc(2 * (size_t)(256 * row)), *v = xmalloc(2 * (size_t)(256 * row));
    uint16_t *q = xmalloc(2 * (size_t)(NS * 4 * qrow));
    float *ob = xmalloc(sizeof(float) * (size_t)(NS * 4 * qrow)), *ot = xmalloc(sizeof(float) * (size_t)(NS * 4 * qrow));
    for (int i = 0; i < NS; i++) {
        m.h_lens[i] = len[i];
        meta_upload_sync(&m, G.s);
        const oscar_batch b1 = meta_batch1(&m, i, len[i], G.max_len);
        gen_kv16(&r, len[i], hkv, d, k, v);
        ST_OK(cb, rig_append(&G, cb, &b1, k, v));
        ST_OK(ct, rig_append(&G, ct, &b1, k, v));
    }
    ST_OK(cb, oscar_synchronize(cb, G.s));
    ST_OK(ct, oscar_synchronize(ct, G.s));

    const badcase cases[] = {
        {"append: window slot = max_seqs", 0, 0, 0, ms, 1},
        {"append: window slot = -1", 0, 0, 0, -1, 1},
        {"append: block id = block_count in the block it fills", 0, 1, 1, nb, 1},
        {"append: block id = -1 in the block it fills", 0, 1, 1, -1, 1},
        {"append: seq_len = max_seq_len + 1", 0, 2, 0, G.max_len + 1, 1},
        {"append: seq_len = 0", 0, 2, 0, 0, 1},
        {"append: seq_len = -3", 0, 2, 0, -3, 1},
        {"append: seq_len 1 < tokens_per_seq 2", 0, 2, 0, 1, 2},
        {"attention: window slot = max_seqs", 1, 0, 0, ms, 1},
        {"attention: window slot = -7", 1, 0, 0, -7, 1},
        {"attention: block id = block_count at entry 0", 1, 1, 0, nb, 1},
        {"attention: block id = -1 at entry 0", 1, 1, 0, -1, 1},
        {"attention: seq_len = max_seq_len + 1", 1, 2, 0, G.max_len + 1, 1},
        {"attention: seq_len = 0", 1, 2, 0, 0, 1},
        {"attention: seq_len 1 < tokens_per_seq 4", 1, 2, 0, 1, 4},
    };
    const int n_cases = (int)(sizeof cases / sizeof cases[0]);
    int bitdiff = 0;
    for (int ci = 0; ci < n_cases; ci++) {
        const badcase *C = &cases[ci];
        const int tps = C->tps;
        if (!C->attention) len[0] += tps;
        /* the batch: sequence 0 valid, sequence 1 with one bad entry */
        m.h_lens[0] = len[0];
        m.h_lens[1] = C->attention ? len[1] : len[1] + tps;
        const int32_t save_slot = m.h_slots[1], save_entry = m.h_tables[1 * G.stride + C->index];
        if (C->field == 0) m.h_slots[1] = C->value;
        if (C->field == 1) m.h_tables[1 * G.stride + C->index] = C->value;
        if (C->field == 2) m.h_lens[1] = C->value;
        meta_upload_sync(&m, G.s);
        const oscar_batch b = meta_batch(&m, tps, G.max_len), b0 = meta_batch1(&m, 0, tps, G.max_len);
        if (!C->attention) {
            gen_kv16(&r, NS * tps, hkv, d, k, v);
            const oscar_status st = rig_append(&G, cb, &b, k, v);
            CHECKF(st == OSCAR_OK, "%s: the call returned %s; device arrays cannot be checked by the host (\"%s\")",
                   C->name, oscar_status_name(st), oscar_last_error(cb));
            expect_report(cb, G.s, OSCAR_E_INVALID_ARGUMENT, C->name);
            /* the twin gets sequence 0's rows only */
            ST_OK(ct, rig_append(&G, ct, &b0, k, v));
            ST_OK(ct, oscar_synchronize(ct, G.s));
        } else {
            gen_q16(&r, NS * tps, hq, d, q);
            const oscar_status st = rig_attention(&G, cb, &b, q, ob);
            CHECKF(st == OSCAR_OK, "%s: the call returned %s (\"%s\")", C->name, oscar_status_name(st),
                   oscar_last_error(cb));
            expect_report(cb, G.s, OSCAR_E_INVALID_ARGUMENT, C->name);
            ST_OK(ct, rig_attention(&G, ct, &b0, q, ot));
            ST_OK(ct, oscar_synchronize(ct, G.s));
            expect_match(C->name, 0, ob, ot, (int64_t)tps * qrow, &bitdiff);
            expect_all_nan(C->name, 1, ob, (int64_t)tps * qrow);
        }
        /* restore, then a valid attention over both: sequence 1 untouched */
        m.h_slots[1] = save_slot;
        m.h_tables[1 * G.stride + C->index] = save_entry;
        m.h_lens[0] = len[0];
        m.h_lens[1] = len[1];
        meta_upload_sync(&m, G.s);
        const oscar_batch bv = meta_batch(&m, 1, G.max_len);
        gen_q16(&r, NS, hq, d, q);
        ST_OK(cb, rig_attention(&G, cb, &bv, q, ob));
        ST_OK(ct, rig_attention(&G, ct, &bv, q, ot));
        char what[160];
        snprintf(what, sizeof what, "valid attention after [%s]", C->name);
        expect_match(what, 0, ob, ot, qrow, &bitdiff);
        expect_match(what, 1, ob, ot, qrow, &bitdiff);
        const oscar_status st = oscar_synchronize(cb, G.s);
        CHECKF(st == OSCAR_OK, "%s: synchronize after a valid attention: %s (\"%s\")", what, oscar_status_name(st),
               oscar_last_error(cb));
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }

    /* host-visible errors fail at once and leave nothing pending */
    {
        m.h_lens[0] = len[0];
        m.h_lens[1] = len[1];
        meta_upload_sync(&m, G.s);
        const oscar_batch good = meta_batch(&m, 1, G.max_len);
        typedef struct hcase {
            const char *name;
            oscar_batch b;
            int layer;
        } hcase;
        hcase hc[12];
        int nh = 0;
        hc[nh].name = "num_seqs = 0", hc[nh].b = good, hc[nh].b.num_seqs = 0, hc[nh++].layer = 0;
        hc[nh].name = "num_seqs = max_seqs + 1", hc[nh].b = good, hc[nh].b.num_seqs = ms + 1, hc[nh++].layer = 0;
        hc[nh].name = "tokens_per_seq = 0", hc[nh].b = good, hc[nh].b.tokens_per_seq = 0, hc[nh++].layer = 0;
        hc[nh].name = "tokens_per_seq = OSCAR_MAX_Q_LEN + 1", hc[nh].b = good,
        hc[nh].b.tokens_per_seq = OSCAR_MAX_Q_LEN + 1, hc[nh].b.max_seq_len = 2 * OSCAR_MAX_Q_LEN, hc[nh++].layer = 0;
        hc[nh].name = "max_seq_len = 0", hc[nh].b = good, hc[nh].b.max_seq_len = 0, hc[nh++].layer = 0;
        hc[nh].name = "block_table_stride < max_seq_len / R", hc[nh].b = good,
        hc[nh].b.block_table_stride = G.max_len / R - 1, hc[nh++].layer = 0;
        hc[nh].name = "seq_lens = NULL", hc[nh].b = good, hc[nh].b.seq_lens = NULL, hc[nh++].layer = 0;
        hc[nh].name = "window_slots = NULL", hc[nh].b = good, hc[nh].b.window_slots = NULL, hc[nh++].layer = 0;
        hc[nh].name = "block_tables = NULL", hc[nh].b = good, hc[nh].b.block_tables = NULL, hc[nh++].layer = 0;
        hc[nh].name = "layer = -1", hc[nh].b = good, hc[nh++].layer = -1;
        hc[nh].name = "layer = num_layers", hc[nh].b = good, hc[nh++].layer = G.cfg.num_layers;
        for (int i = 0; i < nh; i++) {
            char what[160];
            snprintf(what, sizeof what, "batch_append with %s", hc[i].name);
            tl_check_status(cb, oscar_batch_append(cb, hc[i].layer, &hc[i].b, G.dk, G.dv, BF16, G.s),
                            OSCAR_E_INVALID_ARGUMENT, __FILE__, __LINE__, what);
            snprintf(what, sizeof what, "batch_attention with %s", hc[i].name);
            tl_check_status(cb, oscar_batch_attention(cb, hc[i].layer, &hc[i].b, G.dq, BF16, G.dout, BF16, 0.0f, G.s),
                            OSCAR_E_INVALID_ARGUMENT, __FILE__, __LINE__, what);
        }
        CHECK_ST(cb, oscar_batch_append(cb, 0, NULL, G.dk, G.dv, BF16, G.s), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(cb, oscar_batch_append(cb, 0, &good, NULL, G.dv, BF16, G.s), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(cb, oscar_batch_append(cb, 0, &good, G.dk, G.dv, (oscar_dtype)7, G.s), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(cb, oscar_batch_attention(cb, 0, &good, NULL, BF16, G.dout, BF16, 0.0f, G.s), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(cb, oscar_batch_attention(cb, 0, &good, G.dq, BF16, NULL, BF16, 0.0f, G.s), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(cb, oscar_slot_copy(cb, 0, ms, 10, G.s), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(cb, oscar_slot_copy(cb, -1, 0, 10, G.s), OSCAR_E_INVALID_ARGUMENT);
        /* the sequence API on a caller-metadata cache */
        int32_t id = -1, one = 1;
        CHECK_ST(cb, oscar_seq_add(cb, &id), OSCAR_E_UNSUPPORTED);
        CHECK_ST(cb, oscar_append(cb, 0, 1, &id, &one, G.dk, G.dv, BF16, G.s), OSCAR_E_UNSUPPORTED);
        const oscar_status st = oscar_synchronize(cb, G.s);
        CHECKF(st == OSCAR_OK, "host-side failures left a report pending: %s (\"%s\")", oscar_status_name(st),
               oscar_last_error(cb));
        /* the batch API on a cache that tracks its own sequences */
        oscar_config cs_cfg = G.cfg;
        cs_cfg.caller_metadata = 0;
        oscar_cache *cs = tl_create(&cs_cfg);
        if (cs) {
            const oscar_status sa = oscar_batch_append(cs, 0, &good, G.dk, G.dv, BF16, G.s);
            CHECKF(sa != OSCAR_OK && oscar_last_error(cs)[0] != 0,
                   "batch_append on a caller_metadata = 0 cache returned %s", oscar_status_name(sa));
            printf("   batch API on a caller_metadata = 0 cache: %s\n", oscar_status_name(sa));
            oscar_cache_destroy(cs);
        }
    }
    /* a final valid step on both sequences */
    {
        for (int i = 0; i < NS; i++) m.h_lens[i] = ++len[i];
        meta_upload_sync(&m, G.s);
        const oscar_batch b = meta_batch(&m, 1, G.max_len);
        gen_kv16(&r, NS, hkv, d, k, v);
        ST_OK(cb, rig_append(&G, cb, &b, k, v));
        ST_OK(ct, rig_append(&G, ct, &b, k, v));
        gen_q16(&r, NS, hq, d, q);
        ST_OK(cb, rig_attention(&G, cb, &b, q, ob));
        ST_OK(ct, rig_attention(&G, ct, &b, q, ot));
        for (int i = 0; i < NS; i++) expect_match("final valid step", i, ob, ot, qrow, &bitdiff);
        ST_OK(cb, oscar_synchronize(cb, G.s));
        ST_OK(ct, oscar_synchronize(ct, G.s));
    }
    printf("   %d device-side cases; healthy sequences vs the twin: %d comparisons not bit-equal (within 1e-3)\n",
           n_cases, bitdiff);
    free(k), free(v), free(q), free(ob), free(ot);
    meta_free(&m);
    oscar_cache_destroy(cb);
    oscar_cache_destroy(ct);
    rig_free(&G);
}

/* =================================================================================
 * 7. Sink tokens in the batch API (config.sink_tokens = S): the CUDA batch API
 *    against the CPU backend's batch API, fed the same tokens and block tables.
 * ================================================================================= */

typedef struct sink_case {
    const char *name;
    int S, R, L, bits;
    /* 0: the default: key_bits, value_bits, key_norm_per_head, k_group, v_group */
    int kbits, vbits, norm_per_head, gk, gv;
} sink_case;

/* Blocks packed once a sequence has reached n tokens: the rule under
 * oscar_config on the tokens after the S sinks, with the lag L (the test's
 * own copy of oscar.h). */
static int sink_packed(const sink_case *C, int n) {
    const int after = n - imin(n, C->S);
    return after >= C->L ? (after - C->L) / C->R : 0;
}

/* The host twin of a meta's batch: the same arrays, as the CPU reads them. */
static oscar_batch host_batch(const meta *m, int first, int n, int tps, int max_len) {
    oscar_batch b;
    memset(&b, 0, sizeof b);
    b.num_seqs = n;
    b.tokens_per_seq = tps;
    b.max_seq_len = max_len;
    b.block_table_stride = m->stride;
    b.seq_lens = m->h_lens + first;
    b.window_slots = m->h_slots + first;
    b.block_tables = m->h_tables + (size_t)first * (size_t)m->stride;
    return b;
}

/* The device batch of entries [first, first + n) of a meta. */
static oscar_batch dev_batch(const meta *m, int first, int n, int tps, int max_len) {
    oscar_batch b = meta_batch(m, tps, max_len);
    b.num_seqs = n;
    b.seq_lens = m->d_lens + first;
    b.window_slots = m->d_slots + first;
    b.block_tables = m->d_tables + (size_t)first * (size_t)m->stride;
    return b;
}

/* The test's block manager: entry i holds the blocks its sequence can have
 * packed at length len ((len - S) / R, none before S), fresh ones from a
 * shuffled list; entries past them stay -1 in both metas. */
typedef struct sink_tables {
    meta *m[2];
    int32_t *perm;
    int next, nblk[8];
} sink_tables;

static void sink_grow(sink_tables *T, const sink_case *C, int i, int len) {
    const int need = len > C->S ? (len - C->S) / C->R : 0;
    for (; T->nblk[i] < need; T->nblk[i]++) {
        const int32_t b = T->perm[T->next++];
        for (int k = 0; k < 2; k++) T->m[k]->h_tables[i * T->m[k]->stride + T->nblk[i]] = b;
    }
}

/* Decodes bf16 outputs of the GPU and of the CPU and compares them. */
static double sink_compare(const uint16_t *gpu16, const uint16_t *cpu16, int64_t n, float *fg, float *fc) {
    tl_decode(gpu16, BF16, fg, n);
    tl_decode(cpu16, BF16, fc, n);
    return rel_l2(fg, fc, n);
}

static void run_batch_sinks(const sink_case *C) {
    enum { NL = 2, NS = 3, NF = NS + 1 /* and a fork */ };
    const int hkv = 2, hq = 8, d = 128, S = C->S, R = C->R;
    const int chunk = 13; /* prefill chunks, aligned to neither S nor R */
    const int steps = g_small ? R + C->L + 4 : 2 * R + C->L + 8;
    const int tail = 4;   /* decode steps after the rollback and the fork */
    const int prompt[NS] = {S > 1 ? S - 1 : 1, S, S + R + 3};
    const int32_t slots[NF] = {5, 0, 2, 7};
    int max_len = 0;
    for (int i = 0; i < NS; i++) max_len = imax(max_len, prompt[i] + steps + R + C->L + tail + 4);
    const int stride = (max_len - S) / R; /* the least the header allows */
    printf("   %s: S %d, R %d, L %d, %d-bit (K %d, V %d, per-head norms %d), %d decode steps\n", C->name, S, R, C->L,
           C->bits, C->kbits ? C->kbits : C->bits, C->vbits ? C->vbits : C->bits, C->norm_per_head, steps);

    oscar_config cfg = qwen_cfg(NL, C->bits);
    cfg.num_kv_heads = hkv;
    cfg.num_q_heads = hq;
    cfg.residual = R;
    cfg.rollback_tokens = C->L;
    cfg.sink_tokens = S;
    cfg.key_bits = C->kbits;
    cfg.value_bits = C->vbits;
    cfg.key_norm_per_head = C->norm_per_head;
    if (C->gk) cfg.k_group = C->gk;
    if (C->gv) cfg.v_group = C->gv;
    cfg.caller_metadata = 1;
    cfg.block_count = NF * stride + 4;
    cfg.max_seqs = 8;
    oscar_config ccpu = cfg;
    ccpu.backend = OSCAR_BACKEND_CPU;
    /* the eager GPU cache and the CPU cache over pools of the test's own:
     * docs/FORMAT.md's pool layout, compared byte for byte at the end */
    char eb[256] = "";
    oscar_memory_requirements rqg, rqc;
    CHECK_OK(oscar_memory_requirements_get(&cfg, &rqg, eb, sizeof eb));
    CHECK_OK(oscar_memory_requirements_get(&ccpu, &rqc, eb, sizeof eb));
    CHECKF(rqg.pool_bytes == rqc.pool_bytes, "pool bytes: CUDA %zu, CPU %zu", rqg.pool_bytes, rqc.pool_bytes);
    const size_t pool_bytes = rqg.pool_bytes;
    void *gpool = dmalloc(pool_bytes);
    void *cpool = NULL;
    if (posix_memalign(&cpool, 256, pool_bytes ? pool_bytes : 256) != 0) {
        printf("FATAL: out of host memory for a %zu-byte pool\n", pool_bytes);
        exit(2);
    }
    uint8_t *gpool_h = xmalloc(pool_bytes);
    oscar_memory_source gsrc, csrc;
    memset(&gsrc, 0, sizeof gsrc);
    memset(&csrc, 0, sizeof csrc);
    gsrc.pool = gpool;
    csrc.pool = cpool;
    oscar_cache *ce = NULL, *cpu = NULL, *cg = tl_create(&cfg);
    oscar_status st = oscar_cache_create_with_memory(&cfg, &gsrc, &ce, eb, sizeof eb);
    CHECKF(st == OSCAR_OK, "CUDA cache over a caller pool with sink_tokens %d, caller_metadata 1: %s (%s)", S,
           oscar_status_name(st), eb);
    st = oscar_cache_create_with_memory(&ccpu, &csrc, &cpu, eb, sizeof eb);
    CHECKF(st == OSCAR_OK, "CPU cache over a caller pool: %s (%s)", oscar_status_name(st), eb);
    if (!ce || !cpu || !cg) {
        oscar_cache_destroy(ce), oscar_cache_destroy(cpu), oscar_cache_destroy(cg);
        CU(cudaFree(gpool));
        free(cpool), free(gpool_h);
        return;
    }
    tl_rng r = tl_rng_for(C->name);
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    meta me, mg;
    meta_init(&me, NF, stride);
    meta_init(&mg, NF, stride);
    for (int i = 0; i < NF; i++) me.h_slots[i] = mg.h_slots[i] = slots[i];
    sink_tables T;
    memset(&T, 0, sizeof T);
    T.m[0] = &me;
    T.m[1] = &mg;
    T.perm = permutation(&r, cfg.block_count);
    int len[NF] = {0}, reach[NF] = {0}; /* lengths now, and the longest each reached */

    const int64_t row = (int64_t)hkv * d, qrow = (int64_t)hq * d;
    const int rows_max = imax(chunk, R + C->L + 2) * NF; /* the most rows of one call */
    uint16_t *hk = pinned(sizeof(uint16_t) * (size_t)(NL * rows_max * row));
    uint16_t *hv = pinned(sizeof(uint16_t) * (size_t)(NL * rows_max * row));
    uint16_t *hqb = pinned(sizeof(uint16_t) * (size_t)(NL * rows_max * qrow));
    uint16_t *hoe = pinned(sizeof(uint16_t) * (size_t)(NL * rows_max * qrow));
    uint16_t *hog = pinned(sizeof(uint16_t) * (size_t)(NL * rows_max * qrow));
    uint16_t *hoc = xmalloc(sizeof(uint16_t) * (size_t)(NL * rows_max * qrow));
    float *fg = xmalloc(sizeof(float) * (size_t)(rows_max * qrow)), *fc = xmalloc(sizeof(float) * (size_t)(rows_max * qrow));
    const size_t kvb = sizeof(uint16_t) * (size_t)(NL * rows_max * row), qb = sizeof(uint16_t) * (size_t)(NL * rows_max * qrow);
    uint16_t *dke = dmalloc(kvb), *dve = dmalloc(kvb), *dqe = dmalloc(qb), *doe = dmalloc(qb);
    uint16_t *dkg = dmalloc(kvb), *dvg = dmalloc(kvb), *dqg = dmalloc(qb), *dog = dmalloc(qb);
    double worst = 0.0;
    int cpu_checks = 0;

    /* One call of tps tokens for entries [first, first + n) on the eager
     * cache (and the graph's twin, eagerly, when twin is set) and on the
     * CPU; attention compared per layer. The lengths are set already. */
#define SINK_CALL(first, n, tps, twin, what)                                                                         \
    do {                                                                                                           \
        const int64_t kv_l = (int64_t)(n) * (tps) * row, q_l = (int64_t)(n) * (tps) * qrow;                        \
        for (int l = 0; l < NL; l++) {                                                                             \
            gen_kv16(&r, (int64_t)(n) * (tps), hkv, d, hk + l * kv_l, hv + l * kv_l);                              \
            gen_q16(&r, (int64_t)(n) * (tps), hq, d, hqb + l * q_l);                                               \
        }                                                                                                          \
        meta_upload(&me, s);                                                                                       \
        meta_upload(&mg, s);                                                                                       \
        CU(cudaMemcpyAsync(dke, hk, sizeof(uint16_t) * (size_t)(NL * kv_l), cudaMemcpyHostToDevice, s));           \
        CU(cudaMemcpyAsync(dve, hv, sizeof(uint16_t) * (size_t)(NL * kv_l), cudaMemcpyHostToDevice, s));           \
        CU(cudaMemcpyAsync(dqe, hqb, sizeof(uint16_t) * (size_t)(NL * q_l), cudaMemcpyHostToDevice, s));           \
        CU(cudaMemsetAsync(doe, 0xff, sizeof(uint16_t) * (size_t)(NL * q_l), s));                                  \
        const oscar_batch bd = dev_batch(&me, (first), (n), (tps), max_len);                                       \
        const oscar_batch bt = dev_batch(&mg, (first), (n), (tps), max_len);                                       \
        for (int l = 0; l < NL; l++) {                                                                             \
            ST_OK(ce, oscar_batch_append(ce, l, &bd, dke + l * kv_l, dve + l * kv_l, BF16, s));                    \
            ST_OK(ce, oscar_batch_attention(ce, l, &bd, dqe + l * q_l, BF16, doe + l * q_l, BF16, 0.0f, s));      \
            if (twin) ST_OK(cg, oscar_batch_append(cg, l, &bt, dke + l * kv_l, dve + l * kv_l, BF16, s));          \
        }                                                                                                          \
        CU(cudaMemcpyAsync(hoe, doe, sizeof(uint16_t) * (size_t)(NL * q_l), cudaMemcpyDeviceToHost, s));           \
        ST_OK(ce, oscar_synchronize(ce, s));                                                                       \
        if (twin) ST_OK(cg, oscar_synchronize(cg, s));                                                             \
        const oscar_batch bc = host_batch(&me, (first), (n), (tps), max_len);                                      \
        memset(hoc, 0xff, sizeof(uint16_t) * (size_t)(NL * q_l));                                                  \
        for (int l = 0; l < NL; l++) {                                                                             \
            ST_OK(cpu, oscar_batch_append(cpu, l, &bc, hk + l * kv_l, hv + l * kv_l, BF16, NULL));                 \
            ST_OK(cpu, oscar_batch_attention(cpu, l, &bc, hqb + l * q_l, BF16, hoc + l * q_l, BF16, 0.0f, NULL));  \
            const double e_ = sink_compare(hoe + l * q_l, hoc + l * q_l, q_l, fg, fc);                             \
            if (e_ > worst) worst = e_;                                                                            \
            CHECKF(e_ <= 2e-3, "%s: %s, layer %d (entry %d, %d sequences, %d tokens each, lengths %d %d %d %d): "   \
                   "GPU vs CPU batch attention rel L2 %.3g", C->name, what, l, (first), (n), (tps), len[0], len[1], \
                   len[2], len[3], e_);                                                                            \
            cpu_checks++;                                                                                          \
        }                                                                                                          \
    } while (0)

    /* ---- prefill, one sequence per call in chunks: prompts of S - 1, S and
     *      S + R + 3 tokens ---- */
    for (int i = 0; i < NS; i++)
        for (int pos = 0; pos < prompt[i];) {
            const int n = imin(chunk, prompt[i] - pos);
            len[i] = reach[i] = pos + n;
            sink_grow(&T, C, i, len[i]);
            me.h_lens[i] = mg.h_lens[i] = len[i];
            SINK_CALL(i, 1, n, 1, "prefill");
            pos += n;
        }

    /* ---- decode, all three per call: eager on ce, a captured graph on cg ---- */
    const oscar_batch bg = dev_batch(&mg, 0, NS, 1, max_len);
    const size_t kvL = (size_t)NS * (size_t)row, qL = (size_t)NS * (size_t)qrow;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int graph_ok = 0;
    {
        CU(cudaStreamSynchronize(s));
        cudaError_t e = cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        CHECKF(e == cudaSuccess, "cudaStreamBeginCapture: %s", cudaGetErrorString(e));
        if (e == cudaSuccess) {
            int calls_ok = 1;
            for (int l = 0; l < NL; l++) {
                oscar_status a = oscar_batch_append(cg, l, &bg, dkg + l * kvL, dvg + l * kvL, BF16, s);
                calls_ok &= CHECKF(a == OSCAR_OK, "during capture: oscar_batch_append layer %d: %s (%s)", l,
                                   oscar_status_name(a), oscar_last_error(cg));
                oscar_status t = oscar_batch_attention(cg, l, &bg, dqg + l * qL, BF16, dog + l * qL, BF16, 0.0f, s);
                calls_ok &= CHECKF(t == OSCAR_OK, "during capture: oscar_batch_attention layer %d: %s (%s)", l,
                                   oscar_status_name(t), oscar_last_error(cg));
            }
            cudaError_t e2 = cudaStreamEndCapture(s, &graph);
            CHECKF(e2 == cudaSuccess, "cudaStreamEndCapture with sink tokens: %s", cudaGetErrorString(e2));
            if (e2 == cudaSuccess && calls_ok && graph) {
                cudaError_t e3 = cudaGraphInstantiate(&exec, graph, 0);
                CHECKF(e3 == cudaSuccess, "cudaGraphInstantiate: %s", cudaGetErrorString(e3));
                graph_ok = e3 == cudaSuccess;
            }
        }
        cudaError_t le = cudaGetLastError();
        CHECKF(le == cudaSuccess, "CUDA error left after capture: %s", cudaGetErrorString(le));
    }
    int64_t graph_diff = 0;
    for (int step = 0; step < steps; step++) {
        for (int i = 0; i < NS; i++) {
            len[i] = reach[i] = len[i] + 1;
            sink_grow(&T, C, i, len[i]);
            me.h_lens[i] = mg.h_lens[i] = len[i];
        }
        for (int l = 0; l < NL; l++) {
            gen_kv16(&r, NS, hkv, d, hk + l * kvL, hv + l * kvL);
            gen_q16(&r, NS, hq, d, hqb + l * qL);
        }
        meta_upload(&me, s);
        meta_upload(&mg, s);
        CU(cudaMemcpyAsync(dke, hk, sizeof(uint16_t) * NL * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dve, hv, sizeof(uint16_t) * NL * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dqe, hqb, sizeof(uint16_t) * NL * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dkg, hk, sizeof(uint16_t) * NL * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dvg, hv, sizeof(uint16_t) * NL * kvL, cudaMemcpyHostToDevice, s));
        CU(cudaMemcpyAsync(dqg, hqb, sizeof(uint16_t) * NL * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemsetAsync(doe, 0xff, sizeof(uint16_t) * NL * qL, s));
        CU(cudaMemsetAsync(dog, 0xff, sizeof(uint16_t) * NL * qL, s));
        const oscar_batch be = dev_batch(&me, 0, NS, 1, max_len);
        for (int l = 0; l < NL; l++) {
            ST_OK(ce, oscar_batch_append(ce, l, &be, dke + l * kvL, dve + l * kvL, BF16, s));
            ST_OK(ce, oscar_batch_attention(ce, l, &be, dqe + l * qL, BF16, doe + l * qL, BF16, 0.0f, s));
        }
        if (graph_ok) {
            CU(cudaGraphLaunch(exec, s));
        } else { /* the twin stays in step eagerly */
            for (int l = 0; l < NL; l++) {
                ST_OK(cg, oscar_batch_append(cg, l, &bg, dkg + l * kvL, dvg + l * kvL, BF16, s));
                ST_OK(cg, oscar_batch_attention(cg, l, &bg, dqg + l * qL, BF16, dog + l * qL, BF16, 0.0f, s));
            }
        }
        CU(cudaMemcpyAsync(hoe, doe, sizeof(uint16_t) * NL * qL, cudaMemcpyDeviceToHost, s));
        CU(cudaMemcpyAsync(hog, dog, sizeof(uint16_t) * NL * qL, cudaMemcpyDeviceToHost, s));
        ST_OK(ce, oscar_synchronize(ce, s));
        ST_OK(cg, oscar_synchronize(cg, s));
        const int64_t dd = count_diff16(hoe, hog, (int64_t)(NL * qL));
        graph_diff += dd;
        CHECKF(dd == 0, "%s step %d: %lld outputs differ between the graph replay and the eager calls", C->name, step,
               (long long)dd);
        const oscar_batch bc = host_batch(&me, 0, NS, 1, max_len);
        for (int l = 0; l < NL; l++) {
            ST_OK(cpu, oscar_batch_append(cpu, l, &bc, hk + l * kvL, hv + l * kvL, BF16, NULL));
            memset(hoc + l * qL, 0xff, sizeof(uint16_t) * qL);
            ST_OK(cpu, oscar_batch_attention(cpu, l, &bc, hqb + l * qL, BF16, hoc + l * qL, BF16, 0.0f, NULL));
            const double e = sink_compare(hoe + l * qL, hoc + l * qL, (int64_t)qL, fg, fc);
            if (e > worst) worst = e;
            CHECKF(e <= 2e-3, "%s step %d layer %d (lengths %d %d %d): GPU vs CPU batch attention rel L2 %.3g",
                   C->name, step, l, len[0], len[1], len[2], e);
            cpu_checks++;
        }
    }
    printf("   %s: graph replay vs eager, %d steps: %lld outputs differ%s\n", C->name, steps, (long long)graph_diff,
           graph_ok ? "" : " [graph capture failed: eager twin]");

    /* ---- rollback: sequence 1 lowered to its sink rows and blocks exactly
     *      (S + P R, the floor once P > 0), then appended past where it was ---- */
    {
        const int p = sink_packed(C, reach[1]);
        const int floor_len = p > 0 ? S + p * R : 0;
        const int drop = len[1] - floor_len, n = drop + 2;
        CHECKF(p > 0, "%s: sequence 1 has no block packed before the rollback", C->name);
        len[1] = floor_len + n;
        if (len[1] > reach[1]) reach[1] = len[1];
        sink_grow(&T, C, 1, len[1]);
        me.h_lens[1] = mg.h_lens[1] = len[1];
        SINK_CALL(1, 1, n, 0, "rollback to S + P R and re-append");
    }
    /* ---- fork: sequence 0 into slot 7 (entry 3), sharing its packed blocks ---- */
    {
        const int p0 = sink_packed(C, reach[0]);
        ST_OK(ce, oscar_slot_copy(ce, slots[0], slots[3], len[0], s));
        ST_OK(cpu, oscar_slot_copy(cpu, slots[0], slots[3], len[0], NULL));
        for (int j = 0; j < p0; j++)
            me.h_tables[3 * stride + j] = mg.h_tables[3 * stride + j] = me.h_tables[0 * stride + j];
        T.nblk[3] = p0; /* entries past the packed ones: fresh blocks of the child's own */
        len[3] = len[0];
        reach[3] = reach[0];
        for (int t = 0; t < tail; t++) {
            for (int i = 0; i < NF; i++) {
                len[i] = len[i] + 1;
                if (len[i] > reach[i]) reach[i] = len[i];
                sink_grow(&T, C, i, len[i]);
                me.h_lens[i] = mg.h_lens[i] = len[i];
            }
            SINK_CALL(0, NF, 1, 0, "after the fork");
        }
    }
    /* ---- every packed block byte-identical to the CPU's ---- */
    {
        d2h(gpool_h, gpool, pool_bytes, s);
        size_t diff = 0, first = 0;
        for (size_t i = 0; i < pool_bytes; i++)
            if (gpool_h[i] != ((const uint8_t *)cpool)[i]) {
                if (!diff) first = i;
                diff++;
            }
        CHECKF(diff == 0, "%s: %zu of %zu pool bytes differ between the CUDA and the CPU batch API (first at byte %zu, "
               "layer block %zu)", C->name, diff, pool_bytes, first, first / (pool_bytes / (size_t)NL / (size_t)cfg.block_count));
        printf("   %s: pools byte-identical over %d blocks used; %d CPU comparisons, worst rel L2 %.3g\n", C->name,
               T.next, cpu_checks, worst);
    }
    /* ---- a seq_len one below S + P R on the device: reported, that
     *      sequence's rows NaN, the others attended; the CPU refuses it ---- */
    {
        const int p2 = sink_packed(C, reach[2]);
        const int keep = len[2];
        me.h_lens[2] = S + p2 * R - 1;
        meta_upload(&me, s);
        gen_q16(&r, NS, hq, d, hqb);
        CU(cudaMemcpyAsync(dqe, hqb, sizeof(uint16_t) * qL, cudaMemcpyHostToDevice, s));
        CU(cudaMemsetAsync(doe, 0, sizeof(uint16_t) * qL, s));
        const oscar_batch be = dev_batch(&me, 0, NS, 1, max_len);
        ST_OK(ce, oscar_batch_attention(ce, 0, &be, dqe, BF16, doe, BF16, 0.0f, s));
        CU(cudaMemcpyAsync(hoe, doe, sizeof(uint16_t) * qL, cudaMemcpyDeviceToHost, s));
        expect_report(ce, s, OSCAR_E_INVALID_ARGUMENT, "seq_len below the sink rows and blocks");
        tl_decode(hoe, BF16, fg, (int64_t)qL);
        expect_all_nan("seq_len S + P R - 1", 2, fg, qrow);
        CHECKF(count_nan(fg, 2 * qrow) == 0, "%s: the valid sequences of a batch with a bad entry got NaN", C->name);
        const oscar_batch bc = host_batch(&me, 0, NS, 1, max_len);
        CHECK_ST(cpu, oscar_batch_attention(cpu, 0, &bc, hqb, BF16, hoc, BF16, 0.0f, NULL), OSCAR_E_INVALID_ARGUMENT);
        me.h_lens[2] = keep;
        meta_upload_sync(&me, s);
    }
#undef SINK_CALL
    if (exec) CU(cudaGraphExecDestroy(exec));
    if (graph) CU(cudaGraphDestroy(graph));
    CU(cudaFreeHost(hk)); CU(cudaFreeHost(hv)); CU(cudaFreeHost(hqb)); CU(cudaFreeHost(hoe)); CU(cudaFreeHost(hog));
    CU(cudaFree(dke)); CU(cudaFree(dve)); CU(cudaFree(dqe)); CU(cudaFree(doe));
    CU(cudaFree(dkg)); CU(cudaFree(dvg)); CU(cudaFree(dqg)); CU(cudaFree(dog));
    free(hoc), free(fg), free(fc), free(T.perm);
    meta_free(&me);
    meta_free(&mg);
    CU(cudaStreamDestroy(s));
    oscar_cache_destroy(ce);
    oscar_cache_destroy(cg);
    oscar_cache_destroy(cpu);
    CU(cudaFree(gpool));
    free(cpool), free(gpool_h);
}

static void test_batch_sinks(void) {
    static const sink_case cases[] = {
        {"batch sinks S 32 R 64 L 64 (recommended)", 32, 64, 64, 2, 0, 0, 0, 0, 0},
        {"batch sinks S 5 R 32", 5, 32, 0, 2, 0, 0, 0, 0, 0},
        {"batch sinks S 33 (odd, > R) R 32 L 8, 4-bit", 33, 32, 8, 4, 0, 0, 0, 0, 0},
        {"batch K3/V2 g64/64 S 32 R 64 L 64 (recommended K3/V2)", 32, 64, 64, 2, 3, 2, 0, 64, 64},
        {"batch K4/V2 per-head norms S 5 R 32", 5, 32, 0, 2, 4, 2, 1, 0, 0},
    };
    const int n = g_small ? 2 : (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++) run_batch_sinks(&cases[i]);
}

/* ---- main ----------------------------------------------------------------------- */

typedef struct entry {
    const char *name;
    void (*fn)(void);
    const char *what;
} entry;

static const entry g_tests[] = {
    {"graph", test_graph, "CUDA graph replay vs eager vs CPU, 4 layers, >= 300 decode steps"},
    {"nosync", test_nosync, "no host synchronisation, current device kept"},
    {"noalloc", test_noalloc, "no allocation on the hot path; caller-provided memory"},
    {"prefill", test_prefill, "chunked prefill q_len up to 4096 vs CPU"},
    {"nonfinite", test_nonfinite, "NaN/Inf found on the device, reported once, slot restart"},
    {"badmeta", test_badmeta, "out-of-range batch metadata"},
    {"sinks", test_batch_sinks,
     "sink tokens (and K3/V2, per-head norms) in the batch API vs the CPU's, graph replay, rollback, fork"},
};

static int selected(const char *name) {
    if (!g_only) return 1;
    const size_t n = strlen(name);
    for (const char *p = g_only; *p;) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const int n_tests = (int)(sizeof g_tests / sizeof g_tests[0]);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--small")) {
            g_small = 1;
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            g_only = argv[++i];
        } else if (!strcmp(argv[i], "--list")) {
            for (int t = 0; t < n_tests; t++) printf("%-10s %s\n", g_tests[t].name, g_tests[t].what);
            return 0;
        } else {
            printf("usage: %s [--small] [--only NAME[,NAME...]] [--list]\n", argv[0]);
            return 2;
        }
    }
    if (!oscar_backend_available(OSCAR_BACKEND_CUDA)) {
        printf("SKIP: no usable CUDA device (the CUDA backend needs a compute capability 9.x GPU); "
               "test_engine_gpu not run\n");
        return 77;
    }
    if (g_small) g_hold_limit_s = 2.0;
    int dev = 0;
    CU(cudaGetDevice(&dev));
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, dev));
    printf("device %d: %s (cc %d.%d, %d SMs)%s\n", dev, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
           g_small ? ", --small" : "");
    int ran = 0;
    for (int t = 0; t < n_tests; t++) {
        if (!selected(g_tests[t].name)) continue;
        tl_run(g_tests[t].name, g_tests[t].fn);
        ran++;
    }
    if (!ran) {
        printf("no test matches --only %s (see --list)\n", g_only);
        return 2;
    }
    return tl_finish();
}
