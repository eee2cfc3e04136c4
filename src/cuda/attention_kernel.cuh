/* The decode attention kernel of the CUDA backend (attn_kernel and its
 * device functions), shared by the translation units that instantiate it:
 * attention.cu (the fast path, method none, the merge and the launch code)
 * and attention_k2/k3/k4.cu (the generic quantised kernel at key width 2, 3
 * or 4 and every value width). Split so that the 45 generic instantiations
 * compile in parallel.
 *
 * Decode attention of the CUDA backend: split-KV flash decoding over packed
 * blocks and the window, one log-sum-exp merge.
 *
 * Grid: (split, kv head x query-row chunk, sequence); 4 warps per CTA. A CTA
 * takes a range of 64-token chunks of its sequence's blocks; each warp takes
 * a sub-range and streams it through a 2-stage shared-memory pipeline fed by
 * the bulk copy engine (cp.async.bulk + mbarrier), one warp-private pipeline
 * per warp. The g query heads (x q_len) of the KV head are the N dimension of
 * mma.m16n8k16, so every K/V byte is read once per group.
 *
 *   keys:   logits^T[tok][row] = codes[tok][ch] . (q' * scale)[ch][row] + bias
 *           with bias[row] = q' . lo (one mma with lo broadcast in A), then
 *           times the token norm and softmax_scale*log2(e). q' * scale is
 *           split into fp16 hi + lo parts (two mma each) so that logits
 *           carry ~2^-22 relative error instead of fp16's 2^-11.
 *   values: out'[ch][row] = codes^T[ch][tok] . (p * scale)[tok][row]
 *                         + lo^T[group][tok] . p[tok][row]
 * Codes become fp16 with one LOP3 + one HFMA2 per pair (magic 1024 exponent,
 * exact). q' is pre-scaled per row by a power of two so that q'*scale never
 * overflows fp16; p*scale is scaled per chunk by 2^S (S from the largest
 * value scale of the chunk), and the accumulator is kept in those units.
 * Window tokens (and method none) use a plain fp32 path in the same CTA.
 * The CTA's 4 warp partials are merged in shared memory and written to the
 * workspace; merge_kernel combines the splits, inverse-rotates, converts. */
#pragma once
#include "common.cuh"
#include "ptx.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>

namespace {

constexpr int WARPS = OSCAR_ATTN_WARPS;
constexpr int NSTAGE = OSCAR_ATTN_STAGES;
constexpr int CHUNK = OSCAR_ATTN_CHUNK;
#define OSCAR_MERGE_MAX 512

using namespace oscar_ptx;

/* The generic path's softmax keeps ex2's range handling; the fast path
 * uses the flush-to-zero form: its inputs are <= 0 and an output below
 * 2^-126 is lost by the fp16 p operand anyway. */
__device__ __forceinline__ float ex2(float x) { return ex2_approx(x); }
__device__ __forceinline__ float ex2z(float x) { return ex2_ftz(x); }

__device__ __forceinline__ uint32_t hmul2u(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*(__half2 *)&a, *(__half2 *)&b);
    return *(uint32_t *)&r;
}

__device__ __forceinline__ uint32_t hfma2u(uint32_t a, uint32_t b, uint32_t c) {
    __half2 r = __hfma2(*(__half2 *)&a, *(__half2 *)&b, *(__half2 *)&c);
    return *(uint32_t *)&r;
}

__device__ __forceinline__ uint32_t hadd2u(uint32_t a, uint32_t b) {
    __half2 r = __hadd2(*(__half2 *)&a, *(__half2 *)&b);
    return *(uint32_t *)&r;
}

__device__ __forceinline__ uint32_t hneg2u(uint32_t a) { return a ^ 0x80008000u; }

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
    __half2 r = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&r;
}

/* Pair `SLOT` of a code word as fp16x2 (exact small integers).
 * x = (word & mask) | 0x6400 gives 1024 + code * 2^(b*slot') in each half;
 * one HFMA2 by 2^-(b*slot') minus the offset leaves the code, exactly. */
template <int BITS, int SLOT>
__device__ __forceinline__ uint32_t deq_pair(uint32_t w, uint32_t wsh) {
    constexpr int LIM = BITS == 2 ? 5 : 2;       /* slots read without a shift */
    constexpr int SH = BITS == 2 ? 10 : 8;       /* wsh = w >> SH              */
    constexpr int S = SLOT < LIM ? SLOT : SLOT - (SH / BITS);
    constexpr uint32_t Q = (1u << BITS) - 1u;
    constexpr uint32_t MASK = (Q << (BITS * S)) | (Q << (BITS * S + 16));
    const uint32_t src = SLOT < LIM ? w : wsh;
    /* one LOP3: (src & MASK) | magic, the magic in a register */
    uint32_t x;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(src), "n"(MASK), "r"(0x64006400u));
    /* 2^-(BITS*S) and -1024 * 2^-(BITS*S) as fp16 */
    constexpr int E = BITS * S; /* 0..8 */
    constexpr uint32_t AH = (uint32_t)(15 - E) << 10;      /* 2^-E   */
    constexpr uint32_t BH = 0x8000u | ((uint32_t)(25 - E) << 10); /* -2^(10-E) */
    constexpr uint32_t A2 = AH | (AH << 16), B2 = BH | (BH << 16);
    __half2 r = __hfma2(*(__half2 *)&x, *(const __half2 *)&A2, *(const __half2 *)&B2);
    return *(uint32_t *)&r;
}

template <int I, int N, class F>
__device__ __forceinline__ void static_for(F &&f) {
    if constexpr (I < N) {
        f(std::integral_constant<int, I>{});
        static_for<I + 1, N>(f);
    }
}

/* The 4 A registers of k-step / channel tile S from the lane's code words. */
template <int BITS, int S>
__device__ __forceinline__ void deq_regs(const uint32_t *w, const uint32_t *wsh, uint32_t (&a)[4]) {
    constexpr int P = 16 / BITS;
    constexpr int q0 = 4 * S;
    a[0] = deq_pair<BITS, (q0 + 0) % P>(w[(q0 + 0) / P], wsh[(q0 + 0) / P]);
    a[1] = deq_pair<BITS, (q0 + 1) % P>(w[(q0 + 1) / P], wsh[(q0 + 1) / P]);
    a[2] = deq_pair<BITS, (q0 + 2) % P>(w[(q0 + 2) / P], wsh[(q0 + 2) / P]);
    a[3] = deq_pair<BITS, (q0 + 3) % P>(w[(q0 + 3) / P], wsh[(q0 + 3) / P]);
}

/* lane's code words of one tile from shared memory */
template <int NW>
__device__ __forceinline__ void lds_words(const uint8_t *p, uint32_t (&w)[NW]) {
    if constexpr (NW == 1) {
        w[0] = *(const uint32_t *)p;
    } else if constexpr (NW == 2) {
        uint2 a = *(const uint2 *)p;
        w[0] = a.x, w[1] = a.y;
    } else {
#pragma unroll
        for (int i = 0; i < NW; i += 4) {
            uint4 a = *(const uint4 *)(p + 4 * i);
            w[i] = a.x, w[i + 1] = a.y, w[i + 2] = a.z, w[i + 3] = a.w;
        }
    }
}

/* The high bits of pair SLOT of a 1-bit plane word (3-bit codes, FORMAT.md:
 * element e at bit 16e + SLOT) as fp16x2 4 * bit, exactly: as deq_pair,
 * slots 10..15 read from wsh = w >> 10. */
template <int SLOT>
__device__ __forceinline__ uint32_t deq_high_pair(uint32_t w, uint32_t wsh) {
    constexpr int S = SLOT < 10 ? SLOT : SLOT - 10;
    constexpr uint32_t MASK = (1u << S) | (1u << (S + 16));
    const uint32_t src = SLOT < 10 ? w : wsh;
    uint32_t x; /* 1024 + bit * 2^S in each half */
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(src), "n"(MASK), "r"(0x64006400u));
    /* x * 2^(2-S) - 1024 * 2^(2-S) = 4 * bit */
    constexpr uint32_t AH = (uint32_t)(17 - S) << 10;          /* 2^(2-S)    */
    constexpr uint32_t BH = 0x8000u | ((uint32_t)(27 - S) << 10); /* -2^(12-S) */
    constexpr uint32_t A2 = AH | (AH << 16), B2 = BH | (BH << 16);
    __half2 r = __hfma2(*(__half2 *)&x, *(const __half2 *)&A2, *(const __half2 *)&B2);
    return *(uint32_t *)&r;
}

/* One lane's code words of one 16-token tile at width BITS (FORMAT.md,
 * "Code tiles"): the words w (and w >> SH for the slots past the fp16
 * mantissa); at 3 bits the 2-bit plane's words plus the 1-bit plane's hw. */
template <int D, int BITS>
struct TileCodes {
    static constexpr int NW = BITS == 3 ? D / 32 : D * BITS / 64; /* (low) plane words */
    static constexpr int NH = BITS == 3 ? D / 64 : 1;             /* high plane words  */
    static constexpr int PLANE0_TILE = BITS == 3 ? 4 * D : 2 * D * BITS; /* bytes per tile */
    static constexpr int PLANE1_TILE = 2 * D;
    uint32_t w[NW], wsh[NW];
    uint32_t hw[NH], hwsh[NH];

    /* tile tl of a stage's codes: plane 0 at p0, the high plane at p1 */
    __device__ __forceinline__ void load(const uint8_t *p0, const uint8_t *p1, int tl, int lane) {
        lds_words<NW>(p0 + tl * PLANE0_TILE + lane * (NW * 4), w);
#pragma unroll
        for (int i = 0; i < NW; i++) wsh[i] = w[i] >> (BITS == 4 ? 8 : 10);
        if constexpr (BITS == 3) {
            lds_words<NH>(p1 + tl * PLANE1_TILE + lane * (NH * 4), hw);
#pragma unroll
            for (int i = 0; i < NH; i++) hwsh[i] = hw[i] >> 10;
        }
    }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < NW; i++) w[i] = 0u, wsh[i] = 0u;
