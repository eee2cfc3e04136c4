/*
 * llama_gpu.cu - llama_forward (model/llama.c) on the GPU: the same steps,
 * one kernel or one cuBLAS call each, with the KV cache in oscar's CUDA
 * backend through the batch API (one sequence, window slot 0, blocks 0, 1,
 * 2, ... in order). See model/llama_gpu.h.
 *
 *   x = embed[tokens]
 *   for each layer:
 *     xb = rmsnorm(x) * attn_norm;  q|k|v = xb @ Wqkv^T
 *     [Qwen3: q, k = per-head rmsnorm(q) * q_norm, rmsnorm(k) * k_norm];  rope(q, k)
 *     oscar_batch_append(k, v);  att = oscar_batch_attention(q)
 *     x += att @ Wo^T
 *     xb = rmsnorm(x) * ffn_norm;  x += (silu(xb @ Wg^T) * (xb @ Wu^T)) @ Wd^T
 *   logits = (rmsnorm(x) * out_norm) @ Wout^T     (the last n_logits rows)
 *
 * Activations are fp32. Weights are bf16 (default: half the memory and
 * bytes per step) or fp32 (LLAMA_GPU_WEIGHTS_F32: the correctness twin of
 * the CPU runner, equal to float rounding); a bf16 GEMM rounds its fp32
 * input rows to bf16 first and accumulates in fp32.
 *
 * A decode call (one token, one logit row) is captured once as a CUDA graph
 * that also advances the sequence length; later decode calls replay it.
 */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>

#include "check.cuh"

extern "C" {
#include "gguf.h"
#include "llama_gpu.h"
}

namespace {


/* ---- the CPU runner's small steps, on the GPU ------------------------------ */

/* rmsnorm (llama.c): double sum of squares, s = 1/sqrt(ss/dim + eps) */
__global__ void rmsnorm_kernel(const float *x, const float *w, float *out, int dim, float eps) {
    __shared__ double red[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    double ss = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) t += red[i];
        red[0] = t;
    }
    __syncthreads();
    const float s = (float)(1.0 / sqrt(red[0] / dim + eps));
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(size_t)blockIdx.x * dim + i] = xr[i] * s * w[i];
}

/* The qkv GEMM's rows [T][q | k | v] into q [T][Hq][d], k, v [T][Hkv][d].
 * Qwen3 first RMS-normalises each q and k head (qn, kn: weights [d], as
 * llama.c's rmsnorm: double sum, s = 1/sqrt(ss/d + eps), x * s * w). Then
 * RoPE at position len - T + t (len = the sequence length after this call)
 * on the pairs (c, c ^ 1) (Llama GGUFs) or (c, c + rope_half) (neox, Qwen3),
 * for c < 2 * rope_half. One warp per head; the row goes through shared
 * memory so that a lane can read its RoPE partner. */
constexpr int SPLIT_WARPS = 8, SPLIT_MAX_D = 256;
__global__ void __launch_bounds__(SPLIT_WARPS * 32)
    split_norm_rope_kernel(const float *qkv, const int32_t *len, const double *freq, int rope_half, int neox,
                           const float *qn, const float *kn, float eps, int T, int hq, int hkv, int d, float *q,
                           float *k, float *v) {
    __shared__ float row[SPLIT_WARPS][SPLIT_MAX_D];
    const int t = blockIdx.x, nh = hq + 2 * hkv;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const double pos = (double)(len[0] - T + t);
    for (int head = blockIdx.y * SPLIT_WARPS + w; head < nh; head += gridDim.y * SPLIT_WARPS) {
        const float *src = qkv + ((size_t)t * nh + head) * d;
        const bool is_q = head < hq, is_k = !is_q && head < hq + hkv;
        float *r = row[w];
        for (int c = lane; c < d; c += 32) r[c] = src[c];
        __syncwarp();
        if (qn && (is_q || is_k)) {
            double ss = 0.0;
            for (int c = lane; c < d; c += 32) ss += (double)r[c] * r[c];
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            const float s = (float)(1.0 / sqrt(ss / d + eps));
            const float *wn = is_q ? qn : kn;
            __syncwarp();
            for (int c = lane; c < d; c += 32) r[c] = r[c] * s * wn[c];
            __syncwarp();
        }
        float *dst = is_q ? q + ((size_t)t * hq + head) * d
                          : is_k ? k + ((size_t)t * hkv + head - hq) * d : v + ((size_t)t * hkv + head - hq - hkv) * d;
        for (int c = lane; c < d; c += 32) {
            float y = r[c];
            if ((is_q || is_k) && c < 2 * rope_half) {
                /* i: the frequency index; first: c is the pair's first element */
                const int i = neox ? (c < rope_half ? c : c - rope_half) : (c >> 1);
                const bool first = neox ? c < rope_half : (c & 1) == 0;
                const int other = neox ? (first ? c + rope_half : c - rope_half) : (c ^ 1);
                const double a = pos * freq[i];
                const float cs = (float)cos(a), sn = (float)sin(a);
                y = first ? r[c] * cs - r[other] * sn : r[other] * sn + r[c] * cs;
            }
            dst[c] = y;
        }
        __syncwarp();
    }
}

