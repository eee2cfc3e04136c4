/*
 * tokenizer.h - tokenizers read from GGUF metadata: GPT-2 style byte-level
 * BPE (tokenizer.ggml.model == "gpt2"), with the pre-tokenizer the file names
 * in tokenizer.ggml.pre, and SentencePiece BPE ("llama": merges by token
 * score, U+2581 for spaces, <0xXX> byte fallback; Gemma 3) as llama.cpp runs it.
 */
#ifndef OSCAR_MODEL_TOKENIZER_H
#define OSCAR_MODEL_TOKENIZER_H

#include "gguf.h"
#include <stddef.h>
#include <stdint.h>

typedef struct tokenizer tokenizer;

tokenizer *tok_load(const gguf_file *f, char *err, size_t err_size);
void tok_free(tokenizer *t);

int tok_vocab_size(const tokenizer *t);
int tok_bos(const tokenizer *t);  /* -1 if none */
int tok_eos(const tokenizer *t);
int tok_unk(const tokenizer *t);  /* -1 if none */
int tok_add_bos(const tokenizer *t);
/* Control tokens (type 3) are never produced from plain text and end generation. */
int tok_is_control(const tokenizer *t, int id);
/* Id of a control/user-defined token spelled exactly `text`, or -1. */
int tok_special_id(const tokenizer *t, const char *text);

/* Encodes UTF-8 text. With parse_special, control-token spellings in the text
 * become those tokens. Appends to *ids (realloc'ed, capacity *cap, count *n).
 * Returns 0, or -1 when out of memory. */
int tok_encode(const tokenizer *t, const char *text, size_t len, int parse_special, int32_t **ids,
               size_t *n, size_t *cap);

/* Writes the bytes of token id into buf (up to cap, not NUL-terminated) and
 * returns the byte count (which may exceed cap: then the output is cut). */
size_t tok_decode(const tokenizer *t, int id, char *buf, size_t cap);

/* Chat template support: 1 if the model's template is ChatML
 * (<|im_start|>role\ncontent<|im_end|>\n). *default_system is the system
 * message the template inserts when none is given (malloc'ed, may be NULL). */
int tok_chatml(const gguf_file *f, const tokenizer *t, char **default_system);

/* Pre-tokenizer alone (for tests): calls cb for each piece. */
void tok_pretokenize(const tokenizer *t, const char *text, size_t len,
                     void (*cb)(const char *piece, size_t n, void *ctx), void *ctx);

#endif