#pragma unroll
        for (int i = 0; i < NH; i++) hw[i] = 0u, hwsh[i] = 0u;
    }
    /* the 4 A registers of k-step / channel tile S: codes as exact fp16 */
    template <int S>
    __device__ __forceinline__ void deq(uint32_t (&a)[4]) const {
        if constexpr (BITS == 3) {
            constexpr int q0 = 4 * S;
            a[0] = hadd2u(deq_pair<2, (q0 + 0) % 8>(w[(q0 + 0) / 8], wsh[(q0 + 0) / 8]),
                          deq_high_pair<(q0 + 0) % 16>(hw[(q0 + 0) / 16], hwsh[(q0 + 0) / 16]));
            a[1] = hadd2u(deq_pair<2, (q0 + 1) % 8>(w[(q0 + 1) / 8], wsh[(q0 + 1) / 8]),
                          deq_high_pair<(q0 + 1) % 16>(hw[(q0 + 1) / 16], hwsh[(q0 + 1) / 16]));
            a[2] = hadd2u(deq_pair<2, (q0 + 2) % 8>(w[(q0 + 2) / 8], wsh[(q0 + 2) / 8]),
                          deq_high_pair<(q0 + 2) % 16>(hw[(q0 + 2) / 16], hwsh[(q0 + 2) / 16]));
            a[3] = hadd2u(deq_pair<2, (q0 + 3) % 8>(w[(q0 + 3) / 8], wsh[(q0 + 3) / 8]),
                          deq_high_pair<(q0 + 3) % 16>(hw[(q0 + 3) / 16], hwsh[(q0 + 3) / 16]));
        } else {
            deq_regs<BITS, S>(w, wsh, a);
        }
    }
};

struct RowInfo {
    float f; /* logit factor: 2^E * softmax_scale * log2(e) */
    int lim; /* last token this row attends (causal), -1 if the row is padding */
};

/* ---- the dense (fp32) path: window tokens and method none -------------- */
template <int D, int RPC>
struct DenseState {
    float m[RPC], l[RPC];
    float acc[RPC][D / 32];
};

template <int D, int RPC>
__device__ __forceinline__ void dense_init(DenseState<D, RPC> &st) {
#pragma unroll
    for (int r = 0; r < RPC; r++) {
        st.m[r] = -INFINITY;
        st.l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < D / 32; i++) st.acc[r][i] = 0.0f;
    }
}

/* Tokens [0, n) with K rows at kb + t*stride, V rows at vb + t*stride
 * (elements of dtype); global index of token 0 is tok_base. */
template <int D, int RPC>
__device__ __forceinline__ void dense_tokens(DenseState<D, RPC> &st, const uint8_t *kb, const uint8_t *vb,
                             long long stride, int dtype, int n, long long tok_base, const float *qf,
                             const long long (&lim)[RPC],
                             float sm_log2, float *pbuf, int lane) {
    const int es = dtype == OSCAR_DTYPE_F32 ? 4 : 2;
    for (int j0 = 0; j0 < n; j0 += 32) {
        const int j = j0 + lane;
        const bool valid = j < n;
        float dot[RPC];
#pragma unroll
        for (int r = 0; r < RPC; r++) dot[r] = 0.0f;
        if (valid) {
            const uint8_t *kr = kb + (size_t)j * stride * es;
            for (int c0 = 0; c0 < D; c0 += 4) {
                float kv[4];
                if (dtype == OSCAR_DTYPE_F32) {
                    float4 a = *(const float4 *)(kr + (size_t)c0 * 4);
                    kv[0] = a.x, kv[1] = a.y, kv[2] = a.z, kv[3] = a.w;
                } else {
                    uint2 a = *(const uint2 *)(kr + (size_t)c0 * 2);
                    unsigned short h[4] = {(unsigned short)(a.x & 0xffff), (unsigned short)(a.x >> 16),
                                           (unsigned short)(a.y & 0xffff), (unsigned short)(a.y >> 16)};
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        kv[i] = dtype == OSCAR_DTYPE_BF16 ? __uint_as_float((unsigned)h[i] << 16)
                                                          : __half2float(__ushort_as_half(h[i]));
                }
#pragma unroll
                for (int r = 0; r < RPC; r++) {
                    float4 q = *(const float4 *)(qf + r * D + c0);
                    dot[r] += q.x * kv[0] + q.y * kv[1] + q.z * kv[2] + q.w * kv[3];
                }
            }
        }
        const long long tok = tok_base + j;
#pragma unroll
        for (int r = 0; r < RPC; r++) {
            float L = (valid && tok <= lim[r]) ? dot[r] * sm_log2 : -INFINITY;
            float mx = L;
#pragma unroll
            for (int m = 16; m >= 1; m >>= 1) mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, m));
            const float mnew = fmaxf(st.m[r], mx);
            const float muse = mnew == -INFINITY ? 0.0f : mnew;
            const float alpha = exp2f(st.m[r] - muse);
            st.m[r] = mnew;
            const float p = exp2f(L - muse);
            st.l[r] = st.l[r] * alpha + p;
#pragma unroll
            for (int i = 0; i < D / 32; i++) st.acc[r][i] *= alpha;
            pbuf[r * 32 + lane] = p;
        }
        __syncwarp();
        const int nj = n - j0 < 32 ? n - j0 : 32;
        for (int jj = 0; jj < nj; jj++) {
            const uint8_t *vr = vb + (size_t)(j0 + jj) * stride * es;
            float vv[D / 32];
#pragma unroll
            for (int i = 0; i < D / 32; i++) vv[i] = oscar_ld_f32(vr, dtype, (size_t)i * 32 + lane);
#pragma unroll
            for (int r = 0; r < RPC; r++) {
                const float p = pbuf[r * 32 + jj];
#pragma unroll
                for (int i = 0; i < D / 32; i++) st.acc[r][i] += p * vv[i];
            }
        }
        __syncwarp();
    }
}

/* Merges a dense state into the warp's partial (O [RPC][D], m, l). */
template <int D, int RPC>
__device__ __forceinline__ void dense_merge(DenseState<D, RPC> &st, float *O, float *wm, float *wl, int lane) {
#pragma unroll
    for (int r = 0; r < RPC; r++) {
        float l = st.l[r];
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) l += __shfl_xor_sync(OSCAR_FULL_MASK, l, m);
        const float mq = wm[r], md = st.m[r];
        const float M = fmaxf(mq, md);
        if (M == -INFINITY) continue;
        const float a = exp2f(mq - M), b = exp2f(md - M);
#pragma unroll
        for (int i = 0; i < D / 32; i++) {
            const int c = i * 32 + lane;
            O[r * D + c] = O[r * D + c] * a + st.acc[r][i] * b;
        }
        __syncwarp();
        if (lane == 0) {
            wl[r] = wl[r] * a + l * b;
            wm[r] = M;
        }
        __syncwarp();
    }
}

/* ---- fast path (d=128, 2 bits, <= 4 query rows, Gv=32, Gk%32==0, scaled
 * keys): codes as fp16 A operands with one LOP3 per pair.
 * FM 1: (word & mask) is an fp16 subnormal, code * 4^j * 2^-24 (exact);
 * FM 2: (word & mask) | 1024, minus 1024 (HADD2), code * 4^j (exact).
 * The factor 4^j of A register j = 4^(j&1) (row half) * 16^(j>>1) (k half)
 * is undone by B operands whose k-high half is prescaled by 1/16 and by
 * a factor 1/4 on the C rows g+8. Keys: the N columns 0..3 of the mma carry
 * the fp16 hi part of q' * scale, columns 4..7 the lo part (the rows are
 * only 4), summed by one shuffle. */
template <int FM, int S>
__device__ __forceinline__ void fdeq(const uint32_t (&w)[4], const uint32_t (&wsh)[4], uint32_t (&a)[4]) {
    const uint32_t src = (S & 1) ? wsh[S >> 1] : w[S >> 1];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t mask = 0x00030003u << (2 * j);
        if constexpr (FM == 1) {
            a[j] = src & mask;
        } else {
            uint32_t x;
            asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(src), "r"(mask), "r"(0x64006400u));
            const uint32_t m1024 = 0xE400E400u;
            __half2 r = __hadd2(*(__half2 *)&x, *(const __half2 *)&m1024);
            a[j] = *(uint32_t *)&r;
        }
    }
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) { return __byte_perm(a, b, sel); }

/* Sequence `seq` of the call: slot, length and block table from the
 * device metadata. Out-of-range entries make it empty and invalid (the
 * merge writes NaN for it and the host is told through the report).
 * With sink tokens (S = P.meta.sinks) the length counts them: min(len, S)
 * tokens in the sink rows, nblk blocks, then the window; wtok = len - nblk R
 * counts the exact tokens, the sink rows held and the window's (one run of
 * slot rows, window_warp_tokens). */
__device__ __forceinline__ SeqView seq_view(const AttnParams &P, int seq) {
    SeqView v;
    v.slot = P.meta.slots[seq];
    v.len = P.meta.lens[seq];
    v.valid = (unsigned)v.slot < (unsigned)P.meta.max_seqs && v.len >= P.q_len;
    v.nblk = v.valid ? P.meta.packed[v.slot] : 0;
    const int win = v.len - min(v.len, P.meta.sinks) - v.nblk * P.lay.R; /* window tokens */
    v.valid = v.valid && v.nblk <= P.meta.table_stride && win >= 0 && win < P.meta.window_rows &&
              v.len <= P.meta.held[v.slot];
    if (!v.valid) v.slot = 0, v.len = 0, v.nblk = 0;
    v.wtok = v.len - v.nblk * P.lay.R;
    v.table = P.meta.tables + (size_t)(P.meta.table_by_slot ? v.slot : seq) * P.meta.table_stride;
    return v;
}

/* A block id from the table; one out of range reads block 0 instead (the
 * merge kernel then writes NaN rows for the sequence and reports it). */
__device__ __forceinline__ int checked_block(const AttnParams &P, int b) {
    return (unsigned)b < (unsigned)P.meta.block_count ? b : 0;
}

/* ---- attn_kernel's stages ----------------------------------------------
 * The kernel below is a sequence of these named steps, in the order it runs
 * them. They are forced inline so that the kernel compiles to the code of
 * one body: splitting it must not move a register or an instruction (the
 * register counts and SASS sizes are compared before and after in the
 * commit that split it). */

/* The CTA's query rows, fp32 [RPC][D] in shared memory; the padding rows of
 * the last row chunk are zeros. */
template <int D, int RPC>
__device__ __forceinline__ void load_queries(const AttnParams &P, float *qf, int seq, int h, int qc) {
    for (int i = threadIdx.x; i < RPC * D; i += blockDim.x) {
        const int r = i / D, c = i - r * D;
        const int gr = qc * RPC + r;
        float x = 0.0f;
        if (gr < P.rows) {
            const int qi = gr / P.g, hj = gr - qi * P.g;
            const size_t o = (((size_t)seq * P.q_len + qi) * P.hq + (size_t)h * P.g + hj) * D + c;
            x = oscar_ld_f32(P.q, P.q_dtype, o);
        }
        qf[i] = x;
    }
}

