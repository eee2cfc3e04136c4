/* kv_bf16.cu - a paged BF16 KV cache: append, split-KV decode attention, the
 * split merge, and a scalar reference kernel. Interface: kv_bf16.h.
 *
 * Attention (attn_kernel): flash decoding. Grid (split, kv head x 16-row query
 * chunk, sequence), 4 warps per CTA. All g = Hq/Hkv query heads of a KV head
 * (times q_len) are the M rows of mma.m16n8k16 (bf16 in, fp32 accumulate), so
 * every K/V byte is read once per 16 query rows. A CTA streams its split's
 * range of CH-token chunks (CH = 64, 128 at d=64) through an NS-stage
 * cp.async pipeline (16-byte copies, one 16-byte column per thread, rows
 * XOR-swizzled so that ldmatrix is conflict-free); each warp takes its own
 * 16-token tiles of every chunk and keeps its own online softmax (fp32, base
 * 2, scale folded into one FFMA per logit), so the only CTA-wide barrier is
 * the one per chunk that recycles a stage. Block ids are read one chunk ahead
 * of the copies that use them. At the end the 4 warp states are combined in
 * shared memory; with one split the CTA writes bf16 output directly,
 * otherwise fp32 partials (unnormalised O, log2-domain max, sum) go to the
 * workspace and merge_kernel combines the splits.
 *
 * Per 16-token tile and warp (d=128): 8 ldmatrix.x4 + 16 mma for Q.K^T, the
 * softmax on 8 logits per lane, 8 ldmatrix.x4.trans + 16 mma for P.V: ~100
 * instructions per 8 KB read, far below what the SM can issue while HBM
 * delivers those 8 KB, so the kernel is bound by bytes.
 *
 * The split count depends only on host values (num_seqs, q_len, max_seq_len,
 * the device, the workspace size); each CTA derives its chunk range from its
 * sequence's current length, so a captured call replays correctly as
 * lengths grow. */
#include "kv_bf16.h"

#ifdef KVBF16_EMULATE
/* Checking harness only (not part of the build): KVBF16_EMULATE names a
 * header that emulates, on the host, the CUDA features used below (lanes in
 * lockstep, ldmatrix/mma fragments as the PTX ISA defines them, cp.async
 * completing at wait_group), so this file's kernels and host code run
 * without a GPU. */
#include KVBF16_EMULATE
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define KV_DYNAMIC_SMEM(name) extern __shared__ __align__(128) uint8_t name[]
#define KV_LAUNCH(kernel, grid, block, smem, stream, arg) kernel<<<grid, block, smem, stream>>>(arg)
#endif
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int TILE = 16;        /* tokens per mma tile                          */
constexpr int QROWS = 16;       /* query rows per CTA: the mma M dimension      */
constexpr int MAX_SPLITS = 256; /* merge_kernel's weight buffer                 */
constexpr int MERGE_WARPS = 8;
constexpr unsigned FULL = 0xffffffffu;

/* Per head dim: tiles per warp per chunk, pipeline stages, CTAs per SM. */
template <int D>
struct Shape;
template <>
struct Shape<64> {
    static constexpr int TPW = 2, NS = 3, MINB = 2;
};
template <>
struct Shape<128> {
    static constexpr int TPW = 1, NS = 3, MINB = 2;
};
template <>
struct Shape<256> {
    static constexpr int TPW = 1, NS = 3, MINB = 1;
};

template <int D>
struct Geo {
    static constexpr int TPW = Shape<D>::TPW, NS = Shape<D>::NS;
    static constexpr int CH = WARPS * TPW * TILE; /* tokens per chunk (stage)     */
    static constexpr int RB = D * 2;              /* bytes of one token row       */
    static constexpr int CPR = RB / 16;           /* 16-byte columns per row      */
    static constexpr int KB = CH * RB;            /* K (or V) bytes of a stage    */
    static constexpr int SB = 2 * KB;             /* stage bytes                  */
    static constexpr int RSTEP = THREADS / CPR;   /* rows per copy pass           */
    static constexpr int PASSES = CH / RSTEP;     /* copy passes per stage        */
    static constexpr int NT = CH / TILE;          /* tiles per stage              */
    static constexpr int QB = QROWS * RB;         /* the query tile               */
    static constexpr int OS = D + 8;              /* epilogue row stride (floats) */
    static constexpr int OFF_Q = NS * SB;
    static constexpr int OFF_ML = OFF_Q + QB;
    /* m[WARPS][16], l[WARPS][16], weights[16][WARPS], row max[16], row sum[16] */
    static constexpr int SMEM = OFF_ML + (2 * WARPS * QROWS + QROWS * WARPS + 2 * QROWS) * 4;
    static_assert(TILE % RSTEP == 0, "a copy pass stays inside one tile");
    static_assert(CPR >= 8, "the swizzle needs 8 columns per row");
    static_assert(WARPS * QROWS * OS * 4 <= NS * SB, "epilogue fits in the stages");
};

struct AttnParams {
    const uint8_t *pool;
    const int32_t *lens;
    const int32_t *tables;
    const uint16_t *q;
    uint16_t *out;
    float *ws;
    long long block_bytes; /* one block, all layers                      */
    long long layer_off;   /* bytes from a block to this layer's K pages */
    long long page_bytes;  /* one (K or V, head) page: bt * D * 2        */
    long long v_off;       /* from a K page to its V page                */
    long long ml_off;      /* floats from ws to the (max, sum) pairs     */
    int hkv, hq, G, q_len, rows, qchunks;
    int bt_mask, lbt, stride, num_blocks, max_len, splits;
    float c; /* softmax_scale * log2(e) */
};

/* ---- PTX wrappers --------------------------------------------------------- */
#ifndef KVBF16_EMULATE
/* shared with the oscar kernels: src/cuda/ptx.cuh */
#include "../../src/cuda/ptx.cuh"
using oscar_ptx::cp_async16;
using oscar_ptx::cp_async_commit;
using oscar_ptx::cp_async_wait;
using oscar_ptx::ldsm_x4;
using oscar_ptx::ldsm_x4_t;
using oscar_ptx::mma_bf16;
using oscar_ptx::smem_u32;

