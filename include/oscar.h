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
 *    independent.
 *
 * Thread safety
 *  - A handle must not be used by two threads at once (calls that mutate it:
 *    append, seq_add/fork/free, import; and attention, which uses the
 *    handle's scratch and error buffer). Use one handle per thread or lock.
 *  - Distinct handles may be used concurrently from different threads.
 *  - The CPU backend parallelises append and attention internally with
 *    config.num_threads threads (OpenMP).
 *
 * Backends
 *  - OSCAR_BACKEND_CPU: all tensor pointers are host pointers.
 *  - OSCAR_BACKEND_CUDA: tensor pointers (K, V, Q, O) are device pointers and
 *    `stream` is a cudaStream_t (NULL = the legacy default stream). Control
 *    arguments (sequence ids, token counts) are always host arrays. Append
 *    and attention neither allocate nor synchronise (except the finiteness
 *    check, see check_finite). Needs a Hopper GPU (compute capability 9.0).
 *    Both backends read and write the same packed format (docs/FORMAT.md),
 *    so a sequence exported from one imports into the other.
 */
#ifndef OSCAR_H
#define OSCAR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define OSCAR_VERSION_MAJOR 0
#define OSCAR_VERSION_MINOR 1
#define OSCAR_VERSION_PATCH 0
/* Version of the packed block layout and of the export stream (docs/FORMAT.md). */
#define OSCAR_FORMAT_VERSION 1

/* "0.1.0" */
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
 * them have accumulated; then the R tokens are quantised into one block.
 */
typedef struct oscar_config {
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
} oscar_config;

oscar_config oscar_config_default(void);

/* Checks a configuration without allocating anything. The message, if any,
 * goes to errbuf (may be NULL). */
oscar_status oscar_config_validate(const oscar_config *config, char *errbuf, size_t errbuf_size);

/* Bits per K/V element of a full quantised block, codes plus (scale, lo)
 * pairs plus token norms. 16 (or 32 for an F32 window) for METHOD_NONE. */
oscar_status oscar_config_packed_bits(const oscar_config *config, double *bits_per_element);

typedef struct oscar_cache oscar_cache;

/* Allocates the pool. On failure *out is NULL and errbuf holds the reason. */
oscar_status oscar_cache_create(const oscar_config *config, oscar_cache **out,
                                char *errbuf, size_t errbuf_size);
/* NULL is accepted. Frees every sequence and the pool. */
void oscar_cache_destroy(oscar_cache *cache);
/* The configuration the cache was created with. */
oscar_status oscar_cache_config(const oscar_cache *cache, oscar_config *out);
/* Message of the last failed call on this handle ("" if none). Never NULL. */
const char *oscar_last_error(const oscar_cache *cache);

/* ---- sequences --------------------------------------------------------- */

/* A new, empty sequence. Its id is >= 0 and unique while it lives. */
oscar_status oscar_seq_add(oscar_cache *cache, int32_t *seq_id);
/* A new sequence sharing src's whole history: packed blocks are shared
 * (reference-counted, never written again), the window is copied.
 * All layers of src must hold the same number of tokens. */
oscar_status oscar_seq_fork(oscar_cache *cache, int32_t src_seq, int32_t *new_seq_id);
/* Releases the sequence; blocks return to the pool when no fork uses them. */
oscar_status oscar_seq_free(oscar_cache *cache, int32_t seq_id);

typedef struct oscar_seq_info {
    int64_t tokens;         /* tokens appended to this layer                */
    int64_t packed_tokens;  /* of which quantised into blocks (multiple of R) */
    int32_t window_tokens;  /* of which in the full-precision window (< R)   */
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
 * sequence. With config.check_finite (the default) NaN/Inf anywhere in K or V
 * is rejected the same way (OSCAR_E_NONFINITE). On the CUDA backend that
 * check costs one device-to-host synchronisation per call; serving loops
 * that trust their inputs set check_finite = 0 and stay asynchronous.
 */
oscar_status oscar_append(oscar_cache *cache, int layer, int n_seqs, const int32_t *seq_ids,
                          const int32_t *n_tokens, const void *k, const void *v,
                          oscar_dtype dtype, void *stream);

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

#ifdef __cplusplus
}
#endif
#endif /* OSCAR_H */
