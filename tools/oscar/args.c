#include "args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *arg_value(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "oscar: option %s needs a value\n", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

int arg_int(int argc, char **argv, int *i, long lo, long hi, int *out) {
    const char *opt = argv[*i];
    const char *v = arg_value(argc, argv, i);
    if (!v) return 1;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "oscar: %s expects an integer in %ld..%ld, got '%s'\n", opt, lo, hi, v);
        return 1;
    }
    *out = (int)x;
    return 0;
}

int arg_dtype(const char *name, oscar_dtype *out) {
    if (!strcmp(name, "f32")) *out = OSCAR_DTYPE_F32;
    else if (!strcmp(name, "f16")) *out = OSCAR_DTYPE_F16;
    else if (!strcmp(name, "bf16")) *out = OSCAR_DTYPE_BF16;
    else return 1;
    return 0;
}
