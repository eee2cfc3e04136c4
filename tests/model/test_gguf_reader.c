/*
 * test_gguf_reader.c - the GGUF reader (model/gguf.c) on files written here
 * byte by byte: a valid two-tensor file opens and its tensors are found;
 * a file whose two tensors share a name is refused (they would shadow each
 * other); a header claiming more entries than the file can hold, a tensor
 * whose data lies past the end and a truncated key are refused with a
 * message, never a crash. Regressions for issue 13's reader defects.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"

static int failures = 0, checks = 0;
#define CHECK(cond, ...)                                                                               \
    do {                                                                                               \
        checks++;                                                                                      \
        if (!(cond)) {                                                                                 \
            failures++;                                                                                \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                \
            printf(__VA_ARGS__);                                                                       \
            printf("\n");                                                                              \
        }                                                                                              \
    } while (0)

typedef struct buf {
    unsigned char b[4096];
    size_t n;
} buf;

static void u32(buf *f, uint32_t x) {
    for (int i = 0; i < 4; i++) f->b[f->n++] = (unsigned char)(x >> (8 * i));
}
static void u64(buf *f, uint64_t x) {
    for (int i = 0; i < 8; i++) f->b[f->n++] = (unsigned char)(x >> (8 * i));
}
static void str(buf *f, const char *s) {
    u64(f, strlen(s));
    memcpy(f->b + f->n, s, strlen(s));
    f->n += strlen(s);
}

/* a GGUF v3 file: one u32 metadata entry, tensors of 4 f32 named names[i] */
static void build(buf *f, const char *const *names, int nt, uint64_t claim_kv, uint64_t data_off_extra) {
    f->n = 0;
    memcpy(f->b, "GGUF", 4);
    f->n = 4;
    u32(f, 3);
    u64(f, (uint64_t)nt);
    u64(f, claim_kv);
    str(f, "general.alignment");
    u32(f, GGUF_V_U32);
    u32(f, 32);
    for (int i = 0; i < nt; i++) {
        str(f, names[i]);
        u32(f, 1);
        u64(f, 4);
        u32(f, GGML_T_F32);
        u64(f, (uint64_t)i * 32 + (i == nt - 1 ? data_off_extra : 0));
    }
    while (f->n % 32) f->b[f->n++] = 0;
    for (int i = 0; i < nt * 32; i++) f->b[f->n++] = (unsigned char)i;
}

static gguf_file *open_buf(const buf *f, char *err, size_t errn) {
    const char *path = "test_gguf_reader.tmp.gguf";
    FILE *fp = fopen(path, "wb");
    if (!fp) return NULL;
    fwrite(f->b, 1, f->n, fp);
    fclose(fp);
    gguf_file *g = gguf_open(path, err, errn);
    remove(path);
    return g;
}

int main(void) {
    char err[512];
    buf f;
    const char *ok[] = {"a.weight", "b.weight"}, *dup[] = {"a.weight", "a.weight"};
    build(&f, ok, 2, 1, 0);
    err[0] = 0;
    gguf_file *g = open_buf(&f, err, sizeof err);
    CHECK(g != NULL, "a valid file was refused: %s", err);
    if (g) {
        CHECK(gguf_find_tensor(g, "a.weight") && gguf_find_tensor(g, "b.weight"), "tensors not found");
        gguf_close(g);
    }
    build(&f, dup, 2, 1, 0);
    err[0] = 0;
    g = open_buf(&f, err, sizeof err);
    CHECK(g == NULL && strstr(err, "appears twice"), "duplicate tensor names accepted (%s)", err);
    if (g) gguf_close(g);
    build(&f, ok, 2, 1ull << 40, 0);
    err[0] = 0;
    g = open_buf(&f, err, sizeof err);
    CHECK(g == NULL && err[0], "a header claiming 2^40 metadata entries was accepted");
    if (g) gguf_close(g);
    build(&f, ok, 2, 1, 4096);
    err[0] = 0;
    g = open_buf(&f, err, sizeof err);
    CHECK(g == NULL && strstr(err, "outside the file"), "a tensor past the end was accepted (%s)", err);
    if (g) gguf_close(g);
    /* a key whose length runs past the end of the file */
    build(&f, ok, 2, 1, 0);
    for (int i = 0; i < 8; i++) f.b[24 + i] = 0xff; /* general.alignment's key length */
    err[0] = 0;
    g = open_buf(&f, err, sizeof err);
    CHECK(g == NULL && err[0], "a key longer than the file was accepted");
    if (g) gguf_close(g);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures != 0;
}
