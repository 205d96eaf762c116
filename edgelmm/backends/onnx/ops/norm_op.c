/* edgelmm.SkipLayerNormalization / edgelmm.SkipSimplifiedLayerNormalization: the com.microsoft ops on fp32
   rows, AVX-512, rows split over onnxruntime's threads. Inputs as the originals: input [..., H], skip (input's
   shape, or its last rows broadcast over the leading dimension), gamma [H], beta [H] (SkipLayerNormalization
   only; optional), bias [H] (optional). Outputs: output; mean [..., 1] and inv_std_var [..., 1] (optional; the
   simplified op writes its mean as 0), input_skip_bias_sum [..., H] (optional). Attribute epsilon.
   sum = input + skip + bias; output = (sum - mean) / sqrt(var + epsilon) * gamma + beta, with mean and var over
   H (var = E[sum^2] - mean^2, as onnxruntime computes it); the simplified op: sum / sqrt(E[sum^2] + epsilon) * gamma. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "ort_api.h"


#define TASKS 8

typedef struct { float epsilon; int simplified; } Node;

static OrtStatus *create(const OrtCustomOp *op, const OrtApiSlot *api, const OrtKernelInfo *info, void **out) {
    (void)api;
    Node *node = malloc(sizeof *node);
    if (!node) return op_error("edgelmm.SkipLayerNormalization: out of memory");
    node->epsilon = op_attr_float(info, "epsilon", 1e-12f);
    node->simplified = op == &skip_simplified_layer_norm_op;
    *out = node;
    return 0;
}

typedef struct {
    const Node *node;
    int rows, H, skip_rows, tasks;
    const float *x, *skip, *gamma, *beta, *bias;
    float *out, *mean, *inv_std, *sum;
} Work;

static inline __mmask16 tail_mask(int H, int h) { return H - h >= 16 ? 0xFFFF : (__mmask16)((1u << (H - h)) - 1); }

/* input + skip (+ bias) of row r at columns h .. h+15 (masked past H). */
static inline __m512 row_sum(const Work *w, int r, int h, __mmask16 m) {
    const size_t at = (size_t)r * w->H + h, skip_at = (size_t)(r % w->skip_rows) * w->H + h;
    __m512 s = _mm512_add_ps(_mm512_maskz_loadu_ps(m, w->x + at), _mm512_maskz_loadu_ps(m, w->skip + skip_at));
    return w->bias ? _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, w->bias + h)) : s;
}