/* The warp's stage barriers (one arrival each: lane 0's expect_tx), made
 * visible to the bulk-copy (async) proxy before any copy names them. */
__device__ __forceinline__ void init_stage_barriers(uint64_t *mbar, int lane) {
    if (lane == 0) {
        for (int s = 0; s < NSTAGE; s++) mbar_init(&mbar[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        fence_proxy_async();
    }
}

/* q' = H q per row (methods that rotate), and the row's power-of-two range
 * qinv = 2^-E, qexp = 2^E with max |q'| < 2^E: q' * 2^-E then fits fp16
 * whatever the caller's scale of q, and qexp undoes it on the logits. */
template <int D, int RPC>
__device__ __forceinline__ void rotate_queries(const AttnParams &P, float *qf, float *qinv, float *qexp, int warp,
                                               int lane) {
    for (int r = warp; r < RPC; r += WARPS) {
        float x[D / 32];
#pragma unroll
        for (int i = 0; i < D / 32; i++) x[i] = qf[r * D + lane * (D / 32) + i];
        if (P.lay.rotate) oscar_warp_fwht<D>(x, lane);
        float mx = 0.0f;
#pragma unroll
        for (int i = 0; i < D / 32; i++) {
            qf[r * D + lane * (D / 32) + i] = x[i];
            mx = fmaxf(mx, fabsf(x[i]));
        }
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, m));
        int e = 0;
        if (mx > 0.0f) frexpf(mx, &e);
        if (lane == 0) {
            qinv[r] = ldexpf(1.0f, -e);
            qexp[r] = ldexpf(1.0f, e);
        }
    }
}

/* Fast path: the B operands of the key mma, per k-step and lane. Lane (g, t)
 * holds column g of B: q' = q * 2^(8-E) of row g & 3, k-high half prescaled
 * by 1/16; x = fp16 hi part, z = the lo part for the columns 4..7 (g >= 4),
 * 0 for the hi columns. qbias: B of the bias mma (A = lo, not prescaled):
 * the hi (columns 0..3) or lo (columns 4..7) part of q', k-high half
 * unscaled. */
template <int D>
__device__ __forceinline__ void build_fast_query_fragments(const AttnParams &P, uint8_t *smem, const float *qf,
                                                           const float *qinv) {
    constexpr int KS = D / 16;
    uint4 *qfrag = (uint4 *)(smem + P.off_qfrag);
    uint2 *qbias = (uint2 *)(smem + P.off_qbias);
    for (int i = threadIdx.x; i < KS * 32; i += blockDim.x) {
        const int s = i >> 5, ln = i & 31, gl = ln >> 2, r = gl & 3;
        const float sc = qinv[r] * 256.0f;
        const float *row = qf + r * D + 16 * s + 2 * (ln & 3);
        const float v0 = row[0] * sc, v1 = row[1] * sc, v2 = row[8] * sc * 0.0625f, v3 = row[9] * sc * 0.0625f;
        const __half2 h0 = __floats2half2_rn(v0, v1), h1 = __floats2half2_rn(v2, v3);
        const __half2 l0 = __floats2half2_rn(v0 - __low2float(h0), v1 - __high2float(h0));
        const __half2 l1 = __floats2half2_rn(v2 - __low2float(h1), v3 - __high2float(h1));
        const uint32_t z0 = gl >= 4 ? *(const uint32_t *)&l0 : 0u, z1 = gl >= 4 ? *(const uint32_t *)&l1 : 0u;
        qfrag[i] = make_uint4(*(const uint32_t *)&h0, *(const uint32_t *)&h1, z0, z1);
        const float u2 = row[8] * sc, u3 = row[9] * sc;
        const __half2 e1 = __floats2half2_rn(u2, u3);
        const __half2 f1 = __floats2half2_rn(u2 - __low2float(e1), u3 - __high2float(e1));
        qbias[i] = gl >= 4 ? make_uint2(*(const uint32_t *)&l0, *(const uint32_t *)&f1)
                           : make_uint2(*(const uint32_t *)&h0, *(const uint32_t *)&e1);
    }
}

/* Generic path: B fragments of q' * 2^-E as fp16 hi + lo parts,
 * [k-step][n tile][lane] x (hi pair, hi pair, lo pair, lo pair). */
template <int D, int NT>
__device__ __forceinline__ void build_query_fragments(const AttnParams &P, uint8_t *smem, const float *qf,
                                                      const float *qinv) {
    constexpr int KS = D / 16;
    uint4 *qfrag = (uint4 *)(smem + P.off_qfrag);
    for (int i = threadIdx.x; i < KS * NT * 32; i += blockDim.x) {
        const int s = i / (NT * 32), nt = (i / 32) % NT, ln = i & 31;
        const int r = nt * 8 + (ln >> 2);
        const float sc = qinv[r];
        const float *row = qf + r * D + 16 * s + 2 * (ln & 3);
        const float v0 = row[0] * sc, v1 = row[1] * sc, v2 = row[8] * sc, v3 = row[9] * sc;
        const __half2 h0 = __floats2half2_rn(v0, v1), h1 = __floats2half2_rn(v2, v3);
        const __half2 l0 = __floats2half2_rn(v0 - __low2float(h0), v1 - __high2float(h0));
        const __half2 l1 = __floats2half2_rn(v2 - __low2float(h1), v3 - __high2float(h1));
        qfrag[i] = make_uint4(*(const uint32_t *)&h0, *(const uint32_t *)&h1, *(const uint32_t *)&l0,
                              *(const uint32_t *)&l1);
    }
}

/* Causal limit of each row of the CTA for the dense path: the last token it
 * attends, -1 for padding rows. Query i of q_len attends tokens
 * [0, tokens - q_len + i]. With S sink tokens `tokens` and the limits count
 * from the first token after them (blocks from 0, then the window): a limit
 * below 0 falls in the sink rows (window_warp_tokens). */
template <int RPC>
__device__ __forceinline__ void causal_limits(const AttnParams &P, int qc, long long tokens, long long (&limr)[RPC]) {
#pragma unroll
    for (int r = 0; r < RPC; r++) {
        const int gr = qc * RPC + r;
        limr[r] = gr < P.rows ? tokens - P.q_len + gr / P.g : -1;
    }
}

/* The warp's 64-token chunks [cw0, cw1): the split's range of the
 * sequence's chunks, cut into WARPS near-equal parts. */
__device__ __forceinline__ void warp_chunk_range(const AttnParams &P, int nblk, int split, int warp, int &cw0, int &cw1) {
    const int total_chunks = nblk * P.cpb;
    const int per_split = (total_chunks + P.splits - 1) / P.splits;
    const int c0 = split * per_split;
    const int c1 = min(total_chunks, c0 + per_split);
    const int ncta = max(0, c1 - c0);
    cw0 = c0 + (int)(((long long)ncta * warp) / WARPS);
    cw1 = c0 + (int)(((long long)ncta * (warp + 1)) / WARPS);
}

/* The value-scale exponent of a chunk: p * scale is computed in fp16 as
 * p * 2^S * scale, S from the chunk's largest value scale so that the
 * products neither overflow nor go subnormal; the accumulators are kept in
 * units of 2^S and rescaled by dS when S moves. mxs: the largest fp16 scale
 * bits of the lane's share of the chunk (reduced over the warp here). */
struct ChunkValueScale {
    float dS;        /* 2^(S_new - S_old): the accumulators' rescale      */
    bool same;       /* S did not move                                    */
    uint32_t twoS;   /* 2^S as fp16x2                                     */
    uint32_t twoS16; /* 2^S / 16 as fp16x2 (fast path, k-high half)       */
};

__device__ __forceinline__ ChunkValueScale chunk_value_scale(uint32_t mxs, int &Scur) {
    ChunkValueScale v;
    mxs = __reduce_max_sync(OSCAR_FULL_MASK, mxs);
    const int ex = (int)(mxs >> 10) - 15;
    const int Snew = min(15, 14 - ex);
    v.dS = __int_as_float((127 + Snew - Scur) << 23);
    v.same = Snew == Scur;
    Scur = Snew;
    v.twoS = ((uint32_t)(15 + Snew) << 10) * 0x10001u;
    v.twoS16 = ((uint32_t)(11 + Snew) << 10) * 0x10001u;
    return v;
}

/* ---- the fast path (d=128, 2 bits, <= 4 query rows, Gv=32, Gk%32==0,
 * scaled keys, FM 1 or 2; see fdeq) ---------------------------------------- */

/* Issues the bulk copies of the warp's chunks in order. Every lane computes
 * the copies' operands (warp-uniform, so they live in uniform registers);
 * lane 0 issues. (block, chunk) advance without divisions. */
struct FastChunkIssuer {
    int ib, icc;             /* (block, chunk in block) of the next chunk */
    const int32_t *table;
    /* byte offsets inside a layer block (32 bits) and the shared addresses
     * of the stages and barriers: per-warp constants */
    uint32_t o_kc, o_vc, o_kp, o_vp, o_nm, s_base, b_base;

    __device__ __forceinline__ void issue(const AttnParams &P, int i, int lane) {
        constexpr int D = 128, NCG = 4, TILE_BYTES = 2 * D * 2;
        const int b = ib, cc = icc;
        if (++icc == P.cpb) icc = 0, ib++;
        const uint32_t tok0 = (uint32_t)cc * CHUNK;
        const uint32_t ntok = min((uint32_t)CHUNK, (uint32_t)P.lay.R - tok0); /* 32 or 64 */
        const uint8_t *blk = P.pool_layer + (size_t)__shfl_sync(OSCAR_FULL_MASK, checked_block(P, table[b]), 0) * P.lay.LB;
        const uint32_t sa = s_base + (uint32_t)(i % NSTAGE) * (uint32_t)P.stage_bytes;
        const uint32_t bar = b_base + (uint32_t)(i % NSTAGE) * 8u;
        const uint32_t gf = tok0 >> P.gk_shift, gl = (tok0 + ntok - 1) >> P.gk_shift;
        const uint32_t bc = ntok * (TILE_BYTES / 16);
        const uint32_t bkp = (gl - gf + 1) * (D * 4);
        if (lane != 0) return;
        fence_proxy_async();
        mbar_expect_tx(bar, ntok * (2 * (TILE_BYTES / 16) + NCG * 4 + 4) + bkp);
        bulk_g2s(sa + P.kc_off, blk + (o_kc + tok0 * (TILE_BYTES / 16)), bc, bar);
        bulk_g2s(sa + P.vc_off, blk + (o_vc + tok0 * (TILE_BYTES / 16)), bc, bar);
        bulk_g2s(sa + P.kp_off, blk + (o_kp + gf * (D * 4)), bkp, bar);
        bulk_g2s(sa + P.vp_off, blk + (o_vp + tok0 * (NCG * 4)), ntok * (NCG * 4), bar);
        bulk_g2s(sa + P.nm_off, blk + (o_nm + tok0 * 4), ntok * 4, bar);
    }
};

