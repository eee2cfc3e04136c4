/* Append kernels of the CUDA backend (docs/FORMAT.md, "What is stored"):
 *   1. token norms of the flushed tokens (omni-token scaling, all KV heads);
 *   2. pack: per (block, head, key group) rotate, round to the window dtype,
 *      divide by the norm, per-channel key and per-token value parameters,
 *      codes in the mma tile layout;
 *   3. window: the tokens left over, rotated and rounded, into the window
 *      (and the first sink_tokens tokens of a sequence into its sink rows).
 * All three read the same token source: stream index i of a sequence is
 * window row i for i < window_before, else input row input_row + i - wb.
 * With sink tokens the stream starts after them: window row i is slot row
 * S + i (lay.wsink bytes in), and input_row is the first row after them. */
#include "common.cuh"

namespace {

struct AppendArgs {
    uint8_t *pool_layer;
    uint8_t *win_layer;
    float *win_ss;         /* the layer's window token sums of squares [slot][W] */
    const float *ss_new;   /* the call's new rows' sums of squares [row]         */
    int W;                 /* window rows per slot                               */
    const int32_t *failed; /* [max_seqs]: 1 = write nothing for this slot */
    const void *k;
    const void *v;
    const PackTask *tasks;
    const WinTask *wtasks;
    DeviceLayout lay;
    int in_dtype;
    int clip;              /* clip_search: MSE-searched group ranges      */
};

/* Empty entries of the task list (the batch API sizes it for the most
 * flushes a call can have) and sequences marked failed write nothing. */
__device__ __forceinline__ bool skip_task(const AppendArgs &A, const PackTask &T) {
    return T.block < 0 || A.failed[T.slot] != 0;
}

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
    ld_row<E>(is_v ? A.v : A.k, A.in_dtype, ((size_t)row * A.lay.hkv + h) * D + (size_t)lane * E, x);
    if (is_v ? A.lay.rotate_v : A.lay.rotate) oscar_warp_fwht<D>(x, lane);
#pragma unroll
    for (int i = 0; i < E; i++) x[i] = oscar_round_to(x[i], A.lay.w_dtype);
}

/* stream_row in two halves, so that a warp can issue several rows' loads
 * before the first transform: the raw load, then rotation + rounding (only
 * for rows that came from the input). */
template <int D>
__device__ __forceinline__ void stream_load(const AppendArgs &A, const PackTask &T, bool is_v, int sidx, int h,
                                            int lane, float (&x)[D / 32]) {
    constexpr int E = D / 32;
    if (sidx < T.window_before) {
        const uint8_t *base = A.win_layer + (size_t)T.slot * A.lay.wlb + (is_v ? A.lay.wlb / 2 : 0) + A.lay.wsink;
        ld_row<E>(base, A.lay.w_dtype, ((size_t)sidx * A.lay.hkv + h) * D + (size_t)lane * E, x);
    } else {
        const int64_t row = T.input_row + (sidx - T.window_before);
        ld_row<E>(is_v ? A.v : A.k, A.in_dtype, ((size_t)row * A.lay.hkv + h) * D + (size_t)lane * E, x);
    }
}

template <int D>
__device__ __forceinline__ void stream_finish(const AppendArgs &A, const PackTask &T, bool is_v, int sidx, int lane,
                                              float (&x)[D / 32]) {
    if (sidx < T.window_before) return;
    if (is_v ? A.lay.rotate_v : A.lay.rotate) oscar_warp_fwht<D>(x, lane);
#pragma unroll
    for (int i = 0; i < D / 32; i++) x[i] = oscar_round_to(x[i], A.lay.w_dtype);
}

template <int D>
__device__ __forceinline__ void stream_row(const AppendArgs &A, const PackTask &T, bool is_v, int sidx, int h,
                                           int lane, float (&x)[D / 32]) {
    constexpr int E = D / 32;
    if (sidx < T.window_before) {
        const uint8_t *base = A.win_layer + (size_t)T.slot * A.lay.wlb + (is_v ? A.lay.wlb / 2 : 0) + A.lay.wsink;
        ld_row<E>(base, A.lay.w_dtype, ((size_t)sidx * A.lay.hkv + h) * D + (size_t)lane * E, x);
    } else {
        input_row<D>(A, is_v, T.input_row + (sidx - T.window_before), h, lane, x);
    }
}

/* A stream token's key sum of squares: kept in the window for old tokens,
 * computed for the call's new rows by row_sumsq_kernel (or gathered from
 * every tensor-parallel shard). Its root is the token norm (FORMAT.md). */
__device__ __forceinline__ float token_ss(const AppendArgs &A, const PackTask &T, int sidx) {
    if (sidx < T.window_before) return A.win_ss[(size_t)T.slot * A.W + sidx];
    return A.ss_new[T.input_row + (sidx - T.window_before)];
}

__device__ __forceinline__ float norm_of(float ss) {
    float sn = sqrtf(ss);
    if (!(sn > 0.0f) || isinf(sn)) sn = 1.0f;
    return sn;
}

/* 1. Token norms of a block (for the unfused pack kernel). */
__global__ void __launch_bounds__(128) norm_kernel(AppendArgs A) {
    const PackTask T = A.tasks[blockIdx.x];
    if (skip_task(A, T)) return;
    float *norms = (float *)(A.pool_layer + (size_t)T.block * A.lay.LB + (size_t)A.lay.hkv * A.lay.head_bytes);
    for (int t = threadIdx.x; t < A.lay.R; t += blockDim.x) norms[t] = norm_of(token_ss(A, T, T.stream0 + t));
}

/* The sum of squares of a row held E channels per lane by a warp: each
 * lane's channels in order, then the xor butterfly (internal.h,
 * oscar_head_sumsq's order, so the CPU's bits). Every lane returns it. */
template <int E>
__device__ __forceinline__ float lane_sumsq(const float (&x)[E]) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < E; i++) s = __fadd_rn(s, __fmul_rn(x[i], x[i]));
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) s = __fadd_rn(s, __shfl_xor_sync(OSCAR_FULL_MASK, s, m));
    return s;
}

/* One key row's sum of squares for head h as the window stores it
 * (rotated, rounded): the warp's lanes sum their d/32 channels in order,
 * then the xor butterfly (internal.h, oscar_head_sumsq: the same bits as the
 * CPU). Every lane returns the sum. */
template <int D>
__device__ __forceinline__ float head_sumsq(const void *k, int dtype, int64_t row, int hkv, int h, int rotate,
                                            int w_dtype, int lane) {
    constexpr int E = D / 32;
    float x[E];
    ld_row<E>(k, dtype, ((size_t)row * hkv + h) * D + (size_t)lane * E, x);
    if (rotate) oscar_warp_fwht<D>(x, lane);
#pragma unroll
    for (int i = 0; i < E; i++) x[i] = oscar_round_to(x[i], w_dtype);
    return lane_sumsq<E>(x);
}

/* A token's sum of squares: its heads' sums in order, or with tensor
 * parallelism the caller's gathered per-head sums of every shard. */
__device__ __forceinline__ float token_sumsq(const float *head_ss, int hkv, const float *tp, int tp_heads, int64_t row) {
    float s = 0.0f;
    if (tp) {
        for (int h = 0; h < tp_heads; h++) s = __fadd_rn(s, tp[(size_t)row * tp_heads + h]);
    } else {
        for (int h = 0; h < hkv; h++) s = __fadd_rn(s, head_ss[h]);
    }
    return s;
}

/* The rotation of one 32-channel chunk (channels 32 wd ..) of a D-channel
 * row held by D/32 lanes: 5 butterfly stages in registers, the rest
 * through shuffles (xor over wd), then the 1/sqrt(D) scale; the stages,
 * their order and roundings of oscar_fwht, so the bits of the CPU backend. */
template <int D>
__device__ __forceinline__ void fwht_chunk32(float (&x)[32], int wd) {
#pragma unroll
    for (int hh = 1; hh < 32; hh <<= 1) {
#pragma unroll
        for (int i = 0; i < 32; i++) {
            if (!(i & hh)) {
                const float a = x[i], b = x[i + hh];
                x[i] = a + b;
                x[i + hh] = a - b;
            }
        }
    }
#pragma unroll
    for (int m = 1; m < D / 32; m <<= 1) {
        const bool upper = (wd & m) != 0;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const float o = __shfl_xor_sync(OSCAR_FULL_MASK, x[i], m);
            x[i] = __fmaf_rn(upper ? -1.0f : 1.0f, x[i], o);
        }
    }
    const float norm = (float)(1.0 / sqrt((double)D));
