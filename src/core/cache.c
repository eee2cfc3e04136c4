/* The library core: configuration, the block pool's bookkeeping, sequences,
 * argument validation and error messages. Everything here runs on the host
 * and is shared by both backends; the backends only move bytes. */
#include "internal.h"

#include <limits.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *oscar_version(void) { return "0.2.0"; }

const char *oscar_status_name(oscar_status s) {
    switch (s) {
    case OSCAR_OK: return "OSCAR_OK";
    case OSCAR_E_INVALID_ARGUMENT: return "OSCAR_E_INVALID_ARGUMENT";
    case OSCAR_E_OUT_OF_MEMORY: return "OSCAR_E_OUT_OF_MEMORY";
    case OSCAR_E_POOL_EXHAUSTED: return "OSCAR_E_POOL_EXHAUSTED";
    case OSCAR_E_NONFINITE: return "OSCAR_E_NONFINITE";
    case OSCAR_E_UNSUPPORTED: return "OSCAR_E_UNSUPPORTED";
    case OSCAR_E_NOT_FOUND: return "OSCAR_E_NOT_FOUND";
    case OSCAR_E_BACKEND: return "OSCAR_E_BACKEND";
    case OSCAR_E_FORMAT: return "OSCAR_E_FORMAT";
    }
    return "OSCAR_E_UNKNOWN";
}

static const char *const method_names[] = {"none", "kivi", "quarot", "scale-only", "oscar"};

const char *oscar_method_name(oscar_method m) {
    if ((int)m < 0 || (int)m > 4) return NULL;
    return method_names[m];
}

oscar_status oscar_method_parse(const char *name, oscar_method *out) {
    if (!name || !out) return OSCAR_E_INVALID_ARGUMENT;
    for (int i = 0; i < 5; i++)
        if (strcmp(name, method_names[i]) == 0) {
            *out = (oscar_method)i;
            return OSCAR_OK;
        }
    return OSCAR_E_INVALID_ARGUMENT;
}

int oscar_backend_available(oscar_backend b) {
    if (b == OSCAR_BACKEND_CPU) return 1;
    if (b == OSCAR_BACKEND_CUDA) return oscar_cuda_backend_ops() != NULL && oscar_cuda_device_available();
    return 0;
}

oscar_config oscar_config_default(void) {
    oscar_config c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof(oscar_config);
    c.method = OSCAR_METHOD_OSCAR;
    c.bits = 2;
    c.head_dim = 128;
    c.num_kv_heads = 8;
    c.num_q_heads = 32;
    c.num_layers = 1;
    c.k_group = 32;
    c.v_group = 32;
    c.residual = 128;
    c.window_dtype = OSCAR_DTYPE_F16;
    c.rotate_values = 1;
    c.block_count = 1024;
    c.max_seqs = 64;
    c.backend = OSCAR_BACKEND_CPU;
    c.device = 0;
    c.num_threads = 0;
    c.check_finite = 1;
    c.rollback_tokens = 0;
    c.caller_metadata = 0;
    c.sink_tokens = 0;
    c.clip_search = 0;
    c.key_norm_per_head = 0;
    c.key_bits = 0;
    c.value_bits = 0;
    return c;
}

oscar_status oscar_set_error(oscar_cache *c, oscar_status status, const char *fmt, ...) {
    if (c) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, sizeof c->err, fmt, ap);
        va_end(ap);
    }
    return status;
}

static oscar_status errbuf_set(char *buf, size_t n, oscar_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
static oscar_status errbuf_set(char *buf, size_t n, oscar_status s, const char *fmt, ...) {
    if (buf && n > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, n, fmt, ap);
        va_end(ap);
    }
    return s;
}

void oscar_layout_init(oscar_layout *lay, const oscar_config *cfg) {
    memset(lay, 0, sizeof *lay);
    lay->d = cfg->head_dim;
    lay->hkv = cfg->num_kv_heads;
    lay->hq = cfg->num_q_heads;
    lay->layers = cfg->num_layers;
    lay->quantised = cfg->method != OSCAR_METHOD_NONE;
    lay->kbits = lay->quantised ? (cfg->key_bits ? cfg->key_bits : cfg->bits) : 16;
    lay->vbits = lay->quantised ? (cfg->value_bits ? cfg->value_bits : cfg->bits) : 16;
    lay->klevels = lay->quantised ? (1 << lay->kbits) - 1 : 0;
    lay->vlevels = lay->quantised ? (1 << lay->vbits) - 1 : 0;
    lay->bits = lay->kbits;
    lay->levels = lay->klevels;
    lay->k_group = cfg->k_group;
    lay->v_group = cfg->v_group;
    lay->residual = cfg->residual;
    lay->rotate = cfg->method == OSCAR_METHOD_QUAROT || cfg->method == OSCAR_METHOD_OSCAR;
    lay->rotate_v = lay->rotate && cfg->rotate_values;
    lay->scale_keys = cfg->method == OSCAR_METHOD_SCALE_ONLY || cfg->method == OSCAR_METHOD_OSCAR;
    lay->window_esize = oscar_dtype_size(cfg->window_dtype);
    lay->window_dtype = (int)cfg->window_dtype;
    size_t R = (size_t)cfg->residual, d = (size_t)cfg->head_dim;
    if (lay->quantised) {
        lay->kcodes_bytes = R * d * (size_t)lay->kbits / 8;
        lay->vcodes_bytes = R * d * (size_t)lay->vbits / 8;
        lay->kparams_bytes = (R / (size_t)cfg->k_group) * d * 4;
        lay->vparams_bytes = R * (d / (size_t)cfg->v_group) * 4;
        lay->head_bytes = lay->kcodes_bytes + lay->vcodes_bytes + lay->kparams_bytes + lay->vparams_bytes;
        lay->norm_per_head = lay->scale_keys && cfg->key_norm_per_head;
        lay->norms_bytes = lay->scale_keys ? R * 4 * (lay->norm_per_head ? (size_t)cfg->num_kv_heads : 1) : 0;
    } else {
        lay->head_bytes = 2 * R * d * (size_t)lay->window_esize;
    }
    lay->layer_block_bytes = (size_t)lay->hkv * lay->head_bytes + lay->norms_bytes;
    lay->lag = cfg->rollback_tokens;
    lay->window_rows = cfg->residual + cfg->rollback_tokens;
    lay->sinks = cfg->sink_tokens;
    lay->clip = cfg->clip_search;
    /* per slot and layer: K [sinks + window_rows][Hkv][d], then V the same */
    lay->window_layer_bytes =
        2 * (size_t)(lay->sinks + lay->window_rows) * (size_t)lay->hkv * d * (size_t)lay->window_esize;
    lay->window_ss_offset = lay->window_layer_bytes * (size_t)cfg->num_layers * (size_t)cfg->max_seqs;
    lay->windows_bytes = lay->window_ss_offset + (size_t)lay->window_rows * sizeof(float) * (size_t)cfg->num_layers *
                                                     (size_t)cfg->max_seqs;
}