/* Fast path, logits of one chunk (ntiles tiles of 16 tokens), per pair of
 * tiles (one key group, Gk >= 32): lg[tile][i] of lane (g, t), i = (token
 * half, column), in log2 units; -inf where masked and past the chunk. */
template <int FM>
__device__ __forceinline__ void fast_key_scores(const AttnParams &P, const uint8_t *st, const uint4 *qfrag,
                                                const uint2 *qbias, const float *nm, int tok0, int ntiles, int gf,
                                                int tb, int first_lim, const float (&rf)[2], const float (&rf4)[2],
                                                const int (&rlim)[2], uint32_t mhi, uint32_t msg, int lane,
                                                float (&lg)[4][4]) {
    constexpr int D = 128, KS = D / 16, TILE_BYTES = 2 * D * 2;
    constexpr float FAC = FM == 1 ? 5.9604644775390625e-8f : 1.0f; /* 2^-24: subnormal codes */
    const int g = lane >> 2, t = lane & 3;
    static_for<0, 2>([&](auto PR_) {
        constexpr int pr = decltype(PR_)::value;
        if (2 * pr < ntiles) {
            const int grp = (tok0 + 32 * pr) >> P.gk_shift;
            const uint8_t *kp = st + P.kp_off + (size_t)(grp - gf) * D * 4;
            /* B = q' * scale of the group as hi (columns 0..3) and lo
             * (columns 4..7) parts; the bias q' . lo into cb */
            uint32_t bq[KS][2];
            float cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            static_for<0, KS>([&](auto S_) {
                constexpr int s = decltype(S_)::value;
                const uint4 f = qfrag[s * 32 + lane];
                const uint2 pa = *(const uint2 *)(kp + (16 * s + 2 * t) * 4);
                const uint2 pc = *(const uint2 *)(kp + (16 * s + 2 * t + 8) * 4);
                const uint32_t scA = prmt(pa.x, pa.y, 0x5410), loA = prmt(pa.x, pa.y, 0x7632);
                const uint32_t scB = prmt(pc.x, pc.y, 0x5410), loB = prmt(pc.x, pc.y, 0x7632);
                const uint32_t h0 = hmul2u(f.x, scA), h1 = hmul2u(f.y, scB);
                bq[s][0] = hfma2u(f.z, scA, hfma2u(f.x, scA, (h0 & mhi) ^ msg));
                bq[s][1] = hfma2u(f.w, scB, hfma2u(f.y, scB, (h1 & mhi) ^ msg));
                const uint2 qb = qbias[s * 32 + lane];
                const uint32_t la[4] = {loA, loA, loB, loB};
                mma16816(cb, la, qb.x, qb.y);
            });
            const float b0 = cb[0] * FAC, b1 = cb[1] * FAC, b2 = cb[0] * (4.0f * FAC), b3 = cb[1] * (4.0f * FAC);
            static_for<0, 2>([&](auto TT_) {
                constexpr int tl = 2 * pr + decltype(TT_)::value;
                if (tl < ntiles) {
                    uint32_t w[4], wsh[4];
                    lds_words<4>(st + P.kc_off + tl * TILE_BYTES + lane * 16, w);
#pragma unroll
                    for (int i = 0; i < 4; i++) wsh[i] = w[i] >> 8;
                    float c[4] = {b0, b1, b2, b3};
                    static_for<0, KS>([&](auto S_) {
                        constexpr int s = decltype(S_)::value;
                        uint32_t a[4];
                        fdeq<FM, s>(w, wsh, a);
                        mma16816(c, a, bq[s][0], bq[s][1]);
                    });
                    /* hi columns + lo columns */
#pragma unroll
                    for (int i = 0; i < 4; i++) c[i] += __shfl_xor_sync(OSCAR_FULL_MASK, c[i], 2);
                    const int r0 = 16 * tl + g;
                    const float s0 = nm[r0], s1 = nm[r0 + 8];
                    lg[tl][0] = c[0] * (s0 * rf[0]);
                    lg[tl][1] = c[1] * (s0 * rf[1]);
                    lg[tl][2] = c[2] * (s1 * rf4[0]);
                    lg[tl][3] = c[3] * (s1 * rf4[1]);
                    if (tb + 16 * tl + 15 > first_lim) { /* the tile reaches the causal diagonal */
                        const int T0 = tb + r0, T1 = T0 + 8;
                        if (T0 > rlim[0]) lg[tl][0] = -INFINITY;
                        if (T0 > rlim[1]) lg[tl][1] = -INFINITY;
                        if (T1 > rlim[0]) lg[tl][2] = -INFINITY;
                        if (T1 > rlim[1]) lg[tl][3] = -INFINITY;
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 4; i++) lg[tl][i] = -INFINITY;
                }
            });
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) lg[2 * pr][i] = -INFINITY, lg[2 * pr + 1][i] = -INFINITY;
        }
    });
}

/* Fast path: the lane's share of the chunk's largest value scale (fp16
 * bits, sign dropped): 16-byte loads of the (scale, lo) words. */
__device__ __forceinline__ uint32_t fast_value_scale_max(const uint32_t *vpw, int ntiles, int lane) {
    const uint4 v = *(const uint4 *)(vpw + lane * 4);
    uint32_t mxs = max(max(v.x & 0x7fffu, v.y & 0x7fffu), max(v.z & 0x7fffu, v.w & 0x7fffu));
    if (ntiles == 4) {
        const uint4 u = *(const uint4 *)(vpw + 128 + lane * 4);
        mxs = max(mxs, max(max(u.x & 0x7fffu, u.y & 0x7fffu), max(u.z & 0x7fffu, u.w & 0x7fffu)));
    }
    return mxs;
}

/* Fast path, online softmax of one chunk: running max m and sum l per
 * column, lg becomes p = 2^(logit - m) (ex2 with flush to zero), and the
 * accumulators are rescaled, only when a max or the value exponent moved. */
template <int KS>
__device__ __forceinline__ void fast_online_softmax(float (&lg)[4][4], float (&m)[2], float (&l)[2],
                                                    float (&acc)[KS][4], float (&loacc)[4], float dS, bool s_same) {
    float fac[2], al[2];
    bool moved = false;
#pragma unroll
    for (int col = 0; col < 2; col++) {
        float mx = -INFINITY;
#pragma unroll
        for (int tl = 0; tl < 4; tl++) mx = fmaxf(mx, fmaxf(lg[tl][col], lg[tl][col + 2]));
        mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, 16));
        const float mnew = fmaxf(m[col], mx);
        const float muse = mnew == -INFINITY ? 0.0f : mnew;
        moved |= mnew != m[col];
        al[col] = ex2z(m[col] - muse);
        m[col] = mnew;
        float sum = 0.0f;
#pragma unroll
        for (int tl = 0; tl < 4; tl++) {
            lg[tl][col] = ex2z(lg[tl][col] - muse);
            lg[tl][col + 2] = ex2z(lg[tl][col + 2] - muse);
            sum += lg[tl][col] + lg[tl][col + 2];
        }
        l[col] = l[col] * al[col] + sum;
        fac[col] = al[col] * dS;
    }
    if (__any_sync(OSCAR_FULL_MASK, moved || !s_same)) {
#pragma unroll
        for (int s = 0; s < KS; s++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[s][i] *= fac[i & 1];
#pragma unroll
        for (int i = 0; i < 4; i++) loacc[i] *= al[i & 1];
    }
}

/* Fast path, values of one chunk: acc += codes^T . (p * 2^S * scale) per
 * channel tile, loacc += lo^T . p per value group (A rows = groups). */
template <int FM>
__device__ __forceinline__ void fast_value_accumulate(const AttnParams &P, const uint8_t *st, const uint32_t *vpw,
                                                      const float (&lg)[4][4], int ntiles, uint32_t twoS,
                                                      uint32_t twoS16, int lane, float (&acc)[8][4],
                                                      float (&loacc)[4]) {
    constexpr int D = 128, NCG = 4, TILE_BYTES = 2 * D * 2;
    const int g = lane >> 2, t = lane & 3;
    const int gq = g & 3;
#pragma unroll
    for (int tl = 0; tl < 4; tl++) {
        if (tl < ntiles) {
            const uint32_t pb0 = movtrans(pack_h2(lg[tl][0], lg[tl][1]));
            const uint32_t pb1 = movtrans(pack_h2(lg[tl][2], lg[tl][3]));
            const uint32_t ps0 = hmul2u(pb0, twoS), ps1 = hmul2u(pb1, twoS16);
            const uint32_t *vt = vpw + tl * 16 * NCG;
            {
                /* lo^T . p: A rows are value groups; rows >= 4 unused */
                const uint32_t la0 = prmt(vt[(2 * t) * NCG + gq], vt[(2 * t + 1) * NCG + gq], 0x7632);
                const uint32_t la2 = prmt(vt[(2 * t + 8) * NCG + gq], vt[(2 * t + 9) * NCG + gq], 0x7632);
                const uint32_t la[4] = {la0, 0u, la2, 0u};
                mma16816(loacc, la, pb0, pb1);
            }
            const uint4 v0 = *(const uint4 *)(vt + (2 * t) * NCG), v1 = *(const uint4 *)(vt + (2 * t + 1) * NCG);
            const uint4 v2 = *(const uint4 *)(vt + (2 * t + 8) * NCG), v3 = *(const uint4 *)(vt + (2 * t + 9) * NCG);
            const uint32_t s0w[4] = {v0.x, v0.y, v0.z, v0.w}, s1w[4] = {v1.x, v1.y, v1.z, v1.w};
            const uint32_t s2w[4] = {v2.x, v2.y, v2.z, v2.w}, s3w[4] = {v3.x, v3.y, v3.z, v3.w};
            uint32_t w[4], wsh[4];
            lds_words<4>(st + P.vc_off + tl * TILE_BYTES + lane * 16, w);
#pragma unroll
            for (int i = 0; i < 4; i++) wsh[i] = w[i] >> 8;
            static_for<0, NCG>([&](auto CG_) {
                constexpr int cg = decltype(CG_)::value;
                const uint32_t pv0 = hmul2u(ps0, prmt(s0w[cg], s1w[cg], 0x5410));
                const uint32_t pv1 = hmul2u(ps1, prmt(s2w[cg], s3w[cg], 0x5410));
                uint32_t a[4];
                fdeq<FM, 2 * cg>(w, wsh, a);
                mma16816(acc[2 * cg], a, pv0, pv1);
                fdeq<FM, 2 * cg + 1>(w, wsh, a);
                mma16816(acc[2 * cg + 1], a, pv0, pv1);
            });
        }
    }
}

