/*
 * test_soak.c - a long differential random walk over the sequence API.
 *
 * Epochs of a seeded random walk, each on a fresh cache of another shape
 * (method, bits, window dtype, rollback lag, pool size), mixing seq_add,
 * fork, free, append (1 to 300 tokens, several sequences per call,
 * sometimes to one layer only), attention (q_len 1 to 16, several
 * sequences), export + import and truncate. A model written here predicts
 * every call's status (including OSCAR_E_POOL_EXHAUSTED when blocks or
 * slots run out, OSCAR_E_INVALID_ARGUMENT for forks of uneven layers and
 * truncations into packed blocks) and every sequence's lengths and packed
 * blocks from the rule in oscar.h. The history of each (sequence, layer) is
 * kept as the seeds of its appended chunks and regenerated on demand, so
 * thousands of sequences and millions of tokens fit in little memory.
 *
 * After every step:
 *  - each live sequence's seq_info (tokens, packed, window, blocks) equals
 *    the model's; its block table holds distinct ids in range;
 *  - a block shared by two sequences sits at the same table index in both
 *    (only forks and imports share, and only prefixes);
 *  - memory statistics add up: blocks_used is the number of distinct blocks
 *    in live tables, blocks_free the rest, bytes_in_use used blocks plus the
 *    live sequences' windows, seqs_live the model's count.
 * Every attention is compared with float64 attention over the library's own
 * read-back K/V (tl_ref_attention_f, 1e-5 of the output's scale); every 20th
 * step, and after each import and fork, one sequence's read-back K/V is
 * compared with the float64 reference quantiser (FORMAT.md steps 1-8,
 * tl_ref_build_packed) over its regenerated history; export -> import
 * reproduces the stream byte for byte.
 *
 * Duration: OSCAR_SOAK_SECONDS, or argv[1] (seconds), else 100 s (35 s in a
 * sanitizer build, where each step is ~5x slower). scripts: `OSCAR_SOAK_SECONDS=36000
 * build/tests/test_soak` soaks for ten hours. The seed is printed
 * (OSCAR_TEST_SEED changes it). An epoch ends by time as well as by steps,
 * so the seed alone does not replay a failure in a later epoch: each
 * epoch's line names its start ("replay E:0x..."), and OSCAR_SOAK_REPLAY=
 * E:0x... starts the walk there; the step number then locates the failure.
 */
#include "testlib.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__SANITIZE_ADDRESS__)
#define SOAK_DEFAULT_SECONDS 35.0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SOAK_DEFAULT_SECONDS 35.0
#endif
#endif
#ifndef SOAK_DEFAULT_SECONDS
#define SOAK_DEFAULT_SECONDS 100.0
#endif

enum { LAYERS = 2, D = 64, HKV = 2, HQ = 4, ROW = HKV * D, MAXSEQ = 24, MAX_BLOCKS = 256 };
enum { MAX_TOKENS = 1500 };      /* per sequence and layer, so that the pool churns */

/* ---- the model ----------------------------------------------------------- */

typedef struct chunk {
    uint64_t seed;
    int32_t generated, kept;     /* tokens made from the seed, of which still in the sequence */
    oscar_dtype dtype;           /* the input dtype of the append                              */
} chunk;

typedef struct layer_model {
    chunk *chunks;
    int n_chunks, cap;
    int64_t tokens, packed;      /* packed: blocks */
} layer_model;

typedef struct seq_model {
    int32_t id;
    layer_model layer[LAYERS];
    int64_t table_len;           /* block table entries (max packed a layer ever reached) */
} seq_model;

typedef struct soak {
    oscar_config cfg;
    tl_geom g;
    oscar_cache *c;
    seq_model seq[MAXSEQ];
    int live;
    tl_rng rng;
    long step;
    /* counters for the report */
    long appends, attentions, forks, frees, adds, imports, truncates, refused, readbacks;
    int64_t tokens_appended;
} soak;

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

