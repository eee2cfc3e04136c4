/*
 * gguf.h - a read-only GGUF (v2/v3) reader for the model runner.
 *
 * The file is mmap'ed; metadata values and tensor data point into the
 * mapping. Every offset and length read from the file is bounds-checked
 * against the file size, so a truncated or hostile file gives an error
 * message, never a crash.
 */
#ifndef OSCAR_MODEL_GGUF_H
#define OSCAR_MODEL_GGUF_H

#include <stddef.h>
#include <stdint.h>

/* ggml tensor type ids (the subset we name; the others are only reported). */
enum {
    GGML_T_F32 = 0, GGML_T_F16 = 1, GGML_T_Q4_0 = 2, GGML_T_Q4_1 = 3,
    GGML_T_Q5_0 = 6, GGML_T_Q5_1 = 7, GGML_T_Q8_0 = 8, GGML_T_Q8_1 = 9,
    GGML_T_Q2_K = 10, GGML_T_Q3_K = 11, GGML_T_Q4_K = 12, GGML_T_Q5_K = 13,
    GGML_T_Q6_K = 14, GGML_T_Q8_K = 15, GGML_T_BF16 = 30
};

/* GGUF metadata value types. */
enum {
    GGUF_V_U8 = 0, GGUF_V_I8 = 1, GGUF_V_U16 = 2, GGUF_V_I16 = 3, GGUF_V_U32 = 4,
    GGUF_V_I32 = 5, GGUF_V_F32 = 6, GGUF_V_BOOL = 7, GGUF_V_STRING = 8,
    GGUF_V_ARRAY = 9, GGUF_V_U64 = 10, GGUF_V_I64 = 11, GGUF_V_F64 = 12
};

typedef struct gguf_str {
    const char *ptr; /* not NUL-terminated */
    uint64_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    uint32_t type;
    /* scalars: the value; strings: str; arrays: arr_type, arr_n, arr_data */
    union { uint64_t u; int64_t i; double f; } num;
    gguf_str str;
    uint32_t arr_type;
    uint64_t arr_n;
    const uint8_t *arr_data; /* first element; strings are length-prefixed */
} gguf_kv;

typedef struct gguf_tensor {
    char name[128];
    uint32_t n_dims;
    uint64_t ne[4];          /* ne[0] is the contiguous (row) dimension */
    uint32_t type;
    uint64_t n_elements;
    uint64_t n_bytes;
    const void *data;
} gguf_tensor;

typedef struct gguf_file {
    int fd;
    const uint8_t *map;
    size_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    gguf_kv *kv;
    gguf_tensor *tensors;
    uint64_t alignment;
} gguf_file;

/* Opens and validates the file. On failure returns NULL with the reason in err. */
gguf_file *gguf_open(const char *path, char *err, size_t err_size);
void gguf_close(gguf_file *f);

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters: return 0 on success, -1 when missing or of another type. */
int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out); /* any integer type */
int gguf_get_f32(const gguf_file *f, const char *key, float *out);    /* f32 or f64 */
int gguf_get_bool(const gguf_file *f, const char *key, int *out);
/* Returns a malloc'ed NUL-terminated copy, or NULL. */
char *gguf_get_string(const gguf_file *f, const char *key);

/* Iterates over a string array: *pos starts at 0; returns 0 and fills *s
 * while elements remain (the array was validated at open). */
int gguf_array_next_string(const gguf_kv *kv, uint64_t *pos, const uint8_t **cursor, gguf_str *s);

const char *ggml_type_name(uint32_t type);
/* Elements per block and bytes per block; 0 for types we cannot read. */
int ggml_type_block(uint32_t type, uint64_t *block_elems, uint64_t *block_bytes);
/* 1 if the runner can dequantise this type. */
int ggml_type_supported(uint32_t type);

/* Dequantises n elements (a multiple of the block size) starting at a block
 * boundary of `src` into dst. */
void ggml_dequantize_row(uint32_t type, const void *src, float *dst, int64_t n);

float gguf_f16_to_f32(uint16_t h);

/* Q4_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes. */
void ggml_q4_k_scale_min(const uint8_t *scales, int j, int *sc, int *m);

#endif