static void norm_task(void *p, size_t i) {
    const Work *w = p;
    const int H = w->H, r0 = (int)((int64_t)w->rows * i / w->tasks), r1 = (int)((int64_t)w->rows * (i + 1) / w->tasks);
    for (int r = r0; r < r1; r++) {
        __m512 total = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
        for (int h = 0; h < H; h += 16) {
            const __mmask16 m = tail_mask(H, h);
            const __m512 s = row_sum(w, r, h, m);
            if (w->sum) _mm512_mask_storeu_ps(w->sum + (size_t)r * H + h, m, s);
            total = _mm512_add_ps(total, s);
            squares = _mm512_fmadd_ps(s, s, squares);
        }
        const float mean = w->node->simplified ? 0.f : _mm512_reduce_add_ps(total) / H;
        const float var = _mm512_reduce_add_ps(squares) / H - mean * mean;
        const float inv_std = 1.f / sqrtf((var > 0.f ? var : 0.f) + w->node->epsilon);
        if (w->mean) w->mean[r] = mean;
        if (w->inv_std) w->inv_std[r] = inv_std;
        const __m512 mean_v = _mm512_set1_ps(mean), inv_v = _mm512_set1_ps(inv_std);
        for (int h = 0; h < H; h += 16) {
            const __mmask16 m = tail_mask(H, h);
            const __m512 s = w->sum ? _mm512_maskz_loadu_ps(m, w->sum + (size_t)r * H + h) : row_sum(w, r, h, m);
            __m512 o = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(s, mean_v), inv_v), _mm512_maskz_loadu_ps(m, w->gamma + h));
            if (w->beta) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, w->beta + h));
            _mm512_mask_storeu_ps(w->out + (size_t)r * H + h, m, o);
        }
    }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Node *node = kernel;
    size_t rank = 0;
    int64_t dims[8], stat_dims[8];
    void *x, *skip, *gamma, *beta = 0, *bias, *out, *mean, *inv_std, *sum;
    CHECK(op_input(ctx, 0, T_FLOAT, &x, dims, &rank));
    if (rank < 1 || dims[rank - 1] < 1) return op_error("edgelmm.SkipLayerNormalization: input has no hidden dimension");
    const int64_t H = dims[rank - 1];
    int64_t rows = 1, skip_rows = 1, skip_dims[8];
    for (size_t d = 0; d + 1 < rank; d++) rows *= dims[d];
    if (rows > (1 << 30) || H > (1 << 24)) return op_error("edgelmm.SkipLayerNormalization: input too large");
    size_t skip_rank = 0, lead = 0;
    CHECK(op_input(ctx, 1, T_FLOAT, &skip, skip_dims, &skip_rank));
    while (lead < skip_rank && skip_dims[lead] == 1) lead++;  /* leading 1s broadcast */
    int same = skip && skip_rank - lead <= rank;  /* the rest: input's trailing dimensions */
    for (size_t d = lead; same && d < skip_rank; d++) {
        same = skip_dims[d] == dims[rank - skip_rank + d];
        skip_rows *= d + 1 < skip_rank ? skip_dims[d] : 1;
    }
    if (!same || skip_rank < 1 || skip_dims[skip_rank - 1] != H)
        return op_error("edgelmm.SkipLayerNormalization: skip must have input's shape or broadcast over it");
    CHECK(op_input_sized(ctx, 2, T_FLOAT, &gamma, H));
    const int bias_input = node->simplified ? 3 : 4;
    if (!node->simplified) {
        CHECK(op_input(ctx, 3, T_FLOAT, &beta, 0, 0));
        if (beta) CHECK(op_input_sized(ctx, 3, T_FLOAT, &beta, H));
    }
    CHECK(op_input(ctx, bias_input, T_FLOAT, &bias, 0, 0));
    if (bias) CHECK(op_input_sized(ctx, bias_input, T_FLOAT, &bias, H));
    for (size_t d = 0; d < rank; d++) stat_dims[d] = dims[d];
    stat_dims[rank - 1] = 1;
    CHECK(op_output(ctx, 0, dims, rank, &out));
    CHECK(op_optional_output(ctx, 1, stat_dims, rank, &mean));
    CHECK(op_optional_output(ctx, 2, stat_dims, rank, &inv_std));
    CHECK(op_optional_output(ctx, 3, dims, rank, &sum));
    Work w = {.node = node, .rows = (int)rows, .H = (int)H, .skip_rows = (int)skip_rows,
              .tasks = rows >= 64 ? TASKS : 1, .x = x, .skip = skip, .gamma = gamma, .beta = beta, .bias = bias,
              .out = out, .mean = mean, .inv_std = inv_std, .sum = sum};
    return rows ? op_parallel(ctx, norm_task, w.tasks, &w) : 0;
}

static void destroy(void *kernel) { free(kernel); }
static const char *layer_name(const OrtCustomOp *op) { (void)op; return "SkipLayerNormalization"; }
static const char *simplified_name(const OrtCustomOp *op) { (void)op; return "SkipSimplifiedLayerNormalization"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int float_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t layer_inputs(const OrtCustomOp *op) { (void)op; return 5; }
static size_t simplified_inputs(const OrtCustomOp *op) { (void)op; return 4; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 4; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i < 3 ? REQUIRED : OPTIONAL; }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? REQUIRED : OPTIONAL; }
static int memory_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }

#define NORM_OP(NAME, INPUTS) { \
    .version = OP_API_VERSION, .GetName = NAME, .GetExecutionProviderType = provider, .GetInputType = float_type, \
    .GetInputTypeCount = INPUTS, .GetOutputType = float_type, .GetOutputTypeCount = output_count, \
    .KernelDestroy = destroy, .GetInputCharacteristic = input_kind, .GetOutputCharacteristic = output_kind, \
    .GetInputMemoryType = memory_type, .CreateKernelV2 = create, .KernelComputeV2 = compute }
OrtCustomOp skip_layer_norm_op = NORM_OP(layer_name, layer_inputs);
OrtCustomOp skip_simplified_layer_norm_op = NORM_OP(simplified_name, simplified_inputs);
