/* edgelmm.MatMulNBits: com.microsoft MatMulNBits (4- or 8-bit, int8 compute) on nbits_kernels.c. Inputs as
   the original: A [..., K] fp32, B uint8 [N, K/bs, bs*bits/8], scales [N, K/bs], optional uint8 zero points
   (4-bit: two per byte, rows of ceil(K/bs/2) bytes; 8-bit: [N, K/bs]), g_idx (must be absent), optional bias [N].
   Attribute gelu_tanh = 1 (edgelmm's own): the output goes through com.microsoft FastGelu, fused here. */
#include <stdlib.h>

#include "kernels.h"
#include "ort_api.h"


#define TASKS 8  /* per call, over onnxruntime's threads: contiguous column ranges (rows for quantizing) */

typedef struct { int K, N, bs, bits, gelu; } Node;

static OrtStatus *create(const OrtCustomOp *op, const OrtApiSlot *api, const OrtKernelInfo *info, void **out) {
    (void)op; (void)api;
    const int64_t K = op_attr_int(info, "K", 0), N = op_attr_int(info, "N", 0), bits = op_attr_int(info, "bits", 0);
    const int64_t bs = op_attr_int(info, "block_size", 0);
    if (bits != 4 && bits != 8) return op_error("edgelmm.MatMulNBits: bits must be 4 or 8");
    if (bs < 16 || bs > (bits == 4 ? 4096 : 2048) || (bs & (bs - 1)) || K < bs || K % bs)  /* a block fits a panel */
        return op_error("edgelmm.MatMulNBits: block_size must be a power of 2 from 16 to 4096 (8-bit: 2048) dividing K");
    if (N < 1 || K > (1 << 24) || N > (1 << 24)) return op_error("edgelmm.MatMulNBits: K and N must be 1 .. 2^24");
    Node *node = malloc(sizeof *node);
    if (!node) return op_error("edgelmm.MatMulNBits: out of memory");
    node->K = (int)K; node->N = (int)N; node->bs = (int)bs; node->bits = (int)bits;
    node->gelu = op_attr_int(info, "gelu_tanh", 0) != 0;
    *out = node;
    return 0;
}

typedef struct {
    const Node *node;
    int M, tasks, failed;
    const float *A, *scales, *bias;
    const uint8_t *B, *zp;
    float *C, *as, *lane_scale, *lane_zsum;
    int8_t *Aq, *ag;
    int32_t *asum;
} Work;

static void task_range(int total, int tasks, int i, int unit, int *b, int *e) {
    const int units = (total + unit - 1) / unit;
    *b = (int)((int64_t)units * i / tasks) * unit;
    *e = (int)((int64_t)units * (i + 1) / tasks) * unit;
    if (*e > total) *e = total;
}

static void quantize_task(void *p, size_t i) {
    Work *w = p;
    int b, e;
    task_range(w->M, w->tasks, (int)i, 1, &b, &e);
    nbits_quantize_rows(w->node->bits, b, e, w->node->K, w->node->bs, w->A, w->Aq, w->as, w->asum);
}

static void gemm_task(void *p, size_t i) {
    Work *w = p;
    int b, e;
    task_range(w->node->N, w->tasks, (int)i, 16, &b, &e);
    if (b >= e) return;
    uint8_t *scratch = aligned_alloc(64, nbits_scratch_bytes);
    if (!scratch) { __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED); return; }
    nbits_gemm(w->node->bits, w->M, w->node->N, w->node->K, w->node->bs, b, e, w->Aq, w->as, w->asum, w->B, w->scales, w->zp,
            w->bias, w->node->gelu, w->C, scratch);
    free(scratch);
}

