/*
 * niah.c - `oscar niah`: passkey retrieval ("needle in a haystack"), a task
 * rather than a perplexity. A random 5-digit key is stated once at a chosen
 * depth of filler text (real prose: the Debian policy manual from
 * scripts/get-text.sh), a question follows at the end, the model decodes
 * greedily, and the answer scores 1 if its first five digits are the key.
 *
 *   There is a pass key hidden inside a lot of irrelevant text. ...   (intro)
 *   <filler> The pass key is 41307. Remember it. 41307 is the pass key. <filler>
 *   What is the pass key? The pass key is                              (question)
 *
 * The prompt is built from token sequences, so that its length is exact:
 * intro + filler + needle + filler + question = the cell's context length.
 * Each (length, depth, trial) cell draws its key and the filler's start in
 * the text from the seed. One cache configuration per run (as in `oscar
 * ppl`); a grid of lengths x depths is printed, written as JSON with --json
 * and drawn as a PNG heat map with --png.
 */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"
#include "model_commands.h"
#include "png.h"

#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NIAH_MAX_AXIS 16
#define NIAH_ANSWER_TOKENS 8

typedef struct niah_args {
    const char *model, *text, *png, *json;
    int lengths[NIAH_MAX_AXIS], n_lengths;
    int depths[NIAH_MAX_AXIS], n_depths;
    int trials, threads, cuda;
    int gpu_weights_f32; /* --gpu-weights f32: fp32 weight matrices on the GPU (a rounding control for 16-bit) */
    int control; /* --control: the needle is never stated (a score above chance means a broken scorer) */
    unsigned long long seed;
    oscar_config cfg;
} niah_args;