/* The size of oscar_config before sink_tokens and clip_search (format
 * version 2): a caller compiled against that header passes it. */
#define CONFIG_SIZE_V2 offsetof(oscar_config, sink_tokens)
/* The same for the version-3 header (before key_norm_per_head, key_bits and
 * value_bits): its fields end at CONFIG_SIZE_V3, and its sizeof, which
 * callers that copy sizeof(oscar_config) pass (ctypes does), rounds that up
 * to the struct's alignment (96 bytes on LP64). */
#define CONFIG_SIZE_V3 offsetof(oscar_config, key_norm_per_head)
#define CONFIG_SIZEOF_V3                                                                                              \
    ((CONFIG_SIZE_V3 + _Alignof(oscar_config) - 1) / _Alignof(oscar_config) * _Alignof(oscar_config))
/* The prefix of oscar_config an older caller's struct_size gives (0: none). */
static size_t config_prefix(size_t struct_size) {
    if (struct_size == CONFIG_SIZE_V2) return CONFIG_SIZE_V2;
    if (struct_size == CONFIG_SIZE_V3 || struct_size == CONFIG_SIZEOF_V3) return CONFIG_SIZE_V3;
    return 0;
}

/* A caller's config as this library's struct: the fields an older caller
 * does not have read as 0 (their defaults). NULL if struct_size is neither
 * size; then oscar_config_validate says why. */
static const oscar_config *config_in(const oscar_config *c, oscar_config *tmp) {
    if (!c) return NULL;
    if (c->struct_size == sizeof(oscar_config)) return c;
    const size_t prefix = config_prefix(c->struct_size);
    if (!prefix) return NULL;
    memset(tmp, 0, sizeof *tmp);
    memcpy(tmp, c, prefix);
    tmp->struct_size = sizeof(oscar_config);
    return tmp;
}

static oscar_status config_check(const oscar_config *c, char *eb, size_t en);

oscar_status oscar_config_validate(const oscar_config *c, char *eb, size_t en) {
    const oscar_status E = OSCAR_E_INVALID_ARGUMENT;
    if (!c) return errbuf_set(eb, en, E, "config is NULL");
    oscar_config tmp;
    const oscar_config *n = config_in(c, &tmp);
    if (!n)
        return errbuf_set(eb, en, E,
                          "config.struct_size is %zu, this library's oscar_config has %zu bytes (or %zu, the "
                          "layout before sink_tokens, or %zu / %zu, the layout before key_norm_per_head): start "
                          "from oscar_config_default() (it sets struct_size)",
                          c->struct_size, sizeof(oscar_config), (size_t)CONFIG_SIZE_V2, (size_t)CONFIG_SIZE_V3,
                          (size_t)CONFIG_SIZEOF_V3);
    return config_check(n, eb, en);
}

static oscar_status config_check(const oscar_config *c, char *eb, size_t en) {
    const oscar_status E = OSCAR_E_INVALID_ARGUMENT;
    if ((int)c->method < 0 || (int)c->method > 4)
        return errbuf_set(eb, en, E, "method %d is not one of none, kivi, quarot, scale-only, oscar", (int)c->method);
    if (c->method != OSCAR_METHOD_NONE && c->bits != 2 && c->bits != 4)
        return errbuf_set(eb, en, E, "bits must be 2 or 4, got %d", c->bits);
    if (c->head_dim != 64 && c->head_dim != 128 && c->head_dim != 256)
        return errbuf_set(eb, en, E, "head_dim must be 64, 128 or 256, got %d", c->head_dim);
    if (c->num_kv_heads < 1 || c->num_kv_heads > 1024)
        return errbuf_set(eb, en, E, "num_kv_heads must be in 1..1024, got %d", c->num_kv_heads);
    if (c->num_q_heads < 1 || c->num_q_heads > 8192 || c->num_q_heads % c->num_kv_heads != 0)
        return errbuf_set(eb, en, E, "num_q_heads (%d) must be a positive multiple of num_kv_heads (%d)",
                          c->num_q_heads, c->num_kv_heads);
    if (c->num_layers < 1 || c->num_layers > 4096)
        return errbuf_set(eb, en, E, "num_layers must be in 1..4096, got %d", c->num_layers);
    if (c->residual < 16 || c->residual > 4096 || c->residual % 16 != 0)
        return errbuf_set(eb, en, E, "residual (R) must be a multiple of 16 in 16..4096, got %d", c->residual);
    if (c->k_group < 16 || c->k_group % 16 != 0 || c->residual % c->k_group != 0)
        return errbuf_set(eb, en, E, "k_group must be a multiple of 16 that divides residual %d, got %d",
                          c->residual, c->k_group);
    if (c->v_group < 16 || c->v_group % 16 != 0 || c->head_dim % c->v_group != 0)
        return errbuf_set(eb, en, E, "v_group must be a multiple of 16 that divides head_dim %d, got %d",
                          c->head_dim, c->v_group);
    if ((int)c->window_dtype < 0 || (int)c->window_dtype > 2)
        return errbuf_set(eb, en, E, "window_dtype %d is not F32, F16 or BF16", (int)c->window_dtype);
    if (c->rotate_values != 0 && c->rotate_values != 1)
        return errbuf_set(eb, en, E, "rotate_values must be 0 or 1, got %d", c->rotate_values);
    if (c->check_finite != 0 && c->check_finite != 1)
        return errbuf_set(eb, en, E, "check_finite must be 0 or 1, got %d", c->check_finite);
    if (c->rollback_tokens < 0 || c->rollback_tokens > c->residual)
        return errbuf_set(eb, en, E, "rollback_tokens must be in 0..residual (%d), got %d", c->residual,
                          c->rollback_tokens);
    if (c->caller_metadata != 0 && c->caller_metadata != 1)
        return errbuf_set(eb, en, E, "caller_metadata must be 0 or 1, got %d", c->caller_metadata);
    if (c->sink_tokens < 0 || c->sink_tokens > 4096)
        return errbuf_set(eb, en, E, "sink_tokens must be in 0..4096, got %d", c->sink_tokens);
    if (c->clip_search != 0 && c->clip_search != 1)
        return errbuf_set(eb, en, E, "clip_search must be 0 or 1, got %d", c->clip_search);
    if (c->key_norm_per_head != 0 && c->key_norm_per_head != 1)
        return errbuf_set(eb, en, E,
                          "key_norm_per_head must be 0 (one key norm per token over all KV heads, as published) or "
                          "1 (one per token and KV head), got %d",
                          c->key_norm_per_head);
    if (c->key_bits != 0 && (c->key_bits < 2 || c->key_bits > 4))
        return errbuf_set(eb, en, E, "key_bits must be 0 (use bits = %d), 2, 3 or 4, got %d", c->bits, c->key_bits);
    if (c->value_bits != 0 && (c->value_bits < 2 || c->value_bits > 4))
        return errbuf_set(eb, en, E, "value_bits must be 0 (use bits = %d), 2, 3 or 4, got %d", c->bits,
                          c->value_bits);
    if (c->block_count < 1)
        return errbuf_set(eb, en, E, "block_count must be >= 1, got %d", c->block_count);
    if (c->max_seqs < 1 || c->max_seqs > (1 << 20))
        return errbuf_set(eb, en, E, "max_seqs must be in 1..1048576, got %d", c->max_seqs);
    if ((int)c->backend != OSCAR_BACKEND_CPU && (int)c->backend != OSCAR_BACKEND_CUDA)
        return errbuf_set(eb, en, E, "backend %d is not CPU or CUDA", (int)c->backend);
    if (c->num_threads < 0 || c->num_threads > 4096)
        return errbuf_set(eb, en, E, "num_threads must be in 0..4096, got %d", c->num_threads);
    if (c->device < 0) return errbuf_set(eb, en, E, "device must be >= 0, got %d", c->device);
    oscar_layout lay;
    oscar_layout_init(&lay, c);
    /* Keep every byte offset of the pool and the windows inside int64. */
    double pool = (double)lay.layer_block_bytes * c->num_layers * c->block_count;
    double win = (double)lay.windows_bytes;
    if (pool > 0x1p60 || win > 0x1p60)
        return errbuf_set(eb, en, E, "pool of %d blocks x %d layers (%.3g bytes) is too large",
                          c->block_count, c->num_layers, pool + win);
    return OSCAR_OK;
}

