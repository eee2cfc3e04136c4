/* Shared pieces of the CUDA backend: the backend state, the job records the
 * kernels read, and small device helpers (conversions, warp Hadamard).
 * Everything here follows docs/FORMAT.md; the CPU backend is the reference. */
#ifndef OSCAR_CUDA_COMMON_CUH
#define OSCAR_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stddef.h>

#include "internal.h"

#define OSCAR_FULL_MASK 0xffffffffu

/* ---- records copied to the device for an append call ------------------- */

/* One block to pack: stream tokens [stream0, stream0 + R) of a sequence. */
struct PackTask {
    int64_t input_row;     /* input row of stream index window_before      */
    int32_t block;         /* physical block id                            */
    int32_t slot;          /* window slot / sequence slot                  */
    int32_t window_before; /* stream indices < this come from the window    */
    int32_t stream0;       /* first stream index of the block              */
};

/* Rows [r0, r1) of a window slot receive stream tokens r + shift: old
 * window row r + shift where that is < wb, else input row in0 + r + shift.
 * (With a rollback lag old rows move down: rows [0, wb - shift) from rows
 * [shift, wb), which may then receive new tokens themselves.)
 * sink = 1: the rows are the slot's sink rows (config.sink_tokens), written
 * from the input only (shift = wb = 0) and without sums of squares. */
struct WinTask {
    int64_t in0;
    int32_t slot;
    int32_t r0;
    int32_t r1;
    int32_t shift;
    int32_t wb;
    int32_t sink;
};

/* ---- the packed layout as the kernels read it --------------------------- */

/* docs/FORMAT.md's layout of one cache, filled once from oscar_layout and
 * shared by the append and attention kernels' parameters. */
struct DeviceLayout {
    long long LB;            /* bytes of one block in one layer              */
    long long head_bytes;    /* bytes of one KV head in a block              */
    long long kcodes_bytes;  /* key codes of one head (3 bits: both planes)  */
    long long vcodes_bytes;  /* value codes of one head                      */
    long long kparams_bytes; /* key (scale, lo) pairs of one head            */
    long long kparams_off;   /* head offset of the key pairs: after both codes */
    long long vparams_off;   /* head offset of the value pairs: after the key pairs */
    long long wlb;           /* bytes of one window slot in one layer (K, V) */
    long long wsink;         /* bytes from a slot's K (or V) rows to its window
                                rows: the sink rows come first (0 without)   */
    int R, Gk, Gv, hkv;
    int kbits, vbits;        /* code widths: 2, 3 (two planes) or 4          */
    int klevels, vlevels;    /* top codes 2^bits - 1                         */
    int norm_per_head;       /* norms [Hkv][R] (one per token and head)      */
    int w_dtype, w_esize;    /* window element type and size                 */
    int rotate, rotate_v, scale_keys;
};

static inline DeviceLayout oscar_cuda_device_layout(const oscar_layout *L) {
    DeviceLayout d;
    d.LB = (long long)L->layer_block_bytes;
    d.head_bytes = (long long)L->head_bytes;
    d.kcodes_bytes = (long long)L->kcodes_bytes;
    d.vcodes_bytes = (long long)L->vcodes_bytes;
    d.kparams_bytes = (long long)L->kparams_bytes;
    d.kparams_off = d.kcodes_bytes + d.vcodes_bytes;
    d.vparams_off = d.kparams_off + d.kparams_bytes;
    d.wlb = (long long)L->window_layer_bytes;
    d.wsink = (long long)L->sinks * L->hkv * L->d * L->window_esize;
    d.R = L->residual;
    d.Gk = L->k_group;
    d.Gv = L->v_group;
    d.hkv = L->hkv;
    d.kbits = L->kbits;
    d.vbits = L->vbits;
    d.klevels = L->klevels;
    d.vlevels = L->vlevels;
    d.norm_per_head = L->norm_per_head;
    d.w_dtype = L->window_dtype;
    d.w_esize = L->window_esize;
    d.rotate = L->rotate;
    d.rotate_v = L->rotate_v;
    d.scale_keys = L->scale_keys;
    return d;
}

