/*
 * gguf.c - GGUF reader. See gguf.h.
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */

typedef struct reader {
    const uint8_t *base;
    size_t size, pos;
    char *err;
    size_t err_size;
    int failed;
} reader;

static void rfail(reader *r, const char *fmt, ...) {
    if (r->failed) return;
    r->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, r->err_size, fmt, ap);
    va_end(ap);
}

static int rneed(reader *r, uint64_t n, const char *what) {
    if (r->failed) return 0;
    if (n > r->size - r->pos) {
        rfail(r, "truncated file: %s at offset %zu needs %llu bytes, file has %zu", what, r->pos,
              (unsigned long long)n, r->size);
        return 0;
    }
    return 1;
}

/* Little-endian loads that do not assume alignment. */
static uint64_t load_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint64_t rget(reader *r, int n, const char *what) {
    if (!rneed(r, (uint64_t)n, what)) return 0;
    uint64_t v = load_le(r->base + r->pos, n);
    r->pos += (size_t)n;
    return v;
}

/* A key for "%.*s" in a message: at most 200 bytes shown, so a length past
 * INT_MAX never turns into a negative precision. */
#define KEYP(s) (int)((s).len > 200 ? 200 : (s).len), (s).ptr

static gguf_str rstr(reader *r, const char *what) {
    gguf_str s = {0, 0};
    uint64_t len = rget(r, 8, what);
    if (r->failed) return s;
    if (!rneed(r, len, what)) return s;
    s.ptr = (const char *)(r->base + r->pos);
    s.len = len;
    r->pos += (size_t)len;
    return s;
}

static int scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_V_U8: case GGUF_V_I8: case GGUF_V_BOOL: return 1;
    case GGUF_V_U16: case GGUF_V_I16: return 2;
    case GGUF_V_U32: case GGUF_V_I32: case GGUF_V_F32: return 4;
    case GGUF_V_U64: case GGUF_V_I64: case GGUF_V_F64: return 8;
    default: return 0;
    }
}

static void read_scalar(reader *r, uint32_t t, gguf_kv *kv) {
    int n = scalar_size(t);
    uint64_t raw = rget(r, n, "metadata value");
    switch (t) {
    case GGUF_V_I8: kv->num.i = (int8_t)raw; break;
    case GGUF_V_I16: kv->num.i = (int16_t)raw; break;
    case GGUF_V_I32: kv->num.i = (int32_t)raw; break;
    case GGUF_V_I64: kv->num.i = (int64_t)raw; break;
    case GGUF_V_F32: { uint32_t b = (uint32_t)raw; float f; memcpy(&f, &b, 4); kv->num.f = f; break; }
    case GGUF_V_F64: { double d; memcpy(&d, &raw, 8); kv->num.f = d; break; }
    default: kv->num.u = raw; break;
    }
}

static void read_value(reader *r, gguf_kv *kv) {
    uint32_t t = kv->type;
    if (t == GGUF_V_STRING) {
        kv->str = rstr(r, "string value");
    } else if (t == GGUF_V_ARRAY) {
        kv->arr_type = (uint32_t)rget(r, 4, "array type");
        kv->arr_n = rget(r, 8, "array length");
        if (r->failed) return;
        kv->arr_data = r->base + r->pos;
        if (kv->arr_type == GGUF_V_STRING) {
            for (uint64_t i = 0; i < kv->arr_n && !r->failed; i++) rstr(r, "array string");
        } else {
            int es = scalar_size(kv->arr_type);
            if (es == 0) {
                rfail(r, "metadata '%.*s': unsupported array element type %u", KEYP(kv->key), kv->arr_type);
                return;
            }
            if (kv->arr_n > (r->size - r->pos) / (uint64_t)es) {
                rfail(r, "truncated file: array '%.*s' of %llu elements", KEYP(kv->key), (unsigned long long)kv->arr_n);
                return;
            }
            r->pos += (size_t)(kv->arr_n * (uint64_t)es);
        }
    } else if (scalar_size(t)) {
        read_scalar(r, t, kv);
    } else {
        rfail(r, "metadata '%.*s': unknown value type %u", KEYP(kv->key), t);
    }
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const gguf_tensor *const *)a)->name, (*(const gguf_tensor *const *)b)->name);
}

