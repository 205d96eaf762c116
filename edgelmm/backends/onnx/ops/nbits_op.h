/* The pieces of edgelmm's nbits ops (matmul_op.c) the fused attention op (gqa_op.c) shares. */
#ifndef EDGELMM_NBITS_OP_H
#define EDGELMM_NBITS_OP_H
#include "ort_api.h"

typedef struct { int K, N, bs, bits, gelu; } Linear;                /* one MatMulNBits's shape */
typedef struct { const uint8_t *B, *zp; const float *scales, *bias; } Weights;
typedef struct { int8_t *q; float *scale; int32_t *zsum; } Quantized;  /* rows quantized per block (nbits_quantize_rows) */
typedef struct { int n_begin, n_end; float *C; } Columns;  /* output columns [n_begin, n_end), C at n_begin */

/* A linear's shape from a node's attributes, checked. */
OrtStatus *linear(int64_t K, int64_t N, int64_t bits, int64_t bs, int gelu, Linear *out);
/* Inputs first .. first+4 of the node: B, scales, zero points, g_idx, bias of the linear l. */
OrtStatus *weights(OrtKernelContext *ctx, size_t first, const Linear *l, Weights *w);
/* Buffers for M rows of K values quantized per block of bs (1 when allocated); freed whatever failed. */
int alloc_quantized(OrtAllocator *a, Quantized *q, int M, int K, int bs);
void free_quantized(OrtAllocator *a, Quantized *q);
/* Columns [0, K) of rows A [M, lda] quantized for the linear l into q's rows of ldq values (q pointing at the
   first column to write). */
OrtStatus *quantize(OrtKernelContext *ctx, const Linear *l, int M, int K, const float *A, int lda, Quantized q,
                    int ldq);
/* The linear l (its bias and FastGelu) on M quantized rows, for `count` column ranges, each to its C (row
   stride ldc), over onnxruntime's threads. */
OrtStatus *multiply_ranges(OrtKernelContext *ctx, OrtAllocator *alloc, const Linear *l, const Weights *wt, int M,
                          const Quantized *q, const Columns *ranges, int count, int ldc);
/* multiply_ranges for the one range [n_begin, n_end) to C. */
OrtStatus *multiply(OrtKernelContext *ctx, OrtAllocator *alloc, const Linear *l, const Weights *wt, int M,
                    const Quantized *q, int n_begin, int n_end, float *C, int ldc);
#endif