/* 2^x, one MUFU.EX2; ex2(-inf) = 0. */
__device__ __forceinline__ float ex2(float x) { return oscar_ptx::ex2_ftz(x); }

#endif /* KVBF16_EMULATE */

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

__device__ __forceinline__ float bf16_to_f(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

__device__ __forceinline__ uint16_t f_to_bf16(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

/* ---- attention: named pieces -------------------------------------------------- */

/* Query rows qc*16 .. qc*16+15 of (sequence, kv head) into shared memory,
 * [16][D] bf16 with the 16-byte columns of row r XOR-ed by r & 7; rows past
 * the call's g * q_len are zero. Row gr is query qi = gr / g, head hj = gr % g. */
template <int D>
__device__ __forceinline__ void load_q(const AttnParams &P, uint8_t *qs, int seq, int h, int qc) {
    constexpr int CPR = Geo<D>::CPR, RB = Geo<D>::RB;
    for (int i = threadIdx.x; i < QROWS * CPR; i += THREADS) {
        const int r = i / CPR, c = i - r * CPR;
        const int gr = qc * QROWS + r;
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (gr < P.rows) {
            const int qi = gr / P.G, hj = gr - qi * P.G;
            const uint16_t *src = P.q + (((size_t)seq * P.q_len + qi) * P.hq + (size_t)h * P.G + hj) * D + c * 8;
#pragma unroll
            for (int e = 0; e < 4; e++) w[e] = (uint32_t)src[2 * e] | ((uint32_t)src[2 * e + 1] << 16);
        }
        *reinterpret_cast<uint4 *>(qs + r * RB + ((c ^ (r & 7)) << 4)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

/* Block ids of the NT tiles of chunk `chunk` (-1 for tiles past the length).
 * Only loads are issued here; the values are used one chunk later. */
template <int D>
__device__ __forceinline__ void load_pages(const AttnParams &P, const int32_t *table, int chunk, bool live, int Lv,
                                           int (&pg)[Geo<D>::NT]) {
    constexpr int CH = Geo<D>::CH, NT = Geo<D>::NT;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int tok = chunk * CH + j * TILE;
        pg[j] = (live && tok < Lv) ? __ldg(table + (tok >> P.lbt)) : -1;
    }
}

/* Issues the copies of one chunk (K and V rows) into stage buffer `buf`:
 * thread column tid % CPR, rows tid / CPR + p * RSTEP. Rows past the length
 * or with a block id out of range are zero-filled (bad is set for the latter). */
template <int D>
__device__ __forceinline__ void load_chunk(const AttnParams &P, const uint8_t *head_base, uint8_t *buf, int chunk,
                                           int Lv, const int (&pg)[Geo<D>::NT], bool &bad) {
    using GE = Geo<D>;
    const int col = threadIdx.x % GE::CPR, row0 = threadIdx.x / GE::CPR;
#pragma unroll
    for (int p = 0; p < GE::PASSES; p++) {
        const int r = row0 + p * GE::RSTEP;
        const int j = (p * GE::RSTEP) / TILE;
        const int tok = chunk * GE::CH + r;
        const int b = pg[j];
        const bool live = tok < Lv;
        const bool ok = live && (unsigned)b < (unsigned)P.num_blocks;
        bad |= live && !ok;
        const uint8_t *src =
            ok ? head_base + (long long)b * P.block_bytes + (long long)(tok & P.bt_mask) * GE::RB + col * 16 : P.pool;
        const uint32_t dst = smem_u32(buf + r * GE::RB + ((col ^ (r & 7)) << 4));
        cp_async16(dst, src, ok ? 16u : 0u);
        cp_async16(dst + GE::KB, ok ? src + P.v_off : P.pool, ok ? 16u : 0u);
    }
    cp_async_commit();
}

/* The query A fragments of k-step ks: rows (lane & 7) + 8 * (mi & 1), column
 * 2ks + (mi >> 1), mi = lane >> 3. */
template <int D>
__device__ __forceinline__ void q_frag(uint32_t (&a)[4], uint32_t qs_addr, int ks, int lane) {
    const int mi = lane >> 3, r8 = lane & 7;
    const uint32_t row = qs_addr + (uint32_t)((r8 + 8 * (mi & 1)) * Geo<D>::RB);
    ldsm_x4(a, row + ((uint32_t)((2 * ks) ^ ((mi >> 1) ^ r8)) << 4));
}

/* Logits of one 16-token tile: s[nt][i] = q(row g + 8*(i>>1)) . k(token
 * 8*nt + 2t + (i&1)), raw (unscaled). K rows are the B operand (n = token):
 * ldmatrix.x4 gives b0/b1 of both 8-token halves for one k-step. */
template <int D, bool QREG>
__device__ __forceinline__ void qk_scores(float (&s)[2][4], const uint32_t (&qa)[QREG ? D / 16 : 1][4],
                                          uint32_t qs_addr, uint32_t ktile, int lane) {
    const int mi = lane >> 3, r8 = lane & 7;
    const uint32_t row = ktile + (uint32_t)((r8 + 8 * (mi >> 1)) * Geo<D>::RB);
    const int kx = (mi & 1) ^ r8;
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) s[nt][i] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        uint32_t b[4];
        ldsm_x4(b, row + ((uint32_t)((2 * ks) ^ kx) << 4));
        if constexpr (QREG) {
            mma_bf16(s[0], qa[ks], b[0], b[1]);
            mma_bf16(s[1], qa[ks], b[2], b[3]);
        } else {
            uint32_t a[4];
            q_frag<D>(a, qs_addr, ks, lane);
            mma_bf16(s[0], a, b[0], b[1]);
            mma_bf16(s[1], a, b[2], b[3]);
        }
    }
}

/* Online softmax over one tile for this lane's rows g (r=0) and g+8 (r=1):
 * causal mask (token > lim[r] -> -inf; also masks zero-filled rows past the
 * length), running max m (raw units), running sum l (this lane's columns
 * only), rescale of acc when a max moved, and the P operand as bf16 pairs. */
template <int NA>
__device__ __forceinline__ void softmax_tile(float (&s)[2][4], float (&m)[2], float (&l)[2], float (&acc)[NA][4],
                                             uint32_t (&pa)[4], int tok0, const int (&lim)[2], int lim_min, float c,
                                             int t) {
    if (tok0 + TILE - 1 > lim_min) {
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (tok0 + nt * 8 + 2 * t + (i & 1) > lim[i >> 1]) s[nt][i] = -INFINITY;
    }
    float mx[2];
    mx[0] = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    mx[1] = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
    float alpha[2], mu[2];
    bool same = true;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 2));
        const float mnew = fmaxf(m[r], mx[r]);
        mu[r] = mnew == -INFINITY ? 0.0f : mnew * c;
        alpha[r] = mnew == m[r] ? 1.0f : ex2(m[r] * c - mu[r]);
        same = same && mnew == m[r];
        m[r] = mnew;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s[nt][i] = ex2(fmaf(s[nt][i], c, -mu[i >> 1]));
            sum[i >> 1] += s[nt][i];
        }
    l[0] = l[0] * alpha[0] + sum[0];
    l[1] = l[1] * alpha[1] + sum[1];
    if (!__all_sync(FULL, same)) {
#pragma unroll
        for (int n = 0; n < NA; n++) {
            acc[n][0] *= alpha[0];
            acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1];
            acc[n][3] *= alpha[1];
        }
    }
    /* C layout of the two 8-token halves = A layout of one k16 step */
    pa[0] = pack_bf16(s[0][0], s[0][1]);
    pa[1] = pack_bf16(s[0][2], s[0][3]);
    pa[2] = pack_bf16(s[1][0], s[1][1]);
    pa[3] = pack_bf16(s[1][2], s[1][3]);
}

