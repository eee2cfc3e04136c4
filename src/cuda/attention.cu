/* Decode attention of the CUDA backend, the host side: shared-memory
 * layout, kernel choice and launches, and the split merge (merge_kernel).
 * The kernel itself is in attention_kernel.cuh (the design is described
 * there); its generic quantised instantiations in attention_k2/k3/k4.cu. */
#include "attention_kernel.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace {

/* Combines the splits of one query row: one CTA per (sequence, kv head
 * and row chunk, row), its 8 warps each summing every 8th split with
 * independent loads; their partial sums meet in shared memory in a fixed
 * order (deterministic). Every warp reduces (m, l) over all the splits
 * itself (lanes in parallel), so only one barrier comes before the final
 * sum. Why: with one warp per row walking up to ~50 splits one after
 * another, the merge was latency-bound at batch 1 (ncu: 21.6 us of the
 * 95 us of B1/128K, 5% of cycles active, long-scoreboard stalls; two warps
 * per row in one CTA per row chunk: 14.3 us). */
template <int D>
__global__ void __launch_bounds__(256) merge_kernel(const __grid_constant__ AttnParams P) {
    constexpr int WARPS_M = 8, E = D / 32;
    __shared__ float wgt[WARPS_M][OSCAR_MERGE_MAX];
    __shared__ __align__(16) float part[WARPS_M][D];
    __shared__ float row_l;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int zi = blockIdx.x;
    const int yu = blockIdx.y + P.y_base;
    const int h = yu / P.qchunks, qc = yu - h * P.qchunks;
    const int r = blockIdx.z, RPC = P.rpc, S = P.splits;
    const int gr = qc * RPC + r;
    if (gr >= P.rows) return; /* a padding row of the last row chunk (the whole CTA) */
    const int seq = P.seq_base + zi;
    /* a failed sequence (non-finite input) or bad metadata: NaN rows */
    const SeqView sv = seq_view(P, seq);
    /* a block id out of range anywhere in the table (the attention kernel
     * read block 0 instead) also poisons the rows: one pass over the
     * sequence's table entries, nblk ints, by the whole CTA */
    int bad_block = 0;
    for (int j = threadIdx.x; j < sv.nblk; j += blockDim.x)
        bad_block |= (unsigned)sv.table[j] >= (unsigned)P.meta.block_count;
    bad_block = __syncthreads_or(bad_block);
    if (threadIdx.x == 0 && r == 0 && (!sv.valid || bad_block)) {
        P.report->bad_first = seq;
        __threadfence_system();
        P.report->bad_meta = 1;
    }
    const bool poison = !sv.valid || bad_block || P.failed[sv.slot] != 0;
    const size_t cta0 = ((size_t)zi * gridDim.y + blockIdx.y) * S;
    const float *ml = P.ws + P.ml_off + (cta0 * RPC + r) * 2; /* split s: ml[s * RPC * 2 + {0, 1}] */
    float M = -INFINITY;
    for (int s = lane; s < S; s += 32) M = fmaxf(M, ml[(size_t)s * RPC * 2]);
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) M = fmaxf(M, __shfl_xor_sync(OSCAR_FULL_MASK, M, m));
    float L = 0.0f;
    for (int s = lane; s < S; s += 32) {
        const float ms = ml[(size_t)s * RPC * 2];
        const float w = (M == -INFINITY || ms == -INFINITY) ? 0.0f : exp2f(ms - M);
        wgt[warp][s] = w;
        L += w * ml[(size_t)s * RPC * 2 + 1];
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) L += __shfl_xor_sync(OSCAR_FULL_MASK, L, m);
    __syncwarp();
    float o[E];
#pragma unroll
    for (int i = 0; i < E; i++) o[i] = 0.0f;
    const float *src = P.ws + (cta0 * RPC + r) * D + lane * E;
    const size_t stride = (size_t)RPC * D;
#pragma unroll 4
    for (int s = warp; s < S; s += WARPS_M) {
        const float w = wgt[warp][s];
#pragma unroll
        for (int i = 0; i < E; i++) o[i] += w * src[s * stride + i];
    }
#pragma unroll
    for (int i = 0; i < E; i++) part[warp][lane * E + i] = o[i];
    if (warp == 0 && lane == 0) row_l = L;
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < E; i++) o[i] = part[0][lane * E + i];
    for (int j = 1; j < WARPS_M; j++)
