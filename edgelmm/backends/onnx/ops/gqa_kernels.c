/* Causal attention over a KV cache for one sequence (batch 1), fp32 compute over an fp32, fp16 or int8 cache
   (cache_row_bytes: int8 rows carry their fp32 scale after the values), AVX-512: the compute behind
   edgelmm.GroupQueryAttention (gqa_op.c). Rotary (rotate-half on the first rotary_dim dims) is applied to the
   new queries and keys; the new keys/values are written into the cache at their positions; each query row
   attends to positions 0..its own, online-softmax over key blocks, so the masked upper triangle is never
   computed. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vec_math.h"

#define KEYS 16          /* keys per decode block: one zmm of scores */

/* Bytes per cached row of head_dim values: fp32, fp16, or int8 then the row's fp32 scale. */
size_t cache_row_bytes(int head_dim, int format) {
    return format == CACHE_FP32 ? 4 * (size_t)head_dim : format == CACHE_FP16 ? 2 * (size_t)head_dim
                                                                               : (size_t)head_dim + 4;
}

/* Values d..d+15 of cache row `row` as fp32, lanes outside m zero. */
static inline __m512 load16(const void *cache, size_t row, int d, __mmask16 m, const int head_dim, const int format) {
    const char *r = (const char *)cache + row * cache_row_bytes(head_dim, format);
    if (format == CACHE_FP32) return _mm512_maskz_loadu_ps(m, (const float *)r + d);
    if (format == CACHE_FP16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)r + d));
    float scale;
    memcpy(&scale, r + head_dim, sizeof scale);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, r + d))), _mm512_set1_ps(scale));
}

/* x [n] stored as cache row `row`: fp32 as is, fp16 rounded (saturating: no inf in the cache), int8 symmetric
   with the row's scale max|x| / 127 after the values. */
void gqa_store_row(void *cache, size_t row, const float *x, int n, int format) {
    char *r = (char *)cache + row * cache_row_bytes(n, format);
    if (format == CACHE_FP32) {
        memcpy(r, x, sizeof(float) * n);
        return;
    }
    float amax = 0.f;
    if (format == CACHE_INT8) {
        __m512 mx = _mm512_setzero_ps();
        for (int d = 0; d < n; d += 16) {
            const __mmask16 m = n - d >= 16 ? 0xFFFF : (__mmask16)((1u << (n - d)) - 1);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + d)));
        }
        amax = _mm512_reduce_max_ps(mx);
        const float scale = amax / 127.f;
        memcpy(r + n, &scale, sizeof scale);
    }
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    for (int d = 0; d < n; d += 16) {
        const __mmask16 m = n - d >= 16 ? 0xFFFF : (__mmask16)((1u << (n - d)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + d);
        if (format == CACHE_INT8) {
            _mm_mask_storeu_epi8(r + d, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
        } else {
            const __m512 c = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-65504.f)), _mm512_set1_ps(65504.f));
            _mm256_mask_storeu_epi16((uint16_t *)r + d, m, _mm512_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT));
        }
    }
}

/* x[0..rotary_dim) rotated by position pos (cos/sin rows of rotary_dim/2), the rest copied, times scale. */
void gqa_rotate(const float *x, float *out, int head_dim, int rotary_dim, const float *cos_row, const float *sin_row,
                float scale) {
    const int half = rotary_dim / 2;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int i = 0; i < half; i += 16) {
        const __mmask16 m = half - i >= 16 ? 0xFFFF : (__mmask16)((1u << (half - i)) - 1);
        const __m512 x1 = _mm512_maskz_loadu_ps(m, x + i), x2 = _mm512_maskz_loadu_ps(m, x + i + half);
        const __m512 c = _mm512_maskz_loadu_ps(m, cos_row + i), s = _mm512_maskz_loadu_ps(m, sin_row + i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s)), sc));
        _mm512_mask_storeu_ps(out + i + half, m, _mm512_mul_ps(_mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s)), sc));
    }
    for (int i = rotary_dim; i < head_dim; i += 16) {
        const __mmask16 m = head_dim - i >= 16 ? 0xFFFF : (__mmask16)((1u << (head_dim - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), sc));
    }
}

/* v[t] summed across lanes, as lane t of the result (a transpose-and-add tree). */
static inline __m512 lane_sums(const __m512 v[KEYS]) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; i++)
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
    const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

typedef struct { float max, sum; } Softmax;

/* The online-softmax update of one row by n (1 to 4) zmm of scores, the first `valid` of them live: the row's
   max and sum move on, p gets e^(s - max) (0 where masked); returns alpha, the factor for what the row has
   accumulated so far. */
