/*
 * oscar.h - a 2-bit KV cache for LLM attention, with the OScaR method
 * (Hadamard "Canalized Rotation" + "Omni-Token Scaling" + KIVI-style
 * asymmetric quantisation + a full-precision residual window).
 *
 * This is the library's only public header. C11, no dependencies.
 *
 * Conventions
 *  - Every function returns an oscar_status. OSCAR_OK is 0.
 *  - A function that fails changes nothing: the cache is exactly as it was.
 *  - The message for the last failure on a handle is oscar_last_error(cache).
 *    Creation failures write their message into the caller's buffer.
 *  - Sizes are explicit. Tensors are dense, row-major, C-contiguous.
 *  - The library keeps no global mutable state. Each oscar_cache is
 *    independent (CUDA: per-kernel shared-memory limits are device-wide
 *    attributes; every cache sets them to the device's maximum, so caches of
 *    different shapes coexist).
 *
 * Thread safety
 *  - A handle must not be used by two threads at once by calls that take a
 *    non-const handle (append, attention, seq_add/fork/free/truncate,
 *    import, export, read, poll). Use one handle per thread or lock.
 *  - Calls that take a `const oscar_cache *` (cache_config, seq_info_get,
 *    seq_block_table, memory, last_error) only read the handle: they never
 *    write it, not even its error message (their failures are reported by
 *    the status alone), so any number of threads may make them at once while
 *    no thread makes a non-const call.
 *  - Distinct handles may be used concurrently from different threads.
 *  - The CPU backend parallelises append and attention internally with
 *    config.num_threads threads (OpenMP). Its attention keeps its scratch
 *    in the handle and grows it only when a call needs more than any call
 *    before it (freed by cache_destroy), so a steady decode loop allocates
 *    nothing there; its append still allocates a few host buffers per call.
 *
 * Backends
 *  - OSCAR_BACKEND_CPU: all tensor pointers are host pointers.
 *  - OSCAR_BACKEND_CUDA: tensor pointers (K, V, Q, O) are device pointers and
 *    `stream` is a cudaStream_t (NULL = the legacy default stream). Control
 *    arguments of the sequence API (sequence ids, token counts) are host
 *    arrays; those of the batch API (oscar_batch) are device arrays. Needs a
 *    Hopper GPU (compute capability 9.0). Both backends read and write the
 *    same packed format (docs/FORMAT.md), so a sequence exported from one
 *    imports into the other.
 *
 * What the CUDA backend promises an engine (docs/ENGINES.md)
 *  - append, attention, batch_append, batch_attention, slot_copy and poll
 *    never synchronise the host with the device, never wait on an event,
 *    never allocate or free device or pinned memory and never copy through
 *    pageable host memory. They enqueue kernels on the caller's stream and
 *    return. They leave the caller's current device as they found it. (The
 *    sequence API's append and attention build small job lists with host
 *    malloc; the batch API allocates nothing at all.)
 *  - The batch calls can be captured in a CUDA graph (cudaStreamBeginCapture)
 *    and replayed: everything that changes between steps is read from the
 *    caller's device arrays when the kernels run.
 *  - Calls on one handle must be ordered by the caller: issue them on one
 *    stream, or order the streams with events. The library keeps per-call
 *    metadata in its workspace and does not order streams itself.
 *  - Calls that synchronise, and say so below: cache_create/destroy,
 *    seq_fork (device-to-device copies, then a stream sync), seq_read,
 *    seq_export, seq_import and synchronize.
 *  - Non-finite input (check_finite = 1) and bad batch metadata are found on
 *    the device and reported later, without a sync: see oscar_poll.
 */
#ifndef OSCAR_H
#define OSCAR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility: what is declared between
 * here and the matching pop is its whole exported interface. */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

#define OSCAR_VERSION_MAJOR 0
#define OSCAR_VERSION_MINOR 2
#define OSCAR_VERSION_PATCH 0
/* Version of the packed block layout and of the export stream (docs/FORMAT.md). */
#define OSCAR_FORMAT_VERSION 5

/* Longest query chunk of one attention call (q_len), on both backends. */
#define OSCAR_MAX_Q_LEN 4096

/* "0.2.0" */
const char *oscar_version(void);