#pragma unroll
        for (int i = 0; i < E; i++) o[i] += part[j][lane * E + i];
    const float inv = poison ? __int_as_float(0x7fc00000) : row_l > 0.0f ? 1.0f / row_l : 0.0f;
#pragma unroll
    for (int i = 0; i < E; i++) o[i] = poison ? inv : o[i] * inv;
    if (P.lay.rotate_v) oscar_warp_fwht<D>(o, lane);
    const int qi = gr / P.g, hj = gr - qi * P.g;
    const size_t base = (((size_t)seq * P.q_len + qi) * P.hq + (size_t)h * P.g + hj) * D + lane * E;
#pragma unroll
    for (int i = 0; i < E; i++) oscar_st(P.out, P.out_dtype, base + i, o[i]);
}

/* ---- host side ---------------------------------------------------------- */

int nt_for(int d, int rows) {
    const int maxnt = d == 256 ? 1 : 2;
    int nt = (rows + 7) / 8;
    if (nt > maxnt) nt = maxnt;
    if (nt == 3) nt = 4;
    return nt;
}

int nt_index(int nt) { return nt == 1 ? 0 : nt == 2 ? 1 : 2; }

/* Shared-memory layout; fills the offsets of P and returns the bytes. */
size_t attn_layout(const oscar_layout *L, int nt, AttnParams *P) {
    const int D = L->d, RPC = 8 * nt;
    const int NCG = L->v_group > 0 ? D / L->v_group : 1;
    /* a stage holds up to 4 tiles of K codes, then 4 of V codes; 3-bit codes
     * keep their 2-bit plane's 4 tiles first, the high plane's after */
    const int ktile = 2 * D * (L->quantised ? L->kbits : 2), vtile = 2 * D * (L->quantised ? L->vbits : 2);
    const int kpr = (CHUNK - 1 + L->k_group - 1) / L->k_group + 1;
    auto al = [](size_t x, size_t a) { return (x + a - 1) / a * a; };
    size_t o = 0;
    int kc = 0, vc = 0, kp = 0, vp = 0, nm = 0, stage = 0, kch = 0, vch = 0;
    if (L->quantised) {
        kc = 0;
        kch = kc + 4 * 4 * D; /* used only at 3 bits */
        vc = kc + 4 * ktile;
        vch = vc + 4 * 4 * D;
        kp = vc + 4 * vtile;
        vp = (int)al(kp + (size_t)kpr * D * 4, 16);
        nm = (int)al(vp + (size_t)CHUNK * NCG * 4, 16);
        stage = (int)al(nm + CHUNK * 4, 128);
    }
    size_t region = (size_t)NSTAGE * stage;
    if (region < (size_t)RPC * D * 4) region = (size_t)RPC * D * 4;
    region = al(region, 128);
    o = region * WARPS;
    size_t mb = o;
    o = al(o + WARPS * NSTAGE * 8, 16);
    size_t qf = o;
    o += (size_t)RPC * D * 4;
    size_t qi = o;
    o += RPC * 4;
    size_t qe = o;
    o += RPC * 4;
    size_t om = o;
    o += WARPS * RPC * 4;
    size_t ol = o;
    o += WARPS * RPC * 4;
    size_t pbuf = al(o, 16);
    o = pbuf + (size_t)WARPS * RPC * 32 * 4;
    size_t qfr = al(o, 16);
    o = qfr + (L->quantised ? (size_t)(D / 16) * nt * 32 * 16 : 0);
    size_t qbs = al(o, 16);
    o = qbs + (L->quantised && nt == 1 ? (size_t)(D / 16) * 32 * 8 : 0);
    if (P) {
        P->stage_bytes = stage;
        P->kc_off = kc, P->vc_off = vc, P->kp_off = kp, P->vp_off = vp, P->nm_off = nm;
        P->kch_off = kch, P->vch_off = vch;
        P->warp_region = (int)region;
        P->off_mbar = (int)mb, P->off_qf = (int)qf, P->off_qinv = (int)qi, P->off_qexp = (int)qe;
        P->off_m = (int)om, P->off_l = (int)ol, P->off_pbuf = (int)pbuf, P->off_qfrag = (int)qfr;
        P->off_qbias = (int)qbs;
        P->rpc = RPC;
    }
    return al(o, 16);
}

