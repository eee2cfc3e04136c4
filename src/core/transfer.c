/* Reading a sequence back as floats, and the export/import stream of
 * docs/FORMAT.md that moves a sequence between caches and backends. */
#include "format.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char MAGIC[8] = {'O', 'S', 'C', 'A', 'R', 'S', 'E', 'Q'};
/* v1: 56-byte header, u64 tokens per layer. v2: 64-byte header
 * (+ rollback_tokens, reserved), u64 tokens and u64 packed blocks per
 * layer. v3: v2 with the reserved word holding sink_tokens S and each
 * layer's sink rows ahead of its window rows. v4: v3 with an
 * 80-byte header: the word at 16 is the key bits, then value bits,
 * key_norm_per_head and two reserved words (0). v5 (written now): v4's
 * bytes, and a width may be 3 (two code planes per array); a stream before
 * v5 never holds 3-bit codes. docs/FORMAT.md. */
enum { HEADER_V1 = 56, HEADER_V2 = 64, HEADER_V4 = 80 };

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 offset basis */
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static void put32(uint8_t *p, uint32_t x) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(x >> (8 * i));
}
static void put64(uint8_t *p, uint64_t x) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(x >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) x |= (uint32_t)p[i] << (8 * i);
    return x;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)p[i] << (8 * i);
    return x;
}

static oscar_status find_seq(oscar_cache *c, int32_t id, int *slot) {
    *slot = oscar_find_seq_slot(c, id);
    if (*slot < 0) return oscar_set_error(c, OSCAR_E_NOT_FOUND, "sequence %d does not exist", (int)id);
    return OSCAR_OK;
}

/* One head of an exact (sink or window) token, as the caller gave it: the stored
 * window dtype to fp32, then the Hadamard undone where the method rotated it.
 * k_dst / v_dst may be NULL (that half is not wanted). */
static void read_exact_head(const oscar_layout *L, const uint8_t *k_src, const uint8_t *v_src, float *k_dst,
                            float *v_dst, float *tmp) {
    if (k_dst) {
        oscar_to_f32(k_src, (oscar_dtype)L->window_dtype, tmp, L->d);
        if (L->rotate) oscar_fwht(tmp, L->d);
        memcpy(k_dst, tmp, sizeof(float) * L->d);
    }
    if (v_dst) {
        oscar_to_f32(v_src, (oscar_dtype)L->window_dtype, tmp, L->d);
        if (L->rotate_v) oscar_fwht(tmp, L->d);
        memcpy(v_dst, tmp, sizeof(float) * L->d);
    }
}

