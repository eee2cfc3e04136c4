/*
 * e2e.cu - `oscar bench-e2e`: a Qwen3-shaped decoder on the GPU, decoding a
 * batch of sequences one token per step, the whole step (every layer) one
 * CUDA graph replay, with the KV cache in oscar (2 or 4 bits) or in a plain
 * paged bf16 cache (model/gpu/kv_bf16.h) as the baseline. The only
 * difference between the runs is the cache.
 *
 * The forward pass, per step, for B sequences (llama2.c-sized on purpose):
 *
 *   x = embed[token]                                   f32 residual stream
 *   for each layer:
 *     h   = rmsnorm(x) * w_attn_norm                   bf16
 *     qkv = h @ Wqkv^T                                 cuBLAS, bf16 in/out, f32 accumulate
 *     q, k = rope(rmsnorm_per_head(q|k) * w_q|k_norm)  Qwen3's q/k norm, then RoPE
 *     cache.append(k, v); a = cache.attention(q)       oscar batch API or kv_bf16
 *     x  += a @ Wo^T
 *     h   = rmsnorm(x) * w_ffn_norm
 *     x  += (silu(h @ Wg^T) * (h @ Wu^T)) @ Wd^T
 *   token = argmax(rmsnorm(x) * w_out_norm @ Wout^T)
 *
 * Weights are random (a hash of the index, scaled by 1/sqrt(fan_in)), made
 * on the GPU: no file. The caches are filled with random K/V to the chosen
 * context before timing. Times are medians of graph replays (cudaEvent); a
 * separate eager step with events splits the time into GEMMs, attention
 * (append + attention) and the rest.
 */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>

#include "check.cuh"
#include "kernels.cuh"
#include "kv_bf16.h"
#include "oscar.h"

using namespace gpu;

