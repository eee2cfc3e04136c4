/*
 * tokenizer.c - byte-level BPE (GPT-2 family) and SentencePiece BPE (Gemma).
 * See tokenizer.h.
 *
 * GPT-2: split special tokens (optional) -> pre-tokenize into pieces -> map
 * each piece's bytes to the GPT-2 "printable byte" alphabet -> apply the
 * ranked merges inside each piece. Pieces never merge with each other, which
 * is why the pre-tokenizer must match the one the model was trained with.
 *
 * SentencePiece ("llama" in tokenizer.ggml.model), as llama.cpp's SPM
 * tokenizer: split out user-defined tokens (always) and control tokens (with
 * parse_special) -> in each fragment spaces become U+2581 -> start from the
 * UTF-8 characters and repeatedly merge the adjacent pair whose concatenation
 * is the vocabulary token of highest score (leftmost on ties) -> a character
 * that is no token is spelled by its bytes' <0xXX> tokens.
 */
#include "tokenizer.h"
#include "unicode_tables.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t key;     /* (left << 32) | right, or a string hash slot */
    int32_t value;    /* token id or merge rank */
    int32_t extra;    /* merged token id */
} slot;

struct tokenizer {
    int n_vocab;
    const char **text; /* token spelling (points into the GGUF mapping) */
    uint32_t *len;
    int32_t *type;
    int bos, eos, add_bos;
    /* string -> id, open addressing on an FNV hash; slot.value = id + 1 */
    slot *vocab_map;
    uint64_t vocab_mask;
    /* (left, right) -> (rank, merged id) */
    slot *merge_map;
    uint64_t merge_mask;
    int byte_token[256];      /* token id of each single byte */
    int16_t unbyte[512];      /* GPT-2 alphabet code point -> byte (-1 if none) */
    uint16_t byte_cp[256];    /* byte -> GPT-2 alphabet code point */
    int digits_split;         /* pre-tokenizer isolates each \p{N} first */
    int32_t *specials;        /* control and user-defined tokens, longest first */
    int n_specials;
    int spm;                  /* 1: SentencePiece BPE (scores, byte fallback), 0: GPT-2 byte-level BPE */
    float *score;             /* SentencePiece: each token's score */
    int byte_piece[256];      /* SentencePiece: the <0xXX> token of each byte, -1 if none */
    int unk;                  /* SentencePiece: the unknown token, -1 if none */
};

/* ---- hashing ----------------------------------------------------------- */

