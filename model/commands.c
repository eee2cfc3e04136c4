/*
 * commands.c - `oscar run`, `oscar ppl`, `oscar tni`. See model_commands.h
 * and docs/ACCURACY.md.
 */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"
#include "llama_gpu.h"
#include "model_commands.h"
#include "png.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

/* ---- shared option handling --------------------------------------------- */

typedef struct opts {
    const char *model;
    const char *prompt, *system, *text, *png, *dump;
    int kv_f32;           /* --kv f32: the runner's own fp32 cache */
    oscar_config cfg;
    int fold_v;
    int gpu_weights_f32; /* --gpu-weights f32 */
    int score_from;      /* ppl: score only predictions made at window positions >= this */
    int n_predict;
    float temp;
    unsigned long long seed;
    int raw, ids, ignore_eos;
    int ctx, chunk, windows, json, no_ref, threads;
    int64_t max_tokens;
    int layer, tni_tokens;
} opts;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int die(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "oscar %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

static int parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static void usage(const char *cmd) {
    if (strcmp(cmd, "run") == 0)
        fprintf(stderr,
                "usage: oscar run --model M.gguf --prompt TEXT [--kv none|kivi|quarot|scale-only|oscar]\n"
                "                 [--bits 2|4] [-n TOKENS] [--temp T] [--seed S] [--system TEXT] [--raw]\n"
                "                 [--k-group G] [--v-group G] [--residual R] [--fold-v] [--threads N]\n"
                "                 [--device cpu|cuda] [--gpu-weights bf16|f32]\n"
                "  Generates a reply (greedy unless --temp > 0) with the KV cache in oscar.\n"
                "  --device cuda runs the whole model on the GPU (decode steps are CUDA graph replays),\n"
                "  with the weights as bf16 (default) or f32 (--gpu-weights f32: the CPU's numbers).\n"
                "  --raw skips the chat template; --ids also prints the generated token ids.\n");
    else if (strcmp(cmd, "ppl") == 0)
        fprintf(stderr,
                "usage: oscar ppl --model M.gguf --text FILE [--ctx N] [--kv METHOD] [--bits 2|4] [--json]\n"
                "                 [--windows K] [--chunk C] [--k-group G] [--v-group G] [--residual R]\n"
                "                 [--fold-v] [--no-ref] [--dump PREFIX] [--threads N] [--device cpu|cuda]\n"
                "                 [--gpu-weights bf16|f32] [--score-from P | --score-second-half]\n"
                "                 [--min-exact L] [--sinks S] [--clip] [--norm-per-head]\n"
                "                 [--key-bits 2|3|4] [--value-bits 2|3|4]\n"
                "  Perplexity over non-overlapping windows of N tokens (default 1024). For a\n"
                "  quantised cache it also runs the 16-bit cache and reports KL and top-1 agreement.\n"
                "  Tokens go through the cache in chunks of C (default 32; 1 = one token per step).\n"
                "  --score-from P scores only the predictions made at positions >= P of each window;\n"
                "  --score-second-half is P = N/2, the tokens llama.cpp's llama-perplexity scores.\n"
                "  Options past the paper (docs/ACCURACY.md): --min-exact L (alias --rollback)\n"
                "  keeps at least L recent tokens exact (config rollback_tokens); --sinks S keeps the\n"
                "  first S tokens exact (sink_tokens); --clip searches each group's range (clip_search);\n"
                "  --norm-per-head keeps one key norm per token and KV head (key_norm_per_head);\n"
                "  --key-bits / --value-bits set the keys' and values' widths apart (2, 3 or 4; default --bits).\n");
    else
        fprintf(stderr,
                "usage: oscar tni --model M.gguf --text FILE [--layer L] [--png out.png] [--tokens N]\n"
                "                 [--k-group G] [--bits 2|4] [--residual R] [--threads N]\n"
                "  Key token-norm statistics per layer, before and after rotation + token scaling.\n");
}

static int parse_opts(int argc, char **argv, opts *o) {
    const char *cmd = argv[0];
    memset(o, 0, sizeof *o);
    o->model = getenv("OSCAR_MODEL") ? getenv("OSCAR_MODEL") : DEFAULT_MODEL;
    o->cfg = oscar_config_default();
    o->cfg.method = OSCAR_METHOD_OSCAR;
    o->cfg.bits = 2;
    o->n_predict = 128;
    o->seed = 42;
    o->ctx = 1024;
    o->chunk = 32;
    o->layer = -1;
    o->tni_tokens = 512;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                                        \
    do {                                                               \
        if (!v) { die(cmd, "%s needs a value", a); return -1; }        \
        i++;                                                           \
    } while (0)
#define INTV(lo, hi, dst)                                                                  \
    do {                                                                                   \
        NEEDV();                                                                           \
        if (parse_int(v, lo, hi, &(dst)) != 0) {                                           \
            die(cmd, "%s: '%s' is not an integer in [%ld, %ld]", a, v, (long)(lo), (long)(hi)); \
            return -1;                                                                     \
        }                                                                                  \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(cmd); return 2; }
        else if (!strcmp(a, "--model") || !strcmp(a, "-m")) { NEEDV(); o->model = v; }
        else if (!strcmp(a, "--prompt") || !strcmp(a, "-p")) { NEEDV(); o->prompt = v; }
        else if (!strcmp(a, "--system")) { NEEDV(); o->system = v; }
        else if (!strcmp(a, "--text")) { NEEDV(); o->text = v; }
        else if (!strcmp(a, "--png")) { NEEDV(); o->png = v; }
        else if (!strcmp(a, "--dump")) { NEEDV(); o->dump = v; }
        else if (!strcmp(a, "--kv")) {
            NEEDV();
            if (!strcmp(v, "f32")) { o->kv_f32 = 1; o->cfg.method = OSCAR_METHOD_NONE; }
            else if (oscar_method_parse(v, &o->cfg.method) != OSCAR_OK) {
                die(cmd, "--kv: unknown method '%s' (none, kivi, quarot, scale-only, oscar)", v);
                return -1;
            } else o->kv_f32 = 0;
        }
        else if (!strcmp(a, "--bits")) {
            INTV(2, 4, o->cfg.bits);
            if (o->cfg.bits == 3) { die(cmd, "--bits must be 2 or 4"); return -1; }
        }
        else if (!strcmp(a, "--k-group")) INTV(1, 1 << 20, o->cfg.k_group);
        else if (!strcmp(a, "--v-group")) INTV(1, 1 << 20, o->cfg.v_group);
        else if (!strcmp(a, "--residual")) INTV(1, 1 << 20, o->cfg.residual);
        else if (!strcmp(a, "--min-exact") || !strcmp(a, "--rollback")) INTV(0, 1 << 20, o->cfg.rollback_tokens);
        else if (!strcmp(a, "--sinks")) INTV(0, 1 << 20, o->cfg.sink_tokens);
        else if (!strcmp(a, "--clip")) o->cfg.clip_search = 1;
        else if (!strcmp(a, "--norm-per-head")) o->cfg.key_norm_per_head = 1;
        else if (!strcmp(a, "--key-bits") || !strcmp(a, "--value-bits")) {
            int b = 0;
            INTV(2, 4, b); /* 2, 3 (format version 5) or 4 */
            if (a[2] == 'k') o->cfg.key_bits = b;
            else o->cfg.value_bits = b;
        }
        else if (!strcmp(a, "--window-dtype")) {
            NEEDV();
            if (!strcmp(v, "f16")) o->cfg.window_dtype = OSCAR_DTYPE_F16;
            else if (!strcmp(v, "bf16")) o->cfg.window_dtype = OSCAR_DTYPE_BF16;
            else if (!strcmp(v, "f32")) o->cfg.window_dtype = OSCAR_DTYPE_F32;
            else { die(cmd, "--window-dtype: f16, bf16 or f32"); return -1; }
        }
        else if (!strcmp(a, "--fold-v")) o->fold_v = 1;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) INTV(0, 1 << 20, o->n_predict);
        else if (!strcmp(a, "--temp")) {
            NEEDV();
            char *end;
            o->temp = strtof(v, &end);
            if (end == v || *end || !(o->temp >= 0) || o->temp > 100) { die(cmd, "--temp: a number >= 0"); return -1; }
        }
        else if (!strcmp(a, "--seed")) { NEEDV(); o->seed = strtoull(v, NULL, 10); }
        else if (!strcmp(a, "--raw")) o->raw = 1;
        else if (!strcmp(a, "--ids")) o->ids = 1;
        else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = 1;
        else if (!strcmp(a, "--ctx")) INTV(2, 1 << 24, o->ctx);
        else if (!strcmp(a, "--chunk")) INTV(1, 4096, o->chunk);
        else if (!strcmp(a, "--windows")) INTV(1, 1 << 24, o->windows);
        else if (!strcmp(a, "--json")) o->json = 1;
        else if (!strcmp(a, "--score-from")) INTV(0, 1 << 24, o->score_from);
        else if (!strcmp(a, "--score-second-half")) o->score_from = -1; /* resolved once --ctx is known */
        else if (!strcmp(a, "--no-ref")) o->no_ref = 1;
        else if (!strcmp(a, "--threads")) INTV(1, 1024, o->threads);
        else if (!strcmp(a, "--device")) {
            NEEDV();
            if (!strcmp(v, "cpu")) o->cfg.backend = OSCAR_BACKEND_CPU;
            else if (!strcmp(v, "cuda")) o->cfg.backend = OSCAR_BACKEND_CUDA;
            else { die(cmd, "--device: cpu or cuda, not '%s'", v); return -1; }
        }
        else if (!strcmp(a, "--gpu-weights")) {
            NEEDV();
            if (!strcmp(v, "bf16")) o->gpu_weights_f32 = 0;
            else if (!strcmp(v, "f32")) o->gpu_weights_f32 = 1;
            else { die(cmd, "--gpu-weights: bf16 or f32, not '%s'", v); return -1; }
        }
        else if (!strcmp(a, "--layer")) INTV(0, 1 << 16, o->layer);
        else if (!strcmp(a, "--tokens")) INTV(2, 1 << 20, o->tni_tokens);
        else {
            die(cmd, "unknown option '%s' (see oscar %s --help)", a, cmd);
            return -1;
        }
#undef NEEDV
#undef INTV
    }
    if (o->threads > 0) omp_set_num_threads(o->threads);
    if (o->score_from < 0) o->score_from = o->ctx / 2;
    if (o->score_from > 0 && o->score_from >= o->ctx - 1) {
        die(cmd, "--score-from %d leaves nothing to score in windows of --ctx %d", o->score_from, o->ctx);
        return -1;
    }
    if (o->cfg.backend == OSCAR_BACKEND_CUDA && o->kv_f32) {
        die(cmd, "--kv f32 is the CPU runner's own reference cache; with --device cuda use --kv none");
        return -1;
    }
    if (o->fold_v && o->cfg.method != OSCAR_METHOD_QUAROT && o->cfg.method != OSCAR_METHOD_OSCAR) {
        die(cmd, "--fold-v applies to the rotating methods (quarot, oscar), not '%s'",
            o->kv_f32 ? "f32" : oscar_method_name(o->cfg.method));
        return -1;
    }
    return 0;
}