__global__ void add_kernel(float *x, const float *y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

/* hb = silu(gate) * up; gate and up side by side in gu [T][2F] */
__global__ void swiglu_f32_kernel(const float *gu, float *hb, int F, int T) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)T * F; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / F, j = i - t * F;
        const float g = gu[t * 2 * F + j];
        hb[i] = g / (1.0f + expf(-g)) * gu[t * 2 * F + F + j];
    }
}

__global__ void embed_f32_kernel(const int32_t *tokens, const float *table, float *x, int dim) {
    const float *row = table + (size_t)tokens[blockIdx.x] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) x[(size_t)blockIdx.x * dim + i] = row[i];
}

__global__ void advance_one_kernel(int32_t *len) { len[0] += 1; }

__global__ void to_bf16_kernel(const float *x, __nv_bfloat16 *y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}

} // namespace

struct llama_gpu {
    const llama_model *m;
    oscar_cache *oc = nullptr;
    cublasHandle_t blas = nullptr;
    cudaStream_t st = nullptr;
    std::vector<void *> allocs;
    bool bf16 = true; /* weight matrices as bf16 (else fp32) */
    float *embed = nullptr, *out_norm = nullptr;
    void *wout = nullptr;
    struct Layer {
        float *attn_norm, *ffn_norm, *q_norm, *k_norm;
        void *wqkv, *wo, *wgu, *wd; /* bf16 or fp32 [rows][cols] */
    };
    std::vector<Layer> layers;
    double *freq = nullptr;
    int32_t *d_len = nullptr, *d_tokens = nullptr, *d_slot = nullptr, *d_table = nullptr, *h_io = nullptr;
    int stride = 0, max_len = 0;
    int64_t len = 0;
    int cap_rows = 0;
    float *x = nullptr, *xb = nullptr, *qkv = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr,
          *xo = nullptr, *gu = nullptr, *hb = nullptr, *logits = nullptr;
    void *blas_ws = nullptr;
    __nv_bfloat16 *x16 = nullptr; /* a bf16 GEMM's input rows */
    cudaGraphExec_t decode = nullptr;

    template <class T> T *alloc(size_t n) {
        void *p = nullptr;
        CU(cudaMalloc(&p, n * sizeof(T)));
        allocs.push_back(p);
        return (T *)p;
    }
    /* a GGUF matrix dequantised to fp32 rows, appended to dst at row r0 */
    static void dequant(const qmat *w, std::vector<float> &dst, int64_t r0) {
        if ((int64_t)dst.size() < (r0 + w->rows) * w->cols) dst.resize((size_t)((r0 + w->rows) * w->cols));
        for (int64_t r = 0; r < w->rows; r++) {
            float *o = dst.data() + (size_t)((r0 + r) * w->cols);
            if (w->owned)
                memcpy(o, w->owned + r * w->cols, sizeof(float) * w->cols);
            else
                ggml_dequantize_row(w->type, (const uint8_t *)w->data + (size_t)r * w->row_bytes, o, w->cols);
        }
    }
    float *upload(const std::vector<float> &h) {
        float *d = alloc<float>(h.size());
        CU(cudaMemcpy(d, h.data(), sizeof(float) * h.size(), cudaMemcpyHostToDevice));
        return d;
    }
    float *upload_mats_f32(std::initializer_list<const qmat *> ws) {
        std::vector<float> h;
        int64_t r = 0;
        for (const qmat *w : ws) dequant(w, h, r), r += w->rows;
        return upload(h);
    }
    /* the matrices stacked by rows, as the runner's weight dtype */
    void *upload_mats(std::initializer_list<const qmat *> ws) {
        std::vector<float> h;
        int64_t r = 0;
        for (const qmat *w : ws) dequant(w, h, r), r += w->rows;
        if (!bf16) return upload(h);
        std::vector<__nv_bfloat16> b(h.size());
        for (size_t i = 0; i < h.size(); i++) b[i] = __float2bfloat16_rn(h[i]);
        __nv_bfloat16 *d = alloc<__nv_bfloat16>(b.size());
        CU(cudaMemcpy(d, b.data(), sizeof(__nv_bfloat16) * b.size(), cudaMemcpyHostToDevice));
        return d;
    }
    float *upload_vec(const float *p, int n) { return upload(std::vector<float>(p, p + n)); }