/* Fast path: the warp's partial into shared memory, O [RPC][D] in softmax
 * units (2^S, the 2^-24 of subnormal codes and the 1/4 of rows g+8 undone),
 * the lo part added per value group, (m, l) per row. */
template <int FM>
__device__ __forceinline__ void fast_write_partial(float *O, float *wm, float *wl, const float (&m)[2], float (&l)[2],
                                                   const float (&acc)[8][4], const float (&loacc)[4], int Scur,
                                                   int lane) {
    constexpr int D = 128, KS = D / 16, NCG = 4;
    constexpr float FAC = FM == 1 ? 5.9604644775390625e-8f : 1.0f;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int col = 0; col < 2; col++) {
        float v = l[col];
        v += __shfl_xor_sync(OSCAR_FULL_MASK, v, 4);
        v += __shfl_xor_sync(OSCAR_FULL_MASK, v, 8);
        v += __shfl_xor_sync(OSCAR_FULL_MASK, v, 16);
        l[col] = v;
    }
    __syncwarp();
    const float unS = __int_as_float((127 - Scur) << 23) / FAC;
#pragma unroll
    for (int s = 0; s < KS; s++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = 2 * t + (i & 1), ch = 16 * s + g + 8 * (i >> 1);
            O[r * D + ch] = acc[s][i] * (i >> 1 ? unS * 0.25f : unS);
        }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int r = 2 * t + (i & 1);
        if (g < NCG) {
            const float v = loacc[i];
            for (int cc = 0; cc < 32; cc++) O[r * D + g * 32 + cc] += v;
        }
    }
    if (g == 0) {
#pragma unroll
        for (int col = 0; col < 2; col++) {
            wm[2 * t + col] = m[col];
            wl[2 * t + col] = l[col];
        }
    }
    __syncwarp();
}

/* Fast path: the warp's chunks [cw0, cw0 + nmine) through the pipeline,
 * its partial into O, wm, wl. */
template <int FM>
__device__ __forceinline__ void fast_warp_chunks(const AttnParams &P, uint8_t *smem, uint8_t *wreg, uint64_t *mbar,
                                                 const float *qexp, const SeqView &sv, long long tokens, int h,
                                                 int cw0, int nmine, int lane, float *O, float *wm, float *wl) {
    constexpr int D = 128, KS = D / 16;
    constexpr float FAC = FM == 1 ? 5.9604644775390625e-8f : 1.0f; /* 2^-24: subnormal codes */
    const int g = lane >> 2, t = lane & 3;
    const uint4 *qfrag = (const uint4 *)(smem + P.off_qfrag);
    const uint2 *qbias = (const uint2 *)(smem + P.off_qbias);
    const uint32_t mhi = g >= 4 ? 0xffffffffu : 0u; /* lanes of the lo columns */
    const uint32_t msg = mhi & 0x80008000u;
    /* this lane's columns 2t + col are query rows (2t + col) & 3 */
    float rf[2], rf4[2];
    int rlim[2];
#pragma unroll
    for (int col = 0; col < 2; col++) {
        const int r = (2 * t + col) & 3;
        rf[col] = qexp[r] * P.sm_log2 * (1.0f / 256.0f) / FAC;
        rf4[col] = rf[col] * 0.25f;
        rlim[col] = r < P.rows ? (int)(tokens - P.q_len + r / P.g) : 0x7fffffff;
    }
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float acc[KS][4];
    float loacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < KS; s++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[s][i] = 0.0f;
    int Scur = 0;
    const int first_lim = (int)(tokens - P.q_len);
    FastChunkIssuer cp;
    cp.table = sv.table;
    cp.ib = cw0 / P.cpb, cp.icc = cw0 - cp.ib * P.cpb;
    /* (block, chunk) of the next chunk to consume */
    int cb_ = cp.ib, ccc = cp.icc;
    cp.o_kc = (uint32_t)((long long)h * P.lay.head_bytes);
    cp.o_vc = cp.o_kc + (uint32_t)P.lay.kcodes_bytes;
    cp.o_kp = cp.o_kc + (uint32_t)P.lay.kparams_off;
    cp.o_vp = cp.o_kc + (uint32_t)P.lay.vparams_off;
    cp.o_nm = (uint32_t)((long long)P.lay.hkv * P.lay.head_bytes);
    cp.s_base = smem_u32(wreg), cp.b_base = smem_u32(mbar);
    for (int i = 0; i < NSTAGE - 1 && i < nmine; i++) cp.issue(P, i, lane);

    for (int it = 0; it < nmine; it++) {
        if (it + NSTAGE - 1 < nmine) cp.issue(P, it + NSTAGE - 1, lane);
        mbar_wait(&mbar[it % NSTAGE], (uint32_t)((it / NSTAGE) & 1));
        const uint8_t *st = wreg + (size_t)(it % NSTAGE) * P.stage_bytes;
        const int b = cb_, cc = ccc;
        if (++ccc == P.cpb) ccc = 0, cb_++;
        const int tok0 = cc * CHUNK;
        const int ntiles = min(CHUNK, P.lay.R - tok0) / 16; /* 2 or 4 */
        const int gf = tok0 >> P.gk_shift;
        const int tb = b * P.lay.R + tok0;
        const float *nm = (const float *)(st + P.nm_off);
        const uint32_t *vpw = (const uint32_t *)(st + P.vp_off);

        float lg[4][4];
        fast_key_scores<FM>(P, st, qfrag, qbias, nm, tok0, ntiles, gf, tb, first_lim, rf, rf4, rlim, mhi, msg, lane,
                            lg);
        const ChunkValueScale vs = chunk_value_scale(fast_value_scale_max(vpw, ntiles, lane), Scur);
        fast_online_softmax<KS>(lg, m, l, acc, loacc, vs.dS, vs.same);
        fast_value_accumulate<FM>(P, st, vpw, lg, ntiles, vs.twoS, vs.twoS16, lane, acc, loacc);
        __syncwarp(); /* the stage is free for the copy issued next */
    }
    fast_write_partial<FM>(O, wm, wl, m, l, acc, loacc, Scur, lane);
}

/* ---- the generic quantised path (any d, 2 or 4 bits, NT n tiles of 8
 * rows) ------------------------------------------------------------------ */

/* The bulk copies of the codes of tiles [tile0, tile0 + ntiles) of a K or V
 * codes array at width BITS into a stage (3 bits: both planes, the high
 * one at `high`). Returns the bytes. */
template <int D, int BITS>
__device__ __forceinline__ uint32_t issue_codes(const uint8_t *codes, int R, int tile0, int ntiles, uint32_t dst,
                                                uint32_t high, uint32_t sbar) {
    using TC = TileCodes<D, BITS>;
    const uint32_t b0 = (uint32_t)ntiles * TC::PLANE0_TILE;
    bulk_g2s(dst, codes + (size_t)tile0 * TC::PLANE0_TILE, b0, sbar);
    if constexpr (BITS == 3) {
        const uint32_t b1 = (uint32_t)ntiles * TC::PLANE1_TILE;
        bulk_g2s(high, codes + (size_t)R * D / 4 + (size_t)tile0 * TC::PLANE1_TILE, b1, sbar);
        return b0 + b1;
    }
    return b0;
}

/* Issues the bulk copies of chunk ci of the warp's sequence into stage
 * i % NSTAGE (lane 0 only). */
template <int D, int KB, int VB>
__device__ __forceinline__ void issue_chunk(const AttnParams &P, uint8_t *wreg, uint64_t *mbar, const int32_t *table,
                                            int h, int NCG, int ci, int i) {
    const int b = ci / P.cpb, cc = ci - b * P.cpb;
    const int tok0 = cc * CHUNK;
    const int ntok = min(CHUNK, P.lay.R - tok0);
    const int pb = checked_block(P, table[b]);
    const uint8_t *blk = P.pool_layer + (size_t)pb * P.lay.LB;
    const uint8_t *head = blk + (size_t)h * P.lay.head_bytes;
    uint8_t *st = wreg + (size_t)(i % NSTAGE) * P.stage_bytes;
    uint64_t *bar = &mbar[i % NSTAGE];
    const int gf = tok0 / P.lay.Gk, gl = (tok0 + ntok - 1) / P.lay.Gk;
    constexpr uint32_t tile_bytes = 2 * D * (KB + VB); /* K and V codes of a tile */
    const uint32_t bkp = (uint32_t)(gl - gf + 1) * D * 4;
    const uint32_t bvp = (uint32_t)ntok * NCG * 4;
    const uint32_t bnm = P.lay.scale_keys ? (uint32_t)ntok * 4 : 0u;
    const uint32_t sbar = smem_u32(bar);
    fence_proxy_async();
    mbar_expect_tx(sbar, (uint32_t)(ntok / 16) * tile_bytes + bkp + bvp + bnm);
    issue_codes<D, KB>(head, P.lay.R, tok0 / 16, ntok / 16, smem_u32(st + P.kc_off), smem_u32(st + P.kch_off), sbar);
    issue_codes<D, VB>(head + P.lay.kcodes_bytes, P.lay.R, tok0 / 16, ntok / 16, smem_u32(st + P.vc_off),
                       smem_u32(st + P.vch_off), sbar);
    bulk_g2s(smem_u32(st + P.kp_off), head + P.lay.kparams_off + (size_t)gf * D * 4, bkp, sbar);
    bulk_g2s(smem_u32(st + P.vp_off), head + P.lay.vparams_off + (size_t)tok0 * NCG * 4, bvp, sbar);
    /* norms: [R] per token, or [Hkv][R] per token and head (this head's row) */
    if (bnm)
        bulk_g2s(smem_u32(st + P.nm_off),
                 blk + (size_t)P.lay.hkv * P.lay.head_bytes +
                     ((P.lay.norm_per_head ? (size_t)h * P.lay.R : 0) + (size_t)tok0) * 4,
                 bnm, sbar);
}