oscar_status oscar_seq_read(oscar_cache *c, int32_t id, int layer, int64_t start, int64_t count, float *k_out,
                            float *v_out) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                               "seq_read: this cache was created with caller_metadata = 1; it has no sequences");
    if (layer < 0 || layer >= c->cfg.num_layers)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_read: layer %d out of range", layer);
    int s;
    oscar_status st = find_seq(c, id, &s);
    if (st) return st;
    const oscar_seq *q = &c->seqs[s];
    const oscar_layout *L = &c->lay;
    int64_t T = q->tokens[layer];
    if (start < 0 || count < 0 || start > T || count > T - start)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                               "seq_read: range [%lld, %lld + %lld) is outside the %lld tokens of sequence %d",
                               (long long)start, (long long)start, (long long)count, (long long)T, (int)id);
    if (count == 0) return OSCAR_OK;
    const int R = L->residual, d = L->d, H = L->hkv;
    const size_t row = (size_t)H * d;
    uint8_t *blk = (uint8_t *)OSCAR_MALLOC(L->layer_block_bytes);
    float *kb = (float *)OSCAR_MALLOC(sizeof(float) * (size_t)R * d * 2 + sizeof(float) * R);
    uint8_t *wk = (uint8_t *)OSCAR_MALLOC(L->window_layer_bytes);
    float *tmp = (float *)OSCAR_MALLOC(sizeof(float) * (size_t)d);
    if (!blk || !kb || !wk || !tmp) {
        st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_read: out of host memory");
        goto done;
    }
    float *vb = kb + (size_t)R * d, *nb = vb + (size_t)R * d;
    /* Sink rows (positions 0..sk-1) first; below, positions count from the
     * first token after the sinks and out rows from out0. */
    const int64_t sk = oscar_sinks_held(T, L->sinks);
    if (start < sk) {
        const size_t half = L->window_layer_bytes / 2;
        if ((st = c->ops->read_sinks(c, layer, s, (int32_t)sk, wk, wk + half)) != OSCAR_OK) goto done;
        for (int64_t t = start; t < sk && t < start + count; t++)
            for (int h = 0; h < H; h++) {
                size_t o = (size_t)(t - start) * row + (size_t)h * d;
                size_t wo = ((size_t)t * row + (size_t)h * d) * L->window_esize;
                read_exact_head(L, wk + wo, wk + half + wo, k_out ? k_out + o : NULL, v_out ? v_out + o : NULL, tmp);
            }
    }
    const int64_t out0 = start < sk ? sk - start : 0; /* out row of the first token after the sinks */
    if (k_out) k_out += (size_t)out0 * row;
    if (v_out) v_out += (size_t)out0 * row;
    T -= sk;
    count -= out0;
    start = start < sk ? 0 : start - sk;
    int64_t packed = (int64_t)q->packed[layer] * R, end = start + count;
    for (int64_t b0 = start / R * R; b0 < end && b0 < packed; b0 += R) {
        if ((st = c->ops->read_block(c, layer, q->table[b0 / R], blk)) != OSCAR_OK) goto done;
        int64_t t0 = b0 > start ? b0 : start, t1 = b0 + R < end ? b0 + R : end;
        for (int h = 0; h < H; h++) {
            oscar_unpack_head(L, blk, h, kb, vb, nb);
            for (int64_t t = t0; t < t1; t++) {
                int r = (int)(t - b0);
                size_t o = (size_t)(t - start) * row + (size_t)h * d;
                if (k_out) {
                    for (int i = 0; i < d; i++) tmp[i] = kb[(size_t)r * d + i] * nb[r];
                    if (L->rotate) oscar_fwht(tmp, d);
                    memcpy(k_out + o, tmp, sizeof(float) * d);
                }
                if (v_out) {
                    memcpy(tmp, vb + (size_t)r * d, sizeof(float) * d);
                    if (L->rotate_v) oscar_fwht(tmp, d);
                    memcpy(v_out + o, tmp, sizeof(float) * d);
                }
            }
        }
    }
    if (end > packed) {
        int32_t wn = (int32_t)(T - packed);
        size_t half = L->window_layer_bytes / 2;
        if ((st = c->ops->read_window(c, layer, s, wn, wk, wk + half, NULL)) != OSCAR_OK) goto done;
        for (int64_t t = start > packed ? start : packed; t < end; t++) {
            int r = (int)(t - packed);
            for (int h = 0; h < H; h++) {
                size_t o = (size_t)(t - start) * row + (size_t)h * d;
                size_t wo = ((size_t)r * row + (size_t)h * d) * L->window_esize;
                read_exact_head(L, wk + wo, wk + half + wo, k_out ? k_out + o : NULL, v_out ? v_out + o : NULL, tmp);
            }
        }
    }
done:
    free(blk), free(kb), free(wk), free(tmp);
    return st;
}

/* 1 if any of n values in the window dtype at p is NaN or Inf. */
static int any_nonfinite(const oscar_layout *L, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (L->window_esize == 4) {
            if ((get32(p + 4 * i) & 0x7f800000u) == 0x7f800000u) return 1;
        } else {
            const uint32_t h = (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8;
            const uint32_t m = L->window_dtype == OSCAR_DTYPE_BF16 ? 0x7f80u : 0x7c00u;
            if ((h & m) == m) return 1;
        }
    }
    return 0;
}

/* A block's contents as a packer can write them: fp16 (scale, lo) pairs
 * finite with scale >= 0, token norms finite and > 0; for method none every
 * stored value finite. Returns 0 or a message. */
