/* The CUDA backend's ops table: device memory (pool, windows, workspace),
 * the append and attention entry points of both APIs, and the synchronous
 * host <-> device copies of export/import.
 *
 * Asynchrony: append and attention (both APIs), slot_copy and poll never
 * block the host, never wait on an event, never allocate and never copy
 * through pageable host memory. The sequence API's per-call metadata (lengths,
 * slots, new block ids) reaches the device as kernel arguments: small
 * upload kernels write it into the workspace, in stream order, so nothing
 * is staged in host memory that a later call could overwrite too early.
 * Calls on one handle are ordered by the caller (one stream, or its events).
 * Every entry point sets the cache's device and restores the caller's. */
#include "common.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

oscar_status ck(oscar_cache *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return OSCAR_OK;
    return oscar_set_error(c, e == cudaErrorMemoryAllocation ? OSCAR_E_OUT_OF_MEMORY : OSCAR_E_BACKEND,
                           "CUDA: %s: %s", what, cudaGetErrorString(e));
}

/* Makes the cache's device current for the scope and restores the caller's. */
struct DeviceScope {
    int prev = -1;
    bool changed = false;
    cudaError_t enter(int device) {
        cudaError_t e = cudaGetDevice(&prev);
        if (e != cudaSuccess) return e;
        if (prev != device) {
            e = cudaSetDevice(device);
            changed = e == cudaSuccess;
        }
        return e;
    }
    ~DeviceScope() {
        if (changed) cudaSetDevice(prev);
    }
};

#define ENTER(c, S)                                                                                    \
    DeviceScope scope_;                                                                                \
    OSCAR_CK(c, scope_.enter((S)->device))

/* ---- workspace layout ---------------------------------------------------- */

struct WorkspaceLayout {
    size_t partials, tables, failed, packed, held, meta, tasks, wtasks, ss_new, total;
    size_t meta_ints, max_tasks, max_wtasks, ss_cap;
};

WorkspaceLayout workspace_layout(const oscar_config *cfg, const oscar_layout *L, int sm_count) {
    WorkspaceLayout W;
    size_t o = 0;
    W.partials = o;
    o += align_up(oscar_cuda_partials_bytes(L, sm_count));
    W.tables = o;
    /* the sequence API's block-table mirror, one row per slot */
    if (!cfg->caller_metadata) o += align_up((size_t)cfg->max_seqs * (size_t)cfg->block_count * sizeof(int32_t));
    W.failed = o;
    o += align_up((size_t)cfg->max_seqs * sizeof(int32_t));
    W.packed = o;
    o += align_up((size_t)cfg->num_layers * (size_t)cfg->max_seqs * sizeof(int32_t));
    W.held = o;
    o += align_up((size_t)cfg->num_layers * (size_t)cfg->max_seqs * sizeof(int32_t));
    W.meta = o;
    W.meta_ints = 5 * (size_t)cfg->max_seqs + 8;
    o += 2 * align_up(W.meta_ints * sizeof(int32_t)); /* append, then attention */
    oscar_cuda_task_capacity(cfg, &W.max_tasks, &W.max_wtasks);
    W.tasks = o;
    o += align_up(W.max_tasks * sizeof(PackTask));
    W.wtasks = o;
    o += align_up(W.max_wtasks * sizeof(WinTask));
    /* new rows of one append: the sequence API can fill the pool and every
     * window and sink row in one call; the batch API appends up to
     * OSCAR_MAX_Q_LEN rows per sequence */
    W.ss_new = o;
    const size_t a = (size_t)cfg->block_count * (size_t)cfg->residual +
                     (size_t)cfg->max_seqs * (size_t)(L->window_rows + L->sinks);
    const size_t b = (size_t)cfg->max_seqs * OSCAR_MAX_Q_LEN;
    W.ss_cap = a > b ? a : b;
    o += align_up(W.ss_cap * sizeof(float));
    W.total = o;
    return W;
}

