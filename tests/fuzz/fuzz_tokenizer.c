/*
 * fuzz_tokenizer - byte-level BPE (model/tokenizer.c) on arbitrary bytes.
 *
 * The vocabulary is tests/fuzz/tokenizer/tokenizer.gguf (every byte, a few
 * merges, control tokens), or the GGUF named by $OSCAR_FUZZ_TOKENIZER (e.g.
 * a real model, for long local runs). Input: byte 0 holds options (bit 0:
 * parse control-token spellings), the rest is the text. Checked:
 *  - every id is in the vocabulary;
 *  - without special parsing, decoding the ids gives back exactly the input
 *    bytes (byte-level BPE loses nothing, valid UTF-8 or not), except bytes
 *    the vocabulary has no token for (none in the committed one);
 *  - with it, the same holds, control tokens decoding to their spelling;
 *  - the pre-tokenizer's pieces concatenate to the input.
 */
#include "fuzz_common.h"

#include "gguf.h"
#include "tokenizer.h"

#include <string.h>

#ifndef OSCAR_FUZZ_TOKENIZER_GGUF
#define OSCAR_FUZZ_TOKENIZER_GGUF "tests/fuzz/tokenizer/tokenizer.gguf"
#endif

static gguf_file *g_file;
static tokenizer *g_tok;
/* Bytes the vocabulary has no token for (a real vocabulary trained on valid
 * UTF-8 may lack 0xC0, 0xC1, 0xF5..0xFF): encoding drops them, as the
 * reference tokenizers do, so the round trip is checked without them. */
static unsigned char g_dropped[256];

static void unload(void) {
    tok_free(g_tok);
    gguf_close(g_file);
}

static void load_once(void) {
    if (g_tok) return;
    const char *path = getenv("OSCAR_FUZZ_TOKENIZER");
    if (!path) path = OSCAR_FUZZ_TOKENIZER_GGUF;
    char err[512] = "";
    g_file = gguf_open(path, err, sizeof err);
    if (g_file) g_tok = tok_load(g_file, err, sizeof err);
    if (!g_tok) {
        fprintf(stderr, "fuzz_tokenizer: cannot load the vocabulary %s: %s\n", path, err);
        exit(2);
    }
    atexit(unload);
    for (int b = 0; b < 256; b++) {
        const char one = (char)b;
        int32_t *ids = NULL;
        size_t n = 0, cap = 0;
        tok_encode(g_tok, &one, 1, 0, &ids, &n, &cap);
        g_dropped[b] = n == 0;
        free(ids);
        /* the committed vocabulary spells every byte: nothing may drop */
        FUZZ_REQUIRE(!g_dropped[b] || getenv("OSCAR_FUZZ_TOKENIZER"), "byte 0x%02x cannot be encoded", b);
    }
}

typedef struct pieces {
    unsigned char *buf;
    size_t n, cap;
} pieces;

static void collect(const char *piece, size_t n, void *ctx) {
    pieces *p = (pieces *)ctx;
    FUZZ_REQUIRE(n > 0, "the pre-tokenizer produced an empty piece");
    FUZZ_REQUIRE(p->n + n <= p->cap, "the pre-tokenizer produced more bytes than its input");
    memcpy(p->buf + p->n, piece, n);
    p->n += n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    load_once();
    if (size == 0) return 0;
    const int parse_special = data[0] & 1;
    const char *text = (const char *)data + 1;
    const size_t len = size - 1;

    pieces p = {malloc(len + 1), 0, len};
    tok_pretokenize(g_tok, text, len, collect, &p);
    FUZZ_REQUIRE(p.n == len && memcmp(p.buf, text, len) == 0, "the pre-tokenizer's pieces do not spell the input");
    free(p.buf);

    int32_t *ids = NULL;
    size_t n = 0, cap = 0;
    FUZZ_REQUIRE(tok_encode(g_tok, text, len, parse_special, &ids, &n, &cap) == 0, "encode failed (out of memory?)");
    FUZZ_REQUIRE(n <= len, "%zu ids for %zu bytes", n, len);
    unsigned char *back = malloc(len + 1);
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        FUZZ_REQUIRE(ids[i] >= 0 && ids[i] < tok_vocab_size(g_tok), "id %d out of range", ids[i]);
        FUZZ_REQUIRE(parse_special || !tok_is_control(g_tok, ids[i]), "control token %d from plain text", ids[i]);
        char buf[256];
        size_t k = tok_decode(g_tok, ids[i], buf, sizeof buf);
        FUZZ_REQUIRE(k <= sizeof buf && w + k <= len, "decoding gives more bytes than the input");
        memcpy(back + w, buf, k);
        w += k;
    }
    /* the input without the bytes the vocabulary cannot spell */
    unsigned char *kept = malloc(len + 1);
    size_t nk = 0;
    for (size_t i = 0; i < len; i++)
        if (!g_dropped[(unsigned char)text[i]]) kept[nk++] = (unsigned char)text[i];
    FUZZ_REQUIRE(w == nk && memcmp(back, kept, nk) == 0, "decode(encode(text)) != text (%zu bytes back of %zu)", w, nk);
    free(kept);
    free(back);
    free(ids);
    return 0;
}