/* ---- attention launch parameters (passed by value) --------------------- */
#define OSCAR_ATTN_WARPS 4
#define OSCAR_ATTN_CHUNK 64 /* tokens per pipeline stage */
#define OSCAR_ATTN_STAGES 2

/* Device-side reports, in pinned host memory the kernels write with plain
 * stores (no atomics over PCIe): a flag per kind, and per window slot (or
 * batch index for bad metadata) one byte. The host polls and clears. */
struct OscarReport {
    volatile int32_t nonfinite;     /* some slot received NaN/Inf          */
    volatile int32_t bad_meta;      /* some batch entry was out of range   */
    volatile int32_t bad_first;     /* one such batch index                */
    int32_t pad;
    volatile uint8_t failed_slot[1]; /* [max_seqs], allocated larger       */
};

/* Per-sequence metadata of one call, in device memory: the caller's arrays
 * (batch API) or the library's own, uploaded by value (sequence API). */
struct SeqMeta {
    const int32_t *lens;    /* tokens after the call's append                 */
    const int32_t *slots;   /* window slot                                    */
    const int32_t *tables;  /* block table rows                               */
    int table_stride;
    int table_by_slot;      /* 1: row = slot (library mirror), 0: row = index */
    int block_count;
    int max_seqs;
    int32_t *packed;        /* [max_seqs] blocks packed in this layer (library state) */
    int32_t *held;          /* [max_seqs] tokens written to this layer (library state) */
    int window_rows;        /* residual + rollback lag                         */
    int lag;
    int sinks;              /* config.sink_tokens S: lens count them; the first
                               min(len, S) tokens sit in the slot's sink rows,
                               blocks and window follow (both APIs: the batch
                               API's seq_lens count them the same way) */
};

/* Reads sequence i's metadata and checks it; an entry out of range makes
 * the sequence empty (valid = false). */
struct SeqView {
    int slot, len, nblk;
    int wtok;               /* exact tokens: len - nblk R, the sink rows held
                               (min(len, S)) and the window tokens           */
    const int32_t *table;
    bool valid;
};

struct AttnParams {
    const uint8_t *pool_layer;  /* pool + layer*block_count*LB            */
    const uint8_t *win_layer;   /* windows + layer*max_seqs*WLB           */
    const void *q;
    void *out;
    float *ws;                  /* partial outputs                        */
    const int32_t *failed;      /* [max_seqs] 1 = sequence failed         */
    OscarReport *report;
    SeqMeta meta;
    DeviceLayout lay;
    int q_dtype, out_dtype;
    int gv_shift, hq, g, q_len, rows, rpc, qchunks, splits, cpb;
    int stage_bytes, kc_off, vc_off, kp_off, vp_off, nm_off, warp_region;
    int kch_off, vch_off;       /* 3-bit codes: the high-bit plane's tiles */
    int off_mbar, off_qf, off_qinv, off_qexp, off_m, off_l, off_pbuf, off_qfrag, off_qbias;
    int gk_shift;               /* log2(Gk) (fast kernel: Gk a power of two) */
    long long ml_off;           /* floats from ws to the (m, l) pairs     */
    float sm_log2;              /* softmax_scale * log2(e)                */
    int seq_base;               /* first sequence of this launch in the call */
    int y_base;                 /* first (head, row chunk) unit of this launch */
};

/* ---- backend state ------------------------------------------------------ */

/* A device region that either the caller or the library owns. */
struct Region {
    uint8_t *ptr;
    size_t bytes;
    int owned;
};