oscar_status device_sm_count(oscar_cache *c, int device, int *sm, size_t *optin, char *eb, size_t en) {
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) {
        if (c) return ck(c, e, "cudaGetDeviceProperties");
        if (eb && en) snprintf(eb, en, "CUDA: cudaGetDeviceProperties(%d): %s", device, cudaGetErrorString(e));
        return OSCAR_E_BACKEND;
    }
    if (prop.major != 9) {
        if (c)
            return oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                                   "CUDA backend is built for compute capability 9.0 (sm_90a), device %d is %d.%d",
                                   device, prop.major, prop.minor);
        if (eb && en)
            snprintf(eb, en, "CUDA backend is built for compute capability 9.0 (sm_90a), device %d is %d.%d", device,
                     prop.major, prop.minor);
        return OSCAR_E_UNSUPPORTED;
    }
    *sm = prop.multiProcessorCount;
    if (optin) *optin = prop.sharedMemPerBlockOptin;
    return OSCAR_OK;
}

/* ---- upload of the sequence API's per-call metadata ---------------------- */

constexpr int kUploadInts = 1000; /* 4 KB of kernel arguments */

struct UploadChunk {
    int32_t *dst;
    int n;
    int32_t v[kUploadInts];
};

struct ScatterChunk {
    int32_t *base;
    int n;
    int32_t idx[kUploadInts / 2];
    int32_t val[kUploadInts / 2];
};

__global__ void upload_kernel(const __grid_constant__ UploadChunk U) {
    for (int i = threadIdx.x; i < U.n; i += blockDim.x) U.dst[i] = U.v[i];
}

__global__ void scatter_kernel(const __grid_constant__ ScatterChunk U) {
    for (int i = threadIdx.x; i < U.n; i += blockDim.x) U.base[U.idx[i]] = U.val[i];
}

/* Writes n ints to device memory through kernel arguments, in chunks. */
struct Uploader {
    oscar_cache *c;
    cudaStream_t st;
    UploadChunk u;
    ScatterChunk s;
    oscar_status rc = OSCAR_OK;

    Uploader(oscar_cache *c_, cudaStream_t st_) : c(c_), st(st_) {
        u.n = 0;
        u.dst = nullptr;
        s.n = 0;
        s.base = nullptr;
    }

    void begin(int32_t *dst) {
        flush();
        u.dst = dst;
        u.n = 0;
    }
    void put(int32_t x) {
        if (u.n == kUploadInts) {
            int32_t *d = u.dst + u.n;
            flush();
            u.dst = d;
        }
        u.v[u.n++] = x;
    }
    void scatter(int32_t *base, int32_t idx, int32_t val) {
        if (s.n > 0 && (s.base != base || s.n == kUploadInts / 2)) flush_scatter();
        s.base = base;
        s.idx[s.n] = idx;
        s.val[s.n++] = val;
    }
    void flush() {
        if (u.n > 0 && rc == OSCAR_OK) {
            upload_kernel<<<1, 256, 0, st>>>(u);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess) rc = ck(c, e, "upload_kernel launch");
        }
        u.n = 0;
    }
    void flush_scatter() {
        if (s.n > 0 && rc == OSCAR_OK) {
            scatter_kernel<<<1, 256, 0, st>>>(s);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess) rc = ck(c, e, "scatter_kernel launch");
        }
        s.n = 0;
    }
    oscar_status finish() {
        flush();
        flush_scatter();
        return rc;
    }
};

/* ---- init / destroy -------------------------------------------------------- */

cudaError_t region_alloc(CudaState *S, Region *r, void *given, size_t bytes) {
    r->bytes = bytes;
    if (given) {
        r->ptr = (uint8_t *)given;
        r->owned = 0;
        return cudaSuccess;
    }
    r->owned = 1;
    if (S->allocator) {
        r->ptr = (uint8_t *)S->allocator->alloc(S->allocator->user, bytes, kAlign);
        return r->ptr ? cudaSuccess : cudaErrorMemoryAllocation;
    }
    return cudaMalloc((void **)&r->ptr, bytes);
}

void region_free(CudaState *S, Region *r) {
    if (!r->ptr || !r->owned) return;
    if (S->allocator)
        S->allocator->free(S->allocator->user, r->ptr, r->bytes);
    else
        cudaFree(r->ptr);
    r->ptr = nullptr;
}

void free_state(CudaState *S) {
    if (!S) return;
    region_free(S, &S->pool_r);
    region_free(S, &S->windows_r);
    region_free(S, &S->ws_r);
    if (S->report) cudaFreeHost(S->report);
    free(S->h_scratch);
    free(S);
}