static void gemv_task(void *p, size_t i) {
    Work *w = p;
    int b, e;
    task_range(w->node->N, w->tasks, (int)i, 4, &b, &e);
    if (b < e)
        nbits_gemv(w->node->bits, w->node->K, w->node->bs, b, e, w->ag, w->lane_scale, w->lane_zsum, w->B, w->scales,
                   w->zp, w->bias, w->node->gelu, w->C);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Node *node = kernel;
    size_t rank = 0;
    int64_t dims[8];
    void *A, *B, *scales, *zp, *g_idx, *bias, *C;
    const int64_t kb = node->K / node->bs;
    CHECK(op_input(ctx, 0, T_FLOAT, &A, dims, &rank));
    CHECK(op_input_sized(ctx, 1, T_UINT8, &B, (int64_t)node->N * node->K * node->bits / 8));
    CHECK(op_input_sized(ctx, 2, T_FLOAT, &scales, node->N * kb));
    CHECK(op_input(ctx, 3, T_UINT8, &zp, 0, 0));
    if (zp) CHECK(op_input_sized(ctx, 3, T_UINT8, &zp, node->N * (node->bits == 4 ? (kb + 1) / 2 : kb)));
    CHECK(op_input(ctx, 4, T_INT32, &g_idx, 0, 0));
    CHECK(op_input(ctx, 5, T_FLOAT, &bias, 0, 0));
    if (bias) CHECK(op_input_sized(ctx, 5, T_FLOAT, &bias, node->N));
    if (g_idx) return op_error("edgelmm.MatMulNBits: g_idx is not supported");
    if (rank < 1 || dims[rank - 1] != node->K) return op_error("edgelmm.MatMulNBits: A's last dimension is not K");
    int64_t M = 1;
    for (size_t i = 0; i + 1 < rank; i++) M *= dims[i];
    dims[rank - 1] = node->N;
    CHECK(op_output(ctx, 0, dims, rank, &C));
    if (M == 0) return 0;
    if (M > (1 << 24)) return op_error("edgelmm.MatMulNBits: too many rows");
    const int K = node->K, chunks = nbits_gemv_chunks(node->bits, K);
    Work w = {.node = node, .M = (int)M, .A = A, .scales = scales, .bias = bias, .B = B, .zp = zp, .C = C};
    w.Aq = malloc((size_t)M * K);
    w.as = malloc((size_t)M * kb * sizeof(float));
    w.asum = malloc((size_t)M * kb * sizeof(int32_t));
    OrtStatus *status = 0;
    if (!w.Aq || !w.as || !w.asum) { status = op_error("edgelmm.MatMulNBits: out of memory"); goto done; }
    w.tasks = M >= 64 ? TASKS : 1;
    if ((status = op_parallel(ctx, quantize_task, w.tasks, &w))) goto done;
    w.tasks = node->N >= 256 ? TASKS : 1;
    if (M == 1) {
        w.ag = malloc((size_t)chunks * 128);
        w.lane_scale = malloc((size_t)chunks * 16 * sizeof(float));
        w.lane_zsum = malloc((size_t)chunks * 16 * sizeof(float));
        if (!w.ag || !w.lane_scale || !w.lane_zsum) { status = op_error("edgelmm.MatMulNBits: out of memory"); goto done; }
        nbits_gemv_prepare(node->bits, K, node->bs, w.Aq, w.as, w.ag, w.lane_scale, w.lane_zsum);
        status = op_parallel(ctx, gemv_task, w.tasks, &w);
    } else {
        status = op_parallel(ctx, gemm_task, w.tasks, &w);
        if (!status && w.failed) status = op_error("edgelmm.MatMulNBits: out of memory");
    }
done:
    free(w.Aq); free(w.as); free(w.asum); free(w.ag); free(w.lane_scale); free(w.lane_zsum);
    return status;
}

static void destroy(void *kernel) { free(kernel); }
static const char *name(const OrtCustomOp *op) { (void)op; return "MatMulNBits"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static const int input_types[6] = {T_FLOAT, T_UINT8, T_FLOAT, T_UINT8, T_INT32, T_FLOAT};
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i < 6 ? input_types[i] : 0; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 6; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i < 3 ? REQUIRED : OPTIONAL; }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int memory_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }

OrtCustomOp matmul_nbits_op = {
    .version = OP_API_VERSION, .GetName = name, .GetExecutionProviderType = provider, .GetInputType = input_type,
    .GetInputTypeCount = input_count, .GetOutputType = output_type, .GetOutputTypeCount = output_count,
    .KernelDestroy = destroy, .GetInputCharacteristic = input_kind, .GetOutputCharacteristic = output_kind,
    .GetInputMemoryType = memory_type, .CreateKernelV2 = create, .KernelComputeV2 = compute,
};