const char *ggml_type_name(uint32_t type) {
    switch (type) {
    case GGML_T_F32: return "F32";
    case GGML_T_F16: return "F16";
    case GGML_T_Q4_0: return "Q4_0";
    case GGML_T_Q4_1: return "Q4_1";
    case GGML_T_Q5_0: return "Q5_0";
    case GGML_T_Q5_1: return "Q5_1";
    case GGML_T_Q8_0: return "Q8_0";
    case GGML_T_Q8_1: return "Q8_1";
    case GGML_T_Q2_K: return "Q2_K";
    case GGML_T_Q3_K: return "Q3_K";
    case GGML_T_Q4_K: return "Q4_K";
    case GGML_T_Q5_K: return "Q5_K";
    case GGML_T_Q6_K: return "Q6_K";
    case GGML_T_Q8_K: return "Q8_K";
    case GGML_T_BF16: return "BF16";
    default: return "unknown";
    }
}

int ggml_type_block(uint32_t type, uint64_t *be, uint64_t *bb) {
    switch (type) {
    case GGML_T_F32: *be = 1; *bb = 4; return 1;
    case GGML_T_F16: case GGML_T_BF16: *be = 1; *bb = 2; return 1;
    case GGML_T_Q4_0: *be = 32; *bb = 18; return 1;
    case GGML_T_Q4_1: *be = 32; *bb = 20; return 1;
    case GGML_T_Q5_0: *be = 32; *bb = 22; return 1;
    case GGML_T_Q5_1: *be = 32; *bb = 24; return 1;
    case GGML_T_Q8_0: *be = 32; *bb = 34; return 1;
    case GGML_T_Q8_1: *be = 32; *bb = 36; return 1;
    case GGML_T_Q2_K: *be = 256; *bb = 84; return 1;
    case GGML_T_Q3_K: *be = 256; *bb = 110; return 1;
    case GGML_T_Q4_K: *be = 256; *bb = 144; return 1;
    case GGML_T_Q5_K: *be = 256; *bb = 176; return 1;
    case GGML_T_Q6_K: *be = 256; *bb = 210; return 1;
    case GGML_T_Q8_K: *be = 256; *bb = 292; return 1;
    default: *be = 0; *bb = 0; return 0;
    }
}

int ggml_type_supported(uint32_t type) {
    switch (type) {
    case GGML_T_F32: case GGML_T_F16: case GGML_T_BF16: case GGML_T_Q4_0:
    case GGML_T_Q4_1: case GGML_T_Q5_0: case GGML_T_Q8_0: case GGML_T_Q4_K: case GGML_T_Q6_K: return 1;
    default: return 0;
    }
}