oscar_status cuda_init(oscar_cache *c, const oscar_memory_source *mem) {
    const oscar_layout *L = &c->lay;
    const oscar_config *cfg = &c->cfg;
    CudaState *S = (CudaState *)calloc(1, sizeof(CudaState));
    if (!S) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "CUDA backend: out of host memory");
    c->backend_state = S;
    S->device = cfg->device;
    S->allocator = mem ? mem->allocator : nullptr;
    S->dlay = oscar_cuda_device_layout(L);
    oscar_status st;
    DeviceScope scope;
#define INIT_CK(call)                                                                                  \
    do {                                                                                               \
        st = ck(c, (call), #call);                                                                     \
        if (st != OSCAR_OK) goto fail;                                                                 \
    } while (0)
    {
        INIT_CK(scope.enter(S->device));
        st = device_sm_count(c, S->device, &S->sm_count, &S->smem_optin, nullptr, 0);
        if (st != OSCAR_OK) goto fail;
        const WorkspaceLayout W = workspace_layout(cfg, L, S->sm_count);
        const size_t pool_bytes = L->layer_block_bytes * (size_t)cfg->num_layers * (size_t)cfg->block_count;
        const size_t windows_bytes = L->windows_bytes;
        INIT_CK(region_alloc(S, &S->pool_r, mem ? mem->pool : nullptr, pool_bytes));
        INIT_CK(region_alloc(S, &S->windows_r, mem ? mem->windows : nullptr, windows_bytes));
        INIT_CK(region_alloc(S, &S->ws_r, mem ? mem->workspace : nullptr, W.total));
        S->pool = S->pool_r.ptr;
        S->windows = S->windows_r.ptr;
        INIT_CK(cudaMemset(S->pool, 0, pool_bytes));
        INIT_CK(cudaMemset(S->windows, 0, windows_bytes));
        INIT_CK(cudaMemset(S->ws_r.ptr, 0, W.total));
        S->ws = (float *)(S->ws_r.ptr + W.partials);
        S->ws_bytes = W.tables - W.partials;
        S->tables = cfg->caller_metadata ? nullptr : (int32_t *)(S->ws_r.ptr + W.tables);
        S->failed = (int32_t *)(S->ws_r.ptr + W.failed);
        S->ss_new = (float *)(S->ws_r.ptr + W.ss_new);
        S->ss_cap = W.ss_cap;
        S->win_ss = (float *)(S->windows + L->window_ss_offset);
        S->packed = (int32_t *)(S->ws_r.ptr + W.packed);
        S->held = (int32_t *)(S->ws_r.ptr + W.held);
        S->meta = (int32_t *)(S->ws_r.ptr + W.meta);
        S->meta_att = (int32_t *)(S->ws_r.ptr + W.meta + align_up(W.meta_ints * sizeof(int32_t)));
        S->meta_ints = W.meta_ints;
        S->h_scratch = (int32_t *)malloc(3 * W.meta_ints * sizeof(int32_t));
        if (!S->h_scratch) {
            st = oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "CUDA backend: out of host memory");
            goto fail;
        }
        S->h_app = S->h_scratch + W.meta_ints;
        S->h_att = S->h_app + W.meta_ints;
        S->h_app_n = S->h_att_n = -1;
        S->tasks = (PackTask *)(S->ws_r.ptr + W.tasks);
        S->wtasks = (WinTask *)(S->ws_r.ptr + W.wtasks);
        S->max_tasks = W.max_tasks;
        S->max_wtasks = W.max_wtasks;
        S->report_bytes = sizeof(OscarReport) + (size_t)cfg->max_seqs;
        INIT_CK(cudaHostAlloc((void **)&S->report, S->report_bytes, cudaHostAllocMapped));
        memset((void *)S->report, 0, S->report_bytes);
        OscarReport *dev_report = nullptr;
        INIT_CK(cudaHostGetDevicePointer((void **)&dev_report, S->report, 0));
        if (dev_report != S->report) {
            st = oscar_set_error(c, OSCAR_E_UNSUPPORTED, "CUDA backend needs unified addressing for mapped memory");
            goto fail;
        }
        st = oscar_cuda_kernels_init(c);
        if (st != OSCAR_OK) goto fail;
        INIT_CK(cudaDeviceSynchronize());
        return OSCAR_OK;
    }