static uint64_t niah_rng(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* "1024,2048" -> values in [lo, hi]; returns the count or -1. */
static int parse_list(const char *s, int *out, int max, long lo, long hi) {
    int n = 0;
    while (*s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (errno || end == s || v < lo || v > hi || n == max) return -1;
        out[n++] = (int)v;
        if (*end == ',') end++;
        else if (*end) return -1;
        s = end;
    }
    return n;
}

static int niah_parse(int argc, char **argv, niah_args *a) {
    memset(a, 0, sizeof *a);
    a->model = getenv("OSCAR_MODEL") ? getenv("OSCAR_MODEL") : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    a->n_lengths = 4, a->lengths[0] = 1024, a->lengths[1] = 2048, a->lengths[2] = 4096, a->lengths[3] = 8192;
    a->n_depths = 5;
    for (int i = 0; i < 5; i++) a->depths[i] = 25 * i;
    a->trials = 3;
    a->seed = 1;
    a->cfg = oscar_config_default();
    a->cfg.method = OSCAR_METHOD_OSCAR;
    a->cfg.bits = 2;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(o, "--control")) { a->control = 1; continue; }
        if (!strcmp(o, "--clip")) { a->cfg.clip_search = 1; continue; }
        if (!strcmp(o, "--norm-per-head")) { a->cfg.key_norm_per_head = 1; continue; }
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            fprintf(stderr,
                    "usage: oscar niah --model M.gguf --text FILE [--lengths 1024,2048,4096,8192]\n"
                    "                  [--depths 0,25,50,75,100] [--trials N] [--seed S]\n"
                    "                  [--kv none|kivi|quarot|scale-only|oscar] [--bits 2|4] [--residual R]\n"
                    "                  [--k-group G] [--v-group G] [--device cpu|cuda] [--threads N]\n"
                    "                  [--gpu-weights bf16|f32]\n"
                    "                  [--png grid.png] [--json out.json] [--control]\n"
                    "                  [--min-exact L] [--sinks S] [--clip] [--norm-per-head]\n"
                    "                  [--key-bits 2|3|4] [--value-bits 2|3|4]   (docs/ACCURACY.md)\n"
                    "  Passkey retrieval: a random 5-digit key stated once at each depth (%% of the\n"
                    "  filler) of prompts of each length, greedy answer, exact match. Prints the\n"
                    "  accuracy grid (depths x lengths) for one cache configuration. --control\n"
                    "  leaves the key out of the prompt (expect 0%%: the scorer's own check).\n");
            return 2;
        }
        if (!v) { fprintf(stderr, "oscar niah: %s needs a value (see oscar niah --help)\n", o); return -1; }
        int ival = 0, isint = 0;
        if (!strcmp(o, "--model") || !strcmp(o, "-m")) a->model = v;
        else if (!strcmp(o, "--text")) a->text = v;
        else if (!strcmp(o, "--png")) a->png = v;
        else if (!strcmp(o, "--json")) a->json = v;
        else if (!strcmp(o, "--lengths")) {
            if ((a->n_lengths = parse_list(v, a->lengths, NIAH_MAX_AXIS, 64, 1 << 20)) <= 0) {
                fprintf(stderr, "oscar niah: --lengths: up to %d integers >= 64, comma-separated\n", NIAH_MAX_AXIS);
                return -1;
            }
        } else if (!strcmp(o, "--depths")) {
            if ((a->n_depths = parse_list(v, a->depths, NIAH_MAX_AXIS, 0, 100)) <= 0) {
                fprintf(stderr, "oscar niah: --depths: up to %d percentages 0..100, comma-separated\n", NIAH_MAX_AXIS);
                return -1;
            }
        } else if (!strcmp(o, "--kv")) {
            if (!strcmp(v, "none")) a->cfg.method = OSCAR_METHOD_NONE;
            else if (oscar_method_parse(v, &a->cfg.method) != OSCAR_OK) {
                fprintf(stderr, "oscar niah: --kv: unknown method '%s'\n", v);
                return -1;
            }
        } else if (!strcmp(o, "--device")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) { fprintf(stderr, "oscar niah: --device: cpu or cuda\n"); return -1; }
            a->cuda = !strcmp(v, "cuda");
        } else if (!strcmp(o, "--gpu-weights")) {
            if (strcmp(v, "bf16") && strcmp(v, "f32")) {
                fprintf(stderr, "oscar niah: --gpu-weights: bf16 or f32, not '%s'\n", v);
                return -1;
            }
            a->gpu_weights_f32 = !strcmp(v, "f32");
        } else if (!strcmp(o, "--seed")) {
            char *end;
            a->seed = strtoull(v, &end, 10);
            if (end == v || *end) { fprintf(stderr, "oscar niah: --seed: an integer\n"); return -1; }
        } else {
            isint = 1;
            char *end;
            errno = 0;
            long x = strtol(v, &end, 10);
            if (errno || end == v || *end || x < 1 || x > (1 << 20)) {
                fprintf(stderr, "oscar niah: %s needs a positive integer\n", o);
                return -1;
            }
            ival = (int)x;
        }
        if (isint) {
            if (!strcmp(o, "--trials")) a->trials = ival;
            else if (!strcmp(o, "--bits")) a->cfg.bits = ival;
            else if (!strcmp(o, "--residual")) a->cfg.residual = ival;
            else if (!strcmp(o, "--k-group")) a->cfg.k_group = ival;
            else if (!strcmp(o, "--v-group")) a->cfg.v_group = ival;
            else if (!strcmp(o, "--min-exact") || !strcmp(o, "--rollback")) a->cfg.rollback_tokens = ival;
            else if (!strcmp(o, "--sinks")) a->cfg.sink_tokens = ival;
            else if (!strcmp(o, "--key-bits")) a->cfg.key_bits = ival;     /* 2, 3 or 4: checked by the library */
            else if (!strcmp(o, "--value-bits")) a->cfg.value_bits = ival;
            else if (!strcmp(o, "--threads")) a->threads = ival;
            else { fprintf(stderr, "oscar niah: unknown option '%s' (see oscar niah --help)\n", o); return -1; }
        }
        i++;
    }
    if (a->cfg.bits != 2 && a->cfg.bits != 4) { fprintf(stderr, "oscar niah: --bits must be 2 or 4\n"); return -1; }
    if (!a->text) { fprintf(stderr, "oscar niah: --text is required (the filler: scripts/get-text.sh)\n"); return -1; }
    if (a->gpu_weights_f32 && !a->cuda) {
        fprintf(stderr, "oscar niah: --gpu-weights f32 needs --device cuda (the CPU runner computes in fp32)\n");
        return -1;
    }
    if (a->cuda) a->cfg.backend = OSCAR_BACKEND_CUDA;
    return 0;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *nb = realloc(buf, cap * 2);
        if (!nb) { free(buf); buf = NULL; break; }
        buf = nb, cap *= 2;
    }
    fclose(f);
    *len = n;
    return buf;
}