static void layer_push(layer_model *lm, chunk ch) {
    if (lm->n_chunks == lm->cap) {
        lm->cap = lm->cap ? 2 * lm->cap : 8;
        lm->chunks = realloc(lm->chunks, sizeof(chunk) * (size_t)lm->cap);
    }
    lm->chunks[lm->n_chunks++] = ch;
}

static void seq_model_copy(seq_model *dst, const seq_model *src) {
    *dst = *src;
    for (int l = 0; l < LAYERS; l++) {
        dst->layer[l].chunks = malloc(sizeof(chunk) * (size_t)(src->layer[l].cap ? src->layer[l].cap : 1));
        if (src->layer[l].n_chunks) /* an empty layer has no array to copy from */
            memcpy(dst->layer[l].chunks, src->layer[l].chunks, sizeof(chunk) * (size_t)src->layer[l].n_chunks);
    }
}

static void seq_model_free(seq_model *s) {
    for (int l = 0; l < LAYERS; l++) free(s->layer[l].chunks);
    memset(s, 0, sizeof *s);
}

/* The chunk's tokens, as fp32 values already rounded to its input dtype. */
static void chunk_tokens(const chunk *ch, float *k, float *v) {
    tl_rng r = tl_rng_seeded(ch->seed);
    tl_gen_kv(&r, (int)(ch->seed % TL_FLAVORS), k, v, ch->generated, HKV, D, ch->dtype);
}

/* The whole history of a sequence's layer: [tokens][ROW] (caller frees). */
static void history(const layer_model *lm, float **k, float **v) {
    *k = malloc(sizeof(float) * (size_t)(lm->tokens + 1) * ROW);
    *v = malloc(sizeof(float) * (size_t)(lm->tokens + 1) * ROW);
    int64_t at = 0;
    for (int i = 0; i < lm->n_chunks; i++) {
        const chunk *ch = &lm->chunks[i];
        float *ck = malloc(sizeof(float) * (size_t)ch->generated * ROW), *cv = malloc(sizeof(float) * (size_t)ch->generated * ROW);
        chunk_tokens(ch, ck, cv);
        memcpy(*k + at * ROW, ck, sizeof(float) * (size_t)ch->kept * ROW);
        memcpy(*v + at * ROW, cv, sizeof(float) * (size_t)ch->kept * ROW);
        at += ch->kept;
        free(ck), free(cv);
    }
}

static int64_t free_blocks(const soak *s) {
    /* blocks referenced: shared prefixes counted once (the model knows the
     * sharing only through the library's tables, read in check_invariants;
     * here the library's own count is the prediction's input, and the
     * invariant check keeps it honest) */
    oscar_memory_stats m;
    oscar_memory(s->c, &m);
    return m.blocks_free;
}

static int pick_live(soak *s) { return s->live ? tl_randint(&s->rng, 0, s->live - 1) : -1; }

/* ---- checks ------------------------------------------------------------- */