/* acc[n] (channels 8n .. 8n+7) += P . V of one tile; V rows are the B operand
 * (k = token), read transposed: ldmatrix.x4.trans gives b0/b1 of two 8-channel
 * tiles. */
template <int D>
__device__ __forceinline__ void pv_accumulate(float (&acc)[D / 8][4], const uint32_t (&pa)[4], uint32_t vtile,
                                              int lane) {
    const int mi = lane >> 3, r8 = lane & 7;
    const uint32_t row = vtile + (uint32_t)((r8 + 8 * (mi & 1)) * Geo<D>::RB);
    const int vx = (mi >> 1) ^ r8;
#pragma unroll
    for (int j = 0; j < D / 16; j++) {
        uint32_t b[4];
        ldsm_x4_t(b, row + ((uint32_t)((2 * j) ^ vx) << 4));
        mma_bf16(acc[2 * j], pa, b[0], b[1]);
        mma_bf16(acc[2 * j + 1], pa, b[2], b[3]);
    }
}

/* Combines the 4 warp states of the CTA (shared memory, aliasing the
 * stages) and writes bf16 output (one split) or the split's partial. */
template <int D>
__device__ __forceinline__ void cta_combine(const AttnParams &P, uint8_t *smem, const float (&acc)[D / 8][4],
                                            const float (&m)[2], const float (&l)[2], bool bad, int seq, int h,
                                            int qc, int rows_here) {
    using GE = Geo<D>;
    constexpr int OS = GE::OS;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    float *Ow = reinterpret_cast<float *>(smem) + warp * QROWS * OS;
    float *ms = reinterpret_cast<float *>(smem + GE::OFF_ML);
    float *ls = ms + WARPS * QROWS, *wt = ls + WARPS * QROWS, *rowM = wt + QROWS * WARPS, *rowL = rowM + QROWS;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        const int ch = n * 8 + 2 * t;
        *reinterpret_cast<float2 *>(Ow + g * OS + ch) = make_float2(acc[n][0], acc[n][1]);
        *reinterpret_cast<float2 *>(Ow + (g + 8) * OS + ch) = make_float2(acc[n][2], acc[n][3]);
    }
    if (t == 0) {
        ms[warp * QROWS + g] = m[0] == -INFINITY ? -INFINITY : m[0] * P.c;
        ms[warp * QROWS + g + 8] = m[1] == -INFINITY ? -INFINITY : m[1] * P.c;
        ls[warp * QROWS + g] = l[0];
        ls[warp * QROWS + g + 8] = l[1];
    }
    __syncthreads();
    if (tid < QROWS) {
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, ms[w * QROWS + tid]);
        float L = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const float mw = ms[w * QROWS + tid];
            const float x = (M == -INFINITY || mw == -INFINITY) ? 0.0f : ex2(mw - M);
            wt[tid * WARPS + w] = x;
            L += x * ls[w * QROWS + tid];
        }
        rowM[tid] = M;
        rowL[tid] = L;
    }
    __syncthreads();
    const float *O0 = reinterpret_cast<const float *>(smem);
    if (P.splits == 1) {
        for (int i = tid; i < rows_here * D; i += THREADS) {
            const int r = i / D, ch = i - r * D;
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) o += wt[r * WARPS + w] * O0[(w * QROWS + r) * OS + ch];
            const float val = bad ? qnan() : o / rowL[r];
            const int gr = qc * QROWS + r, qi = gr / P.G, hj = gr - qi * P.G;
            P.out[(((size_t)seq * P.q_len + qi) * P.hq + (size_t)h * P.G + hj) * D + ch] = f_to_bf16(val);
        }
    } else {
        const size_t tile = ((size_t)seq * gridDim.y + blockIdx.y) * P.splits + blockIdx.x;
        float *wo = P.ws + tile * QROWS * D;
        for (int i = tid; i < rows_here * D; i += THREADS) {
            const int r = i / D, ch = i - r * D;
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) o += wt[r * WARPS + w] * O0[(w * QROWS + r) * OS + ch];
            wo[i] = o;
        }
        if (tid < rows_here) {
            float *ml = P.ws + P.ml_off + tile * QROWS * 2;
            ml[2 * tid] = rowM[tid];
            ml[2 * tid + 1] = bad ? qnan() : rowL[tid];
        }
    }
}

