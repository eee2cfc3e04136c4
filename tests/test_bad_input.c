/*
 * test_bad_input.c - every public function with bad arguments.
 * Each failure must return the documented status, leave a message in
 * oscar_last_error (or errbuf at creation) and change nothing: the cache is
 * compared through oscar_memory and the export bytes of every live sequence
 * before and after. Covers NULL pointers, zero/negative/overflowing sizes,
 * invalid configurations, unknown and duplicate sequence ids, q_len larger
 * than the sequence, NaN/Inf in K or V, pool and sequence-slot exhaustion
 * and the CUDA backend when it is not available.
 */
#include "testlib.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* Huge allocations are expected to fail cleanly under AddressSanitizer too. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }

/* ---- snapshots of a whole cache -------------------------------------------------- */

typedef struct cache_snap {
    oscar_memory_stats m;
    int n;
    int32_t ids[16];
    unsigned char *bytes[16];
    size_t sizes[16];
} cache_snap;

static void snap_take(oscar_cache *c, const int32_t *ids, int n, cache_snap *s) {
    memset(s, 0, sizeof *s);
    CHECK_OK(oscar_memory(c, &s->m));
    s->n = n;
    for (int i = 0; i < n; i++) {
        s->ids[i] = ids[i];
        s->bytes[i] = tl_export(c, ids[i], &s->sizes[i]);
    }
}

static int snap_same(oscar_cache *c, const cache_snap *s) {
    oscar_memory_stats m;
    if (oscar_memory(c, &m) != OSCAR_OK) return 0;
    int same = m.blocks_used == s->m.blocks_used && m.blocks_free == s->m.blocks_free &&
               m.seqs_live == s->m.seqs_live && m.bytes_in_use == s->m.bytes_in_use;
    for (int i = 0; i < s->n; i++) {
        size_t n = 0;
        unsigned char *b = tl_export(c, s->ids[i], &n);
        same = same && b && s->bytes[i] && n == s->sizes[i] && memcmp(b, s->bytes[i], n) == 0;
        free(b);
    }
    return same;
}

static void snap_free(cache_snap *s) {
    for (int i = 0; i < s->n; i++) free(s->bytes[i]);
}

