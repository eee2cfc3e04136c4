/*
 * kv_bf16.h - a paged BF16 KV cache on the GPU with its own split-KV decode
 * attention: the 16-bit baseline of the end-to-end decode benchmark.
 *
 * Plain C interface, no global state. The caller owns every buffer (pool,
 * workspace, inputs, outputs, metadata) and the stream; no call allocates,
 * synchronises with the host or reads device memory from the host, so
 * append + attention can be captured once in a CUDA graph and replayed while
 * the lengths in the device array seq_lens grow (max_seq_len, a host value,
 * fixes the grid). Every function returns KVBF16_OK (0) or a status, with a
 * message in err[errn] (err may be NULL).
 *
 * Pool layout (bf16 elements), page = block of block_tokens tokens:
 *     [num_blocks][num_layers][2 (K, V)][num_kv_heads][block_tokens][head_dim]
 * Token p of a sequence lives in block block_tables[seq][p / block_tokens],
 * row p % block_tokens.
 *
 * Device metadata (int32): seq_lens[num_seqs] = tokens of each sequence
 * after the call's append (append) or in the cache (attention);
 * block_tables[num_seqs][stride]. Bad entries are handled on the device:
 * append skips rows whose length or block id is out of range; attention
 * writes NaN rows for a sequence with seq_len < q_len, seq_len > max_seq_len,
 * seq_len > stride * block_tokens or a block id outside [0, num_blocks), and
 * never reads outside the pool.
 *
 * Requirements: head_dim 64, 128 or 256; block_tokens a power of two >= 16;
 * num_q_heads a multiple of num_kv_heads; the pool 16-byte aligned; q, out,
 * k, v 2-byte aligned (16-byte aligned k and v take the vector path).
 * Kernels are built for sm_90a (H100/H200) and run on the current device.
 */
#ifndef OSCAR_KV_BF16_H
#define OSCAR_KV_BF16_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    KVBF16_OK = 0,
    KVBF16_E_INVALID = 1, /* a bad argument; nothing was launched           */
    KVBF16_E_CUDA = 2     /* a CUDA call or launch failed (message says which) */
};

typedef struct kvbf16_layout {
    int num_layers, num_kv_heads, num_q_heads;
    int head_dim;     /* 64, 128 or 256                          */
    int block_tokens; /* page size in tokens, power of two >= 16 */
    int num_blocks;
} kvbf16_layout;

/* Bytes of the pool; 0 for an invalid layout. */
size_t kvbf16_pool_bytes(const kvbf16_layout *L);

/* Bytes of a workspace holding max_seqs * num_kv_heads * max_splits split
 * partials (fp32 tiles of 16 query rows). Attention picks its split count
 * (from max_seq_len and the SM count) and lowers it to what the given
 * workspace holds, so a smaller workspace (even none) is never an error, only
 * fewer splits; one call uses num_seqs * num_kv_heads * ceil(g * q_len / 16)
 * tiles per split. Capacity is counted in tiles: kvbf16_workspace_bytes(L,
 * 1, 2 * SM count) lets a single long sequence use every SM, and larger
 * batches need fewer splits (at most 256 are used). max_splits <= 0 means
 * 64. */
size_t kvbf16_workspace_bytes(const kvbf16_layout *L, int max_seqs, int max_splits);

/* Writes tokens_per_seq new rows per sequence into layer `layer`: k, v bf16
 * [num_seqs * tokens_per_seq][num_kv_heads][head_dim]; row i*tokens_per_seq
 * + j of sequence i becomes token seq_lens[i] - tokens_per_seq + j. */
int kvbf16_append(void *pool, const kvbf16_layout *L, int layer, int num_seqs, int tokens_per_seq,
                  const int32_t *seq_lens, const int32_t *block_tables, int stride, const void *k, const void *v,
                  void *stream, char *err, size_t errn);

/* Decode attention over layer `layer`: q, out bf16 [num_seqs][q_len][num_q_heads][head_dim];
 * the q_len queries are the last q_len tokens of each sequence, causal among
 * them (query i sees tokens [0, seq_len - q_len + i]). GQA: q head j reads KV
 * head j / (num_q_heads / num_kv_heads). softmax_scale <= 0 means
 * 1/sqrt(head_dim). max_seq_len (host) bounds every seq_lens entry and sizes
 * the grid; workspace may be NULL (one split per sequence and head). */
int kvbf16_attention(const void *pool, const kvbf16_layout *L, int layer, int num_seqs, int q_len,
                     const int32_t *seq_lens, const int32_t *block_tables, int stride, int max_seq_len, const void *q,
                     void *out, float softmax_scale, void *workspace, size_t workspace_bytes, void *stream, char *err,
                     size_t errn);

/* The same attention by a plain scalar kernel (one CTA per query row and
 * head, fp32, one token at a time): the readable reference, slow. Same
 * arguments and NaN rules, without max_seq_len and workspace. */
int kvbf16_attention_reference(const void *pool, const kvbf16_layout *L, int layer, int num_seqs, int q_len,
                               const int32_t *seq_lens, const int32_t *block_tables, int stride, const void *q,
                               void *out, float softmax_scale, void *stream, char *err, size_t errn);

/* The split count kvbf16_attention would use for this call shape (host
 * only, no launch); < 0 on a bad argument. For benchmarks and tests. */
int kvbf16_attention_splits(const kvbf16_layout *L, int num_seqs, int q_len, int max_seq_len,
                            size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif
