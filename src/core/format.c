/* The packed block format of docs/FORMAT.md, written and read in plain C.
 * This is the reference every backend must agree with byte for byte (up to
 * the rounding-boundary cases the format allows). */
#include "format.h"

#include <math.h>
#include <string.h>

/* Inverse of the tile layout: for a token row `tok` (0..15) and a channel `ch`
 * of a 16-token tile, which lane, pair and element hold the key code. */
static inline void key_slot(int tok, int ch, int *lane, int *q, int *e) {
    int g = tok & 7, jlo = tok >> 3;   /* row g or g+8 -> j & 1 */
    int s = ch >> 4, c16 = ch & 15;
    int jhi = c16 >> 3, t = (c16 & 7) >> 1;
    *e = c16 & 1;
    *lane = g * 4 + t;
    *q = 4 * s + (jhi << 1) + jlo;
}

static inline void value_slot(int tok, int ch, int *lane, int *q, int *e) {
    int s = ch >> 4, c16 = ch & 15;
    int g = c16 & 7, jlo = c16 >> 3;
    int jhi = tok >> 3, t = (tok & 7) >> 1;
    *e = tok & 1;
    *lane = g * 4 + t;
    *q = 4 * s + (jhi << 1) + jlo;
}

static inline void put_code(uint8_t *tile, int chunk_bytes, int bits, int lane, int q, int e, uint32_t code) {
    int word, bit;
    oscar_code_position(bits, lane, q, e, &word, &bit);
    uint8_t *w = tile + (size_t)lane * chunk_bytes + (size_t)word * 4;
    uint32_t x;
    memcpy(&x, w, 4);
    x |= code << bit;
    memcpy(w, &x, 4);
}

static inline uint32_t get_code(const uint8_t *tile, int chunk_bytes, int bits, int lane, int q, int e) {
    int word, bit;
    oscar_code_position(bits, lane, q, e, &word, &bit);
    uint32_t x;
    memcpy(&x, tile + (size_t)lane * chunk_bytes + (size_t)word * 4, 4);
    return (x >> bit) & ((1u << bits) - 1u);
}

/* One code of a head's K or V codes array `codes` (R tokens, d channels,
 * `bits` wide) at tile T, slot (lane, q, e). 2 and 4 bits: one array of
 * tiles. 3 bits (format version 5): two planes, each in the tile order of
 * its own width: the low two bits of every code are the 2-bit array of
 * R*d/4 bytes, the high bit a 1-bit array of R*d/8 bytes after it. */
static inline void put_code_at(uint8_t *codes, int R, int d, int bits, int T, int lane, int q, int e,
                               uint32_t code) {
    if (bits == 3) {
        put_code(codes + (size_t)T * 4 * d, d / 8, 2, lane, q, e, code & 3u);
        put_code(codes + (size_t)R * d / 4 + (size_t)T * 2 * d, d / 16, 1, lane, q, e, code >> 2);
        return;
    }
    put_code(codes + (size_t)T * 2 * d * bits, d * bits / 16, bits, lane, q, e, code);
}

static inline uint32_t get_code_at(const uint8_t *codes, int R, int d, int bits, int T, int lane, int q, int e) {
    if (bits == 3)
        return get_code(codes + (size_t)T * 4 * d, d / 8, 2, lane, q, e) |
               get_code(codes + (size_t)R * d / 4 + (size_t)T * 2 * d, d / 16, 1, lane, q, e) << 2;
    return get_code(codes + (size_t)T * 2 * d * bits, d * bits / 16, bits, lane, q, e);
}

float oscar_row_sumsq(const oscar_layout *L, const float *row) {
    float hs[1024]; /* num_kv_heads <= 1024 (oscar_config_validate) */
    for (int h = 0; h < L->hkv; h++) hs[h] = oscar_head_sumsq(row + (size_t)h * L->d, L->d);
    return oscar_sum_heads(hs, L->hkv);
}

