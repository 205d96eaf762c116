/* edgelmm.MatMulNBits and edgelmm.GeluMlpNBits on nbits_kernels.c.
   MatMulNBits: com.microsoft MatMulNBits (4- or 8-bit, int8 compute). Inputs as the original: A [..., K] fp32,
   B uint8 [N, K/bs, bs*bits/8], scales [N, K/bs], optional uint8 zero points (4-bit: two per byte, rows of
   ceil(K/bs/2) bytes; 8-bit: [N, K/bs]), g_idx (must be absent), optional bias [N]. Attribute gelu_tanh = 1
   (edgelmm's own): the output goes through com.microsoft FastGelu, fused here.
   GeluMlpNBits: MatMulNBits (up, K -> N) -> FastGelu -> MatMulNBits (down, N -> down_N), Phi's MLP, as one op:
   inputs A, then up's B, scales, zero points, g_idx, bias, then down's; attributes K, N, bits, block_size (up)
   and down_N, down_bits, down_block_size. For a prompt, each task makes MLP_TASK_COLUMNS columns of the up
   projection (or a down block, when wider) for every row and quantizes them for the down projection at once:
   a prompt's [M, N] fp32 buffer becomes [M, N] int8, in one parallel call rather than one fork and join per
   column chunk. The down projection then runs over the whole int8 buffer (not added into as each task's
   columns are made), so its [M, down_N] output stays in cache between the K slices. Both chosen by
   measurement: docs/design-measurements.md.
   Scratch comes from onnxruntime's arena (op_kernel_create). */
#include "kernels.h"
#include "nbits_op.h"
#include "ort_api.h"


#define TASKS 8         /* per GEMV or quantize call, over onnxruntime's threads: contiguous column (row) ranges */
#define MLP_TASK_COLUMNS 128  /* a prompt's up-projection columns per task (two tiles; a down block when wider) */

OrtStatus *linear(int64_t K, int64_t N, int64_t bits, int64_t bs, int gelu, Linear *out) {
    if (bits != 4 && bits != 8) return op_error("edgelmm nbits matmul: bits must be 4 or 8");
    if (bs < 16 || bs > (bits == 4 ? 4096 : 2048) || (bs & (bs - 1)) || K < bs || K % bs)  /* a block fits a panel */
        return op_error("edgelmm nbits matmul: block_size must be a power of 2 from 16 to 4096 (8-bit: 2048) dividing K");
    if (N < 1 || K > (1 << 24) || N > (1 << 24)) return op_error("edgelmm nbits matmul: K and N must be 1 .. 2^24");
    *out = (Linear){.K = (int)K, .N = (int)N, .bs = (int)bs, .bits = (int)bits, .gelu = gelu};
    return 0;
}

OrtStatus *weights(OrtKernelContext *ctx, size_t first, const Linear *l, Weights *w) {
    void *B, *scales, *zp, *g_idx, *bias;
    const int64_t kb = l->K / l->bs;
    CHECK(op_input_sized(ctx, first, T_UINT8, &B, (int64_t)l->N * l->K * l->bits / 8));
    CHECK(op_input_sized(ctx, first + 1, T_FLOAT, &scales, l->N * kb));
    CHECK(op_input(ctx, first + 2, T_UINT8, &zp, 0, 0));
    if (zp) CHECK(op_input_sized(ctx, first + 2, T_UINT8, &zp, l->N * (l->bits == 4 ? (kb + 1) / 2 : kb)));
    CHECK(op_input(ctx, first + 3, T_INT32, &g_idx, 0, 0));
    CHECK(op_input(ctx, first + 4, T_FLOAT, &bias, 0, 0));
    if (bias) CHECK(op_input_sized(ctx, first + 4, T_FLOAT, &bias, l->N));
    if (g_idx) return op_error("edgelmm nbits matmul: g_idx is not supported");
    *w = (Weights){.B = B, .zp = zp, .scales = scales, .bias = bias};
    return 0;
}