oscar_status oscar_config_packed_bits(const oscar_config *cin, double *bits) {
    if (oscar_config_validate(cin, NULL, 0) != OSCAR_OK || !bits) return OSCAR_E_INVALID_ARGUMENT;
    oscar_config tmp;
    const oscar_config *c = config_in(cin, &tmp);
    oscar_layout lay;
    oscar_layout_init(&lay, c);
    double elements = 2.0 * c->residual * c->head_dim * c->num_kv_heads;
    *bits = 8.0 * (double)lay.layer_block_bytes / elements;
    return OSCAR_OK;
}

static oscar_status backend_of(const oscar_config *cfg, const oscar_backend_ops **ops, char *eb, size_t en) {
    *ops = &oscar_cpu_backend_ops;
    if (cfg->backend == OSCAR_BACKEND_CUDA) {
        *ops = oscar_cuda_backend_ops();
        if (!*ops)
            return errbuf_set(eb, en, OSCAR_E_UNSUPPORTED,
                              "the CUDA backend was not built into this library (nvcc missing or OSCAR_CUDA=OFF)");
        if (!oscar_cuda_device_available())
            return errbuf_set(eb, en, OSCAR_E_UNSUPPORTED, "the CUDA backend is built but no CUDA device is usable");
    }
    return OSCAR_OK;
}

oscar_status oscar_memory_requirements_get(const oscar_config *cin, oscar_memory_requirements *out, char *eb,
                                           size_t en) {
    if (!out) return errbuf_set(eb, en, OSCAR_E_INVALID_ARGUMENT, "memory_requirements: out is NULL");
    oscar_status st = oscar_config_validate(cin, eb, en);
    if (st != OSCAR_OK) return st;
    oscar_config tmp;
    const oscar_config *cfg = config_in(cin, &tmp);
    const oscar_backend_ops *ops;
    if ((st = backend_of(cfg, &ops, eb, en)) != OSCAR_OK) return st;
    return ops->requirements(cfg, out, eb, en);
}

oscar_status oscar_cache_create(const oscar_config *cfg, oscar_cache **out, char *eb, size_t en) {
    return oscar_cache_create_with_memory(cfg, NULL, out, eb, en);
}

oscar_status oscar_cache_create_with_memory(const oscar_config *cin, const oscar_memory_source *mem,
                                            oscar_cache **out, char *eb, size_t en) {
    if (!out) return errbuf_set(eb, en, OSCAR_E_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    oscar_status st = oscar_config_validate(cin, eb, en);
    if (st != OSCAR_OK) return st;
    oscar_config tmp;
    const oscar_config *cfg = config_in(cin, &tmp);
    const oscar_backend_ops *ops;
    if ((st = backend_of(cfg, &ops, eb, en)) != OSCAR_OK) return st;
    if (mem) {
        const void *regions[3] = {mem->pool, mem->windows, mem->workspace};
        static const char *const names[3] = {"pool", "windows", "workspace"};
        for (int i = 0; i < 3; i++)
            if (((uintptr_t)regions[i]) % 256 != 0)
                return errbuf_set(eb, en, OSCAR_E_INVALID_ARGUMENT, "memory source: %s %p is not 256-byte aligned",
                                  names[i], regions[i]);
        if (mem->allocator && (!mem->allocator->alloc || !mem->allocator->free))
            return errbuf_set(eb, en, OSCAR_E_INVALID_ARGUMENT, "memory source: allocator needs alloc and free");
    }
    oscar_cache *c = (oscar_cache *)OSCAR_CALLOC(1, sizeof *c);
    if (!c) return errbuf_set(eb, en, OSCAR_E_OUT_OF_MEMORY, "out of host memory for the cache handle");
    c->cfg = *cfg;
    oscar_layout_init(&c->lay, cfg);
    c->ops = ops;
    c->seqs = (oscar_seq *)OSCAR_CALLOC((size_t)cfg->max_seqs, sizeof(oscar_seq));
    c->block_refs = (int32_t *)OSCAR_CALLOC((size_t)cfg->block_count, sizeof(int32_t));
    c->free_list = (int32_t *)OSCAR_MALLOC((size_t)cfg->block_count * sizeof(int32_t));
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)cfg->max_seqs) cap *= 2;
    c->id_mask = cap - 1;
    c->id_keys = (int32_t *)OSCAR_MALLOC(sizeof(int32_t) * cap);
    c->id_slots = (int32_t *)OSCAR_MALLOC(sizeof(int32_t) * cap);
    c->free_slots = (int32_t *)OSCAR_MALLOC(sizeof(int32_t) * (size_t)cfg->max_seqs);
    c->stamp = (uint32_t *)OSCAR_CALLOC((size_t)cfg->max_seqs, sizeof(uint32_t));
    if (!c->seqs || !c->block_refs || !c->free_list || !c->id_keys || !c->id_slots || !c->free_slots || !c->stamp) {
        oscar_cache_destroy(c);
        return errbuf_set(eb, en, OSCAR_E_OUT_OF_MEMORY, "out of host memory for %d sequence slots / %d blocks",
                          cfg->max_seqs, cfg->block_count);
    }
    for (int i = 0; i < cfg->max_seqs; i++) c->seqs[i].id = -1;
    for (uint32_t i = 0; i < cap; i++) c->id_keys[i] = -1;
    /* pop order hands out slot 0 first */
    for (int i = 0; i < cfg->max_seqs; i++) c->free_slots[i] = cfg->max_seqs - 1 - i;
    c->n_free_slots = cfg->max_seqs;
    /* Pop order hands out block 0 first, which keeps small caches easy to read. */
    for (int i = 0; i < cfg->block_count; i++) c->free_list[i] = cfg->block_count - 1 - i;
    c->n_free = cfg->block_count;
    st = ops->init(c, mem);
    if (st != OSCAR_OK) {
        errbuf_set(eb, en, st, "%s backend: %s", ops->name, c->err);
        c->ops = NULL; /* init cleaned up after itself */
        oscar_cache_destroy(c);
        return st;
    }
    c->err[0] = 0;
    *out = c;
    return OSCAR_OK;
}

