/* Append kernels of the CUDA backend (docs/FORMAT.md, "What is stored"):
 *   1. token norms of the flushed tokens (omni-token scaling, all KV heads);
 *   2. pack: per (block, head, key group) rotate, round to the window dtype,
 *      divide by the norm, per-channel key and per-token value parameters,
 *      codes in the mma tile layout;
 *   3. window: the tokens left over, rotated and rounded, into the window.
 * All three read the same token source: stream index i of a sequence is
 * window row i for i < window_before, else input row input_row + i - wb. */
#include "common.cuh"

namespace {

struct AppendArgs {
    uint8_t *pool_layer;
    uint8_t *win_layer;
    int32_t *tables;
    const void *k;
    const void *v;
    const PackTask *tasks;
    const WinTask *wtasks;
    long long LB, head_bytes, codes_bytes, kparams_bytes, wlb;
    int max_blocks;
    int in_dtype, w_dtype, w_esize;
    int R, Gk, Gv, hkv, levels, rotate, rotate_v, scale_keys;
};

/* E contiguous elements starting at element idx, converted to fp32. */
template <int E>
__device__ __forceinline__ void ld_row(const void *base, int dtype, size_t idx, float (&x)[E]) {
    if (dtype == OSCAR_DTYPE_F32) {
        const float *p = (const float *)base + idx;
        if constexpr (E == 2) {
            float2 a = *(const float2 *)p;
            x[0] = a.x, x[1] = a.y;
        } else {
#pragma unroll
            for (int i = 0; i < E; i += 4) {
                float4 a = *(const float4 *)(p + i);
                x[i] = a.x, x[i + 1] = a.y, x[i + 2] = a.z, x[i + 3] = a.w;
            }
        }
        return;
    }
    const unsigned short *p = (const unsigned short *)base + idx;
    unsigned int w[E / 2];
    if constexpr (E == 2) {
        w[0] = *(const unsigned int *)p;
    } else if constexpr (E == 4) {
        uint2 a = *(const uint2 *)p;
        w[0] = a.x, w[1] = a.y;
    } else {
#pragma unroll
        for (int i = 0; i < E / 2; i += 4) {
            uint4 a = *(const uint4 *)(p + 2 * i);
            w[i] = a.x, w[i + 1] = a.y, w[i + 2] = a.z, w[i + 3] = a.w;
        }
    }
#pragma unroll
    for (int i = 0; i < E / 2; i++) {
        unsigned short lo = (unsigned short)(w[i] & 0xffffu), hi = (unsigned short)(w[i] >> 16);
        if (dtype == OSCAR_DTYPE_BF16) {
            x[2 * i] = __uint_as_float((unsigned)lo << 16);
            x[2 * i + 1] = __uint_as_float((unsigned)hi << 16);
        } else {
            x[2 * i] = __half2float(__ushort_as_half(lo));
            x[2 * i + 1] = __half2float(__ushort_as_half(hi));
        }
    }
}

template <int E>
__device__ __forceinline__ void st_row(void *base, int dtype, size_t idx, const float (&x)[E]) {
    if (dtype == OSCAR_DTYPE_F32) {
#pragma unroll
        for (int i = 0; i < E; i++) ((float *)base)[idx + i] = x[i];
        return;
    }
    unsigned int w[E / 2];
#pragma unroll
    for (int i = 0; i < E / 2; i++) {
        unsigned short a, b;
        if (dtype == OSCAR_DTYPE_BF16) {
            a = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i]));
            b = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i + 1]));
        } else {
            a = oscar_f16_bits(x[2 * i]);
            b = oscar_f16_bits(x[2 * i + 1]);
        }
        w[i] = (unsigned)a | ((unsigned)b << 16);
    }
    unsigned short *p = (unsigned short *)base + idx;
    if constexpr (E == 2) {
        *(unsigned int *)p = w[0];
    } else if constexpr (E == 4) {
        *(uint2 *)p = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
        for (int i = 0; i < E / 2; i += 4) *(uint4 *)(p + 2 * i) = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
    }
}

/* Rotated (if the method says so) and window-rounded values of input row
 * `row`, head h, for this lane's E channels. */