fail:
    free_state(S);
    c->backend_state = NULL;
    return st;
#undef INIT_CK
}

void cuda_destroy(oscar_cache *c) {
    CudaState *S = cuda_state(c);
    if (!S) return;
    DeviceScope scope;
    if (scope.enter(S->device) == cudaSuccess) cudaDeviceSynchronize();
    free_state(S);
    c->backend_state = NULL;
}

/* ---- reports ------------------------------------------------------------- */

oscar_status cuda_poll(oscar_cache *c) {
    CudaState *S = cuda_state(c);
    OscarReport *R = S->report;
    if (R->nonfinite) {
        R->nonfinite = 0;
        char list[256];
        size_t o = 0;
        int n = 0;
        list[0] = 0;
        for (int s = 0; s < c->cfg.max_seqs; s++) {
            if (!R->failed_slot[s]) continue;
            R->failed_slot[s] = 0;
            const int id = c->cfg.caller_metadata ? s : c->seqs[s].id;
            if (o + 16 < sizeof list) o += (size_t)snprintf(list + o, sizeof list - o, "%s%d", n ? ", " : "", id);
            n++;
        }
        if (n > 0)
            return oscar_set_error(c, OSCAR_E_NONFINITE,
                                   "an earlier append gave NaN or Inf in K or V to %s %s; %s failed: nothing more is "
                                   "written to %s and attention over %s writes NaN until %s",
                                   c->cfg.caller_metadata ? "window slot(s)" : "sequence(s)", list,
                                   n > 1 ? "they are" : "it is", n > 1 ? "them" : "it", n > 1 ? "them" : "it",
                                   c->cfg.caller_metadata ? "the slot restarts at length 0" : "it is freed");
    }
    if (R->bad_meta) {
        R->bad_meta = 0;
        return oscar_set_error(c, OSCAR_E_INVALID_ARGUMENT,
                               "an earlier batch call had metadata out of range for batch entry %d (window slot, "
                               "seq_len, or a block id outside 0..%d): that sequence was skipped and its attention "
                               "rows are NaN",
                               (int)R->bad_first, c->cfg.block_count - 1);
    }
    return OSCAR_OK;
}

oscar_status cuda_sync(oscar_cache *c, void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    OSCAR_CK(c, cudaStreamSynchronize((cudaStream_t)stream));
    return cuda_poll(c);
}

/* The layer's packed-block state and the window geometry. */
void meta_layer(oscar_cache *c, int layer, SeqMeta *m) {
    m->packed = cuda_state(c)->packed + (size_t)layer * c->cfg.max_seqs;
    m->held = cuda_state(c)->held + (size_t)layer * c->cfg.max_seqs;
    m->window_rows = c->lay.window_rows;
    m->lag = c->lay.lag;
    m->sinks = c->lay.sinks;
}

SeqMeta library_meta(oscar_cache *c, int layer, const int32_t *lens, const int32_t *slots) {
    CudaState *S = cuda_state(c);
    SeqMeta m;
    meta_layer(c, layer, &m);
    m.lens = lens;
    m.slots = slots;
    m.tables = S->tables;
    m.table_stride = c->cfg.block_count;
    m.table_by_slot = 1;
    m.block_count = c->cfg.block_count;
    m.max_seqs = c->cfg.max_seqs;
    return m;
}

/* ---- the sequence API ------------------------------------------------------ */

/* Puts n ints into a metadata region unless it already holds them. */
oscar_status upload_meta(oscar_cache *c, cudaStream_t st, int32_t *dst, const int32_t *src, long long n,
                         int32_t *mirror, long long *mirror_n) {
    if (*mirror_n == n && memcmp(mirror, src, sizeof(int32_t) * (size_t)n) == 0) return OSCAR_OK;
    *mirror_n = -1;
    Uploader up(c, st);
    up.begin(dst);
    for (long long i = 0; i < n; i++) up.put(src[i]);
    oscar_status rc = up.finish();
    if (rc != OSCAR_OK) return rc;
    memcpy(mirror, src, sizeof(int32_t) * (size_t)n);
    *mirror_n = n;
    return OSCAR_OK;
}