void oscar_cache_destroy(oscar_cache *c) {
    if (!c) return;
    if (c->ops && c->backend_state) c->ops->destroy(c);
    if (c->seqs) {
        for (int i = 0; i < c->cfg.max_seqs; i++) {
            free(c->seqs[i].table);
            free(c->seqs[i].tokens);
            free(c->seqs[i].packed);
        }
    }
    free(c->seqs);
    free(c->block_refs);
    free(c->free_list);
    free(c->id_keys);
    free(c->id_slots);
    free(c->free_slots);
    free(c->stamp);
    free(c);
}

/* The const calls below only read the handle: they report failures by their
 * status alone and never touch the error message, so that concurrent
 * readers are safe (oscar.h, "Thread safety"). */
oscar_status oscar_cache_config(const oscar_cache *c, oscar_config *out) {
    if (!c || !out) return OSCAR_E_INVALID_ARGUMENT;
    const size_t prefix = out->struct_size == sizeof(oscar_config) ? 0 : config_prefix(out->struct_size);
    if (prefix) { /* a caller of an older header: its fields only */
        const size_t given = out->struct_size;
        memcpy(out, &c->cfg, prefix);
        out->struct_size = given;
        return OSCAR_OK;
    }
    *out = c->cfg;
    return OSCAR_OK;
}

const char *oscar_last_error(const oscar_cache *c) { return c ? c->err : "cache handle is NULL"; }

/* ---- sequences ---------------------------------------------------------- */

static uint32_t id_hash(int32_t id) { return (uint32_t)id * 2654435761u; }

int oscar_find_seq_slot(const oscar_cache *c, int32_t id) {
    if (id < 0) return -1;
    uint32_t h = id_hash(id) & c->id_mask;
    for (uint32_t n = 0; n <= c->id_mask; n++, h = (h + 1) & c->id_mask) {
        if (c->id_keys[h] == id) return c->id_slots[h];
        if (c->id_keys[h] == -1) return -1;
    }
    return -1;
}

/* Ids are never reused, so deleted entries pile up; past 3/4 of the table
 * it is rebuilt from the live sequences (amortised O(1) per call). */
static void id_rebuild(oscar_cache *c) {
    for (uint32_t i = 0; i <= c->id_mask; i++) c->id_keys[i] = -1;
    c->id_used = 0;
    for (int s = 0; s < c->cfg.max_seqs; s++) {
        const int32_t id = c->seqs[s].id;
        if (id < 0) continue;
        uint32_t h = id_hash(id) & c->id_mask;
        while (c->id_keys[h] != -1) h = (h + 1) & c->id_mask;
        c->id_keys[h] = id;
        c->id_slots[h] = s;
        c->id_used++;
    }
}

int oscar_free_seq_slot(const oscar_cache *c) {
    return c->n_free_slots > 0 ? c->free_slots[c->n_free_slots - 1] : -1;
}

void oscar_seq_attach(oscar_cache *c, int slot, int32_t id) {
    c->n_free_slots--; /* slot is the top of the stack (oscar_free_seq_slot) */
    if (4 * (c->id_used + 1) > 3 * (c->id_mask + 1)) id_rebuild(c);
    c->seqs[slot].id = id;
    uint32_t h = id_hash(id) & c->id_mask;
    while (c->id_keys[h] != -1) h = (h + 1) & c->id_mask;
    c->id_keys[h] = id;
    c->id_slots[h] = slot;
    c->id_used++;
}

void oscar_seq_detach(oscar_cache *c, int slot) {
    const int32_t id = c->seqs[slot].id;
    for (uint32_t h = id_hash(id) & c->id_mask;; h = (h + 1) & c->id_mask)
        if (c->id_keys[h] == id) {
            c->id_keys[h] = -2; /* a tombstone keeps later probes going */
            break;
        }
    c->seqs[slot].id = -1;
    c->free_slots[c->n_free_slots++] = slot;
}

static oscar_status lookup(oscar_cache *c, int32_t id, int *slot) {
    *slot = oscar_find_seq_slot(c, id);
    if (*slot < 0) return oscar_set_error(c, OSCAR_E_NOT_FOUND, "sequence %d does not exist", (int)id);
    return OSCAR_OK;
}

int32_t oscar_new_seq_id(oscar_cache *c) {
    /* Ids are never reused while the handle lives, until int32 wraps. */
    for (;;) {
        int32_t id = c->next_seq_id;
        c->next_seq_id = id == INT32_MAX ? 0 : id + 1;
        if (oscar_find_seq_slot(c, id) < 0) return id;
    }
}

