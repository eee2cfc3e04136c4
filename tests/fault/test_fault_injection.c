/*
 * test_fault_injection.c - allocation failures, SQLite style.
 *
 * Linked against the library built with -DOSCAR_FAULT_INJECTION (a static
 * copy, tests/CMakeLists.txt), whose every host allocation in src/core and
 * src/cpu goes through a counter that can fail the Nth one (src/core/alloc.h).
 *
 * A scripted workload (create, seq add, append, multi-sequence append,
 * fork, attention, read, export, import, truncate, free, the batch API,
 * key sums, slot copy, the Hadamard folds, destroy) is run once cleanly to
 * record every output. Then each step is run again with allocation N failing,
 * for N = 0, 1, 2, ... until the step no longer reaches N allocations, once
 * with only allocation N failing and once with every allocation from N on
 * failing. Every failed call must
 *  - return OSCAR_E_OUT_OF_MEMORY with a message naming memory,
 *  - leave the cache exactly as it was: memory statistics, every live
 *    sequence's lengths, block table and export stream compared byte for
 *    byte with a snapshot taken just before,
 *  - leak nothing (the ASan build's leak check runs at exit).
 * The step that finally succeeds must give exactly the clean run's outputs
 * (sequence ids, attention bytes, read values, streams), so a failure that
 * left hidden damage shows up later in the walk.
 */
#include "alloc.h"
#include "testlib.h"

#include <stdlib.h>
#include <string.h>

#ifndef OSCAR_FAULT_INJECTION
#error "test_fault_injection needs the library built with -DOSCAR_FAULT_INJECTION"
#endif

enum { LAYERS = 2, D = 64, HKV = 2, HQ = 4, R = 16, LAG = 4, MAXSEQ = 6, ROW = HKV * D };
enum { MAX_TOK = 96, QLEN = 3 };

typedef struct world {
    oscar_cache *c;      /* the sequence-API cache                        */
    oscar_cache *batch;  /* a caller_metadata cache for the batch API      */
    int32_t id[MAXSEQ];  /* named sequences: a, b, fork, import            */
    unsigned char *stream;
    size_t stream_size;
    float *attn_out, *read_k, *read_v, *sums, *fold_w;
} world;

/* Inputs: deterministic, shared by every run. */
static float k_in[MAX_TOK * ROW], v_in[MAX_TOK * ROW], q_in[3 * QLEN * HQ * D];

static oscar_config cache_config(void) {
    oscar_config cfg = tl_small_config(OSCAR_METHOD_OSCAR, 2, D, HKV, HQ);
    cfg.num_layers = LAYERS;
    cfg.residual = R;
    cfg.k_group = 16;
    cfg.v_group = 32;
    cfg.rollback_tokens = LAG;
    cfg.block_count = 40;
    cfg.max_seqs = MAXSEQ;
    cfg.num_threads = 2; /* the parallel paths' per-thread scratch too */
    return cfg;
}

static oscar_status append_tokens(world *w, int layer, int n_seqs, const int *which, int32_t n) {
    int32_t ids[4], counts[4];
    for (int i = 0; i < n_seqs; i++) ids[i] = w->id[which[i]], counts[i] = n;
    return oscar_append(w->c, layer, n_seqs, ids, counts, k_in, v_in, OSCAR_DTYPE_F32, NULL);
}

static oscar_batch batch_of(const int32_t *lens, const int32_t *slots, const int32_t *tables, int32_t n) {
    oscar_batch b;
    memset(&b, 0, sizeof b);
    b.num_seqs = 2;
    b.tokens_per_seq = n;
    b.max_seq_len = 64;
    b.block_table_stride = 4;
    b.seq_lens = lens;
    b.window_slots = slots;
    b.block_tables = tables;
    return b;
}

static const int32_t batch_slots[2] = {0, 1}, batch_tables[8] = {0, 1, 2, 3, 4, 5, 6, 7};

/* The workload, one public call per step. Returns its status; what the
 * step made is left in w. */