static inline __attribute__((always_inline)) float softmax_update(Softmax *st, const __m512 *s, const int n, int valid,
                                                                  float *p) {
    __m512 scores[4], top = _mm512_set1_ps(-INFINITY);
    __mmask16 live[4];
    for (int i = 0; i < n; i++) {
        const int left = valid - 16 * i;
        live[i] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        scores[i] = _mm512_mask_blend_ps(live[i], _mm512_set1_ps(-INFINITY), s[i]);
        top = _mm512_max_ps(top, scores[i]);
    }
    const float m_new = fmaxf(st->max, _mm512_reduce_max_ps(top)), alpha = expf(st->max - m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        const __m512 e = _mm512_maskz_mov_ps(live[i], exp512(_mm512_sub_ps(scores[i], _mm512_set1_ps(m_new))));
        sum = _mm512_add_ps(sum, e);
        _mm512_storeu_ps(p + 16 * i, e);
    }
    st->sum = st->sum * alpha + _mm512_reduce_add_ps(sum);
    st->max = m_new;
    return alpha;
}

/* One online-softmax step of a row: scores s (lanes past `valid` masked), then o = o * alpha + p . V block. */
static inline __attribute__((always_inline)) void softmax_step(__m512 s, int valid, Softmax *st, float *o,
                                                                const void *values, size_t row0, const int head_dim,
                                                                const int format) {
    const int vecs = (head_dim + 15) / 16;
    const __mmask16 tail = head_dim % 16 ? (__mmask16)((1u << (head_dim % 16)) - 1) : 0xFFFF;
    float pv[KEYS];
    const float alpha = softmax_update(st, &s, 1, valid, pv);
    __m512 acc[MAX_HEAD_DIM / 16];
    for (int v = 0; v < vecs; v++)
        acc[v] = _mm512_mul_ps(_mm512_maskz_loadu_ps(v + 1 < vecs ? 0xFFFF : tail, o + v * 16), _mm512_set1_ps(alpha));
    for (int t = 0; t < valid; t++) {
        const __m512 pt = _mm512_set1_ps(pv[t]);
        for (int v = 0; v < vecs; v++)
            acc[v] = _mm512_fmadd_ps(pt, load16(values, row0 + t, v * 16, v + 1 < vecs ? 0xFFFF : tail, head_dim,
                                                format), acc[v]);
    }
    for (int v = 0; v < vecs; v++) _mm512_mask_storeu_ps(o + v * 16, v + 1 < vecs ? 0xFFFF : tail, acc[v]);
}

/* One query row at position pos (a decode step): scores of 16 keys at a time as 16 dot products. */
static inline __attribute__((always_inline)) void attend_one(int pos, const int head_dim, const float *q, const void *keys,
                                                              const void *values, float *out, const int format) {
    const int vecs = (head_dim + 15) / 16;
    const __mmask16 tail = head_dim % 16 ? (__mmask16)((1u << (head_dim % 16)) - 1) : 0xFFFF;
    __m512 qv[MAX_HEAD_DIM / 16], dots[KEYS];
    float o[MAX_HEAD_DIM] __attribute__((aligned(64)));
    for (int v = 0; v < vecs; v++) qv[v] = _mm512_maskz_loadu_ps(v + 1 < vecs ? 0xFFFF : tail, q + v * 16);
    memset(o, 0, sizeof(float) * head_dim);
    Softmax st = {-INFINITY, 0.f};
    for (int j0 = 0; j0 <= pos; j0 += KEYS) {
        const int nk = pos + 1 - j0 < KEYS ? pos + 1 - j0 : KEYS;
        for (int t = 0; t < KEYS; t++) {
            __m512 d = _mm512_setzero_ps();
            if (t < nk)
                for (int v = 0; v < vecs; v++)
                    d = _mm512_fmadd_ps(qv[v], load16(keys, (size_t)(j0 + t), v * 16, v + 1 < vecs ? 0xFFFF : tail,
                                                      head_dim, format), d);
            dots[t] = d;
        }
        softmax_step(lane_sums(dots), nk, &st, o, values, (size_t)j0, head_dim, format);
    }
    const float inv = 1.f / st.sum;
    for (int d = 0; d < head_dim; d++) out[d] = o[d] * inv;
}

#define BLOCK_ROWS 64   /* query rows sharing each transposed key block */
#define BLOCK_KEYS 64   /* keys per prefill step: 64 of 32/48/64, chosen by measurement (docs/design-measurements.md) */
#define SCORE_VECS (BLOCK_KEYS / 16)  /* zmm of scores per row */
#define GROUP_ROWS 4    /* rows computed together: 16 score and 4 x up to 8 output accumulators */