oscar_status oscar_seq_add(oscar_cache *c, int32_t *seq_id) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "%s: this cache was created with caller_metadata = 1; use the batch API", "seq_add");
    if (!seq_id) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_add: seq_id is NULL");
    int s = oscar_free_seq_slot(c);
    if (s < 0)
        return oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED, "seq_add: all %d sequence slots are in use",
                               c->cfg.max_seqs);
    int64_t *tokens = (int64_t *)OSCAR_CALLOC((size_t)c->cfg.num_layers, sizeof(int64_t));
    int32_t *packed = (int32_t *)OSCAR_CALLOC((size_t)c->cfg.num_layers, sizeof(int32_t));
    if (!tokens || !packed) {
        free(tokens), free(packed);
        return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_add: out of host memory");
    }
    oscar_seq *q = &c->seqs[s];
    free(q->table);
    q->table = NULL;
    q->table_cap = 0;
    q->n_blocks = 0;
    free(q->tokens);
    free(q->packed);
    q->tokens = tokens;
    q->packed = packed;
    oscar_seq_attach(c, s, oscar_new_seq_id(c));
    *seq_id = q->id;
    return OSCAR_OK;
}

static void release_blocks(oscar_cache *c, oscar_seq *q) {
    for (int32_t i = 0; i < q->n_blocks; i++) {
        int32_t b = q->table[i];
        if (--c->block_refs[b] == 0) c->free_list[c->n_free++] = b;
    }
    q->n_blocks = 0;
}

oscar_status oscar_seq_free(oscar_cache *c, int32_t seq_id) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "%s: this cache was created with caller_metadata = 1; use the batch API", "seq_free");
    int s;
    oscar_status st = lookup(c, seq_id, &s);
    if (st) return st;
    oscar_seq *q = &c->seqs[s];
    release_blocks(c, q);
    oscar_seq_detach(c, s);
    return OSCAR_OK;
}

oscar_status oscar_seq_truncate(oscar_cache *c, int32_t seq_id, int64_t new_length) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                               "seq_truncate: this cache was created with caller_metadata = 1; lower seq_lens instead");
    int s;
    oscar_status st = lookup(c, seq_id, &s);
    if (st) return st;
    oscar_seq *q = &c->seqs[s];
    if (new_length < 0)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_truncate: new_length %lld is negative",
                               (long long)new_length);
    for (int l = 0; l < c->cfg.num_layers; l++) {
        /* with sinks, blocks start after the S sink tokens */
        const int64_t packed = oscar_frozen_tokens(q->packed[l], c->cfg.sink_tokens, c->cfg.residual);
        if (new_length < q->tokens[l] && new_length < packed)
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "seq_truncate: sequence %d layer %d has its first %lld tokens quantised into "
                                   "blocks, so it cannot be cut to %lld tokens (set rollback_tokens to keep more "
                                   "tokens in the window)",
                                   (int)seq_id, l, (long long)packed, (long long)new_length);
    }
    for (int l = 0; l < c->cfg.num_layers; l++)
        if (q->tokens[l] > new_length) q->tokens[l] = new_length;
    return OSCAR_OK;
}

static oscar_status ensure_table(oscar_cache *c, oscar_seq *q, int64_t need) {
    if (need <= q->table_cap) return OSCAR_OK;
    if (need > c->cfg.block_count)
        return oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED, "a sequence would need %lld blocks, the pool has %d",
                               (long long)need, c->cfg.block_count);
    int64_t cap = q->table_cap ? q->table_cap : 16;
    while (cap < need) cap *= 2;
    if (cap > c->cfg.block_count) cap = c->cfg.block_count;
    int32_t *t = (int32_t *)OSCAR_REALLOC(q->table, (size_t)cap * sizeof(int32_t));
    if (!t) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "out of host memory for a block table");
    q->table = t;
    q->table_cap = (int32_t)cap;
    return OSCAR_OK;
}

oscar_status oscar_seq_fork(oscar_cache *c, int32_t src, int32_t *new_id) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "%s: this cache was created with caller_metadata = 1; use the batch API", "seq_fork");
    if (!new_id) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_fork: new_seq_id is NULL");
    int s;
    oscar_status st = lookup(c, src, &s);
    if (st) return st;
    oscar_seq *a = &c->seqs[s];
    for (int l = 1; l < c->cfg.num_layers; l++)
        if (a->tokens[l] != a->tokens[0])
            return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                                   "seq_fork: sequence %d has %lld tokens in layer 0 but %lld in layer %d; "
                                   "fork when every layer has the same length",
                                   (int)src, (long long)a->tokens[0], (long long)a->tokens[l], l);
    int d = oscar_free_seq_slot(c);
    if (d < 0)
        return oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED, "seq_fork: all %d sequence slots are in use",
                               c->cfg.max_seqs);
    oscar_seq *b = &c->seqs[d];
    int64_t *tokens = (int64_t *)OSCAR_MALLOC((size_t)c->cfg.num_layers * sizeof(int64_t));
    int32_t *packed = (int32_t *)OSCAR_MALLOC((size_t)c->cfg.num_layers * sizeof(int32_t));
    int32_t *wt = (int32_t *)OSCAR_MALLOC((size_t)c->cfg.num_layers * sizeof(int32_t));
    int32_t *table = a->n_blocks ? (int32_t *)OSCAR_MALLOC((size_t)a->n_blocks * sizeof(int32_t)) : NULL;
    if (!tokens || !packed || !wt || (a->n_blocks && !table)) {
        free(tokens), free(packed), free(wt), free(table);
        return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_fork: out of host memory");
    }
    for (int l = 0; l < c->cfg.num_layers; l++) {
        tokens[l] = a->tokens[l];
        packed[l] = a->packed[l];
        wt[l] = (int32_t)(a->tokens[l] - oscar_sinks_held(a->tokens[l], c->cfg.sink_tokens) -
                          (int64_t)a->packed[l] * c->cfg.residual);
    }
    if (a->n_blocks) memcpy(table, a->table, (size_t)a->n_blocks * sizeof(int32_t));
    st = c->ops->fork(c, s, d, wt, packed, table, a->n_blocks);
    free(wt);
    if (st != OSCAR_OK) {
        free(tokens), free(packed), free(table);
        return st;
    }
    for (int32_t i = 0; i < a->n_blocks; i++) c->block_refs[table[i]]++;
    free(b->table);
    free(b->tokens);
    free(b->packed);
    b->packed = packed;
    b->table = table;
    b->table_cap = a->n_blocks;
    b->n_blocks = a->n_blocks;
    b->tokens = tokens;
    oscar_seq_attach(c, d, oscar_new_seq_id(c));
    *new_id = b->id;
    return OSCAR_OK;
}