template <int D>
__global__ void __launch_bounds__(THREADS, Shape<D>::MINB) attn_kernel(const __grid_constant__ AttnParams P) {
    using GE = Geo<D>;
    constexpr int NS = GE::NS, CH = GE::CH, NT = GE::NT, TPW = GE::TPW;
    constexpr bool QREG = D <= 128; /* d=256 reads Q fragments from shared memory */
    KV_DYNAMIC_SMEM(smem);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3, g = lane >> 2;
    const int split = blockIdx.x, y = blockIdx.y, seq = blockIdx.z;
    const int h = y / P.qchunks, qc = y - h * P.qchunks;
    const int rows_here = min(QROWS, P.rows - qc * QROWS);

    /* sequence metadata; a bad length makes the sequence empty and NaN */
    const int len = P.lens[seq];
    const bool bad_len = !(len >= P.q_len && len <= P.max_len && (long long)len <= ((long long)P.stride << P.lbt));
    const int Lv = bad_len ? 0 : len;
    const int nchunks = (Lv + CH - 1) / CH;
    const int per = (nchunks + P.splits - 1) / P.splits;
    const int c0 = min(nchunks, split * per);
    const int n = min(nchunks, c0 + per) - c0;
    const int32_t *table = P.tables + (size_t)seq * P.stride;
    const uint8_t *head_base = P.pool + P.layer_off + (long long)h * P.page_bytes;
    uint8_t *qs = smem + GE::OFF_Q;
    const uint32_t qs_addr = smem_u32(qs);

    /* causal limit of this lane's rows g, g+8 (padding rows: the last query) */
    int lim[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int gr = qc * QROWS + g + 8 * r;
        const int qi = gr < P.rows ? gr / P.G : P.q_len - 1;
        lim[r] = Lv - P.q_len + qi;
    }
    const int lim_min = Lv - P.q_len + (qc * QROWS) / P.G;

    /* pipeline prologue: block ids one chunk ahead of their copies */
    bool bad_blk = false;
    int pg[NT];
    load_pages<D>(P, table, c0, 0 < n, Lv, pg);
    load_q<D>(P, qs, seq, h, qc);
#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < n) {
            int cur[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) cur[j] = pg[j];
            load_pages<D>(P, table, c0 + s + 1, s + 1 < n, Lv, pg);
            load_chunk<D>(P, head_base, smem + s * GE::SB, c0 + s, Lv, cur, bad_blk);
        } else {
            cp_async_commit();
        }
    }
    __syncthreads(); /* the query tile */
    uint32_t qa[QREG ? D / 16 : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) q_frag<D>(qa[ks], qs_addr, ks, lane);
    }

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    int stage = 0;
    for (int it = 0; it < n; it++) {
        cp_async_wait<NS - 2>();
        __syncthreads(); /* chunk `it` landed for all threads; stage it-1 is free */
        {
            const int s = it + NS - 1;
            if (s < n) {
                int cur[NT];
#pragma unroll
                for (int j = 0; j < NT; j++) cur[j] = pg[j];
                load_pages<D>(P, table, c0 + s + 1, s + 1 < n, Lv, pg);
                const int sb = stage == 0 ? NS - 1 : stage - 1;
                load_chunk<D>(P, head_base, smem + sb * GE::SB, c0 + s, Lv, cur, bad_blk);
            } else {
                cp_async_commit();
            }
        }
        const uint32_t kbuf = smem_u32(smem + stage * GE::SB);
#pragma unroll
        for (int tt = 0; tt < TPW; tt++) {
            const int tile = warp * TPW + tt;
            const int tok0 = (c0 + it) * CH + tile * TILE;
            if (tok0 >= Lv) break; /* zero-filled tile past the length */
            float s[2][4];
            uint32_t pa[4];
            qk_scores<D, QREG>(s, qa, qs_addr, kbuf + tile * TILE * GE::RB, lane);
            softmax_tile<D / 8>(s, m, l, acc, pa, tok0, lim, lim_min, P.c, t);
            pv_accumulate<D>(acc, pa, kbuf + GE::KB + tile * TILE * GE::RB, lane);
        }
        stage = stage == NS - 1 ? 0 : stage + 1;
    }

    /* row sums over the 4 lanes of a row */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(FULL, l[r], 1);
        l[r] += __shfl_xor_sync(FULL, l[r], 2);
    }
    cp_async_wait<0>();
    /* every warp is done with the stages; any bad block id in the CTA */
    const bool bad = __syncthreads_or(bad_blk || bad_len) != 0;
    cta_combine<D>(P, smem, acc, m, l, bad, seq, h, qc, rows_here);
}

/* Combines the splits of one (sequence, kv head, row chunk): a warp per row;
 * lanes reduce the (max, sum) pairs over the splits, then each lane sums its
 * channels over the splits. Grid (kv head x row chunk, sequence). */