oscar_status cuda_append(oscar_cache *c, int layer, const oscar_append_job *jobs, int n_jobs, int64_t total_rows,
                         const void *k, const void *v, oscar_dtype dtype, const float *tp, int tp_heads,
                         void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    cudaStream_t st = (cudaStream_t)stream;
    /* metadata: lens, slots, n_new, row0 [n], task0 [n + 1]; lens, n_new and
     * row0 count the sink tokens too (the device splits them off again) */
    int32_t *d_lens = S->meta, *d_slots = d_lens + n_jobs, *d_new = d_slots + n_jobs, *d_row0 = d_new + n_jobs,
            *d_task0 = d_row0 + n_jobs;
    int32_t *h = S->h_scratch;
    int max_new = 0, n_tasks = 0;
    for (int i = 0; i < n_jobs; i++) {
        const int64_t before =
            jobs[i].sink_before + (int64_t)jobs[i].first_flush_index * c->cfg.residual + jobs[i].window_before;
        const int32_t n_new = jobs[i].sink_new + jobs[i].n_new;
        h[i] = (int32_t)(before + n_new);
        h[n_jobs + i] = jobs[i].seq_slot;
        h[2 * n_jobs + i] = n_new;
        h[3 * n_jobs + i] = (int32_t)(jobs[i].input_row - jobs[i].sink_new);
        h[4 * n_jobs + i] = n_tasks;
        n_tasks += jobs[i].n_flush;
        if (n_new > max_new) max_new = n_new;
    }
    h[5 * n_jobs] = n_tasks;
    oscar_status rc = upload_meta(c, st, S->meta, h, 5LL * n_jobs + 1, S->h_app, &S->h_app_n);
    if (rc != OSCAR_OK) return rc;
    /* the new blocks go into the mirror before the task builder reads it */
    if (n_tasks > 0) {
        Uploader up(c, st);
        for (int i = 0; i < n_jobs; i++)
            for (int f = 0; f < jobs[i].n_flush; f++)
                up.scatter(S->tables, jobs[i].seq_slot * c->cfg.block_count + jobs[i].first_flush_index + f,
                           jobs[i].flush_blocks[f]);
        if ((rc = up.finish()) != OSCAR_OK) return rc;
    }
    AppendCall C;
    C.meta = library_meta(c, layer, d_lens, d_slots);
    C.n_new = d_new;
    C.row0 = d_row0;
    C.uniform_new = 0;
    C.max_new = max_new;
    C.tp = tp;
    C.tp_heads = tp_heads;
    C.n_seqs = n_jobs;
    C.total_rows = total_rows;
    return oscar_cuda_append_call_tasks(c, layer, C, d_task0, n_tasks, k, v, dtype, st);
}

oscar_status cuda_attention(oscar_cache *c, int layer, const oscar_attn_job *jobs, int n_jobs, int q_len,
                            const void *q, oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float softmax_scale,
                            void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    cudaStream_t st = (cudaStream_t)stream;
    int32_t *d_lens = S->meta_att, *d_slots = d_lens + n_jobs;
    int32_t *h = S->h_scratch;
    int64_t max_len = 0; /* sizes the grid: tokens in blocks and window */
    for (int i = 0; i < n_jobs; i++) {
        h[i] = (int32_t)jobs[i].tokens;
        h[n_jobs + i] = jobs[i].seq_slot;
        if (jobs[i].tokens - jobs[i].sink_tokens > max_len) max_len = jobs[i].tokens - jobs[i].sink_tokens;
    }
    oscar_status rc = upload_meta(c, st, S->meta_att, h, 2LL * n_jobs, S->h_att, &S->h_att_n);
    if (rc != OSCAR_OK) return rc;
    return oscar_cuda_attention_call(c, layer, library_meta(c, layer, d_lens, d_slots), n_jobs, (int)max_len, q_len, q,
                                     q_dtype, out, out_dtype, softmax_scale, st);
}

/* ---- the batch API ----------------------------------------------------------- */

SeqMeta batch_meta(oscar_cache *c, int layer, const oscar_batch *b) {
    SeqMeta m;
    meta_layer(c, layer, &m);
    m.lens = b->seq_lens;
    m.slots = b->window_slots;
    m.tables = b->block_tables;
    m.table_stride = b->block_table_stride;
    m.table_by_slot = 0;
    m.block_count = c->cfg.block_count;
    m.max_seqs = c->cfg.max_seqs;
    return m;
}

