/* The generic quantised attention kernel at key width 4 (attention_kernel.cuh),
 * every value width: a translation unit of its own so that the widths
 * compile in parallel. */
#include "attention_kernel.cuh"

void (*oscar_cuda_attn_generic_k4(int vbits, int d, int nt))(AttnParams) { return pick_vbits<4>(vbits, d, nt); }