/* The generic kernel for the cache's head dim and key and value widths
 * (each 2, 3 or 4), or method none's dense one. */
attn_fn pick_kernel(const oscar_layout *L, int nt) {
    if (!L->quantised) return pick_d<2, 2, true>(L->d, nt);
    if (L->kbits == 2) return oscar_cuda_attn_generic_k2(L->vbits, L->d, nt);
    if (L->kbits == 3) return oscar_cuda_attn_generic_k3(L->vbits, L->d, nt);
    return oscar_cuda_attn_generic_k4(L->vbits, L->d, nt);
}

/* the fast kernel, if the call's shape allows it (1: subnormal codes; the
 * magic-number variant 2 is kept for the kernel harness) */
int fast_mode(const oscar_layout *L, int rows) {
    if (!(L->quantised && L->kbits == 2 && L->vbits == 2 && !L->norm_per_head && L->d == 128 && rows <= 4 && L->v_group == 32 && L->k_group % 32 == 0 &&
          (L->k_group & (L->k_group - 1)) == 0 && L->scale_keys && L->residual % 32 == 0))
        return 0;
    return 1;
}

attn_fn pick_fast(int fm) {
    return fm == 1 ? attn_kernel<128, 2, 2, 1, false, 1> : attn_kernel<128, 2, 2, 1, false, 2>;
}

attn_fn pick_merge(int d) {
    if (d == 64) return merge_kernel<64>;
    if (d == 128) return merge_kernel<128>;
    return merge_kernel<256>;
}

} // namespace

size_t oscar_cuda_partials_bytes(const oscar_layout *L, int sm_count) {
    /* enough for 16 CTAs per SM at the largest row chunk, or 64 sequences x
     * all heads x 2 row chunks; larger calls loop over launches */
    const int rpc_max = 8 * nt_for(L->d, 64);
    size_t ctas = (size_t)sm_count * 16;
    size_t need = (size_t)64 * L->hkv * 2;
    if (need > ctas) ctas = need;
    return ctas * rpc_max * (L->d + 2) * sizeof(float);
}

