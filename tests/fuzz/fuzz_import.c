/*
 * fuzz_import - oscar_seq_import on arbitrary streams. Byte 0: bits 0-6
 * pick one of the cache shapes of import_configs.h; with bit 7 clear the
 * harness rewrites the stream's trailing FNV-1a checksum first, so that
 * mutations reach the validation behind the checksum (bit 7 set: the stream
 * is imported as it is). The rest is the stream.
 *
 * A refused stream must give OSCAR_E_FORMAT or OSCAR_E_POOL_EXHAUSTED with a
 * message and change nothing (memory statistics and a resident sequence's
 * export compared). An accepted one must make a sequence that
 *  - reads back (oscar_seq_read) and attends (oscar_attention) without a
 *    sanitizer report, with finite values where the stored values bound
 *    them (an fp16 window),
 *  - exports, and that export imports again and exports to the same bytes,
 *  - frees, returning the pool to where it was.
 */
#include "fuzz_common.h"

#include "import_configs.h"

#include <math.h>
#include <string.h>

static oscar_cache *g_cache[FUZZ_IMPORT_CONFIGS];
static int32_t g_resident[FUZZ_IMPORT_CONFIGS];
static unsigned char *g_resident_stream[FUZZ_IMPORT_CONFIGS];
static size_t g_resident_size[FUZZ_IMPORT_CONFIGS];

static unsigned char *export_of(oscar_cache *c, int32_t id, size_t *size) {
    size_t need = 0;
    FUZZ_REQUIRE(oscar_seq_export(c, id, NULL, 0, &need) == OSCAR_OK, "export size: %s", oscar_last_error(c));
    unsigned char *buf = malloc(need);
    FUZZ_REQUIRE(oscar_seq_export(c, id, buf, need, size) == OSCAR_OK && *size == need, "export: %s",
                 oscar_last_error(c));
    return buf;
}

static void destroy_caches(void) {
    for (int i = 0; i < FUZZ_IMPORT_CONFIGS; i++) {
        oscar_cache_destroy(g_cache[i]);
        free(g_resident_stream[i]);
    }
}

/* One cache per shape, each holding a resident sequence of 23 tokens. */
static oscar_cache *cache_for(int which) {
    if (g_cache[which]) return g_cache[which];
    static int registered;
    if (!registered++) atexit(destroy_caches);
    oscar_config cfg = fuzz_import_config(which);
    char err[256];
    FUZZ_REQUIRE(oscar_cache_create(&cfg, &g_cache[which], err, sizeof err) == OSCAR_OK, "create: %s", err);
    oscar_cache *c = g_cache[which];
    FUZZ_REQUIRE(oscar_seq_add(c, &g_resident[which]) == OSCAR_OK, "seq_add");
    const int32_t n = 23;
    const size_t count = (size_t)n * cfg.num_kv_heads * cfg.head_dim;
    float *k = malloc(count * sizeof *k), *v = malloc(count * sizeof *v);
    for (size_t i = 0; i < count; i++) k[i] = (float)((i * 37) % 19) - 9.0f, v[i] = (float)((i * 11) % 7) - 3.0f;
    for (int l = 0; l < cfg.num_layers; l++)
        FUZZ_REQUIRE(oscar_append(c, l, 1, &g_resident[which], &n, k, v, OSCAR_DTYPE_F32, NULL) == OSCAR_OK,
                     "append: %s", oscar_last_error(c));
    free(k), free(v);
    g_resident_stream[which] = export_of(c, g_resident[which], &g_resident_size[which]);
    return c;
}