static int check_invariants(soak *s) {
    static int32_t owner_index[MAX_BLOCKS], refs[MAX_BLOCKS];
    const int B = s->cfg.block_count;
    for (int b = 0; b < B; b++) owner_index[b] = -1, refs[b] = 0;
    int ok = 1;
    int64_t distinct = 0;
    int32_t table[MAX_BLOCKS];
    for (int i = 0; i < s->live && ok; i++) {
        const seq_model *q = &s->seq[i];
        for (int l = 0; l < LAYERS; l++) {
            oscar_seq_info info;
            ok &= CHECK_OK(oscar_seq_info_get(s->c, q->id, l, &info));
            ok &= CHECKF(info.tokens == q->layer[l].tokens && info.packed_tokens == q->layer[l].packed * s->cfg.residual &&
                             info.window_tokens == info.tokens - info.packed_tokens && info.blocks == q->table_len,
                         "step %ld: seq %d layer %d: library tokens %lld packed %lld window %d blocks %d, model %lld / "
                         "%lld / - / %lld",
                         s->step, q->id, l, (long long)info.tokens, (long long)info.packed_tokens, info.window_tokens,
                         info.blocks, (long long)q->layer[l].tokens, (long long)(q->layer[l].packed * s->cfg.residual),
                         (long long)q->table_len);
        }
        int32_t n = -1;
        ok &= CHECK_OK(oscar_seq_block_table(s->c, q->id, table, MAX_BLOCKS, &n));
        ok &= CHECKF(n == q->table_len, "step %ld: seq %d has %d table entries, model %lld", s->step, q->id, n,
                     (long long)q->table_len);
        for (int32_t j = 0; j < n && ok; j++) {
            const int32_t b = table[j];
            ok &= CHECKF(b >= 0 && b < B, "step %ld: seq %d table[%d] = %d out of range", s->step, q->id, j, b);
            if (!ok) break;
            if (refs[b]++ == 0) {
                owner_index[b] = j;
                distinct++;
            } else {
                /* twice in one table, or shared at another position: not a fork's prefix */
                ok &= CHECKF(owner_index[b] == j, "step %ld: block %d at table index %d of seq %d and index %d elsewhere",
                             s->step, b, j, q->id, owner_index[b]);
            }
        }
    }
    oscar_memory_stats m;
    ok &= CHECK_OK(oscar_memory(s->c, &m));
    const int64_t window_per_seq = m.window_bytes / m.seqs_max;
    ok &= CHECKF(m.seqs_live == s->live && m.blocks_total == B && m.blocks_used == distinct &&
                     m.blocks_free == B - distinct && m.bytes_in_use == distinct * m.block_bytes + s->live * window_per_seq,
                 "step %ld: memory stats: live %d (model %d), used %lld free %lld (tables hold %lld distinct blocks), in use "
                 "%lld",
                 s->step, m.seqs_live, s->live, (long long)m.blocks_used, (long long)m.blocks_free, (long long)distinct,
                 (long long)m.bytes_in_use);
    return ok;
}

/* Read-back K/V of one (sequence, layer) against the float64 reference
 * quantiser over the regenerated history. */
static int check_readback(soak *s, const seq_model *q, int l) {
    const layer_model *lm = &q->layer[l];
    if (lm->tokens == 0) return 1;
    s->readbacks++;
    float *k, *v, *kl, *vl;
    history(lm, &k, &v);
    const int64_t got = tl_read_all(s->c, q->id, l, HKV, D, &kl, &vl);
    int ok = CHECKF(got == lm->tokens, "step %ld: read %lld of %lld tokens", s->step, (long long)got,
                    (long long)lm->tokens);
    if (ok) {
        tl_ref ref;
        tl_ref_build_packed(&s->g, k, v, lm->tokens, lm->packed * s->cfg.residual, NULL, &ref);
        tl_cmp_stats ks, vs;
        memset(&ks, 0, sizeof ks), memset(&vs, 0, sizeof vs);
        tl_compare_readback(&s->g, &ref, kl, 0, &ks);
        tl_compare_readback(&s->g, &ref, vl, 1, &vs);
        /* the thresholds of test_reference (tl_readback_within), with one
         * element beyond a step allowed for a code flipped by s */
        ok &= CHECKF(tl_readback_within(&s->g, &ks, &vs, 1),
                     "step %ld: seq %d layer %d (%lld tokens, %lld packed): K %lld/%lld elements (%lld beyond a step, "
                     "%lld in the window, %lld/%lld groups), V %lld (%lld, %lld, %lld/%lld) differ from the reference",
                     s->step, q->id, l, (long long)lm->tokens, (long long)lm->packed, (long long)ks.mism,
                     (long long)ks.elems, (long long)ks.hard, (long long)ks.window_mism, (long long)ks.bad_groups,
                     (long long)ks.groups, (long long)vs.mism, (long long)vs.hard, (long long)vs.window_mism,
                     (long long)vs.bad_groups, (long long)vs.groups);
        tl_ref_free(&ref);
    }
    free(k), free(v), free(kl), free(vl);
    return ok;
}

/* ---- steps ------------------------------------------------------------------ */

static void step_add(soak *s) {
    int32_t id = -1;
    oscar_status want = s->live == s->cfg.max_seqs ? OSCAR_E_POOL_EXHAUSTED : OSCAR_OK;
    CHECK_ST(s->c, oscar_seq_add(s->c, &id), want);
    if (want != OSCAR_OK) {
        s->refused++;
        return;
    }
    s->adds++;
    seq_model *q = &s->seq[s->live++];
    memset(q, 0, sizeof *q);
    q->id = id;
}

static void step_free(soak *s) {
    if (tl_randint(&s->rng, 0, 20) == 0) { /* an id that does not exist */
        CHECK_ST(s->c, oscar_seq_free(s->c, -7 - (int32_t)s->step % 1000), OSCAR_E_NOT_FOUND);
        return;
    }
    int i = pick_live(s);
    if (i < 0) return;
    CHECK_ST(s->c, oscar_seq_free(s->c, s->seq[i].id), OSCAR_OK);
    seq_model_free(&s->seq[i]);
    s->seq[i] = s->seq[--s->live];
    s->frees++;
}

static void step_fork(soak *s) {
    int i = pick_live(s);
    if (i < 0) return;
    const seq_model *src = &s->seq[i];
    int uneven = 0;
    for (int l = 1; l < LAYERS; l++) uneven |= src->layer[l].tokens != src->layer[0].tokens;
    oscar_status want = uneven ? OSCAR_E_INVALID_ARGUMENT
                        : s->live == s->cfg.max_seqs ? OSCAR_E_POOL_EXHAUSTED : OSCAR_OK;
    int32_t id = -1;
    if (!CHECK_ST(s->c, oscar_seq_fork(s->c, src->id, &id), want) || want != OSCAR_OK) {
        s->refused++;
        return;
    }
    s->forks++;
    seq_model *q = &s->seq[s->live++];
    seq_model_copy(q, src);
    q->id = id;
    int32_t ta[MAX_BLOCKS], tb[MAX_BLOCKS], na = 0, nb = 0;
    oscar_seq_block_table(s->c, src->id, ta, MAX_BLOCKS, &na);
    oscar_seq_block_table(s->c, id, tb, MAX_BLOCKS, &nb);
    CHECKF(na == nb && memcmp(ta, tb, sizeof(int32_t) * (size_t)na) == 0, "step %ld: the fork's table is not its parent's",
           s->step);
    check_readback(s, q, tl_randint(&s->rng, 0, LAYERS - 1));
}

static void step_truncate(soak *s) {
    int i = pick_live(s);
    if (i < 0) return;
    seq_model *q = &s->seq[i];
    int64_t longest = 0;
    for (int l = 0; l < LAYERS; l++) longest = max_i64(longest, q->layer[l].tokens);
    /* mostly a few tokens back (speculative decoding), sometimes anywhere */
    int64_t len = tl_randint(&s->rng, 0, 3) ? longest - tl_randint(&s->rng, 0, 6) : tl_randint(&s->rng, 0, (int)longest);
    if (len < 0) len = 0;
    int ok_cut = 1;
    for (int l = 0; l < LAYERS; l++)
        if (len < q->layer[l].tokens && len < q->layer[l].packed * s->cfg.residual) ok_cut = 0;
    if (!CHECK_ST(s->c, oscar_seq_truncate(s->c, q->id, len), ok_cut ? OSCAR_OK : OSCAR_E_INVALID_ARGUMENT) || !ok_cut) {
        s->refused++;
        return;
    }
    s->truncates++;
    for (int l = 0; l < LAYERS; l++) {
        layer_model *lm = &q->layer[l];
        if (lm->tokens <= len) continue;
        int64_t drop = lm->tokens - len;
        while (drop > 0) {
            chunk *last = &lm->chunks[lm->n_chunks - 1];
            const int32_t cut = (int32_t)(drop < last->kept ? drop : last->kept);
            last->kept -= cut;
            drop -= cut;
            if (last->kept == 0) lm->n_chunks--;
        }
        lm->tokens = len;
    }
}

