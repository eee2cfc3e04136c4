/*
 * Writes the import harness's seeds: export streams of the library itself,
 * for each shape of import_configs.h, prefixed by the shape's index byte.
 * Sequences: empty, window only, blocks + window, layers of different
 * lengths, right after a block boundary, and after a truncation.
 * usage: gen_import_seeds OUT_DIR   (tests/fuzz/README.md)
 */
#include "import_configs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void write_seed(const char *dir, int which, const char *name, oscar_cache *c, int32_t id) {
    size_t need = 0;
    oscar_seq_export(c, id, NULL, 0, &need);
    unsigned char *buf = malloc(need + 1);
    buf[0] = (unsigned char)which;
    if (oscar_seq_export(c, id, buf + 1, need, &need) != OSCAR_OK) {
        fprintf(stderr, "export failed: %s\n", oscar_last_error(c));
        exit(1);
    }
    char path[512];
    snprintf(path, sizeof path, "%s/config%d-%s.bin", dir, which, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, need + 1, f) != need + 1 || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    free(buf);
}

static void append(oscar_cache *c, const oscar_config *cfg, int32_t id, int layer, int32_t n, unsigned seed) {
    const size_t count = (size_t)n * cfg->num_kv_heads * cfg->head_dim;
    float *k = malloc((count + 1) * sizeof *k), *v = malloc((count + 1) * sizeof *v);
    for (size_t i = 0; i < count; i++) {
        seed = seed * 1103515245u + 12345u;
        k[i] = (float)((int)(seed >> 16) % 2001 - 1000) / 250.0f;
        v[i] = (float)((int)(seed >> 8) % 2001 - 1000) / 500.0f;
    }
    if (n > 0 && oscar_append(c, layer, 1, &id, &n, k, v, OSCAR_DTYPE_F32, NULL) != OSCAR_OK) {
        fprintf(stderr, "append failed: %s\n", oscar_last_error(c));
        exit(1);
    }
    free(k), free(v);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: gen_import_seeds OUT_DIR\n");
        return 2;
    }
    for (int which = 0; which < FUZZ_IMPORT_CONFIGS; which++) {
        oscar_config cfg = fuzz_import_config(which);
        oscar_cache *c = NULL;
        char err[256];
        if (oscar_cache_create(&cfg, &c, err, sizeof err) != OSCAR_OK) {
            fprintf(stderr, "config %d: %s\n", which, err);
            return 1;
        }
        const int R = cfg.residual;
        static const struct { const char *name; int first, second; } shapes[] = {
            {"empty", 0, 0}, {"window", 5, 5}, {"blocks", 0, 0}, {"uneven", 0, 0}, {"boundary", 0, 0}};
        int32_t id;
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            oscar_seq_add(c, &id);
            int n0 = shapes[s].first, n1 = shapes[s].second;
            if (s == 2) n0 = n1 = 2 * R + 7 + cfg.rollback_tokens;
            if (s == 3) n0 = 2 * R + 3 + cfg.rollback_tokens, n1 = R / 2;
            if (s == 4) n0 = n1 = R + cfg.rollback_tokens;
            append(c, &cfg, id, 0, n0, 7u * (unsigned)s + 1u);
            if (cfg.num_layers > 1) append(c, &cfg, id, 1, n1, 11u * (unsigned)s + 5u);
            write_seed(argv[1], which, shapes[s].name, c, id);
            if (s == 2 && cfg.rollback_tokens > 0) {
                oscar_seq_truncate(c, id, 2 * R + 7);
                write_seed(argv[1], which, "truncated", c, id);
            }
            oscar_seq_free(c, id);
        }
        oscar_cache_destroy(c);
    }
    return 0;
}
