/*
 * check.cuh - error handling of the GPU forward passes (model/gpu): every
 * CUDA, cuBLAS and oscar call is checked and a failure throws Fail with the
 * call's text; the C entry points catch it and return it as a message.
 */
#ifndef OSCAR_MODEL_GPU_CHECK_CUH
#define OSCAR_MODEL_GPU_CHECK_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <string>

struct Fail {
    std::string msg;
};

#define CU(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) throw Fail{std::string(#x) + ": " + cudaGetErrorString(e_)};           \
    } while (0)
#define CB(x)                                                                                          \
    do {                                                                                               \
        cublasStatus_t e_ = (x);                                                                       \
        if (e_ != CUBLAS_STATUS_SUCCESS) throw Fail{std::string(#x) + ": cuBLAS status " + std::to_string((int)e_)}; \
    } while (0)
#define LAUNCH(what)                                                                                   \
    do {                                                                                               \
        cudaError_t e_ = cudaGetLastError();                                                           \
        if (e_ != cudaSuccess) throw Fail{std::string("launch of ") + what + ": " + cudaGetErrorString(e_)}; \
    } while (0)

#endif