static const char *check_block(const oscar_layout *L, const uint8_t *b) {
    const int R = L->residual;
    if (!L->quantised)
        return any_nonfinite(L, b, L->layer_block_bytes / (size_t)L->window_esize) ? "a stored value is NaN or Inf"
                                                                                    : NULL;
    for (int h = 0; h < L->hkv; h++) {
        const uint8_t *p = b + (size_t)h * L->head_bytes + L->kcodes_bytes + L->vcodes_bytes;
        const size_t pairs = (L->kparams_bytes + L->vparams_bytes) / 4;
        for (size_t i = 0; i < pairs; i++) {
            const uint32_t sc = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8;
            const uint32_t lo = (uint32_t)p[4 * i + 2] | (uint32_t)p[4 * i + 3] << 8;
            if ((sc & 0x7c00u) == 0x7c00u || (lo & 0x7c00u) == 0x7c00u) return "a (scale, lo) pair is NaN or Inf";
            if ((sc & 0x8000u) && (sc & 0x7fffu)) return "a scale is negative";
        }
    }
    if (L->scale_keys) {
        const uint8_t *nm = b + (size_t)L->hkv * L->head_bytes;
        const int n_norms = R * (L->norm_per_head ? L->hkv : 1); /* [R] or [Hkv][R] */
        for (int t = 0; t < n_norms; t++) {
            const uint32_t u = get32(nm + 4 * (size_t)t);
            float s;
            memcpy(&s, &u, 4);
            if (!(s > 0.0f) || isinf(s)) return "a token norm is not a positive finite number";
        }
    }
    return NULL;
}

static size_t header_bytes(int version) { return version == 1 ? HEADER_V1 : version < 4 ? HEADER_V2 : HEADER_V4; }
/* sink rows held by a layer of `tokens` tokens in a stream with S sinks */
static int64_t stream_sinks(int64_t tokens, int S) { return oscar_sinks_held(tokens, S); }
static size_t per_layer_bytes(int version) { return version == 1 ? 8 : 16; }

static void stream_sizes(const oscar_cache *c, int version, const int64_t *tokens, const int64_t *packed,
                         int32_t *n_blocks, size_t *total) {
    const oscar_layout *L = &c->lay;
    int64_t nb = 0, wrows = 0, srows = 0;
    for (int l = 0; l < L->layers; l++) {
        const int64_t sh = version >= 3 ? stream_sinks(tokens[l], L->sinks) : 0;
        if (packed[l] > nb) nb = packed[l];
        wrows += tokens[l] - sh - packed[l] * L->residual;
        srows += sh;
    }
    *n_blocks = (int32_t)nb;
    *total = header_bytes(version) + per_layer_bytes(version) * (size_t)L->layers +
             (size_t)nb * L->layers * L->layer_block_bytes +
             2 * (size_t)(wrows + srows) * L->hkv * L->d * L->window_esize + (version >= 2 ? 4 * (size_t)wrows : 0) +
             8;
}

