/* The generic quantised attention kernel at key width 2 (attention_kernel.cuh),
 * every value width: a translation unit of its own so that the widths
 * compile in parallel. */
#include "attention_kernel.cuh"

void (*oscar_cuda_attn_generic_k2(int vbits, int d, int nt))(AttnParams) { return pick_vbits<2>(vbits, d, nt); }