template <int D>
__device__ __forceinline__ void input_row(const AppendArgs &A, bool is_v, int64_t row, int h, int lane,
                                          float (&x)[D / 32]) {
    constexpr int E = D / 32;
    ld_row<E>(is_v ? A.v : A.k, A.in_dtype, ((size_t)row * A.hkv + h) * D + (size_t)lane * E, x);
    if (is_v ? A.rotate_v : A.rotate) oscar_warp_fwht<D>(x, lane);
#pragma unroll
    for (int i = 0; i < E; i++) x[i] = oscar_round_to(x[i], A.w_dtype);
}

/* stream_row in two halves, so that a warp can issue several rows' loads
 * before the first transform: the raw load, then rotation + rounding (only
 * for rows that came from the input). */
template <int D>
__device__ __forceinline__ void stream_load(const AppendArgs &A, const PackTask &T, bool is_v, int sidx, int h,
                                            int lane, float (&x)[D / 32]) {
    constexpr int E = D / 32;
    if (sidx < T.window_before) {
        const uint8_t *base = A.win_layer + (size_t)T.slot * A.wlb + (is_v ? A.wlb / 2 : 0);
        ld_row<E>(base, A.w_dtype, ((size_t)sidx * A.hkv + h) * D + (size_t)lane * E, x);
    } else {
        const int64_t row = T.input_row + (sidx - T.window_before);
        ld_row<E>(is_v ? A.v : A.k, A.in_dtype, ((size_t)row * A.hkv + h) * D + (size_t)lane * E, x);
    }
}

template <int D>
__device__ __forceinline__ void stream_finish(const AppendArgs &A, const PackTask &T, bool is_v, int sidx, int lane,
                                              float (&x)[D / 32]) {
    if (sidx < T.window_before) return;
    if (is_v ? A.rotate_v : A.rotate) oscar_warp_fwht<D>(x, lane);
#pragma unroll
    for (int i = 0; i < D / 32; i++) x[i] = oscar_round_to(x[i], A.w_dtype);
}

template <int D>
__device__ __forceinline__ void stream_row(const AppendArgs &A, const PackTask &T, bool is_v, int sidx, int h,
                                           int lane, float (&x)[D / 32]) {
    constexpr int E = D / 32;
    if (sidx < T.window_before) {
        const uint8_t *base = A.win_layer + (size_t)T.slot * A.wlb + (is_v ? A.wlb / 2 : 0);
        ld_row<E>(base, A.w_dtype, ((size_t)sidx * A.hkv + h) * D + (size_t)lane * E, x);
    } else {
        input_row<D>(A, is_v, T.input_row + (sidx - T.window_before), h, lane, x);
    }
}

/* 1. Token norms. The sum runs in the CPU's order (heads, then channels,
 * sequentially, product and sum each rounded to fp32) so that both backends
 * store the same bits: lane j < NORM_TPW of a warp sums token j from a
 * shared-memory copy of each head's rotated, rounded row; the warp computes
 * those rows (FWHT across lanes) one after the other. */
constexpr int NORM_WARPS = 4, NORM_TPW = 8;
template <int D>
__global__ void __launch_bounds__(32 * NORM_WARPS) norm_kernel(AppendArgs A) {
    extern __shared__ float nsm[];
    const PackTask T = A.tasks[blockIdx.x];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    constexpr int E = D / 32, LD = D + 1;
    float *xs = nsm + (size_t)w * NORM_TPW * LD;
    const int t0 = (blockIdx.y * NORM_WARPS + w) * NORM_TPW;
    if (t0 >= A.R) return;
    const int n = min(NORM_TPW, A.R - t0);
    float ss = 0.0f;
    for (int h = 0; h < A.hkv; h++) {
        float x[NORM_TPW][E];
#pragma unroll
        for (int j = 0; j < NORM_TPW; j++)
            if (j < n) stream_load<D>(A, T, false, T.stream0 + t0 + j, h, lane, x[j]);
#pragma unroll
        for (int j = 0; j < NORM_TPW; j++) {
            if (j < n) {
                stream_finish<D>(A, T, false, T.stream0 + t0 + j, lane, x[j]);
#pragma unroll
                for (int i = 0; i < E; i++) xs[j * LD + lane * E + i] = x[j][i];
            }
        }
        __syncwarp();
        if (lane < n) {
            const float *row = xs + lane * LD;
            for (int c = 0; c < D; c++) ss = __fadd_rn(ss, __fmul_rn(row[c], row[c]));
        }
        __syncwarp();
    }
    if (lane < n) {
        float sn = sqrtf(ss);
        if (!(sn > 0.0f) || isinf(sn)) sn = 1.0f;
        float *norms = (float *)(A.pool_layer + (size_t)T.block * A.LB + (size_t)A.hkv * A.head_bytes);
        norms[t0 + lane] = sn;
    }
}