static void exercise(oscar_cache *c, const oscar_config *cfg, int32_t id) {
    const size_t row = (size_t)cfg->num_kv_heads * cfg->head_dim;
    for (int l = 0; l < cfg->num_layers; l++) {
        oscar_seq_info info;
        FUZZ_REQUIRE(oscar_seq_info_get(c, id, l, &info) == OSCAR_OK, "seq_info");
        FUZZ_REQUIRE(info.packed_tokens + info.window_tokens == info.tokens && info.packed_tokens % cfg->residual == 0,
                     "inconsistent lengths");
        if (info.tokens == 0) continue;
        float *k = malloc(sizeof(float) * row * (size_t)info.tokens), *v = malloc(sizeof(float) * row * (size_t)info.tokens);
        FUZZ_REQUIRE(oscar_seq_read(c, id, l, 0, info.tokens, k, v) == OSCAR_OK, "seq_read: %s", oscar_last_error(c));
        if (cfg->window_dtype == OSCAR_DTYPE_F16) /* |x| <= 65504, d = 64: a Hadamard stays finite */
            for (size_t i = (size_t)info.packed_tokens * row; i < (size_t)info.tokens * row; i++)
                FUZZ_REQUIRE(isfinite(k[i]) && isfinite(v[i]), "layer %d: a window value reads back as %g / %g", l,
                             (double)k[i], (double)v[i]);
        free(k), free(v);
        const size_t qn = (size_t)cfg->num_q_heads * cfg->head_dim;
        float *q = malloc(sizeof(float) * qn), *o = malloc(sizeof(float) * qn);
        for (size_t i = 0; i < qn; i++) q[i] = (float)(i % 5) * 0.25f - 0.5f;
        FUZZ_REQUIRE(oscar_attention(c, l, 1, &id, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0.0f, NULL) == OSCAR_OK,
                     "attention: %s", oscar_last_error(c));
        free(q), free(o);
    }
}

/* docs/FORMAT.md: FNV-1a 64 of every byte before it, little-endian. */
static void fix_checksum(unsigned char *p, size_t n) {
    if (n < 8) return;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n - 8; i++) h = (h ^ p[i]) * 1099511628211ull;
    for (int i = 0; i < 8; i++) p[n - 8 + i] = (unsigned char)(h >> (8 * i));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const int which = (data[0] & 0x7f) % FUZZ_IMPORT_CONFIGS;
    oscar_cache *c = cache_for(which);
    const oscar_config cfg = fuzz_import_config(which);
    oscar_memory_stats before, after;
    oscar_memory(c, &before);
    int32_t id = -1;
    /* a private copy, so that reading past the stream's end is an ASan report */
    unsigned char *stream = malloc(size - 1 ? size - 1 : 1);
    memcpy(stream, data + 1, size - 1);
    if (!(data[0] & 0x80)) fix_checksum(stream, size - 1);
    oscar_status st = oscar_seq_import(c, stream, size - 1, &id);
    free(stream);
    if (st == OSCAR_OK) {
        exercise(c, &cfg, id);
        size_t n1 = 0, n2 = 0;
        unsigned char *s1 = export_of(c, id, &n1);
        oscar_seq_free(c, id);
        int32_t id2 = -1;
        FUZZ_REQUIRE(oscar_seq_import(c, s1, n1, &id2) == OSCAR_OK, "the export of an imported stream does not import: %s",
                     oscar_last_error(c));
        unsigned char *s2 = export_of(c, id2, &n2);
        FUZZ_REQUIRE(n1 == n2 && memcmp(s1, s2, n1) == 0, "export -> import -> export changed the stream");
        free(s1), free(s2);
        oscar_seq_free(c, id2);
    } else {
        FUZZ_REQUIRE(st == OSCAR_E_FORMAT || st == OSCAR_E_POOL_EXHAUSTED, "import refused with %s",
                     oscar_status_name(st));
        FUZZ_REQUIRE(oscar_last_error(c)[0] != 0, "import refused without a message");
    }
    oscar_memory(c, &after);
    FUZZ_REQUIRE(memcmp(&before, &after, sizeof before) == 0, "the pool did not return to where it was");
    size_t n = 0;
    unsigned char *res = export_of(c, g_resident[which], &n);
    FUZZ_REQUIRE(n == g_resident_size[which] && memcmp(res, g_resident_stream[which], n) == 0,
                 "the resident sequence changed");
    free(res);
    return 0;
}
