/*
 * test_tp_nccl.c - tensor parallelism on two GPUs through NCCL: one process
 * per GPU, Hkv = 8 split 4 + 4, against one GPU holding all 8 heads.
 *
 * Each rank appends its 4 heads of the same tokens with
 * oscar_append_with_key_sums: phase 1 oscar_key_sumsq on its rows, an
 * ncclAllGather of the per-head sums, a reorder to [rows][8] in head order,
 * then the append. Afterwards every rank writes its export stream and its
 * attention output to a file; the parent process (which touches CUDA only
 * after the ranks have exited) builds the 8-head cache on GPU 0 from the
 * same tokens and checks that
 *  - the codes and parameters of every head and the token norms of every
 *    packed block are the same bytes,
 *  - the windows and their sums of squares are the same bytes,
 *  - attention of rank r equals query heads 16r..16r+15 of the full cache.
 * NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
 * The ranks are this program re-executed (`--rank R ID`), so that no
 * process forks after CUDA was initialised in it.
 * Skips (exit 77) without two CUDA devices; not built without NCCL.
 */
#define _POSIX_C_SOURCE 200809L
#include "testlib.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

enum { HKV = 8, HQ = 32, D = 128, LAYERS = 2, R = 128, RANKS = 2, LH = HKV / RANKS, LQ = HQ / RANKS };
static const int steps[] = {300, 1, 1, 1, 1, 77, 1, 129, 1, 1, 3};
#define NSTEPS ((int)(sizeof steps / sizeof steps[0]))

#define CU(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)
#define NC(x)                                                                                          \
    do {                                                                                               \
        ncclResult_t e_ = (x);                                                                         \
        if (e_ != ncclSuccess) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, ncclGetErrorString(e_));        \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)
#define OK(x)                                                                                          \
    do {                                                                                               \
        oscar_status s_ = (x);                                                                         \
        if (s_ != OSCAR_OK) {                                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, oscar_status_name(s_));         \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)

static oscar_config cfg_for(int hkv, int hq, int device) {
    oscar_config c = oscar_config_default();
    c.method = OSCAR_METHOD_OSCAR;
    c.bits = 2;
    c.head_dim = D;
    c.num_kv_heads = hkv;
    c.num_q_heads = hq;
    c.num_layers = LAYERS;
    c.residual = R;
    c.window_dtype = OSCAR_DTYPE_BF16;
    c.block_count = 16;
    c.max_seqs = 4;
    c.backend = OSCAR_BACKEND_CUDA;
    c.device = device;
    return c;
}

/* The tokens of step s, layer l: bf16 [n][HKV][D] K and V, the same in
 * every process. */
static void step_tokens(int s, int l, int n, uint16_t *k, uint16_t *v) {
    char name[32];
    snprintf(name, sizeof name, "tp_nccl %d %d", s, l);
    tl_rng r = tl_rng_seeded(tl_fnv1a(name, strlen(name)));
    float *kf = malloc(sizeof(float) * (size_t)n * HKV * D), *vf = malloc(sizeof(float) * (size_t)n * HKV * D);
    tl_gen_kv(&r, s % 3, kf, vf, n, HKV, D, OSCAR_DTYPE_BF16);
    tl_encode(kf, OSCAR_DTYPE_BF16, k, (int64_t)n * HKV * D);
    tl_encode(vf, OSCAR_DTYPE_BF16, v, (int64_t)n * HKV * D);
    free(kf), free(vf);
}

static void query(float *q) {
    tl_rng r = tl_rng_seeded(12345);
    tl_fill_normal(&r, q, HQ * D, 0.05);
}

static void path_of(char *buf, size_t n, int parent, int rank) {
    snprintf(buf, n, "/tmp/oscar_tp_nccl_%d_rank%d.bin", parent, rank);
}