static const char *const step_names[] = {
    "cache_create",      "cache_create(batch)", "seq_add a",     "seq_add b",        "append a L0 40",
    "append a L1 40",    "append a+b L0 19",    "append a+b L1 19", "seq_fork a",   "append fork L0 7",
    "append fork L1 7",  "attention L0 a,b,fork", "attention L1 q_len 1", "seq_read a L1", "seq_export a",
    "seq_import",        "seq_truncate import", "seq_free b",   "batch_append 20",  "batch_append 1",
    "batch_attention",   "key_sumsq",          "slot_copy",     "fold_hadamard_wv", "fold_hadamard_wo",
    "seq_add c",         "append c L0 33",     "seq_free a",    "cache_destroy",
};
enum { N_STEPS = (int)(sizeof step_names / sizeof step_names[0]) };

static int32_t batch_lens_after_first[2] = {20, 20}, batch_lens_after_second[2] = {21, 21};

static oscar_status run_step(world *w, int step, char *errbuf, size_t errbuf_size) {
    const int a = 0, b = 1, f = 2, im = 3, cc = 4;
    switch (step) {
    case 0: {
        oscar_config cfg = cache_config();
        return oscar_cache_create(&cfg, &w->c, errbuf, errbuf_size);
    }
    case 1: {
        oscar_config cfg = cache_config();
        cfg.caller_metadata = 1;
        cfg.num_layers = 1;
        return oscar_cache_create(&cfg, &w->batch, errbuf, errbuf_size);
    }
    case 2: return oscar_seq_add(w->c, &w->id[a]);
    case 3: return oscar_seq_add(w->c, &w->id[b]);
    case 4: return append_tokens(w, 0, 1, (int[]){a}, 40);
    case 5: return append_tokens(w, 1, 1, (int[]){a}, 40);
    case 6: return append_tokens(w, 0, 2, (int[]){a, b}, 19);
    case 7: return append_tokens(w, 1, 2, (int[]){a, b}, 19);
    case 8: return oscar_seq_fork(w->c, w->id[a], &w->id[f]);
    case 9: return append_tokens(w, 0, 1, (int[]){f}, 7);
    case 10: return append_tokens(w, 1, 1, (int[]){f}, 7);
    case 11: {
        int32_t ids[3] = {w->id[a], w->id[b], w->id[f]};
        tl_poison(w->attn_out, 3 * QLEN * HQ * D);
        return oscar_attention(w->c, 0, 3, ids, QLEN, q_in, OSCAR_DTYPE_F32, w->attn_out, OSCAR_DTYPE_F32, 0.0f,
                               NULL);
    }
    case 12: {
        int32_t ids[2] = {w->id[f], w->id[a]};
        tl_poison(w->attn_out, 3 * QLEN * HQ * D);
        return oscar_attention(w->c, 1, 2, ids, 1, q_in, OSCAR_DTYPE_F32, w->attn_out, OSCAR_DTYPE_F32, 0.0f, NULL);
    }
    case 13:
        tl_poison(w->read_k, MAX_TOK * ROW);
        tl_poison(w->read_v, MAX_TOK * ROW);
        return oscar_seq_read(w->c, w->id[a], 1, 3, 55, w->read_k, w->read_v);
    case 14: {
        size_t got = 0;
        oscar_status st = oscar_seq_export(w->c, w->id[a], NULL, 0, &w->stream_size);
        if (st != OSCAR_OK) return st;
        free(w->stream);
        w->stream = malloc(w->stream_size);
        memset(w->stream, 0x5a, w->stream_size);
        st = oscar_seq_export(w->c, w->id[a], w->stream, w->stream_size, &got);
        return st;
    }
    case 15: return oscar_seq_import(w->c, w->stream, w->stream_size, &w->id[im]);
    case 16: return oscar_seq_truncate(w->c, w->id[im], 57);
    case 17: return oscar_seq_free(w->c, w->id[b]);
    case 18: {
        oscar_batch bt = batch_of(batch_lens_after_first, batch_slots, batch_tables, 20);
        return oscar_batch_append(w->batch, 0, &bt, k_in, v_in, OSCAR_DTYPE_F32, NULL);
    }
    case 19: {
        oscar_batch bt = batch_of(batch_lens_after_second, batch_slots, batch_tables, 1);
        return oscar_batch_append(w->batch, 0, &bt, k_in, v_in, OSCAR_DTYPE_F32, NULL);
    }
    case 20: {
        oscar_batch bt = batch_of(batch_lens_after_second, batch_slots, batch_tables, 1);
        tl_poison(w->attn_out, 3 * QLEN * HQ * D);
        return oscar_batch_attention(w->batch, 0, &bt, q_in, OSCAR_DTYPE_F32, w->attn_out, OSCAR_DTYPE_F32, 0.0f,
                                     NULL);
    }
    case 21:
        tl_poison(w->sums, 8 * HKV);
        return oscar_key_sumsq(w->batch, 8, k_in, OSCAR_DTYPE_F32, w->sums, NULL);
    case 22: return oscar_slot_copy(w->batch, 0, 2, 21, NULL);
    case 23:
        for (int i = 0; i < HKV * D * 5; i++) w->fold_w[i] = (float)(i % 7) - 3.0f;
        return oscar_fold_hadamard_wv(w->fold_w, HKV, D, 5);
    case 24:
        for (int i = 0; i < HQ * D * 5; i++) w->fold_w[i] = (float)(i % 5) - 2.0f;
        return oscar_fold_hadamard_wo(w->fold_w, 5, HQ, D);
    case 25: return oscar_seq_add(w->c, &w->id[cc]);
    case 26: return append_tokens(w, 0, 1, (int[]){cc}, 33);
    case 27: return oscar_seq_free(w->c, w->id[a]);
    case 28:
        oscar_cache_destroy(w->c);
        oscar_cache_destroy(w->batch);
        w->c = w->batch = NULL;
        return OSCAR_OK;
    }
    return OSCAR_E_INVALID_ARGUMENT;
}