typedef enum oscar_status {
    OSCAR_OK = 0,
    OSCAR_E_INVALID_ARGUMENT = 1, /* null pointer, bad size, bad enum ...      */
    OSCAR_E_OUT_OF_MEMORY = 2,    /* host or device allocation failed         */
    OSCAR_E_POOL_EXHAUSTED = 3,   /* no free block / sequence slot in the pool */
    OSCAR_E_NONFINITE = 4,        /* NaN or Inf in K or V                     */
    OSCAR_E_UNSUPPORTED = 5,      /* backend not built, or no device          */
    OSCAR_E_NOT_FOUND = 6,        /* unknown sequence id                      */
    OSCAR_E_BACKEND = 7,          /* a CUDA call failed                       */
    OSCAR_E_FORMAT = 8            /* export stream is malformed or mismatched */
} oscar_status;

/* Static name of a status, e.g. "OSCAR_E_POOL_EXHAUSTED". */
const char *oscar_status_name(oscar_status status);

typedef enum oscar_method {
    OSCAR_METHOD_NONE = 0,       /* 16-bit cache (window dtype), no quantisation */
    OSCAR_METHOD_KIVI = 1,       /* quantisation only                            */
    OSCAR_METHOD_QUAROT = 2,     /* Hadamard rotation + quantisation             */
    OSCAR_METHOD_SCALE_ONLY = 3, /* omni-token key scaling + quantisation        */
    OSCAR_METHOD_OSCAR = 4       /* rotation + scaling + quantisation            */
} oscar_method;

/* "none", "kivi", "quarot", "scale-only", "oscar"; NULL if out of range. */
const char *oscar_method_name(oscar_method method);
/* Parses the names above. */
oscar_status oscar_method_parse(const char *name, oscar_method *out);

typedef enum oscar_dtype {
    OSCAR_DTYPE_F32 = 0,
    OSCAR_DTYPE_F16 = 1,  /* IEEE binary16 */
    OSCAR_DTYPE_BF16 = 2  /* bfloat16      */
} oscar_dtype;

typedef enum oscar_backend {
    OSCAR_BACKEND_CPU = 0,
    OSCAR_BACKEND_CUDA = 1
} oscar_backend;

/* 1 if the backend was compiled in and (for CUDA) a device is present. */
int oscar_backend_available(oscar_backend backend);

/*
 * Cache configuration. Fill with oscar_config_default() and override fields.
 *
 * The pool holds `block_count` blocks. One block stores `residual` (R)
 * consecutive tokens of one sequence for every layer and every KV head.
 * Tokens live in a per-sequence residual window (in window_dtype) until R of
 * them have accumulated (R + rollback_tokens with a rollback lag); then the
 * oldest R are quantised into one block. In a layer holding n tokens, with
 * P blocks packed before an append, the append packs blocks up to
 *   P' = max(P, (n - rollback_tokens) / R)      (n >= rollback_tokens)
 * and the window holds tokens [P' * R, n). Truncation never changes P.
 * With sink_tokens = S the first S tokens are never packed and n above
 * counts the tokens after them (see sink_tokens).
 */