#pragma unroll
    for (int i = 0; i < 32; i++) x[i] *= norm;
}

/* head_sumsq with D/32 lanes per row: each lane holds 32 consecutive
 * channels (32 * wd ..), so 32 / (D/32) rows share a warp. The same bits:
 * the rotation's stages run in the same order with the same roundings
 * (fused_finish's layout: 5 stages in registers, the rest through
 * shuffles), and the squares are summed in head_sumsq's order: its lane l
 * holds channels [l E, (l+1) E), here group j of lane wd is l = G wd + j
 * (G = 32 / E groups per lane), and the xor butterfly over l runs its high
 * bits (m >= G) across lanes and its low bits in registers. About 2.5x
 * fewer instructions per row than one warp per row (ncu: the row_sumsq
 * kernel was issue-bound, 191 us of a 128K-token append). Every lane of
 * the row returns the sum. */
template <int D>
__device__ __forceinline__ float head_sumsq_wide(const void *k, int dtype, int64_t row, int hkv, int h, int rotate,
                                                 int w_dtype, int wd) {
    constexpr int E = D / 32, G = 32 / E;
    float x[32];
    ld_row<32>(k, dtype, ((size_t)row * hkv + h) * D + (size_t)wd * 32, x);
    if (rotate) fwht_chunk32<D>(x, wd);
    float s[G];
#pragma unroll
    for (int j = 0; j < G; j++) {
        s[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < E; i++) {
            const float v = oscar_round_to(x[j * E + i], w_dtype);
            s[j] = __fadd_rn(s[j], __fmul_rn(v, v));
        }
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) {
        if (m >= G) {
#pragma unroll
            for (int j = 0; j < G; j++) s[j] = __fadd_rn(s[j], __shfl_xor_sync(OSCAR_FULL_MASK, s[j], m / G));
        } else {
            float t[G];
#pragma unroll
            for (int j = 0; j < G; j++) t[j] = __fadd_rn(s[j], s[j ^ m]);
#pragma unroll
            for (int j = 0; j < G; j++) s[j] = t[j];
        }
    }
    return s[0];
}

/* Per-head (head_out) and per-token (ss_out) key sums of squares of new
 * rows: D/32 lanes per (row, head) (head_sumsq_wide), then per row the
 * heads in order. A CTA takes SUMSQ_ROWS rows. */
constexpr int SUMSQ_ROWS = 8;
template <int D>
__global__ void __launch_bounds__(256) row_sumsq_kernel(const void *k, int dtype, int64_t n_rows, int hkv,
                                                        int rotate, int w_dtype, const float *tp, int tp_heads,
                                                        float *head_out, float *ss_out) {
    extern __shared__ float hs[]; /* [SUMSQ_ROWS][hkv] */
    constexpr int LPR = D / 32, RPW = 32 / LPR; /* lanes per (row, head); (row, head) pairs per warp */
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int wd = lane % LPR, rj = lane / LPR;
    const int64_t row0 = (int64_t)blockIdx.x * SUMSQ_ROWS;
    const int rows = (int)min((int64_t)SUMSQ_ROWS, n_rows - row0);
    if (!tp || head_out) {
        const int n_tasks = rows * hkv;
        for (int base = w * RPW; base < n_tasks; base += 8 * RPW) { /* warp-uniform: all lanes shuffle */
            const int task = min(base + rj, n_tasks - 1);
            const int r = task / hkv, h = task - r * hkv;
            const float s = head_sumsq_wide<D>(k, dtype, row0 + r, hkv, h, rotate, w_dtype, wd);
            if (wd == 0 && base + rj < n_tasks) {
                hs[r * hkv + h] = s;
                if (head_out) head_out[(size_t)(row0 + r) * hkv + h] = s;
            }
        }
    }
    __syncthreads();
    if ((int)threadIdx.x < rows && ss_out)
        ss_out[row0 + threadIdx.x] = token_sumsq(hs + threadIdx.x * hkv, hkv, tp, tp_heads, row0 + threadIdx.x);
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

/* clip_search (FORMAT.md step 6): the (scale16, lo16) of a group of n
 * values x[i * stride] with range [lo, hi] (as the plain rule finds it),
 * searched over the fixed grid of shrunken ranges for the least squared
 * error, exactly as oscar_group_params_clip (src/core/numerics.c): every
 * fp32 step rounded on its own (no contraction), the error summed in fp64
 * in element order, the first candidate kept on ties, and the plain
 * parameters when no candidate has a finite error. */
__device__ __noinline__ void clip_params(const float *x, int n, int stride, int Q, float lo, float hi,
                                         unsigned short &sc16, unsigned short &lo16) {
    const float grid[6] = {0.0f, 0.05f, 0.1f, 0.15f, 0.2f, 0.3f};
    const float range = __fsub_rn(hi, lo);
    double best = INFINITY;
    unsigned short bs = 0, bl = 0;
    for (int a = 0; a < 6; a++)
        for (int b = 0; b < 6; b++) {
            const float l = __fadd_rn(lo, __fmul_rn(grid[a], range)), h = __fsub_rn(hi, __fmul_rn(grid[b], range));
            if (!(h >= l)) continue;
            const unsigned short s16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(h, l), (float)Q)), l16 = oscar_f16_bits(l);
            const float sc = __half2float(__ushort_as_half(s16)), l0 = __half2float(__ushort_as_half(l16));
            const float inv = sc > 0.0f ? __frcp_rn(sc) : 0.0f;
            double err = 0.0;
            for (int i = 0; i < n; i++) {
                const float v = x[(size_t)i * stride];
                const float r = __fadd_rn(l0, __fmul_rn((float)quant_code(v, sc, inv, l0, Q), sc));
                const double e = __dsub_rn((double)v, (double)r);
                err = __dadd_rn(err, __dmul_rn(e, e));
            }
            if (err < best) {
                best = err;
                bs = s16;
                bl = l16;
            }
        }
    if (!(best < INFINITY)) { /* non-finite values: the plain rule */
        bs = oscar_f16_bits(__fdiv_rn(range, (float)Q));
        bl = oscar_f16_bits(lo);
    }
    sc16 = bs;
    lo16 = bl;
}

/* Codes of tiles [tile0, tile0 + tiles) of a head's K or V codes array at
 * width BITS (FORMAT.md, "Code tiles"): code(tl, l, q, e) is the code of
 * pair element (lane l, pair q, element e) of tile tl of the group. One
 * thread writes one 32-bit word; consecutive threads take consecutive
 * lanes. 3 bits (FORMAT.md, "3-bit codes"): a thread takes one high-plane
 * word (16 pairs), writes it and the two low-plane words of the same pairs;
 * the low plane is the 2-bit array, the high plane starts R*D/4 bytes in. */
template <int D, int BITS, class CodeFn>
__device__ __forceinline__ void write_code_tiles(uint8_t *codes, int R, int tile0, int tiles, CodeFn code) {
    if constexpr (BITS == 3) {
        constexpr int NWL = D / 32, NWH = D / 64; /* words per lane chunk: low, high plane */
        uint32_t *lo_plane = (uint32_t *)codes, *hi_plane = (uint32_t *)(codes + (size_t)R * D / 4);
        const int total = tiles * 32 * NWH;
        for (int wi = threadIdx.x; wi < total; wi += blockDim.x) {
            const int tl = wi / (32 * NWH), rem = wi - tl * 32 * NWH;
            const int wh = rem >> 5, l = rem & 31;
            uint32_t lw0 = 0, lw1 = 0, hw = 0;
#pragma unroll
            for (int p = 0; p < 16; p++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const uint32_t c = code(tl, l, 16 * wh + p, e);
                    const uint32_t lo = (c & 3u) << (16 * e + 2 * (p & 7));
                    if (p < 8) lw0 |= lo;
                    else lw1 |= lo;
                    hw |= (c >> 2) << (16 * e + p);
                }
            }
            const size_t T = (size_t)(tile0 + tl) * 32 + l;
            lo_plane[T * NWL + 2 * wh] = lw0;
            lo_plane[T * NWL + 2 * wh + 1] = lw1;
            hi_plane[T * NWH + wh] = hw;
        }
    } else {
        constexpr int NW = D * BITS / 64; /* words per lane chunk */
        constexpr int P = 16 / BITS;      /* pairs per word       */
        uint32_t *dst = (uint32_t *)codes;
        const int total = tiles * 32 * NW;
        for (int wi = threadIdx.x; wi < total; wi += blockDim.x) {
            const int tl = wi / (32 * NW), rem = wi - tl * 32 * NW;
            const int wd = rem >> 5, l = rem & 31;
            uint32_t w = 0;
#pragma unroll
            for (int p = 0; p < P; p++)
#pragma unroll
                for (int e = 0; e < 2; e++) w |= code(tl, l, wd * P + p, e) << (16 * e + BITS * p);
            dst[((size_t)(tile0 + tl) * 32 + l) * NW + wd] = w;
        }
    }
}