oscar_status oscar_seq_info_get(const oscar_cache *c, int32_t id, int layer, oscar_seq_info *out) {
    if (!c || !out || layer < 0 || layer >= c->cfg.num_layers) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata) return OSCAR_E_UNSUPPORTED;
    const int s = oscar_find_seq_slot(c, id);
    if (s < 0) return OSCAR_E_NOT_FOUND;
    const oscar_seq *q = &c->seqs[s];
    int64_t R = c->cfg.residual;
    out->tokens = q->tokens[layer];
    out->packed_tokens = (int64_t)q->packed[layer] * R;
    out->window_tokens = (int32_t)(q->tokens[layer] - out->packed_tokens);
    out->blocks = q->n_blocks;
    return OSCAR_OK;
}

oscar_status oscar_seq_block_table(const oscar_cache *c, int32_t id, int32_t *table, int32_t cap,
                                   int32_t *count) {
    if (!c || !count || cap < 0 || (cap > 0 && !table)) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata) return OSCAR_E_UNSUPPORTED;
    const int s = oscar_find_seq_slot(c, id);
    if (s < 0) return OSCAR_E_NOT_FOUND;
    const oscar_seq *q = &c->seqs[s];
    int32_t n = q->n_blocks < cap ? q->n_blocks : cap;
    if (n) memcpy(table, q->table, (size_t)n * sizeof(int32_t));
    *count = q->n_blocks;
    return OSCAR_OK;
}

/* ---- append -------------------------------------------------------------- */

oscar_status oscar_append(oscar_cache *c, int layer, int n_seqs, const int32_t *ids, const int32_t *n_tokens,
                          const void *k, const void *v, oscar_dtype dtype, void *stream) {
    return oscar_append_with_key_sums(c, layer, n_seqs, ids, n_tokens, k, v, dtype, NULL, 0, stream);
}

oscar_status oscar_append_with_key_sums(oscar_cache *c, int layer, int n_seqs, const int32_t *ids,
                                        const int32_t *n_tokens, const void *k, const void *v, oscar_dtype dtype,
                                        const float *key_head_sumsq, int key_heads_total, void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (key_head_sumsq && (key_heads_total < c->cfg.num_kv_heads || key_heads_total > 65536))
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "append: key_heads_total %d must be in %d..65536",
                               key_heads_total, c->cfg.num_kv_heads);
    if (!key_head_sumsq) key_heads_total = 0;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "%s: this cache was created with caller_metadata = 1; use the batch API", "append");
    const oscar_status E = OSCAR_E_INVALID_ARGUMENT;
    if (layer < 0 || layer >= c->cfg.num_layers)
        return oscar_set_error(c, E, "append: layer %d out of range 0..%d", layer, c->cfg.num_layers - 1);
    if (n_seqs < 0) return oscar_set_error(c, E, "append: n_seqs is negative (%d)", n_seqs);
    if (n_seqs == 0) return OSCAR_OK;
    if (!ids || !n_tokens) return oscar_set_error(c, E, "append: seq_ids or n_tokens is NULL");
    {
        oscar_status rep = c->ops->poll(c);
        if (rep != OSCAR_OK) return rep;
    }
    if ((int)dtype < 0 || (int)dtype > 2) return oscar_set_error(c, E, "append: dtype %d is not valid", (int)dtype);
    if (n_seqs > c->cfg.max_seqs)
        return oscar_set_error(c, E, "append: n_seqs %d exceeds max_seqs %d", n_seqs, c->cfg.max_seqs);
    int *slots = (int *)OSCAR_MALLOC((size_t)n_seqs * sizeof(int));
    oscar_append_job *jobs = (oscar_append_job *)OSCAR_CALLOC((size_t)n_seqs, sizeof *jobs);
    int32_t *fresh = NULL;
    oscar_status st = OSCAR_OK;
    if (!slots || !jobs) {
        st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "append: out of host memory");
        goto done;
    }
    const int64_t R = c->cfg.residual;
    int64_t rows = 0, new_blocks = 0;
    for (int i = 0; i < n_seqs; i++) {
        if (n_tokens[i] < 0) {
            st = oscar_set_error(c, E, "append: n_tokens[%d] is negative (%d)", i, (int)n_tokens[i]);
            goto done;
        }
        if ((st = lookup(c, ids[i], &slots[i])) != OSCAR_OK) goto done;
        if (i == 0 && ++c->stamp_now == 0) { /* the stamps wrapped: start over */
            memset(c->stamp, 0, sizeof(uint32_t) * (size_t)c->cfg.max_seqs);
            c->stamp_now = 1;
        }
        if (c->stamp[slots[i]] == c->stamp_now) {
            st = oscar_set_error(c, E, "append: sequence %d appears twice", (int)ids[i]);
            goto done;
        }
        c->stamp[slots[i]] = c->stamp_now;
        const oscar_seq *q = &c->seqs[slots[i]];
        int64_t have = q->tokens[layer];
        if (have + n_tokens[i] >
            (int64_t)c->cfg.block_count * R + R - 1 + c->cfg.rollback_tokens + c->cfg.sink_tokens) {
            st = oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED,
                                 "append: sequence %d would hold %lld tokens, more than the pool of %d blocks x %d",
                                 (int)ids[i], (long long)(have + n_tokens[i]), c->cfg.block_count, (int)R);
            goto done;
        }
        oscar_append_job *j = &jobs[i];
        /* Sink tokens first (S = 0: none); the rest is the usual stream of
         * the tokens after the sinks. */
        const int S = c->cfg.sink_tokens;
        const int64_t s0 = oscar_sinks_held(have, S), s1 = oscar_sinks_held(have + n_tokens[i], S);
        j->sink_before = (int32_t)s0;
        j->sink_new = (int32_t)(s1 - s0);
        j->input_row = rows + j->sink_new;
        j->n_new = n_tokens[i] - j->sink_new;
        j->seq_slot = slots[i];
        const int64_t after0 = have - s0, after1 = have + n_tokens[i] - s1; /* tokens after the sinks */
        const int64_t p0 = q->packed[layer];
        const int64_t p1 = oscar_packed_after(p0, after1, (int)R, c->cfg.rollback_tokens);
        j->window_before = (int32_t)(after0 - p0 * R);
        j->n_flush = (int32_t)(p1 - p0);
        j->window_after = (int32_t)(after1 - p1 * R);
        j->first_flush_index = (int32_t)p0;
        int64_t end = (int64_t)j->first_flush_index + j->n_flush;
        if (end > q->n_blocks) new_blocks += end - q->n_blocks;
        rows += n_tokens[i];
    }
    if (rows > 0 && (!k || !v)) {
        st = oscar_set_error(c, E, "append: k or v is NULL");
        goto done;
    }
    if (new_blocks > c->n_free) {
        st = oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED,
                             "append: needs %lld new blocks but only %d of %d are free; nothing was appended",
                             (long long)new_blocks, c->n_free, c->cfg.block_count);
        goto done;
    }
    /* Tables grow before anything is written, so an allocation failure
     * cannot leave a half-done append. */
    for (int i = 0; i < n_seqs; i++)
        if ((st = ensure_table(c, &c->seqs[slots[i]], (int64_t)jobs[i].first_flush_index + jobs[i].n_flush)))
            goto done;
    /* Destination block ids: blocks another layer already allocated, then
     * fresh ones taken tentatively from the free list. */
    int64_t total_flush = 0;
    for (int i = 0; i < n_seqs; i++) total_flush += jobs[i].n_flush;
    fresh = (int32_t *)OSCAR_MALLOC((size_t)(total_flush ? total_flush : 1) * sizeof(int32_t));
    if (!fresh) {
        st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "append: out of host memory");
        goto done;
    }
    int n_taken = 0;
    int64_t off = 0;
    for (int i = 0; i < n_seqs; i++) {
        const oscar_seq *q = &c->seqs[slots[i]];
        jobs[i].flush_blocks = fresh + off;
        for (int32_t f = 0; f < jobs[i].n_flush; f++) {
            int32_t idx = jobs[i].first_flush_index + f;
            fresh[off + f] = idx < q->n_blocks ? q->table[idx] : c->free_list[c->n_free - 1 - n_taken++];
        }
        off += jobs[i].n_flush;
    }
    st = c->ops->append(c, layer, jobs, n_seqs, rows, k, v, dtype, key_head_sumsq, key_heads_total, stream);
    if (st != OSCAR_OK) goto done; /* blocks were only looked at, not taken */
    c->n_free -= n_taken;
    for (int i = 0; i < n_seqs; i++) {
        oscar_seq *q = &c->seqs[slots[i]];
        for (int32_t f = 0; f < jobs[i].n_flush; f++) {
            int32_t idx = jobs[i].first_flush_index + f;
            if (idx >= q->n_blocks) {
                q->table[idx] = jobs[i].flush_blocks[f];
                c->block_refs[jobs[i].flush_blocks[f]] = 1;
                q->n_blocks = idx + 1;
            }
        }
        q->tokens[layer] += n_tokens[i];
        q->packed[layer] += jobs[i].n_flush;
    }