typedef struct oscar_config {
    size_t struct_size;        /* sizeof(oscar_config) as the caller compiled it;
                                  oscar_config_default() sets it. A library
                                  with a longer struct can then tell which
                                  fields an older caller filled. Must equal
                                  this header's sizeof(oscar_config) today.     */
    oscar_method method;       /* default OSCAR_METHOD_OSCAR                      */
    int bits;                  /* 2 or 4 (ignored for METHOD_NONE); default 2     */
    int head_dim;              /* 64, 128 or 256; default 128                     */
    int num_kv_heads;          /* Hkv >= 1; default 8                             */
    int num_q_heads;           /* Hq, a multiple of Hkv; default 32               */
    int num_layers;            /* >= 1; default 1                                 */
    int k_group;               /* G_k tokens per key (scale, lo) pair; default 32 */
    int v_group;               /* G_v channels per value pair; default 32         */
    int residual;              /* R tokens per block and window; default 128      */
    oscar_dtype window_dtype;  /* F16 (default), BF16 or F32                      */
    int rotate_values;         /* 1 (default): V is rotated online at append and
                                  the attention output inverse-rotated.
                                  0: the caller folded H into W_v / W_o
                                  (oscar_fold_hadamard_*): V arrives rotated
                                  and the output is returned in rotated space.
                                  Only matters for rotating methods.            */
    int block_count;           /* blocks in the pool; default 1024                */
    int max_seqs;              /* live sequences at once; default 64              */
    oscar_backend backend;     /* default OSCAR_BACKEND_CPU                       */
    int device;                /* CUDA device ordinal; default 0                  */
    int num_threads;           /* CPU worker threads, 0 = one per core; default 0 */
    int check_finite;          /* 1 (default): reject NaN/Inf at append          */
    int rollback_tokens;       /* L in 0..residual; default 0. Quantisation lags
                                  L tokens: a block is packed only once the
                                  sequence holds L more tokens after it, so the
                                  L newest tokens are always in the window and
                                  can be removed (oscar_seq_truncate). Costs L
                                  more window rows per slot and layer.          */
    int caller_metadata;       /* 0 (default): the library tracks sequences (the
                                  sequence API: seq_add, append, attention, ...).
                                  1: the caller owns block tables, sequence
                                  lengths and window slots and drives the cache
                                  with the batch API (oscar_batch_*); the
                                  sequence API then returns OSCAR_E_UNSUPPORTED. */
    /* ---- options past the published method (docs/ACCURACY.md, "Past the
     * paper"). Added in format version 3. A caller compiled against the
     * older header (struct_size = offsetof(oscar_config, sink_tokens)) is
     * accepted: the fields it does not have read as 0. */
    int sink_tokens;           /* S in 0..4096; default 0 (as published). The
                                  first S tokens of every sequence stay in the
                                  window dtype for good and are never packed:
                                  blocks then hold tokens [S + jR, S + (j+1)R)
                                  and the packing rule under oscar_config reads
                                  n - S for n (P' = max(P, (n - S - L) / R)
                                  once n >= S + L). Costs S window rows per
                                  slot and layer. Both backends, both APIs:
                                  with caller_metadata = 1 seq_lens still
                                  count the sink tokens and block_tables
                                  entry j holds tokens [S + jR, S + (j+1)R)
                                  (oscar_batch says exactly what changes).   */
    int clip_search;           /* 0 (default, as published) or 1: at pack time
                                  each group's range [lo, hi] is searched over a
                                  fixed grid of shrunken ranges and the one with
                                  the least squared error of the group is kept
                                  (docs/FORMAT.md step 6). Changes only which
                                  (scale, lo) a packer picks: blocks decode by
                                  the same rule, so they read, export and import
                                  everywhere. Both backends pick the same pairs,
                                  byte for byte.                                */
    /* ---- added in format version 4 (docs/ACCURACY.md, "Past the paper").
     * A caller compiled against the version-3 header (struct_size =
     * offsetof(oscar_config, key_norm_per_head), or that header's
     * sizeof(oscar_config)) is accepted: these fields read as 0. All three
     * change the packed block layout (docs/FORMAT.md). Both backends and both
     * APIs (sequence and batch) take them and write the same bytes. On CUDA
     * the fast decode kernel covers 2-bit keys and values with all-head
     * norms (d = 128, k_group a power of two >= 32, v_group 32); other
     * widths and per-head norms run the generic kernel (docs/BENCHMARKS.md
     * has the speeds). */
    int key_norm_per_head;     /* 0 (default, as published): one key norm per
                                  token over all KV heads. 1: one norm per token
                                  and KV head (each head's key divided by its
                                  own norm; R * num_kv_heads fp32 norms per
                                  layer block). A tensor-parallel shard then
                                  needs no all-gather of key sums of squares
                                  (oscar_key_sumsq): its blocks are those of one
                                  cache holding every head. Only matters for the
                                  methods that scale keys (scale-only, oscar). */
    int key_bits;              /* 0 (default: `bits`), 2, 3 or 4: bits per key code */
    int value_bits;            /* 0 (default: `bits`), 2, 3 or 4: bits per value
                                  code. E.g. key_bits = 4, value_bits = 2
                                  (K4/V2), or key_bits = 3 (K3/V2). 3-bit codes
                                  (7 levels; format version 5) are stored as a
                                  2-bit plane and a 1-bit plane: R*d*3/8 bytes
                                  per head and side. Like `bits`, ignored for
                                  METHOD_NONE.                                   */
} oscar_config;

oscar_config oscar_config_default(void);

/* Checks a configuration without allocating anything. The message, if any,
 * goes to errbuf (may be NULL). */
oscar_status oscar_config_validate(const oscar_config *config, char *errbuf, size_t errbuf_size);