int alloc_quantized(OrtAllocator *a, Quantized *q, int M, int K, int bs) {
    q->q = op_alloc(a, (size_t)M * K);
    q->scale = op_alloc(a, (size_t)M * (K / bs) * sizeof(float));
    q->zsum = op_alloc(a, (size_t)M * (K / bs) * sizeof(int32_t));
    return q->q && q->scale && q->zsum;
}

void free_quantized(OrtAllocator *a, Quantized *q) { op_free(a, q->q); op_free(a, q->scale); op_free(a, q->zsum); }

typedef struct {
    const Linear *l;
    const Weights *w;
    OrtAllocator *alloc;
    int M, K, lda, ldq, count, width, ldc, tasks, failed;  /* width: the ranges' columns */
    const float *A;
    Quantized q;
    const Columns *ranges;
    float *lane_scale, *lane_sum;
    int8_t *ag;
} Work;

static void task_range(int begin, int end, int tasks, int i, int unit, int *b, int *e) {
    const int units = (end - begin + unit - 1) / unit;
    *b = begin + (int)((int64_t)units * i / tasks) * unit;
    *e = begin + (int)((int64_t)units * (i + 1) / tasks) * unit;
    if (*e > end) *e = end;
}

static void quantize_task(void *p, size_t i) {
    Work *w = p;
    int b, e;
    task_range(0, w->M, w->tasks, (int)i, 1, &b, &e);
    nbits_quantize_rows(w->l->bits, b, e, w->K, w->l->bs, w->A, w->lda, w->q.q, w->ldq, w->q.scale, w->q.zsum);
}

/* Of the ranges' columns laid end to end, [b, e) falls in range r (starting at `at` there) as its columns
   [*n0, *n1); 0 when it does not reach it. */
static int part_of(const Columns *c, int at, int b, int e, int *n0, int *n1) {
    const int width = c->n_end - c->n_begin, lo = b > at ? b : at, hi = e < at + width ? e : at + width;
    *n0 = c->n_begin + lo - at;
    *n1 = c->n_begin + hi - at;
    return lo < hi;
}

/* Task i's share of the ranges' columns (whole 64-column GEMM tiles), to nbits_gemm range by range. */
static void gemm_task(void *p, size_t i) {
    Work *w = p;
    int b, e, n0, n1;
    task_range(0, w->width, w->tasks, (int)i, 64, &b, &e);
    if (b >= e) return;
    uint8_t *scratch = op_alloc(w->alloc, nbits_scratch_bytes);
    if (!scratch) { __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED); return; }
    for (int r = 0, at = 0; r < w->count; at += w->ranges[r].n_end - w->ranges[r].n_begin, r++)
        if (part_of(&w->ranges[r], at, b, e, &n0, &n1))
            nbits_gemm(w->l->bits, w->M, w->l->K, w->l->bs, n0, n1, w->q.q, w->q.scale, w->q.zsum, w->w->B,
                       w->w->scales, w->w->zp, w->w->bias, w->l->gelu, w->ranges[r].C + (n0 - w->ranges[r].n_begin),
                       w->ldc, scratch);
    op_free(w->alloc, scratch);
}

/* Task i's share of the ranges' columns (groups of 4), to nbits_gemv range by range. */
static void gemv_task(void *p, size_t i) {
    Work *w = p;
    int b, e, n0, n1;
    task_range(0, w->width, w->tasks, (int)i, 4, &b, &e);
    for (int r = 0, at = 0; r < w->count; at += w->ranges[r].n_end - w->ranges[r].n_begin, r++)
        if (part_of(&w->ranges[r], at, b, e, &n0, &n1))
            nbits_gemv(w->l->bits, w->l->K, w->l->bs, n0, n1, w->ag, w->lane_scale, w->lane_sum, w->w->B,
                       w->w->scales, w->w->zp, w->w->bias, w->l->gelu, w->ranges[r].C + (n0 - w->ranges[r].n_begin));
}

