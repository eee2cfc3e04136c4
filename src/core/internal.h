/*
 * Internal interface between the library core (src/core: validation,
 * sequences, block allocation, error messages) and the backends (src/cpu,
 * src/cuda). Not installed; not part of the API.
 *
 * The core owns all bookkeeping on the host: which blocks a sequence has,
 * how many tokens each layer holds, which window slot it uses. A backend owns
 * the bytes: the block pool and the window slots, in the layout of
 * docs/FORMAT.md, and the kernels that read and write them. The core calls a
 * backend only after it has validated everything, so a backend call that
 * fails part-way is a bug or a device error, never bad input.
 */
#ifndef OSCAR_INTERNAL_H
#define OSCAR_INTERNAL_H

#include "oscar.h"
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>

#include "alloc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Derived, immutable geometry of a cache (docs/FORMAT.md). */
typedef struct oscar_layout {
    int d, hkv, hq, layers, bits, levels, k_group, v_group, residual;
    int quantised;         /* method != none                          */
    int rotate;            /* method rotates Q/K (and V if rotate_v)  */
    int rotate_v;          /* V rotated online by the library         */
    int scale_keys;        /* method stores token norms               */
    int window_esize;      /* bytes per window element                */
    int window_dtype;      /* oscar_dtype of the window               */
    int lag;               /* rollback_tokens                         */
    int window_rows;       /* rows per window slot: residual + lag    */
    int sinks;             /* sink_tokens S: rows per slot and layer ahead
                              of the window rows, in the window dtype   */
    int clip;              /* clip_search: MSE-searched group ranges  */
    /* Bit widths (format version 4): keys and values may differ
     * (key_bits / value_bits). bits and levels are the keys' (the
     * backends read kbits / vbits and kcodes / vcodes_bytes). */
    int kbits, vbits;      /* 2, 3 or 4 (16 for method none); 3 bits
                              (format version 5) are a 2-bit plane
                              then a 1-bit plane (format.c)           */
    int klevels, vlevels;  /* 2^bits - 1                              */
    int norm_per_head;     /* key_norm_per_head and the method scales keys:
                              norms are [Hkv][R] instead of [R]        */
    size_t kcodes_bytes;   /* K codes bytes per head: R*d*kbits/8     */
    size_t vcodes_bytes;   /* V codes bytes per head: R*d*vbits/8     */
    size_t kparams_bytes;  /* per head                                */
    size_t vparams_bytes;  /* per head                                */
    size_t head_bytes;     /* one head sub-block                      */
    size_t norms_bytes;    /* R*4, R*Hkv*4 (norm_per_head) or 0       */
    size_t layer_block_bytes;
    size_t window_layer_bytes; /* K+V of one slot, one layer          */
    /* The windows region: [layer][slot] K+V slots, then per [layer][slot]
     * window_rows fp32 token sums of squares (see oscar_token_sumsq). */
    size_t window_ss_offset;
    size_t windows_bytes;
} oscar_layout;

void oscar_layout_init(oscar_layout *lay, const oscar_config *cfg);

/* Blocks packed in a layer after it grows to n tokens, from P before
 * (oscar.h, oscar_config: quantisation lags `lag` tokens). */
static inline int64_t oscar_packed_after(int64_t packed_before, int64_t n, int R, int lag) {
    const int64_t p = n >= lag ? (n - lag) / R : 0;
    return p > packed_before ? p : packed_before;
}

/* Tokens of a layer holding n tokens that sit in its sink rows (S = 0:
 * none). Blocks and the window follow them: with P blocks packed the
 * window holds n - sinks - P*R tokens, and packing reads n - sinks for n. */
static inline int64_t oscar_sinks_held(int64_t n, int S) { return n < S ? n : S; }

/* Tokens of a layer holding n tokens that can never be removed again with P
 * blocks packed: the sink rows and the blocks once a block exists (a
 * rollback may lower the length to this), none before the first block (the
 * sink rows are then overwritten by later appends like window rows). */
