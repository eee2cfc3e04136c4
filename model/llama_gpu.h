/*
 * llama_gpu.h - the GPU twin of llama_forward (model/gpu/llama_gpu.cu): the
 * same Llama forward pass over the same GGUF weights, on a CUDA device, with
 * the KV cache in oscar's CUDA backend (batch API, one sequence). Decode
 * steps (one token) after the first are replays of one CUDA graph.
 *
 * Weights are dequantised at load into bf16 device matrices (default) or
 * fp32 ones, and the GEMMs run through cuBLAS with fp32 accumulation (no
 * TF32). With fp32 weights the runner is the correctness twin of the CPU
 * runner and reproduces its logits to float rounding; bf16 weights halve
 * the memory and the bytes read per step. Architectures: those of llama.c
 * (Llama, Qwen3). The end-to-end speed benchmark (`oscar bench-e2e`,
 * model/gpu/e2e.cu) runs bf16 weights and activations.
 */
#ifndef OSCAR_MODEL_LLAMA_GPU_H
#define OSCAR_MODEL_LLAMA_GPU_H

#include <stdint.h>

#include "llama.h"

typedef struct llama_gpu llama_gpu;

typedef enum llama_gpu_weights {
    LLAMA_GPU_WEIGHTS_BF16 = 0, /* default */
    LLAMA_GPU_WEIGHTS_F32 = 1
} llama_gpu_weights;

/* 1 if this build has the GPU runner and a usable device. */
int llama_gpu_available(void);
/* Uploads the model and creates the KV cache from *cfg (its backend is
 * ignored: CUDA). NULL with a message on failure. */
llama_gpu *llama_gpu_create(const llama_model *m, const oscar_config *cfg, int64_t max_tokens,
                            llama_gpu_weights weights, char *err, size_t err_size);
/* As llama_forward: n tokens at positions len .. len + n - 1; logits of the
 * last n_logits tokens into logits (host, [n_logits][vocab]); keys to the
 * hook (host copies) if given. Returns 0, or -1 with a message. */
int llama_gpu_forward(llama_gpu *g, const int32_t *tokens, int n, int n_logits, float *logits,
                      llama_key_hook hook, void *hook_ud, char *err, size_t err_size);
int64_t llama_gpu_len(const llama_gpu *g);
/* The runner's oscar cache (CUDA backend, batch API), for memory stats. */
oscar_cache *llama_gpu_cache(const llama_gpu *g);
/* Drops all tokens (the next forward starts a new sequence). */
void llama_gpu_reset(llama_gpu *g);
void llama_gpu_free(llama_gpu *g);

#endif