struct CudaState {
    int device;
    int sm_count;
    size_t smem_optin;
    const oscar_allocator *allocator; /* NULL: cudaMalloc */
    DeviceLayout dlay;       /* the kernels' view of c->lay                */
    Region pool_r, windows_r, ws_r;
    uint8_t *pool;
    uint8_t *windows;
    /* workspace carve-up */
    float *ws;               /* attention partials                       */
    size_t ws_bytes;
    int32_t *tables;         /* library block-table mirror [max_seqs][block_count] */
    int32_t *failed;         /* [max_seqs]                                */
    int32_t *packed;         /* [layers][max_seqs] blocks packed          */
    int32_t *held;           /* [layers][max_seqs] tokens written         */
    float *win_ss;           /* [layers][max_seqs][window_rows] in windows */
    float *ss_new;           /* an append call's new rows' sums of squares */
    size_t ss_cap;
    int32_t *meta;           /* per-call metadata of the sequence API: append */
    int32_t *meta_att;       /* ... and attention                          */
    size_t meta_ints;
    /* host copies of what the two regions hold (the upload is skipped when a
     * call's metadata equals the last one's, as for every layer but the
     * first of a decode step); n = -1: unknown */
    int32_t *h_scratch, *h_app, *h_att;
    long long h_app_n, h_att_n;
    PackTask *tasks;         /* append task lists built on the device     */
    WinTask *wtasks;
    size_t max_tasks, max_wtasks;
    int32_t *rowmap;         /* batch API append: row0/n_new per sequence */
    OscarReport *report;     /* pinned, mapped                            */
    size_t report_bytes;
    int occ[3];              /* resident attention CTAs per SM for NT = 1, 2, 4 */
    size_t attn_smem[3];
};

static inline CudaState *cuda_state(oscar_cache *c) { return (CudaState *)c->backend_state; }

/* ---- host-side launchers (pack.cu, attention.cu) ------------------------ */
/* One append call as the device sees it: per-sequence metadata (lens after
 * the append, new-token counts and first input rows) in device memory. */
struct AppendCall {
    SeqMeta meta;
    const int32_t *n_new;    /* NULL: every sequence has `uniform_new`    */
    const int32_t *row0;     /* NULL: sequence i starts at row i*uniform_new */
    int uniform_new;
    int max_new;             /* bound on n_new (sizes the task lists)     */
    const float *tp;         /* gathered per-head key sums (tensor parallel) or NULL */
    int tp_heads;
    int n_seqs;
    int64_t total_rows;
};

/* task0: NULL (every sequence gets room for max_new tokens' flushes) or a
 * device array of n_seqs + 1 first-task indices, n_tasks in all. */
oscar_status oscar_cuda_append_call_tasks(oscar_cache *c, int layer, const AppendCall &C, const int32_t *task0,
                                          int n_tasks, const void *k, const void *v, oscar_dtype dtype,
                                          cudaStream_t st);
oscar_status oscar_cuda_attention_call(oscar_cache *c, int layer, const SeqMeta &meta, int n_seqs, int max_len,
                                       int q_len, const void *q, oscar_dtype q_dtype, void *out,
                                       oscar_dtype out_dtype, float softmax_scale, cudaStream_t st);
oscar_status oscar_cuda_kernels_init(oscar_cache *c);
/* Per-head (head_out [rows][hkv]) and per-token (ss_out [rows]) key sums of
 * squares of new rows; tp: token sums from gathered shard sums instead. */
oscar_status oscar_cuda_row_sumsq(oscar_cache *c, int64_t n_rows, const void *k, oscar_dtype dtype, const float *tp,
                                  int tp_heads, float *head_out, float *ss_out, cudaStream_t st);
/* Bytes of attention partials the workspace holds (independent of the call). */
size_t oscar_cuda_partials_bytes(const oscar_layout *L, int sm_count);
/* Most pack tasks one append call of the batch API or the sequence API can
 * need, and window tasks. */
void oscar_cuda_task_capacity(const oscar_config *cfg, size_t *tasks, size_t *wtasks);