oscar_status cuda_batch_append(oscar_cache *c, int layer, const oscar_batch *b, const void *k, const void *v,
                               oscar_dtype dtype, void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    AppendCall C;
    C.meta = batch_meta(c, layer, b);
    C.n_new = nullptr;
    C.row0 = nullptr;
    C.uniform_new = b->tokens_per_seq;
    C.max_new = b->tokens_per_seq;
    C.tp = b->key_head_sumsq;
    C.tp_heads = b->key_heads_total;
    C.n_seqs = b->num_seqs;
    C.total_rows = (int64_t)b->num_seqs * b->tokens_per_seq;
    return oscar_cuda_append_call_tasks(c, layer, C, nullptr, 0, k, v, dtype, (cudaStream_t)stream);
}

oscar_status cuda_batch_attention(oscar_cache *c, int layer, const oscar_batch *b, const void *q, oscar_dtype q_dtype,
                                  void *out, oscar_dtype out_dtype, float softmax_scale, void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    /* the grid is sized by the tokens in blocks and window, as the sequence
     * API sizes it (the sink rows are attended with the window) */
    const int max_len = b->max_seq_len - (int)oscar_sinks_held(b->max_seq_len, c->lay.sinks);
    return oscar_cuda_attention_call(c, layer, batch_meta(c, layer, b), b->num_seqs, max_len, b->tokens_per_seq, q,
                                     q_dtype, out, out_dtype, softmax_scale, (cudaStream_t)stream);
}

/* A slot's layer: K [sinks + window_rows][Hkv][d], then V the same; the
 * sink rows (config.sink_tokens) come first. slot_k: the K rows from the
 * first sink row; win_k: from the first window row. */
uint8_t *slot_k(oscar_cache *c, int layer, int32_t slot) {
    return cuda_state(c)->windows + ((size_t)layer * c->cfg.max_seqs + (size_t)slot) * c->lay.window_layer_bytes;
}

uint8_t *win_k(oscar_cache *c, int layer, int32_t slot) {
    return slot_k(c, layer, slot) + (size_t)c->lay.sinks * c->lay.hkv * c->lay.d * c->lay.window_esize;
}

float *win_ss(oscar_cache *c, int layer, int32_t slot) {
    return cuda_state(c)->win_ss + ((size_t)layer * c->cfg.max_seqs + (size_t)slot) * c->lay.window_rows;
}

/* Sink and window rows of every layer (every sink row and rows[l] window
 * rows each, or the whole slot), the packed-block state and the failed
 * mark, slot src to dst, stream-ordered. */
oscar_status copy_slot(oscar_cache *c, int32_t src, int32_t dst, const int32_t *rows, int32_t uniform_rows,
                       cudaStream_t st) {
    CudaState *S = cuda_state(c);
    for (int l = 0; l < c->cfg.num_layers; l++) {
        int32_t *pk = S->packed + (size_t)l * c->cfg.max_seqs, *hd = S->held + (size_t)l * c->cfg.max_seqs;
        OSCAR_CK(c, cudaMemcpyAsync(pk + dst, pk + src, sizeof(int32_t), cudaMemcpyDeviceToDevice, st));
        OSCAR_CK(c, cudaMemcpyAsync(hd + dst, hd + src, sizeof(int32_t), cudaMemcpyDeviceToDevice, st));
    }
    const size_t half = c->lay.window_layer_bytes / 2;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    for (int l = 0; l < c->cfg.num_layers; l++) {
        const int32_t n = rows ? rows[l] : uniform_rows;
        /* the sink rows and the window rows are one run from the slot's
         * first row (sink rows not yet written are copied too, harmlessly) */
        const size_t run = (size_t)c->lay.sinks + (size_t)(n > 0 ? n : 0);
        if (run == 0) continue;
        OSCAR_CK(c, cudaMemcpyAsync(slot_k(c, l, dst), slot_k(c, l, src), run * rowb, cudaMemcpyDeviceToDevice, st));
        OSCAR_CK(c, cudaMemcpyAsync(slot_k(c, l, dst) + half, slot_k(c, l, src) + half, run * rowb,
                                    cudaMemcpyDeviceToDevice, st));
        if (n > 0)
            OSCAR_CK(c, cudaMemcpyAsync(win_ss(c, l, dst), win_ss(c, l, src), (size_t)n * sizeof(float),
                                        cudaMemcpyDeviceToDevice, st));
    }
    OSCAR_CK(c, cudaMemcpyAsync(S->failed + dst, S->failed + src, sizeof(int32_t), cudaMemcpyDeviceToDevice, st));
    return OSCAR_OK;
}