static llama_model *load_model(const char *cmd, const opts *o) {
    char err[512];
    if (access(o->model, R_OK) != 0) {
        die(cmd, "cannot read model '%s': %s (scripts/get-model.sh downloads the default model)", o->model,
            strerror(errno));
        return NULL;
    }
    llama_model *m = llama_load(o->model, o->fold_v, err, sizeof err);
    if (!m) die(cmd, "%s", err);
    else m->gpu_weights_f32 = o->gpu_weights_f32;
    return m;
}

/* Checks that oscar accepts this geometry before any work is done. */
static int check_config(const char *cmd, const llama_model *m, const opts *o) {
    if (o->kv_f32) return 0;
    oscar_config c = o->cfg;
    c.head_dim = m->head_dim;
    c.num_kv_heads = m->n_kv_heads;
    c.num_q_heads = m->n_heads;
    c.num_layers = llama_cache_layers(m);
    c.rotate_values = m->v_folded ? 0 : 1;
    c.max_seqs = 1;
    char err[256] = "";
    if (oscar_config_validate(&c, err, sizeof err) != OSCAR_OK) {
        die(cmd, "invalid cache configuration: %s", err);
        return -1;
    }
    return 0;
}

const char *oscar_kv_label(const oscar_config *cfg, char *buf, size_t n) {
    if (cfg->method == OSCAR_METHOD_NONE) {
        snprintf(buf, n, "none (16-bit)");
        return buf;
    }
    int k = cfg->key_bits || cfg->value_bits
                ? snprintf(buf, n, "%s K%d/V%d", oscar_method_name(cfg->method), cfg->key_bits ? cfg->key_bits : cfg->bits,
                           cfg->value_bits ? cfg->value_bits : cfg->bits)
                : snprintf(buf, n, "%s-%d", oscar_method_name(cfg->method), cfg->bits);
    if (cfg->key_norm_per_head && k > 0 && (size_t)k < n) k += snprintf(buf + k, n - k, " norm-per-head");
    if (cfg->rollback_tokens && k > 0 && (size_t)k < n) k += snprintf(buf + k, n - k, " min-exact %d", cfg->rollback_tokens);
    if (cfg->sink_tokens && k > 0 && (size_t)k < n) k += snprintf(buf + k, n - k, " sinks %d", cfg->sink_tokens);
    if (cfg->clip_search && k > 0 && (size_t)k < n) snprintf(buf + k, n - k, " clip");
    return buf;
}