template <int D>
__global__ void __launch_bounds__(MERGE_WARPS * 32) merge_kernel(const __grid_constant__ AttnParams P) {
    __shared__ float wgt[MERGE_WARPS][MAX_SPLITS];
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int y = blockIdx.x, seq = blockIdx.y;
    const int h = y / P.qchunks, qc = y - h * P.qchunks;
    const int rows_here = min(QROWS, P.rows - qc * QROWS);
    const int S = P.splits;
    const size_t tile0 = ((size_t)seq * gridDim.x + y) * S;
    const float *ml = P.ws + P.ml_off + tile0 * QROWS * 2;
    for (int r = warp; r < rows_here; r += MERGE_WARPS) {
        float M = -INFINITY;
        for (int s = lane; s < S; s += 32) M = fmaxf(M, ml[(size_t)s * QROWS * 2 + 2 * r]);
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) M = fmaxf(M, __shfl_xor_sync(FULL, M, o));
        float L = 0.0f;
        for (int s = lane; s < S; s += 32) {
            const float ms = ml[(size_t)s * QROWS * 2 + 2 * r];
            const float w = (ms == -INFINITY) ? 0.0f : ex2(ms - M);
            wgt[warp][s] = w;
            L += w * ml[(size_t)s * QROWS * 2 + 2 * r + 1]; /* 0 * NaN keeps a bad split's NaN */
        }
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) L += __shfl_xor_sync(FULL, L, o);
        __syncwarp();
        float acc[E];
#pragma unroll
        for (int i = 0; i < E; i++) acc[i] = 0.0f;
        const float *src = P.ws + tile0 * QROWS * D + (size_t)r * D + lane;
#pragma unroll 4
        for (int s = 0; s < S; s++) {
            const float w = wgt[warp][s];
#pragma unroll
            for (int i = 0; i < E; i++) acc[i] += w * src[(size_t)s * QROWS * D + 32 * i];
        }
        const int gr = qc * QROWS + r, qi = gr / P.G, hj = gr - qi * P.G;
        uint16_t *dst = P.out + (((size_t)seq * P.q_len + qi) * P.hq + (size_t)h * P.G + hj) * D + lane;
#pragma unroll
        for (int i = 0; i < E; i++) dst[32 * i] = f_to_bf16(acc[i] / L);
        __syncwarp();
    }
}

/* ---- append ---------------------------------------------------------------- */

struct AppendParams {
    uint8_t *pool;
    const uint8_t *k, *v;
    const int32_t *lens, *tables;
    long long block_bytes, layer_off, page_bytes, v_off;
    long long total; /* 16-byte pieces: 2 * rows * hkv * cpr */
    int rows, T, hkv, cpr, rb, bt_mask, lbt, stride, num_blocks;
};

/* One 16-byte piece per thread (grid-stride): piece i = ((kv * rows + row) *
 * hkv + h) * cpr + c, so a warp reads consecutive input bytes and writes
 * whole page rows. VEC: 16-byte loads and stores (inputs 16-byte aligned). */
template <bool VEC>
__global__ void __launch_bounds__(256) append_kernel(const __grid_constant__ AppendParams A) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < A.total;
         i += (long long)gridDim.x * blockDim.x) {
        long long rest = i;
        const int c = (int)(rest % A.cpr);
        rest /= A.cpr;
        const int h = (int)(rest % A.hkv);
        rest /= A.hkv;
        const int row = (int)(rest % A.rows);
        const int kv = (int)(rest / A.rows);
        const int seq = row / A.T, j = row - seq * A.T;
        const int len = A.lens[seq];
        const int pos = len - A.T + j;
        if (len < A.T || (pos >> A.lbt) >= A.stride) continue;
        const int b = A.tables[(size_t)seq * A.stride + (pos >> A.lbt)];
        if ((unsigned)b >= (unsigned)A.num_blocks) continue;
        uint8_t *dst = A.pool + (long long)b * A.block_bytes + A.layer_off + kv * A.v_off + h * A.page_bytes +
                       (long long)(pos & A.bt_mask) * A.rb + c * 16;
        const uint8_t *src = (kv ? A.v : A.k) + ((size_t)row * A.hkv + h) * A.rb + c * 16;
        if constexpr (VEC) {
            *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
        } else {
            const uint16_t *s16 = reinterpret_cast<const uint16_t *>(src);
            uint16_t *d16 = reinterpret_cast<uint16_t *>(dst);
#pragma unroll
            for (int e = 0; e < 8; e++) d16[e] = s16[e];
        }
    }
}

/* ---- the scalar reference ------------------------------------------------------ */

struct RefParams {
    const uint16_t *pool;
    const int32_t *lens, *tables;
    const uint16_t *q;
    uint16_t *out;
    long long block_elems, layer_off, page_elems, v_off; /* elements */
    int D, hkv, hq, G, q_len, bt, stride, num_blocks;
    float scale;
};

/* One CTA of D threads per (sequence, query, q head); thread c owns channel
 * c. For every visible token in order: logit = block-reduced q . k times the
 * scale, then the textbook online softmax in fp32 with expf. */
__global__ void __launch_bounds__(256) reference_kernel(const __grid_constant__ RefParams R) {
    __shared__ float red[8];
    __shared__ float logit;
    const int c = threadIdx.x, lane = c & 31, warp = c >> 5, nw = R.D / 32;
    const int row = blockIdx.x;
    const int j = row % R.hq, qi = (row / R.hq) % R.q_len, seq = row / (R.hq * R.q_len);
    const int kvh = j / R.G;
    const int len = R.lens[seq];
    uint16_t *dst = R.out + (size_t)row * R.D + c;
    if (!(len >= R.q_len && (long long)len <= (long long)R.stride * R.bt)) {
        *dst = f_to_bf16(qnan());
        return;
    }
    const float qv = bf16_to_f(R.q[(size_t)row * R.D + c]);
    const int lim = len - R.q_len + qi;
    float m = -INFINITY, l = 0.0f, acc = 0.0f;
    bool bad = false;
    for (int tok = 0; tok <= lim; tok++) {
        const int b = R.tables[(size_t)seq * R.stride + tok / R.bt];
        if ((unsigned)b >= (unsigned)R.num_blocks) {
            bad = true;
            break;
        }
        const uint16_t *kr = R.pool + (long long)b * R.block_elems + R.layer_off + (long long)kvh * R.page_elems +
                             (long long)(tok % R.bt) * R.D;
        float x = qv * bf16_to_f(kr[c]);
        for (int o = 16; o >= 1; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
        if (lane == 0) red[warp] = x;
        __syncthreads();
        if (c == 0) {
            float sum = 0.0f;
            for (int w = 0; w < nw; w++) sum += red[w];
            logit = sum * R.scale;
        }
        __syncthreads();
        const float s = logit;
        const float mnew = fmaxf(m, s);
        const float alpha = expf(m - mnew), p = expf(s - mnew);
        l = l * alpha + p;
        acc = acc * alpha + p * bf16_to_f(kr[R.v_off + c]);
        m = mnew;
    }
    *dst = f_to_bf16(bad ? qnan() : acc / l);
}

/* ---- host side --------------------------------------------------------------- */

int fail(char *err, size_t errn, int code, const char *fmt, ...) {
    if (err && errn) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errn, fmt, ap);
        va_end(ap);
    }
    return code;
}