/* write_code_tiles at a width known only at run time (key_bits, value_bits). */
template <int D, class CodeFn>
__device__ __forceinline__ void write_code_tiles_w(int bits, uint8_t *codes, int R, int tile0, int tiles,
                                                   CodeFn code) {
    if (bits == 2) write_code_tiles<D, 2>(codes, R, tile0, tiles, code);
    else if (bits == 3) write_code_tiles<D, 3>(codes, R, tile0, tiles, code);
    else write_code_tiles<D, 4>(codes, R, tile0, tiles, code);
}

/* A key row's norm with key_norm_per_head (FORMAT.md step 4, NH = 1): the
 * head's own sum of squares in the lane order of head_sumsq (each lane's
 * D/32 channels in order, then the xor butterfly), from the rotated,
 * window-rounded row x; every lane returns it. */
template <int D>
__device__ __forceinline__ float row_head_norm(const float (&x)[D / 32]) {
    return norm_of(lane_sumsq<D / 32>(x));
}

/* 2. Pack one key group (Gk tokens) of one head of one block: any width
 * (key_bits and value_bits each 2, 3 or 4), all-head or per-head norms. */
template <int D>
__global__ void __launch_bounds__(256) pack_kernel(AppendArgs A) {
    extern __shared__ float sm[];
    const PackTask T = A.tasks[blockIdx.x];
    if (skip_task(A, T)) return;
    const int h = blockIdx.y, gi = blockIdx.z;
    const int Gk = A.lay.Gk, Gv = A.lay.Gv, NG = D / Gv, QK = A.lay.klevels, QV = A.lay.vlevels;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const bool per_head = A.lay.norm_per_head;
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

    uint8_t *blk = A.pool_layer + (size_t)T.block * A.lay.LB;
    uint8_t *head = blk + (size_t)h * A.lay.head_bytes;
    /* all-head norms: [R], written by norm_kernel before this kernel;
     * per-head norms: this head's [R], written here */
    float *norms = (float *)(blk + (size_t)A.lay.hkv * A.lay.head_bytes) + (per_head ? (size_t)h * A.lay.R : 0);

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
                sn[u] = A.lay.scale_keys && !per_head ? norms[t] : 1.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int j = j0 + 8 * u;
            if (j < Gk) {
                const int t = gi * Gk + j;
                stream_finish<D>(A, T, false, T.stream0 + t, lane, xk[u]);
                if (A.lay.scale_keys) {
                    if (per_head) {
                        sn[u] = row_head_norm<D>(xk[u]);
                        if (lane == 0) norms[t] = sn[u];
                    }
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

    uint16_t *kp = (uint16_t *)(head + A.lay.kparams_off);
    uint16_t *vp = (uint16_t *)(head + A.lay.vparams_off);
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float lo = Ks[c], hi = lo;
        for (int j = 1; j < Gk; j++) {
            float x = Ks[(size_t)j * LD + c];
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        unsigned short sc16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(hi, lo), (float)QK));
        unsigned short lo16 = oscar_f16_bits(lo);
        if (A.clip) clip_params(Ks + c, Gk, LD, QK, lo, hi, sc16, lo16);
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
        unsigned short sc16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(hi, lo), (float)QV));
        unsigned short lo16 = oscar_f16_bits(lo);
        if (A.clip) clip_params(x, Gv, 1, QV, lo, hi, sc16, lo16);
        size_t pi = ((size_t)(gi * Gk + j) * NG + vg) * 2;
        *(uint32_t *)(vp + pi) = (uint32_t)sc16 | ((uint32_t)lo16 << 16);
        const float sc = __half2float(__ushort_as_half(sc16));
        vsc[j * NG + vg] = sc;
        vin[j * NG + vg] = sc > 0.0f ? __frcp_rn(sc) : 0.0f;
        vl0[j * NG + vg] = __half2float(__ushort_as_half(lo16));
    }
    __syncthreads();

    const int tiles = Gk / 16, tile0 = gi * Gk / 16;
    /* keys: token g + 8(j&1), channel 16s + 2t + 8(j>>1) + e of the tile
     * (q = 4s + j, lane l = 4g + t) */
    auto key_code = [&](int tl, int l, int q, int e) -> uint32_t {
        const int g = l >> 2, t = l & 3, s = q >> 2, j = q & 3;
        const int tok = tl * 16 + g + 8 * (j & 1), ch = 16 * s + 2 * t + 8 * (j >> 1) + e;
        return quant_code(Ks[(size_t)tok * LD + ch], ksc[ch], kin[ch], kl0[ch], QK);
    };
    /* values: token 2t + 8(j>>1) + e, channel 16s + g + 8(j&1) */
    auto value_code = [&](int tl, int l, int q, int e) -> uint32_t {
        const int g = l >> 2, t = l & 3, s = q >> 2, j = q & 3;
        const int tok = tl * 16 + 2 * t + 8 * (j >> 1) + e, ch = 16 * s + g + 8 * (j & 1);
        const int pi = tok * NG + ch / Gv;
        return quant_code(Vs[(size_t)tok * LD + ch], vsc[pi], vin[pi], vl0[pi], QV);
    };
    write_code_tiles_w<D>(A.lay.kbits, head, A.lay.R, tile0, tiles, key_code);
    write_code_tiles_w<D>(A.lay.vbits, head + A.lay.kcodes_bytes, A.lay.R, tile0, tiles, value_code);
}

/* 2''. Fused pack (v9): one CTA per (block, key group) holding every KV head
 * of the group's Gk tokens (Gk = 16 or 32), 2-bit codes, 16-bit window dtype.
 * K is rotated once: each row (token, head) is loaded by D/32 lanes, 32
 * consecutive channels per lane (5 butterfly stages in registers, the rest
 * through shuffles, same order and roundings as oscar_fwht), rounded to the
 * window dtype and kept in shared memory as 16-bit values. Then warp 0 sums
 * each token's squares in the CPU's order (one lane per token) while the
 * other warps quantise V rows straight from registers; then per-channel key
 * parameters (one thread per channel pair, tokens in order) and key codes
 * (one thread per 8 channels x 16 tokens, whole 32-bit words). */
constexpr int FCS = 20; /* shared words per 32-channel chunk (16 + 4 pad): conflict-free code pass */

struct FusedGeom {
    int TOK, NT, ROWW, HS;
};

__device__ __forceinline__ FusedGeom fused_geom(const AppendArgs &A, int D) {
    FusedGeom G;
    G.TOK = A.lay.Gk;
    G.NT = A.lay.Gk / 16;
    G.HS = (D / 32) * FCS;
    G.ROWW = A.lay.hkv * G.HS + 1; /* odd: distinct banks across tokens */
    return G;
}

template <bool WBF16>
__device__ __forceinline__ float w16_to_f32(uint32_t bits16) {
    if constexpr (WBF16) return __uint_as_float(bits16 << 16);
    else return __half2float(__ushort_as_half((unsigned short)bits16));
}

template <bool WBF16>
__device__ __forceinline__ uint32_t f32_to_w16(float x) {
    if constexpr (WBF16) return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(x));
    else return (uint32_t)oscar_f16_bits(x);
}

template <int D>
__device__ __forceinline__ void fused_load(const AppendArgs &A, const PackTask &T, bool is_v, int tok, int h, int wd,
                                           float (&x)[32]);
template <int D, bool WBF16>
__device__ __forceinline__ void fused_finish(const AppendArgs &A, const PackTask &T, bool is_v, bool rot, int tok,
                                             int h, int wd, float (&x)[32]);

/* One row chunk: 32 consecutive channels (32*wd ..) of row (token tok, head h)
 * of the task's stream, rotated (if rot) and rounded to the window dtype. */