static const char *method_label(const opts *o, char *buf, size_t n) {
    if (o->kv_f32) {
        snprintf(buf, n, "f32 (runner's own cache)");
        return buf;
    }
    return oscar_kv_label(&o->cfg, buf, n);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap) break;
        char *nb = realloc(buf, cap * 2);
        if (!nb) { free(buf); buf = NULL; break; }
        buf = nb;
        cap *= 2;
    }
    if (buf && ferror(f)) { free(buf); buf = NULL; }
    fclose(f);
    *len = n;
    return buf;
}

/* ---- sampling ----------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static int sample(const float *logits, int n, float temp, uint64_t *rng) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (temp <= 0) return best;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((logits[i] - logits[best]) / temp);
    double r = (double)(rng_next(rng) >> 11) / 9007199254740992.0 * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += exp((logits[i] - logits[best]) / temp);
        if (acc >= r) return i;
    }
    return best;
}

/* ---- memory report ------------------------------------------------------ */

/* Bytes the cache holds for this sequence now (packed blocks at their packed
 * size, window tokens at window size) and what a 16-bit cache would hold. */
static void kv_usage(const llama_kv *kv, const llama_model *m, double *used, double *fp16, double *per_tok) {
    /* the layers the oscar cache holds (Gemma 3's sliding-window layers are outside it) */
    double f16_tok = 2.0 * 2.0 * llama_cache_layers(m) * m->n_kv_heads * m->head_dim;
    *fp16 = f16_tok * (double)kv->len;
    if (kv->use_f32) {
        *used = 2.0 * *fp16;
        *per_tok = 2.0 * f16_tok;
        return;
    }
    oscar_memory_stats ms;
    oscar_seq_info info;
#ifdef OSCAR_MODEL_GPU
    if (kv->gpu) { /* batch API: no sequence ids; one layer's split follows from the length */
        if (oscar_memory(llama_gpu_cache(kv->gpu), &ms) != OSCAR_OK) {
            *used = *per_tok = NAN;
            return;
        }
        /* the packing rule (oscar.h): blocks of R after the sink tokens and
         * the rollback lag, pack_offset = S + L (the runner never rolls back) */
        const int64_t R = kv->residual > 0 ? kv->residual : 0, off = kv->pack_offset;
        const int64_t packed = R && kv->len >= off ? (kv->len - off) / R * R : 0;
        *used = (double)packed * ms.packed_bytes_per_token + (double)(kv->len - packed) * ms.window_bytes_per_token;
        *per_tok = ms.packed_bytes_per_token;
        return;
    }
#endif
    if (oscar_memory(kv->oc, &ms) != OSCAR_OK || oscar_seq_info_get(kv->oc, kv->seq, 0, &info) != OSCAR_OK) {
        *used = *per_tok = NAN;
        return;
    }
    *used = (double)info.packed_tokens * ms.packed_bytes_per_token + (double)info.window_tokens * ms.window_bytes_per_token;
    *per_tok = ms.packed_bytes_per_token;
}

