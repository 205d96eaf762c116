/* The C kernels behind edgelmm's onnxruntime ops, and the sizes their callers allocate by. */
#ifndef EDGELMM_KERNELS_H
#define EDGELMM_KERNELS_H
#include <stddef.h>
#include <stdint.h>

#define GEMV_CHUNK 128     /* k per GEMV step: 64 bytes of nibbles per column */
#define MAX_HEAD_DIM 256   /* attention heads up to this size (Gemma's 256) */

/* q4_kernels.c: int4 (MatMulNBits layout) x int8 activations. */
void q4_quantize_rows(int m0, int m1, int K, int bs, const float *A, int8_t *Aq, float *as, int32_t *asum);
void q4_gemm(int M, int N, int K, int bs, int n_begin, int n_end, const int8_t *Aq, const float *as,
             const int32_t *asum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
             float *C, uint8_t *scratch);
void q4_gemv_prepare(int K, int bs, const int8_t *aq, const float *as, int8_t *ag, float *lane_scale,
                     float *lane_zsum);
void q4_gemv(int K, int bs, int n_begin, int n_end, const int8_t *ag, const float *lane_scale,
             const float *lane_zsum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
             float *y);
extern const size_t q4_scratch_bytes;

/* gqa_kernels.c: causal attention over an fp32 or fp16 KV cache. */
void gqa_rotate(const float *x, float *out, int head_dim, int rotary_dim, const float *cos_row, const float *sin_row,
                float scale);
void gqa_store_row(void *cache, size_t i, const float *row, int n, int half);
void gqa_attend(int rows, int first_pos, int head_dim, const float *q, const void *keys, const void *values,
                float *out, int ldo, int half);
#endif