static int rank_main(int rank, ncclUniqueId id, int parent) {
    CU(cudaSetDevice(rank));
    ncclComm_t comm;
    NC(ncclCommInitRank(&comm, RANKS, id, rank));
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    oscar_config cfg = cfg_for(LH, LQ, rank);
    oscar_cache *c = NULL;
    char err[256];
    if (oscar_cache_create(&cfg, &c, err, sizeof err) != OSCAR_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, err);
        return 2;
    }
    int32_t seq;
    OK(oscar_seq_add(c, &seq));
    int maxn = 0;
    for (int s = 0; s < NSTEPS; s++) maxn = steps[s] > maxn ? steps[s] : maxn;
    const size_t full_row = (size_t)HKV * D, my_row = (size_t)LH * D;
    uint16_t *k = malloc(2 * maxn * full_row), *v = malloc(2 * maxn * full_row);
    uint16_t *mk, *mv; /* pinned: this rank's heads */
    CU(cudaMallocHost((void **)&mk, 2 * maxn * my_row));
    CU(cudaMallocHost((void **)&mv, 2 * maxn * my_row));
    void *dk, *dv;
    float *d_part, *d_all, *d_gath;
    CU(cudaMalloc(&dk, 2 * maxn * my_row));
    CU(cudaMalloc(&dv, 2 * maxn * my_row));
    CU(cudaMalloc((void **)&d_part, sizeof(float) * maxn * LH));
    CU(cudaMalloc((void **)&d_all, sizeof(float) * maxn * HKV));
    CU(cudaMalloc((void **)&d_gath, sizeof(float) * maxn * HKV));
    for (int s = 0; s < NSTEPS; s++) {
        const int n = steps[s];
        for (int l = 0; l < LAYERS; l++) {
            step_tokens(s, l, n, k, v);
            for (int t = 0; t < n; t++) {
                memcpy(mk + t * my_row, k + (t * HKV + rank * LH) * D, 2 * my_row);
                memcpy(mv + t * my_row, v + (t * HKV + rank * LH) * D, 2 * my_row);
            }
            CU(cudaMemcpyAsync(dk, mk, 2 * n * my_row, cudaMemcpyHostToDevice, st));
            CU(cudaMemcpyAsync(dv, mv, 2 * n * my_row, cudaMemcpyHostToDevice, st));
            /* phase 1, the all-gather ([rank][n][LH]), reorder to [n][HKV] */
            OK(oscar_key_sumsq(c, n, dk, OSCAR_DTYPE_BF16, d_part, st));
            NC(ncclAllGather(d_part, d_all, (size_t)n * LH, ncclFloat, comm, st));
            for (int r = 0; r < RANKS; r++)
                CU(cudaMemcpy2DAsync(d_gath + r * LH, sizeof(float) * HKV, d_all + (size_t)r * n * LH,
                                     sizeof(float) * LH, sizeof(float) * LH, n, cudaMemcpyDeviceToDevice, st));
            int32_t nt = n;
            OK(oscar_append_with_key_sums(c, l, 1, &seq, &nt, dk, dv, OSCAR_DTYPE_BF16, d_gath, HKV, st));
            /* the pinned staging buffers are refilled for the next layer */
            CU(cudaStreamSynchronize(st));
        }
    }
    OK(oscar_synchronize(c, st));
    /* attention for this rank's query heads */
    float q[HQ * D], out[LQ * D];
    query(q);
    float *dq, *dout;
    CU(cudaMalloc((void **)&dq, sizeof(float) * LQ * D));
    CU(cudaMalloc((void **)&dout, sizeof(float) * LQ * D * LAYERS));
    CU(cudaMemcpy(dq, q + rank * LQ * D, sizeof(float) * LQ * D, cudaMemcpyHostToDevice));
    char path[128];
    path_of(path, sizeof path, parent, rank);
    FILE *f = fopen(path, "wb");
    if (!f) return 2;
    for (int l = 0; l < LAYERS; l++) {
        OK(oscar_attention(c, l, 1, &seq, 1, dq, OSCAR_DTYPE_F32, dout, OSCAR_DTYPE_F32, 0.0f, st));
        CU(cudaMemcpyAsync(out, dout, sizeof out, cudaMemcpyDeviceToHost, st));
        CU(cudaStreamSynchronize(st));
        fwrite(out, sizeof out, 1, f);
    }
    size_t n = 0;
    OK(oscar_seq_export(c, seq, NULL, 0, &n));
    unsigned char *buf = malloc(n);
    OK(oscar_seq_export(c, seq, buf, n, &n));
    fwrite(&n, sizeof n, 1, f);
    fwrite(buf, 1, n, f);
    fclose(f);
    printf("rank %d: %zu-byte stream, device %d\n", rank, n, rank);
    oscar_cache_destroy(c);
    NC(ncclCommDestroy(comm));
    return 0;
}