template <int D, bool WBF16>
__device__ __forceinline__ void fused_row(const AppendArgs &A, const PackTask &T, bool is_v, bool rot, int tok,
                                          int h, int wd, int lane, float (&x)[32]) {
    fused_load<D>(A, T, is_v, tok, h, wd, x);
    fused_finish<D, WBF16>(A, T, is_v, rot, tok, h, wd, x);
}

/* The raw load of fused_row (input or window values, as fp32) ... */
template <int D>
__device__ __forceinline__ void fused_load(const AppendArgs &A, const PackTask &T, bool is_v, int tok, int h, int wd,
                                           float (&x)[32]) {
    const int sidx = T.stream0 + tok;
    if (sidx >= T.window_before) {
        const int64_t row = T.input_row + (sidx - T.window_before);
        ld_row<32>(is_v ? A.v : A.k, A.in_dtype, ((size_t)row * A.lay.hkv + h) * D + (size_t)wd * 32, x);
    } else {
        const uint8_t *wbase = A.win_layer + (size_t)T.slot * A.lay.wlb + (is_v ? A.lay.wlb / 2 : 0) + A.lay.wsink;
        ld_row<32>(wbase, A.lay.w_dtype, ((size_t)sidx * A.lay.hkv + h) * D + (size_t)wd * 32, x);
    }
}

/* ... and the rest: rotation (input rows only) and rounding to the window dtype. */
template <int D, bool WBF16>
__device__ __forceinline__ void fused_finish(const AppendArgs &A, const PackTask &T, bool is_v, bool rot, int tok,
                                             int h, int wd, float (&x)[32]) {
    const int sidx = T.stream0 + tok;
    const bool inp = sidx >= T.window_before;
    const uint8_t *wbase = A.win_layer + (size_t)T.slot * A.lay.wlb + (is_v ? A.lay.wlb / 2 : 0) + A.lay.wsink;
    const size_t widx = ((size_t)sidx * A.lay.hkv + h) * D + (size_t)wd * 32;
    if (rot) {
        fwht_chunk32<D>(x, wd);
        if (!inp) ld_row<32>(wbase, A.lay.w_dtype, widx, x); /* window rows are final already */
    }
#pragma unroll
    for (int i = 0; i < 32; i++) x[i] = w16_to_f32<WBF16>(f32_to_w16<WBF16>(x[i]));
}

/* Group (lo, hi) combine across lanes (xor m), keeping the CPU's sequential
 * semantics: the earlier chunk wins ties (lower lane = earlier channels). */
__device__ __forceinline__ void minmax_xor(float &lo, float &hi, int m, bool later) {
    const float olo = __shfl_xor_sync(OSCAR_FULL_MASK, lo, m);
    const float ohi = __shfl_xor_sync(OSCAR_FULL_MASK, hi, m);
    if (later) {
        lo = lo < olo ? lo : olo;
        hi = hi > ohi ? hi : ohi;
    } else {
        lo = olo < lo ? olo : lo;
        hi = ohi > hi ? ohi : hi;
    }
}

