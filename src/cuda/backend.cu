/* The CUDA backend's ops table: device memory (pool, windows, block-table
 * mirror, attention workspace, staging ring), the append and attention
 * entry points and the synchronous host <-> device copies.
 *
 * Asynchrony: append (with check_finite = 0) and attention never block the
 * host and never allocate. Append metadata goes through a pinned staging
 * ring; a region is reused only after the event recorded behind the kernels
 * that read it has completed (cudaEventSynchronize only if the host is a
 * whole ring ahead of the device). Calls on one handle are ordered across
 * streams: each call waits (on the device) for the previous call's event. */
#include "common.cuh"

#include <stdlib.h>
#include <string.h>

size_t oscar_cuda_pack_smem(const oscar_layout *L);

namespace {

oscar_status ck(oscar_cache *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return OSCAR_OK;
    return oscar_set_error(c, e == cudaErrorMemoryAllocation ? OSCAR_E_OUT_OF_MEMORY : OSCAR_E_BACKEND,
                           "CUDA: %s: %s", what, cudaGetErrorString(e));
}

void free_state(CudaState *S) {
    if (!S) return;
    cudaFree(S->pool);
    cudaFree(S->windows);
    cudaFree(S->tables);
    cudaFree(S->dstage);
    cudaFreeHost(S->hstage);
    cudaFree(S->d_flag);
    cudaFreeHost(S->h_flag);
    cudaFree(S->ws);
    for (int i = 0; i < OSCAR_STAGE_RECORDS; i++)
        if (S->rec[i].ev) cudaEventDestroy(S->rec[i].ev);
    if (S->last_ev) cudaEventDestroy(S->last_ev);
    free(S);
}

oscar_status cuda_init(oscar_cache *c) {
    const oscar_layout *L = &c->lay;
    const oscar_config *cfg = &c->cfg;
    CudaState *S = (CudaState *)calloc(1, sizeof(CudaState));
    if (!S) return oscar_set_error(c, OSCAR_E_OUT_OF_MEMORY, "CUDA backend: out of host memory");
    c->backend_state = S;
    oscar_status st;
#define INIT_CK(call)                                                                                  \
    do {                                                                                               \
        st = ck(c, (call), #call);                                                                     \
        if (st != OSCAR_OK) goto fail;                                                                 \
    } while (0)
    {
        S->device = cfg->device;
        INIT_CK(cudaSetDevice(S->device));
        cudaDeviceProp prop;
        INIT_CK(cudaGetDeviceProperties(&prop, S->device));
        if (prop.major != 9) {
            st = oscar_set_error(c, OSCAR_E_UNSUPPORTED,
                                 "CUDA backend is built for compute capability 9.0 (sm_90a), device %d is %d.%d",
                                 S->device, prop.major, prop.minor);
            goto fail;
        }
        S->sm_count = prop.multiProcessorCount;
        S->smem_optin = prop.sharedMemPerBlockOptin;
        S->pool_bytes = L->layer_block_bytes * (size_t)cfg->num_layers * (size_t)cfg->block_count;
        S->windows_bytes = L->window_layer_bytes * (size_t)cfg->num_layers * (size_t)cfg->max_seqs;
        S->max_blocks = cfg->block_count;
        INIT_CK(cudaMalloc((void **)&S->pool, S->pool_bytes));
        INIT_CK(cudaMemset(S->pool, 0, S->pool_bytes));
        INIT_CK(cudaMalloc((void **)&S->windows, S->windows_bytes));
        INIT_CK(cudaMemset(S->windows, 0, S->windows_bytes));
        const size_t tb = (size_t)cfg->max_seqs * (size_t)cfg->block_count * sizeof(int32_t);
        INIT_CK(cudaMalloc((void **)&S->tables, tb));
        INIT_CK(cudaMemset(S->tables, 0, tb));
        /* one call needs at most block_count pack tasks + max_seqs window tasks */
        size_t one = ((size_t)cfg->block_count + 16) * sizeof(PackTask) + ((size_t)cfg->max_seqs + 16) * sizeof(WinTask);
        S->stage_bytes = 4 * one + 65536;
        INIT_CK(cudaHostAlloc((void **)&S->hstage, S->stage_bytes, cudaHostAllocDefault));
        INIT_CK(cudaMalloc((void **)&S->dstage, S->stage_bytes));
        INIT_CK(cudaMalloc((void **)&S->d_flag, sizeof(int)));
        INIT_CK(cudaHostAlloc((void **)&S->h_flag, sizeof(int), cudaHostAllocDefault));
        for (int i = 0; i < OSCAR_STAGE_RECORDS; i++)
            INIT_CK(cudaEventCreateWithFlags(&S->rec[i].ev, cudaEventDisableTiming));
        INIT_CK(cudaEventCreateWithFlags(&S->last_ev, cudaEventDisableTiming));
        S->ws_bytes = oscar_cuda_ws_bytes(c, S->sm_count);
        INIT_CK(cudaMalloc((void **)&S->ws, S->ws_bytes));
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
    cudaSetDevice(S->device);
    cudaDeviceSynchronize();
    free_state(S);
    c->backend_state = NULL;
}

/* Orders this call after the previous call on the handle (device side). */
oscar_status call_begin(oscar_cache *c, cudaStream_t st) {
    CudaState *S = cuda_state(c);
    OSCAR_CK(c, cudaSetDevice(S->device));
    if (S->last_ev_valid) OSCAR_CK(c, cudaStreamWaitEvent(st, S->last_ev, 0));
    return OSCAR_OK;
}

oscar_status call_end(oscar_cache *c, cudaStream_t st) {
    CudaState *S = cuda_state(c);
    OSCAR_CK(c, cudaEventRecord(S->last_ev, st));
    S->last_ev_valid = 1;
    return OSCAR_OK;
}

/* A region of n bytes of the staging ring that no pending copy or kernel
 * still reads. */
oscar_status stage_reserve(oscar_cache *c, size_t n, size_t *off, int *rec) {
    CudaState *S = cuda_state(c);
    n = (n + 255) & ~(size_t)255;
    if (n == 0) n = 256;
    if (n > S->stage_bytes) return oscar_set_error(c, OSCAR_E_BACKEND, "CUDA: staging ring too small (%zu bytes)", n);
    if (S->stage_head + n > S->stage_bytes) S->stage_head = 0;
    const size_t a = S->stage_head, b = a + n;
    for (int i = 0; i < OSCAR_STAGE_RECORDS; i++) {
        if (!S->rec[i].live) continue;
        if (S->rec[i].a < b && a < S->rec[i].b) {
            OSCAR_CK(c, cudaEventSynchronize(S->rec[i].ev));
            S->rec[i].live = 0;
        }
    }
    const int r = S->rec_next;
    if (S->rec[r].live) {
        OSCAR_CK(c, cudaEventSynchronize(S->rec[r].ev));
        S->rec[r].live = 0;
    }
    S->rec_next = (r + 1) % OSCAR_STAGE_RECORDS;
    S->stage_head = b;
    *off = a;
    *rec = r;
    S->rec[r].a = a;
    S->rec[r].b = b;
    return OSCAR_OK;
}

oscar_status cuda_append(oscar_cache *c, int layer, const oscar_append_job *jobs, int n_jobs, int64_t total_rows,
                         const void *k, const void *v, oscar_dtype dtype, void *stream) {
    CudaState *S = cuda_state(c);
    const oscar_layout *L = &c->lay;
    cudaStream_t st = (cudaStream_t)stream;
    oscar_status rc = call_begin(c, st);
    if (rc != OSCAR_OK) return rc;
    const int64_t n_el = total_rows * L->hkv * L->d;
    if (c->cfg.check_finite && n_el > 0) {
        OSCAR_CK(c, cudaMemsetAsync(S->d_flag, 0, sizeof(int), st));
        rc = oscar_cuda_finite_launch(c, k, v, n_el, dtype, S->d_flag, st);
        if (rc != OSCAR_OK) return rc;
        OSCAR_CK(c, cudaMemcpyAsync(S->h_flag, S->d_flag, sizeof(int), cudaMemcpyDeviceToHost, st));
        OSCAR_CK(c, cudaStreamSynchronize(st));
        if (*S->h_flag) {
            call_end(c, st);
            return oscar_set_error(c, OSCAR_E_NONFINITE, "append: K or V holds NaN or Inf; nothing was appended");
        }
    }
    int n_tasks = 0, n_w = 0, max_wrows = 0;
    for (int i = 0; i < n_jobs; i++) {
        n_tasks += jobs[i].n_flush;
        const int r0 = jobs[i].n_flush ? 0 : jobs[i].window_before;
        if (jobs[i].window_after > r0) {
            n_w++;
            if (jobs[i].window_after - r0 > max_wrows) max_wrows = jobs[i].window_after - r0;
        }
    }
    if (n_tasks == 0 && n_w == 0) return call_end(c, st);
    const size_t bytes = (size_t)n_tasks * sizeof(PackTask) + 256 + (size_t)n_w * sizeof(WinTask);
    size_t off;
    int rec;
    rc = stage_reserve(c, bytes, &off, &rec);
    if (rc != OSCAR_OK) return rc;
    PackTask *pt = (PackTask *)(S->hstage + off);
    const size_t woff = ((size_t)n_tasks * sizeof(PackTask) + 255) & ~(size_t)255;
    WinTask *wt = (WinTask *)(S->hstage + off + woff);
    int it = 0, iw = 0;
    for (int i = 0; i < n_jobs; i++) {
        const oscar_append_job *J = &jobs[i];
        for (int f = 0; f < J->n_flush; f++) {
            PackTask T;
            memset(&T, 0, sizeof T);
            T.input_row = J->input_row;
            T.block = J->flush_blocks[f];
            T.slot = J->seq_slot;
            T.window_before = J->window_before;
            T.stream0 = f * L->residual;
            T.table_idx = J->first_flush_index + f;
            pt[it++] = T;
        }
        const int r0 = J->n_flush ? 0 : J->window_before;
        if (J->window_after > r0) {
            WinTask W;
            memset(&W, 0, sizeof W);
            W.in0 = J->input_row + (int64_t)J->n_flush * L->residual - J->window_before;
            W.slot = J->seq_slot;
            W.r0 = r0;
            W.r1 = J->window_after;
            wt[iw++] = W;
        }
    }
    OSCAR_CK(c, cudaMemcpyAsync(S->dstage + off, S->hstage + off, woff + (size_t)n_w * sizeof(WinTask),
                                cudaMemcpyHostToDevice, st));
    rc = oscar_cuda_append_launch(c, layer, (const PackTask *)(S->dstage + off), n_tasks,
                                  (const WinTask *)(S->dstage + off + woff), n_w, max_wrows, k, v, dtype, st);
    if (rc != OSCAR_OK) return rc;
    OSCAR_CK(c, cudaEventRecord(S->rec[rec].ev, st));
    S->rec[rec].live = 1;
    return call_end(c, st);
}

oscar_status cuda_attention(oscar_cache *c, int layer, const oscar_attn_job *jobs, int n_jobs, int q_len,
                            const void *q, oscar_dtype q_dtype, void *out, oscar_dtype out_dtype, float softmax_scale,
                            void *stream) {
    cudaStream_t st = (cudaStream_t)stream;
    oscar_status rc = call_begin(c, st);
    if (rc != OSCAR_OK) return rc;
    rc = oscar_cuda_attention_launch(c, layer, jobs, n_jobs, q_len, q, q_dtype, out, out_dtype, softmax_scale, st);
    if (rc != OSCAR_OK) return rc;
    return call_end(c, st);
}

oscar_status sync_all(oscar_cache *c) {
    CudaState *S = cuda_state(c);
    OSCAR_CK(c, cudaSetDevice(S->device));
    OSCAR_CK(c, cudaDeviceSynchronize());
    return OSCAR_OK;
}

uint8_t *win_k(oscar_cache *c, int layer, int32_t slot) {
    return cuda_state(c)->windows + ((size_t)layer * c->cfg.max_seqs + (size_t)slot) * c->lay.window_layer_bytes;
}

oscar_status cuda_fork(oscar_cache *c, int32_t src, int32_t dst, const int32_t *wt, const int32_t *table,
                       int32_t n_blocks) {
    CudaState *S = cuda_state(c);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    const size_t half = c->lay.window_layer_bytes / 2;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    for (int l = 0; l < c->cfg.num_layers; l++) {
        if (wt[l] <= 0) continue;
        OSCAR_CK(c, cudaMemcpy(win_k(c, l, dst), win_k(c, l, src), (size_t)wt[l] * rowb, cudaMemcpyDeviceToDevice));
        OSCAR_CK(c, cudaMemcpy(win_k(c, l, dst) + half, win_k(c, l, src) + half, (size_t)wt[l] * rowb,
                               cudaMemcpyDeviceToDevice));
    }
    if (n_blocks > 0)
        OSCAR_CK(c, cudaMemcpy(S->tables + (size_t)dst * S->max_blocks, table, (size_t)n_blocks * sizeof(int32_t),
                               cudaMemcpyHostToDevice));
    return sync_all(c);
}

uint8_t *blk_ptr(oscar_cache *c, int layer, int32_t block) {
    return cuda_state(c)->pool + ((size_t)layer * c->cfg.block_count + (size_t)block) * c->lay.layer_block_bytes;
}

oscar_status cuda_read_block(oscar_cache *c, int layer, int32_t block, void *host) {
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    OSCAR_CK(c, cudaMemcpy(host, blk_ptr(c, layer, block), c->lay.layer_block_bytes, cudaMemcpyDeviceToHost));
    return OSCAR_OK;
}

oscar_status cuda_write_block(oscar_cache *c, int layer, int32_t block, const void *host) {
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    OSCAR_CK(c, cudaMemcpy(blk_ptr(c, layer, block), host, c->lay.layer_block_bytes, cudaMemcpyHostToDevice));
    return sync_all(c);
}

oscar_status cuda_read_window(oscar_cache *c, int layer, int32_t slot, int32_t n, void *k, void *v) {
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    if (n <= 0) return OSCAR_OK;
    if (k) OSCAR_CK(c, cudaMemcpy(k, win_k(c, layer, slot), (size_t)n * rowb, cudaMemcpyDeviceToHost));
    if (v)
        OSCAR_CK(c, cudaMemcpy(v, win_k(c, layer, slot) + c->lay.window_layer_bytes / 2, (size_t)n * rowb,
                               cudaMemcpyDeviceToHost));
    return OSCAR_OK;
}

oscar_status cuda_write_window(oscar_cache *c, int layer, int32_t slot, int32_t n, const void *k, const void *v) {
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    const size_t rowb = (size_t)c->lay.hkv * c->lay.d * c->lay.window_esize;
    if (n <= 0) return OSCAR_OK;
    if (k) OSCAR_CK(c, cudaMemcpy(win_k(c, layer, slot), k, (size_t)n * rowb, cudaMemcpyHostToDevice));
    if (v)
        OSCAR_CK(c, cudaMemcpy(win_k(c, layer, slot) + c->lay.window_layer_bytes / 2, v, (size_t)n * rowb,
                               cudaMemcpyHostToDevice));
    return sync_all(c);
}

oscar_status cuda_set_table(oscar_cache *c, int32_t slot, const int32_t *table, int32_t n_blocks) {
    CudaState *S = cuda_state(c);
    oscar_status rc = sync_all(c);
    if (rc != OSCAR_OK) return rc;
    if (n_blocks > 0)
        OSCAR_CK(c, cudaMemcpy(S->tables + (size_t)slot * S->max_blocks, table, (size_t)n_blocks * sizeof(int32_t),
                               cudaMemcpyHostToDevice));
    return sync_all(c);
}

const oscar_backend_ops cuda_ops = {
    "cuda",           cuda_init,       cuda_destroy,     cuda_append,       cuda_attention, cuda_fork,
    cuda_read_block,  cuda_write_block, cuda_read_window, cuda_write_window, cuda_set_table,
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
