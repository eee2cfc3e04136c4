/*
 * fuzz_gguf - the GGUF reader (model/gguf.c) and model loading
 * (model/llama.c, model/tokenizer.c) on arbitrary files.
 *
 * gguf_open must either refuse the file with a message or give a file whose
 * every key, string, string array and tensor can be read within the mapping
 * (ASan checks the reads); llama_load must refuse it with a message or give
 * a model whose tokenizer encodes and decodes a fixed text.
 */
#include "fuzz_common.h"

#include "gguf.h"
#include "llama.h"
#include "tokenizer.h"

#include <math.h>
#include <string.h>

static void walk_file(const gguf_file *f) {
    volatile uint64_t sink = 0;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const gguf_kv *kv = &f->kv[i];
        for (uint64_t j = 0; j < kv->key.len; j++) sink += (uint8_t)kv->key.ptr[j];
        char key[256];
        const size_t n = kv->key.len < sizeof key - 1 ? (size_t)kv->key.len : sizeof key - 1;
        memcpy(key, kv->key.ptr, n);
        key[n] = 0;
        char *s = gguf_get_string(f, key);
        free(s);
        uint32_t u;
        float x;
        int b;
        gguf_get_u32(f, key, &u);
        gguf_get_f32(f, key, &x);
        gguf_get_bool(f, key, &b);
        if (kv->type == GGUF_V_ARRAY && kv->arr_type == GGUF_V_STRING) {
            uint64_t pos = 0;
            const uint8_t *cur = NULL;
            gguf_str str;
            uint64_t seen = 0;
            while (gguf_array_next_string(kv, &pos, &cur, &str) == 0) {
                if (str.len) sink += (uint8_t)str.ptr[str.len - 1];
                seen++;
            }
            FUZZ_REQUIRE(seen == kv->arr_n, "string array %s: %llu of %llu elements readable", key,
                         (unsigned long long)seen, (unsigned long long)kv->arr_n);
        }
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        FUZZ_REQUIRE(gguf_find_tensor(f, t->name) == t, "tensor %s is not found by its name", t->name);
        if (t->n_bytes) sink += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->n_bytes - 1];
        uint64_t be, bb;
        /* dequantise the first row (bounded) of a type the runner reads */
        if (ggml_type_supported(t->type) && ggml_type_block(t->type, &be, &bb) && t->ne[0] % be == 0 &&
            t->ne[0] <= 4096 && t->ne[0] > 0) {
            float row[4096];
            ggml_dequantize_row(t->type, t->data, row, (int64_t)t->ne[0]);
            sink += (uint64_t)(row[0] == row[0]);
        }
    }
    (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64], err[512];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0) return 0;
    err[0] = 0;
    gguf_file *f = gguf_open(path, err, sizeof err);
    FUZZ_REQUIRE(f || err[0], "gguf_open failed without a message");
    if (f) {
        walk_file(f);
        gguf_close(f);
    }
    err[0] = 0;
    llama_model *m = llama_load(path, 0, err, sizeof err);
    FUZZ_REQUIRE(m || err[0], "llama_load failed without a message");
    if (m) {
        /* what the forward pass relies on (model/llama.c, llama_forward) */
        FUZZ_REQUIRE(m->n_layers >= 1 && m->dim >= 1 && m->n_heads >= 1 && m->n_kv_heads >= 1 &&
                         m->n_heads % m->n_kv_heads == 0 && m->head_dim >= 2 && m->rope_dim >= 2 &&
                         m->rope_dim <= m->head_dim && m->rope_dim % 2 == 0 && m->ctx_max >= 1,
                     "loaded a model of layers %d dim %d heads %d/%d head_dim %d rope_dim %d context %d", m->n_layers,
                     m->dim, m->n_heads, m->n_kv_heads, m->head_dim, m->rope_dim, m->ctx_max);
        FUZZ_REQUIRE(m->eps > 0.0f && m->eps < INFINITY && m->rope_base > 1.0f && m->rope_base < INFINITY,
                     "loaded a model with RMS epsilon %g, RoPE base %g", (double)m->eps, (double)m->rope_base);
        static const char text[] = "the oscar <|im_start|>user\nna\xc3\xafve \xff 12";
        int32_t *ids = NULL;
        size_t n = 0, cap = 0;
        for (int special = 0; special < 2; special++) {
            n = 0;
            FUZZ_REQUIRE(tok_encode(m->tok, text, sizeof text - 1, special, &ids, &n, &cap) == 0, "encode failed");
            for (size_t i = 0; i < n; i++) {
                FUZZ_REQUIRE(ids[i] >= 0 && ids[i] < tok_vocab_size(m->tok), "encode gave id %d of %d", ids[i],
                             tok_vocab_size(m->tok));
                char buf[64];
                tok_decode(m->tok, ids[i], buf, sizeof buf);
            }
        }
        free(ids);
        char *sys = NULL;
        tok_chatml(m->file, m->tok, &sys);
        free(sys);
        llama_free(m);
    }
    close(fd);
    return 0;
}