static size_t stream_block_offset(int l, uint32_t i, size_t LB) {
    return 80 + 16 * LAYERS + ((size_t)i * LAYERS + (size_t)l) * LB;
}

static void to_hex(const void *p, size_t n, char *out) {
    for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", ((const unsigned char *)p)[i]);
}

static int from_hex(const char *s, void *p, size_t n) {
    if (strlen(s) != 2 * n) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned x;
        if (sscanf(s + 2 * i, "%2x", &x) != 1) return 0;
        ((unsigned char *)p)[i] = (unsigned char)x;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "--rank")) {
        ncclUniqueId rid;
        if (!from_hex(argv[3], &rid, sizeof rid)) return 2;
        return rank_main(atoi(argv[2]), rid, atoi(argv[4]));
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 2 || !oscar_backend_available(OSCAR_BACKEND_CUDA)) {
        printf("SKIP: tensor-parallel test needs two CUDA devices (found %d)\n", ndev);
        return 77;
    }
    /* cudaGetDeviceCount initialised nothing that fork would break: the
     * ranks create their own contexts. Keep NVLink multicast off. */
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    ncclUniqueId id;
    NC(ncclGetUniqueId(&id));
    char idhex[2 * sizeof(ncclUniqueId) + 1], rs[16], ps[16];
    to_hex(&id, sizeof id, idhex);
    snprintf(ps, sizeof ps, "%d", (int)getpid());
    pid_t pids[RANKS];
    for (int r = 0; r < RANKS; r++) {
        snprintf(rs, sizeof rs, "%d", r);
        pids[r] = fork();
        if (pids[r] == 0) {
            char *args[] = {argv[0], "--rank", rs, idhex, ps, NULL};
            execv("/proc/self/exe", args);
            _exit(3);
        }
    }
    int failed = 0;
    for (int r = 0; r < RANKS; r++) {
        int status = 0;
        waitpid(pids[r], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "rank %d failed (status %d)\n", r, status);
            failed = 1;
        }
    }
    if (failed) return 1;
    /* the reference: one GPU, all 8 heads, the same tokens */
    CU(cudaSetDevice(0));
    oscar_config cfg = cfg_for(HKV, HQ, 0);
    oscar_cache *c = tl_create(&cfg);
    if (!c) return 1;
    int32_t seq;
    CHECK_OK(oscar_seq_add(c, &seq));
    const size_t full_row = (size_t)HKV * D;
    uint16_t *k = malloc(2 * 300 * full_row), *v = malloc(2 * 300 * full_row);
    void *dk, *dv;
    CU(cudaMalloc(&dk, 2 * 300 * full_row));
    CU(cudaMalloc(&dv, 2 * 300 * full_row));
    for (int s = 0; s < NSTEPS; s++)
        for (int l = 0; l < LAYERS; l++) {
            step_tokens(s, l, steps[s], k, v);
            CU(cudaMemcpy(dk, k, 2 * steps[s] * full_row, cudaMemcpyHostToDevice));
            CU(cudaMemcpy(dv, v, 2 * steps[s] * full_row, cudaMemcpyHostToDevice));
            int32_t nt = steps[s];
            CHECK_OK(oscar_append(c, l, 1, &seq, &nt, dk, dv, OSCAR_DTYPE_BF16, NULL));
        }
    CHECK_OK(oscar_synchronize(c, NULL));
    float q[HQ * D], full_out[LAYERS][HQ * D];
    query(q);
    float *dq, *dout;
    CU(cudaMalloc((void **)&dq, sizeof q));
    CU(cudaMalloc((void **)&dout, sizeof q));
    CU(cudaMemcpy(dq, q, sizeof q, cudaMemcpyHostToDevice));
    for (int l = 0; l < LAYERS; l++) {
        CHECK_OK(oscar_attention(c, l, 1, &seq, 1, dq, OSCAR_DTYPE_F32, dout, OSCAR_DTYPE_F32, 0.0f, NULL));
        CU(cudaMemcpy(full_out[l], dout, sizeof q, cudaMemcpyDeviceToHost));
    }
    size_t nf = 0;
    unsigned char *ef = tl_export(c, seq, &nf);
    oscar_memory_stats mf;
    CHECK_OK(oscar_memory(c, &mf));
    const size_t LBf = (size_t)(mf.block_bytes / LAYERS), norms = (size_t)R * 4, head = (LBf - norms) / HKV;
    const size_t LBs = LH * head + norms;
    int64_t head_bad = 0, norm_bad = 0, win_bad = 0, ss_bad = 0, blocks = 0;
    double worst = 0.0, maxabs = 0.0;
    for (int r = 0; r < RANKS; r++) {
        char path[128];
        snprintf(path, sizeof path, "/tmp/oscar_tp_nccl_%d_rank%d.bin", (int)getpid(), r);
        FILE *f = fopen(path, "rb");
        if (!CHECKF(f != NULL, "rank %d wrote no results (%s)", r, path)) continue;
        float out[LAYERS][LQ * D];
        size_t n = 0;
        if (fread(out, sizeof out, 1, f) != 1 || fread(&n, sizeof n, 1, f) != 1) n = 0;
        unsigned char *es = n ? malloc(n) : NULL;
        if (es && fread(es, 1, n, f) != n) n = 0;
        fclose(f);
        remove(path);
        if (!CHECKF(n > 0 && ef, "rank %d: unreadable results", r)) continue;
        const uint32_t nb = tl_rd32(ef + 52);
        CHECK(tl_rd32(es + 52) == nb);
        for (uint32_t i = 0; i < nb; i++)
            for (int l = 0; l < LAYERS; l++) {
                if (tl_rd64(ef + 80 + 16 * l + 8) <= i) continue;
                const unsigned char *F = ef + stream_block_offset(l, i, LBf);
                const unsigned char *S = es + stream_block_offset(l, i, LBs);
                for (int h = 0; h < LH; h++)
                    head_bad += memcmp(S + (size_t)h * head, F + (size_t)(r * LH + h) * head, head) != 0;
                norm_bad += memcmp(S + LH * head, F + HKV * head, norms) != 0;
                blocks++;
            }
        size_t of = 80 + 16 * LAYERS + (size_t)nb * LAYERS * LBf, os = 80 + 16 * LAYERS + (size_t)nb * LAYERS * LBs;
        for (int l = 0; l < LAYERS; l++) {
            const uint64_t t = tl_rd64(ef + 80 + 16 * l), p = tl_rd64(ef + 80 + 16 * l + 8);
            CHECK(tl_rd64(es + 80 + 16 * l) == t && tl_rd64(es + 80 + 16 * l + 8) == p);
            const size_t wn = (size_t)(t - p * R);
            for (int kv = 0; kv < 2; kv++)
                for (size_t j = 0; j < wn; j++)
                    win_bad += memcmp(es + os + (kv * wn + j) * LH * D * 2,
                                      ef + of + ((kv * wn + j) * HKV + (size_t)r * LH) * D * 2, LH * D * 2) != 0;
            ss_bad += memcmp(es + os + 2 * wn * LH * D * 2, ef + of + 2 * wn * HKV * D * 2, 4 * wn) != 0;
            of += 2 * wn * HKV * D * 2 + 4 * wn;
            os += 2 * wn * LH * D * 2 + 4 * wn;
        }
        for (int l = 0; l < LAYERS; l++) {
            double num = 0, den = 0;
            for (int j = 0; j < LQ * D; j++) {
                const double ref = full_out[l][r * LQ * D + j], dlt = out[l][j] - ref;
                num += dlt * dlt;
                den += ref * ref;
                if (fabs(dlt) > maxabs) maxabs = fabs(dlt);
            }
            const double e = den > 0 ? sqrt(num / den) : sqrt(num);
            if (e > worst) worst = e;
        }
        free(es);
    }
    printf("2 ranks x 4 heads vs 1 GPU x 8 heads: %lld blocks, %lld heads and %lld norm arrays differ; %lld window "
           "rows and %lld window sums differ; attention rel err %.2e (max abs %.2e)\n",
           (long long)blocks, (long long)head_bad, (long long)norm_bad, (long long)win_bad, (long long)ss_bad, worst,
           maxabs);
    CHECK(blocks > 0);
    CHECK(head_bad == 0 && norm_bad == 0 && win_bad == 0 && ss_bad == 0);
    CHECKF(worst < 1e-6, "attention of the shards differs from the single GPU's: %.3g", worst);
    free(ef), free(k), free(v);
    cudaFree(dk), cudaFree(dv), cudaFree(dq), cudaFree(dout);
    oscar_cache_destroy(c);
    return tl_finish();
}