/* ---- oscar run ---------------------------------------------------------- */

static int push_tokens(const tokenizer *t, const char *s, int special, int32_t **ids, size_t *n, size_t *cap) {
    return tok_encode(t, s, strlen(s), special, ids, n, cap);
}

int oscar_cmd_run(int argc, char **argv) {
    const char *cmd = "run";
    opts o;
    int po = parse_opts(argc, argv, &o);
    if (po != 0) return po == 2 ? 0 : 1;
    if (!o.prompt) {
        usage(cmd);
        return die(cmd, "--prompt is required");
    }
    llama_model *m = load_model(cmd, &o);
    if (!m) return 1;
    int rc = 1;
    int32_t *ids = NULL;
    size_t n_ids = 0, cap = 0;
    char *defsys = NULL;
    llama_kv kv;
    llama_state st;
    memset(&kv, 0, sizeof kv);
    memset(&st, 0, sizeof st);
    char err[512];
    if (check_config(cmd, m, &o) != 0) goto out;

    int chat = !o.raw && tok_chatml(m->file, m->tok, &defsys);
    int oom = 0;
    if (tok_add_bos(m->tok) && tok_bos(m->tok) >= 0) {
        ids = malloc(sizeof *ids);
        if (!ids) oom = 1; else { ids[0] = tok_bos(m->tok); n_ids = cap = 1; }
    }
    if (chat) {
        const char *sys = o.system ? o.system : defsys;
        if (sys) {
            oom |= push_tokens(m->tok, "<|im_start|>system\n", 1, &ids, &n_ids, &cap);
            oom |= push_tokens(m->tok, sys, 0, &ids, &n_ids, &cap);
            oom |= push_tokens(m->tok, "<|im_end|>\n", 1, &ids, &n_ids, &cap);
        }
        oom |= push_tokens(m->tok, "<|im_start|>user\n", 1, &ids, &n_ids, &cap);
        oom |= push_tokens(m->tok, o.prompt, 0, &ids, &n_ids, &cap);
        oom |= push_tokens(m->tok, "<|im_end|>\n<|im_start|>assistant\n", 1, &ids, &n_ids, &cap);
    } else {
        oom |= push_tokens(m->tok, o.prompt, 0, &ids, &n_ids, &cap);
    }
    if (oom) { die(cmd, "out of memory"); goto out; }
    if (n_ids == 0) { die(cmd, "the prompt encodes to no tokens"); goto out; }
    int64_t total = (int64_t)n_ids + o.n_predict;
    if (total > m->ctx_max) {
        die(cmd, "prompt (%zu tokens) + %d new tokens exceed the model's context of %d", n_ids, o.n_predict, m->ctx_max);
        goto out;
    }
    if (llama_kv_init(&kv, m, &o.cfg, o.kv_f32, total, err, sizeof err) != 0) { die(cmd, "%s", err); goto out; }
    int chunk = o.chunk > 0 ? o.chunk : 32;
    if (llama_state_init(&st, m, chunk) != 0) { die(cmd, "out of memory"); goto out; }

    double t0 = now_s();
    for (size_t p = 0, nt; p < n_ids; p += nt) {
        nt = (size_t)llama_next_chunk(&kv, (int64_t)n_ids, chunk);
        if (llama_forward(m, &st, &kv, ids + p, nt, p + nt == n_ids ? 1 : 0, err, sizeof err) != 0) {
            die(cmd, "%s", err);
            goto out;
        }
    }
    double t1 = now_s();
    uint64_t rng = o.seed ? o.seed : 0x9E3779B97F4A7C15ull;
    int generated = 0;
    int32_t *gen = malloc(((size_t)o.n_predict + 1) * sizeof *gen);
    if (!gen) { die(cmd, "out of memory"); goto out; }
    char piece[256];
    for (int i = 0; i < o.n_predict; i++) {
        int next = sample(st.logits, m->vocab, o.temp, &rng);
        if (!o.ignore_eos && (next == tok_eos(m->tok) || tok_is_control(m->tok, next))) break;
        gen[generated++] = next;
        size_t pn = tok_decode(m->tok, next, piece, sizeof piece);
        fwrite(piece, 1, pn < sizeof piece ? pn : sizeof piece, stdout);
        fflush(stdout);
        if (i + 1 == o.n_predict) break;
        int32_t tk = next;
        if (llama_forward(m, &st, &kv, &tk, 1, 1, err, sizeof err) != 0) {
            free(gen);
            die(cmd, "%s", err);
            goto out;
        }
    }
    double t2 = now_s();
    fputc('\n', stdout);
    if (o.ids) {
        printf("prompt_ids:");
        for (size_t i = 0; i < n_ids; i++) printf(" %d", ids[i]);
        printf("\nids:");
        for (int i = 0; i < generated; i++) printf(" %d", gen[i]);
        printf("\n");
    }
    free(gen);
    double used, fp16, per_tok;
    kv_usage(&kv, m, &used, &fp16, &per_tok);
    char lbl[64];
    printf("--- %d tokens in %.2f s: %.1f tokens/s (prompt: %zu tokens at %.1f tokens/s, %d threads)\n", generated,
           t2 - t1, generated > 0 ? generated / (t2 - t1) : 0.0, n_ids, n_ids / (t1 - t0), omp_get_max_threads());
    printf("--- KV cache %s: %.1f KiB for %lld tokens against %.1f KiB at 16 bits (%.2fx); "
           "a full block costs %.0f bytes/token against %.0f (%.2fx)\n",
           method_label(&o, lbl, sizeof lbl), used / 1024, (long long)kv.len, fp16 / 1024, fp16 / used, per_tok,
           fp16 / (double)kv.len, fp16 / (double)kv.len / per_tok);
    rc = 0;
out:
    free(defsys);
    free(ids);
    llama_state_free(&st);
    llama_kv_free(&kv);
    llama_free(m);
    return rc;
}