template <int D, bool WBF16>
__global__ void __launch_bounds__(256, 2) fused_pack_kernel(AppendArgs A) {
    extern __shared__ __align__(16) uint32_t fsm[];
    const PackTask T = A.tasks[blockIdx.x];
    if (skip_task(A, T)) return;
    const int gi = blockIdx.y;
    const FusedGeom G = fused_geom(A, D);
    constexpr int NWD = D / 32; /* 32-bit words per lane chunk at 2 bits = 32-channel chunks */
    constexpr int LPR = D / 32, RPW = 32 / LPR;
    const int H = A.lay.hkv, TOK = G.TOK, NT = G.NT, Q = A.lay.klevels, Gv = A.lay.Gv, NG = D / Gv;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint32_t *Ks = fsm;                                         /* [TOK][ROWW] words (16-bit pairs) */
    uint16_t *Vh = (uint16_t *)(Ks + (size_t)TOK * G.ROWW);     /* [H][NT][32][NWD][4] */
    float *psc = (float *)(Vh + (size_t)H * NT * 32 * NWD * 4); /* [H*D] */
    float *pin = psc + H * D;
    float *pl0 = pin + H * D;
    float *snorm = pl0 + H * D; /* [TOK] */

    uint8_t *blk = A.pool_layer + (size_t)T.block * A.lay.LB;
    float *gnorms = (float *)(blk + (size_t)H * A.lay.head_bytes);
    const int tok0 = gi * TOK; /* first token of the group in the block */
    const int wd = lane % LPR, rj = lane / LPR;
    const int ngroups = H * TOK / RPW; /* row groups: RPW consecutive tokens of one head */

    /* P1: K rows -> Ks */
    /* two row groups per step: both loads in flight before the first transform */
    for (int rg = w; rg < ngroups; rg += 16) {
        const bool two = rg + 8 < ngroups; /* warp-uniform */
        const int ha = rg / (TOK / RPW), toka = (rg % (TOK / RPW)) * RPW + rj;
        const int hb = (rg + 8) / (TOK / RPW), tokb = ((rg + 8) % (TOK / RPW)) * RPW + rj;
        float xa[32], xb[32];
        fused_load<D>(A, T, false, tok0 + toka, ha, wd, xa);
        if (two) fused_load<D>(A, T, false, tok0 + tokb, hb, wd, xb);
#pragma unroll
        for (int u = 0; u < 2; u++) {
            if (u == 1 && !two) break;
            float(&x)[32] = u ? xb : xa;
            const int h = u ? hb : ha, tok = u ? tokb : toka;
            fused_finish<D, WBF16>(A, T, false, A.lay.rotate != 0, tok0 + tok, h, wd, x);
            uint32_t *dst = Ks + (size_t)tok * G.ROWW + h * G.HS + wd * FCS;
#pragma unroll
            for (int i = 0; i < 16; i++)
                dst[i] = f32_to_w16<WBF16>(x[2 * i]) | (f32_to_w16<WBF16>(x[2 * i + 1]) << 16);
        }
    }
    __syncthreads();

    /* P2: warp 0 token norms (from the sums of squares); others V */
    const bool sk = A.lay.scale_keys != 0;
    if (sk && w == 0) {
        if (lane < TOK) {
            const float sn = norm_of(token_ss(A, T, T.stream0 + tok0 + lane));
            snorm[lane] = sn;
            gnorms[tok0 + lane] = sn;
        }
    } else {
        const int vw0 = sk ? 1 : 0, nvw = 8 - vw0;
        for (int rg0 = w - vw0; rg0 < ngroups; rg0 += 2 * nvw) {
          const bool two = rg0 + nvw < ngroups; /* warp-uniform */
          const int ha = rg0 / (TOK / RPW), toka = (rg0 % (TOK / RPW)) * RPW + rj;
          const int hb = (rg0 + nvw) / (TOK / RPW), tokb = ((rg0 + nvw) % (TOK / RPW)) * RPW + rj;
          float xa[32], xb[32];
          fused_load<D>(A, T, true, tok0 + toka, ha, wd, xa);
          if (two) fused_load<D>(A, T, true, tok0 + tokb, hb, wd, xb);
#pragma unroll
          for (int u = 0; u < 2; u++) {
            if (u == 1 && !two) break;
            float(&x)[32] = u ? xb : xa;
            const int h = u ? hb : ha, tok = u ? tokb : toka;
            fused_finish<D, WBF16>(A, T, true, A.lay.rotate_v != 0, tok0 + tok, h, wd, x);
            /* parameters of the (one or two) value groups this lane holds */
            float lo0 = x[0], hi0 = x[0], lo1 = x[16], hi1 = x[16];
#pragma unroll
            for (int i = 1; i < 16; i++) {
                lo0 = x[i] < lo0 ? x[i] : lo0;
                hi0 = x[i] > hi0 ? x[i] : hi0;
            }
#pragma unroll
            for (int i = 17; i < 32; i++) {
                lo1 = x[i] < lo1 ? x[i] : lo1;
                hi1 = x[i] > hi1 ? x[i] : hi1;
            }
            if (Gv != 16) {
                lo0 = lo1 < lo0 ? lo1 : lo0;
                hi0 = hi1 > hi0 ? hi1 : hi0;
                for (int m = 1; m < Gv / 32; m <<= 1) minmax_xor(lo0, hi0, m, (wd & m) != 0);
                lo1 = lo0, hi1 = hi0;
            }
            uint16_t *vp = (uint16_t *)(blk + (size_t)h * A.lay.head_bytes + A.lay.vparams_off);
            uint32_t *vpw = (uint32_t *)vp + (size_t)(tok0 + tok) * NG;
            float sc[2], inv[2], l0[2];
#pragma unroll
            for (int k = 0; k < 2; k++) {
                const float lo = k ? lo1 : lo0, hi = k ? hi1 : hi0;
                const unsigned short sc16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(hi, lo), (float)Q));
                const unsigned short lo16 = oscar_f16_bits(lo);
                sc[k] = __half2float(__ushort_as_half(sc16));
                inv[k] = sc[k] > 0.0f ? __frcp_rn(sc[k]) : 0.0f;
                l0[k] = __half2float(__ushort_as_half(lo16));
                const uint32_t pw = (uint32_t)sc16 | ((uint32_t)lo16 << 16);
                if (Gv == 16) {
                    vpw[wd * 2 + k] = pw;
                } else if (k == 0 && (wd % (Gv / 32)) == 0) {
                    vpw[wd / (Gv / 32)] = pw;
                }
            }
            /* code patterns: channel g + 8a + 16b -> bit 8b + 2a (+4 jhi, +16 e) */
            const int t16 = tok & 15, Tt = tok >> 4;
            const int e = t16 & 1, tq = (t16 >> 1) & 3, jhi = t16 >> 3;
            uint16_t *vdst = Vh + ((size_t)(h * NT + Tt) * 32 * NWD + wd) * 4 + e * 2 + jhi;
#pragma unroll
            for (int g = 0; g < 8; g++) {
                uint32_t pat = 0;
#pragma unroll
                for (int k4 = 0; k4 < 4; k4++) {
                    const int i = g + 8 * k4, k = i >> 4;
                    pat |= quant_code(x[i], sc[k], inv[k], l0[k], Q) << (8 * (k4 >> 1) + 2 * (k4 & 1));
                }
                vdst[(size_t)(4 * g + tq) * NWD * 4] = (uint16_t)(pat << (4 * jhi));
            }
          }
        }
    }
    __syncthreads();

    /* P3a: key parameters, one thread per (head, channel pair), tokens in order */
    for (int v = threadIdx.x; v < H * D / 2; v += blockDim.x) {
        const int h = v / (D / 2), pi = v % (D / 2), cw = pi >> 4, i = pi & 15;
        const uint32_t *p = Ks + h * G.HS + cw * FCS + i;
        float lo0 = 0, hi0 = 0, lo1 = 0, hi1 = 0;
#pragma unroll 4
        for (int tk = 0; tk < TOK; tk++) {
            const uint32_t v2 = p[(size_t)tk * G.ROWW];
            float a = w16_to_f32<WBF16>(v2 & 0xffffu), b = w16_to_f32<WBF16>(v2 >> 16);
            if (sk) {
                const float s = snorm[tk];
                a = __fdiv_rn(a, s);
                b = __fdiv_rn(b, s);
            }
            if (tk == 0) {
                lo0 = hi0 = a;
                lo1 = hi1 = b;
            } else {
                lo0 = a < lo0 ? a : lo0;
                hi0 = a > hi0 ? a : hi0;
                lo1 = b < lo1 ? b : lo1;
                hi1 = b > hi1 ? b : hi1;
            }
        }
        const int c = cw * 32 + 2 * i;
        uint32_t pw[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const float lo = k ? lo1 : lo0, hi = k ? hi1 : hi0;
            const unsigned short sc16 = oscar_f16_bits(__fdiv_rn(__fsub_rn(hi, lo), (float)Q));
            const unsigned short lo16 = oscar_f16_bits(lo);
            pw[k] = (uint32_t)sc16 | ((uint32_t)lo16 << 16);
            const float sc = __half2float(__ushort_as_half(sc16));
            psc[h * D + c + k] = sc;
            pin[h * D + c + k] = sc > 0.0f ? __frcp_rn(sc) : 0.0f;
            pl0[h * D + c + k] = __half2float(__ushort_as_half(lo16));
        }
        uint32_t *kp = (uint32_t *)(blk + (size_t)h * A.lay.head_bytes + A.lay.kparams_off);
        *(uint2 *)(kp + (size_t)gi * D + c) = make_uint2(pw[0], pw[1]);
    }
    /* P3b: value code words from the patterns, one thread per (head, tile, lane) */
    for (int u = threadIdx.x; u < H * NT * 32; u += blockDim.x) {
        const int h = u / (NT * 32), Tt = (u / 32) % NT, l = u & 31;
        const uint16_t *src = Vh + (size_t)u * NWD * 4;
        uint32_t wv[NWD];
#pragma unroll
        for (int q = 0; q < NWD; q++) {
            const uint2 p = *(const uint2 *)(src + q * 4);
            const uint32_t e0 = (p.x | (p.x >> 16)) & 0xffffu, e1 = (p.y | (p.y >> 16)) & 0xffffu;
            wv[q] = e0 | (e1 << 16);
        }
        uint32_t *vc = (uint32_t *)(blk + (size_t)h * A.lay.head_bytes + A.lay.kcodes_bytes) +
                       ((size_t)(gi * NT + Tt) * 32 + l) * NWD;
        if constexpr (NWD % 4 == 0) {
#pragma unroll
            for (int q = 0; q < NWD; q += 4) *(uint4 *)(vc + q) = make_uint4(wv[q], wv[q + 1], wv[q + 2], wv[q + 3]);
        } else {
#pragma unroll
            for (int q = 0; q < NWD; q += 2) *(uint2 *)(vc + q) = make_uint2(wv[q], wv[q + 1]);
        }
    }
    __syncthreads();

    /* P4: key codes, one thread per (head, chunk, tile, t): channels
     * 32 cw + 2t + e + 8m, tokens 16 T + g + 8r -> bit 16e + 4m + 2r */
    for (int u = threadIdx.x; u < H * NWD * NT * 4; u += blockDim.x) {
        const int t = u & 3, Tt = (u >> 2) % NT, hw = (u >> 2) / NT, cw = hw % NWD, h = hw / NWD;
        float sc[8], inv[8], l0[8];
#pragma unroll
        for (int m = 0; m < 4; m++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int c = h * D + cw * 32 + 2 * t + 8 * m + e;
                sc[2 * m + e] = psc[c];
                inv[2 * m + e] = pin[c];
                l0[2 * m + e] = pl0[c];
            }
        }
        const uint32_t *p = Ks + h * G.HS + cw * FCS + t;
        uint32_t *kc = (uint32_t *)(blk + (size_t)h * A.lay.head_bytes) + (size_t)(gi * NT + Tt) * 32 * NWD + cw;
#pragma unroll 2
        for (int g = 0; g < 8; g++) {
            uint32_t word = 0;
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int tk = 16 * Tt + g + 8 * r;
                const float s = sk ? snorm[tk] : 1.0f;
#pragma unroll
                for (int m = 0; m < 4; m++) {
                    const uint32_t v2 = p[(size_t)tk * G.ROWW + 4 * m];
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float x = w16_to_f32<WBF16>(e ? (v2 >> 16) : (v2 & 0xffffu));
                        if (sk) x = __fdiv_rn(x, s);
                        word |= quant_code(x, sc[2 * m + e], inv[2 * m + e], l0[2 * m + e], Q)
                                << (16 * e + 4 * m + 2 * r);
                    }
                }
            }
            kc[(size_t)(4 * g + t) * NWD] = word;
        }
    }
}

size_t fused_smem_bytes(const oscar_layout *L) {
    const int D = L->d, H = L->hkv, TOK = L->k_group, NT = TOK / 16, NWD = D / 32;
    const size_t roww = (size_t)H * NWD * FCS + 1;
    return (size_t)TOK * roww * 4 + (size_t)H * NT * 32 * NWD * 4 * 2 + (size_t)3 * H * D * 4 + (size_t)32 * 4;
}

/* The fused kernel covers 2-bit keys and values, all-head norms, d 64 or
 * 128, a 16-bit window, Gk 16 or 32 and 16-byte aligned inputs, without
 * clip_search; everything else runs the v8 kernels (d 256 measured slower
 * fused: 3.25 against 2.98 ms). */