oscar_status cuda_slot_copy(oscar_cache *c, int32_t src, int32_t dst, int64_t n_tokens, void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    /* the packed count lives on the device, so the whole slot is copied */
    (void)n_tokens;
    return copy_slot(c, src, dst, nullptr, c->lay.window_rows, (cudaStream_t)stream);
}

/* ---- synchronous paths: fork, export, import ---------------------------------- */

oscar_status sync_all(oscar_cache *c) {
    OSCAR_CK(c, cudaDeviceSynchronize());
    return OSCAR_OK;
}

oscar_status cuda_fork(oscar_cache *c, int32_t src, int32_t dst, const int32_t *wt, const int32_t *packed,
                       const int32_t *table, int32_t n_blocks) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = copy_slot(c, src, dst, wt, 0, 0);
    if (rc != OSCAR_OK) return rc;
    if (n_blocks > 0)
        OSCAR_CK(c, cudaMemcpy(S->tables + (size_t)dst * c->cfg.block_count, table, (size_t)n_blocks * sizeof(int32_t),
                               cudaMemcpyHostToDevice));
    OSCAR_CK(c, cudaStreamSynchronize(0));
    return OSCAR_OK;
}

uint8_t *blk_ptr(oscar_cache *c, int layer, int32_t block) {
    return cuda_state(c)->pool + ((size_t)layer * c->cfg.block_count + (size_t)block) * c->lay.layer_block_bytes;
}

oscar_status cuda_read_block(oscar_cache *c, int layer, int32_t block, void *host) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    OSCAR_CK(c, cudaMemcpy(host, blk_ptr(c, layer, block), c->lay.layer_block_bytes, cudaMemcpyDeviceToHost));
    return OSCAR_OK;
}

oscar_status cuda_write_block(oscar_cache *c, int layer, int32_t block, const void *host) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    OSCAR_CK(c, cudaMemcpy(blk_ptr(c, layer, block), host, c->lay.layer_block_bytes, cudaMemcpyHostToDevice));
    return sync_all(c);
}

