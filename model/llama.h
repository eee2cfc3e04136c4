/*
 * llama.h - a Llama-architecture forward pass over GGUF weights, on the CPU,
 * with the KV cache held by oscar (or, for debugging, a plain fp32 cache).
 */
#ifndef OSCAR_MODEL_LLAMA_H
#define OSCAR_MODEL_LLAMA_H

#include "gguf.h"
#include "oscar.h"
#include "tokenizer.h"

/* A weight matrix [rows, cols] in its file encoding; row r starts at
 * data + r * row_bytes. Folded matrices are fp32 copies we own. */
typedef struct qmat {
    uint32_t type;
    int64_t rows, cols;
    size_t row_bytes;
    const void *data;
    float *owned;
} qmat;

typedef struct llama_layer {
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm; /* Qwen3, Gemma 3: per-head RMSNorm weights [head_dim], else NULL */
    const float *post_attn_norm, *post_ffn_norm; /* Gemma 3: RMSNorm of each block's output, else NULL */
    qmat wq, wk, wv, wo, wgate, wup, wdown;
    int swa;      /* 1: a sliding-window (local) layer, whose keys and values live in the runner's
                     exact ring (llama_kv.swa_k/v), never in the oscar cache */
    int kv_layer; /* the layer's index in the oscar cache (global layers) or in the ring (local layers) */
} llama_layer;

/* The architectures the runner knows (general.architecture). */
typedef enum llama_arch {
    LLAMA_ARCH_LLAMA, /* SmolLM2, Llama: Q/K rows permuted for adjacent-pair RoPE */
    LLAMA_ARCH_QWEN3, /* per-head q/k RMSNorm before RoPE; RoPE on (i, i + d/2) pairs */
    LLAMA_ARCH_GEMMA3 /* Qwen3's attention plus: embeddings times sqrt(dim), GELU-tanh FFN, a norm after
                         each block, sliding-window layers with their own RoPE base */
} llama_arch;

typedef struct llama_model {
    gguf_file *file;
    tokenizer *tok;
    char *name;
    llama_arch arch;
    int n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, ctx_max, rope_dim;
    int rope_neox; /* 1: RoPE rotates (i, i + rope_dim/2) (Qwen3), 0: (2i, 2i + 1) (Llama GGUFs) */
    float eps, rope_base;
    const float *out_norm;
    qmat embed, output;
    llama_layer *layers;
    int v_folded; /* H folded into W_v / W_o at load time */
    int gpu_weights_f32; /* --device cuda: 1 keeps fp32 weight matrices on the GPU (default bf16);
                            set before llama_kv_init */
    double *rope_freq; /* rope_dim/2 inverse frequencies */
    /* Gemma 3 */
    float embed_scale;      /* the embeddings are multiplied by this (1 but for Gemma: sqrt(dim)) */
    float attn_scale;       /* softmax scale of q.k (1/sqrt(head_dim) unless the architecture says otherwise) */
    int swa_window;         /* local layers see the last swa_window positions (themselves included); 0: none */
    int n_swa_layers;       /* how many layers are local; the oscar cache holds the other n_layers - n_swa_layers */
    float rope_base_swa;    /* the local layers' RoPE base */
    double *rope_freq_swa;  /* their inverse frequencies, or NULL */
} llama_model;

/* The layers whose keys and values the oscar cache holds (all but the local ones). */
static inline int llama_cache_layers(const llama_model *m) { return m->n_layers - m->n_swa_layers; }

llama_model *llama_load(const char *path, int fold_v, char *err, size_t err_size);
void llama_free(llama_model *m);

/* The KV cache of one sequence: an oscar cache or, with use_f32, a plain
 * fp32 array (the runner's own reference, independent of the library). */
struct llama_gpu;

typedef struct llama_kv {
    int use_f32;
    struct llama_gpu *gpu; /* the GPU runner (model/llama_gpu.h), which owns
                              its own oscar cache, or NULL (CPU) */
    oscar_cache *oc;
    int32_t seq;
    float *k, *v;   /* f32: [layers][cap][kv_dim] */
    int64_t cap;
    int64_t len;    /* tokens appended so far (all layers) */
    /* local (sliding-window) layers: an exact fp32 ring of the last swa_cap positions
       ([n_swa_layers][swa_cap][kv_dim], position p in slot p % swa_cap), as llama.cpp's SWA cache */
    float *swa_k, *swa_v;
    int64_t swa_cap;
    int swa_max_chunk; /* the longest chunk the ring can take without overwriting a key still in view */
    int residual;   /* R of a quantising oscar cache, 0 otherwise */
    int pack_offset; /* sink_tokens + rollback_tokens: blocks pack when the
                        length reaches pack_offset + k R (k >= 1) */
} llama_kv;

/*
 * How many of the tokens [kv->len, end) to run as the next chunk (<= max).
 * A quantising cache packs a block the moment its R-th token is appended, and
 * the chunk's queries attend after their append. So a chunk never runs past
 * the token before a block boundary, and the boundary token goes alone: every
 * token then sees exactly the cache that token-by-token decoding would give
 * it (older blocks quantised, the window exact, the boundary token's own
 * block quantised, as in decode).
 */
int llama_next_chunk(const llama_kv *kv, int64_t end, int max);

/* Creates a cache for one sequence of up to max_tokens tokens: with use_f32
 * the runner's own fp32 cache, else an oscar cache whose method, bits,
 * groups, residual and window dtype come from *cfg (NULL: defaults) and whose
 * shapes come from the model. cfg->backend = OSCAR_BACKEND_CUDA runs the
 * whole forward pass on the GPU (llama_gpu.h) with the cache there. */
int llama_kv_init(llama_kv *kv, const llama_model *m, const oscar_config *cfg, int use_f32,
                  int64_t max_tokens, char *err, size_t err_size);
/* Drops all tokens (a new sequence). */
int llama_kv_reset(llama_kv *kv, char *err, size_t err_size);
void llama_kv_free(llama_kv *kv);

/* Optional observer of the post-RoPE keys of each layer (tni). */
typedef void (*llama_key_hook)(void *ud, int layer, int64_t pos0, int n, const float *k);

typedef struct llama_state {
    int max_chunk;
    float *x, *xb, *q, *k, *v, *att, *hb, *hb2, *xo, *logits;
    void *xq;          /* the input of a product as integer blocks (qmatmul.h) */
    float *rope_cs;    /* [max_chunk][rope_dim/2] cos, sin of the chunk's positions */
    float *rope_cs_swa; /* the same with the local layers' base, or NULL */
    llama_key_hook key_hook;
    void *key_hook_ud;
} llama_state;

int llama_state_init(llama_state *s, const llama_model *m, int max_chunk);
void llama_state_free(llama_state *s);

/*
 * Runs n tokens (n <= max_chunk) through the model at positions kv->len ..
 * kv->len + n - 1, appending their keys/values to kv. On success s->logits
 * holds logits for the last `n_logits` tokens ([n_logits, vocab]; 0 skips the
 * output layer). Returns 0, or -1 with a message.
 */
int llama_forward(const llama_model *m, llama_state *s, llama_kv *kv, const int32_t *tokens, int n,
                  int n_logits, char *err, size_t err_size);

#endif