/* Bits per K/V element of a full quantised block, codes plus (scale, lo)
 * pairs plus token norms, keys and values averaged (K3/V2, k_group 64,
 * v_group 64, one norm per token: (3 + 32/64 + 2 + 32/64) / 2 + 32 / (2 *
 * Hkv * d)). 16 (or 32 for an F32 window) for METHOD_NONE. */
oscar_status oscar_config_packed_bits(const oscar_config *config, double *bits_per_element);

typedef struct oscar_cache oscar_cache;

/* Allocates the pool. On failure *out is NULL and errbuf holds the reason. */
oscar_status oscar_cache_create(const oscar_config *config, oscar_cache **out,
                                char *errbuf, size_t errbuf_size);
/* NULL is accepted. Frees every sequence and the pool. */
void oscar_cache_destroy(oscar_cache *cache);
/* ---- caller-owned memory ------------------------------------------------ */

/* What a configuration needs, in bytes of backend memory (device memory for
 * CUDA, host memory for CPU). Each region must be aligned to `alignment`. */
typedef struct oscar_memory_requirements {
    size_t pool_bytes;      /* packed blocks: block_count x num_layers x block */
    size_t window_bytes;    /* full-precision windows: max_seqs slots x layers  */
    size_t workspace_bytes; /* attention partials, per-call metadata, flags     */
    size_t alignment;       /* 256                                              */
} oscar_memory_requirements;

oscar_status oscar_memory_requirements_get(const oscar_config *config, oscar_memory_requirements *out,
                                           char *errbuf, size_t errbuf_size);

/* Allocation hook for the backend memory the library allocates itself.
 * alloc returns NULL on failure (reported as OSCAR_E_OUT_OF_MEMORY). Called
 * only from cache_create and cache_destroy, never on the hot path. */
typedef struct oscar_allocator {
    void *(*alloc)(void *user, size_t bytes, size_t alignment);
    void (*free)(void *user, void *ptr, size_t bytes);
    void *user;
} oscar_allocator;

/*
 * Memory handed to a cache. Each region is either provided by the caller
 * (non-NULL, at least the required bytes, aligned) or allocated by the
 * library through `allocator` (or cudaMalloc / aligned_alloc when that is
 * NULL). The caller keeps ownership of what it provided and must keep it
 * alive until oscar_cache_destroy. The library zeroes the regions it uses
 * at creation. The CUDA backend also allocates a few bytes of pinned host
 * memory for device-side error reports (cudaHostAlloc), at creation only.
 */
typedef struct oscar_memory_source {
    void *pool;
    void *windows;
    void *workspace;
    const oscar_allocator *allocator;
} oscar_memory_source;

/* oscar_cache_create over caller memory (mem may be NULL: all allocated). */
oscar_status oscar_cache_create_with_memory(const oscar_config *config, const oscar_memory_source *mem,
                                            oscar_cache **out, char *errbuf, size_t errbuf_size);

/* The configuration the cache was created with. */
oscar_status oscar_cache_config(const oscar_cache *cache, oscar_config *out);
/* Message of the last failed non-const call on this handle ("" if none).
 * Never NULL. */
const char *oscar_last_error(const oscar_cache *cache);

/*
 * Device-side reports, without a sync. Returns OSCAR_OK if no append or
 * attention has reported a problem since the last poll; otherwise
 * OSCAR_E_NONFINITE (a sequence received NaN/Inf and is failed) or
 * OSCAR_E_INVALID_ARGUMENT (batch metadata out of range: that sequence's
 * work was skipped and its outputs are NaN). The message names the failed
 * sequence ids (sequence API) or window slots (batch API), or one batch
 * entry with bad metadata. Each report is returned once. Reads pinned host memory the kernels write; a report appears once
 * the kernel that found it has run. CPU backend: always OSCAR_OK (the CPU
 * checks synchronously).
 */
oscar_status oscar_poll(oscar_cache *cache);
/* Waits for `stream` (cudaStreamSynchronize), then polls. Synchronises. */
oscar_status oscar_synchronize(oscar_cache *cache, void *stream);

/* ---- sequences --------------------------------------------------------- */