oscar_status oscar_cuda_kernels_init(oscar_cache *c) {
    CudaState *S = cuda_state(c);
    const oscar_layout *L = &c->lay;
    const int nts[3] = {1, 2, 4};
    for (int k = 0; k < 3; k++) {
        const int nt = nts[k];
        if (nt_for(L->d, 8 * nt) != nt) {
            S->occ[k] = 0;
            continue;
        }
        size_t smem = attn_layout(L, nt, NULL);
        S->attn_smem[k] = smem;
        if (smem > S->smem_optin)
            return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "CUDA attention needs %zu bytes of shared memory", smem);
        attn_fn f = pick_kernel(L, nt);
        /* The limit is an attribute of the kernel for the whole device, not of
         * this cache: set it to the device's maximum, so that caches of other
         * shapes created later (which need less) cannot lower it under us. */
        const int limit = (int)S->smem_optin;
        OSCAR_CK(c, cudaFuncSetAttribute((const void *)f, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
        int occ = 0;
        OSCAR_CK(c, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, f, 128, smem));
        S->occ[k] = occ > 0 ? occ : 1;
        if (nt == 1 && L->quantised && L->kbits == 2 && L->vbits == 2 && L->d == 128)
            for (int fm = 1; fm <= 2; fm++)
                OSCAR_CK(c, cudaFuncSetAttribute((const void *)pick_fast(fm),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    }
    extern oscar_status oscar_cuda_pack_init(oscar_cache * c);
    return oscar_cuda_pack_init(c);
}

oscar_status oscar_cuda_attention_call(oscar_cache *c, int layer, const SeqMeta &meta, int n_seqs, int max_len,
                                       int q_len, const void *q, oscar_dtype q_dtype, void *out,
                                       oscar_dtype out_dtype, float softmax_scale, cudaStream_t st) {
    CudaState *S = cuda_state(c);
    const oscar_layout *L = &c->lay;
    const int D = L->d;
    const int g = L->hq / L->hkv;
    const int rows = g * q_len;
    const int nt = nt_for(D, rows);
    AttnParams P;
    memset(&P, 0, sizeof P);
    attn_layout(L, nt, &P);
    const size_t smem = S->attn_smem[nt_index(nt)];
    const int RPC = 8 * nt;
    P.pool_layer = S->pool + (size_t)layer * c->cfg.block_count * L->layer_block_bytes;
    P.win_layer = S->windows + (size_t)layer * c->cfg.max_seqs * L->window_layer_bytes;
    P.q = q;
    P.out = out;
    P.ws = S->ws;
    P.failed = S->failed;
    P.report = S->report;
    P.meta = meta;
    P.lay = S->dlay;
    P.q_dtype = (int)q_dtype;
    P.out_dtype = (int)out_dtype;
    int sh = 0;
    while ((16 << sh) < L->v_group) sh++;
    P.gv_shift = sh;
    sh = 0;
    while ((1 << sh) < L->k_group) sh++;
    P.gk_shift = sh; /* exact only for power-of-two Gk: used by the fast kernel only */
    P.hq = L->hq;
    P.g = g;
    P.q_len = q_len;
    P.rows = rows;
    P.qchunks = (rows + RPC - 1) / RPC;
    P.cpb = (L->residual + CHUNK - 1) / CHUNK;
    if (!(softmax_scale > 0.0f)) softmax_scale = 1.0f / sqrtf((float)D);
    P.sm_log2 = softmax_scale * 1.4426950408889634f;

    attn_fn kern = pick_kernel(L, nt);
    const int fm = nt == 1 ? fast_mode(L, rows) : 0;
    if (fm) kern = pick_fast(fm);
    attn_fn merge = pick_merge(D);
    const size_t per_cta = (size_t)RPC * (D + 2) * sizeof(float);
    const long long capacity = (long long)(S->ws_bytes / per_cta); /* CTAs whose partials fit */
    const long long target = (long long)S->occ[nt_index(nt)] * S->sm_count;
    const long long units_per_seq = (long long)L->hkv * P.qchunks;
    const int max_chunks = (max_len / L->residual) * P.cpb;
    /* The grid depends only on the host fields (n_seqs, q_len, max_len), so
     * a captured call replays for any lengths up to max_len. Calls whose
     * partials exceed the workspace run as several launches: groups of
     * sequences, or for long query chunks, ranges of (head, row chunk). */
    long long nb_max, ny;
    if (units_per_seq <= capacity) {
        ny = units_per_seq;
        nb_max = capacity / units_per_seq;
        if (nb_max > 65535) nb_max = 65535;
    } else {
        ny = capacity;
        nb_max = 1;
    }
    for (int done = 0; done < n_seqs;) {
        const int nb = (int)((long long)(n_seqs - done) < nb_max ? (n_seqs - done) : nb_max);
        for (long long y0 = 0; y0 < units_per_seq; y0 += ny) {
            const long long nyl = units_per_seq - y0 < ny ? units_per_seq - y0 : ny;
            const long long units = (long long)nb * nyl;
            /* split count: minimise (waves of resident CTAs) x (chunks per
             * CTA + ~2 chunks of fixed cost), at least 2 chunks per warp */
            long long cap = (max_chunks + 2 * WARPS - 1) / (2 * WARPS);
            if (cap > OSCAR_MERGE_MAX) cap = OSCAR_MERGE_MAX;
            if (cap > capacity / units) cap = capacity / units;
            if (cap < 1) cap = 1;
            long long splits = 1;
            double best = 1e30;
            for (long long sp = 1; sp <= cap; sp++) {
                const double waves = (double)((units * sp + target - 1) / target);
                const double cost = waves * (double)((max_chunks + sp - 1) / sp + 2);
                if (cost < best * 0.999) best = cost, splits = sp;
            }
            P.splits = (int)splits;
            P.seq_base = done;
            P.y_base = (int)y0;
            P.ml_off = (long long)(units * splits) * RPC * D;
            dim3 grid((unsigned)splits, (unsigned)nyl, (unsigned)nb);
            kern<<<grid, 128, smem, st>>>(P);
            OSCAR_CK_LAUNCH(c, "attn_kernel");
            merge<<<dim3((unsigned)nb, (unsigned)nyl, (unsigned)RPC), 256, 0, st>>>(P);
            OSCAR_CK_LAUNCH(c, "merge_kernel");
        }
        done += nb;
    }
    return OSCAR_OK;
}