oscar_status oscar_seq_export(oscar_cache *c, int32_t id, void *buffer, size_t buffer_size, size_t *size) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (!size) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_export: size is NULL");
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                               "seq_export: this cache was created with caller_metadata = 1; it has no sequences");
    int s;
    oscar_status st = find_seq(c, id, &s);
    if (st) return st;
    const oscar_seq *q = &c->seqs[s];
    const oscar_layout *L = &c->lay;
    int64_t *packed = (int64_t *)OSCAR_MALLOC(sizeof(int64_t) * (size_t)L->layers);
    if (!packed) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_export: out of host memory");
    for (int l = 0; l < L->layers; l++) packed[l] = q->packed[l];
    int32_t nb;
    size_t total;
    stream_sizes(c, OSCAR_FORMAT_VERSION, q->tokens, packed, &nb, &total);
    free(packed);
    if (!buffer) {
        *size = total;
        return OSCAR_OK;
    }
    if (buffer_size < total)
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_export: buffer holds %zu bytes, the stream needs %zu",
                               buffer_size, total);
    uint8_t *p = (uint8_t *)buffer;
    memcpy(p, MAGIC, 8);
    const oscar_config *f = &c->cfg;
    uint32_t fields[11] = {OSCAR_FORMAT_VERSION, (uint32_t)f->method, (uint32_t)L->kbits, (uint32_t)f->head_dim,
                           (uint32_t)f->num_kv_heads, (uint32_t)f->num_layers, (uint32_t)f->k_group,
                           (uint32_t)f->v_group, (uint32_t)f->residual, (uint32_t)f->window_dtype,
                           (uint32_t)f->rotate_values};
    for (int i = 0; i < 11; i++) put32(p + 8 + 4 * i, fields[i]);
    put32(p + 52, (uint32_t)nb);
    put32(p + 56, (uint32_t)f->rollback_tokens);
    put32(p + 60, (uint32_t)f->sink_tokens);
    /* version 4: the word at 16 holds the key bits; value bits and the
     * norm layout follow (as the layout has them: 16 and 0 for method none) */
    put32(p + 64, (uint32_t)L->vbits);
    put32(p + 68, (uint32_t)L->norm_per_head);
    put32(p + 72, 0);
    put32(p + 76, 0);
    size_t off = HEADER_V4;
    for (int l = 0; l < L->layers; l++, off += 16) {
        put64(p + off, (uint64_t)q->tokens[l]);
        put64(p + off + 8, (uint64_t)q->packed[l]);
    }
    for (int32_t i = 0; i < nb; i++)
        for (int l = 0; l < L->layers; l++, off += L->layer_block_bytes) {
            if (q->packed[l] > i) {
                if ((st = c->ops->read_block(c, l, q->table[i], p + off)) != OSCAR_OK) return st;
            } else {
                memset(p + off, 0, L->layer_block_bytes);
            }
        }
    size_t rowb = (size_t)L->hkv * L->d * L->window_esize;
    uint8_t *wk = (uint8_t *)OSCAR_MALLOC(L->window_layer_bytes);
    float *ss = (float *)OSCAR_MALLOC(sizeof(float) * (size_t)L->window_rows);
    if (!wk || !ss) {
        free(wk), free(ss);
        return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_export: out of host memory");
    }
    for (int l = 0; l < L->layers; l++) {
        const int32_t sn = (int32_t)stream_sinks(q->tokens[l], L->sinks);
        if (sn > 0) { /* the sink rows: K, then V */
            if ((st = c->ops->read_sinks(c, l, s, sn, wk, wk + L->window_layer_bytes / 2)) != OSCAR_OK) {
                free(wk), free(ss);
                return st;
            }
            memcpy(p + off, wk, (size_t)sn * rowb);
            off += (size_t)sn * rowb;
            memcpy(p + off, wk + L->window_layer_bytes / 2, (size_t)sn * rowb);
            off += (size_t)sn * rowb;
        }
        int32_t wn = (int32_t)(q->tokens[l] - sn - (int64_t)q->packed[l] * L->residual);
        if (wn == 0) continue;
        if ((st = c->ops->read_window(c, l, s, wn, wk, wk + L->window_layer_bytes / 2, ss)) != OSCAR_OK) {
            free(wk), free(ss);
            return st;
        }
        memcpy(p + off, wk, (size_t)wn * rowb);
        off += (size_t)wn * rowb;
        memcpy(p + off, wk + L->window_layer_bytes / 2, (size_t)wn * rowb);
        off += (size_t)wn * rowb;
        for (int32_t t = 0; t < wn; t++, off += 4) {
            uint32_t u;
            memcpy(&u, &ss[t], 4);
            put32(p + off, u);
        }
    }
    free(wk), free(ss);
    put64(p + off, fnv1a(p, off));
    *size = total;
    return OSCAR_OK;
}