float gguf_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: value = man * 2^-24 */
            float f = ldexpf((float)man, -24);
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float ld_f16(const uint8_t *p) { return gguf_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

void ggml_q4_k_scale_min(const uint8_t *scales, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = scales[j] & 63;
        *m = scales[j + 4] & 63;
    } else {
        *sc = (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4);
        *m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

void ggml_dequantize_row(uint32_t type, const void *src, float *dst, int64_t n) {
    const uint8_t *p = (const uint8_t *)src;
    switch (type) {
    case GGML_T_F32:
        memcpy(dst, p, (size_t)n * 4);
        break;
    case GGML_T_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = ld_f16(p + 2 * i);
        break;
    case GGML_T_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint32_t b = (uint32_t)(p[2 * i] | (p[2 * i + 1] << 8)) << 16;
            memcpy(dst + i, &b, 4);
        }
        break;
    case GGML_T_Q4_0: /* d:f16, 16 bytes; element j is the low nibble of byte j, j+16 the high one */
        for (int64_t b = 0; b < n / 32; b++, p += 18, dst += 32) {
            float d = ld_f16(p);
            for (int j = 0; j < 16; j++) {
                dst[j] = (float)((p[2 + j] & 15) - 8) * d;
                dst[j + 16] = (float)((p[2 + j] >> 4) - 8) * d;
            }
        }
        break;
    case GGML_T_Q4_1: /* d:f16, m:f16, 16 bytes; x = q*d + m */
        for (int64_t b = 0; b < n / 32; b++, p += 20, dst += 32) {
            float d = ld_f16(p), m = ld_f16(p + 2);
            for (int j = 0; j < 16; j++) {
                dst[j] = (float)(p[4 + j] & 15) * d + m;
                dst[j + 16] = (float)(p[4 + j] >> 4) * d + m;
            }
        }
        break;
    case GGML_T_Q5_0: /* d:f16, qh:u32 (bit j: 5th bit of element j), 16 bytes of low nibbles as Q4_0 */
        for (int64_t b = 0; b < n / 32; b++, p += 22, dst += 32) {
            float d = ld_f16(p);
            uint32_t qh = (uint32_t)p[2] | (uint32_t)p[3] << 8 | (uint32_t)p[4] << 16 | (uint32_t)p[5] << 24;
            for (int j = 0; j < 16; j++) {
                dst[j] = (float)((int)((p[6 + j] & 15) | ((qh >> j) & 1) << 4) - 16) * d;
                dst[j + 16] = (float)((int)((p[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16) * d;
            }
        }
        break;
    case GGML_T_Q4_K: /* d:f16, dmin:f16, 12 bytes of 6-bit scales/mins, qs[128] */
        for (int64_t b = 0; b < n / 256; b++, p += 144) {
            float d = ld_f16(p), dmin = ld_f16(p + 2);
            const uint8_t *q = p + 16;
            for (int j = 0; j < 8; j += 2, q += 32, dst += 64) {
                int sc0, m0, sc1, m1;
                ggml_q4_k_scale_min(p + 4, j, &sc0, &m0);
                ggml_q4_k_scale_min(p + 4, j + 1, &sc1, &m1);
                for (int l = 0; l < 32; l++) {
                    dst[l] = d * (float)sc0 * (float)(q[l] & 15) - dmin * (float)m0;
                    dst[l + 32] = d * (float)sc1 * (float)(q[l] >> 4) - dmin * (float)m1;
                }
            }
        }
        break;
    case GGML_T_Q8_0: /* d:f16, 32 int8 */
        for (int64_t b = 0; b < n / 32; b++, p += 34, dst += 32) {
            float d = ld_f16(p);
            for (int j = 0; j < 32; j++) dst[j] = (float)(int8_t)p[2 + j] * d;
        }
        break;
    case GGML_T_Q6_K: /* ql[128] low nibbles, qh[64] high 2 bits, scales[16] int8, d:f16 */
        for (int64_t b = 0; b < n / 256; b++, p += 210) {
            const uint8_t *ql = p, *qh = p + 128;
            const int8_t *sc = (const int8_t *)(p + 192);
            float d = ld_f16(p + 208);
            for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, dst += 128) {
                for (int l = 0; l < 32; l++) {
                    int is = l / 16;
                    int q1 = (int)((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
                    int q2 = (int)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    dst[l] = d * sc[is] * q1;
                    dst[l + 32] = d * sc[is + 2] * q2;
                    dst[l + 64] = d * sc[is + 4] * q3;
                    dst[l + 96] = d * sc[is + 6] * q4;
                }
            }
        }
        break;
    default:
        /* callers check ggml_type_supported first */
        memset(dst, 0, (size_t)n * sizeof(float));
        break;
    }
}

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key) {
    size_t kl = strlen(key);
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (f->kv[i].key.len == kl && memcmp(f->kv[i].key.ptr, key, kl) == 0) return &f->kv[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv) return -1;
    switch (kv->type) {
    case GGUF_V_U8: case GGUF_V_U16: case GGUF_V_U32: case GGUF_V_U64:
        if (kv->num.u > UINT32_MAX) return -1;
        *out = (uint32_t)kv->num.u;
        return 0;
    case GGUF_V_I8: case GGUF_V_I16: case GGUF_V_I32: case GGUF_V_I64:
        if (kv->num.i < 0 || kv->num.i > (int64_t)UINT32_MAX) return -1;
        *out = (uint32_t)kv->num.i;
        return 0;
    default: return -1;
    }
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || (kv->type != GGUF_V_F32 && kv->type != GGUF_V_F64)) return -1;
    *out = (float)kv->num.f;
    return 0;
}

int gguf_get_bool(const gguf_file *f, const char *key, int *out) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || kv->type != GGUF_V_BOOL) return -1;
    *out = kv->num.u != 0;
    return 0;
}

char *gguf_get_string(const gguf_file *f, const char *key) {
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || kv->type != GGUF_V_STRING) return NULL;
    char *s = malloc((size_t)kv->str.len + 1);
    if (!s) return NULL;
    memcpy(s, kv->str.ptr, (size_t)kv->str.len);
    s[kv->str.len] = 0;
    return s;
}

