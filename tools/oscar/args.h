/* Small, strict command-line helpers shared by the subcommands. */
#ifndef OSCAR_ARGS_H
#define OSCAR_ARGS_H
#include "oscar.h"

/* The value after option argv[*i]; advances *i. NULL (with a message) if missing. */
const char *arg_value(int argc, char **argv, int *i);
/* Parses the value after argv[*i] as an integer in [lo, hi]; 0 on success,
 * else prints why and returns 1. */
int arg_int(int argc, char **argv, int *i, long lo, long hi, int *out);
/* "f32", "f16", "bf16" -> dtype; 0 on success. */
int arg_dtype(const char *name, oscar_dtype *out);
#endif