/* ---- snapshots: everything a caller can observe of a cache ------------- */

typedef struct snapshot {
    oscar_memory_stats mem;
    int n;
    int32_t id[MAXSEQ];
    oscar_seq_info info[MAXSEQ][LAYERS];
    int32_t table[MAXSEQ][64], table_count[MAXSEQ];
    unsigned char *stream[MAXSEQ];
    size_t stream_size[MAXSEQ];
    char last_error[512];
} snapshot;

static void snap_take(oscar_cache *c, snapshot *s) {
    memset(s, 0, sizeof *s);
    if (!c) return;
    oscar_memory(c, &s->mem);
    oscar_config cfg;
    oscar_cache_config(c, &cfg);
    if (cfg.caller_metadata) return; /* its state is the caller's arrays and the bytes, seen through outputs */
    /* Ids are never reused, and this workload makes fewer than 16. */
    for (int32_t id = 0; id < 16 && s->n < MAXSEQ; id++) {
        oscar_seq_info info;
        if (oscar_seq_info_get(c, id, 0, &info) != OSCAR_OK) continue;
        int k = s->n++;
        s->id[k] = id;
        for (int l = 0; l < LAYERS; l++) oscar_seq_info_get(c, id, l, &s->info[k][l]);
        oscar_seq_block_table(c, id, s->table[k], 64, &s->table_count[k]);
        s->stream[k] = tl_export(c, id, &s->stream_size[k]);
    }
}

static void snap_free(snapshot *s) {
    for (int k = 0; k < s->n; k++) free(s->stream[k]);
}

static int snap_equal(const snapshot *x, const snapshot *y) {
    if (memcmp(&x->mem, &y->mem, sizeof x->mem) != 0 || x->n != y->n) return 0;
    for (int k = 0; k < x->n; k++) {
        if (x->id[k] != y->id[k] || x->table_count[k] != y->table_count[k] ||
            memcmp(x->info[k], y->info[k], sizeof x->info[k]) != 0 ||
            memcmp(x->table[k], y->table[k], sizeof(int32_t) * (size_t)x->table_count[k]) != 0 ||
            x->stream_size[k] != y->stream_size[k] || !x->stream[k] || !y->stream[k] ||
            memcmp(x->stream[k], y->stream[k], x->stream_size[k]) != 0)
            return 0;
    }
    return 1;
}

/* ---- what the clean run made ---------------------------------------------- */

typedef struct outputs {
    int32_t id[N_STEPS][MAXSEQ]; /* the sequence ids after each step */
    float attn[N_STEPS][3 * QLEN * HQ * D];
    float read_k[MAX_TOK * ROW], read_v[MAX_TOK * ROW], sums[8 * HKV], fold[2][HQ * D * 5];
    unsigned char *stream;
    size_t stream_size;
    snapshot final_state;     /* before destroy */
    int64_t allocations[N_STEPS];
} outputs;