int gguf_array_next_string(const gguf_kv *kv, uint64_t *pos, const uint8_t **cursor, gguf_str *s) {
    if (kv->type != GGUF_V_ARRAY || kv->arr_type != GGUF_V_STRING || *pos >= kv->arr_n) return -1;
    if (*pos == 0) *cursor = kv->arr_data;
    /* lengths were bounds-checked when the file was opened */
    s->len = load_le(*cursor, 8);
    s->ptr = (const char *)(*cursor + 8);
    *cursor += 8 + s->len;
    (*pos)++;
    return 0;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    if (f->map) munmap((void *)f->map, f->size);
    if (f->fd >= 0) close(f->fd);
    free(f->kv);
    free(f->tensors);
    free(f);
}

gguf_file *gguf_open(const char *path, char *err, size_t err_size) {
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) {
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    f->fd = open(path, O_RDONLY);
    if (f->fd < 0) {
        snprintf(err, err_size, "cannot open '%s': %s", path, strerror(errno));
        gguf_close(f);
        return NULL;
    }
    struct stat st;
    if (fstat(f->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, err_size, "'%s' is not a regular file", path);
        gguf_close(f);
        return NULL;
    }
    f->size = (size_t)st.st_size;
    if (f->size < 24) {
        snprintf(err, err_size, "'%s' is too small (%zu bytes) to be a GGUF file", path, f->size);
        gguf_close(f);
        return NULL;
    }
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, f->fd, 0);
    if (m == MAP_FAILED) {
        snprintf(err, err_size, "cannot mmap '%s': %s", path, strerror(errno));
        gguf_close(f);
        return NULL;
    }
    f->map = m;

    reader r = {f->map, f->size, 0, err, err_size, 0};
    uint32_t magic = (uint32_t)rget(&r, 4, "magic");
    if (magic != GGUF_MAGIC) {
        snprintf(err, err_size, "'%s' is not a GGUF file (bad magic)", path);
        gguf_close(f);
        return NULL;
    }
    f->version = (uint32_t)rget(&r, 4, "version");
    if (f->version != 2 && f->version != 3) {
        snprintf(err, err_size, "'%s': GGUF version %u is not supported (2 or 3)", path, f->version);
        gguf_close(f);
        return NULL;
    }
    f->n_tensors = rget(&r, 8, "tensor count");
    f->n_kv = rget(&r, 8, "metadata count");
    /* Each entry takes at least 12 (kv) or 24 (tensor) bytes: a cheap upper bound
     * that keeps a hostile count from driving a huge allocation. */
    if (f->n_kv > f->size / 12 || f->n_tensors > f->size / 24) {
        snprintf(err, err_size, "'%s': truncated or corrupt: the header declares %llu metadata entries and %llu "
                 "tensors, more than %zu bytes can hold", path, (unsigned long long)f->n_kv,
                 (unsigned long long)f->n_tensors, f->size);
        gguf_close(f);
        return NULL;
    }
    f->kv = calloc(f->n_kv ? f->n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *f->tensors);
    if (!f->kv || !f->tensors) {
        snprintf(err, err_size, "out of memory");
        gguf_close(f);
        return NULL;
    }
    for (uint64_t i = 0; i < f->n_kv && !r.failed; i++) {
        gguf_kv *kv = &f->kv[i];
        kv->key = rstr(&r, "metadata key");
        kv->type = (uint32_t)rget(&r, 4, "metadata type");
        if (!r.failed) read_value(&r, kv);
    }
    f->alignment = 32;
    if (!r.failed) {
        uint32_t a;
        if (gguf_get_u32(f, "general.alignment", &a) == 0) {
            if (a == 0 || (a & (a - 1)) != 0) rfail(&r, "general.alignment %u is not a power of two", a);
            f->alignment = a;
        }
    }
    uint64_t *offs = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *offs);
    if (!offs) rfail(&r, "out of memory");
    for (uint64_t i = 0; i < f->n_tensors && !r.failed; i++) {
        gguf_tensor *t = &f->tensors[i];
        gguf_str name = rstr(&r, "tensor name");
        if (r.failed) break;
        if (name.len >= sizeof t->name) {
            rfail(&r, "tensor %llu: name longer than %zu bytes", (unsigned long long)i, sizeof t->name - 1);
            break;
        }
        memcpy(t->name, name.ptr, (size_t)name.len);
        t->name[name.len] = 0;
        t->n_dims = (uint32_t)rget(&r, 4, "tensor dims");
        if (!r.failed && (t->n_dims < 1 || t->n_dims > 4)) {
            rfail(&r, "tensor '%s': %u dimensions (1..4 allowed)", t->name, t->n_dims);
            break;
        }
        t->n_elements = 1;
        for (uint32_t d = 0; d < 4; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims && !r.failed; d++) {
            t->ne[d] = rget(&r, 8, "tensor shape");
            if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || t->n_elements > (1ull << 40) / t->ne[d]) {
                rfail(&r, "tensor '%s': bad shape", t->name);
                break;
            }
            t->n_elements *= t->ne[d];
        }
        t->type = (uint32_t)rget(&r, 4, "tensor type");
        offs[i] = rget(&r, 8, "tensor offset");
        if (r.failed) break;
        uint64_t be, bb;
        if (!ggml_type_block(t->type, &be, &bb)) {
            rfail(&r, "tensor '%s': unknown ggml type %u", t->name, t->type);
            break;
        }
        if (t->ne[0] % be != 0) {
            rfail(&r, "tensor '%s': row length %llu is not a multiple of the %s block (%llu)", t->name,
                  (unsigned long long)t->ne[0], ggml_type_name(t->type), (unsigned long long)be);
            break;
        }
        t->n_bytes = t->n_elements / be * bb;
    }
    /* two tensors of one name would shadow each other in gguf_find_tensor */
    if (!r.failed && f->n_tensors > 1) {
        const gguf_tensor **by_name = malloc(sizeof *by_name * (size_t)f->n_tensors);
        if (!by_name) {
            rfail(&r, "out of memory");
        } else {
            for (uint64_t i = 0; i < f->n_tensors; i++) by_name[i] = &f->tensors[i];
            qsort(by_name, (size_t)f->n_tensors, sizeof *by_name, cmp_tensor_name);
            for (uint64_t i = 1; i < f->n_tensors; i++)
                if (strcmp(by_name[i - 1]->name, by_name[i]->name) == 0) {
                    rfail(&r, "tensor '%s' appears twice", by_name[i]->name);
                    break;
                }
            free(by_name);
        }
    }
    if (!r.failed) {
        uint64_t data_start = (r.pos + f->alignment - 1) / f->alignment * f->alignment;
        for (uint64_t i = 0; i < f->n_tensors; i++) {
            gguf_tensor *t = &f->tensors[i];
            if (data_start > f->size || offs[i] > f->size - data_start ||
                t->n_bytes > f->size - data_start - offs[i]) {
                rfail(&r, "tensor '%s': data [%llu, +%llu) lies outside the file (%zu bytes)", t->name,
                      (unsigned long long)(data_start + offs[i]), (unsigned long long)t->n_bytes, f->size);
                break;
            }
            t->data = f->map + data_start + offs[i];
        }
    }
    free(offs);
    if (r.failed) {
        /* prefix the path once, keeping the specific reason */
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s", err);
        snprintf(err, err_size, "'%s': %s", path, tmp);
        gguf_close(f);
        return NULL;
    }
    return f;
}