/* code = sc > 0 ? clamp(rint((x - l0) / sc), 0, Q) : 0 with the division in
 * fp32 round-to-nearest (FORMAT.md step 7). y = (x - l0) * RN(1/sc) is
 * within 2^-22 relative of the exact quotient, so rint(y) is the same
 * unless y lies within 2^-17 of a half-integer; only then is the exact
 * division done. */
__device__ __forceinline__ uint32_t quant_code(float x, float sc, float inv, float l0, int levels) {
    if (!(sc > 0.0f)) return 0u;
    const float d = __fsub_rn(x, l0);
    float y = __fmul_rn(d, inv);
    float r = rintf(y);
    if (fabsf(__fsub_rn(y, r)) > 0.49998f) r = rintf(__fdiv_rn(d, sc));
    if (!(r >= 0.0f)) return 0u;
    if (r > (float)levels) return (uint32_t)levels;
    return (uint32_t)r;
}

/* 2. Pack one key group (Gk tokens) of one head of one block. */
template <int D, int BITS>
__global__ void __launch_bounds__(256) pack_kernel(AppendArgs A) {
    extern __shared__ float sm[];
    const PackTask T = A.tasks[blockIdx.x];
    const int h = blockIdx.y, gi = blockIdx.z;
    const int Gk = A.Gk, Gv = A.Gv, NG = D / Gv, Q = A.levels;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    constexpr int E = D / 32;
    constexpr int LD = D + 1;             /* padded rows: no bank conflicts */
    float *Ks = sm;                       /* [Gk][LD] */
    float *Vs = Ks + (size_t)Gk * LD;     /* [Gk][LD] */
    float *ksc = Vs + (size_t)Gk * LD;    /* [D] */
    float *kin = ksc + D;                 /* [D] 1/scale */
    float *kl0 = kin + D;                 /* [D] */
    float *vsc = kl0 + D;                 /* [Gk][NG] */
    float *vin = vsc + (size_t)Gk * NG;   /* [Gk][NG] */
    float *vl0 = vin + (size_t)Gk * NG;   /* [Gk][NG] */

    uint8_t *blk = A.pool_layer + (size_t)T.block * A.LB;
    uint8_t *head = blk + (size_t)h * A.head_bytes;
    const float *norms = (const float *)(blk + (size_t)A.hkv * A.head_bytes);
    if (h == 0 && gi == 0 && threadIdx.x == 0) A.tables[(size_t)T.slot * A.max_blocks + T.table_idx] = T.block;

    for (int j0 = w; j0 < Gk; j0 += 16) {
        /* two tokens per step, K and V: four rows' loads in flight */
        float xk[2][E], xv[2][E], sn[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int j = j0 + 8 * u;
            if (j < Gk) {
                const int t = gi * Gk + j;
                stream_load<D>(A, T, false, T.stream0 + t, h, lane, xk[u]);
                stream_load<D>(A, T, true, T.stream0 + t, h, lane, xv[u]);
                sn[u] = A.scale_keys ? norms[t] : 1.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int j = j0 + 8 * u;
            if (j < Gk) {
                const int t = gi * Gk + j;
                stream_finish<D>(A, T, false, T.stream0 + t, lane, xk[u]);
                if (A.scale_keys) {
#pragma unroll
                    for (int i = 0; i < E; i++) xk[u][i] = __fdiv_rn(xk[u][i], sn[u]);
                }
#pragma unroll
                for (int i = 0; i < E; i++) Ks[(size_t)j * LD + lane * E + i] = xk[u][i];
                stream_finish<D>(A, T, true, T.stream0 + t, lane, xv[u]);
#pragma unroll
                for (int i = 0; i < E; i++) Vs[(size_t)j * LD + lane * E + i] = xv[u][i];
            }
        }
    }
    __syncthreads();

    uint16_t *kp = (uint16_t *)(head + 2 * A.codes_bytes);
    uint16_t *vp = (uint16_t *)(head + 2 * A.codes_bytes + A.kparams_bytes);
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float lo = Ks[c], hi = lo;
        for (int j = 1; j < Gk; j++) {
            float x = Ks[(size_t)j * LD + c];
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        unsigned short sc16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(hi, lo), (float)Q));
        unsigned short lo16 = oscar_f16_bits(lo);
        size_t pi = ((size_t)gi * D + c) * 2;
        *(uint32_t *)(kp + pi) = (uint32_t)sc16 | ((uint32_t)lo16 << 16);
        const float sc = __half2float(__ushort_as_half(sc16));
        ksc[c] = sc;
        kin[c] = sc > 0.0f ? __frcp_rn(sc) : 0.0f;
        kl0[c] = __half2float(__ushort_as_half(lo16));
    }
    for (int idx = threadIdx.x; idx < Gk * NG; idx += blockDim.x) {
        const int j = idx % Gk, vg = idx / Gk; /* j fastest: distinct banks */
        const float *x = Vs + (size_t)j * LD + vg * Gv;
        float lo = x[0], hi = lo;
        for (int i = 1; i < Gv; i++) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
        unsigned short sc16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(hi, lo), (float)Q));
        unsigned short lo16 = oscar_f16_bits(lo);
        size_t pi = ((size_t)(gi * Gk + j) * NG + vg) * 2;
        *(uint32_t *)(vp + pi) = (uint32_t)sc16 | ((uint32_t)lo16 << 16);
        const float sc = __half2float(__ushort_as_half(sc16));
        vsc[j * NG + vg] = sc;
        vin[j * NG + vg] = sc > 0.0f ? __frcp_rn(sc) : 0.0f;
        vl0[j * NG + vg] = __half2float(__ushort_as_half(lo16));
    }
    __syncthreads();

    constexpr int NW = D * BITS / 64; /* words per lane chunk */
    constexpr int P = 16 / BITS;      /* pairs per word       */
    const int tiles = Gk / 16, tile0 = gi * Gk / 16;
    const int total = tiles * 32 * NW;
    uint32_t *kc = (uint32_t *)head, *vc = (uint32_t *)(head + A.codes_bytes);
    for (int wi = threadIdx.x; wi < total; wi += blockDim.x) {
        const int tl = wi / (32 * NW), rem = wi - tl * 32 * NW;
        const int wd = rem >> 5, l = rem & 31; /* lanes of a warp: consecutive l */
        const int g = l >> 2, t = l & 3;
        uint32_t kw = 0, vw = 0;
#pragma unroll
        for (int p = 0; p < P; p++) {
            const int q = wd * P + p, s = q >> 2, j = q & 3;
#pragma unroll
            for (int e = 0; e < 2; e++) {
                /* keys: token g + 8(j&1), channel 16s + 2t + 8(j>>1) + e */
                int tok = tl * 16 + g + 8 * (j & 1), ch = 16 * s + 2 * t + 8 * (j >> 1) + e;
                kw |= quant_code(Ks[(size_t)tok * LD + ch], ksc[ch], kin[ch], kl0[ch], Q) << (16 * e + BITS * p);
                /* values: token 2t + 8(j>>1) + e, channel 16s + g + 8(j&1) */
                tok = tl * 16 + 2 * t + 8 * (j >> 1) + e;
                ch = 16 * s + g + 8 * (j & 1);
                const int pi = tok * NG + ch / Gv;
                vw |= quant_code(Vs[(size_t)tok * LD + ch], vsc[pi], vin[pi], vl0[pi], Q) << (16 * e + BITS * p);
            }
        }
        const size_t o = (size_t)(tile0 + tl) * 32 * NW + l * NW + wd;
        kc[o] = kw;
        vc[o] = vw;
    }
}

