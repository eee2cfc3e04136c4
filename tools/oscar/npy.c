/* Minimal .npy reader/writer for little-endian float32 C-order arrays. Every
 * field of the header is checked, so a wrong dtype, rank, shape or a
 * truncated file gives a message instead of garbage. */
#include "npy.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(char *err, size_t n, const char *path, const char *msg) {
    snprintf(err, n, "%s: %s", path, msg);
    return -1;
}

/* Finds 'key': in the header dict and returns a pointer just after the colon. */
static const char *dict_value(const char *hdr, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "'%s'", key);
    const char *p = strstr(hdr, pat);
    if (!p) return NULL;
    p += strlen(pat);
    while (*p == ' ') p++;
    if (*p != ':') return NULL;
    p++;
    while (*p == ' ') p++;
    return p;
}

static int read_f32(const char *path, npy_array *out, char *err, size_t errn) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errn, path, "cannot open file");
    unsigned char pre[10];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        fclose(f);
        return fail(err, errn, path, "not a .npy file (bad magic)");
    }
    int major = pre[6];
    size_t hlen;
    if (major == 1) {
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    } else if (major == 2 || major == 3) {
        unsigned char b2[2];
        if (fread(b2, 1, 2, f) != 2) {
            fclose(f);
            return fail(err, errn, path, "truncated header");
        }
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)b2[0] << 16 | (size_t)b2[1] << 24;
    } else {
        fclose(f);
        return fail(err, errn, path, "unsupported .npy version");
    }
    if (hlen == 0 || hlen > (1u << 20)) {
        fclose(f);
        return fail(err, errn, path, "implausible header length");
    }
    char *hdr = (char *)malloc(hlen + 1);
    if (!hdr || fread(hdr, 1, hlen, f) != hlen) {
        free(hdr);
        fclose(f);
        return fail(err, errn, path, "truncated header");
    }
    hdr[hlen] = 0;
    const char *descr = dict_value(hdr, "descr");
    const char *fo = dict_value(hdr, "fortran_order");
    const char *sh = dict_value(hdr, "shape");
    if (!descr || !fo || !sh) {
        free(hdr);
        fclose(f);
        return fail(err, errn, path, "header lacks descr, fortran_order or shape");
    }
    if (strncmp(descr, "'<f4'", 5) != 0) {
        char msg[96];
        int n = 0;
        while (descr[n] && descr[n] != ',' && n < 20) n++;
        snprintf(msg, sizeof msg, "dtype is %.*s, expected little-endian float32 '<f4'", n, descr);
        free(hdr);
        fclose(f);
        return fail(err, errn, path, msg);
    }
    if (strncmp(fo, "False", 5) != 0) {
        free(hdr);
        fclose(f);
        return fail(err, errn, path, "Fortran-order arrays are not supported; save with C order");
    }
    if (*sh != '(') {
        free(hdr);
        fclose(f);
        return fail(err, errn, path, "malformed shape");
    }
    sh++;
    int64_t count = 1;
    for (;;) {
        while (*sh == ' ') sh++;
        if (*sh == ')') break;
        if (!isdigit((unsigned char)*sh)) {
            free(hdr);
            fclose(f);
            return fail(err, errn, path, "malformed shape");
        }
        char *end;
        long long v = strtoll(sh, &end, 10);
        if (out->ndim >= NPY_MAX_DIMS || v < 0 || v > (1ll << 40)) {
            free(hdr);
            fclose(f);
            return fail(err, errn, path, "shape has too many dimensions or a huge extent");
        }
        out->shape[out->ndim++] = v;
        /* checked before multiplying: count <= 2^36 and v <= 2^40 would
         * overflow int64 */
        if (v != 0 && count > (1ll << 36) / v) {
            free(hdr);
            fclose(f);
            return fail(err, errn, path, "array too large");
        }
        count *= v;
        if (count > (1ll << 36)) {
            free(hdr);
            fclose(f);
            return fail(err, errn, path, "array too large");
        }
        sh = end;
        while (*sh == ' ') sh++;
        if (*sh == ',') sh++;
    }
    free(hdr);
    out->count = count;
    /* the file must hold the data before anything is allocated for it */
    {
        const long here = ftell(f);
        long end = -1;
        if (here >= 0 && fseek(f, 0, SEEK_END) == 0) end = ftell(f);
        if (end < 0 || fseek(f, here, SEEK_SET) != 0) {
            fclose(f);
            return fail(err, errn, path, "cannot seek in the file");
        }
        if ((long long)(end - here) < count * 4) {
            char msg[128];
            snprintf(msg, sizeof msg, "truncated: header says %lld floats, file holds %lld bytes of data",
                     (long long)count, (long long)(end - here));
            fclose(f);
            return fail(err, errn, path, msg);
        }
    }
    out->data = (float *)malloc(count ? (size_t)count * 4 : 4);
    if (!out->data) {
        fclose(f);
        return fail(err, errn, path, "out of memory");
    }
    size_t got = fread(out->data, 4, (size_t)count, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (got != (size_t)count) {
        char msg[128];
        snprintf(msg, sizeof msg, "truncated: header says %lld floats, file holds %zu", (long long)count, got);
        npy_free(out);
        return fail(err, errn, path, msg);
    }
    if (extra) {
        npy_free(out);
        return fail(err, errn, path, "file is longer than its header says");
    }
    return 0;
}

/* npy.h promises an empty array on failure: the shape parsed before a later
 * check failed (a truncated file, say) must not stay behind (found by
 * tests/fuzz/fuzz_npy.c). */
int npy_read_f32(const char *path, npy_array *out, char *err, size_t errn) {
    if (read_f32(path, out, err, errn) == 0) return 0;
    npy_free(out);
    memset(out, 0, sizeof *out);
    return -1;
}

int npy_write_f32(const char *path, const float *data, const int64_t *shape, int ndim, char *err, size_t errn) {
    char dict[256];
    int n = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (");
    int64_t count = 1;
    for (int i = 0; i < ndim; i++) {
        n += snprintf(dict + n, sizeof dict - (size_t)n, "%lld,%s", (long long)shape[i], i + 1 < ndim ? " " : "");
        count *= shape[i];
    }
    n += snprintf(dict + n, sizeof dict - (size_t)n, "), }");
    /* Pad so the data starts at a multiple of 64 bytes, newline-terminated. */
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) return fail(err, errn, path, "cannot create file");
    unsigned hl = (unsigned)(n + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hl & 0xff), (unsigned char)(hl >> 8)};
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(dict, 1, (size_t)n, f) == (size_t)n;
    for (int i = 0; i < pad && ok; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF && fwrite(data, 4, (size_t)count, f) == (size_t)count;
    ok = (fclose(f) == 0) && ok;
    return ok ? 0 : fail(err, errn, path, "write failed");
}

void npy_free(npy_array *a) {
    free(a->data);
    a->data = NULL;
}