void oscar_pack_block(const oscar_layout *L, const float *xk, const float *xv, const float *token_ss, uint8_t *dst,
                      float *scratch) {
    const int R = L->residual, d = L->d, H = L->hkv;
    const size_t row = (size_t)H * d;
    /* clip_search: each group's range searched for the least squared error */
    void (*const group_params)(const float *, int, int, int, uint16_t *, uint16_t *) =
        L->clip ? oscar_group_params_clip : oscar_group_params;
    if (!L->quantised) {
        /* Method none: K and V rows of each head, in the window dtype. */
        for (int h = 0; h < H; h++) {
            uint8_t *hk = dst + (size_t)h * L->head_bytes;
            uint8_t *hv = hk + (size_t)R * d * L->window_esize;
            for (int t = 0; t < R; t++) {
                oscar_from_f32(xk + t * row + (size_t)h * d, hk + (size_t)t * d * L->window_esize,
                               (oscar_dtype)L->window_dtype, d);
                oscar_from_f32(xv + t * row + (size_t)h * d, hv + (size_t)t * d * L->window_esize,
                               (oscar_dtype)L->window_dtype, d);
            }
        }
        return;
    }
    memset(dst, 0, L->layer_block_bytes);
    /* scratch holds the keys divided by their token norm: [R][H][d]. */
    float *kn = scratch;
    float *norms = (float *)(dst + (size_t)H * L->head_bytes);
    for (int t = 0; t < R; t++) {
        const float *x = xk + t * row;
        float s = 1.0f;
        if (L->norm_per_head) {
            /* one norm per token and head: the head's own e[h] (FORMAT.md
             * step 4), from the window values; the token's stored all-head
             * sum is not used */
            for (int h = 0; h < H; h++) {
                float sh = sqrtf(oscar_head_sumsq(x + (size_t)h * d, d));
                if (!(sh > 0.0f) || isinf(sh)) sh = 1.0f;
                norms[(size_t)h * R + t] = sh;
                for (int i = 0; i < d; i++) kn[t * row + (size_t)h * d + i] = x[(size_t)h * d + i] / sh;
            }
            continue;
        }
        if (L->scale_keys) {
            const float ss = token_ss ? token_ss[t] : oscar_row_sumsq(L, x);
            s = sqrtf(ss);
            if (!(s > 0.0f) || isinf(s)) s = 1.0f;
            norms[t] = s;
        }
        for (size_t i = 0; i < row; i++) kn[t * row + i] = L->scale_keys ? x[i] / s : x[i];
    }
    /* keys and values may have different widths (key_bits, value_bits) */
    const int Qk = L->klevels, kbits = L->kbits, Qv = L->vlevels, vbits = L->vbits;
    for (int h = 0; h < H; h++) {
        uint8_t *base = dst + (size_t)h * L->head_bytes;
        uint8_t *kc = base, *vc = base + L->kcodes_bytes;
        uint16_t *kp = (uint16_t *)(base + L->kcodes_bytes + L->vcodes_bytes);
        uint16_t *vp = (uint16_t *)(base + L->kcodes_bytes + L->vcodes_bytes + L->kparams_bytes);
        for (int g0 = 0; g0 < R; g0 += L->k_group) {
            for (int c = 0; c < d; c++) {
                const float *col = kn + (size_t)g0 * row + (size_t)h * d + c;
                uint16_t sc16, lo16;
                group_params(col, L->k_group, (int)row, Qk, &sc16, &lo16);
                size_t pi = ((size_t)(g0 / L->k_group) * d + c) * 2;
                kp[pi] = sc16;
                kp[pi + 1] = lo16;
                float sc = oscar_f16_to_f32(sc16), l0 = oscar_f16_to_f32(lo16);
                for (int t = g0; t < g0 + L->k_group; t++) {
                    int lane, q, e;
                    key_slot(t & 15, c, &lane, &q, &e);
                    uint32_t code = (uint32_t)oscar_quant_code(col[(size_t)(t - g0) * row], sc, l0, Qk);
                    put_code_at(kc, R, d, kbits, t >> 4, lane, q, e, code);
                }
            }
        }
        const int ng = d / L->v_group;
        for (int t = 0; t < R; t++) {
            const float *vrow = xv + t * row + (size_t)h * d;
            for (int gi = 0; gi < ng; gi++) {
                const float *grp = vrow + gi * L->v_group;
                uint16_t sc16, lo16;
                group_params(grp, L->v_group, 1, Qv, &sc16, &lo16);
                vp[((size_t)t * ng + gi) * 2] = sc16;
                vp[((size_t)t * ng + gi) * 2 + 1] = lo16;
                float sc = oscar_f16_to_f32(sc16), l0 = oscar_f16_to_f32(lo16);
                for (int c = gi * L->v_group; c < (gi + 1) * L->v_group; c++) {
                    int lane, q, e;
                    value_slot(t & 15, c, &lane, &q, &e);
                    uint32_t code = (uint32_t)oscar_quant_code(vrow[c], sc, l0, Qv);
                    put_code_at(vc, R, d, vbits, t >> 4, lane, q, e, code);
                }
            }
        }
    }
}

void oscar_unpack_head(const oscar_layout *L, const uint8_t *block, int h, float *k_out, float *v_out,
                       float *norms_out) {
    const int R = L->residual, d = L->d;
    if (!L->quantised) {
        const uint8_t *hk = block + (size_t)h * L->head_bytes;
        const uint8_t *hv = hk + (size_t)R * d * L->window_esize;
        oscar_to_f32(hk, (oscar_dtype)L->window_dtype, k_out, (int64_t)R * d);
        oscar_to_f32(hv, (oscar_dtype)L->window_dtype, v_out, (int64_t)R * d);
        for (int t = 0; t < R; t++) norms_out[t] = 1.0f;
        return;
    }
    const int kbits = L->kbits, vbits = L->vbits;
    const uint8_t *base = block + (size_t)h * L->head_bytes;
    const uint8_t *kc = base, *vc = base + L->kcodes_bytes;
    const uint16_t *kp = (const uint16_t *)(base + L->kcodes_bytes + L->vcodes_bytes);
    const uint16_t *vp = (const uint16_t *)(base + L->kcodes_bytes + L->vcodes_bytes + L->kparams_bytes);
    /* norms: [R], or [Hkv][R] with one per token and head */
    const float *norms =
        (const float *)(block + (size_t)L->hkv * L->head_bytes) + (L->norm_per_head ? (size_t)h * R : 0);
    const int ng = d / L->v_group;
    for (int t = 0; t < R; t++) {
        norms_out[t] = L->scale_keys ? norms[t] : 1.0f;
        for (int c = 0; c < d; c++) {
            int lane, q, e;
            key_slot(t & 15, c, &lane, &q, &e);
            uint32_t code = get_code_at(kc, R, d, kbits, t >> 4, lane, q, e);
            size_t pi = ((size_t)(t / L->k_group) * d + c) * 2;
            k_out[(size_t)t * d + c] = oscar_f16_to_f32(kp[pi + 1]) + (float)code * oscar_f16_to_f32(kp[pi]);
            value_slot(t & 15, c, &lane, &q, &e);
            code = get_code_at(vc, R, d, vbits, t >> 4, lane, q, e);
            size_t vi = ((size_t)t * ng + c / L->v_group) * 2;
            v_out[(size_t)t * d + c] = oscar_f16_to_f32(vp[vi + 1]) + (float)code * oscar_f16_to_f32(vp[vi]);
        }
    }
}