/* 2'. Method none: copy the R window-rounded rows of each head into the block. */
template <int D>
__global__ void __launch_bounds__(256) pack_none_kernel(AppendArgs A) {
    const PackTask T = A.tasks[blockIdx.x];
    const int h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    constexpr int E = D / 32;
    uint8_t *head = A.pool_layer + (size_t)T.block * A.LB + (size_t)h * A.head_bytes;
    uint8_t *vbase = head + (size_t)A.R * D * A.w_esize;
    if (h == 0 && threadIdx.x == 0) A.tables[(size_t)T.slot * A.max_blocks + T.table_idx] = T.block;
    for (int t = w; t < A.R; t += 8) {
        float x[E];
        stream_row<D>(A, T, false, T.stream0 + t, h, lane, x);
        st_row<E>(head, A.w_dtype, (size_t)t * D + lane * E, x);
        stream_row<D>(A, T, true, T.stream0 + t, h, lane, x);
        st_row<E>(vbase, A.w_dtype, (size_t)t * D + lane * E, x);
    }
}

/* 3. Window rows from the input. */
template <int D>
__global__ void __launch_bounds__(256) window_kernel(AppendArgs A) {
    const WinTask T = A.wtasks[blockIdx.x];
    const int h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    constexpr int E = D / 32;
    uint8_t *kb = A.win_layer + (size_t)T.slot * A.wlb;
    uint8_t *vb = kb + A.wlb / 2;
    for (int r = T.r0 + blockIdx.z * 8 + w; r < T.r1; r += 8 * gridDim.z) {
        float x[E];
        const size_t o = ((size_t)r * A.hkv + h) * D + lane * E;
        input_row<D>(A, false, T.in0 + r, h, lane, x);
        st_row<E>(kb, A.w_dtype, o, x);
        input_row<D>(A, true, T.in0 + r, h, lane, x);
        st_row<E>(vb, A.w_dtype, o, x);
    }
}