#define KV_CK(call)                                                                                    \
    do {                                                                                               \
        cudaError_t e_ = (call);                                                                       \
        if (e_ != cudaSuccess)                                                                         \
            return fail(err, errn, KVBF16_E_CUDA, "kvbf16: %s failed: %s (%s)", #call,                 \
                        cudaGetErrorName(e_), cudaGetErrorString(e_));                                 \
    } while (0)

#define KV_CK_LAUNCH(what)                                                                             \
    do {                                                                                               \
        cudaError_t e_ = cudaGetLastError();                                                           \
        if (e_ != cudaSuccess)                                                                         \
            return fail(err, errn, KVBF16_E_CUDA, "kvbf16: launch of %s failed: %s (%s)", what,        \
                        cudaGetErrorName(e_), cudaGetErrorString(e_));                                 \
    } while (0)

int log2i(int x) {
    int s = 0;
    while ((1 << s) < x) s++;
    return s;
}

int check_layout(const kvbf16_layout *L, char *err, size_t errn) {
    if (!L) return fail(err, errn, KVBF16_E_INVALID, "kvbf16: layout is NULL");
    if (L->num_layers < 1 || L->num_kv_heads < 1 || L->num_q_heads < 1 || L->num_blocks < 1)
        return fail(err, errn, KVBF16_E_INVALID,
                    "kvbf16: layout needs num_layers, num_kv_heads, num_q_heads, num_blocks >= 1 (got %d, %d, %d, %d)",
                    L->num_layers, L->num_kv_heads, L->num_q_heads, L->num_blocks);
    if (L->num_q_heads % L->num_kv_heads)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: num_q_heads %d is not a multiple of num_kv_heads %d",
                    L->num_q_heads, L->num_kv_heads);
    if (L->head_dim != 64 && L->head_dim != 128 && L->head_dim != 256)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: head_dim %d (64, 128 or 256)", L->head_dim);
    if (L->block_tokens < 16 || L->block_tokens > (1 << 20) || (L->block_tokens & (L->block_tokens - 1)))
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: block_tokens %d (a power of two >= 16)", L->block_tokens);
    return KVBF16_OK;
}

size_t page_bytes_of(const kvbf16_layout *L) { return (size_t)L->block_tokens * L->head_dim * 2; }

size_t block_bytes_of(const kvbf16_layout *L) {
    return page_bytes_of(L) * 2 * (size_t)L->num_kv_heads * (size_t)L->num_layers;
}

size_t tile_bytes(int D) { return (size_t)QROWS * (D + 2) * sizeof(float); }

/* Sets the shared-memory limit of attn_kernel<D> and returns its bytes and
 * resident CTAs per SM: what the SM's shared memory holds (registers allow
 * Shape<D>::MINB by __launch_bounds__), computed from device attributes so
 * that a call costs no occupancy query. */