    void buffers(int T) {
        if (T <= cap_rows) return;
        if (cap_rows) throw Fail{"internal: the chunk size grew after the first call"};
        const int dim = m->dim, hd = m->head_dim, nh = m->n_heads + 2 * m->n_kv_heads;
        x = alloc<float>((size_t)T * dim), xb = alloc<float>((size_t)T * dim), xo = alloc<float>((size_t)T * dim);
        qkv = alloc<float>((size_t)T * nh * hd), q = alloc<float>((size_t)T * m->n_heads * hd);
        k = alloc<float>((size_t)T * m->n_kv_heads * hd), v = alloc<float>((size_t)T * m->n_kv_heads * hd);
        att = alloc<float>((size_t)T * m->n_heads * hd);
        gu = alloc<float>((size_t)T * 2 * m->ffn_dim), hb = alloc<float>((size_t)T * m->ffn_dim);
        logits = alloc<float>((size_t)T * m->vocab);
        d_tokens = alloc<int32_t>(T);
        if (bf16) {
            size_t widest = (size_t)dim;
            if ((size_t)m->n_heads * hd > widest) widest = (size_t)m->n_heads * hd;
            if ((size_t)m->ffn_dim > widest) widest = (size_t)m->ffn_dim;
            x16 = alloc<__nv_bfloat16>((size_t)T * widest);
        }
        cap_rows = T;
    }
    /* Y[T][N] = X[T][K] @ W[N][K]^T, fp32 accumulation */
    void gemm(const float *X, const void *W, float *Y, int N, int K, int T) {
        const float one = 1.0f, zero = 0.0f;
        if (!bf16) {
            CB(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, (const float *)W, K, X, K, &zero, Y, N));
            return;
        }
        to_bf16_kernel<<<256, 256, 0, st>>>(X, x16, (size_t)T * K);
        LAUNCH("to_bf16");
        CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W, CUDA_R_16BF, K, x16, CUDA_R_16BF, K, &zero,
                        Y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    void check(oscar_status s, const char *what) {
        if (s != OSCAR_OK) throw Fail{std::string(what) + ": " + oscar_status_name(s) + ": " + oscar_last_error(oc)};
    }

    /* the forward pass of T tokens whose ids are in d_tokens, d_len already
     * the length after them; logits of the last n_logits rows in `logits` */
    void run(int T, int n_logits, llama_key_hook hook, void *ud, int64_t pos0) {
        const int dim = m->dim, hd = m->head_dim, hq = m->n_heads, hkv = m->n_kv_heads;
        oscar_batch b;
        memset(&b, 0, sizeof b);
        b.num_seqs = 1, b.tokens_per_seq = T, b.max_seq_len = max_len, b.block_table_stride = stride;
        b.seq_lens = d_len, b.window_slots = d_slot, b.block_tables = d_table;
        embed_f32_kernel<<<T, 256, 0, st>>>(d_tokens, embed, x, dim);
        LAUNCH("embed");
        for (int l = 0; l < m->n_layers; l++) {
            const Layer &L = layers[l];
            rmsnorm_kernel<<<T, 256, 0, st>>>(x, L.attn_norm, xb, dim, m->eps);
            gemm(xb, L.wqkv, qkv, (hq + 2 * hkv) * hd, dim, T);
            split_norm_rope_kernel<<<dim3(T, 1), SPLIT_WARPS * 32, 0, st>>>(qkv, d_len, freq, m->rope_dim / 2,
                                                                         m->rope_neox, L.q_norm, L.k_norm, m->eps,
                                                                         T, hq, hkv, hd, q, k, v);
            LAUNCH("rmsnorm / rope");
            if (hook) {
                std::vector<float> hk((size_t)T * hkv * hd);
                CU(cudaMemcpyAsync(hk.data(), k, sizeof(float) * hk.size(), cudaMemcpyDeviceToHost, st));
                CU(cudaStreamSynchronize(st));
                hook(ud, l, pos0, T, hk.data());
            }
            check(oscar_batch_append(oc, l, &b, k, v, OSCAR_DTYPE_F32, st), "oscar_batch_append");
            check(oscar_batch_attention(oc, l, &b, q, OSCAR_DTYPE_F32, att, OSCAR_DTYPE_F32, 0.0f, st),
                  "oscar_batch_attention");
            gemm(att, L.wo, xo, dim, hq * hd, T);
            add_kernel<<<256, 256, 0, st>>>(x, xo, (size_t)T * dim);
            rmsnorm_kernel<<<T, 256, 0, st>>>(x, L.ffn_norm, xb, dim, m->eps);
            gemm(xb, L.wgu, gu, 2 * m->ffn_dim, dim, T);
            swiglu_f32_kernel<<<256, 256, 0, st>>>(gu, hb, m->ffn_dim, T);
            gemm(hb, L.wd, xo, dim, m->ffn_dim, T);
            add_kernel<<<256, 256, 0, st>>>(x, xo, (size_t)T * dim);
            LAUNCH("layer");
        }
        if (n_logits > 0) {
            rmsnorm_kernel<<<n_logits, 256, 0, st>>>(x + (size_t)(T - n_logits) * dim, out_norm, xb, dim, m->eps);
            LAUNCH("output rmsnorm");
            gemm(xb, wout, logits, m->vocab, dim, n_logits);
        }
    }

