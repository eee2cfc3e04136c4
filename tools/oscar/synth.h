/* Seeded synthetic K/V/Q with Token Norm Imbalance (tools/oscar/synth.c). */
#ifndef OSCAR_SYNTH_H
#define OSCAR_SYNTH_H
#include <stdint.h>

/* K, V: [tokens][hkv][d]; Q: [queries][hq][d]; all float32, caller-owned. */
void synth_kv(uint64_t seed, int64_t tokens, int hkv, int d, int64_t queries, int hq, float *K, float *V, float *Q);
/* 1 if token t is one of the generator's low-norm sink tokens. */
int synth_is_sink(int64_t t, int64_t tokens);
/* One standard normal sample from the generator state. */
double synth_normal(uint64_t *state);
#endif