/* The B operands of one key group: q~ = q' * scale as fp16 hi + lo parts
 * (so that the logits keep ~2^-22 relative error, not fp16's 2^-11), and
 * the bias q' . lo of the group (two mma, hi and lo parts of q'). */
template <int KS, int NT>
struct KeyGroupOperands {
    int cur; /* the key group they were made for; -1: none yet */
    uint32_t qth[KS][NT][2], qtl[KS][NT][2];
    float bias[NT][2];
};

template <int D, int NT>
__device__ __forceinline__ void load_key_group(KeyGroupOperands<D / 16, NT> &ko, const AttnParams &P, const uint8_t *st,
                                               const uint4 *qfrag, int grp, int gf, int lane) {
    constexpr int KS = D / 16;
    const int t = lane & 3;
    ko.cur = grp;
    const uint8_t *kp = st + P.kp_off + (size_t)(grp - gf) * D * 4;
    float cbh[NT][4], cbl[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) cbh[nt][i] = 0.0f, cbl[nt][i] = 0.0f;
#pragma unroll
    for (int s = 0; s < KS; s++) {
        const uint2 pa = *(const uint2 *)(kp + (16 * s + 2 * t) * 4);
        const uint2 pc = *(const uint2 *)(kp + (16 * s + 2 * t + 8) * 4);
        const uint32_t scA = __byte_perm(pa.x, pa.y, 0x5410), loA = __byte_perm(pa.x, pa.y, 0x7632);
        const uint32_t scB = __byte_perm(pc.x, pc.y, 0x5410), loB = __byte_perm(pc.x, pc.y, 0x7632);
        const uint32_t la[4] = {loA, loA, loB, loB};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint4 f = qfrag[(s * NT + nt) * 32 + lane];
            const uint32_t h0 = hmul2u(f.x, scA), h1 = hmul2u(f.y, scB);
            ko.qth[s][nt][0] = h0;
            ko.qth[s][nt][1] = h1;
            ko.qtl[s][nt][0] = hfma2u(f.z, scA, hfma2u(f.x, scA, hneg2u(h0)));
            ko.qtl[s][nt][1] = hfma2u(f.w, scB, hfma2u(f.y, scB, hneg2u(h1)));
            mma16816(cbh[nt], la, f.x, f.y);
            mma16816(cbl[nt], la, f.z, f.w);
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
        ko.bias[nt][0] = cbh[nt][0] + cbl[nt][0], ko.bias[nt][1] = cbh[nt][1] + cbl[nt][1];
}

/* The logits of tile TL from its hi and lo accumulators: times the token
 * norm and the row factor, -inf past a row's causal limit. */
template <int TL, int NT>
__device__ __forceinline__ void tile_logits(const AttnParams &P, const float *nm, int tb, int first_lim,
                                            const RowInfo (&ri)[NT][2], int g, const float (&c)[NT][4],
                                            const float (&cl)[NT][4], float (&lg)[4][NT][4]) {
    constexpr int tl = TL;
    const int r0 = 16 * tl + g;
    const float s0 = P.lay.scale_keys ? nm[r0] : 1.0f, s1 = P.lay.scale_keys ? nm[r0 + 8] : 1.0f;
    const int T0 = tb + r0, T1 = T0 + 8;
    if (tb + 16 * tl + 15 <= first_lim) { /* no causal mask in this tile */
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            lg[tl][nt][0] = (c[nt][0] + cl[nt][0]) * s0 * ri[nt][0].f;
            lg[tl][nt][1] = (c[nt][1] + cl[nt][1]) * s0 * ri[nt][1].f;
            lg[tl][nt][2] = (c[nt][2] + cl[nt][2]) * s1 * ri[nt][0].f;
            lg[tl][nt][3] = (c[nt][3] + cl[nt][3]) * s1 * ri[nt][1].f;
        }
    } else {
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            lg[tl][nt][0] = T0 <= ri[nt][0].lim ? (c[nt][0] + cl[nt][0]) * s0 * ri[nt][0].f : -INFINITY;
            lg[tl][nt][1] = T0 <= ri[nt][1].lim ? (c[nt][1] + cl[nt][1]) * s0 * ri[nt][1].f : -INFINITY;
            lg[tl][nt][2] = T1 <= ri[nt][0].lim ? (c[nt][2] + cl[nt][2]) * s1 * ri[nt][0].f : -INFINITY;
            lg[tl][nt][3] = T1 <= ri[nt][1].lim ? (c[nt][3] + cl[nt][3]) * s1 * ri[nt][1].f : -INFINITY;
        }
    }
}

/* Generic path: the lane's share of the chunk's largest value scale. */
__device__ __forceinline__ uint32_t value_scale_max(const uint32_t *vpw, int ntiles, int NCG, int lane) {
    uint32_t mxs = 0;
    const int nvw = ntiles * 16 * NCG;
    for (int i = lane; i < nvw; i += 32) mxs = max(mxs, vpw[i] & 0x7fffu);
    return mxs;
}

/* Generic path, online softmax of one chunk per n tile (as
 * fast_online_softmax, with the range-checked ex2). */
template <int KS, int NT>
__device__ __forceinline__ void online_softmax(float (&lg)[4][NT][4], float (&m)[NT][2], float (&l)[NT][2],
                                               float (&acc)[KS][NT][4], float (&loacc)[NT][4], float dS,
                                               bool s_same) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        float fac[2], al[2];
        bool moved = false;
#pragma unroll
        for (int col = 0; col < 2; col++) {
            float mx = -INFINITY;
#pragma unroll
            for (int tl = 0; tl < 4; tl++) mx = fmaxf(mx, fmaxf(lg[tl][nt][col], lg[tl][nt][col + 2]));
            mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(OSCAR_FULL_MASK, mx, 16));
            const float mnew = fmaxf(m[nt][col], mx);
            const float muse = mnew == -INFINITY ? 0.0f : mnew;
            moved |= mnew != m[nt][col];
            al[col] = ex2(m[nt][col] - muse);
            m[nt][col] = mnew;
            float sum = 0.0f;
#pragma unroll
            for (int tl = 0; tl < 4; tl++) {
                lg[tl][nt][col] = ex2(lg[tl][nt][col] - muse);
                lg[tl][nt][col + 2] = ex2(lg[tl][nt][col + 2] - muse);
                sum += lg[tl][nt][col] + lg[tl][nt][col + 2];
            }
            l[nt][col] = l[nt][col] * al[col] + sum;
            fac[col] = al[col] * dS;
        }
        /* rescale only when a running max or the value exponent moved */
        if (__any_sync(OSCAR_FULL_MASK, moved || !s_same)) {
#pragma unroll
            for (int s = 0; s < KS; s++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[s][nt][i] *= fac[i & 1];
#pragma unroll
            for (int i = 0; i < 4; i++) loacc[nt][i] *= al[i & 1];
        }
    }
}

/* Generic path, values of one chunk: acc += codes^T . (p * 2^S * scale),
 * the scale of a value group applied once per group (gv_shift channel
 * tiles), loacc += lo^T . p with the value groups as A rows. vo0..vo3:
 * word offsets of this lane's parameter rows in a tile. */
template <int D, int VB, int NT>
__device__ __forceinline__ void value_accumulate(const AttnParams &P, const uint8_t *st, const uint32_t *vpw,
                                                 const float (&lg)[4][NT][4], int ntiles, uint32_t twoS, int NCG,
                                                 int vo0, int vo1, int vo2, int vo3, int lane,
                                                 float (&acc)[D / 16][NT][4], float (&loacc)[NT][4]) {
    constexpr int KS = D / 16;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int tl = 0; tl < 4; tl++) {
        if (tl < ntiles) {
            uint32_t pb0[NT], pb1[NT], ps0[NT], ps1[NT];
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                pb0[nt] = movtrans(pack_h2(lg[tl][nt][0], lg[tl][nt][1]));
                pb1[nt] = movtrans(pack_h2(lg[tl][nt][2], lg[tl][nt][3]));
                ps0[nt] = hmul2u(pb0[nt], twoS);
                ps1[nt] = hmul2u(pb1[nt], twoS);
            }
            const uint32_t *vt = vpw + tl * 16 * NCG;
            const uint32_t *vr0 = vt + vo0, *vr1 = vt + vo1, *vr2 = vt + vo2, *vr3 = vt + vo3;
            /* lo^T . p */
            {
                auto lo = [&](int tok, int cg) -> uint32_t { return cg < NCG ? (vt[tok * NCG + cg] >> 16) : 0u; };
                uint32_t la[4];
                la[0] = lo(2 * t, g) | (lo(2 * t + 1, g) << 16);
                la[1] = lo(2 * t, g + 8) | (lo(2 * t + 1, g + 8) << 16);
                la[2] = lo(2 * t + 8, g) | (lo(2 * t + 9, g) << 16);
                la[3] = lo(2 * t + 8, g + 8) | (lo(2 * t + 9, g + 8) << 16);
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mma16816(loacc[nt], la, pb0[nt], pb1[nt]);
            }
            TileCodes<D, VB> vcodes;
            vcodes.load(st + P.vc_off, st + P.vch_off, tl, lane);
            uint32_t pv0[NT], pv1[NT];
            const uint32_t gmask = (1u << P.gv_shift) - 1u;
            static_for<0, KS>([&](auto S_) {
                constexpr int s = decltype(S_)::value;
                if ((s & gmask) == 0) { /* first channel tile of a value group */
                    const int cg = s >> P.gv_shift;
                    const uint32_t scA = __byte_perm(vr0[cg], vr1[cg], 0x5410);
                    const uint32_t scB = __byte_perm(vr2[cg], vr3[cg], 0x5410);
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) pv0[nt] = hmul2u(ps0[nt], scA), pv1[nt] = hmul2u(ps1[nt], scB);
                }
                uint32_t a[4];
                vcodes.template deq<s>(a);
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mma16816(acc[s][nt], a, pv0[nt], pv1[nt]);
            });
        }
    }
}

/* Generic path: the warp's partial into shared memory (O [RPC][D] with 2^S
 * undone and the lo part added per value group; m, l per row). */