    ~llama_gpu() {
        if (decode) cudaGraphExecDestroy(decode);
        if (oc) oscar_cache_destroy(oc);
        for (void *p : allocs) cudaFree(p);
        if (h_io) cudaFreeHost(h_io);
        if (blas) cublasDestroy(blas);
        if (st) cudaStreamDestroy(st);
    }
};

extern "C" int llama_gpu_available(void) { return oscar_backend_available(OSCAR_BACKEND_CUDA); }

extern "C" llama_gpu *llama_gpu_create(const llama_model *m, const oscar_config *cfg_in, int64_t max_tokens,
                                       llama_gpu_weights weights, char *err, size_t n) {
    llama_gpu *g = new (std::nothrow) llama_gpu();
    if (!g) {
        snprintf(err, n, "out of host memory");
        return nullptr;
    }
    g->m = m;
    g->bf16 = weights != LLAMA_GPU_WEIGHTS_F32;
    try {
        if (m->head_dim > SPLIT_MAX_D) throw Fail{"head_dim " + std::to_string(m->head_dim) + " > 256"};
        if (!oscar_backend_available(OSCAR_BACKEND_CUDA)) throw Fail{"no usable CUDA device (Hopper, sm_90a)"};
        CU(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking));
        CB(cublasCreate(&g->blas));
        CB(cublasSetStream(g->blas, g->st));
        CB(cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH)); /* fp32 GEMMs: no TF32 */
        g->blas_ws = g->alloc<uint8_t>(32u << 20);
        CB(cublasSetWorkspace(g->blas, g->blas_ws, 32u << 20));
        /* weights */
        g->embed = g->upload_mats_f32({&m->embed}); /* rows are copied, not multiplied */
        g->wout = g->upload_mats({&m->output});
        g->out_norm = g->upload_vec(m->out_norm, m->dim);
        for (int l = 0; l < m->n_layers; l++) {
            const llama_layer *L = &m->layers[l];
            llama_gpu::Layer G;
            G.attn_norm = g->upload_vec(L->attn_norm, m->dim);
            G.ffn_norm = g->upload_vec(L->ffn_norm, m->dim);
            G.q_norm = L->q_norm ? g->upload_vec(L->q_norm, m->head_dim) : nullptr;
            G.k_norm = L->k_norm ? g->upload_vec(L->k_norm, m->head_dim) : nullptr;
            G.wqkv = g->upload_mats({&L->wq, &L->wk, &L->wv});
            G.wo = g->upload_mats({&L->wo});
            G.wgu = g->upload_mats({&L->wgate, &L->wup});
            G.wd = g->upload_mats({&L->wdown});
            g->layers.push_back(G);
        }
        g->freq = g->alloc<double>(m->rope_dim / 2 > 0 ? m->rope_dim / 2 : 1);
        CU(cudaMemcpy(g->freq, m->rope_freq, sizeof(double) * (m->rope_dim / 2), cudaMemcpyHostToDevice));
        /* the cache: the runner's config, on the GPU, driven by the batch API */
        oscar_config c = *cfg_in;
        c.backend = OSCAR_BACKEND_CUDA;
        c.caller_metadata = 1;
        c.max_seqs = 1;
        g->max_len = (int)max_tokens;
        g->stride = (int)(max_tokens / c.residual + 1);
        c.block_count = g->stride;
        char e[512];
        if (oscar_cache_create(&c, &g->oc, e, sizeof e) != OSCAR_OK) throw Fail{std::string("oscar cache: ") + e};
        g->d_len = g->alloc<int32_t>(1);
        g->d_slot = g->alloc<int32_t>(1);
        g->d_table = g->alloc<int32_t>(g->stride);
        std::vector<int32_t> t(g->stride);
        for (int i = 0; i < g->stride; i++) t[i] = i;
        CU(cudaMemcpy(g->d_table, t.data(), sizeof(int32_t) * t.size(), cudaMemcpyHostToDevice));
        CU(cudaMemset(g->d_slot, 0, sizeof(int32_t)));
        CU(cudaMemset(g->d_len, 0, sizeof(int32_t)));
        CU(cudaHostAlloc((void **)&g->h_io, sizeof(int32_t) * 2, cudaHostAllocDefault));
        CU(cudaDeviceSynchronize());
    } catch (const Fail &f) {
        snprintf(err, n, "GPU runner: %s", f.msg.c_str());
        delete g;
        return nullptr;
    }
    return g;
}