static inline int64_t oscar_frozen_tokens(int64_t packed_blocks, int S, int R) {
    return packed_blocks > 0 ? (int64_t)S + packed_blocks * R : 0;
}

/* Most blocks a layer holding n tokens can have packed: the block-table
 * entries the batch API may need (oscar.h, oscar_batch). */
static inline int64_t oscar_max_blocks(int64_t n, int S, int R) { return (n - oscar_sinks_held(n, S)) / R; }

/* Position of pair element (lane, q, e) inside a 16-token code tile: which
 * 32-bit word of the lane chunk and which bit. Shared by CPU code and tests. */
static inline void oscar_code_position(int bits, int lane, int q, int e, int *word, int *bit) {
    int pairs_per_word = 16 / bits;
    *word = q / pairs_per_word;
    *bit = 16 * e + bits * (q % pairs_per_word);
}

/*
 * One sequence in an append call. The logical token stream of the sequence
 * in this layer is window[0 : window_before] ++ new tokens. Blocks
 * flush_blocks[0 .. n_flush-1] receive stream tokens [i*R, (i+1)*R); the
 * remaining window_after tokens become the window.
 */
typedef struct oscar_append_job {
    int64_t input_row;          /* first token row of this sequence in k/v */
    /* window_before may exceed R with a rollback lag; window_after is
     * stream tokens [n_flush*R, window_before + n_new), from the old window
     * where the stream index is < window_before, else from the input. */
    int32_t n_new;
    int32_t seq_slot;           /* 0..max_seqs-1, also the window slot     */
    int32_t window_before;
    int32_t window_after;
    int32_t n_flush;
    int32_t first_flush_index;  /* block-table index of flush_blocks[0]    */
    const int32_t *flush_blocks;/* host array of n_flush block ids         */
    /* Sink tokens (config.sink_tokens): input rows
     * [input_row - sink_new, input_row) go to sink rows [sink_before,
     * sink_before + sink_new); everything above counts the tokens after the
     * sinks only. 0 and 0 without sinks. */
    int32_t sink_before, sink_new;
} oscar_append_job;

/* One sequence in an attention call. */
typedef struct oscar_attn_job {
    int32_t seq_slot;
    int32_t n_blocks;           /* packed blocks of this layer             */
    const int32_t *block_table; /* host array, >= n_blocks entries         */
    int32_t window_tokens;
    int64_t tokens;             /* sink_tokens + n_blocks*R + window_tokens */
    int32_t sink_tokens;        /* tokens in the sink rows (positions 0..)  */
} oscar_attn_job;