static uint64_t fnv(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static int vocab_lookup(const tokenizer *t, const char *s, size_t n) {
    uint64_t i = fnv(s, n) & t->vocab_mask;
    for (;;) {
        const slot *sl = &t->vocab_map[i];
        if (sl->value == 0) return -1;
        int id = sl->value - 1;
        if (t->len[id] == n && memcmp(t->text[id], s, n) == 0) return id;
        i = (i + 1) & t->vocab_mask;
    }
}

static const slot *merge_lookup(const tokenizer *t, int a, int b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t i = mix(key) & t->merge_mask;
    for (;;) {
        const slot *sl = &t->merge_map[i];
        if (sl->value == 0) return NULL;
        if (sl->key == key) return sl;
        i = (i + 1) & t->merge_mask;
    }
}

/* ---- UTF-8 and character classes --------------------------------------- */

/* Decodes one code point; invalid bytes decode as themselves (cp = 0xDC00+byte,
 * a lone surrogate that no class contains) so byte-level BPE still sees them. */
static uint32_t utf8_next(const uint8_t *s, size_t n, size_t *adv) {
    uint8_t c = s[0];
    if (c < 0x80) { *adv = 1; return c; }
    int need = (c >= 0xF0 && c < 0xF5) ? 3 : (c >= 0xE0 && c < 0xF0) ? 2 : (c >= 0xC2 && c < 0xE0) ? 1 : -1;
    if (need < 0 || (size_t)need + 1 > n) { *adv = 1; return 0xDC00 + c; }
    uint32_t cp = c & (0x3F >> need);
    for (int i = 1; i <= need; i++) {
        if ((s[i] & 0xC0) != 0x80) { *adv = 1; return 0xDC00 + c; }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    static const uint32_t minv[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < minv[need] || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) { *adv = 1; return 0xDC00 + c; }
    *adv = (size_t)need + 1;
    return cp;
}

static int in_ranges(uint32_t cp, const uint32_t (*r)[2], int n) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid - 1;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

static int is_letter(uint32_t cp) {
    if (cp < 128) return (cp | 32) >= 'a' && (cp | 32) <= 'z';
    return in_ranges(cp, oscar_uc_letter, oscar_uc_letter_count);
}

static int is_number(uint32_t cp) {
    if (cp < 128) return cp >= '0' && cp <= '9';
    return in_ranges(cp, oscar_uc_number, oscar_uc_number_count);
}

/* Unicode White_Space, which is what \s means in the regex engines the
 * reference tokenizers use. */
static int is_space(uint32_t cp) {
    return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

enum { C_LETTER = 1, C_NUMBER = 2, C_SPACE = 3, C_OTHER = 4 };

static int cclass(uint32_t cp) {
    if (is_letter(cp)) return C_LETTER;
    if (is_number(cp)) return C_NUMBER;
    if (is_space(cp)) return C_SPACE;
    return C_OTHER;
}

/* ---- pre-tokenizer ------------------------------------------------------ */

typedef struct {
    uint32_t cp;
    uint32_t off; /* byte offset in the input */
    uint8_t cls;
} ucp;

/*
 * The GPT-2 pattern, applied by hand to cps[0..n):
 *   's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
 * Returns the length (in code points) of the match at i. Alternatives are
 * tried in order, as a backtracking regex engine would.
 */
static size_t gpt2_match(const ucp *c, size_t n, size_t i) {
    if (c[i].cp == '\'' && i + 1 < n) {
        uint32_t a = c[i + 1].cp, b = i + 2 < n ? c[i + 2].cp : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    size_t j = i;
    if (c[j].cp == ' ' && j + 1 < n && c[j + 1].cls != C_SPACE) j++;
    int k = c[j].cls;
    if (k == C_LETTER || k == C_NUMBER || k == C_OTHER) {
        size_t e = j;
        while (e < n && c[e].cls == k) e++;
        return e - i;
    }
    /* whitespace run; leave its last char to prefix the next word */
    size_t e = i;
    while (e < n && c[e].cls == C_SPACE) e++;
    if (e == n || e - i == 1) return e - i;
    return e - i - 1;
}

typedef void (*piece_cb)(const char *piece, size_t n, void *ctx);

static void pretokenize_span(const tokenizer *t, const char *s, size_t len, piece_cb cb, void *ctx,
                             ucp *buf) {
    size_t n = 0;
    for (size_t p = 0; p < len;) {
        size_t adv;
        uint32_t cp = utf8_next((const uint8_t *)s + p, len - p, &adv);
        buf[n].cp = cp;
        buf[n].off = (uint32_t)p;
        buf[n].cls = (uint8_t)cclass(cp);
        n++;
        p += adv;
    }
    size_t i = 0;
    while (i < n) {
        size_t end;
        if (t->digits_split && buf[i].cls == C_NUMBER) {
            end = i + 1;
        } else {
            /* run the GPT-2 pattern on the stretch up to the next digit */
            size_t lim = n;
            if (t->digits_split) {
                lim = i;
                while (lim < n && buf[lim].cls != C_NUMBER) lim++;
            }
            end = i + gpt2_match(buf, lim, i);
        }
        size_t b0 = buf[i].off, b1 = end < n ? buf[end].off : len;
        cb(s + b0, b1 - b0, ctx);
        i = end;
    }
}

void tok_pretokenize(const tokenizer *t, const char *text, size_t len, piece_cb cb, void *ctx) {
    ucp *buf = malloc((len + 1) * sizeof *buf);
    if (!buf) return;
    pretokenize_span(t, text, len, cb, ctx, buf);
    free(buf);
}

/* ---- BPE ---------------------------------------------------------------- */

typedef struct {
    const tokenizer *t;
    int32_t **ids;
    size_t *n, *cap;
    int32_t *sym; /* scratch, one entry per byte of the longest piece */
    size_t sym_cap;
    int oom;
} enc_ctx;

static int push_id(enc_ctx *e, int32_t id) {
    if (*e->n == *e->cap) {
        size_t nc = *e->cap ? *e->cap * 2 : 256;
        int32_t *p = realloc(*e->ids, nc * sizeof *p);
        if (!p) { e->oom = 1; return -1; }
        *e->ids = p;
        *e->cap = nc;
    }
    (*e->ids)[(*e->n)++] = id;
    return 0;
}

static void bpe_piece(const char *piece, size_t n, void *vctx) {
    enc_ctx *e = vctx;
    const tokenizer *t = e->t;
    if (e->oom || n == 0) return;
    if (n > e->sym_cap) {
        int32_t *p = realloc(e->sym, n * sizeof *p);
        if (!p) { e->oom = 1; return; }
        e->sym = p;
        e->sym_cap = n;
    }
    int32_t *sym = e->sym;
    size_t m = n;
    for (size_t i = 0; i < n; i++) sym[i] = t->byte_token[(uint8_t)piece[i]];
    /* Repeatedly merge the lowest-ranked adjacent pair (leftmost on ties). */
    for (;;) {
        int best_rank = -1;
        size_t best = 0;
        const slot *bs = NULL;
        for (size_t i = 0; i + 1 < m; i++) {
            if (sym[i] < 0 || sym[i + 1] < 0) continue;
            const slot *sl = merge_lookup(t, sym[i], sym[i + 1]);
            if (sl && (best_rank < 0 || sl->value - 1 < best_rank)) {
                best_rank = sl->value - 1;
                best = i;
                bs = sl;
            }
        }
        if (!bs) break;
        sym[best] = bs->extra;
        memmove(sym + best + 1, sym + best + 2, (m - best - 2) * sizeof *sym);
        m--;
    }
    for (size_t i = 0; i < m; i++)
        if (sym[i] >= 0 && push_id(e, sym[i]) != 0) return;
}

/* ---- SentencePiece BPE ------------------------------------------------------ */

typedef struct {
    uint32_t off, n;  /* bytes of the escaped fragment; n = 0 once merged into its left neighbour */
    int32_t prev, next;
} spm_sym;

typedef struct {
    float score;
    int32_t left, right;
    uint32_t size; /* bytes of the pair when it was queued: a stale entry no longer matches */
} spm_pair;

/* Max-heap order: higher score first, then the leftmost pair. */
static int pair_before(const spm_pair *a, const spm_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct {
    spm_pair *h;
    size_t n, cap;
} pair_heap;

static int heap_push(pair_heap *q, spm_pair p) {
    if (q->n == q->cap) {
        size_t nc = q->cap ? q->cap * 2 : 64;
        spm_pair *np = realloc(q->h, nc * sizeof *np);
        if (!np) return -1;
        q->h = np;
        q->cap = nc;
    }
    size_t i = q->n++;
    while (i > 0 && pair_before(&p, &q->h[(i - 1) / 2])) {
        q->h[i] = q->h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    q->h[i] = p;
    return 0;
}

static spm_pair heap_pop(pair_heap *q) {
    spm_pair top = q->h[0], last = q->h[--q->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= q->n) break;
        if (c + 1 < q->n && pair_before(&q->h[c + 1], &q->h[c])) c++;
        if (!pair_before(&q->h[c], &last)) break;
        q->h[i] = q->h[c];
        i = c;
    }
    if (q->n) q->h[i] = last;
    return top;
}

/* Queues the pair (left, right) if its concatenation is a token. */
static int spm_try_pair(const tokenizer *t, const char *txt, const spm_sym *sym, int32_t left, int32_t right,
                        pair_heap *q) {
    if (left < 0 || right < 0) return 0;
    const uint32_t n = sym[left].n + sym[right].n; /* adjacent: right's bytes follow left's */
    int id = vocab_lookup(t, txt + sym[left].off, n);
    if (id < 0) return 0;
    spm_pair p = {t->score[id], left, right, n};
    return heap_push(q, p);
}

/* Encodes one fragment (no special tokens in it). */
static void spm_fragment(enc_ctx *e, const char *text, size_t len) {
    const tokenizer *t = e->t;
    if (e->oom || len == 0) return;
    /* spaces to U+2581 (3 bytes) */
    size_t spaces = 0;
    for (size_t i = 0; i < len; i++) spaces += text[i] == ' ';
    const size_t n = len + 2 * spaces;
    char *txt = malloc(n);
    spm_sym *sym = malloc(n * sizeof *sym);
    pair_heap q = {NULL, 0, 0};
    if (!txt || !sym) goto oom;
    for (size_t i = 0, w = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(txt + w, "\xE2\x96\x81", 3);
            w += 3;
        } else {
            txt[w++] = text[i];
        }
    }
    /* one symbol per UTF-8 character (a stray byte is a character of its own) */
    int32_t m = 0;
    for (size_t off = 0; off < n; m++) {
        const uint8_t c = (uint8_t)txt[off];
        size_t cl = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        if (cl > n - off) cl = n - off;
        sym[m].off = (uint32_t)off;
        sym[m].n = (uint32_t)cl;
        sym[m].prev = m - 1;
        sym[m].next = off + cl < n ? m + 1 : -1;
        off += cl;
    }
    for (int32_t i = 1; i < m; i++)
        if (spm_try_pair(t, txt, sym, i - 1, i, &q) != 0) goto oom;
    while (q.n > 0) {
        spm_pair p = heap_pop(&q);
        spm_sym *l = &sym[p.left], *r = &sym[p.right];
        if (l->n == 0 || r->n == 0 || l->next != p.right || l->n + r->n != p.size) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = p.left;
        if (spm_try_pair(t, txt, sym, l->prev, p.left, &q) != 0 || spm_try_pair(t, txt, sym, p.left, l->next, &q) != 0)
            goto oom;
    }
    for (int32_t i = 0; i != -1 && m > 0; i = sym[i].next) {
        int id = vocab_lookup(t, txt + sym[i].off, sym[i].n);
        if (id >= 0) {
            if (push_id(e, id) != 0) break;
            continue;
        }
        /* only single characters can miss (merges make tokens): byte fallback */
        for (uint32_t k = 0; k < sym[i].n; k++) {
            int b = t->byte_piece[(uint8_t)txt[sym[i].off + k]];
            if (b < 0) b = tok_unk(t);
            if (b >= 0 && push_id(e, b) != 0) break;
        }
    }
    free(txt);
    free(sym);
    free(q.h);
    return;
oom:
    e->oom = 1;
    free(txt);
    free(sym);
    free(q.h);
}

int tok_encode(const tokenizer *t, const char *text, size_t len, int parse_special, int32_t **ids,
               size_t *n, size_t *cap) {
    enc_ctx e = {t, ids, n, cap, NULL, 0, 0};
    ucp *buf = malloc((len + 1) * sizeof *buf);
    if (!buf) return -1;
    size_t start = 0, p = 0;
    while (p <= len && !e.oom) {
        int sid = -1;
        size_t slen = 0;
        if ((parse_special || t->spm) && p < len) {
            for (int k = 0; k < t->n_specials; k++) {
                int id = t->specials[k];
                /* SentencePiece: user-defined tokens are always split out (llama.cpp), control ones on request */
                if (!parse_special && t->type[id] != 4) continue;
                if (t->len[id] > 0 && t->len[id] <= len - p && memcmp(text + p, t->text[id], t->len[id]) == 0) {
                    sid = id;
                    slen = t->len[id];
                    break; /* specials are sorted longest first */
                }
            }
        }
        if (sid >= 0 || p == len) {
            if (p > start) {
                if (t->spm) spm_fragment(&e, text + start, p - start);
                else pretokenize_span(t, text + start, p - start, bpe_piece, &e, buf);
            }
            if (sid >= 0) push_id(&e, sid);
            if (p == len) break;
            p += slen;
            start = p;
        } else {
            p++;
        }
    }
    free(buf);
    free(e.sym);
    return e.oom ? -1 : 0;
}

size_t tok_decode(const tokenizer *t, int id, char *out, size_t cap) {
    if (id < 0 || id >= t->n_vocab) return 0;
    const char *s = t->text[id];
    size_t n = t->len[id], w = 0;
    if (t->spm) {
        if (t->type[id] == 6 && n == 6) { /* <0xXX> */
            if (cap > 0) out[0] = (char)strtol(s + 3, NULL, 16);
            return 1;
        }
        for (size_t i = 0; i < n; i++) { /* U+2581 back to a space */
            if (t->type[id] == 1 && i + 3 <= n && memcmp(s + i, "\xE2\x96\x81", 3) == 0) {
                if (w < cap) out[w] = ' ';
                w++;
                i += 2;
            } else {
                if (w < cap) out[w] = s[i];
                w++;
            }
        }
        return w;
    }
    if (t->type[id] != 1) { /* control / user-defined tokens are literal text */
        for (size_t i = 0; i < n; i++, w++)
            if (w < cap) out[w] = s[i];
        return w;
    }
    for (size_t i = 0; i < n;) {
        size_t adv;
        uint32_t cp = utf8_next((const uint8_t *)s + i, n - i, &adv);
        int b = cp < 512 ? t->unbyte[cp] : -1;
        if (b < 0) { /* not in the byte alphabet: copy the spelling */
            for (size_t k = 0; k < adv; k++, w++)
                if (w < cap) out[w] = s[i + k];
        } else {
            if (w < cap) out[w] = (char)b;
            w++;
        }
        i += adv;
    }
    return w;
}

int tok_vocab_size(const tokenizer *t) { return t->n_vocab; }
int tok_unk(const tokenizer *t) { return t->spm ? t->unk : -1; }
int tok_bos(const tokenizer *t) { return t->bos; }
int tok_eos(const tokenizer *t) { return t->eos; }
int tok_add_bos(const tokenizer *t) { return t->add_bos; }
int tok_is_control(const tokenizer *t, int id) { return id >= 0 && id < t->n_vocab && t->type[id] == 3; }

int tok_special_id(const tokenizer *t, const char *text) {
    size_t n = strlen(text);
    for (int k = 0; k < t->n_specials; k++) {
        int id = t->specials[k];
        if (t->len[id] == n && memcmp(t->text[id], text, n) == 0) return id;
    }
    return -1;
}

void tok_free(tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->len);
    free(t->type);
    free(t->vocab_map);
    free(t->merge_map);
    free(t->specials);
    free(t->score);
    free(t);
}


static const tokenizer *g_sort_tok; /* qsort has no context argument in C11 */
static int cmp_len_desc(const void *a, const void *b) {
    int x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (int)g_sort_tok->len[y] - (int)g_sort_tok->len[x];
}

static void encode_utf8(uint32_t cp, char *out, size_t *n) {
    if (cp < 0x80) { out[0] = (char)cp; *n = 1; }
    else if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 63)); *n = 2; }
    else { out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 63)); out[2] = (char)(0x80 | (cp & 63)); *n = 3; }
}