static void world_init(world *w) {
    memset(w, 0, sizeof *w);
    for (int i = 0; i < MAXSEQ; i++) w->id[i] = -1;
    w->attn_out = malloc(sizeof(float) * 3 * QLEN * HQ * D);
    w->read_k = malloc(sizeof(float) * MAX_TOK * ROW);
    w->read_v = malloc(sizeof(float) * MAX_TOK * ROW);
    w->sums = malloc(sizeof(float) * 8 * HKV);
    w->fold_w = calloc(HQ * D * 5, sizeof(float));
}

static void world_free(world *w) {
    oscar_cache_destroy(w->c);
    oscar_cache_destroy(w->batch);
    free(w->stream), free(w->attn_out), free(w->read_k), free(w->read_v), free(w->sums), free(w->fold_w);
}

/* Records (clean run) or compares (faulty run) what a successful step made. */
static void step_outputs(world *w, int step, outputs *o, int record) {
#define SAME_OR_RECORD(dst, src, bytes)                                                                  \
    do {                                                                                                 \
        if (record)                                                                                      \
            memcpy((dst), (src), (bytes));                                                               \
        else                                                                                             \
            CHECKF(memcmp((dst), (src), (bytes)) == 0, "step %d (%s): output differs from the clean run", \
                   step, step_names[step]);                                                              \
    } while (0)
    switch (step) {
    case 11:
    case 12:
    case 20: SAME_OR_RECORD(o->attn[step], w->attn_out, sizeof o->attn[step]); break;
    case 13:
        SAME_OR_RECORD(o->read_k, w->read_k, sizeof o->read_k);
        SAME_OR_RECORD(o->read_v, w->read_v, sizeof o->read_v);
        break;
    case 14:
        if (record) {
            o->stream = malloc(w->stream_size);
            memcpy(o->stream, w->stream, w->stream_size);
            o->stream_size = w->stream_size;
        } else {
            CHECKF(w->stream_size == o->stream_size && memcmp(w->stream, o->stream, o->stream_size) == 0,
                   "the export stream differs from the clean run's");
        }
        break;
    case 21: SAME_OR_RECORD(o->sums, w->sums, sizeof o->sums); break;
    case 23:
    case 24: SAME_OR_RECORD(o->fold[step - 23], w->fold_w, sizeof o->fold[0]); break;
    default: break;
    }
    SAME_OR_RECORD(o->id[step], w->id, sizeof o->id[step]);
#undef SAME_OR_RECORD
}

static int is_create(int step) { return step <= 1; }

static void clean_run(outputs *o) {
    world w;
    world_init(&w);
    for (int step = 0; step < N_STEPS; step++) {
        char err[256] = "";
        if (step == N_STEPS - 1) snap_take(w.c, &o->final_state);
        oscar_fault_reset();
        oscar_status st = run_step(&w, step, err, sizeof err);
        o->allocations[step] = oscar_fault_allocations();
        CHECKF(st == OSCAR_OK, "clean run, step %d (%s): %s (%s%s)", step, step_names[step], oscar_status_name(st),
               err, w.c ? oscar_last_error(w.c) : "");
        step_outputs(&w, step, o, 1);
    }
    world_free(&w);
}

/* Runs the workload with allocation failures; returns how many failures were
 * injected. A step's retries can need fewer allocations than the clean run's
 * (a block table grown by a failed append stays grown, invisibly), but every
 * step that allocates must have seen failures. */
