/* When the CUDA backend is not compiled in, the core still links: these say
 * "not available" and oscar_cache_create reports OSCAR_E_UNSUPPORTED. */
#include "internal.h"

#ifndef OSCAR_HAVE_CUDA
const oscar_backend_ops *oscar_cuda_backend_ops(void) { return NULL; }
int oscar_cuda_device_available(void) { return 0; }
#endif