/* The first five consecutive digits of the answer, or "" */
static void first_five_digits(const char *s, char out[6]) {
    int run = 0;
    out[0] = 0;
    for (const char *p = s; *p; p++) {
        if (*p >= '0' && *p <= '9') {
            out[run++] = *p;
            if (run == 5) { out[5] = 0; return; }
        } else if (run > 0) {
            run = 0; /* a shorter number: keep looking */
        }
    }
    out[0] = 0;
}

int oscar_cmd_niah(int argc, char **argv) {
    niah_args a;
    int pr = niah_parse(argc, argv, &a);
    if (pr != 0) return pr == 2 ? 0 : 1;
    if (a.threads > 0) omp_set_num_threads(a.threads);
    size_t tlen;
    char *text = slurp(a.text, &tlen);
    if (!text) { fprintf(stderr, "oscar niah: cannot read '%s': %s\n", a.text, strerror(errno)); return 1; }
    char err[512];
    llama_model *m = llama_load(a.model, 0, err, sizeof err);
    if (!m) { fprintf(stderr, "oscar niah: %s\n", err); free(text); return 1; }
    m->gpu_weights_f32 = a.gpu_weights_f32;
    int rc = 1, max_len = 0;
    for (int i = 0; i < a.n_lengths; i++) max_len = a.lengths[i] > max_len ? a.lengths[i] : max_len;
    int32_t *filler = NULL, *intro = NULL, *ques = NULL, *needle = NULL, *prompt = NULL;
    size_t n_filler = 0, c_filler = 0, n_intro = 0, c_intro = 0, n_ques = 0, c_ques = 0;
    int *correct = calloc((size_t)a.n_lengths * a.n_depths, sizeof *correct);
    /* each prompt's outcome, '1' found / '0' missed, per cell in trial order
     * (the JSON's "found": the same prompts in two runs pair up by seed) */
    char *found = calloc((size_t)a.n_lengths * a.n_depths * (a.trials + 1), 1);
    llama_kv kv;
    llama_state st;
    memset(&kv, 0, sizeof kv);
    memset(&st, 0, sizeof st);
    const int chunk = 32;
    if (!correct || !found) { fprintf(stderr, "oscar niah: out of memory\n"); goto out; }
    if (max_len + NIAH_ANSWER_TOKENS > m->ctx_max) {
        fprintf(stderr, "oscar niah: --lengths up to %d exceed the model's context of %d\n", max_len, m->ctx_max);
        goto out;
    }
    static const char k_intro[] =
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n\n";
    static const char k_question[] = "\n\nWhat is the pass key? The pass key is";
    if (tok_encode(m->tok, text, tlen, 0, &filler, &n_filler, &c_filler) != 0 ||
        tok_encode(m->tok, k_intro, strlen(k_intro), 0, &intro, &n_intro, &c_intro) != 0 ||
        tok_encode(m->tok, k_question, strlen(k_question), 0, &ques, &n_ques, &c_ques) != 0) {
        fprintf(stderr, "oscar niah: out of memory\n");
        goto out;
    }
    if ((int64_t)n_filler < max_len) {
        fprintf(stderr, "oscar niah: '%s' gives %zu tokens, fewer than the longest prompt (%d)\n", a.text, n_filler,
                max_len);
        goto out;
    }
    prompt = malloc((size_t)(max_len + NIAH_ANSWER_TOKENS) * sizeof *prompt);
    if (!prompt) { fprintf(stderr, "oscar niah: out of memory\n"); goto out; }
    if (llama_kv_init(&kv, m, &a.cfg, 0, max_len + NIAH_ANSWER_TOKENS, err, sizeof err) != 0 ||
        llama_state_init(&st, m, chunk) != 0) {
        fprintf(stderr, "oscar niah: %s\n", err[0] ? err : "out of memory");
        goto out;
    }
    char label[160];
    oscar_kv_label(&a.cfg, label, sizeof label);
    fprintf(stderr, "oscar niah: %s, cache %s, %d lengths x %d depths x %d trials, %s\n", m->name ? m->name : a.model,
            label, a.n_lengths, a.n_depths, a.trials,
            a.cuda ? (a.gpu_weights_f32 ? "GPU, f32 weights" : "GPU, bf16 weights") : "CPU");
    int64_t done = 0, total = (int64_t)a.n_lengths * a.n_depths * a.trials;
    for (int li = 0; li < a.n_lengths; li++)
        for (int di = 0; di < a.n_depths; di++)
            for (int tr = 0; tr < a.trials; tr++) {
                uint64_t s = a.seed * 1000003ull + (uint64_t)li * 7919u + (uint64_t)di * 104729u + (uint64_t)tr;
                const int key = 10000 + (int)(niah_rng(&s) % 90000);
                char ntext[128];
                if (a.control) /* a sentence of the same kind without the key */
                    snprintf(ntext, sizeof ntext, " The pass key is secret. Remember it. It is the pass key. ");
                else
                    snprintf(ntext, sizeof ntext, " The pass key is %d. Remember it. %d is the pass key. ", key, key);
                size_t n_needle = 0, c_needle = 0;
                free(needle);
                needle = NULL;
                if (tok_encode(m->tok, ntext, strlen(ntext), 0, &needle, &n_needle, &c_needle) != 0) {
                    fprintf(stderr, "oscar niah: out of memory\n");
                    goto out;
                }
                const int L = a.lengths[li];
                const int fill = L - (int)(n_intro + n_needle + n_ques);
                if (fill < 0) {
                    fprintf(stderr, "oscar niah: length %d is shorter than the task's own text (%zu tokens)\n", L,
                            n_intro + n_needle + n_ques);
                    goto out;
                }
                const size_t start = (size_t)(niah_rng(&s) % (uint64_t)(n_filler - (size_t)fill + 1));
                const int at = (int)((int64_t)fill * a.depths[di] / 100);
                int n = 0;
                memcpy(prompt + n, intro, n_intro * sizeof *prompt), n += (int)n_intro;
                memcpy(prompt + n, filler + start, (size_t)at * sizeof *prompt), n += at;
                memcpy(prompt + n, needle, n_needle * sizeof *prompt), n += (int)n_needle;
                memcpy(prompt + n, filler + start + at, (size_t)(fill - at) * sizeof *prompt), n += fill - at;
                memcpy(prompt + n, ques, n_ques * sizeof *prompt), n += (int)n_ques;
                if (llama_kv_reset(&kv, err, sizeof err) != 0) { fprintf(stderr, "oscar niah: %s\n", err); goto out; }
                for (int p = 0, nt; p < n; p += nt) {
                    nt = llama_next_chunk(&kv, n, chunk);
                    if (llama_forward(m, &st, &kv, prompt + p, nt, p + nt == n ? 1 : 0, err, sizeof err) != 0) {
                        fprintf(stderr, "oscar niah: %s\n", err);
                        goto out;
                    }
                }
                char answer[256] = "";
                size_t alen = 0;
                for (int g = 0; g < NIAH_ANSWER_TOKENS; g++) {
                    int best = 0;
                    for (int i = 1; i < m->vocab; i++)
                        if (st.logits[i] > st.logits[best]) best = i;
                    if (best == tok_eos(m->tok) || tok_is_control(m->tok, best)) break;
                    char piece[64];
                    size_t pn = tok_decode(m->tok, best, piece, sizeof piece);
                    if (pn > sizeof piece) pn = sizeof piece;
                    if (alen + pn < sizeof answer) memcpy(answer + alen, piece, pn), alen += pn, answer[alen] = 0;
                    if (g + 1 == NIAH_ANSWER_TOKENS) break;
                    int32_t tk = best;
                    if (llama_forward(m, &st, &kv, &tk, 1, 1, err, sizeof err) != 0) {
                        fprintf(stderr, "oscar niah: %s\n", err);
                        goto out;
                    }
                }
                char got[6];
                first_five_digits(answer, got);
                const int ok = got[0] && atoi(got) == key;
                correct[li * a.n_depths + di] += ok;
                found[(size_t)(li * a.n_depths + di) * (a.trials + 1) + tr] = ok ? '1' : '0';
                done++;
                fprintf(stderr, "\r  %lld/%lld prompts", (long long)done, (long long)total);
                fflush(stderr);
            }
    fputc('\n', stderr);
    /* the grid: depths down, lengths across, % of trials answered exactly */
    printf("passkey retrieval%s, cache %s, %d trials per cell (%% exact)\n", a.control ? " (CONTROL: no key)" : "", label,
           a.trials);
    printf("depth \\ length");
    for (int li = 0; li < a.n_lengths; li++) printf(" %7d", a.lengths[li]);
    printf("\n");
    int all = 0;
    for (int di = 0; di < a.n_depths; di++) {
        printf("%13d%%", a.depths[di]);
        for (int li = 0; li < a.n_lengths; li++) {
            const int c = correct[li * a.n_depths + di];
            all += c;
            printf(" %6.0f%%", 100.0 * c / a.trials);
        }
        printf("\n");
    }
    printf("overall %.1f%% (%d of %lld)\n", 100.0 * all / (double)total, all, (long long)total);
    if (a.json) {
        FILE *f = fopen(a.json, "w");
        if (!f) { fprintf(stderr, "oscar niah: cannot write '%s': %s\n", a.json, strerror(errno)); goto out; }
        fprintf(f,
                "{\"method\":\"%s\",\"bits\":%d,\"cache\":\"%s\",\"key_bits\":%d,\"value_bits\":%d,\"residual\":%d,"
                "\"min_exact\":%d,\"sinks\":%d,\"trials\":%d,\"seed\":%llu,\"control\":%d,\"device\":\"%s\","
                "\"weights\":\"%s\",\"k_group\":%d,\"v_group\":%d,\"cells\":[",
                a.cfg.method == OSCAR_METHOD_NONE ? "none" : oscar_method_name(a.cfg.method),
                a.cfg.method == OSCAR_METHOD_NONE ? 16 : a.cfg.bits, label, a.cfg.key_bits, a.cfg.value_bits,
                a.cfg.residual, a.cfg.rollback_tokens, a.cfg.sink_tokens, a.trials, a.seed, a.control,
                a.cuda ? "cuda" : "cpu", a.cuda ? (a.gpu_weights_f32 ? "f32" : "bf16") : "gguf", a.cfg.k_group,
                a.cfg.v_group);
        for (int li = 0, k = 0; li < a.n_lengths; li++)
            for (int di = 0; di < a.n_depths; di++, k++)
                fprintf(f, "%s{\"length\":%d,\"depth\":%d,\"correct\":%d,\"found\":\"%s\"}", k ? "," : "",
                        a.lengths[li], a.depths[di], correct[li * a.n_depths + di],
                        found + (size_t)k * (a.trials + 1));
        fprintf(f, "]}\n");
        fclose(f);
    }
    if (a.png) {
        /* one 32x32 cell per (depth, length): red (0%) to green (100%) */
        const int cs = 32, W = a.n_lengths * cs, H = a.n_depths * cs;
        uint8_t *img = malloc((size_t)W * H * 3);
        if (!img) { fprintf(stderr, "oscar niah: out of memory\n"); goto out; }
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                const double f = (double)correct[(x / cs) * a.n_depths + y / cs] / a.trials;
                const int edge = x % cs == 0 || y % cs == 0;
                uint8_t *px = img + ((size_t)y * W + x) * 3;
                px[0] = edge ? 255 : (uint8_t)(220 * (1 - f) + 20);
                px[1] = edge ? 255 : (uint8_t)(180 * f + 30);
                px[2] = edge ? 255 : 40;
            }
        int w = png_write_rgb(a.png, img, W, H);
        free(img);
        if (w != 0) { fprintf(stderr, "oscar niah: cannot write '%s': %s\n", a.png, strerror(errno)); goto out; }
    }
    rc = 0;
out:
    free(correct);
    free(found);
    free(filler);
    free(intro);
    free(ques);
    free(needle);
    free(prompt);
    llama_state_free(&st);
    llama_kv_free(&kv);
    llama_free(m);
    free(text);
    return rc;
}