/* Fails with `want`, a message, and no change. */
#define EXPECT_FAIL(c, snap, expr, want)                                                                        \
    do {                                                                                                         \
        CHECK_ST((c), (expr), (want));                                                                           \
        CHECKF(snap_same((c), (snap)), "%s changed the cache", #expr);                                           \
    } while (0)

/* ---- configuration -------------------------------------------------------------------- */

static void expect_bad_config(const oscar_config *cfg, const char *what) {
    char err[256];
    err[0] = '\0';
    oscar_status st = oscar_config_validate(cfg, err, sizeof err);
    CHECKF(st == OSCAR_E_INVALID_ARGUMENT && err[0], "validate(%s) = %s, message \"%s\"", what, oscar_status_name(st),
           err);
    oscar_cache *c = (oscar_cache *)(uintptr_t)1;
    err[0] = '\0';
    st = oscar_cache_create(cfg, &c, err, sizeof err);
    CHECKF(st == OSCAR_E_INVALID_ARGUMENT && c == NULL && err[0], "create(%s) = %s, out %p, message \"%s\"", what,
           oscar_status_name(st), (void *)c, err);
    if (st == OSCAR_OK) oscar_cache_destroy(c);
    double bits = 0;
    CHECKF(oscar_config_packed_bits(cfg, &bits) == OSCAR_E_INVALID_ARGUMENT, "packed_bits(%s) accepted", what);
}

static void test_bad_configs(void) {
    oscar_config base = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 4, 8);
    base.residual = 128;
    char err[256];
    CHECK_OK(oscar_config_validate(&base, err, sizeof err));
    CHECK_OK(oscar_config_validate(&base, NULL, 0));
    {
        oscar_config d = oscar_config_default();
        CHECK(d.method == OSCAR_METHOD_OSCAR && d.bits == 2 && d.head_dim == 128 && d.num_kv_heads == 8 &&
              d.num_q_heads == 32 && d.num_layers == 1 && d.k_group == 32 && d.v_group == 32 && d.residual == 128 &&
              d.window_dtype == OSCAR_DTYPE_F16 && d.rotate_values == 1 && d.block_count == 1024 &&
              d.max_seqs == 64 && d.backend == OSCAR_BACKEND_CPU && d.device == 0 && d.num_threads == 0 &&
              d.check_finite == 1);
        CHECK_OK(oscar_config_validate(&d, NULL, 0));
    }
    CHECK_ST(NULL, oscar_config_validate(NULL, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
    {
        /* a config not started from oscar_config_default(), or from another
         * version of the header */
        oscar_config z = base;
        z.struct_size = 0;
        expect_bad_config(&z, "struct_size 0");
        z.struct_size = sizeof(oscar_config) - 4;
        expect_bad_config(&z, "struct_size of an older header");
        CHECK(oscar_config_default().struct_size == sizeof(oscar_config));
    }
    {
        oscar_cache *c = NULL;
        CHECK_ST(NULL, oscar_cache_create(NULL, &c, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
        CHECK(c == NULL);
        CHECK_ST(NULL, oscar_cache_create(&base, NULL, err, sizeof err), OSCAR_E_INVALID_ARGUMENT);
        double bits;
        CHECK_ST(NULL, oscar_config_packed_bits(NULL, &bits), OSCAR_E_INVALID_ARGUMENT);
        CHECK_ST(NULL, oscar_config_packed_bits(&base, NULL), OSCAR_E_INVALID_ARGUMENT);
    }
    struct {
        const char *what;
        int field, value;
    } bad[] = {
        {"method 5", 0, 5},           {"method -1", 0, -1},          {"bits 0", 1, 0},
        {"bits 1", 1, 1},             {"bits 3", 1, 3},              {"bits 8", 1, 8},
        {"head_dim 0", 2, 0},         {"head_dim -128", 2, -128},    {"head_dim 32", 2, 32},
        {"head_dim 96", 2, 96},       {"head_dim 127", 2, 127},      {"head_dim 512", 2, 512},
        {"num_kv_heads 0", 3, 0},     {"num_kv_heads -4", 3, -4},    {"num_q_heads 0", 4, 0},
        {"num_q_heads -8", 4, -8},    {"num_q_heads 6 (Hkv 4)", 4, 6}, {"num_q_heads 2 (Hkv 4)", 4, 2},
        {"num_layers 0", 5, 0},       {"num_layers -1", 5, -1},      {"k_group 0", 6, 0},
        {"k_group 8", 6, 8},          {"k_group 24", 6, 24},         {"k_group 48 (R 128)", 6, 48},
        {"k_group 256 (R 128)", 6, 256}, {"k_group -32", 6, -32},    {"v_group 0", 7, 0},
        {"v_group 8", 7, 8},          {"v_group 24", 7, 24},         {"v_group 48 (d 128)", 7, 48},
        {"v_group 256 (d 128)", 7, 256}, {"v_group -32", 7, -32},    {"residual 0", 8, 0},
        {"residual -128", 8, -128},   {"residual 80 (Gk 32)", 8, 80}, {"residual 8192", 8, 8192},
        {"residual 16", 8, 16},       {"window_dtype 3", 9, 3},      {"window_dtype -1", 9, -1},
        {"block_count 0", 10, 0},     {"block_count -1", 10, -1},    {"max_seqs 0", 11, 0},
        {"max_seqs -1", 11, -1},      {"backend 2", 12, 2},          {"backend -1", 12, -1},
        {"num_threads -1", 13, -1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        oscar_config c = base;
        int v = bad[i].value;
        switch (bad[i].field) {
        case 0: c.method = (oscar_method)v; break;
        case 1: c.bits = v; break;
        case 2: c.head_dim = v; break;
        case 3: c.num_kv_heads = v; break;
        case 4: c.num_q_heads = v; break;
        case 5: c.num_layers = v; break;
        case 6: c.k_group = v; break;
        case 7: c.v_group = v; break;
        case 8: c.residual = v; break;
        case 9: c.window_dtype = (oscar_dtype)v; break;
        case 10: c.block_count = v; break;
        case 11: c.max_seqs = v; break;
        case 12: c.backend = (oscar_backend)v; break;
        case 13: c.num_threads = v; break;
        }
        expect_bad_config(&c, bad[i].what);
    }
    /* bits are ignored for method none */
    {
        oscar_config c = base;
        c.method = OSCAR_METHOD_NONE;
        c.bits = 3;
        CHECKF(oscar_config_validate(&c, err, sizeof err) == OSCAR_OK, "method none with bits 3: %s", err);
    }
    /* sizes whose products overflow 64 bits must be rejected, not wrapped */
    {
        oscar_config c = base;
        c.num_kv_heads = 1 << 30;
        c.num_q_heads = 1 << 30;
        c.num_layers = 1 << 14;
        c.block_count = 1 << 10;
        c.max_seqs = 4;
        c.head_dim = 256;
        c.residual = 4096;
        oscar_cache *cc = NULL;
        err[0] = '\0';
        oscar_status st = oscar_cache_create(&c, &cc, err, sizeof err);
        CHECKF((st == OSCAR_E_INVALID_ARGUMENT || st == OSCAR_E_OUT_OF_MEMORY) && cc == NULL && err[0],
               "overflowing pool size: %s (%s)", oscar_status_name(st), err);
        if (cc) oscar_cache_destroy(cc);
        double bits = 0;
        st = oscar_config_packed_bits(&c, &bits);
        CHECKF(st != OSCAR_OK || (bits > 2 && bits < 4), "packed bits of a huge config: %s %.3f", oscar_status_name(st),
               bits);
    }
    /* a pool too large for memory: a clean OUT_OF_MEMORY (or a size limit) */
    {
        oscar_config c = base; /* about 2^51.6 bytes: more than any address space */
        c.block_count = 1 << 16;
        c.num_layers = 1 << 10;
        c.head_dim = 256;
        c.num_kv_heads = 64;
        c.num_q_heads = 64;
        c.residual = 4096;
        c.max_seqs = 1;
        oscar_cache *cc = NULL;
        err[0] = '\0';
        oscar_status st = oscar_cache_create(&c, &cc, err, sizeof err);
        CHECKF((st == OSCAR_E_OUT_OF_MEMORY || st == OSCAR_E_INVALID_ARGUMENT) && cc == NULL && err[0],
               "a pool of petabytes: %s (%s)", oscar_status_name(st), err);
        if (cc) oscar_cache_destroy(cc);
    }
    /* a tiny errbuf is truncated, terminated and not overrun */
    {
        oscar_config c = base;
        c.head_dim = 96;
        char small[12];
        memset(small, 'x', sizeof small);
        oscar_cache *cc = NULL;
        CHECK(oscar_cache_create(&c, &cc, small, 4) == OSCAR_E_INVALID_ARGUMENT);
        CHECKF(memchr(small, '\0', 4) != NULL && small[4] == 'x' && small[11] == 'x', "errbuf of 4 bytes overrun");
        CHECK(oscar_cache_create(&c, &cc, NULL, 0) == OSCAR_E_INVALID_ARGUMENT && cc == NULL);
        memset(small, 'x', sizeof small);
        CHECK(oscar_config_validate(&c, small, 1) == OSCAR_E_INVALID_ARGUMENT && small[0] == '\0' && small[1] == 'x');
    }
}

static void test_cuda_unavailable(void) {
    CHECK(oscar_backend_available(OSCAR_BACKEND_CPU) == 1);
    int avail = oscar_backend_available(OSCAR_BACKEND_CUDA);
    CHECK(avail == 0 || avail == 1);
    CHECK(oscar_backend_available((oscar_backend)7) == 0);
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 128, 2, 4);
    cfg.backend = OSCAR_BACKEND_CUDA;
    char err[256] = "";
    oscar_cache *c = NULL;
    oscar_status st = oscar_cache_create(&cfg, &c, err, sizeof err);
    printf("   CUDA backend available: %d; create: %s \"%s\"\n", avail, oscar_status_name(st), err);
    if (avail) {
        CHECKF(st == OSCAR_OK && c, "CUDA available but create failed: %s", err);
    } else {
        CHECKF(st == OSCAR_E_UNSUPPORTED && c == NULL && err[0], "CUDA unavailable: create gave %s, \"%s\"",
               oscar_status_name(st), err);
    }
    oscar_cache_destroy(c);
}

static void test_names(void) {
    CHECK(strcmp(oscar_version(), "0.2.0") == 0);
    static const char *names[] = {"none", "kivi", "quarot", "scale-only", "oscar"};
    for (int m = 0; m < 5; m++) {
        const char *n = oscar_method_name((oscar_method)m);
        CHECKF(n && strcmp(n, names[m]) == 0, "method name %d: %s", m, n ? n : "(null)");
        oscar_method back = (oscar_method)-1;
        CHECK_OK(oscar_method_parse(names[m], &back));
        CHECK(back == (oscar_method)m);
    }
    CHECK(oscar_method_name((oscar_method)5) == NULL && oscar_method_name((oscar_method)-1) == NULL);
    oscar_method mm = OSCAR_METHOD_KIVI;
    CHECK_ST(NULL, oscar_method_parse("bogus", &mm), OSCAR_E_INVALID_ARGUMENT);
    CHECK(mm == OSCAR_METHOD_KIVI);
    CHECK_ST(NULL, oscar_method_parse("", &mm), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_method_parse("oscarx", &mm), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_method_parse(NULL, &mm), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_method_parse("oscar", NULL), OSCAR_E_INVALID_ARGUMENT);
    static const char *st[] = {"OSCAR_OK", "OSCAR_E_INVALID_ARGUMENT", "OSCAR_E_OUT_OF_MEMORY",
                               "OSCAR_E_POOL_EXHAUSTED", "OSCAR_E_NONFINITE", "OSCAR_E_UNSUPPORTED",
                               "OSCAR_E_NOT_FOUND", "OSCAR_E_BACKEND", "OSCAR_E_FORMAT"};
    for (int i = 0; i < 9; i++) {
        const char *n = oscar_status_name((oscar_status)i);
        CHECKF(n && strcmp(n, st[i]) == 0, "status name %d: %s", i, n ? n : "(null)");
    }
    CHECK(oscar_status_name((oscar_status)99) != NULL);
}

/* ---- helpers with bad arguments ---------------------------------------------------------- */

static void test_helpers(void) {
    float x[256];
    for (int i = 0; i < 256; i++) x[i] = (float)i;
    CHECK_ST(NULL, oscar_hadamard(NULL, 1, 64), OSCAR_E_INVALID_ARGUMENT);
    static const int badn[] = {0, -64, 3, 12, 96, 131072, INT_MAX};
    for (size_t i = 0; i < sizeof badn / sizeof badn[0]; i++)
        CHECKF(oscar_hadamard(x, 1, badn[i]) == OSCAR_E_INVALID_ARGUMENT, "hadamard n=%d accepted", badn[i]);
    CHECK_ST(NULL, oscar_hadamard(x, -1, 64), OSCAR_E_INVALID_ARGUMENT);
    CHECK(x[5] == 5.0f);
    CHECK_OK(oscar_hadamard(x, 0, 64));
    CHECK(x[5] == 5.0f);
    float w[2 * 64 * 3];
    CHECK_ST(NULL, oscar_fold_hadamard_wv(NULL, 2, 64, 3), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wv(w, 0, 64, 3), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wv(w, 2, 96, 1), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wv(w, 2, 64, -3), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wo(NULL, 3, 2, 64), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wo(w, -3, 2, 64), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wo(w, 3, 0, 64), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_fold_hadamard_wo(w, 1, 2, 100), OSCAR_E_INVALID_ARGUMENT);
    oscar_cache_destroy(NULL);
    oscar_config cfg;
    CHECK_ST(NULL, oscar_cache_config(NULL, &cfg), OSCAR_E_INVALID_ARGUMENT);
    oscar_memory_stats m;
    CHECK_ST(NULL, oscar_memory(NULL, &m), OSCAR_E_INVALID_ARGUMENT);
    int32_t id;
    CHECK_ST(NULL, oscar_seq_add(NULL, &id), OSCAR_E_INVALID_ARGUMENT);
}

/* ---- a cache with bad calls ------------------------------------------------------------------ */

typedef struct fix {
    oscar_config cfg;
    oscar_cache *c;
    int32_t ids[2];
} fix;

static int fix_make(fix *f, tl_rng *r) {
    f->cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 2, 4);
    f->cfg.num_layers = 2;
    f->cfg.residual = 32;
    f->cfg.block_count = 12;
    f->cfg.max_seqs = 4;
    f->c = tl_create(&f->cfg);
    if (!f->c) return 0;
    float k[40 * 128], v[40 * 128];
    for (int s = 0; s < 2; s++) {
        CHECK_OK(oscar_seq_add(f->c, &f->ids[s]));
        for (int l = 0; l < 2; l++) {
            tl_gen_kv(r, TL_FLAVOR_NORMAL, k, v, 40, 2, 64, OSCAR_DTYPE_F32);
            CHECK_OK(tl_append(f->c, l, f->ids[s], k, v, 35 + s, 2, 64, OSCAR_DTYPE_F32));
        }
    }
    return 1;
}

static int32_t unknown_id(const fix *f) {
    int32_t u = 1000;
    while (u == f->ids[0] || u == f->ids[1]) u++;
    return u;
}

static void test_sequence_calls(void) {
    tl_rng r = tl_rng_for("sequence_calls");
    fix f;
    if (!fix_make(&f, &r)) return;
    oscar_cache *c = f.c;
    cache_snap s;
    snap_take(c, f.ids, 2, &s);
    int32_t u = unknown_id(&f), out = 0;
    oscar_seq_info info;
    oscar_config cfg;
    CHECK_CONST_ST(c, oscar_cache_config(c, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_OK(oscar_cache_config(c, &cfg));
    CHECK(memcmp(&cfg, &f.cfg, sizeof cfg) == 0);
    CHECK_CONST_ST(c, oscar_memory(c, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    EXPECT_FAIL(c, &s, oscar_seq_add(c, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_fork(c, u, &out), OSCAR_E_NOT_FOUND);
    EXPECT_FAIL(c, &s, oscar_seq_fork(c, -1, &out), OSCAR_E_NOT_FOUND);
    EXPECT_FAIL(c, &s, oscar_seq_fork(c, f.ids[0], NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_free(c, u), OSCAR_E_NOT_FOUND);
    EXPECT_FAIL(c, &s, oscar_seq_free(c, -5), OSCAR_E_NOT_FOUND);
    CHECK_CONST_ST(c, oscar_seq_info_get(c, u, 0, &info), OSCAR_E_NOT_FOUND);
    CHECK(snap_same(c, &s));
    CHECK_CONST_ST(c, oscar_seq_info_get(c, f.ids[0], 0, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    CHECK_CONST_ST(c, oscar_seq_info_get(c, f.ids[0], -1, &info), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    CHECK_CONST_ST(c, oscar_seq_info_get(c, f.ids[0], 2, &info), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    CHECK_ST(NULL, oscar_seq_info_get(NULL, f.ids[0], 0, &info), OSCAR_E_INVALID_ARGUMENT);
    int32_t table[4], count = 0;
    CHECK_CONST_ST(c, oscar_seq_block_table(c, u, table, 4, &count), OSCAR_E_NOT_FOUND);
    CHECK(snap_same(c, &s));
    CHECK_CONST_ST(c, oscar_seq_block_table(c, f.ids[0], table, 4, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    CHECK_CONST_ST(c, oscar_seq_block_table(c, f.ids[0], NULL, 4, &count), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    CHECK_CONST_ST(c, oscar_seq_block_table(c, f.ids[0], table, -1, &count), OSCAR_E_INVALID_ARGUMENT);
    CHECK(snap_same(c, &s));
    /* export */
    size_t sz = 0;
    EXPECT_FAIL(c, &s, oscar_seq_export(c, u, NULL, 0, &sz), OSCAR_E_NOT_FOUND);
    EXPECT_FAIL(c, &s, oscar_seq_export(c, f.ids[0], NULL, 0, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_OK(oscar_seq_export(c, f.ids[0], NULL, 0, &sz));
    unsigned char *buf = malloc(sz + 16);
    memset(buf, 0x5a, sz + 16);
    EXPECT_FAIL(c, &s, oscar_seq_export(c, f.ids[0], buf, sz - 1, &sz), OSCAR_E_INVALID_ARGUMENT);
    int untouched = 1;
    for (size_t i = sz - 1; i < sz + 16; i++) untouched &= buf[i] == 0x5a;
    CHECKF(untouched, "a too-small export buffer was written past its size");
    CHECK_OK(oscar_seq_export(c, f.ids[0], buf, sz + 16, &sz));
    CHECK(buf[sz] == 0x5a);
    /* import */
    EXPECT_FAIL(c, &s, oscar_seq_import(c, NULL, sz, &out), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_import(c, buf, sz, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_seq_import(NULL, buf, sz, &out), OSCAR_E_INVALID_ARGUMENT);
    oscar_status st = oscar_seq_import(c, buf, 0, &out);
    CHECKF(st == OSCAR_E_FORMAT || st == OSCAR_E_INVALID_ARGUMENT, "import of 0 bytes: %s", oscar_status_name(st));
    CHECK(snap_same(c, &s));
    free(buf);
    /* double free */
    int32_t extra;
    CHECK_OK(oscar_seq_add(c, &extra));
    CHECK(extra != f.ids[0] && extra != f.ids[1] && extra >= 0);
    CHECK_OK(oscar_seq_free(c, extra));
    EXPECT_FAIL(c, &s, oscar_seq_free(c, extra), OSCAR_E_NOT_FOUND);
    snap_free(&s);
    oscar_cache_destroy(c);
}

static void test_append_calls(void) {
    tl_rng r = tl_rng_for("append_calls");
    fix f;
    if (!fix_make(&f, &r)) return;
    oscar_cache *c = f.c;
    cache_snap s;
    snap_take(c, f.ids, 2, &s);
    int32_t u = unknown_id(&f);
    float k[64 * 128], v[64 * 128];
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 64, 2, 64, OSCAR_DTYPE_F32);
    int32_t one[1] = {f.ids[0]}, n1[1] = {3};
    EXPECT_FAIL(c, &s, oscar_append(c, -1, 1, one, n1, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 2, 1, one, n1, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, -1, one, n1, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, NULL, n1, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, one, NULL, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, one, n1, NULL, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, one, n1, k, NULL, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, one, n1, k, v, (oscar_dtype)3, NULL), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, one, n1, k, v, (oscar_dtype)-1, NULL), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_append(NULL, 0, 1, one, n1, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    int32_t neg[1] = {-1};
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 1, one, neg, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    /* several sequences: a bad one makes the whole call fail */
    int32_t two[2] = {f.ids[0], f.ids[1]}, n2[2] = {3, 4};
    int32_t dup[2] = {f.ids[1], f.ids[1]};
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 2, dup, n2, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    int32_t withu[2] = {f.ids[0], u};
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 2, withu, n2, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_NOT_FOUND);
    int32_t nneg[2] = {3, -4};
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 2, two, nneg, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_INVALID_ARGUMENT);
    /* NaN / Inf anywhere in K or V, any dtype: rejected, nothing appended */
    for (int dt = 0; dt < 3; dt++)
        for (int which = 0; which < 4; which++) {
            float kk[7 * 128], vv[7 * 128];
            memcpy(kk, k, sizeof kk);
            memcpy(vv, v, sizeof vv);
            int pos = 3 * 128 + 5 + 37 * which + 11 * dt; /* in the second sequence's tokens */
            float bad = which == 0 ? NAN : which == 1 ? INFINITY : which == 2 ? -INFINITY : NAN;
            if (which == 3)
                vv[6 * 128 + 127] = -INFINITY; /* the very last element */
            else if (which % 2)
                vv[pos] = bad;
            else
                kk[pos] = bad;
            size_t es = (size_t)tl_dtype_size((oscar_dtype)dt);
            void *kb = malloc(7 * 128 * es), *vb = malloc(7 * 128 * es);
            tl_encode(kk, (oscar_dtype)dt, kb, 7 * 128);
            tl_encode(vv, (oscar_dtype)dt, vb, 7 * 128);
            if (dt == OSCAR_DTYPE_F16) { /* the test's fp16 encoder saturates: write Inf bits directly */
                if (which == 1) ((uint16_t *)vb)[pos] = 0x7c00;
                if (which == 2) ((uint16_t *)kb)[pos] = 0xfc00;
                if (which == 3) ((uint16_t *)vb)[6 * 128 + 127] = 0xfc00;
            }
            EXPECT_FAIL(c, &s, oscar_append(c, 0, 2, two, n2, kb, vb, (oscar_dtype)dt, NULL), OSCAR_E_NONFINITE);
            free(kb);
            free(vb);
        }
    /* NaN in a token that would complete a block: no block is taken */
    {
        float kk[64 * 128];
        memcpy(kk, k, sizeof kk);
        kk[(64 - 1) * 128] = NAN;
        int32_t n64[1] = {64};
        EXPECT_FAIL(c, &s, oscar_append(c, 1, 1, one, n64, kk, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_NONFINITE);
    }
    /* a huge token count must not be read or wrapped (check_finite off so
     * that nothing needs to be scanned) */
    {
        oscar_config c2 = f.cfg;
        c2.check_finite = 0;
        oscar_cache *cc = tl_create(&c2);
        if (cc) {
            int32_t a, b;
            CHECK_OK(oscar_seq_add(cc, &a));
            CHECK_OK(oscar_seq_add(cc, &b));
            CHECK_OK(tl_append(cc, 0, a, k, v, 5, 2, 64, OSCAR_DTYPE_F32));
            int32_t ids2[2] = {a, b};
            cache_snap s2;
            snap_take(cc, ids2, 2, &s2);
            int32_t big[1] = {INT32_MAX};
            oscar_status st = oscar_append(cc, 0, 1, &a, big, k, v, OSCAR_DTYPE_F32, NULL);
            CHECKF(st == OSCAR_E_POOL_EXHAUSTED || st == OSCAR_E_INVALID_ARGUMENT, "INT32_MAX tokens: %s",
                   oscar_status_name(st));
            CHECK(snap_same(cc, &s2) && oscar_last_error(cc)[0]);
            int32_t big2[2] = {INT32_MAX, INT32_MAX};
            st = oscar_append(cc, 0, 2, ids2, big2, k, v, OSCAR_DTYPE_F32, NULL);
            CHECKF(st == OSCAR_E_POOL_EXHAUSTED || st == OSCAR_E_INVALID_ARGUMENT, "2 x INT32_MAX tokens: %s",
                   oscar_status_name(st));
            CHECK(snap_same(cc, &s2));
            snap_free(&s2);
            oscar_cache_destroy(cc);
        }
    }
    /* valid calls still work, and n_tokens 0 is a no-op */
    int32_t zero[2] = {0, 0};
    CHECK_OK(oscar_append(c, 0, 2, two, zero, k, v, OSCAR_DTYPE_F32, NULL));
    CHECK(snap_same(c, &s));
    CHECK_OK(oscar_append(c, 0, 2, two, n2, k, v, OSCAR_DTYPE_F32, NULL));
    oscar_seq_info info;
    CHECK_OK(oscar_seq_info_get(c, f.ids[1], 0, &info));
    CHECK(info.tokens == 36 + 4);
    snap_free(&s);
    oscar_cache_destroy(c);
}

static void test_attention_and_read_calls(void) {
    tl_rng r = tl_rng_for("attention_and_read_calls");
    fix f;
    if (!fix_make(&f, &r)) return;
    oscar_cache *c = f.c;
    int32_t empty;
    CHECK_OK(oscar_seq_add(c, &empty));
    int32_t all[3] = {f.ids[0], f.ids[1], empty};
    cache_snap s;
    snap_take(c, all, 3, &s);
    int32_t u = unknown_id(&f);
    float q[40 * 4 * 64], o[40 * 4 * 64];
    tl_fill_normal(&r, q, 40 * 4 * 64, 1.0);
    int32_t one[1] = {f.ids[0]}, two[2] = {f.ids[0], f.ids[1]};
    EXPECT_FAIL(c, &s, oscar_attention(c, -1, 1, one, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 2, 1, one, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, -1, one, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, NULL, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, 0, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, -2, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, 36, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT); /* 35 tokens */
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 2, two, 36, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT); /* one of them has 36 */
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, &empty, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, INT_MAX, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, 1, NULL, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, 1, q, OSCAR_DTYPE_F32, NULL, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, 1, q, (oscar_dtype)3, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 1, one, 1, q, OSCAR_DTYPE_F32, o, (oscar_dtype)-1, 0, NULL),
                OSCAR_E_INVALID_ARGUMENT);
    int32_t withu[2] = {f.ids[0], u};
    EXPECT_FAIL(c, &s, oscar_attention(c, 0, 2, withu, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
                OSCAR_E_NOT_FOUND);
    CHECK_ST(NULL, oscar_attention(NULL, 0, 1, one, 1, q, OSCAR_DTYPE_F32, o, OSCAR_DTYPE_F32, 0, NULL),
             OSCAR_E_INVALID_ARGUMENT);
    /* q_len == tokens is fine */
    CHECK_OK(tl_attention(c, 0, 1, one, 35, q, OSCAR_DTYPE_F32, OSCAR_DTYPE_F32, 0.0f, o, 4, 64));
    CHECK(tl_count_nonfinite(o, 35 * 4 * 64) == 0);
    /* seq_read */
    float kb[40 * 128], vb[40 * 128];
    EXPECT_FAIL(c, &s, oscar_seq_read(c, u, 0, 0, 1, kb, vb), OSCAR_E_NOT_FOUND);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], -1, 0, 1, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 2, 0, 1, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 0, -1, 1, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 0, 0, -1, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 0, 30, 6, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 0, 36, 0, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 0, 1, INT64_MAX, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    EXPECT_FAIL(c, &s, oscar_seq_read(c, f.ids[0], 0, INT64_MAX, 2, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    CHECK_ST(NULL, oscar_seq_read(NULL, f.ids[0], 0, 0, 1, kb, vb), OSCAR_E_INVALID_ARGUMENT);
    /* partial reads equal the corresponding part of a full read; NULL outputs */
    float *fk, *fv;
    if (tl_read_all(c, f.ids[0], 0, 2, 64, &fk, &fv) == 35) {
        tl_poison(kb, 40 * 128);
        tl_poison(vb, 40 * 128);
        CHECK_OK(oscar_seq_read(c, f.ids[0], 0, 30, 5, kb, NULL));
        CHECK(memcmp(kb, fk + 30 * 128, 5 * 128 * sizeof(float)) == 0 && isnan(kb[5 * 128]));
        CHECK_OK(oscar_seq_read(c, f.ids[0], 0, 3, 0, kb, vb));
        CHECK_OK(oscar_seq_read(c, f.ids[0], 0, 35, 0, kb, vb));
        CHECK_OK(oscar_seq_read(c, f.ids[0], 0, 0, 35, NULL, NULL));
        CHECK_OK(oscar_seq_read(c, f.ids[0], 0, 31, 4, NULL, vb));
        CHECK(memcmp(vb, fv + 31 * 128, 4 * 128 * sizeof(float)) == 0);
    }
    free(fk);
    free(fv);
    CHECK(snap_same(c, &s));
    snap_free(&s);
    oscar_cache_destroy(c);
}

/* ---- exhaustion ------------------------------------------------------------------------------- */

static void test_pool_exhaustion(void) {
    tl_rng r = tl_rng_for("pool_exhaustion");
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, 64, 2, 4);
    cfg.num_layers = 2;
    cfg.residual = 32;
    cfg.block_count = 3;
    cfg.max_seqs = 3;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    float k[100 * 128], v[100 * 128];
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 100, 2, 64, OSCAR_DTYPE_F32);
    int32_t a, b;
    CHECK_OK(oscar_seq_add(c, &a));
    CHECK_OK(oscar_seq_add(c, &b));
    CHECK_OK(tl_append(c, 0, a, k, v, 2 * 32 + 31, 2, 64, OSCAR_DTYPE_F32)); /* 2 blocks + 31 */
    CHECK_OK(tl_append(c, 0, b, k, v, 20, 2, 64, OSCAR_DTYPE_F32));
    CHECK_OK(tl_append(c, 1, b, k, v, 20, 2, 64, OSCAR_DTYPE_F32));
    int32_t ids[2] = {a, b};
    cache_snap s;
    snap_take(c, ids, 2, &s);
    CHECK(s.m.blocks_free == 1);
    /* a needs 1 block, b needs 2: only 1 free -> nothing appended to either */
    int32_t n[2] = {1, 50};
    EXPECT_FAIL(c, &s, oscar_append(c, 0, 2, ids, n, k, v, OSCAR_DTYPE_F32, NULL), OSCAR_E_POOL_EXHAUSTED);
    /* layer 1 of a: its blocks are the same block ids, no new block needed up to 2 blocks */
    CHECK_OK(tl_append(c, 1, a, k, v, 64, 2, 64, OSCAR_DTYPE_F32));
    oscar_memory_stats m;
    CHECK_OK(oscar_memory(c, &m));
    CHECKF(m.blocks_free == 1, "layer 1 took new blocks (free %lld)", (long long)m.blocks_free);
    snap_free(&s);
    snap_take(c, ids, 2, &s);
    EXPECT_FAIL(c, &s, tl_append(c, 1, a, k, v, 100, 2, 64, OSCAR_DTYPE_F32), OSCAR_E_POOL_EXHAUSTED);
    /* import of a stream needing more blocks than free */
    size_t sz = 0;
    unsigned char *buf = tl_export(c, a, &sz);
    if (buf) EXPECT_FAIL(c, &s, oscar_seq_import(c, buf, sz, &(int32_t){0}), OSCAR_E_POOL_EXHAUSTED);
    /* fork needs no block */
    int32_t fk;
    CHECK_OK(oscar_seq_fork(c, b, &fk));
    /* a fitting append works; then the pool is full */
    CHECK_OK(tl_append(c, 0, a, k, v, 1, 2, 64, OSCAR_DTYPE_F32));
    CHECK_OK(oscar_memory(c, &m));
    CHECK(m.blocks_free == 0 && m.blocks_used == 3);
    int32_t ids3[3] = {a, b, fk};
    snap_free(&s);
    snap_take(c, ids3, 3, &s);
    EXPECT_FAIL(c, &s, tl_append(c, 0, fk, k, v, 12, 2, 64, OSCAR_DTYPE_F32), OSCAR_E_POOL_EXHAUSTED);
    /* freeing returns blocks */
    CHECK_OK(oscar_seq_free(c, a));
    CHECK_OK(oscar_memory(c, &m));
    CHECK(m.blocks_free == 3);
    CHECK_OK(tl_append(c, 0, fk, k, v, 12, 2, 64, OSCAR_DTYPE_F32));
    CHECK_OK(oscar_memory(c, &m));
    CHECK(m.blocks_free == 2);
    CHECK(!tl_same_export(c, b, c, fk));
    free(buf);
    snap_free(&s);
    oscar_cache_destroy(c);
}

static void test_seq_exhaustion(void) {
    tl_rng r = tl_rng_for("seq_exhaustion");
    oscar_config cfg = tl_small_config(OSCAR_METHOD_KIVI, 2, 64, 1, 1);
    cfg.max_seqs = 2;
    cfg.block_count = 8;
    oscar_cache *c = tl_create(&cfg);
    if (!c) return;
    float k[10 * 64], v[10 * 64];
    tl_gen_kv(&r, TL_FLAVOR_NORMAL, k, v, 10, 1, 64, OSCAR_DTYPE_F32);
    int32_t a, b, x = -7;
    CHECK_OK(oscar_seq_add(c, &a));
    CHECK_OK(oscar_seq_add(c, &b));
    CHECK_OK(tl_append(c, 0, a, k, v, 10, 1, 64, OSCAR_DTYPE_F32));
    int32_t ids[2] = {a, b};
    cache_snap s;
    snap_take(c, ids, 2, &s);
    EXPECT_FAIL(c, &s, oscar_seq_add(c, &x), OSCAR_E_POOL_EXHAUSTED);
    EXPECT_FAIL(c, &s, oscar_seq_fork(c, a, &x), OSCAR_E_POOL_EXHAUSTED);
    size_t sz = 0;
    unsigned char *buf = tl_export(c, a, &sz);
    if (buf) EXPECT_FAIL(c, &s, oscar_seq_import(c, buf, sz, &x), OSCAR_E_POOL_EXHAUSTED);
    CHECK_OK(oscar_seq_free(c, b));
    CHECK_OK(oscar_seq_import(c, buf, sz, &x));
    CHECK(tl_same_export(c, a, c, x));
    free(buf);
    snap_free(&s);
    oscar_cache_destroy(c);
}

int main(void) {
    printf("oscar %s, test_bad_input\n", oscar_version());
    TL_RUN(test_bad_configs);
    TL_RUN(test_cuda_unavailable);
    TL_RUN(test_names);
    TL_RUN(test_helpers);
    TL_RUN(test_sequence_calls);
    TL_RUN(test_append_calls);
    TL_RUN(test_attention_and_read_calls);
    TL_RUN(test_pool_exhaustion);
    TL_RUN(test_seq_exhaustion);
    return tl_finish();
}