template <int D, int NT>
__device__ __forceinline__ void write_warp_partial(const AttnParams &P, float *O, float *wm, float *wl,
                                                   const float (&m)[NT][2], float (&l)[NT][2],
                                                   const float (&acc)[D / 16][NT][4], const float (&loacc)[NT][4],
                                                   int Scur, int NCG, int lane) {
    constexpr int KS = D / 16;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int col = 0; col < 2; col++) {
            float v = l[nt][col];
            v += __shfl_xor_sync(OSCAR_FULL_MASK, v, 4);
            v += __shfl_xor_sync(OSCAR_FULL_MASK, v, 8);
            v += __shfl_xor_sync(OSCAR_FULL_MASK, v, 16);
            l[nt][col] = v;
        }
    __syncwarp();
    const float unS = __int_as_float((127 - Scur) << 23);
#pragma unroll
    for (int s = 0; s < KS; s++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = nt * 8 + 2 * t + (i & 1), ch = 16 * s + g + 8 * (i >> 1);
                O[r * D + ch] = acc[s][nt][i] * unS;
            }
    __syncwarp();
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int cg = g + 8 * (i >> 1), r = nt * 8 + 2 * t + (i & 1);
            if (cg < NCG) {
                const float v = loacc[nt][i];
                for (int cc = 0; cc < P.lay.Gv; cc++) O[r * D + cg * P.lay.Gv + cc] += v;
            }
        }
    if (g == 0) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int col = 0; col < 2; col++) {
                wm[nt * 8 + 2 * t + col] = m[nt][col];
                wl[nt * 8 + 2 * t + col] = l[nt][col];
            }
    }
    __syncwarp();
}

/* Generic path: the warp's chunks [cw0, cw0 + nmine) through the pipeline,
 * its partial into O, wm, wl. */
template <int D, int KB, int VB, int NT>
__device__ __forceinline__ void quant_warp_chunks(const AttnParams &P, uint8_t *smem, uint8_t *wreg, uint64_t *mbar,
                                                  const float *qexp, const SeqView &sv, long long tokens, int h,
                                                  int qc, int cw0, int nmine, int lane, float *O, float *wm,
                                                  float *wl) {
    constexpr int RPC = 8 * NT;
    constexpr int KS = D / 16;
    const int g = lane >> 2, t = lane & 3;
    const int NCG = D / P.lay.Gv;
    const uint4 *qfrag = (const uint4 *)(smem + P.off_qfrag);
    RowInfo ri[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int col = 0; col < 2; col++) {
            const int r = nt * 8 + 2 * t + col;
            const int gr = qc * RPC + r;
            ri[nt][col].f = qexp[r] * P.sm_log2;
            /* padding rows (zero queries) run unmasked; they are never output */
            ri[nt][col].lim = gr < P.rows ? (int)(tokens - P.q_len + gr / P.g) : 0x7fffffff;
        }
    float m[NT][2], l[NT][2];
    float acc[KS][NT][4];
    float loacc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int col = 0; col < 2; col++) m[nt][col] = -INFINITY, l[nt][col] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) loacc[nt][i] = 0.0f;
#pragma unroll
        for (int s = 0; s < KS; s++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[s][nt][i] = 0.0f;
    }
    int Scur = 0;
    const int first_lim = (int)(tokens - P.q_len); /* every row attends tokens <= this */

    const int32_t *table = sv.table;
    const int vo0 = (2 * t) * NCG, vo1 = (2 * t + 1) * NCG, vo2 = (2 * t + 8) * NCG, vo3 = (2 * t + 9) * NCG;
    if (lane == 0)
        for (int i = 0; i < NSTAGE - 1 && i < nmine; i++) issue_chunk<D, KB, VB>(P, wreg, mbar, table, h, NCG, cw0 + i, i);

    for (int it = 0; it < nmine; it++) {
        if (lane == 0 && it + NSTAGE - 1 < nmine)
            issue_chunk<D, KB, VB>(P, wreg, mbar, table, h, NCG, cw0 + it + NSTAGE - 1, it + NSTAGE - 1);
        mbar_wait(&mbar[it % NSTAGE], (uint32_t)((it / NSTAGE) & 1));
        const uint8_t *st = wreg + (size_t)(it % NSTAGE) * P.stage_bytes;
        const int ci = cw0 + it;
        const int b = ci / P.cpb, cc = ci - b * P.cpb;
        const int tok0 = cc * CHUNK;
        const int ntiles = min(CHUNK, P.lay.R - tok0) / 16;
        const int gf = tok0 / P.lay.Gk;
        const int tb = b * P.lay.R + tok0;
        const float *nm = (const float *)(st + P.nm_off);
        const uint32_t *vpw = (const uint32_t *)(st + P.vp_off);

        /* logits of the chunk, by pairs of tiles: two tiles of one key group
         * share the B operands and run interleaved; a pair that straddles
         * groups (Gk = 16) loads the second group's operands in between.
         * (This stage stays in the loop body: as a separate inlined
         * function NVVM orders it differently and ptxas spills 5x more at
         * d = 128, NT = 2; measured when the kernel was split.) */
        float lg[4][NT][4];
        KeyGroupOperands<KS, NT> ko;
        ko.cur = -1;
        static_for<0, 2>([&](auto TP_) {
            constexpr int ta = 2 * decltype(TP_)::value, tbb = ta + 1;
            if (ta < ntiles) {
                const bool hb = tbb < ntiles;
                const int ga = (tok0 + 16 * ta) / P.lay.Gk;
                const int gb = hb ? (tok0 + 16 * tbb) / P.lay.Gk : ga;
                if (ga != ko.cur) load_key_group<D, NT>(ko, P, st, qfrag, ga, gf, lane);
                const bool same = hb && gb == ga;
                TileCodes<D, KB> kca, kcb;
                kca.load(st + P.kc_off, st + P.kch_off, ta, lane);
                if (hb) {
                    kcb.load(st + P.kc_off, st + P.kch_off, tbb, lane);
                } else {
                    kcb.zero();
                }
                float ca[NT][4], cal[NT][4], cb[NT][4], cbl[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    ca[nt][0] = cb[nt][0] = ko.bias[nt][0];
                    ca[nt][1] = cb[nt][1] = ko.bias[nt][1];
                    ca[nt][2] = cb[nt][2] = ko.bias[nt][0];
                    ca[nt][3] = cb[nt][3] = ko.bias[nt][1];
#pragma unroll
                    for (int i = 0; i < 4; i++) cal[nt][i] = 0.0f, cbl[nt][i] = 0.0f;
                }
                if (same) {
                    static_for<0, KS>([&](auto S_) {
                        constexpr int s = decltype(S_)::value;
                        uint32_t a[4], b[4];
                        kca.template deq<s>(a);
                        kcb.template deq<s>(b);
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            mma16816(ca[nt], a, ko.qth[s][nt][0], ko.qth[s][nt][1]);
                            mma16816(cb[nt], b, ko.qth[s][nt][0], ko.qth[s][nt][1]);
                            mma16816(cal[nt], a, ko.qtl[s][nt][0], ko.qtl[s][nt][1]);
                            mma16816(cbl[nt], b, ko.qtl[s][nt][0], ko.qtl[s][nt][1]);
                        }
                    });
                } else {
                    static_for<0, KS>([&](auto S_) {
                        constexpr int s = decltype(S_)::value;
                        uint32_t a[4];
                        kca.template deq<s>(a);
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            mma16816(ca[nt], a, ko.qth[s][nt][0], ko.qth[s][nt][1]);
                            mma16816(cal[nt], a, ko.qtl[s][nt][0], ko.qtl[s][nt][1]);
                        }
                    });
                }
                tile_logits<ta, NT>(P, nm, tb, first_lim, ri, g, ca, cal, lg);
                if (hb) {
                    if (!same) {
                        load_key_group<D, NT>(ko, P, st, qfrag, gb, gf, lane);
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            cb[nt][0] = ko.bias[nt][0], cb[nt][1] = ko.bias[nt][1];
                            cb[nt][2] = ko.bias[nt][0], cb[nt][3] = ko.bias[nt][1];
                        }
                        static_for<0, KS>([&](auto S_) {
                            constexpr int s = decltype(S_)::value;
                            uint32_t b[4];
                            kcb.template deq<s>(b);
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                mma16816(cb[nt], b, ko.qth[s][nt][0], ko.qth[s][nt][1]);
                                mma16816(cbl[nt], b, ko.qtl[s][nt][0], ko.qtl[s][nt][1]);
                            }
                        });
                    }
                    tile_logits<tbb, NT>(P, nm, tb, first_lim, ri, g, cb, cbl, lg);
                } else {
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) lg[tbb][nt][i] = -INFINITY;
                }
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) lg[ta][nt][i] = -INFINITY, lg[tbb][nt][i] = -INFINITY;
            }
        });
        const ChunkValueScale vs = chunk_value_scale(value_scale_max(vpw, ntiles, NCG, lane), Scur);
        online_softmax<KS, NT>(lg, m, l, acc, loacc, vs.dS, vs.same);
        value_accumulate<D, VB, NT>(P, st, vpw, lg, ntiles, vs.twoS, NCG, vo0, vo1, vo2, vo3, lane, acc, loacc);
        __syncwarp(); /* the stage is free for the copy issued next */
    }
    write_warp_partial<D, NT>(P, O, wm, wl, m, l, acc, loacc, Scur, NCG, lane);
}

/* ---- method none and the window: the dense fp32 path --------------------- */

/* Method none: the warp's chunks [cw0, cw1), dense, merged into the
 * (empty) partial O, wm, wl. */
template <int D, int RPC>
__device__ __forceinline__ void dense_warp_chunks(const AttnParams &P, const SeqView &sv, int h, int cw0, int cw1,
                                                  const float *qf, const long long (&limr)[RPC], float *pbuf,
                                                  int lane, float *O, float *wm, float *wl) {
    for (int i = lane; i < RPC * D; i += 32) O[i] = 0.0f;
    if (lane < RPC) wm[lane] = -INFINITY, wl[lane] = 0.0f;
    __syncwarp();
    DenseState<D, RPC> ds;
    dense_init<D, RPC>(ds);
    const int32_t *table = sv.table;
    for (int ci = cw0; ci < cw1; ci++) {
        const int b = ci / P.cpb, cc = ci - b * P.cpb;
        const int tok0 = cc * CHUNK;
        const int ntok = min(CHUNK, P.lay.R - tok0);
        const uint8_t *head = P.pool_layer + (size_t)checked_block(P, table[b]) * P.lay.LB + (size_t)h * P.lay.head_bytes;
        const uint8_t *kb = head + (size_t)tok0 * D * P.lay.w_esize;
        const uint8_t *vb = head + ((size_t)P.lay.R + tok0) * D * P.lay.w_esize;
        dense_tokens<D, RPC>(ds, kb, vb, D, P.lay.w_dtype, ntok, (long long)b * P.lay.R + tok0, qf, limr, P.sm_log2,
                             pbuf, lane);
    }
    dense_merge<D, RPC>(ds, O, wm, wl, lane);
}