bool fused_ok(const oscar_layout *L, size_t optin) {
    return L->quantised && L->kbits == 2 && L->vbits == 2 && !L->norm_per_head && L->d <= 128 && L->window_esize == 2 && (L->k_group == 16 || L->k_group == 32) &&
           !L->clip && fused_smem_bytes(L) <= optin;
}

/* 2'. Method none: copy the R window-rounded rows of each head into the block. */
template <int D>
__global__ void __launch_bounds__(256) pack_none_kernel(AppendArgs A) {
    const PackTask T = A.tasks[blockIdx.x];
    if (skip_task(A, T)) return;
    const int h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    constexpr int E = D / 32;
    uint8_t *head = A.pool_layer + (size_t)T.block * A.lay.LB + (size_t)h * A.lay.head_bytes;
    uint8_t *vbase = head + (size_t)A.lay.R * D * A.lay.w_esize;
    for (int t = w; t < A.lay.R; t += 8) {
        float x[E];
        stream_row<D>(A, T, false, T.stream0 + t, h, lane, x);
        st_row<E>(head, A.lay.w_dtype, (size_t)t * D + lane * E, x);
        stream_row<D>(A, T, true, T.stream0 + t, h, lane, x);
        st_row<E>(vbase, A.lay.w_dtype, (size_t)t * D + lane * E, x);
    }
}

/* 3. The window after the append: rows [r0, r1) of the slot receive
 * stream tokens r + shift, rotated and rounded from the input, or (with a
 * rollback lag) moved down from older window rows; a moved row that also
 * receives a new token is written by the thread that moved it. A sink task
 * writes the sink rows [r0, r1) from the input the same way (no sums of
 * squares: sink tokens are never packed). */
template <int D>
__global__ void __launch_bounds__(256) window_kernel(AppendArgs A) {
    const WinTask T = A.wtasks[blockIdx.x];
    if (T.r1 <= T.r0 || A.failed[T.slot]) return;
    const int h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    constexpr int E = D / 32;
    uint8_t *kb = A.win_layer + (size_t)T.slot * A.lay.wlb + (T.sink ? 0 : A.lay.wsink);
    uint8_t *vb = kb + A.lay.wlb / 2;
    float *ss = A.win_ss + (size_t)T.slot * A.W;
    float x[E];
    /* row q receives new token T.in0 + q + shift */
    auto put_input = [&](int q) {
        const size_t o = ((size_t)q * A.lay.hkv + h) * D + lane * E;
        if (h == 0 && lane == 0 && !T.sink) ss[q] = A.ss_new[T.in0 + q + T.shift];
        input_row<D>(A, false, T.in0 + q + T.shift, h, lane, x);
        st_row<E>(kb, A.lay.w_dtype, o, x);
        input_row<D>(A, true, T.in0 + q + T.shift, h, lane, x);
        st_row<E>(vb, A.lay.w_dtype, o, x);
    };
    for (int r = T.r0 + blockIdx.z * 8 + w; r < T.r1; r += 8 * gridDim.z) {
        /* A row in [shift, wb) is read by the move into row r - shift and
         * may receive a new token too: the thread that moves it writes that
         * token after its read, so no other thread may write it first. */
        if (r >= T.shift && r < T.wb) continue;
        const int s = r + T.shift;
        if (s < T.wb) {
            const size_t o = ((size_t)r * A.lay.hkv + h) * D + lane * E;
            const size_t so = ((size_t)s * A.lay.hkv + h) * D + lane * E;
            if (h == 0 && lane == 0) ss[r] = ss[s];
            ld_row<E>(kb, A.lay.w_dtype, so, x);
            st_row<E>(kb, A.lay.w_dtype, o, x);
            ld_row<E>(vb, A.lay.w_dtype, so, x);
            st_row<E>(vb, A.lay.w_dtype, o, x);
            if (s < T.r1) put_input(s);
        } else {
            put_input(r);
        }
    }
}

/* ---- the call's task lists, built on the device ------------------------ */

/* Sequence i of an append call, read from device metadata. */
struct AppendSeq {
    int slot, len, n_new, row0, len_before;
    const int32_t *table;
    bool valid;
};

__device__ __forceinline__ AppendSeq append_seq(const AppendCall &C, int i) {
    AppendSeq s;
    s.slot = C.meta.slots[i];
    s.len = C.meta.lens[i];
    s.n_new = C.n_new ? C.n_new[i] : C.uniform_new;
    s.row0 = C.row0 ? C.row0[i] : i * C.uniform_new;
    s.len_before = s.len - s.n_new;
    s.valid = (unsigned)s.slot < (unsigned)C.meta.max_seqs && s.n_new >= 0 && s.n_new <= C.max_new &&
              s.len_before >= 0;
    const int row = C.meta.table_by_slot ? (s.valid ? s.slot : 0) : i;
    s.table = C.meta.tables + (size_t)row * C.meta.table_stride;
    return s;
}

/* Sequence i's flush tasks (block < 0 where it has fewer than the list
 * holds), its window task and (with sink tokens) its sink task
 * wtasks[n_seqs + i]. A sequence that starts here (nothing before this
 * append) clears its failed mark. Entries out of range are reported and
 * skipped: no task of theirs writes anything.
 * Sink tokens (config.sink_tokens = S, both APIs): lens and n_new count
 * them; the first min(len, S) tokens of the sequence go to its sink rows,
 * and the packing rule and the stream read the tokens after them
 * (oscar_config: n - S for n), so block f of the table holds tokens
 * [S + fR, S + (f+1)R). The batch API's rollback rule follows: a length
 * before the append below S + p0 R with p0 > 0 blocks packed makes
 * after_before < p0 R and is refused; with nothing packed any length is
 * valid and the sink rows past it are overwritten. S = 0 makes sb = sn = 0
 * and the code reads as it did before sinks. */
__device__ void build_seq_tasks(const AppendCall &C, int i, int R, int per_seq, const int32_t *task0,
                                PackTask *tasks, WinTask *wtasks, int32_t *failed, OscarReport *report) {
    /* Called by every thread of the CTA (it has barriers): the scalar part is
     * computed by all of them alike, the table check and the task list are
     * strided over the threads, one thread writes the slot's state. (One
     * thread doing it all took 109 us for a 128K-token append: ncu.) */
    const int tid = threadIdx.x, nth = blockDim.x;
    AppendSeq s = append_seq(C, i);
    const int first = task0 ? task0[i] : i * per_seq;
    const int count = task0 ? (task0[i + 1] - first) : per_seq;
    const int S = C.meta.sinks;
    int p0 = 0, p1 = 0, sb = 0, sn = 0; /* sink rows held before, new ones */
    if (s.valid) {
        sb = min(s.len_before, S);
        sn = min(s.len, S) - sb;
        const int after = s.len - sb - sn, after_before = s.len_before - sb; /* tokens after the sinks */
        /* a sequence that starts here starts with nothing packed */
        p0 = s.len_before == 0 ? 0 : C.meta.packed[s.slot];
        const int q = after >= C.meta.lag ? (after - C.meta.lag) / R : 0;
        p1 = q > p0 ? q : p0;
        if (p0 < 0 || after_before < p0 * R || after_before - p0 * R >= C.meta.window_rows) s.valid = false;
        /* the slot holds what was written to it: no reading past that */
        if (s.len_before != 0 && s.len_before > C.meta.held[s.slot]) s.valid = false;
        if (p1 - p0 > count || p1 > C.meta.table_stride) s.valid = false;
    }
    int bad_block = 0;
    if (s.valid)
        for (int f = p0 + tid; f < p1; f += nth) bad_block |= (unsigned)s.table[f] >= (unsigned)C.meta.block_count;
    /* also the barrier between every thread's reads of packed/held above and
     * thread 0's writes below */
    if (__syncthreads_or(bad_block)) s.valid = false;
    if (!s.valid) {
        if (tid == 0) {
            report->bad_first = i;
            __threadfence_system();
            report->bad_meta = 1;
            wtasks[i].r0 = 0, wtasks[i].r1 = 0, wtasks[i].slot = 0;
            if (S > 0) wtasks[C.n_seqs + i].r0 = 0, wtasks[C.n_seqs + i].r1 = 0, wtasks[C.n_seqs + i].slot = 0;
        }
        for (int f = tid; f < count; f += nth) tasks[first + f].block = -1;
        return;
    }
    if (tid == 0) {
        if (s.len_before == 0) failed[s.slot] = 0;
        C.meta.packed[s.slot] = p1;
        C.meta.held[s.slot] = s.len;
    }
    /* the stream: the tokens after the sinks, from input row row0 */
    const int row0 = s.row0 + sn, n_new = s.n_new - sn;
    const int n_flush = p1 - p0, wb = s.len_before - sb - p0 * R;
    for (int f = tid; f < count; f += nth) {
        PackTask T;
        T.input_row = row0;
        T.block = f < n_flush ? s.table[p0 + f] : -1;
        T.slot = s.slot;
        T.window_before = wb;
        T.stream0 = f * R;
        tasks[first + f] = T;
    }
    if (tid != 0) return;
    /* the window afterwards: stream tokens [n_flush*R, wb + n_new) */
    WinTask W;
    W.slot = s.slot;
    W.shift = n_flush * R;
    W.wb = wb;
    W.in0 = (int64_t)row0 - wb;
    W.r0 = n_flush ? 0 : wb;
    W.r1 = wb + n_new - n_flush * R;
    W.sink = 0;
    wtasks[i] = W;
    if (S > 0) {
        /* sink rows [sb, sb + sn) from input rows s.row0 .. */
        WinTask K;
        K.slot = s.slot;
        K.shift = 0;
        K.wb = 0;
        K.in0 = (int64_t)s.row0 - sb;
        K.r0 = sb;
        K.r1 = sb + sn;
        K.sink = 1;
        wtasks[C.n_seqs + i] = K;
    }
}