static void step_append(soak *s) {
    if (s->live == 0) return;
    int n_seqs = tl_randint(&s->rng, 1, s->live < 3 ? s->live : 3);
    int idx[3];
    for (int a = 0; a < n_seqs; a++) {
        int again;
        do {
            idx[a] = pick_live(s);
            again = 0;
            for (int b = 0; b < a; b++) again |= idx[b] == idx[a];
        } while (again);
    }
    const int one_layer = tl_randint(&s->rng, 0, 19) == 0 ? tl_randint(&s->rng, 0, LAYERS - 1) : -1;
    /* mostly decode-sized, sometimes a prefill chunk of up to 300 */
    int32_t n[3];
    for (int a = 0; a < n_seqs; a++) n[a] = tl_randint(&s->rng, 0, 2) ? tl_randint(&s->rng, 1, 8) : tl_randint(&s->rng, 1, 300);
    const oscar_dtype dtype = (oscar_dtype)(tl_next(&s->rng) % 3);
    for (int l = 0; l < LAYERS; l++) {
        if (one_layer >= 0 && l != one_layer) continue;
        /* the model's prediction: blocks this call packs beyond the tables */
        int64_t new_blocks = 0, too_long = 0, P1[3];
        for (int a = 0; a < n_seqs; a++) {
            const seq_model *q = &s->seq[idx[a]];
            const int64_t after = q->layer[l].tokens + n[a];
            const int64_t p = (after - s->cfg.rollback_tokens) >= 0 ? (after - s->cfg.rollback_tokens) / s->cfg.residual : 0;
            P1[a] = max_i64(q->layer[l].packed, p);
            new_blocks += max_i64(0, P1[a] - q->table_len);
            too_long |= after > MAX_TOKENS;
        }
        if (too_long) return; /* keeps sequences short enough to churn the pool */
        const oscar_status want = new_blocks > free_blocks(s) ? OSCAR_E_POOL_EXHAUSTED : OSCAR_OK;
        chunk ch[3];
        int64_t rows = 0;
        for (int a = 0; a < n_seqs; a++) rows += n[a];
        float *k = malloc(sizeof(float) * (size_t)rows * ROW), *v = malloc(sizeof(float) * (size_t)rows * ROW);
        int64_t at = 0;
        for (int a = 0; a < n_seqs; a++) {
            ch[a].seed = tl_next(&s->rng);
            ch[a].generated = ch[a].kept = n[a];
            ch[a].dtype = dtype;
            chunk_tokens(&ch[a], k + at * ROW, v + at * ROW);
            at += n[a];
        }
        const size_t es = (size_t)tl_dtype_size(dtype);
        void *kb = malloc((size_t)rows * ROW * es), *vb = malloc((size_t)rows * ROW * es);
        tl_encode(k, dtype, kb, rows * ROW);
        tl_encode(v, dtype, vb, rows * ROW);
        int32_t ids[3];
        for (int a = 0; a < n_seqs; a++) ids[a] = s->seq[idx[a]].id;
        const int ok = CHECK_ST(s->c, oscar_append(s->c, l, n_seqs, ids, n, kb, vb, dtype, NULL), want);
        free(k), free(v), free(kb), free(vb);
        if (!ok || want != OSCAR_OK) {
            s->refused++;
            return;
        }
        s->appends++;
        for (int a = 0; a < n_seqs; a++) {
            seq_model *q = &s->seq[idx[a]];
            layer_push(&q->layer[l], ch[a]);
            q->layer[l].tokens += n[a];
            q->layer[l].packed = P1[a];
            q->table_len = max_i64(q->table_len, P1[a]);
            s->tokens_appended += n[a];
        }
    }
}

