/* Seeded synthetic K/V/Q with Token Norm Imbalance: a few attention-sink
 * tokens whose keys have a small norm, and outlier channels with a large
 * per-channel offset, the two features that make 2-bit keys hard. */
#include "synth.h"

#include <math.h>
#include <stdlib.h>

static uint64_t next(uint64_t *s) {
    /* splitmix64: small, fast and good enough for test data. */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform(uint64_t *s) { return ((next(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

double synth_normal(uint64_t *s) {
    double u = uniform(s), v = uniform(s);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

int synth_is_sink(int64_t t, int64_t tokens) {
    /* Token 0 (BOS) and a sparse, deterministic set of later tokens, like the
     * delimiter tokens that act as sinks in real text. */
    return t == 0 || (t % 97 == 13 && t < tokens);
}

void synth_kv(uint64_t seed, int64_t tokens, int hkv, int d, int64_t queries, int hq, float *K, float *V,
              float *Q) {
    uint64_t s = seed * 0x2545f4914f6cdd1dull + 1;
    double *mu = (double *)malloc(sizeof(double) * (size_t)hkv * d);
    double *vs = (double *)malloc(sizeof(double) * (size_t)hkv * d);
    if (!mu || !vs) {
        free(mu), free(vs);
        return;
    }
    for (int i = 0; i < hkv * d; i++) {
        mu[i] = 0.5 * synth_normal(&s);
        /* About 3% of channels are outliers with a large constant offset. */
        if (uniform(&s) < 0.03) mu[i] = (uniform(&s) < 0.5 ? -1 : 1) * (8.0 + 8.0 * uniform(&s));
        vs[i] = 0.5 + uniform(&s);
    }
    for (int64_t t = 0; t < tokens; t++) {
        int sink = synth_is_sink(t, tokens);
        double amp = sink ? 0.05 : 1.0;
        for (int h = 0; h < hkv; h++)
            for (int c = 0; c < d; c++) {
                size_t i = ((size_t)t * hkv + h) * d + c;
                K[i] = (float)(amp * (mu[h * d + c] + synth_normal(&s)));
                V[i] = (float)((sink ? 0.1 : 1.0) * vs[h * d + c] * synth_normal(&s));
            }
    }
    int g = hq / hkv;
    for (int64_t q = 0; q < queries; q++)
        for (int j = 0; j < hq; j++)
            for (int c = 0; c < d; c++) {
                size_t i = ((size_t)q * hq + j) * d + c;
                /* Queries lean towards the mean key so the logits have
                 * structure, as in trained models. */
                Q[i] = (float)(0.15 * mu[(j / g) * d + c] + synth_normal(&s));
            }
    free(mu);
    free(vs);
}