namespace {

/* ---- errors ---------------------------------------------------------------- */

#define OS(c, x)                                                                                       \
    do {                                                                                               \
        oscar_status s_ = (x);                                                                         \
        if (s_ != OSCAR_OK)                                                                            \
            throw Fail{std::string(#x) + ": " + oscar_status_name(s_) + ": " + oscar_last_error(c)};   \
    } while (0)

/* ---- the model's shape ------------------------------------------------------ */

struct Arch {
    const char *name;
    int layers, dim, ffn, hq, hkv, d, vocab;
    float eps, theta;
};

const Arch kQwen3_8B = {"qwen3-8b", 36, 4096, 12288, 32, 8, 128, 151936, 1e-6f, 1000000.0f};

void fill_random(__nv_bfloat16 *p, size_t n, uint64_t seed, float scale, cudaStream_t st) {
    fill_random_kernel<<<1024, 256, 0, st>>>(p, n, seed, scale);
    LAUNCH("fill_random_kernel");
}

/* ---- weights ------------------------------------------------------------------ */

struct Layer {
    __nv_bfloat16 *attn_norm, *ffn_norm, *q_norm, *k_norm, *wqkv, *wo, *wgu, *wd;
};

struct Model {
    Arch a;
    __nv_bfloat16 *embed = nullptr, *out_norm = nullptr, *wout = nullptr;
    std::vector<Layer> layers;
    std::vector<void *> allocs;
    size_t bytes = 0;

    __nv_bfloat16 *alloc(size_t n) {
        void *p = nullptr;
        CU(cudaMalloc(&p, n * sizeof(__nv_bfloat16)));
        allocs.push_back(p);
        bytes += n * sizeof(__nv_bfloat16);
        return (__nv_bfloat16 *)p;
    }
    void init_random(const Arch &arch, cudaStream_t st) {
        a = arch;
        const int qkv = (a.hq + 2 * a.hkv) * a.d;
        embed = alloc((size_t)a.vocab * a.dim);
        fill_random(embed, (size_t)a.vocab * a.dim, 1, 1.0f, st);
        out_norm = alloc(a.dim);
        fill_const_kernel<<<64, 256, 0, st>>>(out_norm, a.dim, 1.0f);
        wout = alloc((size_t)a.vocab * a.dim);
        fill_random(wout, (size_t)a.vocab * a.dim, 2, 1.7f / sqrtf((float)a.dim), st);
        for (int l = 0; l < a.layers; l++) {
            Layer L;
            L.attn_norm = alloc(a.dim), L.ffn_norm = alloc(a.dim), L.q_norm = alloc(a.d), L.k_norm = alloc(a.d);
            for (__nv_bfloat16 *p : {L.attn_norm, L.ffn_norm}) fill_const_kernel<<<64, 256, 0, st>>>(p, a.dim, 1.0f);
            for (__nv_bfloat16 *p : {L.q_norm, L.k_norm}) fill_const_kernel<<<1, 256, 0, st>>>(p, a.d, 1.0f);
            L.wqkv = alloc((size_t)qkv * a.dim);
            L.wo = alloc((size_t)a.dim * a.hq * a.d);
            L.wgu = alloc((size_t)2 * a.ffn * a.dim);
            L.wd = alloc((size_t)a.dim * a.ffn);
            const uint64_t s = 100 + 10 * (uint64_t)l;
            fill_random(L.wqkv, (size_t)qkv * a.dim, s, 1.7f / sqrtf((float)a.dim), st);
            fill_random(L.wo, (size_t)a.dim * a.hq * a.d, s + 1, 1.7f / sqrtf((float)(a.hq * a.d)), st);
            fill_random(L.wgu, (size_t)2 * a.ffn * a.dim, s + 2, 1.7f / sqrtf((float)a.dim), st);
            fill_random(L.wd, (size_t)a.dim * a.ffn, s + 3, 1.7f / sqrtf((float)a.ffn), st);
            layers.push_back(L);
        }
        LAUNCH("weight init");
        CU(cudaStreamSynchronize(st));
    }
    ~Model() {
        for (void *p : allocs) cudaFree(p);
    }
};

/* ---- the KV caches: oscar (batch API) or the bf16 baseline -------------------- */

enum KvKind { KV_OSCAR, KV_BF16 };

struct Kv {
    KvKind kind;
    int bits = 2, B = 0, ctx = 0, max_len = 0, R = 0, stride = 0;
    oscar_cache *oc = nullptr;
    void *pool = nullptr, *ws = nullptr;
    size_t ws_bytes = 0;
    kvbf16_layout bl;
    int32_t *d_lens = nullptr, *d_tables = nullptr;
    size_t bytes = 0; /* KV memory, for the report */

    static size_t seq_bytes(KvKind kind, int bits, const Arch &a, int tokens, int R) {
        if (kind == KV_BF16) return (size_t)tokens * a.layers * a.hkv * a.d * 2 * 2;
        oscar_config c = oscar_config_default();
        c.bits = bits;
        double bpe = 0;
        oscar_config_packed_bits(&c, &bpe);
        return (size_t)((double)tokens * a.layers * a.hkv * a.d * 2 * bpe / 8.0) + (size_t)R * a.layers * a.hkv * a.d * 2 * 2;
    }

    void create(KvKind k, int bits_, const Arch &a, int B_, int ctx_, int steps) {
        kind = k, bits = bits_, B = B_, ctx = ctx_;
        max_len = ctx + steps + 1;
        R = kind == KV_OSCAR ? 128 : 64;
        stride = (max_len + R - 1) / R;
        const int blocks = B * stride;
        char err[512];
        if (kind == KV_OSCAR) {
            oscar_config c = oscar_config_default();
            c.method = OSCAR_METHOD_OSCAR;
            c.bits = bits;
            c.head_dim = a.d, c.num_kv_heads = a.hkv, c.num_q_heads = a.hq, c.num_layers = a.layers;
            c.residual = R;
            c.window_dtype = OSCAR_DTYPE_BF16;
            c.block_count = blocks;
            c.max_seqs = B;
            c.backend = OSCAR_BACKEND_CUDA;
            c.check_finite = 0; /* the benchmark's inputs are finite by construction */
            c.caller_metadata = 1;
            oscar_memory_requirements req;
            if (oscar_memory_requirements_get(&c, &req, err, sizeof err) != OSCAR_OK) throw Fail{err};
            bytes = req.pool_bytes + req.window_bytes + req.workspace_bytes;
            if (oscar_cache_create(&c, &oc, err, sizeof err) != OSCAR_OK) throw Fail{err};
        } else {
            bl.num_layers = a.layers, bl.num_kv_heads = a.hkv, bl.num_q_heads = a.hq, bl.head_dim = a.d;
            bl.block_tokens = R, bl.num_blocks = blocks;
            const size_t pb = kvbf16_pool_bytes(&bl);
            /* the workspace holds split partials in tiles; 2 x SMs of them
             * is what the kernel can use at any batch (kv_bf16.h) */
            int sms = 132;
            CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
            ws_bytes = kvbf16_workspace_bytes(&bl, 1, 2 * sms);
            CU(cudaMalloc(&pool, pb));
            CU(cudaMalloc(&ws, ws_bytes));
            bytes = pb + ws_bytes;
        }
        /* the engine's block manager: sequence i owns blocks i*stride .. */
        std::vector<int32_t> t((size_t)B * stride);
        for (size_t i = 0; i < t.size(); i++) t[i] = (int32_t)i;
        CU(cudaMalloc((void **)&d_lens, sizeof(int32_t) * B));
        CU(cudaMalloc((void **)&d_tables, sizeof(int32_t) * t.size()));
        CU(cudaMemcpy(d_tables, t.data(), sizeof(int32_t) * t.size(), cudaMemcpyHostToDevice));
    }
    void destroy() {
        if (oc) oscar_cache_destroy(oc);
        cudaFree(pool), cudaFree(ws), cudaFree(d_lens), cudaFree(d_tables);
        oc = nullptr, pool = ws = nullptr, d_lens = d_tables = nullptr;
    }
    oscar_batch batch(int n) const {
        oscar_batch b;
        memset(&b, 0, sizeof b);
        b.num_seqs = B, b.tokens_per_seq = n, b.max_seq_len = max_len, b.block_table_stride = stride;
        b.seq_lens = d_lens, b.window_slots = nullptr, b.block_tables = d_tables;
        return b;
    }
    void append(int layer, int n, const void *k, const void *v, const int32_t *d_slots, cudaStream_t st) {
        char err[512];
        if (kind == KV_OSCAR) {
            oscar_batch b = batch(n);
            b.window_slots = d_slots;
            OS(oc, oscar_batch_append(oc, layer, &b, k, v, OSCAR_DTYPE_BF16, st));
        } else if (kvbf16_append(pool, &bl, layer, B, n, d_lens, d_tables, stride, k, v, st, err, sizeof err)) {
            throw Fail{err};
        }
    }
    void attention(int layer, const void *q, void *out, const int32_t *d_slots, cudaStream_t st) {
        char err[512];
        if (kind == KV_OSCAR) {
            oscar_batch b = batch(1);
            b.window_slots = d_slots;
            OS(oc, oscar_batch_attention(oc, layer, &b, q, OSCAR_DTYPE_BF16, out, OSCAR_DTYPE_BF16, 0.0f, st));
        } else if (kvbf16_attention(pool, &bl, layer, B, 1, d_lens, d_tables, stride, max_len, q, out, 0.0f, ws,
                                    ws_bytes, st, err, sizeof err)) {
            throw Fail{err};
        }
    }
};

/* ---- one decode step ------------------------------------------------------------ */

struct Step {
    const Model *m;
    Kv *kv;
    cublasHandle_t blas;
    int B;
    int32_t *tokens, *slots;
    float *x;
    __nv_bfloat16 *h, *qkv, *q, *k, *v, *att, *tmp, *gu, *act, *logits;
    /* per-category events for the eager split (null when not timing) */
    cudaEvent_t *ev = nullptr;
    int nev = 0;
    std::vector<int> ev_cat;

    int ev_cap = 0;
    void mark(cudaStream_t st, int cat) {
        if (!ev) return;
        if (nev >= ev_cap) throw Fail{"internal: too few timing events"};
        CU(cudaEventRecord(ev[nev], st));
        ev_cat.push_back(cat);
        nev++;
    }
    /* Y[B][N] = X[B][K] . W[N][K]^T */
    void gemm(const __nv_bfloat16 *X, const __nv_bfloat16 *W, __nv_bfloat16 *Y, int N, int K) {
        const float one = 1.0f, zero = 0.0f;
        CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, B, K, &one, W, CUDA_R_16BF, K, X, CUDA_R_16BF, K, &zero, Y,
                        CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    enum { CAT_GEMM = 0, CAT_ATTN = 1, CAT_REST = 2 };

    void run(cudaStream_t st) {
        const Arch &a = m->a;
        mark(st, CAT_REST);
        advance_kernel<<<(B + 127) / 128, 128, 0, st>>>(kv->d_lens, B);
        embed_kernel<<<B, 256, 0, st>>>(tokens, m->embed, x, a.dim);
        add_rmsnorm_kernel<<<B, 512, 0, st>>>(x, nullptr, m->layers[0].attn_norm, h, a.dim, a.eps);
        LAUNCH("step prologue");
        for (int l = 0; l < a.layers; l++) {
            const Layer &L = m->layers[l];
            mark(st, CAT_GEMM);
            gemm(h, L.wqkv, qkv, (a.hq + 2 * a.hkv) * a.d, a.dim);
            mark(st, CAT_REST);
            qk_norm_rope_kernel<<<dim3(B, (a.hq + 2 * a.hkv + 7) / 8), 256, 0, st>>>(
                qkv, L.q_norm, L.k_norm, kv->d_lens, q, k, v, a.hq, a.hkv, a.d, a.eps, a.theta);
            LAUNCH("qk_norm_rope_kernel");
            mark(st, CAT_ATTN);
            kv->append(l, 1, k, v, slots, st);
            kv->attention(l, q, att, slots, st);
            mark(st, CAT_GEMM);
            gemm(att, L.wo, tmp, a.dim, a.hq * a.d);
            mark(st, CAT_REST);
            add_rmsnorm_kernel<<<B, 512, 0, st>>>(x, tmp, L.ffn_norm, h, a.dim, a.eps);
            mark(st, CAT_GEMM);
            gemm(h, L.wgu, gu, 2 * a.ffn, a.dim);
            mark(st, CAT_REST);
            swiglu_kernel<<<std::min(4096, (B * a.ffn + 255) / 256), 256, 0, st>>>(gu, act, a.ffn, B);
            mark(st, CAT_GEMM);
            gemm(act, L.wd, tmp, a.dim, a.ffn);
            mark(st, CAT_REST);
            const __nv_bfloat16 *next = l + 1 < a.layers ? m->layers[l + 1].attn_norm : m->out_norm;
            add_rmsnorm_kernel<<<B, 512, 0, st>>>(x, tmp, next, h, a.dim, a.eps);
            LAUNCH("layer kernels");
        }
        mark(st, CAT_GEMM);
        gemm(h, m->wout, logits, a.vocab, a.dim);
        mark(st, CAT_REST);
        argmax_kernel<<<B, 1024, 0, st>>>(logits, a.vocab, tokens);
        LAUNCH("argmax_kernel");
        mark(st, CAT_REST);
    }
};

/* ---- one benchmark case ---------------------------------------------------------- */

struct Result {
    std::string kv;
    int B = 0, ctx = 0;
    double ms = 0, tok_s = 0, gemm_ms = 0, attn_ms = 0, rest_ms = 0, kv_gib = 0;
    bool ok = false;
    std::string why;
};

double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
}

Result run_case(const Model &m, KvKind kind, int bits, int B, int ctx, int reps, cudaStream_t st, cublasHandle_t blas,
                void *blas_ws, size_t blas_ws_bytes) {
    Result r;
    r.kv = kind == KV_BF16 ? "bf16" : (bits == 2 ? "oscar-2" : "oscar-4");
    r.B = B, r.ctx = ctx;
    const Arch &a = m.a;
    Kv kv;
    std::vector<void *> bufs;
    auto dalloc = [&](size_t bytes) {
        void *p = nullptr;
        CU(cudaMalloc(&p, bytes));
        bufs.push_back(p);
        return p;
    };
    try {
        kv.create(kind, bits, a, B, ctx, reps + 8);
        r.kv_gib = (double)kv.bytes / (1u << 30);
        /* fill every sequence to ctx tokens with random K/V, in chunks */
        const int chunk = std::min(ctx, kind == KV_OSCAR ? 4096 : 4096);
        const size_t row = (size_t)a.hkv * a.d;
        __nv_bfloat16 *rk = (__nv_bfloat16 *)dalloc((size_t)B * chunk * row * 2);
        __nv_bfloat16 *rv = (__nv_bfloat16 *)dalloc((size_t)B * chunk * row * 2);
        fill_random(rk, (size_t)B * chunk * row, 7, 2.0f, st);
        fill_random(rv, (size_t)B * chunk * row, 8, 1.0f, st);
        int32_t *slots = (int32_t *)dalloc(sizeof(int32_t) * B);
        std::vector<int32_t> hs(B);
        for (int i = 0; i < B; i++) hs[i] = i;
        CU(cudaMemcpy(slots, hs.data(), sizeof(int32_t) * B, cudaMemcpyHostToDevice));
        for (int done = 0; done < ctx;) {
            const int n = std::min(chunk, ctx - done);
            std::vector<int32_t> lens(B, done + n);
            CU(cudaMemcpyAsync(kv.d_lens, lens.data(), sizeof(int32_t) * B, cudaMemcpyHostToDevice, st));
            for (int l = 0; l < a.layers; l++) kv.append(l, n, rk, rv, slots, st);
            CU(cudaStreamSynchronize(st));
            done += n;
        }
        if (kind == KV_OSCAR) OS(kv.oc, oscar_synchronize(kv.oc, st));
        /* step buffers */
        Step s;
        s.m = &m, s.kv = &kv, s.blas = blas, s.B = B, s.slots = slots;
        s.tokens = (int32_t *)dalloc(sizeof(int32_t) * B);
        std::vector<int32_t> t0(B);
        for (int i = 0; i < B; i++) t0[i] = (i * 7919) % a.vocab;
        CU(cudaMemcpy(s.tokens, t0.data(), sizeof(int32_t) * B, cudaMemcpyHostToDevice));
        s.x = (float *)dalloc(sizeof(float) * B * a.dim);
        const int qkvn = (a.hq + 2 * a.hkv) * a.d;
        s.h = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.dim);
        s.qkv = (__nv_bfloat16 *)dalloc(2 * (size_t)B * qkvn);
        s.q = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.hq * a.d);
        s.k = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.hkv * a.d);
        s.v = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.hkv * a.d);
        s.att = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.hq * a.d);
        s.tmp = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.dim);
        s.gu = (__nv_bfloat16 *)dalloc(2 * (size_t)B * 2 * a.ffn);
        s.act = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.ffn);
        s.logits = (__nv_bfloat16 *)dalloc(2 * (size_t)B * a.vocab);
        CB(cublasSetStream(blas, st));
        CB(cublasSetWorkspace(blas, blas_ws, blas_ws_bytes));
        /* one eager step, timed per category */
        std::vector<cudaEvent_t> ev(12 * a.layers + 16); /* 9 marks per layer */
        for (auto &e : ev) CU(cudaEventCreate(&e));
        s.ev = ev.data();
        s.ev_cap = (int)ev.size();
        s.run(st);
        CU(cudaStreamSynchronize(st));
        double cat[3] = {0, 0, 0};
        for (int i = 0; i + 1 < s.nev; i++) {
            float ms = 0;
            CU(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
            cat[s.ev_cat[i]] += ms;
        }
        r.gemm_ms = cat[0], r.attn_ms = cat[1], r.rest_ms = cat[2];
        s.ev = nullptr;
        for (auto &e : ev) cudaEventDestroy(e);
        /* the graph: captured once, replayed; lengths grow inside it */
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        try {
            s.run(st);
        } catch (...) {
            cudaGraph_t junk;
            cudaStreamEndCapture(st, &junk);
            throw;
        }
        CU(cudaStreamEndCapture(st, &g));
        CU(cudaGraphInstantiate(&ge, g, 0));
        for (int i = 0; i < 3; i++) CU(cudaGraphLaunch(ge, st));
        cudaEvent_t e0, e1;
        CU(cudaEventCreate(&e0));
        CU(cudaEventCreate(&e1));
        std::vector<float> times;
        for (int i = 0; i < reps; i++) {
            CU(cudaEventRecord(e0, st));
            CU(cudaGraphLaunch(ge, st));
            CU(cudaEventRecord(e1, st));
            CU(cudaEventSynchronize(e1));
            float ms = 0;
            CU(cudaEventElapsedTime(&ms, e0, e1));
            times.push_back(ms);
        }
        if (kind == KV_OSCAR) OS(kv.oc, oscar_synchronize(kv.oc, st));
        r.ms = median(times);
        r.tok_s = B * 1000.0 / r.ms;
        r.ok = true;
        cudaEventDestroy(e0), cudaEventDestroy(e1);
        cudaGraphExecDestroy(ge), cudaGraphDestroy(g);
    } catch (const Fail &f) {
        r.why = f.msg;
        cudaGetLastError();
    }
    cudaStreamSynchronize(st);
    for (void *p : bufs) cudaFree(p);
    kv.destroy();
    return r;
}