OrtStatus *quantize(OrtKernelContext *ctx, const Linear *l, int M, int K, const float *A, int lda,
                           Quantized q, int ldq) {
    Work w = {.l = l, .M = M, .K = K, .lda = lda, .ldq = ldq, .A = A, .q = q, .tasks = M >= 64 ? TASKS : 1};
    return op_parallel(ctx, quantize_task, w.tasks, &w);
}

OrtStatus *multiply_ranges(OrtKernelContext *ctx, OrtAllocator *alloc, const Linear *l, const Weights *wt, int M,
                          const Quantized *q, const Columns *ranges, int count, int ldc) {
    Work w = {.l = l, .w = wt, .alloc = alloc, .M = M, .q = *q, .ranges = ranges, .count = count, .ldc = ldc};
    for (int r = 0; r < count; r++) w.width += ranges[r].n_end - ranges[r].n_begin;
    if (M > 1) {
        /* a task per 64-column tile (up to 64): small tasks, so the threads end together and none waits on a
           last large one */
        w.tasks = (w.width + 63) / 64 < 64 ? (w.width + 63) / 64 : 64;
        OrtStatus *status = op_parallel(ctx, gemm_task, w.tasks, &w);
        return status ? status : w.failed ? op_error("edgelmm nbits matmul: out of memory") : 0;
    }
    w.tasks = w.width >= 256 ? TASKS : 1;
    const int chunks = nbits_gemv_chunks(l->bits, l->K);
    w.ag = op_alloc(alloc, (size_t)chunks * 128);
    w.lane_scale = op_alloc(alloc, (size_t)chunks * 16 * sizeof(float));
    w.lane_sum = op_alloc(alloc, (size_t)chunks * 16 * sizeof(float));
    OrtStatus *status = 0;
    if (!w.ag || !w.lane_scale || !w.lane_sum) {
        status = op_error("edgelmm nbits matmul: out of memory");
    } else {
        nbits_gemv_prepare(l->bits, l->K, l->bs, q->q, q->scale, w.ag, w.lane_scale, w.lane_sum);
        status = op_parallel(ctx, gemv_task, w.tasks, &w);
    }
    op_free(alloc, w.ag); op_free(alloc, w.lane_scale); op_free(alloc, w.lane_sum);
    return status;
}

OrtStatus *multiply(OrtKernelContext *ctx, OrtAllocator *alloc, const Linear *l, const Weights *wt, int M,
                    const Quantized *q, int n_begin, int n_end, float *C, int ldc) {
    const Columns range = {n_begin, n_end, C};
    return multiply_ranges(ctx, alloc, l, wt, M, q, &range, 1, ldc);
}

/* Input 0 (A [..., K]) and output 0 ([..., N]) of a node; *M: the rows (0: nothing to compute). */
static OrtStatus *rows_in_out(OrtKernelContext *ctx, int K, int N, const float **A, float **C, int *M) {
    size_t rank = 0;
    int64_t dims[8], rows = 1;
    void *a, *c;
    CHECK(op_input(ctx, 0, T_FLOAT, &a, dims, &rank));
    if (rank < 1 || dims[rank - 1] != K) return op_error("edgelmm nbits matmul: A's last dimension is not K");
    for (size_t i = 0; i + 1 < rank; i++) rows *= dims[i];
    dims[rank - 1] = N;
    CHECK(op_output(ctx, 0, dims, rank, &c));
    if (rows > (1 << 24)) return op_error("edgelmm nbits matmul: too many rows");
    *A = a; *C = c; *M = (int)rows;
    return 0;
}

typedef struct { OrtAllocator *alloc; Linear l; } MatMul;  /* the allocator first (op_kernel_create) */

