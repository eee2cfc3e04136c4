/* The cache shapes the import harness fuzzes (tests/fuzz/fuzz_import.c) and
 * its seed streams are made for (tests/fuzz/gen_import_seeds.c). Byte 0 of
 * an input picks the shape; the rest is the stream. */
#ifndef OSCAR_FUZZ_IMPORT_CONFIGS_H
#define OSCAR_FUZZ_IMPORT_CONFIGS_H

#include "oscar.h"

enum { FUZZ_IMPORT_CONFIGS = 5 };

static inline oscar_config fuzz_import_config(int which) {
    oscar_config c = oscar_config_default();
    c.head_dim = 64;
    c.num_threads = 1;
    c.block_count = 24;
    c.max_seqs = 4;
    switch (which) {
    case 0: /* the method itself, a rollback lag, two layers */
        c.method = OSCAR_METHOD_OSCAR;
        c.bits = 2;
        c.num_kv_heads = 2;
        c.num_q_heads = 4;
        c.num_layers = 2;
        c.residual = 16;
        c.k_group = 16;
        c.v_group = 32;
        c.rollback_tokens = 4;
        c.window_dtype = OSCAR_DTYPE_F16;
        break;
    case 1: /* 4-bit KIVI, values folded by the caller, bf16 window */
        c.method = OSCAR_METHOD_KIVI;
        c.bits = 4;
        c.num_kv_heads = 1;
        c.num_q_heads = 2;
        c.num_layers = 1;
        c.residual = 32;
        c.k_group = 16;
        c.v_group = 16;
        c.window_dtype = OSCAR_DTYPE_BF16;
        c.rotate_values = 0;
        break;
    case 3: /* format version 4: per-head key norms, 4-bit keys and 2-bit values, sinks */
        c.method = OSCAR_METHOD_OSCAR;
        c.bits = 2;
        c.key_bits = 4;
        c.value_bits = 2;
        c.key_norm_per_head = 1;
        c.sink_tokens = 3;
        c.num_kv_heads = 2;
        c.num_q_heads = 2;
        c.num_layers = 2;
        c.residual = 16;
        c.k_group = 16;
        c.v_group = 16;
        c.rollback_tokens = 2;
        c.window_dtype = OSCAR_DTYPE_F16;
        break;
    case 4: /* format version 5: 3-bit keys and values (two code planes), groups of 32 */
        c.method = OSCAR_METHOD_OSCAR;
        c.bits = 2;
        c.key_bits = 3;
        c.value_bits = 3;
        c.sink_tokens = 2;
        c.num_kv_heads = 2;
        c.num_q_heads = 4;
        c.num_layers = 2;
        c.residual = 32;
        c.k_group = 32;
        c.v_group = 32;
        c.rollback_tokens = 3;
        c.window_dtype = OSCAR_DTYPE_F16;
        break;
    default: /* no quantisation: blocks hold the window dtype */
        c.method = OSCAR_METHOD_NONE;
        c.num_kv_heads = 1;
        c.num_q_heads = 1;
        c.num_layers = 1;
        c.residual = 16;
        c.k_group = 16;
        c.v_group = 16;
        c.window_dtype = OSCAR_DTYPE_F32;
        break;
    }
    return c;
}

#endif