static long faulty_run(const outputs *clean, int persistent) {
    world w;
    world_init(&w);
    long injected = 0;
    for (int step = 0; step < N_STEPS; step++) {
        for (int64_t n = 0;; n++) {
            snapshot before, after;
            oscar_cache *subject = step == 1 || (step >= 18 && step <= 22) ? w.batch : w.c;
            if (step == N_STEPS - 1 && n == 0) {
                snapshot final_state;
                snap_take(w.c, &final_state);
                CHECKF(snap_equal(&final_state, &clean->final_state),
                       "after the walk (persistent = %d) the cache differs from the clean run's", persistent);
                snap_free(&final_state);
            }
            snap_take(subject, &before);
            /* a failed call must write its own message: leave one it has to replace */
            if (subject) oscar_seq_free(subject, -12345);
            char err[256] = "";
            oscar_fault_reset();
            oscar_fault_fail_at(n, persistent);
            oscar_status st = run_step(&w, step, err, sizeof err);
            const int64_t failed = oscar_fault_failures();
            oscar_fault_reset();
            if (failed == 0) {
                CHECKF(n > 0 || clean->allocations[step] == 0, "step %d (%s) allocated nothing through the hook",
                       step, step_names[step]);
                CHECKF(st == OSCAR_OK, "step %d (%s) without a failure: %s", step, step_names[step],
                       oscar_status_name(st));
                step_outputs(&w, step, (outputs *)clean, 0);
                snap_free(&before);
                break;
            }
            injected++;
            if (is_create(step)) {
                oscar_cache *made = step == 0 ? w.c : w.batch;
                CHECKF(st == OSCAR_E_OUT_OF_MEMORY && made == NULL && strstr(err, "memory") != NULL,
                       "step %d (%s), allocation %lld failing: %s, handle %p, message \"%s\"", step,
                       step_names[step], (long long)n, oscar_status_name(st), (void *)made, err);
                snap_free(&before);
                continue;
            }
            const char *msg = subject ? oscar_last_error(subject) : "";
            const int no_handle = step == 23 || step == 24; /* the folds report by status alone */
            CHECKF(st == OSCAR_E_OUT_OF_MEMORY && (no_handle || strstr(msg, "memory") != NULL),
                   "step %d (%s), allocation %lld of %lld failing%s: %s, message \"%s\"", step, step_names[step],
                   (long long)n, (long long)clean->allocations[step], persistent ? " (and every later one)" : "",
                   oscar_status_name(st), msg);
            snap_take(subject, &after);
            CHECKF(snap_equal(&before, &after), "step %d (%s), allocation %lld failing: the cache changed", step,
                   step_names[step], (long long)n);
            if (step == 23 || step == 24) /* the weights must be untouched too */
                for (int i = 0; i < 5 * D; i++)
                    if (!CHECKF(w.fold_w[i] == (step == 23 ? (float)(i % 7) - 3.0f : (float)(i % 5) - 2.0f),
                                "fold: weights written before the failure"))
                        break;
            snap_free(&before);
            snap_free(&after);
            if (!CHECKF(n < 100000, "step %d never succeeds", step)) break;
        }
    }
    world_free(&w);
    return injected;
}

static void test_every_allocation_fails_once(void) {
    static outputs clean;
    memset(&clean, 0, sizeof clean);
    clean_run(&clean);
    int64_t total = 0;
    for (int s = 0; s < N_STEPS; s++) total += clean.allocations[s];
    printf("   the workload makes %lld allocations in %d steps\n", (long long)total, N_STEPS);
    /* the hook must see the library's allocations, or this test tests nothing */
    CHECKF(total > 50, "only %lld allocations were counted", (long long)total);
    for (int s = 0; s < N_STEPS; s++)
        if (s == 2 || s == 4 || s == 8 || s == 11 || s == 14 || s == 15 || s == 18 || s == 20)
            CHECKF(clean.allocations[s] > 0, "step %s made no allocation through the hook", step_names[s]);
    long once = faulty_run(&clean, 0);
    long persistent = faulty_run(&clean, 1);
    printf("   injected %ld single failures and %ld persistent failures\n", once, persistent);
    CHECKF(once <= total && once > total * 9 / 10 && persistent == once, "%ld, %ld failures injected for %lld allocations", once, persistent, (long long)total);
    free(clean.stream);
    snap_free(&clean.final_state);
}

int main(void) {
    tl_rng r = tl_rng_for("fault_injection");
    tl_gen_kv(&r, TL_FLAVOR_OUTLIERS, k_in, v_in, MAX_TOK, HKV, D, OSCAR_DTYPE_F32);
    tl_gen_q(&r, q_in, 3 * QLEN, HQ, D, tl_key_rms_norm(k_in, MAX_TOK, HKV, D), 2.0, OSCAR_DTYPE_F32);
    TL_RUN(test_every_allocation_fails_once);
    return tl_finish();
}