void usage(FILE *f) {
    fprintf(f,
            "usage: oscar bench-e2e --arch qwen3-8b --random [--kv oscar|bf16|all] [--bits 2|4]\n"
            "                        [--batch B,...] [--ctx N,...] [--steps N] [--budget] [--json FILE]\n"
            "Decode steps of a Qwen3-8B-shaped model with random bf16 weights on the GPU, every step one\n"
            "CUDA graph replay; the KV cache in oscar or in a paged bf16 cache. Prints median ms per step,\n"
            "tokens/s and the split GEMMs / attention / rest of one eager step. --budget adds, per context,\n"
            "the largest batch that fits in the GPU's free memory for each cache, and its tokens/s.\n"
            "Defaults: --kv all --batch 1,8,32 --ctx 4096,32768,131072 --steps 20.\n");
}

std::vector<int> parse_list(const char *s) {
    std::vector<int> v;
    while (*s) {
        char *e;
        long x = strtol(s, &e, 10);
        if (e == s || x <= 0) return {};
        if (*e == 'K' || *e == 'k') x *= 1024, e++;
        v.push_back((int)x);
        s = *e == ',' ? e + 1 : e;
        if (*e && *e != ',') return {};
    }
    return v;
}

} // namespace

extern "C" int oscar_cmd_bench_e2e(int argc, char **argv) {
    const char *arch = nullptr, *json = nullptr, *kvs = "all";
    int random = 0, steps = 20, budget = 0, bits_only = 0;
    std::vector<int> batches = {1, 8, 32}, ctxs = {4096, 32768, 131072};
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : nullptr;
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(o, "--random")) {
            random = 1;
        } else if (!strcmp(o, "--budget")) {
            budget = 1;
        } else if (!strcmp(o, "--arch") && val) {
            arch = val, i++;
        } else if (!strcmp(o, "--kv") && val) {
            kvs = val, i++;
        } else if (!strcmp(o, "--json") && val) {
            json = val, i++;
        } else if (!strcmp(o, "--bits") && val) {
            bits_only = atoi(val), i++;
        } else if (!strcmp(o, "--steps") && val) {
            steps = atoi(val), i++;
        } else if (!strcmp(o, "--batch") && val) {
            batches = parse_list(val), i++;
        } else if (!strcmp(o, "--ctx") && val) {
            ctxs = parse_list(val), i++;
        } else {
            fprintf(stderr, "bench-e2e: unknown or incomplete option '%s'\n", o);
            usage(stderr);
            return 2;
        }
    }
    if (!arch || strcmp(arch, "qwen3-8b") || !random) {
        fprintf(stderr, "bench-e2e: only --arch qwen3-8b --random is supported (random weights, no file)\n");
        return 2;
    }
    if (batches.empty() || ctxs.empty() || steps < 1 || (bits_only && bits_only != 2 && bits_only != 4) ||
        (strcmp(kvs, "all") && strcmp(kvs, "oscar") && strcmp(kvs, "bf16"))) {
        fprintf(stderr, "bench-e2e: bad --batch, --ctx, --steps, --bits or --kv\n");
        return 2;
    }
    if (!oscar_backend_available(OSCAR_BACKEND_CUDA)) {
        fprintf(stderr, "bench-e2e: needs a CUDA device (Hopper, sm_90a)\n");
        return 1;
    }
    struct Kind {
        KvKind k;
        int bits;
    };
    std::vector<Kind> kinds;
    if (strcmp(kvs, "bf16")) {
        if (bits_only != 4) kinds.push_back({KV_OSCAR, 2});
        if (bits_only != 2) kinds.push_back({KV_OSCAR, 4});
    }
    if (strcmp(kvs, "oscar")) kinds.push_back({KV_BF16, 16});
    std::vector<Result> results;
    FILE *jf = nullptr;
    try {
        cudaStream_t st;
        CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        cublasHandle_t blas;
        CB(cublasCreate(&blas));
        const size_t blas_ws_bytes = 64u << 20;
        void *blas_ws;
        CU(cudaMalloc(&blas_ws, blas_ws_bytes));
        cudaDeviceProp prop;
        CU(cudaGetDeviceProperties(&prop, 0));
        Model m;
        fprintf(stderr, "bench-e2e: %s random weights on %s ...\n", kQwen3_8B.name, prop.name);
        m.init_random(kQwen3_8B, st);
        fprintf(stderr, "bench-e2e: weights %.2f GiB\n", (double)m.bytes / (1u << 30));
        if (json) {
            jf = fopen(json, "w");
            if (!jf) throw Fail{std::string("cannot write ") + json};
        }
        auto report = [&](const Result &r, const char *tag) {
            if (r.ok)
                fprintf(stderr, "  %-8s B %4d ctx %6d: %8.3f ms/step %9.1f tok/s  (eager split: GEMM %.2f, attention %.2f, rest %.2f ms; KV %.1f GiB)\n",
                        r.kv.c_str(), r.B, r.ctx, r.ms, r.tok_s, r.gemm_ms, r.attn_ms, r.rest_ms, r.kv_gib);
            else
                fprintf(stderr, "  %-8s B %4d ctx %6d: skipped: %s\n", r.kv.c_str(), r.B, r.ctx, r.why.c_str());
            if (jf)
                fprintf(jf,
                        "{\"case\":\"%s\",\"kv\":\"%s\",\"B\":%d,\"ctx\":%d,\"ok\":%s,\"ms_per_step\":%.4f,\"tok_s\":%.2f,"
                        "\"gemm_ms\":%.4f,\"attn_ms\":%.4f,\"rest_ms\":%.4f,\"kv_gib\":%.3f,\"why\":\"%s\"}\n",
                        tag, r.kv.c_str(), r.B, r.ctx, r.ok ? "true" : "false", r.ms, r.tok_s, r.gemm_ms, r.attn_ms,
                        r.rest_ms, r.kv_gib, r.ok ? "" : "see stderr");
        };
        for (int ctx : ctxs)
            for (int B : batches)
                for (const Kind &k : kinds) {
                    size_t fr = 0, tot = 0;
                    cudaMemGetInfo(&fr, &tot);
                    const size_t need = (size_t)B * Kv::seq_bytes(k.k, k.bits, m.a, ctx + steps + 16, 128);
                    Result r;
                    if (need + (2ull << 30) > fr) {
                        r.kv = k.k == KV_BF16 ? "bf16" : (k.bits == 2 ? "oscar-2" : "oscar-4");
                        r.B = B, r.ctx = ctx;
                        r.why = "needs " + std::to_string(need >> 30) + " GiB of KV, " + std::to_string(fr >> 30) +
                                " GiB free";
                    } else {
                        r = run_case(m, k.k, k.bits, B, ctx, steps, st, blas, blas_ws, blas_ws_bytes);
                    }
                    report(r, "grid");
                    results.push_back(r);
                }
        if (budget)
            for (int ctx : ctxs)
                for (const Kind &k : kinds) {
                    size_t fr = 0, tot = 0;
                    cudaMemGetInfo(&fr, &tot);
                    const size_t per = Kv::seq_bytes(k.k, k.bits, m.a, ctx + steps + 16, 128);
                    /* leave room for activations, logits and cuBLAS */
                    const size_t spare = 4ull << 30;
                    int B = fr > spare ? (int)((fr - spare) / (per + per / 50)) : 0;
                    if (B > 1024) B = 1024;
                    Result r;
                    if (B < 1) {
                        r.kv = k.k == KV_BF16 ? "bf16" : (k.bits == 2 ? "oscar-2" : "oscar-4");
                        r.ctx = ctx, r.why = "not even one sequence fits";
                    } else {
                        r = run_case(m, k.k, k.bits, B, ctx, steps, st, blas, blas_ws, blas_ws_bytes);
                    }
                    report(r, "budget");
                    results.push_back(r);
                }
        cudaFree(blas_ws);
        cublasDestroy(blas);
        cudaStreamDestroy(st);
    } catch (const Fail &f) {
        fprintf(stderr, "bench-e2e: %s\n", f.msg.c_str());
        if (jf) fclose(jf);
        return 1;
    }
    if (jf) fclose(jf);
    /* the table, with oscar against bf16 at each (B, ctx) */
    printf("| KV cache | B | context | ms/step | tokens/s | vs bf16 | GEMM ms | attention ms | rest ms | KV GiB |\n");
    printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (const Result &r : results) {
        if (!r.ok) {
            printf("| %s | %d | %d | - | - | - | - | - | - | (%s) |\n", r.kv.c_str(), r.B, r.ctx, r.why.c_str());
            continue;
        }
        double base = 0;
        for (const Result &b : results)
            if (b.ok && b.kv == "bf16" && b.ctx == r.ctx && (b.B == r.B)) base = b.ms;
        char ratio[32] = "-";
        if (base > 0) snprintf(ratio, sizeof ratio, "%.2fx", base / r.ms);
        printf("| %s | %d | %d | %.3f | %.1f | %s | %.2f | %.2f | %.2f | %.1f |\n", r.kv.c_str(), r.B, r.ctx, r.ms,
               r.tok_s, ratio, r.gemm_ms, r.attn_ms, r.rest_ms, r.kv_gib);
    }
    return 0;
}