template <int D>
int attn_prepare(int dev, int *smem, int *occ, char *err, size_t errn) {
    *smem = Geo<D>::SMEM;
    int sm_smem = 0, reserved = 0;
    KV_CK(cudaDeviceGetAttribute(&sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    KV_CK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
    KV_CK(cudaFuncSetAttribute((const void *)attn_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, *smem));
    *occ = sm_smem / (*smem + reserved);
    if (*occ > Shape<D>::MINB) *occ = Shape<D>::MINB;
    if (*occ < 1)
        return fail(err, errn, KVBF16_E_CUDA, "kvbf16: attn_kernel<%d> needs %d bytes of shared memory, the SM has %d", D,
                    *smem, sm_smem);
    return KVBF16_OK;
}

int prepare(int D, int dev, int *smem, int *occ, int *chunk, char *err, size_t errn) {
    if (D == 64) {
        *chunk = Geo<64>::CH;
        return attn_prepare<64>(dev, smem, occ, err, errn);
    }
    if (D == 128) {
        *chunk = Geo<128>::CH;
        return attn_prepare<128>(dev, smem, occ, err, errn);
    }
    *chunk = Geo<256>::CH;
    return attn_prepare<256>(dev, smem, occ, err, errn);
}

/* Split count: minimise (waves of resident CTAs) x (chunks per CTA + 2, the
 * fixed cost of a CTA and its share of the merge), never more splits than
 * chunks or than the workspace holds; ties go to fewer splits. */
int pick_splits(long long units, int chunks_max, long long slots, long long ws_tiles) {
    long long cap = MAX_SPLITS;
    if (cap > chunks_max) cap = chunks_max;
    if (cap > ws_tiles / units) cap = ws_tiles / units;
    if (cap <= 1) return 1;
    long long best = 1;
    double best_cost = 1e300;
    for (long long sp = 1; sp <= cap; sp++) {
        const double waves = (double)((units * sp + slots - 1) / slots);
        const double cost = waves * (double)((chunks_max + sp - 1) / sp + 2);
        if (cost < best_cost * 0.999) best_cost = cost, best = sp;
    }
    return (int)best;
}

int attn_check(const kvbf16_layout *L, int layer, int num_seqs, int q_len, const int32_t *seq_lens,
               const int32_t *block_tables, int stride, const void *q, const void *out, char *err, size_t errn) {
    int st = check_layout(L, err, errn);
    if (st) return st;
    if (layer < 0 || layer >= L->num_layers)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: layer %d out of range [0, %d)", layer, L->num_layers);
    if (num_seqs < 0 || num_seqs > 65535)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: num_seqs %d (0 .. 65535)", num_seqs);
    if (q_len < 1) return fail(err, errn, KVBF16_E_INVALID, "kvbf16: q_len %d (>= 1)", q_len);
    const long long rows = (long long)(L->num_q_heads / L->num_kv_heads) * q_len;
    if ((long long)L->num_kv_heads * ((rows + QROWS - 1) / QROWS) > 65535)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: q_len %d too long for the grid", q_len);
    if (stride < 1) return fail(err, errn, KVBF16_E_INVALID, "kvbf16: block table stride %d (>= 1)", stride);
    if (num_seqs > 0 && (!seq_lens || !block_tables || !q || !out))
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: seq_lens, block_tables, q and out must be non-NULL");
    if (((uintptr_t)q | (uintptr_t)out) & 1)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16: q and out must be 2-byte aligned");
    return KVBF16_OK;
}

template <int D>
void launch_attn(const AttnParams &P, int Y, int num_seqs, int smem, cudaStream_t st) {
    KV_LAUNCH(attn_kernel<D>, dim3((unsigned)P.splits, (unsigned)Y, (unsigned)num_seqs), THREADS, (size_t)smem, st, P);
}

template <int D>
void launch_merge(const AttnParams &P, int Y, int num_seqs, cudaStream_t st) {
    KV_LAUNCH(merge_kernel<D>, dim3((unsigned)Y, (unsigned)num_seqs), MERGE_WARPS * 32, 0, st, P);
}

} // namespace

extern "C" {

size_t kvbf16_pool_bytes(const kvbf16_layout *L) {
    if (check_layout(L, NULL, 0)) return 0;
    return block_bytes_of(L) * (size_t)L->num_blocks;
}

size_t kvbf16_workspace_bytes(const kvbf16_layout *L, int max_seqs, int max_splits) {
    if (check_layout(L, NULL, 0)) return 0;
    if (max_seqs < 1) max_seqs = 1;
    if (max_splits <= 0) max_splits = 64;
    return (size_t)max_seqs * (size_t)L->num_kv_heads * (size_t)max_splits * tile_bytes(L->head_dim);
}

int kvbf16_append(void *pool, const kvbf16_layout *L, int layer, int num_seqs, int tokens_per_seq,
                  const int32_t *seq_lens, const int32_t *block_tables, int stride, const void *k, const void *v,
                  void *stream, char *err, size_t errn) {
    int st = check_layout(L, err, errn);
    if (st) return st;
    if (layer < 0 || layer >= L->num_layers)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: layer %d out of range [0, %d)", layer, L->num_layers);
    if (num_seqs < 0 || tokens_per_seq < 0)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: num_seqs %d, tokens_per_seq %d (>= 0)", num_seqs,
                    tokens_per_seq);
    if ((long long)num_seqs * tokens_per_seq > 0x7fffffffLL)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: %lld rows (at most 2^31 - 1)",
                    (long long)num_seqs * tokens_per_seq);
    if (stride < 1) return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: block table stride %d (>= 1)", stride);
    if (num_seqs == 0 || tokens_per_seq == 0) return KVBF16_OK;
    if (!pool || !seq_lens || !block_tables || !k || !v)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: pool, seq_lens, block_tables, k and v must be non-NULL");
    if ((uintptr_t)pool & 15) return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: pool must be 16-byte aligned");
    if (((uintptr_t)k | (uintptr_t)v) & 1)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_append: k and v must be 2-byte aligned");
    AppendParams A;
    memset(&A, 0, sizeof A);
    A.pool = (uint8_t *)pool;
    A.k = (const uint8_t *)k;
    A.v = (const uint8_t *)v;
    A.lens = seq_lens;
    A.tables = block_tables;
    A.page_bytes = (long long)page_bytes_of(L);
    A.v_off = A.page_bytes * L->num_kv_heads;
    A.layer_off = 2 * A.v_off * layer;
    A.block_bytes = (long long)block_bytes_of(L);
    A.rows = num_seqs * tokens_per_seq;
    A.T = tokens_per_seq;
    A.hkv = L->num_kv_heads;
    A.cpr = L->head_dim / 8;
    A.rb = L->head_dim * 2;
    A.bt_mask = L->block_tokens - 1;
    A.lbt = log2i(L->block_tokens);
    A.stride = stride;
    A.num_blocks = L->num_blocks;
    A.total = 2LL * A.rows * A.hkv * A.cpr;
    long long blocks = (A.total + 255) / 256;
    if (blocks > 65536) blocks = 65536;
    cudaStream_t s = (cudaStream_t)stream;
    if (((uintptr_t)k | (uintptr_t)v) & 15)
        KV_LAUNCH(append_kernel<false>, (unsigned)blocks, 256, 0, s, A);
    else
        KV_LAUNCH(append_kernel<true>, (unsigned)blocks, 256, 0, s, A);
    KV_CK_LAUNCH("append_kernel");
    return KVBF16_OK;
}

int kvbf16_attention_splits(const kvbf16_layout *L, int num_seqs, int q_len, int max_seq_len, size_t workspace_bytes) {
    if (check_layout(L, NULL, 0) || num_seqs < 1 || q_len < 1 || max_seq_len < q_len) return -1;
    char err[8];
    const size_t errn = sizeof err;
    int dev = 0, sms = 0, smem = 0, occ = 0, chunk = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return -1;
    if (prepare(L->head_dim, dev, &smem, &occ, &chunk, err, errn)) return -1;
    const int G = L->num_q_heads / L->num_kv_heads;
    const long long units = (long long)num_seqs * L->num_kv_heads * ((G * (long long)q_len + QROWS - 1) / QROWS);
    const int chunks_max = (int)(((long long)max_seq_len + chunk - 1) / chunk);
    return pick_splits(units, chunks_max, (long long)sms * occ,
                       (long long)(workspace_bytes / tile_bytes(L->head_dim)));
}

