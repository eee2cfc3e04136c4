/*
 * kernels.cuh - the small kernels of the GPU forward passes (model/gpu):
 * RMSNorm, RoPE, SwiGLU, residual add, argmax, embedding, random weights.
 * Each is the GPU twin of a few lines of the CPU forward pass in
 * model/llama.c; they are not tuned (the GEMMs and attention dominate).
 */
#ifndef OSCAR_MODEL_GPU_KERNELS_CUH
#define OSCAR_MODEL_GPU_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace gpu {
namespace { /* internal linkage: every .cu that includes this has its own copy */


__device__ __forceinline__ uint32_t hash32(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (uint32_t)x;
}

/* uniform(-scale, scale) from a hash of (seed, index): random weights */
__global__ void fill_random_kernel(__nv_bfloat16 *p, size_t n, uint64_t seed, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float u = (float)hash32(seed * 0x9e3779b97f4a7c15ull + i) * (1.0f / 4294967296.0f);
        p[i] = __float2bfloat16((2.0f * u - 1.0f) * scale);
    }
}

__global__ void fill_const_kernel(__nv_bfloat16 *p, size_t n, float v) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2bfloat16(v);
}

__global__ void embed_kernel(const int32_t *tokens, const __nv_bfloat16 *table, float *x, int dim) {
    const int b = blockIdx.x;
    const __nv_bfloat16 *row = table + (size_t)tokens[b] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) x[(size_t)b * dim + i] = __bfloat162float(row[i]);
}

__device__ float block_sum(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[w] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) s += red[i];
    __syncthreads();
    return s;
}

/* x += delta (if given); out = rmsnorm(x) * w. One CTA per row. */
__global__ void add_rmsnorm_kernel(float *x, const __nv_bfloat16 *delta, const __nv_bfloat16 *w,
                                   __nv_bfloat16 *out, int dim, float eps) {
    __shared__ float red[32];
    float *xr = x + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (delta) v += __bfloat162float(delta[(size_t)blockIdx.x * dim + i]), xr[i] = v;
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, red) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[(size_t)blockIdx.x * dim + i] = __float2bfloat16(xr[i] * inv * __bfloat162float(w[i]));
}

/* Qwen3: per-head RMSNorm of q and k, then RoPE (the halves convention of
 * Hugging Face), at position pos[b]; v copied out. One warp per head. */
__global__ void qk_norm_rope_kernel(const __nv_bfloat16 *qkv, const __nv_bfloat16 *qn, const __nv_bfloat16 *kn,
                                    const int32_t *seq_lens, __nv_bfloat16 *q, __nv_bfloat16 *k, __nv_bfloat16 *v,
                                    int hq, int hkv, int d, float eps, float theta) {
    const int b = blockIdx.x, head = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const int nh = hq + 2 * hkv;
    if (head >= nh) return;
    const __nv_bfloat16 *src = qkv + ((size_t)b * nh + head) * d;
    if (head >= hq + hkv) { /* v */
        __nv_bfloat16 *dst = v + ((size_t)b * hkv + (head - hq - hkv)) * d;
        for (int i = lane; i < d; i += 32) dst[i] = src[i];
        return;
    }
    const bool is_q = head < hq;
    const __nv_bfloat16 *w = is_q ? qn : kn;
    float x[8]; /* d <= 256: lane holds i = lane + 32 j */
    float ss = 0.0f;
    const int per = d / 32;
    for (int j = 0; j < per; j++) x[j] = __bfloat162float(src[lane + 32 * j]), ss += x[j] * x[j];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / d + eps);
    for (int j = 0; j < per; j++) x[j] = x[j] * inv * __bfloat162float(w[lane + 32 * j]);
    /* rotate pairs (i, i + d/2): lane's elements j < per/2 pair with j + per/2 */
    const float pos = (float)(seq_lens[b] - 1);
    for (int j = 0; j < per / 2; j++) {
        const int i = lane + 32 * j;
        const float freq = powf(theta, -2.0f * (float)i / (float)d);
        float sn, cs;
        sincosf(pos * freq, &sn, &cs);
        const float a = x[j], c = x[j + per / 2];
        x[j] = a * cs - c * sn;
        x[j + per / 2] = c * cs + a * sn;
    }
    __nv_bfloat16 *dst = is_q ? q + ((size_t)b * hq + head) * d : k + ((size_t)b * hkv + (head - hq)) * d;
    for (int j = 0; j < per; j++) dst[lane + 32 * j] = __float2bfloat16(x[j]);
}

/* act = silu(gate) * up, gate and up side by side in gu [B][2F] */
__global__ void swiglu_kernel(const __nv_bfloat16 *gu, __nv_bfloat16 *act, int F, int B) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)B * F; i += (size_t)gridDim.x * blockDim.x) {
        const size_t b = i / F, j = i - b * F;
        const float g = __bfloat162float(gu[b * 2 * F + j]), u = __bfloat162float(gu[b * 2 * F + F + j]);
        act[i] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

/* next token = argmax of the row (lowest index on ties). One CTA per row. */
__global__ void argmax_kernel(const __nv_bfloat16 *logits, int vocab, int32_t *tokens) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    const __nv_bfloat16 *row = logits + (size_t)blockIdx.x * vocab;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = __bfloat162float(row[i]);
        if (v > best) best = v, idx = i;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) best = ov, idx = oi;
    }
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) bv[w] = best, bi[w] = idx;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < (int)(blockDim.x >> 5); i++)
            if (bv[i] > best || (bv[i] == best && bi[i] < idx)) best = bv[i], idx = bi[i];
        tokens[blockIdx.x] = idx % vocab;
    }
}

/* the step's first kernel: every sequence grows by one token */
__global__ void advance_kernel(int32_t *seq_lens, int B) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < B) seq_lens[i] += 1;
}


} // namespace
} // namespace gpu

#endif