/* One CTA per sequence (large appends: the finite and sum-of-squares
 * kernels follow). */
__global__ void __launch_bounds__(128) build_tasks_kernel(AppendCall C, int R, int per_seq, const int32_t *task0,
                                                          PackTask *tasks, WinTask *wtasks, int32_t *failed,
                                                          OscarReport *report) {
    build_seq_tasks(C, blockIdx.x, R, per_seq, task0, tasks, wtasks, failed, report);
}

/* 1 if any of n elements (K and V, dtype) from element base is NaN or Inf;
 * the threads of `nthreads` stride over them. */
__device__ __forceinline__ int any_nonfinite(const void *k, const void *v, int dtype, int64_t base, int64_t n,
                                             int64_t first, int64_t stride) {
    int bad = 0;
    for (int64_t j = first; j < n; j += stride) {
        const int64_t e = base + j;
        if (dtype == OSCAR_DTYPE_F32) {
            uint32_t a = ((const uint32_t *)k)[e], b = ((const uint32_t *)v)[e];
            bad |= ((a & 0x7f800000u) == 0x7f800000u) | ((b & 0x7f800000u) == 0x7f800000u);
        } else {
            const uint32_t m = dtype == OSCAR_DTYPE_BF16 ? 0x7f80u : 0x7c00u;
            uint32_t a = ((const unsigned short *)k)[e], b = ((const unsigned short *)v)[e];
            bad |= ((a & m) == m) | ((b & m) == m);
        }
    }
    return bad;
}

__device__ __forceinline__ void mark_failed(int32_t *failed, OscarReport *report, int slot) {
    failed[slot] = 1;
    report->failed_slot[slot] = 1;
    __threadfence_system();
    report->nonfinite = 1;
}

/* The three steps before the pack of a small append (decode, speculative
 * decoding: at most PROLOGUE_MAX_NEW new tokens per sequence) in one launch,
 * one CTA per sequence, in the order of the three kernels they replace: the
 * builder (thread 0), then the finiteness check, then the new rows' sums of
 * squares (the same device functions, so the same bits). */