typedef struct oscar_backend_ops {
    const char *name;
    /* Allocates (or adopts from mem, which may be NULL) pool, windows and
     * workspace into cache->backend_state. */
    oscar_status (*init)(oscar_cache *c, const oscar_memory_source *mem);
    void (*destroy)(oscar_cache *c);
    /* Returns OSCAR_E_NONFINITE without writing anything if check is set
     * and any K/V value is NaN/Inf. */
    /* key_head_sumsq: NULL, or [total_rows][key_heads_total] per-head key
     * sums of squares gathered from every tensor-parallel shard. */
    oscar_status (*append)(oscar_cache *c, int layer, const oscar_append_job *jobs, int n_jobs,
                           int64_t total_rows, const void *k, const void *v, oscar_dtype dtype,
                           const float *key_head_sumsq, int key_heads_total, void *stream);
    oscar_status (*attention)(oscar_cache *c, int layer, const oscar_attn_job *jobs, int n_jobs,
                              int q_len, const void *q, oscar_dtype q_dtype, void *out,
                              oscar_dtype out_dtype, float softmax_scale, void *stream);
    /* Copies window slot src to dst (all layers, first n tokens of each
     * layer given by tokens[layer]); the fork hook. Also lets a backend
     * mirror the block table (table has n_blocks entries). */
    oscar_status (*fork)(oscar_cache *c, int32_t src_slot, int32_t dst_slot,
                         const int32_t *window_tokens_per_layer, const int32_t *packed_per_layer,
                         const int32_t *table, int32_t n_blocks);
    /* Host <-> backend copies of raw bytes (synchronous). */
    oscar_status (*read_block)(oscar_cache *c, int layer, int32_t block, void *host);
    oscar_status (*write_block)(oscar_cache *c, int layer, int32_t block, const void *host);
    oscar_status (*read_window)(oscar_cache *c, int layer, int32_t slot, int32_t n_tokens,
                                void *k_host, void *v_host, float *ss_host);
    /* Also records that `packed_blocks` blocks of the layer are packed. */
    oscar_status (*write_window)(oscar_cache *c, int layer, int32_t slot, int32_t n_tokens,
                                 const void *k_host, const void *v_host, const float *ss_host,
                                 int32_t packed_blocks);
    /* Called after import wrote a new sequence's table (may be NULL). */
    oscar_status (*set_table)(oscar_cache *c, int32_t slot, const int32_t *table, int32_t n_blocks);
    /* The batch API (caller metadata in backend memory). The core has
     * checked the host fields; the backend checks the arrays (the CPU at
     * once, the CUDA backend on the device, reported through poll). */
    oscar_status (*batch_append)(oscar_cache *c, int layer, const oscar_batch *b, const void *k, const void *v,
                                 oscar_dtype dtype, void *stream);
    oscar_status (*batch_attention)(oscar_cache *c, int layer, const oscar_batch *b, const void *q,
                                    oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float softmax_scale,
                                    void *stream);
    oscar_status (*slot_copy)(oscar_cache *c, int32_t src, int32_t dst, int64_t n_tokens, void *stream);
    /* Device-side reports since the last poll (non-blocking). */
    oscar_status (*poll)(oscar_cache *c);
    oscar_status (*sync)(oscar_cache *c, void *stream);
    /* Memory a configuration needs (no cache yet). */
    oscar_status (*requirements)(const oscar_config *cfg, oscar_memory_requirements *out, char *errbuf,
                                 size_t errbuf_size);
    /* The batch API's first tensor-parallel phase: per-head key sums of
     * squares of n_rows rows (k in backend memory, out [n_rows][Hkv]). */
    oscar_status (*key_sumsq)(oscar_cache *c, int64_t n_rows, const void *k, oscar_dtype dtype, float *out,
                              void *stream);
    /* Sink rows (config.sink_tokens; NULL in a backend without them): the
     * first n sink rows of a slot's layer, K and V [n][Hkv][d] in the window
     * dtype. */
    oscar_status (*read_sinks)(oscar_cache *c, int layer, int32_t slot, int32_t n, void *k_host, void *v_host);
    oscar_status (*write_sinks)(oscar_cache *c, int layer, int32_t slot, int32_t n, const void *k_host,
                                const void *v_host);
} oscar_backend_ops;

extern const oscar_backend_ops oscar_cpu_backend_ops;
/* NULL when the CUDA backend was not compiled (src/core/backend_stubs.c
 * provides the fallback; src/cuda provides the real one). */
const oscar_backend_ops *oscar_cuda_backend_ops(void);
/* 1 if the CUDA backend is compiled and a device is usable, else 0. */
int oscar_cuda_device_available(void);

typedef struct oscar_seq {
    int32_t id;                 /* -1 when the slot is free                */
    int32_t n_blocks;           /* entries in table                        */
    int32_t *table;             /* capacity table_cap                      */
    int32_t table_cap;
    int64_t *tokens;            /* per layer                               */
    int32_t *packed;            /* per layer: blocks packed                */
} oscar_seq;