static void step_attention(soak *s) {
    const int l = tl_randint(&s->rng, 0, LAYERS - 1);
    const int q_len = tl_randint(&s->rng, 1, 16);
    int idx[4], n_seqs = 0;
    for (int tries = 0; tries < 8 && n_seqs < 4; tries++) {
        int i = pick_live(s);
        if (i < 0 || s->seq[i].layer[l].tokens < q_len) continue;
        int dup = 0;
        for (int b = 0; b < n_seqs; b++) dup |= idx[b] == i;
        if (!dup) idx[n_seqs++] = i;
    }
    if (n_seqs == 0) return;
    int32_t ids[4];
    for (int a = 0; a < n_seqs; a++) ids[a] = s->seq[idx[a]].id;
    const int64_t nq = (int64_t)q_len * HQ * D;
    float *q = malloc(sizeof(float) * (size_t)(n_seqs * nq)), *o = malloc(sizeof(float) * (size_t)(n_seqs * nq));
    float *kl[4], *vl[4];
    int64_t T[4];
    for (int a = 0; a < n_seqs; a++) {
        T[a] = tl_read_all(s->c, ids[a], l, HKV, D, &kl[a], &vl[a]);
        /* logits of a std of about 2 over this sequence's keys (some chunks
         * hold values near the fp16 maximum: fixed-scale queries would give
         * logits of 1e5, where fp32 rounding alone moves the softmax) */
        tl_gen_q(&s->rng, q + a * nq, q_len, HQ, D, tl_key_rms_norm(kl[a], T[a], HKV, D), 2.0, OSCAR_DTYPE_F32);
    }
    const oscar_dtype out_dt = tl_randint(&s->rng, 0, 3) ? OSCAR_DTYPE_F32 : OSCAR_DTYPE_F16;
    if (CHECK_ST(s->c, tl_attention(s->c, l, n_seqs, ids, q_len, q, OSCAR_DTYPE_F32, out_dt, 0.0f, o, HQ, D), OSCAR_OK)) {
        s->attentions++;
        CHECKF(tl_count_nonfinite(o, n_seqs * nq) == 0, "step %ld: attention left NaN or unwritten outputs", s->step);
        for (int a = 0; a < n_seqs; a++) {
            double *want = malloc(sizeof(double) * (size_t)nq), *mag = malloc(sizeof(double) * (size_t)q_len * HQ);
            tl_ref_attention_f(D, HKV, HQ, kl[a], vl[a], T[a], q_len, q + a * nq, 1.0 / sqrt((double)D), want, mag);
            /* test_properties' 1e-5, plus the fp32 summation bound T u over
             * the longer sequences here (an attended wrong token is O(1)) */
            const double rel = 1e-5 + (double)T[a] * 6e-8;
            /* fp16 outputs saturate at +-65504 (FORMAT.md), and values near the
             * fp16 maximum can average past it after the inverse rotation */
            if (out_dt == OSCAR_DTYPE_F16)
                for (int64_t e = 0; e < nq; e++) want[e] = want[e] > 65504.0 ? 65504.0 : want[e] < -65504.0 ? -65504.0 : want[e];
            double worst = 0;
            const int64_t bad = tl_compare_out(o + a * nq, want, mag, (int64_t)q_len * HQ, D, out_dt, rel, &worst);
            CHECKF(bad == 0,
                   "step %ld: attention of seq %d layer %d (%lld tokens, q_len %d) vs float64 over its K/V: %lld "
                   "elements beyond %.2g, worst %.3g",
                   s->step, ids[a], l, (long long)T[a], q_len, (long long)bad, rel, worst);
            free(want), free(mag);
        }
    }
    for (int a = 0; a < n_seqs; a++) free(kl[a]), free(vl[a]);
    free(q), free(o);
}