oscar_status cuda_read_window(oscar_cache *c, int layer, int32_t slot, int32_t n, void *k, void *v, float *ss) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    if (n <= 0) return OSCAR_OK;
    if (k) OSCAR_CK(c, cudaMemcpy(k, win_k(c, layer, slot), (size_t)n * rowb, cudaMemcpyDeviceToHost));
    if (v)
        OSCAR_CK(c, cudaMemcpy(v, win_k(c, layer, slot) + c->lay.window_layer_bytes / 2, (size_t)n * rowb,
                               cudaMemcpyDeviceToHost));
    if (ss) OSCAR_CK(c, cudaMemcpy(ss, win_ss(c, layer, slot), (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    return OSCAR_OK;
}

oscar_status cuda_write_window(oscar_cache *c, int layer, int32_t slot, int32_t n, const void *k, const void *v,
                               const float *ss, int32_t packed_blocks) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    /* an imported sequence starts healthy, with its layers' packed counts */
    OSCAR_CK(c, cudaMemset(S->failed + slot, 0, sizeof(int32_t)));
    OSCAR_CK(c, cudaMemcpy(S->packed + (size_t)layer * c->cfg.max_seqs + slot, &packed_blocks, sizeof(int32_t),
                           cudaMemcpyHostToDevice));
    /* tokens written, the sink rows counted: all S once a window row or a
     * block exists; otherwise at most S (a bound is all the checks need) */
    const int32_t held = c->lay.sinks + packed_blocks * c->cfg.residual + n;
    OSCAR_CK(c, cudaMemcpy(S->held + (size_t)layer * c->cfg.max_seqs + slot, &held, sizeof(int32_t),
                           cudaMemcpyHostToDevice));
    if (n <= 0) return sync_all(c);
    if (ss) OSCAR_CK(c, cudaMemcpy(win_ss(c, layer, slot), ss, (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
    if (k) OSCAR_CK(c, cudaMemcpy(win_k(c, layer, slot), k, (size_t)n * rowb, cudaMemcpyHostToDevice));
    if (v)
        OSCAR_CK(c, cudaMemcpy(win_k(c, layer, slot) + c->lay.window_layer_bytes / 2, v, (size_t)n * rowb,
                               cudaMemcpyHostToDevice));
    return sync_all(c);
}

/* The first n sink rows of a slot's layer (synchronous, like the window). */
oscar_status cuda_read_sinks(oscar_cache *c, int layer, int32_t slot, int32_t n, void *k, void *v) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    if (n <= 0) return OSCAR_OK;
    const size_t bytes = (size_t)n * c->lay.hkv * c->lay.d * c->lay.window_esize;
    if (k) OSCAR_CK(c, cudaMemcpy(k, slot_k(c, layer, slot), bytes, cudaMemcpyDeviceToHost));
    if (v) OSCAR_CK(c, cudaMemcpy(v, slot_k(c, layer, slot) + c->lay.window_layer_bytes / 2, bytes, cudaMemcpyDeviceToHost));
    return OSCAR_OK;
}

oscar_status cuda_write_sinks(oscar_cache *c, int layer, int32_t slot, int32_t n, const void *k, const void *v) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    if (n <= 0) return OSCAR_OK;
    const size_t bytes = (size_t)n * c->lay.hkv * c->lay.d * c->lay.window_esize;
    if (k) OSCAR_CK(c, cudaMemcpy(slot_k(c, layer, slot), k, bytes, cudaMemcpyHostToDevice));
    if (v) OSCAR_CK(c, cudaMemcpy(slot_k(c, layer, slot) + c->lay.window_layer_bytes / 2, v, bytes, cudaMemcpyHostToDevice));
    return sync_all(c);
}

oscar_status cuda_set_table(oscar_cache *c, int32_t slot, const int32_t *table, int32_t n_blocks) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    OSCAR_CK(c, cudaMemset(S->failed + slot, 0, sizeof(int32_t)));
    if (n_blocks > 0)
        OSCAR_CK(c, cudaMemcpy(S->tables + (size_t)slot * c->cfg.block_count, table, (size_t)n_blocks * sizeof(int32_t),
                               cudaMemcpyHostToDevice));
    return sync_all(c);
}

oscar_status cuda_requirements(const oscar_config *cfg, oscar_memory_requirements *out, char *eb, size_t en) {
    int sm = 0;
    oscar_status st = device_sm_count(nullptr, cfg->device, &sm, nullptr, eb, en);
    if (st != OSCAR_OK) return st;
    oscar_layout L;
    oscar_layout_init(&L, cfg);
    const WorkspaceLayout W = workspace_layout(cfg, &L, sm);
    out->pool_bytes = L.layer_block_bytes * (size_t)cfg->num_layers * (size_t)cfg->block_count;
    out->window_bytes = L.windows_bytes;
    out->workspace_bytes = W.total;
    out->alignment = kAlign;
    return OSCAR_OK;
}

oscar_status cuda_key_sumsq(oscar_cache *c, int64_t n_rows, const void *k, oscar_dtype dtype, float *out,
                           void *stream) {
    CudaState *S = cuda_state(c);
    ENTER(c, S);
    return oscar_cuda_row_sumsq(c, n_rows, k, dtype, nullptr, 0, out, nullptr, (cudaStream_t)stream);
}

const oscar_backend_ops cuda_ops = {
    "cuda",          cuda_init,        cuda_destroy,     cuda_append,       cuda_attention,
    cuda_fork,       cuda_read_block,  cuda_write_block, cuda_read_window,  cuda_write_window,
    cuda_set_table,  cuda_batch_append, cuda_batch_attention, cuda_slot_copy, cuda_poll,
    cuda_sync,       cuda_requirements, cuda_key_sumsq,
    cuda_read_sinks, cuda_write_sinks,
};

} // namespace

extern "C" const oscar_backend_ops *oscar_cuda_backend_ops(void) { return &cuda_ops; }

/* 1 if some device can run the sm_90a kernels. */
extern "C" int oscar_cuda_device_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    for (int i = 0; i < n; i++) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, i) == cudaSuccess && major == 9) return 1;
    }
    cudaGetLastError();
    return 0;
}
