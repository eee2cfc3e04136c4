/* `oscar bench-e2e` without the CUDA build: the GPU decode loop lives in
 * model/gpu/e2e.cu, compiled when CMake finds nvcc. */
#include <stdio.h>

#include "model_commands.h"

#ifndef OSCAR_MODEL_E2E
int oscar_cmd_bench_e2e(int argc, char **argv) {
    (void)argc, (void)argv;
    fprintf(stderr, "bench-e2e: this oscar was built without the CUDA backend (nvcc not found or "
                    "OSCAR_CUDA=OFF); the end-to-end GPU benchmark needs it\n");
    return 1;
}
#endif