__global__ void finite_kernel(const void *k, const void *v, int64_t n, int dtype, int *flag) {
    int bad = 0;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (dtype == OSCAR_DTYPE_F32) {
            uint32_t a = ((const uint32_t *)k)[i], b = ((const uint32_t *)v)[i];
            bad |= ((a & 0x7f800000u) == 0x7f800000u) | ((b & 0x7f800000u) == 0x7f800000u);
        } else {
            const uint32_t m = dtype == OSCAR_DTYPE_BF16 ? 0x7f80u : 0x7c00u;
            uint32_t a = ((const unsigned short *)k)[i], b = ((const unsigned short *)v)[i];
            bad |= ((a & m) == m) | ((b & m) == m);
        }
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

template <int D>
oscar_status launch_append_d(oscar_cache *c, const AppendArgs &A, int n_tasks, int n_wtasks, int max_wrows,
                             cudaStream_t st) {
    const oscar_layout *L = &c->lay;
    if (n_tasks > 0) {
        if (L->quantised) {
            if (L->scale_keys) {
                const size_t nsmem = (size_t)NORM_WARPS * NORM_TPW * (D + 1) * sizeof(float);
                const int per = NORM_WARPS * NORM_TPW;
                norm_kernel<D><<<dim3(n_tasks, (A.R + per - 1) / per), 32 * NORM_WARPS, nsmem, st>>>(A);
                OSCAR_CK_LAUNCH(c, "norm_kernel");
            }
            const int NG = D / A.Gv;
            size_t smem = ((size_t)2 * A.Gk * (D + 1) + 3 * D + (size_t)3 * A.Gk * NG) * sizeof(float);
            dim3 grid(n_tasks, A.hkv, A.R / A.Gk);
            if (L->bits == 2) {
                pack_kernel<D, 2><<<grid, 256, smem, st>>>(A);
            } else {
                pack_kernel<D, 4><<<grid, 256, smem, st>>>(A);
            }
            OSCAR_CK_LAUNCH(c, "pack_kernel");
        } else {
            pack_none_kernel<D><<<dim3(n_tasks, A.hkv), 256, 0, st>>>(A);
            OSCAR_CK_LAUNCH(c, "pack_none_kernel");
        }
    }
    if (n_wtasks > 0) {
        int zs = (max_wrows + 7) / 8;
        if (zs < 1) zs = 1;
        if (zs > 16) zs = 16;
        window_kernel<D><<<dim3(n_wtasks, A.hkv, zs), 256, 0, st>>>(A);
        OSCAR_CK_LAUNCH(c, "window_kernel");
    }
    return OSCAR_OK;
}

template <int D, int BITS>
cudaError_t set_pack_smem(size_t bytes) {
    return cudaFuncSetAttribute(pack_kernel<D, BITS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

} // namespace

size_t oscar_cuda_pack_smem(const oscar_layout *L) {
    const int NG = L->d / L->v_group;
    return ((size_t)2 * L->k_group * (L->d + 1) + 3 * L->d + (size_t)3 * L->k_group * NG) * sizeof(float);
}

oscar_status oscar_cuda_pack_init(oscar_cache *c) {
    const oscar_layout *L = &c->lay;
    if (!L->quantised) return OSCAR_OK;
    CudaState *S = cuda_state(c);
    size_t smem = oscar_cuda_pack_smem(L);
    if (smem > S->smem_optin)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                               "CUDA backend: k_group %d x head_dim %d needs %zu bytes of shared memory in the "
                               "pack kernel, the device allows %zu",
                               L->k_group, L->d, smem, S->smem_optin);
    cudaError_t e = cudaSuccess;
    if (L->d == 64) e = L->bits == 2 ? set_pack_smem<64, 2>(smem) : set_pack_smem<64, 4>(smem);
    if (L->d == 128) e = L->bits == 2 ? set_pack_smem<128, 2>(smem) : set_pack_smem<128, 4>(smem);
    if (L->d == 256) e = L->bits == 2 ? set_pack_smem<256, 2>(smem) : set_pack_smem<256, 4>(smem);
    if (e != cudaSuccess)
        return oscar_set_error(c, OSCAR_E_BACKEND, "CUDA: cudaFuncSetAttribute(pack_kernel): %s",
                               cudaGetErrorString(e));
    return OSCAR_OK;
}

oscar_status oscar_cuda_append_launch(oscar_cache *c, int layer, const PackTask *d_tasks, int n_tasks,
                                      const WinTask *d_wtasks, int n_wtasks, int max_wrows, const void *k,
                                      const void *v, oscar_dtype dtype, cudaStream_t st) {
    CudaState *S = cuda_state(c);
    const oscar_layout *L = &c->lay;
    AppendArgs A;
    A.pool_layer = S->pool + (size_t)layer * c->cfg.block_count * L->layer_block_bytes;
    A.win_layer = S->windows + (size_t)layer * c->cfg.max_seqs * L->window_layer_bytes;
    A.tables = S->tables;
    A.k = k;
    A.v = v;
    A.tasks = d_tasks;
    A.wtasks = d_wtasks;
    A.LB = (long long)L->layer_block_bytes;
    A.head_bytes = (long long)L->head_bytes;
    A.codes_bytes = (long long)L->codes_bytes;
    A.kparams_bytes = (long long)L->kparams_bytes;
    A.wlb = (long long)L->window_layer_bytes;
    A.max_blocks = S->max_blocks;
    A.in_dtype = (int)dtype;
    A.w_dtype = L->window_dtype;
    A.w_esize = L->window_esize;
    A.R = L->residual;
    A.Gk = L->k_group;
    A.Gv = L->v_group;
    A.hkv = L->hkv;
    A.levels = L->levels;
    A.rotate = L->rotate;
    A.rotate_v = L->rotate_v;
    A.scale_keys = L->scale_keys;
    switch (L->d) {
    case 64: return launch_append_d<64>(c, A, n_tasks, n_wtasks, max_wrows, st);
    case 128: return launch_append_d<128>(c, A, n_tasks, n_wtasks, max_wrows, st);
    case 256: return launch_append_d<256>(c, A, n_tasks, n_wtasks, max_wrows, st);
    default: return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "CUDA backend: head_dim %d", L->d);
    }
}

oscar_status oscar_cuda_finite_launch(oscar_cache *c, const void *k, const void *v, int64_t n, oscar_dtype dtype,
                                      int *d_flag, cudaStream_t st) {
    CudaState *S = cuda_state(c);
    int64_t blocks = (n + 255) / 256;
    int64_t cap = (int64_t)S->sm_count * 8;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    finite_kernel<<<(unsigned)blocks, 256, 0, st>>>(k, v, n, (int)dtype, d_flag);
    OSCAR_CK_LAUNCH(c, "finite_kernel");
    return OSCAR_OK;
}