done:
    free(fresh);
    free(slots);
    free(jobs);
    return st;
}

/* ---- attention ----------------------------------------------------------- */

oscar_status oscar_attention(oscar_cache *c, int layer, int n_seqs, const int32_t *ids, int q_len, const void *q,
                             oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float softmax_scale,
                             void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "%s: this cache was created with caller_metadata = 1; use the batch API", "attention");
    const oscar_status E = OSCAR_E_INVALID_ARGUMENT;
    if (layer < 0 || layer >= c->cfg.num_layers)
        return oscar_set_error(c, E, "attention: layer %d out of range 0..%d", layer, c->cfg.num_layers - 1);
    if (n_seqs < 1) return oscar_set_error(c, E, "attention: n_seqs must be >= 1, got %d", n_seqs);
    if (!ids || !q || !out) return oscar_set_error(c, E, "attention: seq_ids, q or out is NULL");
    if (q_len < 1 || q_len > OSCAR_MAX_Q_LEN)
        return oscar_set_error(c, E, "attention: q_len must be in 1..%d, got %d", OSCAR_MAX_Q_LEN, q_len);
    if ((int)q_dtype < 0 || (int)q_dtype > 2 || (int)out_dtype < 0 || (int)out_dtype > 2)
        return oscar_set_error(c, E, "attention: q_dtype/out_dtype not valid");
    if (!(softmax_scale == softmax_scale) || isinf(softmax_scale))
        return oscar_set_error(c, E, "attention: softmax_scale is not finite");
    if (softmax_scale <= 0.0f) softmax_scale = (float)(1.0 / sqrt((double)c->cfg.head_dim));
    {
        oscar_status rep = c->ops->poll(c);
        if (rep != OSCAR_OK) return rep;
    }
    oscar_attn_job *jobs = (oscar_attn_job *)OSCAR_MALLOC((size_t)n_seqs * sizeof *jobs);
    if (!jobs) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "attention: out of host memory");
    oscar_status st = OSCAR_OK;
    const int64_t R = c->cfg.residual;
    for (int i = 0; i < n_seqs; i++) {
        int s;
        if ((st = lookup(c, ids[i], &s)) != OSCAR_OK) goto done;
        const oscar_seq *sq = &c->seqs[s];
        int64_t T = sq->tokens[layer];
        if (T < q_len) {
            st = oscar_set_error(c, E, "attention: sequence %d holds %lld tokens in layer %d, fewer than q_len %d",
                                 (int)ids[i], (long long)T, layer, q_len);
            goto done;
        }
        jobs[i].seq_slot = s;
        jobs[i].n_blocks = sq->packed[layer];
        jobs[i].block_table = sq->table;
        jobs[i].sink_tokens = (int32_t)oscar_sinks_held(T, c->cfg.sink_tokens);
        jobs[i].window_tokens = (int32_t)(T - jobs[i].sink_tokens - (int64_t)sq->packed[layer] * R);
        jobs[i].tokens = T;
    }
    st = c->ops->attention(c, layer, jobs, n_seqs, q_len, q, q_dtype, out, out_dtype, softmax_scale, stream);
done:
    free(jobs);
    return st;
}

/* ---- memory ---------------------------------------------------------------- */

oscar_status oscar_memory(const oscar_cache *c, oscar_memory_stats *m) {
    if (!c || !m) return OSCAR_E_INVALID_ARGUMENT;
    memset(m, 0, sizeof *m);
    const oscar_layout *L = &c->lay;
    m->block_bytes = (int64_t)L->layer_block_bytes * L->layers;
    m->blocks_total = c->cfg.block_count;
    m->blocks_free = c->n_free;
    m->blocks_used = c->cfg.block_count - c->n_free;
    m->pool_bytes = m->block_bytes * m->blocks_total;
    m->window_bytes = (int64_t)L->window_layer_bytes * L->layers * c->cfg.max_seqs;
    m->seqs_max = c->cfg.max_seqs;
    for (int i = 0; i < c->cfg.max_seqs; i++) m->seqs_live += c->seqs[i].id >= 0;
    m->bytes_in_use = m->blocks_used * m->block_bytes + (int64_t)m->seqs_live * L->window_layer_bytes * L->layers;
    m->packed_bytes_per_token = (double)m->block_bytes / c->cfg.residual;
    /* one exact token (window or sink row), all layers, K and V */
    m->window_bytes_per_token = 2.0 * L->hkv * L->d * L->window_esize * L->layers;
    m->fp16_bytes_per_token = 2.0 * 2.0 * L->hkv * L->d * L->layers;
    return OSCAR_OK;
}