struct oscar_cache {
    oscar_config cfg;
    oscar_layout lay;
    const oscar_backend_ops *ops;
    void *backend_state;
    oscar_seq *seqs;            /* max_seqs slots                          */
    int32_t next_seq_id;
    int32_t *block_refs;        /* per block reference count               */
    int32_t *free_list;         /* stack of free block ids                 */
    int32_t n_free;
    /* sequence lookups in O(1): id -> slot by open addressing (size a power
     * of two >= 2 max_seqs; key -1 empty, -2 deleted), and a stack of free
     * slots; per-slot stamps find repeated ids in one call */
    int32_t *id_keys, *id_slots;
    uint32_t id_mask, id_used; /* used: live + deleted entries */
    int32_t *free_slots;
    int32_t n_free_slots;
    uint32_t *stamp;
    uint32_t stamp_now;
    char err[512];
};

/* Slot of a live sequence id, or -1. */
int oscar_find_seq_slot(const oscar_cache *c, int32_t id);
/* A free slot (the next one oscar_seq_attach takes), or -1. */
int oscar_free_seq_slot(const oscar_cache *c);
/* Gives the free slot returned by oscar_free_seq_slot the id (the slot's
 * other fields are the caller's to set), and takes it back. */
void oscar_seq_attach(oscar_cache *c, int slot, int32_t id);
void oscar_seq_detach(oscar_cache *c, int slot);
/* A fresh id not used by any live sequence. */
int32_t oscar_new_seq_id(oscar_cache *c);

/* Records a formatted message on the handle and returns status. */
oscar_status oscar_set_error(oscar_cache *c, oscar_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- shared numerics (src/core/numerics.c) ---- */

/* Sum of squares of a token's key over its KV heads, the quantity whose
 * square root is the token norm (docs/FORMAT.md): per head, 32 "lanes"
 * each sum the squares of d/32 consecutive channels in order, then the
 * lanes are combined by the xor butterfly s_l += s_(l^m), m = 16, 8, 4, 2,
 * 1, and lane 0's value is the head's sum (each product and sum rounded to
 * fp32); then a sequential fp32 sum of the per-head sums in head order. A tensor-parallel
 * shard holding some heads computes its heads' sums; the caller gathers all
 * heads' sums, and this order makes every shard's result the same bits as
 * one cache holding every head. */
float oscar_head_sumsq(const float *x, int d);
float oscar_sum_heads(const float *head_sums, int n_heads);

/* In-place normalised FWHT of n floats (n power of two). */
void oscar_fwht(float *x, int n);
/* Converts n elements of dtype at src to fp32. */
void oscar_to_f32(const void *src, oscar_dtype dtype, float *dst, int64_t n);
/* Converts n fp32 values to dtype at dst. */
void oscar_from_f32(const float *src, void *dst, oscar_dtype dtype, int64_t n);
int oscar_dtype_size(oscar_dtype dtype);
/* Quantisation parameters of a group (docs/FORMAT.md, steps 6-7). */
void oscar_group_params(const float *x, int n, int stride, int levels, uint16_t *scale16,
                        uint16_t *lo16);
/* The same with config.clip_search = 1: the range [lo, hi] shrunk by each
 * pair of fractions of a fixed grid (docs/FORMAT.md step 6), keeping the
 * (scale16, lo16) whose codes give the least squared error of the group
 * (fp64 sum in element order; the first candidate, no shrinking, wins ties). */
void oscar_group_params_clip(const float *x, int n, int stride, int levels, uint16_t *scale16, uint16_t *lo16);
/* Code of x from the stored parameters (FORMAT.md step 7): rint is round
 * half to even; NaN and values below the range give 0. */
static inline int oscar_quant_code(float x, float sc, float l0, int levels) {
    if (!(sc > 0.0f)) return 0;
    float r = rintf((x - l0) / sc);
    if (!(r >= 0.0f)) return 0; /* also catches NaN */
    if (r > (float)levels) return levels;
    return (int)r;
}

#ifdef __cplusplus
}
#endif

#endif /* OSCAR_INTERNAL_H */
