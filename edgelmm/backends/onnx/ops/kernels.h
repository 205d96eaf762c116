/* The C kernels behind edgelmm's onnxruntime ops, and the sizes their callers allocate by. */
#ifndef EDGELMM_KERNELS_H
#define EDGELMM_KERNELS_H
#include <stddef.h>
#include <stdint.h>

#define MAX_HEAD_DIM 256   /* attention heads up to this size (Gemma's 256) */

/* nbits_kernels.c: 4- and 8-bit weights (MatMulNBits layout) x int8 activations. */
void nbits_quantize_rows(int bits, int m0, int m1, int K, int bs, const float *A, int lda, int8_t *Aq, int ldq,
                         float *as, int32_t *zsum);
void nbits_gemm(int bits, int M, int K, int bs, int n_begin, int n_end, const int8_t *Aq, const float *as,
                const int32_t *zsum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
                int gelu, float *C, int ldc, uint8_t *scratch);
int nbits_gemv_chunks(int bits, int K);
void nbits_gemv_prepare(int bits, int K, int bs, const int8_t *aq, const float *as, int8_t *ag, float *lane_scale,
                        float *lane_sum);
void nbits_gemv(int bits, int K, int bs, int n_begin, int n_end, const int8_t *ag, const float *lane_scale,
                const float *lane_sum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
                int gelu, float *y);
extern const size_t nbits_scratch_bytes;

/* gqa_kernels.c: causal attention over an fp32, fp16 or int8 KV cache. */
enum { CACHE_FP32, CACHE_FP16, CACHE_INT8 };  /* cache row formats; int8 rows end with their fp32 scale */
size_t cache_row_bytes(int head_dim, int format);
void gqa_rotate(const float *x, float *out, int head_dim, int rotary_dim, const float *cos_row, const float *sin_row,
                float scale);
void gqa_store_row(void *cache, size_t row, const float *x, int n, int format);
void gqa_attend(int rows, int first_pos, int head_dim, const float *q, const void *keys, const void *values,
                float *out, int ldo, int format);
#endif