tokenizer *tok_load(const gguf_file *f, char *err, size_t err_size) {
    char *model = gguf_get_string(f, "tokenizer.ggml.model");
    const int spm = model && strcmp(model, "llama") == 0;
    if (!model || (strcmp(model, "gpt2") != 0 && !spm)) {
        snprintf(err, err_size,
                 "tokenizer model '%s' is not supported (only byte-level BPE 'gpt2' and SentencePiece BPE 'llama')",
                 model ? model : "(missing)");
        free(model);
        return NULL;
    }
    free(model);
    const gguf_kv *tk = gguf_find_kv(f, "tokenizer.ggml.tokens");
    const gguf_kv *mk = gguf_find_kv(f, "tokenizer.ggml.merges");
    const gguf_kv *ty = gguf_find_kv(f, "tokenizer.ggml.token_type");
    const gguf_kv *sk = gguf_find_kv(f, "tokenizer.ggml.scores");
    if (!tk || tk->type != GGUF_V_ARRAY || tk->arr_type != GGUF_V_STRING || tk->arr_n == 0 ||
        tk->arr_n > (1u << 24)) {
        snprintf(err, err_size, "tokenizer.ggml.tokens is missing or not a string array");
        return NULL;
    }
    if (spm) {
        int ab = 0;
        if (!sk || sk->type != GGUF_V_ARRAY || sk->arr_type != GGUF_V_F32 || sk->arr_n != tk->arr_n) {
            snprintf(err, err_size, "tokenizer.ggml.scores is missing or not one f32 per token");
            return NULL;
        }
        if (gguf_get_bool(f, "tokenizer.ggml.add_space_prefix", &ab) == 0 && ab) {
            snprintf(err, err_size, "tokenizer.ggml.add_space_prefix = true is not supported");
            return NULL;
        }
        mk = NULL; /* SentencePiece merges by score */
    } else if (!mk || mk->type != GGUF_V_ARRAY || mk->arr_type != GGUF_V_STRING) {
        snprintf(err, err_size, "tokenizer.ggml.merges is missing or not a string array");
        return NULL;
    }
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) { snprintf(err, err_size, "out of memory"); return NULL; }
    t->n_vocab = (int)tk->arr_n;
    t->text = calloc((size_t)t->n_vocab, sizeof *t->text);
    t->len = calloc((size_t)t->n_vocab, sizeof *t->len);
    t->type = calloc((size_t)t->n_vocab, sizeof *t->type);
    uint64_t vcap = 1;
    while (vcap < (uint64_t)t->n_vocab * 2) vcap <<= 1;
    t->vocab_map = calloc(vcap, sizeof *t->vocab_map);
    t->vocab_mask = vcap - 1;
    uint64_t mcap = 1;
    while (mcap < (mk ? mk->arr_n : 0) * 2 + 2) mcap <<= 1;
    t->merge_map = calloc(mcap, sizeof *t->merge_map);
    t->merge_mask = mcap - 1;
    t->specials = calloc((size_t)t->n_vocab, sizeof *t->specials);
    t->spm = spm;
    if (spm && !(t->score = malloc((size_t)t->n_vocab * sizeof *t->score))) {
        snprintf(err, err_size, "out of memory");
        tok_free(t);
        return NULL;
    }
    if (!t->text || !t->len || !t->type || !t->vocab_map || !t->merge_map || !t->specials) {
        snprintf(err, err_size, "out of memory");
        tok_free(t);
        return NULL;
    }
    uint64_t pos = 0;
    const uint8_t *cur = NULL;
    gguf_str s;
    for (int id = 0; id < t->n_vocab; id++) {
        gguf_array_next_string(tk, &pos, &cur, &s);
        t->text[id] = s.ptr;
        t->len[id] = (uint32_t)s.len;
        t->type[id] = 1;
        uint64_t i = fnv(s.ptr, s.len) & t->vocab_mask;
        while (t->vocab_map[i].value != 0) {
            int other = t->vocab_map[i].value - 1;
            if (t->len[other] == s.len && memcmp(t->text[other], s.ptr, s.len) == 0) break; /* keep first */
            i = (i + 1) & t->vocab_mask;
        }
        if (t->vocab_map[i].value == 0) t->vocab_map[i].value = id + 1;
    }
    if (ty && ty->type == GGUF_V_ARRAY && ty->arr_n == (uint64_t)t->n_vocab &&
        (ty->arr_type == GGUF_V_I32 || ty->arr_type == GGUF_V_U32)) {
        for (int id = 0; id < t->n_vocab; id++) {
            const uint8_t *p = ty->arr_data + 4 * (size_t)id;
            t->type[id] = (int32_t)(p[0] | (p[1] << 8) | (p[2] << 16) | ((uint32_t)p[3] << 24));
        }
    }
    for (int id = 0; id < t->n_vocab; id++)
        if (t->type[id] == 3 || t->type[id] == 4) t->specials[t->n_specials++] = id;
    g_sort_tok = t;
    qsort(t->specials, (size_t)t->n_specials, sizeof *t->specials, cmp_len_desc);
    if (spm) {
        for (int id = 0; id < t->n_vocab; id++) memcpy(&t->score[id], sk->arr_data + 4 * (size_t)id, 4);
        for (int b = 0; b < 256; b++) {
            char hex[8];
            snprintf(hex, sizeof hex, "<0x%02X>", b);
            t->byte_piece[b] = vocab_lookup(t, hex, 6);
        }
        uint32_t v;
        t->unk = gguf_get_u32(f, "tokenizer.ggml.unknown_token_id", &v) == 0 && v < (uint32_t)t->n_vocab ? (int)v : -1;
    }

    /* GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the
     * rest are shifted to U+0100.. in byte order. */
    for (int i = 0; i < 512; i++) t->unbyte[i] = -1;
    int shift = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        int cp = printable ? b : 256 + shift++;
        t->byte_cp[b] = (uint16_t)cp;
        t->unbyte[cp] = (int16_t)b;
        char u[4];
        size_t un;
        encode_utf8((uint32_t)cp, u, &un);
        t->byte_token[b] = vocab_lookup(t, u, un);
    }

    pos = 0;
    cur = NULL;
    int bad_merges = 0;
    for (uint64_t r = 0; mk && r < mk->arr_n; r++) {
        gguf_array_next_string(mk, &pos, &cur, &s);
        const char *sp = memchr(s.ptr, ' ', (size_t)s.len);
        if (!sp || sp == s.ptr) { bad_merges++; continue; }
        size_t la = (size_t)(sp - s.ptr), lb = (size_t)s.len - la - 1;
        int a = vocab_lookup(t, s.ptr, la), b = vocab_lookup(t, sp + 1, lb);
        char tmp[512];
        if (la + lb > sizeof tmp) { bad_merges++; continue; }
        memcpy(tmp, s.ptr, la);
        memcpy(tmp + la, sp + 1, lb);
        int ab = vocab_lookup(t, tmp, la + lb);
        if (a < 0 || b < 0 || ab < 0) { bad_merges++; continue; }
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        uint64_t i = mix(key) & t->merge_mask;
        while (t->merge_map[i].value != 0 && t->merge_map[i].key != key) i = (i + 1) & t->merge_mask;
        if (t->merge_map[i].value == 0) { /* a duplicate merge keeps its best rank */
            t->merge_map[i].key = key;
            t->merge_map[i].value = (int32_t)r + 1;
            t->merge_map[i].extra = ab;
        }
    }
    if (bad_merges)
        fprintf(stderr, "oscar: warning: %d tokenizer merges name unknown tokens and were skipped\n", bad_merges);

    uint32_t v;
    t->bos = gguf_get_u32(f, "tokenizer.ggml.bos_token_id", &v) == 0 && v < (uint32_t)t->n_vocab ? (int)v : -1;
    t->eos = gguf_get_u32(f, "tokenizer.ggml.eos_token_id", &v) == 0 && v < (uint32_t)t->n_vocab ? (int)v : -1;
    int ab;
    t->add_bos = gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &ab) == 0 ? ab : 0;

    char *pre = spm ? NULL : gguf_get_string(f, "tokenizer.ggml.pre");
    /* Pre-tokenizers that are "digits one by one, then the GPT-2 pattern"
     * (llama.cpp groups these names together). Others get the plain GPT-2
     * pattern, with a warning, since tokens could then differ from training. */
    static const char *digit_pres[] = {"smollm", "starcoder", "refact", "command-r", "codeshell",
                                       "exaone", "minerva"};
    t->digits_split = 0;
    if (pre) {
        int known = strcmp(pre, "gpt-2") == 0 || strcmp(pre, "default") == 0;
        for (size_t k = 0; k < sizeof digit_pres / sizeof *digit_pres; k++)
            if (strcmp(pre, digit_pres[k]) == 0) t->digits_split = known = 1;
        if (!known)
            fprintf(stderr, "oscar: warning: pre-tokenizer '%s' not implemented; using the GPT-2 pattern\n", pre);
    }
    free(pre);
    return t;
}

int tok_chatml(const gguf_file *f, const tokenizer *t, char **default_system) {
    *default_system = NULL;
    char *tmpl = gguf_get_string(f, "tokenizer.chat_template");
    if (!tmpl) return 0;
    int ok = strstr(tmpl, "<|im_start|>") && strstr(tmpl, "<|im_end|>") &&
             tok_special_id(t, "<|im_start|>") >= 0 && tok_special_id(t, "<|im_end|>") >= 0;
    const char *key = "<|im_start|>system";
    const char *p = ok ? strstr(tmpl, key) : NULL;
    if (p) {
        p += strlen(key);
        /* the template may hold a real newline or the two characters \n */
        if (*p == '\n') p++;
        else if (p[0] == '\\' && p[1] == 'n') p += 2;
        const char *e = strstr(p, "<|im_end|>");
        if (e) {
            *default_system = malloc((size_t)(e - p) + 1);
            if (*default_system) {
                memcpy(*default_system, p, (size_t)(e - p));
                (*default_system)[e - p] = 0;
            }
        }
    }
    free(tmpl);
    return ok;
}