static void step_export_import(soak *s) {
    int i = pick_live(s);
    if (i < 0) return;
    size_t size = 0;
    unsigned char *stream = tl_export(s->c, s->seq[i].id, &size);
    if (!stream) return;
    int64_t need = 0;
    for (int l = 0; l < LAYERS; l++) need = max_i64(need, s->seq[i].layer[l].packed);
    const oscar_status want = s->live == s->cfg.max_seqs || need > free_blocks(s) ? OSCAR_E_POOL_EXHAUSTED : OSCAR_OK;
    int32_t id = -1;
    if (!CHECK_ST(s->c, oscar_seq_import(s->c, stream, size, &id), want) || want != OSCAR_OK) {
        s->refused++;
        free(stream);
        return;
    }
    s->imports++;
    seq_model *q = &s->seq[s->live++];
    seq_model_copy(q, &s->seq[i]);
    q->id = id;
    q->table_len = need; /* an import packs exactly the blocks in the stream */
    size_t size2 = 0;
    unsigned char *again = tl_export(s->c, id, &size2);
    CHECKF(again && size2 == size && memcmp(again, stream, size) == 0, "step %ld: export -> import -> export differs",
           s->step);
    free(again), free(stream);
    check_readback(s, q, tl_randint(&s->rng, 0, LAYERS - 1));
}

/* ---- epochs ---------------------------------------------------------------- */

static oscar_config epoch_config(int epoch) {
    static const struct {
        oscar_method m;
        int bits, R, gk, gv, lag, blocks;
        oscar_dtype W;
    } shapes[] = {
        {OSCAR_METHOD_OSCAR, 2, 32, 32, 32, 0, 256, OSCAR_DTYPE_F16},
        {OSCAR_METHOD_OSCAR, 2, 16, 16, 32, 5, 200, OSCAR_DTYPE_BF16},
        {OSCAR_METHOD_KIVI, 4, 32, 16, 16, 8, 160, OSCAR_DTYPE_F16},
        {OSCAR_METHOD_QUAROT, 2, 16, 16, 16, 16, 256, OSCAR_DTYPE_F32},
        {OSCAR_METHOD_SCALE_ONLY, 4, 64, 32, 32, 3, 128, OSCAR_DTYPE_F16},
        {OSCAR_METHOD_NONE, 2, 16, 16, 16, 2, 200, OSCAR_DTYPE_BF16},
    };
    const int n = (int)(sizeof shapes / sizeof shapes[0]);
    oscar_config c = tl_small_config(shapes[epoch % n].m, shapes[epoch % n].bits, D, HKV, HQ);
    c.num_layers = LAYERS;
    c.residual = shapes[epoch % n].R;
    c.k_group = shapes[epoch % n].gk;
    c.v_group = shapes[epoch % n].gv;
    c.rollback_tokens = shapes[epoch % n].lag;
    c.block_count = shapes[epoch % n].blocks;
    c.window_dtype = shapes[epoch % n].W;
    c.max_seqs = MAXSEQ;
    c.num_threads = 1 + epoch % 2; /* the parallel paths too, on alternate epochs */
    return c;
}

static double now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double g_seconds;
static int g_trace; /* OSCAR_SOAK_TRACE=1: one line per step */