/* A new, empty sequence. Its id is >= 0 and unique while it lives. */
oscar_status oscar_seq_add(oscar_cache *cache, int32_t *seq_id);
/* A new sequence sharing src's whole history: packed blocks are shared
 * (reference-counted, never written again), the window is copied.
 * All layers of src must hold the same number of tokens.
 * CUDA: the window copy is ordered after all work on the legacy default
 * stream and synchronises it. Engines that need a stream-ordered fork use
 * the batch API (oscar_slot_copy). */
oscar_status oscar_seq_fork(oscar_cache *cache, int32_t src_seq, int32_t *new_seq_id);
/* Releases the sequence; blocks return to the pool when no fork uses them. */
oscar_status oscar_seq_free(oscar_cache *cache, int32_t seq_id);
/*
 * Exact rollback (speculative decoding): every layer of the sequence keeps
 * min(its tokens, new_length) tokens. The removed tokens must all still be
 * in the window (new_length >= packed_tokens of every layer), otherwise
 * OSCAR_E_INVALID_ARGUMENT and nothing changes (with sink_tokens = S and P
 * blocks packed, P > 0: new_length >= S + P * R; before the first block any
 * length, the sink tokens included). Every kept token's bytes are
 * then exactly what appending only the kept tokens would have made; since
 * packing follows the longest length the sequence reached, a block may be
 * packed earlier than it would have been (both caches agree again, byte for
 * byte, once they have grown by R + rollback_tokens tokens). With
 * config.rollback_tokens = L, right after appending k <= L draft tokens on
 * top of accepted ones, any number of the drafts can be removed. Host-only:
 * no device work, no synchronisation.
 */
oscar_status oscar_seq_truncate(oscar_cache *cache, int32_t seq_id, int64_t new_length);

typedef struct oscar_seq_info {
    int64_t tokens;         /* tokens appended to this layer                */
    int64_t packed_tokens;  /* of which quantised into blocks (multiple of R) */
    int32_t window_tokens;  /* of which exact (full precision): the window,
                               < R + rollback_tokens, plus the sink tokens
                               (min(tokens, sink_tokens)); tokens =
                               packed_tokens + window_tokens                 */
    int32_t blocks;         /* blocks in the sequence's block table          */
} oscar_seq_info;

oscar_status oscar_seq_info_get(const oscar_cache *cache, int32_t seq_id, int layer,
                                oscar_seq_info *out);

/* The sequence's block table (physical block ids, shared by all layers).
 * Writes min(capacity, blocks) entries and the full count to *count. */
oscar_status oscar_seq_block_table(const oscar_cache *cache, int32_t seq_id,
                                   int32_t *table, int32_t capacity, int32_t *count);

/* ---- append and attention ---------------------------------------------- */

/*
 * Appends new tokens of `n_seqs` sequences to one layer.
 *   k, v:    [sum(n_tokens), num_kv_heads, head_dim] in `dtype`, the tokens of
 *            seq_ids[0] first, then seq_ids[1], ... (post-RoPE keys; values).
 *   n_tokens: host array, n_tokens[i] >= 0 new tokens for seq_ids[i].
 * Sequence ids must be distinct. Blocks that fill up are quantised. If the
 * pool runs out of blocks or sequence ids are bad, nothing is appended to any
 * sequence.
 * Non-finite input, with config.check_finite (the default):
 *  - CPU backend: NaN/Inf anywhere in K or V is rejected at once
 *    (OSCAR_E_NONFINITE) and nothing is appended to any sequence.
 *  - CUDA backend: the check runs on the device, so the call cannot know the
 *    answer when it returns OSCAR_OK. A sequence whose new K or V rows hold
 *    NaN/Inf is marked *failed* on the device: nothing of this or any later
 *    append is written to it, and attention over it writes NaN to its output
 *    rows, so nothing quantised from non-finite input is ever attended to.
 *    Other sequences of the call are appended normally. The caller learns of
 *    it at the first oscar_poll, oscar_synchronize, append or attention on
 *    the handle after the check kernel has run (OSCAR_E_NONFINITE, with the
 *    sequence ids in the message; that call does nothing else). A failed
 *    sequence stays failed until it is freed (sequence API) or its slot is
 *    restarted at length 0 (batch API).
 */
oscar_status oscar_append(oscar_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                          const int32_t *n_tokens, const void *k, const void *v,
                          oscar_dtype dtype, void *stream);

/*
 * oscar_append for one shard of a tensor-parallel model: key_head_sumsq is
 * [sum(n_tokens), key_heads_total] fp32 (host memory for CPU, device for
 * CUDA), every shard's per-head key sums of squares of the new rows gathered
 * in head order (oscar_key_sumsq, then an all-gather). See oscar_batch.
 */
