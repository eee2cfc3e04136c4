/* Little-endian float32 .npy files (the eval-kv input format). */
#ifndef OSCAR_NPY_H
#define OSCAR_NPY_H
#include <stddef.h>
#include <stdint.h>

#define NPY_MAX_DIMS 8

typedef struct npy_array {
    float *data;
    int ndim;
    int64_t shape[NPY_MAX_DIMS];
    int64_t count;
} npy_array;

/* 0 on success; -1 with a message in err (the array is then empty). */
int npy_read_f32(const char *path, npy_array *out, char *err, size_t errn);
int npy_write_f32(const char *path, const float *data, const int64_t *shape, int ndim, char *err, size_t errn);
void npy_free(npy_array *a);
#endif