/* The split's share [e0, e1) of the exact tokens, split over the warps,
 * merged into each warp's partial. The exact tokens are the sink rows held
 * (tokens 0 .. sinks - 1) and the window rows (tokens sinks + nblk R ..),
 * `wtok` in all; every split takes 1/splits of them (they cost several
 * times a packed token on this fp32 path: with 32 sinks and a 64-token
 * lag, up to 159 of them in the last split alone made it the critical path,
 * 0.127 -> 0.189 ms at B8/32K). In the slot
 * they are one run of rows [0, wtok): the window rows follow the S sink
 * rows, and there are window rows only once all S are held, so the sink
 * rows held are min(wtok, S). The run is indexed by slot row; each row's
 * causal limit (counted from token S, see causal_limits) becomes the last
 * slot row it attends. Without sinks: the window rows, limits shifted by
 * nblk R. */
template <int D, int RPC>
__device__ __forceinline__ void window_warp_tokens(const AttnParams &P, int slot, int nblk, int wtok, int e0, int e1,
                                                   int h, int warp, const float *qf, const long long (&limr)[RPC],
                                                   float *pbuf, int lane, float *O, float *wm, float *wl) {
    const int w0 = e0 + ((e1 - e0) * warp) / WARPS, w1 = e0 + ((e1 - e0) * (warp + 1)) / WARPS;
    if (w1 > w0) {
        /* position limit t = limr + S: t < sinks is sink row t; otherwise
         * every sink row and the window rows up to slot row t - nblk R */
        const int sinks = min(wtok, P.meta.sinks);
        const long long pr = (long long)nblk * P.lay.R;
        long long rowlim[RPC];
#pragma unroll
        for (int r = 0; r < RPC; r++) {
            const long long t = limr[r] + P.meta.sinks;
            rowlim[r] = t < sinks ? t : max((long long)sinks - 1, t - pr);
        }
        DenseState<D, RPC> ds;
        dense_init<D, RPC>(ds);
        const uint8_t *kb = P.win_layer + (size_t)slot * P.lay.wlb + ((size_t)w0 * P.lay.hkv + h) * D * P.lay.w_esize;
        const uint8_t *vb = kb + P.lay.wlb / 2;
        dense_tokens<D, RPC>(ds, kb, vb, (long long)P.lay.hkv * D, P.lay.w_dtype, w1 - w0, (long long)w0, qf, rowlim,
                             P.sm_log2, pbuf, lane);
        dense_merge<D, RPC>(ds, O, wm, wl, lane);
    }
}

/* Merges the WARPS warp partials in shared memory (log-sum-exp) and writes
 * the CTA's partial (O [RPC][D], then (m, l) per row) to the workspace for
 * merge_kernel. */
template <int D, int RPC>
__device__ __forceinline__ void write_cta_partial(const AttnParams &P, const uint8_t *smem) {
    const size_t cta = ((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    float *wo = P.ws + cta * RPC * D;
    float *wml = P.ws + P.ml_off + cta * RPC * 2;
    for (int i = threadIdx.x; i < RPC * D; i += blockDim.x) {
        const int r = i / D;
        const float *mm = (const float *)(smem + P.off_m);
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, mm[w * RPC + r]);
        float o = 0.0f;
        if (M != -INFINITY) {
#pragma unroll
            for (int w = 0; w < WARPS; w++) {
                const float mw = mm[w * RPC + r];
                if (mw != -INFINITY) o += ((const float *)(smem + (size_t)w * P.warp_region))[i] * exp2f(mw - M);
            }
        }
        wo[i] = o;
    }
    if (threadIdx.x < RPC) {
        const int r = threadIdx.x;
        const float *mm = (const float *)(smem + P.off_m);
        const float *ll = (const float *)(smem + P.off_l);
        float M = -INFINITY, L = 0.0f;
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, mm[w * RPC + r]);
        if (M != -INFINITY)
            for (int w = 0; w < WARPS; w++)
                if (mm[w * RPC + r] != -INFINITY) L += ll[w * RPC + r] * exp2f(mm[w * RPC + r] - M);
        wml[2 * r] = M;
        wml[2 * r + 1] = L;
    }
}

/* ---- the kernel --------------------------------------------------------- */

/* One CTA: a split of one (sequence, kv head, row chunk). FM != 0: the fast
 * path (pick_fast); DENSE: method none. */
template <int D, int KB, int VB, int NT, bool DENSE, int FM>
__global__ void __launch_bounds__(128, NT == 1 ? 3 : 2) attn_kernel(const __grid_constant__ AttnParams P) {
    constexpr int RPC = 8 * NT;
    extern __shared__ __align__(128) uint8_t smem[];

    const int lane = threadIdx.x & 31;
    /* broadcast from lane 0: the compiler then knows the warp index is
     * warp-uniform and keeps what derives from it in uniform registers */
    const int warp = __shfl_sync(OSCAR_FULL_MASK, (int)(threadIdx.x >> 5), 0);
    const int yu = blockIdx.y + P.y_base;
    const int h = yu / P.qchunks, qc = yu - h * P.qchunks;
    const int split = blockIdx.x;
    const int seq = P.seq_base + blockIdx.z;
    const SeqView sv = seq_view(P, seq);
    const long long tokens = (long long)sv.nblk * P.lay.R + sv.wtok - P.meta.sinks; /* from token S */

    uint8_t *wreg = smem + (size_t)warp * P.warp_region;
    uint64_t *mbar = (uint64_t *)(smem + P.off_mbar) + warp * NSTAGE;
    float *qf = (float *)(smem + P.off_qf);
    float *qinv = (float *)(smem + P.off_qinv);
    float *qexp = (float *)(smem + P.off_qexp);
    float *wm = (float *)(smem + P.off_m) + warp * RPC;
    float *wl = (float *)(smem + P.off_l) + warp * RPC;
    float *pbuf = (float *)(smem + P.off_pbuf) + warp * RPC * 32;

    load_queries<D, RPC>(P, qf, seq, h, qc);
    if (!DENSE) init_stage_barriers(mbar, lane);
    __syncthreads();
    rotate_queries<D, RPC>(P, qf, qinv, qexp, warp, lane);
    __syncthreads();
    if constexpr (FM != 0) {
        build_fast_query_fragments<D>(P, smem, qf, qinv);
        __syncthreads();
    } else if constexpr (!DENSE) {
        build_query_fragments<D, NT>(P, smem, qf, qinv);
        __syncthreads();
    }

    long long limr[RPC];
    causal_limits<RPC>(P, qc, tokens, limr);
    int cw0, cw1;
    warp_chunk_range(P, sv.nblk, split, warp, cw0, cw1);

    float *O = (float *)wreg; /* after the pipeline: the warp's partial [RPC][D] */
    if constexpr (FM != 0) {
        static_assert(D == 128 && KB == 2 && VB == 2 && NT == 1, "fast path shape");
        fast_warp_chunks<FM>(P, smem, wreg, mbar, qexp, sv, tokens, h, cw0, cw1 - cw0, lane, O, wm, wl);
    } else if constexpr (!DENSE) {
        quant_warp_chunks<D, KB, VB, NT>(P, smem, wreg, mbar, qexp, sv, tokens, h, qc, cw0, cw1 - cw0, lane, O, wm, wl);
    } else {
        dense_warp_chunks<D, RPC>(P, sv, h, cw0, cw1, qf, limr, pbuf, lane, O, wm, wl);
    }
    if (sv.wtok > 0) { /* this split's share of the exact tokens */
        const int e0 = (int)(((long long)sv.wtok * split) / P.splits);
        const int e1 = (int)(((long long)sv.wtok * (split + 1)) / P.splits);
        if (e1 > e0)
            window_warp_tokens<D, RPC>(P, sv.slot, sv.nblk, sv.wtok, e0, e1, h, warp, qf, limr, pbuf, lane, O, wm, wl);
    }
    __syncthreads();
    write_cta_partial<D, RPC>(P, smem);
}

typedef void (*attn_fn)(AttnParams);

template <int D, int KB, int VB, bool DENSE>
attn_fn pick_nt(int nt) {
    if constexpr (D == 64) {
        if (nt == 1) return attn_kernel<64, KB, VB, 1, DENSE, 0>;
        return attn_kernel<64, KB, VB, 2, DENSE, 0>;
    } else if constexpr (D == 128) {
        if (nt == 1) return attn_kernel<128, KB, VB, 1, DENSE, 0>;
        return attn_kernel<128, KB, VB, 2, DENSE, 0>;
    } else {
        return attn_kernel<256, KB, VB, 1, DENSE, 0>;
    }
}

template <int KB, int VB, bool DENSE>
attn_fn pick_d(int d, int nt) {
    if (d == 64) return pick_nt<64, KB, VB, DENSE>(nt);
    if (d == 128) return pick_nt<128, KB, VB, DENSE>(nt);
    return pick_nt<256, KB, VB, DENSE>(nt);
}

/* The generic quantised kernel at key width KB for value width vbits. */
template <int KB>
attn_fn pick_vbits(int vbits, int d, int nt) {
    if (vbits == 2) return pick_d<KB, 2, false>(d, nt);
    if (vbits == 3) return pick_d<KB, 3, false>(d, nt);
    return pick_d<KB, 4, false>(d, nt);
}

} // namespace

/* attention_k2.cu, attention_k3.cu, attention_k4.cu: the generic kernel for
 * key width 2, 3, 4 and value width vbits, head dim d, nt row tiles. */
void (*oscar_cuda_attn_generic_k2(int vbits, int d, int nt))(AttnParams);
void (*oscar_cuda_attn_generic_k3(int vbits, int d, int nt))(AttnParams);
void (*oscar_cuda_attn_generic_k4(int vbits, int d, int nt))(AttnParams);
