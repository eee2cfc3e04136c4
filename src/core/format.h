/* Reference packer/unpacker of docs/FORMAT.md (src/core/format.c). */
#ifndef OSCAR_FORMAT_H
#define OSCAR_FORMAT_H
#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Packs one layer block from R tokens of window values converted to fp32:
 * xk, xv are [R][Hkv][d] (rotated when the method rotates, not yet scaled).
 * token_ss [R]: each token's key sum of squares (oscar_sum_heads of the
 * per-head sums; from all heads under tensor parallelism); NULL computes
 * it from xk. scratch holds R*Hkv*d floats. Writes layer_block_bytes bytes. */
void oscar_pack_block(const oscar_layout *L, const float *xk, const float *xv, const float *token_ss, uint8_t *dst,
                      float *scratch);
/* The token sum of squares of one rounded, rotated key row [Hkv][d]. */
float oscar_row_sumsq(const oscar_layout *L, const float *row);

/* Dequantises head h of a layer block: k_out, v_out [R][d] in the stored
 * (rotated, norm-divided) space; norms_out [R] (1 when the method has none). */
void oscar_unpack_head(const oscar_layout *L, const uint8_t *block, int h, float *k_out, float *v_out,
                       float *norms_out);

#ifdef __cplusplus
}
#endif
#endif