#define OSCAR_CK(c, call)                                                                              \
    do {                                                                                               \
        cudaError_t e_ = (call);                                                                       \
        if (e_ != cudaSuccess)                                                                         \
            return oscar_set_error((c), OSCAR_E_BACKEND, "CUDA: %s failed: %s (%s:%d)", #call,         \
                                   cudaGetErrorString(e_), __FILE__, __LINE__);                       \
    } while (0)

#define OSCAR_CK_LAUNCH(c, what)                                                                       \
    do {                                                                                               \
        cudaError_t e_ = cudaGetLastError();                                                           \
        if (e_ != cudaSuccess)                                                                         \
            return oscar_set_error((c), OSCAR_E_BACKEND, "CUDA: launch of %s failed: %s", what,        \
                                   cudaGetErrorString(e_));                                            \
    } while (0)

/* ---- device helpers ----------------------------------------------------- */
#ifdef __CUDACC__

__device__ __forceinline__ float oscar_ld_f32(const void *p, int dtype, size_t i) {
    if (dtype == OSCAR_DTYPE_F32) return ((const float *)p)[i];
    unsigned short h = ((const unsigned short *)p)[i];
    if (dtype == OSCAR_DTYPE_BF16) return __uint_as_float((unsigned)h << 16);
    return __half2float(__ushort_as_half(h));
}

/* Rounds x to the dtype and returns the rounded value as fp32 (fp16
 * saturates at +-65504 as in docs/FORMAT.md). */
__device__ __forceinline__ float oscar_round_to(float x, int dtype) {
    if (dtype == OSCAR_DTYPE_F16) return __half2float(__float2half_rn(fminf(fmaxf(x, -65504.0f), 65504.0f)));
    if (dtype == OSCAR_DTYPE_BF16) return __bfloat162float(__float2bfloat16_rn(x));
    return x;
}

__device__ __forceinline__ unsigned short oscar_f16_bits(float x) {
    return __half_as_ushort(__float2half_rn(fminf(fmaxf(x, -65504.0f), 65504.0f)));
}

/* Stores x (already representable in dtype, or to be rounded) as dtype. */
__device__ __forceinline__ void oscar_st(void *p, int dtype, size_t i, float x) {
    if (dtype == OSCAR_DTYPE_F32) {
        ((float *)p)[i] = x;
    } else if (dtype == OSCAR_DTYPE_BF16) {
        ((unsigned short *)p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
    } else {
        ((unsigned short *)p)[i] = oscar_f16_bits(x);
    }
}

/* Normalised Walsh-Hadamard transform of one row of D floats held by a warp:
 * lane l holds elements l*E .. l*E+E-1 (E = D/32). The butterflies run in
 * the order of oscar_fwht (h = 1, 2, 4, ...), each a+b / a-b in fp32, and the
 * normalisation is the same fp32 constant, so the result is bit-identical. */
template <int D>
__device__ __forceinline__ void oscar_warp_fwht(float (&x)[D / 32], int lane) {
    constexpr int E = D / 32;
#pragma unroll
    for (int h = 1; h < E; h <<= 1) {
#pragma unroll
        for (int i = 0; i < E; i++) {
            if (!(i & h)) {
                float a = x[i], b = x[i + h];
                x[i] = a + b;
                x[i + h] = a - b;
            }
        }
    }
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
        const bool upper = (lane & m) != 0;
#pragma unroll
        for (int i = 0; i < E; i++) {
            /* lower: x + o, upper: o - x, each one rounding (fma by +-1) */
            const float o = __shfl_xor_sync(OSCAR_FULL_MASK, x[i], m);
            x[i] = __fmaf_rn(upper ? -1.0f : 1.0f, x[i], o);
        }
    }
    const float norm = (float)(1.0 / sqrt((double)D));
#pragma unroll
    for (int i = 0; i < E; i++) x[i] *= norm;
}

#endif /* __CUDACC__ */
#endif