int kvbf16_attention(const void *pool, const kvbf16_layout *L, int layer, int num_seqs, int q_len,
                     const int32_t *seq_lens, const int32_t *block_tables, int stride, int max_seq_len, const void *q,
                     void *out, float softmax_scale, void *workspace, size_t workspace_bytes, void *stream, char *err,
                     size_t errn) {
    int st = attn_check(L, layer, num_seqs, q_len, seq_lens, block_tables, stride, q, out, err, errn);
    if (st) return st;
    if (max_seq_len < q_len)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_attention: max_seq_len %d < q_len %d", max_seq_len, q_len);
    if (num_seqs == 0) return KVBF16_OK;
    if (!pool || ((uintptr_t)pool & 15))
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_attention: pool must be non-NULL and 16-byte aligned");
    if (workspace_bytes && (!workspace || ((uintptr_t)workspace & 15)))
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_attention: workspace must be non-NULL and 16-byte aligned");
    const int D = L->head_dim;
    int dev = 0, sms = 0, smem = 0, occ = 0, chunk = 0;
    KV_CK(cudaGetDevice(&dev));
    KV_CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    st = prepare(D, dev, &smem, &occ, &chunk, err, errn);
    if (st) return st;

    AttnParams P;
    memset(&P, 0, sizeof P);
    P.pool = (const uint8_t *)pool;
    P.lens = seq_lens;
    P.tables = block_tables;
    P.q = (const uint16_t *)q;
    P.out = (uint16_t *)out;
    P.ws = (float *)workspace;
    P.page_bytes = (long long)page_bytes_of(L);
    P.v_off = P.page_bytes * L->num_kv_heads;
    P.layer_off = 2 * P.v_off * layer;
    P.block_bytes = (long long)block_bytes_of(L);
    P.hkv = L->num_kv_heads;
    P.hq = L->num_q_heads;
    P.G = L->num_q_heads / L->num_kv_heads;
    P.q_len = q_len;
    P.rows = P.G * q_len;
    P.qchunks = (P.rows + QROWS - 1) / QROWS;
    P.bt_mask = L->block_tokens - 1;
    P.lbt = log2i(L->block_tokens);
    P.stride = stride;
    P.num_blocks = L->num_blocks;
    P.max_len = max_seq_len;
    if (!(softmax_scale > 0.0f)) softmax_scale = 1.0f / sqrtf((float)D);
    P.c = softmax_scale * 1.4426950408889634f;

    const int Y = L->num_kv_heads * P.qchunks;
    const long long units = (long long)num_seqs * Y;
    const int chunks_max = (int)(((long long)max_seq_len + chunk - 1) / chunk);
    const long long ws_tiles = workspace ? (long long)(workspace_bytes / tile_bytes(D)) : 0;
    P.splits = pick_splits(units, chunks_max, (long long)sms * occ, ws_tiles);
    P.ml_off = units * P.splits * QROWS * D;

    cudaStream_t s = (cudaStream_t)stream;
    if (D == 64)
        launch_attn<64>(P, Y, num_seqs, smem, s);
    else if (D == 128)
        launch_attn<128>(P, Y, num_seqs, smem, s);
    else
        launch_attn<256>(P, Y, num_seqs, smem, s);
    KV_CK_LAUNCH("attn_kernel");
    if (P.splits > 1) {
        if (D == 64)
            launch_merge<64>(P, Y, num_seqs, s);
        else if (D == 128)
            launch_merge<128>(P, Y, num_seqs, s);
        else
            launch_merge<256>(P, Y, num_seqs, s);
        KV_CK_LAUNCH("merge_kernel");
    }
    return KVBF16_OK;
}

int kvbf16_attention_reference(const void *pool, const kvbf16_layout *L, int layer, int num_seqs, int q_len,
                               const int32_t *seq_lens, const int32_t *block_tables, int stride, const void *q,
                               void *out, float softmax_scale, void *stream, char *err, size_t errn) {
    int st = attn_check(L, layer, num_seqs, q_len, seq_lens, block_tables, stride, q, out, err, errn);
    if (st) return st;
    if (num_seqs == 0) return KVBF16_OK;
    if (!pool || ((uintptr_t)pool & 1))
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_attention_reference: pool must be non-NULL and aligned");
    const long long nrows = (long long)num_seqs * q_len * L->num_q_heads;
    if (nrows > 0x7fffffffLL)
        return fail(err, errn, KVBF16_E_INVALID, "kvbf16_attention_reference: %lld rows", nrows);
    RefParams R;
    memset(&R, 0, sizeof R);
    R.pool = (const uint16_t *)pool;
    R.lens = seq_lens;
    R.tables = block_tables;
    R.q = (const uint16_t *)q;
    R.out = (uint16_t *)out;
    R.page_elems = (long long)L->block_tokens * L->head_dim;
    R.v_off = R.page_elems * L->num_kv_heads;
    R.layer_off = 2 * R.v_off * layer;
    R.block_elems = (long long)(block_bytes_of(L) / 2);
    R.D = L->head_dim;
    R.hkv = L->num_kv_heads;
    R.hq = L->num_q_heads;
    R.G = L->num_q_heads / L->num_kv_heads;
    R.q_len = q_len;
    R.bt = L->block_tokens;
    R.stride = stride;
    R.num_blocks = L->num_blocks;
    R.scale = softmax_scale > 0.0f ? softmax_scale : 1.0f / sqrtf((float)L->head_dim);
    KV_LAUNCH(reference_kernel, (unsigned)nrows, (unsigned)L->head_dim, 0, (cudaStream_t)stream, R);
    KV_CK_LAUNCH("reference_kernel");
    return KVBF16_OK;
}

} // extern "C"