oscar_status oscar_seq_import(oscar_cache *c, const void *buffer, size_t size, int32_t *seq_id) {
    if (!c) return OSCAR_E_INVALID_ARGUMENT;
    if (!buffer || !seq_id) return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT, "seq_import: buffer or seq_id is NULL");
    if (c->cfg.caller_metadata)
        return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                               "seq_import: this cache was created with caller_metadata = 1; use the batch API");
    const oscar_status F = OSCAR_E_FORMAT;
    const uint8_t *p = (const uint8_t *)buffer;
    const oscar_layout *L = &c->lay;
    if (size < HEADER_V1 + 8) return oscar_set_error(c, F, "seq_import: %zu bytes is too short for a stream", size);
    if (memcmp(p, MAGIC, 8) != 0) return oscar_set_error(c, F, "seq_import: bad magic (not an oscar sequence stream)");
    const uint32_t version = get32(p + 8);
    if (version < 1 || version > OSCAR_FORMAT_VERSION)
        return oscar_set_error(c, F, "seq_import: stream format version %u, this library reads 1 to %d", version,
                               OSCAR_FORMAT_VERSION);
    const size_t hb = header_bytes((int)version), plb = per_layer_bytes((int)version);
    if (size < hb + 8) return oscar_set_error(c, F, "seq_import: %zu bytes is too short for a stream", size);
    const oscar_config *f = &c->cfg;
    static const char *const names[10] = {"method", "key bits", "head_dim", "num_kv_heads", "num_layers",
                                          "k_group", "v_group", "residual", "window_dtype", "rotate_values"};
    uint32_t want[10] = {(uint32_t)f->method, (uint32_t)L->kbits, (uint32_t)f->head_dim, (uint32_t)f->num_kv_heads,
                         (uint32_t)f->num_layers, (uint32_t)f->k_group, (uint32_t)f->v_group,
                         (uint32_t)f->residual, (uint32_t)f->window_dtype, (uint32_t)f->rotate_values};
    for (int i = 0; i < 10; i++)
        if (get32(p + 12 + 4 * i) != want[i])
            return oscar_set_error(c, F, "seq_import: stream has %s = %u, this cache has %u", names[i],
                                   get32(p + 12 + 4 * i), want[i]);
    if (version >= 2) {
        if (get32(p + 56) != (uint32_t)f->rollback_tokens)
            return oscar_set_error(c, F, "seq_import: stream has rollback_tokens = %u, this cache has %d",
                                   get32(p + 56), f->rollback_tokens);
        if (version == 2 && get32(p + 60) != 0)
            return oscar_set_error(c, F, "seq_import: reserved header field is %u, not 0", get32(p + 60));
        if (version >= 3 && get32(p + 60) != (uint32_t)f->sink_tokens)
            return oscar_set_error(c, F, "seq_import: stream has sink_tokens = %u, this cache has %d", get32(p + 60),
                                   f->sink_tokens);
    }
    if (version < 3 && f->sink_tokens != 0)
        return oscar_set_error(c, F, "seq_import: a version %u stream has no sink tokens, this cache has sink_tokens = %d",
                               version, f->sink_tokens);
    /* version 4: value bits and the key-norm layout; before, one width (the
     * word at 16) for keys and values and one norm per token */
    if (version >= 4) {
        if (size < HEADER_V4 + 8)
            return oscar_set_error(c, F, "seq_import: %zu bytes is too short for a version %u stream", size, version);
        if (get32(p + 64) != (uint32_t)L->vbits)
            return oscar_set_error(c, F, "seq_import: stream has value bits = %u, this cache has %d", get32(p + 64),
                                   L->vbits);
        if (get32(p + 68) != (uint32_t)L->norm_per_head)
            return oscar_set_error(c, F, "seq_import: stream has key_norm_per_head = %u, this cache has %d%s",
                                   get32(p + 68), L->norm_per_head,
                                   L->scale_keys ? "" : " (its method stores no key norms)");
        if (get32(p + 72) != 0 || get32(p + 76) != 0)
            return oscar_set_error(c, F, "seq_import: reserved header fields are %u, %u, not 0", get32(p + 72),
                                   get32(p + 76));
    } else {
        if (L->vbits != L->kbits)
            return oscar_set_error(c, F,
                                   "seq_import: a version %u stream has one bit width (%u) for keys and values, this "
                                   "cache has key bits %d, value bits %d",
                                   version, get32(p + 16), L->kbits, L->vbits);
        if (L->norm_per_head)
            return oscar_set_error(c, F,
                                   "seq_import: a version %u stream has one key norm per token over all heads, this "
                                   "cache has key_norm_per_head = 1",
                                   version);
    }
    /* version 5: 3-bit codes; no earlier writer wrote a width of 3 */
    if (version < 5 && (L->kbits == 3 || L->vbits == 3))
        return oscar_set_error(c, F,
                               "seq_import: a version %u stream has no 3-bit codes (format version 5), this cache has "
                               "key bits %d, value bits %d",
                               version, L->kbits, L->vbits);
    if (size < hb + plb * (size_t)L->layers + 8)
        return oscar_set_error(c, F, "seq_import: stream truncated in the token counts");
    int64_t *tokens = (int64_t *)OSCAR_MALLOC(sizeof(int64_t) * (size_t)L->layers);
    int64_t *packed64 = (int64_t *)OSCAR_MALLOC(sizeof(int64_t) * (size_t)L->layers);
    int32_t *packed = (int32_t *)OSCAR_MALLOC(sizeof(int32_t) * (size_t)L->layers);
    oscar_status st = OSCAR_OK;
    int32_t *table = NULL;
    float *ss = NULL, *rowf = NULL;
    int slot = -1;
    if (!tokens || !packed64 || !packed) {
        st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_import: out of host memory");
        goto fail;
    }
    for (int l = 0; l < L->layers; l++) {
        const uint64_t t = get64(p + hb + plb * (size_t)l);
        const uint64_t pk = version == 1 ? t / (uint64_t)f->residual : get64(p + hb + plb * (size_t)l + 8);
        if (pk > (uint64_t)f->block_count) {
            st = oscar_set_error(c, F, "seq_import: layer %d claims %llu packed blocks, the pool has %d", l,
                                 (unsigned long long)pk, f->block_count);
            goto fail;
        }
        /* S sink tokens come before the blocks (S = 0 before version 3) */
        const uint64_t sh = t < (uint64_t)L->sinks ? t : (uint64_t)L->sinks;
        if ((pk > 0 && t < (uint64_t)L->sinks) || t - sh < pk * (uint64_t)f->residual ||
            t - sh - pk * (uint64_t)f->residual > (uint64_t)(L->window_rows - 1)) {
            st = oscar_set_error(c, F,
                                 "seq_import: layer %d claims %llu tokens with %d sink tokens and %llu packed blocks; "
                                 "the window holds 0..%d tokens",
                                 l, (unsigned long long)t, L->sinks, (unsigned long long)pk, L->window_rows - 1);
            goto fail;
        }
        tokens[l] = (int64_t)t;
        packed64[l] = (int64_t)pk;
        packed[l] = (int32_t)pk;
    }
    int32_t nb;
    size_t total;
    stream_sizes(c, (int)version, tokens, packed64, &nb, &total);
    if ((uint32_t)nb != get32(p + 52)) {
        st = oscar_set_error(c, F, "seq_import: n_blocks is %u but the layers' packed counts need %d", get32(p + 52),
                             (int)nb);
        goto fail;
    }
    if (size != total) {
        st = oscar_set_error(c, F, "seq_import: stream is %zu bytes, its header describes %zu", size, total);
        goto fail;
    }
    if (get64(p + total - 8) != fnv1a(p, total - 8)) {
        st = oscar_set_error(c, F, "seq_import: checksum mismatch (stream corrupted)");
        goto fail;
    }
    if (nb > c->n_free) {
        st = oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED, "seq_import: needs %d blocks, %d are free", (int)nb, c->n_free);
        goto fail;
    }
    slot = oscar_free_seq_slot(c);
    if (slot < 0) {
        st = oscar_set_error(c, OSCAR_E_POOL_EXHAUSTED, "seq_import: all %d sequence slots are in use", c->cfg.max_seqs);
        goto fail;
    }
    table = (int32_t *)OSCAR_MALLOC(sizeof(int32_t) * (size_t)(nb ? nb : 1));
    if (!table) {
        st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_import: out of host memory");
        goto fail;
    }
    for (int32_t i = 0; i < nb; i++) table[i] = c->free_list[c->n_free - 1 - i];
    size_t off = hb + plb * (size_t)L->layers;
    /* every block's contents first: nothing is written unless all are valid */
    for (int32_t i = 0; i < nb; i++)
        for (int l = 0; l < L->layers; l++) {
            const char *why = packed[l] > i ? check_block(L, p + off + ((size_t)i * L->layers + l) * L->layer_block_bytes)
                                            : NULL;
            if (why) {
                st = oscar_set_error(c, F, "seq_import: block %d of layer %d: %s", (int)i, l, why);
                goto fail;
            }
        }
    for (int32_t i = 0; i < nb; i++)
        for (int l = 0; l < L->layers; l++, off += L->layer_block_bytes)
            if (packed[l] > i && (st = c->ops->write_block(c, l, table[i], p + off)) != OSCAR_OK) goto fail;
    size_t rowb = (size_t)L->hkv * L->d * L->window_esize;
    ss = (float *)OSCAR_MALLOC(sizeof(float) * (size_t)L->window_rows);
    rowf = (float *)OSCAR_MALLOC(sizeof(float) * (size_t)L->hkv * L->d);
    if (!ss || !rowf) {
        st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "seq_import: out of host memory");
        goto fail;
    }
    for (int l = 0; l < L->layers; l++) {
        const int32_t sn = (int32_t)stream_sinks(tokens[l], L->sinks);
        if (sn > 0) { /* sink rows (version 3): finite, like window rows */
            if (any_nonfinite(L, p + off, 2 * (size_t)sn * L->hkv * L->d)) {
                st = oscar_set_error(c, F, "seq_import: layer %d: a sink value is NaN or Inf", l);
                goto fail;
            }
            if ((st = c->ops->write_sinks(c, l, slot, sn, p + off, p + off + (size_t)sn * rowb)) != OSCAR_OK) goto fail;
            off += 2 * (size_t)sn * rowb;
        }
        int32_t wn = (int32_t)(tokens[l] - sn - packed64[l] * L->residual);
        const uint8_t *wkp = p + off, *wvp = p + off + (size_t)wn * rowb;
        off += 2 * (size_t)wn * rowb;
        /* window rows as append stores them: finite (found by tests/fuzz/fuzz_import.c: a NaN row was taken
         * in and attention over it gave NaN) */
        if (any_nonfinite(L, wkp, 2 * (size_t)wn * L->hkv * L->d)) {
            st = oscar_set_error(c, F, "seq_import: layer %d: a window value is NaN or Inf", l);
            goto fail;
        }
        for (int32_t t = 0; t < wn; t++) {
            if (version >= 2) {
                const uint32_t u = get32(p + off + 4 * (size_t)t);
                memcpy(&ss[t], &u, 4);
                /* a norm the stream carries must be one a packer could use */
                if (!(ss[t] >= 0.0f) || isinf(ss[t])) {
                    st = oscar_set_error(c, F, "seq_import: layer %d window token %d has sum of squares %g", l, (int)t,
                                         (double)ss[t]);
                    goto fail;
                }
            } else { /* version 1 kept no sums: these are the local heads' */
                oscar_to_f32(wkp + (size_t)t * rowb, (oscar_dtype)L->window_dtype, rowf, (int64_t)L->hkv * L->d);
                ss[t] = oscar_row_sumsq(L, rowf);
            }
        }
        if (version >= 2) off += 4 * (size_t)wn;
        if ((st = c->ops->write_window(c, l, slot, wn, wkp, wvp, ss, packed[l])) != OSCAR_OK) goto fail;
    }
    free(ss), free(rowf);
    ss = rowf = NULL;
    if (c->ops->set_table && (st = c->ops->set_table(c, slot, table, nb)) != OSCAR_OK) goto fail;
    /* Everything is written; only now does the pool change. */
    c->n_free -= nb;
    for (int32_t i = 0; i < nb; i++) c->block_refs[table[i]] = 1;
    oscar_seq *q = &c->seqs[slot];
    free(q->table);
    free(q->tokens);
    free(q->packed);
    q->table = table;
    q->table_cap = nb;
    q->n_blocks = nb;
    q->tokens = tokens;
    q->packed = packed;
    oscar_seq_attach(c, slot, oscar_new_seq_id(c));
    *seq_id = q->id;
    free(packed64);
    return OSCAR_OK;
fail:
    free(ss);
    free(rowf);
    free(tokens);
    free(packed64);
    free(packed);
    free(table);
    return st;
}