constexpr int PROLOGUE_MAX_NEW = 16;
template <int D>
__global__ void __launch_bounds__(256)
    append_prologue_kernel(AppendCall C, int R, int per_seq, const int32_t *task0, PackTask *tasks, WinTask *wtasks,
                           int32_t *failed, OscarReport *report, const void *k, const void *v, int dtype,
                           int check_finite, int hkv, int rotate, int w_dtype, float *ss_out) {
    extern __shared__ float hs[]; /* [PROLOGUE_MAX_NEW][hkv] */
    const int i = blockIdx.x;
    build_seq_tasks(C, i, R, per_seq, task0, tasks, wtasks, failed, report);
    __syncthreads(); /* the builder's failed-mark reset comes before the check */
    const AppendSeq s = append_seq(C, i);
    if (!s.valid || s.n_new <= 0) return;
    const int rows = min(s.n_new, PROLOGUE_MAX_NEW);
    if (check_finite) {
        const int64_t row_elems = (int64_t)hkv * D;
        const int bad = any_nonfinite(k, v, dtype, (int64_t)s.row0 * row_elems, (int64_t)rows * row_elems,
                                      threadIdx.x, blockDim.x);
        if (__syncthreads_or(bad) && threadIdx.x == 0) mark_failed(failed, report, s.slot);
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (!C.tp) {
        for (int task = w; task < rows * hkv; task += 8) {
            const int r = task / hkv, h = task - r * hkv;
            const float x = head_sumsq<D>(k, dtype, (int64_t)s.row0 + r, hkv, h, rotate, w_dtype, lane);
            if (lane == 0) hs[r * hkv + h] = x;
        }
    }
    __syncthreads();
    if ((int)threadIdx.x < rows)
        ss_out[s.row0 + threadIdx.x] =
            token_sumsq(hs + threadIdx.x * hkv, hkv, C.tp, C.tp_heads, (int64_t)s.row0 + threadIdx.x);
}

/* NaN/Inf in the new rows of a sequence marks it failed (after the builder
 * has cleared restarting slots, before the pack kernels read the mark). */
__global__ void finite_kernel(AppendCall C, const void *k, const void *v, int row_elems, int dtype, int32_t *failed,
                              OscarReport *report) {
    const int i = blockIdx.y;
    const AppendSeq s = append_seq(C, i);
    if (!s.valid || s.n_new <= 0) return;
    const int bad = any_nonfinite(k, v, dtype, (int64_t)s.row0 * row_elems, (int64_t)s.n_new * row_elems,
                                  (int64_t)blockIdx.x * blockDim.x + threadIdx.x, (int64_t)gridDim.x * blockDim.x);
    if (__syncthreads_or(bad) && threadIdx.x == 0) mark_failed(failed, report, s.slot);
}

template <int D>
oscar_status launch_append_d(oscar_cache *c, const AppendArgs &A, int n_tasks, int n_wtasks, int max_wrows,
                             cudaStream_t st) {
    const oscar_layout *L = &c->lay;
    if (n_tasks > 0) {
        if (L->quantised) {
            if (fused_ok(L, cuda_state(c)->smem_optin) && ((((uintptr_t)A.k) | ((uintptr_t)A.v)) & 15) == 0) {
                const size_t fsmem = fused_smem_bytes(L);
                dim3 fgrid(n_tasks, A.lay.R / A.lay.Gk);
                if (L->window_dtype == OSCAR_DTYPE_BF16) {
                    fused_pack_kernel<D, true><<<fgrid, 256, fsmem, st>>>(A);
                } else {
                    fused_pack_kernel<D, false><<<fgrid, 256, fsmem, st>>>(A);
                }
                OSCAR_CK_LAUNCH(c, "fused_pack_kernel");
            } else {
            if (L->scale_keys && !L->norm_per_head) { /* per-head norms: pack_kernel */
                norm_kernel<<<n_tasks, 128, 0, st>>>(A);
                OSCAR_CK_LAUNCH(c, "norm_kernel");
            }
            const int NG = D / A.lay.Gv;
            size_t smem = ((size_t)2 * A.lay.Gk * (D + 1) + 3 * D + (size_t)3 * A.lay.Gk * NG) * sizeof(float);
            dim3 grid(n_tasks, A.lay.hkv, A.lay.R / A.lay.Gk);
            pack_kernel<D><<<grid, 256, smem, st>>>(A);
            OSCAR_CK_LAUNCH(c, "pack_kernel");
            }
        } else {
            pack_none_kernel<D><<<dim3(n_tasks, A.lay.hkv), 256, 0, st>>>(A);
            OSCAR_CK_LAUNCH(c, "pack_none_kernel");
        }
    }
    if (n_wtasks > 0) {
        int zs = (max_wrows + 7) / 8;
        if (zs < 1) zs = 1;
        if (zs > 16) zs = 16;
        window_kernel<D><<<dim3(n_wtasks, A.lay.hkv, zs), 256, 0, st>>>(A);
        OSCAR_CK_LAUNCH(c, "window_kernel");
    }
    return OSCAR_OK;
}

template <int D>
cudaError_t set_pack_smem(size_t bytes) {
    return cudaFuncSetAttribute(pack_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <int D>
cudaError_t set_fused_smem(size_t bytes) {
    cudaError_t e = cudaFuncSetAttribute(fused_pack_kernel<D, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(fused_pack_kernel<D, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
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
    /* per-kernel limits are device-wide: the device's maximum, so that no
     * later cache of another shape can lower them (attention.cu says why) */
    const size_t limit = S->smem_optin;
    cudaError_t e = cudaSuccess;
    if (L->d == 64) e = set_pack_smem<64>(limit);
    if (L->d == 128) e = set_pack_smem<128>(limit);
    if (L->d == 256) e = set_pack_smem<256>(limit);
    if (e != cudaSuccess)
        return oscar_set_error(c, OSCAR_E_BACKEND, "CUDA: cudaFuncSetAttribute(pack_kernel): %s",
                               cudaGetErrorString(e));
    if (fused_ok(L, S->smem_optin)) {
        if (L->d == 64) e = set_fused_smem<64>(limit);
        if (L->d == 128) e = set_fused_smem<128>(limit);
        if (L->d == 256) e = set_fused_smem<256>(limit);
        if (e != cudaSuccess)
            return oscar_set_error(c, OSCAR_E_BACKEND, "CUDA: cudaFuncSetAttribute(fused_pack_kernel): %s",
                                   cudaGetErrorString(e));
    }
    return OSCAR_OK;
}

void oscar_cuda_task_capacity(const oscar_config *cfg, size_t *tasks, size_t *wtasks) {
    /* sequence API: at most every block of the pool in one call, plus one
     * spare per sequence; batch API: per sequence the flushes of
     * OSCAR_MAX_Q_LEN new tokens after R-1 window tokens */
    const size_t R = (size_t)cfg->residual;
    const size_t per_seq = (R - 1 + (size_t)cfg->rollback_tokens + OSCAR_MAX_Q_LEN) / R;
    size_t a = (size_t)cfg->block_count + (size_t)cfg->max_seqs;
    size_t b = (size_t)cfg->max_seqs * per_seq;
    *tasks = a > b ? a : b;
    *wtasks = (size_t)cfg->max_seqs * (cfg->sink_tokens > 0 ? 2 : 1); /* window (and sink) rows */
}

oscar_status oscar_cuda_row_sumsq(oscar_cache *c, int64_t n_rows, const void *k, oscar_dtype dtype, const float *tp,
                                  int tp_heads, float *head_out, float *ss_out, cudaStream_t st) {
    const oscar_layout *L = &c->lay;
    if (n_rows <= 0) return OSCAR_OK;
    const size_t smem = (size_t)SUMSQ_ROWS * (size_t)L->hkv * sizeof(float);
    const unsigned grid = (unsigned)((n_rows + SUMSQ_ROWS - 1) / SUMSQ_ROWS);
    if (L->d == 64)
        row_sumsq_kernel<64><<<grid, 256, smem, st>>>(k, (int)dtype, n_rows, L->hkv, L->rotate, L->window_dtype, tp,
                                                     tp_heads, head_out, ss_out);
    else if (L->d == 128)
        row_sumsq_kernel<128><<<grid, 256, smem, st>>>(k, (int)dtype, n_rows, L->hkv, L->rotate, L->window_dtype, tp,
                                                      tp_heads, head_out, ss_out);
    else
        row_sumsq_kernel<256><<<grid, 256, smem, st>>>(k, (int)dtype, n_rows, L->hkv, L->rotate, L->window_dtype, tp,
                                                      tp_heads, head_out, ss_out);
    OSCAR_CK_LAUNCH(c, "row_sumsq_kernel");
    return OSCAR_OK;
}

/* Builds the task lists on the device and launches the append kernels.
 * task0 (device, n_seqs + 1 entries) gives each sequence's first task
 * (sequence API: exact counts); NULL sizes every sequence for max_new. */
oscar_status oscar_cuda_append_call_tasks(oscar_cache *c, int layer, const AppendCall &C, const int32_t *task0,
                                          int n_tasks, const void *k, const void *v, oscar_dtype dtype,
                                          cudaStream_t st) {
    CudaState *S = cuda_state(c);
    const oscar_layout *L = &c->lay;
    const int R = L->residual;
    const int per_seq = (R - 1 + C.meta.lag + C.max_new) / R;
    if (!task0) n_tasks = C.n_seqs * per_seq;
    /* window tasks: one per sequence, and one more for its sink rows */
    const int n_wtasks = C.meta.sinks > 0 ? 2 * C.n_seqs : C.n_seqs;
    if ((size_t)n_tasks > S->max_tasks || (size_t)n_wtasks > S->max_wtasks)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                               "append: %d pack tasks and %d window tasks for %d sequences exceed the workspace's "
                               "%zu / %zu",
                               n_tasks, n_wtasks, C.n_seqs, S->max_tasks, S->max_wtasks);
    oscar_status rc;
    if ((size_t)C.total_rows > S->ss_cap)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "append: %lld rows exceed the workspace's %zu",
                               (long long)C.total_rows, S->ss_cap);
    if (C.max_new <= PROLOGUE_MAX_NEW) {
        /* one launch for builder + finiteness + sums of squares */
        const size_t smem = (size_t)PROLOGUE_MAX_NEW * L->hkv * sizeof(float);
        const int cf = c->cfg.check_finite;
#define OSCAR_PROLOGUE(D_)                                                                                      \
    append_prologue_kernel<D_><<<C.n_seqs, 256, smem, st>>>(C, R, per_seq, task0, S->tasks, S->wtasks, S->failed, \
                                                            S->report, k, v, (int)dtype, cf, L->hkv, L->rotate,   \
                                                            L->window_dtype, S->ss_new)
        if (L->d == 64) OSCAR_PROLOGUE(64);
        else if (L->d == 128) OSCAR_PROLOGUE(128);
        else OSCAR_PROLOGUE(256);
#undef OSCAR_PROLOGUE
        OSCAR_CK_LAUNCH(c, "append_prologue_kernel");
    } else {
    build_tasks_kernel<<<C.n_seqs, 128, 0, st>>>(C, R, per_seq, task0, S->tasks, S->wtasks, S->failed, S->report);
    OSCAR_CK_LAUNCH(c, "build_tasks_kernel");
    if (c->cfg.check_finite && C.total_rows > 0) {
        const int row_elems = L->hkv * L->d;
        int64_t per = ((int64_t)C.max_new * row_elems + 255) / 256;
        if (per > 64) per = 64;
        if (per < 1) per = 1;
        finite_kernel<<<dim3((unsigned)per, (unsigned)C.n_seqs), 256, 0, st>>>(C, k, v, row_elems, (int)dtype,
                                                                             S->failed, S->report);
        OSCAR_CK_LAUNCH(c, "finite_kernel");
    }
    if (C.total_rows > 0) {
        rc = oscar_cuda_row_sumsq(c, C.total_rows, k, dtype, C.tp, C.tp_heads, nullptr, S->ss_new, st);
        if (rc != OSCAR_OK) return rc;
    }
    }
    AppendArgs A;
    A.pool_layer = S->pool + (size_t)layer * c->cfg.block_count * L->layer_block_bytes;
    A.win_layer = S->windows + (size_t)layer * c->cfg.max_seqs * L->window_layer_bytes;
    A.win_ss = S->win_ss + (size_t)layer * c->cfg.max_seqs * L->window_rows;
    A.ss_new = S->ss_new;
    A.W = L->window_rows;
    A.failed = S->failed;
    A.k = k;
    A.v = v;
    A.tasks = S->tasks;
    A.wtasks = S->wtasks;
    A.in_dtype = (int)dtype;
    A.lay = S->dlay;
    A.clip = L->clip;
    const int max_wrows = C.meta.window_rows > C.meta.sinks ? C.meta.window_rows : C.meta.sinks;
    switch (L->d) {
    case 64: return launch_append_d<64>(c, A, n_tasks, n_wtasks, max_wrows, st);
    case 128: return launch_append_d<128>(c, A, n_tasks, n_wtasks, max_wrows, st);
    case 256: return launch_append_d<256>(c, A, n_tasks, n_wtasks, max_wrows, st);
    default: return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "CUDA backend: head_dim %d", L->d);
    }
}