/* kt [head_dim][BLOCK_KEYS] <- the nk keys from cache row `row0`, zero past nk. */
static inline __attribute__((always_inline)) void transpose_keys(const void *keys, size_t row0, int nk,
                                                                 const int head_dim, const int format, float *kt) {
    const int vecs = (head_dim + 15) / 16;
    for (int h = 0; h < BLOCK_KEYS / 16; h++)
        for (int v = 0; v < vecs; v++) {
            const __mmask16 m = v + 1 < vecs || head_dim % 16 == 0 ? 0xFFFF : (__mmask16)((1u << (head_dim % 16)) - 1);
            __m512 r[16];
            for (int t = 0; t < 16; t++)
                r[t] = 16 * h + t < nk ? load16(keys, row0 + 16 * h + t, v * 16, m, head_dim, format)
                                       : _mm512_setzero_ps();
            transpose16(r);  /* r[i] = dim 16v+i of the 16 keys */
            for (int i = 0; i < 16 && 16 * v + i < head_dim; i++)
                _mm512_store_ps(kt + (size_t)(16 * v + i) * BLOCK_KEYS + 16 * h, r[i]);
        }
}

/* vb [nk][MAX_HEAD_DIM] <- the nk values from cache row `row0` as fp32. */
static inline __attribute__((always_inline)) void widen_values(const void *values, size_t row0, int nk,
                                                                const int head_dim, const int format, float *vb) {
    const int vecs = (head_dim + 15) / 16;
    const __mmask16 tail = head_dim % 16 ? (__mmask16)((1u << (head_dim % 16)) - 1) : 0xFFFF;
    for (int t = 0; t < nk; t++)
        for (int v = 0; v < vecs; v++)
            _mm512_store_ps(vb + (size_t)t * MAX_HEAD_DIM + v * 16,
                            load16(values, row0 + t, v * 16, v + 1 < vecs ? 0xFFFF : tail, head_dim, format));
}

/* Rows [g, g+GROUP_ROWS) of a block over keys j0..j0+nk-1 (kt: those keys transposed, [d][BLOCK_KEYS]; their
   values from the cache, int8 ones from vb, widened to fp32 rows of MAX_HEAD_DIM): scores, the
   online-softmax update of each row, and o = o * alpha + p . V. Rows past `live` are padding. */
static inline __attribute__((always_inline)) void prefill_group(int live, int first_pos, int j0, int nk, const int head_dim,
                                                                 const float *q, const float *kt, const void *values,
                                                                 const float *vb, Softmax *st, float *o,
                                                                 const int format) {
    const int vecs = (head_dim + 15) / 16;
    const __mmask16 tail = head_dim % 16 ? (__mmask16)((1u << (head_dim % 16)) - 1) : 0xFFFF;
    __m512 s[GROUP_ROWS][SCORE_VECS];
    for (int i = 0; i < GROUP_ROWS; i++)
        for (int c = 0; c < SCORE_VECS; c++) s[i][c] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d++) {
        __m512 k[SCORE_VECS];
        for (int c = 0; c < SCORE_VECS; c++) k[c] = _mm512_load_ps(kt + d * BLOCK_KEYS + 16 * c);
        for (int i = 0; i < GROUP_ROWS; i++) {
            const __m512 b = _mm512_set1_ps(i < live ? q[(size_t)i * head_dim + d] : 0.f);
            for (int c = 0; c < SCORE_VECS; c++) s[i][c] = _mm512_fmadd_ps(b, k[c], s[i][c]);
        }
    }
    float p[GROUP_ROWS][BLOCK_KEYS] __attribute__((aligned(64))), alpha[GROUP_ROWS];
    for (int i = 0; i < GROUP_ROWS; i++) {
        int valid = first_pos + i - j0 + 1;
        valid = i >= live || valid < 0 ? 0 : valid < nk ? valid : nk;
        if (!valid) {  /* padding, or a row before these keys (causal): unchanged */
            alpha[i] = 1.f;
            memset(p[i], 0, sizeof p[i]);
            continue;
        }
        alpha[i] = softmax_update(&st[i], s[i], SCORE_VECS, valid, p[i]);
    }
    /* Up to 8 x 16 dims per pass over the keys (4 when the head is wider), every accumulator in a register:
       constant indices only (a loop bounded by `live` makes GCC keep the array in memory, a store per FMA). */
    const int chunk = vecs <= 8 ? vecs : 4;
    for (int v0 = 0; v0 < vecs; v0 += chunk) {
        __m512 acc[GROUP_ROWS][8];
        for (int i = 0; i < GROUP_ROWS; i++)
            for (int v = 0; v < chunk; v++) {
                const __mmask16 m = v0 + v + 1 < vecs ? 0xFFFF : tail;
                acc[i][v] = i < live && v0 + v < vecs
                    ? _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + (size_t)i * head_dim + (v0 + v) * 16), _mm512_set1_ps(alpha[i]))
                    : _mm512_setzero_ps();
            }
        for (int t = 0; t < nk; t++)
            for (int v = 0; v < chunk && v0 + v < vecs; v++) {
                const __mmask16 m = v0 + v + 1 < vecs ? 0xFFFF : tail;
                const __m512 x = format == CACHE_INT8 ? _mm512_maskz_loadu_ps(m, vb + (size_t)t * MAX_HEAD_DIM + (v0 + v) * 16)
                                    : load16(values, (size_t)j0 + t, (v0 + v) * 16, m, head_dim, format);
                for (int i = 0; i < GROUP_ROWS; i++) acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][t]), x, acc[i][v]);
            }
        for (int i = 0; i < GROUP_ROWS; i++)
            if (i < live)
                for (int v = 0; v < chunk && v0 + v < vecs; v++)
                    _mm512_mask_storeu_ps(o + (size_t)i * head_dim + (v0 + v) * 16, v0 + v + 1 < vecs ? 0xFFFF : tail,
                                          acc[i][v]);
    }
}