oscar_status oscar_append_with_key_sums(oscar_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                                        const int32_t *n_tokens, const void *k, const void *v, oscar_dtype dtype,
                                        const float *key_head_sumsq, int key_heads_total, void *stream);

/*
 * Decode attention for `n_seqs` sequences over everything appended to `layer`.
 *   q:   [n_seqs, q_len, num_q_heads, head_dim] in q_dtype (post-RoPE).
 *   out: [n_seqs, q_len, num_q_heads, head_dim] in out_dtype.
 * The q_len queries of a sequence are its last q_len appended tokens: query i
 * attends to tokens [0, tokens - q_len + i] (causal among the new tokens).
 * They see the cache as it is after the append: if those tokens completed a
 * block, their own keys and values are already quantised. Engines that want
 * a chunk's tokens to see each other in full precision either split chunks
 * at block boundaries (as `oscar ppl` does) or compute prefill attention on
 * the fresh K/V themselves and use this call for decoding.
 * Every sequence must hold at least q_len tokens in `layer`.
 * q_len is at most OSCAR_MAX_Q_LEN (4096) on both backends, for every
 * supported shape (chunked prefill).
 * softmax_scale <= 0 selects 1/sqrt(head_dim).
 * Query head j reads KV head j / (num_q_heads / num_kv_heads).
 */
oscar_status oscar_attention(oscar_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                             int q_len, const void *q, oscar_dtype q_dtype, void *out,
                             oscar_dtype out_dtype, float softmax_scale, void *stream);

/*
 * Reads back tokens [start, start + count) of a sequence's layer as float32
 * [count, num_kv_heads, head_dim] host arrays, in the original space
 * (un-rotated, un-scaled, dequantised). Either output may be NULL.
 */
oscar_status oscar_seq_read(oscar_cache *cache, int32_t seq_id, int layer, int64_t start,
                            int64_t count, float *k_out, float *v_out);

/* ---- the batch API: caller-owned metadata (config.caller_metadata = 1) --- */

/*
 * One batch of sequences, described by the caller's own arrays in the
 * backend's memory (device memory for CUDA, host memory for CPU), in the
 * layout of vLLM's paged attention:
 *   seq_lens:     int32 [num_seqs]: tokens each sequence holds in this layer
 *                 *after* this step's append (0 < seq_lens <= max_seq_len).
 *   window_slots: int32 [num_seqs]: the sequence's window slot, 0..max_seqs-1,
 *                 distinct within a batch (the CPU backend rejects a repeated
 *                 slot; on CUDA the two sequences' windows would mix). The
 *                 slot holds the sequence's unquantised tail, tokens
 *                 [P * R, seq_len), for every layer (with sink tokens, see
 *                 below, also the sink rows).
 *   block_tables: int32 [num_seqs, block_table_stride]: physical block ids
 *                 (0..block_count-1). Entries 0 .. seq_len / R - 1 must be
 *                 valid when the call runs; block j holds tokens
 *                 [j*R, (j+1)*R) of the sequence for every layer. The caller's
 *                 block manager chooses them, shares them between forks and
 *                 frees them; packed blocks are never written again.
 * Sink tokens (config.sink_tokens = S > 0) shift the blocks by S:
 *  - seq_lens, tokens_per_seq and max_seq_len count every token, the sink
 *    tokens included; an append writes tokens [seq_len - tokens_per_seq,
 *    seq_len) whether they fall in the sink rows, the window or both.
 *  - The first min(seq_len, S) tokens sit in the slot's S sink rows, ahead
 *    of its window rows (the slot's size, oscar_memory_requirements_get,
 *    already counts them); they are never packed.
 *  - Block j holds tokens [S + j*R, S + (j+1)*R), the packing rule under
 *    oscar_config reads seq_len - S for n, and the entries that must be
 *    valid are 0 .. (seq_len - S) / R - 1 when seq_len > S (none before):
 *    at most the P' blocks packed so far. block_table_stride must be
 *    >= (max_seq_len - S) / R (0 when max_seq_len <= S), and max_seq_len
 *    may reach the pool's capacity plus S.
 *  - The window holds tokens [S + P*R, seq_len) (none while seq_len <= S);
 *    rollback and slot_copy below say what S changes for them.
 * The host fields (num_seqs, tokens_per_seq, max_seq_len, block_table_stride)
 * are fixed for a captured graph; the arrays are read when the kernels run,
 * so an engine updates them between replays (cudaMemcpyAsync from pinned
 * memory, or its own kernels).
 * A slot is (re)started by an append with seq_len == tokens_per_seq (the
 * sequence was empty before it), which also clears its failed mark.
 * Rollback: the library keeps, per layer and slot, how many blocks are
 * packed (P, by the rule under oscar_config). The caller may lower a
 * sequence's seq_len before the next call to any value >= P * R (its
 * tokens still in the window); appending again then overwrites the removed
 * tokens. Blocks 0 .. P' - 1 must be valid in block_tables when an append
 * packs them (P' <= seq_len / R). With sink tokens the floor is S + P * R
 * once P > 0 (the sink rows and the blocks stay); while P = 0 any value is
 * allowed, below S too: the sink rows past it are then overwritten by the
 * next appends, exactly like removed window rows (as oscar_seq_truncate),
 * and P' <= (seq_len - S) / R.
 * Entries out of range (a slot outside 0..max_seqs-1, a seq_len below its
 * packed tokens (S + P * R with sinks, once P > 0) or above what was
 * written to the slot, a block id outside 0..block_count-1 where a block is
 * packed or read) are found on the device: the sequence is skipped, its
 * attention rows are NaN and oscar_poll reports OSCAR_E_INVALID_ARGUMENT
 * naming one such batch entry. The CPU backend checks them at once and
 * returns the error. On CUDA max_seq_len only sizes the grid: a longer
 * sequence is still attended correctly, with fewer splits than ideal
 * (the grid is sized for max_seq_len - S tokens in blocks and window).
 */