static OrtStatus *matmul_create(const OrtCustomOp *op, const OrtApiSlot *api, const OrtKernelInfo *info, void **out) {
    (void)op; (void)api;
    Linear l;
    CHECK(linear(op_attr_int(info, "K", 0), op_attr_int(info, "N", 0), op_attr_int(info, "bits", 0),
                 op_attr_int(info, "block_size", 0), op_attr_int(info, "gelu_tanh", 0) != 0, &l));
    CHECK(op_kernel_create(info, sizeof(MatMul), out));
    MatMul *node = *out;
    node->l = l;
    return 0;
}

static OrtStatus *matmul_compute(void *kernel, OrtKernelContext *ctx) {
    const MatMul *node = kernel;
    const Linear *l = &node->l;
    const float *A;
    float *C;
    int M;
    Weights wt;
    CHECK(weights(ctx, 1, l, &wt));
    CHECK(rows_in_out(ctx, l->K, l->N, &A, &C, &M));
    if (M == 0) return 0;
    Quantized q;
    OrtStatus *status = alloc_quantized(node->alloc, &q, M, l->K, l->bs) ? 0
                                                                         : op_error("edgelmm.MatMulNBits: out of memory");
    if (!status) status = quantize(ctx, l, M, l->K, A, l->K, q, l->K);
    if (!status) status = multiply(ctx, node->alloc, l, &wt, M, &q, 0, l->N, C, l->N);
    free_quantized(node->alloc, &q);
    return status;
}

typedef struct { OrtAllocator *alloc; Linear up, down; } Mlp;  /* the allocator first (op_kernel_create) */

static OrtStatus *mlp_create(const OrtCustomOp *op, const OrtApiSlot *api, const OrtKernelInfo *info, void **out) {
    (void)op; (void)api;
    Linear up, down;
    const int64_t N = op_attr_int(info, "N", 0);
    CHECK(linear(op_attr_int(info, "K", 0), N, op_attr_int(info, "bits", 0), op_attr_int(info, "block_size", 0), 1,
                 &up));
    CHECK(linear(N, op_attr_int(info, "down_N", 0), op_attr_int(info, "down_bits", 0),
                 op_attr_int(info, "down_block_size", 0), 0, &down));
    CHECK(op_kernel_create(info, sizeof(Mlp), out));
    Mlp *node = *out;
    node->up = up;
    node->down = down;
    return 0;
}

typedef struct {
    const Linear *up, *down;
    const Weights *w;
    OrtAllocator *alloc;
    int M, width, failed;  /* width: up-projection columns per task (whole 64-column tiles and down blocks) */
    Quantized x, h;
} UpWork;

/* Task i: up-projection columns [i * width, +width) of every row, FastGelu'd into a private buffer, then
   quantized straight into h's columns for the down projection. */
static void up_task(void *p, size_t i) {
    UpWork *u = p;
    const int c0 = (int)i * u->width, width = u->up->N - c0 < u->width ? u->up->N - c0 : u->width;
    uint8_t *scratch = op_alloc(u->alloc, nbits_scratch_bytes);
    float *made = op_alloc(u->alloc, (size_t)u->M * width * sizeof(float));
    if (scratch && made) {
        nbits_gemm(u->up->bits, u->M, u->up->K, u->up->bs, c0, c0 + width, u->x.q, u->x.scale, u->x.zsum, u->w->B,
                   u->w->scales, u->w->zp, u->w->bias, u->up->gelu, made, width, scratch);
        const int b0 = c0 / u->down->bs;
        nbits_quantize_rows(u->down->bits, 0, u->M, width, u->down->bs, made, width, u->h.q + c0, u->up->N,
                            u->h.scale + b0, u->h.zsum + b0);
    } else {
        __atomic_store_n(&u->failed, 1, __ATOMIC_RELAXED);
    }
    op_free(u->alloc, scratch); op_free(u->alloc, made);
}