static inline __attribute__((always_inline)) void attend(int rows, int first_pos, const int head_dim, const float *q,
                                                         const void *keys, const void *values, float *out, int ldo,
                                                         const int format) {
    if (rows == 1) {
        attend_one(first_pos, head_dim, q, keys, values, out, format);
        return;
    }
    static __thread float kt[MAX_HEAD_DIM * BLOCK_KEYS] __attribute__((aligned(64)));  /* [d][key] */
    static __thread float o_buf[BLOCK_ROWS * MAX_HEAD_DIM] __attribute__((aligned(64)));
    static __thread float v_buf[BLOCK_KEYS * MAX_HEAD_DIM] __attribute__((aligned(64)));  /* [key][d] */
    Softmax st[BLOCK_ROWS];
    for (int r0 = 0; r0 < rows; r0 += BLOCK_ROWS) {
        const int nr = rows - r0 < BLOCK_ROWS ? rows - r0 : BLOCK_ROWS, last_pos = first_pos + r0 + nr - 1;
        for (int r = 0; r < nr; r++) st[r] = (Softmax){-INFINITY, 0.f};
        memset(o_buf, 0, sizeof(float) * nr * head_dim);
        for (int j0 = 0; j0 <= last_pos; j0 += BLOCK_KEYS) {
            const int nk = last_pos + 1 - j0 < BLOCK_KEYS ? last_pos + 1 - j0 : BLOCK_KEYS;
            transpose_keys(keys, (size_t)j0, nk, head_dim, format, kt);
            /* int8 values widened to fp32 once per block, not once per row group; fp16 ones are converted as
               read (both chosen by measurement: docs/design-measurements.md) */
            if (format == CACHE_INT8) widen_values(values, (size_t)j0, nk, head_dim, format, v_buf);
            for (int g = 0; g < nr; g += GROUP_ROWS) {
                const int live = nr - g < GROUP_ROWS ? nr - g : GROUP_ROWS, first = first_pos + r0 + g;
                if (j0 <= first + live - 1)  /* causal: some row of the group sees these keys */
                    prefill_group(live, first, j0, nk, head_dim, q + (size_t)(r0 + g) * head_dim, kt, values, v_buf,
                                  st + g, o_buf + (size_t)g * head_dim, format);
            }
        }
        for (int r = 0; r < nr; r++) {
            const float inv = 1.f / st[r].sum;
            for (int d = 0; d < head_dim; d++) out[(size_t)(r0 + r) * ldo + d] = o_buf[(size_t)r * head_dim + d] * inv;
        }
    }
}

/* Attention of `rows` query rows (already rotated and scaled, [rows][head_dim]) at positions first_pos..,
   over the cache's key/value rows (of `format`; rows 0..first_pos+rows-1); out: rows of stride ldo. Common
   head sizes get a kernel with the size fixed, so the accumulators stay in registers. */
void gqa_attend(int rows, int first_pos, int head_dim, const float *q, const void *keys, const void *values,
                float *out, int ldo, int format) {
#define ATTEND(D) (format == CACHE_FP16 ? attend(rows, first_pos, D, q, keys, values, out, ldo, CACHE_FP16) \
                   : format == CACHE_INT8 ? attend(rows, first_pos, D, q, keys, values, out, ldo, CACHE_INT8) \
                                          : attend(rows, first_pos, D, q, keys, values, out, ldo, CACHE_FP32))
    switch (head_dim) {
    case 64: ATTEND(64); break;
    case 80: ATTEND(80); break;
    case 96: ATTEND(96); break;
    case 128: ATTEND(128); break;
    case 256: ATTEND(256); break;
    default: ATTEND(head_dim); break;
    }
#undef ATTEND
}