/* ---- the batch API --------------------------------------------------------- */

/* Checks what the host can see of a batch: its host fields and that the
 * arrays are given. The arrays themselves live in backend memory and are
 * checked by the backend. */
static oscar_status check_batch_host(oscar_cache *c, int layer, const oscar_batch *b, const char *what) {
    const oscar_status E = OSCAR_E_INVALID_ARGUMENT;
    if (!c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                               "%s: this cache tracks its own sequences (caller_metadata = 0); use the sequence API",
                               what);
    if (layer < 0 || layer >= c->cfg.num_layers)
        return oscar_set_error(c, E, "%s: layer %d out of range 0..%d", what, layer, c->cfg.num_layers - 1);
    if (!b) return oscar_set_error(c, E, "%s: batch is NULL", what);
    if (b->num_seqs < 1 || b->num_seqs > c->cfg.max_seqs)
        return oscar_set_error(c, E, "%s: num_seqs %d is outside 1..max_seqs %d", what, (int)b->num_seqs,
                               c->cfg.max_seqs);
    if (b->tokens_per_seq < 1 || b->tokens_per_seq > OSCAR_MAX_Q_LEN)
        return oscar_set_error(c, E, "%s: tokens_per_seq %d is outside 1..%d", what, (int)b->tokens_per_seq,
                               OSCAR_MAX_Q_LEN);
    /* the pool's blocks, a window short of a block and the sink rows */
    const int S = c->cfg.sink_tokens;
    const int64_t cap = (int64_t)c->cfg.block_count * c->cfg.residual + c->cfg.residual - 1 + S;
    if (b->max_seq_len < b->tokens_per_seq || b->max_seq_len > cap || b->max_seq_len > INT32_MAX - 1)
        return oscar_set_error(c, E, "%s: max_seq_len %d is outside tokens_per_seq %d .. %lld (the pool's capacity)",
                               what, (int)b->max_seq_len, (int)b->tokens_per_seq, (long long)cap);
    const int64_t max_blocks = oscar_max_blocks(b->max_seq_len, S, c->cfg.residual);
    if (b->block_table_stride < max_blocks || b->block_table_stride < 0)
        return oscar_set_error(c, E, "%s: block_table_stride %d is less than %s = %lld", what,
                               (int)b->block_table_stride, S ? "(max_seq_len - sink_tokens) / R" : "max_seq_len / R",
                               (long long)max_blocks);
    if (!b->seq_lens || !b->window_slots || !b->block_tables)
        return oscar_set_error(c, E, "%s: seq_lens, window_slots or block_tables is NULL", what);
    if (b->key_head_sumsq && (b->key_heads_total < c->cfg.num_kv_heads || b->key_heads_total > 65536))
        return oscar_set_error(c, E, "%s: key_heads_total %d must be in num_kv_heads (%d) .. 65536", what,
                               (int)b->key_heads_total, c->cfg.num_kv_heads);
    if (!b->key_head_sumsq && b->key_heads_total != 0)
        return oscar_set_error(c, E, "%s: key_heads_total is %d but key_head_sumsq is NULL", what,
                               (int)b->key_heads_total);
    return c->ops->poll(c);
}

oscar_status oscar_batch_append(oscar_cache *c, int layer, const oscar_batch *b, const void *k, const void *v,
                                oscar_dtype dtype, void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    oscar_status st = check_batch_host(c, layer, b, "batch_append");
    if (st != OSCAR_OK) return st;
    if (!k || !v) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "batch_append: k or v is NULL");
    if ((int)dtype < 0 || (int)dtype > 2)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "batch_append: dtype %d is not valid", (int)dtype);
    return c->ops->batch_append(c, layer, b, k, v, dtype, stream);
}

oscar_status oscar_batch_attention(oscar_cache *c, int layer, const oscar_batch *b, const void *q, oscar_dtype q_dtype,
                                   void *out, oscar_dtype out_dtype, float softmax_scale, void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    oscar_status st = check_batch_host(c, layer, b, "batch_attention");
    if (st != OSCAR_OK) return st;
    const oscar_status E = OSCAR_E_INVALID_ARGUMENT;
    if (!q || !out) return oscar_set_error(c, E, "batch_attention: q or out is NULL");
    if ((int)q_dtype < 0 || (int)q_dtype > 2 || (int)out_dtype < 0 || (int)out_dtype > 2)
        return oscar_set_error(c, E, "batch_attention: q_dtype/out_dtype not valid");
    if (!(softmax_scale == softmax_scale) || isinf(softmax_scale))
        return oscar_set_error(c, E, "batch_attention: softmax_scale is not finite");
    if (softmax_scale <= 0.0f) softmax_scale = (float)(1.0 / sqrt((double)c->cfg.head_dim));
    return c->ops->batch_attention(c, layer, b, q, q_dtype, out, out_dtype, softmax_scale, stream);
}

oscar_status oscar_slot_copy(oscar_cache *c, int32_t src, int32_t dst, int64_t n_tokens, void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (!c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED, "slot_copy: this cache tracks its own sequences; use seq_fork");
    if (src < 0 || src >= c->cfg.max_seqs || dst < 0 || dst >= c->cfg.max_seqs)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "slot_copy: slots %d, %d must be in 0..%d", (int)src,
                               (int)dst, c->cfg.max_seqs - 1);
    if (n_tokens < 0) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "slot_copy: n_tokens is negative");
    if (src == dst) return OSCAR_OK;
    return c->ops->slot_copy(c, src, dst, n_tokens, stream);
}

oscar_status oscar_key_sumsq(oscar_cache *c, int64_t n_rows, const void *k, oscar_dtype dtype, float *out,
                             void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (n_rows < 0 || n_rows > (int64_t)INT32_MAX)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "key_sumsq: n_rows %lld is out of range", (long long)n_rows);
    if (n_rows == 0) return OSCAR_OK;
    if (!k || !out) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "key_sumsq: k or out is NULL");
    if ((int)dtype < 0 || (int)dtype > 2)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "key_sumsq: dtype %d is not valid", (int)dtype);
    return c->ops->key_sumsq(c, n_rows, k, dtype, out, stream);
}

oscar_status oscar_poll(oscar_cache *c) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    return c->ops->poll(c);
}

oscar_status oscar_synchronize(oscar_cache *c, void *stream) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    return c->ops->sync(c, stream);
}