static OrtStatus *mlp_compute(void *kernel, OrtKernelContext *ctx) {
    const Mlp *m = kernel;
    const Linear *up = &m->up, *down = &m->down;
    const float *A;
    float *C;
    int M;
    Weights w_up, w_down;
    CHECK(weights(ctx, 1, up, &w_up));
    CHECK(weights(ctx, 6, down, &w_down));
    CHECK(rows_in_out(ctx, up->K, down->N, &A, &C, &M));
    if (M == 0) return 0;
    Quantized x, h;  /* both allocated (and freed) whatever fails */
    const int x_ok = alloc_quantized(m->alloc, &x, M, up->K, up->bs);
    const int h_ok = alloc_quantized(m->alloc, &h, M, up->N, down->bs);
    float *made = M == 1 ? op_alloc(m->alloc, (size_t)up->N * sizeof(float)) : 0;  /* one token's intermediate row */
    OrtStatus *status = x_ok && h_ok && (M > 1 || made) ? 0 : op_error("edgelmm.GeluMlpNBits: out of memory");
    if (!status) status = quantize(ctx, up, M, up->K, A, up->K, x, up->K);
    if (!status && M == 1) {
        status = multiply(ctx, m->alloc, up, &w_up, M, &x, 0, up->N, made, up->N);
        if (!status) status = quantize(ctx, down, M, up->N, made, up->N, h, up->N);
    } else if (!status) {
        /* a prompt: tasks of MLP_TASK_COLUMNS up-projection columns, each made, FastGelu'd and quantized for the
           down projection by one thread (no [M, N] fp32 buffer, one parallel call) */
        UpWork u = {.up = up, .down = down, .w = &w_up, .alloc = m->alloc, .M = M, .x = x, .h = h,
                    .width = down->bs > MLP_TASK_COLUMNS ? down->bs : MLP_TASK_COLUMNS};
        status = op_parallel(ctx, up_task, (size_t)((up->N + u.width - 1) / u.width), &u);
        if (!status && u.failed) status = op_error("edgelmm.GeluMlpNBits: out of memory");
    }
    if (!status) status = multiply(ctx, m->alloc, down, &w_down, M, &h, 0, down->N, C, down->N);
    free_quantized(m->alloc, &x); free_quantized(m->alloc, &h); op_free(m->alloc, made);
    return status;
}

static const char *matmul_name(const OrtCustomOp *op) { (void)op; return "MatMulNBits"; }
static const char *mlp_name(const OrtCustomOp *op) { (void)op; return "GeluMlpNBits"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static const int input_types[6] = {T_FLOAT, T_UINT8, T_FLOAT, T_UINT8, T_INT32, T_FLOAT};  /* then B .. bias again */
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i < 6 ? input_types[i] : input_types[i - 5]; }
static size_t matmul_inputs(const OrtCustomOp *op) { (void)op; return 6; }
static size_t mlp_inputs(const OrtCustomOp *op) { (void)op; return 11; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static int input_kind(const OrtCustomOp *op, size_t i) {  /* A, B, scales; the MLP's down B, scales */
    (void)op;
    return i < 3 || i == 6 || i == 7 ? REQUIRED : OPTIONAL;
}
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int memory_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }

#define NBITS_OP(NAME, INPUTS, CREATE, COMPUTE) { \
    .version = OP_API_VERSION, .GetName = NAME, .GetExecutionProviderType = provider, .GetInputType = input_type, \
    .GetInputTypeCount = INPUTS, .GetOutputType = output_type, .GetOutputTypeCount = output_count, \
    .KernelDestroy = op_kernel_destroy, .GetInputCharacteristic = input_kind, .GetOutputCharacteristic = output_kind, \
    .GetInputMemoryType = memory_type, .CreateKernelV2 = CREATE, .KernelComputeV2 = COMPUTE }
OrtCustomOp matmul_nbits_op = NBITS_OP(matmul_name, matmul_inputs, matmul_create, matmul_compute);
OrtCustomOp gelu_mlp_nbits_op = NBITS_OP(mlp_name, mlp_inputs, mlp_create, mlp_compute);