typedef struct oscar_batch {
    int32_t num_seqs;           /* 1 .. max_seqs                                  */
    int32_t tokens_per_seq;     /* new tokens per sequence (append) = q_len
                                   (attention); 1 for decode; 1..OSCAR_MAX_Q_LEN  */
    int32_t max_seq_len;        /* bound on every seq_lens entry; sizes the grid  */
    int32_t block_table_stride; /* >= max_seq_len / R ((max_seq_len - S) / R
                                   with sink_tokens = S, 0 if max_seq_len <= S) */
    const int32_t *seq_lens;
    const int32_t *window_slots;
    const int32_t *block_tables;
    /* Tensor parallelism (append only; NULL / 0 otherwise): the per-head key
     * sums of squares of this step's new rows from every shard, gathered in
     * head order: fp32 [num_seqs * tokens_per_seq, key_heads_total], this
     * shard's own heads included (oscar_key_sumsq gives them). The token
     * norm is then computed over all key_heads_total heads exactly as one
     * cache holding every head computes it, bit for bit. */
    const float *key_head_sumsq;
    int32_t key_heads_total;
} oscar_batch;

/*
 * Tensor parallelism, phase 1: the per-head sums of squares of n_rows new
 * key rows ([n_rows, num_kv_heads, head_dim] in dtype) as the cache will
 * store them (rotated, rounded to the window dtype), fp32
 * [n_rows, num_kv_heads] into out (backend memory). The caller all-gathers
 * them across the shards (NCCL, torch.distributed, MPI) into
 * [n_rows, total heads] in head order and passes that to oscar_batch_append
 * as key_head_sumsq. Stream-ordered, capturable. Without it (a shard
 * appending with key_head_sumsq = NULL) each shard normalises keys over its
 * own heads only: a valid cache of its own, but not the single-GPU one.
 * With config.key_norm_per_head = 1 no gather is needed: each head's norm is
 * its own, so a shard appending without key_head_sumsq already stores the
 * bytes of one cache holding every head (key_head_sumsq is then accepted
 * and changes nothing in the blocks).
 */
oscar_status oscar_key_sumsq(oscar_cache *cache, int64_t n_rows, const void *k, oscar_dtype dtype, float *out,
                             void *stream);

/*
 * Appends tokens_per_seq new tokens to each sequence of the batch in one
 * layer: k, v are [num_seqs * tokens_per_seq, num_kv_heads, head_dim], the
 * tokens of sequence 0 first. Tokens [seq_len - tokens_per_seq, seq_len) are
 * written; blocks that fill up are quantised into block_tables.
 */