/* ---- oscar ppl ---------------------------------------------------------- */

typedef struct progress {
    double start, last;
    int64_t total;
    int tty;
} progress;

static void progress_show(progress *p, int64_t done, int final) {
    double t = now_s();
    if (!final && t - p->last < 0.5) return;
    p->last = t;
    int width = 30, fill = p->total > 0 ? (int)(width * done / p->total) : width;
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = 0;
    double rate = done / (t - p->start + 1e-9), eta = rate > 0 ? (p->total - done) / rate : 0;
    fprintf(stderr, "\r[%s] %lld/%lld tokens  %.1f tok/s  eta %.0fs   ", bar, (long long)done, (long long)p->total,
            rate, eta);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

/* A JSON string body: quotes, backslashes and control bytes escaped. */
static const char *json_escape(const char *in, char *buf, size_t n) {
    size_t w = 0;
    for (const unsigned char *p = (const unsigned char *)(in ? in : ""); *p && w + 7 < n; p++) {
        if (*p == '"' || *p == '\\') { buf[w++] = '\\'; buf[w++] = (char)*p; }
        else if (*p < 0x20) w += (size_t)snprintf(buf + w, n - w, "\\u%04x", *p);
        else buf[w++] = (char)*p;
    }
    buf[w] = 0;
    return buf;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* log-softmax pieces of one logits row: max and log-sum-exp. */
static double logsumexp(const float *l, int n, int *argmax) {
    int am = 0;
    for (int i = 1; i < n; i++)
        if (l[i] > l[am]) am = i;
    double mx = l[am], s = 0;
    for (int i = 0; i < n; i++) s += exp((double)l[i] - mx);
    if (argmax) *argmax = am;
    return mx + log(s);
}

int oscar_cmd_ppl(int argc, char **argv) {
    const char *cmd = "ppl";
    opts o;
    int po = parse_opts(argc, argv, &o);
    if (po != 0) return po == 2 ? 0 : 1;
    if (!o.text) {
        usage(cmd);
        return die(cmd, "--text is required");
    }
    size_t tlen;
    char *text = read_file(o.text, &tlen);
    if (!text) return die(cmd, "cannot read '%s': %s", o.text, strerror(errno));
    llama_model *m = load_model(cmd, &o);
    if (!m) { free(text); return 1; }
    int rc = 1;
    int32_t *ids = NULL;
    size_t n_ids = 0, cap = 0;
    llama_kv kq, kr;
    llama_state sq, sr;
    memset(&kq, 0, sizeof kq); memset(&kr, 0, sizeof kr);
    memset(&sq, 0, sizeof sq); memset(&sr, 0, sizeof sr);
    double *kls = NULL;
    FILE *dump_tok = NULL, *dump_log = NULL;
    char err[512];
    if (check_config(cmd, m, &o) != 0) goto out;
    if (o.ctx > m->ctx_max) {
        die(cmd, "--ctx %d exceeds the model's context length %d", o.ctx, m->ctx_max);
        goto out;
    }
    if (tok_encode(m->tok, text, tlen, 0, &ids, &n_ids, &cap) != 0) { die(cmd, "out of memory"); goto out; }
    int64_t n_win = (int64_t)n_ids / o.ctx;
    if (n_win == 0) {
        die(cmd, "'%s' has %zu tokens, fewer than one window of --ctx %d", o.text, n_ids, o.ctx);
        goto out;
    }
    if (o.windows > 0 && o.windows < n_win) n_win = o.windows;
    int quant = !o.kv_f32 && o.cfg.method != OSCAR_METHOD_NONE;
    int with_ref = quant && !o.no_ref;
    int chunk = o.chunk < o.ctx ? o.chunk : o.ctx;
    if (llama_kv_init(&kq, m, &o.cfg, o.kv_f32, o.ctx, err, sizeof err) != 0) { die(cmd, "%s", err); goto out; }
    if (llama_state_init(&sq, m, chunk) != 0) { die(cmd, "out of memory"); goto out; }
    if (with_ref) {
        oscar_config rc16 = o.cfg;
        rc16.method = OSCAR_METHOD_NONE;
        rc16.rollback_tokens = rc16.sink_tokens = rc16.clip_search = 0; /* the same 16-bit reference for every option */
        rc16.key_norm_per_head = rc16.key_bits = rc16.value_bits = 0;
        if (llama_kv_init(&kr, m, &rc16, 0, o.ctx, err, sizeof err) != 0) { die(cmd, "%s", err); goto out; }
        if (llama_state_init(&sr, m, chunk) != 0) { die(cmd, "out of memory"); goto out; }
    }
    int64_t n_scored_max = n_win * (o.ctx - 1);
    kls = malloc((size_t)(n_scored_max > 0 ? n_scored_max : 1) * sizeof *kls);
    if (!kls) { die(cmd, "out of memory"); goto out; }
    if (o.dump) {
        char path[1024];
        snprintf(path, sizeof path, "%s.tokens", o.dump);
        dump_tok = fopen(path, "wb");
        snprintf(path, sizeof path, "%s.logits", o.dump);
        dump_log = fopen(path, "wb");
        if (!dump_tok || !dump_log) { die(cmd, "cannot write %s: %s", path, strerror(errno)); goto out; }
        fwrite(ids, sizeof(int32_t), n_ids, dump_tok); /* every token of the text: the tokenizer check uses them */
    }
    char lbl[64];
    fprintf(stderr, "oscar ppl: %s, %zu tokens in '%s', %lld window(s) of %d, cache %s%s, chunk %d\n",
            m->name ? m->name : o.model, n_ids, o.text, (long long)n_win, o.ctx, method_label(&o, lbl, sizeof lbl),
            m->v_folded ? " (V folded)" : "", chunk);

    double nll_q = 0, nll_r = 0;
    int64_t scored = 0, agree = 0;
    /* KL by how full the exact window is when the token is scored (quarters
     * of R): tells whether error comes from quantised recent neighbours */
    double kl_fill[4] = {0};
    int64_t n_fill[4] = {0};
    const int R = kq.residual;
    progress pg = {now_s(), 0, n_win * o.ctx, isatty(2)};
    /* A model that wants a BOS (Gemma) gets it as each window's first token, as llama-perplexity does. */
    if (tok_add_bos(m->tok) && tok_bos(m->tok) >= 0)
        for (int64_t w = 0; w < n_win; w++) ids[w * o.ctx] = tok_bos(m->tok);
    for (int64_t w = 0; w < n_win; w++) {
        const int32_t *wt = ids + w * o.ctx;
        int nt;
        if (llama_kv_reset(&kq, err, sizeof err) != 0 || (with_ref && llama_kv_reset(&kr, err, sizeof err) != 0)) {
            die(cmd, "%s", err);
            goto out;
        }
        for (int p = 0; p < o.ctx; p += nt) {
            nt = llama_next_chunk(&kq, o.ctx, chunk);
            /* logits only for the tokens that are scored (a suffix of the
             * window): the output layer is a fifth of the work per token */
            int nl = nt;
            if (!dump_log && p + nt <= o.score_from) nl = 0;
            else if (!dump_log && p < o.score_from) nl = p + nt - o.score_from;
            const int t_lo = nt - nl; /* logits row 0 is the chunk's token t_lo */
            if (llama_forward(m, &sq, &kq, wt + p, nt, nl, err, sizeof err) != 0 ||
                (with_ref && llama_forward(m, &sr, &kr, wt + p, nt, nl, err, sizeof err) != 0)) {
                fputc('\n', stderr);
                die(cmd, "%s", err);
                goto out;
            }
            if (dump_log && w == 0) fwrite(sq.logits, sizeof(float), (size_t)nt * m->vocab, dump_log);
            for (int t = 0; t < nt && p + t + 1 < o.ctx; t++) {
                if (p + t < o.score_from || t < t_lo) continue;
                int target = wt[p + t + 1];
                const float *lq = sq.logits + (int64_t)(t - t_lo) * m->vocab;
                int am_q;
                double lse_q = logsumexp(lq, m->vocab, &am_q);
                nll_q += lse_q - lq[target];
                if (with_ref) {
                    const float *lr = sr.logits + (int64_t)(t - t_lo) * m->vocab;
                    int am_r;
                    double lse_r = logsumexp(lr, m->vocab, &am_r);
                    nll_r += lse_r - lr[target];
                    double kl = 0;
                    for (int i = 0; i < m->vocab; i++) {
                        double a = lr[i] - lse_r, b = lq[i] - lse_q;
                        kl += exp(a) * (a - b);
                    }
                    kls[scored] = kl > 0 ? kl : 0;
                    agree += am_q == am_r;
                    if (R > 0 && p + t + 1 >= kq.pack_offset) { /* the part of the window that varies */
                        int fill = (int)((p + t + 1 - kq.pack_offset) % R), qi = fill * 4 / R;
                        kl_fill[qi] += kls[scored];
                        n_fill[qi]++;
                    }
                }
                scored++;
            }
            progress_show(&pg, w * o.ctx + p + nt, 0);
        }
    }
    progress_show(&pg, n_win * o.ctx, 1);
    double elapsed = now_s() - pg.start;
    double ppl = exp(nll_q / scored), ppl_ref = with_ref ? exp(nll_r / scored) : ppl;
    double kl_mean = 0, kl_p99 = 0, kl_max = 0, kl_top_share = 0;
    if (with_ref) {
        for (int64_t i = 0; i < scored; i++) kl_mean += kls[i];
        kl_mean /= scored;
        qsort(kls, (size_t)scored, sizeof *kls, cmp_double);
        int64_t top = scored / 100 > 0 ? scored / 100 : 1;
        for (int64_t i = scored - top; i < scored; i++) kl_top_share += kls[i];
        kl_top_share /= kl_mean * scored > 0 ? kl_mean * scored : 1;
        int64_t k99 = (int64_t)ceil(0.99 * scored) - 1;
        kl_p99 = kls[k99 < 0 ? 0 : k99];
        kl_max = kls[scored - 1];
    }
    double used, fp16, per_tok;
    kv_usage(&kq, m, &used, &fp16, &per_tok);
    double fp16_tok = 2.0 * 2.0 * llama_cache_layers(m) * m->n_kv_heads * m->head_dim;
    double bpe = NAN;
    if (!o.kv_f32) {
        oscar_config c = o.cfg;
        c.head_dim = m->head_dim; c.num_kv_heads = m->n_kv_heads; c.num_q_heads = m->n_heads; c.num_layers = llama_cache_layers(m);
        oscar_config_packed_bits(&c, &bpe);
    }
    double top1 = with_ref ? (double)agree / scored : 1.0;
    /* Bits per element over a 4K decode, as docs/ACCURACY.md counts them: on
     * average S + L + (R - 1) / 2 tokens are exact (window dtype), the rest
     * packed. */
    double exact_avg = 0, bpe4k = isnan(bpe) ? 32.0 : bpe;
    if (quant) {
        const double wbits = o.cfg.window_dtype == OSCAR_DTYPE_F32 ? 32.0 : 16.0;
        exact_avg = o.cfg.sink_tokens + o.cfg.rollback_tokens + (o.cfg.residual - 1) / 2.0;
        bpe4k = (bpe * (4096.0 - exact_avg) + wbits * exact_avg) / 4096.0;
    }
    printf("model %s | text %s | %lld windows x %d tokens, %lld scored%s | cache %s\n", m->name ? m->name : o.model,
           o.text, (long long)n_win, o.ctx, (long long)scored, o.score_from > 0 ? " (predictions from each window's position score_from on)" : "",
           method_label(&o, lbl, sizeof lbl));
    printf("perplexity %.4f", ppl);
    if (with_ref)
        printf(" | 16-bit %.4f (%+.3f%%) | KL mean %.5f p99 %.5f max %.4f | top-1 agreement %.4f", ppl_ref,
               100.0 * (ppl / ppl_ref - 1), kl_mean, kl_p99, kl_max, top1);
    if (with_ref && R > 0)
        printf("\nKL mean by exact-window fill at scoring time (quarters of R=%d): %.5f %.5f %.5f %.5f | "
               "top 1%% of tokens carry %.1f%% of the KL",
               R, kl_fill[0] / (n_fill[0] ? n_fill[0] : 1), kl_fill[1] / (n_fill[1] ? n_fill[1] : 1),
               kl_fill[2] / (n_fill[2] ? n_fill[2] : 1), kl_fill[3] / (n_fill[3] ? n_fill[3] : 1), 100 * kl_top_share);
    printf("\nKV bytes/token %.1f (16-bit %.0f, %.2fx) | %.2f bits/element, %.3f with %.1f exact tokens over a 4K "
           "decode | %.1f s (%.1f tok/s)\n", per_tok, fp16_tok, fp16_tok / per_tok, bpe, bpe4k, exact_avg, elapsed, (double)n_win * o.ctx * (with_ref ? 2 : 1) / elapsed);
    if (o.json) {
        char jn[256], jt[1024];
        printf("{\"model\":\"%s\",\"text\":\"%s\",\"method\":\"%s\",\"bits\":%d,\"k_group\":%d,\"v_group\":%d,"
               "\"residual\":%d,\"fold_v\":%d,\"ctx\":%d,\"chunk\":%d,\"windows\":%lld,\"score_from\":%d,\"tokens\":%lld,"
               "\"ppl\":%.6f,\"ppl_ref\":%.6f,\"delta_ppl_pct\":%.4f,\"kl_mean\":%.6g,\"kl_p99\":%.6g,"
               "\"kl_max\":%.6g,\"top1_agree\":%.6f,\"kv_bytes_per_token\":%.2f,"
               "\"kv_bytes_per_token_fp16\":%.0f,\"bits_per_element\":%.4f,\"seconds\":%.1f,"
               "\"kl_top1pct_share\":%.4f,\"kl_by_window_fill\":[%.6g,%.6g,%.6g,%.6g],"
               "\"min_exact\":%d,\"sinks\":%d,\"clip\":%d,\"exact_tokens_avg_4k\":%.1f,\"bits_per_element_4k\":%.4f,"
               "\"norm_per_head\":%d,\"key_bits\":%d,\"value_bits\":%d}\n",
               json_escape(m->name, jn, sizeof jn), json_escape(o.text, jt, sizeof jt), o.kv_f32 ? "f32" : oscar_method_name(o.cfg.method),
               quant ? o.cfg.bits : 16, o.cfg.k_group, o.cfg.v_group, o.cfg.residual, m->v_folded, o.ctx, chunk,
               (long long)n_win, o.score_from, (long long)scored, ppl, ppl_ref, 100.0 * (ppl / ppl_ref - 1), kl_mean, kl_p99,
               kl_max, top1, per_tok, fp16_tok, isnan(bpe) ? 32.0 : bpe, elapsed, kl_top_share,
               kl_fill[0] / (n_fill[0] ? n_fill[0] : 1), kl_fill[1] / (n_fill[1] ? n_fill[1] : 1),
               kl_fill[2] / (n_fill[2] ? n_fill[2] : 1), kl_fill[3] / (n_fill[3] ? n_fill[3] : 1),
               o.cfg.rollback_tokens, o.cfg.sink_tokens, o.cfg.clip_search, exact_avg, bpe4k,
               quant ? o.cfg.key_norm_per_head : 0, quant ? (o.cfg.key_bits ? o.cfg.key_bits : o.cfg.bits) : 16,
               quant ? (o.cfg.value_bits ? o.cfg.value_bits : o.cfg.bits) : 16);
    }
    rc = 0;
out:
    if (dump_tok) fclose(dump_tok);
    if (dump_log) fclose(dump_log);
    free(kls);
    free(ids);
    free(text);
    llama_state_free(&sq);
    llama_state_free(&sr);
    llama_kv_free(&kq);
    llama_kv_free(&kr);
    llama_free(m);
    return rc;
}