static void test_soak(void) {
    const double t0 = now();
    soak s;
    memset(&s, 0, sizeof s);
    s.rng = tl_rng_for("soak");
    long total_steps = 0, epochs = 0, total_seqs = 0;
    const char *replay = getenv("OSCAR_SOAK_REPLAY");
    if (replay && *replay) {
        char *end = NULL;
        epochs = strtol(replay, &end, 10);
        if (!end || *end != ':' || epochs < 0) {
            CHECKF(0, "OSCAR_SOAK_REPLAY=%s: want EPOCH:STATE, as an epoch line prints it", replay);
            return;
        }
        s.rng.s = strtoull(end + 1, NULL, 0);
        printf("   replaying from epoch %ld, state 0x%016llx\n", epochs, (unsigned long long)s.rng.s);
    }
    const long first_epoch = epochs;
    int64_t total_tokens = 0;
    /* every shape gets its turn within the budget: an epoch ends after 400
     * steps or a sixth of the time, whichever comes first */
    const long steps_per_epoch = 400;
    const double epoch_seconds = g_seconds / 6.0;
    long ops_total[3] = {0, 0, 0};
    while (now() - t0 < g_seconds && tl_failed == 0) {
        s.cfg = epoch_config((int)epochs);
        s.g = tl_geom_of(&s.cfg);
        s.c = tl_create(&s.cfg);
        if (!s.c) return;
        const double epoch_start = now();
        const uint64_t epoch_state = s.rng.s;
        for (s.step = 0; s.step < steps_per_epoch && tl_failed == 0; s.step++) {
            const int r = tl_randint(&s.rng, 0, 99);
            /* free more eagerly as the pool fills, so that it churns */
            const int full = free_blocks(&s) < s.cfg.block_count / 5;
            if (g_trace) {
                printf("   step %ld r %d live:", s.step, r);
                for (int i = 0; i < s.live; i++)
                    printf(" %d(%lld/%lld,%lld/%lld)", s.seq[i].id, (long long)s.seq[i].layer[0].tokens,
                           (long long)s.seq[i].layer[0].packed, (long long)s.seq[i].layer[1].tokens,
                           (long long)s.seq[i].layer[1].packed);
                printf("\n");
            }
            if (r < 8) step_add(&s);
            else if (r < (full ? 30 : 16)) step_free(&s);
            else if (r < 21) step_fork(&s);
            else if (r < 60) step_append(&s);
            else if (r < 82) step_attention(&s);
            else if (r < 88) step_export_import(&s);
            else step_truncate(&s);
            if (!check_invariants(&s)) break;
            if (s.step % 20 == 0 && s.live > 0) {
                const int i = pick_live(&s);
                check_readback(&s, &s.seq[i], tl_randint(&s.rng, 0, LAYERS - 1));
            }
            if ((s.step & 15) == 0 && (now() - t0 >= g_seconds || now() - epoch_start >= epoch_seconds)) break;
        }
        total_steps += s.step;
        total_seqs += s.adds + s.forks + s.imports;
        total_tokens += s.tokens_appended;
        ops_total[0] += s.appends, ops_total[1] += s.attentions, ops_total[2] += s.forks + s.imports + s.truncates;
        printf("   epoch %ld (%s %d-bit R %d lag %d, %d blocks): %ld steps, %ld adds %ld forks %ld imports %ld frees, "
               "%ld appends (%lld tokens), %ld attentions, %ld truncations, %ld read-back checks, %ld refused as "
               "predicted (replay %ld:0x%016llx)\n",
               epochs, oscar_method_name(s.cfg.method), s.cfg.bits, s.cfg.residual, s.cfg.rollback_tokens,
               s.cfg.block_count, s.step, s.adds, s.forks, s.imports, s.frees, s.appends, (long long)s.tokens_appended,
               s.attentions, s.truncates, s.readbacks, s.refused, epochs, (unsigned long long)epoch_state);
        fflush(stdout);
        oscar_cache_destroy(s.c);
        for (int i = 0; i < s.live; i++) seq_model_free(&s.seq[i]);
        const tl_rng keep = s.rng;
        memset(&s, 0, sizeof s);
        s.rng = keep;
        epochs++;
    }
    printf("   soak: %ld epochs, %ld steps, %ld sequences, %lld tokens appended in %.0f s\n", epochs - first_epoch,
           total_steps, total_seqs, (long long)total_tokens, now() - t0);
    /* a soak that did (almost) nothing must not pass; the step count itself
     * depends on the machine's load */
    CHECKF(total_steps >= 50 && ops_total[0] > 0 && ops_total[1] > 0 && ops_total[2] > 0,
           "the soak ran only %ld steps (%ld appends, %ld attentions, %ld forks/imports/truncations)", total_steps,
           ops_total[0], ops_total[1], ops_total[2]);
}

int main(int argc, char **argv) {
    g_seconds = SOAK_DEFAULT_SECONDS;
    const char *env = getenv("OSCAR_SOAK_SECONDS");
    g_trace = getenv("OSCAR_SOAK_TRACE") != NULL;
    if (argc > 1) g_seconds = atof(argv[1]);
    else if (env && *env) g_seconds = atof(env);
    printf("   soaking for %.0f s (OSCAR_SOAK_SECONDS or argv[1] to change)\n", g_seconds);
    TL_RUN(test_soak);
    return tl_finish();
}