oscar_status oscar_batch_append(oscar_cache *cache, int layer, const oscar_batch *batch, const void *k,
                                const void *v, oscar_dtype dtype, void *stream);
/* Attention for the last tokens_per_seq tokens of each sequence (q, out:
 * [num_seqs, tokens_per_seq, num_q_heads, head_dim]); as oscar_attention. */
oscar_status oscar_batch_attention(oscar_cache *cache, int layer, const oscar_batch *batch, const void *q,
                                   oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float softmax_scale,
                                   void *stream);
/* Forks slot src into slot dst: the sink rows (sink_tokens) and window
 * tokens of every layer, the per-layer packed-block counts and (CUDA) the
 * failed mark; the caller copies the block table row and shares its blocks.
 * n_tokens is the source sequence's length, every layer the same, sink
 * tokens included (the CPU copies min(n_tokens, S) sink rows and the window
 * rows, CUDA the whole slot). The CPU backend refuses an n_tokens below the
 * source's sink rows and packed blocks (S + P * R once P > 0), one that
 * leaves R + rollback_tokens or more window rows, or one above what the
 * slot holds. Stream-ordered on the CUDA backend, capturable. */
oscar_status oscar_slot_copy(oscar_cache *cache, int32_t src_slot, int32_t dst_slot, int64_t n_tokens,
                             void *stream);

/* ---- memory accounting ------------------------------------------------- */

typedef struct oscar_memory_stats {
    int64_t block_bytes;        /* one block, all layers                        */
    int64_t blocks_total;
    int64_t blocks_free;
    int64_t blocks_used;        /* referenced by at least one sequence          */
    int64_t pool_bytes;         /* blocks_total * block_bytes                   */
    int64_t window_bytes;       /* all window slots, all layers                 */
    int64_t bytes_in_use;       /* used blocks + windows of live sequences      */
    int32_t seqs_live;
    int32_t seqs_max;
    double packed_bytes_per_token;  /* per token, all layers, in a full block    */
    double window_bytes_per_token;  /* per token in the window, all layers       */
    double fp16_bytes_per_token;    /* a 16-bit cache, for comparison            */
} oscar_memory_stats;

oscar_status oscar_memory(const oscar_cache *cache, oscar_memory_stats *out);

/* ---- moving sequences between caches and backends ---------------------- */

/*
 * Serialises a sequence (all layers: blocks, window, lengths, config) into
 * the versioned stream of docs/FORMAT.md. With buffer == NULL only *size is
 * set. Otherwise buffer_size must be >= the size, which is written to *size.
 */
oscar_status oscar_seq_export(oscar_cache *cache, int32_t seq_id, void *buffer,
                              size_t buffer_size, size_t *size);
/* Creates a new sequence from an export stream. The stream's method, bits,
 * shapes, groups, R and window dtype must equal the cache's. Every field is
 * validated; a malformed stream gives OSCAR_E_FORMAT and changes nothing. */
oscar_status oscar_seq_import(oscar_cache *cache, const void *buffer, size_t size,
                              int32_t *seq_id);

/* ---- helpers ----------------------------------------------------------- */

/* Normalised Walsh-Hadamard transform of `rows` rows of n floats in place
 * (n a power of two, 1..65536): x <- H_n x, H_n[i][j] = (-1)^popcount(i&j)/sqrt(n). */
oscar_status oscar_hadamard(float *x, int64_t rows, int n);

/*
 * Offline V rotation: fold H into the value and output projections.
 *   w_v: [num_kv_heads * head_dim, in_features] (rows = output features):
 *        per head, W_v_h <- H W_v_h.
 *   w_o: [out_features, num_q_heads * head_dim]: W_o <- W_o blockdiag(H).
 * With both folded and config.rotate_values = 0, attention gives the same
 * result as online rotation.
 */
oscar_status oscar_fold_hadamard_wv(float *w_v, int num_kv_heads, int head_dim, int64_t in_features);
oscar_status oscar_fold_hadamard_wo(float *w_o, int64_t out_features, int num_q_heads, int head_dim);

/* Scalar conversions used by the library (round to nearest even). */
uint16_t oscar_f32_to_f16(float x);
float oscar_f16_to_f32(uint16_t h);
uint16_t oscar_f32_to_bf16(float x);
float oscar_bf16_to_f32(uint16_t h);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif
#endif /* OSCAR_H */