extern "C" int llama_gpu_forward(llama_gpu *g, const int32_t *tokens, int T, int n_logits, float *logits,
                                 llama_key_hook hook, void *ud, char *err, size_t n) {
    const llama_model *m = g->m;
    try {
        if (T <= 0 || n_logits < 0 || n_logits > T) throw Fail{"internal: bad chunk"};
        if (T > OSCAR_MAX_Q_LEN) throw Fail{"a chunk of more than 4096 tokens"};
        if (g->len + T > g->max_len)
            throw Fail{"context full: " + std::to_string(g->len) + " + " + std::to_string(T) + " tokens exceed " +
                       std::to_string(g->max_len)};
        for (int t = 0; t < T; t++)
            if (tokens[t] < 0 || tokens[t] >= m->vocab)
                throw Fail{"token id " + std::to_string(tokens[t]) + " is outside the vocabulary"};
        g->buffers(T);
        const bool graph = T == 1 && n_logits == 1 && !hook;
        if (graph) {
            /* the token, then the captured step (which advances the length) */
            g->h_io[0] = tokens[0];
            CU(cudaMemcpyAsync(g->d_tokens, g->h_io, sizeof(int32_t), cudaMemcpyHostToDevice, g->st));
            g->h_io[1] = (int32_t)g->len;
            CU(cudaMemcpyAsync(g->d_len, g->h_io + 1, sizeof(int32_t), cudaMemcpyHostToDevice, g->st));
            if (!g->decode) {
                cudaGraph_t gr;
                CU(cudaStreamBeginCapture(g->st, cudaStreamCaptureModeThreadLocal));
                try {
                    advance_one_kernel<<<1, 1, 0, g->st>>>(g->d_len);
                    g->run(1, 1, nullptr, nullptr, 0);
                } catch (...) {
                    cudaGraph_t junk;
                    cudaStreamEndCapture(g->st, &junk);
                    throw;
                }
                CU(cudaStreamEndCapture(g->st, &gr));
                CU(cudaGraphInstantiate(&g->decode, gr, 0));
                cudaGraphDestroy(gr);
            }
            CU(cudaGraphLaunch(g->decode, g->st));
        } else {
            std::vector<int32_t> ids(tokens, tokens + T);
            CU(cudaMemcpyAsync(g->d_tokens, ids.data(), sizeof(int32_t) * T, cudaMemcpyHostToDevice, g->st));
            g->h_io[1] = (int32_t)(g->len + T);
            CU(cudaMemcpyAsync(g->d_len, g->h_io + 1, sizeof(int32_t), cudaMemcpyHostToDevice, g->st));
            g->run(T, n_logits, hook, ud, g->len);
        }
        if (n_logits > 0)
            CU(cudaMemcpyAsync(logits, g->logits, sizeof(float) * (size_t)n_logits * m->vocab, cudaMemcpyDeviceToHost,
                               g->st));
        CU(cudaStreamSynchronize(g->st));
        oscar_status s = oscar_poll(g->oc);
        if (s != OSCAR_OK) throw Fail{std::string("oscar: ") + oscar_status_name(s) + ": " + oscar_last_error(g->oc)};
        g->len += T;
    } catch (const Fail &f) {
        snprintf(err, n, "GPU runner: %s", f.msg.c_str());
        return -1;
    }
    return 0;
}

extern "C" int64_t llama_gpu_len(const llama_gpu *g) { return g->len; }

extern "C" oscar_cache *llama_gpu_cache(const llama_gpu *g) { return g->oc; }

extern "C" void llama_gpu_reset(llama_gpu *g) { g->len = 0; /* the next append restarts slot 0 */ }

extern "C" void llama_gpu_free(llama_gpu *g) { delete g; }
